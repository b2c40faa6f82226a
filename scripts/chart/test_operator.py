"""The operator's rendering: its flags, the cluster domain and the tenant policy it reads, and an
upgrade with --reuse-values from a release that predates some values."""

import os
import shutil
import tempfile

import yaml

from chart import CHART, HELM, NAMESPACE, RELEASE, ci, gateway_pod_spec, named, policy_of, render, run


def test_operator_flags():
    """operator: flags for names, image, namespace, routes, leader election; POD_NAMESPACE; Recreate unless elected"""
    docs = render()
    pod = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    strategy = named(docs, "Deployment", f"{RELEASE}-operator")["spec"].get("strategy")
    assert strategy == {"type": "Recreate"}, f"operator without leader election: strategy {strategy}, not Recreate"
    for want in ("--registrar=taas-registrar.localhost", "--domain=taas.localhost", "--routes-configmap=taas-routes",
                 "--relay-redirect-host=requested", "--relay-drain-timeout=30",
                 f"--relay-image={c['image']}", "--relay-image-pull-policy=IfNotPresent",
                 "--node-address-type=ExternalIP,InternalIP", "--metrics=0.0.0.0:9464"):
        assert want in args, f"missing {want} in {args}"
    assert "--leader-elect" not in args and not any(a.startswith("--namespace") for a in args), f"unexpected flags {args}"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", "no POD_NAMESPACE"
    assert c["image"] == "taas:0.1.0" and c["imagePullPolicy"] == "IfNotPresent", f"image {c['image']}"
    gw = gateway_pod_spec(docs)["containers"][0]
    assert gw["image"] == c["image"], "operator and gateway images differ"
    drain = named(render(sets=["operator.relay.drainTimeout=5"]), "Deployment", f"{RELEASE}-operator")
    assert "--relay-drain-timeout=5" in drain["spec"]["template"]["spec"]["containers"][0]["args"], "drainTimeout not passed"
    assert "--relay-replicas=1" in args, f"relay.replicas (default 1) not passed: {args}"
    replicas = named(render(sets=["relay.replicas=2"]), "Deployment", f"{RELEASE}-operator")
    assert "--relay-replicas=2" in replicas["spec"]["template"]["spec"]["containers"][0]["args"], "relay.replicas not passed"
    docs = render(values_files=[ci("everything-on")])
    c = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-elect" in c["args"] and "--namespace=hidden-servers" in c["args"], f"everything-on args {c['args']}"
    strategy = named(docs, "Deployment", f"{RELEASE}-operator")["spec"].get("strategy")
    assert strategy is None, f"operator with leader election: strategy {strategy} (rolling updates are safe)"
    assert c["image"].startswith("registry.example.com/taas@sha256:"), f"digest image {c['image']}"
    assert f"--relay-image={c['image']}" in c["args"], "relay image is not the operator's"
    gw = gateway_pod_spec(docs)["containers"][0]
    vol = [v for v in gateway_pod_spec(docs)["volumes"] if "configMap" in v][0]
    assert vol["configMap"]["name"] == "taas-routes" and "--routes-configmap=taas-routes" in c["args"], "routes ConfigMap names differ"


def test_cluster_domain():
    """cluster domain: routes use --cluster-domain from clusterDomain (default cluster.local)"""
    args = named(render(), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-domain=cluster.local" in args, f"args {args}"
    args = named(render(sets=["clusterDomain=k8s.example.org"]), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-domain=k8s.example.org" in args, f"args {args}"


def test_tenant_policy():
    """tenant policy: labelPolicy and servicePolicy reach the operator's --policy-file; a change restarts it"""
    docs = render()
    assert policy_of(docs) == {"labels": {}, "services": {"default": {"types": ["LoadBalancer", "NodePort", "ClusterIP"], "annotations": ["*"], "clientPort": True}, "namespaces": {}}}, f"default policy {policy_of(docs)}"
    operator = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]
    c = operator["spec"]["containers"][0]
    assert "--policy-file=/etc/taas/policy/policy.yaml" in c["args"], f"args {c['args']}"
    assert {"name": "policy", "mountPath": "/etc/taas/policy", "readOnly": True} in c["volumeMounts"], "policy not mounted"
    assert {"name": "policy", "configMap": {"name": f"{RELEASE}-operator-policy"}} in operator["spec"]["volumes"], "policy volume"
    before = operator["metadata"]["annotations"]["checksum/policy"]
    docs = render(values_files=[ci("everything-on")])
    policy = policy_of(docs)
    assert policy["labels"] == {"hidden-servers": ["home", "*.lab.example.com"], "platform": ["*"]}, f"labels {policy['labels']}"
    assert policy["services"]["namespaces"]["hidden-servers"] == {"types": ["ClusterIP", "NodePort"], "annotations": ["metallb.universe.tf/"], "clientPort": False}, f"services {policy['services']}"
    after = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/policy"] != before and after.get("example.com/scrape") == "true", f"annotations {after}"


def test_reuse_values_from_before_issue_13():
    """helm upgrade --reuse-values from a release made before the issue 13 (and 15.3) values still renders (missing keys are defaults; no edge)"""
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "taas")
        shutil.copytree(CHART, chart)
        with open(os.path.join(CHART, "values.yaml")) as f:
            values = yaml.safe_load(f)
        # --reuse-values renders with the stored values only, not the new chart's defaults.
        for key in ("clusterDomain", "gatewayAuth", "labelPolicy", "servicePolicy", "edge"):
            values.pop(key)
        with open(os.path.join(chart, "values.yaml"), "w") as f:
            yaml.safe_dump(values, f)
        result = run([HELM, "template", RELEASE, chart, "--namespace", NAMESPACE])
        assert result.returncode == 0, result.stderr.strip()
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        args = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--cluster-domain=cluster.local" in args, f"args {args}"
        # Without its values (a release from before issue 15.3) the cluster edge is off.
        assert not any(a.startswith("--edge-") for a in args), f"edge flags from reused values {args}"
        assert named(docs, "Secret", f"{RELEASE}-gateway-auth"), "no gateway auth Secret"
        policy = policy_of(docs)
        assert policy == {"labels": {}, "services": {"default": {}, "namespaces": {}}}, f"policy {policy}"
