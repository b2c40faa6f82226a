#!/usr/bin/env bash
# Checks the Helm chart charts/taas: helm lint --strict, helm template | kubernetes-validate
# --strict for several Kubernetes versions, and assertions on the rendered YAML (Pod Security
# "restricted", least-privilege RBAC, the CRD equal to crds/taaslabels.yaml, the values schema
# rejecting what it must, examples/label.yaml against the CRD schema). See scripts/chart/check.py.
# Run from anywhere; tools come from scripts/k8s/tools.sh (PyPI only, cached under .tools).
# Ends with one line `chart: N passed, M failed`; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(scripts/k8s/tools.sh)
VENV=${TAAS_TOOLS_VENV:-$(dirname "$BIN")/venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "chart: no Python in $VENV (scripts/k8s/tools.sh should have made it)" >&2; exit 1; }

# The checker's packages, in the tools venv (kubernetes-validate already brings both).
if ! "$PY" -c 'import jsonschema, yaml' 2>/dev/null; then
  echo "chart: installing jsonschema and PyYAML into $VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check 'jsonschema>=4,<5' 'PyYAML>=6,<7' >&2
fi

# helm keeps its config, cache and data here, never in the user's home.
HELM_HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HELM_HOME_DIR"' EXIT
export HELM_CONFIG_HOME="$HELM_HOME_DIR/config" HELM_CACHE_HOME="$HELM_HOME_DIR/cache" \
  HELM_DATA_HOME="$HELM_HOME_DIR/data"

echo "== chart: $("$BIN/helm" version --short), kubernetes-validate $("$BIN/kubernetes-validate" --version 2>&1)"
"$PY" scripts/chart/check.py --helm "$BIN/helm" --kubernetes-validate "$BIN/kubernetes-validate"
