"""RBAC: the operator gets exactly the verbs operator/src/rbac.rs lists, in every mode (cluster-wide,
one watched namespace, leader election), and the gateway gets no API access at all."""

import os

import pytest

from chart import CI_DIR, NAMESPACE, RELEASE, ci, ci_files, named, render

# The operator's API calls (operator/src/rbac.rs): (apiGroup, resource) -> verbs.
READ = {"get", "list", "watch"}
WRITE = READ | {"create", "patch"}
NAMESPACED_RULES = {
    ("taas.dev", "taaslabels"): READ,
    ("taas.dev", "taaslabels/status"): {"patch"},
    ("apps", "deployments"): WRITE | {"delete"},
    ("apps", "statefulsets"): WRITE | {"delete"},
    ("policy", "poddisruptionbudgets"): WRITE | {"delete"},
    ("", "services"): WRITE | {"delete"},
    ("", "configmaps"): WRITE,
    ("", "secrets"): READ,
    ("events.k8s.io", "events"): {"create", "patch"},
}
NODE_RULES = {("", "nodes"): READ}
ROUTES_RULES = {("", "configmaps"): WRITE}
GATEWAY_SERVICE_RULES = {("", "services"): READ}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def grants(docs):
    """scope ('cluster' or a namespace) -> {(group, resource): verbs}, for each ServiceAccount."""
    roles = {}
    for d in docs:
        if d.get("kind") in ("Role", "ClusterRole"):
            key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
            roles[key] = d
    bound = set()
    out = {}
    for d in docs:
        kind = d.get("kind")
        if kind not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = d["roleRef"]
        ns = d["metadata"].get("namespace")
        key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
        assert key in roles, f"{kind} {d['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}"
        bound.add(key)
        scope = "cluster" if kind == "ClusterRoleBinding" else ns
        for subject in d.get("subjects") or []:
            assert subject["kind"] == "ServiceAccount", f"{kind} {d['metadata']['name']} binds a {subject['kind']}"
            sa = (subject.get("namespace"), subject["name"])
            for rule in roles[key].get("rules") or []:
                assert "nonResourceURLs" not in rule, f"{ref['name']}: nonResourceURLs"
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), f"{ref['name']}: '*' in {field}"
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        out.setdefault(sa, {}).setdefault(scope, {}).setdefault((g, r), set()).update(rule["verbs"])
    unbound = set(roles) - bound
    assert not unbound, f"roles bound to nothing: {sorted(unbound)}"
    return out


def merge_rules(*sets):
    out = {}
    for s in sets:
        for k, v in s.items():
            out.setdefault(k, set()).update(v)
    return out


def expected_grants(watch, leader, release_ns=NAMESPACE, edge=True):
    scopes = {}
    if not watch:
        scopes["cluster"] = merge_rules(NAMESPACED_RULES, NODE_RULES)
        if leader:
            scopes[release_ns] = dict(LEASE_RULES)
    else:
        scopes["cluster"] = dict(NODE_RULES)
        scopes[watch] = dict(NAMESPACED_RULES)
        extra = {}
        if watch != release_ns:
            extra = merge_rules(extra, ROUTES_RULES)
            if edge:
                # the gateway's Service, whose address the labels reached through it share
                extra = merge_rules(extra, GATEWAY_SERVICE_RULES)
        if leader:
            extra = merge_rules(extra, LEASE_RULES)
        if extra:
            scopes[release_ns] = merge_rules(scopes.get(release_ns, {}), extra)
    return scopes


def grant_diff(got, want):
    lines = []
    for scope in sorted(set(got) | set(want)):
        g, w = got.get(scope, {}), want.get(scope, {})
        for key in sorted(set(g) | set(w)):
            extra, missing = g.get(key, set()) - w.get(key, set()), w.get(key, set()) - g.get(key, set())
            what = f"{scope}: {key[0] or 'core'}/{key[1]}"
            if extra:
                lines.append(f"  {what}: granted but not needed: {sorted(extra)}")
            if missing:
                lines.append(f"  {what}: needed but not granted: {sorted(missing)}")
    return "\n".join(lines)


def test_gateway_has_no_api_access():
    """gateway: no API access (no token, no RBAC); relay pods get none from the chart"""
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)])
        sa = named(docs, "ServiceAccount", f"{RELEASE}-gateway")
        assert sa.get("automountServiceAccountToken") is False, "gateway ServiceAccount mounts a token"
        spec = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
        assert spec.get("automountServiceAccountToken") is False, "gateway pod mounts a token"
        assert spec["serviceAccountName"] == f"{RELEASE}-gateway", "gateway pod runs as another account"
        for d in docs:
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for s in d.get("subjects") or []:
                    assert s["name"] != f"{RELEASE}-gateway", f"{d['kind']} {d['metadata']['name']} binds the gateway"


# (values files, --set, watched namespace, leader election, release namespace)
RBAC_CASES = {
    "defaults grant exactly the operator's verbs, cluster-wide": ((), (), "", False),
    "leader election adds only leases get/create/update in the release namespace":
        ((), ("operator.leaderElection.enabled=true", "operator.replicas=2"), "", True),
    "single namespace: a Role there, nodes-only ClusterRole, routes ConfigMap Role":
        ((ci("single-namespace"),), (), "hidden-servers", False),
    "single namespace = release namespace: no separate routes Role": ((), ("operator.watchNamespace=" + NAMESPACE,), NAMESPACE, False),
    "everything-on (single namespace + leader election)": ((ci("everything-on"),), (), "hidden-servers", True),
    "nodeport render": ((ci("nodeport"),), (), "", False),
    "monitoring render": ((ci("monitoring"),), (), "", False),
    "single namespace without the cluster edge: no Service reading in the release namespace":
        ((ci("single-namespace"),), ("edge.enabled=false",), "hidden-servers", False),
}


@pytest.mark.parametrize(("values_files", "sets", "watch", "leader"), list(RBAC_CASES.values()), ids=list(RBAC_CASES))
def test_operator_rbac_is_exactly_its_verbs(values_files, sets, watch, leader):
    namespace = NAMESPACE
    docs = render(values_files=values_files, sets=sets, namespace=namespace)
    actual = grants(docs)
    operator_sa = (namespace, f"{RELEASE}-operator")
    assert set(actual) <= {operator_sa}, f"RBAC granted to other accounts: {sorted(set(actual) - {operator_sa})}"
    got = actual.get(operator_sa, {})
    want = expected_grants(watch, leader, namespace, edge="edge.enabled=false" not in sets)
    assert got == want, "operator RBAC differs from operator/src/rbac.rs's list:\n" + grant_diff(got, want)
    for scope, rules in got.items():
        assert rules.get(("", "secrets"), set()) <= READ, f"secrets written in {scope}"
