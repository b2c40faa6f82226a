//! `taas-relay`: the standalone relay (`serve`) and label provisioning (`label new`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use taas_relay::config::{Limits, PortRange, RedirectHost, Timeouts};
use taas_relay::gateway_auth::GatewayToken;
use taas_relay::process::{self, shutdown_signal, LogFormat};
use taas_relay::serve::{self, ServeOptions};

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
    #[arg(long, env = "TAAS_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    #[command(flatten)]
    names: Names,
    #[command(flatten)]
    tls: TlsArgs,
    /// Routes: a YAML file `LABEL: {relay: HOST:PORT, ready: true}`, re-read on change.
    #[arg(long, env = "TAAS_ROUTES_FILE")]
    routes_file: PathBuf,
    /// Seconds between reads of --routes-file.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL", default_value_t = 1.0)]
    reload_interval: f64,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value = "0.0.0.0:9464")]
    metrics: String,
    /// Front-end connections open at once, TLS handshakes included (the default fits the
    /// chart's 256 MiB memory limit at ~36 KiB per held connection).
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = POD_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Front-end connections one source (an IPv4 address or an IPv6 /64) may hold at once;
    /// more are closed before the TLS handshake. Sized for carrier-grade NAT.
    #[arg(long, env = "TAAS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections_per_source: u32,
    /// Seconds to keep serving after SIGTERM, unready, before closing: load balancers and
    /// kube-proxy stop sending new connections first, so a rolling update loses none.
    #[arg(long, env = "TAAS_SHUTDOWN_DELAY", default_value_t = 5.0)]
    shutdown_delay: f64,
    /// The install secret (mounted from the Secret the chart creates): every request
    /// forwarded to LABEL's relay carries LABEL's gateway token, derived from it. Re-read on
    /// change. Without it, relays that check gateway tokens refuse this gateway.
    #[arg(long, env = "TAAS_GATEWAY_SECRET_FILE")]
    gateway_secret_file: Option<PathBuf>,
    /// 307s per second one client source may get (an IPv4 address, or an IPv6 /64); beyond
    /// it, 429 with Retry-After. Generous for carrier-grade NAT; 0 disables the limit.
    #[arg(long, env = "TAAS_REDIRECT_RATE", default_value_t = 20.0)]
    redirect_rate: f64,
    /// 307s one client source may get at once, before --redirect-rate applies.
    #[arg(long, env = "TAAS_REDIRECT_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    redirect_burst: u32,
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
    /// Plain-HTTP control port for the gateways.
    #[arg(long, env = "TAAS_CONTROL", default_value = "0.0.0.0:8080")]
    control: SocketAddr,
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
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = POD_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// The same names as the gateways'.
    #[command(flatten)]
    names: Names,
    /// The pod's rendezvous ports.
    #[arg(long, env = "TAAS_P_PORTS", default_value = "20000-20007")]
    p_ports: PortRange,
    /// The pod's client port q.
    #[arg(long, env = "TAAS_CLIENT_PORT", default_value_t = 21000)]
    client_port: u16,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value = "0.0.0.0:9464")]
    metrics: String,
    /// Seconds between reads of the mounted files.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL", default_value_t = 2.0)]
    reload_interval: f64,
    /// Host in the 307 Location: the requested name (LABEL.<domain>, which the hidden
    /// server's certificate names; needs *.<domain> to reach this label's client port), or
    /// the label's external address from --external-file.
    #[arg(long, env = "TAAS_REDIRECT_HOST", value_enum, default_value_t = RedirectHost::Requested)]
    redirect_host: RedirectHost,
    #[command(flatten)]
    clients: ClientArgs,
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
        default_value_t = 3.0
    )]
    first_byte_timeout: f64,
    /// Seconds without a byte either way after which a spliced pair is closed; 0: never.
    #[arg(
        long,
        env = "TAAS_PAIR_IDLE_TIMEOUT",
        value_name = "S",
        default_value_t = 900.0
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
    #[arg(long, env = "TAAS_LISTEN", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    #[command(flatten)]
    names: Names,
    /// Host written in the 200 body (HOST:p) [default: the listen IP].
    #[arg(long, env = "TAAS_ADVERTISE")]
    advertise: Option<String>,
    /// Directory of TaasLabel + Secret YAML manifests.
    #[arg(long, env = "TAAS_LABELS", default_value = "labels")]
    labels: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
}

/// The names of the two roles: every front end and relay must agree on them.
#[derive(Args, Clone)]
struct Names {
    /// Host name of the registrar role.
    #[arg(
        long,
        env = "TAAS_REGISTRAR",
        default_value = "taas-registrar.localhost"
    )]
    registrar: String,
    /// Servers domain: mobile clients ask for LABEL.<domain>.
    #[arg(long, env = "TAAS_DOMAIN", default_value = "taas.localhost")]
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
    #[arg(long, env = "TAAS_STATE_DIR", default_value = ".taas")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    names: RelayNames,
    /// Host in the 307 Location: the requested name, or the advertised address.
    #[arg(long, env = "TAAS_REDIRECT_HOST", value_enum, default_value_t = RedirectHost::Requested)]
    redirect_host: RedirectHost,
    /// Range of one-shot rendezvous ports p.
    #[arg(long, env = "TAAS_P_PORTS", default_value = "20000-20999")]
    p_ports: PortRange,
    /// Range of labels' client ports q (a label may pin its own).
    #[arg(long, env = "TAAS_Q_PORTS", default_value = "21000-21999")]
    q_ports: PortRange,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Seconds between checks of --labels for changes.
    #[arg(long, env = "TAAS_RELOAD_INTERVAL", default_value_t = 1.0)]
    reload_interval: f64,
    /// Seconds a rendezvous port waits for the hidden server's connection.
    #[arg(long, env = "TAAS_RENDEZVOUS_TIMEOUT", default_value_t = 30.0)]
    rendezvous_timeout: f64,
    /// Seconds a client on q waits for a parked connection.
    #[arg(long, env = "TAAS_CLIENT_WAIT", default_value_t = 10.0)]
    client_wait: f64,
    /// Front-end connections open at once, TLS handshakes included (a held connection costs
    /// up to ~36 KiB of memory: size the cap to the host).
    #[arg(long, env = "TAAS_MAX_CONNECTIONS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Front-end connections one source (an IPv4 address or an IPv6 /64) may hold at once;
    /// more are closed before the TLS handshake. Sized for carrier-grade NAT, where many
    /// phones share one address.
    #[arg(long, env = "TAAS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections_per_source: u32,
    /// Seconds a request's body may take once its head is in (then 408 and a close).
    #[arg(long, env = "TAAS_REQUEST_BODY_TIMEOUT", default_value_t = 10.0)]
    request_body_timeout: f64,
    /// Threads for the labels' connections: each label's connections run on one of them
    /// [default: one per CPU].
    #[arg(long, env = "TAAS_DATA_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    data_threads: Option<u16>,
    #[command(flatten)]
    clients: ClientArgs,
    /// Also provision a "demo" label and run a built-in hidden server (an agent in front of a
    /// tiny HTTPS page), to see the whole path work with curl or a browser.
    #[arg(long, env = "TAAS_DEMO")]
    demo: bool,
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
    #[command(flatten)]
    names: RelayNames,
}

/// Connection cap of the gateway and label-relay pods (see `config::POD_FRONTEND_CONNECTIONS`).
const POD_MAX_CONNECTIONS: u32 = taas_relay::config::POD_FRONTEND_CONNECTIONS as u32;

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
        frontend_connections: args.max_connections as usize,
        frontend_connections_per_source: args.max_connections_per_source as usize,
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
    })
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let options = serve_options(&args)?;
    let relay = serve::start(options).await?;
    let _demo = if args.demo {
        Some(taas_relay::demo::start(&relay).await?)
    } else {
        None
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
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
    let gateway = taas_relay::gateway::start(taas_relay::gateway::GatewayOptions {
        listen: args.listen,
        registrar: args.names.registrar,
        domain: args.names.domain,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        state_dir: args.tls.state_dir,
        routes: taas_relay::gateway::RouteSource::File(args.routes_file),
        reload_interval: seconds("--reload-interval", args.reload_interval)?,
        metrics: metrics_addr(&args.metrics)?,
        timeouts: Timeouts::default(),
        max_connections: args.max_connections as usize,
        max_connections_per_source: args.max_connections_per_source as usize,
        install_secret_file: args.gateway_secret_file,
        upstream: taas_relay::gateway::UpstreamSettings {
            redirect_limit: taas_relay::rate_limit::RateLimit {
                per_second: args.redirect_rate,
                burst: args.redirect_burst,
                ..Default::default()
            },
            ..Default::default()
        },
    })
    .await?;
    shutdown_signal().await;
    gateway.drain();
    tracing::info!(
        seconds = shutdown_delay.as_secs_f64(),
        "stopping: unready, still serving while traffic moves elsewhere"
    );
    tokio::select! {
        () = tokio::time::sleep(shutdown_delay) => {}
        () = shutdown_signal() => tracing::info!("second signal: stopping now"),
    }
    Ok(())
}

async fn run_label_relay(args: LabelRelayArgs) -> anyhow::Result<()> {
    let mut timeouts = Timeouts::default();
    let mut limits = Limits {
        frontend_connections: args.max_connections as usize,
        ..Limits::default()
    };
    args.clients.apply(&mut timeouts, &mut limits)?;
    let _relay = taas_relay::label_relay::start(taas_relay::label_relay::LabelRelayOptions {
        label_file: args.label_file,
        secret_dir: args.secret_dir,
        external_file: args.external_file,
        control: args.control,
        gateway_token: args
            .gateway_token
            .as_deref()
            .map(GatewayToken::new)
            .transpose()
            .context("--gateway-token")?,
        trusted: args.trusted_proxies,
        registrar: args.names.registrar,
        domain: args.names.domain,
        redirect_host: args.redirect_host,
        p_ports: args.p_ports,
        client_port: args.client_port,
        metrics: metrics_addr(&args.metrics)?,
        reload_interval: seconds("--reload-interval", args.reload_interval)?,
        timeouts,
        limits,
    })
    .await?;
    shutdown_signal().await;
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
    process::init(cli.log_format);
    process::raise_fd_limit();
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
