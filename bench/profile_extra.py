#!/usr/bin/env python3
"""Per-connection system calls, context switches and page faults (perf stat, strace -c) of
rathole and TAAS during 3 s of `connbench rate` (8 workers), and a heap profile (valgrind
massif) of a TAAS relay holding N parked connections. Reuses bench.py's set-up (the package taasbench).

    python3 bench/profile_extra.py OUT_DIR [PARKED=2000]

Writes OUT_DIR/syscalls/{perfstat,strace}-PEER-ROLE.txt (+ -conns.txt: connections made) and
OUT_DIR/massif/massif.{out,txt}. strace slows the processes a lot: read it for counts per
connection, not for time.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import taasbench as B  # noqa: E402

out = os.path.abspath(sys.argv[1])
parked = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
work = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".run")


def fresh_args(sub, peers):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    d = os.path.join(out, sub)
    os.makedirs(d, exist_ok=True)
    return types.SimpleNamespace(
        out=d, work=work, port_base=17000, peers=peers, parked={"bulk": 16, "echo": 64, "http": 64},
        duration=3, settle=0.5, perf=False, lat_count=500, wrk_conns=16, cases=[], rounds=1,
        parked_total=parked, park_timeout=240)


def syscalls():
    args = fresh_args("syscalls", ["direct", "rathole", "taas"])
    b = B.Bench(args)
    try:
        b.start_backends()
        b.start_peers()
        for peer in ("rathole", "taas"):
            for tool in ("perfstat", "strace"):
                if peer == "taas":
                    B.until("TAAS agents refilled", b.taas_refilled, 30, 0.05)
                port = b.peer_port(peer, "echo")
                mons = []
                for role in ("relay", "agent"):
                    pids = [p.pid for p in b.roles[peer][role]]
                    f = os.path.join(args.out, f"{tool}-{peer}-{role}.txt")
                    if tool == "perfstat":
                        cmd = ["perf", "stat", "-e", "cpu-clock,context-switches,cpu-migrations,page-faults",
                               "-p", ",".join(map(str, pids)), "-o", f]
                    else:
                        cmd = ["strace", "-c", "-f", "-o", f] + sum([["-p", str(p)] for p in pids], [])
                    mons.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                 start_new_session=True))
                time.sleep(1.0)
                r = b.connbench("rate", f"127.0.0.1:{port}", 8, 3, timeout=60)
                for m in mons:
                    m.send_signal(signal.SIGINT)
                for m in mons:
                    m.wait(30)
                print(peer, tool, "connections:", r.get("conns_total"), flush=True)
                with open(os.path.join(args.out, f"{tool}-{peer}-conns.txt"), "w") as f:
                    f.write(str(r.get("conns_total")))
                time.sleep(1)
    finally:
        b.procs.stop_all()


def massif():
    args = fresh_args("massif", ["direct"])
    start = B.Procs.start

    def under_massif(self, name, argv, env=None, cwd=None):
        if name == "taas-relay-park":
            argv = ["valgrind", "--tool=massif", f"--massif-out-file={args.out}/massif.out",
                    "--threshold=0.5", "--detailed-freq=1", "--max-snapshots=40"] + argv
        return start(self, name, argv, env, cwd)

    B.Procs.start = under_massif
    b = B.Bench(args)
    try:
        b.start_backends()
        b.parked_10k()
    finally:
        b.procs.stop_all()
        B.Procs.start = start
    with open(os.path.join(args.out, "massif.txt"), "w") as f:
        subprocess.run(["ms_print", os.path.join(args.out, "massif.out")], stdout=f, check=False)


if __name__ == "__main__":
    for tool in ("perf", "strace", "valgrind"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (Debian: linux-perf, strace, valgrind)")
    syscalls()
    massif()
