# shellcheck shell=bash
# Sourced by e2e/cluster.sh: the cluster's certificates (a CA, the API server's serving and
# kubelet-client certificates, the service-account key pair), made once per DIR.

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
