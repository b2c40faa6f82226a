//! A label relay's edge port (issue 15.3), with the test as the gateway: it writes edge
//! headers (`taas_protocol::edge`) and then the client's or the hidden server's bytes, as a
//! gateway in the cluster's edge mode does. Clients reach the parked hidden server with their
//! ClientHello unchanged; a rendezvous is claimed only for the pinned source and parked only
//! on COMMIT; everything else is closed within the deadlines, counted, and leaves the label
//! serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use taas_protocol::edge::{self, EdgeHeader, EdgeKind};
use taas_relay::config::{Limits, Timeouts};
use taas_relay::gateway_auth::{GatewayToken, InstallSecret, GATEWAY_AUTH_HEADER};
use taas_relay::run::pod::{self as label_relay, LabelRelay, LabelRelayOptions};
use taas_relay::run::StartError;
use taas_testkit::prelude::*;
use taas_testkit::{logs, readings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The hidden server's address as the gateway saw it (127.0.0.2: a source of its own).
const HIDDEN: &str = "127.0.0.2";
/// The external rendezvous ports (the shared range's T) the local p ports map to: p.lo + i →
/// T_BASE + i. Only numbers in headers: nothing listens on them.
const T_BASE: u16 = 40_000;
/// The phone's address the gateway names in a client's header.
const PHONE: &str = "192.0.2.77:50123";

fn token_for(label: &str) -> GatewayToken {
    InstallSecret::new(b"an install secret of this edge test, 32+ bytes")
        .unwrap()
        .token_for(label)
}

/// Short header deadlines, so refusals are quick to observe.
fn timeouts() -> Timeouts {
    Timeouts {
        first_byte: Duration::from_millis(400),
        handshake: Duration::from_millis(900),
        ..Timeouts::default()
    }
}

struct Pod {
    relay: LabelRelay,
    /// Local p ports (in order).
    p_lo: u16,
    client_port: u16,
    token: GatewayToken,
    label: String,
}

async fn start(dir: &Path, label: &TestLabel, trusted: &[&str]) -> Pod {
    start_with(dir, label, trusted, Limits::default()).await
}

async fn start_with(dir: &Path, label: &TestLabel, trusted: &[&str], limits: Limits) -> Pod {
    let options = label_relay_options(dir, label, 8, trusted);
    let (p_ports, client_port) = (options.p_ports, options.client_port);
    // As the operator writes it in edge mode: local p → T, host the gateway's address.
    let external_file = dir.join(&label.label).join("external.yaml");
    let mut external = "host: \"127.0.0.1\"\nports:\n".to_string();
    for (i, local) in p_ports.iter().enumerate() {
        external.push_str(&format!("  {local}: {}\n", T_BASE + i as u16));
    }
    std::fs::write(&external_file, external).unwrap();
    let token = token_for(&label.label);
    let relay = label_relay::start(LabelRelayOptions {
        edge: Some("127.0.0.1:0".parse().unwrap()),
        gateway_token: Some(token.clone()),
        external_file: Some(external_file),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        reload_interval: Duration::from_millis(100),
        timeouts: timeouts(),
        limits,
        ..options
    })
    .await
    .expect("label relay starts");
    Pod {
        relay,
        p_lo: p_ports.lo,
        client_port,
        token,
        label: label.label.clone(),
    }
}

impl Pod {
    fn edge(&self) -> SocketAddr {
        self.relay.edge.expect("the edge port is on")
    }

    fn parked(&self) -> usize {
        self.relay.relay.label(&self.label).unwrap().parked()
    }

    async fn wait_parked(&self, n: usize) {
        eventually(&format!("{n} parked"), || async { self.parked() == n }).await;
    }

    fn header(&self, kind: EdgeKind, source: &str, destination_port: u16) -> EdgeHeader {
        EdgeHeader {
            kind,
            source: source.parse().unwrap(),
            destination: SocketAddr::new([127, 0, 0, 1].into(), destination_port),
            label: self.label.clone(),
            token: self.token.expose().to_string(),
            offer: false,
        }
    }

    /// A new edge connection with `header` written.
    async fn send(&self, header: &EdgeHeader) -> TcpStream {
        let mut stream = TcpStream::connect(self.edge()).await.unwrap();
        stream.write_all(&header.encode()).await.unwrap();
        stream
    }

    /// A registration through the control port as a gateway makes it, for a hidden server at
    /// HIDDEN: returns the external port T from the 200's body.
    async fn register(&self, label: &TestLabel) -> u16 {
        let mut control = TcpStream::connect(self.relay.control).await.unwrap();
        let request = format!(
            "PUT /register/{} HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\n\
             {GATEWAY_AUTH_HEADER}: {}\r\ntaas-client-addr: {HIDDEN}\r\nConnection: close\r\n\r\n",
            label.label,
            label.authorization(),
            self.token.expose()
        );
        control.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut control).await;
        assert_eq!(response.status, 200, "{response:?}");
        let answer: SocketAddr = response.body_str().trim().parse().unwrap();
        assert!(answer.port() >= T_BASE, "the body names T: {answer}");
        answer.port()
    }

    /// A rendezvous claim for T from `source`: the relay's one-byte answer, and the stream.
    async fn claim(&self, source: &str, t: u16) -> (u8, TcpStream) {
        let mut stream = self
            .send(&self.header(EdgeKind::Rendezvous, source, t))
            .await;
        let mut answer = [0u8; 1];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut answer))
            .await
            .expect("an answer within patience")
            .expect("one byte");
        (answer[0], stream)
    }

    /// The hidden server's connection, parked the ordinary way: a registration, then its own
    /// one-shot port from HIDDEN.
    async fn park_directly(&self, label: &TestLabel) -> TcpStream {
        let before = self.parked();
        let t = self.register(label).await;
        let local = self.p_lo + (t - T_BASE);
        let stream = connect_from(HIDDEN, SocketAddr::new([127, 0, 0, 1].into(), local)).await;
        self.wait_parked(before + 1).await;
        stream
    }

    async fn metrics(&self) -> String {
        readings::scrape(self.relay.metrics.unwrap()).await
    }

    /// A normal client on q pairs with a parked connection (`parked`, the hidden server's
    /// side) and bytes flow both ways.
    async fn assert_q_pairs_with(&self, parked: &mut TcpStream) {
        let mut client =
            TcpStream::connect(SocketAddr::new([127, 0, 0, 1].into(), self.client_port))
                .await
                .unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(PATIENCE, parked.read_exact(&mut got))
            .await
            .expect("the hidden server gets the client's bytes")
            .unwrap();
        assert_eq!(&got, b"ping");
        parked.write_all(b"pong").await.unwrap();
        tokio::time::timeout(PATIENCE, client.read_exact(&mut got))
            .await
            .expect("the client gets the hidden server's bytes")
            .unwrap();
        assert_eq!(&got, b"pong");
    }
}

fn refused(metrics: &str, reason: &str) -> f64 {
    readings::metric(
        metrics,
        &format!("taas_edge_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn rendezvous_result(metrics: &str, result: &str) -> f64 {
    readings::metric(
        metrics,
        &format!("taas_edge_rendezvous_total{{result=\"{result}\"}}"),
    )
}

/// Sends a ClientHello through `stream` (after its header) and asserts it and more bytes
/// reach the hidden server behind `parked` unchanged, and that bytes flow back.
async fn assert_hello_reaches(stream: &mut TcpStream, parked: &mut TcpStream, name: &str) {
    let hello = client_hello(Some(name));
    stream.write_all(&hello).await.unwrap();
    assert_relayed_both_ways(stream, parked, &hello, PATIENCE).await;
}

/// A shared-port client of "home" through the edge reaches the hidden server behind `parked`.
async fn assert_a_client_gets_through(pod: &Pod, parked: &mut TcpStream) {
    let mut client = pod
        .send(&pod.header(EdgeKind::SharedPort, PHONE, 9443))
        .await;
    assert_hello_reaches(&mut client, parked, &format!("home.{DOMAIN}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_port_client_through_the_edge_reaches_the_hidden_server_with_its_client_hello_unchanged(
) {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let mut parked = pod.park_directly(&home).await;
    // The header in pieces (the relay reads exactly it, however it arrives).
    let header = pod.header(EdgeKind::SharedPort, PHONE, 9443).encode();
    let mut client = TcpStream::connect(pod.edge()).await.unwrap();
    for piece in [&header[..5], &header[5..20], &header[20..]] {
        client.write_all(piece).await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_hello_reaches(&mut client, &mut parked, &format!("home.{DOMAIN}")).await;
    let metrics = pod.metrics().await;
    assert_eq!(
        readings::metric(&metrics, &paired("home", "shared_port")),
        1.0
    );
    assert_eq!(
        readings::metric(
            &metrics,
            "taas_edge_connections_total{kind=\"shared_port\"}"
        ),
        1.0
    );
}

/// As on q, a client's connection carries a relayed connection's socket options (no Nagle,
/// keepalive), inherited from the edge port's listener: seen as the kernel's keepalive timer
/// on the relay's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_through_the_edge_is_kept_alive_on_the_relays_side_as_on_q() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let mut parked = pod.park_directly(&home).await;
    let mut client = pod
        .send(&pod.header(EdgeKind::SharedPort, PHONE, 9443))
        .await;
    assert_hello_reaches(&mut client, &mut parked, &format!("home.{DOMAIN}")).await;
    assert_eq!(
        readings::keepalive_armed(pod.edge(), client.local_addr().unwrap()),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_client_through_the_edge_reaches_the_hidden_server_named_by_its_header() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home")
        .with("direct: true")
        .with("proxyProtocol: v1");
    let pod = start(dir.path(), &home, &[]).await;
    let mut parked = pod.park_directly(&home).await;
    let mut client = pod.send(&pod.header(EdgeKind::Direct, PHONE, 443)).await;
    // The hidden server is told the phone's address from the header, not the gateway's.
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    client.write_all(&hello).await.unwrap();
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(PATIENCE, parked.read_exact(&mut byte))
            .await
            .expect("the PROXY header")
            .unwrap();
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    // ...and the gateway's address and port it used (from the header), not the edge port's.
    assert_eq!(line, "PROXY TCP4 192.0.2.77 127.0.0.1 50123 443\r\n");
    let mut seen = vec![0u8; hello.len()];
    tokio::time::timeout(PATIENCE, parked.read_exact(&mut seen))
        .await
        .expect("the ClientHello")
        .unwrap();
    assert_eq!(seen, hello, "the ClientHello unchanged");
    let metrics = pod.metrics().await;
    assert_eq!(readings::metric(&metrics, &paired("home", "direct")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_from_the_pinned_source_is_claimed_committed_parked_and_paired() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let t = pod.register(&home).await;
    let (answer, mut hidden) = pod.claim(&format!("{HIDDEN}:61000"), t).await;
    assert_eq!(answer, edge::CLAIM);
    hidden.write_all(&[edge::COMMIT]).await.unwrap();
    pod.wait_parked(1).await;
    // The registration is over: its own port is closed, and the claim cannot be repeated.
    let local = SocketAddr::new([127, 0, 0, 1].into(), pod.p_lo + (t - T_BASE));
    eventually("the one-shot port closed", || async {
        TcpStream::connect(local).await.is_err()
    })
    .await;
    let (again, _) = pod.claim(&format!("{HIDDEN}:61001"), t).await;
    assert_eq!(again, edge::NOT_MINE);
    pod.assert_q_pairs_with(&mut hidden).await;
    let metrics = pod.metrics().await;
    assert_eq!(
        readings::metric(
            &metrics,
            "taas_rendezvous_total{label=\"home\",kind=\"connected\"}"
        ),
        1.0
    );
    assert_eq!(rendezvous_result(&metrics, "committed"), 1.0);
    assert_eq!(rendezvous_result(&metrics, "not_mine"), 1.0);
    assert_eq!(readings::metric(&metrics, &paired("home", "own_port")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_from_another_source_or_for_another_port_is_not_mine_and_the_registration_stays(
) {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let t = pod.register(&home).await;
    for (source, port) in [
        ("127.0.0.3:61000", t),
        ("127.0.0.2:61000", t + 1),
        ("127.0.0.2:1", 9443),
    ] {
        let (answer, mut stream) = pod.claim(source, port).await;
        assert_eq!(answer, edge::NOT_MINE, "{source} for {port}");
        assert_closed(&mut stream).await;
    }
    assert_eq!(pod.parked(), 0);
    let (answer, mut hidden) = pod.claim(&format!("{HIDDEN}:61000"), t).await;
    assert_eq!(answer, edge::CLAIM, "still pending");
    hidden.write_all(&[edge::COMMIT]).await.unwrap();
    pod.wait_parked(1).await;
    let metrics = pod.metrics().await;
    assert_eq!(rendezvous_result(&metrics, "not_mine"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_without_commit_leaves_the_registration_pending_and_a_second_claim_parks() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let t = pod.register(&home).await;
    let source = format!("{HIDDEN}:61000");

    // While one gateway holds the claim, another waits for it (one owner at a time; with
    // replicas, the same hidden server's second connection may be asked meanwhile): the
    // first gives it up (it closes, well within the second's wait of 900 ms here), the
    // waiting one claims it.
    let (answer, held) = pod.claim(&source, t).await;
    assert_eq!(answer, edge::CLAIM);
    let first_gives_up = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
    };
    let ((answer, second), ()) = tokio::join!(pod.claim(&source, t), first_gives_up);
    assert_eq!(answer, edge::CLAIM, "given up by the first, then claimed");
    // Given up by a close...
    drop(second);
    eventually("the claims given up", || async {
        rendezvous_result(&pod.metrics().await, "not_committed") == 2.0
    })
    .await;
    // ...by another byte...
    let (answer, mut stream) = pod.claim(&source, t).await;
    assert_eq!(answer, edge::CLAIM);
    stream.write_all(&[0x02]).await.unwrap();
    assert_closed(&mut stream).await;
    // ...and by silence until the deadline.
    let (answer, mut stream) = pod.claim(&source, t).await;
    assert_eq!(answer, edge::CLAIM);
    let started = Instant::now();
    assert_closed(&mut stream).await;
    assert!(started.elapsed() < timeouts().handshake + Duration::from_secs(2));
    assert_eq!(pod.parked(), 0);
    let metrics = pod.metrics().await;
    assert_eq!(rendezvous_result(&metrics, "not_committed"), 4.0);

    // Still pending: the next claim with COMMIT parks it.
    let (answer, mut hidden) = pod.claim(&source, t).await;
    assert_eq!(answer, edge::CLAIM);
    hidden.write_all(&[edge::COMMIT]).await.unwrap();
    pod.wait_parked(1).await;
    pod.assert_q_pairs_with(&mut hidden).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_shot_port_itself_still_takes_the_hidden_server_after_an_abandoned_claim() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let t = pod.register(&home).await;
    let (answer, stream) = pod.claim(&format!("{HIDDEN}:61000"), t).await;
    assert_eq!(answer, edge::CLAIM);
    drop(stream);
    let local = SocketAddr::new([127, 0, 0, 1].into(), pod.p_lo + (t - T_BASE));
    let mut hidden = connect_from(HIDDEN, local).await;
    pod.wait_parked(1).await;
    // Its registration is over: no edge claim for it any more.
    let (answer, _) = pod.claim(&format!("{HIDDEN}:61001"), t).await;
    assert_eq!(answer, edge::NOT_MINE);
    pod.assert_q_pairs_with(&mut hidden).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_silent_and_stalled_peers_are_closed_in_time_counted_and_the_label_keeps_serving(
) {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &[]).await;
    let mut parked = pod.park_directly(&home).await;

    let wrong_token = EdgeHeader {
        token: token_for("office").expose().to_string(),
        ..pod.header(EdgeKind::SharedPort, PHONE, 9443)
    };
    let other_label = EdgeHeader {
        label: "office".into(),
        token: token_for("office").expose().to_string(),
        ..pod.header(EdgeKind::SharedPort, PHONE, 9443)
    };
    // Counted as: bad_token, wrong_label, bad_header (three).
    let mut sent: Vec<Vec<u8>> = vec![
        wrong_token.encode(),
        other_label.encode(),
        b"GET / HTTP/1.1\r\nHost: home\r\n\r\n".to_vec(),
        client_hello(Some("home.taas.localhost")),
    ];
    // A header with one more TLV than the contract allows.
    let mut extra = pod.header(EdgeKind::SharedPort, PHONE, 9443).encode();
    extra.extend_from_slice(&[0xE3, 0, 1, 0]);
    let length = u16::from_be_bytes([extra[14], extra[15]]) + 4;
    extra[14..16].copy_from_slice(&length.to_be_bytes());
    sent.push(extra);
    for bytes in &sent {
        let mut stream = TcpStream::connect(pod.edge()).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        assert_closed(&mut stream).await;
    }

    // Silent: closed at the first-byte deadline; one byte then a stall: at the handshake one.
    let deadline_slack = Duration::from_secs(2);
    let mut silent = TcpStream::connect(pod.edge()).await.unwrap();
    let started = Instant::now();
    assert_closed(&mut silent).await;
    assert!(started.elapsed() < timeouts().first_byte + deadline_slack);
    let mut stalled = TcpStream::connect(pod.edge()).await.unwrap();
    let started = Instant::now();
    stalled.write_all(b"\r").await.unwrap();
    assert_closed(&mut stalled).await;
    let waited = started.elapsed();
    assert!(waited >= timeouts().first_byte, "{waited:?}");
    assert!(waited < timeouts().handshake + deadline_slack, "{waited:?}");
    // A whole header but for its last byte: the same.
    let header = pod.header(EdgeKind::SharedPort, PHONE, 9443).encode();
    let mut short = TcpStream::connect(pod.edge()).await.unwrap();
    short.write_all(&header[..header.len() - 1]).await.unwrap();
    assert_closed(&mut short).await;

    let metrics = pod.metrics().await;
    assert_eq!(refused(&metrics, "bad_token"), 1.0);
    assert_eq!(refused(&metrics, "wrong_label"), 1.0);
    assert_eq!(refused(&metrics, "bad_header"), 3.0);
    assert_eq!(refused(&metrics, "silent"), 1.0);
    assert_eq!(refused(&metrics, "deadline"), 2.0);
    assert_eq!(
        readings::metric_sum(&metrics, "taas_edge_connections_total"),
        0.0
    );
    // The parked connection was never touched: a client still pairs with it.
    assert_eq!(pod.parked(), 1);
    pod.assert_q_pairs_with(&mut parked).await;
    // Neither the right token nor a wrong one reaches the (debug) logs.
    let logs = logs::captured_logs();
    assert!(logs.contains("edge port"), "no edge logs captured");
    for token in [pod.token.expose(), token_for("office").expose()] {
        assert!(!logs.contains(token), "a gateway token is in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_trusted_networks_are_closed_before_any_header_is_read() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start(dir.path(), &home, &["127.0.0.1/32"]).await;
    let mut parked = pod.park_directly(&home).await;
    let mut outsider = connect_from("127.0.0.3", pod.edge()).await;
    let _ = outsider
        .write_all(&pod.header(EdgeKind::SharedPort, PHONE, 9443).encode())
        .await;
    assert_closed(&mut outsider).await;
    assert_eq!(refused(&pod.metrics().await, "untrusted"), 1.0);
    assert_a_client_gets_through(&pod, &mut parked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_reading_their_header_are_capped_and_the_next_one_is_closed_at_once() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let limits = Limits {
        frontend_connections: 2,
        ..Limits::default()
    };
    let pod = start_with(dir.path(), &home, &[], limits).await;
    let mut parked = pod.park_directly(&home).await;
    // Two peers hold half headers; the third is closed before its header's deadline.
    let header = pod.header(EdgeKind::SharedPort, PHONE, 9443).encode();
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut holder = TcpStream::connect(pod.edge()).await.unwrap();
        holder.write_all(&header[..3]).await.unwrap();
        holders.push(holder);
    }
    // The edge port accepts in order: the holders took both permits before the third comes.
    let mut third = TcpStream::connect(pod.edge()).await.unwrap();
    let started = Instant::now();
    assert_closed(&mut third).await;
    assert!(started.elapsed() < timeouts().first_byte, "closed at once");
    assert_eq!(refused(&pod.metrics().await, "overloaded"), 1.0);
    // Once they are gone, a client gets through again.
    for mut holder in holders {
        assert_closed(&mut holder).await;
    }
    assert_a_client_gets_through(&pod, &mut parked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_port_client_of_a_label_whose_server_speaks_first_is_refused() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home")
        .with("serverSpeaksFirst: true")
        .with("proxyProtocol: v2");
    let pod = start(dir.path(), &home, &[]).await;
    let mut client = pod
        .send(&pod.header(EdgeKind::SharedPort, PHONE, 9443))
        .await;
    client
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    assert_eq!(refused(&pod.metrics().await, "server_speaks_first"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_port_without_a_gateway_token_is_a_start_error() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let result = label_relay::start(LabelRelayOptions {
        edge: Some("127.0.0.1:0".parse().unwrap()),
        metrics: None,
        ..label_relay_options(dir.path(), &home, 8, &[])
    })
    .await;
    match result {
        Err(StartError::Config(message)) => assert!(message.contains("--edge"), "{message}"),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("started without a gateway token"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_port_inside_the_rendezvous_ports_is_a_start_error() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let options = label_relay_options(dir.path(), &home, 8, &[]);
    let result = label_relay::start(LabelRelayOptions {
        edge: Some(SocketAddr::new(
            [127, 0, 0, 1].into(),
            options.p_ports.lo + 3,
        )),
        gateway_token: Some(token_for("home")),
        metrics: None,
        ..options
    })
    .await;
    match result {
        Err(StartError::Config(message)) => {
            assert!(message.contains("inside --p-ports"), "{message}")
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("started with the edge port among the rendezvous ports"),
    }
}
