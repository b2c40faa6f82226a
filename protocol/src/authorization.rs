//! The `Authorization: TOTP username="ID", response="TKN"` header of a registration.
//!
//! Deployed stewards send exactly what [`format()`] produces, and the original registrar accepted
//! a loose grammar around it (PROTOCOL.md §2), so the parser is lenient where the original was:
//! parameters in any order, separated by commas and/or whitespace, values quoted or not, unknown
//! parameters ignored, the last of a repeated name wins. It is stricter only where the original
//! was unsafe or broken: the size is capped before parsing, and the response must be 6–8 digits.

use std::fmt;

use thiserror::Error;

/// Longest header value accepted; anything longer is refused before parsing.
pub const MAX_HEADER_LEN: usize = 1024;

/// What a registering hidden server claims: its ID and its current TOTP code.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub response: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("response", &"<redacted>")
            .finish()
    }
}

/// Why an `Authorization` header was refused (all of them answer 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AuthorizationError {
    #[error("Authorization header longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("Authorization header is not UTF-8")]
    NotUtf8,
    #[error("Authorization scheme is not TOTP")]
    WrongScheme,
    #[error("Authorization header is malformed")]
    Malformed,
    #[error("Authorization header has no username")]
    MissingUsername,
    #[error("Authorization header has no response")]
    MissingResponse,
    #[error("Authorization response is not 6 to 8 digits")]
    BadResponse,
}

/// Parses a `TOTP` `Authorization` header value. Never panics, whatever the bytes.
pub fn parse(header: &[u8]) -> Result<Credentials, AuthorizationError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(AuthorizationError::TooLong);
    }
    let header = std::str::from_utf8(header).map_err(|_| AuthorizationError::NotUtf8)?;
    let header = header.trim_matches(is_space);
    if header.is_empty() {
        return Err(AuthorizationError::Malformed);
    }
    let (scheme, params) = header.split_once(is_space).unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("TOTP") {
        return Err(AuthorizationError::WrongScheme);
    }

    let (mut username, mut response) = (None, None);
    for param in Params(params) {
        let (name, value) = param?;
        // Names are matched case-insensitively, as RFC 7235 says auth-param names are. The
        // original matched them case-sensitively; accepting `Username` too breaks no client.
        if name.eq_ignore_ascii_case("username") {
            username = Some(value);
        } else if name.eq_ignore_ascii_case("response") {
            response = Some(value);
        }
    }

    let username = username
        .filter(|u| !u.is_empty())
        .ok_or(AuthorizationError::MissingUsername)?;
    let response = response
        .filter(|r| !r.is_empty())
        .ok_or(AuthorizationError::MissingResponse)?;
    if !(6..=8).contains(&response.len()) || !response.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorizationError::BadResponse);
    }
    Ok(Credentials { username, response })
}

/// The header value the steward sends: `TOTP username="ID", response="TKN"`.
/// `"` and `\` in either value are backslash-escaped, so [`parse`] reads back the same values.
pub fn format(username: &str, response: &str) -> String {
    format!(
        "TOTP username=\"{}\", response=\"{}\"",
        escape(username),
        escape(response)
    )
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_separator(c: char) -> bool {
    c == ',' || is_space(c)
}

/// Iterator over `name=value` pairs; yields `Err(Malformed)` once, then stops.
struct Params<'a>(&'a str);

impl<'a> Iterator for Params<'a> {
    type Item = Result<(&'a str, String), AuthorizationError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0.trim_start_matches(is_separator);
        if rest.is_empty() {
            self.0 = rest;
            return None;
        }
        match param(rest) {
            Some((name, value, rest)) => {
                self.0 = rest;
                Some(Ok((name, value)))
            }
            None => {
                self.0 = "";
                Some(Err(AuthorizationError::Malformed))
            }
        }
    }
}

/// One `name = value` at the start of `input` (no leading separators); returns the rest,
/// which is empty or starts with a separator.
fn param(input: &str) -> Option<(&str, String, &str)> {
    let name_end = input
        .find(|c: char| c == '=' || c == '"' || is_separator(c))
        .unwrap_or(input.len());
    let (name, rest) = input.split_at(name_end);
    if name.is_empty() {
        return None;
    }
    let rest = rest.trim_start_matches(is_space).strip_prefix('=')?;
    let rest = rest.trim_start_matches(is_space);
    let (value, rest) = match rest.strip_prefix('"') {
        Some(quoted) => quoted_string(quoted)?,
        None => {
            let end = rest.find(is_separator).unwrap_or(rest.len());
            let (value, rest) = rest.split_at(end);
            if value.contains('"') {
                return None;
            }
            (value.to_owned(), rest)
        }
    };
    if rest.starts_with(|c: char| !is_separator(c)) {
        return None; // e.g. `name="a"b`
    }
    Some((name, value, rest))
}

/// The body of a quoted string after its opening quote: the unescaped value and what follows
/// the closing quote. `None` if it is not closed.
fn quoted_string(input: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = input.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &input[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use AuthorizationError::*;

    fn ok(header: &str) -> (String, String) {
        let c = parse(header.as_bytes()).unwrap_or_else(|e| panic!("{header:?}: {e}"));
        (c.username, c.response)
    }

    fn err(header: &str) -> AuthorizationError {
        parse(header.as_bytes()).expect_err(header)
    }

    fn pair(u: &str, r: &str) -> (String, String) {
        (u.to_owned(), r.to_owned())
    }

    #[test]
    fn steward_header() {
        let id = "7d3e0c4a-1b2c-4d5e-8f90-123456789abc";
        let header = format!("TOTP username=\"{id}\", response=\"081804\"");
        assert_eq!(ok(&header), pair(id, "081804"));
        assert_eq!(format(id, "081804"), header);
    }

    #[test]
    fn lenient_forms() {
        let want = pair("abc", "12345678");
        for header in [
            "TOTP response=\"12345678\", username=\"abc\"",
            "TOTP username=abc, response=12345678",
            "TOTP username=abc,response=12345678",
            "TOTP username=\"abc\",,,response=\"12345678\",",
            "TOTP username=abc response=12345678",
            "TOTP   username=\"abc\"  \t response=12345678  ",
            "  totp\tusername=abc , response=12345678",
            "Totp realm=\"taas\", username=\"abc\", nonce=x, response=\"12345678\", qop=\"a, b\"",
            "TOTP username = \"abc\" , response =12345678",
            "TOTP Username=\"abc\", RESPONSE=\"12345678\"",
            "TOTP username=\"first\", response=\"000000\", username=\"abc\", response=12345678",
            "TOTP username=\"\", username=\"abc\", response=\"12345678\"",
        ] {
            assert_eq!(ok(header), want, "{header}");
        }
    }

    #[test]
    fn escapes_in_quoted_values() {
        assert_eq!(
            ok(r#"TOTP username="a\"b\\c\d", response="123456""#),
            pair(r#"a"b\cd"#, "123456")
        );
        assert_eq!(
            ok(r#"TOTP username="a, b c", response=123456"#),
            pair("a, b c", "123456")
        );
    }

    #[test]
    fn missing_parts() {
        assert_eq!(err("TOTP response=\"123456\""), MissingUsername);
        assert_eq!(
            err("TOTP username=\"\", response=\"123456\""),
            MissingUsername
        );
        assert_eq!(err("TOTP username=, response=123456"), MissingUsername);
        assert_eq!(err("TOTP username=\"abc\""), MissingResponse);
        assert_eq!(err("TOTP username=\"abc\", response=\"\""), MissingResponse);
        assert_eq!(err("TOTP"), MissingUsername);
        assert_eq!(err("TOTP  , "), MissingUsername);
    }

    #[test]
    fn bad_responses() {
        for response in ["12345", "123456789", "12345a", " 123456", "１23456"] {
            let header = format!("TOTP username=\"abc\", response=\"{response}\"");
            assert_eq!(err(&header), BadResponse, "{header}");
        }
    }

    #[test]
    fn wrong_scheme_and_malformed() {
        assert_eq!(err("Basic dXNlcjpwYXNz"), WrongScheme);
        assert_eq!(
            err("Digest username=\"abc\", response=\"123456\""),
            WrongScheme
        );
        assert_eq!(err("TOTPX username=abc, response=123456"), WrongScheme);
        assert_eq!(err("TOTP,username=abc,response=123456"), WrongScheme);
        assert_eq!(err(""), Malformed);
        assert_eq!(err(" \t "), Malformed);
        assert_eq!(err("TOTP username"), Malformed);
        assert_eq!(err("TOTP username=\"abc"), Malformed);
        assert_eq!(err("TOTP username=\"abc\"x, response=123456"), Malformed);
        assert_eq!(err("TOTP username=a\"b, response=123456"), Malformed);
        assert_eq!(err("TOTP =abc, response=123456"), Malformed);
        assert_eq!(err("TOTP \"abc\""), Malformed);
        assert_eq!(parse(b"TOTP username=\xff"), Err(NotUtf8));
    }

    #[test]
    fn size_limit() {
        let base = "TOTP username=\"abc\", response=\"123456\", pad=\"\"";
        let fill = |n: usize| {
            let mut h = base.to_owned();
            h.insert_str(h.len() - 1, &"x".repeat(n - base.len()));
            h
        };
        assert_eq!(fill(MAX_HEADER_LEN).len(), MAX_HEADER_LEN);
        assert!(parse(fill(MAX_HEADER_LEN).as_bytes()).is_ok());
        assert_eq!(parse(fill(MAX_HEADER_LEN + 1).as_bytes()), Err(TooLong));
        assert_eq!(parse(&[0xff; MAX_HEADER_LEN + 1]), Err(TooLong));
    }

    #[test]
    fn round_trip() {
        for (u, r) in [
            ("abc", "123456"),
            ("a\"b\\c", "87654321"),
            ("x y, z=", "0000000"),
        ] {
            assert_eq!(ok(&format(u, r)), pair(u, r));
        }
    }

    #[test]
    fn debug_redacts_response() {
        let c = Credentials {
            username: "abc".into(),
            response: "424242".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("abc") && !shown.contains("424242"),
            "{shown}"
        );
    }

    #[test]
    fn never_panics() {
        // Every one- and two-byte tail after the scheme.
        for a in 0..=255u8 {
            let _ = parse(&[b'T', b'O', b'T', b'P', b' ', a]);
            for b in 0..=255u8 {
                let _ = parse(&[b'T', b'O', b'T', b'P', b' ', a, b]);
            }
        }
        // Random headers biased towards the grammar's own characters.
        let alphabet = b"TOPtop usernameresponse=\",\\\t 0123456789\xc3\xa9\xff\x00";
        let mut rng = StdRng::seed_from_u64(0x7a45);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..80);
            let mut h = b"TOTP ".to_vec();
            h.extend((0..len).map(|_| {
                if rng.gen_ratio(1, 8) {
                    rng.gen()
                } else {
                    alphabet[rng.gen_range(0..alphabet.len())]
                }
            }));
            let _ = parse(&h);
        }
    }
}
