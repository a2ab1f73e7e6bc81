"""The stated fallback (docs/state-exchange.md): when a flow's owner and backup
are both unreachable, the balancer that has no state asks the one, then the
other, and then decides by rule 4 itself (TCP: the previous table), counts it,
and logs it with the flow's id. Flows older than the backend change keep
their backend even so."""
from __future__ import annotations

import ipaddress
import logging

import pytest
import structlog

from pylb import testbed
from pylb.flow_id import FlowKey, flow_label

pytestmark = pytest.mark.dpdk

MEMBERS = ["lb1", "lb2", "lb3", "lb4"]
BACKENDS = [f"b-{i}" for i in range(1, 6)]


@pytest.fixture
def debug_logs():
    """Debug events reach capture_logs whatever level an earlier test set."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


def test_owner_and_backup_down_falls_back_to_rule_4_counted_and_logged(eal, debug_logs):
    with testbed.Testbed(MEMBERS, BACKENDS[:4]) as tb:
        flows = testbed.flows(400, seed=5)
        tb.set_router(["lb1"])
        tb.send(flows, "S")
        tb.send(flows, "PA")
        tb.set_backends(BACKENDS[1:])
        tb.send(flows, "PA")
        # Dead, but still members: nobody has told the others yet.
        tb.kill("lb2")
        tb.kill("lb3")
        lb4 = tb.lbs["lb4"]
        orphaned = {}
        for f in flows:
            key = FlowKey(ipaddress.ip_address(f.src), ipaddress.ip_address(f.dst), f.sport,
                          f.dport, f.proto)
            c = lb4.dataplane.classify(key)
            holders = lb4.cluster.holders(lb4.cluster._table_size(c.vip), c.bucket)
            if c.moved and set(holders) == {"lb2", "lb3"}:
                orphaned[flow_label(c.flow_id)] = f
        assert orphaned, "no flow has both its holders among the dead: pick another seed"

        tb.set_router(["lb4"])
        with structlog.testing.capture_logs() as logs:
            tb.send(flows, "PA")
        tb.send(flows, "FA")

        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0
        assert lb4.cluster.counters["fallback"] == len(orphaned)
        logged = {e["flow_id"] for e in logs
                  if e["event"] == "owner and backup unreachable: decided here"}
        assert logged == set(orphaned)
