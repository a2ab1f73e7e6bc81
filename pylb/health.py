"""Backend health checks (docs/health.md): TCP connect, or an HTTP(S) GET that
must answer an expected status, per backend of every VIP with a `health`
section; interval, timeout, rise and fall; first checks spread over the
interval; at most balancer.health.max_concurrent checks in flight.

The checks run in an asyncio loop in a thread of their own. A verdict that
changes (down after `fall` failures in a row, up after `rise` successes) goes
to the control loop as a command (Balancer.set_health), which puts the
backend at weight 0 in the tables, or back, through the same path as a
reconfiguration: new flows avoid a failing backend, cached flows keep it.
"""
from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field

import structlog

from pylb.config import Config, HealthCheck

log = structlog.get_logger("pylb.health")
MAX_STATUS_LINE = 1024


@dataclass(frozen=True)
class Target:
    vip: str
    backend: str
    address: str
    port: int
    check: HealthCheck

    @property
    def key(self) -> tuple[str, str]:
        return self.vip, self.backend


@dataclass
class TargetState:
    """A backend starts up: a new balancer must not blackhole a VIP while its
    first checks run. `fall` failures in a row take it down."""

    up: bool = True
    successes: int = 0
    failures: int = 0
    checks: int = 0
    last_ok: bool | None = None
    last_error: str | None = None
    last_checked: float | None = None      # wall clock
    changed_at: float = field(default_factory=time.time)


def targets_of(config: Config) -> dict[tuple[str, str], Target]:
    out = {}
    for vip in config.vips:
        if vip.health is None:
            continue
        port = vip.health.port or vip.port
        for b in vip.backends:
            t = Target(vip.name, b.name, str(b.address), port, vip.health)
            out[t.key] = t
    return out


class CheckFailed(Exception):
    pass


async def check_once(t: Target) -> None:
    """One check; returns when it passes, raises CheckFailed (or a timeout)
    saying why it did not."""
    c = t.check
    tls = None
    if c.type == "https":
        tls = ssl.create_default_context()
        if not c.tls_verify:
            # Backends are reached by address, so their certificates rarely
            # name it; verification is the operator's choice (tls_verify).
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(t.address, t.port, ssl=tls)
    except OSError as err:
        raise CheckFailed(f"connect: {err.strerror or err}") from None
    try:
        if c.type == "tcp":
            return
        host = c.host or (f"[{t.address}]" if ":" in t.address else t.address)
        writer.write(f"GET {c.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pylb-health\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise CheckFailed("connection closed before a status line")
        parts = line[:MAX_STATUS_LINE].decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise CheckFailed(f"not an HTTP status line: {line[:80]!r}")
        status = int(parts[1])
        if status not in c.expect_status:
            raise CheckFailed(f"HTTP {status}, expected {'/'.join(map(str, c.expect_status))}")
    except OSError as err:
        raise CheckFailed(f"{c.type}: {err.strerror or err}") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


class HealthChecker:
    """Checks the backends of `lb` until close(); follows its reconfigurations."""

    def __init__(self, lb, report=None):
        """report(vip, backend, up): where verdicts go (default: a command to
        lb's control loop)."""
        self.lb = lb
        self._report = report or self._to_balancer
        self._lock = threading.Lock()            # guards states, read by snapshots
        self.states: dict[tuple[str, str], TargetState] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._loop = asyncio.new_event_loop()
        limit = lb.configured.balancer.health.max_concurrent
        self._slots = asyncio.Semaphore(limit)
        self._thread = threading.Thread(target=self._loop.run_forever, name="pylb-health",
                                        daemon=True)
        self._thread.start()
        lb.on_reconfigure.append(self.update)
        lb.snapshot_extras.append(self._add_to_snapshot)
        self.update(lb.configured)

    def _to_balancer(self, vip: str, backend: str, up: bool) -> None:
        self.lb.submit(lambda b: b.set_health(vip, backend, up))

    def update(self, config: Config) -> None:
        """Follows a new configuration: checks start, stop or change; a
        backend whose check is unchanged keeps its state."""
        targets = targets_of(config)
        self._loop.call_soon_threadsafe(self._apply, targets)

    def _apply(self, targets: dict) -> None:
        carried = {}
        for key in list(self._tasks):
            if targets.get(key) != self._targets.get(key):
                self._tasks.pop(key).cancel()
                with self._lock:
                    state = self.states.pop(key, None)
                # A backend whose check settings changed keeps its verdict:
                # the balancer still acts on it, and only a flip is reported.
                if key in targets and state is not None:
                    carried[key] = TargetState(up=state.up, changed_at=state.changed_at)
        new = [t for key, t in sorted(targets.items()) if key not in self._tasks]
        for i, t in enumerate(new):
            # Spread the first checks over the interval, so that a VIP's
            # backends (and a restart's worth of VIPs) are not checked at once.
            offset = t.check.interval * i / max(len(new), 1)
            with self._lock:
                self.states[t.key] = carried.get(t.key) or TargetState()
            self._tasks[t.key] = self._loop.create_task(self._watch(t, offset))
        self._targets = targets

    async def _watch(self, t: Target, offset: float) -> None:
        await asyncio.sleep(offset)
        c = t.check
        while True:
            started = time.monotonic()
            async with self._slots:
                try:
                    await asyncio.wait_for(check_once(t), c.timeout)
                    ok, error = True, None
                except asyncio.TimeoutError:
                    ok, error = False, f"no answer within {c.timeout} s"
                except CheckFailed as err:
                    ok, error = False, str(err)
                except Exception as exc:  # a check must never end its backend's checking
                    ok, error = False, f"{type(exc).__name__}: {exc}"
            self._record(t, ok, error)
            await asyncio.sleep(max(0.0, c.interval - (time.monotonic() - started)))

    def _record(self, t: Target, ok: bool, error: str | None) -> None:
        with self._lock:
            s = self.states.get(t.key)
            if s is None:
                return
            s.checks += 1
            s.last_ok, s.last_error, s.last_checked = ok, error, time.time()
            if ok:
                s.successes, s.failures = s.successes + 1, 0
                flip = not s.up and s.successes >= t.check.rise
            else:
                s.successes, s.failures = 0, s.failures + 1
                flip = s.up and s.failures >= t.check.fall
            if flip:
                s.up, s.changed_at = not s.up, time.time()
        if flip:
            log.info("health check verdict", vip=t.vip, backend=t.backend, address=t.address,
                     up=ok, error=error)
            self._report(t.vip, t.backend, ok)

    def _add_to_snapshot(self, snap: dict) -> None:
        with self._lock:
            states = {k: (s.up, s.last_ok, s.last_error, s.last_checked, s.checks, s.changed_at)
                      for k, s in self.states.items()}
        for row in snap["backends"]:
            st = states.get((row["vip"], row["backend"]))
            if st is not None:
                t = self._targets.get((row["vip"], row["backend"]))
                row["check"] = {"type": t.check.type if t else None, "up": st[0],
                                "last_ok": st[1], "last_error": st[2], "last_checked": st[3],
                                "checks": st[4], "since": st[5]}

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop():
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
        for hooks, fn in ((self.lb.on_reconfigure, self.update),
                          (self.lb.snapshot_extras, self._add_to_snapshot)):
            if fn in hooks:
                hooks.remove(fn)
