"""`pylb doctor` on made-up hosts (a /proc and /sys tree in a temporary
directory): each problem found with the fix named, a good host passes, and
the real host is examined without error."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
PCI = "0000:03:00.0"


def host(tmp: pathlib.Path, *, hugepages=1024, mounted=True, driver="ixgbe", iommu_groups=0,
         isolated="", online="0-3", iface_mtu=None) -> pathlib.Path:
    root = tmp / "host"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(
        f"MemTotal: 16000000 kB\nHugePages_Total: {hugepages}\nHugePages_Free: {hugepages}\n"
        "Hugepagesize: 2048 kB\n")
    (root / "proc" / "mounts").write_text(
        "proc /proc proc rw 0 0\n" + ("nodev /dev/hugepages hugetlbfs rw 0 0\n" if mounted else ""))
    drivers = root / "sys" / "bus" / "pci" / "drivers" / driver
    drivers.mkdir(parents=True)
    dev = root / "sys" / "bus" / "pci" / "devices" / PCI
    dev.mkdir(parents=True)
    os.symlink(drivers, dev / "driver")
    groups = root / "sys" / "kernel" / "iommu_groups"
    groups.mkdir(parents=True)
    for g in range(iommu_groups):
        (groups / str(g)).mkdir()
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text(online + "\n")
    (cpu / "isolated").write_text(isolated + "\n")
    if iface_mtu is not None:
        net = root / "sys" / "class" / "net" / "eth1"
        net.mkdir(parents=True)
        (net / "mtu").write_text(f"{iface_mtu}\n")
        (net / "operstate").write_text("up\n")
    return root


def config(tmp: pathlib.Path, device: str = PCI, mtu: int = 9000, cores=(2,),
           workers: int = 1) -> pathlib.Path:
    data = yaml.safe_load((ROOT / "examples" / "nic.yaml").read_text())
    data["balancer"]["workers"] = workers
    data["balancer"]["data"]["device"] = device
    data["balancer"]["data"]["mtu"] = mtu
    data["balancer"]["dpdk"]["cores"] = list(cores)
    path = tmp / "lb.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def doctor(cfg: pathlib.Path, root: pathlib.Path | str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "pylb.cli", "doctor", "--config", str(cfg),
                        "--root", str(root), "--json"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, {f["check"]: f for f in json.loads(r.stdout)}


def test_a_host_with_every_problem_is_told_what_to_fix(tmp_path):
    rc, got = doctor(config(tmp_path, mtu=1500), host(tmp_path, hugepages=0, iommu_groups=0))
    assert rc == 1
    assert got["hugepages"]["status"] == "FAIL" and "hugepages=" in got["hugepages"]["fix"]
    assert got["nic"]["status"] == "FAIL" and "ixgbe" in got["nic"]["detail"]
    assert f"dpdk-devbind.py --bind=vfio-pci {PCI}" in got["nic"]["fix"]
    assert got["iommu"]["status"] == "FAIL" and "intel_iommu=on" in got["iommu"]["fix"]
    assert got["cores"]["status"] == "warn" and "isolcpus=2" in got["cores"]["fix"]
    assert got["mtu"]["status"] == "warn" and "1520" in got["mtu"]["detail"]


def test_a_prepared_host_passes(tmp_path):
    root = host(tmp_path, driver="vfio-pci", iommu_groups=3, isolated="2-3")
    rc, got = doctor(config(tmp_path), root)
    assert rc == 0, got
    assert {f["status"] for f in got.values()} == {"ok"}, got


@pytest.mark.parametrize("change, check, status, words", [
    ({"mounted": False}, "hugepages", "FAIL", "not mounted"),
    ({"online": "0-1"}, "cores", "FAIL", "not online"),
])
def test_single_problems(tmp_path, change, check, status, words):
    root = host(tmp_path, **{"driver": "vfio-pci", "iommu_groups": 1, "isolated": "2", **change})
    rc, got = doctor(config(tmp_path), root)
    assert got[check]["status"] == status and words in got[check]["detail"]
    assert rc == (1 if status == "FAIL" else 0)


@pytest.mark.parametrize("cores, isolated, status, words", [
    ((2, 3), "2-3", "ok", "[2, 3] isolated"),
    ((2,), "2-3", "FAIL", "one core per worker"),
    ((2, 3), "2", "warn", "isolcpus=3"),
])
def test_every_worker_needs_its_own_isolated_core(tmp_path, cores, isolated, status, words):
    root = host(tmp_path, driver="vfio-pci", iommu_groups=1, isolated=isolated)
    rc, got = doctor(config(tmp_path, cores=cores, workers=2), root)
    finding = got["cores"]
    assert finding["status"] == status and words in finding["detail"] + (finding["fix"] or ""), \
        finding


def test_an_af_packet_port_checks_the_interface_mtu(tmp_path):
    cfg = config(tmp_path, device="net_af_packet0,iface=eth1", mtu=9000)
    rc, got = doctor(cfg, host(tmp_path, iface_mtu=1500, isolated="2"))
    assert rc == 1 and got["mtu"]["status"] == "FAIL"
    assert "ip link set eth1 mtu 9000" in got["mtu"]["fix"]
    assert got["nic"]["status"] == "ok" and got["iommu"]["status"] == "ok"


@pytest.mark.parametrize("rp_filter, status", [("1", "FAIL"), ("2", "ok"), ("0", "ok")])
def test_checks_via_the_vip_need_a_reverse_path_filter_that_lets_answers_in(tmp_path, rp_filter,
                                                                          status):
    cfg = config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["balancer"]["data"]["exception"] = {"policy": "tap"}
    data["vips"][0]["health"] = {"type": "tcp", "via": "vip"}
    cfg.write_text(yaml.safe_dump(data))
    root = host(tmp_path, driver="vfio-pci", iommu_groups=1, isolated="2")
    conf = root / "proc" / "sys" / "net" / "ipv4" / "conf" / "all"
    conf.mkdir(parents=True)
    (conf / "rp_filter").write_text(rp_filter + "\n")
    rc, got = doctor(cfg, root)
    assert got["health_path"]["status"] == status, got["health_path"]
    assert rc == (1 if status == "FAIL" else 0), got
    if status == "FAIL":
        assert "rp_filter=2" in got["health_path"]["fix"]


def test_the_real_host_is_examined(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pylb.cli", "doctor", "--config",
                        str(ROOT / "examples" / "pcap.yaml")], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    for check in ("hugepages", "nic", "iommu", "cores", "mtu"):
        assert check in r.stdout
