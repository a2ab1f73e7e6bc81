"""A balancer with several worker processes (balancer.workers, pylb/lanes.py):
worker 0 the DPDK primary, the others secondaries on their own cores and
queues, sharing the flow cache and splitting by flow what needs Python. The
cluster scenarios keep every flow with lb1 running two workers; the work is
really split; a dying worker stops the balancer; nothing is left behind.

Each case runs in a process of its own (tests/workers_support.py): this
process's EAL runs --in-memory, worker processes need one started for several."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pylb import config as config_mod
from pylb import scenarios
from pylb.balancer import _lane_role
from pylb.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "workers_support.py"

# Taken at collection, before the session's EAL pins this process to one core.
ALLOWED = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="two worker processes need two cores")


def hugepage_files(prefix: str) -> list[str]:
    return [str(p) for p in pathlib.Path("/dev/hugepages").glob(f"{prefix}*")] + \
        [str(p) for p in pathlib.Path("/var/run/dpdk").glob(prefix)]


def run_support(*args: str, prefix: str, timeout: float = 300) -> dict:
    # Unique to this run: the same prefix in another checkout's test run at
    # the same time would be joined, and its files removed below.
    prefix = f"{prefix}-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run([sys.executable, str(SUPPORT), *args, prefix], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT,
                              preexec_fn=lambda: os.sched_setaffinity(0, ALLOWED))
    finally:
        # The primary removes its files as it ends; a crash must not leave them.
        left = hugepage_files(prefix)
        subprocess.run(["rm", "-rf", *left], check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not left, f"left behind: {left}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scenario_results():
    return run_support("scenarios", "1200", prefix="pylb-tw-scen")


@pytest.mark.dpdk
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_no_flow_breaks_with_a_balancer_of_two_workers(scenario_results, name):
    r = scenario_results[f"{name}|True"]
    assert (r["broken"], r["lost"]) == (0, 0), r
    assert r["state_entries"] <= 3 * r["moved_flows"]


@pytest.mark.dpdk
@pytest.mark.parametrize("name", sorted(set(scenarios.SCENARIOS) - scenarios.HASHING_ALONE_SUFFICES))
def test_without_exchange_flows_still_break_with_two_workers(scenario_results, name):
    # The baseline is the same with workers: the exchange, not the workers, keeps flows.
    r = scenario_results[f"{name}|False"]
    assert r["lost"] == 0 and r["broken"] > 0, r


@pytest.fixture(scope="module")
def lanes():
    return run_support("lanes", "1000", prefix="pylb-tw-lanes")


@pytest.mark.dpdk
def test_both_workers_carry_traffic_and_split_the_miss_path(lanes):
    assert (lanes["broken"], lanes["lost"]) == (0, 0)
    w0, w1 = lanes["worker0"], lanes["workers"][0]
    for w in (w0, w1):
        # Its own queue's traffic, hits in the shared cache, and misses of
        # its lane's flows, some of them handed over by the other worker.
        assert w["rx"] > 500 and w["fwd_cache_hit"] > 300
        assert w["held"] > 50 and w["lane_in"] > 20 and w["lane_out"] > 20
        assert w["notices"] > 50 and w["notices_lane_in"] > 20
        assert w["drop_total"] == w["drop_no_vip"] and w["drop_lane_full"] == 0
    # What one handed over, the other took.
    assert w0["lane_out"] == w1["lane_in"] and w1["lane_out"] == w0["lane_in"]
    assert w0["notices_lane_out"] == w1["notices_lane_in"]
    # Both asked owners, and both got state for their own flows only.
    assert lanes["cluster0"]["requests_sent"] > 10
    assert lanes["clusters"][0]["counters"]["requests_sent"] > 10
    assert lanes["peer0"]["wrong_lane"] == 0 and lanes["clusters"][0]["peer"]["wrong_lane"] == 0
    assert lanes["peer0"]["replayed"] == 0 and lanes["clusters"][0]["peer"]["replayed"] == 0
    # Traffic for no VIP goes to worker 0, whichever queue it came to.
    assert w0["drop_no_vip"] == lanes["stray"] and w1["drop_no_vip"] == 0
    assert w1["rx"] + w0["rx"] >= lanes["stray"]
    # Summed over the workers, every frame has one outcome.
    assert lanes["equations"] == []
    ids = [w["id"] for w in lanes["snapshot_workers"]]
    assert ids == [0, 1] and lanes["snapshot_workers"][1]["pid"] > 0


@pytest.mark.dpdk
def test_punts_by_reason_count_every_workers_punts(lanes):
    # Every punt is a held packet or a notice, whichever worker took it: the
    # status' and the metrics' punts sum the workers' as the counters do.
    total = lanes["total"]
    punts = {k: v for k, v in lanes["snapshot_punts"].items() if k != "failed"}
    assert sum(punts.values()) == total["held"] + total["notices"], (punts, total)


@pytest.mark.dpdk
def test_retire_previous_asks_every_worker_and_retires_at_once(lanes):
    # As with one worker: the call retires what may be retired now (it waits
    # for the other workers' answers rather than only asking them).
    assert lanes["retired_at_once"] > 0


@pytest.mark.dpdk
def test_a_joiner_with_two_workers_learns_the_tables_for_both():
    r = run_support("join", "600", prefix="pylb-tw-join")
    # Worker 0 learnt the members' stateful buckets and the other worker has them too.
    assert r["stateful"] == r["members_stateful"] > 0 and r["workers_stateful"] == [r["stateful"]]
    assert r["history"].get("history_answers_taken", 0) >= 1, r
    assert (r["broken"], r["lost"]) == (0, 0) and r["moved"] > 0, r


@pytest.mark.dpdk
def test_retirement_asks_every_worker_and_every_worker_follows():
    r = run_support("retire", "1000", prefix="pylb-tw-retire")
    assert r["retired"] > 0 and r["after"] < r["before"], r
    # The other worker runs the same tables: same generation, same stateful buckets.
    assert r["workers_after"] == [r["after"]] and r["workers_generation"] == [r["generation"]]
    assert (r["broken"], r["lost"]) == (0, 0), r


@pytest.mark.dpdk
@pytest.mark.parametrize("how, why", [("SIGKILL", "ended"), ("SIGSTOP", "has not reported")])
def test_a_worker_that_dies_or_hangs_stops_the_balancer(how, why):
    # Its queue would go unread: the balancer stops, a supervisor restarts it.
    r = run_support("kill", how, prefix="pylb-tw-kill", timeout=120)
    assert r["stopped"] is not None and "worker 1" in r["stopped"] and why in r["stopped"], r


def config(**balancer) -> config_mod.Config:
    return config_mod.parse({
        "balancer": {"name": "w", "data": {"device": "ring:w", "address_v4": "10.0.0.1"},
                     **balancer},
        "vips": [{"name": "web", "address": "192.0.2.1", "protocol": "tcp", "port": 80,
                  "backends": [{"name": "a", "address": "10.0.1.1"}]}]}, "test")


def test_one_worker_has_no_lanes():
    assert _lane_role(config(), None) is None


@pytest.mark.parametrize("cores", [[0, 1], [1, 1, 0]])
def test_more_workers_than_cores_is_refused(cores):
    with pytest.raises(ConfigError, match="one core per worker"):
        _lane_role(config(workers=3, dpdk={"cores": cores}), None)


@pytest.mark.parametrize("device,why", [("net_af_packet0,iface=veth0", "af_packet"),
                                        ("net_pcap0,rx_pcap=a,tx_pcap=b", "pcap")])
def test_ports_of_one_process_cannot_have_several_workers(device, why):
    c = config(workers=2, dpdk={"cores": [0, 1]})
    c = c.model_copy(update={"balancer": c.balancer.model_copy(update={
        "data": c.balancer.data.model_copy(update={"device": device})})})
    with pytest.raises(ConfigError, match=why):
        _lane_role(c, None)


def test_workers_need_an_eal_started_for_them(eal):
    # The test process's EAL runs --in-memory: no other process can join it.
    with pytest.raises(ConfigError, match="started the EAL for one"):
        _lane_role(config(workers=2, dpdk={"cores": [0, 1]}), eal)


def test_at_most_sixteen_workers():
    with pytest.raises(ConfigError):
        config(workers=17)


@pytest.mark.dpdk
@pytest.mark.parametrize("how", ["duration", "SIGINT", "SIGTERM"])
def test_pylb_run_with_two_workers_stops_cleanly_and_counts_every_frame(tmp_path, how):
    """`pylb run` on net_null with two workers: GET /v1/status lists both, it
    stops on the signal sent to its process group (as Ctrl-C, or a
    supervisor, does), the summary's frames are the port's and both workers
    received some, nothing is left."""
    import signal
    import time

    name = f"tw{os.getpid()}{how[-3:]}"
    (tmp_path / "lb.yaml").write_text(f"""
balancer:
  name: {name}
  workers: 2
  admin: {{socket: {tmp_path}/admin.sock}}
  data:
    device: "net_null_{name}"
    address_v4: 10.0.0.1
    gateway_v4: 10.0.0.254
    neighbors: [{{address: 10.0.0.254, mac: "02:00:00:00:00:fe"}}]
  flow_cache: {{capacity: 65536}}
vips:
  - {{name: web, address: 192.0.2.1, protocol: tcp, port: 80,
      backends: [{{name: a, address: 10.0.1.1}}]}}
""")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-c", "from pylb.cli import main; main()", "run", "--config",
            str(tmp_path / "lb.yaml")] + (["--duration", "6"] if how == "duration" else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, ALLOWED))
    prefix = f"pylb-{name}"
    try:
        from pylb.admin import Client
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = Client(str(tmp_path / "admin.sock"), timeout=2).request("GET", "/status")
                if len(status["workers"]) < 2 or status["workers"][1]["polls"] is None:
                    status = None
            except Exception:
                time.sleep(0.2)
        assert status is not None, proc.stderr.read() if proc.poll() is not None else "no status"
        assert [w["id"] for w in status["workers"]] == [0, 1]
        if how != "duration":
            os.killpg(proc.pid, getattr(signal, how))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = hugepage_files(prefix)
        subprocess.run(["rm", "-rf", *left], check=False)
    assert proc.returncode == 0, err[-3000:]
    assert not left, f"left behind: {left}"
    received = [int(line.split()[-1]) for line in out.splitlines()
                if line.startswith("received ")]
    assert len(received) == 2 and received[0] == received[1] > 0, out
    assert "Counter equations: all hold" in out
    table = out.split("\nWorkers\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [line.split() for line in table]
    # Each worker polled its own queue of the null port: both received frames.
    assert [r[0] for r in rows] == ["0", "1"] and all(int(r[2]) > 0 for r in rows), table
