"""Who carries a flow: what an owner without a flow's state asks the other
balancers before it decides by rule 4 (docs/state-exchange.md, "The miss
path"; CARRIER_QUERY and CARRIER_REPLY in docs/peer-protocol.md).

Rule 4 (the previous table) is right only for a flow nobody has seen. The
balancer that saw a new flow start caches it and pushes its state, batched;
kept off its CPU, it pushes late, and an owner that decided meanwhile sends
the new flow to the old backend, which resets it. So the owner asks every
other member, and the former members while a transition lasts, whether they
carry the flow. A balancer carries a flow it has in its store or its flow
cache. The first reply with state decides the flow; once every balancer
asked has said "not here", rule 4 decides at once, so a flow older than the
change is not kept waiting; a balancer that does not reply (down, stalled)
keeps the flow waiting until `cluster.decision_delay_ms`, the bound.
"""
from __future__ import annotations

import time

from pylb import peer
from pylb.peer import MessageType


class Carriers:
    """The questions of one ClusterNode and its replies to the others'."""

    def __init__(self, node):
        self.node = node
        # Queries and replies wait for the end of the round (ClusterNode.tick),
        # so those of one round to one balancer share datagrams and HMACs.
        self._outbox: dict[tuple[str, MessageType], list] = {}

    def ask(self, waiting, asker: str | None) -> None:
        """Asks about a flow its owner has just begun to wait on (an
        Undecided). Not the asker, which sent the flow's packet because it
        has no state for it."""
        others = [name for name in self.node.others() if name != asker]
        waiting.awaiting = set(others)
        if not others:
            waiting.due = time.monotonic()     # nobody else can carry it: rule 4 this round
            return
        query = peer.FlowQuery(waiting.key.to_bytes())
        for name in others:
            self._queue(name, MessageType.CARRIER_QUERY, [query])
        self.node.counters["carrier_queries_sent"] += len(others)

    def on_query(self, sender: str, msg) -> None:
        """Replies for each flow asked about with the state this balancer has,
        or that it does not carry it. Every flow is looked up before any reply
        is queued: a query refused as malformed leaves nothing behind."""
        replies = [self.node.carried(q.key) or peer.NotCarried(q.key) for q in msg.records]
        carried = sum(not isinstance(r, peer.NotCarried) for r in replies)
        counters = self.node.counters
        counters["carrier_queries_received"] += len(replies)
        counters["carrier_replied_state"] += carried
        counters["carrier_replied_not_here"] += len(replies) - carried
        self._queue(sender, MessageType.CARRIER_REPLY, replies)

    def on_reply(self, sender: str, msg) -> None:
        for rec in msg.records:
            waiting = self.node.undecided.get(rec.key)
            if waiting is None or sender not in waiting.awaiting:
                # Decided already (by another reply, a push, the bound), or
                # from a balancer that was not asked: it changes nothing.
                self.node.counters["carrier_replies_ignored"] += 1
            elif isinstance(rec, peer.NotCarried):
                self._not_here(sender, waiting)
            else:
                self._adopt(sender, waiting, rec)

    def _not_here(self, sender: str, waiting) -> None:
        waiting.awaiting.discard(sender)
        if not waiting.awaiting:
            # Nobody carries it: a flow older than the change, rule 4 now.
            self.node.counters["carrier_decided_all_not_here"] += 1
            self.node._decide_waiting(waiting.key.to_bytes())

    def _adopt(self, sender: str, waiting, rec: peer.StateRecord) -> None:
        """A carrier's state decides the flow, with the checks any state
        record has: a backend of the VIP (else counted bad_backend and the
        others' replies or the bound decide), no version rolled back (the
        store's). Kept here if this balancer holds the bucket, pushed to the
        other holders: the carrier's own push may come late or not at all."""
        node = self.node
        c = node._accept(rec)
        if c is None:
            return
        waiting.awaiting.discard(sender)
        holders = node.holders(node._table_size(c.vip), c.bucket)
        for holder in holders:
            if holder != node.name:
                node._queue(holder, rec, MessageType.STATE_PUSH)
        if node.name in holders:
            node._store(rec)        # decides the waiting flow, unless it came expired
        else:
            # Ownership moved during the wait: no copy stays here.
            node.counters["undecided_got_state"] += 1
            node._decided(node.undecided.pop(rec.key), rec)
        node.counters["carrier_state_adopted"] += rec.key not in node.undecided

    def _queue(self, target: str, kind: MessageType, records: list) -> None:
        self._outbox.setdefault((target, kind), []).extend(records)

    def queued(self) -> bool:
        return bool(self._outbox)

    def flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for (target, kind), records in outbox.items():
            self.node.send_batched(target, kind, records)
