"""Fixtures: loopback upstreams, a real gateway on an ephemeral port, stubs over a real gRPC channel, a real Redis,
and the real model servers of the integration tier."""

from __future__ import annotations

import faulthandler
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from anthropic_upstream import FakeAnthropic
from llmrelay import v1 as pb
from llmrelay_server import tracing
from llmrelay_server.app import Gateway, start_gateway
from llmrelay_server.config import load_config
from models.servers import DEFAULT_OLLAMA_BINARY, OllamaHandle, ServerHandle, start_llama_server, start_ollama
from models.tiny_gguf import write_tiny_gguf
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from postgres_server import PostgresServer, PostgresTemplate
from redis_server import RedisServer
from support import GatewayFactory, StubFactory, two_backends
from upstream import FakeUpstream

_EXIT_GRACE_S = 120


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Every test has run. A process that still has not exited after the grace (a thread or child that never ends)
    prints every thread's stack and exits with 1, instead of holding CI until its timeout with nothing to go on."""
    faulthandler.dump_traceback_later(_EXIT_GRACE_S, exit=True, file=sys.__stderr__ or 2)


@pytest.fixture
def python_recursion_limit() -> Iterator[None]:
    """Python's own recursion limit, which the gateway runs with, for a test of what lies beyond it: hypothesis raises
    the limit for its tests and may leave it raised for the tests after them."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)


@pytest.fixture(scope="session")
async def openai_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream(models=("gpt-test", "gpt-test-mini")).start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="session")
async def ollama_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream(models=("tiny",), ollama=True).start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="session")
async def anthropic_upstream() -> AsyncIterator[FakeAnthropic]:
    upstream = await FakeAnthropic(models=("claude-test", "claude-test-mini")).start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def primary(
    request: pytest.FixtureRequest, openai_upstream: FakeUpstream, anthropic_upstream: FakeAnthropic
) -> FakeUpstream:
    """Stands in for the OpenAI API, or for Anthropic's where a test parametrizes `primary` (indirect) with
    "anthropic" (support.DIALECTS); no faults queued and no requests recorded when the test starts."""
    upstream = anthropic_upstream if getattr(request, "param", "openai") == "anthropic" else openai_upstream
    upstream.reset()
    return upstream


@pytest.fixture
def claude(anthropic_upstream: FakeAnthropic) -> FakeAnthropic:
    """Stands in for Anthropic's API beside `primary`; fresh as `primary` is."""
    anthropic_upstream.reset()
    return anthropic_upstream


@pytest.fixture
def local(ollama_upstream: FakeUpstream) -> FakeUpstream:
    """Stands in for Ollama, native endpoints included; fresh as `primary` is."""
    ollama_upstream.reset()
    return ollama_upstream


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Starts gateways from YAML (server.listen and usage_db are filled in); stops them all afterwards."""
    started: list[Gateway] = []

    async def start(yaml_text: str, env: dict[str, str] | None = None, server: str = "") -> Gateway:
        """`server` adds fields to the server section ("limits: {requests_per_minute: 5}")."""
        extra = f", {server}" if server else ""
        server = f'server: {{listen: "127.0.0.1:0", usage_db: "{tmp_path / "usage.db"}", grace_period_s: 2{extra}}}\n'
        path = tmp_path / "llmrelay.yaml"
        path.write_text(server + yaml_text)
        gateway = await start_gateway(load_config(env or {}, path))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop(grace_period_s=0, drain_s=0)


@pytest.fixture
async def stub_for(gateway_factory: GatewayFactory) -> AsyncIterator[StubFactory]:
    """Starts a gateway as gateway_factory does and returns a stub over a channel to it; closes the channels after."""
    channels: list[grpc.aio.Channel] = []

    async def connect(yaml_text: str, env: dict[str, str] | None = None, server: str = "") -> pb.LLMServiceAsyncStub:
        gateway = await gateway_factory(yaml_text, env, server)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}"))
        return pb.LLMServiceStub(channels[-1])

    yield connect
    for channel in channels:
        await channel.close()


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


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The spans of the gateways a test starts with tracing on, kept in memory as each ends."""
    exporter = InMemorySpanExporter()

    def provider() -> TracerProvider:
        made = TracerProvider()
        made.add_span_processor(SimpleSpanProcessor(exporter))
        return made

    monkeypatch.setattr(tracing, "provider_factory", provider)
    yield exporter


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server of the test's own (tests/redis_server.py); where none is installed the test fails, saying
    how to install one."""
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[PostgresTemplate]:
    """An initialised PostgreSQL data directory, copied by each server (initdb once a session)."""
    template = PostgresTemplate()  # no binaries: fails, saying to apt-get install postgresql
    yield template
    template.remove()


@pytest.fixture(scope="module")
def postgres(postgres_template: PostgresTemplate) -> Iterator[PostgresServer]:
    """A real PostgreSQL shared by a module's tests (tests/postgres_server.py); each takes a database of its own."""
    server = PostgresServer(postgres_template)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    """A new database of the shared server, for one test."""
    return postgres.create_database(f"test_{uuid.uuid4().hex[:12]}")


# --- real model servers (tests/models): llama.cpp and Ollama serving a generated tiny model ------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama(tiny_model: Path) -> Iterator[ServerHandle]:
    with start_llama_server(tiny_model, alias="tiny", parallel=4) as server:
        yield server


@pytest.fixture(scope="session")
def ollama_binary() -> Path:
    """The Ollama binary scripts/build_ollama.sh builds (or LLMRELAY_OLLAMA_BIN). Without one, a test that needs it
    is skipped with the reason on a developer's machine, and fails in CI (CI is set): the tier never passes by not
    running."""
    binary = Path(os.environ.get("LLMRELAY_OLLAMA_BIN", DEFAULT_OLLAMA_BINARY))
    if not os.access(binary, os.X_OK):
        reason = f"no Ollama binary at {binary}: build it with scripts/build_ollama.sh (about 5 min on 2 cores)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def ollama(ollama_binary: Path, tiny_model: Path) -> Iterator[OllamaHandle]:
    with start_ollama(ollama_binary, tiny_model) as server:
        yield server
