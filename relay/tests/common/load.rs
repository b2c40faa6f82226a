//! Robustness support shared by `robustness.rs`, the `prop_*.rs` harnesses and the soak example
//! (`relay/examples/soak.rs`): seeded property runs with bounded case counts, a process-wide
//! debug log capture, a panic counter, `/proc` readings of a process (fds, RSS, CPU, listening
//! ports), and the churn soak itself (a spawned relay, in-process agents that come and go,
//! checksummed echo clients).
//!
//! Declared by each user with `mod common; #[path = "common/load.rs"] mod load;`.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    agent_config, read_response, tls_connect, write_label, TestLabel, DOMAIN, PATIENCE, REGISTRAR,
};

// ---------------------------------------------------------------------------------------------
// Property runs.

/// Overrides the case count of every pure property harness (default 2,000 each).
pub const CASES_ENV: &str = "TAAS_PROP_CASES";
/// Overrides the case count of the end-to-end HTTP harness (a real relay over TLS).
pub const E2E_CASES_ENV: &str = "TAAS_PROP_E2E_CASES";
/// Overrides the seed (a u64); by default every harness has its own fixed seed.
pub const SEED_ENV: &str = "TAAS_PROP_SEED";

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The case count: `env` if set, else `default`.
pub fn cases(env: &str, default: u32) -> u32 {
    env_u64(env).map_or(default, |n| n.clamp(1, u64::from(u32::MAX)) as u32)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A runner with a fixed seed (per harness name, or `TAAS_PROP_SEED`), `cases` cases, no
/// failure files, and shrinking bounded so a failure is reported quickly.
pub fn runner(name: &str, cases: u32) -> (TestRunner, u64) {
    let seed = env_u64(SEED_ENV).unwrap_or_else(|| fnv1a(name.as_bytes()));
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&fnv1a(name.as_bytes()).to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        max_global_rejects: cases.saturating_mul(20).max(1024),
        ..Config::default()
    };
    (
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)),
        seed,
    )
}

/// Runs `test` on `cases` values of `strategy`; panics with the (shrunk) failing input.
/// Returns how many times `test` ran (shrinking included). Prints one summary line.
pub fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64 {
    let (mut runner, seed) = runner(name, cases);
    let executions = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        executions.fetch_add(1, Ordering::Relaxed);
        test(value)
    });
    let executions = executions.into_inner();
    eprintln!(
        "property {name}: {executions} executions ({cases} cases), seed {seed}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(error) = result {
        panic!("property {name} failed (seed {seed}): {error}");
    }
    executions
}

// ---------------------------------------------------------------------------------------------
// Logs and panics.

/// Everything the process logged since [`debug_logs`] installed the capture.
static CAPTURE: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Bound on the capture; later lines are counted, not kept.
const CAPTURE_MAX: usize = 256 * 1024 * 1024;
static CAPTURE_DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut capture = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
        if capture.len() + buf.len() <= CAPTURE_MAX {
            capture.extend_from_slice(buf);
        } else {
            CAPTURE_DROPPED.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CaptureWriter {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs (once per process) a global subscriber at `debug` for everything (`trace` for
/// nothing), writing into an in-memory capture: every in-process relay and agent of this test
/// binary then logs at debug, so nothing depends on quiet logging, and the logs can be searched
/// for secrets. Must run before anything else installs a subscriber (`TestRelay::start` does:
/// call this first in every test). Returns false if another subscriber was already installed.
pub fn debug_logs() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let level = std::env::var("TAAS_TEST_LOG").unwrap_or_else(|_| "debug".into());
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = level
            .parse::<tracing_subscriber::filter::Targets>()
            .unwrap_or_else(|_| {
                tracing_subscriber::filter::Targets::new().with_default(tracing::Level::DEBUG)
            });
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(CaptureWriter),
            )
            .try_init()
            .is_ok()
    })
}

/// A copy of the captured log text.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&CAPTURE.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in the process from now on (relay tasks included: tokio would otherwise
/// swallow a panicking task), keeping the default report.
pub fn count_panics() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Every way `needle` could show up in a log line besides verbatim: lower case, and with
/// its bytes as hex, base64 and a Rust byte list.
pub fn secret_spellings(b32: &str, secret: &[u8]) -> Vec<String> {
    use base64::Engine as _;
    let mut out = vec![
        b32.to_string(),
        b32.to_ascii_lowercase(),
        b32.trim_end_matches('=').to_string(),
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        secret
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        format!("{:?}", &secret[..secret.len().min(6)])
            .trim_end_matches(']')
            .to_string(),
    ];
    out.retain(|s| s.len() >= 8);
    out
}

/// `text` without each line's leading timestamp and without ANSI escapes, so that digit runs
/// of timestamps cannot be mistaken for tokens.
pub fn strip_timestamps(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = strip_ansi(line);
        let rest = match line.split_once(' ') {
            Some((first, rest)) if first.len() >= 20 && first.as_bytes()[4] == b'-' => rest,
            _ => line.as_str(),
        };
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `token` (digits) occurs in `text` as a whole number: not inside a longer digit run
/// and not as the fraction of a decimal.
pub fn contains_number(text: &str, token: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find(token) {
        let start = from + found;
        let end = start + token.len();
        let before = start.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(end).copied();
        let digit_or_dot = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit() || b == b'.');
        if !digit_or_dot(before) && !after.is_some_and(|b| b.is_ascii_digit()) {
            return true;
        }
        from = start + 1;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Processes, as /proc shows them.

/// One reading of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    pub fds: usize,
    pub rss_kib: u64,
    /// utime + stime, in clock ticks (1/100 s here).
    pub cpu_ticks: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> std::io::Result<Self> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            fds,
            rss_kib,
            cpu_ticks: cpu_ticks(pid)?,
        })
    }
}

/// utime + stime of `pid` in clock ticks.
pub fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces: fields count from after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3 overall, utime 14 and stime 15 → indices 11 and 12 here.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// The soft and hard "Max open files" of `pid`.
pub fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = |i: usize| fields.get(i).unwrap_or(&"?").to_string();
    (at(3), at(4))
}

/// Local ports in `lo..=hi` with a listening TCP socket in this network namespace
/// (from `/proc/net/tcp` and `/proc/net/tcp6`).
pub fn listening_ports(lo: u16, hi: u16) -> Vec<u16> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let Some(port) = port.filter(|p| (lo..=hi).contains(p)) {
                found.push(port);
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// Ports of `lo..=hi` on `ip` that accept a TCP connection (a connect scan; each connect is
/// closed at once).
pub async fn accepting_ports(ip: std::net::IpAddr, lo: u16, hi: u16) -> Vec<u16> {
    let mut open = Vec::new();
    for port in lo..=hi {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(SocketAddr::new(ip, port)),
        );
        if let Ok(Ok(_stream)) = attempt.await {
            open.push(port);
        }
    }
    open
}

/// Port ranges for a relay started by these tests: `len` rendezvous ports and `len` client
/// ports, below the blocks `common::port_block` hands out (22000+) and outside Linux's
/// ephemeral range, distinct per call and spread across processes.
pub fn own_ports(len: u16) -> (taas_relay::config::PortRange, taas_relay::config::PortRange) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) as u16;
    let span = 2 * len;
    let blocks = 9_000 / span;
    let index = ((std::process::id() as u16)
        .wrapping_mul(13)
        .wrapping_add(slot))
        % blocks;
    let base = 11_000 + index * span;
    (
        taas_relay::config::PortRange::new(base, base + len - 1).unwrap(),
        taas_relay::config::PortRange::new(base + len, base + span - 1).unwrap(),
    )
}

/// A free loopback port (closed again; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// A spawned `taas-relay serve`.

/// A `taas-relay serve` child process on loopback, its stderr in a file. Killed on drop.
pub struct SpawnedRelay {
    pub child: Child,
    pub dir: PathBuf,
    pub front: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub p_ports: taas_relay::config::PortRange,
    pub q_ports: taas_relay::config::PortRange,
    pub log: PathBuf,
}

/// How to start a [`SpawnedRelay`].
#[derive(Clone, Debug)]
pub struct RelaySpec {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub front_port: u16,
    pub p_ports: taas_relay::config::PortRange,
    pub q_ports: taas_relay::config::PortRange,
    pub rust_log: String,
    pub extra_args: Vec<String>,
    pub metrics: bool,
    /// Shell `ulimit` commands run before `exec` (e.g. `ulimit -n 64`), or empty.
    pub ulimit: String,
}

impl RelaySpec {
    pub fn new(bin: impl Into<PathBuf>, dir: &Path, len: u16) -> Self {
        let (p_ports, q_ports) = own_ports(len);
        Self {
            bin: bin.into(),
            dir: dir.to_path_buf(),
            front_port: free_port(),
            p_ports,
            q_ports,
            rust_log: "info".into(),
            extra_args: Vec::new(),
            metrics: true,
            ulimit: String::new(),
        }
    }
}

impl SpawnedRelay {
    /// Starts the relay and waits (bounded) until its front end accepts connections.
    pub async fn start(spec: &RelaySpec) -> Self {
        std::fs::create_dir_all(spec.dir.join("labels")).unwrap();
        let log = spec.dir.join(format!("relay-{}.log", spec.front_port));
        let metrics = spec
            .metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", spec.front_port),
            "--p-ports".into(),
            spec.p_ports.to_string(),
            "--q-ports".into(),
            spec.q_ports.to_string(),
            "--labels".into(),
            spec.dir.join("labels").display().to_string(),
            "--state-dir".into(),
            spec.dir.join("state").display().to_string(),
            "--metrics".into(),
            metrics.map_or("off".to_string(), |m| m.to_string()),
            "--reload-interval".into(),
            "0.2".into(),
        ];
        args.extend(spec.extra_args.iter().cloned());
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = if spec.ulimit.is_empty() {
            let mut c = Command::new(&spec.bin);
            c.args(&args);
            c
        } else {
            // `exec` keeps the pid: /proc/<pid> is the relay's.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{}; exec \"$0\" \"$@\"", spec.ulimit))
                .arg(&spec.bin)
                .args(&args);
            c
        };
        let child = command
            .current_dir(&spec.dir)
            .env("RUST_LOG", &spec.rust_log)
            .env_remove("TAAS_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn taas-relay");
        let relay = Self {
            child,
            dir: spec.dir.clone(),
            front: SocketAddr::from(([127, 0, 0, 1], spec.front_port)),
            metrics,
            p_ports: spec.p_ports,
            q_ports: spec.q_ports,
            log,
        };
        relay.wait_up().await;
        relay
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("state/relay-cert.pem")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the front end accepts TCP and the certificate exists.
    pub async fn wait_up(&self) {
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            if self.ca().exists() && TcpStream::connect(self.front).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not come up; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn stats(&self) -> ProcStats {
        ProcStats::read(self.pid()).expect("relay process alive")
    }

    /// `kill -9`, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One request on a new TLS connection to the front end.
    pub async fn request(&self, raw: &str) -> crate::common::Response {
        let mut tls = tls_connect(self.front, &self.ca(), REGISTRAR).await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    }

    /// The status of one request on a new TLS connection (`Connection: close` expected), or
    /// `None` if the connection, the handshake or the answer failed (all bounded).
    pub async fn try_request(&self, raw: &str) -> Option<u16> {
        let attempt = async {
            let tcp = TcpStream::connect(self.front).await.ok()?;
            let config =
                taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(self.ca()))
                    .ok()?;
            let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).ok()?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .ok()?;
            tls.write_all(raw.as_bytes()).await.ok()?;
            let mut got = Vec::new();
            let _ = tls.read_to_end(&mut got).await;
            let text = String::from_utf8_lossy(&got);
            text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
    }

    /// The label's client port q from a 307 (bounded wait until one is parked).
    pub async fn q(&self, label: &str) -> u16 {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let response = self
                .request(&format!(
                    "GET / HTTP/1.1\r\nHost: {label}.{DOMAIN}\r\nConnection: close\r\n\r\n"
                ))
                .await;
            if response.status == 307 {
                let location = response.header("location").unwrap().to_string();
                let port = location
                    .rsplit_once(':')
                    .and_then(|(_, rest)| rest.split('/').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("port in {location}"));
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no 307 for {label}: {response:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The relay's metrics text.
    pub async fn metrics_text(&self) -> String {
        let Some(addr) = self.metrics else {
            return String::new();
        };
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return String::new();
        };
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut text = String::new();
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text)).await;
        text
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sum of a metric's series (e.g. `taas_pairings_total`) in a metrics text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// In-process agents.

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

// ---------------------------------------------------------------------------------------------
// Checksummed echo clients.

/// The bytes connection `n` sends (and must get back): a deterministic pseudo-random stream.
/// Mostly small (1 B – 4 KiB), every 97th 64 KiB, every 1009th 1 MiB.
pub fn payload(seed: u64, n: u64) -> Vec<u8> {
    let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = if n % 1009 == 1008 {
        1 << 20
    } else if n % 97 == 96 {
        64 * 1024
    } else {
        1 + (next() % 4096) as usize
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How one echo exchange through the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exchange {
    /// Every byte came back, in order (checksums equal).
    Ok { checksum: u64 },
    /// Closed (or reset, or refused) before a single byte came back: retry.
    Refused,
    /// Some bytes came back but not all, or different ones.
    Corrupt { sent: usize, got: usize },
}

/// Sends `data` on a new connection to `addr`, half-closes, and reads until EOF (all bounded).
pub async fn echo_exchange(addr: SocketAddr, data: &[u8]) -> Exchange {
    let Ok(Ok(mut stream)) = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await else {
        return Exchange::Refused;
    };
    let (mut reader, mut writer) = stream.split();
    let write = async {
        let _ = writer.write_all(data).await;
        let _ = writer.shutdown().await;
    };
    let read = async {
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let exchange = async { tokio::join!(write, read).1 };
    let Ok(got) = tokio::time::timeout(PATIENCE * 3, exchange).await else {
        return Exchange::Corrupt {
            sent: data.len(),
            got: usize::MAX,
        };
    };
    if got.is_empty() && !data.is_empty() {
        Exchange::Refused
    } else if got == data {
        Exchange::Ok {
            checksum: fnv1a(&got),
        }
    } else {
        Exchange::Corrupt {
            sent: data.len(),
            got: got.len(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The churn soak.

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
    let (forward, _echo) = crate::common::echo_server().await;

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
