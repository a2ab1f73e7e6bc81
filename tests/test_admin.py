"""The admin API, the CLI over it and the metrics endpoint, driven as an
operator would: a real `pylb run` process (pcap PMD, a generated capture as
its traffic), `pylb status / backends / flows / reload / drain` as commands,
SIGHUP, raw HTTP for bad requests, and Prometheus metrics scraped over HTTP
and parsed."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pylb import flow_id, packet, pcap
from pylb.admin import Client, _UnixConnection, wait_for_socket

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pcap.yaml"
FLOWS = 30

pytestmark = pytest.mark.dpdk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pylb(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pylb.cli", *args], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    return r


class Running:
    def __init__(self, tmp: pathlib.Path):
        self.dir = tmp
        self.socket = str(tmp / "admin.sock")
        self.metrics_port = free_port()
        data = yaml.safe_load(EXAMPLE.read_text())
        data["balancer"]["data"]["device"] = \
            f"net_pcap_adm,rx_pcap={tmp}/in.pcap,tx_pcap={tmp}/out.pcap"
        data["balancer"]["admin"] = {"socket": self.socket}
        data["balancer"]["metrics"] = {"address": f"127.0.0.1:{self.metrics_port}"}
        self.data = data
        self.config = tmp / "lb.yaml"
        self.write(data)
        pylb("gen-pcap", "--config", str(self.config), "--out", str(tmp / "in.pcap"),
             "--flows", str(FLOWS))
        self.flows = [str(flow_id.FlowKey(p.src, p.dst, p.sport, p.dport, p.l4_proto))
                      for p in map(packet.parse, pcap.read(tmp / "in.pcap")[::3])]
        # A socket file left by a balancer that died: the new one takes it over.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.socket)
        stale.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "pylb.cli", "run", "--config",
                                      str(self.config)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_for_socket(self.socket, 0.5)
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out, err = self.stop()
                    raise AssertionError(f"the balancer did not start:\n{out}\n{err}") from None

    def write(self, data: dict) -> None:
        self.config.write_text(yaml.safe_dump(data))

    def cli(self, *args, check=True) -> subprocess.CompletedProcess:
        return pylb(*args, "--socket", self.socket, check=check)

    def json(self, *args) -> dict:
        return json.loads(self.cli(*args, "--json").stdout)

    def stop(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=20)
        finally:
            self.proc.kill()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    r = Running(tmp_path_factory.mktemp("admin"))
    yield r
    out, err = r.stop()
    assert r.proc.returncode == 0, err
    assert "Counter equations: all hold" in out
    assert not os.path.exists(r.socket), "the socket outlived the balancer"


def raw(socket_path: str, method: str, path: str, body: bytes | None = None):
    conn = _UnixConnection(socket_path, 10)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_status_human_and_json(running):
    human = running.cli("status").stdout
    for text in ("balancer lb-pcap", "VIPs", "web6", "Backends", "web-3", "Workers", "Counters",
                 "Cluster: none"):
        assert text in human
    snap = running.json("status")
    assert snap["balancer"]["name"] == "lb-pcap"
    assert snap["stats"]["rx"] == 3 * FLOWS     # the capture was forwarded at start
    assert snap["active_flows"] == FLOWS
    assert sum(b["active_flows"] for b in snap["backends"]) == FLOWS   # no other ids here
    assert {b["backend"] for b in snap["backends"]} >= {"web-1", "dns-2", "web6-2"}
    assert sum(b["packets"] for b in snap["backends"]) == 3 * FLOWS
    assert snap["workers"][0]["polls"] > 0


def test_flows_looks_up_live_state(running):
    sent = running.flows[0]
    got = running.json("flows", sent)
    assert got["cached_here"] is not None, got
    assert got["cached_here"]["backend"] == got["table_backend"]["backend"]
    assert (got["owner"], got["backup"]) == ("lb-pcap", None)
    human = running.cli("flows", sent).stdout
    assert "cached    on lb-pcap" in human and "owner     lb-pcap" in human
    never = running.json("flows", "tcp 198.51.100.250:1 -> 192.0.2.10:80")
    assert never["cached_here"] is None and never["table_backend"] is not None
    assert "not for a VIP" in running.cli("flows", "tcp 198.51.100.7:1 -> 192.0.2.99:80").stdout
    bad = running.cli("flows", "tcp nonsense", check=False)
    assert bad.returncode != 0 and "bad flow" in bad.stderr and "Traceback" not in bad.stderr


def test_backends_lists_weights_health_and_traffic(running):
    rows = running.json("backends", "--vip", "web")["backends"]
    assert [r["backend"] for r in rows] == ["web-1", "web-2", "web-3"]
    assert sum(r["buckets"] for r in rows) == 65537
    assert all(r["health"] == "up" for r in rows)
    human = running.cli("backends").stdout
    assert "web6-2" in human and "buckets" in human and "flows" in human
    every = running.json("backends")["backends"]
    assert sum(r["active_flows"] for r in every) == running.json("status")["active_flows"]
    bad = running.cli("backends", "--vip", "nope", check=False)
    assert bad.returncode != 0 and "no VIP named 'nope'" in bad.stderr


def test_reload_by_command_and_sighup_and_a_bad_file_rejected_whole(running):
    before = running.json("status")["balancer"]["generation"]
    good = dict(running.data)
    # Bad: a VIP whose port is 0, beside a good change to another VIP.
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["vips"][0]["port"] = 0
    bad["vips"][1]["backends"][0]["weight"] = 9
    running.write(bad)
    r = running.cli("reload", check=False)
    assert r.returncode != 0 and "vips.0.port" in r.stderr and "rejected whole" in r.stderr
    snap = running.json("status")
    assert snap["balancer"]["generation"] == before
    assert [b["weight"] for b in snap["backends"] if b["vip"] == "dns"] == [1, 1]
    assert "vips.0.port" in snap["balancer"]["last_reload_error"]

    changed = yaml.safe_load(yaml.safe_dump(good))
    changed["vips"][0]["backends"].append({"name": "web-4", "address": "203.0.113.14"})
    running.write(changed)
    r = running.cli("reload")
    assert "backends added: web/web-4" in r.stdout
    assert "web-4" in {b["backend"] for b in running.json("backends")["backends"]}

    changed["vips"][0]["backends"][0]["weight"] = 4
    running.write(changed)
    generation = running.json("status")["balancer"]["generation"]
    running.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while running.json("status")["balancer"]["generation"] == generation:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.2)
    web1 = [b for b in running.json("backends")["backends"] if b["backend"] == "web-1"][0]
    assert web1["weight"] == 4
    # The flows forwarded before are still cached.
    assert running.json("status")["active_flows"] == FLOWS
    running.write(good)
    running.cli("reload")


def test_drain_a_backend_and_undo(running):
    r = running.cli("drain", "web", "web-2")
    assert "web/web-2: drained" in r.stdout
    row = [b for b in running.json("backends")["backends"] if b["backend"] == "web-2"][0]
    assert (row["weight"], row["effective_weight"], row["buckets"]) == (1, 0, 0)
    got = running.json("drain", "web", "web-2", "--undo")
    assert got["drained"] is False
    row = [b for b in running.json("backends")["backends"] if b["backend"] == "web-2"][0]
    assert row["effective_weight"] == 1 and row["buckets"] > 0
    for args, reason in [(("web", "nope"), "no backend named 'nope'"),
                         (("nope", "web-1"), "no VIP named"),
                         (("web",), "give both VIP and BACKEND")]:
        r = running.cli("drain", *args, check=False)
        assert r.returncode != 0 and reason in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method, path, body, status, reason", [
    ("GET", "/v1/nothing", None, 404, "no such endpoint"),
    ("DELETE", "/v1/status", None, 405, "takes GET"),
    ("POST", "/v1/drain", b"{not json", 400, "not JSON"),
    ("POST", "/v1/drain", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/drain", b'{"vip": "web", "backend": "web-1", "force": 1}', 400, "unknown fields"),
    ("POST", "/v1/drain", b'{"vip": "web", "backend": 7}', 400, "as strings"),
    ("POST", "/v1/drain", b'{"vip": "web", "backend": "web-1", "undo": "yes"}', 400,
     "true or false"),
    ("GET", "/v1/flows", None, 400, "give the flow"),
    ("GET", "/v1/flows?flow=tcp%201.2.3.4", None, 400, "bad flow"),
    ("POST", "/v1/reload", b'{"file": "/etc/passwd"}', 400, "takes no body"),
])
def test_bad_api_requests_get_clear_errors_and_change_nothing(running, method, path, body, status,
                                                               reason):
    before = Client(running.socket).request("GET", "/status")
    code, payload = raw(running.socket, method, path, body)
    assert code == status and reason in payload["error"], payload
    after = Client(running.socket).request("GET", "/status")
    assert after["balancer"]["generation"] == before["balancer"]["generation"]
    assert after["backends"] == before["backends"] or \
        [b["effective_weight"] for b in after["backends"]] == \
        [b["effective_weight"] for b in before["backends"]]


def test_metrics_are_scraped_and_agree_with_status(running):
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for f in families.values() for s in f.samples]
    value = lambda name, **labels: next(  # noqa: E731
        s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    snap = Client(running.socket).request("GET", "/status")
    assert value("pylb_received_packets_total") == snap["stats"]["rx"] == 3 * FLOWS
    assert value("pylb_new_flows_total") == snap["stats"]["fwd_new"]
    assert value("pylb_active_flows") == FLOWS
    per_vip = sum(s.value for s in samples if s.name == "pylb_vip_packets_total")
    assert per_vip == 3 * FLOWS
    for row in snap["backends"]:
        assert value("pylb_backend_packets_total", vip=row["vip"], backend=row["backend"]) == \
            row["packets"]
        assert value("pylb_backend_new_flows_total", vip=row["vip"],
                     backend=row["backend"]) == row["new_flows"]
    active_per_vip = {v["name"]: 0 for v in snap["vips"]}
    for row in snap["backends"]:
        assert value("pylb_backend_active_flows", vip=row["vip"], backend=row["backend"]) == \
            row["active_flows"]
        active_per_vip[row["vip"]] += row["active_flows"]
    for vip, n in active_per_vip.items():
        assert value("pylb_vip_active_flows", vip=vip) == n
    assert sum(active_per_vip.values()) == value("pylb_active_flows") == FLOWS
    new_per_vip = sum(s.value for s in samples if s.name == "pylb_vip_new_flows_total")
    assert new_per_vip == snap["stats"]["fwd_new"] > 0
    for v in snap["vips"]:
        assert value("pylb_stateful_buckets", vip=v["name"]) == v["stateful_buckets"]
    assert value("pylb_backend_up", vip="web", backend="web-1") == 1
    assert value("pylb_drops_total", reason="no_vip") == snap["stats"]["drop_no_vip"]
    assert 0 <= value("pylb_worker_busy_ratio", worker="0") <= 1
    assert value("pylb_config_reloads_total", result="ok") >= 0
    assert "pylb_owner_requests" not in families     # no cluster, no exchange


def test_a_second_balancer_with_the_same_socket_is_refused(running):
    r = pylb("run", "--config", str(running.config), "--duration", "5", check=False)
    assert r.returncode != 0 and "is in use" in r.stderr and "Traceback" not in r.stderr
    assert Client(running.socket).request("GET", "/status")["balancer"]["name"] == "lb-pcap"


def test_cli_without_a_balancer_says_so(tmp_path):
    r = pylb("status", "--socket", str(tmp_path / "none.sock"), check=False)
    assert r.returncode != 0 and "is the balancer running" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_dashboard_uses_only_metrics_the_balancer_exports():
    import re
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_total$", "", m) for e in exprs for m in re.findall(r"pylb_[a-z_]+", e)}
    exported = set(re.findall(r'"(pylb_[a-z_]+)"', (ROOT / "pylb" / "metrics.py").read_text()))
    assert used and used <= exported, used - exported
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
