//! Property-based harness for `taas_relay::authorization::parse` (the `Authorization: TOTP …`
//! header of every registration): it never panics on any bytes, reads back every header
//! `format` writes, accepts every reordering, spacing and quoting the original registrar
//! accepted, and refuses anything over `MAX_HEADER_LEN` before parsing.
//!
//! Cases per property: 2,000 (`TAAS_PROP_CASES=N` for a long run; `TAAS_PROP_SEED=S` for
//! another seed). See docs/robustness.md.

use taas_testkit::property;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use taas_relay::authorization::{format, parse, AuthorizationError, MAX_HEADER_LEN};

fn cases() -> u32 {
    property::cases(property::CASES_ENV, 2_000)
}

/// Bytes biased towards the grammar: scheme, names, quotes, escapes, separators, digits, and
/// some arbitrary bytes (invalid UTF-8 included).
fn grammar_bytes() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"TOTP",
        b"totp",
        b" ",
        b"\t",
        b",",
        b"=",
        b"\"",
        b"\\",
        b"username",
        b"response",
        b"Username",
        b"RESPONSE",
        b"realm",
        b"123456",
        b"1234567",
        b"12345678",
        b"0",
        b"abc",
        b"\xc3\xa9",
        b"\xff",
        b"\x00",
        b"\r\n",
        b"\\\"",
        b"\"\"",
    ];
    let piece = prop_oneof![
        4 => proptest::sample::select(pieces).prop_map(|p| p.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|parts| parts.concat())
}

/// Whatever is accepted is well-formed: a non-empty username and a 6–8 digit response.
fn accepted_is_well_formed(header: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(c) = parse(header) {
        prop_assert!(header.len() <= MAX_HEADER_LEN);
        prop_assert!(!c.username.is_empty());
        prop_assert!((6..=8).contains(&c.response.len()));
        prop_assert!(c.response.bytes().all(|b| b.is_ascii_digit()));
    }
    Ok(())
}

#[test]
fn never_panics_on_arbitrary_bytes() {
    property::check(
        "authorization/arbitrary-bytes",
        cases(),
        proptest::collection::vec(any::<u8>(), 0..1_300),
        |bytes| accepted_is_well_formed(&bytes),
    );
}

#[test]
fn never_panics_on_grammar_like_bytes() {
    property::check(
        "authorization/grammar-bytes",
        cases(),
        (
            proptest::sample::select(vec!["TOTP ", "totp\t", "Totp  ", "TOTP", " TOTP ", ""]),
            grammar_bytes(),
        ),
        |(scheme, rest)| {
            let mut header = scheme.as_bytes().to_vec();
            header.extend_from_slice(&rest);
            accepted_is_well_formed(&header)
        },
    );
}

fn response() -> impl Strategy<Value = String> {
    text_of(('0'..='9').collect(), 6..9)
}

#[test]
fn reads_back_whatever_format_writes() {
    property::check(
        "authorization/format-round-trip",
        cases(),
        (
            any::<String>().prop_filter("non-empty", |u| !u.is_empty()),
            response(),
        ),
        |(username, response)| {
            let header = format(&username, &response);
            let parsed = parse(header.as_bytes());
            if header.len() > MAX_HEADER_LEN {
                prop_assert_eq!(parsed, Err(AuthorizationError::TooLong));
            } else {
                let c = parsed.map_err(|e| TestCaseError::fail(format!("{header:?}: {e}")))?;
                prop_assert_eq!(c.username, username);
                prop_assert_eq!(c.response, response);
            }
            Ok(())
        },
    );
}

/// One `name=value` parameter as some client might write it.
#[derive(Clone, Debug)]
struct Param {
    name: String,
    value: String,
    quoted: bool,
    /// Backslash-escape every character of a quoted value, not only `"` and `\`.
    escape_all: bool,
    space_before_eq: &'static str,
    space_after_eq: &'static str,
}

impl Param {
    fn render(&self) -> String {
        let value = if self.quoted {
            let mut out = String::from("\"");
            for c in self.value.chars() {
                if self.escape_all || c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
            out
        } else {
            self.value.clone()
        };
        format!(
            "{}{}={}{}",
            self.name, self.space_before_eq, self.space_after_eq, value
        )
    }
}

/// Any mix of upper and lower case of `name`.
fn any_case(name: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// A string of `len` characters drawn from `alphabet` (cheaper than a regex strategy).
fn text_of(alphabet: Vec<char>, len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(alphabet), len)
        .prop_map(|chars| chars.into_iter().collect())
}

/// A value that may be written unquoted: no separator, no quote, not empty.
fn bare_value() -> impl Strategy<Value = String> {
    let alphabet = ('!'..='~').filter(|c| !matches!(c, '"' | ',')).collect();
    text_of(alphabet, 1..24)
}

/// A value written quoted: anything printable, quotes, backslashes, commas and spaces too.
fn quoted_value() -> impl Strategy<Value = String> {
    let alphabet = (' '..='~').chain(['\u{e9}', '\u{4e2d}', '\t']).collect();
    text_of(alphabet, 0..24)
}

fn param(
    name: impl Strategy<Value = String>,
    value_nonempty: bool,
) -> impl Strategy<Value = Param> {
    let spaces = || proptest::sample::select(vec!["", "", " ", "\t", "  "]);
    (
        name,
        any::<bool>(),
        bare_value(),
        quoted_value(),
        any::<bool>(),
        spaces(),
        spaces(),
    )
        .prop_map(
            move |(name, quoted, bare, quoted_text, escape_all, before, after)| {
                let value = if quoted && !(value_nonempty && quoted_text.is_empty()) {
                    quoted_text
                } else {
                    bare
                };
                let quoted = quoted || value.contains([',', ' ', '\t', '"']);
                Param {
                    name,
                    value,
                    quoted,
                    escape_all,
                    space_before_eq: before,
                    space_after_eq: after,
                }
            },
        )
}

/// An extra parameter: any name but `username`/`response`.
fn extra() -> impl Strategy<Value = Param> {
    let alphabet = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(['_', '-']);
    param(
        text_of(alphabet.collect(), 1..10).prop_filter("not a real name", |n| {
            !n.eq_ignore_ascii_case("username") && !n.eq_ignore_ascii_case("response")
        }),
        false,
    )
}

#[derive(Clone, Debug)]
struct Variant {
    header: String,
    username: String,
    response: String,
}

/// A header with the real username and response somewhere, in any order, after any number of
/// decoy values for the same names (the last one wins) and among unknown parameters, with
/// any separators, spacing, quoting and letter case.
fn variant() -> impl Strategy<Value = Variant> {
    let real_username = param(any_case("username"), true).prop_filter("no leading space", |p| {
        // A bare value never starts with a separator; a quoted one may hold anything.
        p.quoted || !p.value.is_empty()
    });
    let real_response = (param(any_case("response"), true), response()).prop_map(|(mut p, r)| {
        p.value = r;
        p
    });
    let decoys = proptest::collection::vec(
        prop_oneof![
            param(any_case("username"), false),
            param(any_case("response"), false)
        ],
        0..3,
    );
    let before = (decoys, proptest::collection::vec(extra(), 0..3))
        .prop_map(|(d, e)| [d, e].concat())
        .prop_shuffle();
    let after = (
        real_username,
        real_response,
        proptest::collection::vec(extra(), 0..3),
    )
        .prop_map(|(u, r, e)| [vec![u, r], e].concat())
        .prop_shuffle();
    let separators = proptest::collection::vec(
        proptest::sample::select(vec![",", " ", "\t", ", ", " , ", ",,", "\t,\t", ",  "]),
        16,
    );
    (
        proptest::sample::select(vec!["TOTP", "totp", "Totp", "tOtP"]),
        proptest::sample::select(vec![" ", "\t", "  ", " ,", "\t, "]),
        proptest::sample::select(vec!["", " ", "\t", " \t"]),
        proptest::sample::select(vec!["", " ", "\t", ",", ", ", " ,\t"]),
        before,
        after,
        separators,
    )
        .prop_map(|(scheme, first, lead, trail, before, after, seps)| {
            let params: Vec<Param> = before.into_iter().chain(after).collect();
            let real = |name: &str| {
                params
                    .iter()
                    .rev()
                    .find(|p| p.name.eq_ignore_ascii_case(name))
                    .unwrap()
                    .value
                    .clone()
            };
            let (username, response) = (real("username"), real("response"));
            let mut header = format!("{lead}{scheme}{first}");
            for (i, p) in params.iter().enumerate() {
                if i > 0 {
                    header.push_str(seps[i % seps.len()]);
                }
                header.push_str(&p.render());
            }
            header.push_str(trail);
            Variant {
                header,
                username,
                response,
            }
        })
}

#[test]
fn accepts_reordered_respaced_and_requoted_headers() {
    property::check(
        "authorization/variants",
        cases(),
        variant().prop_filter("within the size limit", |v| {
            v.header.len() <= MAX_HEADER_LEN
        }),
        |v| {
            let c = parse(v.header.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{:?}: {e}", v.header)))?;
            prop_assert_eq!(&c.username, &v.username, "{:?}", v.header);
            prop_assert_eq!(&c.response, &v.response, "{:?}", v.header);
            Ok(())
        },
    );
}

#[test]
fn refuses_over_long_headers_before_parsing() {
    property::check(
        "authorization/over-long",
        cases(),
        (
            variant(),
            proptest::collection::vec(any::<u8>(), 0..64),
            1usize..4_096,
        ),
        |(v, tail, extra)| {
            // A valid header padded past the limit (with a harmless parameter), and raw bytes.
            let mut padded = v.header.into_bytes();
            padded.extend_from_slice(b", pad=\"");
            let fill = (MAX_HEADER_LEN + extra).saturating_sub(padded.len() + 1);
            padded.extend(vec![b'x'; fill]);
            padded.push(b'"');
            prop_assert!(padded.len() > MAX_HEADER_LEN);
            prop_assert_eq!(parse(&padded), Err(AuthorizationError::TooLong));
            let mut raw = tail;
            raw.resize(MAX_HEADER_LEN + extra, b'7');
            prop_assert_eq!(parse(&raw), Err(AuthorizationError::TooLong));
            Ok(())
        },
    );
}

#[test]
#[ignore = "prints sample headers of the variant generator"]
fn show_variants() {
    let (mut runner, _) = property::runner("authorization/show", 10);
    for _ in 0..12 {
        let v = variant().new_tree(&mut runner).unwrap().current();
        eprintln!("{:?}\n   -> {:?} / {:?}", v.header, v.username, v.response);
    }
}
