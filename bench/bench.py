#!/usr/bin/env python3
"""TAAS benchmark against direct, socat, rathole and bore, on loopback. Started by run.sh.

Everything runs on 127.0.0.1; every load is bounded in count and time; every process started
here is stopped here (by its own process group). See bench/README.md; the parts are in the
package bench/taasbench/ (set-up, load, TAAS-only cases, report).

A run writes to --out: results.md (the table), raw.jsonl (every measurement), meta.json and, in
run.sh, run.log (progress). Each process's output goes to --work/logs (scratch) and is copied
into --out/logs only when the run fails.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import sys

from taasbench import Bench, config
from taasbench.config import CASES, PEERS
from taasbench.procs import log, run
from taasbench.report import report


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--short", action="store_true", help="a few seconds per case, 1 round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds per run")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--cases", default="", help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    ap.add_argument("--skip", default="", help="comma-separated: redirects,registrations,parked,labels")
    ap.add_argument("--parked-total", type=int, help="parked connections for the memory case")
    ap.add_argument("--port-base", type=int, default=17000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="scratch: label files, keys, configs, process logs")
    ap.add_argument("--command", default="")
    ap.add_argument("--perf", action="store_true",
                    help="perf record (cpu-clock) the relay and client side of every run")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.short else 3)
    args.duration = args.duration or (2 if args.short else 5)
    if float(args.duration).is_integer():
        args.duration = int(args.duration)  # wrk wants -d5s, not -d5.0s
    args.lat_count = 300 if args.short else 2000
    args.parked_total = args.parked_total or (2000 if args.short else 10000)
    args.park_timeout = 60 if args.short else 240
    args.peers = [p for p in args.peers.split(",") if p]
    if "direct" not in args.peers:
        args.peers.insert(0, "direct")
    args.cases = [c for c in args.cases.split(",") if c]
    args.skip = set(s for s in args.skip.split(",") if s)
    args.parked = {"bulk": 16, "echo": 64, "http": 64}
    args.wrk_conns = 16
    args.settle = 0.5
    os.makedirs(args.out, exist_ok=True)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def versions():
        out = []
        for argv in ([os.path.join(config.TOOLS, "rathole"), "--version"], [os.path.join(config.TOOLS, "bore"), "--version"],
                     ["socat", "-V"], ["iperf3", "--version"], ["nginx", "-v"],
                     [os.path.join(config.TAAS, "taas-relay"), "--version"]):
            try:
                rc, o, e = run(argv, 10)
            except FileNotFoundError:  # a peer not installed (not run: `--peers`)
                out.append(f"{os.path.basename(argv[0])}: not installed")
                continue
            text = (o + e).strip().splitlines()
            line = next((l for l in text if "Build Version" in l), None) or \
                next((l for l in text if re.search(r"\d+\.\d+", l)), text[0] if text else "?")
            if "Build Version" in line:
                line = "rathole " + line.split(":", 1)[1].strip()
            out.append(line.strip())
        rc, o, _ = run(["git", "-C", config.REPO, "rev-parse", "--short", "HEAD"], 10)
        out.append(f"TAAS commit {o.strip()}")
        return "; ".join(out)

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
        "load_start": " ".join(open("/proc/loadavg").read().split()[:3]),
        "command": args.command or shlex.join(sys.argv), "mode": "short" if args.short else "full",
        "rounds": args.rounds, "duration": args.duration, "peers": args.peers,
        "wrk_conns": args.wrk_conns, "versions": versions(),
        "out_rel": os.path.relpath(args.out, config.REPO),
    }
    b = Bench(args)
    ok = True
    try:
        b.start_backends()
        b.start_peers()
        b.rounds()
        if "redirects" not in args.skip and "taas" in args.peers:
            b.redirects()
        b.stop_peers()
        if "registrations" not in args.skip:
            b.registrations()
        if "parked" not in args.skip:
            b.parked_10k()
        if "labels" not in args.skip:
            b.label_cost()
    except Exception as e:  # report what we have
        ok = False
        log(f"ERROR: {e!r}")
        b.record(kind="error", error=repr(e))
    finally:
        b.procs.stop_all()
    if not ok:  # the processes' output explains a failure: keep it with the run
        shutil.copytree(b.logdir, os.path.join(args.out, "logs"), dirs_exist_ok=True)
        log(f"process logs: {os.path.join(args.out, 'logs')}/")
    meta["load_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    text = report(b.raw, meta)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
