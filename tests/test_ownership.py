"""Bucket ownership (docs/ownership.md): the fixed vectors pin the rule, the
rest checks the properties the design relies on: same answer everywhere,
balance, about 1/N moved per change, and a leaving owner's backup taking over."""
from __future__ import annotations

import hashlib
import math
import random
import time

import pytest

from pylb.flow_id import hash_bytes
from pylb.ownership import (FILL_BLOCK, OWNERSHIP_SEED, Move, Ownership, bucket_seed, moves,
                            score)

M = 65537
FOUR = ["lb-a", "lb-b", "lb-c", "lb-d"]


def names(n: int) -> list[str]:
    return [f"lb-{i}" for i in range(1, n + 1)]


def within_binomial(count: int, table_size: int, n: int) -> bool:
    """Whether a count is within 4 standard deviations of what n equal,
    independent choices per bucket give; the measured worst over N = 2..16 is
    3.0 (docs/ownership.md), and the names here are fixed, so no flakiness."""
    sd = math.sqrt(table_size * (1 / n) * (1 - 1 / n))
    return abs(count - table_size / n) <= 4 * sd


# ---------------------------------------------------------------- the rule

def test_seed_and_scores_are_the_documented_values():
    assert OWNERSHIP_SEED == 0x6E776F2D626C7970 == int.from_bytes(b"pylb-own", "little")
    assert bucket_seed(0) == 0xDAD93A60DC1ED4DD
    assert bucket_seed(1) == 0xD647686CB7961106
    assert bucket_seed(65536) == 0xE5971461E423EA88
    assert score("lb-a", 0) == 0xB0A061D239CF88D2
    assert score("lb-b", 0) == 0xBC673F54C95B54E8
    assert score("balancer-east-1", 7) == 0xAAF937AE25AF4DC9


# Written out from an implementation of docs/flow-id.md and docs/ownership.md
# that shares no code with pylb, so the rule cannot drift unnoticed.
RANKINGS = [
    (0, ("lb-b", "lb-a", "lb-c", "lb-d")),
    (1, ("lb-b", "lb-c", "lb-d", "lb-a")),
    (2, ("lb-a", "lb-c", "lb-d", "lb-b")),
    (3, ("lb-b", "lb-c", "lb-d", "lb-a")),
    (4, ("lb-c", "lb-b", "lb-d", "lb-a")),
    (1000, ("lb-a", "lb-b", "lb-c", "lb-d")),
    (65536, ("lb-c", "lb-a", "lb-d", "lb-b")),
]


@pytest.mark.parametrize("bucket, ranking", RANKINGS, ids=[str(b) for b, _ in RANKINGS])
def test_fixed_vectors(bucket, ranking):
    own = Ownership(FOUR, M)
    assert own.ranking(bucket) == ranking
    assert own.owners(bucket) == ranking[:2]
    assert (own.owner(bucket), own.backup(bucket)) == ranking[:2]


def test_fixed_vectors_with_names_longer_than_one_word():
    # Names over 8 bytes take more than one round of the hash.
    east1, east2, west1 = "balancer-east-1", "balancer-east-2", "balancer-west-1"
    own = Ownership([west1, east2, east1], 13)
    assert [own.owners(b) for b in range(13)] == [
        (east2, east1), (east1, west1), (west1, east1), (east2, west1), (east2, west1),
        (west1, east1), (east1, west1), (west1, east1), (east1, west1), (east1, east2),
        (east1, east2), (east1, east2), (east2, east1)]


def test_fixed_digest_of_a_full_size_table():
    # Every bucket of the default size, as "owner backup\n" lines.
    own = Ownership(FOUR, M)
    text = "".join("%s %s\n" % own.owners(b) for b in range(M))
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "0d5989c7c1fd9d102d76569fe003900c13193701b6330a0ab7c010bbf1da65cd"


def test_unrolled_scoring_is_hash_bytes():
    # Ownership scores with its per-name work hoisted out; it must remain
    # exactly hash_bytes(name, bucket_seed(bucket)).
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-._é"
    for _ in range(300):
        balancers = list({"".join(rng.choices(alphabet, k=rng.randint(1, 64)))
                          for _ in range(rng.randint(1, 6))})
        size = rng.choice([13, 101, M])
        bucket = rng.randrange(size)
        own = Ownership(balancers, size)
        expected = sorted(balancers, key=lambda n: (-hash_bytes(n.encode(), bucket_seed(bucket)),
                                                    n.encode()))
        assert own.ranking(bucket) == tuple(expected)


def test_equal_scores_go_to_the_lower_name():
    own = Ownership(["lb-c", "lb-a", "lb-b"], 13)
    own._scores = lambda bucket: [5, 5, 5]      # a 64-bit collision, made to order
    assert own.reference_owners(0) == ("lb-a", "lb-b")
    assert own.ranking(0) == ("lb-a", "lb-b", "lb-c")
    own._scores = lambda bucket: [1, 5, 5]      # scores are in name order: a, b, c
    assert own.reference_owners(1) == ("lb-b", "lb-c")


# ---------------------------------------------------------------- properties

def test_same_answer_from_any_order_and_any_collection():
    rng = random.Random(3)
    listed = names(7)
    shuffled = rng.sample(listed, len(listed))
    as_dict = {name: f"10.0.0.{i}" for i, name in enumerate(shuffled)}
    owners = [Ownership(x, 4099) for x in (listed, shuffled, set(listed), as_dict, iter(shuffled))]
    for bucket in range(4099):
        assert len({own.owners(bucket) for own in owners}) == 1
    assert all(own.balancers == tuple(sorted(listed)) for own in owners)


def test_owners_depend_on_the_bucket_number_not_the_table_size():
    # VIPs of one table size share owners; the size only bounds the buckets.
    small, large = Ownership(names(3), 13), Ownership(names(3), M)
    assert [small.owners(b) for b in range(13)] == [large.owners(b) for b in range(13)]


def test_lookups_in_any_order_give_the_same_table():
    # Answers are remembered per bucket; the order they were first asked in
    # must not matter.
    first, second = Ownership(names(5), 1009), Ownership(names(5), 1009)
    forward = [first.owners(b) for b in range(1009)]
    backward = [second.owners(b) for b in reversed(range(1009))][::-1]
    assert forward == backward == [first.owners(b) for b in range(1009)]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_each_balancer_owns_and_backs_up_about_one_nth(n):
    own = Ownership(names(n), M)
    sets = [own.buckets_of(name) for name in own.balancers]
    for s in sets:
        assert within_binomial(len(s.primary), M, n)
        assert within_binomial(len(s.backup), M, n)
        assert not s.primary & s.backup
    # Every bucket has exactly one owner and one backup.
    assert sum(len(s.primary) for s in sets) == sum(len(s.backup) for s in sets) == M
    assert set().union(*(s.primary for s in sets)) == set(range(M))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_backup_is_never_the_owner(n):
    own = Ownership(names(n), 4099)
    for bucket in range(4099):
        owner, backup = own.owners(bucket)
        assert backup is not None and backup != owner
        assert own.ranking(bucket)[:2] == (owner, backup)


@pytest.mark.parametrize("n, leaving", [(2, "lb-1"), (5, "lb-3"), (16, "lb-16")])
def test_a_leaving_owner_is_replaced_by_its_backup(n, leaving):
    old = Ownership(names(n), M)
    new = Ownership([x for x in names(n) if x != leaving], M)
    held = old.buckets_of(leaving)
    changed = moves(old, new)
    # Exactly the leaver's buckets move, about M/N of them.
    assert {b for b, m in changed.items() if m.owner_changed} == held.primary
    assert set(changed) == held.primary | held.backup
    assert within_binomial(len(held.primary), M, n)
    for bucket, move in changed.items():
        ranking = old.ranking(bucket)
        if bucket in held.primary:
            # The backup already holds the state: it becomes the owner.
            assert move.new[0] == move.old[1]
            assert move.senders == (move.old[1],)
        else:
            assert move.new[0] == move.old[0]
            assert move.senders == (move.old[0],)
        # The next in line becomes the new backup and is the only one without state.
        assert move.new[1] == (ranking[2] if n > 2 else None)
        assert move.receivers == ((ranking[2],) if n > 2 else ())


@pytest.mark.parametrize("n", [1, 4, 15])
def test_a_joining_balancer_takes_about_one_nth(n):
    old = Ownership(names(n), M)
    new = Ownership(names(n) + ["lb-new"], M)
    joined = new.buckets_of("lb-new")
    changed = moves(old, new)
    assert {b for b, m in changed.items() if m.owner_changed} == joined.primary
    assert set(changed) == joined.primary | joined.backup
    assert within_binomial(len(joined.primary), M, n + 1)
    for bucket, move in changed.items():
        assert "lb-new" in move.new and move.receivers == ("lb-new",)
        if move.owner_changed:
            # The old owner steps down to backup, keeping its copy of the state.
            assert move.new == ("lb-new", move.old[0])
        else:
            assert move.new == (move.old[0], "lb-new")


def test_owner_and_backup_leaving_together_leave_no_sender():
    old = Ownership(names(4), 1009)
    bucket = 0
    owner, backup = old.owners(bucket)
    new = Ownership([x for x in names(4) if x not in (owner, backup)], 1009)
    move = moves(old, new)[bucket]
    assert move.senders == ()
    assert set(move.receivers) == set(names(4)) - {owner, backup} == set(move.new)


def test_moves_between_equal_sets_is_empty():
    assert moves(Ownership(names(3), 1009), Ownership(reversed(names(3)), 1009)) == {}


def test_move_fields():
    move = Move(5, ("a", "b"), ("b", "c"), receivers=("c",), senders=("b",))
    assert move.owner_changed and move.backup_changed
    assert not Move(5, ("a", "b"), ("a", "c"), ("c",), ("a",)).owner_changed


def test_single_balancer_owns_everything_with_no_backup():
    own = Ownership(["lb-only"], 1009)
    assert all(own.owners(b) == ("lb-only", None) for b in range(1009))
    assert own.backup(0) is None and own.ranking(3) == ("lb-only",)
    assert own.buckets_of("lb-only") == (frozenset(range(1009)), frozenset())
    second = moves(own, Ownership(["lb-only", "lb-two"], 1009))
    assert len(second) == 1009      # every bucket gains a backup
    assert all(m.receivers == ("lb-two",) for m in second.values())


def test_construction_is_cheap_and_lookups_are_lazy():
    # The whole table costs N hashes per bucket; building must not pay it.
    start = time.perf_counter()
    own = Ownership(names(16), M)
    assert time.perf_counter() - start < 0.05
    assert own.owners(M - 1) == own.owners(M - 1)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("balancers, message", [
    ([], "at least one balancer"),
    (["lb-1", "lb-2", "lb-1"], "duplicate balancer names: lb-1"),
    (["lb-1", ""], "non-empty string"),
    (["lb-1", "a\0b"], "without NUL"),
    (["lb-1", 7], "non-empty string"),
])
def test_bad_balancer_sets(balancers, message):
    with pytest.raises(ValueError, match=message):
        Ownership(balancers, 13)


def test_a_single_string_is_not_a_set_of_balancers():
    with pytest.raises(TypeError, match="single string"):
        Ownership("lb-1", 13)


@pytest.mark.parametrize("size", [0, -1, 2**32, 1.5, True, "13"])
def test_bad_table_size(size):
    with pytest.raises(ValueError, match="table size"):
        Ownership(["lb-1"], size)


@pytest.mark.parametrize("bucket", [-1, 13, 1.0, None])
def test_bucket_out_of_range(bucket):
    own = Ownership(["lb-1", "lb-2"], 13)
    with pytest.raises(ValueError, match=r"bucket must be 0\.\.12"):
        own.owners(bucket)


def test_unknown_balancer_and_mismatched_sizes():
    own = Ownership(["lb-1", "lb-2"], 13)
    with pytest.raises(ValueError, match="'lb-9' is not one of the balancers"):
        own.buckets_of("lb-9")
    with pytest.raises(ValueError, match="different table sizes"):
        moves(own, Ownership(["lb-1"], 17))


@pytest.mark.parametrize("n, table_size", [(1, 13), (2, 251), (3, 65537), (7, 4099), (16, 65537),
                                           (40, 1009), (3, 1_000_003)])
def test_the_native_table_matches_the_reference(n, table_size):
    """pylb_ownership_fill computes blocks of buckets at once, as the Python
    rule does bucket by bucket (names of other lengths than 8 bytes, and
    the edges of blocks, included)."""
    rng = random.Random(n)
    listed = [f"balancer-{rng.randrange(10**6)}-{'é' * rng.randrange(12)}" for _ in range(n)]
    own = Ownership(listed, table_size)
    step = max(1, min(table_size, 65537) // 3000)
    edges = [b for b in (FILL_BLOCK - 1, FILL_BLOCK, table_size - 1) if b < table_size]
    for bucket in [*range(0, min(table_size, 65537), step), *edges]:
        assert own._code(bucket) == own.reference_code(bucket), bucket
