"""Cluster-change scenarios on a Testbed, with state exchange on and off:
what the exchange buys, measured. `pylb scenarios` prints the table; the tests
assert it (tests/test_scenarios.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pylb import testbed
from pylb.report import table

BACKENDS = [f"b-{i}" for i in range(1, 6)]


@dataclass
class Result:
    scenario: str
    exchange: bool
    flows: int
    broken: int            # flows whose packets reached more than one backend
    lost: int              # frames sent and never delivered
    duplicated: int        # frames delivered twice (a state request retried)
    state_entries: int     # flow states held in owners' stores at the end
    moved_flows: int       # flows in buckets whose backend changed (where state is needed)
    counters: dict = field(default_factory=dict)


def _start(tb: testbed.Testbed, flows) -> None:
    tb.send(flows, "S")
    tb.send(flows, "PA")


def moved_to_another_balancer(tb, flows):
    """Flows start on lb1; the router moves them to lb2. No backend change."""
    tb.set_router(["lb1"])
    _start(tb, flows)
    tb.set_router(["lb2"])
    tb.send(flows, "PA")
    tb.send(flows, "FA")


def backends_changed_then_moved(tb, flows):
    """Backends added and removed under established flows; then the router
    drops lb1 from ECMP and re-hashes every flow."""
    _start(tb, flows)
    tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
    tb.send(flows, "PA")
    tb.set_router(["lb2", "lb3"])
    tb.send(flows, "PA")
    tb.send(flows, "FA")


def two_changes_then_retired(tb, flows):
    """Two backend changes under the same established flows, the buckets
    retired wherever nobody needs state any more; then the router drops lb1
    and re-hashes every flow (docs/state-exchange.md, "Retirement")."""
    _start(tb, flows)
    tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
    tb.send(flows, "PA")
    tb.set_backends(["b-2", "b-3", "b-5", "b-6"])
    tb.send(flows, "PA")
    tb.settle()
    for _ in range(2):      # owners retire and announce (CLEAN, once a second), then the others
        for name in tb.alive:
            tb.lbs[name].retire_previous()
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            tb.step()
            time.sleep(0.01)
    tb.set_router(["lb2", "lb3"])
    tb.send(flows, "PA")
    tb.send(flows, "FA")


def owner_dies(tb, flows):
    """After a backend change, flows old and new; lb3 (owner of a third of
    the buckets) dies; its backups answer; then it leaves the configuration."""
    half = len(flows) // 2
    _start(tb, flows[:half])
    tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
    _start(tb, flows[half:])
    tb.kill("lb3")
    tb.send(flows, "PA")
    tb.remove_balancer("lb3")
    tb.send(flows, "PA")
    tb.send(flows, "FA")


def balancer_joins(tb, flows):
    """After a backend change, lb4 joins the cluster and the router; ownership
    hands off to it while flows go on."""
    _start(tb, flows)
    tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
    tb.send(flows, "PA")
    tb.add_balancer("lb4")
    tb.send(flows, "PA")
    tb.send(flows, "FA")


def all_at_once(tb, flows):
    """Backend change, a balancer dies, another joins, the router re-hashes."""
    half = len(flows) // 2
    _start(tb, flows[:half])
    tb.set_backends(["b-1", "b-3", "b-4", "b-5"])
    _start(tb, flows[half:])
    tb.kill("lb2")
    tb.add_balancer("lb4")
    tb.send(flows, "PA")
    tb.remove_balancer("lb2")
    tb.send(flows, "PA")
    tb.send(flows, "FA")


SCENARIOS = {
    "moved to another balancer": moved_to_another_balancer,
    "backends changed, then moved": backends_changed_then_moved,
    "two backend changes, retired, then moved": two_changes_then_retired,
    "owner dies, backup answers": owner_dies,
    "balancer joins, ownership hands off": balancer_joins,
    "all at once": all_at_once,
}
# Where consistent hashing alone keeps every flow, the exchange has nothing to add.
HASHING_ALONE_SUFFICES = {"moved to another balancer"}


def run(name: str, exchange: bool, n_flows: int = 2000, seed: int = 1,
        workers: dict[str, int] | None = None) -> Result:
    """workers: worker processes per balancer, e.g. {"lb1": 2} (lb1 is made first)."""
    flows = testbed.flows(n_flows, seed)
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4], state_exchange=exchange,
                         workers=workers) as tb:
        SCENARIOS[name](tb, flows)
        return Result(name, exchange, n_flows, tb.broken(flows), tb.lost(flows),
                      tb.duplicated(flows), tb.state_entries(), tb.moved_flows(flows),
                      tb.counters())


def run_all(n_flows: int = 2000, seed: int = 1, echo=print) -> list[Result]:
    results = []
    for name in SCENARIOS:
        for exchange in (True, False):
            results.append(run(name, exchange, n_flows, seed))
    rows = [[r.scenario, "on" if r.exchange else "off", r.flows, r.moved_flows, r.broken, r.lost,
             r.duplicated, r.state_entries] for r in results]
    echo(table(["scenario", "state exchange", "flows", "in moved buckets", "broken",
                "frames lost", "duplicated", "state entries"], rows))
    return results
