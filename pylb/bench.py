"""`pylb bench`: runs the benchmark suite and reports every figure against a
baseline measured in the same run (bench/README.md says which and why).

Two halves: the native runner (build/pylb_rate) for packet rates, and the
pytest-benchmark suites in bench/ for the Python-level pieces, run in their
own pytest process. Writes bench/out/results.json (everything measured) and
regenerates bench/RESULTS.md (the table), which is never edited by hand.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from pylb.errors import PylbError

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
FLOW_COUNTS = (1_000, 100_000, 1_000_000, 10_000_000)
QUICK_FLOW_COUNTS = (1_000, 100_000)
LOOKUP_FLOW_COUNTS = (1_000_000, 10_000_000)
LOOKUP_QUICK_FLOW_COUNTS = (100_000,)
SYN_FLOW_SPACE = 1 << 24        # the runner's largest: no flow comes back while it lives
SYN_CACHE = 1 << 21
MIB = 1 << 20


class BenchError(PylbError):
    """A benchmark could not run (runner missing, a run failed)."""


@dataclass
class Figure:
    """One row of RESULTS.md."""

    key: str
    title: str
    value: float | None
    unit: str
    baseline: float | None = None       # measured in the same run
    baseline_what: str = ""
    ratio: float | None = None          # value / baseline, or as `ratio_what` says
    ratio_what: str = "value / baseline"
    target: str = ""                    # "" when the issue sets none
    met: bool | None = None             # None when there is no target
    note: str = ""
    baseline_unit: str | None = None    # None: the value's unit
    # A target of several parts: (text, met) each; target and met follow.
    target_parts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target_parts:
            self.target = " and ".join(text for text, _ in self.target_parts)
            self.met = all(ok for _, ok in self.target_parts)


@dataclass
class Run:
    name: str
    args: list[str]
    describe: str
    result: dict = field(default_factory=dict)
    seconds: float = 0.0


def runner_path() -> pathlib.Path:
    build = os.environ.get("PYLB_BUILD_DIR")
    return (pathlib.Path(build) if build else ROOT / "build") / "pylb_rate"


def native_plan(quick: bool) -> list[Run]:
    slices = ["--slices", "3" if quick else "10", "--slice-ms", "60" if quick else "100"]
    runs = [Run(f"fastpath_{n}", ["--mode", "fastpath", "--flows", str(n), "--encap", "ipip,vxlan",
                                  *slices],
                f"fast path, {n:,} flows: io-forward, IPIP, VXLAN")
            for n in (QUICK_FLOW_COUNTS if quick else FLOW_COUNTS)]
    if len(os.sched_getaffinity(0)) >= 2:
        runs.append(Run("workers", ["--mode", "fastpath", "--workers", "2", "--flows", "100000",
                                    "--encap", "ipip", *slices],
                        "scaling: 1 and 2 workers on one shared flow cache, 100,000 flows"))
    flow_space = 1 << 22 if quick else SYN_FLOW_SPACE
    runs.append(Run("syn", ["--mode", "syn", "--flows", str(flow_space), "--capacity",
                            str(SYN_CACHE), *slices],
                    "new flows on the SYN path, state notices off and on"))
    runs.append(Run("swap", ["--mode", "swap", "--backends", "1000", "--flows", "100000",
                             "--seconds", "0.3" if quick else "1.5", "--swap-ms", "10"],
                    "table swap under load: 1,000 backends, a new table every 10 ms"))
    for n in (LOOKUP_QUICK_FLOW_COUNTS if quick else LOOKUP_FLOW_COUNTS):
        runs.append(Run(f"lookup_{n}", ["--mode", "lookup", "--flows", str(n), *slices],
                        f"flow cache alone, {n:,} flows: bursts of 32 against single lookups"))
    return runs


def run_native(run: Run, runner: pathlib.Path) -> dict:
    t0 = time.monotonic()
    r = subprocess.run([str(runner), *run.args], capture_output=True, text=True, timeout=600)
    run.seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"{runner.name} {' '.join(run.args)}: exit {r.returncode}: "
                         f"{r.stderr.strip()[-500:]}")
    try:
        run.result = json.loads(r.stdout)
    except json.JSONDecodeError as err:
        raise BenchError(f"{runner.name} {' '.join(run.args)}: no JSON ({err})") from None
    return run.result


def _native_summary(run: Run) -> str:
    r = run.result
    if r.get("mode") == "lookup":
        return (f"{r['single_ns']:.0f} ns one at a time, {r['burst_ns']:.0f} ns in bursts "
                f"(x{r['ratio']:.2f})")
    if r.get("mode") == "swap":
        return (f"{r['swaps']} swaps, {r['lost']} lost of {r['packets_while_swapping']:,}; "
                f"rebuild {r['rebuild_ms']['median']:.2f} ms")
    steps = r.get("steps", {})
    io = steps.get("io", {}).get("mpps", 0)
    parts = [f"{name} {s['mpps']:.2f} Mpps ({s['ratio']:.3f} of io)"
             for name, s in steps.items() if name != "io"]
    return f"io {io:.1f} Mpps; " + ", ".join(parts)


def _quiet_cpu() -> None:
    """In the benchmark process: only the last CPU this process may use. The
    EAL takes the first allowed CPU (pylb.eal.eal_args), and pylb's other
    processes (tests, balancers) take the first CPU of the machine, so on a
    shared machine the last one is the quieter (the native runner does the
    same, bench/README.md)."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {allowed[-1]})


def run_python(out_dir: pathlib.Path, quick: bool, echo: Callable[[str], None]) -> dict:
    """The pytest-benchmark suites, in their own process (one EAL per process)."""
    out = out_dir / "pytest-benchmark.json"
    env = dict(os.environ)
    if quick:
        env["PYLB_BENCH_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}", "--benchmark-columns=median,min,max,rounds",
           "--benchmark-sort=name"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_quiet_cpu)
    tail = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        # Progress and outcomes, not the balancers' logs.
        if line.startswith(("bench/", "FAILED", "ERROR")) or " passed" in line or \
                " failed" in line or line.startswith("test_") or "%]" in line:
            echo(f"    {line}")
    if proc.wait() != 0:
        raise BenchError("the Python benchmarks failed:\n" + "\n".join(tail))
    data = json.loads(out.read_text())
    return {b["name"]: b for b in data["benchmarks"]}


# ---------------------------------------------------------------- figures

def _ratio(a, b):
    return a / b if a is not None and b else None


def _size(n: int) -> str:
    return f"{n / MIB:,.0f} MiB" if n >= MIB else f"{n / 1024:,.0f} KiB"


def _fastpath_figures(runs: dict[str, Run]) -> list[Figure]:
    figs = []
    for n in FLOW_COUNTS:
        run = runs.get(f"fastpath_{n}")
        if run is None:
            continue
        r, steps = run.result, run.result["steps"]
        io = steps["io"]["mpps"]
        for encap in ("ipip", "vxlan"):
            s = steps[encap]
            c = s["counters"]
            hit = c["fwd_cache_hit"] / c["rx"] if c["rx"] else 0
            parts = []
            if n == 100_000:
                parts = [(">= 15 Mpps", s["mpps"] >= 15), (">= 0.25 of io", s["ratio"] >= 0.25)]
            elif n == 10_000_000:
                parts = [(">= 8 Mpps", s["mpps"] >= 8)]
            note = (f"{1e3 / s['mpps']:.0f} ns/packet; best slice {s['mpps_best']:.2f} Mpps; "
                    f"{100 * hit:.2f}% cache hits; flow cache "
                    f"{_size(r['cache']['footprint_bytes'])}"
                    f"{' on hugepages' if r['hugepages'] else ' WITHOUT hugepages'}")
            figs.append(Figure(f"hit_{encap}_{n}", f"Hit path, {encap.upper()}, {n:,} flows",
                               s["mpps"], "Mpps", io, "io-forward, same harness",
                               s["ratio"], "median of per-slice ratios", note=note,
                               target_parts=parts))
    return figs


def _lookup_figures(runs: dict[str, Run]) -> list[Figure]:
    figs = []
    for name, run in runs.items():
        if not name.startswith("lookup_"):
            continue
        r = run.result
        figs.append(Figure(
            f"lookup_{r['flows']}", f"Flow cache lookups, bursts of 32, {r['flows']:,} flows",
            r["burst_mlookups"], "M/s", r["single_mlookups"], "one at a time",
            r["ratio"], "median of per-slice ratios",
            note=f"{r['burst_ns']:.0f} ns against {r['single_ns']:.0f} ns per lookup (building "
                 f"the key and flow id included); table {_size(r['footprint_bytes'])}; "
                 f"{100 * r['hit_fraction']:.2f}% hits"))
    return figs


def _workers_figure(runs: dict[str, Run]) -> list[Figure]:
    run = runs.get("workers")
    if run is None:
        return [Figure("scaling", "Hit path, 2 workers vs 1, 100,000 flows", None, "Mpps",
                       note="skipped: this machine has one core")]
    s = run.result["steps"]
    two, one, io = s["ipip"], s["ipip_1"], s["io"]
    return [Figure("scaling", "Hit path, 2 workers (one shared flow cache), 100,000 flows",
                   two["mpps"], "Mpps", one["mpps"], "1 worker",
                   run.result["scaling"], "median of per-slice ratios (ideal 2.0)",
                   note=f"io-forward on 2 lanes {io['mpps']:.0f} Mpps; the 2-worker hit path is "
                        f"{two['ratio']:.3f} of it; both cores are shared with other tenants")]


def _syn_figures(runs: dict[str, Run], py: dict) -> list[Figure]:
    figs = []
    run = runs.get("syn")
    if run is not None:
        s = run.result["steps"]
        io = s["io"]["mpps"]
        for key, label in (("pushes_off", "off"), ("pushes_on", "on")):
            st = s[key]
            c = st["counters"]
            on = key == "pushes_on"
            figs.append(Figure(
                f"syn_{key}", f"New flows/s per core, SYN path, state pushes {label} (C fast path)",
                st["mpps"] * 1e6, "flows/s", io * 1e6, "io-forward, same harness",
                st["ratio"], "median of per-slice ratios", baseline_unit="packets/s",
                target_parts=[(">= 1,000,000 flows/s", st["mpps"] >= 1.0)] if on else [],
                note=(f"every bucket moved: {c['notices']:,} notices for {c['rx']:,} new flows, "
                      f"handed to the Python worker, which makes the pushes (next row)") if on
                else f"each SYN cached (track all), no notice; {c['cache_full']:,} refused"))
    bench = py.get("test_state_pushes")
    if bench is not None:
        x = bench["extra_info"]
        figs.append(Figure(
            "pushes_python", "State pushes/s per Python worker (notice to owner and backup store)",
            x["pushes_per_worker_s"], "flows/s", x["plain_syns_per_worker_s"],
            "SYNs of stable buckets per worker-second, same harness",
            _ratio(x["pushes_per_worker_s"], x["plain_syns_per_worker_s"]),
            target_parts=[(">= 1,000,000 new flows/s with pushes on (end to end)",
                           x["pushes_per_worker_s"] >= 1e6)],
            note="with every new flow in a moved bucket, this bounds new flows/s end to end; "
            "Python builds, authenticates and sends each record (bench/README.md)"))
    return figs


def _miss_figures(py: dict) -> list[Figure]:
    figs = []
    b = py.get("test_owner_resolved_misses")
    if b is not None:
        x = b["extra_info"]
        figs.append(Figure(
            "owner_misses", "Owner-resolved misses/s per Python worker",
            x["misses_per_worker_s"], "misses/s", x["hits_per_worker_s"],
            "cache hits per worker-second, same flows, same harness",
            _ratio(x["misses_per_worker_s"], x["hits_per_worker_s"]), baseline_unit="packets/s",
            target_parts=[(">= 200,000 misses/s", x["misses_per_worker_s"] >= 200_000)],
            note=f"asker and owner Python work per miss (both roles, as every worker plays "
                 f"both); {x['misses_per_wall_s']:,.0f}/s through the whole one-thread harness"))
    b = py.get("test_owner_round_trip")
    if b is not None:
        rtt, one = b["stats"]["median"], b["extra_info"]["one_way_median_s"]
        figs.append(Figure(
            "owner_rtt", "Owner round trip: first packet to cached answer", rtt * 1e6, "us",
            one * 1e6, "one cached packet to its backend, same harness", _ratio(rtt, one),
            "value / baseline",
            note="three balancers on one thread: the time includes their polls and the "
                 "harness carrying frames between them"))
    return figs


def _memory_figures(runs: dict[str, Run], py: dict) -> list[Figure]:
    figs = []
    b = py.get("test_flow_cache_memory_per_flow")
    if b is not None:
        x = b["extra_info"]
        figs.append(Figure(
            "cache_bytes", "Memory per cached flow (flow cache entry)", x["bytes_per_entry"],
            "bytes", x["key_bytes"], "the 40-byte flow key",
            _ratio(x["bytes_per_entry"], x["key_bytes"]),
            target_parts=[("<= 64 bytes", x["bytes_per_entry"] <= 64)],
            note="one cache line: key, flow id, backend, last seen, seqlock"))
    run = runs.get(f"fastpath_{10_000_000}")
    if run is not None:
        r = run.result
        c = r["steps"]["ipip"]["counters"]
        fits = r["lost"] == 0 and c["rx"] > 0 and c["fwd_cache_hit"] >= 0.99 * c["rx"]
        figs.append(Figure(
            "ten_million", "10M flows in the flow cache (bytes provisioned per flow)",
            r["cache"]["bytes_per_flow"], "bytes", r["cache"]["bytes_per_entry"],
            "bytes per entry", _ratio(r["cache"]["bytes_per_flow"], r["cache"]["bytes_per_entry"]),
            "value / baseline (1 / load)", target_parts=[("10M flows fit", fits)],
            note=f"{r['cache']['footprint_bytes'] / MIB:,.0f} MiB for 10M flows (capacity "
            f"{r['cache']['capacity']:,}, load {r['cache']['load']:.2f}: sets are a power of "
            f"two); {100 * c['fwd_cache_hit'] / max(c['rx'], 1):.2f}% of packets hit"))
    b = py.get("test_owner_store_memory_per_record")
    if b is not None:
        x = b["extra_info"]
        figs.append(Figure(
            "store_bytes", "Memory per flow in the owners' store (Python, tracemalloc)",
            x["bytes_per_record"], "bytes", x["dict_bytes_per_entry"],
            "a dict of the same 40-byte keys to an int", _ratio(x["bytes_per_record"],
                                                               x["dict_bytes_per_entry"]),
            "value / baseline",
            note=f"10M records would take {x['ten_million_bytes'] / (1 << 30):.1f} GiB; owners "
                 f"hold only flows of moved buckets (owner and backup copies)"))
    return figs


def _swap_figures(runs: dict[str, Run], py: dict) -> list[Figure]:
    figs = []
    run = runs.get("swap")
    if run is not None:
        r = run.result
        lost = r["lost"] + r["counters"]["drop_total"]
        figs.append(Figure(
            "swap_lost", "Table swap under load: packets lost", lost, "packets",
            r["packets_while_swapping"], "packets sent while swapping",
            _ratio(lost, r["packets_while_swapping"]), target_parts=[("0 lost", lost == 0)],
            note=f"{r['swaps']} swaps of a {r['backends']}-backend table every "
            f"{r['swap_interval_ms']:.0f} ms; {r['held_answered']:,} packets of moved buckets held and answered; swap in the "
            f"worker {r['swap_us']['median']:.1f} us median"))
        figs.append(Figure(
            "swap_rebuild", "Table rebuild, 1,000 backends, 65,537 buckets (C, during the swaps)",
            r["rebuild_ms"]["median"] + r["compile_ms"]["median"], "ms",
            r["rebuild_alone_ms"], "the same build with nothing else running",
            _ratio(r["rebuild_ms"]["median"] + r["compile_ms"]["median"], r["rebuild_alone_ms"]),
            "value / baseline",
            note=f"Maglev {r['rebuild_ms']['median']:.2f} ms + compile "
                 f"{r['compile_ms']['median']:.3f} ms (median); traffic during swaps "
                 f"{r['mpps_swapping']:.1f} Mpps vs {r['mpps_steady']:.1f} without"))
    b = py.get("test_maglev_rebuild_1000_backends")
    if b is not None:
        native, python = b["stats"]["median"], b["extra_info"]["python_reference_s"]
        figs.append(Figure(
            "maglev_python", "Maglev table from Python (pylb.maglev, native build), 1,000 backends",
            native * 1e3, "ms", python * 1e3, "the Python reference build, same table",
            _ratio(native, python), "value / baseline",
            note="weights 1-3; the reference agrees entry for entry"))
    b = py.get("test_dataplane_recompile_1000_backends")
    if b is not None and "test_maglev_rebuild_1000_backends" in py:
        whole = b["stats"]["median"]
        native = py["test_maglev_rebuild_1000_backends"]["stats"]["median"]
        figs.append(Figure(
            "dataplane_recompile", "Dataplane recompile from a configuration, 1,000 backends",
            whole * 1e3, "ms", native * 1e3, "the Maglev build alone",
            _ratio(whole, native), "value / baseline",
            note="what a configuration change costs the control loop before the swap"))
    return figs


def figures(runs: dict[str, Run], py: dict) -> list[Figure]:
    return (_fastpath_figures(runs) + _lookup_figures(runs) + _workers_figure(runs)
            + _syn_figures(runs, py)
            + _miss_figures(py) + _memory_figures(runs, py) + _swap_figures(runs, py))


# ---------------------------------------------------------------- output

def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        text = f"{v:,}"
    elif abs(v) >= 100_000:
        text = f"{v:,.0f}"
    elif abs(v) >= 100:
        text = f"{v:,.1f}"
    elif abs(v) >= 1:
        text = f"{v:.2f}"
    else:
        text = f"{v:.4f}"
    return f"{text} {unit}".strip()


def machine() -> dict:
    model = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", ""
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "git": rev + ("+changes" if dirty else ""),
            "load_average": os.getloadavg()}


def markdown(figs: list[Figure], meta: dict) -> str:
    m = meta["machine"]
    head = [
        "# Benchmark results",
        "",
        "Generated by `pylb bench` (bench/README.md): do not edit, run it again.",
        "",
        f"- when: {meta['when']}, {meta['seconds']:.0f} s{' (quick run)' if meta['quick'] else ''}",
        f"- machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}",
        f"- load average at start / end: {' '.join(f'{x:.2f}' for x in meta['load_start'])} / "
        f"{' '.join(f'{x:.2f}' for x in m['load_average'])} (the machine is shared: ratios to "
        "same-run baselines are the figures to compare, absolute rates are context)",
        f"- code: {m['git'] or 'unknown'}",
        "",
        "| figure | value | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for f in figs:
        met = "" if f.met is None else ("met" if f.met else "**missed**")
        if len(f.target_parts) > 1 and not f.met:
            met += " (" + "; ".join(f"{text}: {'met' if ok else 'missed'}"
                                    for text, ok in f.target_parts) + ")"
        base = (f"{_fmt(f.baseline, f.baseline_unit or f.unit)}: {f.baseline_what}"
                if f.baseline is not None else "-")
        rows.append(f"| {f.title} | {_fmt(f.value, f.unit)} | {base} | {_fmt(f.ratio)} | "
                    f"{f.target or '-'} | {met} |")
    notes = ["", "## Notes", ""]
    notes += [f"- **{f.title}**: {f.note} (ratio: {f.ratio_what})" for f in figs if f.note]
    return "\n".join(head + rows + notes) + "\n"


def run(out_dir: pathlib.Path | None = None, results_md: pathlib.Path | None = None,
        quick: bool = False, native: bool = True, python: bool = True,
        echo: Callable[[str], None] = print) -> list[Figure]:
    out_dir = out_dir or BENCH_DIR / "out"
    results_md = results_md or BENCH_DIR / "RESULTS.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    meta = {"when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": quick, "load_start": os.getloadavg()}
    runs: dict[str, Run] = {}
    plan = native_plan(quick) if native else []
    total = len(plan) + (1 if python else 0)
    if plan:
        runner = runner_path()
        if not runner.exists():
            raise BenchError(f"{runner} is missing: build it with ./scripts/setup.sh")
        for i, r in enumerate(plan, 1):
            echo(f"[{i}/{total}] {r.describe} ...")
            run_native(r, runner)
            runs[r.name] = r
            echo(f"      {_native_summary(r)}  ({r.seconds:.1f} s)")
    py = {}
    if python:
        echo(f"[{total}/{total}] Python-level benchmarks (pytest-benchmark, bench/) ...")
        py = run_python(out_dir, quick, echo)
    figs = figures(runs, py)
    meta["seconds"] = time.monotonic() - t0
    meta["machine"] = machine()
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta, "figures": [asdict(f) for f in figs],
        "native": {name: {"args": r.args, "seconds": r.seconds, "result": r.result}
                   for name, r in runs.items()},
        "python": {name: {"stats": b["stats"], "extra_info": b["extra_info"]}
                   for name, b in py.items()},
    }, indent=2) + "\n")
    results_md.write_text(markdown(figs, meta))
    echo(f"wrote {out_dir / 'results.json'} and {results_md} ({meta['seconds']:.0f} s)")
    return figs
