# shellcheck shell=bash
# Sourced by e2e/cluster.sh: what the cluster changes on the host outside its links and
# processes, saved by `up` before the first change and restored by `down` (sysctls that
# kubelet, kube-proxy and the CNI plugin set; mounts under DIR; host paths kubelet, containerd
# and CNI create), and the Debian packages it needs.

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
