//! Host-header dispatch (PROTOCOL.md §1): one HTTPS listener serves the registrar and the
//! mobile clients, and the `Host` header alone says which role a request is for.

use std::net::IpAddr;

/// What a request is for, decided from its `Host` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The registrar name, or an IP literal of the relay: registration.
    Registrar,
    /// `LABEL.<domain>`: a mobile client asking for LABEL (lower case, may contain dots).
    Client { label: String, host: String },
    /// Any other host: `421 Misdirected Request`.
    Misdirected,
    /// No (usable) Host header: `400`.
    Missing,
}

/// The names the front end answers to.
#[derive(Clone, Debug)]
pub struct Names {
    /// Registrar host name, lower case.
    pub registrar: String,
    /// Servers domain, lower case, without leading dot.
    pub domain: String,
}

/// Splits `host[:port]` (with `[v6]:port` for IPv6 literals) and returns the host, lower case,
/// without a trailing dot. `None` when the value is not a plausible host.
pub fn host_only(value: &str) -> Option<String> {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(inside.to_ascii_lowercase());
    } else {
        match value.rsplit_once(':') {
            // A bare IPv6 literal without brackets has several colons: no port to strip.
            Some((host, port)) if !host.contains(':') => {
                if !valid_port(port) {
                    return None;
                }
                host
            }
            _ => value,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let plausible = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    plausible.then(|| host.to_ascii_lowercase())
}

fn valid_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// Decides the role of a request. `is_own_ip` says whether an IP literal is one of the relay's
/// addresses (an IP literal that is not ours is misdirected).
pub fn classify(host: Option<&[u8]>, names: &Names, is_own_ip: impl Fn(IpAddr) -> bool) -> Role {
    let Some(host) = host
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .and_then(host_only)
    else {
        return Role::Missing;
    };
    if host == names.registrar {
        return Role::Registrar;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if is_own_ip(ip.to_canonical()) {
            Role::Registrar
        } else {
            Role::Misdirected
        };
    }
    match host.strip_suffix(names.domain.as_str()) {
        Some(prefix) if prefix.len() > 1 && prefix.ends_with('.') => Role::Client {
            label: prefix[..prefix.len() - 1].to_string(),
            host,
        },
        _ => Role::Misdirected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            registrar: "taas-registrar.example.com".into(),
            domain: "taas.example.com".into(),
        }
    }

    fn role(host: &str) -> Role {
        let own: IpAddr = "203.0.113.5".parse().unwrap();
        let own6: IpAddr = "2001:db8::5".parse().unwrap();
        classify(Some(host.as_bytes()), &names(), |ip| {
            ip == own || ip == own6
        })
    }

    fn client(label: &str, host: &str) -> Role {
        Role::Client {
            label: label.into(),
            host: host.into(),
        }
    }

    #[test]
    fn registrar_by_name_with_or_without_port_any_case() {
        assert_eq!(role("taas-registrar.example.com:443"), Role::Registrar);
        assert_eq!(role("taas-registrar.example.com"), Role::Registrar);
        assert_eq!(role("TAAS-Registrar.Example.COM:8443"), Role::Registrar);
        assert_eq!(role("taas-registrar.example.com."), Role::Registrar);
    }

    #[test]
    fn registrar_by_own_ip_literal_only() {
        assert_eq!(role("203.0.113.5"), Role::Registrar);
        assert_eq!(role("203.0.113.5:443"), Role::Registrar);
        assert_eq!(role("[2001:db8::5]:443"), Role::Registrar);
        assert_eq!(role("[2001:db8::5]"), Role::Registrar);
        assert_eq!(role("[::ffff:203.0.113.5]:443"), Role::Registrar);
        assert_eq!(role("198.51.100.1"), Role::Misdirected);
        assert_eq!(role("[2001:db8::6]:443"), Role::Misdirected);
    }

    #[test]
    fn labels_may_contain_dots_and_are_lower_cased() {
        assert_eq!(
            role("home.taas.example.com"),
            client("home", "home.taas.example.com")
        );
        assert_eq!(
            role("Automatic.Home.taas.example.com:443"),
            client("automatic.home", "automatic.home.taas.example.com")
        );
        assert_eq!(
            role("constructor.taas.example.com"),
            client("constructor", "constructor.taas.example.com")
        );
    }

    #[test]
    fn anything_else_is_misdirected_or_missing() {
        assert_eq!(role("taas.example.com"), Role::Misdirected);
        assert_eq!(role(".taas.example.com"), Role::Misdirected);
        assert_eq!(role("hometaas.example.com"), Role::Misdirected);
        assert_eq!(role("example.org"), Role::Misdirected);
        assert_eq!(role(""), Role::Missing);
        assert_eq!(role("host:port"), Role::Missing);
        assert_eq!(role("[::1"), Role::Missing);
        assert_eq!(role("a b"), Role::Missing);
        assert_eq!(classify(None, &names(), |_| true), Role::Missing);
        assert_eq!(
            classify(Some(&[0xff, 0xfe]), &names(), |_| true),
            Role::Missing
        );
    }
}
