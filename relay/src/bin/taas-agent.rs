//! `taas-agent`: the hidden-server side of TAAS. Flags (and `TAAS_*` variables) →
//! `taas_relay::agent::AgentConfig` → `taas_relay::agent::run`. Everything else (the
//! supervisor, the registrar client, the rendezvous) lives in the library's `agent` module.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use taas_process::{self as process, LogFormat};
use taas_relay::agent::{self, AgentConfig, Trust};
use taas_relay::config::Algorithm;
use taas_relay::splice::SpliceMode;

/// Keeps connections registered and parked at a TAAS relay, and forwards each connection a
/// mobile client is paired onto to a local service.
///
/// Every flag can also be given as an environment variable TAAS_<FLAG> (e.g. TAAS_PARKED=16).
/// Prefer TAAS_SECRET or --secret-file to --secret: command lines are visible to other users.
/// Logs go to stderr; the level comes from RUST_LOG (default info).
#[derive(Debug, Parser)]
#[command(name = "taas-agent", version, about, long_about)]
#[command(group(ArgGroup::new("credentials").required(true).args(["secret_file", "secret", "label_file"])))]
struct Args {
    /// The registrar, e.g. https://taas-registrar.localhost:8443 (the Host header and TLS
    /// server name come from it).
    #[arg(long, env = "TAAS_RELAY", value_name = "URL")]
    relay: String,

    /// Connect to this address instead of resolving the URL's host (HOST:PORT, IP:PORT, or a
    /// bare host/IP with the URL's port).
    #[arg(long, env = "TAAS_CONNECT", value_name = "ADDR")]
    connect: Option<String>,

    /// The hidden server's ID (TOTP username), as provisioned. Overrides --label-file.
    #[arg(long, env = "TAAS_ID", required_unless_present = "label_file")]
    id: Option<String>,

    /// The label to register, as provisioned. Overrides --label-file.
    #[arg(long, env = "TAAS_LABEL", required_unless_present = "label_file")]
    label: Option<String>,

    /// A file holding the base32 TOTP secret.
    #[arg(long, env = "TAAS_SECRET_FILE", value_name = "FILE")]
    secret_file: Option<PathBuf>,

    /// The base32 TOTP secret (prefer the TAAS_SECRET environment variable).
    #[arg(long, env = "TAAS_SECRET", value_name = "B32", hide_env_values = true)]
    secret: Option<String>,

    /// The YAML file `taas-relay label new` wrote (TaasLabel + Secret): ID, label, secret,
    /// algorithm and period are read from it.
    #[arg(long, env = "TAAS_LABEL_FILE", value_name = "FILE")]
    label_file: Option<PathBuf>,

    /// TOTP algorithm (without --label-file).
    #[arg(
        long,
        env = "TAAS_ALGORITHM",
        value_enum,
        conflicts_with = "label_file"
    )]
    algorithm: Option<Algorithm>,

    /// TOTP step in seconds (without --label-file; default 30).
    #[arg(long, env = "TAAS_PERIOD", value_name = "SECS", conflicts_with = "label_file",
          value_parser = clap::value_parser!(u64).range(1..))]
    period: Option<u64>,

    /// TOTP digits.
    #[arg(long, env = "TAAS_DIGITS", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(6..=8))]
    digits: u32,

    /// The local service each paired connection is forwarded to, e.g. 127.0.0.1:8888.
    #[arg(long, env = "TAAS_FORWARD", value_name = "ADDR")]
    forward: String,

    /// Connections kept registered and waiting.
    #[arg(long, env = "TAAS_PARKED", value_name = "N", default_value_t = agent::DEFAULT_PARKED,
          value_parser = parse_parked)]
    parked: usize,

    /// Trust this certificate (PEM) for the registrar, e.g. a self-signed relay's
    /// certificate; default: the system's roots.
    #[arg(long, env = "TAAS_CA", value_name = "FILE")]
    ca: Option<PathBuf>,

    /// Serve /metrics, /healthz and /readyz on this address (off by default).
    #[arg(long, env = "TAAS_METRICS", value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Longest wait between failed attempts, seconds.
    #[arg(long, env = "TAAS_MAX_BACKOFF", value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_backoff: u64,

    /// Threads running the agent. The default, 1, runs everything on one thread: no
    /// cross-thread wake-ups (the agent's work per connection is small), and one core moves
    /// several Gbit/s; raise it only for many pairs of bulk traffic at once.
    #[arg(long, env = "TAAS_THREADS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,

    /// How paired connections move their bytes: auto (copy each direction's first 64 KiB,
    /// then splice(2) inside the kernel; Linux), copy (through user space only), kernel
    /// (splice(2) from the first byte).
    #[arg(long, env = "TAAS_SPLICE", value_enum, default_value_t = SpliceMode::Auto)]
    splice: SpliceMode,

    /// Log format on stderr.
    #[arg(long, env = "TAAS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn parse_parked(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err("expected a number from 1 to 4096".into()),
    }
}

fn config(args: Args) -> anyhow::Result<AgentConfig> {
    let mut config = if let Some(path) = &args.label_file {
        let label = agent::read_label_file(path)?;
        AgentConfig::from_label(&args.relay, &label, &args.forward)
    } else {
        let secret = match (&args.secret_file, &args.secret) {
            (Some(path), _) => agent::read_secret_file(path)?,
            (None, Some(b32)) => agent::decode_secret(b32).context("--secret / TAAS_SECRET")?,
            (None, None) => anyhow::bail!("give --secret-file, --secret or --label-file"),
        };
        let mut config = AgentConfig::new(&args.relay, "", "", secret, &args.forward);
        if let Some(algorithm) = args.algorithm {
            config.algorithm = algorithm;
        }
        if let Some(period) = args.period {
            config.period = period;
        }
        config
    };
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(label) = args.label {
        config.label = label;
    }
    config.connect = args.connect;
    config.digits = args.digits;
    config.parked = args.parked;
    config.trust = match args.ca {
        Some(path) => Trust::PemFile(path),
        None => Trust::System,
    };
    config.metrics = args.metrics;
    config.max_backoff = Duration::from_secs(args.max_backoff);
    config.splice = args.splice;
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    process::init(args.log_format);
    process::raise_fd_limit();
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(n));
            builder
        }
    }
    .enable_all()
    .build();
    let result = match (runtime, config(args)) {
        (Ok(runtime), Ok(config)) => runtime
            .block_on(agent::run(config, process::shutdown_signal()))
            .map_err(anyhow::Error::from),
        (Err(error), _) => Err(anyhow::Error::from(error).context("starting the async runtime")),
        (_, Err(error)) => Err(error),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line with the causes, no backtrace: these are configuration mistakes.
            eprintln!("taas-agent: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn every_flag_has_a_taas_env() {
        assert_eq!(
            taas_process::flags_without_taas_env(&Args::command()),
            Vec::<String>::new()
        );
    }

    /// The required flags but a credential, then `more`.
    fn parse_with(more: &[&str]) -> Result<Args, clap::Error> {
        let required = [
            "--relay",
            "https://r",
            "--id",
            "i",
            "--label",
            "l",
            "--forward",
            "h:1",
        ];
        Args::try_parse_from(["taas-agent"].iter().chain(&required).chain(more))
    }

    #[test]
    fn flags() {
        let args = Args::try_parse_from([
            "taas-agent",
            "--relay",
            "https://r.example:8443",
            "--id",
            "id-1",
            "--label",
            "home",
            "--secret",
            "GEZDGNBV",
            "--forward",
            "127.0.0.1:8888",
            "--parked",
            "3",
            "--algorithm",
            "SHA256",
        ])
        .unwrap();
        let config = config(args).unwrap();
        assert_eq!(config.parked, 3);
        assert_eq!(config.algorithm, Algorithm::SHA256);
        assert_eq!(config.secret, b"12345");
        assert_eq!(config.id, "id-1");
        assert_eq!(config.splice, SpliceMode::Auto);

        // A credential source is required.
        assert!(parse_with(&[]).is_err());
        // Only one.
        assert!(parse_with(&["--secret", "GEZDGNBV", "--secret-file", "/x"]).is_err());
        assert!(parse_with(&["--secret", "GEZDGNBV", "--parked", "0"]).is_err());
    }

    #[test]
    fn splice_spellings() {
        let parse =
            |mode: &str| parse_with(&["--secret", "GEZDGNBV", "--splice", mode]).map(|a| a.splice);
        assert_eq!(parse("auto").unwrap(), SpliceMode::Auto);
        assert_eq!(parse("copy").unwrap(), SpliceMode::Copy);
        assert_eq!(parse("kernel").unwrap(), SpliceMode::Kernel);
        assert!(parse("zero").is_err());
    }

    #[test]
    fn algorithm_spellings() {
        let parse = |algorithm: &str| {
            parse_with(&["--secret", "GEZDGNBV", "--algorithm", algorithm]).map(|a| a.algorithm)
        };
        assert_eq!(parse("SHA1").unwrap(), Some(Algorithm::SHA1));
        assert_eq!(parse("SHA256").unwrap(), Some(Algorithm::SHA256));
        assert_eq!(parse("SHA512").unwrap(), Some(Algorithm::SHA512));
        assert!(parse("MD5").is_err());
    }
}
