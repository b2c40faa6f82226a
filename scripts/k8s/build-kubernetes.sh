#!/usr/bin/env bash
# Builds the Kubernetes v1.20.2 components from Debian bookworm's `kubernetes` source package
# (all Go dependencies vendored) with Debian's Go, plus the pause container's static binary from
# the same source, and caches them outside the clone:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/taas/k8s-1.20.2/bin/{kube-apiserver,kube-controller-manager,
#                                                      kube-scheduler,kubelet,kube-proxy,pause}
#
# The API server tests (scripts/k8s/apiserver.sh) use the first two; the pod-running cluster
# (e2e/cluster.sh) uses all of them. They are built in one pass: one cold build per machine.
#
# A second run finds them there and returns at once. The only output on stdout is that bin
# directory (progress goes to stderr), so callers can do BIN=$(scripts/k8s/build-kubernetes.sh).
#
# Cold: installs golang-go etcd-server make rsync from Debian if missing, downloads the source
# package through a private apt sources list (the system's apt configuration is not changed),
# applies one patch (reflect2 v1.0.1 -> v1.0.2's mapiterinit fix, needed by Go >= 1.18), runs
# `make WHAT=...` (about 4-8 minutes on 2 cores, ~2 GB of build tree), copies the binaries and
# deletes the build tree and the Go build cache it used.
#
# Env: TAAS_K8S_CACHE overrides the cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/taas).
#      TAAS_K8S_REBUILD=1 forces a rebuild.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
# Bump when the build recipe (patch, flags) changes, so cached binaries are rebuilt.
RECIPE=2
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

CACHE_ROOT=${TAAS_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/taas}
KDIR=$CACHE_ROOT/k8s-$K8S_VERSION
OUT=$KDIR/bin
STAMP=$OUT/.built
WANT_STAMP="kubernetes $DEB_VERSION recipe $RECIPE"

log() { echo "build-kubernetes: $*" >&2; }

cached() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] || return 1
  local b
  for b in "${BINS[@]}" pause; do [ -x "$OUT/$b" ] || return 1; done
}

if [ "${TAAS_K8S_REBUILD:-0}" != 1 ] && cached; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$KDIR"
# One build at a time (parallel test runs on a fresh machine).
exec 9>"$KDIR/.lock"
flock 9
if [ "${TAAS_K8S_REBUILD:-0}" != 1 ] && cached; then
  echo "$OUT"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v make >/dev/null 2>&1 || need+=(make)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]})); then
  log "installing from Debian: ${need[*]}"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
log "$(go version)"

WORK=$(mktemp -d "$KDIR/build.XXXXXX")
cleanup() {
  # Go's module cache marks files read-only; make them writable so rm succeeds.
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- source: private apt state, deb-src lines mirroring the system's deb lines -------------
APT_DIR=$WORK/apt
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
SYS_SOURCES=/etc/apt/sources.list.d/debian.sources
if [ -f "$SYS_SOURCES" ]; then
  # deb822 -> one-line deb-src entries with the same URIs, suites, components and keyring.
  awk '
    function flush(   n, S, i, j, m, U) {
      if (types ~ /(^| )deb( |$)/ && uris != "") {
        m = split(uris, U, " "); n = split(suites, S, " ")
        for (j = 1; j <= m; j++) for (i = 1; i <= n; i++) {
          printf "deb-src"
          if (sb != "") printf " [signed-by=%s]", sb
          printf " %s %s %s\n", U[j], S[i], comps
        }
      }
      types = ""; uris = ""; suites = ""; comps = ""; sb = ""
    }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    { key = $1; sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
      if (key == "Types") types = $0; else if (key == "URIs") uris = $0
      else if (key == "Suites") suites = $0; else if (key == "Components") comps = $0
      else if (key == "Signed-By") sb = $0 }
    END { flush() }' "$SYS_SOURCES" >"$APT_DIR/sources.list"
fi
if ! grep -q '^deb-src' "$APT_DIR/sources.list" 2>/dev/null; then
  kr=/usr/share/keyrings/debian-archive-keyring.gpg
  {
    echo "deb-src [signed-by=$kr] http://deb.debian.org/debian bookworm main"
    echo "deb-src [signed-by=$kr] http://deb.debian.org/debian bookworm-updates main"
    echo "deb-src [signed-by=$kr] http://deb.debian.org/debian-security bookworm-security main"
  } >"$APT_DIR/sources.list"
fi
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$APT_DIR/lists"
  -o "Dir::Cache=$APT_DIR/cache"
  -o "APT::Sandbox::User=root"
)
log "fetching source package kubernetes=$DEB_VERSION"
apt-get "${APT_OPTS[@]}" update -qq >&2
(cd "$WORK" && apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=$DEB_VERSION" >&2)
tar -xzf "$WORK"/kubernetes_*.orig.tar.gz -C "$WORK"
rm -f "$WORK"/kubernetes_*.orig.tar.gz
SRC=$WORK/kubernetes-$K8S_VERSION
[ -d "$SRC" ] || { log "unexpected tarball layout"; exit 1; }

# --- patch: vendored reflect2 v1.0.1 -> v1.0.2's map iterator ------------------------------
# Go 1.18+ changed reflect.mapiterinit to take the iterator as a third argument (the caller
# allocates it) and the runtime's hiter grew beyond the two fields reflect2 declared.
log "patching vendor/github.com/modern-go/reflect2 (mapiterinit with *hiter)"
python3 - "$SRC/vendor/github.com/modern-go/reflect2" <<'PY'
import pathlib, sys
d = pathlib.Path(sys.argv[1])

def sub(path, old, new):
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"reflect2 patch: expected text not found once in {path.name}")
    path.write_text(text.replace(old, new))

link = d / "unsafe_link.go"
sub(link,
    "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter\n",
    "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)\n")
sub(link,
    """type hiter struct {
	key   unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).
	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	// rest fields are ignored
}""",
    """type hiter struct {
	key         unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).
	value       unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}""")

umap = d / "unsafe_map.go"
sub(umap,
    """	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),""",
    """	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,""")
PY

# --- build ---------------------------------------------------------------------------------
log "building ${BINS[*]} (several minutes)"
start=$(date +%s)
(
  cd "$SRC"
  mkdir -p .go/src/k8s.io
  [ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
  export GOPATH=$SRC/.go CGO_ENABLED=0
  export GOCACHE=$WORK/gocache GOTMPDIR=$WORK/gotmp
  mkdir -p "$GOTMPDIR"
  make WHAT="${BINS[*]/#/cmd/}" >&2
)
log "built in $(($(date +%s) - start)) s"

mkdir -p "$OUT"
for b in "${BINS[@]}"; do
  f=$SRC/_output/bin/$b
  [ -x "$f" ] || f=$SRC/_output/local/bin/linux/amd64/$b
  [ -x "$f" ] || { log "missing build output $b"; exit 1; }
  cp "$f" "$OUT/.$b.tmp"
  mv -f "$OUT/.$b.tmp" "$OUT/$b"
done
# The pod sandbox ("pause") image's only binary; static, so the image needs nothing else.
gcc -Os -static -Wall -o "$OUT/.pause.tmp" "$SRC/build/pause/linux/pause.c" \
  -DVERSION="\"$K8S_VERSION-taas\""
mv -f "$OUT/.pause.tmp" "$OUT/pause"
echo "$WANT_STAMP" >"$STAMP"
"$OUT/kube-apiserver" --version >&2
echo "$OUT"
