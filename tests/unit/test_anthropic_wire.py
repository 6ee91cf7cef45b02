"""Anthropic's Messages format: request bodies, answers and stream events, and the error kinds of the backend."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from anthropic.types import ModelInfo
from hypothesis import given, settings
from hypothesis import strategies as st
from llmrelay_server.backends import anthropic_wire as aw
from llmrelay_server.backends import wire
from llmrelay_server.backends.anthropic import _kind, _takes_no_budget
from llmrelay_server.backends.wire import ErrorEvent, MalformedAnswerError
from llmrelay_server.domain import (
    CompletionOptions,
    CompletionRequest,
    FinishReason,
    ImagePart,
    JsonSchemaFormat,
    JsonText,
    Message,
    NamedToolChoice,
    ReasoningEffort,
    ResponseFormat,
    Role,
    TextPart,
    TokenUsage,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
    UpstreamErrorKind,
)

HI = (Message(Role.USER, "hi"),)
ADAPTIVE = "adaptive"


def body(
    options: CompletionOptions | None = None, *, messages: tuple[Message, ...] = HI, thinking: str = "budget"
) -> dict[str, Any]:
    """The body as the upstream reads it: written as the provider writes it, then parsed."""
    result: dict[str, Any] = json.loads(sent(options, messages=messages, thinking=thinking))
    return result


def sent(
    options: CompletionOptions | None = None, *, messages: tuple[Message, ...] = HI, thinking: str = "budget"
) -> bytes:
    """The bytes the provider sends (its JSON texts spliced in as written)."""
    request = CompletionRequest(messages=messages, options=options or CompletionOptions())
    return wire.encode(aw.request_body("m", request, default_max_tokens=1000, adaptive_thinking=thinking == ADAPTIVE))


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


# --- request bodies -------------------------------------------------------------------------------------------------


def test_a_bare_request_has_the_default_max_tokens() -> None:
    assert body() == {"model": "m", "messages": [{"role": "user", "content": [text("hi")]}], "max_tokens": 1000}


def test_options_the_api_has_no_parameter_for_are_left_out() -> None:
    options = CompletionOptions(
        temperature=0.5, top_p=0.9, seed=1, presence_penalty=1.0, frequency_penalty=1.0, max_tokens=0
    )
    assert set(body(options)) == {"model", "messages", "max_tokens"}
    assert body(options)["max_tokens"] == 0


def test_system_messages_go_to_system_and_turns_alternate() -> None:
    messages = (
        Message(Role.SYSTEM, "one"),
        Message(Role.USER, "a"),
        Message(Role.USER, "b"),
        Message(Role.ASSISTANT, ""),  # empty: left out, so the user turns around it are one
        Message(Role.SYSTEM, "two"),
        Message(Role.USER, "c"),
        Message(Role.ASSISTANT, "d"),
    )
    result = body(messages=messages)
    assert result["system"] == [text("one"), text("two")]
    assert result["messages"] == [
        {"role": "user", "content": [text("a"), text("b"), text("c")]},
        {"role": "assistant", "content": [text("d")]},
    ]


def test_tool_calls_and_results() -> None:
    messages = (
        Message(Role.USER, "go"),
        Message(
            Role.ASSISTANT,
            "calling",
            tool_calls=(ToolCall("t1", "f", '{"n": 1, "big": 1152921504606846977}'), ToolCall("t2", "g", "")),
        ),
        Message(Role.TOOL, "r1", tool_call_id="t1"),
        Message(Role.TOOL, "", tool_call_id="t2"),
    )
    assert body(messages=messages)["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                text("calling"),
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"n": 1, "big": 2**60 + 1}},
                {"type": "tool_use", "id": "t2", "name": "g", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [text("r1")]},
                {"type": "tool_result", "tool_use_id": "t2"},
            ],
        },
    ]


@pytest.mark.parametrize("arguments", ["[1]", "not json", "3", "null"])
def test_arguments_that_are_no_json_object_cannot_be_sent(arguments: str) -> None:
    messages = (Message(Role.USER, "go"), Message(Role.ASSISTANT, tool_calls=(ToolCall("t", "f", arguments),)))
    with pytest.raises(aw.UnmappableRequestError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        body(messages=messages)


def test_arguments_are_sent_as_written() -> None:
    """However large their integers, deep their nesting or odd their spacing: the text is not rewritten."""
    deep = "[" * 300 + "]" * 300  # beyond what orjson writes (254 levels)
    arguments = '{"n" : 123456789012345678901234567890, "f": 1.50, "deep": ' + deep + "}"
    messages = (Message(Role.USER, "go"), Message(Role.ASSISTANT, tool_calls=(ToolCall("t", "f", arguments),)))
    assert f'"input":{arguments}'.encode() in sent(messages=messages)


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ('{"n": NaN}', "NaN is not a JSON number"),
        ('{"n": [-Infinity]}', "-Infinity is not a JSON number"),
        ('{"n": 1e400}', "1e400 is beyond the range of a double"),
        ('{"n": {"m": -2E+999}}', "-2E+999 is beyond the range of a double"),
        # In digits: past the 1e400 guard, sent to readers that make it infinity or refuse it.
        ('{"n": 1' + "0" * 309 + "}", "10000000000000000000... (310 characters) is beyond the range of a double"),
    ],
)
def test_arguments_with_numbers_no_reader_takes_cannot_be_sent(arguments: str, said: str) -> None:
    messages = (Message(Role.USER, "go"), Message(Role.ASSISTANT, tool_calls=(ToolCall("t", "f", arguments),)))
    with pytest.raises(aw.UnmappableRequestError) as caught:
        body(messages=messages)
    assert str(caught.value) == f"messages[1].tool_calls[0].function.arguments: {said}"


def test_arguments_nested_beyond_reading_cannot_be_sent() -> None:
    arguments = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    messages = (Message(Role.USER, "go"), Message(Role.ASSISTANT, tool_calls=(ToolCall("t", "f", arguments),)))
    with pytest.raises(aw.UnmappableRequestError, match="nested too deeply"):
        body(messages=messages)


@pytest.mark.parametrize(
    "messages",
    [(Message(Role.SYSTEM, "be brief"),), (Message(Role.SYSTEM, "a"), Message(Role.SYSTEM, "b"))],
    ids=["one", "two"],
)
def test_system_messages_alone_cannot_be_sent(messages: tuple[Message, ...]) -> None:
    """The API takes no request without a turn; the OpenAI format takes this conversation, so it passes validation."""
    with pytest.raises(aw.UnmappableRequestError, match=r"^messages: "):
        body(messages=messages)
    with pytest.raises(aw.UnmappableRequestError, match=r"^messages: "):
        aw.prompt_body("m", messages, ())


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ((Message(Role.SYSTEM, "be brief"),), "beside the system ones"),
        ((Message(Role.SYSTEM, "be brief"), Message(Role.USER, "  \n")), "every one here is whitespace alone"),
        ((Message(Role.USER, "\t"), Message(Role.ASSISTANT, " ")), "every one here is whitespace alone"),
    ],
)
def test_a_chat_with_no_turn_to_send_says_why(messages: tuple[Message, ...], says: str) -> None:
    # A chat of whitespace alone was told it needed a message "beside the system ones", with none in it.
    with pytest.raises(aw.UnmappableRequestError, match=says):
        body(messages=messages)


def test_a_prefill_goes_without_its_trailing_whitespace_and_without_thinking() -> None:
    """A chat that ends in the assistant's words, for the answer to go on from: the API refuses one that ends in
    whitespace, and refuses thinking with it (400, and no fallback: the caller's mistake, it says)."""
    prefill = (*HI, Message(Role.ASSISTANT, "The answer is: \n"))
    for thinking in ("budget", ADAPTIVE):
        sent_body = body(CompletionOptions(reasoning_effort="high"), messages=prefill, thinking=thinking)
        assert "thinking" not in sent_body
        assert sent_body["messages"][-1]["content"] == [{"type": "text", "text": "The answer is:"}]
    # Only the last turn's words: whitespace within a chat is the caller's.
    earlier = body(messages=(*prefill, Message(Role.USER, "go on")))
    assert earlier["messages"][1]["content"] == [{"type": "text", "text": "The answer is: \n"}]


def test_reasoning_goes_back_only_with_its_signature() -> None:
    signed = Message(Role.ASSISTANT, "a", reasoning="r", reasoning_signature="s")
    unsigned = Message(Role.ASSISTANT, "b", reasoning="another upstream's")
    redacted = Message(Role.ASSISTANT, "c", reasoning_signature="s2")  # thinking shown as omitted: no text
    turns = [t["content"] for t in body(messages=(*HI, signed, *HI, unsigned, *HI, redacted))["messages"][1::2]]
    assert turns == [
        [{"type": "thinking", "thinking": "r", "signature": "s"}, text("a")],
        [text("b")],
        [{"type": "thinking", "thinking": "", "signature": "s2"}, text("c")],
    ]


def test_images_and_text_parts() -> None:
    parts = (
        TextPart("look"),
        TextPart(""),
        ImagePart(url="https://x/y.png"),
        ImagePart(data=b"\x89PNG", media_type="image/png"),
    )
    assert body(messages=(Message(Role.USER, parts=parts),))["messages"][0]["content"] == [
        text("look"),
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}},
    ]


def test_tools_and_their_schemas() -> None:
    schema = '{"type": "object", "properties": {"n": {"type": "integer", "maxItems": 3}}}'
    tools = (Tool("a", "does a", JsonText(schema), strict=True), Tool("b", parameters={"type": "object"}), Tool("c"))
    assert body(CompletionOptions(tools=tools))["tools"] == [
        {"name": "a", "input_schema": json.loads(schema), "description": "does a", "strict": True},
        {"name": "b", "input_schema": {"type": "object"}},
        {"name": "c", "input_schema": {"type": "object"}},
    ]
    assert isinstance(
        body(CompletionOptions(tools=tools))["tools"][0]["input_schema"]["properties"]["n"]["maxItems"], int
    )


def test_schemas_are_sent_as_written() -> None:
    """As OpenAI's path sends them: integers no 64 bits hold, nesting deeper than orjson writes, spacing."""
    schema = '{"type":  "object", "maximum": 123456789012345678901234567890, "x": ' + "[" * 300 + "]" * 300 + "}"
    tools = (Tool("a", parameters=JsonText(schema)),)
    response_format = ResponseFormat("json_schema", JsonSchemaFormat("s", JsonText(schema)))
    written = sent(CompletionOptions(tools=tools, response_format=response_format))
    assert f'"input_schema":{schema}'.encode() in written
    assert f'"schema":{schema}'.encode() in written


@pytest.mark.parametrize(
    ("choice", "parallel", "sent"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("none", False, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (NamedToolChoice("f"), None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (NamedToolChoice("f"), False, {"type": "tool", "name": "f", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
def test_tool_choice(
    choice: ToolChoiceMode | NamedToolChoice | None, parallel: bool | None, sent: dict[str, Any] | None
) -> None:
    result = body(CompletionOptions(tools=(Tool("f"),), tool_choice=choice, parallel_tool_calls=parallel))
    assert result.get("tool_choice") == sent


@pytest.mark.parametrize(
    ("effort", "max_tokens", "thinking", "sent_max_tokens"),
    [
        ("minimal", None, {"type": "enabled", "budget_tokens": 1024, "display": "summarized"}, 1000 + 1024),
        ("low", None, {"type": "enabled", "budget_tokens": 4096, "display": "summarized"}, 1000 + 4096),
        ("medium", None, {"type": "enabled", "budget_tokens": 8192, "display": "summarized"}, 1000 + 8192),
        ("high", None, {"type": "enabled", "budget_tokens": 16384, "display": "summarized"}, 1000 + 16384),
        ("high", 20000, {"type": "enabled", "budget_tokens": 16384, "display": "summarized"}, 20000),
        ("high", 5000, {"type": "enabled", "budget_tokens": 4999, "display": "summarized"}, 5000),
        ("low", 1025, {"type": "enabled", "budget_tokens": 1024, "display": "summarized"}, 1025),
        ("low", 1024, None, 1024),
        # No reasoning said outright: a model that thinks by default would otherwise think.
        ("none", None, {"type": "disabled"}, 1000),
    ],
)
def test_reasoning_effort_as_a_thinking_budget(
    effort: ReasoningEffort, max_tokens: int | None, thinking: dict[str, Any] | None, sent_max_tokens: int
) -> None:
    result = body(CompletionOptions(reasoning_effort=effort, max_tokens=max_tokens))
    assert (result.get("thinking"), result["max_tokens"]) == (thinking, sent_max_tokens)


@pytest.mark.parametrize(
    ("effort", "max_tokens", "sent", "sent_max_tokens"),
    [
        # Thinking counts within max_tokens: the answer keeps its default room, the thinking a budget's on top.
        ("minimal", None, "low", 1000 + 1024),
        ("low", None, "low", 1000 + 4096),
        ("medium", None, "medium", 1000 + 8192),
        ("high", None, "high", 1000 + 16384),
        ("high", 3000, "high", 3000),
    ],
)
def test_reasoning_effort_as_adaptive_thinking(
    effort: ReasoningEffort, max_tokens: int | None, sent: str, sent_max_tokens: int
) -> None:
    result = body(CompletionOptions(reasoning_effort=effort, max_tokens=max_tokens), thinking=ADAPTIVE)
    assert (result["thinking"], result["output_config"], result["max_tokens"]) == (
        {"type": "adaptive", "display": "summarized"},
        {"effort": sent},
        sent_max_tokens,
    )


@pytest.mark.parametrize("choice", ["required", NamedToolChoice("f")])
def test_a_forced_tool_call_goes_without_thinking(choice: ToolChoiceMode | NamedToolChoice) -> None:
    options = CompletionOptions(tools=(Tool("f"),), tool_choice=choice, reasoning_effort="high")
    assert "thinking" not in body(options) and "thinking" not in body(options, thinking=ADAPTIVE)


def test_thinking_waits_for_the_user_turn_after_a_tool_cycle_begun_without_it() -> None:
    def call(n: int) -> Message:  # reasoning unsigned, as another upstream's: not sent back
        return Message(Role.ASSISTANT, tool_calls=(ToolCall(f"c{n}", "f", "{}"),), reasoning="r")

    def result(n: int) -> Message:
        return Message(Role.TOOL, "ok", tool_call_id=f"c{n}")

    thought = Message(Role.ASSISTANT, tool_calls=(ToolCall("c1", "f", "{}"),), reasoning="r", reasoning_signature="s")
    options = CompletionOptions(tools=(Tool("f"),), reasoning_effort="high")
    for messages, thinks in [
        ((*HI, call(1), result(1)), False),
        ((*HI, call(1), result(1), call(2), result(2)), False),
        ((*HI, thought, result(1), call(2), result(2)), True),  # its second step: the cycle began with thinking
        ((*HI, call(1), result(1), Message(Role.USER, "next"), call(2), result(2)), False),
        ((*HI, call(1), result(1), Message(Role.ASSISTANT, "done"), Message(Role.USER, "next")), True),
    ]:
        for thinking in ("budget", ADAPTIVE):
            assert ("thinking" in body(options, messages=messages, thinking=thinking)) is thinks, messages


def test_response_formats() -> None:
    schema = JsonSchemaFormat("s", JsonText('{"type": "object", "properties": {"a": {"minimum": 1}}}'), "d", True)
    assert body(CompletionOptions(response_format=ResponseFormat("json_schema", schema)))["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"minimum": 1}}}}
    }
    # JSON without a schema has no counterpart: left out, as plain text is.
    for kind in ("json_object", "text"):
        assert "output_config" not in body(CompletionOptions(response_format=ResponseFormat(kind)))
    both = CompletionOptions(response_format=ResponseFormat("json_schema", schema), reasoning_effort="low")
    assert set(body(both, thinking=ADAPTIVE)["output_config"]) == {"effort", "format"}


def test_the_prompt_body_is_what_count_tokens_takes() -> None:
    messages = (Message(Role.SYSTEM, "s"), Message(Role.USER, "u"))
    assert aw.prompt_body("m", messages, (Tool("f"),)) == {
        "model": "m",
        "messages": [{"role": "user", "content": [text("u")]}],
        "system": [text("s")],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    }


# --- answers --------------------------------------------------------------------------------------------------------


def message(*content: Any, **fields: Any) -> dict[str, Any]:
    usage = {"input_tokens": 10, "output_tokens": 5}
    return {"id": "msg_1", "model": "m-1", "content": list(content), "stop_reason": "end_turn", "usage": usage} | fields


def test_an_answer_with_every_kind_of_block() -> None:
    answer = aw.answer_from(
        message(
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            text("one "),
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"n": 1}},
            text("two"),
            stop_reason="tool_use",
        )
    )
    assert (answer.id, answer.model, answer.finish_reason) == ("msg_1", "m-1", FinishReason.TOOL_CALLS)
    assert answer.message == Message(
        Role.ASSISTANT,
        "one two",
        tool_calls=(ToolCall("t1", "f", '{"n": 1}'),),
        reasoning="hm",
        reasoning_signature=None,  # the redacted block cannot go back, nor the other without it
    )
    assert answer.usage == TokenUsage(prompt_tokens=10, completion_tokens=5)


def test_a_tool_calls_arguments_keep_their_letters_as_a_stream_gives_them() -> None:
    answer = aw.answer_from(message({"type": "tool_use", "id": "t1", "name": "f", "input": {"city": "Tromsø"}}))
    assert [call.arguments for call in answer.message.tool_calls] == ['{"city": "Tromsø"}']


@pytest.mark.usefixtures("python_recursion_limit")
def test_an_input_nested_beyond_writing_is_a_malformed_answer() -> None:
    # Within orjson's 1,024 levels, beyond what Python's writer takes: no RecursionError (an UNKNOWN status) escapes.
    deep = b"[" * 1000 + b"]" * 1000
    raw = b'{"content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": %s}}]}' % deep
    with pytest.raises(MalformedAnswerError, match="nested too deeply"):
        aw.answer_from(wire.decode_answer_json(raw))


def test_several_thinking_blocks_have_no_signature_to_send_back() -> None:
    thinking = [{"type": "thinking", "thinking": t, "signature": t} for t in ("a", "b")]
    answer = aw.answer_from(message(*thinking))
    assert (answer.message.reasoning, answer.message.reasoning_signature) == ("ab", None)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"content": "x"},
        {"content": ["x"]},
        {"content": [{"type": "text", "text": 3}]},
        {"content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]},
        {"content": [], "id": 7},
    ],
)
def test_malformed_answers(data: Any) -> None:
    with pytest.raises(MalformedAnswerError):
        aw.answer_from(data)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 3, "output_tokens": 4}, TokenUsage(3, 4)),
        (
            {"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7},
            TokenUsage(3 + 5 + 7, 4, cached_prompt_tokens=7, cache_write_prompt_tokens=5),
        ),
        (
            {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 0},
            TokenUsage(3, 4, cached_prompt_tokens=0),
        ),
        (
            {"input_tokens": 3, "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 6}},
            TokenUsage(3, 9, reasoning_tokens=6),
        ),
        ({"input_tokens": 3}, None),
        ({"input_tokens": -1, "output_tokens": 4}, None),
        ({"input_tokens": True, "output_tokens": 4}, None),
        # Counts that each fit the contract's int32, but not their sum: the prompt, or the total.
        (
            {
                "input_tokens": 3,
                "output_tokens": 4,
                "cache_creation_input_tokens": 2**30,
                "cache_read_input_tokens": 2**30,
            },
            None,
        ),
        ({"input_tokens": 2**30, "output_tokens": 2**30}, None),
        ("usage", None),
    ],
)
def test_usage(usage: Any, expected: TokenUsage | None) -> None:
    assert aw.usage_from(usage) == expected


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", FinishReason.STOP),
        ("stop_sequence", FinishReason.STOP),
        ("max_tokens", FinishReason.LENGTH),
        ("model_context_window_exceeded", FinishReason.LENGTH),
        ("tool_use", FinishReason.TOOL_CALLS),
        ("refusal", FinishReason.CONTENT_FILTER),
        ("pause_turn", FinishReason.UNKNOWN),
        ("something new", FinishReason.UNKNOWN),
        (None, FinishReason.UNKNOWN),
    ],
)
def test_finish_reasons(reason: str | None, finish: FinishReason) -> None:
    assert aw.finish_reason(reason) == finish


@pytest.mark.parametrize(
    ("data", "event"),
    [
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ErrorEvent("Overloaded", None, "overloaded_error", 529),
        ),
        (
            {"type": "error", "error": {"type": "new_error"}},
            ErrorEvent("the upstream sent an error event", None, "new_error"),
        ),
        ({"type": "error"}, ErrorEvent("the upstream sent an error event", None, None)),
        ({"type": "ping"}, None),
        ("error", None),
    ],
)
def test_error_events(data: Any, event: ErrorEvent | None) -> None:
    assert aw.error_event(data) == event


# --- stream events --------------------------------------------------------------------------------------------------


def events(*content_blocks: tuple[dict[str, Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    start = {
        "id": "msg_1",
        "model": "m-1",
        "usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 2},
    }
    result: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, (block, deltas) in enumerate(content_blocks):
        result.append({"type": "content_block_start", "index": index, "content_block": block})
        result += [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
        result.append({"type": "content_block_stop", "index": index})
    result.append({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}})
    result.append({"type": "some_event_added_later"})
    result.append({"type": "message_stop"})
    return result


def test_a_stream_of_every_kind_of_block() -> None:
    state = aw.StreamState()
    deltas = [
        state.event(e)
        for e in events(
            (
                {"type": "thinking", "thinking": ""},
                [{"type": "thinking_delta", "thinking": "hm"}, {"type": "signature_delta", "signature": "s"}],
            ),
            (
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": "hi"}, {"type": "citations_delta", "citation": {}}],
            ),
            (
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                [
                    {"type": "input_json_delta", "partial_json": ""},
                    {"type": "input_json_delta", "partial_json": '{"n": 1}'},
                ],
            ),
            ({"type": "tool_use", "id": "t2", "name": "g", "input": {}}, []),
        )
    ]
    assert [d for d in deltas if d is not None and d != aw.StreamDelta()] == [
        aw.StreamDelta(reasoning="hm"),
        aw.StreamDelta(content="hi"),
        aw.StreamDelta(tool_calls=(ToolCallDelta(0, id="t1", name="f", arguments=""),)),
        aw.StreamDelta(tool_calls=(ToolCallDelta(0, arguments='{"n": 1}'),)),
        aw.StreamDelta(tool_calls=(ToolCallDelta(1, id="t2", name="g", arguments=""),)),
        aw.StreamDelta(tool_calls=(ToolCallDelta(1, arguments="{}"),)),
    ]
    assert (state.id, state.model, state.finish_reason, state.stopped) == (
        "msg_1",
        "m-1",
        FinishReason.TOOL_CALLS,
        True,
    )
    # message_delta's output count replaces message_start's; the cache read it did not repeat stays.
    assert state.usage == TokenUsage(prompt_tokens=12, completion_tokens=9, cached_prompt_tokens=2)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message_start"},
        {"type": "content_block_start", "content_block": {"type": "text"}},
        {"type": "content_block_start", "index": -1, "content_block": {"type": "text"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 1}},
        {"type": "message_delta"},
        ["message_stop"],
    ],
)
def test_malformed_stream_events(event: Any) -> None:
    with pytest.raises(MalformedAnswerError):
        aw.StreamState().event(event)


START = {"type": "message_start", "message": {"id": "msg_1", "model": "m-1", "usage": {"input_tokens": 10}}}


def tool_use(index: int, **block: Any) -> dict[str, Any]:
    start = {"type": "tool_use", "id": "t1", "name": "f"} | block
    return {"type": "content_block_start", "index": index, "content_block": start}


def partial_json(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": text}}


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def folded(stream: list[dict[str, Any]]) -> dict[int, str]:
    """Each tool call's arguments, as the caller assembles the deltas and the last chunk's."""
    state, calls = aw.StreamState(), dict[int, str]()
    deltas = [state.event(data) for data in stream]
    for call in [
        *(call for delta in deltas if delta is not None for call in delta.tool_calls),
        *state.unstopped_tool_calls(),
    ]:
        calls[call.index] = calls.get(call.index, "") + (call.arguments or "")
    return calls


def test_a_tool_use_blocks_start_input_is_its_arguments_when_no_text_streams() -> None:
    # As the SDK reads a block: its start's input, which the streamed input replaces.
    oslo = tool_use(0, name="weather", input={"city": "Oslo"})
    assert folded([START, oslo, block_stop(0)]) == {0: '{"city": "Oslo"}'}
    assert folded([START, oslo, partial_json(0, '{"city": "Bergen"}'), block_stop(0)]) == {0: '{"city": "Bergen"}'}
    assert folded([START, tool_use(0, input={}), block_stop(0)]) == {0: "{}"}


def test_a_tool_use_block_stopped_twice_has_its_arguments_once() -> None:
    assert folded([START, tool_use(0), block_stop(0), block_stop(0)]) == {0: "{}"}


def test_a_tool_use_block_the_stream_ended_before_its_own_stop_keeps_its_arguments() -> None:
    stop = {"type": "message_stop"}
    assert folded([START, tool_use(0, input={"city": "Oslo"}), stop]) == {0: '{"city": "Oslo"}'}
    assert folded([START, tool_use(0), tool_use(1), partial_json(1, '{"a": 1}'), stop]) == {0: "{}", 1: '{"a": 1}'}
    assert folded([START, tool_use(0), block_stop(0), stop]) == {0: "{}"}


def thinking(index: int, **block: Any) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "thinking", "thinking": ""} | block,
    }


def signature(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": text}}


@pytest.mark.parametrize(
    ("stream", "signed"),
    [
        # As the SDK reads a thinking block: its start's signature, replaced by a signature_delta.
        ([thinking(0, signature="s0"), block_stop(0)], "s0"),
        ([thinking(0, signature=""), signature(0, "s1"), block_stop(0)], "s1"),
        ([thinking(0), signature(0, "s1"), signature(0, "s2"), block_stop(0)], "s2"),
        # Two signed blocks: the contract carries one signature, so neither can be sent back.
        ([thinking(0, signature="s0"), block_stop(0), thinking(1), signature(1, "s1"), block_stop(1)], None),
        ([thinking(0), block_stop(0)], None),
    ],
)
def test_a_streams_thinking_signature(stream: list[dict[str, Any]], signed: str | None) -> None:
    state = aw.StreamState()
    for data in [START, *stream, {"type": "message_stop"}]:
        state.event(data)
    assert state.reasoning_signature == signed


def signed_as(*signatures: str) -> tuple[str | None, str | None]:
    """The reasoning_signature of an answer with a thinking block of each of these signatures ("" for none): as the
    unary answer has it, and as a stream of the same blocks (each opened unsigned, signed by a signature_delta)."""
    blocks = [{"type": "thinking", "thinking": str(i), "signature": sig} for i, sig in enumerate(signatures)]
    stream: list[dict[str, Any]] = []
    for index, sig in enumerate(signatures):
        stream += [thinking(index, signature=""), signature(index, sig), block_stop(index)]
    state = aw.StreamState()
    for data in [START, *stream, {"type": "message_stop"}]:
        state.event(data)
    return aw.answer_from(message(*blocks, text("a"))).message.reasoning_signature, state.reasoning_signature


@pytest.mark.parametrize(
    ("signatures", "signed"),
    [
        (("s0",), "s0"),
        # A block without a signature has none to send back, and a signature "" is none.
        (("",), None),
        # Several blocks, however many are signed: one signature cannot stand for all of them.
        (("s0", ""), None),
        (("", "s1"), None),
        (("s0", "s1"), None),
        ((), None),
    ],
)
def test_unary_and_streamed_answers_have_one_signature_rule(signatures: tuple[str, ...], signed: str | None) -> None:
    assert signed_as(*signatures) == (signed, signed)


def test_a_signature_delta_outside_a_thinking_block_signs_nothing() -> None:
    # As the SDK reads it: a signature_delta signs the thinking block it is in, and is nothing elsewhere.
    stream = [
        START,
        {"type": "content_block_start", "index": 0, "content_block": text("")},
        signature(0, "s0"),
        block_stop(0),
        thinking(1, signature="s1"),
        block_stop(1),
    ]
    state = aw.StreamState()
    for data in stream:
        state.event(data)
    assert state.reasoning_signature == "s1"


@pytest.mark.parametrize(
    "stream",
    [
        # Argument text after the block's end, or a second call in the same block: either would be appended to a
        # whole call's arguments.
        [START, tool_use(0), block_stop(0), partial_json(0, '{"a": 1}')],
        [START, tool_use(0), partial_json(0, '{"a": 1}'), block_stop(0), tool_use(0), partial_json(0, '{"b": 2}')],
    ],
)
def test_argument_text_that_is_no_open_calls_is_malformed(stream: list[dict[str, Any]]) -> None:
    with pytest.raises(MalformedAnswerError):
        folded(stream)


def test_the_input_of_a_tool_the_api_runs_is_left_out() -> None:
    search = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    stream: list[dict[str, Any]] = [
        START,
        {"type": "content_block_start", "index": 0, "content_block": search},
        partial_json(0, '{"query": "weather"}'),
        block_stop(0),
        tool_use(1, name="f"),
        partial_json(1, "{}"),
        block_stop(1),
    ]
    assert folded(stream) == {0: "{}"}


def test_a_stream_without_output_usage_in_message_delta_has_none() -> None:
    # message_start's output count is a placeholder: the usage is estimated, not billed as that one token.
    state = aw.StreamState()
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}
    for data in (start, {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, {"type": "message_stop"}):
        state.event(data)
    assert state.usage is None


def test_a_streams_prompt_usage_is_message_starts_before_the_answer_ends() -> None:
    # What a stream cut before message_delta is billed for its prompt: the input and both cache counts, not the
    # placeholder output count.
    state = aw.StreamState()
    assert state.prompt_usage is None
    usage = {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7}
    state.event({"type": "message_start", "message": {"usage": usage}})
    assert state.usage is None
    assert state.prompt_usage == TokenUsage(22, 0, cached_prompt_tokens=7, cache_write_prompt_tokens=5)
    state.event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}})
    assert state.usage == TokenUsage(22, 4, cached_prompt_tokens=7, cache_write_prompt_tokens=5)


@pytest.mark.parametrize(
    ("later", "prompt", "cached", "written"),
    [
        # A compatible server (SGLang) writes 0 for the prompt's counts in message_delta: message_start's stand.
        ({"input_tokens": 0}, 22, 7, 5),
        ({"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}, 22, 7, 5),
        # The counts are cumulative: a larger one (the API's own, after a server tool's turn) is the answer's.
        ({"input_tokens": 100, "cache_read_input_tokens": 9}, 114, 9, 5),
        ({}, 22, 7, 5),
    ],
)
def test_message_deltas_prompt_counts_never_lower_message_starts(
    later: dict[str, int], prompt: int, cached: int, written: int
) -> None:
    state = aw.StreamState()
    usage = {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7}
    state.event({"type": "message_start", "message": {"usage": usage}})
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {**later, "output_tokens": 12}}
    state.event(end)
    assert state.prompt_usage == TokenUsage(prompt, 0, cached_prompt_tokens=cached, cache_write_prompt_tokens=written)
    assert state.usage == TokenUsage(prompt, 12, cached_prompt_tokens=cached, cache_write_prompt_tokens=written)


@pytest.mark.parametrize(
    "usage", [None, {"output_tokens": 1}, {"input_tokens": -1}, {"input_tokens": True}, {"input_tokens": 2**31}]
)
def test_no_prompt_usage_without_a_plausible_input_count(usage: Any) -> None:
    state = aw.StreamState()
    state.event({"type": "message_start", "message": {"usage": usage}})
    assert state.prompt_usage is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
event_types = st.sampled_from(
    ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "error"]
)
block_types = st.sampled_from(["text", "thinking", "tool_use", "text_delta", "input_json_delta", "thinking_delta"])
loose_events = st.fixed_dictionaries(
    {"type": event_types},
    optional={
        "index": st.integers(-1, 3) | json_values,
        "message": st.fixed_dictionaries({}, optional={"id": json_values, "usage": json_values}) | json_values,
        "content_block": st.fixed_dictionaries({"type": block_types}, optional={"text": json_values}) | json_values,
        "delta": st.fixed_dictionaries(
            {"type": block_types},
            optional={"text": json_values, "partial_json": json_values, "stop_reason": json_values},
        )
        | json_values,
        "usage": json_values,
        "error": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(loose_events | json_values, max_size=8))
def test_any_events_raise_only_malformed_answer(stream: list[Any]) -> None:
    state = aw.StreamState()
    with contextlib.suppress(MalformedAnswerError):
        for data in stream:
            aw.error_event(data)
            state.event(data)
    assert state.usage is None or isinstance(state.usage, TokenUsage)


@settings(max_examples=200, deadline=None)
@given(
    data=st.fixed_dictionaries({"content": st.lists(json_values, max_size=3)}, optional={"usage": json_values})
    | json_values
)
def test_any_json_as_an_answer_raises_only_malformed_answer(data: Any) -> None:
    with contextlib.suppress(MalformedAnswerError):
        aw.answer_from(data)


# --- error kinds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "code", "message", "kind"),
    [
        (400, "invalid_request_error", None, "messages: roles must alternate", UpstreamErrorKind.REJECTED),
        (
            400,
            "invalid_request_error",
            None,
            "prompt is too long: 208656 tokens > 200000 maximum",
            UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        ),
        (
            400,
            "invalid_request_error",
            None,
            "input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or "
            "`max_tokens` and try again",
            UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        ),
        (
            413,
            "request_too_large",
            None,
            "Request exceeds the maximum allowed number of bytes",
            UpstreamErrorKind.REJECTED,
        ),
        (401, "authentication_error", None, "invalid x-api-key", UpstreamErrorKind.AUTH_FAILED),
        (403, "permission_error", None, "", UpstreamErrorKind.AUTH_FAILED),
        (402, "billing_error", None, "", UpstreamErrorKind.AUTH_FAILED),
        (402, None, None, "", UpstreamErrorKind.AUTH_FAILED),
        (429, "rate_limit_error", "enforced_spend_limit_reached", "", UpstreamErrorKind.AUTH_FAILED),
        (429, "rate_limit_error", None, "", UpstreamErrorKind.RATE_LIMITED),
        (404, "not_found_error", None, "model: x", UpstreamErrorKind.MODEL_NOT_FOUND),
        (500, "api_error", None, "", UpstreamErrorKind.SERVER_ERROR),
        (504, "timeout_error", None, "", UpstreamErrorKind.SERVER_ERROR),
        (529, "overloaded_error", None, "Overloaded", UpstreamErrorKind.SERVER_ERROR),
    ],
)
def test_error_kinds(
    status: int, error_type: str | None, code: str | None, message: str, kind: UpstreamErrorKind
) -> None:
    assert _kind(status, error_type, code, message) is kind


YES, NO = {"supported": True}, {"supported": False}


@pytest.mark.parametrize(
    ("capabilities", "adaptive"),
    [
        ({"thinking": {"supported": True, "types": {"adaptive": YES, "enabled": NO}}}, True),
        ({"thinking": {"supported": True, "types": {"adaptive": YES, "enabled": YES}}}, False),
        ({"thinking": {"supported": True, "types": {"adaptive": NO, "enabled": YES}}}, False),
        # Listed in part, or not at all (a compatible server): the budget.
        ({"thinking": {"supported": True}}, False),
        ({}, False),
        (None, False),
    ],
)
def test_the_models_that_take_no_budget(capabilities: dict[str, Any] | None, adaptive: bool) -> None:
    # As the SDK builds a page of /v1/models: without validation, so with whatever the server listed.
    assert _takes_no_budget(ModelInfo.construct(id="m", capabilities=capabilities)) is adaptive


def test_an_image_over_five_mb_in_base64_is_not_sent() -> None:
    """The API refuses it (400 "image exceeds 5 MB maximum"): the caller's mistake, where another backend takes it.
    The bound is of the base64 the request carries: 3.75 MiB of bytes and no more."""
    within = b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024 * 5 // 4 - 8)
    over = within + b"\0"
    for data, refused in ((within, False), (over, True)):
        image = ImagePart(data=data, media_type="image/png")
        messages = (Message(Role.USER, parts=(TextPart("look"), image)),)
        if refused:
            with pytest.raises(aw.UnmappableRequestError, match=r"messages\[0\]\.parts\[1\]\.image: .* at most 5 MB"):
                body(messages=messages)
        else:
            assert body(messages=messages)["messages"][0]["content"][1]["type"] == "image"
