"""Keepalive on callers' connections: a caller gone without a word (its host down, its network cut: no FIN, no RST)
is let go within `server.keepalive_s + keepalive_timeout_s`, its calls cancelled up to the upstream; and a caller that
pings its connection to tell the gateway is alive (as gRPC clients configured with keepalive do) is not cut off with
GOAWAY "too_many_pings" while it waits for a slow answer.

A caller gone silent is played by a relay on loopback that stops passing bytes either way and keeps both connections
open: the kernel still takes what the gateway sends (loopback never drops), but no answer to its pings comes back.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from llmrelay import v1 as pb
from support import GatewayFactory, chat, stream_chat, wait_until
from upstream import FakeUpstream


class SilentRelay:
    """Passes bytes between its callers and `port` until `go_silent`, then passes none, and closes nothing."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._silent = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def target(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def go_silent(self) -> None:
        self._silent.set()

    async def __aenter__(self) -> SilentRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while not self._silent.is_set():
            reading = asyncio.ensure_future(source.read(65536))
            silent = asyncio.ensure_future(self._silent.wait())
            await asyncio.wait((reading, silent), return_when=asyncio.FIRST_COMPLETED)
            silent.cancel()
            if not reading.done():
                reading.cancel()
                break
            data = reading.result()
            if not data:
                break
            sink.write(data)
            await sink.drain()
        await asyncio.Event().wait()  # silent: hold the connection open, read nothing


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_caller_gone_silent_is_let_go_and_its_upstream_call_cancelled(
    gateway_factory: GatewayFactory, primary: FakeUpstream, streaming: bool
) -> None:
    primary.inject({"stall_s": 30})
    gateway = await gateway_factory(
        f'llm:\n  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}\n',
        server="keepalive_s: 1, keepalive_timeout_s: 1",
    )
    async with SilentRelay(gateway.port) as relay, grpc.aio.insecure_channel(relay.target) as channel:
        stub = pb.LLMServiceStub(channel)
        call = stub.StreamComplete(stream_chat()) if streaming else stub.Complete(chat())
        await wait_until(lambda: len(primary.chat_requests) == 1, timeout_s=10)
        relay.go_silent()
        # Pinged after a second, unanswered after another: the connection is closed, its call cancelled, and the
        # upstream's request with it (the upstream sees its client leave), long before the stall's 30 s.
        await wait_until(lambda: len(primary.client_disconnects) == 1, timeout_s=10)
        call.cancel()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat("still here"), timeout=10)
    assert answer.message.content == "echo: still here"


async def test_a_caller_that_pings_while_it_waits_is_not_cut_off(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    # A caller's client pinging every 1.5 s of a 10 s wait in which the gateway sends nothing: gRPC's own default would
    # count every ping after the first as abuse (less than 5 minutes apart) and close the connection at the third.
    primary.inject({"stall_s": 10})
    gateway = await gateway_factory(
        f'llm:\n  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}\n',
        server="min_caller_ping_interval_s: 1",
    )
    options = [
        ("grpc.keepalive_time_ms", 1500),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat("worth the wait"), timeout=20)
    assert answer.message.content == "echo: worth the wait"
