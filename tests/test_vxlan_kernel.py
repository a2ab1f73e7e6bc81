"""VXLAN encapsulation checked by a real peer: a backend whose own kernel
decapsulates, answers from the VIP on its loopback, and sends the answer
straight to the client (DSR).

    client ns                 backend ns                        lb ns
    198.51.100.7 ─── veth ─── 198.51.100.1     203.0.113.2 ─ veth ─ 203.0.113.1
    2001:db8:7::7             2001:db8:7::1    vx0: VNI 4242          frames are
                               lo: 192.0.2.10, 2001:db8:10::10          injected here

The lb namespace stands in for the balancer's wire: the test writes whole
encapsulated frames there. The client is not connected to it, so whatever the
client receives came from the backend directly. The frames come from a
parametrised builder: scapy (proves the topology) and pylb.packet.encapsulate
(the code under test).
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw, raw

from netns import Interface, Namespace, Process

pytestmark = [pytest.mark.netns, pytest.mark.timeout(15)]

VNI = 4242
VXLAN_PORT = 4789
BACKEND_VXLAN_MAC = "00:00:5e:00:53:10"  # RFC 7042 documentation range
LB_UNDERLAY, BACKEND_UNDERLAY = "203.0.113.1", "203.0.113.2"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:7::7"
VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
SERVICE_PORT = 7000
DEFAULT_TTL = 64  # of the backend; seen unchanged at the client: no hop between
CLIENT_PORT = 40242
WAIT = 1.5  # seconds for a packet to arrive: veth delivery takes microseconds
START = 5.0  # seconds for the backend server to start, on a busy machine too

# Binds UDP and TCP on every VIP: UDP datagrams are reported on stdout and
# echoed; the TCP listener only has to exist for the kernel to answer a SYN.
BACKEND_SERVER = """
import json, select, socket, sys
port, udp, tcp = int(sys.argv[1]), [], []
for vip in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    u, t = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_STREAM)
    u.bind((vip, port)); t.bind((vip, port)); t.listen()
    udp.append(u); tcp.append(t)
print("ready", flush=True)
while True:
    for u in select.select(udp, [], [])[0]:
        data, peer = u.recvfrom(65535)
        print(json.dumps([peer[0], peer[1], data.hex()]), flush=True)
        u.sendto(data, peer)
"""


@dataclass(frozen=True)
class Wire:
    """What a balancer knows when it encapsulates toward this backend."""

    src_mac: str
    dst_mac: str
    src: str
    dst: str
    vni: int
    inner_mac: str


def scapy_vxlan(inner: bytes, wire: Wire, flow_id: int) -> bytes:
    inner_type = 0x0800 if inner[0] >> 4 == 4 else 0x86DD
    return raw(
        Ether(src=wire.src_mac, dst=wire.dst_mac)
        / IP(src=wire.src, dst=wire.dst)
        / UDP(sport=49152 + flow_id % 16384, dport=VXLAN_PORT)
        # Before Ether, scapy writes VXLAN-GPE flags (0x0c), which Linux drops.
        / VXLAN(flags=0x08, vni=wire.vni)
        / Ether(src=wire.src_mac, dst=wire.inner_mac, type=inner_type)
        / Raw(inner)
    )


def pylb_vxlan(inner: bytes, wire: Wire, flow_id: int) -> bytes:
    from pylb import packet  # a missing or stale module fails the case, never skips it

    params = packet.EncapParams(
        kind=packet.EncapKind.VXLAN, src=wire.src, dst=wire.dst, src_mac=wire.src_mac,
        dst_mac=wire.dst_mac, vni=wire.vni, inner_mac=wire.inner_mac, udp_dport=VXLAN_PORT)
    return packet.encapsulate(inner, params, flow_id)


BUILDERS = [pytest.param(scapy_vxlan, id="scapy"), pytest.param(pylb_vxlan, id="pylb")]


@dataclass(frozen=True)
class Case:
    client: str
    vip: str
    proto: str


CASES = [
    pytest.param(Case(CLIENT4, VIP4, "udp"), id="udp-ipv4-inner"),
    pytest.param(Case(CLIENT6, VIP6, "udp"), id="udp-ipv6-inner"),
    pytest.param(Case(CLIENT4, VIP4, "tcp"), id="tcp-syn-ipv4-inner"),
    pytest.param(Case(CLIENT6, VIP6, "tcp"), id="tcp-syn-ipv6-inner"),
]


@dataclass
class Lab:
    client: Namespace
    client_if: Interface
    lb: Namespace
    lb_if: Interface
    backend: Namespace
    server: Process
    wire: Wire


@pytest.fixture
def lab(topology) -> Lab:
    client, lb, backend = (topology.namespace(n) for n in ("client", "lb", "backend"))
    lb_if, underlay = topology.veth(lb, backend)
    client_if, downlink = topology.veth(client, backend)
    lb_if.add_address(f"{LB_UNDERLAY}/24")
    underlay.add_address(f"{BACKEND_UNDERLAY}/24")
    for cidr in (f"{CLIENT4}/24", f"{CLIENT6}/64"):
        client_if.add_address(cidr)
    for cidr in ("198.51.100.1/24", "2001:db8:7::1/64"):
        downlink.add_address(cidr)
    # The VIP lives on lo, so the backend must not answer ARP for it elsewhere.
    backend.sysctl({"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
    # nolearning: the backend never sends into the tunnel, so it needs no FDB.
    backend.ip("link", "add", "vx0", "address", BACKEND_VXLAN_MAC, "type", "vxlan", "id", str(VNI),
               "dstport", str(VXLAN_PORT), "local", BACKEND_UNDERLAY, "dev", underlay.name,
               "nolearning")
    backend.sysctl({"net.ipv4.conf.vx0.rp_filter": 0})
    backend.interface("vx0").up()
    for vip in (f"{VIP4}/32", f"{VIP6}/128"):
        backend.interface("lo").add_address(vip)
    server = backend.spawn(sys.executable, "-c", BACKEND_SERVER, str(SERVICE_PORT), VIP4, VIP6)
    assert server.readline(START) == "ready"
    wire = Wire(src_mac=lb_if.mac, dst_mac=underlay.mac, src=LB_UNDERLAY, dst=BACKEND_UNDERLAY,
                vni=VNI, inner_mac=BACKEND_VXLAN_MAC)
    return Lab(client, client_if, lb, lb_if, backend, server, wire)


def inner_packet(case: Case, sport: int, payload: bytes) -> bytes:
    ip = IP if ipaddress.ip_address(case.vip).version == 4 else IPv6
    l4 = UDP(sport=sport, dport=SERVICE_PORT) / payload if case.proto == "udp" \
        else TCP(sport=sport, dport=SERVICE_PORT, flags="S", seq=1000)
    return raw(ip(src=case.client, dst=case.vip) / l4)


def inject(lab: Lab, frame: bytes) -> None:
    sock = lab.lb.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((lab.lb_if.name, 0))
    sock.send(frame)


def sniffer(lab: Lab) -> socket.socket:
    sock = lab.client.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((lab.client_if.name, 0))
    return sock


def first_reply(sock: socket.socket, case: Case, sport: int):
    """The first IP packet from the VIP's service port to the client's port."""
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame = Ether(sock.recv(65535))
        except TimeoutError:
            break
        ip = frame.getlayer(IP) or frame.getlayer(IPv6)
        l4 = frame.getlayer(UDP if case.proto == "udp" else TCP)
        if ip and l4 and ip.src == case.vip and ip.dst == case.client \
                and (l4.sport, l4.dport) == (SERVICE_PORT, sport):
            return ip
    pytest.fail(f"no reply from {case.vip}:{SERVICE_PORT} reached the client in {WAIT} s")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("build", BUILDERS)
def test_backend_kernel_decapsulates_and_answers_the_client_directly(
        lab: Lab, build: Callable[[bytes, Wire, int], bytes], case: Case):
    sport, payload = CLIENT_PORT, b"pylb vxlan " + case.proto.encode()
    family = socket.AF_INET if ipaddress.ip_address(case.vip).version == 4 else socket.AF_INET6
    application = lab.client.socket(family, socket.SOCK_DGRAM)
    application.bind((case.client, sport))
    application.settimeout(WAIT)
    wire_tap = sniffer(lab)

    inject(lab, build(inner_packet(case, sport, payload), lab.wire, flow_id=0x5EED_F00D))

    reply = first_reply(wire_tap, case, sport)
    hop_limit = reply.ttl if reply.version == 4 else reply.hlim
    assert hop_limit == DEFAULT_TTL, "the reply crossed a router on its way to the client"
    if case.proto == "udp":
        peer, port, data = json.loads(lab.server.readline(WAIT))
        assert (peer, port, bytes.fromhex(data)) == (case.client, sport, payload)
        data, source = application.recvfrom(65535)
        assert (data, source[:2]) == (payload, (case.vip, SERVICE_PORT))
    else:
        assert reply[TCP].flags == "SA" and reply[TCP].ack == 1001
        half_open = lab.backend.run("ss", "-Htn", "state", "syn-recv").stdout
        peer = f"[{case.client}]" if family == socket.AF_INET6 else case.client
        assert f"{peer}:{sport}" in half_open
