"""Backend health checks (docs/operations.md): TCP connect, or an HTTP(S) GET that
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
from pylb.health_steer import HealthSteering, SteeringError

log = structlog.get_logger("pylb.health")
MAX_STATUS_LINE = 1024


@dataclass(frozen=True)
class Target:
    vip: str
    backend: str
    address: str
    port: int
    check: HealthCheck
    vip_address: str = ""                # where a `via: vip` check connects
    backend_id: int | None = None        # the balancer's id, that steers a `via: vip` check

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


def targets_of(config: Config, registry=None) -> dict[tuple[str, str], Target]:
    """Every backend check of config; registry (the balancer's backend ids)
    gives `via: vip` checks the id their connection is steered to."""
    out = {}
    for vip in config.vips:
        if vip.health is None:
            continue
        port = vip.health.port or vip.port
        for b in vip.backends:
            backend_id = None
            if vip.health.via == "vip" and registry is not None:
                backend_id = registry.id_for(vip.name, b.name, b.address)
            t = Target(vip.name, b.name, str(b.address), port, vip.health, str(vip.address),
                       backend_id)
            out[t.key] = t
    return out


class CheckFailed(Exception):
    pass


async def _connect(t: Target, tls, steering: HealthSteering | None):
    """(reader, writer, release): a connection to the backend, direct or
    through the VIP; release() ends its steering once it is closed."""
    if t.check.via == "direct":
        reader, writer = await asyncio.open_connection(t.address, t.port, ssl=tls)
        return reader, writer, lambda: None
    if steering is None or t.backend_id is None:
        raise CheckFailed("no path through the VIP (see the balancer's log)")
    loop = asyncio.get_running_loop()
    sock, key = steering.open_socket(t.vip_address, t.backend_id)
    release = lambda: steering.release(key, sock, loop)  # noqa: E731
    try:
        await loop.sock_connect(sock, (t.vip_address, t.port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname=(t.check.host or t.vip_address) if tls else None)
    except BaseException:
        sock.close()
        release()
        raise
    return reader, writer, release


async def check_once(t: Target, steering: HealthSteering | None = None) -> None:
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
        reader, writer, release = await _connect(t, tls, steering)
    except OSError as err:
        raise CheckFailed(f"connect: {err.strerror or err}") from None
    try:
        await _converse(t, reader, writer)
    finally:
        try:
            writer.close()
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
        finally:
            release()


async def _converse(t: Target, reader, writer) -> None:
    """What a check says and wants on an open connection."""
    c = t.check
    try:
        if c.type == "tcp":
            return
        to = t.vip_address if c.via == "vip" else t.address
        host = c.host or (f"[{to}]" if ":" in to else to)
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
        self.steering: HealthSteering | None = None   # for `via: vip` checks
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
        targets = targets_of(config, getattr(self.lb, "registry", None))
        self._loop.call_soon_threadsafe(self._apply, targets, config)

    def _prepare_vip_path(self, config: Config) -> None:
        """Readies the exception TAP for the VIPs checked `via: vip`. When it
        cannot, their checks fail (so the VIPs' backends fall, and the
        tables' fail-open rule applies) and the log says why."""
        vips = {str(v.address) for v in config.vips if v.health and v.health.via == "vip"}
        if not vips and self.steering is None:
            return
        try:
            if self.steering is None:
                if getattr(self.lb, "exception_port", None) is None:
                    raise SteeringError("the balancer has no exception TAP")
                b = config.balancer
                self.steering = HealthSteering(self.lb.worker, b.data.exception.tap_name,
                                               self.lb.port.mac, b.health.route_table,
                                               b.data.address_v4, b.data.address_v6)
            self.steering.prepare(vips)
        except SteeringError as err:
            log.error("health checks via the VIP cannot run", vips=sorted(vips), error=str(err))

    def _apply(self, targets: dict, config: Config) -> None:
        # Here, on the checks' thread: the `ip` commands it may run must not
        # hold up the control loop, which polls the data port.
        self._prepare_vip_path(config)
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
                    await asyncio.wait_for(check_once(t, self.steering), c.timeout)
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
        if self.steering is not None:
            self.steering.close()
        for hooks, fn in ((self.lb.on_reconfigure, self.update),
                          (self.lb.snapshot_extras, self._add_to_snapshot)):
            if fn in hooks:
                hooks.remove(fn)
