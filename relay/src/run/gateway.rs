//! `taas-relay gateway`: the cluster's TLS front end as a process. Its routing and upstream
//! connections are `crate::gateway`; here is what the gateway shares with the other modes
//! (certificate pair, front end, metrics and readiness, files followed) and the drain before
//! it stops. In edge mode (issue 15.3) it also listens on the shared client port and the
//! shared rendezvous range, and forwards direct labels from its HTTPS port
//! (`crate::gateway::edge`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::{drain_end, DrainEnd, FirstRead, StartError, Tasks, DRAIN_POLL};
use crate::config::{
    Limits, PortRange, Timeouts, DEFAULT_DOMAIN, DEFAULT_REGISTRAR, POD_FRONTEND_CONNECTIONS,
};
use crate::direct::DirectLabels;
use crate::frontend::{self, FrontendMetrics, Transport};
use crate::gateway::edge::{Edge, EdgeLimits, EdgeMetrics};
use crate::gateway::{self, Gateway, GatewayMetrics, RouteTable, SecretSlot, UpstreamSettings};
use crate::gateway_auth::{GatewayAuthError, InstallSecret};
use crate::host::Names;
use crate::splice::SpliceMode;
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
    /// The shared client port (edge mode): TLS clients routed by server name to their
    /// label's relay, raw. `None`: off.
    pub shared_port: Option<SocketAddr>,
    /// The shared rendezvous range (edge mode), listened on at `listen`'s IP, every port.
    /// `None`: off.
    pub rendezvous_ports: Option<PortRange>,
    /// The edge's bounds.
    pub edge_limits: EdgeLimits,
    /// How the edge's forwarded connections move their bytes.
    pub splice: SpliceMode,
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
            shared_port: None,
            rendezvous_ports: None,
            edge_limits: EdgeLimits::default(),
            splice: SpliceMode::default(),
        }
    }
}

/// Refuses a configuration where two of the gateway's listeners would want one port: the
/// HTTPS port, the shared port, the metrics endpoint and the rendezvous range (port 0, chosen
/// by the OS, never conflicts). Pure: checked before anything is bound.
pub fn check_ports(
    listen: SocketAddr,
    shared_port: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    rendezvous: Option<PortRange>,
) -> Result<(), String> {
    let named = [
        ("--listen", Some(listen)),
        ("--shared-port", shared_port),
        ("--metrics", metrics),
    ];
    let fixed: Vec<(&str, u16)> = named
        .iter()
        .filter_map(|(flag, addr)| Some((*flag, addr.as_ref()?.port())))
        .filter(|(_, port)| *port != 0)
        .collect();
    for (i, (a, port_a)) in fixed.iter().enumerate() {
        if let Some((b, _)) = fixed[i + 1..].iter().find(|(_, port_b)| port_b == port_a) {
            return Err(format!("{a} and {b} both use port {port_a}"));
        }
        if let Some(range) = rendezvous.filter(|range| range.contains(*port_a)) {
            return Err(format!(
                "{a} uses port {port_a}, inside --rendezvous-ports {range}"
            ));
        }
    }
    Ok(())
}

/// A running gateway; dropping it stops it.
pub struct RunningGateway {
    pub frontend: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// The shared client port as bound, when on.
    pub shared_port: Option<SocketAddr>,
    /// The rendezvous range as bound, when on.
    pub rendezvous_ports: Option<PortRange>,
    pub routes: Arc<RouteTable>,
    pub cert: CertFiles,
    edge: Edge,
    tasks: Tasks,
}

impl RunningGateway {
    /// The first step of stopping: `/readyz` answers 503 so no new traffic is sent here,
    /// while requests keep being served until the gateway is dropped.
    pub fn drain(&self) {
        self.tasks.set_unready();
    }

    /// Connections the edge forwards now (clients, and hidden servers parked or paired).
    pub fn forwarded(&self) -> usize {
        self.edge.forwarded()
    }

    /// Stops as a rolling update needs: unready at once, still serving for `delay` while
    /// load balancers and kube-proxy move new connections elsewhere; then no new connection
    /// is taken, the hidden servers' parked connections are given back (their agents park
    /// again through another gateway), and the connections carrying pairs are let finish,
    /// for at most `timeout`. `stop_now` (a second signal) ends it at any point.
    pub async fn drain_and_stop(
        self,
        delay: Duration,
        timeout: Duration,
        stop_now: impl Future<Output = ()>,
    ) -> DrainEnd {
        self.drain();
        tracing::info!(
            seconds = delay.as_secs_f64(),
            "stopping: unready, still serving while traffic moves elsewhere"
        );
        tokio::pin!(stop_now);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut stop_now => {
                tracing::info!("second signal: stopping now");
                return DrainEnd::SecondSignal;
            }
        }
        self.tasks.stop_accepting();
        self.edge.drain();
        let started = tokio::time::Instant::now();
        let wait = async {
            let mut tick = tokio::time::interval(DRAIN_POLL);
            loop {
                tick.tick().await;
                if let Some(end) = drain_end(self.edge.forwarded(), started.elapsed(), timeout) {
                    return end;
                }
            }
        };
        tracing::info!(
            seconds = timeout.as_secs_f64(),
            forwarded = self.edge.forwarded(),
            "stopping: no new connections, parked connections given back; pairs may finish"
        );
        let end = tokio::select! {
            end = wait => end,
            () = &mut stop_now => DrainEnd::SecondSignal,
        };
        match end {
            DrainEnd::PairsDone => tracing::info!("stopped: every forwarded connection ended"),
            DrainEnd::TimedOut => tracing::warn!(
                forwarded = self.edge.forwarded(),
                "stopped: drain timeout, connections still forwarded are cut"
            ),
            DrainEnd::SecondSignal => tracing::info!("second signal: stopping now"),
        }
        end
    }
}

pub async fn start(options: GatewayOptions) -> Result<RunningGateway, StartError> {
    check_ports(
        options.listen,
        options.shared_port,
        options.metrics,
        options.rendezvous_ports,
    )
    .map_err(StartError::Config)?;
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
    let shared_port = options.shared_port.map(super::bind).transpose()?;
    let rendezvous = match options.rendezvous_ports {
        None => Vec::new(),
        Some(range) => range
            .iter()
            .map(|port| super::bind(SocketAddr::new(options.listen.ip(), port)))
            .collect::<Result<_, _>>()?,
    };
    let routes = Arc::new(RouteTable::default());
    let mut tasks = Tasks::new(None);
    let mut registry = Registry::default();
    let gateway_metrics = Arc::new(GatewayMetrics::default());
    gateway_metrics.register(&mut registry);
    let frontend_metrics = FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let edge_metrics = Arc::new(EdgeMetrics::default());
    edge_metrics.register(&mut registry);
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
    let mut settings = super::frontend_settings(
        Names {
            registrar: registrar.clone(),
            domain: domain.clone(),
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
    let edge = Edge::new(
        &backend,
        routes.clone(),
        &domain,
        options.timeouts.clone(),
        options.edge_limits,
        options.splice,
        edge_metrics,
    );
    // The HTTPS port reads every ClientHello's server name first: a direct label in edge
    // mode is forwarded raw, every other name gets the gateway's TLS as before.
    settings.direct = Some(DirectLabels::Gateway(edge.clone()));
    // Every listener stops taking connections when the drain's delay is over.
    let shared_port = shared_port.map(|(listener, addr)| {
        tasks.spawn_until_drain(edge.clone().serve_shared_port(listener));
        addr
    });
    for (listener, _) in rendezvous {
        tasks.spawn_until_drain(edge.clone().serve_rendezvous(listener));
    }
    tasks.spawn_until_drain(frontend::serve(
        listener,
        Transport::Tls(tls),
        settings,
        backend,
    ));
    tasks.set_ready();
    tracing::info!(
        listen = %frontend,
        shared_port = ?shared_port,
        rendezvous_ports = ?options.rendezvous_ports.map(|r| r.to_string()),
        "gateway serving"
    );
    Ok(RunningGateway {
        frontend,
        metrics,
        shared_port,
        rendezvous_ports: options.rendezvous_ports,
        routes,
        cert,
        edge,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], port))
    }

    #[test]
    fn listeners_that_would_share_a_port_are_refused_before_anything_is_bound() {
        let range = PortRange::new(20_000, 20_255).ok();
        assert_eq!(
            check_ports(addr(8443), Some(addr(9443)), Some(addr(9464)), range),
            Ok(())
        );
        assert_eq!(
            check_ports(addr(0), Some(addr(0)), Some(addr(0)), range),
            Ok(())
        );
        let same = check_ports(addr(8443), Some(addr(8443)), None, None).unwrap_err();
        assert!(same.contains("--listen and --shared-port"), "{same}");
        let metrics = check_ports(addr(8443), None, Some(addr(8443)), None).unwrap_err();
        assert!(metrics.contains("--metrics"), "{metrics}");
        let inside = check_ports(addr(8443), Some(addr(20_010)), None, range).unwrap_err();
        assert!(inside.contains("--shared-port uses port 20010"), "{inside}");
        let edge = check_ports(addr(20_255), None, None, range).unwrap_err();
        assert!(edge.contains("--listen"), "{edge}");
    }
}
