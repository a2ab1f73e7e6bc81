"""Compiles a configuration into the shim's immutable forwarding block.

Backend ids: every (VIP, backend) pair gets its own id, so per-backend
counters also sum to per-VIP ones. A VIP's table holds ids. A previous
generation (rule 3/4 of docs/state-exchange.md) is given as the VIP's older
backend list and table; backends that left keep an id, marked drained, so
flows that predate the change can still reach them.
"""
from __future__ import annotations

import ipaddress
from array import array
from dataclasses import dataclass

from pylb import maglev
from pylb._ffi import check, ffi, ip_bytes16, ip_to_c, lib
from pylb.config import Config, Vip
from pylb.errors import StateError

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
class Classification:
    vip: str | None
    flow_id: int
    bucket: int
    current: BackendRef | None
    previous: BackendRef | None

    @property
    def moved(self) -> bool:
        return self.current != self.previous


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
                 previous: "Dataplane | None" = None, current: dict[str, VipTables] | None = None):
        """registry: the balancer's backend ids (a fresh one if None). previous:
        the generation this one replaces; its current tables become this one's
        previous tables. current: tables built already (else Maglev)."""
        self._dp = None
        self.changed = False      # some VIP's current table differs from `previous`'s
        self.config = config
        self.generation = generation
        self.registry = registry if registry is not None else BackendRegistry()
        self.tables: dict[str, VipTables] = {}
        self.previous: dict[str, VipTables] = {}
        prior = {(r.vip, r.name): r.address for r in previous.backends} if previous else {}
        c_tables = []
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
            v = vips[i]
            v.current = self._ids_table(cur, ids, c_tables)
            prev = None
            if previous is not None and vip.name in previous.tables:
                if previous.tables[vip.name] == cur:
                    # Unchanged: an older generation still in force stays so.
                    prev = previous.previous.get(vip.name)
                else:
                    prev = previous.tables[vip.name]
                    self.changed = True
            if prev is not None:
                self.previous[vip.name] = prev
                for name in prev.names:
                    if name not in ids:
                        ids[name] = self.registry.id_for(vip.name, name, prior[(vip.name, name)])
                v.previous = self._ids_table(prev, ids, c_tables)
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

    @staticmethod
    def _ids_table(tables: VipTables, ids: dict[str, int], keep: list):
        c = ffi.new("uint32_t[]", [ids[tables.names[t]] if t != NO_BACKEND else NO_BACKEND
                                   for t in tables.table])
        keep.append(c)
        return c

    def _compile(self, config: Config, vips, vip_index: dict[str, int]) -> None:
        data = config.balancer.data
        conf = ffi.new("struct pylb_dp_conf *")
        conf.generation = self.generation
        conf.flow_seed = config.balancer.flow_seed
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

    def classify(self, key) -> Classification:
        """What the fast path decides for a pylb.flow_id.FlowKey (no packet needed)."""
        k = ffi.new("struct pylb_flow_key *")
        ffi.memmove(k.src.b, ip_bytes16(key.src), 16)
        ffi.memmove(k.dst.b, ip_bytes16(key.dst), 16)
        k.sport, k.dport, k.proto = key.sport, key.dport, key.proto
        vip = ffi.new("int32_t *")
        fid = ffi.new("uint64_t *")
        bucket = ffi.new("uint32_t *")
        cur = ffi.new("uint32_t *")
        prev = ffi.new("uint32_t *")
        check(lib.pylb_dataplane_classify(self.handle, k, vip, fid, bucket, cur, prev), "classify")
        ref = lambda i: self.backends[i] if i != NO_BACKEND else None  # noqa: E731
        name = self.vip_names[vip[0]] if vip[0] >= 0 else None
        return Classification(name, fid[0], bucket[0], ref(cur[0]), ref(prev[0]))

    def close(self) -> None:
        if self._dp is not None and self._owned:
            lib.pylb_dataplane_free(self._dp)
        self._dp = None

