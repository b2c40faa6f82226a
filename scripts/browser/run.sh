#!/usr/bin/env bash
# The browser test (issue 15.2): headless Chromium (Debian's) and curl reach a direct label
# with a plain URL, https://LABEL.<domain>:<relay's HTTPS port>/, through the real
# `taas-relay serve` and `taas-agent` binaries, with TLS end to end to a hidden server whose
# certificate (from a test CA) the relay never has; a plain label on the same relay still
# answers 307. The tests are scripts/browser/test_*.py (pytest + Playwright, in the tools venv
# of scripts/k8s/tools.sh, <repo>/.tools/venv or $TAAS_TOOLS_VENV); set-up in conftest.py.
# Builds the binaries (`cargo build -p taas-relay --bins`, debug, as `cargo test` does) in the
# usual target directory ($CARGO_TARGET_DIR respected). Writes a screenshot of the hidden
# server's page to docs/direct-label.png (TAAS_BROWSER_SCREENSHOT= another path, or empty for
# none). The web console's test (test_console.py, issue 17) runs against the same relay's
# console; `TAAS_SCREENSHOTS=1 bash scripts/browser/run.sh` also regenerates the console's
# screenshots in docs/ (console-table.png, console-form-error.png, console-secret.png).
# Extra arguments go to pytest (e.g. `-k curl`, `-x`).
# Ends with one line `browser: N passed, M failed`; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

VENV=${TAAS_TOOLS_VENV:-$ROOT/.tools/venv}
PY="$VENV/bin/python"
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
export CHROMIUM

fail() {
  echo "browser: $*" >&2
  echo "browser: 0 passed, 1 failed"
  exit 1
}

[ -x "$CHROMIUM" ] ||
  fail "no Chromium at $CHROMIUM (scripts/install-test-deps.sh installs Debian's)"
command -v openssl >/dev/null || fail "no openssl (scripts/install-test-deps.sh installs it)"
command -v curl >/dev/null || fail "no curl (scripts/install-test-deps.sh installs it)"
TAAS_TOOLS_VENV="$VENV" bash scripts/install-test-deps.sh --browser-only >&2 ||
  fail "could not install the Python packages into $VENV"

echo "== browser: cargo build -p taas-relay --bins" >&2
cargo build --quiet --locked -p taas-relay --bins >&2 || fail "the build failed"
TARGET=$(cargo metadata --format-version 1 --no-deps --locked |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET/debug"

# Every process the tests start is the leader of its own session and is listed here, so
# that it ends even if pytest itself is killed.
RUN=$(mktemp -d)
PIDS="$RUN/pids"
: >"$PIDS"
cleanup() {
  while read -r pid; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done <"$PIDS"
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export TAAS_BROWSER_BIN="$BIN" TAAS_BROWSER_PIDS="$PIDS" PYTHONDONTWRITEBYTECODE=1
export TAAS_BROWSER_SCREENSHOT=${TAAS_BROWSER_SCREENSHOT-$ROOT/docs/direct-label.png}

echo "== browser: $("$CHROMIUM" --version 2>/dev/null), Playwright $("$PY" -c \
  'from importlib.metadata import version; print(version("playwright"))')" >&2
status=0
# Bounded as a whole (each wait inside is bounded too).
timeout --kill-after=10 600 "$PY" -m pytest -c scripts/browser/pytest.ini \
  --rootdir scripts/browser -v -rfE "$@" scripts/browser | tee "$RUN/out" || status=$?
# pytest prints the closing line itself (conftest.py); one is printed here if it died first.
if ! tail -n 1 "$RUN/out" | grep -Eq '^browser: [0-9]+ passed, [0-9]+ failed$'; then
  echo "browser: 0 passed, 1 failed"
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
