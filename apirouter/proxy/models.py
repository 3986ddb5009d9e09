"""``/v1/models``: the config's aliases, merged with the upstream's own list.

The upstream's answer is the truth, and the aliases are added to it only where that cannot
mislead: into an unparameterised list (a paged request, ``?limit=1``, is relayed unchanged
by the app, so SDKs page as they would straight against the provider), keeping every field
of the upstream's document besides ``data`` (Anthropic's ``has_more``, ``first_id``,
``last_id``). A 4xx (a refused key) goes back as it came. The aliases alone are served only
when the upstream could not answer (connection failure, timeout, 5xx, or a list that is
unreadable or over ``MAX_LIST_BYTES``), marked ``X-Apirouter-Partial: upstream-unavailable``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from typing import Any

import httpx

from apirouter import errors
from apirouter.config.headers import relayed_response_headers
from apirouter.config.provider import ProviderConfig
from apirouter.proxy.response import Response, json_response
from apirouter.upstream.client import iter_raw

log = logging.getLogger("apirouter.models")
MAX_LIST_BYTES = 8 * 1024 * 1024  # read (and decompressed) at most this much of the list
PARTIAL = ("X-Apirouter-Partial", "upstream-unavailable")


def alias_model(alias: str, config: ProviderConfig) -> dict[str, Any]:
    """The model document for one alias of ``modelMapping``."""
    return {
        "id": alias,
        "object": "model",
        "created": 0,
        "owned_by": config.name,
        "target": config.model_mapping[alias],
    }


def list_models(config: ProviderConfig, fetch: Callable[[], httpx.Response]) -> Response:
    """The config's aliases first, then the upstream's own list (``fetch`` sends the
    request with the key the client's request would carry)."""
    aliases = [alias_model(alias, config) for alias in config.model_mapping]
    try:
        upstream_response = fetch()
    except errors.UpstreamFailure:
        return _aliases_only(aliases)
    try:
        status = upstream_response.status_code
        raw = None if status >= 500 else _read(upstream_response)
    except errors.UpstreamFailure:
        raw = None
    finally:
        upstream_response.close()
    if raw is None:
        return _aliases_only(aliases)
    if status != 200:  # the upstream's refusal is the client's answer
        headers = relayed_response_headers(upstream_response.headers.raw)
        return Response(status, headers, bytes(raw))
    document = _document(raw, upstream_response.headers.get("content-encoding", ""))
    if document is None:
        return _aliases_only(aliases)
    known = {alias["id"] for alias in aliases}
    theirs = [m for m in document["data"] if isinstance(m, dict) and m.get("id") not in known]
    return json_response({**document, "data": aliases + theirs})


def _aliases_only(aliases: list[dict[str, Any]]) -> Response:
    response = json_response({"object": "list", "data": aliases})
    response.headers.append(PARTIAL)
    return response


def _read(response: httpx.Response) -> bytearray | None:
    """The body as sent, or None past ``MAX_LIST_BYTES`` (read no further)."""
    body = bytearray()
    for chunk in iter_raw(response):
        body += chunk
        if len(body) > MAX_LIST_BYTES:
            log.warning("the upstream's model list exceeds %d bytes: aliases alone", MAX_LIST_BYTES)
            return None
    return body


def _document(raw: bytearray, encoding: str) -> dict[str, Any] | None:
    """The upstream's list document (gzip or deflate decoded), or None if unreadable."""
    try:
        text = _decoded(raw, encoding.strip().lower())
        if text is None:
            return None
        document = json.loads(text)
    except (ValueError, RecursionError, zlib.error):
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        log.warning("the upstream's model list is unreadable: aliases alone")
        return None
    return document


def _decoded(raw: bytearray, encoding: str) -> bytes | bytearray | None:
    """Undo gzip or deflate, bounded at ``MAX_LIST_BYTES``; None when it would be larger."""
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"unknown content-encoding {encoding}")
    try:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
        text = inflater.decompress(raw, MAX_LIST_BYTES + 1)
    except zlib.error:
        if encoding != "deflate":
            raise
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # deflate sent raw, as some servers do
        text = inflater.decompress(raw, MAX_LIST_BYTES + 1)
    if len(text) > MAX_LIST_BYTES:
        log.warning("the upstream's model list exceeds %d bytes: aliases alone", MAX_LIST_BYTES)
        return None
    return text
