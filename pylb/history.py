"""The tables in force, learnt from the members: how a balancer that joins a
cluster while a backend change is in force gets the stateful buckets and
their previous backends (docs/state-exchange.md, "Joining while a change is
in force"; HISTORY_REQUEST and HISTORY_ANSWER in docs/peer-protocol.md).

A member's tables in force are its current backend list per VIP (its
current table is Maglev's of it) and its history: the stateful buckets, each
with its previous backend and the age of its last move. That is what it
answers, and all the joiner needs: it rebuilds the member's tables, then
takes its own configuration as a change on top of them, as any balancer
does at a reconfiguration (pylb/dataplane.py). Where its configuration is the
member's, nothing moves and the member's history is taken as it is; where it
is newer (configuration reaches balancers one by one), its change adds its
moved buckets, as it did on the members that have it already.

Until it has learnt the history the joiner decides nothing that depends on
it: every bucket is stateful (a miss is punted, not forwarded by the table),
its punts stay held, its new flows' notices wait, and so do the peer
messages whose handling depends on the tables. The first answer ends that.
Members that answer later add what the first lacked: the union of their
stateful buckets (a bucket kept stateful longer is safe; one treated as
stable too early breaks its older flows). No answer within the bound: the
joiner goes on with every bucket stateful, so its misses ask the owners,
and keeps asking, less often.
"""
from __future__ import annotations

import time
from array import array
from dataclasses import dataclass

import structlog

from pylb import config as config_mod
from pylb import peer
from pylb.dataplane import NO_BACKEND, Dataplane, VipHistory
from pylb.peer import BucketGroup, HistoryBackend, HistoryPart, MessageType
from pylb.worker import Action, Verdict

log = structlog.get_logger("pylb.history")

FIRST_WAIT_S = 0.1        # first wait for an answer; doubles per try
TRIES = 5                 # 0.1 + 0.2 + 0.4 + 0.8 + 1.6: the bound is 3.1 s
LATER_INTERVAL_S = 10.0   # once the bound passed: how often it asks again
MAX_DEFERRED = 20_000     # peer messages kept while learning; later ones are dropped
MAX_HELD = 50_000         # packets and notices kept while learning; later packets are dropped
MAX_ASSEMBLIES = 64       # answers being put together from their parts
ANSWER_WINDOW_S = 10.0    # how long the answer to a request is taken
# Handled at once while learning: their handling does not depend on the
# tables (a carrier query is answered from the store and the flow cache).
_NOT_DEFERRED = frozenset({MessageType.HISTORY_REQUEST, MessageType.HISTORY_ANSWER,
                           MessageType.CARRIER_QUERY})


@dataclass(frozen=True)
class VipAnswer:
    """One VIP of an answer, its parts put together."""

    address: object
    proto: int
    port: int
    table_size: int
    backends: tuple[HistoryBackend, ...]
    groups: tuple[BucketGroup, ...]


def wanted(config) -> bool:
    """Whether a balancer starting with this configuration (and no previous
    one given) has members to learn the tables in force from."""
    c = config.cluster
    return c is not None and c.state_exchange and \
        any(m.name != config.balancer.name for m in c.balancers)


# ------------------------------------------------------------ the answerer's side


def snapshot(dp: Dataplane, now: float) -> list[VipAnswer]:
    """The tables in force of a dataplane, per VIP."""
    out = []
    for vip in dp.config.vips:
        entries = [HistoryBackend(b.address, b.name, b.weight, True) for b in vip.backends]
        index = {(b.name, b.address): i for i, b in enumerate(entries)}
        # Every backend the VIP has had here, not only the tables' previous
        # ones: a flow that started on a backend since removed may still be
        # on it, and a joiner must take its state (protocol rule 5).
        for ref in dp.backends:
            if ref.vip == vip.name and (ref.name, ref.address) not in index:
                index[(ref.name, ref.address)] = len(entries)
                entries.append(HistoryBackend(ref.address, ref.name, 0, False))
        by_class: dict[tuple[int, float], list[int]] = {}
        h = dp.history.get(vip.name)
        for bucket in h.stateful if h else ():
            prev = h.previous[bucket]
            slot = peer.NO_PREVIOUS
            if prev != NO_BACKEND:
                ref = dp.backends[prev]
                slot = index.get((ref.name, ref.address))
                if slot is None:
                    slot = index[(ref.name, ref.address)] = len(entries)
                    entries.append(HistoryBackend(ref.address, ref.name, 0, False))
            by_class.setdefault((slot, h.moved_at[bucket]), []).append(bucket)
        groups = tuple(BucketGroup(slot, min(0xFFFFFFFF, max(0, int((now - at) * 1000))),
                                   tuple(buckets))
                       for (slot, at), buckets in sorted(by_class.items()))
        out.append(VipAnswer(vip.address, vip.protocol_number, vip.port or 0, vip.table_size,
                             tuple(entries), groups))
    return out


def parts(answers: int, vips: list[VipAnswer], room: int) -> list[HistoryPart]:
    """The answer in parts whose wire_len is at most room bytes each."""
    chunks: list[tuple[VipAnswer | None, list, list]] = []
    for v in vips:
        chunk = (v, [], [])
        used = peer.HISTORY_PART_LEN
        for item in v.backends + v.groups:
            for piece in _split(item, room - used, room - peer.HISTORY_PART_LEN):
                if used + piece.wire_len > room:
                    chunks.append(chunk)
                    chunk, used = (v, [], []), peer.HISTORY_PART_LEN
                chunk[1 if isinstance(piece, HistoryBackend) else 2].append(piece)
                used += piece.wire_len
        chunks.append(chunk)
    if not chunks:
        chunks.append((None, [], []))
    return [HistoryPart(answers, i, len(chunks), vip=v.address if v else None,
                        proto=v.proto if v else 0, port=v.port if v else 0,
                        table_size=v.table_size if v else 0, backends=tuple(b), groups=tuple(g))
            for i, (v, b, g) in enumerate(chunks)]


def _split(item, first_room: int, room: int):
    """A bucket group cut to fit what is left of this part, then whole parts."""
    if isinstance(item, HistoryBackend) or item.wire_len <= first_room:
        yield item
        return
    per = max(1, (first_room - peer.HISTORY_GROUP_LEN) // 4)
    buckets = item.buckets
    while buckets:
        yield BucketGroup(item.previous, item.age_ms, buckets[:per])
        buckets = buckets[per:]
        per = (room - peer.HISTORY_GROUP_LEN) // 4


# ------------------------------------------------------------ the joiner's side


def assemble(received: list[HistoryPart]) -> list[VipAnswer] | None:
    """An answer from all its parts (in any order): None for an unknown one.
    ValueError where the parts do not make one answer."""
    received = sorted(received, key=lambda p: p.part)
    if [p.part for p in received] != list(range(received[0].parts)):
        raise ValueError("parts missing or repeated")
    if received[0].unknown:
        return None
    vips: dict[tuple, tuple[list, list]] = {}
    for p in received:
        if p.vip is None:
            continue
        backends, groups = vips.setdefault((p.vip, p.proto, p.port, p.table_size), ([], []))
        backends += p.backends
        groups += p.groups
    out = []
    for (address, proto, port, size), (backends, groups) in vips.items():
        if any(g.previous != peer.NO_PREVIOUS and g.previous >= len(backends) for g in groups):
            raise ValueError("a bucket group names no backend entry")
        if not any(b.current for b in backends):
            raise ValueError("a VIP without a current backend")
        out.append(VipAnswer(address, proto, port, size, tuple(backends), tuple(groups)))
    return out


def compose(config, generation: int, registry, answer: list[VipAnswer], base: Dataplane,
            base_first: bool, now: float) -> Dataplane:
    """This balancer's dataplane after an answer: the member's tables
    rebuilt, this configuration taken as a change on top of them, and the
    stateful buckets of `base` kept (the history this balancer knew: an
    earlier answer's and the changes since, or those it saw while it
    learnt): the union. base_first: where both name a bucket, base's
    previous backend stands (else the answer's)."""
    member_vips, learnt = [], {}
    for vip in config.vips:
        theirs = _matching(answer, vip)
        if theirs is None:
            member_vips.append(vip)
            continue
        member_vips.append(vip.model_copy(update={"backends": [
            config_mod.Backend(name=b.name, address=b.address, weight=b.weight)
            for b in theirs.backends if b.current]}))
        for b in theirs.backends:       # known here too: their flows' state is taken
            registry.id_for(vip.name, b.name, b.address)
        learnt[vip.name] = _vip_history(vip, theirs, registry, now)
    member = Dataplane(config.model_copy(update={"vips": member_vips}), generation, registry,
                       learnt=learnt, now=now)
    try:
        dp = Dataplane(config, generation, registry, previous=member, now=now)
    finally:
        member.close()
    mine = base.known_history
    if not mine:
        return dp
    union = {}
    for name in set(mine) | set(dp.history):
        if name in dp.ids:
            a, b = mine.get(name), dp.history.get(name)
            union[name] = _union(a, b) if base_first else _union(b, a)
    merged = Dataplane(config, generation, registry, current=dp.tables, learnt=union, now=now)
    dp.close()
    return merged


def _matching(answer: list[VipAnswer], vip) -> VipAnswer | None:
    for v in answer:
        if (v.address, v.proto, v.port) == (vip.address, vip.protocol_number, vip.port or 0):
            if v.table_size != vip.table_size:
                # Another table size rehashes every flow: no bucket maps to an old one.
                log.warning("history: a member's table size differs; the VIP's history is not "
                            "taken", vip=vip.name, theirs=v.table_size, ours=vip.table_size)
                return None
            return v
    return None


def _vip_history(vip, theirs: VipAnswer, registry, now: float) -> VipHistory | None:
    """The member's history of a VIP under this balancer's backend ids: a
    backend keeps its (VIP, name, address) identity, as every balancer's
    registry does, so one that left the configuration gets an id of its own."""
    if not theirs.groups:
        return None
    ids = [registry.id_for(vip.name, b.name, b.address) for b in theirs.backends]
    flags = bytearray(vip.table_size)
    previous = array("I", [NO_BACKEND]) * vip.table_size
    moved_at = array("d", [0.0]) * vip.table_size
    for g in theirs.groups:
        prev = NO_BACKEND if g.previous == peer.NO_PREVIOUS else ids[g.previous]
        for b in g.buckets:
            flags[b], previous[b], moved_at[b] = 1, prev, now - g.age_ms / 1000.0
    return VipHistory(bytes(flags), previous, moved_at)


def _union(a: VipHistory | None, b: VipHistory | None) -> VipHistory | None:
    """Stateful where either is; a bucket stateful in a keeps a's previous
    backend and the later of the two moves."""
    if a is None or b is None:
        return a or b
    if len(a.flags) != len(b.flags):
        return b        # a table size changed: nothing of a maps to b's buckets
    flags = bytes(x | y for x, y in zip(a.flags, b.flags))
    previous = array("I", (pa if fa else pb for pa, pb, fa in zip(a.previous, b.previous,
                                                                  a.flags)))
    moved_at = array("d", (max(x, y) for x, y in zip(a.moved_at, b.moved_at)))
    return VipHistory(flags, previous, moved_at)


class HistoryExchange:
    """One ClusterNode's part: worker 0 of a joiner asks and learns (every
    worker holds its own traffic until worker 0 tells it the history,
    pylb/lanes.py); worker 0 of any balancer answers."""

    def __init__(self, node, learning: bool):
        self.node = node
        self.learning = learning      # holding traffic until the history is learnt
        self.known = not learning     # this balancer's tables in force are the cluster's
        self.asking = learning and node.lb.lane == 0   # sends requests (worker 0 alone)
        self._asked: dict[int, tuple[str, float]] = {}   # request seq -> (member, sent at)
        self._tries = 0
        self._next_try = time.monotonic()
        self._parts: dict[tuple[str, int], dict[int, HistoryPart]] = {}
        self._unknown_from: set[str] = set()
        self._held: list = []           # punts held in the worker, and new flows' notices
        self._deferred: list = []       # (sender, message) kept while learning
        if learning and self.asking:
            log.info("learning the tables in force from the members: traffic that depends "
                     "on them waits")

    # -------------------------------------------------------- asking

    def _members(self) -> list[str]:
        return [n for n in self.node.members if n != self.node.name]

    def tick(self, now: float) -> None:
        if not self.asking or now < self._next_try:
            return
        if self._tries >= TRIES and self.learning:
            self._give_up()
            self._next_try = now + LATER_INTERVAL_S
            return
        self._tries += 1
        wait = FIRST_WAIT_S * 2 ** min(self._tries - 1, TRIES - 1)
        self._next_try = now + (wait if self.learning else LATER_INTERVAL_S)
        self._ask()

    def _ask(self) -> None:
        node = self.node
        for name in self._members():
            seq = node._next_seq()
            msg = peer.Message(MessageType.HISTORY_REQUEST, peer.balancer_id(node.name),
                               node.view, seq, sender_lane=node.lb.lane)
            try:
                node.lb.worker.send_peer(node._address(name), peer.encode(msg, node.key))
            except Exception as exc:      # a next hop not resolved yet: the retry sends it
                node.counters["send_failed"] += 1
                log.debug("history request not sent", target=name, error=str(exc))
                continue
            self._asked[seq] = (name, time.monotonic())
            node.counters["history_requests_sent"] += 1
            node.counters["history_retries"] += self._tries > 1

    def _give_up(self) -> None:
        """The bound passed without an answer that says what is in force."""
        self.node.counters["history_unanswered"] += 1
        log.warning("no member answered with the tables in force: every bucket stays stateful "
                    "(misses ask the owners) and the members are asked again every "
                    f"{LATER_INTERVAL_S:.0f} s; --previous-config gives them at start",
                    tries=self._tries, asked=sorted(self._members()))
        self.node.lb.learn_history(None, joined=True)

    def on_answer(self, sender: str, msg) -> bool | None:
        part = msg.part
        asked = self._asked.get(part.answers)
        if asked is None or asked[0] != sender or time.monotonic() - asked[1] > ANSWER_WINDOW_S:
            # Not to a request of this balancer's to the sender, or late.
            self.node.counters["history_answers_ignored"] += 1
            return None
        key = (sender, part.answers)
        got = self._parts.setdefault(key, {})
        if got and next(iter(got.values())).parts != part.parts:
            self.node.peer_stats.count("malformed")
            return False
        got[part.part] = part
        while len(self._parts) > MAX_ASSEMBLIES:
            del self._parts[next(iter(self._parts))]
        if len(got) < part.parts:
            return None
        del self._parts[key]
        del self._asked[part.answers]
        try:
            answer = assemble(list(got.values()))
        except ValueError as err:
            self.node.counters["history_refused"] += 1
            log.warning("history answer refused", sender=sender, error=str(err))
            return None
        self._learn_from(sender, answer)
        return None

    def _learn_from(self, sender: str, answer: list[VipAnswer] | None) -> None:
        node = self.node
        if answer is None:
            # The answerer is learning too. Everyone asked is: the cluster starts.
            self._unknown_from.add(sender)
            if not self.known and self._unknown_from >= set(self._members()):
                node.counters["history_none_known"] += 1
                log.info("no member knows tables in force (the cluster starts): going on "
                         "with this configuration's")
                self.asking = False
                node.lb.learn_history([])
            return
        node.counters["history_answers_taken"] += 1
        log.info("tables in force learnt" if self.learning else "tables in force: another "
                 "member's stateful buckets added", member=sender,
                 stateful_buckets=sum(len(g.buckets) for v in answer for g in v.groups))
        # No more requests; answers to those out (the other members') add theirs.
        self.asking = False
        node.lb.learn_history(answer, joined=self.learning)

    @property
    def unsure(self) -> bool:
        """Past the bound without the tables in force: every bucket is
        stateful, and the members decide (the join transition lasts)."""
        return not self.known and not self.learning

    # -------------------------------------------------------- answering

    def on_request(self, sender: str, msg) -> None:
        node = self.node
        node.counters["history_requests_received"] += 1
        if not self.known:
            answer = [HistoryPart(msg.seq, 0, 1, unknown=True)]
        else:
            room = peer.payload_room(node._peer_mtu(), node._address(sender).version,
                                     node.key is not None)
            answer = parts(msg.seq, snapshot(node.lb.dataplane, time.monotonic()), room)
        node.send_parts(sender, answer)
        node.counters["history_answer_parts_sent"] += len(answer)

    # -------------------------------------------------------- holding while learning

    def defers(self, sender: str, msg) -> bool:
        """Keeps a message whose handling depends on the tables until they
        are learnt. True when kept (or dropped: too many kept)."""
        if not self.learning or msg.type in _NOT_DEFERRED:
            return False
        if len(self._deferred) >= MAX_DEFERRED:
            self.node.counters["history_deferred_dropped"] += 1
        else:
            self._deferred.append((sender, msg))
            self.node.counters["history_deferred"] += 1
        return True

    def hold(self, punt):
        """A punt while learning: a new flow's notice waits; a packet is kept
        here (the worker swaps no tables while it holds packets) and its slot
        released. Returns the verdict for the worker."""
        if punt.slot is None:
            self._held.append((punt, None))
            return None
        if len(self._held) >= MAX_HELD:
            self.node.counters["history_held_dropped"] += 1
            return Verdict(punt.slot, Action.DROP)
        self._held.append((punt, self.node._held_ip(punt.slot)))
        self.node.counters["history_held_packets"] += 1
        return Verdict(punt.slot, Action.PEER)

    def learnt(self, history_known: bool) -> tuple[list, list]:
        """Learning is over: the punts held and the messages kept, to decide
        and handle now, in order."""
        self.learning = False
        self.known = self.known or history_known
        held, self._held = self._held, []
        deferred, self._deferred = self._deferred, []
        return held, deferred
