//! The front end: one listener for the registrar and the mobile clients. It terminates TLS
//! (or, on a label relay's control port, takes plain HTTP from gateways), reads bounded
//! HTTP/1.1 requests (keep-alive allowed), dispatches by Host (§1) and asks a `LabelBackend`
//! for the answer. On a TLS front end with direct labels (the standalone relay's, and a
//! gateway's, which forwards them to their relay's edge port), a connection whose ClientHello
//! names a direct label is taken before any TLS (`crate::direct`); the bytes read to decide
//! are replayed into the handshake of every other connection.
//!
//! # Strangers must not take it offline (issue 13)
//! Every front-end connection is bounded in time and memory, and no single source can hold
//! many of them:
//! - **Time.** The TLS handshake has `handshake_timeout`; each request head (and the idle
//!   wait before it on a kept-alive connection) has `request_timeout` (hyper's header read
//!   timeout); the body, which the protocol never uses, then has `body_timeout`. A body that
//!   does not arrive in time gets `408` and the connection is closed, so a whole request takes
//!   at most `request_timeout + body_timeout` (30 s + 10 s by default).
//! - **Bodies.** Registrations and client requests carry none (the steward's PUT has none;
//!   some clients announce an empty one). An announced body over
//!   [`MAX_BODY_BYTES`] gets `413` at once; a smaller one is read and dropped within
//!   `body_timeout`. Every `408`/`413` closes the connection.
//! - **Sources.** On the public (TLS) front end one source (an IPv4 address, or an IPv6 /64,
//!   what one subscriber gets) may hold at most `max_connections_per_source` connections; a
//!   connection over it is closed at once, before the TLS handshake, and counted in
//!   `taas_frontend_connections_refused{reason="per_source"}`. The counts live in a map with
//!   one entry per source that has a connection open (so at most `max_connections` entries),
//!   removed with the source's last connection. The default (1,024) is for carrier-grade NAT:
//!   with port-block allocation a public IPv4 address is shared by a few dozen to a few
//!   hundred subscribers, and a phone holds a front-end connection for a second or so per
//!   redirect; one source can still take only 1/16 of the default connection cap. The
//!   control port (`Transport::Control`) has no per-source cap: all of its traffic comes
//!   from a few gateways.
//! - **Memory.** The head is bounded by [`MAX_HEAD_BYTES`] (hyper's read buffer never grows
//!   past it: it starts at 8 KiB and grows with a longer head), and a TLS connection's record
//!   buffer shrinks back to 4 KiB once a record is read (rustls). Nothing cheaper was left
//!   without lowering the head limit.
//!   Measured on a spawned `serve` (debug build, `frontend_abuse::
//!   held_partial_heads_cost_a_bounded_amount_of_memory_each`): 35 KiB of RSS per TLS
//!   connection holding a 15 KiB partial head, 25 KiB per TLS connection holding a 100-byte
//!   one (1,000 and 500 connections, base 19 MiB). A control-port connection (plain HTTP)
//!   costs less. So the cap must satisfy `max_connections × per-connection ≤ limit − base`:
//!   with the bound the test asserts (48 KiB), the gateway and label-relay pods' default of
//!   [`POD_FRONTEND_CONNECTIONS`](crate::config::POD_FRONTEND_CONNECTIONS) = 4,096 needs
//!   4,096 × 48 KiB + 19 MiB = 211 MiB, under the chart's 256 MiB limit (the old 16,384
//!   would need 787 MiB); the standalone `serve` keeps 16,384 (≈ 570 MiB at 35 KiB, for a
//!   host sized by its operator: `--max-connections`).
//!
//! # The control port is authenticated (issue 13, item 4)
//! With a gateway token (see `gateway_auth`), a control-port request without the right
//! [`GATEWAY_AUTH_HEADER`] gets `403` and is not processed; only an authenticated request may
//! name the original client with `taas-client-addr`. Without a token, nothing may name the
//! client: the TCP peer is the client (and a warning at start says the port is open). The
//! relay trusts no network by default; `gateway_networks` (`--trusted-proxies`) only narrows
//! who may present the token. The token is compared in constant time and never logged.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use taas_protocol::answer::{self, Answer, ClientRequest, Registration};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::{Limits, Timeouts};
use crate::direct::{DirectLabels, Prefixed, Routed};
use crate::gateway_auth::GatewayToken;
pub use crate::gateway_auth::GATEWAY_AUTH_HEADER;
use crate::host::{self, Names, Role};
use crate::sources::{SourceCounts, SourceKey};

/// Largest request head accepted (hyper answers 431 beyond it).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one request (hyper answers 431 beyond it).
pub const MAX_HEADERS: usize = 64;
/// Largest request body read (and ignored); a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// Where the front end sends registrations and mobile clients. The standalone relay answers
/// them itself; a gateway forwards them to each label's relay.
pub trait LabelBackend: Send + Sync + 'static {
    /// State kept per front-end connection (the relay: IDs authenticated on it; a gateway:
    /// its upstream connections).
    type Connection: Default + Send + Sync + 'static;

    fn register(
        &self,
        request: Registration<'_>,
        connection: &Self::Connection,
    ) -> impl std::future::Future<Output = Answer> + Send;

    fn client(
        &self,
        request: ClientRequest<'_>,
    ) -> impl std::future::Future<Output = Answer> + Send;

    /// Turns true when another process serves in this one's place (a hand-over,
    /// `handover`): from then on every answer closes its connection, and kept-alive
    /// connections are closed once idle, so that clients and agents reconnect to it.
    fn closing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// What the front end needs besides the backend.
#[derive(Clone, Debug)]
pub struct FrontendSettings {
    pub names: Names,
    /// IP literals that count as the registrar (besides the local address of a connection).
    pub own_ips: Vec<IpAddr>,
    pub handshake_timeout: Duration,
    /// Time allowed for each request head, the wait for the next one on a kept-alive
    /// connection included.
    pub request_timeout: Duration,
    /// Time allowed for a request's body once its head is in; then 408 and a close.
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// Connections one source (IPv4 address or IPv6 /64) may hold on the TLS front end.
    pub max_connections_per_source: usize,
    pub metrics: FrontendMetrics,
    /// Direct labels (standalone `serve`, or a gateway's edge): on the TLS front end, the
    /// ClientHello's server name is read first and a direct label's connection is taken
    /// (handed to the label, or forwarded raw to its relay), never terminated here. `None`:
    /// every connection is TLS terminated here.
    pub direct: Option<DirectLabels>,
}

impl Default for FrontendSettings {
    /// The defaults of `config::Timeouts` and `config::Limits`, no names.
    fn default() -> Self {
        let (timeouts, limits) = (Timeouts::default(), Limits::default());
        Self {
            names: Names {
                registrar: String::new(),
                domain: String::new(),
            },
            own_ips: Vec::new(),
            handshake_timeout: timeouts.handshake,
            request_timeout: timeouts.keep_alive,
            body_timeout: timeouts.request_body,
            max_connections: limits.frontend_connections,
            max_connections_per_source: limits.frontend_connections_per_source,
            metrics: FrontendMetrics::default(),
            direct: None,
        }
    }
}

/// The front end's counters (plain atomics; `register` exposes them).
#[derive(Clone, Debug, Default)]
pub struct FrontendMetrics {
    open: Gauge,
    refused: Family<[(&'static str, &'static str); 1], Counter>,
    timed_out: Counter,
    unauthenticated: Counter,
}

impl FrontendMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "taas_frontend_connections",
            "Front-end connections open now (TLS handshakes included)",
            self.open.clone(),
        );
        registry.register(
            "taas_frontend_connections_refused",
            "Front-end connections closed at accept, by reason (per_source: the source's cap; \
             full: the connection cap)",
            self.refused.clone(),
        );
        registry.register(
            "taas_frontend_requests_timed_out",
            "Requests whose body did not arrive in time (answered 408)",
            self.timed_out.clone(),
        );
        registry.register(
            "taas_control_requests_unauthenticated",
            "Control-port requests without a valid gateway token (answered 403)",
            self.unauthenticated.clone(),
        );
    }

    fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }
}

/// How requests reach the front end.
#[derive(Clone)]
pub enum Transport {
    /// HTTPS from hidden servers and mobile clients (the public front end).
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP from gateways (a label's relay in a cluster).
    Control(ControlAuth),
}

/// Who may use a label relay's control port, and who may name the original client.
#[derive(Clone, Debug, Default)]
pub struct ControlAuth {
    /// With a token, every request must carry it in [`GATEWAY_AUTH_HEADER`] (403 otherwise)
    /// and an authenticated request may name the client with `taas-client-addr`. Without
    /// one, nothing may name the client: the TCP peer is the client.
    pub gateway_token: Option<GatewayToken>,
    /// When not empty, only peers in these networks count as gateways: with a token, a
    /// request from elsewhere gets 403 whatever it carries. An extra restriction for
    /// clusters whose gateways have known addresses; the token is what authenticates.
    pub gateway_networks: Vec<ipnet::IpNet>,
}

/// Accepts front-end connections until the task is dropped.
pub async fn serve<B: LabelBackend>(
    listener: TcpListener,
    transport: Transport,
    settings: FrontendSettings,
    backend: Arc<B>,
) {
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (acceptor, control, per_source) = match transport {
        Transport::Tls(config) => (
            Some(TlsAcceptor::from(config)),
            None,
            Some(Arc::new(SourceCounts::default())),
        ),
        Transport::Control(auth) => {
            if auth.gateway_token.is_none() {
                tracing::warn!(
                    "the control port is unauthenticated (no gateway token): any peer that \
                     reaches it can register and redirect, and no request may name the client"
                );
            }
            (None, Some(Arc::new(auth)), None)
        }
    };
    // A direct label's clients are relayed from here: its connections carry a relayed
    // connection's options (no Nagle, keepalive), set once on the listener.
    crate::splice::tune_listener(&listener);
    let mut last_full_warning = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE: back off instead of spinning on the error.
                tracing::warn!(%error, "front-end accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            settings.metrics.refused("full");
            // At most one line a second: a flood at the cap must not flood the log too.
            let now = tokio::time::Instant::now();
            if last_full_warning.is_none_or(|at| now - at >= Duration::from_secs(1)) {
                last_full_warning = Some(now);
                tracing::warn!(%peer, max = settings.max_connections,
                    "front-end connection limit reached; closing new connections (counted in \
                     taas_frontend_connections_refused)");
            }
            continue;
        };
        let source_slot = match &per_source {
            None => None,
            Some(counts) => match counts.try_acquire_owned(
                SourceKey::of(peer.ip()),
                settings.max_connections_per_source,
            ) {
                Some(source_slot) => Some(source_slot),
                None => {
                    // Dropping the stream closes it before any TLS work is done.
                    settings.metrics.refused("per_source");
                    tracing::debug!(%peer, "front-end connections per source reached; closing");
                    continue;
                }
            },
        };
        let (acceptor, settings, backend) = (acceptor.clone(), settings.clone(), backend.clone());
        let gateway = control.as_ref().map(|auth| {
            let in_network = auth.gateway_networks.is_empty()
                || auth
                    .gateway_networks
                    .iter()
                    .any(|net| net.contains(&peer.ip().to_canonical()));
            Gateway {
                auth: auth.clone(),
                in_network,
            }
        });
        tokio::spawn(async move {
            let _slots = (slot, source_slot);
            let _open = OpenGauge::inc(&settings.metrics.open);
            crate::splice::tune_accepted(&stream);
            let context = Context {
                peer,
                local_ip: stream.local_addr().map(|a| a.ip().to_canonical()).ok(),
                gateway,
            };
            match acceptor {
                None => serve_http(TokioIo::new(stream), context, settings, backend).await,
                Some(acceptor) => {
                    // One deadline for the server-name read (direct labels) and the handshake.
                    let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
                    let (stream, read) = match &settings.direct {
                        None => (stream, Vec::new()),
                        Some(direct) => match direct.route(stream, peer, deadline).await {
                            Routed::HandedOver => return,
                            Routed::Gone(failure) => {
                                tracing::debug!(%peer, ?failure, "no ClientHello; closed");
                                return;
                            }
                            Routed::Tls(stream, read) => (stream, read),
                        },
                    };
                    let handshake = acceptor.accept(Prefixed::new(read, stream));
                    match tokio::time::timeout_at(deadline, handshake).await {
                        Ok(Ok(tls)) => {
                            serve_http(TokioIo::new(tls), context, settings, backend).await
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Counts a connection in the open-connections gauge until its task ends (or is aborted).
struct OpenGauge(Gauge);

impl OpenGauge {
    fn inc(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the control port knows about a connection's peer.
#[derive(Clone, Debug)]
struct Gateway {
    auth: Arc<ControlAuth>,
    /// The peer is inside `gateway_networks` (or none are set).
    in_network: bool,
}

/// What one front-end connection knows about itself.
#[derive(Clone, Debug)]
struct Context {
    peer: SocketAddr,
    local_ip: Option<IpAddr>,
    /// On the control port: how requests are authenticated. `None`: the public front end.
    gateway: Option<Gateway>,
}

async fn serve_http<I, B>(io: I, context: Context, settings: Arc<FrontendSettings>, backend: Arc<B>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: LabelBackend,
{
    let connection = Arc::new(B::Connection::default());
    let request_timeout = settings.request_timeout;
    let peer = context.peer;
    let closing = backend.closing();
    // Answers given on this connection: one that has had none is not cut when closing (its
    // first request is on its way; the answer closes it).
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = {
        let (closing, answered) = (closing.clone(), answered.clone());
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (settings, backend, connection, context, closing, answered) = (
                settings.clone(),
                backend.clone(),
                connection.clone(),
                context.clone(),
                closing.clone(),
                answered.clone(),
            );
            async move {
                let mut answer = answer(request, &context, &settings, &*backend, &connection).await;
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if closing.is_some_and(|closing| *closing.borrow()) {
                    answer.headers.push(("connection", "close".into()));
                }
                Ok::<_, Infallible>(to_response(answer))
            }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, service);
    tokio::pin!(served);
    let result = match closing {
        None => served.await,
        Some(mut closing) => {
            let closed = async { closing.wait_for(|closing| *closing).await.map(|_| ()) };
            tokio::select! {
                result = served.as_mut() => result,
                Ok(()) = closed => {
                    // An idle kept-alive connection closes now, one with a request in
                    // flight after its answer.
                    if answered.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                        served.as_mut().graceful_shutdown();
                    }
                    served.await
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "front-end connection ended with an error");
    }
}

/// An answer after which the connection is closed (the rest of the request is not read).
fn closing(mut answer: Answer) -> Answer {
    answer.headers.push(("connection", "close".into()));
    answer
}

fn text(status: u16, body: &str) -> Answer {
    let mut answer = Answer::empty(status);
    answer
        .headers
        .push(("content-type", "text/plain; charset=utf-8".into()));
    answer.body = body.into();
    closing(answer)
}

/// The client's address: the TCP peer, or, on an authenticated control-port request, what
/// the gateway says it is. `Err`: the request is refused (403) and not processed.
fn client_address(context: &Context, headers: &hyper::HeaderMap) -> Result<IpAddr, Answer> {
    let peer = context.peer.ip().to_canonical();
    let Some(gateway) = &context.gateway else {
        return Ok(peer);
    };
    let Some(token) = &gateway.auth.gateway_token else {
        return Ok(peer);
    };
    let presented = headers
        .get(GATEWAY_AUTH_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    // `verify` compares in constant time; the token is never logged.
    if !(gateway.in_network && token.verify(presented)) {
        return Err(text(
            403,
            "forbidden: the control port takes requests from this install's gateways only \
             (taas-gateway-auth missing or wrong)\n",
        ));
    }
    let named = headers
        .get(answer::CLIENT_ADDR_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    Ok(named.unwrap_or(peer).to_canonical())
}

async fn answer<B: LabelBackend>(
    request: Request<Incoming>,
    context: &Context,
    settings: &FrontendSettings,
    backend: &B,
    connection: &B::Connection,
) -> Answer {
    let (parts, body) = request.into_parts();
    let source = match client_address(context, &parts.headers) {
        Ok(source) => source,
        Err(refused) => {
            settings.metrics.unauthenticated.inc();
            tracing::debug!(peer = %context.peer, "control-port request without a valid gateway token");
            return refused;
        }
    };
    // Refuse an announced body over the bound at once; read (and drop) a small one, within
    // its deadline, so the connection can be kept alive.
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return closing(Answer::empty(413));
    }
    if !body.is_end_stream() {
        let read = Limited::new(body, MAX_BODY_BYTES).collect();
        match tokio::time::timeout(settings.body_timeout, read).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return closing(Answer::empty(413)),
            Err(_) => {
                settings.metrics.timed_out.inc();
                tracing::debug!(peer = %context.peer, "request body not received in time");
                return text(408, "request body not received in time\n");
            }
        }
    }
    let host = parts
        .headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()));
    let is_own_ip = |ip: IpAddr| Some(ip) == context.local_ip || settings.own_ips.contains(&ip);
    match host::classify(host, &settings.names, is_own_ip) {
        Role::Missing => Answer::bad_request(),
        Role::Misdirected => Answer::misdirected(),
        Role::Registrar => {
            let label = match answer::route(parts.method.as_str(), parts.uri.path()) {
                Ok(label) => label,
                Err(answer) => return answer,
            };
            let authorization = parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let count = parts
                .headers
                .get(answer::RENDEZVOUS_COUNT_HEADER)
                .map(|v| v.as_bytes());
            let Some(count) = answer::rendezvous_count(count) else {
                return Answer::bad_request();
            };
            let registration = Registration {
                label: &label,
                authorization,
                source,
                count,
            };
            backend.register(registration, connection).await
        }
        Role::Client { label, host } => {
            let path_and_query = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            let request = ClientRequest {
                label: &label,
                host: &host,
                path_and_query,
                source,
            };
            backend.client(request).await
        }
    }
}

fn to_response(answer: Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in answer.headers {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_at_its_cap_is_refused_and_its_entry_goes_with_its_last_connection() {
        let counts = Arc::new(SourceCounts::default());
        let (a, b) = (
            SourceKey::of("198.51.100.1".parse().unwrap()),
            SourceKey::of("198.51.100.2".parse().unwrap()),
        );
        let first = counts.try_acquire_owned(a, 2).unwrap();
        let second = counts.try_acquire_owned(a, 2).unwrap();
        assert!(counts.try_acquire_owned(a, 2).is_none());
        let other = counts.try_acquire_owned(b, 2).unwrap();
        assert_eq!(
            (counts.open(a), counts.open(b), counts.sources()),
            (2, 1, 2)
        );
        drop(first);
        let third = counts.try_acquire_owned(a, 2).unwrap();
        drop((second, third, other));
        assert_eq!(counts.sources(), 0, "no entry outlives its connections");
    }

    #[test]
    fn a_cap_of_zero_refuses_every_connection_and_keeps_no_entry() {
        let counts = Arc::new(SourceCounts::default());
        let source = SourceKey::of("198.51.100.1".parse().unwrap());
        assert!(counts.try_acquire_owned(source, 0).is_none());
        assert_eq!(counts.sources(), 0);
    }
}
