//! `client_hello::peek` on real first flights: ClientHellos written by rustls clients (with and
//! without a server name, for an IP, with ALPN, TLS 1.2 or 1.3 only, split over many records by
//! the client itself), and ones captured from `openssl s_client` and `curl`
//! (`tests/fixtures/README.md`). rustls' server-side `Acceptor` reads the same bytes as an
//! independent check. Every hello is also cut at every byte offset and re-framed into other
//! records; properties (proptest, fixed seed; `TAAS_PROP_CASES=N` and `TAAS_PROP_SEED=S` for a
//! long run) cover arbitrary bytes and mutated hellos.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rustls::pki_types::ServerName;
use rustls::server::Acceptor;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use taas_protocol::client_hello::{peek, Peek, Reason, MAX_CLIENT_HELLO};

const NAME: &str = "phone.taas.example.com";

fn client_config(tweak: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    tweak(&mut config);
    config
}

/// The bytes a rustls client sends first: its ClientHello, in one or more records.
fn first_flight(config: ClientConfig, server: &str) -> Vec<u8> {
    let server = ServerName::try_from(server.to_owned()).expect("a valid server name");
    let mut client = ClientConnection::new(Arc::new(config), server).expect("a client");
    let mut bytes = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut bytes).expect("writing to a Vec");
    }
    bytes
}

/// What rustls' server side reads from these bytes: `None` if it does not accept them as a
/// ClientHello, else the server name it saw (lower-cased).
fn rustls_reads(bytes: &[u8]) -> Option<Option<String>> {
    let mut acceptor = Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase),
        ),
        _ => None,
    }
}

/// The handshake bytes carried by well-formed records (the test's own, trusting reader).
fn handshake_bytes(records: &[u8]) -> Vec<u8> {
    let (out, rest) = record_payloads(records);
    assert!(rest.is_empty(), "records that add up");
    out
}

/// The payloads of the handshake records at the start of `bytes`, joined, and what follows
/// them (from the first byte that is not a handshake record).
fn record_payloads(bytes: &[u8]) -> (Vec<u8>, &[u8]) {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 && rest[0] == 22 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let Some(payload) = rest.get(5..5 + len) else {
            // A record still arriving: what there is of it.
            out.extend_from_slice(&rest[5..]);
            return (out, &[]);
        };
        out.extend_from_slice(payload);
        rest = &rest[5 + len..];
    }
    (out, rest)
}

/// `message` in records of the given fragment sizes (the last size repeats), record version
/// 0x03 `minor`.
fn reframe(message: &[u8], sizes: &[usize], minor: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    let mut sizes = sizes
        .iter()
        .copied()
        .chain(std::iter::repeat(sizes[sizes.len() - 1]));
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(1).clamp(1, rest.len().min(1 << 14));
        out.extend([22, 3, minor]);
        out.extend((size as u16).to_be_bytes());
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size..];
    }
    out
}

fn alpn(config: &mut ClientConfig) {
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
}

/// `count` made-up ALPN protocols of 200 bytes: a ClientHello of about `count` × 201 bytes.
fn big_alpn(count: usize) -> impl FnOnce(&mut ClientConfig) {
    move |config: &mut ClientConfig| {
        config.alpn_protocols = (0..count)
            .map(|i| vec![b'a' + (i % 26) as u8; 200])
            .collect();
    }
}

fn name(host: &str) -> Peek {
    Peek::ServerName(host.into())
}

/// Real first flights and what `peek` must answer.
fn real_hellos() -> Vec<(&'static str, Vec<u8>, Peek)> {
    let flight = |tweak: Box<dyn FnOnce(&mut ClientConfig)>, server: &str| {
        first_flight(client_config(tweak), server)
    };
    vec![
        ("default", flight(Box::new(|_| {}), NAME), name(NAME)),
        ("alpn h2 http/1.1", flight(Box::new(alpn), NAME), name(NAME)),
        (
            "upper case name",
            flight(Box::new(alpn), "Phone.TAAS.Example.COM"),
            name(NAME),
        ),
        (
            "IDN A-label",
            flight(Box::new(|_| {}), "xn--bcher-kva.taas.example.com"),
            name("xn--bcher-kva.taas.example.com"),
        ),
        (
            "SNI off",
            flight(Box::new(|c| c.enable_sni = false), NAME),
            Peek::NoServerName,
        ),
        (
            "IPv4",
            flight(Box::new(alpn), "192.0.2.7"),
            Peek::NoServerName,
        ),
        (
            "IPv6",
            flight(Box::new(|_| {}), "2001:db8::7"),
            Peek::NoServerName,
        ),
        (
            "TLS 1.2 only",
            first_flight(
                ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS12])
                .expect("TLS 1.2")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
                NAME,
            ),
            name(NAME),
        ),
        (
            "TLS 1.3 only",
            first_flight(
                ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
                NAME,
            ),
            name(NAME),
        ),
        (
            "64-byte records (the client fragments)",
            flight(Box::new(|c| c.max_fragment_size = Some(64 + 5)), NAME),
            name(NAME),
        ),
        (
            "10 KiB hello in 4 KiB records",
            flight(
                Box::new(|c| {
                    big_alpn(50)(c);
                    c.max_fragment_size = Some(4096 + 5);
                }),
                NAME,
            ),
            name(NAME),
        ),
    ]
}

#[test]
fn real_hellos_give_their_server_name_as_rustls_reads_it() {
    for (case, bytes, expected) in real_hellos() {
        assert_eq!(peek(&bytes), expected, "{case}");
        let seen = rustls_reads(&bytes).unwrap_or_else(|| panic!("rustls refused {case}"));
        match &expected {
            Peek::ServerName(host) => assert_eq!(seen.as_deref(), Some(host.as_str()), "{case}"),
            _ => assert_eq!(seen, None, "{case}"),
        }
    }
}

#[test]
fn the_client_fragmented_hellos_really_span_several_records() {
    let hellos = real_hellos();
    for (case, records) in [
        ("64-byte records (the client fragments)", 3),
        ("10 KiB hello in 4 KiB records", 3),
    ] {
        let (_, bytes, _) = hellos.iter().find(|(c, ..)| *c == case).unwrap();
        let mut count = 0;
        let mut rest = &bytes[..];
        while rest.len() >= 5 {
            rest = &rest[5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))..];
            count += 1;
        }
        assert!(count >= records, "{case}: {count} records");
    }
}

#[test]
fn a_hello_larger_than_the_bound_is_refused_though_it_is_valid() {
    // About 20 KiB, written by rustls, but it does not end within MAX_CLIENT_HELLO bytes.
    let bytes = first_flight(client_config(big_alpn(100)), NAME);
    assert!(bytes.len() > MAX_CLIENT_HELLO);
    assert_eq!(peek(&bytes), Peek::NotClientHello(Reason::TooLarge));
    // Decided from the first record's header, before the body arrives.
    assert_eq!(peek(&bytes[..9]), Peek::NotClientHello(Reason::TooLarge));
    // Just under the bound it is read.
    let bytes = first_flight(client_config(big_alpn(75)), NAME);
    assert!(bytes.len() < MAX_CLIENT_HELLO && bytes.len() > 15_000);
    assert_eq!(peek(&bytes), name(NAME));
}

#[test]
fn hellos_captured_from_openssl_and_curl() {
    for (file, bytes, expected) in [
        (
            "openssl-s_client.bin",
            &include_bytes!("fixtures/openssl-s_client.bin")[..],
            name(NAME),
        ),
        (
            "curl.bin",
            &include_bytes!("fixtures/curl.bin")[..],
            name(NAME),
        ),
        (
            "curl-ip.bin",
            &include_bytes!("fixtures/curl-ip.bin")[..],
            Peek::NoServerName,
        ),
    ] {
        assert_eq!(peek(bytes), expected, "{file}");
        let seen = rustls_reads(bytes).unwrap_or_else(|| panic!("rustls refused {file}"));
        assert_eq!(
            seen.map(Peek::ServerName).unwrap_or(Peek::NoServerName),
            expected,
            "{file}"
        );
        every_split_needs_more_until_the_end(file, bytes, &expected);
    }
}

/// Every prefix shorter than `bytes` needs more; all of it (and more after it) gives `expected`.
fn every_split_needs_more_until_the_end(case: &str, bytes: &[u8], expected: &Peek) {
    for cut in 0..bytes.len() {
        assert_eq!(peek(&bytes[..cut]), Peek::NeedMore, "{case}: cut at {cut}");
    }
    assert_eq!(&peek(bytes), expected, "{case}");
    // What follows the hello (the caller read more, or the client sent more) changes nothing.
    let mut more = bytes.to_vec();
    more.extend([23, 3, 3, 0, 4, 1, 2, 3, 4]);
    assert_eq!(&peek(&more), expected, "{case} with more after it");
}

#[test]
fn real_hellos_need_more_at_every_split_until_complete() {
    for (case, bytes, expected) in real_hellos() {
        every_split_needs_more_until_the_end(case, &bytes, &expected);
    }
}

#[test]
fn real_hellos_reframed_into_several_records_give_the_same_answer() {
    for (case, bytes, expected) in real_hellos() {
        let message = handshake_bytes(&bytes);
        for sizes in [
            &[1][..],
            &[2],
            &[3],
            &[4, 1],
            &[7],
            &[100],
            &[1000],
            &[1 << 14],
        ] {
            for minor in [1, 3] {
                let framed = reframe(&message, sizes, minor);
                if framed.len() > MAX_CLIENT_HELLO {
                    // (the 10 KiB hello in records of a few bytes)
                    let too_large = Peek::NotClientHello(Reason::TooLarge);
                    assert_eq!(peek(&framed), too_large, "{case} in records of {sizes:?}");
                    continue;
                }
                assert_eq!(peek(&framed), expected, "{case} in records of {sizes:?}");
                let seen = rustls_reads(&framed)
                    .unwrap_or_else(|| panic!("rustls refused {case} in {sizes:?}"));
                assert_eq!(
                    seen.map(Peek::ServerName).unwrap_or(Peek::NoServerName),
                    expected,
                    "{case} in records of {sizes:?}, read by rustls"
                );
            }
        }
        if message.len() < 600 {
            let framed = reframe(&message, &[1], 1);
            every_split_needs_more_until_the_end(case, &framed, &expected);
        }
    }
}

#[test]
fn a_hello_in_too_many_records_is_refused_at_the_bound() {
    // A 10 KiB hello in one-byte records takes 60 KiB: the hello does not end in time.
    let (_, bytes, _) = real_hellos()
        .into_iter()
        .find(|(c, ..)| *c == "10 KiB hello in 4 KiB records")
        .unwrap();
    let framed = reframe(&handshake_bytes(&bytes), &[1], 3);
    assert_eq!(peek(&framed[..MAX_CLIENT_HELLO - 1]), Peek::NeedMore);
    assert_eq!(
        peek(&framed[..MAX_CLIENT_HELLO]),
        Peek::NotClientHello(Reason::TooLarge)
    );
    assert_eq!(peek(&framed), Peek::NotClientHello(Reason::TooLarge));
}

#[test]
fn a_record_of_another_type_inside_the_hello_is_malformed() {
    let bytes = first_flight(client_config(alpn), NAME);
    let message = handshake_bytes(&bytes);
    let mut framed = reframe(&message[..40], &[40], 1);
    framed.extend([21, 3, 3, 0, 2, 1, 0]); // an alert between two handshake records
    framed.extend(reframe(&message[40..], &[1 << 14], 1));
    assert_eq!(peek(&framed), Peek::NotClientHello(Reason::Malformed));
}

fn prop_config(default_cases: u32, name: &str) -> Config {
    let env = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let seed = env("TAAS_PROP_SEED").unwrap_or_else(|| {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    });
    Config {
        cases: env("TAAS_PROP_CASES").map_or(default_cases, |n| n.clamp(1, 1 << 31) as u32),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

/// Host names as a client may write them: 1 to 4 labels of letters (either case), digits and
/// hyphens, some IDN A-labels, the last label starting with a letter.
fn host_names() -> impl Strategy<Value = String> {
    let label = "[a-zA-Z0-9]([a-zA-Z0-9-]{0,38}[a-zA-Z0-9])?";
    let last = "[a-zA-Z]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?";
    (prop::collection::vec(label, 0..4), prop::bool::ANY, last).prop_map(
        |(mut labels, idn, last)| {
            if idn {
                labels.insert(0, "xn--bcher-kva".into());
            }
            labels.push(last);
            labels.join(".")
        },
    )
}

/// Arbitrary bytes, some of them behind the start of a handshake record so the parser gets
/// past the first checks.
fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..2048),
        (
            prop::collection::vec(any::<u8>(), 0..1024),
            0u8..5,
            any::<u16>()
        )
            .prop_map(|(tail, minor, len)| {
                let mut bytes = vec![22, 3, minor];
                bytes.extend(len.to_be_bytes());
                bytes.push(1);
                bytes.extend(tail);
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(prop_config(2_000, "client_hello_any_bytes"))]

    /// Any bytes: no panic, and a decision on a prefix is the decision on the whole.
    #[test]
    fn any_bytes_never_panic_and_a_decision_stands(bytes in any_bytes(), cut in any::<prop::sample::Index>()) {
        let whole = peek(&bytes);
        let prefix = peek(&bytes[..cut.index(bytes.len() + 1)]);
        prop_assert!(prefix == Peek::NeedMore || prefix == whole, "{prefix:?} then {whole:?}");
        if let Peek::ServerName(host) = &whole {
            prop_assert!(!host.is_empty() && host.len() <= 253);
            prop_assert!(host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')));
        }
    }
}

proptest! {
    #![proptest_config(prop_config(256, "client_hello_any_framing"))]

    /// A real hello for any host name, in any records and any split: every prefix needs more
    /// or already gives the answer, and the whole gives exactly the name, as rustls reads it.
    #[test]
    fn a_real_hello_in_any_framing_and_split_gives_exactly_its_name(
        host in host_names(),
        with_alpn in any::<bool>(),
        sizes in prop::collection::vec(1usize..600, 1..6),
        minor in 1u8..=4,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
    ) {
        let bytes = first_flight(client_config(|c| if with_alpn { alpn(c) }), &host);
        let framed = reframe(&handshake_bytes(&bytes), &sizes, minor);
        let expected = Peek::ServerName(host.to_ascii_lowercase());
        prop_assert_eq!(&peek(&framed), &expected);
        prop_assert_eq!(rustls_reads(&framed), Some(Some(host.to_ascii_lowercase())));
        for cut in cuts {
            let cut = cut.index(framed.len());
            prop_assert_eq!(peek(&framed[..cut]), Peek::NeedMore, "cut at {}", cut);
        }
    }
}

/// One change to a real hello.
#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(one, 1..4)
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match mutation {
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::Insert(i, new) => {
            let i = i.index(bytes.len() + 1);
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let i = i.index(bytes.len());
            bytes.drain(i..(i + n).min(bytes.len()));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
    }
}

proptest! {
    #![proptest_config(prop_config(2_000, "client_hello_mutated"))]

    /// A mutated real hello: no panic, a decision stands, and a name given is never wrong:
    /// it is a host name written in the bytes, and the one rustls reads when rustls accepts.
    #[test]
    fn a_mutated_hello_never_gives_a_wrong_name(
        case in 0usize..4,
        framing in prop::option::of(1usize..300),
        changes in mutations(),
        cut in any::<prop::sample::Index>(),
    ) {
        let hellos = hellos_to_mutate();
        let mut bytes = match framing {
            Some(size) => reframe(&handshake_bytes(&hellos[case]), &[size], 1),
            None => hellos[case].clone(),
        };
        for change in &changes {
            mutate(&mut bytes, change);
        }
        let answer = peek(&bytes);
        let prefix = peek(&bytes[..cut.index(bytes.len() + 1)]);
        prop_assert!(prefix == Peek::NeedMore || prefix == answer, "{prefix:?} then {answer:?}");
        if let Peek::ServerName(host) = &answer {
            prop_assert!(rustls::pki_types::DnsName::try_from(host.as_str()).is_ok());
            // (the records' payloads joined: a name split over records is whole there)
            let (mut lower, rest) = record_payloads(&bytes);
            lower.extend_from_slice(rest);
            lower.make_ascii_lowercase();
            prop_assert!(lower.windows(host.len()).any(|w| w == host.as_bytes()), "{host} not in the bytes");
            if let Some(seen) = rustls_reads(&bytes) {
                prop_assert_eq!(seen.as_deref(), Some(host.as_str()));
            }
        }
        if answer == Peek::NoServerName {
            if let Some(Some(seen)) = rustls_reads(&bytes) {
                prop_assert!(false, "rustls reads {seen}, peek reads no name");
            }
        }
    }
}

/// Four real hellos (built once): default, ALPN, TLS 1.2 only, no SNI.
fn hellos_to_mutate() -> &'static [Vec<u8>] {
    static HELLOS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    HELLOS.get_or_init(|| {
        let all = real_hellos();
        ["default", "alpn h2 http/1.1", "TLS 1.2 only", "SNI off"]
            .iter()
            .map(|case| all.iter().find(|(c, ..)| c == case).unwrap().1.clone())
            .collect()
    })
}
