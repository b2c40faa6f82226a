//! The three ways `taas-relay` runs, and what they share. [`standalone`] (`serve`) is every
//! label in one process; [`pod`] (`label-relay`) is one label's relay as the operator runs it;
//! [`gateway`] is the cluster's TLS front end, forwarding to the label relays. Each binds a
//! front end, resolves its certificate pair, serves `/metrics` with a readiness flag, and
//! follows files that change while it runs. That shared part is here, written once, so the
//! three modules differ only in what they serve.

pub mod gateway;
pub mod pod;
pub mod standalone;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

use crate::config::Timeouts;
use crate::frontend::{FrontendMetrics, FrontendSettings};
use crate::host::Names;
use crate::label_source;
use crate::relay::StandaloneBackend;
use crate::tls::{self, CertFiles, CertNames};

/// Why a run mode did not start. Every configuration error is found before anything is
/// served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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

/// Where the metrics endpoint listens by default in a pod (gateway and label relay): every
/// address, so the kubelet's probes and Prometheus reach it.
pub const POD_METRICS: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    DEFAULT_METRICS_PORT,
);
/// Where generated certificates and other local state go unless told otherwise
/// (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = ".taas";
/// The metrics endpoint's port, the same in every mode.
pub const DEFAULT_METRICS_PORT: u16 = 9464;

/// The front end's certificate pair: the files given (both), or a self-signed pair for
/// `names`, generated once in `state_dir` and reused after (neither).
pub(crate) fn cert_pair(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    state_dir: &Path,
    names: impl FnOnce() -> CertNames,
) -> Result<CertFiles, StartError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => Ok(tls::load_or_generate(state_dir, &names())?),
        _ => Err(StartError::Config(
            "--tls-cert and --tls-key go together: give both, or neither for a generated certificate".into(),
        )),
    }
}

/// Binds a listener (a front end, a control port, the metrics endpoint); returns it with the
/// address it got (the real port when 0 was asked for).
pub(crate) fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listen_error = |source| StartError::Listen { addr, source };
    let listener = crate::ports::listen(addr, 1024).map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local))
}

/// The front end's settings in every mode: its names, the front-end timeouts, and its
/// connection caps (overall and per source). No own IPs: the standalone relay adds its own.
pub(crate) fn frontend_settings(
    names: Names,
    timeouts: &Timeouts,
    max_connections: usize,
    max_connections_per_source: usize,
    metrics: FrontendMetrics,
) -> FrontendSettings {
    FrontendSettings {
        names,
        own_ips: Vec::new(),
        handshake_timeout: timeouts.handshake,
        request_timeout: timeouts.keep_alive,
        body_timeout: timeouts.request_body,
        max_connections,
        max_connections_per_source,
        metrics,
        direct: None,
    }
}

/// What a run mode started, stopped together: dropping it aborts every task (front end,
/// metrics endpoint, file followers), then closes the relay's labels when the mode has a
/// relay. Also the readiness flag `/readyz` answers from.
pub(crate) struct Tasks {
    set: JoinSet<()>,
    /// Tasks that stop when a graceful stop begins (listeners that take new connections,
    /// file followers), while the rest (front end, metrics) go on.
    stop_at_drain: Vec<AbortHandle>,
    ready: Arc<AtomicBool>,
    relay: Option<Arc<StandaloneBackend>>,
}

impl Tasks {
    /// No tasks yet, not ready; `relay` is closed when this is dropped, so a start that
    /// fails after creating it leaves nothing running.
    pub(crate) fn new(relay: Option<Arc<StandaloneBackend>>) -> Self {
        Self {
            set: JoinSet::new(),
            stop_at_drain: Vec::new(),
            ready: Arc::new(AtomicBool::new(false)),
            relay,
        }
    }

    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(task);
    }

    /// `spawn` for a task that stops as soon as a graceful stop begins ([`Tasks::drain`]).
    pub(crate) fn spawn_until_drain(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.stop_at_drain.push(handle);
    }

    /// Stops the tasks spawned with [`Tasks::spawn_until_drain`] (the listeners that take new
    /// connections), nothing else: a gateway's last step before it waits for what it carries.
    pub(crate) fn stop_accepting(&self) {
        for task in &self.stop_at_drain {
            task.abort();
        }
    }

    /// Begins a graceful stop: `/readyz` answers 503 first, then the listeners that take
    /// new connections and the file followers stop, then the relay drains
    /// ([`StandaloneBackend::drain`]). The front end keeps answering (registrations get
    /// 503) and spliced pairs go on.
    pub(crate) fn drain(&self) {
        self.drain_holding(Duration::ZERO);
    }

    /// [`Tasks::drain`], but the labels (and their parked connections) close only after
    /// `hold`: meanwhile registrations are refused (a gateway sends them to another replica)
    /// and edge offers are answered LAST_RESORT while parked connections remain. Zero: at once,
    /// as the standalone relay does. With nothing parked and no registration pending (none
    /// can come: registrations are refused), the labels close at once too: holding them
    /// would only keep a client that waits on q for a connection until the hold ends.
    pub(crate) fn drain_holding(&self, hold: Duration) {
        self.set_unready();
        for task in &self.stop_at_drain {
            task.abort();
        }
        let Some(relay) = &self.relay else {
            return;
        };
        if hold.is_zero() {
            relay.drain();
            return;
        }
        relay.start_draining();
        let relay = Arc::downgrade(relay);
        tokio::spawn(async move {
            let over = tokio::time::Instant::now() + hold;
            let mut tick = tokio::time::interval(DRAIN_POLL);
            loop {
                tick.tick().await;
                let Some(relay) = relay.upgrade() else {
                    return;
                };
                if tokio::time::Instant::now() >= over {
                    tracing::info!("stopping: hold over, parked connections given back");
                } else if relay.parked_and_pending() == 0 {
                    tracing::info!("stopping: nothing parked or on its way, labels closed");
                } else {
                    continue;
                }
                relay.close();
                return;
            }
        });
    }

    /// A graceful stop ([`Tasks::drain`]), then waits until no pair is left, `timeout`
    /// passes, or `stop_now` (a second signal) resolves; the caller then drops everything,
    /// which cuts what is left.
    pub(crate) async fn drain_and_stop(
        &self,
        timeout: Duration,
        stop_now: impl Future<Output = ()>,
    ) -> DrainEnd {
        self.drain_holding_and_stop(Duration::ZERO, Duration::ZERO, timeout, stop_now)
            .await
    }

    /// [`Tasks::drain_and_stop`] with [`Tasks::drain_holding`]'s hold: the stop also waits for
    /// the hold while parked connections remain (a client may still take one), and for at
    /// least `linger` in any case (both capped at `timeout`).
    pub(crate) async fn drain_holding_and_stop(
        &self,
        hold: Duration,
        linger: Duration,
        timeout: Duration,
        stop_now: impl Future<Output = ()>,
    ) -> DrainEnd {
        let hold = hold.min(timeout);
        let linger = linger.min(timeout);
        let started = tokio::time::Instant::now();
        self.drain_holding(hold);
        let active = || self.relay.as_ref().map_or(0, |relay| relay.active_pairs());
        let parked = || self.relay.as_ref().map_or(0, |relay| relay.parked());
        tracing::info!(
            seconds = timeout.as_secs_f64(),
            hold = hold.as_secs_f64(),
            pairs = active(),
            parked = parked(),
            "stopping: unready, registrations refused, parked connections closed after the hold; active pairs may finish"
        );
        let wait = async {
            let mut tick = tokio::time::interval(DRAIN_POLL);
            loop {
                tick.tick().await;
                let elapsed = started.elapsed();
                let holding = (elapsed < hold && parked() > 0) || elapsed < linger;
                if let Some(end) = drain_end(active(), elapsed, timeout).filter(|_| !holding) {
                    return end;
                }
            }
        };
        let end = tokio::select! {
            end = wait => end,
            () = stop_now => DrainEnd::SecondSignal,
        };
        match end {
            DrainEnd::PairsDone => tracing::info!("stopping: no pair left"),
            DrainEnd::TimedOut => {
                tracing::info!(
                    pairs = active(),
                    "stopping: drain timeout, cutting the pairs left"
                )
            }
            DrainEnd::SecondSignal => {
                tracing::info!(pairs = active(), "second signal: stopping now")
            }
        }
        end
    }

    /// Binds and serves the metrics endpoint when asked for, with this mode's readiness;
    /// returns its address.
    pub(crate) fn serve_metrics(
        &mut self,
        addr: Option<SocketAddr>,
        registry: Registry,
    ) -> Result<Option<SocketAddr>, StartError> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let (listener, local) = bind(addr)?;
        self.spawn(taas_process::metrics::serve(
            listener,
            Arc::new(registry),
            self.ready.clone(),
        ));
        Ok(Some(local))
    }

    /// `/readyz` answers 200 from now on.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/readyz` answers 503 again (while everything keeps running).
    pub(crate) fn set_unready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.set.abort_all();
        if let Some(relay) = &self.relay {
            relay.close();
        }
    }
}

/// How often a draining relay looks whether its last pair has ended.
pub(crate) const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How long a relay drains unless told otherwise (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a graceful stop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// Every pair finished by itself: nothing was cut.
    PairsDone,
    /// The drain timeout passed with pairs still open: they are cut.
    TimedOut,
    /// A second SIGTERM/SIGINT: stop at once.
    SecondSignal,
}

/// Whether a drain is over, given the pairs still active and the time since it began: as
/// soon as no pair is left, else at the timeout.
pub fn drain_end(active_pairs: usize, elapsed: Duration, timeout: Duration) -> Option<DrainEnd> {
    if active_pairs == 0 {
        Some(DrainEnd::PairsDone)
    } else if elapsed >= timeout {
        Some(DrainEnd::TimedOut)
    } else {
        None
    }
}

/// When a file follower first reads its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirstRead {
    /// At once: the start did not read them.
    Now,
    /// After one interval: the start read them (and refused to start on a problem).
    AfterInterval,
}

/// Remembers the problem of the last read, so that a file that stays broken is reported
/// once, not on every poll: a problem is new when it differs from the last one; a good read
/// (no problem) forgets it.
#[derive(Debug, Default)]
pub(crate) struct LastProblem(Option<String>);

impl LastProblem {
    /// Takes the problem of a read (`None`: it went well); returns it when it is to be
    /// reported.
    pub(crate) fn update(&mut self, problem: Option<String>) -> Option<&str> {
        let new = problem.is_some() && problem != self.0;
        self.0 = problem;
        self.0.as_deref().filter(|_| new)
    }
}

/// Follows files that can change while the process runs (mounted ConfigMaps and Secrets, a
/// routes file): every `interval`, `read` (blocking file I/O, run off the async workers)
/// reads them and `apply` puts what was read in place, keeping the last good configuration
/// for what it cannot use and returning the problem; `report` logs a problem once, when it
/// appears or changes. Runs until its task is dropped.
pub(crate) async fn follow_files<T, R, A, W>(
    interval: Duration,
    first: FirstRead,
    read: R,
    mut apply: A,
    report: W,
) where
    T: Send + 'static,
    R: Fn() -> T + Clone + Send + 'static,
    A: FnMut(T) -> Option<String>,
    W: Fn(&str),
{
    let mut last = LastProblem::default();
    if first == FirstRead::AfterInterval {
        tokio::time::sleep(interval).await;
    }
    loop {
        if let Ok(read) = tokio::task::spawn_blocking(read.clone()).await {
            if let Some(problem) = last.update(apply(read)) {
                report(problem);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_problem_is_reported_when_it_appears_or_changes_and_a_good_read_forgets_it() {
        let mut last = LastProblem::default();
        assert_eq!(last.update(None), None);
        assert_eq!(last.update(Some("broken".into())), Some("broken"));
        assert_eq!(
            last.update(Some("broken".into())),
            None,
            "still broken: once"
        );
        assert_eq!(last.update(Some("other".into())), Some("other"));
        assert_eq!(last.update(None), None);
        assert_eq!(
            last.update(Some("other".into())),
            Some("other"),
            "broken again after a good read: reported again"
        );
    }

    #[test]
    fn a_drain_ends_when_the_last_pair_ends_or_at_the_timeout() {
        let timeout = Duration::from_secs(30);
        assert_eq!(
            drain_end(0, Duration::ZERO, timeout),
            Some(DrainEnd::PairsDone)
        );
        assert_eq!(drain_end(3, Duration::from_secs(1), timeout), None);
        assert_eq!(drain_end(1, Duration::from_secs(29), timeout), None);
        assert_eq!(drain_end(1, timeout, timeout), Some(DrainEnd::TimedOut));
        assert_eq!(
            drain_end(0, Duration::from_secs(31), timeout),
            Some(DrainEnd::PairsDone),
            "nothing left to cut"
        );
        assert_eq!(
            drain_end(2, Duration::ZERO, Duration::ZERO),
            Some(DrainEnd::TimedOut)
        );
    }

    proptest::proptest! {
        #[test]
        fn a_drain_never_cuts_before_its_timeout_nor_waits_with_nothing_left(
            active in 0usize..1000,
            elapsed_ms in 0u64..100_000,
            timeout_ms in 0u64..100_000,
        ) {
            let (elapsed, timeout) = (Duration::from_millis(elapsed_ms), Duration::from_millis(timeout_ms));
            let end = drain_end(active, elapsed, timeout);
            proptest::prop_assert_eq!(end == Some(DrainEnd::PairsDone), active == 0);
            proptest::prop_assert_eq!(end == Some(DrainEnd::TimedOut), active > 0 && elapsed >= timeout);
        }
    }

    #[test]
    fn a_certificate_pair_is_both_files_or_neither() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let given = cert_pair(Some(&cert), Some(&key), dir.path(), || unreachable!()).unwrap();
        assert_eq!((given.cert, given.key), (cert.clone(), key.clone()));
        for (cert, key) in [(Some(&cert), None), (None, Some(&key))] {
            let error = cert_pair(cert, key, dir.path(), || unreachable!()).unwrap_err();
            assert!(error.to_string().contains("go together"), "{error}");
        }
        let names =
            || CertNames::for_relay("registrar.test", "servers.test", [127, 0, 0, 1].into(), "");
        let generated = cert_pair(None, None, &dir.path().join("state"), names).unwrap();
        assert!(generated.cert.starts_with(dir.path().join("state")));
        let again = cert_pair(None, None, &dir.path().join("state"), names).unwrap();
        assert_eq!(
            std::fs::read(&generated.cert).unwrap(),
            std::fs::read(&again.cert).unwrap(),
            "generated once, then reused"
        );
    }

    /// The follower applies each read, reports a lasting problem once, and goes on after it.
    #[tokio::test]
    async fn the_follower_applies_every_read_and_reports_a_problem_once() {
        let reads = Arc::new(Mutex::new(vec![Ok(3), Err("bad"), Err("bad"), Err("bad")]));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let reported = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (applied, reported) = (applied.clone(), reported.clone());
            tokio::spawn(follow_files(
                Duration::from_millis(10),
                FirstRead::Now,
                move || {
                    let mut reads = reads.lock().unwrap();
                    if reads.is_empty() {
                        Ok(4)
                    } else {
                        reads.remove(0)
                    }
                },
                move |read: Result<i32, &str>| match read {
                    Ok(value) => {
                        applied.lock().unwrap().push(value);
                        None
                    }
                    Err(problem) => Some(problem.to_string()),
                },
                move |problem| reported.lock().unwrap().push(problem.to_string()),
            ))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while applied.lock().unwrap().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the follower stopped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert_eq!(*reported.lock().unwrap(), ["bad"]);
        assert_eq!(applied.lock().unwrap()[..2], [3, 4]);
    }
}
