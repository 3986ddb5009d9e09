"""Logging set-up: one line per request, as text (default) or JSON (``LOG_FORMAT=json``).

Structured fields travel in ``extra={"fields": {...}}`` so both formats render the same data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

access_log = logging.getLogger("apirouter.access")
alert_log = logging.getLogger("apirouter.alerts")


class _Stamped(logging.Formatter):
    """A formatter that renders each second's UTC time stamp once: every request writes a
    line, and ``strftime`` was a tenth of a line's cost."""

    _last: tuple[int, str] = (-1, "")

    def stamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        last = self._last  # one read: another thread may replace it meanwhile
        if last[0] != second:
            last = self._last = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return last[1]


class TextFormatter(_Stamped):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.stamp(record)}Z {record.levelname:<7} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if value.__class__ is int or value.__class__ is float:  # never quoted
        return str(value)
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


class JsonFormatter(_Stamped):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": f"{self.stamp(record)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def setup(log_format: str, level: str = "info", stream: Any = None) -> None:
    """Route apirouter's logs to stderr in the chosen format and level (idempotent).

    ``level="warning"`` drops the per-request access lines (INFO) but keeps alerts,
    failed reloads and errors."""
    # no record needs the process id or the multiprocessing name: not asking for them
    # spares a getpid() system call per line (logging's documented switches)
    logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("apirouter")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
