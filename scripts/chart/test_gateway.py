"""The gateway's rendering: its Service, its TLS (self-signed, an existing Secret, cert-manager),
the gateway auth Secret it shares with the operator alone, and its PodDisruptionBudget."""

import base64
import re

import yaml

from chart import NAMESPACE, RELEASE, ci, gateway_auth_volume, gateway_pod_spec, kinds, named, pod_specs, render, run, template_args


def test_gateway_service_shapes():
    """gateway: Service 443 -> 8443, LoadBalancer with externalTrafficPolicy Local by default; NodePort; ClusterIP"""
    docs = render()
    svc = named(docs, "Service", f"{RELEASE}-gateway")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local", f"default Service {svc['spec']}"
    port = [p for p in svc["spec"]["ports"] if p["name"] == "https"][0]
    assert port["port"] == 443 and port["protocol"] == "TCP", f"Service port {port}"
    container = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["containers"][0]
    target = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert target and target[0]["containerPort"] == 8443, f"targetPort {port['targetPort']} is not container port 8443"
    assert "--listen=0.0.0.0:8443" in container["args"], "gateway does not listen on 8443"
    svc = named(render(values_files=[ci("nodeport")]), "Service", f"{RELEASE}-gateway")
    assert svc["spec"]["type"] == "NodePort" and [p for p in svc["spec"]["ports"] if p["name"] == "https"][0].get("nodePort") == 30443, f"NodePort Service {svc['spec']}"
    svc = named(render(values_files=[ci("single-namespace")]), "Service", f"{RELEASE}-gateway")
    assert svc["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in svc["spec"], f"ClusterIP Service {svc['spec']}"
    svc = named(render(values_files=[ci("everything-on")]), "Service", f"{RELEASE}-gateway")
    assert svc["spec"].get("loadBalancerClass") == "example.com/lb" and svc["metadata"].get("annotations"), "loadBalancerClass/annotations not applied"


def test_gateway_tls_modes():
    """gateway TLS: self-signed into an emptyDir / an existing Secret / a cert-manager Certificate"""
    spec = gateway_pod_spec(render())
    args = spec["containers"][0]["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "--state-dir=/var/lib/taas" in args and not any(a.startswith("--tls-") for a in args), f"self-signed args {args}"
    mount = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/var/lib/taas"]
    assert mount and "emptyDir" in volumes[mount[0]["name"]], "no emptyDir at /var/lib/taas"
    routes = [v for v in spec["volumes"] if "configMap" in v]
    assert len(routes) == 1 and routes[0]["configMap"] == {"name": "taas-routes", "optional": True}, f"routes volume {routes}"
    assert "--routes-file=/etc/taas/routes/routes.yaml" in args, "no --routes-file"
    assert "--registrar=taas-registrar.localhost" in args and "--domain=taas.localhost" in args, f"names {args}"

    spec = gateway_pod_spec(render(values_files=[ci("nodeport")]))
    args = spec["containers"][0]["args"]
    assert "--tls-cert=/etc/taas/tls/tls.crt" in args and "--tls-key=/etc/taas/tls/tls.key" in args, f"Secret args {args}"
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v and v["name"] != "gateway-auth"]
    assert secrets == ["taas-gateway-tls"], f"TLS volume {secrets}"
    assert not any(a.startswith("--state-dir") for a in args), "state dir with a Secret"

    docs = render(values_files=[ci("everything-on")])
    cert = named(docs, "Certificate", f"{RELEASE}-gateway")
    assert cert["spec"]["dnsNames"] == ["taas-registrar.example.com", "*.taas.example.com"], f"dnsNames {cert['spec']['dnsNames']}"
    assert cert["spec"]["issuerRef"] == {"name": "letsencrypt-dns01", "kind": "ClusterIssuer", "group": "cert-manager.io"}, f"issuerRef {cert['spec']['issuerRef']}"
    spec = gateway_pod_spec(docs)
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v and v["name"] != "gateway-auth"]
    assert secrets == [cert["spec"]["secretName"]], f"gateway mounts {secrets}, the Certificate writes {cert['spec']['secretName']}"
    assert not kinds(render(values_files=[ci("nodeport")]), "Certificate"), "Certificate without certManager.enabled"


def test_gateway_auth_secret():
    """gateway auth: one random Secret, kept (resource policy), mounted into the gateway and the operator only, env TAAS_GATEWAY_SECRET_FILE"""
    docs = render()
    secrets = kinds(docs, "Secret")
    assert [s["metadata"]["name"] for s in secrets] == [f"{RELEASE}-gateway-auth"], f"Secrets {[s['metadata']['name'] for s in secrets]}"
    secret = secrets[0]
    assert secret["metadata"]["namespace"] == NAMESPACE, "gateway auth Secret outside the release namespace"
    assert secret["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep", "gateway auth Secret not kept"
    value = base64.b64decode(secret["data"]["secret"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", value), f"install secret is not 48 random letters and digits: {len(value)} characters"
    again = [d for d in yaml.safe_load_all(run(template_args()).stdout) if d and d.get("kind") == "Secret"][0]
    assert again["data"]["secret"] != secret["data"]["secret"], "two fresh renders gave the same install secret"
    for name in ("gateway", "operator"):
        spec = named(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        vol = gateway_auth_volume(spec)
        assert vol["secretName"] == f"{RELEASE}-gateway-auth" and vol["defaultMode"] == 0o440 and vol["items"] == [{"key": "secret", "path": "secret"}], f"{name}: volume {vol}"
        assert spec["securityContext"].get("fsGroup") == 65532, f"{name}: no fsGroup 65532, the 0440 file is unreadable"
        c = spec["containers"][0]
        mounts = [m for m in c["volumeMounts"] if m["name"] == "gateway-auth"]
        assert mounts == [{"name": "gateway-auth", "mountPath": "/etc/taas/gateway-auth", "readOnly": True}], f"{name}: mounts {mounts}"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env.get("TAAS_GATEWAY_SECRET_FILE") == "/etc/taas/gateway-auth/secret", f"{name}: env {env}"
        assert not any("gateway-secret" in a for a in c["args"]), f"{name}: the secret file as an argument (older binaries would refuse it)"
    # Nothing else mounts it.
    for name, spec in pod_specs(docs):
        if name not in (f"Deployment/{RELEASE}-gateway", f"Deployment/{RELEASE}-operator"):
            assert not any(v["name"] == "gateway-auth" for v in spec.get("volumes") or []), f"{name} mounts the gateway secret"
    # An existing Secret instead: none rendered, that one mounted.
    docs = render(sets=["gatewayAuth.existingSecret=vault-taas"])
    assert not kinds(docs, "Secret"), "a Secret rendered with gatewayAuth.existingSecret"
    for name in ("gateway", "operator"):
        spec = named(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        assert gateway_auth_volume(spec)["secretName"] == "vault-taas", f"{name} does not mount the existing Secret"


def test_pod_disruption_budget():
    """PodDisruptionBudget: policy/v1, selects the gateway pods"""
    docs = render(values_files=[ci("everything-on")], kube="1.30.0")
    pdb = named(docs, "PodDisruptionBudget", f"{RELEASE}-gateway")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"].get("minAvailable") == 1 and "maxUnavailable" not in pdb["spec"], f"PDB {pdb}"
    labels = named(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB selects no gateway pod"


def test_gateway_shutdown_delay_and_drain_timeout_reach_its_args_and_grace_period():
    spec = gateway_pod_spec(render())
    args = spec["containers"][0]["args"]
    assert "--shutdown-delay=10" in args and "--drain-timeout=30" in args, args
    assert spec["terminationGracePeriodSeconds"] == 45
    spec = gateway_pod_spec(render(sets=["gateway.shutdownDelay=3", "gateway.drainTimeout=7"]))
    args = spec["containers"][0]["args"]
    assert "--shutdown-delay=3" in args and "--drain-timeout=7" in args, args
    assert spec["terminationGracePeriodSeconds"] == 15
