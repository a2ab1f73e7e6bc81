"""An owner without state waits before rule 4, at most
`cluster.decision_delay_ms` (docs/state-exchange.md, "The miss path"). A
flow that has just started at one balancer, in a bucket a backend change
moved, may reach another balancer before the first one's batched push
reaches the owner: deciding at once by the previous table would send it to
the old backend and break it. Meanwhile the owner asks the others who
carries the flow (tests/test_carrier_query.py); here the pushes alone."""
from __future__ import annotations

import time

import pytest

from pylb import testbed
from pylb.peer import MessageType

pytestmark = pytest.mark.dpdk

BACKENDS = [f"b-{i}" for i in range(1, 6)]




def _heard(tb) -> int:
    """Requests and local misses the owners lb2 and lb3 have decided or put off."""
    return sum(tb.lbs[n].cluster.counters[c] for n in ("lb2", "lb3")
               for c in ("requests_answered", "decided_locally", "decisions_delayed"))


@pytest.mark.parametrize("delay_ms, push_in_time, breaks", [
    # Long enough for a loaded machine: the push comes well within it.
    (1000, True, False),
    (0, True, True),
    # The push never comes in time, and no reply to the owners' questions
    # either: rule 4 decides when the wait ends, and the packets kept
    # meanwhile are forwarded, none lost.
    (200, False, True),
], ids=["owner-waits", "owner-decides-at-once", "wait-runs-out"])
def test_a_flow_that_just_started_elsewhere_keeps_its_backend(eal, delay_ms, push_in_time,
                                                             breaks):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        for owner in ("lb2", "lb3"):
            # lb1 would answer with the flows' state: only pushes count here.
            tb.lose(owner, MessageType.CARRIER_REPLY)
        tb.set_backends(BACKENDS[1:])
        while any(lb.cluster._export_cursor is not None for lb in tb.lbs.values()):
            tb.step()     # the scans after the change end (they flush pushes as they go)
        for lb in tb.lbs.values():
            # No retry while an owner waits: each packet is delivered once.
            testbed.set_cluster(lb, decision_delay_ms=delay_ms, request_timeout_ms=5000)
        lb1 = tb.lbs["lb1"]
        flows = []
        for f in testbed.flows(400, seed=8):
            c = lb1.dataplane.classify(f.key())
            # Moved buckets that lb1 does not hold: their state must travel.
            if c.moved and "lb1" not in lb1.cluster.holders(lb1.cluster._table_size(c.vip),
                                                           c.bucket):
                flows.append(f)
        assert len(flows) > 20

        # The flows start at lb1, whose pushes are slow to leave.
        testbed.set_cluster(lb1, push_interval_ms=60_000)
        tb.set_router(["lb1"])
        tb.send(flows, "S")
        # Their next packets reach lb3 (the router changed) before the pushes.
        tb.set_router(["lb3"])
        tb.send_unsettled(flows, "PA")
        deadline = time.monotonic() + 10
        while _heard(tb) < len(flows):
            assert time.monotonic() < deadline, ("the owners never heard of every flow",
                                                 len(flows), {n: dict(tb.lbs[n].cluster.counters)
                                                              for n in ("lb1", "lb2", "lb3")})
            tb.step()
        if not push_in_time:
            tb.settle()                      # the owners decide without the pushes
        testbed.set_cluster(lb1, push_interval_ms=1)
        tb.settle()
        tb.send(flows, "PA")

        assert (tb.broken(flows) > 0) == breaks
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        owners = [tb.lbs[n].cluster.counters for n in ("lb2", "lb3")]
        got_state = sum(c["undecided_got_state"] for c in owners)
        delayed = sum(c["decisions_delayed"] for c in owners)
        assert got_state == (len(flows) if push_in_time and delay_ms else 0)
        assert delayed == (len(flows) if delay_ms else 0)
        at_bound = sum(c["carrier_decided_at_bound"] for c in owners)
        assert at_bound == (len(flows) if not push_in_time else 0)


def test_a_fin_kept_through_the_wait_marks_the_state_closing(eal):
    """The owner's record of a flow whose packet in the wait carried a FIN
    lives for the closing timeout, not the full TCP idle timeout, as when
    the FIN comes in a request for state the owner already holds."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        tb.set_backends(BACKENDS[1:])
        lb2 = tb.lbs["lb2"]
        flows = [f for f in testbed.flows(300, seed=4) if lb2.dataplane.classify(f.key()).moved]
        assert len(flows) > 20
        tb.set_router(["lb2"])
        tb.send(flows, "FA")      # nobody has their state: every owner waits, then decides
        assert tb.lost(flows) == 0
        owned_here = 0
        for f in flows:
            c = lb2.dataplane.classify(f.key())
            owner = lb2.cluster.holders(lb2.cluster._table_size(c.vip), c.bucket)[0]
            owned_here += owner == "lb2"
            rec = tb.lbs[owner].cluster.store.get(f.key().to_bytes())
            assert rec is not None and rec.closing, (str(f), owner, rec)
        assert 0 < owned_here < len(flows)      # both ways: lb2's own wait and a request's
