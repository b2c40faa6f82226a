//! `taas-operator`: runs one relay per `TaasLabel` (see the library's documentation);
//! `taas-operator crd` prints the CustomResourceDefinition, `taas-operator rbac` the RBAC
//! rules it needs.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use prometheus_client::registry::Registry;
use taas_operator::edge::{EdgeSettings, PortRange};
use taas_operator::metrics::{self, Metrics};
use taas_operator::policy::{is_dns_subdomain, TenantPolicy};
use taas_operator::settings::{RelayResources, Settings};
use taas_process::LogFormat;
use taas_protocol::answer::RedirectHost;
use taas_protocol::gateway_auth::InstallSecret;

#[derive(Parser)]
#[command(
    version,
    about = "TAAS operator: reconciles TaasLabel objects into a relay Deployment, its Services \
             and ConfigMap each, reports their addresses in the labels' status, and publishes \
             the gateways' routes",
    long_about = None,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the TaasLabel CustomResourceDefinition (YAML, as crds/taaslabels.yaml).
    Crd,
    /// Print the RBAC rules the operator needs (a ClusterRole's `rules:`, YAML).
    Rbac,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch TaasLabels in this namespace only [default: all namespaces].
    #[arg(long, env = "TAAS_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the routes ConfigMap [default: $POD_NAMESPACE, else taas-system].
    #[arg(long, env = "TAAS_OPERATOR_NAMESPACE")]
    operator_namespace: Option<String>,
    /// Name of the ConfigMap holding the gateways' routes (key routes.yaml).
    #[arg(long, env = "TAAS_ROUTES_CONFIGMAP", default_value = "taas-routes")]
    routes_configmap: String,
    /// Image of the relay pods (taas-relay).
    #[arg(long, env = "TAAS_RELAY_IMAGE", default_value = concat!("taas-relay:", env!("CARGO_PKG_VERSION")))]
    relay_image: String,
    /// Pull policy of the relay image.
    #[arg(long, env = "TAAS_RELAY_IMAGE_PULL_POLICY", value_enum, default_value_t = PullPolicy::IfNotPresent)]
    relay_image_pull_policy: PullPolicy,
    /// Host in the relays' 307 Location: the requested LABEL.<domain> (end-to-end TLS checks
    /// that name; *.<domain> must reach each label's client port, e.g. NodePort or load
    /// balancers sharing the gateway's address), or each label Service's own address.
    #[arg(long, env = "TAAS_RELAY_REDIRECT_HOST", value_enum, default_value_t = RedirectHost::Requested)]
    relay_redirect_host: RedirectHost,
    /// Host name of the registrar role, passed to every relay (as the gateways').
    #[arg(
        long,
        env = "TAAS_REGISTRAR",
        default_value = "taas-registrar.localhost"
    )]
    registrar: String,
    /// Servers domain, passed to every relay (as the gateways').
    #[arg(long, env = "TAAS_DOMAIN", default_value = "taas.localhost")]
    domain: String,
    /// CPU request of a relay container.
    #[arg(long, env = "TAAS_RELAY_CPU_REQUEST", default_value = "10m")]
    relay_cpu_request: String,
    /// Memory request of a relay container.
    #[arg(long, env = "TAAS_RELAY_MEMORY_REQUEST", default_value = "32Mi")]
    relay_memory_request: String,
    /// CPU limit of a relay container ("none": no limit).
    #[arg(long, env = "TAAS_RELAY_CPU_LIMIT", default_value = "500m")]
    relay_cpu_limit: String,
    /// Memory limit of a relay container ("none": no limit).
    #[arg(long, env = "TAAS_RELAY_MEMORY_LIMIT", default_value = "128Mi")]
    relay_memory_limit: String,
    /// Node address types for NodePort Services, most preferred first (comma-separated).
    #[arg(
        long,
        env = "TAAS_NODE_ADDRESS_TYPE",
        value_delimiter = ',',
        default_value = "ExternalIP,InternalIP"
    )]
    node_address_type: Vec<String>,
    /// Seconds before a label that needs a user's fix (missing Secret, foreign object, LABEL
    /// conflict, rejected object) is looked at again; watches notice most fixes sooner.
    #[arg(long, env = "TAAS_USER_FIX_REQUEUE", default_value_t = 300)]
    user_fix_requeue: u64,
    /// /metrics, /healthz, /readyz (plain HTTP); "off" to disable.
    #[arg(long, env = "TAAS_METRICS", default_value = "0.0.0.0:9464")]
    metrics: String,
    /// Elect one active replica through a Lease in --operator-namespace (for replicas > 1).
    #[arg(long, env = "TAAS_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "TAAS_LEADER_ELECT_LEASE", default_value = "taas-operator")]
    leader_elect_lease: String,
    /// File holding this install's gateway secret (the chart mounts its Secret here). Each
    /// relay gets the token derived from it for its LABEL (env TAAS_GATEWAY_TOKEN), so its
    /// control port answers only this install's gateways [default: relays get no token].
    #[arg(long, env = "TAAS_GATEWAY_SECRET_FILE")]
    gateway_secret_file: Option<PathBuf>,
    /// The cluster's DNS domain: routes name relays taas-X-control.N.svc.<DOMAIN>. (fully
    /// qualified, so no DNS search path can redirect them).
    #[arg(long, env = "TAAS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// YAML file of what each namespace's TaasLabels may claim (LABELs) and ask for (Service
    /// types, annotation keys, a pinned clientPort); see the chart's labelPolicy and
    /// servicePolicy [default: every namespace may claim any LABEL and ask for anything].
    #[arg(long, env = "TAAS_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    /// Edge mode: the gateway's Service (in the operator's namespace) through which all
    /// public traffic enters. Each relay gets an edge port (21001) for the gateway, and a
    /// label without a service.type gets no Service of its own: it is reached at this
    /// Service's address, on the shared port and its slice of the rendezvous range
    /// [default: off, every label has its own Service].
    #[arg(long, env = "TAAS_EDGE_SERVICE")]
    edge_service: Option<String>,
    /// Edge mode: the gateway's shared client port (its --shared-port), the same number on
    /// the Service (port, targetPort and, for NodePort, nodePort).
    #[arg(long, env = "TAAS_EDGE_SHARED_PORT", default_value_t = 9443)]
    edge_shared_port: u16,
    /// Edge mode: the gateway's shared rendezvous ports LO-HI (its --rendezvous-ports), the
    /// same numbers on the Service. Each label's slice starts at a stable offset in it.
    #[arg(
        long,
        env = "TAAS_EDGE_RENDEZVOUS_PORTS",
        default_value = "20000-20255"
    )]
    edge_rendezvous_ports: PortRange,
    /// Seconds a stopping relay lets its active pairs finish (each relay's --drain-timeout);
    /// relay pods get this plus 5 s as their termination grace period.
    #[arg(long, env = "TAAS_RELAY_DRAIN_TIMEOUT", value_name = "SECS",
          default_value_t = taas_operator::settings::DEFAULT_RELAY_DRAIN_TIMEOUT)]
    relay_drain_timeout: u64,
    /// Relay replicas (pods) of a label reached through the gateway that does not set
    /// spec.replicas (1-16). A label with a Service of its own runs one unless it asks.
    #[arg(long, env = "TAAS_RELAY_REPLICAS", value_name = "N",
          default_value_t = taas_operator::settings::DEFAULT_RELAY_REPLICAS,
          value_parser = clap::value_parser!(u32).range(
              i64::from(taas_crds::limits::REPLICAS_MIN)..=i64::from(taas_crds::limits::REPLICAS_MAX)))]
    relay_replicas: u32,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, env = "TAAS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The edge settings from the flags: `None` without `--edge-service` (or with it empty or
/// `off`).
fn edge_settings(args: &RunArgs) -> anyhow::Result<Option<EdgeSettings>> {
    let Some(service) = args
        .edge_service
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "off")
    else {
        return Ok(None);
    };
    anyhow::ensure!(
        is_dns_subdomain(service) && !service.contains('.'),
        "--edge-service {service:?}: expected a Service name"
    );
    let range = args.edge_rendezvous_ports;
    let shared = args.edge_shared_port;
    anyhow::ensure!(shared > 0, "--edge-shared-port must be a port (1-65535)");
    anyhow::ensure!(
        !(range.first()..=range.last()).contains(&shared),
        "--edge-shared-port {shared} is inside --edge-rendezvous-ports {range}"
    );
    Ok(Some(EdgeSettings {
        service: service.to_string(),
        shared_port: shared,
        rendezvous: range,
    }))
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "PascalCase")]
enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

fn limit(value: &str) -> Option<String> {
    match value.trim() {
        "" | "none" => None,
        value => Some(value.to_string()),
    }
}

fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
    anyhow::ensure!(
        args.user_fix_requeue > 0,
        "--user-fix-requeue must be positive"
    );
    anyhow::ensure!(
        !args.node_address_type.is_empty(),
        "--node-address-type needs at least one type"
    );
    let cluster_domain = args
        .cluster_domain
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    anyhow::ensure!(
        is_dns_subdomain(&cluster_domain),
        "--cluster-domain {:?}: expected a DNS name such as cluster.local",
        args.cluster_domain
    );
    let gateway_secret = match &args.gateway_secret_file {
        Some(path) => Some(InstallSecret::from_file(path).context("--gateway-secret-file")?),
        None => None,
    };
    let policy = match &args.policy_file {
        Some(path) => TenantPolicy::from_file(path).context("--policy-file")?,
        None => TenantPolicy::default(),
    };
    Ok(Settings {
        relay_image: args.relay_image.clone(),
        image_pull_policy: match args.relay_image_pull_policy {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
        .to_string(),
        redirect_host: args.relay_redirect_host,
        registrar: args.registrar.to_ascii_lowercase(),
        domain: args.domain.to_ascii_lowercase(),
        resources: RelayResources {
            cpu_request: args.relay_cpu_request.clone(),
            memory_request: args.relay_memory_request.clone(),
            cpu_limit: limit(&args.relay_cpu_limit),
            memory_limit: limit(&args.relay_memory_limit),
        },
        node_address_types: args
            .node_address_type
            .iter()
            .map(|t| t.trim().to_string())
            .collect(),
        operator_namespace: args
            .operator_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "taas-system".to_string()),
        routes_configmap: args.routes_configmap.clone(),
        user_fix_requeue: Duration::from_secs(args.user_fix_requeue),
        relay_log_env: relay_log_env(args.log_format, std::env::var("RUST_LOG").ok()),
        gateway_secret,
        cluster_domain,
        policy,
        edge: edge_settings(args)?,
        relay_drain_timeout: args.relay_drain_timeout,
        relay_replicas: args.relay_replicas,
    })
}

/// The operator's own log settings, handed on to the relay pods it runs.
fn relay_log_env(format: LogFormat, filter: Option<String>) -> Vec<(String, String)> {
    let mut env = vec![("TAAS_LOG_FORMAT".to_string(), format.as_arg().to_string())];
    if let Some(filter) = filter.filter(|f| !f.trim().is_empty()) {
        env.push(("RUST_LOG".to_string(), filter));
    }
    env
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    let metrics_addr: Option<SocketAddr> = match args.metrics.trim() {
        "off" | "" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--metrics {addr:?}: expected ADDR:PORT or off"))?,
        ),
    };
    // KUBECONFIG, ~/.kube/config, or the in-cluster service account.
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let mut registry = Registry::default();
    let reconcile_metrics = Metrics::new(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let _metrics_task = match metrics_addr {
        Some(addr) => {
            let (local, task) = metrics::spawn(addr, registry, ready.clone())
                .await
                .with_context(|| format!("--metrics {addr}"))?;
            tracing::info!(%local, "metrics");
            Some(task)
        }
        None => None,
    };
    tracing::info!(
        image = %settings.relay_image,
        routes = %format!("{}/{}", settings.operator_namespace, settings.routes_configmap),
        cluster_domain = %settings.cluster_domain,
        gateway_tokens = settings.gateway_secret.is_some(),
        label_policy = settings.policy.restricts_labels(),
        edge = ?settings.edge,
        "starting"
    );
    let elector = args.leader_elect.then(|| {
        taas_operator::leader::Elector::new(
            client.clone(),
            &settings.operator_namespace,
            &args.leader_elect_lease,
            taas_operator::leader::identity(),
        )
    });
    taas_operator::controller::run(
        client,
        settings,
        args.namespace,
        reconcile_metrics,
        ready,
        elector,
    )
    .await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Crd) => {
            print!("{}", taas_crds::crd_yaml());
            Ok(())
        }
        Some(Command::Rbac) => {
            print!("{}", taas_operator::rbac::cluster_role_rules());
            Ok(())
        }
        None => {
            taas_process::init(cli.run.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")
                .and_then(|runtime| runtime.block_on(run(cli.run)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("taas-operator: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_a_taas_env() {
        assert_eq!(
            taas_process::flags_without_taas_env(&Cli::command()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn relay_pods_get_the_operators_log_settings() {
        assert_eq!(
            relay_log_env(LogFormat::Json, Some("info,taas_relay=debug".into())),
            [
                ("TAAS_LOG_FORMAT".to_string(), "json".to_string()),
                ("RUST_LOG".to_string(), "info,taas_relay=debug".to_string()),
            ]
        );
        assert_eq!(
            relay_log_env(LogFormat::Text, Some(" ".into())),
            [("TAAS_LOG_FORMAT".to_string(), "text".to_string())]
        );
    }

    #[test]
    fn defaults_make_the_default_settings() {
        let cli = Cli::try_parse_from(["taas-operator"]).unwrap();
        let mut got = settings(&cli.run).unwrap();
        got.operator_namespace = "taas-system".into(); // POD_NAMESPACE may be set
        assert_eq!(
            got.relay_log_env[0],
            ("TAAS_LOG_FORMAT".into(), "text".into())
        );
        got.relay_log_env.clear(); // RUST_LOG may be set
        assert_eq!(got, Settings::default());
        let cli = Cli::try_parse_from([
            "taas-operator",
            "--relay-cpu-limit",
            "none",
            "--node-address-type",
            "InternalIP",
            "--operator-namespace",
            "ops",
        ])
        .unwrap();
        let got = settings(&cli.run).unwrap();
        assert_eq!(got.resources.cpu_limit, None);
        assert_eq!(got.node_address_types, ["InternalIP"]);
        assert_eq!(got.operator_namespace, "ops");
        assert!(Cli::try_parse_from(["taas-operator", "crd"]).is_ok());
        let cli =
            Cli::try_parse_from(["taas-operator", "--cluster-domain", "K8s.Example.org."]).unwrap();
        assert_eq!(
            settings(&cli.run).unwrap().cluster_domain,
            "k8s.example.org"
        );
        // The chart passes Kubernetes' own spelling.
        for policy in ["Always", "IfNotPresent", "Never"] {
            let cli = Cli::try_parse_from([
                "taas-operator",
                &format!("--relay-image-pull-policy={policy}"),
                "--leader-elect",
            ])
            .unwrap();
            assert_eq!(settings(&cli.run).unwrap().image_pull_policy, policy);
            assert!(cli.run.leader_elect);
        }
    }

    fn settings_from(args: &[&str]) -> anyhow::Result<Settings> {
        let mut all = vec!["taas-operator"];
        all.extend_from_slice(args);
        settings(&Cli::try_parse_from(all).unwrap().run)
    }

    #[test]
    fn bad_cluster_domains_are_refused() {
        for bad in ["", "cluster_local", "-x.local", "a..b", "Cluster Local"] {
            let error = settings_from(&[&format!("--cluster-domain={bad}")]).unwrap_err();
            assert!(
                error.to_string().contains("expected a DNS name"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn the_gateway_secret_and_the_policy_are_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdefghijklmnopqrstuv\n").unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, "labels: {team-a: [home]}\n").unwrap();
        let got = settings_from(&[
            "--gateway-secret-file",
            secret.to_str().unwrap(),
            "--policy-file",
            policy.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            got.gateway_secret,
            Some(InstallSecret::new(b"0123456789abcdefghijklmnopqrstuv").unwrap())
        );
        assert!(got.policy.restricts_labels());
        assert!(!got.policy.allows_label("team-b", "home"));
        // A short secret, a missing file or a bad policy stop the operator at start.
        std::fs::write(&secret, "short").unwrap();
        let error = settings_from(&["--gateway-secret-file", secret.to_str().unwrap()]);
        assert!(format!("{:#}", error.unwrap_err()).contains("too short"));
        let error = settings_from(&["--gateway-secret-file", "/nonexistent/secret"]);
        assert!(format!("{:#}", error.unwrap_err()).contains("cannot read"));
        std::fs::write(&policy, "labels: {team-a: [\"Bad Label\"]}\n").unwrap();
        let error = settings_from(&["--policy-file", policy.to_str().unwrap()]);
        assert!(format!("{:#}", error.unwrap_err()).contains("is not a LABEL"));
    }

    #[test]
    fn edge_mode_is_on_with_a_gateway_service_and_takes_its_ports_from_flags() {
        assert_eq!(settings_from(&[]).unwrap().edge, None);
        assert_eq!(
            settings_from(&["--edge-service", "off"]).unwrap().edge,
            None
        );
        let got = settings_from(&["--edge-service", "taas-gateway"])
            .unwrap()
            .edge;
        assert_eq!(
            got,
            Some(EdgeSettings {
                service: "taas-gateway".into(),
                shared_port: 9443,
                rendezvous: "20000-20255".parse().unwrap(),
            })
        );
        let got = settings_from(&[
            "--edge-service=gw",
            "--edge-shared-port=30443",
            "--edge-rendezvous-ports=31000-31063",
        ])
        .unwrap()
        .edge
        .unwrap();
        assert_eq!((got.shared_port, got.rendezvous.count()), (30443, 64));
        let error = settings_from(&["--edge-service=gw", "--edge-shared-port=20010"]);
        assert!(error
            .unwrap_err()
            .to_string()
            .contains("is inside --edge-rendezvous-ports 20000-20255"));
        let error = settings_from(&["--edge-service=a.b"]);
        assert!(error
            .unwrap_err()
            .to_string()
            .contains("expected a Service name"));
        assert!(Cli::try_parse_from(["taas-operator", "--edge-rendezvous-ports=9-1"]).is_err());
    }

    #[test]
    fn relay_replicas_default_to_one_and_are_bounded_like_spec_replicas() {
        assert_eq!(settings_from(&[]).unwrap().relay_replicas, 1);
        assert_eq!(
            settings_from(&["--relay-replicas", "2"])
                .unwrap()
                .relay_replicas,
            2
        );
        assert_eq!(
            settings_from(&["--relay-replicas=16"])
                .unwrap()
                .relay_replicas,
            16
        );
        for bad in ["0", "17", "-1", "two"] {
            assert!(
                Cli::try_parse_from(["taas-operator", "--relay-replicas", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
