"""A balancer running its control loop in a thread, as `pylb run` does in its
main thread, on a DPDK ring port of the test process; the test stays outside
it: it feeds and reads the ring port (one producer, one consumer: the rings
are single-producer, single-consumer) and talks to the balancer only through
commands and snapshots, or through the admin API."""
from __future__ import annotations

import contextlib
import pathlib
import random
import threading
import time

import yaml

from pylb import config as config_mod
from pylb import traffic
from pylb.admin import AdminServer, Client
from pylb.balancer import Balancer
from pylb.health import HealthChecker

LB4, GW4 = "203.0.113.1", "203.0.113.254"
ROUTER_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:c1"
WEB4 = "192.0.2.10"
BACKEND_NAMES = ["web-1", "web-2", "web-3", "web-4"]


def config_dict(device: str, backends: list[dict], *, table_size: int = 1021, health=None,
                **balancer) -> dict:
    vip = {"name": "web", "address": WEB4, "protocol": "tcp", "port": 80,
           "table_size": table_size, "backends": backends}
    if health is not None:
        vip["health"] = health
    return {"balancer": {"name": "live", "flow_seed": 11,
                         "data": {"device": device, "address_v4": LB4, "gateway_v4": GW4,
                                  "neighbors": [{"address": GW4, "mac": "02:00:00:00:00:fe"}],
                                  "mbufs": 8191},
                         "flow_cache": {"capacity": 65536}, **balancer},
            "vips": [vip]}


def write_config(path: pathlib.Path, data: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(data))
    return path


def flows(n: int, seed: int = 3) -> list[traffic.Flow]:
    return traffic.make_flows([("web", WEB4, 6, 80)], n, random.Random(seed))


class Live:
    """The balancer, its loop thread, and its admin API on a socket."""

    def __init__(self, lb: Balancer, socket_path: str):
        self.lb = lb
        self.stopping = False
        self.thread = threading.Thread(target=lb.run,
                                       args=(lambda: self.stopping or lb.drain_done(),),
                                       name="control-loop", daemon=True)
        self.thread.start()
        self.admin = AdminServer(lb, socket_path)
        self.checker = HealthChecker(lb)
        self.client = Client(socket_path, timeout=10)

    def call(self, command, timeout: float = 10.0):
        return self.lb.submit(command).result(timeout=timeout)

    def stats(self):
        return self.call(lambda b: b.stats())

    def send(self, frames: list[bytes], timeout: float = 10.0) -> list[bytes]:
        """Injects the frames, waits until the balancer has received them all
        and holds none, and returns what it sent."""
        port = self.lb.port
        before = self.stats().rx
        pending = list(frames)
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            if pending:
                pending = pending[port.inject(pending):]
            out += port.drain()
            s = self.stats()
            if not pending and s.rx - before >= len(frames) and s.held_now == 0:
                break
            assert time.monotonic() < deadline, f"frames not handled in time ({s.rx - before} " \
                                                 f"of {len(frames)})"
            time.sleep(0.002)
        time.sleep(0.01)
        return out + port.drain()

    def close(self) -> None:
        self.checker.close()
        self.admin.close()
        self.stopping = True
        self.thread.join(timeout=30)

    @property
    def stopped(self) -> bool:
        return not self.thread.is_alive()


@contextlib.contextmanager
def live_balancer(cfg_path: pathlib.Path, socket_path: str):
    cfg = config_mod.load(cfg_path)
    lb = Balancer(cfg)
    live = None
    try:
        lb.config_file = str(cfg_path)
        live = Live(lb, socket_path)
        yield live
    finally:
        if live is not None:
            live.close()
        # Closing the worker under a loop thread still polling it would crash
        # the test process: leave it open, and say so, rather than that.
        if live is not None and not live.stopped:
            raise RuntimeError("the balancer's loop thread did not stop within 30 s")
        lb.close()


def deliveries(frames: list[bytes]) -> dict[tuple, list[str]]:
    """Inner flow (proto, src, sport, dst, dport) -> the backends its packets went to."""
    out: dict[tuple, list[str]] = {}
    for f in frames:
        d = traffic.decapsulate(f)
        if d is not None:
            out.setdefault(d.flow, []).append(d.backend)
    return out


def key_of(flow: traffic.Flow) -> tuple:
    return (flow.proto, flow.src, flow.sport, flow.dst, flow.dport)
