"""Sentry performance monitoring at the wire: the real SDK sends real envelopes to a local
ingest endpoint; these tests decode the transactions, their spans and the trace headers the
upstream saw."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from clocks import wait_until
from harness import SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY
from sentry_wire import DSN_SECRET, Ingest
from upstream_fakes import CHAT_COMPLETION, chat_chunk, sse_response
from werkzeug import Request, Response

from apirouter.config.provider import load
from apirouter.observe import traces, tracking
from apirouter.observe.context import Outcome, RequestContext
from apirouter.observe.usage import Usage
from apirouter.ops.firedrill import refused_base_url
from apirouter.state.breakers import Target

CHAT = "/v1/chat/completions"
PROMPT = "PROMPT-CANARY-the-user-typed-this"
COMPLETION = "COMPLETION-CANARY-the-model-wrote-this"
ANSWER = {
    **CHAT_COMPLETION,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": COMPLETION},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}
MAPPED = {"modelMapping": {"fast": "upstream-model-x"}}
TRACED = {"tracking_enabled": True, "sentry_traces_sample_rate": 1.0}


def chat(router, *, model="fast", stream=False, headers=None) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    return httpx.post(
        router.url + CHAT,
        json=body,
        headers={"Authorization": f"Bearer {SECRET_CLIENT_KEY}", **(headers or {})},
        timeout=10,
    )


def answer(document=ANSWER, status=200):
    return lambda request: Response(
        json.dumps(document), status=status, content_type="application/json"
    )


def transactions(ingest: Ingest, count: int = 1) -> list[dict[str, Any]]:
    """The transactions received, each with its spans (the SDK sends gen_ai spans in a
    separate v2 ``span`` item of the same envelope: they are folded back in here)."""

    def found() -> list[dict[str, Any]]:
        tracking.flush()
        result = []
        for envelope in ingest.envelopes:
            kinds = {header.get("type"): payload for header, payload in envelope.items}
            if "transaction" not in kinds:
                continue
            transaction = json.loads(kinds["transaction"])
            transaction["v2_spans"] = json.loads(kinds["span"])["items"] if "span" in kinds else []
            result.append(transaction)
        return result if len(result) >= count else []

    return wait_until(found)


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    return {name: value["value"] for name, value in span["attributes"].items()}


def assert_nothing_private(ingest: Ingest) -> None:
    raw = ingest.raw_bytes()
    for private in (PROMPT, COMPLETION, SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY, DSN_SECRET):
        assert private.encode() not in raw, private
    assert b"messages" not in raw  # no request body, not even its shape


def test_a_sampled_chat_request_is_one_transaction_with_its_upstream_span(
    sentry, make_router, httpserver, ingest
):
    sentry(sentry_traces_sample_rate=1.0)
    router = make_router(MAPPED, **TRACED)
    httpserver.expect_request(CHAT).respond_with_handler(answer())
    client_trace = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
    assert chat(router, headers={"sentry-trace": client_trace}).status_code == 200

    [transaction] = transactions(ingest)
    assert transaction["transaction"] == "POST /v1/chat/completions"
    assert transaction["transaction_info"] == {"source": "route"}
    trace = transaction["contexts"]["trace"]
    assert trace["op"] == "http.server"
    assert trace["status"] == "ok"
    assert trace["trace_id"] != client_trace.split("-")[0]  # a client cannot steer sampling
    assert trace["data"]["gen_ai.system"] == "testprov"
    assert trace["data"]["gen_ai.operation.name"] == "chat"
    assert transaction["tags"]["route"] == CHAT
    assert transaction["tags"]["provider"] == "testprov"
    assert transaction["tags"]["attempts"] == "1"

    [span] = transaction["v2_spans"]
    assert span["trace_id"] == trace["trace_id"]
    assert span["parent_span_id"] == trace["span_id"]
    assert span["end_timestamp"] >= span["start_timestamp"]
    data = attributes(span)
    assert data["sentry.op"] == "gen_ai.chat"
    assert data["gen_ai.system"] == "testprov"
    assert data["http.request.method"] == "POST"
    assert data["http.response.status_code"] == 200
    assert data["apirouter.upstream_host"] == "127.0.0.1"
    assert data["apirouter.response_headers_seconds"] > 0
    assert_nothing_private(ingest)


def test_a_sampled_chat_request_carries_the_mapped_model_and_the_usage(
    sentry, make_router, httpserver, ingest
):
    sentry(sentry_traces_sample_rate=1.0)
    router = make_router(MAPPED, **TRACED)
    httpserver.expect_request(CHAT).respond_with_handler(answer())
    assert chat(router).status_code == 200
    [transaction] = transactions(ingest)
    for data in (transaction["contexts"]["trace"]["data"], attributes(transaction["v2_spans"][0])):
        assert data["gen_ai.request.model"] == "upstream-model-x"
        assert data["gen_ai.usage.input_tokens"] == 11
        assert data["gen_ai.usage.output_tokens"] == 7
    assert_nothing_private(ingest)


def test_gen_ai_attributes_come_from_what_the_relay_recorded(sentry, ingest):
    """The mapping from the context to Sentry's attributes, through the real SDK, while the
    relay does not fill these fields yet (the test above covers it end to end)."""
    sentry(sentry_traces_sample_rate=1.0)
    config = load("openai")
    ctx = RequestContext("req-attrs", "POST", CHAT, "openai", "anonymous", start=0.0)
    trace = traces.Tracer().begin(ctx)
    assert trace is not None and trace.sampled
    trace.attempt_started(
        Target(config, config.upstreams[0]), "POST", config.base_url + CHAT + "?q=1", {}
    )
    ctx.target = Target(config, config.upstreams[0])
    ctx.model = "gpt-4o-mini"
    ctx.usage = Usage(input=120, cached_input=100, output=30)
    ctx.upstream_status, ctx.upstream_seconds = 200, 0.05
    ctx.first_byte_seconds, ctx.stream_seconds = 0.25, 1.5
    trace.finish(ctx, Outcome(200))

    [transaction] = transactions(ingest)
    [span] = transaction["v2_spans"]
    expected = {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.input_tokens.cached": 100,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.total_tokens": 150,
    }
    for data in (transaction["contexts"]["trace"]["data"], attributes(span)):
        assert {k: data[k] for k in expected} == expected  # token names survive scrubbing
    data = attributes(span)
    assert span["name"] == "chat gpt-4o-mini"
    assert data["apirouter.first_byte_seconds"] == 0.25
    assert data["gen_ai.response.time_to_first_chunk"] == 0.25
    assert data["apirouter.stream_seconds"] == 1.5
    assert data["gen_ai.response.streaming"] is True
    assert data["apirouter.upstream_host"] == "api.openai.com"


def test_rate_zero_builds_no_transaction_and_sends_none(
    sentry, make_router, httpserver, ingest, monkeypatch
):
    started = []
    monkeypatch.setattr(traces, "RequestTrace", lambda *args: started.append(args))
    sentry()  # SENTRY_TRACES_SAMPLE_RATE unset: 0
    router = make_router(tracking_enabled=True)
    assert router.app.tracer is None
    httpserver.expect_request(CHAT).respond_with_handler(answer(status=503))
    assert chat(router).status_code == 503
    ingest.wait_for_events(1)  # the error event still goes (after a flush of the queue)
    kinds = {header.get("type") for e in ingest.envelopes for header, _ in e.items}
    assert "transaction" not in kinds and "span" not in kinds
    assert started == []
    assert sentry_sdk_tracing_off()


def sentry_sdk_tracing_off() -> bool:
    import sentry_sdk
    from sentry_sdk.tracing_utils import has_tracing_enabled

    return not has_tracing_enabled(sentry_sdk.get_client().options)


def test_an_upstream_5xx_event_links_to_its_transaction_and_the_alert_still_goes(
    sentry, make_router, httpserver, ingest
):
    sentry(sentry_traces_sample_rate=1.0)
    router = make_router({"retry": {"maxAttempts": 1}}, alert_threshold=1, **TRACED)
    httpserver.expect_request(CHAT).respond_with_handler(answer(status=503))
    assert chat(router).status_code == 503

    [transaction] = transactions(ingest)
    [event] = [e for e in ingest.wait_for_events(2) if "alert_type" not in e["tags"]]
    [alert] = ingest.alerts()  # alerts travel their own path, untouched by tracing
    assert alert["tags"]["alert_type"] == "repeated_upstream_failures"
    trace = transaction["contexts"]["trace"]
    [span] = transaction["v2_spans"]
    assert event["tags"]["error_type"] == "upstream_5xx"
    assert event["contexts"]["trace"]["trace_id"] == trace["trace_id"]
    assert event["contexts"]["trace"]["span_id"] == span["span_id"]  # the failed attempt
    assert event["transaction"] == "POST /v1/chat/completions"
    assert trace["status"] == "unavailable"  # the 503 the client got
    assert transaction["tags"]["error_type"] == "upstream_5xx"
    assert attributes(span)["http.response.status_code"] == 503
    assert attributes(span)["apirouter.error_type"] == "upstream_5xx"
    assert_nothing_private(ingest)


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/files/file-CONCRETE-ID-41/content", "/v1/files/{id}/content"),
        ("/v1/models/made-up-CONCRETE-ID-42", "/v1/models/{model}"),
    ],
)
def test_sentry_names_the_route_template_and_host_never_a_concrete_id(
    sentry, make_router, httpserver, ingest, path, route
):
    sentry(sentry_traces_sample_rate=1.0)
    router = make_router({"retry": {"maxAttempts": 1}}, **TRACED)
    httpserver.expect_request(path).respond_with_handler(answer(status=500))
    response = httpx.get(router.url + path + "?after=CONCRETE-QUERY-43", timeout=10)
    assert response.status_code == 500

    [event] = ingest.wait_for_events(1)
    [transaction] = transactions(ingest)
    upstream_template = httpserver.url_for(route)
    assert event["contexts"]["upstream"]["url"] == upstream_template
    assert transaction["transaction"] == f"GET {route}"
    spans = transaction["spans"] + transaction["v2_spans"]
    assert [s.get("description") or s.get("name") for s in spans] == [f"GET {upstream_template}"]
    raw = ingest.raw_bytes()
    for concrete in (b"CONCRETE-ID", b"CONCRETE-QUERY"):
        assert concrete not in raw


def test_each_attempt_is_a_span_and_a_retried_one_says_why(sentry, make_router, httpserver, ingest):
    httpserver.expect_request("/good" + CHAT).respond_with_handler(answer())
    config = {
        "upstreams": [
            {"name": "refusing", "baseUrl": refused_base_url(), "weight": 1000},
            {"name": "good", "baseUrl": httpserver.url_for("/good/v1"), "weight": 1},
        ]
    }
    sentry(sentry_traces_sample_rate=1.0)
    router = make_router(config, **TRACED)
    assert chat(router).status_code == 200
    [transaction] = transactions(ingest)
    assert transaction["tags"]["attempts"] == "2"
    first, second = sorted(transaction["v2_spans"], key=lambda s: s["start_timestamp"])
    assert attributes(first)["apirouter.upstream"] == "testprov/refusing"
    assert attributes(first)["apirouter.error_type"] == "upstream_connect_error"
    assert first["status"] == "error"
    assert first["end_timestamp"] <= second["start_timestamp"]
    assert attributes(second)["apirouter.upstream"] == "testprov/good"
    assert attributes(second)["http.response.status_code"] == 200
    assert second["status"] == "ok"


def test_a_streamed_answer_ends_its_span_and_transaction_when_the_stream_ends(
    sentry, make_router, httpserver, ingest
):
    def slow_stream(request: Request) -> Response:
        def events():
            yield chat_chunk("one")
            time.sleep(0.3)  # the stream's own duration, measured below
            yield chat_chunk("two")
            yield b"data: [DONE]\n\n"

        return sse_response(events())

    sentry(sentry_traces_sample_rate=1.0)
    router = make_router(**TRACED)
    httpserver.expect_request(CHAT).respond_with_handler(slow_stream)
    response = chat(router, model="m", stream=True)
    assert response.status_code == 200 and b"two" in response.content
    [transaction] = transactions(ingest)
    [span] = transaction["v2_spans"]
    assert span["end_timestamp"] - span["start_timestamp"] >= 0.3
    assert attributes(span)["apirouter.response_headers_seconds"] < 0.3


@pytest.mark.parametrize(
    ("targets", "propagated"),
    [
        ((), False),  # the default: never
        (("api.openai.com",), False),  # another host
        (("127.0.0",), False),  # a pattern must match the whole host, not a part
        (("127.0.0.1",), True),
        ((r"127\.0\.0\.\d+",), True),
    ],
)
def test_trace_headers_reach_only_listed_hosts(
    sentry, make_router, httpserver, ingest, targets, propagated
):
    seen: list[dict[str, str]] = []

    def record(request: Request) -> Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return answer()(request)

    sentry(sentry_traces_sample_rate=1.0)
    router = make_router(sentry_trace_propagation_targets=targets, **TRACED)
    httpserver.expect_request(CHAT).respond_with_handler(record)
    assert chat(router).status_code == 200
    [transaction] = transactions(ingest)
    [headers] = seen
    if not propagated:
        assert "sentry-trace" not in headers and "baggage" not in headers
        return
    trace_id, span_id, sampled = headers["sentry-trace"].split("-")
    assert trace_id == transaction["contexts"]["trace"]["trace_id"]
    assert span_id == transaction["v2_spans"][0]["span_id"]  # the upstream call's span
    assert sampled == "1"
    assert f"sentry-trace_id={trace_id}" in headers["baggage"]
    assert DSN_SECRET not in headers["baggage"]


def test_transactions_never_crowd_error_events_out_of_the_queue(sentry, ingest):
    """The SDK's queue holds 1,000 envelopes. With its worker held up, 800 transactions
    then 400 error events arrive: transactions get half the queue, every event still fits."""
    import sentry_sdk

    from apirouter.observe import delivery

    release = threading.Event()
    ingest.answer = lambda envelope: (release.wait(10), (200, None))[1]
    sentry(sentry_traces_sample_rate=1.0)
    for n in range(800):
        sentry_sdk.start_transaction(name=f"t{n}").finish()
    for n in range(400):
        sentry_sdk.capture_message(f"event {n}")
    release.set()
    tracking.flush(timeout=30)
    current = delivery.current_report()
    assert current is not None and current.dropped["queue_full"] == 0
    wait_until(lambda: len(ingest.events) == 400, 30)
    sent = [h for e in ingest.envelopes for h, _ in e.items if h.get("type") == "transaction"]
    assert len(sent) == 500
