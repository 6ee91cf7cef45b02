"""The direct path of `make bench`: OpenAI's chat endpoint called over raw HTTP/1.1 keep-alive connections.

No SDK, no HTTP library: one asyncio stream per connection, a connection per concurrent caller kept for reuse. It
understands exactly what the loopback upstream (tests/upstream.py) sends: a Content-Length answer, or server-sent
events in chunked transfer encoding. It reads each answer as a client must, its JSON parsed (orjson, in C, as the
gRPC paths' clients parse their protobuf in C), every event of a stream too, but once the stream has ended: a loop of
Python over each chunk as it came made this client, not the upstream, the bound of a 1,000-chunk stream. Cheaper
than the gRPC client all the same (`make bench` records each one's CPU a call), whose cost every gRPC path's "added"
latency includes, the floor's too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import orjson

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_TEXT, _NO_TEXT = b'"content": "', b'"content": ""'
"""An event with text, as the loopback upstream writes its JSON; one whose text is empty."""
_LAST_CHUNK = b"\r\n0\r\n\r\n"
"""The end of a chunked answer: the CRLF after the last chunk's data, then the empty chunk (no trailers)."""


class DirectClient:
    def __init__(self, host: str, port: int, model: str) -> None:
        self._host, self._port, self._model = host, port, model
        self._idle: list[Connection] = []

    def body(self, prompt: str, *, stream: bool) -> bytes:
        """The request the gateway itself sends for `prompt` (usage asked for in a stream, as the gateway asks)."""
        request: dict[str, object] = {"model": self._model, "messages": [{"role": "user", "content": prompt}]}
        if stream:
            request |= {"stream": True, "stream_options": {"include_usage": True}}
        return json.dumps(request).encode()

    def _head(self, body: bytes) -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()

    async def complete(self, body: bytes) -> dict[str, Any]:
        """The answer, parsed."""
        reader, writer = await self._connection()
        writer.write(self._head(body) + body)
        headers = _headers(await reader.readuntil(b"\r\n\r\n"))
        answer = await reader.readexactly(int(headers[b"content-length"]))
        self._idle.append((reader, writer))
        parsed: dict[str, Any] = orjson.loads(answer)
        return parsed

    async def stream(self, body: bytes) -> tuple[str, float]:
        """The text of the stream's events, and the time.perf_counter() when the first event with text came."""
        started = time.perf_counter()
        reader, writer = await self._connection()
        writer.write(self._head(body) + body)
        headers = _headers(await reader.readuntil(b"\r\n\r\n"))
        assert headers.get(b"transfer-encoding") == b"chunked", headers
        # Read as it comes, in whatever pieces, and parsed once at the end (see the module's doc).
        answer = bytearray()
        first = 0.0
        while not answer.endswith(_LAST_CHUNK):
            piece = await reader.read(65536)
            if not piece:
                raise ConnectionError("the upstream closed the connection mid-answer")
            answer += piece
            if not first and answer.count(_TEXT) > answer.count(_NO_TEXT):  # only until the first: a few events
                first = time.perf_counter()
        self._idle.append((reader, writer))
        texts = []
        for event in _events(answer):
            choices = event.get("choices")
            if choices and (text := choices[0]["delta"].get("content")):
                texts.append(text)
        return "".join(texts), (first or started)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in idle), return_exceptions=True)

    async def _connection(self) -> Connection:
        if self._idle:
            return self._idle.pop()
        return await asyncio.open_connection(self._host, self._port)


def _events(chunked: bytearray) -> list[dict[str, Any]]:
    """The events of a server-sent-events body in chunked transfer encoding, each one's JSON parsed."""
    body, at = bytearray(), 0
    while (size := int(chunked[at : (end := chunked.index(b"\r\n", at))], 16)) != 0:
        body += chunked[end + 2 : end + 2 + size]
        at = end + 2 + size + 2  # the data, then its CRLF
    return [
        orjson.loads(event[len(b"data: ") :])
        for event in bytes(body).split(b"\n\n")
        if event.startswith(b"data: ") and event != b"data: [DONE]"
    ]


def _headers(head: bytes) -> dict[bytes, bytes]:
    lines: Sequence[bytes] = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200"), lines[0]
    return {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:] if line)
    }
