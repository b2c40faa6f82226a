"""The set-up of a run: the backends (iperf3, the echo server, nginx), then each peer in front of
them (socat, rathole, bore, TAAS with its labels and agents), and how a client finds a peer's
port (for TAAS, from the 307 a phone would get)."""

import hashlib
import hmac
import json
import os
import re
import struct
import time
import urllib.request
import uuid

from . import config
from .config import BACKENDS
from .procs import Procs, echo_ok, http_ok, port_free, run, status_kib, until, wait_listening


def client_hello(server_name):
    """A minimal TLS ClientHello naming `server_name` (SNI), as one record: what a shared-port
    client sends first. The relay only reads it; the echo backend sends it back."""
    name = server_name.encode()
    names = struct.pack("!BH", 0, len(name)) + name
    sni = struct.pack("!HHH", 0, len(names) + 2, len(names)) + names
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + struct.pack("!H", 2) + b"\x13\x01"
            + b"\x01\x00" + struct.pack("!H", len(sni)) + sni)
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


class Peers:
    """Ports, processes and raw records of one run; the base of `Bench`."""

    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.work = os.path.abspath(args.work)
        # Each process's output: scratch, replaced at each run; main() copies it into the
        # results only when the run failed (a run keeps its table, raw data and notes).
        self.logdir = os.path.join(self.work, "logs")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.logdir, exist_ok=True)
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
            "taas_shared": b + 42,
            "reg_listen": b + 50,
            "reg_metrics": b + 51,
            "park_listen": b + 60,
            "park_metrics": b + 61,
            # The cluster edge on loopback (issue 18): a gateway in front of a label relay.
            "edge_listen": b + 70,
            "edge_metrics": b + 71,
            "edge_shared": b + 72,
            "edge_control": b + 73,
            "edge_port": b + 74,
            "edge_relay_metrics": b + 75,
            "edge_q": b + 76,
        }
        # The gateway's rendezvous range and the label relay's own p ports behind it (64 each,
        # outside every other relay's ranges).
        self.edge_rendezvous = (26000, 26063)
        self.edge_p_ports = (26100, 26163)
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

    def start_backends(self):
        P = self.P
        ports = list(P["backend"].values()) + [P["nginx307"]] + list(P["socat"].values()) + \
            [P["rathole_ctl"]] + list(P["rathole"].values()) + list(P["bore"].values()) + \
            [P["taas_listen"], P["taas_metrics"], P["taas_shared"], self.bore_ctl]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use on 127.0.0.1: {busy} (choose --port-base)")
        self.iperf = self.procs.start("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p",
                                                        str(P["backend"]["bulk"])])
        self.echo = self.procs.start("echo-server", [os.path.join(config.BT, "echo"),
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
        rb = os.path.join(config.TOOLS, "rathole")
        s = self.procs.start("rathole-server", [rb, "--server", os.path.join(d, "server.toml")])
        wait_listening(self.P["rathole_ctl"])
        c = self.procs.start("rathole-client", [rb, "--client", os.path.join(d, "client.toml")])
        self.roles["rathole"] = {"relay": [s], "agent": [c]}

    def start_bore(self):
        bb = os.path.join(config.TOOLS, "bore")
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

    def taas_labels(self, d, listen, names, max_parked, client_ports=None, direct=()):
        """`taas-relay label new` for each name into d/labels; maxParked edited in the YAML,
        clientPort (a pinned q) added when `client_ports` names one, and `direct: true` for the
        names in `direct`."""
        labels = os.path.join(d, "labels")
        state = os.path.join(d, "state")
        os.makedirs(labels, exist_ok=True)
        creds = {}
        for name in names:
            ident = str(uuid.uuid4())
            run([os.path.join(config.TAAS, "taas-relay"), "label", "new", "--id", ident, "--label", name,
                 "--labels", labels, "--state-dir", state, "--listen", f"127.0.0.1:{listen}"],
                60, check=True)
            path = os.path.join(labels, f"{name}.yaml")
            with open(path) as f:
                text = f.read()
            pin = f"\n\\g<1>clientPort: {client_ports[name]}" if client_ports else ""
            if name in direct:
                pin += "\n\\g<1>direct: true"
            text, n = re.subn(r"(?m)^(\s*)maxParked:\s*\d+", rf"\g<1>maxParked: {max_parked}{pin}", text)
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
            os.path.join(config.TAAS, "taas-relay"), "serve", "--listen", f"127.0.0.1:{listen}",
            "--labels", labels, "--state-dir", state, "--p-ports", p_ports, "--q-ports", q_ports,
            "--metrics", f"127.0.0.1:{metrics}", *extra])

    def start_taas_agent(self, name, listen, label_file, state, forward, parked):
        return self.procs.start(name, [
            os.path.join(config.TAAS, "taas-agent"), "--relay", f"https://taas-registrar.localhost:{listen}",
            "--label-file", label_file, "--ca", os.path.join(state, "relay-cert.pem"),
            "--forward", f"127.0.0.1:{forward}", "--parked", str(parked)])

    def start_taas(self):
        d = os.path.join(self.work, "taas")
        listen = self.P["taas_listen"]
        names = {"bulk": "bulk", "echo": "echo", "http": "demo"}
        # A direct label (lat_direct, rate_direct) in front of the echo backend too, with its
        # own agent: its clients come through the front end's HTTPS port.
        backend_of = dict({b: b for b in names}, direct="echo")
        names_all = dict(names, direct="direct")
        # q pinned (22000, 22001, ...): with the shared port on, the 307 names the shared port,
        # and the own-q cases (iperf3, wrk: no ClientHello) go to q as a raw forward would.
        self.taas_q = {label: 22000 + i for i, label in enumerate(names_all.values())}
        _, state, creds = self.taas_labels(d, listen, list(names_all.values()), 1024, self.taas_q,
                                           direct=("direct",))
        relay = self.start_taas_relay("taas-relay", d, listen, self.P["taas_metrics"],
                                      self.p_ports_main, self.q_ports_main,
                                      ("--shared-port", str(self.P["taas_shared"])))
        wait_listening(listen)
        # The first bytes of a shared-port client (lat_shared, rate_shared).
        self.taas_hello = os.path.join(d, "client-hello.bin")
        with open(self.taas_hello, "wb") as f:
            f.write(client_hello(f"{names['echo']}.taas.localhost"))
        self.taas_hello_direct = os.path.join(d, "client-hello-direct.bin")
        with open(self.taas_hello_direct, "wb") as f:
            f.write(client_hello("direct.taas.localhost"))
        self.taas_state = state
        self.taas_label = names
        agents = []
        for key, label in names_all.items():
            parked = self.args.parked[backend_of[key]]
            self.taas_parked_target[label] = parked
            agents.append(self.start_taas_agent(f"taas-agent-{label}", listen,
                                                creds[label]["file"], state,
                                                self.P["backend"][backend_of[key]], parked))
        self.roles["taas"] = {"relay": [relay], "agent": agents}
        if self.edge_wanted():
            self.start_taas_edge()

    def edge_wanted(self):
        return "taas" in self.args.peers and any(
            c in config.EDGE_CASES for c in (self.args.cases or config.EDGE_CASES))

    def start_taas_edge(self):
        """The cluster's edge on loopback, as the operator sets it up (issue 15.3): a gateway
        (`taas-relay gateway`, shared port and a rendezvous range) in front of one label relay
        (`taas-relay label-relay --edge`) for the label `edge` (echo backend), whose agent
        registers through the gateway; clients come through the gateway's shared port."""
        P = self.P
        d = os.path.join(self.work, "taas-edge")
        _, state, creds = self.taas_labels(d, P["edge_listen"], ["edge"], 1024)
        secret = os.path.join(d, "install-secret")
        with open(secret, "w") as f:
            f.write(uuid.uuid4().hex + "\n")
        with open(secret, "rb") as f:
            key = f.read().strip()
        token = hmac.new(key, b"taas-gateway\0edge", hashlib.sha256).hexdigest()
        secret_dir = os.path.join(d, "edge-secret")
        os.makedirs(secret_dir, exist_ok=True)
        with open(os.path.join(secret_dir, "secret"), "w") as f:
            f.write(creds["edge"]["secret"] + "\n")
        t_lo, t_hi = self.edge_rendezvous
        p_lo, p_hi = self.edge_p_ports
        external = os.path.join(d, "external.yaml")
        with open(external, "w") as f:
            f.write('host: "127.0.0.1"\nports:\n')
            for p_port, t_port in zip(range(p_lo, p_hi + 1), range(t_lo, t_hi + 1)):
                f.write(f"  {p_port}: {t_port}\n")
            f.write(f"  {P['edge_q']}: {P['edge_shared']}\n")
        routes = os.path.join(d, "routes.yaml")
        with open(routes, "w") as f:
            f.write(f'edge: {{relay: "127.0.0.1:{P["edge_control"]}", '
                    f'edge: "127.0.0.1:{P["edge_port"]}", '
                    f'rendezvous: [{", ".join(str(t) for t in range(t_lo, t_hi + 1))}]}}\n')
        taas = os.path.join(config.TAAS, "taas-relay")
        relay = self.procs.start("taas-edge-relay", [
            taas, "label-relay", "--label-file", creds["edge"]["file"], "--secret-dir", secret_dir,
            "--external-file", external, "--control", f"127.0.0.1:{P['edge_control']}",
            "--edge", f"127.0.0.1:{P['edge_port']}", "--p-ports", f"{p_lo}-{p_hi}",
            "--client-port", str(P["edge_q"]), "--metrics", f"127.0.0.1:{P['edge_relay_metrics']}"],
            env={"TAAS_GATEWAY_TOKEN": token})
        gateway_state = os.path.join(d, "gateway-state")
        gateway = self.procs.start("taas-edge-gateway", [
            taas, "gateway", "--listen", f"127.0.0.1:{P['edge_listen']}", "--routes-file", routes,
            "--gateway-secret-file", secret, "--shared-port", f"127.0.0.1:{P['edge_shared']}",
            "--rendezvous-ports", f"{t_lo}-{t_hi}", "--metrics", f"127.0.0.1:{P['edge_metrics']}",
            "--state-dir", gateway_state])
        wait_listening(P["edge_control"])
        wait_listening(P["edge_listen"])
        parked = self.args.parked["echo"]
        agent = self.procs.start("taas-edge-agent", [
            os.path.join(config.TAAS, "taas-agent"),
            "--relay", f"https://taas-registrar.localhost:{P['edge_listen']}",
            "--label-file", creds["edge"]["file"], "--ca", os.path.join(gateway_state, "relay-cert.pem"),
            "--forward", f"127.0.0.1:{P['backend']['echo']}", "--parked", str(parked)])
        self.taas_hello_edge = os.path.join(d, "client-hello-edge.bin")
        with open(self.taas_hello_edge, "wb") as f:
            f.write(client_hello("edge.taas.localhost"))
        self.roles["taas_edge"] = {"relay": [gateway, relay], "agent": [agent]}
        until("the edge agent parked", lambda: self.edge_refilled(), 60, 0.2)

    def edge_refilled(self):
        try:
            parked = self.taas_parked(self.P["edge_relay_metrics"])
        except OSError:
            return False
        return parked.get("edge", 0) >= self.args.parked["echo"]

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
        """The mobile client's one 307: curl the label's URL; its Location names the shared
        port (checked); the label's own q is the one pinned in its YAML."""
        url = f"https://{label}.taas.localhost:{self.P['taas_listen']}/"
        rc, out, err = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                            "--cacert", os.path.join(self.taas_state, "relay-cert.pem"), url], 15)
        code, _, loc = out.partition(" ")
        m = re.match(r"https://[^/]+:(\d+)/", loc)
        if rc != 0 or code != "307" or not m:
            raise RuntimeError(f"no 307 from {url}: rc {rc} {out!r} {err!r}")
        if int(m.group(1)) != self.P["taas_shared"]:
            raise RuntimeError(f"the 307 from {url} does not name the shared port: {loc!r}")
        return self.taas_q[label]

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
            # RssAnon is the process's own memory; RssFile is mapped code and libraries, in
            # the page cache and shared by every process of the same binary.
            self.record(kind="rss_idle", peer=peer,
                        relay_kib=sum(status_kib(p.pid, "VmRSS") for p in r["relay"]) if r["relay"] else None,
                        relay_anon_kib=sum(status_kib(p.pid, "RssAnon") for p in r["relay"]) if r["relay"] else None,
                        relay_file_kib=sum(status_kib(p.pid, "RssFile") for p in r["relay"]) if r["relay"] else None,
                        agent_kib=sum(status_kib(p.pid, "VmRSS") for p in r["agent"]) if r["agent"] else None)

    def stop_peers(self):
        self.procs.stop_all()
        self.roles = {}
        time.sleep(1.0)
