//! Seeded property runs with bounded case counts: each harness has its own fixed seed (from
//! its name) so a failure is reproducible, and its case count can be raised from the
//! environment for a long run (docs/robustness.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Overrides the case count of every pure property harness (default 2,000 each).
pub const CASES_ENV: &str = "TAAS_PROP_CASES";
/// Overrides the case count of the end-to-end HTTP harness (a real relay over TLS).
pub const E2E_CASES_ENV: &str = "TAAS_PROP_E2E_CASES";
/// Overrides the seed (a u64); by default every harness has its own fixed seed.
pub const SEED_ENV: &str = "TAAS_PROP_SEED";

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The case count: `env` if set, else `default`.
pub fn cases(env: &str, default: u32) -> u32 {
    env_u64(env).map_or(default, |n| n.clamp(1, u64::from(u32::MAX)) as u32)
}

/// FNV-1a, 64 bits: a harness name to its seed, an echoed payload to its checksum.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A runner with a fixed seed (per harness name, or `TAAS_PROP_SEED`), `cases` cases, no
/// failure files, and shrinking bounded so a failure is reported quickly.
pub fn runner(name: &str, cases: u32) -> (TestRunner, u64) {
    let seed = env_u64(SEED_ENV).unwrap_or_else(|| fnv1a(name.as_bytes()));
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&fnv1a(name.as_bytes()).to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        max_global_rejects: cases.saturating_mul(20).max(1024),
        ..Config::default()
    };
    (
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)),
        seed,
    )
}

/// Runs `test` on `cases` values of `strategy`; panics with the (shrunk) failing input.
/// Returns how many times `test` ran (shrinking included). Prints one summary line.
pub fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64 {
    let (mut runner, seed) = runner(name, cases);
    let executions = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        executions.fetch_add(1, Ordering::Relaxed);
        test(value)
    });
    let executions = executions.into_inner();
    eprintln!(
        "property {name}: {executions} executions ({cases} cases), seed {seed}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(error) = result {
        panic!("property {name} failed (seed {seed}): {error}");
    }
    executions
}
