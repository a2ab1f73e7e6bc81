"""Shared pytest fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture
def topology():
    """A pylb.netns.Topology: every namespace, veth, process and socket made
    through it is removed when the test ends, passed, failed or interrupted."""
    import netns

    with netns.topology() as topo:
        yield topo


@pytest.fixture(scope="session")
def eal():
    """DPDK's EAL, started once for the whole test process (DPDK allows one
    start per process) and cleaned up at the end, so no hugepage file stays."""
    from pylb.eal import Eal, eal_args

    with Eal(eal_args()) as running:
        yield running


@pytest.fixture
def ring_port_name(request):
    """A ring port name unique to the test."""
    import re

    return "ring:t" + re.sub(r"[^A-Za-z0-9]", "", request.node.name)[-18:]
