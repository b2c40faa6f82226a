//! What a running relay needs to know: its own settings and each label's configuration.
//!
//! Both are plain data, built by the binaries (flags) and by `label_source` (manifests);
//! nothing here does I/O.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

pub use taas_crds::{Algorithm, ClientAdmission, ProxyProtocol};
pub use taas_protocol::answer::RedirectHost;

/// One label as the relay serves it: the `TaasLabel` spec with its secret resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct LabelConfig {
    /// LABEL, lower case: `LABEL.<domain>` and `/register/LABEL`.
    pub label: String,
    /// The hidden server's ID (the TOTP `username`), compared exactly.
    pub id: String,
    /// The decoded TOTP key (base32-decoded bytes of the Secret's value).
    pub secret: Vec<u8>,
    pub algorithm: Algorithm,
    /// TOTP step in seconds.
    pub period: u64,
    /// Parked connections allowed at once; a registration beyond it gets 503.
    pub max_parked: usize,
    /// p accepts only the address that registered.
    pub source_pinning: bool,
    pub proxy_protocol: ProxyProtocol,
    /// q pinned to this port (a raw TCP forward that stays put); otherwise allocated.
    pub client_port: Option<u16>,
    /// Who may connect to q: anyone, or only sources that got a 307 for this label lately.
    pub client_admission: ClientAdmission,
    /// The label's protocol has the server speak first (SSH, SMTP): q pairs a client at
    /// accept instead of waiting for its first byte. Needs a PROXY header (`proxy_protocol`):
    /// it is what tells the hidden server's agent that it was paired.
    pub server_speaks_first: bool,
    /// `LABEL.<domain>` on the front end's HTTPS port is spliced to the hidden server, TLS
    /// end to end (no 307): the front end reads the ClientHello's server name first.
    pub direct: bool,
}

impl fmt::Debug for LabelConfig {
    // Hand-written so that the secret can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LabelConfig")
            .field("label", &self.label)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("period", &self.period)
            .field("max_parked", &self.max_parked)
            .field("source_pinning", &self.source_pinning)
            .field("proxy_protocol", &self.proxy_protocol)
            .field("client_port", &self.client_port)
            .field("client_admission", &self.client_admission)
            .field("server_speaks_first", &self.server_speaks_first)
            .field("direct", &self.direct)
            .finish()
    }
}

/// An inclusive range of TCP ports, written `LO-HI` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn new(lo: u16, hi: u16) -> Result<Self, String> {
        if lo == 0 || lo > hi {
            return Err(format!("invalid port range {lo}-{hi}: need 1 <= LO <= HI"));
        }
        Ok(Self { lo, hi })
    }
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn iter(&self) -> RangeInclusive<u16> {
        self.lo..=self.hi
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("invalid port range {s:?}: expected LO-HI, e.g. 20000-20999"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port range {s:?}: {v:?} is not a port number"))
        };
        PortRange::new(parse(lo)?, parse(hi)?)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// How this relay is reached from outside: the host hidden servers and clients are told, and
/// the external port of each local port where something (a Kubernetes Service, a NAT) maps
/// them. Standalone, ports map to themselves. It can change while the relay runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ExternalAddress {
    /// Host written in the 200 body and (with `RedirectHost::Advertise`) the 307.
    pub host: String,
    /// Local port → external port; a port not listed is reached as itself.
    #[serde(default)]
    pub ports: std::collections::BTreeMap<u16, u16>,
}

impl ExternalAddress {
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            ports: Default::default(),
        }
    }

    /// The port clients and hidden servers must use for local `port`.
    pub fn port(&self, port: u16) -> u16 {
        self.ports.get(&port).copied().unwrap_or(port)
    }
}

/// The relay's `--external-file`: how the label is reached from outside, and with several
/// replicas each behind a Service of its own (a StatefulSet's pods), how each pod is: the
/// operator writes one file for every pod, and each relay takes its own entry by its pod name
/// (`label-relay --pod-name`), else the top-level one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ExternalFile {
    #[serde(flatten)]
    pub default: ExternalAddress,
    /// Pod name → that pod's own address.
    #[serde(default)]
    pub pods: std::collections::BTreeMap<String, ExternalAddress>,
}

impl ExternalFile {
    /// The address the pod named `pod` tells hidden servers and clients.
    pub fn for_pod(mut self, pod: Option<&str>) -> ExternalAddress {
        pod.and_then(|pod| self.pods.remove(pod))
            .unwrap_or(self.default)
    }
}

/// Host name of the registrar role unless told otherwise (`--registrar`): every front end
/// and relay of an install must agree on it.
pub const DEFAULT_REGISTRAR: &str = "taas-registrar.localhost";
/// Servers domain unless told otherwise (`--domain`): clients ask for `LABEL.<domain>`.
pub const DEFAULT_DOMAIN: &str = "taas.localhost";

/// Settings of the relay process (`taas-relay serve`), independent of any label.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// The HTTPS front end (registrar + mobile clients).
    pub listen: SocketAddr,
    /// Host name of the registrar role (lower case).
    pub registrar: String,
    /// Servers domain: mobile clients ask for `LABEL.<domain>` (lower case).
    pub domain: String,
    /// Host written in the 200 body (`HOST:p`) and, with `RedirectHost::Advertise`, the 307.
    pub advertise: String,
    pub redirect_host: RedirectHost,
    pub p_ports: PortRange,
    pub q_ports: PortRange,
    /// Address that p and q listeners bind to (the listen IP).
    pub bind_ip: IpAddr,
    /// The shared client port (`shared_port`), as bound, when it is on: the 307 names it.
    pub shared_port: Option<u16>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Threads the labels' connections run on (`data_plane`).
    pub data_threads: std::num::NonZeroUsize,
    /// How pairs move their bytes (user-space copy, splice(2), or the switch between them).
    pub splice: crate::splice::SpliceMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A p port waits this long for its one connection.
    pub rendezvous: Duration,
    /// A client on q waits this long for a parked connection.
    pub client_wait: Duration,
    /// TLS handshake and request head on the front end.
    pub handshake: Duration,
    /// Time for each request head on the front end; an idle kept-alive connection is closed
    /// after this.
    pub keep_alive: Duration,
    /// How long a 307 admits its source on q (with `ClientAdmission::Redirected`).
    pub admission: Duration,
    /// Time for a request's body on the front end once its head is in (408 and a close
    /// after it): with `keep_alive`, the deadline of a whole request.
    pub request_body: Duration,
    /// A client on q must send its first byte within this before it is paired (labels whose
    /// server speaks first excepted): a silent connection never holds a parked one.
    pub first_byte: Duration,
    /// A spliced pair with no byte either way for this long is closed (`None`: never).
    pub pair_idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            rendezvous: Duration::from_secs(30),
            client_wait: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            admission: Duration::from_secs(60),
            request_body: Duration::from_secs(10),
            first_byte: Duration::from_secs(3),
            pair_idle: Some(Duration::from_secs(15 * 60)),
        }
    }
}

/// Front-end connections open at once in the gateway and label-relay pods (their
/// `--max-connections` default): at the measured cost of a held connection (`frontend`
/// module docs) the cap fits the chart's 256 MiB memory limit with room to spare.
pub const POD_FRONTEND_CONNECTIONS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Front-end connections open at once (TLS handshakes included).
    pub frontend_connections: usize,
    /// Front-end connections one source (IPv4 address or IPv6 /64) may hold at once on the
    /// public (TLS) front end; see `frontend` for the choice of default.
    pub frontend_connections_per_source: usize,
    /// Clients waiting on one label's q for a parked connection.
    pub waiting_clients_per_label: usize,
    /// Spliced pairs open at once, all labels together.
    pub active_pairs: usize,
    /// Bytes a hidden server may send before pairing (kept and delivered to the client).
    pub early_bytes: usize,
    /// Connections open at once on one label's q from one source (an IPv4 address or an IPv6
    /// /64), from accept to close.
    pub clients_per_source_per_label: usize,
    /// The same over all labels of the relay.
    pub clients_per_source: usize,
    /// Spliced pairs (and clients waiting for one) open at once on one label, so that one
    /// label cannot take all of `active_pairs`.
    pub pairs_per_label: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frontend_connections: 16_384,
            frontend_connections_per_source: 1024,
            waiting_clients_per_label: 256,
            active_pairs: 65_536,
            early_bytes: 16 * 1024,
            // A browser opens about 6 connections per host, and one carrier-grade NAT address
            // may carry many phones: 256 is some 40 browsers on one label at once, 1024 some
            // 170 over all labels; one address still cannot hold more than that (a stalled
            // pair is closed by the pair idle timeout).
            clients_per_source_per_label: 256,
            clients_per_source: 1024,
            pairs_per_label: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pod_takes_its_own_entry_of_the_external_file_and_any_other_the_top_level_one() {
        let text = "host: 203.0.113.1\nports: {20000: 31000, 21000: 31500}\npods:\n  \
                    taas-home-0: {host: 203.0.113.1, ports: {20000: 31000}}\n  \
                    taas-home-1: {host: 203.0.113.2, ports: {20000: 32000}}\n";
        let file: ExternalFile = serde_yaml::from_str(text).unwrap();
        let one = file.clone().for_pod(Some("taas-home-1"));
        assert_eq!(one.host, "203.0.113.2");
        assert_eq!(one.port(20000), 32000);
        let other = file.clone().for_pod(Some("taas-other-0"));
        assert_eq!(other.host, "203.0.113.1");
        assert_eq!(other.port(21000), 31500);
        assert_eq!(file.clone().for_pod(None), other);
        // The file of a single relay (no `pods:`) reads as before.
        let single: ExternalFile = serde_yaml::from_str("host: relay.example\n").unwrap();
        assert_eq!(single.for_pod(Some("taas-home-0")).host, "relay.example");
    }
}
