"""Callers' connections: a caller gone without a word (its host down, its network cut: no FIN, no RST) is let go
within `server.keepalive_s + keepalive_timeout_s`, its calls cancelled up to the upstream; a caller that pings its
connection to tell the gateway is alive (as gRPC clients configured with keepalive do) is not cut off with GOAWAY
"too_many_pings" while it waits for a slow answer; and with `server.max_connection_age_s`, a connection is moved on
(GOAWAY) once that old, its calls in flight let finish, so that callers spread again over workers and replicas.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from relay import Relay
from support import GatewayFactory, chat, read_all, stream_chat, wait_until
from upstream import FakeUpstream


async def stalling_gateway(
    gateway_factory: GatewayFactory, primary: FakeUpstream, stall_s: float, server: str
) -> Gateway:
    """A gateway whose one backend is `primary`, its next answer `stall_s` late; `server`: more server fields."""
    primary.inject({"stall_s": stall_s})
    return await gateway_factory(
        f'llm:\n  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}\n',
        server=server,
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_caller_gone_silent_is_let_go_and_its_upstream_call_cancelled(
    gateway_factory: GatewayFactory, primary: FakeUpstream, streaming: bool
) -> None:
    gateway = await stalling_gateway(gateway_factory, primary, 30, "keepalive_s: 1, keepalive_timeout_s: 1")
    async with Relay(gateway.port) as relay, grpc.aio.insecure_channel(relay.target) as channel:
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
    gateway = await stalling_gateway(gateway_factory, primary, 10, "min_caller_ping_interval_s: 1")
    options = [
        ("grpc.keepalive_time_ms", 1500),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat("worth the wait"), timeout=20)
    assert answer.message.content == "echo: worth the wait"


async def test_an_old_connection_is_moved_on_once_its_calls_have_finished(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    # A call in flight when its connection comes of age (about 1 s) still gets its answer (at 3 s), over that
    # connection; the next call goes over a new one, which a balancer or the kernel (workers) may put elsewhere.
    gateway = await stalling_gateway(gateway_factory, primary, 3, "max_connection_age_s: 1")
    async with Relay(gateway.port) as relay, grpc.aio.insecure_channel(relay.target) as channel:
        stub = pb.LLMServiceStub(channel)
        slow = await stub.Complete(chat("slow"), timeout=20)
        assert (slow.message.content, relay.accepted) == ("echo: slow", 1)
        later = await stub.Complete(chat("later"), timeout=10)
        assert (later.message.content, relay.accepted) == ("echo: later", 2)


_REFUSALS = (h2.errors.ErrorCodes.REFUSED_STREAM, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
"""How gRPC resets a stream past its bound: ENHANCE_YOUR_CALM while its settings are not yet acknowledged."""


async def streams_refused(port: int, opened: int) -> tuple[int, list[int]]:
    """The gateway's bound on a connection's streams (its SETTINGS' MAX_CONCURRENT_STREAMS) and which of `opened`
    streams, each a call whose request never ends, sent at once on a new connection, it resets (`_REFUSALS`); read
    with h2, within 5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    path = "/llmrelay.v1.LLMService/StreamComplete"
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    streams = []
    for _ in range(opened):  # before the gateway's settings have come: h2 would hold back those past its bound
        streams.append(stream := connection.get_next_available_stream_id())
        connection.send_headers(stream, headers)
    writer.write(connection.data_to_send())
    bound, refused = None, []
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while bound is None or len(refused) < opened - bound:
                    data = await reader.read(65536)
                    assert data, "the gateway closed the connection"
                    for event in connection.receive_data(data):
                        if isinstance(event, h2.events.RemoteSettingsChanged):
                            changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                            bound = changed.new_value if changed is not None else bound
                        elif isinstance(event, h2.events.StreamReset):
                            assert event.error_code in _REFUSALS, event
                            refused.append(streams.index(event.stream_id))
                    writer.write(connection.data_to_send())
    finally:
        writer.close()
    assert bound is not None, "no MAX_CONCURRENT_STREAMS in the gateway's settings"
    return bound, refused


async def test_the_calls_one_connection_may_have_open_are_bounded(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    """gRPC's own bound is none: one connection (no key needed) opened thousands of streams whose request never ended,
    which no bound on calls counts (they are no calls yet), some 20 KiB of memory each."""
    backend = f'llm:\n  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}\n'
    gateway = await gateway_factory(backend, server="max_streams_per_connection: 2")
    assert await streams_refused(gateway.port, 5) == (2, [2, 3, 4])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await read_all(pb.LLMServiceStub(channel).StreamComplete(stream_chat("a b"), timeout=10))
    assert answer[-1].finish_reason == pb.FINISH_REASON_STOP
    assert (await streams_refused((await gateway_factory(backend)).port, 0))[0] == 1000, "the default"
