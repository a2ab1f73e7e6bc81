"""The pylb command line."""
from __future__ import annotations

import json
import signal
import sys

import click

from pylb import config as config_mod
from pylb import logs
from pylb.errors import ConfigError, PylbError


def _load(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


@click.group()
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
              help="Overrides balancer.log.format.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.pass_context
def main(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """pylb: an L4 load balancer on DPDK."""
    ctx.obj = {"log_format": log_format, "log_level": log_level}
    logs.setup(log_format or "console", log_level or "warning")


def _setup_logs(ctx: click.Context, cfg: config_mod.Config) -> None:
    logs.setup(ctx.obj["log_format"] or cfg.balancer.log.format,
               ctx.obj["log_level"] or cfg.balancer.log.level)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str) -> None:
    """Validates FILE; exits non-zero with the reasons if it is wrong."""
    cfg = _load(file)
    backends = sum(len(v.backends) for v in cfg.vips)
    click.echo(f"{file}: ok ({len(cfg.vips)} VIPs, {backends} backends)")


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--vip", required=True, help="VIP name or address.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def table(config_file: str, vip: str, as_json: bool) -> None:
    """Prints a VIP's destination table (bucket -> backend)."""
    from pylb.dataplane import NO_BACKEND, VipTables
    cfg = _load(config_file)
    try:
        v = cfg.find_vip(vip)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    tables = VipTables.build(v)
    names = [tables.names[t] if t != NO_BACKEND else None for t in tables.table]
    if as_json:
        json.dump({"vip": v.name, "address": str(v.address), "table_size": v.table_size,
                   "buckets": names}, sys.stdout)
        sys.stdout.write("\n")
        return
    counts = {b.name: 0 for b in v.backends}
    for n in names:
        if n is not None:
            counts[n] += 1
    click.echo(f"VIP {v.name} ({v.address} {v.protocol}/{v.port or 'all'}), "
               f"{v.table_size} buckets")
    for b in v.backends:
        click.echo(f"  {b.name:<20} {str(b.address):<40} weight {b.weight:<6} "
                   f"buckets {counts[b.name]}")
    click.echo("bucket backend")
    for i, n in enumerate(names):
        click.echo(f"{i} {n or '-'}")


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.argument("flow")
def which(config_file: str, flow: str, as_json: bool) -> None:
    """Prints the flow id, bucket and backend of FLOW, e.g.
    'tcp 198.51.100.7:40000 -> 192.0.2.10:80'."""
    from pylb.dataplane import Dataplane
    from pylb.flow_id import FlowKey
    from pylb.ownership import Ownership
    cfg = _load(config_file)
    try:
        key = FlowKey.parse(flow)
    except ValueError as err:
        raise click.ClickException(f"bad flow {flow!r}: {err}") from None
    dp = Dataplane(cfg, 1)
    try:
        c = dp.classify(key)
    finally:
        dp.close()
    # The cluster section is newer than some configurations (and than this
    # command), so its absence means one balancer that owns every bucket.
    cluster = getattr(cfg, "cluster", None)
    members = [m.name for m in cluster.balancers] if cluster and cluster.balancers else []
    owner = backup = None
    if c.vip is not None:
        own = Ownership(members or [cfg.balancer.name], cfg.find_vip(c.vip).table_size)
        owner, backup = own.owners(c.bucket)
    result = {"flow": str(key), "flow_id": f"0x{c.flow_id:016x}", "vip": c.vip,
              "bucket": c.bucket if c.vip else None,
              "backend": c.current.name if c.current else None,
              "backend_address": str(c.current.address) if c.current else None,
              "owner": owner, "backup": backup}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"flow     {result['flow']}")
    click.echo(f"flow id  {result['flow_id']}")
    if c.vip is None:
        click.echo("vip      none: not for a VIP of this configuration")
        return
    click.echo(f"vip      {c.vip}")
    click.echo(f"bucket   {c.bucket}")
    click.echo(f"backend  {result['backend']} ({result['backend_address']})"
               if c.current else "backend  none (no backend has weight)")
    if not members:
        click.echo(f"owner    {owner} (single balancer)")
        return
    click.echo(f"owner    {owner}")
    click.echo(f"backup   {backup or 'none (single balancer)'}")


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--previous-config", "previous_file", type=click.Path(dir_okay=False), default=None,
              help="The cluster's configuration before its last change, for a balancer that "
                   "joins while that change is in force (docs/state-exchange.md).")
@click.pass_context
def run(ctx: click.Context, config_file: str, duration: float | None,
        previous_file: str | None) -> None:
    """Runs a balancer until SIGINT or SIGTERM, then prints a summary."""
    import time

    from pylb.balancer import Balancer
    from pylb.report import summary
    cfg = _load(config_file)
    previous = _load(previous_file) if previous_file else None
    _setup_logs(ctx, cfg)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    deadline = time.monotonic() + duration if duration else None
    try:
        with Balancer(cfg, previous_config=previous) as lb:
            lb.run(lambda: stop["now"] or (deadline is not None and time.monotonic() >= deadline))
            click.echo(summary(lb.stats(), lb.backend_counts(), lb.verdicts_by_reason,
                               port=lb.port.stats()))
    except PylbError as err:
        raise click.ClickException(str(err)) from None


@main.command("gen-pcap")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False))
@click.option("--flows", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--dst-mac", default="02:00:00:00:00:01", show_default=True,
              help="Ethernet destination of the frames (the balancer's port).")
def gen_pcap(config_file: str, out_file: str, flows: int, seed: int, dst_mac: str) -> None:
    """Writes a pcap of generated flows to the configuration's VIPs (SYN, data,
    FIN for TCP; three datagrams for UDP), e.g. to feed the pcap PMD."""
    import random

    from pylb import pcap, traffic
    cfg = _load(config_file)
    vips = [(v.name, str(v.address), v.protocol_number, v.port or 80) for v in cfg.vips]
    frames = []
    for f in traffic.make_flows(vips, flows, random.Random(seed)):
        kinds = ["S", "PA", "FA"] if f.proto == 6 else ["U", "U", "U"]
        frames += f.frames(dst_mac, "02:00:00:00:00:c1", kinds)
    pcap.write(out_file, frames)
    click.echo(f"{out_file}: {len(frames)} frames of {flows} flows")


@main.command()
@click.option("--flows", type=int, default=2000, show_default=True, help="Flows per scenario.")
@click.option("--seed", type=int, default=1, show_default=True)
def scenarios(flows: int, seed: int) -> None:
    """Runs the cluster-change scenarios (three balancers on DPDK ring ports,
    a scripted router) with state exchange on and off, and prints the table."""
    from pylb.eal import Eal, eal_args
    from pylb.scenarios import run_all
    try:
        with Eal(eal_args()):
            run_all(flows, seed, echo=click.echo)
    except PylbError as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.option("--flows", type=int, default=5000, show_default=True, help="TCP/UDP flows per run.")
@click.option("--seed", type=int, default=1, show_default=True, help="Traffic generator seed.")
@click.pass_context
def demo(ctx: click.Context, flows: int, seed: int) -> None:
    """One balancer on a DPDK test port forwarding a generated traffic sample."""
    from pylb.demo import run_demo
    try:
        ok = run_demo(flows=flows, seed=seed, echo=click.echo)
    except PylbError as err:
        raise click.ClickException(str(err)) from None
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
