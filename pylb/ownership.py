"""Bucket ownership: per bucket, the balancer authoritative for its flows'
state (the owner) and the one holding a copy (the backup owner).

Chosen by rendezvous (highest random weight) hashing over the names of the
live balancers, so every balancer computes the same owners from the same set
of names with no coordination. The rule is specified in docs/ownership.md,
exactly enough for another implementation to match; tests/test_ownership.py
pins it with fixed vectors.
"""
from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterable
from typing import NamedTuple

# The scoring loop below is hash_bytes with its per-name work done once per
# name; it must stay the same function (tests/test_ownership.py checks it
# against hash_bytes), so it takes its constants from the reference itself.
from pylb.flow_id import _FMIX1, _FMIX2, _MASK, _P1, _P2, _P3, hash_bytes

# ASCII "pylb-own", little-endian, as Maglev's seeds are: nothing up the
# sleeve, and distinct from every other seed, so owners are independent of
# flow ids and of Maglev's permutations.
OWNERSHIP_SEED = int.from_bytes(b"pylb-own", "little")
# Buckets computed together (in C) when one of them is first asked for: a
# millisecond or two at three balancers, so a lookup in a table of millions
# of buckets never waits for the whole table.
FILL_BLOCK = 65536


def bucket_seed(bucket: int) -> int:
    """The seed under which balancer names are scored for one bucket."""
    return hash_bytes(bucket.to_bytes(8, "little"), OWNERSHIP_SEED)


def score(name: str, bucket: int) -> int:
    """A balancer's random weight for a bucket: the highest score owns it."""
    return hash_bytes(name.encode(), bucket_seed(bucket))


class BucketSets(NamedTuple):
    """The buckets one balancer is owner of, and backup owner of."""

    primary: frozenset[int]
    backup: frozenset[int]


@dataclasses.dataclass(frozen=True)
class Move:
    """One bucket whose owner or backup differs between two balancer sets:
    the handoff work of rule 5."""

    bucket: int
    old: tuple[str, str | None]    # (owner, backup) before
    new: tuple[str, str | None]    # (owner, backup) after
    # New holders that were not holders before: the state must reach them.
    receivers: tuple[str, ...]
    # Old holders still live, owner first: they have the state to send. Empty
    # only when owner and backup left together; then nothing holds the
    # bucket's state, and rule 6's refreshes from the balancers still seeing
    # its flows rebuild it at the new owner.
    senders: tuple[str, ...]

    @property
    def owner_changed(self) -> bool:
        return self.old[0] != self.new[0]

    @property
    def backup_changed(self) -> bool:
        return self.old[1] != self.new[1]


class Ownership:
    """Owner and backup owner of every bucket 0..table_size-1 for one set of
    live balancers.

    Buckets' owners are computed in C, a block of FILL_BLOCK at a time, when
    one of the block is first asked for, and remembered (docs/ownership.md);
    `buckets_of` and `moves` compute the rest when they need it. The Python
    rule (`reference_code`) is what the C code is tested against.
    """

    def __init__(self, balancers: Iterable[str], table_size: int):
        if isinstance(balancers, (str, bytes)):
            # A lone name would otherwise be read as a set of one-letter balancers.
            raise TypeError("balancers must be a collection of names, not a single string")
        names = list(balancers)
        for name in names:
            if not isinstance(name, str) or not name or "\0" in name:
                raise ValueError(f"a balancer name is a non-empty string without NUL, "
                                 f"not {name!r}")
        if not names:
            raise ValueError("ownership needs at least one balancer; the set is empty")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate balancer names: {', '.join(duplicates)}")
        if isinstance(table_size, bool) or not isinstance(table_size, int) \
                or not 1 <= table_size <= 0xFFFFFFFF:
            raise ValueError(f"table size must be an integer 1..2**32-1, not {table_size!r}")
        # Name order (of the UTF-8 bytes, as strcmp) is the tie-break, and
        # scoring in that order makes the first of equal scores the winner.
        encoded = sorted(name.encode() for name in names)
        self.balancers: tuple[str, ...] = tuple(b.decode() for b in encoded)
        self.table_size = table_size
        self._rank = {name: rank for rank, name in enumerate(self.balancers)}
        # hash_bytes folds each 8-byte word of the data in as word * P2; for a
        # name that product never changes, so it is taken once here.
        self._words = [
            (tuple((int.from_bytes(b[i:i + 8], "little") * _P2) & _MASK
                   for i in range(0, len(b), 8)), len(b))
            for b in encoded]
        n = len(self.balancers)
        if n * n >= 0xFFFFFFFF:
            raise ValueError(f"{n} balancers are more than ownership codes can hold")
        # Per bucket, its (owner rank, backup rank) as one integer, plus one
        # so that 0 means "not computed yet": a table of 65537 buckets costs
        # 256 KiB rather than a dict of tuples.
        self._encoded = encoded
        self._cache = array("I", [0]) * table_size
        self._complete = False

    def __repr__(self) -> str:
        return f"Ownership({list(self.balancers)!r}, {self.table_size})"

    def _scores(self, bucket: int) -> list[int]:
        """Every balancer's score for a bucket, in name order: hash_bytes(name,
        bucket_seed(bucket)), unrolled."""
        acc0 = bucket_seed(bucket) ^ _P3
        out = []
        for words, length in self._words:
            acc = acc0
            for w in words:
                acc ^= w
                acc = (((acc << 31) | (acc >> 33)) & _MASK) * _P1 & _MASK
            x = acc ^ length
            x ^= x >> 33
            x = (x * _FMIX1) & _MASK
            x ^= x >> 33
            x = (x * _FMIX2) & _MASK
            out.append(x ^ (x >> 33))
        return out

    def _pair(self, code: int) -> tuple[str, str | None]:
        first, second = divmod(code - 1, len(self.balancers))
        return self.balancers[first], self.balancers[second] if len(self.balancers) > 1 else None

    def _code(self, bucket: int) -> int:
        code = self._cache[bucket]
        if not code:
            self._fill_block(bucket // FILL_BLOCK)
            code = self._cache[bucket]
        return code

    def reference_code(self, bucket: int) -> int:
        """The rule in Python, bucket by bucket: what pylb_ownership_fill
        must match (tests/test_ownership.py)."""
        first = second = -1
        best = runner_up = -1
        # Strictly greater replaces: among equal scores the lower rank (name)
        # keeps its place, which is the tie-break.
        for rank, s in enumerate(self._scores(bucket)):
            if s > best:
                second, runner_up = first, best
                first, best = rank, s
            elif s > runner_up:
                second, runner_up = rank, s
        return first * len(self.balancers) + max(second, 0) + 1

    def _check_bucket(self, bucket: int) -> None:
        if isinstance(bucket, bool) or not isinstance(bucket, int) \
                or not 0 <= bucket < self.table_size:
            raise ValueError(f"bucket must be 0..{self.table_size - 1}, not {bucket!r}")

    def reference_owners(self, bucket: int) -> tuple[str, str | None]:
        """owners() by the Python rule (reference_code)."""
        self._check_bucket(bucket)
        return self._pair(self.reference_code(bucket))

    def owners(self, bucket: int) -> tuple[str, str | None]:
        """(owner, backup owner) of a bucket; the backup is None when there
        is a single balancer."""
        self._check_bucket(bucket)
        return self._pair(self._code(bucket))

    def owner(self, bucket: int) -> str:
        return self.owners(bucket)[0]

    def backup(self, bucket: int) -> str | None:
        return self.owners(bucket)[1]

    def ranking(self, bucket: int) -> tuple[str, ...]:
        """Every balancer in order of preference for a bucket. Owner and
        backup are its first two; the rest say who follows when they leave."""
        self._check_bucket(bucket)
        scores = self._scores(bucket)
        order = sorted(range(len(scores)), key=lambda rank: (-scores[rank], rank))
        return tuple(self.balancers[rank] for rank in order)

    def _fill_block(self, block: int) -> None:
        """Buckets [block * FILL_BLOCK, (block + 1) * FILL_BLOCK), in C: a
        lookup waits for its block only, however large the table."""
        # Imported here so that the reference works where the shim is not built.
        from pylb._ffi import check, ffi, lib

        first = block * FILL_BLOCK
        count = min(FILL_BLOCK, self.table_size - first)
        names = [ffi.new("char[]", b) for b in self._encoded]     # alive through the call
        check(lib.pylb_ownership_fill(ffi.new("char *[]", names),
                                      ffi.new("uint32_t[]", [len(b) for b in self._encoded]),
                                      len(names), self.table_size, first, count,
                                      ffi.from_buffer("uint32_t[]", self._cache)),
              "ownership table")

    def _fill(self) -> None:
        if self._complete:
            return
        for block in range(-(-self.table_size // FILL_BLOCK)):
            if not self._cache[min(block * FILL_BLOCK + FILL_BLOCK, self.table_size) - 1]:
                self._fill_block(block)
        self._complete = True

    def buckets_of(self, name: str) -> BucketSets:
        """The buckets a balancer owns and those it backs up."""
        rank = self._rank.get(name)
        if rank is None:
            raise ValueError(f"{name!r} is not one of the balancers "
                             f"({', '.join(self.balancers)})")
        self._fill()
        n = len(self.balancers)
        primary, backup = [], []
        for bucket, cached in enumerate(self._cache):
            first, second = divmod(cached - 1, n)
            if first == rank:
                primary.append(bucket)
            elif second == rank and n > 1:
                backup.append(bucket)
        return BucketSets(frozenset(primary), frozenset(backup))


def moves(old: Ownership, new: Ownership) -> dict[int, Move]:
    """The buckets whose owner or backup differs from `old` to `new`, each
    with who must receive its state and who can send it (rule 5)."""
    if old.table_size != new.table_size:
        raise ValueError(f"ownerships of different table sizes ({old.table_size}, "
                         f"{new.table_size}) have no buckets in common")
    if old.balancers == new.balancers:
        return {}
    old._fill()
    new._fill()
    live = set(new.balancers)
    # At most n * n distinct codes: their pairs once, not once per bucket.
    old_pairs = {code: old._pair(code) for code in set(old._cache)}
    new_pairs = {code: new._pair(code) for code in set(new._cache)}
    out = {}
    for bucket, (a, b) in enumerate(zip(old._cache, new._cache)):
        was, now = old_pairs[a], new_pairs[b]
        if was == now:
            continue
        held = {h for h in was if h is not None}
        out[bucket] = Move(
            bucket, was, now,
            receivers=tuple(h for h in now if h is not None and h not in held),
            senders=tuple(h for h in was if h is not None and h in live))
    return out
