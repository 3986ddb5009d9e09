"""``/v1/models``: the config's aliases, merged with the upstream's own list."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from apirouter import errors
from apirouter.config.provider import ProviderConfig
from apirouter.proxy.response import Response, json_response
from apirouter.upstream.client import iter_raw


def alias_model(alias: str, config: ProviderConfig) -> dict[str, Any]:
    """The model document for one alias of ``modelMapping``."""
    return {
        "id": alias,
        "object": "model",
        "created": 0,
        "owned_by": config.name,
        "target": config.model_mapping[alias],
    }


def list_models(config: ProviderConfig, fetch: Callable[[], Any]) -> Response:
    """The config's aliases first, then the upstream's own list (``fetch`` sends the
    request with the client's key). When the upstream cannot answer, the aliases alone."""
    aliases = [alias_model(alias, config) for alias in config.model_mapping]
    try:
        upstream_response = fetch()
        try:
            listed = json.loads(b"".join(iter_raw(upstream_response)))
        finally:
            upstream_response.close()
        theirs = listed["data"] if upstream_response.status_code == 200 else []
        if not isinstance(theirs, list):
            theirs = []
    except (errors.UpstreamFailure, ValueError, KeyError, TypeError, RecursionError):
        theirs = []
    known = {alias["id"] for alias in aliases}
    data = aliases + [m for m in theirs if isinstance(m, dict) and m.get("id") not in known]
    return json_response({"object": "list", "data": data})
