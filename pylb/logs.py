"""Structured logs: console for people, JSON for machines. Never per packet."""
from __future__ import annotations

import logging
import sys

import structlog

current: tuple[str, str] = ("console", "info")   # as setup() last set it
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def setup(fmt: str = "console", level: str = "info", every_line: dict | None = None) -> None:
    """every_line: fields every line carries (a worker process its index)."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    global current
    current = (fmt, level)
    fields = dict(every_line or {})

    def add_fields(logger, method, event):
        for k, v in fields.items():
            event.setdefault(k, v)
        return event
    structlog.configure(
        processors=[structlog.processors.add_log_level, add_fields,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
