#!/usr/bin/env bash
# A real single-node Kubernetes (v1.20.2) that runs pods, on this machine only, for the
# end-to-end test (e2e/test.sh) and for trying TAAS without a cloud.
#
#   e2e/cluster.sh up [DIR]          start it (or find it running); prints DIR/env
#   e2e/cluster.sh down [DIR]        stop it and remove everything it created on the host
#   e2e/cluster.sh load IMAGE.tar [DIR]   import an image tarball into the node's containerd
#   e2e/cluster.sh env [DIR]         `export KEY=VALUE` lines of a running cluster (for eval)
#   e2e/cluster.sh status [DIR]      exit 0 if it is up and the node is Ready
#   e2e/cluster.sh memory [DIR]      peak memory of the whole cluster so far (bytes, JSON)
#
# DIR defaults to /var/lib/taas-e2e. Needs root (network links, iptables, cgroups, mounts).
#
# What runs: etcd, kube-apiserver, kube-controller-manager, kube-scheduler (all built once per
# machine from Debian's `kubernetes` source package by scripts/k8s/build-kubernetes.sh and
# cached outside the clone), containerd + runc + the CNI bridge plugin from Debian, kube-proxy
# (iptables mode), kubelet, dnsmasq (cluster DNS) and e2e/node-services.py (writes the DNS
# names of Services, gives LoadBalancer Services the node's address as a cloud's controller or
# k3s's ServiceLB would, and samples the cluster's memory). Every process and every pod runs in
# the cgroup /taas-e2e, so one cgroup holds the whole cluster.
#
# One setting differs from a default kubelet: --sync-frequency 10s (default 1 min), so a changed
# ConfigMap reaches the pods that mount it (the gateway's routes, a relay's external address)
# within seconds instead of up to about a minute and a half.
#
# Addresses (all private, on links of this script's own; none is routed off the machine):
#   10.231.0.0/24  "lan": bridge taas-e2e-lan holds the node address 10.231.0.1; two network
#                  namespaces stand for other hosts on it: taas-e2e-client (10.231.0.2, a mobile
#                  client) and taas-e2e-hidden (10.231.0.3, a hidden server). Their /etc/hosts
#                  (from /etc/netns/NAME/hosts, as `ip netns exec` does) name the node for
#                  registrar.taas.test and *.taas.test.
#   10.232.0.0/24  pods, on the CNI bridge taas-e2e-pods
#   10.233.0.0/24  Services (ClusterIPs; a blackhole route, so none can leak before kube-proxy)
#
# Network safety: no packet of the cluster may leave the machine. The CNI bridge has ipMasq off;
# the mangle table's FORWARD chain drops everything forwarded except between the pod bridge and
# the lan bridge, and POSTROUTING drops any packet from the pod or lan ranges leaving through
# another link; the Service range is a blackhole route; dnsmasq has no upstream server;
# kube-proxy starts before any pod. `down` (also run by `up` after a crashed run) removes
# processes, pods, mounts, links, namespaces, routes, iptables rules and chains, cgroups, and
# restores the sysctls kubelet, kube-proxy and the CNI plugin change.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=../scripts/k8s/lib.sh
. "$ROOT/scripts/k8s/lib.sh"
K8S_VERSION=1.20.2
NODE=taas-e2e-node
LAN_BR=taas-e2e-lan
POD_BR=taas-e2e-pods
NODE_IP=10.231.0.1
LAN_CIDR=10.231.0.0/24
POD_CIDR=10.232.0.0/24
SVC_CIDR=10.233.0.0/24
SVC_API_IP=10.233.0.1
CLIENT_NS=taas-e2e-client
CLIENT_IP=10.231.0.2
HIDDEN_NS=taas-e2e-hidden
HIDDEN_IP=10.231.0.3
DOMAIN=taas.test
CGROUP=taas-e2e
CHAIN=TAAS-E2E
PAUSE_IMAGE=localhost/taas-e2e/pause:$K8S_VERSION
READY_TIMEOUT=${TAAS_E2E_READY_TIMEOUT:-120}
# Processes in the order `down` stops them (kubelet first, so it restarts nothing).
PROCS=(node-services kubelet kube-proxy dnsmasq containerd kube-scheduler kube-controller-manager kube-apiserver etcd)
SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.route_localnet vm.overcommit_memory kernel.panic
  kernel.panic_on_oops net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Host paths kubelet/containerd/CNI write outside DIR; `down` removes those `up` found absent.
HOST_PATHS=(/var/log/pods /var/log/containers /var/lib/cni /usr/libexec/kubernetes /var/lib/kubelet
  /etc/netns/$CLIENT_NS /etc/netns/$HIDDEN_NS)

log() { echo "cluster: $*" >&2; }
die() {
  log "$*"
  exit 1
}
usage() {
  sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

CMD=${1:-}
case "$CMD" in
  load) IMAGE=${2:-}; [ -n "$IMAGE" ] || usage; DIR=${3:-/var/lib/taas-e2e} ;;
  up | down | env | status | memory) DIR=${2:-/var/lib/taas-e2e} ;;
  *) usage ;;
esac
case "$DIR" in /*) ;; *) DIR=$PWD/$DIR ;; esac
case "$DIR" in *[[:space:]]* | / | /var | /var/lib | /tmp) die "unsuitable DIR: '$DIR'" ;; esac
[ "$(id -u)" -eq 0 ] || die "needs root (links, iptables, cgroups, mounts)"

# --- processes -----------------------------------------------------------------------------
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

# --- cgroups (v1 hierarchies as mounted here; a v2-only host has one) -----------------------
cg_roots() {
  local m
  while read -r _ m fstype opts _; do
    case "$fstype" in
      cgroup) echo "$m" ;;
      cgroup2) [ "$m" = /sys/fs/cgroup ] && echo "$m" ;;
    esac
  done </proc/mounts
}

cg_create() {
  local r d
  for r in $(cg_roots); do
    for d in "$CGROUP" "$CGROUP/control-plane"; do
      [ -d "$r/$d" ] && continue
      mkdir "$r/$d"
      # cpuset cgroups start empty; a task cannot join one until cpus and mems are set.
      if [ -f "$r/$d/cpuset.cpus" ]; then
        cat "$(dirname "$r/$d")/cpuset.cpus" >"$r/$d/cpuset.cpus"
        cat "$(dirname "$r/$d")/cpuset.mems" >"$r/$d/cpuset.mems"
      fi
    done
  done
}

cg_join() { # PATH relative to each root; joins the calling shell
  local r
  for r in $(cg_roots); do
    [ -d "$r/$1" ] && echo "$BASHPID" >"$r/$1/cgroup.procs" 2>/dev/null || true
  done
}

cg_pids() { # every pid in the cluster's cgroup tree (read from the memory or first hierarchy)
  local r
  for r in $(cg_roots); do
    [ -d "$r/$CGROUP" ] || continue
    find "$r/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

cg_remove() {
  local r
  for r in $(cg_roots); do
    [ -d "$r/$CGROUP" ] || continue
    find "$r/$CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ ! -d "$r/$CGROUP" ] || log "warning: could not remove cgroup $r/$CGROUP"
  done
}

memory_cgroup() {
  local r
  for r in $(cg_roots); do
    if [ -f "$r/$CGROUP/memory.max_usage_in_bytes" ] || [ -f "$r/$CGROUP/memory.peak" ]; then
      echo "$r/$CGROUP"
      return 0
    fi
  done
  return 1
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

# --- network -------------------------------------------------------------------------------
net_up() {
  local ns ip idx=0
  ip link add "$LAN_BR" type bridge
  ip addr add "$NODE_IP/24" dev "$LAN_BR"
  ip link set "$LAN_BR" up
  for ns in "$CLIENT_NS" "$HIDDEN_NS"; do
    idx=$((idx + 1))
    ip=$([ "$ns" = "$CLIENT_NS" ] && echo "$CLIENT_IP" || echo "$HIDDEN_IP")
    ip netns add "$ns"
    ip link add "taas-e2e-h$idx" type veth peer name eth0 netns "$ns"
    ip link set "taas-e2e-h$idx" master "$LAN_BR" up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    # The namespace reaches the lan only: no default route.
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"/etc/netns/$ns/hosts"
  done
  printf '%s registrar.%s\n' "$NODE_IP" "$DOMAIN" >>"/etc/netns/$HIDDEN_NS/hosts"
  # The client's names are added by the test (one line per label), as DNS would be.
  printf '%s registrar.%s\n' "$NODE_IP" "$DOMAIN" >>"/etc/netns/$CLIENT_NS/hosts"
  ip route add blackhole "$SVC_CIDR"

  # Safety net, in the mangle table (kube-proxy and kubelet only touch filter and nat).
  iptables -w -t mangle -N "$CHAIN-FWD"
  iptables -w -t mangle -A "$CHAIN-FWD" -i "$POD_BR" -o "$POD_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-FWD" -i "$POD_BR" -o "$LAN_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-FWD" -i "$LAN_BR" -o "$POD_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-FWD" -i "$LAN_BR" -o "$LAN_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-FWD" -j DROP
  iptables -w -t mangle -I FORWARD 1 -j "$CHAIN-FWD"
  iptables -w -t mangle -N "$CHAIN-OUT"
  iptables -w -t mangle -A "$CHAIN-OUT" -o "$POD_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-OUT" -o "$LAN_BR" -j RETURN
  iptables -w -t mangle -A "$CHAIN-OUT" -o lo -j RETURN
  iptables -w -t mangle -A "$CHAIN-OUT" -s "$POD_CIDR" -j DROP
  iptables -w -t mangle -A "$CHAIN-OUT" -s "$LAN_CIDR" -j DROP
  iptables -w -t mangle -A "$CHAIN-OUT" -d "$POD_CIDR" -j DROP
  iptables -w -t mangle -A "$CHAIN-OUT" -d "$SVC_CIDR" -j DROP
  iptables -w -t mangle -I POSTROUTING 1 -j "$CHAIN-OUT"
}

# Removes the chains kube-proxy, kubelet and we made (KUBE-*, CNI-*, TAAS-E2E*) from every
# table, leaving every other rule as it was: each affected table is saved, filtered and
# restored as a whole.
OURS='^:(KUBE-|CNI-|TAAS-E2E)|^-A (KUBE-|CNI-|TAAS-E2E)|-j (KUBE-|CNI-|TAAS-E2E)'
iptables_clean() {
  local save restore t rules
  for save in iptables-save ip6tables-save; do
    restore=${save/-save/-restore}
    command -v "$save" >/dev/null || continue
    for t in $("$save" 2>/dev/null | sed -n 's/^\*//p'); do
      rules=$("$save" -t "$t" 2>/dev/null) || continue
      grep -qE "$OURS" <<<"$rules" || continue
      grep -vE "$OURS" <<<"$rules" | "$restore" -w ||
        log "warning: could not clean $save table $t"
    done
  done
}

net_down() {
  local l ns
  for ns in "$CLIENT_NS" "$HIDDEN_NS"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  # Pod veths normally go with their namespaces; any left on our bridges go now.
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//'); do
    case "$l" in
      taas-e2e-*) ip link del "$l" 2>/dev/null || true ;;
    esac
  done
  for l in $(ip -o link show master "$POD_BR" 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//'); do
    ip link del "$l" 2>/dev/null || true
  done
  ip link del "$POD_BR" 2>/dev/null || true
  ip link del "$LAN_BR" 2>/dev/null || true
  ip route del blackhole "$SVC_CIDR" 2>/dev/null || true
  iptables_clean
  conntrack -D -s "$POD_CIDR" >/dev/null 2>&1 || true
  conntrack -D -s "$LAN_CIDR" >/dev/null 2>&1 || true
}

# --- sysctls ---------------------------------------------------------------------------------
sysctl_key_path() { echo "/proc/sys/${1//.//}"; }

sysctl_save() {
  # Saved once: after a crashed run the file still holds the values from before the first up.
  [ -f "$DIR/sysctls.saved" ] && return 0
  local k f tmp
  tmp=$(mktemp "$DIR/sysctls.XXXXXX")
  for k in "${SYSCTLS[@]}"; do
    f=$(sysctl_key_path "$k")
    [ -r "$f" ] && echo "$k=$(cat "$f")" >>"$tmp"
  done
  mv -f "$tmp" "$DIR/sysctls.saved"
}

sysctl_restore() {
  [ -f "$DIR/sysctls.saved" ] || return 0
  local k v f
  while IFS='=' read -r k v; do
    f=$(sysctl_key_path "$k")
    if [ -w "$f" ] && [ "$(cat "$f")" != "$v" ]; then
      echo "$v" >"$f" 2>/dev/null || log "warning: could not restore $k=$v"
    fi
  done <"$DIR/sysctls.saved"
  rm -f "$DIR/sysctls.saved"
}

# --- mounts and host paths ---------------------------------------------------------------------
mounts_down() {
  local m i
  for ((i = 0; i < 5; i++)); do
    m=$(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    [ -n "$m" ] || return 0
    while read -r t; do umount -l "$t" 2>/dev/null || true; done <<<"$m"
  done
  log "warning: mounts left under $DIR: $(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | tr '\n' ' ')"
}

host_paths_save() {
  [ -f "$DIR/host-paths.absent" ] && return 0
  local p
  for p in "${HOST_PATHS[@]}"; do [ -e "$p" ] || echo "$p"; done >"$DIR/host-paths.absent"
}

host_paths_restore() {
  [ -f "$DIR/host-paths.absent" ] || return 0
  local p
  while read -r p; do
    case "$p" in /*/*) rm -rf "$p" ;; esac
  done <"$DIR/host-paths.absent"
  rm -f "$DIR/host-paths.absent"
}

# --- certificates, tokens, kubeconfigs -------------------------------------------------------
gen_certs() {
  local d=$DIR/pki
  mkdir -p "$d"
  [ -s "$d/sa.key" ] || {
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  }
  if [ ! -s "$d/apiserver.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=taas-e2e-ca" -keyout "$d/ca.key" -out "$d/ca.crt" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=kube-apiserver" -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:$NODE_IP,IP:$SVC_API_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      >"$d/apiserver.ext"
    openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$d/apiserver.ext" -out "$d/apiserver.crt" 2>/dev/null
    # The API server's identity towards kubelet (logs, exec): a client certificate that
    # kubelet's webhook authorizer maps to system:masters.
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout "$d/kubelet-client.key" -out "$d/kubelet-client.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=clientAuth" >"$d/client.ext"
    openssl x509 -req -in "$d/kubelet-client.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$d/client.ext" -out "$d/kubelet-client.crt" 2>/dev/null
    rm -f "$d/apiserver.csr" "$d/apiserver.ext" "$d/kubelet-client.csr" "$d/client.ext" "$d/ca.srl"
  fi
  chmod 600 "$d"/*.key
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

# --- dependencies ----------------------------------------------------------------------------
install_deps() {
  local need=()
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
  command -v openssl >/dev/null || need+=(openssl)
  command -v curl >/dev/null || need+=(curl)
  ((${#need[@]})) || return 0
  log "installing from Debian: ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

check_addresses_free() {
  local c
  for c in 10.231.0. 10.232.0. 10.233.0.; do
    if ip -o addr show | grep -v -e "$LAN_BR" -e "$POD_BR" | grep -qF " $c"; then
      die "address range ${c}0/24 is already used on this machine; refusing to start"
    fi
  done
}

# --- commands --------------------------------------------------------------------------------
T0=0
elapsed() { echo "$((($(date +%s%N) - T0) / 1000000)) ms"; }

is_up() {
  [ -f "$DIR/env" ] || return 1
  local p
  for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null || return 1; done
  is_node_ready
}

kubectl_ok() {
  local k
  k=$(command -v kubectl || echo "$ROOT/.tools/bin/kubectl")
  "$k" --request-timeout=5s "$@" 2>/dev/null
}

teardown() {
  stop_all
  mounts_down
  net_down
  cg_remove
  sysctl_restore
  host_paths_restore
  rm -rf "$DIR/containerd" "$DIR/kubelet" "$DIR/etcd" "$DIR/cni" "$DIR/run" "$DIR/dns"
  rm -f "$DIR/env" "$DIR"/*.kubeconfig "$DIR/tokens.csv"
}

cmd_up() {
  T0=$(date +%s%N)
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock 9
  if is_up; then
    log "already up ($DIR)"
    echo "$DIR/env"
    return 0
  fi
  log "cleaning up any previous run"
  teardown
  install_deps
  check_addresses_free
  local bin
  bin=${TAAS_K8S_BIN:-$(bash "$ROOT/scripts/k8s/build-kubernetes.sh")}
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause; do
    [ -x "$bin/$b" ] || die "missing $bin/$b"
  done
  mkdir -p "$DIR"/{logs,run,dns,cni/conf,cni/ipam,containerd,kubelet,etcd}
  rm -f "$DIR"/logs/*.log

  UP_OK=0
  trap '[ "$UP_OK" = 1 ] || { show_logs; log "up failed: tearing down"; teardown; }' EXIT
  sysctl_save
  host_paths_save
  cg_create
  net_up
  log "network ready ($(elapsed))"

  gen_certs
  local t_admin t_node t_proxy t_sched t_cm
  t_admin=$(openssl rand -hex 24) t_node=$(openssl rand -hex 24) t_proxy=$(openssl rand -hex 24)
  t_sched=$(openssl rand -hex 24) t_cm=$(openssl rand -hex 24)
  (
    umask 077
    cat >"$DIR/tokens.csv" <<EOF
$t_admin,admin,admin,"system:masters"
$t_node,system:node:$NODE,node,"system:nodes"
$t_proxy,system:kube-proxy,kube-proxy
$t_sched,system:kube-scheduler,kube-scheduler
$t_cm,system:kube-controller-manager,kube-controller-manager
EOF
  )

  local etcd_port peer_port api_port kubelet_port proxy_health_port proxy_metrics_port
  read -r etcd_port peer_port proxy_health_port proxy_metrics_port <<<"$(free_ports 127.0.0.1 4)"
  read -r api_port kubelet_port <<<"$(free_ports "$NODE_IP" 2)"
  start etcd etcd --name taas-e2e --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "taas-e2e=http://127.0.0.1:$peer_port" --initial-cluster-state new \
    --logger zap --log-outputs stderr
  wait_for 30 etcd curl -fsS --max-time 1 "http://127.0.0.1:$etcd_port/health"

  SERVER=https://$NODE_IP:$api_port
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$api_port" --insecure-port 0 \
    --cert-dir "$DIR/pki/apiserver" \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" \
    --kubelet-client-certificate "$DIR/pki/kubelet-client.crt" --kubelet-client-key "$DIR/pki/kubelet-client.key" \
    --token-auth-file "$DIR/tokens.csv" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range "$SVC_CIDR" --service-node-port-range 30000-32767 \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --allow-privileged=false --profiling=false
  wait_for "$READY_TIMEOUT" kube-apiserver curl -fsS --max-time 2 --cacert "$DIR/pki/ca.crt" \
    -H "Authorization: Bearer $t_admin" "$SERVER/readyz"
  log "kube-apiserver ready at $SERVER ($(elapsed))"

  write_kubeconfig "$DIR/admin.kubeconfig" "$SERVER" "$DIR/pki/ca.crt" admin "$t_admin"
  write_kubeconfig "$DIR/node.kubeconfig" "$SERVER" "$DIR/pki/ca.crt" "system:node:$NODE" "$t_node"
  write_kubeconfig "$DIR/proxy.kubeconfig" "$SERVER" "$DIR/pki/ca.crt" system:kube-proxy "$t_proxy"
  write_kubeconfig "$DIR/scheduler.kubeconfig" "$SERVER" "$DIR/pki/ca.crt" system:kube-scheduler "$t_sched"
  write_kubeconfig "$DIR/controller-manager.kubeconfig" "$SERVER" "$DIR/pki/ca.crt" system:kube-controller-manager "$t_cm"

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --profiling=false \
    --flex-volume-plugin-dir "$DIR/kubelet/flex"
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$DIR/scheduler.kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --leader-elect=false --profiling=false

  # containerd: every path private to DIR; CNI bridge without masquerading.
  cat >"$DIR/containerd/config.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
[grpc]
  address = "$DIR/containerd/containerd.sock"
[ttrpc]
  address = "$DIR/containerd/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/conf"
    max_conf_num = 1
EOF
  cat >"$DIR/cni/conf/10-taas-e2e.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "taas-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BR",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "loopback"}
  ]
}
EOF
  start containerd containerd --config "$DIR/containerd/config.toml"
  wait_for 30 containerd ctr --address "$DIR/containerd/containerd.sock" version
  import_image_tar "$(pause_image_tar "$bin")"

  # Cluster DNS: dnsmasq answers only cluster names, from the hosts files node-services writes.
  start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
    --listen-address="$NODE_IP" --bind-interfaces --except-interface=lo \
    --hostsdir="$DIR/dns" --local=/cluster.local/ --local="/$DOMAIN/" \
    --domain-needed --bogus-priv --cache-size=0 --pid-file= --user=root --log-facility=-

  # kube-proxy before any pod: a pod's first packet to a ClusterIP must find its rules.
  start kube-proxy "$bin/kube-proxy" --kubeconfig "$DIR/proxy.kubeconfig" \
    --hostname-override "$NODE" --bind-address "$NODE_IP" --proxy-mode iptables \
    --cluster-cidr "$POD_CIDR" --nodeport-addresses "$LAN_CIDR,127.0.0.0/8" \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 \
    --healthz-bind-address "127.0.0.1:$proxy_health_port" --metrics-bind-address "127.0.0.1:$proxy_metrics_port" \
    --profiling=false
  wait_for 60 "kube-proxy's rules" iptables -w -t nat -S KUBE-SERVICES

  # Pods resolve cluster names only (no search of the host's resolvers).
  : >"$DIR/dns/.host-resolv.conf"
  start kubelet "$bin/kubelet" --kubeconfig "$DIR/node.kubeconfig" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" --address "$NODE_IP" --port "$kubelet_port" \
    --healthz-port 0 --read-only-port 0 \
    --container-runtime remote --container-runtime-endpoint "unix://$DIR/containerd/containerd.sock" \
    --image-service-endpoint "unix://$DIR/containerd/containerd.sock" \
    --root-dir "$DIR/kubelet" --cert-dir "$DIR/kubelet/pki" --volume-plugin-dir "$DIR/kubelet/volume-plugins" \
    --cgroup-driver cgroupfs --cgroup-root "/$CGROUP" --cgroups-per-qos=true --enforce-node-allocatable "" \
    --fail-swap-on=false --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
    --eviction-hard "" --cluster-dns "$NODE_IP" --cluster-domain cluster.local \
    --resolv-conf "$DIR/dns/.host-resolv.conf" \
    --serialize-image-pulls=false --register-node=true --max-pods 60 \
    --sync-frequency 10s \
    --anonymous-auth=false --authentication-token-webhook=true --authorization-mode Webhook \
    --client-ca-file "$DIR/pki/ca.crt"

  start node-services python3 "$HERE/node-services.py" --dir "$DIR" --server "$SERVER" \
    --ca "$DIR/pki/ca.crt" --token-file "$DIR/run/admin.token" --node-ip "$NODE_IP" \
    --cgroup "$(memory_cgroup || true)"
  echo "$t_admin" >"$DIR/run/admin.token"
  chmod 600 "$DIR/run/admin.token"

  wait_for "$READY_TIMEOUT" "node $NODE Ready" is_node_ready
  log "node $NODE Ready ($(elapsed))"

  local tmp
  tmp=$(mktemp "$DIR/env.XXXXXX")
  cat >"$tmp" <<EOF
KUBECONFIG=$DIR/admin.kubeconfig
TAAS_E2E_DIR=$DIR
TAAS_E2E_SERVER=$SERVER
TAAS_E2E_NODE=$NODE
TAAS_E2E_NODE_IP=$NODE_IP
TAAS_E2E_CLIENT_NS=$CLIENT_NS
TAAS_E2E_CLIENT_IP=$CLIENT_IP
TAAS_E2E_HIDDEN_NS=$HIDDEN_NS
TAAS_E2E_HIDDEN_IP=$HIDDEN_IP
TAAS_E2E_DOMAIN=$DOMAIN
TAAS_E2E_CONTAINERD=$DIR/containerd/containerd.sock
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$DIR/env"
  UP_OK=1
  trap - EXIT
  log "up in $(elapsed); env in $DIR/env"
  echo "$DIR/env"
}

is_node_ready() {
  KUBECONFIG=$DIR/admin.kubeconfig kubectl_ok get node "$NODE" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

pause_image_tar() { # BIN: writes the pause image tarball, prints its path
  local out=$DIR/run/pause.tar
  python3 "$HERE/image.py" "$out" "$PAUSE_IMAGE" --entrypoint /pause --user 65535:65535 \
    "$1/pause=/pause" 2>/dev/null
  echo "$out"
}

import_image_tar() {
  ctr --address "$DIR/containerd/containerd.sock" -n k8s.io images import "$1" >&2
}

cmd_down() {
  if [ ! -d "$DIR" ]; then
    log "nothing to stop: no $DIR"
    return 0
  fi
  exec 9>"$DIR/.lock"
  flock 9
  T0=$(date +%s%N)
  teardown
  local left=()
  ip link show "$LAN_BR" >/dev/null 2>&1 && left+=("link $LAN_BR")
  ip link show "$POD_BR" >/dev/null 2>&1 && left+=("link $POD_BR")
  ip netns list | grep -q "^taas-e2e" && left+=("netns")
  iptables -w -t mangle -S 2>/dev/null | grep -q "$CHAIN" && left+=("iptables $CHAIN")
  iptables -w -t nat -S 2>/dev/null | grep -q 'KUBE-' && left+=("iptables KUBE-*")
  [ -n "$(cg_pids)" ] && left+=("processes")
  ((${#left[@]} == 0)) || die "left behind after down: ${left[*]}"
  log "down in $(elapsed) ($DIR)"
}

cmd_load() {
  [ -f "$DIR/env" ] || die "not up: $DIR"
  [ -f "$IMAGE" ] || die "no such image tarball: $IMAGE"
  import_image_tar "$IMAGE"
}

cmd_env() {
  is_up || die "not up: $DIR"
  sed 's/^/export /' "$DIR/env"
}

cmd_status() {
  if is_up; then
    log "up: node $NODE Ready ($DIR)"
  else
    local p
    for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null && log "$p running" || log "$p not running"; done
    return 1
  fi
}

cmd_memory() {
  [ -f "$DIR/run/memory.json" ] || die "no memory samples (is the cluster up?)"
  cat "$DIR/run/memory.json"
}

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  load) cmd_load ;;
  env) cmd_env ;;
  status) cmd_status ;;
  memory) cmd_memory ;;
esac
