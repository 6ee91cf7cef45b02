"""The gateway in front of real model servers: llama.cpp's server and Ollama, serving a tiny generated model.

These prove the protocol as the servers speak it, not as our loopback fake understands it. The servers are the
session fixtures of tests/conftest.py; the Ollama tests need a binary built by scripts/build_ollama.sh (`make test`
builds it): without one they are skipped with the reason on a developer's machine, and fail in CI (CI is set), so
that the tier never passes by not running.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from llmrelay import v1 as pb
from models.servers import OllamaHandle, ServerHandle
from support import StubFactory, details, png, user

pytestmark = pytest.mark.integration

GREEDY = pb.CompletionOptions(temperature=0.0, seed=1, max_tokens=12)
DEAD_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


def backends_yaml(*entries: tuple[str, str, str, str]) -> str:
    """(name, kind, base_url, model) per backend, in routing order; the built-in openai/ollama are left out."""
    lines = [f'    - {{name: {n}, kind: {k}, base_url: "{u}", model: "{m}"}}' for n, k, u, m in entries]
    names = ", ".join(entry[0] for entry in entries)
    return "llm:\n  backends:\n" + "\n".join(lines) + f"\n  order: [{names}]\n"


def llama_backend(llama: ServerHandle) -> tuple[str, str, str, str]:
    return ("local", "llamacpp", f"{llama.base_url}/v1", "tiny")


def ollama_backend(ollama: OllamaHandle) -> tuple[str, str, str, str]:
    return ("ollama_real", "ollama", f"{ollama.base_url}/v1", ollama.model)


async def complete_and_stream(
    stub: pb.LLMServiceAsyncStub, model: str
) -> tuple[pb.CompleteResponse, str, pb.StreamCompleteResponse]:
    messages = [user("the people had water")]
    answer = await stub.Complete(pb.CompleteRequest(model=model, messages=messages, options=GREEDY), timeout=60)
    chunks = [
        c
        async for c in stub.StreamComplete(
            pb.StreamCompleteRequest(model=model, messages=messages, options=GREEDY), timeout=60
        )
    ]
    return answer, "".join(c.delta.content for c in chunks), chunks[-1]


async def test_llama_cpp_unary_and_streaming(stub_for: StubFactory, llama: ServerHandle) -> None:
    stub = await stub_for(backends_yaml(llama_backend(llama)))
    answer, streamed, last = await complete_and_stream(stub, "tiny")
    assert answer.backend == "local"
    assert answer.message.content, "the model answered with text"
    assert answer.finish_reason == pb.FINISH_REASON_LENGTH, "the tiny model stops by max_tokens"
    assert answer.usage.completion_tokens == 12 and not answer.usage.estimated
    assert streamed == answer.message.content, "greedy sampling: the stream concatenates to the unary answer"
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (answer.usage.prompt_tokens, 12)
    assert not last.usage.estimated, "llama.cpp reports usage in the stream's last chunk"


async def test_ollama_unary_streaming_and_native_health(stub_for: StubFactory, ollama: OllamaHandle) -> None:
    stub = await stub_for(backends_yaml(ollama_backend(ollama)))
    answer, streamed, last = await complete_and_stream(stub, "ollama_real/tiny")
    assert answer.backend == "ollama_real" and answer.message.content
    assert streamed == answer.message.content
    assert last.usage.total_tokens == answer.usage.total_tokens and not last.usage.estimated
    health = await stub.Health(pb.HealthRequest(probe=True), timeout=30)
    (backend,) = health.backends
    assert backend.kind == "ollama" and backend.reachable
    assert list(backend.models) == ["tiny:latest"], "listed by Ollama's native /api/tags"
    # A model the probe learned from /api/tags resolves to this backend.
    assert (
        await stub.Complete(pb.CompleteRequest(model="tiny:latest", messages=[user("hi")], options=GREEDY), timeout=60)
    ).backend == "ollama_real"


async def test_primary_down_falls_back_to_local(stub_for: StubFactory, llama: ServerHandle) -> None:
    stub = await stub_for(backends_yaml(("primary", "openai_compatible", DEAD_URL, "gpt-test"), llama_backend(llama)))
    answer = await stub.Complete(pb.CompleteRequest(messages=[user("hello")], options=GREEDY), timeout=60)
    assert (answer.backend, answer.model) == ("local", "tiny")
    assert [a.outcome for a in answer.attempts][-1] == pb.ATTEMPT_OUTCOME_SUCCEEDED
    assert {a.backend for a in answer.attempts} == {"primary", "local"}


async def test_local_down_falls_back_to_the_other_backend(stub_for: StubFactory, ollama: OllamaHandle) -> None:
    dead_local = ("local_down", "llamacpp", DEAD_URL, "tiny")
    stub = await stub_for(backends_yaml(dead_local, ollama_backend(ollama)))
    answer = await stub.Complete(pb.CompleteRequest(messages=[user("hello")], options=GREEDY), timeout=60)
    assert answer.backend == "ollama_real"
    chunks = [
        c
        async for c in stub.StreamComplete(
            pb.StreamCompleteRequest(messages=[user("hello")], options=GREEDY), timeout=60
        )
    ]
    assert {c.backend for c in chunks} == {"ollama_real"}


async def test_usage_is_attributed_across_providers_and_concurrent_calls_add_up(
    stub_for: StubFactory, llama: ServerHandle, ollama: OllamaHandle
) -> None:
    # Each server answers one call at a time, so the sixth call to each waits for five answers: the router waits
    # for it as long as the call's deadline rather than its first_chunk_timeout_s (15 s), which a busy machine
    # reached and fell back to the other server.
    router = "router: {first_chunk_timeout_s: 120}\n"
    stub = await stub_for(backends_yaml(llama_backend(llama), ollama_backend(ollama)) + router)
    requests = [
        pb.CompleteRequest(
            model="local/tiny" if i % 2 else "ollama_real/tiny", messages=[user(f"water {i}")], options=GREEDY
        )
        for i in range(12)
    ]
    answers = await asyncio.gather(*(stub.Complete(r, timeout=120) for r in requests))
    assert [a.backend for a in answers] == ["ollama_real", "local"] * 6
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=10)).records
    by_backend = {r.backend: r for r in records}
    for backend in ("local", "ollama_real"):
        served = [a for a in answers if a.backend == backend]
        assert by_backend[backend].requests == len(served)
        assert by_backend[backend].total_tokens == sum(a.usage.total_tokens for a in served)
        assert by_backend[backend].estimated_requests == 0


async def test_count_tokens_is_exact_through_llama_cpp_and_matches_its_prompt_tokens(
    stub_for: StubFactory, llama: ServerHandle
) -> None:
    stub = await stub_for(backends_yaml(llama_backend(llama)))
    chat = [pb.Message(role=pb.ROLE_SYSTEM, content="you are water"), user("the people had water")]
    count = await stub.CountTokens(pb.CountTokensRequest(model="local/tiny", messages=chat), timeout=30)
    assert (count.encoding, count.estimated) == ("backend:local", False)
    answer = await stub.Complete(pb.CompleteRequest(model="local/tiny", messages=chat, options=GREEDY), timeout=60)
    assert count.token_count == answer.usage.prompt_tokens


async def test_seed_case_gpt_oss_on_a_local_ollama(stub_for: StubFactory) -> None:
    """The seed's own case, as written: gpt-oss:20b on localhost:11434, where a workstation runs a real Ollama."""
    import httpx2

    try:
        tags = httpx2.get("http://localhost:11434/api/tags", timeout=2).json()
    except (httpx2.HTTPError, ValueError):
        pytest.skip("no Ollama answers on localhost:11434")
    if not any(m.get("name") in ("gpt-oss:20b",) for m in tags.get("models", [])):
        pytest.skip("the Ollama on localhost:11434 has no gpt-oss:20b (ollama pull gpt-oss:20b)")
    stub = await stub_for("", {"OLLAMA_HOST": "localhost:11434"})
    answer = await stub.Complete(
        pb.CompleteRequest(model="gpt-oss:20b", messages=[user("Say hello in one word.")]), timeout=300
    )
    assert answer.backend == "ollama" and answer.message.content


async def test_what_llama_cpp_cannot_do_is_the_callers_answer_and_shuts_no_backend(
    stub_for: StubFactory, llama: ServerHandle
) -> None:
    """This llama-server embeds nothing (no --embeddings: 501) and reads no image (no mmproj: a 500 saying so): each
    is the request's failure, told at once, not a server error retried and counted against the backend's circuit,
    which after a few such calls shut the backend for every other caller."""
    name, _, _, model = llama_backend(llama)
    yaml = backends_yaml(llama_backend(llama)).replace(
        f'model: "{model}"}}', f'model: "{model}", embedding_model: "{model}"}}'
    )
    stub = await stub_for(yaml, server="health_interval_s: 3600")
    image = pb.ContentPart(image=pb.ImagePart(data=png(8, 8), media_type="image/png"))
    looking = pb.CompleteRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, parts=[image])], options=GREEDY)
    for _ in range(3):  # the circuit's threshold
        for call in (
            stub.Embed(pb.EmbedRequest(model=model, inputs=["water"]), timeout=30),
            stub.Complete(looking, timeout=30),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_REJECTED"
            assert len(details(caught.value)["AttemptHistory"].attempts) == 1, "not retried"
    answer = await stub.Complete(
        pb.CompleteRequest(model=model, messages=[user("the people")], options=GREEDY), timeout=60
    )
    assert answer.backend == name
    (backend,) = (await stub.Health(pb.HealthRequest(), timeout=10)).backends
    assert backend.circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_what_ollamas_model_cannot_do_goes_to_the_next_backend(
    stub_for: StubFactory, llama: ServerHandle, ollama: OllamaHandle
) -> None:
    """Ollama refuses a chat with tools, or with a reasoning effort, to a model without the capability, with a 400
    ('"tiny" does not support tools'): that ended the call as the caller's mistake, and llama.cpp, next in the chain
    with the same model and taking both, was never tried."""
    stub = await stub_for(backends_yaml(ollama_backend(ollama), llama_backend(llama)))
    tool = pb.Tool(function=pb.FunctionDefinition(name="get", parameters_json='{"type": "object", "properties": {}}'))
    for options, capability in (
        (pb.CompletionOptions(max_tokens=3, tools=[tool]), "tools"),
        (pb.CompletionOptions(max_tokens=3, reasoning_effort=pb.REASONING_EFFORT_LOW), "thinking"),
    ):
        answer = await stub.Complete(pb.CompleteRequest(messages=[user("hi")], options=options), timeout=60)
        assert answer.backend == "local", capability
        refused, served = answer.attempts
        assert (refused.backend, refused.outcome) == ("ollama_real", pb.ATTEMPT_OUTCOME_REJECTED)
        assert f"does not support {capability}" in refused.error
        assert served.outcome == pb.ATTEMPT_OUTCOME_SUCCEEDED


async def test_a_generation_ollama_stops_itself_ends_its_stream_as_it_ends_its_answer(
    stub_for: StubFactory, ollama: OllamaHandle
) -> None:
    """The tiny model, greedy and unbounded, repeats one token until Ollama stops it ("token repeat limit reached"):
    its /v1 ends the answer with a null finish reason, and the stream after the text with none and no [DONE]. The
    stream failed ABORTED (STREAM_INTERRUPTED) where the answer succeeded, and each counted against the backend's
    circuit: one caller's looping prompts shut it for every caller."""
    stub = await stub_for(backends_yaml(ollama_backend(ollama)), server="health_interval_s: 3600")
    model, messages = f"ollama_real/{ollama.model}", [user("the people had water")]
    options = pb.CompletionOptions(temperature=0.0, seed=1)
    answer = await stub.Complete(pb.CompleteRequest(model=model, messages=messages, options=options), timeout=60)
    assert answer.finish_reason == pb.FINISH_REASON_UNSPECIFIED and answer.message.content
    for _ in range(5):  # the circuit's failure threshold
        chunks = [
            c
            async for c in stub.StreamComplete(
                pb.StreamCompleteRequest(model=model, messages=messages, options=options), timeout=60
            )
        ]
        assert "".join(c.delta.content for c in chunks) == answer.message.content
        assert chunks[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED
        assert chunks[-1].usage.completion_tokens > 0
    (backend,) = (await stub.Health(pb.HealthRequest(), timeout=10)).backends
    assert backend.circuit_state == pb.CIRCUIT_STATE_CLOSED
