"""One balancer: the EAL, its data port, flow cache, neighbour table, worker and
dataplane, and the control loop that decides what the fast path hands up."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import re
import time
from dataclasses import dataclass

import structlog

from pylb import eal as eal_mod
from pylb import config as config_mod
from pylb import history as history_mod
from pylb import lanes as lanes_mod
from pylb import logs
from pylb.config import Config
from pylb.dataplane import BackendRegistry, Dataplane
from pylb.errors import ConfigError, PylbError
from pylb.flow_cache import COUNTED_BACKENDS, FlowCache, Timeouts
from pylb.flow_id import flow_label
from pylb.neigh import NeighborTable
from pylb.port import Port
from pylb.stats import Stats
from pylb.worker import Action, Punt, PuntReason, Verdict, Worker

log = structlog.get_logger("pylb.balancer")
PCI_RE = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
AGE_INTERVAL_S = 1.0
RETIRE_CHECK_S = 1.0      # how often stateful buckets are looked at for retirement
SNAPSHOT_INTERVAL_S = 1.0
NEIGHBOURS_SHARE_S = 0.1  # how often worker 0 tells the others what ARP/NDP taught it


class UnknownBackend(ConfigError):
    """An API request named a VIP or backend the running configuration lacks."""


@dataclass(frozen=True)
class BackendCount:
    vip: str
    backend: str
    address: str
    packets: int
    bytes: int
    new_flows: int
    active_flows: int | None   # flows cached for it now; None: id past the counted ones


class Balancer:
    """Start with `with Balancer(config) as lb:`; close() stops the worker, frees
    every held mbuf, closes the ports and (if it started it) the EAL."""

    def __init__(self, config: Config,
                 previous_config: Config | list[Config] | tuple[Config, ...] | None = None,
                 lane: "lanes_mod.LaneRole | None" = None):
        """previous_config: not needed in a cluster, whose members tell a
        balancer that starts the tables in force (pylb/history.py). Given, it
        overrides that, and serves a standalone balancer: the configuration
        the cluster ran before its last change (any member's); or, when
        several backend changes are in force, every configuration since the
        one before the oldest, oldest first. Their VIPs give the history of
        the tables (the stateful buckets), the last one's cluster section the
        former members (docs/state-exchange.md).
        lane: for worker processes 1.. of a balancer with several
        (pylb/lanes.py starts them); worker 0 finds its own role."""
        self.config = config
        history = [previous_config] if isinstance(previous_config, Config) \
            else list(previous_config or ())
        self.previous_configs = history
        self.previous_config = history[-1] if history else None
        self._closers: list = []
        # The operator's configuration; self.config is what runs: the same with
        # failing (health) and drained (API) backends at weight 0.
        self.configured = config
        self.config_file: str | None = None       # what reload() reads again
        self.health_down: set[tuple[str, str]] = set()
        self.drained: set[tuple[str, str]] = set()
        self.on_reconfigure: list = []            # called with the new configured Config
        self.reloads: collections.Counter = collections.Counter()
        self.last_reload_error: str | None = None
        self.started_at = time.time()
        # Other threads (admin API, health checks, signal handlers) never touch
        # the worker: they queue callables that run() executes between steps,
        # and read the snapshot run() publishes.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.latest_snapshot: dict | None = None
        self.snapshot_extras: list = []           # callables adding to each snapshot
        self._busy_mark = (time.monotonic(), time.thread_time())
        self._bucket_counts: tuple[int, dict] = (-1, {})
        self.drain_state: dict | None = None      # a balancer drain in progress (drain_balancer)
        self.eal = eal_mod.Eal.current()
        self.role = lane if lane is not None else _lane_role(config, self.eal)
        self.lane = self.role.index if self.role else 0
        self.lane_count = self.role.count if self.role else 1
        self.lanes: lanes_mod.LaneSet | None = None     # worker 0's other workers
        self._divergent_asked: int | None = None         # a worker asked by worker 0
        try:
            self._start(config)
            if self.role is not None and self.role.primary:
                self._start_lanes()
        except BaseException:
            self.close()
            raise

    def _start(self, config: Config) -> None:
        b = config.balancer
        role = self.role
        if self.eal is None:
            pci = bool(PCI_RE.match(b.data.device))
            core = role.core if role else (b.dpdk.cores[0] if b.dpdk.cores else None)
            args = eal_mod.eal_args(core=core, hugepages=b.dpdk.hugepages,
                                    memory_mb=b.dpdk.memory_mb, pci=pci, extra=b.dpdk.eal_args,
                                    file_prefix=role.file_prefix if role else None,
                                    secondary=bool(role and not role.primary))
            self.eal = eal_mod.Eal(args)
            self._closers.append(self.eal.close)
        if role is not None and not role.primary:
            self.port = Port.attach(b.data.device)
        else:
            self.port = Port(b.data.device, rx_queues=self.lane_count,
                             tx_queues=self.lane_count, rx_desc=b.data.rx_desc,
                             tx_desc=b.data.tx_desc, mbufs=b.data.mbufs,
                             promiscuous=b.data.promiscuous)
        port_closer = len(self._closers)
        self._closers.append(self.port.close)
        self.exception_port = None
        if b.data.exception.policy == "tap" and self.lane == 0:
            # The kernel's interface takes the data port's MAC, as a KNI does:
            # it accepts the frames the wire addressed to the balancer, and
            # what it sends names the balancer's MAC.
            name = b.data.exception.tap_name
            self.exception_port = Port(f"net_tap_{name},iface={name},mac={self.port.mac}",
                                       mbufs=2047)
            # Closed after the data port, whose TX may still hold mbufs of
            # the TAP's pool (kernel to wire) until it stops.
            self._closers.insert(port_closer, self.exception_port.close)
        t = b.timeouts
        timeouts = Timeouts(*(int(x) for x in t.as_ms()))
        if role is None:
            self.cache = FlowCache(b.flow_cache.capacity, timeouts)
        elif role.primary:
            self.cache = FlowCache.create_shared(role.name, b.flow_cache.capacity, timeouts)
        else:
            self.cache = FlowCache.attach_shared(role.name, b.flow_cache.capacity)
        self._closers.append(self.cache.close)
        self.neigh = NeighborTable()
        self._closers.append(self.neigh.close)
        for n in b.data.neighbors:
            self.neigh.set_static(n.address, n.mac)
        if role is not None and role.primary:
            lanes_mod.create_rings(role.name, role.count)
            # Freed after every worker, this one's too (closers run backwards).
            self._closers.append(lambda: lanes_mod.free_rings(role.name, role.count))
        self.worker = Worker(self.port, self.cache, self.neigh, exception_port=self.exception_port,
                             max_held=b.max_held, rx_queue=self.lane, tx_queue=self.lane,
                             lane=self.lane, lanes=self.lane_count,
                             lanes_name=role.name if role else None)
        self._closers.append(self.worker.close)
        self.generation = 1
        self.registry = BackendRegistry()
        # The cluster's previous VIPs and backends, under this balancer's own
        # settings, replayed in order so that every change in force moves its buckets.
        generations = [config.model_copy(update={"vips": c.vips})
                       for c in self.previous_configs] or [config]
        # Without them, a member of a cluster learns the tables in force from
        # the others; until then every bucket is stateful.
        self.history_unknown = not self.previous_configs and history_mod.wanted(config)
        self.worker.set_dataplane(Dataplane(generations[0], self.generation, self.registry,
                                            unknown_history=self.history_unknown))
        for older in generations[1:]:
            self.generation += 1
            self.worker.set_dataplane(Dataplane(older, self.generation, self.registry,
                                                previous=self.dataplane))
        self.verdicts_by_reason: dict[str, int] = {}
        self._last_retire = time.monotonic()
        self.cluster = None
        if config.cluster is not None:
            from pylb.cluster import ClusterNode
            self.cluster = ClusterNode(self)
        self._last_age = time.monotonic()
        info = self.port.info()
        if b.data.mtu > info["max_mtu"] and not b.data.device.startswith("ring:"):
            # af_packet, for one, sends somewhat more than it reports but drops
            # larger frames without a counter of ours seeing it (docs/lab.md).
            log.warning("balancer.data.mtu exceeds what the port's driver reports",
                        mtu=b.data.mtu, driver=info["driver"], driver_max_mtu=info["max_mtu"])
        log.info("balancer started", name=b.name, device=b.data.device, mac=self.port.mac,
                 hugepages=self.eal.hugepages, vips=len(config.vips),
                 backends=len(self.dataplane.backends),
                 **({"worker": self.lane, "workers": self.lane_count} if role else {}))
        if self.previous_config is not None:
            self.reconfigure(config)
        self.solicit_next_hops()

    @property
    def dataplane(self) -> Dataplane:
        return self.worker.dataplane

    # ------------------------------------------------------------ worker processes

    def _start_lanes(self) -> None:
        """Worker 0 starts the others (pylb/lanes.py), from the configurations
        it started from: they replay them as it did."""
        r = self.role
        self.lanes = lanes_mod.LaneSet([dataclasses.replace(r, index=i, core=c)
                                        for i, c in enumerate(_worker_cores(self.config, self.eal))
                                        if i > 0])
        # Stopped before this worker and the rings go (closers run backwards).
        self._closers.append(self._stop_lanes)
        self.lanes.start({"config": self.configured, "previous": self.previous_configs,
                          "digest": lanes_mod.backends_digest(self.dataplane),
                          "log": logs.current})
        self._share_neighbours()

    def _stop_lanes(self) -> None:
        if self.lanes is not None:
            self.lanes.stop()

    def stop_workers(self) -> None:
        """Stops workers 1.. (they send their last counters), then takes what
        they handed to this one: the counts are final (the exit summary)."""
        if self.lanes is not None and self.lanes.procs:
            self.lanes.stop()
            self.step(max_bursts=64, max_idle_us=1_000)

    def punts(self) -> dict[str, int]:
        """Punts by reason, every worker's (as last reported)."""
        total = collections.Counter(self.verdicts_by_reason)
        if self.lanes is not None:
            for report in self.lanes.reports.values():
                total.update(report["punts"])
        return dict(total)

    def per_worker(self) -> list[tuple[int, int | None, Stats]]:
        """(worker, core, counters) of each worker (as last reported)."""
        core = (self.config.balancer.dpdk.cores or [None])[0]
        out = [(0, self.role.core if self.role else core, self.worker.stats())]
        if self.lanes is not None:
            for role in self.lanes.roles:
                report = self.lanes.reports.get(role.index)
                if report is not None:
                    out.append((role.index, role.core, Stats(**report["stats"])))
        return out

    def _to_lanes(self, op: tuple) -> None:
        """Worker 0 tells the others what changed its tables, in order."""
        # None while worker 0 starts: the others replay its start themselves.
        if self.lanes is not None:
            self.lanes.broadcast(op)

    def _share_neighbours(self) -> None:
        if self.lanes is None:
            return
        macs = {}
        for hop in self.next_hops():
            mac = self.neigh.lookup(hop)
            if mac is not None:
                macs[str(hop)] = mac
        self.lanes.share_neighbours(macs)

    def lanes_busy(self, since: float = 0.0) -> bool:
        """Whether any worker process of this balancer may still have work:
        frames waiting, packets held, requests pending, by what they answered
        to a question asked at `since` (monotonic) or later; True until such
        answers came (tests wait for all of it to be done)."""
        if self.lanes is None:
            return False
        self.lanes.poll()
        answers = self.lanes.reports_since(since)
        if answers is None:
            return True
        return any(r["backlog"] or r["stats"]["held_now"]
                   or (r.get("cluster") or {}).get("pending_requests")
                   or (r.get("cluster") or {}).get("undecided") for r in answers)

    def lane_report(self) -> dict:
        """What a worker process tells worker 0 every second."""
        c = self.cluster
        report = {"pid": os.getpid(), "stats": dataclasses.asdict(self.stats()),
                  "backlog": self.worker.backlog(),
                  "punts": dict(self.verdicts_by_reason),
                  "backend_counts": self.worker.backend_counts(),
                  "generation": self.generation, "busy_ratio": self._busy_ratio(),
                  "stateful_buckets": self.stateful_buckets()}
        if c is not None:
            report["cluster"] = {"counters": dict(c.counters),
                                 "peer": dataclasses.asdict(c.peer_stats),
                                 "state_entries": c.state_entries(),
                                 "pending_requests": len(c.pending),
                                 "undecided": len(c.undecided)}
            if self._divergent_asked is not None:
                report["divergent"] = (self._divergent_asked, c.busy(),
                                       {v: sorted(b) for v, b in c._divergent_buckets().items()})
                self._divergent_asked = None
        return report

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
        generation so flows that predate the change keep their backend.
        Backends failing their health checks or drained through the admin API
        stay at weight 0 in it."""
        if config.balancer.data != self.config.balancer.data:
            raise ConfigError("balancer.data cannot change while running")
        backends = {(v.name, b.name) for v in config.vips for b in v.backends}
        checked = {(v.name, b.name) for v in config.vips if v.health for b in v.backends}
        self.health_down &= checked      # no check any more: nothing says it fails
        self.drained &= backends
        self._swap(self._effective(config))
        self.configured = config
        for hook in self.on_reconfigure:
            hook(config)

    def _effective(self, config: Config) -> Config:
        """The configuration with failing and drained backends at weight 0.
        When every serving backend of a VIP fails its checks, the VIP keeps them
        all (fails open): a check that fails everywhere more likely says the
        checks are wrong than that every backend is, and a VIP with no backend
        drops every new flow."""
        if self.drain_state is not None:
            config = self._draining(config)
        if not self.health_down and not self.drained:
            return config
        vips = []
        for vip in config.vips:
            serving = {b.name for b in vip.backends
                       if b.weight > 0 and (vip.name, b.name) not in self.drained}
            down = {n for n in serving if (vip.name, n) in self.health_down}
            if down and down == serving:
                log.warning("every backend of the VIP fails its checks: keeping them (fail open)",
                            vip=vip.name)
                down = set()
            off = down | {b.name for b in vip.backends if (vip.name, b.name) in self.drained}
            if any(b.weight and b.name in off for b in vip.backends):
                vip = vip.model_copy(update={"backends": [
                    b.model_copy(update={"weight": 0}) if b.name in off else b
                    for b in vip.backends]})
            vips.append(vip)
        return config.model_copy(update={"vips": vips})

    def _draining(self, config: Config) -> Config:
        """A draining balancer's view: it answers ARP/ND for no VIP (a router
        that finds it that way moves on), and it has left its cluster's
        ownership, so its state goes to the buckets' new holders (rule 5)
        while it still answers whoever asks it as the owner it was."""
        vips = [v.model_copy(update={"answer_arp": False}) if v.answer_arp else v
                for v in config.vips]
        update: dict = {"vips": vips}
        c = config.cluster
        if c is not None and len(c.balancers) > 1:
            update["cluster"] = c.model_copy(update={"balancers": [
                m for m in c.balancers if m.name != config.balancer.name]})
        return config.model_copy(update=update)

    def drain_balancer(self, undo: bool = False) -> dict:
        """Starts (or undoes) a drain of this balancer: the router is told to
        stop sending (balancer.drain.withdraw, and no ARP/ND answers for VIPs),
        ownership is handed off, forwarding goes on; run() ends once no VIP
        packet came for drain.quiet_period after the handoff, or at
        drain.timeout. Raises ConfigError when there is nothing to do."""
        d = self.configured.balancer.drain
        if undo:
            if self.drain_state is None:
                raise ConfigError("this balancer is not draining")
            self.drain_state = None
            self._reapply_always()
            self._run_hook(d.announce, "announce")
            log.info("balancer drain undone")
            return {"balancer": self.configured.balancer.name, "state": "serving"}
        if self.drain_state is not None:
            return dict(self.drain_state)
        now = time.monotonic()
        self.drain_state = {"balancer": self.configured.balancer.name, "state": "draining",
                            "started_at": time.time(), "detail": "handing off ownership"}
        self._drain_clock = {"started": now, "last_traffic": now,
                             "traffic": self._vip_packets(self.stats())}
        self._reapply_always()
        self._run_hook(d.withdraw, "withdraw")
        log.info("balancer draining", quiet_period=d.quiet_period, timeout=d.timeout)
        return dict(self.drain_state)

    def _reapply_always(self) -> None:
        self._swap(self._effective(self.configured))

    @staticmethod
    def _vip_packets(s: Stats) -> int:
        """Packets of VIP traffic the router sent here (not peers' messages)."""
        return s.fwd_cache_hit + s.fwd_new + s.fwd_table + s.fwd_fragment + s.held

    def _run_hook(self, argv: list[str], what: str) -> None:
        """Runs the operator's command without waiting: the loop must go on
        forwarding. Its exit is logged by a thread of its own."""
        if not argv:
            return
        import threading
        threading.Thread(target=self._hook, args=(argv, what, self.hook_cpus()),
                         daemon=True).start()

    def hook_cpus(self) -> set[int] | None:
        """Where an operator's command runs: the CPUs the process had before
        DPDK pinned it, less this balancer's data-plane core. A child inherits
        the pinning of the thread that starts it, and a hook on the data-plane
        core (a Python start-up: a second or more on a busy machine) delays
        the poll loop just when the router moves its flows: new flows' pushes
        and answers to owners came late, and owners decided without them (the
        lab's reset at step e). None: leave the affinity as it is."""
        import os
        before = getattr(self.eal, "cpus_before", None)
        if not before:
            return None
        pinned = os.sched_getaffinity(0)      # the control loop's thread: the lcore
        return set(before - pinned) or set(before)

    @staticmethod
    def _hook(argv: list[str], what: str, cpus: set[int] | None) -> None:
        """Runs in a thread of its own: the affinity set here (Linux: per
        thread) is the child's."""
        import os
        import subprocess
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as err:
                log.warning(f"drain {what} command: CPUs not set", cpus=sorted(cpus),
                            error=str(err))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except OSError as err:
            log.error(f"drain {what} command failed to start", argv=argv, error=str(err))
            return
        out, _ = proc.communicate()
        (log.info if proc.returncode == 0 else log.error)(
            f"drain {what} command ended", argv=argv, status=proc.returncode,
            output=out.decode(errors="replace")[-2000:])

    def _drain_tick(self) -> None:
        """Whether a drain is over: the handoff period has passed, no request
        to an owner is pending, and no VIP packet came for quiet_period (the
        router sends this balancer's flows elsewhere: they have moved or
        ended); or the drain timed out."""
        st = self.drain_state
        if st is None or st["state"] == "done":
            return
        d = self.configured.balancer.drain
        now = time.monotonic()
        clock = self._drain_clock
        traffic = self._vip_packets(self.stats())
        if traffic != clock["traffic"]:
            clock["traffic"], clock["last_traffic"] = traffic, now
        handoff = self.configured.cluster.handoff_period if self.cluster is not None else 0.0
        pending = 0
        if self.cluster is not None:
            # Every worker process's requests and undecided flows (their last reports).
            totals = self._cluster_totals()
            pending = totals["pending_requests"] + totals["undecided"]
        quiet = now - clock["last_traffic"]
        if now - clock["started"] >= d.timeout:
            st.update(state="done", detail=f"timed out after {d.timeout} s; VIP packets still "
                      f"came {quiet:.1f} s ago")
            log.warning("balancer drain timed out", quiet_s=round(quiet, 1))
        elif now - clock["started"] >= handoff and pending == 0 and quiet >= d.quiet_period:
            st.update(state="done", detail=f"no VIP packet for {quiet:.1f} s, ownership handed off")
            log.info("balancer drained", quiet_s=round(quiet, 1))
        else:
            st["detail"] = (f"last VIP packet {quiet:.1f} s ago (waiting for {d.quiet_period} s "
                            f"of quiet), {pending} owner requests pending")

    def _reapply(self) -> bool:
        """Swaps in the effective configuration if health or drains changed it."""
        effective = self._effective(self.configured)
        if effective.vips == self.config.vips:
            return False
        self._swap(effective)
        return True

    def _swap(self, config: Config) -> None:
        self.generation += 1
        dp = Dataplane(config, self.generation, self.registry, previous=self.dataplane)
        self.worker.set_dataplane(dp)
        self.config = config
        self._to_lanes(("swap", config, lanes_mod.backends_digest(dp)))
        if self.cluster is not None:
            self.cluster.apply_config(config)
            if dp.newly_moved and config.cluster.state_exchange:
                self.cluster.tables_changed()
        # A backend or peer added by this change is a next hop nobody has
        # asked for yet: ask now, not at the next periodic round, or its
        # first packets are dropped as no_neighbor (seen in the lab).
        self.solicit_next_hops()
        log.info("configuration swapped", generation=self.generation)

    # ------------------------------------------------------------ operations

    def _backend(self, vip: str, backend: str) -> tuple[str, str]:
        try:
            v = self.configured.find_vip(vip)
        except ConfigError as err:
            raise UnknownBackend(str(err)) from None
        if not any(b.name == backend for b in v.backends):
            raise UnknownBackend(f"VIP {v.name} has no backend named {backend!r}; backends: "
                                 + ", ".join(b.name for b in v.backends))
        return v.name, backend

    def set_health(self, vip: str, backend: str, up: bool) -> bool:
        """A health-check verdict (pylb/health.py): a failing backend goes to
        weight 0, so new flows avoid it while cached flows keep it; it returns
        when healthy. Returns whether the tables changed."""
        try:
            key = self._backend(vip, backend)
        except UnknownBackend:
            return False    # removed by a reload while its check was running
        if up == (key not in self.health_down):
            return False
        (self.health_down.discard if up else self.health_down.add)(key)
        changed = self._reapply()
        log.info("backend is up" if up else "backend is down", vip=vip, backend=backend,
                 tables_changed=changed)
        return changed

    def drain_backend(self, vip: str, backend: str, undo: bool = False) -> dict:
        """Weight 0 for a backend until undone (or a restart): no new flows,
        established ones go on. Raises UnknownBackend."""
        key = self._backend(vip, backend)
        (self.drained.discard if undo else self.drained.add)(key)
        changed = self._reapply()
        log.info("backend drain undone" if undo else "backend drained", vip=key[0],
                 backend=backend, tables_changed=changed)
        return {"vip": key[0], "backend": backend, "drained": not undo,
                "tables_changed": changed, "generation": self.generation}

    def reload(self, config: Config | None = None) -> dict:
        """Reads the configuration file again (or takes `config`) and swaps it
        in. A configuration that is invalid, or changes what only a restart can,
        raises ConfigError and changes nothing."""
        try:
            if config is None:
                if self.config_file is None:
                    raise ConfigError("this balancer was not started from a file: nothing "
                                      "to reload")
                config = config_mod.load(self.config_file)
            errors = config_mod.live_change_errors(self.configured, config)
            if errors:
                raise ConfigError(f"{self.config_file or 'configuration'}: cannot be applied to "
                                  "a running balancer\n  " + "\n  ".join(errors))
            changes = config_mod.describe_changes(self.configured, config)
            if config != self.configured:
                self.reconfigure(config)
        except ConfigError as err:
            self.reloads["rejected"] += 1
            self.last_reload_error = str(err)
            log.error("configuration rejected", error=str(err), generation=self.generation)
            raise ConfigError(f"{err}\nrejected whole: the running configuration (generation "
                              f"{self.generation}) stays") from None
        self.reloads["ok"] += 1
        self.last_reload_error = None
        log.info("configuration reloaded", generation=self.generation, **changes)
        return {"generation": self.generation, "changes": changes}

    def drain_done(self) -> bool:
        """True once a balancer drain has finished: run() may stop."""
        return bool(self.drain_state and self.drain_state["state"] == "done")

    def submit(self, command) -> concurrent.futures.Future:
        """Queues command(balancer) for the control loop; any thread may call
        this (and signal handlers). The future gets its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((command, future))
        return future

    def run_commands(self) -> int:
        """Runs the queued commands; the control loop calls this between steps."""
        done = 0
        while True:
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                break
            done += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(command(self))
            except Exception as exc:    # the caller gets it; the loop goes on
                future.set_exception(exc)
        if done:
            self.publish_snapshot()
        return done

    def publish_snapshot(self) -> dict:
        """What other threads may read: plain data, replaced whole."""
        self.latest_snapshot = snap = self.snapshot()
        return snap

    def snapshot(self) -> dict:
        stats = self.stats()
        counts = self._backend_counts()
        active = self.cache.active_flows(len(self.dataplane.backends))
        dp = self.dataplane
        configured = {(v.name, b.name): b.weight for v in self.configured.vips for b in v.backends}
        buckets = self._buckets_by_backend()
        backends = []
        for ref in dp.backends:
            key = (ref.vip, ref.name)
            health = "down" if key in self.health_down else "up"
            backends.append({
                "vip": ref.vip, "backend": ref.name, "address": str(ref.address), "id": ref.id,
                "active": ref.active, "weight": configured.get(key, 0),
                "effective_weight": ref.weight,
                "health": health if ref.active else "removed", "drained": key in self.drained,
                "buckets": buckets.get(ref.id, 0),
                "packets": counts[ref.id][0], "bytes": counts[ref.id][1],
                "new_flows": counts[ref.id][2],
                "active_flows": _counted(active.per_backend, ref.id)})
        vips = [{"name": v.name, "address": str(v.address), "protocol": v.protocol,
                 "port": v.port or "all", "encap": v.encap.type, "table_size": v.table_size,
                 "moved_buckets_in_force": v.name in dp.history,
                 "stateful_buckets": len(dp.history[v.name].stateful) if v.name in dp.history
                 else 0,
                 "health_check": v.health.type if v.health else None}
                for v in self.configured.vips]
        busy = self._busy_ratio()
        b = self.configured.balancer
        snap = {
            "balancer": {"name": b.name, "generation": self.generation,
                         "started_at": self.started_at, "config_file": self.config_file,
                         "reloads": dict(self.reloads), "last_reload_error": self.last_reload_error,
                         "device": b.data.device, "mac": self.port.mac},
            "taken_at": time.time(),
            "vips": vips, "backends": backends,
            "workers": self._workers(busy),
            "stats": dataclasses.asdict(stats), "drops": stats.drops(),
            "punts": self.punts(),
            # From the cache's counters, not a scan of it (docs/flow-cache.md).
            "active_flows": active.total,
            "cluster": None,
            "drain": dict(self.drain_state) if self.drain_state else None,
        }
        if self.cluster is not None:
            c = self.cluster
            snap["cluster"] = {
                "members": {n: str(a) for n, a in c.members.items()}, "me": c.name,
                "state_exchange": self.configured.cluster.state_exchange,
                "member_generation": c.member_gen,
                "table_sizes": sorted({v.table_size for v in self.configured.vips}),
                **self._cluster_totals()}
        for extra in self.snapshot_extras:
            extra(snap)
        return snap

    def _busy_ratio(self) -> float:
        mono, cpu = time.monotonic(), time.thread_time()
        wall = mono - self._busy_mark[0]
        busy = min(1.0, (cpu - self._busy_mark[1]) / wall) if wall > 0 else 0.0
        self._busy_mark = (mono, cpu)
        return busy

    def _workers(self, busy: float) -> list[dict]:
        mine = self.worker.stats()
        cores = _worker_cores(self.config, self.eal) if self.role else \
            [(self.config.balancer.dpdk.cores or [None])[0]]
        out = [{"id": 0, "core": cores[0], "pid": os.getpid(), "busy_ratio": busy,
                "polls": mine.polls, "idle_sleeps": mine.idle_sleeps}]
        if self.lanes is not None:
            now = time.monotonic()
            for role in self.lanes.roles:
                r = self.lanes.reports.get(role.index)
                at = self.lanes.report_at.get(role.index)
                out.append({"id": role.index, "core": role.core,
                            "pid": self.lanes.procs[role.index].pid
                            if role.index in self.lanes.procs else None,
                            "busy_ratio": r["busy_ratio"] if r else None,
                            "polls": r["stats"]["polls"] if r else None,
                            "idle_sleeps": r["stats"]["idle_sleeps"] if r else None,
                            "report_age_s": round(now - at, 3) if at else None})
        return out

    def _cluster_totals(self) -> dict:
        """The cluster counters of every worker process, summed."""
        c = self.cluster
        counters = collections.Counter(c.counters)
        peer_stats = collections.Counter(dataclasses.asdict(c.peer_stats))
        entries, pending, undecided = c.state_entries(), len(c.pending), len(c.undecided)
        if self.lanes is not None:
            for report in self.lanes.reports.values():
                theirs = report.get("cluster")
                if theirs:
                    counters.update(theirs["counters"])
                    peer_stats.update(theirs["peer"])
                    entries += theirs["state_entries"]
                    pending += theirs["pending_requests"]
                    undecided += theirs["undecided"]
        return {"state_entries": entries, "pending_requests": pending, "undecided": undecided,
                "counters": dict(counters), "peer": dict(peer_stats)}

    def _buckets_by_backend(self) -> dict[int, int]:
        """Buckets of the current tables per backend id, counted once per generation."""
        if self._bucket_counts[0] == self.generation:
            return self._bucket_counts[1]
        dp = self.dataplane
        out: dict[int, int] = {}
        ids = {(r.vip, r.name): r.id for r in dp.backends}
        for vip, tables in dp.tables.items():
            for index, n in collections.Counter(tables.table).items():
                if index < len(tables.names):
                    out[ids[(vip, tables.names[index])]] = n
        self._bucket_counts = (self.generation, out)
        return out

    def lookup_flow(self, key) -> dict:
        """Where a flow stands here: VIP, bucket, the tables' backends, this
        balancer's cached entry, the owner's store, owner and backup."""
        from pylb.flow_cache import now_ms
        c = self.dataplane.classify(key)
        out = {"flow": str(key), "flow_id": flow_label(c.flow_id), "vip": c.vip}
        if c.vip is None:
            return out
        ref = lambda r: {"backend": r.name, "address": str(r.address)} if r else None  # noqa: E731
        kb = key.to_bytes()
        hit = self.cache.peek(kb, c.flow_id, now_ms())
        cached = None
        if hit is not None:
            cached = {**ref(self.dataplane.backends[hit[0]]), "idle_ms": hit[1]}
        size = self.configured.find_vip(c.vip).table_size
        if self.cluster is not None:
            holders = self.cluster.holders(size, c.bucket)
            rec = self.cluster.store.get(kb)
            stored = {"address": str(rec.backend), "closing": rec.closing} if rec else None
        else:
            holders, stored = [self.configured.balancer.name], None
        out.update({
            "bucket": c.bucket, "moved": c.moved, "table_backend": ref(c.current),
            "previous_backend": ref(c.previous) if c.stateful else None,
            "cached_here": cached, "stored_here": stored, "balancer": self.configured.balancer.name,
            "owner": holders[0], "backup": holders[1] if len(holders) > 1 else None})
        return out

    def retire_previous(self) -> int:
        """Retires every stateful bucket that may be retired now, however
        recent its change (for tests and operators; the balancer does this by
        itself previous_retire_after after a change). Returns how many. With
        several worker processes, each is asked first (and waited for)."""
        if self.lanes is not None and self.cluster is not None \
                and self.config.cluster.state_exchange:
            self.lanes.ask_divergent()
        return self._retire(time.monotonic(), due_after=0.0)

    def _retire(self, now: float, due_after: float) -> int:
        """Stops treating as stateful the buckets that moved due_after seconds
        ago or more and that nobody needs state for any longer
        (docs/state-exchange.md, "Retirement"): in a cluster with state
        exchange, those whose owner holds no flow on another backend than the
        current one; otherwise all of them. Returns how many."""
        dp = self.dataplane
        due = {vip: [b for b in h.stateful if now - h.moved_at[b] >= due_after]
               for vip, h in dp.history.items()}
        due = {vip: buckets for vip, buckets in due.items() if buckets}
        if not due:
            return 0
        if self.cluster is not None and self.config.cluster.state_exchange:
            if self.lanes is not None:
                due = self._lanes_allow(due)
            due = self.cluster.retirable(due)
        n = sum(len(b) for b in due.values())
        if n:
            self.apply_retirement(due)
            self._to_lanes(("retire", due, lanes_mod.backends_digest(self.dataplane)))
            log.info("stateful buckets retired", buckets=n, generation=self.generation,
                     still_stateful=sum(len(h.stateful) for h in self.dataplane.history.values()))
        return n

    def apply_retirement(self, due: dict[str, list[int]]) -> None:
        """Swaps in tables where the buckets of `due` are no longer stateful."""
        dp = self.dataplane
        self.generation += 1
        self.worker.set_dataplane(Dataplane(self.config, self.generation, self.registry,
                                            previous=dp, current=dp.tables, retire=due))
        if self.cluster is not None:
            self.cluster.apply_config(self.config)    # the view's table generation

    def learn_history(self, answer: list | None, joined: bool = False) -> None:
        """The tables in force, learnt from the members (pylb/history.py):
        an answer (empty: nobody had any), or None when none came in time
        (every bucket stays stateful); joined: a member answered, so the
        cluster ran without this balancer. Worker 0 tells the other workers;
        then what waited for it is decided."""
        if answer is not None:
            self.generation += 1
            self.worker.set_dataplane(history_mod.compose(
                self.config, self.generation, self.registry, answer, self.dataplane,
                self.cluster.history.known, time.monotonic()))
            self.cluster.apply_config(self.config)    # the view's table generation
        self._to_lanes(("history", answer, joined, lanes_mod.backends_digest(self.dataplane)))
        self.cluster.release(known=answer is not None, joined=joined)

    def _lanes_allow(self, due: dict[str, list[int]]) -> dict[str, list[int]]:
        """Of the due buckets, those no worker process holds a flow of on an
        old backend; nothing while one is moving state or has not answered
        since it was asked (the owners' store is split among the workers)."""
        answers = self.lanes.divergent()
        if answers is None:
            return {}
        if any(busy for busy, _ in answers):
            return {}
        held = collections.defaultdict(set)
        for _, divergent in answers:
            for vip, buckets in divergent.items():
                held[vip].update(buckets)
        return {vip: [b for b in buckets if b not in held[vip]] for vip, buckets in due.items()}

    def stateful_buckets(self) -> int:
        """Buckets of every VIP still stateful (moved, not retired)."""
        return sum(len(h.stateful) for h in self.dataplane.history.values())

    def retire_after(self) -> float:
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
            try:
                verdict = self.decide(p)
            except (ValueError, PylbError) as exc:
                # A packet the miss path cannot take (a bug, or input nobody
                # foresaw) is dropped and counted: it must not end the balancer.
                failed = self.verdicts_by_reason["failed"] = \
                    self.verdicts_by_reason.get("failed", 0) + 1
                if failed <= 10 or failed % 1000 == 0:    # a flood must not flood the log
                    log.warning("punt not decided: dropped", reason=name, error=str(exc),
                                flow_id=flow_label(p.flow_id), failed_so_far=failed)
                verdict = Verdict(p.slot, Action.DROP) if p.slot is not None else None
            if verdict is not None:
                verdicts.append(verdict)
        self.worker.apply(verdicts)
        if self.cluster is not None:
            self.cluster.on_peer_frames(self.worker.peer_recv())
            self.cluster.tick()
        now = time.monotonic()
        if self.lanes is not None:
            self.lanes.poll()
            if self.lanes.failed:
                raise PylbError(f"balancer stops: {self.lanes.failed}")
        # Worker 0 alone retires buckets, for every worker (pylb/lanes.py).
        if self.dataplane.history and now - self._last_retire >= RETIRE_CHECK_S \
                and self.lane == 0:
            self._last_retire = now
            self._retire(now, self.retire_after())
        if now - self._last_age >= AGE_INTERVAL_S:
            self._last_age = now
            self.worker.age_cache()
        return len(punts)

    def run(self, should_stop) -> None:
        """Runs until should_stop() is true; idles in the shim, not in Python.
        Between steps: queued commands, and a snapshot every second."""
        last_solicit = last_snapshot = last_drain_check = last_neighbours = time.monotonic()
        self.publish_snapshot()
        while not should_stop():
            # Shorter idle while an owner waits for state (the wait ends
            # between polls, cluster.decision_delay_ms) or state waits to be
            # pushed: a balancer the router has just left goes idle with the
            # pushes of its last new flows queued, while the owners wait.
            waiting = self.cluster is not None and self.cluster.urgent()
            self.step(max_bursts=1024, max_idle_us=2_000 if waiting else 20_000)
            self.run_commands()
            now = time.monotonic()
            if self.drain_state is not None and now - last_drain_check >= 0.2:
                last_drain_check = now
                self._drain_tick()
            if now - last_solicit > 5.0:
                last_solicit = now
                self.solicit_next_hops()
            if self.lanes is not None and now - last_neighbours >= NEIGHBOURS_SHARE_S:
                last_neighbours = now
                self._share_neighbours()
            if now - last_snapshot >= SNAPSHOT_INTERVAL_S:
                last_snapshot = now
                self.publish_snapshot()
        self.run_commands()
        # The last round's peer datagrams (answers, pushes, carrier replies)
        # wait in the TX buffer for the next poll, which will not come: they
        # leave now, and the summary's tx counters include them.
        self.worker.flush()

    def stats(self) -> Stats:
        """This worker's counters; worker 0's add the other workers' last reports."""
        total = self.worker.stats()
        if self.lanes is not None:
            for report in self.lanes.reports.values():
                total = total + Stats(**report["stats"])
        return total

    def _backend_counts(self) -> list[tuple[int, int, int]]:
        counts = self.worker.backend_counts()
        if self.lanes is not None:
            for report in self.lanes.reports.values():
                theirs = report["backend_counts"]
                counts = [tuple(a + b for a, b in zip(mine, theirs[i]))
                          if i < len(theirs) else mine for i, mine in enumerate(counts)]
        return counts

    def backend_counts(self, active_only: bool = False) -> list[BackendCount]:
        """Packets, bytes and new flows per (VIP, backend) since start (ids are
        stable, so counts survive reconfiguration), and the flows cached for
        each now."""
        counts = self._backend_counts()
        active = self.cache.active_flows(len(self.dataplane.backends)).per_backend
        return [BackendCount(ref.vip, ref.name, str(ref.address), *counts[ref.id],
                             _counted(active, ref.id))
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


def _counted(per_backend: list[int], backend_id: int) -> int | None:
    """A backend's active flows, or None for an id the cache does not count
    apart (PYLB_FLOW_CACHE_COUNTED_BACKENDS)."""
    return per_backend[backend_id] if backend_id < COUNTED_BACKENDS else None


def _worker_cores(config: Config, eal) -> list[int]:
    """The core of each worker: dpdk.cores in order, or the first ones this
    process may use (those it could before the EAL pinned it)."""
    b = config.balancer
    allowed = eal.cpus_before if eal is not None else os.sched_getaffinity(0)
    cores = list(b.dpdk.cores) or sorted(allowed)
    if len(set(cores[:b.workers])) < b.workers:
        raise ConfigError(f"balancer.workers is {b.workers} but only "
                          f"{len(set(cores[:b.workers]))} distinct cores are "
                          f"{'listed in dpdk.cores' if b.dpdk.cores else 'allowed'}: one core "
                          "per worker")
    return cores[:b.workers]


_roles_made = 0
# Ports that other processes of the balancer cannot drive (checked here):
SINGLE_PROCESS_PMDS = {
    "net_af_packet": "the af_packet PMD's sockets live in the process that opened them",
    "net_pcap": "the pcap PMD's capture files are written by the process that opened "
                "them: another worker's output would be lost",
}


def _lane_role(config: Config, eal) -> "lanes_mod.LaneRole | None":
    """Worker 0's role when the balancer has several workers, else None. The
    EAL is this balancer's to start, or (tests: several balancers in one
    process) one started for several processes already."""
    global _roles_made
    b = config.balancer
    if b.workers == 1:
        return None
    if eal is not None and (eal.file_prefix is None or eal.secondary):
        raise ConfigError(f"balancer.workers: {b.workers} worker processes share the EAL's "
                          "hugepage files, but this process started the EAL for one: let "
                          "the balancer start it (docs/architecture.md, process model)")
    for pmd, why in SINGLE_PROCESS_PMDS.items():
        if b.data.device.startswith(pmd):
            raise ConfigError(f"balancer.workers: {why}; run one worker per balancer on "
                              f"{pmd} (docs/architecture.md, process model)")
    # Short names: DPDK's rings and memzones allow about 30 characters.
    _roles_made += 1
    return lanes_mod.LaneRole(0, b.workers, f"l{os.getpid()}_{_roles_made}",
                              eal.file_prefix if eal is not None else f"pylb-{b.name}",
                              _worker_cores(config, eal)[0])
