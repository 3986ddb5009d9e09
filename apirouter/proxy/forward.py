"""The forward plan: where one client request goes upstream and with which headers.

Pure functions, no I/O. The body is settled by ``apirouter.proxy.inbound`` (only ``model`` is
ever rewritten); this module decides the URL and the merged headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from apirouter.config.headers import (
    DROPPED_FOR_OPERATOR_KEY,
    DROPPED_REQUEST_HEADERS,
    KEY_HEADERS,
    named_in_connection,
)
from apirouter.config.provider import Endpoint, ProviderConfig
from apirouter.config.routes import fill

# Printable ASCII passes through as the client wrote it; anything else is percent-encoded
# from the client's own bytes, so no client query can make an invalid upstream URL.
_QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def upstream_url(
    base_url: str, endpoint: Endpoint, query: str, params: Mapping[str, str] | None = None
) -> str:
    """Join baseUrl and the upstream path (placeholders filled with the raw segments the
    client sent) without dropping baseUrl's own path prefix."""
    path = fill(endpoint.upstream_path, params) if params else endpoint.upstream_path
    url = base_url + path
    if not query:
        return url
    if not query.isprintable() or not query.isascii() or " " in query:
        query = quote(query.encode("latin-1"), safe=_QUERY_SAFE)
    return f"{url}?{query}"


def upstream_headers(
    client_headers: Mapping[str, str],
    config: ProviderConfig,
    endpoint: Endpoint,
    upstream_key: str | None,
    request_id: str,
    content_type: str | None = None,
    operator_key: bool = False,
) -> dict[str, str]:
    """Merge headers: configured (endpoint over provider) > client's; then the key.

    ``upstream_key`` is the key chosen by precedence (client's, else DEFAULT_API_KEY); a
    key header set in the config wins over it. ``client_headers`` has lowercase names.
    ``content_type`` is the body's own: it beats a configured one, because configs written
    for the older router set ``Content-Type: application/json`` on every route, which would
    label a multipart upload as JSON. No body, no Content-Type. ``operator_key``: the
    request goes out on the operator's own key (a fallback provider, an upstream with its
    own ``apiKeyEnv``), so no client credential of any kind goes with it.
    """
    dropped = DROPPED_FOR_OPERATOR_KEY if operator_key else DROPPED_REQUEST_HEADERS
    dropped = dropped | named_in_connection(client_headers)
    merged = {k: v for k, v in client_headers.items() if k not in dropped}
    merged.setdefault("accept-encoding", "identity")
    for name, value in (*config.headers.items(), *endpoint.headers.items()):
        merged[name.lower()] = value
    configured_key = any(name in merged for name in KEY_HEADERS)
    if upstream_key and not configured_key:
        key_header = endpoint.key_header
        merged[key_header] = (
            f"Bearer {upstream_key}" if key_header == "authorization" else upstream_key
        )
    merged.pop("content-type", None)
    if content_type:
        merged["content-type"] = content_type
    merged["x-request-id"] = request_id
    return merged
