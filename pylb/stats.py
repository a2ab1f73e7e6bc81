"""Worker counters (struct pylb_stats) and the equations they obey."""
from __future__ import annotations

from dataclasses import dataclass, fields

from pylb._ffi import ffi

DROP_REASONS = ("drop_parse_truncated", "drop_parse_bad", "drop_not_ip", "drop_no_vip",
                "drop_no_backend", "drop_no_neighbor", "drop_too_big", "drop_encap",
                "drop_icmp", "drop_arp_other", "drop_exception", "drop_verdict",
                "drop_peer_ring_full", "drop_local", "drop_lane_full")
FORWARDED = ("fwd_cache_hit", "fwd_new", "fwd_table", "fwd_fragment", "fwd_verdict")


@dataclass(frozen=True)
class Stats:
    rx: int = 0
    rx_bytes: int = 0
    fwd_cache_hit: int = 0
    fwd_new: int = 0
    fwd_table: int = 0
    fwd_fragment: int = 0
    fwd_verdict: int = 0
    fwd_for_peer: int = 0
    fwd_for_peer_failed: int = 0
    peer_sent: int = 0
    peer_rx: int = 0
    held: int = 0
    held_now: int = 0
    verdict_forward: int = 0
    verdict_drop: int = 0
    verdict_peer: int = 0
    notices: int = 0
    notices_lost: int = 0
    arp_replied: int = 0
    nd_replied: int = 0
    neigh_learned: int = 0
    neigh_requests: int = 0
    icmp_too_big_sent: int = 0
    exception_tap: int = 0
    tap_rx: int = 0
    tap_to_wire: int = 0
    health_steered: int = 0
    health_steer_failed: int = 0
    drop_total: int = 0
    drop_parse_truncated: int = 0
    drop_parse_bad: int = 0
    drop_not_ip: int = 0
    drop_no_vip: int = 0
    drop_no_backend: int = 0
    drop_no_neighbor: int = 0
    drop_too_big: int = 0
    drop_encap: int = 0
    drop_icmp: int = 0
    drop_arp_other: int = 0
    drop_exception: int = 0
    drop_verdict: int = 0
    drop_peer_ring_full: int = 0
    drop_local: int = 0
    cache_insert: int = 0
    cache_full: int = 0
    tx_ok: int = 0
    tx_dropped: int = 0
    polls: int = 0
    idle_sleeps: int = 0
    lane_in: int = 0
    lane_out: int = 0
    notices_lane_in: int = 0
    notices_lane_out: int = 0
    drop_lane_full: int = 0
    lane_order_kept: int = 0
    lane_sticky_evicted: int = 0

    @classmethod
    def from_c(cls, s) -> "Stats":
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)})

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def forwarded(self) -> int:
        return sum(getattr(self, f) for f in FORWARDED)

    def drops(self) -> dict[str, int]:
        """Drops by reason, the non-zero ones."""
        return {r.removeprefix("drop_"): getattr(self, r) for r in DROP_REASONS if getattr(self, r)}

    def broken_equations(self) -> list[str]:
        """The documented equations of native/pylb.h that do not hold (empty = all hold)."""
        s = self
        checks = {
            "rx == outcomes": s.rx + s.lane_in == (
                s.forwarded + s.verdict_peer + s.peer_rx + s.arp_replied + s.nd_replied
                + s.neigh_learned + s.exception_tap + s.lane_out + s.drop_total + s.held_now),
            "held == verdicts + held_now": s.held == (s.verdict_forward + s.verdict_drop
                                                     + s.verdict_peer + s.held_now),
            "drop_total == sum of reasons": s.drop_total == sum(getattr(s, r) for r in DROP_REASONS),
            "drop_verdict == verdict_drop": s.drop_verdict == s.verdict_drop,
            "tx == forwarded + replies": s.tx_ok + s.tx_dropped == (
                s.forwarded + s.fwd_for_peer + s.peer_sent + s.arp_replied + s.nd_replied
                + s.neigh_requests + s.tap_to_wire + s.health_steered + s.icmp_too_big_sent),
            "tap_rx == tap outcomes": s.tap_rx == (s.tap_to_wire + s.health_steered
                                                   + s.health_steer_failed),
        }
        return [name for name, ok in checks.items() if not ok]


def new_c_stats():
    return ffi.new("struct pylb_stats *")
