//! Hot restart of the standalone relay (issue 16, item 2), with real processes: the built
//! `taas-relay serve` and `taas-agent` (`--parked 8`) in front of an echo server. A steady
//! load of new clients through q and long transfers run while the relay is replaced — by
//! SIGHUP (it re-executes itself with `--take-over`) or by a second `serve --take-over`
//! started by hand — and none may fail. systemd's notifications are read from a datagram
//! socket given as NOTIFY_SOCKET. The figures are printed (`--nocapture`) for the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taas_testkit::echo::{echo_exchange, payload, Exchange};
use taas_testkit::ports::{free_port, own_ports};
use taas_testkit::prelude::*;
use taas_testkit::readings::try_scrape;
use taas_testkit::wait::eventually_within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram, UnixStream};

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_taas-relay");
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_taas-agent");

/// New clients in the load, and how many run at once.
const CLIENTS: usize = 200;
const CLIENT_WORKERS: usize = 4;
/// Long transfers across the swap, and the bytes each echoes.
const TRANSFERS: usize = 2;
const TRANSFER_BYTES: usize = 64 << 20;
/// How long one long transfer is stretched over (written in paced chunks).
const TRANSFER_SPAN: Duration = Duration::from_secs(5);

/// A process killed (by pid: a successor is no child of the test) when the test ends.
struct Killed(u32);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process, killed and reaped when the test ends.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `pid` runs: an exited process not reaped yet (a zombie) still has a stat entry,
/// with state Z.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

/// The relay's configuration, the same for the old and the new process.
struct Setup {
    dir: PathBuf,
    front: SocketAddr,
    metrics: SocketAddr,
    notify: UnixDatagram,
    args: Vec<String>,
    log: PathBuf,
    /// The label's pinned client port, when it has one.
    pinned: Option<u16>,
}

impl Setup {
    /// `shared`: with the shared port (two sockets) and the label's q pinned (the 307 names
    /// the shared port then); without: q from the range.
    fn new(dir: &Path, label: &TestLabel, shared: bool) -> Self {
        let labels = dir.join("labels");
        std::fs::create_dir_all(&labels).unwrap();
        let (p, q) = own_ports(40);
        let pinned = shared.then_some(q.hi);
        match pinned {
            Some(port) => write_label(&labels, &label.clone().with(&format!("clientPort: {port}"))),
            None => write_label(&labels, label),
        }
        let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args = [
            "serve",
            "--listen",
            &front.to_string(),
            "--p-ports",
            &p.to_string(),
            "--q-ports",
            &q.to_string(),
            "--labels",
            &labels.display().to_string(),
            "--state-dir",
            &dir.join("state").display().to_string(),
            "--metrics",
            &metrics.to_string(),
            "--reload-interval",
            "0.2",
            "--drain-timeout",
            "60",
            "--data-threads",
            "2",
            // Shorter than the transfers keep the old relay alive: clients fail if the agent
            // cannot park with the new relay until the old one exits.
            "--client-wait",
            "3",
        ]
        .map(String::from)
        .to_vec();
        if shared {
            // Two sockets (one per data-plane thread), handed over too.
            args.extend(["--shared-port".into(), free_port().to_string()]);
        }
        let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        Self {
            dir: dir.to_path_buf(),
            front,
            metrics,
            notify,
            args,
            log: dir.join("relay.log"),
            pinned,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("state/relay-cert.pem")
    }

    /// Starts `serve` with these arguments and `extra`; its stderr (and its successors')
    /// goes to the log.
    fn spawn(&self, extra: &[&str]) -> Child {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(RELAY_BIN)
            .args(&self.args)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", self.dir.join("notify.sock"))
            .env_remove("TAAS_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next systemd notification (bounded).
    async fn notification(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(PATIENCE * 2, self.notify.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no sd_notify message; log:\n{}", self.log_text()))
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Notifications until one with `READY=1` (bounded); all of them.
    async fn until_ready(&self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let message = self.notification().await;
            let ready = message.lines().any(|l| l == "READY=1");
            seen.push(message);
            if ready {
                return seen;
            }
        }
    }

    async fn metrics_text(&self) -> String {
        try_scrape(self.metrics).await
    }

    async fn parked(&self) -> f64 {
        metric(&self.metrics_text().await, "taas_parked{label=\"home\"}")
    }

    /// The label's q: pinned, or from a 307.
    async fn q(&self) -> SocketAddr {
        if let Some(port) = self.pinned {
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
        let mut tls = tls_connect(self.front, &self.ca(), REGISTRAR).await;
        let request = format!("GET / HTTP/1.1\r\nHost: home.{DOMAIN}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let response = tokio::time::timeout(PATIENCE, read_response(&mut tls))
            .await
            .unwrap();
        assert_eq!(response.status, 307, "{response:?}");
        SocketAddr::from(([127, 0, 0, 1], response.location_port()))
    }
}

/// The agent binary, `--parked 8`, forwarding to `forward`.
fn start_agent(setup: &Setup, label: &TestLabel, forward: SocketAddr) -> Owned {
    let log = std::fs::File::create(setup.dir.join("agent.log")).unwrap();
    Owned(
        Command::new(AGENT_BIN)
            .args([
                "--relay",
                &format!("https://{REGISTRAR}:{}", setup.front.port()),
            ])
            .args(["--connect", &setup.front.to_string()])
            .arg("--ca")
            .arg(setup.ca())
            .args(["--id", &label.id, "--label", &label.label, "--parked", "8"])
            .args(["--forward", &forward.to_string(), "--max-backoff", "1"])
            .env("TAAS_SECRET", &label.secret_b32)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// The agent (`start_agent`) in front of an echo server of its own, once it has 8 parked.
async fn agent_parked(setup: &Setup, label: &TestLabel) -> (Owned, tokio::task::JoinHandle<()>) {
    let (echo, echo_task) = echo_server().await;
    let agent = start_agent(setup, label, echo);
    eventually("the agent has 8 parked", || async {
        setup.parked().await >= 8.0
    })
    .await;
    (agent, echo_task)
}

/// One long transfer through q: `TRANSFER_BYTES` written in paced chunks over
/// `TRANSFER_SPAN` while the echo is read back; every byte must come back, in order.
async fn long_transfer(q: SocketAddr, seed: u8) -> Result<usize, String> {
    let stream = TcpStream::connect(q).await.map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = stream.into_split();
    let chunk = 256 * 1024;
    let chunks = TRANSFER_BYTES / chunk;
    let pace = TRANSFER_SPAN / chunks as u32;
    let byte = move |i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed);
    let write = tokio::spawn(async move {
        let mut tick = tokio::time::interval(pace);
        for c in 0..chunks {
            tick.tick().await;
            let data: Vec<u8> = (c * chunk..(c + 1) * chunk).map(byte).collect();
            writer.write_all(&data).await.map_err(|e| e.to_string())?;
        }
        writer.shutdown().await.map_err(|e| e.to_string())
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(PATIENCE, reader.read(&mut buf))
            .await
            .map_err(|_| format!("stalled at {got} bytes"))?
            .map_err(|e| format!("{e} at {got} bytes"))?;
        if n == 0 {
            break;
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != byte(got + i)) {
            return Err(format!("byte {} differs", got + i));
        }
        got += n;
    }
    write.await.map_err(|e| e.to_string())??;
    if got != TRANSFER_BYTES {
        return Err(format!("{got} of {TRANSFER_BYTES} bytes came back"));
    }
    Ok(got)
}

/// How the relay is replaced.
enum Trigger {
    Sighup,
    ByHand,
}

async fn swap_under_load(trigger: Trigger) {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let setup = Setup::new(dir.path(), &home, matches!(trigger, Trigger::ByHand));
    let mut old = Owned(setup.spawn(&[]));
    let old_pid = old.0.id();
    let first = setup.until_ready().await;
    assert!(
        first.iter().all(|m| !m.contains("MAINPID")),
        "the first relay says READY=1 alone: {first:?}"
    );
    let _agent = agent_parked(&setup, &home).await;
    let q = setup.q().await;
    assert!(matches!(
        echo_exchange(q, b"hello").await,
        Exchange::Ok { .. }
    ));

    // Long transfers, then a steady stream of new clients, across the swap.
    let transfers: Vec<_> = (0..TRANSFERS)
        .map(|i| tokio::spawn(long_transfer(q, i as u8)))
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load_started = Instant::now();
    let workers: Vec<_> = (0..CLIENT_WORKERS)
        .map(|_| {
            let (next, failures) = (next.clone(), failures.clone());
            tokio::spawn(async move {
                // ~3 s for all of them: one client every 60 ms per worker.
                let mut tick = tokio::time::interval(Duration::from_millis(60));
                loop {
                    tick.tick().await;
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= CLIENTS {
                        return;
                    }
                    let data = payload(7, n as u64);
                    // `Ok` only when every byte came back, in order.
                    let got = echo_exchange(q, &data).await;
                    if !matches!(got, Exchange::Ok { .. }) {
                        failures.lock().unwrap().push((n, format!("{got:?}")));
                    }
                }
            })
        })
        .collect();

    // Mid-load, the swap.
    eventually("a quarter of the clients served", || async {
        next.load(Ordering::Relaxed) >= CLIENTS / 4
    })
    .await;
    let swapped_at = Instant::now();
    let mut by_hand = None;
    match trigger {
        Trigger::Sighup => {
            let status = Command::new("kill")
                .args(["-HUP", &old_pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
        Trigger::ByHand => by_hand = Some(Owned(setup.spawn(&["--take-over"]))),
    }
    let messages = setup.until_ready().await;
    let swap = swapped_at.elapsed();
    let new_pid: u32 = messages
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.strip_prefix("MAINPID=")?.parse().ok())
        .unwrap_or_else(|| panic!("MAINPID= before READY=1: {messages:?}"));
    let _new = Killed(new_pid);
    assert_ne!(new_pid, old_pid, "a new process serves");
    if let Some(child) = &by_hand {
        assert_eq!(child.0.id(), new_pid);
    }
    assert!(alive(new_pid));

    for worker in workers {
        tokio::time::timeout(PATIENCE * 3, worker)
            .await
            .expect("the load ends")
            .unwrap();
    }
    let load_took = load_started.elapsed();
    let mut moved = 0;
    for transfer in transfers {
        let result = tokio::time::timeout(PATIENCE * 3, transfer)
            .await
            .expect("the transfer ends")
            .unwrap();
        moved += result.unwrap_or_else(|e| panic!("transfer cut: {e}\n{}", setup.log_text()));
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed: {failures:?}\nlog:\n{}",
        failures.len(),
        setup.log_text()
    );

    // The old relay exits once its pairs have ended; the new one serves alone.
    eventually_within(
        "the old relay to exit",
        PATIENCE * 2,
        || std::future::ready(old.0.try_wait().unwrap().is_some()),
        || format!("log:\n{}", setup.log_text()),
    )
    .await;
    assert!(alive(new_pid), "log:\n{}", setup.log_text());
    assert_eq!(setup.q().await, q, "the label kept its client port");
    let data = payload(9, 1);
    assert!(matches!(echo_exchange(q, &data).await, Exchange::Ok { .. }));
    // The relays' log, on demand (to see the sequence).
    if std::env::var_os("HOT_RESTART_LOG").is_some() {
        eprintln!("{}", setup.log_text());
        eprintln!(
            "{}",
            std::fs::read_to_string(setup.dir.join("agent.log")).unwrap_or_default()
        );
    }
    eprintln!(
        "figure: hot restart ({}): {CLIENTS} clients over {:.1} s, 0 failed; {TRANSFERS} \
         transfers of {} MiB byte-exact ({} MiB); swap (trigger to the new relay's READY=1) \
         {:.0} ms; old pid {old_pid} exited, new pid {new_pid} serves",
        match trigger {
            Trigger::Sighup => "SIGHUP",
            Trigger::ByHand => "serve --take-over by hand, shared port and pinned q",
        },
        load_took.as_secs_f64(),
        TRANSFER_BYTES >> 20,
        moved >> 20,
        swap.as_secs_f64() * 1000.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_replaced_by_sighup_fails_no_client_and_cuts_no_transfer() {
    swap_under_load(Trigger::Sighup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_replaced_by_a_second_serve_with_take_over_fails_no_client_and_cuts_no_transfer() {
    swap_under_load(Trigger::ByHand).await;
}

/// Whatever connects to handover.sock without the hello (garbage, or nothing) is closed
/// within the hello deadline, and the relay serves on: the socket stays for a real successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_garbage_or_nothing_to_the_handover_socket_is_closed_and_the_relay_serves_on(
) {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let setup = Setup::new(dir.path(), &home, false);
    let _relay = Owned(setup.spawn(&[]));
    setup.until_ready().await;
    let path = dir
        .path()
        .join("state")
        .join(taas_relay::handover::SOCKET_NAME);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only its user may connect");

    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0u8; 64], b""] {
        let mut peer = UnixStream::connect(&path).await.unwrap();
        peer.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 16];
        let limit = taas_relay::handover::HELLO_TIMEOUT + Duration::from_secs(3);
        let read = tokio::time::timeout(limit, peer.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("still open after {limit:?} with {garbage:?}"));
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(path.exists(), "the hand-over socket stays");
    // Still serving: a 307 for an empty label, metrics ready.
    let mut tls = tls_connect(setup.front, &setup.ca(), REGISTRAR).await;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: home.{DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let response = tokio::time::timeout(PATIENCE, read_response(&mut tls))
        .await
        .unwrap();
    assert!(response.status > 0, "{response:?}");
    assert!(setup.metrics_text().await.contains("taas_"));
}

/// Under systemd (`Type=notify`): the first relay says READY=1; after SIGHUP its successor
/// says MAINPID=<its pid> and READY=1, and the first one exits (no pair to wait for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_from_the_relay_and_mainpid_and_ready_from_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), &TestLabel::new("home"), false);
    let mut old = Owned(setup.spawn(&[]));
    let first = setup.until_ready().await;
    assert_eq!(first, ["READY=1\n"]);
    let status = Command::new("kill")
        .args(["-HUP", &old.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let messages = setup.until_ready().await.concat();
    assert!(messages.contains("RELOADING=1"), "{messages}");
    let new_pid: u32 = messages
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID=")?.parse().ok())
        .unwrap_or_else(|| panic!("MAINPID=: {messages}"));
    let _new = Killed(new_pid);
    assert_ne!(new_pid, old.0.id());
    eventually_within(
        "the old relay to exit",
        PATIENCE,
        || std::future::ready(old.0.try_wait().unwrap().is_some()),
        String::new,
    )
    .await;
    assert!(alive(new_pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_redirected_by_the_old_relay_is_admitted_on_q_by_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("clientAdmission: Redirected");
    let setup = Setup::new(dir.path(), &home, false);
    let _old = Owned(setup.spawn(&[]));
    setup.until_ready().await;
    let _agent = agent_parked(&setup, &home).await;
    // 127.0.0.1 gets its 307 from the old relay, and asks no more.
    let q = setup.q().await;
    let _new = Owned(setup.spawn(&["--take-over"]));
    setup.until_ready().await;
    eventually("the old relay no longer accepts", || async {
        setup.log_text().contains("no longer accepting")
    })
    .await;
    // Only the successor accepts on q now: it admits the source the old relay redirected
    // (once the agent has parked with it), and no other.
    eventually_within(
        "the redirected client served by the successor",
        PATIENCE * 2,
        || async { matches!(echo_exchange(q, b"hello").await, Exchange::Ok { .. }) },
        || format!("log:\n{}", setup.log_text()),
    )
    .await;
    let mut stranger = connect_from("127.0.0.2", q).await;
    let _ = stranger.write_all(b"hello").await;
    assert_closed(&mut stranger).await;
    assert!(
        setup
            .log_text()
            .contains("client admissions handed to the successor sources=1"),
        "log:\n{}",
        setup.log_text()
    );
}
