"""The owner's store (pylb/state_store.py) on a clock the tests move by hand:
record versions only grow, state from the flow's start beats an owner's rule-4
decision, and an entry ends with its flow (removal, or idle per class)."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pylb.cluster import AUTHORITATIVE
from pylb.flow_id import FlowKey
from pylb.peer import RemoveRecord, StateRecord, make_version
from pylb.state_store import StateStore

TCP, UDP, ICMP = 6, 17, 1
# Distinct per class, so a record aged by the wrong class's timeout shows.
TIMEOUTS = {"tcp_idle": 300.0, "tcp_closing": 10.0, "udp_idle": 30.0, "other_idle": 45.0}
BACKEND_A, BACKEND_B = "203.0.113.101", "203.0.113.102"
T0 = 1_700_000_000_000            # wall-clock ms of the versions below
START = 1000.0                    # the store's monotonic clock at the start


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> StateStore:
    return StateStore(**TIMEOUTS, clock=clock)


def key(proto: int = TCP, i: int = 0) -> bytes:
    return FlowKey(f"198.51.100.{1 + i}", "192.0.2.10", 40000 + i, 80, proto).to_bytes()


def record(version: int, backend: str = BACKEND_A, proto: int = TCP, closing: bool = False,
           idle_ms: int = 0, i: int = 0) -> StateRecord:
    return StateRecord(key(proto, i), ipaddress.ip_address(backend), version, idle_ms, closing)


def rule4(ms_after: int = 0, counter: int = 0) -> int:
    """The version an owner gives a decision of its own (rule 4)."""
    return make_version(T0 + ms_after, counter)


def authoritative(ms_after: int = 0, counter: int = 0) -> int:
    """The version of state from the balancer that saw the flow start."""
    return rule4(ms_after, counter) | AUTHORITATIVE


def held(store: StateStore, k: bytes) -> tuple | None:
    """What the store would answer for k, without the idle time."""
    rec = store.get(k)
    return None if rec is None else (str(rec.backend), rec.version, rec.closing)


def test_put_then_get(store):
    rec = record(rule4())
    assert store.get(rec.key) is None
    assert store.put(rec) is True
    assert store.get(rec.key) == rec
    assert store.get(key(i=1)) is None
    assert len(store) == 1


# (description, version held first, version offered second, whether the second replaces)
VERSION_CASES = [
    ("a newer creation time replaces", rule4(0), rule4(1), True),
    ("a newer update counter replaces", rule4(5, 0), rule4(5, 1), True),
    ("an older version never replaces (no rollback)", rule4(1), rule4(0), False),
    ("an older counter never replaces", rule4(5, 7), rule4(5, 6), False),
    ("state from the flow's start beats a later rule-4 decision",
     rule4(3_600_000, 0xFFFF), authoritative(0), True),
    ("a rule-4 decision never replaces state from the flow's start",
     authoritative(0), rule4(3_600_000, 0xFFFF), False),
    ("newer state from the flow's start replaces older", authoritative(0), authoritative(1), True),
    ("older state from the flow's start never replaces newer", authoritative(1),
     authoritative(0), False),
]


@pytest.mark.parametrize("first, second, replaces", [c[1:] for c in VERSION_CASES],
                         ids=[c[0] for c in VERSION_CASES])
def test_versions_only_grow(store, clock, first, second, replaces):
    assert store.put(record(first, BACKEND_A)) is True
    clock.advance(1.0)
    assert store.put(record(second, BACKEND_B)) is replaces
    winner = (BACKEND_B, second) if replaces else (BACKEND_A, first)
    assert held(store, key()) == (*winner, False)
    # is_stale, which the cluster counts `stale` by, agrees with put.
    assert store.is_stale(record(second)) is (second < first)


@given(rule4_ms=st.integers(0, (1 << 47) - 1 - T0), rule4_counter=st.integers(0, 0xFFFF),
       auth_ms=st.integers(0, (1 << 47) - 1 - T0), auth_counter=st.integers(0, 0xFFFF),
       authoritative_first=st.booleans())
def test_state_from_the_flow_start_beats_any_rule4_version(rule4_ms, rule4_counter, auth_ms,
                                                           auth_counter, authoritative_first):
    store = StateStore(**TIMEOUTS, clock=Clock())
    start = record(authoritative(auth_ms, auth_counter), BACKEND_A)
    decided = record(rule4(rule4_ms, rule4_counter), BACKEND_B)
    for rec in (start, decided) if authoritative_first else (decided, start):
        store.put(rec)
    assert store.get(start.key) == start


def test_the_same_version_only_renews_life(store, clock):
    v = rule4()
    store.put(record(v, BACKEND_A))
    clock.advance(200.0)
    # Same version, other content: not a change, but the flow is known active now.
    assert store.put(record(v, BACKEND_B)) is False
    clock.advance(200.0)                     # 400 s after the first put, 200 after the renewal
    assert held(store, key()) == (BACKEND_A, v, False)
    # A renewal that knows less (it saw the flow 250 s ago) does not shorten the life.
    assert store.put(record(v, BACKEND_A, idle_ms=250_000)) is False
    clock.advance(99.0)
    assert held(store, key()) == (BACKEND_A, v, False)
    clock.advance(1.0)                       # 300 s after the last sign of life
    assert store.get(key()) is None


def test_refresh_renews_a_held_copy_whatever_its_version(store, clock):
    store.put(record(rule4(5), BACKEND_A))
    clock.advance(200.0)
    # A refresher may know an older version (it cached the flow earlier): the
    # state stays as held, only its life is renewed.
    store.refresh(record(rule4(0), BACKEND_B))
    clock.advance(200.0)
    assert held(store, key()) == (BACKEND_A, rule4(5), False)
    # With nothing held (the copy expired, or a new holder), the refresh is the state.
    store.refresh(record(rule4(0), BACKEND_B, i=1))
    assert held(store, key(i=1)) == (BACKEND_B, rule4(0), False)


# (description, version held, version of the removal, whether it is removed)
REMOVE_CASES = [
    ("the held version", rule4(5), rule4(5), True),
    ("a newer version", rule4(5), rule4(6), True),
    ("an older version: the flow lives on in its newer state", rule4(5), rule4(4), False),
    ("a rule-4 removal cannot end state from the flow's start", authoritative(0),
     rule4(3_600_000), False),
]


@pytest.mark.parametrize("version, removal, removed", [c[1:] for c in REMOVE_CASES],
                         ids=[c[0] for c in REMOVE_CASES])
def test_remove_respects_versions(store, version, removal, removed):
    store.put(record(version))
    # is_stale, which the cluster counts `stale` by, agrees with remove.
    assert store.is_stale(RemoveRecord(key(), removal)) is not removed
    assert store.remove(key(), removal) is removed
    assert held(store, key()) == (None if removed else (BACKEND_A, version, False))
    assert len(store) == (0 if removed else 1)


def test_removing_an_unknown_flow_changes_nothing(store):
    store.put(record(rule4()))
    assert store.remove(key(i=1), rule4()) is False
    assert len(store) == 1


# (class, proto, closing, idle timeout in seconds)
CLASSES = [
    ("tcp", TCP, False, TIMEOUTS["tcp_idle"]),
    ("tcp closing", TCP, True, TIMEOUTS["tcp_closing"]),
    ("udp", UDP, False, TIMEOUTS["udp_idle"]),
    ("other", ICMP, False, TIMEOUTS["other_idle"]),
]


@pytest.mark.parametrize("proto, closing, timeout", [c[1:] for c in CLASSES],
                         ids=[c[0] for c in CLASSES])
@pytest.mark.parametrize("idle_s", [0.0, 4.0], ids=["seen now", "seen 4 s ago"])
def test_idle_expiry_by_class(store, clock, proto, closing, timeout, idle_s):
    rec = record(rule4(), proto=proto, closing=closing, idle_ms=int(idle_s * 1000))
    store.put(rec)
    clock.advance(timeout - idle_s - 0.5)
    assert store.get(rec.key) == rec
    assert store.expire() == 0
    clock.advance(0.5)                       # exactly the timeout since last seen
    assert store.get(rec.key) is None
    assert store.records() == []
    assert len(store) == 1                   # gone for readers; expire() frees it
    assert store.expire() == 1
    assert len(store) == 0


def test_expire_frees_exactly_the_dead_entries(store, clock):
    for i, (_, proto, closing, _) in enumerate(CLASSES):
        store.put(record(rule4(), proto=proto, closing=closing, i=i))
    clock.advance(31.0)                      # past closing (10) and udp (30), not other (45) or tcp
    assert store.expire() == 2
    assert sorted(r.key for r in store.records()) == sorted([key(TCP, 0), key(ICMP, 3)])
    assert len(store) == 2


def test_an_expired_flow_is_gone_for_every_reader(store, clock):
    """Once its idle timeout passed, the flow ended: before and after expire()
    runs, a record of it (of any version) is new state, not a stale one."""
    store.put(record(rule4(5)))
    clock.advance(TIMEOUTS["tcp_idle"])
    older = record(rule4(0), BACKEND_B)
    assert store.get(older.key) is None
    assert store.is_stale(older) is False
    assert store.put(older) is True
    assert held(store, key()) == (BACKEND_B, rule4(0), False)


def test_records_report_idle_time_as_of_now(store, clock):
    seen_half_a_second_ago = record(rule4(), idle_ms=500)
    store.put(seen_half_a_second_ago)
    clock.advance(2.0)
    [now] = store.records()
    assert (now.key, now.backend, now.version, now.closing) == (
        seen_half_a_second_ago.key, seen_half_a_second_ago.backend,
        seen_half_a_second_ago.version, False)
    assert now.idle_ms == 2500
    store.put(record(rule4(), idle_ms=0))    # a sign of life
    assert [r.idle_ms for r in store.records()] == [0]
