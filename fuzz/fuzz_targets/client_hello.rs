//! The shared client port's ClientHello reader on any bytes: never panics; a decision made on
//! a prefix is the decision on the whole (bytes arriving later never change it); a name given
//! is a lower-case host name without a trailing dot; a decision is made within
//! `MAX_CLIENT_HELLO` bytes. Seeds: real first flights (rustls, `openssl s_client`, curl; the
//! same as `protocol/tests/client_hello.rs` and its fixtures).
#![no_main]

use libfuzzer_sys::fuzz_target;
use taas_protocol::client_hello::{peek, Peek, MAX_CLIENT_HELLO};

fuzz_target!(|data: &[u8]| {
    let whole = peek(data);
    if data.len() >= MAX_CLIENT_HELLO {
        assert_ne!(whole, Peek::NeedMore);
    }
    // A few prefixes, chosen by the input, and the one a byte short.
    let first = data.first().map_or(0, |b| usize::from(*b));
    for cut in [data.len().saturating_sub(1), data.len() / 2, first.min(data.len())] {
        let prefix = peek(&data[..cut]);
        assert!(
            prefix == Peek::NeedMore || prefix == whole,
            "{prefix:?} at {cut}, {whole:?} for all"
        );
    }
    if let Peek::ServerName(host) = &whole {
        assert!(!host.is_empty() && host.len() <= 253 && !host.ends_with('.'));
        assert!(host.bytes().all(|b| b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'-' | b'.' | b'_')));
        assert!(host.split('.').all(|label| (1..=63).contains(&label.len())));
    }
});
