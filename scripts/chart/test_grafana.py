"""The Grafana dashboard (issue 17): a ConfigMap for the Grafana sidecar, off by default, its
JSON valid, the same as charts/taas/dashboards/taas.json, and every query naming a metric the
relay, gateway or operator exports, each of which some panel shows."""

import glob
import json
import os
import re

from chart import CHART, NAMESPACE, ROOT, kinds, render

DASHBOARD = os.path.join(CHART, "dashboards", "taas.json")


def dashboards(docs):
    return [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def exported_metrics():
    """Metric families the relay, gateway and operator register (not the agent's)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "relay", "src", "**", "*.rs"), recursive=True):
        if os.sep + "agent" in path:
            continue
        names |= set(re.findall(r'register\(\s*"(taas_[a-z_]+)"', open(path).read()))
    operator = open(os.path.join(ROOT, "operator", "src", "metrics.rs")).read()
    prefix = re.search(r'sub_registry_with_prefix\("([a-z_]+)"\)', operator).group(1)
    names |= {f"{prefix}_{n}" for n in re.findall(r'register\(\s*"([a-z_]+)"', operator)}
    return names


def queried_metrics(dashboard):
    found = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(taas_[a-z_]+)", target["expr"]):
                found.add(re.sub(r"_(total|bucket|sum|count)$", "", name))
    return found


def test_no_dashboard_is_rendered_by_default():
    assert not dashboards(render())


def test_the_dashboard_renders_when_on_with_the_sidecars_label_and_valid_json():
    [cm] = dashboards(render(sets=["grafana.dashboard.enabled=true"]))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    dashboard = json.loads(cm["data"]["taas.json"])
    with open(DASHBOARD) as f:
        assert dashboard == json.load(f), "the ConfigMap holds dashboards/taas.json as it is"
    assert dashboard["uid"] == "taas" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    [cm] = dashboards(render(sets=[
        "grafana.dashboard.enabled=true", "grafana.dashboard.namespace=monitoring",
        "grafana.dashboard.annotations.grafana_folder=TAAS",
        "grafana.dashboard.labels.grafana_dashboard=taas",
    ]))
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "TAAS"}
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "taas"


def test_every_query_names_an_exported_metric_and_every_metric_is_shown():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exported, queried = exported_metrics(), queried_metrics(dashboard)
    assert len(exported) > 20, exported
    assert not queried - exported, f"queries of metrics nobody exports: {sorted(queried - exported)}"
    assert not exported - queried, f"metrics no panel shows: {sorted(exported - queried)}"
