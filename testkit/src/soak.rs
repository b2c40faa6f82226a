//! The churn soak (issue 7): a spawned `taas-relay serve`, in-process agents replaced as the
//! run goes, checksummed echo clients; afterwards the relay's fds, bound p ports and RSS are
//! compared with their baselines. Bounded in count (connections, retries per connection) and
//! in time (`max_duration`, every wait). Run briefly by `relay/tests/robustness.rs` and at
//! length by `relay/examples/soak.rs`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::echo::{echo_exchange, echo_server, payload, Exchange};
use crate::label::{write_label, TestLabel};
use crate::readings::{accepting_ports, listening_ports, metric_sum, ProcStats};
use crate::relay::DOMAIN;
use crate::spawned::{RelaySpec, SpawnedRelay};
use crate::wait::PATIENCE;

#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// `target/.../taas-relay`.
    pub relay_bin: PathBuf,
    /// Where labels, state and the relay's log go.
    pub dir: PathBuf,
    /// Checksummed client connections to complete.
    pub connections: u64,
    pub labels: usize,
    pub concurrency: usize,
    /// Connections parked by each agent.
    pub parked: usize,
    /// An agent is replaced (graceful stop, new one started) every this many connections.
    pub churn_every: u64,
    /// Every this many connections, the client first asks the front end for its 307.
    pub redirect_every: u64,
    pub seed: u64,
    /// RUST_LOG of the relay.
    pub rust_log: String,
    /// Bound on the whole run.
    pub max_duration: Duration,
    /// Print progress lines.
    pub verbose: bool,
}

impl SoakConfig {
    pub fn new(relay_bin: impl Into<PathBuf>, dir: &Path, connections: u64) -> Self {
        Self {
            relay_bin: relay_bin.into(),
            dir: dir.to_path_buf(),
            connections,
            labels: 4,
            concurrency: 32,
            parked: 8,
            churn_every: (connections / 40).max(100),
            redirect_every: 200,
            seed: 0x7aa5_50a4,
            rust_log: "info".into(),
            max_duration: Duration::from_secs(1800),
            verbose: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    pub connections: u64,
    /// Connections of the measured run (after the warm-up).
    pub run_connections: u64,
    pub bytes: u64,
    pub refused_retries: u64,
    pub corrupt: u64,
    pub redirects: u64,
    pub agent_restarts: u64,
    pub elapsed: Duration,
    /// Relay pairings counted by its metrics.
    pub relay_pairings: f64,
    /// Right after start (labels loaded, no agent).
    pub cold: ProcStats,
    /// After a warm-up run, agents stopped.
    pub warm: ProcStats,
    pub peak_fds: usize,
    pub peak_rss_kib: u64,
    /// After the run, agents stopped, settled.
    pub after: ProcStats,
    /// p ports with a listener after the run (from /proc/net/tcp), and accepting a connect.
    pub p_listening_after: Vec<u16>,
    pub p_accepting_after: Vec<u16>,
    pub relay_log: PathBuf,
    pub labels: Vec<TestLabel>,
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        format!(
            "connections ok          {}\n\
             bytes echoed            {} (each checked both ways)\n\
             corrupt / short         {}\n\
             refused, retried        {}\n\
             via 307 first           {}\n\
             agent restarts          {}\n\
             relay pairings          {}\n\
             measured run            {} connections in {:.1} s ({:.0} connections/s)\n\
             relay CPU (run)         {:.2} s ({:.0} µs per connection)\n\
             relay fds               cold {} / warm {} / peak {} / after {}\n\
             relay RSS (MiB)         cold {:.1} / warm {:.1} / peak {:.1} / after {:.1}\n\
             p ports bound after     {:?} (listening), {:?} (accepting)\n",
            self.connections,
            self.bytes,
            self.corrupt,
            self.refused_retries,
            self.redirects,
            self.agent_restarts,
            self.relay_pairings,
            self.run_connections,
            self.elapsed.as_secs_f64(),
            self.run_connections as f64 / self.elapsed.as_secs_f64().max(1e-9),
            (self.after.cpu_ticks - self.warm.cpu_ticks) as f64 / 100.0,
            (self.after.cpu_ticks - self.warm.cpu_ticks) as f64 * 10_000.0
                / self.run_connections.max(1) as f64,
            self.cold.fds,
            self.warm.fds,
            self.peak_fds,
            self.after.fds,
            mib(self.cold.rss_kib),
            mib(self.warm.rss_kib),
            mib(self.peak_rss_kib),
            mib(self.after.rss_kib),
            self.p_listening_after,
            self.p_accepting_after,
        )
    }
}

/// Waits (bounded by `limit`) until the relay's fd count is `fds` and no p port listens;
/// returns the last reading.
async fn settle(relay: &SpawnedRelay, fds: usize, limit: Duration) -> ProcStats {
    let deadline = Instant::now() + limit;
    loop {
        let stats = relay.stats();
        let listening = listening_ports(relay.p_ports.lo, relay.p_ports.hi);
        if (stats.fds <= fds && listening.is_empty()) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Counters {
    next: AtomicU64,
    ok: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    corrupt: AtomicU64,
    redirects: AtomicU64,
    restarts: AtomicU64,
    failed: AtomicBool,
}

/// Runs `count` checksummed connections (numbered from `first`) through the relay's labels.
#[allow(clippy::too_many_arguments)]
async fn drive(
    relay: &Arc<SpawnedRelay>,
    q_ports: &[u16],
    labels: &[TestLabel],
    first: u64,
    count: u64,
    config: &SoakConfig,
    agents: &Arc<Mutex<Vec<Option<Agent>>>>,
    forward: SocketAddr,
) -> Arc<Counters> {
    let counters = Arc::new(Counters {
        next: AtomicU64::new(first),
        ok: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        corrupt: AtomicU64::new(0),
        redirects: AtomicU64::new(0),
        restarts: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let end = first + count;
    let restarts = Arc::new(AtomicU64::new(0));
    // The churn: every `churn_every` completed connections, one label's agent is stopped
    // gracefully and a new one started.
    let churn = {
        let (counters, agents, labels, relay, restarts) = (
            counters.clone(),
            agents.clone(),
            labels.to_vec(),
            relay.clone(),
            restarts.clone(),
        );
        let (every, parked) = (config.churn_every.max(1), config.parked);
        tokio::spawn(async move {
            let mut next_churn = every;
            let mut which = 0usize;
            let mut stopping = Vec::new();
            loop {
                let done = counters.ok.load(Ordering::Relaxed);
                if done >= count || counters.failed.load(Ordering::Relaxed) {
                    break;
                }
                if done >= next_churn {
                    next_churn += every;
                    let i = which % labels.len();
                    which += 1;
                    let old = agents.lock().unwrap()[i].take();
                    if let Some(old) = old {
                        stopping.push(old.stop());
                    }
                    let new =
                        Agent::start(relay.front, &relay.ca(), &labels[i], forward, parked, |c| {
                            c.shutdown_grace = Duration::from_secs(5)
                        });
                    agents.lock().unwrap()[i] = Some(new);
                    restarts.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for task in stopping {
                let _ = task.await;
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..config.concurrency {
        let (counters, relay) = (counters.clone(), relay.clone());
        let q_ports = q_ports.to_vec();
        let label_names: Vec<String> = labels.iter().map(|l| l.label.clone()).collect();
        let (seed, redirect_every) = (config.seed, config.redirect_every.max(1));
        clients.push(tokio::spawn(async move {
            loop {
                let n = counters.next.fetch_add(1, Ordering::Relaxed);
                if n >= end || counters.failed.load(Ordering::Relaxed) {
                    return;
                }
                let which = (n % q_ports.len() as u64) as usize;
                let q = SocketAddr::from(([127, 0, 0, 1], q_ports[which]));
                if n.is_multiple_of(redirect_every) {
                    // The mobile client's first step: the 307 to q (or a 503 while the
                    // label's agent is being replaced).
                    let response = relay
                        .request(&format!(
                            "GET /n/{n} HTTP/1.1\r\nHost: {}.{DOMAIN}\r\nConnection: close\r\n\r\n",
                            label_names[which]
                        ))
                        .await;
                    if response.status == 307 {
                        counters.redirects.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(response.status, 503, "{response:?}");
                    }
                }
                let data = payload(seed, n);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match echo_exchange(q, &data).await {
                        Exchange::Ok { .. } => {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            counters
                                .bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            break;
                        }
                        Exchange::Refused if attempts < 50 => {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => {
                            eprintln!(
                                "soak: connection {n} to {q}: {other:?} after {attempts} attempts"
                            );
                            counters.corrupt.fetch_add(1, Ordering::Relaxed);
                            counters.failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await.expect("client task");
    }
    let corrupt = counters.corrupt.load(Ordering::Relaxed);
    counters.failed.store(true, Ordering::Relaxed); // stops the churn loop if not yet done
    churn.await.expect("churn task");
    counters.failed.store(corrupt > 0, Ordering::Relaxed);
    counters
        .restarts
        .store(restarts.load(Ordering::Relaxed), Ordering::Relaxed);
    counters
}

/// The churn soak: a spawned `taas-relay serve`, `labels` labels each with an in-process agent
/// that is replaced every `churn_every` connections, `connections` checksummed echo exchanges
/// by `concurrency` clients; then every agent stops and the relay's fds, p ports and RSS are
/// compared with their baselines.
pub async fn soak(config: SoakConfig) -> SoakReport {
    let started_all = Instant::now();
    let labels: Vec<TestLabel> = (0..config.labels)
        .map(|i| TestLabel::new(&format!("soak{i}")).with("maxParked: 64"))
        .collect();
    let mut spec = RelaySpec::new(&config.relay_bin, &config.dir, 200);
    spec.rust_log = config.rust_log.clone();
    spec.extra_args = vec![
        "--rendezvous-timeout".into(),
        "2".into(),
        "--client-wait".into(),
        "10".into(),
    ];
    std::fs::create_dir_all(config.dir.join("labels")).unwrap();
    for label in &labels {
        write_label(&config.dir.join("labels"), label);
    }
    let relay = Arc::new(SpawnedRelay::start(&spec).await);
    let cold = settle(&relay, 0, Duration::from_millis(300)).await;
    let (forward, _echo) = echo_server().await;

    let agents: Arc<Mutex<Vec<Option<Agent>>>> = Arc::new(Mutex::new(Vec::new()));
    let start_agents = |agents: &Arc<Mutex<Vec<Option<Agent>>>>| {
        let mut list = agents.lock().unwrap();
        list.clear();
        for label in &labels {
            list.push(Some(Agent::start(
                relay.front,
                &relay.ca(),
                label,
                forward,
                config.parked,
                |c| c.shutdown_grace = Duration::from_secs(5),
            )));
        }
    };
    let stop_agents = |agents: &Arc<Mutex<Vec<Option<Agent>>>>| {
        let tasks: Vec<_> = agents
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(Option::take)
            .map(Agent::stop)
            .collect();
        async move {
            for task in tasks {
                let _ = tokio::time::timeout(PATIENCE, task).await;
            }
        }
    };
    start_agents(&agents);
    let mut q_ports = Vec::new();
    for label in &labels {
        q_ports.push(relay.q(&label.label).await);
    }

    // Warm-up (1%, at least 200), then every agent stops: the warm baseline.
    let warm_count = (config.connections / 100).max(200).min(config.connections);
    let warm_counters = drive(
        &relay, &q_ports, &labels, 0, warm_count, &config, &agents, forward,
    )
    .await;
    stop_agents(&agents).await;
    let warm = settle(&relay, cold.fds, PATIENCE * 2).await;

    // The run, sampled for peaks.
    start_agents(&agents);
    let sampling = Arc::new(AtomicBool::new(true));
    let peaks = Arc::new(Mutex::new((0usize, 0u64)));
    let sampler = {
        let (relay, sampling, peaks) = (relay.clone(), sampling.clone(), peaks.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(s) = ProcStats::read(relay.pid()) {
                    let mut p = peaks.lock().unwrap();
                    p.0 = p.0.max(s.fds);
                    p.1 = p.1.max(s.rss_kib);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let progress = {
        let verbose = config.verbose;
        let relay = relay.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            while sampling.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if verbose && last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    if let Ok(s) = ProcStats::read(relay.pid()) {
                        let _ = writeln!(
                            std::io::stderr(),
                            "soak: relay fds {} rss {:.1} MiB",
                            s.fds,
                            s.rss_kib as f64 / 1024.0
                        );
                    }
                }
            }
        })
    };
    let run_started = Instant::now();
    let main = drive(
        &relay,
        &q_ports,
        &labels,
        warm_count,
        config.connections - warm_count.min(config.connections),
        &config,
        &agents,
        forward,
    );
    let counters = tokio::time::timeout(config.max_duration, main)
        .await
        .expect("soak within its time bound");
    let elapsed = run_started.elapsed();
    let pairings = metric_sum(&relay.metrics_text().await, "taas_pairings_total");
    stop_agents(&agents).await;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = progress.await;
    let after = settle(&relay, cold.fds, PATIENCE * 3).await;
    let p_listening_after = listening_ports(relay.p_ports.lo, relay.p_ports.hi);
    let p_accepting_after =
        accepting_ports([127, 0, 0, 1].into(), relay.p_ports.lo, relay.p_ports.hi).await;
    let (peak_fds, peak_rss_kib) = *peaks.lock().unwrap();
    let report = SoakReport {
        connections: warm_counters.ok.load(Ordering::Relaxed) + counters.ok.load(Ordering::Relaxed),
        run_connections: counters.ok.load(Ordering::Relaxed),
        bytes: warm_counters.bytes.load(Ordering::Relaxed) + counters.bytes.load(Ordering::Relaxed),
        refused_retries: warm_counters.refused.load(Ordering::Relaxed)
            + counters.refused.load(Ordering::Relaxed),
        corrupt: warm_counters.corrupt.load(Ordering::Relaxed)
            + counters.corrupt.load(Ordering::Relaxed),
        redirects: warm_counters.redirects.load(Ordering::Relaxed)
            + counters.redirects.load(Ordering::Relaxed),
        agent_restarts: warm_counters.restarts.load(Ordering::Relaxed)
            + counters.restarts.load(Ordering::Relaxed),
        elapsed,
        relay_pairings: pairings,
        cold,
        warm,
        peak_fds,
        peak_rss_kib,
        after,
        p_listening_after,
        p_accepting_after,
        relay_log: relay.log.clone(),
        labels,
    };
    if config.verbose {
        eprintln!(
            "soak: done in {:.1} s overall",
            started_all.elapsed().as_secs_f64()
        );
    }
    report
}
