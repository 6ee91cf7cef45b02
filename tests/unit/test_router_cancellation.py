"""An attempt the call ends under: cancelled when the caller leaves, a timeout when the caller's deadline passed (the
outcome the gateway's own timer gives it), whichever timer ended the call; recorded either way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import pytest
from llmrelay_server import metering
from llmrelay_server.config import Price, RouterConfig
from llmrelay_server.domain import (
    AttemptOutcome,
    BackendSpec,
    CompletionRequest,
    CompletionResponse,
    DeadlineExceededError,
    LLMProvider,
    Message,
    Role,
    TokenCount,
    TokenUsage,
    Tool,
    UpstreamError,
    UpstreamErrorKind,
)
from llmrelay_server.pricing import PriceTable
from llmrelay_server.router import CircuitState, Route, Router, _Chain
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.usage import UsageLedger

SPEC = BackendSpec(name="slow", kind="openai_compatible", base_url="http://slow/v1", default_model="m")
REQUEST = CompletionRequest(messages=(Message(Role.USER, "hi"),))


@dataclass
class Holding:
    """A provider that takes the request and never answers; or, not `sent`, never gets it written (its connection
    never made)."""

    spec: BackendSpec = SPEC
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    sent: bool = True
    tokenizer: int | None = None
    """What its own tokenizer counts a chat (a model server's, with its chat template); None: it has none."""

    async def complete(self, model: str, request: CompletionRequest, *, timeout_s: float) -> CompletionResponse:
        metering.request_begun()  # a connection being made, or made: in no line of the pool's
        if self.sent:
            metering.request_sent()
        self.asked.set()
        await asyncio.Event().wait()
        raise AssertionError("never answers")

    async def count_tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> TokenCount | None:
        if self.tokenizer is None:
            return None
        return TokenCount(tokens=self.tokenizer, model=model, encoding=f"backend:{SPEC.name}", estimated=False)


@dataclass
class Bills:
    """The ledger's part a call plays: what it records (open: a shutdown closes it)."""

    records: list[tuple[str, str, str, TokenUsage, bool]] = field(default_factory=list)
    closed: bool = False

    def record(self, backend: str, model: str, caller: str, usage: TokenUsage, *, interrupted: bool = False) -> None:
        self.records.append((backend, model, caller, usage, interrupted))


def router_of(provider: object, bills: Bills | None = None) -> Router:
    return Router(
        [cast(LLMProvider, provider)],
        config=RouterConfig(),
        counter=TokenCounter(),
        ledger=cast(UsageLedger, bills or Bills()),
        prices=PriceTable({}, Price(prompt=5.0, completion=15.0)),
    )


async def called(
    deadline_s: float, bills: Bills | None = None, *, sent: bool = True, tokenizer: int | None = None
) -> tuple[Router, Holding, metering.Meter, asyncio.Task[CompletionResponse]]:
    """A call to a backend that holds it, once the backend has the request."""
    provider = Holding(sent=sent, tokenizer=tokenizer)
    router = router_of(provider, bills)
    meter = metering.Meter()
    metering.current_meter.set(meter)  # the task made below runs in a copy of this context: the same meter
    deadline = asyncio.get_running_loop().time() + deadline_s
    task = asyncio.create_task(router.complete(REQUEST, deadline=deadline, caller="someone"))
    await provider.asked.wait()
    return router, provider, meter, task


async def test_the_attempt_a_caller_leaves_is_recorded_as_cancelled_and_billed_its_prompt() -> None:
    bills = Bills()
    router, _, meter, task = await called(deadline_s=10, bills=bills)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert [a.outcome for a in meter.attempts] == [AttemptOutcome.CANCELLED]
    assert router.backends[0].circuit.state is CircuitState.CLOSED and router.backends[0].circuit.failures == 0
    prompt = TokenCounter().count_chat("m", REQUEST.messages).tokens
    [(backend, model, caller, usage, interrupted)] = bills.records
    assert (backend, model, caller, interrupted) == ("slow", "m", "someone", True)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (prompt, 0, True)
    assert meter.tokens == prompt, "the call's limits settle at what it was billed"


async def test_the_attempt_a_caller_leaves_before_its_request_is_written_is_billed_nothing() -> None:
    bills = Bills()
    _, _, meter, task = await called(deadline_s=10, bills=bills, sent=False)
    task.cancel()
    await asyncio.wait([task])
    assert [a.outcome for a in meter.attempts] == [AttemptOutcome.CANCELLED]
    assert (bills.records, meter.tokens) == ([], 0)


async def test_a_left_calls_prompt_is_billed_as_its_backends_tokenizer_counts_it() -> None:
    """A model server's count (its chat template's tokens too) where it has one: the offline count is OpenAI's."""
    bills = Bills()
    _, _, meter, task = await called(deadline_s=10, bills=bills, tokenizer=57)
    task.cancel()
    await asyncio.wait([task])
    [(_, _, _, usage, interrupted)] = bills.records
    assert (usage.prompt_tokens, usage.estimated, interrupted, meter.tokens) == (57, True, True, 57)


async def test_a_prompt_cut_by_its_deadline_is_counted_offline_not_waited_for() -> None:
    """Its caller waits for the status: no request to the backend first."""
    bills = Bills()
    *_, task = await called(deadline_s=0.2, bills=bills, tokenizer=57)
    with pytest.raises(DeadlineExceededError):
        await task
    [(_, _, _, usage, _)] = bills.records
    assert usage.prompt_tokens == TokenCounter().count_chat("m", REQUEST.messages).tokens != 57


async def test_a_cancellation_after_the_deadline_is_the_deadlines_timeout() -> None:
    """A loop too busy to run the gateway's timer in time: gRPC's cancellation at the caller's deadline comes first."""
    _, _, meter, task = await called(deadline_s=0.05)
    time.sleep(0.1)  # noqa: ASYNC251 (the busy loop: nothing else may run until the deadline has passed)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert [(a.outcome, a.error) for a in meter.attempts] == [(AttemptOutcome.TIMEOUT, "the deadline ran out")]


@dataclass
class TimingOut:
    """A provider whose own read timer fires a few milliseconds before the timeout it is given, as uvloop's clock
    (in whole milliseconds) makes a timer fire: an UpstreamError(TIMEOUT) at the call's deadline."""

    spec: BackendSpec = SPEC

    async def complete(self, model: str, request: CompletionRequest, *, timeout_s: float) -> CompletionResponse:
        await asyncio.sleep(timeout_s - 0.004)
        raise UpstreamError(UpstreamErrorKind.TIMEOUT, SPEC.name, "the upstream did not answer in time")


async def test_an_upstream_timer_at_the_deadline_is_the_deadlines_not_the_backends_failure() -> None:
    """Given the time left as its read timeout, the HTTP client's timer sometimes fired first: the caller got
    UNAVAILABLE instead of DEADLINE_EXCEEDED, the backend a failure, and short deadlines on a slow backend opened its
    circuit for everyone."""
    router = router_of(TimingOut())
    for _ in range(router.backends[0].circuit.config.failure_threshold + 1):
        meter = metering.Meter()
        metering.current_meter.set(meter)
        deadline = asyncio.get_running_loop().time() + 0.2
        with pytest.raises(DeadlineExceededError):
            await router.complete(REQUEST, deadline=deadline, caller="someone")
        assert [a.outcome for a in meter.attempts] == [AttemptOutcome.TIMEOUT]
    circuit = router.backends[0].circuit
    assert circuit.state is CircuitState.CLOSED and circuit.failures == 0


@pytest.mark.parametrize(
    ("outcome", "circuit_open", "waits"),
    [
        (AttemptOutcome.CANCELLED, False, True),
        (AttemptOutcome.TIMEOUT, False, False),
        (AttemptOutcome.CANCELLED, True, False),
    ],
    ids=["caller-left", "deadline", "circuit-open"],
)
async def test_a_left_calls_bill_waits_for_the_backends_count_only_when_its_caller_left_a_working_backend(
    outcome: AttemptOutcome, circuit_open: bool, waits: bool
) -> None:
    """Told by the attempt's outcome, not the clock: uvloop may run the deadline's timer a little early, and a call its
    deadline ended, with time left by the clock, waited on its backend's count while its caller waited for its
    status. A failing backend is asked nothing more."""
    router = router_of(Holding())
    route = Route(router.backends[0], "m")
    if circuit_open:
        for _ in range(router.backends[0].circuit.config.failure_threshold):
            router.backends[0].circuit.record_failure()
    loop = asyncio.get_running_loop()
    chain = _Chain(deadline=loop.time() + 10, request=REQUEST)  # time left, whichever way the attempt ended
    chain.record(route, outcome, time.perf_counter(), None)
    by = Router._left_count_by(chain, route)
    assert (by > loop.time()) is waits
