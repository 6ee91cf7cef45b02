"""The fault matrix: every fault we can inject on loopback, end to end, unary and streaming.

Each row: the faults queued on the primary (openai) and the fallback (ollama) upstream, the expected gRPC status
(OK or a code with its ErrorInfo reason), the expected attempt outcomes, and the calls each upstream received. The
router here retries once per backend (two attempts each).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from llmrelay_server.backends import upstream_http
from llmrelay_server.router import MIN_ATTEMPT_S
from raw_server import RawServer, silent
from support import (
    DIALECTS,
    FAST_ROUTER,
    OPENAI_TEST_KEY,
    GatewayFactory,
    StubFactory,
    chat,
    details,
    kept_by_the_gateway,
    read_all,
    stream_chat,
    two_backends,
    user,
)
from upstream import FakeUpstream

Outcome = pb.AttemptOutcome
HTML = {"body": "<html><body>502 Bad Gateway</body></html>", "content_type": "text/html"}
NOT_JSON = {"body": '{"id": "x", "choices": [', "content_type": "application/json"}
NO_CHOICES = {"body": '{"id": "x", "object": "chat.completion"}'}
TOO_LONG = {"status": 400, "body": '{"error": {"message": "This model\'s maximum context length is 8192 tokens"}}'}
LLAMACPP_TOO_LONG = {
    "code": 400,
    "message": "the request exceeds the available context size, try increasing it",
    "type": "exceed_context_size_error",
}
VLLM_TOO_LONG = (
    "The decoder prompt (length 9000) is longer than the maximum model length of 8192. Make sure that `max_model_len`"
    " is no smaller than the number of text tokens plus multimodal tokens."
)
GEMINI_TOO_LONG = {
    "code": 400,
    "message": "The input token count (134123) exceeds the maximum number of tokens allowed (131072).",
    "status": "INVALID_ARGUMENT",
}
BAD_HEADER = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nBad Header\x01: x\r\nContent-Length: 2\r\n\r\n{}"
BAD_CHUNK = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
CUT_BODY = 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"id": "x", "choices": ['
# OpenAI's answer when the account is out of credit: a 429, though no wait cures it.
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
OUT_OF_QUOTA = {
    "status": 429,
    "body": json.dumps(
        {"error": {"message": QUOTA_MESSAGE, "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    ),
}
PRIMARY = "primary"
"""A row's served_by for the primary backend, whichever dialect it speaks (named after it: openai, anthropic)."""


@dataclass(frozen=True)
class Row:
    name: str
    primary: list[dict[str, Any]]
    local: list[dict[str, Any]] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    outcomes: tuple[int, ...] = ()
    calls: tuple[int, int] = (1, 0)
    served_by: str = PRIMARY
    exact_model: bool = False
    only: str | None = None
    """The one dialect of the primary the row is about (its faults are that API's), if it is about one."""
    wait_s: float = 0.0
    """The longest the gateway should leave the upstreams without a request between two attempts: the policy's
    backoff (0.02 s here) unless an attempt waits out a limit."""

    def with_wait(self, wait_s: float) -> Row:
        return replace(self, wait_s=wait_s)

    def of(self, dialect: str) -> Row:
        return replace(self, only=dialect)


def retried(name: str, fault: dict[str, Any], outcome: int) -> Row:
    """The first attempt fails, the retry on the same backend succeeds."""
    return Row(name, [fault], calls=(2, 0), outcomes=(outcome, Outcome.ATTEMPT_OUTCOME_SUCCEEDED))


def moves_on(name: str, fault: dict[str, Any], outcome: int) -> Row:
    """The primary's one attempt fails without a retry; the fallback serves."""
    return Row(name, [fault], served_by="ollama", calls=(1, 1), outcomes=(outcome, Outcome.ATTEMPT_OUTCOME_SUCCEEDED))


def falls_back(name: str, faults: list[dict[str, Any]], outcome: int) -> Row:
    """Both attempts at the primary fail alike; the fallback serves."""
    outcomes = (outcome, outcome, Outcome.ATTEMPT_OUTCOME_SUCCEEDED)
    return Row(name, faults, served_by="ollama", calls=(2, 1), outcomes=outcomes)


ROWS = [
    Row("ok", [], outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,)),
    retried("503 retried then ok", {"status": 503}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    falls_back("503 twice falls back", [{"status": 503}] * 2, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    falls_back("500/502/504 fall back", [{"status": 500}, {"status": 504}], Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    falls_back(
        "an error page in a charset that cannot read it falls back",  # httpx's `text` raised: INTERNAL, no fallback
        [{"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html; charset=utf-16"}] * 2,
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
    ),
    retried("408 is a timeout, retried", {"status": 408}, Outcome.ATTEMPT_OUTCOME_TIMEOUT),
    retried(
        "429 with a short Retry-After is retried",
        {"status": 429, "retry_after": 0},
        Outcome.ATTEMPT_OUTCOME_RATE_LIMITED,
    ),
    retried(
        "Retry-After that is no number nor date is ignored",
        {"status": 503, "retry_after": "soon"},
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
    ),
    retried("likewise on 429", {"status": 429, "retry_after": "soon"}, Outcome.ATTEMPT_OUTCOME_RATE_LIMITED),
    moves_on(
        "silent past the first-chunk limit: next backend, no retry", {"stall_s": 3}, Outcome.ATTEMPT_OUTCOME_TIMEOUT
    ).with_wait(1.0),
    Row(
        "two choices: only index 0 is read",
        [{"two_choices": True}],
        outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,),
        only="openai",
    ),
    moves_on(
        "429 with a long Retry-After moves on at once",
        {"status": 429, "retry_after": 3600},
        Outcome.ATTEMPT_OUTCOME_RATE_LIMITED,
    ),
    falls_back("connection dropped twice falls back", [{"drop": True}] * 2, Outcome.ATTEMPT_OUTCOME_UNREACHABLE),
    moves_on("401 of our key: next backend, no retry", {"status": 401}, Outcome.ATTEMPT_OUTCOME_AUTH_FAILED),
    moves_on("403 likewise", {"status": 403}, Outcome.ATTEMPT_OUTCOME_AUTH_FAILED),
    moves_on("404 model missing: next backend", {"status": 404}, Outcome.ATTEMPT_OUTCOME_MODEL_NOT_FOUND),
    moves_on("context length: next backend", TOO_LONG, Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED).of("openai"),
    moves_on(
        "llama.cpp's context error with a 500: next backend, no retry",
        {"status": 500, "body": json.dumps({"error": {**LLAMACPP_TOO_LONG, "code": 500}})},
        Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
    ).of("openai"),
    moves_on(
        "Gemini's error as a list: its context error read, next backend",
        {"status": 400, "body": json.dumps([{"error": GEMINI_TOO_LONG}])},
        Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
    ).of("openai"),
    moves_on(
        "vLLM's context error: next backend",
        {"status": 400, "body": json.dumps({"error": {"message": VLLM_TOO_LONG, "type": "BadRequestError"}})},
        Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
    ).of("openai"),
    moves_on(
        "llama.cpp's input over its batch with a 500: next backend, no retry",
        {
            "status": 500,
            "body": json.dumps(
                {
                    "error": {
                        "code": 500,
                        "message": "input (801 tokens) is too large to process. increase the physical batch size"
                        " (current batch size: 512)",
                        "type": "server_error",
                    }
                }
            ),
        },
        Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
    ).of("openai"),
    moves_on(
        "prompt is too long: next backend",
        {"status": 400, "message": "prompt is too long: 208656 tokens > 200000 maximum"},
        Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
    ).of("anthropic"),
    retried("529 overloaded retried then ok", {"status": 529}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR).of("anthropic"),
    falls_back("529 twice falls back", [{"status": 529}] * 2, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR).of("anthropic"),
    retried(
        "529 with a short retry-after is retried",
        {"status": 529, "retry_after": 0},
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
    ).of("anthropic"),
    moves_on(
        "529 with a long retry-after moves on at once",
        {"status": 529, "retry_after": 3600},
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
    ).of("anthropic"),
    moves_on(
        "a spend limit reached: next backend, no retry",
        {"status": 429, "error_code": "enforced_spend_limit_reached"},
        Outcome.ATTEMPT_OUTCOME_AUTH_FAILED,
    ).of("anthropic"),
    moves_on("402 billing: next backend, no retry", {"status": 402}, Outcome.ATTEMPT_OUTCOME_AUTH_FAILED),
    moves_on(
        "429 insufficient_quota, our account out of credit: next backend, no retry",
        OUT_OF_QUOTA,
        Outcome.ATTEMPT_OUTCOME_AUTH_FAILED,
    ).of("openai"),
    Row(
        "400 is the caller's fault: no retry, no fallback",
        [{"status": 400}],
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="UPSTREAM_REJECTED",
        calls=(1, 0),
    ),
    Row("422 likewise", [{"status": 422}], code=grpc.StatusCode.INVALID_ARGUMENT, reason="UPSTREAM_REJECTED"),
    Row("413 likewise", [{"status": 413}], code=grpc.StatusCode.INVALID_ARGUMENT, reason="UPSTREAM_REJECTED"),
    Row(
        "400 after a 503 of the same backend: its verdict",
        [{"status": 503}, {"status": 400}],
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="UPSTREAM_REJECTED",
        calls=(2, 0),
    ),
    Row(
        "a fallback's 400 while the backend asked for is down: the fallback's limits, not the caller's mistake",
        [{"status": 503}] * 2,
        [{"status": 400}],
        code=grpc.StatusCode.UNAVAILABLE,
        reason="BACKENDS_UNAVAILABLE",
        calls=(2, 1),
    ),
    Row(
        "a fallback's 400 after the model was found too long for the first: the request's",
        [TOO_LONG],
        [{"status": 400}],
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="UPSTREAM_REJECTED",
        calls=(1, 1),
        only="openai",
    ),
    moves_on("200 with HTML", HTML, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    moves_on("not HTTP: a bad status line", {"raw": "HTTP/1.1 abc OK\r\n\r\n"}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    moves_on("not HTTP: a bad header", {"raw": BAD_HEADER}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    moves_on("not HTTP: a bad chunk size", {"raw": BAD_CHUNK}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    moves_on("malformed JSON", NOT_JSON, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
    moves_on("missing choices", NO_CHOICES, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR).of("openai"),
    moves_on(
        "only another choice",
        {"body": '{"choices": [{"index": 1, "message": {"content": "x"}}]}'},
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
    ).of("openai"),
    moves_on(
        "content that is no list", {"body": '{"id": "x", "content": "x"}'}, Outcome.ATTEMPT_OUTCOME_SERVER_ERROR
    ).of("anthropic"),
    Row(
        "rate limited everywhere",
        [{"status": 429, "retry_after": 0}] * 2,
        [{"status": 429, "retry_after": 0}] * 2,
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason="UPSTREAM_RATE_LIMITED",
        calls=(2, 2),
    ),
    Row(
        "our keys refused everywhere",
        [{"status": 401}],
        [{"status": 403}],
        code=grpc.StatusCode.FAILED_PRECONDITION,
        reason="UPSTREAM_AUTH_FAILED",
        calls=(1, 1),
    ),
    Row(
        "garbage everywhere",
        [HTML],
        [NOT_JSON],
        code=grpc.StatusCode.UNAVAILABLE,
        reason="UPSTREAM_BAD_RESPONSE",
        calls=(1, 1),
    ),
    Row(
        "down everywhere",
        [{"drop": True}] * 2,
        [{"status": 503}] * 2,
        code=grpc.StatusCode.UNAVAILABLE,
        reason="BACKENDS_UNAVAILABLE",
        calls=(2, 2),
    ),
    Row(
        "exact model: no fallback",
        [{"status": 503}] * 2,
        code=grpc.StatusCode.UNAVAILABLE,
        reason="BACKENDS_UNAVAILABLE",
        calls=(2, 0),
        exact_model=True,
    ),
]


def local_alone(local: FakeUpstream, circuit: str = "{}") -> str:
    """The local upstream as the one backend, tried once a call, with this circuit."""
    return f"""
llm:
  ollama: {{base_url: "{local.base_url}", model: tiny}}
router:
  retry: {{max_retries: 0}}
  circuit: {circuit}
"""


def cases(rows: list[Row]) -> list[Any]:
    """Each row with each dialect of the primary that it applies to, as (primary, row) parameters."""
    return [pytest.param(d, r, id=f"{d}-{r.name}") for r in rows for d in DIALECTS if r.only in (None, d)]


async def call_unary(stub: pb.LLMServiceAsyncStub, row: Row) -> tuple[grpc.StatusCode, Any]:
    # No model named: the primary's default, whichever it is.
    try:
        answer = await stub.Complete(chat("x y", exact_model=row.exact_model), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error
    return grpc.StatusCode.OK, answer


async def call_stream(stub: pb.LLMServiceAsyncStub, row: Row) -> tuple[grpc.StatusCode, Any]:
    chunks: list[pb.StreamCompleteResponse] = []
    try:
        async for chunk in stub.StreamComplete(stream_chat("x y", exact_model=row.exact_model), timeout=10):
            chunks.append(chunk)
    except grpc.aio.AioRpcError as error:
        return error.code(), error
    last = chunks[-1]
    merged = pb.CompleteResponse(backend=last.backend, attempts=last.attempts)
    merged.message.content = "".join(c.delta.content for c in chunks)
    return grpc.StatusCode.OK, merged


@pytest.mark.parametrize("call", [call_unary, call_stream], ids=["unary", "stream"])
@pytest.mark.parametrize(("primary", "row"), cases(ROWS), indirect=["primary"])
async def test_fault_matrix(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, row: Row, call: Any
) -> None:
    primary.inject(*row.primary)
    local.inject(*row.local)
    code, result = await call(stub, row)
    assert code == row.code, getattr(result, "details", lambda: result)()
    if code == grpc.StatusCode.OK:
        assert result.backend == (primary.dialect if row.served_by == PRIMARY else row.served_by)
        assert result.message.content == "echo: x y", "a complete answer from one backend"
        assert tuple(a.outcome for a in result.attempts) == row.outcomes
    else:
        info = details(result)["ErrorInfo"]
        assert info.reason == row.reason
        if (
            code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            and row.reason != "UPSTREAM_BAD_RESPONSE"
        ):
            assert "RetryInfo" in details(result)
    assert (len(primary.chat_requests), len(local.chat_requests)) == row.calls
    # What the upstreams saw between attempts: the backoff, or the limit an attempt waited out, and nothing more.
    arrivals = sorted(primary.chat_times + local.chat_times)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps, default=0.0) < row.wait_s + 0.3, f"the upstreams waited {max(gaps):.2f} s between attempts"
    if row.wait_s:
        assert max(gaps) >= row.wait_s - 0.05, "an attempt was cut short of its limit"


STREAM_ROWS = [
    Row("events without choices are no answer", [{"no_choices": True}], served_by="ollama", calls=(1, 1),
        outcomes=(Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, Outcome.ATTEMPT_OUTCOME_SUCCEEDED), only="openai"),
    Row("no finish reason is a cut stream", [{"no_finish": True}], code=grpc.StatusCode.ABORTED,
        reason="STREAM_INTERRUPTED"),
    Row("an error event before the first chunk is retried", [{"error_event_after": 0}], calls=(2, 0),
        outcomes=(Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, Outcome.ATTEMPT_OUTCOME_SUCCEEDED)),
    Row("llama.cpp's error field (before September 2025) is its error", [{
            "body": f"error: {json.dumps(LLAMACPP_TOO_LONG)}\n\ndata: [DONE]\n\n", "content_type": "text/event-stream"
        }], served_by="ollama", calls=(1, 1),
        outcomes=(Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED, Outcome.ATTEMPT_OUTCOME_SUCCEEDED), only="openai"),
    Row("finish reason and usage without [DONE] is whole", [{"no_done": True}],
        outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,), only="openai"),
    Row("likewise when the connection breaks before [DONE]", [{"cut_before_done": True}],
        outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,), only="openai"),
    Row("a finish reason without usage nor [DONE] is whole at the body's end", [{"no_usage": True, "no_done": True}],
        outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,), only="openai"),
    Row("a stop reason without message_stop is whole at the body's end", [{"no_stop": True}],
        outcomes=(Outcome.ATTEMPT_OUTCOME_SUCCEEDED,), only="anthropic"),
    Row("a rate_limit_error event before the first chunk is retried",
        [{"error_event_after": 0, "error_type": "rate_limit_error"}], calls=(2, 0),
        outcomes=(Outcome.ATTEMPT_OUTCOME_RATE_LIMITED, Outcome.ATTEMPT_OUTCOME_SUCCEEDED), only="anthropic"),
    Row("error events everywhere", [{"error_event_after": 0}] * 2, [{"error_event_after": 0}] * 2,
        code=grpc.StatusCode.UNAVAILABLE, reason="BACKENDS_UNAVAILABLE", calls=(2, 2)),
    Row("an insufficient_quota event is the account's: next backend, no retry",
        [{"error_event_after": 0, "error_code": "insufficient_quota"}], served_by="ollama", calls=(1, 1),
        outcomes=(Outcome.ATTEMPT_OUTCOME_AUTH_FAILED, Outcome.ATTEMPT_OUTCOME_SUCCEEDED), only="openai"),
]  # fmt: skip


@pytest.mark.parametrize(("primary", "row"), cases(STREAM_ROWS), indirect=["primary"])
async def test_stream_fault_matrix(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, row: Row
) -> None:
    """Faults only a stream can have: never an empty answer that ends OK."""
    await test_fault_matrix(stub, primary, local, row, call_stream)


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ({"stream_cut_after": 3}, "stopped answering: the connection closed before the answer ended"),
        # The limit named, for an operator whose upstream thinks long mid-answer (keep-alive comments do not count).
        ({"trickle_s": 3}, "nothing to relay for 2 s (router.stream_idle_timeout_s)"),
        ({"error_event_after": 3}, "error event"),
    ],
    ids=["cut", "stalled", "error event"],
)
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_streams_fail_definitely_after_the_first_chunk(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, fault: dict[str, Any], why: str
) -> None:
    primary.inject(fault)
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.StreamComplete(stream_chat("one two three four"), timeout=10):
            received.append(chunk.delta.content)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = details(caught.value)["ErrorInfo"]
    assert (info.reason, info.metadata["backend"]) == ("STREAM_INTERRUPTED", primary.dialect)
    assert info.metadata["attempts"] == f"{primary.dialect}:interrupted"
    [attempt] = details(caught.value)["AttemptHistory"].attempts
    assert why in attempt.error
    assert received and "".join(received) != "echo: one two three four", "never a silent truncation"
    assert local.chat_requests == [], "never text of two backends mixed"


def _events(*events: dict[str, Any]) -> dict[str, Any]:
    """A fault that streams these chat.completion.chunk events, then [DONE]."""
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    return {"body": body, "content_type": "text/event-stream"}


def _event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "model": "gpt-test", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize(
    ("error", "said"),
    [("the GPU fell over", "the GPU fell over"), ("[" * 1000 + "]" * 1000, "an error event that is not an object")],
    ids=["text", "nested-past-the-stack"],
)
async def test_an_error_event_whose_error_is_no_object_is_said_in_words(
    stub_for: StubFactory, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, error: str, said: str
) -> None:
    """Its Python repr was the message; a list nested past Python's stack raised a RecursionError instead."""
    backend = f"{{name: gpu, kind: vllm, base_url: '{primary.base_url}', model: gpt-test}}"
    stub = await stub_for(f"llm:\n  backends: [{backend}]\n  order: [gpu]\nrouter: {{retry: {{max_retries: 0}}}}\n")
    event = json.dumps(error) if error[0] != "[" else error
    primary.inject({"body": f'data: {{"error": {event}}}\n\n', "content_type": "text/event-stream"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.StreamComplete(stream_chat(), timeout=5))
    assert said in (caught.value.details() or ""), caught.value.details()
    assert "Traceback" not in caplog.text


async def test_an_answer_whose_id_is_no_text_is_served_without_one(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Its repr was the answer's id; a list nested past Python's stack failed the call INTERNAL (RecursionError)."""
    nested = "[" * 1000 + "]" * 1000
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    body = '{"id": ' + nested + ', "model": "gpt-test", "choices": [' + json.dumps(choice) + "]}"
    primary.inject({"body": body, "content_type": "application/json"})
    answer = await stub.Complete(chat("x y"), timeout=5)
    assert (answer.id, answer.message.content) == ("", "hi")
    events = "".join(f'data: {{"id": {nested}, "choices": [{json.dumps(c)}]}}\n\n' for c in _STREAMED_CHOICES)
    primary.inject({"body": events + "data: [DONE]\n\n", "content_type": "text/event-stream"})
    chunks = await read_all(stub.StreamComplete(stream_chat("x y"), timeout=5))
    assert [c.id for c in chunks] == [""] * len(chunks) and chunks[0].delta.content == "hi"
    assert "Traceback" not in caplog.text


_STREAMED_CHOICES = ({"index": 0, "delta": {"content": "hi"}}, {"index": 0, "delta": {}, "finish_reason": "stop"})


_CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}


async def test_an_answer_with_tool_calls_whose_server_says_stop_ends_with_tool_calls(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """OpenAI's gpt-4o, Gemini and Ollama's /v1 have ended streamed calls with "stop": an agent's loop that runs its
    tools on TOOL_CALLS stopped there, where the same answer from an Anthropic backend said TOOL_CALLS."""
    message = {"role": "assistant", "content": None, "tool_calls": [_CALL]}
    answer = {"id": "x", "model": "gpt-test", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    primary.inject(
        {"body": json.dumps(answer), "content_type": "application/json"},
        _events(_event({"role": "assistant", "tool_calls": [{"index": 0, **_CALL}]}), _event({}, "stop")),
        _events(_event({"content": "plain"}), _event({}, "stop")),
    )
    whole = await stub.Complete(chat("weather?"), timeout=5)
    assert (whole.finish_reason, whole.message.tool_calls[0].id) == (pb.FINISH_REASON_TOOL_CALLS, "call_1")
    streamed = await read_all(stub.StreamComplete(stream_chat("weather?"), timeout=5))
    assert streamed[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    plain = await read_all(stub.StreamComplete(stream_chat("hi"), timeout=5))
    assert plain[-1].finish_reason == pb.FINISH_REASON_STOP, "an answer without calls stops as it said"


async def test_a_finish_reason_that_is_no_text_is_an_unknown_one_not_a_fault_of_the_gateway(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    choice = {"index": 0, "message": {"content": "hi"}, "finish_reason": [1]}
    odd = {"id": "x", "model": "gpt-test", "choices": [choice]}
    primary.inject({"body": json.dumps(odd), "content_type": "application/json"})
    answer = await stub.Complete(chat("x y"), timeout=5)
    assert (answer.message.content, answer.finish_reason) == ("hi", pb.FINISH_REASON_UNSPECIFIED)
    primary.inject(_events(_event({"content": "hi"}), _event({}, {"odd": 1})))  # type: ignore[arg-type]
    chunks = await read_all(stub.StreamComplete(stream_chat("x y"), timeout=5))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert "Traceback" not in caplog.text


async def test_a_stream_whose_content_comes_as_parts_is_relayed_with_its_thinking_as_reasoning(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Mistral's reasoning models stream `content` as a list of parts, thinking first: each event failed the stream."""
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Two and two."}]}
    primary.inject(
        _events(
            _event({"role": "assistant", "content": [thinking]}),
            _event({"content": [{"type": "text", "text": "It is "}]}),
            _event({"content": "4."}),
            _event({}, "stop"),
        )
    )
    chunks = await read_all(stub.StreamComplete(stream_chat("2+2?"), timeout=5))
    assert "".join(c.delta.reasoning for c in chunks) == "Two and two."
    assert "".join(c.delta.content for c in chunks) == "It is 4."
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("reason", ["abort", "error"])
async def test_an_answer_its_server_ended_unfinished_is_a_failed_attempt(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, reason: str
) -> None:
    """vLLM ends a request its engine drops (shutting down, scaled down, put to sleep) with finish_reason "abort",
    after a 200: the text so far went to the caller as a whole answer that ended OK."""
    cut = {
        "id": "x",
        "model": "gpt-test",
        "choices": [{"index": 0, "message": {"content": "par"}, "finish_reason": reason}],
    }
    primary.inject({"body": json.dumps(cut), "content_type": "application/json"})
    answer = await stub.Complete(chat("x y"), timeout=5)
    assert answer.message.content == "echo: x y"
    assert [a.outcome for a in answer.attempts] == [
        Outcome.ATTEMPT_OUTCOME_SERVER_ERROR,
        Outcome.ATTEMPT_OUTCOME_SUCCEEDED,
    ]
    assert "finish_reason" in answer.attempts[0].error
    primary.inject(_events(_event({"content": "par"}), _event({}, reason)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.StreamComplete(stream_chat("x y"), timeout=5))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert details(caught.value)["ErrorInfo"].reason == "STREAM_INTERRUPTED"
    assert local.chat_requests == [], "never text of two backends mixed"


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_garbage_before_the_first_chunk_still_falls_back(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"stream_garbage": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat("a b"), timeout=10)]
    assert {c.backend for c in chunks} == {"ollama"}
    assert chunks[-1].attempts[0].outcome == Outcome.ATTEMPT_OUTCOME_SERVER_ERROR


async def test_stream_without_upstream_usage_is_counted_and_flagged(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"no_usage": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat("count me please"), timeout=10)]
    usage = chunks[-1].usage
    assert usage.estimated
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_usage_no_answer_reaches_is_counted_by_the_gateway(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streaming: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Counts that each fit the contract's int32 but whose total does not (2**30 prompt tokens and as many completion
    tokens; for Anthropic, 2**30 written to the cache and as many read from it, which add to the prompt): no answer is
    that long, and total_tokens could not carry it. Not a usage to believe: the gateway counts the answer itself, as
    when none is reported, and bills that, flagged estimated; never UNKNOWN with a traceback after the bogus figures
    went to the ledger."""
    half = 2**30
    if primary.dialect == "anthropic":
        primary.inject({"cache": {"creation": half, "read": half}})
    else:
        primary.inject({"usage": {"prompt_tokens": half, "completion_tokens": half, "total_tokens": 2 * half}})
    if streaming:
        chunks = [c async for c in stub.StreamComplete(stream_chat("count me"), timeout=5)]
        content, usage = "".join(c.delta.content for c in chunks), chunks[-1].usage
    else:
        answer = await stub.Complete(chat("count me"), timeout=5)
        content, usage = answer.message.content, answer.usage
    assert content == "echo: count me"
    assert usage.estimated and 0 < usage.prompt_tokens < 100 and 0 < usage.completion_tokens < 100
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    billed = (record.backend, record.requests, record.prompt_tokens, record.completion_tokens)
    assert billed == (primary.dialect, 1, usage.prompt_tokens, usage.completion_tokens)
    assert record.estimated_requests == 1
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_usage_of_no_prompt_tokens_is_counted_by_the_gateway(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streaming: bool
) -> None:
    """Ollama's /v1 has reported all zeros for an answer that ended without its metrics: billed as exact, 0 tokens,
    such calls passed every limit on tokens and money. No prompt is 0 tokens."""
    primary.inject({"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    if streaming:
        usage = [c async for c in stub.StreamComplete(stream_chat("count me"), timeout=5)][-1].usage
    else:
        usage = (await stub.Complete(chat("count me"), timeout=5)).usage
    assert usage.estimated and 0 < usage.prompt_tokens < 100 and 0 < usage.completion_tokens < 100
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.prompt_tokens, record.completion_tokens, record.estimated_requests) == (
        usage.prompt_tokens, usage.completion_tokens, 1
    )  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_part_of_the_usage_larger_than_its_whole_is_cut_to_it(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streaming: bool
) -> None:
    """The contract has cached tokens as part of the prompt's and reasoning as part of the completion's: an upstream
    that reported more of either was passed on as it said (cached 50 of 10), its cost priced otherwise."""
    details = {"prompt_tokens_details": {"cached_tokens": 50}, "completion_tokens_details": {"reasoning_tokens": 500}}
    primary.inject({"usage": {"prompt_tokens": 10, "completion_tokens": 200, "total_tokens": 210, **details}})
    if streaming:
        usage = [c async for c in stub.StreamComplete(stream_chat("count me"), timeout=5)][-1].usage
    else:
        usage = (await stub.Complete(chat("count me"), timeout=5)).usage
    assert (usage.prompt_tokens, usage.cached_prompt_tokens) == (10, 10)
    assert (usage.completion_tokens, usage.reasoning_tokens) == (200, 200)
    assert not usage.estimated


async def test_an_account_out_of_credit_is_for_an_operator_to_fix_not_a_rate_limit(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """OpenAI's 429 insufficient_quota: only an operator cures it, so it is tried once, never retried, and the caller
    is told FAILED_PRECONDITION (our own account, as for a key refused) with no RetryInfo nor pushback: later is no
    better. Nothing is billed."""
    primary.inject(OUT_OF_QUOTA, OUT_OF_QUOTA)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(exact_model=True), timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    found = details(error)
    assert found["ErrorInfo"].reason == "UPSTREAM_AUTH_FAILED"
    assert "RetryInfo" not in found
    assert "grpc-retry-pushback-ms" not in dict(error.trailing_metadata() or ())
    assert QUOTA_MESSAGE in (error.details() or "")
    assert [a.outcome for a in found["AttemptHistory"].attempts] == [Outcome.ATTEMPT_OUTCOME_AUTH_FAILED]
    assert len(primary.chat_requests) == 1
    assert not (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records


@pytest.mark.parametrize("pinging", [{}, {"ping_s": 0.3}], ids=["silent", "pinging"])
async def test_a_stream_with_its_finish_reason_and_no_usage_ends_though_the_upstream_holds_it_open(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, pinging: dict[str, float]
) -> None:
    """The finish reason in, no usage (a server that reports none), and the connection held open: the stream was cut
    by the idle limit (2 s here), ABORTED and billed as interrupted, though its answer was whole. Keep-alive comments
    meanwhile began the wait for the usage again each time, until the idle limit."""
    primary.inject({"no_usage": True, "hold_open_s": 30, **pinging})
    started = time.monotonic()
    chunks = [c async for c in stub.StreamComplete(stream_chat("one two"), timeout=10)]
    assert time.monotonic() - started < upstream_http.FINISH_GRACE_S + 0.8
    last = chunks[-1]
    assert "".join(c.delta.content for c in chunks) == "echo: one two"
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.usage.estimated
    assert [a.outcome for a in last.attempts] == [Outcome.ATTEMPT_OUTCOME_SUCCEEDED]
    await wait_until(lambda: bool(primary.client_disconnects), within_s=2)


@pytest.mark.parametrize(
    ("router", "timeout_s"),
    [(FAST_ROUTER.replace("stream_idle_timeout_s: 2", "stream_idle_timeout_s: 0.5"), 10.0), (FAST_ROUTER, 0.8)],
    ids=["idle limit", "deadline"],
)
async def test_a_stream_waiting_for_its_usage_ends_whole_before_the_routers_limits_cut_it(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, router: str, timeout_s: float
) -> None:
    """The wait for the usage after the finish reason (a second) ends within the idle limit and the caller's deadline:
    past them the router cut the stream, whose answer was whole, as stalled (ABORTED, or started again on the next
    route) or with DEADLINE_EXCEEDED, billed as interrupted."""
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"no_usage": True, "hold_open_s": 30})
    chunks = await read_all(stub.StreamComplete(stream_chat("one two", exact_model=True), timeout=timeout_s))
    last = chunks[-1]
    assert "".join(c.delta.content for c in chunks) == "echo: one two"
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.usage.estimated
    assert [a.outcome for a in last.attempts] == [Outcome.ATTEMPT_OUTCOME_SUCCEEDED]
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.requests, record.estimated_requests, record.interrupted_requests) == (1, 1, 0)


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_stream_whole_with_its_usage_ends_though_the_upstream_holds_it_open(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that sent its finish reason and its usage (OpenAI's last event; Anthropic's message_delta), then
    neither its end marker ([DONE], message_stop) nor the end of its body, holding the connection open: the answer is
    whole, so the stream ends at once with the upstream's usage, billed as a success, and the held connection is
    closed; not broken by the idle limit (2 s here) and billed as interrupted."""
    monkeypatch.setattr(upstream_http, "END_GRACE_S", 0.5)  # how long the rest of its body is awaited, meanwhile
    whole = [c async for c in stub.StreamComplete(stream_chat("one two"), timeout=10)][-1].usage
    assert not whole.estimated and whole.completion_tokens == 3  # the upstream's figures: a token a word
    primary.inject({"hold_open_s": 30})
    started = time.monotonic()
    chunks = [c async for c in stub.StreamComplete(stream_chat("one two"), timeout=10)]
    assert time.monotonic() - started < 1.0
    last = chunks[-1]
    assert "".join(c.delta.content for c in chunks) == "echo: one two"
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert [a.outcome for a in last.attempts] == [Outcome.ATTEMPT_OUTCOME_SUCCEEDED]
    assert last.usage == whole
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    billed = (record.backend, record.requests, record.prompt_tokens, record.completion_tokens)
    assert billed == (primary.dialect, 2, 2 * whole.prompt_tokens, 2 * whole.completion_tokens)
    assert (record.estimated_requests, record.interrupted_requests) == (0, 0)
    await wait_until(lambda: bool(primary.client_disconnects), within_s=2)
    assert primary.client_disconnects, "the held connection was left open"


@pytest.mark.parametrize(
    "after", ["data: {bad\n\n", 'data: {"error": {"message": "the GPU fell over"}}\n\n'], ids=["no-json", "error"]
)
@pytest.mark.parametrize("usage", [True, False], ids=["with-usage", "without-usage"])
async def test_what_follows_a_streams_finish_in_the_same_read_fails_nothing(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, after: str, usage: bool
) -> None:
    """After its finish reason (and its usage, when it sent any) an answer is whole whatever the upstream sends next:
    a line that is no event, or an error event, that came in the same read as the finish failed the stream ABORTED
    after all its text, where in a later read it failed nothing."""
    finish = _event({}, "stop") | ({"usage": {"prompt_tokens": 3, "completion_tokens": 2}} if usage else {})
    events = "".join(f"data: {json.dumps(event)}\n\n" for event in (_event({"content": "hi"}), finish))
    primary.inject({"body": events + after, "content_type": "text/event-stream"})
    chunks = await read_all(stub.StreamComplete(stream_chat("x y"), timeout=5))
    assert "".join(c.delta.content for c in chunks) == "hi"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.estimated is not usage
    assert [a.outcome for a in chunks[-1].attempts] == [Outcome.ATTEMPT_OUTCOME_SUCCEEDED]


async def test_a_stream_whose_end_follows_its_usage_ends_at_once_and_keeps_its_connection(
    gateway: Gateway, stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """The end of the body ([DONE], the last HTTP chunk) a while after the usage: the caller has its last chunk at
    once, and the connection, once that end has come, serves the next call rather than being closed for a new one."""
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"
    opened = primary.connections_opened
    primary.inject({"done_after_s": 1.0})
    started = time.monotonic()
    chunks = [c async for c in stub.StreamComplete(stream_chat("one two"), timeout=10)]
    assert time.monotonic() - started < 0.9, "not held for the end of the body"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert [a.outcome for a in chunks[-1].attempts] == [Outcome.ATTEMPT_OUTCOME_SUCCEEDED]
    pool = gateway.router.backends[0].provider._pool.http1  # type: ignore[attr-defined]  # the OpenAI provider's
    await wait_until(lambda: pool.idle_connections == 1, within_s=3)  # its end came: back in the pool
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"
    assert primary.connections_opened == opened


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_an_answer_cut_mid_body_says_so_alike_unary_and_streamed(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """An upstream reached, that closes the connection in the middle of its answer: both calls say so in the HTTP
    client's words, neither that the upstream could not be reached nor a bare exception name. The unary answer bills
    nothing (retried, then failed); the stream bills what it relayed, flagged interrupted."""
    why = f"{primary.base_url} stopped answering: the connection closed before the answer ended"
    primary.inject({"raw": CUT_BODY}, {"raw": CUT_BODY})
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Complete(chat(exact_model=True), timeout=5)
    assert unary.value.code() == grpc.StatusCode.UNAVAILABLE
    attempts = details(unary.value)["AttemptHistory"].attempts
    assert [(a.outcome, a.error) for a in attempts] == [(Outcome.ATTEMPT_OUTCOME_UNREACHABLE, why)] * 2
    assert "cannot reach" not in (unary.value.details() or "")

    primary.inject({"stream_cut_after": 3})
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.StreamComplete(stream_chat("one two three four"), timeout=5):
            pass
    assert streamed.value.code() == grpc.StatusCode.ABORTED
    assert details(streamed.value)["ErrorInfo"].reason == "STREAM_INTERRUPTED"
    [attempt] = details(streamed.value)["AttemptHistory"].attempts
    assert (attempt.outcome, attempt.error) == (Outcome.ATTEMPT_OUTCOME_INTERRUPTED, why)
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.backend, record.requests, record.interrupted_requests) == (primary.dialect, 1, 1)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (HTML, "no event came: the answer is not an event stream (its first line that is none: '<html><body>502"),
        (
            {"body": '{"choices": [{"delta": {"content": "hi"}}]}\n', "content_type": "text/event-stream"},
            """no event came: the answer is not an event stream (its first line that is none: '{"choices": """,
        ),
        ({"body": "", "content_type": "text/event-stream"}, "no event came: the answer was empty"),
        (
            {"body": ": keep-alive\n\nevent: ping\n\n", "content_type": "text/event-stream"},
            "no event came: the answer was empty",
        ),
    ],
    ids=["html", "json-lines", "empty", "comments-alone"],
)
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_200_stream_that_is_no_event_stream_says_what_came_instead(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, answer: dict[str, Any], why: str
) -> None:
    """An upstream that answers a stream's request 200 with something other than server-sent events (a proxy's
    maintenance page, JSON lines without `data:`, nothing): the attempt's error says what came, not only that the
    stream ended early, which would send an operator looking for a connection that broke."""
    primary.inject(answer, answer)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stub.StreamComplete(stream_chat(exact_model=True), timeout=5):
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    errors = [attempt.error for attempt in details(failed.value)["AttemptHistory"].attempts]
    assert errors and all(error.startswith(f"malformed answer: {why}") for error in errors), errors


def _openai_events(*events: dict[str, Any], done: bool) -> dict[str, Any]:
    """A fault answering a stream with these events (each a chat.completion.chunk's choice and usage), and [DONE]."""
    lines = [
        "data: " + json.dumps({"id": "c", "model": "gpt-test", "choices": [choice], "usage": usage})
        for choice, usage in ((event["choice"], event.get("usage")) for event in events)
    ]
    return {"body": "".join(f"{line}\n\n" for line in [*lines, *(["data: [DONE]"] if done else [])]),
            "content_type": "text/event-stream"}  # fmt: skip


def _piece(text: str, finish: str | None) -> dict[str, Any]:
    return {"choice": {"index": 0, "delta": {"content": text}, "finish_reason": finish}}


async def test_an_empty_finish_reason_is_none_and_a_cut_stream_stays_cut(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Ollama's /v1 and sglang have sent "finish_reason": "" in every event before the last: taken for a finish, a
    stream cut after them ended OK, billed as whole, its text cut short."""
    cut = _openai_events(*(_piece(word, "") for word in ("The ", "answer ", "is")), done=False)
    primary.inject(cut, cut)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stub.StreamComplete(stream_chat(exact_model=True), timeout=5):
            pass
    assert failed.value.code() == grpc.StatusCode.ABORTED
    assert details(failed.value)["ErrorInfo"].reason == "STREAM_INTERRUPTED"


async def test_an_empty_finish_reason_beside_a_running_usage_count_is_not_the_end(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """With a running usage count in each event (vLLM's continuous_usage_stats), the first event's "" and usage were
    taken for the end of the answer: the caller got its first word, billed as whole."""
    words = ["The ", "answer ", "is ", "42."]
    events = [
        _piece(word, "") | {"usage": {"prompt_tokens": 12, "completion_tokens": n + 1, "total_tokens": 13 + n}}
        for n, word in enumerate(words)
    ]
    final = {"choice": {"index": 0, "delta": {}, "finish_reason": "stop"}}
    final["usage"] = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    primary.inject(_openai_events(*events, final, done=True) | {"event_gap_s": 0.05})
    chunks = [chunk async for chunk in stub.StreamComplete(stream_chat(exact_model=True), timeout=5)]
    assert "".join(chunk.delta.content for chunk in chunks) == "The answer is 42."
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 4)


def _data_lines(event: dict[str, Any], spaced: bool) -> str:
    """An event whose JSON takes a `data:` line per line of it (as SSE allows, and servers that write their JSON
    indented send), with a comment among them; `spaced`: a space after each `data:`, else none (SSE takes either)."""
    lines = json.dumps(event, indent=1).split("\n")
    first, *rest = (f"data:{' ' if spaced else ''}{line}" for line in lines)
    return "\n".join([first, ": the event goes on", *rest]) + "\n\n"


@pytest.mark.parametrize("apart", [False, True], ids=["together", "apart"])
async def test_an_event_whose_data_takes_several_lines_is_read_whole(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, apart: bool
) -> None:
    """SSE joins an event's `data:` lines with line breaks, and the event ends at its blank line: each line read as
    an event of its own was a malformed answer, the stream failed. One event's text is longer than a read of the
    answer, so that its lines come in several."""
    words = ["The ", "answer ", "x" * 300_000, " is 42."]
    events: list[dict[str, Any]] = [
        {"id": "c", "model": "gpt-test", "choices": [_piece(word, None)["choice"]]} for word in words
    ]
    usage = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    events.append({"id": "c", "model": "gpt-test", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"id": "c", "model": "gpt-test", "choices": [], "usage": usage})
    body = "".join(_data_lines(event, spaced=n % 2 == 0) for n, event in enumerate(events)) + "data: [DONE]\n\n"
    primary.inject({"body": body, "content_type": "text/event-stream"} | ({"event_gap_s": 0.02} if apart else {}))
    chunks = [chunk async for chunk in stub.StreamComplete(stream_chat(exact_model=True), timeout=10)]
    assert "".join(chunk.delta.content for chunk in chunks) == "".join(words)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.estimated) == (
        12,
        4,
        False,
    )


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_deadline_bounds_everything(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"stall_s": 5})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=0.8)
    assert time.monotonic() - started < 1.5
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "DEADLINE_EXCEEDED"
    assert info.metadata["attempts"] == f"{primary.dialect}:timeout"
    assert local.chat_requests == [], "no fallback starts that cannot finish in time"


async def test_request_timeout_bounds_only_the_calls_that_set_no_deadline(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    router = "router: {request_timeout_s: 0.5, first_chunk_timeout_s: 5, retry: {max_retries: 0}}\n"
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"stall_s": 1}, {"stall_s": 1}, {"stall_s": 1}, {"stall_s": 1})
    # A caller that allows longer than the bound gets its answer, as a long generation would.
    assert (await stub.Complete(chat(model=primary.models[0], exact_model=True), timeout=5)).backend == "openai"
    chunks = [c async for c in stub.StreamComplete(stream_chat(model=primary.models[0], exact_model=True), timeout=5)]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model=primary.models[0], exact_model=True))  # no deadline: the bound's
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9
    # Told in the words of the bound, which a caller that set no deadline can act on, with what was tried.
    assert (caught.value.details() or "").startswith("the call ran past router.request_timeout_s (0.5 s)")
    assert details(caught.value)["ErrorInfo"].metadata["attempts"] == "openai:timeout"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamComplete(stream_chat(model=primary.models[0], exact_model=True)):
            pass
    assert "router.request_timeout_s (0.5 s)" in (caught.value.details() or "")


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_no_retry_starts_after_the_deadline(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"status": 429, "retry_after": 2})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model=primary.models[0], exact_model=True), timeout=0.5)
    # Waiting 2 s for a retry cannot fit in 0.5 s: the gateway answers at once with what it knows.
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["RetryInfo"].retry_delay.seconds == 2
    assert len(primary.chat_requests) == 1


async def wait_until(condition: Any, within_s: float) -> None:
    """Polls: the upstream's state is plain data, with no event to wait on."""
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_cancellation_closes_the_upstream_request_at_once(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streaming: bool
) -> None:
    primary.inject({"stall_s": 10})
    call = stub.StreamComplete(stream_chat(), timeout=20) if streaming else stub.Complete(chat(), timeout=20)
    await wait_until(lambda: bool(primary.chat_requests), within_s=5)
    cancelled_at = time.monotonic()
    call.cancel()
    await wait_until(lambda: bool(primary.client_disconnects), within_s=2)
    assert primary.client_disconnects, "the upstream never saw the connection close"
    assert primary.client_disconnects[0] - cancelled_at < 0.1


async def test_a_caller_that_stops_reading_then_leaves_is_billed_and_settled(
    stub_for: StubFactory, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway is stuck writing to a caller that stopped reading when the caller cancels: the write fails in gRPC,
    outside the servicer. What the stream consumed still goes to the ledger and, before the limits settle, to the
    call's meter: the next call of the minute is refused; and no error or traceback is logged for it."""
    stub = await stub_for(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n',
        server="limits: {tokens_per_minute: 5000}, log_calls: true",
    )
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    local.inject({"huge_content": 20_000_000, "no_usage": True})
    call = stub.StreamComplete(stream_chat(options=pb.CompletionOptions(max_tokens=10)), timeout=30)
    await call.read()
    await asyncio.sleep(1.5)  # the gateway fills the flow-control window and waits to write
    call.cancel()

    async def billed() -> int:
        records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
        return sum(r.completion_tokens for r in records)

    async with asyncio.timeout(10):
        while (tokens := await billed()) == 0:  # noqa: ASYNC110 (the ledger, no event to wait on)
            await asyncio.sleep(0.1)
    assert tokens > 5000, "the ledger has what the stream consumed"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Complete(chat(options=pb.CompletionOptions(max_tokens=10)), timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(refused.value)["ErrorInfo"].reason == "TOKENS_PER_MINUTE_EXCEEDED"
    line = next(r for r in caplog.records if r.name == "llmrelay_server.calls" and "CANCELLED" in r.getMessage())
    assert f"completion_tokens={tokens}" in line.getMessage(), "the call log has what was billed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("ends", ["cancelled", "deadline"])
async def test_a_call_that_ends_before_its_answer_is_billed_for_its_prompt(
    stub_for: StubFactory, local: FakeUpstream, streaming: bool, ends: str
) -> None:
    """The upstream read the prompt all the same. Billed nothing, a caller could have any number of prompts read past
    its tokens a minute and its budget by leaving each call (or letting its deadline end it) before the answer."""
    stub = await stub_for(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n', server="limits: {tokens_per_minute: 5000}"
    )
    local.inject({"stall_s": 10})
    timeout = 1 if ends == "deadline" else 20
    call: Any = (
        stub.StreamComplete(stream_chat(), timeout=timeout) if streaming else stub.Complete(chat(), timeout=timeout)
    )
    await wait_until(lambda: bool(local.chat_requests), within_s=5)
    if ends == "cancelled":
        call.cancel()
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await (read_all(call) if streaming else call)

    async def records() -> list[pb.UsageRecord]:
        return list((await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records)

    async with asyncio.timeout(5):
        while not (billed := await records()):  # noqa: ASYNC110 (the ledger, no event to wait on)
            await asyncio.sleep(0.05)
    prompt = await stub.CountTokens(pb.CountTokensRequest(model="tiny", messages=chat().messages), timeout=5)
    assert [(r.backend, r.prompt_tokens, r.completion_tokens) for r in billed] == [("ollama", prompt.token_count, 0)]
    assert (billed[0].interrupted_requests, billed[0].estimated_requests) == (1, 1)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_long_prompt_cut_by_its_deadline_before_its_answer_gets_the_gateways_status_in_time(
    stub_for: StubFactory, local: FakeUpstream, streaming: bool
) -> None:
    """Its bill counts the prompt before the status goes out, and a long one takes a while (2.9 MB, some 250 ms): the
    status came after the caller's deadline, gRPC's bare DEADLINE_EXCEEDED in its place, no attempts told. The count
    is begun ahead of the deadline, while the attempt waits."""
    stub = await stub_for(f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n')
    local.inject({"stall_s": 10})
    system = pb.Message(role=pb.ROLE_SYSTEM, content=" ".join(f"w{i}" for i in range(350_000)))
    messages = [system, *chat().messages]
    # The count takes some 250 ms here, but up to 1.4 s on a busy 2-core CI machine (tokens._COUNTED_CHARS_PER_S
    # allows 2.7 s for it): the deadline leaves it that, as it still begins at once (_ahead: the longest count
    # may take far longer than the deadline).
    timeout_s = 4
    call: Any = (
        stub.StreamComplete(pb.StreamCompleteRequest(messages=messages), timeout=timeout_s)
        if streaming
        else stub.Complete(pb.CompleteRequest(messages=messages), timeout=timeout_s)
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await (read_all(call) if streaming else call)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details(ended.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED", "the gateway's status, not gRPC's own"
    (billed,) = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert billed.prompt_tokens > 300_000 and billed.interrupted_requests == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("ends", ["cancelled", "deadline"])
async def test_a_call_that_ends_before_its_request_is_sent_is_billed_nothing(
    stub_for: StubFactory, caplog: pytest.LogCaptureFixture, streaming: bool, ends: str
) -> None:
    """The gateway was still making its connection (a TLS handshake its upstream never answers) when the caller left
    or its deadline came: no upstream read the prompt, and nothing is billed."""

    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")

    async with RawServer(silent) as raw:
        base_url = raw.url("https").removesuffix("/chat/completions")
        stub = await stub_for(
            f'llm:\n  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{base_url}", model: m}}\n'
            "  order: [openai]\nrouter:\n  retry: {max_retries: 0}\n",
            server="limits: {tokens_per_minute: 5000}",
        )
        probes = raw.accepted  # the health probe's connection
        timeout = 1 if ends == "deadline" else 20
        call: Any = (
            stub.StreamComplete(stream_chat(), timeout=timeout) if streaming else stub.Complete(chat(), timeout=timeout)
        )
        await wait_until(lambda: raw.accepted > probes, within_s=5)
        if ends == "cancelled":
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as ended:
            await (read_all(call) if streaming else call)
        if ends == "deadline":
            assert isinstance(ended.value, grpc.aio.AioRpcError)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def call_lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "llmrelay_server.calls" and "Complete" in r.getMessage()
            ]

        await wait_until(lambda: bool(call_lines()), within_s=5)  # written once the call is over, bill and all
        outcome = "cancelled" if ends == "cancelled" else "timeout"
        assert [f"attempts=openai:{outcome}" in line for line in call_lines()] == [True], call_lines()
        assert not (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records


@pytest.mark.parametrize("reads_first", [True, False], ids=["after-a-message", "before-any"])
async def test_request_timeout_ends_a_stream_whose_caller_stopped_reading(
    gateway_factory: GatewayFactory, local: FakeUpstream, caplog: pytest.LogCaptureFixture, reads_first: bool
) -> None:
    """A caller that set no deadline stops reading long answers, its connection kept: after a first message, or
    before any (three streams on a channel whose window does not grow: the later ones' first messages wait for room).
    The gateway, stuck writing to it, ends each stream at router.request_timeout_s all the same, as it ends one whose
    upstream goes quiet: the upstream request closed, what was consumed billed and settled, the call logged. The
    caller, once it reads again, gets what gRPC held for it and then the gateway's status, not a stream left open."""
    gateway = await gateway_factory(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\nrouter: {{request_timeout_s: 2}}\n',
        server="limits: {tokens_per_minute: 5000}, log_calls: true",
    )
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    streams = 1 if reads_first else 3
    window = [] if reads_first else [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=window) as channel:
        stub = pb.LLMServiceStub(channel)

        async def billed() -> int:
            records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
            return sum(r.completion_tokens for r in records)

        # A stream read to its end within the bound is not cut, nor is a later one by its watch.
        assert (await read_all(stub.StreamComplete(stream_chat())))[-1].finish_reason == pb.FINISH_REASON_STOP
        before = await billed()
        # One answer larger than what gRPC buffers; or three that share the channel's window.
        local.inject(*[{"huge_content": 20_000_000 if reads_first else 4_000_000, "no_usage": True}] * streams)
        options = pb.CompletionOptions(max_tokens=10)
        calls = [stub.StreamComplete(stream_chat(f"s{i}", options=options)) for i in range(streams)]  # no deadline
        started = time.monotonic()
        if reads_first:
            await calls[0].read()

        def ended() -> list[str]:
            return [r.getMessage() for r in caplog.records if "code=DEADLINE_EXCEEDED" in r.getMessage()]

        await wait_until(lambda: len(ended()) == streams, within_s=8)
        assert 2 <= time.monotonic() - started < 4, "ended at their bound, not before and not much after"
        tokens = await billed() - before
        assert tokens > 5000, "the ledger has what the streams consumed"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(options=options), timeout=5)
        assert details(refused.value)["ErrorInfo"].reason == "TOKENS_PER_MINUTE_EXCEEDED", "the limits settled"

        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(10):
                    while (await call.read()) is not grpc.aio.EOF:
                        pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert details(caught.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
            assert "router.request_timeout_s (2 s)" in (caught.value.details() or "")
    lines = ended()
    assert all("rpc=llmrelay.v1.LLMService/StreamComplete" in line for line in lines), lines
    assert all("attempts=ollama:timeout" in line for line in lines), lines
    assert sum(int(line.split("completion_tokens=")[1].split()[0]) for line in lines) == tokens, lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_circuit_opens_skips_and_recovers(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    router = FAST_ROUTER.replace("failure_threshold: 50, cooldown_s: 30", "failure_threshold: 2, cooldown_s: 0.3")
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"status": 500}, {"status": 500})
    assert (await stub.Complete(chat(), timeout=5)).backend == "ollama"
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_OPEN
    # While open, the primary is skipped without a call.
    answer = await stub.Complete(chat(), timeout=5)
    assert answer.attempts[0].outcome == Outcome.ATTEMPT_OUTCOME_SKIPPED and len(primary.chat_requests) == 2
    await asyncio.sleep(0.35)
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_HALF_OPEN
    # One probe call goes through; its success closes the circuit.
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_streams_that_break_part_way_open_the_circuit_as_failures_at_once_do(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The first chunk of a stream counted as a success (the failures forgotten), and its break as one failure: a
    backend that broke every stream part-way never reached the threshold, and every caller got ABORTED."""
    router = FAST_ROUTER.replace("failure_threshold: 50, cooldown_s: 30", "failure_threshold: 2, cooldown_s: 30")
    stub = await stub_for(two_backends(primary, local, router))

    async def broken_stream() -> None:
        primary.inject({"stream_cut_after": 2})
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await read_all(stub.StreamComplete(stream_chat("a b c d"), timeout=5))
        assert broken.value.code() == grpc.StatusCode.ABORTED

    async def circuit() -> int:
        return (await stub.Health(pb.HealthRequest(), timeout=5)).backends[0].circuit_state

    await broken_stream()
    # A stream that ends whole forgives the failures before it.
    assert (await read_all(stub.StreamComplete(stream_chat("a b c d"), timeout=5)))[-1].backend == "openai"
    await broken_stream()
    assert await circuit() == pb.CIRCUIT_STATE_CLOSED
    await broken_stream()  # the second in a row
    assert await circuit() == pb.CIRCUIT_STATE_OPEN
    chunks = await read_all(stub.StreamComplete(stream_chat("a b c d"), timeout=5))
    assert chunks[-1].attempts[0].outcome == Outcome.ATTEMPT_OUTCOME_SKIPPED and chunks[-1].backend == "ollama"


@pytest.mark.parametrize("code", ["context_length_exceeded", "invalid_request_error"])
async def test_a_stream_the_upstream_blames_part_way_does_not_open_the_circuit(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, code: str
) -> None:
    """As before the first chunk: one caller's request, refused mid-stream, opened the circuit for every other."""
    router = FAST_ROUTER.replace("failure_threshold: 50, cooldown_s: 30", "failure_threshold: 1, cooldown_s: 30")
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"error_event_after": 2, "error_code": code})
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await read_all(stub.StreamComplete(stream_chat("a b c d"), timeout=5))
    assert broken.value.code() == grpc.StatusCode.ABORTED
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_CLOSED
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"


async def test_a_retry_wait_is_not_spent_on_a_circuit_its_failure_opened(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The backoff (here the upstream's Retry-After, 3 s) was slept before the retry found the circuit open and
    skipped it: the fallback began 3 s late, for a retry that could never run."""
    router = "router: {retry: {max_retries: 2}, circuit: {failure_threshold: 1, cooldown_s: 30}}\n"
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"status": 429, "retry_after": 3})
    began = time.monotonic()
    answer = await stub.Complete(chat(), timeout=10)
    assert time.monotonic() - began < 1.5
    assert answer.backend == "ollama" and len(primary.chat_requests) == 1
    assert [attempt.outcome for attempt in answer.attempts] == [
        Outcome.ATTEMPT_OUTCOME_RATE_LIMITED,
        Outcome.ATTEMPT_OUTCOME_SKIPPED,
        Outcome.ATTEMPT_OUTCOME_SUCCEEDED,
    ]


async def test_standard_health_follows_the_circuits(gateway_factory: GatewayFactory, local: FakeUpstream) -> None:
    gateway = await gateway_factory(f"""
llm:
  ollama: {{base_url: "{local.base_url}", model: tiny}}
router:
  retry: {{max_retries: 0}}
  circuit: {{failure_threshold: 1, cooldown_s: 1}}
""")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="llmrelay.v1.LLMService"), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        local.inject({"status": 500})
        with pytest.raises(grpc.aio.AioRpcError):
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        # The one backend's circuit is open: nothing can serve, and the standard service says so without a probe.
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # After the cool-down a probe call may go through again.
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_load_with_random_faults_ends_every_call_definitely_and_leaks_nothing(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    faults: list[dict[str, Any]] = [
        {},
        {},
        {},
        {"status": 503},
        {"status": 429, "retry_after": 0},
        {"drop": True},
        {"stream_cut_after": 3},
        HTML,
        {"stall_s": 0.3},
    ]
    rng = random.Random(7)
    primary.inject(*(rng.choice(faults) for _ in range(400)))
    local.inject(*(rng.choice(faults) for _ in range(400)))
    await asyncio.sleep(0)
    fds_before, tasks_before = open_fds(), len(asyncio.all_tasks())
    gateway = await gateway_factory(two_backends(primary, local))

    async def one_stream(stub: pb.LLMServiceAsyncStub, i: int) -> grpc.StatusCode:
        text = f"stream number {i}"
        chunks = []
        try:
            async for chunk in stub.StreamComplete(stream_chat(text), timeout=20):
                chunks.append(chunk)
        except grpc.aio.AioRpcError as error:
            assert error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert details(error)["ErrorInfo"].reason
            return error.code()
        assert "".join(c.delta.content for c in chunks) == f"echo: {text}", "a successful stream is complete"
        assert chunks[-1].usage.total_tokens > 0
        return grpc.StatusCode.OK

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        codes = await asyncio.gather(*(one_stream(stub, i) for i in range(200)))
    assert codes.count(grpc.StatusCode.OK) > 100
    await gateway.stop(grace_period_s=0, drain_s=0)
    primary.faults.clear()
    local.faults.clear()
    await asyncio.sleep(0.2)
    assert len(asyncio.all_tasks()) <= tasks_before, "tasks left behind"
    assert open_fds() <= fds_before + 2, "sockets or files left open"


async def test_a_stream_trickling_bytes_ends_at_the_deadline(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Its first event takes longer than a second to arrive: within the first-chunk limit here, not the deadline.
    stub = await stub_for(two_backends(primary, local, FAST_ROUTER.replace("first_chunk_timeout_s: 1", "")))
    primary.inject({"byte_trickle_s": 0.01})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamComplete(stream_chat("slow answer"), timeout=1.5):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details(caught.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_an_enormous_answer_gets_a_definite_status(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"huge_content": 6_000_000})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model=primary.models[0], exact_model=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["ErrorInfo"].reason == "ANSWER_TOO_LARGE"
    assert "StreamComplete" in str(caught.value.details())
    # Streamed, the same answer arrives in pieces, each within the message limit.
    primary.inject({"huge_content": 6_000_000})
    chunks = [c async for c in stub.StreamComplete(stream_chat(), timeout=10)]
    assert sum(len(c.delta.content) for c in chunks) == 6_000_000
    assert (await stub.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"


async def test_an_answer_too_large_to_send_is_not_kept_after_its_status(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """The status a call aborts with keeps the servicer's frame (its traceback, in a cycle with the call's context that
    only a full garbage collection frees): the answer it refused was kept with it, and a gateway's memory grew by it
    with every such call (8 answers of 60 MB: 1.2 GB more, each time)."""
    await stub.Complete(chat(), timeout=5)  # the connections made: what they allocate stays, and is no answer
    with kept_by_the_gateway(1_000_000) as kept:
        primary.inject({"huge_content": 6_000_000})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kept == []


async def test_one_delta_over_the_message_limit_is_sent_in_pieces(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    primary.inject({"huge_content": 6_000_000, "one_delta": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat(), timeout=10)]
    assert len(chunks) > 3, "the one delta arrives in several messages"
    assert sum(len(c.delta.content) for c in chunks) == 6_000_000
    assert all(c.ByteSize() <= 4 * 1024 * 1024 for c in chunks)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP and chunks[-1].usage.total_tokens > 0
    assert "Traceback" not in caplog.text


async def test_under_a_raised_message_limit_a_stream_is_sent_in_pieces_any_client_reads(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """server.max_message_bytes raised for large images raised the stream's pieces with it: a delta of 5 MB went as
    one message, which a client keeping gRPC's default receive limit (4 MiB) refused before any text, the call
    billed all the same."""
    stub = await stub_for(two_backends(primary, local), server="max_message_bytes: 20971520")
    primary.inject({"huge_content": 5_000_000, "one_delta": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat(), timeout=10)]  # a client with gRPC's defaults
    assert sum(len(c.delta.content) for c in chunks) == 5_000_000
    assert all(c.ByteSize() <= 4 * 1024 * 1024 for c in chunks)


async def test_under_a_small_message_limit_a_long_delta_is_sent_in_pieces_of_thousands_of_characters(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Room for the rest of a message was 64 KiB whatever the limit: under a limit of 64 KiB or less, every piece was
    one character, and a 100,000-character answer went as 100,000 messages."""
    limit = 32 * 1024
    stub = await stub_for(two_backends(primary, local), server=f"max_message_bytes: {limit}")
    primary.inject({"huge_content": 100_000, "one_delta": True})
    chunks = [c async for c in stub.StreamComplete(stream_chat(), timeout=10)]
    assert sum(len(c.delta.content) for c in chunks) == 100_000
    assert len(chunks) <= 100_000 // 4096 + 2, f"{len(chunks)} messages"
    assert all(c.ByteSize() <= limit for c in chunks)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


def inject_a_field_never_cut(primary: FakeUpstream, value: str) -> None:
    """An answer whose id (OpenAI's API) or reasoning signature (Anthropic's) is `value`."""
    if primary.dialect == "anthropic":
        primary.inject({"reasoning": "thinking it over", "signature": value})
        return
    answer = {"id": value, "object": "chat.completion.chunk", "created": 0, "model": primary.models[0]}
    deltas = [({"role": "assistant", "content": "hi"}, None), ({}, "stop")]
    events = [answer | {"choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in deltas]
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    primary.inject({"body": body, "content_type": "text/event-stream"})


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_field_never_cut_over_the_message_limit_ends_the_stream_with_the_gateways_status(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The answer's id (OpenAI's API) and the reasoning's signature (Anthropic's) were not counted: a message over the
    limit was left to gRPC, which refused it with a bare RESOURCE_EXHAUSTED, no details, and the call log said
    CANCELLED."""
    limit = 32 * 1024
    stub = await stub_for(two_backends(primary, local), server=f"max_message_bytes: {limit}")
    inject_a_field_never_cut(primary, "c" * limit)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.StreamComplete(stream_chat(model=primary.models[0], exact_model=True), timeout=10))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["ErrorInfo"].reason == "ANSWER_TOO_LARGE"
    assert "server.max_message_bytes" in (caught.value.details() or "")


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_field_never_cut_within_the_message_limit_is_sent_however_many_characters_it_has(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A message is cut by the characters that surely fit (4 bytes each at most): a field never cut over them, whose
    bytes fit, was refused as "8,3xx bytes, over the gateway's 32768-byte limit", which Complete answered whole."""
    limit = 32 * 1024
    stub = await stub_for(two_backends(primary, local), server=f"max_message_bytes: {limit}")
    inject_a_field_never_cut(primary, "c" * (limit // 4))
    chunks = await read_all(stub.StreamComplete(stream_chat(model=primary.models[0], exact_model=True), timeout=10))
    never_cut = "".join(c.delta.reasoning_signature for c in chunks) if primary.dialect == "anthropic" else chunks[0].id
    assert never_cut == "c" * (limit // 4)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP and all(c.ByteSize() <= limit for c in chunks)


async def test_what_the_gateway_reads_of_an_upstreams_answer_is_bounded(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream's answer of any size (a whole body, one stream line, an error's body) was read into memory whole:
    past upstream_http's bounds (made small here) the answer is malformed, or its error body left unread."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 100_000)
    monkeypatch.setattr(upstream_http, "MAX_ERROR_BODY_BYTES", 1_000)
    exact: dict[str, Any] = {"model": primary.models[0], "exact_model": True}
    calls: list[tuple[dict[str, Any], Any]] = [
        ({"huge_content": 200_000}, lambda: stub.Complete(chat(**exact), timeout=10)),
        ({"huge_content": 2_000_000, "one_delta": True}, lambda: read_all(stub.StreamComplete(stream_chat(**exact)))),
    ]
    for fault, call in calls:
        primary.inject(fault)  # a malformed answer is not retried
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_BAD_RESPONSE"
        assert " is over 100000 " in str(caught.value.details())

    long_error = json.dumps({"error": {"message": "overloaded " + "x" * 5_000}})
    primary.inject({"status": 500, "body": long_error}, {"status": 500, "body": long_error})
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Complete(chat(**exact), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 500" in str(failed.value.details()) and "overloaded" not in str(failed.value.details())
    assert (await stub.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"


async def test_an_error_body_nested_past_pythons_stack_is_an_upstream_error(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Read by json.loads, such a body was a RecursionError, and the call ended INTERNAL with a traceback."""
    deep = '{"error": ' + "[" * 5_000 + "]" * 5_000 + "}"
    for status, code in ((500, grpc.StatusCode.UNAVAILABLE), (400, grpc.StatusCode.INVALID_ARGUMENT)):
        primary.inject({"status": status, "body": deep}, {"status": status, "body": deep})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(model=primary.models[0], exact_model=True), timeout=10)
        assert caught.value.code() == code, caught.value.details()
        assert f"HTTP {status}" in str(caught.value.details())
    assert "Traceback" not in caplog.text


SSE_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
UNREADABLE_LINE = "data: {" + "x" * 3_000_000 + "\n\n"
FIRST_EVENT = 'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "Once"}}]}\n\n'


@pytest.mark.parametrize(
    ("fault", "streaming", "exact", "reason"),
    [
        ({"huge_content": 6_000_000}, False, True, "UPSTREAM_BAD_RESPONSE"),
        ({"huge_content": 6_000_000, "one_delta": True}, True, True, "UPSTREAM_BAD_RESPONSE"),
        ({"body": '{"id": "' + "x" * 3_000_000}, False, True, "UPSTREAM_BAD_RESPONSE"),
        ({"raw": SSE_HEAD + UNREADABLE_LINE}, True, True, "UPSTREAM_BAD_RESPONSE"),
        ({"raw": SSE_HEAD + FIRST_EVENT + UNREADABLE_LINE}, True, True, "STREAM_INTERRUPTED"),
        ({"huge_content": 6_000_000}, False, False, ""),
    ],
    ids=[
        "body over the bound",
        "stream line over the bound",
        "body not JSON",
        "stream line not JSON",
        "stream line not JSON after text",
        "body over the bound, then a fallback",
    ],
)
async def test_an_answer_the_gateway_cannot_read_is_not_kept_after_the_call(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    fault: dict[str, Any],
    streaming: bool,
    exact: bool,
    reason: str,
) -> None:
    """What was read of an answer over the gateway's bound, or of one it could not parse, stayed in memory after the
    call, failed or served by a fallback: the attempt's error kept it (its frames and causes, in cycles only a full
    garbage collection frees), and so did a closed connection its unread body. 8 streams whose line never ended grew
    a gateway by 500 MB, and again with every 8 more."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 4_000_000)
    model: dict[str, Any] = {"model": primary.models[0], "exact_model": True} if exact else {}
    await stub.Complete(chat(), timeout=5)  # the connections made: what they allocate stays, and is no answer
    with kept_by_the_gateway(1_000_000) as kept:
        primary.inject(fault)
        try:
            if streaming:
                await read_all(stub.StreamComplete(stream_chat(**model), timeout=10))
            else:
                assert (await stub.Complete(chat(**model), timeout=10)).backend == "ollama"
            failure = ""
        except grpc.aio.AioRpcError as error:
            failure = details(error)["ErrorInfo"].reason
    assert failure == reason
    assert kept == []


@pytest.mark.parametrize("retry_after", ["99999999999999999999999", "1e300"])
async def test_a_retry_after_of_ages_is_taken_as_a_day(
    stub_for: StubFactory, local: FakeUpstream, retry_after: str
) -> None:
    stub = await stub_for(local_alone(local))
    for status, code in ((503, grpc.StatusCode.UNAVAILABLE), (429, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        local.inject({"status": status, "retry_after": retry_after}, {"status": status, "retry_after": retry_after})
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Complete(chat(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.StreamComplete(stream_chat(), timeout=5):
                pass
        for caught in (unary, stream):
            assert caught.value.code() == code, caught.value.details()
            assert details(caught.value)["RetryInfo"].retry_delay.seconds == 86_400


async def test_an_open_circuit_says_when_to_come_back(stub_for: StubFactory, local: FakeUpstream) -> None:
    stub = await stub_for(local_alone(local, circuit="{failure_threshold: 1, cooldown_s: 30}"))
    local.inject({"status": 503})
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Complete(chat(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    found = details(caught.value)
    # No upstream_status: no upstream answered this call (an earlier call's 503 read as this one's, a dashboard
    # counted an upstream failure that never happened). The earlier failure is in the words.
    assert dict(found["ErrorInfo"].metadata) == {"attempts": "ollama:skipped", "backend": "ollama"}
    assert [a.HasField("upstream_status") for a in found["AttemptHistory"].attempts] == [False]
    assert "last failure: " in str(caught.value.details()) and "503" in str(caught.value.details())
    assert 29 <= found["RetryInfo"].retry_delay.seconds <= 30, "the cool-down left, not a guess"
    assert len(local.chat_requests) == 1


async def test_a_call_skipped_while_a_probe_is_out_is_told_to_come_back_soon(
    stub_for: StubFactory, local: FakeUpstream
) -> None:
    stub = await stub_for(local_alone(local, circuit="{failure_threshold: 1, cooldown_s: 0.2}"))
    local.inject({"status": 503}, {"stall_s": 3})
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Complete(chat(), timeout=5)
    await asyncio.sleep(0.3)
    probe = stub.Complete(chat(), timeout=10)  # half-open: it goes through, and the upstream holds it
    await wait_until(lambda: len(local.chat_requests) == 2, within_s=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    probe.cancel()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "another call is probing it" in str(caught.value.details())
    assert details(caught.value)["RetryInfo"].retry_delay.seconds == 1, "not 0 s: a client would retry at once"


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_primary_silent_past_the_first_chunk_limit_is_told_by_the_limits_name(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """The next backend answers; the attempt that failed says which setting to raise for a model slow to start."""
    primary.inject({"stall_s": 3})
    answer = await stub.Complete(chat(), timeout=10)
    assert answer.backend == "ollama"
    silent, answered = answer.attempts
    assert (silent.outcome, silent.error) == (
        Outcome.ATTEMPT_OUTCOME_TIMEOUT,
        "no answer within 1 s (router.first_chunk_timeout_s)",
    )
    assert answered.outcome == Outcome.ATTEMPT_OUTCOME_SUCCEEDED


async def test_a_silent_primary_does_not_hold_every_call_until_its_deadline(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """It takes calls and never answers; its health probe passes; callers' deadlines are shorter than the first-chunk
    limit. Each call it holds to the deadline counts against it, so its circuit opens and the fallback serves."""
    router = FAST_ROUTER.replace("failure_threshold: 50", "failure_threshold: 2").replace(
        "first_chunk_timeout_s: 1", "first_chunk_timeout_s: 15"
    )
    stub = await stub_for(two_backends(primary, local, router))
    primary.inject({"stall_s": 30}, {"stall_s": 30})
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(), timeout=1.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = await stub.Complete(chat(), timeout=1.3)
    assert answer.backend == "ollama"
    assert [a.outcome for a in answer.attempts] == [Outcome.ATTEMPT_OUTCOME_SKIPPED, Outcome.ATTEMPT_OUTCOME_SUCCEEDED]
    assert len(primary.chat_requests) == 2


async def test_a_stream_of_a_long_prompt_cut_by_the_deadline_ends_with_the_gateways_status(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """A stream the deadline cuts short is billed before its status goes out, and its bill counts the prompt: for
    megabytes, a thread's while. The count is made while the stream goes on, so that the stream runs to its deadline
    and the gateway's status (with the attempts) still reaches the caller rather than its client library's bare
    DEADLINE_EXCEEDED; the call is billed as interrupted."""
    primary.inject({"trickle_s": 1})  # "echo: " and the six words, a chunk a second: longer than the deadline
    request = pb.StreamCompleteRequest(
        messages=[pb.Message(role=pb.ROLE_SYSTEM, content="lorem " * 350_000), user("one two three four five six")]
    )
    received = 0
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamComplete(request, timeout=5):
            received += 1
    assert time.monotonic() - started >= 4.5  # not cut as long before the deadline as the count may take (2.15 s)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details(caught.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED", caught.value.details()
    [attempt] = details(caught.value)["AttemptHistory"].attempts
    assert (attempt.backend, attempt.outcome) == (primary.dialect, Outcome.ATTEMPT_OUTCOME_TIMEOUT)
    assert received >= 1
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.requests, record.interrupted_requests) == (1, 1)
    assert record.prompt_tokens >= 350_000


async def test_a_stream_of_a_long_prompt_that_ends_in_time_is_not_cut_for_its_count(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Megabytes of prompt may take longer to count than the whole deadline: such a stream was cut at its first chunk
    with DEADLINE_EXCEEDED ("the deadline ran out mid-stream"), to leave its bill the time, though its answer came
    soon and its upstream reported its usage."""
    primary.inject({"trickle_s": 0.05})  # "echo: " and the three words, 0.2 s in all
    request = pb.StreamCompleteRequest(
        messages=[pb.Message(role=pb.ROLE_SYSTEM, content="lorem " * 580_000), user("one two three")]
    )
    chunks = [chunk async for chunk in stub.StreamComplete(request, timeout=3)]
    assert "".join(chunk.delta.content for chunk in chunks) == "echo: one two three"
    assert chunks[-1].usage.prompt_tokens > 0 and not chunks[-1].usage.estimated


async def test_a_deadline_that_grpcio_sends_rounded_up_gets_the_gateways_own_status(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """grpcio sends a timeout of 10.21 s as "10300m", the next tenth of a second up (gRPC core's encoding: 100 ms units
    from 10 s to 100 s), and ends the call itself at 10.21 s: a gateway ending it 50 ms before the 10.3 s it read came
    too late, and the caller got the client library's bare DEADLINE_EXCEEDED."""
    stub = await stub_for(two_backends(primary, local, FAST_ROUTER.replace("first_chunk_timeout_s: 1", "")))
    primary.inject({"stall_s": 12})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="gpt-test", exact_model=True), timeout=10.21)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "ErrorInfo" in details(caught.value), caught.value.details()
    assert details(caught.value)["ErrorInfo"].metadata["attempts"] == "openai:timeout"


@pytest.mark.parametrize("timeout_s", [0.005, 0.01, 0.02, 0.05])
async def test_tiny_deadlines_get_the_gateways_own_status(
    channel: grpc.aio.Channel, stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, timeout_s: float
) -> None:
    """The gateway ends the call before the caller's deadline, by a margin of a tenth of it at most (0.5 ms of 5 ms).
    On a busy machine the gateway's answer can take longer than that to reach the caller, whose client library then
    ends the call itself: a bare DEADLINE_EXCEEDED, no details. So every try must be DEADLINE_EXCEEDED, and one of 20
    at most the gateway's own; the connection is made first, so that no try spends its deadline on making it."""
    await channel.channel_ready()
    own = None
    for _ in range(20):
        primary.reset()
        primary.inject({"stall_s": 1})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(model="gpt-test", exact_model=True), timeout=timeout_s)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if any(key == "grpc-status-details-bin" for key, _ in caught.value.trailing_metadata() or ()):
            own = details(caught.value)
            break
    assert own is not None, "every try ended by the client library's own deadline, none by the gateway's status"
    assert own["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
    # Under MIN_ATTEMPT_S left, no backend is asked, and the status tells no attempts (they were there, empty).
    asked = "attempts" in own["ErrorInfo"].metadata
    assert asked == ("AttemptHistory" in own), own
    assert not asked or timeout_s > MIN_ATTEMPT_S, own
    primary.reset()
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"  # and it goes on serving


async def test_a_50ms_deadline_is_enough_to_try(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    answer = await stub.Complete(chat(), timeout=0.05)
    assert answer.backend == "openai"


async def test_an_oversized_request_is_resource_exhausted(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat("x" * (5 * 1024 * 1024)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert primary.chat_requests == []
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"


async def test_a_prompt_too_long_goes_only_to_a_backend_with_a_larger_context(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(f"""
llm:
  openai: {{api_key: "sk-test-key-123456", base_url: "{primary.base_url}", model: gpt-test, context_window: 8192}}
  backends:
    - {{name: small, kind: openai_compatible, base_url: "{local.base_url}", model: tiny, context_window: 4096}}
    - {{name: big, kind: openai_compatible, base_url: "{local.base_url}", model: tiny, context_window: 131072}}
  order: [openai, small, big]
""")
    primary.inject(TOO_LONG)
    answer = await stub.Complete(chat("a very long prompt"), timeout=5)
    assert answer.backend == "big"
    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        ("openai", Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED),
        ("small", Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED),
        ("big", Outcome.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert len(local.chat_requests) == 1, "the smaller backend was not asked"
