"""A small traffic generator and decapsulator for the demo, tests and benchmarks.

Frames are built with struct (no scapy at run time) and the balancer's output
is read back with pylb's own parser, so a run can check every packet it sent.
"""
from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

from pylb import packet
from pylb.flow_id import FlowKey

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
TCP_FLAGS = {"S": 0x02, "A": 0x10, "PA": 0x18, "FA": 0x11, "R": 0x04}


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def ip_packet(src, dst, proto: int, l4: bytes, ttl: int = 64, tos: int = 0) -> bytes:
    """An IPv4 or IPv6 packet around an L4 header+payload whose checksum field
    is zero; the L4 checksum is filled in here."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), proto)
    off = 16 if proto == 6 else 6
    ck = packet.internet_checksum(pseudo + l4) or (0xFFFF if proto == 17 else 0)
    l4 = l4[:off] + struct.pack("!H", ck) + l4[off + 2:]
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(l4), 1, 0x4000, ttl, proto, 0,
                          s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", packet.internet_checksum(hdr)) + hdr[12:]
        return hdr + l4
    return struct.pack("!IHBB16s16s", (6 << 28) | (tos << 20), len(l4), proto, ttl,
                       s.packed, d.packed) + l4


def tcp(sport: int, dport: int, flags: str, seq: int = 1, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, TCP_FLAGS[flags], 65535, 0,
                       0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ether(dst: str, src: str, ip: bytes) -> bytes:
    etype = ETH_IPV4 if ip[0] >> 4 == 4 else ETH_IPV6
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", etype) + ip


@dataclass(frozen=True)
class Flow:
    vip: str
    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        fmt = lambda a, p: f"[{a}]:{p}" if ":" in a else f"{a}:{p}"  # noqa: E731
        return f"{'tcp' if self.proto == 6 else 'udp'} {fmt(self.src, self.sport)} -> " \
               f"{fmt(self.dst, self.dport)}"

    def key(self) -> FlowKey:
        return FlowKey(ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst),
                       self.sport, self.dport, self.proto)

    def frames(self, dst_mac: str, src_mac: str, kinds: list[str]) -> list[bytes]:
        """One frame per kind: TCP flag strings ("S", "PA", "FA") or "U" for
        UDP, optionally with the IP packet's size: "PA/1450"."""
        out = []
        for i, kind in enumerate(kinds):
            kind, _, size = kind.partition("/")
            payload = f"{self} #{i}".encode()
            if size:
                headers = (40 if ":" in self.dst else 20) + (8 if kind == "U" else 20)
                payload = payload.ljust(int(size) - headers, b".")
            l4 = udp(self.sport, self.dport, payload) if kind == "U" else \
                tcp(self.sport, self.dport, kind, seq=1 + i, payload=payload if kind != "S" else b"")
            out.append(ether(dst_mac, src_mac, ip_packet(self.src, self.dst, self.proto, l4)))
        return out


def make_flows(vips: list[tuple[str, str, int, int]], n: int, rng: random.Random) -> list[Flow]:
    """n distinct flows spread over (name, address, proto, port) VIPs, from
    client addresses in 198.51.100.0/24 or 2001:db8:c::/64."""
    flows, seen = [], set()
    while len(flows) < n:
        name, addr, proto, port = vips[len(flows) % len(vips)]
        v6 = ":" in addr
        src = f"2001:db8:c::{rng.randrange(1, 65535):x}" if v6 else \
            f"198.51.100.{rng.randrange(1, 255)}"
        sport = rng.randrange(1024, 65535)
        if (src, sport, addr, port) in seen:
            continue
        seen.add((src, sport, addr, port))
        flows.append(Flow(name, proto, src, sport, addr, port))
    return flows


@dataclass(frozen=True)
class Delivery:
    """One frame the balancer sent toward a backend, decapsulated."""

    backend: str          # outer destination address
    outer_src: str
    flow: tuple           # (proto, src, sport, dst, dport) of the inner packet
    payload_ok: bool
    size: int = 0         # the inner IP packet's length


def decapsulate(frame: bytes) -> Delivery | None:
    """Reads an IPIP, GUE (port 6080) or VXLAN (port 4789) frame; None when the
    frame is not an encapsulated packet (ARP, ND)."""
    outer = packet.parse(frame)
    if outer.result != packet.ParseResult.OK or outer.l3 not in (packet.L3.IPV4, packet.L3.IPV6):
        return None
    start = outer.l2_len + outer.l3_len
    if outer.l4_proto == 17 and outer.dport == 4789:
        inner = frame[start + 16:]
    elif outer.l4_proto == 17:
        inner = b"\0" * 12 + struct.pack("!H", ETH_IPV4 if frame[start + 8] >> 4 == 4
                                         else ETH_IPV6) + frame[start + 8:]
    elif outer.l4_proto in (4, 41):
        inner = b"\0" * 12 + struct.pack("!H", ETH_IPV4 if outer.l4_proto == 4 else ETH_IPV6) + \
            frame[start:]
    else:
        return None
    p = packet.parse(inner)
    if p.result != packet.ParseResult.OK:
        return None
    ok = p.l3_total == len(inner) - 14
    return Delivery(str(outer.dst), str(outer.src),
                    (p.l4_proto, str(p.src), p.sport, str(p.dst), p.dport), ok, p.l3_total)
