"""Shared by the pipeline tests on the ring, pcap and null PMDs: a configuration
with one VIP per feature under test, a balancer driven until its counters say
every frame was handled, and the expected output frames built with scapy from
the configuration, compared field by field with what the balancer sent."""
from __future__ import annotations

import ipaddress
import itertools
import time
from dataclasses import dataclass, fields

from scapy.all import ARP, IP, TCP, UDP, VXLAN, Dot1Q, Ether, IPv6, Packet, Raw
from scapy.layers.inet6 import (ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr,
                                ICMPv6NDOptSrcLLAddr)
from scapy.packet import NoPayload

from pylb import config as config_mod
from pylb import flow_id as flow_id_mod
from pylb import packet
from pylb.balancer import Balancer
from pylb.stats import DROP_REASONS, FORWARDED, Stats

C4, C6 = "198.51.100.7", "2001:db8:7::7"
WEB4, DNS4, ANY4, WEB6, DNS6, ANY6 = ("192.0.2.10", "192.0.2.53", "192.0.2.20",
                                      "2001:db8:10::10", "2001:db8:10::53", "2001:db8:10::20")
CLIENT_MAC = "02:00:00:00:00:c1"
ROUTER_MAC = "02:00:00:00:00:01"   # dst of frames built before the port exists (it is promiscuous)
GATEWAY_MAC = "02:00:00:00:00:fe"
LB4, LB6 = "203.0.113.1", "2001:db8:1::1"
GW4, GW6 = "203.0.113.254", "2001:db8:1::fe"
VXLAN_INNER_MAC = "02:00:00:00:00:aa"
# Every counter that is the one outcome of a received frame (the rx equation).
OUTCOMES = FORWARDED + ("verdict_peer", "arp_replied", "nd_replied", "neigh_learned",
                        "exception_tap", "held_now") + DROP_REASONS
SMALL_TABLE = 1021   # prime; keeps each balancer start in milliseconds
_ring_ids = itertools.count()


def ring_device() -> str:
    """A "ring:NAME" device unique in the process. DPDK's ring PMD names its
    device "net_ring_NAME" within 28 characters, so NAME stays short (the
    conftest ring_port_name can be 22 characters: too long)."""
    return f"ring:pipe{next(_ring_ids)}"


def _backends(prefix: str, addresses: list[str], weight: int = 1) -> list[dict]:
    return [{"name": f"{prefix}-{i}", "address": a, "weight": weight}
            for i, a in enumerate(addresses, 1)]


def _vip(name, address, protocol, port, encap, backends, **extra) -> dict:
    return {"name": name, "address": address, "protocol": protocol, "port": port,
            "encap": encap, "backends": backends, "table_size": SMALL_TABLE, **extra}


V4_BACKENDS = [f"203.0.113.{i}" for i in range(11, 15)]
# One VIP per behaviour the tests look at; the name says which.
VIPS = [
    _vip("web4", "192.0.2.10", "tcp", 80, {"type": "ipip"}, _backends("web4", V4_BACKENDS),
         answer_arp=True),
    _vip("dns4", "192.0.2.53", "udp", 53, {"type": "gue"},
         _backends("dns4", [f"203.0.113.{i}" for i in range(21, 24)])),
    _vip("any4", "192.0.2.20", "tcp", "all", {"type": "ipip", "ttl": 16},
         _backends("any4", ["203.0.113.31", "203.0.113.32"])),
    _vip("ssh4", "192.0.2.20", "tcp", 22, {"type": "ipip"},
         _backends("ssh4", ["203.0.113.41", "203.0.113.42"])),
    _vip("web6", "2001:db8:10::10", "tcp", 443,
         {"type": "vxlan", "vni": 100, "inner_mac": VXLAN_INNER_MAC},
         _backends("web6", [f"2001:db8:2::{i}" for i in range(1, 4)]), answer_arp=True),
    _vip("dns6", "2001:db8:10::53", "udp", 53, {"type": "ipip"},
         _backends("dns6", ["2001:db8:2::21", "2001:db8:2::22"])),
    _vip("any6", "2001:db8:10::20", "udp", "all", {"type": "ipip"},
         _backends("any6", ["2001:db8:2::31", "2001:db8:2::32"])),
    _vip("web46", "192.0.2.46", "tcp", 80, {"type": "gue"},
         _backends("web46", ["2001:db8:2::46", "2001:db8:2::47"])),
    _vip("drained", "192.0.2.30", "tcp", 80, {"type": "ipip"},
         _backends("drained", ["203.0.113.51", "203.0.113.52"], weight=0)),
]


def make_config(device: str, vips: list[dict] = VIPS, *, track: str = "all",
                static_gateway_v4: bool = True, **data) -> config_mod.Config:
    neighbors = [{"address": GW6, "mac": GATEWAY_MAC}]
    if static_gateway_v4:
        neighbors.append({"address": GW4, "mac": GATEWAY_MAC})
    return config_mod.parse({
        "balancer": {
            "name": "pipeline", "flow_seed": 7,
            "data": {"device": device, "address_v4": LB4, "address_v6": LB6,
                     "gateway_v4": GW4, "gateway_v6": GW6, "neighbors": neighbors,
                     "mbufs": 8191, **data},
            "flow_cache": {"capacity": 65536, "track": track},
        },
        "vips": vips,
    }, "pipeline test configuration")


# ---------------------------------------------------------------- inputs

def tcp4(dst=WEB4, dport=80, flags="S", sport=40000, payload=b"", **ip):
    return IP(src=C4, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def udp4(dst=DNS4, dport=53, sport=5353, payload=b"query", **ip):
    return IP(src=C4, dst=dst, **ip) / UDP(sport=sport, dport=dport) / Raw(payload)


def tcp6(dst=WEB6, dport=443, flags="S", sport=40000, payload=b"", **ip):
    return IPv6(src=C6, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def udp6(dst=DNS6, dport=53, sport=5353, payload=b"query", **ip):
    return IPv6(src=C6, dst=dst, **ip) / UDP(sport=sport, dport=dport) / Raw(payload)


def arp_who_has(target, vlan=None):
    a = ARP(op=1, hwsrc=CLIENT_MAC, psrc=GW4, hwdst="00:00:00:00:00:00", pdst=target)
    eth = Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT_MAC)
    return eth / Dot1Q(vlan=vlan) / a if vlan else eth / a


def solicit(target, src=GW6, hlim=255):
    """A neighbour solicitation to target's solicited-node address (RFC 4291 2.7.1)."""
    low24 = ipaddress.IPv6Address(target).packed[-3:]
    dst = ipaddress.IPv6Address(bytes.fromhex("ff02" + "00" * 9 + "01ff") + low24)
    ns = IPv6(src=src, dst=str(dst), hlim=hlim) / ICMPv6ND_NS(tgt=target)
    return ns / ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC) if src != "::" else ns


def client_frame(pkt: Packet | bytes, dst_mac: str = ROUTER_MAC) -> bytes:
    """The bytes of pkt, behind the client's Ethernet header unless it has one."""
    if isinstance(pkt, (Ether, bytes)):
        return bytes(pkt)
    return bytes(Ether(dst=dst_mac, src=CLIENT_MAC) / pkt)


def delta(after: Stats, before: Stats) -> Stats:
    return Stats(**{f.name: getattr(after, f.name) - getattr(before, f.name)
                    for f in fields(Stats)})


def outcomes(d: Stats) -> dict[str, int]:
    """The outcome counters that moved."""
    return {name: getattr(d, name) for name in OUTCOMES if getattr(d, name)}


class Pipeline:
    """A Balancer on a ring port, fed frame batches; records every punt the
    worker hands to Python while Balancer.step decides them."""

    def __init__(self, lb: Balancer):
        self.lb = lb
        self.punts: list = []
        poll = lb.worker.poll

        def recording_poll(*args, **kw):
            got = poll(*args, **kw)
            self.punts.extend(got)
            return got

        lb.worker.poll = recording_poll

    @property
    def mac(self) -> str:
        return self.lb.port.mac

    def frame(self, pkt: Packet | bytes) -> bytes:
        return client_frame(pkt, self.mac)

    def drain(self) -> list[bytes]:
        out = []
        while batch := self.lb.port.drain():
            out += batch
        return out

    def send(self, frames: list[bytes], timeout: float = 10.0) -> tuple[list[bytes], Stats]:
        """Injects frames and steps until each one has its outcome (none still
        held); returns what the port sent and how the counters moved."""
        before = self.lb.stats()
        pending, deadline = list(frames), time.monotonic() + timeout
        while True:
            pending = pending[self.lb.port.inject(pending):] if pending else pending
            self.lb.step(max_bursts=256)
            now = self.lb.stats()
            if not pending and now.rx - before.rx == len(frames) and now.held_now == 0:
                break
            assert time.monotonic() < deadline, f"frames not handled in time: {delta(now, before)}"
        assert now.broken_equations() == []
        return self.drain(), delta(now, before)


@dataclass(frozen=True)
class Route:
    """Where the balancer must send a packet: the VIP (its encapsulation), the
    backend address and the flow id (UDP source port, flow label)."""

    vip: config_mod.Vip
    backend: ipaddress.IPv4Address | ipaddress.IPv6Address
    flow_id: int


def flow_key(frame: bytes) -> flow_id_mod.FlowKey:
    p = packet.parse(frame)
    return flow_id_mod.FlowKey(p.src, p.dst, p.sport, p.dport, p.l4_proto)


def route(lb: Balancer, frame: bytes) -> Route:
    """What `pylb which` (Dataplane.classify) names for the frame's 5-tuple."""
    c = lb.dataplane.classify(flow_key(frame))
    assert c.vip is not None, f"{flow_key(frame)} is for no VIP"
    return Route(lb.config.find_vip(c.vip), c.current.address, c.flow_id)


def fragment_route(lb: Balancer, vip_name: str, src, dst, proto: int) -> Route:
    """Fragments go by the 3-tuple (ports 0) in their VIP's current table."""
    vip = lb.config.find_vip(vip_name)
    key3 = flow_id_mod.FlowKey(src, dst, 0, 0, proto)
    fid = flow_id_mod.flow_id(key3, lb.config.balancer.flow_seed)
    tables = lb.dataplane.tables[vip_name]
    name = tables.names[tables.table[flow_id_mod.bucket(fid, vip.table_size)]]
    return Route(vip, next(b.address for b in vip.backends if b.name == name), fid)


def inner_ip(frame: bytes) -> bytes:
    """The IP packet of a frame, Ethernet padding excluded."""
    p = packet.parse(frame)
    return frame[p.l2_len:p.l2_len + p.l3_total]


def expected_encap(frame: bytes, r: Route, lb_mac: str) -> Packet:
    """The frame the balancer must send for `frame`, per docs/packet-path.md;
    the UDP source port and the outer IPv4 id, which derive from the flow id and
    are checked by range in check_encap, are filled in from the actual frame."""
    inner = inner_ip(frame)
    inner_v4 = inner[0] >> 4 == 4
    tos = inner[1] if inner_v4 else (inner[0] << 4 | inner[1] >> 4) & 0xFF
    kind = r.vip.encap.type
    proto = 17 if kind != "ipip" else (4 if inner_v4 else 41)
    src = LB4 if r.backend.version == 4 else LB6
    if r.backend.version == 4:
        df = not inner_v4 or bool(inner[6] & 0x40)
        outer = IP(src=src, dst=str(r.backend), tos=tos, ttl=r.vip.encap.ttl, proto=proto,
                   flags="DF" if df else 0, id=0)
    else:
        outer = IPv6(src=src, dst=str(r.backend), tc=tos, fl=r.flow_id & 0xFFFFF,
                     hlim=r.vip.encap.ttl, nh=proto)
    pkt = Ether(dst=GATEWAY_MAC, src=lb_mac) / outer
    if kind != "ipip":
        pkt = pkt / UDP(dport=r.vip.encap.udp_port(), chksum=0 if r.backend.version == 4 else None)
    if kind == "vxlan":
        pkt = pkt / VXLAN(flags=0x08, vni=r.vip.encap.vni) / Ether(
            dst=r.vip.encap.inner_mac, src=lb_mac, type=0x0800 if inner_v4 else 0x86DD)
    return pkt / Raw(inner)


def _flow_derived_fields(expected: Packet, actual: Packet) -> None:
    """Fields the encapsulation derives from the flow id by a hash: checked by
    their rule, then copied so that the rest compares exactly."""
    if UDP in expected:
        sport = actual[UDP].sport
        assert 49152 <= sport <= 65535, f"UDP source port {sport} outside 49152..65535"
        expected[UDP].sport = sport
    if IP in expected and not expected[IP].flags.DF:
        ident = actual[IP].id if IP in actual else 0
        assert ident != 0, "outer IPv4 id 0 on a packet that may be fragmented"
        expected[IP].id = ident


def assert_fields(actual: Packet, expected: Packet) -> None:
    """Layer by layer, field by field; the message names every field that
    differs in the first layer that differs."""
    a, e, where = actual, expected, []
    while not isinstance(e, NoPayload):
        where.append(e.name)
        assert type(a) is type(e), f"{'/'.join(where)}: got layer {a.name}"
        diffs = [f"{f.name}: got {a.getfieldval(f.name)!r}, expected {e.getfieldval(f.name)!r}"
                 for f in e.fields_desc if a.getfieldval(f.name) != e.getfieldval(f.name)]
        assert not diffs, f"{'/'.join(where)}: " + "; ".join(diffs)
        a, e = a.payload, e.payload
    assert isinstance(a, NoPayload), f"extra bytes after {'/'.join(where)}: {bytes(a)!r}"


def assert_frame(actual: bytes, expected: Packet) -> None:
    """expected is completed (lengths, checksums) by scapy and read back the
    way the actual frame is, then both are compared field by field and whole."""
    want = Ether(bytes(expected))
    assert_fields(Ether(actual), want)
    assert actual == bytes(want)


def check_encap(actual: bytes, frame: bytes, r: Route, lb_mac: str) -> None:
    expected = expected_encap(frame, r, lb_mac)
    _flow_derived_fields(expected, Ether(actual))
    assert_frame(actual, expected)
    assert actual.endswith(inner_ip(frame))   # not an IP hop for the inner packet


def arp_reply(request: bytes, lb_mac: str) -> Packet:
    """The request rewritten in place (RFC 826): VLAN tag kept, roles swapped."""
    req = Ether(request)
    a = req[ARP]
    reply = ARP(op=2, hwsrc=lb_mac, psrc=a.pdst, hwdst=a.hwsrc, pdst=a.psrc)
    eth = Ether(dst=a.hwsrc, src=lb_mac)
    return eth / Dot1Q(vlan=req[Dot1Q].vlan) / reply if Dot1Q in req else eth / reply


def arp_request(lb_mac: str, target: str) -> Packet:
    return Ether(dst="ff:ff:ff:ff:ff:ff", src=lb_mac) / ARP(
        op=1, hwsrc=lb_mac, psrc=LB4, hwdst="00:00:00:00:00:00", pdst=target)


def neighbor_advertisement(solicitation: bytes, lb_mac: str) -> Packet:
    """RFC 4861 7.2.4: to the solicitor (its link-layer option), S and O set,
    our MAC as target link-layer option, hop limit 255; for duplicate address
    detection (source ::) to all nodes, S clear."""
    ns = Ether(solicitation)
    dad = ns[IPv6].src == "::"
    if dad:
        mac, dst = "33:33:00:00:00:01", "ff02::1"
    else:
        mac = ns[ICMPv6NDOptSrcLLAddr].lladdr if ICMPv6NDOptSrcLLAddr in ns else ns.src
        dst = ns[IPv6].src
    target = ns.tgt
    return (Ether(dst=mac, src=lb_mac) / IPv6(src=target, dst=dst, hlim=255)
            / ICMPv6ND_NA(tgt=target, R=0, S=0 if dad else 1, O=1)
            / ICMPv6NDOptDstLLAddr(lladdr=lb_mac))
