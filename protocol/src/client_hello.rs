//! The server name (SNI, RFC 6066 `host_name`) of a TLS client's first flight, read without
//! decrypting or answering: the shared client port routes a connection to its label by this
//! name and then splices every byte, the ClientHello included, to the hidden server, so TLS
//! stays end to end and the relay never holds a label's key.
//!
//! The caller reads the client's first bytes into a buffer and calls [`peek`] after each read
//! until the answer is not [`Peek::NeedMore`]; at most [`MAX_CLIENT_HELLO`] bytes are looked
//! at. A ClientHello may be split over several TLS records (handshake fragmentation, used by
//! clients whose post-quantum key shares make the hello large), and the bytes may arrive in
//! any split. The answer depends only on the bytes up to the end of the ClientHello: once an
//! answer other than `NeedMore` is given, more bytes never change it.
//!
//! Not rustls' server-side `Acceptor`: the relay is no TLS server here, and the acceptor
//! decodes every extension (and refuses what rustls itself would not accept) where routing
//! needs one; the tests use it as an independent check of this reader.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::DnsName;

/// At most this many bytes are read before deciding (a ClientHello with many extensions,
/// post-quantum key shares, ... fits; larger is refused).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What the first bytes of a client connection say about its server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet: read more (up to MAX_CLIENT_HELLO) and call again.
    NeedMore,
    /// A ClientHello naming this host (lower-cased ASCII, no trailing dot).
    ServerName(String),
    /// A well-formed ClientHello without a server name (e.g. an IP-literal URL).
    NoServerName,
    /// Not a TLS ClientHello, or malformed, or larger than MAX_CLIENT_HELLO.
    NotClientHello(Reason),
}

/// Why bytes were refused; its [`Display`](fmt::Display) form is a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a TLS handshake record: plain HTTP, an SSLv2-compatible hello, anything else.
    NotTls,
    /// A TLS handshake, but its first message is not a ClientHello.
    NotClientHello,
    /// A ClientHello whose lengths or fields do not add up, or records that do.
    Malformed,
    /// The ClientHello does not end within [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
    /// The server name is not a host name (control characters, empty, over 253 bytes, a label
    /// over 63, ...).
    BadServerName,
    /// Two server name extensions, or two host names in one.
    DuplicateServerName,
}

impl Reason {
    /// Every reason, e.g. to register metric series up front.
    pub const ALL: [Reason; 6] = [
        Reason::NotTls,
        Reason::NotClientHello,
        Reason::Malformed,
        Reason::TooLarge,
        Reason::BadServerName,
        Reason::DuplicateServerName,
    ];

    /// The metrics label: lower case, `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotTls => "not_tls",
            Reason::NotClientHello => "not_client_hello",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too_large",
            Reason::BadServerName => "bad_server_name",
            Reason::DuplicateServerName => "duplicate_server_name",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS record content type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Record header: content type, version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake header: message type, length (3).
const HANDSHAKE_HEADER: usize = 4;
/// Largest record fragment a peer may send (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Extension type of `server_name` (RFC 6066 §3).
const SERVER_NAME: u16 = 0;
/// `NameType` of a DNS host name in the server name list.
const HOST_NAME: u8 = 0;

/// Reads the server name from the first bytes a TLS client sent (see the module docs).
/// Never panics; allocates at most the ClientHello's size (only when it spans several records)
/// and the returned name.
pub fn peek(bytes: &[u8]) -> Peek {
    let capped = &bytes[..bytes.len().min(MAX_CLIENT_HELLO)];
    match client_hello_message(capped) {
        Ok(message) => server_name(&message),
        Err(Peek::NeedMore) if bytes.len() >= MAX_CLIENT_HELLO => {
            Peek::NotClientHello(Reason::TooLarge)
        }
        Err(answer) => answer,
    }
}

/// The handshake fragments of the records at the start of `bytes`, in order; the last may be
/// the incomplete part of a record still arriving.
struct Fragments<'a> {
    rest: &'a [u8],
    first: bool,
}

impl<'a> Fragments<'a> {
    /// The next fragment, or why there is none: `NeedMore` when `bytes` end at a record's
    /// header, a refusal when the record is not a TLS handshake record.
    fn next_fragment(&mut self) -> Result<&'a [u8], Peek> {
        let rest = self.rest;
        // Refused as soon as the first wrong byte is seen, so plain HTTP ("GET /"), an SSLv2
        // hello (0x80 ...) or any other protocol is not waited for.
        let refusal = if self.first {
            Reason::NotTls
        } else {
            // Handshake messages must not be interleaved with other records (RFC 8446 §5.1).
            Reason::Malformed
        };
        match rest {
            [] => return Err(Peek::NeedMore),
            [content_type, ..] if *content_type != HANDSHAKE => {
                return Err(Peek::NotClientHello(refusal))
            }
            [_, major, ..] if *major != 3 => return Err(Peek::NotClientHello(refusal)),
            // Record versions 0x0301 (TLS 1.0, the usual one on a first ClientHello) to 0x0304.
            [_, _, minor, ..] if !(1..=4).contains(minor) => {
                return Err(Peek::NotClientHello(refusal))
            }
            _ => {}
        }
        let Some(header) = rest.get(..RECORD_HEADER) else {
            return Err(Peek::NeedMore);
        };
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_FRAGMENT {
            // Zero-length handshake fragments must not be sent (RFC 8446 §5.1).
            return Err(Peek::NotClientHello(Reason::Malformed));
        }
        let body = &rest[RECORD_HEADER..];
        if body.is_empty() {
            return Err(Peek::NeedMore);
        }
        let fragment = &body[..length.min(body.len())];
        self.rest = &body[fragment.len()..];
        self.first = false;
        Ok(fragment)
    }
}

/// The ClientHello handshake message (header included) once all of it has arrived, borrowed
/// when it lies in one record and joined otherwise.
fn client_hello_message(bytes: &[u8]) -> Result<Cow<'_, [u8]>, Peek> {
    let mut fragments = Fragments {
        rest: bytes,
        first: true,
    };
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut seen = 0usize;
    let mut first_fragment: &[u8] = &[];
    let total = loop {
        let fragment = fragments.next_fragment()?;
        if seen == 0 {
            first_fragment = fragment;
            if fragment[0] != CLIENT_HELLO {
                return Err(Peek::NotClientHello(Reason::NotClientHello));
            }
        }
        for (i, byte) in fragment.iter().enumerate() {
            match header.get_mut(seen + i) {
                Some(slot) => *slot = *byte,
                None => break,
            }
        }
        seen += fragment.len();
        if seen >= HANDSHAKE_HEADER {
            let total = HANDSHAKE_HEADER + u24(&header[1..]);
            // Each record adds its header: a message of this size cannot arrive in time.
            if total + RECORD_HEADER > MAX_CLIENT_HELLO {
                return Err(Peek::NotClientHello(Reason::TooLarge));
            }
            if seen >= total {
                break total;
            }
        }
        // A fragment cut short by the end of `bytes`: the rest of its record is still coming.
        if fragments.rest.is_empty() {
            return Err(Peek::NeedMore);
        }
    };
    if let Some(message) = first_fragment.get(..total) {
        return Ok(Cow::Borrowed(message));
    }
    // Several records: join exactly the message, whose bytes are all in `bytes`.
    let mut message = Vec::with_capacity(total);
    let mut fragments = Fragments {
        rest: bytes,
        first: true,
    };
    while message.len() < total {
        let fragment = fragments.next_fragment()?;
        let wanted = (total - message.len()).min(fragment.len());
        message.extend_from_slice(&fragment[..wanted]);
    }
    Ok(Cow::Owned(message))
}

fn u24(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(3)
        .fold(0, |acc, byte| (acc << 8) | usize::from(*byte))
}

/// A cursor over a complete message: every read is bounds-checked and `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The answer for a complete ClientHello message (handshake header included).
fn server_name(message: &[u8]) -> Peek {
    match server_name_field(message) {
        Err(reason) => Peek::NotClientHello(reason),
        Ok(None) => Peek::NoServerName,
        Ok(Some(name)) => host_name(name),
    }
}

/// The raw `host_name` of a ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), if it has one.
fn server_name_field(message: &[u8]) -> Result<Option<&[u8]>, Reason> {
    let malformed = Reason::Malformed;
    let mut hello = Reader(message.get(HANDSHAKE_HEADER..).ok_or(malformed)?);
    let legacy_version = hello.u16().ok_or(malformed)?;
    if legacy_version >> 8 != 3 {
        return Err(malformed);
    }
    hello.take(32).ok_or(malformed)?; // random
    let session_id = hello.vec8().ok_or(malformed)?;
    if session_id.len() > 32 {
        return Err(malformed);
    }
    let cipher_suites = hello.vec16().ok_or(malformed)?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(malformed);
    }
    if hello.vec8().ok_or(malformed)?.is_empty() {
        return Err(malformed); // compression methods: at least "null"
    }
    if hello.is_empty() {
        return Ok(None); // no extensions at all (TLS 1.0 and 1.1 allow it)
    }
    let mut extensions = Reader(hello.vec16().ok_or(malformed)?);
    if !hello.is_empty() {
        return Err(malformed);
    }
    let mut name = None;
    while !extensions.is_empty() {
        let kind = extensions.u16().ok_or(malformed)?;
        let data = extensions.vec16().ok_or(malformed)?;
        if kind != SERVER_NAME {
            continue;
        }
        if name.is_some() {
            return Err(Reason::DuplicateServerName);
        }
        name = Some(host_name_entry(data)?);
    }
    Ok(name.flatten())
}

/// The `host_name` entry of a `server_name` extension's list, if it has one (other name
/// types, none defined today, are skipped).
fn host_name_entry(data: &[u8]) -> Result<Option<&[u8]>, Reason> {
    let malformed = Reason::Malformed;
    let mut extension = Reader(data);
    let mut list = Reader(extension.vec16().ok_or(malformed)?);
    if !extension.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8().ok_or(malformed)?;
        let name = list.vec16().ok_or(malformed)?;
        if kind != HOST_NAME {
            continue;
        }
        if host.is_some() {
            // "MUST NOT contain more than one name of the same name_type".
            return Err(Reason::DuplicateServerName);
        }
        host = Some(name);
    }
    Ok(host)
}

/// Checks a `host_name` (ASCII, IDN A-labels as they are) and lower-cases it. An IP literal,
/// which RFC 6066 forbids there but some clients send, names no host.
fn host_name(raw: &[u8]) -> Peek {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Peek::NotClientHello(Reason::BadServerName);
    };
    if text.parse::<IpAddr>().is_ok() {
        return Peek::NoServerName;
    }
    match DnsName::try_from(text) {
        Ok(name) => Peek::ServerName(name.as_ref().to_ascii_lowercase()),
        Err(_) => Peek::NotClientHello(Reason::BadServerName),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2 ClientHello message with these extensions.
    fn message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    fn sni(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        data
    }

    fn record(message: &[u8]) -> Vec<u8> {
        let mut bytes = vec![HANDSHAKE, 3, 1];
        bytes.extend((message.len() as u16).to_be_bytes());
        bytes.extend(message);
        bytes
    }

    fn hello_for(name: &[u8]) -> Vec<u8> {
        record(&message(&[(SERVER_NAME, sni(&[(HOST_NAME, name)]))]))
    }

    #[test]
    fn a_name_comes_back_lower_cased_without_its_trailing_dot() {
        assert_eq!(
            peek(&hello_for(b"Phone.TAAS.example.com.")),
            Peek::ServerName("phone.taas.example.com".into())
        );
        assert_eq!(
            peek(&hello_for(b"xn--bcher-kva.example")),
            Peek::ServerName("xn--bcher-kva.example".into())
        );
    }

    #[test]
    fn names_that_are_not_host_names_are_refused() {
        let long_label = [b'a'; 64];
        let long_name = [b"a.".as_slice(); 127].concat();
        for bad in [
            b"".as_slice(),
            b".",
            b"a..b",
            b"bad\x00name",
            b"bad\nname",
            b"caf\xc3\xa9.example",
            b"\xff",
            b"-lead.example",
            &long_label,
            &long_name,
        ] {
            assert_eq!(
                peek(&hello_for(bad)),
                Peek::NotClientHello(Reason::BadServerName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_ip_literal_names_no_host() {
        assert_eq!(peek(&hello_for(b"192.0.2.1")), Peek::NoServerName);
        assert_eq!(peek(&hello_for(b"2001:db8::1")), Peek::NoServerName);
    }

    #[test]
    fn duplicate_server_names_are_refused() {
        let one = sni(&[(HOST_NAME, b"a.example")]);
        let twice = record(&message(&[(SERVER_NAME, one.clone()), (SERVER_NAME, one)]));
        assert_eq!(
            peek(&twice),
            Peek::NotClientHello(Reason::DuplicateServerName)
        );
        let two_names = hello_for_list(&[(HOST_NAME, b"a.example"), (HOST_NAME, b"b.example")]);
        assert_eq!(
            peek(&two_names),
            Peek::NotClientHello(Reason::DuplicateServerName)
        );
    }

    fn hello_for_list(names: &[(u8, &[u8])]) -> Vec<u8> {
        record(&message(&[(SERVER_NAME, sni(names))]))
    }

    #[test]
    fn other_name_types_are_skipped() {
        assert_eq!(
            peek(&hello_for_list(&[(7, b"x"), (HOST_NAME, b"a.example")])),
            Peek::ServerName("a.example".into())
        );
        assert_eq!(peek(&hello_for_list(&[(7, b"x")])), Peek::NoServerName);
    }

    #[test]
    fn a_hello_without_extensions_has_no_server_name() {
        let mut message = message(&[]);
        message.truncate(message.len() - 2); // drop the empty extensions block
        message[3] -= 2;
        assert_eq!(peek(&record(&message)), Peek::NoServerName);
    }

    #[test]
    fn other_protocols_are_refused_at_their_first_byte() {
        assert_eq!(peek(b"G"), Peek::NotClientHello(Reason::NotTls));
        assert_eq!(
            peek(b"GET / HTTP/1.1\r\n"),
            Peek::NotClientHello(Reason::NotTls)
        );
        // SSLv2-compatible ClientHello: two-byte length with the high bit, then type 1.
        assert_eq!(
            peek(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
            Peek::NotClientHello(Reason::NotTls)
        );
        assert_eq!(peek(&[22, 2]), Peek::NotClientHello(Reason::NotTls));
        assert_eq!(peek(&[22, 3, 0]), Peek::NotClientHello(Reason::NotTls));
        assert_eq!(peek(&[22, 3, 5]), Peek::NotClientHello(Reason::NotTls));
        assert_eq!(
            peek(&[22, 3, 1, 0, 10, 2]),
            Peek::NotClientHello(Reason::NotClientHello)
        );
    }

    #[test]
    fn nothing_or_a_partial_header_needs_more() {
        for bytes in [&[][..], &[22], &[22, 3], &[22, 3, 1, 0], &[22, 3, 1, 0, 10]] {
            assert_eq!(peek(bytes), Peek::NeedMore, "{bytes:?}");
        }
    }

    #[test]
    fn a_hello_too_large_to_arrive_in_time_is_refused_from_its_header() {
        let header = [22, 3, 1, 0x40, 0, CLIENT_HELLO, 0, 0x40, 0];
        assert_eq!(peek(&header), Peek::NotClientHello(Reason::TooLarge));
        // Endless one-byte records never finish a hello: refused at the limit.
        // (a 12 KiB message: it would fit in bigger records)
        let message = [CLIENT_HELLO, 0, 0x30, 0];
        let mut drip = Vec::new();
        for i in 0..MAX_CLIENT_HELLO / 6 + 1 {
            drip.extend([22, 3, 1, 0, 1, message.get(i).copied().unwrap_or(0)]);
        }
        assert_eq!(
            peek(&drip[..MAX_CLIENT_HELLO - 6]),
            Peek::NeedMore,
            "below the limit"
        );
        assert_eq!(peek(&drip), Peek::NotClientHello(Reason::TooLarge));
    }

    #[test]
    fn empty_or_oversized_records_are_malformed() {
        assert_eq!(
            peek(&[22, 3, 1, 0, 0]),
            Peek::NotClientHello(Reason::Malformed)
        );
        assert_eq!(
            peek(&[22, 3, 1, 0x40, 1]),
            Peek::NotClientHello(Reason::Malformed)
        );
    }

    #[test]
    fn a_hello_over_several_records_is_joined() {
        let message = message(&[(SERVER_NAME, sni(&[(HOST_NAME, b"a.example")]))]);
        let mut bytes = Vec::new();
        for chunk in message.chunks(3) {
            bytes.extend(record(chunk));
        }
        assert_eq!(peek(&bytes), Peek::ServerName("a.example".into()));
        // Another record type in between is refused.
        let cut = record(&message[..10]);
        let mut interleaved = cut.clone();
        interleaved.extend([23, 3, 3, 0, 1, 0]);
        assert_eq!(peek(&interleaved), Peek::NotClientHello(Reason::Malformed));
    }

    #[test]
    fn reasons_read_as_metric_labels() {
        let labels: Vec<String> = Reason::ALL.iter().map(Reason::to_string).collect();
        assert_eq!(
            labels,
            [
                "not_tls",
                "not_client_hello",
                "malformed",
                "too_large",
                "bad_server_name",
                "duplicate_server_name"
            ]
        );
    }
}
