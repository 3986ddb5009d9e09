"""Token usage, read on the side from the bytes already relayed.

The relay hands every chunk to a ``UsageReader`` after it has passed it on, so parsing
never holds a byte back. The reader copes with what real upstreams send:

- a whole JSON body (chat, completions, embeddings, Responses, Anthropic messages), or an
  SSE stream whose usage arrives in one event: OpenAI chat's final chunk (with
  ``stream_options.include_usage``), the Responses API's ``response.completed``,
  Anthropic's ``message_start`` and ``message_delta`` (cumulative: the last value wins);
- events split across chunks at any byte;
- gzip or deflate bodies (the official SDKs ask for them): a copy is decompressed here,
  the client still gets the upstream's bytes. Each inflate step is bounded
  (``max_length``), so a bomb (59 KiB inflating to 60 MiB) never inflates past the cap.

Anything it cannot read (not JSON, an odd shape, brotli, a body past the size cap, a count
above ``MAX_TOKENS``) gives "unknown", never an error: an upstream's bytes must never
make ``finish`` fail (a 401-digit count once overflowed the metrics there).

Counts follow the providers' billing: ``input`` is every input token billed, cached ones
included (OpenAI ``prompt_tokens``; Anthropic ``input_tokens`` + cache creation + cache
reads), ``cached_input`` the part read from cache, ``output`` the generated tokens.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

# The routes whose answers carry token usage.
USAGE_ROUTES = frozenset(
    (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    )
)
MAX_JSON_BODY = 4 * 1024 * 1024  # larger bodies are not kept for parsing
MAX_PENDING_EVENT = 1024 * 1024  # an SSE event larger than this is skipped
INFLATE_STEP = 64 * 1024  # inflated bytes per step: an SSE stream is inflated piecewise
MAX_TOKENS = 10**12  # larger counts are unreadable, not billed
_BOUNDARIES = (b"\n\n", b"\r\n\r\n")


@dataclass
class Usage:
    input: int = 0
    cached_input: int = 0
    output: int = 0


def counts(usage: Any) -> Usage | None:
    """Normalise one ``usage`` object of any supported shape; None when it is not one."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:  # OpenAI chat, completions, embeddings
        details = usage.get("prompt_tokens_details") or {}
        return Usage(
            _int(usage.get("prompt_tokens")),
            _int(details.get("cached_tokens") if isinstance(details, dict) else 0),
            _int(usage.get("completion_tokens")),
        )
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses API, Anthropic
        created = _int(usage.get("cache_creation_input_tokens"))
        read = _int(usage.get("cache_read_input_tokens"))
        details = usage.get("input_tokens_details") or {}
        cached = read or _int(details.get("cached_tokens") if isinstance(details, dict) else 0)
        return Usage(
            _int(usage.get("input_tokens")) + created + read,
            cached,
            _int(usage.get("output_tokens")),
        )
    return None


def _int(value: Any) -> int:
    """A token count: a positive int up to ``MAX_TOKENS``, else 0 (nothing readable)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKENS:
        return value
    return 0


class UsageReader:
    """Fed every relayed chunk; ``result()`` is the usage once the body has ended."""

    def __init__(self, content_type: str, content_encoding: str | None) -> None:
        self._sse = content_type.startswith("text/event-stream")
        self._inflate = _decompressor(content_encoding)
        self._unreadable = content_encoding not in (None, "", "identity") and self._inflate is None
        self._pending = bytearray()
        self._usage: Usage | None = None
        self._anthropic_input: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self._unreadable or not chunk:
            return
        if self._inflate is None:
            self._take(chunk)
            return
        while True:  # bounded steps: a bomb never inflates whole
            try:
                piece = self._inflate.decompress(chunk, INFLATE_STEP)
            except zlib.error:
                self._unreadable = True
                return
            chunk = self._inflate.unconsumed_tail
            self._take(piece)
            # a full step may leave output inside zlib even when the input is used up
            if self._unreadable or (not chunk and len(piece) < INFLATE_STEP):
                return

    def _take(self, chunk: bytes) -> None:
        """Keep (or skip) one piece of the plain body."""
        if not chunk:
            return
        whole_events = self._sse and not self._pending and chunk.endswith(_BOUNDARIES)
        if whole_events and b"usage" not in chunk:  # nothing to parse, nothing to keep
            return
        if not self._sse and len(self._pending) + len(chunk) > MAX_JSON_BODY:
            self._unreadable = True  # past the cap: stop keeping (and inflating) at once
            self._pending = bytearray()
            return
        self._pending += chunk
        if self._sse:
            self._events()

    def result(self) -> Usage | None:
        """The usage read, or None when it is unknown (never raises)."""
        if not self._sse and not self._unreadable and self._pending:
            try:
                document = json.loads(self._pending)  # no copy
            except (ValueError, RecursionError):
                return None
            self._pending.clear()
            if isinstance(document, dict):
                self._usage = counts(document.get("usage"))
        return self._usage

    # --- SSE -----------------------------------------------------------------------------

    def _events(self) -> None:
        while True:
            end, size = _boundary(self._pending)
            if end < 0:
                if len(self._pending) > MAX_PENDING_EVENT:
                    self._pending.clear()  # no event is that large: resynchronise
                return
            event = bytes(self._pending[:end])
            del self._pending[: end + size]
            if b"usage" in event:  # most events carry none: skip their JSON entirely
                self._event(event)

    def _event(self, event: bytes) -> None:
        data = b"\n".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
        )
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(document, dict):
            return
        kind = document.get("type")
        if kind == "response.completed":  # Responses API
            response = document.get("response")
            found = counts(response.get("usage")) if isinstance(response, dict) else None
        elif kind == "message_start":  # Anthropic: input tokens up front
            message = document.get("message")
            found = counts(message.get("usage")) if isinstance(message, dict) else None
            if found is not None:
                found.output = 0  # a placeholder here; message_delta carries the real count
            self._anthropic_input = found
        elif kind == "message_delta":  # Anthropic: cumulative output, the last one wins
            found = counts(document.get("usage"))
            if found is not None and self._anthropic_input is not None:
                found.input = found.input or self._anthropic_input.input
                found.cached_input = found.cached_input or self._anthropic_input.cached_input
        else:  # OpenAI chat's final chunk
            found = counts(document.get("usage"))
        if found is not None:
            self._usage = found


def _boundary(buffer: bytearray) -> tuple[int, int]:
    """Where the first complete event ends, and the separator's length (-1 if none)."""
    ends = [(buffer.find(b), len(b)) for b in _BOUNDARIES]
    found = [(end, size) for end, size in ends if end >= 0]
    return min(found) if found else (-1, 0)


def _decompressor(encoding: str | None) -> Any:
    if encoding == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None
