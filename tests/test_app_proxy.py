"""The proxy's behaviour over a real socket: forwarding, streaming, errors, limits."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from clocks import wait_until
from upstream_fakes import CHAT_COMPLETION, chat_chunk, chat_stream, sse_response
from werkzeug import Request, Response

from apirouter.ops.firedrill import refused_base_url
from apirouter.proxy.relay import HEARTBEAT

CHAT = "/v1/chat/completions"


def capture(httpserver, path=CHAT, body=CHAT_COMPLETION, status=200, headers=None):
    """Answer `path` with JSON and record each request the upstream received."""
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(
            json.dumps(body), status=status, headers=headers, content_type="application/json"
        )

    httpserver.expect_request(path).respond_with_handler(handler)
    return seen


def post(router, payload, path=CHAT, **kwargs):
    return httpx.post(router.url + path, json=payload, timeout=10, **kwargs)


def test_unknown_fields_pass_through_untouched_and_model_is_mapped(make_router, httpserver):
    router = make_router({"modelMapping": {"fast": "upstream-fast-model"}})
    seen = capture(httpserver)
    payload = {
        "model": "fast",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "top_p": 0.25,
        "x_vendor_field": {"nested": [1, 2.5, None]},
    }
    response = post(router, payload)
    assert response.status_code == 200
    forwarded = json.loads(seen[0].get_data())
    assert forwarded == {**payload, "model": "upstream-fast-model"}
    assert list(forwarded) == list(payload)  # field order kept too


def test_unmapped_body_is_forwarded_byte_for_byte(router, httpserver):
    seen = capture(httpserver)
    raw = b'{"model":"m",  "temperature": 1.0e0, "messages":[]}'
    response = httpx.post(
        router.url + CHAT, content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert seen[0].get_data() == raw


def test_header_precedence_and_request_id(make_router, httpserver):
    router = make_router({"headers": {"X-Org": "configured"}}, default_api_key="sk-operator")
    seen = capture(httpserver)
    response = post(
        router,
        {"model": "m"},
        headers={
            "Authorization": "Bearer sk-client",
            "X-Org": "client",
            "X-Other": "kept",
            "Cookie": "session=1",
            "X-Request-ID": "client-id-123",
        },
    )
    upstream = seen[0].headers
    assert upstream["Authorization"] == "Bearer sk-client"  # client's key beats the default
    assert upstream["X-Org"] == "configured"  # configured header beats the client's
    assert upstream["X-Other"] == "kept"
    assert "Cookie" not in upstream
    assert upstream["X-Request-ID"] == "client-id-123"
    assert response.headers["X-Request-ID"] == "client-id-123"

    post(router, {"model": "m"})  # anonymous: the operator's default key is used
    assert seen[1].headers["Authorization"] == "Bearer sk-operator"


def test_configured_key_header_wins(make_router, httpserver):
    router = make_router({"headers": {"Authorization": "Bearer sk-configured"}})
    seen = capture(httpserver)
    post(router, {"model": "m"}, headers={"Authorization": "Bearer sk-client"})
    assert seen[0].headers["Authorization"] == "Bearer sk-configured"


def test_client_keys_close_the_open_relay(make_router, httpserver):
    router = make_router(client_keys=("inbound-1",), default_api_key="sk-operator")
    seen = capture(httpserver)
    denied = post(router, {"model": "m"})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    wrong = post(router, {"model": "m"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    allowed = post(router, {"model": "m"}, headers={"Authorization": "Bearer inbound-1"})
    assert allowed.status_code == 200
    assert len(seen) == 1
    assert seen[0].headers["Authorization"] == "Bearer sk-operator"  # inbound key not forwarded


def test_generated_request_id_when_client_sends_an_insane_one(router, httpserver):
    seen = capture(httpserver)
    response = post(router, {"model": "m"}, headers={"X-Request-ID": "bad id\twith spaces"})
    generated = response.headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert seen[0].headers["X-Request-ID"] == generated


def test_upstream_request_id_is_kept_under_another_name(router, httpserver):
    capture(httpserver, headers={"X-Request-ID": "upstream-req-9"})
    response = post(router, {"model": "m"}, headers={"X-Request-ID": "mine"})
    assert response.headers["X-Request-ID"] == "mine"
    assert response.headers["X-Upstream-Request-ID"] == "upstream-req-9"


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 503])
def test_upstream_status_and_body_pass_through(router, httpserver, status):
    body = {"error": {"message": f"upstream said {status}"}}
    capture(httpserver, body=body, status=status, headers={"Retry-After": "3"})
    response = post(router, {"model": "m"})
    assert response.status_code == status
    assert response.json() == body
    assert response.headers["Retry-After"] == "3"


def test_streamed_request_with_upstream_error_is_not_wrapped_in_200(router, httpserver):
    capture(httpserver, body={"error": {"message": "bad"}}, status=400)
    response = post(router, {"model": "m", "stream": True})
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "bad"}}


def test_sse_is_relayed_byte_for_byte(router, httpserver):
    events = list(chat_stream(["a", "b"]))
    httpserver.expect_request(CHAT).respond_with_response(sse_response(events))
    with httpx.stream("POST", router.url + CHAT, json={"model": "m", "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_raw())
    assert body == b"".join(events)


def test_heartbeats_during_upstream_silence(make_router, httpserver):
    router = make_router({"streamConfig": {"heartbeatIntervalSecs": 0.05}})
    release = threading.Event()

    def slow_stream():
        yield chat_chunk("first")
        release.wait(10)
        yield b"data: [DONE]\n\n"

    httpserver.expect_request(CHAT).respond_with_response(sse_response(slow_stream()))
    received = b""
    with httpx.stream("POST", router.url + CHAT, json={"model": "m", "stream": True}) as response:
        for chunk in response.iter_raw():
            received += chunk
            if HEARTBEAT in received:
                release.set()
    assert HEARTBEAT in received
    assert received.replace(HEARTBEAT, b"") == chat_chunk("first") + b"data: [DONE]\n\n"
    frames = received.split(b"\n\n")[:-1]  # a heartbeat never lands inside an event
    assert all(f == b": heartbeat" or f.startswith(b"data: ") for f in frames), frames


def test_client_disconnect_mid_stream_releases_the_upstream(make_router, httpserver):
    router = make_router()
    upstream_closed = threading.Event()

    def endless():
        try:
            for n in range(100_000):
                yield chat_chunk(f"token{n}")
                upstream_closed.wait(0.002)
        finally:
            upstream_closed.set()

    httpserver.expect_request(CHAT).respond_with_response(sse_response(endless()))
    with httpx.stream("POST", router.url + CHAT, json={"model": "m", "stream": True}) as response:
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    assert upstream_closed.wait(10), "the router kept reading from the upstream"
    wait_until(
        lambda: (
            router.sample(
                "apirouter_client_disconnects_total",
                {"route": CHAT, "reason": "client_disconnected"},
            )
            == 1
        )
    )
    assert router.sample("apirouter_requests_in_flight") == 0


def test_upstream_refusing_connections_gives_502(make_router):
    router = make_router({"baseUrl": refused_base_url()})
    response = post(router, {"model": "m"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_connect_error"
    assert "127.0.0.1" in error["message"]


def test_upstream_dns_failure_gives_502(make_router):
    router = make_router({"baseUrl": "http://nonexistent.invalid/v1"})
    response = post(router, {"model": "m"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_dns_error"


def test_upstream_timeout_gives_504(make_router, httpserver):
    router = make_router(read_timeout=0.2)
    release = threading.Event()

    def stall(request: Request) -> Response:
        release.wait(5)
        return Response("{}", content_type="application/json")

    httpserver.expect_request(CHAT).respond_with_handler(stall)
    response = post(router, {"model": "m"})
    release.set()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_base_url_path_prefix_is_kept(make_router, httpserver):
    router = make_router({"baseUrl": httpserver.url_for("/compatible-mode/v1")})
    seen = capture(httpserver, path="/compatible-mode/v1/chat/completions")
    assert post(router, {"model": "m"}).status_code == 200
    assert post(router, {"model": "m", "stream": True}).status_code == 200
    assert len(seen) == 2


def test_query_string_is_forwarded(router, httpserver):
    seen = capture(httpserver)
    httpx.post(router.url + CHAT + "?api-version=2024-01-01", json={"model": "m"})
    assert seen[0].args["api-version"] == "2024-01-01"


def test_each_sse_event_is_relayed_before_the_next_one_exists(make_router, httpserver):
    """No buffering anywhere: the upstream sends its second event only after the client has
    received the first (a buffering relay would deadlock here and time out)."""
    router = make_router({"streamConfig": {"heartbeatIntervalSecs": 3600}})
    first_received = threading.Event()

    def lockstep():
        yield chat_chunk("one")
        assert first_received.wait(10)
        yield b"data: [DONE]\n\n"

    httpserver.expect_request(CHAT).respond_with_response(sse_response(lockstep()))
    with httpx.stream(
        "POST", router.url + CHAT, json={"model": "m", "stream": True}, timeout=5
    ) as response:
        chunks = response.iter_raw()
        assert next(chunks) == chat_chunk("one")
        first_received.set()
        assert b"".join(chunks) == b"data: [DONE]\n\n"


def test_tls_failure_gives_502(make_router, httpserver):
    # https:// to a plain-http server: the TLS handshake fails
    router = make_router({"baseUrl": f"https://127.0.0.1:{httpserver.port}/v1"})
    response = post(router, {"model": "m"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_tls_error"


def cutting_upstream(head: bytes) -> tuple[str, threading.Thread, socket.socket]:
    """An upstream that sends ``head`` (status, headers, part of a body) and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(head)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", thread, listener


def test_a_small_answer_cut_short_gives_502(make_router):
    """An answer of known, small length is read whole before it goes out: a cut one is a
    clean 502 (the client has received nothing yet)."""
    base_url, thread, listener = cutting_upstream(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a'
    )
    router = make_router({"baseUrl": base_url, "retry": {"maxAttempts": 1}})
    response = post(router, {"model": "m"})
    thread.join(5)
    listener.close()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_protocol_error"


def test_a_large_answer_cut_short_of_its_content_length_reaches_the_client_incomplete(
    make_router,
):
    """A large answer is relayed as it arrives, so a cut cannot become a 502: the client
    gets the 200 it was sent, then a connection closed short of Content-Length, and the
    router records an upstream failure."""
    base_url, thread, listener = cutting_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"x" * 5000
    )
    router = make_router({"baseUrl": base_url, "retry": {"maxAttempts": 1}})
    with httpx.stream("POST", router.url + CHAT, json={"model": "m"}) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == "1000000"
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    thread.join(5)
    listener.close()
    labels = {"provider": "testprov", "error_type": "upstream_stream_cut"}
    wait_until(lambda: router.sample("apirouter_upstream_errors_total", labels) == 1)


def test_a_stream_cut_mid_event_ends_without_its_terminating_chunk(make_router):
    event = b'data: {"choices": []}\n\n'
    half = b'data: {"h'
    base_url, thread, listener = cutting_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(event), event)
        + b"%x\r\n%s" % (len(half) + 20, half)  # half an event, then the upstream hangs up
    )
    router = make_router({"baseUrl": base_url, "retry": {"maxAttempts": 1}})
    raw = raw_post(router.url, CHAT, b'{"model": "m", "stream": true}')
    thread.join(5)
    listener.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b'data: {"h' in raw  # what arrived was relayed...
    assert not raw.endswith(b"0\r\n\r\n")  # ...but the response never claims to be whole
    labels = {"provider": "testprov", "error_type": "upstream_stream_cut"}
    wait_until(lambda: router.sample("apirouter_upstream_errors_total", labels) == 1)


def test_a_stream_silent_past_the_read_timeout_ends_as_upstream_timeout(make_router, httpserver):
    router = make_router({"retry": {"maxAttempts": 1}}, read_timeout=0.3)
    release = threading.Event()

    def silent_after_one_event(request: Request) -> Response:
        def events() -> Iterator[bytes]:
            yield b'data: {"choices": []}\n\n'
            release.wait(10)  # silent far past the read timeout

        return Response(events(), content_type="text/event-stream")

    httpserver.expect_request(CHAT).respond_with_handler(silent_after_one_event)
    try:
        raw = raw_post(router.url, CHAT, b'{"model": "m", "stream": true}')
    finally:
        release.set()
    assert raw.startswith(b"HTTP/1.1 200 ") and b'data: {"choices": []}' in raw
    assert not raw.endswith(b"0\r\n\r\n")  # the client can tell it is incomplete
    timeouts = {"provider": "testprov", "error_type": "upstream_timeout"}
    wait_until(lambda: router.sample("apirouter_upstream_errors_total", timeouts) == 1)
    cuts = {"provider": "testprov", "error_type": "upstream_stream_cut"}
    assert router.sample("apirouter_upstream_errors_total", cuts) == 0


def raw_post(url: str, path: str, body: bytes) -> bytes:
    """POST over a raw socket and read until the router closes: the exact bytes it sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: r\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def test_sse_responses_tell_proxies_not_to_buffer(router, httpserver):
    """Exactly one Cache-Control and one X-Accel-Buffering, whatever the upstream sent
    (llama.cpp sends its own X-Accel-Buffering); JSON answers get neither added."""
    response = sse_response(chat_stream(["a"]))
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "yes"
    httpserver.expect_request(CHAT, json={"model": "m", "stream": True}).respond_with_response(
        response
    )
    capture(httpserver)
    with httpx.stream("POST", router.url + CHAT, json={"model": "m", "stream": True}) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers.get_list("cache-control") == ["no-cache"]
        assert streamed.headers.get_list("x-accel-buffering") == ["no"]
        assert b"".join(streamed.iter_raw()).endswith(b"data: [DONE]\n\n")
    plain = post(router, {"model": "m"})
    assert plain.status_code == 200
    assert "x-accel-buffering" not in plain.headers


# --- configs written for the older router ------------------------------------------------------

OLD_STYLE = {
    "headers": {"Content-Type": "application/json"},
    "modelMapping": {"whisper-1": "upstream-whisper"},
    "endpoints": {
        "/v1/audio/transcriptions": {
            "upstreamPath": "/audio/transcriptions",
            "method": "POST",
            "requiresMultipart": True,
            "headers": {"Content-Type": "application/json"},
        }
    },
}


def record_content_types(httpserver, path, method="POST"):
    seen: list[tuple[str | None, bytes, dict]] = []

    def handle(request: Request) -> Response:
        body = request.get_data(cache=True)
        seen.append((request.headers.get("Content-Type"), body, dict(request.form)))
        return Response(json.dumps({"text": "ok"}), content_type="application/json")

    httpserver.expect_request(path, method=method).respond_with_handler(handle)
    return seen


def test_old_style_content_type_never_relabels_a_multipart_upload(make_router, httpserver):
    router = make_router(OLD_STYLE)
    seen = record_content_types(httpserver, "/v1/audio/transcriptions")
    boundary = "----client-boundary-7MA4YWxkTrZu0gW"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="model"\r\n\r\n'
        "whisper-1\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
        "RIFF-fake-audio\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    response = httpx.post(
        router.url + "/v1/audio/transcriptions",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200
    [(content_type, _, form)] = seen
    assert content_type == f"multipart/form-data; boundary={boundary}"
    assert form == {"model": "upstream-whisper"}  # the upstream could parse it as multipart


def test_old_style_config_json_routes_send_json_and_empty_bodies_send_none(make_router, httpserver):
    router = make_router(OLD_STYLE)
    chat = record_content_types(httpserver, CHAT)
    cancel = record_content_types(httpserver, "/v1/batches/batch_1/cancel")
    listed = record_content_types(httpserver, "/v1/files", method="GET")
    payload = b'{"model": "m", "messages": []}'
    vendor_json = {"Content-Type": "application/vnd.example+json"}
    assert httpx.post(router.url + CHAT, content=payload, headers=vendor_json).status_code == 200
    assert httpx.post(router.url + "/v1/batches/batch_1/cancel").status_code == 200
    assert httpx.get(router.url + "/v1/files").status_code == 200
    assert chat == [("application/json", payload, {})]
    assert cancel == [(None, b"", {})]
    assert listed == [(None, b"", {})]


def test_an_upstream_cookie_never_reaches_the_next_request(make_router, httpserver):
    """The upstream client is shared by every user: a cookie one answer sets must not ride
    along with anybody's next request."""
    seen = []

    def upstream(request: Request) -> Response:
        seen.append(request.headers.get("Cookie"))
        response = Response(json.dumps(CHAT_COMPLETION), content_type="application/json")
        response.set_cookie("session", "user-one")
        return response

    httpserver.expect_request(CHAT).respond_with_handler(upstream)
    router = make_router()
    first, second = post(router, {"model": "m"}), post(router, {"model": "m"})
    assert first.status_code == second.status_code == 200
    assert seen == [None, None]
