#!/usr/bin/env python3
"""Cost of one fresh connection, as counts that stay comparable on a busy machine (issue 6):
CPU µs and system calls (strace -c) per connection of the relay side and the client side, and
a perf profile, during `connbench rate` (8 workers) through the echo backend. The CPU lines
also give the whole machine's CPU per connection and its idle share during the run.
Reuses bench.py's set-up (the package taasbench) (same labels, parked counts and ports as bench/run.sh).

    python3 bench/conncost.py OUT_DIR [--peers taas,rathole,taas_edge] [--seconds 5] [--rounds 3]
                              [--lat] [--strace] [--perf] [--no-cpu]

`taas_edge` is the cluster's edge on loopback (bench/run.sh's `rate_edge`: a gateway's shared
port in front of a label relay whose agent parks through the gateway); its relay side is the
gateway and the label relay together, which --strace and --perf also show one by one, and each
run also records what the gateway forwarded per client connection (`edge_flows`).

Prints one line per measurement and writes OUT_DIR/conncost.jsonl (+ strace-*.txt, perf-*).
strace and perf slow the processes: read them as counts per
connection, not as time. Build first (bench/run.sh does): TAAS release, bench/tools, the peers.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import taasbench as B  # noqa: E402
from taasbench import config  # noqa: E402

# Another build of TAAS (e.g. a saved baseline) instead of target/release.
config.TAAS = os.environ.get("TAAS_BIN_DIR", config.TAAS)

work = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".run")


def bench_for(out, peers, wrap=None):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    edge = "taas_edge" in peers
    peers = [p for p in peers if p != "taas_edge"]
    if edge and "taas" not in peers:
        peers.append("taas")  # the edge is started with TAAS's peers
    args = types.SimpleNamespace(
        out=out, work=work, port_base=17000, peers=["direct"] + peers,
        parked={"bulk": 16, "echo": 64, "http": 64}, duration=3, settle=0.5, perf=False,
        lat_count=500, wrk_conns=16, cases=["rate_edge"] if edge else [], rounds=1, parked_total=2000, park_timeout=240)
    start = B.Procs.start
    if wrap:
        def wrapped(self, name, argv, env=None, cwd=None):
            return start(self, name, wrap(name, argv), env, cwd)
        B.Procs.start = wrapped
    b = None
    try:
        b = B.Bench(args)
        b.start_backends()
        b.start_peers()
    except BaseException:
        if b is not None:
            b.procs.stop_all()  # nothing left listening on the bench's ports
        raise
    finally:
        B.Procs.start = start
    return b


def pids(b, peer, role):
    return [p.pid for p in b.roles[peer][role]]


def refilled(b, peer):
    """Waits until TAAS's agents have replaced the connections the last run used."""
    if peer == "taas_edge":
        B.until("the edge agent refilled", b.edge_refilled, 60, 0.05)
    if peer == "taas":
        B.until("TAAS agents refilled", b.taas_refilled, 60, 0.05)


def rate(b, peer, seconds):
    refilled(b, peer)
    if peer == "taas_edge":
        return b.connbench("rate", f"127.0.0.1:{b.P['edge_shared']}", 8, seconds,
                           b.taas_hello_edge, timeout=seconds + 60)
    port = b.peer_port(peer, "echo")
    return b.connbench("rate", f"127.0.0.1:{port}", 8, seconds, timeout=seconds + 60)


def processes(b, peer):
    """The processes measured one by one: the relay side and the client side, and for the edge
    the gateway and the label relay apart."""
    if peer == "taas_edge":
        gateway, relay = b.roles[peer]["relay"]
        return {"gateway": [gateway.pid], "label_relay": [relay.pid], "agent": pids(b, peer, "agent")}
    return {"relay": pids(b, peer, "relay"), "agent": pids(b, peer, "agent")}


def gateway_forwarded(b):
    """The edge gateway's forwarded connections so far, by entry (shared_port, rendezvous)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{b.P['edge_metrics']}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^taas_gateway_edge_connections_total\{entry="(\w+)"\}\s+(\S+)', text, re.M)}


TICKS = os.sysconf("SC_CLK_TCK")


def machine_ticks():
    """(busy, idle) clock ticks of all CPUs together, from /proc/stat (idle includes iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, idle


def cpu(out, peers, seconds, rounds, rec, lat=False):
    b = bench_for(out, peers)
    try:
        for rnd in range(rounds):
            for peer in (peers if rnd % 2 == 0 else peers[::-1]):
                c0 = {r: sum(B.cpu_seconds(p) for p in pids(b, peer, r)) for r in ("relay", "agent")}
                f0 = gateway_forwarded(b) if peer == "taas_edge" else None
                m0 = machine_ticks()
                j = rate(b, peer, seconds)
                m1 = machine_ticks()
                c1 = {r: sum(B.cpu_seconds(p) for p in pids(b, peer, r)) for r in ("relay", "agent")}
                n = j.get("conns_total") or 0
                if f0 is not None and n:
                    f1 = gateway_forwarded(b)
                    rec(kind="edge_flows", peer=peer, round=rnd, conns=n,
                        forwarded_per_conn={e: round((f1[e] - f0.get(e, 0)) / n, 2) for e in f1})
                us = {r: round((c1[r] - c0[r]) * 1e6 / n, 1) if n else None for r in c0}
                busy, idle = m1[0] - m0[0], m1[1] - m0[1]
                rec(kind="cpu", peer=peer, round=rnd, conns=n, per_sec=j.get("per_sec"),
                    errors=j.get("errors"), relay_us=us["relay"], agent_us=us["agent"],
                    total_us=round(us["relay"] + us["agent"], 1) if n else None,
                    # The whole machine (clients, backend, kernel too): a closed loop that
                    # leaves CPUs idle is waiting on wake-ups, not on work.
                    machine_us=round(busy / TICKS * 1e6 / n, 1) if n else None,
                    machine_idle_pct=round(100 * idle / (busy + idle), 1) if busy + idle else None)
            if lat:
                for peer in ["direct"] + [p for p in peers if p != "taas_edge"]:
                    refilled(b, peer)
                    port = b.peer_port(peer, "echo")
                    j = b.connbench("latency", f"127.0.0.1:{port}", 2000, 10, timeout=60)
                    rec(kind="lat", peer=peer, round=rnd, p50_us=j.get("p50_us"),
                        p99_us=j.get("p99_us"), count=j.get("count"))
        for peer in peers:
            r = b.roles[peer]
            rec(kind="rss_idle", peer=peer,
                relay_kib=sum(B.status_kib(p.pid, "VmRSS") for p in r["relay"]),
                agent_kib=sum(B.status_kib(p.pid, "VmRSS") for p in r["agent"]))
    finally:
        b.procs.stop_all()


def monitored_rate(b, peer, seconds, monitor, settle):
    """`rate` with a monitor attached to each role's processes: `monitor(role, pids)` gives the
    monitor's argv and its output file. Monitors start `settle` seconds before the run and get
    SIGINT after it. Returns the run's result and {role: output file}."""
    # Refilled before the monitors start, so that they count the run's connections only.
    refilled(b, peer)
    mons, files = [], {}
    for role, role_pids in processes(b, peer).items():
        argv, files[role] = monitor(role, role_pids)
        mons.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True))
    time.sleep(settle)
    j = rate(b, peer, seconds)
    for m in mons:
        m.send_signal(signal.SIGINT)
    for m in mons:
        m.wait(60)
    return j, files


def strace(out, peers, seconds, rec):
    b = bench_for(out, peers)
    try:
        for peer in peers:
            def monitor(role, role_pids):
                f = os.path.join(out, f"strace-{peer}-{role}.txt")
                return ["strace", "-c", "-f", "-o", f] + sum([["-p", str(p)] for p in role_pids], []), f
            j, files = monitored_rate(b, peer, seconds, monitor, settle=1.0)
            n = j.get("conns_total") or 0
            for role, f in files.items():
                calls = {}
                with open(f) as fh:
                    for line in fh:
                        parts = line.split()
                        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                            calls[parts[-1]] = int(parts[3])
                total = sum(calls.values())
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:12]
                rec(kind="strace", peer=peer, role=role, conns=n,
                    per_conn=round(total / n, 1) if n else None,
                    top={k: round(v / n, 2) for k, v in top} if n else None)
            time.sleep(1)
    finally:
        b.procs.stop_all()


def perf(out, peers, seconds, rec):
    b = bench_for(out, peers)
    try:
        for peer in peers:
            def monitor(role, role_pids):
                f = os.path.join(out, f"perf-{peer}-{role}.data")
                return ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-o", f,
                        "-p", ",".join(map(str, role_pids))], f
            j, files = monitored_rate(b, peer, seconds, monitor, settle=0.5)
            for f in files.values():
                for sort, suffix in (("dso,sym", "flat"), ("comm,dso", "dso")):
                    with open(f.replace(".data", f"-{suffix}.txt"), "w") as fh:
                        subprocess.run(["perf", "report", "-i", f, "--no-children", "--sort", sort,
                                        "--stdio", "-g", "none", "--percent-limit", "0.3"],
                                       stdout=fh, stderr=subprocess.DEVNULL, timeout=300)
            rec(kind="perf", peer=peer, conns=j.get("conns_total"))
    finally:
        b.procs.stop_all()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--peers", default="taas")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--lat", action="store_true", help="also connbench latency (2,000 connections)")
    ap.add_argument("--no-cpu", action="store_true")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    peers = a.peers.split(",")
    jf = open(os.path.join(out, "conncost.jsonl"), "a")

    def rec(**kw):
        kw["loadavg1"] = float(open("/proc/loadavg").read().split()[0])
        line = json.dumps(kw)
        print(line, flush=True)
        jf.write(line + "\n")
        jf.flush()

    if not a.no_cpu:
        cpu(out, peers, a.seconds, a.rounds, rec, a.lat)
    if a.strace:
        strace(out, peers, a.seconds, rec)
    if a.perf:
        perf(out, peers, a.seconds, rec)


if __name__ == "__main__":
    main()
