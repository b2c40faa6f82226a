//! PROXY v1/v2 headers for any two socket addresses (from the fuzzer's bytes): v1 is one
//! CRLF-terminated line of at most 107 bytes whose addresses parse back; v2 has the signature
//! and a length matching its family.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use taas_protocol::proxy_header::{v1, v2, V2_SIGNATURE};

fn addr(bytes: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([bytes[0], bytes[1]]);
    let ip: IpAddr = match bytes[2] % 3 {
        0 => Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[3..7]).unwrap()).into(),
        1 => Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[3..19]).unwrap()).into(),
        _ => Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[3..7]).unwrap())
            .to_ipv6_mapped()
            .into(),
    };
    SocketAddr::new(ip, port)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 38 {
        return;
    }
    let (client, relay) = (addr(&data[..19]), addr(&data[19..38]));
    let one = v1(client, relay);
    assert!(one.len() <= 107 && one.ends_with(b"\r\n"));
    let line = std::str::from_utf8(&one[..one.len() - 2]).unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    match fields[..] {
        ["PROXY", "UNKNOWN"] => {}
        ["PROXY", "TCP4", s, d, sp, dp] => {
            assert_eq!(
                s.parse::<Ipv4Addr>().unwrap(),
                match client.ip().to_canonical() {
                    IpAddr::V4(v4) => v4,
                    other => panic!("TCP4 for {other}"),
                }
            );
            assert!(d.parse::<Ipv4Addr>().is_ok());
            assert_eq!(sp.parse::<u16>().unwrap(), client.port());
            assert_eq!(dp.parse::<u16>().unwrap(), relay.port());
        }
        ["PROXY", "TCP6", s, d, sp, dp] => {
            assert!(s.parse::<Ipv6Addr>().is_ok() && d.parse::<Ipv6Addr>().is_ok());
            assert_eq!(sp.parse::<u16>().unwrap(), client.port());
            assert_eq!(dp.parse::<u16>().unwrap(), relay.port());
        }
        _ => panic!("bad v1 header {line:?}"),
    }
    let two = v2(client, relay);
    assert_eq!(two[..12], V2_SIGNATURE);
    assert_eq!(two[12], 0x21);
    let len = usize::from(u16::from_be_bytes([two[14], two[15]]));
    assert_eq!(two.len(), 16 + len);
    assert!(matches!((two[13], len), (0x11, 12) | (0x21, 36)));
});
