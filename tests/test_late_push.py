"""A push that reaches a balancer which, in its own view, no longer holds the
flow's bucket (the sender has not heard of a join yet, or the push was on its
way during a handoff) is passed on to the bucket's holders as a handoff, once
(docs/state-exchange.md, "Late pushes"). Without that, the new owner would
decide the flow by the previous table and send it to the wrong backend."""
from __future__ import annotations


import pytest

from pylb import testbed
from pylb.balancer import Balancer

pytestmark = pytest.mark.dpdk

BACKENDS = [f"b-{i}" for i in range(1, 6)]



def test_a_push_to_a_former_holder_reaches_the_new_holders(eal):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        tb.set_backends(BACKENDS[1:])
        # lb4 joins; configuration management has reached lb1 and lb2, not lb3.
        old_members = ["lb1", "lb2", "lb3"]
        tb.index["lb4"] = 3
        tb.names.append("lb4")
        previous = [tb.config("lb1", backends, old_members) for backends in tb.backend_history]
        tb.lbs["lb4"] = Balancer(tb.config("lb4"), previous_config=previous)
        tb.alive.add("lb4")
        for name in ("lb1", "lb2"):
            tb.lbs[name].reconfigure(tb.config(name))

        # New flows start at lb3, which pushes by its old view.
        flows = testbed.flows(600, seed=3)
        tb.set_router(["lb3"])
        tb.send(flows, "S")
        lb1 = tb.lbs["lb1"]
        passed_on = 0
        for f in flows:
            c = lb1.dataplane.classify(f.key())
            if not c.moved:
                continue
            size = lb1.cluster._table_size(c.vip)
            old = tb.lbs["lb3"].cluster.holders(size, c.bucket)
            new = lb1.cluster.holders(size, c.bucket)
            passed_on += bool(set(old) - set(new) - {"lb3"})
            for holder in set(new) - {"lb3"}:
                assert tb.lbs[holder].cluster.store.get(f.key().to_bytes()) is not None, \
                    (f, old, new, holder)
        assert passed_on, "no push went to a former holder: pick another seed"
        assert sum(tb.lbs[n].cluster.counters["pushes_passed_on"] for n in ("lb1", "lb2")) > 0

        # The router moves every flow to lb1, which has no state: the owners
        # (lb4 among them) answer with the state lb3 pushed.
        tb.set_router(["lb1"])
        tb.send(flows, "PA")
        tb.send(flows, "FA")
        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0
