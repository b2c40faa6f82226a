//! A spawned `taas-relay serve`: the relay as a separate process, for what an in-process
//! relay cannot show (its fds and RSS, `kill -9`, a `ulimit`, its log file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{read_response, Response};
use crate::ports::{free_port, own_ports};
use crate::readings::{try_scrape, ProcStats};
use crate::relay::{DOMAIN, REGISTRAR};
use crate::tls::tls_connect;
use crate::wait::{eventually_within, PATIENCE};

/// A `taas-relay serve` child process on loopback, its stderr in a file. Killed on drop.
pub struct SpawnedRelay {
    pub child: Child,
    pub dir: PathBuf,
    pub front: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub p_ports: taas_relay::config::PortRange,
    pub q_ports: taas_relay::config::PortRange,
    pub log: PathBuf,
}

/// How to start a [`SpawnedRelay`].
#[derive(Clone, Debug)]
pub struct RelaySpec {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub front_port: u16,
    pub p_ports: taas_relay::config::PortRange,
    pub q_ports: taas_relay::config::PortRange,
    pub rust_log: String,
    pub extra_args: Vec<String>,
    pub metrics: bool,
    /// Shell `ulimit` commands run before `exec` (e.g. `ulimit -n 64`), or empty.
    pub ulimit: String,
}

impl RelaySpec {
    pub fn new(bin: impl Into<PathBuf>, dir: &Path, len: u16) -> Self {
        let (p_ports, q_ports) = own_ports(len);
        Self {
            bin: bin.into(),
            dir: dir.to_path_buf(),
            front_port: free_port(),
            p_ports,
            q_ports,
            rust_log: "info".into(),
            extra_args: Vec::new(),
            metrics: true,
            ulimit: String::new(),
        }
    }
}

impl SpawnedRelay {
    /// Starts the relay and waits (bounded) until its front end accepts connections.
    pub async fn start(spec: &RelaySpec) -> Self {
        std::fs::create_dir_all(spec.dir.join("labels")).unwrap();
        let log = spec.dir.join(format!("relay-{}.log", spec.front_port));
        let metrics = spec
            .metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", spec.front_port),
            "--p-ports".into(),
            spec.p_ports.to_string(),
            "--q-ports".into(),
            spec.q_ports.to_string(),
            "--labels".into(),
            spec.dir.join("labels").display().to_string(),
            "--state-dir".into(),
            spec.dir.join("state").display().to_string(),
            "--metrics".into(),
            metrics.map_or("off".to_string(), |m| m.to_string()),
            "--reload-interval".into(),
            "0.2".into(),
        ];
        args.extend(spec.extra_args.iter().cloned());
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = if spec.ulimit.is_empty() {
            let mut c = Command::new(&spec.bin);
            c.args(&args);
            c
        } else {
            // `exec` keeps the pid: /proc/<pid> is the relay's.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{}; exec \"$0\" \"$@\"", spec.ulimit))
                .arg(&spec.bin)
                .args(&args);
            c
        };
        let child = command
            .current_dir(&spec.dir)
            .env("RUST_LOG", &spec.rust_log)
            .env_remove("TAAS_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn taas-relay");
        let relay = Self {
            child,
            dir: spec.dir.clone(),
            front: SocketAddr::from(([127, 0, 0, 1], spec.front_port)),
            metrics,
            p_ports: spec.p_ports,
            q_ports: spec.q_ports,
            log,
        };
        relay.wait_up().await;
        relay
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("state/relay-cert.pem")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the front end accepts TCP and the certificate exists.
    pub async fn wait_up(&self) {
        eventually_within(
            "the relay to come up",
            PATIENCE * 3,
            || async { self.ca().exists() && TcpStream::connect(self.front).await.is_ok() },
            || format!("its log:\n{}", self.log_text()),
        )
        .await;
    }

    pub fn stats(&self) -> ProcStats {
        ProcStats::read(self.pid()).expect("relay process alive")
    }

    /// `kill -9`, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One request on a new TLS connection to the front end.
    pub async fn request(&self, raw: &str) -> Response {
        let mut tls = tls_connect(self.front, &self.ca(), REGISTRAR).await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut tls).await
    }

    /// The status of one request on a new TLS connection (`Connection: close` expected), or
    /// `None` if the connection, the handshake or the answer failed (all bounded).
    pub async fn try_request(&self, raw: &str) -> Option<u16> {
        let attempt = async {
            let tcp = TcpStream::connect(self.front).await.ok()?;
            let config =
                taas_relay::agent::client_tls_config(&taas_relay::agent::Trust::PemFile(self.ca()))
                    .ok()?;
            let name = rustls_pki_types::ServerName::try_from(REGISTRAR.to_string()).ok()?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .ok()?;
            tls.write_all(raw.as_bytes()).await.ok()?;
            let mut got = Vec::new();
            let _ = tls.read_to_end(&mut got).await;
            let text = String::from_utf8_lossy(&got);
            text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
    }

    /// The label's client port q from a 307 (bounded wait until one is parked).
    pub async fn q(&self, label: &str) -> u16 {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let response = self
                .request(&format!(
                    "GET / HTTP/1.1\r\nHost: {label}.{DOMAIN}\r\nConnection: close\r\n\r\n"
                ))
                .await;
            if response.status == 307 {
                return response.location_port();
            }
            assert!(
                Instant::now() < deadline,
                "no 307 for {label}: {response:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The relay's metrics text.
    pub async fn metrics_text(&self) -> String {
        match self.metrics {
            Some(addr) => try_scrape(addr).await,
            None => String::new(),
        }
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        self.kill();
    }
}
