"""The lab's clients: real TCP from the kernel's own stack, checked end to end.

One program per client namespace (`python -m pylb.lab.traffic WORKLOAD_JSON`),
one event loop, non-blocking sockets:

- echo connections: each opened once and kept for the whole run, streaming
  chunks of 1 to 8 KB at a steady pace with at most `window` bytes
  unanswered. The backend's echo service first names itself in one line,
  then returns every byte; every byte received is compared with what was
  sent (a per-connection offset into a seeded random pattern).
- HTTP: short requests on new connections at `http_rate` per second, each
  answered with the backend's name.

A **stall** is time with data outstanding (sent, not yet echoed) and no byte
coming back; it is measured, per connection, from the moment data became
outstanding or from the last byte received, whichever is later. A connection
is **broken** when it is reset, ends early, returns a wrong byte, or makes no
progress for `give_up` seconds.

The program prints JSON lines: "progress" every `progress_every` seconds,
"ready" once every echo connection is established (or broken), and
"result" with every connection's and every request's record when it ends.
SIGUSR1 asks it to finish: no new data or requests, every outstanding byte
back, then each connection half-closed and the backend's FIN awaited (an
orderly end, no reset). Times are CLOCK_MONOTONIC, which every process on
the machine shares, so the orchestrator can place them in its steps.
"""
from __future__ import annotations

import errno
import json
import random
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

PATTERN_BYTES = 1 << 20
RECV_BYTES = 65536


@dataclass
class Workload:
    """What one client does; passed to the program as JSON."""

    client: str
    sources: dict[str, str]        # family ("4", "6") -> this client's address
    vips: dict[str, str]           # family -> VIP address
    connections: int               # echo connections, split over the families
    echo_port: int = 7
    http_port: int = 80
    chunk_min: int = 1024
    chunk_max: int = 8192
    interval: float = 0.05         # mean pause between a connection's chunks, s
    window: int = 32768            # bytes a connection may have unanswered
    http_rate: float = 40.0        # new HTTP requests per second
    http_concurrency: int = 16
    http_timeout: float = 5.0
    stall_note: float = 0.15       # stalls longer than this are listed with their times
    give_up: float = 10.0          # no progress for this long: the connection is broken
    progress_every: float = 0.5
    seed: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        return cls(**json.loads(text))


# ---------------------------------------------------------------- one echo stream

@dataclass
class EchoRecord:
    """What happened to one echo connection (the "result" line carries these)."""

    id: str
    family: int
    src: str = ""
    dst: str = ""
    backend: str | None = None
    opened: float = 0.0
    established: float | None = None
    sent: int = 0
    verified: int = 0
    max_stall: float = 0.0
    stalls: list = field(default_factory=list)     # [start, end] of stalls over stall_note
    broken: dict | None = None                     # {"reason", "at", "since"}
    closed: float | None = None                    # orderly end: the backend's FIN received


def endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class EchoConnection:
    def __init__(self, record: EchoRecord, sock: socket.socket, pattern: memoryview,
                 offset: int, rng: random.Random, w: Workload):
        self.r, self.sock, self.pattern, self.offset, self.rng, self.w = \
            record, sock, pattern, offset, rng, w
        self.state = "connecting"
        self.greeting = b""
        self.out = memoryview(b"")
        self.next_send = 0.0
        self.waiting_since: float | None = None    # data outstanding, no progress since
        self.closing_since = 0.0

    @property
    def outstanding(self) -> int:
        return self.r.sent - self.r.verified

    @property
    def done(self) -> bool:
        return self.state in ("closed", "broken")

    def break_(self, reason: str, now: float, sel: selectors.BaseSelector) -> None:
        since = self.waiting_since if self.waiting_since is not None else now
        if self.waiting_since is not None:
            self._stall(now)
        self.r.broken = {"reason": reason, "at": now, "since": since}
        self.state = "broken"
        self._close(sel)

    def _close(self, sel: selectors.BaseSelector) -> None:
        try:
            sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()

    def _stall(self, now: float) -> None:
        gap = now - self.waiting_since
        self.r.max_stall = max(self.r.max_stall, gap)
        if gap >= self.w.stall_note:
            self.r.stalls.append([round(self.waiting_since, 4), round(now, 4)])

    def current_stall(self, now: float) -> float:
        if self.done or self.waiting_since is None:
            return 0.0
        return now - self.waiting_since

    def on_event(self, mask: int, now: float, sel: selectors.BaseSelector) -> None:
        if self.state == "connecting":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.break_(f"connect failed: {errno.errorcode.get(err, err)}", now, sel)
                return
            self.state = "greeting"
            self.r.established = now
            self.waiting_since = now     # the greeting is owed: waiting for it is a stall
            sel.modify(self.sock, selectors.EVENT_READ, self)
            return
        if mask & selectors.EVENT_READ:
            self._read(now, sel)
        if not self.done and mask & selectors.EVENT_WRITE:
            self._flush(now, sel)

    def _read(self, now: float, sel: selectors.BaseSelector) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.break_(f"reset after {self.r.verified} bytes verified", now, sel)
            return
        except OSError as exc:
            self.break_(f"{type(exc).__name__}: {exc}", now, sel)
            return
        if not data:
            if self.state == "closing" and self.outstanding == 0:
                self.r.closed = now
                self.state = "closed"
                self._close(sel)
            else:
                self.break_(f"closed by the other end after {self.r.verified} bytes verified",
                            now, sel)
            return
        if self.state == "greeting":
            self.greeting += data
            if b"\n" not in self.greeting:
                return
            line, data = self.greeting.split(b"\n", 1)
            self.r.backend = line.decode(errors="replace")
            self.state = "streaming"
            self.next_send = now
            self._progress(now)
            if not data:
                return
        self._verify(data, now, sel)

    def _verify(self, data: bytes, now: float, sel: selectors.BaseSelector) -> None:
        if len(data) > self.outstanding:
            self.break_(f"{len(data) - self.outstanding} bytes more than were sent", now, sel)
            return
        at = (self.offset + self.r.verified) % PATTERN_BYTES
        expected = self.pattern[at:at + len(data)]
        if data != expected:
            first = next(i for i in range(len(data)) if data[i] != expected[i])
            self.break_(f"wrong byte at offset {self.r.verified + first}", now, sel)
            return
        self.r.verified += len(data)
        self._progress(now)

    def _progress(self, now: float) -> None:
        if self.waiting_since is not None:
            self._stall(now)
        self.waiting_since = now if self.outstanding > 0 else None

    def tick(self, now: float, sending: bool, sel: selectors.BaseSelector) -> None:
        if self.done:
            return
        if self.state == "connecting":
            if now - self.r.opened > self.w.give_up:
                self.break_(f"not connected within {self.w.give_up} s", now, sel)
            return
        if self.waiting_since is not None and now - self.waiting_since > self.w.give_up:
            self.break_(f"no progress for {self.w.give_up} s", now, sel)
            return
        if self.state == "closing":
            if now - self.closing_since > self.w.give_up:
                self.break_(f"no FIN from the backend within {self.w.give_up} s", now, sel)
            return
        if self.state != "streaming":
            return
        if not sending:
            if self.outstanding == 0 and not self.out:
                # Every byte is back: half-close, and expect the backend's FIN.
                self.sock.shutdown(socket.SHUT_WR)
                self.state = "closing"
                self.closing_since = now
            return
        if now < self.next_send:
            return
        size = self.rng.randint(self.w.chunk_min, self.w.chunk_max)
        if self.outstanding + size > self.w.window:
            return                      # the window is full; try again next tick
        at = (self.offset + self.r.sent) % PATTERN_BYTES
        chunk = self.pattern[at:at + size]
        self.out = memoryview(bytes(self.out) + bytes(chunk)) if self.out else chunk
        if self.outstanding == 0:
            self.waiting_since = now
        self.r.sent += size
        self.next_send = now + self.w.interval * self.rng.uniform(0.5, 1.5)
        self._flush(now, sel)

    def _flush(self, now: float, sel: selectors.BaseSelector) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError as exc:
                reason = "reset" if isinstance(exc, ConnectionResetError) else str(exc)
                self.break_(f"send: {reason} after {self.r.verified} bytes verified", now, sel)
                return
            self.out = self.out[n:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        sel.modify(self.sock, events, self)


# ---------------------------------------------------------------- one HTTP request

class HttpRequest:
    def __init__(self, sock: socket.socket, family: int, started: float, host: str):
        self.sock, self.family, self.started = sock, family, started
        self.state = "connecting"
        self.request = memoryview(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                                  .encode())
        self.response = b""
        self.src = endpoint(*sock.getsockname()[:2])
        # [started, ended, ok, backend or reason, family, client address:port]
        self.result: list | None = None

    def finish(self, now: float, ok: bool, what: str, sel: selectors.BaseSelector) -> None:
        self.result = [round(self.started, 4), round(now, 4), ok, what, self.family, self.src]
        try:
            sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()

    def on_event(self, mask: int, now: float, sel: selectors.BaseSelector) -> None:
        try:
            if self.state == "connecting":
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.finish(now, False, f"connect: {errno.errorcode.get(err, err)}", sel)
                    return
                self.state = "sending"
            if self.state == "sending":
                self.request = self.request[self.sock.send(self.request):]
                if not self.request:
                    self.state = "receiving"
                    sel.modify(self.sock, selectors.EVENT_READ, self)
                return
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(now, False, "reset" if isinstance(exc, ConnectionResetError)
                        else f"{type(exc).__name__}: {exc}", sel)
            return
        if data:
            self.response += data
            return
        head, _, body = self.response.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1:2]
        if status != [b"200"]:
            self.finish(now, False, f"status {status[0].decode() if status else 'missing'}", sel)
            return
        try:
            self.finish(now, True, json.loads(body)["backend"], sel)
        except (ValueError, KeyError):
            self.finish(now, False, "unreadable answer", sel)


# ---------------------------------------------------------------- the loop

class Client:
    def __init__(self, w: Workload):
        self.w = w
        rng = random.Random(w.seed)
        pattern = rng.randbytes(PATTERN_BYTES)
        # Twice over, so that a slice from any offset never wraps.
        self.pattern = memoryview(pattern + pattern)
        self.rng = rng
        self.sel = selectors.DefaultSelector()
        self.conns: list[EchoConnection] = []
        self.requests: list[HttpRequest] = []
        self.http_done: list[list] = []
        self.finishing = False
        self.ready_said = False
        families = [f for f in ("4", "6") if f in w.sources and f in w.vips]
        self.families = families

    def open_echo(self, index: int, now: float) -> None:
        family = self.families[index % len(self.families)]
        af = socket.AF_INET6 if family == "6" else socket.AF_INET
        sock = socket.socket(af, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((self.w.sources[family], 0))
        record = EchoRecord(f"{self.w.client}/{index}", int(family), opened=now)
        conn = EchoConnection(record, sock, self.pattern, self.rng.randrange(PATTERN_BYTES),
                              random.Random(self.rng.random()), self.w)
        record.src = endpoint(self.w.sources[family], sock.getsockname()[1])
        record.dst = endpoint(self.w.vips[family], self.w.echo_port)
        self.conns.append(conn)
        err = sock.connect_ex((self.w.vips[family], self.w.echo_port))
        if err not in (0, errno.EINPROGRESS):
            conn.break_(f"connect: {errno.errorcode.get(err, err)}", now, self.sel)
            return
        self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def open_http(self, now: float) -> None:
        family = self.families[len(self.http_done) % len(self.families)]
        af = socket.AF_INET6 if family == "6" else socket.AF_INET
        sock = socket.socket(af, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((self.w.sources[family], 0))
        req = HttpRequest(sock, int(family), now, self.w.vips[family])
        err = sock.connect_ex((self.w.vips[family], self.w.http_port))
        if err not in (0, errno.EINPROGRESS):
            req.finish(now, False, f"connect: {errno.errorcode.get(err, err)}", self.sel)
            self.http_done.append(req.result)
            return
        self.sel.register(sock, selectors.EVENT_WRITE, req)
        self.requests.append(req)

    def progress(self, now: float) -> dict:
        by_backend: dict[str, dict] = {}
        for c in self.conns:
            if c.r.backend is not None:
                b = by_backend.setdefault(c.r.backend, {"conns": 0, "bytes": 0, "http": 0})
                b["conns"] += not c.done
                b["bytes"] += c.r.verified
        ok = [r for r in self.http_done if r[2]]
        for r in ok:
            by_backend.setdefault(r[3], {"conns": 0, "bytes": 0, "http": 0})["http"] += 1
        return {"type": "progress", "client": self.w.client, "t": round(now, 4),
                "connections": len(self.conns),
                "established": sum(c.r.established is not None and not c.done for c in self.conns),
                "broken": sum(c.state == "broken" for c in self.conns),
                "closed": sum(c.state == "closed" for c in self.conns),
                "verified": sum(c.r.verified for c in self.conns),
                "longest_stall_now": round(max((c.current_stall(now) for c in self.conns),
                                               default=0.0), 3),
                "http_ok": len(ok), "http_failed": len(self.http_done) - len(ok),
                "backends": by_backend}

    def run(self, say) -> None:
        w = self.w
        now = time.monotonic()
        for i in range(w.connections):
            self.open_echo(i, now)
        next_http = next_progress = now
        while True:
            now = time.monotonic()
            for key, mask in self.sel.select(timeout=0.01):
                key.data.on_event(mask, now, self.sel)
            now = time.monotonic()
            for conn in self.conns:
                conn.tick(now, not self.finishing, self.sel)
            for req in self.requests:
                if req.result is None and now - req.started > w.http_timeout:
                    req.finish(now, False, "timeout", self.sel)
            self.http_done += [r.result for r in self.requests if r.result is not None]
            self.requests = [r for r in self.requests if r.result is None]
            if not self.finishing and w.http_rate > 0:
                if now - next_http > 1.0:      # fell behind (a busy machine): do not burst
                    next_http = now
                while now >= next_http:
                    next_http += 1.0 / w.http_rate
                    if len(self.requests) < w.http_concurrency:
                        self.open_http(now)
            if not self.ready_said and all(c.state not in ("connecting", "greeting")
                                           for c in self.conns):
                self.ready_said = True
                say({"type": "ready", "client": w.client, "t": round(now, 4)})
            if now >= next_progress:
                next_progress = now + w.progress_every
                say(self.progress(now))
            if self.finishing and not self.requests and all(c.done for c in self.conns):
                break
        say(self.progress(time.monotonic()))
        say({"type": "result", "client": w.client,
             "connections": [asdict(c.r) for c in self.conns], "http": self.http_done})


def main(argv: list[str]) -> None:
    client = Client(Workload.from_json(argv[0]))

    def finish(signum, frame) -> None:
        client.finishing = True

    signal.signal(signal.SIGUSR1, finish)

    def say(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    client.run(say)


if __name__ == "__main__":
    main(sys.argv[1:])
