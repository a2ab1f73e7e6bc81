"""The mission: under balancer and backend churn, no established flow breaks
and no packet is lost with state exchange on; with it off (each balancer with
its local cache only, as Maglev and Katran do) flows break where hashing
alone cannot keep them."""
from __future__ import annotations

import pytest

from pylb import scenarios

FLOWS = 1500


@pytest.fixture(scope="module")
def results(eal):
    return {(name, exchange): scenarios.run(name, exchange, FLOWS, seed=3)
            for name in scenarios.SCENARIOS for exchange in (True, False)}


@pytest.mark.dpdk
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_no_flow_breaks_and_nothing_is_lost_with_state_exchange(results, name):
    r = results[(name, True)]
    assert (r.broken, r.lost) == (0, 0), r.counters


@pytest.mark.dpdk
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_without_state_exchange_flows_break_where_hashing_alone_fails(results, name):
    r = results[(name, False)]
    assert r.lost == 0
    assert r.state_entries == 0
    if name in scenarios.HASHING_ALONE_SUFFICES:
        assert r.broken == 0
    else:
        assert r.broken > 0


@pytest.mark.dpdk
def test_state_is_kept_only_where_needed(results):
    # Consistent hashing keeps flows that only move between balancers: no state.
    assert results[("moved to another balancer", True)].state_entries == 0
    # Elsewhere state exists for flows of moved buckets only: at owner and
    # backup, plus copies a former holder keeps until a handoff's transition ends.
    for name in scenarios.SCENARIOS:
        r = results[(name, True)]
        assert r.state_entries <= 3 * r.moved_flows, (name, r.state_entries, r.moved_flows)
        assert (r.state_entries > 0) == (r.moved_flows > 0)
