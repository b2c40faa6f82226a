#!/usr/bin/env bash
# Builds the TAAS image as a docker-archive tarball from the release binaries, with no Docker
# and no registry: `cargo build --release`, then e2e/image.py puts taas-relay, taas-agent and
# taas-operator (with the shared libraries ldd lists: glibc, libgcc) into one layer FROM
# scratch, user 65532 (nonroot), entrypoint taas-relay — the same contents as the Dockerfile's
# distroless image. Prints the tarball's path on stdout.
#
#   e2e/build-image.sh [OUT.tar]     default: target/taas-image-VERSION.tar, tag taas:VERSION
#
# Import it with `e2e/cluster.sh load OUT.tar` (or `ctr -n k8s.io images import`, `docker load`).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/taas/Chart.yaml)
out=${1:-target/taas-image-$version.tar}
echo "build-image: cargo build --release (taas-relay, taas-agent, taas-operator)" >&2
# One package at a time: each gets the dependency features it asks for, as `cargo run
# --release -p taas-relay` (the README's first command, tested before this) does, so that
# build is reused instead of a second one with features unified across both packages.
cargo build --release --locked -p taas-relay >&2
cargo build --release --locked -p taas-operator >&2
ca=/etc/ssl/certs/ca-certificates.crt
python3 e2e/image.py "$out" "taas:$version" --ldd --passwd --user 65532:65532 \
  ${ca:+$( [ -f "$ca" ] && echo --ca-certificates "$ca")} \
  --entrypoint /usr/local/bin/taas-relay --cmd=--help \
  target/release/taas-relay=/usr/local/bin/taas-relay \
  target/release/taas-agent=/usr/local/bin/taas-agent \
  target/release/taas-operator=/usr/local/bin/taas-operator
echo "$out"
