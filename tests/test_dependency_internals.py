"""The private names of httpx, httpcore, waitress and sentry-sdk that the router relies on
still exist in the installed versions, and only their one module per dependency reaches
them (see apirouter/private.py)."""

from __future__ import annotations

import ast
import pathlib
import socket
import time
from collections.abc import Iterator

import pytest
import sentry_sdk
import werkzeug
from waitress import wasyncore

from apirouter import private
from apirouter.observe import sentry_internals
from apirouter.server import waitress_internals
from apirouter.server.channel import build_server, close_server
from apirouter.upstream import httpcore_internals, httpx_internals
from apirouter.upstream.client import Upstream, WatchedTransport

PACKAGE = pathlib.Path(__file__).parent.parent / "apirouter"


def _chain(root: object, *attributes: str) -> Iterator[object]:
    """``root`` and each object reached from it through ``attributes``, while they exist."""
    yield root
    for attribute in attributes:
        root = getattr(root, attribute, None)
        if root is None:
            return
        yield root


@pytest.fixture
def live_upstream_objects(httpserver) -> Iterator[list[object]]:
    """The httpx and httpcore objects of one real request to a chunked upstream answer."""
    httpserver.expect_request("/chunked").respond_with_handler(
        lambda request: werkzeug.Response(iter([b"a", b"b"]))
    )
    transport = WatchedTransport(4)
    upstream = Upstream(5.0, 5.0, transport=transport)
    response = upstream.send("GET", httpserver.url_for("/chunked"), {}, b"")
    pool = httpx_internals.transport_pool(transport)
    try:
        objects = [transport, pool, *getattr(pool, "_requests", [])]
        objects += _chain(response.stream, "_stream", "_httpcore_stream", "_stream", "_connection")
        yield objects
    finally:
        response.close()
        upstream.close()


def test_httpx_private_names_exist(live_upstream_objects):
    missing = private.missing("httpx", httpx_internals.PRIVATE_NAMES, live_upstream_objects)
    assert not missing, "\n".join(missing)


def test_httpcore_private_names_exist(live_upstream_objects):
    missing = private.missing("httpcore", httpcore_internals.PRIVATE_NAMES, live_upstream_objects)
    assert not missing, "\n".join(missing)


def test_the_body_is_reachable_down_to_h11(live_upstream_objects):
    response_stream = live_upstream_objects[-1]
    assert response_stream.__class__.__name__ == "HTTP11Connection", (
        "httpx/httpcore changed the way from a response to its connection: "
        f"{[type(o).__name__ for o in live_upstream_objects]}"
    )


def test_waitress_private_names_exist():
    """On a live server, a connection it accepted, and that connection's request parser."""
    server = build_server(lambda e, s: [], "127.0.0.1", 0, 1, 10, 30.0, lambda: None)
    client = socket.create_connection(("127.0.0.1", server.effective_port))
    try:
        client.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nhal")
        sockets = waitress_internals.socket_map(server)
        deadline = time.monotonic() + 10
        while not any(getattr(d, "request", None) for d in list(sockets.values())):
            assert time.monotonic() < deadline, "the server never read the request head"
            wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        channel = next(d for d in sockets.values() if getattr(d, "request", None))
        live = [server, server.task_dispatcher, channel, channel.request]
        missing = private.missing("waitress", waitress_internals.PRIVATE_NAMES, live)
        assert not missing, "\n".join(missing)
    finally:
        client.close()
        close_server(server)


def test_sentry_sdk_private_names_exist():
    client = sentry_sdk.Client(dsn="http://public@127.0.0.1:9/1", default_integrations=False)
    try:
        missing = private.missing("sentry-sdk", sentry_internals.PRIVATE_NAMES, [client.transport])
        assert not missing, "\n".join(missing)
    finally:
        client.close(timeout=0)


# --- only the *_internals modules reach them -------------------------------------------------


INTERNALS = (httpx_internals, httpcore_internals, waitress_internals, sentry_internals)
DECLARED = {name.name for module in INTERNALS for name in module.PRIVATE_NAMES}
# CPython's own (not a dependency): LifoCondition wakes the newest waiter, as notify() does.
STANDARD_LIBRARY = {"_waiters", "_is_owned"}


def _outside_internals() -> list[pathlib.Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not p.name.endswith("_internals.py")]


def _own_private_names() -> set[str]:
    """Underscored names apirouter defines outside the internals modules (functions,
    classes, attributes it assigns), less the dependencies' names those modules declare."""
    names: set[str] = set()
    for path in _outside_internals():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            if isinstance(node, ast.ClassDef):  # class attributes and dataclass fields
                names |= {
                    target.id
                    for statement in node.body
                    if isinstance(statement, ast.Assign | ast.AnnAssign)
                    for target in (
                        statement.targets
                        if isinstance(statement, ast.Assign)
                        else [statement.target]
                    )
                    if isinstance(target, ast.Name)
                }
    return {n for n in names if n.startswith("_")} - DECLARED


def _foreign_private_uses(path: pathlib.Path, own: set[str]) -> list[str]:
    """Each attribute read or method defined in ``path`` with a dependency's private name."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.FunctionDef):
            name = node.name
        else:
            continue
        private_name = name.startswith("_") and not name.startswith("__")
        if private_name and name not in own and name not in STANDARD_LIBRARY:
            uses.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}")
    return uses


def test_private_names_of_dependencies_are_reached_only_in_their_module():
    own = _own_private_names()
    found = [use for path in _outside_internals() for use in _foreign_private_uses(path, own)]
    assert not found, "a dependency's private name reached outside its module:\n" + "\n".join(found)


def test_every_internals_module_documents_its_names():
    for module in INTERNALS:
        assert module.PRIVATE_NAMES, module.__name__
        assert module.__doc__ and "private names" in module.__doc__, module.__name__
