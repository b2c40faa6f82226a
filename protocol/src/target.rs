//! Where a registration goes: the `--relay` URL, the registration path, redirect resolution,
//! and the `--connect` override. Pure functions; no I/O.

use std::fmt;
use std::net::IpAddr;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters of LABEL left as they are in `/register/LABEL` (RFC 3986 unreserved).
const LABEL_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Redirects followed for one registration, at most.
pub const MAX_REDIRECTS: usize = 5;

/// An `https` URL taken apart: where to connect, what to send as `Host` and SNI, which path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host name (lower case) or IP literal, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not an https URL (the registrar is only spoken to over https)")]
    NotHttps(String),
    #[error("{0:?} is not a valid URL")]
    Invalid(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} carries user information; the registrar takes none")]
    UserInfo(String),
    #[error("--relay {0:?} must not have a query")]
    Query(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("redirect without a Location header")]
    NoLocation,
    #[error("redirect to a non-https location is refused: {0}")]
    Url(#[from] UrlError),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
}

impl Target {
    /// Parses an absolute `https://host[:port][/path][?query]` URL (a fragment is ignored).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let url = url.trim();
        let without_fragment = url.split('#').next().unwrap_or_default();
        let uri: http::Uri = without_fragment
            .parse()
            .map_err(|_| UrlError::Invalid(url.to_string()))?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => {}
            Some(_) => return Err(UrlError::NotHttps(url.to_string())),
            None => return Err(UrlError::Invalid(url.to_string())),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| UrlError::NoHost(url.to_string()))?;
        if authority.as_str().contains('@') {
            return Err(UrlError::UserInfo(url.to_string()));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_string()));
        }
        let port = match authority.port() {
            Some(p) => p.as_u16(),
            // "https://host:" has an empty port: the default.
            None => 443,
        };
        if port == 0 {
            return Err(UrlError::Invalid(url.to_string()));
        }
        let path = uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_string();
        Ok(Self { host, port, path })
    }

    /// The `--relay` URL with `/register/LABEL` appended to its path (a path prefix is kept,
    /// for a registrar behind a reverse proxy; the usual URL has none).
    pub fn registration(relay: &str, label: &str) -> Result<Self, UrlError> {
        let mut target = Self::parse(relay)?;
        if target.path.contains('?') {
            return Err(UrlError::Query(relay.to_string()));
        }
        let prefix = target.path.trim_end_matches('/');
        target.path = format!(
            "{prefix}/register/{}",
            utf8_percent_encode(label, LABEL_SET)
        );
        Ok(target)
    }

    /// The `Host` header: host, bracketed if IPv6, with `:port` unless the port is 443.
    pub fn host_header(&self) -> String {
        let host = self.bracketed_host();
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `host:port` as a connectable string (IPv6 bracketed).
    pub fn authority(&self) -> String {
        format!("{}:{}", self.bracketed_host(), self.port)
    }

    fn bracketed_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// Same scheme, host and port: one connection serves both.
    pub fn same_origin(&self, other: &Target) -> bool {
        self.host == other.host && self.port == other.port
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.host_header(), self.path)
    }
}

/// Resolves a `Location` against the URL that answered with a redirect (RFC 3986 §5.2):
/// absolute URLs must be https; `//host/path`, `/path`, `path` and `?query` are relative.
pub fn resolve_redirect(current: &Target, location: &str) -> Result<Target, RedirectError> {
    let location = location.trim();
    if location.is_empty() {
        return Err(RedirectError::NoLocation);
    }
    let location = location.split('#').next().unwrap_or_default();
    if has_scheme(location) {
        return Ok(Target::parse(location)?);
    }
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(Target::parse(&format!("https://{rest}"))?);
    }
    let (base_path, _base_query) = split_query(&current.path);
    let (loc_path, loc_query) = split_query(location);
    let path = if loc_path.is_empty() {
        // "?query" or "": the current path, the new query.
        base_path.to_string()
    } else if loc_path.starts_with('/') {
        remove_dot_segments(loc_path)
    } else {
        let dir = match base_path.rfind('/') {
            Some(i) => &base_path[..=i],
            None => "/",
        };
        remove_dot_segments(&format!("{dir}{loc_path}"))
    };
    let path = match loc_query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    // Validate the characters by the same parser as absolute URLs.
    Ok(Target::parse(&format!(
        "https://{}{}",
        current.authority(),
        path
    ))?)
}

fn has_scheme(s: &str) -> bool {
    match s.find(':') {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && !s[..i].contains('/')
        }
        _ => false,
    }
}

fn split_query(s: &str) -> (&str, Option<&str>) {
    match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    }
}

/// RFC 3986 §5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::from("/");
    result.push_str(&out.join("/"));
    if trailing_slash && !result.ends_with('/') {
        result.push('/');
    }
    result
}

/// Where to open the TCP connection for `target`: `--connect` when it applies (the origin
/// host only; a redirect elsewhere resolves that host), else the URL's host and port.
/// `--connect` is `host:port`, `[v6]:port`, or a bare host or IP (then the URL's port).
pub fn connect_address(connect: Option<&str>, target: &Target) -> String {
    let Some(connect) = connect.map(str::trim).filter(|c| !c.is_empty()) else {
        // RFC 6761: `localhost` and `*.localhost` are loopback, as curl and browsers treat
        // them; the system resolver often does not know the subdomains.
        if target.host == "localhost" || target.host.ends_with(".localhost") {
            return std::net::SocketAddr::from(([127, 0, 0, 1], target.port)).to_string();
        }
        return target.authority();
    };
    if connect.parse::<std::net::SocketAddr>().is_ok() {
        return connect.to_string();
    }
    if let Ok(ip) = connect.parse::<IpAddr>() {
        return std::net::SocketAddr::new(ip, target.port).to_string();
    }
    if let Some(inner) = connect.strip_prefix('[').and_then(|c| c.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return std::net::SocketAddr::new(ip, target.port).to_string();
        }
    }
    match connect.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => {
            connect.to_string()
        }
        _ => format!("{connect}:{}", target.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    #[test]
    fn parses_https_urls() {
        let a = t("https://Taas-Registrar.localhost:8443");
        assert_eq!(a.host, "taas-registrar.localhost");
        assert_eq!(a.port, 8443);
        assert_eq!(a.path, "/");
        assert_eq!(a.host_header(), "taas-registrar.localhost:8443");
        let b = t("https://registrar.example.com/");
        assert_eq!(b.port, 443);
        assert_eq!(b.host_header(), "registrar.example.com");
        let c = t("https://[::1]:8443/x#frag");
        assert_eq!(c.host, "::1");
        assert_eq!(c.host_header(), "[::1]:8443");
        assert_eq!(c.authority(), "[::1]:8443");
        assert_eq!(c.path, "/x");
        let d = t("HTTPS://127.0.0.1:443");
        assert_eq!(d.host_header(), "127.0.0.1");
        assert_eq!(d.authority(), "127.0.0.1:443");
    }

    #[test]
    fn rejects_other_urls() {
        assert!(matches!(
            Target::parse("http://x.example"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(matches!(
            Target::parse("ftp://x.example"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(Target::parse("x.example:443").is_err());
        assert!(Target::parse("/register/x").is_err());
        assert!(Target::parse("").is_err());
        assert!(Target::parse("https://").is_err());
        assert!(Target::parse("https://x.example:0").is_err());
        assert!(matches!(
            Target::parse("https://user:pw@x.example"),
            Err(UrlError::UserInfo(_))
        ));
    }

    #[test]
    fn registration_path() {
        let r = Target::registration("https://reg.example:8443", "home").unwrap();
        assert_eq!(r.path, "/register/home");
        let r = Target::registration("https://reg.example/", "a.b-c").unwrap();
        assert_eq!(r.path, "/register/a.b-c");
        let r = Target::registration("https://reg.example/taas/", "home").unwrap();
        assert_eq!(r.path, "/taas/register/home");
        let r = Target::registration("https://reg.example", "we ird/x").unwrap();
        assert_eq!(r.path, "/register/we%20ird%2Fx");
        assert!(matches!(
            Target::registration("https://reg.example/?a=b", "home"),
            Err(UrlError::Query(_))
        ));
        assert_eq!(
            r.to_string(),
            "https://reg.example/register/we%20ird%2Fx".to_string()
        );
    }

    #[test]
    fn resolves_redirects() {
        let cur = t("https://reg.example:8443/register/home");
        let abs = resolve_redirect(&cur, "https://other.example/register/home").unwrap();
        assert_eq!(abs, t("https://other.example:443/register/home"));
        assert!(!abs.same_origin(&cur));
        let net = resolve_redirect(&cur, "//third.example:9443/r/home").unwrap();
        assert_eq!(net, t("https://third.example:9443/r/home"));
        let root = resolve_redirect(&cur, "/v2/register/home").unwrap();
        assert_eq!(root, t("https://reg.example:8443/v2/register/home"));
        assert!(root.same_origin(&cur));
        let rel = resolve_redirect(&cur, "home2").unwrap();
        assert_eq!(rel.path, "/register/home2");
        let up = resolve_redirect(&cur, "../x/./y").unwrap();
        assert_eq!(up.path, "/x/y");
        let above_root = resolve_redirect(&cur, "../../../z").unwrap();
        assert_eq!(above_root.path, "/z");
        let query = resolve_redirect(&cur, "?shard=2").unwrap();
        assert_eq!(query.path, "/register/home?shard=2");
        let dir = resolve_redirect(&cur, "sub/").unwrap();
        assert_eq!(dir.path, "/register/sub/");
        let v6 = t("https://[::1]:8443/register/home");
        let v6r = resolve_redirect(&v6, "/elsewhere").unwrap();
        assert_eq!(v6r.host, "::1");
        assert_eq!(v6r.authority(), "[::1]:8443");
    }

    #[test]
    fn refuses_bad_redirects() {
        let cur = t("https://reg.example/register/home");
        assert_eq!(resolve_redirect(&cur, "  "), Err(RedirectError::NoLocation));
        assert!(matches!(
            resolve_redirect(&cur, "http://reg.example/register/home"),
            Err(RedirectError::Url(UrlError::NotHttps(_)))
        ));
        assert!(matches!(
            resolve_redirect(&cur, "javascript:alert(1)"),
            Err(RedirectError::Url(_))
        ));
        assert!(resolve_redirect(&cur, "/bad path").is_err());
    }

    #[test]
    fn connect_override() {
        let url = t("https://reg.example:8443/");
        assert_eq!(connect_address(None, &url), "reg.example:8443");
        assert_eq!(connect_address(Some(""), &url), "reg.example:8443");
        assert_eq!(
            connect_address(Some("10.0.0.1:9443"), &url),
            "10.0.0.1:9443"
        );
        assert_eq!(connect_address(Some("10.0.0.1"), &url), "10.0.0.1:8443");
        assert_eq!(connect_address(Some("::1"), &url), "[::1]:8443");
        assert_eq!(connect_address(Some("[::1]"), &url), "[::1]:8443");
        assert_eq!(connect_address(Some("[::1]:1"), &url), "[::1]:1");
        assert_eq!(connect_address(Some("relay.lan"), &url), "relay.lan:8443");
        assert_eq!(connect_address(Some("relay.lan:1"), &url), "relay.lan:1");
        let local = t("https://taas-registrar.localhost:8443");
        assert_eq!(connect_address(None, &local), "127.0.0.1:8443");
        assert_eq!(connect_address(Some("[::1]"), &local), "[::1]:8443");
    }
}
