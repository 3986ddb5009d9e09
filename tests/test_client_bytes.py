"""Client bytes can never cause a 500: regressions for each known trigger, and a property
test over generated bodies, headers and paths, all through the real server over loopback.

Each of these once produced a 500 (and a Sentry ``internal_error`` any client could mint
at will): deep nesting, huge integers, a lone surrogate in a mapped body, non-ASCII header
values, an oversized URL. HEAD and Content-Length + Transfer-Encoding are protocol cases.
"""

from __future__ import annotations

import json
import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug import Request, Response

from apirouter.config.provider import load
from apirouter.proxy.app import MAX_URL_BYTES
from apirouter.proxy.forward import upstream_url

CHAT = "/v1/chat/completions"
OK = {"id": "c", "object": "chat.completion", "choices": []}


def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the router and read until it closes the connection."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def post_raw(url: str, body: bytes, headers: dict[bytes, bytes] | None = None) -> bytes:
    lines = [b"POST " + CHAT.encode() + b" HTTP/1.1", b"Host: router", b"Connection: close"]
    merged = {b"Content-Type": b"application/json", **(headers or {})}
    lines += [name + b": " + value for name, value in merged.items()]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return raw_exchange(url, b"\r\n".join(lines) + b"\r\n\r\n" + body)


@pytest.fixture
def echo_upstream(httpserver):
    """An upstream that records what it received and answers 200."""
    seen: list[Request] = []

    def handle(request: Request) -> Response:
        request.get_data()
        seen.append(request)
        return Response(json.dumps(OK), content_type="application/json")

    httpserver.expect_request(re.compile(".*")).respond_with_handler(handle)
    return seen


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested"),
        (b'{"model": "m", "n": ' + b"9" * 5000 + b"}", "too many digits"),
    ],
)
def test_bodies_python_cannot_parse_are_400_invalid_json(router, body, words):
    response = httpx.post(
        router.url + CHAT, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert words in response.json()["error"]["message"]


def test_mapped_model_is_spliced_without_touching_other_bytes(make_router, echo_upstream):
    router = make_router({"modelMapping": {"fast": "big-model"}})
    body = b'{"stream":false, "model" : "fast","x":"\\ud800 caf\xc3\xa9", "n": 1.0E+2}'
    response = httpx.post(
        router.url + CHAT, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert echo_upstream[-1].get_data() == body.replace(b'"fast"', b'"big-model"')


def test_non_ascii_header_values_reach_the_upstream_as_sent(router, echo_upstream):
    response = post_raw(
        router.url,
        b'{"model": "m"}',
        {b"X-Title": b"caf\xc3\xa9 \xff", b"Authorization": b"Bearer k\xc3\xa9y"},
    )
    assert status_of(response) == 200
    received = echo_upstream[-1]
    assert received.headers["X-Title"].encode("latin-1") == b"caf\xc3\xa9 \xff"
    assert received.headers["Authorization"].encode("latin-1") == b"Bearer k\xc3\xa9y"


def test_query_bytes_httpx_would_reject_are_percent_encoded():
    # waitress refuses such a request line itself ("Bad URI"), but other WSGI servers
    # (gunicorn) pass the raw bytes on, decoded as latin-1.
    config = load("generic")
    url = upstream_url(config.base_url, config.endpoints[CHAT], "a=\xe9\x7f&b=c d")
    assert url.endswith("/chat/completions?a=%E9%7F&b=c%20d")
    assert str(httpx.URL(url)) == url  # httpx accepts it as it is


def test_a_url_over_16_kib_gets_414(router):
    response = httpx.post(router.url + CHAT + "?q=" + "a" * MAX_URL_BYTES, json={"model": "m"})
    assert response.status_code == 414
    assert response.json()["error"]["code"] == "uri_too_long"


def test_head_gets_the_get_headers_and_no_body_keeping_the_connection_usable(router):
    request = (
        b"HEAD /health HTTP/1.1\r\nHost: r\r\n\r\n"
        b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: r\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    exchange = raw_exchange(router.url, request)
    responses = re.split(rb"(?=HTTP/1\.1 \d{3} )", exchange)[1:]
    assert [status_of(r) for r in responses] == [200, 405, 200]
    head, not_allowed, get = responses
    # no body after either HEAD answer: the next status line follows the blank line at once
    assert head.endswith(b"\r\n\r\n") and not_allowed.endswith(b"\r\n\r\n")
    assert b"application/json" in head and int(re.search(rb"Content-Length: (\d+)", head)[1]) > 0
    assert json.loads(get.partition(b"\r\n\r\n")[2])["status"] == "ok"


def test_content_length_with_transfer_encoding_is_400_and_closes_the_connection(router):
    smuggled = b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: r\r\n\r\n"
    request = (
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + smuggled
    )
    exchange = raw_exchange(router.url, request)  # returns only once the router closes
    assert exchange.count(b"HTTP/1.1 ") == 1  # the smuggled GET was never served
    assert status_of(exchange) == 400
    body = json.loads(exchange.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "bad_request"


# --- the property: no 500 from client input ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_bodies = st.one_of(
    st.builds(
        lambda model, extra, stream: json.dumps({"model": model, "stream": stream, **extra}),
        st.sampled_from(["fast", "m", ""]) | st.text(max_size=6),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        st.booleans() | json_values,
    ).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b'{"model": "fast", "x": "\\ud800"}', b'{"model": "fast"} trailing']),
)
header_bytes = st.binary(max_size=24).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\0") or b"x"
)
# Mostly well-formed requests with one hostile part, so that each hostile part reaches
# the code behind the parsers (model mapping, header forwarding, the upstream call).
paths = st.sampled_from([CHAT] * 6 + ["/v1/embeddings", "/v1/audio/transcriptions", "/health"]) | (
    st.binary(min_size=1, max_size=40)
    .map(lambda b: b"/" + bytes(c for c in b if c > 0x20 and c not in b"?#%"))
    .map(lambda b: b.decode("latin-1"))
)
content_types = (
    st.sampled_from([b"application/json"] * 4 + [b"text/plain", b"multipart/form-data; boundary=x"])
    | header_bytes
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["POST"] * 6 + ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
    path=paths,
    query=st.binary(max_size=20).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x23)),
    content_type=content_types,
    headers=st.dictionaries(
        st.sampled_from([b"Authorization", b"X-Title", b"X-Request-ID", b"X-Api-Key"]),
        header_bytes | header_bytes.map(lambda b: b"Bearer " + b),
        max_size=3,
    ),
    body=json_bodies,
)
def test_no_client_input_causes_a_500(
    make_router, echo_upstream, method, path, query, content_type, headers, body
):
    router = getattr(test_no_client_input_causes_a_500, "router", None)
    if router is None:  # one router for every example: building one per example is slow
        router = make_router({"modelMapping": {"fast": "big-model"}})
        test_no_client_input_causes_a_500.router = router
    target = path.encode("latin-1") + (b"?" + query if query else b"")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: r", b"Connection: close"]
    lines += [
        name + b": " + value for name, value in {b"Content-Type": content_type, **headers}.items()
    ]
    if method != "HEAD":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    response = raw_exchange(router.url, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    assert status_of(response) != 500, response[:600]


@pytest.mark.parametrize(
    "target", [b"/v1/files/ab\x01c", b"/v1/models/a\x7fb", b"/v1/files/a\tb/content"]
)
def test_control_bytes_in_a_path_id_are_400_not_500(router, target):
    response = raw_exchange(
        router.url, b"GET " + target + b" HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 400, response[:300]
    assert b"printable ASCII" in response
