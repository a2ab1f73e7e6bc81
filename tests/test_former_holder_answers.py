"""A balancer asked about a flow that runs through it answers with the backend
it forwards the flow to, even when it no longer holds the flow's bucket
(docs/state-exchange.md, "The miss path"). The lab's reset at steps d and e:
a new connection's SYN reached lb3 just before the router moved the flow
(lb4 joined; lb3 was drained), lb3 forwarded it by the current table and
queued its push; the ACK reached another balancer before the push reached
the bucket's holders, and the holder without state asked the former
holders, lb3 among them. lb3, no longer a holder in its own view, decided
by rule 4 (the previous table) at once, although its own flow cache named
the flow's backend: the ACK went to the old backend, which reset the
connection."""
from __future__ import annotations


import pytest

from pylb import testbed

pytestmark = pytest.mark.dpdk

BACKENDS = [f"b-{i}" for i in range(1, 6)]




def test_a_drained_balancer_answers_for_the_flows_it_forwards(eal):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        tb.set_backends(BACKENDS[1:])
        while any(lb.cluster._export_cursor is not None for lb in tb.lbs.values()):
            tb.step()
        lb1, lb3 = tb.lbs["lb1"], tb.lbs["lb3"]
        flows = []
        for f in testbed.flows(600, seed=5):
            c = lb1.dataplane.classify(f.key())
            size = lb1.cluster._table_size(c.vip)
            # Moved buckets lb3 holds before the drain: the others will ask it.
            if c.moved and "lb3" in lb3.cluster.holders(size, c.bucket):
                flows.append(f)
        assert len(flows) > 20

        # Step e: the members first, then lb3's drain (its view: lb1, lb2).
        tb.remove_balancer("lb3")
        lb3.drain_balancer()
        assert set(lb3.cluster.members) == {"lb1", "lb2"}
        for lb in tb.lbs.values():
            # One request per packet: no retry, no timing in the verdict.
            testbed.set_cluster(lb, request_timeout_ms=5000)

        # New connections reach lb3 just before the router drops it; its
        # pushes are still on their way when their next packets arrive.
        testbed.set_cluster(lb3, push_interval_ms=60_000)
        tb.set_router(["lb3"])
        tb.send(flows, "S")
        tb.set_router(["lb1", "lb2"])
        tb.send(flows, "PA")
        asked = lb3.cluster.counters["requests_answered"]
        assert asked > 0, "nobody asked lb3: pick another seed"
        testbed.set_cluster(lb3, push_interval_ms=1)
        tb.settle()
        tb.send(flows, "PA")

        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        assert lb3.cluster.counters["decided_by_previous_table"] == 0


def test_the_loop_does_not_idle_long_while_a_push_is_queued(eal):
    """A balancer the router has just left has no packet to wake it: with its
    last new flows' pushes queued, it came back from the shim only after
    its 20-ms idle, while the owners waited 20 ms for those pushes."""
    with testbed.Testbed(["lb1", "lb2"], BACKENDS[:4]) as tb:
        tb.set_backends(BACKENDS[1:])
        while any(lb.cluster._export_cursor is not None for lb in tb.lbs.values()):
            tb.step()
        tb.settle()
        lb1 = tb.lbs["lb1"]
        assert not lb1.cluster.urgent()
        flows = [f for f in testbed.flows(200, seed=5)
                 if lb1.dataplane.classify(f.key()).moved]
        testbed.set_cluster(lb1, push_interval_ms=60_000)
        tb.set_router(["lb1"])
        tb.send_unsettled(flows, "S")
        for _ in range(3):
            lb1.step(max_bursts=64, max_idle_us=0)     # the notices, no flush yet
        assert lb1.cluster.urgent()

        idles = []
        real_step = lb1.step

        def step(max_bursts=256, max_idle_us=0):
            idles.append(max_idle_us)
            return real_step(max_bursts=max_bursts, max_idle_us=1)
        lb1.step = step
        lb1.run(lambda: len(idles) >= 2)
        assert idles[0] == 2_000
        testbed.set_cluster(lb1, push_interval_ms=1)
        tb.settle()
        assert not lb1.cluster.urgent()
