#!/usr/bin/env bash
# Runs every check of the default test suite: formatting, lints, and all tests (unit and
# end-to-end over real sockets on loopback). Benchmarks, soaks and long fuzzing runs have
# their own commands (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked
