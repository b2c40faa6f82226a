//! `taas-relay label-relay`: one label's relay, as the operator runs it in a pod. The same
//! per-label code as `serve`, with three differences: the label comes from a mounted
//! ConfigMap (`TaasLabel` manifest) and Secret volume; requests arrive from the gateways as
//! plain HTTP on a control port (the gateway terminates TLS and names the client, and proves
//! it is a gateway of this install with the label's gateway token, see `gateway_auth`); and the
//! addresses handed out are the external ones the operator read back from the label's
//! Service, from a mounted file that can change while the relay runs. In a cluster's edge
//! mode it also serves an edge port (`edge`) for connections the gateway forwards raw.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::{FirstRead, StartError, Tasks};
use crate::config::{
    ExternalAddress, ExternalFile, LabelConfig, Limits, PortRange, RedirectHost, RelaySettings,
    Timeouts, DEFAULT_DOMAIN, DEFAULT_REGISTRAR, POD_FRONTEND_CONNECTIONS,
};
use crate::edge::{self, EdgeAuth};
use crate::frontend::{self, ControlAuth, FrontendMetrics, Transport};
use crate::gateway_auth::GatewayToken;
use crate::host::Names;
use crate::label_source::{self, LoadError};
use crate::relay::StandaloneBackend;
use crate::splice::SpliceMode;

/// The control port unless told otherwise (`--control`): every address, port 8080.
pub const DEFAULT_CONTROL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
/// The pod's rendezvous ports unless told otherwise (`--p-ports`): eight, each exposed by
/// the label's Service.
pub const DEFAULT_P_PORTS: PortRange = PortRange {
    lo: 20000,
    hi: 20007,
};
/// The pod's client port q unless told otherwise (`--client-port`).
pub const DEFAULT_CLIENT_PORT: u16 = 21000;
/// How often the mounted files are read unless told otherwise (`--reload-interval`).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How long a draining relay keeps its parked connections (or the drain timeout if shorter)
/// before giving them back. Why not at once: gateways whose DNS cache (5 s) still lists this
/// replica keep offering it clients, and a label whose only other replica is new has nothing
/// parked there yet; meanwhile the agent's new registrations (refused here) land on the other
/// replicas and park. So for a few seconds this replica serves clients as a last resort
/// instead of every client of the label queuing or failing. (The operator's relay Deployments
/// also wait 5 s, `minReadySeconds`, before stopping an old pod after a new one is ready.)
pub const PARKED_HOLD: Duration = Duration::from_secs(5);

/// How long a stopping relay goes on answering at least (unready, refusing registrations,
/// sending no client to itself), even with no pair or parked connection left to wait for:
/// the gateways' cached addresses of the label (up to 5 s) may still name this pod. While it
/// answers, a gateway passes over it at once; once the pod is gone, its address answers
/// nothing and each request to it waits out the gateway's connect timeout (2 s: the one GET
/// that failed in e2e 7f's first run, with a replica that gave its connections back at once
/// and exited). Capped by the drain timeout.
pub const LINGER: Duration = Duration::from_secs(6);

/// Everything `label-relay` is configured with (the binary's flags).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelRelayOptions {
    /// The `TaasLabel` manifest (a ConfigMap key).
    pub label_file: PathBuf,
    /// The mounted Secret (one file per key).
    pub secret_dir: PathBuf,
    /// `host:` and `ports:` (local → external), written by the operator; absent: the
    /// control address and the local ports.
    pub external_file: Option<PathBuf>,
    /// This pod's name: with several replicas each behind a Service of its own, the external
    /// file has an entry per pod and the relay takes its own ([`ExternalFile::for_pod`]).
    pub pod_name: Option<String>,
    /// Plain-HTTP port for the gateways.
    pub control: SocketAddr,
    /// The edge port (`edge`): connections a gateway in edge mode forwards raw, each after an
    /// edge header. Needs `gateway_token`. `None`: off.
    pub edge: Option<SocketAddr>,
    /// The gateway token (`gateway_auth`): with it, every control-port request must carry
    /// it (403 otherwise) and only such requests may name the original client. Without it,
    /// the control port is unauthenticated and nothing may name the client.
    pub gateway_token: Option<GatewayToken>,
    /// When not empty, only peers in these networks count as gateways (with a token, a
    /// request from elsewhere gets 403). Empty: any peer with the token.
    pub trusted: Vec<ipnet::IpNet>,
    pub registrar: String,
    pub domain: String,
    /// Host in the 307: the requested LABEL.<domain> (end-to-end TLS names it), or the
    /// label's external address.
    pub redirect_host: RedirectHost,
    /// The pod's rendezvous ports (each exposed by the label's Service).
    pub p_ports: PortRange,
    /// The pod's client port q.
    pub client_port: u16,
    pub metrics: Option<SocketAddr>,
    pub reload_interval: Duration,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// How pairs move their bytes.
    pub splice: SpliceMode,
}

impl LabelRelayOptions {
    /// The label's files, everything else as the flags' defaults.
    pub fn new(label_file: PathBuf, secret_dir: PathBuf) -> Self {
        Self {
            label_file,
            secret_dir,
            external_file: None,
            pod_name: None,
            control: DEFAULT_CONTROL,
            edge: None,
            gateway_token: None,
            trusted: Vec::new(),
            registrar: DEFAULT_REGISTRAR.into(),
            domain: DEFAULT_DOMAIN.into(),
            redirect_host: RedirectHost::default(),
            p_ports: DEFAULT_P_PORTS,
            client_port: DEFAULT_CLIENT_PORT,
            metrics: Some(super::POD_METRICS),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            timeouts: Timeouts::default(),
            limits: Limits {
                frontend_connections: POD_FRONTEND_CONNECTIONS,
                ..Limits::default()
            },
            splice: SpliceMode::default(),
        }
    }
}

/// A running label relay; dropping it stops it.
pub struct LabelRelay {
    pub relay: Arc<StandaloneBackend>,
    pub control: SocketAddr,
    /// The edge port as bound, when on.
    pub edge: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// How long a drain keeps the parked connections ([`parked_hold`]).
    hold: Duration,
    tasks: Tasks,
}

/// How long a draining relay keeps its parked connections: [`PARKED_HOLD`], or none for a
/// replica with an address of its own (`--pod-name`, a StatefulSet's pod behind a Service of
/// its own). That Service drops a terminating pod from its endpoints at once, so nothing can
/// reach the relay's ports from outside any more: its parked connections are given back at
/// once and the agent parks them on the other replicas.
pub fn parked_hold(options: &LabelRelayOptions) -> Duration {
    if options.pod_name.is_some() {
        Duration::ZERO
    } else {
        PARKED_HOLD
    }
}

impl LabelRelay {
    /// Begins a graceful stop without waiting, as SIGTERM does: `/readyz` turns 503,
    /// registrations get 503 with `taas-draining: 1`, edge offers are answered LAST_RESORT
    /// while parked connections remain; after [`parked_hold`] the label closes (its ports stop
    /// taking connections, parked connections are given back); pairs already spliced go on.
    pub fn drain(&self) {
        self.tasks.drain_holding(self.hold);
    }

    /// Stops gracefully ([`LabelRelay::drain`], the hold capped at `timeout`), then stops for
    /// good as soon as no pair is left, the hold is over (or nothing is parked) and
    /// [`LINGER`] has passed; at `timeout` (the pairs left are cut); or when `stop_now` (a
    /// second signal) resolves.
    pub async fn drain_and_stop(
        self,
        timeout: std::time::Duration,
        stop_now: impl std::future::Future<Output = ()>,
    ) -> super::DrainEnd {
        self.tasks
            .drain_holding_and_stop(self.hold, LINGER, timeout, stop_now)
            .await
    }
}

/// The label as this pod serves it: q on the pod's fixed client port whatever the spec pins
/// (a pinned client port is the Service's business in a cluster).
fn read_label(options: &LabelRelayOptions) -> Result<LabelConfig, LoadError> {
    let mut config = label_source::read_mounted_label(&options.label_file, &options.secret_dir)?;
    config.client_port = Some(options.client_port);
    Ok(config)
}

fn read_external(path: &Path, pod_name: Option<&str>) -> Result<ExternalAddress, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: ExternalFile =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(file.for_pod(pod_name))
}

pub async fn start(options: LabelRelayOptions) -> Result<LabelRelay, StartError> {
    if options.p_ports.contains(options.client_port) {
        return Err(StartError::Config(format!(
            "--client-port {} is inside --p-ports {}",
            options.client_port, options.p_ports
        )));
    }
    if let Some(edge) = options.edge {
        if options.p_ports.contains(edge.port()) {
            return Err(StartError::Config(format!(
                "--edge {edge} is inside --p-ports {}",
                options.p_ports
            )));
        }
    }
    let edge_auth = match (options.edge, &options.gateway_token) {
        (None, _) => None,
        (Some(_), Some(token)) => Some(EdgeAuth {
            gateway_token: token.clone(),
            trusted: options.trusted.clone(),
        }),
        (Some(_), None) => {
            let problem = "--edge needs --gateway-token: only gateways of this install may use it";
            return Err(StartError::Config(problem.into()));
        }
    };
    let label = read_label(&options)?;
    let label_name = label.label.clone();
    let external = match &options.external_file {
        Some(path) => {
            read_external(path, options.pod_name.as_deref()).map_err(StartError::Config)?
        }
        None => ExternalAddress::new(options.control.ip().to_string()),
    };
    let settings = RelaySettings {
        listen: options.control,
        registrar: options.registrar.to_ascii_lowercase(),
        domain: options.domain.to_ascii_lowercase(),
        advertise: external.host.clone(),
        redirect_host: options.redirect_host,
        p_ports: options.p_ports,
        q_ports: PortRange::new(options.client_port, options.client_port)
            .map_err(StartError::Config)?,
        bind_ip: options.control.ip(),
        // One label per pod: its own q is its client port.
        shared_port: None,
        timeouts: options.timeouts.clone(),
        limits: options.limits.clone(),
        // One label per pod: one data-plane thread.
        data_threads: std::num::NonZeroUsize::MIN,
        splice: options.splice,
    };
    let (control, control_addr) = super::bind(options.control)?;
    let edge = options.edge.map(super::bind).transpose()?;
    let mut registry = Registry::default();
    let relay =
        StandaloneBackend::new(settings.clone(), &mut registry).map_err(StartError::DataPlane)?;
    let mut tasks = Tasks::new(Some(relay.clone()));
    // Its peers are gateways: registration answers carry what they read.
    relay.answer_for_gateways();
    relay.set_external(external);
    let problems = relay.apply(&BTreeMap::from([(label.label.clone(), label)]));
    if !problems.is_empty() {
        return Err(StartError::Config(problems.join("\n")));
    }

    let frontend_metrics = FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let metrics = tasks.serve_metrics(options.metrics, registry)?;
    let front = super::frontend_settings(
        Names {
            registrar: settings.registrar.clone(),
            domain: settings.domain.clone(),
        },
        &settings.timeouts,
        settings.limits.frontend_connections,
        // Not applied on the control port: its peers are the gateways.
        settings.limits.frontend_connections,
        frontend_metrics,
    );
    let transport = Transport::Control(ControlAuth {
        gateway_token: options.gateway_token.clone(),
        gateway_networks: options.trusted.clone(),
    });
    tasks.spawn(frontend::serve(control, transport, front, relay.clone()));
    let edge_addr = match (edge, edge_auth) {
        (Some((listener, addr)), Some(auth)) => {
            // Not stopped by a drain: during the hold the gateways still offer clients (it
            // answers LAST_RESORT) and hidden servers of pending registrations; once the
            // label is closed it answers REFUSE and NOT_MINE.
            tasks.spawn(edge::serve(listener, relay.clone(), label_name, auth));
            Some(addr)
        }
        _ => None,
    };
    let hold = parked_hold(&options);
    tasks.spawn_until_drain(follow_mounted_files(options, relay.clone()));
    tasks.set_ready();
    tracing::info!(control = %control_addr, edge = ?edge_addr, "label relay serving");
    Ok(LabelRelay {
        relay,
        control: control_addr,
        edge: edge_addr,
        metrics,
        hold,
        tasks,
    })
}

/// Follows the mounted files: a changed spec or secret is applied in place; a broken one is
/// reported once and the last good one kept.
async fn follow_mounted_files(options: LabelRelayOptions, relay: Arc<StandaloneBackend>) {
    let interval = options.reload_interval;
    let read = move || {
        let label = read_label(&options).map_err(|e| e.to_string());
        let pod_name = options.pod_name.as_deref();
        let external = options
            .external_file
            .as_deref()
            .map(|path| read_external(path, pod_name));
        (label, external)
    };
    let apply = move |(label, external): (Result<LabelConfig, String>, Option<_>)| {
        let mut problems = Vec::new();
        match label {
            Ok(label) => {
                problems.extend(relay.apply(&BTreeMap::from([(label.label.clone(), label)])))
            }
            Err(problem) => problems.push(problem),
        }
        match external {
            Some(Ok(external)) => relay.set_external(external),
            Some(Err(problem)) => problems.push(problem),
            None => {}
        }
        Some(problems.join("; ")).filter(|problem| !problem.is_empty())
    };
    super::follow_files(interval, FirstRead::AfterInterval, read, apply, |problem| {
        tracing::warn!("reload: {problem} (keeping the last good configuration)")
    })
    .await;
}
