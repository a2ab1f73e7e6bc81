"""The native packet-rate runner works: in every mode the packets it measures
take the path the mode names, and none is lost (rates are bench/'s business)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

BUILD = pathlib.Path(os.environ.get("PYLB_BUILD_DIR") or
                     pathlib.Path(__file__).resolve().parent.parent / "build")
RUNNER = BUILD / "pylb_rate"
SHORT = ["--slices", "2", "--slice-ms", "30"]


def all_cpus() -> None:
    """In the runner: every CPU of the machine. This test process's EAL pinned
    it to one, and a child would inherit that."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def run(*args: str) -> dict:
    r = subprocess.run([str(RUNNER), *args], capture_output=True, text=True, timeout=120,
                       preexec_fn=all_cpus)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.dpdk
@pytest.mark.parametrize("encap", ["ipip", "vxlan", "gue"])
def test_fastpath_forwards_every_measured_packet_from_the_cache(encap):
    # A cache of 8x the flows: every set has room, so every flow was cached
    # during the warm-up (at 2x a few sets overflow; bench/README.md).
    result = run("--mode", "fastpath", "--encap", encap, "--flows", "5000",
                 "--capacity", "40000", *SHORT)
    assert result["lost"] == 0
    io, hit = result["steps"]["io"], result["steps"][encap]
    assert io["mpps"] > 0 and hit["mpps"] > 0
    c = hit["counters"]
    assert c["rx"] > 0 and c["fwd_cache_hit"] == c["rx"] == c["tx_ok"]
    assert c["drop_total"] == 0
    assert result["cache"]["bytes_per_entry"] == 64


@pytest.mark.dpdk
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two workers need two cores")
def test_two_workers_share_one_flow_cache():
    result = run("--mode", "fastpath", "--workers", "2", "--encap", "ipip", "--flows", "4000",
                 "--capacity", "32000", *SHORT)
    assert result["lost"] == 0 and result["workers"] == 2 and result["scaling"] > 0
    one, two = result["steps"]["ipip_1"], result["steps"]["ipip"]
    assert (one["lanes"], two["lanes"]) == (1, 2)
    for step in (one, two):
        c = step["counters"]
        assert c["fwd_cache_hit"] == c["rx"] > 0 and c["drop_total"] == 0


@pytest.mark.dpdk
def test_syn_path_makes_a_new_flow_of_every_packet_and_notices_only_when_moved():
    # A flow space far larger than what passes in a slice: no flow comes back
    # while its entry lives; room for all that live at once (a few ms worth).
    result = run("--mode", "syn", "--flows", "4000000", "--capacity", "1048576", *SHORT)
    assert result["lost"] == 0
    off, on = result["steps"]["pushes_off"]["counters"], result["steps"]["pushes_on"]["counters"]
    for c in (off, on):
        assert c["rx"] > 0 and c["fwd_new"] == c["cache_insert"] == c["rx"]
        assert c["drop_total"] == c["cache_full"] == c["notices_lost"] == 0
    assert off["notices"] == 0
    assert on["notices"] == on["rx"]


@pytest.mark.dpdk
def test_tables_swapped_under_load_lose_no_packet():
    result = run("--mode", "swap", "--flows", "5000", "--backends", "100", "--seconds", "0.3",
                 "--swap-ms", "5")
    assert result["swaps"] > 5
    assert result["lost"] == 0
    c = result["counters"]
    assert c["drop_total"] == 0 and c["held_now"] == 0
    # Packets of moved buckets were held, answered, and forwarded.
    assert c["held"] == c["fwd_verdict"] == result["held_answered"] > 0
    assert c["rx"] == c["fwd_cache_hit"] + c["fwd_table"] + c["fwd_verdict"] == c["tx_ok"]
