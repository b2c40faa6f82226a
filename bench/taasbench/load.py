"""The load of the rounds: one measurement (CPU and peak RSS of both sides around a bounded
load), each case's load tool (iperf3, connbench, wrk) and its parse, optional perf profiles,
and the interleaved rounds."""

import json
import os
import re
import signal
import subprocess
import time

from . import config
from .config import CASES, TAAS_ONLY
from .procs import cpu_seconds, log, reset_peak, run, status_kib, until


class Load:
    """The cases of the rounds, for every peer; mixed into `Bench` (needs `Peers`)."""

    def measure(self, peer, case, backend, rnd):
        roles = self.roles["taas_edge" if case in config.EDGE_CASES else peer]
        if case in config.EDGE_CASES:
            until("the edge agent refilled", self.edge_refilled, 30, 0.05)
        elif peer == "taas":
            until("TAAS agents refilled", self.taas_refilled, 30, 0.05)
        else:
            time.sleep(0.0)
        port = self.taas_only_port(case) if case in TAAS_ONLY else self.peer_port(peer, backend)
        pids_r = [p.pid for p in roles["relay"]]
        pids_a = [p.pid for p in roles["agent"]]
        for pid in pids_r + pids_a:
            reset_peak(pid)
        c0r = sum(cpu_seconds(p) for p in pids_r)
        c0a = sum(cpu_seconds(p) for p in pids_a)
        perfs = self.perf_start(peer, case, rnd)
        t0 = time.time()
        fn = {"bulk1": self.case_bulk, "bulk1R": self.case_bulk, "bulk8": self.case_bulk}.get(case) \
            or getattr(self, "case_" + case)
        res = fn(port, case)
        wall = time.time() - t0
        self.perf_stop(perfs)
        time.sleep(0.3)  # socat's children reaped
        c1r = sum(cpu_seconds(p) for p in pids_r)
        c1a = sum(cpu_seconds(p) for p in pids_a)
        rec = dict(kind="case", case=case, peer=peer, round=rnd, port=port, wall=round(wall, 3),
                   cpu_relay_s=round(c1r - c0r, 3) if pids_r else None,
                   cpu_agent_s=round(c1a - c0a, 3) if pids_a else None,
                   hwm_relay_kib=sum(status_kib(p, "VmHWM") for p in pids_r) if pids_r else None,
                   hwm_agent_kib=sum(status_kib(p, "VmHWM") for p in pids_a) if pids_a else None,
                   **res)
        self.record(**rec)
        for p in roles["relay"] + roles["agent"]:
            self.procs.check(p)
        v = rec.get("value")
        log(f"  {case:10s} {peer:8s} round {rnd}: {v if v is None else round(v, 3)} "
            f"cpu r/a {rec['cpu_relay_s']}/{rec['cpu_agent_s']}"
            + (f"  ERROR {rec['error']}" if rec.get("error") else ""))
        time.sleep(self.args.settle)
        return rec

    def perf_start(self, peer, case, rnd):
        """With --perf: `perf record -e cpu-clock` on the relay side and on the client side."""
        if not self.args.perf or peer == "direct":
            return []
        d = os.path.join(self.out, "perf")
        os.makedirs(d, exist_ok=True)
        out = []
        roles = self.roles["taas_edge" if case in config.EDGE_CASES else peer]
        for role in ("relay", "agent"):
            pids = [p.pid for p in roles[role]]
            if not pids:
                continue
            data = os.path.join(d, f"{case}-{peer}-{role}-r{rnd}.data")
            p = subprocess.Popen(["perf", "record", "-q", "-g", "-e", "cpu-clock", "-F", "1999",
                                  "-p", ",".join(map(str, pids)), "-o", data],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            out.append((p, data))
        time.sleep(0.3)
        return out

    def perf_stop(self, perfs):
        for p, data in perfs:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            # flat self time; time by binary; time under each system call (kernel stacks)
            _, flat, e1 = run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                               "--sort", "dso,sym", "--percent-limit", "0.5"], 180)
            _, dso, _ = run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                             "--sort", "dso"], 180)
            _, calls, _ = run(["perf", "report", "-i", data, "--stdio", "--children", "-g", "none",
                               "--sort", "sym"], 180)
            sys_lines = [l for l in calls.splitlines()
                         if re.search(r"\[k\] (__x64_sys_|__do_sys_|syscall_exit_to_user_mode$|"
                                      r"asm_sysvec|irq_exit|do_softirq|net_rx_action|schedule$)", l)]
            with open(data[:-5] + ".txt", "w") as f:
                f.write("# by binary (self)\n" + "\n".join(l for l in dso.splitlines()
                                                           if l and not l.startswith("#")))
                f.write("\n\n# system calls and kernel work (children: time under each)\n")
                f.write("\n".join(sys_lines[:40]))
                f.write("\n\n# flat (self time by binary and symbol)\n")
                f.write(flat or e1)

    def case_bulk(self, port, case):
        d = self.args.duration
        extra = {"bulk1": [], "bulk1R": ["-R"], "bulk8": ["-P", "8"]}[case]
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(d), "-J",
                "--connect-timeout", "10000", *extra]
        for attempt in range(3):
            rc, out, err = run(argv, d + 40)
            try:
                j = json.loads(out)
            except ValueError:
                j = {"error": f"rc {rc}: {err.strip()[:200]} {out.strip()[:200]}"}
            if "error" not in j:
                s = j["end"]["sum_received"]
                return {"value": s["bits_per_second"] / 1e9, "bytes": s["bytes"],
                        "retransmits": j["end"].get("sum_sent", {}).get("retransmits")}
            time.sleep(1.0)
        return {"value": None, "error": j["error"]}

    def connbench(self, *a, timeout):
        rc, out, err = run([os.path.join(config.BT, "connbench"), *map(str, a)], timeout)
        try:
            return json.loads(out)
        except ValueError:
            return {"error": f"rc {rc}: {err.strip()[:300]}"}

    def case_lat(self, port, case, first_bytes=()):
        j = self.connbench("latency", f"127.0.0.1:{port}", self.args.lat_count,
                           self.args.duration * 3, *first_bytes, timeout=self.args.duration * 3 + 40)
        if "p50_us" not in j:
            return {"value": None, **j}
        return {"value": j["p50_us"], "p99_us": j["p99_us"], "conns": j["count"],
                "errors": j["errors"], "lat": j}

    def case_rate(self, port, case, first_bytes=()):
        j = self.connbench("rate", f"127.0.0.1:{port}", 8, self.args.duration, *first_bytes,
                           timeout=self.args.duration + 40)
        if "per_sec" not in j:
            return {"value": None, **j}
        return {"value": j["per_sec"], "conns": j["conns_total"], "errors": j["errors"],
                "first_error": j["first_error"]}

    def case_stream(self, port, case, first_bytes=()):
        d = self.args.duration
        j = self.connbench("stream", f"127.0.0.1:{port}", d, *first_bytes, timeout=d + 40)
        if "gbit_s" not in j:
            return {"value": None, **j}
        # `bytes`: all the bytes echoed, for CPU per GB (the CPU is measured around all of it).
        return {"value": j["gbit_s"], "bytes": j["bytes_total"]}

    def case_stream_edge(self, port, case):
        return self.case_stream(port, case, (self.taas_hello_edge,))

    def case_lat_shared(self, port, case):
        return self.case_lat(port, case, (self.taas_hello,))

    def case_rate_shared(self, port, case):
        return self.case_rate(port, case, (self.taas_hello,))

    def case_lat_direct(self, port, case):
        return self.case_lat(port, case, (self.taas_hello_direct,))

    def case_rate_direct(self, port, case):
        return self.case_rate(port, case, (self.taas_hello_direct,))

    def case_lat_edge(self, port, case):
        return self.case_lat(port, case, (self.taas_hello_edge,))

    def case_rate_edge(self, port, case):
        return self.case_rate(port, case, (self.taas_hello_edge,))

    def taas_only_port(self, case):
        """The shared client port, the front end's HTTPS port for the direct label, or the
        edge gateway's shared port."""
        if case in config.EDGE_CASES:
            return self.P["edge_shared"]
        return self.P["taas_listen"] if case.endswith("_direct") else self.P["taas_shared"]

    def wrk(self, url, extra, host=None):
        d = self.args.duration
        argv = ["wrk", "-t2", f"-c{self.args.wrk_conns}", f"-d{d}s", "--latency", "--timeout", "15s"]
        if host:
            argv += ["-H", f"Host: {host}"]
        argv += [*extra, url]
        rc, out, err = run(argv, d + 40)
        m = re.search(r"Requests/sec:\s*([\d.]+)", out)
        n = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
        se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        p50 = re.search(r"^\s*50%\s+([\d.]+)(\w+)", out, re.M)
        if not m:
            return {"value": None, "error": f"rc {rc}: {err.strip()[:200]} {out[-300:]}"}
        res = {"value": float(m.group(1)), "requests": int(n.group(1)) if n else None,
               "wrk_out": out}
        if se:
            res["socket_errors"] = [int(x) for x in se.groups()]
        if bad:
            res["non_2xx_3xx"] = int(bad.group(1))
        if p50:
            res["p50"] = p50.group(1) + p50.group(2)
        return res

    def case_http_ka(self, port, case):
        return self.wrk(f"http://127.0.0.1:{port}/1k.bin", [])

    def case_http_close(self, port, case):
        r = self.wrk(f"http://127.0.0.1:{port}/1k.bin", ["-H", "Connection: close"])
        if r.get("requests"):
            r["conns"] = r["requests"]
        return r

    def rounds(self):
        order = list(self.args.peers)
        chosen = [c for c, _, _ in CASES if not self.args.cases or c in self.args.cases]
        # TAAS's shared-port and direct cases run right after TAAS's own-q case of the same
        # kind, in the same round (order alternating), when that case runs too: their ratio to
        # own q is then read at one moment's load.
        companions = {base: [c for c in chosen if TAAS_ONLY.get(c) == base]
                      for base in set(TAAS_ONLY.values())} if "taas" in order else {}
        for case, backend, _ in CASES:
            if case not in chosen:
                continue
            if TAAS_ONLY.get(case) in chosen and "taas" in order:
                continue  # measured with its own-q case
            log(f"case {case}" + "".join(f" + {c}" for c in companions.get(case, [])))
            for rnd in range(1, self.args.rounds + 1):
                seq = order if rnd % 2 == 1 else list(reversed(order))
                for peer in seq:
                    if case in TAAS_ONLY and peer != "taas":
                        continue
                    if peer == "taas" and companions.get(case):
                        group = [case] + companions[case]
                        for c in (group if rnd % 2 == 1 else list(reversed(group))):
                            self.measure(peer, c, backend, rnd)
                    else:
                        self.measure(peer, case, backend, rnd)
