"""A balancer that joins while backend changes are in force learns the tables
in force from the members (pylb/history.py; HISTORY_REQUEST and
HISTORY_ANSWER in docs/peer-protocol.md), so no --previous-config is needed:
flows older than the changes keep their backend when the router moves them
to it. Until it has learnt them it decides nothing that depends on them; with
no answer, it goes on with every bucket stateful."""
from __future__ import annotations

import dataclasses
import ipaddress
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pylb import history, peer, testbed
from pylb.peer import BucketGroup, HistoryBackend, HistoryPart, Message, MessageType

pytestmark = pytest.mark.dpdk

MEMBERS = ["lb1", "lb2", "lb3"]
BACKENDS = [f"b-{i}" for i in range(1, 7)]
CHANGES = {"one change": [BACKENDS[1:5]],
           "two changes": [BACKENDS[1:5], ["b-2", "b-3", "b-5", "b-6"]]}
KEY = bytes.fromhex(testbed.KEY)


def tables_in_force(lb) -> dict[str, dict[int, str | None]]:
    """Per VIP, each stateful bucket's previous backend, by address (backend
    ids are each balancer's own)."""
    dp = lb.dataplane
    return {vip: {b: str(dp.backends[h.previous[b]].address)
                  if h.previous[b] < len(dp.backends) else None for b in h.stateful}
            for vip, h in dp.history.items()}


def _established(changes: list[list[str]]):
    """A Testbed whose flows started on lb1 before the changes (on the old
    backends), and those flows."""
    tb = testbed.Testbed(MEMBERS, BACKENDS[:4])
    flows = testbed.flows(400, seed=5)
    tb.set_router(["lb1"])
    tb.send(flows, "S")
    tb.send(flows, "PA")
    for backends in changes:
        tb.set_backends(backends)
        tb.send(flows, "PA")
    return tb, flows


def _moved_to_the_joiner(tb, flows) -> tuple[int, int]:
    """The router sends every flow to lb4. Returns (broken, lost)."""
    tb.set_router(["lb4"])
    tb.send(flows, "PA")
    tb.send(flows, "FA")
    return tb.broken(flows), tb.lost(flows)


@pytest.mark.parametrize("changes", list(CHANGES.values()), ids=list(CHANGES))
@pytest.mark.parametrize("learnt_first", [True, False],
                         ids=["learnt, then flows moved", "flows moved while it learns"])
def test_a_joiner_learns_the_tables_in_force_and_no_flow_breaks(eal, changes, learnt_first):
    tb, flows = _established(changes)
    with tb:
        tb.add_balancer("lb4", join_router=False)      # no previous configuration
        lb4 = tb.lbs["lb4"]
        if learnt_first:
            tb.settle()
            assert tables_in_force(lb4) == tables_in_force(tb.lbs["lb1"])
        assert _moved_to_the_joiner(tb, flows) == (0, 0)
        c = lb4.cluster.counters
        assert c["history_answers_taken"] >= 1 and c["history_unanswered"] == 0
        assert (c["history_held_packets"] > 0) == (not learnt_first)
        assert lb4.cluster.history.known and not lb4.cluster.history.learning


@pytest.mark.parametrize("changes", list(CHANGES.values()), ids=list(CHANGES))
def test_without_the_tables_in_force_older_flows_break(eal, changes):
    """The control: a joiner that treats the changes it missed as stable
    (given only the current configuration, as `--previous-config` with too
    little history was) breaks the older flows in moved buckets."""
    tb, flows = _established(changes)
    with tb:
        tb.add_balancer("lb4", join_router=False, previous=[tb.config("lb1")])
        assert tables_in_force(tb.lbs["lb4"]) == {}
        broken, _ = _moved_to_the_joiner(tb, flows)
        assert broken > 0


def test_a_joiner_without_an_answer_breaks_no_flow_and_says_so(eal):
    """Every answer to lb4 is lost: it holds what it cannot decide until the
    bound, counts and logs it, then goes on with every bucket stateful (its
    misses ask the owners)."""
    tb, flows = _established(CHANGES["two changes"])
    with tb:
        tb.lose("lb4", MessageType.HISTORY_ANSWER)
        started = time.monotonic()
        tb.add_balancer("lb4", join_router=False)
        assert _moved_to_the_joiner(tb, flows) == (0, 0)
        lb4 = tb.lbs["lb4"]
        c = lb4.cluster.counters
        assert c["history_unanswered"] == 1
        assert c["history_requests_sent"] == history.TRIES * 3      # every try, every member
        assert c["history_held_packets"] > 0
        bound = history.FIRST_WAIT_S * (2 ** history.TRIES - 1)
        assert time.monotonic() - started >= bound
        assert not lb4.cluster.history.known
        assert all(h.flags == b"\x01" * len(h.flags) for h in lb4.dataplane.history.values())


def test_the_first_balancer_of_a_cluster_starts_at_once(eal):
    """Nobody to ask: nothing held, nothing asked."""
    with testbed.Testbed(["lb1"], BACKENDS[:4]) as tb:
        lb1 = tb.lbs["lb1"]
        assert not lb1.cluster.history.learning and lb1.cluster.history.known
        flows = testbed.flows(100, seed=2)
        tb.send(flows, "S")
        tb.send(flows, "PA")
        assert (tb.broken(flows), tb.lost(flows)) == (0, 0)
        assert lb1.cluster.counters["history_requests_sent"] == 0
        assert lb1.cluster.counters["history_held_packets"] == 0


def test_members_that_start_together_learn_that_nothing_is_in_force(eal):
    """Every member asked answers that it does not know either: the cluster
    starts, and each goes on with its own configuration's tables at once."""
    with testbed.Testbed(MEMBERS, BACKENDS[:4]) as tb:
        tb.settle()
        for name in MEMBERS:
            node = tb.lbs[name].cluster
            assert node.history.known and not node.history.learning
            assert node.counters["history_none_known"] == 1
            assert node.counters["history_unanswered"] == 0
            assert tb.lbs[name].dataplane.history == {}


# ------------------------------------------------------------------ security
# History messages are peer messages: the acceptance rules hold for them.
# lb4 has asked lb1 (its answers are lost on the way, so it has not learnt):
# a forged, spoofed, malformed or unsolicited answer must change nothing; a
# genuine one does (the control case).

TEMPTING_BUCKETS = (0, 1, 2, 3)


class Joiner:
    def __init__(self, tb: testbed.Testbed):
        self.tb = tb
        tb.lose("lb4", MessageType.HISTORY_ANSWER)
        tb.add_balancer("lb4", join_router=False)
        for _ in range(3):
            tb.step()                   # lb4 asks; the answers are lost
        self.lb4 = tb.lbs["lb4"]
        self.asked = max(s for s, (n, _) in self.lb4.cluster.history._asked.items()
                         if n == "lb1")

    def answer(self, part: HistoryPart | None = None, sender: str = "lb1",
               key: bytes | None = KEY, seq: int | None = None) -> bytes:
        """A complete answer naming TEMPTING_BUCKETS stateful."""
        vip = self.tb.lbs[sender].configured.vips[0]
        part = part or HistoryPart(
            self.asked, 0, 1, vip=vip.address, proto=6, port=80, table_size=vip.table_size,
            backends=tuple(HistoryBackend(b.address, b.name, b.weight, True)
                           for b in vip.backends),
            groups=(BucketGroup(0, 1000, TEMPTING_BUCKETS),))
        node = self.tb.lbs[sender].cluster
        msg = Message(MessageType.HISTORY_ANSWER, peer.balancer_id(sender), node.view,
                      node._next_seq() if seq is None else seq, part=part)
        return peer.encode(msg, key)

    def inject(self, payload: bytes, src: str = "lb1", to: str = "lb4") -> None:
        lb = self.tb.lbs[to]
        port = lb.config.cluster.peer_port
        address = testbed.lb_address(self.tb.index[src]) if src in self.tb.index else src
        frame = (Ether(dst=lb.port.mac, src=testbed.GATEWAY_MAC)
                 / IP(src=address, dst=testbed.lb_address(self.tb.index[to]))
                 / UDP(sport=port, dport=port) / Raw(payload))
        assert lb.port.inject([bytes(frame)]) == 1
        for _ in range(3):
            self.tb.step()

    def state(self) -> tuple:
        node = self.lb4.cluster
        return (self.lb4.generation, node.history.known, tables_in_force(self.lb4).keys(),
                {vip: h.flags for vip, h in self.lb4.dataplane.history.items()})


def _resigned(datagram: bytes) -> bytes:
    import hashlib
    import hmac
    signed = datagram[:-peer.MAC_LEN]
    return signed + hmac.new(KEY, signed, hashlib.sha256).digest()[:peer.MAC_LEN]


def _bucket_past_the_table(j: Joiner) -> bytes:
    # The last 4 bytes before the MAC are the last bucket: 65537 is past it.
    good = j.answer()
    at = len(good) - peer.MAC_LEN - 4
    return _resigned(good[:at] + (65537).to_bytes(4, "big") + good[at + 4:])


def _truncated(j: Joiner) -> bytes:
    good = j.answer()[:-peer.MAC_LEN]
    short = good[:-4]
    header = bytearray(short[:peer.HEADER_LEN])
    header[34:36] = (len(short) - peer.HEADER_LEN).to_bytes(2, "big")
    return _resigned(bytes(header) + short[peer.HEADER_LEN:] + bytes(peer.MAC_LEN))


def _unknown_part_flag(j: Joiner) -> bytes:
    good = bytearray(j.answer())
    good[peer.HEADER_LEN + 12] |= 0x80
    return _resigned(bytes(good))


FORGED = {
    # case: (datagram, source, the counter that moves)
    "wrong key": (lambda j: j.answer(key=bytes(reversed(KEY))), "lb1", "bad_mac"),
    "no HMAC": (lambda j: j.answer(key=None), "lb1", "bad_mac"),
    "from a stranger": (lambda j: j.answer(), "203.0.113.77", "spoofed"),
    "lb1's id from lb2": (lambda j: j.answer(), "lb2", "spoofed"),
    "a bucket past the table": (_bucket_past_the_table, "lb1", "malformed"),
    "truncated": (_truncated, "lb1", "malformed"),
    "an unknown part flag": (_unknown_part_flag, "lb1", "malformed"),
    "answers no request": (lambda j: j.answer(dataclasses.replace(
        _tempting(j), answers=j.asked + 10**6)), "lb1", None),
    "from a member not asked with that seq": (lambda j: j.answer(sender="lb2"), "lb2", None),
}


def _tempting(j: Joiner) -> HistoryPart:
    return peer.decode(j.answer(), KEY).part


@pytest.fixture
def joiner(eal):
    tb, _ = _established(CHANGES["one change"])
    with tb:
        yield Joiner(tb)


@pytest.mark.parametrize("case", list(FORGED), ids=list(FORGED))
def test_a_bad_history_answer_changes_nothing(joiner, case):
    build, src, counter = FORGED[case]
    before, stats = joiner.state(), joiner.lb4.cluster.peer_stats.as_dict()
    ignored = joiner.lb4.cluster.counters["history_answers_ignored"]
    joiner.inject(build(joiner), src)
    assert joiner.state() == before
    after = joiner.lb4.cluster.peer_stats.as_dict()
    if counter is not None:
        assert after[counter] == stats[counter] + 1
        assert after["accepted"] == stats["accepted"]
    else:
        assert joiner.lb4.cluster.counters["history_answers_ignored"] == ignored + 1


def test_a_genuine_answer_is_taken_and_its_replay_changes_nothing(joiner):
    """The control for the cases above, and rule 4 (replay)."""
    datagram = joiner.answer()
    joiner.inject(datagram)
    assert joiner.lb4.cluster.history.known
    assert set(tables_in_force(joiner.lb4)["web"]) == set(TEMPTING_BUCKETS)
    before, replayed = joiner.state(), joiner.lb4.cluster.peer_stats.replayed
    joiner.inject(datagram)
    assert joiner.state() == before
    assert joiner.lb4.cluster.peer_stats.replayed == replayed + 1


@pytest.mark.parametrize("case", ["wrong key", "from a stranger", "replayed"])
def test_a_bad_history_request_is_not_answered(joiner, case):
    lb1 = joiner.tb.lbs["lb1"]
    node = joiner.lb4.cluster
    node.history.asking = False     # lb4's own retries would be answered meanwhile
    for _ in range(5):
        joiner.tb.step()            # and those on their way are
    genuine = peer.encode(Message(MessageType.HISTORY_REQUEST, peer.balancer_id("lb4"),
                                  node.view, node._next_seq()), KEY)
    if case == "replayed":
        joiner.inject(genuine, src="lb4", to="lb1")
    received = lb1.cluster.counters["history_requests_received"]
    sent = lb1.cluster.counters["sent_history_answer"]
    stats = lb1.cluster.peer_stats.as_dict()
    reason = {"wrong key": "bad_mac", "from a stranger": "spoofed", "replayed": "replayed"}[case]
    payload = {"wrong key": peer.encode(Message(MessageType.HISTORY_REQUEST,
                                                peer.balancer_id("lb4"), node.view,
                                                node._next_seq()), bytes(32)),
               "from a stranger": genuine, "replayed": genuine}[case]
    joiner.inject(payload, src="203.0.113.77" if case == "from a stranger" else "lb4", to="lb1")
    assert lb1.cluster.counters["history_requests_received"] == received
    assert lb1.cluster.counters["sent_history_answer"] == sent
    assert lb1.cluster.peer_stats.as_dict()[reason] == stats[reason] + 1


def test_history_answers_round_trip_in_parts_that_fit_the_mtu():
    """An answer of many stateful buckets and backends splits into parts
    that each fit a datagram, and puts itself together again."""
    backends = tuple(HistoryBackend(ipaddress.ip_address(f"10.0.{i // 250}.{i % 250 + 1}"),
                                    f"backend-{i}", 1 + i % 3, i < 150) for i in range(200))
    groups = (BucketGroup(0, 5, tuple(range(0, 65537, 2))),
              BucketGroup(peer.NO_PREVIOUS, 7, (1, 3)), BucketGroup(199, 9, (5, 65535)))
    vip = history.VipAnswer(ipaddress.ip_address("192.0.2.10"), 6, 80, 65537, backends, groups)
    room = peer.payload_room(1500, 6, keyed=True)
    parts = history.parts(42, [vip, dataclasses.replace(vip, port=443)], room)
    assert all(p.wire_len <= room for p in parts)
    datagrams = [peer.encode(Message(MessageType.HISTORY_ANSWER, 1, peer.View(1, 2, 3), i,
                                     part=p), KEY) for i, p in enumerate(parts)]
    assert all(len(d) + 40 + 8 <= 1500 for d in datagrams)
    back = history.assemble([peer.decode(d, KEY).part for d in reversed(datagrams)])

    def buckets(v):
        return sorted((g.previous, g.age_ms, b) for g in v.groups for b in g.buckets)
    assert [v.backends for v in back] == [backends, backends]
    assert [buckets(v) for v in back] == [buckets(vip)] * 2
    with pytest.raises(ValueError):
        history.assemble([peer.decode(d, KEY).part for d in datagrams[1:]])
