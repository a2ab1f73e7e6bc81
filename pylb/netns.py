"""Network namespaces, veth pairs and processes inside them, always removed.

The tests and the lab build their networks from namespaces on one machine. A
`Topology` creates them and undoes everything, in reverse order, when it is
closed: on normal exit, on an exception and on KeyboardInterrupt.

A run that dies without closing (SIGKILL, a timeout that kills the process)
cannot clean up, so every name it creates says who created it:
"pl" + base36(pid) + "_" + base36(counter), e.g. namespace "pl2x4k_3-backend",
interface "pl2x4k_5a". The creator's process start time is kept in
/run/pylb-tests/<pid>, so a pid that was reused is not mistaken for the
creator. `cleanup_stale()` (run whenever a Topology starts) removes whatever
a dead creator left.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pylb.errors import PylbError

__all__ = [
    "ETHTOOL_OFFLOADS", "IFNAMSIZ", "NAMESPACE_SYSCTLS", "PREFIX", "REGISTRY", "Interface",
    "LoggedProcess", "Namespace", "NetnsError", "Process", "Topology", "base36",
    "cleanup_stale", "delete_link", "delete_namespace", "ip", "list_links", "list_namespaces",
    "namespace_pids", "owner_alive", "owner_pid", "process_start", "run_tag",
]

PREFIX = "pl"
REGISTRY = Path("/run/pylb-tests")
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15
_OWNER = re.compile(rf"^{PREFIX}([0-9a-z]{{1,6}})_")
_CLONE_NEWNET = 0x40000000

# Applied in every namespace before its interfaces exist, so that they inherit
# it: packets arrive on other interfaces than the route back (DSR, tunnels),
# and IPv6 addresses must be usable at once rather than after DAD.
NAMESPACE_SYSCTLS = {
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}


# The kernel's ethtool ioctl and its per-offload commands (linux/ethtool.h):
# what `ethtool -K` changes, without the ethtool program (optional on Debian).
SIOCETHTOOL = 0x8946
ETHTOOL_OFFLOADS = {  # name as `ethtool -K` spells it: (get command, set command)
    "tx": (0x16, 0x17),    # TX checksum
    "sg": (0x18, 0x19),    # scatter-gather
    "tso": (0x1E, 0x1F),   # TCP segmentation
    "gso": (0x23, 0x24),   # generic segmentation
    "gro": (0x2B, 0x2C),   # generic receive
}


class NetnsError(PylbError):
    """A namespace, link or process could not be created or removed."""


def base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def run_tag(pid: int | None = None) -> str:
    """The prefix of every name created by process `pid` (default: this one)."""
    return f"{PREFIX}{base36(os.getpid() if pid is None else pid)}_"


def owner_pid(name: str) -> int | None:
    """The pid encoded in a name of ours, None for anybody else's name."""
    match = _OWNER.match(name)
    return int(match.group(1), 36) if match else None


def process_start(pid: int) -> int | None:
    """Start time in clock ticks since boot; None when dead (zombies included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else int(fields[19])


def owner_alive(pid: int) -> bool:
    start = process_start(pid)
    if start is None:
        return False
    try:
        recorded = int((REGISTRY / str(pid)).read_text())
    except (FileNotFoundError, ValueError):
        return True  # no record: trust the pid rather than destroy a live run
    return recorded == start


# ---------------------------------------------------------------- commands

def _command(argv: list[str], timeout: float = 30) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no answer in {timeout} s") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def ip(namespace: str | None, *args: str) -> str:
    """Runs `ip` in a namespace (None: the root namespace)."""
    return _command(["ip", *(["-n", namespace] if namespace else []), *args])


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def list_links(namespace: str | None = None) -> list[str]:
    return [link["ifname"] for link in json.loads(ip(namespace, "-j", "link", "show") or "[]")]


def namespace_pids(name: str) -> list[int]:
    try:
        return [int(pid) for pid in _command(["ip", "netns", "pids", name]).split()]
    except NetnsError:
        return []


def delete_namespace(name: str) -> None:
    """Kills what still runs inside (it would keep the namespace alive), then
    removes it. A namespace already gone is not an error."""
    for _ in range(10):  # again, in case something forked while being killed
        pids = namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if (NETNS_DIR / name).exists():
        try:
            _command(["ip", "netns", "delete", name])
        except NetnsError:
            if (NETNS_DIR / name).exists():
                raise


def delete_link(namespace: str | None, name: str) -> None:
    """Deletes a link (for veth: the pair). A link already gone is not an error."""
    try:
        ip(namespace, "link", "delete", name)
    except NetnsError:
        if namespace and not (NETNS_DIR / namespace).exists():
            return
        if name in list_links(namespace):
            raise


def cleanup_stale() -> list[str]:
    """Removes namespaces, root-namespace links and registry entries whose
    creator is dead. Returns the names removed."""
    verdicts: dict[int, bool] = {}

    def stale(name: str) -> bool:
        pid = owner_pid(name)
        if pid is None:
            return False
        if pid not in verdicts:
            verdicts[pid] = not owner_alive(pid)
        return verdicts[pid]

    removed = []
    for name in filter(stale, list_namespaces()):
        delete_namespace(name)
        removed.append(name)
    for name in filter(stale, list_links()):
        delete_link(None, name)
        removed.append(name)
    if REGISTRY.is_dir():
        for entry in REGISTRY.iterdir():
            if entry.name.isdigit() and stale(run_tag(int(entry.name))):
                entry.unlink(missing_ok=True)
    return removed


_registry_lock = threading.Lock()
_registry_users = 0
_counter = 0


def _next_name(suffix: str = "") -> str:
    global _counter
    with _registry_lock:
        _counter += 1
        return f"{run_tag()}{base36(_counter)}{suffix}"


def _register() -> None:
    """Sweeps up dead runs, then records this process as a live creator."""
    global _registry_users
    with _registry_lock:
        if _registry_users == 0:
            cleanup_stale()
            REGISTRY.mkdir(parents=True, exist_ok=True)
            (REGISTRY / str(os.getpid())).write_text(str(process_start(os.getpid())))
        _registry_users += 1


def _unregister() -> None:
    global _registry_users
    with _registry_lock:
        _registry_users -= 1
        if _registry_users == 0:
            (REGISTRY / str(os.getpid())).unlink(missing_ok=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


# ---------------------------------------------------------------- objects

class Process:
    """A background process in a namespace; its whole process group is killed
    when the topology closes."""

    def __init__(self, popen: subprocess.Popen, argv: list[str]):
        self.popen = popen
        self.argv = argv
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def readline(self, timeout: float) -> str:
        """The next line of output. TimeoutError if none comes in time,
        NetnsError if the process ended first."""
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"{self.argv}: no line within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise NetnsError(f"{self.argv} ended (rc={self.popen.wait()}): "
                                 f"{self._pending.decode(errors='replace')}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode(errors="replace")

    def stop(self, grace: float = 2.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
                break
        self.popen.wait()
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()


class LoggedProcess(Process):
    """A background process whose stdout and stderr are collected apart, as
    they come, by reader threads: a chatty process never blocks on a full
    pipe, a test can wait for a line, and everything the process said can go
    into an assertion message. Made by `Namespace.spawn_logged`."""

    def __init__(self, popen: subprocess.Popen, argv: list[str], grace: float = 2.0):
        super().__init__(popen, argv)
        self.grace = grace
        self._said = {"stdout": bytearray(), "stderr": bytearray()}
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._collect, args=(name, stream), daemon=True,
                                          name=f"output of {argv[0]}")
                         for name, stream in (("stdout", popen.stdout), ("stderr", popen.stderr))]
        for reader in self._readers:
            reader.start()

    def _collect(self, name: str, stream) -> None:
        """Reads until EOF, then closes the stream: only the reader closes it,
        so its descriptor cannot be reused under a read still blocked on it (a
        grandchild may hold the pipe open after the process ended)."""
        fd = stream.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                with self._changed:
                    self._said[name] += chunk
                    self._changed.notify_all()
                if not chunk:
                    return
        finally:
            stream.close()

    @property
    def stdout(self) -> str:
        with self._changed:
            return self._said["stdout"].decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._changed:
            return self._said["stderr"].decode(errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def readline(self, timeout: float) -> str:
        raise NetnsError("a LoggedProcess's output is read by its collector: use wait_for()")

    def wait_for(self, text: str, timeout: float) -> None:
        """Waits until `text` appears in stdout or stderr. TimeoutError if it
        does not in time, NetnsError if the process ended without saying it;
        both carry the transcript."""
        deadline = time.monotonic() + timeout
        needle = text.encode()
        with self._changed:
            while not any(needle in said for said in self._said.values()):
                if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise NetnsError(f"{self.argv} ended without saying {text!r}\n"
                                     + self._transcript_locked())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.argv}: {text!r} not said within {timeout} s\n"
                                       + self._transcript_locked())
                self._changed.wait(min(left, 0.1))  # also notices an exit without output

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM to the process group, then waits up to `timeout` s for the
        exit and for the last output. Returns the exit status, or None if it
        still runs (stop(), at the latest the topology's clean-up, kills it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        """Waits up to `timeout` s for the process to end by itself, then for
        its last output. Returns the exit status, or None if it still runs."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(1.0)  # a grandchild may still hold the pipe: bounded
        return rc

    def stop(self, grace: float | None = None) -> None:
        """Like Process.stop (SIGTERM, SIGKILL after the grace time), keeping
        the output: the readers get the last of it and close the streams."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(self.grace if grace is None else grace)
                break
        self.popen.wait()
        for reader in self._readers:
            reader.join(1.0)  # bounded: a grandchild may hold the pipe a while

    def _transcript_locked(self) -> str:
        rc = self.popen.poll()
        out = self._said["stdout"].decode(errors="replace")
        err = self._said["stderr"].decode(errors="replace")
        return (f"--- {' '.join(self.argv)} (pid {self.popen.pid}, "
                f"{'running' if rc is None else f'exit status {rc}'})\n"
                f"--- stdout:\n{out}--- stderr:\n{err}--- end")

    def transcript(self) -> str:
        """The command, its status and everything it said, for failure messages."""
        with self._changed:
            return self._transcript_locked()


class Interface:
    """A link in a namespace (namespace None: the root namespace)."""

    def __init__(self, name: str, namespace: Namespace | None):
        self.name = name
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"Interface({self.name!r} in {self.namespace.name if self.namespace else 'root'})"

    def ip(self, *args: str) -> str:
        return ip(self.namespace.name if self.namespace else None, *args)

    def up(self) -> Interface:
        self.ip("link", "set", self.name, "up")
        return self

    def add_address(self, cidr: str) -> Interface:
        """Adds an address; IPv6 ones skip DAD, so they are usable at once."""
        nodad = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        self.ip("address", "add", cidr, "dev", self.name, *nodad)
        return self

    def set_mac(self, mac: str) -> Interface:
        self.ip("link", "set", self.name, "address", mac)
        return self

    @property
    def mac(self) -> str:
        return json.loads(self.ip("-j", "link", "show", "dev", self.name))[0]["address"]

    def set_offloads(self, **wanted: bool) -> dict[str, bool]:
        """Turns offloads on or off as `ethtool -K` does, e.g.
        set_offloads(tx=False, tso=False); names as in ETHTOOL_OFFLOADS.
        Returns every one of them as read back afterwards: the kernel keeps
        what a device cannot change and drops what depends on another (TSO
        needs TX checksum), so callers check the outcome, not the request."""
        unknown = set(wanted) - set(ETHTOOL_OFFLOADS)
        if unknown:
            raise NetnsError(f"unknown offloads {sorted(unknown)}: known are "
                             f"{sorted(ETHTOOL_OFFLOADS)}")

        def apply() -> dict[str, bool]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for name, on in wanted.items():
                    _ethtool_value(sock, self.name, ETHTOOL_OFFLOADS[name][1], int(on))
                return {name: bool(_ethtool_value(sock, self.name, get))
                        for name, (get, _) in ETHTOOL_OFFLOADS.items()}

        try:
            return self.namespace.call(apply) if self.namespace else apply()
        except OSError as exc:
            raise NetnsError(f"{self}: offloads {wanted}: {exc}") from exc


def _ethtool_value(sock: socket.socket, ifname: str, cmd: int, data: int = 0) -> int:
    """One ethtool command on a struct ethtool_value {u32 cmd, data}, which the
    kernel reads (set) or fills in (get) through the pointer in the ifreq."""
    value = ctypes.create_string_buffer(struct.pack("=II", cmd, data), 8)
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    return struct.unpack("=II", value.raw)[1]


class Namespace:
    def __init__(self, name: str, topology: Topology):
        self.name = name
        self._topology = topology

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def ip(self, *args: str) -> str:
        return ip(self.name, *args)

    def interface(self, name: str) -> Interface:
        """An existing link of this namespace ("lo", or one made by `ip`)."""
        return Interface(name, self)

    def sysctl(self, settings: dict[str, str | int]) -> None:
        self.run("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Runs a command inside the namespace and waits for it."""
        full = ["ip", "netns", "exec", self.name, *argv]
        try:
            done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"{argv} in {self.name}: no end in {timeout} s") from exc
        if check and done.returncode != 0:
            raise NetnsError(f"{argv} in {self.name}: rc={done.returncode}: {done.stderr.strip()}")
        return done

    def spawn(self, *argv: str, **popen_args: Any) -> Process:
        """Starts a background process inside the namespace, in its own process
        group. stdout and stderr come together through Process.readline unless
        popen_args say otherwise."""
        popen_args = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                      "stderr": subprocess.STDOUT, **popen_args}
        popen = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                 start_new_session=True, **popen_args)
        process = Process(popen, list(argv))
        self._topology.defer(process.stop, f"process {argv[0]} ({popen.pid})")
        self._wait_entered(popen)
        return process

    def spawn_logged(self, *argv: str, grace: float = 2.0, **popen_args: Any) -> LoggedProcess:
        """Starts a background process inside the namespace, in its own process
        group, collecting stdout and stderr apart (LoggedProcess). The clean-up
        sends SIGTERM, so the process can exit as it would in service, and
        SIGKILL after `grace` seconds."""
        popen_args = {"stdin": subprocess.DEVNULL, **popen_args,
                      "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        popen = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                 start_new_session=True, **popen_args)
        try:
            process = LoggedProcess(popen, list(argv), grace)
        except BaseException:  # e.g. no thread for the readers: nothing may escape
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        self._topology.defer(process.stop, f"process {argv[0]} ({popen.pid})")
        self._wait_entered(popen)
        return process

    def _wait_entered(self, popen: subprocess.Popen, timeout: float = 10.0) -> None:
        """Returns once the process is inside this namespace (or has ended).
        `ip netns exec` enters it some time after the fork; a sweep of the
        namespace in between would miss the process, which could then live on
        in a namespace no longer listed anywhere."""
        mark = (NETNS_DIR / self.name).stat()
        want = (mark.st_dev, mark.st_ino)
        deadline = time.monotonic() + timeout
        while popen.poll() is None:
            try:
                seen = os.stat(f"/proc/{popen.pid}/ns/net")
                if (seen.st_dev, seen.st_ino) == want:
                    return
            except FileNotFoundError:
                return  # ended between poll and stat
            if time.monotonic() > deadline:
                raise NetnsError(f"process {popen.pid} did not enter {self.name} in {timeout} s")
            time.sleep(0.002)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls fn in a thread that entered this namespace: sockets it creates
        belong to the namespace, the caller's thread stays where it is."""
        result: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                result["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=body, name=f"netns {self.name}")
        thread.start()
        try:
            thread.join()
        except KeyboardInterrupt:
            thread.join(1.0)  # so that what fn made is registered for clean-up
            raise
        if "error" in result:
            raise result["error"]
        return result["value"]

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket of this namespace, closed with the topology (an open socket
        would keep the namespace alive)."""
        def make() -> socket.socket:
            sock = socket.socket(family, type, proto)
            self._topology.defer(sock.close, f"socket in {self.name}")
            return sock

        return self.call(make)


class Topology:
    """Creates namespaces, veth pairs, processes and sockets, and removes them
    all in reverse order on close(). Use as a context manager."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.namespaces: list[str] = []
        self.links: list[tuple[str | None, str]] = []
        self.closed = False
        _register()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except NetnsError as failure:  # the body's exception stays the one raised
            exc.add_note(str(failure))

    def defer(self, undo: Callable[[], None], what: str) -> None:
        """Registers a clean-up step, run in reverse order of registration."""
        self._undo.append((what, undo))

    def namespace(self, label: str = "") -> Namespace:
        label = re.sub(r"[^a-z0-9-]", "", label.lower())[:32]
        name = _next_name(f"-{label}" if label else "")
        # Undo first: an interrupt may come after the kernel made it but
        # before we would have heard back.
        self.namespaces.append(name)
        self.defer(lambda: delete_namespace(name), f"namespace {name}")
        _command(["ip", "netns", "add", name])
        namespace = Namespace(name, self)
        namespace.sysctl(NAMESPACE_SYSCTLS)
        namespace.interface("lo").up()
        return namespace

    def veth(self, a: Namespace | None, b: Namespace | None,
             names: tuple[str | None, str | None] = (None, None)) -> tuple[Interface, Interface]:
        """A veth pair from a to b (None: the root namespace), both ends up.
        Ends in the root namespace always get generated names; ends inside
        a namespace of this topology may be named freely."""
        base = _next_name()
        ends = []
        for ns, name, side in ((a, names[0], "a"), (b, names[1], "b")):
            if ns is None or not name:
                name = base + side
            if len(name) > IFNAMSIZ:
                raise NetnsError(f"interface name {name!r} is longer than {IFNAMSIZ}")
            ends.append(Interface(name, ns))
        first, second = ends
        argv = ["link", "add", "name", first.name]
        argv += ["netns", first.namespace.name] if first.namespace else []
        argv += ["type", "veth", "peer", "name", second.name]
        argv += ["netns", second.namespace.name] if second.namespace else []
        where = first.namespace.name if first.namespace else None
        self.links.append((where, first.name))
        self.defer(lambda: delete_link(where, first.name), f"veth {first.name}")
        ip(None, *argv)
        for end in ends:
            end.up()
        return ends[0], ends[1]

    def leftovers(self) -> list[str]:
        """What of this topology still exists (empty after a good close())."""
        left = [n for n in self.namespaces if (NETNS_DIR / n).exists()]
        root_links = set(list_links())
        left += [name for ns, name in self.links if ns is None and name in root_links]
        return left

    def close(self) -> None:
        """Undoes everything. Every step runs even when some fail; a second
        Ctrl-C waits until the clean-up is over."""
        if self.closed:
            return
        errors, stopped_by = [], None
        with _sigint_deferred():
            while self._undo:
                what, undo = self._undo.pop()
                try:
                    undo()
                except BaseException as exc:  # keep going: the next steps still matter
                    errors.append(f"{what}: {exc!r}")
                    if not isinstance(exc, Exception):  # e.g. pytest-timeout's Failed
                        stopped_by = stopped_by or exc
            self.closed = True
            _unregister()
            left = self.leftovers()
        if stopped_by:
            raise stopped_by
        if left:
            errors.append(f"still present: {left}")
        if errors:
            raise NetnsError("clean-up incomplete: " + "; ".join(errors))


@contextlib.contextmanager
def _sigint_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
