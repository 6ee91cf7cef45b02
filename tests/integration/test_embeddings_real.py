"""Embed through the gateway in front of real servers, llama.cpp (in embedding mode) and Ollama, serving the tiny
generated model: the vectors are the server's own /v1/embeddings answer, in input order, with its token count.

The tiny model is no embedding model (a random causal LM, mean-pooled), so only the plumbing is proven: the servers'
base64 answers, decoded and packed, equal their float answers. Ollama needs its binary (see test_real_servers)."""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from llmrelay import v1 as pb
from models.servers import OllamaHandle, ServerHandle, start_llama_server
from support import StubFactory

pytestmark = pytest.mark.integration

TEXTS = ["the people had water", "hot day", "what is the number of words", "water"]


@pytest.fixture(scope="module")
def llama_embedder(tiny_model: Path) -> Iterator[ServerHandle]:
    with start_llama_server(tiny_model, alias="tiny", embedding=True) as server:
        yield server


def backend_yaml(name: str, kind: str, base_url: str, model: str) -> str:
    return (
        f'llm:\n  backends:\n    - {{name: {name}, kind: {kind}, base_url: "{base_url}", model: "{model}",'
        f' embedding_model: "{model}"}}\n  order: [{name}]\n'
    )


def servers_own(base_url: str, model: str, texts: list[str]) -> dict[str, Any]:
    """The server's answer to /v1/embeddings with vectors as numbers, asked directly."""
    body = json.dumps({"model": model, "input": texts}).encode()
    request = urllib.request.Request(f"{base_url}/v1/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def float32s(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


async def embed_and_compare(stub: pb.LLMServiceAsyncStub, base_url: str, model: str, backend: str) -> None:
    answer = await stub.Embed(pb.EmbedRequest(inputs=TEXTS), timeout=60)
    own = await asyncio.to_thread(servers_own, base_url, model, TEXTS)
    expected = [item["embedding"] for item in sorted(own["data"], key=lambda item: item["index"])]
    assert (answer.backend, answer.model) == (backend, own["model"])
    assert len(answer.embeddings) == len(TEXTS)
    for got, want in zip(answer.embeddings, expected, strict=True):
        # Equal as float32s: Ollama writes each float32 in its shortest decimal, which is no double's exact value.
        assert float32s(got.values) == float32s(want)
    # Distinct texts, distinct vectors: the order is the inputs', not the same vector four times.
    assert len({tuple(e.values) for e in answer.embeddings}) == len(TEXTS)
    assert (answer.usage.prompt_tokens, answer.usage.estimated) == (own["usage"]["prompt_tokens"], False)


async def test_llama_cpp_embeddings_are_the_servers_own(stub_for: StubFactory, llama_embedder: ServerHandle) -> None:
    stub = await stub_for(backend_yaml("local", "llamacpp", f"{llama_embedder.base_url}/v1", "tiny"))
    await embed_and_compare(stub, llama_embedder.base_url, "tiny", "local")


async def test_ollama_embeddings_are_the_servers_own(stub_for: StubFactory, ollama: OllamaHandle) -> None:
    stub = await stub_for(backend_yaml("ollama_real", "ollama", f"{ollama.base_url}/v1", ollama.model))
    await embed_and_compare(stub, ollama.base_url, ollama.model, "ollama_real")
