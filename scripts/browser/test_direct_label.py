"""Issue 15.2: browsers and curl reach a direct label with a plain URL,
`https://LABEL.<domain>/` on the relay's own HTTPS port, with TLS end to end to a hidden
server whose certificate the relay never had; a plain label on the same relay keeps its 307.
Set-up in conftest.py (real relay and agent binaries, headless Chromium, a test CA).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import world

HELLO = "Hello from the hidden server"


def paired(label: str, entry: str) -> str:
    return f'taas_pairings_total{{label="{label}",entry="{entry}"}}'


def test_chromium_opens_a_direct_label_at_a_plain_url_and_gets_the_hidden_servers_page_with_no_redirect(
    taas, page
):
    before = taas.relay.metric(paired("home", "direct"))
    url = taas.url("home", "/index.html?from=chromium")
    response = page.goto(url)
    assert response is not None, taas.logs()
    assert response.status == 200, taas.logs()
    assert response.url == url
    assert response.request.redirected_from is None, "no redirect in the response chain"
    assert page.title() == "Hidden server home"
    assert HELLO in page.content()
    host = f"{taas.host('home')}:{taas.relay.port}"
    assert f"GET /index.html?from=chromium HTTP/1.1 Host: {host}" in taas.hidden["home"].requests
    # The relay paired it as a direct client and sent no 307 for the label.
    world.wait_until(
        "the direct pairing counted",
        lambda: taas.relay.metric(paired("home", "direct")) > before,
    )
    assert taas.relay.metric('taas_redirects_total{label="home"}') == 0.0
    shot = os.environ.get("TAAS_BROWSER_SCREENSHOT")
    if shot:
        page.set_viewport_size({"width": 900, "height": 300})
        page.screenshot(path=shot)


def test_chromium_is_shown_the_hidden_servers_certificate_which_the_relay_never_had(taas, page):
    url = taas.url("home")
    response = page.goto(url)
    assert response is not None and response.status == 200, taas.logs()
    assert response.url == url and response.request.redirected_from is None
    details = response.security_details()
    assert details is not None, "an https response has security details"
    assert details.get("subjectName") == taas.host("home"), details
    assert details.get("issuer") == world.CA_NAME, details
    # Neither the hidden server's certificate nor its key is anywhere the relay reads.
    secrets = [
        p.read_bytes().strip()
        for p in taas.dir.glob(f"{taas.host('home')}.*")
        if p.suffix in (".key", ".crt")
    ]
    assert len(secrets) == 2
    for dir in (taas.relay.labels, taas.relay.state):
        for file in dir.rglob("*"):
            if file.is_file():
                data = file.read_bytes()
                assert not any(s in data for s in secrets), file


def test_a_plain_label_on_the_same_relay_still_answers_307_and_chromium_follows_it(taas, page):
    url = taas.url("work", "/a?b=1")
    response = page.goto(url)
    assert response is not None and response.status == 200, taas.logs()
    redirect = response.request.redirected_from
    assert redirect is not None, "the relay answered with a redirect"
    assert redirect.url == url
    first = redirect.response()
    assert first is not None and first.status == 307
    location = first.headers["location"]
    assert location.startswith(f"https://{taas.host('work')}:") and location.endswith("/a?b=1")
    assert response.url == location
    assert not location.startswith(f"https://{taas.host('work')}:{taas.relay.port}/")
    # The 307 came with the relay's own certificate; the page with the hidden server's.
    relay = first.security_details()
    assert relay is not None and relay.get("subjectName") == world.DOMAIN, relay
    assert relay.get("issuer") == world.DOMAIN, "the relay's self-signed certificate"
    details = response.security_details()
    assert details is not None and details.get("subjectName") == taas.host("work"), details
    assert HELLO in page.content() and page.title() == "Hidden server work"
    assert taas.relay.metric('taas_redirects_total{label="work"}') >= 1.0
    assert taas.relay.metric(paired("work", "direct")) == 0.0


def curl(url: str, cacert: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(cacert), "-w",
         "\nstatus: %{http_code} redirects: %{num_redirects} verify: %{ssl_verify_result}", url],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def test_curl_gets_the_same_page_at_the_same_url_trusting_only_the_test_ca(taas):
    # *.localhost resolves to loopback in curl: no --resolve needed.
    url = taas.url("home", "/index.html?from=curl")
    out = curl(url, taas.ca.cert)
    assert out.returncode == 0, f"{out.stderr}\n{taas.logs()}"
    assert HELLO in out.stdout
    assert out.stdout.rstrip().endswith("status: 200 redirects: 0 verify: 0"), out.stdout
    host = f"{taas.host('home')}:{taas.relay.port}"
    assert f"GET /index.html?from=curl HTTP/1.1 Host: {host}" in taas.hidden["home"].requests
    # The relay's certificate would not do: the page's certificate is not the relay's.
    out = curl(url, taas.relay.cert)
    assert out.returncode == 60, f"curl exit {out.returncode}: {out.stderr}"
