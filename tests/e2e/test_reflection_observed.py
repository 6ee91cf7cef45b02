"""Server reflection (grpc.reflection.v1 and v1alpha, whose one RPC streams requests and answers) is observed as every
other call is: counted once as a `bidi_stream` (go-grpc-prometheus's name) with each message received and sent, one
call-log line, one span; a refusal for want of a key is counted as the same kind of call."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from llmrelay_server.app import Gateway
from llmrelay_server.logs import JsonFormatter
from llmrelay_server.observing import Context, Kind, Observer, ObservingInterceptor, Requests, Start
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from support import GatewayFactory, two_backends, wait_until
from upstream import FakeUpstream

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
KEY = "llmr-reflected-0123456789abcdefghijklmn"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def bidi(service: str) -> dict[str, str]:
    return {"grpc_type": "bidi_stream", "grpc_service": service, "grpc_method": "ServerReflectionInfo"}


async def scrape(gateway: Gateway) -> Samples:
    assert gateway.metrics is not None and gateway.metrics.port is not None
    url = f"http://127.0.0.1:{gateway.metrics.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await asyncio.to_thread(fetch))
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def reflection_types(samples: Samples) -> set[str]:
    """The grpc_type of every gRPC series of the reflection services."""
    return {
        labels["grpc_type"]
        for name, frozen in samples
        if name.startswith("grpc_server_") and (labels := dict(frozen)).get("grpc_service") in (V1, V1ALPHA)
    }


def reflection_info(channel: grpc.aio.Channel, service: str) -> Any:
    return channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


def asking(count: int) -> list[reflection_pb2.ServerReflectionRequest]:
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="llmrelay.v1.LLMService")
    return [reflection_pb2.ServerReflectionRequest(list_services=""), symbol, symbol][:count]


async def requests_of(requests: Sequence[Any]) -> AsyncIterator[Any]:
    for request in requests:
        yield request


async def one_then_wait() -> AsyncIterator[Any]:
    """One request, then none until the call ends."""
    yield asking(1)[0]
    await asyncio.Event().wait()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def keys_on_reflection_closed() -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f'auth:\n  keys:\n    - {{name: research, sha256: "{digest}"}}\n  open_services: ["grpc.health.v1.Health"]\n'


async def test_a_reflection_call_counts_once_as_a_bidi_stream_with_its_messages(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), server='metrics_listen: "127.0.0.1:0"')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answers = [answer async for answer in reflection_info(channel, V1ALPHA)(requests_of(asking(3)), timeout=5)]
        assert len(answers) == 3 and not any(answer.HasField("error_response") for answer in answers)
        for _ in range(2):
            assert len([a async for a in reflection_info(channel, V1)(requests_of(asking(1)), timeout=5)]) == 1

        # A caller that leaves mid-stream: its call ends, counted once, with what it had read and sent. (gRPC tells a
        # handler waiting for the next request that its caller left as it tells it that the requests ended: the
        # handler ends as it would then, and the call's code is the one it ends with.)
        call = reflection_info(channel, V1)(one_then_wait(), timeout=5)
        await call.read()
        call.cancel()
        samples: Samples = {}

        async def all_ended() -> bool:
            samples.clear()
            samples.update(await scrape(gateway))
            ended = [v for (name, labels), v in samples.items() if name == "grpc_server_handled_total" and (
                "grpc_service", V1) in labels]  # fmt: skip
            return sum(ended) == 3

        async with asyncio.timeout(10):
            while not await all_ended():  # noqa: ASYNC110 (a scrape each time: no event to wait on)
                await asyncio.sleep(0.02)

    for service, calls, messages in ((V1ALPHA, 1, 3), (V1, 3, 3)):
        assert value(samples, "grpc_server_started_total", **bidi(service)) == calls
        assert value(samples, "grpc_server_msg_received_total", **bidi(service)) == messages
        assert value(samples, "grpc_server_msg_sent_total", **bidi(service)) == messages
        assert value(samples, "grpc_server_handling_seconds_count", **bidi(service)) == calls
    assert value(samples, "grpc_server_handled_total", **bidi(V1ALPHA), grpc_code="OK") == 1
    assert reflection_types(samples) == {"bidi_stream"}  # no series, not even at zero, of another kind


async def test_a_reflection_call_has_one_call_log_line_and_one_span(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    exported: InMemorySpanExporter,
) -> None:
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    gateway = await gateway_factory(two_backends(primary, local), server="log_format: json, tracing: true")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = reflection_info(channel, V1)(requests_of(asking(2)), timeout=5, metadata=[("x-request-id", "refl-1")])
        assert len([answer async for answer in call]) == 2
        assert ("x-request-id", "refl-1") in tuple(await call.trailing_metadata())

    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "llmrelay_server.calls"]
    [line] = [line for line in lines if line["request_id"] == "refl-1"]
    assert line["rpc"] == f"{V1}/ServerReflectionInfo" and line["code"] == "OK" and line["model"] is None
    await wait_until(lambda: any(s.name == f"{V1}/ServerReflectionInfo" for s in exported.get_finished_spans()), 5)
    [span] = [s for s in exported.get_finished_spans() if s.name == f"{V1}/ServerReflectionInfo"]
    assert span.attributes is not None
    assert span.attributes["rpc.service"] == V1 and span.attributes["rpc.grpc.status_code"] == 0


async def test_a_refused_reflection_call_counts_as_a_bidi_stream(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    yaml_text = two_backends(primary, local) + keys_on_reflection_closed()
    gateway = await gateway_factory(yaml_text, server='metrics_listen: "127.0.0.1:0"')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # One request, then none: a Python client still writing when the refusal comes may be told INTERNAL
            # instead of it (grpc/grpc#36066).
            _ = [answer async for answer in reflection_info(channel, V1ALPHA)(one_then_wait(), timeout=5)]
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        call = reflection_info(channel, V1ALPHA)(requests_of(asking(2)), timeout=5, metadata=bearer(KEY))
        assert len([answer async for answer in call]) == 2
    samples = await scrape(gateway)

    assert value(samples, "grpc_server_started_total", **bidi(V1ALPHA)) == 2
    assert value(samples, "grpc_server_handled_total", **bidi(V1ALPHA), grpc_code="UNAUTHENTICATED") == 1
    assert value(samples, "grpc_server_handled_total", **bidi(V1ALPHA), grpc_code="OK") == 1
    assert value(samples, "grpc_server_msg_received_total", **bidi(V1ALPHA)) == 2  # the refusal read none
    assert value(samples, "grpc_server_msg_sent_total", **bidi(V1ALPHA)) == 2
    assert reflection_types(samples) == {"bidi_stream"}
    codes = [r.getMessage() for r in caplog.records if r.name == "llmrelay_server.calls" and V1ALPHA in r.getMessage()]
    assert len(codes) == 2 and sum("code=UNAUTHENTICATED" in line for line in codes) == 1


class _Told(Observer):
    """Records the kind each method was observed as, and each call's end with the requests it read."""

    def __init__(self, heard: list[str]) -> None:
        self._heard = heard

    def observe(self, method: str, kind: Kind) -> Start:
        self._heard.append(f"{method} {kind.value}")
        return lambda request, context: _Ended(self._heard, request)


class _Ended:
    sent = None

    def __init__(self, heard: list[str], request: Any) -> None:
        self._heard, self._request = heard, request

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        read = self._request.received if isinstance(self._request, Requests) else "one"
        self._heard.append(f"end {code.name}: read {read}, sent {messages}")


async def _total(requests: AsyncIterator[bytes], context: Context) -> bytes:
    return b"+".join([request async for request in requests])


async def _echo(requests: AsyncIterator[bytes], context: Context) -> None:
    async for request in requests:  # written, not yielded: counted as they are written
        await context.write(request)


async def _stall(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        await asyncio.Event().wait()  # till its caller leaves


async def test_requests_that_stream_are_counted_as_the_handler_reads_them_whatever_its_shape() -> None:
    heard: list[str] = []
    server = grpc.aio.server(interceptors=[ObservingInterceptor([_Told(heard)])])
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Total": grpc.stream_unary_rpc_method_handler(_total),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo),
        "Stall": grpc.stream_stream_rpc_method_handler(_stall),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Streamed", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            total: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary("/test.Streamed/Total")
            assert await total(requests_of([b"1", b"2", b"3"])) == b"1+2+3"
            echo: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream("/test.Streamed/Echo")
            assert [answer async for answer in echo(requests_of([b"a", b"b"]))] == [b"a", b"b"]
            stall: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream("/test.Streamed/Stall")
            call = stall(requests_of([b"x", b"y"]))
            assert await call.read() == b"x"
            call.cancel()
            await wait_until(lambda: len(heard) == 6, 5)
        assert heard == ["/test.Streamed/Total client_stream", "end OK: read 3, sent 1",
                         "/test.Streamed/Echo bidi_stream", "end OK: read 2, sent 2",
                         "/test.Streamed/Stall bidi_stream", "end CANCELLED: read 1, sent 1"]  # fmt: skip
    finally:
        await server.stop(None)
