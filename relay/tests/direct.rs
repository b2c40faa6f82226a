//! Direct labels (issue 15, item 2, standalone `serve`): `https://LABEL.<domain>/` on the
//! front end's own HTTPS port reaches the hidden server with TLS end to end (the relay never
//! has its certificate), no 307. Over real sockets, through `TestRelay`: curl with a plain URL,
//! the ClientHello delivered byte for byte, the registrar and other labels' 307s unchanged on
//! the same port, a client with no parked connection refused after the client wait, the switch
//! to and from direct without restart, and silent or stalled peers cut at the handshake
//! deadline without blocking a registration. A real browser (Chromium, driven by Playwright) is tested by `scripts/browser/run.sh`.
//! Figures: `--nocapture`, lines starting `figure:`.

use std::time::{Duration, Instant};

use taas_testkit::agent::Agent;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

fn direct(label: &str) -> TestLabel {
    TestLabel::new(label).with("direct: true")
}

fn is_direct(relay: &TestRelay, label: &str) -> bool {
    relay
        .standalone
        .relay
        .label(label)
        .is_some_and(|l| l.config().direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_plain_url_gets_the_hidden_servers_page_with_no_307() {
    let home = direct("home");
    let relay = TestRelay::start(&[&home]).await;
    let page = TlsPage::start(&format!("home.{DOMAIN}"), "hello, directly").await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, page.addr, 2, |_| {});
    relay.wait_parked("home", 2).await;
    // Trust only the hidden server's certificate: the relay's would not do.
    page.assert_served_directly(
        &format!("home.{DOMAIN}"),
        relay.addr().port(),
        relay.dir.path(),
    )
    .await;
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "direct")), 1.0);
    assert_eq!(metric(&metrics, &paired("home", "own_port")), 0.0);
    assert_eq!(
        metric(&metrics, "taas_redirects_total{label=\"home\"}"),
        0.0,
        "no 307 was sent"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_hello_reaches_the_hidden_server_unchanged() {
    let home = direct("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut parked = relay.park(&home).await;
    assert_client_hello_passes_unchanged(relay.addr(), &format!("home.{DOMAIN}"), &mut parked)
        .await;
}

/// As on q, a direct client's connection carries a relayed connection's socket options (no
/// Nagle, keepalive), inherited from the HTTPS port's listener: seen as the kernel's
/// keepalive timer on the relay's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_client_is_kept_alive_on_the_relays_side_as_on_q() {
    let home = direct("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut parked = relay.park(&home).await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut client = TcpStream::connect(relay.addr()).await.unwrap();
    client.write_all(&hello).await.unwrap();
    assert_relayed_both_ways(&mut client, &mut parked, &hello, PATIENCE).await;
    assert_eq!(
        taas_testkit::readings::keepalive_armed(relay.addr(), client.local_addr().unwrap()),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrar_and_a_non_direct_labels_307_still_work_on_the_same_port() {
    let home = direct("home");
    let work = TestLabel::new("work");
    let relay = TestRelay::start(&[&home, &work]).await;
    // The registrar (TLS terminated by the relay, SNI: the registrar's name) registers both.
    let _work_parked = relay.park(&work).await;
    let home_parked = relay.park(&home).await;
    // A non-direct label: TLS with the relay's certificate for `work.<domain>`, then a 307.
    let mut tls = tls_connect(relay.addr(), relay.ca(), &format!("work.{DOMAIN}")).await;
    tls.write_all(
        format!(
            "GET /x?y=1 HTTP/1.1\r\nHost: work.{DOMAIN}:{}\r\nConnection: close\r\n\r\n",
            relay.addr().port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 307);
    assert_eq!(
        response.header("location"),
        Some(format!("https://work.{DOMAIN}:{}/x?y=1", relay.q("work")).as_str())
    );
    // The direct label on the same port: its hidden server's TLS, no 307.
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(home_parked, &host, "home: ");
    assert_eq!(
        hello_over_tls(relay.addr(), &cert_pem, &host).await,
        "home: hello"
    );
    hidden.await.unwrap();
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "direct")), 1.0);
    assert_eq!(
        metric(&metrics, "taas_redirects_total{label=\"work\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_for_a_direct_label_reached_without_its_server_name_is_answered_as_today() {
    let home = direct("home");
    let relay = TestRelay::start(&[&home]).await;
    let _parked = relay.park(&home).await;
    // SNI: the registrar (any name but the label's), Host: the direct label.
    let response = relay.mobile_get("home", "/a").await;
    assert_eq!(response.status, 307);
    assert_eq!(
        response.header("location"),
        Some(format!("https://home.{DOMAIN}:{}/a", relay.q("home")).as_str())
    );
    // An IP literal: no server name in the ClientHello, the relay's own TLS.
    let mut tls = tls_connect(relay.addr(), relay.ca(), "127.0.0.1").await;
    tls.write_all(
        format!("GET /b HTTP/1.1\r\nHost: home.{DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 307);
    assert_eq!(
        relay.parked("home"),
        1,
        "the parked connection was not used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_client_with_no_parked_connection_is_closed_after_the_client_wait_and_counted() {
    let client_wait = Duration::from_millis(600);
    let home = direct("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.timeouts.client_wait = client_wait;
    })
    .await;
    let started = Instant::now();
    let mut client = TcpStream::connect(relay.addr()).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    let waited = started.elapsed();
    figure(
        "a direct client with nothing parked closed after",
        format!("{:.0} ms", waited.as_secs_f64() * 1e3),
    );
    assert!(waited >= client_wait, "{waited:?}");
    eventually("the refusal is counted", || async {
        metric(
            &relay.metrics().await,
            "taas_clients_refused_total{label=\"home\",kind=\"timeout\"}",
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_a_labels_file_to_direct_false_and_back_takes_effect_without_restart() {
    let home = direct("home");
    let relay = TestRelay::start(&[&home]).await;
    let host = format!("home.{DOMAIN}");
    let direct_pairing = |answer: &'static str| {
        let (relay, home, host) = (&relay, &home, host.clone());
        async move {
            let parked = relay.park(home).await;
            let (cert_pem, hidden) = hidden_tls_server(parked, &host, answer);
            let got = hello_over_tls(relay.addr(), &cert_pem, &host).await;
            hidden.await.unwrap();
            got
        }
    };
    assert_eq!(direct_pairing("first: ").await, "first: hello");

    // Off: the same name gets the relay's own TLS and a 307.
    let plain = TestLabel {
        spec_extra: String::new(),
        ..home.clone()
    };
    write_label(&relay.labels_dir, &plain);
    eventually("home is no longer direct", || async {
        !is_direct(&relay, "home")
    })
    .await;
    let _parked = relay.park(&plain).await;
    let mut tls = tls_connect(relay.addr(), relay.ca(), &host).await;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(read_response(&mut tls).await.status, 307);

    // On again.
    write_label(&relay.labels_dir, &home);
    eventually("home is direct again", || async {
        is_direct(&relay, "home")
    })
    .await;
    drop(_parked);
    eventually("the old parked connection is gone", || async {
        relay.parked("home") == 0
    })
    .await;
    assert_eq!(direct_pairing("again: ").await, "again: hello");
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "direct")), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_stalled_peers_on_the_front_end_are_cut_at_the_deadline_and_block_no_registration(
) {
    let handshake = Duration::from_millis(1500);
    let home = direct("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.timeouts.handshake = handshake;
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(relay.addr()).await.unwrap();
    let mut stalled = TcpStream::connect(relay.addr()).await.unwrap();
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    stalled.write_all(&hello[..1]).await.unwrap();

    // Meanwhile a registration is answered at once.
    let registered_at = Instant::now();
    let _parked = relay.park(&home).await;
    let registered_in = registered_at.elapsed();
    figure(
        "a registration while two slow peers are held",
        format!("{:.0} ms", registered_in.as_secs_f64() * 1e3),
    );
    assert!(registered_in < handshake, "{registered_in:?}");

    assert_closed(&mut silent).await;
    let silent_cut = started.elapsed();
    assert_closed(&mut stalled).await;
    let stalled_cut = started.elapsed();
    figure(
        "silent peer cut after",
        format!("{:.0} ms", silent_cut.as_secs_f64() * 1e3),
    );
    figure(
        "one-byte-and-stall peer cut after",
        format!("{:.0} ms", stalled_cut.as_secs_f64() * 1e3),
    );
    for cut in [silent_cut, stalled_cut] {
        assert!(cut >= handshake - Duration::from_millis(50), "{cut:?}");
        assert!(
            cut < handshake + PATIENCE / 2,
            "cut at the deadline: {cut:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_client_counts_in_the_labels_per_source_cap_as_on_q() {
    let home = direct("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.limits.clients_per_source_per_label = 1;
    })
    .await;
    let mut parked = relay.park(&home).await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    // The first client is paired and holds its slot.
    let mut first = TcpStream::connect(relay.addr()).await.unwrap();
    first.write_all(&hello).await.unwrap();
    let mut seen = vec![0u8; hello.len()];
    tokio::time::timeout(PATIENCE, parked.read_exact(&mut seen))
        .await
        .unwrap()
        .unwrap();
    // A second from the same source is over the label's cap: closed and counted.
    let mut second = TcpStream::connect(relay.addr()).await.unwrap();
    second.write_all(&hello).await.unwrap();
    assert_closed(&mut second).await;
    eventually("the refusal is counted", || async {
        metric(
            &relay.metrics().await,
            "taas_clients_refused_total{label=\"home\",kind=\"source_limit\"}",
        ) == 1.0
    })
    .await;
    // The first is still spliced.
    parked.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(PATIENCE, first.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"still here");
}
