//! Cluster mode over loopback: `taas-relay gateway` in front of per-label relays
//! (`label-relay`), as the operator runs them. Registrations and mobile requests reach the
//! right relay; answers carry the external addresses; the original client address arrives;
//! unknown, unready and vanished relays get clean answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use taas_relay::config::{Limits, RedirectHost, Timeouts};
use taas_relay::gateway::{Route, UpstreamSettings};
use taas_relay::run::gateway::{self, GatewayOptions, RouteSource, RunningGateway};
use taas_relay::run::pod::{self as label_relay, LabelRelay, LabelRelayOptions};
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The install secret the test gateways read (the chart generates 32 random characters).
const INSTALL_SECRET: &str = "0123456789abcdef0123456789abcdef\n";

/// LABEL's gateway token under [`INSTALL_SECRET`]: what its relay is given.
fn gateway_token(label: &str) -> taas_relay::gateway_auth::GatewayToken {
    taas_relay::gateway_auth::InstallSecret::new(INSTALL_SECRET.as_bytes())
        .unwrap()
        .token_for(label)
}

struct Cluster {
    dir: tempfile::TempDir,
    gateway: RunningGateway,
}

struct PodRelay {
    relay: LabelRelay,
    external_file: PathBuf,
    client_port: u16,
}

fn write_external(path: &Path, host: &str, ports: &[(u16, u16)]) {
    let mut text = format!("host: \"{host}\"\nports:\n");
    for (local, external) in ports {
        text.push_str(&format!("  {local}: {external}\n"));
    }
    if ports.is_empty() {
        text = format!("host: \"{host}\"\n");
    }
    std::fs::write(path, text).unwrap();
}

async fn start_label_relay(dir: &Path, label: &TestLabel, redirect_host: RedirectHost) -> PodRelay {
    let options = label_relay_options(dir, label, 8, &["127.0.0.1/32"]);
    let client_port = options.client_port;
    let external_file = dir.join(&label.label).join("external.yaml");
    write_external(&external_file, "127.0.0.1", &[]);
    let relay = label_relay::start(LabelRelayOptions {
        external_file: Some(external_file.clone()),
        gateway_token: Some(gateway_token(&label.label)),
        redirect_host,
        metrics: None,
        reload_interval: Duration::from_millis(50),
        limits: Limits::default(),
        ..options
    })
    .await
    .expect("label relay starts");
    PodRelay {
        relay,
        external_file,
        client_port,
    }
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut GatewayOptions, &Path)) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), "{}\n").unwrap();
        std::fs::write(dir.path().join("install-secret"), INSTALL_SECRET).unwrap();
        let mut options = GatewayOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            registrar: REGISTRAR.into(),
            domain: DOMAIN.into(),
            tls_cert: None,
            tls_key: None,
            state_dir: dir.path().join("state"),
            routes: RouteSource::File(dir.path().join("routes.yaml")),
            reload_interval: Duration::from_millis(50),
            metrics: None,
            timeouts: Timeouts::default(),
            max_connections: 1024,
            max_connections_per_source: 1024,
            // As the chart runs it: relays checking gateway tokens accept this gateway.
            install_secret_file: Some(dir.path().join("install-secret")),
            upstream: UpstreamSettings::default(),
            ..GatewayOptions::new(RouteSource::File(dir.path().join("routes.yaml")))
        };
        adjust(&mut options, dir.path());
        let gateway = gateway::start(options).await.expect("gateway starts");
        Self { dir, gateway }
    }

    fn set_routes(&self, routes: &[(&str, String, bool)]) {
        let map: HashMap<&str, Route> = routes
            .iter()
            .map(|(label, relay, ready)| {
                (
                    *label,
                    Route {
                        ready: *ready,
                        ..Route::new(relay.clone())
                    },
                )
            })
            .collect();
        let mut text = String::new();
        for (label, route) in &map {
            text.push_str(&format!(
                "{label}: {{relay: \"{}\", ready: {}}}\n",
                route.relay, route.ready
            ));
        }
        std::fs::write(self.dir.path().join("routes.yaml"), text).unwrap();
    }

    async fn wait_route(&self, label: &str, ready: bool) {
        eventually("route applied", || async {
            self.gateway
                .routes
                .get(label)
                .is_some_and(|r| r.ready == ready)
        })
        .await;
    }

    async fn tls_from(&self, source: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
        let gateway = &self.gateway;
        tls_connect_from(source, gateway.frontend, &gateway.cert.cert, REGISTRAR).await
    }

    async fn raw_from(&self, source: &str, raw: &str) -> Response {
        let mut tls = self.tls_from(source).await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    }

    async fn metrics(&self) -> String {
        taas_testkit::readings::scrape(self.gateway.metrics.expect("metrics enabled")).await
    }

    async fn register_from(&self, source: &str, label: &TestLabel) -> Response {
        let request = steward_request(
            &label.label,
            self.gateway.frontend.port(),
            &label.authorization(),
        );
        self.raw_from(source, &request).await
    }

    async fn mobile_get(&self, label: &str, path: &str) -> Response {
        self.raw_from(
            "127.0.0.1",
            &format!("GET {path} HTTP/1.1\r\nHost: {label}.{DOMAIN}\r\nConnection: close\r\n\r\n"),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_clients_reach_the_right_relay_with_external_addresses() {
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let lab = TestLabel::new("lab");
    let home_pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Advertise).await;
    let lab_pod = start_label_relay(cluster.dir.path(), &lab, RedirectHost::Advertise).await;
    cluster.set_routes(&[
        ("home", home_pod.relay.control.to_string(), true),
        ("lab", lab_pod.relay.control.to_string(), true),
    ]);
    cluster.wait_route("lab", true).await;

    // The Service maps the pod's ports: the answers carry the external ones.
    let external_q = 31_000;
    let p_range = home_pod.relay.relay.settings().p_ports;
    let mut ports: Vec<(u16, u16)> = p_range.iter().map(|p| (p, p + 10_000)).collect();
    ports.push((home_pod.client_port, external_q));
    write_external(&home_pod.external_file, "203.0.113.7", &ports);
    eventually("external address applied", || async {
        home_pod.relay.relay.external().host == "203.0.113.7"
    })
    .await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(response.status, 200, "{response:?}");
    let (host, port) = response.body_str().rsplit_once(':').unwrap();
    assert_eq!(host, "203.0.113.7");
    let port: u16 = port.parse().unwrap();
    assert!(p_range.contains(port - 10_000), "{port}");

    // Back to directly reachable addresses: the full path through the gateway works.
    write_external(&home_pod.external_file, "127.0.0.1", &[]);
    eventually("external address applied", || async {
        home_pod.relay.relay.external().host == "127.0.0.1"
    })
    .await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(response.status, 200);
    let mut hidden = TcpStream::connect(response.body_str()).await.unwrap();
    eventually("parked", || async {
        home_pod.relay.relay.label("home").unwrap().parked() == 1
    })
    .await;
    assert_eq!(
        lab_pod.relay.relay.label("lab").unwrap().parked(),
        0,
        "the other relay untouched"
    );

    let redirect = cluster.mobile_get("home", "/x?y=1").await;
    assert_eq!(redirect.status, 307);
    let location = redirect.header("location").unwrap();
    assert_eq!(
        location,
        format!("https://127.0.0.1:{}/x?y=1", home_pod.client_port)
    );
    let mut client = TcpStream::connect(("127.0.0.1", home_pod.client_port))
        .await
        .unwrap();
    client.write_all(b"through the gateway").await.unwrap();
    let mut got = [0u8; 19];
    hidden.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"through the gateway");

    // The lab label is served by its own relay.
    assert_eq!(cluster.mobile_get("lab", "/").await.status, 503);
    assert_eq!(cluster.register_from("127.0.0.1", &lab).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_names_the_requested_host_and_the_external_client_port() {
    // The default in a cluster: the 307 keeps LABEL.<domain>, the name the hidden server's
    // certificate carries, with the client port as the label's Service exposes it.
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    write_external(
        &pod.external_file,
        "203.0.113.7",
        &[(pod.client_port, 31000)],
    );
    eventually("external address applied", || async {
        pod.relay.relay.external().host == "203.0.113.7"
    })
    .await;
    cluster.set_routes(&[("home", pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(response.status, 200);
    assert!(
        response.body_str().starts_with("203.0.113.7:"),
        "{}",
        response.body_str()
    );
    // 203.0.113.7 stands for the Service's address; p itself is reached here directly.
    let (_, p) = response.body_str().rsplit_once(':').unwrap();
    let _parked = TcpStream::connect(("127.0.0.1", p.parse::<u16>().unwrap()))
        .await
        .unwrap();
    eventually("parked", || async {
        pod.relay.relay.label("home").unwrap().parked() == 1
    })
    .await;
    let redirect = cluster.mobile_get("home", "/x?y=1").await;
    assert_eq!(redirect.status, 307);
    assert_eq!(
        redirect.header("location").unwrap(),
        format!("https://home.{DOMAIN}:31000/x?y=1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_client_address_reaches_the_relay() {
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    cluster.set_routes(&[("home", pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    // Registered from 127.0.0.2 (through the gateway): p is pinned to 127.0.0.2, not to the
    // gateway's address.
    let response = cluster.register_from("127.0.0.2", &home).await;
    assert_eq!(response.status, 200);
    let p: SocketAddr = response.body_str().parse().unwrap();
    let mut wrong = TcpStream::connect(p).await.unwrap();
    assert_closed(&mut wrong).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let _right = socket.connect(p).await.unwrap();
    eventually("parked", || async {
        pod.relay.relay.label("home").unwrap().parked() == 1
    })
    .await;
}

#[tokio::test]
async fn a_client_address_header_from_a_peer_without_the_gateway_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start_label_relay(dir.path(), &home, RedirectHost::Requested).await;
    // 127.0.0.3 is no gateway: it has no gateway token, so its claim to be 127.0.0.2 is not
    // believed; the relay refuses the request outright (issue 13: relays trust nothing
    // without the token) and hands out no rendezvous port.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut control = socket.connect(pod.relay.control).await.unwrap();
    let request = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\ntaas-client-addr: 127.0.0.2\r\nConnection: close\r\n\r\n",
        home.authorization()
    );
    control.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut control).await;
    assert_eq!(response.status, 403);
    assert!(
        response.body_str().parse::<SocketAddr>().is_err(),
        "no HOST:PORT in a refusal: {:?}",
        response.body_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_unready_and_vanished_relays_get_clean_answers() {
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let gone = TestLabel::new("gone");
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    cluster.set_routes(&[
        ("home", "127.0.0.1:1".into(), false),
        ("gone", closed_port.to_string(), true),
    ]);
    cluster.wait_route("home", false).await;

    // Unknown label: 404 for clients, 401 for registrations (as a relay would answer).
    assert_eq!(cluster.mobile_get("nosuch", "/").await.status, 404);
    let stranger = TestLabel::new("nosuch");
    assert_eq!(
        cluster.register_from("127.0.0.1", &stranger).await.status,
        401
    );

    // Not ready: 503 with Retry-After.
    let response = cluster.mobile_get("home", "/").await;
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());
    assert_eq!(cluster.register_from("127.0.0.1", &home).await.status, 503);

    // The relay went away: a prompt 503, no hang.
    let started = Instant::now();
    let response = cluster.register_from("127.0.0.1", &gone).await;
    assert_eq!(response.status, 503);
    let response = cluster.mobile_get("gone", "/").await;
    assert_eq!(response.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // A relay that stops answering mid-way: its pod is dropped while the gateway holds an
    // upstream connection; the next request is answered, not hung.
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    cluster.set_routes(&[("home", pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    assert_eq!(cluster.mobile_get("home", "/").await.status, 503);
    drop(pod);
    let response = cluster.mobile_get("home", "/").await;
    assert_eq!(response.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_rendezvous_ports_are_asked_for_through_the_gateway() {
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let home_pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    cluster.set_routes(&[("home", home_pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    let p_range = home_pod.relay.relay.settings().p_ports;
    let request = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\nTAAS-Rendezvous-Count: 3\r\nConnection: close\r\n\r\n",
        home.authorization()
    );
    let response = cluster.raw_from("127.0.0.1", &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    let lines: Vec<&str> = response.body_str().split('\n').collect();
    assert_eq!(lines.len(), 3, "{response:?}");
    let mut parked = Vec::new();
    for line in lines {
        let p: std::net::SocketAddr = line.parse().unwrap();
        assert!(p_range.contains(p.port()), "{p}");
        parked.push(TcpStream::connect(p).await.unwrap());
    }
    eventually("parked", || async {
        home_pod.relay.relay.label("home").unwrap().parked() == 3
    })
    .await;
    // Without the header, the gateway's answer is the original single line.
    let single = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(single.status, 200);
    assert!(!single.body_str().contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_answers_is_used_before_its_route_says_ready() {
    // The ready flag reaches the gateway through a mounted ConfigMap, late; the relay's own
    // Service is the fresher signal, so an unready route is tried rather than refused.
    let cluster = Cluster::start().await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    cluster.set_routes(&[("home", pod.relay.control.to_string(), false)]);
    cluster.wait_route("home", false).await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(response.status, 200, "{response:?}");
}

/// A metric's value from Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The TCP connections with one end on 127.0.0.1:`port` (any state but LISTEN, TIME_WAIT
/// included), by the port of their other end: what the kernel holds, whoever closed first.
fn connections_to(port: u16) -> std::collections::HashSet<u16> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let endpoint = |field: &str| {
        let (ip, port) = field.split_once(':').unwrap();
        (ip.to_string(), u16::from_str_radix(port, 16).unwrap())
    };
    let loopback = "0100007F";
    let mut others = std::collections::HashSet::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, state) = (endpoint(fields[1]), endpoint(fields[2]), fields[3]);
        if state == "0A" {
            continue;
        }
        if remote == (loopback.to_string(), port) {
            others.insert(local.1);
        } else if local == (loopback.to_string(), port) {
            others.insert(remote.1);
        }
    }
    others
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_client_requests_on_one_connection_open_a_handful_of_upstream_connections() {
    // Before: every 307 opened (and closed) its own connection to the relay's control port,
    // and looked its name up; 500 requests left 500 TIME_WAIT sockets behind.
    let cluster = Cluster::start_with(|options, _| {
        options.metrics = Some("127.0.0.1:0".parse().unwrap());
        options.upstream.redirect_limit.per_second = 0.0;
    })
    .await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    let control = pod.relay.control.port();
    // A name, as in a cluster (`taas-X-control.NS.svc.cluster.local.:8080`), not an address.
    cluster.set_routes(&[("home", format!("localhost:{control}"), true)]);
    cluster.wait_route("home", true).await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(response.status, 200, "{response:?}");
    let _parked = TcpStream::connect(response.body_str()).await.unwrap();
    eventually("parked", || async {
        pod.relay.relay.label("home").unwrap().parked() == 1
    })
    .await;
    let before = connections_to(control);

    let mut tls = cluster.tls_from("127.0.0.1").await;
    let requests = 500;
    let started = Instant::now();
    for n in 0..requests {
        let get = format!("GET /page/{n} HTTP/1.1\r\nHost: home.{DOMAIN}\r\n\r\n");
        tls.write_all(get.as_bytes()).await.unwrap();
        let response = read_response(&mut tls).await;
        assert_eq!(response.status, 307, "request {n}: {response:?}");
    }
    let elapsed = started.elapsed();
    let opened = connections_to(control).difference(&before).count();
    let metrics = cluster.metrics().await;
    let lookups = metric(&metrics, "taas_gateway_relay_lookups_total");
    println!(
        "figure: {requests} GETs on one TLS connection through the gateway: {opened} new \
         connections to the relay's control port, {lookups} name lookups, {:.0} µs per GET",
        elapsed.as_secs_f64() * 1e6 / f64::from(requests)
    );
    assert!(
        opened <= 4,
        "{opened} connections to the control port for {requests} requests"
    );
    assert!(lookups <= 4.0, "{lookups} lookups for {requests} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_source_gets_429_while_another_source_still_gets_307s() {
    let cluster = Cluster::start_with(|options, _| {
        options.metrics = Some("127.0.0.1:0".parse().unwrap());
        options.upstream.redirect_limit.per_second = 0.5;
        options.upstream.redirect_limit.burst = 5;
    })
    .await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    cluster.set_routes(&[("home", pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    let response = cluster.register_from("127.0.0.1", &home).await;
    let _parked = TcpStream::connect(response.body_str()).await.unwrap();
    eventually("parked", || async {
        pod.relay.relay.label("home").unwrap().parked() == 1
    })
    .await;

    let get = format!("GET / HTTP/1.1\r\nHost: home.{DOMAIN}\r\n\r\n");
    let mut flood = cluster.tls_from("127.0.0.1").await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        flood.write_all(get.as_bytes()).await.unwrap();
        let response = read_response(&mut flood).await;
        if response.status == 429 {
            retry_after = response.header("retry-after").map(str::to_string);
        }
        statuses.push(response.status);
    }
    let allowed = statuses.iter().filter(|s| **s == 307).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // The burst, plus at most one token refilled (0.5/s) while the loop ran.
    assert!((5..=6).contains(&allowed), "{statuses:?}");
    assert_eq!(allowed + limited, 20, "{statuses:?}");
    let retry_after: u64 = retry_after
        .expect("429 carries Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    // Another source is not held back by the flood.
    let mut other = cluster.tls_from("127.0.0.2").await;
    for _ in 0..3 {
        other.write_all(get.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut other).await.status, 307);
    }
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric(&metrics, "taas_gateway_redirects_limited_total"),
        limited as f64
    );
}

/// A stand-in for a label relay's control port that records every request head and answers
/// each with `answer`; after `answers_per_connection` answers on one connection, it reads the
/// next request and closes without a word (a relay that restarted under a pooled connection).
struct RecordingRelay {
    addr: SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingRelay {
    async fn start(answer: &'static str, answers_per_connection: usize) -> Self {
        Self::start_slow(answer, answers_per_connection, Duration::ZERO).await
    }

    /// Answers each request after `delay` (a busy relay).
    async fn start_slow(
        answer: &'static str,
        answers_per_connection: usize,
        delay: Duration,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, a) = (heads.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let heads = h.clone();
                tokio::spawn(async move {
                    let mut answered = 0;
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            match tcp.read(&mut byte).await {
                                Ok(1) => head.push(byte[0]),
                                _ => return,
                            }
                            if head.len() > 16 * 1024 {
                                return;
                            }
                        }
                        heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        if answered == answers_per_connection {
                            return;
                        }
                        answered += 1;
                        tokio::time::sleep(delay).await;
                        if tcp.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            heads,
            accepted,
            task,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RecordingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

const REDIRECT_ANSWER: &str =
    "HTTP/1.1 307 Temporary Redirect\r\nLocation: https://home.taas.localhost:31000/\r\nContent-Length: 0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forwarded_request_carries_the_labels_gateway_token() {
    let cluster = Cluster::start().await;
    let home_relay = RecordingRelay::start(REDIRECT_ANSWER, usize::MAX).await;
    let lab_relay = RecordingRelay::start(REDIRECT_ANSWER, usize::MAX).await;
    cluster.set_routes(&[
        ("home", home_relay.addr.to_string(), true),
        ("lab", lab_relay.addr.to_string(), true),
    ]);
    cluster.wait_route("lab", true).await;
    let home_token = gateway_token("home");

    // A registration and a client request, each to its label's relay with its label's token.
    let home = TestLabel::new("home");
    cluster.register_from("127.0.0.1", &home).await;
    assert_eq!(cluster.mobile_get("home", "/").await.status, 307);
    assert_eq!(cluster.mobile_get("lab", "/").await.status, 307);
    let heads = home_relay.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("PUT /register/home "), "{heads:?}");
    assert!(heads[1].starts_with("GET / "), "{heads:?}");
    for head in &heads {
        assert_eq!(
            header_of(head, "taas-gateway-auth"),
            Some(home_token.expose()),
            "{head}"
        );
    }
    let lab_heads = lab_relay.heads();
    assert_eq!(
        header_of(&lab_heads[0], "taas-gateway-auth"),
        Some(gateway_token("lab").expose())
    );
    assert_ne!(home_token, gateway_token("lab"));

    // The chart rotates the secret: the new token is sent once the file is re-read.
    let rotated_text = "another install secret, 32 bytes";
    std::fs::write(cluster.dir.path().join("install-secret"), rotated_text).unwrap();
    let rotated = taas_relay::gateway_auth::InstallSecret::new(rotated_text.as_bytes())
        .unwrap()
        .token_for("home");
    eventually("rotated token sent", || async {
        cluster.mobile_get("home", "/").await;
        let heads = home_relay.heads();
        header_of(heads.last().unwrap(), "taas-gateway-auth") == Some(rotated.expose())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_install_secret_no_gateway_token_is_sent() {
    let cluster = Cluster::start_with(|options, _| options.install_secret_file = None).await;
    let relay = RecordingRelay::start(REDIRECT_ANSWER, usize::MAX).await;
    cluster.set_routes(&[("home", relay.addr.to_string(), true)]);
    cluster.wait_route("home", true).await;
    assert_eq!(cluster.mobile_get("home", "/").await.status, 307);
    let heads = relay.heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(header_of(&heads[0], "taas-gateway-auth"), None, "{heads:?}");
    assert_eq!(header_of(&heads[0], "taas-client-addr"), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_drops_a_pooled_connection_costs_one_retry_not_an_error() {
    // The relay answers one request per connection, then takes the next and closes without
    // answering, as a relay restarting under a kept-alive connection does. Each client GET
    // after the first lands on such a dead pooled connection first.
    let cluster = Cluster::start().await;
    let relay = RecordingRelay::start(REDIRECT_ANSWER, 1).await;
    cluster.set_routes(&[("home", relay.addr.to_string(), true)]);
    cluster.wait_route("home", true).await;
    for n in 0..5 {
        let response = cluster.mobile_get("home", "/").await;
        assert_eq!(response.status, 307, "request {n}: {response:?}");
    }
    // Each request after the first used the pooled connection and then one fresh one.
    let heads = relay.heads();
    assert_eq!(heads.len(), 9, "{heads:?}");
    assert_eq!(relay.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_name_is_looked_up_once_for_many_connections() {
    // No idle connections kept, so every request opens its own: the name's addresses come
    // from the cache, not from a lookup each time.
    let cluster = Cluster::start_with(|options, _| {
        options.metrics = Some("127.0.0.1:0".parse().unwrap());
        options.upstream.pool.idle_total = 0;
    })
    .await;
    let relay = RecordingRelay::start(REDIRECT_ANSWER, usize::MAX).await;
    cluster.set_routes(&[("home", format!("localhost:{}", relay.addr.port()), true)]);
    cluster.wait_route("home", true).await;
    let requests = 50;
    for _ in 0..requests {
        assert_eq!(cluster.mobile_get("home", "/").await.status, 307);
    }
    assert_eq!(relay.accepted(), requests, "one connection per request");
    let lookups = metric(&cluster.metrics().await, "taas_gateway_relay_lookups_total");
    // One, or two if the run crossed the cache's few seconds.
    assert!(
        (1.0..=2.0).contains(&lookups),
        "{lookups} lookups for {requests} connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_connection_is_closed_by_the_gateway_after_its_timeout() {
    // The gateway closes first (its socket ends in TIME_WAIT), well before the relay's own
    // keep-alive timeout would, so the relay never closes under a request being sent.
    let cluster = Cluster::start_with(|options, _| {
        options.upstream.pool.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let home = TestLabel::new("home");
    let pod = start_label_relay(cluster.dir.path(), &home, RedirectHost::Requested).await;
    let control = pod.relay.control.port();
    cluster.set_routes(&[("home", pod.relay.control.to_string(), true)]);
    cluster.wait_route("home", true).await;
    assert_eq!(cluster.mobile_get("home", "/").await.status, 503);
    let gateway_sides = || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let target = format!("0100007F:{control:04X}");
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields[2] == target).then(|| fields[3].to_string())
            })
            .collect::<Vec<_>>()
    };
    assert!(
        gateway_sides().iter().any(|state| state == "01"),
        "a pooled connection is open: {:?}",
        gateway_sides()
    );
    eventually("the gateway closed its idle connection", || async {
        let states = gateway_sides();
        !states.is_empty() && states.iter().all(|state| state == "06")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_client_requests_share_at_most_the_per_relay_connections() {
    let cluster = Cluster::start_with(|options, _| {
        options.upstream.pool.per_relay = 2;
    })
    .await;
    let relay =
        RecordingRelay::start_slow(REDIRECT_ANSWER, usize::MAX, Duration::from_millis(50)).await;
    cluster.set_routes(&[("home", relay.addr.to_string(), true)]);
    cluster.wait_route("home", true).await;
    let cluster = std::sync::Arc::new(cluster);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let cluster = cluster.clone();
        clients.push(tokio::spawn(async move {
            cluster.mobile_get("home", "/").await.status
        }));
    }
    for client in clients {
        assert_eq!(client.await.unwrap(), 307);
    }
    assert_eq!(relay.heads().len(), 16);
    assert!(relay.accepted() <= 2, "{} connections", relay.accepted());
}
