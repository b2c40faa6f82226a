//! Why a registration failed, in words an operator can act on. Pure functions.

use std::error::Error as StdError;
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
/// seconds.
pub fn parse_http_date(value: &str) -> Option<u64> {
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    if !weekday.ends_with(',') || weekday.len() != 4 {
        return None;
    }
    let day: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as u32 + 1;
    let year: i64 = year.parse().ok().filter(|y| (1970..=9999).contains(y))?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    if *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    u64::try_from(days * 86_400)
        .ok()
        .map(|d| d + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
