#!/usr/bin/env bash
# The fresh-connection tail with a deep pool (issue 18): one relay, one label (maxParked 1024,
# q pinned), one agent with --parked 1000 in front of the echo backend, then COUNT sequential
# fresh connections (connect, 1-byte echo, close) with bench/tools' connbench. 1000 parked
# connections outlast the run, so an agent that stops registering once its pool is full (a
# build with that one-line change) shows the tail without the replacements' work.
#
#   bench/refill_tail.sh [COUNT]     TAAS_BIN_DIR=DIR for another build (relay and agent);
#                                    TAAS_AGENT_DIR=DIR for another agent only
#
# Prints connbench's JSON (p50_us, p90_us, p99_us, max_us). Everything on 127.0.0.1, ports
# 46000-47999; every process started here is stopped here.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-900}
BIN=${TAAS_BIN_DIR:-$PWD/target/release}
AGENT=${TAAS_AGENT_DIR:-$BIN}/taas-agent
TOOLS=$PWD/bench/tools/target/release
[ -x "$TOOLS/connbench" ] || cargo build -q --release --manifest-path bench/tools/Cargo.toml
W=$(mktemp -d /tmp/taas-refill-tail.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT

"$BIN/taas-relay" label new --id 5e6f7a8b-0000-4000-8000-00000000f00d --label echo \
  --labels "$W/labels" --state-dir "$W/state" --listen 127.0.0.1:47443 >/dev/null
sed -i -E 's/^(\s*)maxParked:\s*[0-9]+/\1maxParked: 1024\n\1clientPort: 47900/' "$W/labels/echo.yaml"
"$TOOLS/echo" 127.0.0.1:47901 >"$W/echo.log" 2>&1 &
PIDS+=($!)
"$BIN/taas-relay" serve --listen 127.0.0.1:47443 --labels "$W/labels" --state-dir "$W/state" \
  --p-ports 46000-47399 --q-ports 47900-47910 --metrics 127.0.0.1:47444 >"$W/relay.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do curl -fs -o /dev/null 127.0.0.1:47444/metrics && break; sleep 0.2; done
"$AGENT" --relay https://taas-registrar.localhost:47443 --label-file "$W/labels/echo.yaml" \
  --ca "$W/state/relay-cert.pem" --forward 127.0.0.1:47901 --parked 1000 >"$W/agent.log" 2>&1 &
PIDS+=($!)
parked() { curl -fs 127.0.0.1:47444/metrics | awk '$1 ~ /^taas_parked[{ ]/ || $1 == "taas_parked" { n += $NF } END { print n + 0 }'; }
for _ in $(seq 100); do [ "$(parked)" -ge 1000 ] && break; sleep 0.2; done
[ "$(parked)" -ge 1000 ] || { echo "the agent did not park 1000 connections ($(parked))" >&2; tail -n 3 "$W/agent.log" "$W/relay.log" >&2; exit 1; }
"$TOOLS/connbench" latency 127.0.0.1:47900 "$COUNT" 20
