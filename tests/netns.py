"""Network namespaces for tests: the reusable core lives in pylb.netns (the lab
uses it too); this module adds only what is about pytest."""
from __future__ import annotations

import os
import shutil

import pytest

from pylb.netns import *  # noqa: F401,F403 - the tests' single import point
from pylb.netns import Topology


def require_netns() -> None:
    """Skips, saying why, where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespace tests need iproute2's ip")


def topology() -> Topology:
    require_netns()
    return Topology()
