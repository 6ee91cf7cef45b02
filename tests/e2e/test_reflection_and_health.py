"""Server reflection under both names (grpc.reflection.v1 and v1alpha), and grpc.health.v1: Check, and List, for the
two names it answers: "" (liveness) and llmrelay.v1.LLMService (readiness)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from llmrelay_server.app import Gateway
from support import GatewayFactory, details, two_backends
from upstream import FakeUpstream

REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
SERVED = {"llmrelay.v1.LLMService", "grpc.health.v1.Health", *REFLECTION_SERVICES}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def reflect(
    channel: grpc.aio.Channel, service: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request to `service`. v1's messages are v1alpha's on the wire (same fields, same numbers), so
    v1alpha's classes read both."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield request

    responses = [response async for response in call(requests(), timeout=5)]
    assert len(responses) == 1
    response: reflection_pb2.ServerReflectionResponse = responses[0]
    return response


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_reflection_lists_the_services(channel: grpc.aio.Channel, service: str) -> None:
    response = await reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert {s.name for s in response.list_services_response.service} == SERVED


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
@pytest.mark.parametrize(
    ("symbol", "method"),
    [
        ("llmrelay.v1.LLMService", "StreamComplete"),
        ("grpc.health.v1.Health", "List"),
        ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
    ],
)
async def test_reflection_describes_every_service_it_lists(
    channel: grpc.aio.Channel, service: str, symbol: str, method: str
) -> None:
    response = await reflect(channel, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))

    assert not response.HasField("error_response"), response.error_response.error_message
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    package, name = symbol.rsplit(".", 1)
    described = {(f.package, s.name): [m.name for m in s.method] for f in files for s in f.service}
    assert method in described[(package, name)]


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
@pytest.mark.parametrize("symbol", ["llmrelay.v1.LLMService.Health", "grpc.health.v1.Health.Check"])
async def test_reflection_finds_a_methods_file(channel: grpc.aio.Channel, service: str, symbol: str) -> None:
    """`grpcurl describe llmrelay.v1.LLMService.Health` asks for a method by name: it was "not found"."""
    response = await reflect(channel, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))

    assert not response.HasField("error_response"), response.error_response.error_message
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    qualified, _, method = symbol.rpartition(".")
    package, name = qualified.rsplit(".", 1)
    assert any(f.package == package and any(s.name == name for s in f.service) for f in files)
    assert method in {m.name for f in files for s in f.service if s.name == name for m in s.method}


async def test_health_list_reports_liveness_and_readiness(channel: grpc.aio.Channel) -> None:
    response = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    statuses = {name: status.status for name, status in response.statuses.items()}
    assert statuses == {"": SERVING, "llmrelay.v1.LLMService": SERVING}


async def test_without_a_usable_backend_the_gateway_is_live_but_not_ready(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory('llm:\n  ollama: {base_url: "http://127.0.0.1:9/v1", model: tiny}\n')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        listed = await health.List(health_pb2.HealthListRequest(), timeout=5)
        checked = {
            name: (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", "llmrelay.v1.LLMService")
        }

    assert {name: status.status for name, status in listed.statuses.items()} == checked
    assert checked == {"": SERVING, "llmrelay.v1.LLMService": NOT_SERVING}


async def test_a_graceful_shutdown_lists_everything_not_serving(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway: Gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.List(health_pb2.HealthListRequest(), timeout=5)  # connected: the drain refuses no connection
        stopping = asyncio.create_task(gateway.stop(grace_period_s=0, drain_s=2))
        try:
            for _ in range(100):  # within the drain time, on a loaded machine too
                listed = await health.List(health_pb2.HealthListRequest(), timeout=5)
                statuses = {name: status.status for name, status in listed.statuses.items()}
                if SERVING not in statuses.values():
                    break
                await asyncio.sleep(0.02)
        finally:
            await stopping

    assert statuses == {"": NOT_SERVING, "llmrelay.v1.LLMService": NOT_SERVING}


async def test_a_watch_does_not_hold_a_graceful_shutdown(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A client's health watch lasts until the client leaves: the stop ends it after the drain (NOT_SERVING sent)
    rather than wait for it the whole grace period."""
    gateway: Gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert (await watch.read()).status == SERVING
        started = asyncio.get_running_loop().time()
        await gateway.stop(grace_period_s=30, drain_s=0.2)
        stopped_s = asyncio.get_running_loop().time() - started
        statuses = []
        while (answer := await watch.read()) is not grpc.aio.EOF:
            statuses.append(answer.status)
        assert stopped_s < 10, f"the stop took {stopped_s:.1f} s: the watch held it"
        assert statuses == [NOT_SERVING]
        assert await watch.code() == grpc.StatusCode.OK


async def test_a_watch_come_in_after_the_watches_ended_is_told_and_ended(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A watch whose call came in between the end of the watches and the server's stop (as a stop runs them) was
    held for the stop's whole grace period, as a reflection stream in that moment is not."""
    gateway: Gateway = await gateway_factory(two_backends(primary, local))
    await gateway.monitor.stop()  # the shutdown's first steps, as Gateway.stop takes them
    gateway.monitor.end_watches()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service, told in (("", NOT_SERVING), ("nothing.Such", health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)):
            watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=5)
            statuses = [answer.status async for answer in watch]
            assert (statuses, await watch.code()) == ([told], grpc.StatusCode.OK)


async def test_an_open_reflection_stream_does_not_hold_a_graceful_shutdown(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A tool's reflection stream (grpcui, Postman, grpc-go's client keep one open) lasts until the tool leaves: the
    stop ends it after the drain, as it ends a watch, with the status other calls get from a shutdown."""
    gateway: Gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        streams = []
        for service in REFLECTION_SERVICES:
            stream = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )(timeout=60)
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            answer = await stream.read()
            assert isinstance(answer, reflection_pb2.ServerReflectionResponse) and answer.list_services_response.service
            streams.append(stream)
        started = asyncio.get_running_loop().time()
        await gateway.stop(grace_period_s=10, drain_s=0.2)
        stopped_s = asyncio.get_running_loop().time() - started
        assert stopped_s < 5, f"the stop took {stopped_s:.1f} s: the reflection streams held it"
        for stream in streams:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await stream.read()
            assert (ended.value.code(), details(ended.value)["ErrorInfo"].reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "SHUTTING_DOWN",
            )
