"""NetworkPolicies: on by default; the gateway open on 8443 only, a relay's control port only to
the gateway pods, and before Kubernetes 1.22 (no endPort) the relay's public ports one by one."""

from chart import NAMESPACE, RELEASE, ci, kinds, named, render


def test_network_policy_gateway_and_relay_control_port():
    """NetworkPolicy: gateway 8443 + metrics; relay control port only from the gateway pods"""
    docs = render(values_files=[ci("everything-on")])
    pols = kinds(docs, "NetworkPolicy")
    relay = [p for p in pols if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "taas-relay"}]
    assert sorted(p["metadata"]["namespace"] for p in relay) == ["hidden-servers", "more-servers"], "relay policies not in relayNamespaces"
    gw_labels = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    for p in relay:
        rules = p["spec"]["ingress"]
        for rule in rules:
            for port in rule.get("ports") or []:
                lo, hi = port["port"], port.get("endPort", port["port"])
                if lo <= 8080 <= hi:
                    peers = rule.get("from") or []
                    assert len(peers) == 1, f"control port open to {peers or 'everyone'}"
                    sel = peers[0]["podSelector"]["matchLabels"]
                    assert all(gw_labels.get(k) == v for k, v in sel.items()), "control port peer is not the gateway pods"
                    assert peers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}, "control peer namespace"
        public = [r for r in rules if not r.get("from")]
        assert public, "the rendezvous/client ports are closed"
    gw = [p for p in pols if p["metadata"]["name"] == f"{RELEASE}-gateway"][0]
    open_ports = [(port["port"], port.get("endPort")) for r in gw["spec"]["ingress"] if not r.get("from") for port in r["ports"]]
    # HTTPS, and the cluster edge's shared port and rendezvous ports (on by default).
    assert open_ports == [(8443, None), (9443, None), (20000, 20255)], f"gateway open ports {open_ports}"
    gw = named(render(values_files=[ci("everything-on")], sets=["edge.enabled=false"]), "NetworkPolicy", f"{RELEASE}-gateway")
    open_ports = [port["port"] for r in gw["spec"]["ingress"] if not r.get("from") for port in r["ports"]]
    assert open_ports == [8443], f"gateway open ports without the edge {open_ports}"
    docs = render(sets=["networkPolicy.enabled=true"])
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"]
    assert [p["metadata"]["namespace"] for p in relay] == [NAMESPACE], "default relay policy namespace"


def test_network_policy_before_1_22_lists_public_ports():
    """NetworkPolicy: on by default; before Kubernetes 1.22 (no endPort) the relay's own public ports one by one, never control or metrics"""
    docs = render(kube="1.20.2")
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"]
    assert len(relay) == 1 and relay[0]["metadata"]["namespace"] == NAMESPACE, f"relay policies {relay}"
    public = [r for r in relay[0]["spec"]["ingress"] if not r.get("from")]
    assert len(public) == 1, f"public rules {public}"
    ports = public[0]["ports"]
    assert all("endPort" not in p for p in ports), "endPort before 1.22 (dropped there: only the first port would be open)"
    got = sorted(p["port"] for p in ports)
    assert got == list(range(20000, 20064)) + [21000], f"public ports before 1.22: {got}"
    docs = render(kube="1.22.0")
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"][0]
    public = [r for r in relay["spec"]["ingress"] if not r.get("from")][0]["ports"]
    covered = lambda port: any(p["port"] <= port <= p.get("endPort", p["port"]) for p in public)
    assert all(covered(p) for p in (1, 20000, 20063, 21000, 65535)) and not covered(8080) and not covered(9464), f"public port ranges {public}"
    assert not kinds(render(sets=["networkPolicy.enabled=false"]), "NetworkPolicy"), "NetworkPolicy rendered when disabled"
