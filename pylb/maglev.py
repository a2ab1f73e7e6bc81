"""Maglev destination tables: bucket -> backend, the same on every balancer.

`build_table` is the reference the C shim (native/maglev.c) must match entry
for entry; the algorithm, with its weights and name hashing, is specified in
docs/maglev.md.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

from pylb.flow_id import hash_bytes

NO_BACKEND = 0xFFFFFFFF
DEFAULT_SIZE = 65537
MAX_WEIGHT = 0xFFFFFFFF

# ASCII "maglev-o" and "maglev-s", little-endian: nothing up the sleeve.
OFFSET_SEED = int.from_bytes(b"maglev-o", "little")
SKIP_SEED = int.from_bytes(b"maglev-s", "little")


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend as Maglev sees it: a stable name and a weight (0 = no buckets)."""

    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "\0" in self.name:
            raise ValueError(f"a backend name is a non-empty string without NUL, not {self.name!r}")
        if not isinstance(self.weight, int) or not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"backend {self.name!r}: weight must be 0..{MAX_WEIGHT}, "
                             f"not {self.weight!r}")


def is_prime(n: int) -> bool:
    """Trial division: table sizes are below 2**32, so at most ~22,000 divisions."""
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    divisor = 5
    while divisor * divisor <= n:
        if n % divisor == 0 or n % (divisor + 2) == 0:
            return False
        divisor += 6
    return True


def _check(backends: Sequence[Backend], size: int) -> None:
    if not isinstance(size, int) or not 2 <= size <= 0xFFFFFFFF or not is_prime(size):
        raise ValueError(f"table size must be a prime below 2**32, not {size!r}")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"duplicate backend names: {', '.join(duplicates)}")


class _Turn:
    """A backend waiting for its next bucket. Turns are served in order of
    (2k+1)/weight, k being the buckets it has, ties by name: the Sainte-Laguë
    sequence, compared exactly by cross-multiplying."""

    __slots__ = ("rank", "weight", "taken")

    def __init__(self, rank: int, weight: int):
        self.rank, self.weight, self.taken = rank, weight, 0

    def __lt__(self, other: _Turn) -> bool:
        mine = (2 * self.taken + 1) * other.weight
        theirs = (2 * other.taken + 1) * self.weight
        return mine < theirs or (mine == theirs and self.rank < other.rank)


def build_table(backends: Sequence[Backend], size: int = DEFAULT_SIZE) -> list[int]:
    """The destination table: for each bucket, an index into `backends`, or
    NO_BACKEND when no backend has weight. Independent of the order of `backends`."""
    _check(backends, size)
    table = [NO_BACKEND] * size
    ranked = sorted((i for i, b in enumerate(backends) if b.weight > 0),
                    key=lambda i: backends[i].name.encode())
    if not ranked:
        return table
    names = [backends[i].name.encode() for i in ranked]
    position = [hash_bytes(name, OFFSET_SEED) % size for name in names]
    skip = [hash_bytes(name, SKIP_SEED) % (size - 1) + 1 for name in names]
    turns = [_Turn(rank, backends[i].weight) for rank, i in enumerate(ranked)]
    heapq.heapify(turns)
    for _ in range(size):
        turn = turns[0]
        rank = turn.rank
        # Size is prime, so the walk visits every bucket: an empty one is found.
        while table[position[rank]] != NO_BACKEND:
            position[rank] = (position[rank] + skip[rank]) % size
        table[position[rank]] = ranked[rank]
        turn.taken += 1
        heapq.heapreplace(turns, turn)
    return table


def build_table_native(backends: Sequence[Backend], size: int = DEFAULT_SIZE) -> list[int]:
    """build_table computed by the C shim; raises pylb.errors.InvalidArgument
    where build_table raises ValueError."""
    # Imported here so the reference above works where the shim is not built.
    from pylb._ffi import check, ffi, lib

    if not isinstance(size, int) or not 0 <= size <= 0xFFFFFFFF:
        raise ValueError(f"table size must be a prime below 2**32, not {size!r}")
    names = [ffi.new("char[]", b.name.encode()) for b in backends]  # alive until the call returns
    c_backends = ffi.new("struct pylb_maglev_backend[]", max(len(backends), 1))
    for c_backend, name, backend in zip(c_backends, names, backends):
        c_backend.name, c_backend.weight = name, backend.weight
    # The shim refuses a size that is not prime before writing any entry, so
    # such a size gets its error without a table of that size being allocated.
    table = ffi.new("uint32_t[]", size if is_prime(size) else 1)
    check(lib.pylb_maglev_build(c_backends, len(backends), size, table), "maglev table")
    return ffi.unpack(table, size)


def moved_buckets(old_table: Sequence[int], new_table: Sequence[int],
                  old_backends: Sequence[Backend], new_backends: Sequence[Backend]) -> int:
    """Buckets whose backend, by name, differs between two generations."""
    if len(old_table) != len(new_table):
        raise ValueError(f"tables of different sizes ({len(old_table)}, {len(new_table)}) "
                         "have no buckets in common")

    def name(backends: Sequence[Backend], index: int) -> str | None:
        return None if index == NO_BACKEND else backends[index].name

    return sum(name(old_backends, a) != name(new_backends, b)
               for a, b in zip(old_table, new_table))
