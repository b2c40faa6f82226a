//! Several relay replicas per label (issue 16, items 3 and 4), over loopback: the gateway in
//! edge mode in front of two in-process label relays for one label, one on 127.0.0.2 and one
//! on 127.0.0.3 with the same ports (as two pods behind one headless Service), listed in the
//! routes file. An in-process agent registers through the gateway's HTTPS port; clients come
//! through the shared client port (and the HTTPS port, for a direct label).
//!
//! The figures (clients, failures, parked per replica) are printed with `eprintln!`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taas_protocol::edge::{self, EdgeKind, Parsed};
use taas_relay::run::pod::{self as label_relay, LabelRelay, LabelRelayOptions};
use taas_testkit::agent::Agent;
use taas_testkit::gateway::EdgeGateway;
use taas_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the replicas of a label run: two pods behind one headless Service.
const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";

/// The ports every replica of a label uses (on its own address), as in a pod template.
#[derive(Clone, Copy, Debug)]
struct ReplicaPorts {
    control: u16,
    edge: u16,
}

/// What the replicas of one label share: the options of their pod template.
struct Template {
    options: LabelRelayOptions,
    ports: ReplicaPorts,
}

impl Template {
    fn new(cluster: &EdgeGateway, label: &TestLabel) -> Self {
        let ts = cluster.rendezvous_ports();
        // Fixed ports on two addresses: from a block below the ephemeral range, where no
        // test's outgoing connection takes a source port (an OS-chosen port free on one
        // address was once in use on the other).
        let (block, _) = taas_testkit::ports::port_block(2);
        let ports = ReplicaPorts {
            control: block.lo,
            edge: block.lo + 1,
        };
        Self {
            options: cluster.label_relay_options(label, &ts, &["127.0.0.0/8"]),
            ports,
        }
    }

    /// A replica on `ip`: the template's ports on that address.
    async fn replica(&self, ip: &str) -> LabelRelay {
        let at = |port: u16| format!("{ip}:{port}").parse().unwrap();
        label_relay::start(LabelRelayOptions {
            control: at(self.ports.control),
            edge: Some(at(self.ports.edge)),
            metrics: Some(at(0)),
            ..self.options.clone()
        })
        .await
        .expect("replica starts")
    }
}

/// Whether replica B runs from the start, or is listed in the route before it runs (refused
/// until it does, as a pod not started yet).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StartB {
    Now,
    Later,
}

/// Replicas of `home` from one template behind the gateway: A on 127.0.0.2, B on 127.0.0.3,
/// both addresses in the route from the start.
struct Pair {
    // Stopped before the gateway (fields drop in order).
    a: LabelRelay,
    b: Option<LabelRelay>,
    template: Template,
    home: TestLabel,
    cluster: EdgeGateway,
}

impl Pair {
    async fn start(home: TestLabel, b: StartB) -> Self {
        let cluster = EdgeGateway::start().await;
        let template = Template::new(&cluster, &home);
        let a = template.replica(A).await;
        let b = match b {
            StartB::Now => Some(template.replica(B).await),
            StartB::Later => None,
        };
        let direct = home.manifest().contains("direct: true");
        let pair = Self {
            a,
            b,
            template,
            home,
            cluster,
        };
        pair.route(direct).await;
        pair
    }

    /// Routes `home` to both replicas' addresses, with the template's ports.
    async fn route(&self, direct: bool) {
        self.route_to(&[A, B], direct).await;
    }

    /// Routes `home` to the replicas on `ips`, as a headless Service lists the ready pods.
    async fn route_to(&self, ips: &[&str], direct: bool) {
        route_home(&self.cluster, self.template.ports, ips, direct).await;
    }

    /// Starts B (listed in the route already).
    async fn start_b(&mut self) {
        assert!(self.b.is_none(), "B runs already");
        self.b = Some(self.template.replica(B).await);
    }

    fn b(&self) -> &LabelRelay {
        self.b.as_ref().expect("B runs")
    }

    /// The hidden server parks one connection (on A) and a client on the shared port uses it:
    /// the label has registered lately and has nothing parked. Returns both ends, to keep.
    async fn park_once_and_use_it(&self) -> (TcpStream, TcpStream) {
        let server = self.cluster.park_from("127.0.0.5", &self.home).await;
        eventually("parked on A", || async { parked(&self.a, "home") == 1 }).await;
        let mut client = TcpStream::connect(self.cluster.shared()).await.unwrap();
        client
            .write_all(&client_hello(Some(&format!("home.{DOMAIN}"))))
            .await
            .unwrap();
        eventually("the parked connection used", || async {
            parked(&self.a, "home") == 0
        })
        .await;
        (server, client)
    }

    /// Parked on (A, B); none on B before it runs.
    fn parked(&self) -> (usize, usize) {
        let on_b = self.b.as_ref().map_or(0, |b| parked(b, "home"));
        (parked(&self.a, "home"), on_b)
    }

    /// The agent for `home` through the gateway, parking `n`, towards an echo server.
    async fn agent(&self, n: usize) -> (Agent, tokio::task::JoinHandle<()>) {
        agent_through(&self.cluster, &self.home, n).await
    }
}

/// The agent for `home` through the gateway, parking `n`, towards an echo server.
async fn agent_through(
    cluster: &EdgeGateway,
    home: &TestLabel,
    n: usize,
) -> (Agent, tokio::task::JoinHandle<()>) {
    let (echo, echo_task) = echo_server().await;
    let agent = Agent::start(
        cluster.gateway.frontend,
        &cluster.gateway.cert.cert,
        home,
        echo,
        n,
        // The agent's own backoff, not the tests' short one: a parked connection given back
        // by a draining replica must not cost the agent a long pause.
        |config| config.max_backoff = taas_relay::agent::DEFAULT_MAX_BACKOFF,
    );
    (agent, echo_task)
}

/// Routes `home` to the replicas on `ips` (each with `ports`), as a headless Service lists
/// the ready pods, and waits until the gateway has it.
async fn route_home(cluster: &EdgeGateway, ports: ReplicaPorts, ips: &[&str], direct: bool) {
    let list = |port: u16| {
        let items: Vec<String> = ips.iter().map(|ip| format!("\"{ip}:{port}\"")).collect();
        format!("[{}]", items.join(", "))
    };
    let text = format!(
        "home: {{relay: {}, edge: {}, direct: {direct}, rendezvous: {:?}}}\n",
        list(ports.control),
        list(ports.edge),
        cluster.rendezvous_ports()
    );
    std::fs::write(cluster.routes_file(), text).unwrap();
    let control: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{}", ports.control))
        .collect();
    eventually("routes applied", || async {
        cluster
            .gateway
            .routes
            .get("home")
            .is_some_and(|r| r.relay.names() == control.as_slice())
    })
    .await;
}

fn parked(relay: &LabelRelay, label: &str) -> usize {
    relay.relay.label(label).map_or(0, |l| l.parked())
}

async fn pairings(relay: &LabelRelay, label: &str, entry: &str) -> f64 {
    let text = taas_testkit::readings::scrape(relay.metrics.unwrap()).await;
    metric(
        &text,
        &format!("taas_pairings_total{{label=\"{label}\",entry=\"{entry}\"}}"),
    )
}

/// One client through `entry` (the shared port or the HTTPS port) for `name`: its
/// ClientHello and some bytes, all echoed back by the hidden side. `Err` says what failed.
async fn one_client(entry: SocketAddr, name: &str, n: usize) -> Result<(), String> {
    let mut bytes = client_hello(Some(name));
    bytes.extend_from_slice(format!("client {n} says hello").as_bytes());
    let attempt = async {
        let mut client = TcpStream::connect(entry).await.map_err(|e| e.to_string())?;
        client.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; bytes.len()];
        client
            .read_exact(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if back != bytes {
            return Err("other bytes came back".into());
        }
        Ok(())
    };
    match tokio::time::timeout(PATIENCE + PATIENCE, attempt).await {
        Ok(result) => result,
        Err(_) => Err("no answer within patience".into()),
    }
}

/// `total` clients of `home` through the shared port, run by 4 tasks, each pausing 130 ms
/// between its clients: the load the drains below must not fail.
struct SteadyLoad {
    task: tokio::task::JoinHandle<Vec<String>>,
    done: Arc<AtomicUsize>,
}

impl SteadyLoad {
    fn start(entry: SocketAddr, total: usize) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(steady_clients(
            entry,
            format!("home.{DOMAIN}"),
            total,
            4,
            Duration::from_millis(130),
            done.clone(),
        ));
        Self { task, done }
    }

    /// How many clients have run.
    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` clients have run.
    async fn until_done(&self, what: &str, n: usize) {
        eventually(what, || async { self.done() >= n }).await;
    }

    /// The failures (with what failed), once every client has run (bounded).
    async fn failures(self) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the load ends")
            .unwrap()
    }
}

/// Clients run by `workers` tasks, `total` in all, each worker pausing `pause` between its
/// clients; returns the failures (with what failed).
async fn steady_clients(
    entry: SocketAddr,
    name: String,
    total: usize,
    workers: usize,
    pause: Duration,
    done: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..workers {
        let (name, next, done) = (name.clone(), next.clone(), done.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return failures;
                }
                if let Err(problem) = one_client(entry, &name, n).await {
                    failures.push(format!("client {n}: {problem}"));
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.unwrap());
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_parked_connections_spread_over_both_replicas() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Now).await;
    let (agent, _echo) = replicas.agent(8).await;
    eventually("the agent parked 8 over the two replicas", || async {
        let (a, b) = replicas.parked();
        a + b == 8
    })
    .await;
    let (a, b) = replicas.parked();
    eprintln!("figure: agent --parked 8 through the gateway: replica A {a}, replica B {b}");
    assert!(a >= 3 && b >= 3, "A {a}, B {b}");
    assert_eq!(agent.parked(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_through_the_shared_port_and_a_direct_labels_https_port_are_served_by_either_replica(
) {
    let home = TestLabel::new("home").with("direct: true");
    let replicas = Pair::start(home, StartB::Now).await;
    let (_agent, _echo) = replicas.agent(8).await;
    eventually("8 parked", || async {
        let (a, b) = replicas.parked();
        a + b == 8 && a > 0 && b > 0
    })
    .await;
    let name = format!("home.{DOMAIN}");
    let shared = replicas.cluster.shared();
    let https = replicas.cluster.gateway.frontend;
    for n in 0..12 {
        one_client(shared, &name, n).await.unwrap();
    }
    for n in 0..12 {
        one_client(https, &name, n).await.unwrap();
    }
    let mut served = Vec::new();
    for relay in [&replicas.a, replicas.b()] {
        let shared = pairings(relay, "home", "shared_port").await;
        let direct = pairings(relay, "home", "direct").await;
        served.push((shared, direct));
    }
    eprintln!(
        "figure: 12 shared-port and 12 direct clients: replica A served {:?}, replica B {:?} (shared, direct)",
        served[0], served[1]
    );
    assert_eq!(served[0].0 + served[1].0, 12.0);
    assert_eq!(served[0].1 + served[1].1, 12.0);
    for (shared, direct) in served {
        assert!(shared > 0.0 && direct > 0.0, "both replicas serve");
    }
    // Every client was offered (a replica refilling may say WAIT before the other SERVEs).
    let metrics = replicas.cluster.metrics().await;
    let offered = ["serve", "wait"].map(|answer| {
        metric(
            &metrics,
            &format!("taas_gateway_edge_offers_total{{answer=\"{answer}\"}}"),
        )
    });
    assert!(
        offered[0] >= 12.0 && offered[0] + offered[1] >= 24.0,
        "{offered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_on_a_shared_port_finds_the_replica_holding_its_registration() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Now).await;
    let (cluster, home) = (&replicas.cluster, &replicas.home);
    let (a, b) = (&replicas.a, replicas.b());
    // Two registrations: the second goes to the replica the first did not (fewest first);
    // each hidden server's connection on the shared port T lands where its registration is.
    let mut parked_streams = Vec::new();
    for expected in 1..=2 {
        parked_streams.push(cluster.park_from("127.0.0.5", home).await);
        eventually("parked on the replica holding the registration", || async {
            parked(a, "home") + parked(b, "home") == expected
        })
        .await;
    }
    let (on_a, on_b) = (parked(a, "home"), parked(b, "home"));
    eprintln!("figure: two registrations through the gateway: replica A {on_a}, replica B {on_b}");
    assert_eq!((on_a, on_b), (1, 1));
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_gateway_edge_connections_total{entry=\"rendezvous\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "taas_gateway_edge_refused_total{reason=\"ambiguous\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_fills_first() {
    // B is listed but not started yet: registrations to it fail over to A.
    let mut replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            replicas
                .cluster
                .park_from("127.0.0.5", &replicas.home)
                .await,
        );
    }
    eventually("4 parked on A", || async { replicas.parked().0 == 4 }).await;
    replicas.start_b().await;
    for _ in 0..3 {
        held.push(
            replicas
                .cluster
                .park_from("127.0.0.5", &replicas.home)
                .await,
        );
    }
    eventually("3 more parked", || async {
        let (a, b) = replicas.parked();
        a + b == 7
    })
    .await;
    let (on_a, on_b) = replicas.parked();
    eprintln!("figure: A with 4 parked, B fresh: the next 3 registrations: A {on_a}, B {on_b}");
    assert_eq!((on_a, on_b), (4, 3));
    let metrics = replicas.cluster.metrics().await;
    assert!(
        metric(
            &metrics,
            "taas_gateway_registrations_retried_total{reason=\"unreachable\"}"
        ) >= 1.0,
        "B's address refused while it was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_gets_no_registration() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Now).await;
    let (cluster, home) = (&replicas.cluster, &replicas.home);
    let (a, b) = (&replicas.a, replicas.b());
    a.drain();
    let mut held = Vec::new();
    for n in 1..=4 {
        held.push(cluster.park_from("127.0.0.5", home).await);
        eventually("parked on B", || async { parked(b, "home") == n }).await;
    }
    assert_eq!(parked(a, "home"), 0);
    let metrics = cluster.metrics().await;
    let retried = metric(
        &metrics,
        "taas_gateway_registrations_retried_total{reason=\"draining\"}",
    );
    eprintln!(
        "figure: 4 registrations with replica A draining: all on B, {retried} retried past A"
    );
    assert!(retried >= 1.0);
    let relay_metrics = taas_testkit::readings::scrape(a.metrics.unwrap()).await;
    assert_eq!(metric(&relay_metrics, "taas_relay_draining"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_one_of_two_replicas_under_a_steady_load_fails_no_client() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Now).await;
    let (_agent, _echo) = replicas.agent(8).await;
    eventually("8 parked over both", || async {
        let (a, b) = replicas.parked();
        a + b == 8 && a > 0 && b > 0
    })
    .await;
    let before = replicas.parked();
    let total = 200;
    let load = SteadyLoad::start(replicas.cluster.shared(), total);
    load.until_done("a quarter of the clients served", total / 4)
        .await;
    let started = Instant::now();
    // As SIGTERM does in the pod.
    replicas.a.drain();
    let failures = load.failures().await;
    let load_took = started.elapsed();
    eventually("the agent's parked connections end on B", || async {
        replicas.parked() == (0, 8)
    })
    .await;
    let metrics = replicas.cluster.metrics().await;
    let offers: Vec<(String, f64)> = ["serve", "wait", "last_resort", "refuse", "no_answer"]
        .iter()
        .map(|a| {
            let series = format!("taas_gateway_edge_offers_total{{answer=\"{a}\"}}");
            (a.to_string(), metric(&metrics, &series))
        })
        .collect();
    eprintln!(
        "figure: {total} clients through the shared port, replica A drained mid-load: {} failures; \
         parked before {before:?}, after {:?} (A, B); the load ran {load_took:?} after the drain; \
         offers {offers:?}",
        failures.len(),
        replicas.parked()
    );
    assert!(failures.is_empty(), "{failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_only_replica_under_a_steady_load_fails_no_client() {
    // The headless Service lists the new pod once it is ready: here the route lists both
    // from the start, the new one refused until it runs.
    let mut replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let (agent, _echo_task) = replicas.agent(8).await;
    eventually("8 parked on A", || async { replicas.parked().0 == 8 }).await;
    let total = 200;
    let load = SteadyLoad::start(replicas.cluster.shared(), total);
    load.until_done("some clients served", total / 5).await;
    // maxSurge 1: the new replica starts, empty, then the old one drains.
    replicas.start_b().await;
    let (a, b) = (&replicas.a, replicas.b());
    let surged = Instant::now();
    a.drain();
    // When every parked connection is on B (the window the label depends on A's hold).
    let moved = {
        let (ra, rb) = (a.relay.clone(), b.relay.clone());
        tokio::spawn(async move {
            let count = |r: &taas_relay::relay::StandaloneBackend| {
                r.label("home").map_or(0, |l| l.parked())
            };
            while !(count(&ra) == 0 && count(&rb) == 8) {
                if surged.elapsed() > Duration::from_secs(30) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some(surged.elapsed())
        })
    };
    let served_at_drain = load.done();
    let failures = load.failures().await;
    let window = surged.elapsed();
    eventually("the agent's parked connections end on B", || async {
        parked(a, "home") == 0 && parked(b, "home") == 8
    })
    .await;
    let moved = moved.await.unwrap();
    eprintln!(
        "figure: one replica replaced under {total} clients ({served_at_drain} served before the \
         drain, the rest over {window:?}): {} failures; parked after: A {}, B {}; all 8 parked \
         on B {moved:?} after the drain began (hold {:?})",
        failures.len(),
        parked(a, "home"),
        parked(b, "home"),
        label_relay::PARKED_HOLD,
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(agent.parked(), 8);
}

/// A relay's edge port as it was before offers: it refuses a header with an unknown TLV
/// (closes without a byte), and takes the old header as before. The accepted streams go to
/// the test.
async fn old_relay() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; edge::MAX_HEADER];
                let mut len = 0;
                let header = loop {
                    let need = match edge::parse(&buf[..len]) {
                        Ok(Parsed::Complete { header, .. }) => break header,
                        Ok(Parsed::Incomplete { need }) => need,
                        Err(_) => return,
                    };
                    match stream.read(&mut buf[len..need]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                };
                if header.offer {
                    return; // an unknown TLV to it: closed without a byte
                }
                assert_eq!(header.kind, EdgeKind::SharedPort);
                let _ = sender.send(stream);
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_offer_tlv_still_gets_clients() {
    let cluster = EdgeGateway::start().await;
    let (old, mut accepted) = old_relay().await;
    let text = format!("home: {{relay: \"127.0.0.1:9\", edge: \"{old}\"}}\n");
    std::fs::write(cluster.routes_file(), text).unwrap();
    eventually("routes applied", || async {
        cluster.gateway.routes.get("home").is_some()
    })
    .await;
    let hello = client_hello(Some(&format!("home.{DOMAIN}")));
    let mut client = TcpStream::connect(cluster.shared()).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let mut relay = tokio::time::timeout(PATIENCE, accepted.recv())
        .await
        .expect("the old relay gets the client")
        .unwrap();
    assert_relayed_both_ways(&mut client, &mut relay, &hello, PATIENCE).await;
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "taas_gateway_edge_offers_total{answer=\"legacy\"}"
        ),
        1.0
    );
}

/// A mobile GET for `home` on the gateway's HTTPS port from `source`.
async fn mobile_get(cluster: &EdgeGateway, source: &str) -> Response {
    spawn_mobile_get(cluster, source).await.unwrap()
}

/// [`mobile_get`] in a task of its own (it panics on a broken connection: the task's error).
fn spawn_mobile_get(cluster: &EdgeGateway, source: &str) -> tokio::task::JoinHandle<Response> {
    let gateway = &cluster.gateway;
    let (https, ca, source) = (
        gateway.frontend,
        gateway.cert.cert.clone(),
        source.to_string(),
    );
    tokio::spawn(async move {
        let host = format!("home.{DOMAIN}");
        let mut tls = tls_connect_from(&source, https, &ca, &host).await;
        let request = format!("GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mobile_get_passes_over_a_replica_without_the_label_to_one_that_has_it() {
    // B runs from a template of another label (it answers 404 for home), with home's gateway
    // token and home's ports: a replica that has not loaded home, or no longer has it.
    let mut replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let other = Template::new(&replicas.cluster, &TestLabel::new("other"));
    let b = label_relay::start(LabelRelayOptions {
        control: format!("{B}:{}", replicas.template.ports.control)
            .parse()
            .unwrap(),
        edge: None,
        metrics: None,
        gateway_token: replicas.template.options.gateway_token.clone(),
        ..other.options.clone()
    })
    .await
    .expect("B starts");
    replicas.b = Some(b);
    // Nothing parked yet: A's 503 (home is there, try again soon), whichever replica the
    // gateway asks first, never B's 404 (no such label).
    for _ in 0..4 {
        let response = mobile_get(&replicas.cluster, "127.0.0.6").await;
        assert_eq!(response.status, 503, "{response:?}");
    }
    let _parked = replicas
        .cluster
        .park_from("127.0.0.5", &replicas.home)
        .await;
    eventually("parked on A", || async { parked(&replicas.a, "home") == 1 }).await;
    // Parked on A: every GET gets A's 307.
    for _ in 0..8 {
        let response = mobile_get(&replicas.cluster, "127.0.0.6").await;
        assert_eq!(response.status, 307, "{response:?}");
    }
}

/// Reads `want.len()` bytes from whichever of the two sends first: 0 or 1.
async fn first_to_send(two: &mut [TcpStream], want: &[u8]) -> usize {
    let [x, y] = two else { panic!("two streams") };
    let (mut got_x, mut got_y) = (vec![0u8; want.len()], vec![0u8; want.len()]);
    let first = tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            read = x.read_exact(&mut got_x) => read.map(|_| 0),
            read = y.read_exact(&mut got_y) => read.map(|_| 1),
        }
    })
    .await
    .expect("a hidden server gets the client within patience")
    .expect("read");
    assert_eq!([&got_x, &got_y][first], want);
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_gives_parked_connections_back_at_once_and_lets_a_pair_finish() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let mut hidden = Vec::new();
    for n in 1..=2 {
        hidden.push(
            replicas
                .cluster
                .park_from("127.0.0.5", &replicas.home)
                .await,
        );
        eventually("parked on A", || async { parked(&replicas.a, "home") == n }).await;
    }
    // A client through the shared port, paired with one of the two.
    let mut first = client_hello(Some(&format!("home.{DOMAIN}")));
    first.extend_from_slice(b"ping");
    let mut client = TcpStream::connect(replicas.cluster.shared()).await.unwrap();
    client.write_all(&first).await.unwrap();
    let paired = first_to_send(&mut hidden, &first).await;
    let mut server = hidden.swap_remove(paired);
    let mut idle = hidden.pop().unwrap();
    let shared = replicas.cluster.shared();
    let Pair { a, cluster, .. } = replicas;
    let gateway = cluster.gateway;
    assert_eq!(gateway.forwarded(), 3, "the client and both hidden servers");
    let stopping = tokio::spawn(gateway.drain_and_stop(
        Duration::ZERO,
        Duration::from_secs(60),
        std::future::pending(),
    ));
    // The parked one is given back at once: its agent would park again elsewhere.
    assert_closed(&mut idle).await;
    eventually("the relay sees it go", || async { parked(&a, "home") == 0 }).await;
    // No new connection is taken.
    eventually("the shared port closed", || async {
        TcpStream::connect(shared).await.is_err()
    })
    .await;
    // The pair goes on, both ways, and the gateway waits for it.
    client.write_all(b"more").await.unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"more");
    server.write_all(b"back").await.unwrap();
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"back");
    assert!(!stopping.is_finished(), "a pair is still forwarded");
    drop(client);
    drop(server);
    let end = tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("the gateway stops once the pair has ended")
        .unwrap();
    assert_eq!(end, taas_relay::run::DrainEnd::PairsDone);
    drop(a);
    drop(cluster.dir);
}

/// Where the replicas of a rollout's new pods run.
const C: &str = "127.0.0.4";
const D: &str = "127.0.0.7";

/// A mobile client as `curl -L https://home.DOMAIN/` is (the e2e test's steady load): a GET
/// on the gateway's HTTPS port, then the 307's port (the shared client port) with a
/// ClientHello and some bytes, all echoed back. `Err` says what failed.
async fn mobile_client(cluster: &EdgeGateway, n: usize) -> Result<(), String> {
    let response = spawn_mobile_get(cluster, "127.0.0.6")
        .await
        .map_err(|e| format!("GET: {e}"))?;
    if response.status != 307 {
        return Err(format!(
            "GET: {} {:?}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    if response.location_port() != cluster.shared().port() {
        return Err(format!("307 to {:?}", response.header("location")));
    }
    one_client(cluster.shared(), &format!("home.{DOMAIN}"), n).await
}

/// Mobile clients one after another, 50 ms apart, until stopped (at most 2,000, or 90 s); it
/// can be paused between two clients.
struct MobileLoad {
    task: tokio::task::JoinHandle<Vec<String>>,
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Asked to pause / paused (between two clients).
    pause: Arc<(AtomicBool, AtomicBool)>,
}

impl MobileLoad {
    fn start(cluster: Arc<EdgeGateway>) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new((AtomicBool::new(false), AtomicBool::new(false)));
        let (counted, stopped, paused) = (done.clone(), stop.clone(), pause.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let over =
                || stopped.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(90);
            let mut failures = Vec::new();
            for n in 0..2000 {
                while paused.0.load(Ordering::SeqCst) && !over() {
                    paused.1.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                paused.1.store(false, Ordering::SeqCst);
                if over() {
                    break;
                }
                if let Err(problem) = mobile_client(&cluster, n).await {
                    failures.push(format!("client {n} at {:?}: {problem}", started.elapsed()));
                }
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        });
        Self {
            task,
            done,
            stop,
            pause,
        }
    }

    /// Pauses it once the client under way has ended (bounded).
    async fn pause(&self) {
        self.pause.0.store(true, Ordering::SeqCst);
        eventually("the load paused", || async {
            self.pause.1.load(Ordering::SeqCst)
        })
        .await;
    }

    fn resume(&self) {
        self.pause.0.store(false, Ordering::SeqCst);
    }

    /// Waits (bounded) until `more` further clients have run.
    async fn run_for(&self, what: &str, more: usize) {
        let until = self.done.load(Ordering::SeqCst) + more;
        eventually(what, || async { self.done.load(Ordering::SeqCst) >= until }).await;
    }

    /// Stops it; how many clients ran, and the failures (with what failed).
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the load ends")
            .unwrap();
        (self.done.load(Ordering::SeqCst), failures)
    }
}

/// `home`'s replicas behind the gateway, each on its own address, listed in the route as a
/// headless Service lists the ready pods: the rollouts below change the route as kube does.
struct Rollout {
    replicas: Vec<(&'static str, LabelRelay)>,
    template: Template,
    home: TestLabel,
    cluster: Arc<EdgeGateway>,
}

impl Rollout {
    async fn start(ips: &[&'static str]) -> Self {
        let home = TestLabel::new("home");
        let cluster = Arc::new(EdgeGateway::start().await);
        let template = Template::new(&cluster, &home);
        let mut rollout = Self {
            replicas: Vec::new(),
            template,
            home,
            cluster,
        };
        for ip in ips {
            rollout.surge(ip).await;
        }
        rollout
    }

    fn listed(&self) -> Vec<&'static str> {
        self.replicas
            .iter()
            .filter(|(_, relay)| !relay.relay.is_draining())
            .map(|(ip, _)| *ip)
            .collect()
    }

    async fn route(&self) {
        route_home(&self.cluster, self.template.ports, &self.listed(), false).await;
    }

    /// A new replica on `ip`, listed once it runs (ready).
    async fn surge(&mut self, ip: &'static str) {
        let relay = self.template.replica(ip).await;
        self.replicas.push((ip, relay));
        self.route().await;
    }

    /// SIGTERM to the replica on `ip`: it drains and leaves the route at once (its parked
    /// connections are held for `PARKED_HOLD`, then given back).
    async fn terminate(&self, ip: &str) {
        let (_, relay) = self.replicas.iter().find(|(at, _)| *at == ip).unwrap();
        relay.drain();
        self.route().await;
    }

    /// Parked per replica, in start order.
    fn parked(&self) -> Vec<usize> {
        self.replicas
            .iter()
            .map(|(_, relay)| parked(relay, "home"))
            .collect()
    }

    async fn agent(&self, n: usize) -> (Agent, tokio::task::JoinHandle<()>) {
        agent_through(&self.cluster, &self.home, n).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_only_replica_as_its_headless_service_does_fails_no_mobile_client() {
    let mut rollout = Rollout::start(&[A]).await;
    let (agent, _echo) = rollout.agent(4).await;
    eventually("4 parked on A", || async { rollout.parked() == [4] }).await;
    let load = MobileLoad::start(rollout.cluster.clone());
    load.run_for("clients before the rollout", 10).await;
    // maxSurge 1: B starts and is listed, empty; then A is terminated: it leaves the route
    // with all 4 parked connections, which it holds for PARKED_HOLD. (No client between the
    // two, so B has nothing parked yet: the agent parks a replacement where it registers,
    // and it registers only when a connection is used.)
    load.pause().await;
    rollout.surge(B).await;
    let terminated = Instant::now();
    rollout.terminate(A).await;
    assert_eq!(rollout.parked(), [4, 0]);
    load.resume();
    eventually("every parked connection on B", || async {
        rollout.parked() == [0, 4]
    })
    .await;
    let moved = terminated.elapsed();
    load.run_for("clients after the rollout", 10).await;
    let (clients, failures) = load.stop().await;
    eprintln!(
        "figure: one replica replaced as its Service lists pods, {clients} mobile clients \
         (GET, 307, shared port): {} failed; all parked on the new replica {moved:?} after \
         the old one was terminated",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(agent.parked(), 4);
    let metrics = rollout.cluster.metrics().await;
    assert!(
        metric(
            &metrics,
            "taas_gateway_edge_offers_total{answer=\"last_resort\"}"
        ) > 0.0,
        "the terminated replica served clients while it held its parked connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_two_replicas_fails_no_mobile_client() {
    let mut rollout = Rollout::start(&[A, B]).await;
    let (agent, _echo) = rollout.agent(4).await;
    eventually("4 parked over A and B", || async {
        rollout.parked().iter().sum::<usize>() == 4
    })
    .await;
    let load = MobileLoad::start(rollout.cluster.clone());
    load.run_for("clients before the rollout", 10).await;
    // As a Deployment with maxSurge 1, maxUnavailable 0: C, then A goes; D, then B goes.
    for (new, old) in [(C, A), (D, B)] {
        // No client while the new replica starts: it is listed with nothing parked, the
        // worst case (parked connections move to a replica only as clients use them).
        load.pause().await;
        rollout.surge(new).await;
        rollout.terminate(old).await;
        load.resume();
        eventually("the old replica's parked connections gone", || async {
            let (_, relay) = rollout.replicas.iter().find(|(at, _)| *at == old).unwrap();
            parked(relay, "home") == 0
        })
        .await;
    }
    eventually("4 parked over C and D", || async {
        rollout.parked()[2..].iter().sum::<usize>() == 4
    })
    .await;
    load.run_for("clients after the rollout", 10).await;
    let (clients, failures) = load.stop().await;
    eprintln!(
        "figure: two replicas rolled (surge, then terminate, twice), {clients} mobile clients \
         (GET, 307, shared port): {} failed; parked per replica after {:?} (A, B, C, D)",
        failures.len(),
        rollout.parked()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(agent.parked(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_finding_nothing_parked_is_held_while_the_hidden_server_parks_again() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let cluster = &replicas.cluster;
    let held = |outcome: &str| format!("taas_gateway_clients_held_total{{outcome=\"{outcome}\"}}");
    // A label whose hidden server never registered: 503 at once, nothing held.
    let response = mobile_get(cluster, "127.0.0.6").await;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(metric(&cluster.metrics().await, &held("unavailable")), 0.0);
    // Its hidden server parks once; a client uses that connection: nothing is parked.
    let _pair = replicas.park_once_and_use_it().await;
    // A GET now waits for the hidden server's next connection instead of a 503.
    let get = spawn_mobile_get(cluster, "127.0.0.6");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!get.is_finished(), "held while nothing is parked");
    let _second = cluster.park_from("127.0.0.5", &replicas.home).await;
    let response = tokio::time::timeout(PATIENCE, get)
        .await
        .expect("an answer once parked")
        .unwrap();
    assert_eq!(response.status, 307, "{response:?}");
    assert_eq!(metric(&cluster.metrics().await, &held("served")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_finding_every_replica_draining_waits_for_one_that_starts() {
    // A drains; B is listed but not running yet (a StatefulSet's replacement pod, or a name
    // the cluster DNS lists a moment later).
    let mut replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    replicas.a.drain();
    let gateway = &replicas.cluster.gateway;
    let (frontend, ca) = (gateway.frontend, gateway.cert.cert.clone());
    let (label, authorization) = (replicas.home.label.clone(), replicas.home.authorization());
    let register = tokio::spawn(async move {
        let mut tls = tls_connect_from("127.0.0.5", frontend, &ca, REGISTRAR).await;
        let request = steward_request(&label, frontend.port(), &authorization);
        tls.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !register.is_finished(),
        "held while every replica drains, not answered with A's 503"
    );
    replicas.start_b().await;
    let response = tokio::time::timeout(PATIENCE, register)
        .await
        .expect("an answer once B runs")
        .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let b = replicas.b();
    assert_eq!(
        b.relay.label("home").map(|l| l.parked_and_pending()),
        Some(1),
        "B holds the registration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_held_gets_from_one_address_is_limited_and_another_phone_is_served() {
    let replicas = Pair::start(TestLabel::new("home"), StartB::Later).await;
    let cluster = &replicas.cluster;
    // The hidden server registered lately; its one parked connection used up: GETs are held.
    let _pair = replicas.park_once_and_use_it().await;
    // 150 GETs at once from one address (the gateway's per-source 307 limit: 100 at once,
    // then 20/s), each of those let through held.
    let started = Instant::now();
    let flood: Vec<_> = (0..150)
        .map(|_| spawn_mobile_get(cluster, "127.0.0.6"))
        .collect();
    // Meanwhile the hidden server parks again, and another phone asks.
    let _second = cluster.park_from("127.0.0.5", &replicas.home).await;
    let other = mobile_get(cluster, "127.0.0.8").await;
    assert_eq!(other.status, 307, "{other:?}");
    let mut statuses = std::collections::BTreeMap::new();
    for get in flood {
        let response = tokio::time::timeout(PATIENCE, get)
            .await
            .expect("every flooding GET is answered")
            .unwrap();
        *statuses.entry(response.status).or_insert(0) += 1;
    }
    let took = started.elapsed();
    eprintln!("figure: 150 GETs at once from one address, held: {statuses:?} in {took:?}");
    assert!(
        statuses
            .keys()
            .all(|status| [307, 429, 503].contains(status)),
        "{statuses:?}"
    );
    assert!(statuses.get(&429).is_some_and(|n| *n > 0), "{statuses:?}");
}
