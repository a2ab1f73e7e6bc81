"""The flow id: a seeded 64-bit hash of a flow's 5-tuple, and its bucket.

This is the reference the C shim (native/flow_id.c) must match bit for bit;
the algorithm is specified in docs/flow-id.md. `hash_bytes` is the same mixing
over any byte string, which Maglev uses for backend names.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)

PROTOCOLS = {"tcp": 6, "udp": 17}
_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}

_MASK = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_FMIX1 = 0xFF51AFD7ED558CCD
_FMIX2 = 0xC4CEB9FE1A85EC53
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _round(acc: int, word: int) -> int:
    acc ^= (word * _P2) & _MASK
    acc = ((acc << 31) | (acc >> 33)) & _MASK
    return (acc * _P1) & _MASK


def _fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * _FMIX1) & _MASK
    x ^= x >> 33
    x = (x * _FMIX2) & _MASK
    return x ^ (x >> 33)


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= _MASK:
        raise ValueError(f"seed must be an unsigned 64-bit integer, not {seed!r}")


def hash_bytes(data: bytes, seed: int) -> int:
    """The seeded 64-bit hash of a byte string (docs/flow-id.md)."""
    _check_seed(seed)
    acc = seed ^ _P3
    for start in range(0, len(data), 8):
        acc = _round(acc, int.from_bytes(data[start:start + 8], "little"))
    return _fmix64(acc ^ len(data))


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


@dataclasses.dataclass(frozen=True)
class FlowKey:
    """One direction of a flow, as the balancer sees it (client -> VIP)."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    proto: int

    def __post_init__(self) -> None:
        # Strings are accepted for convenience; the fields always hold address
        # objects. An address object is kept as it is: ip_address() would turn
        # it into a string and parse it again (microseconds on the miss path).
        if not isinstance(self.src, _ADDRESS_TYPES):
            object.__setattr__(self, "src", ipaddress.ip_address(self.src))
        if not isinstance(self.dst, _ADDRESS_TYPES):
            object.__setattr__(self, "dst", ipaddress.ip_address(self.dst))
        if self.src.version != self.dst.version:
            raise ValueError(f"{self.src} and {self.dst} are not of the same IP version")
        for name in ("sport", "dport"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise ValueError(f"{name} must be a port number 0..65535, not {port!r}")
        if not isinstance(self.proto, int) or not 0 <= self.proto <= 0xFF:
            raise ValueError(f"proto must be 0..255, not {self.proto!r}")

    @classmethod
    def parse(cls, text: str) -> FlowKey:
        """'tcp 198.51.100.7:40000 -> 192.0.2.10:80' or with [IPv6]:port."""
        match = re.fullmatch(r"\s*(\S+)\s+(\S+)\s*->\s*(\S+)\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not 'PROTO SRC:PORT -> DST:PORT'")
        proto_name, src, dst = match.groups()
        proto = PROTOCOLS.get(proto_name.lower())
        if proto is None:
            raise ValueError(f"unknown protocol {proto_name!r} (one of {', '.join(PROTOCOLS)})")
        (src_ip, sport), (dst_ip, dport) = _endpoint(src), _endpoint(dst)
        return cls(src_ip, dst_ip, sport, dport, proto)

    def __str__(self) -> str:
        name = _PROTOCOL_NAMES.get(self.proto, str(self.proto))
        return f"{name} {_format_endpoint(self.src, self.sport)} -> " \
               f"{_format_endpoint(self.dst, self.dport)}"

    def to_bytes(self) -> bytes:
        """The 40-byte key: src, dst (IPv4 v4-mapped), sport, dport (little-endian), proto, 3 zeros."""
        raw = self.__dict__.get("_raw")
        if raw is None:         # made once: the miss path asks several times
            raw = (packed16(self.src) + packed16(self.dst)
                   + self.sport.to_bytes(2, "little") + self.dport.to_bytes(2, "little")
                   + bytes((self.proto, 0, 0, 0)))
            object.__setattr__(self, "_raw", raw)
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlowKey:
        """The key of a 40-byte form (to_bytes(), struct pylb_flow_key).

        The form cannot tell an IPv4 address from an IPv6 packet's
        ::ffff:a.b.c.d; both addresses are IPv4 only when both are mapped,
        so that an IPv6 packet with one mapped address is still a key."""
        raw = bytes(raw)
        if len(raw) != 40 or raw[37:] != b"\0\0\0":
            raise ValueError("a flow key is 40 bytes, the last 3 zero")
        src, dst = raw[0:16], raw[16:32]
        if (src[:12] == _V4_MAPPED) == (dst[:12] == _V4_MAPPED):
            src_ip, dst_ip = address16(src), address16(dst)
        else:
            src_ip, dst_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
        key = cls(src_ip, dst_ip, int.from_bytes(raw[32:34], "little"),
                  int.from_bytes(raw[34:36], "little"), raw[36])
        object.__setattr__(key, "_raw", raw)
        return key


def _endpoint(text: str) -> tuple[IPAddress, int]:
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        hint = " (IPv6 addresses go in brackets)" if text.count(":") > 1 else ""
        raise ValueError(f"{text!r} is not ADDRESS:PORT{hint}")
    v6, v6_port, v4, v4_port = match.groups()
    ip = _address(v6) if v6 is not None else _address(v4)
    if v6 is not None and ip.version != 6:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses only")
    if v4 is not None and ip.version != 4:
        raise ValueError(f"{text!r}: IPv6 addresses go in brackets")
    port = int(v6_port if v6 is not None else v4_port)
    if port > 0xFFFF:
        raise ValueError(f"{text!r}: port {port} is over 65535")
    return ip, port


def _format_endpoint(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def packed16(ip: IPAddress) -> bytes:
    """An address in the 16-byte form of flow keys and the wire (IPv4 v4-mapped)."""
    return _V4_MAPPED + ip.packed if ip.version == 4 else ip.packed


def address16(raw: bytes) -> IPAddress:
    """The address of a 16-byte form (packed16): v4-mapped is the IPv4 address."""
    if raw[:12] == _V4_MAPPED:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def flow_id(key: FlowKey, seed: int) -> int:
    """The flow id of a key: hash_bytes of its 40-byte form."""
    return hash_bytes(key.to_bytes(), seed)


def bucket(flow_id: int, m: int) -> int:
    """The bucket of a flow id in a destination table of size m."""
    if m <= 0:
        raise ValueError(f"table size must be positive, not {m}")
    return flow_id % m


def native_flow_id(key: FlowKey, seed: int) -> int:
    """The flow id computed by the C shim (what the data plane uses)."""
    # Imported here so the reference above works where the shim is not built.
    from pylb._ffi import ffi, ip_to_c, lib

    _check_seed(seed)
    c_key = ffi.new("struct pylb_flow_key *")
    ip_to_c(key.src, c_key.src)
    ip_to_c(key.dst, c_key.dst)
    c_key.sport, c_key.dport, c_key.proto = key.sport, key.dport, key.proto
    return int(lib.pylb_flow_id(c_key, seed))


def flow_label(flow_id: int) -> str:
    """How a flow id is written in logs and answers: 0x and 16 hex digits."""
    return f"0x{flow_id:016x}"
