//! The front end: one listener for the registrar and the mobile clients. It terminates TLS
//! (or, on a label relay's control port, takes plain HTTP from gateways), reads bounded
//! HTTP/1.1 requests (keep-alive allowed), dispatches by Host (§1) and asks a `LabelBackend`
//! for the answer.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::host::{self, Names, Role};
use crate::registrar::{self, Answer, ClientRequest, Registration};
use crate::relay::LabelBackend;

/// Largest request head accepted (hyper answers 431 beyond it).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one request (hyper answers 431 beyond it).
pub const MAX_HEADERS: usize = 64;
/// Largest request body read (and ignored); a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

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
    pub max_connections: usize,
}

/// How requests reach the front end.
#[derive(Clone)]
pub enum Transport {
    /// HTTPS from hidden servers and mobile clients (the public front end).
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP from gateways (a label's relay in a cluster). A peer inside `trusted`
    /// may name the original client with the `taas-client-addr` header; anyone else is
    /// taken to be the client.
    Control { trusted: Vec<ipnet::IpNet> },
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
    let acceptor = match &transport {
        Transport::Tls(config) => Some(TlsAcceptor::from(config.clone())),
        Transport::Control { .. } => None,
    };
    let trusted: Arc<[ipnet::IpNet]> = match transport {
        Transport::Control { trusted } => trusted.into(),
        Transport::Tls(_) => Arc::new([]),
    };
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
            tracing::warn!(%peer, "front-end connection limit reached; closing");
            continue;
        };
        let (acceptor, settings, backend) = (acceptor.clone(), settings.clone(), backend.clone());
        let peer_trusted = trusted
            .iter()
            .any(|net| net.contains(&peer.ip().to_canonical()));
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let context = Context {
                peer,
                local_ip: stream.local_addr().map(|a| a.ip().to_canonical()).ok(),
                peer_names_client: peer_trusted,
            };
            match acceptor {
                None => serve_http(TokioIo::new(stream), context, settings, backend).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(settings.handshake_timeout, handshake).await {
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

/// What one front-end connection knows about itself.
#[derive(Clone, Copy, Debug)]
struct Context {
    peer: SocketAddr,
    local_ip: Option<IpAddr>,
    /// The peer is a trusted gateway: `taas-client-addr` names the real client.
    peer_names_client: bool,
}

async fn serve_http<I, B>(io: I, context: Context, settings: Arc<FrontendSettings>, backend: Arc<B>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: LabelBackend,
{
    let connection = Arc::new(B::Connection::default());
    let request_timeout = settings.request_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (settings, backend, connection) =
            (settings.clone(), backend.clone(), connection.clone());
        async move {
            let answer = answer(request, context, &settings, &*backend, &connection).await;
            Ok::<_, Infallible>(to_response(answer))
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, service)
        .await;
    if let Err(error) = result {
        tracing::debug!(peer = %context.peer, %error, "front-end connection ended with an error");
    }
}

/// The client's address: the TCP peer, or what a trusted gateway says it is.
fn client_address(context: &Context, headers: &hyper::HeaderMap) -> IpAddr {
    let named = context
        .peer_names_client
        .then(|| headers.get(registrar::CLIENT_ADDR_HEADER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    named.unwrap_or(context.peer.ip()).to_canonical()
}

async fn answer<B: LabelBackend>(
    request: Request<Incoming>,
    context: Context,
    settings: &FrontendSettings,
    backend: &B,
    connection: &B::Connection,
) -> Answer {
    let (parts, body) = request.into_parts();
    // Read (and drop) a small body so the connection can be kept alive; refuse a large one.
    if Limited::new(body, MAX_BODY_BYTES).collect().await.is_err() {
        return Answer::empty(413);
    }
    let host = parts
        .headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()));
    let source = client_address(&context, &parts.headers);
    let is_own_ip = |ip: IpAddr| Some(ip) == context.local_ip || settings.own_ips.contains(&ip);
    match host::classify(host, &settings.names, is_own_ip) {
        Role::Missing => Answer::bad_request(),
        Role::Misdirected => Answer::misdirected(),
        Role::Registrar => {
            let label = match registrar::route(parts.method.as_str(), parts.uri.path()) {
                Ok(label) => label,
                Err(answer) => return answer,
            };
            let authorization = parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let count = parts
                .headers
                .get(registrar::RENDEZVOUS_COUNT_HEADER)
                .map(|v| v.as_bytes());
            let Some(count) = registrar::rendezvous_count(count) else {
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
