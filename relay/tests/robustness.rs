//! Robustness (issue 7): churn soak (short), faults (relay killed, agent killed, forwarded
//! service down or slow, a parked peer that vanished), abuse (TOTP guessing, 1,000 slow
//! connections, header floods, q floods, fd exhaustion) and secrets in logs.
//!
//! Every test here runs with the debug log subscriber installed in-process (`logs::debug_logs`)
//! and spawns binaries with `RUST_LOG=debug` (one with `trace`), so nothing depends on quiet
//! logging. The tests run one at a time (`serial`): several measure latency or CPU time.
//! Long runs and privileged tests: see docs/robustness.md.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use taas_testkit::agent::Agent;
use taas_testkit::prelude::*;
use taas_testkit::spawned::{RelaySpec, SpawnedRelay};
use taas_testkit::{echo, logs, property, readings, soak};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_taas-relay");
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_taas-agent");

/// One robustness test at a time, across the runtimes of this binary's tests.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the serial lock and installs the debug capture and the panic counter.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    logs::debug_logs();
    logs::count_panics();
    taas_process::raise_fd_limit();
    guard
}

/// Prints a figure for docs/robustness.md (visible with `--nocapture`).
fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A TLS connection to `front` from a chosen loopback source address.
async fn tls_from(
    source: &str,
    front: SocketAddr,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(front).await.unwrap();
    let config =
        taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca.to_path_buf()))
            .unwrap();
    let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The steward's registration of `label` from `source`, on a new connection.
async fn register_from(
    source: &str,
    front: SocketAddr,
    ca: &Path,
    label: &str,
    authorization: &str,
) -> Response {
    let mut tls = tls_from(source, front, ca).await;
    let request = steward_request(label, front.port(), authorization);
    tls.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut tls).await
}

/// The 8-digit TOTP of `label` now (the relay accepts 6 to 8 digits; 8 digits cannot be
/// mistaken for other numbers when logs are searched).
fn token8(label: &TestLabel) -> String {
    taas_relay::totp::code(
        &label.secret(),
        taas_relay::config::Algorithm::SHA1,
        8,
        30,
        unix_now(),
    )
}

fn auth(id: &str, token: &str) -> String {
    format!("TOTP username=\"{id}\", response=\"{token}\"")
}

/// Asserts that no spelling of any label's secret, and none of `tokens`, is in `logs`.
fn assert_no_secrets(what: &str, logs: &str, labels: &[&TestLabel], tokens: &[String]) {
    assert!(!logs.is_empty(), "{what}: no logs captured");
    let plain = logs::strip_timestamps(logs);
    for label in labels {
        for spelling in logs::secret_spellings(&label.secret_b32, &label.secret()) {
            assert!(
                !logs.contains(&spelling),
                "{what}: the secret of {} ({spelling}) is in the logs",
                label.label
            );
        }
    }
    for token in tokens {
        assert!(
            !logs::contains_number(&plain, token),
            "{what}: token {token} is in the logs"
        );
    }
    for marker in ["response=\"", "TOTP username"] {
        assert!(
            !logs.contains(marker),
            "{what}: an Authorization value ({marker}…) is in the logs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Churn soak.

/// 2,000 checksummed connections through a spawned relay (`RUST_LOG=debug`) while in-process
/// agents are replaced every 100 connections; afterwards the relay's fds are back to their
/// cold baseline, no p port is bound, RSS is back near its warm baseline, and the debug log
/// holds no secret. The 100,000-connection run: `relay/examples/soak.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_soak_short() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = soak::SoakConfig::new(RELAY_BIN, dir.path(), 2_000);
    config.concurrency = 16;
    config.parked = 4;
    config.churn_every = 100;
    config.redirect_every = 50;
    config.rust_log = "debug".into();
    config.max_duration = Duration::from_secs(120);
    let report = soak::soak(config).await;
    eprintln!(
        "churn soak (2,000 connections, debug build):\n{}",
        report.table()
    );
    assert_eq!(report.corrupt, 0, "{}", report.table());
    assert!(report.connections >= 2_000, "{}", report.table());
    assert!(report.agent_restarts >= 15, "{}", report.table());
    assert!(report.relay_pairings >= 1_900.0, "{}", report.table());
    assert!(report.after.fds <= report.cold.fds, "{}", report.table());
    assert!(report.p_listening_after.is_empty(), "{}", report.table());
    assert!(report.p_accepting_after.is_empty(), "{}", report.table());
    let grown = report.after.rss_kib.saturating_sub(report.warm.rss_kib);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB: {}",
        report.table()
    );
    let log = std::fs::read_to_string(&report.relay_log).unwrap();
    let labels: Vec<&TestLabel> = report.labels.iter().collect();
    assert_no_secrets("soak relay log", &log, &labels, &[]);
    assert!(log.contains("DEBUG"), "the relay logged at debug");
    assert_eq!(logs::panics(), 0);
}

// ---------------------------------------------------------------------------------------------
// Faults.

/// A client that streams through q until its connection breaks: 16 KiB out, the same 16 KiB
/// back, again and again. Returns the round trips done and how it ended.
async fn stream_until_broken(q: SocketAddr, seed: u64) -> (u64, String) {
    let Ok(mut stream) = TcpStream::connect(q).await else {
        return (0, "connect failed".into());
    };
    let mut round = 0u64;
    loop {
        let data = echo::payload(seed, round * 13 + 1);
        let chunk = &data[..data.len().min(16 * 1024)];
        let mut back = vec![0u8; chunk.len()];
        let exchange = async {
            stream.write_all(chunk).await?;
            stream.read_exact(&mut back).await?;
            std::io::Result::Ok(())
        };
        match tokio::time::timeout(PATIENCE, exchange).await {
            Ok(Ok(())) => {
                assert_eq!(&back[..], chunk, "corrupted in flight");
                round += 1;
            }
            Ok(Err(e)) => return (round, format!("{:?}", e.kind())),
            Err(_) => return (round, "HANG".into()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// kill -9 of the relay binary while pairs are transferring: every client's connection ends
/// (no hang), the agent notices, and once the relay is back the agent is parked again within
/// 2 s (its `--max-backoff` is 500 ms) and clients get through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_transfers_the_agent_recovers_within_2_s() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 40);
    spec.rust_log = "debug".into();
    spec.metrics = false;
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let mut relay = SpawnedRelay::start(&spec).await;
    let (echo, _echo) = echo_server().await;
    let agent = Agent::start(relay.front, &relay.ca(), &home, echo, 4, |c| {
        c.max_backoff = Duration::from_millis(500);
    });
    agent.wait("4 parked", PATIENCE, |s| s.parked == 4).await;
    let q = SocketAddr::from(([127, 0, 0, 1], relay.q("home").await));
    let streams: Vec<_> = (0..3)
        .map(|i| tokio::spawn(stream_until_broken(q, i)))
        .collect();
    // Transfers under way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    relay.kill();
    for stream in streams {
        let (rounds, end) = tokio::time::timeout(PATIENCE * 2, stream)
            .await
            .expect("a client's connection ends when the relay dies")
            .unwrap();
        assert!(rounds > 0, "the transfer was under way");
        assert_ne!(end, "HANG");
    }
    figure(
        "clients' connections ended after the kill within",
        ms(killed.elapsed()),
    );
    agent.wait("parked lost", PATIENCE, |s| s.parked == 0).await;
    // Down for a while: the agent backs off to its cap.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let spawned = Instant::now();
    let relay = SpawnedRelay::start(&spec).await;
    let up = Instant::now();
    agent
        .wait("parked again", PATIENCE, |s| s.parked >= 1)
        .await;
    let parked = up.elapsed();
    agent
        .wait("4 parked again", PATIENCE, |s| s.parked == 4)
        .await;
    let all = up.elapsed();
    let q = SocketAddr::from(([127, 0, 0, 1], relay.q("home").await));
    let data = echo::payload(7, 7);
    assert!(matches!(
        echo::echo_exchange(q, &data).await,
        echo::Exchange::Ok { .. }
    ));
    let served = up.elapsed();
    figure("relay spawned to front end accepting", ms(up - spawned));
    figure("front end accepting to agent parked again", ms(parked));
    figure("front end accepting to all 4 parked", ms(all));
    figure(
        "front end accepting to a client served (307 + echo)",
        ms(served),
    );
    assert!(
        parked < Duration::from_secs(2),
        "agent recovered {parked:?} after the relay's return"
    );
    assert!(
        served < Duration::from_secs(2),
        "client served after {served:?}"
    );
    assert_no_secrets(
        "relay log (killed/restarted)",
        &relay.log_text(),
        &[&home],
        &[],
    );
    assert_no_secrets(
        "in-process agent (debug)",
        &logs::captured_logs(),
        &[&home],
        &[],
    );
}

/// A relay restart drops every parked connection at once: that is one failure for the
/// agent's backoff, not one per connection. With 64 parked (young, so each drop counted as a
/// failure) and pairs under way, the agent used to wait 16-29 s after the relay was back;
/// now it is parked again within 1 s of the relay accepting, restart after restart, with the
/// default backoff cap (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_each_relay_restart_an_agent_with_64_parked_is_back_within_1_s() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("maxParked: 64");
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 100);
    spec.metrics = false;
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let mut relay = SpawnedRelay::start(&spec).await;
    let (echo, _echo) = echo_server().await;
    // The harness's agents cap their backoff at 500 ms; this one has the real default (30 s).
    let agent = Agent::start(relay.front, &relay.ca(), &home, echo, 64, |c| {
        c.max_backoff = taas_relay::agent::DEFAULT_MAX_BACKOFF;
    });
    agent.wait("64 parked", PATIENCE, |s| s.parked == 64).await;
    for restart in 1..=3 {
        let q = SocketAddr::from(([127, 0, 0, 1], relay.q("home").await));
        let streams: Vec<_> = (0..4)
            .map(|i| tokio::spawn(stream_until_broken(q, restart * 10 + i)))
            .collect();
        // The four pairs are spliced at the agent: transfers under way when the relay dies.
        agent
            .wait("pairs under way", PATIENCE, |s| s.pairs_active >= 4)
            .await;
        relay.kill();
        for stream in streams {
            let (_, end) = tokio::time::timeout(PATIENCE * 2, stream)
                .await
                .expect("a client's connection ends when the relay dies")
                .unwrap();
            assert_ne!(end, "HANG");
        }
        relay = SpawnedRelay::start(&spec).await;
        let up = Instant::now();
        agent
            .wait("parked again", PATIENCE * 3, |s| s.parked >= 1)
            .await;
        let first = up.elapsed();
        agent
            .wait("64 parked again", PATIENCE * 3, |s| s.parked == 64)
            .await;
        let all = up.elapsed();
        figure(
            &format!(
                "restart {restart}: relay accepting to the agent parked again (first, all 64)"
            ),
            format!("{} ms, {} ms", first.as_millis(), all.as_millis()),
        );
        assert!(
            all < Duration::from_secs(1),
            "restart {restart}: 64 parked again {all:?} after the relay's return"
        );
    }
}

/// An agent killed outright (its task dropped: every socket closes at once): its parked
/// connections leave the relay's pool at once, a pair it carried ends for the client, new
/// clients get a clean 503 from the front end or a close on q after the client wait, never a
/// hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_the_pool_at_once_and_clients_get_503_or_a_close() {
    let _serial = serial().await;
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.client_wait = Duration::from_millis(500);
    })
    .await;
    let (echo, _echo) = echo_server().await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, echo, 4, |_| {});
    relay.wait_parked("home", 4).await;
    let mut paired = relay.client("home").await;
    echo_roundtrip(&mut paired, b"before the kill").await;
    relay.wait_parked("home", 4).await; // replaced

    let killed = Instant::now();
    agent.kill();
    relay.wait_parked("home", 0).await;
    let left = killed.elapsed();
    figure(
        "killed agent: parked connections left the pool after",
        ms(left),
    );
    assert!(left < Duration::from_secs(1), "{left:?}");
    // The pair it carried ends for the client (EOF or reset), promptly.
    let ended = Instant::now();
    assert_closed(&mut paired).await;
    figure(
        "killed agent: its pair's client closed after",
        ms(ended.elapsed()),
    );

    let response = relay.mobile_get("home", "/").await;
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());
    let waited = Instant::now();
    let mut client = relay.client("home").await;
    client.write_all(b"anyone there?").await.unwrap();
    assert_closed(&mut client).await;
    let waited = waited.elapsed();
    figure("killed agent: a client on q closed after", ms(waited));
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3));
    assert_no_secrets("in-process (debug)", &logs::captured_logs(), &[&home], &[]);
}

/// A service that echoes, except for connections whose first bytes are `SLOW`: those it
/// stops reading for `stall`, then closes.
async fn slow_or_echo_service(stall: Duration) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                if &first == b"SLOW" {
                    tokio::time::sleep(stall).await;
                    return;
                }
                let _ = s.write_all(&first).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// The forwarded service down: the client is closed cleanly (EOF, not a reset, not a hang).
/// The service slow for some pairs: the other pairs, on the same agent and label, are not
/// slowed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_service_down_or_slow_affects_only_its_own_pairs() {
    let _serial = serial().await;
    let down = TestLabel::new("down");
    let ok = TestLabel::new("ok");
    let relay = TestRelay::start(&[&down, &ok]).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let (service, _service) = slow_or_echo_service(Duration::from_secs(3)).await;
    let _agent_down = Agent::start(relay.addr(), relay.ca(), &down, nowhere, 2, |_| {});
    let _agent_ok = Agent::start(relay.addr(), relay.ca(), &ok, service, 6, |_| {});
    relay.wait_parked("down", 2).await;
    relay.wait_parked("ok", 6).await;

    // Down: the client's bytes go nowhere; it gets a clean EOF.
    for _ in 0..3 {
        let mut client = relay.client("down").await;
        client.write_all(b"hello?").await.unwrap();
        let mut buf = [0u8; 16];
        let started = Instant::now();
        let read = tokio::time::timeout(PATIENCE, client.read(&mut buf))
            .await
            .expect("closed, not hung");
        assert_eq!(read.expect("a clean close, not a reset"), 0);
        figure(
            "forward down: client closed cleanly after",
            ms(started.elapsed()),
        );
    }

    // Slow: three pairs stall (their service stops reading while they push 1 MiB each)...
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut client = relay.client("ok").await;
        client.write_all(b"SLOW").await.unwrap();
        let pushing = tokio::spawn(async move {
            let _ = tokio::time::timeout(PATIENCE, client.write_all(&vec![b'x'; 1 << 20])).await;
            client
        });
        stalled.push(pushing);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...while 30 other clients of the same label and agent round-trip as usual.
    let mut worst = Duration::ZERO;
    for i in 0..30u64 {
        let data = echo::payload(11, i);
        let started = Instant::now();
        let exchange =
            echo::echo_exchange(SocketAddr::from(([127, 0, 0, 1], relay.q("ok"))), &data).await;
        assert!(
            matches!(exchange, echo::Exchange::Ok { .. }),
            "{exchange:?}"
        );
        worst = worst.max(started.elapsed());
    }
    figure("slow service: worst other-pair round trip", ms(worst));
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    for pushing in stalled {
        pushing.abort();
    }
    assert_no_secrets(
        "in-process (debug)",
        &logs::captured_logs(),
        &[&down, &ok],
        &[],
    );
}

/// A parked connection whose peer silently vanishes (its network namespace's link goes down:
/// no FIN, no RST) is dropped by the relay's TCP keepalive. Needs root (ip netns, veth) and
/// about a minute: `cargo test -p taas-relay --test robustness -- --ignored vanished`.
///
/// The relay's keepalive (`label::tune`: 30 s idle, then 3 probes 10 s apart) drops such a
/// connection about 60 s after its last packet. Issue 7 asks for 45 s; the test measures and
/// reports the time and asserts the bound the current settings give (`TAAS_VANISH_BOUND_S`,
/// default 65). See docs/robustness.md for the proposed change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and about a minute"]
async fn vanished_parked_peer_is_dropped_by_keepalive() {
    let _serial = serial().await;
    let ns = NetNs::create();
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.listen = SocketAddr::new(ns.host_ip.parse().unwrap(), 0);
    })
    .await;
    // The hidden server: the real agent binary, inside the namespace.
    let secret_file = relay.dir.path().join("secret");
    std::fs::write(&secret_file, &home.secret_b32).unwrap();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &ns.name, AGENT_BIN])
        .args([
            "--relay",
            &format!("https://{REGISTRAR}:{}", relay.addr().port()),
        ])
        .args(["--connect", &relay.addr().to_string()])
        .arg("--ca")
        .arg(relay.ca())
        .args(["--id", &home.id, "--label", &home.label])
        .arg("--secret-file")
        .arg(&secret_file)
        .args(["--forward", "127.0.0.1:9", "--parked", "3"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    relay.wait_parked("home", 3).await;
    // Let the agent finish registering (its last packets), then cut the link silently.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ns.run(&["ip", "link", "set", &ns.inner_if, "down"]);
    let cut = Instant::now();
    let bound = Duration::from_secs(property::env_u64("TAAS_VANISH_BOUND_S").unwrap_or(45));
    let mut dropped = None;
    while cut.elapsed() < bound + Duration::from_secs(10) {
        if relay.parked("home") == 0 {
            dropped = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let dropped = dropped.expect("the relay never dropped the vanished peer's connections");
    figure(
        "vanished peer: parked connections dropped after",
        ms(dropped),
    );
    figure(
        "vanished peer: within issue 7's 45 s",
        dropped <= Duration::from_secs(45),
    );
    assert!(
        dropped <= bound,
        "dropped after {dropped:?}, bound {bound:?}"
    );
}

use std::process::{Command, Stdio};

/// A network namespace with a veth pair: `host_ip` on this side, `inner_ip` inside. Removed
/// on drop (the veth pair goes with it).
struct NetNs {
    name: String,
    host_if: String,
    inner_if: String,
    host_ip: String,
}

impl NetNs {
    fn create() -> Self {
        let id = std::process::id() % 10_000;
        let octet = 10 + (id % 200);
        let ns = NetNs {
            name: format!("taas-rb-{id}"),
            host_if: format!("trb{id}h"),
            inner_if: format!("trb{id}n"),
            host_ip: format!("10.231.{octet}.1"),
        };
        let inner_ip = format!("10.231.{octet}.2");
        let sh = |args: &[&str]| {
            let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(status.success(), "{args:?} (root and iproute2 needed)");
        };
        sh(&["ip", "netns", "add", &ns.name]);
        sh(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_if,
        ]);
        sh(&["ip", "link", "set", &ns.inner_if, "netns", &ns.name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        sh(&["ip", "link", "set", &ns.host_if, "up"]);
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{inner_ip}/30"),
            "dev",
            &ns.inner_if,
        ]);
        ns.run(&["ip", "link", "set", &ns.inner_if, "up"]);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn run(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "in {}: {args:?}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Abuse.

/// Guessing spread over many sources (each below the per-source limit) blocks the ID with 429
/// + Retry-After for every source but the genuine server's, which keeps registering; a source
/// guessing across IDs is blocked for all of them. (registration.rs covers one source guessing
/// one ID.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_guessing_is_limited_per_id_and_per_source_while_the_genuine_server_registers() {
    let _serial = serial().await;
    let home = TestLabel::new("home").with("maxParked: 200");
    let relay = TestRelay::start(&[&home]).await;
    let (front, ca) = (relay.addr(), relay.ca().to_path_buf());
    let mut tokens = vec![token8(&home)];
    let genuine = register_from("127.0.0.1", front, &ca, "home", &auth(&home.id, &tokens[0])).await;
    assert_eq!(genuine.status, 200);

    // Per ID: 6 sources, 5 wrong guesses each (the per-source limit is 10).
    let mut statuses = Vec::new();
    for source in 20..26 {
        for guess in 0..5u32 {
            let token = format!("{:08}", 10_000_000 + source * 100 + guess);
            tokens.push(token.clone());
            let r = register_from(
                &format!("127.0.0.{source}"),
                front,
                &ca,
                "home",
                &auth(&home.id, &token),
            )
            .await;
            if r.status == 429 {
                let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=120).contains(&retry), "{r:?}");
            }
            statuses.push(r.status);
        }
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    let first_429 = statuses
        .iter()
        .position(|s| *s == 429)
        .expect("the ID got blocked");
    figure("per-ID limit: first 429 after failures", first_429);
    // A new source with the right token is refused while the ID is blocked...
    let r = register_from(
        "127.0.0.40",
        front,
        &ca,
        "home",
        &auth(&home.id, &token8(&home)),
    )
    .await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some());
    // ...and the genuine server keeps registering, on new connections.
    for _ in 0..3 {
        let token = token8(&home);
        tokens.push(token.clone());
        let r = register_from("127.0.0.1", front, &ca, "home", &auth(&home.id, &token)).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Per source: one source guessing 12 unknown IDs is then blocked for a real one too.
    for i in 0..12 {
        let r = register_from(
            "127.0.0.50",
            front,
            &ca,
            "home",
            &auth(&format!("nobody-{i}"), "12345678"),
        )
        .await;
        assert!(r.status == 401 || r.status == 429, "{r:?}");
    }
    let other = TestLabel::new("other");
    write_label(&relay.labels_dir, &other);
    eventually("label other loaded", || async {
        relay.standalone.relay.label("other").is_some()
    })
    .await;
    let r = register_from(
        "127.0.0.50",
        front,
        &ca,
        "other",
        &auth(&other.id, &token8(&other)),
    )
    .await;
    assert_eq!(r.status, 429, "{r:?}");
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_registrations_total{label=\"home\",kind=\"rate_limited\"}"),
        "{metrics}"
    );
    assert_no_secrets(
        "in-process (debug)",
        &logs::captured_logs(),
        &[&home, &other],
        &tokens,
    );
}

/// A registration on a new TLS connection from 127.0.0.1; its latency.
async fn timed_registration(relay: &TestRelay, label: &TestLabel) -> Duration {
    let started = Instant::now();
    let response = relay.put(&label.label, &label.authorization()).await;
    let took = started.elapsed();
    assert_eq!(response.status, 200, "{response:?}");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// 1,000 slow or idle connections to the front end (TCP only, half a TLS ClientHello, and
/// slowloris heads trickling one byte at a time after the handshake) do not delay a
/// registration by more than 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_connections_do_not_delay_a_registration() {
    let _serial = serial().await;
    let home = TestLabel::new("home").with("maxParked: 1024");
    let relay = TestRelay::start(&[&home]).await;
    for _ in 0..3 {
        timed_registration(&relay, &home).await; // warm up
    }
    let mut quiet = Vec::new();
    for _ in 0..10 {
        quiet.push(timed_registration(&relay, &home).await);
    }
    let quiet_median = median(quiet.clone());

    let front = relay.addr();
    // 300 slowloris: handshake done, a request head that never ends, a byte at a time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loris = Vec::new();
    let handshakes = Instant::now();
    for batch in 0..6 {
        let mut pending = Vec::new();
        for _ in 0..50 {
            let ca = relay.ca().to_path_buf();
            pending.push(tokio::spawn(async move {
                tls_connect(front, &ca, REGISTRAR).await
            }));
        }
        for (i, p) in pending.into_iter().enumerate() {
            let mut tls = p.await.unwrap();
            let stop = stop.clone();
            let delay = Duration::from_millis(200 + ((batch * 50 + i) % 50) as u64 * 10);
            loris.push(tokio::spawn(async move {
                let head = format!("PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nX-Slow: ");
                for byte in head.bytes().chain(std::iter::repeat(b'a')).take(200) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                        || tls.write_all(&[byte]).await.is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                }
                tls
            }));
        }
    }
    let mut idle = Vec::new();
    // 400 TCP connections that never say anything.
    for i in 0..400 {
        let source = format!("127.0.1.{}", 1 + i % 200);
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        idle.push(socket.connect(front).await.unwrap());
    }
    // 300 with the first bytes of a TLS ClientHello (a record announcing 512 bytes).
    for _ in 0..300 {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
        idle.push(s);
    }
    figure(
        "slow connections opened (1,000) in",
        ms(handshakes.elapsed()),
    );
    let mut loaded = Vec::new();
    for _ in 0..10 {
        loaded.push(timed_registration(&relay, &home).await);
    }
    let (loaded_median, loaded_max) = (median(loaded.clone()), *loaded.iter().max().unwrap());
    // The slow connections were all still open while we measured.
    let mut still_open = 0;
    for s in &idle {
        let mut buf = [0u8; 1];
        if matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            still_open += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loris {
        let _ = l.await;
    }
    figure("registration latency, quiet (median)", ms(quiet_median));
    figure(
        "registration latency, 1,000 slow connections open (median)",
        ms(loaded_median),
    );
    figure(
        "registration latency, 1,000 slow connections open (max)",
        ms(loaded_max),
    );
    figure(
        "idle connections still open during the measurement",
        still_open,
    );
    assert_eq!(still_open, idle.len());
    assert!(
        loaded_max <= quiet_median + Duration::from_millis(100),
        "quiet {quiet:?}, with 1,000 slow connections {loaded:?}"
    );
}

/// Floods of header lines, one endless header line, thousands of headers, huge bodies and
/// URIs, on 200 connections at once to a spawned relay: each gets 400/413/414/431 or a close,
/// the relay's RSS stays bounded, and it keeps registering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_and_oversized_requests_get_4xx_with_bounded_memory() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("maxParked: 100");
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 40);
    spec.rust_log = "debug".into();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let relay = std::sync::Arc::new(SpawnedRelay::start(&spec).await);
    let register = |relay: std::sync::Arc<SpawnedRelay>, home: TestLabel| async move {
        relay
            .request(&steward_request(
                "home",
                relay.front.port(),
                &home.authorization(),
            ))
            .await
    };
    assert_eq!(register(relay.clone(), home.clone()).await.status, 200);
    let before = relay.stats();

    let floods: Vec<(&str, Vec<u8>)> = vec![
        ("header lines", {
            let mut b =
                format!("PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\n").into_bytes();
            while b.len() < 1 << 20 {
                b.extend_from_slice(
                    format!("X-Flood-{}: {}\r\n", b.len(), "v".repeat(100)).as_bytes(),
                );
            }
            b
        }),
        ("one endless line", {
            let mut b = b"PUT /register/home HTTP/1.1\r\nX-Endless: ".to_vec();
            b.resize(1 << 20, b'z');
            b
        }),
        ("10,000 headers", {
            let mut b = format!("GET / HTTP/1.1\r\nHost: {REGISTRAR}\r\n").into_bytes();
            for i in 0..10_000 {
                b.extend_from_slice(format!("h{i}: x\r\n").as_bytes());
            }
            b.extend_from_slice(b"\r\n");
            b
        }),
        ("huge URI", {
            let mut b = b"GET /".to_vec();
            b.resize(200 * 1024, b'u');
            b.extend_from_slice(format!(" HTTP/1.1\r\nHost: {REGISTRAR}\r\n\r\n").as_bytes());
            b
        }),
        ("100 MiB body announced", {
            let mut b = format!(
                "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nContent-Length: 104857600\r\n\r\n"
            )
            .into_bytes();
            b.resize(b.len() + (1 << 20), b'b');
            b
        }),
        ("chunked body", {
            let mut b = format!(
                "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            while b.len() < 1 << 20 {
                b.extend_from_slice(b"1000\r\n");
                b.extend_from_slice(&[b'c'; 0x1000]);
                b.extend_from_slice(b"\r\n");
            }
            b
        }),
    ];
    let floods = std::sync::Arc::new(floods);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before.rss_kib));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (relay, peak, sampling) = (relay.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(s) = readings::ProcStats::read(relay.pid()) {
                    peak.fetch_max(s.rss_kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let (relay, floods) = (relay.clone(), floods.clone());
        tasks.push(tokio::spawn(async move {
            let (what, bytes) = &floods[i % floods.len()];
            let mut tls = tls_connect(relay.front, &relay.ca(), REGISTRAR).await;
            let (mut r, mut w) = tokio::io::split(&mut tls);
            let write = async {
                for chunk in bytes.chunks(16 * 1024) {
                    if w.write_all(chunk).await.is_err() {
                        break;
                    }
                }
            };
            let read = async {
                let mut got = Vec::new();
                let _ = tokio::time::timeout(PATIENCE, r.read_to_end(&mut got)).await;
                got
            };
            let (_, got) = tokio::join!(write, read);
            let text = String::from_utf8_lossy(&got);
            let status: Option<u16> = text
                .strip_prefix("HTTP/1.1 ")
                .and_then(|t| t.get(..3))
                .and_then(|s| s.parse().ok());
            (what.to_string(), status)
        }));
    }
    let mut answers = std::collections::BTreeMap::<(String, Option<u16>), usize>::new();
    for task in tasks {
        let (what, status) = task.await.unwrap();
        if let Some(s) = status {
            assert!([400, 413, 414, 431].contains(&s), "{what}: {s}");
        }
        *answers.entry((what, status)).or_default() += 1;
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    figure(
        "floods: 200 connections × ~1 MiB sent, answered in",
        ms(started.elapsed()),
    );
    figure("floods: answers (None = closed)", format!("{answers:?}"));
    figure(
        "floods: relay RSS before / peak (MiB)",
        format!(
            "{:.1} / {:.1}",
            before.rss_kib as f64 / 1024.0,
            peak as f64 / 1024.0
        ),
    );
    assert!(
        peak.saturating_sub(before.rss_kib) < 64 * 1024,
        "RSS grew from {} to {peak} KiB",
        before.rss_kib
    );
    assert_eq!(register(relay.clone(), home.clone()).await.status, 200);
    assert_no_secrets("relay log (floods)", &relay.log_text(), &[&home], &[]);
}

/// With `clientAdmission: Redirected`, 1,000 connections to q from a source that never got a
/// 307 are all closed and take none of the parked connections; a redirected client is then
/// paired as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_q_flood_without_a_307_cannot_drain_a_label_with_admission() {
    let _serial = serial().await;
    let home = TestLabel::new("home").with("clientAdmission: Redirected");
    let relay = TestRelay::start(&[&home]).await;
    let mut hidden = Vec::new();
    for _ in 0..4 {
        hidden.push(relay.park(&home).await);
    }
    let q = SocketAddr::from(([127, 0, 0, 1], relay.q("home")));
    let started = Instant::now();
    for batch in 0..4 {
        let mut flood = Vec::new();
        for i in 0..250 {
            flood.push(tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                let source = format!("127.0.2.{}", 1 + (batch * 250 + i) % 250);
                socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
                let mut s = socket.connect(q).await.unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(PATIENCE, s.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            }));
        }
        for f in flood {
            assert!(f.await.unwrap(), "a flood connection was not closed");
        }
    }
    figure(
        "q flood: 1,000 unadmitted connections closed in",
        ms(started.elapsed()),
    );
    assert_eq!(relay.parked("home"), 4, "the flood took parked connections");
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_clients_refused_total{label=\"home\",kind=\"not_admitted\"} 1000"),
        "{metrics}"
    );
    assert_eq!(relay.mobile_get("home", "/").await.status, 307);
    let mut client = relay.client("home").await;
    client.write_all(b"admitted").await.unwrap();
    let mut hidden = hidden.pop().unwrap(); // the newest is paired first
    let mut got = [0u8; 8];
    tokio::time::timeout(PATIENCE, hidden.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"admitted");
}

/// `taas-relay serve` raises its soft open-file limit to the hard limit at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fd_limit_is_raised_at_start() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 10);
    spec.ulimit = "ulimit -Sn 256; ulimit -Hn 4096".into();
    spec.metrics = false;
    spec.rust_log = "debug".into();
    let relay = SpawnedRelay::start(&spec).await;
    let (soft, hard) = readings::fd_limits(relay.pid());
    figure(
        "relay started with soft 256 / hard 4096: now soft / hard",
        format!("{soft} / {hard}"),
    );
    assert_eq!((soft.as_str(), hard.as_str()), ("4096", "4096"));
    assert!(
        relay.log_text().contains("open-file limit"),
        "{}",
        relay.log_text()
    );
}

/// With its fds exhausted (`ulimit -n 48`, then 150 connections held open), the relay's accept
/// loops back off instead of spinning (little CPU over 2 s), and it serves again once the
/// connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_back_off_and_the_relay_recovers() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 10);
    spec.ulimit = "ulimit -Sn 48; ulimit -Hn 48".into();
    spec.metrics = false;
    spec.rust_log = "debug".into();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let relay = SpawnedRelay::start(&spec).await;
    let q = {
        // q is allocated from the range: find the one listening.
        let ports = readings::listening_ports(relay.q_ports.lo, relay.q_ports.hi);
        assert_eq!(ports.len(), 1, "{ports:?}");
        SocketAddr::from(([127, 0, 0, 1], ports[0]))
    };
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(TcpStream::connect(relay.front).await.unwrap());
    }
    for _ in 0..30 {
        held.push(TcpStream::connect(q).await.unwrap());
    }
    eventually("the relay runs out of fds", || async {
        relay.log_text().contains("accept failed")
    })
    .await;
    let fds = relay.stats().fds;
    let before = readings::cpu_ticks(relay.pid()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = readings::cpu_ticks(relay.pid()).unwrap() - before;
    figure("fd exhaustion: relay fds (limit 48)", fds);
    figure(
        "fd exhaustion: relay CPU over 2 s",
        format!("{:.2} s", used as f64 / 100.0),
    );
    assert!(
        used < 40,
        "the relay used {used} ticks in 2 s: spinning on accept errors?"
    );
    drop(held);
    let recovered = Instant::now();
    let deadline = recovered + PATIENCE * 2;
    loop {
        let attempt = relay
            .try_request(&steward_request(
                "home",
                relay.front.port(),
                &home.authorization(),
            ))
            .await;
        if attempt == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not recover: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    figure(
        "fd exhaustion: registered again after the connections went, in",
        ms(recovered.elapsed()),
    );
    let warnings = relay.log_text().matches("accept failed").count();
    figure("fd exhaustion: accept-failure warnings logged", warnings);
}

// ---------------------------------------------------------------------------------------------
// Secrets in logs.

/// Runs the relay and the agent binaries at `level`, exercises every path that handles a
/// secret or a token, and returns both logs, the tokens used, and the labels.
async fn run_binaries_and_collect_logs(
    level: &str,
) -> (String, String, Vec<String>, Vec<TestLabel>) {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("maxParked: 64");
    let mut spec = RelaySpec::new(RELAY_BIN, dir.path(), 40);
    spec.rust_log = level.into();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let relay = SpawnedRelay::start(&spec).await;
    let (echo, _echo) = echo_server().await;
    let mut tokens = Vec::new();
    let started = unix_now();

    // The agent binary, secret from the environment (8-digit tokens: --digits 8).
    let agent_log = dir.path().join("agent.log");
    let mut agent = Command::new(AGENT_BIN)
        .args([
            "--relay",
            &format!("https://{REGISTRAR}:{}", relay.front.port()),
        ])
        .args(["--connect", &relay.front.to_string()])
        .arg("--ca")
        .arg(relay.ca())
        .args([
            "--id", &home.id, "--label", "home", "--digits", "8", "--parked", "3",
        ])
        .args(["--forward", &echo.to_string(), "--max-backoff", "1"])
        .env("TAAS_SECRET", &home.secret_b32)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let q = SocketAddr::from(([127, 0, 0, 1], relay.q("home").await));
    // Pairs through the agent.
    for i in 0..5 {
        let data = echo::payload(5, i);
        assert!(matches!(
            echo::echo_exchange(q, &data).await,
            echo::Exchange::Ok { .. }
        ));
    }
    let (front, ca) = (relay.front, relay.ca());
    // A valid registration, wrong tokens (from another source, so the agent is not blocked),
    // malformed headers, another scheme carrying the secret.
    let token = token8(&home);
    tokens.push(token.clone());
    assert_eq!(
        register_from("127.0.0.1", front, &ca, "home", &auth(&home.id, &token))
            .await
            .status,
        200
    );
    for guess in 0..12u32 {
        let token = format!("{:08}", 31_000_000 + guess * 7);
        tokens.push(token.clone());
        let r = register_from("127.0.0.30", front, &ca, "home", &auth(&home.id, &token)).await;
        assert!(r.status == 401 || r.status == 429);
    }
    let token = token8(&home);
    tokens.push(token.clone());
    for header in [
        format!("TOTP username=\"{}\", response=\"{token}x\"", home.id),
        format!("TOTP username=\"{}\" response={token}{token}", home.id),
        format!("Basic {}", home.secret_b32),
        format!("TOTP {}", home.secret_b32),
    ] {
        let r = register_from("127.0.0.31", front, &ca, "home", &header).await;
        assert!([400, 401, 429].contains(&r.status), "{r:?}");
    }
    // A mobile client's 307.
    let r = relay
        .request(&format!(
            "GET /x HTTP/1.1\r\nHost: home.{DOMAIN}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status, 307);
    // Reloads: a new secret for the label, then a Secret in the wrong shape (its value where a
    // map belongs), then a label file that does not parse.
    let mut rotated = home.clone();
    rotated.secret_b32 = TestLabel::new("x").secret_b32;
    write_label(&dir.path().join("labels"), &rotated);
    let broken = TestLabel::new("broken");
    std::fs::write(
        dir.path().join("labels/broken.yaml"),
        broken
            .manifest()
            .replace("stringData:\n  secret: ", "stringData: "),
    )
    .unwrap();
    let mut unparsable = TestLabel::new("unparsable");
    unparsable.secret_b32 = TestLabel::new("y").secret_b32;
    std::fs::write(
        dir.path().join("labels/unparsable.yaml"),
        unparsable
            .manifest()
            .replace("stringData:", "stringData: ["),
    )
    .unwrap();
    eventually("reloads logged", || async {
        let log = relay.log_text();
        log.contains("broken.yaml") && log.contains("unparsable.yaml")
    })
    .await;
    // The agent, now refused (its secret was rotated), says why: the relay closed what it had
    // parked with the old secret, so it registers again at once.
    eventually("the rotation applied", || async {
        relay.log_text().contains("label updated")
    })
    .await;
    eventually("the agent notices the rotation", || async {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("401")
            || std::fs::read_to_string(&agent_log)
                .unwrap_or_default()
                .contains("wrong secret")
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    // Every token the agent could have computed while it ran.
    let ended = unix_now();
    for t in (started.saturating_sub(60)..=ended + 60).step_by(30) {
        for label in [&home, &rotated] {
            tokens.push(taas_relay::totp::code(
                &label.secret(),
                taas_relay::config::Algorithm::SHA1,
                8,
                30,
                t,
            ));
        }
    }
    let relay_log = relay.log_text();
    let agent_text = std::fs::read_to_string(&agent_log).unwrap();
    (
        relay_log,
        agent_text,
        tokens,
        vec![home, rotated, broken, unparsable],
    )
}

/// Secrets and tokens never appear in the relay's or the agent's logs, at debug (and at trace,
/// where hyper and rustls log too): neither the base32 secret nor its bytes, nor any token,
/// nor an Authorization value, whatever path the request took (200, 401, 429, 400, reloads
/// of a rotated secret, a Secret written in the wrong shape).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_appear_in_logs() {
    let _serial = serial().await;
    for level in ["debug", "trace"] {
        let (relay_log, agent_log, tokens, labels) = run_binaries_and_collect_logs(level).await;
        let labels: Vec<&TestLabel> = labels.iter().collect();
        figure(
            &format!("logs at {level}: relay / agent"),
            format!(
                "{} / {} lines",
                relay_log.lines().count(),
                agent_log.lines().count()
            ),
        );
        assert!(
            relay_log.contains(" DEBUG ") || relay_log.contains("DEBUG"),
            "{level}"
        );
        if level == "trace" {
            assert!(relay_log.contains("TRACE"), "trace logging was on");
        }
        assert_no_secrets(
            &format!("relay log at {level}"),
            &relay_log,
            &labels,
            &tokens,
        );
        assert_no_secrets(
            &format!("agent log at {level}"),
            &agent_log,
            &labels,
            &tokens,
        );
    }
    assert_no_secrets("in-process capture", &logs::captured_logs(), &[], &[]);
}
