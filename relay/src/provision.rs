//! `taas-relay label new`: a fresh secret, the label file (`TaasLabel` + `Secret`), the
//! `otpauth://` URI with its terminal QR code, the agent's command line, and the original
//! steward's per-server params file (ORIGINAL.md §5.3) for hidden servers that are stewards.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::RngCore;
use serde::Serialize;
use taas_crds::limits::{DNS_PART_MAX_LEN, DNS_SUBDOMAIN_MAX_LEN};
use taas_crds::manifest::{render_label_file, LabelObject, SecretObject};
use taas_crds::{SecretKeyRef, TaasLabelSpec};

use crate::config::{Algorithm, LabelConfig};
use crate::label_source::{check_id, normalize_label, validate_label};
use crate::totp::encode_secret;

/// Bytes of a generated secret: 160 bits, the RFC 4226 recommendation for HMAC-SHA1.
pub const SECRET_LEN: usize = 20;
/// The Secret key holding the base32 secret.
pub const SECRET_KEY: &str = "secret";

/// What `label new` was asked for.
#[derive(Clone, Debug)]
pub struct NewLabel {
    pub id: String,
    pub label: String,
    pub namespace: String,
    /// The registrar's name: the TOTP issuer.
    pub registrar: String,
    /// Servers domain: the TOTP account is `LABEL.<domain>`.
    pub domain: String,
    /// The registrar URL for the agent, e.g. `https://taas-registrar.localhost:8443`.
    pub relay_url: String,
    /// The relay's certificate, passed to the agent as `--ca` (self-signed relays).
    pub ca_file: Option<PathBuf>,
    /// `spec.direct`: clients reach `https://LABEL.<domain>/` on the relay's HTTPS port,
    /// passed through to the hidden server by server name, with no 307.
    pub direct: bool,
    /// The spec's other fields a user may choose (the console's form); `Default` is what
    /// `label new` writes.
    pub options: SpecOptions,
}

/// Spec fields chosen at creation besides ID, LABEL and `direct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecOptions {
    pub algorithm: Algorithm,
    /// TOTP step in seconds.
    pub period: u32,
    pub max_parked: u32,
    pub source_pinning: bool,
}

impl Default for SpecOptions {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::SHA1,
            period: taas_crds::default_period(),
            max_parked: taas_crds::default_max_parked(),
            source_pinning: true,
        }
    }
}

/// What `label new` produced.
#[derive(Clone)]
pub struct Provisioned {
    /// The label file written (`DIR/LABEL.yaml`, mode 0600).
    pub path: PathBuf,
    /// The secret, base32 (upper case, no padding).
    pub secret_b32: String,
    /// `otpauth://totp/...` for authenticator apps (holds the secret).
    pub uri: String,
    /// The `taas-agent` command line for the hidden server. Its `--forward 127.0.0.1:8080` is a
    /// placeholder: the user replaces it with the address of the service to expose.
    pub agent_command: String,
}

impl fmt::Debug for Provisioned {
    // Hand-written: the secret and the URI (which contains it) never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioned")
            .field("path", &self.path)
            .field("secret_b32", &"<redacted>")
            .field("uri", &"<redacted>")
            .field("agent_command", &self.agent_command)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{} already exists: refusing to overwrite it (it holds that label's secret); \
         delete it first to provision the label again",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error("cannot write {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("cannot make a QR code: {0}")]
    Qr(String),
}

/// A fresh secret from the operating system's CSPRNG (the original used `Math.random`).
pub fn generate_secret() -> Vec<u8> {
    let mut secret = vec![0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret
}

/// RFC 3986 unreserved characters stay; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(s, COMPONENT)
}

fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::SHA1 => "SHA1",
        Algorithm::SHA256 => "SHA256",
        Algorithm::SHA512 => "SHA512",
    }
}

/// The Key URI for authenticator apps, e.g.
/// `otpauth://totp/ISSUER:ACCOUNT?secret=...&issuer=...&algorithm=SHA1&digits=6&period=30`.
/// (The original wrote the key length as `digits=40`.)
pub fn otpauth_uri(
    issuer: &str,
    account: &str,
    secret_b32: &str,
    algorithm: Algorithm,
    digits: u32,
    period: u64,
) -> String {
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm={}&digits={digits}&period={period}",
        enc(issuer),
        enc(account),
        enc(secret_b32),
        enc(issuer),
        algorithm_name(algorithm),
    )
}

/// `uri` as a QR code of Unicode half blocks, two modules per character cell, with the quiet
/// zone. Light modules are drawn as blocks: on the usual light-on-dark terminal that shows
/// dark modules on a light ground, which is what phone cameras expect.
pub fn qr_text(uri: &str) -> Result<String, ProvisionError> {
    use qrcode::render::unicode::Dense1x2;
    // Level L keeps the code small enough for a terminal; a screen does not get scratched.
    let code = qrcode::QrCode::with_error_correction_level(uri.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| ProvisionError::Qr(e.to_string()))?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Writes `DIR/LABEL.yaml` (a `TaasLabel` and its `Secret` with a fresh secret), refusing to
/// overwrite an existing file, with mode 0600 since it holds the secret.
pub fn write_label(dir: &Path, new: &NewLabel) -> Result<Provisioned, ProvisionError> {
    // The same checks the relay applies when it loads the file.
    let label = normalize_label(&new.label).map_err(ProvisionError::Invalid)?;
    check_id(&new.id).map_err(|e| ProvisionError::Invalid(e.to_string()))?;
    // A namespace is one part of a DNS name (RFC 1123 label).
    let namespace = normalize_label(&new.namespace)
        .ok()
        .filter(|ns| !ns.contains('.') && ns.len() <= DNS_PART_MAX_LEN)
        .ok_or_else(|| {
            ProvisionError::Invalid(format!(
                "namespace {:?} is not a valid Kubernetes namespace \
                 (up to {DNS_PART_MAX_LEN} of a-z, 0-9, '-')",
                new.namespace
            ))
        })?;
    let secret_name = format!("{}-totp", label.replace('.', "-"));
    if secret_name.len() > DNS_SUBDOMAIN_MAX_LEN {
        return Err(ProvisionError::Invalid(format!(
            "label {label:?} is too long to name its Secret {secret_name:?}"
        )));
    }
    let secret_b32 = encode_secret(&generate_secret());
    let spec = TaasLabelSpec {
        id: new.id.clone(),
        label: label.clone(),
        secret_ref: SecretKeyRef {
            name: secret_name.clone(),
            key: SECRET_KEY.to_string(),
        },
        algorithm: new.options.algorithm,
        period: new.options.period,
        max_parked: new.options.max_parked,
        source_pinning: new.options.source_pinning,
        proxy_protocol: Default::default(),
        client_port: None,
        client_admission: Default::default(),
        server_speaks_first: false,
        direct: new.direct,
        service: Default::default(),
        rendezvous_ports: taas_crds::default_rendezvous_ports(),
        replicas: None,
    };
    let config = validate_label(&spec, secret_b32.as_bytes()).map_err(ProvisionError::Invalid)?;
    let text = render_label_file(
        &LabelObject {
            name: label.clone(),
            namespace: namespace.clone(),
            spec,
        },
        &SecretObject {
            name: secret_name,
            namespace,
            data: [(SECRET_KEY.to_string(), secret_b32.clone().into_bytes())].into(),
        },
    );

    let path = dir.join(format!("{label}.yaml"));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| ProvisionError::Io { path, error }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    // create_new: refusing to overwrite is atomic, no check-then-write race.
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ProvisionError::Exists { path });
        }
        other => other.map_err(io_err(&path))?,
    };
    if let Err(e) = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
    {
        let _ = fs::remove_file(&path); // no half-written secret file left behind
        return Err(io_err(&path)(e));
    }

    Ok(for_agent(new, path, secret_b32, &config))
}

/// What the user is shown for a label file holding `secret_b32`: the URI and the agent's
/// command line (`label new`, the console's creation and rotation alike).
fn for_agent(
    new: &NewLabel,
    path: PathBuf,
    secret_b32: String,
    config: &LabelConfig,
) -> Provisioned {
    let uri = otpauth_uri(
        &new.registrar,
        &format!("{}.{}", config.label, new.domain),
        &secret_b32,
        config.algorithm,
        6,
        config.period,
    );
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut args = vec![
        "taas-agent".to_string(),
        "--relay".into(),
        new.relay_url.clone(),
        "--label-file".into(),
        absolute(&path).display().to_string(),
    ];
    if let Some(ca) = &new.ca_file {
        args.extend(["--ca".into(), absolute(ca).display().to_string()]);
    }
    args.extend(["--forward".into(), "127.0.0.1:8080".into()]);
    let agent_command = args
        .iter()
        .map(|a| shell_word(a))
        .collect::<Vec<_>>()
        .join(" ");
    Provisioned {
        path,
        secret_b32,
        uri,
        agent_command,
    }
}

/// Gives the label of the file `path` (one `TaasLabel` and its `Secret`, as [`write_label`]
/// writes them) a fresh secret: the file is rewritten in its canonical form (comments are not
/// kept) through a temporary dotfile and a rename, so a reload sees the old file or the new
/// one, never half of one. `new` supplies the names for the URI and the command (its ID,
/// LABEL and options are ignored: the file's are kept). The old secret stops working at the
/// relay's next reload.
pub fn rotate_secret(path: &Path, new: &NewLabel) -> Result<Provisioned, ProvisionError> {
    use taas_crds::manifest::{parse_documents, Object};
    let io_err = |error| ProvisionError::Io {
        path: path.to_path_buf(),
        error,
    };
    let text = fs::read_to_string(path).map_err(io_err)?;
    let objects = parse_documents(&text).map_err(|e| ProvisionError::Invalid(e.to_string()))?;
    let (mut labels, mut secrets) = (Vec::new(), Vec::new());
    for object in objects {
        match object {
            Object::Label(l) => labels.push(l),
            Object::Secret(s) => secrets.push(s),
            Object::Other { .. } => {}
        }
    }
    let (Some(label), None) = (labels.pop(), labels.pop()) else {
        return Err(ProvisionError::Invalid(
            "the file does not hold exactly one TaasLabel: rotate its secret by hand".into(),
        ));
    };
    let name = &label.spec.secret_ref.name;
    let mut matching = secrets
        .into_iter()
        .filter(|s| &s.name == name && s.namespace == label.namespace);
    let (Some(mut secret), None) = (matching.next(), matching.next()) else {
        return Err(ProvisionError::Invalid(format!(
            "the file does not hold the label's Secret {name:?} once: rotate its secret by hand"
        )));
    };
    let secret_b32 = encode_secret(&generate_secret());
    let config =
        validate_label(&label.spec, secret_b32.as_bytes()).map_err(ProvisionError::Invalid)?;
    secret.data.insert(
        label.spec.secret_ref.key.clone(),
        secret_b32.clone().into_bytes(),
    );
    let text = render_label_file(&label, &secret);
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dotfile: the labels directory's reader skips it, so it is never loaded half-written.
    let temp = dir.join(format!(".{file_name}.rotating"));
    let _ = fs::remove_file(&temp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_err(error));
    }
    Ok(for_agent(new, path.to_path_buf(), secret_b32, &config))
}

/// Quotes a word for a POSIX shell when it needs it, so the printed command can be pasted.
fn shell_word(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Inputs of the steward's per-server params file.
#[derive(Clone)]
pub struct StewardParams {
    pub id: String,
    pub label: String,
    pub domain: String,
    pub registrar: String,
    /// The decoded TOTP key.
    pub secret: Vec<u8>,
    /// Where the steward connects: the relay's IP (it sends the registrar name as Host).
    pub hostname: String,
    /// The front-end port.
    pub port: u16,
    /// The relay certificate (PEM), which the steward trusts as its only anchor.
    pub ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for StewardParams {
    // Hand-written so that the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StewardParams")
            .field("id", &self.id)
            .field("label", &self.label)
            .field("domain", &self.domain)
            .field("registrar", &self.registrar)
            .field("secret", &"<redacted>")
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .finish()
    }
}

// Field order is the original's (serde_json writes struct fields in declaration order).
#[derive(Serialize)]
struct StewardJson<'a> {
    algorithm: &'a str,
    length: u32,
    name: String,
    issuer: String,
    step: u32,
    base32: String,
    protocol: &'a str,
    uuid: [&'a str; 1],
    labels: [&'a str; 1],
    server: StewardServer<'a>,
}

#[derive(Serialize)]
struct StewardServer<'a> {
    hostname: &'a str,
    port: u16,
    /// A slice serializes as an array of byte values: what node 0.10's JSON.stringify made of
    /// a Buffer, and what the steward turns back into one.
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'a [u8]>,
}

/// The original's per-server file (`<uuid>.js`, for the steward's `db/` directory):
/// `exports.params = <JSON>;` and a newline. The steward speaks HMAC-SHA1 with a 30 s step
/// only, so this suits labels with the defaults. (`length: 40` is the original's constant.)
pub fn steward_file(params: &StewardParams) -> String {
    let json = StewardJson {
        algorithm: "sha1",
        length: 40,
        name: format!("{}.{}", params.label, params.domain),
        issuer: format!("https://{}", params.registrar),
        step: 30,
        base32: encode_secret(&params.secret)
            .trim_end_matches('=')
            .to_ascii_uppercase(),
        protocol: "totp",
        uuid: [&params.id],
        labels: [&params.label],
        server: StewardServer {
            hostname: &params.hostname,
            port: params.port,
            ca: params.ca_pem.as_deref(),
        },
    };
    let text = serde_json::to_string(&json).expect("plain data always serializes");
    format!("exports.params = {text};\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label_source::{load_dir, read_label_file};
    use std::os::unix::fs::PermissionsExt;

    fn new_label(label: &str) -> NewLabel {
        NewLabel {
            id: "2f402f80-da50-11e1-9b23-0123456789ab".into(),
            label: label.into(),
            namespace: "default".into(),
            registrar: "taas-registrar.localhost".into(),
            domain: "taas.localhost".into(),
            relay_url: "https://taas-registrar.localhost:8443".into(),
            ca_file: None,
            direct: false,
            options: SpecOptions::default(),
        }
    }

    #[test]
    fn otpauth_uri_encoding() {
        assert_eq!(
            otpauth_uri(
                "taas-registrar.localhost",
                "home.office.taas.localhost",
                "GEZDGNBV",
                Algorithm::SHA1,
                6,
                30
            ),
            "otpauth://totp/taas-registrar.localhost:home.office.taas.localhost?secret=GEZDGNBV\
             &issuer=taas-registrar.localhost&algorithm=SHA1&digits=6&period=30"
        );
        assert_eq!(
            otpauth_uri(
                "Acme & Co:/x",
                "a b+c@d?e#f%",
                "S",
                Algorithm::SHA512,
                8,
                60
            ),
            "otpauth://totp/Acme%20%26%20Co%3A%2Fx:a%20b%2Bc%40d%3Fe%23f%25?secret=S\
             &issuer=Acme%20%26%20Co%3A%2Fx&algorithm=SHA512&digits=8&period=60"
        );
        assert!(otpauth_uri("é", "x", "S", Algorithm::SHA256, 6, 30)
            .starts_with("otpauth://totp/%C3%A9:x?"));
    }

    #[test]
    fn generated_secrets_are_160_bits_and_fresh() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
    }

    #[test]
    fn written_file_reads_back_with_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let labels = dir.path().join("new/labels");
        let mut new = new_label("Home.Office");
        new.id = "user@host/x+y:z\"'é".into();
        new.ca_file = Some(dir.path().join("relay cert.pem"));
        let p = write_label(&labels, &new).unwrap();
        assert_eq!(p.path, labels.join("home.office.yaml"));
        let config = read_label_file(&p.path).unwrap();
        assert_eq!(
            config.secret,
            crate::totp::decode_secret(&p.secret_b32).unwrap()
        );
        assert_eq!(config.secret.len(), 20);
        assert_eq!(config.id, new.id);
        assert_eq!(config.label, "home.office");
        // The same file works for `serve --labels DIR`.
        assert_eq!(load_dir(&labels).unwrap().labels["home.office"], config);
        let text = fs::read_to_string(&p.path).unwrap();
        assert!(text.contains("name: home-office-totp"), "{text}");
        assert!(
            text.contains(&format!("secret: {}", p.secret_b32)),
            "{text}"
        );
        assert!(text.contains("type: Opaque"), "{text}");
        assert!(p.uri.starts_with(
            "otpauth://totp/taas-registrar.localhost:home.office.taas.localhost?secret="
        ));
        assert!(p
            .uri
            .ends_with("&issuer=taas-registrar.localhost&algorithm=SHA1&digits=6&period=30"));
        assert_eq!(
            p.agent_command,
            format!(
                "taas-agent --relay https://taas-registrar.localhost:8443 --label-file {} --ca '{}' --forward 127.0.0.1:8080",
                p.path.display(),
                dir.path().join("relay cert.pem").display()
            )
        );
        let debug = format!("{p:?}");
        assert!(!debug.contains(&p.secret_b32), "{debug}");
    }

    #[test]
    fn file_mode_is_0600_and_existing_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_label(dir.path(), &new_label("home")).unwrap();
        let mode = fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let before = fs::read(&first.path).unwrap();
        let e = write_label(dir.path(), &new_label("HOME")).unwrap_err();
        assert!(matches!(e, ProvisionError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        assert_eq!(fs::read(&first.path).unwrap(), before);
    }

    #[test]
    fn rotation_gives_a_new_secret_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut new = new_label("home");
        new.options = SpecOptions {
            algorithm: Algorithm::SHA256,
            period: 60,
            max_parked: 3,
            source_pinning: false,
        };
        let first = write_label(dir.path(), &new).unwrap();
        let before = read_label_file(&first.path).unwrap();
        assert_eq!(
            (before.algorithm, before.period, before.max_parked),
            (Algorithm::SHA256, 60, 3)
        );
        let rotated = rotate_secret(&first.path, &new).unwrap();
        assert_ne!(rotated.secret_b32, first.secret_b32);
        let after = read_label_file(&first.path).unwrap();
        assert_eq!(
            after.secret,
            crate::totp::decode_secret(&rotated.secret_b32).unwrap()
        );
        assert_eq!(
            LabelConfig {
                secret: before.secret.clone(),
                ..after.clone()
            },
            before
        );
        assert!(rotated.uri.contains("algorithm=SHA256") && rotated.uri.contains("period=60"));
        let mode = fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A file with two labels is left to a text editor.
        let two = dir.path().join("two.yaml");
        let text = fs::read_to_string(&first.path).unwrap();
        fs::write(
            &two,
            format!("{text}---\n{}", text.replace("label: home", "label: other")),
        )
        .unwrap();
        assert!(matches!(
            rotate_secret(&two, &new),
            Err(ProvisionError::Invalid(_))
        ));
    }

    #[test]
    fn invalid_input_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad_id = new_label("home");
        bad_id.id = "a b".into();
        let mut bad_ns = new_label("home");
        bad_ns.namespace = "a.b".into();
        for new in [new_label("__proto__"), new_label("a..b"), bad_id, bad_ns] {
            let e = write_label(dir.path(), &new).unwrap_err();
            assert!(matches!(e, ProvisionError::Invalid(_)), "{e}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn qr_text_is_blocks_spaces_and_newlines() {
        let uri = otpauth_uri(
            "taas-registrar.localhost",
            "home.taas.localhost",
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
            Algorithm::SHA1,
            6,
            30,
        );
        let qr = qr_text(&uri).unwrap();
        assert!(!qr.is_empty());
        assert!(qr
            .chars()
            .all(|c| matches!(c, ' ' | '\n' | '\u{2580}' | '\u{2584}' | '\u{2588}')));
        let lines: Vec<_> = qr.lines().collect();
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Quiet zone: light (full blocks) all round; an odd module count leaves a last line of
        // upper halves.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'));
        let (last, body) = lines.split_last().unwrap();
        assert!(body
            .iter()
            .all(|l| l.starts_with('\u{2588}') && l.ends_with('\u{2588}')));
        assert!(last.chars().all(|c| c == '\u{2580}') || last.chars().all(|c| c == '\u{2588}'));
    }

    #[test]
    fn steward_file_exact_and_parses_back() {
        let mut params = StewardParams {
            id: "2f402f80-da50-11e1-9b23-0123456789ab".into(),
            label: "home".into(),
            domain: "taas.example.com".into(),
            registrar: "taas-registrar.example.com".into(),
            secret: b"12345678901234567890".to_vec(),
            hostname: "203.0.113.5".into(),
            port: 443,
            ca_pem: Some(b"-----\n".to_vec()),
        };
        let text = steward_file(&params);
        assert_eq!(
            text,
            "exports.params = {\"algorithm\":\"sha1\",\"length\":40,\"name\":\"home.taas.example.com\",\
             \"issuer\":\"https://taas-registrar.example.com\",\"step\":30,\
             \"base32\":\"GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\",\"protocol\":\"totp\",\
             \"uuid\":[\"2f402f80-da50-11e1-9b23-0123456789ab\"],\"labels\":[\"home\"],\
             \"server\":{\"hostname\":\"203.0.113.5\",\"port\":443,\"ca\":[45,45,45,45,45,10]}};\n"
        );
        let json = text
            .strip_prefix("exports.params = ")
            .and_then(|t| t.strip_suffix(";\n"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["algorithm"], "sha1");
        assert_eq!(v["length"], 40);
        assert_eq!(v["name"], "home.taas.example.com");
        assert_eq!(v["issuer"], "https://taas-registrar.example.com");
        assert_eq!(v["step"], 30);
        assert_eq!(v["base32"], "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(v["protocol"], "totp");
        assert_eq!(v["uuid"][0], params.id.as_str());
        assert_eq!(v["labels"][0], "home");
        assert_eq!(v["server"]["hostname"], "203.0.113.5");
        assert_eq!(v["server"]["port"], 443);
        let ca: Vec<u8> = serde_json::from_value(v["server"]["ca"].clone()).unwrap();
        assert_eq!(ca, b"-----\n");

        params.ca_pem = None;
        let text = steward_file(&params);
        assert!(
            text.ends_with("\"server\":{\"hostname\":\"203.0.113.5\",\"port\":443}};\n"),
            "{text}"
        );
        assert!(!format!("{params:?}").contains("1234567890"));
    }
}

/// What `taas-relay label new` is told: the label, and the relay it is provisioned for.
#[derive(Clone, Debug)]
pub struct LabelNewOptions {
    pub id: String,
    pub label: String,
    pub namespace: String,
    /// Also write the original steward's provisioning file here.
    pub steward: Option<PathBuf>,
    pub listen: std::net::SocketAddr,
    pub registrar: String,
    pub domain: String,
    pub advertise: Option<String>,
    pub labels: PathBuf,
    /// The relay's own certificate, if it has one; otherwise the generated one is used.
    pub tls_cert: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `spec.direct` of the new label.
    pub direct: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelNewError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

/// Provisions a label for a relay run with the same names and state directory: writes the
/// manifest (and the steward file), and returns what to show the user.
pub fn label_new(options: &LabelNewOptions) -> Result<String, LabelNewError> {
    let advertise = options
        .advertise
        .clone()
        .unwrap_or_else(|| options.listen.ip().to_string());
    let cert = match &options.tls_cert {
        Some(cert) => cert.clone(),
        None => {
            let names = crate::tls::CertNames::for_relay(
                &options.registrar,
                &options.domain,
                options.listen.ip(),
                &advertise,
            );
            crate::tls::load_or_generate(&options.state_dir, &names)?.cert
        }
    };
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let port = options.listen.port();
    let relay_url = if port == 443 {
        format!("https://{}", options.registrar)
    } else {
        format!("https://{}:{port}", options.registrar)
    };
    let provisioned = write_label(
        &options.labels,
        &NewLabel {
            id: options.id.clone(),
            label: options.label.clone(),
            namespace: options.namespace.clone(),
            registrar: options.registrar.clone(),
            domain: options.domain.clone(),
            relay_url,
            ca_file: Some(absolute(&cert)),
            direct: options.direct,
            options: SpecOptions::default(),
        },
    )?;
    let mut out = format!(
        "Wrote {}\n  (the relay picks it up by itself; `kubectl apply -f` it on Kubernetes)\n\n\
         TOTP secret as an otpauth URI (keep it private):\n  {}\n\n",
        provisioned.path.display(),
        provisioned.uri
    );
    out.push_str(&qr_text(&provisioned.uri)?);
    out.push_str(&format!(
        "\nRun the hidden server's agent (replace --forward with your service's address):\n  {}\n",
        provisioned.agent_command
    ));
    if let Some(path) = &options.steward {
        let io_err = |error| LabelNewError::Io {
            path: path.clone(),
            error,
        };
        let secret = crate::totp::decode_secret(&provisioned.secret_b32)
            .map_err(|e| ProvisionError::Invalid(e.to_string()))?;
        let ca_pem = fs::read(&cert).map_err(|error| LabelNewError::Io {
            path: cert.clone(),
            error,
        })?;
        let text = steward_file(&StewardParams {
            id: options.id.clone(),
            label: options.label.to_ascii_lowercase(),
            domain: options.domain.clone(),
            registrar: options.registrar.clone(),
            secret,
            hostname: advertise,
            port,
            ca_pem: Some(ca_pem),
        });
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        file.write_all(text.as_bytes()).map_err(io_err)?;
        out.push_str(&format!(
            "\nWrote the steward's provisioning file {} (copy it to the steward's db/ directory)\n",
            path.display()
        ));
    }
    Ok(out)
}
