//! Strangers on the client port q and on rendezvous ports (issue 13, items 1 and 6): silent
//! connections, connections that send one byte and stall, per-source caps, the per-label pair
//! cap, the pair idle timeout, server-speaks-first labels, and a stranger flood on a pinned p.
//!
//! Through `TestRelay` (a real relay on loopback) and, where the pool's refill matters, the
//! real agent (`taas_relay::agent`) in front of an echo service. Other loopback addresses
//! (127.0.0.x) stand in for other hosts. Figures: `--nocapture`, lines starting `figure:`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use taas_testkit::agent::Agent;
use taas_testkit::logs;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A TCP connection to `port` on 127.0.0.1 from the loopback address `source`.
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// A mobile client as a phone is one: the 307 first, then q, then an echo round trip.
/// True if it was served.
async fn legitimate_client(relay: &TestRelay, label: &str, n: usize) -> bool {
    if relay.mobile_get(label, "/").await.status != 307 {
        return false;
    }
    let Ok(mut client) = TcpStream::connect(("127.0.0.1", relay.q(label))).await else {
        return false;
    };
    let data = format!("request {n} from a phone");
    if client.write_all(data.as_bytes()).await.is_err() {
        return false;
    }
    let mut back = vec![0; data.len()];
    matches!(
        tokio::time::timeout(PATIENCE, client.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == data.as_bytes()
}

/// True while `stream` is open with nothing to read (the relay has not closed it).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Parks a hidden server that echoes whatever reaches it.
async fn park_echo(relay: &TestRelay, label: &TestLabel) -> tokio::task::JoinHandle<()> {
    let mut hidden = relay.park(label).await;
    tokio::spawn(async move {
        let (mut r, mut w) = hidden.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
}

/// Fifty TCP connections that send nothing (from fifty sources) are held open on q, for
/// longer than it takes to serve fifty phones one after another: none of them takes a parked
/// connection, the 307 keeps working and every phone is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_on_q_take_no_parked_connection_and_phones_are_served() {
    logs::debug_logs();
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        // Longer than the whole test: the silent connections stay open throughout.
        o.timeouts.first_byte = Duration::from_secs(120);
    })
    .await;
    let (echo, _echo_task) = echo_server().await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, echo, 4, |_| {});
    agent.wait("4 parked", PATIENCE, |s| s.parked == 4).await;
    relay.wait_parked("home", 4).await;

    let q = relay.q("home");
    let mut silent = Vec::new();
    for i in 0..50 {
        silent.push(connect_from(&format!("127.0.0.{}", 10 + i), q).await);
    }
    let started = Instant::now();
    let mut served = 0;
    const PHONES: usize = 50;
    for n in 0..PHONES {
        if legitimate_client(&relay, "home", n).await {
            served += 1;
        }
    }
    let took = started.elapsed();
    figure(
        "q abuse: phones served while 50 silent connections are held",
        format!("{served}/{PHONES} in {}", ms(took)),
    );
    assert_eq!(served, PHONES, "phones turned away");
    assert!(
        silent.iter().all(still_open),
        "the silent connections were held open throughout"
    );
    relay.wait_parked("home", 4).await;
    let metrics = relay.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_pairings_total{label=\"home\",entry=\"own_port\"}"
        ),
        PHONES as f64,
        "only the phones were paired"
    );
}

/// N connections that send one byte and stall, and N that send nothing, held together: each
/// stalled one costs the hidden server one connection (its agent sees the byte, reports the
/// pairing and registers a replacement at once), the pool stays full, and phones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_cost_the_hidden_server_a_connection_never_the_pool() {
    logs::debug_logs();
    const N: usize = 20;
    const PHONES: usize = 30;
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.first_byte = Duration::from_secs(120);
    })
    .await;
    let (echo, _echo_task) = echo_server().await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, echo, 4, |_| {});
    agent.wait("4 parked", PATIENCE, |s| s.parked == 4).await;
    let q = relay.q("home");

    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..N {
        held.push(connect_from(&format!("127.0.0.{}", 100 + i), q).await);
        // One byte, echoed by the service: paired through to it; then nothing more.
        let mut stalled = connect_from(&format!("127.0.0.{}", 150 + i), q).await;
        echo_roundtrip(&mut stalled, b"x").await;
        held.push(stalled);
    }
    // Every stalled connection was paired through to the service, and the agent refilled.
    agent
        .wait("a pair per stalled connection", PATIENCE, |s| {
            s.pairs_active == N && s.parked == 4
        })
        .await;
    relay.wait_parked("home", 4).await;
    let refilled = started.elapsed();
    figure(
        "q abuse: 20 silent + 20 stalled connections opened, each stalled one paired, pool full again, in",
        ms(refilled),
    );

    let started = Instant::now();
    let mut served = 0;
    for n in 0..PHONES {
        if legitimate_client(&relay, "home", n).await {
            served += 1;
        }
    }
    figure(
        "q abuse: phones served while 20 silent and 20 stalled connections are held",
        format!("{served}/{PHONES} in {}", ms(started.elapsed())),
    );
    assert_eq!(served, PHONES);
    assert!(held.iter().all(still_open));
    let metrics = relay.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_pairings_total{label=\"home\",entry=\"own_port\"}"
        ),
        (N + PHONES) as f64,
        "one pairing per stalled connection and per phone, none for the silent ones"
    );
}

/// A client that sends nothing is closed after the first-byte timeout, never having held the
/// parked connection, and is counted as `silent`.
#[tokio::test]
async fn a_silent_client_is_closed_after_the_first_byte_timeout() {
    logs::debug_logs();
    let home = TestLabel::new("home");
    let first_byte = Duration::from_millis(500);
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.first_byte = first_byte;
    })
    .await;
    let mut hidden = relay.park(&home).await;
    let started = Instant::now();
    let mut silent = relay.client("home").await;
    assert_closed(&mut silent).await;
    let took = started.elapsed();
    figure(
        "q abuse: a silent client closed after (first-byte timeout 500 ms)",
        ms(took),
    );
    assert!(took >= first_byte, "closed after {took:?}");
    assert!(
        took < first_byte + Duration::from_secs(2),
        "closed after {took:?}"
    );
    assert_eq!(
        relay.parked("home"),
        1,
        "the parked connection was not taken"
    );
    let metrics = relay.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_clients_refused_total{label=\"home\",kind=\"silent\"}"
        ),
        1.0,
        "{metrics}"
    );
    // The hidden server saw nothing, and serves the next client.
    let mut client = relay.client("home").await;
    client.write_all(b"real").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(PATIENCE, hidden.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"real");
}

/// A service that speaks first (an SSH-like banner) behind the real agent, on a label with
/// `serverSpeaksFirst` and `proxyProtocol: v1`: the client gets the banner without sending
/// anything, then talks; the agent learnt of the pairing from the PROXY header and refilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_speaks_first_label_sends_the_banner_to_a_silent_client() {
    logs::debug_logs();
    const BANNER: &[u8] = b"SSH-2.0-hidden_server\r\n";
    let ssh = TestLabel::new("ssh")
        .with("serverSpeaksFirst: true")
        .with("proxyProtocol: v1");
    let relay = TestRelay::start(&[&ssh]).await;
    // The service: banner first, then the PROXY line (kept), then an echo.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = service.local_addr().unwrap();
    let (proxy_lines, mut seen_proxy) = tokio::sync::mpsc::unbounded_channel();
    let _service = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = service.accept().await else {
                return;
            };
            let proxy_lines = proxy_lines.clone();
            tokio::spawn(async move {
                s.write_all(BANNER).await.unwrap();
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    line.push(byte[0]);
                }
                let _ = proxy_lines.send(String::from_utf8_lossy(&line).into_owned());
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let agent = Agent::start(relay.addr(), relay.ca(), &ssh, forward, 2, |_| {});
    agent.wait("2 parked", PATIENCE, |s| s.parked == 2).await;
    relay.wait_parked("ssh", 2).await;

    let started = Instant::now();
    let mut client = relay.client("ssh").await;
    let mut banner = vec![0u8; BANNER.len()];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut banner))
        .await
        .expect("the banner arrives without the client sending anything")
        .unwrap();
    figure(
        "q abuse: server-speaks-first banner at a silent client after",
        ms(started.elapsed()),
    );
    assert_eq!(banner, BANNER);
    let line = tokio::time::timeout(PATIENCE, seen_proxy.recv())
        .await
        .unwrap()
        .unwrap();
    let client_port = client.local_addr().unwrap().port();
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}\r\n",
            relay.q("ssh")
        )
    );
    echo_roundtrip(&mut client, b"SSH-2.0-client\r\n").await;
    agent
        .wait("refilled after the pairing", PATIENCE, |s| {
            s.parked == 2 && s.pairs_active == 1
        })
        .await;
}

/// With small per-source caps (3 per label, 5 over all labels): a source over either cap is
/// closed at once and counted (`source_limit`), another source is served meanwhile, and a
/// slot comes back when one of the source's connections closes.
#[tokio::test]
async fn a_source_over_its_caps_is_refused_while_another_source_is_served() {
    logs::debug_logs();
    let a = TestLabel::new("a");
    let b = TestLabel::new("b");
    let relay = TestRelay::start_with(&[&a, &b], |o| {
        o.limits.clients_per_source_per_label = 3;
        o.limits.clients_per_source = 5;
    })
    .await;
    let mut hidden = Vec::new();
    for _ in 0..6 {
        hidden.push(park_echo(&relay, &a).await);
    }
    for _ in 0..3 {
        hidden.push(park_echo(&relay, &b).await);
    }
    let (qa, qb) = (relay.q("a"), relay.q("b"));
    let mut from_a = Vec::new();
    for i in 0..3 {
        let mut c = connect_from("127.0.0.20", qa).await;
        echo_roundtrip(&mut c, format!("a{i}").as_bytes()).await;
        from_a.push(c);
    }
    // A fourth on label a from the same source: closed, though a parked connection is free.
    let mut over = connect_from("127.0.0.20", qa).await;
    let _ = over.write_all(b"over").await;
    assert_closed(&mut over).await;
    // Another source is served meanwhile.
    let mut other = connect_from("127.0.0.21", qa).await;
    echo_roundtrip(&mut other, b"other source").await;
    // Over all labels: two more on b make five; the sixth is refused.
    let mut from_b = Vec::new();
    for i in 0..2 {
        let mut c = connect_from("127.0.0.20", qb).await;
        echo_roundtrip(&mut c, format!("b{i}").as_bytes()).await;
        from_b.push(c);
    }
    let mut over_b = connect_from("127.0.0.20", qb).await;
    let _ = over_b.write_all(b"over").await;
    assert_closed(&mut over_b).await;
    let metrics = relay.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_clients_refused_total{label=\"a\",kind=\"source_limit\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "taas_clients_refused_total{label=\"b\",kind=\"source_limit\"}"
        ),
        1.0,
        "{metrics}"
    );
    // One closes: the source has a slot again (once the relay has seen the close).
    drop(from_a.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut c = connect_from("127.0.0.20", qa).await;
        let _ = c.write_all(b"again").await;
        let mut back = [0u8; 5];
        let echoed = tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut back)).await;
        if matches!(echoed, Ok(Ok(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot came back for 127.0.0.20"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A label's pair cap (2 here) refuses the next client (`label_pairs`) without taking a
/// parked connection; pairs with no byte either way for the idle timeout (500 ms here) are
/// closed and counted, and their permits come back.
#[tokio::test]
async fn the_label_pair_cap_and_the_pair_idle_timeout_hold_and_are_counted() {
    logs::debug_logs();
    let home = TestLabel::new("home");
    let idle = Duration::from_millis(500);
    let relay = TestRelay::start_with(&[&home], |o| {
        o.limits.pairs_per_label = 2;
        o.timeouts.pair_idle = Some(idle);
    })
    .await;
    let mut hidden = Vec::new();
    for _ in 0..4 {
        hidden.push(park_echo(&relay, &home).await);
    }
    let mut pairs = Vec::new();
    for i in 0..2 {
        let mut c = relay.client("home").await;
        echo_roundtrip(&mut c, format!("pair {i}").as_bytes()).await;
        pairs.push(c);
    }
    let last_byte = Instant::now();
    let mut third = relay.client("home").await;
    let _ = third.write_all(b"third").await;
    assert_closed(&mut third).await;
    assert_eq!(relay.parked("home"), 2, "the refused client took nothing");
    let metrics = relay.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_clients_refused_total{label=\"home\",kind=\"label_pairs\"}"
        ),
        1.0,
        "{metrics}"
    );
    // The two pairs idle out.
    for pair in &mut pairs {
        assert_closed(pair).await;
    }
    let took = last_byte.elapsed();
    figure(
        "q abuse: idle pairs closed after (pair idle timeout 500 ms)",
        ms(took),
    );
    assert!(took >= idle, "closed after {took:?}");
    eventually("idle closes counted", || async {
        metric(
            &relay.metrics().await,
            "taas_idle_pairs_closed_total{label=\"home\"}",
        ) == 2.0
    })
    .await;
    // Their permits are back.
    let mut next = relay.client("home").await;
    echo_roundtrip(&mut next, b"after the idle pairs").await;
}

/// 200 connections from other sources to a pinned rendezvous port: every one is refused and
/// counted (`stranger`), the log gets one WARN line for them (the rest at debug), and the
/// hidden server that registered still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flood_on_a_pinned_rendezvous_port_writes_one_warning() {
    logs::debug_logs();
    const STRANGERS: usize = 200;
    let label = TestLabel::new("strangers");
    let relay = TestRelay::start(&[&label]).await;
    let p = relay.register(&label).await;
    for i in 0..STRANGERS {
        let mut s = connect_from(&format!("127.0.1.{}", 1 + i % 200), p.port()).await;
        let _ = s.write_all(b"let me in").await;
        let mut buf = [0u8; 8];
        let _ = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await;
    }
    eventually("every stranger counted", || async {
        metric(
            &relay.metrics().await,
            "taas_rendezvous_total{label=\"strangers\",kind=\"stranger\"}",
        ) == STRANGERS as f64
    })
    .await;
    let _hidden = TcpStream::connect(p).await.unwrap();
    relay.wait_parked("strangers", 1).await;
    let logs = logs::captured_logs();
    let about = |level: &str| {
        logs.lines()
            .filter(|l| l.contains(level))
            .filter(|l| l.contains("label=strangers"))
            .filter(|l| l.contains("rendezvous port from another source"))
            .count()
    };
    let (warn, debug) = (about(" WARN "), about(" DEBUG "));
    figure(
        "q abuse: WARN lines for 200 strangers on a pinned p",
        format!("{warn} (and {debug} at debug)"),
    );
    assert_eq!(warn, 1, "one warning per label per minute");
    assert_eq!(debug, STRANGERS - 1, "the others at debug");
}
