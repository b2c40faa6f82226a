//! The shared client port (issue 15, item 1, standalone): one port for every label, routed by
//! the ClientHello's server name without decrypting. Over real sockets, through `TestRelay`:
//! TLS end to end by the hidden server's own certificate, the ClientHello delivered
//! byte-for-byte, curl following the 307 to it, two labels on one port, refusals counted by
//! reason, deadlines for silent, stalled and dripping peers, the per-source cap, and the
//! label's own q alongside. Other loopback addresses (127.0.0.x) stand in for other hosts.
//! Figures: `--nocapture`, lines starting `figure:`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use taas_relay::splice::SpliceMode;
use taas_testkit::agent::Agent;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

fn refused(reason: &str) -> String {
    format!("taas_shared_port_refused_total{{reason=\"{reason}\"}}")
}

/// Waits (bounded) until the relay has counted `n` shared-port refusals for `reason`.
async fn wait_refused(relay: &TestRelay, reason: &str, n: f64) {
    eventually(&format!("{n} refusals for {reason}"), || async {
        metric(&relay.metrics().await, &refused(reason)) >= n
    })
    .await;
}

/// A TCP connection to the shared port from the loopback address `source`.
async fn connect_from(source: &str, relay: &TestRelay) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(relay.shared_addr()).await.unwrap()
}

/// On both ways a pair can move bytes: the ClientHello read ahead goes first, then the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_through_the_shared_port_reaches_the_hidden_server_over_its_own_tls() {
    for mode in [SpliceMode::Copy, SpliceMode::Kernel] {
        shared_port_over_its_own_tls(mode).await;
    }
}

async fn shared_port_over_its_own_tls(mode: SpliceMode) {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.splice = mode;
    })
    .await;
    let parked = relay.park(&home).await;
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(parked, &host, "home says: ");
    let answer = hello_over_tls(relay.shared_addr(), &cert_pem, &host).await;
    assert_eq!(answer, "home says: hello");
    hidden.await.unwrap();
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "shared_port")), 1.0);
    assert_eq!(metric(&metrics, &paired("home", "own_port")), 0.0);
    assert_eq!(relay.parked("home"), 0, "the parked connection was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_hello_reaches_the_hidden_server_byte_for_byte() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_shared(&[&home]).await;
    let mut parked = relay.park(&home).await;
    assert_client_hello_passes_unchanged(
        relay.shared_addr(),
        &format!("home.{DOMAIN}"),
        &mut parked,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_labels_on_one_shared_port_each_reach_their_own_hidden_server() {
    let home = TestLabel::new("home");
    let work = TestLabel::new("work");
    let relay = TestRelay::start_shared(&[&home, &work]).await;
    let home_host = format!("home.{DOMAIN}");
    let work_host = format!("work.{DOMAIN}");
    let (home_pem, home_task) = hidden_tls_server(relay.park(&home).await, &home_host, "home: ");
    let (work_pem, work_task) = hidden_tls_server(relay.park(&work).await, &work_host, "work: ");
    // Upper case on the wire: names are compared case-insensitively.
    let home_upper = home_host.to_uppercase();
    let (home_answer, work_answer) = tokio::join!(
        hello_over_tls(relay.shared_addr(), &home_pem, &home_upper),
        hello_over_tls(relay.shared_addr(), &work_pem, &work_host),
    );
    assert_eq!(home_answer, "home: hello");
    assert_eq!(work_answer, "work: hello");
    home_task.await.unwrap();
    work_task.await.unwrap();
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "shared_port")), 1.0);
    assert_eq!(metric(&metrics, &paired("work", "shared_port")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_307_names_the_shared_port_and_keeps_path_and_query() {
    let home = TestLabel::new("home");
    let ssh = TestLabel::new("ssh")
        .with("serverSpeaksFirst: true")
        .with("proxyProtocol: v1");
    let relay = TestRelay::start_shared(&[&home, &ssh]).await;
    let _home_parked = relay.park(&home).await;
    let _ssh_parked = relay.park(&ssh).await;
    let response = relay.mobile_get("home", "/a/b?c=d").await;
    assert_eq!(response.status, 307);
    assert_eq!(
        response.header("location"),
        Some(format!("https://home.{DOMAIN}:{}/a/b?c=d", relay.shared_port()).as_str())
    );
    // A label whose server speaks first cannot be named on the shared port: its q.
    let response = relay.mobile_get("ssh", "/").await;
    assert_eq!(
        response.header("location"),
        Some(format!("https://ssh.{DOMAIN}:{}/", relay.q("ssh")).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redirect_host_advertise_the_307_keeps_the_labels_own_q() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.redirect_host = taas_relay::config::RedirectHost::Advertise;
    })
    .await;
    let _parked = relay.park(&home).await;
    let response = relay.mobile_get("home", "/x").await;
    assert_eq!(
        response.header("location"),
        Some(format!("https://127.0.0.1:{}/x", relay.q("home")).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shared_port_off_by_default_no_extra_port_is_opened_and_the_307_names_q() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    assert_eq!(relay.standalone.shared_port, None);
    assert_eq!(relay.standalone.relay.settings().shared_port, None);
    let _parked = relay.park(&home).await;
    let response = relay.mobile_get("home", "/").await;
    assert_eq!(
        response.header("location"),
        Some(format!("https://home.{DOMAIN}:{}/", relay.q("home")).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_labels_own_q_still_works_alongside_the_shared_port() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_shared(&[&home]).await;
    let mut parked = relay.park(&home).await;
    let mut client = relay.client("home").await;
    client.write_all(b"plain bytes on q").await.unwrap();
    let mut seen = [0u8; 16];
    tokio::time::timeout(PATIENCE, parked.read_exact(&mut seen))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&seen, b"plain bytes on q");
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "own_port")), 1.0);
    assert_eq!(metric(&metrics, &paired("home", "shared_port")), 0.0);
}

/// A CA bundle trusting both the relay's certificate and the hidden server's own.
fn bundle(relay: &TestRelay, page: &TlsPage) -> PathBuf {
    let mut pem = std::fs::read_to_string(relay.ca()).unwrap();
    pem.push_str(&page.cert_pem);
    let path = relay.dir.path().join("bundle.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_following_the_307_lands_on_the_shared_port_and_gets_the_page() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_shared(&[&home]).await;
    let page = TlsPage::start(&format!("home.{DOMAIN}"), "hello through the shared port").await;
    let agent = Agent::start(relay.addr(), relay.ca(), &home, page.addr, 2, |_| {});
    relay.wait_parked("home", 2).await;
    let cacert = bundle(&relay, &page);
    // *.localhost resolves to loopback in curl: no --resolve needed.
    let url = format!(
        "https://home.{DOMAIN}:{}/index.html?q=1",
        relay.addr().port()
    );
    let body = curl(&url, &cacert, &["-L"], "\nlanded: %{url_effective}").await;
    assert!(body.contains("hello through the shared port"), "{body}");
    assert!(
        body.contains("request: GET /index.html?q=1 HTTP/1.1"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "landed: https://home.{DOMAIN}:{}/index.html?q=1",
            relay.shared_port()
        )),
        "{body}"
    );
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, &paired("home", "shared_port")), 1.0);
    drop(agent);
}

/// Sends `bytes` to the shared port and checks the relay closes the connection without a
/// byte back.
async fn refused_without_an_answer(relay: &TestRelay, bytes: &[u8]) {
    let mut client = TcpStream::connect(relay.shared_addr()).await.unwrap();
    // The relay may close while we still write (an oversize hello): that is a refusal too.
    let _ = client.write_all(bytes).await;
    assert_closed(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_missing_names_plain_http_garbage_and_oversize_hellos_are_refused_and_counted(
) {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_shared(&[&home]).await;
    refused_without_an_answer(&relay, &client_hello(Some(&format!("nobody.{DOMAIN}")))).await;
    refused_without_an_answer(&relay, &client_hello(Some("home.elsewhere.example"))).await;
    // A dotted LABEL is routed as the 307's Host dispatch does: `a.home` is no label here.
    refused_without_an_answer(&relay, &client_hello(Some(&format!("a.home.{DOMAIN}")))).await;
    // The domain itself names no label.
    refused_without_an_answer(&relay, &client_hello(Some(DOMAIN))).await;
    refused_without_an_answer(&relay, &client_hello(None)).await;
    refused_without_an_answer(
        &relay,
        format!("GET / HTTP/1.1\r\nHost: home.{DOMAIN}\r\n\r\n").as_bytes(),
    )
    .await;
    refused_without_an_answer(&relay, &[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0]).await;
    // A handshake record announcing a ClientHello larger than the relay reads.
    let mut oversize = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x80, 0x00];
    oversize.resize(20 * 1024, 0);
    refused_without_an_answer(&relay, &oversize).await;

    wait_refused(&relay, "unknown_name", 2.0).await;
    wait_refused(&relay, "outside_domain", 2.0).await;
    wait_refused(&relay, "no_server_name", 1.0).await;
    wait_refused(&relay, "not_client_hello", 2.0).await;
    wait_refused(&relay, "too_large", 1.0).await;
    let metrics = relay.metrics().await;
    assert!(
        !metrics.contains("nobody"),
        "names from strangers create no series"
    );

    // The relay and the label keep serving.
    let parked = relay.park(&home).await;
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(parked, &host, "still: ");
    assert_eq!(
        hello_over_tls(relay.shared_addr(), &cert_pem, &host).await,
        "still: hello"
    );
    hidden.await.unwrap();
    assert_eq!(relay.parked("home"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_whose_server_speaks_first_is_refused_on_the_shared_port_and_counted() {
    let ssh = TestLabel::new("ssh")
        .with("serverSpeaksFirst: true")
        .with("proxyProtocol: v1");
    let relay = TestRelay::start_shared(&[&ssh]).await;
    let _parked = relay.park(&ssh).await;
    refused_without_an_answer(&relay, &client_hello(Some(&format!("ssh.{DOMAIN}")))).await;
    wait_refused(&relay, "server_speaks_first", 1.0).await;
    assert_eq!(
        relay.parked("ssh"),
        1,
        "the parked connection was not touched"
    );
}

/// Sends `hello` one byte at a time every `every`, until the relay closes the connection;
/// returns how long that took.
async fn drip(mut client: TcpStream, hello: Vec<u8>, every: Duration) -> Duration {
    let started = Instant::now();
    for byte in hello {
        if client.write_all(&[byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(every).await;
        let mut probe = [0u8; 1];
        match client.try_read(&mut probe) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => break,
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stalled_and_dripping_peers_are_cut_at_the_deadline_and_block_no_one() {
    let first_byte = Duration::from_millis(500);
    let handshake = Duration::from_millis(1500);
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.timeouts.first_byte = first_byte;
        options.timeouts.handshake = handshake;
    })
    .await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let started = Instant::now();
    let mut silent = connect_from("127.0.0.2", &relay).await;
    let mut stalled = connect_from("127.0.0.3", &relay).await;
    stalled.write_all(&hello[..1]).await.unwrap();
    let dripping = tokio::spawn(drip(
        connect_from("127.0.0.4", &relay).await,
        hello.clone(),
        Duration::from_millis(100),
    ));

    // Meanwhile a real client is served at once.
    let parked = relay.park(&home).await;
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(parked, &host, "served: ");
    let served_at = Instant::now();
    assert_eq!(
        hello_over_tls(relay.shared_addr(), &cert_pem, &host).await,
        "served: hello"
    );
    hidden.await.unwrap();
    let served_in = served_at.elapsed();
    figure(
        "a client served while three slow peers are held",
        format!("{:.0} ms", served_in.as_secs_f64() * 1e3),
    );
    assert!(
        served_in < first_byte,
        "served without waiting for the slow peers: {served_in:?}"
    );

    assert_closed(&mut silent).await;
    let silent_cut = started.elapsed();
    assert_closed(&mut stalled).await;
    let stalled_cut = started.elapsed();
    let drip_cut = tokio::time::timeout(PATIENCE, dripping)
        .await
        .unwrap()
        .unwrap();
    figure(
        "silent peer cut after",
        format!("{:.0} ms", silent_cut.as_secs_f64() * 1e3),
    );
    figure(
        "one-byte-and-stall peer cut after",
        format!("{:.0} ms", stalled_cut.as_secs_f64() * 1e3),
    );
    figure(
        "slow-drip peer cut after",
        format!("{:.0} ms", drip_cut.as_secs_f64() * 1e3),
    );
    assert!(silent_cut >= first_byte, "{silent_cut:?}");
    assert!(stalled_cut >= handshake, "{stalled_cut:?}");
    assert!(
        drip_cut >= handshake - Duration::from_millis(100),
        "{drip_cut:?}"
    );
    assert!(
        drip_cut < handshake + PATIENCE / 2,
        "cut at the deadline: {drip_cut:?}"
    );
    wait_refused(&relay, "silent", 1.0).await;
    wait_refused(&relay, "deadline", 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_source_hits_the_per_source_cap_while_another_source_gets_through() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.limits.clients_per_source = 5;
    })
    .await;
    // Five connections from one source, each holding half a ClientHello.
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut flood = Vec::new();
    for _ in 0..5 {
        let mut held = connect_from("127.0.0.2", &relay).await;
        held.write_all(&hello[..hello.len() / 2]).await.unwrap();
        flood.push(held);
    }
    // The five are counted (accepted and reading) before the sixth arrives.
    let source = taas_relay::sources::SourceKey::of([127, 0, 0, 2].into());
    eventually("five connections counted from 127.0.0.2", || async {
        relay.standalone.relay.client_sources().open(source) == 5
    })
    .await;
    let mut sixth = connect_from("127.0.0.2", &relay).await;
    assert_closed(&mut sixth).await;
    wait_refused(&relay, "source_limit", 1.0).await;

    // Another source is served.
    let parked = relay.park(&home).await;
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(parked, &host, "other source: ");
    let mut tls = tls_connect_from("127.0.0.3", &relay, &cert_pem, &host).await;
    tls.write_all(b"hello").await.unwrap();
    assert_eq!(read_to_end(&mut tls).await, b"other source: hello");
    hidden.await.unwrap();
    drop(flood);
}

/// `tls_connect_trusting` from another loopback source.
async fn tls_connect_from(
    source: &str,
    relay: &TestRelay,
    cert_pem: &str,
    name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = connect_from(source, relay).await;
    let (config, server_name) = trusting(cert_pem, name);
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .unwrap()
}

fn trusting(
    cert_pem: &str,
    name: &str,
) -> (
    std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    rustls_pki_types::ServerName<'static>,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert_pem).unwrap();
    let config =
        taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca)).unwrap();
    (
        config,
        rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_reading_their_client_hello_are_capped_relay_wide() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.limits.frontend_connections = 3;
    })
    .await;
    let mut held = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let mut stream = connect_from(source, &relay).await;
        stream.write_all(&[0x16]).await.unwrap();
        held.push(stream);
    }
    let mut fourth = connect_from("127.0.0.5", &relay).await;
    assert_closed(&mut fourth).await;
    wait_refused(&relay, "overloaded", 1.0).await;
    // Once they go, a client gets through again.
    drop(held);
    let parked = relay.park(&home).await;
    let host = format!("home.{DOMAIN}");
    let (cert_pem, hidden) = hidden_tls_server(parked, &host, "after: ");
    assert_eq!(
        hello_over_tls(relay.shared_addr(), &cert_pem, &host).await,
        "after: hello"
    );
    hidden.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_no_parked_connection_waits_then_is_refused_as_on_q() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |options| {
        options.shared_port = Some(0);
        options.timeouts.client_wait = Duration::from_millis(300);
    })
    .await;
    let mut client = TcpStream::connect(relay.shared_addr()).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    eventually("a timeout counted on the label", || async {
        metric(
            &relay.metrics().await,
            "taas_clients_refused_total{label=\"home\",kind=\"timeout\"}",
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_admission_holds_on_the_shared_port_too_only_a_redirected_source_is_served() {
    let home = TestLabel::new("home").with("clientAdmission: Redirected");
    let relay = TestRelay::start_shared(&[&home]).await;
    let mut parked = relay.park(&home).await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    // 127.0.0.2 got no 307: closed, the parked connection untouched.
    let mut stranger = connect_from("127.0.0.2", &relay).await;
    stranger.write_all(&hello).await.unwrap();
    assert_closed(&mut stranger).await;
    eventually("not_admitted counted", || async {
        metric(
            &relay.metrics().await,
            "taas_clients_refused_total{label=\"home\",kind=\"not_admitted\"}",
        ) == 1.0
    })
    .await;
    assert_eq!(relay.parked("home"), 1);
    // The front end's client (127.0.0.1) gets its 307, then goes through.
    assert_eq!(relay.mobile_get("home", "/").await.status, 307);
    let mut client = connect_from("127.0.0.1", &relay).await;
    client.write_all(&hello).await.unwrap();
    let mut seen = vec![0u8; hello.len()];
    tokio::time::timeout(PATIENCE, parked.read_exact(&mut seen))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, hello);
}

/// The shared port accepts on every data-plane thread (one `SO_REUSEPORT` socket each) and
/// serves a connection in place when its label lives on the accepting thread, handing it over
/// otherwise. With three threads and three labels (one per thread: labels go to the least busy
/// thread), a dozen clients per label land on every thread: both paths pair, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_port_clients_pair_whichever_data_plane_thread_accepts_them() {
    let labels = [
        TestLabel::new("home"),
        TestLabel::new("work"),
        TestLabel::new("shop"),
    ];
    let relay = TestRelay::start_with(&labels.iter().collect::<Vec<_>>(), |options| {
        options.shared_port = Some(0);
        options.data_threads = std::num::NonZeroUsize::new(3);
    })
    .await;
    for label in &labels {
        for _ in 0..12 {
            let mut parked = relay.park(label).await;
            let host = format!("{}.{DOMAIN}", label.label);
            let hello = client_hello(Some(&host));
            let mut client = TcpStream::connect(relay.shared_addr()).await.unwrap();
            client.write_all(&hello).await.unwrap();
            assert_relayed_both_ways(&mut client, &mut parked, &hello, PATIENCE).await;
        }
    }
    let metrics = relay.metrics().await;
    for label in &labels {
        assert_eq!(metric(&metrics, &paired(&label.label, "shared_port")), 12.0);
    }
}

/// Taking the shared port by `SO_REUSEPORT` must not let a second relay share it silently:
/// one started on a port in use fails, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_shared_port_in_use_fails_to_start() {
    let home = TestLabel::new("home");
    let first = TestRelay::start_shared(&[&home]).await;
    let port = first.shared_port();
    let dir = tempfile::tempdir().unwrap();
    let options = taas_relay::run::standalone::ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        labels: dir.path().join("labels"),
        state_dir: dir.path().join("state"),
        metrics: None,
        shared_port: Some(port),
        ..Default::default()
    };
    std::fs::create_dir_all(&options.labels).unwrap();
    let error = taas_relay::run::standalone::start(options)
        .await
        .err()
        .expect("the port is taken");
    assert!(error.to_string().contains("cannot listen"), "{error}");
}
