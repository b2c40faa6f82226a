//! One label's state machine: its one-shot rendezvous ports p, its pool of parked connections,
//! its persistent client port q, and the pairing of each client with a parked connection.
//!
//! ```text
//! registration ──reserve──▶ p bound ──accept (from the registering source)──▶ parked
//!                               └─ timeout: port released, slot freed          │
//! client on q ──first byte (or serverSpeaksFirst)──▶ take the newest live parked ◀───┘
//!    ├─ nothing within the first-byte timeout, or closed: gone, the pool untouched
//!    └─ none parked: wait (bounded) in a FIFO queue; a newly parked connection goes
//!       straight to the longest-waiting client
//! ```
//!
//! Each parked connection is watched by its own task, which reads nothing it cannot deliver:
//! bytes the hidden server sends before pairing are kept (bounded) and written to the client
//! first; EOF or a reset removes it from the pool at once. Everything here is per label: no
//! lock is shared with other labels (but the relay-wide count of q connections per source).
//!
//! A client on q takes a parked connection only once it has sent its first byte (within the
//! first-byte timeout, 3 s by default): a TCP connection that sends nothing would otherwise
//! hold a parked connection that the hidden server cannot tell from a pairing (its agent
//! replaces a parked connection when bytes arrive), and four idle connections were enough to
//! turn a label's 307s into 503s for as long as they stayed open. Once a byte has arrived, the
//! pairing costs the hidden server a connection, never the pool: the byte reaches the agent,
//! which registers a replacement at once (measured with the real agent, `q_abuse.rs`: 20
//! silent and 20 one-byte-then-stalled connections opened and the pool full again within
//! 26–103 ms; then 30 phones out of 30 served while all of them were held). Labels whose server speaks first pair at
//! accept; their PROXY header (required for them) plays the part of that first byte. A hidden
//! server that speaks unasked (its bytes arrive while parked) is paired at accept too, as
//! before: it cannot tell a silent client from any other, and the TAAS agent never does this.
//!
//! A client that came through the shared client port (`shared_port`) comes with its
//! ClientHello already read, served in place when the shared port accepted it on the label's
//! data-plane thread, handed over to that thread otherwise (`Label::serve_accepted`), and takes
//! the same path as a client on q (`serve_client`): its read bytes count as its first byte and
//! reach the hidden server first, unchanged; its client wait starts at the hand-over.
//!
//! In a cluster's edge mode (`edge`) clients also arrive through the edge port, handed over
//! the same way, and a hidden server's connection may arrive there instead of on its one-shot
//! port: the gateway asks which registration it is for (`Label::claim_rendezvous`, pinned
//! source and local port as on the port itself) and, once it commits, the stream goes to that
//! registration's task as if its port had accepted it. The port keeps listening meanwhile.
//!
//! The pool's counting (reserved ports against maxParked, pairing order, dropping dead
//! connections) is `taas_protocol::pool`, property-tested there; this file holds the sockets
//! and the tasks.
//!
//! Bounded per source (an IPv4 address or IPv6 /64, `sources`): connections open on one
//! label's q and on all labels' together; per label: pairs; per pair: an idle timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use taas_protocol::pool::{self, ParkedId, Pool};
use taas_protocol::proxy_header;
use taas_protocol::sync::{lock, read, write};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{ClientAdmission, LabelConfig, Limits, ProxyProtocol, Timeouts};
use crate::data_plane::Placement;
use crate::metrics::{ClientRefused, LabelMetrics, Rendezvous};
use crate::ports::{PortError, PortLease, PortPool};
use crate::sources::{OwnedSourceSlot, SourceCounts, SourceKey};
use crate::splice;

/// Sources remembered per label for client admission (older ones are forgotten first).
const MAX_ADMITTED_SOURCES: usize = 4096;
/// Backlog of a one-shot rendezvous port: one connection is expected.
const P_BACKLOG: u32 = 8;
/// Backlog of a client port.
const Q_BACKLOG: u32 = 1024;
/// A stranger on a pinned rendezvous port is logged at warn at most this often per label;
/// the others at debug (every one is counted in `taas_rendezvous_total{kind="stranger"}`).
const STRANGER_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What every label of one relay shares: settings and the global pair limit.
#[derive(Debug)]
pub struct Shared {
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// How pairs move their bytes.
    pub splice: splice::SpliceMode,
    /// The address p and q listeners bind to.
    pub bind_ip: IpAddr,
    pub p_ports: Arc<PortPool>,
    pub q_ports: Arc<PortPool>,
    /// Permits for spliced pairs, all labels together.
    pub pairs: Arc<Semaphore>,
    /// Connections open on client ports (each label's q and the shared port) from each
    /// source, all labels together.
    pub client_sources: Arc<SourceCounts>,
    /// Every listening socket, for a successor to take over (`handover`).
    pub listeners: Arc<crate::handover::Listeners>,
}

/// How a client connection came to its label: the label's own client port q, the shared
/// client port (`shared_port`), or the front end's HTTPS port for a direct label (`direct`);
/// the last two read the ClientHello to find the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    OwnPort = 0,
    SharedPort = 1,
    Direct = 2,
}

impl Entry {
    /// The value of the `entry` metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Entry::OwnPort => "own_port",
            Entry::SharedPort => "shared_port",
            Entry::Direct => "direct",
        }
    }
}

/// A client connection for a label, however it arrived: on q (nothing read yet) or through
/// the shared port (its ClientHello already read, and its relay-wide source slot taken while
/// the ClientHello was read). One code path serves both.
pub struct ClientConn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub entry: Entry,
    /// Bytes already read from the client (its ClientHello): written to the hidden server
    /// first, before anything else of the client's.
    pub read_ahead: Vec<u8>,
    /// The relay-wide per-source slot, when the shared port took it already.
    pub relay_slot: Option<OwnedSourceSlot>,
}

/// Why a rendezvous port could not be handed out (the registration gets 503).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the label has reached its limit of {0} parked connections")]
    LabelFull(usize),
    #[error("no free rendezvous port: {0}")]
    NoPort(#[from] PortError),
    #[error("the label is being removed")]
    Closed,
}

/// A hidden server's connection, taken out of the pool for pairing.
struct ParkedConn {
    stream: TcpStream,
    /// Bytes the hidden server sent while parked.
    early: Vec<u8>,
}

/// Where a hidden server's connection is sent: a waiting client, or a client that claimed it.
type Handover = oneshot::Sender<ParkedConn>;
/// A parked connection as the pool holds it: a way to ask its watcher task to hand it over.
type Claim = oneshot::Sender<Handover>;

struct ClientPort {
    port: u16,
    accept_loop: JoinHandle<()>,
}

pub struct Label {
    name: String,
    config: RwLock<Arc<LabelConfig>>,
    /// Parked connections, reserved ports and waiting clients: `taas_protocol::pool` counts,
    /// this file holds the sockets.
    pool: Mutex<Pool<Claim, Handover>>,
    q: Mutex<Option<ClientPort>>,
    admitted: Mutex<HashMap<IpAddr, Instant>>,
    /// Connections open on this label's q from each source.
    client_sources: SourceCounts,
    /// Permits for this label's pairs (and clients waiting for one).
    pairs: Arc<Semaphore>,
    stranger_warn: Mutex<WarnEvery>,
    /// Pending registrations by local one-shot port, for the edge port (`edge`): a gateway
    /// that received the hidden server's connection on a shared rendezvous port asks which
    /// registration it is for. Bounded by the pool's reservations (inserted with one).
    edge_slots: Mutex<HashMap<u16, EdgeSlot>>,
    /// Woken whenever an edge claim ends (committed, given up) or a slot goes: a claim that
    /// found its registration claimed by another edge connection waits on it.
    claims_changed: tokio::sync::Notify,
    closed: AtomicBool,
    /// Turns true when the label closes: pending registrations close their one-shot ports at
    /// once (a watch, so a registration that starts waiting after the close sees it too).
    closing: tokio::sync::watch::Sender<bool>,
    metrics: LabelMetrics,
    shared: Arc<Shared>,
    /// The data-plane thread this label's sockets and tasks live on.
    placement: Placement,
}

impl std::fmt::Debug for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Label").field("name", &self.name).finish()
    }
}

impl Label {
    /// Creates the label on its data-plane thread and binds its client port q (pinned, or
    /// from the q range).
    pub fn start(
        config: LabelConfig,
        shared: Arc<Shared>,
        metrics: LabelMetrics,
        placement: Placement,
    ) -> Result<Arc<Self>, PortError> {
        let label = Arc::new(Self {
            name: config.label.clone(),
            config: RwLock::new(Arc::new(config)),
            pool: Mutex::default(),
            q: Mutex::new(None),
            admitted: Mutex::default(),
            client_sources: SourceCounts::default(),
            pairs: Arc::new(Semaphore::new(
                shared.limits.pairs_per_label.min(Semaphore::MAX_PERMITS),
            )),
            stranger_warn: Mutex::new(WarnEvery::new(STRANGER_WARN_INTERVAL)),
            edge_slots: Mutex::default(),
            claims_changed: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
            metrics,
            shared,
            placement,
        });
        label.bind_client_port()?;
        Ok(label)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> Arc<LabelConfig> {
        read(&self.config).clone()
    }

    pub fn metrics(&self) -> &LabelMetrics {
        &self.metrics
    }

    /// The client port q.
    pub fn client_port(&self) -> Option<u16> {
        lock(&self.q).as_ref().map(|q| q.port)
    }

    /// Clients waiting for a parked connection now.
    pub fn waiting(&self) -> usize {
        lock(&self.pool).waiting()
    }

    /// Parked connections ready for a client now.
    pub fn parked(&self) -> usize {
        lock(&self.pool).parked()
    }

    /// Parked connections and registrations whose hidden server has not connected yet: what
    /// a gateway spreading an agent's registrations over replicas compares.
    pub fn parked_and_pending(&self) -> usize {
        let pool = lock(&self.pool);
        pool.parked() + pool.reserved()
    }

    /// Whether [`Label::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Applies a changed configuration without touching parked connections or pairs; only a
    /// change of the pinned client port rebinds q, and a change of the ID or secret closes the
    /// parked connections (pairs go on).
    pub fn update(self: &Arc<Self>, config: LabelConfig) -> Result<(), PortError> {
        let old = self.config();
        let repin = config.client_port != old.client_port;
        // New credentials (a rotated secret): what was parked with the old ones serves no client.
        let rekeyed = config.secret != old.secret || config.id != old.id;
        *write(&self.config) = Arc::new(config);
        if rekeyed {
            let dropped = lock(&self.pool).clear_parked();
            self.metrics.parked.dec_by(dropped as i64);
            tracing::info!(label = %self.name, dropped, "credentials changed: parked connections closed");
        }
        if repin {
            self.bind_client_port()?;
        }
        Ok(())
    }

    /// Stops accepting on q (a successor accepts there now, so 307s may still name it);
    /// everything else goes on.
    pub fn stop_accepting(&self) {
        if let Some(q) = lock(&self.q).as_ref() {
            q.accept_loop.abort();
        }
    }

    /// Stops the label: q and the pending registrations' one-shot ports close, parked
    /// connections and waiting clients are dropped (their hidden servers see the close and
    /// register again elsewhere). Pairs already spliced run to their end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.closing.send_replace(true);
        if let Some(q) = lock(&self.q).take() {
            q.accept_loop.abort();
        }
        lock(&self.pool).clear();
        self.metrics.parked.set(0);
    }

    fn bind_client_port(self: &Arc<Self>) -> Result<(), PortError> {
        // q and its accept loop belong to the label's data-plane thread.
        let _placed = self.placement.enter();
        // Through the hand-over registry: a predecessor's q is taken over (`handover`).
        let bound = self.shared.listeners.bind_q(
            &self.name,
            self.config().client_port,
            self.shared.bind_ip,
            &self.shared.q_ports,
            Q_BACKLOG,
        )?;
        let (listener, lease) = bound;
        // Set once on q, inherited by every accepted client connection (Linux copies these
        // options from the listening socket): none of them per connection.
        crate::splice::tune_listener(&listener);
        let port = lease.port();
        let accept_loop = tokio::spawn(accept_clients(Arc::downgrade(self), listener, lease));
        if let Some(old) = lock(&self.q).replace(ClientPort { port, accept_loop }) {
            old.accept_loop.abort();
        }
        tracing::info!(label = %self.name, port, "client port listening");
        Ok(())
    }

    /// Whether a registration could get a rendezvous port now (the label is below its limit).
    pub fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// How many more rendezvous ports the label's parked-connection limit allows now.
    pub fn room(&self) -> usize {
        let max_parked = self.config().max_parked;
        lock(&self.pool).room(max_parked)
    }

    /// Hands out a one-shot rendezvous port for a hidden server registering from `source`:
    /// bound before this returns, accepting one connection within the rendezvous timeout.
    pub fn open_rendezvous(self: &Arc<Self>, source: IpAddr) -> Result<u16, Unavailable> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Unavailable::Closed);
        }
        let config = self.config();
        let reservation = lock(&self.pool)
            .reserve(config.max_parked)
            .map_err(|full| Unavailable::LabelFull(full.max_parked))?;
        let reservation = Reserved {
            label: self.clone(),
            reservation: Some(reservation),
        };
        // p, and the parked connection it accepts, belong to the label's data-plane thread.
        let _placed = self.placement.enter();
        let (listener, lease) = self
            .shared
            .p_ports
            .bind_random(self.shared.bind_ip, P_BACKLOG)?;
        let port = lease.port();
        let pinned = config.source_pinning.then_some(source.to_canonical());
        let (deliver, delivered) = mpsc::channel(1);
        let slot = EdgeSlotGuard::insert(self, port, pinned, deliver);
        tokio::spawn(self.clone().await_hidden_server(
            listener,
            lease,
            pinned,
            reservation,
            (slot, delivered),
        ));
        Ok(port)
    }

    /// Claims the pending registration on one of `local_ports` (the local one-shot ports a
    /// shared rendezvous port maps to) for a hidden server connecting from `source`: one
    /// pinned to `source`, or unpinned, and not claimed already. While the claim lives, no
    /// other edge connection can claim it; dropped without [`EdgeClaim::commit`], the
    /// registration stays pending (its own port still open).
    pub fn claim_rendezvous(
        self: &Arc<Self>,
        local_ports: &[u16],
        source: IpAddr,
    ) -> Option<EdgeClaim> {
        self.try_claim(local_ports, source).ok()
    }

    /// [`Label::claim_rendezvous`], but a registration that matches and is claimed by another
    /// edge connection now is waited for, until `deadline`: claimed again if that claim is
    /// given up. Why: with several replicas, a hidden server that registered with two of them
    /// on the same port T may connect to T twice at once; both replicas claim the first
    /// connection, the gateway commits it to one, and the second connection must then find
    /// the other replica's registration free again rather than be told `NOT_MINE`.
    pub async fn claim_rendezvous_within(
        self: &Arc<Self>,
        local_ports: &[u16],
        source: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Option<EdgeClaim> {
        loop {
            let changed = self.claims_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_claim(local_ports, source) {
                Ok(claim) => return Some(claim),
                Err(false) => return None,
                Err(true) => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// A claim, or whether a matching registration is claimed by another edge connection.
    fn try_claim(self: &Arc<Self>, local_ports: &[u16], source: IpAddr) -> Result<EdgeClaim, bool> {
        let source = source.to_canonical();
        let mut slots = lock(&self.edge_slots);
        let mut busy = false;
        for port in local_ports {
            let Some(slot) = slots.get_mut(port) else {
                continue;
            };
            if slot.pinned.is_some_and(|ip| ip != source) {
                continue;
            }
            if slot.claimed {
                busy = true;
                continue;
            }
            slot.claimed = true;
            return Ok(EdgeClaim {
                label: self.clone(),
                port: *port,
                id: slot.id,
                deliver: Some(slot.deliver.clone()),
            });
        }
        Err(busy)
    }

    async fn await_hidden_server(
        self: Arc<Self>,
        listener: TcpListener,
        lease: PortLease,
        pinned: Option<IpAddr>,
        mut reservation: Reserved,
        (slot, mut delivered): (EdgeSlotGuard, mpsc::Receiver<std::net::TcpStream>),
    ) {
        let deadline = tokio::time::sleep(self.shared.timeouts.rendezvous);
        tokio::pin!(deadline);
        let mut closing = self.closing.subscribe();
        let closed = async move {
            // Err: the label is gone, which is a close too.
            let _ = closing.wait_for(|closing| *closing).await;
        };
        tokio::pin!(closed);
        let accepted = loop {
            tokio::select! {
                _ = &mut deadline => break None,
                () = &mut closed => break None,
                // A connection the gateway took on a shared rendezvous port for us (`edge`):
                // the claim checked its source already. It comes from the front end's
                // runtime: registered again on this (the label's) thread.
                Some(stream) = delivered.recv() => match TcpStream::from_std(stream) {
                    Ok(stream) => break Some(stream),
                    Err(error) => {
                        tracing::debug!(label = %self.name, %error, "a connection from the edge port was lost");
                        slot.unclaim();
                        continue;
                    }
                },
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if pinned.is_some_and(|ip| ip != peer.ip().to_canonical()) {
                            // A stranger does not become the hidden server, nor use up the slot.
                            self.metrics.rendezvous(Rendezvous::Stranger);
                            // A flood of strangers must not flood the log: one warning per
                            // label and interval, with the count of those not written.
                            let loud = lock(&self.stranger_warn).check(Instant::now());
                            match loud {
                                Some(suppressed) => tracing::warn!(label = %self.name, %peer, suppressed, "refused a connection to a rendezvous port from another source (more are logged at debug for a minute; `suppressed` were since the last warning)"),
                                None => tracing::debug!(label = %self.name, %peer, "refused a connection to a rendezvous port from another source"),
                            }
                            continue;
                        }
                        break Some(stream);
                    }
                    Err(error) => {
                        tracing::debug!(label = %self.name, %error, "rendezvous accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        };
        // A stream committed through the edge port just as the deadline fired was counted as
        // delivered there: take it rather than drop it.
        let accepted = match accepted {
            None => delivered
                .try_recv()
                .ok()
                .and_then(|stream| TcpStream::from_std(stream).ok()),
            accepted => accepted,
        };
        // The port closes before the connection is parked: one connection per registration.
        // The edge slot goes first, while the port is still leased (so a new registration on
        // the same port cannot be the one removed).
        drop(slot);
        drop(delivered);
        drop(listener);
        drop(lease);
        match accepted {
            Some(stream) if !self.closed.load(Ordering::SeqCst) => {
                self.metrics.rendezvous(Rendezvous::Connected);
                crate::splice::tune(&stream);
                // Parked (or handed to a waiting client) and unreserved in one step.
                let watch = self.enqueue(
                    ParkedConn {
                        stream,
                        early: Vec::new(),
                    },
                    reservation.reservation.take(),
                );
                // This task goes on as the parked connection's watcher: no second task.
                if let Some((id, conn, claimed)) = watch {
                    self.watch_parked(id, conn, claimed).await;
                }
                return;
            }
            Some(_) => {}
            None => {
                self.metrics.rendezvous(Rendezvous::Expired);
                tracing::debug!(label = %self.name, "rendezvous port expired unused");
            }
        }
        drop(reservation);
    }

    /// Puts a hidden server's connection in the pool, or straight into the hands of the
    /// longest-waiting client.
    fn park(self: &Arc<Self>, conn: ParkedConn) {
        if let Some((id, conn, claimed)) = self.enqueue(conn, None) {
            tokio::spawn(self.clone().watch_parked(id, conn, claimed));
        }
    }

    /// `park` without the watcher: hands `conn` to a waiting client, or puts its handle in the
    /// pool and returns what its watcher needs (the caller runs `watch_parked`). The
    /// `reservation` it came through, if any, ends in the same step.
    fn enqueue(
        &self,
        mut conn: ParkedConn,
        reservation: Option<pool::Reservation>,
    ) -> Option<(ParkedId, ParkedConn, oneshot::Receiver<Handover>)> {
        let mut pool = lock(&self.pool);
        while let Some(waiter) = pool.next_waiter() {
            match waiter.send(conn) {
                Ok(()) => {
                    if let Some(reservation) = reservation {
                        pool.release(reservation);
                    }
                    return None;
                }
                Err(back) => conn = back, // that client gave up: try the next one
            }
        }
        let (claim, claimed) = oneshot::channel();
        let id = pool.park(claim, !conn.early.is_empty(), reservation);
        self.metrics.parked.inc();
        Some((id, conn, claimed))
    }

    /// Holds one parked connection until a client claims it or its hidden server goes away.
    async fn watch_parked(
        self: Arc<Self>,
        id: ParkedId,
        mut conn: ParkedConn,
        mut claimed: oneshot::Receiver<Handover>,
    ) {
        // A small buffer in this future and nothing on the heap until bytes arrive: ten
        // thousand parked connections stay small. (Readiness can fire with nothing to read.)
        let limit = self.shared.limits.early_bytes;
        let mut chunk = [0u8; 256];
        loop {
            tokio::select! {
                claim = &mut claimed => {
                    if let Ok(reply) = claim {
                        let _ = reply.send(conn);
                    }
                    // Err: the label was closed and the pool dropped us; the socket closes here.
                    return;
                }
                ready = conn.stream.readable() => {
                    if ready.is_err() {
                        break;
                    }
                    match conn.stream.try_read(&mut chunk) {
                        Ok(0) => break, // EOF: the hidden server went away
                        Ok(n) if conn.early.len() + n <= limit => {
                            if conn.early.is_empty() {
                                self.mark_spoke(id);
                            }
                            conn.early.extend_from_slice(&chunk[..n]);
                        }
                        Ok(_) => {
                            tracing::warn!(label = %self.name, limit, "a parked connection sent more than the early-data limit before pairing; dropped");
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break, // reset
                    }
                }
            }
        }
        if lock(&self.pool).remove(id).is_some() {
            self.metrics.parked.dec();
        }
        tracing::debug!(label = %self.name, "a parked connection closed before pairing");
    }

    /// Notes that parked connection `id` has sent bytes (once, when its first ones arrive).
    fn mark_spoke(&self, id: ParkedId) {
        lock(&self.pool).mark_spoke(id);
    }

    /// The newest live parked connection, if any.
    async fn take_parked(&self) -> Option<ParkedConn> {
        loop {
            let claim = lock(&self.pool).take_newest()?;
            self.metrics.parked.dec();
            if let Some(conn) = Self::claim(claim).await {
                return Some(conn);
            }
            // its watcher just saw the connection end: the next one
        }
    }

    /// The newest parked connection if its hidden server has spoken already (it speaks
    /// first, unasked, and gets its client as soon as one connects).
    async fn take_parked_that_spoke(&self) -> Option<ParkedConn> {
        let claim = lock(&self.pool).take_newest_if_spoke()?;
        self.metrics.parked.dec();
        Self::claim(claim).await
    }

    /// Asks a parked connection's watcher for it; `None` if it has just ended.
    async fn claim(claim: Claim) -> Option<ParkedConn> {
        let (reply, answer) = oneshot::channel();
        claim.send(reply).ok()?;
        answer.await.ok()
    }

    /// A parked connection for a client: one now, or the next one to be parked before
    /// `wait_until` (the client wait after its accept). `Err` says why the client is turned
    /// away.
    async fn pair_for_client(
        self: &Arc<Self>,
        wait_until: tokio::time::Instant,
    ) -> Result<ParkedConn, ClientRefused> {
        if let Some(conn) = self.take_parked().await {
            return Ok(conn);
        }
        let (waiter, arrival) = oneshot::channel();
        let limit = self.shared.limits.waiting_clients_per_label;
        {
            let mut pool = lock(&self.pool);
            // Checked under the pool's lock: `close` clears the pool after setting the flag,
            // so a client either sees the close here or is dropped by that clear.
            if self.closed.load(Ordering::SeqCst) {
                return Err(ClientRefused::Timeout);
            }
            pool.wait(waiter, limit, |waiter| waiter.is_closed())
                .map_err(|pool::QueueFull| ClientRefused::QueueFull)?;
        }
        // A connection parked between the first look and joining the queue is in the pool:
        // `park` only hands over to clients already waiting. Look once more, then wait.
        let mut arrival = arrival;
        let outcome = match self.take_parked().await {
            Some(conn) => Ok(conn),
            None => match tokio::time::timeout_at(wait_until, &mut arrival).await {
                Ok(Ok(conn)) => Ok(conn),
                _ => Err(ClientRefused::Timeout),
            },
        };
        // A connection handed to us just as we stopped waiting must not be lost.
        arrival.close();
        if let Ok(late) = arrival.try_recv() {
            match outcome {
                Ok(_) => self.park(late),
                Err(_) => return Ok(late),
            }
        }
        outcome
    }

    /// Answers a mobile client's request for this label: `Some(q)` to redirect it to, when a
    /// hidden server is parked or connecting ([`taas_protocol::pool::Pool::serves_soon`]), and
    /// remembers the source for client admission.
    pub fn redirect(&self, source: IpAddr) -> Option<u16> {
        if !lock(&self.pool).serves_soon() {
            return None;
        }
        let port = self.client_port()?;
        if self.config().client_admission == ClientAdmission::Redirected {
            self.admit(source.to_canonical(), Instant::now());
        }
        self.metrics.redirects.inc();
        Some(port)
    }

    fn admit(&self, source: IpAddr, now: Instant) {
        let mut admitted = lock(&self.admitted);
        if admitted.len() >= MAX_ADMITTED_SOURCES && !admitted.contains_key(&source) {
            let window = self.shared.timeouts.admission;
            admitted.retain(|_, at| now.duration_since(*at) < window);
            if admitted.len() >= MAX_ADMITTED_SOURCES {
                if let Some(oldest) = admitted
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(ip, _)| *ip)
                {
                    admitted.remove(&oldest);
                }
            }
        }
        admitted.insert(source, now);
    }

    /// The sources admitted within the admission window, with how long ago: what a
    /// successor is told on a hand-over (`handover::send_admissions`).
    pub fn admitted(&self) -> Vec<(IpAddr, Duration)> {
        let window = self.shared.timeouts.admission;
        let now = Instant::now();
        lock(&self.admitted)
            .iter()
            .map(|(source, at)| (*source, now.saturating_duration_since(*at)))
            .filter(|(_, age)| *age < window)
            .collect()
    }

    /// Admits `source` as if redirected `age` ago (by a predecessor, `handover`).
    pub fn admit_since(&self, source: IpAddr, age: Duration) {
        let now = Instant::now();
        if age < self.shared.timeouts.admission {
            self.admit(source.to_canonical(), now.checked_sub(age).unwrap_or(now));
        }
    }

    fn is_admitted(&self, source: IpAddr) -> bool {
        match lock(&self.admitted).get(&source.to_canonical()) {
            Some(at) => at.elapsed() < self.shared.timeouts.admission,
            None => false,
        }
    }

    /// Serves a client connection accepted elsewhere than q (the shared port, which accepts
    /// on every data-plane thread): in place when the caller runs on the label's own thread,
    /// exactly as q would (no socket re-registered, no task crossing threads); handed over to
    /// that thread otherwise.
    pub async fn serve_accepted(self: Arc<Self>, client: ClientConn) {
        if self.placement.is_current() {
            self.serve_client(client, None).await
        } else {
            self.hand_over(client)
        }
    }

    /// Gives the label a client connection accepted elsewhere (the front end's runtime,
    /// another data-plane thread): it moves to the label's data-plane thread and is served
    /// there exactly as a connection accepted on q is.
    pub fn hand_over(self: &Arc<Self>, client: ClientConn) {
        self.hand_over_as(client, None)
    }

    /// `hand_over` for a client that connected somewhere else than the stream's local
    /// address: through the edge port (`edge`), the gateway's address and port from the edge
    /// header. A PROXY header names `local` as the destination.
    pub fn hand_over_as(self: &Arc<Self>, client: ClientConn, local: Option<SocketAddr>) {
        let ClientConn {
            stream,
            peer,
            entry,
            read_ahead,
            relay_slot,
        } = client;
        // A tokio socket belongs to the runtime that registered it: deregister it here and
        // register it again on the label's thread.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(label = %self.name, %peer, %error, "client lost at hand-over");
                return;
            }
        };
        let label = self.clone();
        self.placement.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    label
                        .serve_client(
                            ClientConn {
                                stream,
                                peer,
                                entry,
                                read_ahead,
                                relay_slot,
                            },
                            local,
                        )
                        .await
                }
                Err(error) => {
                    tracing::debug!(label = %label.name, %peer, %error, "client lost at hand-over")
                }
            }
        });
    }

    /// Serves one client connection (accepted on q, or handed over by the shared port): wait
    /// for its first byte (unless the server speaks first, or bytes were read already), pair
    /// it, then splice until both sides are done or the pair idles.
    /// `local`: where the client connected, when not the stream's local address.
    async fn serve_client(self: Arc<Self>, conn: ClientConn, local: Option<SocketAddr>) {
        let ClientConn {
            stream: client,
            peer,
            entry,
            read_ahead,
            relay_slot,
        } = conn;
        let config = self.config();
        // A direct client never gets a 307 (it is the point): admission gates q and the shared
        // port only.
        if entry != Entry::Direct
            && config.client_admission == ClientAdmission::Redirected
            && !self.is_admitted(peer.ip())
        {
            self.metrics.client_refused(ClientRefused::NotAdmitted);
            tracing::debug!(label = %self.name, %peer, "client not admitted: no recent 307");
            return;
        }
        let limits = &self.shared.limits;
        let source = SourceKey::of(peer.ip());
        // Held until the connection closes: one source cannot hold all of q.
        let relay_slot = match relay_slot {
            Some(slot) => Some(slot),
            None => self
                .shared
                .client_sources
                .try_acquire_owned(source, limits.clients_per_source),
        };
        let Some(_relay_slot) = relay_slot else {
            return self.refuse_source(peer);
        };
        let Some(_label_slot) = self
            .client_sources
            .try_acquire(source, limits.clients_per_source_per_label)
        else {
            return self.refuse_source(peer);
        };
        let accepted_at = tokio::time::Instant::now();
        let wait_until = accepted_at + self.shared.timeouts.client_wait;
        let silent_at = accepted_at + self.shared.timeouts.first_byte;
        // Open when the client may have a parked connection: it has sent a byte, or the
        // label's server speaks first, or the newest parked connection's server already has.
        let spoken = if config.server_speaks_first {
            None
        } else if let Some(conn) = self.take_parked_that_spoke().await {
            Some(conn)
        } else if !read_ahead.is_empty() {
            None // its first bytes are in hand
        } else {
            match first_byte(&client, silent_at.min(wait_until)).await {
                FirstByte::Arrived => None,
                FirstByte::Closed => {
                    // A port scan, a health check: it never touched the pool.
                    tracing::debug!(label = %self.name, %peer, "client left before its first byte");
                    return;
                }
                FirstByte::Silent => {
                    // The client wait can end first (when shorter); then it was a timeout
                    // as long as there was nothing to pair it with anyway.
                    let reason = if silent_at <= wait_until || self.parked() > 0 {
                        ClientRefused::Silent
                    } else {
                        ClientRefused::Timeout
                    };
                    self.metrics.client_refused(reason);
                    tracing::debug!(label = %self.name, %peer, ?reason, "client sent nothing in time; closed");
                    return;
                }
            }
        };
        let permits = self.pair_permits();
        let (_label_permit, _permit) = match permits {
            Ok(permits) => permits,
            Err(reason) => {
                if let Some(conn) = spoken {
                    self.park(conn); // untouched: its hidden server saw nothing
                }
                self.metrics.client_refused(reason);
                tracing::debug!(label = %self.name, %peer, ?reason, "pair limit reached; client closed");
                return;
            }
        };
        let mut server = match spoken {
            Some(conn) => conn,
            None => match self.pair_for_client(wait_until).await {
                Ok(conn) => conn,
                Err(reason) => {
                    self.metrics.client_refused(reason);
                    tracing::debug!(label = %self.name, %peer, ?reason, "client closed unpaired");
                    return;
                }
            },
        };
        let mut client = client;
        // No Nagle, keepalive: from the listener it came through.
        crate::splice::tune_accepted(&client);
        self.metrics.paired(entry);
        self.metrics.active_pairs.inc();
        let result = self
            .splice_pair(
                &mut client,
                (peer, local),
                &read_ahead,
                &mut server,
                config.proxy_protocol,
            )
            .await;
        self.metrics.active_pairs.dec();
        match result {
            Ok(spliced) => {
                let copied = spliced.copied;
                self.metrics.bytes_to_server.inc_by(copied.a_to_b);
                self.metrics.bytes_to_client.inc_by(copied.b_to_a);
                self.metrics.spliced_bytes.inc_by(copied.spliced);
                if spliced.idle {
                    self.metrics.idle_pairs_closed.inc();
                }
                tracing::debug!(label = %self.name, %peer, to_server = copied.a_to_b, to_client = copied.b_to_a, spliced = copied.spliced, idle = spliced.idle, "pair finished");
            }
            Err(error) => {
                tracing::debug!(label = %self.name, %peer, %error, "pair ended with an error");
            }
        }
    }

    /// A permit of the label's pair limit, then one of the relay's.
    fn pair_permits(&self) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), ClientRefused> {
        let Ok(label) = self.pairs.clone().try_acquire_owned() else {
            return Err(ClientRefused::LabelPairs);
        };
        let Ok(relay) = self.shared.pairs.clone().try_acquire_owned() else {
            tracing::warn!(label = %self.name, "global pair limit reached; client closed");
            return Err(ClientRefused::Overloaded);
        };
        Ok((label, relay))
    }

    fn refuse_source(&self, peer: SocketAddr) {
        self.metrics.client_refused(ClientRefused::SourceLimit);
        tracing::debug!(label = %self.name, %peer, "too many connections on q from this source; client closed");
    }

    async fn splice_pair(
        &self,
        client: &mut TcpStream,
        (peer, local): (SocketAddr, Option<SocketAddr>),
        read_ahead: &[u8],
        server: &mut ParkedConn,
        proxy: ProxyProtocol,
    ) -> std::io::Result<splice::Spliced> {
        let local = match (proxy, local) {
            (ProxyProtocol::None, _) => None,
            (_, Some(local)) => Some(local),
            (_, None) => Some(client.local_addr()?),
        };
        let header = match (proxy, local) {
            (ProxyProtocol::V1, Some(local)) => Some(proxy_header::v1(peer, local)),
            (ProxyProtocol::V2, Some(local)) => Some(proxy_header::v2(peer, local)),
            _ => None,
        };
        if let Some(header) = header {
            server.stream.write_all(&header).await?;
        }
        // The client's bytes read before pairing (the shared port's ClientHello), unchanged.
        if !read_ahead.is_empty() {
            server.stream.write_all(read_ahead).await?;
        }
        if !server.early.is_empty() {
            client.write_all(&server.early).await?;
        }
        let mut spliced = splice::splice_until_idle(
            client,
            &mut server.stream,
            self.shared.timeouts.pair_idle,
            self.shared.splice,
        )
        .await?;
        spliced.copied.b_to_a += server.early.len() as u64;
        spliced.copied.a_to_b += read_ahead.len() as u64;
        Ok(spliced)
    }
}

/// What a new client on q did first.
#[derive(Debug, PartialEq, Eq)]
enum FirstByte {
    /// It has bytes waiting (they stay in the socket for the splice).
    Arrived,
    /// It closed (or reset) without sending anything.
    Closed,
    /// Nothing within the first-byte timeout.
    Silent,
}

async fn first_byte(client: &TcpStream, deadline: tokio::time::Instant) -> FirstByte {
    let mut probe = [0u8; 1];
    match tokio::time::timeout_at(deadline, client.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => FirstByte::Arrived,
        Ok(_) => FirstByte::Closed,
        Err(_) => FirstByte::Silent,
    }
}

/// At most one loud log line per interval: says whether to log this event loudly, and how
/// many were kept quiet since the last loud one.
#[derive(Debug)]
struct WarnEvery {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnEvery {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(quiet ones since the last loud one)` if this event is to be logged loudly.
    fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Gives a reserved slot back when its rendezvous ends without a parked connection, however
/// it ends (expired, a bind error, the label closed, the task dropped).
struct Reserved {
    label: Arc<Label>,
    /// Taken when the connection is parked: the pool ends it then.
    reservation: Option<pool::Reservation>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            lock(&self.label.pool).release(reservation);
        }
    }
}

/// A pending registration as the edge port sees it (`Label::claim_rendezvous`).
struct EdgeSlot {
    /// Which registration this is (ports are reused).
    id: u64,
    pinned: Option<IpAddr>,
    /// An edge connection holds a claim on it now.
    claimed: bool,
    /// To the registration's task (`await_hidden_server`).
    deliver: mpsc::Sender<std::net::TcpStream>,
}

/// Removes a registration's edge slot when its task ends, however it ends.
struct EdgeSlotGuard {
    label: std::sync::Weak<Label>,
    port: u16,
    id: u64,
}

impl EdgeSlotGuard {
    fn insert(
        label: &Arc<Label>,
        port: u16,
        pinned: Option<IpAddr>,
        deliver: mpsc::Sender<std::net::TcpStream>,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let slot = EdgeSlot {
            id,
            pinned,
            claimed: false,
            deliver,
        };
        lock(&label.edge_slots).insert(port, slot);
        Self {
            label: Arc::downgrade(label),
            port,
            id,
        }
    }
}

impl EdgeSlotGuard {
    /// The registration may be claimed again (a committed stream was lost on the way).
    fn unclaim(&self) {
        if let Some(label) = self.label.upgrade() {
            if let Some(slot) = lock(&label.edge_slots).get_mut(&self.port) {
                if slot.id == self.id {
                    slot.claimed = false;
                }
            }
            label.claims_changed.notify_waiters();
        }
    }
}

impl Drop for EdgeSlotGuard {
    fn drop(&mut self) {
        if let Some(label) = self.label.upgrade() {
            let mut slots = lock(&label.edge_slots);
            if slots.get(&self.port).is_some_and(|slot| slot.id == self.id) {
                slots.remove(&self.port);
            }
            drop(slots);
            label.claims_changed.notify_waiters();
        }
    }
}

/// An edge connection's claim on a pending registration (`Label::claim_rendezvous`): commit
/// it to give the registration the connection, or drop it to give the claim up.
pub struct EdgeClaim {
    label: Arc<Label>,
    port: u16,
    id: u64,
    /// Taken by `commit`.
    deliver: Option<mpsc::Sender<std::net::TcpStream>>,
}

impl std::fmt::Debug for EdgeClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeClaim")
            .field("label", &self.label.name)
            .field("port", &self.port)
            .finish()
    }
}

impl EdgeClaim {
    /// The local one-shot port of the registration claimed.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Gives the registration `stream`, as if its own port had accepted it: it is parked
    /// (or handed to a waiting client). `false` if the registration ended meanwhile (it
    /// expired, its own port took a connection, the label closed): the stream is closed.
    pub fn commit(mut self, stream: TcpStream) -> bool {
        // The registration's task runs on the label's data-plane thread: hand it a std
        // socket, which it registers there (as `hand_over` does for clients).
        let Ok(stream) = stream.into_std() else {
            return false; // still uncommitted: the drop gives the claim up
        };
        match self.deliver.take() {
            Some(deliver) => deliver.try_send(stream).is_ok(),
            None => false,
        }
    }
}

impl Drop for EdgeClaim {
    fn drop(&mut self) {
        // Not committed: the registration stays pending, claimable again.
        if self.deliver.is_some() {
            if let Some(slot) = lock(&self.label.edge_slots).get_mut(&self.port) {
                if slot.id == self.id {
                    slot.claimed = false;
                }
            }
            self.label.claims_changed.notify_waiters();
        }
    }
}

async fn accept_clients(label: std::sync::Weak<Label>, listener: TcpListener, lease: PortLease) {
    let _lease = lease;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(label) = label.upgrade() else { return };
                tokio::spawn(label.serve_client(
                    ClientConn {
                        stream,
                        peer,
                        entry: Entry::OwnPort,
                        read_ahead: Vec::new(),
                        relay_slot: None,
                    },
                    None,
                ));
            }
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                tracing::warn!(%error, "client port accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_with_the_count_kept_quiet() {
        let mut warn = WarnEvery::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(warn.check(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(warn.check(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(warn.check(t0 + Duration::from_secs(60)), Some(500));
        assert_eq!(warn.check(t0 + Duration::from_secs(61)), None);
        assert_eq!(warn.check(t0 + Duration::from_secs(200)), Some(1));
    }

    #[tokio::test]
    async fn first_byte_tells_bytes_from_a_close_and_from_silence() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wait = Duration::from_millis(200);
        let deadline = || tokio::time::Instant::now() + wait;

        let mut talker = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        talker.write_all(b"x").await.unwrap();
        assert_eq!(first_byte(&accepted, deadline()).await, FirstByte::Arrived);
        let mut kept = [0u8; 1];
        assert_eq!(accepted.try_read(&mut kept).unwrap(), 1, "the byte stays");

        let leaver = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        drop(leaver);
        assert_eq!(first_byte(&accepted, deadline()).await, FirstByte::Closed);

        let _silent = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        assert_eq!(first_byte(&accepted, deadline()).await, FirstByte::Silent);
        assert!(started.elapsed() >= wait);
    }
}
