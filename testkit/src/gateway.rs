//! An in-process gateway as the cluster's edge (issues 15.3 and 16): its routes file, its
//! install secret, the shared client port and a rendezvous range of its own, every limit
//! high enough not to be what a test meets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use taas_relay::config::PortRange;
use taas_relay::gateway::UpstreamSettings;
use taas_relay::gateway_auth::{GatewayToken, InstallSecret};
use taas_relay::run::gateway::{self, GatewayOptions, RouteSource, RunningGateway};
use taas_relay::run::pod::LabelRelayOptions;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::{read_response, steward_request};
use crate::label::TestLabel;
use crate::logs::init_logs;
use crate::net::connect_from;
use crate::ports::port_block;
use crate::relay::{label_relay_options, DOMAIN, REGISTRAR};
use crate::tls::tls_connect_from;

/// The install secret the test gateways read.
pub const INSTALL_SECRET: &str = "0123456789abcdef0123456789abcdef\n";

/// LABEL's gateway token under [`INSTALL_SECRET`], as a label relay behind the gateway holds it.
pub fn gateway_token(label: &str) -> GatewayToken {
    InstallSecret::new(INSTALL_SECRET.as_bytes())
        .expect("the test install secret is valid")
        .token_for(label)
}

/// A gateway in edge mode, its routes file empty until the test writes it.
pub struct EdgeGateway {
    // Stopped before its directory goes (fields drop in order).
    pub gateway: RunningGateway,
    pub dir: tempfile::TempDir,
    /// The rendezvous range it listens on (8 ports).
    pub range: PortRange,
}

impl EdgeGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Started with the options `adjust` leaves.
    pub async fn start_with(adjust: impl FnOnce(&mut GatewayOptions)) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), "{}\n").unwrap();
        std::fs::write(dir.path().join("install-secret"), INSTALL_SECRET).unwrap();
        let (range, _) = port_block(8);
        let mut options = GatewayOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            state_dir: dir.path().join("state"),
            registrar: REGISTRAR.into(),
            domain: DOMAIN.into(),
            reload_interval: Duration::from_millis(50),
            max_connections: 1024,
            max_connections_per_source: 1024,
            install_secret_file: Some(dir.path().join("install-secret")),
            upstream: UpstreamSettings::default(),
            shared_port: Some("127.0.0.1:0".parse().unwrap()),
            rendezvous_ports: Some(range),
            ..GatewayOptions::new(RouteSource::File(dir.path().join("routes.yaml")))
        };
        adjust(&mut options);
        let gateway = gateway::start(options).await.expect("gateway starts");
        Self {
            gateway,
            dir,
            range,
        }
    }

    /// The routes file it reloads (every 50 ms).
    pub fn routes_file(&self) -> PathBuf {
        self.dir.path().join("routes.yaml")
    }

    /// The shared client port as bound.
    pub fn shared(&self) -> SocketAddr {
        self.gateway.shared_port.expect("shared port on")
    }

    /// Its metrics text.
    pub async fn metrics(&self) -> String {
        crate::readings::scrape(self.gateway.metrics.expect("metrics enabled")).await
    }

    /// The ports of its rendezvous range, in order.
    pub fn rendezvous_ports(&self) -> Vec<u16> {
        self.range.iter().collect()
    }

    /// A label relay's options as the operator writes them in edge mode, `label` mounted in
    /// this gateway's directory: its p ports mapped to the gateway's rendezvous ports `ts`
    /// and q to the shared port (host: the gateway's address), its gateway token, `trusted`
    /// networks. Its edge port and metrics are the caller's.
    pub fn label_relay_options(
        &self,
        label: &TestLabel,
        ts: &[u16],
        trusted: &[&str],
    ) -> LabelRelayOptions {
        let dir = self.dir.path();
        let options = label_relay_options(dir, label, ts.len() as u16, trusted);
        let (p_ports, q) = (options.p_ports, options.client_port);
        let external_file = dir.join(&label.label).join("external.yaml");
        let mut text = "host: \"127.0.0.1\"\nports:\n".to_string();
        for (p, t) in p_ports.iter().zip(ts) {
            text.push_str(&format!("  {p}: {t}\n"));
        }
        text.push_str(&format!("  {q}: {}\n", self.shared().port()));
        std::fs::write(&external_file, text).unwrap();
        LabelRelayOptions {
            external_file: Some(external_file),
            gateway_token: Some(gateway_token(&label.label)),
            reload_interval: Duration::from_millis(50),
            ..options
        }
    }

    /// Registers `label` through the gateway's HTTPS port from `source` and parks a
    /// connection from the same source on the answered address: one of the gateway's
    /// rendezvous ports (the relay's own answer header stripped).
    pub async fn park_from(&self, source: &str, label: &TestLabel) -> TcpStream {
        let gateway = &self.gateway;
        let mut tls =
            tls_connect_from(source, gateway.frontend, &gateway.cert.cert, REGISTRAR).await;
        let request = steward_request(
            &label.label,
            gateway.frontend.port(),
            &label.authorization(),
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut tls).await;
        assert_eq!(response.status, 200, "{response:?}");
        assert!(
            response.header("taas-parked").is_none(),
            "stripped: {response:?}"
        );
        let answered: SocketAddr = response.body_str().trim().parse().unwrap();
        assert!(
            self.range.contains(answered.port()),
            "a gateway rendezvous port: {answered}"
        );
        connect_from(source, answered).await
    }
}
