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
  "/etc/netns/$CLIENT_NS" "/etc/netns/$HIDDEN_NS")

# The parts, by topic (each file says what it holds and why); they only define functions.
# shellcheck source=cluster/lib.sh
. "$HERE/cluster/lib.sh"
# shellcheck source=cluster/cgroups.sh
. "$HERE/cluster/cgroups.sh"
# shellcheck source=cluster/network.sh
. "$HERE/cluster/network.sh"
# shellcheck source=cluster/host.sh
. "$HERE/cluster/host.sh"
# shellcheck source=cluster/pki.sh
. "$HERE/cluster/pki.sh"
# shellcheck source=cluster/control-plane.sh
. "$HERE/cluster/control-plane.sh"
# shellcheck source=cluster/node.sh
. "$HERE/cluster/node.sh"
# shellcheck source=cluster/commands.sh
. "$HERE/cluster/commands.sh"

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

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  load) cmd_load ;;
  env) cmd_env ;;
  status) cmd_status ;;
  memory) cmd_memory ;;
esac
