//! `taas-relay gateway`: the registrar and redirect front end of a cluster. It terminates
//! TLS and dispatches by Host like the standalone relay, but answers nothing itself: each
//! registration and each mobile request is forwarded, as plain HTTP with the client's address
//! in `taas-client-addr`, to the control port of that label's relay, and the relay's answer
//! is returned. Stateless: any number of replicas can run behind one Service. This module is
//! the gateway's routing and upstream side (the `LabelBackend` the front end calls); its
//! process set-up (listener, certificate, the files it follows) is `run::gateway`.
//!
//! Upstream connections (issue 13, item 3):
//! - **Registrations**: each front-end connection keeps its own upstream connection to each
//!   relay it talked to, so a hidden server's kept-alive registrations stay one connection end
//!   to end (the relay's per-connection token rules see what the hidden server did).
//! - **Client requests** (the GETs answered with 307s) share a pool of kept-alive connections
//!   per relay address. Before, each one opened and closed its own: 500 GETs on one TLS
//!   connection left 500 TIME_WAIT sockets towards the relay's control port, which off
//!   loopback exhausts the ephemeral ports at a few hundred requests a second, after which
//!   the label's registrations fail too. Now the same 500 GETs use one connection
//!   (`five_hundred_client_requests_on_one_connection_open_a_handful_of_upstream_connections`).
//!   Bounded: [`PoolLimits::per_relay`] connections to one relay at once, in use or idle
//!   (more requests wait for one, within the answer deadline); [`PoolLimits::idle_total`]
//!   idle overall; idle ones closed by the gateway after [`PoolLimits::idle_timeout`] (10 s),
//!   well before the relay's 30 s keep-alive, so the relay is not the one closing under a
//!   request. A pooled connection found dead anyway (the relay restarted) costs the GET one
//!   retry on a fresh connection, never a 503; a registration is never retried.
//! - **Names** (`taas-X-control.NS.svc.cluster.local.:8080`) are resolved once and cached for
//!   5 s (a relay's Service can be recreated with a new IP), a failure for 1 s, at most 4096
//!   names.
//!
//! Strangers (issue 13, items 3 and 4):
//! - A per-source token bucket on 307s ([`crate::rate_limit`], default 20/s, burst 100):
//!   beyond it, 429 with `Retry-After`, counted in `taas_gateway_redirects_limited_total`.
//!   Registrations are not limited here: the relay's guard limits their failures.
//! - With `--gateway-secret-file`, every request forwarded to LABEL's relay carries LABEL's
//!   gateway token ([`crate::gateway_auth`]), so relays can refuse anyone else on their
//!   control port. The secret is re-read on change and never logged; the header value is
//!   marked sensitive.
//!
//! Replicas (issue 16): a route's `relay` (and `edge`) is one `HOST:PORT` or a list of them,
//! and every address each resolves to is one replica of the label's relay (a headless
//! Service lists one address per ready pod). A registration goes to the replica with the
//! fewest parked connections and pending registrations as its last answer said
//! (`taas-parked`, remembered per replica address for 30 s, at most 4096; unknown counts as
//! 0, ties rotated), so an agent's registrations spread evenly and a fresh replica fills
//! first; a replica that answers `taas-draining: 1`, or cannot be reached, costs a try on the
//! next one (counted in `taas_gateway_registrations_retried_total{reason}`); every other
//! answer (401, 429, ...) is passed on. A client request (a GET) goes first to the replica
//! with the most parked connections known, and on to the next on a 503 or a failure.
//!
//! The cluster edge (issue 15.3): raw TCP forwarded to each label's relay by server name
//! (shared port, direct labels on HTTPS) and by rendezvous port, is [`edge`]; what it looks
//! up in the routes is [`edge_index`] (pure).

pub mod edge;
pub mod edge_index;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::Request;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use taas_protocol::answer::{
    Answer, ClientRequest, Registration, CLIENT_ADDR_HEADER, DRAINING_HEADER, EXPECTED_HEADER,
    PARKED_HEADER, RENDEZVOUS_COUNT_HEADER,
};
use taas_protocol::sync::{lock, read, write};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::frontend::LabelBackend;
pub use crate::gateway::edge_index::{EdgeIndex, EdgeTarget, NameLookup};
use crate::gateway_auth::{InstallSecret, GATEWAY_AUTH_HEADER};
use crate::rate_limit::{RateLimit, SourceRateLimiter};

/// How long the gateway waits to connect to a relay, and for its answer. A relay that went
/// away costs a client at most this, never a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a mobile GET is held when no replica has a parked connection but the label's
/// hidden server registered lately (its agent parks again within moments), and how often the
/// replicas are asked again meanwhile.
const GET_WAIT: Duration = Duration::from_secs(3);
const GET_POLL: Duration = Duration::from_millis(100);
/// How long a registration that found every replica draining waits for a new one to appear
/// under the label's name, and how often the name is looked up again meanwhile (at most
/// every 250 ms anyway: `REFRESH_MIN_AGE`).
const REGISTER_WAIT: Duration = Duration::from_secs(3);
const REGISTER_POLL: Duration = Duration::from_millis(250);
/// How long clients are told to wait when a label's relay is not ready.
const RETRY_NOT_READY: Duration = Duration::from_secs(5);
/// Relays one front-end connection keeps connections to.
const MAX_UPSTREAMS: usize = 8;
/// Largest answer body taken from a relay (a `HOST:PORT` line or nothing).
const MAX_ANSWER_BODY: usize = 4096;
/// Headers of a relay's answer passed on to the client.
const PASSED_HEADERS: [&str; 6] = [
    "content-type",
    "www-authenticate",
    "retry-after",
    "allow",
    "location",
    "cache-control",
];

/// Replicas of one label's relay tried for one request or connection at most (a bound on
/// what a routes file or a name's addresses can cost).
pub const MAX_REPLICAS: usize = 16;

/// A label relay's address in a route: one `HOST:PORT`, or a list of them (YAML). Every
/// address each one resolves to is a replica (a headless Service's name resolves to one
/// address per ready pod).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum Replicas {
    One(String),
    Many(Vec<String>),
}

impl Replicas {
    /// The `HOST:PORT` names, in the route's order.
    pub fn names(&self) -> &[String] {
        match self {
            Self::One(name) => std::slice::from_ref(name),
            Self::Many(names) => names,
        }
    }
}

impl From<&str> for Replicas {
    fn from(name: &str) -> Self {
        Self::One(name.to_string())
    }
}

impl From<String> for Replicas {
    fn from(name: String) -> Self {
        Self::One(name)
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// Where a label's relay answers, and whether it is ready to. The edge fields (issue 15.3)
/// are optional, so a routes file written before them still reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Route {
    /// `host:port` of the relay's control port (or a list: see [`Replicas`]).
    pub relay: Replicas,
    #[serde(default = "ready_default")]
    pub ready: bool,
    /// `host:port` of the relay's edge port (or a list: see [`Replicas`]); absent: the label
    /// is not in edge mode (the gateway forwards no raw connection to it).
    #[serde(default)]
    pub edge: Option<Replicas>,
    /// A direct label: its server name on the gateway's HTTPS port is forwarded raw (with
    /// `edge`), never terminated here.
    #[serde(default)]
    pub direct: bool,
    /// The shared rendezvous ports T this label owns, in the order of its relay's local p
    /// ports (slices of different labels may overlap).
    #[serde(default)]
    pub rendezvous: Vec<u16>,
}

impl Route {
    /// A route to the control port `relay`, ready, not in edge mode.
    pub fn new(relay: impl Into<String>) -> Self {
        Self {
            relay: Replicas::One(relay.into()),
            ready: true,
            edge: None,
            direct: false,
            rendezvous: Vec::new(),
        }
    }
}

fn ready_default() -> bool {
    true
}

/// The routes and what is looked up in them by connection (built together, swapped together).
#[derive(Debug, Default)]
struct Routes {
    by_label: HashMap<String, Route>,
    edge: Arc<EdgeIndex>,
}

/// Label → route, replaced whole whenever the source (the cluster's `TaasLabel` objects, or a
/// file) changes; with it, the edge's index ([`EdgeIndex`]), rebuilt on every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<Arc<Routes>>,
}

impl RouteTable {
    pub fn get(&self, label: &str) -> Option<Route> {
        read(&self.routes).by_label.get(label).cloned()
    }

    /// The edge's index as of now (a snapshot: a change later builds a new one).
    pub fn edge(&self) -> Arc<EdgeIndex> {
        read(&self.routes).edge.clone()
    }

    pub fn replace(&self, routes: HashMap<String, Route>) {
        let mut current = write(&self.routes);
        if current.by_label != routes {
            let edge = Arc::new(EdgeIndex::build(&routes));
            tracing::info!(
                labels = routes.len(),
                edge_labels = edge.labels(),
                "routes updated"
            );
            *current = Arc::new(Routes {
                by_label: routes,
                edge,
            });
        }
    }
}

/// Reads a routes file (YAML, `LABEL: {relay: HOST:PORT, ready: true}`); labels in lower
/// case. A problem names what is wrong; the caller keeps the last good routes.
pub fn read_route_file(path: &Path) -> Result<HashMap<String, Route>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let routes =
        serde_yaml::from_str::<HashMap<String, Route>>(&text).map_err(|e| e.to_string())?;
    for (label, route) in &routes {
        let empty = |replicas: &Replicas| replicas.names().is_empty();
        if empty(&route.relay) || route.edge.as_ref().is_some_and(empty) {
            return Err(format!("{label}: an empty list of relay addresses"));
        }
    }
    Ok(routes
        .into_iter()
        .map(|(label, route)| (label.to_ascii_lowercase(), route))
        .collect())
}

pub struct Gateway {
    routes: Arc<RouteTable>,
    registrar: String,
    upstream: Arc<UpstreamShared>,
    redirect_limiter: Mutex<SourceRateLimiter>,
    metrics: Arc<GatewayMetrics>,
}

/// What the gateway's upstream connections share: the client-request pool, the name cache,
/// the replicas' last known loads, the install secret and the counters.
struct UpstreamShared {
    pool: UpstreamPool,
    resolver: Arc<RelayResolver>,
    loads: Mutex<ReplicaLoads>,
    /// Turns the order of replicas with equal loads.
    turn: AtomicUsize,
    secret: Arc<SecretSlot>,
    metrics: Arc<GatewayMetrics>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByOutcome {
    outcome: &'static str,
}

/// Why a registration was sent on to another replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retried {
    /// The replica answered 503 with `taas-draining: 1`.
    Draining,
    /// The replica could not be reached, or did not answer in time.
    Unreachable,
}

impl Retried {
    const ALL: [Retried; 2] = [Self::Draining, Self::Unreachable];

    fn as_str(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Unreachable => "unreachable",
        }
    }
}

/// The gateway's own counters.
pub struct GatewayMetrics {
    redirects_limited: Counter,
    upstream_connections_opened: Counter,
    relay_lookups: Counter,
    registrations_retried: Family<ByReason, Counter>,
    clients_held: Family<ByOutcome, Counter>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let metrics = Self {
            redirects_limited: Counter::default(),
            upstream_connections_opened: Counter::default(),
            relay_lookups: Counter::default(),
            registrations_retried: Family::default(),
            clients_held: Family::default(),
        };
        for outcome in ["served", "unavailable"] {
            let _ = metrics.clients_held.get_or_create(&ByOutcome { outcome });
        }
        for reason in Retried::ALL {
            let _ = metrics.registrations_retried.get_or_create(&ByReason {
                reason: reason.as_str(),
            });
        }
        metrics
    }
}

impl GatewayMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "taas_gateway_redirects_limited",
            "Client requests answered 429 by the per-source limit on 307s",
            self.redirects_limited.clone(),
        );
        registry.register(
            "taas_gateway_upstream_connections_opened",
            "TCP connections opened to relays' control ports (registrations and client requests)",
            self.upstream_connections_opened.clone(),
        );
        registry.register(
            "taas_gateway_relay_lookups",
            "Name resolutions of relay addresses (cache misses)",
            self.relay_lookups.clone(),
        );
        registry.register(
            "taas_gateway_registrations_retried",
            "Registrations sent on to another replica of the label's relay, by why (draining: \
             the replica answered taas-draining; unreachable: not reached or no answer in time)",
            self.registrations_retried.clone(),
        );
        registry.register(
            "taas_gateway_clients_held",
            "Mobile GETs that found nothing parked on any replica of a label whose hidden server \
             registered lately, held while the replicas were asked again, by outcome (served: a \
             replica redirected within the hold; unavailable: 503 at its end)",
            self.clients_held.clone(),
        );
    }

    /// A GET held for a parked connection ended: `served` or not.
    fn client_waited(&self, served: bool) {
        let outcome = if served { "served" } else { "unavailable" };
        self.clients_held
            .get_or_create(&ByOutcome { outcome })
            .inc();
    }

    fn retried(&self, reason: Retried) {
        self.registrations_retried
            .get_or_create(&ByReason {
                reason: reason.as_str(),
            })
            .inc();
    }
}

impl Gateway {
    pub fn new(
        routes: Arc<RouteTable>,
        registrar: impl Into<String>,
        settings: UpstreamSettings,
        secret: Arc<SecretSlot>,
        metrics: Arc<GatewayMetrics>,
    ) -> Self {
        Self {
            routes,
            registrar: registrar.into(),
            upstream: Arc::new(UpstreamShared {
                pool: UpstreamPool::new(settings.pool),
                resolver: Arc::default(),
                loads: Mutex::default(),
                turn: AtomicUsize::new(0),
                secret,
                metrics: metrics.clone(),
            }),
            redirect_limiter: Mutex::new(SourceRateLimiter::new(settings.redirect_limit)),
            metrics,
        }
    }

    /// What the edge needs of the upstream side: relay names resolved through the same
    /// cache, and the install secret.
    pub(crate) fn relay_connector(&self) -> RelayConnector {
        RelayConnector {
            resolver: self.upstream.resolver.clone(),
            metrics: self.upstream.metrics.clone(),
        }
    }

    pub(crate) fn secret(&self) -> Arc<SecretSlot> {
        self.upstream.secret.clone()
    }

    /// Closes the client-request pool's idle connections once past their idle timeout, every
    /// half of it (at least every 100 ms), until the task is dropped.
    pub fn sweep_idle_connections(&self) -> impl Future<Output = ()> + Send + 'static {
        let upstream = self.upstream.clone();
        let every = (upstream.pool.limits.idle_timeout / 2).max(Duration::from_millis(100));
        async move {
            loop {
                tokio::time::sleep(every).await;
                upstream.pool.sweep(Instant::now());
            }
        }
    }

    /// The replicas of `relays`, or the 503 a client gets when there is none (logged as the
    /// route's readiness says).
    async fn replicas(&self, label: &str, route: &Route) -> Result<Vec<SocketAddr>, Answer> {
        match self
            .upstream
            .resolver
            .resolve_all(&control_set(label, route), &self.metrics)
            .await
        {
            Ok(replicas) => Ok(replicas),
            Err(error) => {
                self.unavailable(label, route, &format!("relay unreachable: {error}"));
                Err(Answer::unavailable(RETRY_NOT_READY))
            }
        }
    }

    fn unavailable(&self, label: &str, route: &Route, problem: &str) {
        // A route marked unready is still tried: the flag comes through a mounted ConfigMap,
        // which kubelet refreshes up to a minute late, while the relay's control Service
        // resolves to the new pod as soon as it is ready. Unreachable: 503 either way.
        if route.ready {
            tracing::warn!(%label, relay = %route.relay, "{problem}");
        } else {
            tracing::debug!(%label, relay = %route.relay, "{problem} (route not ready yet)");
        }
    }

    /// The request as forwarded to LABEL's relay: the client's address, and the gateway
    /// token of that label when the install secret is known.
    fn request(
        &self,
        method: &str,
        path: &str,
        host: &str,
        source: IpAddr,
        label: &str,
    ) -> hyper::http::request::Builder {
        let builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(CLIENT_ADDR_HEADER, source.to_string());
        match self.upstream.secret.token_for(label) {
            Some(token) => builder.header(GATEWAY_AUTH_HEADER, token),
            None => builder,
        }
    }

    /// The order replicas are tried in, by their last known loads: fewest first for a
    /// registration, most first for a client request; ties in turn.
    fn order(&self, replicas: &[SocketAddr], fewest_first: bool) -> Vec<SocketAddr> {
        let turn = self.upstream.turn.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let loads = lock(&self.upstream.loads);
        replica_order(replicas, turn, |replica| {
            let load = loads.get(replica, now);
            if fewest_first {
                load
            } else {
                usize::MAX - load
            }
        })
    }
}

type Sent = Result<Relayed, UpstreamError>;

impl LabelBackend for Gateway {
    type Connection = Upstreams;

    async fn register(&self, registration: Registration<'_>, upstreams: &Upstreams) -> Answer {
        // An unknown label gets what the relay would say of a label not authorised for the
        // ID (401), so the gateway is no oracle for which labels exist.
        let Some(route) = self.routes.get(registration.label) else {
            return Answer::unauthorized();
        };
        let replicas = match self.replicas(registration.label, &route).await {
            Ok(replicas) => replicas,
            Err(answer) => return answer,
        };
        let request = |count: u32| {
            let mut builder = self.request(
                "PUT",
                &format!("/register/{}", registration.label),
                &self.registrar,
                registration.source,
                registration.label,
            );
            if let Some(authorization) = registration.authorization {
                builder = builder.header(hyper::header::AUTHORIZATION, authorization);
            }
            if count > 1 {
                // The several-ports extension, passed on to the label's relay.
                builder = builder.header(RENDEZVOUS_COUNT_HEADER, count);
            }
            builder.body(Empty::new())
        };
        let order = self.order(&replicas, true);
        let loads: Vec<usize> = {
            let (loads, now) = (lock(&self.upstream.loads), Instant::now());
            order
                .iter()
                .map(|replica| loads.get(replica, now))
                .collect()
        };
        // A batch (an agent asking for several ports at once) is split over the replicas so
        // their loads even out; each part goes to its replica, or on to the next when that
        // one drains or cannot be reached.
        let parts = split_batch(registration.count.max(1), &loads);
        let started = tokio::time::Instant::now();
        let deadline = started + ANSWER_TIMEOUT;
        let mut out = vec![false; order.len()];
        let mut granted: Vec<Answer> = Vec::new();
        let mut other = None;
        let mut draining = None;
        // The replicas that answered that they drain: never asked again for this one.
        let mut drained: Vec<SocketAddr> = Vec::new();
        let mut problem = String::from("no replica");
        for (first, &count) in parts.iter().enumerate().filter(|(_, count)| **count > 0) {
            for i in (0..order.len()).map(|d| (first + d) % order.len()) {
                if out[i] || tokio::time::Instant::now() >= deadline {
                    continue;
                }
                let replica = order[i];
                let Ok(forwarded) = request(count) else {
                    return Answer::bad_request();
                };
                let send = upstreams.send(&self.upstream, replica, forwarded);
                let retry = match tokio::time::timeout_at(deadline, send).await {
                    Ok(Ok(relayed)) => {
                        if let Some(parked) = relayed.parked {
                            lock(&self.upstream.loads).put(replica, parked, Instant::now());
                        }
                        if !relayed.draining {
                            if relayed.answer.status == 200 {
                                granted.push(relayed.answer);
                            } else {
                                // A 401, a 429, ...: passed on, never retried.
                                other.get_or_insert(relayed.answer);
                            }
                            break;
                        }
                        draining = Some(relayed.answer);
                        drained.push(replica);
                        Retried::Draining
                    }
                    Ok(Err(error)) => {
                        problem = format!("relay {replica} unreachable: {error}");
                        Retried::Unreachable
                    }
                    Err(_) => {
                        problem = format!("relay {replica} did not answer in time");
                        Retried::Unreachable
                    }
                };
                out[i] = true;
                if out.iter().any(|out| !out) {
                    self.metrics.retried(retry);
                }
            }
        }
        if granted.is_empty() && other.is_none() {
            // Every replica known drains or is out of reach: a new one may have become ready
            // since the names were looked up (a rollout's surge pod), or be about to (a
            // StatefulSet replaces its pods one at a time, and the cluster DNS lists a new
            // one a moment after it is ready). While one answered that it drains, the name is
            // looked up again every REGISTER_POLL for up to REGISTER_WAIT and every replica
            // but the draining ones asked (again: one out of reach may be starting): a
            // draining replica refuses before it looks at anything, so asking again is safe,
            // and the agent need not back off for the draining answer's Retry-After.
            let control = control_set(registration.label, &route);
            let wait_until = started + REGISTER_WAIT;
            for round in 0.. {
                if round > 0 {
                    let now = tokio::time::Instant::now();
                    if draining.is_none() || now + REGISTER_POLL > wait_until {
                        break;
                    }
                    tokio::time::sleep(REGISTER_POLL).await;
                }
                let fresh = self
                    .upstream
                    .resolver
                    .resolve_all_fresh(&control, &self.metrics)
                    .await
                    .unwrap_or_default();
                for replica in fresh {
                    let asked_just_now = round == 0 && order.contains(&replica);
                    if asked_just_now
                        || drained.contains(&replica)
                        || tokio::time::Instant::now() >= deadline
                    {
                        continue;
                    }
                    let Ok(forwarded) = request(registration.count.max(1)) else {
                        return Answer::bad_request();
                    };
                    let send = upstreams.send(&self.upstream, replica, forwarded);
                    match tokio::time::timeout_at(deadline, send).await {
                        Ok(Ok(relayed)) => {
                            if let Some(parked) = relayed.parked {
                                lock(&self.upstream.loads).put(replica, parked, Instant::now());
                            }
                            if !relayed.draining {
                                self.metrics.retried(Retried::Draining);
                                return relayed.answer;
                            }
                            draining = Some(relayed.answer);
                            drained.push(replica);
                        }
                        Ok(Err(error)) => problem = format!("relay {replica} unreachable: {error}"),
                        Err(_) => problem = format!("relay {replica} did not answer in time"),
                    }
                }
            }
        }
        if let Some(answer) = merge_granted(granted) {
            return answer;
        }
        if let Some(answer) = other {
            return answer;
        }
        // Every replica draining or unreachable: the hidden server registers again soon.
        if let Some(answer) = draining {
            return answer;
        }
        self.unavailable(registration.label, &route, &problem);
        Answer::unavailable(RETRY_NOT_READY)
    }

    async fn client(&self, client: ClientRequest<'_>) -> Answer {
        let limited = lock(&self.redirect_limiter).check(client.source, Instant::now());
        if let Err(retry_after) = limited {
            self.metrics.redirects_limited.inc();
            return Answer::too_many(retry_after);
        }
        let Some(route) = self.routes.get(client.label) else {
            return Answer::not_found();
        };
        let replicas = match self.replicas(client.label, &route).await {
            Ok(replicas) => replicas,
            Err(answer) => return answer,
        };
        let control = control_set(client.label, &route);
        let started = tokio::time::Instant::now();
        let deadline = started + ANSWER_TIMEOUT;
        let mut said_no = SaidNo::default();
        let mut tried: Vec<SocketAddr> = Vec::new();
        // A GET is idempotent: a replica with nothing parked (503), without the label (404:
        // not loaded yet, or already closed) or out of reach sends it on to the next, the one
        // most likely to have a parked connection asked first. Round 0 asks the replicas
        // known; round 1 looks the name up again (at most once per 250 ms: during a rollout
        // the cached addresses can miss the replica that has just become ready) and asks the
        // new ones, then the replicas that left the name lately (a draining one still holds
        // its parked connections for a few seconds). Then, while a replica says the hidden
        // server registered lately (`taas-expected`), every GET_POLL for up to GET_WAIT, all
        // of them again: its agent is parking a replacement, or parking again elsewhere
        // after a replica drained.
        'rounds: for round in 0.. {
            let candidates: Vec<(SocketAddr, bool)> = if round == 0 {
                let order = self.order(&replicas, false);
                order.into_iter().map(|replica| (replica, false)).collect()
            } else {
                if round > 1 {
                    if !said_no.expected
                        || tokio::time::Instant::now() + GET_POLL > started + GET_WAIT
                    {
                        break;
                    }
                    tokio::time::sleep(GET_POLL).await;
                }
                let resolver = &self.upstream.resolver;
                let listed = resolver
                    .resolve_all_fresh(&control, &self.metrics)
                    .await
                    .unwrap_or_default();
                let mut candidates: Vec<(SocketAddr, bool)> = self
                    .order(&listed, false)
                    .into_iter()
                    .filter(|replica| round > 1 || !tried.contains(replica))
                    .map(|replica| (replica, false))
                    .collect();
                for departed in resolver.departed(&control) {
                    if !listed.contains(&departed) {
                        candidates.push((departed, true));
                    }
                }
                candidates
            };
            for (replica, departed) in candidates {
                if !tried.contains(&replica) {
                    tried.push(replica);
                }
                let builder = self.request(
                    "GET",
                    client.path_and_query,
                    client.host,
                    client.source,
                    client.label,
                );
                let Ok(forwarded) = builder.body(Empty::new()) else {
                    return Answer::bad_request();
                };
                let until = if departed {
                    deadline.min(tokio::time::Instant::now() + DEPARTED_TIMEOUT)
                } else {
                    deadline
                };
                let send = self.upstream.send_pooled(replica, forwarded);
                match tokio::time::timeout_at(until, send).await {
                    Ok(Ok(relayed)) if relayed.answer.status == 503 => {
                        said_no.expected |= relayed.expected;
                        said_no.last = Some(relayed.answer);
                    }
                    Ok(Ok(relayed)) if relayed.answer.status == 404 => {
                        // A 503 elsewhere says more: the label is there, just not parked.
                        said_no.last.get_or_insert(relayed.answer);
                    }
                    Ok(Ok(relayed)) => {
                        if round > 1 {
                            self.metrics.client_waited(true);
                        }
                        return relayed.answer;
                    }
                    Ok(Err(_)) | Err(_) if departed => {
                        self.upstream.resolver.forget_departed(&control, replica);
                    }
                    Ok(Err(error)) => {
                        said_no.problem = format!("relay {replica} unreachable: {error}")
                    }
                    Err(_) => {
                        said_no.problem = format!("relay {replica} did not answer in time");
                        break 'rounds;
                    }
                }
            }
        }
        if said_no.expected {
            self.metrics.client_waited(false);
        }
        if let Some(answer) = said_no.last {
            return answer;
        }
        self.unavailable(client.label, &route, &said_no.problem);
        Answer::unavailable(RETRY_NOT_READY)
    }
}

/// The control ports of `label`'s replicas.
fn control_set<'a>(label: &'a str, route: &'a Route) -> ReplicaSet<'a> {
    ReplicaSet {
        label,
        port: "control",
        relays: &route.relay,
    }
}

/// What the replicas asked for a client have said so far, none of them a redirect.
struct SaidNo {
    /// The answer the client gets if none redirects: a 503 (the label is there, nothing
    /// parked) over a 404.
    last: Option<Answer>,
    /// Some replica said the hidden server registered lately.
    expected: bool,
    /// Why the last replica out of reach was.
    problem: String,
}

impl Default for SaidNo {
    fn default() -> Self {
        Self {
            last: None,
            expected: false,
            problem: String::from("no replica"),
        }
    }
}

/// `replicas` in the order to try them: by `load` (smallest first), the replicas of equal load
/// in an order turned by `turn`, so consecutive requests start with a different one of them.
/// Pure.
pub fn replica_order(
    replicas: &[SocketAddr],
    turn: usize,
    load: impl Fn(&SocketAddr) -> usize,
) -> Vec<SocketAddr> {
    let mut order: Vec<(usize, SocketAddr)> = replicas.iter().map(|r| (load(r), *r)).collect();
    // Stable: equal loads keep the route's order, then each such group is turned.
    order.sort_by_key(|(load, _)| *load);
    let mut start = 0;
    while start < order.len() {
        let load = order[start].0;
        let len = order[start..]
            .iter()
            .take_while(|(l, _)| *l == load)
            .count();
        order[start..start + len].rotate_left(turn % len);
        start += len;
    }
    order.into_iter().map(|(_, replica)| replica).collect()
}

/// How many of `count` rendezvous ports to ask each replica for, the replicas given by their
/// loads in the order to try them: one at a time to the least loaded (counting what it was
/// given already), ties to the earlier one. Pure.
pub fn split_batch(count: u32, loads: &[usize]) -> Vec<u32> {
    let mut parts = vec![0u32; loads.len()];
    for _ in 0..count {
        let least =
            (0..loads.len()).min_by_key(|&i| (loads[i].saturating_add(parts[i] as usize), i));
        match least {
            Some(i) => parts[i] += 1,
            None => break,
        }
    }
    parts
}

/// The 200s of a split batch as one answer: the first one's headers, every `HOST:PORT` line
/// (one answer alone is passed on unchanged).
fn merge_granted(mut granted: Vec<Answer>) -> Option<Answer> {
    if granted.len() <= 1 {
        return granted.pop();
    }
    let lines: Vec<String> = granted
        .iter()
        .flat_map(|answer| {
            answer
                .body
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut merged = granted.swap_remove(0);
    merged.body = lines.join("\n");
    Some(merged)
}

/// How long a replica's reported load is believed.
const LOAD_TTL: Duration = Duration::from_secs(30);
/// Replica addresses whose load is remembered at once.
const MAX_LOADS: usize = 4096;

/// What each replica last said of its label's parked connections and pending registrations
/// (`taas-parked`), by replica address (pure: the caller passes the time).
#[derive(Debug)]
pub struct ReplicaLoads {
    entries: HashMap<SocketAddr, (usize, Instant)>,
    max: usize,
}

impl Default for ReplicaLoads {
    fn default() -> Self {
        Self::with_capacity(MAX_LOADS)
    }
}

impl ReplicaLoads {
    /// At most `max` replicas remembered.
    pub fn with_capacity(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    /// The load last reported, if within [`LOAD_TTL`]; unknown (or older) is 0, so a fresh
    /// replica is preferred for registrations.
    pub fn get(&self, replica: &SocketAddr, now: Instant) -> usize {
        self.entries
            .get(replica)
            .filter(|(_, at)| now.saturating_duration_since(*at) < LOAD_TTL)
            .map_or(0, |(load, _)| *load)
    }

    pub fn put(&mut self, replica: SocketAddr, load: usize, now: Instant) {
        if self.entries.len() >= self.max && !self.entries.contains_key(&replica) {
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < LOAD_TTL);
            if self.entries.len() >= self.max {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(replica, _)| *replica);
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(replica, (load, now));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Limits of the gateway's upstream side.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamSettings {
    pub pool: PoolLimits,
    /// The per-source limit on 307s.
    pub redirect_limit: RateLimit,
}

/// Bounds of the pool of kept-alive connections for client requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Connections to one relay at once (in use and idle); more requests wait, within the
    /// answer deadline, for one to be free.
    pub per_relay: usize,
    /// Idle connections kept over all relays.
    pub idle_total: usize,
    /// An idle connection is closed after this; well under the relay's own keep-alive
    /// timeout (30 s), so the gateway, not the relay, is the one to close.
    pub idle_timeout: Duration,
    /// Relays with pooled state at once (routes are operator-written, but bounded anyway).
    pub relays: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            per_relay: 32,
            idle_total: 1024,
            idle_timeout: Duration::from_secs(10),
            relays: 4096,
        }
    }
}

/// The install secret, when the gateway has one; replaced when its file changes.
#[derive(Debug, Default)]
pub struct SecretSlot {
    secret: RwLock<Option<Arc<InstallSecret>>>,
}

impl SecretSlot {
    pub fn new(secret: Option<InstallSecret>) -> Self {
        Self {
            secret: RwLock::new(secret.map(Arc::new)),
        }
    }

    /// LABEL's gateway token as a header value marked sensitive (never logged by hyper).
    fn token_for(&self, label: &str) -> Option<HeaderValue> {
        let secret = read(&self.secret).clone()?;
        let mut value = HeaderValue::from_str(secret.token_for(label).expose()).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// LABEL's gateway token, for the edge header (never logged: its Debug redacts it).
    pub(crate) fn gateway_token(&self, label: &str) -> Option<crate::gateway_auth::GatewayToken> {
        let secret = read(&self.secret).clone()?;
        Some(secret.token_for(label))
    }

    /// Puts `secret` in place; false if it is the one already there.
    pub fn replace(&self, secret: InstallSecret) -> bool {
        let mut current = write(&self.secret);
        if current.as_deref() == Some(&secret) {
            return false;
        }
        *current = Some(Arc::new(secret));
        true
    }
}

/// One front-end connection's connections to relays (by replica address), for
/// registrations: a hidden server's kept-alive registrations stay one connection end to end.
#[derive(Default)]
pub struct Upstreams {
    connections: tokio::sync::Mutex<HashMap<SocketAddr, SendRequest<Empty<Bytes>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("resolve: {0}")]
    Resolve(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("answer body too large or unreadable")]
    Body,
}

/// A relay's answer, and what the gateway reads of it and never passes on.
#[derive(Debug)]
struct Relayed {
    answer: Answer,
    /// The connection may be used again.
    reusable: bool,
    /// `taas-parked`: the label's parked connections and pending registrations there.
    parked: Option<usize>,
    /// `taas-draining: 1`: the replica is stopping (a registration tries the next one).
    draining: bool,
    /// `taas-expected: 1` on a GET's 503: the label's hidden server registered lately.
    expected: bool,
}

impl Upstreams {
    async fn send(
        &self,
        shared: &UpstreamShared,
        replica: SocketAddr,
        request: Request<Empty<Bytes>>,
    ) -> Sent {
        let mut connections = self.connections.lock().await;
        let reusable = match connections.get_mut(&replica) {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            connections.remove(&replica);
            if connections.len() >= MAX_UPSTREAMS {
                connections.clear();
            }
            connections.insert(replica, shared.connect(replica).await?);
        }
        let sender = connections
            .get_mut(&replica)
            .ok_or(UpstreamError::ConnectTimeout)?;
        match exchange(sender, request).await {
            Ok(relayed) => Ok(relayed),
            Err(error) => {
                connections.remove(&replica);
                Err(error)
            }
        }
    }
}

impl UpstreamShared {
    async fn connect(
        &self,
        replica: SocketAddr,
    ) -> Result<SendRequest<Empty<Bytes>>, UpstreamError> {
        let sender = connect(replica).await?;
        self.metrics.upstream_connections_opened.inc();
        Ok(sender)
    }

    /// A client request (an idempotent GET) on a pooled connection. A pooled connection that
    /// turns out dead (the relay closed it while idle, or restarted) costs one retry on a
    /// fresh connection, never an error to the client.
    async fn send_pooled(&self, replica: SocketAddr, request: Request<Empty<Bytes>>) -> Sent {
        let checkout = self.pool.checkout(replica, Instant::now()).await;
        if let Some(mut sender) = checkout.idle {
            if sender.ready().await.is_ok() {
                match exchange(&mut sender, copy_request(&request)).await {
                    Ok(relayed) => {
                        if relayed.reusable {
                            self.pool.checkin(replica, sender, Instant::now());
                        }
                        return Ok(relayed);
                    }
                    Err(UpstreamError::Http(error)) => {
                        tracing::debug!(%replica, %error, "pooled connection failed: once more on a fresh one");
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        let mut sender = self.connect(replica).await?;
        let relayed = exchange(&mut sender, request).await?;
        if relayed.reusable && checkout.pooled {
            self.pool.checkin(replica, sender, Instant::now());
        }
        drop(checkout.permit);
        Ok(relayed)
    }
}

/// A GET's copy for its one retry (no body to copy).
fn copy_request(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Sends one request and reads the relay's answer; also says whether the connection may be
/// used again, and what the relay said for the gateway alone (never passed on).
async fn exchange(sender: &mut SendRequest<Empty<Bytes>>, request: Request<Empty<Bytes>>) -> Sent {
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BODY)
        .collect()
        .await
        .map_err(|_| UpstreamError::Body)?
        .to_bytes();
    let mut answer = Answer::empty(parts.status.as_u16());
    answer.body = String::from_utf8_lossy(&body).into_owned();
    for name in PASSED_HEADERS {
        if let Some(value) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            answer.headers.push((name, value.to_string()));
        }
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let parked = header(PARKED_HEADER).and_then(|v| v.trim().parse::<usize>().ok());
    let draining = parts.status.as_u16() == 503 && header(DRAINING_HEADER) == Some("1");
    let expected = parts.status.as_u16() == 503 && header(EXPECTED_HEADER) == Some("1");
    let closing = parts
        .headers
        .get(hyper::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
    let reusable = !closing && parts.version == hyper::Version::HTTP_11 && !sender.is_closed();
    Ok(Relayed {
        answer,
        reusable,
        parked,
        draining,
        expected,
    })
}

/// Opens raw TCP connections to relays' replicas, their names (`HOST:PORT`) resolved through
/// the upstream side's cache: the edge's connections to relays' edge ports.
#[derive(Clone)]
pub(crate) struct RelayConnector {
    resolver: Arc<RelayResolver>,
    metrics: Arc<GatewayMetrics>,
}

impl RelayConnector {
    /// Every replica `set` names now (at most [`MAX_REPLICAS`]).
    pub(crate) async fn replicas(
        &self,
        set: &ReplicaSet<'_>,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        self.resolver.resolve_all(set, &self.metrics).await
    }

    /// [`RelayConnector::replicas`] looked up again when the cached answer is not fresh
    /// (see [`RelayResolver::resolve_all_fresh`]).
    pub(crate) async fn fresh_replicas(
        &self,
        set: &ReplicaSet<'_>,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        self.resolver.resolve_all_fresh(set, &self.metrics).await
    }

    /// Replicas that left `set` lately: asked last, for clients (see [`DEPARTED_KEEP`]).
    pub(crate) fn departed(&self, set: &ReplicaSet<'_>) -> Vec<SocketAddr> {
        self.resolver.departed(set)
    }

    /// A departed replica that did not answer: not asked again.
    pub(crate) fn forget_departed(&self, set: &ReplicaSet<'_>, replica: SocketAddr) {
        self.resolver.forget_departed(set, replica)
    }

    /// A connection to one replica within the connect deadline.
    pub(crate) async fn connect(&self, replica: SocketAddr) -> Result<TcpStream, UpstreamError> {
        connect_tcp(replica).await
    }
}

async fn connect(replica: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, UpstreamError> {
    let tcp = connect_tcp(replica).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "relay connection ended");
        }
    });
    Ok(sender)
}

async fn connect_tcp(replica: SocketAddr) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(replica)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(error)) => Err(UpstreamError::Connect(error)),
        Err(_) => Err(UpstreamError::ConnectTimeout),
    }
}

/// Kept-alive connections for client requests, per replica address.
/// Bounded: at most `per_relay` connections to one relay exist at once (a new one is opened
/// only by a request holding one of the relay's permits, when none is idle), at most
/// `idle_total` idle overall, at most `relays` relays tracked.
struct UpstreamPool {
    limits: PoolLimits,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    relays: HashMap<SocketAddr, RelayPool>,
    idle_total: usize,
}

struct RelayPool {
    /// Newest last: checkout takes the most recently used, so the others age out.
    idle: Vec<(SendRequest<Empty<Bytes>>, Instant)>,
    permits: Arc<Semaphore>,
}

/// A request's claim on a relay's connections.
struct Checkout {
    /// An idle connection to try first.
    idle: Option<SendRequest<Empty<Bytes>>>,
    /// Held while the request uses a connection (None when not pooled).
    permit: Option<OwnedSemaphorePermit>,
    /// Whether the connection may go back to the pool afterwards.
    pooled: bool,
}

impl UpstreamPool {
    fn new(limits: PoolLimits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    async fn checkout(&self, relay: SocketAddr, now: Instant) -> Checkout {
        let permits = {
            let mut state = self.lock();
            if !state.relays.contains_key(&relay) && state.relays.len() >= self.limits.relays.max(1)
            {
                state.forget_unused_relays(self.limits.per_relay);
            }
            if !state.relays.contains_key(&relay) && state.relays.len() >= self.limits.relays.max(1)
            {
                // Every tracked relay busy: this request goes unpooled.
                return Checkout {
                    idle: None,
                    permit: None,
                    pooled: false,
                };
            }
            state
                .relays
                .entry(relay)
                .or_insert_with(|| RelayPool {
                    idle: Vec::new(),
                    permits: Arc::new(Semaphore::new(self.limits.per_relay.max(1))),
                })
                .permits
                .clone()
        };
        // Waits for a free connection slot; the caller's answer deadline bounds the wait.
        let Ok(permit) = permits.acquire_owned().await else {
            return Checkout {
                idle: None,
                permit: None,
                pooled: false,
            };
        };
        let mut state = self.lock();
        let mut found = None;
        let mut taken = 0;
        if let Some(pool) = state.relays.get_mut(&relay) {
            while let Some((sender, since)) = pool.idle.pop() {
                taken += 1;
                let fresh = now.saturating_duration_since(since) < self.limits.idle_timeout;
                if fresh && !sender.is_closed() {
                    found = Some(sender);
                    break;
                }
            }
        }
        state.idle_total = state.idle_total.saturating_sub(taken);
        Checkout {
            idle: found,
            permit: Some(permit),
            pooled: true,
        }
    }

    fn checkin(&self, relay: SocketAddr, sender: SendRequest<Empty<Bytes>>, now: Instant) {
        let mut state = self.lock();
        if state.idle_total >= self.limits.idle_total {
            return;
        }
        if let Some(pool) = state.relays.get_mut(&relay) {
            pool.idle.push((sender, now));
            state.idle_total += 1;
        }
    }

    /// Closes idle connections older than the idle timeout, and forgets relays with nothing
    /// pooled or in use.
    fn sweep(&self, now: Instant) {
        let timeout = self.limits.idle_timeout;
        let mut state = self.lock();
        let mut closed = 0;
        for pool in state.relays.values_mut() {
            let before = pool.idle.len();
            pool.idle.retain(|(sender, since)| {
                now.saturating_duration_since(*since) < timeout && !sender.is_closed()
            });
            closed += before - pool.idle.len();
        }
        state.idle_total = state.idle_total.saturating_sub(closed);
        state.forget_unused_relays(self.limits.per_relay);
    }
}

impl PoolState {
    fn forget_unused_relays(&mut self, per_relay: usize) {
        self.relays.retain(|_, pool| {
            !pool.idle.is_empty() || pool.permits.available_permits() < per_relay.max(1)
        });
    }
}

/// How long a relay name's addresses are used before asking again: kube Service IPs are
/// stable, but a relay's Service can be deleted and created again with a new one.
const RESOLVED_TTL: Duration = Duration::from_secs(5);
/// The youngest cached lookup a refresh ([`RelayResolver::resolve_all_fresh`]) replaces.
const REFRESH_MIN_AGE: Duration = Duration::from_millis(250);
/// How long a failed resolution is remembered: briefly, so a burst of requests for a relay
/// whose Service is not there yet costs one lookup, and its creation is seen within a second.
const FAILED_TTL: Duration = Duration::from_secs(1);
/// Names remembered at once.
const MAX_RESOLVED: usize = 4096;
/// How long an address that has left a name (a replica no longer ready: draining, or gone) is
/// still asked for clients, after every listed replica has said no. A draining replica leaves
/// its headless Service at once but keeps its parked connections for
/// `run::pod::PARKED_HOLD` (5 s) as a last resort; unasked, those connections would be out of
/// every client's reach while the replicas still listed had none parked yet (the e2e test's
/// 2-replica upgrade: 4 failed GETs in 0.7 s).
const DEPARTED_KEEP: Duration = Duration::from_secs(10);
/// How long a departed replica has to answer: it may be gone for good (a deleted pod's
/// address answers nothing), and a live pod in the cluster answers within milliseconds.
const DEPARTED_TIMEOUT: Duration = Duration::from_millis(500);

/// One set of a label's replicas: the addresses its route names for one kind of port.
pub(crate) struct ReplicaSet<'a> {
    pub label: &'a str,
    /// `control` (the relays' control ports) or `edge`.
    pub port: &'static str,
    pub relays: &'a Replicas,
}

impl ReplicaSet<'_> {
    fn key(&self) -> String {
        format!("{}/{}", self.label, self.port)
    }
}

/// Resolves relay addresses (`HOST:PORT`) with tokio's resolver, cached briefly; a literal
/// `IP:PORT` needs no lookup.
#[derive(Default)]
struct RelayResolver {
    cache: Mutex<ResolveCache>,
    membership: Mutex<Membership>,
}

impl RelayResolver {
    /// Every address the names resolve to (each a replica), deduplicated, in the route's
    /// order, at most [`MAX_REPLICAS`]; an error only when none resolves.
    async fn resolve_all(
        &self,
        set: &ReplicaSet<'_>,
        metrics: &GatewayMetrics,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        let resolved = self.resolve_names(set.relays, metrics).await;
        let listed = resolved.as_deref().unwrap_or(&[]);
        lock(&self.membership).note(&set.key(), listed, Instant::now());
        resolved
    }

    async fn resolve_names(
        &self,
        relays: &Replicas,
        metrics: &GatewayMetrics,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        let mut replicas: Vec<SocketAddr> = Vec::new();
        let mut failed = None;
        for name in relays.names().iter().take(MAX_REPLICAS) {
            match self.resolve(name, metrics).await {
                Ok(addresses) => {
                    for address in addresses {
                        if !replicas.contains(&address) && replicas.len() < MAX_REPLICAS {
                            replicas.push(address);
                        }
                    }
                }
                Err(error) => failed = Some(error),
            }
        }
        match failed {
            Some(error) if replicas.is_empty() => Err(error),
            _ if replicas.is_empty() => Err(UpstreamError::Resolve("no addresses".into())),
            _ => Ok(replicas),
        }
    }

    /// [`RelayResolver::resolve_all`] asked again of DNS, not of the cache, when what the
    /// cache holds may be out of date: a replica answered that it drains, or none could take
    /// a connection. A replica that has just become ready is then found at once instead of
    /// at the cache's expiry (5 s during which a label being replaced had no serving
    /// replica: failures from 4.9 s in the end-to-end test's one-replica upgrade). At most
    /// one lookup per name per [`REFRESH_MIN_AGE`], so a flood cannot turn into lookups.
    async fn resolve_all_fresh(
        &self,
        set: &ReplicaSet<'_>,
        metrics: &GatewayMetrics,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        {
            let mut cache = lock(&self.cache);
            let now = Instant::now();
            for name in set.relays.names() {
                cache.forget_if_older(name, REFRESH_MIN_AGE, now);
            }
        }
        self.resolve_all(set, metrics).await
    }

    /// The replicas that left `set` lately (see [`DEPARTED_KEEP`]).
    fn departed(&self, set: &ReplicaSet<'_>) -> Vec<SocketAddr> {
        lock(&self.membership).departed(&set.key(), Instant::now())
    }

    /// A departed replica that did not answer: not asked again.
    fn forget_departed(&self, set: &ReplicaSet<'_>, replica: SocketAddr) {
        lock(&self.membership).forget(&set.key(), replica)
    }

    async fn resolve(
        &self,
        relay: &str,
        metrics: &GatewayMetrics,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Ok(address) = relay.parse::<SocketAddr>() {
            return Ok(vec![address]);
        }
        let cached = lock(&self.cache).get(relay, Instant::now());
        let result = match cached {
            Some(result) => result,
            None => {
                metrics.relay_lookups.inc();
                let looked_up =
                    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(relay))
                        .await
                    {
                        Ok(Ok(addresses)) => {
                            let addresses: Vec<SocketAddr> = addresses.collect();
                            if addresses.is_empty() {
                                Err("no addresses".to_string())
                            } else {
                                Ok(addresses)
                            }
                        }
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err("timed out".to_string()),
                    };
                lock(&self.cache).put(relay, looked_up.clone(), Instant::now());
                looked_up
            }
        };
        result.map_err(UpstreamError::Resolve)
    }
}

type Resolved = Result<Vec<SocketAddr>, String>;

/// The resolver's memory (pure: the caller passes the time).
#[derive(Debug)]
struct ResolveCache {
    entries: HashMap<String, (Resolved, Instant)>,
    max: usize,
}

impl Default for ResolveCache {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            max: MAX_RESOLVED,
        }
    }
}

impl ResolveCache {
    fn get(&self, name: &str, now: Instant) -> Option<Resolved> {
        self.entries
            .get(name)
            .filter(|(_, expires)| now < *expires)
            .map(|(resolved, _)| resolved.clone())
    }

    /// Forgets `name` if it was looked up at least `age` ago (at `now`).
    fn forget_if_older(&mut self, name: &str, age: Duration, now: Instant) {
        let old = self.entries.get(name).is_some_and(|(resolved, expires)| {
            let looked_up = *expires - Self::ttl(resolved);
            now.saturating_duration_since(looked_up) >= age
        });
        if old {
            self.entries.remove(name);
        }
    }

    fn ttl(resolved: &Resolved) -> Duration {
        if resolved.is_ok() {
            RESOLVED_TTL
        } else {
            FAILED_TTL
        }
    }

    fn put(&mut self, name: &str, resolved: Resolved, now: Instant) {
        let ttl = Self::ttl(&resolved);
        if self.entries.len() >= self.max.max(1) && !self.entries.contains_key(name) {
            self.entries.retain(|_, (_, expires)| now < *expires);
            if self.entries.len() >= self.max.max(1) {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, expires))| *expires)
                    .map(|(name, _)| name.clone());
                if let Some(soonest) = soonest {
                    self.entries.remove(&soonest);
                }
            }
        }
        self.entries.insert(name.to_string(), (resolved, now + ttl));
    }
}

/// Which addresses a label's replicas had, for each set of them (a label's control ports, its
/// edge ports), and which have left lately: a replica leaves its headless Service's name as
/// soon as it drains (or a routes file stops listing it), yet holds its parked connections for
/// a few seconds. Pure: the caller passes the time. Bounded: [`MAX_RESOLVED`] sets, each with
/// at most [`MAX_REPLICAS`] departed addresses.
#[derive(Debug)]
struct Membership {
    sets: HashMap<String, Members>,
    max: usize,
}

#[derive(Debug, Default)]
struct Members {
    listed: Vec<SocketAddr>,
    /// Newest last.
    departed: Vec<(SocketAddr, Instant)>,
    seen: Option<Instant>,
}

impl Default for Membership {
    fn default() -> Self {
        Self {
            sets: HashMap::new(),
            max: MAX_RESOLVED,
        }
    }
}

impl Membership {
    /// `set` lists `listed` now (empty: its names did not resolve).
    fn note(&mut self, set: &str, listed: &[SocketAddr], now: Instant) {
        if self.sets.len() >= self.max.max(1) && !self.sets.contains_key(set) {
            let oldest = self
                .sets
                .iter()
                .min_by_key(|(_, members)| members.seen)
                .map(|(set, _)| set.clone());
            if let Some(oldest) = oldest {
                self.sets.remove(&oldest);
            }
        }
        let members = self.sets.entry(set.to_string()).or_default();
        members.seen = Some(now);
        if members.listed == listed {
            return;
        }
        members.departed.retain(|(address, at)| {
            !listed.contains(address) && now.saturating_duration_since(*at) < DEPARTED_KEEP
        });
        for address in std::mem::take(&mut members.listed) {
            if !listed.contains(&address) {
                members.departed.push((address, now));
            }
        }
        let excess = members.departed.len().saturating_sub(MAX_REPLICAS);
        members.departed.drain(..excess);
        members.listed = listed.to_vec();
    }

    /// The addresses that left `set` within [`DEPARTED_KEEP`] of `now` and are not back.
    fn departed(&self, set: &str, now: Instant) -> Vec<SocketAddr> {
        self.sets.get(set).map_or_else(Vec::new, |members| {
            members
                .departed
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(*at) < DEPARTED_KEEP)
                .map(|(address, _)| *address)
                .collect()
        })
    }

    /// Stops offering `address` as a departed replica of `set` (it did not answer: gone).
    fn forget(&mut self, set: &str, address: SocketAddr) {
        if let Some(members) = self.sets.get_mut(set) {
            members
                .departed
                .retain(|(departed, _)| *departed != address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(port: u16) -> Resolved {
        Ok(vec![SocketAddr::from(([10, 0, 0, 1], port))])
    }

    #[test]
    fn a_refresh_forgets_a_name_looked_up_a_while_ago_but_not_one_just_looked_up() {
        let mut cache = ResolveCache::default();
        let t0 = Instant::now();
        cache.put("relay:8080", address(8080), t0);
        // Just looked up: a flood of refreshes does not turn into lookups.
        cache.forget_if_older("relay:8080", REFRESH_MIN_AGE, t0 + REFRESH_MIN_AGE / 2);
        assert_eq!(cache.get("relay:8080", t0), Some(address(8080)));
        cache.forget_if_older("relay:8080", REFRESH_MIN_AGE, t0 + REFRESH_MIN_AGE);
        assert_eq!(cache.get("relay:8080", t0), None);
        // A failure is forgotten the same way; an unknown name is no error.
        cache.put("gone:8080", Err("no addresses".into()), t0);
        cache.forget_if_older("gone:8080", REFRESH_MIN_AGE, t0 + FAILED_TTL);
        assert_eq!(cache.get("gone:8080", t0), None);
        cache.forget_if_older("never:8080", REFRESH_MIN_AGE, t0);
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn listed(ports: &[u16]) -> Vec<SocketAddr> {
        ports.iter().map(|port| at(*port)).collect()
    }

    #[test]
    fn a_replica_that_leaves_a_set_is_asked_last_for_a_while_unless_it_comes_back() {
        let mut members = Membership::default();
        let t0 = Instant::now();
        members.note("home/control", &listed(&[1, 2]), t0);
        assert!(members.departed("home/control", t0).is_empty());
        // A rollout: 1 drains and leaves the name, 3 is new.
        let t1 = t0 + Duration::from_millis(250);
        members.note("home/control", &listed(&[2, 3]), t1);
        assert_eq!(members.departed("home/control", t1), vec![at(1)]);
        // The same answer again (from the cache) changes nothing.
        members.note(
            "home/control",
            &listed(&[2, 3]),
            t1 + Duration::from_secs(1),
        );
        assert_eq!(members.departed("home/control", t1), vec![at(1)]);
        // Nothing resolves: every replica known departs; 1 keeps its time.
        let t2 = t1 + Duration::from_secs(2);
        members.note("home/control", &[], t2);
        assert_eq!(
            members.departed("home/control", t2),
            vec![at(1), at(2), at(3)]
        );
        // 2 is back; 1 is forgotten DEPARTED_KEEP after it left; 3 did not answer.
        let t3 = t1 + DEPARTED_KEEP;
        members.note("home/control", &listed(&[2]), t3);
        assert_eq!(members.departed("home/control", t3), vec![at(3)]);
        members.forget("home/control", at(3));
        assert!(members.departed("home/control", t3).is_empty());
        // Sets are apart: another label, the same label's edge ports.
        assert!(members.departed("home/edge", t2).is_empty());
        assert!(members.departed("lab/control", t2).is_empty());
    }

    #[test]
    fn membership_stays_bounded() {
        let mut members = Membership {
            sets: HashMap::new(),
            max: 3,
        };
        let t0 = Instant::now();
        for round in 0..40u16 {
            let ports: Vec<u16> = (0..8).map(|n| round * 8 + n).collect();
            members.note("home/control", &listed(&ports), t0);
            assert!(members.departed("home/control", t0).len() <= MAX_REPLICAS);
        }
        // The newest departures are kept.
        let departed = members.departed("home/control", t0);
        assert_eq!(departed.len(), MAX_REPLICAS);
        assert!(departed.contains(&at(38 * 8)));
        for n in 0..100u16 {
            let later = t0 + Duration::from_millis(u64::from(n) + 1);
            members.note(&format!("label{n}/edge"), &listed(&[n]), later);
            assert!(members.sets.len() <= 3);
        }
    }

    #[test]
    fn a_resolved_name_is_used_for_a_few_seconds_then_asked_again() {
        let mut cache = ResolveCache::default();
        let t0 = Instant::now();
        assert_eq!(cache.get("relay:8080", t0), None);
        cache.put("relay:8080", address(8080), t0);
        assert_eq!(cache.get("relay:8080", t0), Some(address(8080)));
        let almost = t0 + RESOLVED_TTL - Duration::from_millis(1);
        assert_eq!(cache.get("relay:8080", almost), Some(address(8080)));
        assert_eq!(cache.get("relay:8080", t0 + RESOLVED_TTL), None);
        assert_eq!(cache.get("other:8080", t0), None);
    }

    #[test]
    fn a_failed_lookup_is_remembered_only_briefly() {
        let mut cache = ResolveCache::default();
        let t0 = Instant::now();
        cache.put("gone:8080", Err("no such host".into()), t0);
        assert_eq!(cache.get("gone:8080", t0), Some(Err("no such host".into())));
        assert!(FAILED_TTL < RESOLVED_TTL);
        assert_eq!(cache.get("gone:8080", t0 + FAILED_TTL), None);
    }

    #[test]
    fn the_cache_stays_bounded_and_forgets_what_expires_soonest() {
        let mut cache = ResolveCache {
            entries: HashMap::new(),
            max: 3,
        };
        let t0 = Instant::now();
        cache.put("a:1", address(1), t0);
        cache.put("b:1", Err("refused".into()), t0);
        cache.put("c:1", address(3), t0 + Duration::from_millis(10));
        cache.put("d:1", address(4), t0 + Duration::from_millis(20));
        assert_eq!(cache.entries.len(), 3);
        assert_eq!(cache.get("b:1", t0), None, "the failure expired soonest");
        for n in 0..100u16 {
            cache.put(
                &format!("n{n}:1"),
                address(n),
                t0 + Duration::from_millis(30),
            );
            assert!(cache.entries.len() <= 3);
        }
    }

    #[test]
    fn a_routes_file_without_the_edge_fields_still_reads_and_one_with_them_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.yaml");
        std::fs::write(
            &path,
            "Home: {relay: \"r:8080\", ready: false}\nlab: {relay: \"l:8080\"}\n",
        )
        .unwrap();
        let routes = read_route_file(&path).unwrap();
        assert_eq!(
            routes["home"],
            Route {
                ready: false,
                ..Route::new("r:8080")
            }
        );
        assert_eq!(routes["lab"], Route::new("l:8080"));
        std::fs::write(
            &path,
            "home: {relay: \"r:8080\", edge: \"taas-home-control.ns.svc.cluster.local.:21001\", \
             direct: true, rendezvous: [20005, 20006]}\n",
        )
        .unwrap();
        let home = &read_route_file(&path).unwrap()["home"];
        assert_eq!(
            home.edge,
            Some(Replicas::from(
                "taas-home-control.ns.svc.cluster.local.:21001"
            ))
        );
        assert!(home.direct);
        assert_eq!(home.rendezvous, [20005, 20006]);
    }

    #[test]
    fn a_route_lists_its_replicas_or_names_one_and_an_empty_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.yaml");
        std::fs::write(
            &path,
            "home: {relay: [\"127.0.0.2:8080\", \"127.0.0.3:8080\"], \
             edge: [\"127.0.0.2:21001\", \"127.0.0.3:21001\"], rendezvous: [20000]}\n\
             work: {relay: \"w:8080\", edge: \"w:21001\"}\n",
        )
        .unwrap();
        let routes = read_route_file(&path).unwrap();
        assert_eq!(
            routes["home"].relay.names(),
            ["127.0.0.2:8080", "127.0.0.3:8080"]
        );
        assert_eq!(
            routes["home"].edge.as_ref().unwrap().to_string(),
            "127.0.0.2:21001,127.0.0.3:21001"
        );
        assert_eq!(routes["work"].relay, Replicas::from("w:8080"));
        std::fs::write(&path, "home: {relay: []}\n").unwrap();
        assert!(read_route_file(&path).unwrap_err().contains("empty"));
    }

    fn sa(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 8080))
    }

    #[test]
    fn a_fresh_replica_fills_first_and_equal_ones_take_turns() {
        let replicas = [sa(1), sa(2), sa(3)];
        let loads = HashMap::from([(sa(1), 4), (sa(2), 0), (sa(3), 4)]);
        let load = |r: &SocketAddr| loads[r];
        for turn in 0..6 {
            assert_eq!(replica_order(&replicas, turn, load)[0], sa(2));
        }
        let firsts: Vec<SocketAddr> = (0..3)
            .map(|turn| replica_order(&replicas, turn, |_| 0)[0])
            .collect();
        assert_eq!(firsts, [sa(1), sa(2), sa(3)]);
        assert!(replica_order(&[], 7, |_| 0).is_empty());
    }

    #[test]
    fn a_batch_is_split_so_the_replicas_loads_even_out() {
        assert_eq!(split_batch(8, &[0, 0]), [4, 4]);
        assert_eq!(split_batch(8, &[4, 0]), [2, 6]);
        assert_eq!(split_batch(1, &[3, 0, 0]), [0, 1, 0]);
        assert_eq!(split_batch(3, &[]), Vec::<u32>::new());
        let merged = merge_granted(vec![
            Answer::rendezvous_many("gw", &[1, 2]),
            Answer::rendezvous("gw", 3),
        ])
        .unwrap();
        assert_eq!(merged.status, 200);
        assert_eq!(merged.body, "gw:1\ngw:2\ngw:3");
        let one = Answer::rendezvous("gw", 3);
        assert_eq!(merge_granted(vec![one.clone()]).unwrap().body, one.body);
    }

    #[test]
    fn a_replicas_load_is_believed_for_30_s_and_the_memory_stays_bounded() {
        let t0 = Instant::now();
        let mut loads = ReplicaLoads::with_capacity(3);
        assert_eq!(loads.get(&sa(1), t0), 0, "unknown is 0");
        loads.put(sa(1), 5, t0);
        assert_eq!(loads.get(&sa(1), t0 + Duration::from_secs(29)), 5);
        assert_eq!(loads.get(&sa(1), t0 + LOAD_TTL), 0, "stale is 0");
        for n in 2..50 {
            loads.put(sa(n), 1, t0 + Duration::from_millis(u64::from(n)));
            assert!(loads.len() <= 3);
        }
        assert_eq!(loads.get(&sa(49), t0 + Duration::from_secs(1)), 1);
        assert_eq!(loads.get(&sa(1), t0), 0, "the oldest went first");
    }

    proptest::proptest! {
        /// Fewest first; over as many turns as replicas, each of the least loaded comes first
        /// equally often (an agent's registrations spread evenly); never a replica lost or
        /// added.
        #[test]
        fn registrations_go_to_the_least_loaded_in_turn(
            loads in proptest::collection::vec(0usize..4, 1..8),
            start in 0usize..100,
        ) {
            let replicas: Vec<SocketAddr> = (0..loads.len()).map(|i| sa(i as u8)).collect();
            let load = |r: &SocketAddr| loads[replicas.iter().position(|x| x == r).unwrap()];
            let least = *loads.iter().min().unwrap();
            let mut firsts = HashMap::new();
            for turn in start..start + replicas.len() {
                let order = replica_order(&replicas, turn, load);
                let mut sorted = order.clone();
                sorted.sort();
                proptest::prop_assert_eq!(&sorted, &replicas);
                proptest::prop_assert!(order.windows(2).all(|w| load(&w[0]) <= load(&w[1])));
                proptest::prop_assert_eq!(load(&order[0]), least);
                *firsts.entry(order[0]).or_insert(0) += 1;
            }
            let counts: Vec<usize> = firsts.values().copied().collect();
            proptest::prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
        }

        /// Every port asked for is given to some replica; afterwards the replicas that got
        /// any are within one of each other and of the least loaded one.
        #[test]
        fn a_split_batch_fills_the_least_loaded_first(
            loads in proptest::collection::vec(0usize..10, 1..6),
            count in 1u32..17,
        ) {
            let parts = split_batch(count, &loads);
            proptest::prop_assert_eq!(parts.iter().sum::<u32>(), count);
            let after: Vec<usize> = loads.iter().zip(&parts).map(|(l, p)| l + *p as usize).collect();
            let least = *after.iter().min().unwrap();
            for (i, part) in parts.iter().enumerate() {
                if *part > 0 {
                    proptest::prop_assert!(after[i] <= least + 1, "{loads:?} {parts:?}");
                }
            }
        }
    }

    #[test]
    fn a_forwarded_request_carries_the_labels_token_only_with_a_secret() {
        let none = SecretSlot::new(None);
        assert!(none.token_for("home").is_none());
        let secret = InstallSecret::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let slot = SecretSlot::new(Some(secret.clone()));
        let value = slot.token_for("home").unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), secret.token_for("home").expose());
        assert!(!slot.replace(secret), "same secret: no change");
        let rotated = InstallSecret::new(b"another install secret, 32 bytes").unwrap();
        assert!(slot.replace(rotated.clone()));
        assert_eq!(
            slot.token_for("home").unwrap().to_str().unwrap(),
            rotated.token_for("home").expose()
        );
    }
}
