//! The relay's Prometheus metrics: per-label series and the reasons counted. They are served
//! by `taas_process::metrics::serve`, the endpoint every TAAS process shares.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::label::Entry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLabel {
    label: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLabelAnd {
    label: String,
    kind: String,
}

/// A client-connection series: the label, and how the client came (`Entry`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLabelAndEntry {
    label: String,
    entry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByKind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByResult {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByAnswer {
    answer: String,
}

const REGISTRATION_RESULTS: [&str; 4] = ["ok", "unauthorized", "rate_limited", "unavailable"];
const CLIENT_REFUSALS: [&str; 7] = [
    "timeout",
    "not_admitted",
    "queue_full",
    "overloaded",
    "silent",
    "source_limit",
    "label_pairs",
];
const RENDEZVOUS_RESULTS: [&str; 3] = ["connected", "expired", "stranger"];
const ENTRIES: [Entry; 3] = [Entry::OwnPort, Entry::SharedPort, Entry::Direct];
/// Every reason of [`SharedPortRefused`], in its order: the refusal series are created once,
/// up front, so a stranger's bytes never create one.
const SHARED_PORT_REFUSALS: [&str; 12] = [
    "unknown_name",
    "outside_domain",
    "no_server_name",
    "not_client_hello",
    "silent",
    "deadline",
    "closed",
    "server_speaks_first",
    "source_limit",
    "overloaded",
    "read_error",
    "too_large",
];

/// Why the shared client port turned a connection away before handing it to a label
/// (relay-wide: most of these have no label). Refusals after the hand-over (no parked
/// connection within the client wait, the label's own caps) are the label's
/// `taas_clients_refused`, as on q.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedPortRefused {
    /// `LABEL.<domain>` names no configured label.
    UnknownName = 0,
    /// The server name is not a label under the relay's domain.
    OutsideDomain = 1,
    /// A ClientHello without a server name (an IP-literal URL, a raw client).
    NoServerName = 2,
    /// Not a TLS ClientHello, or a malformed one (a bad server name included).
    NotClientHello = 3,
    /// Nothing within the first-byte timeout.
    Silent = 4,
    /// The ClientHello was not complete within the handshake timeout (a stall, a slow drip).
    Deadline = 5,
    /// The client closed before its ClientHello was complete.
    Closed = 6,
    /// The label's server speaks first: its clients cannot name it, they use its own q.
    ServerSpeaksFirst = 7,
    /// The source has as many client connections open as allowed (relay-wide).
    SourceLimit = 8,
    /// As many connections as allowed are reading their ClientHello already.
    Overloaded = 9,
    /// A read error (a reset) before the ClientHello was complete.
    ReadError = 10,
    /// A ClientHello that does not end within `MAX_CLIENT_HELLO` bytes.
    TooLarge = 11,
}

/// Every reason of [`EdgeRefused`], in its order (series created up front, as above).
const EDGE_REFUSALS: [&str; 13] = [
    "untrusted",
    "overloaded",
    "silent",
    "deadline",
    "closed",
    "read_error",
    "bad_header",
    "wrong_label",
    "bad_token",
    "server_speaks_first",
    "source_limit",
    "offer_refused",
    "offer_not_committed",
];
/// Every answer to an offer ([`OfferAnswer`]), in its order.
const EDGE_OFFERS: [&str; 4] = ["serve", "wait", "last_resort", "refuse"];
/// Every kind of edge connection ([`taas_protocol::edge::EdgeKind`]), in [`edge_kind`]'s order.
const EDGE_KINDS: [&str; 3] = ["shared_port", "direct", "rendezvous"];
/// Every [`EdgeRendezvous`] result, in its order.
const EDGE_RENDEZVOUS: [&str; 4] = ["not_mine", "committed", "not_committed", "lost"];

/// Why the edge port (`edge`) turned a connection away: before its header was accepted, or
/// because of what the header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeRefused {
    /// The peer is outside `--trusted-proxies`.
    Untrusted = 0,
    /// As many connections as allowed are reading their header already.
    Overloaded = 1,
    /// Nothing within the first-byte timeout.
    Silent = 2,
    /// The header was not complete within the handshake timeout.
    Deadline = 3,
    /// The peer closed before its header was complete.
    Closed = 4,
    /// A read error (a reset) before the header was complete.
    ReadError = 5,
    /// Not an edge header (`taas_protocol::edge::parse` refused it).
    BadHeader = 6,
    /// The header names another label.
    WrongLabel = 7,
    /// The header's gateway token is not this label's.
    BadToken = 8,
    /// A shared-port client for a label whose server speaks first.
    ServerSpeaksFirst = 9,
    /// The client's source has as many client connections open as allowed.
    SourceLimit = 10,
    /// An offered client was answered `REFUSE` (draining with nothing parked, or the label
    /// closed).
    OfferRefused = 11,
    /// An offered client got no `COMMIT` (the gateway picked another replica, or nothing
    /// came within the handshake timeout).
    OfferNotCommitted = 12,
}

/// A relay's answer to an offered client (`taas_protocol::edge::TLV_OFFER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferAnswer {
    Serve = 0,
    Wait = 1,
    LastResort = 2,
    Refuse = 3,
}

impl OfferAnswer {
    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        use taas_protocol::edge;
        match self {
            Self::Serve => edge::SERVE,
            Self::Wait => edge::WAIT,
            Self::LastResort => edge::LAST_RESORT,
            Self::Refuse => edge::REFUSE,
        }
    }
}

/// What became of a rendezvous asked about on the edge port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeRendezvous {
    /// No pending registration of this label matched (answered `NOT_MINE`).
    NotMine = 0,
    /// Claimed, committed and given to the registration.
    Committed = 1,
    /// Claimed, but no `COMMIT` came (another byte, EOF, the deadline): still pending.
    NotCommitted = 2,
    /// Committed, but the registration had just ended: the connection was closed.
    Lost = 3,
}

/// The index of an edge kind in `EDGE_KINDS`.
fn edge_kind(kind: taas_protocol::edge::EdgeKind) -> usize {
    use taas_protocol::edge::EdgeKind;
    match kind {
        EdgeKind::SharedPort => 0,
        EdgeKind::Direct => 1,
        EdgeKind::Rendezvous => 2,
    }
}

/// A registration's result, as counted per label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    Ok = 0,
    Unauthorized = 1,
    RateLimited = 2,
    Unavailable = 3,
}

/// Why a mobile client on q was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRefused {
    /// No parked connection arrived within the wait.
    Timeout = 0,
    /// Client admission is on and this source got no 307.
    NotAdmitted = 1,
    /// Too many clients already waiting on this label.
    QueueFull = 2,
    /// The relay's global limit of pairs is reached.
    Overloaded = 3,
    /// The client sent nothing within the first-byte timeout (it never held a parked
    /// connection).
    Silent = 4,
    /// Its source already has as many connections open on q as allowed (on this label or
    /// over all labels).
    SourceLimit = 5,
    /// The label's own limit of pairs is reached.
    LabelPairs = 6,
}

/// How a one-shot rendezvous port ended (or a stranger it turned away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    Connected = 0,
    Expired = 1,
    Stranger = 2,
}

/// The relay's metrics. Per-label series exist only for configured labels (never for names
/// taken from requests, which would let strangers grow the registry).
#[derive(Default)]
pub struct RelayMetrics {
    registrations: Family<ByLabelAnd, Counter>,
    registrations_rejected: Family<ByReason, Counter>,
    parked: Family<ByLabel, Gauge>,
    pairings: Family<ByLabelAndEntry, Counter>,
    shared_port_refused: Family<ByReason, Counter>,
    edge_connections: Family<ByKind, Counter>,
    edge_refused: Family<ByReason, Counter>,
    edge_rendezvous: Family<ByResult, Counter>,
    edge_offers: Family<ByAnswer, Counter>,
    /// 1 from the start of a graceful stop (this relay pod is draining).
    draining: Gauge,
    active_pairs: Family<ByLabel, Gauge>,
    bytes: Family<ByLabelAnd, Counter>,
    clients_refused: Family<ByLabelAnd, Counter>,
    redirects: Family<ByLabel, Counter>,
    rendezvous: Family<ByLabelAnd, Counter>,
    idle_pairs_closed: Family<ByLabel, Counter>,
    spliced_bytes: Counter,
}

/// One label's metric handles: plain atomics, so the data path takes no lock to count.
#[derive(Clone, Debug, Default)]
pub struct LabelMetrics {
    registrations: [Counter; 4],
    pub parked: Gauge,
    /// By [`Entry`].
    pairings: [Counter; 3],
    pub active_pairs: Gauge,
    pub bytes_to_server: Counter,
    pub bytes_to_client: Counter,
    clients_refused: [Counter; 7],
    pub redirects: Counter,
    rendezvous: [Counter; 3],
    /// Pairs closed by the relay after no byte either way for the idle timeout.
    pub idle_pairs_closed: Counter,
    /// Bytes splice(2) moved, all labels together (one counter shared by every label).
    pub spliced_bytes: Counter,
    /// When and from where a registration last got a port (the console shows it; not a
    /// metric: a time and an address per label are no series).
    last_registration: Arc<std::sync::Mutex<Option<(std::time::SystemTime, std::net::IpAddr)>>>,
}

impl LabelMetrics {
    pub fn registered(&self, result: Registered) {
        self.registrations[result as usize].inc();
    }
    /// Registrations with this result so far.
    pub fn registrations(&self, result: Registered) -> u64 {
        self.registrations[result as usize].get()
    }
    /// Notes a registration that got a port, from `source`, now.
    pub fn registered_from(&self, source: std::net::IpAddr) {
        let now = std::time::SystemTime::now();
        *taas_protocol::sync::lock(&self.last_registration) = Some((now, source));
    }
    /// When and from where a registration last got a port.
    pub fn last_registration(&self) -> Option<(std::time::SystemTime, std::net::IpAddr)> {
        *taas_protocol::sync::lock(&self.last_registration)
    }
    /// A client paired with a parked connection, counted by how it came.
    pub fn paired(&self, entry: Entry) {
        self.pairings[entry as usize].inc();
    }
    pub fn client_refused(&self, reason: ClientRefused) {
        self.clients_refused[reason as usize].inc();
    }
    pub fn rendezvous(&self, outcome: Rendezvous) {
        self.rendezvous[outcome as usize].inc();
    }
}

impl RelayMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let m = self;
        registry.register(
            "taas_registrations",
            "Registrations by label and result (kind)",
            m.registrations.clone(),
        );
        registry.register(
            "taas_registrations_rejected",
            "Registrations refused before a label was identified, by reason",
            m.registrations_rejected.clone(),
        );
        registry.register(
            "taas_parked",
            "Parked connections waiting for a client",
            m.parked.clone(),
        );
        registry.register(
            "taas_pairings",
            "Clients paired with a parked connection, by entry (own_port: the label's q; \
             shared_port: the shared client port, by server name; direct: the front end's HTTPS \
             port, a direct label's server name)",
            m.pairings.clone(),
        );
        registry.register(
            "taas_shared_port_refused",
            "Connections on the shared client port turned away before reaching a label, by reason",
            m.shared_port_refused.clone(),
        );
        for reason in SHARED_PORT_REFUSALS {
            let _ = m.shared_port_refused.get_or_create(&ByReason {
                reason: reason.into(),
            });
        }
        registry.register(
            "taas_edge_connections",
            "Connections accepted on the edge port (a gateway's header checked), by kind \
             (shared_port, direct: a client; rendezvous: a hidden server on a shared \
             rendezvous port)",
            m.edge_connections.clone(),
        );
        registry.register(
            "taas_edge_refused",
            "Connections on the edge port turned away, by reason",
            m.edge_refused.clone(),
        );
        registry.register(
            "taas_edge_rendezvous",
            "Rendezvous asked about on the edge port, by result (not_mine, committed, \
             not_committed: claimed without a COMMIT, lost: committed as the registration ended)",
            m.edge_rendezvous.clone(),
        );
        for kind in EDGE_KINDS {
            let _ = m
                .edge_connections
                .get_or_create(&ByKind { kind: kind.into() });
        }
        for reason in EDGE_REFUSALS {
            let _ = m.edge_refused.get_or_create(&ByReason {
                reason: reason.into(),
            });
        }
        for result in EDGE_RENDEZVOUS {
            let _ = m.edge_rendezvous.get_or_create(&ByResult {
                result: result.into(),
            });
        }
        registry.register(
            "taas_edge_offers",
            "Clients offered on the edge port (a gateway asking before it sends one), by this \
             relay's answer (serve, wait, last_resort, refuse)",
            m.edge_offers.clone(),
        );
        for answer in EDGE_OFFERS {
            let _ = m.edge_offers.get_or_create(&ByAnswer {
                answer: answer.into(),
            });
        }
        registry.register(
            "taas_relay_draining",
            "1 while this relay stops gracefully (unready, registrations refused), else 0; per \
             pod, each replica being its own scrape target",
            m.draining.clone(),
        );
        registry.register(
            "taas_active_pairs",
            "Spliced pairs open now",
            m.active_pairs.clone(),
        );
        registry.register(
            "taas_bytes",
            "Bytes relayed, by direction (kind: to_server, to_client), counted when a pair ends",
            m.bytes.clone(),
        );
        registry.register(
            "taas_clients_refused",
            "Clients on q turned away, by reason (kind)",
            m.clients_refused.clone(),
        );
        registry.register(
            "taas_redirects",
            "307 answers sent to mobile clients",
            m.redirects.clone(),
        );
        registry.register(
            "taas_rendezvous",
            "One-shot rendezvous ports by outcome (kind: connected, expired, stranger)",
            m.rendezvous.clone(),
        );
        registry.register(
            "taas_idle_pairs_closed",
            "Spliced pairs closed after no byte either way for the pair idle timeout",
            m.idle_pairs_closed.clone(),
        );
        registry.register(
            "taas_spliced_bytes",
            "Of the bytes relayed, those splice(2) moved without a copy through user space \
             (all labels, both directions, counted when a pair ends)",
            m.spliced_bytes.clone(),
        );
    }

    pub fn for_label(&self, label: &str) -> LabelMetrics {
        let one = |family: &Family<ByLabel, Gauge>| {
            family
                .get_or_create(&ByLabel {
                    label: label.into(),
                })
                .clone()
        };
        let kinds = |family: &Family<ByLabelAnd, Counter>, kind: &str| {
            family
                .get_or_create(&ByLabelAnd {
                    label: label.into(),
                    kind: kind.into(),
                })
                .clone()
        };
        LabelMetrics {
            registrations: REGISTRATION_RESULTS.map(|k| kinds(&self.registrations, k)),
            parked: one(&self.parked),
            pairings: ENTRIES.map(|entry| {
                self.pairings
                    .get_or_create(&ByLabelAndEntry {
                        label: label.into(),
                        entry: entry.as_str().into(),
                    })
                    .clone()
            }),
            active_pairs: one(&self.active_pairs),
            bytes_to_server: kinds(&self.bytes, "to_server"),
            bytes_to_client: kinds(&self.bytes, "to_client"),
            clients_refused: CLIENT_REFUSALS.map(|k| kinds(&self.clients_refused, k)),
            redirects: self
                .redirects
                .get_or_create(&ByLabel {
                    label: label.into(),
                })
                .clone(),
            rendezvous: RENDEZVOUS_RESULTS.map(|k| kinds(&self.rendezvous, k)),
            idle_pairs_closed: self
                .idle_pairs_closed
                .get_or_create(&ByLabel {
                    label: label.into(),
                })
                .clone(),
            spliced_bytes: self.spliced_bytes.clone(),
            last_registration: Arc::default(),
        }
    }

    /// Drops a removed label's series.
    pub fn remove_label(&self, label: &str) {
        let key = ByLabel {
            label: label.into(),
        };
        self.parked.remove(&key);
        for entry in ENTRIES {
            self.pairings.remove(&ByLabelAndEntry {
                label: label.into(),
                entry: entry.as_str().into(),
            });
        }
        self.active_pairs.remove(&key);
        self.redirects.remove(&key);
        self.idle_pairs_closed.remove(&key);
        let kinds = REGISTRATION_RESULTS
            .iter()
            .chain(&CLIENT_REFUSALS)
            .chain(&RENDEZVOUS_RESULTS)
            .chain(&["to_server", "to_client"]);
        for kind in kinds {
            let key = ByLabelAnd {
                label: label.into(),
                kind: (*kind).into(),
            };
            self.registrations.remove(&key);
            self.bytes.remove(&key);
            self.clients_refused.remove(&key);
            self.rendezvous.remove(&key);
        }
    }

    /// Counts a connection the shared port turned away.
    pub fn shared_port_refused(&self, reason: SharedPortRefused) {
        self.shared_port_refused
            .get_or_create(&ByReason {
                reason: SHARED_PORT_REFUSALS[reason as usize].into(),
            })
            .inc();
    }

    /// Counts a connection the edge port accepted (its header checked).
    pub fn edge_connection(&self, kind: taas_protocol::edge::EdgeKind) {
        self.edge_connections
            .get_or_create(&ByKind {
                kind: EDGE_KINDS[edge_kind(kind)].into(),
            })
            .inc();
    }

    /// Counts a connection the edge port turned away.
    pub fn edge_refused(&self, reason: EdgeRefused) {
        self.edge_refused
            .get_or_create(&ByReason {
                reason: EDGE_REFUSALS[reason as usize].into(),
            })
            .inc();
    }

    /// Counts what became of a rendezvous asked about on the edge port.
    pub fn edge_rendezvous(&self, result: EdgeRendezvous) {
        self.edge_rendezvous
            .get_or_create(&ByResult {
                result: EDGE_RENDEZVOUS[result as usize].into(),
            })
            .inc();
    }

    /// Counts an answer to an offered client.
    pub fn edge_offer(&self, answer: OfferAnswer) {
        self.edge_offers
            .get_or_create(&ByAnswer {
                answer: EDGE_OFFERS[answer as usize].into(),
            })
            .inc();
    }

    /// Sets `taas_relay_draining`.
    pub fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    pub fn rejected(&self, reason: &str) {
        self.registrations_rejected
            .get_or_create(&ByReason {
                reason: reason.into(),
            })
            .inc();
    }
}
