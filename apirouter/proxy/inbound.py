"""Reading the client's request: the one place that turns WSGI ``environ`` into an ``Inbound``.

Everything the router learns from the client comes from here: method, route, headers, the
key it presented, the request id, and the body (validated, with only ``model`` mapped).
The body is read last and on demand, so a request refused for its key or rate limit is
never read.

The body the client sent is forwarded byte for byte; only ``model`` changes, and only when
``modelMapping`` maps it. The older router re-serialised bodies through strict structs and
silently dropped ``tools``, ``response_format`` and multimodal content; we never do.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from apirouter import errors
from apirouter.config.provider import JSON_BODY, MULTIPART_BODY, Endpoint
from apirouter.upstream.hangup import ENVIRON_KEY as HANGUP_KEY
from apirouter.upstream.hangup import Hangup

JSON = "application/json"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# Bodies up to this size are read whole and may be sent again by a retry; a larger body
# is never sent twice.
REPLAYABLE_BYTES = 1024 * 1024
# A streamed body goes upstream in pieces of this size: memory per upload stays at the
# first MiB plus one piece, while 100 MB still takes only ~1,600 socket writes.
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Body:
    """A request body after validation: the bytes to send, whether it asks to stream, and
    the Content-Type the upstream must see (None: no body, send none).

    A body over ``REPLAYABLE_BYTES`` on a multipart route is *streamed*: ``data`` is only
    its first MiB (model mapped), ``rest`` yields the remainder from the client's input as
    it is sent upstream, and ``length`` is the total the upstream receives when the client
    declared one (None: sent chunked). It can be sent once only.
    """

    data: bytes
    stream: bool
    content_type: str | None = JSON
    pinned: bool = False  # names an object kept by one account (previous_response_id, conversation)
    model: str | None = None  # the upstream model when modelMapping chose it (a safe label)
    store: bool | None = None  # the body's top-level "store", when it is a boolean
    sent_model: str | None = None  # the model as the client named it: a scope key, never a label
    rest: Iterable[bytes] | None = field(default=None, repr=False)
    length: int | None = None

    @property
    def replayable(self) -> bool:
        return self.rest is None and len(self.data) <= REPLAYABLE_BYTES

    @property
    def streamed(self) -> bool:
        return self.rest is not None

    def content(self) -> bytes | Iterator[bytes]:
        """What the HTTP client sends: the bytes, or for a streamed body its pieces."""
        if self.rest is None:
            return self.data
        return itertools.chain((self.data,), self.rest)


EMPTY = Body(b"", False, None)


@dataclass
class Inbound:
    """One client request as the router sees it. ``key`` is a secret: never log it."""

    method: str
    path: str
    query: str
    route: str  # a known route, or "other": safe as a metrics label
    headers: Mapping[str, str]  # lowercase names
    key: str | None
    request_id: str
    environ: Mapping[str, Any]
    _raw: bytes | None = field(default=None, repr=False)
    _streamed: Body | None = field(default=None, repr=False)

    @property
    def hangup(self) -> Hangup | None:
        """How the server tells this request its client is gone (embedded server only)."""
        hangup: Hangup | None = self.environ.get(HANGUP_KEY)
        return hangup

    def read_body(self, endpoint: Endpoint, mapping: Mapping[str, str], limit: int) -> Body:
        """Read and validate the body this endpoint expects, mapping its ``model``.

        GET, DELETE and HEAD carry no body. A POST without one (``/cancel``) is accepted
        where the route needs no ``model``. ``limit`` applies unless the route sets its own;
        it is checked against the declared Content-Length before a byte is read.

        A route takes the body kinds it declares (``bodyKinds``), told apart by
        Content-Type. JSON bodies are read whole (the model is found and mapped anywhere
        inside them). Multipart bodies over ``REPLAYABLE_BYTES`` are streamed (see
        ``Body``): their model is mapped once, for the provider first asked, and such a body
        is never sent twice, so a fallback provider never gets to remap it. On a
        passed-through path any body that is not JSON is streamed as it came.
        """
        if self.method in ("GET", "DELETE", "HEAD"):
            return EMPTY
        if self._streamed is not None:
            return self._streamed
        content_type = self.headers.get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        limit = endpoint.max_body_bytes or limit
        kind = _body_kind(endpoint, media_type)
        streamable = endpoint.passthrough or MULTIPART_BODY in endpoint.body_kinds
        if self._raw is None and streamable and kind != JSON_BODY:
            incoming = open_body(self.environ, limit)
            if incoming.rest is not None:
                self._streamed = _streamed(incoming, kind, content_type, mapping, endpoint)
                return self._streamed
            self._raw = incoming.head
        if self._raw is None:  # read once; a fallback provider maps the same bytes anew
            self._raw = read_limited(self.environ, limit)
        raw = self._raw
        if not raw and not endpoint.requires_model:
            return EMPTY
        if kind == _AS_IT_CAME:
            return Body(raw, False, content_type or None)
        if kind == MULTIPART_BODY:
            return multipart_body(raw, content_type, mapping, required=endpoint.requires_model)
        if kind is None:
            raise _wrong_media_type(endpoint, media_type)
        ask_usage = (
            endpoint.stream_config.include_usage and endpoint.local_path in STREAM_OPTIONS_ROUTES
        )
        return json_body(raw, mapping, required=endpoint.requires_model, ask_usage=ask_usage)


def parse(environ: Mapping[str, Any], route: str) -> Inbound:
    """The request line and headers; the body stays unread until ``read_body``."""
    headers = client_headers(environ)
    return Inbound(
        method=environ.get("REQUEST_METHOD", "GET"),
        path=environ.get("PATH_INFO") or "/",
        query=environ.get("QUERY_STRING", ""),
        route=route,
        headers=headers,
        key=client_key(headers),
        request_id=request_id(headers.get("x-request-id")),
        environ=environ,
    )


def client_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    return headers


def client_key(headers: Mapping[str, str]) -> str | None:
    """The API key the client presented, from ``Authorization: Bearer`` or ``x-api-key``."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


def request_id(supplied: str | None) -> str:
    """The client's request id when it is sane (it goes into logs and headers), else ours."""
    if supplied and _SANE_REQUEST_ID.match(supplied):
        return supplied
    return os.urandom(16).hex()  # as uuid4().hex, without building a UUID


def read_limited(environ: Mapping[str, Any], limit: int) -> bytes:
    """Read the body, refusing an oversized one before reading it."""
    declared = declared_length(environ, limit)
    stream = environ["wsgi.input"]
    if declared is None:
        data = stream.read(limit + 1) if environ.get("wsgi.input_terminated") else b""
    else:
        data = stream.read(declared)
    if len(data) > limit:
        raise _too_large(limit)
    return bytes(data)


def declared_length(environ: Mapping[str, Any], limit: int) -> int | None:
    """The client's Content-Length (None: not sent), refused at once if over ``limit``."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if not declared:
        return None
    if not declared.isdigit():
        raise errors.BadRequest(f"Invalid Content-Length header {declared[:32]!r}.")
    if int(declared) > limit:
        raise errors.PayloadTooLarge(
            f"Request body of {declared} bytes exceeds the limit of {limit} bytes."
        )
    return int(declared)


def _too_large(limit: int) -> errors.RouterError:
    return errors.PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")


@dataclass(frozen=True)
class Incoming:
    """A body as opened by ``open_body``: ``head`` is the whole body, or (when ``rest`` is
    not None) its first ``REPLAYABLE_BYTES`` + 1 bytes, the remainder still unread."""

    head: bytes
    rest: Iterator[bytes] | None = None
    length: int | None = None  # declared by the client


def open_body(environ: Mapping[str, Any], limit: int, chunk: int = CHUNK_BYTES) -> Incoming:
    """Read a body whole if it is at most ``REPLAYABLE_BYTES``, else its head and a reader
    for the rest, which enforces ``limit`` on a body of undeclared length as it goes."""
    declared = declared_length(environ, limit)
    stream = environ["wsgi.input"]
    if declared is None and not environ.get("wsgi.input_terminated"):
        return Incoming(b"")  # no length, no terminated input: WSGI says there is no body
    wanted = REPLAYABLE_BYTES + 1 if declared is None else min(declared, REPLAYABLE_BYTES + 1)
    head = _read_up_to(stream, wanted)
    if len(head) > limit:
        raise _too_large(limit)
    if len(head) <= REPLAYABLE_BYTES:
        return Incoming(head, None, declared)
    remaining = None if declared is None else declared - len(head)
    return Incoming(head, _remainder(stream, len(head), remaining, limit, chunk), declared)


def _read_up_to(stream: Any, size: int) -> bytes:
    """``size`` bytes, or fewer at the end of the input (one read may return less)."""
    pieces, got = [], 0
    while got < size:
        piece = stream.read(size - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _remainder(
    stream: Any, received: int, remaining: int | None, limit: int, chunk: int
) -> Iterator[bytes]:
    """The rest of a streamed body, piece by piece as the upstream client asks for it.

    Raising here aborts the upstream request mid-body, so the upstream never sees a body
    over the limit nor a truncated one complete. The client's response has not started
    while its body is being sent, so it gets the 413 (or 400).
    """
    while remaining is None or remaining > 0:
        piece = stream.read(chunk if remaining is None else min(chunk, remaining))
        if not piece:
            if remaining:
                raise errors.BadRequest(
                    f"Request body ended {remaining} bytes short of its Content-Length."
                )
            return
        received += len(piece)
        if received > limit:
            raise _too_large(limit)
        if remaining is not None:
            remaining -= len(piece)
        yield bytes(piece)


_MEDIA_TYPES = {JSON_BODY: JSON, MULTIPART_BODY: "multipart/form-data"}
_AS_IT_CAME = "as it came"  # a passed-through body that is not JSON: streamed unread


def _body_kind(endpoint: Endpoint, media_type: str) -> str | None:
    """Which of the route's body kinds ``media_type`` is; None when it is none of them."""
    is_json = media_type == JSON or media_type.endswith("+json")
    if is_json and JSON_BODY in endpoint.body_kinds:
        return JSON_BODY
    if endpoint.passthrough:
        return _AS_IT_CAME
    if media_type == "multipart/form-data" and MULTIPART_BODY in endpoint.body_kinds:
        return MULTIPART_BODY
    return None


def _streamed(
    incoming: Incoming,
    kind: str | None,
    content_type: str,
    mapping: Mapping[str, str],
    endpoint: Endpoint,
) -> Body:
    """A body over ``REPLAYABLE_BYTES``, sent upstream as it arrives (refused before its
    rest is read when the route does not take its kind)."""
    if kind == _AS_IT_CAME:
        content = content_type or None
        return Body(incoming.head, False, content, rest=incoming.rest, length=incoming.length)
    if kind != MULTIPART_BODY:
        raise _wrong_media_type(endpoint, content_type.partition(";")[0].strip().lower())
    return multipart_stream(incoming, content_type, mapping, required=endpoint.requires_model)


def _wrong_media_type(endpoint: Endpoint, got: str) -> errors.RouterError:
    expected = " or ".join(_MEDIA_TYPES[kind] for kind in sorted(endpoint.body_kinds))
    return errors.UnsupportedMediaType(
        f"{endpoint.local_path} expects Content-Type {expected}, got {got or 'none'}."
    )


STREAM_OPTIONS_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions"))
_ASK_USAGE = '"stream_options": {"include_usage": true}, '


def json_body(
    raw: bytes, mapping: Mapping[str, str], *, required: bool = True, ask_usage: bool = False
) -> Body:
    """Validate a JSON request body and map its model; every other byte is untouched.

    The mapped model is spliced into the original text rather than re-serialising the
    document, so nothing the client sent (key order, number spelling, escapes such as a
    lone surrogate ``\\ud800``) can change or make the rewrite fail.
    """
    if not raw.strip():
        raise errors.BadRequest("Request body is empty: send a JSON object with a 'model' field.")
    try:
        text = raw.decode("utf-8")  # RFC 8259: JSON on the wire is UTF-8
    except UnicodeDecodeError:
        raise errors.InvalidJSON("Request body is not UTF-8 encoded JSON.") from None
    members = _top_level_members(text)
    stream = members.get("stream", (None, 0, 0))[0] is True
    pinned = "previous_response_id" in members or "conversation" in members
    store = members.get("store", (None, 0, 0))[0]
    store = store if isinstance(store, bool) else None
    if "model" not in members:
        if not required:
            return Body(raw, stream, pinned=pinned, store=store)
        raise errors.BadRequest("Request body is missing the required 'model' field.")
    model, start, end = members["model"]
    if not isinstance(model, str) or not model.strip():
        raise errors.BadRequest("'model' must be a non-empty string.")
    target = mapping.get(model)
    add_usage = ask_usage and stream and "stream_options" not in members
    if target is None and not add_usage:
        return Body(raw, stream, pinned=pinned, store=store, sent_model=model)
    if target is not None:
        text = text[:start] + json.dumps(target, ensure_ascii=False) + text[end:]
    if add_usage:  # right after the opening brace: the object has members (model at least)
        brace = text.index("{")
        text = text[: brace + 1] + _ASK_USAGE + text[brace + 1 :]
    return Body(
        text.encode("utf-8"), stream, pinned=pinned, model=target, store=store, sent_model=model
    )


_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
Member = tuple[Any, int, int]  # value, and where its text starts and ends


def _top_level_members(text: str) -> dict[str, Member]:
    """Parse a JSON object, keeping where each top-level value sits in ``text``.

    As with ``json.loads``, a repeated key keeps its last value. Python's own limits on
    client bytes (nesting depth, integer digits) become a 400, never a 500.
    """
    try:
        return _scan_object(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidJSON(
            f"Request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
        ) from None
    except RecursionError:
        raise errors.InvalidJSON("Request body is not valid JSON: nested too deeply.") from None
    except ValueError:  # Python refuses integers of more than 4,300 digits
        raise errors.InvalidJSON(
            "Request body is not valid JSON we accept: a number has too many digits."
        ) from None


def _scan_object(text: str) -> dict[str, Member]:
    position = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("{", position):
        _DECODER.decode(text)  # a syntax error is reported as json reports it
        raise errors.BadRequest("Request body must be a JSON object.")
    members: dict[str, Member] = {}
    position = _skip(text, position + 1)
    if text.startswith("}", position):
        return _end_of_document(text, position + 1, members)
    while True:
        if not text.startswith('"', position):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, position
            )
        key, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
        position = _skip(text, position)
        if not text.startswith(":", position):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, position)
        start = _skip(text, position + 1)
        try:
            value, position = _DECODER.scan_once(text, start)  # type: ignore[attr-defined]
        except StopIteration as stop:
            raise json.JSONDecodeError("Expecting value", text, stop.value) from None
        members[key] = (value, start, position)
        position = _skip(text, position)
        if text.startswith("}", position):
            return _end_of_document(text, position + 1, members)
        if not text.startswith(",", position):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        position = _skip(text, position + 1)


def _skip(text: str, position: int) -> int:
    return _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]


def _end_of_document(text: str, position: int, members: dict[str, Member]) -> dict[str, Member]:
    if _skip(text, position) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, position))
    return members


_MODEL_PART = re.compile(rb'content-disposition:[^\r\n]*\bname="model"', re.IGNORECASE)


def multipart_body(
    raw: bytes, content_type: str, mapping: Mapping[str, str], *, required: bool = True
) -> Body:
    """Find the ``model`` form field of a multipart body and map it, byte-preserving."""
    delimiter = _delimiter(content_type)
    parts = raw.split(delimiter)
    if len(parts) < 3:
        raise errors.BadRequest("Multipart body does not contain the boundary from Content-Type.")
    found, mapped, sent = _map_model_part(parts, mapping)
    if mapped:
        return Body(delimiter.join(parts), False, content_type, model=mapped, sent_model=sent)
    if found or not required:
        return Body(raw, False, content_type, sent_model=sent)
    raise errors.BadRequest("Multipart body is missing the required 'model' form field.")


def multipart_stream(
    incoming: Incoming, content_type: str, mapping: Mapping[str, str], *, required: bool = True
) -> Body:
    """A multipart body over 1 MiB, streamed: its ``model`` is mapped when that part lies
    whole within the first MiB, and the rest passes untouched.

    Clients send form fields before files (the openai SDK hands httpx ``data`` fields,
    which httpx writes before ``files``), so the model is found there in practice. A
    route that requires a model refuses a large body whose model comes later: mapping it
    would mean holding the whole body. The declared length changes by the mapping's delta.
    """
    delimiter = _delimiter(content_type)
    parts = incoming.head.split(delimiter)
    if len(parts) < 2:
        raise errors.BadRequest("Multipart body does not contain the boundary from Content-Type.")
    whole = parts[:-1]  # the last part may continue past the head
    found, mapped, sent = _map_model_part(whole, mapping)
    if not found and required:
        raise errors.BadRequest(
            f"Multipart body over {REPLAYABLE_BYTES} bytes must send its 'model' form field "
            "before the file, within the first MiB."
        )
    head = delimiter.join([*whole, parts[-1]]) if mapped else incoming.head
    length = incoming.length
    if length is not None:
        length += len(head) - len(incoming.head)
    return Body(
        head,
        False,
        content_type,
        model=mapped,
        sent_model=sent,
        rest=incoming.rest,
        length=length,
    )


def _map_model_part(
    parts: list[bytes], mapping: Mapping[str, str]
) -> tuple[bool, str | None, str | None]:
    """Map the ``model`` part among ``parts`` in place: (a model was found, the upstream
    model it was mapped to, if any, the model as sent)."""
    for index, part in enumerate(parts):
        head, separator, value = part.partition(b"\r\n\r\n")
        if not separator or not _MODEL_PART.search(head):
            continue
        model = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
        if not model:
            return False, None, None
        target = mapping.get(model)
        if target is None:
            return True, None, model
        parts[index] = head + separator + target.encode() + b"\r\n"
        return True, target, model
    return False, None, None


def _delimiter(content_type: str) -> bytes:
    return b"--" + _boundary(content_type).encode("latin-1")


def _boundary(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary" and value.strip('"'):
            return value.strip('"')
    raise errors.BadRequest("Content-Type multipart/form-data must carry a boundary parameter.")
