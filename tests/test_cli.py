"""The command line as a user drives it: exit codes, output, and the answers
of `which` / `table` checked against the pure-Python references."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from pylb import config, flow_id, maglev, pcap, traffic

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pcap.yaml"


def pylb(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylb.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, **kw)


def test_check_config_ok():
    r = pylb("check-config", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "ok (3 VIPs, 7 backends)" in r.stdout


def test_check_config_bad_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("table_size", "x").replace("port: 80", "port: 0"))
    r = pylb("check-config", str(bad))
    assert r.returncode != 0
    assert "vips.0.port" in r.stderr


@pytest.mark.parametrize("flow", [
    "tcp 198.51.100.7:40000 -> 192.0.2.10:80",
    "tcp 198.51.100.8:51515 -> 192.0.2.10:80",
    "udp 198.51.100.7:5353 -> 192.0.2.53:53",
    "tcp [2001:db8:c::7]:40000 -> [2001:db8:10::10]:443",
])
def test_which_agrees_with_the_python_references(flow):
    r = pylb("which", "--config", str(EXAMPLE), "--json", flow)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    cfg = config.load(EXAMPLE)
    key = flow_id.FlowKey.parse(flow)
    fid = flow_id.flow_id(key, cfg.balancer.flow_seed)
    vip = next(v for v in cfg.vips if v.address == key.dst and v.port == key.dport)
    table = maglev.build_table([maglev.Backend(b.name, b.weight) for b in vip.backends],
                               vip.table_size)
    assert got["flow_id"] == f"0x{fid:016x}"
    assert got["vip"] == vip.name
    assert got["bucket"] == fid % vip.table_size
    assert got["backend"] == vip.backends[table[got["bucket"]]].name


def test_which_for_no_vip_and_bad_flow():
    r = pylb("which", "--config", str(EXAMPLE), "tcp 198.51.100.7:1 -> 192.0.2.99:80")
    assert r.returncode == 0 and "not for a VIP" in r.stdout
    r = pylb("which", "--config", str(EXAMPLE), "tcp nonsense")
    assert r.returncode != 0 and "bad flow" in r.stderr


def test_which_without_a_cluster_names_this_balancer_as_sole_owner():
    # No cluster section: the one balancer owns every bucket and has no backup.
    flow = "tcp 198.51.100.7:40000 -> 192.0.2.10:80"
    r = pylb("which", "--config", str(EXAMPLE), flow)
    assert r.returncode == 0, r.stderr
    assert "owner    lb-pcap (single balancer)\n" in r.stdout
    assert "backup" not in r.stdout
    r = pylb("which", "--config", str(EXAMPLE), "--json", flow)
    got = json.loads(r.stdout)
    assert (got["owner"], got["backup"]) == ("lb-pcap", None)
    r = pylb("which", "--config", str(EXAMPLE), "--json", "tcp 198.51.100.7:1 -> 192.0.2.99:80")
    got = json.loads(r.stdout)
    assert got["vip"] is None and (got["owner"], got["backup"]) == (None, None)


def test_table_json_matches_the_reference():
    r = pylb("table", "--config", str(EXAMPLE), "--vip", "dns", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    vip = config.load(EXAMPLE).find_vip("dns")
    ref = maglev.build_table([maglev.Backend(b.name, b.weight) for b in vip.backends],
                             vip.table_size)
    assert got["buckets"] == [vip.backends[i].name for i in ref]
    r = pylb("table", "--config", str(EXAMPLE), "--vip", "nope")
    assert r.returncode != 0 and "no VIP named" in r.stderr


def pcap_config(tmp_path, name: str) -> pathlib.Path:
    text = EXAMPLE.read_text()
    text = text.replace("net_pcap0,rx_pcap=/tmp/pylb-in.pcap,tx_pcap=/tmp/pylb-out.pcap",
                        f"net_pcap_{name},rx_pcap={tmp_path}/in.pcap,tx_pcap={tmp_path}/out.pcap")
    path = tmp_path / "pylb.yaml"
    path.write_text(text)
    return path


def hugepage_files() -> set:
    return set(os.listdir("/dev/hugepages")) if os.path.isdir("/dev/hugepages") else set()


@pytest.mark.dpdk
def test_run_forwards_a_pcap_and_exits_clean(tmp_path):
    cfg = pcap_config(tmp_path, "clirun")
    before = hugepage_files()
    r = pylb("gen-pcap", "--config", str(cfg), "--out", str(tmp_path / "in.pcap"), "--flows", "300")
    assert r.returncode == 0, r.stderr
    r = pylb("run", "--config", str(cfg), "--duration", "2")
    assert r.returncode == 0, r.stderr
    assert "Counter equations: all hold" in r.stdout
    frames = pcap.read(tmp_path / "out.pcap")
    delivered = [traffic.decapsulate(f) for f in frames]
    assert len(frames) == 900 and all(d is not None and d.payload_ok for d in delivered)
    assert hugepage_files() == before


@pytest.mark.dpdk
def test_sigterm_stops_run_cleanly_with_a_summary(tmp_path):
    cfg = pcap_config(tmp_path, "cliterm")
    pcap.write(tmp_path / "in.pcap", [])
    proc = subprocess.Popen([sys.executable, "-m", "pylb.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Outcomes" in out and "Counter equations: all hold" in out


@pytest.mark.dpdk
def test_run_with_a_device_that_does_not_exist_fails_clearly(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(EXAMPLE.read_text().replace(
        "net_pcap0,rx_pcap=/tmp/pylb-in.pcap,tx_pcap=/tmp/pylb-out.pcap", "net_nosuchpmd0"))
    r = pylb("run", "--config", str(cfg), "--duration", "1")
    assert r.returncode != 0
    assert "net_nosuchpmd0" in r.stderr and "Traceback" not in r.stderr
