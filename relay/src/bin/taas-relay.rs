//! `taas-relay`: the relay in each of its run modes and label provisioning. A thin shell: the
//! flags (each with its `TAAS_*` variable, defaults taken from the library's options and
//! constants), then `taas_relay::run::{standalone, gateway, pod}` and `provision`.
//! - `serve`: the standalone relay (every label of a directory; `--demo` adds a built-in
//!   hidden server);
//! - `gateway`: a cluster's TLS front end, forwarding to each label's relay;
//! - `label-relay`: one label's relay in a pod, as the operator runs it;
//! - `label new`: provision a label (manifests, and what the hidden server needs).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use taas_process::{shutdown_signal, LogFormat};
use taas_relay::config::{
    Limits, PortRange, RedirectHost, Timeouts, DEFAULT_DOMAIN, DEFAULT_REGISTRAR,
    POD_FRONTEND_CONNECTIONS,
};
use taas_relay::gateway::UpstreamSettings;
use taas_relay::gateway_auth::GatewayToken;
use taas_relay::rate_limit::RateLimit;
use taas_relay::run::gateway::{self, GatewayOptions, RouteSource};
use taas_relay::run::pod::{self, LabelRelayOptions};
use taas_relay::run::standalone::{self, ServeOptions};
use taas_relay::run::{DEFAULT_DRAIN_TIMEOUT, DEFAULT_STATE_DIR, POD_METRICS};
use taas_relay::splice::SpliceMode;

#[derive(Parser)]
#[command(
    version,
    about = "TAAS relay: rendezvous service for hidden servers and mobile clients"
)]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, env = "TAAS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the standalone relay: registrar, redirector and relay for every label in --labels.
    Serve(ServeArgs),
    /// Manage labels.
    #[command(subcommand)]
    Label(LabelCommand),
    /// Run the cluster's registrar and redirect front end: terminate TLS, dispatch by Host,
    /// forward each request to the label's relay (see --routes-file).
    Gateway(GatewayArgs),
    /// Run one label's relay, as the operator does in a pod: the label from mounted files,
    /// requests from the gateways on a plain-HTTP control port.
    LabelRelay(LabelRelayArgs),
}

#[derive(Args)]
struct GatewayArgs {
    /// HTTPS front end.
    #[arg(long, env = "TAAS_LISTEN", default_value_t = gateway::DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    names: Names,
    #[command(flatten)]
    tls: TlsArgs,
    /// Routes: a YAML file `LABEL: {relay: HOST:PORT, ready: true}`, re-read on change; in
    /// edge mode also `edge: HOST:PORT`, `direct: true`, `rendezvous: [T, ...]`.
    #[arg(long, env = "TAAS_ROUTES_FILE")]
    routes_file: PathBuf,
    /// Seconds between reads of --routes-file.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL",
          default_value_t = gateway::DEFAULT_RELOAD_INTERVAL.as_secs_f64())]
    reload_interval: f64,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value_t = POD_METRICS.to_string())]
    metrics: String,
    /// Front-end connections open at once, TLS handshakes included (the default fits the
    /// chart's 256 MiB memory limit at ~36 KiB per held connection).
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = POD_FRONTEND_CONNECTIONS,
          value_parser = connection_count())]
    max_connections: usize,
    /// Front-end connections one source (an IPv4 address or an IPv6 /64) may hold at once;
    /// more are closed before the TLS handshake. Sized for carrier-grade NAT.
    #[arg(long, env = "TAAS_MAX_CONNECTIONS_PER_SOURCE",
          default_value_t = Limits::default().frontend_connections_per_source,
          value_parser = connection_count())]
    max_connections_per_source: usize,
    /// Seconds to keep serving after SIGTERM, unready, before closing: load balancers and
    /// kube-proxy stop sending new connections first, so a rolling update loses none.
    #[arg(long, env = "TAAS_SHUTDOWN_DELAY",
          default_value_t = gateway::DEFAULT_SHUTDOWN_DELAY.as_secs_f64())]
    shutdown_delay: f64,
    /// Seconds a stopping gateway, after --shutdown-delay, lets the connections it forwards
    /// (pairs through the shared port, direct labels and rendezvous ports) finish, taking no
    /// new ones; parked hidden servers are given back at once, to park through another
    /// gateway. A second signal stops at once.
    #[arg(long, env = "TAAS_DRAIN_TIMEOUT", value_name = "SECS",
          default_value_t = DEFAULT_DRAIN_TIMEOUT.as_secs_f64())]
    drain_timeout: f64,
    /// The install secret (mounted from the Secret the chart creates): every request
    /// forwarded to LABEL's relay carries LABEL's gateway token, derived from it. Re-read on
    /// change. Without it, relays that check gateway tokens refuse this gateway.
    #[arg(long, env = "TAAS_GATEWAY_SECRET_FILE")]
    gateway_secret_file: Option<PathBuf>,
    /// 307s per second one client source may get (an IPv4 address, or an IPv6 /64); beyond
    /// it, 429 with Retry-After. Generous for carrier-grade NAT; 0 disables the limit.
    #[arg(long, env = "TAAS_REDIRECT_RATE", default_value_t = RateLimit::default().per_second)]
    redirect_rate: f64,
    /// 307s one client source may get at once, before --redirect-rate applies.
    #[arg(long, env = "TAAS_REDIRECT_BURST", default_value_t = RateLimit::default().burst,
          value_parser = clap::value_parser!(u32).range(1..))]
    redirect_burst: u32,
    /// Edge mode: the shared client port. A TLS client naming LABEL.<domain> is forwarded
    /// raw (never decrypted) to LABEL's relay edge port, when its route has one. "off" to
    /// disable.
    #[arg(long, env = "TAAS_SHARED_PORT", value_name = "ADDR|off", default_value = "off",
          value_parser = edge_arg)]
    shared_port: EdgeAddr,
    /// Edge mode: the shared rendezvous ports, each listened on at the --listen IP; a hidden
    /// server's connection on one goes to the relay (among the labels owning that port)
    /// that claims it. "off" to disable.
    #[arg(long, env = "TAAS_RENDEZVOUS_PORTS", value_name = "LO-HI|off", default_value = "off",
          value_parser = rendezvous_ports_arg)]
    rendezvous_ports: RendezvousPorts,
    #[command(flatten)]
    splice: SpliceArgs,
}

#[derive(Args)]
struct LabelRelayArgs {
    /// The TaasLabel manifest (mounted from a ConfigMap).
    #[arg(long, env = "TAAS_LABEL_FILE")]
    label_file: PathBuf,
    /// The label's Secret, mounted as a directory (one file per key).
    #[arg(long, env = "TAAS_SECRET_DIR")]
    secret_dir: PathBuf,
    /// External host and ports (`host:` and `ports: {LOCAL: EXTERNAL}`), re-read on change.
    #[arg(long, env = "TAAS_EXTERNAL_FILE")]
    external_file: Option<PathBuf>,
    /// This pod's name (the operator sets it from the downward API): with several replicas
    /// each behind a Service of its own, the external file has a `pods:` entry per pod and
    /// this relay tells hidden servers and clients its own. Such a replica leaves its Service
    /// at once when stopped, so a drain gives its parked connections back at once.
    #[arg(long, env = "TAAS_POD_NAME")]
    pod_name: Option<String>,
    /// Plain-HTTP control port for the gateways.
    #[arg(long, env = "TAAS_CONTROL", default_value_t = pod::DEFAULT_CONTROL)]
    control: SocketAddr,
    /// The edge port: in the cluster's edge mode the gateways forward clients and hidden
    /// servers here raw, each after an edge header carrying this label's gateway token
    /// (needs --gateway-token). "off" to disable.
    #[arg(long, env = "TAAS_EDGE", value_name = "ADDR|off", default_value = "off",
          value_parser = edge_arg)]
    edge: EdgeAddr,
    /// The gateway token of this label (the operator derives it from the install secret):
    /// every control-port request must carry it in `taas-gateway-auth` (403 otherwise), and
    /// only such requests may name the client. Without it the control port is
    /// unauthenticated: whoever connects is taken to be the client itself.
    #[arg(
        long,
        env = "TAAS_GATEWAY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    gateway_token: Option<String>,
    /// Extra restriction: only peers in these networks (comma-separated CIDRs) count as
    /// gateways; with a token, requests from elsewhere get 403 [default: any network].
    #[arg(long, env = "TAAS_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Control-port connections open at once (the default fits the chart's 256 MiB memory
    /// limit at ~36 KiB per held connection).
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = POD_FRONTEND_CONNECTIONS,
          value_parser = connection_count())]
    max_connections: usize,
    /// The same names as the gateways'.
    #[command(flatten)]
    names: Names,
    /// The pod's rendezvous ports.
    #[arg(long, env = "TAAS_P_PORTS", default_value_t = pod::DEFAULT_P_PORTS)]
    p_ports: PortRange,
    /// The pod's client port q.
    #[arg(long, env = "TAAS_CLIENT_PORT", default_value_t = pod::DEFAULT_CLIENT_PORT)]
    client_port: u16,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value_t = POD_METRICS.to_string())]
    metrics: String,
    /// Seconds between reads of the mounted files.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL",
          default_value_t = pod::DEFAULT_RELOAD_INTERVAL.as_secs_f64())]
    reload_interval: f64,
    /// Host in the 307 Location: the requested name (LABEL.<domain>, which the hidden
    /// server's certificate names; needs *.<domain> to reach this label's client port), or
    /// the label's external address from --external-file.
    #[arg(long, env = "TAAS_REDIRECT_HOST", value_enum, default_value_t = RedirectHost::default())]
    redirect_host: RedirectHost,
    #[command(flatten)]
    clients: ClientArgs,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    splice: SpliceArgs,
}

/// How spliced pairs move their bytes (`serve`, `label-relay`, `gateway`).
#[derive(Args)]
struct SpliceArgs {
    /// How spliced pairs move their bytes: auto (copy each direction's first 64 KiB, then
    /// splice(2) inside the kernel; Linux), copy (through user space only), kernel (splice(2)
    /// from the first byte).
    #[arg(long, env = "TAAS_SPLICE", value_enum, default_value_t = SpliceMode::Auto)]
    splice: SpliceMode,
}

/// How a relay stops (`serve` and `label-relay`).
#[derive(Args)]
struct DrainArgs {
    /// Seconds a stopping relay (SIGTERM) lets its active pairs finish: it turns unready,
    /// refuses registrations and gives its parked connections back at once, then exits
    /// when the last pair ends or at this timeout (cutting what is left). A second signal
    /// stops at once.
    #[arg(long, env = "TAAS_DRAIN_TIMEOUT", value_name = "SECS",
          default_value_t = DEFAULT_DRAIN_TIMEOUT.as_secs_f64())]
    drain_timeout: f64,
}

impl DrainArgs {
    fn timeout(&self) -> anyhow::Result<Duration> {
        drain_timeout(self.drain_timeout)
    }
}

fn drain_timeout(seconds: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .with_context(|| format!("--drain-timeout {seconds}: expected seconds (0 or more)"))
}

/// What one client on q may hold, and for how long (`serve` and `label-relay`).
#[derive(Args)]
struct ClientArgs {
    /// Seconds a client on q has to send its first byte before it is closed; it takes a
    /// parked connection only then (labels with serverSpeaksFirst are paired at once).
    #[arg(
        long,
        env = "TAAS_FIRST_BYTE_TIMEOUT",
        value_name = "S",
        default_value_t = Timeouts::default().first_byte.as_secs_f64()
    )]
    first_byte_timeout: f64,
    /// Seconds without a byte either way after which a spliced pair is closed; 0: never.
    #[arg(
        long,
        env = "TAAS_PAIR_IDLE_TIMEOUT",
        value_name = "S",
        default_value_t = Timeouts::default().pair_idle.map_or(0.0, |idle| idle.as_secs_f64())
    )]
    pair_idle_timeout: f64,
    /// Connections one source (an IPv4 address or an IPv6 /64) may have open on one label's
    /// q. A browser opens about 6 per host, and many phones may share one carrier-grade NAT
    /// address.
    #[arg(long, env = "TAAS_MAX_LABEL_CLIENTS_PER_SOURCE", value_name = "N",
          default_value_t = Limits::default().clients_per_source_per_label,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_label_clients_per_source: usize,
    /// Connections one source may have open on the client ports of all labels together.
    #[arg(long, env = "TAAS_MAX_CLIENTS_PER_SOURCE", value_name = "N",
          default_value_t = Limits::default().clients_per_source,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_clients_per_source: usize,
    /// Spliced pairs (and clients waiting for one) one label may have at once, so that one
    /// label cannot take every pair the relay allows.
    #[arg(long, env = "TAAS_MAX_LABEL_PAIRS", value_name = "N",
          default_value_t = Limits::default().pairs_per_label,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_label_pairs: usize,
}

impl ClientArgs {
    fn apply(&self, timeouts: &mut Timeouts, limits: &mut Limits) -> anyhow::Result<()> {
        timeouts.first_byte = seconds("--first-byte-timeout", self.first_byte_timeout)?;
        timeouts.pair_idle = match self.pair_idle_timeout {
            0.0 => None,
            s => Some(seconds("--pair-idle-timeout", s)?),
        };
        limits.clients_per_source_per_label = self.max_label_clients_per_source;
        limits.clients_per_source = self.max_clients_per_source;
        limits.pairs_per_label = self.max_label_pairs;
        Ok(())
    }
}

#[derive(Subcommand)]
enum LabelCommand {
    /// Provision a label: write LABEL.yaml (TaasLabel + Secret) and print what the hidden
    /// server needs (otpauth URI, QR code, the taas-agent command).
    New(LabelNewArgs),
}

/// Names and addresses shared by `serve` and `label new`.
#[derive(Args, Clone)]
struct RelayNames {
    /// HTTPS front end (registrar + mobile clients).
    #[arg(long, env = "TAAS_LISTEN", default_value_t = ServeOptions::default().listen)]
    listen: SocketAddr,
    #[command(flatten)]
    names: Names,
    /// Host written in the 200 body (HOST:p) [default: the listen IP].
    #[arg(long, env = "TAAS_ADVERTISE")]
    advertise: Option<String>,
    /// Directory of TaasLabel + Secret YAML manifests.
    #[arg(long, env = "TAAS_LABELS", default_value_os_t = ServeOptions::default().labels)]
    labels: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
}

/// The names of the two roles: every front end and relay must agree on them.
#[derive(Args, Clone)]
struct Names {
    /// Host name of the registrar role.
    #[arg(long, env = "TAAS_REGISTRAR", default_value = DEFAULT_REGISTRAR)]
    registrar: String,
    /// Servers domain: mobile clients ask for LABEL.<domain>.
    #[arg(long, env = "TAAS_DOMAIN", default_value = DEFAULT_DOMAIN)]
    domain: String,
}

/// The front end's certificate.
#[derive(Args, Clone)]
struct TlsArgs {
    /// Certificate (PEM) of the front end [default: self-signed, generated in --state-dir].
    #[arg(long, env = "TAAS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "TAAS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Generated certificate and other local state.
    #[arg(long, env = "TAAS_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    names: RelayNames,
    /// Host in the 307 Location: the requested name, or the advertised address.
    #[arg(long, env = "TAAS_REDIRECT_HOST", value_enum,
          default_value_t = ServeOptions::default().redirect_host)]
    redirect_host: RedirectHost,
    /// Range of one-shot rendezvous ports p.
    #[arg(long, env = "TAAS_P_PORTS", default_value_t = ServeOptions::default().p_ports)]
    p_ports: PortRange,
    /// Range of labels' client ports q (a label may pin its own).
    #[arg(long, env = "TAAS_Q_PORTS", default_value_t = ServeOptions::default().q_ports)]
    q_ports: PortRange,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value_t = metrics_arg(ServeOptions::default().metrics))]
    metrics: String,
    /// Seconds between checks of --labels for changes.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL",
          default_value_t = ServeOptions::default().reload_interval.as_secs_f64())]
    reload_interval: f64,
    /// Seconds a rendezvous port waits for the hidden server's connection.
    #[arg(long, env = "TAAS_RENDEZVOUS_TIMEOUT",
          default_value_t = Timeouts::default().rendezvous.as_secs_f64())]
    rendezvous_timeout: f64,
    /// Seconds a client on q waits for a parked connection.
    #[arg(long, env = "TAAS_CLIENT_WAIT",
          default_value_t = Timeouts::default().client_wait.as_secs_f64())]
    client_wait: f64,
    /// Front-end connections open at once, TLS handshakes included (a held connection costs
    /// up to ~36 KiB of memory: size the cap to the host).
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = Limits::default().frontend_connections,
          value_parser = connection_count())]
    max_connections: usize,
    /// Front-end connections one source (an IPv4 address or an IPv6 /64) may hold at once;
    /// more are closed before the TLS handshake. Sized for carrier-grade NAT, where many
    /// phones share one address.
    #[arg(long, env = "TAAS_MAX_CONNECTIONS_PER_SOURCE",
          default_value_t = Limits::default().frontend_connections_per_source,
          value_parser = connection_count())]
    max_connections_per_source: usize,
    /// Seconds a request's body may take once its head is in (then 408 and a close).
    #[arg(long, env = "TAAS_REQUEST_BODY_TIMEOUT",
          default_value_t = Timeouts::default().request_body.as_secs_f64())]
    request_body_timeout: f64,
    /// Threads for the labels' connections: each label's connections run on one of them
    /// [default: one per CPU].
    #[arg(long, env = "TAAS_DATA_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    data_threads: Option<u16>,
    #[command(flatten)]
    clients: ClientArgs,
    /// One more client port, serving every label: routed by the TLS server name
    /// (LABEL.<domain>) without decrypting; the 307 names it. Each label keeps its own q.
    /// "off" to disable.
    #[arg(long, env = "TAAS_SHARED_PORT", value_name = "PORT|off", default_value = "off",
          value_parser = shared_port_arg)]
    shared_port: SharedPort,
    /// Also provision a "demo" label and run a built-in hidden server (an agent in front of a
    /// tiny HTTPS page), to see the whole path work with curl or a browser.
    #[arg(long, env = "TAAS_DEMO")]
    demo: bool,
    /// Upgrade without a gap: take the listening sockets of the relay running with the same
    /// --state-dir (over <state-dir>/handover.sock), serve on them, then that relay stops
    /// accepting, gives its parked connections back and exits once its pairs end (or at
    /// --drain-timeout). Without a running relay, binds as usual. `kill -HUP <pid>` of a
    /// running relay starts its binary (the file on disk now) this way.
    #[arg(long, env = "TAAS_TAKE_OVER")]
    take_over: bool,
    /// The web console (labels table, create, disable, rotate): ADDR:PORT, or off
    /// [default: off; 127.0.0.1:8893 with --demo]. A non-loopback address needs
    /// --console-token-file and is served over TLS.
    #[arg(long, env = "TAAS_CONSOLE", value_name = "ADDR|off")]
    console: Option<String>,
    /// A file holding the console's login token (16 bytes or more).
    #[arg(long, env = "TAAS_CONSOLE_TOKEN_FILE", value_name = "PATH")]
    console_token_file: Option<PathBuf>,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    splice: SpliceArgs,
}

#[derive(Args)]
struct LabelNewArgs {
    /// The hidden server's ID (its TOTP username).
    #[arg(long, env = "TAAS_ID")]
    id: String,
    /// LABEL: clients reach LABEL.<domain>.
    #[arg(long, env = "TAAS_LABEL")]
    label: String,
    /// Kubernetes namespace written into the manifests.
    #[arg(long, env = "TAAS_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Also write the original steward's provisioning file (exports.params = ...) here.
    #[arg(long, env = "TAAS_STEWARD")]
    steward: Option<PathBuf>,
    /// A direct label (`spec.direct: true`): https://LABEL.<domain>/ on the relay's HTTPS port
    /// goes straight to the hidden server, TLS end to end, with no 307 (standalone relay).
    #[arg(long, env = "TAAS_DIRECT")]
    direct: bool,
    #[command(flatten)]
    names: RelayNames,
}

/// A connection cap: 1 to 1,000,000.
fn connection_count() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::value_parser!(u32)
        .range(1..=1_000_000)
        .map(|n| n as usize)
}

/// `--shared-port`: a port, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SharedPort(Option<u16>);

fn shared_port_arg(value: &str) -> Result<SharedPort, String> {
    match value.trim() {
        "off" => Ok(SharedPort(None)),
        port => port
            .parse::<u16>()
            .ok()
            .filter(|&port| port != 0)
            .map(|port| SharedPort(Some(port)))
            .ok_or_else(|| format!("{value:?}: expected a port (1-65535) or off")),
    }
}

/// An address, or off: the label relay's `--edge` and the gateway's `--shared-port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EdgeAddr(Option<SocketAddr>);

fn edge_arg(value: &str) -> Result<EdgeAddr, String> {
    match value.trim() {
        "off" => Ok(EdgeAddr(None)),
        addr => addr
            .parse()
            .map(|addr| EdgeAddr(Some(addr)))
            .map_err(|_| format!("{value:?}: expected ADDR:PORT or off")),
    }
}

/// `--rendezvous-ports`: a range, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RendezvousPorts(Option<PortRange>);

fn rendezvous_ports_arg(value: &str) -> Result<RendezvousPorts, String> {
    match value.trim() {
        "off" => Ok(RendezvousPorts(None)),
        range => range.parse().map(|range| RendezvousPorts(Some(range))),
    }
}

/// The value of `--metrics` for an address (`None`: "off").
fn metrics_arg(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_string(), |addr| addr.to_string())
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {value}: expected a positive number of seconds"))
}

fn metrics_addr(value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value.trim() {
        "off" | "" => Ok(None),
        addr => Ok(Some(addr.parse().with_context(|| {
            format!("--metrics {addr:?}: expected ADDR:PORT or off")
        })?)),
    }
}

fn serve_options(args: &ServeArgs) -> anyhow::Result<ServeOptions> {
    let metrics = metrics_addr(&args.metrics)?;
    let n = &args.names;
    let mut timeouts = Timeouts {
        rendezvous: seconds("--rendezvous-timeout", args.rendezvous_timeout)?,
        client_wait: seconds("--client-wait", args.client_wait)?,
        request_body: seconds("--request-body-timeout", args.request_body_timeout)?,
        ..Timeouts::default()
    };
    let mut limits = Limits {
        frontend_connections: args.max_connections,
        frontend_connections_per_source: args.max_connections_per_source,
        ..Limits::default()
    };
    args.clients.apply(&mut timeouts, &mut limits)?;
    Ok(ServeOptions {
        listen: n.listen,
        registrar: n.names.registrar.clone(),
        domain: n.names.domain.clone(),
        advertise: n.advertise.clone(),
        redirect_host: args.redirect_host,
        p_ports: args.p_ports,
        q_ports: args.q_ports,
        labels: n.labels.clone(),
        tls_cert: n.tls.tls_cert.clone(),
        tls_key: n.tls.tls_key.clone(),
        state_dir: n.tls.state_dir.clone(),
        metrics,
        reload_interval: seconds("--reload-interval", args.reload_interval)?,
        timeouts,
        limits,
        data_threads: args
            .data_threads
            .and_then(|n| std::num::NonZeroUsize::new(usize::from(n))),
        shared_port: args.shared_port.0,
        take_over: args.take_over,
        hand_over: false,
        console: taas_relay::console::from_flags(
            args.console.as_deref(),
            args.demo,
            args.console_token_file.clone(),
        )
        .map_err(anyhow::Error::msg)?,
        splice: args.splice.splice,
    })
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut options = serve_options(&args)?;
    options.hand_over = true;
    let drain_timeout = args.drain.timeout()?;
    // Before anything is served: SIGHUP's default would end the process.
    let mut hangup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP")?;
    let mut relay = standalone::start(options).await?;
    let demo = if args.demo {
        Some(taas_relay::demo::start(&relay).await?)
    } else {
        None
    };
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let handed_over = loop {
        tokio::select! {
            () = &mut shutdown => break false,
            () = relay.successor_serves() => break true,
            Some(()) = hangup.recv() => start_successor(),
        }
    };
    // The demo's own hidden server stops first: it is part of this process.
    drop(demo);
    if handed_over {
        relay.hand_over(drain_timeout, shutdown_signal()).await;
    } else {
        relay.drain_and_stop(drain_timeout, shutdown_signal()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: runs the binary on disk (a replaced one is the new one) with this process's
/// arguments and `--take-over`, as a process that outlives this one; it takes the sockets
/// over through handover.sock, and this relay stops once it serves.
fn start_successor() {
    taas_relay::handover::notify(&[sd_notify::NotifyState::Reloading]);
    let started = taas_relay::handover::own_binary().and_then(|binary| {
        let args = taas_relay::handover::successor_args(std::env::args_os().skip(1));
        std::process::Command::new(&binary).args(&args).spawn()
    });
    match started {
        Ok(mut child) => {
            tracing::info!(
                pid = child.id(),
                "SIGHUP: started the successor, handing over"
            );
            // Reaped if it ends first; it outlives this process otherwise.
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    if !status.success() {
                        tracing::warn!(%status, "the successor failed; serving on");
                    }
                }
            });
        }
        Err(error) => tracing::warn!(%error, "SIGHUP: cannot start the successor; serving on"),
    }
}

/// How a gateway stops: serving, unready, for `delay`; then letting what it forwards finish
/// for at most `timeout`.
struct GatewayStop {
    delay: Duration,
    timeout: Duration,
}

/// The gateway's options, and how it stops.
fn gateway_options(args: &GatewayArgs) -> anyhow::Result<(GatewayOptions, GatewayStop)> {
    if !(args.redirect_rate.is_finite() && args.redirect_rate >= 0.0) {
        anyhow::bail!(
            "--redirect-rate {}: expected 307s per second (0 or more; 0 disables the limit)",
            args.redirect_rate
        );
    }
    let shutdown_delay = Duration::try_from_secs_f64(args.shutdown_delay).with_context(|| {
        format!(
            "--shutdown-delay {}: expected seconds (0 or more)",
            args.shutdown_delay
        )
    })?;
    let options = GatewayOptions {
        listen: args.listen,
        registrar: args.names.registrar.clone(),
        domain: args.names.domain.clone(),
        tls_cert: args.tls.tls_cert.clone(),
        tls_key: args.tls.tls_key.clone(),
        state_dir: args.tls.state_dir.clone(),
        routes: RouteSource::File(args.routes_file.clone()),
        reload_interval: seconds("--reload-interval", args.reload_interval)?,
        metrics: metrics_addr(&args.metrics)?,
        timeouts: Timeouts::default(),
        max_connections: args.max_connections,
        max_connections_per_source: args.max_connections_per_source,
        install_secret_file: args.gateway_secret_file.clone(),
        upstream: UpstreamSettings {
            redirect_limit: RateLimit {
                per_second: args.redirect_rate,
                burst: args.redirect_burst,
                ..RateLimit::default()
            },
            ..UpstreamSettings::default()
        },
        shared_port: args.shared_port.0,
        rendezvous_ports: args.rendezvous_ports.0,
        edge_limits: Default::default(),
        splice: args.splice.splice,
    };
    let stop = GatewayStop {
        delay: shutdown_delay,
        timeout: drain_timeout(args.drain_timeout)?,
    };
    Ok((options, stop))
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let (options, stop) = gateway_options(&args)?;
    let gateway = gateway::start(options).await?;
    shutdown_signal().await;
    gateway
        .drain_and_stop(stop.delay, stop.timeout, shutdown_signal())
        .await;
    Ok(())
}

fn label_relay_options(args: &LabelRelayArgs) -> anyhow::Result<LabelRelayOptions> {
    let mut timeouts = Timeouts::default();
    let mut limits = Limits {
        frontend_connections: args.max_connections,
        ..Limits::default()
    };
    args.clients.apply(&mut timeouts, &mut limits)?;
    Ok(LabelRelayOptions {
        label_file: args.label_file.clone(),
        secret_dir: args.secret_dir.clone(),
        external_file: args.external_file.clone(),
        pod_name: args.pod_name.clone(),
        control: args.control,
        edge: args.edge.0,
        gateway_token: args
            .gateway_token
            .as_deref()
            .map(GatewayToken::new)
            .transpose()
            .context("--gateway-token")?,
        trusted: args.trusted_proxies.clone(),
        registrar: args.names.registrar.clone(),
        domain: args.names.domain.clone(),
        redirect_host: args.redirect_host,
        p_ports: args.p_ports,
        client_port: args.client_port,
        metrics: metrics_addr(&args.metrics)?,
        reload_interval: seconds("--reload-interval", args.reload_interval)?,
        timeouts,
        limits,
        splice: args.splice.splice,
    })
}

async fn run_label_relay(args: LabelRelayArgs) -> anyhow::Result<()> {
    let drain_timeout = args.drain.timeout()?;
    let relay = pod::start(label_relay_options(&args)?).await?;
    shutdown_signal().await;
    relay.drain_and_stop(drain_timeout, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

fn run_label_new(args: LabelNewArgs) -> anyhow::Result<()> {
    let out = taas_relay::provision::label_new(&taas_relay::provision::LabelNewOptions {
        id: args.id,
        label: args.label,
        namespace: args.namespace,
        steward: args.steward,
        listen: args.names.listen,
        registrar: args.names.names.registrar,
        domain: args.names.names.domain,
        advertise: args.names.advertise,
        labels: args.names.labels,
        tls_cert: args.names.tls.tls_cert,
        state_dir: args.names.tls.state_dir,
        direct: args.direct,
    })?;
    print!("{out}");
    Ok(())
}

fn run_async(task: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(task)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    taas_process::init(cli.log_format);
    taas_process::raise_fd_limit();
    let result = match cli.command {
        Command::Serve(args) => run_async(run_serve(args)),
        Command::Gateway(args) => run_async(run_gateway(args)),
        Command::LabelRelay(args) => run_async(run_label_relay(args)),
        Command::Label(LabelCommand::New(args)) => run_label_new(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("taas-relay: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from([&["taas-relay"], args].concat())
            .unwrap()
            .command
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every flag of every subcommand reads the variable named after it.
    #[test]
    fn every_flag_has_a_taas_env() {
        assert_eq!(
            taas_process::flags_without_taas_env(&Cli::command()),
            Vec::<String>::new()
        );
    }

    /// The defaults are written once, in the library; no flag means the library's defaults.
    #[test]
    fn no_flags_make_the_default_options() {
        let Command::Serve(args) = parse(&["serve"]) else {
            panic!("serve")
        };
        assert_eq!(serve_options(&args).unwrap(), ServeOptions::default());
        assert!(!args.demo);

        let Command::Gateway(args) = parse(&["gateway", "--routes-file", "routes.yaml"]) else {
            panic!("gateway")
        };
        let (options, stop) = gateway_options(&args).unwrap();
        assert_eq!(
            options,
            GatewayOptions::new(RouteSource::File("routes.yaml".into()))
        );
        assert_eq!(stop.delay, gateway::DEFAULT_SHUTDOWN_DELAY);
        assert_eq!(stop.timeout, DEFAULT_DRAIN_TIMEOUT);

        let Command::LabelRelay(args) = parse(&[
            "label-relay",
            "--label-file",
            "l.yaml",
            "--secret-dir",
            "secret",
        ]) else {
            panic!("label-relay")
        };
        assert_eq!(
            label_relay_options(&args).unwrap(),
            LabelRelayOptions::new("l.yaml".into(), "secret".into())
        );
    }

    /// `--shared-port` is off by default, a port when given (flag or TAAS_SHARED_PORT), and
    /// nothing else.
    #[test]
    fn the_shared_port_is_off_by_default_and_a_port_or_off_when_given() {
        let shared =
            |args: &[&str]| match Cli::try_parse_from([&["taas-relay", "serve"], args].concat()) {
                Ok(Cli {
                    command: Command::Serve(args),
                    ..
                }) => Ok(serve_options(&args).unwrap().shared_port),
                Ok(_) => panic!("serve"),
                Err(error) => Err(error.to_string()),
            };
        assert_eq!(shared(&[]), Ok(None));
        assert_eq!(shared(&["--shared-port", "off"]), Ok(None));
        assert_eq!(shared(&["--shared-port", "443"]), Ok(Some(443)));
        for bad in ["0", "70000", "on", ""] {
            assert!(shared(&["--shared-port", bad]).is_err(), "{bad:?}");
        }
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        let arg = serve
            .get_arguments()
            .find(|a| a.get_id() == "shared_port")
            .unwrap();
        assert_eq!(
            arg.get_env(),
            Some(std::ffi::OsStr::new("TAAS_SHARED_PORT"))
        );
    }

    /// `label-relay --edge` is off by default, an address when given (flag or TAAS_EDGE), and
    /// nothing else.
    #[test]
    fn the_edge_port_is_off_by_default_and_an_address_or_off_when_given() {
        let edge = |args: &[&str]| {
            let base = [
                "taas-relay",
                "label-relay",
                "--label-file",
                "l",
                "--secret-dir",
                "s",
            ];
            match Cli::try_parse_from([&base[..], args].concat()) {
                Ok(Cli {
                    command: Command::LabelRelay(args),
                    ..
                }) => Ok(label_relay_options(&args).unwrap().edge),
                Ok(_) => panic!("label-relay"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(edge(&[]), Ok(None));
        assert_eq!(edge(&["--edge", "off"]), Ok(None));
        assert_eq!(
            edge(&["--edge", "0.0.0.0:21001"]),
            Ok(Some("0.0.0.0:21001".parse().unwrap()))
        );
        for bad in ["21001", "on", ""] {
            assert!(edge(&["--edge", bad]).is_err(), "{bad:?}");
        }
        let command = Cli::command();
        let relay = command.find_subcommand("label-relay").unwrap();
        let arg = relay
            .get_arguments()
            .find(|a| a.get_id() == "edge")
            .unwrap();
        assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new("TAAS_EDGE")));
    }

    /// The console: off by default, at the original page's address with --demo.
    #[test]
    fn the_console_is_off_unless_asked_for_or_the_demo_runs() {
        let console = |argv: &[&str]| {
            let Command::Serve(args) = parse(argv) else {
                panic!("serve")
            };
            serve_options(&args).unwrap().console
        };
        assert_eq!(console(&["serve"]), None);
        let demo = console(&["serve", "--demo"]).unwrap();
        assert_eq!(demo.addr, taas_relay::console::DEMO_ADDR);
        assert_eq!(console(&["serve", "--demo", "--console", "off"]), None);
        let given = console(&[
            "serve",
            "--console",
            "0.0.0.0:9000",
            "--console-token-file",
            "t",
        ])
        .unwrap();
        assert_eq!(given.addr.port(), 9000);
        assert_eq!(given.token_file, Some(PathBuf::from("t")));
    }

    /// Flags given change the options (the comparison above is not vacuous).
    #[test]
    fn flags_change_the_options() {
        let Command::Serve(args) = parse(&[
            "serve",
            "--metrics",
            "off",
            "--pair-idle-timeout",
            "0",
            "--max-connections",
            "7",
            "--shared-port",
            "8444",
            "--splice",
            "copy",
        ]) else {
            panic!("serve")
        };
        let options = serve_options(&args).unwrap();
        assert_eq!(options.shared_port, Some(8444));
        assert_eq!(options.splice, SpliceMode::Copy);
        assert_eq!(options.metrics, None);
        assert_eq!(options.timeouts.pair_idle, None);
        assert_eq!(options.limits.frontend_connections, 7);
        assert_ne!(options, ServeOptions::default());
        let Command::Gateway(args) = parse(&[
            "gateway",
            "--routes-file",
            "r",
            "--redirect-rate",
            "0",
            "--shutdown-delay",
            "0",
            "--drain-timeout",
            "7",
            "--splice",
            "kernel",
        ]) else {
            panic!("gateway")
        };
        let (options, stop) = gateway_options(&args).unwrap();
        assert_eq!(options.splice, SpliceMode::Kernel);
        assert_eq!(options.upstream.redirect_limit.per_second, 0.0);
        assert_eq!(stop.delay, Duration::ZERO);
        assert_eq!(stop.timeout, Duration::from_secs(7));
    }

    /// The gateway's edge listeners are off by default, and an address / a range when given.
    #[test]
    fn the_gateways_shared_port_and_rendezvous_range_are_off_by_default_and_parsed_when_given() {
        let gateway = |args: &[&str]| {
            Cli::try_parse_from([&["taas-relay", "gateway", "--routes-file", "r"], args].concat())
                .map(|cli| match cli.command {
                    Command::Gateway(args) => gateway_options(&args).unwrap().0,
                    _ => panic!("gateway"),
                })
                .map_err(|error| error.to_string())
        };
        let default = gateway(&[]).unwrap();
        assert_eq!(
            (default.shared_port, default.rendezvous_ports),
            (None, None)
        );
        let on = gateway(&[
            "--shared-port",
            "0.0.0.0:9443",
            "--rendezvous-ports",
            "20000-20255",
        ])
        .unwrap();
        assert_eq!(on.shared_port, Some("0.0.0.0:9443".parse().unwrap()));
        assert_eq!(on.rendezvous_ports, PortRange::new(20_000, 20_255).ok());
        let off = gateway(&["--shared-port", "off", "--rendezvous-ports", "off"]).unwrap();
        assert_eq!((off.shared_port, off.rendezvous_ports), (None, None));
        for bad in [
            &["--shared-port", "9443"][..],
            &["--rendezvous-ports", "20255-20000"],
            &["--rendezvous-ports", "20000"],
        ] {
            assert!(gateway(bad).is_err(), "{bad:?}");
        }
        let command = Cli::command();
        let sub = command.find_subcommand("gateway").unwrap();
        for (id, env) in [
            ("shared_port", "TAAS_SHARED_PORT"),
            ("rendezvous_ports", "TAAS_RENDEZVOUS_PORTS"),
        ] {
            let arg = sub.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(env)));
        }
    }
}
