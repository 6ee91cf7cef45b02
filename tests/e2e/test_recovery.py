"""Mid-stream recovery: a stream that breaks after it started is run again on the next route when the caller asks
(on_interrupt RESTART), behind one restart marker; never two answers mixed, never past the deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from llmrelay import AbortedError, AsyncClient, StreamAssembler
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from llmrelay_server.router import KEPT_TEXT_CHARS
from llmrelay_server.tokens import TokenCounter
from support import DIALECTS, details, stream_chat
from upstream import FakeUpstream

Outcome = pb.AttemptOutcome
RESTART = pb.INTERRUPT_POLICY_RESTART
PROMPT = "one two three four five"
BREAKS = {
    "cut": {"stream_cut_after": 3},
    "stalled": {"trickle_s": 3},  # past the idle limit of 2 s
    "error event": {"error_event_after": 3},
}


async def read(stub: pb.LLMServiceAsyncStub, **fields: Any) -> list[pb.StreamCompleteResponse]:
    return [c async for c in stub.StreamComplete(stream_chat(PROMPT, **fields), timeout=10)]


@pytest.mark.parametrize("fault", BREAKS.values(), ids=BREAKS.keys())
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_broken_stream_restarts_on_the_fallback_behind_one_marker(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, fault: dict[str, Any]
) -> None:
    primary.inject(fault)
    chunks = await read(stub, on_interrupt=RESTART)
    markers = [i for i, c in enumerate(chunks) if c.HasField("restart")]
    assert len(markers) == 1
    before, marker, after = chunks[: markers[0]], chunks[markers[0]], chunks[markers[0] + 1 :]
    assert {c.backend for c in before} == {primary.dialect} and {c.backend for c in after} == {"ollama"}
    assert "".join(c.delta.content for c in before) != f"echo: {PROMPT}", "the broken attempt had only a part"
    assert "".join(c.delta.content for c in after) == f"echo: {PROMPT}", "the fallback's whole answer"
    assert marker.restart.backend == primary.dialect
    assert [a.outcome for a in marker.restart.attempts] == [Outcome.ATTEMPT_OUTCOME_INTERRUPTED]
    assert marker.restart.usage.estimated and marker.restart.usage.completion_tokens > 0
    final = chunks[-1]
    assert [a.outcome for a in final.attempts] == [
        Outcome.ATTEMPT_OUTCOME_INTERRUPTED,
        Outcome.ATTEMPT_OUTCOME_SUCCEEDED,
    ]
    # The final usage covers both attempts (exact sums: the ledger test below), estimated as the broken part is.
    assert final.usage.prompt_tokens > marker.restart.usage.prompt_tokens
    assert final.usage.completion_tokens > marker.restart.usage.completion_tokens
    assert final.usage.estimated


async def test_without_restart_a_broken_stream_ends_aborted_as_before(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"stream_cut_after": 3})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(stub, on_interrupt=pb.INTERRUPT_POLICY_ABORT)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert details(caught.value)["ErrorInfo"].reason == "STREAM_INTERRUPTED"
    assert local.chat_requests == []


@pytest.mark.parametrize(
    ("local_faults", "attempts"),
    [
        ([{"stream_cut_after": 2}], "openai:interrupted,ollama:interrupted"),
        ([{"status": 503}] * 2, "openai:interrupted,ollama:server_error,ollama:server_error"),
        # A refusal of a request another backend took is the fallback's own: not the caller's INVALID_ARGUMENT.
        ([{"status": 400}], "openai:interrupted,ollama:rejected"),
    ],
    ids=["the restart breaks too", "the fallback is down", "the fallback refuses the request"],
)
async def test_a_restart_that_fails_too_ends_aborted_with_every_attempt(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, local_faults: list[Any], attempts: str
) -> None:
    primary.inject({"stream_cut_after": 3})
    local.inject(*local_faults)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(stub, on_interrupt=RESTART)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "STREAM_INTERRUPTED"
    assert info.metadata["attempts"] == attempts


async def test_no_restart_starts_that_cannot_finish_before_the_deadline(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Chunks every 0.5 s, cut after about 1.5 s; 1 s is left then, less than the broken attempt took.
    primary.inject({"trickle_s": 0.5, "stream_cut_after": 5})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamComplete(stream_chat(PROMPT, on_interrupt=RESTART), timeout=2.5):
            pass
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert local.chat_requests == [], "the fallback was not asked"
    assert time.monotonic() - started < 2.5


async def test_an_exact_model_has_no_route_to_restart_on(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"stream_cut_after": 3})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(stub, on_interrupt=RESTART, model="gpt-test", exact_model=True)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert details(caught.value)["ErrorInfo"].metadata["attempts"] == "openai:interrupted"


async def test_an_unknown_policy_is_an_invalid_request(stub: pb.LLMServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(stub, on_interrupt=7)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(caught.value)["BadRequest"].field_violations] == ["on_interrupt"]


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_the_broken_attempt_is_billed_and_flagged_in_the_ledger(
    gateway: Gateway, stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"stream_cut_after": 3})
    chunks = await read(stub, on_interrupt=RESTART)
    marker = next(c.restart for c in chunks if c.HasField("restart"))
    records = {r.backend: r for r in (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records}
    broken = records[primary.dialect]
    assert (broken.requests, broken.interrupted_requests, broken.estimated_requests) == (1, 1, 1)
    assert broken.prompt_tokens == marker.usage.prompt_tokens
    assert broken.completion_tokens == marker.usage.completion_tokens
    assert (records["ollama"].requests, records["ollama"].interrupted_requests) == (1, 0)
    assert sum(r.total_tokens for r in records.values()) == chunks[-1].usage.total_tokens


# --- the Python SDK's collector ---------------------------------------------------------------------------------


async def test_the_collector_returns_only_the_final_attempts_answer(
    gateway: Gateway, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"stream_cut_after": 3})
    seen: list[pb.StreamCompleteResponse] = []
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        answer = await client.collect([{"role": "user", "content": PROMPT}], on_delta=seen.append)
    assert answer.message.content == f"echo: {PROMPT}"
    assert answer.backend == "ollama" and answer.finish_reason == pb.FINISH_REASON_STOP
    assert [a.outcome for a in answer.attempts] == [
        Outcome.ATTEMPT_OUTCOME_INTERRUPTED,
        Outcome.ATTEMPT_OUTCOME_SUCCEEDED,
    ]
    assert sum(c.HasField("restart") for c in seen) == 1, "print-as-it-comes sees the marker"


async def test_the_collector_equals_complete(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"tool_call": {"name": "lookup", "arguments": '{"city": "Paris"}'}, "reasoning": "think hard"})
    primary.inject({"tool_call": {"name": "lookup", "arguments": '{"city": "Paris"}'}, "reasoning": "think hard"})
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        collected = await client.collect([{"role": "user", "content": "weather"}])
        completed = await client.complete([{"role": "user", "content": "weather"}])
    for answer in (collected, completed):
        del answer.attempts[:]
        answer.ClearField("id")
    assert collected == completed


async def test_the_collector_raises_when_no_restart_can_finish(
    gateway: Gateway, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"stream_cut_after": 3})
    local.inject({"stream_cut_after": 3})
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        with pytest.raises(AbortedError) as caught:
            await client.collect([{"role": "user", "content": PROMPT}])
    assert caught.value.reason == "STREAM_INTERRUPTED"


def test_the_assembler_puts_tool_calls_together_and_starts_over_at_a_marker() -> None:
    def delta(**fields: Any) -> pb.StreamCompleteResponse:
        return pb.StreamCompleteResponse(backend="b", delta=pb.MessageDelta(**fields))

    def call(index: int, **fields: Any) -> pb.StreamCompleteResponse:
        return delta(tool_calls=[pb.ToolCallDelta(index=index, **fields)])

    assembler = StreamAssembler()
    assembler.add(delta(content="lost "))
    assembler.add(pb.StreamCompleteResponse(restart=pb.StreamRestart(reason="cut", backend="a")))
    for chunk in (
        delta(reasoning="hm"),
        call(1, id="c2", name="g", arguments='{"y":'),
        call(0, id="c1", name="f", arguments="{"),
        call(1, arguments=" 2}"),
        call(0, arguments="}"),
        delta(content="done"),
        pb.StreamCompleteResponse(
            backend="b", finish_reason=pb.FINISH_REASON_TOOL_CALLS, usage=pb.Usage(total_tokens=9)
        ),
    ):
        assembler.add(chunk)
    answer = assembler.result()
    assert [r.reason for r in assembler.restarts] == ["cut"]
    assert (answer.message.content, answer.message.reasoning) == ("done", "hm")
    assert [(c.id, c.function.name, c.function.arguments) for c in answer.message.tool_calls] == [
        ("c1", "f", "{}"),
        ("c2", "g", '{"y": 2}'),
    ]
    assert (answer.backend, answer.finish_reason, answer.usage.total_tokens) == ("b", pb.FINISH_REASON_TOOL_CALLS, 9)


async def test_a_stream_the_caller_leaves_is_billed_for_what_it_consumed(
    gateway: Gateway, stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"trickle_s": 0.5})
    call = stub.StreamComplete(stream_chat(PROMPT), timeout=10)
    await call.read()
    await call.read()
    call.cancel()
    for _ in range(100):  # the gateway sees the cancellation a moment later
        records = (await stub.GetUsage(pb.GetUsageRequest(backend="openai"), timeout=5)).records
        if records:
            break
        await asyncio.sleep(0.02)
    assert [(r.requests, r.interrupted_requests, r.estimated_requests) for r in records] == [(1, 1, 1)]
    assert records[0].completion_tokens > 0 and records[0].prompt_tokens > 0


async def test_a_long_stream_without_usage_keeps_a_bounded_part_of_its_text_to_count(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Its whole text kept, a long answer held all of it in memory for a count most upstreams make unneeded: past
    router.KEPT_TEXT_CHARS only its length is, counted at the kept part's rate."""
    primary.inject({"huge_content": 200_000, "no_usage": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat(PROMPT), timeout=30)]
    text = "".join(c.delta.content for c in chunks)
    assert len(text) == 200_000 > 10 * KEPT_TEXT_CHARS
    exact = TokenCounter().count_text(primary.models[0], text).tokens
    usage = chunks[-1].usage
    assert usage.estimated and abs(usage.completion_tokens - exact) <= exact * 0.05
