"""The lab's network, its balancers and how they are changed (docs/lab.md).

```
 c1, c2 (clients, MTU 1500)            router                fabric: bridge br0 (MTU 9000)
 198.51.100.11, .12        ─┐   brc 198.51.100.1      eth0 203.0.113.254 ──┬── lb1..lb4  eth0 (DPDK, af_packet)
 2001:db8:7::11, ::12      ─┴── brc 2001:db8:7::1          2001:db8:1::fe   │   data 203.0.113.1..4, 2001:db8:1::1..4
                                ECMP over the balancers                     └── be1..be4  eth0 203.0.113.11..14
                                (nexthop group, L4 hash)                         vx4, vx6 (VXLAN 4242), lo: VIPs
```

- Clients reach the VIPs (192.0.2.10, 2001:db8:10::10; HTTP on 80, echo on
  7) through the router, whose route to each VIP is a nexthop group over the
  balancers' data addresses, hashed on the 5-tuple of each packet's headers
  (fib_multipath_hash_policy 3). Changing the ECMP set replaces the group in
  one step, as a routing daemon would.
- Each balancer is a `pylb run` process owning its namespace's eth0 through
  the af_packet PMD; its kernel has no address there and IPv6 off, so only
  DPDK speaks on the port (it answers ARP and NDP for the data addresses).
  Peer messages are UDP between the data addresses over the same fabric;
  the admin API is a Unix socket in the run's directory, so no kernel
  interface is needed beside the data port.
- Backends decapsulate VXLAN in their kernel and answer from the VIP on
  loopback, straight to the client through the router (DSR).
- A balancer drain (`pylb drain`) reaches the router as a BGP withdrawal
  would: each balancer's `drain.withdraw` is `pylb lab withdraw <name>
  --router <ns>`, which removes its next hop from both VIP routes' groups and
  leaves the others as they are (`drain.announce`, `pylb lab announce`, puts
  it back).

Every name comes from pylb.netns (`pl<pid>_<n>-<role>`), so two runs never
collide and a run that died is swept up by the next one.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pylb.netns import (Interface, LoggedProcess, Namespace, NetnsError, Topology, ip,
                        owner_alive, owner_pid, run_tag)

CLIENT_MTU = 1500
UNDERLAY_MTU = 9000
# The af_packet PMD's ring slots are 2048 bytes: a frame it sends may be 2016
# bytes (longer ones are freed inside the PMD, uncounted), a frame it
# receives is cut at 1982 (dropped as parse_truncated). Between balancers
# both limits apply: peer messages are batched up to data.mtu, and a
# 2002-byte batch from one balancer arrived cut short at the next (seen in
# the lab). So data.mtu is the largest IP packet both directions carry,
# 1982 - 14, whatever the interface's MTU (docs/lab.md).
AF_PACKET_MTU = 1968
# The af_packet PMD's kernel ring holds 512 frames by default: 60 ms of this
# lab's traffic at one balancer. A reload stops polling for about 150 ms here
# (Python builds the new tables and ownership between two polls), and the
# kernel drops what does not fit (seen: 2% of a balancer's frames at each
# reload, ARP replies among them). 4096 frames of 2 KB ride out half a
# second, as a deployment sizes its NIC's rings for its pauses.
RING_FRAMES = 4096
VNI = 4242
VXLAN_MAC = "00:00:5e:00:53:10"          # RFC 7042 documentation MAC
VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
HTTP_PORT, ECHO_PORT = 80, 7
ROUTER_CLIENT = ("198.51.100.1", "2001:db8:7::1")
ROUTER_FABRIC = ("203.0.113.254", "2001:db8:1::fe")
CLIENT_NETS = ("198.51.100.0/24", "2001:db8:7::/64")
START_S = 20.0       # a balancer's start (EAL, port, mempools) on a busy 2-core machine
STOP_S = 5.0         # for a balancer to exit after SIGTERM
# A drained balancer ends once no VIP packet came for the quiet period. The
# router's withdrawal is one netlink change here, after which no client packet
# comes (a real router converges in seconds: pylb's default is 10 s); the
# drain also lasts at least cluster.handoff_period (5 s).
DRAIN_QUIET_S = 1.0
DRAIN_TIMEOUT_S = 30.0
# The router's nexthop groups, one per VIP route (IPv4, IPv6).
ECMP_GROUPS = (100, 110)
WORKDIR_PREFIX = "pylb-lab-"


@dataclass(frozen=True)
class Node:
    name: str
    v4: str
    v6: str


CLIENTS = [Node(f"c{i}", f"198.51.100.{10 + i}", f"2001:db8:7::{10 + i}") for i in (1, 2)]
BALANCERS = [Node(f"lb{i}", f"203.0.113.{i}", f"2001:db8:1::{i}") for i in (1, 2, 3, 4)]
BACKENDS = [Node(f"be{i}", f"203.0.113.{10 + i}", f"2001:db8:1::{10 + i}") for i in (1, 2, 3, 4)]
NODES = {n.name: n for n in CLIENTS + BALANCERS + BACKENDS}


@dataclass(frozen=True)
class ClusterState:
    """What configuration management knows: the members, the backends and
    their weights, and whether the balancers exchange state."""

    members: tuple[str, ...]
    backends: tuple[tuple[str, int], ...]      # (name, weight); weight 0 = drained
    exchange: bool = True

    def with_backends(self, backends: dict[str, int]) -> "ClusterState":
        return replace(self, backends=tuple(backends.items()))

    def with_members(self, members: list[str]) -> "ClusterState":
        return replace(self, members=tuple(members))


@dataclass
class DrainRecord:
    """One balancer drain (`pylb drain --wait`) as the lab saw it."""

    name: str
    started: float                     # monotonic: the operator's command started
    cli: LoggedProcess | None = field(default=None, repr=False)
    draining_at: float | None = None   # the balancer logged "balancer draining"
    admin: dict | None = None          # its admin API's drain section while draining
    view: list[str] = field(default_factory=list)  # its cluster members then (itself gone)
    status: dict | None = None         # its last /status before it exited (counters)
    ended: float | None = None         # it exited by itself
    rc: int | None = None
    cli_rc: int | None = None
    cli_output: str = ""
    withdraw: dict | None = None       # its log: the withdraw command's end and status
    outcome: dict | None = None        # its log: "balancer drained" (or "... timed out")
    router_after: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """From the operator's command to the balancer's exit."""
        return None if self.ended is None else self.ended - self.started

    @property
    def clean(self) -> bool:
        """Ended by itself (not at its timeout), status 0, told the router,
        and `pylb drain --wait` saw it go."""
        return (self.rc == 0 and self.cli_rc == 0 and self.withdraw is not None
                and self.withdraw.get("status") == 0 and self.outcome is not None
                and self.outcome["event"] == "balancer drained"
                and self.name not in self.router_after)


@dataclass
class BalancerProcess:
    name: str
    namespace: Namespace
    config_file: Path
    process: LoggedProcess
    killed: bool = False
    summary: str | None = None       # what it printed on SIGTERM (or at the end of its drain)
    rc: int | None = None
    drain: DrainRecord | None = None


def log_events(text: str, event: str) -> list[dict]:
    """The lines of a balancer's JSON log that record `event`."""
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                out.append(entry)
    return out


def _sighup_caught(pid: int) -> bool:
    """True once the process has a SIGHUP handler (bit 0 of SigCgt): a
    SIGHUP before that would end it rather than reload it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except (OSError, ValueError):
        pass
    return False


def sweep_workdirs(base: Path) -> list[str]:
    """Removes run directories whose creator is dead (a run killed outright)."""
    removed = []
    for path in base.glob(f"{WORKDIR_PREFIX}pl*"):
        pid = owner_pid(path.name[len(WORKDIR_PREFIX):] + "_")
        if pid is not None and not owner_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


# ---------------------------------------------------------------- the router's ECMP set
# Shared by the lab and by `pylb lab withdraw/announce`, which a balancer runs
# as its drain hook from its own namespace: each works on the router
# namespace by name (`ip -n`) and reads the set from the kernel, not from a
# lab object.

def nexthop_ids(name: str) -> tuple[int, int]:
    """The router's nexthop objects (IPv4, IPv6) leading to a balancer."""
    i = BALANCERS.index(NODES[name]) + 1
    return i, 10 + i


def replace_ecmp(router: str, names: list[str], verb: str = "replace") -> None:
    """Both VIP routes' groups, replaced whole (one netlink change each).
    Ordered as BALANCERS, so the same set always hashes the same way."""
    ordered = [n.name for n in BALANCERS if n.name in names]
    for family, group in enumerate(ECMP_GROUPS):
        members = "/".join(str(nexthop_ids(n)[family]) for n in ordered)
        ip(router, "nexthop", verb, "id", str(group), "group", members)


def ecmp_set(router: str) -> list[str]:
    """The balancers the router spreads the VIPs over, as its kernel has it;
    both families must agree."""
    sets = []
    for family, group in enumerate(ECMP_GROUPS):
        shown = json.loads(ip(router, "-j", "nexthop", "show", "id", str(group)))
        ids = {g["id"] for g in shown[0]["group"]}
        sets.append([n.name for n in BALANCERS if nexthop_ids(n.name)[family] in ids])
    if sets[0] != sets[1]:
        raise NetnsError(f"the router's IPv4 and IPv6 ECMP sets differ: {sets}")
    return sets[0]


def change_ecmp(router: str, name: str, present: bool) -> list[str]:
    """What a routing daemon does when one balancer withdraws (present=False)
    or announces its VIPs: that next hop leaves or joins the multipath
    routes, the others stay. Returns the new set."""
    current = ecmp_set(router)
    wanted = [n for n in current if n != name] + ([name] if present else [])
    if not wanted:
        # A real router would drop the route; the lab keeps its VIPs routed.
        raise NetnsError(f"{name} is the router's last next hop: not withdrawn")
    if set(wanted) != set(current):
        replace_ecmp(router, wanted)
    return ecmp_set(router)


class Lab:
    """Builds the lab in a Topology (which removes it all) and changes it."""

    def __init__(self, topology: Topology, workdir: Path, *, cores: list[int] | None = None,
                 python: str = sys.executable, log_level: str = "info"):
        self.topology = topology
        self.log_level = log_level
        self.workdir = workdir
        self.python = python
        self.cores = cores or sorted(os.sched_getaffinity(0))
        self.key = secrets.token_hex(32)           # HMAC key of the cluster, new per run
        self.ns: dict[str, Namespace] = {}
        self.backend_servers: dict[str, LoggedProcess] = {}
        self.balancers: dict[str, BalancerProcess] = {}
        self.router_set: list[str] = []
        self.push_interval_ms: int | None = None     # cluster.push_interval_ms; None: default
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ building

    def build(self) -> None:
        fabric = self.ns["fabric"] = self.topology.namespace("fabric")
        fabric.ip("link", "add", "br0", "mtu", str(UNDERLAY_MTU), "type", "bridge")
        fabric.interface("br0").up()
        self._router()
        for node in CLIENTS:
            self._client(node)
        for node in BACKENDS:
            self._backend(node)
        for node in BALANCERS:
            self._balancer_namespace(node)
        for name, server in self.backend_servers.items():
            server.wait_for("ready", START_S)
        self.write_state("built")

    def _to_fabric(self, ns: Namespace, label: str, mtu: int) -> tuple[Interface, Interface]:
        fabric = self.ns["fabric"]
        inside, port = self.topology.veth(ns, fabric, names=("eth0", f"p-{label}"))
        for end in (inside, port):
            end.ip("link", "set", end.name, "mtu", str(mtu))
        fabric.ip("link", "set", port.name, "master", "br0")
        return inside, port

    def _router(self) -> None:
        router = self.ns["router"] = self.topology.namespace("router")
        # ECMP on the 5-tuple read from the headers, as a hardware router
        # hashes. Not policy 1 ("layer 4"): for a packet that already carries
        # an L4 hash it uses that hash, and a packet from a local socket
        # carries the socket's random txhash across the veth, which TCP draws
        # anew at every retransmission timeout. The router then spread
        # connections by a hidden per-socket value and moved one to another
        # balancer whenever it timed out once (seen: 80% of the connections
        # on one of two balancers, and `ip route get` disagreeing with where
        # packets went). Policy 3 hashes the chosen header fields every time:
        # source and destination address, protocol, source and destination port.
        router.sysctl({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
                       "net.ipv4.fib_multipath_hash_policy": 3,
                       "net.ipv4.fib_multipath_hash_fields": "0x0037",
                       "net.ipv6.fib_multipath_hash_policy": 3,
                       "net.ipv6.fib_multipath_hash_fields": "0x0037"})
        uplink, _ = self._to_fabric(router, "router", UNDERLAY_MTU)
        uplink.add_address(f"{ROUTER_FABRIC[0]}/24").add_address(f"{ROUTER_FABRIC[1]}/64")
        router.ip("link", "add", "brc", "mtu", str(CLIENT_MTU), "type", "bridge")
        brc = router.interface("brc").up()
        brc.add_address(f"{ROUTER_CLIENT[0]}/24").add_address(f"{ROUTER_CLIENT[1]}/64")
        # One nexthop object per balancer and family; the VIP routes point at
        # a group of them, replaced whole when the set changes.
        for i, node in enumerate(BALANCERS, 1):
            router.ip("nexthop", "add", "id", str(i), "via", node.v4, "dev", "eth0")
            router.ip("-6", "nexthop", "add", "id", str(10 + i), "via", node.v6, "dev", "eth0")

    def _client(self, node: Node) -> None:
        ns = self.ns[node.name] = self.topology.namespace(node.name)
        router = self.ns["router"]
        inside, port = self.topology.veth(ns, router, names=("eth0", f"p-{node.name}"))
        router.ip("link", "set", port.name, "master", "brc")
        inside.add_address(f"{node.v4}/24").add_address(f"{node.v6}/64")
        ns.ip("route", "add", "default", "via", ROUTER_CLIENT[0])
        ns.ip("-6", "route", "add", "default", "via", ROUTER_CLIENT[1])

    def _backend(self, node: Node) -> None:
        ns = self.ns[node.name] = self.topology.namespace(node.name)
        # The VIP on lo: neither answer ARP for it nor use it as ARP source.
        ns.sysctl({"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
        underlay, _ = self._to_fabric(ns, node.name, UNDERLAY_MTU)
        underlay.add_address(f"{node.v4}/24").add_address(f"{node.v6}/64")
        for device, local in (("vx4", node.v4), ("vx6", node.v6)):
            # One vxlan device per outer family; nolearning: the backend never
            # sends into the tunnel, so it needs no forwarding database.
            ns.ip("link", "add", device, "address", VXLAN_MAC, "type", "vxlan", "id", str(VNI),
                  "dstport", "4789", "local", local, "dev", "eth0", "nolearning")
            ns.interface(device).up()
        # Reverse-path filtering: strict on the underlay, off on the tunnel.
        # A request arrives on vx4 while the route back to its client is eth0;
        # and loose mode does not help: the kernel fails the check on any
        # interface without an IPv4 address, which vx4 is (checked: the
        # SYNs were counted as TcpExtIPReversePathFilter). The kernel uses
        # the larger of "all" and the device's value, so "all" stays 0.
        ns.sysctl({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.eth0.rp_filter": 1,
                   "net.ipv4.conf.vx4.rp_filter": 0, "net.ipv4.conf.vx6.rp_filter": 0})
        ns.interface("lo").add_address(f"{VIP4}/32").add_address(f"{VIP6}/128")
        ns.ip("route", "add", "default", "via", ROUTER_FABRIC[0])
        ns.ip("-6", "route", "add", "default", "via", ROUTER_FABRIC[1])
        self.backend_servers[node.name] = ns.spawn_logged(
            self.python, "-u", "-m", "pylb.lab.backend", node.name, VIP4, VIP6)

    def _balancer_namespace(self, node: Node) -> None:
        ns = self.ns[node.name] = self.topology.namespace(node.name)
        # The port belongs to DPDK: the namespace's kernel must not speak on
        # it (no address; IPv6 off, so no router solicitations or MLD).
        ns.sysctl({"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        inside, port = self._to_fabric(ns, node.name, UNDERLAY_MTU)
        # The kernel finishes checksums and segments (GSO/TSO) only when a
        # frame leaves through a device without those offloads: af_packet
        # hands DPDK what it is given, so both ends have them off.
        for end in (inside, port):
            state = end.set_offloads(tx=False, tso=False, gso=False, gro=False)
            on = [k for k in ("tx", "tso", "gso", "gro") if state[k]]
            if on:
                raise NetnsError(f"{end}: offloads {on} stay on")

    # ------------------------------------------------------------ the router

    def set_router(self, names: list[str]) -> None:
        """The ECMP set of both VIP routes, replaced in one step per family."""
        router = self.ns["router"].name
        replace_ecmp(router, names, "replace" if self.router_set else "add")
        if not self.router_set:
            ip(router, "route", "add", f"{VIP4}/32", "nhid", str(ECMP_GROUPS[0]))
            ip(router, "-6", "route", "add", f"{VIP6}/128", "nhid", str(ECMP_GROUPS[1]))
        self.router_set = [n.name for n in BALANCERS if n.name in names]

    def sync_router(self) -> list[str]:
        """The ECMP set as the router has it now (a drain hook changes it)."""
        self.router_set = ecmp_set(self.ns["router"].name)
        return self.router_set

    def route_command(self, verb: str, name: str) -> list[str]:
        """A balancer's drain hook: `pylb lab withdraw|announce`, run by the
        balancer in its own namespace, changes the router's set by name."""
        return [self.python, "-m", "pylb.cli", "lab", verb, name,
                "--router", self.ns["router"].name]

    # ------------------------------------------------------------ balancers

    def config(self, name: str, state: ClusterState) -> dict:
        node = NODES[name]
        index = BALANCERS.index(node)
        vips = []
        for vip, family in ((VIP4, "v4"), (VIP6, "v6")):
            backends = [{"name": b, "address": getattr(NODES[b], family), "weight": w}
                        for b, w in state.backends]
            for port, label in ((HTTP_PORT, "web"), (ECHO_PORT, "echo")):
                vips.append({"name": f"{label}{family[1]}", "address": vip, "port": port,
                             "encap": {"type": "vxlan", "vni": VNI, "inner_mac": VXLAN_MAC},
                             "backends": backends})
        return {
            "balancer": {
                "name": name,
                "data": {"device": f"net_af_packet_{name},iface=eth0,framecnt={RING_FRAMES}",
                         "address_v4": node.v4,
                         "address_v6": node.v6, "mtu": AF_PACKET_MTU, "mbufs": 8191},
                "flow_cache": {"capacity": 65536},
                # Balancers share the machine's cores with the kernel's TCP:
                # spread them, one pinned core each.
                "dpdk": {"cores": [self.cores[index % len(self.cores)]]},
                "log": {"format": "json", "level": self.log_level},
                "admin": {"socket": str(self.admin_socket(name))},
                # `pylb drain`: the withdraw command takes this balancer out
                # of the router's ECMP set, as a BGP withdrawal would.
                "drain": {"quiet_period": DRAIN_QUIET_S, "timeout": DRAIN_TIMEOUT_S,
                          "withdraw": self.route_command("withdraw", name),
                          "announce": self.route_command("announce", name)},
            },
            "vips": vips,
            "cluster": {"balancers": [{"name": m, "address": NODES[m].v4} for m in state.members],
                        "key": self.key, "state_exchange": state.exchange,
                        **({"push_interval_ms": self.push_interval_ms}
                           if self.push_interval_ms else {})},
        }

    def write_config(self, path: Path, config: dict) -> None:
        """Written whole and renamed into place: a reload never reads half a file."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))  # JSON is YAML
        os.replace(tmp, path)

    def start_balancers(self, names: list[str], state: ClusterState,
                        previous: ClusterState | None = None) -> list[BalancerProcess]:
        """Starts them side by side and waits until each runs, knows its next
        hops and takes SIGHUP. previous: the cluster before its last change,
        for a balancer that joins while that change is in force."""
        started = []
        for name in names:
            ns = self.ns[name]
            config_file = self.workdir / f"{name}.yaml"
            self.write_config(config_file, self.config(name, state))
            argv = [self.python, "-u", "-m", "pylb.cli", "run", "--config", str(config_file)]
            if previous is not None:
                before = self.workdir / f"{name}-previous.yaml"
                self.write_config(before, self.config(previous.members[0], previous))
                argv += ["--previous-config", str(before)]
            process = ns.spawn_logged(*argv, grace=STOP_S)
            lb = self.balancers[name] = BalancerProcess(name, ns, config_file, process)
            started.append(lb)
        for lb in started:
            self._wait_ready(lb, state)
        return started

    def _wait_ready(self, lb: BalancerProcess, state: ClusterState) -> None:
        lb.process.wait_for('"balancer started"', START_S)
        deadline = time.monotonic() + START_S
        while not _sighup_caught(lb.process.pid):
            if lb.process.returncode is not None or time.monotonic() > deadline:
                raise NetnsError(f"{lb.name} never became ready for SIGHUP\n"
                                 + lb.process.transcript())
            time.sleep(0.02)
        # The balancer asks for its next hops at start; each backend's kernel
        # records who asked, so this is the moment it can forward to all.
        node = NODES[lb.name]
        backends = [b for b, _ in state.backends]
        while True:
            missing = [b for b in backends
                       if node.v4 not in self.ns[b].ip("neigh", "show", node.v4)
                       or node.v6 not in self.ns[b].ip("-6", "neigh", "show", node.v6)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"backends {missing} never heard {lb.name}'s ARP/NS\n"
                                 + lb.process.transcript())
            time.sleep(0.05)

    def reload(self, names: list[str], state: ClusterState, timeout: float = 10.0) -> None:
        """Configuration management: the new file, then SIGHUP; waits until
        every balancer has swapped it in (or says why it refused)."""
        marks = {}
        for name in names:
            lb = self.balancers[name]
            marks[name] = lb.process.stderr.count('"configuration reloaded"')
            self.write_config(lb.config_file, self.config(name, state))
        for name in names:
            os.kill(self.balancers[name].process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        for name in names:
            lb = self.balancers[name]
            while lb.process.stderr.count('"configuration reloaded"') <= marks[name]:
                said = lb.process.stderr
                if '"configuration rejected"' in said or lb.process.returncode is not None \
                        or time.monotonic() > deadline:
                    raise NetnsError(f"{name} did not reload\n" + lb.process.transcript())
                time.sleep(0.01)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up, no summary, no goodbye to the peers."""
        lb = self.balancers[name]
        os.kill(lb.process.pid, signal.SIGKILL)
        lb.process.popen.wait()
        lb.killed = True
        lb.rc = lb.process.popen.returncode

    def start_drain(self, name: str) -> DrainRecord:
        """`pylb drain --wait` as an operator runs it on the balancer's host:
        in its namespace, over its admin socket. Returns once the balancer
        says it is draining: ownership handed off, withdraw command started."""
        lb = self.balancers[name]
        record = lb.drain = DrainRecord(name, time.monotonic())
        record.cli = self.ns[name].spawn_logged(
            self.python, "-u", "-m", "pylb.cli", "drain", "--wait",
            "--timeout", str(DRAIN_TIMEOUT_S + STOP_S), "--socket", str(self.admin_socket(name)))
        deadline = time.monotonic() + START_S
        while '"balancer draining"' not in lb.process.stderr:
            if record.cli.returncode is not None or lb.process.returncode is not None \
                    or time.monotonic() > deadline:
                raise NetnsError(f"{name} did not start draining\n{record.cli.transcript()}\n"
                                 + lb.process.transcript())
            time.sleep(0.02)
        record.draining_at = time.monotonic()
        record.status = self.status(name)
        if record.status:
            record.admin = record.status.get("drain")
            record.view = list((record.status.get("cluster") or {}).get("members") or [])
        return record

    def finish_drain(self, name: str) -> DrainRecord:
        """Waits for the draining balancer to exit by itself (at most its
        drain.timeout, and a stop's time) and for `pylb drain --wait` to see
        it go; its admin API is read meanwhile for its last counters."""
        lb = self.balancers[name]
        record = lb.drain
        deadline = record.started + DRAIN_TIMEOUT_S + STOP_S
        while True:
            record.status = self.status(name) or record.status
            rc = lb.process.wait(0.5)
            if rc is not None:
                record.ended, record.rc = time.monotonic(), rc
                lb.rc, lb.summary = rc, lb.process.stdout
                break
            if time.monotonic() > deadline:
                break       # still running: stop_balancers ends it, the verdict says so
        # The command polls every 0.5 s; it gives up by itself at its --timeout.
        record.cli_rc = record.cli.wait(max(deadline - time.monotonic(), 0.0) + STOP_S)
        record.cli_output = (record.cli.stdout + record.cli.stderr).strip()
        said = lb.process.stderr
        record.withdraw = next(iter(log_events(said, "drain withdraw command ended")), None)
        record.outcome = next(iter(log_events(said, "balancer drained")
                                   + log_events(said, "balancer drain timed out")), None)
        record.router_after = self.sync_router()
        return record

    def stop_balancers(self) -> None:
        """SIGTERM to every running balancer at once; each prints its summary."""
        running = [lb for lb in self.balancers.values() if lb.process.returncode is None]
        # One SIGTERM each (terminate() sends it), side by side: a second one
        # could reach a balancer in Python's own shutdown, where the default
        # action is back, and kill it after its summary.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(running) or 1) as pool:
            codes = list(pool.map(lambda lb: lb.process.terminate(STOP_S), running))
        for lb, rc in zip(running, codes):
            lb.rc = rc
            lb.summary = lb.process.stdout

    def admin_socket(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def status(self, name: str) -> dict | None:
        """A balancer's GET /status, or None if it does not answer (it is
        starting or has ended)."""
        from pylb.admin import Client
        from pylb.errors import PylbError
        try:
            return Client(str(self.admin_socket(name)), timeout=3).request("GET", "/status")
        except PylbError:
            return None

    def save_log(self, lb: BalancerProcess, suffix: str = "") -> Path:
        path = self.log_dir / f"{lb.name}{suffix}.log"
        path.write_text(lb.process.transcript())
        return path

    def transcripts(self) -> str:
        return "\n".join(lb.process.transcript() for lb in self.balancers.values())

    # ------------------------------------------------------------ observing

    def fabric_packets(self) -> dict[str, int]:
        """Frames the fabric delivered to each balancer's port since it was
        made (ARP and peer messages included; client traffic dominates)."""
        out = {}
        for link in json.loads(self.ns["fabric"].ip("-s", "-j", "link", "show")):
            name = link["ifname"]
            if name.startswith("p-lb"):
                out[name[2:]] = link["stats64"]["tx"]["packets"]
        return out

    def write_state(self, phase: str, **extra) -> None:
        """What `pylb lab status` shows about this run."""
        state = {"pid": os.getpid(), "phase": phase, "workdir": str(self.workdir),
                 "namespaces": {role: ns.name for role, ns in self.ns.items()},
                 "balancers": {n: {"pid": lb.process.pid, "running": lb.process.returncode is None,
                                   "admin_socket": str(self.admin_socket(n))}
                               for n, lb in self.balancers.items()},
                 "router": self.router_set, "updated": time.time(), **extra}
        self.write_config(self.workdir / "lab.json", state)


def new_workdir(base: Path = Path("/tmp")) -> Path:
    """The run's directory: configurations, admin sockets, logs. Named after
    the run (pylb.netns's tag), so a dead run's is recognised and removed."""
    sweep_workdirs(base)
    path = base / f"{WORKDIR_PREFIX}{run_tag().rstrip('_')}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


def lab_states(base: Path = Path("/tmp")) -> list[dict]:
    """The state files of labs on this machine, with whether their run lives."""
    out = []
    for path in sorted(base.glob(f"{WORKDIR_PREFIX}pl*/lab.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        state["alive"] = owner_alive(state["pid"])
        out.append(state)
    return out


__all__ = ["AF_PACKET_MTU", "BACKENDS", "BALANCERS", "CLIENTS", "ClusterState", "DrainRecord",
           "ECHO_PORT", "HTTP_PORT", "Lab", "NODES", "VIP4", "VIP6", "change_ecmp", "ecmp_set",
           "lab_states", "log_events", "new_workdir", "sweep_workdirs"]


def stop_labs(base: Path = Path("/tmp"), timeout: float = 30.0,
              only: int | None = None) -> list[str]:
    """`pylb lab down`: asks every running lab to end (SIGTERM to the run,
    which removes what it made), then removes what dead runs left: their
    namespaces, links, processes inside them, and run directories."""
    from pylb.netns import process_start

    said = []
    for state in lab_states(base):
        if not state["alive"] or (only is not None and state["pid"] != only):
            continue
        pid = state["pid"]
        start = process_start(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        said.append(f"asked run {pid} ({state['workdir']}) to end")
        deadline = time.monotonic() + timeout
        while process_start(pid) == start and start is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_start(pid) == start and start is not None:
            said.append(f"run {pid} still runs after {timeout} s")
    said += [f"removed {name}" for name in sweep(base)]
    return said


def sweep(base: Path = Path("/tmp")) -> list[str]:
    """Removes what dead runs left (any run of pylb.netns: the lab's, the
    tests'): namespaces with whatever still runs in them, root-namespace
    links, the lab's run directories. What live runs made stays."""
    from pylb.netns import cleanup_stale

    return cleanup_stale() + sweep_workdirs(base)
