#!/usr/bin/env bash
# TAAS benchmark against direct, socat, rathole and bore, on loopback. See bench/README.md.
#
#   bench/run.sh            full mode: 3 interleaved rounds, 5 s per run (about 15 minutes)
#   bench/run.sh --short    quick check: 1 round, 2 s per run (about 3 minutes)
#   bench/run.sh [--rounds N] [--duration S] [--peers socat,taas] [--cases bulk1,rate]
#                [--skip redirects,registrations,parked,labels] [--parked-total N] [--port-base P]
#
# Installs what it needs (idempotent): Debian's iperf3, wrk, socat, nginx-light; rathole 0.5.0
# and bore-cli 0.6.0 into bench/.tools; the load tools in bench/tools; TAAS in release mode.
# Prints a markdown table; raw output goes to bench/results/<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=bench/.tools

say() { printf '\n== %s\n' "$*" >&2; }

# --- Debian packages (only the missing ones)
missing=()
for pkg in iperf3 wrk socat nginx-light curl openssl procps; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- the peers, from crates.io, into bench/.tools
# rathole's default features pull native TLS, websocket and noise; the benchmark uses its plain
# TCP transport, so only `server,client` (no C libraries needed). Its own Cargo.lock pins a
# `time` that no longer compiles with current rustc, so it is resolved afresh (no --locked).
if ! "$TOOLS/bin/rathole" --version 2>/dev/null | grep -q '0\.5\.0'; then
  say "cargo install rathole 0.5.0"
  cargo install --root "$TOOLS" rathole --version 0.5.0 --no-default-features --features server,client >&2
fi
if ! "$TOOLS/bin/bore" --version 2>/dev/null | grep -q '0\.6\.0'; then
  say "cargo install bore-cli 0.6.0"
  cargo install --locked --root "$TOOLS" bore-cli --version 0.6.0 >&2
fi

# --- TAAS and the load tools
say "cargo build --release (TAAS)"
cargo build --release -p taas-relay --bins >&2
say "cargo build --release (bench/tools)"
# Its own target dir, whatever CARGO_TARGET_DIR says (bench/taasbench/config.py looks there).
(cd bench/tools && CARGO_TARGET_DIR="$ROOT/bench/tools/target" cargo build --release >&2)

# --- run
stamp=$(date +%Y-%m-%dT%H%M%S)
out="bench/results/$stamp"
mkdir -p "$out"
rm -rf bench/.run && mkdir -p bench/.run
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
say "running; raw output in $out"
set +e
python3 bench/bench.py --out "$out" --work bench/.run --command "bench/run.sh${*:+ $*}" "$@" 2> >(tee "$out/run.log" >&2)
rc=$?
set -e
sleep 0.2
say "table: $out/results.md"
exit $rc
