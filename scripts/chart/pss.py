"""Pod Security Standards "restricted" (and baseline) as the admission controller checks them, and
the chart's own hardening beyond it. Pure functions over a pod spec (a dict): the chart tests
apply them to rendered pods (test_pods.py), and e2e/check_pods.py to the pods an API server
stored, so both hold the same rules."""

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


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
