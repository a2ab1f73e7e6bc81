"""A packet too large for a state request (its size plus the request's own
headers exceed the MTU, while the packet still fits its encapsulation) goes to
the owner as its headers only; the asker keeps the packet and forwards it
when the answer comes (docs/peer-protocol.md, FLAG_HEADERS_ONLY). Before,
such a packet was decided here by rule 4 and its flow broke."""
from __future__ import annotations

import pytest

from pylb import testbed, traffic
from pylb.peer import MessageType

pytestmark = pytest.mark.dpdk

BACKENDS = [f"b-{i}" for i in range(1, 6)]
# IPIP adds 20 bytes: 1450 + 20 fits the data MTU of 1500. A request adds
# 20 + 8 + 48 + 16 (the testbed has a key): 1450 + 92 does not.
LARGE = "PA/1450"


def _started_at_lb1(tb: testbed.Testbed, flows) -> None:
    """New flows in moved buckets at lb1: their state is at their owners,
    on the current table's backend, where rule 4 would pick the previous one."""
    tb.set_backends(BACKENDS[1:])
    tb.set_router(["lb1"])
    tb.send(flows, "S")


def test_a_large_packet_of_a_moved_flow_reaches_its_backend(eal):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(400, seed=5)
        _started_at_lb1(tb, flows)
        tb.set_router(["lb2"])
        tb.send(flows, LARGE)
        tb.send(flows, LARGE)        # the second goes direct, from lb2's cache
        tb.send(flows, "FA")
        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0
        assert tb.duplicated(flows) == 0
        c = tb.lbs["lb2"].cluster.counters
        assert c["requests_headers_only"] > 0
        assert c["fallback"] == 0
        assert c["answers_cached"] == c["requests_headers_only"]


def test_large_packets_while_a_joiner_asks_the_former_holders(eal):
    """lb4 joins and the handoff to it is lost. The router sends every flow
    to lb4 or lb2 at once: lb4, as a new owner without the state, asks the
    former holders with its own packets' headers, and relays lb2's
    headers-only requests to them; nobody forwards a packet it does not hold."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(600, seed=6)
        _started_at_lb1(tb, flows)
        for kind in (MessageType.HANDOFF, MessageType.REFRESH):
            tb.lose("lb4", kind)            # the handoff, lost on the way
        tb.add_balancer("lb4", join_router=False)
        tb.set_router(["lb2", "lb4"])
        tb.send_unsettled(flows, LARGE)
        tb.settle()
        tb.send(flows, "FA")
        assert tb.broken(flows) == 0
        assert tb.lost(flows) == 0
        assert tb.duplicated(flows) == 0
        counters = tb.counters()
        assert tb.lbs["lb4"].cluster.counters["asked_former_holder"] > 0, counters
        assert counters["requests_headers_only"] > 0
        assert counters.get("fallback", 0) == 0


def test_small_packets_still_go_whole(eal):
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(200, seed=7)
        _started_at_lb1(tb, flows)
        tb.set_router(["lb2"])
        tb.send(flows, "PA/1400")       # 1400 + 92 fits
        assert tb.broken(flows) == 0 and tb.lost(flows) == 0
        c = tb.lbs["lb2"].cluster.counters
        assert c["requests_sent"] > 0
        assert c["requests_headers_only"] == 0


def test_a_large_packet_then_a_small_one_arrive_in_order(eal):
    """Once a packet is kept, the later ones of its flow are kept too: the
    small one does not overtake the large one through the owner."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(300, seed=13)
        _started_at_lb1(tb, flows)
        tb.set_router(["lb2"])
        tb.send_unsettled(flows, LARGE)
        tb.send_unsettled(flows, "PA")
        tb.settle()
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        assert tb.lbs["lb2"].cluster.counters["requests_headers_only"] > 0
        out_of_order = [f for f in flows if tb.sizes(f)[1] != 1450]
        assert not out_of_order, [(str(f), tb.sizes(f)) for f in out_of_order[:3]]


@pytest.mark.parametrize("second", [None, "PA"], ids=["large only", "large then small"])
def test_the_fallback_forwards_the_kept_packets(eal, second):
    """Owner and backup never get the requests: the fallback decides here and
    forwards what was kept, each packet once."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(300, seed=10)
        _started_at_lb1(tb, flows)
        for name in ("lb1", "lb3"):
            tb.lose(name, MessageType.STATE_REQUEST)
        tb.set_router(["lb2"])
        tb.send_unsettled(flows, LARGE)
        if second:
            tb.send_unsettled(flows, second)
        tb.settle()
        c = tb.lbs["lb2"].cluster.counters
        assert c["fallback"] > 0 and c["requests_headers_only"] > 0
        assert tb.lost(flows) == 0
        assert tb.duplicated(flows) == 0


def test_the_owner_waits_without_the_packet(eal):
    """Flows nobody has state for: the owner waits decision_delay_ms for a
    push before rule 4, holding only the asker's name; the packets the
    backends get are the whole ones, each once."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(300, seed=9)
        tb.set_backends(BACKENDS[1:])
        tb.set_router(["lb2"])
        tb.send(flows, LARGE)
        tb.send(flows, LARGE)
        assert tb.lost(flows) == 0 and tb.duplicated(flows) == 0
        assert all(tb.sizes(f) == [1450, 1450] for f in flows)
        counters = tb.counters()
        assert counters["requests_headers_only"] > 0 and counters["decisions_delayed"] > 0


def test_a_large_packet_with_source_port_0(eal):
    """Port 0 is a port like any other (UDP allows it): no crash, nothing lost,
    and the owner answers for it as for any flow."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = [traffic.Flow("web", 6, f"198.51.100.{i}", 0, testbed.VIP, 80)
                 for i in range(1, 200)]
        _started_at_lb1(tb, flows)
        tb.set_router(["lb2"])
        tb.send(flows, LARGE)
        assert tb.lost(flows) == 0 and tb.broken(flows) == 0
        assert tb.lbs["lb2"].cluster.counters["requests_headers_only"] > 0


def test_a_punt_the_miss_path_cannot_decide_is_dropped_and_counted(eal, monkeypatch):
    """Whatever a packet does to the miss path, the balancer goes on: the
    packet is dropped, counted under punts "failed", and the next ones work."""
    with testbed.Testbed(["lb1", "lb2", "lb3"], BACKENDS[:4]) as tb:
        flows = testbed.flows(200, seed=14)
        _started_at_lb1(tb, flows)
        lb2 = tb.lbs["lb2"]
        decide, calls = lb2.cluster.decide, []

        def failing_once(p):
            calls.append(p)
            if len(calls) == 1:
                raise ValueError("a packet nobody foresaw")
            return decide(p)

        monkeypatch.setattr(lb2.cluster, "decide", failing_once)
        tb.set_router(["lb2"])
        tb.send(flows, "PA")
        assert lb2.verdicts_by_reason["failed"] == 1
        assert tb.lost(flows) == 1
        assert lb2.worker.stats().held_now == 0
        with pytest.raises(ValueError):
            lb2.dataplane.classify(b"not 40 bytes")     # refused, never read past its end
        tb.send(flows, "PA")
        assert tb.lost(flows) == 1 and tb.broken(flows) == 0
