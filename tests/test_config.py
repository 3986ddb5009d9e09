"""Provider config loading, validation and hot reload."""

from __future__ import annotations

import json
import logging
import os

import httpx
import pytest
from harness import write_config
from upstream_fakes import CHAT_COMPLETION
from werkzeug import Request, Response

from apirouter.config.provider import (
    ConfigInvalid,
    ConfigStore,
    load,
    load_file,
    parse,
    shipped_providers,
)

SHIPPED = [
    "anthropic",
    "cohere",
    "gemini",
    "generic",
    "ollama-cloud",
    "ollama-local",
    "openai",
    "qwen",
]


def problems_of(document) -> dict[str, str]:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(ConfigInvalid) as info:
        parse(text, source="test.json")
    return {p.path: p.message for p in info.value.problems}


def test_every_provider_is_shipped_and_loads():
    assert shipped_providers() == SHIPPED
    for name in SHIPPED:
        config = load(name)
        assert config.name == name
        assert config.base_url.startswith(("https://", "http://localhost", "http://127.0.0.1"))
        assert "/v1/chat/completions" in config.endpoints


def test_shipped_base_urls_are_openai_compatible_endpoints():
    assert load("qwen").base_url == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
    assert load("gemini").base_url == "https://generativelanguage.googleapis.com/v1beta/openai"
    assert load("cohere").base_url == "https://api.cohere.ai/compatibility/v1"
    anthropic = load("anthropic")
    # Anthropic's API takes its key as x-api-key on every route, pass-through included
    assert {e.key_header for e in anthropic.endpoints.values()} == {"x-api-key"}
    assert anthropic.passthrough_endpoint.key_header == "x-api-key"


def test_default_provider_is_qwen():
    assert load(None).name == "qwen"


def test_unknown_provider_lists_the_valid_names():
    with pytest.raises(ConfigInvalid) as info:
        load("qwne")
    problem = info.value.problems[0]
    assert "unknown provider 'qwne'" in problem.message
    assert "qwen" in problem.hint and "openai" in problem.hint


def test_every_problem_is_reported_with_its_path():
    found = problems_of(
        {
            "baseUrl": "ftp://example.com",
            "headers": {"X-Bad": "a\r\nInjected: yes", "Connection": "close", "X-Num": 5},
            "modelMapping": {"a": 3},
            "endpoints": {
                "/v1/chat/completions": {"method": "FETCH", "streamConfig": {"bufferSize": 0}},
                "no-slash": {},
                "/v1/x": {"rateLimit": {"requestsPerMinute": -1, "burst": 1}, "bogus": True},
            },
            "rateLimit": {"requestsPerMinute": 10},
            "streamConfig": {"heartbeatIntervalSecs": "30"},
            "port": 70000,
            "unknownTop": 1,
        }
    )
    assert found == {
        "$.baseUrl": "must be an http:// or https:// URL",
        '$.headers["X-Bad"]': "value must not contain CR, LF or NUL",
        "$.headers.Connection": "is a hop-by-hop header and cannot be configured",
        '$.headers["X-Num"]': "value must be a string, not a number",
        "$.modelMapping.a": "must be a non-empty string, not a number",
        '$.endpoints["/v1/chat/completions"].method': "must be one of: GET, POST, PUT, PATCH, DELETE",
        '$.endpoints["/v1/chat/completions"].streamConfig.bufferSize': "must be a whole number from 1 to 16777216",
        '$.endpoints["no-slash"]': "must be a path starting with '/' (no query string)",
        '$.endpoints["/v1/x"].rateLimit.requestsPerMinute': "must be a whole number from 1 to 1000000",
        '$.endpoints["/v1/x"].bogus': "unknown key",
        "$.rateLimit.burst": "is required",
        "$.streamConfig.heartbeatIntervalSecs": "must be a number of seconds greater than 0 (max 3600)",
        "$.port": "must be a whole number from 1 to 65535",
        "$.unknownTop": "unknown key",
    }


def test_missing_base_url_and_wrong_root_type():
    assert problems_of({}) == {"$.baseUrl": "is required"}
    assert problems_of([]) == {"$": "must be an object, not an array"}


def test_credentials_and_query_in_base_url_are_refused():
    assert "credentials" in problems_of({"baseUrl": "https://u:p@example.com/v1"})["$.baseUrl"]
    assert "query" in problems_of({"baseUrl": "https://example.com/v1?key=1"})["$.baseUrl"]


def test_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigInvalid) as info:
        parse(json.dumps({"baseUrl": "https://x.example", "base_url": "y"}), source="t")
    assert info.value.problems[0].hint == "did you mean 'baseUrl'?"


@pytest.mark.parametrize(
    ("document", "path", "suggestion"),
    [
        ({"modelMaping": {}}, "$.modelMaping", "modelMapping"),
        ({"rateLimt": {}}, "$.rateLimt", "rateLimit"),
        ({"ports": 80}, "$.ports", "port"),
        (
            {"endpoints": {"/v1/x": {"upstream_pat": "/x"}}},
            '$.endpoints["/v1/x"].upstream_pat',
            "upstreamPath",
        ),
        (
            {"streamConfig": {"heartbeatInterval": 5}},
            "$.streamConfig.heartbeatInterval",
            "heartbeatIntervalSecs",
        ),
    ],
)
def test_close_spellings_get_a_suggestion(document, path, suggestion):
    """Papercut 1: not only case and underscores, typos too (difflib)."""
    with pytest.raises(ConfigInvalid) as info:
        parse(json.dumps({"baseUrl": "https://x.example", **document}), source="t")
    [problem] = info.value.problems
    assert (problem.path, problem.hint) == (path, f"did you mean '{suggestion}'?")


def test_a_key_like_nothing_lists_the_allowed_keys():
    with pytest.raises(ConfigInvalid) as info:
        parse(json.dumps({"baseUrl": "https://x.example", "zzz": 1}), source="t")
    assert info.value.problems[0].hint.startswith("allowed: name, baseUrl, headers")


def test_syntax_error_has_line_and_column():
    with pytest.raises(ConfigInvalid) as info:
        parse('{\n  "baseUrl": "https://x.example",\n  "port": 80,\n}', source="t")
    problem = info.value.problems[0]
    assert problem.message.startswith("invalid JSON")
    assert (problem.line, problem.column) == (4, 1)


def test_name_defaults_to_the_file_name(tmp_path):
    path = write_config(tmp_path / "My Provider.json", {"baseUrl": "https://x.example/v1"})
    assert load_file(path).name == "my-provider"


def test_endpoint_overrides_refine_the_defaults(tmp_path):
    config = parse(
        json.dumps(
            {
                "baseUrl": "https://x.example/v1",
                "endpoints": {"/v1/chat/completions": {"streamSupport": False}, "/v1/rerank": {}},
            }
        ),
        source="t",
    )
    chat = config.endpoints["/v1/chat/completions"]
    assert (chat.upstream_path, chat.stream_support) == ("/chat/completions", False)
    assert config.endpoints["/v1/rerank"].upstream_path == "/rerank"


def test_hot_reload_applies_a_good_file_and_keeps_the_last_good_one(tmp_path):
    path = write_config(tmp_path / "p.json", {"name": "one", "baseUrl": "https://one.example/v1"})
    told = []
    store = ConfigStore(
        load_file(path), path, on_reload=lambda problem, current: told.append((problem, current))
    )
    assert store.reload_if_changed() is False  # unchanged
    assert told == []

    write_config(path, {"name": "two", "baseUrl": "https://two.example/v1"})
    os.utime(path, ns=(1, 1_000_000_000))
    assert store.reload_if_changed() is True
    assert store.current.name == "two"
    assert told[-1] == (None, store.current)

    path.write_text('{"name": "three", "baseUrl": ')
    os.utime(path, ns=(2, 2_000_000_000))
    assert store.reload_if_changed() is False
    assert store.current.name == "two"
    problem, current = told[-1]
    assert isinstance(problem, ConfigInvalid) and current.name == "two"


def test_reload_outcomes_are_logged_by_the_reporter(make_router, caplog):
    router = make_router()
    document = json.loads(router.config_path.read_text())
    write_config(router.config_path, {**document, "name": "renamed"})
    os.utime(router.config_path, ns=(1, 1_000_000_000))
    with caplog.at_level(logging.INFO, logger="apirouter.config"):
        router.app.store.reload_if_changed()
        router.config_path.write_text("{broken")
        os.utime(router.config_path, ns=(2, 2_000_000_000))
        router.app.store.reload_if_changed()
    assert "config reloaded" in caplog.text
    assert "keeping the last good config" in caplog.text


def test_live_router_keeps_serving_through_a_bad_reload(make_router, httpserver):
    router = make_router({"modelMapping": {"alias": "first-target"}})
    seen = []

    def upstream(request: Request) -> Response:
        seen.append(json.loads(request.get_data())["model"])
        return Response(json.dumps(CHAT_COMPLETION), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(upstream)
    document = json.loads(router.config_path.read_text())
    write_config(router.config_path, {**document, "modelMapping": {"alias": "second-target"}})
    os.utime(router.config_path, ns=(5, 5_000_000_000))
    router.app.store.reload_if_changed()
    httpx.post(router.url + "/v1/chat/completions", json={"model": "alias"})
    router.config_path.write_text("{broken")
    os.utime(router.config_path, ns=(6, 6_000_000_000))
    router.app.store.reload_if_changed()
    response = httpx.post(router.url + "/v1/chat/completions", json={"model": "alias"})
    assert response.status_code == 200
    assert seen == ["second-target", "second-target"]
    assert router.sample("apirouter_config_reloads_total", {"result": "success"}) == 1
    assert router.sample("apirouter_config_reloads_total", {"result": "failure"}) == 1
