"""The official openai and anthropic SDKs as clients, through the real router over loopback."""

from __future__ import annotations

import json

import anthropic
import openai
from upstream_fakes import (
    ANTHROPIC_MESSAGE,
    CHAT_COMPLETION,
    EMBEDDINGS,
    anthropic_stream,
    chat_stream,
    sse_response,
)
from werkzeug import Request, Response


def test_openai_chat_completion_through_router(router, httpserver):
    seen = []

    def upstream(request: Request) -> Response:
        seen.append(request)
        return Response(json.dumps(CHAT_COMPLETION), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(upstream)
    client = openai.OpenAI(base_url=router.v1, api_key="sk-test-client-key", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "hello"
    assert seen[0].headers["Authorization"] == "Bearer sk-test-client-key"
    assert json.loads(seen[0].get_data())["messages"] == [{"role": "user", "content": "hi"}]


def test_openai_streaming_chat_relays_every_chunk(router, httpserver):
    httpserver.expect_request("/v1/chat/completions").respond_with_response(
        sse_response(chat_stream(["Hel", "lo", " world"]))
    )
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "Hello world"


def test_openai_embeddings(router, httpserver):
    httpserver.expect_request("/v1/embeddings").respond_with_json(EMBEDDINGS)
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    result = client.embeddings.create(model="embed", input="hello")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]


def test_openai_audio_transcription_maps_model_and_keeps_content_type(make_router, httpserver):
    router = make_router({"modelMapping": {"whisper-1": "upstream-whisper"}})
    seen = []

    def upstream(request: Request) -> Response:
        seen.append((request.form.get("model"), request.files["file"].read()))
        return Response("WEBVTT\n\n00:00.000 --> 00:01.000\nhello\n", content_type="text/vtt")

    httpserver.expect_request("/v1/audio/transcriptions").respond_with_handler(upstream)
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    vtt = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", b"RIFF-fake-audio-bytes"), response_format="vtt"
    )
    assert "hello" in vtt
    assert seen == [("upstream-whisper", b"RIFF-fake-audio-bytes")]


def test_anthropic_messages_create_uses_x_api_key_upstream(make_router, httpserver):
    router = make_router({"endpoints": {"/v1/messages": {"keyHeader": "x-api-key"}}})
    seen = []

    def upstream(request: Request) -> Response:
        seen.append(request.headers)
        return Response(json.dumps(ANTHROPIC_MESSAGE), content_type="application/json")

    httpserver.expect_request("/v1/messages", method="POST").respond_with_handler(upstream)
    client = anthropic.Anthropic(base_url=router.url, api_key="ant-client-key", max_retries=0)
    message = client.messages.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "hi there"
    assert seen[0]["x-api-key"] == "ant-client-key"
    assert "Authorization" not in seen[0]
    assert seen[0]["anthropic-version"]  # the SDK's own header passes through


def test_anthropic_streaming(router, httpserver):
    httpserver.expect_request("/v1/messages").respond_with_response(
        sse_response(anthropic_stream())
    )
    client = anthropic.Anthropic(base_url=router.url, api_key="k", max_retries=0)
    with client.messages.stream(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "hi there"


def test_upstream_error_reaches_sdk_with_its_status(router, httpserver):
    body = {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit"}}
    httpserver.expect_request("/v1/chat/completions").respond_with_json(
        body, status=429, headers={"Retry-After": "7"}
    )
    client = openai.OpenAI(base_url=router.v1, api_key="k", max_retries=0)
    try:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    except openai.RateLimitError as exc:
        assert exc.status_code == 429
        assert exc.response.headers["retry-after"] == "7"
        assert exc.body["message"] == "slow down"
    else:
        raise AssertionError("expected RateLimitError")
