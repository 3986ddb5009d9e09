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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}Z {record.levelname:<7} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("apirouter")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
