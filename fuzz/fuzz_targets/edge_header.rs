//! The edge header reader on any bytes (the optional offer TLV included): never panics; a decision made on a prefix is the
//! decision on the whole (bytes arriving later never change it), and `Incomplete { need }`
//! always asks for more than it was given and at most `MAX_HEADER`; an accepted header is
//! within its limits and its encoding reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taas_protocol::edge::{parse, Parsed, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    let first = data.first().map_or(0, |b| usize::from(*b));
    for cut in [
        data.len().saturating_sub(1),
        data.len() / 2,
        16.min(data.len()),
        first.min(data.len()),
    ] {
        match parse(&data[..cut]) {
            Ok(Parsed::Incomplete { need }) => assert!(need > cut && need <= MAX_HEADER),
            prefix => assert_eq!(prefix, whole, "at {cut}"),
        }
    }
    match whole {
        Ok(Parsed::Incomplete { need }) => assert!(need > data.len() && need <= MAX_HEADER),
        Ok(Parsed::Complete { header, len }) => {
            assert!(len <= MAX_HEADER && len <= data.len());
            assert!((1..=253).contains(&header.label.len()));
            assert!((1..=128).contains(&header.token.len()));
            let again = header.encode();
            let len = again.len();
            assert_eq!(parse(&again), Ok(Parsed::Complete { header, len }));
        }
        Err(_) => {}
    }
});
