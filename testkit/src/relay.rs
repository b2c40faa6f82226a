//! The relay under test, in-process: a real standalone relay (`serve`) on loopback with its
//! own labels directory, state directory and port block, and the requests a steward, an agent
//! and a mobile client send it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taas_relay::config::{PortRange, RedirectHost};
use taas_relay::run::pod::LabelRelayOptions;
use taas_relay::run::standalone::{self, ServeOptions, Standalone};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::{read_response, steward_request, Response};
use crate::label::{write_label, TestLabel};
use crate::logs::init_logs;
use crate::ports::port_block;
use crate::tls::tls_connect;
use crate::wait::eventually;

/// A label relay pod's options as the tests start it: `label` mounted under `dir`, `p_count`
/// p ports and q from a fresh port block, the control port on loopback (port from the OS),
/// [`REGISTRAR`], [`DOMAIN`], redirects to the requested host, `trusted` networks; the rest
/// as [`LabelRelayOptions::new`] has it.
pub fn label_relay_options(
    dir: &Path,
    label: &TestLabel,
    p_count: u16,
    trusted: &[&str],
) -> LabelRelayOptions {
    let (label_file, secret_dir) = crate::label::mount_label(dir, label);
    let (p_ports, q) = port_block(p_count);
    LabelRelayOptions {
        control: "127.0.0.1:0".parse().unwrap(),
        trusted: trusted.iter().map(|net| net.parse().unwrap()).collect(),
        registrar: REGISTRAR.into(),
        domain: DOMAIN.into(),
        redirect_host: RedirectHost::Requested,
        p_ports,
        client_port: q.lo,
        ..LabelRelayOptions::new(label_file, secret_dir)
    }
}

/// The registrar's host name in every test.
pub const REGISTRAR: &str = "taas-registrar.localhost";
/// Mobile clients ask for `LABEL.<DOMAIN>`.
pub const DOMAIN: &str = "taas.localhost";

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
        Self::start_with_result(labels, adjust)
            .await
            .expect("relay starts")
    }

    /// [`TestRelay::start_with`], returning the start's error instead of panicking on it.
    pub async fn start_with_result(
        labels: &[&TestLabel],
        adjust: impl FnOnce(&mut ServeOptions),
    ) -> Result<Self, taas_relay::run::StartError> {
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
        let standalone = standalone::start(options).await?;
        Ok(Self {
            standalone,
            dir,
            labels_dir,
            p_ports,
            q_ports,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.standalone.frontend
    }

    pub fn ca(&self) -> &Path {
        &self.standalone.cert.cert
    }

    /// The shared client port (the relay was started with `shared_port: Some(0)`).
    pub fn shared_port(&self) -> u16 {
        self.standalone
            .shared_port
            .expect("the relay has a shared port")
            .port()
    }

    /// The shared client port's address.
    pub fn shared_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.shared_port()))
    }

    /// A relay with the shared client port on (any free port).
    pub async fn start_shared(labels: &[&TestLabel]) -> Self {
        Self::start_with(labels, |options| options.shared_port = Some(0)).await
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
        crate::readings::scrape(self.standalone.metrics.unwrap()).await
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
