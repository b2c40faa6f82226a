"""`helm lint --strict` with the defaults and each ci/*-values.yaml, and each ci render validated by
`kubernetes-validate --strict` for several Kubernetes minor versions (custom kinds: only
ServiceMonitor, Certificate and TaasLabel may lack a schema there)."""

import os
import re
import subprocess

import pytest
import yaml

from chart import CHART, CI_DIR, CUSTOM_KINDS, KUBE_VERSIONS, KUBERNETES_VALIDATE, MONITORING_API, NAMESPACE, HELM, ci_files, render_text, run


@pytest.mark.parametrize("values_file", [None] + ci_files(), ids=lambda f: f"ci/{f}" if f else "defaults")
def test_helm_lint_strict(values_file):
    cmd = [HELM, "lint", "--strict", CHART, "--namespace", NAMESPACE]
    if values_file:
        cmd += ["-f", os.path.join(CI_DIR, values_file)]
    result = run(cmd)
    assert result.returncode == 0, (result.stdout + result.stderr).strip()


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", ci_files())
def test_kubernetes_validate_strict(values_file, version):
    text = render_text(values_files=[os.path.join(CI_DIR, values_file)], api_versions=[MONITORING_API], kube=f"{version}.0")
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
    assert result.returncode == 0 and not bad, "\n".join(bad) or out
    docs = [d for d in yaml.safe_load_all(text) if d]
    passed = out.count("passed for resource")
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert passed == len(builtin), f"{passed} documents validated, {len(builtin)} built-in documents rendered"
