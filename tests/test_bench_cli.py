"""`pylb bench` runs the whole suite (native runner and pytest-benchmark
suites) and writes results.json and the Markdown table; here a quick run into
a temporary directory, so bench/RESULTS.md is left alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pylb import bench

FIGURES = {"hit_ipip_100000", "hit_vxlan_100000", "syn_pushes_off", "syn_pushes_on",
           "pushes_python", "owner_misses", "owner_rtt", "cache_bytes", "store_bytes",
           "swap_lost", "swap_rebuild", "maglev_python", "dataplane_recompile", "scaling"}


@pytest.mark.dpdk
def test_quick_run_reports_every_figure_against_its_baseline(tmp_path):
    md = tmp_path / "RESULTS.md"
    # Every CPU of the machine: this test process's EAL pinned it to one.
    r = subprocess.run([sys.executable, "-m", "pylb.cli", "bench", "--quick", "--out",
                        str(tmp_path), "--results-md", str(md)],
                       capture_output=True, text=True, timeout=280, cwd=bench.ROOT,
                       preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[1/" in r.stdout and "wrote" in r.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    figures = {f["key"]: f for f in results["figures"]}
    expected = FIGURES if (os.cpu_count() or 1) >= 2 else FIGURES - {"scaling"}
    assert expected <= set(figures)
    for key in expected:
        f = figures[key]
        assert f["value"] is not None and f["baseline"], f
        assert f["ratio"] is not None, f
    # Targets that hold on any machine: no packet lost in a swap, 64-byte entries.
    assert figures["swap_lost"]["met"] is True
    assert figures["cache_bytes"]["met"] is True
    text = md.read_text()
    assert "| figure | value | baseline (same run) | ratio | target | met |" in text
    assert text.count("\n| ") >= len(expected) + 1


def test_the_table_says_missed_and_met():
    figs = [bench.Figure("a", "A", 12.0, "Mpps", 300.0, "io", 0.04,
                         target_parts=[(">= 15 Mpps", False)], note="memory bound"),
            bench.Figure("b", "B", 64.0, "bytes", 40.0, "key", 1.6,
                         target_parts=[("<= 64 bytes", True)]),
            bench.Figure("c", "C", 2.5, "ms"),
            bench.Figure("d", "D", 17.0, "Mpps", 290.0, "io", 0.06,
                         target_parts=[(">= 15 Mpps", True), (">= 0.25 of io", False)]),
            bench.Figure("e", "E", 0, "packets", 10**6, "sent", 0.0, baseline_unit="frames",
                         target_parts=[("0 lost", True)])]
    meta = {"when": "now", "quick": False, "seconds": 1.0, "load_start": (0.0, 0.0, 0.0),
            "machine": {"cpu": "cpu", "cores": 2, "kernel": "k", "python": "3",
                        "git": "abc", "load_average": (0.0, 0.0, 0.0)}}
    text = bench.markdown(figs, meta)
    assert "| A | 12.00 Mpps | 300.0 Mpps: io | 0.0400 | >= 15 Mpps | **missed** |" in text
    assert "| B | 64.00 bytes | 40.00 bytes: key | 1.60 | <= 64 bytes | met |" in text
    assert "| C | 2.50 ms | - | - | - |  |" in text
    assert ("| D | 17.00 Mpps | 290.0 Mpps: io | 0.0600 | >= 15 Mpps and >= 0.25 of io | "
            "**missed** (>= 15 Mpps: met; >= 0.25 of io: missed) |") in text
    assert "| E | 0 packets | 1,000,000 frames: sent | 0.0000 | 0 lost | met |" in text
    assert "- **A**: memory bound" in text
