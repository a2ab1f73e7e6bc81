"""Memory per flow: in the flow cache (the fast path's table) and in the
owners' StateStore (Python), with what 10M flows cost.

Baselines from the same run: the 40-byte flow key for the cache entry (the
least any table that tells flows apart must hold), and a plain dict of the
same 40-byte keys to an int, allocated the same way, for the store."""
from __future__ import annotations

import ipaddress
import os
import tracemalloc

from pylb.flow_cache import KEY_SIZE, FlowCache, footprint_for
from pylb.peer import Message, MessageType, StateRecord, View, decode, encode, make_version
from pylb.state_store import StateStore

TEN_MILLION = 10_000_000
RECORDS = 20_000 if os.environ.get("PYLB_BENCH_QUICK") else 100_000
BACKEND = ipaddress.ip_address("203.0.113.100").packed


def _key(i: int) -> bytes:
    """A flow key as the peer protocol decodes it: a fresh bytes object."""
    return (b"\0" * 10 + b"\xff\xff" + bytes((198, 18, i >> 16 & 255, i >> 8 & 255))
            + b"\0" * 10 + b"\xff\xff" + bytes((192, 0, 2, 10))
            + (1024 + (i & 255)).to_bytes(2, "little") + (80).to_bytes(2, "little")
            + bytes((6, 0, 0, 0)))


def _fill_store(n: int) -> StateStore:
    """Records as an owner gets them: decoded from pushes of 18."""
    store = StateStore()
    version = make_version(1_000_000, 0)
    backend = ipaddress.IPv4Address(BACKEND)
    view = View(1, 1, 1)
    for start in range(0, n, 18):
        records = [StateRecord(_key(i), backend, version, 0, False)
                   for i in range(start, min(n, start + 18))]
        data = encode(Message(MessageType.STATE_PUSH, 1, view, start + 1, records), None)
        del records
        for rec in decode(data, None).records:
            store.put(rec)
    return store


def _fill_dict(n: int) -> dict:
    return {_key(i): 1 for i in range(n)}


def _traced_bytes(make, n: int) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make(n)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return (after - before) / n


def test_flow_cache_memory_per_flow(benchmark, eal):
    def create():
        with FlowCache(1 << 20) as cache:
            return cache.footprint, cache.capacity

    footprint, capacity = benchmark.pedantic(create, rounds=3, iterations=1)
    # The runner's sizing for 10M flows: twice the flows (docs/flow-cache.md).
    ten_m = footprint_for(2 * TEN_MILLION)
    benchmark.extra_info.update({
        # What doubling the capacity adds: the fixed part (header, counters) aside.
        "bytes_per_entry": (footprint_for(2 * capacity) - footprint) / capacity,
        "key_bytes": KEY_SIZE,
        "ten_million_footprint_bytes": ten_m,
        "ten_million_bytes_per_flow": ten_m / TEN_MILLION,
    })


def test_owner_store_memory_per_record(benchmark):
    """The time is for putting RECORDS records; the memory, traced apart."""
    benchmark.pedantic(_fill_store, args=(RECORDS,), rounds=3, iterations=1)
    per_record = _traced_bytes(_fill_store, RECORDS)
    per_dict_entry = _traced_bytes(_fill_dict, RECORDS)
    benchmark.extra_info.update({
        "records": RECORDS,
        "bytes_per_record": per_record,
        "dict_bytes_per_entry": per_dict_entry,
        "ten_million_bytes": per_record * TEN_MILLION,
    })
