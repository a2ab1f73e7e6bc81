"""Human-readable summaries of what a balancer did."""
from __future__ import annotations

from collections import defaultdict

from pylb.stats import Stats


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    def line(values, raw):
        out = []
        for i, v in enumerate(values):
            right = raw is not None and isinstance(raw[i], (int, float))
            out.append(v.rjust(widths[i]) if right else v.ljust(widths[i]))
        return "  ".join(out).rstrip()
    lines = [line(headers, None), line(["-" * w for w in widths], None)]
    lines += [line(c, r) for c, r in zip(cells, rows)]
    return "\n".join(lines)


def summary(stats: Stats, backend_counts, punts: dict[str, int] | None = None,
            port=None, workers=None) -> str:
    """Per-VIP and per-backend counts, outcomes and drops by reason; with
    several worker processes, what each received and handed to another."""
    per_vip = defaultdict(lambda: [0, 0])
    for c in backend_counts:
        per_vip[c.vip][0] += c.packets
        per_vip[c.vip][1] += c.bytes
    out = ["Per VIP", table(["vip", "packets", "bytes"],
                            [[v, p, b] for v, (p, b) in per_vip.items()])]
    rows = []
    for c in backend_counts:
        total = per_vip[c.vip][0]
        share = f"{100.0 * c.packets / total:.1f}%" if total else "-"
        rows.append([c.vip, c.backend, c.address, c.packets, share])
    out += ["", "Per backend", table(["vip", "backend", "address", "packets", "share"], rows)]
    outcomes = [["received", stats.rx], ["forwarded from the flow cache", stats.fwd_cache_hit],
                ["forwarded, new flow", stats.fwd_new], ["forwarded by the table", stats.fwd_table],
                ["forwarded, fragment", stats.fwd_fragment],
                ["forwarded after a decision in Python", stats.fwd_verdict],
                ["ARP / ND answered", stats.arp_replied + stats.nd_replied],
                ["neighbours learnt", stats.neigh_learned],
                ["to the kernel (exception TAP)", stats.exception_tap],
                ["dropped", stats.drop_total]]
    out += ["", "Outcomes", table(["outcome", "packets"], outcomes)]
    if stats.tap_to_wire or stats.health_steered or stats.health_steer_failed:
        out += ["", "From the kernel (exception TAP)",
                table(["outcome", "packets"], [["to the wire", stats.tap_to_wire],
                                               ["health checks to backends", stats.health_steered],
                                               ["health checks not sent",
                                                stats.health_steer_failed]])]
    drops = stats.drops()
    out += ["", "Drops by reason", table(["reason", "packets"], [[k, v] for k, v in drops.items()])
            if drops else "(none)"]
    if workers:
        out += ["", "Workers", table(
            ["worker", "core", "received", "from other workers", "to other workers",
             "forwarded", "dropped"],
            [[w, core if core is not None else "-", s.rx, s.lane_in, s.lane_out, s.forwarded,
              s.drop_total] for w, core, s in workers])]
    if punts:
        out += ["", "Handed to Python", table(["reason", "count"], [[k, v] for k, v in punts.items()])]
    if port is not None:
        out += ["", "Data port (the driver's own counters)",
                table(["counter", "packets"], [["received", port.ipackets],
                                               ["transmitted", port.opackets],
                                               ["transmit errors", port.oerrors],
                                               ["receive missed", port.imissed],
                                               ["receive errors", port.ierrors],
                                               ["no mbuf on receive", port.rx_nombuf]])]
    broken = stats.broken_equations()
    out += ["", "Counter equations: " + ("all hold" if not broken else "BROKEN: " + ", ".join(broken))]
    return "\n".join(out)


# ---------------------------------------------------------------- the admin API's answers


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d{s // 3600 % 24}h" if s >= 86400 else \
        f"{s // 3600}h{s // 60 % 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s"


def backends(rows: list[dict]) -> str:
    """`pylb backends`: one line per backend of the running configuration
    (backends a reload removed are listed while cached flows may use them)."""
    out = []
    for r in rows:
        state = r["health"] + (", drained" if r["drained"] else "")
        active = r["active_flows"]
        out.append([r["vip"], r["backend"], r["address"], r["weight"], r["effective_weight"],
                    state, r["buckets"], active if active is not None else "-", r["packets"],
                    r["bytes"]])
    return table(["vip", "backend", "address", "weight", "in use", "state", "buckets", "flows",
                  "packets", "bytes"], out)


def status(snap: dict) -> str:
    """`pylb status`: the balancer, its VIPs and backends, the cluster, workers, counters."""
    import time
    b = snap["balancer"]
    reloads = b["reloads"]
    lines = [f"balancer {b['name']}  up {_age(time.time() - b['started_at'])}  "
             f"generation {b['generation']}  device {b['device']} ({b['mac']})",
             f"config   {b['config_file'] or '-'}  reloads ok {reloads.get('ok', 0)}, "
             f"rejected {reloads.get('rejected', 0)}"]
    if b["last_reload_error"]:
        lines.append("last reload rejected: " + b["last_reload_error"].replace("\n", "\n  "))
    drain = snap.get("drain")
    if drain:
        lines.append(f"DRAINING: {drain['state']} ({drain.get('detail', '')})")
    lines += ["", "VIPs", table(
        ["vip", "address", "proto", "port", "encap", "buckets", "checks", "change in force"],
        [[v["name"], v["address"], v["protocol"], str(v["port"]), v["encap"], v["table_size"],
          v["health_check"] or "-", "yes" if v["moved_buckets_in_force"] else "no"]
         for v in snap["vips"]])]
    lines += ["", "Backends", backends([r for r in snap["backends"] if r["active"]])]
    c = snap.get("cluster")
    if c:
        lines += ["", f"Cluster (state exchange {'on' if c['state_exchange'] else 'off'}; "
                  f"this balancer: {c['me']}; state entries held: {c['state_entries']})"]
        shares = c.get("ownership", {})
        rows = []
        for name, address in sorted(c["members"].items()):
            row = [name + (" (me)" if name == c["me"] else ""), address]
            for size, per in sorted(shares.items()):
                row.append(f"{per[name]['owner']} / {per[name]['backup']} of {size}")
            rows.append(row)
        lines.append(table(["balancer", "address"] + [f"owner / backup ({s})" for s in
                                                        sorted(shares)], rows))
        if c["counters"]:
            lines += ["", table(["exchange", "count"], sorted(c["counters"].items()))]
    else:
        lines += ["", "Cluster: none (this balancer owns every bucket)"]
    lines += ["", "Workers", table(["worker", "core", "busy", "polls"],
                                    [[w["id"], str(w["core"]) if w["core"] is not None else "auto",
                                      f"{100 * w['busy_ratio']:.1f}%", w["polls"]]
                                     for w in snap["workers"]])]
    s = snap["stats"]
    counters = [["received", s["rx"]], ["forwarded", sum(s[k] for k in (
        "fwd_cache_hit", "fwd_new", "fwd_table", "fwd_fragment", "fwd_verdict"))],
        ["  from the flow cache", s["fwd_cache_hit"]], ["  new flows", s["fwd_new"]],
        ["  by the table", s["fwd_table"]], ["  after a decision in Python", s["fwd_verdict"]],
        ["to the owner (peer)", s["verdict_peer"]], ["dropped", s["drop_total"]],
        ["flows cached now", snap["active_flows"]]]
    lines += ["", "Counters", table(["counter", "packets"], counters)]
    if snap["drops"]:
        lines += ["", "Drops by reason",
                  table(["reason", "packets"], sorted(snap["drops"].items()))]
    return "\n".join(lines)


def flow(f: dict) -> str:
    """`pylb flows`: where one flow stands on a running balancer."""
    lines = [f"flow      {f['flow']}", f"flow id   {f['flow_id']}"]
    if f["vip"] is None:
        return "\n".join(lines + ["vip       none: not for a VIP of this balancer"])
    name = lambda r: f"{r['backend']} ({r['address']})" if r else "none"  # noqa: E731
    cached = f["cached_here"]
    lines += [f"vip       {f['vip']}",
              f"bucket    {f['bucket']}" + (" (moved)" if f["moved"] else ""),
              f"table     {name(f['table_backend'])}"]
    if f["previous_backend"] is not None:
        lines.append(f"previous  {name(f['previous_backend'])}")
    lines.append(f"cached    on {f['balancer']}: {name(cached)}, idle {cached['idle_ms']} ms"
                 if cached else f"cached    not on {f['balancer']}")
    if f["stored_here"]:
        lines.append(f"state     held here (owner/backup store): {f['stored_here']['address']}")
    lines += [f"owner     {f['owner']}", f"backup    {f['backup'] or 'none'}"]
    if cached:
        lines.append(f"backend   {name(cached)} (cached)")
    elif f["moved"]:
        lines.append(f"backend   decided by the owner: its state, else the previous table "
                     f"({name(f['previous_backend'])})")
    else:
        lines.append(f"backend   {name(f['table_backend'])} (by the table)")
    return "\n".join(lines)
