"""The embedded server: sizing, slow clients, keep-alive after streams, the admin listener."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import httpx
import pytest
from clocks import wait_until
from harness import running
from upstream_fakes import chat_stream, sse_response

from apirouter.config.settings import Settings
from apirouter.server import channel
from apirouter.server import runner as server

CHAT = "/v1/chat/completions"


def test_sizing_follows_capacity_within_the_open_files_limit():
    sizing = server.size_for(1024, None, 20000)
    assert sizing.threads == 1024 + server.SPARE_THREADS
    assert sizing.connection_limit == 2048
    small = server.size_for(1024, None, 1024)  # each busy request also needs an upstream socket
    assert small.connection_limit == max(1024 - server.RESERVED_FILES - 1024, 16)
    assert "open files 1024" in small.describe()
    assert server.size_for(10, 64, 20000).threads == 64  # --threads wins when given


def test_serve_options_override_the_environment():
    settings = Settings.from_env({"APIROUTER_MAX_CONCURRENT": "5"})
    assert server.with_options(settings, None, None) == settings
    changed = server.with_options(settings, 7, 0)
    assert (changed.max_concurrent, changed.admin_port) == (7, 0)


def test_overdue_allows_time_for_bodies_in_proportion_to_their_size():
    assert not channel.overdue(None, 0, 1000.0, 1.0)  # nothing arriving
    assert not channel.overdue(10.0, 0, 10.9, 1.0)
    assert channel.overdue(10.0, 0, 11.1, 1.0)
    assert not channel.overdue(10.0, 10 * channel.BODY_ALLOWANCE_BYTES, 20.0, 1.0)


def read_until_closed(connection: socket.socket, timeout: float = 10.0) -> bytes:
    connection.settimeout(timeout)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_slow_headers_get_408_and_the_connection_is_closed(make_router):
    router = make_router(header_timeout=0.3)
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        answer = read_until_closed(slow)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"code": "request_timeout"' in answer
    wait_until(
        lambda: router.sample("apirouter_requests_refused_total", {"reason": "header_timeout"})
    )


def test_a_connection_that_never_sends_a_byte_is_closed_too(make_router):
    router = make_router(header_timeout=0.3)
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as silent:
        assert read_until_closed(silent).startswith(b"HTTP/1.1 408")


def test_prompt_clients_are_not_timed_out_between_requests(make_router, httpserver):
    """The clock runs only while a request is arriving, not on an idle keep-alive."""
    router = make_router(header_timeout=0.3)
    httpserver.expect_request(CHAT).respond_with_json({"ok": True})
    with httpx.Client() as client:
        assert client.post(router.url + CHAT, json={"model": "m"}).status_code == 200
        deadline = time.monotonic() + 1.0
        wait_until(lambda: time.monotonic() > deadline, timeout=2)  # idle past the timeout
        assert client.post(router.url + CHAT, json={"model": "m"}).status_code == 200
    assert router.sample("apirouter_requests_refused_total", {"reason": "header_timeout"}) == 0


def test_connection_stays_open_after_a_stream(router, httpserver):
    """waitress closes after every response without Content-Length; streams keep it."""
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda _: sse_response(chat_stream(["a", "b"]))
    )
    host, port = router.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    sockets = []
    for _ in range(2):
        connection.request(
            "POST", CHAT, b'{"model": "m", "stream": true}', {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.read().endswith(b"data: [DONE]\n\n")
        assert response.getheader("Connection") is None
        sockets.append(connection.sock)
    assert sockets[0] is sockets[1] and sockets[0] is not None
    connection.request(
        "POST",
        CHAT,
        b'{"model": "m", "stream": true}',
        {"Connection": "close", "Content-Type": "application/json"},
    )
    assert connection.getresponse().getheader("Connection") == "close"
    connection.close()


@pytest.fixture
def app_with_admin(make_router):
    return make_router(admin_port=0).app  # the app; each test serves it on its own server


def test_admin_listener_answers_probes_while_every_worker_is_busy(app_with_admin, httpserver):
    busy = threading.Event()
    release = threading.Event()

    def stall(request):
        busy.set()
        release.wait(10)
        return sse_response([b"data: [DONE]\n\n"])

    httpserver.expect_request(CHAT).respond_with_handler(stall)
    with running(app_with_admin, threads=1) as (http_server, _):
        main = channel.listen_urls(http_server)[0]
        admin = http_server.admin.url
        worker = threading.Thread(
            target=httpx.post, args=(main + CHAT,), kwargs={"json": {"model": "m"}, "timeout": 10}
        )
        worker.start()
        assert busy.wait(10)  # the only worker thread is held by the upstream call
        try:
            assert httpx.get(admin + "/health", timeout=5).json()["status"] == "ok"
            assert httpx.get(admin + "/health/ready", timeout=5).status_code == 200
            assert (
                b"apirouter_streams_in_flight" in httpx.get(admin + "/metrics", timeout=5).content
            )
            assert httpx.post(admin + CHAT, json={"model": "m"}, timeout=5).status_code == 404
        finally:
            release.set()
            worker.join(10)
    assert any(line.startswith("admin") for line in server.banner_lines(http_server))


def test_shutdown_turns_ready_to_503_while_a_stream_finishes(app_with_admin, httpserver):
    release = threading.Event()

    def held():
        yield b"data: 1\n\n"
        release.wait(10)
        yield b"data: [DONE]\n\n"

    httpserver.expect_request(CHAT).respond_with_response(sse_response(held()))
    with running(app_with_admin) as (http_server, stopping):
        main = channel.listen_urls(http_server)[0]
        admin = http_server.admin.url
        with httpx.stream(
            "POST", main + CHAT, json={"model": "m", "stream": True}, timeout=10
        ) as response:
            chunks = response.iter_raw()
            assert next(chunks) == b"data: 1\n\n"
            assert httpx.get(admin + "/health/ready").status_code == 200
            stopping.set()  # what SIGTERM does
            wait_until(lambda: httpx.get(admin + "/health/ready").status_code == 503)
            release.set()
            assert b"".join(chunks) == b"data: [DONE]\n\n"  # the stream in flight finished


def test_a_response_larger_than_the_output_watermark_is_not_left_hanging():
    """A worker that must wait for the unsent bytes to drain below the watermark is woken
    by the main loop, which must keep polling the socket meanwhile (it once did not: any
    response written in pieces faster than the client read them hung for good)."""
    piece, count = b"x" * 65536, 512

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(piece) * count))])
        return (piece for _ in range(count))

    http_server = channel.build_server(
        app, "127.0.0.1", 0, 2, 10, 30.0, lambda: None, outbuf_high_watermark=65536
    )
    port = int(http_server.effective_port)
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    try:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a slow-ish reader
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.sock = client
        connection.request("GET", "/")
        response = connection.getresponse()
        received = 0
        while chunk := response.read(65536):
            received += len(chunk)
        assert received == len(piece) * count
        connection.close()
    finally:
        channel.close_server(http_server)
        thread.join(timeout=5)


def test_waitress_body_limit_stays_above_every_route_limit(tmp_path):
    from apirouter.config.provider import load_file

    path = tmp_path / "p.json"
    path.write_text(
        '{"name": "p", "baseUrl": "http://127.0.0.1:9/v1",'
        ' "endpoints": {"/v1/files": {"maxBodyBytes": 900000000}}}'
    )
    config = load_file(path)
    assert server.body_backstop(32 * 1024 * 1024, config) == 900_000_000 * 2 + 1024 * 1024
    assert server.body_backstop(2_000_000_000, config) == 4_000_000_000 + 1024 * 1024


def test_metrics_can_leave_the_main_port_for_the_admin_port(make_router):
    moved = make_router(admin_port=0, metrics_on_main_port=False).app
    with running(moved) as (http_server, _):
        main = channel.listen_urls(http_server)[0]
        hidden = httpx.get(main + "/metrics", timeout=5)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        assert httpx.get(main + "/health", timeout=5).status_code == 200
        admin = httpx.get(http_server.admin.url + "/metrics", timeout=5)
        assert admin.status_code == 200 and b"apirouter_build_info" in admin.content
    kept = make_router(admin_port=0).app  # the default: existing scrapers keep working
    with running(kept) as (http_server, _):
        main = channel.listen_urls(http_server)[0]
        assert httpx.get(main + "/metrics", timeout=5).status_code == 200
    alone = make_router(metrics_on_main_port=False)  # no admin port: nowhere else to go
    assert httpx.get(alone.url + "/metrics", timeout=5).status_code == 200
