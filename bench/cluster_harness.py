"""Three balancers of pylb.testbed driven for measurement.

After a backend change, so that buckets have moved, the harness sorts flows
by what the fast path will do with them at each balancer, drives batches of
frames through until a condition holds, and times two things: the wall clock
of the whole loop (harness included: frames are parsed and decapsulated in
Python on their way between balancers and to the backends), and the time
spent inside the balancers' own step() (the Python workers' work: polling
the shim, deciding punts, the peer protocol). Rates per Python worker are
taken from the second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from pylb import testbed
from pylb.flow_cache import now_ms
from pylb.flow_id import FlowKey

NAMES = ["lb1", "lb2", "lb3"]
BEFORE = ["b-1", "b-2", "b-3", "b-4"]
AFTER = ["b-2", "b-3", "b-4", "b-5"]
TIMEOUT_S = 30.0


class MeasuredTestbed(testbed.Testbed):
    """The testbed with a state-request timeout far above any batch's time:
    a measured batch is never retried (a retry would be counted as work),
    and the benchmarks check that none was. The owners decide without
    waiting for a push (decision_delay_ms 0): the flows measured have no
    state anywhere, and the wait, a deliberate 20 ms for flows that may have
    just started elsewhere, would be measured instead of the work."""

    def config(self, name, backends=None, members=None):
        cfg = super().config(name, backends, members)
        return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(
            update={"request_timeout_ms": 10_000, "decision_delay_ms": 0})})


@dataclass
class Flow:
    flow: object            # pylb.traffic.Flow
    key: bytes
    flow_id: int


@dataclass
class Timing:
    wall: float = 0.0       # the whole loop
    workers: float = 0.0    # inside the balancers' step()
    count: int = 0          # misses, packets or flows the loop served

    def add(self, other: "Timing") -> None:
        self.wall += other.wall
        self.workers += other.workers
        self.count += other.count

    def per_worker_second(self) -> float:
        return self.count / self.workers if self.workers else 0.0


class Harness:
    def __init__(self, n_flows: int = 40_000, seed: int = 11):
        self.tb = MeasuredTestbed(NAMES, BEFORE)
        try:
            self.tb.set_backends(AFTER)
            self._step_time = 0.0
            for lb in self.tb.lbs.values():
                lb.step = self._timed(lb.step)
            self._sort(testbed.flows(n_flows, seed))
        except BaseException:
            self.tb.close()
            raise

    def close(self) -> None:
        self.tb.close()

    def _timed(self, step):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return step(*args, **kw)
            finally:
                self._step_time += time.perf_counter() - t0
        return timed

    def _sort(self, flows) -> None:
        """remote: moved bucket, owner not the asking balancer (lb2): a miss
        there goes to the owner. moved / stable: by the bucket alone (SYNs
        at lb1, pushes or not)."""
        lb = self.tb.lbs["lb2"]
        size = self.tb.table_size
        self.remote, self.moved, self.stable = [], [], []
        for f in flows:
            key = FlowKey(f.src, f.dst, f.sport, f.dport, f.proto)
            c = lb.dataplane.classify(key)
            entry = Flow(f, key.to_bytes(), c.flow_id)
            if not c.moved:
                self.stable.append(entry)
            elif lb.cluster.holders(size, c.bucket)[0] != "lb2":
                self.remote.append(entry)
            else:
                self.moved.append(entry)

    def take(self, pool: list[Flow], n: int) -> list[Flow]:
        if len(pool) < n:
            raise RuntimeError(f"the harness ran out of flows ({len(pool)} left, {n} asked)")
        batch = pool[:n]
        del pool[:n]
        return batch

    # ------------------------------------------------------------ driving

    def frames(self, flows: list[Flow], lb: str, kind: str) -> list[bytes]:
        mac = self.tb.lbs[lb].port.mac
        return [fr for f in flows for fr in f.flow.frames(mac, testbed.CLIENT_MAC, [kind])]

    def inject(self, lb: str, frames: list[bytes]) -> None:
        port = self.tb.lbs[lb].port
        done = 0
        while done < len(frames):
            n = port.inject(frames[done:])
            if n == 0:
                raise RuntimeError(f"{lb}'s RX ring is full")
            done += n

    def run_until(self, done, count: int) -> Timing:
        """Steps every balancer (delivering what they send) until done()."""
        self._step_time = 0.0
        t0 = time.perf_counter()
        deadline = time.monotonic() + TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError("the harness timed out: a packet or an answer was lost")
            self.tb.step()
        return Timing(time.perf_counter() - t0, self._step_time, count)

    def cached_at(self, lb: str, flows: list[Flow]) -> bool:
        cache, now = self.tb.lbs[lb].cache, now_ms()
        return all(cache.peek(f.key, f.flow_id, now) is not None for f in flows)

    def pending(self) -> bool:
        return any(lb.cluster.pending for lb in self.tb.lbs.values())

    def delivered(self) -> int:
        return self.tb.received.frames

    def counters(self) -> dict:
        return self.tb.counters()
