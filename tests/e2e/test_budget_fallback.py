"""A daily budget is reserved at the highest price among the routes a call may take, and the snapshots of their models
priced apart, through a real gRPC channel: many concurrent callers whose cheap first route fails and whose dearer
fallback answers (or whose answers name a dearer snapshot) spend no more than the budget between them, and exactly as
many are admitted as it pays for at the dearer price."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay_server.tokens import TokenCounter
from support import FAST_ROUTER, OPENAI_TEST_KEY, StubFactory, chat, details, read_all, stream_chat
from upstream import FakeUpstream

# USD per million tokens, i.e. micro-USD per token; only what the price is charged on counts, so that a call reserves
# exactly what the dearer route bills (a chat's answer, an embedding's inputs) and the count is exact.
CHEAP, DEAR = 1000, 3000
CALLS_PAID_FOR = 4
CALLS = 12
"""Fired at once: at the cheap price the budget would admit them all."""


@pytest.fixture
async def dear() -> AsyncIterator[FakeUpstream]:
    """The fallback's upstream, of its own: the faults queued for the first route's never reach it."""
    upstream = await FakeUpstream(models=("gpt-dear",), embedding_models=("embed-test",)).start()
    yield upstream
    await upstream.stop()


def config(primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream, *, dear_snapshot: bool = False) -> str:
    """openai (cheap, first), then the dear fallback, then Ollama; both paid backends embed with embed-test. With
    `dear_snapshot`, gpt-test's snapshot gpt-test-2025-01-01 has a price of its own, the dear one."""
    snapshot = f'  "gpt-test-2025-01-01": {{prompt: 0, completion: {DEAR}}}\n' if dear_snapshot else ""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test, embedding_model: embed-test}}
  ollama: {{base_url: "{local.base_url}", model: tiny}}
  backends:
    - {{name: dear, kind: openai_compatible, base_url: "{dear.base_url}", model: gpt-dear, api_key: "{OPENAI_TEST_KEY}",
       embedding_model: embed-test}}
  order: [openai, dear, ollama]
{FAST_ROUTER}
pricing:
  "gpt-test": {{prompt: 0, completion: {CHEAP}}}
  "gpt-dear": {{prompt: 0, completion: {DEAR}}}
  "openai/embed-test": {{prompt: {CHEAP}, completion: 0}}
  "dear/embed-test": {{prompt: {DEAR}, completion: 0}}
{snapshot}"""


async def at_once(
    call: Callable[[], Awaitable[Any]], subject: str = "gateway"
) -> tuple[list[Any], list[grpc.aio.AioRpcError]]:
    """CALLS calls at the same time: the answers, and the refusals (each for the budget of `subject`)."""

    async def one() -> Any:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            return error

    results = await asyncio.gather(*(one() for _ in range(CALLS)))
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        found = details(error)
        assert (found["ErrorInfo"].reason, found["QuotaFailure"].violations[0].subject) == (
            "BUDGET_EXCEEDED",
            subject,
        )
        assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0, "a budget spent frees at midnight (UTC)"
    return [r for r in results if not isinstance(r, grpc.aio.AioRpcError)], refused


async def spent(stub: pb.LLMServiceAsyncStub, metadata: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """The ledger's cost per backend."""
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5, metadata=metadata)).records
    totals: dict[str, int] = {}
    for record in records:
        totals[record.backend] = totals.get(record.backend, 0) + record.cost.usd_micros
    return totals


async def test_concurrent_chats_that_fall_back_to_a_dearer_route_spend_no_more_than_the_budget(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    # "echo: x y" is 3 completion tokens, max_tokens too: 9,000 micro-USD at the dear price, 3,000 at the cheap one.
    per_call = 3 * DEAR
    budget = CALLS_PAID_FOR * per_call + per_call // 2
    stub = await stub_for(config(primary, dear, local), server=f"limits: {{budget_usd_per_day: {budget / 1e6}}}")
    primary.inject(*[{"status": 503}] * (2 * CALLS))  # the first route fails each attempt (and its retry)
    request = chat("x y", model="gpt-test", options=pb.CompletionOptions(max_tokens=3))
    answers, refused = await at_once(lambda: stub.Complete(request, timeout=10))
    assert [(a.backend, a.usage.cost.usd_micros) for a in answers] == [("dear", per_call)] * CALLS_PAID_FOR
    assert len(refused) == CALLS - CALLS_PAID_FOR
    assert len(dear.chat_requests) == CALLS_PAID_FOR, "refused calls reach no upstream"
    assert await spent(stub) == {"dear": CALLS_PAID_FOR * per_call}
    assert CALLS_PAID_FOR * per_call <= budget


async def test_concurrent_chats_answered_by_a_dearer_snapshot_of_their_model_spend_no_more_than_the_budget(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    """An answer names the snapshot that served (OpenAI's gpt-4o answered as gpt-4o-2024-05-13, priced twice as dear)
    and is billed at its price: reserved at the model's own, the callers spent past the budget between them."""
    per_call = 3 * DEAR
    budget = CALLS_PAID_FOR * per_call + per_call // 2
    limits = f"limits: {{budget_usd_per_day: {budget / 1e6}}}"
    stub = await stub_for(config(primary, dear, local, dear_snapshot=True), server=limits)
    primary.inject(*[{"served_model": "gpt-test-2025-01-01"}] * CALLS)
    request = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))
    answers, refused = await at_once(lambda: stub.Complete(request, timeout=10))
    assert [(a.model, a.usage.cost.usd_micros) for a in answers] == [("gpt-test-2025-01-01", per_call)] * CALLS_PAID_FOR
    assert len(refused) == CALLS - CALLS_PAID_FOR
    assert await spent(stub) == {"openai": CALLS_PAID_FOR * per_call}


async def test_concurrent_embeddings_that_fall_back_to_a_dearer_backend_spend_no_more_than_the_budget(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    inputs = ["hello world", "good morning"]
    # The fake upstream bills a token a word; the gateway reserves its own offline count: they agree here.
    tokens = (await TokenCounter().count_texts_async("embed-test", inputs)).tokens
    assert tokens == sum(len(text.split()) for text in inputs)
    per_call = tokens * DEAR
    budget = CALLS_PAID_FOR * per_call + per_call // 2
    stub = await stub_for(config(primary, dear, local), server=f"limits: {{budget_usd_per_day: {budget / 1e6}}}")
    primary.inject(*[{"status": 503}] * (2 * CALLS))
    request = pb.EmbedRequest(model="embed-test", inputs=inputs)
    answers, refused = await at_once(lambda: stub.Embed(request, timeout=10))
    assert [(a.backend, a.usage.cost.usd_micros) for a in answers] == [("dear", per_call)] * CALLS_PAID_FOR
    assert len(refused) == CALLS - CALLS_PAID_FOR
    assert await spent(stub) == {"dear": CALLS_PAID_FOR * per_call}


async def test_a_chat_that_may_not_fall_back_reserves_at_its_own_routes_price(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    """exact_model forbids the dearer fallback: a budget that pays for every call at the cheap price admits them all,
    where reserving at the fallback's price would have refused all but CALLS_PAID_FOR of them."""
    per_call = 3 * CHEAP
    stub = await stub_for(
        config(primary, dear, local), server=f"limits: {{budget_usd_per_day: {CALLS * per_call / 1e6}}}"
    )
    request = chat("x y", model="gpt-test", options=pb.CompletionOptions(max_tokens=3))
    request.exact_model = True
    answers, refused = await at_once(lambda: stub.Complete(request, timeout=10))
    assert (len(answers), refused) == (CALLS, [])
    assert await spent(stub) == {"openai": CALLS * per_call}


async def test_a_key_that_may_not_use_the_dearer_fallback_reserves_at_the_price_it_may_pay(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    """The key may use gpt-test alone: its calls can never fall back to the dear backend, so a budget that pays for
    every call at the cheap price admits them all."""
    per_call = 3 * CHEAP
    key = "llmr-cheap-only-0123456789abcdefghij"
    digest = hashlib.sha256(key.encode()).hexdigest()
    budget = f"limits: {{budget_usd_per_day: {CALLS * per_call / 1e6}}}"
    auth = f'auth:\n  keys:\n    - {{name: cheap-only, sha256: "{digest}", models: ["openai/*"], {budget}}}\n'
    stub = await stub_for(config(primary, dear, local) + auth)
    request = chat("x y", model="gpt-test", options=pb.CompletionOptions(max_tokens=3))
    bearer = [("authorization", f"Bearer {key}")]
    answers, refused = await at_once(lambda: stub.Complete(request, timeout=10, metadata=bearer), "key:cheap-only")
    assert (len(answers), refused) == (CALLS, [])
    assert await spent(stub, bearer) == {"openai": CALLS * per_call}


async def test_concurrent_streams_that_start_over_on_another_route_spend_no_more_than_the_budget(
    stub_for: StubFactory, primary: FakeUpstream, dear: FakeUpstream, local: FakeUpstream
) -> None:
    # A stream that asks to start over when broken is billed for the broken part, then for the next route's whole
    # answer: it reserves an answer on each of its routes. Reserving one, at the dearest, admitted six calls here, which
    # spent half again their budget between them.
    per_call = 3 * CHEAP + 3 * DEAR  # openai's answer, then dear's (Ollama's is free)
    budget = CALLS_PAID_FOR * per_call + per_call // 2
    stub = await stub_for(config(primary, dear, local), server=f"limits: {{budget_usd_per_day: {budget / 1e6}}}")
    primary.inject(*[{"stream_cut_after": 2}] * CALLS)  # the first route breaks after its first words
    request = stream_chat(
        "x y", model="gpt-test", options=pb.CompletionOptions(max_tokens=3), on_interrupt=pb.INTERRUPT_POLICY_RESTART
    )
    answers, refused = await at_once(lambda: read_all(stub.StreamComplete(request, timeout=10)))
    assert [[c.restart.backend for c in chunks if c.HasField("restart")] for chunks in answers] == [
        ["openai"]
    ] * CALLS_PAID_FOR
    assert [chunks[-1].backend for chunks in answers] == ["dear"] * CALLS_PAID_FOR
    assert len(refused) == CALLS - CALLS_PAID_FOR
    billed = await spent(stub)
    assert billed["dear"] == CALLS_PAID_FOR * 3 * DEAR and 0 < billed["openai"] < CALLS_PAID_FOR * 3 * CHEAP
    assert sum(billed.values()) <= budget
