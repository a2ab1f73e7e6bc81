"""End to end: a real balancer process on DPDK's af_packet PMD, with the
kernel's TCP on the client and on the backends, on one L2 segment of veths.

                        fabric ns: bridge br0 (MTU 9000)
         ┌─────────────────────────┬──────┴─────────────┬───────────────────┐
    client ns (MTU 1500)      lb ns (MTU 9000)      backend ns x3 (MTU 9000)
    eth0 203.0.113.100        eth0: no address;     eth0 203.0.113.11..13
         2001:db8:1::100      DPDK owns it with          2001:db8:1::11..13
    192.0.2.10 via .1         net_af_packet and     vx4, vx6: VXLAN 4242, decap
    2001:db8:10::10 via ::1   answers ARP / NDP     lo: 192.0.2.10, 2001:db8:10::10
                              for 203.0.113.1,      HTTP on :80, echo on :7
                              2001:db8:1::1

The client reaches the VIPs through the balancer, whose own ARP and NDP code
answers for its data addresses. The backends are on-link (no gateway): the
balancer resolves them itself and sends VXLAN; each backend's kernel
decapsulates and answers from the VIP on its loopback straight to the client
through the bridge (DSR). The balancer is its own process (`pylb run`): DPDK's
EAL starts once per process. Its summary, printed after SIGTERM, gives the
counters the tests check.

Deployment issues met here as on real hosts, and handled as there:

- Offloads. A veth hands a packet socket what the sending stack built: with
  TSO/GSO a TCP "segment" of up to 64 KB, with TX checksum offload a TCP
  checksum not yet computed (CHECKSUM_PARTIAL). af_packet copies such a frame
  as it is: DPDK would get a frame larger than its ring slot (cut short), and
  the backend would drop the decapsulated packet for its bad checksum. The
  kernel finishes both (software GSO, checksum) when a frame leaves through a
  device without those features, so TX checksum, TSO, GSO and GRO are off
  on both ends of the balancer's link (as `ethtool -K` sets them): the bridge
  segments and checksums on its way out to the balancer, and nothing is
  merged again on the way in. The client keeps its offloads, as any host on
  the Internet does. Checked:
  with them left on not even a handshake completes (the backend drops the
  SYN for its checksum), and with GRO on the bridge's client port merged
  frames of up to 7 KB reach the balancer, cut short by af_packet and
  dropped as parse_truncated.
- MTU. VXLAN adds 50 bytes to what the client sends (it keeps MTU 1500), so
  the underlay (bridge ports of the balancer and the backends, and their eth0)
  runs at 9000. data.mtu is not 9000, though: it is the largest outer packet
  the af_packet port can send (AF_PACKET_MTU), or packets would be lost
  silently in the PMD.
- Reverse-path filtering: a request arrives on vx4/vx6 while the route back
  to the client is eth0, so rp_filter is 0 on the backends (the harness's
  default too; set again because the recipe depends on it).
- The VIP on lo: arp_ignore=1 and arp_announce=2 on the backends, so they
  neither answer ARP for the VIP nor use it as ARP source on eth0.
- The balancer's namespace keeps its kernel off the DPDK port: no address,
  IPv6 disabled (no router solicitations or MLD reports from it).
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from netns import Interface, LoggedProcess, Namespace, Topology

pytestmark = [pytest.mark.netns, pytest.mark.dpdk, pytest.mark.timeout(45)]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
UNDERLAY_MTU = 9000
CLIENT_MTU = 1500
# The af_packet PMD's TX ring slots are 2048 bytes (its framesz default) less
# 32 bytes of TPACKET2 header: 2016 bytes of frame, 2002 of IP. A longer
# frame is freed in the PMD without being counted anywhere (checked: a
# 2024-byte frame counted as forwarded never reached a backend), so data.mtu
# must not promise more than that, whatever the interface MTU.
AF_PACKET_MTU = 2002
VNI = 4242
VXLAN_MAC = "00:00:5e:00:53:10"  # RFC 7042 documentation range
LB4, LB6 = "203.0.113.1", "2001:db8:1::1"
CLIENT4, CLIENT6 = "203.0.113.100", "2001:db8:1::100"
BACKENDS = [(f"be{i}", f"203.0.113.{10 + i}", f"2001:db8:1::{10 + i}") for i in (1, 2, 3)]
VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
NOT_A_VIP = "192.0.2.99"  # routed to the balancer like the VIP, but no VIP is there
HTTP_PORT, ECHO_PORT, DISCARD_PORT = 80, 7, 9
START = 10.0     # s for a process to be ready (the balancer: EAL, ports, mempools)
STOP = 5.0       # s for the balancer to exit after SIGTERM
WAIT = 3.0       # s for one exchange: covers one lost SYN (retried after 1 s)
HTTP_REQUESTS, HTTP_BUDGET = 50, 10.0  # s for all of them (they take well under 1 s)
ECHO_CONNECTIONS, ECHO_CHUNKS, ECHO_PAUSE = 20, 12, 0.05
# Drops that mean the balancer lost traffic it should have carried. Others
# (ARP for other hosts, the namespaces' own ICMPv6, flooded frames) are the
# segment's background and may occur.
LOSS_DROPS = {"parse_truncated", "parse_bad", "no_backend", "no_neighbor", "too_big", "encap",
              "exception", "verdict"}

# One process per backend: HTTP answering with the backend's name and the
# client address it saw, and a TCP echo, on every VIP.
BACKEND_SERVER = r"""
import http.server, json, socket, socketserver, sys, threading
name, vips = sys.argv[1], sys.argv[2:]

class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"backend": name, "peer": list(self.client_address[:2])}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(30)
        while data := self.request.recv(65536):
            self.request.sendall(data)

servers = []
for vip in vips:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    for port, handler, base in ((80, Web, http.server.ThreadingHTTPServer),
                                (7, Echo, socketserver.ThreadingTCPServer)):
        cls = type("Server", (base,), {"address_family": family, "daemon_threads": True})
        servers.append(cls((vip, port), handler))
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# ---------------------------------------------------------------- the summary

@dataclass
class Summary:
    """What `pylb run` printed when it stopped, read back into numbers."""

    text: str
    outcomes: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    per_backend: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Summary:
        summary, section = cls(text), None
        sections = ("Per VIP", "Per backend", "Outcomes", "From the kernel (exception TAP)",
                    "Drops by reason", "Handed to Python",
                    "Data port (the driver's own counters)")
        for line in text.splitlines():
            if line in sections:
                section = line
                continue
            cells = re.split(r"\s{2,}", line.strip())
            numbers = [c for c in cells if c.isdigit()]
            if not numbers:  # headings, rulers, "(none)"
                continue
            if section in ("Outcomes", "From the kernel (exception TAP)"):
                summary.outcomes[cells[0]] = int(cells[1])
            elif section == "Drops by reason":
                summary.drops[cells[0]] = int(cells[1])
            elif section == "Per backend":
                summary.per_backend[(cells[0], cells[1])] = int(cells[3])
        return summary

    def count(self, outcome: str) -> int:
        """One row of the Outcomes table, by its label."""
        assert outcome in self.outcomes, f"no outcome {outcome!r} in the summary:\n{self.text}"
        return self.outcomes[outcome]

    @property
    def equations_hold(self) -> bool:
        return "Counter equations: all hold" in self.text


# ---------------------------------------------------------------- the lab

@dataclass
class Lab:
    topology: Topology
    client: Namespace
    lb: Namespace
    backends: dict[str, Namespace]
    config: Path
    balancer: LoggedProcess
    started: dict          # the balancer's "balancer started" log record
    tap_name: str | None
    hugepage_files_before: set[str]

    def post_mortem(self) -> str:
        """For a failure message: stops the balancer if it still runs, so that
        its summary (counters, drops by reason) is there, then all it said."""
        if self.balancer.returncode is None:
            self.balancer.terminate(STOP)
        return self.balancer.transcript()

    def stop_balancer(self) -> tuple[int | None, float, Summary]:
        """SIGTERM; returns the exit status (None: still running after STOP s),
        how long it took, and the summary the balancer printed."""
        begin = time.monotonic()
        rc = self.balancer.terminate(STOP)
        return rc, time.monotonic() - begin, Summary.parse(self.balancer.stdout)

    def stopped_cleanly(self) -> Summary:
        """Stops the balancer and checks what every run must satisfy: exit 0,
        counter equations, no traffic lost inside the balancer."""
        rc, _, summary = self.stop_balancer()
        said = self.balancer.transcript()
        assert rc == 0, said
        assert summary.equations_hold, said
        lost = {reason: n for reason, n in summary.drops.items() if reason in LOSS_DROPS}
        assert not lost, f"the balancer dropped traffic it should carry: {lost}\n{said}"
        return summary


def hugepage_files() -> set[str]:
    return set(os.listdir("/dev/hugepages")) if os.path.isdir("/dev/hugepages") else set()


def offloads_off(*ends: Interface) -> None:
    """Makes the kernel segment and checksum before a frame reaches the
    balancer's packet socket (see the module's docstring). Through the kernel's
    ethtool ioctl, as `ethtool -K` does: the ethtool program is optional on
    Debian and scripts/setup.sh does not install it."""
    for end in ends:
        state = end.set_offloads(tx=False, tso=False, gso=False, gro=False)
        on = [name for name in ("tx", "tso", "gso", "gro") if state[name]]
        assert not on, f"{end}: offloads {on} stay on"


def write_config(path: Path, device: str, tap_name: str | None,
                 health: dict | None = None) -> None:
    """health: the `health` section of the web VIPs (none: no checks)."""
    backends4 = [{"name": name, "address": v4} for name, v4, _ in BACKENDS]
    backends6 = [{"name": name, "address": v6} for name, _, v6 in BACKENDS]
    encap = {"type": "vxlan", "vni": VNI, "inner_mac": VXLAN_MAC}
    exception = {"policy": "tap", "tap_name": tap_name} if tap_name else {"policy": "drop"}
    config = {
        "balancer": {
            "name": "e2e",
            "data": {"device": device, "address_v4": LB4, "address_v6": LB6,
                     "mtu": AF_PACKET_MTU, "mbufs": 4095, "exception": exception},
            "flow_cache": {"capacity": 65536},
            "log": {"format": "json", "level": "info"},
            "admin": {"socket": str(path.parent / "admin.sock")},
        },
        "vips": [
            {"name": "web", "address": VIP4, "port": HTTP_PORT, "encap": encap,
             "backends": backends4},
            {"name": "echo", "address": VIP4, "port": ECHO_PORT, "encap": encap,
             "backends": backends4},
            {"name": "web6", "address": VIP6, "port": HTTP_PORT, "encap": encap,
             "backends": backends6},
        ],
    }
    if health is not None:
        for vip in config["vips"]:
            if vip["port"] == HTTP_PORT:
                vip["health"] = health
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML


def build_lab(topology: Topology, tmp_path: Path, *, tap: bool = False,
              health: dict | None = None) -> Lab:
    fabric = topology.namespace("fabric")
    fabric.ip("link", "add", "br0", "mtu", str(UNDERLAY_MTU), "type", "bridge")
    fabric.interface("br0").up()

    def attach(ns: Namespace, port: str, mtu: int) -> tuple[Interface, Interface]:
        inside, bridge_port = topology.veth(ns, fabric, names=("eth0", port))
        for end in (inside, bridge_port):
            end.ip("link", "set", end.name, "mtu", str(mtu))
        fabric.ip("link", "set", port, "master", "br0")
        return inside, bridge_port

    client = topology.namespace("client")
    client_if, _ = attach(client, "p-client", CLIENT_MTU)
    client_if.add_address(f"{CLIENT4}/24").add_address(f"{CLIENT6}/64")
    for dst, via in ((f"{VIP4}/32", LB4), (f"{NOT_A_VIP}/32", LB4), (f"{VIP6}/128", LB6)):
        client.ip("route", "add", dst, "via", via)

    lb = topology.namespace("lb")
    lb.sysctl({"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
    lb_if, lb_port = attach(lb, "p-lb", UNDERLAY_MTU)
    offloads_off(lb_if, lb_port)

    backends = {}
    for name, v4, v6 in BACKENDS:
        ns = topology.namespace(name)
        ns.sysctl({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                   "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
        underlay, _ = attach(ns, f"p-{name}", UNDERLAY_MTU)
        underlay.add_address(f"{v4}/24").add_address(f"{v6}/64")
        # A vxlan device listens on one family: vx4 for the VIP whose backends
        # are IPv4, vx6 for the one whose backends are IPv6. nolearning: the
        # backend never sends into the tunnel, so it needs no FDB.
        for device, local in (("vx4", v4), ("vx6", v6)):
            ns.ip("link", "add", device, "address", VXLAN_MAC, "type", "vxlan", "id", str(VNI),
                  "dstport", "4789", "local", local, "dev", "eth0", "nolearning")
            ns.sysctl({f"net.ipv4.conf.{device}.rp_filter": 0})
            ns.interface(device).up()
        for vip in (f"{VIP4}/32", f"{VIP6}/128"):
            ns.interface("lo").add_address(vip)
        backends[name] = ns
    servers = [ns.spawn(PYTHON, "-c", BACKEND_SERVER, name, VIP4, VIP6)
               for name, ns in backends.items()]
    for server in servers:
        assert server.readline(START) == "ready"

    # Unique names, although DPDK's are per process and the TAP lives in the
    # balancer's namespace: two runs side by side stay apart in logs too.
    tag = lb.name.split("-")[0]
    tap_name = f"{tag}x" if tap else None
    config = tmp_path / "lb.yaml"
    write_config(config, f"net_af_packet_{tag},iface=eth0", tap_name, health)
    before = hugepage_files()
    balancer = lb.spawn_logged(PYTHON, "-u", "-m", "pylb.cli", "run", "--config", str(config),
                               cwd=ROOT, grace=STOP)
    balancer.wait_for('"balancer started"', START)
    started = next(json.loads(line) for line in balancer.stderr.splitlines()
                   if '"balancer started"' in line)
    lab = Lab(topology, client, lb, backends, config, balancer, started, tap_name, before)
    warm_up(lab)
    return lab


def warm_up(lab: Lab) -> None:
    """Waits until every backend has heard the balancer's ARP request and
    neighbour solicitation (Linux records who asked when it answers): from
    then on the balancer knows its next hops and loses no first SYN to
    drop_no_neighbor."""
    deadline = time.monotonic() + START
    while True:
        missing = [name for name, ns in lab.backends.items()
                   if LB4 not in ns.ip("neigh", "show", LB4)
                   or LB6 not in ns.ip("-6", "neigh", "show", LB6)]
        if not missing:
            return
        assert time.monotonic() < deadline, \
            f"backends {missing} never heard the balancer's ARP/NS\n{lab.post_mortem()}"
        time.sleep(0.05)


@pytest.fixture
def make_lab(topology, tmp_path):
    """Builds the topology and starts a balancer in it; the topology's clean-up
    stops it (SIGTERM, then SIGKILL) and removes everything."""
    return lambda **options: build_lab(topology, tmp_path, **options)


# ---------------------------------------------------------------- the tests

def pylb_which(config: Path, flow: str) -> str | None:
    """The backend `pylb which` names for flow. The command runs in this
    process (click's runner): the same code as the executable, without a
    Python start per flow."""
    from pylb import cli

    result = CliRunner().invoke(cli.main, ["which", "--config", str(config), "--json", flow])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["backend"]


@pytest.mark.parametrize("client, vip", [(CLIENT4, VIP4), (CLIENT6, VIP6)], ids=["ipv4", "ipv6"])
def test_http_requests_reach_the_backend_pylb_which_names(make_lab, client, vip):
    """Real HTTP through the balancer: every request answered, by more than one
    backend, each time by the backend `pylb which` names for its 5-tuple, which
    saw the client's own address and port (DSR changes nothing inside)."""
    lab = make_lab()
    ports = [42000 + i for i in range(HTTP_REQUESTS)]
    def get(port: int) -> dict:
        conn = http.client.HTTPConnection(vip, HTTP_PORT, timeout=WAIT,
                                          source_address=(client, port))
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200, response.status
            return json.loads(response.read())
        finally:
            conn.close()

    def get_all() -> dict[int, dict | str]:
        answers, deadline = {}, time.monotonic() + HTTP_BUDGET
        for port in ports:
            if time.monotonic() > deadline:  # broken: say so now, not after 50 timeouts
                answers[port] = f"not tried: the {HTTP_BUDGET} s budget is spent"
                continue
            try:
                answers[port] = get(port)
            except (OSError, AssertionError, ValueError) as exc:
                answers[port] = f"{type(exc).__name__}: {exc}"
        return answers

    answers = lab.client.call(get_all)
    failed = {port: a for port, a in answers.items() if isinstance(a, str)}
    assert not failed, f"{len(failed)} of {len(ports)} requests failed: {failed}\n" \
        + lab.post_mortem()
    def endpoint(address: str, port: int) -> str:
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

    named = {port: pylb_which(lab.config,
                              f"tcp {endpoint(client, port)} -> {endpoint(vip, HTTP_PORT)}")
             for port in ports}
    wrong = {port: (a["backend"], named[port]) for port, a in answers.items()
             if a["backend"] != named[port]}
    assert not wrong, f"(answered by, pylb which) differ: {wrong}"
    assert all(a["peer"] == [client, port] for port, a in answers.items())
    answered_by = {a["backend"] for a in answers.values()}
    assert len(answered_by) > 1, f"no spread: every request went to {answered_by}"

    # The client learnt the balancer's MAC from the balancer's own ARP / NDP.
    neighbour = lab.client.ip("neigh", "show", LB4 if client == CLIENT4 else LB6)
    assert lab.started["mac"] in neighbour, (neighbour, lab.started)
    summary = lab.stopped_cleanly()
    # Every backend, by ARP and by NDP: the VIPs use both families of them.
    assert summary.count("neighbours learnt") >= 2 * len(BACKENDS), summary.text
    assert summary.count("ARP / ND answered") >= 1, summary.text
    assert summary.count("forwarded, new flow") >= HTTP_REQUESTS, summary.text
    vip_name = "web" if client == CLIENT4 else "web6"
    carried = {b for (v, b), packets in summary.per_backend.items() if v == vip_name and packets}
    assert carried == answered_by, summary.text


def test_concurrent_echo_connections_get_every_byte_back(make_lab):
    """Long-lived TCP: ECHO_CONNECTIONS connections at once, each sending
    chunks of 1 to 8 KB (several segments, so the client's TSO is in play) for
    about a second; every byte comes back, no reset, no stall past WAIT."""
    lab = make_lab()
    socks = [lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
             for _ in range(ECHO_CONNECTIONS)]
    start = threading.Barrier(ECHO_CONNECTIONS, timeout=WAIT)

    def converse(index: int) -> int:
        sock, rng = socks[index], random.Random(index)
        sock.settimeout(WAIT)  # a stall longer than this fails the connection
        sock.bind((CLIENT4, 43000 + index))
        sock.connect((VIP4, ECHO_PORT))
        start.wait()  # all connections exist before any sends: they overlap
        echoed = 0
        for _ in range(ECHO_CHUNKS):
            chunk = rng.randbytes(rng.randint(1024, 8192))
            sock.sendall(chunk)
            back = bytearray()
            while len(back) < len(chunk):
                part = sock.recv(len(chunk) - len(back))
                if not part:
                    raise ConnectionError(f"closed by the other end after {echoed + len(back)} B")
                back += part
            if back != chunk:
                raise AssertionError(f"echo differs after {echoed} good bytes")
            echoed += len(chunk)
            time.sleep(ECHO_PAUSE)
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":  # the backend's FIN: an orderly end, no reset
            raise AssertionError("data after the end of the echo")
        sock.close()
        return echoed

    with concurrent.futures.ThreadPoolExecutor(max_workers=ECHO_CONNECTIONS) as pool:
        futures = [pool.submit(converse, i) for i in range(ECHO_CONNECTIONS)]
        results, failures = [], []
        for index, future in enumerate(futures):
            try:
                results.append(future.result(timeout=ECHO_CHUNKS * (WAIT + ECHO_PAUSE) + WAIT))
            except Exception as exc:  # every connection's fate goes in the message
                failures.append(f"connection {index}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures) + "\n" + lab.post_mortem()
    assert len(results) == ECHO_CONNECTIONS and min(results) >= ECHO_CHUNKS * 1024
    summary = lab.stopped_cleanly()
    carried = {b for (v, b), packets in summary.per_backend.items() if v == "echo" and packets}
    assert len(carried) > 1, summary.text


def test_a_frame_for_no_vip_goes_to_the_kernel_through_the_tap(make_lab):
    """exception.policy tap: a frame for no VIP reaches the TAP device that
    DPDK's net_tap PMD made in the balancer's namespace, unchanged, and
    exception_tap counts it."""
    lab = make_lab(tap=True)
    assert lab.tap_name in lab.lb.ip("link", "show", lab.tap_name)
    capture = lab.lb.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    capture.bind((lab.tap_name, 0))
    sender = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    token = os.urandom(16).hex().encode()
    sender.sendto(token, (NOT_A_VIP, DISCARD_PORT))

    seen, found = 0, None
    deadline = time.monotonic() + WAIT
    while found is None and (left := deadline - time.monotonic()) > 0:
        capture.settimeout(left)
        try:
            frame, address = capture.recvfrom(65535)
        except TimeoutError:
            break
        if address[2] == socket.PACKET_OUTGOING:  # the namespace's own kernel speaking
            continue
        seen += 1
        if token in frame:
            found = frame
    assert found is not None, f"no frame with the token on {lab.tap_name} in {WAIT} s\n" \
        + lab.post_mortem()
    client_mac = lab.client.interface("eth0").mac
    # Untouched: the client's Ethernet header to the balancer, its IPv4 datagram.
    assert found[:12] == bytes.fromhex(lab.started["mac"].replace(":", "")) \
        + bytes.fromhex(client_mac.replace(":", ""))
    assert found[26:34] == socket.inet_aton(CLIENT4) + socket.inet_aton(NOT_A_VIP)
    summary = lab.stopped_cleanly()
    assert summary.count("to the kernel (exception TAP)") >= seen, summary.text
    assert "exception" not in summary.drops, summary.text


def test_sigterm_under_traffic_exits_clean_and_leaves_no_hugepage_file(make_lab):
    """Shutdown as in service: SIGTERM while a connection is sending; exit 0
    within STOP s, the summary with its counter equations, nothing left in
    /dev/hugepages."""
    lab = make_lab()
    sock = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect((VIP4, ECHO_PORT))
    sock.sendall(b"x" * 1000)
    assert len(sock.recv(1000)) > 0
    stop = threading.Event()

    def pump() -> None:
        # Keeps frames arriving during the shutdown; ends on stop or when the
        # connection stalls (it does once the balancer is gone).
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                sock.sendall(b"y" * 1000)
                sock.recv(65536)
            except OSError:  # timeouts included
                return

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    time.sleep(0.2)
    rc, took, summary = lab.stop_balancer()
    stop.set()
    pumping.join(WAIT)
    said = lab.balancer.transcript()
    assert rc == 0, said
    assert took < STOP, said
    assert summary.equations_hold, said
    assert summary.count("received") > 0, said
    left = hugepage_files() - lab.hugepage_files_before
    assert not left, f"hugepage files left (hugepages={lab.started['hugepages']}): {left}"


# ---------------------------------------------------------------- health checks via the VIP

def backend_checks(lab: Lab, vip: str) -> dict[str, dict]:
    """backend -> its health check's state, from the admin API."""
    from pylb.admin import Client

    rows = Client(str(lab.config.parent / "admin.sock")).request("GET", "/backends")["backends"]
    return {row["backend"]: row.get("check") or {} for row in rows if row["vip"] == vip}


def wait_checks(lab: Lab, vip: str, want: dict[str, bool], what: str) -> dict[str, dict]:
    """Waits until each named backend's check is `up` as wanted, with at least
    one check done since the wait began; returns the checks."""
    begin = time.time()
    deadline = time.monotonic() + 8 * WAIT
    while True:
        checks = backend_checks(lab, vip)
        if all(checks.get(name, {}).get("up") == up and checks[name].get("last_ok") == up
               and (checks[name].get("last_checked") or 0) > begin for name, up in want.items()):
            return checks
        assert time.monotonic() < deadline, f"{what}: {checks}\n{lab.post_mortem()}"
        time.sleep(0.1)


@pytest.mark.parametrize("vip_name, vip, vxlan", [("web", VIP4, "vx4"), ("web6", VIP6, "vx6")],
                         ids=["ipv4", "ipv6"])
def test_health_checks_via_the_vip_take_the_traffic_path(make_lab, vip_name, vip, vxlan):
    """`health.via: vip`: the balancer's kernel connects to the VIP from its
    data address and the balancer encapsulates the check to the backend under
    check, as it does a client's connection. A backend whose service answers
    but whose decapsulation is down fails its check (a direct check would not
    see it) and returns once it is up again; the others pass throughout."""
    health = {"type": "http", "via": "vip", "interval": 0.3, "timeout": 0.3, "rise": 1, "fall": 2}
    lab = make_lab(tap=True, health=health)
    names = [name for name, _, _ in BACKENDS]
    wait_checks(lab, vip_name, {name: True for name in names}, "checks never passed")

    broken = lab.backends["be2"]
    broken.ip("link", "set", vxlan, "down")
    # The service itself still answers on the backend.
    local = broken.call(http.client.HTTPConnection, vip, HTTP_PORT, timeout=WAIT)
    broken.call(local.request, "GET", "/")
    assert broken.call(local.getresponse).status == 200
    checks = wait_checks(lab, vip_name, {"be1": True, "be2": False, "be3": True},
                         "be2 did not fail through the VIP")
    assert checks["be2"]["last_error"], checks

    broken.ip("link", "set", vxlan, "up")
    wait_checks(lab, vip_name, {name: True for name in names}, "be2 did not come back")
    # The kernel's own route to the VIPs is unchanged: only check sockets take the TAP.
    family = f"-{6 if ':' in vip else 4}"
    main = lab.lb.ip(family, "route", "show", "table", "main").splitlines()
    assert not [route for route in main if route.startswith(vip)], main
    assert lab.tap_name in lab.lb.ip(family, "route", "show", "table", "4242")

    summary = lab.stopped_cleanly()
    assert summary.count("health checks to backends") > 0, summary.text
    assert not lab.lb.ip(family, "rule", "show", "lookup", "4242"), \
        "the policy rule for check sockets outlived the balancer"
