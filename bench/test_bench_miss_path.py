"""The miss path per Python worker, in the multi-balancer harness
(bench/cluster_harness.py, over pylb.testbed): owner-resolved misses per
second, the owner round trip, and state pushes per second.

Each benchmark interleaves its baseline with its rounds, in the same harness
and on flows of the same batches: cache hits for the misses (the same flows
once resolved), a one-way trip of a cached flow for the round trip, SYNs of
stable buckets (no state to push) for the pushes. bench/README.md says why
these baselines.
"""
from __future__ import annotations

import os
import statistics

import pytest

from cluster_harness import Harness, Timing

QUICK = bool(os.environ.get("PYLB_BENCH_QUICK"))
BATCH = 200
ROUNDS = 3 if QUICK else 8
RTT_ROUNDS = 30 if QUICK else 150


@pytest.fixture(scope="module")
def harness(eal):
    h = Harness()
    yield h
    h.close()


def _deliver(h: Harness, lb: str, flows, kind: str) -> Timing:
    """Frames of flows the balancer forwards by itself: until all reached a backend."""
    frames = h.frames(flows, lb, kind)
    target = h.delivered() + len(frames)
    h.inject(lb, frames)
    return h.run_until(lambda: h.delivered() >= target, len(frames))


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_owner_resolved_misses(benchmark, harness):
    """Existing flows with no state at lb2, in moved buckets another balancer
    owns: each first packet goes to the owner, which forwards it and answers;
    lb2 caches the answer."""
    h, asker = harness, harness.tb.lbs["lb2"]
    misses, hits = Timing(), Timing()
    state = {"last": None}
    before = h.counters()

    def setup():
        if state["last"]:
            hits.add(_deliver(h, "lb2", state["last"], "PA"))
        batch = h.take(h.remote, BATCH)
        state["batch"] = batch
        state["target"] = asker.cluster.counters["answers_cached"] + len(batch)
        h.inject("lb2", h.frames(batch, "lb2", "PA"))

    def resolve():
        misses.add(h.run_until(lambda: asker.cluster.counters["answers_cached"] >= state["target"]
                               and not h.pending(), BATCH))
        state["last"] = state["batch"]

    benchmark.pedantic(resolve, setup=setup, rounds=ROUNDS, iterations=1)
    hits.add(_deliver(h, "lb2", state["last"], "PA"))
    counters = _delta(h.counters(), before)
    assert h.cached_at("lb2", state["last"])
    assert counters.get("answers_cached") == ROUNDS * BATCH
    assert not counters.get("retries") and not counters.get("fallback"), counters
    benchmark.extra_info.update({
        "misses": misses.count,
        "misses_per_worker_s": misses.per_worker_second(),
        "misses_per_wall_s": misses.count / misses.wall,
        "hits_per_worker_s": hits.per_worker_second(),
        "hits_per_wall_s": hits.count / hits.wall,
        "counters": counters,
    })


def test_owner_round_trip(benchmark, harness):
    """From the first packet at lb2 (no state, moved bucket) to lb2's cached
    answer: lb2 asks, the owner forwards and answers, lb2 caches."""
    h, asker = harness, harness.tb.lbs["lb2"]
    one_way = []
    state = {"last": None}

    def setup():
        if state["last"]:
            one_way.append(_deliver(h, "lb2", state["last"], "PA").wall)
        state["flow"] = h.take(h.remote, 1)
        state["target"] = asker.cluster.counters["answers_cached"] + 1
        h.inject("lb2", h.frames(state["flow"], "lb2", "PA"))

    def round_trip():
        h.run_until(lambda: asker.cluster.counters["answers_cached"] >= state["target"], 1)
        state["last"] = state["flow"]

    benchmark.pedantic(round_trip, setup=setup, rounds=RTT_ROUNDS, iterations=1)
    assert h.cached_at("lb2", state["last"])
    benchmark.extra_info.update({"one_way_median_s": statistics.median(one_way),
                                 "one_way_samples": len(one_way)})


def test_state_pushes(benchmark, harness):
    """SYNs at lb1 in moved buckets: each new flow is cached there and its
    state pushed, batched, to the bucket's owner and backup (rule 2), until
    both hold it."""
    h = harness
    pushes, plain = Timing(), Timing()
    state = {}

    def setup():
        plain.add(_deliver(h, "lb1", h.take(h.stable, BATCH), "S"))
        batch = h.take(h.moved, BATCH)
        # Owner and backup each keep one copy (lb1's own when it is one of them).
        state["target"] = h.tb.state_entries() + 2 * len(batch)
        h.inject("lb1", h.frames(batch, "lb1", "S"))

    def push():
        pushes.add(h.run_until(lambda: h.tb.state_entries() >= state["target"], BATCH))

    benchmark.pedantic(push, setup=setup, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({
        "flows": pushes.count,
        "pushes_per_worker_s": pushes.per_worker_second(),
        "pushes_per_wall_s": pushes.count / pushes.wall,
        "plain_syns_per_worker_s": plain.per_worker_second(),
    })
