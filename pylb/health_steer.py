"""Health checks that take the traffic's path (`health.via: vip`,
docs/operations.md): the kernel's own TCP connects to the VIP, and the
balancer encapsulates the connection to the backend under check, as it would a
client's. A check then fails when anything on that path fails (the backend's
decapsulation, its VIP on loopback, its route back), not only its service.

How a check gets there:
- the kernel reaches the data port through the exception TAP: the balancer's
  data addresses are put on the TAP, so the backend's answer (sent straight to
  the check's source, as DSR) comes back through the exception path;
- a check socket is bound to the TAP (SO_BINDTODEVICE) and to the data
  address of the VIP's family; a policy rule sends what such sockets send by
  a table of their own (`balancer.health.route_table`) where each VIP is
  on-link on the TAP, with a permanent neighbour entry, so the host's other
  routes and its own connections to the VIPs do not change;
- the socket's local port is steered to the backend's id in the worker
  (`pylb_worker_steer_health`) before it connects, and released after it
  closed: frames from a steered port to a VIP leave encapsulated to that
  backend, everything else from the TAP leaves unchanged.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import subprocess
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("pylb.health")
# Frames of a closed check (its RST) may still wait in the TAP: the port stays
# steered this long after the close, unless a new check took it meanwhile.
RELEASE_AFTER_S = 1.0


class SteeringError(Exception):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise SteeringError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _sysctl(path: str, value: str) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as err:
        raise SteeringError(f"sysctl {path}={value}: {err.strerror}") from None


class HealthSteering:
    """The kernel side (TAP addresses, policy routes) and the worker's
    steering of check connections; `close()` removes the policy rules (the
    TAP, and what is on it, goes with the port)."""

    def __init__(self, worker, tap: str, mac: str, table: int, data_v4, data_v6):
        self.worker, self.tap, self.mac, self.table = worker, tap, mac, table
        self.sources = {4: data_v4, 6: data_v6}
        self._prepared: set = set()          # VIP addresses routed through the TAP
        self._families: set[int] = set()     # families whose rule and address are in place
        self._lock = threading.Lock()
        self._tokens: dict[tuple[int, int], object] = {}   # steered (family, port) -> its check

    def prepare(self, vip_addresses) -> None:
        """Makes the TAP carry checks to exactly these VIPs: VIPs new to it
        are routed, VIPs no longer checked this way lose their route and
        neighbour entry. Raises SteeringError."""
        wanted = {ipaddress.ip_address(a) for a in vip_addresses}
        for address in sorted(self._prepared - wanted, key=lambda a: (a.version, a)):
            fam = f"-{address.version}"
            for args in (("route", "del", str(address), "table", str(self.table)),
                         ("neigh", "del", str(address), "dev", self.tap)):
                with contextlib.suppress(SteeringError):
                    _ip(fam, *args)
            self._prepared.discard(address)
        for address in sorted(wanted - self._prepared, key=lambda a: (a.version, a)):
            family = address.version
            if family not in self._families:
                self._prepare_family(family)
            fam = f"-{family}"
            _ip(fam, "route", "replace", str(address), "dev", self.tap, "table", str(self.table))
            _ip(fam, "neigh", "replace", str(address), "lladdr", self.mac, "dev", self.tap,
                "nud", "permanent")
            self._prepared.add(address)

    def _prepare_family(self, family: int) -> None:
        source = self.sources[family]
        if source is None:
            raise SteeringError(f"checks via the VIP need balancer.data.address_v{family}")
        fam = f"-{family}"
        if family == 6:
            # Only the check sockets' address: no autoconfiguration, no
            # router solicitation, no duplicate detection sent to the wire.
            for name, value in (("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0"),
                                ("addr_gen_mode", "1"), ("disable_ipv6", "0")):
                _sysctl(f"net/ipv6/conf/{self.tap}/{name}", value)
            _ip(fam, "addr", "replace", f"{source}/128", "dev", self.tap, "nodad")
        else:
            # The answer arrives on the TAP from a VIP the host would route
            # elsewhere: strict reverse-path filtering would drop it.
            _sysctl(f"net/ipv4/conf/{self.tap}/rp_filter", "0")
            _ip(fam, "addr", "replace", f"{source}/32", "dev", self.tap)
        _ip("link", "set", self.tap, "up")
        # One rule and a clean table, after a crash too.
        self._rule("del", family, missing_ok=True)
        with contextlib.suppress(SteeringError):
            _ip(fam, "route", "flush", "table", str(self.table))
        self._rule("add", family)
        self._families.add(family)

    def _rule(self, verb: str, family: int, missing_ok: bool = False) -> None:
        try:
            _ip(f"-{family}", "rule", verb, "oif", self.tap, "lookup", str(self.table))
        except SteeringError:
            if not missing_ok:
                raise

    def open_socket(self, vip, backend_id: int) -> tuple[socket.socket, tuple[int, int]]:
        """A non-blocking TCP socket for one check of backend_id through vip,
        steered already, and its steering key: connect the socket to (vip,
        port), close it, then release(key, sock, loop)."""
        family = ipaddress.ip_address(vip).version
        sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                             socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.tap.encode())
            # Closing resets the connection: no TIME_WAIT on a steered port,
            # whose frames would otherwise outlive its steering.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.bind((str(self.sources[family]), 0))
            sock.setblocking(False)
            key = (family, sock.getsockname()[1])
            with self._lock:
                self.worker.steer_health(family, key[1], backend_id)
                self._tokens[key] = sock
        except BaseException:
            sock.close()
            raise
        return sock, key

    def release(self, key: tuple[int, int], sock: socket.socket, loop) -> None:
        """Ends the steering of a closed check's port, RELEASE_AFTER_S later."""
        loop.call_later(RELEASE_AFTER_S, self._release, key, sock)

    def _release(self, key: tuple[int, int], sock: socket.socket) -> None:
        with self._lock:
            if self._tokens.get(key) is not sock:
                return   # a newer check took the port: its steering stays
            del self._tokens[key]
            with contextlib.suppress(Exception):   # the worker may be gone at shutdown
                self.worker.steer_health(key[0], key[1], None)

    def close(self) -> None:
        for family in sorted(self._families):
            try:
                self._rule("del", family)
            except SteeringError as err:
                log.warning("health check rule not removed", error=str(err))
        self._families.clear()
        self._prepared.clear()
