"""The direct path of `make bench`: OpenAI's chat endpoint called over raw HTTP/1.1 keep-alive connections.

No dearer a load generator than the gRPC one (grpc.aio's C core; `make bench` records each one's CPU a call): no SDK,
no HTTP library, one asyncio stream per connection, a connection per concurrent caller kept for reuse. It
understands exactly what the loopback upstream (tests/upstream.py) sends: a Content-Length answer, or server-sent
events in chunked transfer encoding.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

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

    async def complete(self, body: bytes) -> bytes:
        """The answer's JSON body."""
        reader, writer = await self._connection()
        writer.write(self._head(body) + body)
        headers = _headers(await reader.readuntil(b"\r\n\r\n"))
        answer = await reader.readexactly(int(headers[b"content-length"]))
        self._idle.append((reader, writer))
        return answer

    async def stream(self, body: bytes) -> tuple[int, float]:
        """The number of events with text, and the time.perf_counter() when the first came."""
        started = time.perf_counter()
        reader, writer = await self._connection()
        writer.write(self._head(body) + body)
        headers = _headers(await reader.readuntil(b"\r\n\r\n"))
        assert headers.get(b"transfer-encoding") == b"chunked", headers
        # Read as it comes, in whatever pieces, and the texts counted once at the end: a loop of Python over each
        # chunk made this client, not the upstream, the bound of a 1,000-chunk stream (the gateway's path relayed more
        # chunks a second than the direct call).
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
        return answer.count(_TEXT) - answer.count(_NO_TEXT), (first or started)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in idle), return_exceptions=True)

    async def _connection(self) -> Connection:
        if self._idle:
            return self._idle.pop()
        return await asyncio.open_connection(self._host, self._port)


def _headers(head: bytes) -> dict[bytes, bytes]:
    lines: Sequence[bytes] = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200"), lines[0]
    return {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:] if line)
    }
