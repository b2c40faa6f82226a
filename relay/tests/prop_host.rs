//! Property-based harness for Host dispatch (`taas_relay::host`): `host_only` and `classify`
//! never panic on any bytes, whatever they accept is a plausible lower-case host, and every
//! name, IPv4 and IPv6 literal (with or without port, any letter case, trailing dot) comes back
//! as the host it names, dispatched to the right role.
//!
//! Cases per property: 2,000 (`TAAS_PROP_CASES=N` for a long run). See docs/robustness.md.

use taas_testkit::property;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use taas_relay::host::{classify, host_only, Names, Role};

fn cases() -> u32 {
    property::cases(property::CASES_ENV, 2_000)
}

fn names() -> Names {
    Names {
        registrar: "taas-registrar.example.com".into(),
        domain: "taas.example.com".into(),
    }
}

const OWN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const OWN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5);

fn is_own(ip: IpAddr) -> bool {
    ip == IpAddr::V4(OWN_V4) || ip == IpAddr::V6(OWN_V6)
}

fn plausible(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b':')
        })
}

/// Bytes biased towards Host syntax.
fn hostish() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"[",
        b"]",
        b":",
        b".",
        b"-",
        b"_",
        b"::",
        b"ffff",
        b"127.0.0.1",
        b"203.0.113.5",
        b"2001:db8::5",
        b"taas",
        b"example",
        b"com",
        b"taas-registrar",
        b"taas.example.com",
        b"443",
        b"65535",
        b"99999",
        b"0",
        b" ",
        b"\t",
        b"\xff",
        b"\xc3\xa9",
        b"%",
        b"@",
        b"/",
    ];
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::sample::select(pieces).prop_map(<[u8]>::to_vec),
            1 => proptest::collection::vec(any::<u8>(), 1..3),
        ],
        0..16,
    )
    .prop_map(|p| p.concat())
}

#[test]
fn never_panics_and_accepts_only_plausible_hosts() {
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        hostish(),
        any::<String>().prop_map(String::into_bytes),
    ];
    property::check("host/arbitrary", cases(), strategy, |bytes| {
        let role = classify(Some(&bytes), &names(), is_own);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            match host_only(text) {
                Some(host) => {
                    prop_assert!(plausible(&host), "{text:?} -> {host:?}");
                    prop_assert_ne!(&role, &Role::Missing);
                }
                None => prop_assert_eq!(&role, &Role::Missing),
            }
        } else {
            prop_assert_eq!(&role, &Role::Missing);
        }
        if let Role::Client { label, host } = &role {
            prop_assert!(!label.is_empty());
            prop_assert_eq!(host, &format!("{label}.taas.example.com"));
        }
        Ok(())
    });
}

/// A host name: 1–4 dot-separated parts of letters, digits, `-` and `_`.
fn dns_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9_-]{1,20}", 1..5).prop_map(|parts| parts.join("."))
}

/// `name` with each letter's case chosen at random.
fn recase(name: String) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn port() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        any::<u16>().prop_map(|p| p.to_string()),
        "[0-9]{1,5}",
    ])
}

#[test]
fn names_round_trip_with_any_case_port_and_trailing_dot() {
    let strategy = dns_name()
        .prop_flat_map(|n| (Just(n.clone()), recase(n), port(), any::<bool>()))
        .prop_filter("not an IP literal", |(n, ..)| n.parse::<IpAddr>().is_err());
    property::check(
        "host/name-round-trip",
        cases(),
        strategy,
        |(name, written, port, dot)| {
            let mut value = written;
            if dot {
                value.push('.');
            }
            if let Some(port) = &port {
                value = format!("{value}:{port}");
            }
            prop_assert_eq!(host_only(&value), Some(name.clone()), "{:?}", value);
            Ok(())
        },
    );
}

#[test]
fn ip_literals_round_trip() {
    let strategy = (any::<Ipv4Addr>(), any::<Ipv6Addr>(), port(), any::<bool>());
    property::check(
        "host/ip-round-trip",
        cases(),
        strategy,
        |(v4, v6, port, upper)| {
            let with_port = |host: String| match &port {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            prop_assert_eq!(host_only(&with_port(v4.to_string())), Some(v4.to_string()));
            let text = if upper {
                v6.to_string().to_ascii_uppercase()
            } else {
                v6.to_string()
            };
            let bracketed = with_port(format!("[{text}]"));
            let back = host_only(&bracketed);
            let want = v6.to_string();
            prop_assert_eq!(back.as_deref(), Some(want.as_str()), "{}", bracketed);
            prop_assert_eq!(back.unwrap().parse::<Ipv6Addr>().ok(), Some(v6));
            // Without brackets an IPv6 literal has no port to strip, and stays whole.
            prop_assert_eq!(host_only(&text), Some(v6.to_string()));
            Ok(())
        },
    );
}

#[test]
fn classify_dispatches_every_form_to_its_role() {
    let label = proptest::collection::vec("[a-z0-9][a-z0-9-]{0,20}", 1..4)
        .prop_map(|parts| parts.join("."));
    let strategy = (
        label.prop_flat_map(|l| (Just(l.clone()), recase(l))),
        recase("taas-registrar.example.com".into()),
        recase("taas.example.com".into()),
        port(),
        any::<Ipv4Addr>(),
        any::<Ipv6Addr>(),
    );
    property::check(
        "host/classify",
        cases(),
        strategy,
        |((label, label_written), registrar, domain, port, v4, v6)| {
            let with_port = |host: String| match &port {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            let role = |host: String| classify(Some(host.as_bytes()), &names(), is_own);
            prop_assert_eq!(role(with_port(registrar)), Role::Registrar);
            let host = format!("{label_written}.{domain}");
            prop_assert_eq!(
                role(with_port(host)),
                Role::Client {
                    label: label.clone(),
                    host: format!("{label}.taas.example.com"),
                }
            );
            // The bare domain and a look-alike are nobody's.
            prop_assert_eq!(role(with_port(domain.clone())), Role::Misdirected);
            prop_assert_eq!(role(format!("{label}{domain}")), Role::Misdirected);
            // The relay's own addresses (IPv4, mapped, IPv6) are the registrar; others are not.
            prop_assert_eq!(role(with_port(OWN_V4.to_string())), Role::Registrar);
            prop_assert_eq!(
                role(with_port(format!("[{}]", OWN_V4.to_ipv6_mapped()))),
                Role::Registrar
            );
            prop_assert_eq!(role(with_port(format!("[{OWN_V6}]"))), Role::Registrar);
            let expect = |ip: IpAddr| {
                if is_own(ip.to_canonical()) {
                    Role::Registrar
                } else {
                    Role::Misdirected
                }
            };
            prop_assert_eq!(role(with_port(v4.to_string())), expect(v4.into()));
            prop_assert_eq!(role(with_port(format!("[{v6}]"))), expect(v6.into()));
            Ok(())
        },
    );
}
