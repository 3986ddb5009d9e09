"""Bad input, routing, rate limiting and the router's own endpoints."""

from __future__ import annotations

import http.client
import io
import json
import logging

import httpx
import pytest
from upstream_fakes import CHAT_COMPLETION

from apirouter import __version__
from apirouter.observe import logs

CHAT = "/v1/chat/completions"


def raw_request(router, method, path, body=b"", headers=None):
    """A request with exactly the given headers (httpx would fix up bad ones)."""
    host, port = router.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


def assert_openai_error(response, status, code, words):
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "code"}
    assert words.lower() in error["message"].lower()


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "words"),
    [
        (b"", "application/json", 400, "bad_request", "empty"),
        (b"{not json", "application/json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "bad_request", "must be a JSON object"),
        (
            b'{"messages": []}',
            "application/json",
            400,
            "bad_request",
            "missing the required 'model'",
        ),
        (b'{"model": 42}', "application/json", 400, "bad_request", "non-empty string"),
        (b'{"model": ""}', "application/json", 400, "bad_request", "non-empty string"),
        (b'{"model": "m"}', "text/plain", 415, "unsupported_media_type", "application/json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json", "UTF-8"),
    ],
)
def test_bad_json_bodies_get_openai_errors(
    router, httpserver, content, content_type, status, code, words
):
    response = httpx.post(
        router.url + CHAT, content=content, headers={"Content-Type": content_type}
    )
    assert_openai_error(response, status, code, words)
    assert len(httpserver.log) == 0  # nothing reached the upstream


def test_body_over_limit_is_413(make_router, httpserver):
    router = make_router(max_body_bytes=100)
    response = httpx.post(router.url + CHAT, json={"model": "m", "pad": "x" * 200})
    assert_openai_error(response, 413, "payload_too_large", "exceeds the limit of 100 bytes")


def test_invalid_content_length_is_400(router):
    status, _, _ = raw_request(
        router, "POST", CHAT, b"{}", {"Content-Type": "application/json", "Content-Length": "-5"}
    )
    assert status == 400


def test_multipart_route_needs_multipart_and_a_model(router):
    response = httpx.post(router.url + "/v1/audio/transcriptions", json={"model": "m"})
    assert_openai_error(response, 415, "unsupported_media_type", "multipart/form-data")
    response = httpx.post(
        router.url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"x")}, data={"x": "1"}
    )
    assert_openai_error(response, 400, "bad_request", "'model' form field")


def test_stream_on_endpoint_without_stream_support_is_400(router):
    response = httpx.post(router.url + "/v1/embeddings", json={"model": "m", "stream": True})
    assert_openai_error(response, 400, "bad_request", "Streaming is not supported")


def test_unknown_route_is_404_and_wrong_method_is_405(router):
    response = httpx.get(router.url + "/v2/nope")
    assert_openai_error(response, 404, "not_found", "unknown path")
    response = httpx.put(router.url + CHAT)
    assert_openai_error(response, 405, "method_not_allowed", "use POST or GET")
    assert response.headers["Allow"] == "POST, GET"
    response = httpx.post(router.url + "/health")
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"


def test_rate_limit_429_with_retry_after(make_router, httpserver):
    now = [1000.0]
    router = make_router({"rateLimit": {"requestsPerMinute": 60, "burst": 2}}, clock=lambda: now[0])
    httpserver.expect_request(CHAT).respond_with_json(CHAT_COMPLETION)
    key_a = {"Authorization": "Bearer key-a"}
    assert [
        httpx.post(router.url + CHAT, json={"model": "m"}, headers=key_a).status_code
        for _ in range(3)
    ] == [200, 200, 429]
    limited = httpx.post(router.url + CHAT, json={"model": "m"}, headers=key_a)
    assert_openai_error(limited, 429, "rate_limited", "60 requests/minute")
    assert limited.headers["Retry-After"] == "1"
    other_key = httpx.post(
        router.url + CHAT, json={"model": "m"}, headers={"Authorization": "Bearer key-b"}
    )
    assert other_key.status_code == 200  # buckets are per client key
    now[0] += 1.0
    assert httpx.post(router.url + CHAT, json={"model": "m"}, headers=key_a).status_code == 200
    assert len(httpserver.log) == 4


def test_endpoint_rate_limit_beats_provider_and_env(make_router, httpserver):
    router = make_router(
        {
            "rateLimit": {"requestsPerMinute": 600, "burst": 100},
            "endpoints": {"/v1/embeddings": {"rateLimit": {"requestsPerMinute": 1, "burst": 1}}},
        },
        rate_limit_rpm=1000,
        rate_limit_burst=1000,
    )
    httpserver.expect_request("/v1/embeddings").respond_with_json({"data": []})
    codes = [
        httpx.post(router.url + "/v1/embeddings", json={"model": "e"}).status_code for _ in range(2)
    ]
    assert codes == [200, 429]
    limited = httpx.post(router.url + "/v1/embeddings", json={"model": "e"})
    assert limited.headers["Retry-After"] == "60"


def test_health(router):
    health = httpx.get(router.url + "/health").json()
    assert health["status"] == "ok"
    assert health["provider"] == "testprov"
    assert health["version"] == __version__
    assert health["uptime_seconds"] >= 0
    assert health["rate_limiter"] == {"buckets": 0}
    assert health["sentry"] == {"state": "off", "last_accepted": None}


def test_models_come_from_the_config(make_router):
    router = make_router({"modelMapping": {"gpt-4o": "qwen-plus", "small": "qwen-turbo"}})
    models = httpx.get(router.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["target"], m["owned_by"]) for m in models["data"]] == [
        ("gpt-4o", "qwen-plus", "testprov"),
        ("small", "qwen-turbo", "testprov"),
    ]


def test_metrics_exposition(router, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(CHAT_COMPLETION)
    httpx.post(router.url + CHAT, json={"model": "m"})
    httpx.get(router.url + "/does-not-exist-1")
    httpx.get(router.url + "/does-not-exist-2")
    response = httpx.get(router.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert (
        'apirouter_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0'
        in text
    )
    assert 'apirouter_requests_total{method="GET",route="other",status="404"} 2.0' in text
    assert "does-not-exist" not in text  # raw paths never become labels
    assert (
        'apirouter_request_duration_seconds_bucket{le="600.0",route="/v1/chat/completions"} 1.0'
        in text
    )
    assert 'apirouter_upstream_duration_seconds_count{provider="testprov"} 1.0' in text
    assert f'apirouter_build_info{{version="{__version__}"}} 1.0' in text
    assert "apirouter_requests_in_flight 1.0" in text  # this very request
    assert "apirouter_rate_limiter_buckets 0.0" in text


def test_access_log_line(router, httpserver, log_lines):
    httpserver.expect_request(CHAT).respond_with_json(CHAT_COMPLETION)
    httpx.post(
        router.url + CHAT,
        json={"model": "m"},
        headers={"Authorization": "Bearer sk-secret-key-abcdefghijklmnop", "X-Request-ID": "req-1"},
    )
    line = next(line for line in log_lines if "apirouter.access" in line)
    for field in (
        "request_id=req-1",
        "method=POST",
        f"route={CHAT}",
        "status=200",
        "provider=testprov",
        "latency_ms=",
        "upstream_ms=",
        "client_key=sk-secr...",
    ):
        assert field in line, line
    assert "sk-secret-key-abcdefghijklmnop" not in "\n".join(log_lines)


def test_json_access_log(router, httpserver, log_lines):
    logs.setup("json", stream=io.StringIO())
    stream = logging.getLogger("apirouter").handlers[0].stream
    httpserver.expect_request(CHAT).respond_with_json(CHAT_COMPLETION, status=503)
    httpx.post(router.url + CHAT, json={"model": "m"}, headers={"X-Request-ID": "req-json"})
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = next(r for r in records if r["logger"] == "apirouter.access")
    assert access["request_id"] == "req-json"
    assert access["status"] == 503
    assert access["level"] == "error"
    assert access["error_type"] == "upstream_5xx"


def test_log_lines_carry_the_second_they_were_written_in_and_quote_only_what_needs_it():
    """The formatters render a second's time stamp once and reuse it: a record of the next
    second, or of an earlier one, must still carry its own."""
    formatter = logs.TextFormatter()
    fields = {"status": 200, "latency_ms": 1.5, "model": None, "error_type": "a b", "key": ""}

    def line(created: float) -> str:
        record = logging.LogRecord("apirouter.access", logging.INFO, "", 0, "request", (), None)
        record.created, record.fields = created, fields
        return formatter.format(record)

    first, same, later, earlier = line(0.2), line(0.9), line(1.1), line(0.5)
    assert first.startswith("1970-01-01T00:00:00Z INFO    apirouter.access request ")
    assert same.startswith("1970-01-01T00:00:00Z") and earlier.startswith("1970-01-01T00:00:00Z")
    assert later.startswith("1970-01-01T00:00:01Z")
    assert first.endswith(' status=200 latency_ms=1.5 model=- error_type="a b" key=""')
    record = logging.LogRecord("apirouter.access", logging.INFO, "", 0, "request", (), None)
    record.created, record.msecs = 61.25, 250
    assert json.loads(logs.JsonFormatter().format(record))["time"] == "1970-01-01T00:01:01.250Z"
