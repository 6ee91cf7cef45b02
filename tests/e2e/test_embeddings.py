"""Embed through a real gateway and gRPC channel in front of loopback upstreams: vectors exact and in order, one
model only (retries and other backends of the same model, never another model), errors, billing, limits, the call
log and metrics, and the Python SDK and CLI."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Sequence
from hashlib import sha256
from pathlib import Path

import grpc
import pytest
from e2e.test_call_log import CALLS, lines, rid_of
from e2e.test_metrics import scrape, value
from e2e.test_tracing import connect, rpc_span
from harness import BIN
from llmrelay import AsyncClient, Client, InvalidArgumentError, NotFoundError
from llmrelay import v1 as pb
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.domain import BackendSpec, EmbeddingRequest, UpstreamError, UpstreamErrorKind
from llmrelay_server.tokens import TokenCounter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import FAST_ROUTER, OPENAI_TEST_KEY, GatewayFactory, StubFactory, details, wait_until
from upstream import EMBEDDING_DIMENSIONS, FakeUpstream, embedding_vector

DEFAULT = "embedding_model: embed-test"


def embedding_backends(primary: FakeUpstream, local: FakeUpstream, openai: str = "", ollama: str = "") -> str:
    """The seed's two backends, OpenAI first, with the embedding fields given for each ("embedding_model: x")."""
    openai, ollama = (f", {fields}" if fields else "" for fields in (openai, ollama))
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test{openai}}}
  ollama: {{base_url: "{local.base_url}", model: tiny{ollama}}}
{FAST_ROUTER}"""


def values(embedding: pb.Embedding) -> bytes:
    """A vector as the upstream's little-endian floats (the float32 values are widened exactly, so this is exact)."""
    return struct.pack(f"<{len(embedding.values)}f", *embedding.values)


def outcomes(answer: pb.EmbedResponse) -> list[tuple[str, int]]:
    return [(a.backend, a.outcome) for a in answer.attempts]


def reason(error: grpc.aio.AioRpcError) -> str:
    return str(details(error)["ErrorInfo"].reason)


def fields(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in details(error)["BadRequest"].field_violations]


@pytest.fixture
async def priced() -> AsyncIterator[FakeUpstream]:
    """An OpenAI stand-in serving an embedding model the shipped price table knows."""
    upstream = await FakeUpstream(models=("gpt-test",), embedding_models=("text-embedding-3-small",)).start()
    yield upstream
    await upstream.stop()


async def test_a_batch_of_100_vectors_of_1536_dimensions_round_trips_exactly(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT))
    texts = [f"text number {i} about the water" for i in range(100)]
    answer = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=30)
    assert (answer.backend, answer.model) == ("openai", "embed-test")
    assert [values(e) for e in answer.embeddings] == [embedding_vector(t) for t in texts]
    assert {len(e.values) for e in answer.embeddings} == {EMBEDDING_DIMENSIONS}
    # Packed: 4 bytes a dimension and a few a vector (unpacked floats would take 5 bytes each).
    assert answer.ByteSize() < 100 * (4 * EMBEDDING_DIMENSIONS + 8) + 1024
    (sent,) = primary.embedding_requests
    assert sent == {"model": "embed-test", "input": texts, "encoding_format": "base64"}
    assert (answer.usage.prompt_tokens, answer.usage.estimated) == (6 * 100, False)
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_SUCCEEDED)]


async def test_vectors_come_back_in_input_order_whatever_order_the_upstream_lists_them_in(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT))
    primary.inject({"out_of_order": True})
    texts = ["first", "second", "third"]
    answer = await stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=8), timeout=10)
    assert [values(e) for e in answer.embeddings] == [embedding_vector(t, 8) for t in texts]
    assert primary.embedding_requests[0]["dimensions"] == 8


async def test_vectors_not_of_the_dimensions_asked_are_refused_billed_and_another_backend_of_the_model_serves(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT))
    primary.inject({"ignore_dimensions": True})
    answer = await stub.Embed(pb.EmbedRequest(inputs=["a", "b"], dimensions=8), timeout=10)
    assert [values(e) for e in answer.embeddings] == [embedding_vector(t, 8) for t in ("a", "b")]
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_REJECTED), ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED)]
    assert "answered 1536 dimensions, not the 8 asked" in answer.attempts[0].error
    # Where no backend of the model shortens its vectors, the caller is told to stop asking it to.
    primary.inject({"ignore_dimensions": True})
    local.inject({"ignore_dimensions": True})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(inputs=["a"], dimensions=8), timeout=10)
    assert (caught.value.code(), reason(caught.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED")
    assert "leave dimensions unset" in str(caught.value.details())
    # The vectors refused were made all the same, of inputs the upstream read: each is billed, as interrupted.
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=10)).records
    billed = {(r.backend, r.requests, r.interrupted_requests, r.prompt_tokens, r.estimated_requests) for r in records}
    assert billed == {("openai", 2, 2, 3, 0), ("ollama", 2, 1, 3, 0)}


async def test_vectors_not_of_the_dimensions_asked_move_on_when_their_inputs_cannot_be_counted(
    primary: FakeUpstream, tmp_path: Path
) -> None:
    """Without the model's encoding (none installed) and no usage reported, the count for their bill failed, and its
    TokenizerUnavailableError ended the call rather than letting the model's next backend serve it."""
    spec = BackendSpec(name="openai", kind="openai_compatible", base_url=primary.base_url, default_model="gpt-test")
    provider = OpenAICompatibleProvider(spec, counter=TokenCounter(search_dirs=[tmp_path]))
    primary.inject({"ignore_dimensions": True, "no_usage": True})
    try:
        with pytest.raises(UpstreamError) as caught:
            await provider.embed("embed-test", EmbeddingRequest(inputs=("a",), dimensions=8), timeout_s=10)
    finally:
        await provider.aclose()
    assert (caught.value.kind, caught.value.consumed) == (UpstreamErrorKind.UNSUPPORTED, None)


async def test_no_model_means_the_first_backend_that_has_an_embedding_model(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, ollama=DEFAULT))
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=10)
    assert (answer.backend, answer.model) == ("ollama", "embed-test")
    assert primary.embedding_requests == []


async def test_a_backend_qualified_model_picks_the_backend(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT))
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"], model="ollama/embed-test"), timeout=10)
    assert answer.backend == "ollama"
    assert primary.embedding_requests == []


async def test_a_failing_backend_is_retried_then_another_backend_of_the_same_model_serves(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT))
    primary.inject({"status": 503}, {"status": 503})
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"], model="embed-test"), timeout=10)
    assert answer.backend == "ollama"
    assert values(answer.embeddings[0]) == embedding_vector("hello")
    assert outcomes(answer) == [
        ("openai", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("openai", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert [r["model"] for r in local.embedding_requests] == ["embed-test"]


async def test_an_embedding_waits_for_its_answer_as_long_as_embed_timeout_s_not_first_chunk_timeout_s(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A batch on a model server without a GPU takes far longer than a chat's first chunk: FAST_ROUTER's 1 s for that
    does not cut it, nor count it against the backend's circuit; the Embed's own limit does."""
    config = embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT) + "  embed_timeout_s: 2.5\n"
    stub = await stub_for(config)
    primary.inject({"stall_s": 1.5})
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"], model="embed-test"), timeout=10)
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_SUCCEEDED)]
    primary.inject({"stall_s": 10})
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"], model="embed-test"), timeout=10)
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_TIMEOUT), ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED)]
    assert answer.attempts[0].error == "no answer within 2.5 s (router.embed_timeout_s)"


async def test_a_retry_on_the_same_backend_can_cure_a_failure(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT))
    primary.inject({"status": 429, "retry_after": 0})
    answer = await stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=10)
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_RATE_LIMITED), ("openai", pb.ATTEMPT_OUTCOME_SUCCEEDED)]


async def test_an_embedding_never_falls_back_to_another_model(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama="embedding_model: embed-other"))
    primary.inject({"status": 503}, {"status": 503})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(caught.value) == "BACKENDS_UNAVAILABLE"
    assert local.embedding_requests == [] and local.chat_requests == []


async def test_invalid_requests_name_their_fields(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT))
    for request, named in (
        (pb.EmbedRequest(), ["inputs"]),
        (pb.EmbedRequest(inputs=["a", "", "c"], dimensions=0), ["inputs[1]", "dimensions"]),
        (pb.EmbedRequest(inputs=["a"], model=""), ["model"]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(caught.value) == named
    assert primary.embedding_requests == []


async def test_an_unknown_embedding_model_is_not_found(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT))
    # Not configured anywhere; a model of a backend with no embeddings; one its backend does not have upstream.
    for model in ("nope", "ollama/embed-test", "openai/nope"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["a"], model=model), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, model
        assert reason(caught.value) == "MODEL_NOT_FOUND"
    assert [r["model"] for r in primary.embedding_requests] == ["nope"]
    assert local.embedding_requests == []


async def test_a_gateway_without_embedding_models_says_so(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(inputs=["a"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(caught.value) == "MODEL_NOT_FOUND"


async def test_inputs_too_long_for_the_model_do_not_shut_its_backend_for_other_callers(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    yaml = embedding_backends(primary, local, openai=DEFAULT).replace("failure_threshold: 50", "failure_threshold: 2")
    stub = await stub_for(yaml)
    too_long = {"status": 400, "body": '{"error": {"message": "This model\'s maximum context length is 8192 tokens"}}'}
    for _ in range(3):
        primary.inject(too_long)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["a text too long"]), timeout=10)
        assert (caught.value.code(), reason(caught.value)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONTEXT_LENGTH_EXCEEDED",
        )
    # The caller's inputs said nothing of the backend: its circuit stays closed, and the next call is served.
    answer = await stub.Embed(pb.EmbedRequest(inputs=["short"]), timeout=10)
    assert outcomes(answer) == [("openai", pb.ATTEMPT_OUTCOME_SUCCEEDED)]
    assert len(primary.embedding_requests) == 4


@pytest.mark.parametrize(
    ("fault", "code", "why"),
    [
        ({"status": 400}, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
        ({"status": 401}, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED"),
        ({"body": '{"data": "no vectors"}'}, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE"),
        # A 200 whose body is the error, as some proxies answer: the error it says.
        (
            {"body": '{"error": {"message": "Invalid API key", "code": 401}}'},
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPSTREAM_AUTH_FAILED",
        ),
        # base64 of a NaN and a 1: an overflowing model's answer, no vector to compare.
        (
            {"body": '{"data": [{"index": 0, "embedding": "AADAfwAAgD8="}]}'},
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
        ),
        # JSON's true and false are no numbers: they were sent on as 1.0 and 0.0.
        (
            {"body": '{"data": [{"index": 0, "embedding": [0.5, true, false]}]}'},
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
        ),
    ],
    ids=["400", "401", "no vectors", "error in a 200", "NaN", "booleans"],
)
async def test_upstream_failures_map_as_for_chat(
    stub_for: StubFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    fault: dict[str, object],
    code: grpc.StatusCode,
    why: str,
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT))
    primary.inject(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(inputs=["a"]), timeout=10)
    assert (caught.value.code(), reason(caught.value)) == (code, why)


async def test_an_answer_over_the_message_limit_says_how_to_make_it_fit(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT), server="max_message_bytes: 65536")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(inputs=[f"text {i}" for i in range(20)]), timeout=10)  # 20 x 6 KiB
    assert (caught.value.code(), reason(caught.value)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ANSWER_TOO_LARGE")
    assert "send fewer inputs a call, or ask for fewer dimensions" in str(caught.value.details())


async def test_an_answer_that_cannot_fit_is_refused_before_any_backend_is_asked(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """With its dimensions set, the answer's least size is known before the call: no upstream is asked, nothing is
    billed for vectors the caller could not get, and no limit is taken (it would never fit, whenever it came)."""
    limits = "max_message_bytes: 65536, limits: {requests_per_minute: 1}"
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT), server=limits)
    # 20 x 4 KiB at least; and 16 x 1024 dimensions, 65,536 bytes of floats, over the limit with each vector's framing.
    for inputs in (20, 16):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["a"] * inputs, dimensions=1024), timeout=10)
        assert (caught.value.code(), reason(caught.value)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ANSWER_TOO_LARGE")
        assert "ask for fewer dimensions (nothing was sent)" in str(caught.value.details())
    assert primary.embedding_requests == []
    assert not (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    # The minute's one request is still there: 15 vectors fit (15 x 4,102 bytes, and the rest of the answer).
    answer = await stub.Embed(pb.EmbedRequest(inputs=["a"] * 15, dimensions=1024), timeout=10)
    assert [len(embedding.values) for embedding in answer.embeddings] == [1024] * 15


async def test_a_key_limited_to_some_models_embeds_only_with_those(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    keys = {
        "local-only": "llmr-embedder-0123456789abcdefghijklmn",
        "local-limited": "llmr-embedder-limited-0123456789ab",
    }
    # The second has limits: its model is judged by the limits too, before the call (it counts the inputs).
    limits = {"local-only": "", "local-limited": ", limits: {tokens_per_minute: 100000}"}
    auth = "auth:\n  keys:\n" + "".join(
        f'    - {{name: {name}, sha256: "{sha256(key.encode()).hexdigest()}", models: ["ollama/*"]{limits[name]}}}\n'
        for name, key in keys.items()
    )
    stub = await stub_for(embedding_backends(primary, local, openai=DEFAULT, ollama=DEFAULT) + auth)
    for key in keys.values():
        bearer = [("authorization", f"Bearer {key}")]
        # No model, or the model by its name alone, which openai embeds with too, first: on the backends this key may
        # use (the name alone was refused as openai's).
        for model in (None, "embed-test"):
            answer = await stub.Embed(pb.EmbedRequest(inputs=["a"], model=model), timeout=10, metadata=bearer)
            assert (answer.backend, outcomes(answer)) == ("ollama", [("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["a"], model="openai/embed-test"), timeout=10, metadata=bearer)
        assert (caught.value.code(), reason(caught.value)) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert primary.embedding_requests == []


async def test_usage_is_billed_priced_and_counted_when_the_upstream_reports_none(
    stub_for: StubFactory, priced: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(embedding_backends(priced, local, openai="embedding_model: text-embedding-3-small"))
    answer = await stub.Embed(pb.EmbedRequest(inputs=["water " * 500, "people " * 500]), timeout=10)
    # text-embedding-3-small: 0.02 USD per million tokens, 0.02 micro-USD a token.
    assert (answer.usage.prompt_tokens, answer.usage.cost.usd_micros) == (1000, 20)
    assert not answer.usage.cost.estimated and not answer.usage.cost.price_unknown
    priced.inject({"no_usage": True})
    counted = await stub.Embed(pb.EmbedRequest(inputs=["the people had water"]), timeout=10)
    assert counted.usage.estimated and counted.usage.prompt_tokens == 4  # by text-embedding-3-small's cl100k_base
    (record,) = (await stub.GetUsage(pb.GetUsageRequest(), timeout=10)).records
    assert (record.backend, record.model, record.requests) == ("openai", "text-embedding-3-small", 2)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated_requests) == (1004, 0, 1)


@pytest.mark.parametrize(
    ("limits", "refused"),
    [
        ("{requests_per_minute: 2}", "REQUESTS_PER_MINUTE_EXCEEDED"),
        ("{tokens_per_minute: 2500}", "TOKENS_PER_MINUTE_EXCEEDED"),
        ("{budget_usd_per_day: 0.00005}", "BUDGET_EXCEEDED"),
    ],
)
async def test_embed_counts_against_requests_tokens_and_budget(
    stub_for: StubFactory, priced: FakeUpstream, local: FakeUpstream, limits: str, refused: str
) -> None:
    yaml = embedding_backends(priced, local, openai="embedding_model: text-embedding-3-small")
    stub = await stub_for(yaml, server=f"limits: {limits}")
    request = pb.EmbedRequest(inputs=["water " * 500, "people " * 500])  # 1,000 tokens, 20 micro-USD
    for _ in range(2):
        await stub.Embed(request, timeout=10)
    # The third would be past each limit: a request too many, 3,000 tokens in a minute, 60 micro-USD in a day.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(request, timeout=10)
    assert (caught.value.code(), reason(caught.value)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
    assert len(priced.embedding_requests) == 2


@pytest.mark.parametrize("ends", ["cancelled", "deadline"])
async def test_an_embedding_that_ends_before_its_answer_is_billed_for_its_inputs(
    stub_for: StubFactory, priced: FakeUpstream, local: FakeUpstream, ends: str
) -> None:
    """The upstream read them all the same, as a chat's prompt (which is billed): billed nothing, a caller could have
    any number of batches read past its tokens a minute and its budget by leaving each call before its answer."""
    yaml = embedding_backends(priced, local, openai="embedding_model: text-embedding-3-small")
    stub = await stub_for(yaml, server="limits: {tokens_per_minute: 2500}")
    request = pb.EmbedRequest(inputs=["water " * 500, "people " * 500])  # 1,000 tokens, 20 micro-USD
    priced.inject({"stall_s": 10}, {"stall_s": 10})
    for _ in range(2):
        call = stub.Embed(request, timeout=1 if ends == "deadline" else 20)
        await wait_until(lambda: bool(priced.embedding_requests), timeout_s=5)
        if ends == "cancelled":
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call
        priced.embedding_requests.clear()

    async def billed() -> list[pb.UsageRecord]:
        return list((await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records)

    async with asyncio.timeout(5):  # a cancelled call is billed as it ends, after its caller has left
        while sum(record.requests for record in await billed()) < 2:  # noqa: ASYNC110 (the ledger, no event)
            await asyncio.sleep(0.05)
    inputs = [
        await stub.CountTokens(pb.CountTokensRequest(model="text-embedding-3-small", text=text), timeout=5)
        for text in request.inputs
    ]
    (record,) = await billed()
    assert (record.model, record.requests, record.interrupted_requests) == ("text-embedding-3-small", 2, 2)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated_requests) == (
        2 * sum(count.token_count for count in inputs), 0, 2
    )  # fmt: skip
    # The two batches count against the key's tokens a minute: a third is past it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(request, timeout=10)
    assert reason(caught.value) == "TOKENS_PER_MINUTE_EXCEEDED"


async def test_long_inputs_cut_by_their_deadline_before_their_answer_get_the_gateways_status_in_time(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Their bill counts them before the status goes out, and 2.9 MB take a while (some 250 ms): the status came after
    the caller's deadline, gRPC's bare DEADLINE_EXCEEDED in its place, no attempts told. The count is begun ahead of
    the deadline, while the attempt waits, as a chat's prompt's is."""
    stub = await stub_for(embedding_backends(primary, local, ollama=DEFAULT))
    local.inject({"stall_s": 10})
    inputs = [" ".join(f"w{i}" for i in range(start, start + 35_000)) for start in range(0, 350_000, 35_000)]
    with pytest.raises(grpc.aio.AioRpcError) as ended:  # 4 s: as the chat's test, for a busy 2-core CI machine
        await stub.Embed(pb.EmbedRequest(inputs=inputs), timeout=4)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason(ended.value) == "DEADLINE_EXCEEDED", "the gateway's status, not gRPC's own"
    (billed,) = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert billed.prompt_tokens > 300_000 and billed.interrupted_requests == 1


async def test_the_call_log_and_metrics_see_embed(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    yaml = embedding_backends(primary, local, openai=DEFAULT)
    gateway = await gateway_factory(yaml, server='metrics_listen: "127.0.0.1:0"')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        call = stub.Embed(pb.EmbedRequest(inputs=["a b c"]), timeout=10)
        await call
        named = stub.Embed(pb.EmbedRequest(inputs=["d e"], model="openai/embed-test"), timeout=10)
        await named
    found = lines(caplog)
    default, qualified = found[rid_of(await call.trailing_metadata())], found[rid_of(await named.trailing_metadata())]
    assert (default["rpc"], default["model"], default["served_model"]) == (
        "llmrelay.v1.LLMService/Embed",
        "default",
        "embed-test",
    )
    assert (default["backend"], default["prompt_tokens"], default["completion_tokens"]) == ("openai", 3, 0)
    assert (qualified["model"], qualified["prompt_tokens"]) == ("openai/embed-test", 2)
    assert gateway.metrics is not None and gateway.metrics.port is not None
    samples = await scrape(gateway.metrics.port)
    embed = {"grpc_type": "unary", "grpc_service": "llmrelay.v1.LLMService", "grpc_method": "Embed"}
    assert value(samples, "grpc_server_handled_total", **embed, grpc_code="OK") == 2
    tokens = value(
        samples, "llmrelay_tokens_total", backend="openai", model="embed-test", caller="anonymous", kind="prompt"
    )
    assert tokens == 5
    histogram = "gen_ai_client_token_usage_count"
    labels = {
        "gen_ai_operation_name": "embeddings",
        "gen_ai_response_model": "embed-test",
        "gen_ai_token_type": "input",
    }
    assert value(samples, histogram, **labels, gen_ai_request_model="default") == 1
    assert value(samples, histogram, **labels, gen_ai_request_model="openai/embed-test") == 1
    assert value(samples, histogram, **{**labels, "gen_ai_token_type": "output"}, gen_ai_request_model="default") == 0


def embed_blocking(target: str, texts: Sequence[str]) -> None:
    with Client(target) as client:
        answer = client.embed(texts, dimensions=4)
        assert [values(e) for e in answer.embeddings] == [embedding_vector(t, 4) for t in texts]
        assert len(client.embed("one text, not a sequence of letters").embeddings) == 1
        with pytest.raises(InvalidArgumentError) as caught:
            client.embed([])
        assert [v.field for v in caught.value.field_violations] == ["inputs"]


async def test_the_python_sdk_and_cli_embed(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(embedding_backends(primary, local, ollama=DEFAULT))
    target = f"127.0.0.1:{gateway.port}"
    # The blocking client runs in a thread: the gateway and the loopback upstreams share this test's event loop.
    await asyncio.to_thread(embed_blocking, target, ["alpha", "beta"])
    async with AsyncClient(target) as client:
        answer = await client.embed(["gamma"], model="ollama/embed-test")
        assert (answer.backend, values(answer.embeddings[0])) == ("ollama", embedding_vector("gamma"))
        with pytest.raises(NotFoundError):
            await client.embed(["gamma"], model="no-such-model")

    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay",
        *("--target", target, "embed", "first text", "second text", "--dimensions", "3"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    printed = [[float(x) for x in line.strip("[]").split(",")] for line in out.decode().splitlines()]
    assert [struct.pack("<3f", *vector) for vector in printed] == [
        embedding_vector(t, 3) for t in ("first text", "second text")
    ]
    assert err.decode().strip() == "[ollama/embed-test, 2 x 3 dimensions, 4 tokens]"


async def test_a_trace_shows_the_embeddings_operation_and_its_attempts(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    primary.inject({"status": 503})
    yaml = embedding_backends(primary, local, openai=DEFAULT)
    async for stub in connect(gateway_factory, yaml):
        await stub.Embed(pb.EmbedRequest(inputs=["a b c"]), timeout=10)
    server, attempts = rpc_span(exported, "llmrelay.v1.LLMService/Embed")
    assert server.attributes is not None
    assert server.attributes["gen_ai.operation.name"] == "embeddings"
    assert server.attributes["gen_ai.usage.input_tokens"] == 3
    assert "gen_ai.response.id" not in server.attributes
    assert [span.name for span in attempts] == ["embeddings embed-test"] * 2
    assert [span.attributes["llmrelay.outcome"] for span in attempts if span.attributes] == [
        "server_error",
        "succeeded",
    ]
