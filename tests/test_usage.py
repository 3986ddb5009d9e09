"""The usage reader on recorded bodies: every shape, every split point, gzip, cut streams."""

from __future__ import annotations

import gzip
import json

import pytest

from apirouter.observe.usage import INFLATE_STEP, MAX_JSON_BODY, Usage, UsageReader, counts


def sse(*documents: dict | str) -> bytes:
    return b"".join(
        b"data: " + (d if isinstance(d, str) else json.dumps(d)).encode() + b"\n\n"
        for d in documents
    )


OPENAI_CHAT_STREAM = sse(
    {"choices": [{"delta": {"content": "Hel"}}]},
    {"choices": [{"delta": {"content": "lo"}}]},
    {
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    },
    "[DONE]",
)
RESPONSES_STREAM = (
    b"event: response.created\n"
    + sse({"type": "response.created", "response": {"usage": None}})
    + b"event: response.output_text.delta\n"
    + sse({"type": "response.output_text.delta", "delta": "usage is fine"})
    + b"event: response.completed\n"
    + sse(
        {
            "type": "response.completed",
            "response": {
                "usage": {
                    "input_tokens": 20,
                    "input_tokens_details": {"cached_tokens": 5},
                    "output_tokens": 9,
                }
            },
        }
    )
)
ANTHROPIC_STREAM = (
    b"event: message_start\r\n"
    + sse(
        {
            "type": "message_start",
            "message": {
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": 3,
                    "cache_read_input_tokens": 2,
                    "output_tokens": 1,
                }
            },
        }
    ).replace(b"\n\n", b"\r\n\r\n")
    + sse({"type": "content_block_delta", "delta": {"text": "hi"}})
    + sse({"type": "message_delta", "usage": {"output_tokens": 5}})
    + sse({"type": "message_delta", "usage": {"output_tokens": 12}})
    + sse({"type": "message_stop"})
)
EXPECTED = {
    "openai": Usage(11, 4, 7),
    "responses": Usage(20, 5, 9),
    "anthropic": Usage(15, 2, 12),
}
STREAMS = {
    "openai": OPENAI_CHAT_STREAM,
    "responses": RESPONSES_STREAM,
    "anthropic": ANTHROPIC_STREAM,
}


def read(chunks: list[bytes], content_type="text/event-stream", encoding=None) -> Usage | None:
    reader = UsageReader(content_type, encoding)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.result()


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_point_of_a_recorded_stream_gives_the_same_usage(name):
    stream = STREAMS[name]
    for split in range(len(stream) + 1):
        assert read([stream[:split], stream[split:]]) == EXPECTED[name], split


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_byte_by_byte(name):
    stream = STREAMS[name]
    assert read([stream[i : i + 1] for i in range(len(stream))]) == EXPECTED[name]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}},
            Usage(8, 0, 2),
        ),
        ({"object": "list", "usage": {"prompt_tokens": 6, "total_tokens": 6}}, Usage(6, 0, 0)),
        ({"usage": {"input_tokens": 4, "output_tokens": 3}}, Usage(4, 0, 3)),
        (
            {"usage": {"input_tokens": 4, "cache_read_input_tokens": 10, "output_tokens": 3}},
            Usage(14, 10, 3),
        ),
    ],
)
def test_json_bodies(body, expected):
    data = json.dumps(body).encode()
    assert read([data[:5], data[5:]], "application/json") == expected


def test_a_gzip_body_is_counted_and_a_brotli_one_is_unknown():
    data = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
    packed = gzip.compress(data)
    assert read([packed[:7], packed[7:]], "application/json", "gzip") == Usage(3, 0, 1)
    assert read([packed], "application/json", "br") is None
    assert read([b"not gzip at all"], "application/json", "gzip") is None


def test_a_stream_cut_before_its_usage_event_counts_no_output():
    assert (
        read([OPENAI_CHAT_STREAM[: OPENAI_CHAT_STREAM.index(b'{"choices": [], "usage"')]]) is None
    )
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b'{"type": "message_delta"')]
    assert read([cut]) == Usage(15, 2, 0)  # input was billed; no output is claimed


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"usage": "lots"}',
        b'{"usage": {"tokens": 3}}',
        b"[" * 100_000,
    ],
)
def test_odd_bodies_are_unknown_never_an_error(body):
    assert read([body], "application/json") is None
    assert read([b"data: " + body + b"\n\n"]) is None


def test_counts_ignores_nonsense_values():
    assert counts({"prompt_tokens": -3, "completion_tokens": True}) == Usage(0, 0, 0)
    assert counts(None) is None


def test_counts_above_a_trillion_or_not_plain_integers_are_ignored():
    hostile = {
        "prompt_tokens": 10**400,
        "completion_tokens": 10**20,
        "prompt_tokens_details": {"cached_tokens": -(10**400)},
    }
    assert counts(hostile) == Usage(0, 0, 0)
    assert counts({"prompt_tokens": 1e20, "completion_tokens": [7]}) == Usage(0, 0, 0)
    assert counts({"input_tokens": {"n": 3}, "output_tokens": 10**12}) == Usage(0, 0, 10**12)


def bomb(size: int) -> bytes:
    """A gzip body of ``size`` zero bytes (60 MiB pack into about 59 KiB)."""
    return gzip.compress(bytes(size), compresslevel=9)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_gzip_bomb_is_inflated_in_bounded_steps(content_type):
    import tracemalloc

    packed = bomb(60 * 1024 * 1024)
    assert len(packed) < 64 * 1024
    tracemalloc.start()
    try:
        reader = UsageReader(content_type, "gzip")
        for start in range(0, len(packed), 16 * 1024):
            reader.feed(packed[start : start + 16 * 1024])
        assert reader.result() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_JSON_BODY + 1024 * 1024  # never the 60 MiB, nor a copy of the cap


def test_a_gzip_body_inflating_to_whole_steps_is_read_to_its_end():
    padding = " " * (4 * INFLATE_STEP - 20)  # the usage sits past several full steps
    data = ('{"pad": "' + padding + '", "usage": {"prompt_tokens": 5}}').encode()
    assert read([gzip.compress(data)], "application/json", "gzip") == Usage(5, 0, 0)
    events = sse({"pad": padding}, {"choices": [], "usage": {"prompt_tokens": 6}})
    assert read([gzip.compress(events)], "text/event-stream", "gzip") == Usage(6, 0, 0)
