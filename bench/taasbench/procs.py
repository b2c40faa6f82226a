"""Processes and probes: every process a run starts is in its own process group and stopped by
its pid; commands are bounded in time; CPU and memory come from /proc; waits have deadlines."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

CLK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


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
                raise RuntimeError(f"{p.name} exited with {p.returncode}; see {self.logdir}/{p.name}.log")


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
