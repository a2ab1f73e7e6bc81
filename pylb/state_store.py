"""The owner's store: flow state a balancer holds as owner or backup owner.

A record's version only goes up (docs/peer-protocol.md, rule 6): an older
record, replayed or late, never replaces a newer one. Entries end when their
flow ends: a removal, or no refresh within the idle timeout of its class.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from pylb.peer import RemoveRecord, StateRecord

TCP, UDP = 6, 17


@dataclass(slots=True)
class Entry:
    record: StateRecord
    seen: float            # monotonic seconds when the flow was last known active


def _proto(key: bytes) -> int:
    return key[36]


class StateStore:
    def __init__(self, tcp_idle: float = 300.0, tcp_closing: float = 10.0, udp_idle: float = 30.0,
                 other_idle: float = 30.0, clock=time.monotonic):
        self._entries: dict[bytes, Entry] = {}
        self._timeouts = (tcp_idle, tcp_closing, udp_idle, other_idle)
        self._clock = clock

    def _timeout(self, record: StateRecord) -> float:
        proto = _proto(record.key)
        if proto == TCP:
            return self._timeouts[1] if record.closing else self._timeouts[0]
        return self._timeouts[2] if proto == UDP else self._timeouts[3]

    def _live(self, entry: Entry, now: float) -> bool:
        return now - entry.seen < self._timeout(entry.record)

    def get(self, key: bytes) -> StateRecord | None:
        entry = self._entries.get(key)
        if entry is None or not self._live(entry, self._clock()):
            return None
        return entry.record

    def put(self, record: StateRecord) -> bool:
        """Keeps record unless an equal or newer version is held; a refresh of
        the same version only renews its life. Returns True when it changed
        the state (new flow or newer version)."""
        now = self._clock()
        seen = now - record.idle_ms / 1000.0
        entry = self._entries.get(record.key)
        if entry is not None and self._live(entry, now):
            if record.version < entry.record.version:
                return False
            if record.version == entry.record.version:
                entry.seen = max(entry.seen, seen)
                return False
        self._entries[record.key] = Entry(record, seen)
        return True

    def refresh(self, record: StateRecord) -> None:
        """A flow still active at a balancer: renews the held copy whatever
        its version (a refresh carries no newer state), or keeps the record
        when none is held."""
        entry = self._entries.get(record.key)
        if entry is not None and self._live(entry, self._clock()):
            entry.seen = max(entry.seen, self._clock() - record.idle_ms / 1000.0)
        else:
            self.put(record)

    def is_stale(self, record: StateRecord | RemoveRecord) -> bool:
        """True when record (state, or a removal) is older than the state held:
        it changes nothing. An expired entry is no state (its flow ended), as
        for get() and put(), whether or not expire() has freed it yet."""
        entry = self._entries.get(record.key)
        return (entry is not None and self._live(entry, self._clock())
                and record.version < entry.record.version)

    def remove(self, key: bytes, version: int) -> bool:
        """Removes the flow unless a newer version is held."""
        entry = self._entries.get(key)
        if entry is None or entry.record.version > version:
            return False
        del self._entries[key]
        return True

    def expire(self) -> int:
        now = self._clock()
        dead = [k for k, e in self._entries.items() if not self._live(e, now)]
        for k in dead:
            del self._entries[k]
        return len(dead)

    def records(self) -> list[StateRecord]:
        """The live records, their idle time as of now (for handoff)."""
        now = self._clock()
        return [dataclasses.replace(e.record, idle_ms=int((now - e.seen) * 1000))
                for e in self._entries.values() if self._live(e, now)]

    def drop(self, keys) -> None:
        for k in keys:
            self._entries.pop(k, None)

    def __len__(self) -> int:
        return len(self._entries)
