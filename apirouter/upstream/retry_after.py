"""Reading an upstream's ``Retry-After`` (RFC 9110 §10.2.3): how long a 429 parks its scope."""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime

UNREADABLE_SECONDS = 1.0  # missing or unparseable: park briefly rather than not at all


def park_seconds(value: str | None, cap: float, now: float) -> float:
    """Seconds to park: delta-seconds or an HTTP-date (``now`` is Unix time), at most
    ``cap``; 1 s when missing or unreadable; 0 (no park) for a negative, NaN or infinite
    value or a date already past."""
    text = (value or "").strip()
    if not text:
        return UNREADABLE_SECONDS
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _until_date(text, now)
    if seconds is None:
        return UNREADABLE_SECONDS
    if not math.isfinite(seconds) or seconds < 0:
        return 0.0
    return min(seconds, cap)


def _until_date(text: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now
