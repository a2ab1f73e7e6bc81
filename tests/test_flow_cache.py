"""The flow cache (native/flow_cache.c through pylb.flow_cache).

No test reads a clock: every time is an explicit now_ms, so nothing depends on
the speed of the machine.
"""
from __future__ import annotations

import mmap
import os
import pathlib
import random
import shutil
import struct
import subprocess
import threading
import zlib
from collections import Counter

import pytest

from pylb.errors import Full, InvalidArgument, StateError
from pylb.flow_cache import (COUNTED_BACKENDS, ActiveFlows, CacheEntry, FlowCache, TimeoutClass,
                             Timeouts, WAYS, footprint_for)

TIMEOUTS = Timeouts(tcp=1000, tcp_closing=100, udp=500, other=200)
TIMEOUT_OF = {TimeoutClass.TCP: 1000, TimeoutClass.TCP_CLOSING: 100,
              TimeoutClass.UDP: 500, TimeoutClass.OTHER: 200}
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
HEADER = 128
# Active-flow counters after the sets: 16 writer slots of one 32-bit counter
# per counted backend id plus one for the others, padded to a line.
COUNTERS = 16 * (COUNTED_BACKENDS + 16) * 4
ROOT = pathlib.Path(__file__).resolve().parent.parent


def v4(a: int, b: int, c: int, d: int) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + bytes((a, b, c, d))


def key(i: int, *, src: bytes | None = None, dst: bytes | None = None, sport: int | None = None,
        dport: int = 80, proto: int = 6) -> bytes:
    """The 40-byte struct pylb_flow_key of test flow i (ports in host order)."""
    src = src if src is not None else v4(10, 0, (i >> 8) & 255, i & 255)
    dst = dst if dst is not None else v4(192, 0, 2, 1)
    sport = sport if sport is not None else 1024 + (i & 0xFFFF)
    return struct.pack("=16s16sHHB3x", src, dst, sport, dport, proto)


def fid(i: int) -> int:
    return (i * 0x9E3779B97F4A7C15 + 1) & (2**64 - 1)


@pytest.fixture
def cache():
    with FlowCache(64, TIMEOUTS) as c:
        yield c


# ------------------------------------------------------------------ basics

STEPS = [
    # (description, operation, argument, expected)
    ("miss on an empty cache", "lookup", None, None),
    ("remove of an absent flow", "remove", None, False),
    ("insert", "insert", 5, None),
    ("hit", "lookup", None, 5),
    ("replace keeps one entry", "insert", 6, None),
    ("hit sees the new backend", "lookup", None, 6),
    ("one live flow", "count", None, 1),
    ("remove", "remove", None, True),
    ("miss after remove", "lookup", None, None),
    ("nothing live", "count", None, 0),
    ("second remove finds nothing", "remove", None, False),
]


def test_insert_lookup_replace_remove(cache):
    k, f = key(1), fid(1)
    for description, op, arg, expected in STEPS:
        if op == "insert":
            result = cache.insert(k, f, arg, now_ms=10)
        elif op == "lookup":
            result = cache.lookup(k, f, now_ms=10)
        elif op == "remove":
            result = cache.remove(k, f)
        else:
            result = cache.count(now_ms=10)
        assert result == expected, description


@pytest.mark.parametrize("other", [
    pytest.param(key(1, src=v4(10, 0, 0, 2)), id="src"),
    pytest.param(key(1, dst=v4(192, 0, 2, 2)), id="dst"),
    pytest.param(key(1, sport=9), id="sport"),
    pytest.param(key(1, dport=443), id="dport"),
    pytest.param(key(1, proto=17), id="proto"),
    pytest.param(key(1)[:36] + b"\x00\x00\x00\x01", id="last byte"),
])
def test_keys_with_the_same_flow_id_do_not_alias(cache, other):
    same_id = fid(1)
    cache.insert(key(1), same_id, 100, now_ms=0)
    assert cache.lookup(other, same_id, now_ms=0) is None
    cache.insert(other, same_id, 200, now_ms=0)
    assert cache.lookup(key(1), same_id, now_ms=0) == 100
    assert cache.lookup(other, same_id, now_ms=0) == 200
    assert cache.remove(other, same_id)
    assert cache.lookup(key(1), same_id, now_ms=0) == 100


def test_flow_id_selects_the_entry(cache):
    cache.insert(key(1), fid(1), 100, now_ms=0)
    assert cache.lookup(key(1), fid(2), now_ms=0) is None


@pytest.mark.parametrize("requested,capacity", [
    (1, 8), (8, 8), (9, 16), (24, 32), (100, 128), (1000, 1024), (1 << 20, 1 << 20),
])
def test_capacity_rounds_up_to_a_power_of_two_number_of_sets(requested, capacity):
    with FlowCache(requested, TIMEOUTS) as c:
        assert c.capacity == capacity
        assert c.footprint == footprint_for(requested) == HEADER + 64 * capacity + COUNTERS


# ------------------------------------------------------------------ burst lookup

def test_lookup_burst_answers_as_lookups_in_order_would(cache):
    """Hits, misses, a flow twice (refreshed by the first), FIN moving one to
    closing, an expired flow, a key sharing another's flow id."""
    cache.insert(key(1), fid(1), 11, now_ms=0)
    cache.insert(key(2), fid(2), 22, now_ms=0, timeout_class=TimeoutClass.UDP)
    cache.insert(key(3), fid(3), 33, now_ms=0, timeout_class=TimeoutClass.OTHER)
    keys = [key(1), key(4), key(2), key(1), key(3), key(5, src=v4(10, 0, 0, 2)), key(2)]
    ids = [fid(1), fid(4), fid(2), fid(1), fid(3), fid(2), fid(2)]
    flags = [0, 0, FIN, 0, 0, 0, 0]
    got = cache.lookup_burst(keys, ids, now_ms=300, tcp_flags=flags)
    #        hit miss hit (UDP: FIN means nothing) hit, OTHER expired at 200, alias, hit
    assert got == [11, None, 22, 11, None, None, 22]
    with FlowCache(64, TIMEOUTS) as single:
        single.insert(key(1), fid(1), 11, now_ms=0)
        single.insert(key(2), fid(2), 22, now_ms=0, timeout_class=TimeoutClass.UDP)
        single.insert(key(3), fid(3), 33, now_ms=0, timeout_class=TimeoutClass.OTHER)
        assert [single.lookup(k, f, 300, g) for k, f, g in zip(keys, ids, flags)] == got
        # Both refreshed what they hit, alike: the UDP flow to 300 + 500.
        for c in (cache, single):
            assert [c.count(t) for t in (799, 800, 1299, 1300)] == [2, 1, 1, 0]


def test_lookup_burst_refreshes_and_closes_like_lookup(cache):
    cache.insert(key(1), fid(1), 7, now_ms=0)
    cache.insert(key(2), fid(2), 8, now_ms=0)
    assert cache.lookup_burst([key(1), key(2)], [fid(1), fid(2)], now_ms=999,
                              tcp_flags=[ACK, RST]) == [7, 8]
    assert cache.count(999 + TIMEOUT_OF[TimeoutClass.TCP_CLOSING]) == 1  # key(2) closing
    assert cache.count(1998) == 1 and cache.count(1999) == 0             # key(1) refreshed


def test_lookup_burst_of_many_flows_across_sets():
    with FlowCache(4096, TIMEOUTS) as c:
        for i in range(0, 2000, 2):
            c.insert(key(i), fid(i), i, now_ms=0)
        for start in range(0, 2000, 64):
            n = list(range(start, min(start + 64, 2000)))
            got = c.lookup_burst([key(i) for i in n], [fid(i) for i in n], now_ms=1)
            assert got == [i if i % 2 == 0 else None for i in n]


def test_lookup_burst_without_flags_or_flows(cache):
    cache.insert(key(1), fid(1), 7, now_ms=0)
    assert cache.lookup_burst([key(1)], [fid(1)], now_ms=1) == [7]
    assert cache.lookup_burst([], [], now_ms=1) == []


def test_lookup_burst_limits(cache):
    from pylb.flow_cache import LOOKUP_BURST_MAX
    with pytest.raises(InvalidArgument):
        cache.lookup_burst([key(1)] * (LOOKUP_BURST_MAX + 1), [1] * (LOOKUP_BURST_MAX + 1), 0)
    with pytest.raises(InvalidArgument):
        cache.lookup_burst([key(1)], [1, 2], 0)
    from pylb._ffi import ffi, lib
    mask = ffi.new("uint64_t *")
    keys = ffi.new("struct pylb_flow_key *[]", 1)   # a NULL key
    ids = ffi.new("uint64_t[]", [1])
    out = ffi.new("uint32_t[]", 1)
    assert lib.pylb_flow_cache_lookup_burst(cache.handle, keys, ids, ffi.NULL, 1, 0, out,
                                            mask) == lib.PYLB_EINVAL
    assert lib.pylb_flow_cache_lookup_burst(cache.handle, keys, ids, ffi.NULL, 65, 0, out,
                                            mask) == lib.PYLB_EINVAL


# ------------------------------------------------------------------ aging

@pytest.mark.parametrize("tclass", list(TimeoutClass))
def test_each_class_ages_by_its_timeout(cache, tclass):
    timeout = TIMEOUT_OF[tclass]
    cache.insert(key(1), fid(1), 7, now_ms=1000, timeout_class=tclass)
    assert cache.count(1000 + timeout - 1) == 1
    assert cache.count(1000 + timeout) == 0
    assert cache.lookup(key(1), fid(1), now_ms=1000 + timeout) is None


def test_a_hit_refreshes_last_seen(cache):
    cache.insert(key(1), fid(1), 7, now_ms=0)
    assert cache.lookup(key(1), fid(1), now_ms=999) == 7
    assert cache.count(1998) == 1
    assert cache.count(1999) == 0


def test_an_older_clock_neither_expires_nor_rewinds(cache):
    """Another thread's now may lag behind the stamp a hit just wrote."""
    cache.insert(key(1), fid(1), 7, now_ms=500)
    assert cache.lookup(key(1), fid(1), now_ms=490) == 7
    assert cache.count(1499) == 1
    assert cache.count(1500) == 0


def test_times_wrap_modulo_2_32(cache):
    start = 2**32 - 300
    cache.insert(key(1), fid(1), 7, now_ms=start)
    assert cache.lookup(key(1), fid(1), now_ms=200) == 7  # 500 ms later
    assert cache.count(1199) == 1
    assert cache.count(1200) == 0


def test_a_hit_within_the_refresh_slack_leaves_last_seen():
    """A hit writes last_seen only when it is 1/256 of the timeout old or more
    (docs/flow-cache.md): a flow then expires at most that much early."""
    with FlowCache(64, Timeouts(tcp=25_600, tcp_closing=100, udp=500, other=200)) as c:
        c.insert(key(1), fid(1), 7, now_ms=0)
        assert c.lookup(key(1), fid(1), now_ms=99) == 7   # 99 ms < 100 ms of slack
        assert c.count(25_599) == 1 and c.count(25_600) == 0
        assert c.lookup(key(1), fid(1), now_ms=100) == 7  # now it is written
        assert c.count(25_699) == 1 and c.count(25_700) == 0


@pytest.mark.parametrize("tclass,flags,closing", [
    (TimeoutClass.TCP, FIN, True),
    (TimeoutClass.TCP, RST, True),
    (TimeoutClass.TCP, FIN | ACK, True),
    (TimeoutClass.TCP, ACK, False),
    (TimeoutClass.TCP, SYN, False),
    (TimeoutClass.UDP, FIN | RST, False),
    (TimeoutClass.OTHER, RST, False),
])
def test_fin_or_rst_moves_tcp_to_closing(cache, tclass, flags, closing):
    cache.insert(key(1), fid(1), 7, now_ms=0, timeout_class=tclass)
    assert cache.lookup(key(1), fid(1), now_ms=10, tcp_flags=flags) == 7
    short = 10 + TIMEOUT_OF[TimeoutClass.TCP_CLOSING]
    assert cache.count(short) == (0 if closing else 1)


@pytest.mark.parametrize("tclass,flags,kept", [
    (TimeoutClass.TCP_CLOSING, SYN, False),       # the port reused: a new connection
    (TimeoutClass.TCP_CLOSING, SYN | ACK, True),  # the old connection's SYN-ACK
    (TimeoutClass.TCP_CLOSING, ACK, True),        # its last ACK
    (TimeoutClass.TCP, SYN, True),                # a retransmitted SYN keeps its backend
    (TimeoutClass.UDP, SYN, True),
])
def test_a_syn_on_a_closed_flow_is_a_new_connection(cache, tclass, flags, kept):
    cache.insert(key(1), fid(1), 7, now_ms=0, timeout_class=tclass)
    assert cache.lookup(key(1), fid(1), now_ms=10, tcp_flags=flags) == (7 if kept else None)
    assert cache.count(10) == (1 if kept else 0)
    # The burst lookup treats it the same way.
    cache.insert(key(2), fid(2), 8, now_ms=0, timeout_class=tclass)
    got = cache.lookup_burst([key(2)], [fid(2)], now_ms=10, tcp_flags=[flags])
    assert got == [8 if kept else None]
    # Once freed, the flow is cached afresh.
    cache.insert(key(1), fid(1), 9, now_ms=20)
    assert cache.lookup(key(1), fid(1), now_ms=20, tcp_flags=ACK) == 9


def test_reinsert_restores_the_class(cache):
    cache.insert(key(1), fid(1), 7, now_ms=0)
    cache.lookup(key(1), fid(1), now_ms=0, tcp_flags=FIN)
    cache.insert(key(1), fid(1), 8, now_ms=0, timeout_class=TimeoutClass.TCP)
    assert cache.count(500) == 1


def test_age_frees_expired_flows_incrementally_and_count_agrees():
    with FlowCache(256, TIMEOUTS) as c:
        classes = list(TimeoutClass)
        for i in range(150):
            c.insert(key(i), fid(i), i, now_ms=0, timeout_class=classes[i % 4])
        now = 600  # past TCP_CLOSING, UDP and OTHER; within TCP
        expired = sum(1 for i in range(150) if TIMEOUT_OF[classes[i % 4]] <= now)
        sets = c.capacity // WAYS
        assert c.count(now) == 150 - expired
        freed = [c.age(now, max_sets=3) for _ in range(-(-sets // 3))]
        assert sum(freed) == expired
        assert max(freed) <= 3 * WAYS
        assert c.age(now, max_sets=sets) == 0
        assert c.count(now) == 150 - expired
        assert c.count(0) == 150 - expired  # freed, not only expired


def test_set_timeouts_applies_to_cached_flows(cache):
    cache.insert(key(1), fid(1), 7, now_ms=0, timeout_class=TimeoutClass.UDP)
    cache.set_timeouts(Timeouts(tcp=1000, tcp_closing=100, udp=50, other=200))
    assert cache.count(50) == 0


# ------------------------------------------------------------------ full sets

def same_set_ids(n: int, cache: FlowCache) -> list[int]:
    """n flow ids that all select set 3."""
    sets = cache.capacity // WAYS
    return [3 + sets * (j + 1) for j in range(n)]


def test_a_full_set_refuses_and_changes_nothing(cache):
    ids = same_set_ids(WAYS + 1, cache)
    for j in range(WAYS):
        cache.insert(key(j), ids[j], j, now_ms=0, timeout_class=TimeoutClass.OTHER)
    with pytest.raises(Full):
        cache.insert(key(99), ids[WAYS], 99, now_ms=10)
    assert cache.lookup(key(99), ids[WAYS], now_ms=10) is None
    assert [cache.lookup(key(j), ids[j], now_ms=10) for j in range(WAYS)] == list(range(WAYS))
    assert cache.count(10) == WAYS
    cache.insert(key(0), ids[0], 50, now_ms=10)  # replacing needs no room
    assert cache.lookup(key(0), ids[0], now_ms=10) == 50
    # Everything but key(0) expires at 210; no age() needed to take their place.
    cache.insert(key(99), ids[WAYS], 99, now_ms=210)
    assert cache.age(210, max_sets=cache.capacity) == WAYS - 2
    assert cache.count(210) == 2


def test_full_set_takes_flows_again_after_age(cache):
    ids = same_set_ids(WAYS + 1, cache)
    for j in range(WAYS):
        cache.insert(key(j), ids[j], j, now_ms=0, timeout_class=TimeoutClass.UDP)
    with pytest.raises(Full):
        cache.insert(key(99), ids[WAYS], 99, now_ms=499)
    assert cache.age(500, max_sets=cache.capacity) == WAYS
    cache.insert(key(99), ids[WAYS], 99, now_ms=500)
    assert cache.lookup(key(99), ids[WAYS], now_ms=500) == 99


# ------------------------------------------------------------------ active flows

def held_by_walk(cache: FlowCache) -> Counter:
    """Entries in use per backend id, read from the table's memory by the
    layout of docs/flow-cache.md (seq, backend, last_seen, used): the walk
    the counters exist to avoid, done here only to check them."""
    held: Counter = Counter()
    for i in range(cache.capacity):
        seq, backend, _, used = struct.unpack_from("=IIIB", cache.memory, HEADER + 64 * i)
        assert seq % 2 == 0, "an entry is still held by a writer"
        if used:
            held[backend] += 1
    return held


def assert_counted_as_held(cache: FlowCache) -> None:
    """The counters say what a walk of the entries finds, per backend and in all."""
    held = held_by_walk(cache)
    n = max(held, default=0) + 1
    active = cache.active_flows(n)
    assert Counter({b: k for b, k in enumerate(active.per_backend) if k}) == \
        Counter({b: k for b, k in held.items() if b < COUNTED_BACKENDS})
    assert active.total == sum(held.values())


@pytest.fixture
def shared():
    """A cache whose memory a test can read (held_by_walk)."""
    with FlowCache.in_shared_memory(64, TIMEOUTS) as c:
        yield c


def insert_all(cache, ids, backend, now, tclass=TimeoutClass.TCP):
    for i in ids:
        cache.insert(key(i), fid(i), backend, now_ms=now, timeout_class=tclass)


def lookup_all(cache, ids, now, flags):
    for i in ids:
        cache.lookup(key(i), fid(i), now_ms=now, tcp_flags=flags)


ACTIVE_STEPS = [
    # (description, operation, active flows of backends 0, 1, 2 after it)
    ("nothing cached", lambda c: None, [0, 0, 0]),
    ("5 flows to backend 0", lambda c: insert_all(c, range(5), 0, 0), [5, 0, 0]),
    ("3 to backend 1", lambda c: insert_all(c, range(5, 8), 1, 0), [5, 3, 0]),
    ("a UDP flow to backend 2", lambda c: insert_all(c, [8], 2, 0, TimeoutClass.UDP), [5, 3, 1]),
    ("a replace to another backend moves one", lambda c: insert_all(c, [0], 2, 0), [4, 3, 2]),
    ("a replace to the same backend moves none", lambda c: insert_all(c, [0], 2, 0), [4, 3, 2]),
    ("hits change nothing", lambda c: lookup_all(c, range(9), 0, ACK), [4, 3, 2]),
    ("FIN and RST: closing, still cached", lambda c: (lookup_all(c, [1], 10, FIN),
                                                      lookup_all(c, [5], 10, RST)), [4, 3, 2]),
    ("a retransmitted SYN of an open flow", lambda c: lookup_all(c, [2], 10, SYN), [4, 3, 2]),
    ("a SYN on a closed flow frees it", lambda c: lookup_all(c, [1], 20, SYN), [3, 3, 2]),
    ("age before the closing timeout", lambda c: c.age(109, c.sets), [3, 3, 2]),
    # Flow 5 timed out at 110 (closing, 100 ms): not live, but held until freed.
    ("timed out, not yet freed", lambda c: c.count(110), [3, 3, 2]),
    ("age frees the closed flow", lambda c: c.age(110, c.sets), [3, 2, 2]),
    ("an insert over a timed-out copy of its flow", lambda c: insert_all(c, [8], 1, 500),
     [3, 3, 1]),
    ("remove", lambda c: c.remove(key(6), fid(6)), [3, 2, 1]),
    ("remove of a flow not cached", lambda c: c.remove(key(6), fid(6)), [3, 2, 1]),
    ("idle expiry frees the rest", lambda c: c.age(2000, c.sets), [0, 0, 0]),
]


def test_active_flows_follow_every_write(shared):
    for description, operation, expected in ACTIVE_STEPS:
        operation(shared)
        active = shared.active_flows(3)
        assert (active.per_backend, active.total) == (expected, sum(expected)), description
        assert_counted_as_held(shared)
    assert shared.count(110) == 0


def test_active_flows_of_a_full_set(shared):
    """A refused insert counts nothing; an insert into a way whose flow timed
    out (no age() in between) moves that way's count to the new backend."""
    ids = same_set_ids(WAYS + 1, shared)
    for j in range(WAYS):
        shared.insert(key(j), ids[j], j % 2, now_ms=0, timeout_class=TimeoutClass.OTHER)
    with pytest.raises(Full):
        shared.insert(key(99), ids[WAYS], 5, now_ms=10)
    assert shared.active_flows(6).per_backend == [4, 4, 0, 0, 0, 0]
    shared.insert(key(99), ids[WAYS], 5, now_ms=200)   # the OTHER flows timed out at 200
    assert shared.active_flows(6).per_backend == [3, 4, 0, 0, 0, 1]
    assert shared.count(200) == 1 and shared.active_flows(0).total == WAYS
    assert_counted_as_held(shared)


def test_active_flows_across_handles_and_processes():
    """Handles count in their own slots: a flow one handle cached and another
    freed or moved still sums right, whichever process did it."""
    with FlowCache.in_shared_memory(64, TIMEOUTS) as first, \
            FlowCache.attach(first.memory, 64) as second:
        insert_all(first, range(10), 0, 0)
        second.remove(key(0), fid(0))
        insert_all(second, [1, 2], 1, 0)
        lookup_all(second, [3], 10, FIN)
        lookup_all(first, [3], 20, SYN)
        assert first.active_flows(2).per_backend == second.active_flows(2).per_backend == [6, 2]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with FlowCache.attach(first.memory, 64) as mine:
                    insert_all(mine, range(10, 20), 1, 0)
                    mine.remove(key(4), fid(4))
                    code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert first.active_flows(2).per_backend == [5, 12]
        assert_counted_as_held(first)


def test_ids_past_the_counted_ones_count_in_the_total_only(cache):
    cache.insert(key(1), fid(1), COUNTED_BACKENDS, now_ms=0)
    cache.insert(key(2), fid(2), 0xFFFFFFFF, now_ms=0)
    cache.insert(key(3), fid(3), COUNTED_BACKENDS - 1, now_ms=0)
    active = cache.active_flows(COUNTED_BACKENDS + 2)
    assert active.per_backend[-3:] == [1, 0, 0] and active.total == 3
    cache.insert(key(1), fid(1), 7, now_ms=0)
    assert cache.active_flows(8) == ActiveFlows([0] * 7 + [1], 3)


def test_active_flows_arguments(cache):
    from pylb._ffi import ffi, lib
    cache.insert(key(1), fid(1), 0, now_ms=0)
    assert cache.active_flows(0).per_backend == [] and cache.active_flows(0).total == 1
    total = ffi.new("uint64_t *")
    assert lib.pylb_flow_cache_active_flows(cache.handle, ffi.NULL, 0, total) == lib.PYLB_OK
    assert total[0] == 1
    assert lib.pylb_flow_cache_active_flows(cache.handle, ffi.NULL, 1, total) == lib.PYLB_EINVAL
    per = ffi.new("uint64_t[]", 1)
    assert lib.pylb_flow_cache_active_flows(ffi.NULL, per, 1, total) == lib.PYLB_EINVAL
    assert lib.pylb_flow_cache_active_flows(cache.handle, per, 1, ffi.NULL) == lib.PYLB_OK
    assert per[0] == 1


@pytest.mark.parametrize("seed", range(6))
def test_active_flows_equal_the_held_entries_after_any_mix_of_writes(seed):
    """Random inserts (new, replacing, into full sets, over timed-out flows),
    lookups with FIN, RST and SYN, removes, partial ageing and a clock that
    moves on: after every step the counters agree with a walk of the entries,
    and once everything timed out is freed, with the live flows exported."""
    rng = random.Random(seed)
    with FlowCache.in_shared_memory(64, TIMEOUTS) as c:
        now = 0
        for step in range(1500):
            i = rng.randrange(200)
            k, f = key(i), fid(i) if i % 3 else fid(i % 24)   # shared flow ids fill sets
            op = rng.random()
            if op < 0.45:
                try:
                    c.insert(k, f, rng.randrange(6), now_ms=now,
                             timeout_class=TimeoutClass(rng.randrange(4)))
                except Full:
                    pass
            elif op < 0.75:
                c.lookup(k, f, now_ms=now, tcp_flags=rng.choice([ACK, FIN, RST, SYN, SYN | ACK]))
            elif op < 0.85:
                c.remove(k, f)
            elif op < 0.9:
                c.age(now, rng.randrange(1, 4))
            else:
                now += rng.randrange(150)
            if step % 25 == 0:
                assert_counted_as_held(c)
        assert_counted_as_held(c)
        c.age(now, c.sets)
        live = Counter(e.backend for e in c.export(now))
        active = c.active_flows(6)
        assert Counter({b: k for b, k in enumerate(active.per_backend) if k}) == live
        assert active.total == c.count(now) == sum(live.values())


# ------------------------------------------------------------------ export

def exported(cache: FlowCache, now_ms: int, chunk: int) -> list[CacheEntry]:
    """export_chunk from cursor 0 to the end, checking each step of the cursor."""
    entries, cursor, sets = [], 0, cache.sets
    while cursor < sets:
        got, after = cache.export_chunk(now_ms, cursor, chunk)
        assert cursor < after <= sets, "every call moves the cursor on"
        assert len(got) <= chunk
        entries += got
        cursor = after
    assert cursor == sets
    return entries


def test_export_of_an_empty_cache(cache):
    assert cache.sets == cache.capacity // WAYS == 8
    assert list(cache.export(now_ms=0)) == []
    assert cache.export_chunk(0, 0, WAYS) == ([], cache.sets)
    assert cache.export_chunk(0, cache.sets, WAYS) == ([], cache.sets)  # over already


def mixed_flows(n: int) -> dict[bytes, CacheEntry]:
    """n flows inserted at times 0..n-1, of all classes, as export at now=999
    should see them (flows whose timeout ran out by then left out)."""
    classes = list(TimeoutClass)
    flows = {}
    for i in range(n):
        tclass, seen = classes[i % 4], i % 700
        if seen + TIMEOUT_OF[tclass] > 999:
            flows[key(i)] = CacheEntry(key(i), fid(i), 10_000 + i, 999 - seen, tclass)
    return flows


@pytest.mark.parametrize("chunk", [WAYS, WAYS + 3, 64, 4096])
def test_export_copies_exactly_the_live_flows(chunk):
    n = 1500
    with FlowCache(4096, TIMEOUTS) as c:
        classes = list(TimeoutClass)
        for i in range(n):
            c.insert(key(i), fid(i), 10_000 + i, now_ms=i % 700, timeout_class=classes[i % 4])
        want = mixed_flows(n)
        assert 0 < len(want) < n and c.count(999) == len(want)
        got = exported(c, 999, chunk)
        assert len(got) == len({e.key for e in got}), "a flow exported twice"
        assert {e.key: e for e in got} == want
        assert all(isinstance(e.timeout_class, TimeoutClass) for e in got)
        assert sorted(c.export(999, chunk=chunk), key=lambda e: e.key) == \
            sorted(got, key=lambda e: e.key)


def test_export_never_splits_a_set(cache):
    """A flow in set 2, then a full set 3: a chunk of WAYS takes set 2 and
    stops before set 3, which no longer fits whole, and the next call takes it."""
    ids = same_set_ids(WAYS, cache)
    for j in range(WAYS):
        cache.insert(key(j), ids[j], j, now_ms=0)
    cache.insert(key(100), 2, 100, now_ms=0)
    first, cursor = cache.export_chunk(0, 0, WAYS)
    assert [e.backend for e in first] == [100] and cursor == 3
    second, cursor = cache.export_chunk(0, cursor, WAYS)
    assert sorted(e.backend for e in second) == list(range(WAYS)) and cursor == cache.sets


def test_export_skips_expired_and_removed_flows(cache):
    cache.insert(key(1), fid(1), 1, now_ms=0, timeout_class=TimeoutClass.UDP)  # until 500
    cache.insert(key(2), fid(2), 2, now_ms=0, timeout_class=TimeoutClass.TCP)  # until 1000
    cache.insert(key(3), fid(3), 3, now_ms=0, timeout_class=TimeoutClass.TCP)
    assert cache.remove(key(3), fid(3))
    assert sorted(e.backend for e in cache.export(now_ms=499)) == [1, 2]
    assert [e.backend for e in cache.export(now_ms=500)] == [2]
    assert [e.backend for e in cache.export(now_ms=1000)] == []


@pytest.mark.parametrize("description,inserted,now,idle", [
    ("seen now", 100, 100, 0),
    ("seen earlier", 100, 350, 250),
    ("across the wrap of the clock", 2**32 - 100, 200, 300),
    ("stamped by a clock slightly ahead", 500, 490, 0),
])
def test_export_idle_time(cache, description, inserted, now, idle):
    cache.insert(key(1), fid(1), 7, now_ms=inserted)
    assert [e.idle_ms for e in cache.export(now_ms=now)] == [idle], description
    assert cache.peek(key(1), fid(1), now) == (7, idle)


def test_export_raw_fills_the_c_entries(cache):
    from pylb._ffi import ffi
    cache.insert(key(1), fid(1), 7, now_ms=0, timeout_class=TimeoutClass.OTHER)
    buf = ffi.new("struct pylb_cache_entry[]", WAYS)
    for e in buf:  # what the shim must overwrite
        e.vip, e.bucket, e.pad2, e.pad = 5, 5, 5, b"\x05\x05\x05"
    assert cache.export_raw(20, 0, buf, WAYS) == (1, cache.sets)
    e = buf[0]
    assert bytes(ffi.buffer(ffi.addressof(e, "key"))) == key(1)
    assert (e.flow_id, e.backend, e.idle_ms, e.timeout_class) == (fid(1), 7, 20,
                                                                   TimeoutClass.OTHER)
    assert (e.vip, e.bucket, e.pad2, bytes(e.pad)) == (-1, 0, 0, bytes(3))


@pytest.mark.parametrize("room", [0, 1, WAYS - 1])
def test_export_needs_room_for_a_set(cache, room):
    from pylb._ffi import ffi, lib
    cache.insert(key(1), fid(1), 7, now_ms=0)
    with pytest.raises(InvalidArgument):
        cache.export_chunk(0, 0, room)
    with pytest.raises(InvalidArgument):
        list(cache.export(0, chunk=room))
    # The shim itself refuses, and leaves the cursor alone.
    buf = ffi.new("struct pylb_cache_entry[]", WAYS)
    with pytest.raises(InvalidArgument):
        cache.export_raw(0, 0, buf, room)
    cursor = ffi.new("uint64_t *", 0)
    assert lib.pylb_flow_cache_export(cache.handle, 0, cursor, buf, room) == lib.PYLB_EINVAL
    assert cursor[0] == 0


def test_export_refuses_a_bad_cursor_or_buffer(cache):
    from pylb._ffi import ffi, lib
    buf = ffi.new("struct pylb_cache_entry[]", WAYS)
    with pytest.raises(InvalidArgument):
        cache.export_raw(0, cache.sets + 1, buf, WAYS)
    with pytest.raises(InvalidArgument):
        cache.export_raw(0, 0, buf, WAYS + 1)   # more than the buffer holds
    cursor = ffi.new("uint64_t *")
    assert lib.pylb_flow_cache_export(cache.handle, 0, ffi.NULL, buf, WAYS) == lib.PYLB_EINVAL
    assert lib.pylb_flow_cache_export(cache.handle, 0, cursor, ffi.NULL, WAYS) == lib.PYLB_EINVAL
    assert lib.pylb_flow_cache_export(ffi.NULL, 0, cursor, buf, WAYS) == lib.PYLB_EINVAL
    assert lib.pylb_flow_cache_sets(ffi.NULL) == 0


# ------------------------------------------------------------------ arguments and lifecycle

@pytest.mark.parametrize("capacity", [0, 2**31, 2**40])
def test_absurd_capacity_is_refused(capacity):
    with pytest.raises(InvalidArgument):
        FlowCache(capacity, TIMEOUTS)


@pytest.mark.parametrize("timeouts", [
    Timeouts(tcp=0), Timeouts(udp=2**31), Timeouts(other=0),
])
def test_bad_timeouts_are_refused(timeouts):
    with pytest.raises(InvalidArgument):
        FlowCache(8, timeouts)


@pytest.mark.parametrize("bad_key", [b"", b"\x00" * 39, b"\x00" * 41])
def test_key_must_be_40_bytes(cache, bad_key):
    with pytest.raises(InvalidArgument):
        cache.lookup(bad_key, 1, now_ms=0)


def test_bad_timeout_class_is_refused(cache):
    with pytest.raises(InvalidArgument):
        cache.insert(key(1), fid(1), 1, now_ms=0, timeout_class=4)


def test_closed_cache_refuses_calls():
    c = FlowCache(8, TIMEOUTS)
    c.close()
    c.close()
    with pytest.raises(StateError):
        c.lookup(key(1), fid(1), now_ms=0)


def test_attach_shares_the_table_and_its_timeouts():
    with FlowCache.in_shared_memory(100, TIMEOUTS) as first:
        with FlowCache.attach(first.memory, 100) as second:
            assert second.capacity == first.capacity
            first.insert(key(1), fid(1), 42, now_ms=0, timeout_class=TimeoutClass.UDP)
            assert second.lookup(key(1), fid(1), now_ms=0) == 42
            assert second.count(499) == 1 and second.count(500) == 0
            second.set_timeouts(Timeouts(udp=10))
            assert first.count(10) == 0
        assert first.lookup(key(1), fid(1), now_ms=5) == 42


def corrupt(memory: mmap.mmap, offset: int) -> None:
    memory[offset] ^= 0xFF


@pytest.mark.parametrize("description,capacity,damage", [
    ("never laid out", 64, "zero"),
    ("bad magic", 64, 0),
    ("bad version", 64, 8),
    ("other capacity", 8, None),
])
def test_attach_rejects_a_wrong_header(description, capacity, damage):
    with FlowCache.in_shared_memory(64, TIMEOUTS) as c:
        memory = c.memory
        if damage == "zero":
            memory[:HEADER] = bytes(HEADER)
        elif damage is not None:
            corrupt(memory, damage)
        with pytest.raises(InvalidArgument):
            FlowCache.attach(memory, capacity).close()


def test_attach_rejects_memory_too_small():
    with mmap.mmap(-1, footprint_for(64) - 64) as memory:
        with pytest.raises(InvalidArgument, match="needs"):
            FlowCache.attach(memory, 64)


# ------------------------------------------------------------------ concurrency

N_KEYS = 48
HOT = 5  # keys sharing one flow id (so one set): the same-set insert race
WRITERS = 3
ROUNDS = 20_000


def stress_keys():
    keys = [(key(i), fid(i)) for i in range(N_KEYS - HOT)]
    keys += [(key(1000 + j), 0xABCDEF) for j in range(HOT)]
    return keys


def backend_for(k: bytes, writer: int) -> int:
    """Each writer writes its own value for a key: a reader can tell a value
    that some writer wrote for this key from a torn or foreign one."""
    return (zlib.crc32(k) & 0xFFFFFF) * 16 + writer


def allowed(k: bytes) -> set[int]:
    return {backend_for(k, w) for w in range(WRITERS)}


def write_loop(cache: FlowCache, writer: int, rounds: int) -> None:
    keys = stress_keys()
    for r in range(rounds):
        k, f = keys[(r * 7 + writer) % len(keys)]
        if r % 5 == 4:
            cache.remove(k, f)
            continue
        try:
            cache.insert(k, f, backend_for(k, writer), now_ms=r,
                         timeout_class=TimeoutClass(r % 4))
        except Full:
            pass  # "contended": allowed when a writer is preempted mid-write


def read_loop(cache: FlowCache, rounds: int) -> list[str]:
    keys = stress_keys()
    errors = []
    for r in range(rounds):
        k, f = keys[r % len(keys)]
        got = cache.lookup(k, f, now_ms=r, tcp_flags=ACK)
        if got is not None and got not in allowed(k):
            errors.append(f"key {r % len(keys)}: {got}")
    return errors


def assert_one_entry_per_key(cache: FlowCache) -> None:
    # Nothing timed out (STRESS_TIMEOUTS): every entry held is live, so the
    # counters, kept by racing writers, must add up to the live count.
    assert cache.active_flows(0).total == cache.count(ROUNDS)
    keys = stress_keys()
    for n, (k, f) in enumerate(keys):
        cache.insert(k, f, n, now_ms=ROUNDS)
    assert cache.count(ROUNDS) == len(keys)
    assert [cache.lookup(k, f, now_ms=ROUNDS) for k, f in keys] == list(range(len(keys)))


STRESS_TIMEOUTS = Timeouts(tcp=10**6, tcp_closing=10**6, udp=10**6, other=10**6)


def test_threads_see_only_written_values_and_no_duplicates():
    with FlowCache(256, STRESS_TIMEOUTS) as cache:
        errors: list[str] = []
        failures: list[BaseException] = []

        def run(target, *args):
            try:
                result = target(cache, *args)
                if result:
                    errors.extend(result)
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(write_loop, w, ROUNDS))
                   for w in range(WRITERS)]
        threads += [threading.Thread(target=run, args=(read_loop, ROUNDS)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert not errors
        assert_one_entry_per_key(cache)


def test_processes_share_a_mapping_safely():
    with FlowCache.in_shared_memory(256, STRESS_TIMEOUTS) as cache:
        children = []
        for role in range(WRITERS + 2):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    # A second handle on the inherited mapping, as a worker would.
                    with FlowCache.attach(cache.memory, 256) as mine:
                        if role < WRITERS:
                            write_loop(mine, role, ROUNDS)
                            code = 0
                        else:
                            code = 2 if read_loop(mine, ROUNDS) else 0
                finally:
                    os._exit(code)
            children.append(pid)
        errors = read_loop(cache, ROUNDS)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        assert codes == [0] * len(children)
        assert not errors
        assert_one_entry_per_key(cache)


@pytest.mark.parametrize("flags,rounds", [
    pytest.param(["-O2"], 100_000, id="optimised"),
    pytest.param(["-O1", "-fsanitize=thread", "-Wno-tsan"], 5_000, id="tsan"),
])
def test_native_stress(tmp_path, flags, rounds):
    """The C race test (tests/native/flow_cache_stress.c): no duplicate entry
    for a key, no value read under another key, no data race."""
    if not shutil.which("gcc") or not shutil.which("pkg-config"):
        pytest.skip("needs gcc and pkg-config")
    dpdk = subprocess.run(["pkg-config", "--cflags", "libdpdk"], capture_output=True, text=True)
    if dpdk.returncode:
        pytest.skip("no libdpdk for rte_malloc.h")
    binary = tmp_path / "stress"
    build = subprocess.run(
        ["gcc", *flags, "-g", "-pthread", "-D_GNU_SOURCE", f"-I{ROOT / 'native'}",
         *dpdk.stdout.split(), str(ROOT / "tests/native/flow_cache_stress.c"),
         str(ROOT / "native/flow_cache.c"), str(ROOT / "native/error.c"), "-o", str(binary)],
        capture_output=True, text=True)
    if build.returncode and "sanitize" in " ".join(flags):
        pytest.skip(f"no ThreadSanitizer: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary), str(rounds)], capture_output=True, text=True, timeout=120)
    if "FATAL: ThreadSanitizer" in run.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr[-300:]}")
    assert run.returncode == 0 and "WARNING" not in run.stderr, run.stdout + run.stderr[-3000:]
