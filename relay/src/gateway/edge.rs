//! The gateway as the cluster's edge (issue 15.3): raw TCP that enters through the gateway's
//! Service and is forwarded, never decrypted, to the right label relay's edge port, behind an
//! edge header (`taas_protocol::edge`: PROXY v2 with the entry kind, LABEL and LABEL's
//! gateway token).
//!
//! ```text
//! shared port ──ClientHello: LABEL.<domain>──▶ LABEL's relay   header(SharedPort) + hello + splice
//! HTTPS 8443  ──ClientHello: a direct label──▶ LABEL's relay   header(Direct) + hello + splice
//!             (any other name: the gateway's own TLS, as before: `crate::direct`)
//! rendezvous T ──every replica of every label owning T, in parallel──▶ header(Rendezvous)
//!             → one byte each: CLAIMs of one label → COMMIT to the first, splice; none, or
//!             claims of several labels → close
//! ```
//!
//! Replicas (issue 16): every address a label's `edge` resolves to is one replica. A client
//! (shared port, direct) is offered to them one at a time, in turned order, with the header's
//! offer TLV: each answers SERVE, WAIT, LAST_RESORT or REFUSE; the first SERVE gets COMMIT and
//! the client at once, else the first LAST_RESORT (a draining replica still holding parked
//! connections), else the first WAIT; none: closed (`no_replica`). A replica that closes
//! without a byte predates the TLV: it gets the client behind the old header, as before.
//! Answers are counted in `taas_gateway_edge_offers_total{answer}`.
//!
//! Why ask every candidate: slices of the rendezvous range overlap (the range stays the same
//! size as labels are added), so T alone does not name a label; the relay that holds a
//! pending registration pinned to the hidden server's source does. Asking all of them at once
//! and committing only to a sole claimant is race-free: a relay that claimed and got no
//! COMMIT keeps its registration pending.
//!
//! Bounds: connections reading their ClientHello (`EdgeLimits::hello_phase`) and
//! rendezvous connections waiting for their claims (`claiming`) are capped gateway-wide,
//! forwarded connections too (`forwarded`), and one source may hold at most `per_source`
//! client connections and as many hidden-server connections. Every wait has a deadline: the
//! ClientHello (first byte, then all of it), the relay's connection and header, the claims
//! (2 s). A refusal closes the connection without a byte and is counted by reason in
//! `taas_gateway_edge_refused_total{reason}`; a forwarded one in
//! `taas_gateway_edge_connections_total{entry}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicUsize, Ordering};
use taas_protocol::edge::{EdgeHeader, EdgeKind, COMMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::edge_index::{
    decide, decide_offer, Claim, ClaimDecision, EdgeTarget, NameLookup, Offer, OfferDecision,
};
use super::{RelayConnector, ReplicaSet, RouteTable, SecretSlot};
use crate::client_hello::{read_server_name, Deadlines, HelloFailure};
use crate::config::{Timeouts, POD_FRONTEND_CONNECTIONS};
use crate::sources::{OwnedSourceSlot, SourceCounts, SourceKey};
use crate::splice::SpliceMode;

/// How long the candidates of a rendezvous port have, all together, to be reached and to
/// answer (the contract's 2 s).
pub const CLAIM_DEADLINE: Duration = Duration::from_secs(2);
/// How long writing the edge header (and the ClientHello, or COMMIT) to a relay may take: a
/// few hundred bytes to a cluster-internal peer.
const RELAY_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one replica has to be reached and to answer an offer.
const OFFER_DEADLINE: Duration = Duration::from_secs(2);
/// The same for a replica that has left its name lately (it may be gone for good; a live pod
/// answers within milliseconds).
const DEPARTED_OFFER_DEADLINE: Duration = Duration::from_millis(500);

/// The edge's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Shared-port connections reading their ClientHello at once.
    pub hello_phase: usize,
    /// Rendezvous connections waiting for their candidates' answers at once (each one opens a
    /// connection to every candidate).
    pub claiming: usize,
    /// Connections forwarded to relays at once, all entries together (parked hidden
    /// servers included).
    pub forwarded: usize,
    /// Client connections (shared port and direct) one source (IPv4 address or IPv6 /64)
    /// may hold at once; hidden-server connections on rendezvous ports are counted apart,
    /// with the same cap.
    pub per_source: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            hello_phase: POD_FRONTEND_CONNECTIONS,
            claiming: 256,
            forwarded: 16_384,
            per_source: crate::config::Limits::default().clients_per_source,
        }
    }
}

/// How a connection entered the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeEntry {
    SharedPort = 0,
    Direct = 1,
    Rendezvous = 2,
}

impl EdgeEntry {
    const ALL: [EdgeEntry; 3] = [Self::SharedPort, Self::Direct, Self::Rendezvous];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SharedPort => "shared_port",
            Self::Direct => "direct",
            Self::Rendezvous => "rendezvous",
        }
    }

    fn kind(self) -> EdgeKind {
        match self {
            Self::SharedPort => EdgeKind::SharedPort,
            Self::Direct => EdgeKind::Direct,
            Self::Rendezvous => EdgeKind::Rendezvous,
        }
    }
}

/// Why the edge closed a connection instead of forwarding it (a fixed set: the series exist
/// from the start, and a stranger's bytes never create one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeRefused {
    /// `LABEL.<domain>` names no routed label.
    UnknownName,
    /// The server name is not a label under the domain.
    OutsideDomain,
    /// The label is routed but not in edge mode (its route has no `edge`).
    NoEdge,
    /// A ClientHello without a server name.
    NoServerName,
    /// Not a TLS ClientHello (or a malformed one).
    NotClientHello,
    /// Nothing within the first-byte timeout.
    Silent,
    /// The ClientHello was not complete within the handshake timeout.
    Deadline,
    /// The peer closed before its ClientHello was complete.
    Closed,
    /// A read error (a reset) before the ClientHello was complete.
    ReadError,
    /// A ClientHello that does not end within `MAX_CLIENT_HELLO` bytes.
    TooLarge,
    /// The source holds as many edge connections as allowed.
    SourceLimit,
    /// A gateway-wide cap (ClientHellos being read, claims in flight, forwarded connections).
    Overloaded,
    /// No install secret: the relay would refuse a header without the label's token.
    NoSecret,
    /// The relay could not be resolved, reached or written to in time, or (rendezvous) no
    /// candidate claimed and some did not answer.
    RelayUnreachable,
    /// The same, for a route marked not ready (a relay starting, or one whose readiness the
    /// gateway has not seen yet: it is tried anyway).
    NotReady,
    /// A rendezvous port no label owns.
    NoRoute,
    /// Every candidate of the rendezvous port answered that the hidden server is not theirs.
    NoRegistration,
    /// Several candidates claimed the hidden server.
    Ambiguous,
    /// Every replica of the client's label refused it (draining with nothing parked, the
    /// label closed) or could not be reached, some refusing.
    NoReplica,
}

impl EdgeRefused {
    const ALL: [EdgeRefused; 19] = [
        Self::UnknownName,
        Self::OutsideDomain,
        Self::NoEdge,
        Self::NoServerName,
        Self::NotClientHello,
        Self::Silent,
        Self::Deadline,
        Self::Closed,
        Self::ReadError,
        Self::TooLarge,
        Self::SourceLimit,
        Self::Overloaded,
        Self::NoSecret,
        Self::RelayUnreachable,
        Self::NotReady,
        Self::NoRoute,
        Self::NoRegistration,
        Self::Ambiguous,
        Self::NoReplica,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownName => "unknown_name",
            Self::OutsideDomain => "outside_domain",
            Self::NoEdge => "no_edge",
            Self::NoServerName => "no_server_name",
            Self::NotClientHello => "not_client_hello",
            Self::Silent => "silent",
            Self::Deadline => "deadline",
            Self::Closed => "closed",
            Self::ReadError => "read_error",
            Self::TooLarge => "too_large",
            Self::SourceLimit => "source_limit",
            Self::Overloaded => "overloaded",
            Self::NoSecret => "no_secret",
            Self::RelayUnreachable => "relay_unreachable",
            Self::NotReady => "not_ready",
            Self::NoRoute => "no_route",
            Self::NoRegistration => "no_registration",
            Self::Ambiguous => "ambiguous",
            Self::NoReplica => "no_replica",
        }
    }

    /// A relay that failed us: told apart by whether its route said it was ready.
    fn unreachable(target: &EdgeTarget) -> Self {
        if target.ready {
            Self::RelayUnreachable
        } else {
            Self::NotReady
        }
    }
}

impl From<HelloFailure> for EdgeRefused {
    fn from(failure: HelloFailure) -> Self {
        match failure {
            HelloFailure::Silent => Self::Silent,
            HelloFailure::Deadline => Self::Deadline,
            HelloFailure::Closed => Self::Closed,
            HelloFailure::ReadError => Self::ReadError,
            HelloFailure::TooLarge => Self::TooLarge,
            HelloFailure::NoServerName => Self::NoServerName,
            HelloFailure::NotClientHello => Self::NotClientHello,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByEntry {
    entry: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByAnswer {
    answer: &'static str,
}

/// The edge's counters.
pub struct EdgeMetrics {
    connections: Family<ByEntry, Counter>,
    refused: Family<ByReason, Counter>,
    offers: Family<ByAnswer, Counter>,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let metrics = Self {
            connections: Family::default(),
            refused: Family::default(),
            offers: Family::default(),
        };
        for answer in Offer::ALL {
            let _ = metrics.offers.get_or_create(&ByAnswer {
                answer: answer.as_str(),
            });
        }
        // Every series from the start, at 0.
        for entry in EdgeEntry::ALL {
            let _ = metrics.connections.get_or_create(&ByEntry {
                entry: entry.as_str(),
            });
        }
        for reason in EdgeRefused::ALL {
            let _ = metrics.refused.get_or_create(&ByReason {
                reason: reason.as_str(),
            });
        }
        metrics
    }
}

impl EdgeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "taas_gateway_edge_connections",
            "Connections the edge forwarded to a label relay's edge port, by entry",
            self.connections.clone(),
        );
        registry.register(
            "taas_gateway_edge_refused",
            "Connections the edge closed without forwarding them, by reason",
            self.refused.clone(),
        );
        registry.register(
            "taas_gateway_edge_offers",
            "Clients offered to a replica of their label's relay, by its answer (serve, wait, \
             last_resort, refuse; legacy: a relay without offers, sent the client with the old \
             header; no_answer: not reached or not in time)",
            self.offers.clone(),
        );
    }

    fn offered(&self, answer: Offer) {
        self.offers
            .get_or_create(&ByAnswer {
                answer: answer.as_str(),
            })
            .inc();
    }

    fn forwarded(&self, entry: EdgeEntry) {
        self.connections
            .get_or_create(&ByEntry {
                entry: entry.as_str(),
            })
            .inc();
    }

    fn refused(&self, reason: EdgeRefused) {
        self.refused
            .get_or_create(&ByReason {
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// The gateway's edge: cheap to clone, shared by its listeners and the HTTPS front end.
#[derive(Clone)]
pub struct Edge(Arc<Shared>);

struct Shared {
    routes: Arc<RouteTable>,
    connector: RelayConnector,
    secret: Arc<SecretSlot>,
    metrics: Arc<EdgeMetrics>,
    /// Servers domain (lower case): clients name `LABEL.<domain>`.
    domain: String,
    timeouts: Timeouts,
    limits: EdgeLimits,
    /// How forwarded connections move their bytes.
    splice: SpliceMode,
    hello_phase: Arc<Semaphore>,
    claiming: Arc<Semaphore>,
    forwarded: Arc<Semaphore>,
    clients: Arc<SourceCounts>,
    hidden_servers: Arc<SourceCounts>,
    /// Turns the order in which a label's replicas are offered clients.
    turn: AtomicUsize,
    /// Set when the gateway stops ([`Edge::drain`]): parked connections are given back.
    draining: tokio::sync::watch::Sender<bool>,
}

/// What a forwarded connection holds until it closes.
struct Held {
    _forwarded: OwnedSemaphorePermit,
    _source: OwnedSourceSlot,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edge")
    }
}

impl Edge {
    pub fn new(
        gateway: &super::Gateway,
        routes: Arc<RouteTable>,
        domain: &str,
        timeouts: Timeouts,
        limits: EdgeLimits,
        splice: SpliceMode,
        metrics: Arc<EdgeMetrics>,
    ) -> Self {
        let semaphore = |n: usize| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)));
        Self(Arc::new(Shared {
            routes,
            connector: gateway.relay_connector(),
            secret: gateway.secret(),
            metrics,
            domain: domain.to_ascii_lowercase(),
            timeouts,
            limits,
            splice,
            hello_phase: semaphore(limits.hello_phase),
            claiming: semaphore(limits.claiming),
            forwarded: semaphore(limits.forwarded),
            clients: Arc::default(),
            hidden_servers: Arc::default(),
            turn: AtomicUsize::new(0),
            draining: tokio::sync::watch::channel(false).0,
        }))
    }

    /// The gateway stops: every hidden server's connection still parked (nothing has
    /// crossed it either way) is closed now, so its agent parks again through another
    /// gateway at once instead of when this one exits; connections carrying a pair go on.
    pub fn drain(&self) {
        self.0.draining.send_replace(true);
    }

    /// Connections forwarded now (clients, and hidden servers parked or paired): what a
    /// stopping gateway waits for.
    pub fn forwarded(&self) -> usize {
        let total = self.0.limits.forwarded.clamp(1, Semaphore::MAX_PERMITS);
        total.saturating_sub(self.0.forwarded.available_permits())
    }

    /// Serves the shared client port until the task is dropped.
    pub async fn serve_shared_port(self, listener: TcpListener) {
        // Set once, inherited by every accepted connection (as on q): 10 of the 71 system
        // calls of a client connection through the edge went to setting them per connection.
        crate::splice::tune_listener(&listener);
        loop {
            let (stream, peer) = accept(&listener, "shared port").await;
            let Ok(permit) = self.0.hello_phase.clone().try_acquire_owned() else {
                self.0.refuse(EdgeRefused::Overloaded, peer, "shared port");
                continue;
            };
            tokio::spawn(self.0.clone().shared_port(stream, peer, permit));
        }
    }

    /// Serves one rendezvous port until the task is dropped.
    pub async fn serve_rendezvous(self, listener: TcpListener) {
        // As on the shared port.
        crate::splice::tune_listener(&listener);
        loop {
            let (stream, peer) = accept(&listener, "rendezvous port").await;
            let Ok(permit) = self.0.claiming.clone().try_acquire_owned() else {
                self.0.refuse(EdgeRefused::Overloaded, peer, "rendezvous");
                continue;
            };
            tokio::spawn(self.0.clone().rendezvous(stream, peer, permit));
        }
    }

    /// A connection on the HTTPS port whose ClientHello (`hello`, read already) names
    /// `server_name`: taken (forwarded, or refused and closed) when that is a direct label
    /// in edge mode, given back for the gateway's own TLS otherwise.
    pub(crate) fn take_direct(
        &self,
        server_name: &str,
        stream: TcpStream,
        peer: SocketAddr,
        hello: Vec<u8>,
    ) -> Result<(), (TcpStream, Vec<u8>)> {
        let shared = &self.0;
        let Some(target) = shared
            .routes
            .edge()
            .direct(server_name, &shared.domain)
            .cloned()
        else {
            return Err((stream, hello));
        };
        if let Some(held) = shared.hold(&shared.clients, peer, "direct") {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .forward(EdgeEntry::Direct, &target, stream, peer, hello, held)
                    .await
            });
        }
        Ok(())
    }
}

/// The next accepted connection; an accept error (usually out of file descriptors) backs off
/// rather than spinning.
async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// An address as written in a header: IPv4-mapped IPv6 as IPv4 (a dual-stack listener's
/// view of an IPv4 peer).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Shared {
    fn refuse(&self, reason: EdgeRefused, peer: SocketAddr, entry: &str) {
        self.metrics.refused(reason);
        tracing::debug!(%peer, entry, reason = reason.as_str(), "edge: connection refused");
    }

    /// A place among the forwarded connections and the source's; counted and `None` when
    /// there is none.
    fn hold(&self, sources: &Arc<SourceCounts>, peer: SocketAddr, entry: &str) -> Option<Held> {
        let Some(source) =
            sources.try_acquire_owned(SourceKey::of(peer.ip()), self.limits.per_source)
        else {
            self.refuse(EdgeRefused::SourceLimit, peer, entry);
            return None;
        };
        let Ok(forwarded) = self.forwarded.clone().try_acquire_owned() else {
            self.refuse(EdgeRefused::Overloaded, peer, entry);
            return None;
        };
        Some(Held {
            _forwarded: forwarded,
            _source: source,
        })
    }

    /// The edge header for `label`'s relay; `None` without an install secret.
    fn header(
        &self,
        entry: EdgeEntry,
        label: &str,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Option<EdgeHeader> {
        let token = self.secret.gateway_token(label)?;
        Some(EdgeHeader {
            kind: entry.kind(),
            source: canonical(source),
            destination: canonical(destination),
            label: label.to_string(),
            token: token.expose().to_string(),
            offer: false,
        })
    }

    async fn shared_port(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        hello_phase: OwnedSemaphorePermit,
    ) {
        const ENTRY: &str = "shared port";
        let Some(held) = self.hold(&self.clients, peer, ENTRY) else {
            return;
        };
        let accepted_at = Instant::now();
        let deadlines = Deadlines {
            first_byte: accepted_at + self.timeouts.first_byte,
            complete: accepted_at + self.timeouts.handshake,
        };
        let mut hello = Vec::new();
        let name = match read_server_name(&mut stream, &mut hello, deadlines).await {
            Ok(name) => name,
            Err(failure) => return self.refuse(failure.into(), peer, ENTRY),
        };
        drop(hello_phase);
        let target = match self.routes.edge().for_server_name(&name, &self.domain) {
            NameLookup::Edge(target) => target.clone(),
            NameLookup::NoEdge => return self.refuse(EdgeRefused::NoEdge, peer, ENTRY),
            NameLookup::UnknownName => return self.refuse(EdgeRefused::UnknownName, peer, ENTRY),
            NameLookup::OutsideDomain => {
                return self.refuse(EdgeRefused::OutsideDomain, peer, ENTRY)
            }
        };
        self.forward(EdgeEntry::SharedPort, &target, stream, peer, hello, held)
            .await;
    }

    /// A client's connection to one of `target`'s replicas (offered to each in turn, see the
    /// module's doc): the header, COMMIT, the bytes read already, then both ways until either
    /// side is done.
    async fn forward(
        &self,
        entry: EdgeEntry,
        target: &EdgeTarget,
        client: TcpStream,
        peer: SocketAddr,
        read: Vec<u8>,
        held: Held,
    ) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let Some(header) = self.header(entry, &target.label, peer, local) else {
            return self.refuse(EdgeRefused::NoSecret, peer, entry.as_str());
        };
        let replicas = match self.connector.replicas(&edge_set(target)).await {
            Ok(replicas) => replicas,
            Err(error) => {
                tracing::debug!(label = %target.label, relay = %target.edge, %error, "edge: relay unreachable");
                return self.refuse(EdgeRefused::unreachable(target), peer, entry.as_str());
            }
        };
        let offer = EdgeHeader {
            offer: true,
            ..header.clone()
        }
        .encode();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut order = replicas;
        let by = turn % order.len().max(1);
        order.rotate_left(by);
        let mut answers = Vec::with_capacity(order.len());
        let mut streams: Vec<Option<TcpStream>> = Vec::with_capacity(order.len());
        let mut refreshed = false;
        let mut departed: Vec<SocketAddr> = Vec::new();
        let mut next = 0;
        'offers: loop {
            while let Some(replica) = order.get(next).copied() {
                next += 1;
                let gone = departed.contains(&replica);
                let deadline = if gone {
                    DEPARTED_OFFER_DEADLINE
                } else {
                    OFFER_DEADLINE
                };
                let (answer, stream) = offer_to(&self.connector, replica, &offer, deadline).await;
                if gone && answer == Offer::NoAnswer {
                    self.connector.forget_departed(&edge_set(target), replica);
                }
                self.metrics.offered(answer);
                tracing::debug!(label = %target.label, %replica, answer = answer.as_str(), "edge: client offered");
                // Kept only while it may be picked: the first LAST_RESORT, the first WAIT.
                let keep = matches!(answer, Offer::Serve | Offer::LastResort | Offer::Wait)
                    && !answers.contains(&answer);
                answers.push(answer);
                streams.push(stream.filter(|_| keep));
                if answer.settles() {
                    break 'offers;
                }
            }
            // No replica known could serve at once: one that has just become ready (a
            // rollout's surge pod) may be missing from the cached names; asked once more.
            if refreshed {
                break;
            }
            refreshed = true;
            let fresh = self
                .connector
                .fresh_replicas(&edge_set(target))
                .await
                .unwrap_or_default();
            let before = order.len();
            for replica in fresh {
                if !order.contains(&replica) {
                    order.push(replica);
                }
            }
            // Then the replicas that left the name lately: a draining one still holds its
            // parked connections for a few seconds (LAST_RESORT).
            for replica in self.connector.departed(&edge_set(target)) {
                if !order.contains(&replica) {
                    order.push(replica);
                    departed.push(replica);
                }
            }
            if order.len() == before {
                break;
            }
        }
        let (mut relay, first) = match decide_offer(&answers) {
            OfferDecision::Commit(i) => {
                let Some(relay) = streams[i].take() else {
                    return self.refuse(EdgeRefused::unreachable(target), peer, entry.as_str());
                };
                drop(streams);
                let mut first = vec![COMMIT];
                first.extend_from_slice(&read);
                (relay, first)
            }
            OfferDecision::Legacy(i) => {
                drop(streams);
                match self.connector.connect(order[i]).await {
                    Ok(relay) => {
                        let mut first = header.encode();
                        first.extend_from_slice(&read);
                        (relay, first)
                    }
                    Err(error) => {
                        tracing::debug!(label = %target.label, replica = %order[i], %error, "edge: relay unreachable");
                        return self.refuse(EdgeRefused::unreachable(target), peer, entry.as_str());
                    }
                }
            }
            OfferDecision::NoReplica => {
                let reason = if answers.contains(&Offer::Refuse) {
                    EdgeRefused::NoReplica
                } else {
                    EdgeRefused::unreachable(target)
                };
                return self.refuse(reason, peer, entry.as_str());
            }
        };
        if !matches!(
            tokio::time::timeout(RELAY_WRITE_TIMEOUT, relay.write_all(&first)).await,
            Ok(Ok(()))
        ) {
            return self.refuse(EdgeRefused::unreachable(target), peer, entry.as_str());
        }
        self.metrics.forwarded(entry);
        crate::splice::tune_accepted(&client);
        splice_to_relay(client, relay, held, self.splice).await;
    }

    async fn rendezvous(
        self: Arc<Self>,
        hidden: TcpStream,
        peer: SocketAddr,
        claiming: OwnedSemaphorePermit,
    ) {
        const ENTRY: &str = "rendezvous";
        let Ok(local) = hidden.local_addr() else {
            return;
        };
        let index = self.routes.edge();
        let candidates = index.candidates(local.port());
        if candidates.is_empty() {
            return self.refuse(EdgeRefused::NoRoute, peer, ENTRY);
        }
        let Some(held) = self.hold(&self.hidden_servers, peer, ENTRY) else {
            return;
        };
        let mut asks = JoinSet::new();
        let deadline = Instant::now() + CLAIM_DEADLINE;
        // (the candidate label, its answer) for every replica of every candidate.
        let mut claims: Vec<(usize, Claim)> = Vec::new();
        for (label, target) in candidates.iter().enumerate() {
            let Some(header) = self.header(EdgeEntry::Rendezvous, &target.label, peer, local)
            else {
                return self.refuse(EdgeRefused::NoSecret, peer, ENTRY);
            };
            let header = header.encode();
            let resolved =
                tokio::time::timeout_at(deadline, self.connector.replicas(&edge_set(target))).await;
            let Ok(Ok(replicas)) = resolved else {
                claims.push((label, Claim::NoAnswer));
                continue;
            };
            for replica in replicas {
                let i = claims.len();
                claims.push((label, Claim::NoAnswer));
                let (connector, header) = (self.connector.clone(), header.clone());
                asks.spawn(async move { (i, ask(connector, replica, header, deadline).await) });
            }
        }
        let mut relays: Vec<Option<TcpStream>> = (0..claims.len()).map(|_| None).collect();
        while let Some(asked) = asks.join_next().await {
            if let Ok((i, (claim, relay))) = asked {
                claims[i].1 = claim;
                relays[i] = relay;
            }
        }
        drop(claiming);
        let winner = match decide(&claims) {
            ClaimDecision::Commit(winner) => winner,
            ClaimDecision::NoRegistration => {
                // The registration may be held by a replica the cached names miss: the
                // hidden server's next try (it registers again) asks fresh names.
                for target in candidates.iter() {
                    let _ = self.connector.fresh_replicas(&edge_set(target)).await;
                }
                return self.refuse(EdgeRefused::NoRegistration, peer, ENTRY);
            }
            ClaimDecision::Ambiguous => return self.refuse(EdgeRefused::Ambiguous, peer, ENTRY),
            ClaimDecision::RelayUnreachable => {
                // Not ready when every silent candidate's route says so.
                let silent_ready = claims
                    .iter()
                    .any(|(label, c)| *c == Claim::NoAnswer && candidates[*label].ready);
                let reason = if silent_ready {
                    EdgeRefused::RelayUnreachable
                } else {
                    EdgeRefused::NotReady
                };
                return self.refuse(reason, peer, ENTRY);
            }
        };
        // The others see their connection close: they keep their registrations pending.
        let Some(mut relay) = relays.swap_remove(winner) else {
            return;
        };
        drop(relays);
        let target = &candidates[claims[winner].0];
        if !matches!(
            tokio::time::timeout(RELAY_WRITE_TIMEOUT, relay.write_all(&[COMMIT])).await,
            Ok(Ok(()))
        ) {
            return self.refuse(EdgeRefused::unreachable(target), peer, ENTRY);
        }
        tracing::debug!(%peer, label = %target.label, port = local.port(), "edge: hidden server committed");
        self.metrics.forwarded(EdgeEntry::Rendezvous);
        crate::splice::tune_accepted(&hidden);
        if parked_until_used(&hidden, &relay, self.draining.subscribe()).await {
            splice_to_relay(hidden, relay, held, self.splice).await;
        }
    }
}

/// The edge ports of `target`'s replicas.
fn edge_set(target: &EdgeTarget) -> ReplicaSet<'_> {
    ReplicaSet {
        label: &target.label,
        port: "edge",
        relays: &target.edge,
    }
}

/// Offers a client to one replica (within `deadline`): its answer, and the
/// connection when it answered (for the COMMIT).
async fn offer_to(
    connector: &RelayConnector,
    replica: SocketAddr,
    header: &[u8],
    deadline: Duration,
) -> (Offer, Option<TcpStream>) {
    let attempt = async {
        let mut relay = connector.connect(replica).await.ok()?;
        relay.write_all(header).await.ok()?;
        let mut answer = [0u8; 1];
        match relay.read(&mut answer).await {
            Ok(1) => Some((Offer::from_answer(Some(answer[0])), Some(relay))),
            // Closed without a byte: a relay that refuses the offer TLV.
            Ok(_) => Some((Offer::from_answer(None), None)),
            Err(_) => None,
        }
    };
    match tokio::time::timeout(deadline, attempt).await {
        Ok(Some(answered)) => answered,
        _ => (Offer::NoAnswer, None),
    }
}

/// Asks one candidate replica (before `deadline`) whether the hidden server is its own; the
/// connection comes back with a claim, for the COMMIT.
async fn ask(
    connector: RelayConnector,
    replica: SocketAddr,
    header: Vec<u8>,
    deadline: Instant,
) -> (Claim, Option<TcpStream>) {
    let attempt = async {
        let mut relay = connector.connect(replica).await.ok()?;
        relay.write_all(&header).await.ok()?;
        let mut answer = [0u8; 1];
        match relay.read(&mut answer).await {
            Ok(1) => Some((answer[0], relay)),
            _ => None,
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Some((answer, relay))) => match Claim::from_answer(Some(answer)) {
            Claim::Mine => (Claim::Mine, Some(relay)),
            other => (other, None),
        },
        _ => (Claim::NoAnswer, None),
    }
}

/// Waits while a hidden server's connection is parked: until a byte (or the end) arrives on
/// either side, which means a pair (or a hidden server that speaks first, or a close), or
/// until the gateway drains. True: splice it. False: the gateway stops and nothing crossed
/// it yet; dropping both gives the parked connection back to its agent.
async fn parked_until_used(
    hidden: &TcpStream,
    relay: &TcpStream,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> bool {
    // `peek`, not `readable`: readiness left over from the claim's read would say ready
    // with nothing there.
    let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
    tokio::select! {
        _ = hidden.peek(&mut one) => true,
        _ = relay.peek(&mut other) => true,
        _ = draining.wait_for(|draining| *draining) => {
            tracing::debug!("edge: gateway stopping, parked connection given back");
            false
        }
    }
}

/// Joins the two until both directions are done; the relay applies the label's idle timeout
/// and closes, which ends this too.
async fn splice_to_relay(
    mut client: TcpStream,
    mut relay: TcpStream,
    held: Held,
    mode: SpliceMode,
) {
    crate::splice::tune(&relay);
    if let Err(error) = crate::splice::splice(&mut client, &mut relay, mode).await {
        tracing::debug!(%error, "edge: forwarded connection ended with an error");
    }
    drop(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_and_entry_has_its_own_series_name() {
        let reasons: std::collections::HashSet<_> =
            EdgeRefused::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons.len(), EdgeRefused::ALL.len());
        let entries: std::collections::HashSet<_> =
            EdgeEntry::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(entries.len(), EdgeEntry::ALL.len());
    }

    #[test]
    fn a_dual_stack_view_of_an_ipv4_peer_is_written_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:443".parse().unwrap();
        assert_eq!(canonical(mapped), "198.51.100.7:443".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
