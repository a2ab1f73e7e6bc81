"""Malformed, spoofed, replayed and stale peer messages: dropped, counted, no
crash, no state changed (docs/peer-protocol.md, acceptance rules 1-6).

Real datagrams through the real shim: each case is an Ethernet/IPv4/UDP frame
to a balancer's data address and peer port, injected on its ring port in a
Testbed of three balancers whose stores hold state (a backend change, then new
flows in moved buckets). Every case states the peer counters that must move,
by exactly how much; everything else must stay as it was: every balancer's
store, the worker's counter equations, no packet left held, and every
member's genuine messages still accepted afterwards (a dropped message never
moves a sender's replay window).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import random
from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pylb import peer, testbed, traffic
from pylb.cluster import AUTHORITATIVE
from pylb.flow_cache import now_ms
from pylb.flow_id import FlowKey
from pylb.peer import (MAC_LEN, FlowQuery, MessageType, NotCarried, RemoveRecord, ReplayWindow,
                       StateRecord)

pytestmark = pytest.mark.dpdk

TARGET = "lb1"                                   # the balancer every case talks to
MEMBERS = ["lb1", "lb2", "lb3"]
KEY = bytes.fromhex(testbed.KEY)
OTHER_KEY = bytes(reversed(KEY))
STRANGER = "203.0.113.77"                        # on the data network, not a balancer
FOREIGN_BACKEND = "203.0.113.199"                # no VIP's backend
# Forged messages carry a seq this far above the claimed sender's: had a
# forgery moved the window, the sender's genuine messages would look replayed.
AHEAD = 10_000
# Clients of testbed.flows use source ports from 1024: these flows are nobody's.
UNKNOWN_FLOW = FlowKey("198.51.100.7", testbed.VIP, 1000, 80, 6)
NO_VIP_FLOW = FlowKey("198.51.100.7", "192.0.2.99", 1000, 80, 6)


class Cluster:
    """A running Testbed, and messages as its members (or impostors) would send them."""

    def __init__(self, tb: testbed.Testbed, flows: list[FlowKey]):
        self.tb = tb
        self.flows = flows
        self.target = tb.lbs[TARGET]
        # State from a flow's start (a new flow in a moved bucket), which a
        # rule-4 decision must not replace either.
        self.held = min((r for r in self.target.cluster.store.records()
                         if r.version & AUTHORITATIVE), key=lambda r: r.key)

    def address(self, name: str) -> str:
        return testbed.lb_address(self.tb.index[name])

    def next_seq(self, name: str) -> int:
        # The sender's own counter: a crafted message from a member takes the
        # place of one of its own, so the member's later messages stay in order.
        return self.tb.lbs[name].cluster._next_seq()

    def message(self, kind: MessageType, records=(), packet: bytes | None = None,
                sender: str = "lb2", sender_id: int | None = None, seq: int | None = None,
                key: bytes | None = KEY) -> bytes:
        msg = peer.Message(kind, peer.balancer_id(sender) if sender_id is None else sender_id,
                           self.tb.lbs[sender].cluster.view,
                           self.next_seq(sender) if seq is None else seq, tuple(records), packet)
        return peer.encode(msg, key)

    def forged(self, **kw) -> bytes:
        """A message its claimed sender never sent: tempting content, a seq ahead."""
        sender = kw.setdefault("sender", "lb2")
        kw.setdefault("seq", self.next_seq(sender) + AHEAD)
        return self.message(MessageType.STATE_PUSH, (self.tempting(),), **kw)

    def tempting(self) -> StateRecord:
        """What a message must not achieve unless genuine: a newer version of a
        held flow's state naming another of the VIP's backends (the control
        test shows a genuine one does replace the state)."""
        others = [testbed.backend_address(int(b.split("-")[1])) for b in self.tb.backends]
        other = next(a for a in others if ipaddress.ip_address(a) != self.held.backend)
        return dataclasses.replace(self.held, backend=ipaddress.ip_address(other),
                                   version=self.held.version + 1, idle_ms=0)

    def inject(self, payload: bytes, src: str, settle: bool = True) -> None:
        """settle=False: a few rounds only, for an owner that must go on waiting."""
        port = self.target.config.cluster.peer_port
        frame = (Ether(dst=self.target.port.mac, src=testbed.GATEWAY_MAC)
                 / IP(src=src, dst=self.address(TARGET)) / UDP(sport=port, dport=port)
                 / Raw(payload))
        assert self.target.port.inject([bytes(frame)]) == 1
        if settle:
            self.tb.settle()
        else:
            for _ in range(5):
                self.tb.step()

    def peer_stats(self) -> dict[str, int]:
        return self.target.cluster.peer_stats.as_dict()

    def stores(self) -> dict[str, dict]:
        """Every balancer's state, without the idle times (which move with the clock)."""
        return {name: {r.key: (r.backend, r.version, r.closing)
                       for r in self.tb.lbs[name].cluster.store.records()}
                for name in self.tb.alive}


def record(flow: FlowKey, backend: str, version: int) -> StateRecord:
    return StateRecord(flow.to_bytes(), ipaddress.ip_address(backend), version, 0, False)


def resigned(datagram: bytes, key: bytes = KEY) -> bytes:
    """datagram with its HMAC trailer made right again after an edit, so the
    receiver looks past the MAC (into the payload) before it drops it."""
    signed = datagram[:-MAC_LEN]
    return signed + hmac.new(key, signed, hashlib.sha256).digest()[:MAC_LEN]


def patched(datagram: bytes, offset: int, value: bytes) -> bytes:
    return datagram[:offset] + value + datagram[offset + len(value):]


def request_packet(flow: FlowKey) -> bytes:
    return bytes(IP(src=str(flow.src), dst=str(flow.dst))
                 / TCP(sport=flow.sport, dport=flow.dport, flags="A"))


@pytest.fixture
def cluster(eal):
    """Three balancers whose stores hold state: flows started, a backend
    change, then new flows, whose state in moved buckets goes to the owners."""
    with testbed.Testbed(MEMBERS, ["b-1", "b-2", "b-3", "b-4"]) as tb:
        flows = testbed.flows(400, seed=11)
        for i, batch in enumerate((flows[:200], flows[200:])):
            if i:
                tb.set_backends(["b-2", "b-3", "b-4", "b-5"])
            tb.send(batch, "S")
            tb.send(batch, "PA")
        assert len(tb.lbs[TARGET].cluster.store) > 0
        views = {tb.lbs[n].cluster.view for n in MEMBERS}
        assert len(views) == 1, "the cases speak each sender's view: the members must agree"
        yield Cluster(tb, [FlowKey(f.src, f.dst, f.sport, f.dport, f.proto) for f in flows])


# ---------------------------------------------------------------- the cases

def replayed_copy(c: Cluster) -> list:
    """A datagram accepted once (state for a new flow, removed since) comes
    again: had it been taken, the flow's state would be back."""
    rec = record(UNKNOWN_FLOW, testbed.backend_address(3), c.held.version)
    original = c.message(MessageType.STATE_PUSH, (rec,))
    c.inject(original, c.address("lb2"))
    assert c.target.cluster.store.get(rec.key) == rec
    c.inject(c.message(MessageType.REMOVE, (RemoveRecord(rec.key, rec.version),)),
             c.address("lb2"))
    assert c.target.cluster.store.get(rec.key) is None
    return [(original, c.address("lb2"))]


def older_than_the_window(c: Cluster) -> list:
    """A seq never seen, but more than the window below the sender's highest."""
    highest = c.next_seq("lb2")
    c.inject(c.message(MessageType.STATE_PUSH, (), seq=highest), c.address("lb2"))
    late = c.message(MessageType.STATE_PUSH, (c.tempting(),), seq=highest - ReplayWindow.SIZE)
    return [(late, c.address("lb2"))]


def from_lb2(build: Callable[[Cluster], bytes]) -> Callable[[Cluster], list]:
    return lambda c: [(build(c), c.address("lb2"))]


def stale(kind: MessageType, version: Callable[[StateRecord], int]) -> Callable:
    """kind carrying the held flow with another valid backend, at an older version."""
    def build(c: Cluster) -> bytes:
        older = dataclasses.replace(c.tempting(), version=version(c.held))
        return c.message(kind, (older,))
    return from_lb2(build)


def query(c: Cluster, **kw) -> bytes:
    return c.message(MessageType.CARRIER_QUERY, (FlowQuery(UNKNOWN_FLOW.to_bytes()),), **kw)


def not_here(c: Cluster, **kw) -> bytes:
    return c.message(MessageType.CARRIER_REPLY, (NotCarried(UNKNOWN_FLOW.to_bytes()),), **kw)


def emptied(datagram: bytes) -> bytes:
    """datagram with its records taken out, count and payload length 0, MAC right."""
    header = patched(datagram[:peer.HEADER_LEN], 32, bytes(4))
    return resigned(header + bytes(MAC_LEN))


def cut_in_the_key(datagram: bytes) -> bytes:
    """A one-query datagram whose payload ends a byte early, MAC right."""
    header = patched(datagram[:peer.HEADER_LEN], 34, (peer.QUERY_LEN - 1).to_bytes(2, "big"))
    body = datagram[peer.HEADER_LEN:peer.HEADER_LEN + peer.QUERY_LEN - 1]
    return resigned(header + body + bytes(MAC_LEN))


def replayed_query(c: Cluster) -> list:
    """A carrier query accepted (and answered) once comes again."""
    original = query(c)
    c.inject(original, c.address("lb2"))
    return [(original, c.address("lb2"))]


def garbage(c: Cluster) -> bytes:
    return random.Random(5).randbytes(120)


@dataclass(frozen=True)
class Case:
    description: str
    datagrams: Callable[[Cluster], list]     # (UDP payload, IP source) pairs, after any set-up
    counted: dict[str, int]                   # peer counters that move, and by how much


CASES = [
    # Rule 1: only a configured balancer, under its own id.
    Case("spoofed: source is not a balancer",
         lambda c: [(c.forged(), STRANGER)], {"spoofed": 1}),
    Case("spoofed: a member's address, another member's id",
         lambda c: [(c.forged(sender="lb3"), c.address("lb2"))], {"spoofed": 1}),
    Case("spoofed: the receiver's own address and id",
         lambda c: [(c.forged(sender=TARGET), c.address(TARGET))], {"spoofed": 1}),
    # Rule 2: structure, checked before anything is believed.
    Case("malformed: bad magic",
         from_lb2(lambda c: patched(c.forged(), 0, b"XXXX")), {"malformed": 1}),
    Case("malformed: unknown protocol version",
         from_lb2(lambda c: patched(c.forged(), 4, b"\x02")), {"malformed": 1}),
    Case("malformed: unknown message type",
         from_lb2(lambda c: patched(c.forged(), 5, b"\x7f")), {"malformed": 1}),
    Case("malformed: unknown flag bits",
         from_lb2(lambda c: patched(c.forged(), 6, b"\x80\x01")), {"malformed": 1}),
    Case("malformed: non-zero reserved bytes",
         from_lb2(lambda c: patched(c.forged(), 47, b"\x01")), {"malformed": 1}),
    Case("malformed: record count disagrees with the payload",
         from_lb2(lambda c: patched(c.forged(), 32, b"\x00\x02")), {"malformed": 1}),
    Case("malformed: truncated header",
         from_lb2(lambda c: c.forged()[:20]), {"malformed": 1}),
    Case("malformed: truncated payload",
         from_lb2(lambda c: c.forged()[:-MAC_LEN - 10]), {"malformed": 1}),
    Case("malformed: empty datagram", from_lb2(lambda c: b""), {"malformed": 1}),
    Case("malformed: garbage", from_lb2(garbage), {"malformed": 1}),
    # Authenticated, so the receiver reads the payload, and finds it bad.
    Case("malformed: non-zero record padding (MAC right)",
         from_lb2(lambda c: resigned(patched(c.forged(), peer.HEADER_LEN + 75, b"\x01"))),
         {"malformed": 1}),
    Case("malformed: unknown record flags (MAC right)",
         from_lb2(lambda c: resigned(patched(c.forged(), peer.HEADER_LEN + 68, b"\x02"))),
         {"malformed": 1}),
    Case("malformed: a state request without an IP packet (MAC right)",
         from_lb2(lambda c: resigned(patched(
             c.message(MessageType.STATE_REQUEST, packet=request_packet(UNKNOWN_FLOW)),
             peer.HEADER_LEN, b"\x00"))),
         {"malformed": 1}),
    Case("malformed: a state request whose packet has no ports",
         from_lb2(lambda c: c.message(MessageType.STATE_REQUEST, packet=bytes(
             IP(src="198.51.100.7", dst=testbed.VIP, proto=47) / Raw(bytes(8))))),
         {"malformed": 1}),
    Case("malformed: a state request for a flow of no VIP",
         from_lb2(lambda c: c.message(MessageType.STATE_REQUEST,
                                      packet=request_packet(NO_VIP_FLOW))),
         {"malformed": 1}),
    # The question who carries a flow, and its replies.
    Case("malformed: a carrier query without records (MAC right)",
         from_lb2(lambda c: emptied(query(c))), {"malformed": 1}),
    Case("malformed: a carrier reply without records (MAC right)",
         from_lb2(lambda c: emptied(not_here(c))), {"malformed": 1}),
    Case("malformed: a carrier query whose key padding is not zero (MAC right)",
         from_lb2(lambda c: resigned(patched(query(c), peer.HEADER_LEN + 37, b"\x01"))),
         {"malformed": 1}),
    Case("malformed: a carrier query cut inside a key (MAC right)",
         from_lb2(lambda c: cut_in_the_key(query(c))),
         {"malformed": 1}),
    Case("malformed: 'not here' naming a backend (MAC right)",
         from_lb2(lambda c: resigned(patched(not_here(c), peer.HEADER_LEN + 55, b"\x01"))),
         {"malformed": 1}),
    Case("malformed: 'not here' and closing (MAC right)",
         from_lb2(lambda c: resigned(patched(not_here(c), peer.HEADER_LEN + 68, b"\x03"))),
         {"malformed": 1}),
    Case("malformed: a lane key past 16 (MAC right)",
         from_lb2(lambda c: resigned(patched(c.forged(), 36, b"\x10"))), {"malformed": 1}),
    Case("malformed: a sender lane past 16 (MAC right)",
         from_lb2(lambda c: resigned(patched(c.forged(), 37, b"\x10"))), {"malformed": 1}),
    Case("malformed: a carrier query flagged as a retried request",
         from_lb2(lambda c: patched(query(c), 6, b"\x00\x05")), {"malformed": 1}),
    Case("spoofed: a carrier query from an address that is no balancer",
         lambda c: [(query(c), STRANGER)], {"spoofed": 1}),
    Case("bad_mac: a carrier reply signed with another key",
         from_lb2(lambda c: not_here(c, key=OTHER_KEY)), {"bad_mac": 1}),
    Case("replayed: a copy of a carrier query", replayed_query, {"replayed": 1}),
    Case("accepted: a carrier reply nobody waits for changes nothing",
         from_lb2(lambda c: c.message(MessageType.CARRIER_REPLY, (c.tempting(),))),
         {"accepted": 1}),
    # Rule 3: with a key, the HMAC is present and right.
    Case("bad_mac: signed with another key",
         from_lb2(lambda c: c.forged(key=OTHER_KEY)), {"bad_mac": 1}),
    Case("bad_mac: no HMAC",
         from_lb2(lambda c: c.forged(key=None)), {"bad_mac": 1}),
    Case("bad_mac: a record changed after signing",
         from_lb2(lambda c: patched(c.forged(), peer.HEADER_LEN + 56, b"\x7f")),
         {"bad_mac": 1}),
    # Rule 4: each seq once, within the window.
    Case("replayed: a copy of an accepted datagram", replayed_copy, {"replayed": 1}),
    Case("replayed: a seq older than the window", older_than_the_window, {"replayed": 1}),
    # Rule 5: a record naming a backend outside the VIP's sets is rejected alone.
    Case("bad_backend: a new flow to a backend outside the VIP",
         from_lb2(lambda c: c.message(MessageType.STATE_PUSH, (
             record(UNKNOWN_FLOW, FOREIGN_BACKEND, c.held.version),))),
         {"accepted": 1, "bad_backend": 1}),
    Case("bad_backend: a held flow's newer state to a backend outside the VIP",
         from_lb2(lambda c: c.message(MessageType.HANDOFF, (dataclasses.replace(
             c.tempting(), backend=ipaddress.ip_address(FOREIGN_BACKEND)),))),
         {"accepted": 1, "bad_backend": 1}),
    Case("bad_backend: a flow of no VIP",
         from_lb2(lambda c: c.message(MessageType.STATE_PUSH, (
             record(NO_VIP_FLOW, testbed.backend_address(3), c.held.version),))),
         {"accepted": 1, "bad_backend": 1}),
    # Rule 6: state never rolls back.
    Case("stale: a push of an older version",
         stale(MessageType.STATE_PUSH, lambda held: held.version - 1),
         {"accepted": 1, "stale": 1}),
    Case("stale: a handoff of an older version",
         stale(MessageType.HANDOFF, lambda held: held.version - 1),
         {"accepted": 1, "stale": 1}),
    Case("stale: an owner's later rule-4 decision against state from the flow's start",
         stale(MessageType.STATE_PUSH, lambda held: (held.version & ~AUTHORITATIVE) + 1_000_000),
         {"accepted": 1, "stale": 1}),
    Case("stale: a removal older than the held state",
         from_lb2(lambda c: c.message(MessageType.REMOVE, (
             RemoveRecord(c.held.key, c.held.version - 1),))),
         {"accepted": 1, "stale": 1}),
]


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def received(stats: dict[str, int]) -> int:
    return peer.PeerStats(**stats).received


def assert_workers_sound(tb: testbed.Testbed) -> None:
    for name in tb.alive:
        stats = tb.lbs[name].stats()
        assert stats.broken_equations() == [], name
        assert stats.held_now == 0, name


def assert_members_still_heard(c: Cluster) -> None:
    """Every member's next genuine message is accepted: no drop moved a window."""
    before = c.peer_stats()
    for name in MEMBERS:
        if name != TARGET:
            c.inject(c.message(MessageType.STATE_PUSH, (), sender=name), c.address(name))
    assert delta(before, c.peer_stats()) == {"accepted": len(MEMBERS) - 1}


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_bad_peer_message_is_dropped_counted_and_changes_nothing(cluster, case):
    datagrams = case.datagrams(cluster)
    stats, stores = cluster.peer_stats(), cluster.stores()
    for payload, src in datagrams:
        cluster.inject(payload, src)
    assert delta(stats, cluster.peer_stats()) == case.counted
    # Every datagram is one message outcome (docs: received == accepted + drops).
    assert received(cluster.peer_stats()) - received(stats) == len(datagrams)
    assert cluster.stores() == stores
    assert_workers_sound(cluster.tb)
    assert_members_still_heard(cluster)


def test_control_the_tempting_message_sent_genuinely_changes_the_state(cluster):
    """The cases' content does change state when it comes the right way: what
    they leave unchanged, they leave unchanged because they were refused."""
    rec = cluster.tempting()
    cluster.inject(cluster.message(MessageType.STATE_PUSH, (rec,)), cluster.address("lb2"))
    assert cluster.target.cluster.store.get(rec.key) == rec
    assert_workers_sound(cluster.tb)


def cached_backend(lb, flow: FlowKey) -> int | None:
    hit = lb.cache.peek(flow.to_bytes(), lb.dataplane.classify(flow).flow_id, now_ms())
    return None if hit is None else hit[0]


def test_an_answer_nobody_asked_for_changes_no_cache_entry(cluster):
    """A STATE_ANSWER with no request pending is counted and ignored, both for
    a flow the receiver caches (it keeps its backend) and for one it does not."""
    lb = cluster.target
    mine = next(f for f in cluster.flows if cached_backend(lb, f) is not None)
    flows = [mine, UNKNOWN_FLOW]
    cached = [cached_backend(lb, f) for f in flows]
    # A valid backend of the VIP, other than the one the target caches.
    other = next(ref.address for ref in lb.dataplane.backends
                 if ref.active and ref.id != cached[0])
    stores, stats = cluster.stores(), cluster.peer_stats()
    unsolicited = lb.cluster.counters["answers_unsolicited"]
    for flow in flows:
        answer = record(flow, str(other), cluster.held.version + 1)
        cluster.inject(cluster.message(MessageType.STATE_ANSWER, (answer,)),
                       cluster.address("lb2"))
    assert lb.cluster.counters["answers_unsolicited"] - unsolicited == len(flows)
    assert delta(stats, cluster.peer_stats()) == {"accepted": len(flows)}
    assert [cached_backend(lb, f) for f in flows] == cached
    assert cluster.stores() == stores
    assert_workers_sound(cluster.tb)


def waiting_flow(c: Cluster) -> traffic.Flow:
    """A flow nobody carries, of a moved bucket the target owns."""
    lb = c.target
    for sport in range(1, 1024):
        flow = traffic.Flow("web", 6, str(UNKNOWN_FLOW.src), sport, testbed.VIP, 80)
        cls = lb.dataplane.classify(flow.key())
        if cls.moved and lb.cluster.holders(lb.cluster._table_size(cls.vip),
                                            cls.bucket)[0] == TARGET:
            return flow
    raise AssertionError("no such flow: pick another client address")


def test_only_a_genuine_carrier_reply_decides_a_waiting_flow(cluster):
    """The target owns a flow it has no state for and waits for the members'
    replies (theirs are lost on the way). Forged, foreign and replayed
    replies naming another backend than rule 4's are dropped and counted,
    and the flow goes on waiting; the genuine one decides it."""
    tb, lb = cluster.tb, cluster.target
    flow = waiting_flow(cluster)
    kb = flow.key().to_bytes()
    tb.lose(TARGET, MessageType.CARRIER_REPLY)
    testbed.set_cluster(lb, decision_delay_ms=2000, request_timeout_ms=5000)
    tb.set_router([TARGET])
    tb.send_unsettled([flow], "PA")
    for _ in range(5):
        tb.step()
    assert kb in lb.cluster.undecided
    cls = lb.dataplane.classify(flow.key())
    other = next(ref.address for ref in lb.dataplane.backends
                 if ref.active and ref.address != cls.previous.address)
    genuine = record(flow.key(), str(other), cluster.held.version)
    reply = lambda rec, **kw: cluster.message(MessageType.CARRIER_REPLY, (rec,), **kw)  # noqa: E731
    refused = [
        (reply(genuine, key=OTHER_KEY), cluster.address("lb2"), {"bad_mac": 1}),
        (reply(genuine), STRANGER, {"spoofed": 1}),
        (reply(genuine, sender="lb3"), cluster.address("lb2"), {"spoofed": 1}),
        (reply(record(flow.key(), FOREIGN_BACKEND, cluster.held.version)),
         cluster.address("lb2"), {"accepted": 1, "bad_backend": 1}),
    ]
    for payload, src, counted in refused:
        stats = cluster.peer_stats()
        cluster.inject(payload, src, settle=False)
        assert delta(stats, cluster.peer_stats()) == counted
        assert kb in lb.cluster.undecided and lb.cluster.store.get(kb) is None

    accepted = reply(genuine)
    cluster.inject(accepted, cluster.address("lb2"), settle=False)
    assert kb not in lb.cluster.undecided
    assert lb.cluster.store.get(kb) == genuine
    assert lb.cluster.counters["carrier_state_adopted"] == 1
    tb.settle()
    assert set(tb.received.by_flow[testbed._fkey(flow)]) == {str(other)}

    stats = cluster.peer_stats()
    cluster.inject(accepted, cluster.address("lb2"))
    assert delta(stats, cluster.peer_stats()) == {"replayed": 1}
    assert_workers_sound(tb)


def test_a_record_of_another_workers_flow_changes_nothing(cluster):
    """With several worker processes each keeps its own flows' state: a
    record for a flow of another worker's lane (a peer that grouped records
    wrongly) is refused and counted, never kept by the wrong one."""
    target = cluster.target
    rec = cluster.tempting()
    flow_id = target.dataplane.flow_id(rec.key)
    lanes = 2
    target.lane_count, target.lane = lanes, (peer.lane_key(flow_id) + 1) % lanes
    try:
        stats, stores = cluster.peer_stats(), cluster.stores()
        cluster.inject(cluster.message(MessageType.STATE_PUSH, (rec,)), cluster.address("lb2"))
        assert delta(stats, cluster.peer_stats()) == {"accepted": 1, "wrong_lane": 1}
        assert cluster.stores() == stores
    finally:
        target.lane_count, target.lane = 1, 0
