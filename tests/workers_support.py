"""Runs testbed work with balancers of several worker processes, in a process
of its own: the test process's EAL runs --in-memory, and worker processes
need one started for several (pylb/lanes.py). Prints one JSON line.

    python tests/workers_support.py scenarios N_FLOWS PREFIX
    python tests/workers_support.py lanes N_FLOWS PREFIX
    python tests/workers_support.py retire N_FLOWS PREFIX
    python tests/workers_support.py join N_FLOWS PREFIX
    python tests/workers_support.py kill SIGKILL|SIGSTOP PREFIX
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from pylb import logs, scenarios, testbed, traffic
from pylb.eal import Eal, eal_args
from pylb.errors import PylbError

WORKERS = {"lb1": 2}
STRAY = 50


def run_scenarios(n_flows: int) -> dict:
    out = {}
    for name in scenarios.SCENARIOS:
        for exchange in (True, False):
            r = scenarios.run(name, exchange, n_flows, seed=5, workers=WORKERS)
            out[f"{name}|{exchange}"] = {k: v for k, v in dataclasses.asdict(r).items()
                                         if k != "counters"}
    return out


def lane_reports(lb) -> list[dict]:
    asked = time.monotonic()
    while (answers := lb.lanes.reports_since(asked)) is None:
        lb.lanes.poll()
        time.sleep(0.001)
    return answers


def run_lanes(n_flows: int) -> dict:
    """A backend change, then the router moves every flow to lb1 (2 workers),
    which asks owners for them: what each of lb1's workers did."""
    flows = testbed.flows(n_flows, 7)
    with testbed.Testbed(["lb1", "lb2", "lb3"], scenarios.BACKENDS[:4], workers=WORKERS) as tb:
        tb.set_router(["lb2", "lb3"])
        tb.send(flows, "S")
        tb.send(flows, "PA")
        tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
        tb.send(flows[: n_flows // 2], "PA")
        tb.set_router(["lb1"])
        tb.send(flows, "PA")
        new = testbed.flows(n_flows, 8)
        tb.send(new, "S")          # new flows in moved buckets: notices, pushes
        tb.send(new, "PA")
        tb.send(flows, "FA")
        # Traffic for no VIP, spread over both queues: worker 0's to decide.
        stray = [traffic.Flow("none", 6, "198.51.100.7", 1000 + i, "192.0.2.99", 80)
                 for i in range(STRAY)]
        for f in stray:
            tb._inject("lb1", f.frames(tb.lbs["lb1"].port.mac, testbed.CLIENT_MAC, ["S"]))
        tb.settle()
        lb = tb.lbs["lb1"]
        reports = lane_reports(lb)
        out = {"stray": STRAY, "broken": tb.broken(flows) + tb.broken(new),
               "lost": tb.lost(flows) + tb.lost(new),
               "worker0": dataclasses.asdict(lb.worker.stats()),
               "workers": [r["stats"] for r in reports],
               "cluster0": dict(lb.cluster.counters),
               "peer0": lb.cluster.peer_stats.as_dict(),
               "clusters": [r["cluster"] for r in reports],
               "equations": lb.stats().broken_equations(),
               "total": dataclasses.asdict(lb.stats()),
               "snapshot_punts": lb.snapshot()["punts"],
               "snapshot_workers": lb.snapshot()["workers"]}
        out["retired_at_once"] = lb.retire_previous()
        return out


def run_retire(n_flows: int) -> dict:
    """A backend change under established flows, then retirement: worker 0
    asks its workers which buckets still hold old flows, retires the others,
    and every worker follows with the same tables."""
    flows = testbed.flows(n_flows, 9)
    with testbed.Testbed(["lb1", "lb2", "lb3"], scenarios.BACKENDS[:4], workers=WORKERS) as tb:
        tb.send(flows, "S")
        tb.send(flows, "PA")
        tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
        tb.send(flows, "PA")
        lb = tb.lbs["lb1"]
        before = lb.stateful_buckets()
        retired, deadline = 0, time.monotonic() + 20
        while time.monotonic() < deadline:
            for name in tb.alive:       # CLEANs go out once a second
                n = tb.lbs[name].retire_previous()
                retired += n if name == "lb1" else 0
            tb.step()
            if retired and lb.stateful_buckets() < before and not lb.lanes_busy(time.monotonic()):
                break
            time.sleep(0.01)
        tb.set_router(["lb1"])
        tb.send(flows, "PA")
        tb.send(flows, "FA")
        reports = lane_reports(lb)
        return {"before": before, "after": lb.stateful_buckets(), "retired": retired,
                "workers_after": [r["stateful_buckets"] for r in reports],
                "generation": lb.generation, "workers_generation": [r["generation"] for r in reports],
                "broken": tb.broken(flows), "lost": tb.lost(flows)}


def run_join(n_flows: int) -> dict:
    """After a backend change, lb4 joins with two workers and no previous
    configuration: its worker 0 learns the tables in force from the members
    and hands them to the other worker; then the router sends every flow to lb4."""
    flows = testbed.flows(n_flows, 13)
    with testbed.Testbed(["lb1", "lb2", "lb3"], scenarios.BACKENDS[:4],
                         workers={"lb4": 2}) as tb:
        tb.send(flows, "S")
        tb.send(flows, "PA")
        tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
        tb.send(flows, "PA")
        tb.add_balancer("lb4", join_router=False)
        tb.settle()
        lb = tb.lbs["lb4"]
        tb.set_router(["lb4"])
        tb.send(flows, "PA")
        tb.send(flows, "FA")
        reports = lane_reports(lb)
        return {"broken": tb.broken(flows), "lost": tb.lost(flows),
                "moved": tb.moved_flows(flows), "stateful": lb.stateful_buckets(),
                "workers_stateful": [r["stateful_buckets"] for r in reports],
                "members_stateful": tb.lbs["lb1"].stateful_buckets(),
                "history": {k: v for k, v in tb._cluster_totals("lb4")["counters"].items()
                            if k.startswith("history")}}


def run_kill(how: str) -> dict:
    """A worker process dies (SIGKILL) or hangs (SIGSTOP): worker 0's loop
    stops with the reason."""
    with testbed.Testbed(["lb1"], scenarios.BACKENDS[:2], workers=WORKERS) as tb:
        lb = tb.lbs["lb1"]
        pid = lb.snapshot()["workers"][1]["pid"]
        os.kill(pid, getattr(signal, how))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                lb.step()
            except PylbError as exc:
                if how == "SIGSTOP":
                    os.kill(pid, signal.SIGCONT)     # so that it can be stopped
                return {"stopped": str(exc), "pid": pid}
            time.sleep(0.01)
        return {"stopped": None, "pid": pid}


def main() -> None:
    what = sys.argv[1]
    prefix = sys.argv[-1]
    logs.setup("console", "warning")     # stderr: stdout is the result
    with Eal(eal_args(file_prefix=prefix)):
        if what == "scenarios":
            result = run_scenarios(int(sys.argv[2]))
        elif what == "lanes":
            result = run_lanes(int(sys.argv[2]))
        elif what == "join":
            result = run_join(int(sys.argv[2]))
        elif what == "retire":
            result = run_retire(int(sys.argv[2]))
        else:
            result = run_kill(sys.argv[2])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
