"""The OpenAI wire format: request bodies, and answer parsing that turns any malformed answer into one clear error."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import secrets
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from llmrelay_server.backends import wire
from llmrelay_server.domain import (
    CompletionOptions,
    CompletionRequest,
    FinishReason,
    ImageDetail,
    ImagePart,
    JsonSchemaFormat,
    JsonText,
    Message,
    NamedToolChoice,
    ResponseFormat,
    Role,
    TextPart,
    TokenUsage,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from support import png

USER_HI = (Message(Role.USER, "hi"),)


def body(
    options: CompletionOptions | None = None, *, field: str = "max_tokens", messages: tuple[Message, ...] = USER_HI
) -> dict[str, Any]:
    request = CompletionRequest(messages=messages, options=options or CompletionOptions())
    result = wire.request_body("m", request, max_tokens_field=field)
    json.dumps(result, allow_nan=False)  # the body must be plain JSON
    return result


# --- request bodies -------------------------------------------------------------------------------------------------


def test_unset_options_are_left_out() -> None:
    assert body() == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_zero_and_false_options_are_sent() -> None:
    options = CompletionOptions(
        temperature=0.0,
        top_p=0.0,
        seed=0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        parallel_tool_calls=False,
        max_tokens=1,
    )
    result = body(options)
    assert {k: v for k, v in result.items() if k not in ("model", "messages")} == {
        "temperature": 0.0,
        "top_p": 0.0,
        "seed": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "parallel_tool_calls": False,
        "max_tokens": 1,
    }


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_goes_in_the_backends_field(field: str) -> None:
    result = body(CompletionOptions(max_tokens=256), field=field)
    (other,) = {"max_tokens", "max_completion_tokens"} - {field}
    assert result[field] == 256
    assert other not in result


def test_every_option() -> None:
    options = CompletionOptions(
        temperature=0.7,
        top_p=0.9,
        max_tokens=100,
        stop=("\n\n", "END"),
        seed=42,
        reasoning_effort="low",
        presence_penalty=-1.5,
        frequency_penalty=2.0,
        parallel_tool_calls=True,
        tool_choice="required",
        tools=(Tool("t"),),
        response_format=ResponseFormat("json_object"),
    )
    result = body(options, field="max_completion_tokens")
    assert result == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_completion_tokens": 100,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "reasoning_effort": "low",
        "presence_penalty": -1.5,
        "frequency_penalty": 2.0,
        "parallel_tool_calls": True,
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "t"}}],
        "response_format": {"type": "json_object"},
    }


def test_tools() -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = (
        Tool("get_weather", "Weather by city", parameters, strict=True),
        Tool("bare"),
        Tool("not_strict", strict=False),
    )
    assert body(CompletionOptions(tools=tools))["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": parameters,
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "bare"}},
        {"type": "function", "function": {"name": "not_strict", "strict": False}},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", "none"),
        ("auto", "auto"),
        ("required", "required"),
        (NamedToolChoice("get_weather"), {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice(choice: Any, expected: Any) -> None:
    assert body(CompletionOptions(tools=(Tool("get_weather"),), tool_choice=choice))["tool_choice"] == expected


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (ResponseFormat("text"), {"type": "text"}),
        (ResponseFormat("json_object"), {"type": "json_object"}),
        (
            ResponseFormat("json_schema", JsonSchemaFormat("answer", {"type": "object"})),
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
        ),
        (
            ResponseFormat("json_schema", JsonSchemaFormat("answer", {"type": "object"}, "The answer", strict=False)),
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "schema": {"type": "object"},
                    "description": "The answer",
                    "strict": False,
                },
            },
        ),
    ],
)
def test_response_format(fmt: ResponseFormat, expected: dict[str, Any]) -> None:
    assert body(CompletionOptions(response_format=fmt))["response_format"] == expected


def test_messages_with_tool_calls_names_and_tool_results() -> None:
    messages = (
        Message(Role.SYSTEM, "be brief"),
        Message(Role.USER, "weather?", name="alice"),
        Message(
            Role.ASSISTANT,
            "",
            tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Oslo"}'), ToolCall("call_2", "now", "{}")),
        ),
        Message(Role.TOOL, '{"temp": -3}', tool_call_id="call_1"),
        Message(Role.TOOL, "12:00", tool_call_id="call_2"),
        Message(Role.ASSISTANT, "Cold.", reasoning="private thoughts are not sent back"),
    )
    assert body(messages=messages)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?", "name": "alice"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": '{"temp": -3}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Cold."},
    ]


@pytest.mark.parametrize("sent", [True, False])
def test_a_calls_signature_goes_with_it_where_the_backend_takes_signatures(sent: bool) -> None:
    calls = (ToolCall("call_1", "f", "{}", signature="c2ln"), ToolCall("call_2", "g", "{}"))
    request = CompletionRequest(messages=(*USER_HI, Message(Role.ASSISTANT, "", tool_calls=calls)))
    written = wire.request_body("m", request, max_tokens_field="max_tokens", call_signatures=sent)
    signed, unsigned = written["messages"][1]["tool_calls"]
    assert signed.get("extra_content") == ({"google": {"thought_signature": "c2ln"}} if sent else None)
    assert "extra_content" not in unsigned and signed["function"] == {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize("arguments", ["", "  ", "\n"])
def test_a_call_without_arguments_is_sent_with_an_empty_object(arguments: str) -> None:
    """As an Anthropic backend sends it (`input: {}`), blanks too: Ollama refuses arguments that are no JSON."""
    calls = (ToolCall("call_1", "now", arguments),)
    request = CompletionRequest(messages=(*USER_HI, Message(Role.ASSISTANT, "", tool_calls=calls)))
    [call] = wire.request_body("m", request, max_tokens_field="max_tokens")["messages"][1]["tool_calls"]
    assert call["function"] == {"name": "now", "arguments": "{}"}


def test_the_model_is_the_routes_model() -> None:
    request = CompletionRequest(messages=USER_HI, model="alias-the-caller-used")
    assert wire.request_body("real-model", request, max_tokens_field="max_tokens")["model"] == "real-model"


def test_images_and_text_become_content_parts() -> None:
    image = png(2, 2)
    messages = (
        Message(Role.SYSTEM, parts=(TextPart("be brief"),)),
        Message(
            Role.USER,
            parts=(
                TextPart("what are these?"),
                ImagePart(url="https://example.com/cat.png"),
                ImagePart(data=image, media_type="image/png", detail=ImageDetail.LOW),
            ),
        ),
    )
    assert body(messages=messages)["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what are these?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}", "detail": "low"},
                },
            ],
        },
    ]


# --- encoding -------------------------------------------------------------------------------------------------------

SCHEMA_TEXT = (
    '{ "type":"object", "properties": {"n": {"type": "integer", "maxItems": 3, "default": 1152921504606846977}}}'
)


def test_json_text_is_written_as_the_caller_wrote_it() -> None:
    options = CompletionOptions(
        tools=(Tool("f", parameters=JsonText(SCHEMA_TEXT)), Tool("g", parameters={"type": "object"})),
        response_format=ResponseFormat("json_schema", JsonSchemaFormat("s", JsonText('{"b" :\n 2.0}'))),
    )
    request = CompletionRequest(messages=USER_HI, options=options)
    raw = wire.encode(wire.request_body("m", request, max_tokens_field="max_tokens"))
    assert f'"parameters":{SCHEMA_TEXT}'.encode() in raw
    assert b'"schema":{"b" :\n 2.0}' in raw
    sent = json.loads(raw)
    assert sent["tools"][0]["function"]["parameters"]["properties"]["n"]["default"] == 2**60 + 1
    assert sent["tools"][1]["function"]["parameters"] == {"type": "object"}


def test_a_body_without_json_text_is_plain_json() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": 'h\u00e9 "quoted"'}], "n": 1.5}
    assert wire.encode(plain) == json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_placeholder_in_the_callers_own_text_does_not_confuse_the_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first marker drawn is one the caller's message happens to hold: the body is written again with the next.
    markers = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(secrets, "token_hex", lambda _: next(markers))
    body = {"messages": [{"content": "a" * 32}], "schema": JsonText('{"x": 1}')}
    assert json.loads(wire.encode(body)) == {"messages": [{"content": "a" * 32}], "schema": {"x": 1}}
    assert next(markers, None) is None, "the body was written twice"


def test_anything_else_that_is_not_json_is_still_an_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        wire.encode({"x": b"raw"})


# --- answers --------------------------------------------------------------------------------------------------------


def answer(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], **extra}


def parse(data: Any) -> Message:
    choice = wire.first_choice(data, "message")
    assert choice is not None
    return wire.message_from_choice(choice)


def test_decode_json() -> None:
    assert wire.decode_json(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert wire.decode_json('{"é": "ü"}'.encode()) == {"é": "ü"}


def test_decode_json_reads_past_a_byte_order_mark() -> None:
    # Which .NET's UTF-8 writer puts first and RFC 8259 lets a reader ignore: every such answer was malformed.
    assert wire.decode_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    assert wire.decode_json('\ufeff{"a": 1}') == {"a": 1}


def test_whole_answers_keep_integers_beyond_64_bits_in_tool_calls() -> None:
    arguments = {"id": 2**70, "below": -(2**63) - 1, "ratio": 1.5, "n": 7}
    call = {"id": "c1", "function": {"name": "f", "arguments": arguments}}
    raw = json.dumps(answer({"content": None, "tool_calls": [call]})).encode()
    assert parse(wire.decode_json(raw)).tool_calls[0].arguments != json.dumps(arguments), "orjson alone reads floats"
    assert json.loads(parse(wire.decode_answer_json(raw)).tool_calls[0].arguments) == arguments


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b'{"a": 1',
        b"data: {}",
        # Python's own parser takes these; none is JSON, and a lone surrogate could not go out in a gRPC string.
        b'{"content": NaN}',
        b'{"content": "\\ud800"}',
        b"\xef\xbb\xbf",
    ],
)
def test_decode_json_rejects_what_is_not_json(raw: bytes) -> None:
    with pytest.raises(wire.MalformedAnswerError, match="not JSON"):
        wire.decode_json(raw)


def test_decode_json_says_which_byte_is_not_utf8() -> None:
    with pytest.raises(wire.MalformedAnswerError, match=r"^the answer is not UTF-8 text \(byte 0 is b'\\xff'\)$"):
        wire.decode_json(b"\xff\xfe\xfa")
    with pytest.raises(wire.MalformedAnswerError, match=r"\(byte 30 is b'\\xe9'\)$"):
        wire.decode_json(b'{"id": "x", "content": "a cafe\xe9"}')


def test_decode_json_error_shows_only_a_preview() -> None:
    with pytest.raises(wire.MalformedAnswerError) as caught:
        wire.decode_json(b"<" + b"x" * 10_000)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000])
def test_decode_json_of_deeply_nested_input_is_a_malformed_answer(raw: bytes) -> None:
    with pytest.raises(wire.MalformedAnswerError):
        wire.decode_json(raw)


# Arguments as an object (Ollama's native form) nested deeper than Python's writer goes, though within orjson's 1,024
# levels: the answer is malformed, as one nested beyond those is, and no RecursionError (an UNKNOWN status) escapes.
DEEP_ARGUMENTS = b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}"


@pytest.mark.usefixtures("python_recursion_limit")
def test_arguments_nested_beyond_writing_are_a_malformed_answer() -> None:
    call = b'{"id": "c1", "function": {"name": "f", "arguments": %s}}' % DEEP_ARGUMENTS
    raw = b'{"choices": [{"index": 0, "message": {"tool_calls": [%s]}}]}' % call
    with pytest.raises(wire.MalformedAnswerError, match="nested too deeply"):
        parse(wire.decode_answer_json(raw))
    # ... and where an integer beyond 64 bits has the standard library read the whole answer again.
    with pytest.raises(wire.MalformedAnswerError, match="nested too deeply"):
        parse(wire.decode_answer_json(raw.replace(b'"id": "c1"', b'"id": "c1", "n": %d' % 2**70)))
    delta = wire.decode_json(
        b'{"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": %s}}]}' % DEEP_ARGUMENTS
    )
    with pytest.raises(wire.MalformedAnswerError, match="nested too deeply"):
        wire.StreamToolCalls().deltas(delta)


def test_a_plain_answer() -> None:
    message = parse(answer({"role": "assistant", "content": "Hello"}))
    assert message == Message(Role.ASSISTANT, "Hello")


def test_null_content_is_empty_text() -> None:
    assert parse(answer({"role": "assistant", "content": None})).content == ""
    assert parse(answer({"role": "assistant"})).content == ""


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"reasoning": "ollama style"}, "ollama style"),
        ({"reasoning_content": "llama.cpp style"}, "llama.cpp style"),
        ({"reasoning": "first", "reasoning_content": "second"}, "first"),
        ({"reasoning": None, "reasoning_content": "second"}, "second"),
        ({"reasoning": "", "reasoning_content": "second"}, ""),
        ({"reasoning": 5}, None),
        ({"reasoning": {"text": "x"}}, None),
        ({}, None),
    ],
)
def test_reasoning(fields: dict[str, Any], expected: str | None) -> None:
    assert parse(answer({"content": "a", **fields})).reasoning == expected
    assert wire.reasoning_text(fields) == expected


def test_reasoning_as_a_field_and_as_thinking_parts_is_both_as_a_stream_gives_it() -> None:
    # The field's was kept and the parts' dropped; a stream's delta with both gives both, the field's first.
    thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}, {"type": "text", "text": "x"}]
    message = parse(answer({"reasoning_content": "R", "content": thinking}))
    assert (message.content, message.reasoning) == ("x", "Rhmm")


def test_a_legacy_function_call_is_the_answers_one_tool_call() -> None:
    """The functions API's answer (`function_call`, finish reason "function_call"): TOOL_CALLS, and no call."""
    choice = {
        "message": {"content": None, "function_call": {"name": "a", "arguments": '{"x":1}'}},
        "finish_reason": "stop",
    }
    [call] = wire.message_from_choice(choice).tool_calls
    assert (call.name, call.arguments) == ("a", '{"x":1}') and call.id.startswith("call_")
    assert wire.answer_finish_reason(choice) is FinishReason.TOOL_CALLS
    nothing: tuple[Any, ...] = (None, {}, "auto", ["a"])
    for none in nothing:  # a side field: what is no call is no call, and not the answer's failure
        plain = {"message": {"content": "hi", "function_call": none}, "finish_reason": "stop"}
        assert wire.message_from_choice(plain).tool_calls == ()
        assert wire.answer_finish_reason(plain) is FinishReason.STOP
    # tool_calls first, where a server sends both
    both = {"tool_calls": [{"id": "c", "function": {"name": "b", "arguments": "{}"}}], "function_call": {"name": "a"}}
    assert [c.name for c in wire.message_from_choice({"message": both}).tool_calls] == ["b"]


def test_tool_calls() -> None:
    message = parse(
        answer(
            {
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": {"b": [1, "ø"]}}},
                    {"id": None, "function": {"name": "h"}},
                    {"id": "", "function": {"name": "i"}},
                ],
            }
        )
    )
    assert message.content == ""
    assert message.tool_calls[0] == ToolCall("call_1", "f", '{"a": 1}')
    assert message.tool_calls[1].name == "g"
    assert message.tool_calls[1].arguments == '{"b": [1, "ø"]}'  # object arguments become JSON text, letters kept
    # A call the upstream gave no id gets one, which its tool message can name; each its own.
    made = [call.id for call in message.tool_calls[2:]]
    assert [(call.name, call.arguments) for call in message.tool_calls[2:]] == [("h", ""), ("i", "")]
    assert all(call_id.startswith("call_") for call_id in made) and len(set(made)) == 2


@pytest.mark.parametrize(
    ("extra", "signature"),
    [
        ({"google": {"thought_signature": "c2ln"}}, "c2ln"),
        ({"google": {"thought_signature": ""}}, None),
        ({"google": {"thought_signature": 7}}, None),
        ({"google": "c2ln"}, None),
        ({"other": {}}, None),
        ("c2ln", None),
        (None, None),
    ],
)
def test_a_calls_signature_is_read_and_one_of_another_shape_dropped(extra: Any, signature: str | None) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}, "extra_content": extra}
    assert parse(answer({"content": None, "tool_calls": [call]})).tool_calls == (
        ToolCall("call_1", "f", "{}", signature),
    )
    calls = wire.StreamToolCalls()
    assert calls.deltas({"tool_calls": [call]}) == (ToolCallDelta(0, "call_1", "f", "{}", signature),)


@pytest.mark.parametrize("calls", [None, [], 0, ""])
def test_no_tool_calls(calls: Any) -> None:
    assert parse(answer({"content": "x", "tool_calls": calls})).tool_calls == ()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "expected a JSON object"),
        ("text", "expected a JSON object"),
        ({}, "no `choices` list"),
        ({"choices": {"0": {}}}, "no `choices` list"),
        ({"choices": []}, "no choice with index 0"),
        ({"choices": ["x"]}, "no `message` object"),
        ({"choices": [{"message": "x"}]}, "no `message` object"),
        ({"choices": [{"delta": {}}]}, "no `message` object"),
        (answer({"content": 5}), "`content` is not a string"),
        (answer({"content": ["part"]}), "a part of `content` is not an object"),
        (answer({"tool_calls": {"id": "x"}}), "`tool_calls` is not a list"),
        (answer({"tool_calls": ["x"]}), "no `function` object"),
        (answer({"tool_calls": [{"id": "x", "function": "f"}]}), "no `function` object"),
        (answer({"tool_calls": [{"id": 7, "function": {"name": "f"}}]}), "`tool_calls.id` is not a string"),
        # No request declares a function of no name, or of one outside the rule: no call the caller could answer.
        (answer({"tool_calls": [{"id": "x", "function": {"name": None}}]}), "`name` '' is no function's"),
        (answer({"tool_calls": [{"id": "x", "function": {"name": "functions.f"}}]}), "'functions.f' is no function's"),
        (answer({"tool_calls": [{"id": "x", "function": {"name": 1}}]}), "`name` is not a string"),
    ],
)
def test_malformed_answers(data: Any, match: str | None) -> None:
    if match is None:
        parse(data)
        return
    with pytest.raises(wire.MalformedAnswerError, match=match):
        parse(data)


def test_first_choice_of_stream_chunks() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "He"}, "finish_reason": None}]}
    assert wire.first_choice(chunk, "delta") == chunk["choices"][0]
    # the usage chunk of a stream has no choices, or an empty list: nothing to read, no error
    assert wire.first_choice({"usage": {}}, "delta") is None
    assert wire.first_choice({"choices": []}, "delta") is None
    assert wire.first_choice({"choices": None}, "delta") is None
    # a choice without a delta (a bare finish) is fine
    assert wire.first_choice({"choices": [{"finish_reason": "stop"}]}, "delta") == {"finish_reason": "stop"}
    with pytest.raises(wire.MalformedAnswerError):
        wire.first_choice({"choices": [{"delta": "x"}]}, "delta")
    with pytest.raises(wire.MalformedAnswerError):
        wire.first_choice({"choices": "x"}, "delta")


def test_only_choice_zero_is_read() -> None:
    """The gateway asks for one choice: an upstream that sends more never gets two texts merged."""
    second, first = {"index": 1, "delta": {"content": "B"}}, {"index": 0, "delta": {"content": "A"}}
    assert wire.first_choice({"choices": [second, first]}, "delta") == first
    assert wire.first_choice({"choices": [second]}, "delta") is None
    message = {"choices": [{"index": 1, "message": {"content": "B"}}, {"index": 0, "message": {"content": "A"}}]}
    assert wire.first_choice(message, "message") == message["choices"][1]
    with pytest.raises(wire.MalformedAnswerError, match="index 0"):
        wire.first_choice({"choices": [{"index": 1, "message": {"content": "B"}}]}, "message")


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"choices": []}, None),
        ({"error": {"message": "boom", "code": 500}}, wire.ErrorEvent("boom", 500, None)),
        (
            {"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
            wire.ErrorEvent("slow down", None, "rate_limit_exceeded", 429),
        ),
        # Without a status: the one its code's name comes with, else its type's; a status given is the one.
        (
            {"error": {"message": "no", "code": "invalid_value", "type": "invalid_request_error"}},
            wire.ErrorEvent("no", None, "invalid_value", 400),
        ),
        (
            {"error": {"message": "no", "code": 400, "type": "rate_limit_error"}},
            wire.ErrorEvent("no", 400, "rate_limit_error"),
        ),
        ({"error": {"code": 99}}, wire.ErrorEvent("the upstream sent an error event", None, None)),
        # A status as text (LiteLLM proxy's): the status, as a number is, and the type says more; it was a code.
        ({"error": {"message": "bad", "code": "400", "type": "invalid"}}, wire.ErrorEvent("bad", 400, "invalid")),
        ({"error": {"message": "slow", "code": "429"}}, wire.ErrorEvent("slow", 429, None)),
        ({"error": {"message": "x", "code": "1302", "type": "t"}}, wire.ErrorEvent("x", None, "t")),
        ({"error": {"message": "x", "code": "200"}}, wire.ErrorEvent("x", None, None)),
        ({"error": {"message": "x", "code": True}}, wire.ErrorEvent("x", None, None)),
        ({"error": "overloaded"}, wire.ErrorEvent("overloaded", None, None)),
        ({"error": [1]}, wire.ErrorEvent("the upstream sent an error event that is not an object", None, None)),
    ],
)
def test_error_events(event: dict[str, Any], expected: wire.ErrorEvent | None) -> None:
    assert wire.error_event(event) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("tool_calls", FinishReason.TOOL_CALLS),
        ("function_call", FinishReason.TOOL_CALLS),
        ("content_filter", FinishReason.CONTENT_FILTER),
        ("eos", FinishReason.UNKNOWN),
        (None, FinishReason.UNKNOWN),
        (3, FinishReason.UNKNOWN),
        ([], FinishReason.UNKNOWN),
        ({}, FinishReason.UNKNOWN),
        (["stop"], FinishReason.UNKNOWN),
    ],
)
def test_finish_reason(value: Any, expected: FinishReason) -> None:
    assert wire.finish_reason(value) is expected


def test_usage_with_details() -> None:
    data = {
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "completion_tokens_details": {"reasoning_tokens": 12},
            "prompt_tokens_details": {"cached_tokens": 64},
        }
    }
    assert wire.usage_from(data) == TokenUsage(120, 30, reasoning_tokens=12, cached_prompt_tokens=64)
    assert wire.usage_from(data) == TokenUsage(120, 30, estimated=False, reasoning_tokens=12, cached_prompt_tokens=64)


def counts(prompt: int, completion: int, total: int | None = None, reasoning: int | None = None) -> dict[str, Any]:
    """An OpenAI-format usage object with these counts (those None left out)."""
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if total is not None:
        usage["total_tokens"] = total
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # Gemini's OpenAI endpoint: a thinking model's thoughts in total_tokens alone.
        (counts(9, 3, total=1105), TokenUsage(9, 1096, reasoning_tokens=1093)),
        # xAI: in reasoning_tokens, beside completion_tokens, and in total_tokens; and without a total.
        (counts(10, 5, total=1015, reasoning=1000), TokenUsage(10, 1005, reasoning_tokens=1000)),
        (counts(10, 5, reasoning=1000), TokenUsage(10, 1005, reasoning_tokens=1000)),
        # OpenAI's: within the completion, as the total says.
        (counts(10, 500, total=510, reasoning=400), TokenUsage(10, 500, reasoning_tokens=400)),
    ],
)
def test_thoughts_reported_beside_the_completion_are_billed_in_it(usage: dict[str, Any], expected: TokenUsage) -> None:
    """Thoughts counted outside completion_tokens were never billed (the answer, the ledger, the limits): most of a
    thinking model's output, at its output price."""
    assert wire.usage_from({"usage": usage}) == expected


def test_usage_without_details() -> None:
    assert wire.usage_from({"usage": {"prompt_tokens": 7, "completion_tokens": 0}}) == TokenUsage(7, 0)


def test_a_usage_of_no_prompt_tokens_is_none() -> None:
    """No prompt is 0 tokens: Ollama's /v1 reports all zeros for an answer that ended without its metrics."""
    assert wire.usage_from({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}) is None
    assert wire.usage_from({"usage": {"prompt_tokens": 0, "completion_tokens": 5}}) is None
    assert wire.embedding_usage_from({"usage": {"prompt_tokens": 0, "total_tokens": 0}}) is None


def test_a_usages_parts_past_its_prompt_are_cut_to_it() -> None:
    usage = wire.plausible_usage(TokenUsage(10, 2, cached_prompt_tokens=12, cache_write_prompt_tokens=3))
    assert usage == TokenUsage(10, 2, cached_prompt_tokens=10, cache_write_prompt_tokens=0)
    usage = wire.plausible_usage(TokenUsage(10, 2, cached_prompt_tokens=4, cache_write_prompt_tokens=9))
    assert usage == TokenUsage(10, 2, cached_prompt_tokens=4, cache_write_prompt_tokens=6)
    within = TokenUsage(10, 2, cached_prompt_tokens=4, cache_write_prompt_tokens=6)
    assert wire.plausible_usage(within) is within


@pytest.mark.parametrize(
    "details",
    [
        {"completion_tokens_details": None, "prompt_tokens_details": None},
        {"completion_tokens_details": [], "prompt_tokens_details": "x"},
        {"completion_tokens_details": {"reasoning_tokens": "12"}, "prompt_tokens_details": {"cached_tokens": 1.5}},
    ],
)
def test_garbage_usage_details_are_dropped(details: dict[str, Any]) -> None:
    usage = wire.usage_from({"usage": {"prompt_tokens": 5, "completion_tokens": 6, **details}})
    assert usage == TokenUsage(5, 6)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"usage": None},
        {"usage": "lots"},
        {"usage": []},
        {"usage": {}},
        {"usage": {"prompt_tokens": 5}},
        {"usage": {"completion_tokens": 5}},
        {"usage": {"prompt_tokens": "5", "completion_tokens": 6}},
        {"usage": {"prompt_tokens": 5.0, "completion_tokens": 6}},
        {"usage": {"prompt_tokens": None, "completion_tokens": None}},
    ],
)
def test_missing_or_garbage_usage_is_none(data: dict[str, Any]) -> None:
    assert wire.usage_from(data) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": True, "completion_tokens": 6},
        {"prompt_tokens": 5, "completion_tokens": False},
        {"prompt_tokens": -5, "completion_tokens": 6},
        {"prompt_tokens": 5, "completion_tokens": 2**31},
        # Each count fits the contract's int32; their total does not.
        {"prompt_tokens": 2**30, "completion_tokens": 2**30},
        {"prompt_tokens": 2**31 - 1, "completion_tokens": 1},
    ],
)
def test_impossible_usage_counts_are_none(usage: dict[str, Any]) -> None:
    assert wire.usage_from({"usage": usage}) is None


def test_usage_whose_total_just_fits_is_kept() -> None:
    assert wire.usage_from({"usage": {"prompt_tokens": 2**31 - 2, "completion_tokens": 1}}) == TokenUsage(2**31 - 2, 1)


def test_tool_call_deltas() -> None:
    delta = {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
            {"index": 1, "function": {"name": "g", "arguments": '{"a":'}},
            {"function": {"name": "h", "arguments": {"b": 2}}},  # no index: its position; objects become JSON text
            {"index": 7, "function": {"name": "i"}},
        ]
    }
    calls = wire.StreamToolCalls()
    # A call whose arguments have not begun waits for them (its name may come in pieces until then), or the end.
    others = calls.deltas(delta)
    # The first fragment of a call the upstream gave no id carries one of the gateway's own.
    assert [(d.index, d.name, d.arguments) for d in others] == [(1, "g", '{"a":'), (2, "h", '{"b": 2}')]
    first, last = calls.rest()
    assert first == ToolCallDelta(index=0, id="call_1", name="f")
    assert (last.index, last.name, last.arguments) == (7, "i", None)
    made = [d.id for d in [*others, last]]
    assert all(call_id and call_id.startswith("call_") for call_id in made) and len(set(made)) == 3
    # ... and only the first: the fragments after it add to the call it began.
    assert calls.deltas({"tool_calls": [{"index": 1, "function": {"arguments": "1}"}}]}) == (
        ToolCallDelta(index=1, arguments="1}"),
    )


def test_a_streamed_calls_signature_is_relayed_once() -> None:
    # The contract has it whole in one fragment; a server that repeats it (as vLLM repeats ids) sends it once.
    calls = wire.StreamToolCalls()
    signed = {"google": {"thought_signature": "c2ln"}}
    first = {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}, "extra_content": signed}
    again = {"index": 0, "id": "a", "function": {"arguments": "}"}, "extra_content": signed}
    other = {"index": 1, "id": "b", "function": {"name": "g"}, "extra_content": signed}
    assert [d.signature for d in calls.deltas({"tool_calls": [first, again, other]})] == ["c2ln", None]
    assert [d.signature for d in calls.rest()] == ["c2ln"]  # `other`, whose arguments never began


def test_a_whole_answers_signed_call_keeps_its_signature_as_a_stream() -> None:
    message = Message(Role.ASSISTANT, "", tool_calls=(ToolCall("a", "f", "{}", signature="c2ln"),))
    content, _ = wire.whole_answer_chunks("id", "b", "m", message, FinishReason.TOOL_CALLS, None)
    assert content.tool_calls == (ToolCallDelta(0, "a", "f", "{}", "c2ln"),)


def test_fragments_without_an_index_are_of_the_call_their_id_or_name_begins_else_of_the_last() -> None:
    calls = wire.StreamToolCalls()

    def indexes(*fragments: dict[str, Any]) -> list[int]:
        return [d.index for d in calls.deltas({"tool_calls": list(fragments)})]

    assert indexes({"id": "a", "function": {"name": "f", "arguments": "{"}}, {"function": {"arguments": "}"}}) == [0, 0]
    assert indexes({"id": "b", "function": {"name": "g", "arguments": "{}"}}) == [1]  # a new id: a new call
    # a name without an id: a new call, numbered by the gateway
    assert indexes({"function": {"name": "h", "arguments": "{}"}}) == [2]
    assert indexes({"id": "a", "function": {"arguments": " "}}, {"function": {"arguments": " "}}) == [0, 0]
    assert indexes(
        {"index": 5, "id": "c", "function": {"name": "f", "arguments": "{"}},
        {"function": {"name": "g", "arguments": "{"}},
    ) == [5, 6]


def test_content_as_parts_is_its_text_and_its_thinking_the_reasoning() -> None:
    """Mistral's reasoning models answer with `content` as a list of parts: it failed as a malformed answer."""
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Let me "}, {"type": "text", "text": "see."}]}
    parts = [
        thinking,
        {"type": "text", "text": "It is "},
        {"type": "reference", "ids": [1]},
        {"type": "text", "text": "4."},
    ]
    message = wire.message_from_choice({"message": {"role": "assistant", "content": parts}})
    assert (message.content, message.reasoning) == ("It is 4.", "Let me see.")
    assert wire.content_parts([{"type": "thinking", "thinking": "plain"}], "content") == (None, "plain")
    for bad in ("x" and 5, [{"type": "text", "text": 5}], [None]):
        with pytest.raises(wire.MalformedAnswerError):
            wire.content_parts(bad, "content")


def test_an_index_a_call_had_is_a_new_call_when_another_id_comes_with_it() -> None:
    """Ollama sends parallel calls whole, each as index 0, each with its own id; vLLM sends every fragment with its
    call's id; OpenAI the id with the first fragment alone."""
    calls = wire.StreamToolCalls()

    def indexes(*fragments: dict[str, Any]) -> list[int]:
        return [d.index for d in calls.deltas({"tool_calls": list(fragments)})]

    assert indexes({"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}) == [0]
    assert indexes({"index": 0, "id": "b", "function": {"name": "g", "arguments": "{"}}) == [1]
    assert indexes({"index": 0, "function": {"arguments": "}"}}) == [1], "the index names its latest call"
    assert indexes({"index": 0, "id": "b", "function": {"arguments": " "}}) == [1], "an id names its call"
    assert indexes(
        {"index": 1, "id": "c", "function": {"name": "h", "arguments": "{"}}, {"index": 1, "function": {}}
    ) == [
        2,
        2,
    ]
    assert indexes({"index": 0, "id": "a", "function": {"arguments": " "}}) == [0]
    # Without a name, a new id is no new call: Poolside's and older mlx-openai-server's fragments each have their own.
    assert indexes({"index": 1, "id": "d", "function": {"arguments": "}"}}) == [2]
    last = wire.MAX_TOOL_CALLS - 1
    crowded = wire.StreamToolCalls()
    crowded.deltas({"tool_calls": [{"index": last, "id": "x", "function": {"name": "f"}}]})
    with pytest.raises(wire.MalformedAnswerError, match="more than"):  # numbered after the last there may be
        crowded.deltas({"tool_calls": [{"index": last, "id": "y", "function": {"name": "f"}}]})


def test_parallel_calls_given_one_id_stay_apart_each_with_its_own() -> None:
    """Some servers give parallel calls one id: the second call's fragments were run into the first's."""
    calls = wire.StreamToolCalls()

    def deltas(*fragments: dict[str, Any]) -> list[tuple[int, str | None, str | None]]:
        return [(d.index, d.id, d.arguments) for d in calls.deltas({"tool_calls": list(fragments)})]

    assert deltas({"index": 0, "id": "call_0", "function": {"name": "f", "arguments": '{"x": '}}) == [
        (0, "call_0", '{"x": ')
    ]
    [(index, made, _)] = deltas({"index": 1, "id": "call_0", "function": {"name": "f", "arguments": '{"x": '}})
    assert index == 1 and made and made.startswith("call_") and made != "call_0"
    # Later fragments with the id again (as vLLM sends them), with or without the name: of the call at their index.
    assert deltas(
        {"index": 1, "id": "call_0", "function": {"arguments": "2"}},
        {"index": 0, "id": "call_0", "function": {"arguments": "1"}},
        {"index": 1, "id": "call_0", "function": {"name": "f", "arguments": "}"}},
    ) == [(1, None, "2"), (0, None, "1"), (1, None, "}")]


@pytest.mark.parametrize("numbered", [True, False], ids=["both at index 0", "no index"])
def test_whole_calls_given_one_id_at_one_index_or_none_stay_apart(numbered: bool) -> None:
    """Both calls whole, each with the one id (an OpenRouter engine's at index 0; Gemini's shape with no index): the
    second's arguments were run into the first's."""
    calls = wire.StreamToolCalls()
    at = {"index": 0} if numbered else {}

    def whole(city: str) -> dict[str, Any]:
        return at | {"id": "call_0", "function": {"name": "weather", "arguments": f'{{"city": "{city}"}}'}}

    first, second = (calls.deltas({"tool_calls": [whole(city)]})[0] for city in ("Oslo", "Rome"))
    assert (first.index, first.id, first.arguments) == (0, "call_0", '{"city": "Oslo"}')
    assert second.index == 1 and second.id and second.id != "call_0" and second.arguments == '{"city": "Rome"}'
    # vLLM's shape still adds up to one call: its id and name again while its arguments come.
    vllm = wire.StreamToolCalls()
    pieces = [{"index": 0, "id": "c", "function": {"name": "f", "arguments": part}} for part in ('{"x"', ": 1", "}")]
    assert [d.index for d in vllm.deltas({"tool_calls": pieces})] == [0, 0, 0]


def test_a_call_whose_id_and_name_come_with_every_fragment_is_not_parsed_at_every_fragment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM's shape: parsing the arguments so far at each fragment, to tell whether another call begins, cost a long
    call's arguments their length squared."""
    parsed: list[str] = []
    loads = orjson.loads

    def counted(text: str) -> Any:
        parsed.append(text)
        return loads(text)

    monkeypatch.setattr(orjson, "loads", counted)
    arguments = json.dumps({"code": "x" * 5000, "files": [{"name": "a"}, {"name": "b"}]})
    calls = wire.StreamToolCalls()
    for start in range(0, len(arguments), 5):
        piece = {"index": 0, "id": "c", "function": {"name": "write", "arguments": arguments[start : start + 5]}}
        assert [d.index for d in calls.deltas({"tool_calls": [piece]})] == [0]
    assert len(parsed) <= 4, "parsed only where the text so far ends as an object or array does"


def assembled(*deltas: list[dict[str, Any]], tools: Sequence[str] = ()) -> list[tuple[str | None, str, str]]:
    """The calls a stream of these deltas' fragments adds up to, as the SDKs' assemblers put them together (a call's
    id and name from its first fragment, which alone has them), each as (the upstream's id or None, name, arguments);
    `tools`, the names of the request's tools."""
    calls = wire.StreamToolCalls(tools)
    fragments = [d for fragments in deltas for d in calls.deltas({"tool_calls": fragments})] + list(calls.rest())
    made: dict[int, list[Any]] = {}
    for d in fragments:
        if d.index in made:
            assert d.id is None and d.name is None, "a call's id and name in its first fragment alone"
            made[d.index][2] += d.arguments or ""
        else:
            assert d.id and d.name, "a call's first fragment carries its id and name"
            made[d.index] = [d.id, d.name, d.arguments or ""]
    return [(i if not i.startswith("call_") else None, n, a) for i, n, a in (made[k] for k in sorted(made))]


def unary(*calls: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    message = wire.message_from_choice({"message": {"tool_calls": list(calls)}})
    return [(c.id if not c.id.startswith("call_") else None, c.name, c.arguments) for c in message.tool_calls]


def piece(index: int, call_id: str | None = None, name: str | None = None, arguments: str | None = None) -> Any:
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    return {"index": index, "function": function} | ({"id": call_id} if call_id else {})


@pytest.mark.parametrize(
    ("deltas", "whole"),
    [
        # The name in pieces before the arguments begin: it was cut to its first ("wea").
        (
            [[piece(0, "a", "wea", "")], [piece(0, name="ther", arguments='{"c":1}')]],
            [piece(0, "a", "weather", '{"c":1}')],
        ),
        ([[piece(0, "a", "w")], [piece(0, name="ea")], [piece(0, name="ther")]], [piece(0, "a", "weather")]),
        # The name after the call's first fragment: the stream was malformed.
        (
            [[piece(0, "a", None, "")], [piece(0, name="weather", arguments='{"c":1}')]],
            [piece(0, "a", "weather", '{"c":1}')],
        ),
        # Another name at the index of a call whose arguments are whole, without an id: it ran into that call.
        (
            [[piece(0, None, "a", '{"x":1}')], [piece(0, None, "b", '{"y":2}')]],
            [piece(0, None, "a", '{"x":1}'), piece(0, None, "b", '{"y":2}')],
        ),
        (
            [[piece(0, None, "a", '{"x":1}')], [piece(0, None, "b", "")], [piece(0, arguments="{}")]],
            [piece(0, None, "a", '{"x":1}'), piece(0, None, "b", "{}")],
        ),
        # The call's id and name again, with no arguments, once they are whole: a second call ("a", "").
        ([[piece(0, "a", "a", '{"x":1}')], [piece(0, "a", "a", "")]], [piece(0, "a", "a", '{"x":1}')]),
        ([[piece(0, "a", "a", '{"x":1}')], [piece(0, "a", "a", " ")]], [piece(0, "a", "a", '{"x":1} ')]),
        # vLLM's: the id and the whole name with every piece; its own name again, without an id, with more arguments.
        ([[piece(0, "a", "f", p)] for p in ("", '{"x"', ": 1}", "")], [piece(0, "a", "f", '{"x": 1}')]),
        ([[piece(0, None, "f", p)] for p in ('{"x"', ": 1}", " ")], [piece(0, None, "f", '{"x": 1} ')]),
        # Parallel calls of one function, each whole at index 0 without an id (an OpenRouter engine's): two calls,
        # not one whose arguments are two objects.
        (
            [[piece(0, None, "f", '{"x":1}')], [piece(0, None, "f", '{"x":2}')]],
            [piece(0, None, "f", '{"x":1}'), piece(0, None, "f", '{"x":2}')],
        ),
    ],
)
def test_a_streams_calls_add_up_to_the_whole_answers(deltas: list[list[dict[str, Any]]], whole: list[Any]) -> None:
    assert assembled(*deltas) == unary(*whole)


@pytest.mark.parametrize(
    ("deltas", "whole"),
    [
        # Whole calls at index 0 (an OpenRouter engine's), the first without arguments: one call, "clockdate".
        (
            [[piece(0, None, "clock", "")], [piece(0, None, "date", "")]],
            [piece(0, None, "clock", ""), piece(0, None, "date", "")],
        ),
        (
            [[piece(0, None, "clock", "")], [piece(0, None, "weather", '{"c":1}')]],
            [piece(0, None, "clock", ""), piece(0, None, "weather", '{"c":1}')],
        ),
        (
            [[piece(0, "a", "clock", "")], [piece(0, "a", "weather", '{"c":1}')]],
            [piece(0, "a", "clock", ""), piece(0, "a", "weather", '{"c":1}')],
        ),
        # Pieces that repeat the name so far: "ha".
        (
            [[piece(0, "a", "ha", "")], [piece(0, None, "ha", "")], [piece(0, arguments='{"c":1}')]],
            [piece(0, "a", "haha", '{"c":1}')],
        ),
        # As without tools: the name in pieces, the name second, vLLM's repeats, another name at one index.
        (
            [[piece(0, "a", "wea", "")], [piece(0, name="ther", arguments='{"c":1}')]],
            [piece(0, "a", "weather", '{"c":1}')],
        ),
        (
            [[piece(0, "a", None, "")], [piece(0, name="weather", arguments='{"c":1}')]],
            [piece(0, "a", "weather", '{"c":1}')],
        ),
        (
            [[piece(0, "a", "weather")]] + [[piece(0, "a", "weather", p)] for p in ('{"c"', ":1}")],
            [piece(0, "a", "weather", '{"c":1}')],
        ),
        ([[piece(0, "a", "weather", p)] for p in ("", '{"c"', ":1}", "")], [piece(0, "a", "weather", '{"c":1}')]),
        (
            [[piece(0, None, "clock", '{"x":1}')], [piece(0, None, "date", '{"y":2}')]],
            [piece(0, None, "clock", '{"x":1}'), piece(0, None, "date", '{"y":2}')],
        ),
    ],
)
def test_a_streams_calls_add_up_to_the_whole_answers_by_the_requests_tools(
    deltas: list[list[dict[str, Any]]], whole: list[Any]
) -> None:
    """A held call (its arguments not begun) took the next call's name, at its index, as a piece of its own."""
    assert assembled(*deltas, tools=("clock", "date", "weather", "ha", "haha")) == unary(*whole)


def test_a_held_call_another_call_follows_is_released_as_it_stands() -> None:
    calls = wire.StreamToolCalls(("clock", "date"))
    assert calls.deltas({"tool_calls": [piece(0, None, "clock", "")]}) == ()
    [clock, date] = calls.deltas({"tool_calls": [piece(0, None, "date", "{}")]})
    assert (clock.index, clock.name, clock.arguments, date.index, date.name, date.arguments) == (
        0,
        "clock",
        None,
        1,
        "date",
        "{}",
    )
    assert calls.rest() == ()


def test_another_name_for_a_call_whose_arguments_have_begun_is_malformed() -> None:
    """Not dropped: whose arguments they are is not told, nor where the other call's begin."""
    calls = wire.StreamToolCalls()
    calls.deltas({"tool_calls": [piece(0, "a", "weather", '{"c":')]})
    with pytest.raises(wire.MalformedAnswerError, match="came after its arguments began"):
        calls.deltas({"tool_calls": [piece(0, name="clock", arguments="1}")]})


def test_a_whole_answers_calls_given_one_id_each_get_their_own() -> None:
    call = {"type": "function", "id": "call_0", "function": {"name": "f", "arguments": "{}"}}
    message = wire.message_from_choice({"message": {"role": "assistant", "tool_calls": [call, call, call]}})
    ids = [c.id for c in message.tool_calls]
    assert ids[0] == "call_0" and len(set(ids)) == 3, ids


@pytest.mark.parametrize(
    "fragments",
    [
        [{"index": 0}],
        [{"index": 0, "function": {"name": ""}}],
        [{"function": {"name": "a.b"}}],
        [{"index": 0, "id": "a", "function": {"arguments": ""}}, {"index": 0, "function": {"arguments": "{}"}}],
        [{"index": 0, "function": {"name": "ab"}}, {"index": 0, "function": {"name": ".c"}}],
        [{"index": 0, "function": {"name": "a" * 40}}, {"index": 0, "function": {"name": "b" * 40}}],
    ],
)
def test_a_call_without_a_name_a_tool_can_have_is_malformed(fragments: list[dict[str, Any]]) -> None:
    """By the time its arguments begin, or the stream ends where they never do."""
    calls = wire.StreamToolCalls()
    with pytest.raises(wire.MalformedAnswerError, match="is no function's"):
        calls.deltas({"tool_calls": fragments})
        calls.rest()


@pytest.mark.parametrize("delta", [{}, {"tool_calls": None}, {"tool_calls": []}, {"content": "x"}])
def test_no_tool_call_deltas(delta: dict[str, Any]) -> None:
    assert wire.StreamToolCalls().deltas(delta) == ()


@pytest.mark.parametrize(
    "calls",
    [
        {"index": 0},
        "x",
        5,
        [None],
        [["x"]],
        ["x"],
        # a call whose function is not an object
        [{"index": 0, "function": "f"}],
        [{"index": 0, "function": ["f"]}],
        [{"index": 0, "function": 1}],
        [{"index": 0, "function": True}],
    ],
)
def test_malformed_tool_call_deltas(calls: Any) -> None:
    with pytest.raises(wire.MalformedAnswerError):
        wire.StreamToolCalls().deltas({"tool_calls": calls})


@pytest.mark.parametrize(
    "call",
    [
        {"index": 0, "id": 5},
        {"index": 0, "function": {"name": ["f"]}},
        {"index": 2**40},
        {"index": -1},
    ],
)
def test_tool_call_deltas_are_well_typed_or_malformed(call: dict[str, Any]) -> None:
    try:
        deltas = wire.StreamToolCalls().deltas({"tool_calls": [call]})
    except wire.MalformedAnswerError:
        return
    for d in deltas:
        assert isinstance(d.id, str | None)
        assert isinstance(d.name, str | None)
        assert isinstance(d.arguments, str | None)
        assert 0 <= d.index < 2**31


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('data: {"a": 1}', '{"a": 1}'),
        ('data:{"a": 1}', '{"a": 1}'),
        ("data:   [DONE]", "[DONE]"),
        ("data: [DONE]", wire.DONE),
        ("data:", ""),
        ("data: ", ""),
        ("", None),
        (": keep-alive", None),
        ("event: message", None),
        ("id: 5", None),
        ("retry: 1000", None),
        (" data: x", None),
        ("DATA: x", None),
        ("datax", None),
    ],
)
def test_sse_data(line: str, expected: str | None) -> None:
    assert wire.sse_data(line) == expected


# --- properties: nothing but MalformedAnswerError ever escapes ------------------------------------------------------

ANSWER_KEYS = [
    "choices", "message", "delta", "content", "reasoning", "reasoning_content", "tool_calls", "function", "name",
    "arguments", "id", "index", "type", "usage", "prompt_tokens", "completion_tokens", "completion_tokens_details",
    "prompt_tokens_details", "reasoning_tokens", "cached_tokens", "finish_reason", "role", "model",
]  # fmt: skip

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(ANSWER_KEYS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=12,
)


def _loose(shape: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the expected shape (nine times in ten), sometimes any JSON value instead."""
    return st.integers(0, 9).flatmap(lambda n: json_values if n == 0 else shape)


def _plausible(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's usual value, sometimes null or any JSON value."""
    return st.integers(0, 9).flatmap(lambda n: json_values if n == 0 else st.none() if n == 1 else value)


def answers(key: str) -> st.SearchStrategy[Any]:
    """JSON values shaped like chat completions (key "message") or stream chunks (key "delta"), broken anywhere."""
    text = st.text(max_size=6)
    function = _loose(
        st.fixed_dictionaries(
            {}, optional={"name": _plausible(text), "arguments": _plausible(text | st.dictionaries(text, json_values))}
        )
    )
    call = _loose(
        st.fixed_dictionaries(
            {"function": function},
            optional={"id": _plausible(text), "index": _plausible(st.integers()), "type": _plausible(text)},
        )
    )
    inner = _loose(
        st.fixed_dictionaries(
            {},
            optional={
                "role": _plausible(text),
                "content": _plausible(text),
                "reasoning": _plausible(text),
                "reasoning_content": _plausible(text),
                "tool_calls": _loose(st.lists(call, min_size=1, max_size=3)),
            },
        )
    )
    choice = _loose(
        st.fixed_dictionaries({key: inner}, optional={"finish_reason": _plausible(text), "index": json_values})
    )
    count = _plausible(st.integers())
    details = _loose(st.fixed_dictionaries({}, optional={"reasoning_tokens": count, "cached_tokens": count}))
    usage = _loose(
        st.fixed_dictionaries(
            {"prompt_tokens": count, "completion_tokens": count},
            optional={"completion_tokens_details": details, "prompt_tokens_details": details},
        )
    )
    return _loose(
        st.fixed_dictionaries(
            {"choices": _loose(st.lists(choice, min_size=1, max_size=2))},
            optional={"id": _plausible(text), "model": _plausible(text), "usage": usage},
        )
    )


def as_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def complete_path(raw: bytes) -> None:
    """What the provider does with a non-streamed answer (finish_reason has its own tests above)."""
    answer_path(wire.decode_json(raw))


def answer_path(data: Any) -> None:
    choice = wire.first_choice(data, "message")
    assert choice is not None
    message = wire.message_from_choice(choice)
    usage = wire.usage_from(data)
    assert isinstance(message.content, str)
    assert message.reasoning is None or isinstance(message.reasoning, str)
    for call in message.tool_calls:
        assert isinstance(call.id, str) and isinstance(call.name, str) and isinstance(call.arguments, str)
    assert usage is None or (isinstance(usage.prompt_tokens, int) and isinstance(usage.completion_tokens, int))
    assert usage is None or 0 <= usage.total_tokens < 2**31, "every usage fits the contract's int32 total_tokens"


def delta_path(raw: bytes) -> None:
    """What the provider does with one SSE payload of a stream."""
    data = wire.decode_json(raw)
    choice = wire.first_choice(data, "delta")
    wire.usage_from(data)
    if choice is None:
        return
    delta = choice.get("delta") or {}
    wire.reasoning_text(delta)
    calls = wire.StreamToolCalls()
    calls.deltas(delta)
    calls.rest()


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | answers("message").map(as_bytes))
def test_any_bytes_as_an_answer_raise_only_malformed_answer(raw: bytes) -> None:
    with contextlib.suppress(wire.MalformedAnswerError):
        complete_path(raw)


@settings(max_examples=200, deadline=None)
@given(data=answers("message"))
def test_any_json_as_an_answer_raises_only_malformed_answer(data: Any) -> None:
    with contextlib.suppress(wire.MalformedAnswerError):
        answer_path(data)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | answers("delta").map(as_bytes))
@example(raw=b'{"choices":[{"delta":{"tool_calls":[{"function":"x"}]}}]}')
def test_any_stream_payload_raises_only_malformed_answer(raw: bytes) -> None:
    with contextlib.suppress(wire.MalformedAnswerError):
        delta_path(raw)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
@example(raw=b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}]}')
def test_any_bytes_as_a_stream_payload_raise_only_malformed_answer(raw: bytes) -> None:
    # Random bytes are almost never JSON of the broken shapes above, so this one holds today.
    with contextlib.suppress(wire.MalformedAnswerError):
        delta_path(raw)


@settings(max_examples=200, deadline=None)
@given(line=st.text())
def test_sse_data_never_raises(line: str) -> None:
    payload = wire.sse_data(line)
    if line.startswith("data:"):
        assert payload is not None
        assert not payload.startswith(" ")
        assert line.endswith(payload)
    else:
        assert payload is None


@settings(max_examples=100, deadline=None)
@given(spaces=st.integers(0, 3), payload=st.text().filter(lambda s: not s.startswith(" ")))
def test_sse_data_returns_the_payload(spaces: int, payload: str) -> None:
    assert wire.sse_data("data:" + " " * spaces + payload) == payload


def whole_by_a_parse(text: str) -> bool:
    """What `_JsonSoFar.whole` says, the slow way: the text is JSON, opening with a bracket."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return text.lstrip()[:1] in ("{", "[")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(alphabet='{}[]"\\ab \n:,'),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='{}[]"\\a'), inner, max_size=3),
    ),
    st.text(alphabet=' \n{}[]"\\x1', max_size=4),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=30),
)
@example({"a": '"\\}'}, "", [1])
@example([{"a": 1}], " x", [3])
def test_arguments_are_told_whole_as_a_parse_of_all_of_them_says_after_every_fragment(
    value: Any, after: str, cuts: list[int]
) -> None:
    """Their nesting followed as they come, escapes and brackets within strings split across fragments anywhere."""
    text = json.dumps(value) + after
    so_far = wire._JsonSoFar()
    at = 0
    for cut in itertools.cycle(cuts):
        if at >= len(text):
            break
        so_far.add(text[at : at + cut])
        at += cut
        assert so_far.whole == whole_by_a_parse(text[:at]), text[:at]


def test_a_long_calls_name_with_every_fragment_costs_its_arguments_length_not_its_square() -> None:
    """vLLM repeats a call's name with every fragment, and a list of small objects ends as an object does at almost
    every one: each was a parse of everything so far (16,000 items: 15 s)."""
    calls = wire.StreamToolCalls()
    items = [f'{{"row": {i}}}' for i in range(16_000)]
    fragments = ["[", items[0], *(f",{item}" for item in items[1:]), "]"]  # each but the first and last ends in }
    parses = 0
    real_loads = orjson.loads

    def counted(text: str | bytes) -> Any:
        nonlocal parses
        parses += 1
        return real_loads(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(orjson, "loads", counted)
        for fragment in fragments:
            call = {"index": 0, "id": "call_a", "function": {"name": "rows", "arguments": fragment}}
            calls.deltas({"tool_calls": [call]})
    assert parses <= 1
