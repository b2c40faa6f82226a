"""What the chart tests share: where the chart and the generated CRD are, and `helm template`
with a cache (one render serves every test that asks for the same values, and rendering is
most of the suite's time).

helm and kubernetes-validate are taken from PATH; scripts/test-chart.sh puts the pinned ones
from scripts/k8s/tools.sh first.
"""

import os
import subprocess

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "charts", "taas")
CI_DIR = os.path.join(CHART, "ci")
CRD_FILE = os.path.join(ROOT, "crds", "taaslabels.yaml")
CRD_COPY = os.path.join(CHART, "crds-src", "taaslabels.yaml")
EXAMPLE = os.path.join(ROOT, "examples", "label.yaml")

KUBE_VERSIONS = ["1.30", "1.33"]
RELEASE = "taas"
NAMESPACE = "taas-system"
CUSTOM_KINDS = {"ServiceMonitor", "Certificate", "TaasLabel"}
MONITORING_API = "monitoring.coreos.com/v1"

HELM = "helm"
KUBERNETES_VALIDATE = "kubernetes-validate"


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def ci_files():
    return sorted(f for f in os.listdir(CI_DIR) if f.endswith("-values.yaml"))


def template_args(values_files=(), sets=(), set_strings=(), api_versions=(), kube=None, namespace=NAMESPACE, release=RELEASE):
    cmd = [HELM, "template", release, CHART, "--namespace", namespace]
    for f in values_files:
        cmd += ["-f", f]
    for s in sets:
        cmd += ["--set", s]
    for s in set_strings:
        cmd += ["--set-string", s]
    for a in api_versions:
        cmd += ["--api-versions", a]
    if kube:
        cmd += ["--kube-version", kube]
    return cmd


_render_cache = {}


def render_text(**kw):
    key = repr(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kw.items()))
    if key not in _render_cache:
        result = run(template_args(**kw))
        if result.returncode != 0:
            pytest.fail(f"helm template failed: {' '.join(template_args(**kw)[2:])}\n{result.stderr.strip()}", pytrace=False)
        _render_cache[key] = result.stdout
    return _render_cache[key]


def render(**kw):
    return [d for d in yaml.safe_load_all(render_text(**kw)) if d]


def ci(name):
    return os.path.join(CI_DIR, f"{name}-values.yaml")


def kinds(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def named(docs, kind, name):
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def pod_specs(docs):
    for d in docs:
        kind = d.get("kind")
        if kind not in WORKLOADS:
            continue
        name = f"{kind}/{d['metadata']['name']}"
        if kind == "Pod":
            yield name, d["spec"]
        elif kind == "CronJob":
            yield name, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        else:
            yield name, d["spec"]["template"]["spec"]


def gateway_pod_spec(docs):
    return named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]


def gateway_auth_volume(spec):
    volumes = [v for v in spec["volumes"] if v["name"] == "gateway-auth"]
    assert len(volumes) == 1, f"gateway-auth volumes {volumes}"
    return volumes[0]["secret"]


def policy_of(docs):
    cm = named(docs, "ConfigMap", f"{RELEASE}-operator-policy")
    return yaml.safe_load(cm["data"]["policy.yaml"])
