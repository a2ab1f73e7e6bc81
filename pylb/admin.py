"""The admin API: HTTP with JSON bodies on a local Unix socket (and, as an
option, on a TCP address), documented in docs/admin-api.md.

The server runs in threads of its own and never touches the DPDK worker: it
answers reads from the snapshot the control loop publishes every second
(Balancer.latest_snapshot) and hands everything that needs the live balancer
(a flow look-up, reload, drain) to the loop as a command, waiting for its
result with a deadline.
"""
from __future__ import annotations

import concurrent.futures
import errno
import http.client
import http.server
import json
import os
import pathlib
import socket
import socketserver
import stat
import threading
import time
import urllib.parse

import structlog

from pylb.errors import ConfigError, PylbError

log = structlog.get_logger("pylb.admin")
API = "/v1"
COMMAND_TIMEOUT_S = 10.0
MAX_BODY = 64 * 1024


class AdminError(PylbError):
    """The admin API could not be reached or refused a request."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class _ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pylb-admin/1"
    protocol_version = "HTTP/1.1"

    # Unix-socket peers have no address; the base class would index into it.
    def address_string(self) -> str:
        return "local" if isinstance(self.client_address, (str, bytes)) else self.client_address[0]

    def log_message(self, fmt: str, *args) -> None:
        log.debug("admin request", line=fmt % args, peer=self.address_string())

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        api: AdminServer = self.server.api
        url = urllib.parse.urlsplit(self.path)
        try:
            body = self._body()
            route = api.routes.get(url.path)
            if route is None:
                raise _ApiError(404, f"no such endpoint {url.path}; endpoints: "
                                + ", ".join(sorted(api.routes)))
            if method not in route:
                raise _ApiError(405, f"{url.path} takes {', '.join(sorted(route))}, not {method}")
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            status, payload = 200, route[method](query, body)
        except _ApiError as err:
            status, payload = err.status, {"error": str(err)}
        except Exception as exc:    # a bug must not kill the server thread silently
            log.exception("admin request failed", path=url.path)
            status, payload = 500, {"error": f"internal error: {exc}"}
        data = (json.dumps(payload, indent=1, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if not length:
            return {}
        try:
            n = int(length)
        except ValueError:
            raise _ApiError(400, "bad Content-Length") from None
        if n > MAX_BODY:
            raise _ApiError(413, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise _ApiError(400, f"body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "body must be a JSON object")
        return body


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


# TCPServer, not http.server.HTTPServer: that one resolves its own name (a DNS
# look-up at start), which a host without DNS waits on.
class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


def claim_socket_path(path: str | pathlib.Path) -> None:
    """Removes a socket file left by a balancer that died; refuses to take over
    one a running balancer still answers on."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"balancer.admin.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"balancer.admin.socket: {path}: {err.strerror}") from None
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError(f"balancer.admin.socket: {path} is in use: another balancer of this name "
                      "runs here (set balancer.admin.socket to tell them apart)")


class AdminServer:
    """Serves the API for one Balancer until close(). `extra_routes` adds
    endpoints: {path: {method: handler(query, body) -> JSON-able}}."""

    def __init__(self, lb, socket_path: str | None, address: tuple[str, int] | None = None):
        self.lb = lb
        self.socket_path = pathlib.Path(socket_path) if socket_path else None
        self.routes = {
            f"{API}/status": {"GET": self._status},
            f"{API}/backends": {"GET": self._backends},
            f"{API}/flows": {"GET": self._flow},
            f"{API}/reload": {"POST": self._reload},
            f"{API}/drain": {"POST": self._drain},
            f"{API}/ready": {"GET": self._ready},
        }
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._ownership_cache: dict = {}
        try:
            if self.socket_path is not None:
                claim_socket_path(self.socket_path)
                old_umask = os.umask(0o117)     # owner and group only: the API changes things
                try:
                    self._add(_UnixServer(str(self.socket_path), _Handler))
                finally:
                    os.umask(old_umask)
            if address is not None:
                self._add((_Tcp6Server if ":" in address[0] else _TcpServer)(address, _Handler))
        except OSError as err:
            self.close()
            where = self.socket_path if address is None else f"{self.socket_path} / {address}"
            raise ConfigError(f"admin API: cannot listen on {where}: {err.strerror}") from None
        except BaseException:
            self.close()
            raise

    def _add(self, server) -> None:
        server.api = self
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name=f"pylb-admin-{len(self._servers)}", daemon=True)
        self._servers.append(server)
        self._threads.append(thread)
        thread.start()

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        for s in self._servers:
            if isinstance(s, _TcpServer):
                return s.server_address[:2]
        return None

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []
        if self.socket_path is not None:
            try:
                self.socket_path.unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self) -> "AdminServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ endpoints

    def _snapshot(self) -> dict:
        """A snapshot taken now by the control loop (a few ms of its time), or,
        if the loop is busy past a second, the latest it published, marked."""
        future = self.lb.submit(lambda lb: lb.publish_snapshot())
        try:
            return future.result(timeout=1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
        snap = self.lb.latest_snapshot
        if snap is None:
            raise _ApiError(503, "the balancer has not published its state yet")
        return {**snap, "stale": True}

    def _command(self, command):
        """Runs command(lb) in the control loop and waits for it."""
        future = self.lb.submit(command)
        try:
            return future.result(timeout=COMMAND_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _ApiError(503, f"the control loop did not answer within {COMMAND_TIMEOUT_S} s") \
                from None

    def _status(self, query, body) -> dict:
        snap = dict(self._snapshot())
        if snap.get("cluster"):
            snap["cluster"] = {**snap["cluster"], "ownership": self._ownership(snap["cluster"])}
        return snap

    def _ownership(self, cluster: dict) -> dict:
        """Buckets each member owns and backs up, per table size. Computed here
        (the ownership rule alone, no balancer state) and kept while the members stay."""
        from pylb.ownership import Ownership
        key = (tuple(sorted(cluster["members"])), tuple(cluster["table_sizes"]))
        if key not in self._ownership_cache:
            out = {}
            for size in cluster["table_sizes"]:
                own = Ownership(list(key[0]), size)
                out[str(size)] = {m: {"owner": len(s.primary), "backup": len(s.backup)}
                                  for m in key[0] for s in [own.buckets_of(m)]}
            self._ownership_cache = {key: out}
        return self._ownership_cache[key]

    def _ready(self, query, body) -> dict:
        """For whatever decides where traffic goes (a router's check, an
        orchestrator): 200 while serving, 503 once a drain has started."""
        drain = self.lb.drain_state
        if drain is not None:
            raise _ApiError(503, f"draining: {drain['state']}")
        return {"ready": True}

    def _backends(self, query, body) -> dict:
        snap = self._snapshot()
        rows = snap["backends"]
        if "vip" in query:
            known = {v["name"] for v in snap["vips"]}
            if query["vip"] not in known:
                raise _ApiError(404, f"no VIP named {query['vip']!r}; VIPs: "
                                + ", ".join(sorted(known)))
            rows = [r for r in rows if r["vip"] == query["vip"]]
        return {"taken_at": snap["taken_at"], "backends": rows}

    def _flow(self, query, body) -> dict:
        from pylb.flow_id import FlowKey
        text = query.get("flow") or body.get("flow")
        if not text:
            raise _ApiError(400, "give the flow as ?flow=tcp 198.51.100.7:40000 -> 192.0.2.10:80")
        try:
            key = FlowKey.parse(text)
        except ValueError as err:
            raise _ApiError(400, f"bad flow {text!r}: {err}") from None
        return self._command(lambda lb: lb.lookup_flow(key))

    def _reload(self, query, body) -> dict:
        from pylb.balancer import Balancer
        if body:
            raise _ApiError(400, "reload takes no body: it reads the balancer's configuration file "
                            "again")
        try:
            return {"ok": True, **self._command(Balancer.reload)}
        except ConfigError as err:
            raise _ApiError(422, str(err)) from None

    def _drain(self, query, body) -> dict:
        from pylb.balancer import UnknownBackend
        unknown = set(body) - {"vip", "backend", "undo"}
        if unknown:
            raise _ApiError(400, f"unknown fields {sorted(unknown)}: drain takes vip, backend, "
                            "undo")
        vip, backend, undo = body.get("vip"), body.get("backend"), body.get("undo", False)
        if not isinstance(undo, bool):
            raise _ApiError(400, "undo must be true or false")
        if vip is None and backend is None:
            try:
                return self._command(lambda lb: lb.drain_balancer(undo=undo))
            except ConfigError as err:
                raise _ApiError(409, str(err)) from None
        if not isinstance(vip, str) or not isinstance(backend, str):
            raise _ApiError(400, "vip and backend must both be given, as strings")
        try:
            return self._command(lambda lb: lb.drain_backend(vip, backend, undo=undo))
        except UnknownBackend as err:
            raise _ApiError(404, str(err)) from None


# ---------------------------------------------------------------- client


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """The API as the CLI uses it. `target` is a socket path or http://host:port."""

    def __init__(self, target: str, timeout: float = COMMAND_TIMEOUT_S + 5):
        self.target = target
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.target.startswith("http://"):
            u = urllib.parse.urlsplit(self.target)
            return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)
        return _UnixConnection(self.target, self.timeout)

    def request(self, method: str, path: str, body: dict | None = None,
                query: dict | None = None) -> dict:
        url = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = self._connection()
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except FileNotFoundError:
            raise AdminError(f"{self.target}: no such socket: is the balancer running? "
                             "(pylb run; see balancer.admin.socket)") from None
        except ConnectionRefusedError:
            raise AdminError(f"{self.target}: connection refused: the balancer is not running")\
                from None
        except PermissionError:
            raise AdminError(f"{self.target}: permission denied (run as root or the socket's "
                             "group)") from None
        except (OSError, http.client.HTTPException) as err:
            raise AdminError(f"{self.target}: {err}") from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            raise AdminError(f"{self.target}: answer is not JSON (HTTP {resp.status})") from None
        if resp.status != 200:
            raise AdminError(payload.get("error", f"HTTP {resp.status}"), resp.status)
        return payload


def wait_for_socket(path: str, timeout: float) -> None:
    """Until a balancer answers on `path` (tests, scripts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(path, timeout=2).request("GET", "/status")
            return
        except AdminError as err:
            if time.monotonic() >= deadline:
                raise AdminError(f"{path}: no balancer answered within {timeout} s: {err}") \
                    from None
        time.sleep(0.05)
