"""One balancer: the EAL, its data port, flow cache, neighbour table, worker and
dataplane, and the control loop that decides what the fast path hands up."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import structlog

from pylb import eal as eal_mod
from pylb.config import Config
from pylb.dataplane import BackendRegistry, Dataplane
from pylb.errors import ConfigError
from pylb.flow_cache import FlowCache, Timeouts
from pylb.neigh import NeighborTable
from pylb.port import Port
from pylb.stats import Stats
from pylb.worker import Action, Punt, PuntReason, Verdict, Worker

log = structlog.get_logger("pylb.balancer")
PCI_RE = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
AGE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class BackendCount:
    vip: str
    backend: str
    address: str
    packets: int
    bytes: int


class Balancer:
    """Start with `with Balancer(config) as lb:`; close() stops the worker, frees
    every held mbuf, closes the ports and (if it started it) the EAL."""

    def __init__(self, config: Config, previous_config: Config | None = None):
        """previous_config: the configuration the cluster ran before its last
        change (any member's), for a balancer that starts or joins while that
        change's previous table generation is in force: its VIPs give the
        previous tables, its cluster section the former members
        (docs/state-exchange.md)."""
        self.config = config
        self.previous_config = previous_config
        b = config.balancer
        if b.workers != 1:
            raise ConfigError("balancer.workers: only 1 worker per balancer process is supported "
                              "in this version (see docs/architecture.md, process model)")
        self._closers: list = []
        self.eal = eal_mod.Eal.current()
        try:
            self._start(config)
        except BaseException:
            self.close()
            raise

    def _start(self, config: Config) -> None:
        b = config.balancer
        if self.eal is None:
            pci = bool(PCI_RE.match(b.data.device))
            args = eal_mod.eal_args(core=b.dpdk.cores[0] if b.dpdk.cores else None,
                                    hugepages=b.dpdk.hugepages, memory_mb=b.dpdk.memory_mb,
                                    pci=pci, extra=b.dpdk.eal_args)
            self.eal = eal_mod.Eal(args)
            self._closers.append(self.eal.close)
        self.port = Port(b.data.device, rx_desc=b.data.rx_desc, tx_desc=b.data.tx_desc,
                         mbufs=b.data.mbufs, promiscuous=b.data.promiscuous)
        self._closers.append(self.port.close)
        self.exception_port = None
        if b.data.exception.policy == "tap":
            name = b.data.exception.tap_name
            self.exception_port = Port(f"net_tap_{name},iface={name}", mbufs=2047)
            self._closers.append(self.exception_port.close)
        t = b.timeouts
        self.cache = FlowCache(b.flow_cache.capacity,
                               Timeouts(*(int(x) for x in t.as_ms())))
        self._closers.append(self.cache.close)
        self.neigh = NeighborTable()
        self._closers.append(self.neigh.close)
        for n in b.data.neighbors:
            self.neigh.set_static(n.address, n.mac)
        self.worker = Worker(self.port, self.cache, self.neigh, exception_port=self.exception_port,
                             max_held=b.max_held)
        self._closers.append(self.worker.close)
        self.generation = 1
        self.registry = BackendRegistry()
        # The cluster's previous VIPs and backends, under this balancer's own settings.
        first = config.model_copy(update={"vips": self.previous_config.vips}) \
            if self.previous_config else config
        self.worker.set_dataplane(Dataplane(first, self.generation, self.registry))
        self.verdicts_by_reason: dict[str, int] = {}
        self._changed_at: float | None = None
        self.cluster = None
        if config.cluster is not None:
            from pylb.cluster import ClusterNode
            self.cluster = ClusterNode(self)
        self._last_age = time.monotonic()
        log.info("balancer started", name=b.name, device=b.data.device, mac=self.port.mac,
                 hugepages=self.eal.hugepages, vips=len(config.vips),
                 backends=len(self.dataplane.backends))
        if self.previous_config is not None:
            self.reconfigure(config)
        self.solicit_next_hops()

    @property
    def dataplane(self) -> Dataplane:
        return self.worker.dataplane

    def next_hops(self) -> set:
        """Addresses whose MAC the balancer needs: gateways, or on-link backends
        and peer balancers."""
        data = self.config.balancer.data
        mine = {data.address_v4, data.address_v6}
        targets = [ref.address for ref in self.dataplane.backends]
        if self.config.cluster is not None:
            targets += [m.address for m in self.config.cluster.balancers if m.address not in mine]
        hops = set()
        for address in targets:
            gw = data.gateway_v4 if address.version == 4 else data.gateway_v6
            hops.add(gw or address)
        return hops

    def solicit_next_hops(self) -> list:
        """Asks for every next hop without a known MAC; returns those still unknown."""
        unknown = [h for h in sorted(self.next_hops(), key=str) if self.neigh.lookup(h) is None]
        for hop in unknown:
            self.worker.solicit(hop)
        return unknown

    def reconfigure(self, config: Config) -> None:
        """Swaps in a new configuration; the old tables stay as the previous
        generation so flows that predate the change keep their backend."""
        if config.balancer.data != self.config.balancer.data:
            raise ConfigError("balancer.data cannot change while running")
        self.generation += 1
        dp = Dataplane(config, self.generation, self.registry, previous=self.dataplane)
        self.worker.set_dataplane(dp)
        self.config = config
        if dp.changed:
            self._changed_at = time.monotonic()
        if self.cluster is not None:
            self.cluster.apply_config(config)
        log.info("configuration swapped", generation=self.generation)

    def retire_previous(self) -> None:
        """Drops the previous table generation (docs/state-exchange.md): by now
        every live flow of a moved bucket has state at its owner."""
        self.generation += 1
        dp = Dataplane(self.config, self.generation, self.registry, current=self.dataplane.tables)
        self.worker.set_dataplane(dp)
        self._changed_at = None
        if self.cluster is not None:
            self.cluster.apply_config(self.config)
        log.info("previous table generation retired", generation=self.generation)

    def _retire_after(self) -> float:
        c = self.config.cluster
        if c is not None and c.previous_retire_after is not None:
            return c.previous_retire_after
        return self.config.balancer.timeouts.tcp

    def decide(self, punt: Punt) -> Verdict | None:
        """The miss path. In a cluster with state exchange: the owner decides
        (pylb/cluster.py). With the exchange off: the local cache only, as
        Maglev and Katran do, so a miss takes the current table. A standalone
        balancer is its own owner: a flow older than the last change keeps the
        previous table's backend (rule 4); a UDP miss is a new flow when the
        cache tracks every flow."""
        if self.cluster is not None:
            if self.config.cluster.state_exchange:
                return self.cluster.decide(punt)
            if punt.reason in (PuntReason.MOVED, PuntReason.UDP_MOVED):
                return Verdict(punt.slot, Action.FORWARD, punt.current, cache=True)
        if punt.slot is None:
            return None
        track_all = self.config.balancer.flow_cache.track == "all"
        if punt.reason == PuntReason.MOVED:
            return Verdict(punt.slot, Action.FORWARD, punt.previous, cache=True)
        if punt.reason == PuntReason.UDP_MOVED:
            backend = punt.current if track_all else punt.previous
            return Verdict(punt.slot, Action.FORWARD, backend, cache=True)
        return Verdict(punt.slot, Action.DROP)

    def step(self, max_bursts: int = 256, max_idle_us: int = 0) -> int:
        """One round: poll the fast path, decide the punts, apply. Returns punts."""
        punts = self.worker.poll(max_bursts, max_idle_us)
        verdicts = []
        for p in punts:
            name = p.reason.name.lower()
            self.verdicts_by_reason[name] = self.verdicts_by_reason.get(name, 0) + 1
            verdict = self.decide(p)
            if verdict is not None:
                verdicts.append(verdict)
        self.worker.apply(verdicts)
        if self.cluster is not None:
            self.cluster.on_peer_frames(self.worker.peer_recv())
            self.cluster.tick()
        now = time.monotonic()
        if self._changed_at is not None and now - self._changed_at >= self._retire_after():
            self.retire_previous()
        if now - self._last_age >= AGE_INTERVAL_S:
            self._last_age = now
            self.worker.age_cache()
        return len(punts)

    def run(self, should_stop) -> None:
        """Runs until should_stop() is true; idles in the shim, not in Python."""
        last_solicit = time.monotonic()
        while not should_stop():
            self.step(max_bursts=1024, max_idle_us=20_000)
            if time.monotonic() - last_solicit > 5.0:
                last_solicit = time.monotonic()
                self.solicit_next_hops()

    def stats(self) -> Stats:
        return self.worker.stats()

    def backend_counts(self, active_only: bool = False) -> list[BackendCount]:
        """Packets and bytes per (VIP, backend) since start (ids are stable, so
        counts survive reconfiguration)."""
        counts = self.worker.backend_counts()
        return [BackendCount(ref.vip, ref.name, str(ref.address), *counts[ref.id])
                for ref in self.dataplane.backends if ref.active or not active_only]

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:  # keep closing the rest; say what failed
                log.error("close failed", what=getattr(closer, "__qualname__", "?"), error=str(exc))

    def __enter__(self) -> "Balancer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
