"""The worker's steering of health checks `via: vip` (native/worker.c), on
ring ports: a ring stands in for the exception TAP, so the test drives the
exact code the balancer runs. From the kernel's side, frames of a steered
local port to a VIP leave encapsulated to the steered backend and everything
else leaves unchanged; from the wire, only TCP answers to a steered port
reach the kernel, nothing else sent to the balancer's address does."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from pipeline_support import (C4, GATEWAY_MAC, GW4, LB4, LB6, WEB4, WEB6, delta, make_config,
                              ring_device)
from scapy.all import ARP, IP, TCP, UDP, Ether, IPv6

from pylb import packet
from pylb.dataplane import Dataplane
from pylb.flow_cache import FlowCache
from pylb.neigh import NeighborTable
from pylb.port import Port
from pylb.worker import Worker

pytestmark = pytest.mark.dpdk

KERNEL_MAC = "02:00:00:00:00:0b"     # what the kernel's frames say (the TAP's MAC)
CHECK_PORT = 40123


@pytest.fixture
def rig(eal):
    """A worker whose exception port is a ring, with the pipeline VIPs."""
    cfg = make_config(ring_device())
    made = []
    try:
        port = Port(cfg.balancer.data.device, mbufs=8191)
        made.append(port)
        tap = Port(ring_device(), mbufs=2047)
        made.append(tap)
        cache = FlowCache(4096)
        made.append(cache)
        neigh = NeighborTable()
        made.append(neigh)
        for n in cfg.balancer.data.neighbors:
            neigh.set_static(n.address, n.mac)
        worker = Worker(port, cache, neigh, exception_port=tap)
        made.append(worker)
        dp = Dataplane(cfg, 1)
        worker.set_dataplane(dp)
        yield Rig(worker, port, tap, dp)
    finally:
        for thing in reversed(made):
            thing.close()


@dataclass
class Rig:
    worker: Worker
    port: Port
    tap: Port
    dp: Dataplane

    def from_kernel(self, pkt) -> tuple[list[bytes], dict]:
        return self._run(self.tap, bytes(Ether(src=KERNEL_MAC, dst=self.port.mac) / pkt))

    def from_wire(self, pkt) -> tuple[list[bytes], dict]:
        return self._run(self.port, bytes(Ether(src=GATEWAY_MAC, dst=self.port.mac) / pkt))

    def _run(self, into: Port, frame: bytes):
        before = self.worker.stats()
        assert into.inject([frame]) == 1
        for _ in range(50):
            self.worker.poll(max_bursts=4, max_idle_us=200)
            self.worker.flush()
            now = self.worker.stats()
            if now.tap_rx + now.rx > before.tap_rx + before.rx:
                break
        assert now.broken_equations() == []
        moved = {k: v for k, v in vars(delta(now, before)).items()
                 if v and k not in ("polls", "idle_sleeps", "rx_bytes", "tx_ok")}
        return self.port.drain(), moved, self.tap.drain()


def syn(src=LB4, dst=WEB4, sport=CHECK_PORT, dport=80):
    ip = IP if ":" not in dst else IPv6
    return ip(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S")


def test_a_steered_check_goes_encapsulated_to_its_backend_and_the_rest_unchanged(rig):
    ids = sorted(set(rig.dp.ids["web4"]))
    target = ids[1]
    target_address = str(rig.dp.registry.entries[target][2])
    rig.worker.steer_health(4, CHECK_PORT, target)

    out, moved, _ = rig.from_kernel(syn())
    assert moved == {"tap_rx": 1, "health_steered": 1}, moved
    assert len(out) == 1
    outer = packet.parse(out[0])
    assert str(outer.dst) == target_address and str(outer.src) == LB4
    assert out[0].endswith(bytes(syn()))     # IPIP: the kernel's packet, whole, inside

    unchanged = [
        ("another local port", syn(sport=CHECK_PORT + 1)),
        ("not a VIP", syn(dst="192.0.2.99")),
        ("a VIP's address, another port", syn(dport=81)),
        ("UDP from the steered port", IP(src=LB4, dst=WEB4) / UDP(sport=CHECK_PORT, dport=80)),
        ("IPv6 from the same port number (slots per family)", syn(src=LB6, dst=WEB6, dport=443)),
        ("ARP", ARP(op=1, psrc=LB4, pdst=GW4)),
    ]
    for what, pkt in unchanged:
        out, moved, _ = rig.from_kernel(pkt)
        assert moved == {"tap_rx": 1, "tap_to_wire": 1}, (what, moved)
        assert out == [bytes(Ether(src=KERNEL_MAC, dst=rig.port.mac) / pkt)], what

    rig.worker.steer_health(4, CHECK_PORT, None)
    _, moved, _ = rig.from_kernel(syn())
    assert moved == {"tap_rx": 1, "tap_to_wire": 1}, "steering did not end"


def test_a_check_that_cannot_be_sent_is_counted_and_its_mbuf_freed(rig):
    rig.worker.steer_health(6, CHECK_PORT, 10_000)      # no such backend id
    for _ in range(3000):                              # more than the TAP pool's 2047 mbufs
        out, moved, _ = rig.from_kernel(syn(src=LB6, dst=WEB6, dport=443))
        assert moved == {"tap_rx": 1, "health_steer_failed": 1} and out == [], moved


def test_only_answers_to_a_steered_port_reach_the_kernel(rig):
    answer = IP(src=WEB4, dst=LB4) / TCP(sport=80, dport=CHECK_PORT, flags="SA")
    _, moved, to_kernel = rig.from_wire(answer)
    assert moved == {"rx": 1, "drop_local": 1, "drop_total": 1}, "not steered yet: dropped"
    rig.worker.steer_health(4, CHECK_PORT, sorted(set(rig.dp.ids["web4"]))[0])
    _, moved, to_kernel = rig.from_wire(answer)
    assert moved == {"rx": 1, "exception_tap": 1}, moved
    assert to_kernel == [bytes(Ether(src=GATEWAY_MAC, dst=rig.port.mac) / answer)]
    for what, pkt in [("sshd", IP(src=C4, dst=LB4) / TCP(sport=5555, dport=22, flags="S")),
                      ("UDP to the steered port", IP(src=C4, dst=LB4) / UDP(dport=CHECK_PORT)),
                      ("IPv6 to the port steered for IPv4",
                       IPv6(src=WEB6, dst=LB6) / TCP(sport=443, dport=CHECK_PORT))]:
        _, moved, to_kernel = rig.from_wire(pkt)
        assert moved == {"rx": 1, "drop_local": 1, "drop_total": 1}, (what, moved)
        assert to_kernel == [], what
