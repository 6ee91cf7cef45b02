"""CountTokens end to end: the server's own tokenizer where the backend has one, tiktoken offline otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from llmrelay import v1 as pb
from support import GatewayFactory, user
from upstream import FakeUpstream


@pytest.fixture
async def vllm() -> AsyncIterator[FakeUpstream]:
    """Stands in for a vLLM server: the chat API and its /tokenize."""
    upstream = await FakeUpstream(models=("qwen",), vllm=True).start()
    yield upstream
    await upstream.stop()


async def connect(gateway_factory: GatewayFactory, base_url: str) -> tuple[grpc.aio.Channel, pb.LLMServiceAsyncStub]:
    backend = f"{{name: gpu, kind: vllm, base_url: '{base_url}', model: qwen}}"
    gateway = await gateway_factory(f"llm:\n  backends: [{backend}]\n  order: [gpu]\n")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return channel, pb.LLMServiceStub(channel)


def weather_tool() -> pb.Tool:
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    return pb.Tool(function=pb.FunctionDefinition(name="weather", description="today's weather", parameters=parameters))


async def test_vllm_counts_with_its_own_tokenizer_and_the_count_is_its_prompt_tokens(
    gateway_factory: GatewayFactory, vllm: FakeUpstream
) -> None:
    channel, stub = await connect(gateway_factory, vllm.base_url)
    async with channel:
        chat = [pb.Message(role=pb.ROLE_SYSTEM, content="you forecast"), user("weather in Oslo tomorrow?")]
        count = await stub.CountTokens(
            pb.CountTokensRequest(model="gpu/qwen", messages=chat, tools=[weather_tool()]), timeout=5
        )
        answer = await stub.Complete(
            pb.CompleteRequest(model="gpu/qwen", messages=chat, options=pb.CompletionOptions(tools=[weather_tool()])),
            timeout=5,
        )
    assert (count.encoding, count.estimated, count.model) == ("backend:gpu", False, "qwen")
    assert count.token_count == answer.usage.prompt_tokens
    (asked,) = vllm.tokenize_requests
    sent = vllm.chat_requests[-1]
    # The same prompt the completion sends, in the form vLLM's chat template takes, with the generation prompt.
    assert (asked["messages"], asked["tools"]) == (sent["messages"], sent["tools"])
    assert (asked["model"], asked["add_generation_prompt"]) == ("qwen", True)


async def test_without_a_server_tokenizer_the_count_is_an_offline_estimate(
    gateway_factory: GatewayFactory, vllm: FakeUpstream
) -> None:
    vllm.vllm = False  # an OpenAI-compatible server with no /tokenize: 404
    channel, stub = await connect(gateway_factory, vllm.base_url)
    async with channel:
        count = await stub.CountTokens(
            pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5
        )
        again = await stub.CountTokens(
            pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5
        )
    assert count.estimated and count.encoding == "o200k_base"
    assert count.token_count > 0 and again == count
    assert len(vllm.tokenize_requests) == 0


@pytest.mark.parametrize(
    ("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-oss:20b", "o200k_harmony")]
)
async def test_models_no_backend_serves_are_counted_offline_with_their_encoding(
    gateway_factory: GatewayFactory, vllm: FakeUpstream, model: str, encoding: str
) -> None:
    channel, stub = await connect(gateway_factory, vllm.base_url)
    async with channel:
        text = await stub.CountTokens(pb.CountTokensRequest(model=model, text="tiktoken is great!"), timeout=5)
    assert (text.token_count, text.encoding, text.estimated, text.model) == (6, encoding, False, model)
    assert len(vllm.tokenize_requests) == 0
