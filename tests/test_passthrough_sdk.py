"""The whole OpenAI API through a router with the default config only (issue 22).

Each family the built-in templates do not carry passes through: the official openai SDK
calls it through the router, and the recording upstream receives exactly what the SDK
sent (method, raw path, query, body and content type), seen on both sides of the router.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from upstream_fakes import sse_response
from werkzeug import Request, Response

# The Assistants API (beta.assistants, beta.threads) is deprecated in the SDK, still served.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CLIENT_KEY = "sk-client-passthrough"
ANSWER = {
    "id": "obj_1",
    "object": "list",
    "data": [],
    "has_more": False,
    "first_id": None,
    "last_id": None,
    "deleted": True,
    "status": "completed",
    "input_tokens": 3,
}


@dataclass(frozen=True)
class Wire:
    """One request as seen on the wire, multipart boundaries made alike."""

    method: str
    target: str  # raw path and query
    content_type: str
    body: bytes


def _alike(content_type: str, body: bytes) -> tuple[str, bytes]:
    found = re.search(r"boundary=([^;\s]+)", content_type)
    if not found:
        return content_type, body
    boundary = found.group(1).strip('"')
    return content_type.replace(boundary, "B"), body.replace(boundary.encode(), b"B")


def _wire(method: str, target: str, content_type: str | None, body: bytes) -> Wire:
    """No body, no Content-Type: the router sends none with an empty body (the SDK sends
    application/json with its body-less POSTs, such as cancels)."""
    content_type, body = _alike(content_type or "", body)
    return Wire(method, target, content_type if body else "", body)


@pytest.fixture(scope="module")
def routed(make_module_router):
    return make_module_router()  # {"name": "testprov", "baseUrl": ...}: nothing else


@pytest.fixture
def arrived(httpserver) -> Iterator[list[Wire]]:
    """Every request the upstream received; it answers a generic object (or a stream)."""
    seen: list[Wire] = []

    def handle(request: Request) -> Response:
        body = request.get_data()
        target = request.environ.get("REQUEST_URI") or request.environ["RAW_URI"]
        seen.append(_wire(request.method, target, request.headers.get("Content-Type"), body))
        if request.mimetype == "application/json" and json.loads(body or b"{}").get("stream"):
            event = {"type": "image_generation.completed", "b64_json": "", "usage": {}}
            return sse_response([f"data: {json.dumps(event)}\n\n".encode()])
        return Response(json.dumps(ANSWER), content_type="application/json")

    httpserver.expect_request(re.compile("/v1/.*")).respond_with_handler(handle)
    yield seen


@pytest.fixture
def sdk(routed) -> Iterator[tuple[openai.OpenAI, list[Wire]]]:
    """An openai client of the router, and what it sent (read by an event hook)."""
    sent: list[Wire] = []

    def remember(request: Any) -> None:
        body = request.read()
        target = request.url.raw_path.decode()
        sent.append(_wire(request.method, target, request.headers.get("content-type"), body))

    http_client = openai.DefaultHttpxClient(event_hooks={"request": [remember]})
    client = openai.OpenAI(
        base_url=routed.v1, api_key=CLIENT_KEY, max_retries=0, timeout=10, http_client=http_client
    )
    yield client, sent
    client.close()


def _stream(result: Any) -> Any:
    return list(result) if isinstance(result, openai.Stream) else result


CALLS: dict[str, Callable[[openai.OpenAI], Any]] = {
    # assistants, threads, runs
    "assistants.create": lambda c: c.beta.assistants.create(model="gpt-4o", name="a"),
    "assistants.list": lambda c: c.beta.assistants.list(limit=2, order="asc"),
    "threads.create": lambda c: c.beta.threads.create(metadata={"k": "v"}),
    "threads.messages.list": lambda c: c.beta.threads.messages.list("thread_1", limit=3),
    "runs.create": lambda c: c.beta.threads.runs.create("thread_1", assistant_id="asst_1"),
    "runs.cancel": lambda c: c.beta.threads.runs.cancel("run_1", thread_id="thread_1"),
    # vector stores, their files, file batches and search
    "vector_stores.create": lambda c: c.vector_stores.create(name="kb"),
    "vector_stores.delete": lambda c: c.vector_stores.delete("vs_1"),
    "vector_stores.files.create": lambda c: c.vector_stores.files.create("vs_1", file_id="file_1"),
    "vector_stores.files.list": lambda c: c.vector_stores.files.list("vs_1", filter="completed"),
    "vector_stores.file_batches.create": lambda c: c.vector_stores.file_batches.create(
        "vs_1", file_ids=["file_1", "file_2"]
    ),
    "vector_stores.search": lambda c: c.vector_stores.search("vs_1", query="refund policy"),
    # fine-tuning jobs and checkpoints
    "fine_tuning.jobs.create": lambda c: c.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file="file_1"
    ),
    "fine_tuning.jobs.list": lambda c: c.fine_tuning.jobs.list(limit=2),
    "fine_tuning.jobs.cancel": lambda c: c.fine_tuning.jobs.cancel("ftjob_1"),
    "fine_tuning.checkpoints.list": lambda c: c.fine_tuning.jobs.checkpoints.list("ftjob_1"),
    # evals and runs
    "evals.create": lambda c: c.evals.create(
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[],
    ),
    "evals.list": lambda c: c.evals.list(limit=1),
    "evals.runs.list": lambda c: c.evals.runs.list("eval_1"),
    # containers and their files, in both body shapes
    "containers.create": lambda c: c.containers.create(name="sandbox"),
    "containers.files.create (JSON)": lambda c: c.containers.files.create(
        "cntr_1", file_id="file_1"
    ),
    "containers.files.create (multipart)": lambda c: c.containers.files.create(
        "cntr_1", file=("data.csv", b"a,b\n1,2\n", "text/csv")
    ),
    "containers.files.content": lambda c: c.containers.files.content.retrieve(
        "cfile_1", container_id="cntr_1"
    ),
    # conversations and items
    "conversations.create": lambda c: c.conversations.create(metadata={"topic": "t"}),
    "conversations.items.create": lambda c: c.conversations.items.create(
        "conv_1", items=[{"type": "message", "role": "user", "content": "hi"}]
    ),
    "conversations.items.list": lambda c: c.conversations.items.list("conv_1", limit=5),
    # uploads and parts
    "uploads.create": lambda c: c.uploads.create(
        bytes=8, filename="a.jsonl", mime_type="text/jsonl", purpose="batch"
    ),
    "uploads.parts.create": lambda c: c.uploads.parts.create("upload_1", data=b"{}\n{}\n{}"),
    "uploads.complete": lambda c: c.uploads.complete("upload_1", part_ids=["part_1"]),
    # videos
    "videos.create": lambda c: c.videos.create(prompt="a cat", model="sora-2"),
    "videos.list": lambda c: c.videos.list(limit=2),
    "videos.remix": lambda c: c.videos.remix("video_1", prompt="a dog"),
    # skills
    "skills.create": lambda c: c.skills.create(files=[("SKILL.md", b"# skill", "text/markdown")]),
    "skills.list": lambda c: c.skills.list(),
    "skills.versions.list": lambda c: c.skills.versions.list("skill_1"),
    # realtime over plain HTTP: client secrets and calls (an SDP offer, not JSON)
    "realtime.client_secrets.create": lambda c: c.realtime.client_secrets.create(),
    "realtime.calls.create": lambda c: c.realtime.calls.create(sdp="v=0\r\no=- 1 1 IN IP4 0\r\n"),
    "realtime.calls.hangup": lambda c: c.realtime.calls.hangup("call_1"),
    # audio voices
    "audio.voices.create": lambda c: c.audio.voices.create(
        name="narrator", prompt="calm", type="prompt"
    ),
    "audio.voices.delete": lambda c: c.audio.voices.delete("voice_1"),
    # built-in routes the API defines: stored chat completions, Responses' fixed segments
    "chat.completions.list": lambda c: c.chat.completions.list(limit=2),
    "chat.completions.retrieve": lambda c: c.chat.completions.retrieve("chatcmpl_1"),
    "chat.completions.update": lambda c: c.chat.completions.update(
        "chatcmpl_1", metadata={"k": "v"}
    ),
    "chat.completions.delete": lambda c: c.chat.completions.delete("chatcmpl_1"),
    "chat.completions.messages.list": lambda c: c.chat.completions.messages.list("chatcmpl_1"),
    "responses.input_tokens.count": lambda c: c.responses.input_tokens.count(
        model="gpt-5", input="hello"
    ),
    "responses.compact": lambda c: c.responses.compact(model="gpt-5", input="hello"),
    "images.generate(stream=True)": lambda c: _stream(
        c.images.generate(model="gpt-image-1", prompt="a lighthouse", stream=True)
    ),
    "models.delete": lambda c: c.models.delete("ft:gpt-4o:acme::abc"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_the_sdk_call_reaches_the_upstream_as_sent(name, sdk, arrived):
    client, sent = sdk
    CALLS[name](client)
    assert len(sent) == 1 and len(arrived) == 1, (sent, arrived)
    assert arrived[0] == sent[0]
