"""Issue 17: the web console (`taas-relay serve --console`), used as a person would in
headless Chromium: create a label through the form, start an agent with the command the page
shows, watch the table show it parked (live, without a reload), fetch through it with curl,
rotate the secret and see the old agent refused, delete the label; bad input gets inline
errors; a forged cross-site POST changes nothing. Set-up in conftest.py (the real relay, its
console on loopback, headless Chromium).

With TAAS_SCREENSHOTS=1 the main views are written to docs/console-*.png.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import world

LABEL = "kiosk"
ROOT = Path(__file__).resolve().parents[2]


def screenshot(page, name: str):
    if os.environ.get("TAAS_SCREENSHOTS") == "1":
        page.screenshot(path=str(ROOT / "docs" / name), full_page=True)


def cell(page, label: str, column: int) -> str:
    return page.locator(f'tr[data-label="{label}"] td:nth-child({column})').inner_text()


def registrations(taas, label: str, kind: str) -> float:
    return taas.relay.metric(f'taas_registrations_total{{label="{label}",kind="{kind}"}}')


def test_a_label_made_in_the_console_is_parked_fetched_rotated_and_deleted(taas, page):
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text))
    page.set_viewport_size({"width": 1280, "height": 900})
    response = page.goto(taas.relay.console_url)
    assert response is not None and response.status == 200, taas.logs()
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    # The labels made with `label new` are listed, with their parked connections.
    world.wait_until("home listed as parked", lambda: cell(page, "home", 4) == "4")

    # Create a label through the form.
    page.fill("#id", "kiosk-1")
    page.fill("#label", LABEL)
    with page.expect_navigation():
        page.click("#create button[type=submit]")
    assert page.locator("#secret h2").inner_text() == f"Label created: {LABEL}"
    secret = page.locator("#secret-b32").inner_text()
    assert len(secret) == 32
    assert page.locator("#uri").inner_text().startswith("otpauth://totp/")
    assert page.locator("#qr svg").count() == 1
    command = page.locator("#agent-command").inner_text()
    file = taas.relay.labels / f"{LABEL}.yaml"
    assert file.is_file()
    with page.expect_download() as download:
        page.click(f'a[download="{LABEL}.yaml"]')
    assert Path(download.value.path()).read_bytes() == file.read_bytes()
    screenshot(page, "console-secret.png")

    # Shown once: the table and its JSON never show it again.
    page.click("#done")
    assert secret not in page.content()
    assert secret not in page.request.get(taas.relay.console_url + "labels.json").text()

    # Start the agent with the command the page showed, forwarding to a hidden server.
    chain, key = taas.ca.issue(taas.host(LABEL))
    hidden = world.HiddenServer(LABEL, chain, key)
    argv = shlex.split(command)
    assert argv[0] == "taas-agent"
    forward = argv.index("--forward")
    argv[forward + 1] = f"{hidden.addr[0]}:{hidden.addr[1]}"
    argv[0] = str(taas.bin_dir / "taas-agent")
    agent = world.start_argv(f"taas-agent {LABEL}", argv + ["--parked", "2", "--log-format", "json"],
                             taas.dir, taas.pid_file)
    taas.processes.append(agent)
    try:
        # The table shows it parked, through the page's live updates (no reload).
        try:
            world.wait_until(f"{LABEL} parked in the table",
                             lambda: cell(page, LABEL, 4) == "2" or None)
        except AssertionError as e:
            row = page.locator(f'tr[data-label="{LABEL}"]').inner_text()
            raise AssertionError(f"{e}\nrow: {row}\npage errors: {errors}\n{agent.tail()}") from None
        assert "from 127.0.0.1" in cell(page, LABEL, 6)
        screenshot(page, "console-table.png")

        # Fetch through it with curl: a 307 from the relay, then the hidden server's TLS.
        bundle = taas.dir / "relay-and-ca.pem"
        bundle.write_bytes(taas.relay.cert.read_bytes() + taas.ca.cert.read_bytes())
        out = subprocess.run(
            ["curl", "-sS", "-L", "--max-time", "10", "--cacert", str(bundle),
             taas.url(LABEL, "/through-the-console")],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, f"{out.stderr}\n{taas.logs()}\n{agent.tail()}"
        assert f"Hello from the hidden server <code>{LABEL}</code>" in out.stdout

        # Rotate the secret (confirmed first): a new one is shown, the old agent is refused.
        page.click(f'tr[data-label="{LABEL}"] a.action.rotate')
        assert "new secret" in page.locator("#confirm").inner_text()
        with page.expect_navigation():
            page.click("#confirm-button")
        assert page.locator("#secret h2").inner_text() == f"Secret rotated: {LABEL}"
        assert page.locator("#secret-b32").inner_text() != secret
        # The relay closed what the old agent had parked; it registers again with the old
        # secret and is refused, and the table shows nothing parked and the 401s.
        world.wait_until("the old agent refused (401)",
                         lambda: registrations(taas, LABEL, "unauthorized") > 0)
        page.click("#done")
        world.wait_until("the 401s in the table",
                         lambda: cell(page, LABEL, 4) == "0" and not cell(page, LABEL, 7).startswith("0 /"))
    finally:
        agent.stop()
        hidden.close()

    # Delete it (confirmed first): the file goes and the relay stops serving it.
    page.goto(taas.relay.console_url)
    page.click(f'tr[data-label="{LABEL}"] a.action.delete')
    with page.expect_navigation():
        page.click("#confirm-button")
    assert f"Label {LABEL} deleted" in page.locator("#notice").inner_text()
    assert page.locator(f'tr[data-label="{LABEL}"]').count() == 0
    assert not file.exists()
    # The other labels were left alone.
    assert cell(page, "home", 3) == "serving" and cell(page, "work", 3) == "serving"


def test_bad_input_shows_inline_errors_and_writes_nothing(taas, page):
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(taas.relay.console_url)
    before = sorted(p.name for p in taas.relay.labels.iterdir())
    page.fill("#id", "has a space")
    page.fill("#label", "bad..label")
    page.fill("#period", "0")
    with page.expect_navigation() as nav:
        page.click("#create button[type=submit]")
    assert nav.value is not None and nav.value.status == 400, taas.logs()
    assert "LABEL" in page.locator("#label-error").inner_text() or page.locator("#label-error").is_visible()
    assert page.locator("#id-error").is_visible()
    assert page.locator("#period-error").is_visible()
    assert page.locator("#label").input_value() == "bad..label"
    assert sorted(p.name for p in taas.relay.labels.iterdir()) == before
    page.locator("#create").scroll_into_view_if_needed()
    if os.environ.get("TAAS_SCREENSHOTS") == "1":
        page.locator("#create").screenshot(path=str(ROOT / "docs" / "console-form-error.png"))


def test_a_forged_cross_site_post_changes_nothing(taas, page):
    # The visitor has a console session (its cookie is in the browser)...
    page.goto(taas.relay.console_url)
    before = sorted(p.name for p in taas.relay.labels.iterdir())
    # ...and opens another site's page that posts a form to the console.
    evil = "http://attacker.example/"
    form = (
        "<!doctype html><title>evil</title>"
        f'<form id=f method=post action="{taas.relay.console_url}labels">'
        '<input name=id value=evil><input name=label value=forged>'
        '<input name=csrf value=guess></form>'
        "<script>document.getElementById('f').submit()</script>"
    )
    page.route(evil, lambda route: route.fulfill(status=200, content_type="text/html", body=form))
    with page.expect_navigation(url=f"{taas.relay.console_url}labels") as nav:
        page.goto(evil)
    assert nav.value is not None and nav.value.status == 403
    assert "Nothing was changed" in page.content()
    assert sorted(p.name for p in taas.relay.labels.iterdir()) == before
    assert not (taas.relay.labels / "forged.yaml").exists()
