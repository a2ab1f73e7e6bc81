"""Compiles a configuration into the shim's immutable forwarding block.

Backend ids: every (VIP, backend) pair gets its own id, so per-backend
counters also sum to per-VIP ones. A VIP's table holds ids. Its history
(docs/state-exchange.md, "Table generations") is the set of *stateful*
buckets, those a change still in force moved, with each one's previous
backend (the one before the oldest such change) and when it last moved;
backends that left keep an id, marked drained, so flows that predate the
change can still reach them.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import threading
import time
from array import array
from dataclasses import dataclass

import structlog

from pylb import maglev
from pylb._ffi import KEY_LEN, check, ffi, ip_to_c, lib
from pylb.config import Config, Vip
from pylb.errors import StateError

log = structlog.get_logger("pylb.dataplane")
NO_BACKEND = 0xFFFFFFFF
ENCAP_KIND = {"ipip": 1, "vxlan": 2, "gue": 3}
VIP_ANSWER_ARP = 1
VIP_TRACK_ALL = 2


@dataclass(frozen=True)
class BackendRef:
    id: int
    vip: str
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    weight: int
    active: bool          # in the current configuration (False: left; cached flows still reach it)


@dataclass(frozen=True)
class VipTables:
    """A VIP's backend names and table (indices into names) of one generation."""

    names: tuple[str, ...]
    table: array

    @classmethod
    def build(cls, vip: Vip) -> "VipTables":
        backends = [maglev.Backend(b.name, b.weight) for b in vip.backends]
        table = maglev.build_table_native(backends, vip.table_size)
        return cls(tuple(b.name for b in vip.backends), array("I", table))


@dataclass(frozen=True)
class VipHistory:
    """A VIP's stateful buckets. flags[b]: 1 where bucket b is stateful;
    previous[b]: its backend id before the oldest change in force on it;
    moved_at[b]: monotonic seconds of its last move. Never changed once
    built: a new generation gets new arrays."""

    flags: bytes
    previous: array
    moved_at: array

    @functools.cached_property
    def stateful(self) -> list[int]:
        return [m.start() for m in re.finditer(b"\x01", self.flags)]

@dataclass(frozen=True)
class Classification:
    vip: str | None
    flow_id: int
    bucket: int
    current: BackendRef | None
    previous: BackendRef | None   # the current one where the bucket is not stateful
    stateful: bool = False

    @property
    def moved(self) -> bool:
        """A bucket a change in force moved: its flows may have state (the
        fast path's "moved", docs/state-exchange.md)."""
        return self.stateful


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


class BackendRegistry:
    """Stable backend ids. Flow caches hold ids, so an id keeps meaning the same
    (VIP, backend name, address) for the life of the balancer: a backend that
    leaves the configuration keeps its id and address, and cached flows still
    reach it until they end. Ids are not reused."""

    def __init__(self):
        self._ids: dict[tuple, int] = {}
        self.entries: list[tuple[str, str, object]] = []    # id -> (vip, name, address)

    def id_for(self, vip: str, name: str, address) -> int:
        key = (vip, name, ipaddress.ip_address(address))
        if key not in self._ids:
            self._ids[key] = len(self.entries)
            self.entries.append(key)
        return self._ids[key]

    def __len__(self) -> int:
        return len(self.entries)


class Dataplane:
    """A compiled configuration. The worker that uses it owns it once set; a
    Dataplane never set on a worker is freed by close()."""

    def __init__(self, config: Config, generation: int, registry: BackendRegistry | None = None,
                 previous: "Dataplane | None" = None, current: dict[str, VipTables] | None = None,
                 retire: dict[str, list[int]] | None = None, now: float | None = None,
                 learnt: dict[str, VipHistory | None] | None = None,
                 unknown_history: bool = False):
        """registry: the balancer's backend ids (a fresh one if None). previous:
        the generation this one replaces: buckets whose backend differs from
        its current tables become stateful, and its stateful buckets stay so.
        current: tables built already (else Maglev). retire: buckets per VIP
        to stop treating as stateful. now: the monotonic time of the change.
        learnt: histories given whole, per VIP (pylb/history.py: the tables
        in force learnt from a member), instead of previous's.
        unknown_history: the tables in force are not known yet, so every
        bucket is stateful (misses are punted, never forwarded by a table
        that may not be the one their flows started on); the previous
        backend is the current one."""
        self._dp = None
        self._classify_io = threading.local()
        self.config = config
        self.generation = generation
        self.registry = registry if registry is not None else BackendRegistry()
        self.tables: dict[str, VipTables] = {}
        self.ids: dict[str, array] = {}            # current tables as backend ids
        self.history: dict[str, VipHistory] = {}   # VIPs with stateful buckets
        # The history of the changes this balancer knows of: the one in force,
        # except while the tables in force are unknown (all stateful then).
        self.known_history: dict[str, VipHistory] = {}
        self.newly_moved: dict[str, list[int]] = {}  # buckets this change moved
        now = time.monotonic() if now is None else now
        keep = []
        vips = ffi.new("struct pylb_dp_vip[]", len(config.vips))
        track_all = config.balancer.flow_cache.track == "all"
        weights: dict[int, int] = {}
        for i, vip in enumerate(config.vips):
            cur = (current or {}).get(vip.name) or VipTables.build(vip)
            self.tables[vip.name] = cur
            ids = {}
            for b in vip.backends:
                ids[b.name] = self.registry.id_for(vip.name, b.name, b.address)
                weights[ids[b.name]] = b.weight
            cur_ids = self.ids[vip.name] = self._ids_table(cur, ids)
            v = vips[i]
            v.current = self._c_array("uint32_t[]", cur_ids, keep)
            if learnt is not None:
                history = learnt.get(vip.name)
            else:
                history = self._history(vip.name, cur_ids, previous, now)
            if history is not None and retire and retire.get(vip.name):
                flags = bytearray(history.flags)
                for b in retire[vip.name]:
                    flags[b] = 0
                history = VipHistory(bytes(flags), history.previous, history.moved_at) \
                    if any(flags) else None
            if history is not None:
                self.known_history[vip.name] = history
            if unknown_history:
                n = len(cur_ids)
                history = VipHistory(b"\x01" * n, cur_ids, array("d", [now]) * n)
            if history is not None:
                self.history[vip.name] = history
                v.previous = self._c_array("uint32_t[]", history.previous, keep)
                v.stateful = ffi.from_buffer("uint8_t[]", history.flags)
                keep.append(v.stateful)
            ip_to_c(vip.address, v.addr)
            v.proto = vip.protocol_number
            v.port = vip.port or 0
            v.flags = (VIP_ANSWER_ARP if vip.answer_arp else 0) | (VIP_TRACK_ALL if track_all else 0)
            v.table_size = vip.table_size
            v.encap.kind = ENCAP_KIND[vip.encap.type]
            v.encap.ttl = vip.encap.ttl
            v.encap.udp_dport = vip.encap.udp_port()
            v.encap.vni = vip.encap.vni
            ffi.memmove(v.encap.inner_mac, _mac_bytes(vip.encap.inner_mac), 6)
        self.vip_names = [v.name for v in config.vips]
        vip_index = {name: i for i, name in enumerate(self.vip_names)}
        self.backends = [BackendRef(i, vip, name, address, weights.get(i, 0), i in weights)
                         for i, (vip, name, address) in enumerate(self.registry.entries)]
        self._compile(config, vips, vip_index)

    def _history(self, vip: str, cur_ids: array, previous: "Dataplane | None",
                 now: float) -> VipHistory | None:
        """The VIP's stateful buckets after this change: the ones it moves
        join those already stateful (keeping their older previous backend)."""
        if previous is None or vip not in previous.ids:
            return None
        old_ids = previous.ids[vip]
        old = previous.known_history.get(vip)
        if len(old_ids) != len(cur_ids):
            # A new table size rehashes every flow: no bucket maps to an old one.
            log.warning("table size changed: flows older than the change may move", vip=vip)
            return None
        if old_ids == cur_ids:
            return old
        moved = [b for b, (x, y) in enumerate(zip(old_ids, cur_ids)) if x != y]
        self.newly_moved[vip] = moved
        prev = array("I", old.previous) if old else array("I", old_ids)
        moved_at = array("d", old.moved_at) if old else array("d", bytes(8 * len(cur_ids)))
        flags = bytearray(old.flags) if old else bytearray(len(cur_ids))
        for b in moved:
            if not flags[b]:
                prev[b] = old_ids[b]
                flags[b] = 1
            moved_at[b] = now
        return VipHistory(bytes(flags), prev, moved_at)

    @staticmethod
    def _ids_table(tables: VipTables, ids: dict[str, int]) -> array:
        return array("I", [ids[tables.names[t]] if t != NO_BACKEND else NO_BACKEND
                           for t in tables.table])

    @staticmethod
    def _c_array(ctype: str, values: array, keep: list):
        c = ffi.new(ctype, len(values))
        ffi.memmove(c, values, len(values) * values.itemsize)
        keep.append(c)
        return c

    def _compile(self, config: Config, vips, vip_index: dict[str, int]) -> None:
        data = config.balancer.data
        conf = ffi.new("struct pylb_dp_conf *")
        conf.generation = self.generation
        conf.flow_seed = self.flow_seed = config.balancer.flow_seed
        if data.address_v4:
            ip_to_c(data.address_v4, conf.local_v4)
            conf.has_v4 = 1
        if data.address_v6:
            ip_to_c(data.address_v6, conf.local_v6)
            conf.has_v6 = 1
        if data.gateway_v4:
            ip_to_c(data.gateway_v4, conf.gateway_v4)
        if data.gateway_v6:
            ip_to_c(data.gateway_v6, conf.gateway_v6)
        conf.exception_policy = 1 if data.exception.policy == "tap" else 0
        conf.mtu = data.mtu
        conf.peer_port = config.cluster.peer_port if config.cluster else 0
        backends = ffi.new("struct pylb_dp_backend[]", max(1, len(self.backends)))
        for ref in self.backends:
            ip_to_c(ref.address, backends[ref.id].addr)
            backends[ref.id].vip = vip_index.get(ref.vip, NO_BACKEND)
            backends[ref.id].weight_zero = int(ref.weight == 0)
        conf.n_backends = len(self.backends)
        conf.backends = backends
        conf.n_vips = len(config.vips)
        conf.vips = vips
        out = ffi.new("struct pylb_dataplane **")
        check(lib.pylb_dataplane_compile(conf, out), "compiling the dataplane")
        self._dp = out[0]
        self._owned = True

    @property
    def handle(self):
        if self._dp is None:
            raise StateError("dataplane is freed")
        return self._dp

    def give_away(self):
        """Hands the C block to a worker, which frees it when replaced."""
        self._owned = False
        return self.handle

    def flow_id(self, raw: bytes) -> int:
        """The flow id of a 40-byte flow key, as the fast path computes it."""
        return lib.pylb_flow_id(ffi.from_buffer("struct pylb_flow_key *", raw), self.flow_seed)

    def classify(self, key) -> Classification:
        """What the fast path decides for a pylb.flow_id.FlowKey, or its
        40-byte form (FlowKey.to_bytes(), struct pylb_flow_key); no packet needed."""
        raw = key if isinstance(key, bytes) else key.to_bytes()
        # The miss path classifies several times per packet: the C arguments
        # are made once per thread (the admin API may classify from another).
        io = self._classify_io.__dict__
        if not io:
            io.update(k=ffi.new("struct pylb_flow_key *"), vip=ffi.new("int32_t *"),
                      fid=ffi.new("uint64_t *"), u32=ffi.new("uint32_t[3]"),
                      stateful=ffi.new("uint8_t *"))
        k, vip, fid, u32, stateful = io["k"], io["vip"], io["fid"], io["u32"], io["stateful"]
        if len(raw) != KEY_LEN:
            raise ValueError(f"a flow key is {KEY_LEN} bytes, not {len(raw)}")
        ffi.memmove(k, raw, KEY_LEN)
        check(lib.pylb_dataplane_classify(self.handle, k, vip, fid, u32, u32 + 1, u32 + 2,
                                          stateful), "classify")
        cur, prev = u32[1], u32[2]
        return Classification(self.vip_names[vip[0]] if vip[0] >= 0 else None, fid[0], u32[0],
                              self.backends[cur] if cur != NO_BACKEND else None,
                              self.backends[prev] if prev != NO_BACKEND else None,
                              bool(stateful[0]))

    def close(self) -> None:
        if self._dp is not None and self._owned:
            lib.pylb_dataplane_free(self._dp)
        self._dp = None
