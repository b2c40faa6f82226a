#!/usr/bin/env python3
"""The small services a one-node cluster without a cloud needs, for e2e/cluster.sh.

Every second, from the API server (admin token, read from a file so it never shows in `ps`):
- cluster DNS: writes DIR/dns/services, a hosts file dnsmasq re-reads (--hostsdir): each
  Service's ClusterIP as NAME.NAMESPACE.svc.cluster.local, or, for a headless Service, the
  addresses of its ready endpoints;
- load balancer: gives each LoadBalancer Service without an address the node's address
  (status.loadBalancer.ingress), as a cloud's controller or k3s's ServiceLB would; kube-proxy
  then routes NODE_IP:port to it. A Service whose ports clash with another's keeps waiting,
  like a real load balancer out of addresses;
- memory: the peak of the cluster's cgroup (every process and pod) and of the summed RSS of
  its processes, into DIR/run/memory.json.
"""

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request


def api(args, ctx, token, method, path, body=None, content_type="application/json"):
    req = urllib.request.Request(args.server + path, method=method)
    req.add_header("Authorization", "Bearer " + token)
    req.add_header("Accept", "application/json")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, data=data, context=ctx, timeout=5) as resp:
        return json.load(resp)


def write_if_changed(path, text):
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    # A dot file: dnsmasq's --hostsdir skips those, so it never reads a half-written one.
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def dns_records(services, endpoints):
    ready = {}
    for ep in endpoints:
        key = (ep["metadata"]["namespace"], ep["metadata"]["name"])
        addrs = []
        for subset in ep.get("subsets") or []:
            addrs += [a["ip"] for a in subset.get("addresses") or []]
        ready[key] = addrs
    lines = []
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        cluster_ip = svc["spec"].get("clusterIP")
        ips = ready.get((ns, name), []) if cluster_ip in (None, "", "None") else [cluster_ip]
        for ip in sorted(set(ips)):
            lines.append(f"{ip} {name}.{ns}.svc.cluster.local")
    return "".join(line + "\n" for line in sorted(lines))


def assign_load_balancers(args, ctx, token, services):
    taken = set()
    waiting = []
    for svc in services:
        if svc["spec"].get("type") != "LoadBalancer":
            continue
        ports = {(p.get("protocol", "TCP"), p["port"]) for p in svc["spec"].get("ports") or []}
        if (svc.get("status", {}).get("loadBalancer") or {}).get("ingress"):
            taken |= ports
        else:
            waiting.append((svc, ports))
    for svc, ports in sorted(waiting, key=lambda w: w[0]["metadata"].get("creationTimestamp", "")):
        name = f'{svc["metadata"]["namespace"]}/{svc["metadata"]["name"]}'
        if ports & taken:
            continue
        path = f'/api/v1/namespaces/{svc["metadata"]["namespace"]}/services/{svc["metadata"]["name"]}/status'
        patch = {"status": {"loadBalancer": {"ingress": [{"ip": args.node_ip}]}}}
        try:
            api(args, ctx, token, "PATCH", path, patch, "application/merge-patch+json")
            taken |= ports
            print(f"node-services: LoadBalancer {name} -> {args.node_ip}", flush=True)
        except urllib.error.URLError as e:
            print(f"node-services: could not patch {name}: {e}", flush=True)


class Memory:
    def __init__(self, args):
        self.cgroup = args.cgroup
        self.out = os.path.join(args.dir, "run", "memory.json")
        self.peak_rss = 0
        self.peak_rss_at = None

    def cgroup_pids(self):
        pids = set()
        for root, _dirs, files in os.walk(self.cgroup):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids |= {int(x) for x in f.read().split()}
                except OSError:
                    pass
        return pids

    def sample(self):
        if not self.cgroup:
            return
        rss = 0
        for pid in self.cgroup_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
                            break
            except OSError:
                pass
        if rss > self.peak_rss:
            self.peak_rss, self.peak_rss_at = rss, time.strftime("%H:%M:%S")
        record = {"peak_rss_bytes": self.peak_rss, "peak_rss_at": self.peak_rss_at, "rss_bytes": rss}
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            try:
                with open(os.path.join(self.cgroup, name)) as f:
                    record["cgroup_peak_bytes"] = int(f.read().strip())
                    record["cgroup_peak_source"] = name
                break
            except (OSError, ValueError):
                continue
        write_if_changed(self.out, json.dumps(record) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--node-ip", required=True)
    ap.add_argument("--cgroup", default="")
    args = ap.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    memory = Memory(args)
    hosts = os.path.join(args.dir, "dns", "services")
    while True:
        memory.sample()
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
            services = api(args, ctx, token, "GET", "/api/v1/services")["items"]
            endpoints = api(args, ctx, token, "GET", "/api/v1/endpoints")["items"]
            write_if_changed(hosts, dns_records(services, endpoints))
            assign_load_balancers(args, ctx, token, services)
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            print(f"node-services: {e}", file=sys.stderr, flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
