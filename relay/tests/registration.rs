//! Registration (PROTOCOL.md §2, §3): the steward's exact bytes, every row of the answer
//! table, token reuse and replay, rate limits, keep-alive, rendezvous ports.

use std::time::Duration;
use taas_testkit::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

#[tokio::test]
async fn steward_registration_bytes_get_200_and_host_port() {
    let home = TestLabel::new("home").id("2f402f80-da50-11e1-9b23-0123456789ab");
    let relay = TestRelay::start(&[&home]).await;
    let response = relay.put("home", &home.authorization()).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/plain"));
    let body = response.body_str();
    let (host, port) = body.rsplit_once(':').unwrap();
    assert_eq!(host, "127.0.0.1");
    assert!(relay.p_ports.contains(port.parse().unwrap()), "{body}");
    assert!(!body.ends_with('\n'));
    // p was bound before the answer: connecting works at once.
    TcpStream::connect(body).await.expect("p is listening");
}

#[tokio::test]
async fn steward_burst_of_15_with_one_token_all_succeed() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let authorization = home.authorization();
    let mut parked = Vec::new();
    for _ in 0..15 {
        let response = relay.put("home", &authorization).await;
        assert_eq!(response.status, 200, "{response:?}");
        parked.push(TcpStream::connect(response.body_str()).await.unwrap());
    }
    relay.wait_parked("home", 15).await;
}

#[tokio::test]
async fn authorization_parsing_variants_are_accepted() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let (id, token) = (home.id.clone(), home.token());
    for header in [
        format!("TOTP response=\"{token}\", username=\"{id}\""),
        format!("totp username={id} response={token}"),
        format!("TOTP username=\"{id}\",response=\"{token}\",realm=\"x\""),
        format!("TOTP username=\"nobody\", username=\"{id}\", response=\"{token}\""),
    ] {
        let response = relay.put("home", &header).await;
        assert_eq!(response.status, 200, "{header}: {response:?}");
    }
}

#[tokio::test]
async fn answer_table_rows() {
    let home = TestLabel::new("home");
    let other = TestLabel::new("other");
    let relay = TestRelay::start(&[&home, &other]).await;
    let port = relay.addr().port();

    // No Authorization: 401 with the challenge.
    let response = relay
        .raw(&format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}:{port}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(
        response.header("www-authenticate"),
        Some("TOTP realm=\"taas\"")
    );

    // Malformed headers, missing parameters, responses that are not 6-8 digits: 400.
    let id = &home.id;
    for header in [
        "TOTP".to_string(),
        "Basic dXNlcjpwYXNz".to_string(),
        format!("TOTP username=\"{id}\""),
        "TOTP response=\"123456\"".to_string(),
        format!("TOTP username=\"{id}\", response=\"12345\""),
        format!("TOTP username=\"{id}\", response=\"123456789\""),
        format!("TOTP username=\"{id}\", response=\"12a456\""),
        format!("TOTP username=\"{id}\", response=\"123456"),
        format!(
            "TOTP username=\"{}\", response=\"123456\"",
            "x".repeat(1100)
        ),
    ] {
        let response = relay.put("home", &header).await;
        assert_eq!(response.status, 400, "{header:.80}");
    }

    // Unknown ID, wrong token, label of another ID: one answer, 401.
    let wrong = if home.token() == "000000" {
        "111111"
    } else {
        "000000"
    };
    for (label, header) in [
        (
            "home",
            format!("TOTP username=\"stranger\", response=\"{}\"", home.token()),
        ),
        (
            "home",
            format!("TOTP username=\"{id}\", response=\"{wrong}\""),
        ),
        ("other", home.authorization()),
        ("nolabel", home.authorization()),
    ] {
        let response = relay.put(label, &header).await;
        assert_eq!(response.status, 401, "{label} {header}");
        assert_eq!(
            response.header("www-authenticate"),
            Some("TOTP realm=\"taas\"")
        );
    }

    // Wrong method: 405 with Allow; wrong path: 404.
    let response = relay
        .raw(&format!(
            "GET /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            home.authorization()
        ))
        .await;
    assert_eq!(
        (response.status, response.header("allow")),
        (405, Some("PUT"))
    );
    for path in [
        "/",
        "/pairings/home",
        "/register/",
        "/register/home/x",
        "/registerhome",
    ] {
        let response = relay
            .raw(&format!(
                "PUT {path} HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
                home.authorization()
            ))
            .await;
        assert_eq!(response.status, 404, "{path}");
    }

    // The registrar by IP literal, in brackets or not, with a port: still the registrar.
    let response = relay
        .raw(&format!(
            "PUT /register/home HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            home.authorization()
        ))
        .await;
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn host_dispatch_rows() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    // No Host at all (HTTP/1.0 allows that): 400.
    let response = relay.raw("GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 400);
    let response = relay
        .raw("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(response.status, 400);
    // Anything else: 421.
    for host in ["example.org", "taas.localhost", "10.1.2.3", "[::2]:443"] {
        let response = relay
            .raw(&format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        assert_eq!(response.status, 421, "{host}");
    }
    // Host compared case-insensitively.
    let response = relay
        .raw(&format!(
            "PUT /register/home HTTP/1.1\r\nHost: TAAS-Registrar.LOCALHOST\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            home.authorization()
        ))
        .await;
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn oversized_heads_get_431_and_the_relay_keeps_serving() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let huge = format!(
        "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut tls = relay.tls().await;
    let _ = tls.write_all(huge.as_bytes()).await;
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 431);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let response = relay
        .raw(&format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\n{many}\r\n"
        ))
        .await;
    assert_eq!(response.status, 431);
    assert_eq!(relay.put("home", &home.authorization()).await.status, 200);
}

#[tokio::test]
async fn token_reuse_is_pinned_to_the_source_and_older_steps_are_refused() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let now = unix_now();
    let current = home.token_at(now);
    let previous = home.token_at(now - 30);
    let header = |token: &str| format!("TOTP username=\"{}\", response=\"{token}\"", home.id);
    // The previous step is still inside the window: accepted first.
    assert_eq!(relay.put("home", &header(&previous)).await.status, 200);
    // Then the current step moves the ID forward...
    assert_eq!(relay.put("home", &header(&current)).await.status, 200);
    // ...and the older token is refused from then on (replay).
    assert_eq!(relay.put("home", &header(&previous)).await.status, 401);
    // The same current token from another address (127.0.0.2) is refused by default.
    let response = register_from("127.0.0.2", &relay, &header(&current)).await;
    assert_eq!(response.status, 401);
}

/// One registration sent from a chosen loopback source address.
pub async fn register_from(source: &str, relay: &TestRelay, authorization: &str) -> Response {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(relay.addr()).await.unwrap();
    let config = taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(
        relay.ca().to_path_buf(),
    ))
    .unwrap();
    let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let request = steward_request("home", relay.addr().port(), authorization);
    tls.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut tls).await
}

#[tokio::test]
async fn token_reuse_is_bounded_by_the_parked_limit_on_new_connections_only() {
    let home = TestLabel::new("home").with("maxParked: 3");
    let relay = TestRelay::start(&[&home]).await;
    let header = home.authorization();
    // Three uses on three new connections (a fourth would exceed the label's limit anyway).
    let mut held = Vec::new();
    for _ in 0..3 {
        let response = relay.put("home", &header).await;
        assert_eq!(response.status, 200);
        held.push(TcpStream::connect(response.body_str()).await.unwrap());
    }
    relay.wait_parked("home", 3).await;
    // At the parked limit: 503 with Retry-After, no parked connection evicted.
    let mut tls = relay.tls().await;
    let request = |close: bool| {
        format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {header}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    tls.write_all(request(false).as_bytes()).await.unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 503, "{response:?}");
    assert!(response.header("retry-after").is_some());
    assert_eq!(relay.parked("home"), 3);
    // One parked connection is paired: the label has room again, but this token has been
    // used on 3 new connections already (the label's limit), so a 4th new connection is refused.
    let mut client = relay.client("home").await;
    client.write_all(b"x").await.unwrap();
    relay.wait_parked("home", 2).await;
    assert_eq!(relay.put("home", &header).await.status, 401);
}

#[tokio::test]
async fn keep_alive_registrations_on_one_connection_are_not_limited_by_token_reuse() {
    let home = TestLabel::new("home").with("maxParked: 40");
    let relay = TestRelay::start(&[&home]).await;
    let mut tls = relay.tls().await;
    let mut parked = Vec::new();
    for _ in 0..40 {
        let request = format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\n\r\n",
            home.authorization()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut tls).await;
        assert_eq!(response.status, 200, "{response:?}");
        parked.push(TcpStream::connect(response.body_str()).await.unwrap());
    }
    relay.wait_parked("home", 40).await;
}

#[tokio::test]
async fn repeated_failures_get_429_with_retry_after_while_the_genuine_server_registers() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    // The genuine hidden server registers first (from 127.0.0.1).
    assert_eq!(relay.put("home", &home.authorization()).await.status, 200);
    // Someone at 127.0.0.3 guesses tokens.
    let mut statuses = Vec::new();
    for guess in 0..30 {
        let header = format!("TOTP username=\"{}\", response=\"{:06}\"", home.id, guess);
        let response = register_from("127.0.0.3", &relay, &header).await;
        if response.status == 429 {
            let retry: u64 = response.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=120).contains(&retry));
        }
        statuses.push(response.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429));
    // Even a right token from the guesser is refused while it is blocked...
    let response = register_from("127.0.0.3", &relay, &home.authorization()).await;
    assert_eq!(response.status, 429);
    // ...and the genuine server keeps registering.
    let response = relay.put("home", &home.authorization()).await;
    assert_eq!(response.status, 200, "{response:?}");
}

#[tokio::test]
async fn a_stranger_on_p_does_not_become_the_hidden_server() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let p = relay.register(&home).await;
    // 127.0.0.2 connects first: refused (closed), not parked.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stranger = socket.connect(p).await.unwrap();
    let closed = read_to_end(&mut stranger).await;
    assert!(closed.is_empty());
    assert_eq!(relay.parked("home"), 0);
    // The registering source still gets the slot.
    let _hidden = TcpStream::connect(p).await.unwrap();
    relay.wait_parked("home", 1).await;
    // And the port is closed after its one connection.
    eventually("p closed", || async {
        TcpStream::connect(p).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn without_source_pinning_any_source_may_connect() {
    let home = TestLabel::new("home").with("sourcePinning: false");
    let relay = TestRelay::start(&[&home]).await;
    let p = relay.register(&home).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let _other = socket.connect(p).await.unwrap();
    relay.wait_parked("home", 1).await;
}

#[tokio::test]
async fn an_unclaimed_rendezvous_port_is_released_after_its_timeout() {
    let home = TestLabel::new("home").with("maxParked: 1");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.rendezvous = Duration::from_millis(300);
    })
    .await;
    let mut session = relay.session().await;
    let response = session.put("home", &home.authorization()).await;
    assert_eq!(response.status, 200);
    let p: std::net::SocketAddr = response.body_str().parse().unwrap();
    // While p waits, the label's one slot is taken.
    let response = session.put("home", &home.authorization()).await;
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());
    eventually("p released", || async {
        TcpStream::connect(p).await.is_err()
    })
    .await;
    // The slot is free again.
    let mut status = 0;
    for _ in 0..100 {
        status = session.put("home", &home.authorization()).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("taas_rendezvous_total{label=\"home\",kind=\"expired\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn several_labels_per_id_each_authorised() {
    let a = TestLabel::new("alpha").id("shared-id");
    let mut b = TestLabel::new("beta").id("shared-id");
    b.secret_b32 = a.secret_b32.clone();
    let relay = TestRelay::start(&[&a, &b]).await;
    let _pa = relay.park(&a).await;
    let _pb = relay.park(&b).await;
    assert_eq!((relay.parked("alpha"), relay.parked("beta")), (1, 1));
}

#[tokio::test]
async fn ipv6_front_end_and_rendezvous() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    }
    let home = TestLabel::new("home");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.listen = "[::1]:0".parse().unwrap();
    })
    .await;
    let response = relay.put("home", &home.authorization()).await;
    assert_eq!(response.status, 200);
    let body = response.body_str();
    assert!(body.starts_with("[::1]:"), "{body}");
    let _parked = TcpStream::connect(body).await.unwrap();
    relay.wait_parked("home", 1).await;
    let redirect = relay.mobile_get("home", "/").await;
    assert_eq!(redirect.status, 307);
}

#[tokio::test]
async fn the_client_chooses_the_number_of_digits() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let mut session = relay.session().await;
    for digits in [6, 7, 8] {
        let token = taas_relay::totp::code(
            &home.secret(),
            taas_relay::config::Algorithm::SHA1,
            digits,
            30,
            unix_now(),
        );
        let header = format!("TOTP username=\"{}\", response=\"{token}\"", home.id);
        assert_eq!(
            session.put("home", &header).await.status,
            200,
            "{digits} digits"
        );
    }
}

#[tokio::test]
async fn sha256_and_sha512_labels() {
    for algorithm in ["SHA256", "SHA512"] {
        let home = TestLabel::new("home").with(&format!("algorithm: {algorithm}"));
        let relay = TestRelay::start(&[&home]).await;
        let alg = if algorithm == "SHA256" {
            taas_relay::config::Algorithm::SHA256
        } else {
            taas_relay::config::Algorithm::SHA512
        };
        let token = taas_relay::totp::code(&home.secret(), alg, 6, 30, unix_now());
        let header = format!("TOTP username=\"{}\", response=\"{token}\"", home.id);
        assert_eq!(relay.put("home", &header).await.status, 200, "{algorithm}");
        // The SHA1 code of the same secret is not accepted (unless equal by chance).
        if home.token() != token {
            assert_eq!(relay.put("home", &home.authorization()).await.status, 401);
        }
    }
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let _parked = relay.park(&home).await;
    let addr = relay.standalone.metrics.unwrap();
    for (path, expected) in [("/healthz", "200"), ("/readyz", "200"), ("/nope", "404")] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let text = String::from_utf8(read_to_end(&mut stream).await).unwrap();
        assert!(
            text.starts_with(&format!("HTTP/1.1 {expected}")),
            "{path}: {text}"
        );
    }
    let metrics = relay.metrics().await;
    for line in [
        "taas_registrations_total{label=\"home\",kind=\"ok\"} 1",
        "taas_parked{label=\"home\"} 1",
        "taas_active_pairs{label=\"home\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // Secrets and tokens never reach the metrics.
    assert!(!metrics.contains(&home.secret_b32));
}
