//! Why a registration or a rendezvous failed, in words an operator can act on. Pure
//! functions: every piece of advice the agent gives is written here, so that one file shows
//! what an operator may read.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// Clock difference (seconds) beyond which a 401 is blamed on the clock.
pub const MAX_CLOCK_SKEW: i64 = 30;

/// How loud a problem is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Will likely clear up by itself (overload, restarts, network).
    Warn,
    /// Needs a human (wrong secret, wrong URL, untrusted certificate).
    Error,
}

/// One reason why the agent cannot keep its connections parked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Stable, short: the `result` label of the registrations metric, and (with `detail`) the
    /// identity used to log each distinct reason once.
    pub kind: &'static str,
    /// Distinguishes reasons of the same kind (e.g. which I/O error); not shown.
    pub detail: String,
    pub message: String,
    pub severity: Severity,
}

impl Problem {
    pub fn new(kind: &'static str, severity: Severity, message: impl Into<String>) -> Self {
        Self {
            kind,
            detail: String::new(),
            message: message.into(),
            severity,
        }
    }

    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Same reason (a new log line is due only when this changes).
    pub fn same_reason(&self, other: &Problem) -> bool {
        self.kind == other.kind && self.detail == other.detail
    }
}

/// Explains a non-200, non-redirect answer to `PUT /register/LABEL`. `clock_skew` is the
/// response's `Date` minus the local clock, in seconds, when the response had a `Date`.
pub fn explain_status(
    status: u16,
    retry_after: Option<Duration>,
    clock_skew: Option<i64>,
) -> Problem {
    use Severity::{Error, Warn};
    let retry = match retry_after {
        Some(d) => format!(" (Retry-After {} s)", d.as_secs()),
        None => String::new(),
    };
    match status {
        401 => match clock_skew {
            Some(skew) if skew.abs() > MAX_CLOCK_SKEW => Problem::new(
                "unauthorized",
                Error,
                format!(
                    "registration refused (401): clock skew of {skew} s between this machine \
                     and the relay: fix the clock (NTP)"
                ),
            )
            .with_detail("clock_skew"),
            _ => Problem::new(
                "unauthorized",
                Error,
                "registration refused (401): wrong secret, or label not provisioned for this ID",
            ),
        },
        400 => Problem::new(
            "bad_request",
            Error,
            "registration rejected as malformed (400): check --id, --label and the secret's \
             TOTP settings",
        ),
        404 | 421 => Problem::new(
            "misdirected",
            Error,
            format!("the registrar does not recognise this host/path ({status}): check --relay"),
        )
        .with_detail(status.to_string()),
        405 => Problem::new(
            "misdirected",
            Error,
            "the server does not accept PUT on this path (405): check --relay",
        )
        .with_detail("405"),
        429 => Problem::new(
            "rate_limited",
            Warn,
            format!(
                "rate limited by the registrar (429){retry}: too many failed registrations \
                 from this address or ID"
            ),
        ),
        503 => Problem::new(
            "unavailable",
            Warn,
            format!(
                "the relay cannot take another connection (503){retry}: the label is at its \
                 parked-connection limit (lower --parked) or the relay has no free port"
            ),
        ),
        300..=399 => Problem::new(
            "redirect",
            Error,
            format!("unexpected redirect ({status}) from the registrar"),
        )
        .with_detail(status.to_string()),
        500..=599 => Problem::new(
            "server_error",
            Warn,
            format!("the registrar failed ({status}){retry}"),
        )
        .with_detail(status.to_string()),
        _ => Problem::new("refused", Error, format!("registration refused ({status})"))
            .with_detail(status.to_string()),
    }
}

/// Explains a failure to set up the connection to the registrar (TCP connect or TLS).
pub fn explain_connect(address: &str, error: &std::io::Error) -> Problem {
    if let Some(tls) = find_rustls(error) {
        return explain_tls(tls);
    }
    Problem::new(
        "connect",
        Severity::Warn,
        format!("cannot connect to the registrar at {address}: {error}"),
    )
    .with_detail(format!("{:?}", error.kind()))
}

/// Explains a TLS error; certificate problems name the fix.
pub fn explain_tls(error: &rustls::Error) -> Problem {
    use rustls::CertificateError as C;
    use Severity::{Error, Warn};
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::NotValidForName | C::NotValidForNameContext { .. } => Problem::new(
                "tls_certificate",
                Error,
                format!(
                    "the relay's certificate does not cover the host in --relay ({error}): \
                     use the name the certificate was made for, or --connect ADDR to reach \
                     that name at another address"
                ),
            )
            .with_detail("name"),
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Problem::new(
                "tls_certificate",
                Error,
                format!(
                    "the relay's certificate is expired or not yet valid ({error}): renew it, \
                     or fix this machine's clock (NTP)"
                ),
            )
            .with_detail("validity"),
            _ => Problem::new(
                "tls_certificate",
                Error,
                format!(
                    "the relay's certificate is not trusted ({error}): pass --ca FILE with the \
                     relay's certificate"
                ),
            )
            .with_detail("untrusted"),
        },
        _ => Problem::new(
            "tls",
            Warn,
            format!("TLS handshake with the registrar failed: {error}"),
        )
        .with_detail(format!("{error:?}").chars().take(40).collect::<String>()),
    }
}

/// The rustls error somewhere in an error's source chain (tokio-rustls wraps it in
/// `io::Error`, hyper in its own error).
pub fn find_rustls<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    return Some(tls);
                }
            }
        }
        current = e.source();
    }
    None
}

/// `Retry-After` as delta-seconds or an HTTP date (relative to `now`, unix seconds).
pub fn parse_retry_after(value: &str, now: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, the only form servers may send) as unix
/// seconds. `httpdate` also reads the two obsolete forms (RFC 850, asctime): a date is taken
/// only if `httpdate` writes it back exactly as given, i.e. in the one form servers may send.
pub fn parse_http_date(value: &str) -> Option<u64> {
    let date: httpdate::HttpDate = value.parse().ok()?;
    if date.to_string() != value {
        return None;
    }
    std::time::SystemTime::from(date)
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|since| since.as_secs())
}

/// Registered, but the connection to the rendezvous port failed.
pub fn explain_rendezvous(endpoint: &str, error: &std::io::Error) -> Problem {
    Problem::new(
        "rendezvous",
        Severity::Warn,
        format!(
            "registered, but cannot connect to the rendezvous port {endpoint}: {error} (a \
             firewall between here and the relay's rendezvous ports, or the relay advertises an \
             address unreachable from here)"
        ),
    )
    .with_detail(format!("{:?}", error.kind()))
}

/// The relay closed a parked connection soon after it parked (`how`: "closed" or the error).
pub fn explain_parked_lost(lived: Duration, how: &str) -> Problem {
    Problem::new(
        "rendezvous_closed",
        Severity::Warn,
        format!(
            "the relay dropped a parked connection after {} ms ({how}): it may refuse this \
             source address (source pinning: registration and rendezvous must come from the \
             same address) or be restarting",
            lived.as_millis()
        ),
    )
}

/// A redirect from the registrar that cannot be followed.
pub fn explain_redirect(from: impl fmt::Display, error: impl fmt::Display) -> Problem {
    Problem::new(
        "redirect",
        Severity::Error,
        format!("cannot follow the registrar's redirect from {from}: {error}"),
    )
}

/// The HTTP exchange with the registrar (at `authority`) failed after the connection was set
/// up, or its HTTP handshake did.
pub fn explain_request(authority: &str, error: &(dyn StdError + 'static)) -> Problem {
    if let Some(tls) = find_rustls(error) {
        return explain_tls(tls);
    }
    let text = chain(error);
    Problem::new(
        "http",
        Severity::Warn,
        format!("the registration request to {authority} failed: {text}"),
    )
    .with_detail(text.chars().take(60).collect::<String>())
}

/// No TCP connection to the registrar within the connect timeout.
pub fn explain_connect_timeout(address: &str) -> Problem {
    Problem::new(
        "connect",
        Severity::Warn,
        format!("timed out connecting to the registrar at {address}"),
    )
}

/// No TLS handshake with the registrar within the handshake timeout.
pub fn explain_handshake_timeout(address: &str) -> Problem {
    Problem::new(
        "tls",
        Severity::Warn,
        format!("TLS handshake with the registrar at {address} timed out"),
    )
}

/// No answer from the registrar within the request timeout.
pub fn explain_request_timeout(authority: &str, timeout: Duration) -> Problem {
    Problem::new(
        "timeout",
        Severity::Warn,
        format!(
            "the registrar at {authority} did not answer within {} s",
            timeout.as_secs()
        ),
    )
}

/// The URL's host cannot be a TLS server name.
pub fn explain_server_name(host: &str) -> Problem {
    Problem::new(
        "config",
        Severity::Error,
        format!("{host:?} is not a valid TLS server name"),
    )
}

/// The registration request cannot be built (a header value the configuration made).
pub fn explain_request_build(error: impl fmt::Display) -> Problem {
    Problem::new(
        "config",
        Severity::Error,
        format!("cannot build the request: {error}"),
    )
}

/// An error with its sources, `a: b: c`.
pub fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_401() {
        let p = explain_status(401, None, None);
        assert_eq!(p.kind, "unauthorized");
        assert_eq!(p.severity, Severity::Error);
        assert!(p
            .message
            .contains("wrong secret, or label not provisioned for this ID"));
        assert!(explain_status(401, None, Some(30))
            .message
            .contains("wrong secret"));
        assert!(explain_status(401, None, Some(-30))
            .message
            .contains("wrong secret"));
        let skew = explain_status(401, None, Some(-95));
        assert!(
            skew.message.contains("clock skew of -95 s") && skew.message.contains("NTP"),
            "{}",
            skew.message
        );
        assert!(!skew.same_reason(&p));
        assert!(skew.same_reason(&explain_status(401, None, Some(31))));
    }

    #[test]
    fn explains_the_rest() {
        for status in [404, 421] {
            let p = explain_status(status, None, None);
            assert_eq!(p.kind, "misdirected");
            assert!(p.message.contains("does not recognise this host/path"));
            assert!(p.message.contains("check --relay"));
        }
        let p = explain_status(429, Some(Duration::from_secs(7)), None);
        assert_eq!((p.kind, p.severity), ("rate_limited", Severity::Warn));
        assert!(p.message.contains("Retry-After 7 s"), "{}", p.message);
        let p = explain_status(503, None, None);
        assert_eq!(p.kind, "unavailable");
        assert!(p.message.contains("parked-connection limit"));
        assert!(p.message.contains("no free port"));
        assert_eq!(explain_status(500, None, None).kind, "server_error");
        assert_eq!(explain_status(502, None, None).kind, "server_error");
        assert!(!explain_status(500, None, None).same_reason(&explain_status(502, None, None)));
        assert_eq!(explain_status(400, None, None).kind, "bad_request");
        assert_eq!(explain_status(405, None, None).kind, "misdirected");
        assert_eq!(explain_status(304, None, None).kind, "redirect");
        assert_eq!(explain_status(418, None, None).kind, "refused");
        // Same reason although the Retry-After differs: logged once.
        assert!(explain_status(503, Some(Duration::from_secs(1)), None)
            .same_reason(&explain_status(503, Some(Duration::from_secs(9)), None)));
    }

    #[test]
    fn explains_certificates() {
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, untrusted);
        let p = explain_connect("127.0.0.1:8443", &io);
        assert_eq!(p.kind, "tls_certificate");
        assert!(
            p.message.contains("the relay's certificate is not trusted")
                && p.message.contains("--ca FILE"),
            "{}",
            p.message
        );
        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert!(explain_tls(&name).message.contains("does not cover"));
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(explain_tls(&expired).message.contains("expired"));
        let other = rustls::Error::General("x".into());
        assert_eq!(explain_tls(&other).kind, "tls");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let p = explain_connect("127.0.0.1:8443", &refused);
        assert_eq!((p.kind, p.severity), ("connect", Severity::Warn));
        assert!(p.message.contains("127.0.0.1:8443"));
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 24:49:37 GMT"), None);
        assert_eq!(parse_http_date(""), None);
        // The other obsolete form httpdate reads, and a weekday that does not match the date.
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), None);
        assert_eq!(parse_http_date("Mon, 06 Nov 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn explains_rendezvous_failures() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let p = explain_rendezvous("192.0.2.7:40001", &refused);
        assert_eq!((p.kind, p.severity), ("rendezvous", Severity::Warn));
        assert!(p.message.contains("192.0.2.7:40001") && p.message.contains("firewall"));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!p.same_reason(&explain_rendezvous("192.0.2.7:40001", &reset)));
        let lost = explain_parked_lost(Duration::from_millis(12), "closed");
        assert_eq!(lost.kind, "rendezvous_closed");
        assert!(
            lost.message.contains("after 12 ms (closed)")
                && lost.message.contains("source pinning"),
            "{}",
            lost.message
        );
    }

    #[test]
    fn explains_registrar_exchanges() {
        let p = explain_redirect("https://r.example/register/home", "too many redirects");
        assert_eq!((p.kind, p.severity), ("redirect", Severity::Error));
        assert!(p
            .message
            .contains("from https://r.example/register/home: too many"));
        assert_eq!(explain_connect_timeout("192.0.2.1:443").kind, "connect");
        assert_eq!(explain_handshake_timeout("192.0.2.1:443").kind, "tls");
        let t = explain_request_timeout("r.example:443", Duration::from_secs(15));
        assert_eq!(t.kind, "timeout");
        assert!(t.message.contains("within 15 s"), "{}", t.message);
        assert_eq!(explain_server_name("a b").kind, "config");
        assert_eq!(explain_request_build("bad header").kind, "config");
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after(" 12 ", 0), Some(Duration::from_secs(12)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", 784_111_777),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", 784_111_999),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-1", 0), None);
    }
}
