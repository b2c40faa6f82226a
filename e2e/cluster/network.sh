# shellcheck shell=bash
# Sourced by e2e/cluster.sh: the cluster's links, namespaces, routes and iptables rules.
#
# Network safety: no packet of the cluster may leave the machine. The CNI bridge has ipMasq off
# (cluster/node.sh); the mangle table's FORWARD chain drops everything forwarded except between
# the pod bridge and the lan bridge, and POSTROUTING drops any packet from the pod or lan ranges
# leaving through another link; the Service range is a blackhole route; dnsmasq has no upstream
# server and kube-proxy starts before any pod (cluster/node.sh); `down` removes every link,
# namespace, route and rule made here. `up` refuses to start if the ranges are in use.

check_addresses_free() {
  local c
  for c in 10.231.0. 10.232.0. 10.233.0.; do
    if ip -o addr show | grep -v -e "$LAN_BR" -e "$POD_BR" | grep -qF " $c"; then
      die "address range ${c}0/24 is already used on this machine; refusing to start"
    fi
  done
}

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
