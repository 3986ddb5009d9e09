"""Path templates: what check-config reports about them, and how requests are routed by
them over the real server (switching routes off, custom templates, dot segments, labels)."""

from __future__ import annotations

import http.client
import json
import re

import httpx
import pytest
from harness import write_config
from werkzeug import Request, Response

from apirouter.config.provider import ConfigInvalid, parse
from apirouter.ops import diagnostics

BASE = "https://x.example/v1"


def endpoint_problems(endpoints: dict) -> dict[str, str]:
    with pytest.raises(ConfigInvalid) as info:
        parse(json.dumps({"baseUrl": BASE, "endpoints": endpoints}), source="test.json")
    return {p.path: p.message for p in info.value.problems}


def test_template_problems_are_reported_with_json_paths():
    found = endpoint_problems(
        {
            "/v1/stores/{store}": {"upstreamPath": "/stores/{store}/{version}"},
            "/v1/files/{file_id}": {"methods": ["GET"]},
            "/v1/both": {"method": "GET", "methods": ["GET", "DELETE"]},
            "/v1/fetch": {"methods": ["GET", "FETCH"]},
            "/v1/x{id}": {},
            "/v1/open/{id": {},
            "/v1/twice/{id}/{id}": {},
            "/v1/dup": {"methods": ["GET", "get"]},
            "/v1/none": {"methods": []},
            "/v1/a/{x}/b": {},
            "/v1/a/{y}/b": {},
        }
    )
    whole_segment = "a placeholder must be a whole segment, like /v1/files/{id}/content"
    assert found == {
        '$.endpoints["/v1/stores/{store}"].upstreamPath': (
            "uses {version}, which /v1/stores/{store} does not have"
        ),
        '$.endpoints["/v1/files/{file_id}"]': "matches the same paths as /v1/files/{id}",
        '$.endpoints["/v1/both"]': "give method or methods, not both",
        '$.endpoints["/v1/fetch"].methods[1]': "must be one of: GET, POST, PUT, PATCH, DELETE",
        '$.endpoints["/v1/x{id}"]': whole_segment,
        '$.endpoints["/v1/open/{id"]': whole_segment,
        '$.endpoints["/v1/twice/{id}/{id}"]': "uses the same placeholder twice",
        '$.endpoints["/v1/dup"].methods': "lists a method twice",
        '$.endpoints["/v1/none"].methods': (
            "must be a non-empty array of: GET, POST, PUT, PATCH, DELETE"
        ),
        '$.endpoints["/v1/a/{y}/b"]': "matches the same paths as /v1/a/{x}/b",
    }


def test_upstream_path_placeholders_are_validated_like_templates():
    found = endpoint_problems({"/v1/stores/{store}": {"upstreamPath": "/stores/s{store}"}})
    assert found == {
        '$.endpoints["/v1/stores/{store}"].upstreamPath': (
            "a placeholder must be a whole segment, like /v1/files/{id}/content"
        )
    }


def test_check_config_reports_template_problems_with_their_paths(tmp_path):
    path = write_config(
        tmp_path / "routes.json",
        {
            "baseUrl": BASE,
            "endpoints": {
                "/v1/files/{file_id}": {},
                "/v1/jobs/{job}": {"upstreamPath": "/jobs/{id}", "method": "OPTIONS"},
            },
        },
    )
    report = diagnostics.check([str(path)], all_shipped=False, env={})
    [checked] = report.files
    assert not checked.ok
    assert [(p.path, p.message) for p in checked.problems] == [
        ('$.endpoints["/v1/files/{file_id}"]', "matches the same paths as /v1/files/{id}"),
        ('$.endpoints["/v1/jobs/{job}"].method', "must be one of: GET, POST, PUT, PATCH, DELETE"),
        (
            '$.endpoints["/v1/jobs/{job}"].upstreamPath',
            "uses {id}, which /v1/jobs/{job} does not have",
        ),
    ]
    assert checked.problems[0].hint == "use /v1/files/{id} to refine it"


def test_refining_a_built_in_route_keeps_its_template_and_defaults():
    config = parse(
        json.dumps(
            {
                "baseUrl": BASE,
                "endpoints": {
                    "/v1/files/{id}": {"methods": ["GET"]},
                    "/v1/batches": {"enabled": False},
                    "/v1/batches/{id}/cancel": {"enabled": True, "maxBodyBytes": 10},
                },
            }
        ),
        source="t",
    )
    files = config.endpoints["/v1/files/{id}"]
    assert (files.methods, files.upstream_path) == (("GET",), "/files/{id}")
    assert "/v1/batches" not in config.endpoints
    cancel = config.endpoints["/v1/batches/{id}/cancel"]
    assert (cancel.requires_model, cancel.max_body_bytes) == (False, 10)
    upload = config.endpoints["/v1/files"]
    assert (upload.max_body_bytes, upload.methods) == (512 * 1024 * 1024, ("POST", "GET"))


# --- routing over the real server ------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(make_module_router):
    """A default router for the tests that neither configure it nor count its metrics."""
    return make_module_router()


def raw_request(router, method, path, body=b"", headers=None):
    """Send the request target exactly as written (httpx would normalise dot segments)."""
    host, port = router.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def record_all(httpserver) -> list[Request]:
    """An upstream answering every request with JSON, recording what it received."""
    seen: list[Request] = []

    def handle(request: Request) -> Response:
        request.get_data(cache=True)
        seen.append(request)
        return Response(json.dumps({"ok": True}), content_type="application/json")

    httpserver.expect_request(re.compile(".*")).respond_with_handler(handle)
    return seen


def test_enabled_false_switches_a_built_in_route_off(make_router, httpserver):
    router = make_router(
        {"endpoints": {"/v1/files/{id}": {"enabled": False}, "/v1/batches": {"enabled": False}}}
    )
    seen = record_all(httpserver)
    off = httpx.get(router.url + "/v1/files/file-1")
    assert off.status_code == 404
    assert off.json()["error"]["code"] == "not_found"
    assert httpx.post(router.url + "/v1/batches", json={}).status_code == 404
    # the neighbours stay on
    assert httpx.get(router.url + "/v1/files/file-1/content").status_code == 200
    assert httpx.get(router.url + "/v1/batches/batch_1").status_code == 200
    assert [r.path for r in seen] == ["/v1/files/file-1/content", "/v1/batches/batch_1"]


def test_custom_template_route_fills_its_placeholders_into_the_upstream_path(
    make_router, httpserver
):
    router = make_router(
        {
            "endpoints": {
                "/v1/vector_stores/{store}/files/{file}": {
                    "methods": ["GET", "DELETE"],
                    "upstreamPath": "/stores/{store}/items/{file}",
                }
            }
        }
    )
    seen = record_all(httpserver)
    status, _, _ = raw_request(router, "GET", "/v1/vector_stores/vs_1/files/dir%2Ffile-2?limit=3")
    assert status == 200
    status, _, _ = raw_request(router, "DELETE", "/v1/vector_stores/vs_1/files/file-3")
    assert status == 200
    assert [(r.method, r.environ["REQUEST_URI"]) for r in seen] == [
        ("GET", "/v1/stores/vs_1/items/dir%2Ffile-2?limit=3"),
        ("DELETE", "/v1/stores/vs_1/items/file-3"),
    ]
    status, headers, _ = raw_request(router, "POST", "/v1/vector_stores/vs_1/files/file-3")
    assert (status, headers["allow"]) == (405, "GET, DELETE")
    route = "/v1/vector_stores/{store}/files/{file}"
    assert router.sample(
        "apirouter_requests_total", {"method": "GET", "route": route, "status": "200"}
    )


@pytest.mark.parametrize(
    ("method", "path", "placeholder"),
    [
        ("GET", "/v1/files/./content", "id"),
        ("GET", "/v1/files/../content", "id"),
        ("GET", "/v1/files/%2e%2e", "id"),
        ("DELETE", "/v1/files/%2E.", "id"),
        ("GET", "/v1/models/%2e", "model"),
        ("POST", "/v1/responses/.%2e/cancel", "id"),
        ("GET", "/v1/files/..%2F..%2Fadmin", "id"),
        ("GET", "/v1/models/org%2F..%2Fsecret", "model"),
        ("GET", "/v1/files//content", "id"),
        ("GET", "/v1/responses/", "id"),
        ("GET", "/v1/files/%252e%252e", "id"),  # '..' to an upstream that decodes twice
        ("GET", "/v1/files/%252E%252e%252Fadmin/content", "id"),
        ("GET", "/v1/models/org%252F..", "model"),
        ("GET", "/v1/files/..;/content", "id"),  # '..' to servers stripping ;parameters
        ("GET", "/v1/files/file-1;v=2", "id"),
        ("GET", "/v1/files/a%3Bb", "id"),
        ("GET", "/v1/files/a%2F%2Fb", "id"),  # an empty step between encoded slashes
    ],
)
def test_dot_and_empty_segments_are_refused_with_400(shared, httpserver, method, path, placeholder):
    seen = record_all(httpserver)
    status, headers, body = raw_request(shared, method, path)
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert f"{{{placeholder}}}" in error["message"]
    assert seen == []  # never sent upstream, where it could resolve as a path step


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files/abc#/content"),  # would reach the upstream as /v1/files/abc
        ("GET", "/v1/files/abc/content#x"),
        ("DELETE", "/v1/files/abc#"),
        ("GET", "/v1/files?limit=3#frag"),
        ("GET", "/health#x"),
    ],
)
def test_a_raw_hash_in_the_request_target_is_refused_with_400(shared, httpserver, method, path):
    seen = record_all(httpserver)
    status, headers, body = raw_request(shared, method, path)
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert (error["code"], set(error)) == ("bad_request", {"message", "type", "code"})
    assert "'#'" in error["message"]
    assert seen == []


def test_a_hash_gets_through_not_even_to_a_route_switched_off(make_router, httpserver):
    router = make_router({"endpoints": {"/v1/files/{id}": {"enabled": False}}})
    seen = record_all(httpserver)
    assert raw_request(router, "GET", "/v1/files/abc#/content")[0] == 400
    assert raw_request(router, "GET", "/v1/files/abc")[0] == 404
    assert seen == []


def test_dot_inside_an_id_is_an_ordinary_id(shared, httpserver):
    seen = record_all(httpserver)
    for path in ("/v1/files/file.v2", "/v1/files/..hidden", "/v1/files/%2e%2e%2e"):
        assert raw_request(shared, "GET", path)[0] == 200
    assert [r.environ["REQUEST_URI"] for r in seen] == [
        "/v1/files/file.v2",
        "/v1/files/..hidden",
        "/v1/files/%2e%2e%2e",
    ]


@pytest.mark.parametrize("path", ["/v1/realtime", "/v1/realtime?model=gpt-realtime"])
def test_realtime_is_501_with_an_explanation(shared, httpserver, path):
    seen = record_all(httpserver)
    response = httpx.get(
        shared.url + path,
        headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
    )
    assert response.status_code == 501
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == "not_implemented"
    assert "WebSockets" in error["message"] and "directly" in error["message"]
    assert seen == []


def test_metrics_route_label_is_the_template_never_the_id(router, httpserver):
    record_all(httpserver)
    for file_id in ("file-abc", "file-def"):
        assert httpx.get(f"{router.url}/v1/files/{file_id}").status_code == 200
    assert httpx.delete(router.url + "/v1/files/file-abc").status_code == 200
    assert httpx.get(router.url + "/v1/files/file-abc/content").status_code == 200
    assert raw_request(router, "GET", "/v1/files/..")[0] == 400
    text = httpx.get(router.url + "/metrics").text
    for line in (
        'apirouter_requests_total{method="GET",route="/v1/files/{id}",status="200"} 2.0',
        'apirouter_requests_total{method="DELETE",route="/v1/files/{id}",status="200"} 1.0',
        'apirouter_requests_total{method="GET",route="/v1/files/{id}/content",status="200"} 1.0',
        'apirouter_requests_total{method="GET",route="/v1/files/{id}",status="400"} 1.0',
        'apirouter_request_duration_seconds_count{route="/v1/files/{id}"} 4.0',
    ):
        assert line in text
    assert "file-abc" not in text and "file-def" not in text


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_get_or_delete_body_is_never_forwarded(shared, httpserver, method):
    seen = record_all(httpserver)
    host, port = shared.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        body = b'{"model": "m", "smuggled": true}'
        connection.request(
            method, "/v1/files/file-1", body=body, headers={"Content-Type": "application/json"}
        )
        first = connection.getresponse()
        assert first.status == 200
        first.read()
        # the unread body did not desynchronise the connection: the next request is parsed
        connection.request("GET", "/v1/files/file-2")
        second = connection.getresponse()
        assert second.status == 200
        second.read()
    finally:
        connection.close()
    assert [(r.method, r.path) for r in seen] == [
        (method, "/v1/files/file-1"),
        ("GET", "/v1/files/file-2"),
    ]
    sent = seen[0]
    assert sent.get_data() == b""
    assert "Content-Type" not in sent.headers
    assert sent.headers.get("Content-Length", "0") == "0"
