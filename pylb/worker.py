"""A worker: drives one RX/TX queue pair of a port through the shim's burst
loop and receives the packets that need a decision (punts) in batches."""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from functools import cached_property

from pylb._ffi import check, ffi, ip_to_c, key_bytes, lib
from pylb.dataplane import NO_BACKEND, Dataplane
from pylb.flow_id import address16
from pylb.stats import Stats

NO_SLOT = 0xFFFFFFFF
PEER_STRIDE = 9216 + 64   # a jumbo frame: peer datagrams are sized to the data MTU


class PuntReason(enum.IntEnum):
    MOVED = 1        # held: existing TCP flow, no state, moved bucket
    NEW_STATE = 2    # notice: new flow in a moved bucket was cached
    UDP_MOVED = 4    # held: UDP flow with no state in a moved bucket


_REASONS = {int(r): r for r in PuntReason}    # an enum call costs a microsecond


class Action(enum.IntEnum):
    FORWARD = 1
    DROP = 2
    PEER = 3         # sent to the flow's owner by the peer protocol


@dataclass(frozen=True)
class Punt:
    slot: int | None
    reason: PuntReason
    vip: int
    flow_id: int
    bucket: int
    current: int
    previous: int
    backend: int
    tcp_flags: int
    key: bytes          # the flow key, 40 bytes (FlowKey.to_bytes())
    sport: int
    dport: int
    proto: int

    @cached_property
    def src(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return address16(self.key[:16])

    @cached_property
    def dst(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return address16(self.key[16:32])


@dataclass(frozen=True)
class Verdict:
    slot: int
    action: Action
    backend: int = 0
    cache: bool = False


class Worker:
    """Owns the dataplane it was given; close() drops held packets, flushes TX
    and frees everything of its own (not the port, cache or neighbour table)."""

    def __init__(self, port, cache, neigh, *, rx_queue: int = 0, tx_queue: int = 0,
                 exception_port=None, max_held: int = 4096, idle_sleep_max_us: int = 1000,
                 tx_drain_us: int = 100, max_punts: int = 1024, lane: int = 0, lanes: int = 1,
                 lanes_name: str | None = None):
        """lane, lanes, lanes_name: this worker's place among its balancer's
        worker processes (pylb/lanes.py); the default is a worker alone."""
        conf = ffi.new("struct pylb_worker_conf *")
        lanes_c = ffi.new("char[]", lanes_name.encode()) if lanes_name else ffi.NULL
        conf.lane, conf.lanes, conf.lanes_name = lane, lanes, lanes_c
        conf.port = port.handle
        conf.rx_queue, conf.tx_queue = rx_queue, tx_queue
        conf.cache = cache.handle
        conf.neigh = neigh.handle
        conf.exception_port = exception_port.handle if exception_port else ffi.NULL
        conf.tx_drain_us = tx_drain_us
        conf.idle_sleep_max_us = idle_sleep_max_us
        conf.max_held = max_held
        out = ffi.new("struct pylb_worker **")
        check(lib.pylb_worker_create(conf, out), "creating worker")
        self._w = out[0]
        self._dp: Dataplane | None = None
        self._max_punts = max(max_punts, 128)
        self._punts = ffi.new("struct pylb_punt[]", self._max_punts)
        self._n = ffi.new("uint32_t *")
        self._frame_buf = ffi.new("uint8_t[]", 16384)
        self._peer_max = 256
        self._peer_buf = ffi.new("uint8_t[]", self._peer_max * PEER_STRIDE)
        self._peer_lens = ffi.new("uint32_t[]", self._peer_max)

    @property
    def handle(self):
        if self._w is None:
            raise ValueError("worker is closed")
        return self._w

    @property
    def dataplane(self) -> Dataplane | None:
        return self._dp

    def set_dataplane(self, dp: Dataplane) -> None:
        """Swaps in a compiled configuration whole; the previous one is freed."""
        old = ffi.new("struct pylb_dataplane **")
        check(lib.pylb_worker_set_dataplane(self.handle, dp.handle, old), "swapping dataplane")
        dp.give_away()
        if old[0] != ffi.NULL:
            lib.pylb_dataplane_free(old[0])
        if self._dp is not None:
            self._dp._dp = None
        self._dp = dp

    def poll(self, max_bursts: int = 256, max_idle_us: int = 0) -> list[Punt]:
        check(lib.pylb_worker_poll(self.handle, max_bursts, max_idle_us, self._punts,
                                   self._max_punts, self._n), "poll")
        return [self._punt(self._punts[i]) for i in range(self._n[0])]

    @staticmethod
    def _punt(p) -> Punt:
        return Punt(None if p.slot == NO_SLOT else p.slot, _REASONS[p.reason], p.vip, p.flow_id,
                    p.bucket, p.current, p.previous, p.backend, p.tcp_flags,
                    key_bytes(p),
                    p.key.sport, p.key.dport, p.key.proto)

    def apply(self, verdicts: list[Verdict]) -> None:
        if not verdicts:
            return
        v = ffi.new("struct pylb_verdict[]", len(verdicts))
        for i, d in enumerate(verdicts):
            v[i].slot, v[i].action, v[i].backend, v[i].cache = d.slot, d.action, d.backend, d.cache
        check(lib.pylb_worker_apply(self.handle, v, len(verdicts)), "applying verdicts")

    def peer_recv(self, max_frames: int = 256) -> list[bytes]:
        """Peer-protocol frames from the worker's peer ring."""
        n = min(max_frames, self._peer_max)
        check(lib.pylb_worker_peer_recv(self.handle, self._peer_buf, PEER_STRIDE, self._peer_lens,
                                        n, self._n, ffi.NULL), "reading the peer ring")
        raw = ffi.buffer(self._peer_buf)
        return [bytes(raw[i * PEER_STRIDE:i * PEER_STRIDE + self._peer_lens[i]])
                for i in range(self._n[0])]

    def held_ip(self, slot: int) -> bytes:
        """The IP packet of a held packet (what a state request carries)."""
        check(lib.pylb_worker_held_ip(self.handle, slot, self._frame_buf, len(self._frame_buf),
                                      self._n), "reading a held packet")
        return bytes(ffi.buffer(self._frame_buf, self._n[0]))

    def send_peer(self, address, payload: bytes) -> None:
        """A peer-protocol datagram to a balancer's data address."""
        ip = ffi.new("struct pylb_ip *")
        ip_to_c(address, ip)
        check(lib.pylb_worker_send_peer(self.handle, ip, payload, len(payload)),
              f"sending to peer {address}")

    def forward_ip(self, ip_packet: bytes, backend: int, flow_id: int) -> None:
        """Forwards an IP packet a peer sent us to a backend, encapsulated."""
        check(lib.pylb_worker_forward_ip(self.handle, ip_packet, len(ip_packet), backend, flow_id),
              "forwarding for a peer")

    def stats(self) -> Stats:
        s = ffi.new("struct pylb_stats *")
        check(lib.pylb_worker_stats(self.handle, s), "worker stats")
        return Stats.from_c(s)

    def backend_counts(self) -> list[tuple[int, int, int]]:
        """(packets, bytes, new flows) per backend id of the current dataplane."""
        n = len(self._dp.backends) if self._dp else 0
        pk, by, nf = (ffi.new("uint64_t[]", max(n, 1)) for _ in range(3))
        check(lib.pylb_worker_backend_counts(self.handle, pk, by, nf, n), "backend counts")
        return [(pk[i], by[i], nf[i]) for i in range(n)]

    def solicit(self, address) -> None:
        ip = ffi.new("struct pylb_ip *")
        ip_to_c(address, ip)
        check(lib.pylb_worker_solicit(self.handle, ip), f"soliciting {address}")

    def steer_health(self, family: int, port: int, backend: int | None) -> None:
        """While steered, the kernel's TCP from local `port` (family 4 or 6) to
        a VIP through the exception TAP goes to `backend` (an id),
        encapsulated: a health check that takes the traffic's path. None
        ends it. Callable from any thread of this process."""
        check(lib.pylb_worker_steer_health(self.handle, family, port,
                                           NO_BACKEND if backend is None else backend),
              "steering a health check")

    def backlog(self) -> int:
        """Frames waiting for this worker (pylb_worker_backlog)."""
        return lib.pylb_worker_backlog(self.handle)

    def age_cache(self, max_sets: int = 4096) -> int:
        freed = ffi.new("uint64_t *")
        check(lib.pylb_worker_age_cache(self.handle, max_sets, freed), "ageing the flow cache")
        return freed[0]

    def flush(self) -> None:
        check(lib.pylb_worker_flush(self.handle), "flush")

    def close(self) -> None:
        if self._w is not None:
            lib.pylb_worker_destroy(self._w)
            self._w = None
        if self._dp is not None:
            lib.pylb_dataplane_free(self._dp._dp)
            self._dp._dp = None
            self._dp = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
