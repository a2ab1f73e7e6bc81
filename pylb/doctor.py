"""`pylb doctor`: checks a host before a balancer runs on it, and says what
to fix (docs/deployment.md). Reads /proc and /sys only; changes nothing.

Every path is taken under `root`, so tests run the checks on a made-up tree.
"""
from __future__ import annotations

import os
import pathlib
import re
import resource
from dataclasses import dataclass

from pylb.config import Config

OK, WARN, FAIL = "ok", "warn", "FAIL"
PCI_RE = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
DPDK_DRIVERS = {"vfio-pci", "uio_pci_generic", "igb_uio"}
# Outer headers each encapsulation adds (IPv4 outer, IPv6 outer), bytes.
OVERHEAD = {"ipip": (20, 40), "gue": (28, 48), "vxlan": (50, 70)}
CLIENT_MTU = 1500


@dataclass(frozen=True)
class Finding:
    check: str
    status: str          # ok, warn, FAIL
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


class Host:
    def __init__(self, root: str | os.PathLike = "/"):
        self.root = pathlib.Path(root)

    def path(self, p: str) -> pathlib.Path:
        return self.root / p.lstrip("/")

    def read(self, p: str) -> str | None:
        try:
            return self.path(p).read_text()
        except OSError:
            return None

    def meminfo(self) -> dict[str, int]:
        out = {}
        for line in (self.read("/proc/meminfo") or "").splitlines():
            name, _, rest = line.partition(":")
            if rest.split():
                out[name] = int(rest.split()[0])
        return out

    def cmdline(self) -> list[str]:
        return (self.read("/proc/cmdline") or "").split()

    def mounts(self) -> list[list[str]]:
        return [line.split() for line in (self.read("/proc/mounts") or "").splitlines() if line]


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus |= set(range(int(lo), int(hi or lo) + 1))
    return cpus


def check_hugepages(host: Host, cfg: Config) -> Finding:
    mem = host.meminfo()
    total, free, size_kb = mem.get("HugePages_Total", 0), mem.get("HugePages_Free", 0), \
        mem.get("Hugepagesize", 2048)
    mounted = [m[1] for m in host.mounts() if len(m) > 2 and m[2] == "hugetlbfs"]
    fix = ("reserve them at boot: add `default_hugepagesz=1G hugepagesz=1G hugepages=4` (or "
           "`hugepagesz=2M hugepages=1024`) to the kernel command line, and mount hugetlbfs "
           "(`mount -t hugetlbfs nodev /dev/hugepages`, or systemd's dev-hugepages.mount)")
    if cfg.balancer.dpdk.hugepages == "off":
        return Finding("hugepages", WARN, "dpdk.hugepages is off: DPDK runs with --no-huge, "
                       "slower and with no DMA-safe memory for a PCI NIC", "set dpdk.hugepages: on")
    if total == 0:
        return Finding("hugepages", FAIL, "no hugepages reserved", fix)
    if not mounted:
        return Finding("hugepages", FAIL, f"{total} hugepages but hugetlbfs is not mounted", fix)
    free_mb = free * size_kb // 1024
    if free_mb < 512:
        return Finding("hugepages", FAIL, f"only {free_mb} MiB of hugepages free (of "
                       f"{total * size_kb // 1024} MiB)", "reserve more, or stop what uses them")
    return Finding("hugepages", OK, f"{total} x {size_kb // 1024} MiB reserved, {free_mb} MiB "
                   f"free, hugetlbfs at {', '.join(mounted)}")


def check_nic(host: Host, cfg: Config) -> Finding:
    device = cfg.balancer.data.device
    if PCI_RE.match(device):
        address = device if device.count(":") == 2 else f"0000:{device}"
        dev = host.path(f"/sys/bus/pci/devices/{address}")
        if not dev.exists():
            return Finding("nic", FAIL, f"no PCI device {address}",
                           "check the address with `dpdk-devbind.py --status`")
        driver = host.path(f"/sys/bus/pci/devices/{address}/driver")
        name = os.path.basename(os.readlink(driver)) if driver.is_symlink() else None
        if name in DPDK_DRIVERS:
            return Finding("nic", OK, f"{address} is bound to {name}")
        return Finding("nic", FAIL, f"{address} is bound to {name or 'no driver'}, not vfio-pci",
                       f"`ip link set <its interface> down; modprobe vfio-pci; dpdk-devbind.py "
                       f"--bind=vfio-pci {address}` (make it last: driverctl set-override "
                       f"{address} vfio-pci)")
    m = re.search(r"iface=([^,]+)", device)
    if m:
        iface = m.group(1)
        if not host.path(f"/sys/class/net/{iface}").exists():
            return Finding("nic", FAIL, f"{device}: no interface {iface}",
                           "name an interface of this host (ip link)")
        state = (host.read(f"/sys/class/net/{iface}/operstate") or "?").strip()
        return Finding("nic", OK if state in ("up", "unknown") else WARN,
                       f"{device}: kernel interface {iface} is {state}",
                       None if state in ("up", "unknown") else f"ip link set {iface} up")
    return Finding("nic", WARN, f"{device} is a test device (no NIC to check)")


def check_iommu(host: Host, cfg: Config) -> Finding:
    if not PCI_RE.match(cfg.balancer.data.device):
        return Finding("iommu", OK, "not needed: the data port is not a PCI NIC")
    groups = host.path("/sys/kernel/iommu_groups")
    if groups.is_dir() and any(groups.iterdir()):
        return Finding("iommu", OK, f"on ({len(list(groups.iterdir()))} IOMMU groups)")
    noiommu = (host.read("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode") or "").strip()
    if noiommu in ("Y", "1"):
        return Finding("iommu", WARN, "off; vfio runs in unsafe no-IOMMU mode (the NIC can DMA "
                       "anywhere)", "enable VT-d / AMD-Vi and add `intel_iommu=on iommu=pt` (or "
                       "`amd_iommu=on iommu=pt`) to the kernel command line")
    return Finding("iommu", FAIL, "no IOMMU groups: vfio-pci cannot take the NIC",
                   "enable VT-d / AMD-Vi in the firmware and add `intel_iommu=on iommu=pt` (Intel) "
                   "or `amd_iommu=on iommu=pt` to the kernel command line")


def check_cores(host: Host, cfg: Config) -> Finding:
    cores = cfg.balancer.dpdk.cores
    workers = cfg.balancer.workers
    if not cores:
        return Finding("cores", WARN, "dpdk.cores is not set: the workers take the first allowed "
                       "cores, which the kernel also schedules other work on",
                       f"pick {workers} core(s), isolate them (isolcpus) and set dpdk.cores")
    if len(set(cores[:workers])) < workers:
        return Finding("cores", FAIL, f"balancer.workers is {workers} but dpdk.cores lists "
                       f"{len(set(cores[:workers]))} distinct core(s) for them",
                       "list one core per worker in dpdk.cores")
    mine = cores[:workers]
    online = _cpu_list(host.read("/sys/devices/system/cpu/online") or "")
    offline = [c for c in mine if online and c not in online]
    if offline:
        return Finding("cores", FAIL, f"core(s) {offline} not online (online: "
                       f"{(host.read('/sys/devices/system/cpu/online') or '').strip()})",
                       "choose online cores in dpdk.cores")
    isolated = _cpu_list(host.read("/sys/devices/system/cpu/isolated") or "")
    shared = [c for c in mine if c not in isolated]
    if shared:
        listed = ",".join(str(c) for c in shared)
        return Finding("cores", WARN, f"core(s) {shared} not isolated: other tasks and "
                       "interrupts share them, which shows as latency spikes",
                       f"add `isolcpus={listed} nohz_full={listed} rcu_nocbs={listed}` to the "
                       "kernel command line, and keep IRQs off them (irqbalance's "
                       "IRQBALANCE_BANNED_CPULIST)")
    return Finding("cores", OK, f"worker core(s) {mine} isolated")


def check_mtu(host: Host, cfg: Config) -> Finding:
    data = cfg.balancer.data
    worst = 0
    for vip in cfg.vips:
        for b in vip.backends:
            v4, v6 = OVERHEAD[vip.encap.type]
            worst = max(worst, v4 if b.address.version == 4 else v6)
    need = CLIENT_MTU + worst
    iface = re.search(r"iface=([^,]+)", data.device)
    link = None
    if iface:
        text = host.read(f"/sys/class/net/{iface.group(1)}/mtu")
        link = int(text) if text and text.strip().isdigit() else None
    if link is not None and link < data.mtu:
        return Finding("mtu", FAIL, f"balancer.data.mtu is {data.mtu} but {iface.group(1)} has MTU "
                       f"{link}", f"ip link set {iface.group(1)} mtu {data.mtu} (and the path to "
                       "the backends)")
    if data.mtu < need:
        return Finding("mtu", WARN, f"balancer.data.mtu {data.mtu}: a {CLIENT_MTU}-byte client "
                       f"packet needs {need} after encapsulation (+{worst}); larger ones get ICMP "
                       "fragmentation-needed / packet-too-big", f"run the network toward the "
                       f"backends at MTU >= {need} (9000 is usual) and set balancer.data.mtu")
    return Finding("mtu", OK, f"balancer.data.mtu {data.mtu} carries {CLIENT_MTU}-byte client "
                   f"packets (+{worst} of encapsulation)" +
                   (f"; {iface.group(1)} has MTU {link}" if link else "; check the path to the "
                    "backends carries it too"))


def check_memlock(host: Host, cfg: Config) -> Finding:
    if not PCI_RE.match(cfg.balancer.data.device):
        return Finding("memlock", OK, "not needed: the data port is not a PCI NIC")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        return Finding("memlock", FAIL, f"locked-memory limit {soft} bytes: vfio cannot pin DMA "
                       "memory", "run as root, or LimitMEMLOCK=infinity in the systemd unit")
    return Finding("memlock", OK, "vfio may lock the memory it needs")


def check_health_path(host: Host, cfg: Config) -> Finding:
    """Checks `via: vip` get their answers from the TAP, from a VIP the host
    routes elsewhere: strict reverse-path filtering drops them."""
    vips = [v.name for v in cfg.vips
            if v.health is not None and v.health.via == "vip" and v.address.version == 4]
    if not vips:
        return Finding("health_path", OK, "not needed: no IPv4 VIP is checked via the VIP")
    mode = (host.read("/proc/sys/net/ipv4/conf/all/rp_filter") or "").strip()
    if mode == "1":
        return Finding("health_path", FAIL, "net.ipv4.conf.all.rp_filter is 1 (strict): the "
                       f"answers to checks via the VIP ({', '.join(vips)}) would be dropped",
                       "sysctl -w net.ipv4.conf.all.rp_filter=2 (loose), and in /etc/sysctl.d/")
    return Finding("health_path", OK, f"rp_filter {mode or 'unknown'} lets the answers to checks "
                   "via the VIP in")


CHECKS = (check_hugepages, check_nic, check_iommu, check_cores, check_mtu, check_memlock,
          check_health_path)


def examine(cfg: Config, root: str | os.PathLike = "/") -> list[Finding]:
    host = Host(root)
    return [check(host, cfg) for check in CHECKS]
