"""The native packet-rate runner works: the fast path it measures forwards
every packet from the flow cache and loses none (rates are bench/'s business)."""
from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

RUNNER = pathlib.Path(__file__).resolve().parent.parent / "build" / "pylb_rate"


@pytest.mark.dpdk
@pytest.mark.parametrize("mode,encap", [("io", "ipip"), ("lb", "ipip"), ("lb", "vxlan")])
def test_rate_runner(mode, encap):
    r = subprocess.run([str(RUNNER), "--mode", mode, "--encap", encap, "--flows", "5000",
                        "--seconds", "0.3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["packets"] > 0 and result["drops"] == 0
    if mode == "lb":
        # Warm-up cached every flow, so every measured packet is a cache hit.
        assert result["cache_hits"] >= result["packets"]
