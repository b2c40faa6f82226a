//! `taas-relay gateway`: the cluster's TLS front end as a process. Its routing and upstream
//! connections are `crate::gateway`; here is what the gateway shares with the other modes
//! (certificate pair, front end, metrics and readiness, files followed) and the drain before
//! it stops.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::{FirstRead, StartError, Tasks};
use crate::config::{
    Limits, Timeouts, DEFAULT_DOMAIN, DEFAULT_REGISTRAR, POD_FRONTEND_CONNECTIONS,
};
use crate::frontend::{self, FrontendMetrics, Transport};
use crate::gateway::{self, Gateway, GatewayMetrics, RouteTable, SecretSlot, UpstreamSettings};
use crate::gateway_auth::{GatewayAuthError, InstallSecret};
use crate::host::Names;
use crate::tls::{self, CertFiles, CertNames};

/// The HTTPS front end unless told otherwise (`--listen`): every address, port 8443.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);
/// How often the routes file and the install secret are read unless told otherwise
/// (`--reload-interval`).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopping gateway keeps serving, unready, unless told otherwise
/// (`--shutdown-delay`): load balancers and kube-proxy stop sending it new connections first.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// Where the gateway learns its routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteSource {
    /// A YAML file, polled.
    File(PathBuf),
}

/// Everything `gateway` is configured with (the binary's flags).
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayOptions {
    pub listen: SocketAddr,
    pub registrar: String,
    pub domain: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub routes: RouteSource,
    pub reload_interval: Duration,
    pub metrics: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    /// Connections one source (IPv4 address or IPv6 /64) may hold on the front end.
    pub max_connections_per_source: usize,
    /// The install secret's file: every forwarded request then carries LABEL's gateway
    /// token. Without it, relays that check tokens refuse the gateway.
    pub install_secret_file: Option<PathBuf>,
    /// The upstream pool's bounds and the per-source limit on 307s.
    pub upstream: UpstreamSettings,
}

impl GatewayOptions {
    /// Routes from `routes`, everything else as the flags' defaults.
    pub fn new(routes: RouteSource) -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            registrar: DEFAULT_REGISTRAR.into(),
            domain: DEFAULT_DOMAIN.into(),
            tls_cert: None,
            tls_key: None,
            state_dir: PathBuf::from(super::DEFAULT_STATE_DIR),
            routes,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            metrics: Some(super::POD_METRICS),
            timeouts: Timeouts::default(),
            max_connections: POD_FRONTEND_CONNECTIONS,
            max_connections_per_source: Limits::default().frontend_connections_per_source,
            install_secret_file: None,
            upstream: UpstreamSettings::default(),
        }
    }
}

/// A running gateway; dropping it stops it.
pub struct RunningGateway {
    pub frontend: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub routes: Arc<RouteTable>,
    pub cert: CertFiles,
    tasks: Tasks,
}

impl RunningGateway {
    /// The first step of stopping: `/readyz` answers 503 so no new traffic is sent here,
    /// while requests keep being served until the gateway is dropped.
    pub fn drain(&self) {
        self.tasks.set_unready();
    }

    /// Stops as a rolling update needs: unready at once, still serving for `delay` (or until
    /// `stop_now`, a second signal, resolves), then stopped.
    pub async fn drain_and_stop(self, delay: Duration, stop_now: impl Future<Output = ()>) {
        self.drain();
        tracing::info!(
            seconds = delay.as_secs_f64(),
            "stopping: unready, still serving while traffic moves elsewhere"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop_now => tracing::info!("second signal: stopping now"),
        }
    }
}

pub async fn start(options: GatewayOptions) -> Result<RunningGateway, StartError> {
    let secret = match &options.install_secret_file {
        Some(path) => {
            let secret = InstallSecret::from_file(path)
                .map_err(|error| StartError::Config(format!("--gateway-secret-file: {error}")))?;
            Some(secret)
        }
        None => {
            tracing::warn!(
                "no --gateway-secret-file: relays that check gateway tokens will refuse this gateway"
            );
            None
        }
    };
    let secret = Arc::new(SecretSlot::new(secret));
    let registrar = options.registrar.to_ascii_lowercase();
    let domain = options.domain.to_ascii_lowercase();
    let cert = super::cert_pair(
        options.tls_cert.as_ref(),
        options.tls_key.as_ref(),
        &options.state_dir,
        || CertNames::for_relay(&registrar, &domain, options.listen.ip(), ""),
    )?;
    let tls = tls::server_config(&cert)?;
    let (listener, frontend) = super::bind(options.listen)?;
    let routes = Arc::new(RouteTable::default());
    let mut tasks = Tasks::new(None);
    let mut registry = Registry::default();
    let gateway_metrics = Arc::new(GatewayMetrics::default());
    gateway_metrics.register(&mut registry);
    let frontend_metrics = FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let metrics = tasks.serve_metrics(options.metrics, registry)?;
    match options.routes.clone() {
        RouteSource::File(path) => tasks.spawn(follow_route_file(
            path,
            options.reload_interval,
            routes.clone(),
        )),
    }
    if let Some(path) = options.install_secret_file.clone() {
        tasks.spawn(follow_secret_file(
            path,
            options.reload_interval,
            secret.clone(),
        ));
    }
    let settings = super::frontend_settings(
        Names {
            registrar: registrar.clone(),
            domain,
        },
        &options.timeouts,
        options.max_connections,
        options.max_connections_per_source,
        frontend_metrics,
    );
    let backend = Arc::new(Gateway::new(
        routes.clone(),
        registrar,
        options.upstream,
        secret,
        gateway_metrics,
    ));
    tasks.spawn(backend.sweep_idle_connections());
    tasks.spawn(frontend::serve(
        listener,
        Transport::Tls(tls),
        settings,
        backend,
    ));
    tasks.set_ready();
    tracing::info!(listen = %frontend, "gateway serving");
    Ok(RunningGateway {
        frontend,
        metrics,
        routes,
        cert,
        tasks,
    })
}

/// Reads routes from a YAML file (`LABEL: {relay: HOST:PORT, ready: true}`), every
/// `interval`; a broken file is reported and the last good routes kept.
async fn follow_route_file(path: PathBuf, interval: Duration, table: Arc<RouteTable>) {
    let read = {
        let path = path.clone();
        move || gateway::read_route_file(&path)
    };
    let apply = |routes| match routes {
        Ok(routes) => {
            table.replace(routes);
            None
        }
        Err(problem) => Some(problem),
    };
    super::follow_files(
        interval,
        FirstRead::Now,
        read,
        apply,
        |problem| tracing::warn!(file = %path.display(), %problem, "routes not updated"),
    )
    .await;
}

/// Re-reads the install secret every `interval` (a Secret mounted as a file is updated in
/// place when the chart rotates it); an unreadable or short file is reported once and the
/// last good secret kept. The secret itself is never logged.
async fn follow_secret_file(path: PathBuf, interval: Duration, slot: Arc<SecretSlot>) {
    let read = {
        let path = path.clone();
        move || InstallSecret::from_file(&path)
    };
    let apply = |secret: Result<InstallSecret, GatewayAuthError>| match secret {
        Ok(secret) => {
            if slot.replace(secret) {
                tracing::info!(file = %path.display(), "install secret changed");
            }
            None
        }
        Err(error) => Some(error.to_string()),
    };
    super::follow_files(
        interval,
        FirstRead::AfterInterval,
        read,
        apply,
        |problem| tracing::warn!(%problem, "install secret not updated"),
    )
    .await;
}
