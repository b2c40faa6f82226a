"""values.yaml and values.schema.json: the schema rejects what it must with a clear message, the
templates refuse inconsistent combinations, the schema is closed and names the same keys as
values.yaml, and every value is documented.

The schema is kept by hand: no maintained generator is installable from the registries these
machines reach (the helm plugin helm-values-schema-json comes from GitHub only), and the ones
that are (e.g. @bitnami/readme-generator-for-helm) write types and defaults but not the
patterns, enums, ranges and closed objects the checks below rely on. So a test keeps the two
files naming the same keys instead.
"""

import json
import os
import re

import jsonschema
import pytest
import yaml

from chart import CHART, render, run, template_args

# Values the schema must reject: (description, --set, --set-string, expected message regex).
SCHEMA_REJECTS = [
    ("unknown top-level key", ["unknownKey=1"], [], r"additional propert|additionalProperties|not allowed"),
    ("unknown nested key (typo)", ["operator.replica=2"], [], r"additional propert|additionalProperties|not allowed"),
    ("unknown key deep down", ["gateway.service.typ=NodePort"], [], r"additional propert|additionalProperties|not allowed"),
    ("unknown securityContext field", ["gateway.containerSecurityContext.runAsRoot=true"], [], r"additional propert|additionalProperties|not allowed"),
    ("wrong type: replicas a string", [], ["operator.replicas=two"], r"integer|number|type"),
    ("wrong type: crds.enabled a string", [], ["crds.enabled=yes"], r"boolean|type"),
    ("wrong type: annotations a list", ["gateway.service.annotations={a,b}"], [], r"object|type"),
    ("bad enum: Service type", ["gateway.service.type=Ingress"], [], r"Ingress|enum|must be one of|value must be"),
    ("bad enum: pullPolicy", ["image.pullPolicy=Sometimes"], [], r"Sometimes|enum|must be one of|value must be"),
    ("bad enum: externalTrafficPolicy", ["gateway.service.externalTrafficPolicy=Nearest"], [], r"Nearest|enum|must be one of|value must be"),
    ("bad enum: logFormat", ["logFormat=xml"], [], r"xml|enum|must be one of|value must be"),
    ("bad enum: certManager issuer kind", ["gateway.tls.certManager.issuerRef.kind=Vault"], [], r"Vault|enum|must be one of|value must be"),
    ("bad pattern: registrar not a DNS name", ["registrar=Not_A_Host"], [], r"pattern|does not match|registrar"),
    ("bad pattern: memory quantity", ["gateway.resources.limits.memory=lots"], [], r"pattern|does not match|oneOf|memory"),
    ("out of range: node port", ["gateway.service.nodePort=70000"], [], r"maximum|70000|less than"),
    ("out of range: negative replicas", ["gateway.replicas=-1"], [], r"minimum|-1|greater"),
    ("bad pattern: clusterDomain not a DNS name", ["clusterDomain=cluster_local"], [], r"pattern|does not match|clusterDomain"),
    ("bad pattern: a LABEL pattern", ["labelPolicy.namespaces.team-a={Not A Label}"], [], r"pattern|does not match|labelPolicy"),
    ("bad pattern: a LABEL pattern with a bare *.", ["labelPolicy.namespaces.team-a={*.}"], [], r"pattern|does not match|labelPolicy"),
    ("bad pattern: a namespace in labelPolicy", ["labelPolicy.namespaces.Team_A={home}"], [], r"pattern|does not match|property name|labelPolicy"),
    ("wrong type: labelPolicy namespace not a list", [], ["labelPolicy.namespaces.team-a=home"], r"array|type"),
    ("bad enum: servicePolicy type", ["servicePolicy.default.types={Ingress}"], [], r"Ingress|enum|must be one of|value must be"),
    ("wrong type: servicePolicy clientPort a string", [], ["servicePolicy.default.clientPort=no"], r"boolean|type"),
    ("unknown key in a namespace's servicePolicy", ["servicePolicy.namespaces.team-a.nodePorts=false"], [], r"additional propert|additionalProperties|not allowed"),
    ("empty annotation prefix", [], ["servicePolicy.default.annotations[0]="], r"minLength|too short|annotations"),
    ("edge: no rendezvous ports", ["edge.rendezvousPorts.count=0"], [], r"minimum|count|greater"),
    ("edge: shared port out of range", ["edge.sharedPort=70000"], [], r"maximum|70000|less than"),
    ("edge: unknown key", ["edge.ports=1"], [], r"additional propert|additionalProperties|not allowed"),
    ("wrong type: edge.enabled a string", [], ["edge.enabled=yes"], r"boolean|type"),
    ("relay: no replicas", ["relay.replicas=0"], [], r"minimum|replicas|greater"),
    ("relay: more replicas than a label may ask for", ["relay.replicas=17"], [], r"maximum|replicas|less than"),
    ("wrong type: relay.replicas a string", [], ["relay.replicas=two"], r"integer|number|type"),
    ("relay: unknown key", ["relay.replica=2"], [], r"additional propert|additionalProperties|not allowed"),
]

# Values the schema allows but the templates refuse: (description, --set, expected message regex).
TEMPLATE_REJECTS = [
    ("operator.replicas > 1 without leader election", ["operator.replicas=2"], r"operator\.leaderElection\.enabled"),
    ("relay.replicas > 1 without the cluster edge", ["relay.replicas=2", "edge.enabled=false"], r"relay\.replicas is 2 but edge\.enabled is false"),
    ("gateway.replicas > 1 without a shared certificate", ["gateway.replicas=2"], r"gateway\.tls\.secretName"),
    ("cert-manager without an issuer", ["gateway.tls.certManager.enabled=true"], r"issuerRef\.name"),
    ("loadBalancerClass on a NodePort Service", ["gateway.service.type=NodePort", "gateway.service.loadBalancerClass=x"], r"loadBalancerClass"),
    ("PodDisruptionBudget with both bounds", ["gateway.podDisruptionBudget.enabled=true", "gateway.podDisruptionBudget.minAvailable=1"], r"minAvailable or maxUnavailable"),
    ("edge on a NodePort gateway with ports outside 30000-32767", ["gateway.service.type=NodePort"], r"node ports are 30000-32767: edge\.sharedPort is 9443 and edge\.rendezvousPorts are 20000-20255"),
    ("edge: the shared port inside the rendezvous range", ["edge.sharedPort=20005"], r"edge\.sharedPort 20005 is inside edge\.rendezvousPorts \(20000-20255\)"),
    ("edge: rendezvous range past 65535", ["edge.rendezvousPorts.first=65500"], r"end past port 65535"),
    ("edge: the range covers the gateway's HTTPS port", ["edge.rendezvousPorts.first=8400"], r"gateway container's port 8443"),
    ("edge: the gateway's node port is an edge port", ["gateway.service.type=NodePort", "edge.sharedPort=30444", "edge.rendezvousPorts.first=31000", "gateway.service.nodePort=31005"], r"gateway\.service\.nodePort 31005 is one of the edge's ports"),
]


def assert_rejected(sets, set_strings, pattern):
    result = run(template_args(sets=sets, set_strings=set_strings))
    assert result.returncode != 0, f"accepted: {sets + set_strings}"
    assert re.search(pattern, result.stderr, re.I), f"rejected, but the message does not say why ({pattern}): {result.stderr.strip()}"


@pytest.mark.parametrize(("sets", "set_strings", "pattern"), [r[1:] for r in SCHEMA_REJECTS], ids=[r[0] for r in SCHEMA_REJECTS])
def test_schema_rejects(sets, set_strings, pattern):
    assert_rejected(sets, set_strings, pattern)


@pytest.mark.parametrize(("sets", "pattern"), [r[1:] for r in TEMPLATE_REJECTS], ids=[r[0] for r in TEMPLATE_REJECTS])
def test_template_refuses(sets, pattern):
    assert_rejected(sets, [], pattern)


def test_accepted_combinations():
    """accepted combinations: replicas with leader election; gateway replicas with a TLS Secret; install --set of every kind"""
    render(sets=["operator.replicas=3", "operator.leaderElection.enabled=true"])
    render(sets=["gateway.replicas=3", "gateway.tls.secretName=my-tls"])
    render(sets=["operator.replicas=0", "gateway.service.nodePort=null", "gateway.podDisruptionBudget.enabled=true",
                 "gateway.podDisruptionBudget.maxUnavailable=50%"])


def test_values_schema_is_closed():
    """values.schema.json is closed: every object schema sets additionalProperties"""
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    assert schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"), "not draft-07"
    open_nodes = []

    def walk(node, path):
        if isinstance(node, dict):
            if (node.get("type") == "object" or "properties" in node) and node.get("additionalProperties") in (None, True):
                open_nodes.append(path or "/")
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")
    walk(schema, "")
    assert not open_nodes, f"open objects: {open_nodes}"
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    # (helm checks the ci files, merged with these defaults, in `helm lint`.)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
    assert not errors, "values.yaml does not satisfy its schema: " + "; ".join(e.message for e in errors)


def test_every_value_has_a_comment():
    """values.yaml: every value has a comment (on itself or an enclosing key)"""
    with open(os.path.join(CHART, "values.yaml")) as f:
        lines = f.read().splitlines()
    # Each non-comment line: (indent, key or None for a list item, comment on the line above).
    entries = []
    for n, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        documented = n > 0 and lines[n - 1].strip().startswith("#")
        m = re.match(r"^( *)([A-Za-z][\w./-]*):(.*)$", line)
        key = m.group(2) if m else None
        rest = m.group(3).strip() if m else stripped
        entries.append((len(line) - len(line.lstrip()), key, documented, rest))
    undocumented = []
    stack = []  # enclosing keys: (indent, key, documented)
    for i, (indent, key, documented, rest) in enumerate(entries):
        if key is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        # A group holds further keys; its leaves need a comment, on themselves or on any
        # enclosing key (e.g. `resources:` documents its requests and limits).
        is_group = rest == "" and nxt is not None and nxt[0] > indent and nxt[1] is not None
        if not is_group and not (documented or any(d for _, _, d in stack)):
            undocumented.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, documented))
    assert entries, "values.yaml is empty"
    assert not undocumented, f"values without a comment: {undocumented}"


def key_differences(values, schema, node, path="", shared=False):
    """Keys of values.yaml the schema does not name, and the chart's own keys (a `properties` list
    written for this chart, not a shared Kubernetes definition reached through a $ref) that
    values.yaml leaves out. Maps with free keys (annotations, per-namespace policies) are
    followed through their additionalProperties."""
    differences = []
    shared = shared or "$ref" in node
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(values, dict):
        return differences
    properties = node.get("properties")
    if properties is not None:
        for key, value in values.items():
            if key in properties:
                differences += key_differences(value, schema, properties[key], f"{path}.{key}", shared)
            else:
                differences.append(f"{path}.{key}: in values.yaml, not in the schema")
        if not shared:
            differences += [f"{path}.{key}: in the schema, not in values.yaml" for key in properties if key not in values]
    elif isinstance(node.get("additionalProperties"), dict):
        for key, value in values.items():
            differences += key_differences(value, schema, node["additionalProperties"], f"{path}.{key}", shared)
    return differences


def test_values_yaml_and_the_schema_name_the_same_keys():
    """values.yaml and values.schema.json name the same keys (the schema is kept by hand beside it)"""
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    differences = key_differences(values, schema, schema)
    assert not differences, "values.yaml and values.schema.json differ:\n" + "\n".join(differences)


def test_the_key_comparison_sees_a_missing_and_an_extra_key():
    """the key comparison itself reports a key missing on either side"""
    schema = {"properties": {"a": {"properties": {"b": {}, "c": {}}}, "m": {"$ref": "#/definitions/r"}},
              "definitions": {"r": {"properties": {"x": {"properties": {"y": {}}}, "z": {}}}}}
    # m is a shared definition: its keys (z, x.y) need not all be set; a's are the chart's own.
    values = {"a": {"b": 1, "d": 2}, "m": {"x": {}}}
    assert key_differences(values, schema, schema) == [
        ".a.d: in values.yaml, not in the schema",
        ".a.c: in the schema, not in values.yaml",
    ]
