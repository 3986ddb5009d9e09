"""Stateful or stateless: the one decision that says where a request may go, and how often.

A *stateless* request creates nothing that outlives its answer, so sending it twice costs
tokens at most: it is load-balanced across healthy upstreams and may be retried (on another
target) after the upstream answered. Everything else is *stateful*: the object it creates,
reads or changes lives with the account of one upstream, so it goes to the provider's first
upstream, never to another upstream or a fallback, and is retried only when nothing reached
the upstream (connect, DNS or TLS failure). A second ``POST /v1/files`` after a 5xx would
be a second, billed file.

``is_stateful`` is the only place this is decided, and it is decided before the first
target is chosen. Routes added later (pass-through paths among them) are classified here
and nowhere else: whatever is not listed as stateless is stateful.
"""

from __future__ import annotations

from apirouter.proxy.inbound import Body

# POST creates that store nothing (unless their body says otherwise, see is_stateful).
STATELESS_CREATES = frozenset(
    (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/moderations",
    )
)
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"  # stores by default: stateless only with "store": false


def is_stateful(method: str, route: str, body: Body | None) -> bool:
    """True unless ``route`` (a route template, or a pass-through path's label) is a
    stateless create and ``body`` keeps it one. ``body`` None: not read (a pass-through
    body, say), so nothing can show the request to be stateless.

    A body naming ``previous_response_id`` or ``conversation`` continues an object that
    lives with one account; ``"store": true`` on chat completions stores the completion;
    a Responses create stores unless it says ``"store": false``.
    """
    if method != "POST" or body is None or body.pinned:
        return True
    if route == RESPONSES:
        return body.store is not False
    if route == CHAT and body.store is True:
        return True
    return route not in STATELESS_CREATES
