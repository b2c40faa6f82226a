//! Test harness: a real standalone relay on loopback (in-process), real TLS clients speaking
//! the registrar protocol byte for byte, and plain TCP peers for p and q.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use taas_relay::config::{Algorithm, PortRange};
use taas_relay::run::standalone::{self, ServeOptions, Standalone};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const REGISTRAR: &str = "taas-registrar.localhost";
pub const DOMAIN: &str = "taas.localhost";
/// Every wait on a condition in these tests is bounded by this.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Port blocks below Linux's ephemeral range, distinct per relay started by this process
/// and spread across processes, so concurrently running tests rarely meet (and a port found
/// taken is simply skipped by the relay).
pub fn port_block(len: u16) -> (PortRange, PortRange) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let blocks = 9_000 / (2 * len);
    let index = (std::process::id() as u16)
        .wrapping_mul(7)
        .wrapping_add(slot)
        % blocks;
    let base = 22_000 + index * 2 * len;
    (
        PortRange::new(base, base + len - 1).unwrap(),
        PortRange::new(base + len, base + 2 * len - 1).unwrap(),
    )
}

/// A label as the tests provision it.
#[derive(Clone, Debug)]
pub struct TestLabel {
    pub label: String,
    pub id: String,
    pub secret_b32: String,
    /// Extra spec lines, e.g. `proxyProtocol: v1`.
    pub spec_extra: String,
}

impl TestLabel {
    pub fn new(label: &str) -> Self {
        let secret = taas_relay::provision::generate_secret();
        Self {
            label: label.into(),
            id: format!("id-of-{label}"),
            secret_b32: taas_relay::totp::encode_secret(&secret),
            spec_extra: String::new(),
        }
    }

    pub fn with(mut self, spec_line: &str) -> Self {
        self.spec_extra.push_str(&format!("  {spec_line}\n"));
        self
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }

    pub fn secret(&self) -> Vec<u8> {
        taas_relay::totp::decode_secret(&self.secret_b32).unwrap()
    }

    /// The current 6-digit token.
    pub fn token(&self) -> String {
        self.token_at(unix_now())
    }

    pub fn token_at(&self, unix: u64) -> String {
        taas_relay::totp::code(&self.secret(), Algorithm::SHA1, 6, 30, unix)
    }

    pub fn manifest(&self) -> String {
        let secret_name = format!("{}-totp", self.label.replace('.', "-"));
        format!(
            "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata:\n  name: {name}\n\
             spec:\n  id: \"{id}\"\n  label: {label}\n  secretRef: {{name: {secret_name}, key: secret}}\n{extra}\
             ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret_name}\nstringData:\n  secret: {secret}\n",
            name = self.label.replace('.', "-"),
            id = self.id,
            label = self.label,
            extra = self.spec_extra,
            secret = self.secret_b32,
        )
    }

    /// The header the steward sends.
    pub fn authorization(&self) -> String {
        format!(
            "TOTP username=\"{}\", response=\"{}\"",
            self.id,
            self.token()
        )
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn write_label(dir: &Path, label: &TestLabel) {
    std::fs::write(dir.join(format!("{}.yaml", label.label)), label.manifest()).unwrap();
}

/// Writes a label's manifest and secret as the operator mounts them in a relay pod (under
/// `dir/LABEL/`); returns the manifest's path and the secret directory.
pub fn mount_label(dir: &Path, label: &TestLabel) -> (PathBuf, PathBuf) {
    let base = dir.join(&label.label);
    std::fs::create_dir_all(base.join("secret")).unwrap();
    std::fs::write(base.join("label.yaml"), label.manifest()).unwrap();
    std::fs::write(
        base.join("secret/secret"),
        format!("{}\n", label.secret_b32),
    )
    .unwrap();
    (base.join("label.yaml"), base.join("secret"))
}

pub struct TestRelay {
    pub standalone: Standalone,
    pub dir: tempfile::TempDir,
    pub labels_dir: PathBuf,
    pub p_ports: PortRange,
    pub q_ports: PortRange,
}

impl TestRelay {
    pub async fn start(labels: &[&TestLabel]) -> Self {
        Self::start_with(labels, |_| {}).await
    }

    pub async fn start_with(labels: &[&TestLabel], adjust: impl FnOnce(&mut ServeOptions)) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let labels_dir = dir.path().join("labels");
        std::fs::create_dir_all(&labels_dir).unwrap();
        for label in labels {
            write_label(&labels_dir, label);
        }
        let (p_ports, q_ports) = port_block(40);
        let mut options = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            labels: labels_dir.clone(),
            state_dir: dir.path().join("state"),
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            p_ports,
            q_ports,
            reload_interval: Duration::from_millis(100),
            ..ServeOptions::default()
        };
        adjust(&mut options);
        let standalone = standalone::start(options).await.expect("relay starts");
        Self {
            standalone,
            dir,
            labels_dir,
            p_ports,
            q_ports,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.standalone.frontend
    }

    pub fn ca(&self) -> &Path {
        &self.standalone.cert.cert
    }

    /// The label's client port q.
    pub fn q(&self, label: &str) -> u16 {
        self.standalone
            .relay
            .label(label)
            .and_then(|l| l.client_port())
            .expect("label has a client port")
    }

    pub fn parked(&self, label: &str) -> usize {
        self.standalone
            .relay
            .label(label)
            .map(|l| l.parked())
            .unwrap_or(0)
    }

    pub async fn wait_parked(&self, label: &str, n: usize) {
        eventually(&format!("{n} parked on {label}"), || async {
            self.parked(label) == n
        })
        .await;
    }

    /// A new TLS connection to the front end (SNI: the registrar).
    pub async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        tls_connect(self.addr(), self.ca(), REGISTRAR).await
    }

    /// Sends `raw` on a new TLS connection and reads one response.
    pub async fn raw(&self, raw: &str) -> Response {
        let mut tls = self.tls().await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    }

    /// The steward's exact registration request for `label` with `authorization`.
    pub async fn put(&self, label: &str, authorization: &str) -> Response {
        self.raw(&steward_request(label, self.addr().port(), authorization))
            .await
    }

    /// A kept-alive TLS connection for several requests.
    pub async fn session(&self) -> Session {
        Session {
            tls: self.tls().await,
        }
    }

    /// Registers `label` as the steward does and returns the rendezvous address.
    pub async fn register(&self, label: &TestLabel) -> SocketAddr {
        let response = self.put(&label.label, &label.authorization()).await;
        assert_eq!(response.status, 200, "registration: {response:?}");
        response.body_str().parse().expect("HOST:PORT body")
    }

    /// Registers and connects to p: a parked connection, once the relay has accepted it.
    pub async fn park(&self, label: &TestLabel) -> TcpStream {
        let before = self.parked(&label.label);
        let p = self.register(label).await;
        let stream = TcpStream::connect(p).await.unwrap();
        self.wait_parked(&label.label, before + 1).await;
        stream
    }

    /// Registers and connects to p, without waiting to see it parked (a client may be
    /// waiting for it already).
    pub async fn park_direct(&self, label: &TestLabel) -> TcpStream {
        let p = self.register(label).await;
        TcpStream::connect(p).await.unwrap()
    }

    /// A mobile client connected to q (no 307 asked for).
    pub async fn client(&self, label: &str) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.q(label)))
            .await
            .unwrap()
    }

    /// A GET for `LABEL.<domain>` on the front end.
    pub async fn mobile_get(&self, label: &str, path: &str) -> Response {
        self.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: {label}.{DOMAIN}:{}\r\nConnection: close\r\n\r\n",
            self.addr().port()
        ))
        .await
    }

    pub async fn metrics(&self) -> String {
        let addr = self.standalone.metrics.unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }
}

/// One kept-alive front-end connection.
pub struct Session {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
}

impl Session {
    pub async fn put(&mut self, label: &str, authorization: &str) -> Response {
        let request = format!(
            "PUT /register/{label} HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {authorization}\r\n\r\n"
        );
        self.tls.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut self.tls).await
    }
}

/// The registration exactly as the steward sends it: Host with the port, the header format
/// of ORIGINAL.md §1.5.
pub fn steward_request(label: &str, port: u16, authorization: &str) -> String {
    format!(
        "PUT /register/{label} HTTP/1.1\r\nHost: {REGISTRAR}:{port}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    )
}

pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config =
        taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca.to_path_buf()))
            .unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Reads one HTTP/1.1 response (head, then a Content-Length body).
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("response within patience")
            .unwrap();
        assert!(
            n == 1,
            "connection closed inside the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.unwrap();
    Response {
        status,
        headers,
        body,
    }
}

/// Waits (bounded) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `data` and reads back exactly as many bytes, checking them.
pub async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
        .await
        .expect("echo within patience")
        .unwrap();
    assert_eq!(back, data);
}

/// Reads until EOF (bounded).
pub async fn read_to_end<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("EOF within patience")
        .unwrap();
    out
}

/// Asserts (bounded) that the peer closed the connection without sending anything: an EOF,
/// or a reset when our own unread bytes were still in its buffer.
pub async fn assert_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

pub fn init_logs() {
    taas_process::init(taas_process::LogFormat::Text);
}

/// A TLS acceptor with a fresh self-signed certificate for `host` (not the relay's), and
/// that certificate's PEM for clients to trust.
pub fn tls_acceptor(host: &str) -> (tokio_rustls::TlsAcceptor, String) {
    let names = taas_relay::tls::CertNames {
        registrar: host.to_string(),
        domain: format!("page.{host}"),
        ips: vec![],
    };
    let (cert_pem, key_pem) = taas_relay::tls::generate(&names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = taas_relay::tls::CertFiles {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
    };
    std::fs::write(&files.cert, &cert_pem).unwrap();
    std::fs::write(&files.key, &key_pem).unwrap();
    let config = taas_relay::tls::server_config(&files).unwrap();
    (tokio_rustls::TlsAcceptor::from(config), cert_pem)
}

/// A TLS server with its own certificate (not the relay's), answering every connection with
/// a fixed HTTP page: the hidden server behind an agent.
pub struct TlsPage {
    pub addr: SocketAddr,
    pub cert_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsPage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsPage {
    pub async fn start(host: &str, body: &'static str) -> Self {
        let (acceptor, cert_pem) = tls_acceptor(host);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request_line = String::from_utf8_lossy(&seen)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let page = format!("{body}\nrequest: {request_line}\n");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            addr,
            cert_pem,
            task,
        }
    }
}

/// An agent configuration for `label` at the relay front end `front`, forwarding to
/// `forward`, with the short backoff tests want. Callers set trust and the parked count.
pub fn agent_config(
    front: SocketAddr,
    label: &TestLabel,
    forward: SocketAddr,
) -> taas_relay::agent::AgentConfig {
    let mut config = taas_relay::agent::AgentConfig::new(
        format!("https://{REGISTRAR}:{}", front.port()),
        label.id.clone(),
        label.label.clone(),
        label.secret(),
        forward.to_string(),
    );
    config.connect = Some(front.to_string());
    config.max_backoff = Duration::from_millis(500);
    config
}

/// An echo server on loopback (a forwarded local service).
pub async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
