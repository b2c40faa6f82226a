//! How a label's relay knows a request on its control port comes from a gateway of the same
//! install, and not from any other pod that can reach it (issue 13, item 4).
//!
//! The chart creates one random **install secret** per release. Gateways and the operator
//! read it from a mounted Secret; relays never see it. Each relay gets a **gateway token** of
//! its own, derived from the install secret and its LABEL (HMAC-SHA256), which the operator
//! puts in the relay's pod. A gateway derives the same token for the label it forwards to
//! and sends it in [`GATEWAY_AUTH_HEADER`]. So:
//! - a request without the right token is refused by the relay, and only an authenticated
//!   request may name the original client (`taas-client-addr`): no pod can forge client
//!   addresses or use the control port directly;
//! - whoever can read one label's relay pod (its owners) learns that label's token only: it
//!   does not open any other label's relay.
//!
//! Pure: derivation and constant-time comparison, no I/O beyond reading the secret's file.

use std::fmt;
use std::path::Path;

/// Header carrying the gateway token on every request a gateway forwards to a relay.
pub const GATEWAY_AUTH_HEADER: &str = "taas-gateway-auth";

/// Fewest bytes an install secret may have (the chart generates 32 random characters).
pub const MIN_INSTALL_SECRET_BYTES: usize = 16;

/// The per-release secret gateways and the operator share. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct InstallSecret(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum GatewayAuthError {
    #[error("cannot read the install secret {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the install secret is too short: at least {MIN_INSTALL_SECRET_BYTES} bytes (after trimming white space)")]
    TooShort,
    #[error("the gateway token is empty")]
    EmptyToken,
}

impl InstallSecret {
    /// The secret as given (leading and trailing white space, such as a final newline in a
    /// mounted file, is not part of it).
    pub fn new(bytes: &[u8]) -> Result<Self, GatewayAuthError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_INSTALL_SECRET_BYTES {
            return Err(GatewayAuthError::TooShort);
        }
        Ok(Self(trimmed.to_vec()))
    }

    pub fn from_file(path: &Path) -> Result<Self, GatewayAuthError> {
        let bytes = std::fs::read(path).map_err(|source| GatewayAuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&bytes)
    }

    /// The token of LABEL's relay: lower-case hex of HMAC-SHA256(secret, "taas-gateway\0" +
    /// LABEL in lower case).
    pub fn token_for(&self, label: &str) -> GatewayToken {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut message = b"taas-gateway\0".to_vec();
        message.extend_from_slice(label.to_ascii_lowercase().as_bytes());
        let tag = ring::hmac::sign(&key, &message);
        GatewayToken(
            tag.as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
    }
}

impl fmt::Debug for InstallSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InstallSecret(<redacted>)")
    }
}

/// One relay's gateway token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayToken(String);

impl GatewayToken {
    /// A token as the operator handed it to the relay (white space trimmed).
    pub fn new(token: &str) -> Result<Self, GatewayAuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(GatewayAuthError::EmptyToken);
        }
        Ok(Self(token.to_string()))
    }

    /// The value to send in [`GATEWAY_AUTH_HEADER`].
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` (a header's value) is this token, in constant time.
    pub fn verify(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let presented = presented.trim_ascii();
        presented.len() == self.0.len() && bool::from(presented.ct_eq(self.0.as_bytes()))
    }
}

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> InstallSecret {
        InstallSecret::new(b"0123456789abcdef0123456789abcdef\n").unwrap()
    }

    #[test]
    fn each_label_gets_its_own_token_and_the_same_one_every_time() {
        let s = secret();
        let home = s.token_for("home");
        assert_eq!(home, s.token_for("HOME"));
        assert_ne!(home, s.token_for("office"));
        assert_eq!(home.expose().len(), 64);
        assert!(home.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let other = InstallSecret::new(b"another install secret, 32 bytes").unwrap();
        assert_ne!(home, other.token_for("home"));
    }

    #[test]
    fn a_token_verifies_only_itself() {
        let token = secret().token_for("home");
        assert!(token.verify(token.expose().as_bytes()));
        assert!(token.verify(format!(" {}\n", token.expose()).as_bytes()));
        assert!(!token.verify(b""));
        assert!(!token.verify(&token.expose().as_bytes()[..63]));
        assert!(!token.verify(secret().token_for("office").expose().as_bytes()));
    }

    #[test]
    fn short_secrets_and_empty_tokens_are_refused() {
        assert!(matches!(
            InstallSecret::new(b"  short \n"),
            Err(GatewayAuthError::TooShort)
        ));
        assert!(matches!(
            GatewayToken::new(" \n"),
            Err(GatewayAuthError::EmptyToken)
        ));
    }

    #[test]
    fn debug_never_shows_the_secret_or_the_token() {
        let s = secret();
        let token = s.token_for("home");
        assert!(!format!("{s:?}").contains("0123456789"));
        assert!(!format!("{token:?}").contains(token.expose()));
    }
}
