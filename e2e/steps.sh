# The harness shared by e2e/test.sh and e2e/scale.sh (sourced, after `cd` to the repository):
# root check, a work dir $W with background pids, step/summary/until_ok, the two network
# namespaces standing for a phone and a hidden server, the test certificates, and cleanup.
# Needs NS, PASSED, FAILED, TIMES and ROOT set by the caller.

log() { echo "e2e: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ "$(id -u)" -ne 0 ]; then
  echo "FAIL - e2e needs root (network namespaces, iptables, cgroups, mounts)"
  echo "e2e: 0 passed, 1 failed"
  exit 1
fi

PATH="$(bash scripts/k8s/tools.sh):$PATH"
export PATH
PY=$ROOT/.tools/venv/bin/python3
[ -x "$PY" ] || PY=python3

W=$(mktemp -d /tmp/taas-e2e-test.XXXXXX)
# Steps run in subshells (so `set -e` holds inside them); what later steps need goes in files
# under $W: background pids (bg.pids), the gateway's node port.
bg() { echo "$1" >>"$W/bg.pids"; }
cleanup() {
  local rc=$?
  [ -f "$W/bg.pids" ] && xargs -r kill <"$W/bg.pids" 2>/dev/null || true
  if [ "${TAAS_E2E_KEEP:-0}" = 1 ]; then
    log "TAAS_E2E_KEEP=1: cluster left running (e2e/cluster.sh down to stop); work dir $W"
  else
    bash e2e/cluster.sh down >/dev/null 2>"$W/down.log" || { cat "$W/down.log" >&2; rc=1; }
    rm -rf "$W"
  fi
  exit $rc
}
trap cleanup EXIT

diagnose() {
  [ -n "${KUBECONFIG:-}" ] || return 0
  log "--- diagnostics"
  kubectl get nodes,pods,svc,endpoints,taaslabels -A -o wide >&2 2>&1 || true
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 25 >&2 || true
  local p
  for p in $(kubectl get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null); do
    log "--- logs of $p"
    kubectl logs -n "${p%%/*}" "${p#*/}" --tail=20 >&2 2>&1 || true
  done
  # Pods stuck terminating: what the kubelet says about them.
  for p in $(kubectl get pods -A -o jsonpath='{range .items[?(@.metadata.deletionTimestamp)]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null); do
    log "--- terminating: $p"
    kubectl describe pod -n "${p%%/*}" "${p#*/}" 2>&1 | tail -n 15 >&2 || true
    grep -F "${p#*/}" /var/lib/taas-e2e/logs/kubelet.log 2>/dev/null | tail -n 10 | cut -c1-400 >&2 || true
  done
  for f in "$W"/*.log; do
    [ -f "$f" ] || continue
    log "--- $f"
    tail -n 20 "$f" >&2
  done
}

# step NAME FUNCTION: runs FUNCTION, records pass/fail and its time; a failed step ends the run
# (later steps need the earlier ones).
step() {
  local name=$1 t0
  shift
  t0=$(now)
  set +e
  (
    set -e
    "$@"
  ) >"$W/step.out" 2>&1
  local rc=$?
  set -e
  if [ "$rc" = 0 ]; then
    cat "$W/step.out" >&2
    PASSED=$((PASSED + 1))
    TIMES+=("$(since "$t0")|$name")
    echo "ok - $name ($(since "$t0") s)"
  else
    cat "$W/step.out" >&2
    FAILED=$((FAILED + 1))
    echo "FAIL - $name ($(since "$t0") s)"
    diagnose
    summary
    exit 1
  fi
}

summary() {
  echo "== e2e step times (s)"
  local t
  for t in "${TIMES[@]}"; do printf '  %7s  %s\n' "${t%%|*}" "${t#*|}"; done
  if [ -f /var/lib/taas-e2e/run/memory.json ]; then
    "$PY" - /var/lib/taas-e2e/run/memory.json <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
mib = lambda b: f"{b / 1048576:.0f} MiB"
print(f"== cluster peak memory: {mib(m['peak_rss_bytes'])} summed RSS of every process (control plane, "
      f"containerd, kubelet, pods; sampled each second), {mib(m.get('cgroup_peak_bytes', 0))} cgroup peak "
      f"(incl. page cache)")
PY
  fi
  echo "e2e: $PASSED passed, $FAILED failed"
}

# until_ok SECONDS COMMAND...: retries COMMAND every 0.5 s for at most SECONDS.
until_ok() {
  local secs=$1 deadline
  deadline=$(awk -v a="$(now)" -v s="$secs" 'BEGIN { printf "%.3f", a + s }')
  shift
  until "$@"; do
    if awk -v d="$deadline" -v n="$(now)" 'BEGIN { exit !(n > d) }'; then
      log "gave up after $secs s: $*"
      return 1
    fi
    sleep 0.5
  done
}

in_client() { ip netns exec "$TAAS_E2E_CLIENT_NS" "$@"; }
in_hidden() { ip netns exec "$TAAS_E2E_HIDDEN_NS" "$@"; }

# --- steps both scripts run -------------------------------------------------------------------
build_image() {
  IMAGE=$(bash e2e/build-image.sh)
  echo "$IMAGE" >"$W/image"
  ls -l "$IMAGE"
}

cluster_up() {
  # Always a fresh cluster: nothing left from an earlier run (TAAS_E2E_KEEP) can help or hurt.
  bash e2e/cluster.sh down >/dev/null
  bash e2e/cluster.sh up >/dev/null
  bash e2e/cluster.sh load "$(cat "$W/image")"
}

certificates() { # the gateway's certificate (registrar + *.domain) and the hidden servers' own CA
  local d=$W/pki
  mkdir -p "$d"
  for ca in gateway-ca hidden-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=$ca" -keyout "$d/$ca.key" -out "$d/$ca.crt" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  done
  leaf() { # NAME CA SANS
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
      -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$3" >"$d/$1.ext"
    openssl x509 -req -in "$d/$1.csr" -CA "$d/$2.crt" -CAkey "$d/$2.key" -CAcreateserial -days 2 \
      -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
  }
  leaf gateway gateway-ca "DNS:registrar.$TAAS_E2E_DOMAIN,DNS:*.$TAAS_E2E_DOMAIN"
  leaf home hidden-ca "DNS:home.$TAAS_E2E_DOMAIN"
  # One certificate for every other hidden server of the tests (edge labels, the scale run).
  leaf hidden-any hidden-ca "DNS:*.$TAAS_E2E_DOMAIN"
  # The mobile client trusts both: the gateway's for the 307, the hidden server's end to end.
  cat "$d/gateway-ca.crt" "$d/hidden-ca.crt" >"$d/client-bundle.crt"
}

