#!/usr/bin/env python3
"""The relay's cost of one fresh connection, by entry (issue 15): TAAS's own q, the shared
client port and a direct label on the HTTPS port, as counts that do not move with the
machine's load (CPU time and connections/s do): the instructions it executes (valgrind's
callgrind, user space only) or, with --strace, its system calls (`strace -c -f`).

    python3 bench/entrycost.py OUT_DIR [--conns 400] [--rounds 2] [--strace]

The relay (`taas-relay serve`, the same labels, agents and echo backend as bench/run.sh) runs
under `valgrind --tool=callgrind`; agents, backend and client run natively. For each case,
in interleaved rounds: zero the counters, make CONNS fresh connections one at a time
(`connbench latency`, as `lat`, `lat_shared`, `lat_direct`), wait until the agents have
parked their replacements again (their registrations are part of every connection's cost, the
same for each entry), dump. Instructions per connection = the dump's total / CONNS.
With --strace the relay runs natively and `strace -c -f -p` is attached for each case
instead (counts per connection; strace slows the relay, so ignore the latencies then).
`TAAS_BIN_DIR=DIR` measures another build (a saved baseline). Writes OUT_DIR/entrycost.jsonl
and the dumps (callgrind_annotate OUT_DIR/callgrind.out.*) or OUT_DIR/strace-*.txt.
"""
import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import taasbench as B  # noqa: E402
from conncost import bench_for  # noqa: E402  (also honours TAAS_BIN_DIR)


def total_ir(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s*(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no totals in {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--conns", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strace", action="store_true", help="system calls instead of instructions")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    jf = open(os.path.join(out, "entrycost.jsonl"), "a")
    prefix = os.path.join(out, "callgrind.out")

    def wrap(name, argv):
        if name != "taas-relay" or a.strace:
            return argv
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p",
                "--dump-instr=no", "--dump-line=no"] + argv

    b = bench_for(out, ["taas"], wrap)
    try:
        relay = b.roles["taas"]["relay"][0].pid
        cases = [("own_q", b.taas_q["echo"], ()),
                 ("shared_port", b.P["taas_shared"], (b.taas_hello,)),
                 ("direct", b.P["taas_listen"], (b.taas_hello_direct,))]
        for rnd in range(a.rounds):
            for case, port, first in (cases if rnd % 2 == 0 else cases[::-1]):
                B.until("TAAS agents refilled", b.taas_refilled, 120, 0.1)
                time.sleep(0.5)
                tag = f"{case}-r{rnd}"
                if a.strace:
                    trace = os.path.join(out, f"strace-{tag}.txt")
                    mon = subprocess.Popen(["strace", "-c", "-f", "-o", trace, "-p", str(relay)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
                    time.sleep(1.0)  # attached to every thread
                else:
                    subprocess.run(["callgrind_control", "-z", str(relay)], check=True,
                                   stdout=subprocess.DEVNULL, timeout=60)
                j = b.connbench("latency", f"127.0.0.1:{port}", a.conns, 120, *first, timeout=200)
                B.until("TAAS agents refilled", b.taas_refilled, 120, 0.1)
                time.sleep(0.5)
                n = j.get("count") or 0
                rec = dict(case=case, round=rnd, conns=n, errors=j.get("errors"),
                           p50_us_measured=j.get("p50_us"),
                           loadavg1=float(open("/proc/loadavg").read().split()[0]),
                           taas_bin=B.config.TAAS)
                if a.strace:
                    mon.send_signal(signal.SIGINT)
                    mon.wait(60)
                    calls = {}
                    with open(trace) as fh:
                        for line in fh:
                            parts = line.split()
                            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                                calls[parts[-1]] = int(parts[3])
                    top = sorted(calls.items(), key=lambda kv: -kv[1])[:12]
                    rec.update(syscalls_per_conn=round(sum(calls.values()) / n, 1) if n else None,
                               top={k: round(v / n, 2) for k, v in top} if n else None)
                else:
                    before = set(glob.glob(prefix + ".*"))
                    subprocess.run(["callgrind_control", "-d", tag, str(relay)], check=True,
                                   stdout=subprocess.DEVNULL, timeout=60)
                    B.until("callgrind dump", lambda: set(glob.glob(prefix + ".*")) - before, 60, 0.1)
                    dump = sorted(set(glob.glob(prefix + ".*")) - before)[-1]
                    ir = total_ir(dump)
                    rec.update(ir_total=ir, ir_per_conn=round(ir / n) if n else None,
                               dump=os.path.basename(dump))
                print(json.dumps(rec), flush=True)
                jf.write(json.dumps(rec) + "\n")
                jf.flush()
    finally:
        b.procs.stop_all()


if __name__ == "__main__":
    main()
