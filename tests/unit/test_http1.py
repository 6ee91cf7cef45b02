"""The HTTP/1.1 client (backends/http1.py) against real loopback servers: the fake upstream (counting the connections
it accepts), and small servers here that write raw bytes for the protocol's faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import os
import re
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx2
import pytest
from certs import Authority
from harness import free_port
from llmrelay_server.backends import http1
from llmrelay_server.backends.http1 import (
    HIGH_WATER,
    MAX_HEAD,
    Http1Pool,
    Http1Response,
    Http1Target,
    Http1Transport,
    TrustConfigError,
    upstream_tls_context,
)
from llmrelay_server.backends.proxies import Proxies, Proxy
from llmrelay_server.backends.wire import MalformedAnswerError
from proxy import ForwardProxy
from raw_server import Handler, RawServer, silent
from upstream import FakeUpstream

LIMITS = httpx2.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=60.0)


class CountingUpstream(FakeUpstream):
    """The fake upstream, counting the connections it accepts and how many are open at once."""

    accepted: int = 0
    open_now: int = 0
    most_open: int = 0

    def recount(self) -> None:
        self.reset()
        self.accepted = self.most_open = 0

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await super()._on_connection(reader, writer)
        finally:
            self.open_now -= 1


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next request's head and body; None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    return head, await reader.readexactly(length)


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """A handler that answers the requests of a connection with `answers` in turn (the last one again after)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        while await read_request(reader) is not None:
            writer.write(answers[min(count, len(answers) - 1)])
            await writer.drain()
            count += 1
            if then_close:
                return

    return handler


def ok(body: bytes = b'{"ok": true}', *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Content-Type: application/json", f"Content-Length: {len(body)}", *headers))
    return f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + body


def chunked(*pieces: bytes, headers: str = "Content-Type: text/event-stream\r\n") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return b"HTTP/1.1 200 OK\r\n" + headers.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


CHAT = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}).encode()
STREAM = json.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "a b c d"}], "stream": True}
).encode()


@pytest.fixture(scope="module")
async def counting() -> AsyncIterator[CountingUpstream]:
    upstream = CountingUpstream(models=("gpt-test",))
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def fake(counting: CountingUpstream) -> CountingUpstream:
    # The module's upstream may still be holding an earlier test's stalled answers (stall_s, trickle_s): each test
    # counts from none open, whatever ran before it.
    await until(lambda: counting.open_now == 0, within_s=15)
    counting.recount()
    return counting


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    pool = Http1Pool(LIMITS)
    yield pool
    await pool.aclose()


def target_of(upstream: FakeUpstream, headers: dict[str, str] | None = None) -> Http1Target:
    return Http1Target(upstream.base_url + "/chat/completions", headers or {"Content-Type": "application/json"})


def assert_drained(pool: Http1Pool, *, idle: int = 0) -> None:
    """No connection held by a request: `idle` idle ones at most, nobody waiting."""
    assert (pool.connections, pool.idle_connections, pool.waiting) == (idle, idle, 0)


def connections_to(port: int) -> int:
    """This process's TCP sockets connected to local port `port` (client sides), whatever their state."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if (link := os.readlink(fd)).startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            count += int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes
    return count


async def next_piece(response: Http1Response) -> bytes:
    return await anext(aiter(response))


async def until(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


# --- requests and answers ----------------------------------------------------------------------------------------


async def test_a_whole_answer_and_its_headers(fake: CountingUpstream, pool: Http1Pool) -> None:
    response = await pool.post(target_of(fake, {"Authorization": "Bearer k", "Accept-Encoding": "gzip"}), CHAT, 5)
    assert (response.status, response.reason, response.content_type) == (200, "X", "application/json")
    assert response.header("CONTENT-TYPE") == "application/json" and response.header("x-missing") is None
    body = json.loads(await response.read())
    assert body["choices"][0]["message"]["content"] == "echo: hello there"
    sent = fake.chat_headers[0]
    assert sent["authorization"] == "Bearer k"
    assert sent["content-length"] == str(len(CHAT))
    assert "accept-encoding" not in sent  # never asked for: the client decodes gzip and deflate alone
    assert sent["host"] == f"127.0.0.1:{fake.port}"
    assert fake.chat_bodies == [CHAT]
    httpx_response = httpx2.Response(response.status, headers=response.headers, content=b"{}")
    assert httpx_response.headers["content-type"] == "application/json"


async def test_extra_headers_are_added_or_replace_fixed_ones(fake: CountingUpstream, pool: Http1Pool) -> None:
    target = target_of(fake, {"Content-Type": "application/json", "X-Trace": "fixed", "X-Keep": "kept"})
    await (await pool.post(target, CHAT, 5, {"traceparent": "00-abc-def-01"})).read()
    await (await pool.post(target, CHAT, 5, {"x-trace": "per call"})).read()
    await (await pool.post(target, CHAT, 5, None)).read()
    first, second, third = fake.chat_headers
    assert (first["traceparent"], first["x-trace"]) == ("00-abc-def-01", "fixed")
    assert (second["x-trace"], second["x-keep"], "traceparent" in second) == ("per call", "kept", False)
    assert (third["x-trace"], "traceparent" in third) == ("fixed", False)


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        Http1Target("http://127.0.0.1:1/", {"X-Evil": "a\r\nHost: elsewhere"})
    with pytest.raises(ValueError, match="http or https"):
        Http1Target("ftp://127.0.0.1/", {})


async def test_a_streamed_answer_in_pieces_then_the_connection_again(fake: CountingUpstream, pool: Http1Pool) -> None:
    for _ in range(2):
        async with await pool.post(target_of(fake), STREAM, 5) as response:
            assert response.content_type == "text/event-stream"
            pieces = [piece async for piece in response]
        assert all(pieces)  # never an empty piece: b"" would read as the end
        text = b"".join(pieces).decode()
        assert text.count("data: ") == 8 and text.endswith("data: [DONE]\n\n")
    assert fake.accepted == 1
    assert_drained(pool, idle=1)


async def test_a_piece_comes_as_soon_as_it_arrived(pool: Http1Pool) -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await go_on.wait()  # the rest only once the client has had the first piece
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    async with RawServer(handler) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        pieces = aiter(response)
        assert await asyncio.wait_for(anext(pieces), 2) == b"first"
        go_on.set()
        assert [piece async for piece in pieces] == [b"second"]
        assert_drained(pool, idle=1)


async def test_content_length_chunked_and_read_until_close_bodies(pool: Http1Pool) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, in many reads
    answers = {
        "length": ok(big),
        "chunked": chunked(big[:300_000], big[300_000:]),
        "until close": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + big,
    }
    for kind, answer in answers.items():
        async with RawServer(answering(answer, then_close=kind == "until close")) as server:
            response = await pool.post(Http1Target(server.url()), b"{}", 5)
            assert await response.read() == big, kind
            if kind == "until close":  # the end of the body is the end of the connection
                assert_drained(pool)
                continue
            async with await pool.post(Http1Target(server.url()), b"{}", 5) as again:  # in pieces, same connection
                assert b"".join([piece async for piece in again]) == big
            assert server.accepted == 1, kind
            assert_drained(pool, idle=1)
        await until(lambda: pool.idle_connections == 0)  # the server closed it


async def test_gzip_and_deflate_answers_come_out_plain(pool: Http1Pool) -> None:
    body = b'{"choices": []}' * 1000
    deflated = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = deflated.compress(body) + deflated.flush()
    packed = gzip.compress(body)
    answers = [
        ok(packed, "Content-Encoding: gzip"),
        ok(zlib.compress(body), "Content-Encoding: deflate"),
        ok(raw_deflate, "Content-Encoding: deflate"),
        chunked(packed[:10], packed[10:100], packed[100:], headers="Content-Encoding: gzip\r\n"),
    ]
    for answer in answers:
        async with RawServer(answering(answer)) as server:
            response = await pool.post(Http1Target(server.url()), b"{}", 5)
            assert response.header("content-encoding") is None and response.header("content-length") is None
            assert await response.read() == body
            async with await pool.post(Http1Target(server.url()), b"{}", 5) as again:
                assert b"".join([piece async for piece in again]) == body
            # As upstream_http makes an error answer into the SDK's: httpx2 must not decode it a second time.
            assert httpx2.Response(200, headers=response.headers, content=body).content == body
    async with RawServer(answering(ok(b"not gzip at all", "Content-Encoding: gzip"))) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        with pytest.raises(MalformedAnswerError, match="not an HTTP answer: the body does not decompress"):
            await response.read()


@pytest.mark.parametrize("coding", ["br", "zstd", "compress"])
async def test_a_body_in_an_encoding_the_gateway_does_not_decode_is_no_answer(pool: Http1Pool, coding: str) -> None:
    """Read as if plain, a stream's first bytes were lost as a line that was no event, and the rest relayed."""
    said = f"the answer is encoded as '{coding}' (Content-Encoding), which the gateway did not ask for"
    async with RawServer(answering(ok(b"data: {}\n\n", f"Content-Encoding: {coding}"))) as server:
        with pytest.raises(MalformedAnswerError, match=re.escape(said)):
            await (await pool.post(Http1Target(server.url()), b"{}", 5)).read()
        with pytest.raises(MalformedAnswerError, match=re.escape(said)):  # read in pieces, as a stream is
            async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
                [piece async for piece in response]
    async with RawServer(answering(ok(b"{}", "Content-Encoding: identity"))) as server:
        assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == b"{}"


async def test_a_gzip_body_of_several_members_is_read_to_its_end(pool: Http1Pool) -> None:
    """RFC 1952 allows several members, one after another: the body was cut after the first, silently (a unary answer
    "not JSON", a stream that ended without its finish). Bytes after the last that start no member (padding) are no
    part of the body, as before; a member cut short is."""
    body = b'{"choices": [' + b'{"index": 0}, ' * 50_000 + b"{}]}"
    members = gzip.compress(body[:10]) + gzip.compress(b"") + gzip.compress(body[10:300_000])
    members += gzip.compress(body[300_000:])
    pieces = [members[i : i + 5] for i in range(0, len(members), 5)]  # a member's end and start split between reads
    answers = [
        ok(members, "Content-Encoding: gzip"),
        ok(members + b"\0" * 8, "Content-Encoding: gzip"),
        chunked(*pieces, headers="Content-Encoding: gzip\r\n"),
    ]
    for answer in answers:
        async with RawServer(answering(answer)) as server:
            assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read(len(body)) == body
            async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
                assert b"".join([piece async for piece in response]) == body
    async with RawServer(answering(ok(members[:-5], "Content-Encoding: gzip"))) as server:
        with pytest.raises(MalformedAnswerError, match="the compressed body ends before its end"):
            await (await pool.post(Http1Target(server.url()), b"{}", 5)).read()
    async with RawServer(answering(ok(members, "Content-Encoding: gzip"))) as server:
        with pytest.raises(MalformedAnswerError, match=f"the body is over {len(body) - 1} bytes once decompressed"):
            await (await pool.post(Http1Target(server.url()), b"{}", 5)).read(len(body) - 1)


async def test_a_body_read_whole_is_bounded_on_the_wire_and_once_decompressed(pool: Http1Pool) -> None:
    """A limit on what is read holds for what a small compressed body inflates to (20 KB of gzip: 20 MB)."""
    bomb = gzip.compress(b"0" * 20_000_000)
    assert len(bomb) < 100_000
    for answer, over, idle in (
        # Closed, not kept with the rest unread; the bomb came whole: its connection may serve again.
        (ok(b"x" * 200_000), "the body is over 100000 bytes", 0),
        (ok(bomb, "Content-Encoding: gzip"), "the body is over 100000 bytes once decompressed", 1),
    ):
        async with RawServer(answering(answer)) as server:
            response = await pool.post(Http1Target(server.url()), b"{}", 5)
            with pytest.raises(MalformedAnswerError, match=over):
                await response.read(100_000)
            assert_drained(pool, idle=idle)
        async with RawServer(answering(answer)) as server:
            response = await pool.post(Http1Target(server.url()), b"{}", 5)
            assert len(await response.read(30_000_000)) in (200_000, 20_000_000), "within the limit: whole"


async def test_a_compressed_answer_read_piece_by_piece_is_inflated_a_bounded_piece_at_a_time(pool: Http1Pool) -> None:
    """One read of 20 KB of gzip inflated whole was one piece of 20 MB (up to 64 MiB), which the stream's reader then
    split into lines all at once: a valid 96 KB stream of small events took 190 MB. Each piece is inflated from what
    the last read left before anything more is read (the end of the body too), and the loop serves others between
    them."""
    body = b"0" * 20_000_000
    bomb = gzip.compress(body)
    turns = 0

    async def others() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    for answer in (chunked(bomb, headers="Content-Encoding: gzip\r\n"), ok(bomb, "Content-Encoding: gzip")):
        async with RawServer(answering(answer)) as server:
            async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
                served = asyncio.create_task(others())
                pieces = [(len(piece), turns) async for piece in response]
                served.cancel()
            assert max(size for size, _ in pieces) <= http1.INFLATED_PIECE
            assert sum(size for size, _ in pieces) == len(body)
            assert all(before < after for (_, before), (_, after) in itertools.pairwise(pieces))
            assert_drained(pool, idle=1)


@pytest.mark.parametrize(
    ("end", "reused"),
    [
        (b"6\r\n[DONE]\r\n0\r\n\r\n", True),
        # In the same read as the end: they spoil the connection, which went back to the pool as the end was parsed,
        # before them, and failed the next request given it.
        (b"6\r\n[DONE]\r\n0\r\n\r\ndata: [DONE]\n\n", False),
        (None, False),
    ],
    ids=["ends", "ends with bytes after", "never ends"],
)
async def test_an_answer_left_whole_frees_its_connection_once_its_end_has_come(
    pool: Http1Pool, end: bytes | None, reused: bool
) -> None:
    """A stream whole by its own events, its body's end still on the way: the connection goes back to the pool when
    that end comes within the grace (the rest thrown away), else it is closed; its request waits for neither."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def late_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(head + b"5\r\nhello\r\n")
            await writer.drain()
            if end is None:
                await reader.read()  # until the client goes
                return
            await asyncio.sleep(0.2)
            writer.write(end)
            await writer.drain()

    async with RawServer(late_end) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        assert await anext(aiter(response)) == b"hello"
        response.release_after(0.5)
        assert (pool.connections, pool.idle_connections) == (1, 0), "held while its end is awaited"
        await until(lambda: pool.connections == pool.idle_connections)
        assert_drained(pool, idle=1 if reused else 0)
        if reused:
            again = await pool.post(Http1Target(server.url()), b"{}", 5)
            assert await anext(aiter(again)) == b"hello"
            again.close()
            assert server.accepted == 1


# --- keep-alive and the pool's limits --------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(fake: CountingUpstream, pool: Http1Pool) -> None:
    for _ in range(10):
        await (await pool.post(target_of(fake), CHAT, 5)).read()
    assert fake.accepted == 1
    assert len(fake.chat_requests) == 10
    assert_drained(pool, idle=1)


async def test_never_more_connections_than_max_connections(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=3, max_keepalive_connections=3, keepalive_expiry=60))
    fake.inject(*[{"stall_s": 0.05}] * 40)

    async def call() -> bytes:
        return await (await pool.post(target_of(fake), CHAT, 10)).read()

    try:
        answers = await asyncio.gather(*(call() for _ in range(40)))
        assert all(b"echo: hello there" in answer for answer in answers)
        assert fake.most_open == 3  # the bound reached, and never passed
        assert fake.accepted == 3
        assert_drained(pool, idle=3)
    finally:
        await pool.aclose()


async def test_requests_beyond_the_limit_wait_their_turn_in_order(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60))
    fake.inject({"stall_s": 0.1})

    async def call(index: int) -> None:
        body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": str(index)}]}).encode()
        await (await pool.post(target_of(fake), body, 10)).read()

    try:
        tasks = []
        for index in range(6):
            tasks.append(asyncio.create_task(call(index)))
            await asyncio.sleep(0.005)  # each in line before the next
        assert pool.waiting == 5
        await asyncio.gather(*tasks)
        assert [request["messages"][0]["content"] for request in fake.chat_requests] == [str(i) for i in range(6)]
        assert fake.accepted == 1
    finally:
        await pool.aclose()


async def test_a_wait_for_a_connection_ends_in_a_pool_timeout() -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60))

    async with RawServer(silent) as server:
        first = asyncio.create_task(pool.post(Http1Target(server.url()), b"{}", 10))
        await until(lambda: pool.connections == 1)
        started = time.monotonic()
        with pytest.raises(httpx2.PoolTimeout):
            await pool.post(Http1Target(server.url()), b"{}", 0.2)
        assert 0.15 < time.monotonic() - started < 1.5
        assert pool.waiting == 0
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert_drained(pool)
    await pool.aclose()


async def test_idle_connections_beyond_max_keepalive_are_closed(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=10, max_keepalive_connections=2, keepalive_expiry=60))
    fake.inject(*[{"stall_s": 0.1}] * 5)

    async def call() -> None:
        await (await pool.post(target_of(fake), CHAT, 10)).read()

    try:
        await asyncio.gather(*(call() for _ in range(5)))
        assert fake.accepted == 5
        assert_drained(pool, idle=2)
        await until(lambda: fake.open_now == 2)  # the server saw the other three close
    finally:
        await pool.aclose()


async def test_idle_connections_close_after_keepalive_expiry(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=0.2))
    try:
        await (await pool.post(target_of(fake), CHAT, 5)).read()
        await asyncio.sleep(0.1)
        await (await pool.post(target_of(fake), CHAT, 5)).read()  # still idle in time: the same connection
        assert fake.accepted == 1
        assert_drained(pool, idle=1)
        await asyncio.sleep(0.35)
        assert_drained(pool)
        await until(lambda: fake.open_now == 0)
        await (await pool.post(target_of(fake), CHAT, 5)).read()
        assert fake.accepted == 2
    finally:
        await pool.aclose()


async def test_an_idle_connection_the_server_closed_is_never_handed_out(pool: Http1Pool) -> None:
    async def answers_then_hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.05)  # the keep-alive answer sent, the server closes the idle connection

    async with RawServer(answers_then_hangs_up) as server:
        await (await pool.post(Http1Target(server.url()), b"{}", 5)).read()
        assert_drained(pool, idle=1)
        await until(lambda: pool.idle_connections == 0)
        assert_drained(pool)
        assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == b'{"ok": true}'
        assert server.accepted == 2


@pytest.mark.parametrize(
    "answer",
    [
        ok(b"{}", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"{}"),
    ],
    ids=["connection close", "HTTP/1.0", "1xx first"],
)
async def test_connections_that_cannot_be_reused_are_closed(pool: Http1Pool, answer: bytes) -> None:
    async with RawServer(answering(answer)) as server:
        for _ in range(2):
            assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == b"{}"
            assert_drained(pool)
        assert server.accepted == 2
        await until(lambda: server.closed == 2)


async def test_a_connection_answered_before_its_request_was_written_whole_is_not_reused(pool: Http1Pool) -> None:
    """An upstream that answers a large body early (a 413) and stops reading leaves the rest unsent: taken back, the
    connection put the next request behind megabytes of it, to wait out its read timeout."""
    answered_early = asyncio.Event()

    async def early_then_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not answered_early.is_set():
            answered_early.set()
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
            await asyncio.sleep(30)  # kept open, its body never read
            return
        await answering(ok(b"{}"))(reader, writer)

    async with RawServer(early_then_reading) as server:
        first = await pool.post(Http1Target(server.url()), b"x" * 8_000_000, 5)
        assert (first.status, await first.read()) == (413, b"{}")
        second = await pool.post(Http1Target(server.url()), b"{}", 2)
        assert (second.status, await second.read()) == (200, b"{}")
        assert server.accepted == 2
        assert_drained(pool, idle=1)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_server_that_closes_right_after_answering_costs_no_request(
    pool: Http1Pool, tmp_path: Path, tls: bool
) -> None:
    """It keeps a connection for one request and closes it as soon as it has answered, without Connection: close. The
    next request comes at once, before the loop has seen the close: its FIN waits unread in the socket (TCP), or
    TLS's close_notify has been read but the connection is not lost yet. That connection must not be used (the
    request would get no answer at all); a new one must."""
    server_context = None
    if tls:
        server_context, pool = trusted_tls(tmp_path)
    try:
        async with RawServer(answering(ok(), then_close=True), server_context) as server:
            target = Http1Target(server.url("https" if tls else "http", "localhost"))
            for _ in range(20):
                assert await (await pool.post(target, b"{}", 5)).read() == b'{"ok": true}'
            assert server.accepted == 20
    finally:
        if tls:
            await pool.aclose()


async def test_bytes_after_the_answer_spoil_the_connection(pool: Http1Pool) -> None:
    async with RawServer(answering(ok(b"{}") + b"garbage")) as server:
        assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == b"{}"
        assert_drained(pool)


# --- leaving early, cancellation --------------------------------------------------------------------------------------


async def test_closing_a_stream_early_closes_its_connection_at_once(pool: Http1Pool) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # returns when the client closes

    async with RawServer(endless) as server:
        async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
            assert await anext(aiter(response)) == b"first"
        assert_drained(pool)
        await asyncio.wait_for(server.ended.wait(), 1)


async def test_a_request_still_being_written_is_reset_when_left(pool: Http1Pool) -> None:
    """The caller leaves while its request is still being written (a large one, to an upstream that does not read):
    the connection is reset at once. A FIN would wait behind the unwritten bytes for as long as the upstream does not
    read them, the socket open all that time, out of the pool's count, and the upstream none the wiser."""
    body = b"x" * (64 * 1024 * 1024)

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with RawServer(never_reads) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await pool.post(Http1Target(server.url()), body, 5)
        assert_drained(pool)
        await until(lambda: connections_to(server.port) == 0, within_s=1)


async def test_a_cancelled_request_leaves_nothing_behind(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=60))
    fake.inject(*[{"stall_s": 5}] * 4)
    try:
        # Waiting for the answer (2 tasks) and waiting in line for a connection (2 more).
        tasks = [asyncio.create_task(pool.post(target_of(fake), CHAT, 10)) for _ in range(4)]
        await until(lambda: len(fake.chat_requests) == 2 and pool.waiting == 2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(task.cancelled() for task in tasks)
        assert_drained(pool)
        await until(lambda: len(fake.client_disconnects) == 2)  # the upstream saw both callers leave
        # Cancelled while reading a body whole, and while waiting for a stream's next piece.
        fake.faults.clear()
        fake.inject({"trickle_s": 1}, {"trickle_s": 1})
        whole = await pool.post(target_of(fake), STREAM, 10)
        reading = asyncio.create_task(whole.read())
        stream = await pool.post(target_of(fake), STREAM, 10)
        assert await anext(aiter(stream))
        streaming = asyncio.create_task(next_piece(stream))
        await asyncio.sleep(0.05)
        reading.cancel()
        streaming.cancel()
        await asyncio.gather(reading, streaming, return_exceptions=True)
        stream.close()
        assert_drained(pool)
        # A trickling server sees its client gone at its next write; one kept open would trickle for 4 s, then idle.
        await until(lambda: fake.open_now == 0, within_s=3)
    finally:
        await pool.aclose()


async def test_a_request_handed_a_connection_as_it_is_cancelled_hands_it_on(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60))
    try:
        first = await pool.post(target_of(fake), CHAT, 5)
        waiting = asyncio.create_task(pool.post(target_of(fake), CHAT, 5))
        behind = asyncio.create_task(pool.post(target_of(fake), CHAT, 5))
        await until(lambda: pool.waiting == 2)
        await first.read()  # hands the connection to `waiting`...
        waiting.cancel()  # ...which is cancelled before it runs: it goes on to `behind`
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert b"echo" in await (await asyncio.wait_for(behind, 2)).read()
        assert fake.accepted == 1
        assert_drained(pool, idle=1)
    finally:
        await pool.aclose()


# --- failures ------------------------------------------------------------------------------------------------------


async def test_nothing_listening_is_a_connect_error(pool: Http1Pool) -> None:
    async with RawServer(answering(ok())) as server:
        url = server.url()
    with pytest.raises(httpx2.ConnectError, match="cannot connect"):
        await pool.post(Http1Target(url), b"{}", 5)
    assert_drained(pool)


async def test_a_handshake_that_never_ends_is_a_connect_timeout(pool: Http1Pool) -> None:
    async with RawServer(silent) as server:  # plain TCP: the TLS handshake gets no answer
        started = time.monotonic()
        with pytest.raises(httpx2.ConnectTimeout):
            await pool.post(Http1Target(server.url("https")), b"{}", 0.3)
        assert 0.25 < time.monotonic() - started < 2
    assert_drained(pool)


async def _reset_as_tls_begins(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(10)  # a piece of the ClientHello, then the connection closes under it
    writer.transport.abort()


async def test_a_connection_reset_as_tls_begins_says_so(pool: Http1Pool) -> None:
    """The reset has no words of its own (ConnectionResetError()): the caller read "cannot connect to https://...: "."""
    async with RawServer(_reset_as_tls_begins) as server:
        with pytest.raises(httpx2.ConnectError) as refused:
            await pool.post(Http1Target(server.url("https")), b"{}", 5)
        assert str(refused.value) == (
            f"cannot connect to https://127.0.0.1:{server.port}: the connection closed as it was being made (its TLS"
            " handshake)"
        )
    assert_drained(pool)


async def test_an_upstream_that_does_not_answer_in_time_is_a_read_timeout(fake: CountingUpstream) -> None:
    pool = Http1Pool(LIMITS)
    fake.inject({"stall_s": 3}, {"trickle_s": 3})
    try:
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout, match="an answer"):
            await pool.post(target_of(fake), CHAT, 0.3)
        assert 0.25 < time.monotonic() - started < 1.5
        await until(lambda: len(fake.client_disconnects) == 1)  # the connection was closed
        async with await pool.post(target_of(fake), STREAM, 0.3) as response:
            with pytest.raises(httpx2.ReadTimeout, match="the rest of the answer"):
                async for _ in response:
                    pass
        assert_drained(pool)
    finally:
        await pool.aclose()


def trickling(answer: bytes) -> Handler:
    """A handler that answers each request with `answer` a byte every 0.02 s, the head too (100 bytes: 2 s)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            for byte in answer:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

    return handler


async def test_the_read_timeout_bounds_each_wait_not_the_whole_answer(pool: Http1Pool) -> None:
    body = b'{"slow": "but steady", "each byte": "in its own time, each wait short, and all of them long"}'
    async with RawServer(trickling(ok(body))) as server:
        # 1 s for each wait, where the head takes some 1.4 s and the body 1.8 s: bounded per wait, not whole, for
        # either; and a second of room for a busy machine that runs the test's own server late.
        response = await pool.post(Http1Target(server.url()), b"{}", 1.0)
        assert await response.read() == body
        async with await pool.post(Http1Target(server.url()), b"{}", 1.0) as again:
            assert b"".join([piece async for piece in again]) == body
    assert_drained(pool, idle=1)


async def test_no_answer_at_all_is_a_remote_protocol_error(fake: CountingUpstream, pool: Http1Pool) -> None:
    fake.inject({"drop": True})
    with pytest.raises(httpx2.RemoteProtocolError, match="without sending a response"):
        await pool.post(target_of(fake), CHAT, 5)
    assert_drained(pool)


async def test_an_answer_cut_short_is_a_read_error(fake: CountingUpstream, pool: Http1Pool) -> None:
    fake.inject({"cut_before_done": True})
    async with await pool.post(target_of(fake), STREAM, 5) as response:
        with pytest.raises(httpx2.ReadError, match="before the answer ended"):
            async for _ in response:
                pass
    async with RawServer(answering(ok(b"{}")[:-1], then_close=True)) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        with pytest.raises(httpx2.ReadError):
            await response.read()
    assert_drained(pool)


async def test_a_body_that_ends_at_close_cut_by_a_reset_is_a_read_error(pool: Http1Pool) -> None:
    # A body with no length ends where the connection does, but only where it closes: a reset mid-way was taken for
    # its end, and the half answer came out as a whole one (malformed JSON to the caller, and not retried).
    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"half": ')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
        writer.transport.abort()

    async with RawServer(reset_mid_body) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        with pytest.raises(httpx2.ReadError, match="before the answer ended"):
            await response.read()
    assert_drained(pool)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"HTTP/1.1 abc\r\n\r\n", "Invalid status code"),
        (b"<html>hello</html>\r\n\r\n", "Expected HTTP/"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "Invalid header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (80 * 1024), "its head is over 64 KiB"),
        (b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\n{}", "status 000"),  # not an interim answer to wait past
    ],
    ids=["status line", "not HTTP", "header", "chunk", "upgrade", "endless head", "status 000"],
)
async def test_an_answer_that_is_not_http_is_malformed(pool: Http1Pool, answer: bytes, said: str) -> None:
    async with RawServer(answering(answer)) as server:
        with pytest.raises(MalformedAnswerError, match=f"not an HTTP answer: .*{said}"):
            response = await pool.post(Http1Target(server.url()), b"{}", 5)
            await response.read()
    assert_drained(pool)


async def test_the_head_limit_counts_the_head_alone(pool: Http1Pool) -> None:
    """A head just under MAX_HEAD and a large body, written at once so that reads hold both: the body is no part of
    the head. One byte more of head, and the answer is malformed."""
    body = b"x" * (1024 * 1024)
    for padding, fits in ((MAX_HEAD - 200, True), (MAX_HEAD, False)):
        answer = ok(body, "X-Padding: " + "p" * padding)
        async with RawServer(answering(answer)) as server:
            if fits:
                assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == body
            else:
                with pytest.raises(MalformedAnswerError, match="its head is over 64 KiB"):
                    await pool.post(Http1Target(server.url()), b"{}", 5)
        assert pool.waiting == pool.connections - pool.idle_connections == 0


def endless_trailers(line: bytes) -> Handler:
    """A chunked answer whose body ends, then trailers that never do: `line` again and again until the connection is
    closed (each read keeps an answer's timer from firing)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked(b'{"ok": true}', headers="Content-Type: application/json\r\n")[: -len(b"\r\n")])
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(line * 64)
                await writer.drain()
                await asyncio.sleep(0.001)

    return handler


@pytest.mark.parametrize(
    "line", [b"X-Trailer: " + b"t" * 53 + b"\r\n", b"a" * 1024], ids=["trailer lines", "one trailer line"]
)
async def test_trailers_without_end_are_bounded_as_a_head_is(pool: Http1Pool, line: bytes) -> None:
    """Held in the answer's headers (each line), or by the parser (one line not yet ended), for as long as they came:
    a gigabyte in seconds. Past MAX_HEAD they make the answer malformed, as a head's do, long before its timeout."""
    async with RawServer(endless_trailers(line)) as server:
        for read in ("whole", "in pieces"):
            with pytest.raises(MalformedAnswerError, match="not an HTTP answer: over 64 KiB after its body's end"):
                async with asyncio.timeout(4):  # else read for ever, a read at a time within its timeout
                    response = await pool.post(Http1Target(server.url()), b"{}", 5)
                    if read == "whole":
                        await response.read()
                    else:
                        async with response:
                            async for _ in response:
                                pass
            assert_drained(pool)


async def test_trailers_are_read_past_and_a_body_of_tiny_chunks_is_no_trailer(pool: Http1Pool) -> None:
    """Trailers within the bound end the answer as usual (and are no header of it); a chunk's framing is counted from
    the body's last piece, so a body of a hundred thousand 1-byte chunks (framing five times its size) is whole."""
    with_trailers = chunked(b"{}")[: -len(b"\r\n")] + b"X-Checksum: abc\r\nX-Pad: " + b"p" * 60_000 + b"\r\n\r\n"
    tiny = bytes(range(256)) * 400
    async with RawServer(answering(with_trailers, chunked(*(tiny[i : i + 1] for i in range(len(tiny)))))) as server:
        response = await pool.post(Http1Target(server.url()), b"{}", 5)
        assert await response.read() == b"{}"
        assert response.header("X-Checksum") is None
        assert await (await pool.post(Http1Target(server.url()), b"{}", 5)).read() == tiny
        assert server.accepted == 1
        assert_drained(pool, idle=1)


async def test_a_slow_reader_stops_the_socket_reads(pool: Http1Pool) -> None:
    size = 64 * 1024 * 1024
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        while sent < size:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    async with RawServer(flood) as server:
        async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
            pieces = aiter(response)
            got = len(await anext(pieces))
            await asyncio.sleep(0.3)  # without flow control, the whole 64 MiB would be read into memory by now
            assert sent < size // 2
            async for piece in pieces:
                assert len(piece) <= HIGH_WATER + 512 * 1024  # one socket read past the mark at most
                got += len(piece)
        assert got == size
    assert_drained(pool, idle=1)


# --- TLS, closing the pool -----------------------------------------------------------------------------------------


def trusted_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Http1Pool]:
    """A server's TLS context, its certificate from a new authority, and a pool that trusts that authority."""
    authority = Authority("http1 test CA")
    return authority.server_context(tmp_path), Http1Pool(
        LIMITS, ssl.create_default_context(cadata=authority.cert.decode())
    )


async def test_tls(pool: Http1Pool, tmp_path: Path) -> None:
    server_context, trusting = trusted_tls(tmp_path)
    try:
        async with RawServer(answering(ok(b'{"secure": true}')), server_context) as server:
            for host in ("localhost", "127.0.0.1", "localhost"):
                response = await trusting.post(Http1Target(server.url("https", host)), b"{}", 5)
                assert await response.read() == b'{"secure": true}'
            assert server.accepted == 2  # one connection per origin, reused
            assert_drained(trusting, idle=2)
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.post(Http1Target(server.url("https")), b"{}", 5)  # the system's CAs: not this one
            assert_drained(pool)
    finally:
        await trusting.aclose()


def test_ssl_cert_dir_is_a_list_of_folders_one_of_which_will_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As OpenSSL reads it: `/etc/ssl/certs:/opt/corp/certs` was refused at start, as one folder that did not exist."""
    hashed, unhashed = tmp_path / "hashed", tmp_path / "unhashed"
    for folder in (hashed, unhashed):
        folder.mkdir()
    (hashed / "1a2b3c4d.0").write_bytes(Authority("corp CA").cert)  # a name as `openssl rehash` makes them
    (unhashed / "corp-ca.pem").write_bytes(Authority("corp CA").cert)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", f"{tmp_path / 'missing'}:{hashed}")
    assert isinstance(upstream_tls_context(), ssl.SSLContext)
    monkeypatch.setenv("SSL_CERT_DIR", f"{tmp_path / 'missing'}:{unhashed}:")
    with pytest.raises(TrustConfigError) as refused:
        upstream_tls_context()
    said = str(refused.value)
    assert said.startswith(f"SSL_CERT_DIR: {tmp_path / 'missing'}:{unhashed}:: {tmp_path / 'missing'}: No such file")
    assert f"; {unhashed}: no certificate in it under its subject's hash" in said


async def test_aclose_fails_readers_and_waiters(fake: CountingUpstream) -> None:
    pool = Http1Pool(httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60))
    fake.inject({"trickle_s": 5})
    response = await pool.post(target_of(fake), STREAM, 10)
    assert await anext(aiter(response))
    waiter = asyncio.create_task(pool.post(target_of(fake), CHAT, 10))
    await until(lambda: pool.waiting == 1)
    reader = asyncio.create_task(next_piece(response))
    await asyncio.sleep(0)
    await pool.aclose()
    with pytest.raises(httpx2.ConnectError, match="closed"):
        await waiter
    with pytest.raises(httpx2.ReadError):
        await reader
    response.close()
    assert_drained(pool)
    with pytest.raises(httpx2.ConnectError, match="closed"):
        await pool.post(target_of(fake), CHAT, 10)


def test_under_uvloop() -> None:
    """The gateway's default loop (server.event_loop): its transports are not asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        pool = Http1Pool(LIMITS)
        try:
            async with RawServer(answering(chunked(b"one", b"two"))) as server:
                for _ in range(3):
                    async with await pool.post(Http1Target(server.url()), b"{}", 5) as response:
                        assert b"".join([piece async for piece in response]) == b"onetwo"
                assert server.accepted == 1
                assert_drained(pool, idle=1)
        finally:
            await pool.aclose()

    uvloop.run(scenario())


# --- the SDKs' own requests (Http1Transport) -----------------------------------------------------------------------


def sdk_client(pool: Http1Pool) -> httpx2.AsyncClient:
    """An HTTP client over `pool` as the SDKs' own requests (a models list, a server's tokenizer) are sent, their
    answers' bodies bounded at 100,000 bytes."""
    return httpx2.AsyncClient(transport=Http1Transport(pool, 100_000))


async def test_an_sdk_requests_answer_is_bounded_on_the_wire_and_once_decompressed(pool: Http1Pool) -> None:
    """httpx2 read whatever came into memory: a /tokenize of 400 MiB, or 597 KiB of gzip that inflate to 600 MiB,
    took the gateway past a gigabyte for each count, and the count stood. Past the bound the answer is malformed, as
    a completion's is, and its connection closed."""
    bomb = gzip.compress(b"0" * 20_000_000)
    async with sdk_client(pool) as client:
        for answer, over, idle in (
            # Closed, not kept with the rest unread; the bomb came whole: its connection may serve again.
            (ok(b"x" * 200_000), "the body is over 100000 bytes", 0),
            (ok(bomb, "Content-Encoding: gzip"), "the body is over 100000 bytes once decompressed", 1),
        ):
            async with RawServer(answering(answer)) as server:
                with pytest.raises(MalformedAnswerError, match=f"{over}$"):
                    await client.get(server.url())
                assert_drained(pool, idle=idle)
        async with RawServer(answering(ok(b"x" * 100_000))) as server:
            assert len((await client.get(server.url())).content) == 100_000, "within the bound: whole"


async def test_an_sdk_requests_read_timeout_bounds_its_whole_answer(pool: Http1Pool) -> None:
    """Its callers (a count, a probe) wait for the answer whole: one trickled within the wait for each piece held them
    for as long as the upstream went on (a /tokenize at a byte a second, for the caller's whole deadline)."""
    async with sdk_client(pool) as client, RawServer(trickling(ok(b'{"slow": "but steady"}'))) as server:
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout, match=r"no whole answer in 0\.25 s"):
            await client.get(server.url(), timeout=0.25)
        assert time.monotonic() - started < 1
        assert_drained(pool)


# --- through a forward proxy ---------------------------------------------------------------------------------------

UPSTREAM_NAME = "upstream.test"
"""A name that is not loopback (loopback is never proxied), which the test proxy reaches at 127.0.0.1."""


def through(proxy: ForwardProxy, scheme: str, *, credentials: str | None = None) -> Proxies:
    authorization = f"Basic {base64.b64encode(credentials.encode()).decode()}" if credentials else None
    return Proxies({scheme: Proxy("127.0.0.1", proxy.port, f"{scheme.upper()}_PROXY", authorization)})


async def test_an_http_upstream_through_the_proxy_named_by_its_url(fake: CountingUpstream) -> None:
    async with ForwardProxy(credentials="me:s3cret") as proxy:
        pool = Http1Pool(LIMITS, proxies=through(proxy, "http", credentials="me:s3cret"))
        try:
            url = f"http://{UPSTREAM_NAME}:{fake.port}/v1/chat/completions?x=1"
            target = pool.target(url, {"Content-Type": "application/json", "Proxy-Authorization": "Basic forged"})
            body = json.loads(await (await pool.post(target, CHAT, 5)).read())
            assert body["choices"][0]["message"]["content"] == "echo: hello there"
            assert proxy.asked == [f"POST {url}"]  # absolute-form: the proxy's to send on
            assert proxy.authorizations == [f"Basic {base64.b64encode(b'me:s3cret').decode()}"]  # ours, not forged
            assert fake.chat_headers[0]["host"] == f"{UPSTREAM_NAME}:{fake.port}"
            assert "proxy-authorization" not in fake.chat_headers[0]  # the proxy's, not the upstream's
            local = pool.target(fake.base_url + "/chat/completions")  # loopback: straight there
            await (await pool.post(local, CHAT, 5)).read()
            assert len(proxy.asked) == 1 and len(fake.chat_requests) == 2
        finally:
            await pool.aclose()


async def test_an_https_upstream_through_a_tunnel(tmp_path: Path) -> None:
    await through_a_tunnel(tmp_path)


def test_a_tunnel_under_uvloop(tmp_path: Path) -> None:
    """TLS begins inside the tunnel by the loop's start_tls: uvloop's, in the gateway."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(through_a_tunnel(tmp_path))


async def through_a_tunnel(tmp_path: Path) -> None:
    authority = Authority("proxied upstream CA")
    server_context = authority.server_context(tmp_path, UPSTREAM_NAME)
    trusting = ssl.create_default_context(cadata=authority.cert.decode())
    async with (
        RawServer(answering(ok(b'{"secure": true}')), server_context) as server,
        ForwardProxy(credentials="me:s3cret") as proxy,
    ):
        pool = Http1Pool(LIMITS, trusting, proxies=through(proxy, "https", credentials="me:s3cret"))
        try:
            target = pool.target(server.url("https", UPSTREAM_NAME))
            for _ in range(3):
                assert await (await pool.post(target, b"{}", 5)).read() == b'{"secure": true}'
            # One tunnel, kept alive and reused: the proxy saw the upstream's name and port, and nothing of the rest.
            assert proxy.asked == [f"CONNECT {UPSTREAM_NAME}:{server.port}"]
            assert (server.accepted, proxy.forwarded_heads) == (1, [])
            assert_drained(pool, idle=1)
            wrong_name = pool.target(server.url("https", "elsewhere.test"))  # the certificate is not for it
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.post(wrong_name, b"{}", 5)
            assert_drained(pool, idle=1)
        finally:
            await pool.aclose()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_proxy_that_wants_credentials_says_so_and_the_password_is_never_shown(
    fake: CountingUpstream, scheme: str
) -> None:
    """Of an http upstream, the proxy's 407 passed for the upstream's own answer, counted against the backend, and
    said nothing of the proxy."""
    refusal = "refused a tunnel to" if scheme == "https" else "refused the request to"
    async with ForwardProxy(credentials="me:right") as proxy:
        for credentials in (None, "me:wrong-password"):
            pool = Http1Pool(LIMITS, proxies=through(proxy, scheme, credentials=credentials))
            try:
                with pytest.raises(httpx2.ProxyError) as refused:
                    await pool.post(pool.target(f"{scheme}://{UPSTREAM_NAME}:{fake.port}/v1/models"), b"", 5)
                said = str(refused.value)
                assert f"the proxy http://127.0.0.1:{proxy.port} ({scheme.upper()}_PROXY) {refusal}" in said
                # None given: asked for; given: refused, and the operator told to check them.
                advice = "http://user:password@host:port" if credentials is None else "refused the credentials in"
                assert "407" in said and advice in said
                assert "wrong-password" not in said and "Basic" not in said
                assert_drained(pool)
            finally:
                await pool.aclose()


async def test_a_proxy_out_of_reach_or_refusing_is_a_proxy_error(pool: Http1Pool) -> None:
    nobody = free_port()
    async with ForwardProxy() as proxy:
        for proxies, said in (
            (
                Proxies({"https": Proxy("127.0.0.1", nobody, "HTTPS_PROXY")}),
                f"cannot connect to the proxy http://127.0.0.1:{nobody}",
            ),
            (through(proxy, "https"), "refused a tunnel to upstream.test:1: 502 Bad Gateway"),
        ):
            proxied = Http1Pool(LIMITS, proxies=proxies)
            try:
                with pytest.raises(httpx2.ProxyError, match=re.escape(said)):
                    await proxied.post(proxied.target(f"https://{UPSTREAM_NAME}:1/v1/models"), b"", 5)
                assert_drained(proxied)
            finally:
                await proxied.aclose()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "answer to CONNECT is not HTTP"),
        (b"HTTP/1.1 200 Connection established\r\n\r\nhello", "sent bytes of its own into the tunnel"),
        (b"HTTP/1.1 200 Connection established\r\nX-Pad: " + b"x" * MAX_HEAD, "answer to CONNECT is over"),
    ],
    ids=["not-http", "bytes-in-the-tunnel", "endless-head"],
)
async def test_a_proxy_that_answers_connect_with_no_http_is_a_proxy_error(answer: bytes, said: str) -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()  # held open: the client decides

    async with RawServer(nonsense) as server:
        proxied = Http1Pool(LIMITS, proxies=Proxies({"https": Proxy("127.0.0.1", server.port, "HTTPS_PROXY")}))
        try:
            with pytest.raises(httpx2.ProxyError, match=said):
                await proxied.post(proxied.target(f"https://{UPSTREAM_NAME}/v1/models"), b"", 5)
            assert_drained(proxied)
        finally:
            await proxied.aclose()
