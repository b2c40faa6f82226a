#!/usr/bin/env python3
"""Checks running pods against Pod Security Standards "restricted", twice: the pod specs as the
API server stored them (the same rules as the chart tests, scripts/chart/pss.py), and the
container processes as the kernel runs them (read from /proc on the node): not root, no
capabilities, no_new_privs, a seccomp filter, a read-only root filesystem.

    kubectl get pods -n NS -l SELECTOR -o json | check_pods.py CONTAINERD_SOCKET

Prints one line per container and exits non-zero on any problem (Kubernetes 1.20 has no
Pod Security admission, so nothing else would notice).
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "chart"))
from pss import hardening_problems, restricted_problems  # noqa: E402


def task_pids(socket):
    out = subprocess.run(["ctr", "--address", socket, "-n", "k8s.io", "tasks", "ls"],
                         capture_output=True, text=True, check=True).stdout
    pids = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "RUNNING":
            pids[parts[0]] = int(parts[1])
    return pids


def process_problems(pid):
    problems = []
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    uid = status.get("Uid", ["0"])[1]  # effective
    if uid == "0":
        problems.append("runs as root")
    for cap in ("CapEff", "CapPrm", "CapBnd"):
        if int(status.get(cap, ["1"])[0], 16) != 0:
            problems.append(f"{cap} is {status.get(cap)[0]}, not empty")
    if status.get("NoNewPrivs", ["0"])[0] != "1":
        problems.append("no_new_privs is not set")
    if status.get("Seccomp", ["0"])[0] != "2":
        problems.append(f"seccomp mode {status.get('Seccomp', ['?'])[0]}, not a filter (2)")
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                if "ro" not in fields[5].split(","):
                    problems.append(f"root filesystem mounted {fields[5]}")
                break
    return problems, uid


def main():
    socket = sys.argv[1]
    pods = json.load(sys.stdin)["items"]
    if not pods:
        sys.exit("check_pods: no pods")
    pids = task_pids(socket)
    failed = False
    for pod in pods:
        name = pod["metadata"]["name"]
        problems = restricted_problems(pod["spec"]) + hardening_problems(pod["spec"])
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            cid = (cs.get("containerID") or "").removeprefix("containerd://")
            pid = pids.get(cid)
            if pid is None:
                problems.append(f"container {cs['name']} has no running process")
                continue
            proc_problems, uid = process_problems(pid)
            problems += [f"container {cs['name']} (pid {pid}): {p}" for p in proc_problems]
            if not proc_problems:
                print(f"check_pods: {name}/{cs['name']}: pid {pid}, uid {uid}, no capabilities, "
                      "no_new_privs, seccomp filter, read-only root")
        for p in problems:
            print(f"check_pods: {name}: {p}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
