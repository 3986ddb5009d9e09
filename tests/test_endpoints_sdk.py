"""Every endpoint a 2026 OpenAI client calls (issue 11), driven by the official SDKs.

The real router over loopback; a pytest-httpserver upstream that records what it received
(method, raw path, query, headers, body) and answers in the provider's wire format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest
from upstream_fakes import sse_response
from werkzeug import Request, Response

CLIENT_KEY = "sk-client-endpoints"
MAPPING = {
    "fast": "upstream-fast",
    "image-alias": "upstream-image",
    "claude-alias": "claude-upstream",
    "team/fast": "upstream-fast",
}


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_uri: str  # path and query exactly as sent on the wire
    path: str  # decoded
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def record(request: Request) -> Seen:
    body = request.get_data(cache=True)
    form, files = {}, {}
    if request.mimetype == "multipart/form-data":
        form = dict(request.form)
        files = {name: storage.read() for name, storage in request.files.items()}
    return Seen(
        method=request.method,
        raw_uri=request.environ.get("REQUEST_URI") or request.environ["RAW_URI"],
        path=request.path,
        query=dict(request.args),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
        form=form,
        files=files,
    )


def upstream(httpserver, path, method, answer, **kwargs) -> list[Seen]:
    """Expect `method path` upstream; answer with JSON (a dict) or a werkzeug Response."""
    seen: list[Seen] = []

    def handle(request: Request) -> Response:
        seen.append(record(request))
        if isinstance(answer, Response):
            return answer
        return Response(json.dumps(answer), content_type="application/json", **kwargs)

    httpserver.expect_request(path, method=method).respond_with_handler(handle)
    return seen


def sent_by_client(seen: Seen) -> None:
    """What every forwarded request carries: the client's key and a request id."""
    assert seen.headers["authorization"] == f"Bearer {CLIENT_KEY}"
    assert seen.headers["x-request-id"]


@pytest.fixture(scope="module")
def routed(make_module_router):
    return make_module_router(
        {
            "modelMapping": MAPPING,
            "endpoints": {"/v1/messages/count_tokens": {"keyHeader": "x-api-key"}},
        }
    )


@pytest.fixture
def client(routed):
    return openai.OpenAI(base_url=routed.v1, api_key=CLIENT_KEY, max_retries=0, timeout=10)


# --- the Responses API ------------------------------------------------------------------------


def response_object(response_id="resp_1", status="completed", text="hello", **extra):
    return {
        "id": response_id,
        "object": "response",
        "created_at": 1_767_225_600,
        "status": status,
        "model": "upstream-fast",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "temperature": 1.0,
        "top_p": 1.0,
        "usage": {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 1,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 6,
        },
        **extra,
    }


def test_responses_create_maps_the_model(client, httpserver):
    seen = upstream(httpserver, "/v1/responses", "POST", response_object())
    response = client.responses.create(model="fast", input="Say hello", temperature=0.5)
    assert response.output_text == "hello"
    (request,) = seen
    sent_by_client(request)
    assert request.raw_uri == "/v1/responses"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {"model": "upstream-fast", "input": "Say hello", "temperature": 0.5}


def responses_stream_events(text_parts: list[str]) -> list[bytes]:
    created = response_object(status="in_progress", output=[], usage=None)
    done = response_object(text="".join(text_parts))
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": created}),
        ("response.in_progress", {"response": created}),
        ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
        (
            "response.content_part.added",
            {
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
        *(
            (
                "response.output_text.delta",
                {
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": part,
                    "logprobs": [],
                },
            )
            for part in text_parts
        ),
        (
            "response.output_text.done",
            {
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "text": "".join(text_parts),
                "logprobs": [],
            },
        ),
        ("response.output_item.done", {"output_index": 0, "item": done["output"][0]}),
        ("response.completed", {"response": done}),
    ]
    return [
        f"event: {name}\ndata: "
        f"{json.dumps({'type': name, 'sequence_number': number, **data})}\n\n".encode()
        for number, (name, data) in enumerate(events)
    ]


def test_responses_create_streaming_relays_every_event(client, httpserver):
    seen = upstream(
        httpserver, "/v1/responses", "POST", sse_response(responses_stream_events(["Hel", "lo"]))
    )
    # the streaming response, to see the router's headers as well as the parsed events
    with client.responses.with_streaming_response.create(
        model="fast", input="hi", stream=True
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["cache-control"] == "no-cache"
        assert raw.headers["x-accel-buffering"] == "no"
        events = list(raw.parse())
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    assert events[-1].response.output_text == "Hello"
    assert seen[0].json == {"model": "upstream-fast", "input": "hi", "stream": True}


def test_responses_create_with_tools_forwards_them_unchanged(client, httpserver):
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
        {"type": "web_search"},
    ]
    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city":"Paris","unit":"c"}',
        "status": "completed",
    }
    seen = upstream(
        httpserver, "/v1/responses", "POST", response_object(output=[call], tools=tools)
    )
    response = client.responses.create(
        model="fast", input="Weather in Paris?", tools=tools, tool_choice="auto"
    )
    assert response.output[0].type == "function_call"
    assert json.loads(response.output[0].arguments) == {"city": "Paris", "unit": "c"}
    body = seen[0].json
    assert body["tools"] == tools  # byte-level fidelity of tools is covered in test_app_proxy
    assert body["tool_choice"] == "auto"
    assert body["model"] == "upstream-fast"


def test_responses_retrieve_delete_and_cancel(client, httpserver):
    got = upstream(httpserver, "/v1/responses/resp_42", "GET", response_object("resp_42"))
    deleted = upstream(
        httpserver,
        "/v1/responses/resp_42",
        "DELETE",
        {"id": "resp_42", "object": "response", "deleted": True},
    )
    cancelled = upstream(
        httpserver,
        "/v1/responses/resp_43/cancel",
        "POST",
        response_object("resp_43", status="cancelled", background=True),
    )
    assert client.responses.retrieve("resp_42").id == "resp_42"
    assert client.responses.delete("resp_42") is None  # the SDK discards the body
    assert client.responses.cancel("resp_43").status == "cancelled"

    for seen, method in ((got, "GET"), (deleted, "DELETE"), (cancelled, "POST")):
        (request,) = seen
        assert request.method == method
        sent_by_client(request)
        assert request.body == b""
    assert "content-type" not in got[0].headers
    assert "content-type" not in cancelled[0].headers  # body-less POST: nothing forced


def test_responses_retrieve_with_stream_true_relays_sse(client, httpserver):
    seen = upstream(
        httpserver, "/v1/responses/resp_1", "GET", sse_response(responses_stream_events(["ok"]))
    )
    stream = client.responses.retrieve("resp_1", stream=True, starting_after=2)
    events = list(stream)
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "ok"
    assert seen[0].query == {"stream": "true", "starting_after": "2"}


def test_responses_input_items_list_forwards_the_query(client, httpserver):
    items = {
        "object": "list",
        "data": [
            {
                "id": "msg_in_2",
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": "second"}],
            }
        ],
        "first_id": "msg_in_2",
        "last_id": "msg_in_2",
        "has_more": False,
    }
    seen = upstream(httpserver, "/v1/responses/resp_42/input_items", "GET", items)
    page = client.responses.input_items.list("resp_42", after="msg_in_1", limit=2, order="asc")
    assert [item.id for item in page.data] == ["msg_in_2"]
    (request,) = seen
    assert request.path == "/v1/responses/resp_42/input_items"
    assert request.query == {"after": "msg_in_1", "limit": "2", "order": "asc"}
    sent_by_client(request)


# --- models -----------------------------------------------------------------------------------


def test_models_retrieve_answers_an_alias_locally(client, httpserver):
    model = client.models.retrieve("fast")
    assert (model.id, model.object, model.owned_by) == ("fast", "model", "testprov")
    assert model.to_dict()["target"] == "upstream-fast"
    # an alias with '/' is sent as team%2Ffast and still found
    assert client.models.retrieve("team/fast").to_dict()["target"] == "upstream-fast"
    assert httpserver.log == []  # the upstream was never asked


def test_models_retrieve_an_id_with_a_slash_reaches_upstream_as_one_segment(client, httpserver):
    answer = {"id": "org/model-7b", "object": "model", "created": 1, "owned_by": "org"}
    seen: list[Seen] = []

    def handle(request: Request) -> Response:
        seen.append(record(request))
        return Response(json.dumps(answer), content_type="application/json")

    # werkzeug decodes the path it matches on; the raw URI is checked below
    httpserver.expect_request(re.compile(r"/v1/models/.+"), method="GET").respond_with_handler(
        handle
    )
    model = client.models.retrieve("org/model-7b")
    assert model.id == "org/model-7b"
    (request,) = seen
    assert request.raw_uri == "/v1/models/org%2Fmodel-7b"
    sent_by_client(request)


def test_models_list_puts_the_aliases_before_the_upstream_list(client, httpserver):
    theirs = {
        "object": "list",
        "data": [
            {"id": "upstream-fast", "object": "model", "created": 1, "owned_by": "prov"},
            {"id": "fast", "object": "model", "created": 2, "owned_by": "prov"},  # shadowed
            {"id": "other-model", "object": "model", "created": 3, "owned_by": "prov"},
        ],
    }
    seen = upstream(httpserver, "/v1/models", "GET", theirs)
    models = list(client.models.list())
    assert [(m.id, m.owned_by) for m in models] == [
        ("fast", "testprov"),
        ("image-alias", "testprov"),
        ("claude-alias", "testprov"),
        ("team/fast", "testprov"),
        ("upstream-fast", "prov"),
        ("other-model", "prov"),
    ]
    sent_by_client(seen[0])  # fetched with the client's own key


def test_models_list_is_the_aliases_alone_when_the_upstream_fails(client, httpserver):
    upstream(httpserver, "/v1/models", "GET", {"error": {"message": "down"}}, status=503)
    assert [m.id for m in client.models.list()] == list(MAPPING)


# --- audio, images, moderations ---------------------------------------------------------------


def test_audio_speech_streams_binary_bytes_intact(client, httpserver):
    audio = bytes(range(256)) * 1024 + b"\r\n\r\ndata: not-sse\n\n" + b"\x00" * 4096
    seen = upstream(
        httpserver,
        "/v1/audio/speech",
        "POST",
        Response(audio, content_type="audio/mpeg"),
    )
    with client.audio.speech.with_streaming_response.create(
        model="fast", voice="alloy", input="Hello there", response_format="mp3"
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        received = b"".join(response.iter_bytes(chunk_size=8192))
    assert received == audio
    assert seen[0].json == {
        "input": "Hello there",
        "model": "upstream-fast",
        "voice": "alloy",
        "response_format": "mp3",
    }


IMAGES = {
    "created": 1_767_225_600,
    "data": [{"b64_json": "iVBORw0KGgo=", "revised_prompt": "a red square"}],
    "usage": {"input_tokens": 10, "output_tokens": 100, "total_tokens": 110},
}


def test_images_generate(client, httpserver):
    seen = upstream(httpserver, "/v1/images/generations", "POST", IMAGES)
    result = client.images.generate(model="image-alias", prompt="a red square", size="1024x1024")
    assert result.data[0].b64_json == "iVBORw0KGgo="
    assert seen[0].json == {
        "prompt": "a red square",
        "model": "upstream-image",
        "size": "1024x1024",
    }
    sent_by_client(seen[0])


def test_images_edit_is_multipart_with_the_model_field_mapped(client, httpserver):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    seen = upstream(httpserver, "/v1/images/edits", "POST", IMAGES)
    result = client.images.edit(
        model="image-alias", image=("in.png", png, "image/png"), prompt="make it blue"
    )
    assert result.data[0].b64_json == "iVBORw0KGgo="
    (request,) = seen
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.form == {"model": "upstream-image", "prompt": "make it blue"}
    assert list(request.files.values()) == [png]


def test_moderations_create(client, httpserver):
    categories = {"harassment": False, "violence": True}
    answer = {
        "id": "modr-1",
        "model": "omni-moderation-latest",
        "results": [
            {
                "flagged": True,
                "categories": categories,
                "category_scores": {"harassment": 0.01, "violence": 0.93},
                "category_applied_input_types": {"harassment": ["text"], "violence": ["text"]},
            }
        ],
    }
    seen = upstream(httpserver, "/v1/moderations", "POST", answer)
    result = client.moderations.create(input="some text")  # no model: the route allows it
    assert result.results[0].flagged is True
    assert seen[0].json == {"input": "some text"}
    sent_by_client(seen[0])


# --- files ------------------------------------------------------------------------------------


def file_object(file_id="file-abc", purpose="batch", size=42):
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": 1_767_225_600,
        "filename": "requests.jsonl",
        "purpose": purpose,
        "status": "processed",
    }


def test_files_create_uploads_multipart(client, httpserver):
    jsonl = b'{"custom_id": "1", "method": "POST", "url": "/v1/responses"}\n' * 100
    seen = upstream(httpserver, "/v1/files", "POST", file_object(size=len(jsonl)))
    created = client.files.create(file=("requests.jsonl", jsonl), purpose="batch")
    assert (created.id, created.bytes) == ("file-abc", len(jsonl))
    (request,) = seen
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.form == {"purpose": "batch"}
    assert request.files == {"file": jsonl}
    sent_by_client(request)


def test_files_list_retrieve_content_and_delete(client, httpserver):
    listing = {
        "object": "list",
        "data": [file_object("file-1"), file_object("file-2")],
        "first_id": "file-1",
        "last_id": "file-2",
        "has_more": False,
    }
    content = b"".join(f'{{"custom_id": "{i}", "response": {{}}}}\n'.encode() for i in range(500))
    listed = upstream(httpserver, "/v1/files", "GET", listing)
    got = upstream(httpserver, "/v1/files/file-1", "GET", file_object("file-1"))
    downloaded = upstream(
        httpserver,
        "/v1/files/file-1/content",
        "GET",
        Response(content, content_type="application/octet-stream"),
    )
    deleted = upstream(
        httpserver,
        "/v1/files/file-1",
        "DELETE",
        {"id": "file-1", "object": "file", "deleted": True},
    )

    assert [f.id for f in client.files.list(purpose="batch", limit=2)] == ["file-1", "file-2"]
    assert client.files.retrieve("file-1").filename == "requests.jsonl"
    assert client.files.content("file-1").content == content
    assert client.files.delete("file-1").deleted is True

    assert listed[0].query == {"purpose": "batch", "limit": "2"}
    for seen, method in ((listed, "GET"), (got, "GET"), (downloaded, "GET"), (deleted, "DELETE")):
        (request,) = seen
        assert request.method == method
        assert request.body == b""
        sent_by_client(request)


# --- batches ----------------------------------------------------------------------------------


def batch_object(batch_id="batch_1", status="validating"):
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/responses",
        "input_file_id": "file-abc",
        "completion_window": "24h",
        "status": status,
        "created_at": 1_767_225_600,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": None,
    }


def test_batches_create_retrieve_list_and_cancel(client, httpserver):
    created = upstream(httpserver, "/v1/batches", "POST", batch_object())
    got = upstream(httpserver, "/v1/batches/batch_1", "GET", batch_object(status="in_progress"))
    listed = upstream(
        httpserver,
        "/v1/batches",
        "GET",
        {
            "object": "list",
            "data": [batch_object("batch_2")],
            "first_id": "batch_2",
            "last_id": "batch_2",
            "has_more": False,
        },
    )
    cancelled = upstream(
        httpserver, "/v1/batches/batch_1/cancel", "POST", batch_object(status="cancelling")
    )

    batch = client.batches.create(
        input_file_id="file-abc", endpoint="/v1/responses", completion_window="24h"
    )
    assert batch.id == "batch_1"
    assert client.batches.retrieve("batch_1").status == "in_progress"
    assert [b.id for b in client.batches.list(after="batch_1", limit=1)] == ["batch_2"]
    assert client.batches.cancel("batch_1").status == "cancelling"

    assert created[0].json == {
        "completion_window": "24h",
        "endpoint": "/v1/responses",
        "input_file_id": "file-abc",
    }
    assert listed[0].query == {"after": "batch_1", "limit": "1"}
    (cancel,) = cancelled
    assert cancel.body == b""
    assert "content-type" not in cancel.headers
    for seen in (created, got, listed, cancelled):
        sent_by_client(seen[0])


# --- Anthropic --------------------------------------------------------------------------------


def test_anthropic_messages_count_tokens(routed, httpserver):
    seen = upstream(httpserver, "/v1/messages/count_tokens", "POST", {"input_tokens": 14})
    client = anthropic.Anthropic(base_url=routed.url, api_key="ant-client-key", max_retries=0)
    count = client.messages.count_tokens(
        model="claude-alias", messages=[{"role": "user", "content": "Hello, Claude"}]
    )
    assert count.input_tokens == 14
    (request,) = seen
    assert request.json == {
        "messages": [{"role": "user", "content": "Hello, Claude"}],
        "model": "claude-upstream",
    }
    assert request.headers["x-api-key"] == "ant-client-key"
    assert "authorization" not in request.headers
    assert request.headers["anthropic-version"]
