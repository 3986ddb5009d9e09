"""Path templates: which configured route a request path belongs to.

A template such as ``/v1/files/{id}/content`` has literal segments and placeholders; a
placeholder matches one *raw* path segment (an empty one, ``.`` or ``..`` even after a
second decode, or one holding ``;``, is refused with a 400). Matching runs on the request
URI as the client sent it, not on the percent-decoded path: model ids may contain ``/``
(the openai SDK sends ``gpt%2F4``), and decoding first would split them into two
segments. The raw value is what goes into the upstream path, so the upstream sees the id
exactly as the client wrote it.

The template, never the concrete path, is the route label in metrics, logs and Sentry, so
ids cannot explode label cardinality.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

from apirouter import errors

# What a route leads to (``provider.Endpoint``): generic, so that templates know nothing
# of the provider config that is built on them.
E = TypeVar("E")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)


def shape(template: str) -> str:
    """Templates with the same shape match the same paths: ``/v1/files/{}``."""
    return PLACEHOLDER.sub("{}", template)


def fill(template: str, params: Mapping[str, str]) -> str:
    """Put raw segment values into a template (the upstream path)."""
    return PLACEHOLDER.sub(lambda m: params[m.group(1)], template)


@dataclass(frozen=True)
class Match(Generic[E]):
    endpoint: E
    params: Mapping[str, str]  # raw (still percent-encoded) segment values


class RouteTable(Generic[E]):
    """Exact paths by dictionary lookup; templates by one regular expression each."""

    def __init__(self, endpoints: Mapping[str, E]) -> None:
        self._exact = {t: e for t, e in endpoints.items() if not placeholders(t)}
        self._templates = [
            (_compile(template), endpoint)
            for template, endpoint in endpoints.items()
            if placeholders(template)
        ]

    def match(self, raw_path: str) -> Match[E] | None:
        endpoint = self._exact.get(raw_path)
        if endpoint is not None:
            return Match(endpoint, {})
        for pattern, endpoint in self._templates:
            found = pattern.fullmatch(raw_path)
            if found:
                return Match(endpoint, found.groupdict())
        return None


def _compile(template: str) -> re.Pattern[str]:
    parts = PLACEHOLDER.split(template)
    # split() alternates literal text and placeholder names
    regex = "".join(
        # an empty segment matches too, so that check_segments answers 400, not 404
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]*)"
        for index, part in enumerate(parts)
    )
    return re.compile(regex)


def check_segments(params: Mapping[str, str]) -> None:
    """Refuse ids an upstream could resolve as path steps: the raw value goes upstream.

    Each id is decoded *twice* and split at (encoded) slashes and backslashes, because an
    upstream or a proxy before it may decode once more than we do: ``%252e%252e`` is
    ``..`` there, and ``..%2F..%2Fadmin`` walks out of the route, carrying our key. A piece
    that is empty, ``.`` or ``..``, or an id holding ``;`` (``..;`` is ``..`` to servers
    that strip path parameters) is a 400.
    """
    for name, value in params.items():
        if not value:
            raise errors.BadRequest(f"Path segment {{{name}}} must not be empty.")
        if not (value.isascii() and value.isprintable()):  # the raw segment goes upstream
            raise errors.BadRequest(
                f"Path segment {{{name}}} must be printable ASCII; percent-encode other bytes."
            )
        decoded = unquote(unquote(value))
        if ";" in decoded:
            raise errors.BadRequest(f"Path segment {{{name}}} must not contain ';'.")
        if any(step in ("", ".", "..") for step in decoded.replace("\\", "/").split("/")):
            raise errors.BadRequest(
                f"Path segment {{{name}}} must not be '.' or '..', nor contain them or an "
                "empty step between slashes."
            )


def check_target(environ: Mapping[str, Any]) -> None:
    """Refuse a raw ``#`` in the request target (RFC 9112 allows no fragment there).

    Sent on upstream, it would cut the upstream path at the ``#``: ``/v1/files/abc#/content``
    matches the ``/content`` route but reaches the upstream as ``/v1/files/abc``.
    """
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI") or ""
    if "#" in uri:
        raise errors.BadRequest("The request target must not contain '#'; percent-encode it.")


def raw_path(environ: Mapping[str, Any]) -> str:
    """The path as the client sent it: waitress's REQUEST_URI, gunicorn's RAW_URI, or
    (other servers) the decoded path re-encoded."""
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if uri:
        return target_path(uri)
    return quote((environ.get("PATH_INFO") or "/").encode("latin-1"), safe="/:@!$&'()*+,;=-._~")


def target_path(uri: str) -> str:
    """The raw path of a request target (origin form ``/a?b``, or absolute form)."""
    path = uri.partition("?")[0]
    if path.startswith("/"):
        return path
    return "/" + path.split("/", 3)[-1] if "://" in path else "/"
