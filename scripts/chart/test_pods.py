"""Every pod the chart renders meets Pod Security Standards "restricted" (as the admission
controller checks it) and the chart's own hardening: a read-only root, resources, and probes
gentle enough not to kill a busy pod."""

import copy
import os

from chart import CI_DIR, MONITORING_API, ci_files, pod_specs, render
from pss import hardening_problems, restricted_problems


def test_every_pod_is_restricted_read_only_with_resources_and_gentle_probes():
    """every pod of every ci render is PSS restricted, read-only, with resources and gentle probes"""
    seen = 0
    for f in ci_files():
        docs = render(values_files=[os.path.join(CI_DIR, f)], api_versions=[MONITORING_API])
        for name, spec in pod_specs(docs):
            seen += 1
            problems = restricted_problems(spec) + hardening_problems(spec)
            assert not problems, f"ci/{f}: {name}: " + "; ".join(problems)
    assert seen >= 2 * len(ci_files()), f"only {seen} pod specs found"


def test_the_restricted_check_rejects_an_unrestricted_pod():
    """the PSS check itself rejects an unrestricted pod"""
    docs = render()
    spec = copy.deepcopy(next(s for _, s in pod_specs(docs)))
    del spec["securityContext"]["seccompProfile"]
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = restricted_problems(spec)
    assert len(problems) >= 3, f"only {problems}"
