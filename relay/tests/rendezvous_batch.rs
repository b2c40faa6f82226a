//! The several-rendezvous-ports extension (PROTOCOL.md §2; `taas-rendezvous-count`): one
//! registration, up to N one-shot p ports, one `HOST:PORT` per line, within every limit of a
//! single registration. Requests without the header get the original's answer, byte for byte.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use taas_testkit::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A registration on a new TLS connection, as the steward sends it, plus `extra` header lines.
async fn put_with(relay: &TestRelay, label: &TestLabel, extra: &str) -> Response {
    let request = format!(
        "PUT /register/{} HTTP/1.1\r\nHost: {REGISTRAR}:{}\r\nAuthorization: {}\r\n{extra}Connection: close\r\n\r\n",
        label.label,
        relay.addr().port(),
        label.authorization()
    );
    relay.raw(&request).await
}

fn endpoints(relay: &TestRelay, response: &Response) -> Vec<SocketAddr> {
    assert_eq!(response.status, 200, "{response:?}");
    let body = response.body_str();
    assert!(!body.ends_with('\n') && !body.contains('\r'), "{body:?}");
    let endpoints: Vec<SocketAddr> = body
        .split('\n')
        .map(|line| line.parse().unwrap_or_else(|_| panic!("{line:?}")))
        .collect();
    for p in &endpoints {
        assert_eq!(p.ip().to_string(), "127.0.0.1");
        assert!(relay.p_ports.contains(p.port()), "{p}");
    }
    let distinct: HashSet<_> = endpoints.iter().collect();
    assert_eq!(
        distinct.len(),
        endpoints.len(),
        "a port handed out twice: {body}"
    );
    endpoints
}

#[tokio::test]
async fn one_request_gets_several_ports_each_a_one_shot_rendezvous() {
    let home = TestLabel::new("home").with("maxParked: 10");
    let relay = TestRelay::start(&[&home]).await;
    let response = put_with(&relay, &home, "TAAS-Rendezvous-Count: 4\r\n").await;
    assert_eq!(response.header("content-type"), Some("text/plain"));
    let ports = endpoints(&relay, &response);
    assert_eq!(ports.len(), 4);
    // Every p was bound before the answer, and each parks one connection.
    let mut parked = Vec::new();
    for p in &ports {
        parked.push(TcpStream::connect(p).await.expect("p is listening"));
    }
    relay.wait_parked("home", 4).await;
    // One connection per p: each listener is closed once used.
    for p in &ports {
        eventually("p closed after its connection", || async {
            TcpStream::connect(p).await.is_err()
        })
        .await;
    }
    // Each parked connection pairs with a client as usual (newest first, so open all four
    // clients, then every parked connection has its client's bytes).
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = relay.client("home").await;
        client.write_all(b"hello").await.unwrap();
        clients.push(client);
    }
    for conn in &mut parked {
        let mut got = [0u8; 5];
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(conn, &mut got),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(&got, b"hello");
    }
}

#[tokio::test]
async fn without_the_header_or_with_1_the_answer_is_the_original_one() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    for extra in ["", "TAAS-Rendezvous-Count: 1\r\n"] {
        let response = put_with(&relay, &home, extra).await;
        assert_eq!(response.status, 200, "{response:?}");
        let body = response.body_str();
        let (host, port) = body.rsplit_once(':').unwrap();
        assert_eq!(host, "127.0.0.1");
        assert!(relay.p_ports.contains(port.parse().unwrap()), "{body}");
        assert!(!body.contains('\n'));
    }
    // The steward's exact bytes: one line, no newline (as in registration.rs).
    let response = relay.put("home", &home.authorization()).await;
    assert_eq!(endpoints(&relay, &response).len(), 1);
}

#[tokio::test]
async fn a_malformed_count_gets_400_and_a_large_one_the_per_request_maximum() {
    let home = TestLabel::new("home").with("maxParked: 30");
    let relay = TestRelay::start(&[&home]).await;
    for bad in ["0", "-2", "two", "1.5", "", "99999999999999999999"] {
        let response = put_with(&relay, &home, &format!("TAAS-Rendezvous-Count: {bad}\r\n")).await;
        assert_eq!(response.status, 400, "{bad:?}: {response:?}");
    }
    assert_eq!(relay.parked("home"), 0);
    let response = put_with(&relay, &home, "TAAS-Rendezvous-Count: 1000\r\n").await;
    assert_eq!(
        endpoints(&relay, &response).len(),
        taas_protocol::answer::MAX_RENDEZVOUS_PER_REQUEST as usize
    );
}

#[tokio::test]
async fn never_more_ports_than_the_label_has_room_for() {
    let home = TestLabel::new("home").with("maxParked: 5");
    let relay = TestRelay::start(&[&home]).await;
    let mut session = relay.session().await;
    let ask = |n: u32| {
        format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {}\r\nTAAS-Rendezvous-Count: {n}\r\n\r\n",
            home.authorization()
        )
    };
    session.tls.write_all(ask(3).as_bytes()).await.unwrap();
    let first = endpoints(&relay, &read_response(&mut session.tls).await);
    assert_eq!(first.len(), 3);
    let _parked: Vec<TcpStream> = {
        let mut v = Vec::new();
        for p in &first {
            v.push(TcpStream::connect(p).await.unwrap());
        }
        v
    };
    relay.wait_parked("home", 3).await;
    // 3 parked of 5: asking for 10 gets 2.
    session.tls.write_all(ask(10).as_bytes()).await.unwrap();
    let second = endpoints(&relay, &read_response(&mut session.tls).await);
    assert_eq!(second.len(), 2);
    // Full (3 parked + 2 reserved): 503 with Retry-After, nothing evicted.
    session.tls.write_all(ask(4).as_bytes()).await.unwrap();
    let full = read_response(&mut session.tls).await;
    assert_eq!(full.status, 503, "{full:?}");
    assert!(full.header("retry-after").is_some());
    assert_eq!(relay.parked("home"), 3);
}

#[tokio::test]
async fn on_new_connections_each_port_counts_as_one_use_of_the_token() {
    // Ports recycle quickly, so the label's room is not what limits here: the token is.
    let home = TestLabel::new("home").with("maxParked: 12");
    let relay = TestRelay::start_with(&[&home], |o| {
        o.timeouts.rendezvous = Duration::from_millis(200);
    })
    .await;
    let authorization = home.authorization();
    let put = |n: u32| {
        let request = format!(
            "PUT /register/home HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {authorization}\r\nTAAS-Rendezvous-Count: {n}\r\nConnection: close\r\n\r\n"
        );
        let relay = &relay;
        async move { relay.raw(&request).await }
    };
    let first = put(8).await;
    let first = endpoints(&relay, &first);
    assert_eq!(first.len(), 8);
    // Wait until the unused ports have expired and the label has room for 12 again.
    for p in &first {
        eventually("p released", || async {
            TcpStream::connect(p).await.is_err()
        })
        .await;
    }
    // 8 of the token's 12 uses are spent: 4 more, then none (same token, new connections).
    let second = put(8).await;
    let second = endpoints(&relay, &second);
    assert_eq!(second.len(), 4);
    for p in &second {
        eventually("p released", || async {
            TcpStream::connect(p).await.is_err()
        })
        .await;
    }
    let mut refused = put(1).await;
    for _ in 0..20 {
        if refused.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        refused = put(1).await;
    }
    assert_eq!(refused.status, 401, "{refused:?}");
    let single = relay.put("home", &authorization).await;
    assert_eq!(single.status, 401, "{single:?}");
}
