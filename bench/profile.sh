#!/usr/bin/env bash
# Where TAAS's time and memory go on the cases where it trails rathole.
#  1. `perf record -g -e cpu-clock` (sampling; hardware counters are not available on this
#     machine's VM) on the relay side and the client side of TAAS and rathole during one round
#     of the fresh-connection cases: bench/results/<date>/perf/CASE-PEER-ROLE-r1.txt (time by
#     binary, time under each system call, flat profile by symbol).
#  2. bench/profile_extra.py: system calls, context switches and page faults per connection
#     (perf stat, strace -c), and a valgrind massif heap profile of a relay with 2,000 parked
#     connections: bench/results/<date>/{syscalls,massif}/.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v perf >/dev/null || need+=(linux-perf)
command -v strace >/dev/null || need+=(strace)
command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
bench/run.sh --rounds 1 --duration 5 --peers rathole,taas --cases rate,http_close \
  --skip redirects,registrations,parked --perf "$@"
out=$(ls -d bench/results/*/ | sort | tail -1)
python3 bench/profile_extra.py "$out" 2000
