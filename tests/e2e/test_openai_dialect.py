"""OpenAI-compatible answers as servers and proxies write them, streamed and whole: a stream adds up to the answer
Complete gives for the same words, and an error inside a 200 tells what its status would."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from llmrelay import StreamAssembler
from llmrelay import v1 as pb
from support import FAST_ROUTER, OPENAI_TEST_KEY, StubFactory, chat, details, read_all, stream_chat, tool
from upstream import FakeUpstream

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def event(delta: dict[str, Any] | None = None, finish: str | None = None, *, model: str = "gpt-test") -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": choices}


def streamed(*events: dict[str, Any]) -> dict[str, Any]:
    """A fault that answers these events, each as one SSE event, then [DONE]."""
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return {"body": body, "content_type": "text/event-stream"}


def whole(message: dict[str, Any], finish: str) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant"} | message, "finish_reason": finish}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test", "choices": [choice], "usage": USAGE}
    return {"body": json.dumps(answer)}


def calls_stream(*fragments: list[dict[str, Any]], finish: str = "tool_calls") -> dict[str, Any]:
    """A stream of one event for each list of tool-call fragments, then the finish reason and the usage."""
    events = [event({"role": "assistant", "content": None})]
    events += [event({"tool_calls": calls}) for calls in fragments]
    return streamed(*events, event({}, finish), event() | {"usage": USAGE})


def fragment(index: int, call_id: str | None = None, name: str | None = None, arguments: str | None = None) -> Any:
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    return {"index": index, "function": function} | ({"id": call_id, "type": "function"} if call_id else {})


def call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}} | (
        {"id": call_id} if call_id else {}
    )


async def both(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    unary: dict[str, Any],
    stream: dict[str, Any],
    *,
    tools: tuple[str, ...] = (),
) -> tuple[pb.CompleteResponse, pb.CompleteResponse, list[pb.StreamCompleteResponse]]:
    """The answer Complete gives to `unary`, the one StreamComplete's messages add up to for `stream` (as the SDK's
    assembler puts them together: a call's id and name from its first fragment), and those messages; the requests
    declare `tools`."""
    options = pb.CompletionOptions(tools=[tool(name) for name in tools])
    primary.inject(unary)
    answer = await stub.Complete(chat("call", options=options), timeout=5)
    primary.inject(stream)
    chunks = await read_all(stub.StreamComplete(stream_chat("call", options=options), timeout=5))
    assembler = StreamAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    assert answer.backend == chunks[-1].backend == "openai"
    return answer, assembler.result(), chunks


def listed(answer: pb.CompleteResponse) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in answer.message.tool_calls]


def first_fragments_alone_name_their_calls(chunks: list[pb.StreamCompleteResponse]) -> bool:
    """The contract's: a call's name (and id) in its first fragment, and in no other."""
    seen: set[int] = set()
    for fragment in (f for chunk in chunks for f in chunk.delta.tool_calls):
        if (fragment.index not in seen) != (fragment.HasField("name") and fragment.HasField("id")):
            return False
        seen.add(fragment.index)
    return True


SPLIT_NAME = (
    whole({"tool_calls": [call("call_a", "weather", '{"c": 1}')]}, "tool_calls"),
    calls_stream([fragment(0, "call_a", "wea", "")], [fragment(0, name="ther", arguments='{"c": 1}')]),
)
NAME_SECOND = (
    whole({"tool_calls": [call("call_a", "weather", '{"c": 1}')]}, "tool_calls"),
    calls_stream([fragment(0, "call_a", arguments="")], [fragment(0, name="weather", arguments='{"c": 1}')]),
)
NEW_NAME_AT_ONE_INDEX = (
    whole({"tool_calls": [call(None, "a", '{"x": 1}'), call(None, "b", '{"y": 2}')]}, "tool_calls"),
    calls_stream([fragment(0, name="a", arguments='{"x": 1}')], [fragment(0, name="b", arguments='{"y": 2}')]),
)
REPEATED_AT_THE_END = (
    whole({"tool_calls": [call("call_a", "a", '{"x": 1}')]}, "tool_calls"),
    calls_stream([fragment(0, "call_a", "a", '{"x": 1}')], [fragment(0, "call_a", "a", "")]),
)
NAME_IN_EVERY_FRAGMENT = (  # vLLM's shape: the id and the whole name again with each piece
    whole({"tool_calls": [call("call_a", "weather", '{"c": 1}')]}, "tool_calls"),
    calls_stream(*([fragment(0, "call_a", "weather", piece)] for piece in ("", '{"c"', ": 1}", ""))),
)
NO_ARGUMENTS = (  # a call of a function without parameters, whose arguments never come, then another
    whole({"tool_calls": [call("call_a", "clock", ""), call("call_b", "weather", "{}")]}, "tool_calls"),
    calls_stream([fragment(0, "call_a", "clock", "")], [fragment(1, "call_b", "weather", "{}")]),
)


@pytest.mark.parametrize(
    ("answers", "calls"),
    [
        (SPLIT_NAME, [("weather", '{"c": 1}')]),
        (NAME_SECOND, [("weather", '{"c": 1}')]),
        (NEW_NAME_AT_ONE_INDEX, [("a", '{"x": 1}'), ("b", '{"y": 2}')]),
        (REPEATED_AT_THE_END, [("a", '{"x": 1}')]),
        (NAME_IN_EVERY_FRAGMENT, [("weather", '{"c": 1}')]),
        (NO_ARGUMENTS, [("clock", ""), ("weather", "{}")]),
    ],
    ids=["name in pieces", "name second", "new name at one index", "repeated at the end", "vllm", "no arguments"],
)
async def test_a_streams_tool_calls_are_the_whole_answers(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, answers: tuple[dict[str, Any], ...], calls: list[Any]
) -> None:
    """A name sent in pieces was cut to its first ("wea"); one sent after the call's first fragment failed the stream
    as malformed; a call that named another function at the index of one whose arguments were whole ran into it; and
    the id and name again with no arguments, after them, were a second call. Complete had each right."""
    answer, assembled, chunks = await both(stub, primary, *answers)

    assert listed(answer) == listed(assembled) == calls
    for message in (answer.message, assembled.message):  # the upstream's ids kept, the gateway's own elsewhere
        ids = [c.id for c in message.tool_calls]
        assert [i for i in ids if i in ("call_a", "call_b")] == [
            i for i in ("call_a", "call_b") if i in answers[1]["body"]
        ]
        assert all(ids) and len(set(ids)) == len(ids)
    assert answer.finish_reason == assembled.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert first_fragments_alone_name_their_calls(chunks)


TOOLS = ("clock", "date", "weather", "a", "b", "ha", "haha")
CLOCK_THEN_DATE = (  # an OpenRouter engine's shape: whole calls at index 0, no ids, the first without arguments
    whole({"tool_calls": [call(None, "clock", ""), call(None, "date", "")]}, "tool_calls"),
    calls_stream([fragment(0, name="clock", arguments="")], [fragment(0, name="date", arguments="")]),
)
CLOCK_THEN_WEATHER = (
    whole({"tool_calls": [call(None, "clock", ""), call(None, "weather", '{"c":1}')]}, "tool_calls"),
    calls_stream([fragment(0, name="clock", arguments="")], [fragment(0, name="weather", arguments='{"c":1}')]),
)
ONE_ID_CLOCK_THEN_WEATHER = (
    whole({"tool_calls": [call("call_a", "clock", ""), call("call_a", "weather", '{"c":1}')]}, "tool_calls"),
    calls_stream([fragment(0, "call_a", "clock", "")], [fragment(0, "call_a", "weather", '{"c":1}')]),
)
WEATHER_TWICE = (  # the same shape, one function called twice in parallel
    whole({"tool_calls": [call(None, "weather", '{"c":1}'), call(None, "weather", '{"c":2}')]}, "tool_calls"),
    calls_stream(
        [fragment(0, name="weather", arguments='{"c":1}')], [fragment(0, name="weather", arguments='{"c":2}')]
    ),
)
REPEATING_PIECES = (  # "ha", "ha": "haha"
    whole({"tool_calls": [call("call_a", "haha", '{"c":1}')]}, "tool_calls"),
    calls_stream(
        [fragment(0, "call_a", "ha", "")], [fragment(0, name="ha", arguments="")], [fragment(0, arguments='{"c":1}')]
    ),
)


@pytest.mark.parametrize(
    ("answers", "calls"),
    [
        (CLOCK_THEN_DATE, [("clock", ""), ("date", "")]),
        (CLOCK_THEN_WEATHER, [("clock", ""), ("weather", '{"c":1}')]),
        (ONE_ID_CLOCK_THEN_WEATHER, [("clock", ""), ("weather", '{"c":1}')]),
        (WEATHER_TWICE, [("weather", '{"c":1}'), ("weather", '{"c":2}')]),
        (REPEATING_PIECES, [("haha", '{"c":1}')]),
        (SPLIT_NAME, [("weather", '{"c": 1}')]),
        (NAME_SECOND, [("weather", '{"c": 1}')]),
        (NEW_NAME_AT_ONE_INDEX, [("a", '{"x": 1}'), ("b", '{"y": 2}')]),
        (NAME_IN_EVERY_FRAGMENT, [("weather", '{"c": 1}')]),
        (NO_ARGUMENTS, [("clock", ""), ("weather", "{}")]),
    ],
    ids=[
        "clock then date",
        "clock then weather",
        "one id",
        "weather twice",
        "repeating pieces",
        "name in pieces",
        "name second",
        "new name at one index",
        "vllm",
        "no arguments",
    ],
)
async def test_a_streams_tool_calls_are_the_whole_answers_by_the_requests_tools(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, answers: tuple[dict[str, Any], ...], calls: list[Any]
) -> None:
    """A call without arguments, then another at its index (an OpenRouter engine's whole calls at index 0), streamed
    as one ("clockdate"); a name's pieces that repeat it so far ("ha", "ha") as the name once. The request's tools
    tell a held call's name's next piece from another call's name."""
    answer, assembled, chunks = await both(stub, primary, *answers, tools=TOOLS)

    assert listed(answer) == listed(assembled) == calls
    assert all(c.id for c in assembled.message.tool_calls)
    assert len({c.id for c in assembled.message.tool_calls}) == len(calls)
    assert first_fragments_alone_name_their_calls(chunks)


async def test_a_legacy_function_call_is_a_tool_call(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    """The functions API's answer, before tools (`function_call`; finish reason "function_call"): it ended with
    TOOL_CALLS and no call to make, streamed or whole."""
    legacy = {"name": "weather", "arguments": '{"c": 1}'}
    stream = streamed(
        event({"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": ""}}),
        event({"function_call": {"arguments": '{"c": '}}),
        event({"function_call": {"arguments": "1}"}}),
        event({}, "function_call"),
    )

    answer, assembled, chunks = await both(
        stub, primary, whole({"content": None, "function_call": legacy}, "stop"), stream
    )

    assert listed(answer) == listed(assembled) == [("weather", '{"c": 1}')]
    assert all(c.id.startswith("call_") for c in [*answer.message.tool_calls, *assembled.message.tool_calls])
    assert answer.finish_reason == assembled.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert first_fragments_alone_name_their_calls(chunks)


@pytest.mark.parametrize("said", ["tool_calls", "function_call"])
async def test_an_answer_said_to_call_tools_that_calls_none_is_stop(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, said: str
) -> None:
    """A server whose parse of the model's calls found none still said "tool_calls": the caller was told TOOL_CALLS,
    which the contract keeps for an answer that calls tools, and an agent ran no tool and asked again."""
    stream = streamed(event({"role": "assistant", "content": "no call"}), event({}, said), event() | {"usage": USAGE})

    answer, assembled, _ = await both(stub, primary, whole({"content": "no call"}, said), stream)

    assert answer.message.content == assembled.message.content == "no call"
    assert not answer.message.tool_calls and not assembled.message.tool_calls
    assert answer.finish_reason == assembled.finish_reason == pb.FINISH_REASON_STOP


async def test_reasoning_in_a_field_and_in_thinking_parts_is_both(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Mistral's parts beside a `reasoning_content` field: a stream gave both, Complete the field's alone."""
    thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]
    unary = whole({"reasoning_content": "R", "content": [*thinking, {"type": "text", "text": "x"}]}, "stop")
    stream = streamed(
        event({"reasoning_content": "R", "content": thinking}), event({"content": "x"}), event({}, "stop")
    )

    answer, assembled, _ = await both(stub, primary, unary, stream)

    assert (answer.message.reasoning, answer.message.content) == ("Rhmm", "x")
    assert (assembled.message.reasoning, assembled.message.content) == ("Rhmm", "x")


async def test_a_streams_model_is_the_first_its_events_name(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """A server (a router in front of several) that names another model mid-way: each was relayed as it came, against
    the contract's one model a stream, and the ledger billed the last."""
    primary.inject(
        streamed(
            event({"content": "a"}, model="gpt-test-1"),
            event({"content": "b"}, model="gpt-test-2"),
            event({}, "stop", model="gpt-test-3"),
            event(model="gpt-test-4") | {"usage": USAGE},
        )
    )

    chunks = await read_all(stub.StreamComplete(stream_chat("which model"), timeout=5))

    assert "".join(c.delta.content for c in chunks) == "ab"
    assert {c.model for c in chunks} == {"gpt-test-1"}
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert [(r.backend, r.model, r.total_tokens) for r in records] == [("openai", "gpt-test-1", 12)]


def one_backend(primary: FakeUpstream) -> str:
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
  order: [openai]
{FAST_ROUTER}"""


REJECTED = (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED", 1)
RATE_LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 2)


@pytest.mark.parametrize("streamed_", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("error", "said", "failed_as"),
    [
        ({"type": "invalid_request_error", "code": "400"}, "(HTTP 400)", REJECTED),
        ({"type": "invalid_request_error", "code": 400}, "(HTTP 400)", REJECTED),
        ({"type": "invalid_request_error", "code": "429"}, "(HTTP 429)", RATE_LIMITED),
        ({"type": "invalid_request_error", "code": 429}, "(HTTP 429)", RATE_LIMITED),
        ({"type": "invalid_request_error", "code": "invalid_value"}, None, REJECTED),
        ({"type": "requests", "code": "rate_limit_exceeded"}, None, RATE_LIMITED),
        ({"type": "rate_limit_error"}, None, RATE_LIMITED),
    ],
    ids=["400 as text", "400", "429 as text", "429", "invalid request", "rate limit code", "rate limit type"],
)
async def test_an_error_in_a_200_is_the_status_its_code_gives_else_its_name_says(
    stub_for: StubFactory,
    primary: FakeUpstream,
    streamed_: bool,
    error: dict[str, Any],
    said: str | None,
    failed_as: tuple[grpc.StatusCode, str, int],
) -> None:
    """LiteLLM's proxy writes the status as text ("code": "400"): it was read as a code that names the error, the
    error as the server's own (a 500), retried, and the call failed UNAVAILABLE, as no 400 is. OpenAI's own errors
    name themselves (a code, a type), and proxies write Anthropic's types: without a status, each was the server's
    failure too, counted against the backend's circuit: a rate limit as if the server were down, and a request the
    upstream refused as if it could pass."""
    stub = await stub_for(one_backend(primary))
    body = {"error": {"message": "Invalid value", "param": None, **error}}
    fault = streamed(event({"role": "assistant", "content": ""}), body) if streamed_ else {"body": json.dumps(body)}
    primary.inject(fault, fault)

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        if streamed_:
            await read_all(stub.StreamComplete(stream_chat(), timeout=5))
        else:
            await stub.Complete(chat(), timeout=5)

    status, reason, calls = failed_as
    assert (failed.value.code(), details(failed.value)["ErrorInfo"].reason) == (status, reason)
    told = failed.value.details() or ""
    assert "Invalid value" in told and (said in told if said else "HTTP" not in told)
    assert len(primary.chat_requests) == calls
