"""The upstream connection pool keeps no more idle connections than configured, after a real burst of streams."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import openai
import pytest
from llmrelay_server.backends.upstream_http import http_client
from support import in_background
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
