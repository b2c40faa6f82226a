//! The running agent: a thin async shell around the [`Supervisor`]. It feeds it events (a
//! registration's outcome, what the rendezvous tasks report), performs what it decides
//! (registrations, one at a time on the kept-alive connection; a task per rendezvous), and
//! turns its notices into log lines, metrics and the published status.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::config::{AgentConfig, AgentError};
use super::explain::Severity;
use super::metrics::AgentMetrics;
use super::parked::{self, PairContext};
use super::registrar_client::{Credentials, Failure, Registered, RegistrarClient};
use super::supervisor::{AgentStatus, Event, Next, Notice, Supervisor};
use super::target::Target;
use crate::tls::client_tls_config;

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
        config.validate()?;
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
                Some(tokio::spawn(taas_process::metrics::serve(
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
        let mut shell = Shell::new(self);
        tokio::pin!(shutdown);
        shell.run(shutdown.as_mut()).await;
        shell.shut_down(grace).await;
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

/// The supervisor's clock: tokio's (which tests may pause), as a plain `Instant`.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Performs the supervisor's decisions; the rendezvous and pairs run in their own tasks,
/// which report back as events.
struct Shell {
    agent: Agent,
    supervisor: Supervisor,
    client: RegistrarClient,
    credentials: Credentials,
    ctx: Arc<PairContext>,
    events_tx: mpsc::UnboundedSender<parked::Event>,
    events: mpsc::UnboundedReceiver<parked::Event>,
    cancel: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Shell {
    fn new(agent: Agent) -> Self {
        let config = &agent.config;
        let client = RegistrarClient::new(
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
        let mut ctx = PairContext::new(config.forward.clone(), agent.metrics.clone());
        ctx.splice = config.splice;
        let ctx = Arc::new(ctx);
        let supervisor = Supervisor::new(config.parked, config.max_backoff, now());
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            supervisor,
            client,
            credentials,
            ctx,
            events_tx,
            events,
            cancel: watch::channel(false).0,
            tasks: JoinSet::new(),
            agent,
        }
    }

    async fn run(&mut self, mut shutdown: Pin<&mut impl Future<Output = ()>>) {
        loop {
            while let Ok(event) = self.events.try_recv() {
                self.rendezvous(event);
            }
            while self.tasks.try_join_next().is_some() {}

            let wake = match self.supervisor.next(now()) {
                Next::Register { count } => {
                    let result = tokio::select! {
                        biased;
                        _ = shutdown.as_mut() => return,
                        result = self.client.register(&self.credentials, count) => result,
                    };
                    self.registered(result);
                    continue;
                }
                Next::WaitUntil(at) => Some(tokio::time::Instant::from_std(at)),
                Next::Wait => None,
            };
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return,
                Some(event) = self.events.recv() => self.rendezvous(event),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)),
                    if wake.is_some() => {}
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn registered(&mut self, result: Result<Registered, Failure>) {
        let event = match result {
            Ok(registered) => {
                self.agent.metrics.registration("ok");
                let ports = registered.endpoints.len();
                for endpoint in registered.endpoints {
                    let address = endpoint.connect_string(Some(registered.registrar_ip));
                    tracing::debug!(rendezvous = %address, "registered");
                    self.tasks.spawn(parked::rendezvous(
                        address,
                        self.ctx.clone(),
                        self.events_tx.clone(),
                        self.cancel.subscribe(),
                    ));
                }
                Event::Registered { ports }
            }
            Err(failure) => {
                self.agent.metrics.registration(failure.problem.kind);
                Event::RegistrationFailed {
                    problem: failure.problem,
                    retry_after: failure.retry_after,
                }
            }
        };
        self.handle(event);
    }

    fn rendezvous(&mut self, event: parked::Event) {
        match &event {
            parked::Event::ConnectFailed { .. } => {
                self.agent.metrics.rendezvous_failures.inc();
            }
            parked::Event::Lost { .. } => {
                self.agent.metrics.parked_lost.inc();
            }
            _ => {}
        }
        self.handle(Event::Rendezvous(event));
        self.agent
            .metrics
            .set_parked(self.supervisor.status().parked);
    }

    fn handle(&mut self, event: Event) {
        for notice in self.supervisor.handle(event, now(), rand::random::<f64>()) {
            log(notice);
        }
        self.publish();
    }

    fn publish(&self) {
        let status = self.supervisor.status();
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
        let status = self.supervisor.status();
        tracing::info!(
            parked = status.parked,
            pairs_active = status.pairs_active,
            "shutting down: no more registrations, parked connections closed"
        );
        let _ = self.cancel.send(true);
        // Closes the kept-alive registrar connections.
        self.client = RegistrarClient::new(self.agent.origin.clone(), None, self.agent.tls.clone());
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
        self.supervisor.shut_down();
        self.publish();
    }
}

/// One notice, one log line: a new reason for failing at its severity, the rest quieter.
fn log(notice: Notice) {
    match notice {
        Notice::Failed {
            problem,
            new_reason: true,
            retry_in,
            ..
        } => {
            let retry_in_ms = retry_in.as_millis() as u64;
            match problem.severity {
                Severity::Error => {
                    tracing::error!(reason = problem.kind, retry_in_ms, "{}", problem.message)
                }
                Severity::Warn => {
                    tracing::warn!(reason = problem.kind, retry_in_ms, "{}", problem.message)
                }
            }
        }
        Notice::Failed {
            problem,
            new_reason: false,
            failures,
            retry_in,
        } => tracing::debug!(
            reason = problem.kind,
            failures,
            retry_in_ms = retry_in.as_millis() as u64,
            "{}",
            problem.message
        ),
        Notice::FailedInBurst { problem } => {
            tracing::debug!(reason = problem.kind, "{}", problem.message)
        }
        Notice::Recovered { parked, previous } => {
            tracing::info!(parked, previous, "registering again")
        }
        Notice::Ready { parked } => {
            tracing::info!(parked, "all connections parked; ready for clients")
        }
        Notice::Replacing { lived, how } => tracing::debug!(
            lived_s = lived.as_secs(),
            how,
            "the relay dropped a parked connection; replacing it"
        ),
        Notice::Paired { pairs_active } => {
            tracing::debug!(pairs_active, "paired; registering a replacement")
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::agent::Trust;

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
