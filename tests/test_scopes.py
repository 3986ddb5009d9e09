"""Every reaction scoped to what failed: a 429 to the key that got it, a model's failures
to (upstream, model), stateful requests to the first upstream, nothing retried that might
have created something.

Upstreams are paths on the session's pytest-httpserver (``/a/v1``, ``/b/v1``...); each
upstream's requests come from the server's log. The router's clock is a FakeClock.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import time
from email.utils import formatdate

import anthropic
import httpx
import openai
import pytest
import sentry_sdk
from clocks import FakeClock, wait_until
from harness import write_config
from upstream_fakes import CHAT_COMPLETION
from werkzeug import Request, Response

from apirouter.upstream.retry_after import park_seconds

CHAT = "/v1/chat/completions"
KEY_A = "sk-client-a-0123456789"
KEY_B = "sk-client-b-0123456789"
OPERATOR_KEY = "sk-operator-0123456789"
CLIENT_KEY = "ck-admitted-0123456789"
BACKUP_KEY = "sk-backup-0123456789"


def hits(httpserver, prefix: str, **where: str) -> int:
    """Requests the upstream saw under ``prefix``, optionally with a model or a key."""
    count = 0
    for request, _ in httpserver.log:
        if not request.path.startswith(prefix):
            continue
        if (
            "model" in where
            and json.loads(request.get_data() or b"{}").get("model") != where["model"]
        ):
            continue
        if "key" in where and request.headers.get("Authorization") != f"Bearer {where['key']}":
            continue
        count += 1
    return count


def answer(name: str, refuse_key: str | None = None, refuse_model: str | None = None, status=429):
    """An upstream that refuses one key or one model with ``status``, and serves the rest."""

    def handle(request: Request) -> Response:
        body = json.loads(request.get_data())
        refused = (
            refuse_key is not None
            and request.headers.get("Authorization") == f"Bearer {refuse_key}"
        ) or (refuse_model is not None and body.get("model") == refuse_model)
        if refused:
            headers = {"Retry-After": "30", "x-ratelimit-remaining-requests": "0"}
            error = {"error": {"message": "slow down", "type": "rate_limit", "code": status}}
            return Response(
                json.dumps(error), status=status, headers=headers, content_type="application/json"
            )
        document = {**CHAT_COMPLETION, "model": body["model"]}
        return Response(
            json.dumps(document), content_type="application/json", headers={"X-Served": name}
        )

    return handle


def chat(router, model: str = "m", key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        router.url + CHAT, json={"model": model, "messages": []}, headers=headers, timeout=10
    )


def upstreams(httpserver, *names: str, **extra) -> dict:
    return {
        "upstreams": [{"name": n, "baseUrl": httpserver.url_for(f"/{n}/v1")} for n in names],
        **extra,
    }


def with_backup(httpserver, tmp_path, config: dict) -> dict:
    httpserver.expect_request("/backup/v1/chat/completions").respond_with_handler(answer("backup"))
    write_config(
        tmp_path / "backup.json", {"name": "backup", "baseUrl": httpserver.url_for("/backup/v1")}
    )
    return {**config, "fallbacks": [{"config": "backup.json", "apiKeyEnv": "BACKUP_KEY"}]}


# --- 1. a 429 belongs to the key that got it --------------------------------------------------


@pytest.mark.parametrize("layout", ["one upstream", "two upstreams", "with a fallback"])
def test_a_clients_own_429_is_its_own_and_the_next_client_is_served(
    make_router, httpserver, tmp_path, layout
):
    names = ("a",) if layout == "one upstream" else ("a", "b")
    for name in names:
        httpserver.expect_request(f"/{name}/v1/chat/completions").respond_with_handler(
            answer(name, refuse_key=KEY_A)
        )
    config = upstreams(httpserver, *names)
    if layout == "with a fallback":
        config = with_backup(httpserver, tmp_path, upstreams(httpserver, "a"))
    router = make_router(config, environment={"BACKUP_KEY": BACKUP_KEY})
    for _ in range(5):  # A and B take turns within the same second (the clock never moves)
        refused = chat(router, key=KEY_A)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "30"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["message"] == "slow down"  # the upstream's own body
        assert chat(router, key=KEY_B).status_code == 200
    assert sum(hits(httpserver, f"/{n}/", key=KEY_B) for n in names) == 5  # B reached it
    assert sum(hits(httpserver, f"/{n}/", key=KEY_A) for n in names) == 5  # never retried
    assert hits(httpserver, "/backup/") == 0
    health = httpx.get(router.url + "/health").json()
    assert all(u["parked"] == [] and u["parked_count"] == 0 for u in health["upstreams"])
    assert health["can_serve"] is True


def test_an_operator_429_parks_that_model_on_that_upstream_only(make_router, httpserver):
    clock = FakeClock(1000.0)
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="x")
    )
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(answer("b"))
    router = make_router(
        upstreams(httpserver, "a", "b"),
        clock=clock,
        default_api_key=OPERATOR_KEY,
        client_keys=(CLIENT_KEY,),
    )
    parked = {"provider": "testprov", "upstream": "a"}
    assert router.sample("apirouter_upstream_parked", parked) == 0
    for _ in range(50):  # equal weights: until an x meets a's 429
        response = chat(router, "x", key=CLIENT_KEY)
        if response.status_code == 429:
            break
    # both upstreams carry DEFAULT_API_KEY: the 429 is not retried on the same key
    assert response.status_code == 429 and hits(httpserver, "/a/", model="x") == 1
    for _ in range(20):  # a is parked for x: x goes to b
        assert chat(router, "x", key=CLIENT_KEY).headers["X-Apirouter-Upstream"] == "testprov/b"
    for _ in range(30):  # y keeps using both
        assert chat(router, "y", key=CLIENT_KEY).status_code == 200
    assert hits(httpserver, "/a/", model="y") > 0 and hits(httpserver, "/b/", model="y") > 0

    health = httpx.get(router.url + "/health").json()
    [first] = [u for u in health["upstreams"] if u["name"] == "a"]
    assert first["state"] == "healthy" and first["parked_count"] == 1
    [scope] = first["parked"]
    assert scope["model"] == "x" and scope["seconds_left"] == 30
    assert abs(scope["until"] - 30 - time.time()) < 5  # Unix seconds, as sentry.last_accepted
    assert router.sample("apirouter_upstream_parked", parked) == 1

    clock.now += 31  # the park is over: x is spread over both again
    for _ in range(30):
        chat(router, "x", key=CLIENT_KEY)
    assert hits(httpserver, "/a/", model="x") > 1
    assert router.sample("apirouter_upstream_parked", parked) in (0, 1)  # parked again, or not


def test_a_lone_upstream_429_on_the_operator_key_reaches_the_upstream_every_time(
    make_router, httpserver
):
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="x")
    )
    router = make_router(
        upstreams(httpserver, "a"), default_api_key=OPERATOR_KEY, client_keys=(CLIENT_KEY,)
    )
    for _ in range(5):
        response = chat(router, "x", key=CLIENT_KEY)
        assert response.status_code == 429  # the provider's answer, never a 503 of ours
        assert response.headers["Retry-After"] == "30"
        assert chat(router, "y", key=CLIENT_KEY).status_code == 200
    assert hits(httpserver, "/a/", model="x") == 5 and hits(httpserver, "/a/", model="y") == 5
    [upstream] = httpx.get(router.url + "/health").json()["upstreams"]
    assert [p["model"] for p in upstream["parked"]] == ["x"]


def test_an_operator_429_is_retried_only_on_a_target_with_another_key(make_router, httpserver):
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="x")
    )
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(answer("b"))
    config = upstreams(httpserver, "a", "b")
    config["upstreams"][0]["weight"] = 1000  # a is chosen first
    config["upstreams"][1]["apiKeyEnv"] = "B_KEY"
    router = make_router(
        config,
        default_api_key=OPERATOR_KEY,
        client_keys=(CLIENT_KEY,),
        environment={"B_KEY": BACKUP_KEY},
    )
    response = chat(router, "x", key=CLIENT_KEY)
    assert response.status_code == 200 and response.headers["X-Apirouter-Upstream"] == "testprov/b"
    assert router.sample("apirouter_retries_total", {"provider": "testprov", "reason": "429"}) == 1


def test_no_message_blames_repeated_failures_for_a_429(make_router, httpserver):
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="x")
    )
    router = make_router(upstreams(httpserver, "a"), default_api_key=OPERATOR_KEY)
    for _ in range(10):
        response = chat(router, "x")
        assert response.status_code == 429
        assert "repeated failures" not in response.text


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        ("3600", 60.0),  # capped at APIROUTER_MAX_PARK_SECONDS
        (formatdate(NOW + 20, usegmt=True), 20.0),  # an HTTP-date (IMF-fixdate)
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # a date already past: no park
        (None, 1.0),  # missing
        ("soon", 1.0),  # unreadable
        ("-5", 0.0),
        ("nan", 0.0),
        ("inf", 0.0),
        ("1e999", 0.0),
    ],
)
def test_retry_after_is_read_as_rfc_9110_says(value, seconds):
    got = park_seconds(value, 60.0, NOW)
    assert math.isclose(got, seconds, abs_tol=0.01), (value, got)


# --- 3. retries that create nothing twice -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "send"),
    [
        ("/v1/files", {"files": {"file": ("a.jsonl", b"{}\n")}, "data": {"purpose": "batch"}}),
        ("/v1/batches", {"json": {"input_file_id": "file-1", "endpoint": CHAT}}),
        ("/v1/responses/resp_1/cancel", {}),
    ],
)
def test_a_stateful_post_answered_500_reaches_the_upstream_exactly_once(
    make_router, httpserver, tmp_path, path, send
):
    for name in ("a", "b", "backup"):
        httpserver.expect_request(f"/{name}{path}").respond_with_data("boom", status=500)
    router = make_router(
        with_backup(httpserver, tmp_path, upstreams(httpserver, "a", "b")),
        environment={"BACKUP_KEY": BACKUP_KEY},
    )
    assert httpx.post(router.url + path, **send).status_code == 500
    assert [r.path for r, _ in httpserver.log] == [f"/a{path}"]


@pytest.mark.parametrize(
    ("body", "spread"),
    [
        ({"previous_response_id": "resp_1", "input": "hi"}, False),
        ({"input": "hi"}, False),  # the Responses API stores by default
        ({"input": "hi", "store": True}, False),
        ({"input": "hi", "conversation": "conv_1", "store": False}, False),
        ({"input": "hi", "store": False}, True),
    ],
)
def test_stateful_responses_always_go_to_the_first_upstream(make_router, httpserver, body, spread):
    for name in ("a", "b"):
        httpserver.expect_request(f"/{name}/v1/responses").respond_with_json({"id": "resp_2"})
    router = make_router(upstreams(httpserver, "a", "b"))
    for _ in range(20):
        response = httpx.post(router.url + "/v1/responses", json={"model": "m", **body})
        assert response.status_code == 200
    if spread:
        assert hits(httpserver, "/a/") > 0 and hits(httpserver, "/b/") > 0
    else:
        assert hits(httpserver, "/a/") == 20


def test_a_lone_upstreams_5xx_goes_back_to_the_client_at_once(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_data("down", status=503)
    router = make_router(alert_threshold=100)
    assert chat(router).status_code == 503
    assert len(httpserver.log) == 1  # the client's SDK retries; the router must not multiply it


def test_a_lone_upstreams_connect_failure_is_retried_once_after_a_pause(make_router):
    from apirouter.ops.firedrill import refused_base_url

    router = make_router({"baseUrl": refused_base_url()})
    pauses: list[float] = []
    router.app.attempts.sleep = pauses.append
    assert chat(router).status_code == 502
    assert len(pauses) == 1 and 0.1 <= pauses[0] <= 0.3
    assert (
        router.sample("apirouter_retries_total", {"provider": "testprov", "reason": "connect"}) == 1
    )


def test_statefulness_is_decided_in_one_function():
    from apirouter.proxy.inbound import EMPTY, json_body
    from apirouter.proxy.statefulness import is_stateful

    def body(**members) -> object:
        return json_body(json.dumps({"model": "m", **members}).encode(), {})

    assert not is_stateful("POST", CHAT, body())
    assert is_stateful("POST", CHAT, body(store=True))
    assert not is_stateful("POST", CHAT, body(store=False))
    assert is_stateful("POST", CHAT, body(previous_response_id="r"))
    assert not is_stateful("POST", "/v1/messages/count_tokens", body())
    assert not is_stateful("POST", "/v1/moderations", body())
    assert is_stateful("POST", "/v1/responses", body())
    assert not is_stateful("POST", "/v1/responses", body(store=False))
    assert is_stateful("POST", "/v1/images/generations", body())
    assert is_stateful("GET", "/v1/files", EMPTY)
    assert is_stateful("POST", "other", body())  # pass-through paths
    assert is_stateful("POST", CHAT, None)  # a body not read proves nothing


# --- 2. a model's failures cool that model ------------------------------------------------


def test_one_failing_model_cools_only_that_model_and_the_alert_names_it(
    make_router, httpserver, log_lines
):
    clock = FakeClock(1000.0)
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="model-x", status=503)
    )
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(answer("b"))
    config = upstreams(httpserver, "a", "b", modelMapping={"fast": "model-x"})
    config["upstreams"][0]["weight"] = 1000  # a is the primary
    router = make_router(config, clock=clock, alert_threshold=3)
    for _ in range(20):
        assert chat(router, "fast").status_code == 200  # retried on b, then sent to b
        assert chat(router, "y").headers["X-Apirouter-Upstream"] == "testprov/a"
    assert hits(httpserver, "/a/", model="model-x") == 3  # the threshold, then it cools
    assert hits(httpserver, "/a/", model="y") == 20  # served by the primary throughout

    [first, _] = httpx.get(router.url + "/health").json()["upstreams"]
    assert first["state"] == "healthy" and first["cooling_count"] == 1
    [cooling] = first["cooling"]
    assert cooling["model"] == "model-x" and cooling["seconds_left"] == 30
    labels = {"provider": "testprov", "upstream": "a"}
    assert router.sample("apirouter_upstream_cooling", labels) == 1
    assert router.sample("apirouter_upstream_state", labels) == 0

    [alert] = [line for line in log_lines if "repeated upstream failures" in line]
    assert "models=model-x" in alert and "count=3" in alert
    ids = next(part for part in alert.split() if part.startswith("sample_request_ids="))
    assert len(set(ids.split("=")[1].split(","))) == 3  # three distinct requests

    clock.now += 31  # the cool-down is over: the next failure cools it again, for twice as long
    for _ in range(5):
        assert chat(router, "fast").status_code == 200
    assert hits(httpserver, "/a/", model="model-x") == 4
    assert (
        httpx.get(router.url + "/health").json()["upstreams"][0]["cooling"][0]["seconds_left"] == 60
    )


def test_a_lone_upstreams_failing_model_is_never_cooled(make_router, httpserver):
    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(
        answer("a", refuse_model="x", status=503)
    )
    router = make_router(upstreams(httpserver, "a"), alert_threshold=2)
    assert [chat(router, "x").status_code for _ in range(5)] == [503] * 5  # its own answer
    assert hits(httpserver, "/a/", model="x") == 5
    [upstream] = httpx.get(router.url + "/health").json()["upstreams"]
    assert upstream["cooling"] == [] and upstream["state"] == "healthy"


def test_the_scope_table_is_bounded_per_upstream():
    from apirouter.state.scopes import MAX_MODELS, OTHER, ScopeTable

    table = ScopeTable(threshold=2, window_seconds=60)
    for n in range(MAX_MODELS):  # every scope active: parked
        table.park("p/u", f"m{n}", until=100.0, now=0.0)
    table.park("p/u", "newcomer", until=100.0, now=0.0)  # shares "other"
    assert table.blocked("p/u", "newcomer", now=1.0) and table.blocked("p/u", "unseen", now=1.0)
    assert OTHER in {model for model, _ in table.parked("p/u", now=1.0)}
    assert len(table.parked("p/u", now=1.0)) == MAX_MODELS + 1
    # once parks are over, the least recently used scope makes room
    table.park("p/u", "later", until=300.0, now=200.0)
    assert ("later", 300.0) in table.parked("p/u", now=200.0)
    assert not table.blocked("p/u", "m0", now=200.0)
    assert not table.blocked("q/u", "m0", now=1.0)  # other upstreams are untouched


# --- 4. health checks carry the key a request would carry ---------------------------------


def test_a_health_check_carries_default_api_key_and_keeps_the_upstream_healthy(
    sentry, make_router, httpserver, ingest
):
    sentry()
    seen = []

    def models(request: Request) -> Response:
        seen.append(request.headers.get("Authorization"))
        ok = request.headers.get("Authorization") == f"Bearer {OPERATOR_KEY}"
        return Response('{"data": []}', status=200 if ok else 401, content_type="application/json")

    httpserver.expect_request("/a/v1/models").respond_with_handler(models)
    httpserver.expect_request("/b/v1/models").respond_with_handler(models)
    config = upstreams(httpserver, "a", "b", healthCheck={"path": "/models", "intervalSecs": 10})
    clock = FakeClock(1000.0)
    router = make_router(
        config,
        tracking_enabled=True,
        clock=clock,
        alert_threshold=2,
        default_api_key=OPERATOR_KEY,
        client_keys=(CLIENT_KEY,),
    )
    for _ in range(3):
        assert router.app.health_checker.probe_due() == 2
        clock.now += 10
    assert seen == [f"Bearer {OPERATOR_KEY}"] * 6
    health = httpx.get(router.url + "/health").json()
    assert {u["state"] for u in health["upstreams"]} == {"healthy"}
    labels = {"provider": "testprov", "upstream": "a", "result": "ok"}
    assert router.sample("apirouter_health_checks_total", labels) == 3
    alerts = {"provider": "testprov", "alert_type": "repeated_upstream_failures"}
    assert router.sample("apirouter_alerts_total", alerts) == 0
    sentry_sdk.flush()
    assert ingest.events == []


def test_a_health_check_without_any_key_counts_a_401_as_up(make_router, httpserver):
    httpserver.expect_request("/a/v1/models").respond_with_data("no key", status=401)
    httpserver.expect_request("/b/v1/models").respond_with_data("down", status=503)
    config = upstreams(httpserver, "a", "b", healthCheck={"path": "/models", "intervalSecs": 10})
    router = make_router(config)  # pass-through: no DEFAULT_API_KEY, no apiKeyEnv
    router.app.health_checker.probe_due()
    results = {
        name: router.sample(
            "apirouter_health_checks_total",
            {"provider": "testprov", "upstream": name, "result": result},
        )
        for name, result in (("a", "ok"), ("b", "health_check_failed"))
    }
    assert results == {"a": 1, "b": 1}


def test_check_config_says_which_key_each_health_check_carries(tmp_path):
    from typer.testing import CliRunner

    from apirouter.ops.cli import cli

    path = write_config(
        tmp_path / "checked.json",
        {
            "name": "checked",
            "upstreams": [
                {"name": "own", "baseUrl": "https://a.example/v1", "apiKeyEnv": "OWN_KEY"},
                {"name": "shared", "baseUrl": "https://b.example/v1"},
            ],
            "healthCheck": {"path": "/models"},
        },
    )
    env = {"OWN_KEY": "sk-own-0123456789"}
    runner = CliRunner()
    bare = runner.invoke(cli, ["check-config", str(path)], env=env)
    assert "health check of checked/own (GET /models) carries apiKeyEnv OWN_KEY" in bare.output
    assert "checked/shared (GET /models) carries no key (any answer below 500: up)" in bare.output
    keyed = runner.invoke(
        cli, ["check-config", str(path), "--json"], env={**env, "DEFAULT_API_KEY": "sk-d-01234567"}
    )
    [file] = json.loads(keyed.stdout)["files"]
    assert file["health_checks"][1].endswith("carries DEFAULT_API_KEY (401/403: auth failure)")
    assert "sk-d-01234567" not in keyed.output and "sk-own-0123456789" not in keyed.output


# --- 5. /v1/models tells the truth --------------------------------------------------------

ANTHROPIC_PAGE = {
    "data": [
        {
            "id": "claude-a",
            "type": "model",
            "display_name": "A",
            "created_at": "2025-01-01T00:00:00Z",
        }
    ],
    "has_more": True,
    "first_id": "claude-a",
    "last_id": "claude-a",
}


def test_a_refused_key_gets_the_upstreams_401(make_router, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json(
        {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}, status=401
    )
    router = make_router({"modelMapping": {"fast": "m"}})
    client = openai.OpenAI(base_url=router.v1, api_key="sk-refused-0123", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.models.list()
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"


def test_the_anthropic_sdk_pages_through_the_router_as_it_does_direct(make_router, httpserver):
    def models(request: Request) -> Response:
        page = {**ANTHROPIC_PAGE, "has_more": request.args.get("limit") == "1"}
        return Response(json.dumps(page), content_type="application/json")

    httpserver.expect_request("/v1/models").respond_with_handler(models)
    router = make_router({"baseUrl": httpserver.url_for("/v1"), "modelMapping": {"fast": "m"}})
    direct = anthropic.Anthropic(base_url=httpserver.url_for(""), api_key="k", max_retries=0)
    routed = anthropic.Anthropic(base_url=router.url, api_key="k", max_retries=0)
    assert direct.models.list(limit=1).has_next_page() is True
    assert routed.models.list(limit=1).has_next_page() is True  # relayed unchanged
    assert [m.id for m in routed.models.list(limit=1).data] == ["claude-a"]  # no aliases
    listed = httpx.get(router.url + "/v1/models").json()  # unparameterised: aliases first
    assert [m["id"] for m in listed["data"]] == ["fast", "claude-a"]
    assert (listed["first_id"], listed["last_id"], listed["has_more"]) == (
        "claude-a",
        "claude-a",
        False,
    )


def test_a_gzip_list_keeps_the_upstreams_models(make_router, httpserver):
    document = {"object": "list", "data": [{"id": "theirs", "object": "model"}]}
    httpserver.expect_request("/v1/models").respond_with_data(
        gzip.compress(json.dumps(document).encode()),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )
    router = make_router({"modelMapping": {"fast": "m"}})
    client = openai.OpenAI(base_url=router.v1, api_key="sk-any-0123", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fast", "theirs"]


@pytest.mark.parametrize("trouble", ["5xx", "too large", "refused"])
def test_the_aliases_alone_only_when_the_upstream_cannot_answer(
    make_router, httpserver, log_lines, trouble
):
    from apirouter.ops.firedrill import refused_base_url
    from apirouter.proxy.models import MAX_LIST_BYTES

    if trouble == "5xx":
        httpserver.expect_request("/v1/models").respond_with_data("down", status=502)
    elif trouble == "too large":
        padding = "x" * (MAX_LIST_BYTES + 1)
        httpserver.expect_request("/v1/models").respond_with_json({"data": [], "pad": padding})
    config = {"modelMapping": {"fast": "m"}}
    if trouble == "refused":
        config["baseUrl"] = refused_base_url()
    router = make_router(config)
    response = httpx.get(router.url + "/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["fast"]
    assert response.headers["X-Apirouter-Partial"] == "upstream-unavailable"
    if trouble == "too large":
        assert any("exceeds 8388608 bytes" in line for line in log_lines)


# --- 6. headers ---------------------------------------------------------------------------


def test_an_upstreams_forged_router_header_is_replaced(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(
        CHAT_COMPLETION,
        headers={"X-Apirouter-Upstream": "forged/upstream", "X-Request-ID": "up-1"},
    )
    router = make_router()
    response = chat(router)
    assert response.headers.get_list("X-Apirouter-Upstream") == ["testprov/127.0.0.1"]
    assert response.headers["X-Upstream-Request-ID"] == "up-1"  # renamed, as before


def test_a_fallback_never_sees_the_clients_credentials(make_router, httpserver, tmp_path):
    seen = []

    def backup(request: Request) -> Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return answer("backup")(request)

    httpserver.expect_request("/a/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/backup/v1/chat/completions").respond_with_handler(backup)
    write_config(
        tmp_path / "backup.json", {"name": "backup", "baseUrl": httpserver.url_for("/backup/v1")}
    )
    config = {
        **upstreams(httpserver, "a"),
        "fallbacks": [{"config": "backup.json", "apiKeyEnv": "BACKUP_KEY"}],
    }
    router = make_router(config, environment={"BACKUP_KEY": BACKUP_KEY})
    client_headers = {
        "Authorization": f"Bearer {KEY_A}",
        "x-goog-api-key": "client-goog-key",
        "Ocp-Apim-Subscription-Key": "client-azure-key",
        "OpenAI-Organization": "org-client",
        "OpenAI-Project": "proj-client",
        "x-api-key": "client-x-api-key",
        "Cookie": "session=client",
        "X-Custom": "kept",
    }
    response = httpx.post(
        router.url + CHAT, json={"model": "m", "messages": []}, headers=client_headers
    )
    assert response.status_code == 200 and response.headers["X-Apirouter-Upstream"] == (
        "backup/127.0.0.1"
    )
    [got] = seen
    assert got["authorization"] == f"Bearer {BACKUP_KEY}"
    for name in client_headers:
        if name != "X-Custom" and name != "Authorization":
            assert name.lower() not in got, name
    assert got["x-custom"] == "kept"
    primary = next(r for r, _ in httpserver.log if r.path.startswith("/a/"))
    assert primary.headers["OpenAI-Organization"] == "org-client"  # the client's own upstream


def test_streams_cut_after_the_headers_cool_that_model_not_the_upstream(make_router, httpserver):
    from upstream_fakes import RawUpstream

    cutting = RawUpstream(  # headers, half a chunk, then the connection is gone
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n40\r\ndata: {"half',
        hang_up=True,
    )
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(answer("b"))
    config = {
        "upstreams": [
            {"name": "a", "baseUrl": cutting.url.removesuffix("/chat/completions"), "weight": 1000},
            {"name": "b", "baseUrl": httpserver.url_for("/b/v1")},
        ]
    }
    router = make_router(config, alert_threshold=2)
    try:
        for _ in range(2):
            with (
                httpx.stream(
                    "POST", router.url + CHAT, json={"model": "m", "stream": True, "messages": []}
                ) as response,
                contextlib.suppress(httpx.HTTPError),
            ):
                b"".join(response.iter_raw())

        def cooling() -> dict | None:  # a stream is recorded when the server closes it
            first = httpx.get(router.url + "/health").json()["upstreams"][0]
            return first if first["cooling"] else None

        first = wait_until(cooling)
        assert first["state"] == "healthy" and [c["model"] for c in first["cooling"]] == ["m"]
        assert first["last_error"] == "upstream_stream_cut"
        assert chat(router, "m").headers["X-Apirouter-Upstream"] == "testprov/b"
        assert cutting.connections == 2
    finally:
        cutting.close()
