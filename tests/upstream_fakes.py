"""Canned upstream answers in the providers' real wire formats."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator

from werkzeug import Response

CHAT_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "upstream-model",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
    "model": "upstream-embed",
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}

ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-upstream",
    "content": [{"type": "text", "text": "hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 2},
}


def chat_chunk(text: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def sse_response(events: Iterable[bytes]) -> Response:
    return Response(iter(events), content_type="text/event-stream")


def chat_stream(words: list[str]) -> Iterator[bytes]:
    for word in words:
        yield chat_chunk(word)
    yield b"data: [DONE]\n\n"


def anthropic_stream() -> Iterator[bytes]:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": None},
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi "},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "there"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 2},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    for name, data in events:
        yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class LoopbackListener:
    """A raw-socket server on loopback: each connection it accepts is served (``_serve``)
    on a thread of its own; it counts them. Subclasses set their fields, then call
    ``listen``."""

    connections = 0

    def listen(self) -> int:
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class RawUpstream(LoopbackListener):
    """A loopback upstream answering every request on a connection with fixed bytes;
    counts the connections it accepted. ``hang_up``: close each connection after its
    first answer, without saying so (``closed`` is set once it has)."""

    def __init__(
        self, answer: bytes, hang_up: bool = False, tls: ssl.SSLContext | None = None
    ) -> None:
        self.answer = answer
        self.hang_up = hang_up
        self.tls = tls
        self.closed = threading.Event()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.listen()}/v1/chat/completions"

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        with conn:
            received = b""
            while True:
                while b"\r\n\r\n" not in received:
                    data = conn.recv(65536)
                    if not data:
                        return
                    received += data
                head, _, received = received.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(received) < length:
                    received += conn.recv(65536)
                received = received[length:]
                conn.sendall(self.answer)
                if self.hang_up:
                    conn.close()
                    self.closed.set()
                    return

    def close(self) -> None:
        self.listener.close()
