//! The hidden-server side (`taas-agent`): keep N connections registered and parked at the
//! relay; forward each one that gets paired to a local service.
//!
//! Life of one slot: `PUT /register/LABEL` (TOTP) on a kept-alive TLS connection → `200`
//! with `HOST:PORT` → TCP connection to that p, parked → first bytes arrive (a mobile client
//! was paired onto it) → its replacement is registered (with the others missing, in one
//! request: the relay's several-ports extension; within `REFILL_DELAY` while at least half the
//! pool is parked, at once below half), and this connection is spliced with a fresh
//! connection to `--forward`. A parked connection the relay closes is replaced the same way.
//!
//! Pieces: `target` (URLs, redirects), `registrar` (HTTPS client), `endpoint` (the 200 body),
//! `parked` (one rendezvous and its pair), `backoff`, `explain` (failure → advice),
//! `metrics`. This file holds the configuration and the supervisor.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Algorithm, LabelConfig};

pub mod backoff;
pub mod explain;
pub mod metrics;
pub mod parked;
pub mod registrar;
// Pure parsers in the protocol crate: the registrar URL and redirects.
pub use taas_protocol::target;

use backoff::Backoff;
use explain::{Problem, Severity};
use metrics::AgentMetrics;
use parked::{Event, PairContext};
use registrar::{Credentials, Registrar};
use target::Target;

/// Default number of connections kept parked.
pub const DEFAULT_PARKED: usize = 8;
/// Default cap on the delay between failed attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default time active pairs get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A parked connection the relay closes sooner than this counts as a failure (backoff), so a
/// relay that accepts and drops at once is not hammered.
const SHORT_LIVED: Duration = Duration::from_secs(5);
/// While at least half of the connections are still parked, replacements for the ones used
/// up are registered this long after the first of them, together in one request: one
/// registration per batch instead of per connection, and none of it on the path of the
/// connection that was just paired. Below half, replacements are registered at once.
const REFILL_DELAY: Duration = Duration::from_millis(5);

/// Which certificates the registrar's must chain to.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// The operating system's roots (rustls-native-certs).
    #[default]
    System,
    /// PEM certificates from a file (`--ca`): e.g. a self-signed relay's certificate.
    PemFile(PathBuf),
    /// Certificates given in memory (tests, demo mode).
    Certificates(Vec<CertificateDer<'static>>),
}

/// Everything the agent needs. Build with [`AgentConfig::new`] or
/// [`AgentConfig::from_label`] and adjust the public fields.
#[derive(Clone)]
pub struct AgentConfig {
    /// The registrar, `https://host[:port][/prefix]`; `Host` header and SNI come from it.
    pub relay: String,
    /// Connect here instead of resolving the URL's host: `host:port`, `ip:port`, `[v6]:port`,
    /// or a bare host/IP (the URL's port).
    pub connect: Option<String>,
    /// The TOTP username.
    pub id: String,
    pub label: String,
    /// The decoded TOTP key.
    pub secret: Vec<u8>,
    pub algorithm: Algorithm,
    /// TOTP step, seconds.
    pub period: u64,
    /// TOTP digits (6 to 8; the original clients use 6).
    pub digits: u32,
    /// The local service, `host:port`, resolved for each paired connection.
    pub forward: String,
    /// Connections kept parked.
    pub parked: usize,
    pub trust: Trust,
    /// Cap on the delay between failed attempts.
    pub max_backoff: Duration,
    /// Serve `/metrics`, `/healthz`, `/readyz` here.
    pub metrics: Option<SocketAddr>,
    /// On shutdown, active pairs get this long to finish.
    pub shutdown_grace: Duration,
}

impl AgentConfig {
    /// A configuration with the defaults: SHA1, 30 s, 6 digits, 8 parked, system roots.
    pub fn new(
        relay: impl Into<String>,
        id: impl Into<String>,
        label: impl Into<String>,
        secret: Vec<u8>,
        forward: impl Into<String>,
    ) -> Self {
        Self {
            relay: relay.into(),
            connect: None,
            id: id.into(),
            label: label.into(),
            secret,
            algorithm: Algorithm::SHA1,
            period: 30,
            digits: 6,
            forward: forward.into(),
            parked: DEFAULT_PARKED,
            trust: Trust::System,
            max_backoff: DEFAULT_MAX_BACKOFF,
            metrics: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// ID, label, secret, algorithm and period from a label's configuration (e.g. the file
    /// that `taas-relay label new` wrote).
    pub fn from_label(
        relay: impl Into<String>,
        label: &LabelConfig,
        forward: impl Into<String>,
    ) -> Self {
        let mut config = Self::new(
            relay,
            label.id.clone(),
            label.label.clone(),
            label.secret.clone(),
            forward,
        );
        config.algorithm = label.algorithm;
        config.period = label.period;
        config
    }
}

impl fmt::Debug for AgentConfig {
    // Hand-written so that the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("relay", &self.relay)
            .field("connect", &self.connect)
            .field("id", &self.id)
            .field("label", &self.label)
            .field("secret", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("period", &self.period)
            .field("digits", &self.digits)
            .field("forward", &self.forward)
            .field("parked", &self.parked)
            .field("trust", &self.trust)
            .field("max_backoff", &self.max_backoff)
            .field("metrics", &self.metrics)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Why the agent cannot start. (Once running, it never fails: it retries and says why.)
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--relay")]
    Url(#[from] target::UrlError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot read the CA file {}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the CA file {} holds no PEM certificate", .0.display())]
    CaEmpty(PathBuf),
    #[error("a trusted certificate is unusable")]
    CaInvalid(#[source] rustls::Error),
    #[error(
        "no trusted root certificates found on this system: pass --ca FILE with the relay's \
         certificate"
    )]
    NoRoots,
    #[error("TLS set-up failed")]
    Tls(#[source] rustls::Error),
    #[error("cannot read the secret file {}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret is not valid base32")]
    Secret(#[source] crate::totp::SecretError),
    #[error("cannot read the label file {}", path.display())]
    LabelFile {
        path: PathBuf,
        #[source]
        source: crate::label_source::LoadError,
    },
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Decodes a base32 TOTP secret (as `--secret` or `TAAS_SECRET` gives it).
pub fn decode_secret(b32: &str) -> Result<Vec<u8>, AgentError> {
    crate::totp::decode_secret(b32.trim()).map_err(AgentError::Secret)
}

/// Reads a base32 TOTP secret from a file (surrounding whitespace ignored).
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::SecretFile {
        path: path.to_path_buf(),
        source,
    })?;
    decode_secret(&text)
}

/// Reads ID, label, secret, algorithm and period from a `TaasLabel` + `Secret` YAML file.
pub fn read_label_file(path: &Path) -> Result<LabelConfig, AgentError> {
    crate::label_source::read_label_file(path).map_err(|source| AgentError::LabelFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The TLS client configuration: ring, the given trust, ALPN `http/1.1`.
pub fn client_tls_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "while loading the system's root certificates");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(AgentError::NoRoots);
            }
        }
        Trust::PemFile(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|source| AgentError::CaFile {
                    path: path.clone(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(AgentError::CaEmpty(path.clone()));
            }
            for cert in certs {
                roots.add(cert).map_err(AgentError::CaInvalid)?;
            }
        }
        Trust::Certificates(certs) => {
            for cert in certs {
                roots.add(cert.clone()).map_err(AgentError::CaInvalid)?;
            }
            if roots.is_empty() {
                return Err(AgentError::Config("no trusted certificate given".into()));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(AgentError::Tls)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A snapshot of what the agent is doing (see [`Agent::status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Connections parked at the relay.
    pub parked: usize,
    /// Registered, connecting to p.
    pub connecting: usize,
    /// Paired connections being forwarded.
    pub pairs_active: usize,
    /// Pairs started since the agent started.
    pub pairings: u64,
    /// The current reason registration is failing, if it is.
    pub problem: Option<String>,
}

/// A configured agent, ready to run.
pub struct Agent {
    config: AgentConfig,
    origin: Target,
    tls: Arc<rustls::ClientConfig>,
    metrics: AgentMetrics,
    registry: Arc<Registry>,
    status: watch::Sender<AgentStatus>,
}

impl Agent {
    /// Checks the configuration and loads the trusted certificates.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        validate(&config)?;
        let origin = Target::registration(&config.relay, &config.label)?;
        let tls = client_tls_config(&config.trust)?;
        let (metrics, registry) = AgentMetrics::new();
        Ok(Self {
            config,
            origin,
            tls,
            metrics,
            registry: Arc::new(registry),
            status: watch::channel(AgentStatus::default()).0,
        })
    }

    /// The agent's metrics, for embedding into another registry or reading in tests.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Follows the agent's state (parked count, pairs, current problem).
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` completes; then stops registering, drops the parked connections,
    /// and gives active pairs `shutdown_grace` to finish. Only set-up errors are returned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let metrics_server = match self.config.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Metrics { addr, source })?;
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
                Some(tokio::spawn(crate::metrics::serve(
                    listener,
                    self.registry.clone(),
                    self.metrics.ready.clone(),
                )))
            }
            None => None,
        };
        tracing::info!(
            relay = %self.origin,
            connect = self.config.connect.as_deref().unwrap_or("-"),
            id = %self.config.id,
            label = %self.config.label,
            parked = self.config.parked,
            forward = %self.config.forward,
            "taas-agent starting"
        );
        let grace = self.config.shutdown_grace;
        let mut supervisor = Supervisor::new(self);
        tokio::pin!(shutdown);
        supervisor.run(shutdown.as_mut()).await;
        supervisor.shut_down(grace).await;
        if let Some(server) = metrics_server {
            server.abort();
        }
        Ok(())
    }
}

/// Runs an agent until `shutdown` completes. See [`Agent::run`].
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::new(config)?.run(shutdown).await
}

fn validate(config: &AgentConfig) -> Result<(), AgentError> {
    let bad = |what: String| Err(AgentError::Config(what));
    if config.id.is_empty()
        || config
            .id
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return bad(format!(
            "--id {:?}: empty, or contains quotes, backslashes or control characters",
            config.id
        ));
    }
    if config.label.is_empty()
        || config
            .label
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return bad(format!(
            "--label {:?}: empty, or contains spaces or control characters",
            config.label
        ));
    }
    if config.secret.is_empty() {
        return bad("the TOTP secret is empty".into());
    }
    if !(6..=8).contains(&config.digits) {
        return bad(format!("TOTP digits {}: must be 6 to 8", config.digits));
    }
    if config.period == 0 {
        return bad("TOTP period 0: must be at least 1 s".into());
    }
    if config.parked == 0 {
        return bad("--parked 0: at least one connection must be parked".into());
    }
    match config.forward.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => {
            return bad(format!(
                "--forward {:?}: expected HOST:PORT",
                config.forward
            ))
        }
    }
    Ok(())
}

/// Keeps `parked` connections registered: one registration at a time on the kept-alive
/// connection, the rendezvous and pairs in their own tasks, which report back as `Event`s.
struct Supervisor {
    agent: Agent,
    registrar: Registrar,
    credentials: Credentials,
    ctx: Arc<PairContext>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    cancel: watch::Sender<bool>,
    tasks: JoinSet<()>,
    backoff: Backoff,
    next_attempt: Instant,
    /// The earliest next registration while the pool is at least half full (`REFILL_DELAY`).
    refill_at: Instant,
    connecting: usize,
    parked: usize,
    pairs_active: usize,
    pairings: u64,
    problem: Option<Problem>,
    reached_target: bool,
    /// A rendezvous failure (a refused connect to p, a parked connection dropped early) has
    /// been counted since the last registration attempt. One event such as a relay restart
    /// drops every parked connection at once: that is one failure for the backoff, not one
    /// per connection (64 parked connections used to push the next attempt 16-29 s away).
    rendezvous_failure_counted: bool,
}

impl Supervisor {
    fn new(agent: Agent) -> Self {
        let config = &agent.config;
        let registrar = Registrar::new(
            agent.origin.clone(),
            config.connect.clone(),
            agent.tls.clone(),
        );
        let credentials = Credentials {
            id: config.id.clone(),
            secret: config.secret.clone(),
            algorithm: config.algorithm,
            digits: config.digits,
            period: config.period,
        };
        let ctx = Arc::new(PairContext::new(
            config.forward.clone(),
            agent.metrics.clone(),
        ));
        let backoff = Backoff::new(backoff::INITIAL, config.max_backoff);
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            registrar,
            credentials,
            ctx,
            events_tx,
            events,
            cancel: watch::channel(false).0,
            tasks: JoinSet::new(),
            backoff,
            next_attempt: Instant::now(),
            refill_at: Instant::now(),
            connecting: 0,
            parked: 0,
            pairs_active: 0,
            pairings: 0,
            problem: None,
            reached_target: false,
            rendezvous_failure_counted: false,
            agent,
        }
    }

    fn wanted(&self) -> bool {
        self.connecting + self.parked < self.agent.config.parked
    }

    /// When the next registration may go: after the backoff, and while at least half of the
    /// pool is parked or on its way, after the refill delay too.
    fn due(&self) -> Instant {
        if 2 * (self.connecting + self.parked) >= self.agent.config.parked {
            self.next_attempt.max(self.refill_at)
        } else {
            self.next_attempt
        }
    }

    /// A parked connection was used up or lost: its replacement joins the next batch.
    fn replace_later(&mut self) {
        let now = Instant::now();
        if self.refill_at <= now {
            self.refill_at = now + REFILL_DELAY;
        }
    }

    /// Rendezvous ports to ask for in the next registration: every missing one, up to the
    /// relay's per-request maximum (the several-ports extension; a relay without it answers
    /// one port, and the next registration asks for the rest).
    fn missing(&self) -> u32 {
        let missing = self
            .agent
            .config
            .parked
            .saturating_sub(self.connecting + self.parked);
        u32::try_from(missing)
            .unwrap_or(u32::MAX)
            .clamp(1, taas_protocol::answer::MAX_RENDEZVOUS_PER_REQUEST)
    }

    async fn run(&mut self, mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>) {
        loop {
            while let Ok(event) = self.events.try_recv() {
                self.handle(event);
            }
            while self.tasks.try_join_next().is_some() {}

            if self.wanted() && Instant::now() >= self.due() {
                let result = tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return,
                    result = self.registrar.register(&self.credentials, self.missing()) => result,
                };
                self.registered(result);
                continue;
            }
            let wanted = self.wanted();
            let due = self.due();
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return,
                Some(event) = self.events.recv() => self.handle(event),
                _ = tokio::time::sleep_until(due), if wanted => {}
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn registered(&mut self, result: Result<registrar::Registered, registrar::Failure>) {
        self.rendezvous_failure_counted = false;
        match result {
            Ok(registered) => {
                self.agent.metrics.registration("ok");
                for endpoint in registered.endpoints {
                    let address = endpoint.connect_string(Some(registered.registrar_ip));
                    tracing::debug!(rendezvous = %address, "registered");
                    self.connecting += 1;
                    self.tasks.spawn(parked::rendezvous(
                        address,
                        self.ctx.clone(),
                        self.events_tx.clone(),
                        self.cancel.subscribe(),
                    ));
                }
            }
            Err(failure) => {
                self.agent.metrics.registration(failure.problem.kind);
                self.failed(failure.problem, failure.retry_after);
            }
        }
        self.publish();
    }

    /// A failed attempt: back off, and say why (once per distinct reason).
    fn failed(&mut self, problem: Problem, retry_after: Option<Duration>) {
        let delay = self.backoff.fail(rand::random::<f64>(), retry_after);
        self.next_attempt = self.next_attempt.max(Instant::now() + delay);
        let new_reason = !matches!(&self.problem, Some(old) if old.same_reason(&problem));
        if new_reason {
            match problem.severity {
                Severity::Error => tracing::error!(
                    reason = problem.kind,
                    retry_in_ms = delay.as_millis() as u64,
                    "{}",
                    problem.message
                ),
                Severity::Warn => tracing::warn!(
                    reason = problem.kind,
                    retry_in_ms = delay.as_millis() as u64,
                    "{}",
                    problem.message
                ),
            }
        } else {
            tracing::debug!(
                reason = problem.kind,
                failures = self.backoff.failures(),
                retry_in_ms = delay.as_millis() as u64,
                "{}",
                problem.message
            );
        }
        self.problem = Some(problem);
    }

    /// A rendezvous failed: the first since the last registration attempt backs off (a relay
    /// that accepts and drops at once is not hammered); the others of the same burst only
    /// say so at debug.
    fn rendezvous_failed(&mut self, problem: Problem) {
        if self.rendezvous_failure_counted {
            tracing::debug!(reason = problem.kind, "{}", problem.message);
            return;
        }
        self.rendezvous_failure_counted = true;
        self.failed(problem, None);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Parked => {
                self.connecting = self.connecting.saturating_sub(1);
                self.parked += 1;
                self.backoff.reset();
                self.next_attempt = Instant::now();
                if let Some(problem) = self.problem.take() {
                    tracing::info!(
                        parked = self.parked,
                        previous = problem.kind,
                        "registering again"
                    );
                }
                if !self.reached_target && self.parked >= self.agent.config.parked {
                    self.reached_target = true;
                    tracing::info!(
                        parked = self.parked,
                        "all connections parked; ready for clients"
                    );
                }
            }
            Event::ConnectFailed { endpoint, error } => {
                self.connecting = self.connecting.saturating_sub(1);
                self.agent.metrics.rendezvous_failures.inc();
                let problem = Problem {
                    kind: "rendezvous",
                    detail: format!("{:?}", error.kind()),
                    message: format!(
                        "registered, but cannot connect to the rendezvous port {endpoint}: \
                         {error} (a firewall between here and the relay's rendezvous ports, or \
                         the relay advertises an address unreachable from here)"
                    ),
                    severity: Severity::Warn,
                };
                self.rendezvous_failed(problem);
            }
            Event::Lost { lived, error } => {
                self.parked = self.parked.saturating_sub(1);
                self.replace_later();
                self.agent.metrics.parked_lost.inc();
                let how = match &error {
                    Some(e) => e.to_string(),
                    None => "closed".to_string(),
                };
                if lived < SHORT_LIVED {
                    let problem = Problem {
                        kind: "rendezvous_closed",
                        detail: String::new(),
                        message: format!(
                            "the relay dropped a parked connection after {} ms ({how}): it may \
                             refuse this source address (source pinning: registration and \
                             rendezvous must come from the same address) or be restarting",
                            lived.as_millis()
                        ),
                        severity: Severity::Warn,
                    };
                    self.rendezvous_failed(problem);
                } else {
                    tracing::debug!(
                        lived_s = lived.as_secs(),
                        how,
                        "the relay dropped a parked connection; replacing it"
                    );
                }
            }
            Event::Paired => {
                self.parked = self.parked.saturating_sub(1);
                self.replace_later();
                self.pairs_active += 1;
                self.pairings += 1;
                tracing::debug!(
                    pairs_active = self.pairs_active,
                    "paired; registering a replacement"
                );
            }
            Event::PairEnded => {
                self.pairs_active = self.pairs_active.saturating_sub(1);
            }
        }
        self.agent.metrics.set_parked(self.parked);
        self.publish();
    }

    fn publish(&self) {
        let status = AgentStatus {
            parked: self.parked,
            connecting: self.connecting,
            pairs_active: self.pairs_active,
            pairings: self.pairings,
            problem: self.problem.as_ref().map(|p| p.message.clone()),
        };
        self.agent.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    async fn shut_down(&mut self, grace: Duration) {
        tracing::info!(
            parked = self.parked,
            pairs_active = self.pairs_active,
            "shutting down: no more registrations, parked connections closed"
        );
        let _ = self.cancel.send(true);
        // Closes the kept-alive registrar connections.
        self.registrar = Registrar::new(self.agent.origin.clone(), None, self.agent.tls.clone());
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                remaining = self.tasks.len(),
                grace_s = grace.as_secs(),
                "grace period over; closing the remaining pairs"
            );
            self.tasks.shutdown().await;
        }
        self.agent.metrics.set_parked(0);
        self.parked = 0;
        self.connecting = 0;
        self.pairs_active = 0;
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        let mut c = AgentConfig::new(
            "https://taas-registrar.localhost:8443",
            "2f402f80-da50-11e1-9b23-0123456789ab",
            "home",
            b"12345678901234567890".to_vec(),
            "127.0.0.1:8888",
        );
        c.trust = Trust::Certificates(vec![test_cert()]);
        c
    }

    /// A self-signed certificate, as `taas-relay serve` generates one.
    fn test_cert() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["taas-registrar.localhost".into()]).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::new("https://r", "id", "l", vec![1], "127.0.0.1:1");
        assert_eq!(c.parked, 8);
        assert_eq!(c.digits, 6);
        assert_eq!(c.period, 30);
        assert_eq!(c.algorithm, Algorithm::SHA1);
        assert_eq!(c.max_backoff, Duration::from_secs(30));
        assert!(matches!(c.trust, Trust::System));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let mut c = config();
        c.secret = b"super-secret-bytes".to_vec();
        let shown = format!("{c:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("super-secret"));
        assert!(!shown.contains("115, 117")); // nor as a byte list
    }

    #[test]
    fn validates() {
        assert!(Agent::new(config()).is_ok());
        type Breaks = fn(&mut AgentConfig);
        let broken: Vec<(&str, Breaks)> = vec![
            ("http", |c| {
                c.relay = "http://taas-registrar.localhost".into()
            }),
            ("no url", |c| c.relay = "taas-registrar.localhost".into()),
            ("id quote", |c| c.id = "a\"b".into()),
            ("empty id", |c| c.id.clear()),
            ("label space", |c| c.label = "a b".into()),
            ("secret", |c| c.secret.clear()),
            ("digits", |c| c.digits = 9),
            ("period", |c| c.period = 0),
            ("parked", |c| c.parked = 0),
            ("forward", |c| c.forward = "localhost".into()),
            ("forward port", |c| c.forward = "localhost:0".into()),
        ];
        for (what, breaks) in broken {
            let mut c = config();
            breaks(&mut c);
            assert!(Agent::new(c).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_tls_config(&Trust::PemFile(missing)).unwrap_err();
        assert!(matches!(err, AgentError::CaFile { .. }), "{err:?}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_tls_config(&Trust::PemFile(empty)).unwrap_err();
        assert!(matches!(err, AgentError::CaEmpty(_)), "{err:?}");

        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["taas-registrar.localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let good = dir.path().join("relay.pem");
        std::fs::write(&good, cert.pem()).unwrap();
        let config = client_tls_config(&Trust::PemFile(good)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn secrets() {
        assert_eq!(decode_secret(" GEZDGNBV \n").unwrap(), b"12345");
        assert!(matches!(
            decode_secret("not base32!"),
            Err(AgentError::Secret(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "gezdgnbv\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"12345");
        assert!(matches!(
            read_secret_file(&dir.path().join("nope")),
            Err(AgentError::SecretFile { .. })
        ));
    }

    #[test]
    fn from_label() {
        let label = LabelConfig {
            label: "home".into(),
            id: "id-7".into(),
            secret: vec![1, 2, 3],
            algorithm: Algorithm::SHA256,
            period: 60,
            max_parked: 32,
            source_pinning: true,
            proxy_protocol: crate::config::ProxyProtocol::None,
            client_port: None,
            client_admission: crate::config::ClientAdmission::Open,
            server_speaks_first: false,
        };
        let c = AgentConfig::from_label("https://r.example", &label, "127.0.0.1:22");
        assert_eq!((c.id.as_str(), c.label.as_str()), ("id-7", "home"));
        assert_eq!(
            (c.algorithm, c.period, c.digits),
            (Algorithm::SHA256, 60, 6)
        );
        assert_eq!(c.secret, vec![1, 2, 3]);
    }

    /// With nothing listening at the registrar, the agent keeps retrying (never exits),
    /// reports why, and shuts down promptly when asked.
    #[tokio::test]
    async fn retries_until_shutdown() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let mut c = config();
        c.connect = Some(addr.to_string());
        c.max_backoff = Duration::from_millis(300);
        let agent = Agent::new(c).unwrap();
        let registry = agent.registry();
        let mut status = agent.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        let problem = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                status.changed().await.unwrap();
                if let Some(p) = status.borrow().problem.clone() {
                    return p;
                }
            }
        })
        .await
        .unwrap();
        assert!(
            problem.contains("cannot connect to the registrar"),
            "{problem}"
        );
        assert!(problem.contains(&addr.to_string()), "{problem}");
        // Several attempts, none fatal.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!task.is_finished());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("taas_agent_registrations_total{result=\"connect\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 2.0, "{line}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
