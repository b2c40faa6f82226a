# shellcheck shell=bash
# Sourced by e2e/cluster.sh: the control plane: etcd, kube-apiserver (RBAC, tokens from
# tokens.csv), kube-controller-manager and kube-scheduler, on loopback or the node address only.
# Called from cmd_up, whose locals it reads (bin, the tokens t_*) and sets (the ports, which
# start_node reads too); sets SERVER.

start_control_plane() {
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
}
