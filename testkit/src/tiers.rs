//! Test tiers. `cargo test --workspace` on its own runs every test that needs nothing beyond
//! Rust and curl. A test that needs a long build of its own (the release binary, Kubernetes)
//! runs only when its variable is set, and `scripts/test.sh` sets them all, so CI runs every
//! tier; without it the test returns at once and says so in one line, printed past the test
//! harness's output capture so that a skip is never silent.

use std::ffi::OsStr;
use std::io::Write;

/// The README's first command as a test (`relay/tests/readme.rs`): a release build.
pub const README: &str = "TAAS_TEST_README";

/// Whether an opt-in variable's value asks for its tier: set, and neither empty nor `0`.
pub fn wanted(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether the tier behind `var` runs. If not, prints one line (not captured by the test
/// harness) saying that `test` was skipped and how to run it.
pub fn opted_in(var: &str, test: &str, how: &str) -> bool {
    if wanted(std::env::var_os(var).as_deref()) {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: skipped (opt-in tier); to run it: {var}=1 {how} (scripts/test.sh sets {var})"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_runs_when_its_variable_is_set_to_anything_but_empty_or_0() {
        assert!(!wanted(None));
        assert!(!wanted(Some(OsStr::new(""))));
        assert!(!wanted(Some(OsStr::new("0"))));
        assert!(wanted(Some(OsStr::new("1"))));
        assert!(wanted(Some(OsStr::new("yes"))));
    }
}
