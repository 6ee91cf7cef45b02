"""Self-test of the real model servers the integration tests run: llama.cpp and Ollama.

Both serve the generated tiny model on loopback and are driven with the real openai SDK,
so a change in either server's OpenAI surface shows up here before it confuses a gateway
test. The servers are the session fixtures of tests/conftest.py, shared with the integration
tests; without an Ollama binary (scripts/build_ollama.sh, or LLMRELAY_OLLAMA_BIN pointing at
one) the Ollama tests are skipped, and fail in CI.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest

from .servers import OLLAMA_VERSION, OllamaHandle, ServerHandle, start_llama_server, start_ollama
from .tiny_gguf import write_tiny_gguf

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "say the people had water"}]


def _client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=30.0)


def _check_non_streaming(server: ServerHandle, model: str) -> None:
    completion = _client(server).chat.completions.create(model=model, messages=MESSAGES, max_tokens=8)

    choice = completion.choices[0]
    # The tiny model never samples EOS by default, so only the limit ends the reply.
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def _check_streaming(server: ServerHandle, model: str) -> None:
    chunks = list(
        _client(server).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )

    *content_chunks, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks if c.choices)
    finish_reasons = [c.choices[0].finish_reason for c in content_chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip()
    assert finish_reasons == ["length"]
    # OpenAI's shape: usage rides alone on a final chunk with no choices.
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in content_chunks)


@pytest.mark.integration
def test_llama_chat_completion(llama: ServerHandle) -> None:
    _check_non_streaming(llama, "tiny")


@pytest.mark.integration
def test_llama_chat_completion_stream_reports_usage_last(llama: ServerHandle) -> None:
    _check_streaming(llama, "tiny")


@pytest.mark.integration
def test_llama_tokenize_counts_whole_words(llama: ServerHandle) -> None:
    response = httpx2.post(f"{llama.base_url}/tokenize", json={"content": "the people had water"}, timeout=30.0)

    response.raise_for_status()
    tokens = response.json()["tokens"]
    # One token per vocabulary word, and no BOS: /tokenize adds special tokens only on request.
    assert len(tokens) == 4
    assert all(isinstance(t, int) for t in tokens)


@pytest.mark.integration
def test_llama_lists_the_alias(llama: ServerHandle) -> None:
    models = _client(llama).models.list()

    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.integration
def test_eos_boost_ends_replies_by_stop(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "eager.gguf", eos_boost=20.0)
    with start_llama_server(model, alias="eager") as server:
        completion = _client(server).chat.completions.create(model="eager", messages=MESSAGES, max_tokens=8)

    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 1


# Not an integration test: no server, and fast enough for `make test-fast`.
def test_tiny_gguf_is_deterministic(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "a.gguf", seed=3).read_bytes()
    second = write_tiny_gguf(tmp_path / "b.gguf", seed=3).read_bytes()
    other_seed = write_tiny_gguf(tmp_path / "c.gguf", seed=4).read_bytes()

    assert first == second
    assert first != other_seed


@pytest.mark.integration
def test_llama_server_stops_cleanly_on_sigterm(tiny_model: Path) -> None:
    with start_llama_server(tiny_model) as server:
        server.stop()

        assert server.process.returncode == 0, server.log()
        assert "llama_server: stopped" in server.log()


@pytest.mark.integration
def test_ollama_chat_completion(ollama: OllamaHandle) -> None:
    _check_non_streaming(ollama, ollama.model)


@pytest.mark.integration
def test_ollama_chat_completion_stream_reports_usage_last(ollama: OllamaHandle) -> None:
    _check_streaming(ollama, ollama.model)


@pytest.mark.integration
def test_ollama_native_endpoints(ollama: OllamaHandle) -> None:
    version = httpx2.get(f"{ollama.base_url}/api/version", timeout=30.0).json()
    tags = httpx2.get(f"{ollama.base_url}/api/tags", timeout=30.0).json()

    assert version == {"version": OLLAMA_VERSION.removeprefix("v")}
    assert [m["name"] for m in tags["models"]] == [ollama.model]
    assert tags["models"][0]["details"]["family"] == "llama"


@pytest.mark.integration
def test_ollama_stops_cleanly_on_sigterm(ollama_binary: Path, tiny_model: Path) -> None:
    with start_ollama(ollama_binary, tiny_model) as server:
        # A loaded model means a runner child process that serve must take down too.
        _check_non_streaming(server, server.model)
        server.stop()

        assert server.process.returncode == 0, server.log()
