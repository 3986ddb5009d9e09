"""Pass-through (config/passthrough.py): what goes through, what never does, and how it is
labelled; and the Anthropic side of the router (its error shape, its key header)."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack

import anthropic
import httpx
import pytest
from harness import write_config
from test_routes import raw_request, record_all
from upstream_fakes import anthropic_stream, sse_response
from werkzeug import Request, Response

from apirouter.config import passthrough
from apirouter.config.provider import ConfigInvalid, parse
from apirouter.ops import diagnostics


def hits(httpserver, path: str) -> int:
    return sum(1 for request, _ in httpserver.log if request.path == path)


# --- what goes through ----------------------------------------------------------------------


def test_a_passed_through_post_answered_500_reaches_the_upstream_once(make_router, httpserver):
    """Two upstreams and retries on 5xx allowed: what a passed-through POST does upstream is
    unknown, so it is never sent again, and it stays on the first upstream."""
    httpserver.expect_request("/a/v1/fine_tuning/jobs").respond_with_data("boom", status=500)
    httpserver.expect_request("/b/v1/fine_tuning/jobs").respond_with_json({"id": "ftjob_2"})
    router = make_router(
        {
            "upstreams": [
                {"name": "a", "baseUrl": httpserver.url_for("/a/v1")},
                {"name": "b", "baseUrl": httpserver.url_for("/b/v1")},
            ],
            "retry": {"maxAttempts": 3, "retryOn": ["connect", "5xx", "429"]},
        }
    )
    response = httpx.post(router.v1 + "/fine_tuning/jobs", json={"model": "m"})
    assert response.status_code == 500
    assert hits(httpserver, "/a/v1/fine_tuning/jobs") == 1
    assert hits(httpserver, "/b/v1/fine_tuning/jobs") == 0
    assert router.sample(
        "apirouter_requests_total",
        {"route": "/v1/fine_tuning/*", "method": "POST", "status": "500"},
    )


def test_a_passed_through_request_never_reaches_a_fallback(make_router, httpserver, tmp_path):
    """The object lives with the account that created it: a fallback has never heard of it.
    A built-in completion route, from a second client, still falls back."""
    httpserver.expect_request("/main/v1/vector_stores").respond_with_data("down", status=503)
    httpserver.expect_request("/main/v1/chat/completions").respond_with_data("down", status=503)
    backup = record_all_under(httpserver, "/backup/")
    write_config(
        tmp_path / "backup.json", {"name": "backup", "baseUrl": httpserver.url_for("/backup/v1")}
    )
    router = make_router(
        {
            "baseUrl": httpserver.url_for("/main/v1"),
            "fallbacks": [{"config": "backup.json", "apiKeyEnv": "BACKUP_KEY"}],
        },
        environment={"BACKUP_KEY": "k"},
    )
    passed = httpx.post(router.v1 + "/vector_stores", json={"name": "kb"})
    assert passed.status_code == 503
    assert [r.path for r in backup] == []
    chat = httpx.post(router.v1 + "/chat/completions", json={"model": "m", "messages": []})
    assert chat.status_code == 200
    assert [r.path for r in backup] == ["/backup/v1/chat/completions"]


def record_all_under(httpserver, prefix: str) -> list[Request]:
    seen: list[Request] = []

    def handle(request: Request) -> Response:
        seen.append(request)
        return Response(json.dumps({"id": "x", "choices": []}), content_type="application/json")

    httpserver.expect_request(_Prefix(prefix)).respond_with_handler(handle)
    return seen


class _Prefix(str):
    """A pytest-httpserver URI matcher for every path under a prefix."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith(str(self))

    __hash__ = str.__hash__


@pytest.mark.parametrize(
    "path",
    [
        "/v1/organization/users",
        "/v1/organization/admin_api_keys?limit=5",
        "/v1/projects/proj_1/api_keys",
        "/v1/organizations/me",  # Anthropic's Admin API
        "/v1/x/..%2F..%2Forganization/users",
    ],
)
def test_admin_apis_are_never_passed_through(make_module_router, httpserver, path):
    router = make_module_router()
    seen = record_all(httpserver)
    status, _, body = raw_request(router, "GET", path, headers={"Authorization": "Bearer k"})
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "not_found"
    assert seen == []


def test_an_admin_path_a_template_names_is_served(make_router, httpserver):
    seen = record_all(httpserver)
    router = make_router({"endpoints": {"/v1/organization/users": {"methods": ["GET"]}}})
    assert httpx.get(router.v1 + "/organization/users?limit=2").status_code == 200
    assert [(r.path, r.query_string) for r in seen] == [("/v1/organization/users", b"limit=2")]
    assert httpx.get(router.v1 + "/organization/projects").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/v1/vector_stores//files",
        "/v1/vector_stores/%2e%2e/files",
        "/v1/vector_stores/%252e%252e/files",
        "/v1/vector_stores/..;/files",
        "/v1/vector_stores/vs_1;jsessionid=1/files",
        "/v1/vector_stores/vs_1/",
    ],
)
def test_steps_and_empty_segments_are_refused(make_module_router, httpserver, path):
    router = make_module_router()
    seen = record_all(httpserver)
    status, headers, body = raw_request(router, "GET", path)
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert seen == []


def test_a_list_of_families_lets_only_those_through(make_router, httpserver):
    seen = record_all(httpserver)
    router = make_router({"passthrough": ["vector_stores"]})
    assert httpx.get(router.v1 + "/vector_stores?limit=1").status_code == 200
    refused = httpx.post(router.v1 + "/fine_tuning/jobs", json={"model": "m"})
    assert refused.status_code == 404
    assert [r.path for r in seen] == ["/v1/vector_stores"]


def test_passthrough_false_answers_404(make_router, httpserver):
    seen = record_all(httpserver)
    router = make_router({"passthrough": False})
    assert httpx.get(router.v1 + "/vector_stores").status_code == 404
    assert httpx.get(router.v1 + "/files").status_code == 200  # a built-in route
    assert [r.path for r in seen] == ["/v1/files"]


def test_labels_stay_within_the_fixed_list(make_router, httpserver):
    record_all(httpserver)
    router = make_router()
    for n in range(200):
        family = ["vector_stores", "evals", f"made-up-{n}", f"Nope{n}"][n % 4]
        httpx.get(f"{router.v1}/{family}/obj_{n}/part_{n}")
    routes = {
        sample.labels["route"]
        for metric in router.app.metrics.registry.collect()
        if metric.name == "apirouter_requests"
        for sample in metric.samples
    }
    assert routes == {"/v1/vector_stores/*", "/v1/evals/*", "other"}
    assert routes - {"other"} <= {passthrough.label(f) for f in passthrough.FAMILIES}


def test_a_non_json_body_is_streamed_as_it_came(make_router, httpserver):
    """An octet stream of 3 MiB goes through unread (no 415) and arrives byte for byte."""
    received: list[bytes] = []

    def handle(request: Request) -> Response:
        received.append(request.get_data())
        return Response(json.dumps({"id": "x"}), content_type="application/json")

    httpserver.expect_request("/v1/containers/cntr_1/files").respond_with_handler(handle)
    router = make_router()
    payload = bytes(range(256)) * (12 * 1024)
    response = httpx.post(
        router.v1 + "/containers/cntr_1/files",
        content=payload,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert received == [payload]


def test_a_json_body_has_its_model_mapped(make_router, httpserver):
    seen = record_all(httpserver)
    router = make_router({"modelMapping": {"fast": "upstream-fast"}})
    body = {"model": "fast", "training_file": "file_1", "hyperparameters": {"n_epochs": 2}}
    assert httpx.post(router.v1 + "/fine_tuning/jobs", json=body).status_code == 200
    assert json.loads(seen[0].get_data()) == {**body, "model": "upstream-fast"}


def test_a_websocket_upgrade_gets_501_and_realtime_over_http_passes(make_module_router, httpserver):
    router = make_module_router()
    seen = record_all(httpserver)
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    refused = httpx.get(router.v1 + "/realtime?model=gpt-realtime", headers=upgrade)
    assert refused.status_code == 501
    for path in ("/realtime/client_secrets", "/realtime/sessions", "/realtime/calls"):
        assert httpx.post(router.v1 + path, json={}).status_code == 200
    assert [r.path for r in seen] == [
        "/v1/realtime/client_secrets",
        "/v1/realtime/sessions",
        "/v1/realtime/calls",
    ]


# --- config and check-config ------------------------------------------------------------------


def test_passthrough_setting_is_validated():
    with pytest.raises(ConfigInvalid) as caught:
        parse(json.dumps({"baseUrl": "https://a.example/v1", "passthrough": ["organization"]}), "t")
    assert [p.path for p in caught.value.problems] == ["$.passthrough"]
    assert "admin APIs are never passed through" in caught.value.problems[0].hint
    body_kinds = {"/v1/x": {"bodyKinds": ["json"], "requiresMultipart": True}}
    with pytest.raises(ConfigInvalid) as caught:
        parse(json.dumps({"baseUrl": "https://a.example/v1", "endpoints": body_kinds}), "t")
    assert "bodyKinds or requiresMultipart" in caught.value.problems[0].message


def test_older_configs_keep_requires_multipart():
    config = parse(
        json.dumps(
            {
                "baseUrl": "https://a.example/v1",
                "endpoints": {
                    "/v1/files": {"requiresMultipart": False},
                    "/v1/upload": {"requiresMultipart": True},
                },
            }
        ),
        "t",
    )
    assert config.endpoints["/v1/files"].body_kinds == {"json"}
    assert config.endpoints["/v1/upload"].body_kinds == {"multipart"}
    assert config.endpoints["/v1/images/edits"].body_kinds == {"json", "multipart"}


def test_check_config_says_what_passes_through_and_warns_about_operator_keys():
    from apirouter.config.settings import Settings

    config = parse(json.dumps({"baseUrl": "https://a.example/v1"}), "t")
    keyed = Settings.from_env({"DEFAULT_API_KEY": "sk-operator"})
    warned = {p.path for p in diagnostics.lint_config(config, keyed)}
    assert warned >= {"$.passthrough", '$.endpoints["/v1/models/{model}"]'}
    assert diagnostics.describe_passthrough(config).startswith("on: every /v1/ path")
    no_key = Settings.from_env({})
    assert not {p.path for p in diagnostics.lint_config(config, no_key)} & warned
    listed = parse(json.dumps({"baseUrl": "https://a.example/v1", "passthrough": ["files"]}), "t")
    assert "$.passthrough" not in {p.path for p in diagnostics.lint_config(listed, keyed)}
    assert diagnostics.describe_passthrough(listed) == "on for: files"


# --- the Anthropic side -----------------------------------------------------------------------


ANTHROPIC_KEY = "sk-ant-client"


def test_the_anthropic_sdk_raises_its_own_errors_for_the_routers(make_router, httpserver):
    router = make_router(
        {"streamConfig": {"heartbeatIntervalSecs": 3600}},
        client_keys=(ANTHROPIC_KEY,),
        rate_limit_rpm=60,
        rate_limit_burst=2,
        max_concurrent=1,
    )
    client = anthropic.Anthropic(base_url=router.url, api_key=ANTHROPIC_KEY, max_retries=0)
    message = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    stranger = anthropic.Anthropic(base_url=router.url, api_key="sk-ant-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        stranger.messages.create(**message)
    assert "x-api-key" in str(refused.value)
    assert refused.value.body["error"]["type"] == "authentication_error"

    release = threading.Event()

    def held() -> object:
        yield from list(anthropic_stream())[:1]
        release.wait(10)

    httpserver.expect_request("/v1/messages").respond_with_handler(lambda _: sse_response(held()))
    with ExitStack() as streams:
        streams.enter_context(client.messages.stream(**message))  # holds the only slot
        with pytest.raises(anthropic.InternalServerError) as full:
            client.messages.create(**message)
        release.set()
    assert full.value.status_code == 503
    assert "over_capacity" in str(full.value)
    httpserver.expect_request("/v1/messages/count_tokens").respond_with_json({"input_tokens": 3})
    for _ in range(2):  # the burst
        client.messages.count_tokens(model="claude", messages=message["messages"])
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model="claude", messages=message["messages"])
    assert limited.value.body["error"]["type"] == "rate_limit_error"


def test_the_shipped_anthropic_config_sends_x_api_key_everywhere(tmp_path, httpserver):
    """messages.batches, count_tokens, models.list and a beta files upload all arrive with
    x-api-key and no Authorization (Anthropic's API takes no Bearer API keys)."""
    from harness import serving

    from apirouter.config.provider import load, replace
    from apirouter.config.settings import Settings
    from apirouter.proxy.app import App

    shipped = load("anthropic")
    upstream = replace(shipped.upstreams[0], base_url=httpserver.url_for("/v1"))
    config = replace(shipped, upstreams=(upstream,))
    seen = record_all(httpserver)
    app = App(config, Settings.defaults(default_api_key="sk-ant-operator"))
    with serving(app) as url:
        client = anthropic.Anthropic(base_url=url, api_key="ignored", max_retries=0)
        client.messages.batches.create(
            requests=[
                {
                    "custom_id": "1",
                    "params": {"model": "claude", "max_tokens": 5, "messages": []},
                }
            ]
        )
        client.messages.count_tokens(model="claude", messages=[{"role": "user", "content": "x"}])
        client.models.list(limit=1)
        client.beta.files.upload(file=("notes.txt", b"hello", "text/plain"))
    assert [r.path for r in seen] == [
        "/v1/messages/batches",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/files",
    ]
    for request in seen:
        assert "authorization" not in {name.lower() for name, _ in request.headers.items()}
        assert request.headers["x-api-key"] in ("ignored", "sk-ant-operator")
