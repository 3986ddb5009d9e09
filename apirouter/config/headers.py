"""Header policy: which headers cross the router, in which direction, and why.

Every rule about header names lives here, each set named for what it is, so the config
validator, the forward plan and the response relay cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# RFC 9110 §7.6.1 hop-by-hop headers: they describe one connection, not the message, so a
# proxy must never forward them (waitress also answers 500 if an app returns one).
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)

# Set by the HTTP client for the upstream connection: Host names the upstream, not us, and
# Content-Length describes the body we send, which may differ from the client's (model
# rewritten). A provider config may set neither these nor the hop-by-hop ones.
SET_BY_CLIENT_LIBRARY = frozenset(("host", "content-length"))

# Where an API key can travel; the one the upstream receives is chosen by precedence.
KEY_HEADERS = ("authorization", "x-api-key", "api-key")

# Never forwarded from the client: the above, the client's credentials (re-added by
# precedence), cookies (one shared upstream account must not carry one user's cookies to
# another) and the request id (we send ours).
DROPPED_REQUEST_HEADERS = (
    HOP_BY_HOP | SET_BY_CLIENT_LIBRARY | set(KEY_HEADERS) | {"cookie", "x-request-id"}
)

# Also dropped where the operator's key goes instead of the client's (a fallback provider,
# an upstream with its own apiKeyEnv): every other header a client's credential or account
# choice travels in. The client's key must never reach another provider's account, and its
# organization or project names would not exist there. (Every ``keyHeader`` a config may
# name is one of KEY_HEADERS, so those are dropped too.)
CLIENT_CREDENTIALS = frozenset(
    (
        *KEY_HEADERS,
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "proxy-authorization",
        "cookie",
        "openai-organization",
        "openai-project",
    )
)

DROPPED_FOR_OPERATOR_KEY = DROPPED_REQUEST_HEADERS | CLIENT_CREDENTIALS

# Never relayed from the upstream: hop-by-hop (waitress frames the response itself),
# Content-Length (we set the one we send), cookies (the upstream account's, not the
# client's), the upstream's request id (relayed renamed, see below), and the router's own
# headers, which only the router sets (an upstream's would otherwise come first).
ROUTER_HEADERS = frozenset(("x-apirouter-upstream", "x-apirouter-partial"))
DROPPED_RESPONSE_HEADERS = (
    HOP_BY_HOP | ROUTER_HEADERS | {"content-length", "set-cookie", "x-request-id"}
)
UPSTREAM_REQUEST_ID = "X-Upstream-Request-ID"


def named_in_connection(headers: Mapping[str, str]) -> set[str]:
    """RFC 9110 §7.6.1: headers named in ``Connection`` are hop-by-hop for this message."""
    return {token.strip().lower() for token in headers.get("connection", "").split(",")}


def relayed_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The upstream's response headers the client may see, in their original order."""
    pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
    connection = ",".join(value for name, value in pairs if name.lower() == "connection")
    dropped = DROPPED_RESPONSE_HEADERS | named_in_connection({"connection": connection})
    relayed = []
    for name, value in pairs:
        lowered = name.lower()
        if lowered == "x-request-id":
            relayed.append((UPSTREAM_REQUEST_ID, value))
        elif lowered not in dropped:
            relayed.append((name, value))
    return relayed
