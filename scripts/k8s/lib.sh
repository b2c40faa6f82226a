# Shell functions shared by scripts/k8s/apiserver.sh and e2e/cluster.sh (sourced, not run).

# free_ports ADDRESS N: N distinct free TCP ports on ADDRESS, chosen by the OS (held together
# while choosing, so they differ), space-separated.
free_ports() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.bind((sys.argv[1], 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# write_kubeconfig OUT SERVER CA_FILE USER TOKEN: a kubeconfig (mode 600, written whole, then
# renamed) for USER with a bearer TOKEN, the CA embedded.
write_kubeconfig() {
  local out=$1 tmp
  tmp=$(mktemp "$out.XXXXXX")
  (
    umask 077
    cat >"$tmp" <<EOF_KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: taas
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 <"$3")
users:
- name: $4
  user:
    token: $5
contexts:
- name: taas
  context:
    cluster: taas
    user: $4
current-context: taas
EOF_KUBECONFIG
  )
  chmod 600 "$tmp"
  mv -f "$tmp" "$out"
}
