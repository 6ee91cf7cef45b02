"""Fixtures: loopback upstreams, a real gateway on an ephemeral port, and stubs over a real gRPC channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway, start_gateway
from llmrelay_server.config import load_config
from support import GatewayFactory, two_backends
from upstream import FakeUpstream


@pytest.fixture(scope="session")
async def primary() -> AsyncIterator[FakeUpstream]:
    """Stands in for the OpenAI API."""
    upstream = await FakeUpstream(models=("gpt-test", "gpt-test-mini")).start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="session")
async def local() -> AsyncIterator[FakeUpstream]:
    """Stands in for Ollama, native endpoints included."""
    upstream = await FakeUpstream(models=("tiny",), ollama=True).start()
    yield upstream
    await upstream.stop()


@pytest.fixture(autouse=True)
def _fresh_upstreams(primary: FakeUpstream, local: FakeUpstream) -> None:
    primary.reset()
    local.reset()


def write_config(directory: Path, yaml_text: str) -> Path:
    path = directory / "llmrelay.yaml"
    path.write_text(yaml_text)
    return path


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Starts gateways from YAML (server.listen and usage_db are filled in); stops them all afterwards."""
    started: list[Gateway] = []

    async def start(yaml_text: str, env: dict[str, str] | None = None) -> Gateway:
        server = f'server: {{listen: "127.0.0.1:0", usage_db: "{tmp_path / "usage.db"}", grace_period_s: 2}}\n'
        config = load_config(env or {}, write_config(tmp_path, server + yaml_text))
        gateway = await start_gateway(config)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop(grace_period_s=0, drain_s=0)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream) -> Gateway:
    """The default chain of the seed: OpenAI first (a key is set), Ollama as fallback."""
    return await gateway_factory(two_backends(primary, local))


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb.LLMServiceAsyncStub:
    return pb.LLMServiceStub(channel)
