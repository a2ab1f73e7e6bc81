"""The Python face of the shim's packet functions (native/parse.c, native/encap.c).

For tests, tools and the demo; the worker calls the C functions directly on
mbufs. Nothing here is on the fast path.
"""
from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from functools import cached_property

from pylb._ffi import check, ffi, ip_to_c, key_bytes, lib
from pylb.flow_id import address16

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ParseResult(enum.IntEnum):
    OK = lib.PYLB_PARSE_OK
    NOT_IP = lib.PYLB_PARSE_NOT_IP
    TRUNCATED = lib.PYLB_PARSE_TRUNCATED
    BAD_HEADER = lib.PYLB_PARSE_BAD_HEADER


class L3(enum.IntEnum):
    NONE = lib.PYLB_L3_NONE
    ARP = lib.PYLB_L3_ARP
    IPV4 = lib.PYLB_L3_IPV4
    IPV6 = lib.PYLB_L3_IPV6


class ParseFlag(enum.IntFlag):
    VLAN = lib.PYLB_PF_VLAN
    FRAGMENT = lib.PYLB_PF_FRAGMENT
    LATER_FRAGMENT = lib.PYLB_PF_LATER_FRAGMENT
    IP_OPTIONS = lib.PYLB_PF_IP_OPTIONS
    HAS_L4 = lib.PYLB_PF_HAS_L4


class EncapKind(enum.IntEnum):
    IPIP = lib.PYLB_ENCAP_IPIP
    VXLAN = lib.PYLB_ENCAP_VXLAN
    GUE = lib.PYLB_ENCAP_GUE


# Enum calls cost a microsecond each; parse() runs on the miss path.
_RESULTS = {int(m): m for m in ParseResult}
_L3S = {int(m): m for m in L3}
_FLAGS: dict[int, ParseFlag] = {}


@dataclass(frozen=True)
class Parsed:
    """struct pylb_parsed with its result. src/dst are the ARP sender and target
    for ARP; None unless the frame parsed OK as IP or ARP. They are made from
    the key when first read: most readers of a parse need lengths only."""

    result: ParseResult
    l3: L3
    l4_proto: int
    tcp_flags: int
    ttl: int
    flags: ParseFlag
    vlan_tci: int
    l2_len: int
    l3_len: int
    l3_total: int
    tos: int
    df: int
    icmp_type: int
    icmp_code: int
    sport: int
    dport: int
    key: bytes  # the 40-byte struct pylb_flow_key, the input of the flow id

    @property
    def has_address(self) -> bool:
        return self.result == ParseResult.OK and self.l3 != L3.NONE

    @cached_property
    def src(self) -> Address | None:
        return address16(self.key[:16]) if self.has_address else None

    @cached_property
    def dst(self) -> Address | None:
        return address16(self.key[16:32]) if self.has_address else None


def parse(frame: bytes) -> Parsed:
    out = ffi.new("struct pylb_parsed *")
    result = _RESULTS[lib.pylb_parse(frame, len(frame), out)]
    flags = _FLAGS.get(out.flags)
    if flags is None:
        flags = _FLAGS[out.flags] = ParseFlag(out.flags)
    return Parsed(
        result=result, l3=_L3S[out.l3], l4_proto=out.l4_proto, tcp_flags=out.tcp_flags,
        ttl=out.ttl, flags=flags, vlan_tci=out.vlan_tci,
        l2_len=out.l2_len, l3_len=out.l3_len, l3_total=out.l3_total, tos=out.tos,
        df=out.df, icmp_type=out.icmp_type, icmp_code=out.icmp_code,
        sport=out.key.sport, dport=out.key.dport,
        key=key_bytes(out),
    )


# An Ethernet header to parse a bare IP packet with (parse takes frames).
ETH_FOR = {4: b"\0" * 12 + b"\x08\x00", 6: b"\0" * 12 + b"\x86\xdd"}
_TCP, _UDP = 6, 17


def ip_headers(ip_packet: bytes) -> bytes:
    """The packet cut after its transport header, its length fields (IP,
    UDP) rewritten to match, and the IPv4 header checksum, so that it parses as a
    whole packet with the same flow key and TCP flags: what a headers-only
    state request carries (docs/peer-protocol.md). ValueError if the packet
    does not parse with a transport header."""
    version = ip_packet[0] >> 4 if ip_packet else 0
    if version not in ETH_FOR:
        raise ValueError("not an IP packet")
    p = parse(ETH_FOR[version] + ip_packet)
    if p.result != ParseResult.OK or not p.flags & ParseFlag.HAS_L4 or p.l4_proto not in (_TCP, _UDP):
        raise ValueError("not an IP packet with a TCP or UDP header")
    l4_len = (ip_packet[p.l3_len + 12] >> 4) * 4 if p.l4_proto == _TCP else 8
    cut = bytearray(ip_packet[:p.l3_len + l4_len])
    if p.l4_proto != _TCP:
        cut[p.l3_len + 4:p.l3_len + 6] = (8).to_bytes(2, "big")     # UDP length
    if version == 4:
        cut[2:4] = len(cut).to_bytes(2, "big")
        cut[10:12] = b"\0\0"       # the checksum is computed with its own field zero
        cut[10:12] = internet_checksum(bytes(cut[:p.l3_len])).to_bytes(2, "big")
    else:
        cut[4:6] = (len(cut) - 40).to_bytes(2, "big")
    return bytes(cut)


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 checksum (IPv4 header; TCP/UDP with their pseudo-header)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(value: str | bytes) -> bytes:
    raw = bytes.fromhex(value.replace(":", "")) if isinstance(value, str) else bytes(value)
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {value!r}")
    return raw


@dataclass(frozen=True)
class EncapParams:
    """struct pylb_encap_params. MACs as "aa:bb:..." or 6 bytes."""

    kind: EncapKind
    src: str | Address
    dst: str | Address
    src_mac: str | bytes
    dst_mac: str | bytes
    ttl: int = 64
    mtu: int = 1500
    udp_dport: int = 4789
    vni: int = 0
    inner_mac: str | bytes = "00:00:00:00:00:00"

    def to_c(self):
        p = ffi.new("struct pylb_encap_params *")
        p.kind, p.ttl, p.mtu = self.kind, self.ttl, self.mtu
        p.udp_dport, p.vni = self.udp_dport, self.vni
        ip_to_c(self.src, p.src)
        ip_to_c(self.dst, p.dst)
        for field in ("src_mac", "dst_mac", "inner_mac"):
            ffi.memmove(getattr(p, field), _mac(getattr(self, field)), 6)
        return p


def overhead(params: EncapParams, inner_l3: int) -> int:
    """Bytes the outer headers add (Ethernet included); 0 when params are invalid."""
    return lib.pylb_encap_overhead(params.to_c(), inner_l3)


def encapsulate(inner_ip: bytes, params: EncapParams, flow_id: int,
                headroom: int | None = None) -> bytes:
    """The outer Ethernet frame around inner_ip. Raises TooBig over the MTU,
    Full when headroom (default: exactly the overhead) is too small,
    InvalidArgument for wrong params."""
    inner_l3 = inner_ip[0] >> 4 if inner_ip else 0
    c_params = params.to_c()
    need = lib.pylb_encap_overhead(c_params, inner_l3)
    room = need if headroom is None else headroom
    buf = ffi.new("uint8_t[]", room + len(inner_ip))
    ffi.memmove(buf + room, inner_ip, len(inner_ip))
    written = check(lib.pylb_encap_write(c_params, buf, room, len(inner_ip), inner_l3, flow_id),
                    "encapsulate")
    return bytes(ffi.buffer(buf + room - written, written + len(inner_ip)))
