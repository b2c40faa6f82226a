"""What the browser test sets up, over real sockets on loopback: a test CA and the hidden
servers' certificates (openssl), tiny hidden HTTPS servers (Python's ssl + http.server, in
threads), the real `taas-relay serve` and `taas-agent` binaries as child processes, and
bounded waits on conditions. No fixed sleeps stand in for synchronisation: every wait polls a
condition until a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

DOMAIN = "taas.localhost"
REGISTRAR = "taas-registrar.localhost"
CA_NAME = "TAAS browser test CA"
# Long enough for a cold debug relay and agent on a loaded 2-core machine.
PATIENCE = 30.0


def wait_until(what: str, condition, timeout: float = PATIENCE, every: float = 0.05):
    """Polls `condition` until it returns something truthy (returned) or `timeout` passes
    (AssertionError naming `what` and the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(every)


def openssl(*args: str, cwd: Path) -> bytes:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30
    ).stdout


def spki_sha256_b64(cert_pem: Path) -> str:
    """Base64 of the SHA-256 of a certificate's SubjectPublicKeyInfo (DER): the form
    Chromium's --ignore-certificate-errors-spki-list takes."""
    pub = openssl("x509", "-in", str(cert_pem), "-noout", "-pubkey", cwd=cert_pem.parent)
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"],
        input=pub, check=True, capture_output=True, timeout=30,
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class TestCa:
    """A throw-away CA (P-256) that signs the hidden servers' certificates: neither the relay
    nor its certificate ever see it."""

    def __init__(self, dir: Path):
        self.dir = dir
        self.cert = dir / "ca.pem"
        self.key = dir / "ca.key"
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", f"/CN={CA_NAME}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(self.key), "-out", str(self.cert), cwd=dir,
        )

    def issue(self, host: str) -> tuple[Path, Path]:
        """A server certificate for `host`; returns (chain PEM: leaf then CA, key PEM)."""
        key, csr, leaf = (self.dir / f"{host}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.dir / f"{host}.ext"
        ext.write_text(
            f"subjectAltName=DNS:{host}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        )
        openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", f"/CN={host}", "-keyout", str(key), "-out", str(csr), cwd=self.dir,
        )
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(leaf),
            cwd=self.dir,
        )
        chain = self.dir / f"{host}.chain.pem"
        chain.write_bytes(leaf.read_bytes() + self.cert.read_bytes())
        return chain, key


class HiddenServer:
    """A hidden HTTPS server on 127.0.0.1 (port from the OS) with its own certificate. Its
    page names it and echoes the request line and Host, with no port or time in it, so that a
    screenshot of it is the same on every run."""

    def __init__(self, name: str, chain: Path, key: Path):
        self.name = name
        self.requests: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # every read bounded

            def do_GET(self):
                server.requests.append(f"{self.requestline} Host: {self.headers.get('Host')}")
                if self.path == "/favicon.ico":
                    body, status, kind = b"", 404, "text/plain"
                else:
                    body, status, kind = server.page().encode(), 200, "text/html; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            # The TLS handshake in the connection's own thread, so a slow peer holds up
            # nothing else.
            def finish_request(self, request, client_address):
                request.settimeout(10)
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                try:
                    super().finish_request(tls, client_address)
                finally:
                    tls.close()

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.addr = self.httpd.server_address
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def page(self) -> str:
        title = f"Hidden server {self.name}"
        return (
            "<!doctype html><html><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font:18px sans-serif;margin:40px;color:#222}"
            "code{background:#eee;padding:2px 4px}</style></head><body>"
            f"<h1>Hello from the hidden server <code>{html.escape(self.name)}</code></h1>"
            "<p>Reached through the TAAS relay with a plain URL: no redirect, no second port."
            " TLS runs end to end: this page's certificate was issued by "
            f"<code>{html.escape(CA_NAME)}</code>, which the relay never had.</p>"
            # Where the browser is (headless: no address bar); no port, so that every run's
            # screenshot is the same.
            "<p>This tab is at <code id=at></code> (the relay's own HTTPS port).</p>"
            "<script>document.getElementById('at').textContent ="
            " location.protocol + '//' + location.hostname + location.pathname</script>"
            "</body></html>"
        )

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Process:
    """A child process in a session of its own (so the whole group can be ended), its output
    in a log file; its pid is appended to `pid_file` so that scripts/browser/run.sh's trap
    can end it if this process dies first."""

    def __init__(self, name: str, argv: list[str], log: Path, pid_file: Path | None):
        self.name, self.log = name, log
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAAS_")}
        env.setdefault("RUST_LOG", "info")
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        if pid_file is not None:
            with pid_file.open("a") as f:
                f.write(f"{self.popen.pid}\n")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self):
        """SIGTERM to the group, SIGKILL after 5 s; bounded."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=5)


def port_block(length: int = 16) -> tuple[str, str]:
    """Ranges p and q for the relay: below Linux's ephemeral range (where the OS-chosen ports
    live), in 31000-32767 (testkit's block for relays started as binaries, used by `cargo
    test`, which scripts/test.sh runs before this), spread by pid; a port found taken is
    skipped by the relay."""
    blocks = 1768 // (2 * length)
    base = 31000 + (os.getpid() % blocks) * 2 * length
    return f"{base}-{base + length - 1}", f"{base + length}-{base + 2 * length - 1}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """`taas-relay serve` on 127.0.0.1 (front end on a port from the OS, read back from its
    `relay serving` log line), its labels made with `taas-relay label new`."""

    def __init__(self, bin_dir: Path, dir: Path, pid_file: Path | None):
        self.bin = bin_dir / "taas-relay"
        self.dir = dir
        self.labels = dir / "labels"
        self.state = dir / "state"
        self.labels.mkdir()
        self.state.mkdir()
        self.pid_file = pid_file
        self.process: Process | None = None
        self.port = 0
        self.metrics_port = 0
        self.console_port = 0

    def label_new(self, label: str, direct: bool) -> Path:
        argv = [
            str(self.bin), "label", "new", "--id", str(_uuid(label)), "--label", label,
            "--labels", str(self.labels), "--state-dir", str(self.state),
            "--listen", "127.0.0.1:8443",
        ]
        if direct:
            argv.append("--direct")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAAS_")}
        subprocess.run(argv, check=True, capture_output=True, timeout=60, env=env)
        return self.labels / f"{label}.yaml"

    def start(self):
        p_ports, q_ports = port_block()
        # The metrics port: one the OS just handed out (the relay binds it at once).
        self.metrics_port = free_port()
        # The web console (issue 17) on loopback: no login, its own port.
        self.console_port = free_port()
        self.process = Process(
            "taas-relay",
            [
                str(self.bin), "serve", "--listen", "127.0.0.1:0",
                "--labels", str(self.labels), "--state-dir", str(self.state),
                "--p-ports", p_ports, "--q-ports", q_ports,
                "--metrics", f"127.0.0.1:{self.metrics_port}", "--log-format", "json",
                "--console", f"127.0.0.1:{self.console_port}",
            ],
            self.dir / "relay.log", self.pid_file,
        )

        def serving():
            if self.process.popen.poll() is not None:
                raise AssertionError(f"taas-relay exited:\n{self.process.tail()}")
            for line in self.process.text().splitlines():
                if "relay serving" in line:
                    found = re.search(r'"listen":"127\.0\.0\.1:(\d+)"', line)
                    if found:
                        return int(found.group(1))
            return None

        self.port = wait_until("the relay's `relay serving` line", serving)

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}/"

    @property
    def cert(self) -> Path:
        """The relay's own certificate (self-signed, generated into its state directory)."""
        return self.state / "relay-cert.pem"

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def wait_parked(self, label: str, n: int):
        wait_until(
            f"{n} parked connections for {label}",
            lambda: self.metric(f'taas_parked{{label="{label}"}}') >= n,
        )


def _uuid(label: str) -> str:
    """A stable UUID per label (the agent's ID)."""
    digest = hashlib.sha256(label.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def start_argv(name: str, argv: list[str], dir: Path, pid_file: Path | None) -> Process:
    """A process from an argv given whole (e.g. the agent command the console shows)."""
    return Process(name, argv, dir / f"{name.replace(' ', '-')}.log", pid_file)


def start_agent(bin_dir: Path, relay: Relay, label_file: Path, forward, parked: int,
                dir: Path, pid_file: Path | None) -> Process:
    """The real `taas-agent`, parking `parked` connections for the label at the relay and
    forwarding each paired one to the hidden server `forward` (host, port)."""
    label = label_file.stem
    return Process(
        f"taas-agent {label}",
        [
            str(bin_dir / "taas-agent"),
            "--relay", f"https://{REGISTRAR}:{relay.port}",
            "--label-file", str(label_file), "--ca", str(relay.cert),
            "--forward", f"{forward[0]}:{forward[1]}", "--parked", str(parked),
            "--log-format", "json",
        ],
        dir / f"agent-{label}.log", pid_file,
    )
