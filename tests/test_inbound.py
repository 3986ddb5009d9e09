"""Reading the client's request: keys, bodies, multipart model mapping."""

from __future__ import annotations

import pytest

from apirouter.errors import BadRequest
from apirouter.proxy.inbound import client_key, multipart_body

BOUNDARY = "----b0und4ry"


def form(model: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01binary\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nsrt\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode("latin-1")


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def test_multipart_model_is_mapped_and_every_other_byte_kept():
    body = multipart_body(form("whisper-1"), CONTENT_TYPE, {"whisper-1": "big-whisper"})
    assert body.data == form("big-whisper")


def test_multipart_unmapped_model_is_forwarded_as_is():
    raw = form("other")
    body = multipart_body(raw, CONTENT_TYPE, {"whisper-1": "x"})
    assert body.data is raw


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary="])
def test_multipart_without_boundary_is_a_bad_request(content_type):
    with pytest.raises(BadRequest, match="boundary"):
        multipart_body(form("m"), content_type, {})


def test_client_key_sources():
    assert client_key({"authorization": "Bearer abc"}) == "abc"
    assert client_key({"authorization": "bearer  abc "}) == "abc"
    assert client_key({"x-api-key": "xyz"}) == "xyz"
    assert client_key({"authorization": "Basic Zm9v"}) is None
    assert client_key({}) is None


def test_include_usage_is_spliced_into_streaming_requests_that_do_not_ask():
    import json

    from apirouter.proxy.inbound import json_body

    raw = (
        b' {"model": "fast", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}'
    )
    body = json_body(raw, {"fast": "big"}, ask_usage=True)
    document = json.loads(body.data)
    assert document["stream_options"] == {"include_usage": True}
    assert document["model"] == "big" and document["messages"] == json.loads(raw)["messages"]
    assert body.data.replace(b'"stream_options": {"include_usage": true}, ', b"") == raw.replace(
        b'"fast"', b'"big"'
    )
    asked = b'{"model": "m", "stream": true, "stream_options": {"include_usage": false}}'
    assert json_body(asked, {}, ask_usage=True).data is asked  # the client decided
    plain = b'{"model": "m", "stream": false}'
    assert json_body(plain, {}, ask_usage=True).data is plain  # not streaming
