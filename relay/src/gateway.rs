//! `taas-relay gateway`: the registrar and redirect front end of a cluster. It terminates
//! TLS and dispatches by Host like the standalone relay, but answers nothing itself: each
//! registration and each mobile request is forwarded, as plain HTTP with the client's address
//! in `taas-client-addr`, to the control port of that label's relay, and the relay's answer
//! is returned. Stateless: any number of replicas can run behind one Service.
//!
//! Each front-end connection keeps its own upstream connection to each relay it talked to,
//! so a hidden server's kept-alive registrations stay one connection end to end (the relay's
//! per-connection token rules see what the hidden server did).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::registrar::{
    Answer, ClientRequest, Registration, CLIENT_ADDR_HEADER, RENDEZVOUS_COUNT_HEADER,
};
use crate::relay::LabelBackend;

/// How long the gateway waits to connect to a relay, and for its answer. A relay that went
/// away costs a client at most this, never a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Where a label's relay answers, and whether it is ready to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Route {
    /// `host:port` of the relay's control port.
    pub relay: String,
    #[serde(default = "ready_default")]
    pub ready: bool,
}

fn ready_default() -> bool {
    true
}

/// Label → route, replaced whole whenever the source (the cluster's `TaasLabel` objects, or a
/// file) changes.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<Arc<HashMap<String, Route>>>,
}

impl RouteTable {
    pub fn get(&self, label: &str) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(label)
            .cloned()
    }

    pub fn replace(&self, routes: HashMap<String, Route>) {
        let mut current = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if **current != routes {
            tracing::info!(labels = routes.len(), "routes updated");
            *current = Arc::new(routes);
        }
    }
}

/// Reads routes from a YAML file (`LABEL: {relay: HOST:PORT, ready: true}`), every
/// `interval`; a broken file is reported and the last good routes kept.
pub async fn follow_route_file(path: PathBuf, interval: Duration, table: Arc<RouteTable>) {
    let mut last_problem = None;
    loop {
        let read = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_yaml::from_str::<HashMap<String, Route>>(&text).map_err(|e| e.to_string())
            });
        match read {
            Ok(routes) => {
                let routes = routes
                    .into_iter()
                    .map(|(label, route)| (label.to_ascii_lowercase(), route))
                    .collect();
                table.replace(routes);
                last_problem = None;
            }
            Err(problem) => {
                if last_problem.as_ref() != Some(&problem) {
                    tracing::warn!(file = %path.display(), %problem, "routes not updated");
                }
                last_problem = Some(problem);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

pub struct Gateway {
    routes: Arc<RouteTable>,
    registrar: String,
}

impl Gateway {
    pub fn new(routes: Arc<RouteTable>, registrar: impl Into<String>) -> Self {
        Self {
            routes,
            registrar: registrar.into(),
        }
    }

    async fn forward(
        &self,
        upstreams: &Upstreams,
        label: &str,
        request: Request<Empty<Bytes>>,
    ) -> Answer {
        let Some(route) = self.routes.get(label) else {
            return Answer::not_found();
        };
        // A route marked unready is still tried: the flag comes through a mounted ConfigMap,
        // which kubelet refreshes up to a minute late, while the relay's control Service
        // resolves to the new pod as soon as it is ready. Unreachable: 503 either way.
        let problem =
            match tokio::time::timeout(ANSWER_TIMEOUT, upstreams.send(&route.relay, request)).await
            {
                Ok(Ok(answer)) => return answer,
                Ok(Err(error)) => format!("relay unreachable: {error}"),
                Err(_) => "relay did not answer in time".to_string(),
            };
        if route.ready {
            tracing::warn!(%label, relay = %route.relay, "{problem}");
        } else {
            tracing::debug!(%label, relay = %route.relay, "{problem} (route not ready yet)");
        }
        Answer::unavailable(RETRY_NOT_READY)
    }
}

fn request(method: &str, path: &str, host: &str, source: IpAddr) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(CLIENT_ADDR_HEADER, source.to_string())
}

impl LabelBackend for Gateway {
    type Connection = Upstreams;

    async fn register(&self, registration: Registration<'_>, upstreams: &Upstreams) -> Answer {
        // An unknown label gets what the relay would say of a label not authorised for the
        // ID (401), so the gateway is no oracle for which labels exist.
        if self.routes.get(registration.label).is_none() {
            return Answer::unauthorized();
        }
        let mut builder = request(
            "PUT",
            &format!("/register/{}", registration.label),
            &self.registrar,
            registration.source,
        );
        if let Some(authorization) = registration.authorization {
            builder = builder.header(hyper::header::AUTHORIZATION, authorization);
        }
        if registration.count > 1 {
            // The several-ports extension, passed on to the label's relay.
            builder = builder.header(RENDEZVOUS_COUNT_HEADER, registration.count);
        }
        match builder.body(Empty::new()) {
            Ok(forwarded) => self.forward(upstreams, registration.label, forwarded).await,
            Err(_) => Answer::bad_request(),
        }
    }

    async fn client(&self, client: ClientRequest<'_>) -> Answer {
        let builder = request("GET", client.path_and_query, client.host, client.source);
        match builder.body(Empty::new()) {
            Ok(forwarded) => {
                self.forward(&Upstreams::default(), client.label, forwarded)
                    .await
            }
            Err(_) => Answer::bad_request(),
        }
    }
}

/// One front-end connection's connections to relays (by control address).
#[derive(Default)]
pub struct Upstreams {
    connections: tokio::sync::Mutex<HashMap<String, SendRequest<Empty<Bytes>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("answer body too large or unreadable")]
    Body,
}

impl Upstreams {
    async fn send(
        &self,
        relay: &str,
        request: Request<Empty<Bytes>>,
    ) -> Result<Answer, UpstreamError> {
        let mut connections = self.connections.lock().await;
        let reusable = match connections.get_mut(relay) {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            connections.remove(relay);
            if connections.len() >= MAX_UPSTREAMS {
                connections.clear();
            }
            connections.insert(relay.to_string(), connect(relay).await?);
        }
        let sender = connections
            .get_mut(relay)
            .ok_or(UpstreamError::ConnectTimeout)?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                connections.remove(relay);
                return Err(error.into());
            }
        };
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
        Ok(answer)
    }
}

async fn connect(relay: &str) -> Result<SendRequest<Empty<Bytes>>, UpstreamError> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(relay)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => return Err(UpstreamError::Connect(error)),
        Err(_) => return Err(UpstreamError::ConnectTimeout),
    };
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "relay connection ended");
        }
    });
    Ok(sender)
}

/// Where the gateway learns its routes.
#[derive(Clone, Debug)]
pub enum RouteSource {
    /// A YAML file, polled.
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub listen: std::net::SocketAddr,
    pub registrar: String,
    pub domain: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub routes: RouteSource,
    pub reload_interval: Duration,
    pub metrics: Option<std::net::SocketAddr>,
    pub timeouts: crate::config::Timeouts,
    pub max_connections: usize,
}

/// A running gateway; dropping it stops it.
pub struct RunningGateway {
    pub frontend: std::net::SocketAddr,
    pub metrics: Option<std::net::SocketAddr>,
    pub routes: Arc<RouteTable>,
    pub cert: crate::tls::CertFiles,
    ready: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningGateway {
    /// The first step of stopping: `/readyz` answers 503 so no new traffic is sent here,
    /// while requests keep being served until the gateway is dropped.
    pub fn drain(&self) {
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn start(options: GatewayOptions) -> Result<RunningGateway, crate::serve::ServeError> {
    use crate::serve::ServeError;
    let registrar = options.registrar.to_ascii_lowercase();
    let domain = options.domain.to_ascii_lowercase();
    let cert = match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => crate::tls::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => {
            let names =
                crate::tls::CertNames::for_relay(&registrar, &domain, options.listen.ip(), "");
            crate::tls::load_or_generate(&options.state_dir, &names)?
        }
        _ => {
            return Err(ServeError::Config(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    let tls = crate::tls::server_config(&cert)?;
    let listener = crate::serve::bind(options.listen).await?;
    let frontend = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: options.listen,
        source,
    })?;
    let routes = Arc::new(RouteTable::default());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let registry = prometheus_client::registry::Registry::default();
    let (metrics, mut tasks) =
        crate::serve::spawn_metrics(options.metrics, registry, &ready).await?;
    match options.routes.clone() {
        RouteSource::File(path) => tasks.push(tokio::spawn(follow_route_file(
            path,
            options.reload_interval,
            routes.clone(),
        ))),
    }
    let settings = crate::frontend::FrontendSettings {
        names: crate::host::Names {
            registrar: registrar.clone(),
            domain,
        },
        own_ips: Vec::new(),
        handshake_timeout: options.timeouts.handshake,
        request_timeout: options.timeouts.keep_alive,
        max_connections: options.max_connections,
        body_timeout: options.timeouts.request_body,
        ..Default::default()
    };
    let backend = Arc::new(Gateway::new(routes.clone(), registrar));
    tasks.push(tokio::spawn(crate::frontend::serve(
        listener,
        crate::frontend::Transport::Tls(tls),
        settings,
        backend,
    )));
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(listen = %frontend, "gateway serving");
    Ok(RunningGateway {
        frontend,
        metrics,
        routes,
        cert,
        ready,
        tasks,
    })
}
