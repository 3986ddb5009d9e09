"""Anonymized API keys: enough to tell keys apart, never enough to use one."""

from __future__ import annotations

import hashlib

ANONYMOUS = "anonymous"


def anonymize(key: str | None) -> str:
    """A short prefix (at most 8 characters and a quarter of the key) and a hash fingerprint.

    The fingerprint is stable, so one key's events group together in Sentry and logs; the
    prefix helps a person recognise the key kind (``sk-proj-``) without revealing it.
    """
    if not key:
        return ANONYMOUS
    prefix = key[: min(8, len(key) // 4)]
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{prefix}...{fingerprint}"
