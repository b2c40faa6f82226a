//! `taas-relay serve`: the standalone relay assembled from its parts (labels directory, TLS,
//! front end, metrics, reload), usable in-process by tests and by the binary alike.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::config::{LabelConfig, Limits, PortRange, RedirectHost, RelaySettings, Timeouts};
use crate::data_plane::DataPlane;
use crate::frontend::{self, FrontendSettings};
use crate::host::Names;
use crate::label_source::{self, LabelSet};
use crate::relay::Relay;
use crate::tls::{self, CertFiles, CertNames};

/// Everything `serve` is configured with (the binary's flags).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub registrar: String,
    pub domain: String,
    pub advertise: Option<String>,
    pub redirect_host: RedirectHost,
    pub p_ports: PortRange,
    pub q_ports: PortRange,
    pub labels: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `None`: no metrics listener.
    pub metrics: Option<SocketAddr>,
    pub reload_interval: Duration,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Threads for the labels' connections (`None`: one per CPU; see `data_plane`).
    pub data_threads: Option<NonZeroUsize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            registrar: "taas-registrar.localhost".into(),
            domain: "taas.localhost".into(),
            advertise: None,
            redirect_host: RedirectHost::Requested,
            p_ports: PortRange {
                lo: 20000,
                hi: 20999,
            },
            q_ports: PortRange {
                lo: 21000,
                hi: 21999,
            },
            labels: PathBuf::from("labels"),
            tls_cert: None,
            tls_key: None,
            state_dir: PathBuf::from(".taas"),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            reload_interval: Duration::from_secs(1),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            data_threads: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("labels: {0}")]
    Labels(#[from] label_source::LoadError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the data-plane threads: {0}")]
    DataPlane(#[source] std::io::Error),
}

/// A running standalone relay. Dropping it stops every task it started.
pub struct Standalone {
    pub relay: Arc<Relay>,
    /// Where the HTTPS front end listens (the real port when 0 was asked for).
    pub frontend: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub cert: CertFiles,
    /// Labels added in-process (the demo), kept across reloads of the directory.
    extra: Arc<Mutex<BTreeMap<String, LabelConfig>>>,
    /// The directory's current labels.
    from_dir: tokio::sync::watch::Receiver<LabelSet>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.relay.close();
    }
}

impl Standalone {
    /// Adds (or replaces) a label that does not come from the directory.
    pub fn add_label(&self, config: LabelConfig) -> Vec<String> {
        lock(&self.extra).insert(config.label.clone(), config);
        apply(&self.relay, &self.from_dir.borrow(), &lock(&self.extra))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn apply(relay: &Relay, set: &LabelSet, extra: &BTreeMap<String, LabelConfig>) -> Vec<String> {
    let mut wanted = set.labels.clone();
    for (name, config) in extra {
        wanted.entry(name.clone()).or_insert_with(|| config.clone());
    }
    relay.apply(&wanted)
}

/// Checks the options that do not need the network or the disk.
fn settings(options: &ServeOptions) -> Result<RelaySettings, ServeError> {
    if options.p_ports.overlaps(&options.q_ports) {
        return Err(ServeError::Config(format!(
            "--p-ports {} and --q-ports {} overlap: rendezvous and client ports need separate ranges",
            options.p_ports, options.q_ports
        )));
    }
    let listen_ip = options.listen.ip();
    let advertise = match (&options.advertise, listen_ip.is_unspecified()) {
        (Some(host), _) if !host.trim().is_empty() => host.trim().to_string(),
        (_, false) => listen_ip.to_string(),
        (_, true) => {
            return Err(ServeError::Config(format!(
                "--advertise is required when --listen is the wildcard address {listen_ip}: \
                 hidden servers must be told an address they can reach"
            )))
        }
    };
    let name = |flag: &str, value: &str| {
        let value = value.trim().trim_end_matches('.').to_ascii_lowercase();
        match crate::host::host_only(&value) {
            Some(host) if host == value && !value.contains(':') => Ok(value),
            _ => Err(ServeError::Config(format!(
                "{flag} {value:?} is not a host name"
            ))),
        }
    };
    Ok(RelaySettings {
        listen: options.listen,
        registrar: name("--registrar", &options.registrar)?,
        domain: name("--domain", &options.domain)?,
        advertise,
        redirect_host: options.redirect_host,
        p_ports: options.p_ports,
        q_ports: options.q_ports,
        bind_ip: listen_ip,
        timeouts: options.timeouts.clone(),
        limits: options.limits.clone(),
        data_threads: options
            .data_threads
            .unwrap_or_else(DataPlane::default_threads),
    })
}

fn cert_files(options: &ServeOptions, settings: &RelaySettings) -> Result<CertFiles, ServeError> {
    match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => Ok(CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => {
            let names = CertNames::for_relay(
                &settings.registrar,
                &settings.domain,
                settings.bind_ip,
                &settings.advertise,
            );
            Ok(tls::load_or_generate(&options.state_dir, &names)?)
        }
        _ => Err(ServeError::Config(
            "--tls-cert and --tls-key go together: give both, or neither for a generated certificate".into(),
        )),
    }
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    crate::ports::listen(addr, 1024).map_err(|source| ServeError::Listen { addr, source })
}

/// Binds and serves the metrics endpoint when asked for; returns its address and task.
pub(crate) async fn spawn_metrics(
    addr: Option<SocketAddr>,
    registry: Registry,
    ready: &Arc<AtomicBool>,
) -> Result<(Option<SocketAddr>, Vec<JoinHandle<()>>), ServeError> {
    let Some(addr) = addr else {
        return Ok((None, Vec::new()));
    };
    let listener = bind(addr).await?;
    let local = listener.local_addr().ok();
    let task = tokio::spawn(crate::metrics::serve(
        listener,
        Arc::new(registry),
        ready.clone(),
    ));
    Ok((local, vec![task]))
}

/// Starts the standalone relay: every configuration error is reported here, before anything
/// is served.
pub async fn start(options: ServeOptions) -> Result<Standalone, ServeError> {
    let settings = settings(&options)?;
    let labels = label_source::load_dir(&options.labels)?;
    let cert = cert_files(&options, &settings)?;
    let tls = tls::server_config(&cert)?;
    let front = bind(options.listen).await?;
    let frontend_addr = front.local_addr().map_err(|source| ServeError::Listen {
        addr: options.listen,
        source,
    })?;
    let mut registry = Registry::default();
    let relay = Relay::new(settings.clone(), &mut registry).map_err(ServeError::DataPlane)?;
    let problems = relay.apply(&labels.labels);
    if !problems.is_empty() {
        relay.close();
        return Err(ServeError::Config(problems.join("\n")));
    }
    tracing::info!(count = labels.labels.len(), dir = %options.labels.display(), "labels loaded");
    if labels.labels.is_empty() {
        tracing::info!(
            "no labels yet: create one with `taas-relay label new --id ID --label LABEL`"
        );
    }

    let frontend_metrics = frontend::FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let (metrics, mut tasks) = match spawn_metrics(options.metrics, registry, &ready).await {
        Ok(spawned) => spawned,
        Err(error) => {
            relay.close();
            return Err(error);
        }
    };
    let front_settings = FrontendSettings {
        names: Names {
            registrar: settings.registrar.clone(),
            domain: settings.domain.clone(),
        },
        own_ips: [settings.bind_ip]
            .into_iter()
            .chain(settings.advertise.parse().ok())
            .filter(|ip: &IpAddr| !ip.is_unspecified())
            .collect(),
        handshake_timeout: settings.timeouts.handshake,
        request_timeout: settings.timeouts.keep_alive,
        body_timeout: settings.timeouts.request_body,
        max_connections: settings.limits.frontend_connections,
        max_connections_per_source: settings.limits.frontend_connections_per_source,
        metrics: frontend_metrics,
    };
    tasks.push(tokio::spawn(frontend::serve(
        front,
        frontend::Transport::Tls(tls),
        front_settings,
        relay.clone(),
    )));

    let extra: Arc<Mutex<BTreeMap<String, LabelConfig>>> = Arc::default();
    let (tx, from_dir) = tokio::sync::watch::channel(labels.clone());
    tasks.push(tokio::spawn(label_source::watch(
        options.labels.clone(),
        options.reload_interval,
        labels,
        tx,
    )));
    let mut changes = from_dir.clone();
    let (reload_relay, reload_extra) = (relay.clone(), extra.clone());
    tasks.push(tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let set = changes.borrow_and_update().clone();
            for problem in apply(&reload_relay, &set, &lock(&reload_extra)) {
                tracing::warn!("reload: {problem}");
            }
        }
    }));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        listen = %frontend_addr,
        registrar = %settings.registrar,
        domain = %settings.domain,
        advertise = %settings.advertise,
        "relay serving"
    );
    Ok(Standalone {
        relay,
        frontend: frontend_addr,
        metrics,
        cert,
        extra,
        from_dir,
        tasks,
    })
}
