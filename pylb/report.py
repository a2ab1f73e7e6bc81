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
            port=None) -> str:
    """Per-VIP and per-backend counts, outcomes and drops by reason."""
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
    drops = stats.drops()
    out += ["", "Drops by reason", table(["reason", "packets"], [[k, v] for k, v in drops.items()])
            if drops else "(none)"]
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
