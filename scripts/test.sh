#!/usr/bin/env bash
# Runs every check of the default test suite: formatting, lints, and all tests (unit and
# end-to-end over real sockets on loopback). Benchmarks, soaks and long fuzzing runs have
# their own commands (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
# helm, kubectl, kubernetes-validate (into .tools/), and the Kubernetes components for the
# operator's API-server test and the cluster end-to-end test (built once per machine from
# Debian's sources, cached in ~/.cache/taas; about 8 minutes the first time).
PATH="$(bash scripts/k8s/tools.sh):$PATH"
export PATH
bash scripts/k8s/build-kubernetes.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# The opt-in tiers (README, "The two commands"): the operator against the real API server
# built above, and the README's first command run as a newcomer would (a release build,
# which e2e/test.sh below uses too). Without these, `cargo test` skips them, saying so.
export TAAS_TEST_APISERVER=1 TAAS_TEST_README=1

echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee -a "$log"

echo "== Helm chart"
bash scripts/test-chart.sh 2>&1 | tee -a "$log"

# A real browser (Debian's headless Chromium, via Playwright) and curl reach a direct label
# with a plain URL through the relay and agent binaries (about 10 s after the debug build).
echo "== browser (scripts/browser/run.sh)"
bash scripts/browser/run.sh 2>&1 | tee -a "$log"

# The whole system on a real single-node cluster that runs pods (needs root; builds the image
# from the release binaries; about 3 minutes plus the release build).
echo "== end to end on a real cluster (e2e/test.sh)"
bash e2e/test.sh 2>&1 | tee -a "$log"

# One closing line for the whole run (cargo prints one per test binary, the last often 0).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     /^(chart|browser|e2e): [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
