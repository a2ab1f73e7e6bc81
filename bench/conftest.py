"""Fixtures of the Python-level benchmarks. These run by `pylb bench` or by
their own invocation (`.venv/bin/python -m pytest bench`); the test suite
collects tests/ only (pyproject.toml: testpaths)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def eal():
    """DPDK's EAL, once per benchmark process."""
    from pylb.eal import Eal, eal_args

    with Eal(eal_args()) as running:
        yield running
