"""Logging on stderr: console lines or JSON objects, times in UTC ISO 8601, the API key never.

Messages often carry text from outside (an API error, an event), so console lines spell out
control characters: no message can forge a line, move the cursor or recolour a terminal.
JSON escapes them by itself. Only the CLI calls `configure`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from eventsync.output import visible

# Third-party loggers that say too much at INFO; -v doesn't change them.
_QUIET = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "alembic": logging.WARNING,  # eventsync.migrate says what a migration did
    "apscheduler": logging.WARNING,
    "matplotlib": logging.WARNING,  # "generated new fontManager" on first use
    # "maximum number of running instances reached": the daemon catches up by itself.
    "apscheduler.scheduler": logging.ERROR,
    "waitress": logging.WARNING,
    # "Task queue depth is N": requests waiting for one of the status server's threads.
    "waitress.queue": logging.ERROR,
    "stamina": logging.ERROR,  # eventsync logs its own retry lines
}
_json = False


def _utc_time(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ConsoleFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: message`, controls spelled out; a traceback keeps its lines."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return visible(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return visible(super().formatStack(stack_info), keep="\n")


class Redacting(logging.Formatter):
    """Belt and braces: whatever a record holds (message, extra fields, traceback), the
    formatted line never carries the API key."""

    def __init__(self, inner: logging.Formatter, secret: str) -> None:
        super().__init__()
        self.inner = inner
        self.secret = secret

    def format(self, record: logging.LogRecord) -> str:
        return self.inner.format(record).replace(self.secret, "***")


def configure(
    log_format: Literal["console", "json"] = "console", *, verbose: bool = False, secret: str = ""
) -> None:
    """Send every record to stderr: INFO and up, or with `verbose` eventsync's DEBUG too."""
    global _json
    _json = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if _json:
        from pythonjsonlogger.json import JsonFormatter

        class UtcJson(JsonFormatter):
            def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
                return _utc_time(record)

        formatter = UtcJson(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    else:
        formatter = ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if len(secret) >= 8:  # a shorter "key" would garble ordinary words, and is no real key
        formatter = Redacting(formatter, secret)
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("eventsync").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)


def json_logging() -> bool:
    """Whether stderr carries JSON records, so that every line there must be one."""
    return _json
