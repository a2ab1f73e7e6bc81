"""The lab end to end: the churn demo on the real topology (clients with the
kernel's TCP, an ECMP router, `pylb run` balancers on af_packet, VXLAN
backends answering directly), shorter and with fewer connections than
`pylb lab demo` (Plan.quick), with state exchange on and off; its last step
drains a balancer with `pylb drain` as an operator would; and the lab's
clean-up when it is told to end and when it is killed outright.

The churn runs once for the module (about 50 s); the tests read its result.
A failure names each broken connection, the step it broke in and where the
cluster put it (bucket, table backend, owner and backup at each step), and
carries every balancer's log.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import list_namespaces, owner_pid, process_start, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.dpdk, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parent.parent


def hugepage_files() -> set[str]:
    return set(os.listdir("/dev/hugepages")) if os.path.isdir("/dev/hugepages") else set()


@pytest.fixture(scope="module")
def churn_run():
    """Both modes of the quick churn, with what the machine had before."""
    require_netns()
    from pylb.lab import churn

    namespaces, hugepages = set(list_namespaces()), hugepage_files()
    began = time.monotonic()
    results = churn.run_demo(churn.Plan.quick(), (True, False), echo=print)
    return {"on": results[0], "off": results[1], "seconds": time.monotonic() - began,
            "namespaces_before": namespaces, "hugepages_before": hugepages}


def logs(result) -> str:
    return "\n".join(b["transcript"] for b in result.balancers.values())


def failures(result) -> str:
    from pylb.lab import report

    lines = [report.describe_failure(result, c) for c in result.broken()]
    lines += [report.describe_http_failure(result, r) for r in result.http if not r[2]]
    return "\n".join(lines)


def test_with_state_exchange_no_connection_breaks(churn_run):
    """Backend added and drained, a balancer out of ECMP, one killed, one
    joining: every echo connection keeps its backend, gets every byte back
    and closes in order; every HTTP request is answered."""
    from pylb.lab import report

    on = churn_run["on"]
    assert on.connections, "no connection was made"
    table = report.churn_table([on])
    assert not on.broken() and all(r[2] for r in on.http), \
        f"with state exchange on:\n{failures(on)}\n{table}\n{logs(on)}"
    unclosed = [c["id"] for c in on.connections if c["closed"] is None]
    assert not unclosed, f"not closed in order: {unclosed}\n{table}\n{logs(on)}"
    assert all(c["verified"] > 0 and c["verified"] == c["sent"] for c in on.connections)
    assert len(on.http) > 100, f"only {len(on.http)} HTTP requests were made"


def test_with_state_exchange_no_stall_passes_the_bound(churn_run):
    on = churn_run["on"]
    over = on.over_bound()
    assert not over, "stalled longer than %s s: %s\n%s" % (
        on.plan.stall_bound_s, [(c["id"], round(c["max_stall"], 2), c["stalls"]) for c in over],
        logs(on))


def test_without_state_exchange_the_same_churn_breaks_connections(churn_run):
    """The control: the same churn moves flows for real, so hashing alone
    (Maglev and Katran's behaviour) resets some of them."""
    off = churn_run["off"]
    assert off.broken(), "with the exchange off nothing broke: the churn moved no flow\n" \
        + logs(off)
    # A moved flow reaches a backend without its connection, which resets it.
    reasons = [c["broken"]["reason"] for c in off.broken()]
    assert any("reset" in r for r in reasons), reasons


def test_every_step_happened_and_the_traffic_spread(churn_run):
    from pylb.lab.churn import Plan

    for result in (churn_run["on"], churn_run["off"]):
        assert [s.key for s in result.steps] == ["steady", "a", "b", "c", "d", "e", "settle",
                                                 "close"]
        assert {n for n, b in result.balancers.items() if b["killed"]} == {"lb2"}
        answered = {r[3] for r in result.http if r[2]}
        step_a = next(s.at for s in result.steps if s.key == "a")
        after = {r[3] for r in result.http if r[2] and r[0] > step_a + 1.0}
        assert {"be1", "be3", "be4"} <= answered and "be2" not in after, (answered, after)
        assert result.fabric.get("lb4", 0) > 100, result.fabric
    assert churn_run["seconds"] < 90, f"the quick churn took {churn_run['seconds']:.0f} s"
    assert Plan.quick().connections < Plan().connections


def test_a_drained_balancer_leaves_by_itself_and_breaks_no_connection(churn_run):
    """Step e: `pylb drain --wait` on lb3 while the connections stream. Its
    withdraw command takes it out of the router's ECMP set, it hands its
    ownership off and the other members drop it; it exits by itself, status
    0, within the drain timeout, and with the exchange on nothing breaks."""
    from pylb.lab import report
    from pylb.lab.topology import DRAIN_TIMEOUT_S, log_events

    on = churn_run["on"]
    row = next(r for r in report.step_rows(on) if r[1] == "e")
    assert row[5] == 0 and row[8] == 0, \
        f"broken in the drain step:\n{failures(on)}\n{report.churn_table([on])}\n{logs(on)}"
    for result in (churn_run["on"], churn_run["off"]):
        drain = result.drains["lb3"]
        said = result.balancers["lb3"]["transcript"]
        assert not result.balancers["lb3"]["killed"]
        # It ended by itself: status 0, before the drain's timeout, and the
        # operator's `pylb drain --wait` saw it go.
        assert drain.rc == 0 and drain.ended is not None, said
        assert drain.seconds < DRAIN_TIMEOUT_S, drain.seconds
        assert drain.cli_rc == 0 and "balancer lb3: exited" in drain.cli_output, drain.cli_output
        # Its admin API said it was draining, its view without itself (handed off).
        assert drain.admin and drain.admin["state"] == "draining", drain.admin
        assert drain.view and "lb3" not in drain.view, drain.view
        # Its log: the withdraw command ran and succeeded; it ended on quiet,
        # not at the timeout, so the router had stopped sending to it.
        assert drain.withdraw and drain.withdraw["status"] == 0, said
        assert log_events(said, "balancer drained") and \
            not log_events(said, "balancer drain timed out"), said
        assert "Counter equations: all hold" in result.balancers["lb3"]["summary"], said
        # The router's multipath routes lead to lb4 alone, and the members
        # that stay know lb3 left (their admin API at the end of the run).
        assert drain.router_after == ["lb4"], drain.router_after
        for name in ("lb1", "lb4"):
            members = result.balancers[name]["status"]["cluster"]["members"]
            assert sorted(members) == ["lb1", "lb4"], (name, members)
        assert drain.clean


def test_balancers_exit_clean_and_the_lab_leaves_nothing(churn_run):
    for result in (churn_run["on"], churn_run["off"]):
        for name, b in result.balancers.items():
            if b["killed"]:
                continue
            assert b["rc"] == 0, b["transcript"]
            assert "Counter equations: all hold" in b["summary"], b["transcript"]
            lost = re.findall(r"^(parse_truncated|too_big|no_backend|verdict|encap)\s+(\d+)",
                              b["summary"], re.M)
            assert not lost, f"{name} dropped traffic it should carry: {lost}\n{b['transcript']}"
            with pytest.raises(ProcessLookupError):
                os.kill(b["pid"], 0)
    # Only this run's names: other runs (tests, labs) may come and go meanwhile.
    left = {ns for ns in set(list_namespaces()) - churn_run["namespaces_before"]
            if owner_pid(ns) == os.getpid()}
    assert not left, f"namespaces left: {left}"
    assert hugepage_files() <= churn_run["hugepages_before"]


def test_withdraw_and_announce_change_one_next_hop_of_the_router(tmp_path):
    """The drain hooks (`pylb lab withdraw|announce`, run by a balancer in
    its own namespace): one balancer's next hop leaves or rejoins both VIP
    routes, the others stay; the last one is never withdrawn."""
    require_netns()
    from pylb.lab.topology import UNDERLAY_MTU, Lab, ecmp_set
    from pylb.netns import Topology

    def hook(lab, verb, name):
        return subprocess.run(lab.route_command(verb, name), cwd=ROOT, capture_output=True,
                              text=True, timeout=30)

    with Topology() as topology:
        lab = Lab(topology, tmp_path)
        fabric = lab.ns["fabric"] = topology.namespace("fabric")
        fabric.ip("link", "add", "br0", "mtu", str(UNDERLAY_MTU), "type", "bridge")
        lab._router()       # only the router: the rest of the lab plays no part here
        lab.set_router(["lb1", "lb2", "lb3"])
        router = lab.ns["router"].name
        done = hook(lab, "withdraw", "lb2")
        assert done.returncode == 0 and "router ECMP set: lb1 lb3" in done.stdout, done
        assert ecmp_set(router) == ["lb1", "lb3"]
        assert hook(lab, "announce", "lb2").returncode == 0
        assert ecmp_set(router) == ["lb1", "lb2", "lb3"]
        lab.set_router(["lb4"])
        refused = hook(lab, "withdraw", "lb4")
        assert refused.returncode == 1 and "last next hop" in refused.stderr, refused
        assert ecmp_set(router) == ["lb4"]


# ---------------------------------------------------------------- clean-up

def start_lab_up() -> tuple[subprocess.Popen, dict]:
    """`pylb lab up --no-traffic` in its own process; returns it and its
    state (namespaces, balancers) once it is up."""
    from pylb.lab.topology import lab_states

    proc = subprocess.Popen([sys.executable, "-m", "pylb.cli", "lab", "up", "--no-traffic"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = next((s for s in lab_states() if s["pid"] == proc.pid and s["phase"] == "up"),
                     None)
        if state is not None:
            return proc, state
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"pylb lab up did not come up:\n{proc.communicate()[0]}")


def remaining(state: dict) -> list[str]:
    """What of a lab still exists: namespaces, balancers, its directory."""
    left = [ns for ns in state["namespaces"].values() if ns in list_namespaces()]
    # A killed orphan stays a zombie until init reaps it: dead is what counts.
    left += [f"{name} (pid {b['pid']})" for name, b in state["balancers"].items()
             if process_start(b["pid"]) is not None]
    if Path(state["workdir"]).exists():
        left.append(state["workdir"])
    return left


def test_lab_up_removes_everything_when_told_to_end():
    require_netns()
    from pylb.lab.topology import stop_labs

    proc, state = start_lab_up()
    assert len(state["balancers"]) == 3 and len(remaining(state)) == 12 + 3 + 1
    said = stop_labs(only=proc.pid)         # what `pylb lab down --pid` does: SIGTERM
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "lab removed" in out, out
    assert not remaining(state), (remaining(state), said, out)


def test_a_killed_lab_is_removed_by_the_next_run():
    require_netns()
    from pylb.lab.topology import sweep

    proc, state = start_lab_up()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    # Killed outright: no clean-up ran, everything is still there.
    assert len(remaining(state)) == 12 + 3 + 1, remaining(state)
    said = sweep()                          # what the next run (or pylb lab down) does
    assert not remaining(state), (remaining(state), said)
