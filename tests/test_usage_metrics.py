"""Token usage, time to first byte and stream duration, through the official SDKs.

The upstream reports known usage in each provider's real shape; ``/metrics`` must show
exactly the sum, labelled with the mapped upstream model (``other`` for a client's own
model name), and the access log carries the counts.
"""

from __future__ import annotations

import gzip
import json

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from upstream_fakes import ANTHROPIC_MESSAGE, CHAT_COMPLETION, anthropic_stream, chat_chunk
from werkzeug import Request, Response

CHAT = "/v1/chat/completions"
CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "prompt_tokens_details": {"cached_tokens": 4},
}
RESPONSES_USAGE = {
    "input_tokens": 20,
    "input_tokens_details": {"cached_tokens": 5},
    "output_tokens": 9,
}


def tokens(router, model: str, provider: str = "testprov") -> dict[str, float]:
    return {
        kind: router.sample(
            "apirouter_tokens_total", {"provider": provider, "model": model, "kind": kind}
        )
        for kind in ("input", "cached_input", "output")
    }


def chat_answer(request: Request) -> Response:
    document = {**CHAT_COMPLETION, "usage": CHAT_USAGE}
    return Response(json.dumps(document), content_type="application/json")


def chat_stream_with_usage(request: Request) -> Response:
    asked = json.loads(request.get_data()).get("stream_options", {}).get("include_usage")
    final = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": CHAT_USAGE,
    }
    events = [chat_chunk("Hel"), chat_chunk("lo")]
    if asked:
        events.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return Response(iter(events), content_type="text/event-stream")


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "model": "big-model",
    "status": "completed",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        **RESPONSES_USAGE,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 29,
    },
}


def responses_answer(request: Request) -> Response:
    if not json.loads(request.get_data()).get("stream"):
        return Response(json.dumps(RESPONSE), content_type="application/json")
    events = [
        (
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {**RESPONSE, "status": "in_progress", "output": [], "usage": None},
            },
        ),
        (
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "hi",
                "logprobs": [],
            },
        ),
        (
            "response.completed",
            {"type": "response.completed", "sequence_number": 2, "response": RESPONSE},
        ),
    ]
    body = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]
    return Response(iter(body), content_type="text/event-stream")


def test_openai_sdk_chat_plain_and_streaming_with_include_usage(make_router, httpserver, log_lines):
    router = make_router(
        {"modelMapping": {"fast": "big-model"}, "streamConfig": {"includeUsage": True}}
    )

    def chat(request: Request) -> Response:
        streaming = json.loads(request.get_data()).get("stream")
        return chat_stream_with_usage(request) if streaming else chat_answer(request)

    httpserver.expect_request(CHAT).respond_with_handler(chat)
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    client.chat.completions.create(model="fast", messages=[])
    chunks = list(client.chat.completions.create(model="fast", messages=[], stream=True))
    assert chunks[-1].usage.prompt_tokens == 11  # the router asked for it: includeUsage
    client.chat.completions.create(model="client-own", messages=[])
    assert tokens(router, "big-model") == {"input": 22, "cached_input": 8, "output": 14}
    assert tokens(router, "other") == {"input": 11, "cached_input": 4, "output": 7}
    line = next(line for line in log_lines if "model=big-model" in line)
    assert "input_tokens=11" in line and "output_tokens=7" in line and "ttfb_ms=" in line
    ttfb = router.sample(
        "apirouter_time_to_first_byte_seconds_count", {"provider": "testprov", "route": CHAT}
    )
    streams = router.sample(
        "apirouter_stream_duration_seconds_count", {"provider": "testprov", "route": CHAT}
    )
    assert (ttfb, streams) == (3, 1)


def test_openai_sdk_responses_streaming_and_not(make_router, httpserver):
    router = make_router({"modelMapping": {"fast": "big-model"}})
    httpserver.expect_request("/v1/responses").respond_with_handler(responses_answer)
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    assert client.responses.create(model="fast", input="hi").usage.input_tokens == 20
    events = list(client.responses.create(model="fast", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert tokens(router, "big-model") == {"input": 40, "cached_input": 10, "output": 18}


def test_anthropic_sdk_messages_streaming_and_not(make_router, httpserver):
    router = make_router({"modelMapping": {"sonnet": "claude-upstream"}})
    cached = {
        "input_tokens": 3,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 5,
        "output_tokens": 2,
    }

    def messages(request: Request) -> Response:
        if json.loads(request.get_data()).get("stream"):
            return Response(anthropic_stream(), content_type="text/event-stream")
        document = {**ANTHROPIC_MESSAGE, "usage": cached}
        return Response(json.dumps(document), content_type="application/json")

    httpserver.expect_request("/v1/messages").respond_with_handler(messages)
    client = anthropic.Anthropic(base_url=router.url, api_key="ant-key", max_retries=0)
    client.messages.create(
        model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    with client.messages.stream(
        model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert stream.get_final_text() == "hi there"
    # non-streaming: 3 + 2 + 5 billed input, 5 from cache, 2 out; streaming: 3 in, 2 out
    assert tokens(router, "claude-upstream") == {"input": 13, "cached_input": 5, "output": 4}
    health = httpx.get(router.url + "/health").json()
    assert health["tokens"] == {"testprov": {"input": 13, "cached_input": 5, "output": 4}}


def test_a_gzip_json_answer_is_counted_and_relayed_compressed(make_router, httpserver):
    router = make_router({"modelMapping": {"fast": "big-model"}})
    packed = gzip.compress(json.dumps({**CHAT_COMPLETION, "usage": CHAT_USAGE}).encode())
    httpserver.expect_request(CHAT).respond_with_data(
        packed, content_type="application/json", headers={"Content-Encoding": "gzip"}
    )
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    assert client.chat.completions.create(model="fast", messages=[]).usage.completion_tokens == 7
    raw = httpx.post(router.url + CHAT, json={"model": "fast"}, headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"  # the client gets the upstream's bytes
    assert tokens(router, "big-model")["output"] == 14


def test_a_stream_cut_before_its_usage_event_counts_no_output(make_router, httpserver):
    router = make_router({"modelMapping": {"fast": "big-model"}, "retry": {"maxAttempts": 1}})
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: Response(iter([chat_chunk("Hel")]), content_type="text/event-stream")
    )
    with httpx.stream(
        "POST", router.url + CHAT, json={"model": "fast", "stream": True}
    ) as response:
        body = response.read()
    assert b"Hel" in body
    assert tokens(router, "big-model") == {"input": 0, "cached_input": 0, "output": 0}


def test_per_key_token_counts_are_opt_in(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_handler(chat_answer)
    off = make_router()
    httpx.post(
        off.url + CHAT, json={"model": "m"}, headers={"Authorization": "Bearer sk-one-0123456789"}
    )
    assert "apirouter_tokens_by_key_total{" not in httpx.get(off.url + "/metrics").text
    on = make_router(metrics_per_key=True)
    httpx.post(
        on.url + CHAT, json={"model": "m"}, headers={"Authorization": "Bearer sk-one-0123456789"}
    )
    text = httpx.get(on.url + "/metrics").text
    assert 'apirouter_tokens_by_key_total{client_key="sk-o...' in text
    assert "sk-one-0123456789" not in text


# --- hostile usage: nothing an upstream sends makes finish skip its work ---------------------

USAGE_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "cached_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "input_tokens_details",
]
HOSTILE_NUMBERS = st.sampled_from([10**400, 10**20, 10**12 + 1, -5, -(10**400), 1e20, 1e308])
HOSTILE_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | HOSTILE_NUMBERS
    | st.integers()
    | st.floats()  # NaN and infinities included: Python's json reads them
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(USAGE_KEYS), inner, max_size=4)
    ),
    max_leaves=8,
)
HOSTILE_USAGE = st.dictionaries(
    st.sampled_from(USAGE_KEYS), HOSTILE_NUMBERS | HOSTILE_VALUES, min_size=1, max_size=6
)


def hostile_answer(usage: object, shape: str) -> tuple[bytes, str]:
    """A body carrying ``usage`` where each supported shape puts it."""
    if shape == "json":
        return json.dumps({"id": "c", "usage": usage}).encode(), "application/json"
    document = {
        "chat": {"choices": [], "usage": usage},
        "responses": {"type": "response.completed", "response": {"usage": usage}},
        "anthropic": {"type": "message_start", "message": {"usage": usage}},
    }[shape]
    return b"data: " + json.dumps(document).encode() + b"\n\n", "text/event-stream"


@pytest.fixture
def plain_router(make_router):
    """One router for every example (``retry`` off: one attempt per request)."""
    return make_router({"retry": {"maxAttempts": 1}})


def failed_attempts(router) -> float:
    upstream = router.app.store.current.upstreams[0].name
    labels = {"provider": "testprov", "upstream": upstream, "outcome": "failed"}
    return router.sample("apirouter_upstream_attempts_total", labels)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(usage={"prompt_tokens": 10**400}, shape="json", status=500)  # the cases
@example(usage={"input_tokens": 10**20, "output_tokens": 10**400}, shape="anthropic", status=200)
@example(usage={"prompt_tokens": -(10**400), "completion_tokens": 1e20}, shape="chat", status=200)
@example(usage={"input_tokens": {"n": [10**400]}}, shape="responses", status=500)
@given(
    usage=HOSTILE_USAGE | HOSTILE_VALUES,
    shape=st.sampled_from(["json", "chat", "responses", "anthropic"]),
    status=st.sampled_from([200, 500]),
)
def test_hostile_usage_never_skips_the_log_line_the_failure_window_or_health(
    plain_router, httpserver, log_lines, usage, shape, status
):
    body, content_type = hostile_answer(usage, shape)
    httpserver.clear()
    httpserver.expect_request(CHAT).respond_with_data(body, status, content_type=content_type)
    failures_before = failed_attempts(plain_router)
    response = httpx.post(plain_router.v1 + "/chat/completions", json={"model": "m"}, timeout=10)
    assert response.status_code == status
    request_id = response.headers["x-request-id"]
    assert any(request_id in line and f"status={status}" in line for line in log_lines)
    assert failed_attempts(plain_router) == failures_before + (status == 500)
    health = httpx.get(plain_router.url + "/health")
    assert health.status_code == 200
    for totals in health.json()["tokens"].values():
        assert all(isinstance(n, int) and 0 <= n < 10**15 for n in totals.values())
    assert plain_router.app.reporter.in_flight == 0
