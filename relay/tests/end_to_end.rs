//! The whole path with real programs: `taas-agent` in front of a TLS server, the relay, and
//! curl as the mobile client following the 307; the relay killed and restarted under the
//! agent; the agent's reasons when it cannot register.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use taas_relay::agent::{Agent, AgentConfig, AgentStatus, Trust};
use taas_testkit::prelude::*;
use tokio::sync::watch;

/// An in-process agent for `label`, forwarding to `forward`.
struct RunningAgent {
    status: watch::Receiver<AgentStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningAgent {
    fn start(
        front: SocketAddr,
        ca: &Path,
        label: &TestLabel,
        forward: SocketAddr,
        parked: usize,
    ) -> Self {
        Self::start_with(front, label, forward, |config| {
            config.trust = Trust::PemFile(ca.to_path_buf());
            config.parked = parked;
        })
    }

    fn start_with(
        front: SocketAddr,
        label: &TestLabel,
        forward: SocketAddr,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let mut config = agent_config(front, label, forward);
        adjust(&mut config);
        let agent = Agent::new(config).expect("agent configuration");
        let status = agent.status();
        let task = tokio::spawn(async move {
            agent.run(std::future::pending()).await.expect("agent runs");
        });
        Self { status, task }
    }

    async fn wait(&self, what: &str, check: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let mut status = self.status.clone();
        let found = tokio::time::timeout(PATIENCE * 2, status.wait_for(|s| check(s)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "agent: timed out waiting for {what}: {:?}",
                    *self.status.borrow()
                )
            })
            .expect("agent alive")
            .clone();
        found
    }
}

/// A CA bundle trusting both the relay's certificate and the hidden server's own.
fn bundle(dir: &Path, relay_ca: &Path, page: &TlsPage) -> PathBuf {
    let mut pem = std::fs::read_to_string(relay_ca).unwrap();
    pem.push_str(&page.cert_pem);
    let path = dir.join("bundle.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// `curl -L` as the mobile client; returns stdout, or panics with curl's stderr.
async fn curl(url: String, cacert: PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "-L", "--max-time", "10", "--cacert"])
            .arg(&cacert)
            .arg(&url)
            .output()
            .expect("curl is installed (scripts/install-test-deps.sh)");
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_follows_the_307_and_gets_the_hidden_servers_page_over_end_to_end_tls() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let page = TlsPage::start(&format!("home.{DOMAIN}"), "hello from the hidden server").await;
    let agent = RunningAgent::start(relay.addr(), relay.ca(), &home, page.addr, 3);
    agent.wait("3 parked", |s| s.parked == 3).await;
    relay.wait_parked("home", 3).await;

    let cacert = bundle(relay.dir.path(), relay.ca(), &page);
    let url = format!(
        "https://home.{DOMAIN}:{}/path/index.html?q=1",
        relay.addr().port()
    );
    let body = curl(url.clone(), cacert.clone()).await;
    assert!(body.contains("hello from the hidden server"), "{body}");
    assert!(
        body.contains("request: GET /path/index.html?q=1 HTTP/1.1"),
        "{body}"
    );

    // The relay trusts nothing of the page's: with the relay's certificate alone, curl cannot
    // verify the hidden server, which proves TLS was not terminated by the relay.
    let relay_only = relay.ca().to_path_buf();
    let failed = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "-L", "--max-time", "10", "--cacert"])
            .arg(&relay_only)
            .arg(&url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        !failed.status.success(),
        "the hidden server's certificate is not the relay's"
    );

    // The agent replaced every paired connection by itself.
    agent
        .wait("parked again", |s| s.parked == 3 && s.pairings >= 2)
        .await;
    relay.wait_parked("home", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_through_the_agent_to_an_echo_service() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let (echo, _echo_task) = echo_server().await;
    let agent = RunningAgent::start(relay.addr(), relay.ca(), &home, echo, 8);
    agent.wait("8 parked", |s| s.parked == 8).await;
    let q = relay.q("home");
    let clients: Vec<_> = (0..50u32)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", q))
                    .await
                    .unwrap();
                let data: Vec<u8> = (0..20_000u32).map(|b| (b * 31 + i) as u8).collect();
                echo_roundtrip(&mut stream, &data).await;
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    agent
        .wait("refilled", |s| s.parked == 8 && s.pairings == 50)
        .await;
}

/// Bulk both ways through the relay and the agent, with both on each mode: every byte
/// arrives, and the relay's splice(2) counter says which path moved them (copy: none;
/// kernel: all; auto: all but the first 64 KiB or so of each direction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_through_the_relay_and_the_agent_is_intact_on_every_splice_mode() {
    use taas_relay::splice::{SpliceMode, KERNEL_THRESHOLD};
    const CLIENTS: u32 = 4;
    const BYTES: u32 = 3_000_017;
    for mode in [SpliceMode::Copy, SpliceMode::Auto, SpliceMode::Kernel] {
        let home = TestLabel::new("home");
        let relay = TestRelay::start_with(&[&home], |o| o.splice = mode).await;
        let (echo, _echo_task) = echo_server().await;
        let agent = RunningAgent::start_with(relay.addr(), &home, echo, |config| {
            config.trust = Trust::PemFile(relay.ca().to_path_buf());
            config.parked = CLIENTS as usize;
            config.splice = mode;
        });
        agent.wait("parked", |s| s.parked == CLIENTS as usize).await;
        let q = relay.q("home");
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                tokio::spawn(async move {
                    let data: Vec<u8> = (0..BYTES).map(|b| (b * 31 + i) as u8).collect();
                    let back =
                        taas_testkit::echo::echo_whole(([127, 0, 0, 1], q).into(), &data).await;
                    assert_eq!(back.len(), data.len());
                    assert!(back == data, "client {i}: bytes differ");
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        agent
            .wait("pairs done", |s| s.pairings == CLIENTS as u64)
            .await;
        let total = f64::from(CLIENTS) * 2.0 * f64::from(BYTES);
        eventually("the pairs end", || async {
            let text = relay.metrics().await;
            metric(&text, "taas_bytes_total{label=\"home\",kind=\"to_client\"}")
                >= f64::from(CLIENTS * BYTES)
        })
        .await;
        let spliced = metric(&relay.metrics().await, "taas_spliced_bytes_total");
        match mode {
            SpliceMode::Copy => assert_eq!(spliced, 0.0),
            SpliceMode::Kernel => assert_eq!(spliced, total),
            SpliceMode::Auto => {
                let copied_at_most =
                    f64::from(CLIENTS) * 2.0 * (KERNEL_THRESHOLD as f64 + 65_536.0);
                assert!(
                    spliced < total && spliced > total - copied_at_most,
                    "{spliced} of {total}"
                );
            }
        }
        eprintln!("figure: {mode:?}: {spliced} of {total} bytes spliced by the relay");
    }
}

#[tokio::test]
async fn the_agent_says_why_it_cannot_register() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let (echo, _echo_task) = echo_server().await;

    // Wrong secret.
    let mut wrong = home.clone();
    wrong.secret_b32 = TestLabel::new("x").secret_b32;
    let agent = RunningAgent::start(relay.addr(), relay.ca(), &wrong, echo, 2);
    let status = agent.wait("a problem", |s| s.problem.is_some()).await;
    let problem = status.problem.unwrap();
    assert!(problem.contains("wrong secret"), "{problem}");
    assert_eq!(relay.parked("home"), 0);
    drop(agent);

    // A relay certificate it does not trust.
    let other = TlsPage::start("elsewhere.example", "x").await;
    let other_ca = relay.dir.path().join("other.pem");
    std::fs::write(&other_ca, &other.cert_pem).unwrap();
    let agent = RunningAgent::start(relay.addr(), &other_ca, &home, echo, 2);
    let problem = agent
        .wait("a problem", |s| s.problem.is_some())
        .await
        .problem
        .unwrap();
    assert!(problem.contains("--ca"), "{problem}");
    drop(agent);

    // A label the relay does not know.
    let unknown = TestLabel::new("unknown");
    let agent = RunningAgent::start(relay.addr(), relay.ca(), &unknown, echo, 2);
    let problem = agent
        .wait("a problem", |s| s.problem.is_some())
        .await
        .problem
        .unwrap();
    assert!(problem.contains("not provisioned"), "{problem}");
}

/// A free loopback port (closed again; the relay binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_relay(dir: &Path, port: u16, p: &str, q: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_taas-relay"))
        .current_dir(dir)
        .args(["serve", "--metrics", "off", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--p-ports", p, "--q-ports", q])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_relay_the_agent_registers_again_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let home = TestLabel::new("home");
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    write_label(&dir.path().join("labels"), &home);
    let (p, q) = port_block(40);
    let (p, q) = (p.to_string(), q.to_string());
    let port = free_port();
    let front: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut relay = spawn_relay(dir.path(), port, &p, &q);
    let ca = dir.path().join(".taas/relay-cert.pem");
    eventually("relay up", || async {
        ca.exists() && tokio::net::TcpStream::connect(front).await.is_ok()
    })
    .await;

    let page = TlsPage::start(&format!("home.{DOMAIN}"), "still here").await;
    let agent = RunningAgent::start(front, &ca, &home, page.addr, 2);
    agent.wait("parked", |s| s.parked == 2).await;
    let cacert = bundle(dir.path(), &ca, &page);
    let url = format!("https://home.{DOMAIN}:{port}/");
    assert!(curl(url.clone(), cacert.clone())
        .await
        .contains("still here"));

    // kill -9: the agent's parked connections die with the relay.
    relay.kill().unwrap();
    relay.wait().unwrap();
    agent.wait("parked lost", |s| s.parked == 0).await;

    let mut relay = spawn_relay(dir.path(), port, &p, &q);
    agent.wait("parked again", |s| s.parked == 2).await;
    let body = curl(url, cacert).await;
    assert!(body.contains("still here"), "{body}");
    relay.kill().unwrap();
    relay.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_a_redirect_of_its_registration() {
    let home = TestLabel::new("home");
    let relay = TestRelay::start(&[&home]).await;
    let (echo, _echo_task) = echo_server().await;
    // A registrar that moved: it answers every request with a 307 to the relay (by IP, which
    // the relay's certificate covers).
    let moved = Redirector::start(format!("https://127.0.0.1:{}", relay.addr().port())).await;
    let mut trust = std::fs::read_to_string(relay.ca()).unwrap();
    trust.push_str(&moved.page_cert);
    let trust_file = relay.dir.path().join("trust.pem");
    std::fs::write(&trust_file, trust).unwrap();
    let agent = RunningAgent::start_with(moved.addr, &home, echo, |config| {
        config.relay = format!("https://old-registrar.localhost:{}", moved.addr.port());
        config.connect = None;
        config.trust = Trust::PemFile(trust_file.clone());
        config.parked = 2;
    });
    agent
        .wait("parked via the redirect", |s| s.parked == 2)
        .await;
    relay.wait_parked("home", 2).await;
}

/// A TLS server answering every request with `307 Location: <target><path>`.
struct Redirector {
    addr: SocketAddr,
    page_cert: String,
    _task: tokio::task::JoinHandle<()>,
}

impl Redirector {
    async fn start(target: String) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (acceptor, cert) = tls_acceptor("old-registrar.localhost");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, target) = (acceptor.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..end]).to_string();
                            seen.drain(..end + 4);
                            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                            let answer = format!(
                                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}{path}\r\nContent-Length: 0\r\n\r\n"
                            );
                            if tls.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        Self {
            addr,
            page_cert: cert,
            _task: task,
        }
    }
}
