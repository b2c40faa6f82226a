#!/usr/bin/env python3
"""Checks of the Helm chart charts/taas, run by scripts/test-chart.sh (which installs helm,
kubernetes-validate and this script's Python packages first).

Every check prints `ok - NAME` or `FAIL - NAME` with the reason, and the run ends with one
line `chart: N passed, M failed`; the exit status is non-zero when anything failed.

What is checked:
  - the chart's CRD source (crds-src/taaslabels.yaml) is byte for byte crds/taaslabels.yaml;
  - `helm lint --strict` with the defaults and each ci/*-values.yaml;
  - `helm template` of each ci file validates with `kubernetes-validate --strict` for several
    Kubernetes minor versions (custom kinds: only ServiceMonitor and Certificate may lack a
    schema there);
  - on the rendered YAML: every pod is Pod Security Standards "restricted" (plus a read-only
    root, resources, probes that do not kill a busy pod); RBAC grants exactly the operator's
    verbs (operator/src/rbac.rs) in every mode and nothing to the gateway; the rendered CRD is
    the generated one (labels and the keep policy aside; without CEL rules before Kubernetes
    1.25, which refuses them); `crds.enabled=false` renders no CRD;
    a ServiceMonitor only with the monitoring.coreos.com/v1 capability; TLS, Service and
    NetworkPolicy shapes; NOTES; names within 63 characters;
  - the gateway auth Secret (random, kept, mounted into the gateway and operator only), the
    cluster domain and the tenant policy reach the operator; NetworkPolicies on by default,
    with the relay's ports listed one by one before Kubernetes 1.22;
  - values the schema forbids (unknown keys, wrong types, bad enums and patterns) and
    inconsistent combinations are rejected with a clear message; the schema is closed
    (additionalProperties) at every level; every value in values.yaml has a comment;
  - examples/label.yaml validates against the CRD's openAPIV3Schema (its CEL rules are checked
    by the Rust tests in crds/tests/crd.rs).
"""

import argparse
import concurrent.futures
import copy
import os
import re
import subprocess
import sys
import traceback

import jsonschema
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

# The operator's API calls (operator/src/rbac.rs): (apiGroup, resource) -> verbs.
READ = {"get", "list", "watch"}
WRITE = READ | {"create", "patch"}
NAMESPACED_RULES = {
    ("taas.dev", "taaslabels"): READ,
    ("taas.dev", "taaslabels/status"): {"patch"},
    ("apps", "deployments"): WRITE,
    ("", "services"): WRITE,
    ("", "configmaps"): WRITE,
    ("", "secrets"): READ,
    ("events.k8s.io", "events"): {"create", "patch"},
}
NODE_RULES = {("", "nodes"): READ}
ROUTES_RULES = {("", "configmaps"): WRITE}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}

HELM = "helm"
KUBERNETES_VALIDATE = "kubernetes-validate"


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------------------- helm


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
            raise CheckFailed(f"helm template failed: {' '.join(template_args(**kw)[2:])}\n{result.stderr.strip()}")
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
    expect(len(found) == 1, f"expected one {kind} {name}, found {len(found)}")
    return found[0]


# ---------------------------------------------------------------------------- pods


WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


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


def restricted_problems(spec):
    """Pod Security Standards "restricted" (and baseline), as the admission controller checks them."""
    problems = []
    psc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field} is set")
    for v in spec.get("volumes") or []:
        types = set(v) - {"name"}
        if not types <= RESTRICTED_VOLUMES:
            problems.append(f"volume {v['name']} has a forbidden type {sorted(types - RESTRICTED_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile {pod_seccomp}")
    for sysctl in psc.get("sysctls") or []:
        problems.append(f"sysctl {sysctl.get('name')}")
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or []) + (spec.get("ephemeralContainers") or [])
    if not containers:
        problems.append("no containers")
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
            problems.append(f"{where}: runAsUser is 0 or unset (the image's user is unknown here)")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is {seccomp}, not RuntimeDefault/Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {caps.get('add')}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount {sc.get('procMount')}")
        if (sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            problems.append(f"{where}: seLinuxOptions.type")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}: appArmorProfile Unconfined")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                problems.append(f"{where}: hostPort {p['hostPort']}")
    return problems


def hardening_problems(spec):
    """The chart's own rules beyond PSS: read-only root, resources, gentle probes."""
    problems = []
    for c in spec.get("containers") or []:
        where = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        res = c.get("resources") or {}
        for section, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for k in keys:
                if k not in (res.get(section) or {}):
                    problems.append(f"{where}: no resources.{section}.{k}")
        for probe_name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            probe = c.get(probe_name)
            if not probe:
                problems.append(f"{where}: no {probe_name}")
                continue
            if (probe.get("httpGet") or {}).get("path") != path:
                problems.append(f"{where}: {probe_name} is not GET {path}")
            if probe.get("timeoutSeconds", 1) < 3:
                problems.append(f"{where}: {probe_name} timeoutSeconds < 3")
        live = c.get("livenessProbe") or {}
        if live and live.get("periodSeconds", 10) * live.get("failureThreshold", 3) < 60:
            problems.append(f"{where}: livenessProbe restarts after less than 60 s of failures")
        mounts = {m["name"] for m in c.get("volumeMounts") or [] if not m.get("readOnly")}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for m in mounts:
            if "emptyDir" not in volumes.get(m, {}):
                problems.append(f"{where}: writable mount {m} is not an emptyDir")
    return problems


# ---------------------------------------------------------------------------- RBAC


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
        expect(key in roles, f"{kind} {d['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}")
        bound.add(key)
        scope = "cluster" if kind == "ClusterRoleBinding" else ns
        for subject in d.get("subjects") or []:
            expect(subject["kind"] == "ServiceAccount", f"{kind} {d['metadata']['name']} binds a {subject['kind']}")
            sa = (subject.get("namespace"), subject["name"])
            for rule in roles[key].get("rules") or []:
                expect("nonResourceURLs" not in rule, f"{ref['name']}: nonResourceURLs")
                for field in ("apiGroups", "resources", "verbs"):
                    expect("*" not in rule.get(field, []), f"{ref['name']}: '*' in {field}")
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        out.setdefault(sa, {}).setdefault(scope, {}).setdefault((g, r), set()).update(rule["verbs"])
    unbound = set(roles) - bound
    expect(not unbound, f"roles bound to nothing: {sorted(unbound)}")
    return out


def merge_rules(*sets):
    out = {}
    for s in sets:
        for k, v in s.items():
            out.setdefault(k, set()).update(v)
    return out


def expected_grants(watch, leader, release_ns=NAMESPACE):
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


# ---------------------------------------------------------------------------- CRD schema


def openapi_to_jsonschema(node, strict=True):
    """The CRD's structural OpenAPI v3 schema as JSON Schema: `nullable` becomes a null type;
    with strict, objects without declared additional properties reject unknown fields (the
    API server would prune them silently, hiding a typo in an example)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: openapi_to_jsonschema(s, strict) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = openapi_to_jsonschema(v, strict) if isinstance(v, (dict, list)) else v
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [openapi_to_jsonschema(s, strict) for s in v]
        elif k.startswith("x-kubernetes-") or k in ("format", "default", "description", "title", "example"):
            continue
        else:
            out[k] = v
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if strict and node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def label_validator():
    with open(CRD_FILE) as f:
        crd = yaml.safe_load(f)
    version = [v for v in crd["spec"]["versions"] if v.get("storage")][0]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {})
    # apiVersion, kind and metadata are the API server's; the CRD schema leaves them out.
    for k in ("apiVersion", "kind", "metadata"):
        schema["properties"].setdefault(k, {})
    return jsonschema.Draft7Validator(schema), crd


# ---------------------------------------------------------------------------- checks

CHECKS = []


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


@check("CRD copy: charts/taas/crds-src/taaslabels.yaml is byte for byte crds/taaslabels.yaml")
def _():
    with open(CRD_FILE, "rb") as a:
        generated = a.read()
    expect(os.path.exists(CRD_COPY), "charts/taas/crds-src/taaslabels.yaml is missing; sync it with: cp crds/taaslabels.yaml charts/taas/crds-src/taaslabels.yaml")
    with open(CRD_COPY, "rb") as b:
        copied = b.read()
    expect(generated == copied, "charts/taas/crds-src/taaslabels.yaml differs from the generated crds/taaslabels.yaml; sync it with: cp crds/taaslabels.yaml charts/taas/crds-src/taaslabels.yaml")


def lint_check(values_file):
    def fn():
        cmd = [HELM, "lint", "--strict", CHART, "--namespace", NAMESPACE]
        if values_file:
            cmd += ["-f", values_file]
        result = run(cmd)
        expect(result.returncode == 0, (result.stdout + result.stderr).strip())
    return fn


CHECKS.append(("helm lint --strict (defaults)", lint_check(None)))
for _f in ci_files():
    CHECKS.append((f"helm lint --strict -f ci/{_f}", lint_check(os.path.join(CI_DIR, _f))))


def validate_check(values_file, version):
    def fn():
        text = render_text(values_files=[values_file], api_versions=[MONITORING_API], kube=f"{version}.0")
        result = subprocess.run([KUBERNETES_VALIDATE, "-k", version, "--strict", "-"], input=text, capture_output=True, text=True)
        out = (result.stdout + result.stderr).strip()
        bad = []
        for line in out.splitlines():
            if "passed for resource" in line:
                continue
            m = re.search(r"Couldn't find schema for kind (\S+) with api version", line)
            if m and m.group(1) in CUSTOM_KINDS:
                continue
            bad.append(line)
        expect(result.returncode == 0 and not bad, "\n".join(bad) or out)
        docs = [d for d in yaml.safe_load_all(text) if d]
        passed = out.count("passed for resource")
        builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        expect(passed == len(builtin), f"{passed} documents validated, {len(builtin)} built-in documents rendered")
    return fn


for _f in ci_files():
    for _v in KUBE_VERSIONS:
        CHECKS.append((f"kubernetes-validate --strict -k {_v}: ci/{_f}", validate_check(os.path.join(CI_DIR, _f), _v)))


@check("every pod of every ci render is PSS restricted, read-only, with resources and gentle probes")
def _():
    seen = 0
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)], api_versions=[MONITORING_API])
        for name, spec in pod_specs(docs):
            seen += 1
            problems = restricted_problems(spec) + hardening_problems(spec)
            expect(not problems, f"ci/{f}: {name}: " + "; ".join(problems))
    expect(seen >= 2 * len(ci_files()), f"only {seen} pod specs found")


@check("the PSS check itself rejects an unrestricted pod")
def _():
    docs = render()
    spec = copy.deepcopy(next(s for _, s in pod_specs(docs)))
    del spec["securityContext"]["seccompProfile"]
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = restricted_problems(spec)
    expect(len(problems) >= 3, f"only {problems}")


def rbac_check(values_files=(), sets=(), watch="", leader=False, namespace=NAMESPACE):
    def fn():
        docs = render(values_files=values_files, sets=sets, namespace=namespace)
        actual = grants(docs)
        operator_sa = (namespace, f"{RELEASE}-operator")
        expect(set(actual) <= {operator_sa}, f"RBAC granted to other accounts: {sorted(set(actual) - {operator_sa})}")
        got = actual.get(operator_sa, {})
        want = expected_grants(watch, leader, namespace)
        expect(got == want, "operator RBAC differs from operator/src/rbac.rs's list:\n" + grant_diff(got, want))
        for scope, rules in got.items():
            expect(rules.get(("", "secrets"), set()) <= READ, f"secrets written in {scope}")
    return fn


CHECKS += [
    ("RBAC: defaults grant exactly the operator's verbs, cluster-wide", rbac_check()),
    ("RBAC: leader election adds only leases get/create/update in the release namespace",
     rbac_check(sets=["operator.leaderElection.enabled=true", "operator.replicas=2"], leader=True)),
    ("RBAC: single namespace: a Role there, nodes-only ClusterRole, routes ConfigMap Role",
     rbac_check(values_files=[ci("single-namespace")], watch="hidden-servers")),
    ("RBAC: single namespace = release namespace: no separate routes Role",
     rbac_check(sets=["operator.watchNamespace=" + NAMESPACE], watch=NAMESPACE)),
    ("RBAC: everything-on (single namespace + leader election)",
     rbac_check(values_files=[ci("everything-on")], watch="hidden-servers", leader=True)),
    ("RBAC: nodeport and monitoring renders", lambda: [rbac_check(values_files=[ci(n)])() for n in ("nodeport", "monitoring")]),
]


@check("gateway: no API access (no token, no RBAC); relay pods get none from the chart")
def _():
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)])
        sa = named(docs, "ServiceAccount", f"{RELEASE}-gateway")
        expect(sa.get("automountServiceAccountToken") is False, "gateway ServiceAccount mounts a token")
        spec = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
        expect(spec.get("automountServiceAccountToken") is False, "gateway pod mounts a token")
        expect(spec["serviceAccountName"] == f"{RELEASE}-gateway", "gateway pod runs as another account")
        for d in docs:
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for s in d.get("subjects") or []:
                    expect(s["name"] != f"{RELEASE}-gateway", f"{d['kind']} {d['metadata']['name']} binds the gateway")


@check("CRD: the rendered CRD is the generated one, with the chart's labels and keep policy")
def _():
    with open(CRD_FILE) as f:
        generated = yaml.safe_load(f)
    for keep in (True, False):
        docs = render(sets=[f"crds.keep={str(keep).lower()}"])
        crds = kinds(docs, "CustomResourceDefinition")
        expect(len(crds) == 1, f"{len(crds)} CRDs rendered")
        crd = copy.deepcopy(crds[0])
        meta = crd["metadata"]
        labels = meta.pop("labels", {})
        annotations = meta.pop("annotations", {}) or {}
        expect(labels.get("app.kubernetes.io/instance") == RELEASE, "CRD without the chart's labels")
        expect((annotations.get("helm.sh/resource-policy") == "keep") == keep, f"crds.keep={keep} but annotations {annotations}")
        expect(crd == generated, "the rendered CRD differs from crds/taaslabels.yaml beyond labels/annotations")


def without_cel(node):
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


@check("CRD: before Kubernetes 1.25 the same CRD without its CEL rules (x-kubernetes-validations)")
def _():
    with open(CRD_FILE) as f:
        generated = yaml.safe_load(f)
    expect(without_cel(generated) != generated, "the generated CRD has no CEL rules: this check checks nothing")
    for kube, want in (("1.20.2", without_cel(generated)), ("1.24.9", without_cel(generated)), ("1.25.0", generated)):
        crd = kinds(render(kube=kube), "CustomResourceDefinition")[0]
        crd["metadata"].pop("labels", None)
        crd["metadata"].pop("annotations", None)
        expect(crd == want, f"Kubernetes {kube}: the rendered CRD is not the generated one {'without' if want != generated else 'with'} CEL rules")


@check("CRD: crds.enabled=false renders no CRD")
def _():
    docs = render(sets=["crds.enabled=false"], api_versions=[MONITORING_API])
    expect(not kinds(docs, "CustomResourceDefinition"), "a CRD was rendered")
    docs = render(values_files=[ci("single-namespace")])
    expect(not kinds(docs, "CustomResourceDefinition"), "a CRD was rendered (single-namespace)")


@check("ServiceMonitor: only with monitoring.coreos.com/v1 and monitoring.serviceMonitor.enabled")
def _():
    with_api = render(values_files=[ci("monitoring")], api_versions=[MONITORING_API])
    without_api = render(values_files=[ci("monitoring")])
    default_with_api = render(api_versions=[MONITORING_API])
    sms = kinds(with_api, "ServiceMonitor")
    expect(len(sms) == 2, f"{len(sms)} ServiceMonitors with the API (want operator + gateway)")
    expect(all(sm["metadata"]["labels"].get("release") == "prometheus" for sm in sms), "monitoring.serviceMonitor.labels not applied")
    expect(not kinds(without_api, "ServiceMonitor"), "ServiceMonitor rendered without the API")
    expect(not kinds(default_with_api, "ServiceMonitor"), "ServiceMonitor rendered while disabled")
    metrics = [s for s in kinds(without_api, "Service") if s["metadata"]["name"].endswith("-metrics")]
    expect(len(metrics) == 2 and all(s["spec"]["type"] == "ClusterIP" for s in metrics), "metrics Services missing or not ClusterIP")
    for sm in sms:
        svc = named(with_api, "Service", sm["metadata"]["name"])
        sel = sm["spec"]["selector"]["matchLabels"]
        expect(all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()), f"ServiceMonitor {sm['metadata']['name']} selects no Service")


@check("defaults: optional parts off (NetworkPolicies on), routes ConfigMap not owned by the chart")
def _():
    docs = render(api_versions=[MONITORING_API])
    for kind in ("ServiceMonitor", "PodDisruptionBudget", "Certificate", "Role", "RoleBinding"):
        expect(not kinds(docs, kind), f"{kind} rendered by default")
    expect(kinds(docs, "NetworkPolicy"), "no NetworkPolicy by default")
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)], api_versions=[MONITORING_API])
        cms = [d["metadata"]["name"] for d in kinds(docs, "ConfigMap")]
        expect(cms == [f"{RELEASE}-operator-policy"], f"ci/{f}: the chart renders ConfigMaps {cms}; the operator owns the routes, the chart only its policy")


@check("gateway: Service 443 -> 8443, LoadBalancer with externalTrafficPolicy Local by default; NodePort; ClusterIP")
def _():
    docs = render()
    svc = named(docs, "Service", f"{RELEASE}-gateway")
    expect(svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local", f"default Service {svc['spec']}")
    port = svc["spec"]["ports"][0]
    expect(port["port"] == 443 and port["protocol"] == "TCP", f"Service port {port}")
    container = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["containers"][0]
    target = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    expect(target and target[0]["containerPort"] == 8443, f"targetPort {port['targetPort']} is not container port 8443")
    expect("--listen=0.0.0.0:8443" in container["args"], "gateway does not listen on 8443")
    svc = named(render(values_files=[ci("nodeport")]), "Service", f"{RELEASE}-gateway")
    expect(svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0].get("nodePort") == 30443, f"NodePort Service {svc['spec']}")
    svc = named(render(values_files=[ci("single-namespace")]), "Service", f"{RELEASE}-gateway")
    expect(svc["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in svc["spec"], f"ClusterIP Service {svc['spec']}")
    svc = named(render(values_files=[ci("everything-on")]), "Service", f"{RELEASE}-gateway")
    expect(svc["spec"].get("loadBalancerClass") == "example.com/lb" and svc["metadata"].get("annotations"), "loadBalancerClass/annotations not applied")


def gateway_container(docs):
    return named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]


@check("gateway TLS: self-signed into an emptyDir / an existing Secret / a cert-manager Certificate")
def _():
    spec = gateway_container(render())
    args = spec["containers"][0]["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    expect("--state-dir=/var/lib/taas" in args and not any(a.startswith("--tls-") for a in args), f"self-signed args {args}")
    mount = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/var/lib/taas"]
    expect(mount and "emptyDir" in volumes[mount[0]["name"]], "no emptyDir at /var/lib/taas")
    routes = [v for v in spec["volumes"] if "configMap" in v]
    expect(len(routes) == 1 and routes[0]["configMap"] == {"name": "taas-routes", "optional": True}, f"routes volume {routes}")
    expect("--routes-file=/etc/taas/routes/routes.yaml" in args, "no --routes-file")
    expect("--registrar=taas-registrar.localhost" in args and "--domain=taas.localhost" in args, f"names {args}")

    spec = gateway_container(render(values_files=[ci("nodeport")]))
    args = spec["containers"][0]["args"]
    expect("--tls-cert=/etc/taas/tls/tls.crt" in args and "--tls-key=/etc/taas/tls/tls.key" in args, f"Secret args {args}")
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v and v["name"] != "gateway-auth"]
    expect(secrets == ["taas-gateway-tls"], f"TLS volume {secrets}")
    expect(not any(a.startswith("--state-dir") for a in args), "state dir with a Secret")

    docs = render(values_files=[ci("everything-on")])
    cert = named(docs, "Certificate", f"{RELEASE}-gateway")
    expect(cert["spec"]["dnsNames"] == ["taas-registrar.example.com", "*.taas.example.com"], f"dnsNames {cert['spec']['dnsNames']}")
    expect(cert["spec"]["issuerRef"] == {"name": "letsencrypt-dns01", "kind": "ClusterIssuer", "group": "cert-manager.io"}, f"issuerRef {cert['spec']['issuerRef']}")
    spec = gateway_container(docs)
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v and v["name"] != "gateway-auth"]
    expect(secrets == [cert["spec"]["secretName"]], f"gateway mounts {secrets}, the Certificate writes {cert['spec']['secretName']}")
    expect(not kinds(render(values_files=[ci("nodeport")]), "Certificate"), "Certificate without certManager.enabled")


@check("operator: flags for names, image, namespace, routes, leader election; POD_NAMESPACE; Recreate unless elected")
def _():
    docs = render()
    pod = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    strategy = named(docs, "Deployment", f"{RELEASE}-operator")["spec"].get("strategy")
    expect(strategy == {"type": "Recreate"}, f"operator without leader election: strategy {strategy}, not Recreate")
    for want in ("--registrar=taas-registrar.localhost", "--domain=taas.localhost", "--routes-configmap=taas-routes",
                 "--relay-redirect-host=requested",
                 f"--relay-image={c['image']}", "--relay-image-pull-policy=IfNotPresent",
                 "--node-address-type=ExternalIP,InternalIP", "--metrics=0.0.0.0:9464"):
        expect(want in args, f"missing {want} in {args}")
    expect("--leader-elect" not in args and not any(a.startswith("--namespace") for a in args), f"unexpected flags {args}")
    env = {e["name"]: e for e in c["env"]}
    expect(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", "no POD_NAMESPACE")
    expect(c["image"] == "taas:0.1.0" and c["imagePullPolicy"] == "IfNotPresent", f"image {c['image']}")
    gw = gateway_container(docs)["containers"][0]
    expect(gw["image"] == c["image"], "operator and gateway images differ")
    docs = render(values_files=[ci("everything-on")])
    c = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    expect("--leader-elect" in c["args"] and "--namespace=hidden-servers" in c["args"], f"everything-on args {c['args']}")
    strategy = named(docs, "Deployment", f"{RELEASE}-operator")["spec"].get("strategy")
    expect(strategy is None, f"operator with leader election: strategy {strategy} (rolling updates are safe)")
    expect(c["image"].startswith("registry.example.com/taas@sha256:"), f"digest image {c['image']}")
    expect(f"--relay-image={c['image']}" in c["args"], "relay image is not the operator's")
    gw = gateway_container(docs)["containers"][0]
    vol = [v for v in gateway_container(docs)["volumes"] if "configMap" in v][0]
    expect(vol["configMap"]["name"] == "taas-routes" and "--routes-configmap=taas-routes" in c["args"], "routes ConfigMap names differ")


@check("NetworkPolicy: gateway 8443 + metrics; relay control port only from the gateway pods")
def _():
    docs = render(values_files=[ci("everything-on")])
    pols = kinds(docs, "NetworkPolicy")
    relay = [p for p in pols if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "taas-relay"}]
    expect(sorted(p["metadata"]["namespace"] for p in relay) == ["hidden-servers", "more-servers"], "relay policies not in relayNamespaces")
    gw_labels = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    for p in relay:
        rules = p["spec"]["ingress"]
        for rule in rules:
            for port in rule.get("ports") or []:
                lo, hi = port["port"], port.get("endPort", port["port"])
                if lo <= 8080 <= hi:
                    peers = rule.get("from") or []
                    expect(len(peers) == 1, f"control port open to {peers or 'everyone'}")
                    sel = peers[0]["podSelector"]["matchLabels"]
                    expect(all(gw_labels.get(k) == v for k, v in sel.items()), "control port peer is not the gateway pods")
                    expect(peers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}, "control peer namespace")
        public = [r for r in rules if not r.get("from")]
        expect(public, "the rendezvous/client ports are closed")
    gw = [p for p in pols if p["metadata"]["name"] == f"{RELEASE}-gateway"][0]
    open_ports = [port["port"] for r in gw["spec"]["ingress"] if not r.get("from") for port in r["ports"]]
    expect(open_ports == [8443], f"gateway open ports {open_ports}")
    docs = render(sets=["networkPolicy.enabled=true"])
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"]
    expect([p["metadata"]["namespace"] for p in relay] == [NAMESPACE], "default relay policy namespace")


@check("NetworkPolicy: on by default; before Kubernetes 1.22 (no endPort) the relay's own public ports one by one, never control or metrics")
def _():
    docs = render(kube="1.20.2")
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"]
    expect(len(relay) == 1 and relay[0]["metadata"]["namespace"] == NAMESPACE, f"relay policies {relay}")
    public = [r for r in relay[0]["spec"]["ingress"] if not r.get("from")]
    expect(len(public) == 1, f"public rules {public}")
    ports = public[0]["ports"]
    expect(all("endPort" not in p for p in ports), "endPort before 1.22 (dropped there: only the first port would be open)")
    got = sorted(p["port"] for p in ports)
    expect(got == list(range(20000, 20064)) + [21000], f"public ports before 1.22: {got}")
    docs = render(kube="1.22.0")
    relay = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-relays"][0]
    public = [r for r in relay["spec"]["ingress"] if not r.get("from")][0]["ports"]
    covered = lambda port: any(p["port"] <= port <= p.get("endPort", p["port"]) for p in public)
    expect(all(covered(p) for p in (1, 20000, 20063, 21000, 65535)) and not covered(8080) and not covered(9464), f"public port ranges {public}")
    expect(not kinds(render(sets=["networkPolicy.enabled=false"]), "NetworkPolicy"), "NetworkPolicy rendered when disabled")


def gateway_auth_volume(spec):
    volumes = [v for v in spec["volumes"] if v["name"] == "gateway-auth"]
    expect(len(volumes) == 1, f"gateway-auth volumes {volumes}")
    return volumes[0]["secret"]


@check("gateway auth: one random Secret, kept (resource policy), mounted into the gateway and the operator only, env TAAS_GATEWAY_SECRET_FILE")
def _():
    import base64
    docs = render()
    secrets = kinds(docs, "Secret")
    expect([s["metadata"]["name"] for s in secrets] == [f"{RELEASE}-gateway-auth"], f"Secrets {[s['metadata']['name'] for s in secrets]}")
    secret = secrets[0]
    expect(secret["metadata"]["namespace"] == NAMESPACE, "gateway auth Secret outside the release namespace")
    expect(secret["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep", "gateway auth Secret not kept")
    value = base64.b64decode(secret["data"]["secret"]).decode()
    expect(re.fullmatch(r"[A-Za-z0-9]{48}", value), f"install secret is not 48 random letters and digits: {len(value)} characters")
    again = [d for d in yaml.safe_load_all(run(template_args()).stdout) if d and d.get("kind") == "Secret"][0]
    expect(again["data"]["secret"] != secret["data"]["secret"], "two fresh renders gave the same install secret")
    for name in ("gateway", "operator"):
        spec = named(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        vol = gateway_auth_volume(spec)
        expect(vol["secretName"] == f"{RELEASE}-gateway-auth" and vol["defaultMode"] == 0o440 and vol["items"] == [{"key": "secret", "path": "secret"}], f"{name}: volume {vol}")
        expect(spec["securityContext"].get("fsGroup") == 65532, f"{name}: no fsGroup 65532, the 0440 file is unreadable")
        c = spec["containers"][0]
        mounts = [m for m in c["volumeMounts"] if m["name"] == "gateway-auth"]
        expect(mounts == [{"name": "gateway-auth", "mountPath": "/etc/taas/gateway-auth", "readOnly": True}], f"{name}: mounts {mounts}")
        env = {e["name"]: e.get("value") for e in c["env"]}
        expect(env.get("TAAS_GATEWAY_SECRET_FILE") == "/etc/taas/gateway-auth/secret", f"{name}: env {env}")
        expect(not any("gateway-secret" in a for a in c["args"]), f"{name}: the secret file as an argument (older binaries would refuse it)")
    # Nothing else mounts it.
    for name, spec in pod_specs(docs):
        if name not in (f"Deployment/{RELEASE}-gateway", f"Deployment/{RELEASE}-operator"):
            expect(not any(v["name"] == "gateway-auth" for v in spec.get("volumes") or []), f"{name} mounts the gateway secret")
    # An existing Secret instead: none rendered, that one mounted.
    docs = render(sets=["gatewayAuth.existingSecret=vault-taas"])
    expect(not kinds(docs, "Secret"), "a Secret rendered with gatewayAuth.existingSecret")
    for name in ("gateway", "operator"):
        spec = named(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        expect(gateway_auth_volume(spec)["secretName"] == "vault-taas", f"{name} does not mount the existing Secret")


@check("cluster domain: routes use --cluster-domain from clusterDomain (default cluster.local)")
def _():
    args = named(render(), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    expect("--cluster-domain=cluster.local" in args, f"args {args}")
    args = named(render(sets=["clusterDomain=k8s.example.org"]), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    expect("--cluster-domain=k8s.example.org" in args, f"args {args}")


def policy_of(docs):
    cm = named(docs, "ConfigMap", f"{RELEASE}-operator-policy")
    return yaml.safe_load(cm["data"]["policy.yaml"])


@check("tenant policy: labelPolicy and servicePolicy reach the operator's --policy-file; a change restarts it")
def _():
    docs = render()
    expect(policy_of(docs) == {"labels": {}, "services": {"default": {"types": ["LoadBalancer", "NodePort", "ClusterIP"], "annotations": ["*"], "clientPort": True}, "namespaces": {}}},
           f"default policy {policy_of(docs)}")
    operator = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]
    c = operator["spec"]["containers"][0]
    expect("--policy-file=/etc/taas/policy/policy.yaml" in c["args"], f"args {c['args']}")
    expect({"name": "policy", "mountPath": "/etc/taas/policy", "readOnly": True} in c["volumeMounts"], "policy not mounted")
    expect({"name": "policy", "configMap": {"name": f"{RELEASE}-operator-policy"}} in operator["spec"]["volumes"], "policy volume")
    before = operator["metadata"]["annotations"]["checksum/policy"]
    docs = render(values_files=[ci("everything-on")])
    policy = policy_of(docs)
    expect(policy["labels"] == {"hidden-servers": ["home", "*.lab.example.com"], "platform": ["*"]}, f"labels {policy['labels']}")
    expect(policy["services"]["namespaces"]["hidden-servers"] == {"types": ["ClusterIP", "NodePort"], "annotations": ["metallb.universe.tf/"], "clientPort": False},
           f"services {policy['services']}")
    after = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["annotations"]
    expect(after["checksum/policy"] != before and after.get("example.com/scrape") == "true", f"annotations {after}")


@check("helm upgrade --reuse-values from a release made before the issue 13 values still renders (missing keys are defaults)")
def _():
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "taas")
        shutil.copytree(CHART, chart)
        with open(os.path.join(CHART, "values.yaml")) as f:
            values = yaml.safe_load(f)
        # --reuse-values renders with the stored values only, not the new chart's defaults.
        for key in ("clusterDomain", "gatewayAuth", "labelPolicy", "servicePolicy"):
            values.pop(key)
        with open(os.path.join(chart, "values.yaml"), "w") as f:
            yaml.safe_dump(values, f)
        result = run([HELM, "template", RELEASE, chart, "--namespace", NAMESPACE])
        expect(result.returncode == 0, result.stderr.strip())
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        args = named(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
        expect("--cluster-domain=cluster.local" in args, f"args {args}")
        expect(named(docs, "Secret", f"{RELEASE}-gateway-auth"), "no gateway auth Secret")
        policy = policy_of(docs)
        expect(policy == {"labels": {}, "services": {"default": {}, "namespaces": {}}}, f"policy {policy}")


@check("PodDisruptionBudget: policy/v1, selects the gateway pods")
def _():
    docs = render(values_files=[ci("everything-on")], kube="1.30.0")
    pdb = named(docs, "PodDisruptionBudget", f"{RELEASE}-gateway")
    expect(pdb["apiVersion"] == "policy/v1" and pdb["spec"].get("minAvailable") == 1 and "maxUnavailable" not in pdb["spec"], f"PDB {pdb}")
    labels = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    expect(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB selects no gateway pod")


@check("names: a 53-character release name gives names of at most 63 characters; standard labels everywhere")
def _():
    docs = render(values_files=[ci("everything-on")], api_versions=[MONITORING_API], release="r" * 53)
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] != "CustomResourceDefinition":
            expect(len(name) <= 63 and re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name), f"{d['kind']} name {name!r}")
        labels = d["metadata"].get("labels") or {}
        for k in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"):
            expect(k in labels, f"{d['kind']} {name} lacks label {k}")


@check("NOTES: DNS records for the registrar and *.<domain>, the first label, its endpoint")
def _():
    for f, port in (("nodeport", ":$NODE_PORT"), ("everything-on", "")):
        cmd = [HELM, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-f", ci(f)]
        result = run(cmd)
        expect(result.returncode == 0, result.stderr.strip())
        notes = result.stdout.split("NOTES:", 1)[-1]
        for want in ("taas-registrar.example.com.  IN A", "*.taas.example.com.  IN A", "kubectl apply -f examples/label.yaml",
                     "kubectl get taaslabels", f"--relay https://taas-registrar.example.com{port} "):
            expect(want in notes, f"ci/{f}: NOTES lack {want!r}")


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
]

# Values the schema allows but the templates refuse: (description, --set, expected message regex).
TEMPLATE_REJECTS = [
    ("operator.replicas > 1 without leader election", ["operator.replicas=2"], r"operator\.leaderElection\.enabled"),
    ("gateway.replicas > 1 without a shared certificate", ["gateway.replicas=2"], r"gateway\.tls\.secretName"),
    ("cert-manager without an issuer", ["gateway.tls.certManager.enabled=true"], r"issuerRef\.name"),
    ("loadBalancerClass on a NodePort Service", ["gateway.service.type=NodePort", "gateway.service.loadBalancerClass=x"], r"loadBalancerClass"),
    ("PodDisruptionBudget with both bounds", ["gateway.podDisruptionBudget.enabled=true", "gateway.podDisruptionBudget.minAvailable=1"], r"minAvailable or maxUnavailable"),
]


def reject_check(sets, set_strings, pattern):
    kube = next((s.split("=", 1)[1] for s in sets if s.startswith("@kube=")), None)
    sets = [s for s in sets if not s.startswith("@kube=")]

    def fn():
        result = run(template_args(sets=sets, set_strings=set_strings, kube=kube))
        expect(result.returncode != 0, f"accepted: {sets + set_strings}")
        expect(re.search(pattern, result.stderr, re.I), f"rejected, but the message does not say why ({pattern}): {result.stderr.strip()}")
    return fn


for _d, _s, _ss, _p in SCHEMA_REJECTS:
    CHECKS.append((f"schema rejects {_d}", reject_check(_s, _ss, _p)))
for _d, _s, _p in TEMPLATE_REJECTS:
    CHECKS.append((f"template refuses {_d}", reject_check(_s, [], _p)))


@check("accepted combinations: replicas with leader election; gateway replicas with a TLS Secret; install --set of every kind")
def _():
    render(sets=["operator.replicas=3", "operator.leaderElection.enabled=true"])
    render(sets=["gateway.replicas=3", "gateway.tls.secretName=my-tls"])
    render(sets=["operator.replicas=0", "gateway.service.nodePort=null", "gateway.podDisruptionBudget.enabled=true",
                 "gateway.podDisruptionBudget.maxUnavailable=50%"])


@check("values.schema.json is closed: every object schema sets additionalProperties")
def _():
    import json
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    expect(schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"), "not draft-07")
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
    expect(not open_nodes, f"open objects: {open_nodes}")
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    # (helm checks the ci files, merged with these defaults, in `helm lint`.)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
    expect(not errors, "values.yaml does not satisfy its schema: " + "; ".join(e.message for e in errors))


@check("values.yaml: every value has a comment (on itself or an enclosing key)")
def _():
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
    expect(entries, "values.yaml is empty")
    expect(not undocumented, f"values without a comment: {undocumented}")


@check("examples/label.yaml validates against the CRD's openAPIV3Schema (unknown fields rejected)")
def _():
    validator, crd = label_validator()
    with open(EXAMPLE) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    labels = [d for d in docs if d.get("kind") == crd["spec"]["names"]["kind"]]
    expect(labels, "no TaasLabel in examples/label.yaml")
    for d in labels:
        expect(d["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}", f"apiVersion {d['apiVersion']}")
        errors = sorted(validator.iter_errors(d), key=str)
        expect(not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors))
    refs = {(d["spec"]["secretRef"]["name"]) for d in labels}
    secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
    expect(refs <= secrets, f"examples/label.yaml references Secrets {sorted(refs - secrets)} it does not define")


@check("the CRD schema check rejects bad labels (wrong enum, missing id, bad LABEL, unknown field, bad port)")
def _():
    validator, _crd = label_validator()
    with open(EXAMPLE) as f:
        good = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "TaasLabel"][0]
    mutations = [
        lambda s: s.__setitem__("algorithm", "MD5"),
        lambda s: s.pop("id"),
        lambda s: s.__setitem__("label", "Not A Label"),
        lambda s: s.__setitem__("maxParkd", 3),
        lambda s: s.__setitem__("clientPort", 70000),
        lambda s: s["service"].__setitem__("type", "Ingress"),
        lambda s: s.__setitem__("period", "30"),
    ]
    for i, mutate in enumerate(mutations):
        bad = copy.deepcopy(good)
        mutate(bad["spec"])
        expect(list(validator.iter_errors(bad)), f"mutation {i} was accepted: {bad['spec']}")


# ---------------------------------------------------------------------------- main


def main():
    global HELM, KUBERNETES_VALIDATE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helm", default="helm")
    parser.add_argument("--kubernetes-validate", default="kubernetes-validate")
    parser.add_argument("-j", "--jobs", type=int, default=max(2, os.cpu_count() or 2))
    args = parser.parse_args()
    HELM, KUBERNETES_VALIDATE = args.helm, args.kubernetes_validate

    def run_check(item):
        name, fn = item
        try:
            fn()
            return name, None
        except CheckFailed as e:
            return name, str(e)
        except Exception:  # a bug in a check is a failure too, with its trace
            return name, traceback.format_exc()

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_check, CHECKS))
    failed = 0
    for name, error in results:
        if error is None:
            print(f"ok - {name}")
        else:
            failed += 1
            print(f"FAIL - {name}")
            for line in error.rstrip().splitlines():
                print(f"    {line}")
    print(f"chart: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
