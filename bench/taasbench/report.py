"""The markdown table of a run, from its raw records: medians with spreads, ratios to direct,
CPU per GB and per connection, and the targets met or missed."""

import statistics

from .config import CASES, TAAS_ONLY


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def mib(kib):
    return None if kib is None else kib / 1024


def report(raw, meta):
    cases = [r for r in raw if r["kind"] == "case"]
    L = []
    L.append(f"## TAAS benchmark, {meta['date']}")
    L.append("")
    L.append(f"- machine: `nproc` = {meta['nproc']}, {meta['cpu']}, kernel {meta['kernel']}; "
             f"load average at start {meta['load_start']}, at end {meta.get('load_end', '?')}")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- mode: {meta['mode']}: {meta['rounds']} interleaved rounds (A→Z, then Z→A), "
             f"{meta['duration']} s per run; median of the rounds, spread = min–max; "
             f"ratio = median / direct's median")
    L.append(f"- versions: {meta['versions']}")
    L.append(f"- raw output: `{meta['out_rel']}/` (raw.jsonl: every run)")
    L.append("")
    peers = meta["peers"]

    def vals(case, peer, key="value"):
        return [r.get(key) for r in cases if r["case"] == case and r["peer"] == peer
                and r.get(key) is not None]

    L.append("### Throughput, latency, connection rate")
    L.append("")
    L.append("| case | " + " | ".join(peers) + " |")
    L.append("|---|" + "---|" * len(peers))
    for case, _, title in CASES:
        if not any(r["case"] == case for r in cases):
            continue
        # The shared-port cases are TAAS's alone: compared with TAAS's own q.
        dm = med(vals(TAAS_ONLY[case], "taas")) if case in TAAS_ONLY else med(vals(case, "direct"))
        cells = []
        for p in peers:
            v = vals(case, p)
            m = med(v)
            if case in TAAS_ONLY and p != "taas":
                cells.append("–")
                continue
            if m is None:
                cells.append("failed")
                continue
            s = f"**{fmt(m)}** ({fmt(min(v))}–{fmt(max(v))})"
            if case in TAAS_ONLY and dm:
                s += f" ×{m / dm:.2f} of own q"
            elif p != "direct" and dm:
                s += f" ×{m / dm:.2f}"
            errs = sum((r.get("errors") or 0) for r in cases if r["case"] == case and r["peer"] == p)
            if errs:
                s += f" [{errs} err]"
            cells.append(s)
        L.append(f"| {title} | " + " | ".join(cells) + " |")
    # p99 and added latency
    if any(r["case"] == "lat" for r in cases):
        dm = med(vals("lat", "direct"))
        d99 = med(vals("lat", "direct", "p99_us"))
        row99, rowadd = [], []
        for p in peers:
            m99 = med(vals("lat", p, "p99_us"))
            m50 = med(vals("lat", p))
            row99.append(f"{fmt(m99)}" + (f" ×{m99 / d99:.2f}" if p != "direct" and m99 and d99 else ""))
            rowadd.append("0" if p == "direct" else (f"+{fmt(m50 - dm)}" if m50 and dm else "–"))
        L.append("| fresh connection p99 (µs) | " + " | ".join(row99) + " |")
        L.append("| added p50 latency vs direct (µs) | " + " | ".join(rowadd) + " |")
    L.append("")

    # CPU
    L.append("### CPU (relay-side process / client-side process), medians of the rounds")
    L.append("")
    L.append("| measure | " + " | ".join(p for p in peers if p != "direct") + " |")
    L.append("|---|" + "---|" * (len(peers) - 1))
    for case, label in (("bulk1", "CPU s per GB, 1 stream"), ("bulk1R", "CPU s per GB, 1 stream -R"),
                        ("bulk8", "CPU s per GB, 8 streams"),
                        ("stream", "CPU s per GB echoed, 1 stream both ways"),
                        ("stream_edge", "CPU s per GB echoed via the edge: gateway + label relay / agent (TAAS only)")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p and r.get("bytes")]
            cr = med([r["cpu_relay_s"] / (r["bytes"] / 1e9) for r in rs if r["cpu_relay_s"] is not None])
            ca = med([r["cpu_agent_s"] / (r["bytes"] / 1e9) for r in rs if r["cpu_agent_s"] is not None])
            row.append(f"{fmt(cr)} / {fmt(ca)}")
        L.append(f"| {label} | " + " | ".join(row) + " |")
    for case, label in (("rate", "CPU µs per connection (8 workers)"),
                        ("rate_shared", "CPU µs per connection via the shared port (8 workers; TAAS only)"),
                        ("rate_direct", "CPU µs per connection via the HTTPS port, direct label (8 workers; TAAS only)"),
                        ("rate_edge", "CPU µs per connection via the edge: gateway + label relay / agent (8 workers; TAAS only)"),
                        ("http_close", "CPU µs per connection (wrk Connection: close)"),
                        ("http_ka", "CPU µs per request (wrk keep-alive)")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p
                  and (r.get("conns") or r.get("requests"))]
            n = lambda r: r.get("conns") or r.get("requests")
            cr = med([r["cpu_relay_s"] * 1e6 / n(r) for r in rs if r["cpu_relay_s"] is not None])
            ca = med([r["cpu_agent_s"] * 1e6 / n(r) for r in rs if r["cpu_agent_s"] is not None])
            tot = None if cr is None else cr + (ca or 0)
            row.append(f"{fmt(cr)} / {fmt(ca)} (Σ {fmt(tot)})")
        L.append(f"| {label} | " + " | ".join(row) + " |")
    L.append("")

    # memory
    L.append("### Memory of the relay-side process (MiB; client-side in brackets)")
    L.append("")
    L.append("| measure | " + " | ".join(p for p in peers if p != "direct") + " |")
    L.append("|---|" + "---|" * (len(peers) - 1))
    idle = {r["peer"]: r for r in raw if r["kind"] == "rss_idle"}

    def idle_row(label, cell):
        cells = [cell(idle.get(p, {})) for p in peers if p != "direct"]
        L.append(f"| {label} | " + " | ".join(cells) + " |")

    idle_row("RSS idle, tunnels up",
             lambda r: f"{fmt(mib(r.get('relay_kib')))} ({fmt(mib(r.get('agent_kib')))})")
    idle_row("of which its own / mapped files (code, libraries: shared)",
             lambda r: f"{fmt(mib(r.get('relay_anon_kib')))} / {fmt(mib(r.get('relay_file_kib')))}")
    for case, label in (("bulk8", "peak RSS during iperf3 -P 8"), ("http_ka", "peak RSS during wrk keep-alive"),
                        ("http_close", "peak RSS during wrk Connection: close")):
        row = []
        for p in peers:
            if p == "direct":
                continue
            rs = [r for r in cases if r["case"] == case and r["peer"] == p]
            hr = [r["hwm_relay_kib"] for r in rs if r.get("hwm_relay_kib") is not None]
            ha = [r["hwm_agent_kib"] for r in rs if r.get("hwm_agent_kib") is not None]
            row.append(f"{fmt(mib(max(hr)) if hr else None)} ({fmt(mib(max(ha)) if ha else None)})")
        L.append(f"| {label} (max of rounds) | " + " | ".join(row) + " |")
    L.append("")
    L.append("socat: the listening parent only (each connection is a forked child, whose CPU "
             "is counted once reaped). TAAS client side: its three agents together; bore: its "
             "three `bore local` together.")
    L.append("")

    # TAAS-specific
    L.append("### TAAS-specific")
    L.append("")
    red = [r for r in raw if r["kind"] == "redirect"]
    if red:
        t = [r["value"] for r in red if r["who"] == "taas" and r.get("value")]
        n = [r["value"] for r in red if r["who"] == "nginx" and r.get("value")]
        if t and n:
            L.append(f"- 307 answers/s over TLS, keep-alive (wrk -t2 -c{meta['wrk_conns']}): TAAS "
                     f"**{fmt(med(t))}** ({fmt(min(t))}–{fmt(max(t))}), nginx `return 307` "
                     f"**{fmt(med(n))}** ({fmt(min(n))}–{fmt(max(n))}): ratio **{med(t) / med(n):.2f}**")
    reg = [r for r in raw if r["kind"] == "registrations"]
    if reg:
        v = [r["ok_per_sec"] for r in reg if r.get("ok_per_sec") is not None]
        cpu = [r["cpu_relay_s"] * 1e6 / r["requests"] for r in reg if r.get("requests")]
        st = {}
        for r in reg:
            for k, c in (r.get("statuses") or {}).items():
                st[k] = st.get(k, 0) + c
        if v:
            L.append(f"- registrations/s on one kept-alive TLS connection (200s only; nothing "
                     f"connects to p, --rendezvous-timeout 0.03): **{fmt(med(v))}** "
                     f"({fmt(min(v))}–{fmt(max(v))}); relay CPU {fmt(med(cpu))} µs per "
                     f"registration; statuses {st}")
    pk = [r for r in raw if r["kind"] == "parked"]
    for r in pk:
        L.append(f"- {r['target']:,} parked connections ({r['labels']} labels × ≤1000, "
                 f"{r['labels']} agents): reached {r['reached']:,} in "
                 f"{fmt(r['seconds'])} s (**{fmt(r['parked_per_sec'])} parked/s**, agents "
                 f"registering in parallel); relay RSS idle {fmt(mib(r['relay_idle_kib']))} MiB, "
                 f"with all parked **{fmt(mib(r['relay_rss_kib']))} MiB** (peak "
                 f"{fmt(mib(r['relay_hwm_kib']))} MiB); agents' RSS together "
                 f"{fmt(mib(r['agents_rss_kib']))} MiB; relay CPU while parking "
                 f"{fmt(r['relay_cpu_s'])} s, agents {fmt(r['agents_cpu_s'])} s")
    for r in [r for r in raw if r["kind"] == "label_cost"]:
        L.append(f"- one more label in a relay, {r['parked_per_label']} parked on it (1 label, "
                 f"then {r['labels']}): **{fmt(r['per_label_parked_kib'])} KiB** per label "
                 f"({fmt(r['per_label_kib'])} KiB provisioned, nothing parked); relay RSS "
                 f"{fmt(mib(r['relay_one_label_kib']))} → {fmt(mib(r['relay_full_kib']))} MiB")
    L.append("")

    # targets
    L.append("### Issue 6 targets")
    L.append("")
    L.append("| target | TAAS | reference | met |")
    L.append("|---|---|---|---|")

    def row(name, val, ref, ok):
        L.append(f"| {name} | {val} | {ref} | {'yes' if ok else ('**no**' if ok is False else '?')} |")

    def m(case, peer, key="value"):
        return med(vals(case, peer, key))

    if "taas" in peers:
        t, r_, s = m("bulk1", "taas"), m("bulk1", "rathole"), m("bulk1", "socat")
        if None not in (t, r_, s):
            row("bulk 1 stream ≥ 1.2× rathole", f"{fmt(t)} Gbit/s", f"1.2 × {fmt(r_)} = {fmt(1.2 * r_)}", t >= 1.2 * r_)
            row("bulk 1 stream ≥ socat", f"{fmt(t)} Gbit/s", f"{fmt(s)}", t >= s)
        t, r_ = m("rate", "taas"), m("rate", "rathole")
        if None not in (t, r_):
            row("connections/s ≥ rathole", f"{fmt(t)}", f"{fmt(r_)}", t >= r_)

        def cpc(peer):
            rs = [r for r in cases if r["case"] == "rate" and r["peer"] == peer and r.get("conns")]
            return med([((r["cpu_relay_s"] or 0) + (r["cpu_agent_s"] or 0)) * 1e6 / r["conns"] for r in rs])
        t, r_ = cpc("taas"), cpc("rathole")
        if None not in (t, r_):
            row("CPU per connection (relay + agent) ≤ rathole", f"{fmt(t)} µs", f"{fmt(r_)} µs", t <= r_)
        dm, t, r_ = m("lat", "direct"), m("lat", "taas"), m("lat", "rathole")
        if None not in (dm, t, r_):
            row("added p50 latency ≤ rathole", f"+{fmt(t - dm)} µs", f"+{fmt(r_ - dm)} µs", t - dm <= r_ - dm)
        ti = idle.get("taas", {}).get("relay_kib")
        if ti is not None:
            row("relay RSS idle ≤ 8 MiB (tunnels up: the run's labels, all parked)", f"{fmt(mib(ti))} MiB", "8 MiB", ti <= 8 * 1024)
        for case, nm in (("bulk8", "8-stream"), ("http_ka", "wrk keep-alive"), ("http_close", "wrk close")):
            h = [r["hwm_relay_kib"] for r in cases if r["case"] == case and r["peer"] == "taas"
                 and r.get("hwm_relay_kib") is not None]
            if h:
                row(f"relay RSS ≤ 16 MiB under {nm}", f"{fmt(mib(max(h)))} MiB", "16 MiB", max(h) <= 16 * 1024)
        for r in pk:
            row("relay RSS idle ≤ 8 MiB (labels provisioned, nothing parked)",
                f"{fmt(mib(r['relay_idle_kib']))} MiB", "8 MiB", r["relay_idle_kib"] <= 8 * 1024)
        t, e = m("rate", "taas"), m("rate_edge", "taas")
        if None not in (t, e):
            row("connections/s through the edge ≥ 0.85 × own q (issue 18)", f"{fmt(e)}",
                f"0.85 × {fmt(t)} = {fmt(0.85 * t)}", e >= 0.85 * t)
        t, e = m("stream", "taas"), m("stream_edge", "taas")
        if None not in (t, e):
            row("one stream through the edge ≥ 0.9 × own q (issue 18)", f"{fmt(e)} Gbit/s",
                f"0.9 × {fmt(t)} = {fmt(0.9 * t)}", e >= 0.9 * t)
        for r in [r for r in raw if r["kind"] == "label_cost"]:
            row(f"one more label with {r['parked_per_label']} parked ≤ 64 KiB (issue 18)",
                f"{fmt(r['per_label_parked_kib'])} KiB", "64 KiB", r["per_label_parked_kib"] <= 64)
        for r in pk:
            row(f"{r['target']:,} parked ≤ 64 MiB" if r["target"] >= 10000 else
                f"{r['target']:,} parked (short mode; target is 10,000 ≤ 64 MiB)",
                f"{fmt(mib(r['relay_rss_kib']))} MiB", "64 MiB",
                (r["relay_rss_kib"] <= 64 * 1024 and r["reached"] >= r["target"]) if r["target"] >= 10000 else None)
        if red:
            t = med([r["value"] for r in red if r["who"] == "taas" and r.get("value")])
            n = med([r["value"] for r in red if r["who"] == "nginx" and r.get("value")])
            if t and n:
                row("307/s ≥ 0.8× nginx", f"{fmt(t)}/s", f"0.8 × {fmt(n)} = {fmt(0.8 * n)}", t >= 0.8 * n)
    L.append("")
    return "\n".join(L)
