"""The churn demo: one workload, the same churn, state exchange on and off.

While every echo connection streams and HTTP requests keep coming:

  a. a backend joins (be4) and another is drained (be2 at weight 0);
  b. the router takes lb1 out of its ECMP set (lb1 keeps running, a member);
  c. lb2 is killed with SIGKILL; the router notices (`detect_s` later, as
     BFD or a BGP hold timer would) and drops it, and configuration
     management removes it from the members (its backups become owners);
  d. lb4 starts (it learns the tables in force from the members:
     pylb/history.py), becomes a member, and the router adds it;
  e. configuration management removes lb3 from the other members, then an
     operator drains it with `pylb drain --wait` (in lb3's namespace, over
     its admin socket): lb3 hands its ownership off and runs its withdraw
     command, `pylb lab withdraw lb3`, which takes its next hop out of the
     router's multipath routes as a BGP withdrawal would; lb3 goes on
     forwarding what still reaches it and exits by itself, status 0, when no
     VIP packet has come for its quiet period (after the handoff period);

steps a to d `gap_s` apart, e as long as the drain takes (about the
handoff period, 5 s), then a settling period, then an orderly close of
every connection. Configuration changes reach the balancers as
configuration management does it: a new file, then SIGHUP.

A connection's failure belongs to the step in which it stopped making
progress (the start of its last stall), not to the step in which the client
gave up on it, so a break is charged to its cause.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from pylb.lab import report
from pylb.lab.topology import (CLIENTS, ECHO_PORT, HTTP_PORT, VIP4, VIP6, ClusterState,
                               DrainRecord, Lab, NODES)
from pylb.lab.traffic import Workload
from pylb.netns import LoggedProcess, NetnsError

INITIAL_MEMBERS = ("lb1", "lb2", "lb3")
INITIAL_BACKENDS = {"be1": 1, "be2": 1, "be3": 1}
CHANGED_BACKENDS = {"be1": 1, "be2": 0, "be3": 1, "be4": 1}


@dataclass
class Plan:
    """The workload and the churn's timing. The defaults are the demo's;
    `quick()` is the CI test's."""

    connections: int = 48          # echo connections per client (2 clients)
    http_rate: float = 40.0        # HTTP requests per second per client
    steady_s: float = 3.0          # traffic before the first step
    gap_s: float = 1.0             # between steps a, b, c, d
    detect_s: float = 0.3          # kill -> the router drops the dead balancer
    settle_s: float = 4.0          # after the last step, before the close
    stall_bound_s: float = 3.0     # the stated bound: no stall may be longer
    give_up_s: float = 10.0        # no progress this long: the connection is broken
    interval_s: float = 0.05       # mean pause between a connection's chunks
    stall_note_s: float = 0.1      # stalls from this long on are listed with their times
    announce_s: float = 0.2        # a joining member's route is announced this long after
                                   # the others took it in (they must first resolve its MAC)
    push_interval_ms: int | None = None    # cluster.push_interval_ms (None: pylb's default)
    seed: int = 1

    @classmethod
    def quick(cls) -> "Plan":
        return cls(connections=16, http_rate=20.0, steady_s=1.5, settle_s=3.0)


@dataclass
class Step:
    key: str
    label: str
    at: float


@dataclass
class ModeResult:
    exchange: bool
    plan: Plan
    steps: list[Step]
    end: float
    connections: list[dict] = field(default_factory=list)
    http: list[list] = field(default_factory=list)
    fabric: dict[str, int] = field(default_factory=dict)     # frames per balancer in the run
    balancers: dict[str, dict] = field(default_factory=dict)  # name -> rc, killed, summary, log
    started: float = 0.0       # the mode's own start (balancers starting)
    traffic_from: float = 0.0  # every connection established
    # The cluster as configuration management had it, from each step on,
    # and how a balancer's configuration is made of it: failures are
    # explained with them (bucket, backends, owners).
    states: list[tuple[str, ClusterState]] = field(default_factory=list)
    config_of: object = None
    drains: dict[str, DrainRecord] = field(default_factory=dict)   # step e
    # Failed connections ("src -> dst") -> what each running balancer held
    # for them at the end (pylb flows): where the failure happened.
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def t0(self) -> float:
        return self.steps[0].at

    def step_of(self, t: float) -> Step:
        current = self.steps[0]
        for step in self.steps:
            if step.at <= t:
                current = step
        return current

    def broken(self) -> list[dict]:
        return [c for c in self.connections if c["broken"]]

    def over_bound(self) -> list[dict]:
        return [c for c in self.connections if not c["broken"]
                and c["max_stall"] > self.plan.stall_bound_s]


class Clients:
    """The traffic programs of one mode, one per client namespace."""

    def __init__(self, lab: Lab, plan: Plan):
        self.procs: dict[str, LoggedProcess] = {}
        self.latest: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        self.ready: set[str] = set()
        self._read_upto: dict[str, int] = {}
        self._lock = threading.Lock()
        for i, node in enumerate(CLIENTS):
            w = Workload(client=node.name, sources={"4": node.v4, "6": node.v6},
                         vips={"4": VIP4, "6": VIP6}, connections=plan.connections,
                         echo_port=ECHO_PORT, http_port=HTTP_PORT, http_rate=plan.http_rate,
                         interval=plan.interval_s, give_up=plan.give_up_s,
                         stall_note=plan.stall_note_s,
                         seed=plan.seed * 100 + i)
            self.procs[node.name] = lab.ns[node.name].spawn_logged(
                lab.python, "-u", "-m", "pylb.lab.traffic", w.to_json())
            self._read_upto[node.name] = 0

    def poll(self) -> None:
        """Reads what the programs said since the last poll."""
        with self._lock:
            for name, proc in self.procs.items():
                out = proc.stdout
                end = out.rfind("\n") + 1
                for line in out[self._read_upto[name]:end].splitlines():
                    if not line.startswith("{"):
                        continue
                    message = json.loads(line)
                    kind = message["type"]
                    if kind == "progress":
                        self.latest[name] = message
                    elif kind == "ready":
                        self.ready.add(name)
                    elif kind == "result":
                        self.results[name] = message
                self._read_upto[name] = end

    def wait(self, what, timeout: float, describe: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if what():
                return
            dead = [n for n, p in self.procs.items() if p.returncode is not None
                    and n not in self.results]
            if dead or time.monotonic() > deadline:
                said = "\n".join(p.transcript() for p in self.procs.values())
                raise NetnsError(f"clients: {describe} did not happen within {timeout} s\n{said}")
            time.sleep(0.05)

    def finish(self) -> None:
        for proc in self.procs.values():
            os.kill(proc.pid, signal.SIGUSR1)


class Progress(threading.Thread):
    """Prints one line a second while a mode runs: connections, bytes
    verified, requests per second, each balancer's and backend's share."""

    def __init__(self, lab: Lab, clients: Clients, exchange: bool, echo, started: float):
        super().__init__(daemon=True, name="lab progress")
        self.lab, self.clients, self.exchange, self.echo = lab, clients, exchange, echo
        self.started = started
        self.step = "starting"
        self.stop = threading.Event()

    def run(self) -> None:
        last_fabric = self.lab.fabric_packets()
        last_http: dict[str, int] = {}
        last_t = time.monotonic()
        while not self.stop.wait(1.0):
            try:
                self.clients.poll()
                now = time.monotonic()
                fabric = self.lab.fabric_packets()
                lb_delta = {n: fabric[n] - last_fabric.get(n, 0) for n in fabric}
                http_by_backend: dict[str, int] = {}
                for p in self.clients.latest.values():
                    for b, v in p["backends"].items():
                        http_by_backend[b] = http_by_backend.get(b, 0) + v["http"]
                be_delta = {b: n - last_http.get(b, 0) for b, n in http_by_backend.items()}
                self.echo(report.progress_line(self.exchange, now - self.started, self.step,
                                               list(self.clients.latest.values()), lb_delta,
                                               be_delta, now - last_t))
                last_fabric, last_http, last_t = fabric, http_by_backend, now
            except Exception as exc:   # progress is a view: never the reason a run fails
                self.echo(f"(progress unavailable: {exc})")


def where_failures_are(lab: Lab, results, limit: int = 20) -> dict[str, str]:
    """For the failed connections (broken echo, failed HTTP), what each
    running balancer still holds for them (`pylb flows`: cached, stored as
    owner or backup): where a failure happened, for its report. Entries of
    ended flows stay cached for the closing timeout, so most are there."""
    from pylb.admin import Client
    from pylb.errors import PylbError

    failed = []
    for r in results:
        failed += [f"{c['src']} -> {c['dst']}" for c in r["connections"] if c["broken"]]
        failed += [f"{h[5]} -> {'[' + VIP6 + ']' if h[4] == 6 else VIP4}:{HTTP_PORT}"
                   for h in r["http"] if not h[2]]
    out = {}
    for flow in failed[:limit]:
        parts = []
        for name, lb in lab.balancers.items():
            if lb.process.returncode is not None:
                continue
            try:
                f = Client(str(lab.admin_socket(name)), timeout=3).request(
                    "GET", "/flows", query={"flow": f"tcp {flow}"})
            except PylbError:
                continue
            cached, stored = f.get("cached_here"), f.get("stored_here")
            if cached or stored:
                parts.append(f"{name}: " + ", ".join(filter(None, [
                    cached and f"cached -> {cached['backend']} ({cached['idle_ms']} ms idle)",
                    stored and f"stored -> {stored['address']}"
                               f"{' (closing)' if stored['closing'] else ''}"])))
        out[flow] = "; ".join(parts) or "held by no running balancer"
    return out


def balancer_status(lab: Lab) -> dict[str, dict]:
    """Each balancer's state from its admin API (counters of the data path
    and of the state exchange), for the summary: the running ones now, a
    drained one as it was last seen before it exited."""
    out = {name: lb.drain.status for name, lb in lab.balancers.items()
           if lb.drain is not None and lb.drain.status}
    for name, lb in lab.balancers.items():
        if lb.process.returncode is None:
            status = lab.status(name)
            if status is not None:   # else the summary says "n/a": the logs still tell
                out[name] = status
    return out


def run_mode(lab: Lab, exchange: bool, plan: Plan, echo=print) -> ModeResult:
    """Starts three balancers, the clients, runs the churn, closes every
    connection, stops the balancers; returns everything that happened."""
    started = time.monotonic()
    lab.balancers = {}
    lab.push_interval_ms = plan.push_interval_ms
    state = ClusterState(INITIAL_MEMBERS, tuple(INITIAL_BACKENDS.items()), exchange)
    lab.start_balancers(list(INITIAL_MEMBERS), state)
    lab.set_router(list(INITIAL_MEMBERS))
    lab.write_state("running", exchange=exchange)
    fabric_before = lab.fabric_packets()
    clients = Clients(lab, plan)
    progress = Progress(lab, clients, exchange, echo, started)
    progress.start()
    steps: list[Step] = []

    states = [("start", state)]

    def step(key: str, label: str) -> None:
        steps.append(Step(key, label, time.monotonic()))
        progress.step = f"{key}: {label}" if len(key) == 1 else label
        lab.write_state("running", exchange=exchange, step=progress.step)

    def until(t: float) -> None:
        time.sleep(max(0.0, t - time.monotonic()))

    try:
        clients.wait(lambda: len(clients.ready) == len(clients.procs), plan.give_up_s + 5,
                     "every echo connection established")
        traffic_from = time.monotonic()
        step("steady", "steady traffic")
        until(steps[-1].at + plan.steady_s)

        step("a", "be4 added, be2 drained (weight 0)")
        state = state.with_backends(CHANGED_BACKENDS)
        states.append(("a", state))
        lab.reload(list(state.members), state)
        until(steps[-1].at + plan.gap_s)

        step("b", "lb1 out of the router's ECMP set")
        lab.set_router(["lb2", "lb3"])
        until(steps[-1].at + plan.gap_s)

        step("c", "lb2 killed (SIGKILL), router and members drop it")
        lab.kill("lb2")
        time.sleep(plan.detect_s)
        lab.set_router(["lb3"])
        state = state.with_members(["lb1", "lb3"])
        states.append(("c", state))
        lab.reload(list(state.members), state)
        until(steps[-1].at + plan.gap_s)

        step("d", "lb4 joins, router adds it")
        # lb4 learns the tables in force from lb1 and lb3 (it asks until
        # they have reloaded and take its messages).
        state = state.with_members(["lb1", "lb3", "lb4"])
        states.append(("d", state))
        lab.start_balancers(["lb4"], state)
        lab.reload(["lb1", "lb3"], state)
        # As a routing daemon announces a new member only once it is in sync:
        # until lb1 and lb3 know lb4's MAC, what they push to it is lost.
        time.sleep(plan.announce_s)
        lab.set_router(["lb3", "lb4"])
        # lb4's start takes most of a second: its step lasts until gap_s after
        # the router sends it traffic, so what that does is charged to it.
        until(time.monotonic() + plan.gap_s)

        step("e", "lb3 drained with pylb drain, exits by itself")
        # Configuration management takes lb3 out of the other members first
        # (as in step c), then the operator drains it: when lb3 hands its
        # ownership off, the others' view is already the one it hands off
        # to, so none asks lb3 as an owner, and lb3 answers them as a former
        # holder. The other way round, a peer still asking lb3 about a flow
        # lb3 decided after its hand-off got a decision by the rule for old
        # flows (lb3 no longer holds the bucket): resets of new HTTP
        # connections in 3 of 5 runs at 300 requests/s (docs/lab.md).
        state = state.with_members(["lb1", "lb4"])
        states.append(("e", state))
        lab.reload(["lb1", "lb4"], state)
        lab.start_drain("lb3")
        lab.finish_drain("lb3")

        step("settle", "settling")
        until(steps[-1].at + plan.settle_s)

        step("close", "orderly close of every connection")
        clients.finish()
        clients.wait(lambda: len(clients.results) == len(clients.procs), plan.give_up_s + 10,
                     "the final report")
        end = time.monotonic()
    finally:
        progress.stop.set()
        progress.join(2.0)
    fabric_after = lab.fabric_packets()
    status = balancer_status(lab)
    seen = where_failures_are(lab, clients.results.values()) if exchange else {}
    lab.stop_balancers()
    result = ModeResult(exchange, plan, steps, end, started=started, traffic_from=traffic_from,
                        states=states, config_of=lambda st: lab.config(st.members[0], st))
    for r in clients.results.values():
        result.connections += r["connections"]
        result.http += r["http"]
    result.fabric = {n: fabric_after.get(n, 0) - fabric_before.get(n, 0) for n in fabric_after}
    result.drains = {name: lb.drain for name, lb in lab.balancers.items() if lb.drain}
    result.seen = seen
    for name, lb in lab.balancers.items():
        log = lab.save_log(lb, "-on" if exchange else "-off")
        result.balancers[name] = {"pid": lb.process.pid, "rc": lb.rc, "killed": lb.killed,
                                  "summary": lb.summary,
                                  "log": str(log), "transcript": lb.process.transcript(),
                                  "status": status.get(name)}
    return result


__all__ = ["CHANGED_BACKENDS", "DrainRecord", "INITIAL_BACKENDS", "INITIAL_MEMBERS", "ModeResult",
           "NODES", "Plan", "Step", "run_mode"]


def run_demo(plan: Plan, modes: tuple[bool, ...] = (True, False), echo=print,
             on_built=None, log_level: str = "info") -> list[ModeResult]:
    """Builds the lab, runs the churn once per mode on it, removes it all.
    The balancers' logs stay in the run's directory (logs/) until the next
    lab run sweeps it."""
    import shutil

    from pylb.lab.topology import new_workdir
    from pylb.netns import Topology

    results = []
    with Topology() as topology:
        workdir = new_workdir()

        def tidy() -> None:     # configurations and sockets go; logs stay
            for path in workdir.iterdir():
                if path.name != "logs":
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        topology.defer(tidy, f"files in {workdir}")
        lab = Lab(topology, workdir, log_level=log_level)
        built = time.monotonic()
        lab.build()
        echo(f"lab built in {time.monotonic() - built:.1f} s: {len(lab.ns)} namespaces "
             f"({', '.join(ns.name for ns in lab.ns.values())}); logs in {lab.log_dir}")
        if on_built:
            on_built(lab)
        for exchange in modes:
            results.append(run_mode(lab, exchange, plan, echo))
            echo("")
            echo(report.summary(results[-1]))
            echo("")
    return results


def verdict(results: list[ModeResult]) -> list[str]:
    """What makes the demo fail: with state exchange on, any broken
    connection, any stall over the bound, any failed HTTP request, a balancer
    that did not exit cleanly. With it off, breakage is the expected baseline."""
    problems = []
    for r in results:
        unclean = [n for n, b in r.balancers.items() if not b["killed"] and b["rc"] != 0]
        if unclean:
            problems.append(f"exchange {'on' if r.exchange else 'off'}: balancers {unclean} "
                            "did not exit cleanly")
        for name, d in r.drains.items():
            if not d.clean:   # the drain itself does not depend on the exchange
                problems.append(f"exchange {'on' if r.exchange else 'off'}: the drain of {name} "
                                "did not end cleanly by itself")
        if not r.exchange:
            continue
        if r.broken():
            problems.append(f"exchange on: {len(r.broken())} connections broken")
        if r.over_bound():
            problems.append(f"exchange on: {len(r.over_bound())} connections stalled longer "
                            f"than {r.plan.stall_bound_s} s")
        failed = [x for x in r.http if not x[2]]
        if failed:
            problems.append(f"exchange on: {len(failed)} HTTP requests failed")
    return problems


def hold(exchange: bool = True, traffic: bool = True, duration: float | None = None,
         echo=print) -> None:
    """`pylb lab up`: the lab with three balancers (and light traffic) until
    interrupted or `duration` s; then everything is removed."""
    import shutil

    from pylb.lab.topology import new_workdir
    from pylb.netns import Topology

    with Topology() as topology:
        workdir = new_workdir()
        topology.defer(lambda: shutil.rmtree(workdir, ignore_errors=True), f"{workdir}")
        lab = Lab(topology, workdir)
        lab.build()
        state = ClusterState(INITIAL_MEMBERS, tuple(INITIAL_BACKENDS.items()), exchange)
        lab.start_balancers(list(INITIAL_MEMBERS), state)
        lab.set_router(list(INITIAL_MEMBERS))
        lab.write_state("up", exchange=exchange)
        c1 = lab.ns["c1"].name
        echo(f"lab up (run {workdir.name}); namespaces: "
             + ", ".join(f"{role}={ns.name}" for role, ns in lab.ns.items()))
        echo(f"  ip netns exec {c1} curl -s http://{VIP4}/")
        echo(f"  ip netns exec {c1} curl -s 'http://[{VIP6}]/'")
        echo(f"  pylb status --socket {workdir / 'lb1.sock'}")
        echo(f"  pylb drain --wait --socket {workdir / 'lb2.sock'}   # lb2 leaves router and members")
        echo("  pylb lab status; pylb lab down (or Ctrl-C here) removes it all")
        started = time.monotonic()
        progress = None
        if traffic:
            plan = Plan(connections=8, http_rate=5.0)
            clients = Clients(lab, plan)
            progress = Progress(lab, clients, exchange, echo, started)
            progress.step = "steady traffic"
            progress.start()
        drains = DrainFollower(lab, state, echo)
        try:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(0.2)
                drains.poll()
                dead = [n for n, lb in lab.balancers.items() if lb.process.returncode is not None
                        and not (lb.process.returncode == 0 and _draining(lb))]
                if dead:
                    raise NetnsError(f"balancers {dead} ended\n" + lab.transcripts())
        finally:
            if progress is not None:
                progress.stop.set()
        echo("lab down")


def _draining(lb) -> bool:
    """Its log says a drain started and was not undone since."""
    said = lb.process.stderr
    return said.rfind('"balancer draining"') > said.rfind('"balancer drain undone"')


class DrainFollower:
    """`pylb lab up`: what configuration management and the routing daemon
    do when an operator drains a balancer (or undoes the drain). The lab
    learns of the drain from the balancer's log, so it tells the other
    members just after the drain started, not before as the churn's step e
    does (the safer order, docs/lab.md); the router follows the balancer's
    own withdraw (announce) command, which the lab only reads back for
    `pylb lab status`."""

    HOOKS_ENDED = ('"drain withdraw command ended"', '"drain announce command ended"')

    def __init__(self, lab: Lab, state: ClusterState, echo=print):
        self.lab, self.state, self.echo = lab, state, echo
        self.hooks_seen = 0

    def poll(self) -> None:
        self._follow_members()
        self._follow_router()

    def _follow_members(self) -> None:
        serving = [n for n, lb in self.lab.balancers.items()
                   if lb.process.returncode is None and not _draining(lb)]
        if not serving or set(serving) == set(self.state.members):
            return
        self.state = self.state.with_members(serving)
        self.lab.reload(serving, self.state)
        self.lab.write_state("up", exchange=self.state.exchange)
        self.echo(f"members now {', '.join(serving)}: a drain started or was undone")

    def _follow_router(self) -> None:
        ended = sum(lb.process.stderr.count(hook) for lb in self.lab.balancers.values()
                    for hook in self.HOOKS_ENDED)
        if ended == self.hooks_seen:
            return
        self.hooks_seen = ended
        self.lab.sync_router()
        self.lab.write_state("up", exchange=self.state.exchange)
        self.echo(f"router ECMP set now {', '.join(self.lab.router_set)}")
