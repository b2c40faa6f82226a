//! RFC 6238 time-based one-time passwords, as the original registrar checked them.
//!
//! The HMAC and the RFC 4226 truncation come from `totp-rs`; this module adds what the TAAS
//! contract needs on top: base32 secrets (the codec is `data-encoding`'s) in any spelling an
//! operator may paste, the number of digits taken from the client's response (6 to 8), a ±1
//! step window, and a verification that does the same work and compares in constant time
//! whichever step matches.
//!
//! The same work also whichever algorithm the label uses (issue 13): a refusal for an unknown
//! ID is checked against a decoy, and when the decoy used SHA1 while a label used SHA512, a
//! wrong token for that label's ID took measurably longer than one for a made-up ID (a whole
//! refusal in-process: 6.5 µs against 2.3 µs in a release build, 144 µs against 30 µs in a
//! debug build), which told which IDs exist. Now every check computes the code under all three
//! algorithms for each of the three steps (9 HMACs) and keeps the one asked for in constant
//! time: every refusal costs what a SHA512 one did (6.3 µs, next to a TLS handshake's ~1 ms),
//! and an unknown ID has no algorithm to give away.

use std::sync::LazyLock;

use data_encoding::{Encoding, BASE32_NOPAD};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use taas_crds::Algorithm;
use thiserror::Error;
use totp_rs::TOTP;

/// Why a base32 secret could not be decoded. Never carries the secret itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SecretError {
    #[error("the TOTP secret is empty")]
    Empty,
    #[error("the TOTP secret has a character outside the base32 alphabet at position {0}")]
    InvalidChar(usize),
    #[error("the TOTP secret has an impossible base32 length")]
    InvalidLength,
}

/// RFC 4648 base32 without padding, as secrets are stored. Decoding does not insist that the
/// unused low bits of the last symbol be zero (the codec this replaced did not either, and an
/// operator's pasted secret must keep working).
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = BASE32_NOPAD.specification();
    spec.check_trailing_bits = false;
    spec.encoding()
        .expect("base32 without trailing-bit checks is a valid specification")
});

/// Decodes an RFC 4648 base32 secret: any case, with or without `=` padding, whitespace
/// anywhere ignored (authenticator apps show the secret in groups).
pub fn decode_secret(b32: &str) -> Result<Vec<u8>, SecretError> {
    // The spelling is checked here (positions in the text as given); the codec then sees
    // upper-case symbols only.
    let mut symbols = String::with_capacity(b32.len());
    let mut padding = false;
    for (position, c) in b32.char_indices() {
        if c.is_whitespace() {
            continue;
        }
        if c == '=' {
            padding = true;
            continue;
        }
        let symbol = c.to_ascii_uppercase();
        if !matches!(symbol, 'A'..='Z' | '2'..='7') || padding {
            // Outside the alphabet, or data after padding.
            return Err(SecretError::InvalidChar(position));
        }
        symbols.push(symbol);
    }
    if symbols.is_empty() {
        return Err(SecretError::Empty);
    }
    // A final group of 1, 3 or 6 symbols cannot come from any byte string (a typo).
    BASE32
        .decode(symbols.as_bytes())
        .map_err(|_| SecretError::InvalidLength)
}

/// Encodes bytes as RFC 4648 base32, upper case, without padding (how secrets are stored).
pub fn encode_secret(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes)
}

/// The time step (RFC 6238 `T`) of `unix_time`. A `period` of 0 is treated as 1.
pub fn step(unix_time: u64, period: u64) -> u64 {
    unix_time / period.max(1)
}

/// The code for `unix_time`, zero-padded to `digits` (clamped to 6..=8).
pub fn code(
    secret: &[u8],
    algorithm: Algorithm,
    digits: u32,
    period: u64,
    unix_time: u64,
) -> String {
    hotp(
        secret,
        algorithm,
        digits.clamp(6, 8),
        step(unix_time, period),
    )
}

/// Checks `response` against the steps now, now−1 and now+1 and returns the step that matched.
///
/// The number of digits is the length of `response` (6 to 8 ASCII digits, else `None`), as the
/// original did. All three codes are computed and compared in constant time, so the timing does
/// not say which step matched, or whether any did; and each is computed with every algorithm,
/// so the timing does not say which algorithm `algorithm` is either.
pub fn verify(
    secret: &[u8],
    algorithm: Algorithm,
    period: u64,
    response: &str,
    unix_time: u64,
) -> Option<u64> {
    verify_with(hotp, secret, algorithm, period, response, unix_time)
}

/// Every algorithm a label may use: each check computes all of them.
const ALGORITHMS: [Algorithm; 3] = [Algorithm::SHA1, Algorithm::SHA256, Algorithm::SHA512];

/// [`verify`] with the HOTP function as a parameter, so that tests can count the work.
fn verify_with(
    mut hotp: impl FnMut(&[u8], Algorithm, u32, u64) -> String,
    secret: &[u8],
    algorithm: Algorithm,
    period: u64,
    response: &str,
    unix_time: u64,
) -> Option<u64> {
    let response = response.as_bytes();
    if !(6..=8).contains(&response.len()) || !response.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let digits = response.len() as u32; // 6..=8
    let now = step(unix_time, period);
    // Order of preference if several match (practically never): now, now−1, now+1.
    let candidates = [Some(now), now.checked_sub(1), now.checked_add(1)];
    let mut found = Choice::from(0);
    let mut matched = 0u64;
    for candidate in candidates {
        // A step that does not exist (at the ends of u64) is still computed, never accepted.
        let counter = candidate.unwrap_or(now);
        let exists = Choice::from(u8::from(candidate.is_some()));
        for each in ALGORITHMS {
            let expected = hotp(secret, each, digits, counter);
            let wanted = (each as u8).ct_eq(&(algorithm as u8));
            let hit = expected.as_bytes().ct_eq(response) & wanted & exists & !found;
            matched.conditional_assign(&counter, hit);
            found |= hit;
        }
    }
    bool::from(found).then_some(matched)
}

/// RFC 4226 HOTP of `counter`: a TOTP with a 1 s step evaluated at "time" `counter`.
fn hotp(secret: &[u8], algorithm: Algorithm, digits: u32, counter: u64) -> String {
    let algorithm = match algorithm {
        Algorithm::SHA1 => totp_rs::Algorithm::SHA1,
        Algorithm::SHA256 => totp_rs::Algorithm::SHA256,
        Algorithm::SHA512 => totp_rs::Algorithm::SHA512,
    };
    TOTP::new_unchecked(algorithm, digits as usize, 0, 1, secret.to_vec()).generate(counter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA1_KEY: &[u8] = b"12345678901234567890";
    const SHA256_KEY: &[u8] = b"12345678901234567890123456789012";
    const SHA512_KEY: &[u8] = b"1234567890123456789012345678901234567890123456789012345678901234";

    #[test]
    fn rfc6238_sha1_vectors() {
        let c = |d, t| code(SHA1_KEY, Algorithm::SHA1, d, 30, t);
        assert_eq!(c(6, 59), "287082");
        assert_eq!(c(8, 59), "94287082");
        assert_eq!(c(6, 1111111109), "081804");
        assert_eq!(c(8, 1111111109), "07081804");
        assert_eq!(c(8, 1111111111), "14050471");
        assert_eq!(c(8, 1234567890), "89005924");
        assert_eq!(c(8, 2000000000), "69279037");
        assert_eq!(c(8, 20000000000), "65353130");
        // speakeasy's step-60 vector.
        assert_eq!(code(SHA1_KEY, Algorithm::SHA1, 6, 60, 1111111109), "360094");
    }

    #[test]
    fn rfc6238_sha256_and_sha512_vectors() {
        let vectors: [(u64, &str, &str); 6] = [
            (59, "46119246", "90693936"),
            (1111111109, "68084774", "25091201"),
            (1111111111, "67062674", "99943326"),
            (1234567890, "91819424", "93441116"),
            (2000000000, "90698825", "38618901"),
            (20000000000, "77737706", "47863826"),
        ];
        for (t, sha256, sha512) in vectors {
            assert_eq!(code(SHA256_KEY, Algorithm::SHA256, 8, 30, t), sha256);
            assert_eq!(code(SHA512_KEY, Algorithm::SHA512, 8, 30, t), sha512);
        }
    }

    #[test]
    fn base32_secret_vector() {
        let key = decode_secret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        assert_eq!(key, SHA1_KEY);
        assert_eq!(code(&key, Algorithm::SHA1, 6, 30, 1111111109), "081804");
    }

    #[test]
    fn secret_spellings() {
        let canonical = decode_secret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        for spelling in [
            "gezdgnbvgy3tqojqgezdgnbvgy3tqojq",
            "  GEZD GNBV GY3T QOJQ gezd gnbv gy3t qojq \n",
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ====",
        ] {
            assert_eq!(decode_secret(spelling).unwrap(), canonical, "{spelling}");
        }
        // 1 byte: "GE" unpadded and "GE======" padded.
        assert_eq!(decode_secret("ge").unwrap(), b"1");
        assert_eq!(decode_secret("GE======").unwrap(), b"1");
        assert_eq!(decode_secret(""), Err(SecretError::Empty));
        assert_eq!(decode_secret("  ==== "), Err(SecretError::Empty));
        assert_eq!(decode_secret("GEZ1"), Err(SecretError::InvalidChar(3)));
        assert_eq!(decode_secret("GE=ZD"), Err(SecretError::InvalidChar(3)));
        assert_eq!(decode_secret("GEZ"), Err(SecretError::InvalidLength));
        assert_eq!(decode_secret("Ä"), Err(SecretError::InvalidChar(0)));
    }

    #[test]
    fn base32_round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        for len in 0..40 {
            let encoded = encode_secret(&bytes[..len]);
            assert!(!encoded.contains('='));
            if len > 0 {
                assert_eq!(decode_secret(&encoded).unwrap(), &bytes[..len]);
            }
        }
        assert_eq!(encode_secret(SHA1_KEY), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(encode_secret(b"f"), "MY");
        assert_eq!(encode_secret(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn verify_accepts_one_step_either_side() {
        let t = 1111111109;
        let s = step(t, 30);
        let at = |offset: i64| {
            let time = (t as i64 + offset * 30) as u64;
            code(SHA1_KEY, Algorithm::SHA1, 6, 30, time)
        };
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, &at(0), t), Some(s));
        assert_eq!(
            verify(SHA1_KEY, Algorithm::SHA1, 30, &at(-1), t),
            Some(s - 1)
        );
        assert_eq!(
            verify(SHA1_KEY, Algorithm::SHA1, 30, &at(1), t),
            Some(s + 1)
        );
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, &at(-2), t), None);
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, &at(2), t), None);
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, "081804", t), Some(s));
        assert_eq!(
            verify(SHA1_KEY, Algorithm::SHA1, 30, "07081804", t),
            Some(s)
        );
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, "081805", t), None);
    }

    #[test]
    fn verify_refuses_bad_shapes() {
        let t = 1111111109;
        for response in [
            "",
            "81804",
            "707081804",
            "08180a",
            "+81804",
            " 081804",
            "０81804",
        ] {
            assert_eq!(
                verify(SHA1_KEY, Algorithm::SHA1, 30, response, t),
                None,
                "{response}"
            );
        }
    }

    /// The HMACs one check computes, per algorithm, for each label algorithm and outcome.
    fn work(algorithm: Algorithm, response: &str) -> (Option<u64>, [usize; 3]) {
        let mut counts = [0usize; 3];
        let counting = |secret: &[u8], each: Algorithm, digits: u32, counter: u64| {
            counts[each as usize] += 1;
            hotp(secret, each, digits, counter)
        };
        let result = verify_with(counting, SHA512_KEY, algorithm, 30, response, 1111111109);
        (result, counts)
    }

    #[test]
    fn every_check_does_the_same_work_whatever_the_algorithm() {
        let s = step(1111111109, 30);
        for algorithm in ALGORITHMS {
            let right = code(SHA512_KEY, algorithm, 8, 30, 1111111109);
            let previous = code(SHA512_KEY, algorithm, 6, 30, 1111111109 - 30);
            for (response, expected) in [
                (right.as_str(), Some(s)),
                (previous.as_str(), Some(s - 1)),
                ("000000", None),
                ("12345678", None),
            ] {
                assert_eq!(
                    work(algorithm, response),
                    (expected, [3, 3, 3]),
                    "{algorithm:?} {response}"
                );
            }
        }
        // A code of another algorithm is not accepted for this one.
        let sha1 = code(SHA512_KEY, Algorithm::SHA1, 8, 30, 1111111109);
        let sha512 = code(SHA512_KEY, Algorithm::SHA512, 8, 30, 1111111109);
        assert_ne!(sha1, sha512);
        assert_eq!(work(Algorithm::SHA512, &sha1).0, None);
        assert_eq!(work(Algorithm::SHA1, &sha512).0, None);
    }

    #[test]
    fn verify_at_the_ends_of_time() {
        let first = code(SHA1_KEY, Algorithm::SHA1, 6, 30, 0);
        assert_eq!(verify(SHA1_KEY, Algorithm::SHA1, 30, &first, 0), Some(0));
        let last = code(SHA1_KEY, Algorithm::SHA1, 6, 1, u64::MAX);
        assert_eq!(
            verify(SHA1_KEY, Algorithm::SHA1, 1, &last, u64::MAX),
            Some(u64::MAX)
        );
        assert_eq!(step(100, 0), 100);
    }
}
