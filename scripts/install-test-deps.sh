#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: curl (the real mobile client
# of the end-to-end tests), openssl and Chromium (the browser test, scripts/browser/run.sh)
# from Debian's packages; rustfmt and clippy; and the Python packages of the chart tests
# (pytest, pytest-xdist, jsonschema, PyYAML) and of the browser test (pytest, Playwright, which
# drives Debian's Chromium and downloads no browser), pinned, from PyPI into the tools venv of
# scripts/k8s/tools.sh (<repo>/.tools/venv, or $TAAS_TOOLS_VENV), beside kubernetes-validate.
# Idempotent. `--chart-only`: only the chart tests' Python packages (scripts/test-chart.sh calls
# it so; the venv must exist). `--browser-only`: only the browser test's Python packages (the
# venv is made if missing; scripts/browser/run.sh calls it so).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

PYTEST_VER=9.2.0
XDIST_VER=3.8.0
PLAYWRIGHT_VER=1.65.2

chart_packages() {
  local venv=${TAAS_TOOLS_VENV:-$ROOT/.tools/venv}
  [ -x "$venv/bin/python" ] || venv=$(dirname "$(bash "$ROOT/scripts/k8s/tools.sh")")/venv
  local py="$venv/bin/python"
  if ! "$py" - "$PYTEST_VER" "$XDIST_VER" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
import jsonschema, yaml  # noqa: F401
assert version("pytest") == sys.argv[1] and version("pytest-xdist") == sys.argv[2]
PY
    echo "installing pytest==$PYTEST_VER, pytest-xdist==$XDIST_VER, jsonschema, PyYAML into $venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check "pytest==$PYTEST_VER" \
      "pytest-xdist==$XDIST_VER" 'jsonschema>=4,<5' 'PyYAML>=6,<7' >&2
  fi
}

browser_packages() {
  local venv=${TAAS_TOOLS_VENV:-$ROOT/.tools/venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  local py="$venv/bin/python"
  if ! "$py" - "$PYTEST_VER" "$PLAYWRIGHT_VER" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
assert version("pytest") == sys.argv[1] and version("playwright") == sys.argv[2]
PY
    echo "installing pytest==$PYTEST_VER, playwright==$PLAYWRIGHT_VER into $venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check "pytest==$PYTEST_VER" \
      "playwright==$PLAYWRIGHT_VER" >&2
  fi
}

if [ "${1:-}" = "--browser-only" ]; then
  browser_packages
  exit 0
fi

if [ "${1:-}" = "--chart-only" ]; then
  chart_packages
  exit 0
fi

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# Debian's Chromium (the browser test's browser; Playwright downloads none), and a font for
# its screenshot.
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium fonts-dejavu-core)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
chart_packages
browser_packages
