"""The forward plan's pure functions."""

from __future__ import annotations

from apirouter.config.provider import load
from apirouter.proxy.forward import upstream_headers


def test_hop_by_hop_headers_are_never_forwarded():
    config = load("openai")
    headers = upstream_headers(
        {
            "connection": "keep-alive, X-Hop",
            "x-hop": "1",
            "keep-alive": "timeout=5",
            "transfer-encoding": "chunked",
            "te": "trailers",
            "upgrade": "h2c",
            "host": "router",
            "x-end-to-end": "kept",
        },
        config,
        config.endpoints["/v1/chat/completions"],
        "sk-k",
        "rid",
    )
    assert headers == {
        "x-end-to-end": "kept",
        "accept-encoding": "identity",
        "authorization": "Bearer sk-k",
        "x-request-id": "rid",
    }
