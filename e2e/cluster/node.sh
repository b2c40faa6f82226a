# shellcheck shell=bash
# Sourced by e2e/cluster.sh: the node: containerd (every path private to DIR) with the pause
# image, the CNI bridge without masquerading, dnsmasq answering cluster names only, kube-proxy
# (before any pod: a pod's first packet to a ClusterIP must find its rules), kubelet, and
# e2e/node-services.py. Called from cmd_up after start_control_plane, whose variables it reads.

start_node() {
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
    --serialize-image-pulls=false --register-node=true --max-pods 120 \
    --sync-frequency 10s \
    --anonymous-auth=false --authentication-token-webhook=true --authorization-mode Webhook \
    --client-ca-file "$DIR/pki/ca.crt"

  start node-services python3 "$HERE/node-services.py" --dir "$DIR" --server "$SERVER" \
    --ca "$DIR/pki/ca.crt" --token-file "$DIR/run/admin.token" --node-ip "$NODE_IP" \
    --cgroup "$(memory_cgroup || true)"
  echo "$t_admin" >"$DIR/run/admin.token"
  chmod 600 "$DIR/run/admin.token"
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
