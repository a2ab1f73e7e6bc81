"""Retirement of stateful buckets (docs/state-exchange.md, "Retirement"): a
bucket whose owner holds a live flow on an old backend stays stateful on every
balancer; the others retire once their owner has announced them (CLEAN), and
flows keep their backend throughout."""
from __future__ import annotations

import time

import pytest

from pylb import peer, testbed

pytestmark = pytest.mark.dpdk

MEMBERS = ["lb1", "lb2", "lb3"]
BACKENDS = [f"b-{i}" for i in range(1, 6)]



def _stateful(lb) -> set[int]:
    return {b for h in lb.dataplane.history.values() for b in h.stateful}


def _rounds(tb: testbed.Testbed, seconds: float) -> None:
    """Lets every balancer's timers run (CLEAN goes out once a second)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tb.step()
        time.sleep(0.02)


def test_buckets_with_old_flows_stay_stateful_and_the_rest_retire_everywhere(eal):
    with testbed.Testbed(MEMBERS, BACKENDS[:4]) as tb:
        flows = testbed.flows(300, seed=11)
        tb.set_router(["lb1"])
        tb.send(flows, "S")
        tb.send(flows, "PA")
        tb.set_backends(BACKENDS[1:5])       # b-1 leaves, b-5 joins
        _rounds(tb, 0.2)                     # lb1 pushes its flows of moved buckets
        lb1 = tb.lbs["lb1"]
        moved_before = _stateful(lb1)
        classified = {f: lb1.dataplane.classify(f.key()) for f in flows}
        old = {c.bucket for c in classified.values() if c.stateful}
        assert old and len(moved_before) > 10 * len(old)

        for name in MEMBERS:                 # owners retire and announce theirs
            tb.lbs[name].retire_previous()
        _rounds(tb, 1.3)
        for name in MEMBERS:                 # the others retire what they heard
            tb.lbs[name].retire_previous()

        for name in MEMBERS:
            lb = tb.lbs[name]
            assert _stateful(lb) == old, name
            assert lb.cluster.counters["clean_heard"] > 0 and not lb.cluster.counters["clean_refused"]
        tb.set_router(["lb3"])               # the old flows reach a balancer without them
        tb.send(flows, "PA")
        assert tb.broken(flows) == 0 and tb.lost(flows) == 0


def test_a_clean_from_a_balancer_that_does_not_own_the_bucket_is_refused(eal):
    with testbed.Testbed(MEMBERS, BACKENDS[:4]) as tb:
        tb.set_backends(BACKENDS[1:5])
        tb.step()                            # the post-change scan (nothing cached) ends
        lb1 = tb.lbs["lb1"]
        vip = lb1.config.vips[0]
        history = lb1.dataplane.history[vip.name]
        own = lb1.cluster.ownership(vip.table_size)
        bucket = next(b for b in history.stateful if own.owners(b)[0] == "lb3")
        record = peer.CleanRecord(vip.address, vip.protocol_number, vip.port or 0,
                                  vip.table_size, bucket)
        wrong_size = peer.CleanRecord(vip.address, vip.protocol_number, vip.port or 0,
                                      65521, bucket)
        lb1.cluster._on_clean("lb2", [record])                   # not the owner
        lb1.cluster._on_clean("lb3", [wrong_size])               # not this VIP's table
        assert lb1.cluster.counters["clean_refused"] == 2
        assert lb1.retire_previous() > 0     # its own buckets go; this one stays
        assert bucket in _stateful(lb1)
        lb1.cluster._on_clean("lb3", [record])
        assert lb1.retire_previous() == 1 and bucket not in _stateful(lb1)
