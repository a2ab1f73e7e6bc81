"""The lanes' data path (native/worker.c, native/lanes.c) in one process: two
workers on the two queues of one ring port, one flow cache and the lanes'
rings, driven step by step, so that what a frame does when it is handed from
one lane to another is seen exactly. No secondary process is needed: the
rings and the cache are the ones the worker processes share."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from pipeline_support import C4, LB4, VIPS, WEB4, client_frame, delta, make_config, ring_device
from scapy.all import IP, TCP, UDP, Ether, Raw

from pylb import config as config_mod
from pylb import lanes as lanes_mod
from pylb._ffi import ffi, lib
from pylb.dataplane import BackendRegistry, Dataplane
from pylb.flow_cache import FlowCache
from pylb.flow_id import FlowKey
from pylb.neigh import NeighborTable
from pylb.port import Port
from pylb.worker import Action, Verdict, Worker

pytestmark = pytest.mark.dpdk

_names = itertools.count()
PEER4 = "203.0.113.2"
RSS_SEED = 0x5253535253535253      # native/port.c, rss_queue


def rss_queue(key: FlowKey, queues: int = 2) -> int:
    raw = key.to_bytes()
    return (lib.pylb_flow_id(ffi.from_buffer("struct pylb_flow_key *", raw), RSS_SEED) >> 32) \
        % queues


@dataclass
class Rig:
    port: Port
    tap: Port
    workers: list
    dps: list

    def poll_all(self, rounds: int = 4) -> list[list]:
        punts = [[], []]
        for _ in range(rounds):
            for i, w in enumerate(self.workers):
                punts[i] += w.poll(max_bursts=4, max_idle_us=100)
        return punts

    def flow(self, queue: int, lane: int, moved: bool, start: int = 40000) -> FlowKey:
        """A web4 flow that RSS puts on `queue`, of lane `lane`, in a moved bucket or not."""
        for sport in range(start, start + 20000):
            key = FlowKey(C4, WEB4, sport, 80, 6)
            c = self.dps[0].classify(key)
            if rss_queue(key) == queue and (c.flow_id >> 60) % 2 == lane and c.moved == moved:
                return key
        raise AssertionError("no such flow")


@pytest.fixture
def rig(eal):
    before = make_config(ring_device(), vips=VIPS[:1])
    before = before.model_copy(update={"cluster": config_mod.Cluster(balancers=[
        {"name": "pipeline", "address": LB4}, {"name": "peer", "address": PEER4}])})
    after = before.model_copy(update={"vips": [before.vips[0].model_copy(update={
        "backends": [b for b in before.vips[0].backends][:2]})]})
    name = f"rig{next(_names)}"
    made = []
    try:
        port = Port(before.balancer.data.device, rx_queues=2, tx_queues=2, mbufs=8191)
        made.append(port.close)
        tap = Port(ring_device(), mbufs=2047)
        made.append(tap.close)
        cache = FlowCache(4096)
        made.append(cache.close)
        neigh = NeighborTable()
        made.append(neigh.close)
        for n in before.balancer.data.neighbors:
            neigh.set_static(n.address, n.mac)
        lanes_mod.create_rings(name, 2)
        made.append(lambda: lanes_mod.free_rings(name, 2))
        workers, dps = [], []
        for lane in (0, 1):
            w = Worker(port, cache, neigh, exception_port=tap if lane == 0 else None,
                       rx_queue=lane, tx_queue=lane, lane=lane, lanes=2, lanes_name=name)
            made.append(w.close)
            registry = BackendRegistry()
            dp = Dataplane(before, 1, registry)
            w.set_dataplane(dp)
            dp = Dataplane(after, 2, registry, previous=dp)
            w.set_dataplane(dp)
            workers.append(w)
            dps.append(dp)
        yield Rig(port, tap, workers, dps)
    finally:
        for close in reversed(made):
            close()


def frame(key: FlowKey, flags: str, seq: int) -> bytes:
    return client_frame(IP(src=str(key.src), dst=str(key.dst))
                        / TCP(sport=key.sport, dport=key.dport, flags=flags, seq=seq)
                        / Raw(b"x" * 8))


def tcp_seq(frame: bytes) -> int:
    outer = Ether(frame)
    inner = outer[IP].payload      # IP-in-IP: the client's packet
    return inner[TCP].seq


def test_a_flows_packets_keep_their_order_when_handed_between_lanes(rig):
    """A packet of lane 1's flow in a moved bucket comes in on queue 0: lane 0
    hands it to lane 1, which holds it and asks. Meanwhile a second packet
    comes in on queue 0 and waits on lane 1's ring. Lane 1's verdict caches
    the flow; a third packet on queue 0 then hits the cache at once. The
    second must still leave before the third (one worker alone keeps them in
    order: the second waits in its RX queue until after the verdict)."""
    w0, w1 = rig.workers
    key = rig.flow(queue=0, lane=1, moved=True)
    assert rig.port.inject([frame(key, "PA", 1)]) == 1
    punts = rig.poll_all()
    assert punts[0] == [] and len(punts[1]) == 1         # lane 1 holds p1
    assert rig.port.inject([frame(key, "PA", 2)]) == 1
    w0.poll(max_bursts=4, max_idle_us=100)               # p2: handed to lane 1, on its ring
    held = punts[1][0]
    w1.apply([Verdict(held.slot, Action.FORWARD, held.previous, cache=True)])
    wire = [tcp_seq(f) for f in rig.port.drain()]         # p1
    assert rig.port.inject([frame(key, "PA", 3)]) == 1
    w0.poll(max_bursts=4, max_idle_us=100)
    w0.flush()
    wire += [tcp_seq(f) for f in rig.port.drain()]
    w1.poll(max_bursts=4, max_idle_us=100)
    w1.flush()
    wire += [tcp_seq(f) for f in rig.port.drain()]
    assert wire == [1, 2, 3], f"the flow's packets left as {wire}"
    assert w0.stats().lane_order_kept == 1          # p3 followed p2 to lane 1
    # Lane 1 has sent all it was handed: the flow's next packet leaves from lane 0.
    assert rig.port.inject([frame(key, "PA", 4)]) == 1
    w0.poll(max_bursts=4, max_idle_us=100)
    w0.flush()
    assert [tcp_seq(f) for f in rig.port.drain()] == [4]
    s0 = w0.stats()
    assert (s0.lane_order_kept, s0.fwd_cache_hit) == (1, 1) and s0.broken_equations() == []
    assert s0.lane_sticky_evicted == 0


def peer_frame(lane_key: int, sport: int, length: int = 48) -> bytes:
    """A UDP datagram to the peer port whose header's lane key byte (offset
    36, docs/peer-protocol.md) is lane_key; `length` bytes of payload."""
    payload = bytearray(length)
    if length > 36:
        payload[36] = lane_key
    return client_frame(IP(src=PEER4, dst=LB4) / UDP(sport=sport, dport=4800) / Raw(bytes(payload)))


def on_queue(rig, build, queue: int):
    for sport in range(1000, 60000):
        f = build(sport)
        p = Ether(f)
        key = FlowKey(p[IP].src, p[IP].dst, p.sport, p.dport, p[IP].proto)
        if rss_queue(key) == queue:
            return f
    raise AssertionError("no frame for that queue")


# description, frame builder, RSS queue, the counters that move on lane 0, on lane 1
HANDED = [
    ("a peer message for lane 1 on queue 0",
     lambda sport: peer_frame(1, sport), 0, {"rx": 1, "lane_out": 1}, {"lane_in": 1, "peer_rx": 1}),
    ("a peer message for lane 0 on queue 1",
     lambda sport: peer_frame(0, sport), 1, {"lane_in": 1, "peer_rx": 1}, {"rx": 1, "lane_out": 1}),
    ("a peer message too short for its lane key, on queue 1: it stays",
     lambda sport: peer_frame(1, sport, length=20), 1, {}, {"rx": 1, "peer_rx": 1}),
    ("TCP to the balancer's address on queue 1: lane 0 answers for the balancer",
     lambda sport: client_frame(IP(src=C4, dst=LB4) / TCP(sport=sport, dport=22)), 1,
     {"lane_in": 1, "drop_local": 1, "drop_total": 1}, {"rx": 1, "lane_out": 1}),
]


@pytest.mark.parametrize("what,build,queue,lane0,lane1", HANDED, ids=[h[0] for h in HANDED])
def test_what_a_lane_hands_on_and_to_whom(rig, what, build, queue, lane0, lane1):
    before = [w.stats() for w in rig.workers]
    assert rig.port.inject([on_queue(rig, build, queue)]) == 1
    rig.poll_all()
    total = None
    for w, b, expected in zip(rig.workers, before, (lane0, lane1)):
        after = w.stats()
        assert after.broken_equations() == []
        moved = {k: v for k, v in vars(delta(after, b)).items()
                 if v and k not in ("polls", "idle_sleeps", "rx_bytes")}
        assert moved == expected, what
        total = after if total is None else total + after
    assert total.broken_equations() == []


def test_a_new_flow_of_another_lane_forwards_here_and_notifies_its_lane(rig):
    key = rig.flow(queue=0, lane=1, moved=True)
    assert rig.port.inject([frame(key, "S", 1)]) == 1
    punts = rig.poll_all()
    s0, s1 = (w.stats() for w in rig.workers)
    assert (s0.fwd_new, s0.notices, s0.notices_lane_out) == (1, 0, 1)
    assert (s1.rx, s1.notices, s1.notices_lane_in) == (0, 1, 1)
    assert punts[0] == [] and [p.flow_id >> 60 for p in punts[1]] == [key and
                                                                     rig.dps[0].classify(key).flow_id >> 60]
