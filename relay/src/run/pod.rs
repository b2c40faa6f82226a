//! `taas-relay label-relay`: one label's relay, as the operator runs it in a pod. The same
//! per-label code as `serve`, with three differences: the label comes from a mounted
//! ConfigMap (`TaasLabel` manifest) and Secret volume; requests arrive from the gateways as
//! plain HTTP on a control port (the gateway terminates TLS and names the client, and proves
//! it is a gateway of this install with the label's gateway token, see `gateway_auth`); and the
//! addresses handed out are the external ones the operator read back from the label's
//! Service, from a mounted file that can change while the relay runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::config::{
    ExternalAddress, LabelConfig, Limits, PortRange, RedirectHost, RelaySettings, Timeouts,
};
use crate::frontend::{self, ControlAuth, FrontendMetrics, FrontendSettings, Transport};
use crate::gateway_auth::GatewayToken;
use crate::host::Names;
use crate::label_source::{self, LoadError};
use crate::relay::Relay;
use crate::serve::ServeError;

#[derive(Clone, Debug)]
pub struct LabelRelayOptions {
    /// The `TaasLabel` manifest (a ConfigMap key).
    pub label_file: PathBuf,
    /// The mounted Secret (one file per key).
    pub secret_dir: PathBuf,
    /// `host:` and `ports:` (local → external), written by the operator; absent: the
    /// control address and the local ports.
    pub external_file: Option<PathBuf>,
    /// Plain-HTTP port for the gateways.
    pub control: SocketAddr,
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
}

/// A running label relay; dropping it stops it.
pub struct LabelRelay {
    pub relay: Arc<Relay>,
    pub control: SocketAddr,
    pub metrics: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for LabelRelay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.relay.close();
    }
}

/// The label as this pod serves it: q on the pod's fixed client port whatever the spec pins
/// (a pinned client port is the Service's business in a cluster).
fn read_label(options: &LabelRelayOptions) -> Result<LabelConfig, LoadError> {
    let mut config = label_source::read_mounted_label(&options.label_file, &options.secret_dir)?;
    config.client_port = Some(options.client_port);
    Ok(config)
}

fn read_external(path: &Path) -> Result<ExternalAddress, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub async fn start(options: LabelRelayOptions) -> Result<LabelRelay, ServeError> {
    if options.p_ports.contains(options.client_port) {
        return Err(ServeError::Config(format!(
            "--client-port {} is inside --p-ports {}",
            options.client_port, options.p_ports
        )));
    }
    let label = read_label(&options)?;
    let external = match &options.external_file {
        Some(path) => read_external(path).map_err(ServeError::Config)?,
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
            .map_err(ServeError::Config)?,
        bind_ip: options.control.ip(),
        timeouts: options.timeouts.clone(),
        limits: options.limits.clone(),
        // One label per pod: one data-plane thread.
        data_threads: std::num::NonZeroUsize::MIN,
    };
    let control = crate::serve::bind(options.control).await?;
    let control_addr = control.local_addr().map_err(|source| ServeError::Listen {
        addr: options.control,
        source,
    })?;
    let mut registry = Registry::default();
    let relay = Relay::new(settings.clone(), &mut registry).map_err(ServeError::DataPlane)?;
    relay.set_external(external);
    let problems = relay.apply(&BTreeMap::from([(label.label.clone(), label)]));
    if !problems.is_empty() {
        relay.close();
        return Err(ServeError::Config(problems.join("\n")));
    }

    let frontend_metrics = FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let (metrics, mut tasks) =
        match crate::serve::spawn_metrics(options.metrics, registry, &ready).await {
            Ok(spawned) => spawned,
            Err(error) => {
                relay.close();
                return Err(error);
            }
        };
    let front = FrontendSettings {
        names: Names {
            registrar: settings.registrar.clone(),
            domain: settings.domain.clone(),
        },
        own_ips: Vec::new(),
        handshake_timeout: settings.timeouts.handshake,
        request_timeout: settings.timeouts.keep_alive,
        body_timeout: settings.timeouts.request_body,
        max_connections: settings.limits.frontend_connections,
        // Not applied on the control port: its peers are the gateways.
        max_connections_per_source: settings.limits.frontend_connections,
        metrics: frontend_metrics,
    };
    let transport = Transport::Control(ControlAuth {
        gateway_token: options.gateway_token.clone(),
        gateway_networks: options.trusted.clone(),
    });
    tasks.push(tokio::spawn(frontend::serve(
        control,
        transport,
        front,
        relay.clone(),
    )));
    tasks.push(tokio::spawn(reload(options, relay.clone())));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(control = %control_addr, "label relay serving");
    Ok(LabelRelay {
        relay,
        control: control_addr,
        metrics,
        tasks,
    })
}

/// Follows the mounted files: a changed spec or secret is applied in place; a broken one is
/// reported once and the last good one kept.
async fn reload(options: LabelRelayOptions, relay: Arc<Relay>) {
    let mut last_problem = String::new();
    loop {
        tokio::time::sleep(options.reload_interval).await;
        let files = options.clone();
        let read = tokio::task::spawn_blocking(move || {
            let label = read_label(&files).map_err(|e| e.to_string());
            let external = files.external_file.as_deref().map(read_external);
            (label, external)
        })
        .await;
        let Ok((label, external)) = read else {
            continue;
        };
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
        let problem = problems.join("; ");
        if problem != last_problem && !problem.is_empty() {
            tracing::warn!("reload: {problem} (keeping the last good configuration)");
        }
        last_problem = problem;
    }
}
