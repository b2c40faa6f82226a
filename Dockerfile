# syntax=docker/dockerfile:1
# The TAAS image: taas-operator, taas-relay (operator, gateway and per-label relay pods, all
# run by charts/taas) and taas-agent. Build from the repository root:
#   docker build -t taas:0.1.0 .
# The final image has no shell and no package manager: the binaries, glibc/libgcc (the
# distroless "cc" base), CA certificates and the nonroot user 65532.

# --- build: the Rust toolchain pinned (the project's rust-version is 1.80; this is the one
# CI uses). Debian bookworm, the same glibc as the distroless debian12 base below.
FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p taas-relay -p taas-operator \
    && mkdir -p /out \
    && cp target/release/taas-relay target/release/taas-agent target/release/taas-operator /out/

# --- run
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# No default command worth having in a cluster: the chart and the operator set it
# (taas-operator; taas-relay gateway; taas-relay label-relay). Alone, it is the relay.
ENTRYPOINT ["/usr/local/bin/taas-relay"]
CMD ["--help"]
