"""The CRD: the chart's copy and its render are the generated crds/taaslabels.yaml (without the
CEL rules before Kubernetes 1.25, which refuses them), and examples/label.yaml validates against
its openAPIV3Schema (its CEL rules are checked by the Rust tests in crds/tests/crd.rs)."""

import copy
import os

import jsonschema
import pytest
import yaml

from chart import CRD_COPY, CRD_FILE, EXAMPLE, MONITORING_API, RELEASE, ci, kinds, render


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


def test_crd_copy_is_the_generated_crd():
    """CRD copy: charts/taas/crds-src/taaslabels.yaml is byte for byte crds/taaslabels.yaml"""
    with open(CRD_FILE, "rb") as a:
        generated = a.read()
    assert os.path.exists(CRD_COPY), "charts/taas/crds-src/taaslabels.yaml is missing; sync it with: cp crds/taaslabels.yaml charts/taas/crds-src/taaslabels.yaml"
    with open(CRD_COPY, "rb") as b:
        copied = b.read()
    assert generated == copied, "charts/taas/crds-src/taaslabels.yaml differs from the generated crds/taaslabels.yaml; sync it with: cp crds/taaslabels.yaml charts/taas/crds-src/taaslabels.yaml"


@pytest.mark.parametrize("keep", [True, False], ids=["crds.keep=true", "crds.keep=false"])
def test_rendered_crd_is_the_generated_one(keep):
    """CRD: the rendered CRD is the generated one, with the chart's labels and keep policy"""
    with open(CRD_FILE) as f:
        generated = yaml.safe_load(f)
    docs = render(sets=[f"crds.keep={str(keep).lower()}"])
    crds = kinds(docs, "CustomResourceDefinition")
    assert len(crds) == 1, f"{len(crds)} CRDs rendered"
    crd = copy.deepcopy(crds[0])
    meta = crd["metadata"]
    labels = meta.pop("labels", {})
    annotations = meta.pop("annotations", {}) or {}
    assert labels.get("app.kubernetes.io/instance") == RELEASE, "CRD without the chart's labels"
    assert (annotations.get("helm.sh/resource-policy") == "keep") == keep, f"crds.keep={keep} but annotations {annotations}"
    assert crd == generated, "the rendered CRD differs from crds/taaslabels.yaml beyond labels/annotations"


def without_cel(node):
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


@pytest.mark.parametrize(("kube", "with_cel"), [("1.20.2", False), ("1.24.9", False), ("1.25.0", True)])
def test_crd_without_cel_rules_before_1_25(kube, with_cel):
    """CRD: before Kubernetes 1.25 the same CRD without its CEL rules (x-kubernetes-validations)"""
    with open(CRD_FILE) as f:
        generated = yaml.safe_load(f)
    assert without_cel(generated) != generated, "the generated CRD has no CEL rules: this check checks nothing"
    want = generated if with_cel else without_cel(generated)
    crd = kinds(render(kube=kube), "CustomResourceDefinition")[0]
    crd["metadata"].pop("labels", None)
    crd["metadata"].pop("annotations", None)
    assert crd == want, f"Kubernetes {kube}: the rendered CRD is not the generated one {'without' if want != generated else 'with'} CEL rules"


def test_crds_enabled_false_renders_no_crd():
    """CRD: crds.enabled=false renders no CRD"""
    docs = render(sets=["crds.enabled=false"], api_versions=[MONITORING_API])
    assert not kinds(docs, "CustomResourceDefinition"), "a CRD was rendered"
    docs = render(values_files=[ci("single-namespace")])
    assert not kinds(docs, "CustomResourceDefinition"), "a CRD was rendered (single-namespace)"


def test_example_label_validates_against_the_crd():
    """examples/label.yaml validates against the CRD's openAPIV3Schema (unknown fields rejected)"""
    validator, crd = label_validator()
    with open(EXAMPLE) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    labels = [d for d in docs if d.get("kind") == crd["spec"]["names"]["kind"]]
    assert labels, "no TaasLabel in examples/label.yaml"
    for d in labels:
        assert d["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}", f"apiVersion {d['apiVersion']}"
        errors = sorted(validator.iter_errors(d), key=str)
        assert not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    refs = {(d["spec"]["secretRef"]["name"]) for d in labels}
    secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
    assert refs <= secrets, f"examples/label.yaml references Secrets {sorted(refs - secrets)} it does not define"


# Bad labels, each made from the example by one change to its spec.
BAD_LABELS = {
    "wrong enum: algorithm MD5": lambda s: s.__setitem__("algorithm", "MD5"),
    "missing id": lambda s: s.pop("id"),
    "bad LABEL": lambda s: s.__setitem__("label", "Not A Label"),
    "unknown field maxParkd": lambda s: s.__setitem__("maxParkd", 3),
    "bad port: clientPort 70000": lambda s: s.__setitem__("clientPort", 70000),
    "wrong enum: service type Ingress": lambda s: s["service"].__setitem__("type", "Ingress"),
    "wrong type: period a string": lambda s: s.__setitem__("period", "30"),
}


@pytest.mark.parametrize("mutate", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
def test_crd_schema_check_rejects_bad_labels(mutate):
    """the CRD schema check rejects bad labels (wrong enum, missing id, bad LABEL, unknown field, bad port)"""
    validator, _crd = label_validator()
    with open(EXAMPLE) as f:
        good = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "TaasLabel"][0]
    bad = copy.deepcopy(good)
    mutate(bad["spec"])
    assert list(validator.iter_errors(bad)), f"the mutation was accepted: {bad['spec']}"

