"""Redis URLs: offline syntax check, and a masked form that is safe to print.

Kept apart from ``redis_state`` so that settings and ``check-config`` can judge a URL
without importing redis-py (without ``APIROUTER_REDIS_URL`` nothing Redis-related loads).
The URL is a secret: it may carry a password. Errors never quote it; ``masked`` drops the
password (and a lone user name, which may be a password written as ``redis://pw@host``)
and the query string.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

SCHEMES = ("redis", "rediss", "unix")


def check(url: str) -> None:
    """Raise ValueError (without the URL in the message) unless the syntax is usable."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            "must start with redis://, rediss:// (TLS) or unix://, e.g. redis://127.0.0.1:6379/0"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
        return
    if port == 0:
        raise ValueError("port must be from 1 to 65535")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("the path must be a database number, e.g. /0")
    for value in parse_qs(parts.query).get("db", []):
        if not value.isdigit():
            raise ValueError("db= must be a database number")


def masked(url: str) -> str:
    """The URL with its credentials masked and its query dropped: safe for logs and output."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    credentials = ""
    if parts.password is not None:
        credentials = f"{parts.username}:***@" if parts.username else ":***@"
    elif parts.username:
        credentials = "***@"
    return f"{parts.scheme}://{credentials}{host}{port}{parts.path}"
