"""Flow ownership and state exchange between balancers: the miss path
(docs/state-exchange.md, rules 1-6 of the design; wire format in
docs/peer-protocol.md).

A ClusterNode lives beside one Balancer. The fast path hands it:
- MOVED / UDP_MOVED punts: a packet of a flow with no local state in a moved
  bucket. The owner decides; any other balancer sends the packet itself to the
  owner (STATE_REQUEST) and caches the answer.
- NEW_STATE notices: a new flow in a moved bucket, cached here; its state is
  pushed, batched, to the bucket's owner and backup.
Peer-protocol datagrams arrive on the worker's own peer ring (on_peer_frames).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog

from pylb import packet, peer
from pylb._ffi import ffi, key_bytes, lib
from pylb.carriers import Carriers
from pylb.history import HistoryExchange
from pylb.dataplane import NO_BACKEND, Classification
from pylb.errors import Full, PylbError
from pylb.flow_cache import TimeoutClass, now_ms
from pylb.flow_id import FlowKey, flow_label, packed16
from pylb.ownership import Ownership
from pylb.peer import MessageType, StateRecord
from pylb.state_store import StateStore
from pylb.worker import Action, Punt, PuntReason, Verdict

log = structlog.get_logger("pylb.cluster")
TCP, UDP = 6, 17
FIN_RST = 0x05
AUTHORITATIVE = 1 << 63
PEER_MTU_MAX = 1968       # IP packet: fits a 2 KB mbuf and af_packet's frames
MAX_QUEUED = 100_000      # records kept per peer and kind while it cannot be reached
EXPORT_CHUNK = 1024       # cache entries copied out per call when pushing after a change
EXPORT_CHUNKS_PER_TICK = 64   # bounds the loop's pause: ~64k entries a round
CLEAN_REPEATS = 3         # rounds an owner announces a retired bucket (datagrams get lost)
CLEAN_INTERVAL_S = 1.0
MAX_UNDECIDED_PACKETS = 64   # packets of one flow kept while its owner waits for its state


@dataclass
class Pending:
    """A state request on its way: the packet is kept so a lost request or
    answer can be retried, and the fallback can still forward it."""

    key: FlowKey
    packet: bytes
    flow_id: int
    targets: list[str]          # owner, then backup
    sent_at: float
    tries: int = 1
    local: bool = False         # asked for traffic of this balancer: cache the answer
    waiters: list[str] = field(default_factory=list)   # peers whose requests wait on it
    # packet goes in requests as its headers only (too large for a request,
    # or it came so): whoever holds the packet forwards it, not the receiver.
    headers_only: bool = False
    kept: list[bytes] = field(default_factory=list)    # such packets of this balancer's


@dataclass
class Undecided:
    """A flow its owner holds no state for, given at most
    `cluster.decision_delay_ms` before rule 4: the state of a flow that has
    just started elsewhere may be on its way (pushes are batched), and rule 4
    would name the previous table's backend, wrong for a new flow in a moved
    bucket. The other balancers are asked who carries it (pylb/carriers.py)."""

    key: FlowKey
    flow_id: int
    udp: bool
    due: float
    packets: list[bytes]                                  # IP packets to forward once decided
    waiters: list[str] = field(default_factory=list)      # peers whose requests wait on it
    local: bool = False                                   # own traffic: cache the decision
    closing: bool = False                                 # a kept packet had FIN or RST
    awaiting: set[str] = field(default_factory=set)       # balancers asked, yet to reply


def _version(seen_syn: bool) -> int:
    """A new record's version (docs/peer-protocol.md): wall-clock ms, and the
    top bit for state from the balancer that saw the flow start, which beats
    an owner's rule-4 decision made before that state arrived."""
    return peer.make_version(time.time_ns() // 1_000_000, 0) | (AUTHORITATIVE if seen_syn else 0)


class ClusterNode:
    def __init__(self, lb):
        self.lb = lb
        self.name = lb.config.balancer.name
        self.counters: Counter = Counter()
        self.peer_stats = peer.PeerStats()
        self.window = peer.ReplayWindow()
        self._next_seq = peer.SeqCounter()
        t = lb.config.balancer.timeouts
        self.store = StateStore(t.tcp, t.tcp_closing, t.udp, t.other)
        self.pending: dict[bytes, Pending] = {}
        self.undecided: dict[bytes, Undecided] = {}
        # Flows this balancer forwards with exchanged state: key -> (flow id,
        # version); refreshed to their holders while they live.
        self.exchanged: dict[bytes, tuple[int, int]] = {}
        self._pushes: dict[str, list[StateRecord]] = {}
        self._answers: dict[str, list[StateRecord]] = {}    # per asker, sent by tick()
        self.carriers = Carriers(self)
        self.history = HistoryExchange(self, learning=lb.history_unknown)
        self._last_push = self._last_refresh = self._last_expire = time.monotonic()
        self.member_gen = 0
        self._ids_for = None
        self._prev_members: dict = {}
        self._prev_ownership: dict[int, Ownership] = {}
        self._transition_until = 0.0
        self._leaving: list[bytes] = []
        # After a table change: a scan of the cache for flows to push (None: none running).
        self._export_cursor: int | None = None
        self._export_buf = None
        # Retirement (docs/state-exchange.md): CLEANs heard from owners, by
        # (vip, bucket) -> when; and what this balancer announces as owner.
        self._clean_heard: dict[tuple[str, int], float] = {}
        self._announce: dict[tuple[str, int], int] = {}
        self._last_clean = time.monotonic()
        before = lb.previous_config.cluster if lb.previous_config else None
        if before is not None:
            # Started into a cluster that ran without this configuration (a
            # join): the former holders are asked first, as after any change.
            self.members = {m.name: m.address for m in before.balancers}
        self.apply_config(lb.config)

    # ------------------------------------------------------------ membership

    def apply_config(self, config) -> None:
        """Takes the cluster section of a (new) configuration. A changed
        balancer set moves ownership: state is handed to the new holders, and
        for a transition period the former holders keep their copies and are
        asked by a new owner that has no state yet (handoff may still be on
        its way: nothing assumes the cluster changes at one instant)."""
        c = config.cluster
        self.config = c
        self.key = c.key_bytes()
        members = {m.name: m.address for m in c.balancers}
        old = getattr(self, "members", None)
        changed = old is not None and set(old) != set(members)
        self.members = members
        if old is None or changed:
            self.member_gen += 1
            old_ownership = getattr(self, "_ownership", {})
            self._ownership: dict[int, Ownership] = {}
        if changed:
            self._prev_members = old
            self._prev_ownership = old_ownership
            self._transition_until = time.monotonic() + c.handoff_period
            self._handoff()
        known = {**(self._prev_members if self._in_transition() else {}), **members}
        self.by_address = _by_address(known)
        self.view = peer.view_of(members, self.member_gen, self.lb.generation)

    def _in_transition(self) -> bool:
        # A joiner that could not learn the tables in force stays in its
        # join transition: the members, who know them, decide for it.
        return time.monotonic() < self._transition_until or \
            bool(self._prev_members and self.history.unsure)

    def others(self) -> list[str]:
        """Every other balancer that may carry a flow: the members, and during
        a transition the former members (one that left still forwards the
        flows the router gave it until the router moves them)."""
        known = {**(self._prev_members if self._in_transition() else {}), **self.members}
        return [name for name in known if name != self.name]

    def ownership(self, table_size: int) -> Ownership:
        own = self._ownership.get(table_size)
        if own is None:
            own = self._ownership[table_size] = Ownership(self.members, table_size)
        return own

    def holders(self, table_size: int, bucket: int) -> list[str]:
        owner, backup = self.ownership(table_size).owners(bucket)
        return [owner] + ([backup] if backup else [])

    def former_holders(self, table_size: int, bucket: int) -> list[str]:
        """During a transition: the bucket's holders before the change."""
        if not self._in_transition():
            return []
        own = self._prev_ownership.get(table_size)
        if own is None:
            own = self._prev_ownership[table_size] = Ownership(self._prev_members, table_size)
        owner, backup = own.owners(bucket)
        return [owner] + ([backup] if backup else [])

    def _handoff(self) -> None:
        """Rule 5: state moves with ownership, to the new owner and backup.
        Copies this balancer no longer holds stay until the transition ends."""
        sent = 0
        self._leaving = []
        for rec in self.store.records():
            c = self._classify(rec.key)
            if c is None:
                continue
            size = self._table_size(c.vip)
            new = self.holders(size, c.bucket)
            old = self.former_holders(size, c.bucket)
            for holder in new:
                if holder != self.name and holder not in old:
                    self._queue(holder, rec, MessageType.HANDOFF)
                    sent += 1
            if self.name not in new:
                self._leaving.append(rec.key)
        self.counters["handoff_records"] += sent
        for key, (fid, version) in list(self.exchanged.items()):
            self._refresh_one(key, fid, version)
        self._flush(MessageType.HANDOFF)
        self._flush(MessageType.REFRESH)
        log.info("ownership moved", members=sorted(self.members), member_gen=self.member_gen,
                 handed_off=sent)

    # ------------------------------------------------------------ the miss path

    def decide(self, p: Punt, ip: bytes | None = None) -> Verdict | None:
        """ip: the packet, when it is no longer held in the worker (p.slot
        is then None; the verdict says what to do with ip)."""
        if self.history.learning:
            return self.history.hold(p)
        vip = self.lb.dataplane.vip_names[p.vip]
        size = self._table_size(vip)
        holders = self.holders(size, p.bucket)
        if p.reason == PuntReason.NEW_STATE:
            self._new_state(p, holders)
            return None
        kb = p.key
        held = self.store.get(kb)
        if kb in self.undecided:
            if held is None:
                self._wait_for_state(FlowKey.from_bytes(kb), p.flow_id, p.reason == PuntReason.UDP_MOVED,
                                     ip or self._held_ip(p.slot), local=True,
                                     closing=bool(p.tcp_flags & FIN_RST))
                return Verdict(p.slot, Action.PEER)     # kept here until decided
            # The state came by another way (a refresh): the kept packets first.
            self._decided(self.undecided.pop(kb), held)
        if held is not None and kb in self.pending:
            self._state_came_first(self.pending[kb], held)
        if held is not None:
            # Owner, backup, or a former holder: the state is here.
            self.counters["decided_from_store"] += 1
            self.exchanged[kb] = (p.flow_id, held.version)
            return Verdict(p.slot, Action.FORWARD, self._backend_id(vip, held.backend), cache=True)
        key = FlowKey.from_bytes(kb)
        # Owner, then backup, then (while ownership moves) the former holders.
        former = self.former_holders(size, p.bucket)
        targets = [h for h in dict.fromkeys(holders + former) if h != self.name]
        if holders[0] == self.name:
            targets = [h for h in self.former_holders(size, p.bucket) if h != self.name]
            if not targets and self.config.decision_delay():
                self._wait_for_state(key, p.flow_id, p.reason == PuntReason.UDP_MOVED,
                                     ip or self._held_ip(p.slot), local=True,
                                     closing=bool(p.tcp_flags & FIN_RST))
                return Verdict(p.slot, Action.PEER)     # kept here until decided
            if not targets:
                rec = self._decide_as_owner(key, p.flow_id, p.reason == PuntReason.UDP_MOVED,
                                            holders)
                if rec is None:
                    return Verdict(p.slot, Action.DROP)
                self.counters["decided_locally"] += 1
                self.exchanged[kb] = (p.flow_id, rec.version)
                return Verdict(p.slot, Action.FORWARD, self._backend_id(vip, rec.backend),
                               cache=True)
        ip = ip or self._held_ip(p.slot)
        pend = self.pending.get(kb)
        if pend is None:
            pend = self.pending[kb] = Pending(key, ip, p.flow_id, targets, time.monotonic())
        else:
            pend.packet = ip
        pend.local = True
        # Every packet of the flow goes via the owner until the answer is
        # here; one too large for a request goes as its headers and waits here.
        # Once one is kept, the later ones are too: they stay in order.
        pend.headers_only = bool(pend.kept) or not self._request_fits(ip, pend.targets)
        if not self._send_request(pend):
            return self._fallback(pend, p.slot)
        if pend.headers_only:
            self._keep(pend, ip)
        return Verdict(p.slot, Action.PEER)

    def _new_state(self, p: Punt, holders: list[str]) -> None:
        """Rule 2: a new flow in a moved bucket: its state goes to owner and backup."""
        ref = self.lb.dataplane.backends[p.backend]
        rec = StateRecord(p.key, ref.address, _version(seen_syn=True), 0, False)
        self.exchanged[rec.key] = (p.flow_id, rec.version)
        for h in holders:
            if h == self.name:
                self.store.put(rec)
            else:
                self._queue(h, rec, MessageType.STATE_PUSH)

    def _decide_as_owner(self, key: FlowKey, flow_id: int, udp_unknown: bool,
                         holders: list[str], record: bool = True,
                         c: Classification | None = None) -> StateRecord | None:
        """The owner's answer: its state, else rule 4 (TCP: the previous table,
        the rule for flows older than the change; UDP: a flow the owner has not
        seen is new, so the current table), recorded and pushed to the backup."""
        kb = key.to_bytes()
        rec = self.store.get(kb)
        if rec is not None:
            return rec
        c = c or self._classify(kb)
        if c is None:
            return None
        ref = c.current if udp_unknown else c.previous
        if ref is None:
            self.counters["no_backend"] += 1
            return None
        rec = StateRecord(kb, ref.address, _version(seen_syn=False), 0, False)
        self.counters["decided_by_previous_table" if not udp_unknown else "decided_new_udp"] += 1
        if not record:
            return rec
        self.store.put(rec)
        for h in holders:
            if h != self.name:
                self._queue(h, rec, MessageType.STATE_PUSH)
        return rec

    def _request_fits(self, ip_packet: bytes, targets: list[str]) -> bool:
        """Whether the packet fits a STATE_REQUEST to every one of targets."""
        mtu, keyed = self._peer_mtu(), self.key is not None
        addresses = (self._address(t) for t in targets)
        return all(peer.request_fits(len(ip_packet), mtu, a.version, keyed)
                   for a in addresses if a is not None)

    def _keep(self, pend: Pending, ip_packet: bytes) -> None:
        if len(pend.kept) < MAX_UNDECIDED_PACKETS:
            pend.kept.append(ip_packet)
            self.counters["requests_headers_only"] += 1
        else:
            self.counters["undecided_packets_dropped"] += 1

    def _send_request(self, pend: Pending) -> bool:
        try:
            payload = packet.ip_headers(pend.packet) if pend.headers_only else pend.packet
        except ValueError:
            return False        # no transport header to ask with: the fallback decides
        while pend.targets:
            target = pend.targets[0]
            try:
                # From the second try on, the target may have the packet: it
                # must not keep it twice while it waits for the flow's state.
                self._send(target, MessageType.STATE_REQUEST, (), payload,
                           headers_only=pend.headers_only, retry=pend.tries > 1,
                           lane_key=peer.lane_key(pend.flow_id))
                self.counters["requests_sent"] += 1
                return True
            except Exception as exc:  # unreachable next hop: try the backup
                log.debug("state request not sent", target=target, error=str(exc),
                          flow=str(pend.key), flow_id=flow_label(pend.flow_id))
                pend.targets.pop(0)
        return False

    def _fallback(self, pend: Pending, slot: int | None) -> Verdict | None:
        """Owner and backup (or the former holders) unreachable: the stated
        fallback is rule 4 taken here (TCP: the previous table; UDP: the
        current), counted, and recorded when this balancer holds the bucket."""
        kb = pend.key.to_bytes()
        self.pending.pop(kb, None)
        self.counters["fallback"] += 1
        c = self._classify(pend.key)
        holders = self.holders(self._table_size(c.vip), c.bucket) if c else []
        rec = self._decide_as_owner(pend.key, pend.flow_id, pend.key.proto == UDP, holders,
                                    record=self.name in holders) if c else None
        # Per flow, not per packet; debug, as an outage makes one for every flow.
        log.debug("owner and backup unreachable: decided here", flow=str(pend.key),
                  flow_id=flow_label(pend.flow_id),
                  backend=None if rec is None else str(rec.backend))
        if rec is None:
            self.counters["undecided_packets_dropped"] += len(pend.kept)
            return Verdict(slot, Action.DROP) if slot is not None else None
        backend = self._backend_id(c.vip, rec.backend)
        for waiter in pend.waiters:
            self._answer(waiter, rec)
        # Kept packets are older than the one in hand: they go first.
        self._settle(pend, rec, backend, cache=slot is None)   # else the verdict caches
        if slot is not None:
            return Verdict(slot, Action.FORWARD, backend, cache=True)
        if not pend.headers_only:
            self._forward_for(pend.packet, backend, pend.flow_id, pend.key)
        return None

    def _state_came_first(self, pend: Pending, rec: StateRecord) -> None:
        """A request is out and the flow's state came another way (a push, a
        handoff): the packets kept here go now, ahead of the later ones the
        state forwards. The request stays: a whole packet it carried may have
        gone to a balancer that died, and only its retry delivers it."""
        if pend.kept:
            c = self._classify(pend.key)
            self.counters["kept_sent_on_state"] += len(pend.kept)
            self._settle(pend, rec, self._backend_id(c.vip, rec.backend), cache=False)

    def _resolve(self, pend: Pending, rec: StateRecord, c: Classification) -> None:
        """A request's state is here (its answer, or by another way): the
        peers that asked are answered, this balancer's own traffic settled."""
        for waiter in pend.waiters:
            self._answer(waiter, rec)
            self.counters["requests_answered"] += 1
        self._settle(pend, rec, self._backend_id(c.vip, rec.backend))

    def _settle(self, pend: Pending, rec: StateRecord, backend: int, cache: bool = True) -> None:
        """The traffic a decided request held: kept packets forwarded, and
        for this balancer's own flow, the decision cached and refreshed to
        the holders from now on (rule 6)."""
        for ip in pend.kept:
            self._forward_for(ip, backend, pend.flow_id, pend.key)
        pend.kept = []
        if pend.local:
            self.exchanged[rec.key] = (pend.flow_id, rec.version)
            if cache:
                self._cache(pend.key, pend.flow_id, backend)

    def _held_ip(self, slot: int) -> bytes:
        """The IP packet of a held frame (no Ethernet header)."""
        return self.lb.worker.held_ip(slot)

    def _wait_for_state(self, key: FlowKey, flow_id: int, udp: bool, ip_packet: bytes | None,
                        waiter: str | None = None, local: bool = False,
                        closing: bool = False, retry: bool = False) -> None:
        """Rule 4 at the owner, unless the flow's state comes first: once
        every balancer asked has said it does not carry the flow, or after
        cluster.decision_delay_ms. Its packets wait here meanwhile."""
        kb = key.to_bytes()
        waiting = self.undecided.get(kb)
        if waiting is None:
            due = time.monotonic() + self.config.decision_delay() / 1000.0
            waiting = self.undecided[kb] = Undecided(key, flow_id, udp, due, [])
            self.counters["decisions_delayed"] += 1
            self.carriers.ask(waiting, asker=waiter)
        if ip_packet is None:
            pass        # a headers-only request: its asker keeps the packet
        elif retry and ip_packet in waiting.packets:
            # The asker's retry of a request that came: the wait may outlast
            # request_timeout_ms (docs/state-exchange.md, "The miss path").
            self.counters["retried_packets_kept_already"] += 1
        elif len(waiting.packets) < MAX_UNDECIDED_PACKETS:
            waiting.packets.append(ip_packet)
        else:
            self.counters["undecided_packets_dropped"] += 1
        if waiter is not None and waiter not in waiting.waiters:
            waiting.waiters.append(waiter)
        waiting.local |= local
        waiting.closing |= closing

    def _decide_due(self, now: float) -> None:
        for kb, waiting in list(self.undecided.items()):
            if now >= waiting.due:
                # A balancer asked has not replied (down, or off its CPU).
                self.counters["carrier_decided_at_bound"] += bool(waiting.awaiting)
                self._decide_waiting(kb)

    def _decide_waiting(self, kb: bytes) -> None:
        """Rule 4 for a flow whose wait is over."""
        waiting = self.undecided.pop(kb)
        c = self._classify(waiting.key)
        holders = self.holders(self._table_size(c.vip), c.bucket) if c else []
        mine = self.name in holders
        rec = self._decide_as_owner(waiting.key, waiting.flow_id, waiting.udp, holders,
                                    record=mine) if c else None
        if rec is not None and not mine:
            # Ownership moved during the wait: the decision goes to the
            # holders, as a former holder's does (_on_request).
            for h in holders:
                self._queue(h, rec, MessageType.STATE_PUSH)
        self._decided(waiting, rec)

    def _decided(self, waiting: Undecided, rec: StateRecord | None) -> None:
        """Forwards what waited, answers the peers that asked, caches the
        decision for this balancer's own traffic."""
        c = self._classify(waiting.key)
        if rec is None or c is None:
            self.counters["undecided_packets_dropped"] += len(waiting.packets)
            return
        if waiting.closing and not rec.closing and self.store.get(rec.key) is not None:
            # As for a FIN or RST in a request (_on_request): short-lived from now.
            rec = dataclasses.replace(rec, closing=True, version=rec.version + 1)
            self.store.put(rec)
        backend = self._backend_id(c.vip, rec.backend)
        for ip in waiting.packets:
            self._forward_for(ip, backend, waiting.flow_id, waiting.key)
        for waiter in waiting.waiters:
            self._answer(waiter, rec)
            self.counters["requests_answered"] += 1
        if waiting.local:
            self._cache(waiting.key, waiting.flow_id, backend)
            self.exchanged[rec.key] = (waiting.flow_id, rec.version)
            self.counters["decided_locally"] += 1

    def _forward_for(self, ip_packet: bytes, backend: int, flow_id: int, key: FlowKey) -> None:
        try:
            self.lb.worker.forward_ip(ip_packet, backend, flow_id)
            self.counters["forwarded_for_peers"] += 1
        except Exception as exc:
            self.counters["forward_for_peer_failed"] += 1
            log.warning("could not forward a packet", error=str(exc), flow=str(key),
                        flow_id=flow_label(flow_id))

    # ------------------------------------------------------------ once the history is learnt

    def release(self, known: bool, joined: bool = False) -> None:
        """What waited for the tables in force (pylb/history.py): the peer
        messages kept (their state first), then the packets and notices
        held, decided by the tables now in force, in order. joined: the
        cluster ran without this balancer, which joins it now."""
        held, deferred = self.history.learnt(known)
        if joined and not self._in_transition():
            self._join_transition()
        for sender, msg in deferred:
            self._dispatch(sender, msg)
        for p, ip in held:
            self._redecide(p, ip)
        if held or deferred:
            log.info("traffic held while learning the tables in force released",
                     punts=len(held), messages=len(deferred), history_known=known)

    def _join_transition(self) -> None:
        """The other members held every bucket before this balancer joined:
        for a handoff period they are its former holders, asked first by it
        as a new owner, as after any membership change (a joiner given
        --previous-config starts so too, from its members)."""
        self.members = {n: a for n, a in self.members.items() if n != self.name}
        self.apply_config(self.lb.config)

    def _redecide(self, p: Punt, ip: bytes | None) -> None:
        """A punt taken while every bucket was stateful: in a bucket stable
        now, what the fast path does (forward by the table; a notice needs
        nothing); else the miss path."""
        c = self._classify(p.key)
        key = FlowKey.from_bytes(p.key)
        if c is not None and c.stateful:
            p = dataclasses.replace(p, current=c.current.id if c.current else NO_BACKEND,
                                    previous=c.previous.id if c.previous else NO_BACKEND)
            try:
                verdict = self.decide(p, ip)
            except (ValueError, PylbError) as exc:
                log.warning("held packet not decided: dropped", error=str(exc),
                            flow_id=flow_label(p.flow_id))
                verdict = Verdict(None, Action.DROP)
            if verdict is None or ip is None:
                return      # a notice, or the miss path took the packet
        elif ip is None:
            return          # a notice in a bucket that needs no state
        else:
            verdict = Verdict(None, Action.FORWARD, c.current.id, cache=self.lb.config.balancer
                              .flow_cache.track == "all") if c and c.current else \
                Verdict(None, Action.DROP)
        if verdict.action == Action.FORWARD:
            self._forward_for(ip, verdict.backend, p.flow_id, key)
            if verdict.cache:
                self._cache(key, p.flow_id, verdict.backend)
        elif verdict.action == Action.DROP:
            self.counters["history_held_dropped"] += 1

    # ------------------------------------------------------------ peer datagrams

    def on_peer_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._on_datagram(frame)

    def _on_datagram(self, frame: bytes) -> None:
        """One datagram from the peer ring: checked in the order of
        docs/peer-protocol.md (address, structure and MAC, sender id, replay)."""
        parsed = packet.parse(frame)
        sender = self.by_address.get(parsed.key[:16])
        if sender is None or sender == self.name:
            self.peer_stats.count("spoofed")
            return
        start = parsed.l2_len + parsed.l3_len + 8
        try:
            msg = peer.decode(frame[start:parsed.l2_len + parsed.l3_total], self.key)
        except peer.PeerError as err:
            self.peer_stats.count(err.reason)
            return
        if msg.sender != peer.balancer_id(sender):
            self.peer_stats.count("spoofed")
            return
        # Each worker process of a balancer counts its own seq.
        if not self.window.check_and_update((msg.sender, msg.sender_lane), msg.seq):
            self.peer_stats.count("replayed")
            return
        if not self.history.defers(sender, msg):
            self._dispatch(sender, msg)

    def _dispatch(self, sender: str, msg) -> None:
        """An admitted message to its handler, counted by its outcome."""
        handler = {MessageType.STATE_REQUEST: self._on_request,
                   MessageType.STATE_ANSWER: self._on_answer,
                   MessageType.CARRIER_QUERY: self.carriers.on_query,
                   MessageType.CARRIER_REPLY: self.carriers.on_reply,
                   MessageType.HISTORY_REQUEST: self.history.on_request,
                   MessageType.HISTORY_ANSWER: self.history.on_answer}.get(msg.type,
                                                                           self._on_records)
        try:
            result = handler(sender, msg)
        except (ValueError, PylbError) as exc:
            # Authenticated but impossible content (e.g. a key mixing address
            # families): one datagram must never stop the balancer.
            self.peer_stats.count("malformed")
            log.warning("peer message refused", sender=sender, error=str(exc))
            return
        if result is False:
            return      # dropped as malformed, and counted so, by the handler
        # Counted last: each datagram counts under exactly one outcome
        # (PeerStats: received == accepted + the drop reasons).
        if msg.view != self.view:
            self.peer_stats.count("view_mismatch")
        self.peer_stats.count("accepted")

    def _on_request(self, sender: str, msg) -> bool | None:
        """Rule 3 at the owner: forward the packet to the flow's backend and
        answer with the state (rule 4 when it has none). A new holder without
        the state during a transition asks the former holders first. False:
        the packet is no flow of a VIP (malformed, counted here)."""
        inner = packet.parse(packet.ETH_FOR[msg.packet[0] >> 4] + msg.packet)
        if inner.result != packet.ParseResult.OK or inner.l4_proto not in (TCP, UDP) \
                or not inner.flags & packet.ParseFlag.HAS_L4:
            self.peer_stats.count("malformed")
            return False
        kb = inner.key
        c = self._classify(kb)
        if c is None:
            self.peer_stats.count("malformed")
            return False
        if not self._my_lane(c.flow_id):
            self.peer_stats.count("wrong_lane")
            return None
        key = FlowKey.from_bytes(kb)
        size = self._table_size(c.vip)
        holders = self.holders(size, c.bucket)
        rec = self.store.get(kb)
        if rec is None:
            rec = self._forwarded_here(kb, c)
            if rec is not None and self.name in holders:
                self._store(rec)
        unasked = None      # a request to the former holders that could not be sent
        if rec is None and self.name in holders:
            former = [h for h in self.former_holders(size, c.bucket) if h not in (self.name, sender)]
            if former:
                pend = self.pending.get(kb)
                if pend is None:
                    pend = self.pending[kb] = Pending(key, msg.packet, c.flow_id, former,
                                                      time.monotonic())
                # A whole packet that does not fit a request to them (another
                # address family) waits here, as the asker's own would.
                pend.packet = msg.packet
                pend.headers_only = msg.headers_only or bool(pend.kept) \
                    or not self._request_fits(msg.packet, former)
                if sender not in pend.waiters:
                    pend.waiters.append(sender)
                if self._send_request(pend):
                    if pend.headers_only and not msg.headers_only:
                        self._keep(pend, msg.packet)
                    self.counters["asked_former_holder"] += 1
                    return
                unasked = self.pending.pop(kb)
        if rec is None and (kb in self.undecided or (self.name in holders
                                                     and self.config.decision_delay())):
            self._wait_for_state(key, c.flow_id, key.proto == UDP,
                                 None if msg.headers_only else msg.packet, waiter=sender,
                                 closing=bool(inner.tcp_flags & FIN_RST), retry=msg.retry)
            if unasked is not None:
                # Its other askers and this balancer's own packets wait too.
                for waiter in unasked.waiters:
                    self._wait_for_state(key, c.flow_id, key.proto == UDP, None, waiter=waiter)
                for ip in unasked.kept:
                    self._wait_for_state(key, c.flow_id, key.proto == UDP, ip)
                # Cached here when decided only if it was this balancer's traffic.
                self.undecided[kb].local |= unasked.local
            return
        if rec is not None and kb in self.undecided:
            # The state came by another way (a refresh): the kept packets first.
            self._decided(self.undecided.pop(kb), rec)
        if rec is None:
            # Asked without holding the bucket (a former holder during a
            # transition, or another view): the decision goes to the holders,
            # and no copy stays here, where no handoff would ever end it.
            mine = self.name in holders
            rec = self._decide_as_owner(key, c.flow_id, key.proto == UDP, holders, record=mine,
                                        c=c)
            if rec is not None and not mine:
                for h in holders:
                    self._queue(h, rec, MessageType.STATE_PUSH)
        if rec is None:
            if unasked is not None:
                self.counters["undecided_packets_dropped"] += len(unasked.kept)
            return
        if inner.tcp_flags & FIN_RST and not rec.closing:
            rec = dataclasses.replace(rec, closing=True, version=rec.version + 1)
            self.store.put(rec)
        backend = self._backend_id(c.vip, rec.backend)
        if not msg.headers_only:
            self._forward_for(msg.packet, backend, c.flow_id, key)
        self._answer(sender, rec)
        self.counters["requests_answered"] += 1
        if unasked is not None:
            for waiter in unasked.waiters:
                if waiter != sender:
                    self._answer(waiter, rec)
                    self.counters["requests_answered"] += 1
            self._settle(unasked, rec, backend)

    def carried(self, kb: bytes) -> StateRecord | None:
        """What this balancer knows of a flow first hand or as a holder: its
        store's record, else the backend its flow cache forwards it to."""
        rec = self.store.get(kb)
        if rec is None:
            c = self._classify(kb)
            rec = self._cached_state(kb, c) if c is not None else None
        return rec

    def _forwarded_here(self, kb: bytes, c: Classification) -> StateRecord | None:
        """The flow's state from this balancer's own flow cache: a flow it
        forwards (it saw the SYN, or was told) has its backend known first
        hand, whether or not this balancer holds the bucket. A balancer asked
        about a bucket it no longer holds (a former holder, a draining
        balancer) while its push of the flow is still on its way must answer
        with that: rule 4 is for flows nobody has seen, and names the
        previous table's backend, wrong for a flow that started after the
        change (the lab's reset at steps d and e)."""
        rec = self._cached_state(kb, c)
        self.counters["answered_from_cache"] += rec is not None
        return rec

    def _cached_state(self, kb: bytes, c: Classification) -> StateRecord | None:
        hit = self.lb.cache.peek(kb, c.flow_id, now_ms())
        if hit is None or not 0 <= hit[0] < len(self.lb.dataplane.backends):
            return None
        known = self.exchanged.get(kb)
        version = known[1] if known else _version(seen_syn=True)
        return StateRecord(kb, self.lb.dataplane.backends[hit[0]].address, version, hit[1],
                           False)

    def _on_answer(self, sender: str, msg) -> None:
        for rec in msg.records:
            self._on_answer_record(rec)

    def _on_answer_record(self, rec: StateRecord) -> None:
        pend = self.pending.get(rec.key)
        if pend is None:
            self.counters["answers_unsolicited"] += 1
            return
        c = self._accept(rec)
        if c is None:
            if self.history.unsure and self._classify(rec.key) is not None:
                self._passed_through(pend, rec)
            return      # still pending: retried, then the fallback decides
        del self.pending[rec.key]
        if self.name in self.holders(self._table_size(c.vip), c.bucket):
            self._store(rec)
        self._resolve(pend, rec, c)
        if pend.local:
            self.counters["answers_cached"] += 1

    def _passed_through(self, pend: Pending, rec: StateRecord) -> None:
        """An answer naming a backend this balancer does not know, while it
        does not know the tables in force (pylb/history.py): the owner
        forwarded the packet, the peers that asked here get the answer, and
        nothing is cached: the flow's next packets go via the owner too."""
        del self.pending[rec.key]
        for waiter in pend.waiters:
            self._answer(waiter, rec)
        self.counters["undecided_packets_dropped"] += len(pend.kept)
        self.counters["answers_passed_through"] += 1

    def _cache(self, key: FlowKey, flow_id: int, backend: int) -> None:
        tclass = TimeoutClass.UDP if key.proto == UDP else TimeoutClass.TCP
        # What this worker forwarded of the flow leaves first: another
        # worker's hit on the entry must not overtake it (native/lanes.c, "Order").
        self.lb.worker.flush()
        try:
            self.lb.cache.insert(key.to_bytes(), flow_id, backend, now_ms(), tclass)
        except Full:
            self.counters["cache_full"] += 1

    def _on_records(self, sender: str, msg) -> None:
        if msg.type == MessageType.CLEAN:
            self._on_clean(sender, msg.records)
            return
        if msg.type == MessageType.REMOVE:
            for r in msg.records:
                # An ended flow's removal older than the state held changes
                # nothing: rule 6 of the protocol, counted as for any record.
                if self.store.is_stale(r):
                    self.peer_stats.count("stale")
                else:
                    self.store.remove(r.key, r.version)
            return
        for rec in msg.records:
            if self._accept(rec):
                if msg.type == MessageType.REFRESH:
                    self.store.refresh(rec)
                elif self.store.is_stale(rec):
                    self.peer_stats.count("stale")
                elif (msg.type == MessageType.STATE_PUSH
                      and msg.view.member_hash != self.view.member_hash):
                    if self._pass_on_and_keep(sender, rec):
                        self._store(rec)
                else:
                    self._store(rec)

    def _store(self, rec: StateRecord) -> None:
        """Keeps state from a peer; a flow waiting for it is decided now."""
        self.store.put(rec)
        held = self.store.get(rec.key)      # None: it arrived expired already
        if held is not None and rec.key in self.undecided:
            self.counters["undecided_got_state"] += 1
            self._decided(self.undecided.pop(rec.key), held)
        if held is not None and rec.key in self.pending:
            self._state_came_first(self.pending[rec.key], held)

    def _pass_on_and_keep(self, sender: str, rec: StateRecord) -> bool:
        """A push from a balancer with another set of members (it has not
        heard of a change yet, or the push was on its way while ownership
        moved, after this balancer's handoff): it went to the holders of the
        sender's view, so the state goes on to those of this balancer's view
        as a handoff, and never further (a handoff is not passed on: one
        hop). A copy stays here if this balancer holds the bucket, or while
        its transition lasts, as handed-off copies do. Returns whether to
        keep the record."""
        c = self._classify(rec.key)
        holders = self.holders(self._table_size(c.vip), c.bucket)
        others = [h for h in holders if h not in (self.name, sender)]
        for holder in others:
            self._queue(holder, rec, MessageType.HANDOFF)
        self.counters["pushes_passed_on"] += bool(others)
        if self.name in holders:
            return True
        if not self._in_transition():
            return False
        self._leaving.append(rec.key)
        return True

    def _accept(self, rec: StateRecord) -> Classification | None:
        """Rule 5 of the protocol: the backend must belong to the flow's VIP.
        The flow's classification if it does. A flow of another worker
        process's lane is refused: each keeps its own flows' state."""
        c = self._classify(rec.key)
        if c is None or c.vip is None or self._backend_id(c.vip, rec.backend, strict=True) is None:
            self.peer_stats.count("bad_backend")
            return None
        if not self._my_lane(c.flow_id):
            self.peer_stats.count("wrong_lane")
            return None
        return c

    def _my_lane(self, flow_id: int) -> bool:
        """Whether a flow is this worker process's (pylb/lanes.py)."""
        lanes = self.lb.lane_count
        return lanes == 1 or peer.lane_key(flow_id) % lanes == self.lb.lane

    def busy(self) -> bool:
        """Whether state is on the move here (retirement waits for it)."""
        return self._in_transition() or self._export_cursor is not None

    # ------------------------------------------------------------ timers

    def tick(self) -> None:
        now = time.monotonic()
        c = self.config
        if self._leaving and not self._in_transition():
            # The transition is over: copies handed to the new holders go.
            self.store.drop(self._leaving)
            self._leaving = []
            self.by_address = _by_address(self.members)
        if now - self._last_push >= c.push_interval_ms / 1000.0:
            self._last_push = now
            for kind in (MessageType.STATE_PUSH, MessageType.HANDOFF, MessageType.REFRESH,
                         MessageType.REMOVE):
                self._flush(kind)
            self._retry(now)
        if now - self._last_refresh >= c.refresh_interval:
            self._last_refresh = now
            for key, (fid, version) in list(self.exchanged.items()):
                self._refresh_one(key, fid, version)
            self._flush(MessageType.REFRESH)
            self._flush(MessageType.REMOVE)
        if now - self._last_expire >= 1.0:
            self._last_expire = now
            self.store.expire()
        if self.undecided:
            self._decide_due(now)
        if self._export_cursor is not None:
            self._export_step()
        if now - self._last_clean >= CLEAN_INTERVAL_S:
            self._last_clean = now
            self._announce_clean(now)
        if self._answers:
            self._flush_answers()
        self.carriers.flush()
        self.history.tick(now)

    def urgent(self) -> bool:
        """Whether the loop should come back soon rather than idle: an owner
        waits for a flow's state, or new flows' state waits for the next
        push (push_interval_ms), which an owner may be waiting for."""
        return bool(self.undecided) or self.carriers.queued() or self.history.learning or any(
            records for (_, kind), records in self._pushes.items()
            if kind == MessageType.STATE_PUSH)

    def _retry(self, now: float) -> None:
        for kb, pend in list(self.pending.items()):
            # Back off per try: an answer may come through a new owner that
            # itself asks a former holder first.
            if now - pend.sent_at < self.config.retry_after_ms(pend.tries) / 1000.0:
                continue
            if pend.tries > self.config.request_retries:
                pend.targets.pop(0)
                pend.tries = 0
                self.counters["owner_unreachable"] += 1
            pend.tries += 1
            pend.sent_at = now
            if self._send_request(pend):
                self.counters["retries"] += 1
            else:
                self._fallback(pend, None)

    def _refresh_one(self, kb: bytes, flow_id: int, version: int) -> None:
        """Rule 6: a flow active here keeps its holders' copy alive; one that
        ended here (gone from the cache) is removed from them."""
        c = self._classify(kb)
        if c is None:
            del self.exchanged[kb]
            return
        holders = self.holders(self._table_size(c.vip), c.bucket)
        hit = self.lb.cache.peek(kb, flow_id, now_ms())
        if hit is None:
            del self.exchanged[kb]
            for h in holders:
                if h == self.name:
                    self.store.remove(kb, version)
                else:
                    self._queue(h, peer.RemoveRecord(kb, version), MessageType.REMOVE)
            return
        ref = self.lb.dataplane.backends[hit[0]]
        rec = StateRecord(kb, ref.address, version, hit[1], False)
        for h in holders:
            if h == self.name:
                self.store.refresh(rec)
            else:
                self._queue(h, rec, MessageType.REFRESH)

    # ------------------------------------------------------------ table changes

    def tables_changed(self) -> None:
        """Rule 2 for the flows older than a change: the flows this balancer
        caches in stateful buckets on another backend than the new current
        one get their state pushed to owner and backup, so that owners hold
        the state of every live flow there and the previous table is only a
        guess for flows nobody has seen. A scan of the cache, in steps."""
        self._export_cursor = 0
        self.counters["change_scans"] += 1

    def _export_step(self) -> None:
        if self._export_buf is None:
            self._export_buf = ffi.new("struct pylb_cache_entry[]", EXPORT_CHUNK)
        buf, cache, dp = self._export_buf, self.lb.cache, self.lb.dataplane
        cursor, end = self._export_cursor, cache.sets
        for _ in range(EXPORT_CHUNKS_PER_TICK):
            if cursor >= end:
                break
            n, cursor = cache.export_raw(now_ms(), cursor, buf, EXPORT_CHUNK)
            kept = lib.pylb_dataplane_keep_divergent(dp.handle, buf, n)
            for i in range(kept):
                self._push_cached(buf[i], dp)
        self._export_cursor = cursor if cursor < end else None
        self._flush(MessageType.STATE_PUSH)

    def _push_cached(self, e, dp) -> None:
        if e.timeout_class == TimeoutClass.TCP_CLOSING:
            return      # ended (FIN or RST seen): nobody needs its state
        if not self._my_lane(e.flow_id):
            return      # the shared cache's other flows are other workers' to push
        kb = key_bytes(e)
        holders = self.holders(self._table_size(dp.vip_names[e.vip]), e.bucket)
        known = self.exchanged.get(kb)
        # The balancer that forwards the flow knows its backend first hand.
        version = known[1] if known else _version(seen_syn=True)
        rec = StateRecord(kb, dp.backends[e.backend].address, version, e.idle_ms, False)
        self.exchanged[kb] = (e.flow_id, version)
        for h in holders:
            if h == self.name:
                self.store.put(rec)
            else:
                self._queue(h, rec, MessageType.STATE_PUSH)
        self.counters["pushed_after_change"] += 1

    def retirable(self, due: dict[str, list[int]]) -> dict[str, list[int]]:
        """Of the stateful buckets due for retirement, those nobody needs state
        for: as owner, the buckets whose flows held here all use the current
        backend (announced to the others with CLEAN); as anyone else, those
        whose owner announced it since the bucket last moved here. Nothing
        while ownership or a post-change push is still moving state."""
        if self._in_transition() or self._export_cursor is not None or not self.history.known:
            return {}
        dp = self.lb.dataplane
        divergent = self._divergent_buckets()
        out: dict[str, list[int]] = {}
        for vip, buckets in due.items():
            own = self.ownership(self._table_size(vip))
            moved_at = dp.history[vip].moved_at
            ok = []
            for b in buckets:
                if own.owners(b)[0] == self.name:
                    if b not in divergent.get(vip, ()):
                        ok.append(b)
                        self._announce[(vip, b)] = CLEAN_REPEATS
                elif self._clean_heard.get((vip, b), 0.0) > moved_at[b]:
                    ok.append(b)
            if ok:
                out[vip] = ok
        for vip, buckets in out.items():
            for b in buckets:
                self._clean_heard.pop((vip, b), None)
        self.counters["buckets_retired"] += sum(len(b) for b in out.values())
        return out

    def _divergent_buckets(self) -> dict[str, set[int]]:
        """Stateful buckets where this balancer holds a live flow whose backend
        is not the current one."""
        out: dict[str, set[int]] = {}
        for rec in self.store.records():
            c = self._classify(rec.key)
            if c is not None and c.stateful and (c.current is None
                                                 or c.current.address != rec.backend):
                out.setdefault(c.vip, set()).add(c.bucket)
        return out

    def _announce_clean(self, now: float) -> None:
        """Sends the owner's CLEANs of the last CLEAN_REPEATS rounds to every
        other member, and forgets CLEANs heard long ago."""
        if self._announce:
            records = []
            vips = {v.name: v for v in self.lb.config.vips}
            for (vip, b), left in list(self._announce.items()):
                v = vips.get(vip)
                if v is not None:
                    records.append(peer.CleanRecord(v.address, v.protocol_number, v.port or 0,
                                                    v.table_size, b))
                if left <= 1:
                    del self._announce[(vip, b)]
                else:
                    self._announce[(vip, b)] = left - 1
            for member in self.members:
                if member != self.name:
                    self._pushes.setdefault((member, MessageType.CLEAN), []).extend(records)
            self._flush(MessageType.CLEAN)
        horizon = now - 2 * max(self.lb.retire_after(), CLEAN_INTERVAL_S)
        for k in [k for k, t in self._clean_heard.items() if t < horizon]:
            del self._clean_heard[k]

    def _on_clean(self, sender: str, records) -> None:
        """A CLEAN counts from the bucket's primary owner in this balancer's
        own view, for a VIP of this configuration, only."""
        now = time.monotonic()
        for r in records:
            vip = self.lb.config.vip_at(r.vip, r.proto, r.port)
            if vip is None or vip.table_size != r.table_size \
                    or self.ownership(r.table_size).owners(r.bucket)[0] != sender:
                self.counters["clean_refused"] += 1
                continue
            self._clean_heard[(vip.name, r.bucket)] = now
            self.counters["clean_heard"] += 1

    # ------------------------------------------------------------ sending

    def _queue(self, target: str, rec: StateRecord, kind: MessageType) -> None:
        self._pushes.setdefault((target, kind), []).append(rec)

    def _flush(self, kind: MessageType) -> None:
        for (target, k), records in list(self._pushes.items()):
            if k != kind or not records:
                continue
            del self._pushes[(target, k)]
            address = self.members.get(target)
            if address is None:
                continue
            per_batch = peer.records_per_message(k, self._peer_mtu(), address.version,
                                                 self.key is not None)
            groups = self._by_lane_key(records)
            for n, (lane_key, group) in enumerate(groups):
                batches = peer.encode_batches(k, peer.balancer_id(self.name), self.view,
                                              self._next_seq, group, self._peer_mtu(),
                                              address.version, self.key, lane_key,
                                              self.lb.lane)
                for i, datagram in enumerate(batches):
                    try:
                        self.lb.worker.send_peer(address, datagram)
                        self.counters[f"sent_{k.name.lower()}"] += 1
                    except Exception as exc:
                        # E.g. a member that has just joined, whose MAC is still
                        # being resolved: keep what was not sent for the next
                        # round (bounded), state must not be lost on the way.
                        self.counters["send_failed"] += 1
                        log.debug("peer datagram not sent", target=target, error=str(exc))
                        rest = group[i * per_batch:] + [r for _, g in groups[n + 1:] for r in g]
                        self._pushes.setdefault((target, k), [])[:0] = rest[-MAX_QUEUED:]
                        break
                else:
                    continue
                break

    def _by_lane_key(self, records: list) -> list[tuple[int, list]]:
        """Records grouped by their flows' lane keys, in order within each: a
        message carries one lane key (docs/peer-protocol.md), so that a peer
        with several worker processes hands it whole to the one whose flows
        they are. CLEAN records name buckets, not flows: lane key 0."""
        if not records or not hasattr(records[0], "key"):
            return [(0, records)]
        flow_id = self.lb.dataplane.flow_id
        groups: dict[int, list] = {}
        for r in records:
            groups.setdefault(peer.lane_key(flow_id(r.key)), []).append(r)
        return list(groups.items())

    def _peer_mtu(self) -> int:
        """Peer datagrams are built in one mbuf (and af_packet cuts frames near
        2 KB): whatever the data MTU, they stay within PEER_MTU_MAX."""
        return min(self.lb.config.balancer.data.mtu, PEER_MTU_MAX)

    def _address(self, target: str):
        # A former member still answers and asks during a transition.
        return self.members.get(target) or self._prev_members.get(target)

    def _send(self, target: str, kind: MessageType, records, packet_bytes: bytes | None = None,
              headers_only: bool = False, retry: bool = False, lane_key: int = 0):
        address = self._address(target)
        if address is None:
            raise PylbError(f"no address for balancer {target}")
        msg = peer.Message(kind, peer.balancer_id(self.name), self.view, self._next_seq(),
                           tuple(records), packet_bytes, headers_only=headers_only,
                           lane_key=lane_key, sender_lane=self.lb.lane, retry=retry)
        self.lb.worker.send_peer(address, peer.encode(msg, self.key))

    def _answer(self, target: str, rec: StateRecord) -> None:
        """Answers go out at the end of the round (tick), batched per asker:
        a datagram and an HMAC per batch, not per answer, in the same round."""
        self._answers.setdefault(target, []).append(rec)

    def _flush_answers(self) -> None:
        """An answer is best effort, as every datagram is (the asker retries,
        then asks the backup)."""
        answers, self._answers = self._answers, {}
        for target, records in answers.items():
            self.send_batched(target, MessageType.STATE_ANSWER, records)

    def send_batched(self, target: str, kind: MessageType, records: list) -> None:
        """records to target in as few datagrams as fit, grouped by lane key,
        best effort: a peer whose MAC is not known yet, e.g. one that has just
        joined, must not end this balancer (seen in the lab), nor cost the
        others theirs."""
        address = self._address(target)
        try:
            if address is None:
                raise PylbError(f"no address for balancer {target}")
            for lane_key, group in self._by_lane_key(records):
                for datagram in peer.encode_batches(
                        kind, peer.balancer_id(self.name), self.view, self._next_seq, group,
                        self._peer_mtu(), address.version, self.key, lane_key, self.lb.lane):
                    self.lb.worker.send_peer(address, datagram)
                    self.counters[f"sent_{kind.name.lower()}"] += 1
        except Exception as exc:    # as _flush
            self.counters["send_failed"] += 1
            log.debug("peer datagram not sent", target=target, kind=kind.name, error=str(exc))

    def send_parts(self, target: str, parts: list) -> None:
        """A HISTORY_ANSWER's parts, best effort (the asker asks again)."""
        address = self._address(target)
        try:
            for part in parts:
                msg = peer.Message(MessageType.HISTORY_ANSWER, peer.balancer_id(self.name),
                                   self.view, self._next_seq(), sender_lane=self.lb.lane,
                                   part=part)
                self.lb.worker.send_peer(address, peer.encode(msg, self.key))
                self.counters["sent_history_answer"] += 1
        except Exception as exc:    # as send_batched
            self.counters["send_failed"] += 1
            log.debug("history answer not sent", target=target, error=str(exc))

    # ------------------------------------------------------------ helpers

    def _classify(self, key: FlowKey | bytes) -> Classification | None:
        c = self.lb.dataplane.classify(key)
        return c if c.vip is not None else None

    def _table_size(self, vip: str) -> int:
        return self.lb.config.find_vip(vip).table_size

    def _backend_id(self, vip: str, address, strict: bool = False) -> int | None:
        """The backend id of (VIP, address); strict: only backends the VIP has
        had (protocol rule 5)."""
        dp = self.lb.dataplane
        if self._ids_for is not dp:
            self._ids_for = dp
            self._ids = {(r.vip, r.address): r.id for r in dp.backends}
            # Every backend the VIP has had while this balancer ran: a flow
            # may predate several changes in force, and a backend that left
            # keeps its id (BackendRegistry).
            self._valid = {(r.vip, r.address) for r in dp.backends}
        if strict and (vip, address) not in self._valid:
            return None
        return self._ids.get((vip, address), None if strict else NO_BACKEND)

    def state_entries(self) -> int:
        return len(self.store)


def _by_address(members: dict) -> dict[bytes, str]:
    """Balancer names by data address in the 16-byte form a parse's key
    holds (IPv4 v4-mapped): a datagram's sender is found without making an
    address object."""
    return {packed16(a): n for n, a in members.items()}
