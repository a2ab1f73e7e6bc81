"""Draining a whole balancer: it tells the router (its withdraw command, no
more ARP answers for VIPs), leaves its cluster's ownership, goes on
forwarding every established flow to its backend, and ends once no VIP
packet has come for the quiet period; `pylb drain --wait` returns when the
process has exited cleanly (what systemd's ExecStop runs)."""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from live_support import (CLIENT_MAC, LB4, ROUTER_MAC, config_dict, deliveries, flows,
                          live_balancer, write_config)

from pylb import pcap
from pylb.admin import AdminError, wait_for_socket

pytestmark = pytest.mark.dpdk
ROOT = pathlib.Path(__file__).resolve().parent.parent
OTHER = "203.0.113.2"
BACKENDS = [{"name": f"web-{i}", "address": f"203.0.113.{10 + i}", "weight": 1}
            for i in (1, 2, 3)]


def frames(fl, kind):
    return [f.frames(ROUTER_MAC, CLIENT_MAC, [kind])[0] for f in fl]


def test_a_draining_balancer_keeps_its_flows_hands_off_and_ends(eal, tmp_path):
    data = config_dict("ring:drain1", BACKENDS, drain={"quiet_period": 0.6, "timeout": 30,
                                                       "withdraw": ["touch", str(tmp_path / "w")]})
    data["vips"][0]["answer_arp"] = True
    data["cluster"] = {"balancers": [{"name": "live", "address": LB4},
                                     {"name": "other", "address": OTHER}],
                       "handoff_period": 0.3}
    path = write_config(tmp_path / "lb.yaml", data)
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        api = live.client
        assert api.request("GET", "/ready") == {"ready": True}
        established = flows(200)
        backend_of = {k: v[0] for k, v in deliveries(live.send(frames(established, "S"))).items()}
        with pytest.raises(AdminError) as err:
            api.request("POST", "/drain", body={"undo": True})
        assert err.value.status == 409 and "not draining" in str(err.value)

        started = api.request("POST", "/drain", body={})
        assert started["state"] == "draining"
        with pytest.raises(AdminError) as err:
            api.request("GET", "/ready")
        assert err.value.status == 503
        status = api.request("GET", "/status")
        assert status["drain"]["state"] == "draining"
        assert list(status["cluster"]["members"]) == ["other"]   # ownership handed off
        assert api.request("GET", "/flows", query={"flow": str(established[0])})["owner"] == "other"

        # Traffic still comes: every established flow goes on to its backend,
        # and the drain waits.
        for _ in range(4):
            again = deliveries(live.send(frames(established, "PA")))
            assert {k: v[0] for k, v in again.items()} == backend_of
            time.sleep(0.2)
        assert api.request("GET", "/status")["drain"]["state"] == "draining"
        assert (tmp_path / "w").exists(), "the withdraw command did not run"

        # The router has moved the flows away: the balancer ends by itself.
        live.thread.join(timeout=10)
        assert not live.thread.is_alive(), "the drain did not end"
        assert live.lb.drain_state["state"] == "done"
        assert "no VIP packet" in live.lb.drain_state["detail"]


def _run_and_drain(tmp_path, name: str, drain: dict, **popen) -> tuple:
    """`pylb run` on the pcap example, then `pylb drain --wait` on it: the
    drain command's result and the balancer's exit status, stdout and stderr."""
    data = yaml.safe_load((ROOT / "examples" / "pcap.yaml").read_text())
    data["balancer"]["data"]["device"] = \
        f"net_pcap_{name},rx_pcap={tmp_path}/in.pcap,tx_pcap={tmp_path}/out.pcap"
    sock = str(tmp_path / "a.sock")
    data["balancer"]["admin"] = {"socket": sock}
    data["balancer"]["drain"] = drain
    data["balancer"]["dpdk"] = {**(data["balancer"].get("dpdk") or {}),
                                **popen.pop("dpdk", {})}
    (tmp_path / "lb.yaml").write_text(yaml.safe_dump(data))
    pcap.write(tmp_path / "in.pcap", [])
    proc = subprocess.Popen([sys.executable, "-m", "pylb.cli", "run", "--config",
                             str(tmp_path / "lb.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **popen)
    try:
        wait_for_socket(sock, 30)
        r = subprocess.run([sys.executable, "-m", "pylb.cli", "drain", "--socket", sock, "--wait",
                            "--timeout", "20"], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
        out, err = proc.communicate(timeout=20) if r.returncode == 0 else (None, None)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    return r, proc.returncode, out, err


def test_drain_wait_returns_when_the_process_has_exited(tmp_path):
    r, status, out, err = _run_and_drain(tmp_path, "drain", {"quiet_period": 0.5})
    assert r.returncode == 0, r.stderr
    assert "balancer lb-pcap: exited" in r.stdout
    assert status == 0, err
    assert "Counter equations: all hold" in out and "balancer drained" in err


def test_the_withdraw_command_does_not_run_on_the_data_plane_core(tmp_path):
    """A child inherits the pinning of the thread that starts it: a withdraw
    command started by the control loop ran on the data-plane core, and its
    Python start-up held up the poll loop just when the router moved the
    flows (the lab's reset at step e: new flows' pushes and answers came
    after their owners had decided)."""
    import os
    everywhere = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    if len(everywhere) < 2:
        pytest.skip("one CPU: nowhere else to run")
    seen = tmp_path / "cpus"
    r, status, _, err = _run_and_drain(
        tmp_path, "hook", {"quiet_period": 0.5, "withdraw": [
            "sh", "-c", f"grep Cpus_allowed_list /proc/self/status > {seen}"]},
        dpdk={"cores": [everywhere[0]]},
        # As a service starts: any CPU (this process may be pinned).
        preexec_fn=lambda: os.sched_setaffinity(0, everywhere))
    assert r.returncode == 0, r.stderr
    assert status == 0, err
    listed = seen.read_text().split(":", 1)[1].strip()
    cpus = set()
    for part in listed.split(","):
        lo, _, hi = part.partition("-")
        cpus |= set(range(int(lo), int(hi or lo) + 1))
    assert cpus == set(everywhere) - {everywhere[0]}, (listed, err)
