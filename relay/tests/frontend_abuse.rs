//! Strangers must not take the front end offline (issue 13, item 2): a request body that never
//! arrives, one source opening connection after connection, and many connections each
//! holding a partial head. Over TLS to a real relay (`serve`, in-process or spawned) and
//! through the real gateway (`taas_relay::run::gateway::start`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use taas_relay::config::Timeouts;
use taas_testkit::prelude::*;
use taas_testkit::spawned::{RelaySpec, SpawnedRelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_taas-relay");

/// Prints a figure for docs/robustness.md (visible with `--nocapture`).
fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

/// A TCP connection to `front` from a chosen loopback source address.
async fn tcp_from(source: &str, front: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(front).await.unwrap()
}

/// A TLS handshake with `front` from `source`: the stream, or the handshake's error.
async fn try_tls_from(
    source: &str,
    front: SocketAddr,
    ca: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(source, front).await;
    let config =
        taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca.to_path_buf()))
            .unwrap();
    let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).unwrap();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    tokio::time::timeout(PATIENCE, handshake)
        .await
        .expect("handshake ends within patience")
}

async fn tls_from(
    source: &str,
    front: SocketAddr,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_tls_from(source, front, ca)
        .await
        .expect("TLS handshake")
}

/// Sends a registration head announcing a 100-byte body that never comes; returns the
/// answer, how long it took, and whether the connection was closed after it.
async fn stalled_body(front: SocketAddr, ca: &Path) -> (Response, Duration, bool) {
    let mut tls = tls_from("127.0.0.1", front, ca).await;
    let head = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: TOTP username=\"x\", response=\"000000\"\r\nContent-Length: 100\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let response = read_response(&mut tls).await;
    let took = started.elapsed();
    let mut rest = [0u8; 16];
    let closed = matches!(
        tokio::time::timeout(PATIENCE, tls.read(&mut rest)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    (response, took, closed)
}

const BODY_DEADLINE: Duration = Duration::from_secs(1);

fn short_body_deadline() -> Timeouts {
    Timeouts {
        request_body: BODY_DEADLINE,
        ..Timeouts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_408_and_a_close_at_its_deadline() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| o.timeouts = short_body_deadline()).await;
    let (response, took, closed) = stalled_body(relay.addr(), relay.ca()).await;
    figure(
        "serve: stalled body (Content-Length: 100, none sent) answered 408 and closed in",
        format!(
            "{:.0} ms (deadline {} ms)",
            took.as_secs_f64() * 1000.0,
            BODY_DEADLINE.as_millis()
        ),
    );
    assert_eq!(response.status, 408, "{response:?}");
    assert!(closed, "the connection stays open after the 408");
    assert!(
        took >= BODY_DEADLINE - Duration::from_millis(50),
        "{took:?}"
    );
    assert!(took < BODY_DEADLINE + PATIENCE / 2, "{took:?}");
    assert!(relay
        .metrics()
        .await
        .contains("taas_frontend_requests_timed_out_total 1"));
    // The steward's exact request still gets its 200, on a new connection.
    assert_eq!(relay.put("home", &home.authorization()).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_at_the_gateway_gets_408_and_a_close_at_its_deadline() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), "{}\n").unwrap();
    let gateway = taas_relay::run::gateway::start(taas_relay::run::gateway::GatewayOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        registrar: REGISTRAR.into(),
        domain: DOMAIN.into(),
        tls_cert: None,
        tls_key: None,
        state_dir: dir.path().join("state"),
        routes: taas_relay::run::gateway::RouteSource::File(dir.path().join("routes.yaml")),
        reload_interval: Duration::from_millis(50),
        metrics: None,
        timeouts: short_body_deadline(),
        max_connections: 64,
        max_connections_per_source: 64,
        install_secret_file: None,
        upstream: Default::default(),
        ..taas_relay::run::gateway::GatewayOptions::new(
            taas_relay::run::gateway::RouteSource::File(dir.path().join("routes.yaml")),
        )
    })
    .await
    .expect("gateway starts");
    let (response, took, closed) = stalled_body(gateway.frontend, &gateway.cert.cert).await;
    figure(
        "gateway: stalled body answered 408 and closed in",
        format!(
            "{:.0} ms (deadline {} ms)",
            took.as_secs_f64() * 1000.0,
            BODY_DEADLINE.as_millis()
        ),
    );
    assert_eq!(response.status, 408, "{response:?}");
    assert!(closed, "the connection stays open after the 408");
    assert!(took < BODY_DEADLINE + PATIENCE / 2, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_body_over_the_bound_gets_413_at_once_and_a_close() {
    let relay = TestRelay::start(&[]).await;
    let mut tls = tls_from("127.0.0.1", relay.addr(), relay.ca()).await;
    let head =
        format!("PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nContent-Length: 5000\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 413, "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_closed(&mut tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_that_arrives_in_time_is_read_and_the_request_answered() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut tls = relay.tls().await;
    let request = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        home.authorization()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tls.write_all(b"3\r\nabc\r\n0\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tls).await.status, 200);
}

/// Waits (bounded) until the relay has closed `stream` (EOF or reset), without sending.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_connection_cap_is_refused_while_another_source_registers() {
    const CAP: usize = 8;
    let home = TestLabel::new("home");
    let relay =
        TestRelay::start_with(&[&home], |o| o.limits.frontend_connections_per_source = CAP).await;
    let front = relay.addr();
    // One source holds its CAP connections (TLS done, then silent).
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(tls_from("127.0.0.1", front, relay.ca()).await);
    }
    // Its next connection is closed at once, before any TLS byte is answered.
    let mut refused = tcp_from("127.0.0.1", front).await;
    assert!(
        closed_by_peer(&mut refused).await,
        "the connection over the cap stays open"
    );
    assert!(try_tls_from("127.0.0.1", front, relay.ca()).await.is_err());
    // Another source registers, parks and gets its 307 meanwhile.
    let mut tls = tls_from("127.0.0.2", front, relay.ca()).await;
    tls.write_all(steward_request("home", front.port(), &home.authorization()).as_bytes())
        .await
        .unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 200, "{response:?}");
    let p: SocketAddr = response.body_str().parse().unwrap();
    let _parked = tcp_from("127.0.0.2", p).await;
    relay.wait_parked("home", 1).await;
    let mut mobile = tls_from("127.0.0.2", front, relay.ca()).await;
    mobile
        .write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: home.{DOMAIN}:{}\r\nConnection: close\r\n\r\n",
                front.port()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(read_response(&mut mobile).await.status, 307);
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_frontend_connections_refused_total{reason=\"per_source\"} 2"),
        "{metrics}"
    );
    // A place freed is a place the source gets back.
    held.pop();
    eventually(
        "a connection from the capped source is accepted again",
        || async { try_tls_from("127.0.0.1", front, relay.ca()).await.is_ok() },
    )
    .await;
}

/// Opens `n` TLS connections from `sources` loopback addresses, each sending a request head
/// of `head_bytes` that never ends; returns them (held open).
async fn hold_partial_heads(
    front: SocketAddr,
    ca: &Path,
    n: usize,
    head_bytes: usize,
    first_source: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut head =
        format!("PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nX-Pad: ").into_bytes();
    head.resize(head_bytes, b'a');
    let head = std::sync::Arc::new(head);
    let mut held = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(50) {
        let mut pending = Vec::new();
        for &i in batch {
            let (ca, head) = (ca.to_path_buf(), head.clone());
            let source = format!("127.0.2.{}", 1 + (first_source + i) % 200);
            pending.push(tokio::spawn(async move {
                let mut tls = tls_from(&source, front, &ca).await;
                tls.write_all(&head).await.unwrap();
                tls.flush().await.unwrap();
                tls
            }));
        }
        for p in pending {
            held.push(p.await.unwrap());
        }
    }
    held
}

/// Samples the relay's RSS (bounded) until three readings 200 ms apart agree within 256 KiB.
async fn settled_rss(relay: &SpawnedRelay) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut readings = vec![relay.stats().rss_kib];
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        readings.push(relay.stats().rss_kib);
        let last = &readings[readings.len().saturating_sub(3)..];
        let (lo, hi) = (last.iter().min().unwrap(), last.iter().max().unwrap());
        if last.len() == 3 && hi - lo < 256 || Instant::now() > deadline {
            return *hi;
        }
    }
}

/// The memory limits (KiB) of the gateway's and the relay pods' containers in the chart.
fn chart_memory_limits_kib() -> Vec<(&'static str, u64)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/taas/values.yaml");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mebibytes = |v: &serde_yaml::Value| -> u64 {
        let text = v.as_str().expect("a memory quantity");
        text.strip_suffix("Mi")
            .expect("in Mi")
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    vec![
        (
            "gateway",
            mebibytes(&values["gateway"]["resources"]["limits"]["memory"]),
        ),
        (
            "relay pod",
            mebibytes(&values["operator"]["relay"]["resources"]["limits"]["memory"]),
        ),
    ]
}

/// Counts the connections the relay has not closed (unread TLS bytes such as session
/// tickets, or nothing to read: open; EOF or reset: closed).
fn still_open(held: &[tokio_rustls::client::TlsStream<TcpStream>]) -> usize {
    let mut open = 0;
    for tls in held {
        let mut buf = [0u8; 1];
        match tls.get_ref().0.try_read(&mut buf) {
            Ok(n) if n > 0 => open += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    open
}

/// RSS of a spawned relay (debug build) per TLS connection holding a ~15 KB partial head, and
/// per TLS connection holding a 100-byte one; the pods' default connection cap at that cost
/// fits the chart's memory limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_partial_heads_cost_a_bounded_amount_of_memory_each() {
    const WARM: usize = 100;
    const N: usize = 1000;
    const SMALL: usize = 500;
    const HEAD: usize = 15 * 1024;
    /// The generous bound asserted per connection (measured: about 36 KiB).
    const BOUND_KIB: f64 = 48.0;
    taas_process::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let relay = SpawnedRelay::start(&RelaySpec::new(RELAY_BIN, dir.path(), 4)).await;
    // Warm up the allocator and the runtime with a first batch, then measure the next ones.
    let started = Instant::now();
    let warm = hold_partial_heads(relay.front, &relay.ca(), WARM, HEAD, 0).await;
    let base = settled_rss(&relay).await;
    let held = hold_partial_heads(relay.front, &relay.ca(), N, HEAD, WARM).await;
    let opened = started.elapsed();
    let with_heads = settled_rss(&relay).await;
    let small = hold_partial_heads(relay.front, &relay.ca(), SMALL, 100, WARM + N).await;
    let with_small = settled_rss(&relay).await;
    // All of them are still open (inside the 30 s head deadline), so nothing was freed.
    assert_eq!(
        still_open(&warm) + still_open(&held) + still_open(&small),
        WARM + N + SMALL,
        "connections closed before the measurement ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let per_head = with_heads.saturating_sub(base) as f64 / N as f64;
    let per_small = with_small.saturating_sub(with_heads) as f64 / SMALL as f64;
    figure(
        "RSS per TLS connection holding a 15 KiB partial head (debug build)",
        format!(
            "{per_head:.1} KiB ({N} connections, {WARM} warm-up ones opened before, all in {:.1} s; \
             RSS {:.1} → {:.1} MiB)",
            opened.as_secs_f64(),
            base as f64 / 1024.0,
            with_heads as f64 / 1024.0
        ),
    );
    figure(
        "RSS per TLS connection holding a 100-byte partial head (debug build)",
        format!("{per_small:.1} KiB ({SMALL} connections)"),
    );
    assert!(
        per_head < BOUND_KIB,
        "{per_head:.1} KiB per held connection"
    );
    // cap × per-connection + base ≤ limit, for the pods' default cap.
    let cap = taas_relay::config::POD_FRONTEND_CONNECTIONS as u64;
    for (pod, limit) in chart_memory_limits_kib() {
        let worst = cap * BOUND_KIB as u64 + base;
        figure(
            &format!("{pod}: {cap} connections × {BOUND_KIB} KiB + base"),
            format!("{} MiB of {} MiB", worst / 1024, limit / 1024),
        );
        assert!(
            worst <= limit,
            "{pod}: {cap} held connections need {} MiB, the limit is {} MiB",
            worst / 1024,
            limit / 1024
        );
    }
}

/// Waits (bounded) until the relay closes `stream`; returns how long that took.
async fn time_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue, // TLS session tickets, or a 408
            Err(_) => panic!("still open after {PATIENCE:?}"),
        }
    }
}

/// The handshake and head deadlines: a silent peer, a peer that sends one byte of a
/// ClientHello and stalls, and one that stalls inside a request head are all closed at
/// their deadline, and every connection's place is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_stalled_peers_are_closed_at_the_handshake_and_head_deadlines() {
    const HANDSHAKE: Duration = Duration::from_secs(1);
    const HEAD: Duration = Duration::from_secs(2);
    let relay = TestRelay::start_with(&[], |o| {
        o.timeouts.handshake = HANDSHAKE;
        o.timeouts.keep_alive = HEAD;
    })
    .await;
    let front = relay.addr();
    let mut silent = tcp_from("127.0.0.1", front).await;
    let mut one_byte = tcp_from("127.0.0.1", front).await;
    one_byte.write_all(&[0x16]).await.unwrap();
    let mut partial_head = tls_from("127.0.0.1", front, relay.ca()).await;
    partial_head
        .write_all(
            format!("PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nX-Pad: aaa").as_bytes(),
        )
        .await
        .unwrap();
    let (silent, one_byte, partial_head) = tokio::join!(
        time_to_close(&mut silent),
        time_to_close(&mut one_byte),
        time_to_close(&mut partial_head)
    );
    figure(
        "closed after (silent TCP / one ClientHello byte / partial head)",
        format!(
            "{:.0} / {:.0} / {:.0} ms (handshake deadline {} ms, head deadline {} ms)",
            silent.as_secs_f64() * 1000.0,
            one_byte.as_secs_f64() * 1000.0,
            partial_head.as_secs_f64() * 1000.0,
            HANDSHAKE.as_millis(),
            HEAD.as_millis()
        ),
    );
    let margin = PATIENCE / 4;
    for (what, took, deadline) in [
        ("silent", silent, HANDSHAKE),
        ("one byte", one_byte, HANDSHAKE),
        ("partial head", partial_head, HEAD),
    ] {
        assert!(
            took + Duration::from_millis(100) >= deadline && took < deadline + margin,
            "{what}: closed after {took:?}, deadline {deadline:?}"
        );
    }
    eventually("every front-end connection's place given back", || async {
        relay
            .metrics()
            .await
            .contains("taas_frontend_connections 0")
    })
    .await;
}

/// At the connection cap a new connection, from any source, is closed at once and counted;
/// a freed place is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_connections_are_closed_at_once_and_counted() {
    const CAP: usize = 4;
    let relay = TestRelay::start_with(&[], |o| o.limits.frontend_connections = CAP).await;
    let front = relay.addr();
    let mut held = Vec::new();
    for i in 0..CAP {
        held.push(tls_from(&format!("127.0.3.{}", i + 1), front, relay.ca()).await);
    }
    for i in 0..3 {
        let mut refused = tcp_from(&format!("127.0.4.{}", i + 1), front).await;
        let started = Instant::now();
        assert!(
            closed_by_peer(&mut refused).await,
            "a connection over the cap stays open"
        );
        assert!(started.elapsed() < PATIENCE / 4);
    }
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_frontend_connections_refused_total{reason=\"full\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("taas_frontend_connections {CAP}")),
        "{metrics}"
    );
    held.pop();
    eventually("a freed place is taken again", || async {
        try_tls_from("127.0.4.9", front, relay.ca()).await.is_ok()
    })
    .await;
}
