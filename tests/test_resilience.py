"""Keep serving when the provider breaks: several local upstreams, at least one failing.

Upstreams are paths on the session's pytest-httpserver (``/a/v1``, ``/b/v1``...) or a
port that refuses connections; each upstream's own request count comes from the server's
log. The router's clock is a FakeClock, so cooldowns end when the test says so.
"""

from __future__ import annotations

import json

import httpx
import pytest
from clocks import FakeClock
from harness import write_config
from upstream_fakes import CHAT_COMPLETION, chat_chunk, sse_response
from werkzeug import Request, Response

from apirouter.config.provider import ConfigInvalid, parse
from apirouter.ops.firedrill import refused_base_url

CHAT = "/v1/chat/completions"
BACKUP_KEY = "sk-backup-operator-key-0123456789"


def hits(httpserver, prefix: str) -> int:
    return sum(1 for request, _ in httpserver.log if request.path.startswith(prefix))


def ok_handler(name: str):
    def handle(request: Request) -> Response:
        document = {**CHAT_COMPLETION, "model": json.loads(request.get_data())["model"]}
        return Response(
            json.dumps(document), content_type="application/json", headers={"X-Served": name}
        )

    return handle


def chat(router, model: str = "m", **kwargs) -> httpx.Response:
    return httpx.post(router.url + CHAT, json={"model": model, "messages": []}, **kwargs)


def two_upstreams(httpserver, first: str, second: str, **extra) -> dict:
    return {
        "upstreams": [
            {"name": "first", "baseUrl": first},
            {"name": "second", "baseUrl": second},
        ],
        **extra,
    }


def test_a_refusing_upstream_beside_a_healthy_one_loses_no_request(make_router, httpserver):
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(httpserver, refused_base_url(), httpserver.url_for("/good/v1"))
    router = make_router(config)
    responses = [chat(router) for _ in range(50)]
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.headers["X-Apirouter-Upstream"] for r in responses} == {"testprov/second"}
    assert (
        router.sample("apirouter_retries_total", {"provider": "testprov", "reason": "connect"}) > 0
    )
    attempts = {"provider": "testprov", "upstream": "first", "outcome": "failed"}
    assert router.sample("apirouter_upstream_attempts_total", attempts) > 0


def test_a_failing_model_gets_no_attempt_there_until_its_cooldown_ends(make_router, httpserver):
    clock = FakeClock(1000.0)
    httpserver.expect_request("/bad/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver,
        httpserver.url_for("/bad/v1"),
        httpserver.url_for("/good/v1"),
        cooldown={"initialSecs": 30, "maxSecs": 120},
    )
    router = make_router(config, clock=clock, alert_threshold=3)
    for _ in range(40):
        assert chat(router).status_code == 200
    assert hits(httpserver, "/bad/") == 3  # the threshold, then nothing while it cools
    first = {"provider": "testprov", "upstream": "first"}
    assert router.sample("apirouter_upstream_cooling", first) == 1  # model m, not the upstream
    assert router.sample("apirouter_upstream_state", first) == 0

    clock.now += 31  # the cooldown is over: one probe goes through, fails, cools again
    for _ in range(20):
        assert chat(router).status_code == 200
    assert hits(httpserver, "/bad/") == 4
    clock.now += 31  # the second cooldown is twice as long (60 s): still cooling
    for _ in range(10):
        chat(router)
    assert hits(httpserver, "/bad/") == 4


def test_one_alert_then_one_recovery_when_the_upstream_comes_back(
    sentry, make_router, httpserver, ingest
):
    sentry()
    clock = FakeClock(1000.0)
    state = {"status": 503}
    httpserver.expect_request("/flaky/v1/chat/completions").respond_with_handler(
        lambda request: Response("{}", status=state["status"], content_type="application/json")
    )
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver, httpserver.url_for("/flaky/v1"), httpserver.url_for("/good/v1")
    )
    router = make_router(config, tracking_enabled=True, clock=clock, alert_threshold=3)
    for _ in range(30):
        assert chat(router).status_code == 200
    state["status"] = 200
    clock.now += 31
    for _ in range(30):
        assert chat(router).status_code == 200
    events = ingest.wait_for_events(2)
    kinds = [e["tags"].get("alert_type") for e in events if "alert_type" in e.get("tags", {})]
    assert kinds == ["repeated_upstream_failures", "upstream_recovered"]
    assert all(e["tags"]["upstream"] == "first" for e in events if "alert_type" in e["tags"])
    # requests saved by a retry send no error event
    assert [e for e in events if "alert_type" not in e.get("tags", {})] == []


def test_when_every_upstream_fails_the_fallback_answers_with_its_own_model(
    make_router, httpserver, tmp_path
):
    seen = {}

    def backup(request: Request) -> Response:
        seen["authorization"] = request.headers.get("Authorization")
        return ok_handler("backup")(request)

    httpserver.expect_request("/main/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/backup/v1/chat/completions").respond_with_handler(backup)
    write_config(
        tmp_path / "backup.json",
        {
            "name": "backup",
            "baseUrl": httpserver.url_for("/backup/v1"),
            "modelMapping": {"fast": "backup-model"},
        },
    )
    config = {
        "baseUrl": httpserver.url_for("/main/v1"),
        "modelMapping": {"fast": "main-model"},
        "fallbacks": [{"config": "backup.json", "apiKeyEnv": "BACKUP_KEY"}],
    }
    router = make_router(config, environment={"BACKUP_KEY": BACKUP_KEY})
    response = chat(router, "fast", headers={"Authorization": "Bearer sk-client-key"})
    assert response.status_code == 200
    assert response.json()["model"] == "backup-model"
    assert response.headers["X-Apirouter-Upstream"].startswith("backup/")
    assert seen["authorization"] == f"Bearer {BACKUP_KEY}"  # never the client's own key
    labels = {"from_provider": "testprov", "to_provider": "backup"}
    assert router.sample("apirouter_fallbacks_total", labels) == 1


def test_a_429_parks_its_upstream_and_is_not_retried_there(make_router, httpserver):
    clock = FakeClock(1000.0)
    httpserver.expect_request("/busy/v1/chat/completions").respond_with_data(
        "{}", status=429, headers={"Retry-After": "7"}, content_type="application/json"
    )
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver, httpserver.url_for("/busy/v1"), httpserver.url_for("/good/v1")
    )
    router = make_router(config, clock=clock)
    # both upstreams carry the same (no) key: the 429 goes back, and parks "busy" for 7 s
    statuses = [chat(router).status_code for _ in range(20)]
    assert statuses.count(429) == hits(httpserver, "/busy/") <= 1
    assert statuses.count(200) >= 19
    clock.now += 8
    for _ in range(20):
        chat(router)
    assert hits(httpserver, "/busy/") <= 2
    assert (
        router.sample("apirouter_upstream_state", {"provider": "testprov", "upstream": "first"})
        == 0
    )  # a 429 is never a failure: no cooldown


def test_a_lone_upstream_answering_429_is_not_retried(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_data(
        "{}", status=429, headers={"Retry-After": "7"}, content_type="application/json"
    )
    router = make_router()
    response = chat(router)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert hits(httpserver, CHAT) == 1


def test_a_stream_cut_mid_way_is_not_retried(make_router, httpserver):
    def cut(request: Request) -> Response:
        return sse_response([chat_chunk("partial"), b'data: {"half'])

    httpserver.expect_request("/a/v1/chat/completions").respond_with_handler(cut)
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(ok_handler("b"))
    config = two_upstreams(httpserver, httpserver.url_for("/a/v1"), httpserver.url_for("/b/v1"))
    config["upstreams"][1]["weight"] = 1
    config["upstreams"][0]["weight"] = 1000  # the cutting upstream is chosen first
    router = make_router(config)
    with httpx.stream(
        "POST", router.url + CHAT, json={"model": "m", "stream": True, "messages": []}
    ) as response:
        assert response.status_code == 200
        try:
            body = b"".join(response.iter_raw())
        except httpx.HTTPError:
            body = b"(cut)"
    assert b"partial" in body or body == b"(cut)"
    assert hits(httpserver, "/a/") == 1 and hits(httpserver, "/b/") == 0


def test_nothing_can_serve_503_at_once_and_health_says_so(make_router, httpserver, tmp_path):
    clock = FakeClock(1000.0)
    write_config(tmp_path / "backup.json", {"name": "backup", "baseUrl": refused_base_url()})
    config = {
        "baseUrl": refused_base_url(),
        "fallbacks": [{"config": "backup.json", "apiKeyEnv": "BACKUP_KEY"}],
    }
    router = make_router(config, clock=clock, alert_threshold=2, environment={"BACKUP_KEY": "k"})
    for _ in range(6):
        chat(router)
    response = chat(router)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_upstream"
    assert "cooling down after repeated failures" in response.json()["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert len(httpserver.log) == 0  # no doomed connection
    health = httpx.get(router.url + "/health").json()
    assert health["can_serve"] is False
    assert router.sample("apirouter_can_serve", {"provider": "testprov"}) == 0
    assert {(u["provider"], u["state"]) for u in health["upstreams"]} == {
        ("testprov", "cooling"),
        ("backup", "cooling"),
    }
    assert {u["last_error"] for u in health["upstreams"]} == {"upstream_connect_error"}


def test_max_attempts_1_turns_retries_off(make_router, httpserver):
    httpserver.expect_request("/bad/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver,
        httpserver.url_for("/bad/v1"),
        httpserver.url_for("/good/v1"),
        retry={"maxAttempts": 1},
    )
    config["upstreams"][0]["weight"] = 1000
    router = make_router(config, alert_threshold=100)
    statuses = [chat(router).status_code for _ in range(10)]
    assert statuses.count(503) >= 8  # the heavy, failing upstream's answers reach the client
    assert router.sample("apirouter_retries_total", {"provider": "testprov", "reason": "5xx"}) == 0


def test_stateful_routes_stay_on_the_first_upstream(make_router, httpserver):
    httpserver.expect_request("/a/v1/files/file-1").respond_with_data("down", status=503)
    httpserver.expect_request("/b/v1/files/file-1").respond_with_json({"id": "file-1"})
    router = make_router(
        two_upstreams(httpserver, httpserver.url_for("/a/v1"), httpserver.url_for("/b/v1"))
    )
    assert httpx.get(router.url + "/v1/files/file-1").status_code == 503
    assert hits(httpserver, "/b/") == 0


def test_timeouts_before_the_first_byte_are_retried_on_completion_routes(make_router, httpserver):
    import threading

    release = threading.Event()

    def slow(request: Request) -> Response:
        release.wait(5)
        return ok_handler("slow")(request)

    httpserver.expect_request("/slow/v1/chat/completions").respond_with_handler(slow)
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver,
        httpserver.url_for("/slow/v1"),
        httpserver.url_for("/good/v1"),
        retry={"firstByteTimeoutSecs": 0.2},
    )
    config["upstreams"][0]["weight"] = 1000
    router = make_router(config)
    try:
        response = chat(router)
    finally:
        release.set()
    assert (
        response.status_code == 200
        and response.headers["X-Apirouter-Upstream"] == "testprov/second"
    )
    assert (
        router.sample("apirouter_retries_total", {"provider": "testprov", "reason": "timeout"}) == 1
    )


@pytest.mark.parametrize(
    ("document", "path", "words"),
    [
        (
            {"baseUrl": "https://a.example/v1", "upstreams": [{"baseUrl": "https://b.example"}]},
            "$.upstreams",
            "not both",
        ),
        ({"upstreams": []}, "$.upstreams", "non-empty array"),
        ({"upstreams": [{"weight": 2}]}, "$.upstreams[0].baseUrl", "is required"),
        (
            {"upstreams": [{"baseUrl": "https://a.example", "apiKeyEnv": "sk-123"}]},
            "$.upstreams[0].apiKeyEnv",
            "environment variable",
        ),
        (
            {
                "upstreams": [{"baseUrl": "https://a.example"}, {"baseUrl": "https://a.example"}],
                "fallbacks": [],
            },
            None,
            None,
        ),
        (
            {
                "upstreams": [
                    {"name": "x", "baseUrl": "https://a.example"},
                    {"name": "x", "baseUrl": "https://b.example"},
                ]
            },
            "$.upstreams",
            "two upstreams are named 'x'",
        ),
        (
            {"baseUrl": "https://a.example", "retry": {"retryOn": ["connect", "4xx"]}},
            "$.retry.retryOn",
            "connect, timeout, 5xx, 429",
        ),
        (
            {"baseUrl": "https://a.example", "retry": {"maxAttempts": 0}},
            "$.retry.maxAttempts",
            "from 1 to 10",
        ),
        (
            {"baseUrl": "https://a.example", "cooldown": {"initialSecs": 60, "maxSecs": 30}},
            "$.cooldown",
            "initialSecs",
        ),
        (
            {"baseUrl": "https://a.example", "fallbacks": [{"provider": "openai"}]},
            "$.fallbacks[0]",
            "operator key",
        ),
        (
            {"baseUrl": "https://a.example", "fallbacks": [{"provider": "nope", "apiKeyEnv": "K"}]},
            "$.fallbacks[0].provider",
            "unknown provider",
        ),
        (
            {
                "baseUrl": "https://a.example",
                "fallbacks": [{"provider": "openai", "config": "x.json"}],
            },
            "$.fallbacks[0]",
            "provider (a shipped name) or config",
        ),
        (
            {"baseUrl": "https://a.example", "healthCheck": {"path": "models"}},
            "$.healthCheck.path",
            "starting with '/'",
        ),
    ],
)
def test_resilience_config_mistakes_are_reported_with_their_path(document, path, words):
    if path is None:
        config = parse(json.dumps(document), source="t")
        assert [u.name for u in config.upstreams] == ["0", "1"]  # same host: named by index
        return
    with pytest.raises(ConfigInvalid) as caught:
        parse(json.dumps(document), source="t")
    problems = {p.path: p.message for p in caught.value.problems}
    assert path in problems, problems
    assert words in problems[path]


def test_a_shipped_fallback_with_an_operator_key_and_its_own_mapping_loads():
    document = {
        "baseUrl": "https://a.example/v1",
        "modelMapping": {"fast": "qwen-plus"},
        "fallbacks": [
            {
                "provider": "openai",
                "apiKeyEnv": "OPENAI_API_KEY",
                "modelMapping": {"fast": "gpt-4o-mini"},
            }
        ],
    }
    config = parse(json.dumps(document), source="t")
    [fallback] = config.fallbacks
    assert fallback.name == "openai" and fallback.model_mapping == {"fast": "gpt-4o-mini"}
    assert fallback.upstreams[0].api_key_env == "OPENAI_API_KEY"


def test_the_first_byte_timeout_ends_once_the_headers_arrive(make_router, httpserver):
    import time

    def slow_stream(request: Request) -> Response:
        def events():
            yield chat_chunk("zero")  # the headers go out with the first event
            for word in ("one", "two", "three"):
                time.sleep(0.3)  # the upstream's pace, longer than firstByteTimeoutSecs
                yield chat_chunk(word)

        return sse_response(events())

    httpserver.expect_request(CHAT).respond_with_handler(slow_stream)
    router = make_router({"retry": {"firstByteTimeoutSecs": 0.2}})
    with httpx.stream(
        "POST", router.url + CHAT, json={"model": "m", "stream": True, "messages": []}
    ) as response:
        body = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert all(word in body for word in (b"one", b"two", b"three"))


def test_health_checks_cool_an_upstream_whose_key_was_rotated_and_recover_it(
    sentry, make_router, httpserver, ingest
):
    sentry()
    clock = FakeClock(1000.0)
    state = {"status": 401}
    seen = []

    def models(request: Request) -> Response:
        seen.append(request.headers.get("Authorization"))
        return Response('{"data": []}', status=state["status"], content_type="application/json")

    httpserver.expect_request("/a/v1/models").respond_with_handler(models)
    httpserver.expect_request("/b/v1/chat/completions").respond_with_handler(ok_handler("b"))
    httpserver.expect_request("/b/v1/models").respond_with_json({"data": []})
    config = {
        "upstreams": [
            {"name": "a", "baseUrl": httpserver.url_for("/a/v1"), "apiKeyEnv": "A_KEY"},
            {"name": "b", "baseUrl": httpserver.url_for("/b/v1")},
        ],
        "healthCheck": {"path": "/models", "intervalSecs": 10},
    }
    router = make_router(
        config,
        tracking_enabled=True,
        clock=clock,
        alert_threshold=2,
        environment={"A_KEY": "op-key"},
    )
    checker = router.app.health_checker
    for _ in range(2):
        assert checker.probe_due() == 2  # both upstreams are probed every interval
        clock.now += 10
    assert seen[:2] == ["Bearer op-key", "Bearer op-key"]  # the operator's key, nothing else
    health = httpx.get(router.url + "/health").json()
    states = {u["name"]: (u["state"], u["last_error"]) for u in health["upstreams"]}
    assert states["a"] == ("cooling", "health_check_auth")
    assert chat(router).headers["X-Apirouter-Upstream"] == "testprov/b"
    state["status"] = 200
    clock.now += 31
    checker.probe_due()
    assert httpx.get(router.url + "/health").json()["upstreams"][0]["state"] == "healthy"
    events = ingest.wait_for_events(2)
    kinds = [e["tags"].get("alert_type") for e in events]
    assert kinds == ["repeated_upstream_failures", "upstream_recovered"]
    labels = {"provider": "testprov", "upstream": "a", "result": "health_check_auth"}
    assert router.sample("apirouter_health_checks_total", labels) == 2


def test_a_request_that_finally_fails_is_one_event_with_its_attempts(
    sentry, make_router, httpserver, ingest
):
    sentry()
    httpserver.expect_request("/a/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/b/v1/chat/completions").respond_with_data("down", status=502)
    config = two_upstreams(httpserver, httpserver.url_for("/a/v1"), httpserver.url_for("/b/v1"))
    router = make_router(config, tracking_enabled=True, alert_threshold=100)
    response = chat(router, headers={"X-Request-ID": "req-retried"})
    assert response.status_code in (502, 503)
    [event] = ingest.wait_for_events(1)
    assert event["tags"]["request_id"] == "req-retried"
    assert event["tags"]["attempts"] == "2"
    assert event["tags"]["upstream"] == response.headers["X-Apirouter-Upstream"].split("/")[1]
    [crumb] = [c for c in event["breadcrumbs"]["values"] if c["category"] == "upstream.attempt"]
    assert crumb["data"]["status"] in (502, 503) and crumb["data"]["upstream"].startswith(
        "testprov/"
    )


# --- regressions found in review -------------------------------------------------------------


def test_requests_refused_before_the_upstream_give_back_a_claimed_probe(make_router, tmp_path):
    clock = FakeClock(1000.0)
    config = {
        "upstreams": [
            {"name": "first", "baseUrl": refused_base_url()},
            {"name": "second", "baseUrl": refused_base_url()},
        ],
        "fallbacks": [{"config": "backup.json", "apiKeyEnv": "K"}],
    }
    write_config(tmp_path / "backup.json", {"name": "backup", "baseUrl": refused_base_url()})
    router = make_router(config, clock=clock, alert_threshold=2, environment={"K": "k"})
    for _ in range(6):
        chat(router)
    states = {u["name"]: u["state"] for u in httpx.get(router.url + "/health").json()["upstreams"]}
    assert "cooling" in states.values()
    clock.now += 400  # every cooldown is over
    for _ in range(3):  # invalid bodies: refused before any upstream is reached
        bad = httpx.post(
            router.url + CHAT, content=b"{", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400
    # a probe was still available: the request went for an upstream, no 503 of ours
    assert chat(router).json()["error"]["code"] == "upstream_connect_error"


def test_failures_while_cooling_do_not_stretch_the_cooldown(make_router, httpserver):
    clock = FakeClock(1000.0)
    httpserver.expect_request("/bad/v1/chat/completions").respond_with_data("down", status=503)
    httpserver.expect_request("/good/v1/chat/completions").respond_with_handler(ok_handler("good"))
    config = two_upstreams(
        httpserver, httpserver.url_for("/bad/v1"), httpserver.url_for("/good/v1")
    )
    router = make_router(config, clock=clock, alert_threshold=3)
    for _ in range(20):
        chat(router)
    assert hits(httpserver, "/bad/") == 3
    reporter = router.app.reporter
    # two more failures of the cooling upstream arrive late (requests that were in flight)
    from apirouter.state.alerting import Failure
    from apirouter.state.breakers import Target

    config_now = router.app.store.current
    late = Target(config_now, config_now.upstreams[0])
    for n in range(2):
        reporter._upstream_failed(late, Failure("upstream_5xx", 503, f"late-{n}"))
    clock.now += 31  # still the first, 30 s cooldown: the probe goes through now
    for _ in range(5):
        chat(router)
    assert hits(httpserver, "/bad/") == 4


def test_a_failing_models_fetch_is_no_recovery(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_data("down", status=503)
    httpserver.expect_request("/v1/models").respond_with_data("down", status=500)
    router = make_router(
        {"retry": {"maxAttempts": 1}, "modelMapping": {"fast": "m"}}, alert_threshold=2
    )
    chat(router)
    chat(router)
    assert httpx.get(router.url + "/v1/models").json()["data"][0]["id"] == "fast"  # aliases alone
    recovered = {"provider": "testprov", "alert_type": "upstream_recovered"}
    assert router.sample("apirouter_alerts_total", recovered) == 0


def test_an_alias_is_answered_only_to_an_admitted_client(make_router):
    router = make_router({"modelMapping": {"fast": "m"}}, client_keys=("ck-0123456789",))
    assert httpx.get(router.url + "/v1/models/fast").status_code == 401
    admitted = httpx.get(
        router.url + "/v1/models/fast", headers={"Authorization": "Bearer ck-0123456789"}
    )
    assert admitted.json()["id"] == "fast"
