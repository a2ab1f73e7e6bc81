"""pylb_encap_write: a table of (params, inner packet) and the outer headers
scapy must read back from the result."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from scapy.all import IP, TCP, UDP, VXLAN, Ether, IPv6, Raw

from pylb.errors import Full, InvalidArgument, TooBig
from pylb.packet import EncapKind, EncapParams, encapsulate, overhead

LB_MAC, HOP_MAC, VTEP_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
LB4, BE4 = "10.0.0.1", "10.0.1.5"
LB6, BE6 = "fd00::1", "fd00:1::5"
FLOW_ID = 0x1234_5678_9ABC_DEF1

# Inner packets as a client sent them: DSCP AF41 + CE and ECT(1), TTLs the
# balancer must not touch.
INNER4_DF = bytes(IP(src="198.51.100.7", dst="192.0.2.10", tos=0x8B, ttl=3, flags="DF", id=777)
                  / TCP(sport=40000, dport=80, flags="S") / Raw(b"x" * 40))


def inner4_no_df(ip_id: int) -> bytes:
    return bytes(IP(src="198.51.100.7", dst="192.0.2.10", tos=0x89, ttl=3, id=ip_id)
                 / UDP(sport=5000, dport=53) / Raw(b"y" * 41))


INNER4 = inner4_no_df(777)
INNER6 = bytes(IPv6(src="2001:db8::7", dst="2001:db8:1::10", tc=0xB9, hlim=2, fl=0x11111)
               / TCP(sport=40000, dport=443, flags="A") / Raw(b"z" * 33))


def params(kind: EncapKind, outer: int, **kw) -> EncapParams:
    src, dst = (LB4, BE4) if outer == 4 else (LB6, BE6)
    return EncapParams(kind=kind, src=src, dst=dst, src_mac=LB_MAC, dst_mac=HOP_MAC,
                       ttl=kw.pop("ttl", 61), mtu=kw.pop("mtu", 1500), **kw)


@dataclass
class Case:
    description: str
    params: EncapParams
    inner: bytes
    expected: dict  # outer fields; "df"/"id" only for IPv4 outer


IPIP, VX, GUE = EncapKind.IPIP, EncapKind.VXLAN, EncapKind.GUE
CASES = [
    Case("4in4 IPIP, inner DF: DF and id 0", params(IPIP, 4), INNER4_DF,
         {"overhead": 34, "proto": 4, "tos": 0x8B, "df": True, "id": 0}),
    Case("4in4 IPIP, inner without DF: no DF, id from the flow", params(IPIP, 4), INNER4,
         {"overhead": 34, "proto": 4, "tos": 0x89, "df": False, "id": "flow"}),
    Case("6in6 IPIP (RFC 2473)", params(IPIP, 6), INNER6,
         {"overhead": 54, "proto": 41, "tos": 0xB9}),
    Case("4in6 IPIP (RFC 2473)", params(IPIP, 6), INNER4_DF,
         {"overhead": 54, "proto": 4, "tos": 0x8B}),
    Case("6in4 IPIP: DF set for an IPv6 inner", params(IPIP, 4), INNER6,
         {"overhead": 34, "proto": 41, "tos": 0xB9, "df": True, "id": 0}),
    Case("VXLAN over IPv4", params(VX, 4, vni=0xABCDEF, inner_mac=VTEP_MAC), INNER4_DF,
         {"overhead": 64, "proto": 17, "tos": 0x8B, "df": True, "id": 0, "udp_csum": 0}),
    Case("VXLAN over IPv4, inner without DF", params(VX, 4, vni=1, inner_mac=VTEP_MAC), INNER4,
         {"overhead": 64, "proto": 17, "tos": 0x89, "df": False, "id": "flow", "udp_csum": 0}),
    Case("VXLAN over IPv6: UDP checksum computed", params(VX, 6, vni=42, inner_mac=VTEP_MAC),
         INNER6, {"overhead": 84, "proto": 17, "tos": 0xB9, "udp_csum": "valid"}),
    Case("GUE over IPv4", params(GUE, 4, udp_dport=6080), INNER4_DF,
         {"overhead": 42, "proto": 17, "tos": 0x8B, "df": True, "id": 0, "udp_csum": 0}),
    Case("GUE over IPv4, IPv6 inner", params(GUE, 4, udp_dport=6080), INNER6,
         {"overhead": 42, "proto": 17, "tos": 0xB9, "df": True, "id": 0, "udp_csum": 0}),
    Case("GUE over IPv6", params(GUE, 6, udp_dport=6080), INNER4,
         {"overhead": 62, "proto": 17, "tos": 0x89, "udp_csum": "valid"}),
]


def check_outer(case: Case, frame: bytes) -> None:
    p, exp = case.params, case.expected
    hdr = exp["overhead"]
    assert len(frame) == hdr + len(case.inner)
    assert frame[hdr:] == case.inner  # byte-identical: not an IP hop for the inner packet
    eth = Ether(frame)
    assert (eth.dst, eth.src) == (HOP_MAC, LB_MAC)

    outer = eth.payload
    assert (outer.src, outer.dst) == (p.src, p.dst)
    if isinstance(outer, IP):
        assert eth.type == 0x0800 and outer.ihl == 5
        assert (outer.proto, outer.tos, outer.ttl) == (exp["proto"], exp["tos"], p.ttl)
        assert outer.len == len(frame) - 14
        assert bool(outer.flags.DF) == exp["df"] and outer.frag == 0 and not outer.flags.MF
        if exp["id"] == "flow":
            assert outer.id != 0
        else:
            assert outer.id == exp["id"]
        fresh = outer.copy()
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == outer.chksum
    else:
        assert eth.type == 0x86DD
        assert (outer.nh, outer.tc, outer.hlim) == (exp["proto"], exp["tos"], p.ttl)
        assert outer.plen == len(frame) - 14 - 40
        assert outer.fl == FLOW_ID & 0xFFFFF

    if exp["proto"] != 17:
        return
    udp = outer.payload
    assert isinstance(udp, UDP)
    assert udp.dport == p.udp_dport and 49152 <= udp.sport <= 65535
    assert udp.len == len(frame) - 14 - (20 if isinstance(outer, IP) else 40)
    if exp["udp_csum"] == "valid":
        fresh = eth.copy()
        del fresh[UDP].chksum
        assert udp.chksum != 0 and Ether(bytes(fresh))[UDP].chksum == udp.chksum
    else:
        assert udp.chksum == 0
    if p.kind == EncapKind.VXLAN:
        vxlan = udp.payload
        assert isinstance(vxlan, VXLAN)
        assert bytes(vxlan)[:4] == b"\x08\x00\x00\x00" and vxlan.vni == p.vni
        inner_eth = vxlan.payload
        assert (inner_eth.dst, inner_eth.src) == (VTEP_MAC, LB_MAC)
        assert inner_eth.type == (0x0800 if case.inner[0] >> 4 == 4 else 0x86DD)


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_encap_table(case: Case):
    inner_l3 = case.inner[0] >> 4
    assert overhead(case.params, inner_l3) == case.expected["overhead"]
    frame = encapsulate(case.inner, case.params, FLOW_ID)
    check_outer(case, frame)
    assert encapsulate(case.inner, case.params, FLOW_ID) == frame  # deterministic per flow


def test_udp_source_port_spreads_flows():
    p = params(VX, 4, vni=1)
    ports = {Ether(encapsulate(INNER4_DF, p, flow))[UDP].sport
             for flow in (i * 0x9E37_79B9_7F4A_7C15 % 2**64 for i in range(256))}
    assert all(49152 <= port <= 65535 for port in ports)
    assert len(ports) > 200


def test_ipv4_id_changes_with_the_flow_and_the_inner_id():
    p = params(IPIP, 4)
    ids = {Ether(encapsulate(INNER4, p, flow))[IP].id for flow in range(1, 64)}
    assert len(ids) == 63 and 0 not in ids
    next_packet = Ether(encapsulate(inner4_no_df(778), p, 1))[IP].id
    assert next_packet != Ether(encapsulate(INNER4, p, 1))[IP].id


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_mtu_is_the_outer_ip_packet(case: Case):
    outer_ip = case.expected["overhead"] - 14 + len(case.inner)
    assert encapsulate(case.inner, replace(case.params, mtu=outer_ip), FLOW_ID)
    with pytest.raises(TooBig):
        encapsulate(case.inner, replace(case.params, mtu=outer_ip - 1), FLOW_ID)


def test_headroom():
    p = params(VX, 6, vni=1)
    need = overhead(p, 4)
    with pytest.raises(Full):
        encapsulate(INNER4, p, FLOW_ID, headroom=need - 1)
    assert encapsulate(INNER4, p, FLOW_ID, headroom=need + 64) == encapsulate(INNER4, p, FLOW_ID)


INVALID = [
    ("IPv4 source, IPv6 destination", replace(params(IPIP, 6), src=LB4), INNER4),
    ("IPv6 source, IPv4 destination", replace(params(GUE, 4), src=LB6), INNER4),
    ("outer TTL 0", params(IPIP, 4, ttl=0), INNER4),
    ("GUE to UDP port 0", params(GUE, 4, udp_dport=0), INNER4),
    ("VNI over 24 bits", params(VX, 4, vni=1 << 24), INNER4),
    ("inner packet is not IP", params(IPIP, 4), b"\x00" * 40),
    ("inner IPv4 shorter than its header", params(IPIP, 4), INNER4[:19]),
    ("empty inner packet", params(IPIP, 4), b""),
]


@pytest.mark.parametrize("description,p,inner", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_arguments(description, p, inner):
    with pytest.raises(InvalidArgument):
        encapsulate(inner, p, FLOW_ID)
