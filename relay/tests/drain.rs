//! Graceful stop of a relay (issue 16, item 1), on a real `label-relay` process and real
//! signals: on SIGTERM it turns unready, refuses registrations with 503, gives its parked
//! connections back, lets active pairs finish, and exits as soon as the last one ends or at
//! `--drain-timeout` (cutting what is left). A second signal stops it at once.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use taas_testkit::ports::own_ports;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `label-relay` process; killed if the test ends with it still running.
struct Relay {
    child: Child,
    control: String,
    metrics: String,
    client: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    /// Starts the label relay for `label` with `--drain-timeout drain`; returns once it is
    /// ready.
    async fn start(dir: &Path, label: &TestLabel, drain: &str) -> Self {
        let (label_file, secret_dir) = mount_label(dir, label);
        let (p, q) = own_ports(4);
        let [client, control, metrics] = [q.lo, q.lo + 1, q.lo + 2];
        let child = Command::new(env!("CARGO_BIN_EXE_taas-relay"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .arg("label-relay")
            .arg("--label-file")
            .arg(&label_file)
            .arg("--secret-dir")
            .arg(&secret_dir)
            .args(["--control", &format!("127.0.0.1:{control}")])
            .args(["--p-ports", &format!("{}-{}", p.lo, p.hi)])
            .args(["--client-port", &client.to_string()])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--drain-timeout", drain])
            .spawn()
            .unwrap();
        let relay = Self {
            child,
            control: format!("127.0.0.1:{control}"),
            metrics: format!("127.0.0.1:{metrics}"),
            client: format!("127.0.0.1:{client}"),
        };
        eventually("the relay is ready", || relay.readyz_is(200)).await;
        relay
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn readyz_is(&self, status: u16) -> bool {
        let Ok(mut stream) = TcpStream::connect(&self.metrics).await else {
            return false;
        };
        let request = "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut text = String::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text)).await;
        read.is_ok() && text.split(' ').nth(1) == Some(&status.to_string())
    }

    async fn metrics_text(&self) -> String {
        let mut stream = TcpStream::connect(&self.metrics).await.unwrap();
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        String::from_utf8(read_to_end(&mut stream).await).unwrap()
    }

    /// One registration on the control port (unauthenticated: the relay was started without
    /// a gateway token).
    async fn register(&self, label: &TestLabel) -> Response {
        let mut stream = TcpStream::connect(&self.control).await.unwrap();
        let port = self.control.rsplit_once(':').unwrap().1.parse().unwrap();
        let request = steward_request(&label.label, port, &label.authorization());
        stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(PATIENCE, read_response(&mut stream))
            .await
            .expect("an answer to the registration")
    }

    /// Registers and connects to the rendezvous port as the hidden server; returns once the
    /// connection is parked.
    async fn park(&self, label: &TestLabel) -> TcpStream {
        let before = metric(&self.metrics_text().await, "taas_parked{label=\"home\"}");
        let answer = self.register(label).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let server = TcpStream::connect(answer.body_str()).await.unwrap();
        eventually("the connection is parked", || async {
            metric(&self.metrics_text().await, "taas_parked{label=\"home\"}") > before
        })
        .await;
        server
    }

    /// A client on q paired with a parked connection (`server`): the first bytes cross.
    async fn pair(&self, server: &mut TcpStream) -> TcpStream {
        let mut client = TcpStream::connect(&self.client).await.unwrap();
        exchange(&mut client, server, b"hello").await;
        client
    }

    /// Waits (bounded) for the process to exit by itself.
    fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the relay still runs after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// `data` from `from` arrives intact at `to`, then comes back the other way.
async fn exchange(from: &mut TcpStream, to: &mut TcpStream, data: &[u8]) {
    from.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    tokio::time::timeout(PATIENCE, to.read_exact(&mut got))
        .await
        .expect("bytes across the pair")
        .unwrap();
    assert_eq!(got, data);
    to.write_all(&got).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(PATIENCE, from.read_exact(&mut back))
        .await
        .expect("bytes back across the pair")
        .unwrap();
    assert_eq!(back, data);
}

/// The peer closed (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn a_draining_relay_turns_unready_refuses_registrations_and_lets_its_pair_finish_then_exits()
{
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let mut relay = Relay::start(dir.path(), &home, "30").await;
    let mut server = relay.park(&home).await;
    let mut client = relay.pair(&mut server).await;
    // A client waiting for a parked connection that will not come.
    let mut waiting = TcpStream::connect(&relay.client).await.unwrap();
    waiting.write_all(b"anyone?").await.unwrap();

    let signalled = Instant::now();
    relay.signal("TERM");
    eventually("/readyz answers 503", || relay.readyz_is(503)).await;
    // Unready came first: the pair is still whole.
    exchange(&mut client, &mut server, b"still here").await;

    let answer = relay.register(&home).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.header("retry-after").is_some(), "{answer:?}");
    assert!(answer.body_str().contains("stopping"), "{answer:?}");
    // Turned away as when nothing is parked, well before its 10 s client wait and before
    // the 5 s hold: nothing is parked or on its way, so there is nothing to hold for.
    closed_within(&mut waiting, Duration::from_secs(2)).await;

    let big = vec![7u8; 256 * 1024];
    exchange(&mut client, &mut server, &big).await;
    assert!(relay.running(), "exited with a pair still open");

    // The last pair ends: the relay exits at once, not after its 30 s timeout.
    client.shutdown().await.unwrap();
    closed_within(&mut server, PATIENCE).await;
    server.shutdown().await.unwrap();
    closed_within(&mut client, PATIENCE).await;
    drop((client, server));
    let status = relay.exit_within(PATIENCE);
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "exited after {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn parked_connections_are_given_back_at_once_and_a_second_signal_stops_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let mut relay = Relay::start(dir.path(), &home, "30").await;
    let mut server = relay.park(&home).await;
    let mut client = relay.pair(&mut server).await;
    let mut parked = relay.park(&home).await;
    // A registration whose hidden server has not connected yet: its port closes too.
    let pending = relay.register(&home).await;
    assert_eq!(pending.status, 200, "{pending:?}");

    relay.signal("TERM");
    // The agent's side sees EOF, so it registers again (elsewhere).
    closed_within(&mut parked, PATIENCE).await;
    eventually("the pending rendezvous port closes", || async {
        TcpStream::connect(pending.body_str()).await.is_err()
    })
    .await;
    eventually("the client port closes", || async {
        TcpStream::connect(&relay.client).await.is_err()
    })
    .await;
    exchange(&mut client, &mut server, b"unhurt").await;
    assert!(relay.running(), "exited with a pair still open");

    let signalled = Instant::now();
    relay.signal("INT");
    relay.exit_within(PATIENCE);
    assert!(signalled.elapsed() < Duration::from_secs(5));
    closed_within(&mut client, PATIENCE).await;
}

#[tokio::test]
async fn a_pair_still_open_at_the_drain_timeout_is_cut_and_the_relay_exits() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let mut relay = Relay::start(dir.path(), &home, "1").await;
    let mut server = relay.park(&home).await;
    let mut client = relay.pair(&mut server).await;

    let signalled = Instant::now();
    relay.signal("TERM");
    let status = relay.exit_within(PATIENCE);
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_secs(1),
        "cut before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "exited only after {took:?}");
    closed_within(&mut client, PATIENCE).await;
    closed_within(&mut server, PATIENCE).await;
}

/// The standalone relay (`serve`) drains the same way, here in-process: its front end keeps
/// answering (registrations get 503), while q, the shared port and the parked connections
/// close; with no pair left, the stop ends at once.
#[tokio::test]
async fn the_standalone_relay_drains_in_process_and_stops_at_once_without_pairs() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| options.shared_port = Some(0)).await;
    let answer = relay.put("home", &home.authorization()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let mut parked = TcpStream::connect(answer.body_str()).await.unwrap();
    relay.wait_parked("home", 1).await;
    let q = relay
        .standalone
        .relay
        .label("home")
        .unwrap()
        .client_port()
        .unwrap();
    let shared = relay.shared_port();

    relay.standalone.drain();
    closed_within(&mut parked, PATIENCE).await;
    let answer = relay.put("home", &home.authorization()).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("2"), "{answer:?}");
    for port in [q, shared] {
        eventually("the client ports close", || async {
            TcpStream::connect(("127.0.0.1", port)).await.is_err()
        })
        .await;
    }
    assert_eq!(relay.standalone.relay.active_pairs(), 0);

    let TestRelay { standalone, .. } = relay;
    let end = tokio::time::timeout(
        PATIENCE,
        standalone.drain_and_stop(Duration::from_secs(30), std::future::pending()),
    )
    .await
    .expect("no pair: the stop ends at once");
    assert_eq!(end, taas_relay::run::DrainEnd::PairsDone);
}
