"""The cluster edge (edge.*, issue 15.3): the gateway's Service carries the shared client port and
the shared rendezvous ports, each with one number everywhere (port == targetPort, == nodePort
for NodePort); the gateway listens on them; the operator is told the Service and the ports; the
relays' edge port is open to the gateway pods only; edge.enabled=false renders no trace of it."""

from chart import NAMESPACE, RELEASE, ci, gateway_pod_spec, kinds, named, render

EDGE_RELAY_PORT = 21001  # operator/src/names.rs: EDGE_PORT


def gateway_container(docs):
    return gateway_pod_spec(docs)["containers"][0]


def operator_args(docs):
    return named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]


def edge_service_ports(docs):
    svc = named(docs, "Service", f"{RELEASE}-gateway")
    return svc, [p for p in svc["spec"]["ports"] if p["name"] != "https"]


def test_edge_is_on_by_default_with_one_number_per_port():
    """edge (default): gateway --shared-port 9443 --rendezvous-ports 20000-20255, Service ports shared and rdv-T with port == targetPort, operator --edge-service"""
    docs = render()
    c = gateway_container(docs)
    assert "--shared-port=0.0.0.0:9443" in c["args"] and "--rendezvous-ports=20000-20255" in c["args"], f"gateway args {c['args']}"
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert container_ports["shared"] == 9443 and container_ports["https"] == 8443, f"container ports {container_ports}"
    assert [container_ports[f"rdv-{t}"] for t in range(20000, 20256)] == list(range(20000, 20256)), "rdv container ports"
    svc, ports = edge_service_ports(docs)
    assert [p["name"] for p in ports] == ["shared"] + [f"rdv-{t}" for t in range(20000, 20256)], "edge Service port names"
    for p in ports:
        assert p["port"] == p["targetPort"] and p["protocol"] == "TCP", f"port {p}: port != targetPort"
        assert "nodePort" not in p, f"a {svc['spec']['type']} Service pins node port {p}"
    assert ports[0]["port"] == 9443, f"shared port {ports[0]}"
    args = operator_args(docs)
    for want in ("--edge-service=taas-gateway", "--edge-shared-port=9443", "--edge-rendezvous-ports=20000-20255"):
        assert want in args, f"missing {want} in operator args {args}"


def test_edge_on_a_node_port_gateway_pins_node_ports_to_the_same_numbers():
    """edge + NodePort gateway: nodePort == port == targetPort for shared and every rdv-T (ci/nodeport: 30444, 31000-31255)"""
    docs = render(values_files=[ci("nodeport")])
    svc, ports = edge_service_ports(docs)
    assert svc["spec"]["type"] == "NodePort", svc["spec"]
    assert len(ports) == 257, f"{len(ports)} edge ports"
    for p in ports:
        assert p["port"] == p["targetPort"] == p["nodePort"], f"port {p}: not one number everywhere"
        assert 30000 <= p["port"] <= 32767, f"port {p} outside the node port range"
    assert ports[0] == {"name": "shared", "port": 30444, "targetPort": 30444, "nodePort": 30444, "protocol": "TCP"}, ports[0]
    https = [p for p in svc["spec"]["ports"] if p["name"] == "https"][0]
    assert https["nodePort"] == 30443 and https["targetPort"] == "https", f"https port {https}"
    # Pinned node ports come first: the API server allocates in list order, so a random https
    # node port cannot take one of them.
    assert svc["spec"]["ports"][-1]["name"] == "https", [p["name"] for p in svc["spec"]["ports"]][-3:]
    args = gateway_container(docs)["args"]
    assert "--shared-port=0.0.0.0:30444" in args and "--rendezvous-ports=31000-31255" in args, f"gateway args {args}"
    assert "--edge-rendezvous-ports=31000-31255" in operator_args(docs), "operator range differs from the gateway's"


def test_edge_range_follows_first_and_count():
    """edge.rendezvousPorts.first/count: the range first..first+count-1 everywhere"""
    docs = render(sets=["edge.rendezvousPorts.first=40000", "edge.rendezvousPorts.count=3", "edge.sharedPort=40100"])
    _, ports = edge_service_ports(docs)
    assert [(p["name"], p["port"]) for p in ports] == [("shared", 40100), ("rdv-40000", 40000), ("rdv-40001", 40001), ("rdv-40002", 40002)], ports
    assert "--rendezvous-ports=40000-40002" in gateway_container(docs)["args"]
    assert "--edge-rendezvous-ports=40000-40002" in operator_args(docs) and "--edge-shared-port=40100" in operator_args(docs)


def test_edge_disabled_leaves_no_trace():
    """edge.enabled=false: no edge flags, ports, Service ports or relay edge port in any rendering"""
    for values in ([], [ci("everything-on")], [ci("nodeport")], [ci("single-namespace")]):
        docs = render(values_files=values, sets=["edge.enabled=false"])
        c = gateway_container(docs)
        assert not any(a.startswith(("--shared-port", "--rendezvous-ports")) for a in c["args"]), f"{values}: gateway args {c['args']}"
        assert [p["name"] for p in c["ports"]] == ["https", "metrics"], f"{values}: container ports {c['ports']}"
        _, ports = edge_service_ports(docs)
        assert ports == [], f"{values}: edge Service ports {ports}"
        assert not any(a.startswith("--edge-") for a in operator_args(docs)), f"{values}: operator args"
        for pol in kinds(docs, "NetworkPolicy"):
            for rule in pol["spec"]["ingress"]:
                assert all(p["port"] != EDGE_RELAY_PORT for p in rule.get("ports") or []), f"{values}: edge port in {pol['metadata']['name']}"


def test_relays_edge_port_is_open_to_the_gateway_pods_only():
    """NetworkPolicy with the edge: relays' 21001 only from the gateway pods (with the control port), never public; before 1.22 the public list is unchanged"""
    for kube in ("1.30.0", "1.20.2"):
        docs = render(sets=["networkPolicy.enabled=true"], kube=kube)
        relay = named(docs, "NetworkPolicy", f"{RELEASE}-relays")
        rules = relay["spec"]["ingress"]
        covering = [r for r in rules for p in r.get("ports") or [] if p["port"] <= EDGE_RELAY_PORT <= p.get("endPort", p["port"])]
        assert len(covering) == 1, f"{kube}: rules covering {EDGE_RELAY_PORT}: {covering}"
        rule = covering[0]
        assert [p["port"] for p in rule["ports"]] == [8080, EDGE_RELAY_PORT], f"{kube}: gateway-only ports {rule['ports']}"
        peers = rule["from"]
        assert len(peers) == 1 and peers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}, f"{kube}: peers {peers}"
        assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway", f"{kube}: peers {peers}"
    public = [r for r in rules if not r.get("from")][0]["ports"]
    assert sorted(p["port"] for p in public) == list(range(20000, 20064)) + [21000], "public ports before 1.22"
    docs = render(sets=["networkPolicy.enabled=true"], kube="1.30.0")
    public = [r for r in named(docs, "NetworkPolicy", f"{RELEASE}-relays")["spec"]["ingress"] if not r.get("from")][0]["ports"]
    covered = lambda port: any(p["port"] <= port <= p.get("endPort", p["port"]) for p in public)
    assert all(covered(p) for p in (1, 8079, 8081, 20000, 21000, 21002, 65535)), f"public ranges {public}"
    assert not any(covered(p) for p in (8080, 9464, EDGE_RELAY_PORT)), f"public ranges {public}"


def test_gateway_policy_opens_the_edge_ports_one_by_one_before_1_22():
    """NetworkPolicy before 1.22: the gateway's edge ports listed one by one (no endPort)"""
    docs = render(sets=["networkPolicy.enabled=true", "edge.rendezvousPorts.count=4"], kube="1.20.2")
    gw = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    ports = [p for r in gw["spec"]["ingress"] if not r.get("from") for p in r["ports"]]
    assert all("endPort" not in p for p in ports), f"endPort before 1.22: {ports}"
    assert [p["port"] for p in ports] == [8443, 9443, 20000, 20001, 20002, 20003], f"gateway ports {ports}"
