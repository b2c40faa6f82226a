//! Property-based harness for the PROXY protocol headers the relay sends to hidden servers
//! (`taas_relay::proxy_header::{v1, v2}`): an independent parser written from haproxy's
//! `proxy-protocol.txt` reads back exactly the client's and the relay's addresses and ports
//! for every pair of IPv4, IPv6 and IPv4-mapped IPv6 socket addresses.
//!
//! Cases per property: 2,000 (`TAAS_PROP_CASES=N` for a long run). See docs/robustness.md.

use taas_testkit::property;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use taas_relay::proxy_header::{v1, v2};

fn cases() -> u32 {
    property::cases(property::CASES_ENV, 2_000)
}

/// What a header says.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Tcp4(SocketAddr, SocketAddr),
    Tcp6(SocketAddr, SocketAddr),
    Unknown,
}

/// A strict v1 reader: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN\r\n`, at most
/// 107 bytes, single spaces, the address family matching the protocol, ports 0–65535 in
/// decimal without leading zeros.
fn read_v1(bytes: &[u8]) -> Result<Parsed, String> {
    if bytes.len() > 107 {
        return Err(format!("{} bytes > 107", bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let line = text.strip_suffix("\r\n").ok_or("no CRLF at the end")?;
    if line.contains(['\r', '\n']) {
        return Err("CR or LF inside the line".into());
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let port = |p: &str| -> Result<u16, String> {
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(format!("bad port {p:?}"));
        }
        p.parse().map_err(|_| format!("port {p:?} out of range"))
    };
    match fields[..] {
        ["PROXY", "UNKNOWN"] => Ok(Parsed::Unknown),
        ["PROXY", "TCP4", src, dst, sp, dp] => {
            let (s, d): (Ipv4Addr, Ipv4Addr) = (
                src.parse().map_err(|_| format!("bad IPv4 {src:?}"))?,
                dst.parse().map_err(|_| format!("bad IPv4 {dst:?}"))?,
            );
            Ok(Parsed::Tcp4(
                SocketAddr::new(s.into(), port(sp)?),
                SocketAddr::new(d.into(), port(dp)?),
            ))
        }
        ["PROXY", "TCP6", src, dst, sp, dp] => {
            let (s, d): (Ipv6Addr, Ipv6Addr) = (
                src.parse().map_err(|_| format!("bad IPv6 {src:?}"))?,
                dst.parse().map_err(|_| format!("bad IPv6 {dst:?}"))?,
            );
            Ok(Parsed::Tcp6(
                SocketAddr::new(s.into(), port(sp)?),
                SocketAddr::new(d.into(), port(dp)?),
            ))
        }
        _ => Err(format!("bad v1 line {line:?}")),
    }
}

/// A strict v2 reader: signature, version 2 / command PROXY, TCP over IPv4 or IPv6, the length
/// matching the family and the rest of the bytes.
fn read_v2(bytes: &[u8]) -> Result<Parsed, String> {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if bytes.len() < 16 || &bytes[..12] != SIG {
        return Err("no v2 signature".into());
    }
    if bytes[12] != 0x21 {
        return Err(format!("version/command {:#04x}", bytes[12]));
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let body = &bytes[16..];
    if body.len() != len {
        return Err(format!("length {len} but {} bytes follow", body.len()));
    }
    let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    match (bytes[13], len) {
        (0x11, 12) => {
            let ip = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&body[i..i + 4]).unwrap());
            Ok(Parsed::Tcp4(
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        (0x21, 36) => {
            let ip = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&body[i..i + 16]).unwrap());
            Ok(Parsed::Tcp6(
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        (family, len) => Err(format!("family {family:#04x} with length {len}")),
    }
}

/// IPv4, IPv6, and IPv4-mapped IPv6 (what a dual-stack socket reports for IPv4 peers).
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<Ipv4Addr>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
        (any::<Ipv6Addr>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
        (any::<Ipv4Addr>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(ip.to_ipv6_mapped().into(), p)),
        // Special addresses: unspecified, loopback, broadcast, IPv4-compatible.
        (
            proptest::sample::select(vec![
                IpAddr::from(Ipv4Addr::UNSPECIFIED),
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::BROADCAST.into(),
                Ipv6Addr::UNSPECIFIED.into(),
                Ipv6Addr::LOCALHOST.into(),
                Ipv4Addr::new(192, 0, 2, 1).to_ipv6_compatible().into(),
            ]),
            any::<u16>()
        )
            .prop_map(|(ip, p)| SocketAddr::new(ip, p)),
    ]
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    }
}

#[test]
fn both_versions_read_back_exactly_the_addresses() {
    property::check(
        "proxy-header/read-back",
        cases(),
        (socket_addr(), socket_addr()),
        |(client, relay)| {
            let one = read_v1(&v1(client, relay)).map_err(TestCaseError::fail)?;
            let two = read_v2(&v2(client, relay)).map_err(TestCaseError::fail)?;
            let (cc, rc) = (canonical(client), canonical(relay));
            if cc.is_ipv4() && rc.is_ipv4() {
                // Both are IPv4 (possibly written as mapped IPv6): TCP4, exactly.
                prop_assert_eq!(one, Parsed::Tcp4(cc, rc));
                prop_assert_eq!(two, Parsed::Tcp4(cc, rc));
            } else if client.is_ipv6() && relay.is_ipv6() {
                // Two IPv6 socket addresses: TCP6, exactly as given.
                prop_assert_eq!(one, Parsed::Tcp6(client, relay));
                prop_assert_eq!(two, Parsed::Tcp6(client, relay));
            } else {
                // A real IPv4 with a real IPv6: v1 cannot say it; v2 maps the IPv4 one.
                prop_assert_eq!(one, Parsed::Unknown);
                prop_assert_eq!(two, Parsed::Tcp6(mapped(client), mapped(relay)));
            }
            Ok(())
        },
    );
}
