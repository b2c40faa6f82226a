//! TLS on both sides of the relay: the client that trusts the relay's certificate (as the
//! agent and curl do), and a hidden server's own TLS, which the relay never terminates.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_over(TcpStream::connect(addr).await.unwrap(), ca, server_name).await
}

/// [`tls_connect`] from the loopback address `source`.
pub async fn tls_connect_from(
    source: &str,
    addr: SocketAddr,
    ca: &Path,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_over(
        crate::net::connect_from(source, addr).await,
        ca,
        server_name,
    )
    .await
}

async fn tls_over(
    tcp: TcpStream,
    ca: &Path,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config =
        taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca.to_path_buf()))
            .unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    connector.connect(name, tcp).await.unwrap()
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
    body: &'static str,
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
            body,
            task,
        }
    }

    /// Fetches `https://<host>:<port>/index.html?q=1` with curl trusting only this page's own
    /// certificate (written under `dir`), and asserts this page answered it (200, no redirect).
    pub async fn assert_served_directly(&self, host: &str, port: u16, dir: &Path) {
        let cacert = dir.join("hidden.pem");
        std::fs::write(&cacert, &self.cert_pem).unwrap();
        // *.localhost resolves to loopback in curl: no --resolve needed.
        let url = format!("https://{host}:{port}/index.html?q=1");
        let body = crate::http::curl(
            &url,
            &cacert,
            &[],
            "\nstatus: %{http_code} redirects: %{num_redirects}",
        )
        .await;
        assert!(body.contains(self.body), "{body}");
        assert!(
            body.contains("request: GET /index.html?q=1 HTTP/1.1"),
            "{body}"
        );
        assert!(body.contains("status: 200 redirects: 0"), "{body}");
    }
}

/// A TLS client trusting only `cert_pem` (a hidden server's own certificate, which the relay
/// never had), naming `server_name` in its ClientHello (SNI); the handshake's error if it
/// fails.
pub async fn tls_connect_trusting(
    addr: SocketAddr,
    cert_pem: &str,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert_pem)?;
    let config = taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(ca))
        .map_err(std::io::Error::other)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

/// The first bytes a real TLS client (rustls) sends: its ClientHello, naming `server_name`
/// (`None`: an IP literal, so no server name), as raw bytes to send by hand.
pub fn client_hello(server_name: Option<&str>) -> Vec<u8> {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = match server_name {
        Some(name) => rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
        None => {
            rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
        }
    };
    let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    hello
}

/// The hidden server's side of one pairing: TLS with its own certificate for `host` on the
/// parked connection (a certificate the relay never had), then one answer: `who` followed by
/// what the client sent. Returns that certificate (PEM) and the task.
pub fn hidden_tls_server(
    parked: TcpStream,
    host: &str,
    who: &'static str,
) -> (String, tokio::task::JoinHandle<()>) {
    let (acceptor, cert_pem) = tls_acceptor(host);
    let task = tokio::spawn(async move {
        let mut tls = acceptor
            .accept(parked)
            .await
            .expect("the client's handshake");
        let mut buf = [0u8; 256];
        let n = tls.read(&mut buf).await.unwrap();
        let mut answer = who.as_bytes().to_vec();
        answer.extend_from_slice(&buf[..n]);
        tls.write_all(&answer).await.unwrap();
        let _ = tls.shutdown().await;
    });
    (cert_pem, task)
}

/// A client at `addr` for server name `name`, TLS trusting only `cert_pem` (a hidden server's
/// own certificate): says `hello` and returns the whole answer.
pub async fn hello_over_tls(addr: std::net::SocketAddr, cert_pem: &str, name: &str) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut tls = tokio::time::timeout(
        crate::wait::PATIENCE,
        tls_connect_trusting(addr, cert_pem, name),
    )
    .await
    .expect("handshake within patience")
    .expect("TLS with the hidden server's own certificate");
    tls.write_all(b"hello").await.unwrap();
    String::from_utf8(crate::wait::read_to_end(&mut tls).await).unwrap()
}

/// Sends a ClientHello for `server_name` to `addr` in three pieces, then checks it is relayed
/// unchanged both ways ([`assert_relayed_both_ways`]): the relay keeps every byte it read to
/// route the connection.
pub async fn assert_client_hello_passes_unchanged(
    addr: std::net::SocketAddr,
    server_name: &str,
    parked: &mut TcpStream,
) {
    let hello = client_hello(Some(server_name));
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (a, rest) = hello.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    for piece in [a, b, c] {
        client.write_all(piece).await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_relayed_both_ways(&mut client, parked, &hello, crate::wait::PATIENCE).await;
}

/// After the caller wrote `hello` into `client` (however it likes: whole, in pieces, behind
/// a header), sends more bytes and asserts the far end `parked` gets the hello and those
/// bytes unchanged, then that bytes flow back; each read bounded by `patience`.
pub async fn assert_relayed_both_ways(
    client: &mut TcpStream,
    parked: &mut TcpStream,
    hello: &[u8],
    patience: std::time::Duration,
) {
    client.write_all(b"and after it").await.unwrap();
    let mut seen = vec![0u8; hello.len() + b"and after it".len()];
    tokio::time::timeout(patience, parked.read_exact(&mut seen))
        .await
        .expect("the hidden server gets the bytes")
        .unwrap();
    assert_eq!(&seen[..hello.len()], hello, "the ClientHello unchanged");
    assert_eq!(&seen[hello.len()..], b"and after it");
    parked.write_all(b"server bytes").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(patience, client.read_exact(&mut back))
        .await
        .expect("the client gets the hidden server's bytes")
        .unwrap();
    assert_eq!(&back, b"server bytes");
}
