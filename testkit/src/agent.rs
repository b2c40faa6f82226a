//! The agent under test: its configuration as the tests want it (short backoff), and an
//! in-process agent that can be stopped gracefully or killed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::label::TestLabel;
use crate::relay::REGISTRAR;

/// An agent configuration for `label` at the relay front end `front`, forwarding to
/// `forward`, with the short backoff tests want. Callers set trust and the parked count.
pub fn agent_config(
    front: SocketAddr,
    label: &TestLabel,
    forward: SocketAddr,
) -> taas_relay::agent::AgentConfig {
    let mut config = taas_relay::agent::AgentConfig::new(
        format!("https://{REGISTRAR}:{}", front.port()),
        label.id.clone(),
        label.label.clone(),
        label.secret(),
        forward.to_string(),
    );
    config.connect = Some(front.to_string());
    config.max_backoff = Duration::from_millis(500);
    config
}

/// An in-process `taas-agent` for one label; stopped gracefully with [`Agent::stop`] or
/// killed (aborted: every socket it holds closes at once) on drop.
pub struct Agent {
    pub status: tokio::sync::watch::Receiver<taas_relay::agent::AgentStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    pub fn start(
        front: SocketAddr,
        ca: &Path,
        label: &TestLabel,
        forward: SocketAddr,
        parked: usize,
        adjust: impl FnOnce(&mut taas_relay::agent::AgentConfig),
    ) -> Self {
        let mut config = agent_config(front, label, forward);
        config.trust = taas_relay::agent::Trust::PemFile(ca.to_path_buf());
        config.parked = parked;
        adjust(&mut config);
        let agent = taas_relay::agent::Agent::new(config).expect("agent configuration");
        let status = agent.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("agent runs");
        });
        Self {
            status,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn parked(&self) -> usize {
        self.status.borrow().parked
    }

    /// Waits (bounded) for a state; returns how long it took.
    pub async fn wait(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&taas_relay::agent::AgentStatus) -> bool,
    ) -> Duration {
        let started = Instant::now();
        let mut status = self.status.clone();
        let found = tokio::time::timeout(limit, status.wait_for(|s| check(s))).await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "agent: timed out after {limit:?} waiting for {what}: {:?}",
            *self.status.borrow()
        );
        started.elapsed()
    }

    /// Graceful stop: no more registrations, parked connections closed, running pairs get the
    /// agent's grace period. Returns the task, which ends when that is done.
    pub fn stop(mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap()
    }

    /// Kill: the agent's future is dropped at once, with every socket it holds.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
