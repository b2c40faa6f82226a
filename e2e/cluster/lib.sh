# shellcheck shell=bash
# Sourced by e2e/cluster.sh: logging, the cluster's processes (each detached, in the cluster's
# cgroup, found again by pid file and command line, never by name), and bounded waits.

log() { echo "cluster: $*" >&2; }

die() {
  log "$*"
  exit 1
}

pid_of() { # NAME: pid if alive and its command line names DIR (pids are never reused blindly)
  local f=$DIR/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
  echo "$pid"
}

# start NAME COMMAND...: detached, in the cluster's cgroup, output to logs/NAME.log
start() {
  local name=$1
  shift
  (
    cg_join "$CGROUP/control-plane"
    exec setsid "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 9>&-
  ) &
  echo $! >"$DIR/run/$name.pid"
}

# Stops every process of the cluster: by pid file (SIGTERM, in order), then whatever is still
# in its cgroup (containers, shims) with SIGKILL, until the cgroup is empty.
stop_all() {
  local p pid i left
  for p in "${PROCS[@]}"; do
    if pid=$(pid_of "$p"); then kill -TERM "$pid" 2>/dev/null || true; fi
    [ "$p" = kubelet ] && sleep 0.2 # kubelet gone before its pods are killed
  done
  for ((i = 0; i < 100; i++)); do
    left=0
    for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for ((i = 0; i < 100; i++)); do
    left=$(cg_pids | tr '\n' ' ')
    [ -n "${left// /}" ] || break
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  [ -z "${left// /}" ] || die "could not stop processes: $left"
  rm -f "$DIR"/run/*.pid
}

wait_for() { # SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s until it succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "timed out after ${deadline}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

show_logs() {
  local f
  for f in "$DIR"/logs/*.log; do
    [ -f "$f" ] || continue
    log "--- last lines of $f"
    tail -n 15 "$f" >&2
  done
}

kubectl_ok() {
  local k
  k=$(command -v kubectl || echo "$ROOT/.tools/bin/kubectl")
  "$k" --request-timeout=5s "$@" 2>/dev/null
}

T0=0
elapsed() { echo "$((($(date +%s%N) - T0) / 1000000)) ms"; }
