//! A label relay's control port (issue 13, item 4): only a gateway of the install, proving it
//! with the label's gateway token (`taas-gateway-auth`), may use it to name the client; without
//! a token configured nothing may name the client; the token never reaches a log.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use taas_relay::config::Limits;
use taas_relay::gateway_auth::{GatewayToken, InstallSecret, GATEWAY_AUTH_HEADER};
use taas_relay::run::pod::{self as label_relay, LabelRelay, LabelRelayOptions};
use taas_testkit::prelude::*;
use taas_testkit::{logs, ports, readings};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_taas-relay");

fn token_for(label: &str) -> GatewayToken {
    InstallSecret::new(b"an install secret of this test, 32+ bytes")
        .unwrap()
        .token_for(label)
}

async fn start(
    dir: &Path,
    label: &TestLabel,
    gateway_token: Option<GatewayToken>,
    trusted: &[&str],
) -> LabelRelay {
    start_with_limits(dir, label, gateway_token, trusted, Limits::default()).await
}

async fn start_with_limits(
    dir: &Path,
    label: &TestLabel,
    gateway_token: Option<GatewayToken>,
    trusted: &[&str],
    limits: Limits,
) -> LabelRelay {
    label_relay::start(LabelRelayOptions {
        gateway_token,
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        reload_interval: Duration::from_millis(100),
        limits,
        ..label_relay_options(dir, label, 8, trusted)
    })
    .await
    .expect("label relay starts")
}

/// One request on a new control-port connection from `source`, with extra header lines.
async fn control_request(
    relay: &LabelRelay,
    source: &str,
    head: &str,
    extra: &[(&str, &str)],
) -> (Response, TcpStream) {
    let mut control = connect_from(source, relay.control).await;
    let mut request = head.to_string();
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    control.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut control).await;
    (response, control)
}

fn registration(label: &TestLabel) -> String {
    format!(
        "PUT /register/{} HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\n",
        label.label,
        label.authorization()
    )
}

fn mobile_get(label: &str) -> String {
    format!("GET /index.html HTTP/1.1\r\nHost: {label}.{DOMAIN}\r\n")
}

async fn relay_metrics(relay: &LabelRelay) -> String {
    taas_testkit::readings::scrape(relay.metrics.unwrap()).await
}

/// Whether p (from a 200's body) accepts `source`: parks it (the parked connection), or
/// closes it at once (`None`).
async fn p_accepts(
    relay: &LabelRelay,
    label: &str,
    p: SocketAddr,
    source: &str,
) -> Option<TcpStream> {
    let before = relay.relay.label(label).unwrap().parked();
    let stream = connect_from(source, p).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        if relay.relay.label(label).unwrap().parked() > before {
            return Some(stream);
        }
        let mut buf = [0u8; 1];
        match stream.try_read(&mut buf) {
            Ok(0) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "p neither parked nor closed {source}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_no_request_names_the_client_even_from_listed_networks() {
    logs::debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    // 127.0.0.0/8 was in the old default of --trusted-proxies.
    let relay = start(dir.path(), &home, None, &["127.0.0.0/8"]).await;
    let (response, _) = control_request(
        &relay,
        "127.0.0.1",
        &registration(&home),
        &[("taas-client-addr", "127.0.0.2")],
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let p: SocketAddr = response.body_str().parse().unwrap();
    // p is pinned to the TCP peer, not to the address the request claimed.
    assert!(p_accepts(&relay, "home", p, "127.0.0.2").await.is_none());
    assert!(p_accepts(&relay, "home", p, "127.0.0.1").await.is_some());
    assert!(
        logs::captured_logs().contains("the control port is unauthenticated"),
        "no warning at start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_gateway_token_gets_403_and_the_request_is_not_processed() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let relay = start(dir.path(), &home, Some(token_for("home")), &[]).await;
    let wrong = token_for("office");
    let attempts: [&[(&str, &str)]; 4] = [
        &[],
        &[("taas-client-addr", "127.0.0.2")],
        &[(GATEWAY_AUTH_HEADER, wrong.expose())],
        &[(GATEWAY_AUTH_HEADER, ""), ("taas-client-addr", "127.0.0.2")],
    ];
    for extra in attempts {
        for head in [registration(&home), mobile_get("home")] {
            let (response, mut control) = control_request(&relay, "127.0.0.1", &head, extra).await;
            assert_eq!(response.status, 403, "{extra:?}: {response:?}");
            assert!(response.body_str().contains("taas-gateway-auth"));
            assert_closed(&mut control).await;
        }
    }
    let metrics = relay_metrics(&relay).await;
    assert!(
        metrics.contains("taas_control_requests_unauthenticated_total 8"),
        "{metrics}"
    );
    // None was processed: no registration counted, no rendezvous port handed out.
    assert_eq!(
        readings::metric_sum(&metrics, "taas_registrations_total"),
        0.0
    );
    assert_eq!(readings::metric_sum(&metrics, "taas_rendezvous_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_gateway_token_lets_the_gateway_name_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("maxParked: 4");
    let token = token_for("home");
    let relay = start(dir.path(), &home, Some(token.clone()), &[]).await;
    let auth = (GATEWAY_AUTH_HEADER, token.expose());
    let (response, _) = control_request(
        &relay,
        "127.0.0.1",
        &registration(&home),
        &[auth, ("taas-client-addr", "127.0.0.2")],
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let p: SocketAddr = response.body_str().parse().unwrap();
    assert!(p_accepts(&relay, "home", p, "127.0.0.1").await.is_none());
    let _parked = p_accepts(&relay, "home", p, "127.0.0.2")
        .await
        .expect("parked");
    let (response, _) = control_request(
        &relay,
        "127.0.0.1",
        &mobile_get("home"),
        &[auth, ("taas-client-addr", "127.0.0.2")],
    )
    .await;
    assert_eq!(response.status, 307, "{response:?}");
    let metrics = relay_metrics(&relay).await;
    assert_eq!(
        readings::metric_sum(&metrics, "taas_registrations_total"),
        1.0
    );
    assert!(readings::metric_sum(&metrics, "taas_rendezvous_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_gateway_networks_the_right_token_from_elsewhere_gets_403() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let token = token_for("home");
    let relay = start(dir.path(), &home, Some(token.clone()), &["127.0.0.1/32"]).await;
    let auth = (GATEWAY_AUTH_HEADER, token.expose());
    let (response, _) = control_request(&relay, "127.0.0.3", &registration(&home), &[auth]).await;
    assert_eq!(response.status, 403, "{response:?}");
    let (response, _) = control_request(&relay, "127.0.0.1", &registration(&home), &[auth]).await;
    assert_eq!(response.status, 200, "{response:?}");
}

/// Runs the `label-relay` binary with `RUST_LOG=debug` and the token in `TAAS_GATEWAY_TOKEN`,
/// sends it requests with the right and a wrong token, and searches its log (and its
/// `--help`) for the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_token_never_appears_in_the_relays_debug_logs_or_help() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let (label_file, secret_dir) = mount_label(dir.path(), &home);
    let token = token_for("home");
    let wrong = token_for("office");
    let control: SocketAddr = format!("127.0.0.1:{}", ports::free_port()).parse().unwrap();
    let (p_ports, q) = port_block(8);
    let log = dir.path().join("relay.log");
    let mut child = Command::new(RELAY_BIN)
        .args(["label-relay", "--metrics", "off"])
        .arg("--label-file")
        .arg(&label_file)
        .arg("--secret-dir")
        .arg(&secret_dir)
        .args(["--control", &control.to_string()])
        .args(["--p-ports", &p_ports.to_string()])
        .args(["--client-port", &q.lo.to_string()])
        .env("TAAS_GATEWAY_TOKEN", token.expose())
        .env("RUST_LOG", "debug")
        .env_remove("TAAS_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let relay_up = async {
        loop {
            if let Ok(stream) = TcpStream::connect(control).await {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    drop(
        tokio::time::timeout(PATIENCE, relay_up)
            .await
            .expect("label relay up"),
    );
    for presented in [token.expose(), wrong.expose()] {
        let mut stream = TcpStream::connect(control).await.unwrap();
        let request = format!(
            "{}{GATEWAY_AUTH_HEADER}: {presented}\r\ntaas-client-addr: 127.0.0.2\r\nConnection: close\r\n\r\n",
            registration(&home)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let expected = if presented == token.expose() {
            200
        } else {
            403
        };
        assert_eq!(read_response(&mut stream).await.status, expected);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("DEBUG"), "no debug logs captured:\n{text}");
    for secret in [token.expose(), wrong.expose()] {
        assert!(
            !text.contains(secret),
            "a gateway token is in the log:\n{text}"
        );
    }
    let help = Command::new(RELAY_BIN)
        .args(["label-relay", "--help"])
        .env("TAAS_GATEWAY_TOKEN", token.expose())
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--gateway-token"), "{help}");
    assert!(
        !help.contains(token.expose()),
        "the token is in --help:\n{help}"
    );
}

/// The per-source cap is for the public front end: a gateway holds many control-port
/// connections from one address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_cap_does_not_apply_to_the_gateways_on_the_control_port() {
    const CAP: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    let token = token_for("home");
    let limits = Limits {
        frontend_connections_per_source: CAP,
        ..Limits::default()
    };
    let relay = start_with_limits(dir.path(), &home, Some(token.clone()), &[], limits).await;
    let mut connections = Vec::new();
    for _ in 0..CAP * 3 {
        connections.push(connect_from("127.0.0.1", relay.control).await);
    }
    // Every one of them is served (a mobile request: 503 while nothing is parked).
    for control in &mut connections {
        let request = format!(
            "{}{GATEWAY_AUTH_HEADER}: {}\r\n\r\n",
            mobile_get("home"),
            token.expose()
        );
        control.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(read_response(control).await.status, 503);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_with_a_service_of_its_own_names_its_own_address() {
    // Two replicas of `home` as a StatefulSet's pods: one external file for both (the
    // operator's ConfigMap) with an entry per pod; each relay answers with its own.
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home").with("maxParked: 4");
    let options: Vec<LabelRelayOptions> = (0..2)
        .map(|_| label_relay_options(dir.path(), &home, 2, &[]))
        .collect();
    let mut text = "host: 203.0.113.1\nports: {}\npods:\n".to_string();
    for (i, o) in options.iter().enumerate() {
        let p: Vec<String> = o
            .p_ports
            .iter()
            .map(|p| format!("{p}: {}", 31000 + 100 * i as u16 + (p - o.p_ports.lo)))
            .collect();
        text.push_str(&format!(
            "  taas-home-{i}:\n    host: 203.0.113.{}\n    ports: {{{}, {}: {}}}\n",
            i + 10,
            p.join(", "),
            o.client_port,
            32000 + i
        ));
    }
    let external = dir.path().join("external.yaml");
    std::fs::write(&external, text).unwrap();
    let mut replicas = Vec::new();
    for (i, o) in options.into_iter().enumerate() {
        let relay = label_relay::start(LabelRelayOptions {
            external_file: Some(external.clone()),
            pod_name: Some(format!("taas-home-{i}")),
            metrics: None,
            ..o
        })
        .await
        .expect("replica starts");
        replicas.push(relay);
    }
    let mut parked = Vec::new();
    for (i, relay) in replicas.iter().enumerate() {
        let (response, _) = control_request(relay, "127.0.0.1", &registration(&home), &[]).await;
        assert_eq!(response.status, 200, "{response:?}");
        let (host, port) = response.body_str().rsplit_once(':').unwrap();
        assert_eq!(host, format!("203.0.113.{}", i + 10));
        let port: u16 = port.parse().unwrap();
        assert_eq!(
            port / 100,
            310 + i as u16,
            "replica {i}'s own rendezvous ports"
        );
        // The hidden server reaches it through its Service: here, its local port.
        let local = relay.relay.settings().p_ports.lo + (port - 31000 - 100 * i as u16);
        let p = SocketAddr::from(([127, 0, 0, 1], local));
        parked.push(
            p_accepts(relay, "home", p, "127.0.0.1")
                .await
                .expect("parked"),
        );
    }
    // Stopped, such a replica is out of its Service at once: nothing can reach its parked
    // connection any more, so it is given back at once (no hold), and no client is sent
    // there.
    replicas[0].drain();
    assert_closed(&mut parked[0]).await;
    let (response, _) = control_request(&replicas[0], "127.0.0.1", &mobile_get("home"), &[]).await;
    assert_ne!(response.status, 307, "{response:?}");
    let (response, _) = control_request(&replicas[1], "127.0.0.1", &mobile_get("home"), &[]).await;
    assert_eq!(response.status, 307, "{response:?}");
    // A relay whose pod has no entry (a newer pod than the file) tells the top-level host.
    let stranger = label_relay::start(LabelRelayOptions {
        external_file: Some(external.clone()),
        pod_name: Some("taas-home-7".into()),
        metrics: None,
        ..label_relay_options(dir.path(), &home, 2, &[])
    })
    .await
    .expect("starts");
    let (response, _) = control_request(&stranger, "127.0.0.1", &registration(&home), &[]).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.body_str().starts_with("203.0.113.1:"),
        "{response:?}"
    );
}
