//! What every TAAS process sets up, whatever it runs: logs (stderr, level from `RUST_LOG`,
//! default `info`, text or JSON lines), the open-file limit, the shutdown signal, and the
//! `/metrics`, `/healthz`, `/readyz` endpoint ([`metrics`]).
//!
//! A crate of its own so that the operator, which needs these and nothing of the data plane,
//! does not build the relay to get them. No data-plane code belongs here.
#![forbid(unsafe_code)]

pub mod metrics;

use std::io::IsTerminal as _;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The value of `--log-format` / `TAAS_LOG_FORMAT`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The log filter from a `RUST_LOG` value: comma-separated `LEVEL` and `TARGET=LEVEL`
/// directives (e.g. `warn`, `info,taas_relay=debug,hyper=trace`). Unset, empty or
/// unparsable: `info`. (Span and field filters of `EnvFilter` are not supported: they would
/// bring a regex engine into every binary.)
pub fn log_filter(value: Option<&str>) -> Targets {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

/// Installs the global subscriber; a second call (tests) is a no-op. Colours only on a
/// terminal: logs collected from a pipe or file (kubectl logs, journald) stay plain text.
pub fn init(format: LogFormat) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json()).try_init(),
    };
}

/// Raises the soft limit on open files to the hard limit: a relay holds two descriptors per
/// pair and one per parked connection, far beyond the usual 1024. Says what it got.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (how systemd and Kubernetes stop a process).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// The flags of `command` and of its subcommands that do not read `TAAS_<FLAG>` (`--max-parked`
/// reads `TAAS_MAX_PARKED`), as `"PATH --flag"`. Every flag has its variable, because
/// containers and unit files configure TAAS through the environment; each binary's tests
/// assert this list is empty.
pub fn flags_without_taas_env(command: &clap::Command) -> Vec<String> {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let expected = format!("TAAS_{}", long.to_ascii_uppercase().replace('-', "_"));
            if arg.get_env().and_then(|e| e.to_str()) != Some(expected.as_str()) {
                missing.push(format!("{path} --{long}"));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(command, command.get_name(), &mut missing);
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;
    use tracing::Level;

    #[test]
    fn rust_log_values() {
        let info = log_filter(None);
        assert!(info.would_enable("taas_relay", &Level::INFO));
        assert!(!info.would_enable("taas_relay", &Level::DEBUG));
        for fallback in ["", "  ", "taas_relay=loud"] {
            assert_eq!(
                log_filter(Some(fallback)).default_level(),
                Some(LevelFilter::INFO),
                "{fallback:?}"
            );
        }
        let warn = log_filter(Some("warn"));
        assert!(warn.would_enable("hyper", &Level::WARN));
        assert!(!warn.would_enable("hyper", &Level::INFO));
        let mixed = log_filter(Some("info,taas_relay::label=debug,hyper=off"));
        assert!(mixed.would_enable("taas_relay::label", &Level::DEBUG));
        assert!(!mixed.would_enable("taas_relay::relay", &Level::DEBUG));
        assert!(!mixed.would_enable("hyper::proto", &Level::ERROR));
    }

    #[test]
    fn a_flag_without_its_variable_is_named() {
        let command = clap::Command::new("t")
            .arg(
                clap::Arg::new("a")
                    .long("max-parked")
                    .env("TAAS_MAX_PARKED"),
            )
            .subcommand(
                clap::Command::new("sub")
                    .arg(clap::Arg::new("b").long("other"))
                    .arg(clap::Arg::new("c").long("wrong").env("TAAS_OTHER")),
            );
        assert_eq!(
            super::flags_without_taas_env(&command),
            ["t sub --other", "t sub --wrong"]
        );
    }
}
