"""Maglev tables: Python reference and C shim agree, and the table keeps the
properties docs/maglev.md promises (balance, weights, small disruption,
independence of input order)."""
from __future__ import annotations

import collections
import hashlib
import random
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylb.errors import InvalidArgument
from pylb.maglev import (NO_BACKEND, Backend, build_table, build_table_native, is_prime,
                         moved_buckets)

M = 65537
BUILDERS = {"python": build_table, "native": build_table_native}
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())


def counts(table):
    return collections.Counter(table)


def names(table, backends):
    return [None if i == NO_BACKEND else backends[i].name for i in table]


def equal_backends(n: int) -> list[Backend]:
    return [Backend(f"backend-{i}") for i in range(n)]


# ------------------------------------------------------------------ fixed vectors

FIVE = [Backend(f"backend-{i}.example", w) for i, w in zip(range(5), (1, 1, 2, 2, 5))]
FOUR_WEIGHTED = [Backend("10.0.0.4", 4), Backend("10.0.0.1", 1), Backend("10.0.0.3", 3),
                 Backend("10.0.0.2", 2), Backend("10.0.0.5", 0)]

# Generated once from the reference and pasted; they pin docs/maglev.md.
VECTORS = [
    ("three equal, listed out of order", [Backend("c"), Backend("a"), Backend("b")], 13,
     "1120101120202"),
    ("weights 3:1 and a drained backend",
     [Backend("heavy", 3), Backend("light", 1), Backend("off", 0)], 13, "0010000000101"),
    ("weights 4:1:3:2:0", FOUR_WEIGHTED, 251,
     "3132122023210201221020220102002030000200000000000332313233232323323132012323220201"
     "3020200302000000022210231221022230302203030010203001000320100002000232231323222132"
     "312010232201023020200002000000300000122313232330323231032323203232020023200002000000102"),
]


@builders
@pytest.mark.parametrize("description, backends, size, expected", VECTORS,
                         ids=[v[0] for v in VECTORS])
def test_fixed_tables(build, description, backends, size, expected):
    assert "".join(map(str, build(backends, size))) == expected


@builders
def test_fixed_digest_of_a_full_size_table(build):
    table = build(FIVE, M)
    digest = hashlib.sha256(struct.pack(f"<{M}I", *table)).hexdigest()
    assert digest == "48e1ea9b2241bd5287174ba6427d20842aea4332eee1642bd455cfac6a650287"


# ------------------------------------------------------------------ Python == C

SMALL_PRIMES = [2, 3, 5, 13, 251, 1021]
backend_names = st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                        min_size=1, max_size=12)
weights = st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))
backend_sets = st.lists(st.builds(Backend, backend_names, weights), max_size=12,
                        unique_by=lambda b: b.name)


@settings(max_examples=200)
@given(backend_sets, st.sampled_from(SMALL_PRIMES))
def test_python_and_native_agree(backends, size):
    assert build_table(backends, size) == build_table_native(backends, size)


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100, 1000])
def test_equal_weights_differ_by_at_most_one(n):
    table = build_table_native(equal_backends(n), M)
    spread = counts(table)
    assert len(spread) == n
    assert max(spread.values()) - min(spread.values()) <= 1


def test_equal_weights_python():
    spread = counts(build_table(equal_backends(10), M))
    assert max(spread.values()) - min(spread.values()) <= 1


def assert_proportional(table, backends):
    total = sum(b.weight for b in backends)
    spread = counts(table)
    for i, backend in enumerate(backends):
        assert abs(spread[i] - len(table) * backend.weight / total) <= 0.01 * len(table)


@builders
def test_counts_follow_weights(build):
    backends = [Backend(name, weight) for name, weight in zip("abcd", (1, 2, 3, 4))]
    table = build(backends, M)
    assert_proportional(table, backends)
    # Measured: each count is within one bucket of its exact share.
    assert all(abs(counts(table)[i] - M * b.weight / 10) < 1 for i, b in enumerate(backends))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=50))
def test_counts_follow_random_weights(weight_list):
    backends = [Backend(f"backend-{i}", w) for i, w in enumerate(weight_list)]
    assert_proportional(build_table_native(backends, M), backends)


# (backends, largest moved share as a multiple of 1/N): what Maglev gives
# (docs/maglev.md) with some margin. Disruption grows as M/N shrinks.
DISRUPTION_BOUNDS = [(2, 1.01), (5, 1.02), (10, 1.1), (20, 1.15), (50, 1.35), (100, 1.8)]


@pytest.mark.parametrize("n, bound", DISRUPTION_BOUNDS)
def test_removing_one_backend_moves_about_one_nth(n, bound):
    backends = equal_backends(n)
    before = build_table_native(backends, M)
    removed_all = range(n) if n <= 20 else random.Random(n).sample(range(n), 10)
    for removed in removed_all:
        after_backends = backends[:removed] + backends[removed + 1:]
        after = build_table_native(after_backends, M)
        moved = moved_buckets(before, after, backends, after_backends)
        assert counts(before)[removed] <= moved <= bound * M / n


@pytest.mark.parametrize("n, bound", DISRUPTION_BOUNDS)
def test_adding_one_backend_moves_about_one_nth(n, bound):
    backends = equal_backends(n)
    grown = backends + [Backend("newcomer")]
    before, after = build_table_native(backends, M), build_table_native(grown, M)
    moved = moved_buckets(before, after, backends, grown)
    assert counts(after)[n] <= moved <= bound * M / (n + 1)


@builders
def test_weight_zero_is_the_same_as_absent(build):
    backends = equal_backends(6)
    drained = backends[:2] + [Backend(backends[2].name, 0)] + backends[3:]
    absent = backends[:2] + backends[3:]
    assert names(build(drained, 1021), drained) == names(build(absent, 1021), absent)
    assert 2 not in build(drained, 1021)


@settings(max_examples=50)
@given(backend_sets, st.sampled_from(SMALL_PRIMES), st.randoms())
def test_order_of_backends_does_not_matter(backends, size, rng):
    shuffled = list(backends)
    rng.shuffle(shuffled)
    for build in BUILDERS.values():
        assert names(build(backends, size), backends) == names(build(shuffled, size), shuffled)


@builders
def test_deterministic(build):
    assert build(FIVE, 1021) == build(FIVE, 1021)


@builders
@pytest.mark.parametrize("backends", [[], [Backend("a", 0), Backend("b", 0)]],
                         ids=["no backends", "all drained"])
def test_nothing_to_send_to(build, backends):
    assert build(backends, 13) == [NO_BACKEND] * 13


def test_native_is_fast_for_a_thousand_backends():
    backends = equal_backends(1000)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        build_table_native(backends, M)
        best = min(best, time.perf_counter() - start)
    assert best < 0.1


# ------------------------------------------------------------------ errors

ERRORS = {"python": ValueError, "native": InvalidArgument}


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("size", [0, 1, 4, 65535, 65536, 2**32 - 1])
def test_size_must_be_prime(kind, size):
    with pytest.raises(ERRORS[kind], match="not a prime|must be a prime"):
        BUILDERS[kind](FIVE, size)


@pytest.mark.parametrize("kind", BUILDERS)
def test_duplicate_names(kind):
    backends = [Backend("a"), Backend("b", 0), Backend("b")]
    with pytest.raises(ERRORS[kind], match="duplicate backend name.*b"):
        BUILDERS[kind](backends, 13)


@pytest.mark.parametrize("name, weight", [("", 1), ("a\0b", 1), (None, 1), ("a", -1),
                                          ("a", 2**32), ("a", 1.5)])
def test_invalid_backend(name, weight):
    with pytest.raises(ValueError):
        Backend(name, weight)


@pytest.mark.parametrize("name", [None, b""], ids=["NULL", "empty"])
def test_native_rejects_nameless_backends(name):
    from pylb._ffi import ffi, lib

    backends = ffi.new("struct pylb_maglev_backend[2]")
    keep = ffi.new("char[]", b"a")
    backends[0].name, backends[0].weight = keep, 1
    backends[1].name = ffi.NULL if name is None else ffi.new("char[]", name)
    table = ffi.new("uint32_t[13]")
    assert lib.pylb_maglev_build(backends, 2, 13, table) == lib.PYLB_EINVAL
    assert b"backend 1 has no name" in ffi.string(lib.pylb_last_error())


def test_native_rejects_null_table():
    from pylb._ffi import ffi, lib

    assert lib.pylb_maglev_build(ffi.NULL, 0, 13, ffi.NULL) == lib.PYLB_EINVAL


@pytest.mark.parametrize("n, prime", [(2, True), (3, True), (13, True), (65537, True),
                                      (4294967291, True), (0, False), (1, False),
                                      (9, False), (65535, False), (4294967295, False)])
def test_is_prime(n, prime):
    assert is_prime(n) is prime


# ------------------------------------------------------------------ moved buckets

def test_moved_buckets_compares_names_not_indices():
    old = [Backend("a"), Backend("b")]
    new = [Backend("b"), Backend("a")]
    assert moved_buckets([0, 1, 0], [1, 0, 1], old, new) == 0
    assert moved_buckets([0, 1, NO_BACKEND], [0, NO_BACKEND, 0], old, new) == 3


def test_moved_buckets_needs_equal_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        moved_buckets([0], [0, 0], [Backend("a")], [Backend("a")])
