#!/usr/bin/env bash
# Many labels through one gateway Service with a fixed set of ports (issue 15): the cluster
# edge at scale, on the real single-node cluster of e2e/cluster.sh. Not part of the default
# test run (it starts N relay pods and N agents: several minutes); run it on its own:
#
#   sudo e2e/scale.sh [N]        N labels (default 100), then tears everything down
#
# Each label: a TaasLabel without a Service of its own, a taas-agent in the hidden server's
# namespace registering through the gateway and parking one connection through the gateway's
# shared range of rendezvous ports (64 ports for all N labels: slices overlap, so the gateway
# tells the relays apart by registration), a hidden HTTPS server of its own answering
# "scale-i", and one mobile client (curl -L in the phone's namespace) that must get exactly
# that answer through the gateway's shared client port. Whatever N, the gateway Service keeps
# the same 66 public ports (HTTPS, the shared client port, 64 rendezvous ports) and no label
# has a public port.
#
# Prints each phase's time, the cluster's memory (peak, and now with N relay pods idle), the
# memory per relay pod, and one line `scale: N passed, M failed`.
# Env: TAAS_E2E_KEEP=1 leaves the cluster running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NS=taas-system
PASSED=0
FAILED=0
TIMES=()
N=${1:-100}
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 110 ] || { echo "N must be 1..110 (the node runs at most 120 pods)"; exit 2; }

source e2e/steps.sh

SHARED_PORT=30443
RDV_FIRST=31000
RDV_COUNT=64
BACKEND_FIRST=9100

helm_install_edge() {
  # The node has 2 CPUs: at the chart's default request (50m) only about 38 relay pods would be
  # scheduled. An idle relay uses far less (see the memory step's figures); the request is a
  # scheduling hint, not a limit.
  kubectl create namespace "$NS"
  kubectl -n "$NS" create secret tls taas-gateway-tls --cert="$W/pki/gateway.crt" --key="$W/pki/gateway.key"
  helm install taas charts/taas -n "$NS" \
    --set registrar="registrar.$TAAS_E2E_DOMAIN" --set domain="$TAAS_E2E_DOMAIN" \
    --set gateway.service.type=NodePort --set gateway.tls.secretName=taas-gateway-tls \
    --set edge.sharedPort=$SHARED_PORT --set edge.rendezvousPorts.first=$RDV_FIRST \
    --set edge.rendezvousPorts.count=$RDV_COUNT \
    --set operator.relay.resources.requests.cpu=5m
  kubectl -n "$NS" rollout status deployment/taas-operator --timeout=120s
  kubectl -n "$NS" rollout status deployment/taas-gateway --timeout=120s
  kubectl -n "$NS" get svc taas-gateway -o jsonpath='{.spec.ports[?(@.name=="https")].nodePort}' >"$W/gateway-port"
  kubectl -n "$NS" get svc taas-gateway -o jsonpath='{range .spec.ports[*]}{.name}{"\n"}{end}' | wc -l >"$W/gateway-ports"
  echo "gateway: NodePort $(cat "$W/gateway-port") on $TAAS_E2E_NODE_IP, $(cat "$W/gateway-ports") public ports"
}

secret_of() { # I: a distinct base32 secret per label (160 bits)
  printf 'JBSWY3DPEHPK3PXP%016d' "$1" | tr '0123456789' 'ABCDEFGHIJ'
}

manifests() {
  local i
  for ((i = 0; i < N; i++)); do
    cat <<EOF
apiVersion: taas.dev/v1alpha1
kind: TaasLabel
metadata: {name: scale-$i, namespace: scale}
spec:
  id: 00000000-0000-4000-8000-$(printf '%012d' "$i")
  label: scale-$i
  secretRef: {name: scale-$i-totp, key: secret}
  rendezvousPorts: 2
---
apiVersion: v1
kind: Secret
metadata: {name: scale-$i-totp, namespace: scale}
stringData: {secret: $(secret_of "$i")}
---
EOF
  done
}

ready_count() {
  kubectl -n scale get taaslabels -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c True || true
}
all_ready() { [ "$(ready_count)" = "$N" ]; }

apply_labels() {
  kubectl create namespace scale
  manifests >"$W/scale.yaml"
  kubectl apply -f "$W/scale.yaml" >/dev/null
  until_ok 900 all_ready
  echo "$N labels Ready"
  # Not one public port of a label's own.
  ! kubectl -n scale get svc -o jsonpath='{range .items[*]}{.spec.type}{"\n"}{end}' | grep -qE 'NodePort|LoadBalancer'
}

start_agents() {
  local i
  in_hidden "$PY" e2e/backend.py https-many "$BACKEND_FIRST" "$N" "$W/pki/hidden-any.crt" \
    "$W/pki/hidden-any.key" scale >"$W/backends.log" 2>&1 &
  bg $!
  until_ok 20 grep -q listening "$W/backends.log"
  mkdir -p "$W/agents"
  for ((i = 0; i < N; i++)); do
    secret_of "$i" >"$W/agents/$i.secret"
    in_hidden target/release/taas-agent --relay "https://registrar.$TAAS_E2E_DOMAIN:$(cat "$W/gateway-port")" \
      --id "00000000-0000-4000-8000-$(printf '%012d' "$i")" --label "scale-$i" \
      --secret-file "$W/agents/$i.secret" --forward "127.0.0.1:$((BACKEND_FIRST + i))" \
      --parked 1 --max-backoff 2 --ca "$W/pki/gateway-ca.crt" >"$W/agents/$i.log" 2>&1 &
    bg $!
  done
}

fetch() { # I: the page of scale-I through the gateway (the 307 names its shared client port)
  in_client curl -sS -L --max-time 10 --cacert "$W/pki/client-bundle.crt" \
    --connect-to "::$TAAS_E2E_NODE_IP:" \
    "https://scale-$1.$TAAS_E2E_DOMAIN:$(cat "$W/gateway-port")/" 2>>"$W/curl.log"
}
serves() { [ "$(fetch "$1")" = "scale-$1" ]; }

clients() {
  local i ok=0 failed=0
  for ((i = 0; i < N; i++)); do
    # The first client of a label may come before its agent parked (agents start together
    # and the gateways learn new routes with their ConfigMap): wait for that, bounded.
    if until_ok 120 serves "$i"; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
  done
  echo "$ok of $N labels answered their own page through the edge, $failed did not"
  # A second pass, every label once more, after all are parked: no retries allowed.
  local again=0
  for ((i = 0; i < N; i++)); do serves "$i" && again=$((again + 1)); done
  echo "second pass without retries: $again of $N"
  [ "$failed" = 0 ] && [ "$again" = "$N" ]
}

memory() {
  bash e2e/cluster.sh memory >"$W/memory.json" || true
  "$PY" - "$N" <<'PY'
import glob, os, sys
n = int(sys.argv[1])
# RSS of the relay processes now (each relay pod runs one `taas-relay label-relay`).
rss = []
for status in glob.glob("/proc/[0-9]*/status"):
    try:
        cmd = open(os.path.join(os.path.dirname(status), "cmdline"), "rb").read().split(b"\0")
        if len(cmd) > 1 and cmd[0].endswith(b"taas-relay") and cmd[1] == b"label-relay":
            for line in open(status):
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
mib = lambda b: f"{b / 1048576:.1f} MiB"
if rss:
    print(f"relay processes: {len(rss)}, RSS each: median {mib(sorted(rss)[len(rss)//2])}, "
          f"max {mib(max(rss))}, sum {mib(sum(rss))} for {n} labels")
PY
}

step "image from the release binaries" build_image
step "cluster up, image imported" cluster_up
eval "$(bash e2e/cluster.sh env)"
export KUBECONFIG
step "certificates" certificates
step "helm install with the edge (NodePort gateway, $RDV_COUNT rendezvous ports)" helm_install_edge
step "$N labels applied, every one Ready" apply_labels
step "$N agents registered through the gateway" start_agents
step "a client through each of the $N labels" clients
step "memory with $N labels parked" memory
summary | sed 's/^e2e:/scale:/'
