//! Cluster mode over loopback: `taas-relay gateway` in front of per-label relays
//! (`label-relay`), as the operator runs them. Registrations and mobile requests reach the
//! right relay; answers carry the external addresses; the original client address arrives;
//! unknown, unready and vanished relays get clean answers.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use taas_relay::config::{Limits, RedirectHost, Timeouts};
use taas_relay::gateway::{self, GatewayOptions, Route, RouteSource, RunningGateway};
use taas_relay::label_relay::{self, LabelRelay, LabelRelayOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

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
    let base = dir.join(&label.label);
    std::fs::create_dir_all(base.join("secret")).unwrap();
    std::fs::write(base.join("label.yaml"), label.manifest()).unwrap();
    std::fs::write(
        base.join("secret/secret"),
        format!("{}\n", label.secret_b32),
    )
    .unwrap();
    let external_file = base.join("external.yaml");
    write_external(&external_file, "127.0.0.1", &[]);
    let (p_ports, q) = port_block(8);
    let relay = label_relay::start(LabelRelayOptions {
        label_file: base.join("label.yaml"),
        secret_dir: base.join("secret"),
        external_file: Some(external_file.clone()),
        control: "127.0.0.1:0".parse().unwrap(),
        gateway_token: None,
        trusted: vec!["127.0.0.1/32".parse().unwrap()],
        registrar: REGISTRAR.into(),
        domain: DOMAIN.into(),
        redirect_host,
        p_ports,
        client_port: q.lo,
        metrics: None,
        reload_interval: Duration::from_millis(50),
        timeouts: Timeouts::default(),
        limits: Limits::default(),
    })
    .await
    .expect("label relay starts");
    PodRelay {
        relay,
        external_file,
        client_port: q.lo,
    }
}

impl Cluster {
    async fn start() -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), "{}\n").unwrap();
        let gateway = gateway::start(GatewayOptions {
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
        })
        .await
        .expect("gateway starts");
        Self { dir, gateway }
    }

    fn set_routes(&self, routes: &[(&str, String, bool)]) {
        let map: HashMap<&str, Route> = routes
            .iter()
            .map(|(label, relay, ready)| {
                (
                    *label,
                    Route {
                        relay: relay.clone(),
                        ready: *ready,
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

    async fn raw_from(&self, source: &str, raw: &str) -> Response {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let tcp = socket.connect(self.gateway.frontend).await.unwrap();
        let config = taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(
            self.gateway.cert.cert.clone(),
        ))
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        tls.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut tls).await
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
async fn a_client_address_header_from_an_untrusted_peer_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let pod = start_label_relay(dir.path(), &home, RedirectHost::Requested).await;
    // 127.0.0.3 is not a trusted gateway: its claim to be 127.0.0.2 is ignored, so p is
    // pinned to 127.0.0.3.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut control = socket.connect(pod.relay.control).await.unwrap();
    let request = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\ntaas-client-addr: 127.0.0.2\r\nConnection: close\r\n\r\n",
        home.authorization()
    );
    control.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut control).await;
    assert_eq!(response.status, 200);
    let p: SocketAddr = response.body_str().parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut forged = socket.connect(p).await.unwrap();
    assert_closed(&mut forged).await;
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
