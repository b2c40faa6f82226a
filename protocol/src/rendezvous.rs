//! The body of a `200` to a registration (PROTOCOL.md §2): `HOST:PORT`, the one-shot
//! rendezvous port p, or one such line per port with the several-ports extension. The relay
//! writes it with [`format()`] and the agent reads it with [`parse()`]: one module, so that the
//! two sides cannot drift apart (a round-trip property test holds them together).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The largest body accepted from the registrar (a few `HOST:PORT` lines at most).
pub const MAX_BODY: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, lower case.
    Name(String),
}

/// Where to connect to park a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

impl Endpoint {
    /// The address to connect to. An unspecified IP (`0.0.0.0`, `::`: a relay that
    /// advertises its wildcard listen address) means "the address I registered with",
    /// so `registrar_ip` is used instead.
    pub fn connect_string(&self, registrar_ip: Option<IpAddr>) -> String {
        match &self.host {
            Host::Ip(ip) if ip.is_unspecified() => match registrar_ip {
                Some(r) => SocketAddr::new(r, self.port).to_string(),
                None => SocketAddr::new(*ip, self.port).to_string(),
            },
            Host::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            Host::Name(name) => format!("{name}:{}", self.port),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the registrar's 200 body is not HOST:PORT ({reason}): {shown:?}")]
pub struct BodyError {
    reason: &'static str,
    /// The start of the offending body, for the log.
    shown: String,
}

fn bad(reason: &'static str, body: &str) -> BodyError {
    BodyError {
        reason,
        shown: body.chars().take(80).collect(),
    }
}

/// Parses one `HOST:PORT`: `name:p`, `1.2.3.4:p` or `[v6]:p`, p in 1..=65535. Surrounding
/// whitespace is tolerated; anything else (bare IPv6, spaces, a scheme, a path) is refused.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, BodyError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("empty", text));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("unclosed [", text))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("no port", text))?;
        let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| bad("bad IPv6 address", text))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port", text))?;
        if host.contains(':') {
            return Err(bad("IPv6 address without brackets", text));
        }
        let host = if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else if is_dns_name(host) {
            Host::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad("bad host", text));
        };
        (host, port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
        return Err(bad("bad port", text));
    }
    let port: u16 = port.parse().map_err(|_| bad("bad port", text))?;
    if port == 0 {
        return Err(bad("port 0", text));
    }
    Ok(Endpoint { host, port })
}

/// The body for rendezvous ports `ports` on `host`: one `HOST:PORT` per port, `\n`-separated,
/// no final newline; for one port exactly the original's `HOST:PORT`. An IPv6 host is
/// bracketed.
pub fn format(host: &str, ports: &[u16]) -> String {
    let host = bracket_v6(host);
    let mut body = String::with_capacity(ports.len() * (host.len() + 7));
    for (i, port) in ports.iter().enumerate() {
        if i > 0 {
            body.push('\n');
        }
        body.push_str(&host);
        body.push(':');
        body.push_str(&port.to_string());
    }
    body
}

/// `::1` → `[::1]`, so that `HOST:PORT` and URLs stay parseable.
pub fn bracket_v6(host: &str) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Parses the whole body: one `HOST:PORT`, or (the several-ports extension) one per line.
pub fn parse(body: &[u8]) -> Result<Vec<Endpoint>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8", ""))?;
    let endpoints = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_endpoint)
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(bad("empty", text));
    }
    Ok(endpoints)
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        // All-numeric dotted strings that failed to parse as IPv4 (e.g. 1.2.3.999) are garbage.
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Endpoint {
        parse_endpoint(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn parses_hosts_and_ports() {
        assert_eq!(
            ok("203.0.113.7:20001"),
            Endpoint {
                host: Host::Ip("203.0.113.7".parse().unwrap()),
                port: 20001
            }
        );
        assert_eq!(
            ok("Relay.Example.com:20000"),
            Endpoint {
                host: Host::Name("relay.example.com".into()),
                port: 20000
            }
        );
        assert_eq!(
            ok("[::1]:20002"),
            Endpoint {
                host: Host::Ip("::1".parse().unwrap()),
                port: 20002
            }
        );
        assert_eq!(ok("localhost:1\n").to_string(), "localhost:1");
        assert_eq!(ok("[2001:db8::7]:65535").to_string(), "[2001:db8::7]:65535");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            " ",
            "20000",
            "host",
            "host:",
            ":20000",
            "host:0",
            "host:65536",
            "host:+1",
            "host:1x",
            "::1:20000",
            "[::1]20000",
            "[::1",
            "[nope]:1",
            "http://host:1",
            "host:1/path",
            "ho st:1",
            "1.2.3.999:1",
            "-host:1",
            "<html>:1",
            "host:000001",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_bodies() {
        assert_eq!(parse(b"127.0.0.1:20000").unwrap().len(), 1);
        let many = parse(b"127.0.0.1:20000\r\n[::1]:20001\n").unwrap();
        assert_eq!(many.len(), 2);
        assert!(parse(b"").is_err());
        assert!(parse(b"\n\n").is_err());
        assert!(parse(b"127.0.0.1:20000\ngarbage").is_err());
        assert!(parse(&[0xff, 0xfe]).is_err());
        let long = "x".repeat(500);
        let err = parse(long.as_bytes()).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn unspecified_means_the_registrar() {
        let e = ok("0.0.0.0:20000");
        let registrar = Some("192.0.2.1".parse().unwrap());
        assert_eq!(e.connect_string(registrar), "192.0.2.1:20000");
        assert_eq!(e.connect_string(None), "0.0.0.0:20000");
        assert_eq!(ok("[::1]:5").connect_string(registrar), "[::1]:5");
        assert_eq!(ok("relay.lan:5").connect_string(registrar), "relay.lan:5");
    }

    #[test]
    fn formats_one_or_several_lines() {
        assert_eq!(format("127.0.0.1", &[20001]), "127.0.0.1:20001");
        assert_eq!(format("::1", &[1, 2]), "[::1]:1\n[::1]:2");
        assert_eq!(format("relay.example.com", &[5]), "relay.example.com:5");
        assert_eq!(bracket_v6("2001:db8::7"), "[2001:db8::7]");
        assert_eq!(bracket_v6("192.0.2.1"), "192.0.2.1");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The hosts a relay advertises: IPv4, IPv6 (written bare, bracketed by `format`) and
        /// DNS names in any case.
        fn host() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
                "[a-zA-Z]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?(\\.[a-zA-Z][a-zA-Z0-9-]{0,10}[a-zA-Z0-9]){0,3}",
            ]
        }

        proptest! {
            #[test]
            fn what_the_relay_formats_the_agent_parses_back(
                host in host(),
                ports in proptest::collection::vec(1..=u16::MAX, 1..=16),
            ) {
                let body = format(&host, &ports);
                let endpoints = parse(body.as_bytes()).unwrap();
                prop_assert_eq!(endpoints.len(), ports.len());
                let expected = match host.parse::<IpAddr>() {
                    Ok(ip) => Host::Ip(ip),
                    Err(_) => Host::Name(host.to_ascii_lowercase()),
                };
                for (endpoint, port) in endpoints.iter().zip(&ports) {
                    prop_assert_eq!(&endpoint.host, &expected);
                    prop_assert_eq!(endpoint.port, *port);
                }
                if let [port] = ports[..] {
                    prop_assert_eq!(body, std::format!("{}:{port}", bracket_v6(&host)));
                }
            }
        }
    }
}
