//! The gateway as the cluster's edge (issue 15.3), over loopback: the shared client port, a
//! direct label on the HTTPS port, and the shared rendezvous range.
//!
//! Two kinds of relay stand behind the gateway here:
//! - **scripted relays** (`EdgeRelay`): a listener that reads the edge header with
//!   `taas_protocol::edge` and answers as the test says (CLAIM, NOT_MINE, nothing), so the
//!   gateway's own decisions (what it writes, whom it commits to, what it refuses and counts)
//!   are asserted byte for byte;
//! - **real label relays** (`label_relay::start` with `edge`), an agent registering through
//!   the gateway's HTTPS port and hidden TLS servers, for the whole path.
//!
//! Other loopback addresses (127.0.0.x) stand in for other hosts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use taas_protocol::edge::{self, EdgeHeader, EdgeKind, Parsed};
use taas_relay::config::Timeouts;
use taas_relay::run::pod::{self as label_relay, LabelRelay, LabelRelayOptions};
use taas_relay::splice::SpliceMode;
use taas_testkit::gateway::{gateway_token, EdgeGateway};
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn token_for(label: &str) -> String {
    gateway_token(label).expose().to_string()
}

/// One label's line in routes.yaml.
#[derive(Clone, Debug, Default)]
struct EdgeRoute {
    relay: String,
    edge: Option<String>,
    direct: bool,
    ready: bool,
    rendezvous: Vec<u16>,
}

impl EdgeRoute {
    fn edge(edge: SocketAddr) -> Self {
        Self {
            // The control port is not used by these tests' raw paths.
            relay: "127.0.0.1:9".into(),
            edge: Some(edge.to_string()),
            ready: true,
            ..Self::default()
        }
    }

    fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    fn owning(mut self, ports: &[u16]) -> Self {
        self.rendezvous = ports.to_vec();
        self
    }

    fn yaml(&self) -> String {
        let mut line = format!("{{relay: \"{}\", ready: {}", self.relay, self.ready);
        if let Some(edge) = &self.edge {
            line.push_str(&format!(", edge: \"{edge}\""));
        }
        if self.direct {
            line.push_str(", direct: true");
        }
        if !self.rendezvous.is_empty() {
            line.push_str(&format!(", rendezvous: {:?}", self.rendezvous));
        }
        line.push('}');
        line
    }
}

/// What these tests ask of the gateway beyond the testkit's.
trait EdgeGatewayExt {
    /// The rendezvous port `k` of the range.
    fn t(&self, k: u16) -> u16;
    /// Writes routes.yaml and waits until the gateway has it.
    async fn set_routes(&self, routes: &[(&str, EdgeRoute)]);
    /// Waits (bounded) until the gateway has counted `n` edge refusals for `reason`.
    async fn wait_refused(&self, reason: &str, n: f64);
    async fn forwarded(&self, entry: &str) -> f64;
    /// A TLS connection to the gateway's HTTPS port from `source`, for the registrar.
    async fn tls_from(
        &self,
        source: &str,
        name: &str,
    ) -> tokio_rustls::client::TlsStream<TcpStream>;
}

impl EdgeGatewayExt for EdgeGateway {
    fn t(&self, k: u16) -> u16 {
        self.range.lo + k
    }

    async fn set_routes(&self, routes: &[(&str, EdgeRoute)]) {
        let routes: BTreeMap<&str, &EdgeRoute> = routes.iter().map(|(l, r)| (*l, r)).collect();
        let mut text = String::new();
        for (label, route) in &routes {
            text.push_str(&format!("{label}: {}\n", route.yaml()));
        }
        std::fs::write(self.routes_file(), text).unwrap();
        eventually("routes applied", || async {
            routes.iter().all(|(label, route)| {
                self.gateway.routes.get(label).is_some_and(|r| {
                    r.edge.as_ref().map(ToString::to_string) == route.edge
                        && r.rendezvous == route.rendezvous
                })
            })
        })
        .await;
    }

    async fn wait_refused(&self, reason: &str, n: f64) {
        eventually(&format!("{n} edge refusals for {reason}"), || async {
            metric(&self.metrics().await, &refused(reason)) >= n
        })
        .await;
    }

    async fn forwarded(&self, entry: &str) -> f64 {
        metric(
            &self.metrics().await,
            &format!("taas_gateway_edge_connections_total{{entry=\"{entry}\"}}"),
        )
    }

    async fn tls_from(
        &self,
        source: &str,
        name: &str,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let gateway = &self.gateway;
        tls_connect_from(source, gateway.frontend, &gateway.cert.cert, name).await
    }
}

fn refused(reason: &str) -> String {
    format!("taas_gateway_edge_refused_total{{reason=\"{reason}\"}}")
}

/// Reads exactly one edge header (bounded), as a relay does: never a byte past it.
async fn read_edge_header(stream: &mut TcpStream) -> EdgeHeader {
    let mut buf = Vec::new();
    let mut need = 16;
    loop {
        let start = buf.len();
        buf.resize(need, 0);
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf[start..]))
            .await
            .expect("the header within patience")
            .expect("the header");
        match edge::parse(&buf).expect("a valid edge header") {
            Parsed::Incomplete { need: more } => need = more,
            Parsed::Complete { header, len } => {
                assert_eq!(len, buf.len(), "read exactly the header");
                return header;
            }
        }
    }
}

/// How a scripted relay answers a rendezvous question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Claim,
    NotMine,
    /// Reads the header and says nothing.
    Silent,
}

/// A relay's edge port, scripted: each accepted connection's header is sent to the test with
/// the stream (after the relay's answer, for rendezvous headers).
struct EdgeRelay {
    addr: SocketAddr,
    accepted: tokio::sync::mpsc::UnboundedReceiver<(EdgeHeader, TcpStream)>,
    _task: tokio::task::JoinHandle<()>,
}

impl EdgeRelay {
    async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, accepted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let sender = sender.clone();
                tokio::spawn(async move {
                    let header = read_edge_header(&mut stream).await;
                    if header.offer {
                        // A client offered (issue 16): this relay serves it, and the stream
                        // goes on after the gateway's COMMIT.
                        stream.write_all(&[edge::SERVE]).await.unwrap();
                        let mut commit = [0u8; 1];
                        stream.read_exact(&mut commit).await.unwrap();
                        assert_eq!(commit, [edge::COMMIT]);
                    }
                    if header.kind == EdgeKind::Rendezvous {
                        match answer {
                            Answer::Claim => stream.write_all(&[edge::CLAIM]).await.unwrap(),
                            Answer::NotMine => stream.write_all(&[edge::NOT_MINE]).await.unwrap(),
                            Answer::Silent => {}
                        }
                    }
                    let _ = sender.send((header, stream));
                });
            }
        });
        Self {
            addr,
            accepted,
            _task: task,
        }
    }

    async fn next(&mut self) -> (EdgeHeader, TcpStream) {
        tokio::time::timeout(PATIENCE, self.accepted.recv())
            .await
            .expect("a connection from the gateway within patience")
            .expect("the relay runs")
    }
}

/// On both ways the gateway's edge can move bytes (copy, splice(2) from the first byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_the_shared_port_reaches_its_labels_relay_behind_a_header_with_the_client_hello_unchanged(
) {
    for mode in [SpliceMode::Copy, SpliceMode::Kernel] {
        shared_port_client_reaches_its_relay(mode).await;
    }
}

async fn shared_port_client_reaches_its_relay(mode: SpliceMode) {
    let cluster = EdgeGateway::start_with(|options| options.splice = mode).await;
    let mut home = EdgeRelay::start(Answer::Silent).await;
    let mut work = EdgeRelay::start(Answer::Silent).await;
    cluster
        .set_routes(&[
            ("home", EdgeRoute::edge(home.addr)),
            ("work", EdgeRoute::edge(work.addr)),
        ])
        .await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut client = connect_from("127.0.0.2", cluster.shared()).await;
    let client_addr = client.local_addr().unwrap();
    // In pieces, as a slow network delivers it.
    let (a, b) = hello.split_at(5);
    client.write_all(a).await.unwrap();
    client.flush().await.unwrap();
    client.write_all(b).await.unwrap();

    let (header, mut relay) = home.next().await;
    assert_eq!(header.kind, EdgeKind::SharedPort);
    assert_eq!(header.label, "home");
    assert_eq!(header.token, token_for("home"));
    assert_eq!(header.source, client_addr, "the phone's address");
    assert_eq!(
        header.destination,
        cluster.shared(),
        "the gateway port it used"
    );
    assert_relayed_both_ways(&mut client, &mut relay, &hello, PATIENCE).await;
    // A relayed connection's socket options, inherited from the shared port's listener.
    assert_eq!(
        taas_testkit::readings::keepalive_armed(cluster.shared(), client_addr),
        Some(true)
    );
    assert!(
        work.accepted.try_recv().is_err(),
        "the other label's relay untouched"
    );
    assert_eq!(cluster.forwarded("shared_port").await, 1.0);
}

/// `from` writes `bytes`; `to` reads them (bounded).
async fn echo_back(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    from.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(PATIENCE, to.read_exact(&mut back))
        .await
        .expect("the bytes within patience")
        .unwrap();
    assert_eq!(back, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_label_on_the_https_port_is_forwarded_raw_and_other_names_get_the_gateways_tls() {
    let cluster = EdgeGateway::start().await;
    let mut home = EdgeRelay::start(Answer::Silent).await;
    let mut plain = EdgeRelay::start(Answer::Silent).await;
    cluster
        .set_routes(&[
            ("home", EdgeRoute::edge(home.addr).direct()),
            ("plain", EdgeRoute::edge(plain.addr)),
        ])
        .await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut client = TcpStream::connect(cluster.gateway.frontend).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let (header, mut relay) = home.next().await;
    assert_eq!(header.kind, EdgeKind::Direct);
    assert_eq!(header.label, "home");
    assert_eq!(header.destination, cluster.gateway.frontend);
    let mut seen = vec![0u8; hello.len()];
    tokio::time::timeout(PATIENCE, relay.read_exact(&mut seen))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, hello);
    echo_back(&mut relay, &mut client, b"hidden").await;
    assert_eq!(cluster.forwarded("direct").await, 1.0);
    // A relayed connection's socket options, inherited from the HTTPS port's listener.
    assert_eq!(
        taas_testkit::readings::keepalive_armed(
            cluster.gateway.frontend,
            client.local_addr().unwrap()
        ),
        Some(true)
    );

    // A label in edge mode but not direct: the gateway's own TLS (its certificate covers
    // *.<domain>), then HTTP as before.
    let mut tls = tls_connect(
        cluster.gateway.frontend,
        &cluster.gateway.cert.cert,
        &format!("plain.{DOMAIN}"),
    )
    .await;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: plain.{DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(
        response.status, 503,
        "its control port is down: {response:?}"
    );
    // And the registrar's name.
    let mut tls = tls_connect(
        cluster.gateway.frontend,
        &cluster.gateway.cert.cert,
        REGISTRAR,
    )
    .await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let _ = read_response(&mut tls).await;
    assert!(
        plain.accepted.try_recv().is_err(),
        "nothing raw for a non-direct label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_relay_that_claims_a_hidden_server_gets_commit_and_the_connection() {
    let cluster = EdgeGateway::start().await;
    let mut mine = EdgeRelay::start(Answer::Claim).await;
    let mut other = EdgeRelay::start(Answer::NotMine).await;
    let t = cluster.t(3);
    cluster
        .set_routes(&[
            (
                "mine",
                EdgeRoute::edge(mine.addr).owning(&[cluster.t(2), t]),
            ),
            (
                "other",
                EdgeRoute::edge(other.addr).owning(&[t, cluster.t(4)]),
            ),
        ])
        .await;
    let mut hidden = connect_from("127.0.0.3", SocketAddr::from(([127, 0, 0, 1], t))).await;
    let hidden_addr = hidden.local_addr().unwrap();
    let (header, mut relay) = mine.next().await;
    assert_eq!(header.kind, EdgeKind::Rendezvous);
    assert_eq!(header.label, "mine");
    assert_eq!(header.token, token_for("mine"));
    assert_eq!(header.source, hidden_addr);
    assert_eq!(header.destination.port(), t);
    let (other_header, mut other_relay) = other.next().await;
    assert_eq!(other_header.label, "other");
    let mut commit = [0u8; 1];
    tokio::time::timeout(PATIENCE, relay.read_exact(&mut commit))
        .await
        .expect("COMMIT within patience")
        .unwrap();
    assert_eq!(commit, [edge::COMMIT]);
    assert_closed(&mut other_relay).await;
    echo_back(&mut relay, &mut hidden, b"a client's bytes").await;
    echo_back(&mut hidden, &mut relay, b"the hidden server's").await;
    assert_eq!(cluster.forwarded("rendezvous").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_none_or_a_port_nobody_owns_close_the_hidden_server_and_are_counted() {
    let cluster = EdgeGateway::start().await;
    let mut a = EdgeRelay::start(Answer::Claim).await;
    let mut b = EdgeRelay::start(Answer::Claim).await;
    let mut c = EdgeRelay::start(Answer::NotMine).await;
    let (both, neither, nobody) = (cluster.t(0), cluster.t(1), cluster.t(7));
    cluster
        .set_routes(&[
            ("a", EdgeRoute::edge(a.addr).owning(&[both])),
            ("b", EdgeRoute::edge(b.addr).owning(&[both])),
            ("c", EdgeRoute::edge(c.addr).owning(&[neither])),
        ])
        .await;
    let at = |t: u16| SocketAddr::from(([127, 0, 0, 1], t));

    let mut hidden = connect_from("127.0.0.2", at(both)).await;
    assert_closed(&mut hidden).await;
    cluster.wait_refused("ambiguous", 1.0).await;
    for relay in [&mut a, &mut b] {
        let (_, mut stream) = relay.next().await;
        // Closed without a COMMIT: the relay keeps its registration.
        assert_closed(&mut stream).await;
    }

    let mut hidden = connect_from("127.0.0.2", at(neither)).await;
    assert_closed(&mut hidden).await;
    cluster.wait_refused("no_registration", 1.0).await;
    let _ = c.next().await;

    let mut hidden = connect_from("127.0.0.2", at(nobody)).await;
    assert_closed(&mut hidden).await;
    cluster.wait_refused("no_route", 1.0).await;
    assert_eq!(cluster.forwarded("rendezvous").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_candidate_costs_the_claim_deadline_and_a_sole_claim_beside_it_still_wins() {
    let cluster = EdgeGateway::start().await;
    let mut silent = EdgeRelay::start(Answer::Silent).await;
    let mut no = EdgeRelay::start(Answer::NotMine).await;
    let mut yes = EdgeRelay::start(Answer::Claim).await;
    let (t, u) = (cluster.t(5), cluster.t(6));
    cluster
        .set_routes(&[
            ("silent", EdgeRoute::edge(silent.addr).owning(&[t, u])),
            ("no", EdgeRoute::edge(no.addr).owning(&[t])),
            ("yes", EdgeRoute::edge(yes.addr).owning(&[u])),
        ])
        .await;
    let started = Instant::now();
    let mut hidden = connect_from("127.0.0.2", SocketAddr::from(([127, 0, 0, 1], t))).await;
    assert_closed(&mut hidden).await;
    let waited = started.elapsed();
    eprintln!("figure: a rendezvous with a silent candidate closed after {waited:?}");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "the claim deadline (2 s): {waited:?}"
    );
    cluster.wait_refused("relay_unreachable", 1.0).await;
    let _ = (silent.next().await, no.next().await);

    // Silent and a claim: the claim wins, once the silent one's deadline has passed.
    let started = Instant::now();
    let _hidden = connect_from("127.0.0.2", SocketAddr::from(([127, 0, 0, 1], u))).await;
    let (_, mut relay) = yes.next().await;
    let mut commit = [0u8; 1];
    tokio::time::timeout(PATIENCE, relay.read_exact(&mut commit))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(commit, [edge::COMMIT]);
    let committed = started.elapsed();
    eprintln!("figure: a sole claim beside a silent candidate committed after {committed:?}");
    // Every candidate is heard (or its deadline passes) before a commit: a second claim
    // would make it ambiguous.
    assert!(committed >= Duration::from_millis(1900), "{committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_silent_peers_and_garbage_on_the_shared_port_are_closed_in_time_and_counted()
{
    let first_byte = Duration::from_millis(400);
    let cluster = EdgeGateway::start_with(|options| {
        options.timeouts = Timeouts {
            first_byte,
            handshake: Duration::from_millis(1200),
            ..Timeouts::default()
        };
    })
    .await;
    let mut home = EdgeRelay::start(Answer::Silent).await;
    cluster
        .set_routes(&[
            ("home", EdgeRoute::edge(home.addr)),
            (
                "old",
                EdgeRoute {
                    edge: None,
                    ..EdgeRoute::edge(home.addr)
                },
            ),
        ])
        .await;
    let shared = cluster.shared();
    for (name, reason) in [
        (format!("nobody.{DOMAIN}"), "unknown_name"),
        (format!("old.{DOMAIN}"), "no_edge"),
        ("home.example.com".to_string(), "outside_domain"),
    ] {
        let mut client = TcpStream::connect(shared).await.unwrap();
        client.write_all(&client_hello(Some(&name))).await.unwrap();
        assert_closed(&mut client).await;
        cluster.wait_refused(reason, 1.0).await;
    }
    let mut garbage = TcpStream::connect(shared).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_closed(&mut garbage).await;
    cluster.wait_refused("not_client_hello", 1.0).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(shared).await.unwrap();
    let mut stalled = TcpStream::connect(shared).await.unwrap();
    stalled
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}")))[..3])
        .await
        .unwrap();
    assert_closed(&mut silent).await;
    let silent_cut = started.elapsed();
    assert_closed(&mut stalled).await;
    let stalled_cut = started.elapsed();
    eprintln!(
        "figure: shared port: silent peer cut after {silent_cut:?}, stalled after {stalled_cut:?}"
    );
    assert!(silent_cut >= first_byte - Duration::from_millis(50) && silent_cut < PATIENCE / 2);
    assert!(stalled_cut >= Duration::from_millis(1150) && stalled_cut < PATIENCE / 2);
    cluster.wait_refused("silent", 1.0).await;
    cluster.wait_refused("deadline", 1.0).await;

    // The label is unaffected.
    let mut client = TcpStream::connect(shared).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
        .await
        .unwrap();
    let (header, _relay) = home.next().await;
    assert_eq!(header.label, "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_and_garbage_on_a_rendezvous_port_are_closed_within_the_claim_deadline() {
    let cluster = EdgeGateway::start().await;
    let mut owner = EdgeRelay::start(Answer::NotMine).await;
    let t = cluster.t(0);
    cluster
        .set_routes(&[("home", EdgeRoute::edge(owner.addr).owning(&[t]))])
        .await;
    let at = SocketAddr::from(([127, 0, 0, 1], t));
    // A stranger on T: the relay says it is not its registration's source; closed.
    let started = Instant::now();
    let mut silent = connect_from("127.0.0.4", at).await;
    let mut garbage = connect_from("127.0.0.5", at).await;
    garbage.write_all(b"\x00\xffgarbage").await.unwrap();
    assert_closed(&mut silent).await;
    assert_closed(&mut garbage).await;
    assert!(started.elapsed() < CLAIM_BOUND, "{:?}", started.elapsed());
    cluster.wait_refused("no_registration", 2.0).await;
    for _ in 0..2 {
        let (header, _) = owner.next().await;
        assert!(["127.0.0.4", "127.0.0.5"].contains(&header.source.ip().to_string().as_str()));
    }
}

/// Well within patience, above the 2 s claim deadline.
const CLAIM_BOUND: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_cap_is_refused_on_the_shared_port_while_another_source_is_forwarded() {
    let cluster = EdgeGateway::start_with(|options| options.edge_limits.per_source = 1).await;
    let mut home = EdgeRelay::start(Answer::Silent).await;
    cluster
        .set_routes(&[("home", EdgeRoute::edge(home.addr))])
        .await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut first = connect_from("127.0.0.2", cluster.shared()).await;
    first.write_all(&hello).await.unwrap();
    let (_, mut first_relay) = home.next().await;
    let mut second = connect_from("127.0.0.2", cluster.shared()).await;
    second.write_all(&hello).await.unwrap();
    assert_closed(&mut second).await;
    cluster.wait_refused("source_limit", 1.0).await;
    let mut other = connect_from("127.0.0.3", cluster.shared()).await;
    other.write_all(&hello).await.unwrap();
    let (header, _) = home.next().await;
    assert_eq!(header.source.ip().to_string(), "127.0.0.3");
    // The first is still forwarded.
    echo_back(&mut first_relay, &mut first, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_install_secret_nothing_is_forwarded_and_the_refusal_says_why() {
    let cluster = EdgeGateway::start_with(|options| options.install_secret_file = None).await;
    let mut home = EdgeRelay::start(Answer::Claim).await;
    let t = cluster.t(0);
    cluster
        .set_routes(&[("home", EdgeRoute::edge(home.addr).owning(&[t]))])
        .await;
    let mut client = TcpStream::connect(cluster.shared()).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    let mut hidden = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], t)))
        .await
        .unwrap();
    assert_closed(&mut hidden).await;
    cluster.wait_refused("no_secret", 2.0).await;
    assert!(home.accepted.try_recv().is_err(), "no relay was asked");
}

// ---------------------------------------------------------------------------------------
// The whole path: real label relays with their edge port, registrations through the
// gateway's HTTPS port, hidden servers parked through the shared rendezvous range.

/// A label relay as the operator runs it in edge mode: its edge port on, its local p ports
/// mapped to the gateway's rendezvous ports `ts` and q to the gateway's shared port, its host
/// the gateway's address.
async fn start_edge_label_relay(
    cluster: &EdgeGateway,
    label: &TestLabel,
    ts: &[u16],
) -> LabelRelay {
    label_relay::start(LabelRelayOptions {
        edge: Some("127.0.0.1:0".parse().unwrap()),
        metrics: None,
        ..cluster.label_relay_options(label, ts, &["127.0.0.1/32"])
    })
    .await
    .expect("label relay starts")
}

/// The route of a label relay started by [`start_edge_label_relay`].
fn route_to(relay: &LabelRelay, ts: &[u16]) -> EdgeRoute {
    EdgeRoute {
        relay: relay.control.to_string(),
        ..EdgeRoute::edge(relay.edge.expect("the relay's edge port")).owning(ts)
    }
}

fn parked(relay: &LabelRelay, label: &str) -> usize {
    relay.relay.label(label).map_or(0, |l| l.parked())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_alone_a_hidden_server_parks_and_a_shared_port_client_reaches_it_unchanged(
) {
    let cluster = EdgeGateway::start().await;
    let home = TestLabel::new("home");
    let ts = [cluster.t(0), cluster.t(1)];
    let relay = start_edge_label_relay(&cluster, &home, &ts).await;
    cluster.set_routes(&[("home", route_to(&relay, &ts))]).await;
    let mut hidden = cluster.park_from("127.0.0.2", &home).await;
    eventually("parked through the gateway", || async {
        parked(&relay, "home") == 1
    })
    .await;
    assert_eq!(cluster.forwarded("rendezvous").await, 1.0);
    assert_client_hello_passes_unchanged(cluster.shared(), &format!("home.{DOMAIN}"), &mut hidden)
        .await;
    assert_eq!(cluster.forwarded("shared_port").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_direct_label_on_the_gateways_https_port_with_no_307_and_others_keep_theirs()
{
    let cluster = EdgeGateway::start().await;
    let home = TestLabel::new("home").with("direct: true");
    let work = TestLabel::new("work");
    let (home_ts, work_ts) = ([cluster.t(0), cluster.t(1)], [cluster.t(1), cluster.t(2)]);
    let home_relay = start_edge_label_relay(&cluster, &home, &home_ts).await;
    let work_relay = start_edge_label_relay(&cluster, &work, &work_ts).await;
    cluster
        .set_routes(&[
            ("home", route_to(&home_relay, &home_ts).direct()),
            ("work", route_to(&work_relay, &work_ts)),
        ])
        .await;
    let page = TlsPage::start(&format!("home.{DOMAIN}"), "hello, directly").await;
    let agent = taas_testkit::agent::Agent::start(
        cluster.gateway.frontend,
        &cluster.gateway.cert.cert,
        &home,
        page.addr,
        2,
        |_| {},
    );
    eventually("the agent parked two through the gateway", || async {
        parked(&home_relay, "home") == 2
    })
    .await;
    let port = cluster.gateway.frontend.port();
    page.assert_served_directly(&format!("home.{DOMAIN}"), port, cluster.dir.path())
        .await;
    assert_eq!(cluster.forwarded("direct").await, 1.0);

    // The other label: the gateway's TLS and its relay's 307, to the shared port.
    let _work_parked = cluster.park_from("127.0.0.3", &work).await;
    eventually("work parked", || async { parked(&work_relay, "work") == 1 }).await;
    let mut tls = cluster
        .tls_from("127.0.0.1", &format!("work.{DOMAIN}"))
        .await;
    tls.write_all(
        format!("GET /x HTTP/1.1\r\nHost: work.{DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 307, "{response:?}");
    assert_eq!(
        response.header("location"),
        Some(format!("https://work.{DOMAIN}:{}/x", cluster.shared().port()).as_str())
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_labels_whose_slices_overlap_both_park_through_the_same_port_from_their_own_sources() {
    let cluster = EdgeGateway::start().await;
    let a = TestLabel::new("alpha");
    let b = TestLabel::new("beta");
    // One p port each, both mapped to the same T.
    let t = [cluster.t(4)];
    let a_relay = start_edge_label_relay(&cluster, &a, &t).await;
    let b_relay = start_edge_label_relay(&cluster, &b, &t).await;
    cluster
        .set_routes(&[
            ("alpha", route_to(&a_relay, &t)),
            ("beta", route_to(&b_relay, &t)),
        ])
        .await;
    let _a_hidden = cluster.park_from("127.0.0.2", &a).await;
    let _b_hidden = cluster.park_from("127.0.0.3", &b).await;
    eventually("both parked", || async {
        parked(&a_relay, "alpha") == 1 && parked(&b_relay, "beta") == 1
    })
    .await;
    assert_eq!(cluster.forwarded("rendezvous").await, 2.0);

    // A stranger on T: neither relay claims it; closed and counted, the labels unaffected.
    let mut stranger = connect_from("127.0.0.4", SocketAddr::from(([127, 0, 0, 1], t[0]))).await;
    assert_closed(&mut stranger).await;
    cluster.wait_refused("no_registration", 1.0).await;
    let _again = cluster.park_from("127.0.0.2", &a).await;
    eventually("alpha parks again", || async {
        parked(&a_relay, "alpha") == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_is_down_closes_the_client_counted_by_whether_its_route_said_ready() {
    let cluster = EdgeGateway::start().await;
    // A port nothing listens on.
    let down = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    cluster
        .set_routes(&[
            ("up", EdgeRoute::edge(down)),
            (
                "starting",
                EdgeRoute {
                    ready: false,
                    ..EdgeRoute::edge(down).direct()
                },
            ),
        ])
        .await;
    let mut client = TcpStream::connect(cluster.shared()).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("up.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    cluster.wait_refused("relay_unreachable", 1.0).await;
    // A direct label whose route is not ready yet is tried all the same (the flag lags).
    let mut client = TcpStream::connect(cluster.gateway.frontend).await.unwrap();
    client
        .write_all(&client_hello(Some(&format!("starting.{DOMAIN}"))))
        .await
        .unwrap();
    assert_closed(&mut client).await;
    cluster.wait_refused("not_ready", 1.0).await;
}
