"""The whole fast path on a ring port, as tables: each case is a description,
the frames a client sends (scapy), the outcome counter that must move, and the
frames the balancer must send, compared field by field with the ones scapy
builds from the configuration (pipeline_support). Then flow behaviour across a
reconfiguration with thousands of flows, and next-hop resolution by ARP."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPOption_Router_Alert, IPv6, Raw
from scapy.all import fragment as fragment4
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                fragment6)

from pipeline_support import (ANY4, ANY6, C4, C6, CLIENT_MAC, DNS4, GATEWAY_MAC, GW4, LB4, LB6,
                              ROUTER_MAC, VIPS, WEB4, WEB6, Pipeline, arp_reply, arp_request,
                              arp_who_has, assert_frame, check_encap, client_frame, flow_key,
                              fragment_route, make_config, neighbor_advertisement, outcomes,
                              ring_device, route, solicit, tcp4, tcp6, udp4, udp6)
from pylb import traffic
from pylb.balancer import Balancer
from pylb.flow_cache import TimeoutClass, now_ms
from pylb.flow_id import FlowKey
from pylb.worker import PuntReason


@pytest.fixture
def ring(eal):
    return ring_device()


@pytest.fixture
def pipe(ring):
    with Balancer(make_config(ring)) as lb:
        yield Pipeline(lb)


# ---------------------------------------------------------------- expected outputs

def encapsulated(pipe, frames, out):
    """One frame out per frame in, to the backend `pylb which` names."""
    assert len(out) == len(frames)
    for sent, frame in zip(out, frames):
        check_encap(sent, frame, route(pipe.lb, frame), pipe.mac)


def fragments_of(vip: str):
    """Every fragment to the backend of the datagram's 3-tuple, in the VIP's table."""
    def check(pipe, frames, out):
        assert len(out) == len(frames)
        for sent, frame in zip(out, frames):
            k = flow_key(frame)
            check_encap(sent, frame, fragment_route(pipe.lb, vip, k.src, k.dst, k.proto), pipe.mac)
    return check


def nothing(pipe, frames, out):
    assert out == []


def too_big4(frame: bytes, mac: str, mtu: int):
    """ICMP type 3 code 4 from the VIP, quoting the IP header and 8 bytes."""
    e = Ether(frame)
    quote = bytes(e[IP])[:e[IP].ihl * 4 + 8]
    return (Ether(dst=e.src, src=mac) / IP(src=e[IP].dst, dst=e[IP].src, ttl=64, id=0)
            / ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quote))


def too_big6(frame: bytes, mac: str, mtu: int):
    """ICMPv6 packet too big from the VIP, quoting as much as fits 1280 bytes."""
    e = Ether(frame)
    quote = bytes(e[IPv6])[:1280 - 40 - 8]
    return (Ether(dst=e.src, src=mac) / IPv6(src=e[IPv6].dst, dst=e[IPv6].src, hlim=64)
            / ICMPv6PacketTooBig(mtu=mtu) / Raw(quote))


def answered(build):
    def check(pipe, frames, out):
        assert len(out) == len(frames)
        for sent, frame in zip(out, frames):
            assert_frame(sent, build(frame, pipe.mac))
    return check


# ---------------------------------------------------------------- inputs

def raw_frame(ethertype: int, body: bytes) -> Ether:
    return Ether(dst=ROUTER_MAC, src=CLIENT_MAC, type=ethertype) / Raw(body)


def with_bytes(pkt, offset: int, value: bytes) -> bytes:
    """pkt's frame with bytes overwritten at offset (to break one header field)."""
    frame = bytearray(client_frame(pkt))
    frame[offset:offset + len(value)] = value
    return bytes(frame)


def cut(pkt, length: int) -> bytes:
    return client_frame(pkt)[:length]


def padded(pkt, n: int) -> bytes:
    """As the wire pads short frames: bytes past the IP length."""
    return client_frame(pkt) + b"\0" * n


def big_datagram(ip_layer, l4, size=3000):
    return ip_layer / l4 / Raw((bytes(range(256)) * (size // 256 + 1))[:size])


FRAG4_TCP = fragment4(big_datagram(IP(src=C4, dst=ANY4, id=4242),
                                   TCP(sport=40001, dport=8080, flags="PA")), 1200)
FRAG4_PORT_VIP = fragment4(big_datagram(IP(src=C4, dst=WEB4, id=4243),
                                        TCP(sport=40002, dport=80, flags="PA")), 1200)
FRAG4_PORT_AND_ALL = fragment4(big_datagram(IP(src=C4, dst=ANY4, id=4244),
                                            TCP(sport=40003, dport=22, flags="PA")), 1200)
FRAG6_UDP = fragment6(big_datagram(IPv6(src=C6, dst=ANY6) / IPv6ExtHdrFragment(id=77),
                                   UDP(sport=5000, dport=9000)), 1280)


def _tagged(pkt, vlan):
    return Ether(dst=pkt.dst, src=pkt.src) / Dot1Q(vlan=vlan) / pkt.payload.copy()


@dataclass(frozen=True)
class Case:
    description: str
    packets: list          # scapy (without Ether: the client's Ethernet header added) or bytes
    moves: dict            # outcome counter -> by how much
    output: Callable = encapsulated
    vip: str | None = None  # the VIP the forwarded frames belong to
    bug: str | None = None  # a known defect: the case is a strict xfail until it is fixed


VLAN_NA_BUG = ("neigh_wire.c write_na() resets the mbuf and writes an untagged frame: an NS "
               "received on a VLAN is answered untagged (the ARP reply keeps the tag)")
LATER_FRAGMENT_VIP = ("worker.c handle_frame(): a later fragment has no ports, so dp_find_vip(dst, "
                      "proto, 0) finds only an all-ports VIP; fragments of a datagram to a "
                      "port-specific VIP are dropped (drop_no_vip) or go to another VIP's table")

CASES = [
    # Forwarding: families, protocols, encapsulations.
    Case("IPv4 TCP SYN, IPIP", [tcp4()], {"fwd_new": 1}, vip="web4"),
    Case("IPv4 TCP non-SYN of an unknown flow: by the table", [tcp4(flags="PA", payload=b"GET /")],
         {"fwd_table": 1}, vip="web4"),
    Case("IPv4 UDP, GUE", [udp4()], {"fwd_new": 1}, vip="dns4"),
    Case("IPv6 TCP SYN, VXLAN over IPv6 (UDP checksum)", [tcp6()], {"fwd_new": 1}, vip="web6"),
    Case("IPv6 UDP, IPIP 6in6", [udp6()], {"fwd_new": 1}, vip="dns6"),
    Case("IPv4 VIP, IPv6 backends: GUE over IPv6", [tcp4(dst="192.0.2.46")], {"fwd_new": 1},
         vip="web46"),
    Case("DSCP and ECN are copied to the outer header", [tcp4(tos=0xB9), tcp6(tc=0x8B, sport=1)],
         {"fwd_new": 2}),
    Case("inner without DF: outer without DF, id != 0", [udp4(flags=0, id=99)], {"fwd_new": 1}),
    Case("VLAN-tagged input: outer frame untagged", [Dot1Q(vlan=7) / tcp4()], {"fwd_new": 1},
         vip="web4"),
    Case("IPv4 with options: inner forwarded as is", [tcp4(options=[IPOption_Router_Alert()])],
         {"fwd_new": 1}, vip="web4"),
    Case("IPv6 with a destination options header", [
        IPv6(src=C6, dst=WEB6) / IPv6ExtHdrDestOpt() / TCP(sport=41000, dport=443, flags="S")],
         {"fwd_new": 1}, vip="web6"),
    Case("TTL 1 is forwarded, inner TTL unchanged (not an IP hop)", [tcp4(ttl=1), udp6(hlim=1)],
         {"fwd_new": 2}),
    Case("Ethernet padding is not forwarded", [padded(tcp4(), 6)], {"fwd_new": 1}, vip="web4"),
    Case("port-specific VIP wins over the all-ports VIP", [tcp4(dst=ANY4, dport=22)],
         {"fwd_new": 1}, vip="ssh4"),
    Case("all-ports VIP takes other ports (its TTL 16)", [tcp4(dst=ANY4, dport=8080)],
         {"fwd_new": 1}, vip="any4"),
    Case("outer packet exactly the MTU", [tcp4(payload=b"m" * (1500 - 20 - 40))],
         {"fwd_new": 1}),
    Case("outer packet one byte over the MTU, DF clear: dropped, may not be answered",
         [tcp4(payload=b"m" * (1500 - 20 - 40 + 1))], {"drop_too_big": 1}, nothing),
    # A path-MTU black hole must not form: the client learns the inner MTU.
    Case("IPv4 with DF over the MTU after IPIP: ICMP fragmentation needed, MTU 1480",
         [IP(src=C4, dst=WEB4, flags="DF") / TCP(sport=40100, dport=80, flags="PA")
          / Raw(b"m" * (1500 - 20 - 40 + 1))],
         {"drop_too_big": 1}, answered(lambda f, mac: too_big4(f, mac, 1480))),
    Case("IPv6 over the MTU after IP6IP6: ICMPv6 packet too big, MTU 1460",
         [udp6(payload=b"m" * (1500 - 40 - 8 + 1))],
         {"drop_too_big": 1}, answered(lambda f, mac: too_big6(f, mac, 1460))),
    Case("VIP whose backends all have weight 0", [tcp4(dst="192.0.2.30"),
                                                   tcp4(dst="192.0.2.30", flags="A", sport=2)],
         {"drop_no_backend": 2}, nothing),
    # Fragments: by the 3-tuple, so every fragment of a datagram meets at one backend.
    Case("IPv4 TCP fragments, all-ports VIP", FRAG4_TCP, {"fwd_fragment": len(FRAG4_TCP)},
         fragments_of("any4")),
    Case("IPv6 UDP fragments, all-ports VIP", FRAG6_UDP, {"fwd_fragment": len(FRAG6_UDP)},
         fragments_of("any6")),
    Case("IPv4 fragments, port-specific VIP", FRAG4_PORT_VIP,
         {"fwd_fragment": len(FRAG4_PORT_VIP)}, fragments_of("web4")),
    # Later fragments have no port: every fragment finds its VIP by address and
    # protocol, the all-ports VIP where there is one (docs/packet-path.md).
    Case("IPv4 fragments to port 22 of an address with an all-ports VIP", FRAG4_PORT_AND_ALL,
         {"fwd_fragment": len(FRAG4_PORT_AND_ALL)}, fragments_of("any4")),
    # Not for a VIP.
    Case("ICMP echo to an IPv4 VIP", [IP(src=C4, dst=WEB4) / ICMP()], {"drop_icmp": 1}, nothing),
    Case("ICMP fragmentation needed to a VIP", [IP(src=C4, dst=WEB4) / ICMP(type=3, code=4)
                                                / IP(src=WEB4, dst=C4) / TCP()],
         {"drop_icmp": 1}, nothing),
    Case("ICMPv6 echo to an IPv6 VIP", [IPv6(src=C6, dst=WEB6) / ICMPv6EchoRequest()],
         {"drop_icmp": 1}, nothing),
    Case("TCP to no VIP (exception policy drop)", [tcp4(dst="192.0.2.99")], {"drop_no_vip": 1},
         nothing),
    Case("TCP to a VIP address, other port", [tcp4(dport=81)], {"drop_no_vip": 1}, nothing),
    Case("UDP to a TCP VIP", [udp4(dst=WEB4, dport=80)], {"drop_no_vip": 1}, nothing),
    # The host's services (sshd here) are not reachable from the data port.
    Case("TCP to the balancer's own address", [tcp4(dst=LB4, dport=22), tcp6(dst=LB6, dport=22)],
         {"drop_local": 2}, nothing),
    Case("ICMP echo to the balancer's own address", [IP(src=C4, dst=LB4) / ICMP()],
         {"drop_local": 1}, nothing),
    # ARP and neighbour discovery.
    Case("ARP request for the data address", [arp_who_has(LB4)], {"arp_replied": 1},
         answered(arp_reply)),
    Case("ARP request for a VIP with answer_arp", [arp_who_has(WEB4)], {"arp_replied": 1},
         answered(arp_reply)),
    Case("ARP request on a VLAN: the reply keeps the tag", [arp_who_has(LB4, vlan=7)],
         {"arp_replied": 1}, answered(arp_reply)),
    Case("ARP request for a VIP without answer_arp", [arp_who_has(DNS4)], {"drop_arp_other": 1},
         nothing),
    Case("ARP request for a foreign address", [arp_who_has("203.0.113.99")],
         {"drop_arp_other": 1}, nothing),
    Case("unsolicited ARP reply", [ARP(op=2, hwsrc=CLIENT_MAC, psrc=GW4, pdst="203.0.113.99")],
         {"drop_arp_other": 1}, nothing),
    Case("NS for the IPv6 data address", [solicit(LB6)], {"nd_replied": 1},
         answered(neighbor_advertisement)),
    Case("NS for an IPv6 VIP with answer_arp", [solicit(WEB6)], {"nd_replied": 1},
         answered(neighbor_advertisement)),
    Case("NS of duplicate address detection (source ::)", [solicit(LB6, src="::")],
         {"nd_replied": 1}, answered(neighbor_advertisement)),
    Case("NS with hop limit 64 (RFC 4861 7.1.1: not from the link)", [solicit(LB6, hlim=64)],
         {"drop_icmp": 1}, nothing),
    Case("NS for a foreign address", [solicit("2001:db8:1::99")], {"drop_icmp": 1}, nothing),
    Case("NS on a VLAN: the advertisement keeps the tag",
         [Dot1Q(vlan=7) / solicit(LB6)], {"nd_replied": 1},
         answered(lambda f, mac: _tagged(neighbor_advertisement(f, mac), 7))),
    # Malformed: dropped, counted, no crash.
    *[Case(f"TCP SYN frame cut to {n} bytes", [cut(tcp4(), n)], {"drop_parse_truncated": 1},
           nothing) for n in (0, 1, 13, 14, 17, 33, 34, 40, 53)],
    Case("IPv4 IHL 3", [with_bytes(tcp4(), 14, b"\x43")], {"drop_parse_bad": 1}, nothing),
    Case("IPv4 version 5", [with_bytes(tcp4(), 14, b"\x55")], {"drop_parse_bad": 1}, nothing),
    Case("IPv4 total length < header", [with_bytes(tcp4(), 16, b"\x00\x10")], {"drop_parse_bad": 1},
         nothing),
    Case("IPv4 total length > data", [with_bytes(tcp4(), 16, b"\x00\x50")],
         {"drop_parse_truncated": 1}, nothing),
    Case("TCP data offset 4", [with_bytes(tcp4(), 14 + 20 + 12, b"\x40")], {"drop_parse_bad": 1},
         nothing),
    Case("TCP data offset past the data", [with_bytes(tcp4(), 14 + 20 + 12, b"\xf0")],
         {"drop_parse_truncated": 1}, nothing),
    Case("UDP length 7", [with_bytes(udp4(), 14 + 20 + 4, b"\x00\x07")], {"drop_parse_bad": 1},
         nothing),
    Case("UDP length past the IP payload", [with_bytes(udp4(), 14 + 20 + 4, b"\x04\x00")],
         {"drop_parse_bad": 1}, nothing),
    Case("IPv6 payload length > data", [with_bytes(tcp6(), 14 + 4, b"\x04\x00")],
         {"drop_parse_truncated": 1}, nothing),
    Case("IPv6 EtherType, IPv4 header", [raw_frame(0x86DD, bytes(tcp4()))], {"drop_parse_bad": 1},
         nothing),
    Case("garbage after an IPv4 EtherType", [raw_frame(0x0800, b"\xff" * 46)],
         {"drop_parse_bad": 1}, nothing),
    Case("garbage after an ARP EtherType", [raw_frame(0x0806, b"\xa5" * 46)],
         {"drop_parse_bad": 1}, nothing),
    Case("garbage frame (EtherType 0xdead)", [Ether(b"\xde\xad\xbe\xef" * 16)],
         {"drop_not_ip": 1}, nothing),
    Case("LLDP (not IP)", [raw_frame(0x88CC, b"\x02\x07" + b"\0" * 44)], {"drop_not_ip": 1},
         nothing),
    Case("stacked VLAN tags (not forwarded)", [Dot1Q(vlan=7) / Dot1Q(vlan=8) / tcp4()],
         {"drop_not_ip": 1}, nothing),
]


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.description, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_packet(pipe, case: Case):
    frames = [pipe.frame(p) for p in case.packets]
    out, moved = pipe.send(frames)
    assert outcomes(moved) == case.moves
    assert moved.rx == len(frames)
    case.output(pipe, frames, out)
    if case.vip:
        assert {route(pipe.lb, f).vip.name for f in frames} == {case.vip}


# ---------------------------------------------------------------- flows

@pytest.mark.parametrize("packets", [
    [tcp4(flags="S", sport=50001), tcp4(flags="PA", sport=50001, payload=b"data")],
    [udp4(sport=50002), udp4(sport=50002, payload=b"again")],
], ids=["tcp", "udp"])
def test_first_packet_is_new_the_next_a_cache_hit(pipe, packets):
    sent = []
    for pkt, counter in zip(packets, ("fwd_new", "fwd_cache_hit")):
        frame = pipe.frame(pkt)
        out, moved = pipe.send([frame])
        assert outcomes(moved) == {counter: 1}
        check_encap(out[0], frame, route(pipe.lb, frame), pipe.mac)
        sent += out
    assert len({traffic.decapsulate(f).backend for f in sent}) == 1
    # GUE: one flow keeps one outer UDP source port, so ECMP after us keeps it on one path.
    if UDP in packets[0]:
        assert len({Ether(f)[UDP].sport for f in sent}) == 1


def test_new_flows_are_counted_per_backend(ring):
    """Per (VIP, backend) new-flow counts: each new flow counted once, at the
    backend it went to, and together they are the fwd_new total."""
    with Balancer(make_config(ring, BEFORE)) as lb:
        pipe = Pipeline(lb)
        flows = _flows(5)[:400]
        first, _ = _send_flows(pipe, flows, "S")
        _send_flows(pipe, flows, "PA")              # cache hits: not new
        by_address = Counter(first.values())
        counts = {c.address: c.new_flows for c in lb.backend_counts() if c.new_flows}
        assert counts == dict(by_address)
        assert sum(counts.values()) == lb.stats().fwd_new == len(flows)


def test_track_moved_stable_bucket_goes_by_the_table_uncached(ring):
    with Balancer(make_config(ring, track="moved")) as lb:
        pipe = Pipeline(lb)
        frame = pipe.frame(tcp4(flags="A", sport=50003))
        for _ in range(2):
            out, moved = pipe.send([frame])
            assert outcomes(moved) == {"fwd_table": 1} and moved.cache_insert == 0
            check_encap(out[0], frame, route(lb, frame), pipe.mac)
        assert pipe.punts == []


# ---------------------------------------------------------------- reconfiguration

RECONF_FLOWS = 3000


def _reconf_vips(web4_addresses: list[str]) -> list[dict]:
    """Full-size tables: the moved share is what production sees."""
    web4 = dict(VIPS[0], table_size=65537,
                backends=[{"name": f"web4-{a.split('.')[-1]}", "address": a}
                          for a in web4_addresses])
    web6 = dict(VIPS[4], table_size=65537)
    return [web4, web6]


BEFORE = _reconf_vips(["203.0.113.11", "203.0.113.12", "203.0.113.13", "203.0.113.14"])
# web4-11 leaves, two join: cached and held flows must still reach 203.0.113.11.
AFTER = _reconf_vips(["203.0.113.12", "203.0.113.13", "203.0.113.14", "203.0.113.15",
                      "203.0.113.16"])


def _flows(seed: int) -> list[traffic.Flow]:
    return traffic.make_flows([("web4", "192.0.2.10", 6, 80), ("web6", WEB6, 6, 443)],
                              RECONF_FLOWS, random.Random(seed))


def _key(f: traffic.Flow) -> tuple:
    return (f.proto, f.src, f.sport, f.dst, f.dport)


def _send_flows(pipe: Pipeline, flows, kind: str):
    """One frame of `kind` per flow; returns {flow: outer destination} and the counters."""
    out, moved = pipe.send([fr for f in flows for fr in f.frames(pipe.mac, CLIENT_MAC, [kind])])
    delivered = [traffic.decapsulate(fr) for fr in out]
    assert all(d is not None and d.payload_ok for d in delivered)
    by_flow = {d.flow: d.backend for d in delivered}
    assert len(by_flow) == len(delivered) == len(flows)   # held frames are never lost
    return {f: by_flow[_key(f)] for f in flows}, moved


def _classify(lb: Balancer, flows):
    return {f: lb.dataplane.classify(FlowKey(f.src, f.dst, f.sport, f.dport, f.proto))
            for f in flows}


def _address(ref) -> str:
    return str(ref.address)


def test_reconfigure_keeps_cached_flows_on_their_backend(ring):
    with Balancer(make_config(ring, BEFORE)) as lb:
        pipe = Pipeline(lb)
        flows = _flows(1)
        first, moved = _send_flows(pipe, flows, "S")
        assert outcomes(moved) == {"fwd_new": len(flows)} and moved.cache_insert == len(flows)
        lb.reconfigure(make_config(ring, AFTER))
        c = _classify(lb, flows)
        assert all(first[f] == _address(c[f].previous) for f in flows)
        changed = sum(c[f].moved for f in flows)
        assert changed > len(flows) // 10, "the change must move a fair share of the flows"
        after, moved = _send_flows(pipe, flows, "PA")
        assert outcomes(moved) == {"fwd_cache_hit": len(flows)}
        assert after == first and pipe.punts == []


def test_a_reused_port_after_close_is_a_new_flow_on_the_current_table(ring):
    """A client reuses the 5-tuple of a connection that closed (FIN seen)
    after a backend change: the new connection's SYN is decided by the
    current table, not by the closed connection's backend (which may be
    drained or gone), and its next packets follow it."""
    with Balancer(make_config(ring, BEFORE)) as lb:
        pipe = Pipeline(lb)
        flows = _flows(4)
        first, _ = _send_flows(pipe, flows, "S")
        lb.reconfigure(make_config(ring, AFTER))
        c = _classify(lb, flows)
        closed, moved = _send_flows(pipe, flows, "FA")
        assert outcomes(moved) == {"fwd_cache_hit": len(flows)} and closed == first
        reused, moved = _send_flows(pipe, flows, "S")
        assert outcomes(moved) == {"fwd_new": len(flows)}
        assert all(reused[f] == _address(c[f].current) for f in flows)
        assert sum(reused[f] != first[f] for f in flows) > len(flows) // 10
        after, moved = _send_flows(pipe, flows, "PA")
        assert outcomes(moved) == {"fwd_cache_hit": len(flows)} and after == reused


def _active_by_address(lb: Balancer) -> Counter:
    """Flows cached per backend address, as the balancer reports them."""
    return Counter({c.address: c.active_flows for c in lb.backend_counts() if c.active_flows})


def _assert_active_sums_to_the_cache(lb: Balancer) -> None:
    """Per backend they add up to the flows the cache holds (none timed out
    here: held is live), and to the status total."""
    assert sum(_active_by_address(lb).values()) == lb.cache.count(now_ms()) == \
        lb.snapshot()["active_flows"]


def test_active_flows_per_backend_follow_the_worker_and_python(ring):
    """Flows cached by the worker (new flows), a SYN reusing closed flows'
    5-tuples after a backend change, FIN then ageing, and flows Python caches
    (state from a peer): per backend the active flows are the flows the cache
    holds for it, whoever wrote or freed them."""
    with Balancer(make_config(ring, BEFORE)) as lb:
        pipe = Pipeline(lb)
        flows = _flows(6)[:600]
        first, _ = _send_flows(pipe, flows, "S")
        assert _active_by_address(lb) == Counter(first.values())
        _assert_active_sums_to_the_cache(lb)

        lb.reconfigure(make_config(ring, AFTER))
        _send_flows(pipe, flows, "FA")                 # closing, still cached
        assert _active_by_address(lb) == Counter(first.values())
        reused, _ = _send_flows(pipe, flows, "S")      # freed, cached afresh by the table
        assert _active_by_address(lb) == Counter(reused.values())
        assert "203.0.113.11" in first.values() and "203.0.113.11" not in reused.values()
        _assert_active_sums_to_the_cache(lb)

        closing = flows[::3]
        _send_flows(pipe, closing, "FA")
        timeout = lb.config.balancer.timeouts.tcp_closing * 1000
        assert lb.cache.age(now_ms() + int(timeout) + 1, lb.cache.sets) == len(closing)
        kept = [f for f in flows if f not in set(closing)]
        assert _active_by_address(lb) == Counter(reused[f] for f in kept)

        # State from a peer: Python caches flows as pylb/cluster.py does.
        extra = [f for f in _flows(7) if f not in set(flows)][:50]
        c = _classify(lb, extra)
        for f in extra:
            key = FlowKey(f.src, f.dst, f.sport, f.dport, f.proto)
            lb.cache.insert(key.to_bytes(), c[f].flow_id, c[f].current.id, now_ms(),
                            TimeoutClass.TCP)
        assert _active_by_address(lb) == Counter(reused[f] for f in kept) + \
            Counter(_address(c[f].current) for f in extra)
        _assert_active_sums_to_the_cache(lb)


def test_reconfigure_with_track_moved(ring):
    """Rule 3 and 4 with the standalone policy: an established flow in a moved
    bucket is held, handed up (MOVED) and sent to the previous table's backend,
    then cached; new flows in moved buckets take the current backend and yield
    a NEW_STATE notice; flows in stable buckets go by the table, uncached."""
    with Balancer(make_config(ring, BEFORE, track="moved")) as lb:
        pipe = Pipeline(lb)
        old = _flows(2)
        known = {_key(f) for f in old}
        new = [f for f in _flows(3) if _key(f) not in known]
        first, moved = _send_flows(pipe, old, "S")
        assert outcomes(moved) == {"fwd_new": len(old)} and moved.cache_insert == 0
        lb.reconfigure(make_config(ring, AFTER, track="moved"))
        c = _classify(lb, old + new)
        moved_old = [f for f in old if c[f].moved]
        stable_old = [f for f in old if not c[f].moved]
        assert moved_old and stable_old

        sent, moved = _send_flows(pipe, old, "PA")
        assert outcomes(moved) == {"fwd_table": len(stable_old), "fwd_verdict": len(moved_old)}
        assert moved.held == moved.cache_insert == len(moved_old)
        assert sent == first   # no established flow changed backend
        assert all(sent[f] == _address(c[f].previous) for f in old)
        punts = {(p.proto, str(p.src), p.sport, str(p.dst), p.dport): p for p in pipe.punts}
        assert len(pipe.punts) == len(punts) == len(moved_old)
        for f in moved_old:
            p = punts[_key(f)]
            assert (p.reason, p.previous, p.current) == (PuntReason.MOVED, c[f].previous.id,
                                                         c[f].current.id) and p.slot is not None

        sent, moved = _send_flows(pipe, old, "PA")   # the verdicts were cached
        assert outcomes(moved) == {"fwd_table": len(stable_old), "fwd_cache_hit": len(moved_old)}
        assert sent == first
        assert _active_by_address(lb) == Counter(_address(c[f].previous) for f in moved_old)

        pipe.punts.clear()
        moved_new = [f for f in new if c[f].moved]
        sent, moved = _send_flows(pipe, new, "S")
        assert outcomes(moved) == {"fwd_new": len(new)}
        assert moved.notices == moved.cache_insert == len(moved_new)
        assert all(sent[f] == _address(c[f].current) for f in new)
        notices = Counter((p.reason, p.slot, p.backend) for p in pipe.punts)
        assert notices == Counter((PuntReason.NEW_STATE, None, c[f].current.id) for f in moved_new)

        sent, moved = _send_flows(pipe, new, "PA")
        assert outcomes(moved) == {"fwd_cache_hit": len(moved_new),
                                   "fwd_table": len(new) - len(moved_new)}
        assert all(sent[f] == _address(c[f].current) for f in new)
        assert _active_by_address(lb) == Counter(_address(c[f].previous) for f in moved_old) + \
            Counter(_address(c[f].current) for f in moved_new)
        _assert_active_sums_to_the_cache(lb)
        total = lb.stats()
        assert total.rx == total.forwarded == 3 * len(old) + 2 * len(new) and total.held_now == 0


# ---------------------------------------------------------------- next-hop resolution

def test_gateway_mac_is_learnt_by_arp(ring):
    with Balancer(make_config(ring, VIPS[:1], static_gateway_v4=False)) as lb:
        pipe = Pipeline(lb)
        sent = pipe.drain()
        assert len(sent) == 1 and lb.stats().neigh_requests == 1
        assert_frame(sent[0], arp_request(pipe.mac, GW4))

        syn = pipe.frame(tcp4(sport=50004))
        out, moved = pipe.send([syn])
        assert outcomes(moved) == {"drop_no_neighbor": 1}
        # A repeated request is rate-limited to one a second: at most one more.
        assert all(Ether(f)[ARP].pdst == GW4 for f in out) and len(out) == moved.neigh_requests

        reply = Ether(dst=pipe.mac, src=GATEWAY_MAC) / ARP(op=2, hwsrc=GATEWAY_MAC, psrc=GW4,
                                                          hwdst=pipe.mac, pdst=LB4)
        out, moved = pipe.send([bytes(reply)])
        assert outcomes(moved) == {"neigh_learned": 1} and out == []
        assert lb.neigh.lookup(GW4) == GATEWAY_MAC

        # A dropped packet leaves no flow state behind: the retransmitted SYN
        # is a new flow again, like one never seen.
        new_syn = pipe.frame(tcp4(sport=50005))
        out, moved = pipe.send([syn, new_syn])
        assert outcomes(moved) == {"fwd_new": 2}
        for sent, frame in zip(out, (syn, new_syn)):
            check_encap(sent, frame, route(lb, frame), pipe.mac)


# ---------------------------------------------------------------- robustness

def test_random_and_mutated_frames_are_all_counted(pipe):
    """Whatever arrives, each frame gets exactly one outcome and nothing crashes."""
    rng = random.Random(5)
    seeds = [pipe.frame(p) for p in (tcp4(), udp4(), tcp6(), udp6(), arp_who_has(LB4),
                                     solicit(LB6), FRAG4_TCP[1])]
    frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(1000)]
    for _ in range(2000):
        f = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        frames.append(bytes(f[:rng.randrange(len(f) + 1)] if rng.random() < 0.3 else f))
    out, moved = pipe.send(frames)
    assert moved.rx == len(frames) and sum(outcomes(moved).values()) == len(frames)
    assert moved.tx_ok == len(out)
