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
    active: bool          # in the current backend set (False: only in the previous one)


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


class Dataplane:
    """A compiled configuration. The worker that uses it owns it once set; a
    Dataplane never set on a worker is freed by close()."""

    def __init__(self, config: Config, generation: int, previous: "Dataplane | None" = None,
                 current: dict[str, VipTables] | None = None):
        """previous: the generation this one replaces; its current tables become
        this one's previous tables. current: tables built already (else Maglev)."""
        self._dp = None
        self.config = config
        self.generation = generation
        self.tables: dict[str, VipTables] = {}
        self.previous: dict[str, VipTables] = dict(previous.tables) if previous else {}
        self._prior_refs = previous.backends if previous else []
        self.backends: list[BackendRef] = []
        self.vip_names: list[str] = []
        c_tables = []
        c_backends = []
        vips = ffi.new("struct pylb_dp_vip[]", len(config.vips))
        track_all = config.balancer.flow_cache.track == "all"
        for i, vip in enumerate(config.vips):
            cur = (current or {}).get(vip.name) or VipTables.build(vip)
            self.tables[vip.name] = cur
            prev = self.previous.get(vip.name)
            ids = self._assign_ids(vip, prev, c_backends)
            cur_ids = ffi.new("uint32_t[]", [ids[cur.names[t]] if t != NO_BACKEND else NO_BACKEND
                                             for t in cur.table])
            c_tables.append(cur_ids)
            v = vips[i]
            v.current = cur_ids
            if prev is not None:
                prev_ids = ffi.new("uint32_t[]", [ids[prev.names[t]] if t != NO_BACKEND
                                                  else NO_BACKEND for t in prev.table])
                c_tables.append(prev_ids)
                v.previous = prev_ids
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
            self.vip_names.append(vip.name)
        self._compile(config, vips, c_backends)

    def _assign_ids(self, vip: Vip, prev: VipTables | None, c_backends: list) -> dict[str, int]:
        ids = {}
        by_name = {b.name: b for b in vip.backends}
        names = list(by_name) + [n for n in (prev.names if prev else ()) if n not in by_name]
        for name in names:
            b = by_name.get(name)
            address = b.address if b else self._previous_address(vip.name, name)
            ref = BackendRef(len(self.backends), vip.name, name, address, b.weight if b else 0,
                             b is not None)
            ids[name] = ref.id
            self.backends.append(ref)
            c_backends.append((address, ref.weight == 0))
        return ids

    def _previous_address(self, vip: str, name: str):
        for ref in self._prior_refs:
            if ref.vip == vip and ref.name == name:
                return ref.address
        raise StateError(f"VIP {vip}: backend {name} of the previous generation is unknown")

    def _compile(self, config: Config, vips, c_backends) -> None:
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
        backends = ffi.new("struct pylb_dp_backend[]", max(1, len(c_backends)))
        for i, (address, drained) in enumerate(c_backends):
            ip_to_c(address, backends[i].addr)
            backends[i].weight_zero = int(drained)
        conf.n_backends = len(c_backends)
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

