"""The main job until the lab exists: one balancer on a DPDK ring port forwards
a generated sample (three VIPs, thousands of flows, IPv4 and IPv6, TCP and UDP,
IPIP / GUE / VXLAN), with a backend change half-way, and every packet that
comes out is decapsulated and checked."""
from __future__ import annotations

import random
import struct
import time
from collections import Counter, defaultdict

from pylb import config as config_mod
from pylb import traffic
from pylb.balancer import Balancer
from pylb.report import summary, table

CLIENT_MAC = "02:00:00:00:00:c1"
GATEWAY_MAC = "02:00:00:00:00:fe"
PORT = "ring:pylb_demo"


def demo_config(extra_backend: bool = False) -> config_mod.Config:
    web = [{"name": f"web-{i}", "address": f"203.0.113.{10 + i}", "weight": 2 if i == 4 else 1}
           for i in range(1, 5)]
    if extra_backend:
        web.append({"name": "web-5", "address": "203.0.113.15"})
        web[1]["weight"] = 0          # web-2 drained: established flows only
    return config_mod.parse({
        "balancer": {
            "name": "demo", "flow_seed": 42,
            "data": {"device": PORT, "address_v4": "203.0.113.1", "address_v6": "2001:db8:1::1",
                     "gateway_v4": "203.0.113.254", "gateway_v6": "2001:db8:1::fe",
                     "neighbors": [{"address": "2001:db8:1::fe", "mac": GATEWAY_MAC}]},
            "flow_cache": {"capacity": 65536},
        },
        "vips": [
            {"name": "web", "address": "192.0.2.10", "protocol": "tcp", "port": 80,
             "encap": {"type": "ipip"}, "backends": web},
            {"name": "dns", "address": "192.0.2.53", "protocol": "udp", "port": 53,
             "encap": {"type": "gue"},
             "backends": [{"name": f"dns-{i}", "address": f"203.0.113.{20 + i}"}
                          for i in range(1, 4)]},
            {"name": "web6", "address": "2001:db8:10::10", "protocol": "tcp", "port": 443,
             "encap": {"type": "vxlan", "vni": 100},
             "backends": [{"name": f"web6-{i}", "address": f"2001:db8:2::{i}"}
                          for i in range(1, 4)]},
        ],
    }, "demo configuration")


def _arp_reply(lb_mac: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, traffic.mac_bytes(GATEWAY_MAC),
                       bytes([203, 0, 113, 254]), traffic.mac_bytes(lb_mac), bytes([203, 0, 113, 1]))
    return traffic.mac_bytes(lb_mac) + traffic.mac_bytes(GATEWAY_MAC) + b"\x08\x06" + body


def _junk(rng: random.Random, lb_mac: str) -> list[bytes]:
    """Traffic that must be dropped and counted: not for a VIP, malformed."""
    out = []
    for i in range(50):
        ip = traffic.ip_packet("198.51.100.9", "192.0.2.99", 6, traffic.tcp(1000 + i, 80, "S"))
        out.append(traffic.ether(lb_mac, CLIENT_MAC, ip))
    good = traffic.ether(lb_mac, CLIENT_MAC, traffic.ip_packet(
        "198.51.100.9", "192.0.2.10", 6, traffic.tcp(999, 80, "PA", payload=b"x" * 20)))
    for _ in range(25):
        out.append(good[:rng.randrange(15, 50)])                    # truncated headers
        bad = bytearray(good)
        bad[14] = 0x43                                             # IHL 3
        out.append(bytes(bad))
    return out


class _Run:
    """Injects frames, runs the balancer, and collects what it sent."""

    def __init__(self, lb: Balancer):
        self.lb = lb
        self.deliveries: list[traffic.Delivery] = []
        self.other_frames = 0

    def push(self, frames: list[bytes]) -> None:
        for i in range(0, len(frames), 512):
            chunk = frames[i:i + 512]
            sent = 0
            while sent < len(chunk):
                sent += self.lb.port.inject(chunk[sent:])
                self.lb.step(max_bursts=64, max_idle_us=200)
                self.collect()
        self.settle()

    def settle(self) -> None:
        for _ in range(3):
            self.lb.step(max_bursts=64, max_idle_us=1000)
            self.collect()

    def collect(self) -> None:
        while True:
            frames = self.lb.port.drain()
            if not frames:
                return
            for f in frames:
                d = traffic.decapsulate(f)
                if d is None:
                    self.other_frames += 1
                else:
                    self.deliveries.append(d)


def run_demo(flows: int = 5000, seed: int = 1, echo=print) -> bool:
    rng = random.Random(seed)
    cfg = demo_config()
    started = time.monotonic()
    with Balancer(cfg) as lb:
        lb_mac = lb.port.mac
        run = _Run(lb)
        run.collect()                         # the ARP request for the gateway
        run.push([_arp_reply(lb_mac)])
        vips = [(v.name, str(v.address), v.protocol_number, v.port) for v in cfg.vips]
        sample = traffic.make_flows(vips, flows, rng)
        kinds = {6: (["S"], ["PA"], ["PA", "FA"]), 17: (["U"], ["U"], ["U"])}
        phases = [[], [], []]
        for f in sample:
            for p, k in enumerate(kinds[f.proto]):
                phases[p] += f.frames(lb_mac, CLIENT_MAC, k)
        expected_frames = sum(len(p) for p in phases)
        junk = _junk(rng, lb_mac)
        run.push(phases[0] + junk[:50])
        run.push(phases[1] + junk[50:])
        # A backend joins web and another is drained while every flow is open.
        lb.reconfigure(demo_config(extra_backend=True))
        run.push(phases[2])
        new_flows = traffic.make_flows(vips, flows // 10, random.Random(seed + 1))
        run.push([fr for f in new_flows for fr in f.frames(lb_mac, CLIENT_MAC,
                                                           ["S"] if f.proto == 6 else ["U"])])
        elapsed = time.monotonic() - started
        stats = lb.stats()
        echo(summary(stats, lb.backend_counts(), lb.verdicts_by_reason))
        return _verify(echo, sample, new_flows, run, expected_frames, stats, elapsed)


def _verify(echo, sample, new_flows, run, expected_frames, stats, elapsed) -> bool:
    by_flow: dict[tuple, Counter] = defaultdict(Counter)
    bad_payload = sum(not d.payload_ok for d in run.deliveries)
    for d in run.deliveries:
        by_flow[d.flow][d.backend] += 1
    old_keys = {(f.proto, f.src, f.sport, f.dst, f.dport) for f in sample}
    broken = [k for k in old_keys if len(by_flow.get(k, ())) > 1]
    missing = [k for k in old_keys if k not in by_flow]
    delivered_old = sum(sum(by_flow[k].values()) for k in old_keys if k in by_flow)
    new_ok = sum(1 for f in new_flows if (f.proto, f.src, f.sport, f.dst, f.dport) in by_flow)
    rows = [["flows (3 VIPs)", len(sample)], ["frames of those flows", expected_frames],
            ["frames delivered to backends", delivered_old],
            ["flows that changed backend across the change", len(broken)],
            ["flows never delivered", len(missing)],
            ["frames with a damaged inner packet", bad_payload],
            ["new flows after the change, delivered", f"{new_ok}/{len(new_flows)}"],
            ["seconds", round(elapsed, 2)]]
    echo("")
    echo("Check of every frame the balancer sent")
    echo(table(["what", "value"], rows))
    ok = (not broken and not missing and not bad_payload and delivered_old == expected_frames
          and new_ok == len(new_flows) and not stats.broken_equations())
    echo("")
    echo("RESULT: " + ("ok: every packet of every flow reached one backend, none lost"
                       if ok else "FAILED"))
    return ok
