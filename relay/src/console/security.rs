//! The console's defences, pure: session cookies and CSRF tokens (HMACs under a key made at
//! start, so no per-visitor state exists for a stranger to grow), the checks of `Origin`,
//! `Sec-Fetch-Site` and `Host`, the login token, and the headers every answer carries.

use std::fmt;
use std::net::SocketAddr;

use rand::RngCore;
use ring::hmac;

/// The session cookie's name.
pub const COOKIE: &str = "taas_console";
/// How long a session lasts (seconds).
pub const SESSION_SECS: u64 = 12 * 60 * 60;
/// The hidden form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// Shortest login token accepted (bytes): it is the only thing between a stranger and the
/// labels on a non-loopback console.
pub const MIN_TOKEN_LEN: usize = 16;

/// The Content-Security-Policy of every page: no inline script or style, nothing from
/// elsewhere, forms post only here, no framing. `connect-src 'self'` lets `/console.js` poll
/// `/labels.json` (under `default-src 'none'` a browser refuses even a same-origin fetch).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'";

/// Headers on every answer.
pub const HEADERS: [(&str, &str); 5] = [
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
];

/// A visitor's session, as its cookie says (checked).
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// Random, hex: what the CSRF token is bound to.
    pub id: String,
    /// Unix seconds.
    pub expires: u64,
    /// Logged in with the token (always true where no token is configured).
    pub authenticated: bool,
}

impl fmt::Debug for Session {
    // The id is a bearer credential once authenticated: never in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &"<redacted>")
            .field("expires", &self.expires)
            .field("authenticated", &self.authenticated)
            .finish()
    }
}

/// Signs and checks sessions and CSRF tokens with a key that lives as long as the process.
pub struct Keys {
    key: hmac::Key,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Keys {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self::from_bytes(&key)
    }

    pub fn from_bytes(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    fn sign(&self, what: &str) -> String {
        hex(hmac::sign(&self.key, what.as_bytes()).as_ref())
    }

    /// Constant time (ring's `verify`).
    fn verify(&self, what: &str, mac_hex: &str) -> bool {
        unhex(mac_hex).is_some_and(|mac| hmac::verify(&self.key, what.as_bytes(), &mac).is_ok())
    }

    /// A new session, valid from `now` for [`SESSION_SECS`].
    pub fn new_session(&self, authenticated: bool, now: u64) -> Session {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        Session {
            id: hex(&id),
            expires: now.saturating_add(SESSION_SECS),
            authenticated,
        }
    }

    /// The cookie value: `ID.EXPIRES.AUTH.MAC`.
    pub fn cookie_value(&self, session: &Session) -> String {
        let body = format!(
            "{}.{}.{}",
            session.id,
            session.expires,
            u8::from(session.authenticated)
        );
        let mac = self.sign(&format!("session:{body}"));
        format!("{body}.{mac}")
    }

    /// The session a cookie value names, if its MAC is ours and it has not expired.
    pub fn session(&self, value: &str, now: u64) -> Option<Session> {
        let mut parts = value.split('.');
        let (id, expires, auth, mac) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || id.len() != 32 || unhex(id).is_none() {
            return None;
        }
        if !self.verify(&format!("session:{id}.{expires}.{auth}"), mac) {
            return None;
        }
        let expires: u64 = expires.parse().ok()?;
        let authenticated = match auth {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        (now < expires).then(|| Session {
            id: id.to_string(),
            expires,
            authenticated,
        })
    }

    /// The CSRF token of a session (the hidden field of every form).
    pub fn csrf_token(&self, session: &Session) -> String {
        self.sign(&format!("csrf:{}", session.id))
    }

    /// Whether `presented` is the session's CSRF token, compared in constant time.
    pub fn csrf_ok(&self, session: &Session, presented: &str) -> bool {
        self.verify(&format!("csrf:{}", session.id), presented)
    }
}

/// `Set-Cookie` for a session; `Secure` when the console is served over TLS.
pub fn set_cookie(value: &str, tls: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict{}",
        if tls { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that ends the session.
pub fn clear_cookie(tls: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if tls { "; Secure" } else { "" }
    )
}

/// The value of the cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// The login token: compared in constant time, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginToken(Vec<u8>);

impl fmt::Debug for LoginToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LoginToken(<redacted>)")
    }
}

impl LoginToken {
    /// The token file's content, surrounding whitespace trimmed; refused when shorter than
    /// [`MIN_TOKEN_LEN`].
    pub fn from_file_content(content: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(content)
            .map_err(|_| "the console token file is not text".to_string())?
            .trim();
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the console token is {} bytes; at least {MIN_TOKEN_LEN} are required \
                 (e.g. `head -c 32 /dev/urandom | base64`)",
                text.len()
            ));
        }
        Ok(Self(text.as_bytes().to_vec()))
    }

    /// Whether `presented` (trimmed) is the token. Both sides are first mapped through an
    /// HMAC under a fresh key, so the comparison is of equal lengths and in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
        let ours = hmac::sign(&key, &self.0);
        hmac::verify(&key, presented.trim().as_bytes(), ours.as_ref()).is_ok()
    }
}

/// Why a change request is refused before its token is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossSite {
    /// `Sec-Fetch-Site` says another site (or a sibling) sent it.
    FetchSite,
    /// `Origin` is not this console.
    Origin,
}

/// Checks a state-changing request's `Sec-Fetch-Site` and `Origin` (when the browser sent
/// them; a client without them, like curl, still needs the CSRF token). `own_origin` is
/// `scheme://host[:port]` as the request's `Host` names it. Either header naming another
/// site refuses the request. Under `Referrer-Policy: no-referrer` a browser sends
/// `Origin: null` even for this console's own forms, so `null` says nothing either way (the
/// token still has to match).
pub fn cross_site(
    fetch_site: Option<&str>,
    origin: Option<&str>,
    own_origin: &str,
) -> Option<CrossSite> {
    if let Some(site) = fetch_site {
        if !matches!(site.trim(), "same-origin" | "none") {
            return Some(CrossSite::FetchSite);
        }
    }
    match origin.map(str::trim) {
        Some(origin) if origin != "null" && !origin.eq_ignore_ascii_case(own_origin) => {
            Some(CrossSite::Origin)
        }
        _ => None,
    }
}

/// Whether a request's `Host` may be answered. A console without a login token (loopback
/// only) answers only its own address and `localhost` at its port: a web page whose name was
/// re-pointed at 127.0.0.1 (DNS rebinding) sends its own name and is refused. With a token
/// every name is answered (the token protects).
pub fn host_allowed(host: Option<&str>, console: SocketAddr, token: bool) -> bool {
    if token {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let port = console.port();
    let ip = match console.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    [
        format!("{ip}:{port}"),
        format!("localhost:{port}"),
        // Port 80 may be left out.
        if port == 80 { ip } else { String::new() },
        if port == 80 {
            "localhost".to_string()
        } else {
            String::new()
        },
    ]
    .iter()
    .any(|allowed| !allowed.is_empty() && *allowed == host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_session_cookie_round_trips_and_a_changed_one_is_refused() {
        let keys = Keys::from_bytes(b"k");
        let session = keys.new_session(true, 1000);
        let value = keys.cookie_value(&session);
        assert_eq!(keys.session(&value, 1001), Some(session.clone()));
        // Expired.
        assert_eq!(keys.session(&value, 1000 + SESSION_SECS), None);
        // Upgraded to authenticated, or extended, by hand: the MAC no longer matches.
        let unauth = keys.new_session(false, 1000);
        let forged = keys.cookie_value(&unauth).replacen(".0.", ".1.", 1);
        assert_eq!(keys.session(&forged, 1001), None);
        // Another process's key.
        assert_eq!(Keys::from_bytes(b"other").session(&value, 1001), None);
        assert!(!format!("{session:?}").contains(&session.id));
    }

    #[test]
    fn the_csrf_token_is_bound_to_its_session() {
        let keys = Keys::from_bytes(b"k");
        let (a, b) = (keys.new_session(true, 0), keys.new_session(true, 0));
        let token = keys.csrf_token(&a);
        assert!(keys.csrf_ok(&a, &token));
        assert!(!keys.csrf_ok(&b, &token));
        assert!(!keys.csrf_ok(&a, ""));
        assert!(!keys.csrf_ok(&a, &token[..token.len() - 2]));
        assert!(!keys.csrf_ok(&a, "zz"));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let own = "http://127.0.0.1:8893";
        assert_eq!(cross_site(None, None, own), None);
        assert_eq!(cross_site(Some("same-origin"), Some(own), own), None);
        assert_eq!(cross_site(Some("none"), None, own), None);
        assert_eq!(
            cross_site(Some("cross-site"), Some(own), own),
            Some(CrossSite::FetchSite)
        );
        assert_eq!(
            cross_site(Some("same-site"), None, own),
            Some(CrossSite::FetchSite)
        );
        assert_eq!(
            cross_site(None, Some("https://evil.example"), own),
            Some(CrossSite::Origin)
        );
        // What a browser sends for this console's own form under `no-referrer`.
        assert_eq!(cross_site(Some("same-origin"), Some("null"), own), None);
        assert_eq!(cross_site(None, Some("null"), own), None);
        assert_eq!(
            cross_site(Some("same-origin"), Some("https://evil.example"), own),
            Some(CrossSite::Origin)
        );
    }

    #[test]
    fn without_a_token_only_the_consoles_own_names_are_answered() {
        let addr: SocketAddr = "127.0.0.1:8893".parse().unwrap();
        assert!(host_allowed(Some("127.0.0.1:8893"), addr, false));
        assert!(host_allowed(Some("LOCALHOST:8893"), addr, false));
        assert!(!host_allowed(Some("evil.example:8893"), addr, false));
        assert!(!host_allowed(Some("127.0.0.1:8894"), addr, false));
        assert!(!host_allowed(None, addr, false));
        assert!(host_allowed(Some("evil.example"), addr, true));
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(host_allowed(Some("[::1]"), v6, false));
        assert!(host_allowed(Some("[::1]:80"), v6, false));
    }

    #[test]
    fn the_login_token_is_checked_and_never_shown() {
        assert!(LoginToken::from_file_content(b"short\n").is_err());
        assert!(LoginToken::from_file_content(&[0xff; 20]).is_err());
        let token = LoginToken::from_file_content(b"  correct-horse-battery-staple\n").unwrap();
        assert!(token.matches("correct-horse-battery-staple"));
        assert!(token.matches("correct-horse-battery-staple\n"));
        assert!(!token.matches("correct-horse-battery-stapl"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("horse"));
    }

    #[test]
    fn cookie_headers_are_read_and_written() {
        assert_eq!(cookie("a=1; taas_console=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("a=1", COOKIE), None);
        let set = set_cookie("v", true);
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Secure")
        );
        assert!(!set_cookie("v", false).contains("Secure"));
    }

    proptest! {
        #[test]
        fn no_cookie_or_token_text_makes_the_checks_panic(s in ".{0,300}") {
            let keys = Keys::from_bytes(b"k");
            let session = keys.new_session(true, 0);
            let _ = keys.session(&s, 1);
            let _ = keys.csrf_ok(&session, &s);
            let _ = cookie(&s, COOKIE);
            let _ = cross_site(Some(&s), Some(&s), "http://x");
            let _ = host_allowed(Some(&s), "127.0.0.1:1".parse().unwrap(), false);
        }
    }
}
