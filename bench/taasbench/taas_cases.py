"""TAAS-only measurements after the rounds: 307 answers/s against nginx `return 307`,
registrations/s on one kept-alive TLS connection, and the memory and time of many parked
connections. Each starts its own relay where it needs one."""

import json
import os
import time

from . import config
from .procs import cpu_seconds, log, reset_peak, run, status_kib, until, wait_listening


class TaasCases:
    """Mixed into `Bench` (needs `Peers` and `Load`)."""

    def redirects(self):
        """307 answers/s over TLS, keep-alive: the relay's front end vs nginx `return 307`."""
        relay = self.roles["taas"]["relay"][0]
        for url, host in ((f"https://127.0.0.1:{self.P['taas_listen']}/", "demo.taas.localhost"),
                          (f"https://127.0.0.1:{self.P['nginx307']}/", "demo.taas.localhost")):
            rc, out, _ = run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                              f"Host: {host}", url], 15)
            if out != "307":
                raise RuntimeError(f"{url} with Host {host}: {out}, not 307")
        log("case 307/s")
        for rnd in range(1, self.args.rounds + 1):
            seq = ["taas", "nginx"] if rnd % 2 else ["nginx", "taas"]
            for who in seq:
                if who == "taas":
                    until("TAAS agents parked", self.taas_refilled, 30, 0.1)
                    pid = relay.pid
                    url = f"https://127.0.0.1:{self.P['taas_listen']}/"
                else:
                    pid = None
                    url = f"https://127.0.0.1:{self.P['nginx307']}/"
                c0 = cpu_seconds(pid) if pid else None
                if pid:
                    reset_peak(pid)
                r = self.wrk(url, [], host="demo.taas.localhost")
                c1 = cpu_seconds(pid) if pid else None
                self.record(kind="redirect", who=who, round=rnd,
                            cpu_relay_s=round(c1 - c0, 3) if pid else None,
                            hwm_relay_kib=status_kib(pid, "VmHWM") if pid else None, **r)
                log(f"  307/s {who:6s} round {rnd}: {r.get('value')}")
                time.sleep(self.args.settle)

    def registrations(self):
        """Registrations/s on one kept-alive TLS connection (nothing connects to p)."""
        d = os.path.join(self.work, "taas-reg")
        listen = self.P["reg_listen"]
        _, state, creds = self.taas_labels(d, listen, ["reg"], 1024)
        relay = self.start_taas_relay("taas-relay-reg", d, listen, self.P["reg_metrics"],
                                      self.p_ports_big, self.q_ports_big,
                                      ["--rendezvous-timeout", "0.03"])
        wait_listening(listen)
        time.sleep(0.5)
        c = creds["reg"]
        log("case registrations/s")
        for rnd in range(1, self.args.rounds + 1):
            c0 = cpu_seconds(relay.pid)
            rc, out, err = run([os.path.join(config.BT, "regbench"), f"127.0.0.1:{listen}",
                                f"taas-registrar.localhost:{listen}",
                                os.path.join(state, "relay-cert.pem"), c["id"], c["secret"], "reg",
                                str(self.args.duration), "10000000"], self.args.duration + 40)
            c1 = cpu_seconds(relay.pid)
            try:
                j = json.loads(out)
            except ValueError:
                j = {"error": f"rc {rc}: {err.strip()[:300]}"}
            self.record(kind="registrations", round=rnd, cpu_relay_s=round(c1 - c0, 3),
                        hwm_relay_kib=status_kib(relay.pid, "VmHWM"), **j)
            log(f"  reg/s round {rnd}: {j.get('ok_per_sec')} statuses {j.get('statuses')} {j.get('error', '')}")
            time.sleep(1.0)  # reserved p ports expire (0.1 s)
        self.procs.check(relay)
        self.procs.stop(relay)

    def parked_10k(self):
        """RSS of a relay holding N parked connections (labels × maxParked), and how fast the
        agents get there."""
        total = self.args.parked_total
        per = 1000
        n_labels = (total + per - 1) // per
        d = os.path.join(self.work, "taas-park")
        listen = self.P["park_listen"]
        names = [f"park{i}" for i in range(n_labels)]
        _, state, creds = self.taas_labels(d, listen, names, per)
        relay = self.start_taas_relay("taas-relay-park", d, listen, self.P["park_metrics"],
                                      self.p_ports_big, self.q_ports_big)
        wait_listening(listen)
        time.sleep(1.5)
        idle = status_kib(relay.pid, "VmRSS")
        log(f"case {total} parked: relay idle {idle} KiB with {n_labels} labels")
        agents = []
        t0 = time.time()
        c0 = cpu_seconds(relay.pid)
        for i, name in enumerate(names):
            n = min(per, total - i * per)
            agents.append(self.start_taas_agent(f"taas-agent-{name}", listen, creds[name]["file"],
                                                state, self.P["backend"]["echo"], n))
        reached, samples, peak_rss = None, [], 0
        deadline = t0 + self.args.park_timeout
        count = 0
        while time.time() < deadline:
            try:
                count = sum(self.taas_parked(self.P["park_metrics"]).values())
            except OSError:
                count = 0
            rss = status_kib(relay.pid, "VmRSS")
            peak_rss = max(peak_rss, rss)
            samples.append((round(time.time() - t0, 2), count, rss))
            if count >= total:
                reached = time.time() - t0
                break
            time.sleep(0.2)
        c1 = cpu_seconds(relay.pid)
        agent_cpu = sum(cpu_seconds(a.pid) for a in agents)
        time.sleep(2.0)  # settle
        rec = dict(kind="parked", target=total, labels=n_labels, reached=count,
                   seconds=round(reached, 3) if reached else None,
                   parked_per_sec=round(total / reached, 1) if reached else None,
                   relay_idle_kib=idle, relay_rss_kib=status_kib(relay.pid, "VmRSS"),
                   relay_hwm_kib=status_kib(relay.pid, "VmHWM"), relay_peak_sampled_kib=peak_rss,
                   relay_cpu_s=round(c1 - c0, 3), agents_cpu_s=round(agent_cpu, 3),
                   agents_rss_kib=sum(status_kib(a.pid, "VmRSS") for a in agents),
                   relay_fds=len(os.listdir(f"/proc/{relay.pid}/fd")), samples=samples)
        self.record(**rec)
        log(f"  parked {count}/{total} in {rec['seconds']} s; relay RSS {rec['relay_rss_kib']} KiB")
        for a in agents:
            self.procs.stop(a)
        self.procs.stop(relay)

    def label_cost(self, n_labels=64, per=8):
        """Memory of one more label in one relay (issue 18): the relay's RSS with one label and
        its agent (`--parked 8`), then with `n_labels` labels provisioned (files added to the
        watched directory, nothing parked on the new ones), then with an agent each, 8 parked
        per label. The cost of a label is the growth divided by the labels added."""
        d = os.path.join(self.work, "taas-labels")
        listen = self.P["park_listen"]
        names = [f"cost{i}" for i in range(n_labels)]
        _, state, creds = self.taas_labels(d, listen, names[:1], per)
        relay = self.start_taas_relay("taas-relay-labels", d, listen, self.P["park_metrics"],
                                      self.p_ports_big, self.q_ports_big)
        wait_listening(listen)
        log(f"case label cost: 1 label, then {n_labels}, {per} parked each")
        agents = []

        def parked():
            try:
                return self.taas_parked(self.P["park_metrics"])
            except OSError:
                return {}

        def settle():
            time.sleep(2.0)
            return status_kib(relay.pid, "VmRSS")

        agents.append(self.start_taas_agent("taas-agent-cost0", listen, creds[names[0]]["file"],
                                            state, self.P["backend"]["echo"], per))
        until("one label parked", lambda: parked().get(names[0], 0) >= per, 60, 0.2)
        one = settle()
        _, _, more = self.taas_labels(d, listen, names[1:], per)
        creds.update(more)
        until(f"{n_labels} labels loaded", lambda: len(parked()) >= n_labels, 60, 0.2)
        provisioned = settle()
        for name in names[1:]:
            agents.append(self.start_taas_agent(f"taas-agent-{name}", listen, creds[name]["file"],
                                                state, self.P["backend"]["echo"], per))
        until(f"{per} parked on each of {n_labels} labels",
              lambda: sum(min(v, per) for v in parked().values()) >= n_labels * per, 120, 0.2)
        full = settle()
        added = n_labels - 1
        rec = dict(kind="label_cost", labels=n_labels, parked_per_label=per,
                   relay_one_label_kib=one, relay_provisioned_kib=provisioned,
                   relay_full_kib=full,
                   per_label_kib=round((provisioned - one) / added, 1),
                   per_label_parked_kib=round((full - one) / added, 1),
                   relay_fds=len(os.listdir(f"/proc/{relay.pid}/fd")))
        self.record(**rec)
        log(f"  one label {one} KiB; {n_labels} provisioned {provisioned} KiB; "
            f"{per} parked each {full} KiB: {rec['per_label_parked_kib']} KiB per label")
        for a in agents:
            self.procs.stop(a)
        self.procs.stop(relay)
