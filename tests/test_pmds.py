"""The pipeline on DPDK's other test PMDs: net_pcap (a capture in, a capture
out, every output packet compared field by field with the one expected) and
net_null (endless frames nobody wrote: each one is still accounted for)."""
from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest
from structlog.testing import capture_logs
from scapy.all import DLT_EN10MB, rdpcap, wrpcap

from pipeline_support import (LB4, LB6, arp_reply, arp_who_has, assert_frame, check_encap,
                              client_frame, make_config, neighbor_advertisement, outcomes, route,
                              solicit, tcp4, tcp6, udp4, udp6)
from pylb.balancer import Balancer

_ids = itertools.count()


def _vdev(driver: str) -> str:
    """A vdev name unique in the process: DPDK refuses a second device of one name."""
    return f"{driver}_pipe{next(_ids)}"


def _close_cleanly(lb: Balancer) -> None:
    """Balancer.close logs what fails and goes on; here nothing may fail."""
    with capture_logs() as logs:
        lb.close()
    assert [e for e in logs if e["log_level"] == "error"] == []


def _step_until(lb: Balancer, rx: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while (s := lb.stats()).rx < rx:
        assert time.monotonic() < deadline, f"only {s.rx} of {rx} frames received"
        lb.step(max_bursts=16)
    return s


def _expect(kind: str, lb: Balancer, frame: bytes):
    """The check of the frame sent for `frame`: made while the balancer runs
    (routes come from its dataplane), run once it is closed (the capture is
    complete then)."""
    if kind == "encap":
        r = route(lb, frame)
        return lambda sent, mac: check_encap(sent, frame, r, mac)
    build = {"arp reply": arp_reply, "na": neighbor_advertisement}[kind]
    return lambda sent, mac: assert_frame(sent, build(frame, mac))


# description, input (Ether-less: the client's Ethernet header is added), the
# outcome counter it moves, and what it makes the balancer send (None: nothing).
CAPTURE = [
    ("IPv4 TCP SYN to web4 (IPIP)", tcp4(sport=41001), "fwd_new", "encap"),
    ("IPv4 UDP to dns4 (GUE)", udp4(sport=41002), "fwd_new", "encap"),
    ("IPv6 TCP SYN to web6 (VXLAN)", tcp6(sport=41003), "fwd_new", "encap"),
    ("IPv6 UDP to dns6 (6in6)", udp6(sport=41004), "fwd_new", "encap"),
    ("a second packet of the first flow", tcp4(sport=41001, flags="PA", payload=b"GET /"),
     "fwd_cache_hit", "encap"),
    ("ARP request for the data address", arp_who_has(LB4), "arp_replied", "arp reply"),
    ("NS for the IPv6 data address", solicit(LB6), "nd_replied", "na"),
    ("TCP to no VIP", tcp4(dst="192.0.2.99"), "drop_no_vip", None),
    ("truncated IPv4", client_frame(tcp4())[:30], "drop_parse_truncated", None),
]


def test_pcap_pmd_runs_the_pipeline(eal, tmp_path):
    """The pcap PMD reads rx_pcap once and writes what the port sends to
    tx_pcap, which is complete once the port is closed."""
    frames = [client_frame(p) for _, p, _, _ in CAPTURE]
    wrpcap(str(tmp_path / "in.pcap"), frames, linktype=DLT_EN10MB)
    device = f"{_vdev('net_pcap')},rx_pcap={tmp_path / 'in.pcap'},tx_pcap={tmp_path / 'out.pcap'}"
    with Balancer(make_config(device)) as lb:
        mac = lb.port.mac
        # Unlike a ring port's (all zero), this MAC shows whether replies and
        # outer headers really carry the port's address.
        assert mac != "00:00:00:00:00:00"
        checks = [(d, _expect(kind, lb, f)) for (d, _, _, kind), f in zip(CAPTURE, frames) if kind]
        stats = _step_until(lb, len(frames))
        assert stats.broken_equations() == []
        assert outcomes(stats) == Counter(counter for _, _, counter, _ in CAPTURE)
        for _ in range(3):
            lb.step(max_bursts=4)
        assert lb.stats().rx == lb.port.stats().ipackets == len(frames), "read once"
        assert lb.port.stats().opackets == len(checks)
        _close_cleanly(lb)
    sent = [bytes(p) for p in rdpcap(str(tmp_path / "out.pcap"))]
    assert len(sent) == len(checks)
    for frame, (description, check) in zip(sent, checks):
        try:
            check(frame, mac)
        except AssertionError as err:
            raise AssertionError(f"{description}: {err}") from None


@pytest.mark.parametrize("devargs,unwritten", [("size=64,copy=1", False), ("size=64", True)],
                         ids=["copy", "no copy"])
def test_null_pmd_frames_are_all_accounted_for(eal, devargs, unwritten):
    """The null PMD's RX returns size-byte frames without end. With copy=1 it
    copies a zeroed template into each: all drop_not_ip. Without copy it only
    sets the length of mbufs fresh from the pool, so a frame holds whatever its
    mbuf last carried: here the ARP request the balancer sent for its
    unresolved gateway at start (the null TX frees it back to the pool, whose
    per-core cache hands it out again) comes back in every burst."""
    with Balancer(make_config(f"{_vdev('net_null')},{devargs}", static_gateway_v4=False)) as lb:
        for _ in range(5):
            lb.step(max_bursts=8)
        stats = lb.stats()
        assert stats.rx >= 5 * 8 * 32 and stats.broken_equations() == []
        assert stats.neigh_requests == 1 and stats.tx_ok == 1
        assert lb.port.stats().ipackets == stats.rx
        drops = outcomes(stats)
        if unwritten:
            assert set(drops) == {"drop_not_ip", "drop_arp_other"} and drops["drop_arp_other"] >= 5
        else:
            assert drops == {"drop_not_ip": stats.rx}
        _close_cleanly(lb)
