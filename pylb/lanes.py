"""A balancer's worker processes, one per core: its lanes.

With `balancer.workers: N` above 1, the balancer process is worker 0, the
DPDK primary: it opens the data port with a queue pair per worker, the flow
cache in a hugepage memzone and the lanes' rings, runs what a balancer runs
once (admin API, health checks, configuration, retirement), and starts
workers 1 to N-1 (`python -m pylb.lanes`), DPDK secondary processes each
pinned to its core. Every worker polls its own queue pair and forwards what
the flow cache or the tables decide; what needs Python is split by flow
(native/pylb.h, "Lanes"), so each worker's miss path, requests, owner's
store and pushes are those of its lane's flows alone.

Worker 0 tells the others, in order, every change of the tables (each
configuration it swaps in, each retirement, the tables in force it learnt
from its cluster's members (pylb/history.py): they compile the same
dataplanes, so backend ids in the shared cache mean the same everywhere),
the MACs its ARP and NDP learnt (it takes every such frame), and when to
stop; they report their counters every second. A worker that dies ends the
balancer: its queue would go unread (docs/architecture.md, "Process model").
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import structlog

from pylb._ffi import check, lib
from pylb.errors import PylbError, StateError

log = structlog.get_logger("pylb.lanes")

RING_SIZE = 4096
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
REPORT_INTERVAL_S = 1.0
SILENT_S = 10.0           # a worker silent this long is taken as hung: the balancer stops
DIVERGENT_RETRY_S = 10.0  # a question about retirement left unanswered is asked again


@dataclass(frozen=True)
class LaneRole:
    """A worker's place among its balancer's: index 0 is the primary."""

    index: int
    count: int
    name: str           # the lanes' rings and the shared flow cache are named after it
    file_prefix: str    # the EAL's hugepage files
    core: int

    @property
    def primary(self) -> bool:
        return self.index == 0


def backends_digest(dataplane) -> str:
    """What every worker's backend ids must agree on (the shared cache holds
    ids): the same in every process (Python's hash() is not)."""
    text = "\n".join(f"{r.id} {r.vip} {r.name} {r.address}" for r in dataplane.backends)
    return hashlib.sha256(text.encode()).hexdigest()


def create_rings(name: str, count: int) -> None:
    check(lib.pylb_lanes_create(name.encode(), count, RING_SIZE), "creating the lanes' rings")


def free_rings(name: str, count: int) -> None:
    lib.pylb_lanes_free(name.encode(), count)


class LaneSet:
    """Worker 0's view of workers 1..N-1: starts them, tells them what
    changes, collects their reports, stops them."""

    def __init__(self, roles: list[LaneRole]):
        self.roles = roles
        self.procs: dict[int, subprocess.Popen] = {}
        self.conns: dict[int, Connection] = {}
        self.reports: dict[int, dict] = {}
        self.report_at: dict[int, float] = {}
        self.failed: str | None = None
        self._neigh_sent: dict[str, str] = {}
        self._ask_id = 0
        self._ask: int | None = None
        self._ask_at = 0.0
        self._answers: dict[int, tuple] = {}
        self._report_asked: float | None = None
        self._answered: tuple[float, list[dict]] | None = None
        self._started_at = time.monotonic()

    def start(self, init: dict) -> None:
        """Starts every worker with `init` (the configurations it starts
        from) and waits until each has its queue, or raises PylbError."""
        for role in self.roles:
            mine, theirs = socket.socketpair()
            proc = subprocess.Popen([sys.executable, "-m", "pylb.lanes", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], close_fds=True,
                                    start_new_session=False)
            theirs.close()
            conn = Connection(mine.detach())
            self.procs[role.index], self.conns[role.index] = proc, conn
            conn.send({**init, "role": role})
        deadline = time.monotonic() + START_TIMEOUT_S
        for index, conn in self.conns.items():
            while not conn.poll(0.1):
                code = self.procs[index].poll()
                if code is not None:
                    raise PylbError(f"worker {index} ended while starting (status {code}): "
                                    "see its log above")
                if time.monotonic() > deadline:
                    raise PylbError(f"worker {index} did not start within {START_TIMEOUT_S:.0f} s")
            try:
                kind, detail = conn.recv()
            except (EOFError, OSError):
                kind, detail = "failed", f"it ended (status {self.procs[index].wait()})"
            if kind != "ready":
                raise PylbError(f"worker {index} could not start: {detail}")
        self._started_at = time.monotonic()
        log.info("workers started", workers=len(self.roles) + 1,
                 pids=[p.pid for p in self.procs.values()])

    def broadcast(self, op: tuple) -> None:
        """Sends an operation to every worker, in order with the earlier ones."""
        for index, conn in self.conns.items():
            try:
                conn.send(op)
            except OSError as exc:
                self._fail(f"worker {index} cannot be reached: {exc}")

    def share_neighbours(self, macs: dict[str, str]) -> None:
        """What worker 0 learnt of next hops, when it changed."""
        if macs != self._neigh_sent:
            self._neigh_sent = dict(macs)
            self.broadcast(("neighbours", macs))

    def poll(self) -> None:
        """Takes the workers' reports; notices a worker that ended."""
        for index, conn in self.conns.items():
            try:
                while conn.poll(0):
                    kind, detail = conn.recv()
                    if kind == "report":
                        self.reports[index] = detail
                        self.report_at[index] = time.monotonic()
                        if "divergent" in detail:
                            self._answers[index] = detail["divergent"]
                    elif kind == "error":
                        self._fail(f"worker {index}: {detail}")
            except (EOFError, OSError):
                pass
            code = self.procs[index].poll()
            if code is not None and self.failed is None:
                self._fail(f"worker {index} ended (status {code})")
            # Alive but silent: its queue goes unread all the same.
            last = self.report_at.get(index, self._started_at)
            if time.monotonic() - last > SILENT_S and self.failed is None:
                self._fail(f"worker {index} has not reported for {SILENT_S:.0f} s")

    def reports_since(self, since: float) -> list[dict] | None:
        """Every worker's report to a question asked at `since` (monotonic)
        or later, or None while there is none yet; asks as it goes, one
        question at a time (tests wait on this for the workers to be idle)."""
        now = time.monotonic()
        asked = self._report_asked
        if asked is not None and all(self.report_at.get(r.index, -1.0) > asked
                                     for r in self.roles):
            self._answered = (asked, [self.reports[r.index] for r in self.roles])
            asked = self._report_asked = None
        if asked is None:
            self._report_asked = now
            self.broadcast(("report",))
        if self._answered is not None and self._answered[0] >= since:
            return self._answered[1]
        return None

    def divergent(self) -> list[tuple[bool, dict]] | None:
        """Retirement asks every worker which stateful buckets its store holds
        a flow of on an old backend (and whether it is moving state). None
        until all of them answered the latest question; then (busy,
        {vip: buckets}) per worker, and the next call asks again."""
        if self._ask is None or time.monotonic() - self._ask_at > DIVERGENT_RETRY_S:
            self._ask_divergent_now()
            return None
        if not self._all_answered():
            return None
        self._ask = None
        return [self._answers[r.index][1:] for r in self.roles]

    def ask_divergent(self, timeout: float = 5.0) -> bool:
        """Asks every worker the retirement question now and waits until all
        answered (True) or timeout: the next divergent() returns the answers."""
        self._ask_divergent_now()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.failed is None:
            self.poll()
            if self._all_answered():
                return True
            time.sleep(0.001)
        return False

    def _ask_divergent_now(self) -> None:
        self._ask_id += 1
        self._ask, self._ask_at = self._ask_id, time.monotonic()
        self.broadcast(("divergent", self._ask))

    def _all_answered(self) -> bool:
        return all((self._answers.get(r.index) or (None,))[0] == self._ask for r in self.roles)

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            log.error("worker process lost: the balancer stops", reason=why)

    def stop(self) -> None:
        """Stops every worker and waits for them (killing one that hangs):
        the primary's EAL must outlive its secondaries."""
        self.broadcast(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for index, proc in list(self.procs.items()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop: killed", worker=index, pid=proc.pid)
                proc.kill()
                proc.wait()
            conn = self.conns[index]
            try:
                while conn.poll(0):
                    kind, detail = conn.recv()
                    if kind == "report":
                        self.reports[index] = detail
            except (EOFError, OSError):
                pass
            conn.close()
        self.procs.clear()
        self.conns.clear()


# ------------------------------------------------------------ a worker process


def _apply(lb, op: tuple) -> bool:
    """One operation from worker 0; False on stop."""
    kind = op[0]
    if kind == "stop":
        return False
    if kind == "swap":
        _, config, digest = op
        lb._swap(config)
        _check_digest(lb, digest)
    elif kind == "retire":
        _, due, digest = op
        lb.apply_retirement(due)
        _check_digest(lb, digest)
    elif kind == "history":
        _, answer, joined, digest = op
        lb.learn_history(answer, joined)
        _check_digest(lb, digest)
    elif kind == "neighbours":
        for address, mac in op[1].items():
            lb.neigh.learn(address, mac)
    elif kind == "divergent":
        lb._divergent_asked = op[1]     # answered in the next report, at once
    elif kind == "report":
        pass    # answered below by the caller's report
    else:
        raise StateError(f"unknown operation from worker 0: {kind!r}")
    return True


def _check_digest(lb, digest: str) -> None:
    if backends_digest(lb.dataplane) != digest:
        raise StateError("backend ids differ from worker 0's: the shared flow cache would "
                         "send flows to the wrong backends")


def run_worker(conn: Connection) -> int:
    """A worker process: starts from what worker 0 sent, then polls its queue
    until told to stop, or until worker 0 is gone."""
    from pylb import logs
    from pylb.balancer import Balancer

    init = conn.recv()
    role: LaneRole = init["role"]
    logs.setup(*init["log"], every_line={"worker": role.index})
    stop = False
    # Ctrl-C, and a supervisor's SIGTERM, reach the whole process group: worker
    # 0 stops the others, in order, before its own EAL ends. A worker ends by
    # itself only when worker 0 is gone (its socket closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        lb = Balancer(init["config"], previous_config=init["previous"], lane=role)
    except Exception as exc:
        conn.send(("failed", str(exc)))
        log.error("worker could not start", worker=role.index, error=str(exc))
        return 1
    code = 0
    with lb:
        try:
            _check_digest(lb, init["digest"])
        except StateError as exc:
            conn.send(("failed", str(exc)))
            log.error("worker could not start", worker=role.index, error=str(exc))
            return 1
        conn.send(("ready", os.getpid()))
        last_report = 0.0
        try:
            while not stop:
                # Short idles: worker 0's questions are answered between steps.
                lb.step(max_bursts=1024, max_idle_us=2_000)
                asked = False
                while conn.poll(0):
                    op = conn.recv()
                    asked = asked or op[0] in ("report", "divergent")
                    if not _apply(lb, op):
                        stop = True
                        break
                now = time.monotonic()
                if asked or now - last_report >= REPORT_INTERVAL_S:
                    last_report = now
                    conn.send(("report", lb.lane_report()))
        except (EOFError, OSError):
            log.error("worker 0 is gone: stopping", worker=role.index)
            code = 1
        except Exception as exc:
            log.exception("worker failed", worker=role.index)
            try:
                conn.send(("error", str(exc)))
            except OSError:
                pass
            code = 1
        try:
            conn.send(("report", lb.lane_report()))
        except OSError:
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("python -m pylb.lanes FD: started by a balancer with several workers, "
              "not by hand", file=sys.stderr)
        return 2
    return run_worker(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main())
