//! PROXY protocol headers (haproxy `proxy-protocol.txt`, v1 text and v2 binary).
//!
//! The relay only copies octets, so without help a hidden server sees every client as the
//! relay. When a label asks for it, the relay sends one of these headers to the hidden server
//! before the client's first byte, carrying the client's address (source) and the relay's
//! address the client connected to (destination).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2 (high nibble), command PROXY (low nibble).
pub(crate) const V2_PROXY: u8 = 0x21;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The two addresses in one family, after normalising.
enum Pair {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
    /// One real IPv4 and one real IPv6 address.
    Mixed,
}

/// IPv4-mapped IPv6 addresses (as a dual-stack socket reports IPv4 peers) count as IPv4, so a
/// pair is IPv4 whenever both can be; two real IPv6 addresses stay IPv6.
fn pair(client: IpAddr, relay: IpAddr) -> Pair {
    match (client.to_canonical(), relay.to_canonical(), client, relay) {
        (IpAddr::V4(c), IpAddr::V4(r), _, _) => Pair::V4(c, r),
        (_, _, IpAddr::V6(c), IpAddr::V6(r)) => Pair::V6(c, r),
        _ => Pair::Mixed,
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The v1 (text) header, e.g. `PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n`.
/// A real IPv4 address paired with a real IPv6 one gives `PROXY UNKNOWN\r\n`.
pub fn v1(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let (cp, rp) = (client.port(), relay.port());
    match pair(client.ip(), relay.ip()) {
        Pair::V4(c, r) => format!("PROXY TCP4 {c} {r} {cp} {rp}\r\n").into_bytes(),
        Pair::V6(c, r) => format!("PROXY TCP6 {c} {r} {cp} {rp}\r\n").into_bytes(),
        Pair::Mixed => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

/// The v2 (binary) header with command PROXY over TCP. A real IPv4 address paired with a real
/// IPv6 one is sent as IPv6, with the IPv4 address mapped.
pub fn v2(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    v2_start(&mut out, client, relay, 0);
    out
}

/// Appends a v2 header's fixed part and its address block (command PROXY over TCP), with
/// `tlv_len` more bytes of TLVs announced in its length for the caller to append. Shared
/// with [`crate::edge`], whose header is this one plus TLVs.
pub(crate) fn v2_start(out: &mut Vec<u8>, client: SocketAddr, relay: SocketAddr, tlv_len: u16) {
    let (cp, rp) = (client.port().to_be_bytes(), relay.port().to_be_bytes());
    let (family, addresses): (u8, Vec<u8>) = match pair(client.ip(), relay.ip()) {
        Pair::V4(c, r) => (V2_TCP4, [c.octets(), r.octets()].concat()),
        Pair::V6(c, r) => (V2_TCP6, [c.octets(), r.octets()].concat()),
        Pair::Mixed => {
            let (c, r) = (v6(client.ip()), v6(relay.ip()));
            (V2_TCP6, [c.octets(), r.octets()].concat())
        }
    };
    // 12 or 36 address bytes; the caller keeps `tlv_len` within the u16 (edge: MAX_HEADER).
    let length = (addresses.len() as u16 + 4).saturating_add(tlv_len);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_PROXY);
    out.push(family);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&addresses);
    out.extend_from_slice(&cp);
    out.extend_from_slice(&rp);
}

/// The size of a v2 address block (addresses and ports) for the family byte `family` (TCP4 or
/// TCP6 only), `None` for any other family.
pub(crate) fn v2_address_len(family: u8) -> Option<usize> {
    match family {
        V2_TCP4 => Some(12),
        V2_TCP6 => Some(36),
        _ => None,
    }
}

/// Reads a v2 address block of family `family` (TCP4 or TCP6) from the start of `body`:
/// (source, destination), each IPv4-mapped IPv6 address given back as IPv4. `None` if the
/// family is another or `body` is shorter than [`v2_address_len`].
pub(crate) fn v2_read_addresses(family: u8, body: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let len = v2_address_len(family)?;
    let body = body.get(..len)?;
    let ip_len = (len - 4) / 2;
    let ip = |bytes: &[u8]| -> Option<IpAddr> {
        Some(match ip_len {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
            _ => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?).to_canonical(),
        })
    };
    let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let source = ip(&body[..ip_len])?;
    let destination = ip(&body[ip_len..2 * ip_len])?;
    Some((
        SocketAddr::new(source, port(2 * ip_len)),
        SocketAddr::new(destination, port(2 * ip_len + 2)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV6;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Reads a v1 header back; `None` for UNKNOWN.
    fn parse_v1(bytes: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
        let line = std::str::from_utf8(bytes)
            .unwrap()
            .strip_suffix("\r\n")
            .unwrap();
        assert!(line.len() + 2 <= 107, "v1 header too long");
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[..] {
            ["PROXY", "UNKNOWN"] => None,
            ["PROXY", family, src, dst, sport, dport] => {
                let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
                let want_v4 = family == "TCP4";
                assert!(want_v4 || family == "TCP6");
                assert_eq!((src.is_ipv4(), dst.is_ipv4()), (want_v4, want_v4));
                Some((
                    SocketAddr::new(src, sport.parse().unwrap()),
                    SocketAddr::new(dst, dport.parse().unwrap()),
                ))
            }
            _ => panic!("bad v1 header {line:?}"),
        }
    }

    /// Reads a v2 header back, checking every fixed field.
    fn parse_v2(bytes: &[u8]) -> (SocketAddr, SocketAddr) {
        assert_eq!(bytes[..12], V2_SIGNATURE);
        assert_eq!(bytes[12], 0x21);
        let length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        let body = &bytes[16..];
        assert_eq!(body.len(), length);
        let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
        match bytes[13] {
            0x11 => {
                assert_eq!(length, 12);
                let ip = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&body[i..i + 4]).unwrap());
                (
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                )
            }
            0x21 => {
                assert_eq!(length, 36);
                let ip = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&body[i..i + 16]).unwrap());
                (
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                )
            }
            other => panic!("unexpected family {other:#x}"),
        }
    }

    fn mapped(v4: &str, port: u16) -> SocketAddr {
        let ip: Ipv4Addr = v4.parse().unwrap();
        SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0))
    }

    #[test]
    fn v1_exact() {
        assert_eq!(
            v1(sa("192.0.2.1:56324"), sa("198.51.100.7:443")),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
        );
        assert_eq!(
            v1(sa("[2001:db8::1]:56324"), sa("[2001:db8::2]:443")),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n"
        );
        assert_eq!(
            v1(mapped("192.0.2.1", 1), sa("198.51.100.7:443")),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 443\r\n"
        );
        assert_eq!(
            v1(mapped("192.0.2.1", 1), mapped("198.51.100.7", 443)),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 443\r\n"
        );
        assert_eq!(
            v1(sa("192.0.2.1:1"), sa("[2001:db8::2]:443")),
            b"PROXY UNKNOWN\r\n"
        );
        assert_eq!(
            v1(sa("[2001:db8::1]:1"), mapped("198.51.100.7", 443)),
            b"PROXY TCP6 2001:db8::1 ::ffff:198.51.100.7 1 443\r\n"
        );
    }

    #[test]
    fn v2_exact() {
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7]);
        want.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(v2(sa("192.0.2.1:56324"), sa("198.51.100.7:443")), want);
        assert_eq!(v2(mapped("192.0.2.1", 56324), sa("198.51.100.7:443")), want);

        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0, 36]);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(v2(sa("[2001:db8::1]:56324"), sa("[2001:db8::2]:443")), want);
    }

    #[test]
    fn round_trips() {
        let cases = [
            ("192.0.2.1:56324", "198.51.100.7:443"),
            ("[2001:db8::1]:65535", "[2001:db8::2]:1"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ];
        for (c, r) in cases {
            let (c, r) = (sa(c), sa(r));
            assert_eq!(parse_v1(&v1(c, r)), Some((c, r)));
            assert_eq!(parse_v2(&v2(c, r)), (c, r));
        }
        // Mapped addresses come back as IPv4; a real mix comes back as IPv6 in v2.
        let (c, r) = (mapped("192.0.2.1", 7), sa("198.51.100.7:443"));
        let want = (sa("192.0.2.1:7"), r);
        assert_eq!(parse_v1(&v1(c, r)), Some(want));
        assert_eq!(parse_v2(&v2(c, r)), want);
        let (c, r) = (sa("192.0.2.1:7"), sa("[2001:db8::2]:443"));
        assert_eq!(parse_v1(&v1(c, r)), None);
        assert_eq!(parse_v2(&v2(c, r)), (mapped("192.0.2.1", 7), r));
    }
}
