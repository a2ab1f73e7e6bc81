"""The flow cache: flow key -> backend id, lock-free, bounded, aging.

A wrapper over native/flow_cache.c (design in docs/flow-cache.md). The table
can live in an anonymous shared mapping so that forked worker processes share
it; each process then uses its own handle on the same memory.

Keys are the 40-byte form of a flow key (``FlowKey.to_bytes()``); the flow id
is passed in, never recomputed here. Times are milliseconds of a monotonic
clock, taken modulo 2**32.
"""
from __future__ import annotations

import dataclasses
import enum
import mmap
from collections.abc import Iterator

from pylb._ffi import check, ffi, lib
from pylb.errors import InvalidArgument, StateError

KEY_SIZE = 40
WAYS = lib.PYLB_FLOW_CACHE_WAYS
LOOKUP_BURST_MAX = lib.PYLB_LOOKUP_BURST_MAX
COUNTED_BACKENDS = lib.PYLB_FLOW_CACHE_COUNTED_BACKENDS
EXPORT_CHUNK = 4096
_U32 = 0xFFFFFFFF


class TimeoutClass(enum.IntEnum):
    """How long an idle flow stays cached (see Timeouts)."""

    TCP = lib.PYLB_TO_TCP
    TCP_CLOSING = lib.PYLB_TO_TCP_CLOSING
    UDP = lib.PYLB_TO_UDP
    OTHER = lib.PYLB_TO_OTHER


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in ms per TimeoutClass; each in 1 .. 2**31 - 1."""

    tcp: int = 300_000
    tcp_closing: int = 10_000
    udp: int = 30_000
    other: int = 30_000

    def _to_c(self):
        return ffi.new("uint32_t[4]", [self.tcp, self.tcp_closing, self.udp, self.other])


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A live flow as FlowCache.export copies it out."""

    key: bytes        # 40 bytes, as the FlowCache methods take it
    flow_id: int
    backend: int
    idle_ms: int      # since the flow was last seen
    timeout_class: TimeoutClass


@dataclasses.dataclass(frozen=True)
class ActiveFlows:
    """The entries a cache holds, from its counters (pylb_flow_cache_active_flows):
    per_backend[id] for the ids asked (ids from COUNTED_BACKENDS on read 0;
    `total` counts them). Timed-out entries count until age() frees them."""

    per_backend: list[int]
    total: int


def now_ms() -> int:
    """The flow cache's clock (the shim's pylb_now_ms): monotonic ms, 32 bits."""
    return lib.pylb_now_ms()


def footprint_for(capacity: int) -> int:
    """Bytes of memory a cache of `capacity` flows needs."""
    size = lib.pylb_flow_cache_footprint(capacity)
    if size == 0:
        raise InvalidArgument(f"flow cache capacity {capacity} out of range")
    return size


def _key(key: bytes):
    if len(key) != KEY_SIZE:
        raise InvalidArgument(f"flow key must be {KEY_SIZE} bytes, not {len(key)}")
    return ffi.from_buffer("struct pylb_flow_key *", key)


class FlowCache:
    """A handle on a flow cache. Close it (or use `with`); nothing is freed
    implicitly. A handle may be used from several threads at once."""

    def __init__(self, capacity: int, timeouts: Timeouts = Timeouts()):
        out = ffi.new("struct pylb_flow_cache **")
        check(lib.pylb_flow_cache_create(capacity, timeouts._to_c(), out), "flow cache")
        self._init(out[0], None, None, owns_memory=False)

    def _init(self, handle, memory, view, owns_memory: bool) -> None:
        self._handle = handle
        self._memory = memory
        self._view = view
        self._owns_memory = owns_memory
        self._shared_zone: str | None = None    # create_shared's: freed at close

    @classmethod
    def _on_memory(cls, memory, capacity: int, init: bool, timeouts: Timeouts | None,
                   owns_memory: bool) -> "FlowCache":
        view = ffi.from_buffer(memory, require_writable=True)
        out = ffi.new("struct pylb_flow_cache **")
        c_timeouts = timeouts._to_c() if timeouts is not None else ffi.NULL
        try:
            check(lib.pylb_flow_cache_attach(view, len(view), capacity, int(init), c_timeouts,
                                             out), "flow cache attach")
        except BaseException:
            ffi.release(view)
            raise
        self = cls.__new__(cls)
        self._init(out[0], memory, view, owns_memory)
        return self

    @classmethod
    def in_shared_memory(cls, capacity: int, timeouts: Timeouts = Timeouts()) -> "FlowCache":
        """A cache in an anonymous MAP_SHARED mapping: processes forked after this
        share it (the inherited handle works in the child)."""
        memory = mmap.mmap(-1, footprint_for(capacity), flags=mmap.MAP_SHARED)
        try:
            return cls._on_memory(memory, capacity, True, timeouts, owns_memory=True)
        except BaseException:
            memory.close()
            raise

    @classmethod
    def create_shared(cls, name: str, capacity: int, timeouts: Timeouts = Timeouts()) -> "FlowCache":
        """A cache in a named hugepage memzone, for a balancer's worker
        processes (DPDK primary and secondaries); close() frees the memzone."""
        out = ffi.new("struct pylb_flow_cache **")
        check(lib.pylb_flow_cache_create_shared(name.encode(), capacity, timeouts._to_c(), out),
              "shared flow cache")
        self = cls.__new__(cls)
        self._init(out[0], None, None, owns_memory=False)
        self._shared_zone = name
        return self

    @classmethod
    def attach_shared(cls, name: str, capacity: int) -> "FlowCache":
        """In a DPDK secondary process: the cache create_shared made."""
        out = ffi.new("struct pylb_flow_cache **")
        check(lib.pylb_flow_cache_attach_shared(name.encode(), capacity, out),
              "attaching the shared flow cache")
        self = cls.__new__(cls)
        self._init(out[0], None, None, owns_memory=False)
        return self

    @classmethod
    def attach(cls, memory, capacity: int, timeouts: Timeouts | None = None) -> "FlowCache":
        """Another handle on a cache already laid out in `memory` (a writable,
        64-byte aligned buffer such as an mmap, which must outlive the handle).
        `timeouts`, when given, replace the shared ones."""
        return cls._on_memory(memory, capacity, False, timeouts, owns_memory=False)

    @property
    def memory(self):
        """The shared mapping of an in_shared_memory or attached cache, else None."""
        return self._memory

    def close(self) -> None:
        if self._handle is None:
            return
        lib.pylb_flow_cache_destroy(self._handle)
        self._handle = None
        if self._view is not None:
            ffi.release(self._view)
        if self._owns_memory:
            self._memory.close()
        if self._shared_zone is not None:
            lib.pylb_flow_cache_free_shared(self._shared_zone.encode())
        self._memory = self._view = None

    def __enter__(self) -> "FlowCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def handle(self):
        """The C handle, for other pylb modules (the worker) only."""
        return self._c()

    def _c(self):
        if self._handle is None:
            raise StateError("flow cache is closed")
        return self._handle

    @property
    def capacity(self) -> int:
        """Flows the cache holds: the requested capacity rounded up to a power
        of two number of sets of WAYS."""
        return lib.pylb_flow_cache_capacity(self._c())

    @property
    def footprint(self) -> int:
        """Bytes of table memory (header included)."""
        return lib.pylb_flow_cache_footprint(self.capacity)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Changes the timeouts for every handle on this cache."""
        check(lib.pylb_flow_cache_set_timeouts(self._c(), timeouts._to_c()), "flow cache timeouts")

    def lookup(self, key: bytes, flow_id: int, now_ms: int, tcp_flags: int = 0) -> int | None:
        """The backend of a live flow (refreshing it; FIN or RST moves TCP to
        TCP_CLOSING), or None."""
        backend = ffi.new("uint32_t *")
        hit = check(lib.pylb_flow_cache_lookup(self._c(), _key(key), flow_id, now_ms & _U32,
                                               tcp_flags, backend), "flow cache lookup")
        return backend[0] if hit else None

    def lookup_burst(self, keys: list[bytes], flow_ids: list[int], now_ms: int,
                     tcp_flags: list[int] | None = None) -> list[int | None]:
        """lookup() of many flows in one call, in order, each set prefetched
        before any is read (pylb_flow_cache_lookup_burst): the backend of each
        live flow, or None. At most LOOKUP_BURST_MAX flows per call."""
        n = len(keys)
        if len(flow_ids) != n or (tcp_flags is not None and len(tcp_flags) != n):
            raise InvalidArgument("keys, flow ids and TCP flags differ in number")
        if n > LOOKUP_BURST_MAX:
            raise InvalidArgument(f"{n} flows in one burst: at most {LOOKUP_BURST_MAX}")
        held = [_key(k) for k in keys]  # alive until the call returns
        c_keys = ffi.new("struct pylb_flow_key *[]", held or 1)
        ids = ffi.new("uint64_t[]", flow_ids or [0])
        flags = ffi.new("uint8_t[]", tcp_flags) if tcp_flags else ffi.NULL
        backends = ffi.new("uint32_t[]", max(n, 1))
        mask = ffi.new("uint64_t *")
        check(lib.pylb_flow_cache_lookup_burst(self._c(), c_keys, ids, flags, n, now_ms & _U32,
                                               backends, mask), "flow cache lookup burst")
        return [backends[i] if mask[0] >> i & 1 else None for i in range(n)]

    def insert(self, key: bytes, flow_id: int, backend: int, now_ms: int,
               timeout_class: TimeoutClass = TimeoutClass.TCP) -> None:
        """Caches or replaces a flow. Raises Full when its set holds only live flows."""
        check(lib.pylb_flow_cache_insert(self._c(), _key(key), flow_id, backend, now_ms & _U32,
                                         timeout_class), "flow cache insert")

    def peek(self, key: bytes, flow_id: int, now_ms: int) -> tuple[int, int] | None:
        """(backend, ms idle) of a live flow without refreshing it, else None."""
        backend = ffi.new("uint32_t *")
        idle = ffi.new("uint32_t *")
        hit = check(lib.pylb_flow_cache_peek(self._c(), _key(key), flow_id,
                                             now_ms & _U32, backend, idle), "flow cache peek")
        return (backend[0], idle[0]) if hit else None

    def remove(self, key: bytes, flow_id: int) -> bool:
        """Forgets a flow; False if it was not cached."""
        status = lib.pylb_flow_cache_remove(self._c(), _key(key), flow_id)
        if status == lib.PYLB_ENOTFOUND:
            return False
        check(status, "flow cache remove")
        return True

    def age(self, now_ms: int, max_sets: int) -> int:
        """Frees expired flows in up to max_sets sets after the last ones aged;
        returns how many it freed."""
        return lib.pylb_flow_cache_age(self._c(), now_ms & _U32, max_sets)

    def count(self, now_ms: int) -> int:
        """Live flows (a full scan)."""
        return lib.pylb_flow_cache_count(self._c(), now_ms & _U32)

    def active_flows(self, n_backends: int) -> ActiveFlows:
        """Entries held per backend id 0 .. n_backends-1 and in all, from the
        counters every write keeps (no scan of the entries)."""
        per = ffi.new("uint64_t[]", max(n_backends, 1))
        total = ffi.new("uint64_t *")
        check(lib.pylb_flow_cache_active_flows(self._c(), per, n_backends, total),
              "flow cache active flows")
        return ActiveFlows(list(per[0:n_backends]), total[0])

    @property
    def sets(self) -> int:
        """Sets of WAYS flows: the cursor value at which an export is over."""
        return lib.pylb_flow_cache_sets(self._c())

    def export(self, now_ms: int, chunk: int = EXPORT_CHUNK) -> Iterator[CacheEntry]:
        """Every flow live at now_ms, scanned `chunk` entries at a time (at least
        WAYS). Flows written during the scan may be missed; none comes twice."""
        buf = self._export_buffer(chunk)
        cursor, end = 0, self.sets
        while cursor < end:
            n, cursor = self.export_raw(now_ms, cursor, buf, chunk)
            yield from (_entry(buf[i]) for i in range(n))

    def export_chunk(self, now_ms: int, cursor: int,
                     max_entries: int) -> tuple[list[CacheEntry], int]:
        """The live flows of whole sets from set `cursor` on, at most `max_entries`
        (at least WAYS), and the cursor to continue from (`sets` when done)."""
        buf = self._export_buffer(max_entries)
        n, cursor = self.export_raw(now_ms, cursor, buf, max_entries)
        return [_entry(buf[i]) for i in range(n)], cursor

    def export_raw(self, now_ms: int, cursor: int, buf, max_entries: int) -> tuple[int, int]:
        """export_chunk into a caller's ffi.new("struct pylb_cache_entry[]", n)
        array, n >= max_entries, for C code to work on (pylb_dataplane_keep_divergent):
        (entries written, next cursor). For other pylb modules only."""
        if max_entries > len(buf):
            raise InvalidArgument(f"export of {max_entries} entries into a buffer of {len(buf)}")
        c_cursor = ffi.new("uint64_t *", cursor)
        n = check(lib.pylb_flow_cache_export(self._c(), now_ms & _U32, c_cursor, buf,
                                             max_entries),
                  "flow cache export")
        return n, c_cursor[0]

    @staticmethod
    def _export_buffer(max_entries: int):
        if max_entries < WAYS:  # before allocating: the shim would refuse it anyway
            raise InvalidArgument(f"export of {max_entries} entries: a set needs {WAYS}")
        return ffi.new("struct pylb_cache_entry[]", max_entries)


def _entry(c_entry) -> CacheEntry:
    return CacheEntry(key=bytes(ffi.buffer(ffi.addressof(c_entry, "key"))),
                      flow_id=c_entry.flow_id, backend=c_entry.backend,
                      idle_ms=c_entry.idle_ms,
                      timeout_class=TimeoutClass(c_entry.timeout_class))
