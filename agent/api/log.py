"""structlog set-up, called once by each entry point (dctl, daemons) and nowhere else.

JSON lines when stderr is not a terminal (systemd, CI), human-readable console output otherwise.
Event names are snake_case facts; fields carry units in their names (docs/architecture.md).
"""

from __future__ import annotations

import logging
import sys

import structlog


class _StderrLogger:
    """Writes each rendered event to whatever `sys.stderr` is at that moment: a logger bound to the
    stream object at configuration time would keep writing to a stream that was since replaced and closed
    (pytest's capture, a daemon re-opening its streams)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for the process; `json=None` picks JSON unless stderr is a TTY."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_args: _StderrLogger(),
        cache_logger_on_first_use=True,
    )
