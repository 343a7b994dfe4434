"""Logging setup, called once by each entry point; modules only call get_logger().

One JSON layout for every log line nuclide writes, services and functions alike (a function's
``context.logger`` writes the same keys, ``services/runtime/context.py``)::

    {"ts": "2026-12-05T23:56:08.123Z", "level": "info", "msg": "deployer ready", "service": "deployer", ...}

``ts`` is UTC in RFC 3339 with milliseconds (``shared/logtime.py``), ``level`` one of debug, info,
warning (``warn`` from a function), error; ``msg`` the message; then ``service`` (or ``function``
and ``call_id``) and the line's own fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from shared.logtime import utc_iso_now


def _layout(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog's ``event``/``timestamp`` become ``msg``/``ts``, first in the line as in a function's."""
    record = {"ts": utc_iso_now(), "level": event_dict.pop("level", "info"), "msg": event_dict.pop("event", "")}
    record.update(event_dict)
    return record


def configure(service: str, fmt: str = "auto", level: str = "info") -> None:
    """JSON lines when not on a terminal (containers, files), readable lines on one."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if use_json:
        processors += [structlog.processors.format_exc_info, _layout, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True),
                       structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


def get_logger(name: str):
    return structlog.get_logger(name)
