"""The configuration schema: one pydantic model, read from YAML.

Every field is documented in docs/configuration.md. A bad file raises
ConfigError naming the field and the reason; nothing starts.
"""
from __future__ import annotations

import ipaddress
import pathlib
import re
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from pylb.errors import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class Strict(BaseModel):
    """Unknown fields are errors: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _mac(value: str) -> str:
    if not MAC_RE.match(value):
        raise ValueError(f"{value!r} is not a MAC address like 02:00:00:00:00:01")
    return value.lower()


Mac = Annotated[str, AfterValidator(_mac)]


class Neighbor(Strict):
    address: IPAddress
    mac: Mac


class Exception_(Strict):
    policy: Literal["drop", "tap"] = "drop"
    tap_name: str = Field("pylb0", max_length=15)


class DataPort(Strict):
    device: str = Field(min_length=1)
    address_v4: Optional[ipaddress.IPv4Address] = None
    address_v6: Optional[ipaddress.IPv6Address] = None
    gateway_v4: Optional[ipaddress.IPv4Address] = None
    gateway_v6: Optional[ipaddress.IPv6Address] = None
    mtu: int = Field(1500, ge=576, le=9216)
    rx_desc: int = Field(1024, ge=64, le=16384)
    tx_desc: int = Field(1024, ge=64, le=16384)
    mbufs: int = Field(16383, ge=1023, le=4_194_303)
    promiscuous: bool = True
    neighbors: list[Neighbor] = []
    exception: Exception_ = Exception_()

    @model_validator(mode="after")
    def _needs_an_address(self):
        if self.address_v4 is None and self.address_v6 is None:
            raise ValueError("address_v4 or address_v6 is required (the outer source address)")
        return self


class FlowCache(Strict):
    capacity: int = Field(1_048_576, ge=64, le=1 << 31)
    track: Literal["all", "moved"] = "all"


class Timeouts(Strict):
    """Idle timeouts of cached flows, in seconds."""

    tcp: float = Field(300.0, gt=0, le=86400)
    tcp_closing: float = Field(10.0, gt=0, le=86400)
    udp: float = Field(30.0, gt=0, le=86400)
    other: float = Field(30.0, gt=0, le=86400)

    def as_ms(self) -> list[int]:
        return [int(self.tcp * 1000), int(self.tcp_closing * 1000), int(self.udp * 1000),
                int(self.other * 1000)]


class Dpdk(Strict):
    hugepages: Literal["auto", "on", "off"] = "auto"
    memory_mb: int = Field(512, ge=64, le=1 << 20)
    eal_args: list[str] = []
    cores: list[int] = []


class Log(Strict):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


def _host_port(value: str) -> str:
    """'host:port' or '[v6]:port' with a literal address, as an operator writes it."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not an address like 127.0.0.1:9100 or [::1]:9100")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Admin(Strict):
    """The admin API (docs/admin-api.md)."""

    socket: Optional[str] = Field(None, min_length=1, max_length=107)   # sun_path holds 108
    address: Optional[HostPort] = None


class Metrics(Strict):
    address: Optional[HostPort] = None


class HealthLimits(Strict):
    max_concurrent: int = Field(32, ge=1, le=4096)
    route_table: int = Field(4242, ge=1, le=0xFFFFFFFF - 1)   # for `via: vip` checks

    @field_validator("route_table")
    @classmethod
    def _not_a_kernel_table(cls, v: int) -> int:
        if v in (253, 254, 255):
            raise ValueError(f"{v} is the kernel's default, main or local table")
        return v


class Drain(Strict):
    """A balancer drain (`pylb drain`, docs/operations.md)."""

    quiet_period: float = Field(10.0, gt=0, le=3600)
    timeout: float = Field(600.0, gt=0, le=86400)
    withdraw: list[str] = []      # argv run when a drain starts (e.g. withdraw the BGP route)
    announce: list[str] = []      # argv run when a drain is undone


class Balancer(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataPort
    workers: int = Field(1, ge=1, le=16)   # PYLB_MAX_LANES
    flow_cache: FlowCache = FlowCache()
    timeouts: Timeouts = Timeouts()
    flow_seed: int = Field(0x5EED_1B_5EED_1B, ge=0, lt=1 << 64)
    max_held: int = Field(4096, ge=64, le=1 << 20)
    dpdk: Dpdk = Dpdk()
    log: Log = Log()
    admin: Admin = Admin()
    metrics: Metrics = Metrics()
    health: HealthLimits = HealthLimits()
    drain: Drain = Drain()

    @property
    def admin_socket(self) -> str:
        return self.admin.socket or f"/run/pylb/{self.name}.sock"


class Encap(Strict):
    type: Literal["ipip", "vxlan", "gue"] = "ipip"
    vni: int = Field(0, ge=0, lt=1 << 24)
    port: Optional[int] = Field(None, ge=1, le=65535)
    inner_mac: Mac = "02:00:00:00:00:01"
    ttl: int = Field(64, ge=1, le=255)

    def udp_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"vxlan": 4789, "gue": 6080}.get(self.type, 0)


class Backend(Strict):
    name: str = Field(min_length=1, max_length=64)
    address: IPAddress
    weight: int = Field(1, ge=0, le=65535)


class HealthCheck(Strict):
    """A VIP's backend checks (pylb/health.py, docs/operations.md)."""

    type: Literal["tcp", "http", "https"] = "tcp"
    port: Optional[int] = Field(None, ge=1, le=65535)
    path: str = Field("/", pattern=r"^/[^\s]*$")
    host: Optional[str] = Field(None, min_length=1, max_length=255, pattern=r"^[^\s]+$")
    expect_status: list[int] = Field([200], min_length=1)
    interval: float = Field(2.0, ge=0.05, le=3600)
    timeout: float = Field(1.0, gt=0, le=600)
    rise: int = Field(2, ge=1, le=100)
    fall: int = Field(3, ge=1, le=100)
    via: Literal["direct", "vip"] = "direct"
    tls_verify: bool = False

    @field_validator("expect_status", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, int) else v

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 100 <= s <= 599]
        if bad:
            raise ValueError(f"HTTP statuses are 100..599, not {bad}")
        return v

    @model_validator(mode="after")
    def _timeout_within_interval(self):
        if self.timeout > self.interval:
            raise ValueError(f"timeout {self.timeout} is longer than interval {self.interval}")
        return self


class Vip(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    address: IPAddress
    protocol: Literal["tcp", "udp"] = "tcp"
    port: Annotated[Optional[int], Field(ge=1, le=65535)] = None
    encap: Encap = Encap()
    answer_arp: bool = False
    table_size: int = 65537
    backends: list[Backend] = Field(min_length=1)
    health: Optional[HealthCheck] = None

    @field_validator("port", mode="before")
    @classmethod
    def _all_ports(cls, v):
        return None if v in ("all", "*") else v

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if not (13 <= v <= 16_777_259) or not _is_prime(v):
            raise ValueError(f"{v} must be a prime between 13 and 16777259 (e.g. 65537)")
        return v

    @model_validator(mode="after")
    def _backends_unique(self):
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names repeat: {', '.join(dupes)}")
        addrs = [b.address for b in self.backends]
        dupes = sorted({str(a) for a in addrs if addrs.count(a) > 1})
        if dupes:
            raise ValueError(f"backend addresses repeat: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _health_port(self):
        if self.health is not None and self.health.port is None and self.port is None:
            raise ValueError("health.port is required for an all-ports VIP")
        return self

    @property
    def protocol_number(self) -> int:
        return 6 if self.protocol == "tcp" else 17


# The owner's longest wait for a flow's state (docs/state-exchange.md, "The
# miss path"): it asks the other members who carries the flow and decides as
# soon as they have replied, so the bound only matters for a member that does
# not answer: one down, or kept off its CPU (the lab's reload pauses a
# balancer's polling for about 150 ms).
DEFAULT_DECISION_DELAY_MS = 200
# Retries back off by doubling, up to this factor (ClusterNode._retry).
MAX_BACKOFF = 16


class Member(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    address: IPAddress


class Cluster(Strict):
    """The balancers sharing these VIPs and how they exchange flow state
    (docs/state-exchange.md, docs/peer-protocol.md)."""

    balancers: list[Member] = Field(min_length=1)
    peer_port: int = Field(4800, ge=1, le=65535)
    key: Optional[str] = Field(None, min_length=32, pattern=r"^[0-9a-fA-F]+$")
    state_exchange: bool = True
    previous_retire_after: Optional[float] = Field(None, gt=0, le=86400 * 7)
    request_timeout_ms: int = Field(50, ge=1, le=10_000)
    decision_delay_ms: Optional[int] = Field(None, ge=0, le=10_000)
    request_retries: int = Field(2, ge=0, le=10)
    push_interval_ms: int = Field(5, ge=1, le=10_000)
    refresh_interval: float = Field(10.0, gt=0, le=3600)
    handoff_period: float = Field(5.0, gt=0, le=600)

    @model_validator(mode="after")
    def _delay_within_patience(self):
        # The owner's answer must reach the asker before the asker gives up on
        # it and asks the backup, which would decide apart. Its retries to the
        # owner in the meantime are harmless (the owner keeps a retried packet
        # once), and the wait is only checked between polls: hence half.
        if self.decision_delay_ms is not None and \
                2 * self.decision_delay_ms > self.owner_patience_ms():
            raise ValueError(f"decision_delay_ms {self.decision_delay_ms} is more than half of "
                             f"{self.owner_patience_ms()} ms, how long an asker tries the owner "
                             f"(request_timeout_ms {self.request_timeout_ms}, doubling, "
                             f"request_retries {self.request_retries})")
        return self

    def retry_after_ms(self, tries: int) -> int:
        """How long an asker waits for an answer after its tries-th request to
        one balancer before it sends the next: request_timeout_ms, doubling."""
        return self.request_timeout_ms * min(1 << max(tries - 1, 0), MAX_BACKOFF)

    def owner_patience_ms(self) -> int:
        """How long an asker tries the owner (the first request and its
        request_retries) before it asks the backup."""
        return sum(self.retry_after_ms(t) for t in range(1, self.request_retries + 2))

    def decision_delay(self) -> int:
        """decision_delay_ms: the owner's longest wait for a flow's state
        before rule 4; by default 200 ms but at most half the asker's patience."""
        if self.decision_delay_ms is not None:
            return self.decision_delay_ms
        return min(DEFAULT_DECISION_DELAY_MS, self.owner_patience_ms() // 2)

    @model_validator(mode="after")
    def _unique(self):
        for what in ("name", "address"):
            values = [getattr(m, what) for m in self.balancers]
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"balancer {what}s repeat: {', '.join(dupes)}")
        return self

    def key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.key) if self.key else None


class Config(Strict):
    balancer: Balancer
    vips: list[Vip] = Field(min_length=1)
    cluster: Optional[Cluster] = None

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.vips]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"VIP names repeat: {', '.join(dupes)}")
        keys = [(v.address, v.protocol, v.port) for v in self.vips]
        if len(set(keys)) != len(keys):
            raise ValueError("two VIPs share address, protocol and port")
        data = self.balancer.data
        if self.cluster is not None:
            me = next((m for m in self.cluster.balancers if m.name == self.balancer.name), None)
            if me is None:
                raise ValueError(f"cluster.balancers must list this balancer ({self.balancer.name})")
            if me.address not in (data.address_v4, data.address_v6):
                raise ValueError(f"cluster.balancers: {me.name}'s address {me.address} is not "
                                 "one of balancer.data's addresses")
            for m in self.cluster.balancers:
                mine = data.address_v4 if m.address.version == 4 else data.address_v6
                if mine is None:
                    raise ValueError(f"cluster.balancers: {m.name} is IPv{m.address.version} but "
                                     f"this balancer has no IPv{m.address.version} data address")
        for vip in self.vips:
            if vip.health is not None and vip.health.via == "vip":
                if data.exception.policy != "tap":
                    raise ValueError(f"VIP {vip.name}: health checks via the VIP need "
                                     "balancer.data.exception.policy tap")
                family = vip.address.version
                if (data.address_v4 if family == 4 else data.address_v6) is None:
                    raise ValueError(f"VIP {vip.name}: health checks via the VIP need "
                                     f"balancer.data.address_v{family} (their source)")
                # The worker steers a check only to a TCP VIP at the check's port.
                port = vip.health.port or vip.port
                if not (self.vip_at(vip.address, 6, port) or self.vip_at(vip.address, 6, 0)):
                    raise ValueError(f"VIP {vip.name}: a health check via the VIP connects to "
                                     f"TCP port {port} of {vip.address}, where no TCP VIP is")
            for backend in vip.backends:
                family = backend.address.version
                if family == 4 and data.address_v4 is None:
                    raise ValueError(f"VIP {vip.name}: backend {backend.name} is IPv4 but "
                                     "balancer.data.address_v4 is not set")
                if family == 6 and data.address_v6 is None:
                    raise ValueError(f"VIP {vip.name}: backend {backend.name} is IPv6 but "
                                     "balancer.data.address_v6 is not set")
        return self

    def vip_at(self, address, protocol: int, port: int) -> Vip | None:
        """The VIP of (address, protocol number, port; 0 = all ports), or None."""
        for vip in self.vips:
            if vip.address == address and vip.protocol_number == protocol \
                    and (vip.port or 0) == port:
                return vip
        return None

    def find_vip(self, name_or_address: str) -> Vip:
        for vip in self.vips:
            if vip.name == name_or_address or str(vip.address) == name_or_address:
                return vip
        raise ConfigError(f"no VIP named or addressed {name_or_address!r}; "
                          f"VIPs: {', '.join(v.name for v in self.vips)}")


# What a running balancer can take from a new configuration: VIPs and their
# backends, the cluster section (when there was one), logs. The rest shapes
# memory, ports and processes set up at start (or, for flow_seed, every flow
# id in every balancer), so a change there needs a restart.
LIVE_BALANCER_FIELDS = {"log", "drain"}


def live_change_errors(old: Config, new: Config) -> list[str]:
    """Why `new` cannot replace `old` in a running balancer (empty: it can)."""
    errors = []
    for name in Balancer.model_fields:
        if name in LIVE_BALANCER_FIELDS:
            continue
        if getattr(old.balancer, name) != getattr(new.balancer, name):
            errors.append(f"balancer.{name}: cannot change while running (restart the balancer)")
    if (old.cluster is None) != (new.cluster is None):
        errors.append("cluster: cannot be added or removed while running (restart the balancer)")
    return errors


def describe_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """What a reload changes, for logs and the API: VIPs and backends
    ("vip/backend") added, removed, reweighted; VIPs otherwise changed."""
    out: dict[str, list[str]] = {k: [] for k in (
        "vips_added", "vips_removed", "vips_changed", "backends_added", "backends_removed",
        "backends_reweighted")}
    before = {v.name: v for v in old.vips}
    after = {v.name: v for v in new.vips}
    out["vips_added"] = sorted(set(after) - set(before))
    out["vips_removed"] = sorted(set(before) - set(after))
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        ba, bb = {x.name: x for x in a.backends}, {x.name: x for x in b.backends}
        out["backends_added"] += [f"{name}/{n}" for n in bb if n not in ba]
        out["backends_removed"] += [f"{name}/{n}" for n in ba if n not in bb]
        out["backends_reweighted"] += [f"{name}/{n}" for n in bb
                                       if n in ba and ba[n].weight != bb[n].weight]
        if a.model_copy(update={"backends": []}) != b.model_copy(update={"backends": []}) or \
                any(ba[n].address != bb[n].address for n in bb if n in ba):
            out["vips_changed"].append(name)
    if old.cluster != new.cluster:
        out["cluster_changed"] = ["cluster"]
    return {k: v for k, v in out.items() if v}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse(data: object, source: str = "configuration") -> Config:
    """Validates a mapping (as read from YAML) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with balancer and vips")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load(path: str | pathlib.Path) -> Config:
    """Reads and validates a YAML configuration file."""
    p = pathlib.Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse(data, str(p))
