"""What the lab prints: a progress line a second, the churn table (per step,
state exchange on and off) and a summary with every failure named."""
from __future__ import annotations

from collections import Counter

from pylb.report import table


def _mode(exchange: bool) -> str:
    return "on" if exchange else "off"


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items()))


def progress_line(exchange: bool, t: float, step: str, clients: list[dict],
                  lb_frames: dict[str, int], be_http: dict[str, int], dt: float) -> str:
    """One line of live progress: the clients' latest reports, the frames
    each balancer received and the HTTP answers per backend in the last dt."""
    conns = sum(c["established"] for c in clients)
    broken = sum(c["broken"] for c in clients)
    verified = sum(c["verified"] for c in clients)
    stall = max((c["longest_stall_now"] for c in clients), default=0.0)
    http = sum(be_http.values()) / dt if dt > 0 else 0.0
    failed = sum(c["http_failed"] for c in clients)
    return (f"[{_mode(exchange):>3}] {t:5.1f}s {step[:30]:<30} {conns:3d} open {broken:3d} broken "
            f"{verified / 1e6:6.1f} MB ok  stall {stall:3.1f}s  {http:3.0f} req/s {failed} failed"
            f" | lb {_shares(lb_frames)} | be {_shares(be_http)}")


# ---------------------------------------------------------------- per step

def step_rows(result) -> list[list]:
    """Per step: connections alive at its end, broken in it (by the start of
    the stall that ended them), the longest stall that began in it, HTTP."""
    rows = []
    windows = [(s, result.steps[i + 1].at if i + 1 < len(result.steps) else result.end)
               for i, s in enumerate(result.steps)]
    for step, until in windows:
        def begins_here(t: float) -> bool:
            return step.at <= t < until or (step is result.steps[0] and t < step.at)

        alive = sum(1 for c in result.connections
                    if c["established"] is not None and c["established"] < until
                    and not (c["broken"] and c["broken"]["at"] < until))
        broken = sum(1 for c in result.connections
                     if c["broken"] and begins_here(c["broken"]["since"]))
        stalls = [end - start for c in result.connections for start, end in c["stalls"]
                  if begins_here(start)]
        http = [r for r in result.http if begins_here(r[0])]
        ok = sum(1 for r in http if r[2])
        rows.append([_mode(result.exchange), step.key if len(step.key) == 1 else "-", step.label,
                     round(step.at - result.t0, 1), alive, broken,
                     round(max(stalls), 2) if stalls else f"< {result.plan.stall_note_s}",
                     ok, len(http) - ok])
    return rows


def churn_table(results) -> str:
    rows = [row for r in results for row in step_rows(r)]
    return table(["exchange", "", "step", "at (s)", "alive", "broken", "longest stall (s)",
                  "HTTP ok", "HTTP failed"], rows)


# ---------------------------------------------------------------- summary

def flow_facts(result, src: str, dst: str) -> str:
    """Where the cluster put a flow as it changed: its bucket, the table's
    backend and the bucket's owner/backup under each configuration."""
    from pylb import config as config_mod
    from pylb.dataplane import Dataplane
    from pylb.flow_id import FlowKey
    from pylb.ownership import Ownership

    if result.config_of is None:
        return ""
    try:
        key = FlowKey.parse(f"tcp {src} -> {dst}")
        parts, bucket = [], None
        for when, state in result.states:
            cfg = config_mod.parse(result.config_of(state), "lab configuration")
            dp = Dataplane(cfg, 1)
            try:
                c = dp.classify(key)
            finally:
                dp.close()
            bucket = c.bucket
            size = cfg.find_vip(c.vip).table_size
            owner, backup = Ownership(list(state.members), size).owners(c.bucket)
            parts.append(f"{when}: {c.current.name if c.current else '-'}, "
                         f"{owner}/{backup or '-'}")
        return f"bucket {bucket} (from step: table backend, owner/backup) " + "; ".join(parts)
    except Exception as exc:   # an explanation must never hide the failure itself
        return f"(no flow facts: {exc})"


def describe_failure(result, c: dict) -> str:
    b = c["broken"]
    step = result.step_of(b["since"])
    return (f"  {c['id']} {c['src']} -> {c['dst']} (backend {c['backend'] or '?'}): "
            f"{b['reason']}; no progress from {b['since'] - result.t0:.2f} s "
            f"(step {step.key}: {step.label}), given up at {b['at'] - result.t0:.2f} s\n"
            f"      {flow_facts(result, c['src'], c['dst'])}"
            + _seen(result, f"{c['src']} -> {c['dst']}"))


def describe_http_failure(result, r: list) -> str:
    step = result.step_of(r[0])
    vip = "[2001:db8:10::10]:80" if r[4] == 6 else "192.0.2.10:80"
    return (f"  HTTP {r[5]} -> {vip}: {r[3]}, started at {r[0] - result.t0:.2f} s "
            f"(step {step.key}: {step.label}), ended at {r[1] - result.t0:.2f} s\n"
            f"      {flow_facts(result, r[5], vip)}{_seen(result, f'{r[5]} -> {vip}')}")


def _seen(result, flow: str) -> str:
    """What the balancers held for a failed flow at the end of the run."""
    seen = result.seen.get(flow)
    return f"\n      at the end: {seen}" if seen else ""


def summary(result) -> str:
    """The mode's totals: bytes, connections, HTTP, shares, the balancers."""
    conns = result.connections
    verified = sum(c["verified"] for c in conns)
    closed = sum(1 for c in conns if c["closed"] is not None)
    broken = result.broken()
    over = result.over_bound()
    http_ok = [r for r in result.http if r[2]]
    duration = result.end - result.traffic_from
    step_a = next((s.at for s in result.steps if s.key == "a"), result.end)
    before = Counter(r[3] for r in http_ok if r[0] < step_a)
    after = Counter(r[3] for r in http_ok if r[0] >= step_a)
    echo_by_backend = Counter(c["backend"] for c in conns if c["backend"])
    failures = Counter(r[3] for r in result.http if not r[2])
    rows = [
        ["echo connections", len(conns)],
        ["  closed in order (every byte back, FIN from the backend)", closed],
        ["  broken", len(broken)],
        [f"  stalled longer than the bound ({result.plan.stall_bound_s} s), not broken",
         len(over)],
        ["  longest stall (s)", round(max((c["max_stall"] for c in conns), default=0.0), 2)],
        ["bytes sent and verified", f"{verified:,}"],
        ["HTTP requests answered", len(http_ok)],
        ["HTTP requests failed", len(result.http) - len(http_ok)],
        ["HTTP requests per second", round(len(result.http) / duration, 1) if duration else 0],
        ["echo connections per backend", _shares(dict(echo_by_backend))],
        ["HTTP answers per backend, before step a", _shares(dict(before))],
        ["HTTP answers per backend, from step a", _shares(dict(after))],
        ["frames per balancer (fabric port)", _shares(result.fabric)],
        ["balancers' exit", ", ".join(f"{n} " + _exit(n, b, result)
                                      for n, b in sorted(result.balancers.items()))],
        ["seconds (connections open to all closed)", round(duration, 1)],
    ]
    out = [f"State exchange {_mode(result.exchange)}", table(["", ""], rows), "",
           balancer_table(result)]
    out += [drain_summary(result, d) for d in result.drains.values()]
    if failures:
        out.append("HTTP failures: " + ", ".join(f"{k} x{v}" for k, v in failures.most_common()))
        failed = [r for r in result.http if not r[2]]
        out += [describe_http_failure(result, r) for r in failed[:20]]
        if len(failed) > 20:
            out.append(f"  ... and {len(failed) - 20} more")
    if broken:
        # With the exchange off breakage is the expected baseline: a few show how.
        shown = 40 if result.exchange else 3
        out.append(f"Broken connections ({len(broken)}):")
        out += [describe_failure(result, c) for c in broken[:shown]]
        if len(broken) > shown:
            out.append(f"  ... and {len(broken) - shown} more")
    return "\n".join(out)


def _exit(name: str, b: dict, result) -> str:
    if b["killed"]:
        return "SIGKILL"
    drain = result.drains.get(name)
    if drain is not None and drain.ended is not None:
        return f"rc={b['rc']} (drained, by itself)"
    return f"rc={b['rc']}"


def drain_summary(result, d) -> str:
    """A balancer drain: what the operator's command said, what the
    balancer's admin API and log said, where the router sends now."""
    def at(t: float | None) -> str:
        return "-" if t is None else f"{t - result.t0:.2f} s"
    withdraw = d.withdraw or {}
    outcome = d.outcome or {}
    rows = [
        ["pylb drain --wait (in its namespace)", f"rc={d.cli_rc}: {d.cli_output or '-'}"],
        ["started / draining / exited at", f"{at(d.started)} / {at(d.draining_at)} / "
                                           f"{at(d.ended)} (rc={d.rc})"],
        ["admin API while draining", (d.admin or {}).get("state", "n/a")
         + f"; its cluster view: {', '.join(d.view) or 'n/a'}"],
        ["withdraw command", f"status {withdraw.get('status', 'not seen')}: "
                             f"{(withdraw.get('output') or '').strip() or '-'}"],
        ["its verdict (log)", f"{outcome.get('event', 'not seen')}"
                              + (f", quiet {outcome['quiet_s']} s" if "quiet_s" in outcome else "")],
        ["router ECMP set after", " ".join(d.router_after) or "-"],
    ]
    return f"Drain of {d.name}: " + ("clean" if d.clean else "NOT CLEAN") + "\n" \
        + table(["", ""], rows)


# What each balancer did, from its admin API just before it was stopped.
BALANCER_COLUMNS = [
    ("received", lambda st: st["stats"]["rx"]),
    ("forwarded by cache", lambda st: st["stats"]["fwd_cache_hit"]),
    ("decided in Python", lambda st: st["stats"]["fwd_verdict"]),
    ("held (moved)", lambda st: st["punts"].get("moved", 0)),
    ("requests sent", lambda st: _cluster(st, "requests_sent")),
    ("requests answered", lambda st: _cluster(st, "requests_answered")),
    ("from store", lambda st: _cluster(st, "decided_from_store")),
    ("handoff records", lambda st: _cluster(st, "handoff_records")),
    ("fallback", lambda st: _cluster(st, "fallback")),
    ("send failed", lambda st: _cluster(st, "send_failed")),
    ("dropped", lambda st: st["stats"]["drop_total"]),
]


def _cluster(st: dict, counter: str) -> int:
    return (st.get("cluster") or {}).get("counters", {}).get(counter, 0)


def balancer_table(result) -> str:
    rows = []
    for name, b in sorted(result.balancers.items()):
        st = b.get("status")
        if b["killed"]:
            rows.append([name, "killed"] + ["-"] * len(BALANCER_COLUMNS))
            continue
        if not st:
            rows.append([name, f"rc={b['rc']}"] + ["n/a"] * len(BALANCER_COLUMNS))
            continue
        cells = []
        for _, get in BALANCER_COLUMNS:
            try:
                cells.append(get(st))
            except (KeyError, TypeError):
                cells.append("n/a")
        rows.append([name, f"rc={b['rc']}"] + cells)
    return table(["balancer", "exit"] + [c for c, _ in BALANCER_COLUMNS], rows)
