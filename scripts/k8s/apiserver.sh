#!/usr/bin/env bash
# A real Kubernetes API server (v1.20.2) for tests, on loopback only: etcd + kube-apiserver
# (RBAC) + kube-controller-manager (garbage collection, Deployments -> ReplicaSets -> Pods,
# ServiceAccounts). No kubelet: no pod ever runs.
#
#   apiserver.sh up DIR        start (or find running) a cluster whose state lives in DIR
#   apiserver.sh down DIR      stop what `up DIR` started (by pid file) and check it is gone
#   apiserver.sh env DIR       print `export KEY=VALUE` lines of a running cluster (for eval)
#   apiserver.sh status DIR    exit 0 if the cluster in DIR is up and ready
#   apiserver.sh sa-kubeconfig DIR NAMESPACE NAME OUT
#                              write OUT, a kubeconfig authenticating as ServiceAccount
#                              NAMESPACE/NAME (created, with its namespace, if missing)
#
# TAAS_K8S_CONTROLLERS picks kube-controller-manager's controllers (default `*`); e.g.
# `*,-deployment,-replicaset` lets a test set Deployments' status itself, as a kubelet would.
#
# After `up`, DIR holds (DIR must be a path without whitespace):
#   env                 KEY=VALUE lines: KUBECONFIG, TAAS_K8S_SERVER, TAAS_K8S_CA,
#                       TAAS_K8S_TOKEN, TAAS_K8S_DIR, TAAS_K8S_ETCD, TAAS_K8S_BIN
#   admin.kubeconfig    admin (group system:masters), bearer token, CA embedded
#   ca.crt              CA of the apiserver's serving certificate (also in the kubeconfigs)
#   *.pid, logs/*.log   one per process; `ports` (etcd client, etcd peer, apiserver)
# `up` prints the path of DIR/env on stdout (progress on stderr) and returns once /readyz
# answers and kube-controller-manager has made the default ServiceAccount.
# `up` on a DIR whose cluster is not running starts a fresh, empty cluster (new etcd data,
# new admin token); certificates and ServiceAccount keys are kept and reused. `up` on a DIR
# whose cluster runs and is ready does nothing. Stale pid files of a run that died are
# cleaned up. Nothing outside DIR is written except the binary cache of build-kubernetes.sh.
#
# ServiceAccount credentials: sa-kubeconfig uses the TokenRequest API
# (POST .../serviceaccounts/NAME/token, authentication.k8s.io/v1), which 1.20 serves when the
# apiserver has --service-account-issuer and --service-account-signing-key-file: a JWT bound
# to the ServiceAccount, valid TAAS_K8S_SA_TOKEN_SECONDS (default 86400), no restart needed and
# no wait for the token controller. (kube-controller-manager also runs with
# --service-account-private-key-file and --root-ca-file, so 1.20's legacy token Secrets are
# created too.)
#
# Env: TAAS_K8S_READY_TIMEOUT (seconds, default 60), TAAS_K8S_BIN (dir with kube-apiserver and
# kube-controller-manager; default: built/cached by build-kubernetes.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
READY_TIMEOUT=${TAAS_K8S_READY_TIMEOUT:-60}
PROCS=(etcd kube-apiserver kube-controller-manager)

log() { echo "apiserver: $*" >&2; }
die() {
  log "$*"
  exit 1
}
usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 2 ] || usage
CMD=$1
DIR_ARG=$2
case "$DIR_ARG" in *[[:space:]]*) die "DIR must not contain whitespace: '$DIR_ARG'" ;; esac
if [ "$CMD" = up ]; then mkdir -p "$DIR_ARG"; fi
if [ "$CMD" = down ] && [ ! -e "$DIR_ARG" ]; then
  log "nothing to stop: no $DIR_ARG"
  exit 0
fi
[ -d "$DIR_ARG" ] || die "no such directory: $DIR_ARG"
DIR=$(cd "$DIR_ARG" && pwd)

# --- process bookkeeping -------------------------------------------------------------------
# A pid file counts only if the process is alive and its command line names DIR (so a pid
# reused by an unrelated process is never touched).
pid_of() {
  local f=$DIR/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
  echo "$pid"
}

# Stops every process of DIR: SIGTERM to all at once (a throwaway cluster needs no ordered
# shutdown), SIGKILL after 10 s, then checks they are gone.
stop_all() {
  local p pid pids=() i alive
  for p in "${PROCS[@]}"; do
    if pid=$(pid_of "$p"); then
      pids+=("$pid")
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 150; i++)); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]})) || break
    if ((i == 100)); then
      log "still running after SIGTERM: ${alive[*]}; SIGKILL"
      kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    sleep 0.1
  done
  ((${#alive[@]} == 0)) || die "could not stop: ${alive[*]}"
  for p in "${PROCS[@]}"; do rm -f "$DIR/$p.pid"; done
}

# start NAME BINARY ARGS...: detached (own session), output to logs/NAME.log, no inherited fds.
start() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 9>&- &
  echo $! >"$DIR/$name.pid"
}

read_env() {
  [ -f "$DIR/env" ] || return 1
  local k v
  while IFS='=' read -r k v; do
    [[ "$k" =~ ^[A-Z_][A-Z0-9_]*$ ]] && printf -v "$k" '%s' "$v"
  done <"$DIR/env"
  [ -n "${TAAS_K8S_SERVER:-}" ] && [ -n "${TAAS_K8S_TOKEN:-}" ]
}

readyz() {
  curl -fsS --max-time 2 --cacert "$DIR/ca.crt" -H "Authorization: Bearer $1" "$2/readyz" >/dev/null 2>&1
}

is_up() {
  local p
  for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null || return 1; done
  read_env || return 1
  readyz "$TAAS_K8S_TOKEN" "$TAAS_K8S_SERVER"
}

# api METHOD PATH [BODY]: admin request; prints the body, returns curl's status (HTTP >= 400 fails)
api() {
  local args=(-sS --max-time 10 --cacert "$DIR/ca.crt" -H "Authorization: Bearer $TAAS_K8S_TOKEN"
    -H 'Accept: application/json' -X "$1")
  [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
  curl "${args[@]}" -w '\n%{http_code}' "$TAAS_K8S_SERVER$2"
}

# http_code_of OUTPUT-OF-api
http_code_of() { tail -n1 <<<"$1"; }
body_of() { sed '$d' <<<"$1"; }

gen_certs() {
  local ossl="openssl"
  if [ ! -s "$DIR/sa.key" ] || [ ! -s "$DIR/sa.pub" ]; then
    $ossl genrsa -out "$DIR/sa.key" 2048 2>/dev/null
    $ossl rsa -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub" 2>/dev/null
  fi
  if [ ! -s "$DIR/ca.crt" ] || [ ! -s "$DIR/ca.key" ] || [ ! -s "$DIR/apiserver.crt" ] ||
    [ ! -s "$DIR/apiserver.key" ]; then
    $ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=taas-test-ca" -keyout "$DIR/ca.key" -out "$DIR/ca.crt" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    $ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=kube-apiserver" -keyout "$DIR/apiserver.key" -out "$DIR/apiserver.csr" 2>/dev/null
    cat >"$DIR/apiserver.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    $ossl x509 -req -in "$DIR/apiserver.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
      -CAcreateserial -days 3650 -extfile "$DIR/apiserver.ext" -out "$DIR/apiserver.crt" 2>/dev/null
    rm -f "$DIR/apiserver.csr" "$DIR/apiserver.ext" "$DIR/ca.srl"
  fi
  chmod 600 "$DIR"/*.key
}

show_log() {
  [ -f "$DIR/logs/$1.log" ] || return 0
  log "--- last lines of $DIR/logs/$1.log"
  tail -n 25 "$DIR/logs/$1.log" >&2
}

# --- commands --------------------------------------------------------------------------------
elapsed() { echo "$((($(date +%s%N) - T0) / 1000000)) ms"; }

cmd_up() {
  T0=$(date +%s%N)
  exec 9>"$DIR/.lock"
  flock 9
  if is_up; then
    log "already up: $TAAS_K8S_SERVER ($DIR)"
    echo "$DIR/env"
    return 0
  fi
  # Partial or dead previous run: stop whatever of it is still alive, start afresh.
  stop_all
  rm -rf "$DIR/etcd-data"
  rm -f "$DIR/env" "$DIR/ports" "$DIR/admin.kubeconfig" "$DIR/tokens.csv"
  mkdir -p "$DIR/logs"

  local bin etcd_bin
  bin=${TAAS_K8S_BIN:-$("$HERE/build-kubernetes.sh")}
  [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] ||
    die "kube-apiserver/kube-controller-manager not found in $bin"
  if ! etcd_bin=$(command -v etcd); then
    log "installing etcd-server from Debian"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends etcd-server >&2
    etcd_bin=$(command -v etcd)
  fi
  command -v openssl >/dev/null && command -v curl >/dev/null && command -v python3 >/dev/null ||
    die "needs openssl, curl and python3"

  gen_certs
  local admin_token
  admin_token=$(openssl rand -hex 32)
  (
    umask 077
    echo "$admin_token,admin,admin,\"system:masters\"" >"$DIR/tokens.csv"
  )

  UP_OK=0
  trap '[ "$UP_OK" = 1 ] || stop_all' EXIT

  local attempt ports etcd_port peer_port api_port deadline started=0
  for attempt in 1 2 3; do
    read -r etcd_port peer_port api_port <<<"$(free_ports 127.0.0.1 3)"
    echo "$etcd_port $peer_port $api_port" >"$DIR/ports"
    rm -rf "$DIR/etcd-data"
    start etcd "$etcd_bin" --name taas-test --data-dir "$DIR/etcd-data" \
      --listen-client-urls "http://127.0.0.1:$etcd_port" \
      --advertise-client-urls "http://127.0.0.1:$etcd_port" \
      --listen-peer-urls "http://127.0.0.1:$peer_port" \
      --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
      --initial-cluster "taas-test=http://127.0.0.1:$peer_port" \
      --initial-cluster-state new --logger zap --log-outputs stderr
    deadline=$((SECONDS + 20))
    until curl -fsS --max-time 1 "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1; do
      if ! pid_of etcd >/dev/null || ((SECONDS > deadline)); then break; fi
      sleep 0.1
    done
    if ! curl -fsS --max-time 1 "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1; then
      show_log etcd
      stop_all
      log "etcd did not become healthy (attempt $attempt)"
      continue
    fi
    log "etcd healthy ($(elapsed))"

    start kube-apiserver "$bin/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$etcd_port" \
      --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
      --secure-port "$api_port" --insecure-port 0 \
      --cert-dir "$DIR/certs" \
      --tls-cert-file "$DIR/apiserver.crt" --tls-private-key-file "$DIR/apiserver.key" \
      --token-auth-file "$DIR/tokens.csv" \
      --authorization-mode Node,RBAC \
      --service-account-issuer https://kubernetes.default.svc \
      --service-account-key-file "$DIR/sa.pub" \
      --service-account-signing-key-file "$DIR/sa.key" \
      --service-cluster-ip-range 10.0.0.0/16 \
      --disable-admission-plugins ServiceAccount \
      --endpoint-reconciler-type none \
      --profiling=false
    TAAS_K8S_SERVER="https://127.0.0.1:$api_port"
    deadline=$((SECONDS + READY_TIMEOUT))
    until readyz "$admin_token" "$TAAS_K8S_SERVER"; do
      if ! pid_of kube-apiserver >/dev/null || ((SECONDS > deadline)); then break; fi
      sleep 0.2
    done
    if readyz "$admin_token" "$TAAS_K8S_SERVER"; then
      started=1
      break
    fi
    show_log kube-apiserver
    stop_all
    log "kube-apiserver not ready (attempt $attempt)"
    # Worth another try: a lost port race, or a kube-apiserver gone without writing a line
    # (seen once in CI on the 2-core machine, with three of these starting at once). Any other
    # failure (a bad flag, a broken binary) says why in its log and would only repeat.
    if [ -s "$DIR/logs/kube-apiserver.log" ] &&
      ! grep -q 'address already in use' "$DIR/logs/kube-apiserver.log" "$DIR/logs/etcd.log" 2>/dev/null; then
      break
    fi
  done
  [ "$started" = 1 ] || die "could not start etcd + kube-apiserver (logs in $DIR/logs)"

  log "kube-apiserver ready ($(elapsed))"
  TAAS_K8S_TOKEN=$admin_token
  write_kubeconfig "$DIR/admin.kubeconfig" "$TAAS_K8S_SERVER" "$DIR/ca.crt" admin "$admin_token"
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$DIR/admin.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --controllers "${TAAS_K8S_CONTROLLERS:-*}" \
    --service-account-private-key-file "$DIR/sa.key" \
    --root-ca-file "$DIR/ca.crt" \
    --use-service-account-credentials=false \
    --leader-elect=false \
    --profiling=false
  # The controller-manager is working once its ServiceAccount controller made default/default.
  local out
  deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    out=$(api GET /api/v1/namespaces/default/serviceaccounts/default 2>/dev/null || true)
    [ "$(http_code_of "$out")" = 200 ] && break
    if ! pid_of kube-controller-manager >/dev/null || ((SECONDS > deadline)); then
      show_log kube-controller-manager
      die "kube-controller-manager did not start"
    fi
    sleep 0.2
  done

  local tmp
  tmp=$(mktemp "$DIR/env.XXXXXX")
  cat >"$tmp" <<EOF
KUBECONFIG=$DIR/admin.kubeconfig
TAAS_K8S_SERVER=$TAAS_K8S_SERVER
TAAS_K8S_CA=$DIR/ca.crt
TAAS_K8S_TOKEN=$admin_token
TAAS_K8S_DIR=$DIR
TAAS_K8S_ETCD=http://127.0.0.1:$etcd_port
TAAS_K8S_BIN=$bin
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$DIR/env"
  UP_OK=1
  log "up in $(elapsed): $TAAS_K8S_SERVER (etcd 127.0.0.1:$etcd_port), env in $DIR/env"
  echo "$DIR/env"
}

listening_ports() { # prints the ports among $@ that something listens on (127.0.0.1)
  local p
  for p in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; fi
  done
}

cmd_down() {
  exec 9>"$DIR/.lock"
  flock 9
  local ports=()
  [ -f "$DIR/ports" ] && read -r -a ports <"$DIR/ports"
  stop_all
  rm -f "$DIR/env" "$DIR/ports" "$DIR/admin.kubeconfig" "$DIR/tokens.csv"
  rm -rf "$DIR/etcd-data"
  local left
  left=$(listening_ports "${ports[@]}")
  [ -z "$left" ] || die "still listening after down: $left"
  log "down ($DIR)"
}

cmd_env() {
  is_up || die "not up: $DIR"
  sed 's/^/export /' "$DIR/env"
}

cmd_status() {
  if is_up; then
    log "up: $TAAS_K8S_SERVER"
  else
    local p
    for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null && log "$p running" || log "$p not running"; done
    return 1
  fi
}

cmd_sa_kubeconfig() {
  [ $# -eq 3 ] || usage
  local ns=$1 name=$2 out=$3 r code
  is_up || die "not up: $DIR"
  r=$(api POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$ns\"}}")
  code=$(http_code_of "$r")
  [ "$code" = 201 ] || [ "$code" = 409 ] || die "creating namespace $ns: HTTP $code $(body_of "$r")"
  r=$(api POST "/api/v1/namespaces/$ns/serviceaccounts" \
    "{\"apiVersion\":\"v1\",\"kind\":\"ServiceAccount\",\"metadata\":{\"name\":\"$name\",\"namespace\":\"$ns\"}}")
  code=$(http_code_of "$r")
  [ "$code" = 201 ] || [ "$code" = 409 ] || die "creating serviceaccount $ns/$name: HTTP $code $(body_of "$r")"
  r=$(api POST "/api/v1/namespaces/$ns/serviceaccounts/$name/token" \
    "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\"spec\":{\"expirationSeconds\":${TAAS_K8S_SA_TOKEN_SECONDS:-86400}}}")
  code=$(http_code_of "$r")
  [ "$code" = 201 ] || [ "$code" = 200 ] || die "TokenRequest for $ns/$name: HTTP $code $(body_of "$r")"
  local token
  token=$(body_of "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["token"])')
  [ -n "$token" ] || die "empty token for $ns/$name"
  mkdir -p "$(dirname "$out")"
  write_kubeconfig "$out" "$TAAS_K8S_SERVER" "$DIR/ca.crt" "system:serviceaccount:$ns:$name" "$token"
  log "wrote $out (ServiceAccount $ns/$name)"
}

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  sa-kubeconfig) shift 2; cmd_sa_kubeconfig "$@" ;;
  *) usage ;;
esac
