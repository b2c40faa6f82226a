//! TLS material for the front end: a self-signed certificate generated once and reused, or the
//! operator's own PEM files; and the rustls server configuration built from them.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
/// names it must cover have changed.
///
/// The state directory is created 0700; one that already exists and is group- or
/// world-writable is warned about but left alone (it may be shared, like `/tmp`, and is not
/// ours to change). The key is 0600 from the moment it exists: every file is written to a
/// fresh, randomly named temporary file created exclusively (no existing file or planted
/// symbolic link is ever opened) and renamed into place (a link at the final name is
/// replaced, not followed). A reused key that has become readable by others is tightened
/// back to 0600, and a key that is not a regular file is not trusted: a new pair is made.
pub fn load_or_generate(state_dir: &Path, names: &CertNames) -> Result<CertFiles, TlsError> {
    let files = CertFiles {
        cert: state_dir.join("relay-cert.pem"),
        key: state_dir.join("relay-key.pem"),
    };
    let names_file = state_dir.join("relay-cert.names");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    create_state_dir(state_dir).map_err(io(state_dir))?;
    let wanted = names.san_lines().join("\n") + "\n";
    let current = fs::read_to_string(&names_file).ok();
    if current.as_deref() == Some(wanted.as_str())
        && files.cert.exists()
        && reusable_key(&files.key).map_err(io(&files.key))?
    {
        return Ok(files);
    }
    let (cert_pem, key_pem) = generate(names)?;
    write_file(&files.key, key_pem.as_bytes(), 0o600).map_err(io(&files.key))?;
    write_file(&files.cert, cert_pem.as_bytes(), 0o644).map_err(io(&files.cert))?;
    write_file(&names_file, wanted.as_bytes(), 0o644).map_err(io(&names_file))?;
    tracing::info!(cert = %files.cert.display(), "generated a self-signed certificate");
    Ok(files)
}

/// Creates `dir` (and missing parents) with mode 0700; warns about an existing one that
/// others may write to.
fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o022 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format_args!("{:o}", mode & 0o7777),
            "the state directory is writable by other users, who could replace the generated \
             certificate and key; use a directory only this user can write to (--state-dir)"
        );
    }
    Ok(())
}

/// Whether the generated key at `path` can be reused: a regular file (not a link), which is
/// made 0600 again if its mode was loosened.
fn reusable_key(path: &Path) -> std::io::Result<bool> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    if !metadata.file_type().is_file() {
        tracing::warn!(key = %path.display(), "the generated key is not a regular file; generating a new one");
        return Ok(false);
    }
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            key = %path.display(),
            mode = format_args!("{:o}", mode & 0o7777),
            "the generated key was readable by other users; its mode is now 0600"
        );
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(true)
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

/// Writes `contents` to `path` atomically, with `mode` from creation on.
///
/// The temporary file beside the target has a random name and is created exclusively
/// (`O_CREAT | O_EXCL`, which also refuses a symbolic link planted at that name), so nothing
/// that already exists is ever opened or written through. The rename then replaces whatever
/// is at `path` (a link included, not its target), so a reader never sees half a file.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp); // no stray copy of a key left behind
    }
    written
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

/// Which certificates a server's must chain to, for the agent's connections to the registrar.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// The operating system's roots (rustls-native-certs).
    #[default]
    System,
    /// PEM certificates from a file (`--ca`): e.g. a self-signed relay's certificate.
    PemFile(PathBuf),
    /// Certificates given in memory (tests, demo mode).
    Certificates(Vec<CertificateDer<'static>>),
}

/// Why the client configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read the CA file {}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the CA file {} holds no PEM certificate", .0.display())]
    CaEmpty(PathBuf),
    #[error("a trusted certificate is unusable")]
    CaInvalid(#[source] rustls::Error),
    #[error(
        "no trusted root certificates found on this system: pass --ca FILE with the relay's \
         certificate"
    )]
    NoRoots,
    #[error("invalid configuration: no trusted certificate given")]
    NoCertificates,
    #[error("TLS set-up failed")]
    Rustls(#[source] rustls::Error),
}

/// The agent's client configuration: ring, the given trust, ALPN `http/1.1` (as the server's).
pub fn client_tls_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "while loading the system's root certificates");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ClientTlsError::NoRoots);
            }
        }
        Trust::PemFile(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|source| ClientTlsError::CaFile {
                    path: path.clone(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(ClientTlsError::CaEmpty(path.clone()));
            }
            for cert in certs {
                roots.add(cert).map_err(ClientTlsError::CaInvalid)?;
            }
        }
        Trust::Certificates(certs) => {
            for cert in certs {
                roots.add(cert.clone()).map_err(ClientTlsError::CaInvalid)?;
            }
            if roots.is_empty() {
                return Err(ClientTlsError::NoCertificates);
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(ClientTlsError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
        client_tls_config(&Trust::PemFile(changed.cert.clone())).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_generated_key_is_0600_in_a_0700_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("new").join("state");
        let files = load_or_generate(&state, &names()).unwrap();
        assert_eq!(mode(&files.key), 0o600, "key");
        assert_eq!(mode(&state), 0o700, "state directory");
        // Nothing but the three files: no temporary file left behind.
        let mut left: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["relay-cert.names", "relay-cert.pem", "relay-key.pem"]
        );
    }

    #[test]
    fn a_link_planted_at_the_old_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        // The fixed names the key and the certificate used to be written through.
        std::os::unix::fs::symlink(&victim, state.join("relay-key.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, state.join("relay-cert.tmp")).unwrap();
        let files = load_or_generate(&state, &names()).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(mode(&victim), 0o644);
        assert!(fs::symlink_metadata(&files.key)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(mode(&files.key), 0o600);
        read_key(&files.key).unwrap();
    }

    #[test]
    fn a_link_planted_at_the_key_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("relay-key.pem")).unwrap();
        let files = load_or_generate(&state, &names()).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(fs::symlink_metadata(&files.key)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(mode(&files.key), 0o600);
        // Also when the names match: a link is not a key this relay generated.
        let victim_key = dir.path().join("victim-key");
        fs::copy(&files.key, &victim_key).unwrap();
        fs::remove_file(&files.key).unwrap();
        std::os::unix::fs::symlink(&victim_key, &files.key).unwrap();
        let again = load_or_generate(&state, &names()).unwrap();
        assert!(fs::symlink_metadata(&again.key)
            .unwrap()
            .file_type()
            .is_file());
        assert_ne!(
            fs::read(&again.key).unwrap(),
            fs::read(&victim_key).unwrap()
        );
    }

    #[test]
    fn a_reused_key_readable_by_others_is_tightened_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path(), &names()).unwrap();
        let key = fs::read(&first.key).unwrap();
        fs::set_permissions(&first.key, fs::Permissions::from_mode(0o644)).unwrap();
        let again = load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(
            fs::read(&again.key).unwrap(),
            key,
            "reused, not regenerated"
        );
        assert_eq!(mode(&again.key), 0o600);
    }

    #[test]
    fn a_key_written_over_a_0644_one_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path(), &names()).unwrap();
        fs::set_permissions(&first.key, fs::Permissions::from_mode(0o644)).unwrap();
        let mut other = names();
        other.domain = "example.test".into();
        let changed = load_or_generate(dir.path(), &other).unwrap();
        assert_eq!(mode(&changed.key), 0o600);
    }

    #[test]
    fn an_existing_state_directory_keeps_its_mode() {
        // Shared directories (like /tmp) are not ours to change: warned about, used as is.
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let files = load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(mode(dir.path()), 0o777);
        assert_eq!(mode(&files.key), 0o600);
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

    #[test]
    fn ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_tls_config(&Trust::PemFile(missing)).unwrap_err();
        assert!(matches!(err, ClientTlsError::CaFile { .. }), "{err:?}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_tls_config(&Trust::PemFile(empty)).unwrap_err();
        assert!(matches!(err, ClientTlsError::CaEmpty(_)), "{err:?}");

        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["taas-registrar.localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let good = dir.path().join("relay.pem");
        std::fs::write(&good, cert.pem()).unwrap();
        let config = client_tls_config(&Trust::PemFile(good)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
