//! TLS material for the front end: a self-signed certificate generated once and reused, or the
//! operator's own PEM files; and the rustls server configuration built from them.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} found ({detail})")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The names a generated certificate must cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertNames {
    pub registrar: String,
    pub domain: String,
    pub ips: Vec<IpAddr>,
}

impl CertNames {
    /// What a relay's generated certificate covers: the registrar, `*.<domain>` and the
    /// relay's own IPs (the listen IP unless it is a wildcard, and an advertised IP).
    pub fn for_relay(registrar: &str, domain: &str, bind_ip: IpAddr, advertise: &str) -> Self {
        let mut ips: Vec<IpAddr> = Vec::new();
        if !bind_ip.is_unspecified() {
            ips.push(bind_ip);
        }
        if let Ok(ip) = advertise.parse::<IpAddr>() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Self {
            registrar: registrar.to_string(),
            domain: domain.to_string(),
            ips,
        }
    }

    /// Subject alternative names, one per line: also the record of what a stored
    /// certificate covers, so that a change of names makes a new certificate.
    fn san_lines(&self) -> Vec<String> {
        let mut sans = vec![
            format!("DNS:{}", self.registrar),
            format!("DNS:*.{}", self.domain),
            format!("DNS:{}", self.domain),
        ];
        sans.extend(self.ips.iter().map(|ip| format!("IP:{ip}")));
        sans
    }
}

/// Where a certificate and its key live.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Returns the self-signed certificate in `state_dir`, generating it on first use or when the
/// names it must cover have changed. The key is written with mode 0600.
pub fn load_or_generate(state_dir: &Path, names: &CertNames) -> Result<CertFiles, TlsError> {
    let files = CertFiles {
        cert: state_dir.join("relay-cert.pem"),
        key: state_dir.join("relay-key.pem"),
    };
    let names_file = state_dir.join("relay-cert.names");
    let wanted = names.san_lines().join("\n") + "\n";
    let current = fs::read_to_string(&names_file).ok();
    if current.as_deref() == Some(wanted.as_str()) && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let (cert_pem, key_pem) = generate(names)?;
    write_file(&files.key, key_pem.as_bytes(), 0o600).map_err(io(&files.key))?;
    write_file(&files.cert, cert_pem.as_bytes(), 0o644).map_err(io(&files.cert))?;
    write_file(&names_file, wanted.as_bytes(), 0o644).map_err(io(&names_file))?;
    tracing::info!(cert = %files.cert.display(), "generated a self-signed certificate");
    Ok(files)
}

/// A self-signed ECDSA P-256 certificate (PEM) and its key (PEM) covering `names`.
pub fn generate(names: &CertNames) -> Result<(String, String), TlsError> {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, SanType};
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.domain.clone());
    dn.push(DnType::OrganizationName, "TAAS relay (self-signed)");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::DnsName(names.registrar.clone().try_into()?),
        SanType::DnsName(format!("*.{}", names.domain).try_into()?),
        SanType::DnsName(names.domain.clone().try_into()?),
    ];
    params
        .subject_alt_names
        .extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    // Write beside the target and rename, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(pem_error(path, "certificate", "the file holds none".into())),
        Err(error) => Err(pem_error(path, "certificate", error.to_string())),
    }
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| pem_error(path, "private key", error.to_string()))
}

fn pem_error(path: &Path, what: &'static str, detail: String) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what,
        detail,
    }
}

/// The crypto provider used everywhere (ring: no C toolchain beyond cc, small and fast).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The front end's server configuration: HTTP/1.1 only (ALPN), TLS 1.2 and 1.3.
pub fn server_config(files: &CertFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> CertNames {
        CertNames {
            registrar: "taas-registrar.localhost".into(),
            domain: "taas.localhost".into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn generated_once_then_reused_until_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path(), &names()).unwrap();
        let pem = fs::read(&first.cert).unwrap();
        let again = load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(fs::read(&again.cert).unwrap(), pem, "reused");
        let mode = fs::metadata(&again.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let mut other = names();
        other.domain = "example.test".into();
        let changed = load_or_generate(dir.path(), &other).unwrap();
        assert_ne!(
            fs::read(&changed.cert).unwrap(),
            pem,
            "regenerated for new names"
        );
        server_config(&changed).unwrap();
        crate::agent::client_tls_config(&crate::agent::Trust::PemFile(changed.cert.clone()))
            .unwrap();
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.pem");
        let error = read_certs(&path).unwrap_err().to_string();
        assert!(error.contains("nothing.pem"), "{error}");
        fs::write(&path, "not pem").unwrap();
        let error = read_certs(&path).unwrap_err().to_string();
        assert!(
            error.contains("nothing.pem") && error.contains("certificate"),
            "{error}"
        );
    }
}
