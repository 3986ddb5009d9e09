"""The forward plan: what to send upstream for one client request. Pure functions, no I/O.

The body the client sent is forwarded byte for byte; only ``model`` changes, and only when
``modelMapping`` maps it (then the JSON is re-serialised with every other field intact).
The older router re-serialised bodies through strict structs and silently dropped
``tools``, ``response_format`` and multimodal content; we never do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from apirouter.config import HOP_BY_HOP, KEY_HEADERS, Endpoint, ProviderConfig
from apirouter.errors import BadRequest

# Never forwarded from the client: hop-by-hop and framing headers, the client's credentials
# (re-added below by precedence), cookies (one shared upstream account must not carry one
# user's cookies to another) and our own request id (we send ours).
_DROPPED_REQUEST_HEADERS = HOP_BY_HOP | set(KEY_HEADERS) | {"cookie", "x-request-id"}


@dataclass(frozen=True)
class Body:
    """A request body after validation: bytes to send, and what we learnt from it."""

    data: bytes
    model: str | None
    stream: bool


def upstream_url(config: ProviderConfig, endpoint: Endpoint, query: str) -> str:
    """Join baseUrl and the upstream path without dropping baseUrl's own path prefix."""
    url = config.base_url + endpoint.upstream_path
    return f"{url}?{query}" if query else url


def client_key(headers: Mapping[str, str]) -> str | None:
    """The API key the client presented, from ``Authorization: Bearer`` or ``x-api-key``."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


def upstream_headers(
    client_headers: Mapping[str, str],
    config: ProviderConfig,
    endpoint: Endpoint,
    upstream_key: str | None,
    request_id: str,
) -> dict[str, str]:
    """Merge headers: configured (endpoint over provider) > client's; then the key.

    ``upstream_key`` is the key chosen by precedence (client's, else DEFAULT_API_KEY); a
    key header set in the config wins over it. ``client_headers`` has lowercase names.
    """
    # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop too
    named = {token.strip().lower() for token in client_headers.get("connection", "").split(",")}
    dropped = _DROPPED_REQUEST_HEADERS | named
    merged = {k: v for k, v in client_headers.items() if k not in dropped}
    merged.setdefault("accept-encoding", "identity")
    for name, value in (*config.headers.items(), *endpoint.headers.items()):
        merged[name.lower()] = value
    configured_key = any(name in merged for name in KEY_HEADERS)
    if upstream_key and not configured_key:
        key_header = endpoint.key_header or config.key_header
        merged[key_header] = (
            f"Bearer {upstream_key}" if key_header == "authorization" else upstream_key
        )
    merged["x-request-id"] = request_id
    return merged


def json_body(raw: bytes, mapping: Mapping[str, str]) -> Body:
    """Validate a JSON request body and map its model; every other byte is untouched."""
    if not raw.strip():
        raise BadRequest("Request body is empty: send a JSON object with a 'model' field.")
    try:
        document = json.loads(raw.decode("utf-8"))  # RFC 8259: JSON on the wire is UTF-8
    except UnicodeDecodeError:
        raise BadRequest("Request body is not UTF-8 encoded JSON.") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"Request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
        ) from None
    if not isinstance(document, dict):
        raise BadRequest("Request body must be a JSON object.")
    model = document.get("model")
    if "model" not in document:
        raise BadRequest("Request body is missing the required 'model' field.")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string.")
    stream = document.get("stream") is True
    target = mapping.get(model)
    if target is None:
        return Body(raw, model, stream)
    document["model"] = target
    return Body(json.dumps(document, ensure_ascii=False).encode(), target, stream)


_MODEL_PART = re.compile(rb'content-disposition:[^\r\n]*\bname="model"', re.IGNORECASE)


def multipart_body(raw: bytes, content_type: str, mapping: Mapping[str, str]) -> Body:
    """Find the ``model`` form field of a multipart body and map it, byte-preserving."""
    boundary = _boundary(content_type)
    delimiter = b"--" + boundary.encode("latin-1")
    parts = raw.split(delimiter)
    if len(parts) < 3:
        raise BadRequest("Multipart body does not contain the boundary from Content-Type.")
    for index, part in enumerate(parts):
        head, separator, value = part.partition(b"\r\n\r\n")
        if not separator or not _MODEL_PART.search(head):
            continue
        model = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
        if not model:
            break
        target = mapping.get(model)
        if target is None:
            return Body(raw, model, False)
        parts[index] = head + separator + target.encode() + b"\r\n"
        return Body(delimiter.join(parts), target, False)
    raise BadRequest("Multipart body is missing the required 'model' form field.")


def _boundary(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary" and value.strip('"'):
            return value.strip('"')
    raise BadRequest("Content-Type multipart/form-data must carry a boundary parameter.")
