#!/usr/bin/env python3
"""A fast local upstream for benchmarks and load tests (asyncio, one process, loopback).

    python scripts/sse_upstream.py PORT

POST with ``"stream": true`` in the body: an SSE stream of ``events`` events (default 20,
the last one ``data: [DONE]``) ``gap`` seconds apart (default 0.005), chunked, each data
event carrying the upstream's CLOCK_MONOTONIC send time ``t`` so a client on the same
machine can measure the delay added on the way. ``GET .../files/file-N/content``: N bytes
of a download, generated as they are sent. Any other request: a small chat completion.
A Sentry envelope POST is accepted with 200. Thousands of concurrent streams cost it
little, so it is never the bottleneck of what it measures.
"""

import asyncio
import json
import re
import sys
import time

CHAT = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
# The final chunk of a stream whose request asked for stream_options.include_usage.
USAGE_CHUNK = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 19}}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stream(
    writer: asyncio.StreamWriter, events: int, gap: float, usage: bool = False
) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for i in range(events - 1):
        if i:
            await asyncio.sleep(gap)
        event = b'data: {"i": %d, "t": %.6f, "choices": [{"delta": {"content": "token"}}]}\n\n'
        writer.write(chunk(event % (i, time.monotonic())))
        await writer.drain()
    await asyncio.sleep(gap)
    final = chunk(USAGE_CHUNK) if usage else b""
    writer.write(final + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


DOWNLOAD = re.compile(rb"^GET \S*/files/file-(\d+)/content ")
PIECE = b"x" * 65536


async def send_download(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n" % size)
    while size > 0:
        writer.write(PIECE[:size])
        size -= len(PIECE)
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            request_line = head.split(b"\r\n")[0]
            download = DOWNLOAD.search(request_line)
            if b"/api/1/envelope/" in request_line:  # a Sentry ingest that accepts
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            elif download:
                await send_download(writer, int(download.group(1)))
            elif b'"stream": true' in body:
                params = json.loads(body)
                usage = (params.get("stream_options") or {}).get("include_usage") is True
                await stream(writer, params.get("events", 20), params.get("gap", 0.005), usage)
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()


asyncio.run(main())
