"""An owner without a flow's state asks the other balancers who carries it
before rule 4 (pylb/carriers.py; docs/state-exchange.md, "The miss path").

The race it closes: a new flow starts at lb1 in a moved bucket; lb1 caches it
and will push its state, batched, to the owner. If lb1 is kept off its CPU
(or its pushes are lost) while the router sends the flow's next packets to
lb3, the owner's wait runs out and rule 4 (the previous table) sends a new
connection to the old backend, which resets it. Asked, lb1 answers from its
flow cache once it runs again."""
from __future__ import annotations

import time

import pytest

from pylb import testbed
from pylb.metrics import SnapshotCollector
from pylb.peer import MessageType

pytestmark = pytest.mark.dpdk

BACKENDS = [f"b-{i}" for i in range(1, 6)]
OLD_DEFAULT_WAIT_S = 0.020       # decision_delay_ms before the owner asked anyone


def _after_a_backend_change(tb: testbed.Testbed) -> None:
    tb.set_backends(BACKENDS[1:])
    while any(lb.cluster._export_cursor is not None for lb in tb.lbs.values()):
        tb.step()     # the scans after the change end (they flush pushes as they go)


def _moved_flows(tb: testbed.Testbed, n: int, seed: int, holders_exclude: str) -> list:
    """Flows of moved buckets that holders_exclude does not hold."""
    lb = tb.lbs[next(iter(tb.alive))]
    out = []
    for f in testbed.flows(n, seed=seed):
        c = lb.dataplane.classify(f.key())
        if c.moved and holders_exclude not in lb.cluster.holders(lb.cluster._table_size(c.vip),
                                                                 c.bucket):
            out.append(f)
    assert len(out) > 20
    return out


def _owner_counters(tb: testbed.Testbed, *names: str) -> dict:
    return {k: sum(tb.lbs[n].cluster.counters[k] for n in names)
            for k in ("carrier_state_adopted", "carrier_decided_all_not_here",
                      "carrier_decided_at_bound", "decided_by_previous_table")}


def _asked(tb: testbed.Testbed, owners: tuple[str, ...]) -> int:
    """Flows the owners have begun to wait on."""
    return sum(tb.lbs[n].cluster.counters["decisions_delayed"] for n in owners)


@pytest.mark.parametrize("syn_balancer", ["stalled", "pushes-lost"])
def test_a_new_flow_keeps_its_backend_when_its_push_is_late(eal, syn_balancer):
    """stalled: lb1 does not run for three times the wait an owner had
    before it asked (20 ms), with the default settings. pushes-lost: lb1
    runs, its pushes to the owners are lost, and the owners wait up to a
    second: only an answer from lb1 can save the flows. Before the owners
    asked, every flow broke in both."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        _after_a_backend_change(tb)
        flows = _moved_flows(tb, 400, seed=8, holders_exclude="lb1")
        owners = ("lb2", "lb3")
        if syn_balancer == "pushes-lost":
            for name in owners:
                tb.lose(name, MessageType.STATE_PUSH)
                testbed.set_cluster(tb.lbs[name], decision_delay_ms=1000,
                                    request_timeout_ms=5000)
        else:
            # lb1's pushes of the new flows have not left when it stalls.
            testbed.set_cluster(tb.lbs["lb1"], push_interval_ms=60_000)
        tb.set_router(["lb1"])
        tb.send(flows, "S")
        tb.set_router(["lb3"])
        if syn_balancer == "stalled":
            tb.stall("lb1")
        tb.send_unsettled(flows, "PA")
        deadline = time.monotonic() + 10
        while _asked(tb, owners) < len(flows):
            assert time.monotonic() < deadline, "the owners never heard of every flow"
            tb.step()
        if syn_balancer == "stalled":
            stalled_until = time.monotonic() + 3 * OLD_DEFAULT_WAIT_S
            while time.monotonic() < stalled_until:
                tb.step()
            tb.resume("lb1")
        tb.settle()
        testbed.set_cluster(tb.lbs["lb1"], push_interval_ms=1)
        tb.send(flows, "PA")

        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        counted = _owner_counters(tb, *owners)
        assert counted["carrier_state_adopted"] == len(flows), counted
        assert counted["decided_by_previous_table"] == 0, counted


def test_a_flow_nobody_carries_is_decided_once_everyone_said_no(eal):
    """Flows older than the change that no balancer has seen: every member
    says "not here" and the owner decides by the previous table at once, not
    when its (here long) bound passes."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        _after_a_backend_change(tb)
        for lb in tb.lbs.values():
            testbed.set_cluster(lb, decision_delay_ms=2000, request_timeout_ms=5000)
        lb2 = tb.lbs["lb2"]
        flows = [f for f in testbed.flows(300, seed=4) if lb2.dataplane.classify(f.key()).moved]
        tb.set_router(["lb2"])
        started = time.monotonic()
        tb.send(flows, "PA")
        elapsed = time.monotonic() - started

        assert elapsed < 1.0, elapsed
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        for f in flows:
            previous = str(lb2.dataplane.classify(f.key()).previous.address)
            assert set(tb.received.by_flow[testbed._fkey(f)]) == {previous}, str(f)
        counted = _owner_counters(tb, "lb1", "lb2", "lb3")
        assert counted == {"carrier_state_adopted": 0, "carrier_decided_all_not_here": len(flows),
                           "carrier_decided_at_bound": 0,
                           "decided_by_previous_table": len(flows)}, counted


def test_a_member_that_is_down_holds_the_decision_until_the_bound(eal):
    """lb2 is dead but still a member: it never replies, so each owner
    decides at the bound (decision_delay_ms). Meanwhile the asker retries
    (request_timeout_ms is shorter than the bound) and more packets come:
    each reaches the backend once, in order."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        _after_a_backend_change(tb)
        for lb in tb.lbs.values():
            testbed.set_cluster(lb, request_timeout_ms=40)     # the bound: 140 ms
        bound_s = tb.lbs["lb1"].cluster.config.decision_delay() / 1000
        flows = _moved_flows(tb, 400, seed=6, holders_exclude="lb2")
        tb.kill("lb2")
        tb.set_router(["lb1"])
        started = time.monotonic()
        sizes = [100, 200, 300]
        for size in sizes:
            tb.send_unsettled(flows, f"PA/{size}")
            for _ in range(3):
                tb.step()
        tb.settle()
        elapsed = time.monotonic() - started

        assert elapsed >= bound_s
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        assert all(tb.sizes(f) == sizes for f in flows)
        counted = _owner_counters(tb, "lb1", "lb3")
        assert counted["carrier_decided_at_bound"] == len(flows), counted
        assert counted["carrier_decided_all_not_here"] == 0, counted
        # The retries came while the owner lb3 waited, and added nothing.
        assert tb.lbs["lb1"].cluster.counters["retries"] > 0
        assert tb.lbs["lb3"].cluster.counters["retried_packets_kept_already"] > 0


def test_with_state_exchange_off_nobody_is_asked(eal):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4], state_exchange=False) as tb:
        _after_a_backend_change(tb)
        flows = testbed.flows(200, seed=3)
        tb.set_router(["lb1"])
        tb.send(flows, "S")
        tb.set_router(["lb2"])
        tb.send(flows, "PA")
        assert tb.lost(flows) == 0
        sent = sum(tb.lbs[n].cluster.counters[k] for n in tb.alive
                   for k in ("carrier_queries_sent", "sent_carrier_query"))
        assert sent == 0


def test_the_carrier_counters_are_exported():
    counters = {"carrier_queries_sent": 7, "carrier_queries_received": 5,
                "carrier_replied_state": 2, "carrier_replied_not_here": 3,
                "carrier_state_adopted": 4, "carrier_decided_all_not_here": 1,
                "carrier_decided_at_bound": 6}
    snapshot = {"counters": counters, "peer": {}, "state_entries": 0, "members": ["lb1"]}
    samples = {(s.name, tuple(s.labels.values())): s.value
               for family in SnapshotCollector._cluster(snapshot) for s in family.samples}
    assert {k: v for k, v in samples.items() if k[0].startswith("pylb_carrier")} == {
        ("pylb_carrier_queries_total", ("sent",)): 7,
        ("pylb_carrier_queries_total", ("received",)): 5,
        ("pylb_carrier_replies_total", ("state",)): 2,
        ("pylb_carrier_replies_total", ("not_here",)): 3,
        ("pylb_carrier_decisions_total", ("state",)): 4,
        ("pylb_carrier_decisions_total", ("all_not_here",)): 1,
        ("pylb_carrier_decisions_total", ("bound",)): 6,
    }
