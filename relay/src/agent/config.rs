//! What the agent is told: its configuration, the files it may be given (secret, label), and
//! why it cannot start. Checked once, before anything runs, so that a running agent never
//! fails on a mistake an operator could have fixed at start-up.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Algorithm, LabelConfig};
use crate::splice::SpliceMode;
use crate::tls::Trust;

use super::target;

/// Default number of connections kept parked.
pub const DEFAULT_PARKED: usize = 8;
/// Default cap on the delay between failed attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default time active pairs get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the agent needs. Build with [`AgentConfig::new`] or
/// [`AgentConfig::from_label`] and adjust the public fields.
#[derive(Clone)]
pub struct AgentConfig {
    /// The registrar, `https://host[:port][/prefix]`; `Host` header and SNI come from it.
    pub relay: String,
    /// Connect here instead of resolving the URL's host: `host:port`, `ip:port`, `[v6]:port`,
    /// or a bare host/IP (the URL's port).
    pub connect: Option<String>,
    /// The TOTP username.
    pub id: String,
    pub label: String,
    /// The decoded TOTP key.
    pub secret: Vec<u8>,
    pub algorithm: Algorithm,
    /// TOTP step, seconds.
    pub period: u64,
    /// TOTP digits (6 to 8; the original clients use 6).
    pub digits: u32,
    /// The local service, `host:port`, resolved for each paired connection.
    pub forward: String,
    /// Connections kept parked.
    pub parked: usize,
    pub trust: Trust,
    /// Cap on the delay between failed attempts.
    pub max_backoff: Duration,
    /// Serve `/metrics`, `/healthz`, `/readyz` here.
    pub metrics: Option<SocketAddr>,
    /// On shutdown, active pairs get this long to finish.
    pub shutdown_grace: Duration,
    /// How pairs move their bytes (user-space copy, splice(2), or the switch between them).
    pub splice: SpliceMode,
}

impl AgentConfig {
    /// A configuration with the defaults: SHA1, 30 s, 6 digits, 8 parked, system roots.
    pub fn new(
        relay: impl Into<String>,
        id: impl Into<String>,
        label: impl Into<String>,
        secret: Vec<u8>,
        forward: impl Into<String>,
    ) -> Self {
        Self {
            relay: relay.into(),
            connect: None,
            id: id.into(),
            label: label.into(),
            secret,
            algorithm: Algorithm::SHA1,
            period: 30,
            digits: 6,
            forward: forward.into(),
            parked: DEFAULT_PARKED,
            trust: Trust::System,
            max_backoff: DEFAULT_MAX_BACKOFF,
            metrics: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            splice: SpliceMode::default(),
        }
    }

    /// ID, label, secret, algorithm and period from a label's configuration (e.g. the file
    /// that `taas-relay label new` wrote).
    pub fn from_label(
        relay: impl Into<String>,
        label: &LabelConfig,
        forward: impl Into<String>,
    ) -> Self {
        let mut config = Self::new(
            relay,
            label.id.clone(),
            label.label.clone(),
            label.secret.clone(),
            forward,
        );
        config.algorithm = label.algorithm;
        config.period = label.period;
        config
    }

    /// The checks that need no network: ID, label, secret, TOTP settings, pool size and
    /// forward address. (The URL is checked where it is parsed, by `target`.)
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |what: String| Err(AgentError::Config(what));
        if self.id.is_empty()
            || self
                .id
                .chars()
                .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return bad(format!(
                "--id {:?}: empty, or contains quotes, backslashes or control characters",
                self.id
            ));
        }
        if self.label.is_empty()
            || self
                .label
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return bad(format!(
                "--label {:?}: empty, or contains spaces or control characters",
                self.label
            ));
        }
        if self.secret.is_empty() {
            return bad("the TOTP secret is empty".into());
        }
        if !(6..=8).contains(&self.digits) {
            return bad(format!("TOTP digits {}: must be 6 to 8", self.digits));
        }
        if self.period == 0 {
            return bad("TOTP period 0: must be at least 1 s".into());
        }
        if self.parked == 0 {
            return bad("--parked 0: at least one connection must be parked".into());
        }
        match self.forward.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return bad(format!("--forward {:?}: expected HOST:PORT", self.forward)),
        }
        Ok(())
    }
}

impl fmt::Debug for AgentConfig {
    // Hand-written so that the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("relay", &self.relay)
            .field("connect", &self.connect)
            .field("id", &self.id)
            .field("label", &self.label)
            .field("secret", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("period", &self.period)
            .field("digits", &self.digits)
            .field("forward", &self.forward)
            .field("parked", &self.parked)
            .field("trust", &self.trust)
            .field("max_backoff", &self.max_backoff)
            .field("metrics", &self.metrics)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("splice", &self.splice)
            .finish()
    }
}

/// Why the agent cannot start. (Once running, it never fails: it retries and says why.)
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--relay")]
    Url(#[from] target::UrlError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::ClientTlsError),
    #[error("cannot read the secret file {}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret is not valid base32")]
    Secret(#[source] crate::totp::SecretError),
    #[error("cannot read the label file {}", path.display())]
    LabelFile {
        path: PathBuf,
        #[source]
        source: crate::label_source::LoadError,
    },
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Decodes a base32 TOTP secret (as `--secret` or `TAAS_SECRET` gives it).
pub fn decode_secret(b32: &str) -> Result<Vec<u8>, AgentError> {
    crate::totp::decode_secret(b32.trim()).map_err(AgentError::Secret)
}

/// Reads a base32 TOTP secret from a file (surrounding whitespace ignored).
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::SecretFile {
        path: path.to_path_buf(),
        source,
    })?;
    decode_secret(&text)
}

/// Reads ID, label, secret, algorithm and period from a `TaasLabel` + `Secret` YAML file.
pub fn read_label_file(path: &Path) -> Result<LabelConfig, AgentError> {
    crate::label_source::read_label_file(path).map_err(|source| AgentError::LabelFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = AgentConfig::new("https://r", "id", "l", vec![1], "127.0.0.1:1");
        assert_eq!(c.parked, 8);
        assert_eq!(c.digits, 6);
        assert_eq!(c.period, 30);
        assert_eq!(c.algorithm, Algorithm::SHA1);
        assert_eq!(c.max_backoff, Duration::from_secs(30));
        assert!(matches!(c.trust, Trust::System));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let mut c = AgentConfig::new("https://r", "id", "l", vec![1], "127.0.0.1:1");
        c.secret = b"super-secret-bytes".to_vec();
        let shown = format!("{c:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("super-secret"));
        assert!(!shown.contains("115, 117")); // nor as a byte list
    }

    #[test]
    fn secrets() {
        assert_eq!(decode_secret(" GEZDGNBV \n").unwrap(), b"12345");
        assert!(matches!(
            decode_secret("not base32!"),
            Err(AgentError::Secret(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "gezdgnbv\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"12345");
        assert!(matches!(
            read_secret_file(&dir.path().join("nope")),
            Err(AgentError::SecretFile { .. })
        ));
    }

    #[test]
    fn from_label() {
        let label = LabelConfig {
            label: "home".into(),
            id: "id-7".into(),
            secret: vec![1, 2, 3],
            algorithm: Algorithm::SHA256,
            period: 60,
            max_parked: 32,
            source_pinning: true,
            proxy_protocol: crate::config::ProxyProtocol::None,
            client_port: None,
            client_admission: crate::config::ClientAdmission::Open,
            server_speaks_first: false,
            direct: false,
        };
        let c = AgentConfig::from_label("https://r.example", &label, "127.0.0.1:22");
        assert_eq!((c.id.as_str(), c.label.as_str()), ("id-7", "home"));
        assert_eq!(
            (c.algorithm, c.period, c.digits),
            (Algorithm::SHA256, 60, 6)
        );
        assert_eq!(c.secret, vec![1, 2, 3]);
    }
}
