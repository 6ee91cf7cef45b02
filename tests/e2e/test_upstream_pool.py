"""The upstream connection pool keeps no more idle connections than configured, after a real burst of streams."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx2
import openai
import pytest
from llmrelay import v1 as pb
from llmrelay_server.backends import upstream_http
from llmrelay_server.backends.upstream_http import http_client
from support import StubFactory, chat, details, in_background, read_all, stream_chat
from upstream import FakeUpstream

BURST = 24
MAX_IDLE = 4
LIMITS = httpx2.Limits(max_connections=100, max_keepalive_connections=MAX_IDLE, keepalive_expiry=60.0)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream(models=("tiny",)).start()
    yield fake
    await fake.stop()


def connections_to(port: int) -> int:
    """This process's established TCP connections to local port `port`."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


async def test_idle_connections_are_capped_after_a_burst_of_streams(upstream: FakeUpstream) -> None:
    client = http_client(openai.DefaultAsyncHttpxClient, LIMITS)
    # Each stream is held open a while (a chunk every 0.2 s), so that the burst needs a connection per stream.
    upstream.inject(*[{"trickle_s": 0.2}] * BURST)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hold"}], "stream": True}

    async def stream() -> int:
        request = client.build_request("POST", f"{upstream.base_url}/chat/completions", json=body)
        response = await client.send(request, stream=True)
        try:
            return len([line async for line in response.aiter_lines() if line.startswith("data: ")])
        finally:
            await response.aclose()

    try:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, connections_to(upstream.port))
                await asyncio.sleep(0.05)

        async with in_background(watch()):
            events = await asyncio.gather(*(stream() for _ in range(BURST)))
        assert all(count > 2 for count in events), events
        assert peak > MAX_IDLE, f"the burst never needed more than {peak} connections"
        await asyncio.sleep(0.2)  # closed connections leave the table
        assert connections_to(upstream.port) == MAX_IDLE
        # Those kept are reused: another call opens none.
        assert await stream() > 2
        assert connections_to(upstream.port) == MAX_IDLE
    finally:
        await client.aclose()


class TwoConnections(upstream_http.Pool):
    """A backend's pool with room for two connections, so that two streams fill it."""

    def __init__(self) -> None:
        super().__init__(httpx2.Limits(max_connections=2, max_keepalive_connections=2))


@pytest.mark.parametrize(
    ("first_chunk_timeout_s", "ended"),
    [(30, grpc.StatusCode.DEADLINE_EXCEEDED), (1, grpc.StatusCode.UNAVAILABLE)],
    ids=["by the deadline", "by first_chunk_timeout_s"],
)
async def test_calls_waiting_for_a_connection_never_open_the_backends_circuit(
    stub_for: StubFactory,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    first_chunk_timeout_s: float,
    ended: grpc.StatusCode,
) -> None:
    """Calls that waited in the gateway's own queue for a connection (every one it may open in use) until their deadline
    or the first-chunk limit were counted as the upstream's silence: a burst opened a healthy backend's circuit, which
    then refused every caller, though the upstream was never asked."""
    monkeypatch.setattr(upstream_http, "Pool", TwoConnections)
    stub = await stub_for(
        f"llm:\n  ollama: {{base_url: '{upstream.base_url}', model: tiny}}\n"
        f"router: {{retry: {{max_retries: 0}}, circuit: {{failure_threshold: 2}}, first_chunk_timeout_s: "
        f"{first_chunk_timeout_s}}}\n"
    )
    upstream.inject(*[{"trickle_s": 1.0}] * 2)
    holding = [stub.StreamComplete(stream_chat("a b c d e"), timeout=30) for _ in range(2)]
    for stream in holding:
        assert await stream.read() is not grpc.aio.EOF  # each holds one of the two connections
    waiting = [stub.Complete(chat(), timeout=1.5 if first_chunk_timeout_s > 1 else 3.5) for _ in range(3)]
    for refused in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == ended, refused
        [attempt] = details(refused)["AttemptHistory"].attempts
        assert "free" in attempt.error, attempt.error
    assert len(upstream.chat_requests) == 2, "the upstream was asked nothing more"
    for stream in holding:
        await read_all(stream)
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_CLOSED
    assert (await stub.Complete(chat(), timeout=5)).backend == "ollama"


async def test_a_backend_whose_connections_all_serve_calls_stays_reachable(
    stub_for: StubFactory, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe waited its turn for a connection behind the calls, gave up, and took the busy backend for unreachable:
    readiness went NOT_SERVING, and a load balancer took the gateway out of rotation at its busiest."""
    monkeypatch.setattr(upstream_http, "Pool", TwoConnections)
    backend = f"{{name: up, kind: openai_compatible, base_url: '{upstream.base_url}', model: tiny}}"
    stub = await stub_for(f"llm:\n  backends: [{backend}]\n")
    probed = await stub.Health(pb.HealthRequest(probe=True), timeout=5)
    [before] = [backend for backend in probed.backends if backend.name == "up"]
    upstream.inject(*[{"trickle_s": 2.0}] * 2)
    holding = [stub.StreamComplete(stream_chat("a b c d e f g", model="up/tiny"), timeout=30) for _ in range(2)]
    for stream in holding:
        assert await stream.read() is not grpc.aio.EOF  # each holds one of the two connections
    probes = len(upstream.probe_requests)
    await asyncio.sleep(1.1)  # past the last probe's second, within which a probe answers with its result
    health = await stub.Health(pb.HealthRequest(probe=True), timeout=15)
    [up] = [backend for backend in health.backends if backend.name == "up"]
    assert up.reachable and up.checked_at == before.checked_at, "as its last probe found it, which says when it ran"
    assert len(upstream.probe_requests) == probes, "no probe waited behind the calls"
    for stream in holding:
        stream.cancel()


async def test_an_upstream_that_hangs_as_it_is_connected_to_still_opens_its_circuit(stub_for: StubFactory) -> None:
    """An attempt that ended while connecting (a TLS handshake the upstream never answers) had written nothing, and was
    taken for one waiting in line for a connection: a dead backend's circuit never opened, and every call spent its
    whole deadline on it."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, and answers nothing: the TLS handshake never ends

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stub = await stub_for(
            f"llm:\n  ollama: {{base_url: 'https://127.0.0.1:{port}', model: tiny}}\n"
            "router: {retry: {max_retries: 0}, circuit: {failure_threshold: 2}}\n"
        )
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Complete(chat(), timeout=2)
            [attempt] = details(caught.value)["AttemptHistory"].attempts
            assert attempt.error == "the deadline ran out", attempt.error
        health = await stub.Health(pb.HealthRequest(), timeout=5)
        assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_OPEN
    finally:
        for writer in held:
            writer.close()
        server.close()
