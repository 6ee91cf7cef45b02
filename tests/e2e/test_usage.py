"""Usage on every answer, attributed to the backend that served, and kept in the ledger."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay_server import convert
from llmrelay_server.domain import TokenUsage
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.usage import MANY_ROWS, UsageLedger
from llmrelay_server.usage import ledger as ledger_module
from llmrelay_server.usage.sqlite import SQLiteStore
from support import GatewayFactory, chat, details, read_all, stream_chat, two_backends
from upstream import FakeUpstream


async def totals(stub: pb.LLMServiceAsyncStub, caller: str | None = None) -> dict[tuple[str, str, str], pb.UsageRecord]:
    records = (await stub.GetUsage(pb.GetUsageRequest(caller=caller), timeout=5)).records
    return {(r.backend, r.model, r.caller): r for r in records}


async def test_usage_after_fallback_is_attributed_to_the_backend_that_served(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"status": 503}, {"status": 503})
    answer = await stub.Complete(chat("who pays"), timeout=5, metadata=(("x-llmrelay-caller", "agent-7"),))
    assert answer.backend == "ollama"
    ledger = await totals(stub)
    assert list(ledger) == [("ollama", "tiny", "agent-7")]
    record = ledger["ollama", "tiny", "agent-7"]
    assert (record.requests, record.total_tokens) == (1, answer.usage.total_tokens)


async def test_concurrent_requests_add_up_exactly(stub: pb.LLMServiceAsyncStub) -> None:
    callers = [f"caller-{i % 3}" for i in range(60)]
    answers = await asyncio.gather(
        *(
            stub.Complete(chat(f"q {i} " * (i % 7 + 1)), timeout=10, metadata=(("x-llmrelay-caller", c),))
            for i, c in enumerate(callers)
        )
    )
    streamed = [
        c
        async for c in stub.StreamComplete(
            stream_chat("streamed too"), timeout=5, metadata=(("x-llmrelay-caller", "caller-0"),)
        )
    ]
    ledger = await totals(stub)
    for caller in ("caller-0", "caller-1", "caller-2"):
        expected = sum(a.usage.total_tokens for a, c in zip(answers, callers, strict=True) if c == caller)
        expected += streamed[-1].usage.total_tokens if caller == "caller-0" else 0
        record = ledger["openai", "gpt-test", caller]
        assert record.total_tokens == expected
        assert record.prompt_tokens + record.completion_tokens == record.total_tokens
    assert sum(r.requests for r in ledger.values()) == 61
    assert list((await totals(stub, caller="caller-1")).keys()) == [("openai", "gpt-test", "caller-1")]


async def test_caller_from_a_bearer_token_is_a_fingerprint_never_the_token(stub: pb.LLMServiceAsyncStub) -> None:
    """The token's fingerprint, as its key's `sha256:` starts, however the header writes it: it was the whole
    header's, three callers for one token written three ways, none found by the key's digest."""
    token = "sk-caller-secret-123456"
    for written in (f"Bearer {token}", f"bearer {token}", f"Bearer  {token} "):
        await stub.Complete(chat(), timeout=5, metadata=(("authorization", written),))
    (caller,) = {key[2] for key in await totals(stub)}
    assert caller == "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("metadata", "billed"),
    [
        ((("x-llmrelay-caller", "first"), ("x-llmrelay-caller", "second")), "first"),
        (
            (("authorization", "Bearer sk-first-123456"), ("authorization", "Bearer sk-second-123456")),
            "key-" + hashlib.sha256(b"sk-first-123456").hexdigest()[:12],
        ),
    ],
    ids=["caller", "bearer-token"],
)
async def test_a_key_sent_twice_bills_its_first_value(
    stub: pb.LLMServiceAsyncStub, metadata: tuple[tuple[str, str], ...], billed: str
) -> None:
    # The first, as the gateway reads a repeated `authorization` for its keys: one reading of the call's metadata.
    await stub.Complete(chat(), timeout=5, metadata=metadata)
    assert {key[2] for key in await totals(stub)} == {billed}


async def test_malformed_caller_metadata_is_invalid_argument(stub: pb.LLMServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5, metadata=(("x-llmrelay-caller", "no spaces allowed"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)["BadRequest"].field_violations[0].field == "metadata.x-llmrelay-caller"


async def test_malformed_caller_metadata_is_reported_with_the_requests_own_wrong_fields(
    stub: pb.LLMServiceAsyncStub,
) -> None:
    """Every wrong field in one answer, the metadata's too: the caller mends them in one round trip."""
    tagged = (("x-llmrelay-caller", "no spaces allowed"),)
    calls: list[Awaitable[Any]] = [
        stub.Complete(pb.CompleteRequest(), timeout=5, metadata=tagged),
        read_all(stub.StreamComplete(pb.StreamCompleteRequest(), timeout=5, metadata=tagged)),
        stub.Embed(pb.EmbedRequest(), timeout=5, metadata=tagged),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [v.field for v in details(caught.value)["BadRequest"].field_violations]
        assert fields[-1] == "metadata.x-llmrelay-caller" and len(fields) >= 2, fields


async def test_a_model_an_upstream_names_with_control_characters_is_kept_as_get_usage_can_ask_for_it(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """GetUsage refuses a filter with a control character: a record kept under the name as the upstream sent it could
    be listed but never asked for by its model (and `llmrelay usage` would print the upstream's escape sequence)."""
    primary.inject({"served_model": "gpt-test\x1b[2J\tx"})
    await stub.Complete(chat("named oddly"), timeout=5)

    (record,) = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert record.model == "gpt-test\ufffd[2J\ufffdx"
    assert list((await stub.GetUsage(pb.GetUsageRequest(model=record.model), timeout=5)).records) == [record]


async def test_usage_over_the_message_limit_is_answer_too_large_saying_how_to_narrow_it(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A record per caller: gRPC would refuse to send the whole ledger with a bare status and no word of the filters."""
    gateway = await gateway_factory(two_backends(primary, local), server="max_message_bytes: 8192")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        callers = [f"agent-session-{i:04d}" for i in range(200)]
        await asyncio.gather(
            *(stub.Complete(chat(), timeout=10, metadata=(("x-llmrelay-caller", c),)) for c in callers)
        )

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUsage(pb.GetUsageRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = details(caught.value)["ErrorInfo"]
        assert info.reason == "ANSWER_TOO_LARGE" and info.metadata["limit"] == "8192"
        assert "caller" in str(caught.value.details()) and "time window" in str(caught.value.details())
        (record,) = (await stub.GetUsage(pb.GetUsageRequest(caller=callers[7]), timeout=5)).records
        assert record.requests == 1


async def test_a_long_usage_answer_is_made_off_the_event_loop_and_whole(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some 15 us a row on the event loop every call runs on: a dashboard's GetUsage of 50,000 callers' rows held every
    other call up for half a second. Past MANY_ROWS the rows and the answer are made in a thread."""
    rows = MANY_ROWS + 1
    ledger = UsageLedger(tmp_path / "usage.db")
    for n in range(rows):
        ledger.record("openai", "gpt-test", f"caller-{n:05d}", TokenUsage(1 + n % 7, 1))
    await ledger.aclose()
    made_in: list[str] = []

    def spied(made: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def making(totals: Any) -> Any:
            made_in.append(threading.current_thread().name)
            return made(totals)

        return making

    monkeypatch.setattr(ledger_module, "_sorted_records", spied(ledger_module._sorted_records))
    monkeypatch.setattr(convert, "usage_answer", spied(convert.usage_answer))
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await pb.LLMServiceStub(channel).GetUsage(pb.GetUsageRequest(), timeout=30)
    assert len(made_in) == 2 and threading.main_thread().name not in made_in, made_in
    assert len(answer.records) == rows and sum(r.requests for r in answer.records) == rows
    tokens = [r.total_tokens for r in answer.records]
    assert tokens == sorted(tokens, reverse=True)


@pytest.mark.parametrize("grace_period_s", [5.0, 0.0], ids=["within the grace period", "interrupted"])
async def test_a_stream_its_caller_left_as_the_gateway_stops_is_billed_before_the_ledger_closes(
    gateway_factory: GatewayFactory,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    grace_period_s: float,
) -> None:
    """gRPC counts a call its caller left as over, while the gateway still counts what its stream consumed (in a
    thread: a prompt of megabytes takes a second). A gateway stopping then closed its ledger under the count: the bill
    was lost, and the log had a traceback (RuntimeError: the usage ledger is closed)."""
    estimate = TokenCounter.estimate_usage

    async def slow_estimate(self: TokenCounter, *args: Any) -> TokenUsage:
        await asyncio.sleep(0.3)  # a long prompt's count
        return await estimate(self, *args)

    monkeypatch.setattr(TokenCounter, "estimate_usage", slow_estimate)
    config = f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n'
    gateway = await gateway_factory(config)
    local.inject({"trickle_s": 0.2})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = pb.LLMServiceStub(channel).StreamComplete(stream_chat("one two three four five"), timeout=10)
        await call.read()
        call.cancel()
        await asyncio.sleep(0.1)  # the gateway has seen the caller leave, and counts
        await gateway.stop(grace_period_s=grace_period_s, drain_s=0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # What the stopped gateway billed, the next one on the same ledger reads.
    restarted = await gateway_factory(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
        records = (await pb.LLMServiceStub(channel).GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert [(r.requests, r.interrupted_requests, r.completion_tokens > 0) for r in records] == [(1, 1, True)]


async def test_a_gateway_starts_on_a_ledger_another_process_holds_locked(
    tmp_path: Path, gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A lock held past SQLite's busy timeout (a backup, an operator's transaction) stopped the start as a mistake of
    the configuration ("server.usage_db: ... database is locked"), and each restart of a worker: the gateway serves,
    its records wait in the journal, and the ledger has them once the lock is let go."""
    path = tmp_path / "usage.db"
    await SQLiteStore(path).aclose()  # the file made and migrated, as an earlier run left it
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        gateway = await gateway_factory(two_backends(primary, local))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb.LLMServiceStub(channel)
            answer = await stub.Complete(chat(), timeout=5, metadata=(("x-llmrelay-caller", "held"),))
            holder.rollback()
            async with asyncio.timeout(20):
                while True:
                    try:
                        billed = (await totals(stub)).get(("openai", "gpt-test", "held"))
                    except grpc.aio.AioRpcError as error:  # the ledger still unavailable: it tries again
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        billed = None
                    if billed is not None:
                        break
                    await asyncio.sleep(0.2)
    finally:
        holder.close()
    assert (billed.requests, billed.total_tokens) == (1, answer.usage.total_tokens)
