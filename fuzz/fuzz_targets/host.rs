//! Host dispatch on any bytes: never panics; an accepted host is plausible and lower case, a
//! client role's host is `LABEL.<domain>`. (`host_only` is not idempotent on degenerate input:
//! `..` gives `.`, which gives nothing; both are dispatched as not ours, so that is no bug.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use taas_protocol::host::{classify, host_only, Names, Role};

fuzz_target!(|data: &[u8]| {
    let names = Names {
        registrar: "taas-registrar.example.com".into(),
        domain: "taas.example.com".into(),
    };
    let role = classify(Some(data), &names, |ip| ip.is_loopback());
    if let Role::Client { label, host } = &role {
        assert!(!label.is_empty());
        assert_eq!(host, &format!("{label}.taas.example.com"));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(host) = host_only(text) {
            assert!(!host.is_empty() && host.len() <= 253);
            assert!(host.bytes().all(|b| b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'-' | b'.' | b'_' | b':')));
        } else {
            assert_eq!(role, Role::Missing);
        }
    }
});
