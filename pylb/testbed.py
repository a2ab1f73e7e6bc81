"""Several balancers in one process: each on a ring: port, a scripted ECMP
"router" in front, peer traffic carried between them, and backends that
record which flow reached them. Used by the scenario tests and
`pylb scenarios`; the balancers run the real shim and the real miss path.
"""
from __future__ import annotations

import ipaddress
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

from pylb import config as config_mod
from pylb import packet, peer, traffic
from pylb.balancer import Balancer
from pylb.flow_id import FlowKey, hash_bytes

GATEWAY = "203.0.113.254"
GATEWAY_MAC = "02:00:00:00:00:fe"
CLIENT_MAC = "02:00:00:00:00:c1"
VIP = "192.0.2.10"
KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def lb_address(i: int) -> str:
    return f"203.0.113.{1 + i}"


def backend_address(i: int) -> str:
    return f"203.0.113.{100 + i}"


@dataclass
class Backends:
    """What the backends received: frames per flow per backend address."""

    by_flow: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    frames: int = 0
    sizes: dict = field(default_factory=lambda: defaultdict(list))  # per flow, in arrival order

    def record(self, d: traffic.Delivery) -> None:
        self.by_flow[d.flow][d.backend] += 1
        self.sizes[d.flow].append(d.size)
        self.frames += 1


class Testbed:
    def __init__(self, balancers: list[str], backends: list[str], state_exchange: bool = True,
                 table_size: int = 65537, key: str | None = KEY, track: str = "all",
                 workers: dict[str, int] | None = None):
        """workers: worker processes per balancer (default 1); a balancer with
        several must be the first one made (it starts the EAL for them)."""
        self.names = list(balancers)
        self.workers = dict(workers or {})
        self.index = {name: i for i, name in enumerate(self.names)}
        self.backends = list(backends)
        self.backend_history: list[list[str]] = []   # every generation before the current
        self.state_exchange = state_exchange
        self.table_size = table_size
        self.key = key
        self.track = track
        self.lbs: dict[str, Balancer] = {}
        self.alive: set[str] = set()
        self.router: list[str] = []
        self.received = Backends()
        self.sent_frames = 0
        self.sent_by_flow: dict = defaultdict(int)
        self.lost_peer_frames = 0
        self.losses: set[tuple[str, int]] = set()      # (balancer, peer message type)
        self.stalled: set[str] = set()      # alive, but not run: frames wait in their rings
        try:
            for name in self.names:
                self.lbs[name] = Balancer(self.config(name))
                self.alive.add(name)
                self.router.append(name)
            # The cluster starts: its members tell each other that no tables
            # are in force yet (pylb/history.py) before any traffic comes.
            self.settle()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ configuration

    def config(self, name: str, backends: list[str] | None = None,
               members: list[str] | None = None) -> config_mod.Config:
        backends = self.backends if backends is None else backends
        members = [{"name": n, "address": lb_address(self.index[n])}
                   for n in (self.names if members is None else members)]
        return config_mod.parse({
            "balancer": {
                "name": name,
                "data": {"device": f"ring:tb_{name}", "address_v4": lb_address(self.index[name]),
                         "gateway_v4": GATEWAY,
                         "neighbors": [{"address": GATEWAY, "mac": GATEWAY_MAC}]},
                "flow_cache": {"capacity": 65536, "track": self.track},
                "max_held": 4096,
                "workers": self.workers.get(name, 1),
            },
            "cluster": {"balancers": members, "state_exchange": self.state_exchange,
                        "key": self.key, "request_timeout_ms": 100, "push_interval_ms": 1},
            "vips": [{"name": "web", "address": VIP, "protocol": "tcp", "port": 80,
                      "table_size": self.table_size,
                      "backends": [{"name": b, "address": backend_address(int(b.split("-")[1]))}
                                   for b in backends]}],
        }, f"testbed {name}")

    def add_balancer(self, name: str, join_router: bool = True,
                     previous: list[config_mod.Config] | None = None) -> None:
        """A balancer joins: configured everywhere, then (optionally) in the
        router. It learns the tables in force from the members
        (pylb/history.py); previous: configurations given instead
        (Balancer(previous_config=...), the override)."""
        self.index.setdefault(name, len(self.index))
        if name not in self.names:
            self.names.append(name)
        self.lbs[name] = Balancer(self.config(name), previous_config=previous)
        self.alive.add(name)
        if join_router:
            self.router.append(name)
        for other in self.members_alive() - {name}:
            self.lbs[other].reconfigure(self.config(other))

    def set_backends(self, backends: list[str]) -> None:
        """A backend change applied on every live balancer (as configuration management would)."""
        self.backend_history.append(self.backends)
        self.backends = list(backends)
        for name in self.members_alive():
            self.lbs[name].reconfigure(self.config(name))

    def remove_balancer(self, name: str) -> None:
        """A balancer leaves the cluster configuration (after leaving the router).
        It keeps running (a former holder during the handoff) until killed."""
        self.names.remove(name)
        for other in self.members_alive():
            self.lbs[other].reconfigure(self.config(other))

    def members_alive(self) -> set[str]:
        """Live balancers the configuration lists: the ones configuration
        management reaches (one that left keeps the configuration it had)."""
        return self.alive & set(self.names)

    def kill(self, name: str) -> None:
        """The balancer stops dead: no more processing, frames sent to it are lost."""
        self.alive.discard(name)
        if name in self.router:
            self.router.remove(name)
        self.lbs[name].close()
        del self.lbs[name]

    def stall(self, name: str) -> None:
        """The balancer stops running (kept off its CPU) until resume(): what
        is sent to it waits in its port's ring, nothing is lost."""
        self.stalled.add(name)

    def resume(self, name: str) -> None:
        self.stalled.discard(name)

    def set_router(self, names: list[str]) -> None:
        self.router = list(names)

    # ------------------------------------------------------------ traffic

    def route(self, flow: traffic.Flow) -> str:
        """The router's ECMP: a hash of the 5-tuple modulo the next hops, as a
        router without resilient hashing does, so a change moves most flows."""
        h = hash_bytes(str(flow).encode(), 7)
        return self.router[h % len(self.router)]

    def send(self, flows: list[traffic.Flow], kind: str) -> None:
        """One frame of each flow through the router, then settle()."""
        self.send_unsettled(flows, kind)
        self.settle()

    def send_unsettled(self, flows: list[traffic.Flow], kind: str) -> None:
        """One frame of each flow through the router, handed to the
        balancers; nothing runs yet."""
        by_lb = defaultdict(list)
        for f in flows:
            self.sent_by_flow[_fkey(f)] += 1
            lb = self.route(f)
            mac = self.lbs[lb].port.mac
            by_lb[lb] += f.frames(mac, CLIENT_MAC, [kind])
        for lb, frames in by_lb.items():
            self._inject(lb, frames)
            self.sent_frames += len(frames)

    def _inject(self, lb: str, frames: list[bytes]) -> None:
        if lb not in self.alive:
            self.lost_peer_frames += len(frames)
            return
        port = self.lbs[lb].port
        done = 0
        while done < len(frames):
            n = port.inject(frames[done:])
            done += n
            if n == 0:
                if lb in self.stalled:
                    raise RuntimeError(f"{lb} is stalled and its ring is full")
                self.step()

    def step(self) -> int:
        """Every live balancer runs once; what they sent is delivered."""
        moved = 0
        for name in list(self.alive - self.stalled):
            lb = self.lbs[name]
            lb.step(max_bursts=64, max_idle_us=0)
            for frame in lb.port.drain():
                moved += 1
                self._deliver(frame)
        return moved

    def _deliver(self, frame: bytes) -> None:
        p = packet.parse(frame)
        if p.result != packet.ParseResult.OK or p.l3 != packet.L3.IPV4:
            return                                    # ARP and the like: no one else asks
        dst = str(p.dst)
        # Any balancer that ever ran, configured or not: one that left still
        # answers as a former holder, and frames to a dead one are lost.
        for name, i in self.index.items():
            if lb_address(i) == dst:
                if self._lost_on_the_way(name, p, frame):
                    self.lost_peer_frames += 1
                    return
                self._inject(name, [frame])
                return
        d = traffic.decapsulate(frame)
        if d is not None:
            self.received.record(d)

    def lose(self, to: str, kind: peer.MessageType) -> None:
        """From now on, peer messages of this kind to this balancer are lost."""
        self.losses.add((to, kind))

    def _lost_on_the_way(self, to: str, p: packet.Parsed, frame: bytes) -> bool:
        if not self.losses:
            return False
        message = frame[p.l2_len + p.l3_len + 8:]
        return len(message) > 5 and (to, message[5]) in self.losses

    def settle(self, timeout: float = 10.0) -> None:
        """Runs until nothing is in flight and no state request waits (in a
        balancer's other worker processes too, asked once all looks quiet)."""
        deadline = time.monotonic() + timeout
        quiet, quiet_since = 0, None
        while time.monotonic() < deadline:
            moved = self.step()
            # An owner waiting for a flow's state still holds its packets,
            # and so does a joiner learning the tables in force.
            waiting = any(self.lbs[n].cluster.pending or self.lbs[n].cluster.undecided
                          or self.lbs[n].cluster.history.learning
                          for n in self.alive - self.stalled)
            if moved or waiting:
                quiet, quiet_since = 0, None
            else:
                quiet_since = quiet_since or time.monotonic()
                if not any(self.lbs[n].lanes_busy(quiet_since)
                           for n in self.alive - self.stalled):
                    quiet += 1
            if quiet >= 3:
                return
            if not moved:
                time.sleep(0.001)

    # ------------------------------------------------------------ results

    def broken(self, flows: list[traffic.Flow]) -> int:
        return sum(1 for f in flows if len(self.received.by_flow.get(_fkey(f), ())) > 1)

    def delivered(self, flows: list[traffic.Flow]) -> int:
        return sum(sum(self.received.by_flow.get(_fkey(f), {}).values()) for f in flows)

    def sizes(self, flow: traffic.Flow) -> list[int]:
        """The IP lengths of the flow's packets, in the order the backends got them."""
        return self.received.sizes.get(_fkey(flow), [])

    def lost(self, flows: list[traffic.Flow]) -> int:
        """Frames sent and not delivered, flow by flow (a duplicate of one
        frame does not make up for another's loss)."""
        return sum(max(0, self.sent_by_flow[_fkey(f)]
                       - sum(self.received.by_flow.get(_fkey(f), {}).values())) for f in flows)

    def duplicated(self, flows: list[traffic.Flow]) -> int:
        """Frames delivered more than once (a retried state request)."""
        return sum(max(0, sum(self.received.by_flow.get(_fkey(f), {}).values())
                       - self.sent_by_flow[_fkey(f)]) for f in flows)

    def moved_flows(self, flows: list[traffic.Flow]) -> int:
        """Flows whose bucket changed backend in the last change: the only
        flows that need state anywhere."""
        lb = self.lbs[next(iter(self.alive))]
        if not lb.dataplane.history:
            return 0
        n = 0
        for f in flows:
            c = lb.dataplane.classify(FlowKey(ipaddress.ip_address(f.src),
                                              ipaddress.ip_address(f.dst), f.sport, f.dport, f.proto))
            n += c.moved
        return n

    def _cluster_totals(self, name: str) -> dict:
        """A balancer's cluster counters, its other worker processes' included
        (as they report them now)."""
        lb = self.lbs[name]
        if lb.lanes is not None:
            asked, deadline = time.monotonic(), time.monotonic() + 5.0
            while lb.lanes.reports_since(asked) is None and time.monotonic() < deadline:
                lb.lanes.poll()
                time.sleep(0.001)
        return lb._cluster_totals()

    def state_entries(self) -> int:
        return sum(self._cluster_totals(n)["state_entries"] for n in self.alive)

    def counters(self) -> dict:
        total = defaultdict(int)
        for n in self.alive:
            for k, v in self._cluster_totals(n)["counters"].items():
                total[k] += v
        return dict(total)

    def close(self) -> None:
        for lb in self.lbs.values():
            lb.close()
        self.lbs.clear()
        self.alive.clear()

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_cluster(lb: Balancer, **changes) -> None:
    """Changes a running balancer's cluster settings in place (tests)."""
    lb.cluster.config = lb.cluster.config.model_copy(update=changes)


def _fkey(f: traffic.Flow) -> tuple:
    return (f.proto, str(ipaddress.ip_address(f.src)), f.sport, str(ipaddress.ip_address(f.dst)),
            f.dport)


def flows(n: int, seed: int) -> list[traffic.Flow]:
    return traffic.make_flows([("web", VIP, 6, 80)], n, random.Random(seed))
