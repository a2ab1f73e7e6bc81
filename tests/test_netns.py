"""The namespace helper leaves nothing behind: not after a failing test, not
after Ctrl-C, and not after a run that was killed outright."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import netns
from netns import REGISTRY, Topology, base36, cleanup_stale, list_links, list_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.timeout(15)]


@pytest.fixture(autouse=True)
def _root():
    netns.require_netns()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def wait_gone(pids: list[int], timeout: float = 3.0) -> list[int]:
    """The pids still running after timeout (orphans die asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if netns.process_start(pid) is not None]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def populate(topo: Topology) -> dict:
    """One of everything a topology can own; returns what to look for later."""
    a, b = topo.namespace("a"), topo.namespace("b")
    topo.veth(a, b)
    root_end, _ = topo.veth(None, a)
    sleeper = a.spawn("sleep", "60")
    # Leaves the process group: only the sweep of the namespace can find it.
    escaped = int(a.run("sh", "-c", "setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $!").stdout)
    b.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("127.0.0.1", 0))
    made = {"namespaces": [a.name, b.name], "links": [root_end.name],
            "pids": [sleeper.pid, escaped]}
    assert set(made["namespaces"]) <= set(list_namespaces())
    assert root_end.name in list_links()
    assert wait_gone(made["pids"], timeout=0) == made["pids"]
    return made


def assert_gone(made: dict) -> None:
    assert not set(made["namespaces"]) & set(list_namespaces())
    assert not set(made["links"]) & set(list_links())
    assert wait_gone(made["pids"]) == []


def test_names_carry_the_creator_and_fit_interfaces():
    with Topology() as topo:
        ns = topo.namespace("Some Label!")
        left, right = topo.veth(ns, None)
        assert ns.name.startswith(netns.run_tag()) and ns.name.endswith("-somelabel")
        for name in (ns.name, left.name, right.name):
            assert netns.owner_pid(name) == os.getpid()
        assert len(right.name) <= netns.IFNAMSIZ
        assert (REGISTRY / str(os.getpid())).exists()
    assert netns.owner_pid("eth0") is None


@pytest.mark.parametrize("interrupt", ["exception", "sigint"])
def test_nothing_remains_after_the_body_fails(interrupt):
    made = {}
    expected = RuntimeError if interrupt == "exception" else KeyboardInterrupt
    with pytest.raises(expected):
        with Topology() as topo:
            made = populate(topo)
            if interrupt == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the signal interrupts this
            raise RuntimeError("test body failed")
    assert_gone(made)


def test_fixture_undoes_in_reverse_order(topology):
    order = []
    topology.defer(lambda: order.append("first registered"), "first")
    topology.defer(lambda: order.append("last registered"), "last")
    topology.close()
    assert order == ["last registered", "first registered"]


def test_a_killed_run_is_swept_up_by_the_next():
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import json, socket, sys, time
        from pylb.netns import Topology
        topo = Topology()
        a = topo.namespace("crash")
        root_end, _ = topo.veth(None, a)
        sleeper = a.spawn("sleep", "60")
        print(json.dumps({"namespaces": [a.name], "links": [root_end.name],
                          "pids": [sleeper.pid]}), flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        made = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert set(made["namespaces"]) <= set(list_namespaces())

    cleanup_stale()  # another run starting now may beat it to it: check the result only

    assert_gone(made)
    assert not (REGISTRY / str(child.pid)).exists()


def test_leftovers_of_dead_or_reused_pids_go_and_live_runs_stay(topology):
    mine = topology.namespace("live")
    dead = dead_pid()
    # A live process whose pid a crashed run had used: its start time differs.
    reuser = subprocess.Popen(["sleep", "60"])
    dead_ns = f"pl{base36(dead)}_1-crashed"
    reused_ns = f"pl{base36(reuser.pid)}_1-reused"
    dead_link = f"pl{base36(dead)}_2a"
    sleeper = None
    try:
        for name in (dead_ns, reused_ns):
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "link", "add", dead_link, "type", "veth", "peer", "name",
                        f"pl{base36(dead)}_2b", "netns", dead_ns], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", dead_ns, "sleep", "60"],
                                   start_new_session=True)
        # `ip netns exec` enters the namespace after it starts: on a busy
        # machine the sweep could otherwise run before the sleeper is in it.
        deadline = time.monotonic() + 10
        while str(sleeper.pid) not in subprocess.run(["ip", "netns", "pids", dead_ns],
                                                     capture_output=True, text=True).stdout.split():
            assert time.monotonic() < deadline, "the sleeper never entered its namespace"
            time.sleep(0.01)
        REGISTRY.mkdir(parents=True, exist_ok=True)
        for pid in (dead, reuser.pid):
            (REGISTRY / str(pid)).write_text("1")

        removed = cleanup_stale()

        assert mine.name in list_namespaces() and mine.name not in removed
        assert sleeper.wait(timeout=3) == -signal.SIGKILL
        assert_gone({"namespaces": [dead_ns, reused_ns], "links": [dead_link], "pids": []})
        assert not any((REGISTRY / str(pid)).exists() for pid in (dead, reuser.pid))
    finally:
        for process in filter(None, (sleeper, reuser)):
            process.kill()
            process.wait()
        for name in (dead_ns, reused_ns):
            netns.delete_namespace(name)
        netns.delete_link(None, dead_link)
        for pid in (dead, reuser.pid):
            (REGISTRY / str(pid)).unlink(missing_ok=True)
