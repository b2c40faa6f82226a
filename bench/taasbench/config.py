"""Where things are and what a run measures: paths to the tools and the TAAS build, the peers,
the backends and the cases (one table, read by the load, the report and the CLI)."""

import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
REPO = os.path.dirname(HERE)
TOOLS = os.path.join(HERE, ".tools", "bin")
BT = os.path.join(HERE, "tools", "target", "release")
# The TAAS binaries: `TAAS_BIN_DIR` (another build, e.g. a saved baseline), else the release
# build where cargo puts it (`CARGO_TARGET_DIR`, else target/).
TAAS = os.environ.get("TAAS_BIN_DIR") or os.path.join(
    os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")), "release")

PEERS = ["direct", "socat", "rathole", "bore", "taas"]
BACKENDS = ["bulk", "echo", "http"]

# (case, backend, title)
CASES = [
    ("bulk1", "bulk", "iperf3, 1 stream (Gbit/s)"),
    ("bulk1R", "bulk", "iperf3, 1 stream reversed -R (Gbit/s)"),
    ("bulk8", "bulk", "iperf3, 8 streams -P 8 (Gbit/s)"),
    # One connection to the echo backend: `connbench stream` writes for the run's time while it
    # reads the echo, so every byte crosses the path both ways (Gbit/s echoed).
    ("stream", "echo", "one stream through the echo backend, both ways (Gbit/s echoed)"),
    ("lat", "echo", "fresh connection p50 (µs): connect + 1-byte echo + close"),
    ("rate", "echo", "fresh connections/s, 8 closed-loop workers"),
    ("http_ka", "http", "HTTP 1 KiB, wrk keep-alive (req/s)"),
    ("http_close", "http", "HTTP 1 KiB, wrk Connection: close (req/s)"),
    # TAAS only: the same fresh connections through the shared client port (`--shared-port`),
    # the client's first bytes a ClientHello naming echo.taas.localhost (echoed back whole);
    # the ratio is to TAAS's own q (`lat`, `rate`): the cost of the server-name read.
    ("lat_shared", "echo", "fresh connection p50 (µs) via the shared port: connect + ClientHello echo + close"),
    ("rate_shared", "echo", "fresh connections/s via the shared port, 8 closed-loop workers"),
    # TAAS only: the same through the HTTPS front end's port for a direct label (`direct:
    # true`, issue 15): the ClientHello names direct.taas.localhost, read before any TLS.
    ("lat_direct", "echo", "fresh connection p50 (µs) via the HTTPS port, direct label: connect + ClientHello echo + close"),
    ("rate_direct", "echo", "fresh connections/s via the HTTPS port, direct label, 8 closed-loop workers"),
    # TAAS only: the same through the cluster's edge on loopback (a gateway's shared port in
    # front of a label relay, the agent registering and parking through the gateway, issue
    # 18): the ClientHello names edge.taas.localhost; the ratio to own q is the gateway hop.
    ("lat_edge", "echo", "fresh connection p50 (µs) via a gateway's shared port to a label relay: connect + ClientHello echo + close"),
    ("rate_edge", "echo", "fresh connections/s via a gateway's shared port to a label relay, 8 closed-loop workers"),
    ("stream_edge", "echo", "one stream via a gateway's shared port to a label relay, both ways (Gbit/s echoed)"),
]
LOWER_IS_BETTER = {"lat", "lat_shared", "lat_direct", "lat_edge"}
# The cases through the cluster edge: measured on the edge's processes (gateway, label relay,
# agent), not the standalone relay's.
EDGE_CASES = {"lat_edge", "rate_edge", "stream_edge"}
# Cases measured for TAAS alone, and the own-q case each is compared with (measured right
# after it in every round, so that the ratio is read at one moment's load).
TAAS_ONLY = {"lat_shared": "lat", "rate_shared": "rate", "lat_direct": "lat", "rate_direct": "rate",
             "lat_edge": "lat", "rate_edge": "rate", "stream_edge": "stream"}
