#!/usr/bin/env bash
# Smoke test of the test cluster (scripts/k8s/apiserver.sh) with kubectl: CRD + custom object,
# garbage collection of an owned Deployment, NodePort allocation, RBAC of a ServiceAccount
# kubeconfig, then `down` and a check that no process or listening port is left.
# Usage: scripts/k8s/selftest.sh [DIR]   (default: a fresh temporary directory)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/taas-k8s-selftest.XXXXXX")}
PATH="$("$HERE/tools.sh"):$PATH"
export HOME=${HOME:-$DIR}

step() { echo "== $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
# wait_until SECONDS CMD...: poll CMD every 0.5 s
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

step "up"
start=$(date +%s%N)
"$HERE/apiserver.sh" up "$DIR" >/dev/null
echo "up took $((($(date +%s%N) - start) / 1000000)) ms"
trap '"$HERE/apiserver.sh" down "$DIR" || true' EXIT
set -a
. "$DIR/env"
set +a
kubectl version -o json | python3 -c 'import json,sys; print("server", json.load(sys.stdin)["serverVersion"]["gitVersion"])'

step "CRD (apiextensions.k8s.io/v1) and a custom object"
kubectl apply -f - <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.selftest.taas.dev
spec:
  group: selftest.taas.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
EOF
kubectl wait --for condition=Established --timeout=30s crd/widgets.selftest.taas.dev
kubectl apply --server-side -f - <<'EOF'
apiVersion: selftest.taas.dev/v1
kind: Widget
metadata: {name: w1, namespace: default}
spec: {size: 3}
EOF
[ "$(kubectl get widget w1 -o jsonpath='{.spec.size}')" = 3 ] || fail "custom object not stored"
if kubectl apply -f - <<'EOF' 2>/dev/null; then fail "schema validation (minimum) not enforced"; fi
apiVersion: selftest.taas.dev/v1
kind: Widget
metadata: {name: w2, namespace: default}
spec: {size: 0}
EOF
echo "custom object stored, invalid one refused"

step "garbage collection of a Deployment owned by a ConfigMap"
kubectl create configmap owner -n default --from-literal=a=b
uid=$(kubectl get configmap owner -n default -o jsonpath='{.metadata.uid}')
kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: owned
  namespace: default
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: owner, uid: $uid}
spec:
  replicas: 1
  selector: {matchLabels: {app: owned}}
  template:
    metadata: {labels: {app: owned}}
    spec:
      containers: [{name: c, image: example.invalid/none:1}]
EOF
wait_until 30 bash -c '[ -n "$(kubectl get rs -n default -l app=owned -o name)" ]' ||
  fail "no ReplicaSet made from the Deployment"
echo "ReplicaSet: $(kubectl get rs -n default -l app=owned -o name)"
kubectl delete configmap owner -n default
wait_until 30 bash -c '! kubectl get deployment owned -n default' || fail "owned Deployment not collected"
wait_until 30 bash -c '[ -z "$(kubectl get rs -n default -l app=owned -o name)" ]' ||
  fail "ReplicaSet not collected"
echo "Deployment and ReplicaSet garbage-collected"

step "NodePort Service"
kubectl apply --server-side -f - <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  selector: {app: np}
  ports: [{name: tcp, port: 7000, targetPort: 7000, protocol: TCP}]
EOF
np=$(kubectl get svc np -n default -o jsonpath='{.spec.ports[0].nodePort}')
[[ "$np" =~ ^[0-9]+$ ]] && ((np >= 30000 && np <= 32767)) || fail "no nodePort allocated: '$np'"
echo "allocated nodePort $np, clusterIP $(kubectl get svc np -n default -o jsonpath='{.spec.clusterIP}')"

step "ServiceAccount kubeconfig under RBAC"
"$HERE/apiserver.sh" sa-kubeconfig "$DIR" selftest-ns operator "$DIR/sa.kubeconfig"
sa() { kubectl --kubeconfig "$DIR/sa.kubeconfig" "$@"; }
if out=$(sa get configmaps -n selftest-ns 2>&1); then fail "expected forbidden, got: $out"; fi
grep -q forbidden <<<"$out" || fail "expected forbidden, got: $out"
echo "before RBAC: $out"
kubectl create role cm-reader -n selftest-ns --verb=get,list,watch --resource=configmaps
kubectl create rolebinding cm-reader -n selftest-ns --role=cm-reader --serviceaccount=selftest-ns:operator
wait_until 10 sa get configmaps -n selftest-ns || fail "still forbidden after Role/RoleBinding"
echo "after RBAC: allowed ($(sa get configmaps -n selftest-ns -o name | wc -l) configmaps)"
if sa get configmaps -n default >/dev/null 2>&1; then fail "Role leaked into another namespace"; fi
echo "other namespace still forbidden"

step "memory (RSS)"
for p in etcd kube-apiserver kube-controller-manager; do
  echo "$p: $(($(ps -o rss= -p "$(cat "$DIR/$p.pid")") / 1024)) MB"
done

step "down"
read -r -a ports <"$DIR/ports"
pids=$(cat "$DIR"/*.pid)
trap - EXIT
"$HERE/apiserver.sh" down "$DIR"
for pid in $pids; do
  kill -0 "$pid" 2>/dev/null && fail "process $pid still running"
done
for p in "${ports[@]}"; do
  ss -ltnH "sport = :$p" | grep -q . && fail "port $p still listening"
done
echo "no process or listening port left"
echo "selftest: 6 passed, 0 failed"
