//! Property-based harness for the front end's request handling, end to end: random bytes and
//! random mutations of the steward's valid registration are sent to a real relay (in-process,
//! on loopback) over TLS (and some as raw TCP, before any handshake). Whatever arrives, the
//! relay answers with one of its documented statuses (random bytes: a 4xx) or closes, within a
//! bounded time, never panics anywhere in the process, and keeps registering the genuine
//! hidden server. Runs with the debug log subscriber installed.
//!
//! Cases: 500 random + 1,000 mutated over TLS, 250 raw TCP (`TAAS_PROP_E2E_CASES=N` scales them:
//! N random, 2N mutated, N/2 raw). See docs/robustness.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use taas_testkit::prelude::*;
use taas_testkit::{logs, property};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Where the hostile traffic comes from (the genuine server registers from 127.0.0.1, so the
/// fuzz source being rate limited never blocks it).
const FUZZ_SOURCE: &str = "127.0.0.9";

/// Every status the front end may answer (PROTOCOL.md §2–§4, plus hyper's own 400/408/413/
/// 414/431/505 for broken requests).
const DOCUMENTED: &[u16] = &[
    200, 307, 400, 401, 404, 405, 408, 413, 414, 421, 429, 431, 501, 503, 505,
];

fn e2e_cases() -> u32 {
    property::cases(property::E2E_CASES_ENV, 500)
}

/// How often each answer was seen (0: closed without an answer), printed after a run.
#[derive(Default)]
struct Histogram(std::sync::Mutex<std::collections::BTreeMap<u16, u64>>);

impl Histogram {
    fn add(&self, outcome: &Outcome) {
        let mut map = self.0.lock().unwrap();
        if outcome.statuses.is_empty() {
            *map.entry(0).or_default() += 1;
        }
        for status in &outcome.statuses {
            *map.entry(*status).or_default() += 1;
        }
    }
    fn show(&self, name: &str) {
        eprintln!(
            "{name}: answers (0 = closed without one): {:?}",
            self.0.lock().unwrap()
        );
    }
}

/// What the relay did with one input.
#[derive(Debug)]
struct Outcome {
    statuses: Vec<u16>,
    closed: bool,
}

/// Sends `bytes` (TLS or raw TCP) from the fuzz source, half-closes, and collects every
/// response status until the relay closes (bounded by PATIENCE).
async fn send(relay: SocketAddr, ca: &std::path::Path, bytes: &[u8], tls: bool) -> Outcome {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{FUZZ_SOURCE}:0").parse().unwrap())
        .unwrap();
    let tcp = socket.connect(relay).await.unwrap();
    let read_all = |mut stream: Box<dyn Stream>| async move {
        let _ = stream.write_all(bytes).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        let closed = loop {
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (out, closed)
    };
    let (bytes_back, closed) = if tls {
        let config = taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(
            ca.to_path_buf(),
        ))
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).unwrap();
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the relay");
        read_all(Box::new(stream)).await
    } else {
        read_all(Box::new(tcp)).await
    };
    Outcome {
        statuses: statuses(&bytes_back),
        closed,
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// The status of every `HTTP/1.x NNN` response in `bytes` (bodies are small and never start a
/// line with `HTTP/`).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.split("\r\n")
        .filter(|line| line.starts_with("HTTP/1."))
        .filter_map(|line| line.split(' ').nth(1)?.parse().ok())
        .collect()
}

/// One edit of the valid request.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn token() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static [u8]> = vec![
        b"\r\n",
        b"\r\n\r\n",
        b"\n",
        b"\r",
        b":",
        b" ",
        b"\t",
        b"\0",
        b"\x7f",
        b"\xff",
        b"\xc3\xa9",
        b"Host: ",
        b"Host: home.taas.localhost\r\n",
        b"Host: [::1]\r\n",
        b"Host: 127.0.0.1\r\n",
        b"Authorization: TOTP ",
        b"Authorization: TOTP username=\"x\", response=\"000000\"\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        b"ffffffffffffffff\r\n",
        b"Expect: 100-continue\r\n",
        b"Connection: keep-alive\r\n",
        b"Connection: close\r\n",
        b"Upgrade: h2c\r\n",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"HTTP/9.9",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET ",
        b"PUT ",
        b"OPTIONS * ",
        b"CONNECT ",
        b"/register/",
        b"/../",
        b"%00",
        b"%2F",
        b"?x=1#f",
        b"taas.localhost",
        b"\"",
        b"\\",
        b"=",
        b",",
        b"123456",
        b"12345678",
    ];
    prop_oneof![
        4 => proptest::sample::select(tokens).prop_map(<[u8]>::to_vec),
        2 => proptest::collection::vec(any::<u8>(), 1..8),
        1 => (0usize..3).prop_map(|k| vec![b'a'; [100, 5_000, 20_000][k]]),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Flip(at, b)),
        (any::<usize>(), token()).prop_map(|(at, t)| Edit::Insert(at, t)),
        (any::<usize>(), 1usize..30).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), 1usize..60).prop_map(|(at, n)| Edit::Duplicate(at, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edit: &Edit) -> Vec<u8> {
    let at = |i: usize, len: usize| i % (len + 1);
    match edit {
        Edit::Flip(i, b) if !bytes.is_empty() => {
            let i = i % bytes.len();
            bytes[i] = *b;
        }
        Edit::Insert(i, t) => {
            let i = at(*i, bytes.len());
            bytes.splice(i..i, t.iter().copied());
        }
        Edit::Delete(i, n) => {
            let i = at(*i, bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Edit::Duplicate(i, n) => {
            let i = at(*i, bytes.len());
            let end = (i + n).min(bytes.len());
            let copy = bytes[i..end].to_vec();
            bytes.splice(end..end, copy);
        }
        Edit::Truncate(i) => {
            let i = at(*i, bytes.len());
            bytes.truncate(i);
        }
        _ => {}
    }
    bytes
}

struct Fuzz {
    // Dropped in this order: the relay, then its runtime.
    relay: TestRelay,
    home: TestLabel,
    fuzz: TestLabel,
    runtime: tokio::runtime::Runtime,
}

impl Fuzz {
    fn start() -> Arc<Self> {
        logs::debug_logs();
        logs::count_panics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // `home` is the genuine hidden server; `fuzz` is the label the mutated requests name
        // (its own ID and secret, so that its valid tokens never spend the genuine one's).
        let home = TestLabel::new("home").with("maxParked: 1024");
        let fuzz = TestLabel::new("fuzz").with("maxParked: 1024");
        let relay = runtime.block_on(TestRelay::start_with(&[&home, &fuzz], |o| {
            o.timeouts.rendezvous = Duration::from_millis(300);
        }));
        Arc::new(Self {
            runtime,
            relay,
            home,
            fuzz,
        })
    }

    fn outcome(&self, bytes: &[u8], tls: bool) -> Outcome {
        self.runtime
            .block_on(send(self.relay.addr(), self.relay.ca(), bytes, tls))
    }

    /// The genuine server registers (new connection, steward's bytes), connects to p, and
    /// leaves again (so its label never fills).
    fn genuine_registers(&self) -> Result<(), TestCaseError> {
        self.runtime.block_on(async {
            let response = self.relay.put("home", &self.home.authorization()).await;
            prop_assert_eq!(response.status, 200, "{:?}", response);
            let p: SocketAddr = response.body_str().parse().unwrap();
            let parked = TcpStream::connect(p).await;
            prop_assert!(parked.is_ok(), "p {} not listening", p);
            Ok(())
        })
    }

    fn no_panics(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(logs::panics(), 0, "a panic in the process (see its output)");
        Ok(())
    }
}

#[test]
fn random_bytes_get_a_4xx_or_a_close_and_the_relay_keeps_serving() {
    let fuzz = Fuzz::start();
    let cases = e2e_cases();
    let case = std::sync::atomic::AtomicU32::new(0);
    let seen = Histogram::default();
    property::check(
        "http-head/random-bytes-tls",
        cases,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2_000),
            proptest::collection::vec(token(), 0..30).prop_map(|t| t.concat()),
        ],
        |bytes| {
            let outcome = fuzz.outcome(&bytes, true);
            seen.add(&outcome);
            prop_assert!(outcome.closed, "no close within patience: {:?}", outcome);
            for status in &outcome.statuses {
                prop_assert!((400..500).contains(status), "{:?} for {:?}", outcome, bytes);
            }
            if case
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(25)
            {
                fuzz.genuine_registers()?;
            }
            fuzz.no_panics()
        },
    );
    seen.show("http-head/random-bytes-tls");
    fuzz.genuine_registers().unwrap();
}

#[test]
fn mutated_registrations_get_documented_answers_and_the_relay_keeps_serving() {
    let fuzz = Fuzz::start();
    let cases = e2e_cases() * 2;
    let case = std::sync::atomic::AtomicU32::new(0);
    let seen = Histogram::default();
    let port = fuzz.relay.addr().port();
    property::check(
        "http-head/mutated-registration",
        cases,
        proptest::collection::vec(edit(), 1..4),
        |edits| {
            let valid = steward_request("fuzz", port, &fuzz.fuzz.authorization());
            let bytes = edits.iter().fold(valid.into_bytes(), apply);
            let outcome = fuzz.outcome(&bytes, true);
            seen.add(&outcome);
            prop_assert!(outcome.closed, "no close within patience: {:?}", outcome);
            for status in &outcome.statuses {
                prop_assert!(DOCUMENTED.contains(status), "{:?}", outcome);
            }
            if case
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(25)
            {
                fuzz.genuine_registers()?;
            }
            fuzz.no_panics()
        },
    );
    seen.show("http-head/mutated-registration");
    fuzz.genuine_registers().unwrap();
}

#[test]
fn raw_tcp_garbage_before_the_handshake_is_closed() {
    let fuzz = Fuzz::start();
    let cases = (e2e_cases() / 2).max(1);
    property::check(
        "http-head/raw-tcp",
        cases,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..3_000),
            // Plain HTTP to the TLS port, mutated.
            proptest::collection::vec(edit(), 0..4).prop_map(|edits| {
                edits.iter().fold(
                    steward_request("home", 1, "TOTP username=\"x\", response=\"000000\"")
                        .into_bytes(),
                    apply,
                )
            }),
            // A TLS record header announcing a huge record, then garbage.
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|tail| {
                let mut b = vec![0x16, 0x03, 0x01, 0xff, 0xff];
                b.extend(tail);
                b
            }),
        ],
        |bytes| {
            let outcome = fuzz.outcome(&bytes, false);
            prop_assert!(outcome.closed, "no close within patience: {:?}", outcome);
            prop_assert!(outcome.statuses.is_empty(), "{:?}", outcome);
            fuzz.no_panics()
        },
    );
    fuzz.genuine_registers().unwrap();
}
