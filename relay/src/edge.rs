//! A label relay's edge port (`label-relay --edge ADDR`, issue 15.3): in a cluster's edge
//! mode, the gateway takes every public connection and forwards it here, raw, after an edge
//! header (`taas_protocol::edge`) saying who connected, through which gateway port, for
//! which label, with the label's gateway token.
//!
//! ```text
//! accept ──(trusted networks, header-phase cap)──▶ read exactly one header (first byte
//!   within the first-byte timeout, all of it within the handshake timeout) ──▶ LABEL is
//!   ours, token verifies ──▶
//!     SharedPort / Direct: the label's `hand_over`, as a client of the shared port / a direct
//!       client from the header's source (its ClientHello follows in the stream); with the
//!       offer TLV, first one byte ([`offer_answer`]: SERVE, WAIT, LAST_RESORT or REFUSE) and
//!       the gateway's COMMIT within the handshake timeout (a gateway with several replicas
//!       of the label asks them in turn and commits to the best);
//!     Rendezvous: the header's destination port T ──(the external file's `ports:`)──▶ local
//!       one-shot ports ──▶ a pending registration for the source? CLAIM : NOT_MINE; after a
//!       CLAIM, COMMIT within the handshake timeout gives the stream to the registration (it
//!       is parked as if its own port had accepted it); anything else gives the claim up.
//! ```
//!
//! Refusals close the connection without a byte (but `NOT_MINE`, which is an answer) and are
//! counted in `taas_edge_refused{reason}`. The label's own ports keep working beside this.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use taas_protocol::edge::{self, EdgeHeader, EdgeKind, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{ExternalAddress, PortRange};
use crate::gateway_auth::GatewayToken;
use crate::label::{ClientConn, Entry};
use crate::metrics::{EdgeRefused, EdgeRendezvous, OfferAnswer};
use crate::relay::StandaloneBackend;
use crate::sources::SourceKey;

/// What the edge port checks a gateway by.
#[derive(Clone, Debug)]
pub struct EdgeAuth {
    /// The label's gateway token: every header must carry it.
    pub gateway_token: GatewayToken,
    /// When not empty, only peers in these networks may connect (`--trusted-proxies`).
    pub trusted: Vec<ipnet::IpNet>,
}

/// Whether `peer` may use the edge port at all.
pub fn trusted(networks: &[ipnet::IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    networks.is_empty() || networks.iter().any(|net| net.contains(&peer))
}

/// Whether a header is for this label and carries its token; which refusal otherwise.
/// `own_label` is the relay's label (compared case-insensitively).
pub fn authenticate(
    header: &EdgeHeader,
    own_label: &str,
    token: &GatewayToken,
) -> Result<(), EdgeRefused> {
    if !header.label.eq_ignore_ascii_case(own_label) {
        return Err(EdgeRefused::WrongLabel);
    }
    if !token.verify(header.token.as_bytes()) {
        return Err(EdgeRefused::BadToken);
    }
    Ok(())
}

/// What a relay answers a gateway offering it a client: serve it now when a parked connection
/// is free; while draining, take it only as a last resort (the parked connections it still
/// holds are given back soon), or refuse it with none; a closed label refuses.
pub fn offer_answer(label_open: bool, draining: bool, parked: usize) -> OfferAnswer {
    match (label_open, draining, parked > 0) {
        (false, _, _) => OfferAnswer::Refuse,
        (true, true, true) => OfferAnswer::LastResort,
        (true, true, false) => OfferAnswer::Refuse,
        (true, false, true) => OfferAnswer::Serve,
        (true, false, false) => OfferAnswer::Wait,
    }
}

/// The local one-shot ports (in `p_ports`) that reach the outside as port `t`: those the
/// external file maps to `t`, and `t` itself when it is one and is not mapped elsewhere.
pub fn local_ports(external: &ExternalAddress, p_ports: PortRange, t: u16) -> Vec<u16> {
    let mut ports: Vec<u16> = external
        .ports
        .iter()
        .filter(|(local, outside)| **outside == t && p_ports.contains(**local))
        .map(|(local, _)| *local)
        .collect();
    if p_ports.contains(t) && !external.ports.contains_key(&t) && !ports.contains(&t) {
        ports.push(t);
    }
    ports
}

/// Serves the edge port until the task is dropped. `label` is this relay's label.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<StandaloneBackend>,
    label: String,
    auth: EdgeAuth,
) {
    let auth = Arc::new(auth);
    // As configured: the map's key. Headers are compared with it case-insensitively.
    let label: Arc<str> = label.into();
    // Connections still reading their header (or waiting for COMMIT) are bounded, as the
    // shared port bounds those reading a ClientHello.
    let header_phase = Arc::new(Semaphore::new(
        relay
            .settings()
            .limits
            .frontend_connections
            .min(Semaphore::MAX_PERMITS),
    ));
    // Clients are relayed from here: a relayed connection's options, set once (as on q).
    crate::splice::tune_listener(&listener);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if !trusted(&auth.trusted, peer.ip()) {
                    relay.metrics().edge_refused(EdgeRefused::Untrusted);
                    tracing::debug!(%peer, "edge port: peer outside the trusted networks; closed");
                    continue;
                }
                let Ok(permit) = header_phase.clone().try_acquire_owned() else {
                    relay.metrics().edge_refused(EdgeRefused::Overloaded);
                    tracing::debug!(%peer, "edge port: too many connections reading their header; closed");
                    continue;
                };
                tokio::spawn(route(
                    relay.clone(),
                    label.clone(),
                    auth.clone(),
                    stream,
                    peer,
                    permit,
                ));
            }
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                tracing::warn!(%error, "edge port accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one connection's header and acts on it, or refuses it.
async fn route(
    relay: Arc<StandaloneBackend>,
    own_label: Arc<str>,
    auth: Arc<EdgeAuth>,
    mut stream: TcpStream,
    peer: SocketAddr,
    header_phase: OwnedSemaphorePermit,
) {
    let refuse = |reason: EdgeRefused| {
        relay.metrics().edge_refused(reason);
        tracing::debug!(%peer, ?reason, "edge port: connection refused");
    };
    let timeouts = &relay.settings().timeouts;
    let accepted_at = Instant::now();
    let deadlines = (
        accepted_at + timeouts.first_byte,
        accepted_at + timeouts.handshake,
    );
    let header = match read_header(&mut stream, deadlines).await {
        Ok(header) => header,
        Err(reason) => return refuse(reason),
    };
    if let Err(reason) = authenticate(&header, &own_label, &auth.gateway_token) {
        return refuse(reason);
    }
    let Some(label) = relay.label(&own_label) else {
        // The label was removed (its spec failed to apply): nothing to serve.
        return refuse(EdgeRefused::WrongLabel);
    };
    relay.metrics().edge_connection(header.kind);
    let entry = match header.kind {
        EdgeKind::SharedPort => Entry::SharedPort,
        EdgeKind::Direct => Entry::Direct,
        EdgeKind::Rendezvous => {
            let commit_by = Instant::now() + timeouts.handshake;
            let result = rendezvous(&relay, &label, stream, &header, commit_by).await;
            relay.metrics().edge_rendezvous(result);
            tracing::debug!(%peer, source = %header.source, t = header.destination.port(), ?result, "edge port: rendezvous");
            drop(header_phase);
            return;
        }
    };
    if header.offer {
        let answer = offer_answer(!label.is_closed(), relay.is_draining(), label.parked());
        relay.metrics().edge_offer(answer);
        let commit_by = Instant::now() + timeouts.handshake;
        if let Err(reason) = offered(&mut stream, answer, commit_by).await {
            return refuse(reason);
        }
    }
    drop(header_phase);
    // As the shared port does: its clients cannot name a label whose server speaks first.
    if entry == Entry::SharedPort && label.config().server_speaks_first {
        return refuse(EdgeRefused::ServerSpeaksFirst);
    }
    let limits = &relay.settings().limits;
    let Some(relay_slot) = relay
        .client_sources()
        .try_acquire_owned(SourceKey::of(header.source.ip()), limits.clients_per_source)
    else {
        return refuse(EdgeRefused::SourceLimit);
    };
    let client = ClientConn {
        stream,
        peer: header.source,
        entry,
        // The ClientHello follows the header in the stream: nothing was read past it.
        read_ahead: Vec::new(),
        relay_slot: Some(relay_slot),
    };
    // A PROXY header tells the hidden server the gateway port the client used, as it would
    // tell it the relay's own port.
    label.hand_over_as(client, Some(header.destination));
}

/// Answers an offer; `Ok` once the gateway has committed the client to this relay (the
/// ClientHello follows).
async fn offered(
    stream: &mut TcpStream,
    answer: OfferAnswer,
    commit_by: Instant,
) -> Result<(), EdgeRefused> {
    let written = tokio::time::timeout_at(commit_by, stream.write_all(&[answer.byte()])).await;
    if answer == OfferAnswer::Refuse {
        return Err(EdgeRefused::OfferRefused);
    }
    if !matches!(written, Ok(Ok(()))) {
        return Err(EdgeRefused::OfferNotCommitted);
    }
    let mut commit = [0u8; 1];
    match tokio::time::timeout_at(commit_by, stream.read_exact(&mut commit)).await {
        Ok(Ok(_)) if commit[0] == edge::COMMIT => Ok(()),
        _ => Err(EdgeRefused::OfferNotCommitted),
    }
}

/// How long a rendezvous header waits for a matching registration claimed by another edge
/// connection (`Label::claim_rendezvous_within`).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers a rendezvous header: claims a pending registration (or says `NOT_MINE`), then on
/// `COMMIT` by `commit_by` hands it the stream.
async fn rendezvous(
    relay: &StandaloneBackend,
    label: &Arc<crate::label::Label>,
    mut stream: TcpStream,
    header: &EdgeHeader,
    commit_by: Instant,
) -> EdgeRendezvous {
    let locals = local_ports(
        &relay.external(),
        relay.settings().p_ports,
        header.destination.port(),
    );
    // Within half the gateway's claim deadline (2 s) when another edge connection holds the
    // matching registration's claim: the answer still reaches the gateway in time.
    let wait_until = commit_by.min(Instant::now() + CLAIM_WAIT);
    let claimed = label.claim_rendezvous_within(&locals, header.source.ip(), wait_until);
    let Some(claim) = claimed.await else {
        // The answer is all the gateway needs; a failed write changes nothing.
        let _ = tokio::time::timeout_at(commit_by, stream.write_all(&[edge::NOT_MINE])).await;
        return EdgeRendezvous::NotMine;
    };
    let claimed = tokio::time::timeout_at(commit_by, stream.write_all(&[edge::CLAIM])).await;
    if !matches!(claimed, Ok(Ok(()))) {
        return EdgeRendezvous::NotCommitted; // the claim is given up as it drops
    }
    let mut answer = [0u8; 1];
    match tokio::time::timeout_at(commit_by, stream.read_exact(&mut answer)).await {
        Ok(Ok(_)) if answer[0] == edge::COMMIT => {
            if claim.commit(stream) {
                EdgeRendezvous::Committed
            } else {
                EdgeRendezvous::Lost
            }
        }
        _ => EdgeRendezvous::NotCommitted,
    }
}

/// Reads exactly one edge header: its first byte by `deadlines.0`, all of it by
/// `deadlines.1`; never a byte past it.
async fn read_header(
    stream: &mut TcpStream,
    deadlines: (Instant, Instant),
) -> Result<EdgeHeader, EdgeRefused> {
    let mut buf = [0u8; edge::MAX_HEADER];
    let mut len = 0;
    loop {
        let need = match edge::parse(&buf[..len]) {
            Ok(Parsed::Complete { header, .. }) => return Ok(header),
            Ok(Parsed::Incomplete { need }) => need,
            Err(error) => {
                tracing::debug!(%error, "edge port: not an edge header");
                return Err(EdgeRefused::BadHeader);
            }
        };
        // `need` is at most MAX_HEADER (parse refuses longer) and more than `len`.
        let Some(room) = buf.get_mut(len..need) else {
            return Err(EdgeRefused::BadHeader);
        };
        let (deadline, late) = if len == 0 {
            (deadlines.0, EdgeRefused::Silent)
        } else {
            (deadlines.1, EdgeRefused::Deadline)
        };
        match tokio::time::timeout_at(deadline, stream.read(room)).await {
            Err(_) => return Err(late),
            Ok(Ok(0)) => return Err(EdgeRefused::Closed),
            Ok(Ok(n)) => len += n,
            Ok(Err(_)) => return Err(EdgeRefused::ReadError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn header(label: &str, token: &str) -> EdgeHeader {
        EdgeHeader {
            kind: EdgeKind::SharedPort,
            source: "192.0.2.1:5000".parse().unwrap(),
            destination: "198.51.100.7:9443".parse().unwrap(),
            label: label.into(),
            token: token.into(),
            offer: false,
        }
    }

    #[test]
    fn an_offer_is_served_now_only_by_an_open_relay_with_a_parked_connection() {
        use OfferAnswer::*;
        assert_eq!(offer_answer(true, false, 3), Serve);
        assert_eq!(offer_answer(true, false, 0), Wait);
        assert_eq!(offer_answer(true, true, 1), LastResort);
        assert_eq!(offer_answer(true, true, 0), Refuse);
        assert_eq!(offer_answer(false, false, 5), Refuse);
        assert_eq!(offer_answer(false, true, 5), Refuse);
    }

    proptest::proptest! {
        /// A draining relay never says SERVE or WAIT; a running one never LAST_RESORT; SERVE
        /// and LAST_RESORT only with something parked.
        #[test]
        fn a_draining_relay_never_invites_a_client_to_wait_or_be_served(
            open in proptest::bool::ANY, draining in proptest::bool::ANY, parked in 0usize..4,
        ) {
            let answer = offer_answer(open, draining, parked);
            if draining || !open {
                proptest::prop_assert!(!matches!(answer, OfferAnswer::Serve | OfferAnswer::Wait));
            } else {
                proptest::prop_assert!(answer != OfferAnswer::LastResort && answer != OfferAnswer::Refuse);
            }
            if matches!(answer, OfferAnswer::Serve | OfferAnswer::LastResort) {
                proptest::prop_assert!(parked > 0 && open);
            }
        }
    }

    #[test]
    fn a_header_passes_only_with_this_label_in_any_case_and_its_token() {
        let token = GatewayToken::new("0123abcd").unwrap();
        assert_eq!(
            authenticate(&header("home", "0123abcd"), "home", &token),
            Ok(())
        );
        assert_eq!(
            authenticate(&header("HoMe", "0123abcd"), "home", &token),
            Ok(())
        );
        assert_eq!(
            authenticate(&header("office", "0123abcd"), "home", &token),
            Err(EdgeRefused::WrongLabel)
        );
        assert_eq!(
            authenticate(&header("home", "0123abce"), "home", &token),
            Err(EdgeRefused::BadToken)
        );
        assert_eq!(
            authenticate(&header("home", "0123abc"), "home", &token),
            Err(EdgeRefused::BadToken)
        );
    }

    #[test]
    fn trusted_networks_narrow_the_peers_and_none_means_any() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(trusted(&[], "192.0.2.1".parse().unwrap()));
        assert!(trusted(&nets, "10.1.2.3".parse().unwrap()));
        assert!(trusted(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!trusted(&nets, "192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_shared_rendezvous_port_maps_back_to_the_local_ports_the_external_file_gives_it() {
        let p = PortRange::new(20000, 20007).unwrap();
        let external = ExternalAddress {
            host: "gw".into(),
            ports: BTreeMap::from([(20000, 20100), (20001, 20101), (21000, 9443)]),
        };
        assert_eq!(local_ports(&external, p, 20100), [20000]);
        assert_eq!(local_ports(&external, p, 20101), [20001]);
        // Unmapped local ports are reached as themselves; a mapped one is not.
        assert_eq!(local_ports(&external, p, 20005), [20005]);
        assert!(local_ports(&external, p, 20000).is_empty());
        // q is not a rendezvous port, nor is anything outside p.
        assert!(local_ports(&external, p, 9443).is_empty());
        assert!(local_ports(&external, p, 30000).is_empty());
    }

    proptest::proptest! {
        /// Every local port found is a rendezvous port whose external port is `t`.
        #[test]
        fn every_local_port_found_reaches_the_outside_as_t(
            map in proptest::collection::btree_map(19990u16..20020, 19990u16..20020, 0..12),
            t in 19990u16..20020,
        ) {
            let p = PortRange::new(20000, 20007).unwrap();
            let external = ExternalAddress { host: "gw".into(), ports: map };
            let found = local_ports(&external, p, t);
            for local in &found {
                proptest::prop_assert!(p.contains(*local));
                proptest::prop_assert_eq!(external.port(*local), t);
            }
            let all = p.iter().filter(|local| external.port(*local) == t).count();
            proptest::prop_assert_eq!(found.len(), all);
        }
    }
}
