//! The churn soak (issue 7): N checksummed connections through a spawned `taas-relay serve`
//! while in-process agents come and go; then the relay's fds, bound p ports and RSS are
//! compared with their baselines. All traffic is on loopback; the run is bounded in count and
//! time and stops by itself.
//!
//! ```sh
//! cargo build --release -p taas-relay --bins
//! cargo run --release -p taas-relay --example soak -- --connections 100000
//! ```
//!
//! Flags: `--connections N` (default 100000), `--labels N` (4), `--concurrency N` (32),
//! `--parked N` (8, per agent), `--churn-every N` (connections between agent replacements;
//! default N/40), `--relay-bin PATH` (default: `taas-relay` next to this example's directory,
//! i.e. `target/release/taas-relay`), `--rust-log LEVEL` (the relay's, default `info`),
//! `--max-seconds S` (1800). Exits non-zero if any byte came back wrong, if the fds or bound p
//! ports did not return to their baselines, or if RSS grew by more than 32 MiB over its warm
//! baseline.

use std::path::PathBuf;
use std::time::Duration;
use taas_testkit::soak;

fn usage() -> ! {
    eprintln!(
        "usage: soak [--connections N] [--labels N] [--concurrency N] [--parked N] \
         [--churn-every N] [--relay-bin PATH] [--rust-log LEVEL] [--max-seconds S]"
    );
    std::process::exit(2)
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mut connections = 100_000u64;
    let mut labels = 4usize;
    let mut concurrency = 32usize;
    let mut parked = 8usize;
    let mut churn_every = None;
    let mut relay_bin = None;
    let mut rust_log = "info".to_string();
    let mut max_seconds = 1800u64;
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let number = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--connections" => connections = number(value()),
            "--labels" => labels = number(value()) as usize,
            "--concurrency" => concurrency = number(value()) as usize,
            "--parked" => parked = number(value()) as usize,
            "--churn-every" => churn_every = Some(number(value())),
            "--relay-bin" => relay_bin = Some(PathBuf::from(value())),
            "--rust-log" => rust_log = value(),
            "--max-seconds" => max_seconds = number(value()),
            _ => usage(),
        }
    }
    if connections == 0 || labels == 0 || concurrency == 0 || parked == 0 {
        usage();
    }
    let relay_bin = relay_bin.unwrap_or_else(|| {
        // target/<profile>/examples/soak → target/<profile>/taas-relay
        let exe = std::env::current_exe().expect("own path");
        exe.parent()
            .and_then(|examples| examples.parent())
            .map(|profile| profile.join("taas-relay"))
            .expect("target directory")
    });
    if !relay_bin.exists() {
        eprintln!(
            "soak: {} not found: build it first (cargo build --release -p taas-relay --bins) \
             or pass --relay-bin",
            relay_bin.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    taas_process::raise_fd_limit();
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = soak::SoakConfig::new(&relay_bin, dir.path(), connections);
    config.labels = labels;
    config.concurrency = concurrency;
    config.parked = parked;
    if let Some(every) = churn_every {
        config.churn_every = every.max(1);
    }
    config.rust_log = rust_log;
    config.max_duration = Duration::from_secs(max_seconds);
    config.verbose = true;
    eprintln!(
        "soak: {connections} connections, {labels} labels, {concurrency} clients, {parked} \
         parked per agent, an agent replaced every {} connections, relay {}",
        config.churn_every,
        relay_bin.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(soak::soak(config));
    println!("{}", report.table());
    let grown = report.after.rss_kib.saturating_sub(report.warm.rss_kib);
    let mut ok = true;
    let mut fail = |what: String| {
        eprintln!("soak: FAILED: {what}");
        ok = false;
    };
    if report.corrupt > 0 || report.connections < connections {
        fail(format!(
            "{} of {connections} connections checked, {} corrupt",
            report.connections, report.corrupt
        ));
    }
    if report.after.fds > report.cold.fds {
        fail(format!(
            "relay fds {} after, {} at start",
            report.after.fds, report.cold.fds
        ));
    }
    if !report.p_listening_after.is_empty() || !report.p_accepting_after.is_empty() {
        fail(format!(
            "p ports still bound: {:?} {:?}",
            report.p_listening_after, report.p_accepting_after
        ));
    }
    if grown > 32 * 1024 {
        fail(format!(
            "relay RSS grew by {grown} KiB over its warm baseline"
        ));
    }
    if ok {
        println!("soak: PASSED");
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
