"""Health checks against real HTTP servers on 127.0.0.x that the tests turn
to failing, off and on again: a failing backend leaves the tables (new flows
avoid it, established flows keep it from the flow cache) and returns when
healthy; checks are bounded in concurrency and spread over the interval; bad
check settings are rejected."""
from __future__ import annotations

import http.server
import socketserver
import threading
import time
import types

import pytest
from live_support import (CLIENT_MAC, ROUTER_MAC, config_dict, deliveries, flows, key_of,
                          live_balancer, write_config)

from pylb import config as config_mod
from pylb.errors import ConfigError
from pylb.health import HealthChecker

ADDRESSES = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]


class Server:
    """An HTTP health endpoint on one address: answers 200 ("ok") or 503
    ("fail"), or is switched off (connections refused)."""

    def __init__(self, address: str, port: int, delay: float = 0.0):
        self.address, self.port, self.delay = address, port, delay
        self.mode = "ok"
        self.requests: list[float] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self._server = None
        self.on()

    def on(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with owner._lock:
                    owner.requests.append(time.monotonic())
                    owner.in_flight += 1
                    shared.max_in_flight = max(shared.max_in_flight, shared.in_flight())
                try:
                    time.sleep(owner.delay)
                    self.send_response(200 if owner.mode == "ok" else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with owner._lock:
                        owner.in_flight -= 1

            def log_message(self, *args):
                pass

        server = socketserver.ThreadingTCPServer((self.address, self.port), Handler,
                                                 bind_and_activate=False)
        server.allow_reuse_address = True
        server.daemon_threads = True
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def off(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Shared:
    def __init__(self):
        self.servers: list[Server] = []
        self.max_in_flight = 0

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.servers)


shared = Shared()


@pytest.fixture
def servers(request):
    delay = getattr(request, "param", 0.0)
    shared.servers, shared.max_in_flight = [], 0
    first = Server(ADDRESSES[0], 0, delay)
    shared.servers = [first] + [Server(a, first.port, delay) for a in ADDRESSES[1:]]
    yield shared.servers
    for s in shared.servers:
        s.off()


def backends(n: int = 3) -> list[dict]:
    return [{"name": f"web-{i}", "address": a, "weight": 1}
            for i, a in enumerate(ADDRESSES[:n], 1)]


def wait_for(live, predicate, what: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = {b["backend"]: b for b in live.client.request("GET", "/backends")["backends"]}
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"{what}: {rows}"
        time.sleep(0.05)


def syns(fl):
    return [f.frames(ROUTER_MAC, CLIENT_MAC, ["S"])[0] for f in fl]


def data(fl):
    return [f.frames(ROUTER_MAC, CLIENT_MAC, ["PA"])[0] for f in fl]


FAST = {"interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}


@pytest.mark.dpdk
def test_http_check_takes_a_failing_backend_out_and_brings_it_back(eal, tmp_path, servers):
    health = {"type": "http", "port": servers[0].port, "path": "/healthz", **FAST}
    path = write_config(tmp_path / "lb.yaml",
                        config_dict("ring:health1", backends(), health=health))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        wait_for(live, lambda r: all(b["check"]["checks"] >= 2 for b in r.values()), "checks run")
        established = flows(150)
        backend_of = {k: v[0] for k, v in deliveries(live.send(syns(established))).items()}
        on_web2 = [f for f in established if backend_of[key_of(f)] == ADDRESSES[1]]
        assert on_web2

        servers[1].mode = "fail"
        rows = wait_for(live, lambda r: r["web-2"]["health"] == "down", "web-2 goes down")
        assert rows["web-2"]["effective_weight"] == 0 and rows["web-2"]["buckets"] == 0
        assert rows["web-2"]["weight"] == 1
        assert "HTTP 503" in rows["web-2"]["check"]["last_error"]
        assert rows["web-1"]["health"] == rows["web-3"]["health"] == "up"
        # Established flows go on to the failing backend (from the flow cache);
        # new flows avoid it.
        kept = deliveries(live.send(data(on_web2)))
        assert {b for v in kept.values() for b in v} == {ADDRESSES[1]}
        fresh = deliveries(live.send(syns(flows(150, seed=5))))
        assert ADDRESSES[1] not in {v[0] for v in fresh.values()}

        servers[1].mode = "ok"
        rows = wait_for(live, lambda r: r["web-2"]["health"] == "up", "web-2 comes back")
        assert rows["web-2"]["effective_weight"] == 1 and rows["web-2"]["buckets"] > 0
        fresh = deliveries(live.send(syns(flows(150, seed=6))))
        assert ADDRESSES[1] in {v[0] for v in fresh.values()}


@pytest.mark.dpdk
def test_tcp_check_follows_a_listener_turned_off_and_on(eal, tmp_path, servers):
    health = {"type": "tcp", "port": servers[0].port, **FAST}
    path = write_config(tmp_path / "lb.yaml",
                        config_dict("ring:health2", backends(), health=health))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        servers[2].off()
        rows = wait_for(live, lambda r: r["web-3"]["health"] == "down", "web-3 goes down")
        assert "connect" in rows["web-3"]["check"]["last_error"]
        servers[2].on()
        wait_for(live, lambda r: r["web-3"]["health"] == "up", "web-3 comes back")
        status = live.client.request("GET", "/status")
        assert status["vips"][0]["health_check"] == "tcp"


@pytest.mark.dpdk
def test_every_backend_failing_keeps_them_all(eal, tmp_path, servers):
    health = {"type": "http", "port": servers[0].port, **FAST}
    path = write_config(tmp_path / "lb.yaml",
                        config_dict("ring:health3", backends(), health=health))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        for s in servers:
            s.mode = "fail"
        rows = wait_for(live, lambda r: all(b["health"] == "down" for b in r.values()),
                        "all down")
        # Fail open: a VIP whose every backend fails keeps them all.
        assert all(b["effective_weight"] == 1 for b in rows.values())
        servers[0].mode = "ok"
        rows = wait_for(live, lambda r: r["web-1"]["health"] == "up", "web-1 back")
        assert [rows[n]["effective_weight"] for n in ("web-1", "web-2", "web-3")] == [1, 0, 0]


@pytest.mark.dpdk
def test_a_reload_starts_and_stops_checks(eal, tmp_path, servers):
    path = write_config(tmp_path / "lb.yaml", config_dict("ring:health4", backends()))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        servers[0].mode = "fail"
        health = {"type": "http", "port": servers[0].port, **FAST}
        write_config(path, config_dict("ring:health4", backends(), health=health))
        live.client.request("POST", "/reload")
        wait_for(live, lambda r: r["web-1"]["health"] == "down", "checks started")
        write_config(path, config_dict("ring:health4", backends()))
        live.client.request("POST", "/reload")
        rows = wait_for(live, lambda r: r["web-1"]["health"] == "up", "checks stopped")
        assert "check" not in rows["web-1"]


def fake_balancer(cfg) -> types.SimpleNamespace:
    """What HealthChecker uses of a Balancer, for tests of the checker alone."""
    return types.SimpleNamespace(configured=cfg, on_reconfigure=[], snapshot_extras=[])


def checker_config(servers, **health):
    return config_mod.parse(config_dict("ring:unused", backends(len(servers)), health={
        "type": "http", "port": servers[0].port, **health}))


@pytest.mark.parametrize("servers", [0.15], indirect=True)
def test_checks_in_flight_are_bounded(servers):
    # A timeout well above the servers' delay: a check the checker gave up on
    # would still be in flight at the server, which counts it (a busy machine).
    cfg = checker_config(servers, interval=1.0, timeout=0.9, fall=100)
    cfg = cfg.model_copy(update={"balancer": cfg.balancer.model_copy(
        update={"health": config_mod.HealthLimits(max_concurrent=2)})})
    checker = HealthChecker(fake_balancer(cfg), report=lambda *a: None)
    try:
        time.sleep(1.2)
    finally:
        checker.close()
    assert sum(len(s.requests) for s in servers) >= 4
    assert shared.max_in_flight <= 2


def test_first_checks_are_spread_over_the_interval(servers):
    checker = HealthChecker(fake_balancer(checker_config(servers, interval=1.0, timeout=0.5)),
                            report=lambda *a: None)
    try:
        deadline = time.monotonic() + 3
        while not all(s.requests for s in servers):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        checker.close()
    firsts = sorted(s.requests[0] for s in servers)
    gaps = [b - a for a, b in zip(firsts, firsts[1:])]
    assert all(0.15 < g < 0.4 for g in gaps), gaps     # interval / 4 apart


@pytest.mark.parametrize("health, reason", [
    ({"type": "http", "interval": 1, "timeout": 2}, "timeout 2.0 is longer than interval 1.0"),
    ({"type": "http", "expect_status": 700}, "HTTP statuses are 100..599"),
    ({"type": "icmp"}, "health.type"),
    ({"type": "http", "path": "no-slash"}, "health.path"),
    ({"type": "tcp", "rise": 0}, "health.rise"),
    ({"type": "tcp", "via": "encap"}, "health.via"),
    ({"type": "tcp", "bogus": 1}, "health.bogus"),
    # The kernel reaches the VIP through the exception TAP.
    ({"type": "tcp", "via": "vip"}, "health checks via the VIP need "
                                    "balancer.data.exception.policy tap"),
])
def test_bad_check_settings_are_rejected(health, reason):
    with pytest.raises(ConfigError) as err:
        config_mod.parse(config_dict("ring:x", backends(), health=health))
    assert reason in str(err.value)


@pytest.mark.parametrize("change, reason", [
    # The check's source is the data address of the VIP's family.
    (lambda d: d["vips"][0].update(address="2001:db8::80"),
     "health checks via the VIP need balancer.data.address_v6"),
    (lambda d: d["balancer"].update(health={"route_table": 254}),
     "254 is the kernel's default, main or local table"),
    # The worker steers checks only to a TCP VIP at the check's port.
    (lambda d: d["vips"][0]["health"].update(port=8080),
     "connects to TCP port 8080 of 192.0.2.10, where no TCP VIP is"),
    (lambda d: d["vips"][0].update(protocol="udp"),
     "connects to TCP port 80 of 192.0.2.10, where no TCP VIP is"),
])
def test_checks_via_the_vip_need_their_path(change, reason):
    data = config_dict("ring:x", backends(), health={"type": "tcp", "via": "vip"})
    data["balancer"]["data"]["exception"] = {"policy": "tap"}
    config_mod.parse(data)          # as it is: valid
    change(data)
    with pytest.raises(ConfigError) as err:
        config_mod.parse(data)
    assert reason in str(err.value)


def test_an_all_ports_vip_needs_a_check_port():
    data = config_dict("ring:x", backends(), health={"type": "tcp"})
    data["vips"][0]["port"] = "all"
    with pytest.raises(ConfigError) as err:
        config_mod.parse(data)
    assert "health.port is required" in str(err.value)
