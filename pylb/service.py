"""`pylb run`: one balancer with what surrounds it in production: the admin
API, the metrics endpoint, health checks, and the signals (SIGHUP reloads,
SIGINT/SIGTERM stop)."""
from __future__ import annotations

import os
import signal
import time

import structlog

from pylb import logs
from pylb.config import Config, split_host_port

log = structlog.get_logger("pylb.service")


def serve(cfg: Config, config_file: str, duration: float | None, echo,
          previous: Config | list[Config] | None = None,
          log_override: tuple[str | None, str | None] = (None, None)) -> None:
    """Runs until SIGINT/SIGTERM, `duration`, or the end of a balancer drain;
    then prints the summary with echo."""
    from pylb.admin import AdminServer, claim_socket_path
    from pylb.balancer import Balancer
    from pylb.health import HealthChecker
    from pylb.metrics import MetricsServer
    from pylb.report import summary

    stop = {"now": False}

    def on_stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    deadline = time.monotonic() + duration if duration else None
    # Before the NIC is touched: a second balancer of the same name on this
    # host is a mistake to stop at once.
    claim_socket_path(cfg.balancer.admin_socket)
    # A reload asked for while the balancer starts is ignored, not fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with Balancer(cfg, previous_config=previous) as lb:
        lb.config_file = os.path.abspath(config_file)

        def reload(b):
            log.info("SIGHUP: reloading the configuration", file=b.config_file)
            b.reload()

        def on_hup(signum, frame):
            # The handler runs between two bytecodes of the control loop, maybe
            # inside a log call holding its lock: it only queues the reload.
            lb.submit(reload)

        signal.signal(signal.SIGHUP, on_hup)

        def relog(new: Config) -> None:
            logs.setup(log_override[0] or new.balancer.log.format,
                       log_override[1] or new.balancer.log.level)
        lb.on_reconfigure.append(relog)
        closers = []
        try:
            b = cfg.balancer
            admin_tcp = split_host_port(b.admin.address) if b.admin.address else None
            admin = AdminServer(lb, b.admin_socket, admin_tcp)
            closers.append(admin.close)
            log.info("admin API listening", socket=b.admin_socket, address=b.admin.address)
            if b.metrics.address:
                metrics = MetricsServer(lb, split_host_port(b.metrics.address))
                closers.append(metrics.close)
                log.info("metrics listening", address=b.metrics.address)
            checker = HealthChecker(lb)
            closers.append(checker.close)
            lb.run(lambda: stop["now"] or lb.drain_done()
                   or (deadline is not None and time.monotonic() >= deadline))
        finally:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            for close in reversed(closers):
                close()
        lb.stop_workers()       # their last counters, before the summary
        echo(summary(lb.stats(), lb.backend_counts(), lb.punts(), port=lb.port.stats(),
                     workers=lb.per_worker() if lb.lane_count > 1 else None))
