"""The pylb command line."""
from __future__ import annotations

import json
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
    from pylb.flow_id import FlowKey, flow_label
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
    result = {"flow": str(key), "flow_id": flow_label(c.flow_id), "vip": c.vip,
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
@click.option("--previous-config", "previous_files", type=click.Path(dir_okay=False),
              multiple=True,
              help="Optional: a member learns the tables in force from the others. The "
                   "configuration before the last change, for a standalone balancer (or to "
                   "override that); repeated, oldest first, when several changes are in force "
                   "(docs/state-exchange.md).")
@click.pass_context
def run(ctx: click.Context, config_file: str, duration: float | None,
        previous_files: tuple[str, ...]) -> None:
    """Runs a balancer until SIGINT or SIGTERM, then prints a summary.
    SIGHUP reloads the configuration file; the admin API listens on
    balancer.admin.socket (pylb status, flows, backends, reload, drain)."""
    from pylb.service import serve
    cfg = _load(config_file)
    previous = [_load(f) for f in previous_files]
    _setup_logs(ctx, cfg)
    try:
        serve(cfg, config_file, duration, click.echo, previous=previous,
              log_override=(ctx.obj["log_format"], ctx.obj["log_level"]))
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


# ---------------------------------------------------------------- admin API commands


def _admin_target(socket_path: str | None, config_file: str | None) -> str:
    """Where the running balancer listens: --socket (or $PYLB_ADMIN), else the
    configuration's balancer.admin.socket, else the one socket in /run/pylb."""
    import glob
    if socket_path:
        return socket_path
    if config_file:
        return _load(config_file).balancer.admin_socket
    found = sorted(glob.glob("/run/pylb/*.sock"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise click.ClickException("no balancer socket in /run/pylb: is a balancer running? "
                                   "(give --socket or --config)")
    raise click.ClickException("several balancers run here: give --socket, one of "
                               + ", ".join(found))


def _admin_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="Find the balancer's socket from this configuration.")(f)
    f = click.option("--socket", "socket_path", default=None, envvar="PYLB_ADMIN",
                     help="The balancer's admin socket, or http://host:port "
                          "(default: the one socket in /run/pylb).")(f)
    return f


def _call(socket_path, config_file, method: str, path: str, **kw) -> dict:
    from pylb.admin import AdminError, Client
    try:
        return Client(_admin_target(socket_path, config_file)).request(method, path, **kw)
    except AdminError as err:
        raise click.ClickException(str(err)) from None


def _emit(payload: dict, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=1, default=str))
    else:
        click.echo(human(payload))


@main.command()
@_admin_options
def status(socket_path, config_file, as_json) -> None:
    """A running balancer: VIPs, backends and health, balancers and ownership,
    workers, counters."""
    from pylb import report
    _emit(_call(socket_path, config_file, "GET", "/status"), as_json, report.status)


@main.command()
@_admin_options
@click.option("--vip", default=None, help="Only this VIP's backends.")
def backends(socket_path, config_file, as_json, vip) -> None:
    """A running balancer's backends: weight, health, buckets, traffic."""
    from pylb import report
    payload = _call(socket_path, config_file, "GET", "/backends",
                    query={"vip": vip} if vip else None)
    _emit(payload, as_json, lambda p: report.backends(p["backends"]))


@main.command()
@_admin_options
@click.argument("flow")
def flows(socket_path, config_file, as_json, flow) -> None:
    """Looks FLOW up in a running balancer, e.g. 'tcp 198.51.100.7:40000 ->
    192.0.2.10:80': cached here or not, owner, backup, backend."""
    from pylb import report
    _emit(_call(socket_path, config_file, "GET", "/flows", query={"flow": flow}), as_json,
          report.flow)


@main.command()
@_admin_options
def reload(socket_path, config_file, as_json) -> None:
    """Makes a running balancer read its configuration file again (as SIGHUP
    does). A bad file is rejected whole and the running configuration stays."""
    payload = _call(socket_path, config_file, "POST", "/reload")

    def human(p):
        head = f"reloaded: generation {p['generation']}"
        if not p["changes"]:
            return head + " (no change)"
        return "\n".join([head] + [f"  {k.replace('_', ' ')}: {', '.join(v)}"
                                   for k, v in p["changes"].items()])
    _emit(payload, as_json, human)


@main.command()
@_admin_options
@click.option("--undo", is_flag=True, help="Take new flows again.")
@click.option("--wait", is_flag=True, help="Balancer drain: wait until the balancer has exited.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many s.")
@click.argument("vip", required=False)
@click.argument("backend", required=False)
def drain(socket_path, config_file, as_json, undo, wait, timeout, vip, backend) -> None:
    """Drains BACKEND of VIP (weight 0: no new flows, established ones go on),
    or, with no arguments, the whole balancer (it stops taking new traffic,
    hands its ownership off and exits when its flows have moved or ended)."""
    if (vip is None) != (backend is None):
        raise click.UsageError("give both VIP and BACKEND, or neither (the whole balancer)")
    body = {"undo": undo} if vip is None else {"vip": vip, "backend": backend, "undo": undo}
    target = _admin_target(socket_path, config_file)
    payload = _call(target, None, "POST", "/drain", body=body)
    if vip is None and wait and not undo:
        payload = _wait_gone(target, timeout, payload)

    def human(p):
        if "backend" in p:
            what = "drained" if p["drained"] else "takes new flows again"
            return f"{p['vip']}/{p['backend']}: {what} (generation {p['generation']})"
        return f"balancer {p['balancer']}: {p['state']}"
    _emit(payload, as_json, human)


def _wait_gone(target: str, timeout: float | None, payload: dict) -> dict:
    """Until the draining balancer's socket stops answering: it has exited."""
    import time

    from pylb.admin import AdminError, Client
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        try:
            payload = Client(target, timeout=5).request("GET", "/status")["drain"] or payload
        except AdminError:
            return {**payload, "state": "exited"}
        time.sleep(0.5)
    raise click.ClickException(f"the balancer still runs after {timeout} s "
                               f"({payload.get('state')})")


@main.command()
@click.option("--quick", is_flag=True, help="Fewer flow counts and shorter runs (a smoke run).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory of results.json [default: bench/out].")
@click.option("--results-md", type=click.Path(dir_okay=False), default=None,
              help="The Markdown table to regenerate [default: bench/RESULTS.md].")
@click.option("--native/--no-native", default=True, help="Run the native packet-rate runner.")
@click.option("--python/--no-python", "python_", default=True,
              help="Run the Python-level pytest-benchmark suites.")
def bench(quick: bool, out_dir: str | None, results_md: str | None, native: bool,
          python_: bool) -> None:
    """Runs the benchmark suite (bench/README.md): every figure with a baseline
    measured in the same run; writes results.json and RESULTS.md."""
    import pathlib

    from pylb import bench as bench_mod
    try:
        bench_mod.run(pathlib.Path(out_dir) if out_dir else None,
                      pathlib.Path(results_md) if results_md else None,
                      quick=quick, native=native, python=python_, echo=click.echo)
    except PylbError as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--root", default="/", hidden=True, help="Read /proc and /sys under this directory.")
def doctor(config_file: str, as_json: bool, root: str) -> None:
    """Checks this host for the balancer of CONFIG: hugepages, the NIC's driver
    binding, the IOMMU, core isolation, MTU toward the backends. Says what to
    fix; exits 1 when something must be fixed first."""
    from pylb.doctor import FAIL, examine
    findings = examine(_load(config_file), root)
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=1))
    else:
        for f in findings:
            click.echo(f"{f.status:<4}  {f.check:<9} {f.detail}")
            if f.fix and f.status != "ok":
                click.echo(f"      {'':<9} fix: {f.fix}")
    if any(f.status == FAIL for f in findings):
        raise SystemExit(1)



# ---------------------------------------------------------------- the lab
# (kept above the __main__ guard so that `python -m pylb.cli lab ...` has it)


def _lab_signals() -> None:
    """SIGTERM (`pylb lab down`) and SIGHUP (a closed terminal) end a lab run
    as Ctrl-C does, so that its clean-up runs; once, so that a second signal
    cannot cut the clean-up short."""
    import signal

    def interrupt(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _need_root() -> None:
    import os
    import shutil
    if os.geteuid() != 0:
        raise click.ClickException("the lab makes network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise click.ClickException("the lab needs iproute2's ip (scripts/setup.sh installs it)")


@main.group()
def lab() -> None:
    """A whole cluster on one machine, in network namespaces: clients with the
    kernel's TCP, an ECMP router, three balancers on af_packet, four VXLAN
    backends answering directly (docs/lab.md)."""


@lab.command("demo")
@click.option("--quick", is_flag=True, help="The CI test's size: fewer connections, shorter.")
@click.option("--connections", type=int, default=None,
              help="Echo connections per client namespace (there are two).")
@click.option("--http-rate", type=float, default=None,
              help="New HTTP requests per second per client namespace.")
@click.option("--mode", type=click.Choice(["both", "on", "off"]), default="both",
              show_default=True, help="State exchange on, off, or both (the same workload).")
@click.option("--seed", type=int, default=1, show_default=True)
def lab_demo(quick: bool, connections: int | None, http_rate: float | None, mode: str,
             seed: int) -> None:
    """The churn demo: while connections stream, a backend joins and another
    drains, a balancer leaves the router, one is killed, one joins, one is
    drained with `pylb drain` and exits by itself. Every
    byte is checked; the table shows, per step, connections alive, broken,
    and the longest stall, with state exchange on and off. Exits 1 if, with
    the exchange on, a connection broke, stalled past the bound, or an HTTP
    request failed."""
    import dataclasses
    import time

    from pylb.lab import churn, report
    _need_root()
    _lab_signals()
    plan = churn.Plan.quick() if quick else churn.Plan()
    plan = dataclasses.replace(plan, seed=seed, **{k: v for k, v in (
        ("connections", connections), ("http_rate", http_rate)) if v is not None})
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[mode]
    began = time.monotonic()
    try:
        results = churn.run_demo(plan, modes, echo=click.echo)
    except PylbError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"Churn: the same workload ({2 * plan.connections} echo connections, "
               f"{2 * plan.http_rate:g} HTTP requests/s) through steps a-e, "
               f"state exchange {' and '.join('on' if m else 'off' for m in modes)}; "
               f"stall bound {plan.stall_bound_s} s")
    click.echo(report.churn_table(results))
    problems = churn.verdict(results)
    click.echo(f"\n{time.monotonic() - began:.0f} s in all; balancers' logs in "
               f"{results[0].balancers['lb1']['log'].rsplit('/', 1)[0]}")
    if problems:
        click.echo("RESULT: FAILED: " + "; ".join(problems))
        raise SystemExit(1)
    on = [r for r in results if r.exchange]
    click.echo("RESULT: ok" + (f": with state exchange on, 0 of {len(on[0].connections)} "
                               "connections broken" if on else ""))


@lab.command("up")
@click.option("--exchange/--no-exchange", default=True, show_default=True,
              help="State exchange between the balancers.")
@click.option("--traffic/--no-traffic", default=True, show_default=True,
              help="Light client traffic with a progress line every second.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
def lab_up(exchange: bool, traffic: bool, duration: float | None) -> None:
    """Builds the lab with three balancers and keeps it until Ctrl-C, SIGTERM
    or `pylb lab down`; prints the namespaces to look into."""
    from pylb.lab import churn
    _need_root()
    _lab_signals()
    try:
        churn.hold(exchange=exchange, traffic=traffic, duration=duration, echo=click.echo)
    except PylbError as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:   # Ctrl-C, SIGTERM: the way to end it; removed by now
        click.echo("lab removed")


@lab.command("status")
def lab_status() -> None:
    """Labs on this machine: running ones (pid, phase, balancers) and what
    dead runs left behind."""
    from pylb import netns
    from pylb.lab.topology import lab_states
    states = lab_states()
    for st in states:
        lbs = ", ".join(f"{n} pid {b['pid']} "
                        f"{'running' if netns.process_start(b['pid']) is not None else 'gone'}"
                        for n, b in st.get("balancers", {}).items())
        click.echo(f"run {st['pid']} {'running' if st['alive'] else 'dead'}: "
                   f"{st['phase']}{' (' + st['step'] + ')' if st.get('step') else ''}; "
                   f"router ECMP {st.get('router') or '-'}; {lbs or 'no balancers'}; "
                   f"{len(st['namespaces'])} namespaces; {st['workdir']}")
    stale = [n for n in netns.list_namespaces()
             if netns.owner_pid(n) is not None and not netns.owner_alive(netns.owner_pid(n))]
    if stale:
        click.echo(f"left by dead runs ({len(stale)} namespaces; pylb lab down removes them): "
                   + ", ".join(stale))
    if not states and not stale:
        click.echo("no lab on this machine")


@lab.command("down")
@click.option("--pid", type=int, default=None, help="Only the lab run with this pid.")
def lab_down(pid: int | None) -> None:
    """Ends every running lab (each removes what it made) and removes what
    dead runs left: namespaces, links, processes in them, run directories."""
    from pylb.lab.topology import stop_labs
    _need_root()
    said = stop_labs(only=pid)
    click.echo("\n".join(said) if said else "nothing to remove")


def _lab_router(router: str | None) -> str:
    """The router namespace to change: --router, else the one running lab's."""
    from pylb.lab.topology import lab_states
    if router:
        return router
    running = [st for st in lab_states() if st["alive"] and "router" in st["namespaces"]]
    if len(running) != 1:
        raise click.ClickException(f"{len(running)} running labs: name the router namespace "
                                   "with --router")
    return running[0]["namespaces"]["router"]


def _route_change(balancer: str, router: str | None, present: bool) -> None:
    from pylb.lab.topology import NODES, change_ecmp
    _need_root()
    if not balancer.startswith("lb") or balancer not in NODES:
        raise click.BadParameter(f"no balancer {balancer!r} in the lab", param_hint="BALANCER")
    try:
        now = change_ecmp(_lab_router(router), balancer, present)
    except PylbError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"router ECMP set: {' '.join(now)}")


_ROUTER_OPTION = click.option("--router", default=None, metavar="NAMESPACE",
                              help="The lab's router namespace [default: the running lab's].")


@lab.command("withdraw")
@click.argument("balancer")
@_ROUTER_OPTION
def lab_withdraw(balancer: str, router: str | None) -> None:
    """Takes BALANCER's next hop out of the router's multipath VIP routes,
    leaving the others, as a BGP withdrawal would: each lab balancer's
    drain.withdraw command."""
    _route_change(balancer, router, present=False)


@lab.command("announce")
@click.argument("balancer")
@_ROUTER_OPTION
def lab_announce(balancer: str, router: str | None) -> None:
    """Puts BALANCER's next hop back into the router's multipath VIP routes:
    each lab balancer's drain.announce command (pylb drain --undo)."""
    _route_change(balancer, router, present=True)


if __name__ == "__main__":  # pragma: no cover
    main()
