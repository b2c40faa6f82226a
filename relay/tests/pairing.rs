//! Mobile clients (PROTOCOL.md §3–§5): the 307, q, parking, pairing, splicing, PROXY headers,
//! pinned client ports, client admission, and labels reloaded while pairs run.

use std::time::Duration;
use taas_relay::splice::SpliceMode;
use taas_testkit::echo::echo_whole;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Both ways a pair can move its bytes, forced (auto is the copy below 64 KiB a direction).
const PATHS: [SpliceMode; 2] = [SpliceMode::Copy, SpliceMode::Kernel];
/// Every mode, for transfers that cross the switch.
const MODES: [SpliceMode; 3] = [SpliceMode::Copy, SpliceMode::Auto, SpliceMode::Kernel];

/// A relay for `labels` whose pairs move their bytes as `mode` says.
async fn relay_on(labels: &[&TestLabel], mode: SpliceMode) -> TestRelay {
    TestRelay::start_with(labels, |o| o.splice = mode).await
}

/// The bytes splice(2) moved, once `pairs` pairs have ended (counted when a pair ends).
async fn spliced_after(relay: &TestRelay, label: &str, pairs: usize) -> f64 {
    eventually("the pairs end", || async {
        metric(
            &relay.metrics().await,
            &format!("taas_active_pairs{{label=\"{label}\"}}"),
        ) == 0.0
            && metric(&relay.metrics().await, &paired(label, "own_port")) >= pairs as f64
    })
    .await;
    metric(&relay.metrics().await, "taas_spliced_bytes_total")
}

#[tokio::test]
async fn redirect_answers_404_503_and_307_with_path_and_query() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    assert_eq!(relay.mobile_get("nosuch", "/").await.status, 404);
    let response = relay.mobile_get("home", "/").await;
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());

    let _parked = relay.park(&home).await;
    let response = relay.mobile_get("Home", "/a/b.html?x=1&y=two").await;
    assert_eq!(response.status, 307);
    assert_eq!(
        response.header("location").unwrap(),
        format!(
            "https://home.{DOMAIN}:{}/a/b.html?x=1&y=two",
            relay.q("home")
        )
    );
    assert_eq!(response.header("content-length"), Some("0"));
}

/// An agent replacing the connection a client has just taken registers, then connects: in
/// between, the label has nothing parked but a hidden server on its way. A client asking then
/// is redirected and served by that connection, not refused with a 503.
#[tokio::test]
async fn a_client_asking_while_a_hidden_server_connects_is_redirected_and_served() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let p = relay.register(&home).await;
    assert_eq!(relay.parked("home"), 0);
    let response = relay.mobile_get("home", "/").await;
    assert_eq!(response.status, 307, "{response:?}");
    let mut client = relay.client("home").await;
    client.write_all(b"hello").await.unwrap();
    eventually("the client waits on q", || async {
        relay.standalone.relay.label("home").unwrap().waiting() == 1
    })
    .await;
    // A second client is not promised the same connection: it is refused.
    assert_eq!(relay.mobile_get("home", "/").await.status, 503);
    let mut server = TcpStream::connect(p).await.unwrap();
    let mut got = [0u8; 5];
    tokio::time::timeout(PATIENCE, server.read_exact(&mut got))
        .await
        .expect("the waiting client is paired within patience")
        .unwrap();
    assert_eq!(&got, b"hello");
}

#[tokio::test]
async fn redirect_to_the_advertised_address_when_configured() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.redirect_host = taas_relay::config::RedirectHost::Advertise;
    })
    .await;
    let _parked = relay.park(&home).await;
    let response = relay.mobile_get("home", "/x").await;
    assert_eq!(
        response.header("location").unwrap(),
        format!("https://127.0.0.1:{}/x", relay.q("home"))
    );
}

#[tokio::test]
async fn client_and_hidden_server_exchange_bytes_both_ways() {
    for mode in PATHS {
        exchange_bytes_both_ways(mode).await;
    }
}

async fn exchange_bytes_both_ways(mode: SpliceMode) {
    let home = TestLabel::new("home");
    let relay = relay_on(&[&home], mode).await;
    let mut hidden = relay.park(&home).await;
    let mut client = relay.client("home").await;
    client.write_all(b"hello from the phone").await.unwrap();
    let mut got = [0u8; 20];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from the phone");
    hidden.write_all(b"hello from home").await.unwrap();
    let mut got = [0u8; 15];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from home");
    assert_eq!(relay.parked("home"), 0);
}

#[tokio::test]
async fn bytes_sent_before_pairing_are_delivered_first() {
    for mode in PATHS {
        early_bytes_first(mode).await;
    }
}

async fn early_bytes_first(mode: SpliceMode) {
    let home = TestLabel::new("home");
    let relay = relay_on(&[&home], mode).await;
    let mut hidden = relay.park(&home).await;
    hidden.write_all(b"SSH-2.0-banner\r\n").await.unwrap();
    // The relay reads it while parked (and keeps it) without dropping the connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(relay.parked("home"), 1);
    let mut client = relay.client("home").await;
    let mut got = [0u8; 16];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"SSH-2.0-banner\r\n");
    echo_both(&mut client, &mut hidden, b"after").await;
}

async fn echo_both(client: &mut TcpStream, hidden: &mut TcpStream, data: &[u8]) {
    client.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(got, data);
}

#[tokio::test]
async fn a_hidden_server_that_disconnects_leaves_the_pool_at_once() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let a = relay.park(&home).await;
    let b = relay.park(&home).await;
    drop(a);
    relay.wait_parked("home", 1).await;
    // A reset (SO_LINGER 0) is noticed too.
    socket2::SockRef::from(&b)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(b);
    relay.wait_parked("home", 0).await;
    assert_eq!(relay.mobile_get("home", "/").await.status, 503);
}

/// The labels' connections live on the data-plane threads, which stop with the relay: parked
/// connections, pairs and their clients are all closed (an embedding program that drops its
/// relay gets its sockets back).
#[tokio::test]
async fn stopping_the_relay_closes_parked_connections_and_pairs() {
    let home = TestLabel::new("home");
    let work = TestLabel::new("work");
    let relay = TestRelay::start_with(&[&home, &work], |o| {
        o.data_threads = std::num::NonZeroUsize::new(2);
    })
    .await;
    let mut idle = relay.park(&home).await;
    let mut paired = relay.park(&work).await;
    let mut client = relay.client("work").await;
    echo_both(&mut client, &mut paired, b"paired").await;
    drop(relay);
    assert_closed(&mut idle).await;
    assert_closed(&mut paired).await;
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn pairing_takes_the_newest_parked_connection() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut older = relay.park(&home).await;
    let mut newer = relay.park(&home).await;
    let mut client = relay.client("home").await;
    echo_both(&mut client, &mut newer, b"to the newest").await;
    let mut second = relay.client("home").await;
    echo_both(&mut second, &mut older, b"then the older").await;
}

#[tokio::test]
async fn a_client_waits_on_q_for_a_connection_to_be_parked() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut client = relay.client("home").await;
    client.write_all(b"early client").await.unwrap();
    let mut hidden = relay.park_direct(&home).await;
    let mut got = [0u8; 12];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"early client");
}

#[tokio::test]
async fn a_client_waits_a_bounded_time_then_is_closed() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.client_wait = Duration::from_millis(200);
    })
    .await;
    let mut client = relay.client("home").await;
    assert!(read_to_end(&mut client).await.is_empty());
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_clients_refused_total{label=\"home\",kind=\"timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn half_close_passes_through_in_both_directions() {
    for mode in PATHS {
        half_close_both_directions(mode).await;
    }
}

async fn half_close_both_directions(mode: SpliceMode) {
    let home = TestLabel::new("home");
    let relay = relay_on(&[&home], mode).await;

    // Client finishes sending first; the hidden server still answers afterwards.
    let mut hidden = relay.park(&home).await;
    let mut client = relay.client("home").await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut hidden).await, b"request");
    hidden
        .write_all(b"response after client FIN")
        .await
        .unwrap();
    hidden.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"response after client FIN");

    // The hidden server finishes first; the client still sends afterwards.
    let mut hidden = relay.park(&home).await;
    let mut client = relay.client("home").await;
    client.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    hidden.read_exact(&mut one).await.unwrap();
    hidden.write_all(b"banner").await.unwrap();
    hidden.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"banner");
    client.write_all(b"late upload").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut hidden).await, b"late upload");
}

/// A deterministic, position-dependent byte pattern, different per stream.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) as u8)
        .collect()
}

/// On every mode: each client sends 64 KiB and a little more, around auto's switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_through_one_label_every_byte_checked() {
    for mode in MODES {
        two_hundred_concurrent_clients(mode).await;
    }
}

async fn two_hundred_concurrent_clients(mode: SpliceMode) {
    let home = TestLabel::new("home").with("maxParked: 200");
    let relay = relay_on(&[&home], mode).await;
    // 200 parked connections: each one echoes what it receives (a hidden server).
    let mut session = relay.session().await;
    let mut hidden_tasks = Vec::new();
    for _ in 0..200 {
        let response = session.put("home", &home.authorization()).await;
        assert_eq!(response.status, 200);
        let mut hidden = TcpStream::connect(response.body_str()).await.unwrap();
        hidden_tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = hidden.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        }));
    }
    relay.wait_parked("home", 200).await;
    let q = relay.q("home");
    let clients: Vec<_> = (0..200u32)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(i, 64 * 1024 + i as usize);
                let back = echo_whole(([127, 0, 0, 1], q).into(), &data).await;
                assert_eq!(back.len(), data.len(), "client {i}");
                assert!(back == data, "client {i}: bytes differ");
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    for task in hidden_tasks {
        task.await.unwrap();
    }
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_pairings_total{label=\"home\",entry=\"own_port\"} 200"),
        "{metrics}"
    );
    let spliced = spliced_after(&relay, "home", 200).await;
    let total: f64 = (0..200).map(|i| 2.0 * (64.0 * 1024.0 + i as f64)).sum();
    match mode {
        SpliceMode::Copy => assert_eq!(spliced, 0.0),
        SpliceMode::Kernel if cfg!(target_os = "linux") => assert_eq!(spliced, total),
        _ => assert!(spliced < total, "{mode:?}: {spliced} of {total}"),
    }
}

#[tokio::test]
async fn a_client_reset_does_not_affect_another_pair() {
    for mode in PATHS {
        reset_isolated(mode).await;
    }
}

async fn reset_isolated(mode: SpliceMode) {
    let home = TestLabel::new("home");
    let relay = relay_on(&[&home], mode).await;
    let mut hidden_a = relay.park(&home).await;
    let mut hidden_b = relay.park(&home).await;
    let mut client_b = relay.client("home").await; // paired with b (newest)
    echo_both(&mut client_b, &mut hidden_b, b"b1").await;
    let mut client_a = relay.client("home").await; // paired with a
    echo_both(&mut client_a, &mut hidden_a, b"a1").await;
    // Client a resets mid-stream.
    socket2::SockRef::from(&client_a)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client_a);
    // a's hidden side sees the pair end...
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, hidden_a.read_to_end(&mut rest)).await;
    // ...while b carries on both ways.
    echo_both(&mut client_b, &mut hidden_b, b"b2 still flowing").await;
    hidden_b.write_all(b"back").await.unwrap();
    let mut got = [0u8; 4];
    client_b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"back");
}

#[tokio::test]
async fn labels_that_were_javascript_object_members_are_ordinary_labels() {
    let labels: Vec<TestLabel> = ["constructor", "tostring", "hasownproperty"]
        .into_iter()
        .map(TestLabel::new)
        .collect();
    let relay = TestRelay::start(&labels.iter().collect::<Vec<_>>()).await;
    // Unregistered: 503, and q closes a client cleanly (no crash).
    for label in &labels {
        assert_eq!(relay.mobile_get(&label.label, "/").await.status, 503);
    }
    assert_eq!(relay.mobile_get("__proto__", "/").await.status, 404);
    assert_eq!(relay.mobile_get("valueof", "/").await.status, 404);
    for label in &labels {
        let mut hidden = relay.park(label).await;
        assert_eq!(relay.mobile_get(&label.label, "/").await.status, 307);
        let mut client = relay.client(&label.label).await;
        echo_both(&mut client, &mut hidden, label.label.as_bytes()).await;
    }
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_headers_reach_the_hidden_server_first() {
    for mode in PATHS {
        proxy_headers_first(mode).await;
    }
}

async fn proxy_headers_first(mode: SpliceMode) {
    let v1 = TestLabel::new("one").with("proxyProtocol: v1");
    let v2 = TestLabel::new("two").with("proxyProtocol: v2");
    let relay = relay_on(&[&v1, &v2], mode).await;

    let mut hidden = relay.park(&v1).await;
    let mut client = relay.client("one").await;
    let client_port = client.local_addr().unwrap().port();
    client.write_all(b"data").await.unwrap();
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}\r\ndata",
        relay.q("one")
    );
    let mut got = vec![0u8; expected.len()];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), expected);

    let mut hidden = relay.park(&v2).await;
    let mut client = relay.client("two").await;
    let client_port = client.local_addr().unwrap().port();
    client.write_all(b"data").await.unwrap();
    let mut got = vec![0u8; 16 + 12 + 4];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(got[12], 0x21);
    assert_eq!(got[13], 0x11);
    assert_eq!(u16::from_be_bytes([got[14], got[15]]), 12);
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([got[24], got[25]]), client_port);
    assert_eq!(u16::from_be_bytes([got[26], got[27]]), relay.q("two"));
    assert_eq!(&got[28..], b"data");
}

#[tokio::test]
async fn a_pinned_client_port_is_a_raw_tcp_forward() {
    let pinned = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let svc = TestLabel::new("svc.home").with(&format!("clientPort: {pinned}"));
    let relay = TestRelay::start(&[&svc]).await;
    assert_eq!(relay.q("svc.home"), pinned);
    let mut hidden = relay.park(&svc).await;
    // No 307 needed: any TCP client on the pinned port is spliced.
    let mut client = TcpStream::connect(("127.0.0.1", pinned)).await.unwrap();
    echo_both(&mut client, &mut hidden, b"\x16\x03\x01 not http").await;
}

#[tokio::test]
async fn with_client_admission_only_redirected_sources_reach_q() {
    let home = TestLabel::new("home").with("clientAdmission: Redirected");
    let relay = TestRelay::start(&[&home]).await;
    let mut hidden = relay.park(&home).await;
    // 127.0.0.4 never asked for a 307: closed, the parked connection stays.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
    let mut drainer = socket
        .connect(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            relay.q("home"),
        )))
        .await
        .unwrap();
    drainer.write_all(b"drain").await.unwrap();
    assert_closed(&mut drainer).await;
    assert_eq!(relay.parked("home"), 1);
    // 127.0.0.1 got its 307 first: admitted.
    assert_eq!(relay.mobile_get("home", "/").await.status, 307);
    let mut client = relay.client("home").await;
    echo_both(&mut client, &mut hidden, b"admitted").await;
}

#[tokio::test]
async fn reloading_the_directory_adds_and_removes_labels_without_dropping_other_pairs() {
    let home = TestLabel::new("home");
    let gone = TestLabel::new("gone");
    let relay = TestRelay::start(&[&home, &gone]).await;
    let mut hidden = relay.park(&home).await;
    let mut client = relay.client("home").await;
    echo_both(&mut client, &mut hidden, b"before reload").await;
    let _parked_home = relay.park(&home).await;

    // Add one label, remove another, and break a third file: the valid ones apply.
    let added = TestLabel::new("added");
    write_label(&relay.labels_dir, &added);
    std::fs::remove_file(relay.labels_dir.join("gone.yaml")).unwrap();
    std::fs::write(relay.labels_dir.join("broken.yaml"), "kind: [unclosed").unwrap();
    eventually("reload applied", || async {
        relay.standalone.relay.label("added").is_some()
            && relay.standalone.relay.label("gone").is_none()
    })
    .await;
    let _parked_added = relay.park(&added).await;
    assert_eq!(relay.mobile_get("gone", "/").await.status, 404);

    // The pair and the parked connection of "home" were not touched.
    echo_both(&mut client, &mut hidden, b"after reload").await;
    hidden.write_all(b"!").await.unwrap();
    let mut one = [0u8; 1];
    client.read_exact(&mut one).await.unwrap();
    assert_eq!(relay.parked("home"), 1);
}

#[tokio::test]
async fn a_parked_connection_flooding_before_pairing_is_dropped_at_the_limit() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut hidden = relay.park(&home).await;
    let limit = taas_relay::config::Limits::default().early_bytes;
    let _ = hidden.write_all(&vec![b'x'; limit + 1]).await;
    relay.wait_parked("home", 0).await;
    // Below the limit, nothing is dropped.
    let mut polite = relay.park(&home).await;
    polite.write_all(&vec![b'y'; limit / 2]).await.unwrap();
    let mut client = relay.client("home").await;
    let mut got = vec![0u8; limit / 2];
    client.read_exact(&mut got).await.unwrap();
    assert!(got.iter().all(|b| *b == b'y'));
}

#[tokio::test]
async fn a_client_that_leaves_without_a_byte_does_not_use_up_a_parked_connection() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut hidden = relay.park(&home).await;
    // Port scans and health checks: connect and close, or reset.
    for reset in [false, true, false] {
        let client = relay.client("home").await;
        if reset {
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(client);
        relay.wait_parked("home", 1).await;
    }
    // The hidden server saw nothing, and still serves the next real client.
    let mut client = relay.client("home").await;
    echo_both(&mut client, &mut hidden, b"a real request").await;
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_pairings_total{label=\"home\",entry=\"own_port\"} 1"),
        "{metrics}"
    );
}
