# shellcheck shell=bash
# Sourced by e2e/cluster.sh: its sub-commands (cmd_NAME) and the teardown that `up` (after a
# crashed run) and `down` share.

is_up() {
  [ -f "$DIR/env" ] || return 1
  local p
  for p in "${PROCS[@]}"; do pid_of "$p" >/dev/null || return 1; done
  is_node_ready
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

  # Set by start_control_plane, read by start_node (bash's locals are seen by callees).
  local etcd_port peer_port api_port kubelet_port proxy_health_port proxy_metrics_port
  start_control_plane
  start_node

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
