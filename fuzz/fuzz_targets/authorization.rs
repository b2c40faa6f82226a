//! `authorization::parse` on any bytes: never panics; whatever it accepts is well-formed, and
//! `format` of it reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taas_protocol::authorization::{format, parse, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = parse(data) {
        assert!(data.len() <= MAX_HEADER_LEN);
        assert!(!c.username.is_empty());
        assert!((6..=8).contains(&c.response.len()));
        assert!(c.response.bytes().all(|b| b.is_ascii_digit()));
        let again = format(&c.username, &c.response);
        if again.len() <= MAX_HEADER_LEN {
            assert_eq!(parse(again.as_bytes()), Ok(c));
        }
    }
});
