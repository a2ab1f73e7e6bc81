"""Rebuilding a VIP's Maglev table of 1,000 backends (65,537 buckets): the
shim's build, and the whole recompile a configuration change costs (tables,
backend ids, the C block). Baseline from the same run: the Python reference
build of the same table (pylb/maglev.py), which must agree entry for entry."""
from __future__ import annotations

import time

from pylb import config as config_mod
from pylb import maglev
from pylb.dataplane import Dataplane

BACKENDS = 1000
SIZE = maglev.DEFAULT_SIZE


def _backends() -> list[maglev.Backend]:
    return [maglev.Backend(f"backend-{i}", 1 + i % 3) for i in range(BACKENDS)]


def test_maglev_rebuild_1000_backends(benchmark):
    backends = _backends()
    table = benchmark(maglev.build_table_native, backends, SIZE)
    t0 = time.perf_counter()
    reference = maglev.build_table(backends, SIZE)
    python_s = time.perf_counter() - t0
    assert reference == table
    benchmark.extra_info.update({"backends": BACKENDS, "table_size": SIZE,
                                 "python_reference_s": python_s})


def test_dataplane_recompile_1000_backends(benchmark):
    cfg = config_mod.parse({
        "balancer": {"name": "bench", "data": {"device": "ring:bench", "address_v4": "203.0.113.1",
                                               "gateway_v4": "203.0.113.254"}},
        "vips": [{"name": "web", "address": "192.0.2.10", "protocol": "tcp", "port": 80,
                  "backends": [{"name": f"backend-{i}",
                                "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
                               for i in range(BACKENDS)]}],
    }, "bench")

    def compile_once():
        Dataplane(cfg, 1).close()

    benchmark.pedantic(compile_once, rounds=5, iterations=1)
    benchmark.extra_info.update({"backends": BACKENDS})
