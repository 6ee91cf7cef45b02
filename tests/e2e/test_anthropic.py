"""The anthropic backend end to end: what the Messages API gets for each part of the contract, what comes back, and
fallback across the two dialects. The cases both dialects share (unary, streaming, the fault matrix, deadlines,
cancellation, restarts) run against it by parametrization in test_gateway, test_faults and test_recovery."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from fractions import Fraction
from typing import Any

import grpc
import pytest
from anthropic_upstream import FakeAnthropic
from llmrelay import StreamAssembler
from llmrelay import v1 as pb
from llmrelay_server.backends import anthropic as anthropic_backend
from support import (
    ANTHROPIC_TEST_KEY,
    OPENAI_TEST_KEY,
    GatewayFactory,
    StubFactory,
    chat,
    details,
    png,
    stream_chat,
    tool,
    user,
)
from upstream import FakeUpstream

# Integers a Struct would make doubles, and one no double holds: the schema must reach Anthropic as written.
SCHEMA_TEXT = (
    '{"type": "object", "properties": {"n": {"type": "integer", "maximum": 1152921504606846977, "minimum": 3}}}'
)
WEATHER = tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}}, description="today's weather")
OSLO = {"name": "weather", "arguments": '{"city": "Oslo"}'}


@pytest.fixture
async def stub(stub_for: StubFactory, claude: FakeAnthropic, local: FakeUpstream) -> pb.LLMServiceAsyncStub:
    """Anthropic first (the anthropic section, as with ANTHROPIC_API_KEY), Ollama as fallback."""
    return await stub_for(anthropic_first(claude, local))


def anthropic_first(claude: FakeAnthropic, local: FakeUpstream, extra: str = "") -> str:
    return f"""
llm:
  anthropic: {{api_key: "{ANTHROPIC_TEST_KEY}", base_url: "{claude.base_url}", model: claude-test{extra}}}
  ollama: {{base_url: "{local.base_url}", model: tiny}}
router:
  retry: {{max_retries: 1, initial_backoff_s: 0.01, max_backoff_s: 0.02}}
"""


def both(primary: FakeUpstream, claude: FakeAnthropic, order: str) -> str:
    """OpenAI and Anthropic, in `order`."""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test}}
  anthropic: {{api_key: "{ANTHROPIC_TEST_KEY}", base_url: "{claude.base_url}", model: claude-test}}
  order: [{order}]
router:
  retry: {{max_retries: 1, initial_backoff_s: 0.01, max_backoff_s: 0.02}}
"""


async def streamed(stub: pb.LLMServiceAsyncStub, request: pb.StreamCompleteRequest) -> list[pb.StreamCompleteResponse]:
    return [c async for c in stub.StreamComplete(request, timeout=5)]


async def test_every_part_of_the_request_reaches_the_messages_api(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    conversation = [
        pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
        user("first"),
        user("second"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="ok"),
        pb.Message(role=pb.ROLE_SYSTEM, content="and kind"),
        user("third"),
    ]
    options = pb.CompletionOptions(
        temperature=0.5,
        top_p=0.5,
        seed=7,
        presence_penalty=0.1,
        max_tokens=64,
        stop=["END"],
        tools=[pb.Tool(function=pb.FunctionDefinition(name="count", description="d", parameters_json=SCHEMA_TEXT))],
        tool_choice=pb.ToolChoice(function_name="count"),
        parallel_tool_calls=False,
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="n", schema_json=SCHEMA_TEXT)
        ),
        reasoning_effort=pb.REASONING_EFFORT_HIGH,
    )
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation, options=options), timeout=5)
    assert (answer.backend, answer.model, answer.message.content) == ("anthropic", "claude-test", "echo: third")

    (sent,) = claude.chat_requests
    assert sent["system"] == [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "third"}]},
    ]
    schema = json.loads(SCHEMA_TEXT)
    assert sent["tools"] == [{"name": "count", "description": "d", "input_schema": schema}]
    assert sent["tools"][0]["input_schema"]["properties"]["n"]["maximum"] == 2**60 + 1
    assert sent["tool_choice"] == {"type": "tool", "name": "count", "disable_parallel_tool_use": True}
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert (sent["max_tokens"], sent["stop_sequences"]) == (64, ["END"])
    # No sampling parameters in this API version, and no thinking with a forced tool call.
    assert not {"temperature", "top_p", "seed", "presence_penalty", "thinking"} & set(sent)
    headers = claude.chat_headers[0]
    assert headers["authorization"] == f"Bearer {ANTHROPIC_TEST_KEY}" and headers["anthropic-version"]
    assert claude.invalid_requests == []

    claude.reset()
    await stub.Complete(chat("bare"), timeout=5)
    assert claude.chat_requests[0] == {
        "model": "claude-test",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "bare"}]}],
        "max_tokens": 4096,
    }


async def test_the_backends_max_tokens_is_the_default(
    stub_for: StubFactory, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    stub = await stub_for(anthropic_first(claude, local, extra=", max_tokens: 100"))
    await stub.Complete(chat(), timeout=5)
    await stub.Complete(chat(options=pb.CompletionOptions(max_tokens=7)), timeout=5)
    assert [r["max_tokens"] for r in claude.chat_requests] == [100, 7]


@pytest.mark.parametrize(
    ("mode", "sent"),
    [
        (pb.TOOL_CHOICE_MODE_AUTO, {"type": "auto"}),
        (pb.TOOL_CHOICE_MODE_NONE, {"type": "none"}),
        (pb.TOOL_CHOICE_MODE_REQUIRED, {"type": "any"}),
    ],
)
async def test_tool_choice_modes(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, mode: pb.ToolChoiceMode.ValueType, sent: dict[str, Any]
) -> None:
    options = pb.CompletionOptions(tools=[WEATHER], tool_choice=pb.ToolChoice(mode=mode))
    await stub.Complete(chat(options=options), timeout=5)
    assert claude.chat_requests[0]["tool_choice"] == sent


@pytest.mark.parametrize("streamed_as", [{}, {"input_at_start": True}], ids=["deltas", "whole at its start"])
async def test_tool_call_arguments_keep_integers_beyond_64_bits(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, streamed_as: dict[str, bool]
) -> None:
    # A tool_use block's input is an object, written back as text: read as floats, these would come back changed.
    arguments = {"account": 123456789012345678901234567890, "floor": -9223372036854775809, "city": "Oslo"}
    call = {"name": "weather", "arguments": json.dumps(arguments)}
    claude.inject({"tool_call": call})
    answer = await stub.Complete(chat("weather?", options=pb.CompletionOptions(tools=[WEATHER])), timeout=5)
    assert json.loads(answer.message.tool_calls[0].function.arguments) == arguments
    claude.inject({"tool_call": call, **streamed_as})
    chunks = await streamed(stub, stream_chat("weather?", options=pb.CompletionOptions(tools=[WEATHER])))
    assert json.loads("".join(d.arguments for c in chunks for d in c.delta.tool_calls)) == arguments


async def test_tool_calls_round_trip(stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic) -> None:
    claude.inject({"tool_call": OSLO})
    answer = await stub.Complete(chat("weather in Oslo?", options=pb.CompletionOptions(tools=[WEATHER])), timeout=5)
    assert answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call = answer.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_1",
        "weather",
        {"city": "Oslo"},
    )

    claude.inject({"tool_call": OSLO})
    chunks = await streamed(stub, stream_chat("weather in Oslo?", options=pb.CompletionOptions(tools=[WEATHER])))
    fragments = [d for c in chunks for d in c.delta.tool_calls]
    assert (fragments[0].id, fragments[0].name, fragments[0].index) == ("toolu_1", "weather", 0)
    assert "".join(d.arguments for d in fragments) == call.function.arguments, "the stream says what Complete says"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS

    conversation = [
        user("weather in Oslo?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id="toolu_1"),
        user("and tomorrow?"),
    ]
    await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    assert claude.chat_requests[-1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    assert claude.invalid_requests == []


async def test_tool_call_ids_of_other_upstreams_reach_the_api_in_its_pattern(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """Kimi's ids ("functions.weather:0") and the like, which the OpenAI format takes, are refused by the API (400,
    no fallback) in a conversation carried over to Claude: each call and the result that answers it get the same id
    in the API's pattern, and two ids that differ only in characters outside it stay two."""
    ids = ["functions.weather:0", "functions.weather|0"]
    calls = [pb.ToolCall(id=i, function=pb.FunctionCall(name="weather", arguments=OSLO["arguments"])) for i in ids]
    conversation = [
        user("weather in Oslo?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls),
        *(pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id=i) for i in ids),
    ]
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    chunks = await streamed(stub, pb.StreamCompleteRequest(messages=conversation))
    await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=conversation), timeout=5)

    assert (answer.backend, chunks[-1].backend) == ("anthropic", "anthropic")
    assert claude.invalid_requests == []
    for sent in [*claude.chat_requests, *claude.count_requests]:
        uses = [block["id"] for block in sent["messages"][1]["content"]]
        results = [block["tool_use_id"] for block in sent["messages"][2]["content"]]
        assert uses == results and len(set(uses)) == 2
        assert all(tool_id.startswith("functions_weather_0_") for tool_id in uses)


async def test_a_tool_call_id_used_again_in_a_later_turn_reaches_the_api_once(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """The OpenAI format takes an id again in a later turn (a model's "call_0" in every turn); the API refuses a
    request with any id twice (400, no fallback): the later call, and the result that answers it, get another."""
    conversation = []
    for city in ("Oslo", "Rome", "Lima"):
        call = pb.ToolCall(id="call_0", function=pb.FunctionCall(name="weather", arguments=f'{{"city":"{city}"}}'))
        conversation += [
            user(f"weather in {city}?"),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id="call_0"),
        ]
    conversation.append(user("and tomorrow?"))
    await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    await streamed(stub, pb.StreamCompleteRequest(messages=conversation))
    await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=conversation), timeout=5)

    assert claude.invalid_requests == []
    for sent in [*claude.chat_requests, *claude.count_requests]:
        uses = [block["id"] for turn in sent["messages"] for block in turn["content"] if block["type"] == "tool_use"]
        results = [b["tool_use_id"] for turn in sent["messages"] for b in turn["content"] if b["type"] == "tool_result"]
        assert uses == results == ["call_0", "call_0_2", "call_0_3"]


async def test_a_call_without_arguments_streams_an_empty_object(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    claude.inject({"tool_call": {"name": "now", "arguments": "{}"}})
    chunks = await streamed(stub, stream_chat("time?", options=pb.CompletionOptions(tools=[tool("now")])))
    assert "".join(d.arguments for c in chunks for d in c.delta.tool_calls) == "{}"
    assert claude.chat_requests[0]["tools"] == [{"name": "now", "input_schema": {"type": "object"}}]


def sse(*events: dict[str, Any]) -> dict[str, Any]:
    """A fault that answers with these events, as the API writes them."""
    body = "".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events)
    return {"body": body, "content_type": "text/event-stream"}


async def test_events_whose_data_take_several_lines_are_read_whole(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """SSE joins an event's `data:` lines with line breaks: JSON written indented, a line each, is one event."""
    message = {"id": "msg_1", "model": "claude-test", "usage": {"input_tokens": 5, "output_tokens": 1}}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]
    lines = ("\n".join(f"data: {line}" for line in json.dumps(event, indent=1).split("\n")) for event in events)
    body = "".join(f"event: {event['type']}\n{data}\n\n" for event, data in zip(events, lines, strict=True))
    claude.inject({"body": body, "content_type": "text/event-stream"})
    chunks = await streamed(stub, stream_chat())
    assert "".join(chunk.delta.content for chunk in chunks) == "Hello world"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 2)


@pytest.mark.parametrize("stops", [0, 1, 2])
async def test_a_streamed_call_has_its_start_input_once_however_often_its_block_stops(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream, stops: int
) -> None:
    # A server that sends a call's input whole in its content_block_start, as the SDK reads it, and repeats its stop,
    # or ends the message without it.
    message = {"id": "msg_1", "model": "claude-test", "usage": {"input_tokens": 5, "output_tokens": 1}}
    block = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}
    claude.inject(
        sse(
            {"type": "message_start", "message": message},
            {"type": "content_block_start", "index": 0, "content_block": block},
            *[{"type": "content_block_stop", "index": 0}] * stops,
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
            {"type": "message_stop"},
        )
    )
    assembler = StreamAssembler()
    chunks = await streamed(stub, stream_chat("weather?", options=pb.CompletionOptions(tools=[WEATHER])))
    for chunk in chunks:
        assembler.add(chunk)
    answer = assembler.result()
    assert [(c.id, c.function.name, c.function.arguments) for c in answer.message.tool_calls] == [
        ("toolu_1", "weather", '{"city": "Oslo"}')
    ]
    # The last message is the end alone, as the contract has it: a call's arguments came before it, where its block
    # stopped or not (they came with it when the stream ended before the block's stop).
    assert not chunks[-1].delta.tool_calls and chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (answer.backend, answer.usage.completion_tokens) == ("anthropic", 9) and local.chat_requests == []


@pytest.mark.usefixtures("python_recursion_limit")  # in-process, the gateway runs with the test's limit
async def test_tool_arguments_nested_beyond_writing_are_a_malformed_answer(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    # Within the 1,024 levels the JSON reader takes, beyond what Python's writer does: the next backend answers,
    # where a RecursionError made the call fail with UNKNOWN.
    deep = "[" * 1000 + "]" * 1000
    block = f'{{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {{"a": {deep}}}}}'
    body = f'{{"id": "msg_1", "model": "claude-test", "content": [{block}], "stop_reason": "tool_use"}}'
    claude.inject({"body": body})
    answer = await stub.Complete(chat("weather?", options=pb.CompletionOptions(tools=[WEATHER])), timeout=5)
    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        ("anthropic", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert "nested too deeply" in answer.attempts[0].error and len(local.chat_requests) == 1


@pytest.mark.parametrize(
    ("parameters_json", "sent"),
    [
        ("{}", '{"type": "object"}'),
        (
            ' { "properties": {"n": {"type": "integer", "maximum": 3}}}',
            ' {"type": "object",  "properties": {"n": {"type": "integer", "maximum": 3}}}',
        ),
    ],
)
async def test_a_tool_schema_without_a_type_is_sent_as_the_object_schema_it_is(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, parameters_json: str, sent: str
) -> None:
    """The OpenAI format takes parameters without a top-level type ({} for a function without any), and the gateway
    takes them as an object's; the API refuses such an input_schema (400 "input_schema.type: Field required"), which
    would end the call with UPSTREAM_REJECTED and no fallback. The text goes as written, with the type put first."""
    tools = [pb.Tool(function=pb.FunctionDefinition(name="count", parameters_json=parameters_json))]

    answer = await stub.Complete(chat(options=pb.CompletionOptions(tools=tools)), timeout=5)
    count = await stub.CountTokens(pb.CountTokensRequest(messages=[user()], tools=tools), timeout=5)

    assert answer.backend == "anthropic" and claude.invalid_requests == []
    assert f'"input_schema":{sent}'.encode() in claude.chat_bodies[0]
    assert (count.encoding, count.estimated) == ("backend:anthropic", False)
    assert claude.count_requests[0]["tools"][0]["input_schema"] == json.loads(sent)


async def test_tool_arguments_that_are_no_json_object_are_the_callers_error(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    call = pb.ToolCall(id="c1", function=pb.FunctionCall(name="f", arguments="[1, 2]"))
    answered = pb.Message(role=pb.ROLE_TOOL, content="3", tool_call_id="c1")
    conversation = [user("x"), pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]), answered, user("y")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(messages=conversation, model="claude-test", exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].tool_calls[0].function.arguments" in str(caught.value.details())
    assert claude.chat_requests == []


async def test_reasoning_and_its_signature_round_trip(stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic) -> None:
    options = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_LOW)
    claude.inject({"reasoning": "let me think", "signature": "sig-abc"})
    answer = await stub.Complete(chat("why?", options=options), timeout=5)
    sent = claude.chat_requests[0]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096, "display": "summarized"}
    assert sent["max_tokens"] == 4096 + 4096, "the answer keeps its default room beside the budget"
    assert (answer.message.reasoning, answer.message.reasoning_signature) == ("let me think", "sig-abc")
    assert answer.message.content == "echo: why?" and answer.usage.reasoning_tokens == 3

    conversation = [user("why?"), answer.message, user("and then?")]
    await stub.Complete(pb.CompleteRequest(messages=conversation, options=options), timeout=5)
    assert claude.chat_requests[-1]["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "let me think", "signature": "sig-abc"},
        {"type": "text", "text": "echo: why?"},
    ]

    claude.inject({"reasoning": "let me think", "signature": "sig-streamed"})
    chunks = await streamed(stub, stream_chat("why?", options=options))
    assert "".join(c.delta.reasoning for c in chunks) == "let me think"
    assert "".join(c.delta.content for c in chunks) == "echo: why?"
    # The signature comes with the last message, and the SDK's collector keeps it for the next turn.
    assert [c.delta.reasoning_signature for c in chunks if c.delta.HasField("reasoning_signature")] == ["sig-streamed"]
    assert chunks[-1].delta.reasoning_signature == "sig-streamed"
    assembler = StreamAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.result().message.reasoning_signature == "sig-streamed"
    assert claude.invalid_requests == []


def answered(*blocks: dict[str, Any], usage: dict[str, int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Faults that answer with these content blocks (and this usage): whole (for Complete), and as the events of a
    stream of them (for StreamComplete), each thinking block opened unsigned and signed by its signature_delta, as the
    API does."""
    usage = usage or {"input_tokens": 10, "output_tokens": 5}
    whole = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": list(blocks),
        "stop_reason": "end_turn",
        "usage": usage,
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": {**whole, "content": [], "usage": usage}}]
    for index, block in enumerate(blocks):
        if block["type"] == "thinking":
            opened = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        elif block["type"] == "redacted_thinking":
            opened, deltas = block, []  # whole at its start, as the API sends it
        else:
            opened, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
        events.append({"type": "content_block_start", "index": index, "content_block": opened})
        events += [{"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas]
        events.append({"type": "content_block_stop", "index": index})
    events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}})
    events.append({"type": "message_stop"})
    return {"body": json.dumps(whole), "content_type": "application/json"}, sse(*events)


@pytest.mark.parametrize(
    "thinking",
    [
        [{"type": "thinking", "thinking": "deep", "signature": ""}],
        [
            {"type": "thinking", "thinking": "one ", "signature": "S1"},
            {"type": "thinking", "thinking": "two", "signature": ""},
        ],
        [
            {"type": "thinking", "thinking": "seen", "signature": "S1"},
            {"type": "redacted_thinking", "data": "EncryptedBytes"},
        ],
    ],
    ids=["one-unsigned-block", "two-blocks-one-signed", "signed-block-and-redacted-block"],
)
async def test_thinking_not_signed_as_one_block_has_no_signature_in_either_call(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, thinking: list[dict[str, Any]]
) -> None:
    """A compatible server may leave a thinking block's signature empty: an answer has a signature only when it has
    one thinking block and that block is signed, in Complete and StreamComplete alike (the same answer must go back
    the same way in the next turn, whichever call brought it). A redacted block, which the contract cannot carry, is
    one unsigned: the API takes the latest turn's thinking back only whole."""
    whole, events = answered(*thinking, {"type": "text", "text": "ans"})
    claude.inject(whole, events)
    answer = (await stub.Complete(chat(), timeout=5)).message
    assembler = StreamAssembler()
    for chunk in await streamed(stub, stream_chat()):
        assembler.add(chunk)
    assembled = assembler.result().message
    reasoning = "".join(block.get("thinking", "") for block in thinking)
    assert (answer.reasoning, answer.content) == (assembled.reasoning, assembled.content) == (reasoning, "ans")
    assert not answer.HasField("reasoning_signature")
    assert not assembled.HasField("reasoning_signature")


async def test_a_tool_cycle_begun_without_thinking_ends_without_it(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """A tool-use cycle that another upstream began (its reasoning unsigned, which cannot be sent back): the API
    refuses thinking within it (400, no fallback), so the reasoning effort waits for the next user turn."""
    options = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_HIGH, tools=[WEATHER])
    call = pb.ToolCall(id="call_1", function=pb.FunctionCall(**OSLO))
    began = pb.Message(role=pb.ROLE_ASSISTANT, reasoning="openai thought", tool_calls=[call])
    cycle = [user("weather in Oslo?"), began, pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny")]

    answer = await stub.Complete(pb.CompleteRequest(messages=cycle, options=options), timeout=5)
    chunks = await streamed(stub, pb.StreamCompleteRequest(messages=cycle, options=options))
    await stub.Complete(pb.CompleteRequest(messages=[*cycle, answer.message, user("and tomorrow?")], options=options))

    assert (answer.backend, chunks[-1].backend) == ("anthropic", "anthropic")
    assert claude.invalid_requests == []
    assert ["thinking" in sent for sent in claude.chat_requests] == [False, False, True]


async def test_a_prefill_with_trailing_whitespace_and_reasoning_is_answered(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """A chat that ends in the assistant's words ends in whitespace as often as not ("Say: "), and may ask for
    reasoning: the API refuses both with a prefill (400, no fallback, INVALID_ARGUMENT to a caller who made no
    mistake by the contract)."""
    options = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_HIGH)
    prefill = [user("name a colour"), pb.Message(role=pb.ROLE_ASSISTANT, content="The colour is: ")]
    answer = await stub.Complete(pb.CompleteRequest(messages=prefill, options=options), timeout=5)
    chunks = await streamed(stub, pb.StreamCompleteRequest(messages=prefill, options=options))
    assert (answer.backend, chunks[-1].backend) == ("anthropic", "anthropic")
    assert claude.invalid_requests == []
    assert [sent["messages"][-1]["content"][-1]["text"] for sent in claude.chat_requests] == ["The colour is:"] * 2


@pytest.mark.parametrize(
    ("max_tokens", "effort", "thinking"),
    [
        (2000, pb.REASONING_EFFORT_HIGH, {"type": "enabled", "budget_tokens": 1999, "display": "summarized"}),
        (1024, pb.REASONING_EFFORT_MINIMAL, None),
        (None, pb.REASONING_EFFORT_NONE, {"type": "disabled"}),
    ],
    ids=["within the callers max_tokens", "no room for the minimum budget", "none"],
)
async def test_the_thinking_budget_fits_the_callers_max_tokens(
    stub: pb.LLMServiceAsyncStub,
    claude: FakeAnthropic,
    max_tokens: int | None,
    effort: pb.ReasoningEffort.ValueType,
    thinking: dict[str, Any] | None,
) -> None:
    await stub.Complete(chat(options=pb.CompletionOptions(max_tokens=max_tokens, reasoning_effort=effort)), timeout=5)
    sent = claude.chat_requests[0]
    assert sent.get("thinking") == thinking
    assert sent["max_tokens"] == (max_tokens or 4096)


async def test_a_model_that_takes_no_budget_gets_adaptive_thinking(
    stub_for: StubFactory, claude: FakeAnthropic, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claude, "adaptive_models", ("claude-test-mini",))
    stub = await stub_for(anthropic_first(claude, local))  # its first probe reads the models' capabilities
    options = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_MEDIUM)
    await stub.Complete(chat(model="claude-test-mini", options=options), timeout=5)
    await stub.Complete(chat(model="claude-test", options=options), timeout=5)
    adaptive, budget = claude.chat_requests
    assert (adaptive["thinking"], adaptive["output_config"], adaptive["max_tokens"]) == (
        {"type": "adaptive", "display": "summarized"},
        {"effort": "medium"},
        4096 + 8192,  # the answer's default room, and as much for the thinking as a budget would have had
    )
    assert budget["thinking"] == {"type": "enabled", "budget_tokens": 8192, "display": "summarized"}


async def test_images_reach_the_messages_api_as_image_blocks(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    image = png(2, 2)
    parts = [
        pb.ContentPart(text="what is this?"),
        pb.ContentPart(image=pb.ImagePart(url="https://example.com/cat.png", detail=pb.IMAGE_DETAIL_HIGH)),
        pb.ContentPart(image=pb.ImagePart(data=image, media_type="image/png")),
    ]
    answer = await stub.Complete(pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=parts)]), timeout=5)
    assert answer.backend == "anthropic"
    assert claude.chat_requests[0]["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()},
        },
    ]
    assert claude.invalid_requests == []


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", pb.FINISH_REASON_STOP),
        ("stop_sequence", pb.FINISH_REASON_STOP),
        ("max_tokens", pb.FINISH_REASON_LENGTH),
        ("model_context_window_exceeded", pb.FINISH_REASON_LENGTH),
        ("refusal", pb.FINISH_REASON_CONTENT_FILTER),
        ("pause_turn", pb.FINISH_REASON_UNSPECIFIED),
        # Said with no tool_use block: the contract's TOOL_CALLS is an answer that calls a tool, which an agent runs.
        ("tool_use", pb.FINISH_REASON_STOP),
    ],
)
async def test_stop_reasons_become_finish_reasons(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, stop_reason: str, finish: pb.FinishReason.ValueType
) -> None:
    claude.inject({"stop_reason": stop_reason}, {"stop_reason": stop_reason})
    assert (await stub.Complete(chat(), timeout=5)).finish_reason == finish
    assert (await streamed(stub, stream_chat()))[-1].finish_reason == finish


async def test_cache_writes_and_reads_count_as_prompt_tokens(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    claude.inject({}, {"cache": {"creation": 5, "read": 7}}, {"cache": {"creation": 5, "read": 7}})
    plain = (await stub.Complete(chat("same prompt"), timeout=5)).usage
    cached = (await stub.Complete(chat("same prompt"), timeout=5)).usage
    final = (await streamed(stub, stream_chat("same prompt")))[-1].usage
    assert not plain.HasField("cached_prompt_tokens")
    assert cached.prompt_tokens == plain.prompt_tokens + 5 + 7
    assert cached.cached_prompt_tokens == 7 and not cached.estimated
    assert (final.prompt_tokens, final.cached_prompt_tokens, final.completion_tokens) == (
        cached.prompt_tokens,
        7,
        cached.completion_tokens,
    )


async def test_cache_writes_are_billed_at_their_own_rate(
    stub_for: StubFactory, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    """Anthropic bills the tokens written to its cache above its input rate, and those read from it below: each part
    of the prompt at its own price, and the writes reported apart."""
    price = "{prompt: 3, completion: 15, cached_prompt: 0.3, cache_write_prompt: 3.75}"
    stub = await stub_for(anthropic_first(claude, local) + f'pricing: {{"claude-test": {price}}}\n')
    claude.inject({"cache": {"creation": 5, "read": 7}}, {"cache": {"creation": 5, "read": 7}})
    answered = (await stub.Complete(chat("same prompt"), timeout=5)).usage
    final = (await streamed(stub, stream_chat("same prompt")))[-1].usage
    for usage in (answered, final):
        assert (usage.cached_prompt_tokens, usage.cache_write_prompt_tokens) == (7, 5)
        fresh = usage.prompt_tokens - 5 - 7
        micros = fresh * Fraction(3) + 5 * Fraction("3.75") + 7 * Fraction("0.3") + usage.completion_tokens * 15
        assert usage.cost.usd_micros == math.ceil(micros) and not usage.cost.estimated


async def test_an_answer_with_its_input_tokens_alone_bills_them_and_counts_its_output(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """An answer whose usage has the prompt's counts but no output_tokens is billed the prompt as reported (its cache
    reads and writes among them, which the gateway's own count of the text cannot know), its answer counted, as a
    stream's is: not the whole of it estimated."""
    usage = {"input_tokens": 1000, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7}
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": "one two three"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }
    claude.inject({"body": json.dumps(answer), "content_type": "application/json"})
    billed = (await stub.Complete(chat("hi"), timeout=5)).usage
    assert (billed.prompt_tokens, billed.cached_prompt_tokens) == (1012, 7)
    assert 0 < billed.completion_tokens < 10 and billed.estimated


async def test_a_whole_answer_to_a_stream_bills_the_prompt_the_api_reported_as_complete_does(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """An upstream that answers a stream request with the whole JSON answer (ignoring `stream: true`), its usage
    without output_tokens: the stream is billed the prompt the API reported (its cache reads among them), its answer
    counted, as Complete bills the same answer; not the gateway's own count of the prompt's text."""
    whole, _ = answered(
        {"type": "text", "text": "hi there"}, usage={"input_tokens": 5000, "cache_read_input_tokens": 20000}
    )
    claude.inject(whole, whole)
    unary = (await stub.Complete(chat("hi"), timeout=5)).usage
    chunks = await streamed(stub, stream_chat("hi"))
    assert "".join(chunk.delta.content for chunk in chunks) == "hi there"
    assert (unary.prompt_tokens, unary.cached_prompt_tokens, unary.estimated) == (25000, 20000, True)
    assert chunks[-1].usage == unary
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.requests, record.prompt_tokens) == (2, 2 * 25000)


async def test_an_error_event_mid_stream_reports_no_upstream_status_as_none_was_sent(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """The stream's answer was a 200: an error event names only its type. It was reported as the status its type
    comes with (429 for rate_limit_error), which no upstream sent, where the OpenAI-compatible path reports none."""
    claude.inject({"error_event_after": 3, "error_type": "rate_limit_error"})
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await streamed(stub, stream_chat("one two three four five six"))
    assert cut.value.code() == grpc.StatusCode.ABORTED
    found = details(cut.value)
    assert (found["ErrorInfo"].reason, dict(found["ErrorInfo"].metadata)) == (
        "STREAM_INTERRUPTED",
        {"backend": "anthropic", "attempts": "anthropic:interrupted"},
    )
    [attempt] = found["AttemptHistory"].attempts
    assert not attempt.HasField("upstream_status") and "rate_limit_error" in attempt.error


async def test_a_cut_stream_bills_the_prompt_the_api_reported_with_its_cache(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """message_start reports the prompt's tokens, cache writes and reads among them, before the answer: a stream cut
    before message_delta is billed those for its prompt (not the gateway's own count of the text), its answer
    counted as far as it came."""
    cache = {"creation": 5, "read": 7}
    claude.inject({"stream_cut_after": 4, "cache": cache})  # message_start, a block's start and two of its deltas
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await streamed(stub, stream_chat("one two three four five six"))
    assert details(cut.value)["ErrorInfo"].reason == "STREAM_INTERRUPTED"
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.backend, record.interrupted_requests, record.estimated_requests) == ("anthropic", 1, 1)
    claude.inject({"cache": cache})
    whole = (await stub.Complete(chat("one two three four five six"), timeout=5)).usage
    assert record.prompt_tokens == whole.prompt_tokens
    assert 0 < record.completion_tokens < whole.completion_tokens


@pytest.mark.parametrize(
    ("start", "delta"),
    [
        ({"input_tokens": 4000, "cache_read_input_tokens": 0}, {"input_tokens": 0}),
        (
            {"input_tokens": 4, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4000},
            {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        ),
    ],
    ids=["input", "input-and-cache"],
)
async def test_a_message_delta_that_reports_a_prompt_of_0_bills_message_starts(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, start: dict[str, int], delta: dict[str, int]
) -> None:
    """Anthropic's counts are cumulative: a compatible server (SGLang) that writes 0 for the prompt's counts in
    message_delta, after message_start's real ones, has its prompt billed as message_start reported it, not as 0."""
    message = {"id": "msg_1", "model": "claude-test", "usage": {**start, "output_tokens": 1}}
    claude.inject(
        sse(
            {"type": "message_start", "message": message},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "answer"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {**delta, "output_tokens": 12}},
            {"type": "message_stop"},
        )
    )
    final = (await streamed(stub, stream_chat()))[-1].usage
    prompt, cached = sum(start.values()), start["cache_read_input_tokens"]
    assert (final.prompt_tokens, final.cached_prompt_tokens, final.completion_tokens) == (prompt, cached, 12)
    assert not final.estimated
    [record] = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, 12)


async def test_count_tokens_is_the_apis_own_count(stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic) -> None:
    conversation = [pb.Message(role=pb.ROLE_SYSTEM, content="you forecast"), user("weather in Oslo tomorrow?")]
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="anthropic/claude-test", messages=conversation, tools=[WEATHER]), timeout=5
    )
    options = pb.CompletionOptions(tools=[WEATHER])
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation, options=options), timeout=5)
    assert (count.encoding, count.estimated, count.model) == ("backend:anthropic", False, "claude-test")
    assert count.token_count == answer.usage.prompt_tokens
    (asked,) = claude.count_requests
    sent = claude.chat_requests[0]
    assert {key: asked[key] for key in ("model", "system", "messages", "tools")} == {
        key: sent[key] for key in ("model", "system", "messages", "tools")
    }
    assert claude.invalid_requests == []


async def test_count_tokens_is_estimated_when_the_api_cannot_count(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    # The API's words may quote the chat: the warning says how many there were, not what (server.log_content off).
    claude.count_faults.append({"status": 400, "message": "prompt rejected by policy: hello there"})
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="claude-test", messages=[user("hello there")]), timeout=5
    )
    assert count.estimated and count.encoding != "backend:anthropic" and count.token_count > 0
    assert len(claude.count_requests) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "could not count tokens" in r.getMessage()]
    assert "HTTP 400: [the upstream's words: " in warning and "hello there" not in warning, warning


async def test_count_tokens_is_estimated_when_the_api_counts_past_the_callers_deadline(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    # The gateway waits up to 5 s for a backend's count: a caller who cannot wait that long gets the estimate in time.
    claude.count_faults.append({"stall_s": 5})
    started = time.monotonic()
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="claude-test", messages=[user("hello there")]), timeout=1
    )
    assert count.estimated and count.encoding != "backend:anthropic" and count.token_count > 0
    assert time.monotonic() - started < 1
    assert len(claude.count_requests) == 1


async def test_count_tokens_is_estimated_when_the_api_answers_too_slowly_to_finish(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read came within the backend's 5 s (here 0.5 s), the answer whole not: a count a byte every 0.1 s held the
    caller to its own deadline, as the other backends' counts (bounded whole) do not."""
    monkeypatch.setattr(anthropic_backend, "HEALTH_TIMEOUT_S", 0.5)
    claude.count_faults.append({"body": '{"input_tokens": 12345}', "byte_trickle_s": 0.1})
    started = time.monotonic()
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="claude-test", messages=[user("hello there")]), timeout=10
    )
    assert count.estimated and count.encoding != "backend:anthropic" and count.token_count != 12345
    assert time.monotonic() - started < 1.5


async def test_openai_falls_back_to_anthropic_and_back(
    stub_for: StubFactory, primary: FakeUpstream, claude: FakeAnthropic
) -> None:
    stub = await stub_for(both(primary, claude, "openai, anthropic"))
    primary.inject({"status": 503}, {"status": 503}, {"drop": True}, {"drop": True})
    answer = await stub.Complete(chat("across dialects"), timeout=5)
    assert (answer.backend, answer.model, answer.message.content) == (
        "anthropic",
        "claude-test",
        "echo: across dialects",
    )
    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        ("openai", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("openai", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("anthropic", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    chunks = await streamed(stub, stream_chat("across dialects"))
    assert {c.backend for c in chunks} == {"anthropic"}
    assert "".join(c.delta.content for c in chunks) == "echo: across dialects"

    stub = await stub_for(both(primary, claude, "anthropic, openai"))
    claude.inject({"status": 529}, {"status": 529}, {"error_event_after": 0}, {"error_event_after": 0})
    answer = await stub.Complete(chat("and back"), timeout=5)
    assert (answer.backend, answer.model, answer.message.content) == ("openai", "gpt-test", "echo: and back")
    assert [(a.backend, a.upstream_status) for a in answer.attempts[:2]] == [("anthropic", 529), ("anthropic", 529)]
    chunks = await streamed(stub, stream_chat("and back"))
    assert {c.backend for c in chunks} == {"openai"}
    assert [a.outcome for a in chunks[-1].attempts] == [
        pb.ATTEMPT_OUTCOME_SERVER_ERROR,
        pb.ATTEMPT_OUTCOME_SERVER_ERROR,
        pb.ATTEMPT_OUTCOME_SUCCEEDED,
    ]


async def test_a_caller_leaving_mid_stream_closes_the_upstream_connection(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    claude.inject({"trickle_s": 0.1})
    call = stub.StreamComplete(stream_chat("one two three four five six seven eight"), timeout=10)
    first = await call.read()
    assert isinstance(first, pb.StreamCompleteResponse) and first.backend == "anthropic"
    cancelled_at = time.monotonic()
    call.cancel()
    for _ in range(100):  # the upstream notices at its next write, a trickle later
        if claude.client_disconnects:
            break
        await asyncio.sleep(0.01)
    assert claude.client_disconnects, "the upstream never saw the connection close"
    assert claude.client_disconnects[0] - cancelled_at < 0.5


async def test_health_lists_the_apis_models(stub_for: StubFactory, claude: FakeAnthropic, local: FakeUpstream) -> None:
    stub = await stub_for(f"""
llm:
  anthropic: {{api_key: "{ANTHROPIC_TEST_KEY}", base_url: "{claude.base_url}", model: claude-test}}
  backends:
    - {{name: dead, kind: anthropic, base_url: "http://127.0.0.1:9", model: claude-test, api_key: k}}
  ollama: {{base_url: "{local.base_url}", model: tiny}}
""")
    report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
    by_name = {b.name: b for b in report.backends}
    assert list(by_name) == ["anthropic", "ollama", "dead"]
    live = by_name["anthropic"]
    assert (live.kind, live.reachable, list(live.models)) == ("anthropic", True, ["claude-test", "claude-test-mini"])
    dead = by_name["dead"]
    assert not dead.reachable and "127.0.0.1:9" in dead.last_error
    assert "/v1/models" in claude.probe_requests
    # A model the probe discovered is served without naming the backend.
    assert (await stub.Complete(chat(model="claude-test-mini"), timeout=5)).model == "claude-test-mini"


async def test_a_models_list_that_never_ends_is_read_a_few_pages_and_the_gateway_starts(
    gateway_factory: GatewayFactory, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    """A compatible server that says every page has more, whatever the cursor: read as the SDK pages it, the probe
    never ended, and the gateway, whose start awaits it, never started, while asking for pages as fast as they came."""
    claude.models_without_end = True
    gateway = await asyncio.wait_for(gateway_factory(anthropic_first(claude, local)), timeout=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
    live = report.backends[0]
    assert (live.name, live.reachable, list(live.models)) == ("anthropic", True, ["claude-test", "claude-test-mini"])
    # The first page, and the second, which listed nothing new.
    assert claude.probe_requests == ["/v1/models"] * 2


async def test_an_upstream_error_keeps_its_message_and_never_a_key(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    claude.inject({"status": 400, "message": "messages: roles must alternate"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "roles must alternate" in str(caught.value.details())

    claude.inject({"status": 401, "message": f"invalid x-api-key: {ANTHROPIC_TEST_KEY}"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="claude-test", exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_AUTH_FAILED"
    assert ANTHROPIC_TEST_KEY not in str(caught.value.details())


# Deeper than Python's stack lets repr() or str() go.
PAST_THE_STACK = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize("message", ['["a list"]', "true", PAST_THE_STACK], ids=["list", "true", "past-the-stack"])
async def test_an_error_whose_message_is_no_text_is_quoted_as_it_came(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A compatible server's error message may be any JSON: one that was not text failed Complete, streams and counts
    INTERNAL (a TypeError in the gateway, or a RecursionError)."""
    body = f'{{"type": "error", "error": {{"type": "invalid_request_error", "message": {message}}}}}'
    claude.inject({"status": 400, "body": body})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"HTTP 400: {body[:100]}" in str(caught.value.details())

    claude.inject({"status": 400, "body": body})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await streamed(stub, stream_chat("hello"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"HTTP 400: {body[:100]}" in str(caught.value.details())

    claude.count_faults.append({"status": 400, "body": body})
    count = await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=[user("hello")]), timeout=5)
    assert count.estimated and count.token_count > 0 and len(claude.count_requests) == 1
    assert not [r for r in caplog.records if r.exc_info], "an upstream's odd answer is no traceback"


@pytest.mark.parametrize(
    ("tokens", "counted_as"),
    [("-1", "int"), ('"7"', "str"), (PAST_THE_STACK, "list")],
    ids=["negative", "text", "past-the-stack"],
)
async def test_a_count_that_is_no_count_is_estimated_instead(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, tokens: str, counted_as: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning named what was counted by its repr, which a list nested past Python's stack has not: the
    RecursionError came out of logging into the call, INTERNAL."""
    claude.count_faults.append({"body": f'{{"input_tokens": {tokens}}}'})
    count = await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=[user("hello")]), timeout=5)
    assert count.estimated and count.encoding != "backend:anthropic" and count.token_count > 0
    warnings = [r.getMessage() for r in caplog.records if "estimating instead" in r.getMessage()]
    assert warnings == [f"backend anthropic counted tokens as {counted_as}; estimating instead"]


# Beyond what orjson writes: an integer no 64 bits hold, and nesting deeper than its 254 levels.
DEEP = "[" * 300 + "]" * 300
BIG_SCHEMA = (
    '{"type": "object", "properties": {"n": {"type": "integer", "maximum": 123456789012345678901234567890}},'
    f' "x": {DEEP}}}'
)
BIG_ARGUMENTS = f'{{"n": 123456789012345678901234567890,  "x": {DEEP}}}'


def called_with(arguments: str) -> list[pb.Message]:
    """A conversation whose assistant turn called `count` with these arguments, and the tool's result."""
    call = pb.ToolCall(id="c1", function=pb.FunctionCall(name="count", arguments=arguments))
    return [
        user("count"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content="done"),
    ]


async def test_json_texts_reach_the_api_as_written_however_large_and_deep(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    conversation = called_with(BIG_ARGUMENTS)
    tools = [pb.Tool(function=pb.FunctionDefinition(name="count", parameters_json=BIG_SCHEMA))]
    options = pb.CompletionOptions(
        tools=tools,
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="n", schema_json=BIG_SCHEMA)
        ),
    )
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation, options=options), timeout=5)
    chunks = await streamed(stub, pb.StreamCompleteRequest(messages=conversation, options=options))
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="claude-test", messages=conversation, tools=tools), timeout=5
    )

    assert (answer.backend, chunks[-1].backend) == ("anthropic", "anthropic")
    assert len(claude.chat_bodies) == 2
    for body in claude.chat_bodies:
        assert f'"input_schema":{BIG_SCHEMA}'.encode() in body
        assert f'"schema":{BIG_SCHEMA}'.encode() in body
        assert f'"input":{BIG_ARGUMENTS}'.encode() in body
    assert (count.encoding, count.estimated) == ("backend:anthropic", False)
    (counted,) = claude.count_requests
    assert counted["tools"][0]["input_schema"] == json.loads(BIG_SCHEMA)
    assert counted["messages"][1]["content"] == [
        {"type": "tool_use", "id": "c1", "name": "count", "input": json.loads(BIG_ARGUMENTS)}
    ]
    assert claude.invalid_requests == []
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ('{"n": NaN}', "NaN is not a JSON number"),
        ('{"n": [1, -Infinity]}', "-Infinity is not a JSON number"),
        ('{"n": 1e400}', "1e400 is beyond the range of a double"),
    ],
)
async def test_tool_arguments_with_a_number_no_reader_takes_are_not_sent_to_the_messages_api(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, caplog: pytest.LogCaptureFixture, arguments: str, says: str
) -> None:
    """Sent as written, they would fail the whole request upstream, or reach the model as null. Asked of Claude alone,
    the call is refused with what could not be sent; the OpenAI format carries them as text (the fallback, below)."""
    conversation = called_with(arguments)
    for call in (
        stub.Complete(pb.CompleteRequest(messages=conversation, model="claude-test", exact_model=True), timeout=5),
        streamed(stub, pb.StreamCompleteRequest(messages=conversation, model="claude-test", exact_model=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"messages[1].tool_calls[0].function.arguments: {says}" in str(caught.value.details())
        assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_REJECTED"
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    assert answer.backend == "ollama"
    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        ("anthropic", pb.ATTEMPT_OUTCOME_REJECTED),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]

    # The API cannot count what it cannot be sent: the gateway estimates.
    count = await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=conversation), timeout=5)
    assert count.estimated and count.token_count > 0
    assert claude.chat_requests == [] and claude.count_requests == []
    assert "Traceback" not in caplog.text
    # A caller's chat the API cannot take is no warning for the operator (a WARNING a call, from any caller).
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "count" in r.getMessage()]


async def test_a_schema_with_a_number_beyond_a_double_is_refused_before_counting(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    tools = [pb.Tool(function=pb.FunctionDefinition(name="f", parameters_json='{"type": "object", "maximum": 1e400}'))]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(model="claude-test", messages=[user()], tools=tools), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = details(caught.value)["BadRequest"].field_violations
    assert violation.field == "tools[0].function.parameters_json"
    assert "1e400 is beyond the range of a double" in violation.description
    assert claude.count_requests == []
    assert "Traceback" not in caplog.text


async def test_a_message_of_empty_text_parts_is_refused_as_empty_content_is(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    empty = pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text=""), pb.ContentPart(text="")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(messages=[empty]), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = details(caught.value)["BadRequest"].field_violations
    assert [(v.field, v.description) for v in violations] == [
        ("messages[0].parts", "must not be empty: every part is empty text")
    ]
    assert claude.chat_requests == []


async def test_text_of_whitespace_alone_is_left_out_of_the_turns_the_api_takes(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic
) -> None:
    """An OpenAI model's turn often holds "\n\n" beside its tool calls; the API refuses a text block of whitespace
    alone (400), so a conversation carried over to Claude would fail where it means nothing."""
    call = pb.ToolCall(id="c1", function=pb.FunctionCall(name="count", arguments="{}"))
    conversation = [
        pb.Message(role=pb.ROLE_SYSTEM, content="  "),
        user("count"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="\n\n", tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content=" "),
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="\t"), pb.ContentPart(text="and now?")]),
    ]
    answer = await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)

    assert answer.backend == "anthropic" and claude.invalid_requests == []
    (sent,) = claude.chat_requests
    assert "system" not in sent
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "count"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "count", "input": {}}]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1"}, {"type": "text", "text": "and now?"}],
        },
    ]


async def test_a_stop_sequence_of_whitespace_is_for_another_backend(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    """The API refuses one (400); the OpenAI format takes it, and stopping there is the caller's wish, not to drop."""
    request = pb.CompleteRequest(messages=[user("lines")], options=pb.CompletionOptions(stop=["\n", "END"]))
    answer = await stub.Complete(request, timeout=5)
    assert answer.backend == "ollama" and local.chat_requests[0]["stop"] == ["\n", "END"]
    assert claude.chat_requests == []
    assert "options.stop: Anthropic takes no stop sequence of whitespace alone" in answer.attempts[0].error


async def test_system_messages_alone_are_not_sent_to_the_messages_api(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    """The API takes no request without a user or assistant turn; the OpenAI format takes one, so Ollama serves it,
    as the next route: a request valid in the contract is not the caller's mistake because one dialect cannot carry
    it. Asked of Claude alone, it is refused, saying what could not be sent."""
    system_only = [pb.Message(role=pb.ROLE_SYSTEM, content="be brief")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(messages=system_only, model="claude-test", exact_model=True), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not sent to Anthropic: messages: Anthropic needs a user or assistant message" in str(caught.value.details())
    info = details(caught.value)["ErrorInfo"]
    assert (info.reason, info.metadata["attempts"]) == ("UPSTREAM_REJECTED", "anthropic:rejected")
    assert "upstream_status" not in info.metadata, "no upstream was asked"
    assert claude.chat_requests == []
    answer = await stub.Complete(pb.CompleteRequest(messages=system_only), timeout=5)
    assert answer.backend == "ollama" and local.chat_requests[0]["messages"] == [
        {"role": "system", "content": "be brief"}
    ]
    assert claude.chat_requests == []


async def test_an_account_out_of_credits_goes_to_the_next_backend(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream
) -> None:
    """The API says so with a 400 invalid_request_error, not a 402: every call ended INVALID_ARGUMENT, the caller told
    to fix a request that was fine, and the next backend, able to serve it, untried until someone bought credits."""
    said = "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade."
    claude.inject({"status": 400, "message": said}, {"status": 400, "message": said})
    answer = await stub.Complete(chat(), timeout=5)
    assert answer.backend == "ollama"
    assert answer.attempts[0].outcome == pb.ATTEMPT_OUTCOME_AUTH_FAILED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="claude-test", exact_model=True), timeout=5)
    assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_AUTH_FAILED"
    assert len(local.chat_requests) == 1


@pytest.mark.parametrize(
    ("count", "width", "height"),
    [(1, 8001, 10), (1, 10, 8001), (21, 2001, 10)],
    ids=["wide", "tall", "one-of-many"],
)
async def test_an_image_anthropic_refuses_by_its_size_goes_to_the_next_backend(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, local: FakeUpstream, count: int, width: int, height: int
) -> None:
    """A full-page screenshot (1440x8600, a few KB), or one of many images past 2000px: the API refuses it with a 400,
    which ended the call INVALID_ARGUMENT with an OpenAI-format backend next in the chain that takes it."""
    image = pb.ContentPart(image=pb.ImagePart(data=png(width, height), media_type="image/png"))
    request = pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[image] * count)])
    answer = await stub.Complete(request, timeout=10)
    refused = answer.attempts[0]
    assert (refused.backend, refused.outcome, answer.backend) == ("anthropic", pb.ATTEMPT_OUTCOME_REJECTED, "ollama")
    assert f"Anthropic takes an image of at most {8000 if count == 1 else 2000}px a side" in refused.error
    assert f"(this one: {width}x{height})" in refused.error
    assert claude.chat_requests == []


async def test_a_chat_with_an_image_anthropic_refuses_by_its_size_is_counted_offline(
    stub: pb.LLMServiceAsyncStub, claude: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    """The count endpoint refuses it as the Messages API does (a 400), which was logged as the backend's counts
    failing: the caller's image, not the server's trouble."""
    image = pb.ContentPart(image=pb.ImagePart(data=png(8001, 10), media_type="image/png"))
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="claude-test", messages=[pb.Message(role=pb.ROLE_USER, parts=[image])]), timeout=5
    )
    assert count.estimated and count.encoding != "backend:anthropic"
    assert claude.count_requests == []
    assert "could not count tokens" not in caplog.text
