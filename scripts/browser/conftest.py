"""The browser test's set-up, shared by its tests (one relay, two labels, one Chromium):

- a test CA (openssl) and, for each label, a hidden HTTPS server with a certificate for
  LABEL.<domain> from that CA, which the relay never sees;
- the real `taas-relay serve` (front end on a port from the OS) with `home`, a direct label,
  and `work`, a plain one, both made with `taas-relay label new`;
- a real `taas-agent` per label parking connections that it forwards to the hidden server;
- headless Chromium from Debian (/usr/bin/chromium, or $CHROMIUM), driven by Playwright (no
  browser download), with LABEL.<domain> and the registrar resolved to 127.0.0.1
  (--host-resolver-rules) and certificate errors ignored only for certificates whose chain
  holds the test CA's or the relay's key (--ignore-certificate-errors-spki-list; Playwright's
  profile is a fresh temporary one, as that flag requires).

Run by scripts/browser/run.sh, which builds the binaries and passes their directory in
TAAS_BROWSER_BIN (and a pid file, TAAS_BROWSER_PIDS, for its trap).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import world

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class World:
    """What the tests see: the relay, its labels' hidden servers, the test CA, the URLs."""

    def __init__(self, dir: Path):
        self.dir = dir
        bin_dir = Path(os.environ.get("TAAS_BROWSER_BIN", ""))
        for name in ("taas-relay", "taas-agent"):
            if not (bin_dir / name).is_file():
                raise RuntimeError(f"TAAS_BROWSER_BIN: no {name} in {bin_dir!s} (run.sh sets it)")
        pids = os.environ.get("TAAS_BROWSER_PIDS")
        pid_file = Path(pids) if pids else None
        self.bin_dir, self.pid_file = bin_dir, pid_file
        self.processes: list[world.Process] = []
        self.hidden: dict[str, world.HiddenServer] = {}
        self.ca = world.TestCa(dir)
        self.relay = world.Relay(bin_dir, dir, pid_file)
        label_files = {
            "home": self.relay.label_new("home", direct=True),
            "work": self.relay.label_new("work", direct=False),
        }
        self.relay.start()
        self.processes.append(self.relay.process)
        for label, file in label_files.items():
            chain, key = self.ca.issue(self.host(label))
            self.hidden[label] = world.HiddenServer(label, chain, key)
            self.processes.append(
                world.start_agent(
                    bin_dir, self.relay, file, self.hidden[label].addr, 4, dir, pid_file
                )
            )
        for label in label_files:
            self.relay.wait_parked(label, 4)

    def host(self, label: str) -> str:
        return f"{label}.{world.DOMAIN}"

    def url(self, label: str, path: str = "/") -> str:
        """The plain URL: the relay's own HTTPS port (443 in production)."""
        return f"https://{self.host(label)}:{self.relay.port}{path}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.tail()}" for p in self.processes)

    def close(self):
        for process in reversed(self.processes):
            process.stop()
        for server in self.hidden.values():
            server.close()


@pytest.fixture(scope="session")
def taas():
    with tempfile.TemporaryDirectory(prefix="taas-browser-") as dir:
        w = None
        try:
            w = World(Path(dir))
            yield w
        finally:
            if w is not None:
                w.close()


@pytest.fixture(scope="session")
def browser(taas):
    from playwright.sync_api import sync_playwright

    spki = ",".join(world.spki_sha256_b64(c) for c in (taas.ca.cert, taas.relay.cert))
    rules = f"MAP *.{world.DOMAIN} 127.0.0.1, MAP {world.REGISTRAR} 127.0.0.1"
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--host-resolver-rules={rules}",
                  f"--ignore-certificate-errors-spki-list={spki}"],
            timeout=60_000,
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def pytest_unconfigure(config):
    """After pytest's own summary, one line `browser: N passed, M failed` (errors in set-up
    count as failures), the format scripts/test.sh adds up (as scripts/chart/conftest.py's)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    passed = len([r for r in reporter.stats.get("passed", []) if r.when == "call"])
    failed = len({r.nodeid for key in ("failed", "error") for r in reporter.stats.get(key, [])})
    reporter.write_line(f"browser: {passed} passed, {failed} failed")
