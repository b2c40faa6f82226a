//! `taas-relay serve`: the standalone relay, every label in one process, assembled from its
//! parts (labels directory, TLS, front end, metrics, reload) with the set-up every mode
//! shares (`run`). Usable in-process by tests and by the binary alike.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use taas_protocol::sync::lock;

use sd_notify::NotifyState;
use tokio::task::AbortHandle;

use super::{StartError, Tasks};
use crate::config::{
    LabelConfig, Limits, PortRange, RedirectHost, RelaySettings, Timeouts, DEFAULT_DOMAIN,
    DEFAULT_REGISTRAR,
};
use crate::data_plane::DataPlane;
use crate::frontend::{self, FrontendMetrics};
use crate::handover::{self, HandoverSocket, Key, Listeners, Registration};
use crate::host::Names;
use crate::label_source::{self, LabelSet};
use crate::relay::StandaloneBackend;
use crate::splice::SpliceMode;
use crate::tls::{self, CertFiles, CertNames};

/// Everything `serve` is configured with (the binary's flags); its `Default` is the flags'
/// defaults.
#[derive(Clone, Debug, PartialEq)]
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
    /// The shared client port for every label (`shared_port`), on the listen IP; `None`:
    /// off (the default), `Some(0)`: any free port.
    pub shared_port: Option<u16>,
    /// Take the listening sockets of the relay serving with the same state directory
    /// (`handover`), which then stops; without one, bind as usual.
    pub take_over: bool,
    /// Serve `<state_dir>/handover.sock` for a successor, and tell systemd (`NOTIFY_SOCKET`)
    /// when serving: the binary's `serve` does, in-process relays do not.
    pub hand_over: bool,
    /// The web console (`crate::console`); `None`: off (the default).
    pub console: Option<crate::console::ConsoleOptions>,
    /// How pairs move their bytes.
    pub splice: SpliceMode,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            registrar: DEFAULT_REGISTRAR.into(),
            domain: DEFAULT_DOMAIN.into(),
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
            state_dir: PathBuf::from(super::DEFAULT_STATE_DIR),
            metrics: Some(SocketAddr::from((
                [127, 0, 0, 1],
                super::DEFAULT_METRICS_PORT,
            ))),
            reload_interval: Duration::from_secs(1),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            data_threads: None,
            shared_port: None,
            take_over: false,
            hand_over: false,
            console: None,
            splice: SpliceMode::default(),
        }
    }
}

/// A running standalone relay. Dropping it stops every task it started.
pub struct Standalone {
    pub relay: Arc<StandaloneBackend>,
    /// Where the HTTPS front end listens (the real port when 0 was asked for).
    pub frontend: SocketAddr,
    /// Where the shared client port listens, when it is on.
    pub shared_port: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// Where the console listens, when it is on.
    pub console: Option<SocketAddr>,
    pub cert: CertFiles,
    /// Labels added in-process (the demo), kept across reloads of the directory.
    extra: Arc<Mutex<BTreeMap<String, LabelConfig>>>,
    /// The directory's current labels.
    from_dir: tokio::sync::watch::Receiver<LabelSet>,
    /// The tasks accepting on the front end, metrics and shared port: stopped at a hand-over.
    accepting: Vec<AbortHandle>,
    /// Resolves once a successor serves (`handover`).
    successor: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The front end's, metrics' and shared port's places in the hand-over registry.
    _registered: Vec<Registration>,
    listeners: Arc<Listeners>,
    tasks: Tasks,
}

impl Standalone {
    /// Begins a graceful stop without waiting: `/readyz` turns 503, registrations get 503,
    /// the ports that take new connections close, parked connections are given back; pairs
    /// already spliced go on.
    pub fn drain(&self) {
        // The registry's copies would keep the closed ports listening.
        self.listeners.clear();
        self.tasks.drain();
    }

    /// Stops gracefully ([`Standalone::drain`]), then stops for good as soon as no pair is left,
    /// at `timeout` (the pairs left are cut), or when `stop_now` (a second signal) resolves.
    pub async fn drain_and_stop(
        self,
        timeout: std::time::Duration,
        stop_now: impl std::future::Future<Output = ()>,
    ) -> super::DrainEnd {
        self.listeners.clear();
        self.tasks.drain_and_stop(timeout, stop_now).await
    }

    /// Resolves once a successor (`serve --take-over`) has taken this relay's sockets and
    /// serves; never without `hand_over`.
    pub async fn successor_serves(&mut self) {
        let served = match &mut self.successor {
            Some(serves) => serves.await.is_ok(),
            None => false,
        };
        // Polled once to its end: never again.
        self.successor = None;
        if !served {
            // The hand-over task ended without a successor: wait for nothing.
            std::future::pending::<()>().await;
        }
    }

    /// Stops for a successor that serves on the same sockets: stops accepting everywhere
    /// (registrations still arriving get 503), lets the clients already accepted take a
    /// parked connection, then drains ([`Standalone::drain_and_stop`]): parked connections
    /// are given back (their agents park with the successor) and the pairs finish.
    pub async fn hand_over(
        self,
        timeout: Duration,
        stop_now: impl std::future::Future<Output = ()>,
    ) -> super::DrainEnd {
        for task in &self.accepting {
            task.abort();
        }
        self.relay.stop_accepting();
        self.listeners.clear();
        // Clients accepted an instant ago send their first byte and take a parked connection
        // within milliseconds; one still waiting past the bound would have waited in vain.
        let started = tokio::time::Instant::now();
        let limit = HANDOVER_SETTLE_MAX.min(self.relay.settings().timeouts.client_wait);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if (elapsed >= HANDOVER_SETTLE && self.relay.waiting_clients() == 0) || elapsed >= limit
            {
                break;
            }
        }
        tracing::info!(
            waiting = self.relay.waiting_clients(),
            "handed over: no longer accepting; draining"
        );
        self.drain_and_stop(timeout, stop_now).await
    }

    /// Adds (or replaces) a label that does not come from the directory.
    pub fn add_label(&self, config: LabelConfig) -> Vec<String> {
        lock(&self.extra).insert(config.label.clone(), config);
        apply(&self.relay, &self.from_dir.borrow(), &lock(&self.extra))
    }
}

/// How long a relay that handed over lets the clients it accepted last find a parked
/// connection, at least and at most.
const HANDOVER_SETTLE: Duration = Duration::from_millis(300);
const HANDOVER_SETTLE_MAX: Duration = Duration::from_secs(2);

fn apply(
    relay: &StandaloneBackend,
    set: &LabelSet,
    extra: &BTreeMap<String, LabelConfig>,
) -> Vec<String> {
    let mut wanted = set.labels.clone();
    for (name, config) in extra {
        wanted.entry(name.clone()).or_insert_with(|| config.clone());
    }
    relay.apply(&wanted)
}

/// Checks the options that do not need the network or the disk.
fn settings(options: &ServeOptions) -> Result<RelaySettings, StartError> {
    if options.p_ports.overlaps(&options.q_ports) {
        return Err(StartError::Config(format!(
            "--p-ports {} and --q-ports {} overlap: rendezvous and client ports need separate ranges",
            options.p_ports, options.q_ports
        )));
    }
    if let Some(port) = options.shared_port {
        for (flag, range) in [
            ("--p-ports", options.p_ports),
            ("--q-ports", options.q_ports),
        ] {
            if range.contains(port) {
                return Err(StartError::Config(format!(
                    "--shared-port {port} is inside {flag} {range}"
                )));
            }
        }
    }
    let listen_ip = options.listen.ip();
    let advertise = match (&options.advertise, listen_ip.is_unspecified()) {
        (Some(host), _) if !host.trim().is_empty() => host.trim().to_string(),
        (_, false) => listen_ip.to_string(),
        (_, true) => {
            return Err(StartError::Config(format!(
                "--advertise is required when --listen is the wildcard address {listen_ip}: \
                 hidden servers must be told an address they can reach"
            )))
        }
    };
    let name = |flag: &str, value: &str| {
        let value = value.trim().trim_end_matches('.').to_ascii_lowercase();
        match crate::host::host_only(&value) {
            Some(host) if host == value && !value.contains(':') => Ok(value),
            _ => Err(StartError::Config(format!(
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
        // Set to the port bound, once bound.
        shared_port: None,
        timeouts: options.timeouts.clone(),
        limits: options.limits.clone(),
        data_threads: options
            .data_threads
            .unwrap_or_else(DataPlane::default_threads),
        splice: options.splice,
    })
}

fn cert_files(options: &ServeOptions, settings: &RelaySettings) -> Result<CertFiles, StartError> {
    super::cert_pair(
        options.tls_cert.as_ref(),
        options.tls_key.as_ref(),
        &options.state_dir,
        || {
            CertNames::for_relay(
                &settings.registrar,
                &settings.domain,
                settings.bind_ip,
                &settings.advertise,
            )
        },
    )
}

/// Starts the standalone relay: every configuration error is reported here, before anything
/// is served.
pub async fn start(options: ServeOptions) -> Result<Standalone, StartError> {
    let mut settings = settings(&options)?;
    let labels = label_source::load_dir(&options.labels)?;
    let cert = cert_files(&options, &settings)?;
    let tls = tls::server_config(&cert)?;
    // Every listener is bound through the registry, so that a predecessor's is taken over
    // and a successor can take it (`handover`).
    let listeners = Listeners::new();
    let predecessor = if options.take_over {
        take_over(&options.state_dir, &listeners).await
    } else {
        None
    };
    let mut registered = Vec::new();
    let listen_error = |addr| move |source| StartError::Listen { addr, source };
    let (front, front_registration) = listeners
        .listener(&Key::Frontend(options.listen), || {
            crate::ports::listen(options.listen, 1024)
        })
        .map_err(listen_error(options.listen))?;
    registered.push(front_registration);
    let frontend_addr = front.local_addr().map_err(listen_error(options.listen))?;
    let console = crate::console::prepare(options.console.as_ref(), &tls, |addr| {
        let (listener, registration) = listeners
            .listener(&Key::Console(addr), || crate::ports::listen(addr, 1024))
            .map_err(listen_error(addr))?;
        registered.push(registration);
        let local = listener.local_addr().map_err(listen_error(addr))?;
        Ok((listener, local))
    })?;
    let shared_port = match options.shared_port {
        Some(port) => {
            // One socket per data-plane thread, each accepting on its thread.
            let addr = SocketAddr::new(settings.bind_ip, port);
            let (sockets, local, registrations) =
                crate::shared_port::bind_registered(&listeners, addr, settings.data_threads.get())
                    .map_err(listen_error(addr))?;
            registered.extend(registrations);
            settings.shared_port = Some(local.port());
            Some((sockets, local))
        }
        None => None,
    };
    let mut registry = Registry::default();
    let relay =
        StandaloneBackend::with_listeners(settings.clone(), &mut registry, listeners.clone())
            .map_err(StartError::DataPlane)?;
    let mut tasks = Tasks::new(Some(relay.clone()));
    let problems = relay.apply(&labels.labels);
    if !problems.is_empty() {
        return Err(StartError::Config(problems.join("\n")));
    }
    tracing::info!(count = labels.labels.len(), dir = %options.labels.display(), "labels loaded");
    if labels.labels.is_empty() {
        tracing::info!(
            "no labels yet: create one with `taas-relay label new --id ID --label LABEL`"
        );
    }

    let frontend_metrics = FrontendMetrics::default();
    frontend_metrics.register(&mut registry);
    let mut accepting = Vec::new();
    let metrics = match options.metrics {
        Some(addr) => {
            let (listener, registration) = listeners
                .listener(&Key::Metrics(addr), || crate::ports::listen(addr, 1024))
                .map_err(listen_error(addr))?;
            registered.push(registration);
            let local = listener.local_addr().map_err(listen_error(addr))?;
            accepting.push(tasks.set.spawn(taas_process::metrics::serve(
                listener,
                Arc::new(registry),
                tasks.ready.clone(),
            )));
            Some(local)
        }
        None => None,
    };
    let mut front_settings = super::frontend_settings(
        Names {
            registrar: settings.registrar.clone(),
            domain: settings.domain.clone(),
        },
        &settings.timeouts,
        settings.limits.frontend_connections,
        settings.limits.frontend_connections_per_source,
        frontend_metrics,
    );
    front_settings.own_ips = [settings.bind_ip]
        .into_iter()
        .chain(settings.advertise.parse().ok())
        .filter(|ip: &IpAddr| !ip.is_unspecified())
        .collect();
    front_settings.direct = Some(crate::direct::DirectLabels::new(relay.clone()));
    accepting.push(tasks.set.spawn(frontend::serve(
        front,
        frontend::Transport::Tls(tls),
        front_settings,
        relay.clone(),
    )));

    let extra: Arc<Mutex<BTreeMap<String, LabelConfig>>> = Arc::default();
    let (tx, from_dir) = tokio::sync::watch::channel(labels.clone());
    tasks.spawn_until_drain(label_source::watch(
        options.labels.clone(),
        options.reload_interval,
        labels,
        tx,
    ));
    let mut changes = from_dir.clone();
    let (reload_relay, reload_extra) = (relay.clone(), extra.clone());
    tasks.spawn_until_drain(async move {
        while changes.changed().await.is_ok() {
            let set = changes.borrow_and_update().clone();
            for problem in apply(&reload_relay, &set, &lock(&reload_extra)) {
                tracing::warn!("reload: {problem}");
            }
        }
    });
    let console = console.map(|console| {
        let addr = console.addr();
        let context = crate::console::Context {
            relay: relay.clone(),
            labels: options.labels.clone(),
            from_dir: from_dir.clone(),
            cert: cert.clone(),
            frontend: frontend_addr,
        };
        let task = tasks.set.spawn(console.serve(context));
        tasks.stop_at_drain.push(task.clone());
        accepting.push(task);
        addr
    });
    let shared_port = shared_port.map(|(sockets, addr)| {
        let task = tasks
            .set
            .spawn(crate::shared_port::serve(sockets, relay.clone()));
        tasks.stop_at_drain.push(task.clone());
        accepting.push(task);
        tracing::info!(%addr, "shared client port listening");
        addr
    });
    tasks.set_ready();
    for key in listeners.close_unclaimed() {
        tracing::info!(%key, "inherited listener not used by this configuration: closed");
    }
    // The hand-over socket first: a start that fails here leaves the predecessor serving.
    let successor = if options.hand_over {
        let socket = HandoverSocket::bind(&options.state_dir).map_err(|error| {
            StartError::Config(format!(
                "hand-over socket in {}: {error}",
                options.state_dir.display()
            ))
        })?;
        tracing::info!(path = %socket.path().display(), "hand-over socket listening (`serve --take-over`, SIGHUP)");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = listeners.clone();
        let relay = relay.clone();
        // Nothing left to hand over once draining.
        tasks.spawn_until_drain(async move {
            let hello = || handover::notify(&[NotifyState::Reloading]);
            match socket.successor(shared, hello).await {
                Ok(successor) => {
                    relay.send_admissions_to(successor);
                    let _ = tx.send(());
                }
                Err(error) => tracing::warn!(%error, "hand-over socket failed"),
            }
        });
        Some(rx)
    } else {
        None
    };
    if let Some(predecessor) = predecessor {
        match predecessor.serving() {
            Ok(stream) => receive_admissions(stream, relay.clone()),
            Err(error) => {
                tracing::warn!(%error, "could not tell the predecessor that this relay serves")
            }
        }
        if options.hand_over {
            handover::notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
        }
    } else if options.hand_over {
        handover::notify(&[NotifyState::Ready]);
    }
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
        shared_port,
        metrics,
        console,
        cert,
        extra,
        from_dir,
        accepting,
        successor,
        _registered: registered,
        listeners,
        tasks,
    })
}

/// Takes the sockets of the relay serving on `<state_dir>/handover.sock` into `listeners`;
/// `None` (binding afresh) when none answers or the hand-over fails.
async fn take_over(
    state_dir: &std::path::Path,
    listeners: &Arc<Listeners>,
) -> Option<handover::Predecessor> {
    let dir = state_dir.to_path_buf();
    match tokio::task::spawn_blocking(move || handover::take_over(&dir)).await {
        Ok(Ok(Some((predecessor, sockets)))) => {
            tracing::info!(
                pid = predecessor.pid(),
                listeners = sockets.len(),
                "taking over from the running relay"
            );
            listeners.inherit(sockets);
            Some(predecessor)
        }
        Ok(Ok(None)) => {
            tracing::info!("--take-over: no relay answers on the hand-over socket; binding afresh");
            None
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "--take-over failed; binding afresh");
            None
        }
        Err(_) => None,
    }
}

/// Admits on q, on a thread of its own, the sources the predecessor redirected (`handover`)
/// until it exits.
fn receive_admissions(stream: std::os::unix::net::UnixStream, relay: Arc<StandaloneBackend>) {
    let spawned = std::thread::Builder::new()
        .name("taas-admissions".into())
        .spawn(move || {
            let taken = handover::receive_admissions(stream, |label, source, age| {
                if let Some(label) = relay.label(label) {
                    label.admit_since(source, age);
                }
            });
            tracing::info!(sources = taken, "client admissions from the predecessor");
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "client admissions of the predecessor not taken");
    }
}
