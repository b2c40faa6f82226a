#!/usr/bin/env python3
"""TAAS benchmark against direct, socat, rathole and bore, on loopback. Started by run.sh.

Everything runs on 127.0.0.1; every load is bounded in count and time; every process started
here is stopped here (by its own process group). See bench/README.md.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOOLS = os.path.join(HERE, ".tools", "bin")
BT = os.path.join(HERE, "tools", "target", "release")
TAAS = os.path.join(REPO, "target", "release")
CLK = os.sysconf("SC_CLK_TCK")

PEERS = ["direct", "socat", "rathole", "bore", "taas"]
BACKENDS = ["bulk", "echo", "http"]

# (case, backend, title)
CASES = [
    ("bulk1", "bulk", "iperf3, 1 stream (Gbit/s)"),
    ("bulk1R", "bulk", "iperf3, 1 stream reversed -R (Gbit/s)"),
    ("bulk8", "bulk", "iperf3, 8 streams -P 8 (Gbit/s)"),
    ("lat", "echo", "fresh connection p50 (µs): connect + 1-byte echo + close"),
    ("rate", "echo", "fresh connections/s, 8 closed-loop workers"),
    ("http_ka", "http", "HTTP 1 KiB, wrk keep-alive (req/s)"),
    ("http_close", "http", "HTTP 1 KiB, wrk Connection: close (req/s)"),
]
LOWER_IS_BETTER = {"lat"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Procs:
    """Processes started by this run; each in its own process group, stopped by its pid."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.items = []

    def start(self, name, argv, env=None, cwd=None):
        logf = open(os.path.join(self.logdir, name + ".log"), "ab")
        full_env = dict(os.environ)
        full_env.setdefault("RUST_LOG", "warn")
        if env:
            full_env.update(env)
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=full_env,
                             cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)
        p.name = name
        self.items.append(p)
        return p

    def stop(self, p, timeout=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # the leader is gone; its group (socat children) may not be
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self.items:
            self.items.remove(p)

    def stop_all(self):
        for p in list(reversed(self.items)):
            self.stop(p)

    def check(self, *ps):
        for p in ps:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.returncode}; see logs/{p.name}.log")


def run(argv, timeout, check=False, env=None):
    """Runs a bounded command; returns (rc, stdout, stderr)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: rc {r.returncode}: {r.stderr.strip()}")
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"


def cpu_seconds(pid):
    """utime + stime + cutime + cstime (reaped children: socat's per-connection forks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / CLK
    except OSError:
        return float("nan")


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return float("nan")


def reset_peak(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_listening(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def echo_ok(port, timeout=2.0):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def http_ok(port, timeout=2.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/1k.bin", timeout=timeout) as r:
            return r.status == 200 and len(r.read()) == 1024
    except Exception:
        return False


def until(what, predicate, timeout, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------- set-up


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.logdir = os.path.join(self.out, "logs")
        self.work = os.path.abspath(args.work)
        os.makedirs(self.logdir, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        os.chmod(self.out, 0o755)
        os.chmod(self.work, 0o755)
        self.procs = Procs(self.logdir)
        b = args.port_base
        self.P = {
            "backend": {"bulk": b + 1, "echo": b + 2, "http": b + 3},
            "nginx307": b + 4,
            "socat": {"bulk": b + 11, "echo": b + 12, "http": b + 13},
            "rathole_ctl": b + 20,
            "rathole": {"bulk": b + 21, "echo": b + 22, "http": b + 23},
            "bore": {"bulk": b + 31, "echo": b + 32, "http": b + 33},
            "taas_listen": b + 40,
            "taas_metrics": b + 41,
            "reg_listen": b + 50,
            "reg_metrics": b + 51,
            "park_listen": b + 60,
            "park_metrics": b + 61,
        }
        self.bore_ctl = 7835  # fixed in bore 0.6.0
        self.p_ports_main = "23000-25999"
        self.q_ports_main = "22000-22099"
        self.p_ports_big = "23000-29999"
        self.q_ports_big = "22100-22199"
        self.roles = {}  # peer -> {"relay": [Popen], "agent": [Popen]}
        self.taas_parked_target = {}
        self.raw = []  # every measurement, as written to raw.jsonl
        self.rawf = open(os.path.join(self.out, "raw.jsonl"), "a")

    def record(self, **kw):
        kw["t"] = round(time.time(), 3)
        kw["loadavg1"] = float(open("/proc/loadavg").read().split()[0])
        self.raw.append(kw)
        self.rawf.write(json.dumps(kw) + "\n")
        self.rawf.flush()

    # ---- backends

    def start_backends(self):
        P = self.P
        ports = list(P["backend"].values()) + [P["nginx307"]] + list(P["socat"].values()) + \
            [P["rathole_ctl"]] + list(P["rathole"].values()) + list(P["bore"].values()) + \
            [P["taas_listen"], P["taas_metrics"], self.bore_ctl]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use on 127.0.0.1: {busy} (choose --port-base)")
        self.iperf = self.procs.start("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p",
                                                        str(P["backend"]["bulk"])])
        self.echo = self.procs.start("echo-server", [os.path.join(BT, "echo"),
                                                     f"127.0.0.1:{P['backend']['echo']}"])
        # nginx: 1 KiB file over plain HTTP (the tunnels' backend), and `return 307` over TLS.
        ng = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(ng, "www"), exist_ok=True)
        os.makedirs(os.path.join(ng, "tmp"), exist_ok=True)
        with open(os.path.join(ng, "www", "1k.bin"), "wb") as f:
            f.write(b"a" * 1024)
        key, crt = os.path.join(ng, "tls.key"), os.path.join(ng, "tls.crt")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=demo.taas.localhost", "-addext",
             "subjectAltName=DNS:demo.taas.localhost,IP:127.0.0.1", "-keyout", key, "-out", crt],
            30, check=True)
        conf = os.path.join(ng, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
user root;
worker_processes auto;
daemon off;
pid {ng}/nginx.pid;
error_log {ng}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  client_body_temp_path {ng}/tmp/body;
  proxy_temp_path {ng}/tmp/proxy;
  fastcgi_temp_path {ng}/tmp/fastcgi;
  uwsgi_temp_path {ng}/tmp/uwsgi;
  scgi_temp_path {ng}/tmp/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{P['backend']['http']};
    root {ng}/www;
  }}
  server {{
    listen 127.0.0.1:{P['nginx307']} ssl;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    return 307 https://demo.taas.localhost:{P['taas_listen']}/;
  }}
}}
""")
        self.nginx = self.procs.start("nginx", ["nginx", "-c", conf, "-p", ng + "/"])
        for port in (P["backend"]["bulk"], P["backend"]["echo"], P["backend"]["http"],
                     P["nginx307"]):
            wait_listening(port)
        until("the echo backend", lambda: echo_ok(P["backend"]["echo"]), 10)
        until("nginx", lambda: http_ok(P["backend"]["http"]), 10)

    # ---- peers

    def start_socat(self):
        ps = []
        for b in BACKENDS:
            ps.append(self.procs.start(f"socat-{b}", [
                "socat", f"TCP-LISTEN:{self.P['socat'][b]},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                f"TCP:127.0.0.1:{self.P['backend'][b]}"]))
        self.roles["socat"] = {"relay": ps, "agent": []}

    def start_rathole(self):
        d = os.path.join(self.work, "rathole")
        os.makedirs(d, exist_ok=True)
        token = uuid.uuid4().hex
        server = [f'[server]\nbind_addr = "127.0.0.1:{self.P["rathole_ctl"]}"\ndefault_token = "{token}"\n']
        client = [f'[client]\nremote_addr = "127.0.0.1:{self.P["rathole_ctl"]}"\ndefault_token = "{token}"\n']
        for b in BACKENDS:
            server.append(f'[server.services.{b}]\nbind_addr = "127.0.0.1:{self.P["rathole"][b]}"\n')
            client.append(f'[client.services.{b}]\nlocal_addr = "127.0.0.1:{self.P["backend"][b]}"\n')
        with open(os.path.join(d, "server.toml"), "w") as f:
            f.write("\n".join(server))
        with open(os.path.join(d, "client.toml"), "w") as f:
            f.write("\n".join(client))
        rb = os.path.join(TOOLS, "rathole")
        s = self.procs.start("rathole-server", [rb, "--server", os.path.join(d, "server.toml")])
        wait_listening(self.P["rathole_ctl"])
        c = self.procs.start("rathole-client", [rb, "--client", os.path.join(d, "client.toml")])
        self.roles["rathole"] = {"relay": [s], "agent": [c]}

    def start_bore(self):
        bb = os.path.join(TOOLS, "bore")
        lo = min(self.P["bore"].values())
        hi = max(self.P["bore"].values())
        s = self.procs.start("bore-server", [bb, "server", "--bind-addr", "127.0.0.1",
                                             "--min-port", str(lo), "--max-port", str(hi)])
        wait_listening(self.bore_ctl)
        cs = []
        for b in BACKENDS:
            cs.append(self.procs.start(f"bore-local-{b}", [
                bb, "local", str(self.P["backend"][b]), "--local-host", "127.0.0.1",
                "--to", "127.0.0.1", "--port", str(self.P["bore"][b])]))
        self.roles["bore"] = {"relay": [s], "agent": cs}

    def taas_labels(self, d, listen, names, max_parked):
        """`taas-relay label new` for each name into d/labels; maxParked edited in the YAML."""
        labels = os.path.join(d, "labels")
        state = os.path.join(d, "state")
        os.makedirs(labels, exist_ok=True)
        creds = {}
        for name in names:
            ident = str(uuid.uuid4())
            run([os.path.join(TAAS, "taas-relay"), "label", "new", "--id", ident, "--label", name,
                 "--labels", labels, "--state-dir", state, "--listen", f"127.0.0.1:{listen}"],
                60, check=True)
            path = os.path.join(labels, f"{name}.yaml")
            with open(path) as f:
                text = f.read()
            text, n = re.subn(r"(?m)^(\s*)maxParked:\s*\d+", rf"\g<1>maxParked: {max_parked}", text)
            if n != 1:
                raise RuntimeError(f"no maxParked line in {path}")
            with open(path, "w") as f:
                f.write(text)
            secret = re.search(r"(?m)^\s*(?:stringData:\s*\{\s*)?secret:\s*\"?([A-Z2-7=]+)", text)
            creds[name] = {"id": ident, "file": path,
                           "secret": secret.group(1) if secret else None}
        return labels, state, creds

    def start_taas_relay(self, name, d, listen, metrics, p_ports, q_ports, extra=()):
        labels, state = os.path.join(d, "labels"), os.path.join(d, "state")
        return self.procs.start(name, [
            os.path.join(TAAS, "taas-relay"), "serve", "--listen", f"127.0.0.1:{listen}",
            "--labels", labels, "--state-dir", state, "--p-ports", p_ports, "--q-ports", q_ports,
            "--metrics", f"127.0.0.1:{metrics}", *extra])

    def start_taas_agent(self, name, listen, label_file, state, forward, parked):
        return self.procs.start(name, [
            os.path.join(TAAS, "taas-agent"), "--relay", f"https://taas-registrar.localhost:{listen}",
            "--label-file", label_file, "--ca", os.path.join(state, "relay-cert.pem"),
            "--forward", f"127.0.0.1:{forward}", "--parked", str(parked)])

    def start_taas(self):
        d = os.path.join(self.work, "taas")
        listen = self.P["taas_listen"]
        names = {"bulk": "bulk", "echo": "echo", "http": "demo"}
        _, state, creds = self.taas_labels(d, listen, list(names.values()), 1024)
        relay = self.start_taas_relay("taas-relay", d, listen, self.P["taas_metrics"],
                                      self.p_ports_main, self.q_ports_main)
        wait_listening(listen)
        self.taas_state = state
        self.taas_label = names
        agents = []
        for b, label in names.items():
            parked = self.args.parked[b]
            self.taas_parked_target[label] = parked
            agents.append(self.start_taas_agent(f"taas-agent-{label}", listen,
                                                creds[label]["file"], state,
                                                self.P["backend"][b], parked))
        self.roles["taas"] = {"relay": [relay], "agent": agents}

    def metrics(self, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(taas_\w+)\{label="([^"]+)"(?:,kind="([^"]+)")?\}\s+(\S+)', line)
            if m:
                out[(m.group(1), m.group(2), m.group(3))] = float(m.group(4))
        return out

    def taas_parked(self, port=None):
        m = self.metrics(port or self.P["taas_metrics"])
        return {label: int(v) for (k, label, _), v in m.items() if k == "taas_parked"}

    def taas_refilled(self):
        try:
            parked = self.taas_parked()
        except OSError:
            return False
        return all(parked.get(l, 0) >= n for l, n in self.taas_parked_target.items())

    def q_port(self, label):
        """The mobile client's one 307: curl the label's URL, q from the Location header."""
        url = f"https://{label}.taas.localhost:{self.P['taas_listen']}/"
        rc, out, err = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                            "--cacert", os.path.join(self.taas_state, "relay-cert.pem"), url], 15)
        code, _, loc = out.partition(" ")
        m = re.match(r"https://[^/]+:(\d+)/", loc)
        if rc != 0 or code != "307" or not m:
            raise RuntimeError(f"no 307 from {url}: rc {rc} {out!r} {err!r}")
        return int(m.group(1))

    def peer_port(self, peer, backend):
        if peer == "direct":
            return self.P["backend"][backend]
        if peer == "taas":
            return self.q_port(self.taas_label[backend])
        return self.P[peer][backend]

    def start_peers(self):
        for peer in self.args.peers:
            if peer != "direct":
                getattr(self, "start_" + peer)()
        self.roles["direct"] = {"relay": [], "agent": []}
        for peer in self.args.peers:
            for b in BACKENDS:
                port = self.peer_port(peer, b) if peer != "taas" else None
                if peer == "taas":
                    until("TAAS agents parked", self.taas_refilled, 60, 0.2)
                    port = self.peer_port(peer, b)
                wait_listening(port)
                if b == "echo":
                    until(f"echo through {peer}", lambda: echo_ok(port), 30, 0.2)
                elif b == "http":
                    until(f"HTTP through {peer}", lambda: http_ok(port), 30, 0.2)
            for p in self.roles[peer]["relay"] + self.roles[peer]["agent"]:
                self.procs.check(p)
        if "taas" in self.roles:
            until("TAAS agents parked", self.taas_refilled, 30, 0.2)
        time.sleep(1.0)
        for peer in self.args.peers:
            r = self.roles[peer]
            self.record(kind="rss_idle", peer=peer,
                        relay_kib=sum(status_kib(p.pid, "VmRSS") for p in r["relay"]) if r["relay"] else None,
                        agent_kib=sum(status_kib(p.pid, "VmRSS") for p in r["agent"]) if r["agent"] else None)

    # ---- one measurement

    def measure(self, peer, case, backend, rnd):
        d = self.args.duration
        roles = self.roles[peer]
        if peer == "taas":
            until("TAAS agents refilled", self.taas_refilled, 30, 0.05)
        else:
            time.sleep(0.0)
        port = self.peer_port(peer, backend)
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
        for role in ("relay", "agent"):
            pids = [p.pid for p in self.roles[peer][role]]
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
        rc, out, err = run([os.path.join(BT, "connbench"), *map(str, a)], timeout)
        try:
            return json.loads(out)
        except ValueError:
            return {"error": f"rc {rc}: {err.strip()[:300]}"}

    def case_lat(self, port, case):
        j = self.connbench("latency", f"127.0.0.1:{port}", self.args.lat_count,
                           self.args.duration * 3, timeout=self.args.duration * 3 + 40)
        if "p50_us" not in j:
            return {"value": None, **j}
        return {"value": j["p50_us"], "p99_us": j["p99_us"], "conns": j["count"],
                "errors": j["errors"], "lat": j}

    def case_rate(self, port, case):
        j = self.connbench("rate", f"127.0.0.1:{port}", 8, self.args.duration,
                           timeout=self.args.duration + 40)
        if "per_sec" not in j:
            return {"value": None, **j}
        return {"value": j["per_sec"], "conns": j["conns_total"], "errors": j["errors"],
                "first_error": j["first_error"]}

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

    # ---- the rounds

    def rounds(self):
        order = list(self.args.peers)
        for case, backend, _ in CASES:
            if self.args.cases and case not in self.args.cases:
                continue
            log(f"case {case}")
            for rnd in range(1, self.args.rounds + 1):
                seq = order if rnd % 2 == 1 else list(reversed(order))
                for peer in seq:
                    self.measure(peer, case, backend, rnd)

    # ---- TAAS-specific

    def redirects(self):
        """307 answers/s over TLS, keep-alive: the relay's front end vs nginx `return 307`."""
        relay = self.roles["taas"]["relay"][0]
        for url, host in ((f"https://127.0.0.1:{self.P['taas_listen']}/", "demo.taas.localhost"),
                          (f"https://127.0.0.1:{self.P['nginx307']}/", "demo.taas.localhost")):
            rc, out, _ = run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                              f"Host: {host}", url], 15)
            if out != "307":
                raise RuntimeError(f"{url} with Host {host}: {out}, not 307")
        log("case 307/s")
        for rnd in range(1, self.args.rounds + 1):
            seq = ["taas", "nginx"] if rnd % 2 else ["nginx", "taas"]
            for who in seq:
                if who == "taas":
                    until("TAAS agents parked", self.taas_refilled, 30, 0.1)
                    pid = relay.pid
                    url = f"https://127.0.0.1:{self.P['taas_listen']}/"
                else:
                    pid = None
                    url = f"https://127.0.0.1:{self.P['nginx307']}/"
                c0 = cpu_seconds(pid) if pid else None
                if pid:
                    reset_peak(pid)
                r = self.wrk(url, [], host="demo.taas.localhost")
                c1 = cpu_seconds(pid) if pid else None
                self.record(kind="redirect", who=who, round=rnd,
                            cpu_relay_s=round(c1 - c0, 3) if pid else None,
                            hwm_relay_kib=status_kib(pid, "VmHWM") if pid else None, **r)
                log(f"  307/s {who:6s} round {rnd}: {r.get('value')}")
                time.sleep(self.args.settle)

    def stop_peers(self):
        self.procs.stop_all()
        self.roles = {}
        time.sleep(1.0)

    def registrations(self):
        """Registrations/s on one kept-alive TLS connection (nothing connects to p)."""
        d = os.path.join(self.work, "taas-reg")
        listen = self.P["reg_listen"]
        _, state, creds = self.taas_labels(d, listen, ["reg"], 1024)
        relay = self.start_taas_relay("taas-relay-reg", d, listen, self.P["reg_metrics"],
                                      self.p_ports_big, self.q_ports_big,
                                      ["--rendezvous-timeout", "0.03"])
        wait_listening(listen)
        time.sleep(0.5)
        c = creds["reg"]
        log("case registrations/s")
        for rnd in range(1, self.args.rounds + 1):
            c0 = cpu_seconds(relay.pid)
            rc, out, err = run([os.path.join(BT, "regbench"), f"127.0.0.1:{listen}",
                                f"taas-registrar.localhost:{listen}",
                                os.path.join(state, "relay-cert.pem"), c["id"], c["secret"], "reg",
                                str(self.args.duration), "10000000"], self.args.duration + 40)
            c1 = cpu_seconds(relay.pid)
            try:
                j = json.loads(out)
            except ValueError:
                j = {"error": f"rc {rc}: {err.strip()[:300]}"}
            self.record(kind="registrations", round=rnd, cpu_relay_s=round(c1 - c0, 3),
                        hwm_relay_kib=status_kib(relay.pid, "VmHWM"), **j)
            log(f"  reg/s round {rnd}: {j.get('ok_per_sec')} statuses {j.get('statuses')} {j.get('error', '')}")
            time.sleep(1.0)  # reserved p ports expire (0.1 s)
        self.procs.check(relay)
        self.procs.stop(relay)

    def parked_10k(self):
        """RSS of a relay holding N parked connections (labels × maxParked), and how fast the
        agents get there."""
        total = self.args.parked_total
        per = 1000
        n_labels = (total + per - 1) // per
        d = os.path.join(self.work, "taas-park")
        listen = self.P["park_listen"]
        names = [f"park{i}" for i in range(n_labels)]
        _, state, creds = self.taas_labels(d, listen, names, per)
        relay = self.start_taas_relay("taas-relay-park", d, listen, self.P["park_metrics"],
                                      self.p_ports_big, self.q_ports_big)
        wait_listening(listen)
        time.sleep(1.5)
        idle = status_kib(relay.pid, "VmRSS")
        log(f"case {total} parked: relay idle {idle} KiB with {n_labels} labels")
        agents = []
        t0 = time.time()
        c0 = cpu_seconds(relay.pid)
        for i, name in enumerate(names):
            n = min(per, total - i * per)
            agents.append(self.start_taas_agent(f"taas-agent-{name}", listen, creds[name]["file"],
                                                state, self.P["backend"]["echo"], n))
        reached, samples, peak_rss = None, [], 0
        deadline = t0 + self.args.park_timeout
        count = 0
        while time.time() < deadline:
            try:
                count = sum(self.taas_parked(self.P["park_metrics"]).values())
            except OSError:
                count = 0
            rss = status_kib(relay.pid, "VmRSS")
            peak_rss = max(peak_rss, rss)
            samples.append((round(time.time() - t0, 2), count, rss))
            if count >= total:
                reached = time.time() - t0
                break
            time.sleep(0.2)
        c1 = cpu_seconds(relay.pid)
        agent_cpu = sum(cpu_seconds(a.pid) for a in agents)
        time.sleep(2.0)  # settle
        rec = dict(kind="parked", target=total, labels=n_labels, reached=count,
                   seconds=round(reached, 3) if reached else None,
                   parked_per_sec=round(total / reached, 1) if reached else None,
                   relay_idle_kib=idle, relay_rss_kib=status_kib(relay.pid, "VmRSS"),
                   relay_hwm_kib=status_kib(relay.pid, "VmHWM"), relay_peak_sampled_kib=peak_rss,
                   relay_cpu_s=round(c1 - c0, 3), agents_cpu_s=round(agent_cpu, 3),
                   agents_rss_kib=sum(status_kib(a.pid, "VmRSS") for a in agents),
                   relay_fds=len(os.listdir(f"/proc/{relay.pid}/fd")), samples=samples)
        self.record(**rec)
        log(f"  parked {count}/{total} in {rec['seconds']} s; relay RSS {rec['relay_rss_kib']} KiB")
        for a in agents:
            self.procs.stop(a)
        self.procs.stop(relay)


# ---------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def mib(kib):
    return None if kib is None else kib / 1024


def report(raw, meta):
    cases = [r for r in raw if r["kind"] == "case"]
    L = []
    L.append(f"## TAAS benchmark, {meta['date']}")
    L.append("")
    L.append(f"- machine: `nproc` = {meta['nproc']}, {meta['cpu']}, kernel {meta['kernel']}; "
             f"load average at start {meta['load_start']}, at end {meta.get('load_end', '?')}")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- mode: {meta['mode']}: {meta['rounds']} interleaved rounds (A→Z, then Z→A), "
             f"{meta['duration']} s per run; median of the rounds, spread = min–max; "
             f"ratio = median / direct's median")
    L.append(f"- versions: {meta['versions']}")
    L.append(f"- raw output: `{meta['out_rel']}/` (raw.jsonl: every run; logs/)")
    L.append("")
    peers = meta["peers"]

    def vals(case, peer, key="value"):
        return [r.get(key) for r in cases if r["case"] == case and r["peer"] == peer
                and r.get(key) is not None]

    L.append("### Throughput, latency, connection rate")
    L.append("")
    L.append("| case | " + " | ".join(peers) + " |")
    L.append("|---|" + "---|" * len(peers))
    for case, _, title in CASES:
        if not any(r["case"] == case for r in cases):
            continue
        dm = med(vals(case, "direct"))
        cells = []
        for p in peers:
            v = vals(case, p)
            m = med(v)
            if m is None:
                cells.append("failed")
                continue
            s = f"**{fmt(m)}** ({fmt(min(v))}–{fmt(max(v))})"
            if p != "direct" and dm:
                s += f" ×{m / dm:.2f}"
            errs = sum((r.get("errors") or 0) for r in cases if r["case"] == case and r["peer"] == p)
            if errs:
                s += f" [{errs} err]"
            cells.append(s)
        L.append(f"| {title} | " + " | ".join(cells) + " |")
    # p99 and added latency
    if any(r["case"] == "lat" for r in cases):
        dm = med(vals("lat", "direct"))
        d99 = med(vals("lat", "direct", "p99_us"))
        row99, rowadd = [], []
        for p in peers:
            m99 = med(vals("lat", p, "p99_us"))
            m50 = med(vals("lat", p))
            row99.append(f"{fmt(m99)}" + (f" ×{m99 / d99:.2f}" if p != "direct" and m99 and d99 else ""))
            rowadd.append("0" if p == "direct" else (f"+{fmt(m50 - dm)}" if m50 and dm else "–"))
        L.append("| fresh connection p99 (µs) | " + " | ".join(row99) + " |")
        L.append("| added p50 latency vs direct (µs) | " + " | ".join(rowadd) + " |")
    L.append("")

    # CPU
    L.append("### CPU (relay-side process / client-side process), medians of the rounds")
    L.append("")
    L.append("| measure | " + " | ".join(p for p in peers if p != "direct") + " |")
    L.append("|---|" + "---|" * (len(peers) - 1))
    for case, label in (("bulk1", "CPU s per GB, 1 stream"), ("bulk1R", "CPU s per GB, 1 stream -R"),
                        ("bulk8", "CPU s per GB, 8 streams")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p and r.get("bytes")]
            cr = med([r["cpu_relay_s"] / (r["bytes"] / 1e9) for r in rs if r["cpu_relay_s"] is not None])
            ca = med([r["cpu_agent_s"] / (r["bytes"] / 1e9) for r in rs if r["cpu_agent_s"] is not None])
            row.append(f"{fmt(cr)} / {fmt(ca)}")
        L.append(f"| {label} | " + " | ".join(row) + " |")
    for case, label in (("rate", "CPU µs per connection (8 workers)"),
                        ("http_close", "CPU µs per connection (wrk Connection: close)"),
                        ("http_ka", "CPU µs per request (wrk keep-alive)")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p
                  and (r.get("conns") or r.get("requests"))]
            n = lambda r: r.get("conns") or r.get("requests")
            cr = med([r["cpu_relay_s"] * 1e6 / n(r) for r in rs if r["cpu_relay_s"] is not None])
            ca = med([r["cpu_agent_s"] * 1e6 / n(r) for r in rs if r["cpu_agent_s"] is not None])
            tot = None if cr is None else cr + (ca or 0)
            row.append(f"{fmt(cr)} / {fmt(ca)} (Σ {fmt(tot)})")
        L.append(f"| {label} | " + " | ".join(row) + " |")
    L.append("")

    # memory
    L.append("### Memory of the relay-side process (MiB; client-side in brackets)")
    L.append("")
    L.append("| measure | " + " | ".join(p for p in peers if p != "direct") + " |")
    L.append("|---|" + "---|" * (len(peers) - 1))
    idle = {r["peer"]: r for r in raw if r["kind"] == "rss_idle"}
    row = []
    for p in peers:
        if p == "direct":
            continue
        r = idle.get(p, {})
        row.append(f"{fmt(mib(r.get('relay_kib')))} ({fmt(mib(r.get('agent_kib')))})")
    L.append("| RSS idle, tunnels up | " + " | ".join(row) + " |")
    for case, label in (("bulk8", "peak RSS during iperf3 -P 8"), ("http_ka", "peak RSS during wrk keep-alive"),
                        ("http_close", "peak RSS during wrk Connection: close")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p]
            hr = [r["hwm_relay_kib"] for r in rs if r.get("hwm_relay_kib") is not None]
            ha = [r["hwm_agent_kib"] for r in rs if r.get("hwm_agent_kib") is not None]
            row.append(f"{fmt(mib(max(hr)) if hr else None)} ({fmt(mib(max(ha)) if ha else None)})")
        L.append(f"| {label} (max of rounds) | " + " | ".join(row) + " |")
    L.append("")
    L.append("socat: the listening parent only (each connection is a forked child, whose CPU "
             "is counted once reaped). TAAS client side: its three agents together; bore: its "
             "three `bore local` together.")
    L.append("")

    # TAAS-specific
    L.append("### TAAS-specific")
    L.append("")
    red = [r for r in raw if r["kind"] == "redirect"]
    if red:
        t = [r["value"] for r in red if r["who"] == "taas" and r.get("value")]
        n = [r["value"] for r in red if r["who"] == "nginx" and r.get("value")]
        if t and n:
            L.append(f"- 307 answers/s over TLS, keep-alive (wrk -t2 -c{meta['wrk_conns']}): TAAS "
                     f"**{fmt(med(t))}** ({fmt(min(t))}–{fmt(max(t))}), nginx `return 307` "
                     f"**{fmt(med(n))}** ({fmt(min(n))}–{fmt(max(n))}): ratio **{med(t) / med(n):.2f}**")
    reg = [r for r in raw if r["kind"] == "registrations"]
    if reg:
        v = [r["ok_per_sec"] for r in reg if r.get("ok_per_sec") is not None]
        cpu = [r["cpu_relay_s"] * 1e6 / r["requests"] for r in reg if r.get("requests")]
        st = {}
        for r in reg:
            for k, c in (r.get("statuses") or {}).items():
                st[k] = st.get(k, 0) + c
        if v:
            L.append(f"- registrations/s on one kept-alive TLS connection (200s only; nothing "
                     f"connects to p, --rendezvous-timeout 0.03): **{fmt(med(v))}** "
                     f"({fmt(min(v))}–{fmt(max(v))}); relay CPU {fmt(med(cpu))} µs per "
                     f"registration; statuses {st}")
    pk = [r for r in raw if r["kind"] == "parked"]
    for r in pk:
        L.append(f"- {r['target']:,} parked connections ({r['labels']} labels × ≤1000, "
                 f"{r['labels']} agents): reached {r['reached']:,} in "
                 f"{fmt(r['seconds'])} s (**{fmt(r['parked_per_sec'])} parked/s**, agents "
                 f"registering in parallel); relay RSS idle {fmt(mib(r['relay_idle_kib']))} MiB, "
                 f"with all parked **{fmt(mib(r['relay_rss_kib']))} MiB** (peak "
                 f"{fmt(mib(r['relay_hwm_kib']))} MiB); agents' RSS together "
                 f"{fmt(mib(r['agents_rss_kib']))} MiB; relay CPU while parking "
                 f"{fmt(r['relay_cpu_s'])} s, agents {fmt(r['agents_cpu_s'])} s")
    L.append("")

    # targets
    L.append("### Issue 6 targets")
    L.append("")
    L.append("| target | TAAS | reference | met |")
    L.append("|---|---|---|---|")

    def row(name, val, ref, ok):
        L.append(f"| {name} | {val} | {ref} | {'yes' if ok else ('**no**' if ok is False else '?')} |")

    def m(case, peer, key="value"):
        return med(vals(case, peer, key))

    if "taas" in peers:
        t, r_, s = m("bulk1", "taas"), m("bulk1", "rathole"), m("bulk1", "socat")
        if None not in (t, r_, s):
            row("bulk 1 stream ≥ 1.2× rathole", f"{fmt(t)} Gbit/s", f"1.2 × {fmt(r_)} = {fmt(1.2 * r_)}", t >= 1.2 * r_)
            row("bulk 1 stream ≥ socat", f"{fmt(t)} Gbit/s", f"{fmt(s)}", t >= s)
        t, r_ = m("rate", "taas"), m("rate", "rathole")
        if None not in (t, r_):
            row("connections/s ≥ rathole", f"{fmt(t)}", f"{fmt(r_)}", t >= r_)

        def cpc(peer):
            rs = [r for r in cases if r["case"] == "rate" and r["peer"] == peer and r.get("conns")]
            return med([((r["cpu_relay_s"] or 0) + (r["cpu_agent_s"] or 0)) * 1e6 / r["conns"] for r in rs])
        t, r_ = cpc("taas"), cpc("rathole")
        if None not in (t, r_):
            row("CPU per connection (relay + agent) ≤ rathole", f"{fmt(t)} µs", f"{fmt(r_)} µs", t <= r_)
        dm, t, r_ = m("lat", "direct"), m("lat", "taas"), m("lat", "rathole")
        if None not in (dm, t, r_):
            row("added p50 latency ≤ rathole", f"+{fmt(t - dm)} µs", f"+{fmt(r_ - dm)} µs", t - dm <= r_ - dm)
        ti = idle.get("taas", {}).get("relay_kib")
        if ti is not None:
            row("relay RSS idle ≤ 8 MiB (tunnels up: 3 labels, 144 parked)", f"{fmt(mib(ti))} MiB", "8 MiB", ti <= 8 * 1024)
        for case, nm in (("bulk8", "8-stream"), ("http_ka", "wrk keep-alive"), ("http_close", "wrk close")):
            h = [r["hwm_relay_kib"] for r in cases if r["case"] == case and r["peer"] == "taas"
                 and r.get("hwm_relay_kib") is not None]
            if h:
                row(f"relay RSS ≤ 16 MiB under {nm}", f"{fmt(mib(max(h)))} MiB", "16 MiB", max(h) <= 16 * 1024)
        for r in pk:
            row("relay RSS idle ≤ 8 MiB (labels provisioned, nothing parked)",
                f"{fmt(mib(r['relay_idle_kib']))} MiB", "8 MiB", r["relay_idle_kib"] <= 8 * 1024)
        for r in pk:
            row(f"{r['target']:,} parked ≤ 64 MiB" if r["target"] >= 10000 else
                f"{r['target']:,} parked (short mode; target is 10,000 ≤ 64 MiB)",
                f"{fmt(mib(r['relay_rss_kib']))} MiB", "64 MiB",
                (r["relay_rss_kib"] <= 64 * 1024 and r["reached"] >= r["target"]) if r["target"] >= 10000 else None)
        if red:
            t = med([r["value"] for r in red if r["who"] == "taas" and r.get("value")])
            n = med([r["value"] for r in red if r["who"] == "nginx" and r.get("value")])
            if t and n:
                row("307/s ≥ 0.8× nginx", f"{fmt(t)}/s", f"0.8 × {fmt(n)} = {fmt(0.8 * n)}", t >= 0.8 * n)
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--short", action="store_true", help="a few seconds per case, 1 round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds per run")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--cases", default="", help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    ap.add_argument("--skip", default="", help="comma-separated: redirects,registrations,parked")
    ap.add_argument("--parked-total", type=int, help="parked connections for the memory case")
    ap.add_argument("--port-base", type=int, default=17000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="scratch: label files, keys, configs")
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
        for argv in ([os.path.join(TOOLS, "rathole"), "--version"], [os.path.join(TOOLS, "bore"), "--version"],
                     ["socat", "-V"], ["iperf3", "--version"], ["nginx", "-v"],
                     [os.path.join(TAAS, "taas-relay"), "--version"]):
            rc, o, e = run(argv, 10)
            text = (o + e).strip().splitlines()
            line = next((l for l in text if "Build Version" in l), None) or \
                next((l for l in text if re.search(r"\d+\.\d+", l)), text[0] if text else "?")
            if "Build Version" in line:
                line = "rathole " + line.split(":", 1)[1].strip()
            out.append(line.strip())
        rc, o, _ = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], 10)
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
        "out_rel": os.path.relpath(args.out, REPO),
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
    except Exception as e:  # report what we have
        ok = False
        log(f"ERROR: {e!r}")
        b.record(kind="error", error=repr(e))
    finally:
        b.procs.stop_all()
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
