"""What a release renders as a whole: optional parts off by default, a ServiceMonitor only where
the API exists, names within 63 characters with the standard labels, and the NOTES."""

import os
import re

import pytest

from chart import CHART, CI_DIR, HELM, MONITORING_API, NAMESPACE, RELEASE, ci, ci_files, kinds, named, render, run


def test_defaults_optional_parts_off():
    """defaults: optional parts off (NetworkPolicies on), routes ConfigMap not owned by the chart"""
    docs = render(api_versions=[MONITORING_API])
    for kind in ("ServiceMonitor", "PodDisruptionBudget", "Certificate", "Role", "RoleBinding"):
        assert not kinds(docs, kind), f"{kind} rendered by default"
    assert kinds(docs, "NetworkPolicy"), "no NetworkPolicy by default"
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)], api_versions=[MONITORING_API])
        # The Grafana dashboard (grafana.dashboard.enabled) is the chart's own too.
        cms = [d["metadata"]["name"] for d in kinds(docs, "ConfigMap")
               if d["metadata"]["name"] != f"{RELEASE}-dashboard"]
        assert cms == [f"{RELEASE}-operator-policy"], f"ci/{f}: the chart renders ConfigMaps {cms}; the operator owns the routes, the chart only its policy"


def test_service_monitor_only_with_the_api_and_enabled():
    """ServiceMonitor: only with monitoring.coreos.com/v1 and monitoring.serviceMonitor.enabled"""
    with_api = render(values_files=[ci("monitoring")], api_versions=[MONITORING_API])
    without_api = render(values_files=[ci("monitoring")])
    default_with_api = render(api_versions=[MONITORING_API])
    sms = kinds(with_api, "ServiceMonitor")
    assert len(sms) == 2, f"{len(sms)} ServiceMonitors with the API (want operator + gateway)"
    assert all(sm["metadata"]["labels"].get("release") == "prometheus" for sm in sms), "monitoring.serviceMonitor.labels not applied"
    assert not kinds(without_api, "ServiceMonitor"), "ServiceMonitor rendered without the API"
    assert not kinds(default_with_api, "ServiceMonitor"), "ServiceMonitor rendered while disabled"
    metrics = [s for s in kinds(without_api, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert len(metrics) == 2 and all(s["spec"]["type"] == "ClusterIP" for s in metrics), "metrics Services missing or not ClusterIP"
    for sm in sms:
        svc = named(with_api, "Service", sm["metadata"]["name"])
        sel = sm["spec"]["selector"]["matchLabels"]
        assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()), f"ServiceMonitor {sm['metadata']['name']} selects no Service"


def test_names_within_63_characters_and_standard_labels():
    """names: a 53-character release name gives names of at most 63 characters; standard labels everywhere"""
    docs = render(values_files=[ci("everything-on")], api_versions=[MONITORING_API], release="r" * 53)
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] != "CustomResourceDefinition":
            assert len(name) <= 63 and re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name), f"{d['kind']} name {name!r}"
        labels = d["metadata"].get("labels") or {}
        for k in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"):
            assert k in labels, f"{d['kind']} {name} lacks label {k}"


@pytest.mark.parametrize(("values", "port"), [("nodeport", ":$NODE_PORT"), ("everything-on", "")])
def test_notes(values, port):
    """NOTES: DNS records for the registrar and *.<domain>, the first label, its endpoint"""
    cmd = [HELM, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-f", ci(values)]
    result = run(cmd)
    assert result.returncode == 0, result.stderr.strip()
    notes = result.stdout.split("NOTES:", 1)[-1]
    for want in ("taas-registrar.example.com.  IN A", "*.taas.example.com.  IN A", "kubectl apply -f examples/label.yaml",
                 "kubectl get taaslabels", f"--relay https://taas-registrar.example.com{port} "):
        assert want in notes, f"ci/{values}: NOTES lack {want!r}"
