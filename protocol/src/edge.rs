//! The cluster edge's header (issue 15.3): what a gateway writes first on a connection it
//! forwards to a label relay's edge port, so the relay knows who connected, through which
//! gateway port, for which label, and that a gateway of its install sent it.
//!
//! A PROXY protocol v2 header (haproxy `proxy-protocol.txt`; command PROXY, TCP4 or TCP6;
//! source = the connecting peer, destination = the gateway address and port it used) followed
//! by three TLVs of the application-specific range, in this order:
//! [`TLV_KIND`] (one byte, see [`EdgeKind`]), [`TLV_LABEL`] (ASCII, 1..=253 bytes) and
//! [`TLV_TOKEN`] (the label's gateway token, ASCII, 1..=128 bytes), then, on a
//! [`EdgeKind::SharedPort`] or [`EdgeKind::Direct`] header only, an optional fourth,
//! [`TLV_OFFER`] (one byte, 1). Nothing else is accepted.
//!
//! For a [`EdgeKind::Rendezvous`] connection the relay answers one byte, [`CLAIM`] or
//! [`NOT_MINE`], and after a claim the gateway picks it with [`COMMIT`].
//!
//! With [`TLV_OFFER`] (issue 16, several replicas per label) the gateway offers a client
//! before sending it: the relay answers one byte, [`SERVE`], [`WAIT`], [`LAST_RESORT`] or
//! [`REFUSE`], then waits (within its handshake timeout) for [`COMMIT`], after which the
//! ClientHello follows as without the TLV. A relay that predates the TLV refuses the header
//! (it closes without a byte); the gateway then sends it the header without the TLV, so a
//! rolling upgrade loses no client.
//!
//! Pure: [`EdgeHeader::encode`] and [`parse`]; the reader in the relay asks [`parse`] how many
//! bytes it needs ([`Parsed::Incomplete`]) and so never reads past the header.

use std::fmt;
use std::net::SocketAddr;

use crate::proxy_header::{v2_address_len, v2_read_addresses, v2_start, V2_PROXY, V2_SIGNATURE};

/// A relay's answer to a rendezvous header: it has a pending registration for this source and
/// port.
pub const CLAIM: u8 = 0x01;
/// A relay's answer to a rendezvous header: no pending registration of its own matches.
pub const NOT_MINE: u8 = 0x00;
/// The gateway's choice, sent to the one relay that claimed (or, after an offer, the one
/// replica picked): the stream is now its.
pub const COMMIT: u8 = 0x01;

/// A relay's answer to an offer: the label is open, the relay not draining, and a parked
/// connection is free now.
pub const SERVE: u8 = 0x01;
/// A relay's answer to an offer: not draining, but nothing parked: the client would queue.
pub const WAIT: u8 = 0x02;
/// A relay's answer to an offer: draining, but still holding parked connections.
pub const LAST_RESORT: u8 = 0x03;
/// A relay's answer to an offer: draining with nothing parked, or the label closed.
pub const REFUSE: u8 = 0x00;

/// TLV type of the kind (one byte: 1 SharedPort, 2 Direct, 3 Rendezvous).
pub const TLV_KIND: u8 = 0xE0;
/// TLV type of the LABEL.
pub const TLV_LABEL: u8 = 0xE1;
/// TLV type of the label's gateway token.
pub const TLV_TOKEN: u8 = 0xE2;
/// TLV type of the offer flag (one byte, 1): answer before the client is sent.
pub const TLV_OFFER: u8 = 0xE3;

/// Longest LABEL (a host name's limit).
pub const MAX_LABEL: usize = 253;
/// Longest gateway token (today's are 64 hex digits).
pub const MAX_TOKEN: usize = 128;

/// The fixed part of a v2 header: signature, version/command, family, length.
const FIXED: usize = 16;
/// The TLVs in the only order accepted; the last one ([`TLV_OFFER`]) is optional.
const TLVS: [u8; 4] = [TLV_KIND, TLV_LABEL, TLV_TOKEN, TLV_OFFER];
/// How many of [`TLVS`] every header has.
const REQUIRED_TLVS: usize = 3;

/// The longest header: the fixed part, TCP6 addresses, the four TLVs at their longest.
pub const MAX_HEADER: usize = FIXED + 36 + (3 + 1) + (3 + MAX_LABEL) + (3 + MAX_TOKEN) + (3 + 1);

/// Which gateway port the connection came through, so what the relay does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeKind {
    /// A client of the shared client port; its ClientHello follows.
    SharedPort,
    /// A client of a direct label on the HTTPS port; its ClientHello follows.
    Direct,
    /// A hidden server on a shared rendezvous port; the relay answers [`CLAIM`] or
    /// [`NOT_MINE`].
    Rendezvous,
}

impl EdgeKind {
    fn byte(self) -> u8 {
        match self {
            Self::SharedPort => 1,
            Self::Direct => 2,
            Self::Rendezvous => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::SharedPort),
            2 => Some(Self::Direct),
            3 => Some(Self::Rendezvous),
            _ => None,
        }
    }
}

/// One edge header. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct EdgeHeader {
    pub kind: EdgeKind,
    /// Who connected to the gateway (the phone, the hidden server).
    pub source: SocketAddr,
    /// The gateway address and port it connected to (for a rendezvous, the port T).
    pub destination: SocketAddr,
    pub label: String,
    pub token: String,
    /// [`TLV_OFFER`]: the relay answers before the client is sent (SharedPort and Direct
    /// only).
    pub offer: bool,
}

impl fmt::Debug for EdgeHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeHeader")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("label", &self.label)
            .field("token", &"<redacted>")
            .field("offer", &self.offer)
            .finish()
    }
}

impl EdgeHeader {
    /// The header's bytes. IPv4-mapped addresses are sent as IPv4 when both addresses can be
    /// (as [`crate::proxy_header::v2`] does), so [`parse`] gives them back as IPv4. A LABEL
    /// or token outside its limits (or not ASCII), or an offer on a rendezvous header, gives
    /// bytes [`parse`] refuses: the gateway derives them, so that is a bug there, and the
    /// relay says so.
    pub fn encode(&self) -> Vec<u8> {
        let label = self.label.as_bytes();
        let token = self.token.as_bytes();
        // Out-of-limit values are clamped to a length parse refuses, never wrapped.
        let label_len = label.len().min(usize::from(u16::MAX) / 4);
        let token_len = token.len().min(usize::from(u16::MAX) / 4);
        let offer: &[u8] = if self.offer { &[1] } else { &[] };
        let tlv_len = (3 + 1) + (3 + label_len) + (3 + token_len) + offer.len() * 4;
        let mut out = Vec::with_capacity(FIXED + 36 + tlv_len);
        v2_start(&mut out, self.source, self.destination, tlv_len as u16);
        let tlvs = [
            (TLV_KIND, &[self.kind.byte()][..]),
            (TLV_LABEL, &label[..label_len]),
            (TLV_TOKEN, &token[..token_len]),
            (TLV_OFFER, offer),
        ];
        let present = if self.offer { 4 } else { 3 };
        for &(kind, value) in &tlvs[..present] {
            out.push(kind);
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }
}

/// What [`parse`] made of the bytes so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes: `need` is how many the header needs in total so far (16 until its
    /// length is known, then all of it), always more than were given.
    Incomplete { need: usize },
    /// A valid header, the first `len` bytes; what follows belongs to the stream.
    Complete { header: EdgeHeader, len: usize },
}

/// Why a header is refused. Found on a prefix, the same error is found on any longer input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EdgeHeaderError {
    #[error("not a PROXY protocol v2 signature")]
    Signature,
    #[error("PROXY protocol version {0} (want 2)")]
    Version(u8),
    #[error("PROXY protocol command {0} (want 1, PROXY)")]
    Command(u8),
    #[error("address family and protocol {0:#04x} (want TCP4 or TCP6)")]
    Family(u8),
    #[error("a header of {0} bytes, more than {MAX_HEADER}")]
    TooLong(usize),
    #[error("a header length of {0} bytes leaves no room for the addresses")]
    TooShort(usize),
    #[error("a TLV runs past the end of the header")]
    TruncatedTlv,
    #[error("unknown TLV type {0:#04x}")]
    UnknownTlv(u8),
    #[error("TLV {0:#04x} given twice")]
    DuplicateTlv(u8),
    #[error("TLV {0:#04x} out of order")]
    OutOfOrderTlv(u8),
    #[error("TLV {0:#04x} missing")]
    MissingTlv(u8),
    #[error("the kind TLV is not one byte of 1, 2 or 3")]
    Kind,
    #[error("the LABEL is not 1..={MAX_LABEL} printable ASCII bytes")]
    Label,
    #[error("the token is not 1..={MAX_TOKEN} printable ASCII bytes")]
    Token,
    #[error("the offer TLV is not one byte of 1 on a shared-port or direct header")]
    Offer,
}

/// Reads one edge header from the start of `buf` (bytes past it are ignored).
pub fn parse(buf: &[u8]) -> Result<Parsed, EdgeHeaderError> {
    // Each fixed field is checked as soon as it has arrived, so garbage is refused early and
    // an error found on a prefix is the one found on the whole.
    let signature = &buf[..buf.len().min(V2_SIGNATURE.len())];
    if signature != &V2_SIGNATURE[..signature.len()] {
        return Err(EdgeHeaderError::Signature);
    }
    if let Some(&vc) = buf.get(12) {
        if vc >> 4 != V2_PROXY >> 4 {
            return Err(EdgeHeaderError::Version(vc >> 4));
        }
        if vc & 0x0f != V2_PROXY & 0x0f {
            return Err(EdgeHeaderError::Command(vc & 0x0f));
        }
    }
    let address_len = match buf.get(13) {
        Some(&family) => v2_address_len(family).ok_or(EdgeHeaderError::Family(family))?,
        None => return Ok(Parsed::Incomplete { need: FIXED }),
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Incomplete { need: FIXED });
    };
    let length = usize::from(u16::from_be_bytes([hi, lo]));
    let total = FIXED + length;
    if total > MAX_HEADER {
        return Err(EdgeHeaderError::TooLong(total));
    }
    if length < address_len {
        return Err(EdgeHeaderError::TooShort(length));
    }
    let Some(body) = buf.get(FIXED..total) else {
        return Ok(Parsed::Incomplete { need: total });
    };
    let (source, destination) =
        v2_read_addresses(buf[13], body).ok_or(EdgeHeaderError::TooShort(length))?;
    let ([kind, label, token], offer) = tlvs(&body[address_len..])?;
    let kind = match kind {
        [b] => EdgeKind::from_byte(*b).ok_or(EdgeHeaderError::Kind)?,
        _ => return Err(EdgeHeaderError::Kind),
    };
    let label = text(label, MAX_LABEL).ok_or(EdgeHeaderError::Label)?;
    let token = text(token, MAX_TOKEN).ok_or(EdgeHeaderError::Token)?;
    let offer = match offer {
        None => false,
        Some([1]) if kind != EdgeKind::Rendezvous => true,
        Some(_) => return Err(EdgeHeaderError::Offer),
    };
    Ok(Parsed::Complete {
        header: EdgeHeader {
            kind,
            source,
            destination,
            label,
            token,
            offer,
        },
        len: total,
    })
}

/// The values of the three required TLVs and of the optional fourth: exactly [`TLVS`] (the
/// last one or not) in order.
type TlvValues<'a> = ([&'a [u8]; 3], Option<&'a [u8]>);

fn tlvs(mut rest: &[u8]) -> Result<TlvValues<'_>, EdgeHeaderError> {
    let mut values: [&[u8]; 4] = [&[]; 4];
    let mut next = 0;
    while !rest.is_empty() {
        let [kind, hi, lo, ..] = *rest else {
            return Err(EdgeHeaderError::TruncatedTlv);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let value = rest.get(3..3 + len).ok_or(EdgeHeaderError::TruncatedTlv)?;
        match TLVS.iter().position(|&t| t == kind) {
            None => return Err(EdgeHeaderError::UnknownTlv(kind)),
            Some(i) if i < next => return Err(EdgeHeaderError::DuplicateTlv(kind)),
            Some(i) if i > next => return Err(EdgeHeaderError::OutOfOrderTlv(kind)),
            Some(i) => values[i] = value,
        }
        next += 1;
        rest = &rest[3 + len..];
    }
    if next < REQUIRED_TLVS {
        return Err(EdgeHeaderError::MissingTlv(TLVS[next]));
    }
    let [kind, label, token, offer] = values;
    Ok((
        [kind, label, token],
        (next > REQUIRED_TLVS).then_some(offer),
    ))
}

/// 1..=max printable ASCII bytes (no spaces, no control characters: they reach the logs).
fn text(bytes: &[u8], max: usize) -> Option<String> {
    let ok = (1..=max).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(kind: EdgeKind) -> EdgeHeader {
        EdgeHeader {
            kind,
            source: sa("192.0.2.1:56324"),
            destination: sa("198.51.100.7:20001"),
            label: "home".into(),
            token: "0123abcd".into(),
            offer: false,
        }
    }

    fn complete(bytes: &[u8]) -> (EdgeHeader, usize) {
        match parse(bytes) {
            Ok(Parsed::Complete { header, len }) => (header, len),
            other => panic!("not complete: {other:?}"),
        }
    }

    /// A TLV's type and value.
    type Tlv<'a> = (u8, &'a [u8]);

    /// The header with its TLV section replaced by `tlvs` (and the length fixed).
    fn with_tlvs(tlvs: &[Tlv]) -> Vec<u8> {
        let mut out = crate::proxy_header::v2(sa("192.0.2.1:1"), sa("198.51.100.7:2"));
        for (t, v) in tlvs {
            out.push(*t);
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v);
        }
        let length = (out.len() - FIXED) as u16;
        out[14..16].copy_from_slice(&length.to_be_bytes());
        out
    }

    #[test]
    fn max_header_is_the_contracts_number() {
        assert_eq!(MAX_HEADER, 16 + 36 + 3 + 1 + 3 + 253 + 3 + 128 + 3 + 1);
        let longest = EdgeHeader {
            source: sa("[2001:db8::1]:1"),
            destination: sa("[2001:db8::2]:2"),
            label: "l".repeat(MAX_LABEL),
            token: "t".repeat(MAX_TOKEN),
            offer: true,
            ..header(EdgeKind::Direct)
        };
        let bytes = longest.encode();
        assert_eq!(bytes.len(), MAX_HEADER);
        assert_eq!(complete(&bytes), (longest, MAX_HEADER));
    }

    #[test]
    fn an_ipv4_header_is_laid_out_exactly_as_the_contract_says() {
        let bytes = header(EdgeKind::Rendezvous).encode();
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12 + 4 + 7 + 11]);
        want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7, 0xdc, 0x04, 0x4e, 0x21]);
        want.extend_from_slice(&[0xE0, 0, 1, 3]);
        want.extend_from_slice(&[0xE1, 0, 4]);
        want.extend_from_slice(b"home");
        want.extend_from_slice(&[0xE2, 0, 8]);
        want.extend_from_slice(b"0123abcd");
        assert_eq!(bytes, want);
    }

    #[test]
    fn each_kind_round_trips_and_bytes_after_the_header_are_left_alone() {
        for kind in [EdgeKind::SharedPort, EdgeKind::Direct, EdgeKind::Rendezvous] {
            let h = header(kind);
            let mut bytes = h.encode();
            let len = bytes.len();
            bytes.extend_from_slice(b"\x16\x03\x01 the ClientHello");
            assert_eq!(complete(&bytes), (h, len));
        }
    }

    #[test]
    fn mapped_and_mixed_addresses_come_back_canonical() {
        let mapped = |s: &str, port| {
            SocketAddr::new(
                IpAddr::V6(s.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped()),
                port,
            )
        };
        let h = EdgeHeader {
            source: mapped("192.0.2.1", 7),
            destination: sa("198.51.100.7:443"),
            ..header(EdgeKind::SharedPort)
        };
        let (back, _) = complete(&h.encode());
        assert_eq!(back.source, sa("192.0.2.1:7"));
        assert_eq!(back.destination, sa("198.51.100.7:443"));
        let h = EdgeHeader {
            source: sa("192.0.2.1:7"),
            destination: sa("[2001:db8::2]:443"),
            ..header(EdgeKind::SharedPort)
        };
        let bytes = h.encode();
        assert_eq!(bytes[13], 0x21);
        assert_eq!(complete(&bytes).0, h);
    }

    #[test]
    fn need_is_sixteen_then_the_whole_header() {
        let bytes = header(EdgeKind::Direct).encode();
        assert_eq!(parse(&[]), Ok(Parsed::Incomplete { need: 16 }));
        assert_eq!(parse(&bytes[..15]), Ok(Parsed::Incomplete { need: 16 }));
        let need = bytes.len();
        assert_eq!(parse(&bytes[..16]), Ok(Parsed::Incomplete { need }));
        assert_eq!(parse(&bytes[..need - 1]), Ok(Parsed::Incomplete { need }));
    }

    #[test]
    fn wrong_fixed_fields_are_refused_as_soon_as_they_arrive() {
        let good = header(EdgeKind::Direct).encode();
        let mut bad = good.clone();
        bad[0] = b'G';
        assert_eq!(parse(&bad[..1]), Err(EdgeHeaderError::Signature));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(EdgeHeaderError::Signature)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            Err(EdgeHeaderError::Signature)
        );
        let mut bad = good.clone();
        bad[12] = 0x11;
        assert_eq!(parse(&bad[..13]), Err(EdgeHeaderError::Version(1)));
        bad[12] = 0x20; // LOCAL
        assert_eq!(parse(&bad), Err(EdgeHeaderError::Command(0)));
        bad[12] = 0x22;
        assert_eq!(parse(&bad), Err(EdgeHeaderError::Command(2)));
        for family in [0x00, 0x12, 0x22, 0x31, 0x32] {
            let mut bad = good.clone();
            bad[13] = family;
            assert_eq!(parse(&bad[..14]), Err(EdgeHeaderError::Family(family)));
        }
    }

    #[test]
    fn lengths_beyond_max_header_or_short_of_the_addresses_are_refused() {
        let mut bad = header(EdgeKind::Direct).encode();
        let over = (MAX_HEADER - FIXED + 1) as u16;
        bad[14..16].copy_from_slice(&over.to_be_bytes());
        assert_eq!(
            parse(&bad[..16]),
            Err(EdgeHeaderError::TooLong(MAX_HEADER + 1))
        );
        bad[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(parse(&bad), Err(EdgeHeaderError::TooLong(_))));
        bad[14..16].copy_from_slice(&11u16.to_be_bytes());
        assert_eq!(parse(&bad), Err(EdgeHeaderError::TooShort(11)));
    }

    #[test]
    fn the_tlvs_must_be_exactly_kind_label_token_in_order() {
        use EdgeHeaderError::*;
        let (k, l, t): (&[u8], &[u8], &[u8]) = (&[1], b"home", b"tok");
        assert!(parse(&with_tlvs(&[(0xE0, k), (0xE1, l), (0xE2, t)])).is_ok());
        let cases: [(&[Tlv], EdgeHeaderError); 9] = [
            (&[], MissingTlv(0xE0)),
            (&[(0xE0, k), (0xE1, l)], MissingTlv(0xE2)),
            (
                &[(0xE0, k), (0xE1, l), (0xE2, t), (0xE4, t)],
                UnknownTlv(0xE4),
            ),
            (&[(0x04, b"\0\0\0\0"), (0xE0, k)], UnknownTlv(0x04)),
            (
                &[(0xE0, k), (0xE0, k), (0xE1, l), (0xE2, t)],
                DuplicateTlv(0xE0),
            ),
            (
                &[(0xE0, k), (0xE1, l), (0xE2, t), (0xE2, t)],
                DuplicateTlv(0xE2),
            ),
            (&[(0xE1, l), (0xE0, k), (0xE2, t)], OutOfOrderTlv(0xE1)),
            (&[(0xE0, k), (0xE2, t), (0xE1, l)], OutOfOrderTlv(0xE2)),
            (
                &[(0xE0, k), (0xE1, l), (0xE2, t), (0xE0, k)],
                DuplicateTlv(0xE0),
            ),
        ];
        for (tlvs, err) in cases {
            assert_eq!(parse(&with_tlvs(tlvs)), Err(err), "{tlvs:?}");
        }
        // A TLV whose length runs past the header, and a stray byte or two at its end.
        let mut bad = with_tlvs(&[(0xE0, k), (0xE1, l), (0xE2, t)]);
        let n = bad.len();
        bad[n - 4] = 9;
        assert_eq!(parse(&bad), Err(TruncatedTlv));
        for stray in [&[0xE3][..], &[0xE3, 0]] {
            let mut bad = with_tlvs(&[(0xE0, k), (0xE1, l), (0xE2, t)]);
            bad.extend_from_slice(stray);
            let length = (bad.len() - FIXED) as u16;
            bad[14..16].copy_from_slice(&length.to_be_bytes());
            assert_eq!(parse(&bad), Err(TruncatedTlv));
        }
    }

    #[test]
    fn an_offer_is_an_optional_fourth_tlv_of_one_byte_1_on_client_headers_only() {
        use EdgeHeaderError::*;
        let (l, t): (&[u8], &[u8]) = (b"home", b"tok");
        for kind in [1u8, 2] {
            let bytes = with_tlvs(&[(0xE0, &[kind]), (0xE1, l), (0xE2, t), (0xE3, &[1])]);
            assert!(complete(&bytes).0.offer);
            // An old gateway's header (no offer) still parses, as no offer.
            let old = with_tlvs(&[(0xE0, &[kind]), (0xE1, l), (0xE2, t)]);
            assert!(!complete(&old).0.offer);
        }
        let cases: [(&[Tlv], EdgeHeaderError); 6] = [
            (&[(0xE0, &[3]), (0xE1, l), (0xE2, t), (0xE3, &[1])], Offer),
            (&[(0xE0, &[1]), (0xE1, l), (0xE2, t), (0xE3, &[0])], Offer),
            (&[(0xE0, &[1]), (0xE1, l), (0xE2, t), (0xE3, &[])], Offer),
            (
                &[(0xE0, &[1]), (0xE1, l), (0xE2, t), (0xE3, &[1, 1])],
                Offer,
            ),
            (
                &[(0xE0, &[1]), (0xE1, l), (0xE3, &[1]), (0xE2, t)],
                OutOfOrderTlv(0xE3),
            ),
            (
                &[
                    (0xE0, &[1]),
                    (0xE1, l),
                    (0xE2, t),
                    (0xE3, &[1]),
                    (0xE3, &[1]),
                ],
                DuplicateTlv(0xE3),
            ),
        ];
        for (tlvs, err) in cases {
            assert_eq!(parse(&with_tlvs(tlvs)), Err(err), "{tlvs:?}");
        }
        // The exact bytes: the three TLVs as before, then E3 00 01 01.
        let h = EdgeHeader {
            offer: true,
            ..header(EdgeKind::SharedPort)
        };
        let mut plain = EdgeHeader {
            offer: false,
            ..h.clone()
        }
        .encode();
        plain.extend_from_slice(&[0xE3, 0, 1, 1]);
        let length = (plain.len() - FIXED) as u16;
        plain[14..16].copy_from_slice(&length.to_be_bytes());
        assert_eq!(h.encode(), plain);
    }

    #[test]
    fn bad_kinds_labels_and_tokens_are_refused() {
        use EdgeHeaderError::*;
        let ok_l: &[u8] = b"home";
        let ok_t: &[u8] = b"tok";
        let long_l = vec![b'a'; MAX_LABEL + 1];
        let long_t = vec![b'a'; MAX_TOKEN + 1];
        let cases: [([&[u8]; 3], EdgeHeaderError); 10] = [
            ([&[0], ok_l, ok_t], Kind),
            ([&[4], ok_l, ok_t], Kind),
            ([&[], ok_l, ok_t], Kind),
            ([&[1, 1], ok_l, ok_t], Kind),
            ([&[1], b"", ok_t], Label),
            ([&[1], b"h\xc3\xa9", ok_t], Label),
            ([&[1], b"ho me", ok_t], Label),
            ([&[1], ok_l, b""], Token),
            ([&[1], ok_l, b"t\n"], Token),
            ([&[1], ok_l, &long_t], Token),
        ];
        for ([k, l, t], err) in cases {
            assert_eq!(
                parse(&with_tlvs(&[(0xE0, k), (0xE1, l), (0xE2, t)])),
                Err(err)
            );
        }
        // One byte too long a LABEL, the header still within MAX_HEADER; both too long
        // make the header too long, which is found first.
        let bad = with_tlvs(&[(0xE0, &[1]), (0xE1, &long_l), (0xE2, ok_t)]);
        assert_eq!(parse(&bad), Err(Label));
        let bad = EdgeHeader {
            source: sa("[2001:db8::1]:1"),
            destination: sa("[2001:db8::2]:2"),
            label: String::from_utf8(long_l).unwrap(),
            token: String::from_utf8(long_t).unwrap(),
            offer: true,
            ..header(EdgeKind::Direct)
        };
        assert_eq!(parse(&bad.encode()), Err(TooLong(MAX_HEADER + 2)));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let h = EdgeHeader {
            token: "s3cr3t-token".into(),
            ..header(EdgeKind::SharedPort)
        };
        let shown = format!("{h:?}");
        assert!(!shown.contains("s3cr3t"));
        assert!(shown.contains("home"));
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            any::<([u8; 4], u16)>()
                .prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)),
            any::<([u8; 16], u16)>().prop_map(|(ip, p)| {
                SocketAddr::new(IpAddr::from(Ipv6Addr::from(ip)).to_canonical(), p)
            }),
        ]
    }

    fn any_header() -> impl Strategy<Value = EdgeHeader> {
        (
            prop_oneof![
                Just(EdgeKind::SharedPort),
                Just(EdgeKind::Direct),
                Just(EdgeKind::Rendezvous)
            ],
            any_addr(),
            any_addr(),
            "[!-~]{1,253}",
            "[!-~]{1,128}",
            any::<bool>(),
        )
            .prop_map(
                |(kind, source, destination, label, token, offer)| EdgeHeader {
                    kind,
                    source,
                    destination,
                    label,
                    token,
                    // Only client headers carry an offer.
                    offer: offer && kind != EdgeKind::Rendezvous,
                },
            )
    }

    proptest! {
        #[test]
        fn encode_then_parse_gives_the_header_back(h in any_header(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut bytes = h.encode();
            let len = bytes.len();
            prop_assert!(len <= MAX_HEADER);
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(parse(&bytes), Ok(Parsed::Complete { header: h, len }));
        }

        #[test]
        fn every_prefix_of_a_header_is_incomplete_with_the_right_need(h in any_header()) {
            let bytes = h.encode();
            for cut in 0..bytes.len() {
                let need = if cut < FIXED { FIXED } else { bytes.len() };
                prop_assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete { need }));
            }
        }

        #[test]
        fn any_bytes_give_a_decision_that_longer_input_keeps(bytes in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..600) {
            let whole = parse(&bytes);
            let prefix = parse(&bytes[..cut.min(bytes.len())]);
            match &prefix {
                Ok(Parsed::Incomplete { need }) => prop_assert!(*need > cut.min(bytes.len()) && *need <= MAX_HEADER),
                _ => prop_assert_eq!(&prefix, &whole),
            }
            if let Ok(Parsed::Complete { len, .. }) = whole {
                prop_assert!(len <= MAX_HEADER && len <= bytes.len());
            }
        }

        #[test]
        fn bytes_after_a_valid_prefix_never_panic(h in any_header(), noise in proptest::collection::vec(any::<u8>(), 0..600), at in 0usize..600) {
            let mut bytes = h.encode();
            let at = at.min(bytes.len());
            bytes.truncate(at);
            bytes.extend_from_slice(&noise);
            let _ = parse(&bytes);
        }
    }
}
