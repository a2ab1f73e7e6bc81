"""pylb_parse: a table of frames and what the parser reports for each."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    ARP, ICMP, IP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6ND_NS, IPOption_NOP, IPOption_RR,
    IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
    TCP, Raw, fragment,
)

from pylb.packet import L3, ParseFlag as F, ParseResult as R, parse

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
C4, V4 = "198.51.100.7", "192.0.2.10"
C6, V6 = "2001:db8::7", "2001:db8:1::10"
PAYLOAD = b"p" * 32


def eth(*layers, **kw):
    frame = Ether(**{**MACS, **kw})
    for layer in layers:
        frame = frame / layer
    return bytes(frame)


def ip4(**kw):
    return IP(src=C4, dst=V4, **kw)


def ip6(**kw):
    return IPv6(src=C6, dst=V6, **kw)


def tcp(**kw):
    return TCP(sport=40000, dport=80, **kw)


def raw_ipv6(nh: int, body: bytes, plen: int | None = None) -> bytes:
    """An IPv6 header built by hand, for chains scapy would repair."""
    plen = len(body) if plen is None else plen
    header = struct.pack("!IHBB", 6 << 28, plen, nh, 64)
    return eth(Raw(header + ipaddress.IPv6Address(C6).packed
                   + ipaddress.IPv6Address(V6).packed + body), type=0x86DD)


def ext(nh: int, length_units: int) -> bytes:
    """A generic extension header (hop-by-hop/routing/dest options shape), zero-filled."""
    return bytes([nh, length_units]) + bytes(6 + 8 * length_units)


TCP_V4 = eth(ip4(), tcp(flags="S"), Raw(PAYLOAD))
TCP_V6_EXT = eth(ip6(), IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                 IPv6ExtHdrRouting(addresses=["2001:db8:2::1"]), tcp(flags="PA"), Raw(PAYLOAD))
UDP_V4_BIG = ip4() / UDP(sport=5000, dport=53) / Raw(b"u" * 200)
UDP_V6_BIG = ip6() / IPv6ExtHdrFragment(id=7) / UDP(sport=5000, dport=53) / Raw(b"u" * 200)


@dataclass
class Case:
    description: str
    frame: bytes
    expected: dict


TCP4 = {"result": R.OK, "l3": L3.IPV4, "l4_proto": 6, "l2_len": 14, "l3_len": 20,
        "src": ipaddress.ip_address(C4), "dst": ipaddress.ip_address(V4),
        "sport": 40000, "dport": 80}
TCP6 = {**TCP4, "l3": L3.IPV6, "l3_len": 40,
        "src": ipaddress.ip_address(C6), "dst": ipaddress.ip_address(V6)}
NO_PORTS = {"sport": 0, "dport": 0}
NOTHING = {"l3": L3.NONE, "flags": F(0), "l2_len": 0, "vlan_tci": 0, "src": None}

CASES = [
    # --- accepted
    Case("TCP SYN over IPv4", TCP_V4,
         {**TCP4, "tcp_flags": 0x02, "flags": F.HAS_L4, "l3_total": 72, "ttl": 64, "tos": 0,
          "df": 0}),
    Case("UDP over IPv4 with DF, DSCP EF + ECT(0)",
         eth(ip4(flags="DF", tos=0xBA, ttl=17), UDP(sport=5353, dport=53), Raw(b"q")),
         {**TCP4, "l4_proto": 17, "sport": 5353, "dport": 53, "flags": F.HAS_L4, "df": 1,
          "tos": 0xBA, "ttl": 17, "l3_total": 29, "tcp_flags": 0}),
    Case("TCP over IPv4 in VLAN 100, priority 5",
         eth(Dot1Q(vlan=100, prio=5), ip4(), tcp(flags="A")),
         {**TCP4, "l2_len": 18, "vlan_tci": 5 << 13 | 100, "flags": F.VLAN | F.HAS_L4,
          "tcp_flags": 0x10}),
    Case("IPv4 with options (record route)",
         eth(ip4(options=[IPOption_RR(routers=["10.0.0.1"]), IPOption_NOP()]), tcp()),
         {**TCP4, "l3_len": 28, "l3_total": 48, "flags": F.IP_OPTIONS | F.HAS_L4}),
    Case("IPv4 TTL 1 is parsed, not judged", eth(ip4(ttl=1), tcp()), {**TCP4, "ttl": 1}),
    Case("UDP over IPv4 with Ethernet padding to 60 bytes",
         eth(ip4(), UDP(sport=1, dport=2), Raw(b"ab")) + bytes(16),
         {**TCP4, "l4_proto": 17, "sport": 1, "dport": 2, "l3_total": 30}),
    Case("IPv4 first fragment (MF): ports valid", eth(fragment(UDP_V4_BIG, 64)[0]),
         {**TCP4, "l4_proto": 17, "sport": 5000, "dport": 53, "flags": F.FRAGMENT | F.HAS_L4}),
    Case("IPv4 later fragment: no L4", eth(fragment(UDP_V4_BIG, 64)[1]),
         {**TCP4, "l4_proto": 17, **NO_PORTS,
          "flags": F.FRAGMENT | F.LATER_FRAGMENT}),
    Case("IPv4 last fragment (offset, no MF)", eth(fragment(UDP_V4_BIG, 64)[-1]),
         {"result": R.OK, **NO_PORTS, "flags": F.FRAGMENT | F.LATER_FRAGMENT}),
    Case("GRE over IPv4: OK, no ports", eth(ip4(proto=47), Raw(bytes(8))),
         {**TCP4, "l4_proto": 47, **NO_PORTS, "flags": F(0)}),
    Case("ICMP echo request", eth(ip4(), ICMP(type=8, id=1), Raw(b"ping")),
         {**TCP4, "l4_proto": 1, "icmp_type": 8, "icmp_code": 0, **NO_PORTS,
          "flags": F(0)}),
    Case("ICMP port unreachable", eth(ip4(), ICMP(type=3, code=3), ip4(), UDP()),
         {"result": R.OK, "icmp_type": 3, "icmp_code": 3}),
    Case("TCP over IPv6, traffic class and hop limit",
         eth(ip6(tc=0xB9, hlim=9), tcp(flags="S")),
         {**TCP6, "tcp_flags": 0x02, "flags": F.HAS_L4, "tos": 0xB9, "ttl": 9, "l3_total": 60,
          "df": 0}),
    Case("UDP over IPv6 in VLAN 7", eth(Dot1Q(vlan=7), ip6(), UDP(sport=9, dport=10)),
         {**TCP6, "l2_len": 18, "vlan_tci": 7, "l4_proto": 17, "sport": 9, "dport": 10,
          "flags": F.VLAN | F.HAS_L4}),
    Case("IPv6 hop-by-hop + destination options + routing + TCP", TCP_V6_EXT,
         {**TCP6, "l3_len": 40 + 8 + 8 + 24, "l3_total": 40 + 40 + 20 + 32,
          "tcp_flags": 0x18, "flags": F.IP_OPTIONS | F.HAS_L4}),
    Case("IPv6 first fragment: ports valid",
         eth(ip6(), IPv6ExtHdrFragment(offset=0, m=1, nh=17), UDP(sport=5000, dport=53)),
         {**TCP6, "l4_proto": 17, "l3_len": 48, "sport": 5000, "dport": 53,
          "flags": F.FRAGMENT | F.IP_OPTIONS | F.HAS_L4}),
    Case("IPv6 later fragment: no L4",
         eth(ip6(), IPv6ExtHdrFragment(offset=100, m=1, nh=17), Raw(bytes(16))),
         {**TCP6, "l4_proto": 17, "l3_len": 48, **NO_PORTS,
          "flags": F.FRAGMENT | F.LATER_FRAGMENT | F.IP_OPTIONS}),
    Case("IPv6 atomic fragment (offset 0, M 0) still counts as a fragment",
         eth(ip6(), IPv6ExtHdrFragment(nh=6), tcp()),
         {**TCP6, "l3_len": 48, "flags": F.FRAGMENT | F.IP_OPTIONS | F.HAS_L4}),
    Case("IPv6 ESP: stop, no ports", raw_ipv6(50, bytes(16)),
         {**TCP6, "l4_proto": 50, **NO_PORTS, "flags": F(0)}),
    Case("IPv6 AH after hop-by-hop: stop at AH", raw_ipv6(0, ext(51, 0) + bytes(24)),
         {**TCP6, "l4_proto": 51, "l3_len": 48, **NO_PORTS, "flags": F.IP_OPTIONS}),
    Case("IPv6 no next header", raw_ipv6(59, b""),
         {**TCP6, "l4_proto": 59, **NO_PORTS, "flags": F(0), "l3_total": 40}),
    Case("ICMPv6 neighbour solicitation", eth(ip6(hlim=255), ICMPv6ND_NS(tgt=V6)),
         {**TCP6, "l4_proto": 58, "icmp_type": 135, "icmp_code": 0, "ttl": 255, **NO_PORTS,
          "flags": F(0)}),
    Case("ARP request: sender and target addresses in the key",
         eth(ARP(op=1, psrc=C4, pdst=V4), dst="ff:ff:ff:ff:ff:ff"),
         {"result": R.OK, "l3": L3.ARP, "l2_len": 14, "l3_len": 28,
          "src": ipaddress.ip_address(C4), "dst": ipaddress.ip_address(V4), "flags": F(0)}),
    Case("ARP reply in VLAN 3", eth(Dot1Q(vlan=3), ARP(op=2, psrc=V4, pdst=C4)),
         {"result": R.OK, "l3": L3.ARP, "l2_len": 18, "vlan_tci": 3,
          "src": ipaddress.ip_address(V4), "flags": F.VLAN}),
    Case("LLDP is not IP", eth(Raw(bytes(20)), type=0x88CC, dst="01:80:c2:00:00:0e"),
         {"result": R.NOT_IP, "l3": L3.NONE, "l2_len": 14, "src": None}),
    Case("802.3 length field (LLC) is not IP", eth(Raw(bytes(46)), type=46),
         {"result": R.NOT_IP, "l3": L3.NONE}),
    Case("QinQ (0x88a8): not IP, nothing set", eth(Dot1AD(vlan=10), Dot1Q(vlan=20), ip4(), tcp()),
         {"result": R.NOT_IP, **NOTHING}),
    Case("two 802.1Q tags: not IP, nothing set", eth(Dot1Q(vlan=10), Dot1Q(vlan=20), ip4(), tcp()),
         {"result": R.NOT_IP, **NOTHING}),
    # --- rejected
    Case("empty frame", b"", {"result": R.TRUNCATED, **NOTHING}),
    Case("VLAN tag cut", TCP_V4[:12] + b"\x81\x00\x00", {"result": R.TRUNCATED}),
    Case("IPv4 IHL 4", eth(ip4(ihl=4), tcp()), {"result": R.BAD_HEADER, "l3": L3.IPV4}),
    Case("IPv4 IHL 15, total length 40: total below header", eth(ip4(ihl=15), tcp()),
         {"result": R.BAD_HEADER, "l3": L3.IPV4}),
    Case("IPv4 IHL 15, total length 60, 40 bytes there", eth(ip4(ihl=15, len=60), tcp()),
         {"result": R.TRUNCATED, "l3": L3.IPV4}),
    Case("IPv4 total length over the data", eth(ip4(len=200), tcp()),
         {"result": R.TRUNCATED, "l3": L3.IPV4}),
    Case("IPv4 total length below 20", eth(ip4(len=19), tcp()), {"result": R.BAD_HEADER}),
    Case("version 5 under the IPv4 EtherType", eth(ip4(version=5), tcp()),
         {"result": R.BAD_HEADER, "l3": L3.IPV4}),
    Case("version 4 under the IPv6 EtherType", eth(Raw(bytes(ip4() / tcp()) + bytes(20)),
                                                   type=0x86DD),
         {"result": R.BAD_HEADER, "l3": L3.IPV6}),
    Case("TCP data offset 4", eth(ip4(), tcp(dataofs=4)), {"result": R.BAD_HEADER}),
    Case("TCP data offset 15 past the IP payload", eth(ip4(), tcp(dataofs=15), Raw(bytes(8))),
         {"result": R.TRUNCATED}),
    Case("UDP length 7", eth(ip4(), UDP(len=7)), {"result": R.BAD_HEADER}),
    Case("UDP length over the IP payload", eth(ip4(), UDP(len=100), Raw(bytes(10))),
         {"result": R.BAD_HEADER}),
    Case("ICMP cut at 4 bytes by the IP length", eth(ip4(len=24), ICMP()),
         {"result": R.TRUNCATED}),
    Case("IPv6 payload length over the data", eth(ip6(plen=500), tcp()),
         {"result": R.TRUNCATED, "l3": L3.IPV6}),
    Case("IPv6 hop-by-hop claims 48 bytes, 8 there", raw_ipv6(0, ext(6, 5)[:8]),
         {"result": R.TRUNCATED, "l3": L3.IPV6}),
    Case("IPv6 chain runs off the end: destination options, then nothing",
         raw_ipv6(0, ext(60, 0)), {"result": R.TRUNCATED}),
    Case("IPv6 fragment header cut", raw_ipv6(44, bytes(4)), {"result": R.TRUNCATED}),
    Case("IPv6 hop-by-hop not first", raw_ipv6(60, ext(0, 0) + ext(6, 0) + bytes(20)),
         {"result": R.BAD_HEADER}),
    Case("IPv6 chain of 9 destination options headers",
         raw_ipv6(60, b"".join(ext(60, 0) for _ in range(8)) + ext(59, 0)),
         {"result": R.BAD_HEADER}),
    Case("ARP body of 20 bytes", eth(Raw(bytes(ARP())[:20]), type=0x0806),
         {"result": R.TRUNCATED, "l3": L3.ARP}),
    Case("ARP for IPv6 protocol type", eth(ARP(ptype=0x86DD)), {"result": R.BAD_HEADER}),
    Case("ARP with 8-byte hardware addresses", eth(Raw(bytes(ARP(hwlen=8))[:28]), type=0x0806),
         {"result": R.BAD_HEADER}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_parse_table(case: Case):
    parsed = parse(case.frame)
    got = {name: getattr(parsed, name) for name in case.expected}
    assert got == case.expected


def test_key_layout_is_the_flow_key():
    parsed = parse(TCP_V4)
    v4 = b"\x00" * 10 + b"\xff\xff"
    expected = (v4 + ipaddress.IPv4Address(C4).packed + v4 + ipaddress.IPv4Address(V4).packed
                + struct.pack("=HHB3x", 40000, 80, 6))
    assert parsed.key == expected


@pytest.mark.parametrize("frame", [TCP_V4, TCP_V6_EXT, eth(Dot1Q(vlan=5), ip6(), tcp())],
                         ids=["tcp-ipv4", "tcp-ipv6-ext", "tcp-ipv6-vlan"])
def test_every_truncation_is_reported(frame: bytes):
    assert parse(frame).result == R.OK
    for n in range(len(frame)):
        parsed = parse(frame[:n])
        assert parsed.result == R.TRUNCATED, n
        assert not parsed.flags & F.HAS_L4, n


def check_invariants(frame: bytes) -> None:
    parsed = parse(frame)
    assert parsed.result in set(R)
    if parsed.flags & F.HAS_L4:
        assert parsed.result == R.OK and parsed.l4_proto in (6, 17)
    if parsed.result == R.OK and parsed.l3 in (L3.IPV4, L3.IPV6):
        assert parsed.l2_len + parsed.l3_len <= parsed.l2_len + parsed.l3_total <= len(frame)
        assert parsed.key[-3:] == bytes(3)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(frame: bytes):
    check_invariants(frame)


L2_HEADERS = st.sampled_from([bytes(12) + ethertype for ethertype in (
    b"\x08\x00", b"\x86\xdd", b"\x08\x06",
    b"\x81\x00\x00\x05\x08\x00", b"\x81\x00\x00\x05\x86\xdd")])


@settings(max_examples=400, deadline=None)
@given(L2_HEADERS, st.binary(max_size=200))
def test_garbage_behind_an_ip_ethertype(header: bytes, body: bytes):
    check_invariants(header + body)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([TCP_V4, TCP_V6_EXT]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 200))
def test_mutated_valid_frames(frame: bytes, edits, cut: int):
    mutated = bytearray(frame)
    for where, value in edits:
        mutated[14 + where % (len(frame) - 14)] = value
    check_invariants(bytes(mutated[:len(mutated) - cut]))


# ip_headers: what a headers-only state request carries (docs/peer-protocol.md).
IP_HEADERS = [
    ("IPv4 TCP", IP(src=C4, dst=V4) / TCP(sport=40000, dport=80, flags="PA") / Raw(b"x" * 1400),
     20 + 20),
    ("IPv4 options, TCP options", IP(src=C4, dst=V4, options=[IPOption_NOP()] * 4)
     / TCP(sport=40000, dport=80, flags="FA", options=[("MSS", 1460), ("NOP", None)] * 2)
     / Raw(b"x" * 1000), 24 + 32),
    ("IPv4 UDP", IP(src=C4, dst=V4) / UDP(sport=5353, dport=53) / Raw(b"x" * 1400), 20 + 8),
    ("IPv6 TCP", IPv6(src=C6, dst=V6) / TCP(sport=40000, dport=443, flags="A")
     / Raw(b"x" * 1400), 40 + 20),
    ("IPv6 hop-by-hop, UDP", IPv6(src=C6, dst=V6) / IPv6ExtHdrHopByHop() / UDP(sport=1, dport=53)
     / Raw(b"x" * 1400), 40 + 8 + 8),
]


@pytest.mark.parametrize("ip, length", [c[1:] for c in IP_HEADERS], ids=[c[0] for c in IP_HEADERS])
def test_ip_headers_keep_the_flow_and_its_tcp_flags(ip, length):
    from pylb.packet import ip_headers
    whole = bytes(ip)
    cut = ip_headers(whole)
    assert len(cut) == length
    assert cut[:8] != whole[:8] or len(cut) == len(whole)       # a length field rewritten
    ether = eth(ip)[:14]
    a, b = parse(ether + whole), parse(ether + cut)
    assert b.result == R.OK and b.l3_total == len(cut)
    assert (b.key, b.tcp_flags, b.l4_proto) == (a.key, a.tcp_flags, a.l4_proto)
    if ip.version == 4:
        rebuilt = IP(cut)
        checksum = rebuilt.chksum
        del rebuilt.chksum
        assert IP(bytes(rebuilt)).chksum == checksum


@pytest.mark.parametrize("ip", [
    IP(src=C4, dst=V4) / ICMP(),
    fragment(IP(src=C4, dst=V4) / UDP(sport=1, dport=53) / Raw(b"x" * 2000), fragsize=1000)[1],
    b"",
    b"\x50" + bytes(39),
], ids=["ICMP", "later fragment", "empty", "not IP"])
def test_ip_headers_refuse_a_packet_without_ports(ip):
    from pylb.packet import ip_headers
    with pytest.raises(ValueError):
        ip_headers(bytes(ip))
