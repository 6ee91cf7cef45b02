"""Protobuf <-> domain: request validation (every violation, with its field path) and answers back to protobuf."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmrelay import v1 as pb
from llmrelay_server import convert
from llmrelay_server.domain import (
    MAX_TOKEN_COUNT,
    Attempt,
    AttemptOutcome,
    CompletionChunk,
    CompletionOptions,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ImageDetail,
    ImagePart,
    InvalidRequestError,
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
from llmrelay_server.images import MEDIA_TYPES
from support import chat, jpeg, png, struct, tool, user

PNG_1X1 = png(1, 1)
JPEG_1X1 = jpeg(1, 1)


def fields_of(request: pb.CompleteRequest) -> list[str]:
    with pytest.raises(InvalidRequestError) as caught:
        convert.completion_request(request)
    assert str(caught.value) == "; ".join(f"{v.field}: {v.description}" for v in caught.value.violations)
    return sorted(v.field for v in caught.value.violations)


# --- valid requests -------------------------------------------------------------------------------------------------


def test_a_minimal_request() -> None:
    request = convert.completion_request(pb.CompleteRequest(messages=[user()]))
    assert request == CompletionRequest(messages=(Message(Role.USER, "hi"),))
    assert request.model is None
    assert request.exact_model is False
    assert request.options == CompletionOptions()


def test_empty_options_are_all_unset() -> None:
    request = convert.completion_request(chat(options=pb.CompletionOptions()))
    assert request.options == CompletionOptions()
    assert all(getattr(request.options, f) is None for f in ("temperature", "top_p", "max_tokens", "seed"))
    assert request.options.tool_choice is None
    assert request.options.response_format is None
    assert request.options.reasoning_effort is None


def test_every_field_maps_to_the_domain() -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    request = pb.CompleteRequest(
        model="ollama/gpt-oss:20b",
        exact_model=True,
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.Message(role=pb.ROLE_USER, content="weather?", name="alice"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="call_1", function=pb.FunctionCall(name="get_weather", arguments="{}"))],
            ),
            pb.Message(role=pb.ROLE_TOOL, content="-3", tool_call_id="call_1"),
        ],
        options=pb.CompletionOptions(
            temperature=0.0,
            top_p=0.0,
            max_tokens=1,
            stop=["\n", "END"],
            seed=0,
            response_format=pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                json_schema=pb.JsonSchema(name="answer", description="d", schema=struct(schema), strict=False),
            ),
            tools=[
                pb.Tool(
                    function=pb.FunctionDefinition(
                        name="get_weather", description="by city", parameters=struct(parameters), strict=True
                    )
                ),
                tool("now"),
            ],
            tool_choice=pb.ToolChoice(function_name="get_weather"),
            reasoning_effort=pb.REASONING_EFFORT_NONE,
            presence_penalty=0.0,
            frequency_penalty=-2.0,
            parallel_tool_calls=False,
        ),
    )

    assert convert.completion_request(request) == CompletionRequest(
        model="ollama/gpt-oss:20b",
        exact_model=True,
        messages=(
            Message(Role.SYSTEM, "be brief"),
            Message(Role.USER, "weather?", name="alice"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "get_weather", "{}"),)),
            Message(Role.TOOL, "-3", tool_call_id="call_1"),
        ),
        options=CompletionOptions(
            temperature=0.0,
            top_p=0.0,
            max_tokens=1,
            stop=("\n", "END"),
            seed=0,
            response_format=ResponseFormat("json_schema", JsonSchemaFormat("answer", schema, "d", strict=False)),
            tools=(Tool("get_weather", "by city", parameters, strict=True), Tool("now")),
            tool_choice=NamedToolChoice("get_weather"),
            reasoning_effort="none",
            presence_penalty=0.0,
            frequency_penalty=-2.0,
            parallel_tool_calls=False,
        ),
    )


def test_zero_values_are_set_not_unset() -> None:
    options = convert.completion_request(
        chat(
            options=pb.CompletionOptions(
                temperature=0.0, top_p=0.0, seed=0, presence_penalty=0.0, frequency_penalty=0.0
            )
        )
    ).options
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(options, name)
        assert value == 0.0 and value is not None, name
        assert isinstance(value, float)
    assert options.seed == 0


def test_the_stream_request_converts_alike() -> None:
    request = pb.StreamCompleteRequest(
        model="m", exact_model=True, messages=[user()], options=pb.CompletionOptions(max_tokens=5)
    )
    assert convert.completion_request(request) == CompletionRequest(
        messages=(Message(Role.USER, "hi"),), model="m", exact_model=True, options=CompletionOptions(max_tokens=5)
    )


@pytest.mark.parametrize(
    ("options", "attribute", "expected"),
    [
        (pb.CompletionOptions(temperature=2.0), "temperature", 2.0),
        (pb.CompletionOptions(top_p=1.0), "top_p", 1.0),
        (pb.CompletionOptions(presence_penalty=-2.0), "presence_penalty", -2.0),
        (pb.CompletionOptions(frequency_penalty=2.0), "frequency_penalty", 2.0),
        (pb.CompletionOptions(max_tokens=10_000_000), "max_tokens", 10_000_000),
        (pb.CompletionOptions(stop=["a", "b", "c", "d"]), "stop", ("a", "b", "c", "d")),
        (pb.CompletionOptions(seed=-(2**63)), "seed", -(2**63)),
        (pb.CompletionOptions(tools=[tool("x" * 64)]), "tools", (Tool("x" * 64),)),
        (pb.CompletionOptions(tools=[tool("a-b_C9")]), "tools", (Tool("a-b_C9"),)),
        (pb.CompletionOptions(tools=[tool("f", {})]), "tools", (Tool("f", parameters={}),)),
        (pb.CompletionOptions(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_UNSPECIFIED)), "tool_choice", None),
        (
            pb.CompletionOptions(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)),
            "tool_choice",
            "none",
        ),
        (
            pb.CompletionOptions(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)),
            "tool_choice",
            "auto",
        ),
        (
            pb.CompletionOptions(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
            "tool_choice",
            "required",
        ),
        (pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_HIGH), "reasoning_effort", "high"),
        (pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_MINIMAL), "reasoning_effort", "minimal"),
        (
            pb.CompletionOptions(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)),
            "response_format",
            ResponseFormat("text"),
        ),
        (
            pb.CompletionOptions(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)),
            "response_format",
            ResponseFormat("json_object"),
        ),
        (pb.CompletionOptions(response_format=pb.ResponseFormat()), "response_format", None),
        (pb.CompletionOptions(tools=[tool("f")], parallel_tool_calls=True), "parallel_tool_calls", True),
        (pb.CompletionOptions(parallel_tool_calls=False), "parallel_tool_calls", None),
    ],
)
def test_options_at_their_bounds(options: pb.CompletionOptions, attribute: str, expected: Any) -> None:
    request = convert.completion_request(chat(options=options))
    assert getattr(request.options, attribute) == expected


def test_a_model_name_of_256_characters_is_accepted() -> None:
    assert convert.completion_request(pb.CompleteRequest(model="m" * 256, messages=[user()])).model == "m" * 256


# --- invalid requests -----------------------------------------------------------------------------------------------

OPTS = pb.CompletionOptions


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.CompleteRequest(), ["messages"]),
        (pb.CompleteRequest(model="", messages=[user()]), ["model"]),
        (pb.CompleteRequest(model="m" * 257, messages=[user()]), ["model"]),
        (pb.CompleteRequest(messages=[pb.Message(content="x")]), ["messages[0].role"]),
        (
            pb.CompleteRequest(messages=[user(), pb.Message(role=pb.Role.ValueType(99), content="x")]),
            ["messages[1].role"],
        ),
        (pb.CompleteRequest(messages=[user("")]), ["messages[0].content"]),
        (pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_TOOL, content="42")]), ["messages[0].tool_call_id"]),
        # Sent on, an upstream would refuse it in its own words (or take it unread).
        (
            pb.CompleteRequest(messages=[user(), pb.Message(role=pb.ROLE_USER, content="x", tool_call_id="call_1")]),
            ["messages[1].tool_call_id"],
        ),
        (
            pb.CompleteRequest(messages=[user(), pb.Message(role=pb.ROLE_ASSISTANT, content="x", tool_call_id="")]),
            ["messages[1].tool_call_id"],
        ),
        (
            pb.CompleteRequest(
                messages=[
                    pb.Message(
                        role=pb.ROLE_USER,
                        content="x",
                        tool_calls=[pb.ToolCall(id="c", function=pb.FunctionCall(name="f"))],
                    )
                ]
            ),
            ["messages[0].tool_calls"],
        ),
        (
            pb.CompleteRequest(
                messages=[
                    user(),
                    pb.Message(
                        role=pb.ROLE_ASSISTANT,
                        tool_calls=[
                            pb.ToolCall(id="ok", function=pb.FunctionCall(name="fine")),
                            pb.ToolCall(id="", function=pb.FunctionCall(name="bad name")),
                        ],
                    ),
                ]
            ),
            [
                "messages[1].tool_calls[1].function.name",
                "messages[1].tool_calls[1].id",
                # and the other call not answered, the chat asking the model to go on (the one without an id is
                # refused for that alone: nothing could answer it)
                "messages[1].tool_calls[0].id",
            ],
        ),
        (chat(options=OPTS(temperature=2.0001)), ["options.temperature"]),
        (chat(options=OPTS(temperature=-0.1)), ["options.temperature"]),
        (chat(options=OPTS(temperature=math.nan)), ["options.temperature"]),
        (chat(options=OPTS(temperature=math.inf)), ["options.temperature"]),
        (chat(options=OPTS(top_p=1.5)), ["options.top_p"]),
        (chat(options=OPTS(top_p=-math.inf)), ["options.top_p"]),
        (chat(options=OPTS(presence_penalty=2.5)), ["options.presence_penalty"]),
        (chat(options=OPTS(frequency_penalty=-2.5)), ["options.frequency_penalty"]),
        (
            chat(options=OPTS(frequency_penalty=math.nan)),
            ["options.frequency_penalty"],
        ),
        (chat(options=OPTS(max_tokens=0)), ["options.max_tokens"]),
        (chat(options=OPTS(max_tokens=-1)), ["options.max_tokens"]),
        (chat(options=OPTS(max_tokens=10_000_001)), ["options.max_tokens"]),
        (chat(options=OPTS(stop=["a", "b", "c", "d", "e"])), ["options.stop"]),
        (chat(options=OPTS(stop=["a", ""])), ["options.stop"]),
        (chat(options=OPTS(tools=[tool("")])), ["options.tools[0].function.name"]),
        (
            chat(options=OPTS(tools=[tool("x" * 65)])),
            ["options.tools[0].function.name"],
        ),
        (
            chat(options=OPTS(tools=[tool("ok"), tool("get.weather")])),
            ["options.tools[1].function.name"],
        ),
        (
            chat(options=OPTS(tools=[tool("f", {"type": "string"})])),
            ["options.tools[0].function.parameters"],
        ),
        (
            chat(options=OPTS(tools=[tool("f")], tool_choice=pb.ToolChoice(function_name="g"))),
            ["options.tool_choice.function_name"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(function_name=""))),
            ["options.tool_choice.function_name"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.ValueType(99)))),
            ["options.tool_choice.mode"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))),
            ["options.tool_choice.mode"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE))),
            ["options.tool_choice.mode"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO))),
            ["options.tool_choice.mode"],
        ),
        (
            chat(options=OPTS(tool_choice=pb.ToolChoice(function_name="f"))),
            ["options.tool_choice.function_name"],
        ),
        (
            chat(
                options=OPTS(
                    response_format=pb.ResponseFormat(
                        type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
                        json_schema=pb.JsonSchema(name="s", schema_json='{"type": "object"}'),
                    )
                )
            ),
            ["options.response_format.json_schema"],
        ),
        (
            chat(options=OPTS(response_format=pb.ResponseFormat(json_schema=pb.JsonSchema(name="s")))),
            ["options.response_format.json_schema"],
        ),
        (
            chat(options=OPTS(reasoning_effort=pb.ReasoningEffort.ValueType(6))),
            ["options.reasoning_effort"],
        ),
        (
            chat(options=OPTS(response_format=pb.ResponseFormat(type=pb.ResponseFormatType.ValueType(9)))),
            ["options.response_format.type"],
        ),
        (
            chat(options=OPTS(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA))),
            ["options.response_format.json_schema.name", "options.response_format.json_schema.schema_json"],
        ),
        # several at once: every violation is reported, not just the first
        (
            pb.CompleteRequest(
                model="",
                messages=[pb.Message(role=pb.ROLE_TOOL), pb.Message(role=pb.Role.ValueType(7), content="x")],
                options=OPTS(
                    temperature=3,
                    top_p=-1,
                    max_tokens=0,
                    stop=[""],
                    tools=[tool("bad name")],
                    tool_choice=pb.ToolChoice(function_name="missing"),
                    reasoning_effort=pb.ReasoningEffort.ValueType(42),
                    presence_penalty=9,
                    frequency_penalty=-9,
                    response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA),
                ),
            ),
            [
                "messages[0].tool_call_id",  # not its content: a tool may return nothing
                "messages[1].role",
                "model",
                "options.frequency_penalty",
                "options.max_tokens",
                "options.presence_penalty",
                "options.reasoning_effort",
                "options.response_format.json_schema.name",
                "options.response_format.json_schema.schema_json",
                "options.stop",
                "options.temperature",
                "options.tool_choice.function_name",
                "options.tools[0].function.name",
                "options.top_p",
            ],
        ),
    ],
)
def test_invalid_requests_name_every_field(request_: pb.CompleteRequest, fields: list[str]) -> None:
    assert fields_of(request_) == sorted(fields)
    stream = pb.StreamCompleteRequest()
    stream.ParseFromString(request_.SerializeToString())  # same field numbers: the stream request fails alike
    with pytest.raises(InvalidRequestError) as caught:
        convert.completion_request(stream)
    assert sorted(v.field for v in caught.value.violations) == sorted(fields)


def test_too_many_messages_are_refused_saying_how_many() -> None:
    request = pb.CompleteRequest(messages=[user()] * (convert.MAX_MESSAGES + 1))
    assert violations_of(request) == [
        (
            "messages",
            f"at most {convert.MAX_MESSAGES} messages are accepted; the request holds {convert.MAX_MESSAGES + 1}",
        )
    ]


# The counts of a request's repeated entries are bounded, each checked before any entry is validated: a request of
# millions of tiny entries fits the message size, and validating them held the event loop for seconds.


def many_tools(count: int) -> list[pb.Tool]:
    return [tool(f"f{i}") for i in range(count)]


def calls(count: int) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=f"c{i}", function=pb.FunctionCall(name="f", arguments="{}")) for i in range(count)]


def violations_of(
    request: pb.CompleteRequest | pb.StreamCompleteRequest | pb.CountTokensRequest,
) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequestError) as caught:
        if isinstance(request, pb.CountTokensRequest):
            convert.count_request(request)
        else:
            convert.completion_request(request)
    return [(v.field, v.description) for v in caught.value.violations]


def test_tools_up_to_the_bound_are_accepted_and_one_more_refused_naming_the_field() -> None:
    options = pb.CompletionOptions(tools=many_tools(convert.MAX_TOOLS), tool_choice=pb.ToolChoice(function_name="f7"))
    assert len(convert.completion_request(chat(options=options)).options.tools) == convert.MAX_TOOLS
    counted = convert.count_request(pb.CountTokensRequest(messages=[user()], tools=many_tools(convert.MAX_TOOLS)))
    assert len(counted.tools) == convert.MAX_TOOLS

    # The tool choice is not held to tools that were never read: the one violation is their count.
    options = pb.CompletionOptions(
        tools=many_tools(convert.MAX_TOOLS + 1), tool_choice=pb.ToolChoice(function_name="f7")
    )
    too_many = f"at most {convert.MAX_TOOLS} tools are accepted; the request holds {convert.MAX_TOOLS + 1}"
    refusal = [("options.tools", too_many)]
    assert violations_of(chat(options=options)) == refusal
    mode = pb.CompletionOptions(
        tools=many_tools(convert.MAX_TOOLS + 1), tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)
    )
    assert violations_of(chat(options=mode)) == refusal
    over = pb.CountTokensRequest(messages=[user()], tools=many_tools(convert.MAX_TOOLS + 1))
    assert violations_of(over) == [("tools", too_many)]


def test_parts_up_to_the_bound_over_all_messages_are_accepted_and_one_more_refused_naming_the_message() -> None:
    """Counted over the whole request, not a message alone: MAX_MESSAGES messages of as many parts each would hold the
    loop as long as one message of all of them."""
    half = convert.MAX_PARTS // 2
    messages = [
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="x")] * half),
        pb.Message(role=pb.ROLE_ASSISTANT, content="ok"),
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="y")] * (convert.MAX_PARTS - half)),
    ]
    request = convert.completion_request(pb.CompleteRequest(messages=messages))
    assert sum(len(m.parts) for m in request.messages) == convert.MAX_PARTS

    messages = [
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="x")] * half),
        pb.Message(role=pb.ROLE_ASSISTANT, content="ok"),
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="y")] * (convert.MAX_PARTS - half + 1)),
        pb.Message(role=pb.ROLE_ASSISTANT, content="ok", parts=[pb.ContentPart(text="z")]),  # not validated
    ]
    description = f"at most {convert.MAX_PARTS} parts are accepted, over all messages together; the request holds"
    assert violations_of(pb.CompleteRequest(messages=messages)) == [
        ("messages[2].parts", f"{description} {convert.MAX_PARTS + 2}")
    ]
    alone = pb.CountTokensRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="x")] * 600_000)])
    assert violations_of(alone) == [("messages[0].parts", f"{description} 600000")]


def test_tool_calls_up_to_the_bound_are_accepted_and_one_more_refused_naming_the_message() -> None:
    # A chat counted as it stands may end with calls not answered yet.
    assistant = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls(convert.MAX_TOOL_CALLS))
    counted = convert.count_request(pb.CountTokensRequest(messages=[user(), assistant]))
    assert len(counted.messages[1].tool_calls) == convert.MAX_TOOL_CALLS

    one_more = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls(1))
    description = f"at most {convert.MAX_TOOL_CALLS} tool calls are accepted, over all messages together"
    assert violations_of(pb.CountTokensRequest(messages=[user(), assistant, one_more])) == [
        ("messages[2].tool_calls", f"{description}; the request holds {convert.MAX_TOOL_CALLS + 1}")
    ]


def test_every_count_over_its_bound_is_reported_in_one_answer() -> None:
    messages = [
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="x")] * (convert.MAX_PARTS + 1)),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls(convert.MAX_TOOL_CALLS + 1)),
    ]
    options = pb.CompletionOptions(tools=many_tools(convert.MAX_TOOLS + 1), temperature=3)
    for request in (
        pb.CompleteRequest(messages=messages, options=options),
        pb.StreamCompleteRequest(messages=messages, options=options),
    ):
        assert sorted(field for field, _ in violations_of(request)) == [
            "messages[0].parts",
            "messages[1].tool_calls",
            "options.temperature",
            "options.tools",
        ]
    counted = pb.CountTokensRequest(messages=messages, tools=many_tools(convert.MAX_TOOLS + 1))
    assert sorted(field for field, _ in violations_of(counted)) == [
        "messages[0].parts",
        "messages[1].tool_calls",
        "tools",
    ]


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["tool", "schema"])
def test_a_non_finite_number_in_a_schema_is_an_invalid_request(number: float, where: str) -> None:
    bad = {"type": "object", "properties": {"n": {"type": "number", "maximum": number}}}
    options = (
        OPTS(tools=[tool("f", bad)])
        if where == "tool"
        else OPTS(
            response_format=pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="s", schema=struct(bad))
            )
        )
    )
    with pytest.raises(InvalidRequestError):
        convert.completion_request(chat(options=options))


# --- count requests -------------------------------------------------------------------------------------------------


def test_count_a_text() -> None:
    assert convert.count_request(pb.CountTokensRequest(model="gpt-4o", text="hello")) == (
        "gpt-4o",
        (),
        (),
        "hello",
        None,
    )
    assert convert.count_request(pb.CountTokensRequest(text="")) == (None, (), (), "", None)


def test_count_a_chat_with_tools() -> None:
    request = pb.CountTokensRequest(messages=[user("q")], tools=[tool("f", {"type": "object"})])
    assert convert.count_request(request) == (
        None,
        (Message(Role.USER, "q"),),
        (Tool("f", parameters={"type": "object"}),),
        None,
        None,
    )


def test_count_a_chat_with_its_answer_format() -> None:
    schema = pb.JsonSchema(name="answer", schema_json='{"type": "object"}')
    answer_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema)
    query = convert.count_request(pb.CountTokensRequest(messages=[user("q")], response_format=answer_format))
    assert query.response_format == ResponseFormat(
        type="json_schema", json_schema=JsonSchemaFormat(name="answer", schema=JsonText('{"type": "object"}'))
    )


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.CountTokensRequest(), ["messages"]),
        (pb.CountTokensRequest(text="x", messages=[user()]), ["text"]),
        (pb.CountTokensRequest(messages=[pb.Message(content="x")]), ["messages[0].role"]),
        (pb.CountTokensRequest(messages=[user()], tools=[tool("a b"), tool("f", {"type": "array"})]),
         ["tools[0].function.name", "tools[1].function.parameters"]),
        (pb.CountTokensRequest(text="x", tools=[tool("f")]), ["tools"]),
        (pb.CountTokensRequest(text="x", tools=[tool("")]), ["tools", "tools[0].function.name"]),
        (pb.CountTokensRequest(text="x", response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)),
         ["response_format"]),
        (pb.CountTokensRequest(messages=[user()], response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, json_schema=pb.JsonSchema(name="a", schema_json="{}"))),
         ["response_format.json_schema"]),
    ],
)  # fmt: skip
def test_invalid_count_requests(request_: pb.CountTokensRequest, fields: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        convert.count_request(request_)
    assert sorted(v.field for v in caught.value.violations) == sorted(fields)


# --- JSON text ------------------------------------------------------------------------------------------------------

SCHEMA_TEXT = '{"type": "object",  "properties": {"n": {"type": "integer", "maximum": 1152921504606846977}}}'


def text_tool(name: str, parameters_json: str) -> pb.Tool:
    return pb.Tool(function=pb.FunctionDefinition(name=name, parameters_json=parameters_json))


def json_schema_format(**fields: Any) -> pb.ResponseFormat:
    return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(**fields))


def test_json_text_is_carried_as_written() -> None:
    options = OPTS(
        tools=[text_tool("f", SCHEMA_TEXT)],
        response_format=json_schema_format(name="s", schema_json="{}"),
    )
    request = convert.completion_request(chat(options=options))
    assert request.options.tools == (Tool("f", parameters=JsonText(SCHEMA_TEXT)),)
    assert request.options.response_format == ResponseFormat("json_schema", JsonSchemaFormat("s", JsonText("{}")))


def test_json_text_with_numbers_a_double_holds_is_accepted() -> None:
    """Only numbers that overflow a double are refused: the largest one, and one that underflows to 0, pass."""
    text = (
        '{"type": "object", "maximum": 1.7976931348623157e308, "minimum": 1e-400, "n": 123456789012345678901234567890}'
    )
    request = convert.completion_request(chat(options=OPTS(tools=[text_tool("f", text)])))
    assert request.options.tools[0].parameters == JsonText(text)


def test_json_text_wins_over_the_struct() -> None:
    both = text_tool("f", SCHEMA_TEXT)
    both.function.parameters.CopyFrom(struct({"type": "object"}))
    options = OPTS(
        tools=[both],
        response_format=json_schema_format(name="s", schema=struct({"a": 1}), schema_json='{"b": 2}'),
    )
    request = convert.completion_request(chat(options=options))
    assert request.options.tools[0].parameters == JsonText(SCHEMA_TEXT)
    assert request.options.response_format is not None and request.options.response_format.json_schema is not None
    assert request.options.response_format.json_schema.schema == JsonText('{"b": 2}')


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "must be the JSON text of an object: Expecting value: line 1 column 1 (char 0)"),
        (
            '{"type": "object",}',
            "must be the JSON text of an object: Expecting property name enclosed in double quotes",
        ),
        ("\ufeff{}", "must be the JSON text of an object: it starts with a byte-order mark (U+FEFF): leave it out"),
        ("[1, 2]", "must be the JSON text of an object, not of an array"),
        ('"{}"', "must be the JSON text of an object, not of a string"),
        ("null", "must be the JSON text of an object, not of null"),
        ('{"maximum": NaN}', "must be the JSON text of an object: NaN is not a JSON number"),
        ('{"maximum": -Infinity}', "must be the JSON text of an object: -Infinity is not a JSON number"),
        ('{"maximum": 1e400}', "must be the JSON text of an object: 1e400 is beyond the range of a double"),
        ('{"a": [{"b": -1.5E+309}]}', "must be the JSON text of an object: -1.5E+309 is beyond the range of a double"),
        (
            '{"maximum": -1' + "0" * 309 + "}",
            "must be the JSON text of an object: -1000000000000000000... (311 characters) is beyond the range"
            " of a double",
        ),
        ("[" * 100_000 + "]" * 100_000, "must be the JSON text of an object nested at most 512 levels deep"),
        ('{"a": ' + "[" * 512 + "]" * 512 + "}", "must be the JSON text of an object nested at most 512 levels deep"),
    ],
)
def test_json_text_that_is_no_object_is_refused_saying_why(text: str, says: str) -> None:
    request = chat(
        options=OPTS(tools=[text_tool("f", text)], response_format=json_schema_format(name="s", schema_json=text))
    )
    with pytest.raises(InvalidRequestError) as caught:
        convert.completion_request(request)
    assert [(v.field, v.description.startswith(says)) for v in caught.value.violations] == [
        ("options.tools[0].function.parameters_json", True),
        ("options.response_format.json_schema.schema_json", True),
    ]


def test_tool_parameters_as_text_must_be_an_object_schema() -> None:
    request = chat(options=OPTS(tools=[text_tool("f", '{"type": "string"}')]))
    with pytest.raises(InvalidRequestError) as caught:
        convert.completion_request(request)
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("options.tools[0].function.parameters_json", 'must be a JSON Schema of "type": "object"')
    ]


def test_a_count_request_names_the_tool_whose_text_is_wrong() -> None:
    tools = [text_tool("a", "{}"), tool("b", {"type": "object"}), text_tool("c", "[]")]
    with pytest.raises(InvalidRequestError) as caught:
        convert.count_request(pb.CountTokensRequest(messages=[user()], tools=tools))
    assert [v.field for v in caught.value.violations] == ["tools[2].function.parameters_json"]


# --- content parts --------------------------------------------------------------------------------------------------


def image(**fields: Any) -> pb.ContentPart:
    return pb.ContentPart(image=pb.ImagePart(**fields))


def parts_message(*parts: pb.ContentPart, role: pb.Role.ValueType = pb.ROLE_USER, **fields: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(messages=[pb.Message(role=role, parts=parts, **fields)])


def test_parts_map_to_the_domain() -> None:
    request = parts_message(
        pb.ContentPart(text="what is in these?"),
        image(url="https://example.com/cat.png", detail=pb.IMAGE_DETAIL_LOW),
        image(data=PNG_1X1, media_type="image/png", detail=pb.IMAGE_DETAIL_HIGH),
        image(data=PNG_1X1),  # the media type is read from the bytes
        image(data=PNG_1X1, media_type="Image/PNG"),  # a type is case-insensitive: as the upstreams name it
        image(data=JPEG_1X1, media_type="image/jpg"),  # JPEG by its files' extension
    )
    (message,) = convert.completion_request(request, max_image_bytes=len(PNG_1X1)).messages
    assert message == Message(
        Role.USER,
        parts=(
            TextPart("what is in these?"),
            ImagePart(url="https://example.com/cat.png", detail=ImageDetail.LOW),
            ImagePart(data=PNG_1X1, media_type="image/png", detail=ImageDetail.HIGH),
            ImagePart(data=PNG_1X1, media_type="image/png"),
            ImagePart(data=PNG_1X1, media_type="image/png"),
            ImagePart(data=JPEG_1X1, media_type="image/jpeg"),
        ),
    )


def test_text_parts_are_accepted_in_every_role() -> None:
    for role in (pb.ROLE_SYSTEM, pb.ROLE_ASSISTANT):
        (message,) = convert.completion_request(parts_message(pb.ContentPart(text="t"), role=role)).messages
        assert message.parts == (TextPart("t"),)
    tool_answer = parts_message(pb.ContentPart(text="21C"), role=pb.ROLE_TOOL, tool_call_id="call_1")
    call = pb.ToolCall(id="call_1", function=pb.FunctionCall(name="weather"))
    tool_answer.messages.insert(0, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]))
    assert convert.completion_request(tool_answer).messages[1].parts == (TextPart("21C"),)


def test_an_empty_text_part_beside_something_said_is_accepted() -> None:
    call = pb.ToolCall(id="c", function=pb.FunctionCall(name="f"))
    calling = parts_message(pb.ContentPart(text=""), role=pb.ROLE_ASSISTANT, tool_calls=[call])
    calling.messages.append(pb.Message(role=pb.ROLE_TOOL, content="done", tool_call_id="c"))
    for request in (
        parts_message(pb.ContentPart(text=""), pb.ContentPart(text="t")),
        parts_message(pb.ContentPart(text=""), image(url="https://example.com/a.png")),
        calling,
    ):
        assert convert.completion_request(request).messages[0].parts[0] == TextPart("")


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (parts_message(pb.ContentPart(text="t"), content="also content"), ["messages[0].parts"]),
        (parts_message(pb.ContentPart()), ["messages[0].parts[0]"]),
        (parts_message(pb.ContentPart(text="")), ["messages[0].parts"]),
        (parts_message(pb.ContentPart(text=""), pb.ContentPart(text="")), ["messages[0].parts"]),
        (parts_message(image(detail=pb.IMAGE_DETAIL_LOW)), ["messages[0].parts[0].image"]),
        (parts_message(pb.ContentPart(text="t"), image(url="ftp://x/a.png")), ["messages[0].parts[1].image.url"]),
        (parts_message(image(url="example.com/a.png")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(url="data:image/png;base64,AAAA")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(url="https://example.com/a cat.png")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(url="https://example.com/a\tb.png")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(url="https://example.com/a.png\n")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(url="https://example.com/a\u00a0b.png")), ["messages[0].parts[0].image.url"]),
        (parts_message(image(data=PNG_1X1, media_type="image/bmp")), ["messages[0].parts[0].image.media_type"]),
        (parts_message(image(data=PNG_1X1, media_type="image/jpeg")), ["messages[0].parts[0].image.data"]),
        (parts_message(image(data=b"<svg/>")), ["messages[0].parts[0].image.data"]),
        (parts_message(image(data=b"")), ["messages[0].parts[0].image.data"]),
        (parts_message(image(url="https://example.com/a.png", detail=9)), ["messages[0].parts[0].image.detail"]),
        (parts_message(image(url="https://example.com/a.png"), role=pb.ROLE_SYSTEM), ["messages[0].parts[0].image"]),
        (parts_message(image(url="https://example.com/a.png"), role=pb.ROLE_ASSISTANT), ["messages[0].parts[0].image"]),
    ],
)  # fmt: skip
def test_invalid_parts_name_the_part(request_: pb.CompleteRequest, fields: list[str]) -> None:
    assert fields_of(request_) == sorted(fields)


def test_image_bytes_over_the_limit_are_refused() -> None:
    request = parts_message(pb.ContentPart(text="t"), image(data=PNG_1X1))
    with pytest.raises(InvalidRequestError) as caught:
        convert.completion_request(request, max_image_bytes=len(PNG_1X1) - 1)
    (violation,) = caught.value.violations
    assert violation.field == "messages[0].parts[1].image.data"
    assert f"is {len(PNG_1X1)} bytes, over the gateway's limit of {len(PNG_1X1) - 1}" in violation.description
    with pytest.raises(InvalidRequestError):
        convert.count_request(pb.CountTokensRequest(messages=request.messages), max_image_bytes=len(PNG_1X1) - 1)
    # Unbounded, for the limits' estimate, which must never refuse what the servicer accepts.
    assert convert.completion_request(request).messages[0].parts[1] == ImagePart(data=PNG_1X1, media_type="image/png")


def test_the_reasoning_signature_goes_both_ways() -> None:
    turn = pb.Message(role=pb.ROLE_ASSISTANT, content="4", reasoning_signature="sig==")
    request = convert.completion_request(pb.CompleteRequest(messages=[user(), turn]))
    assert request.messages[1].reasoning_signature == "sig=="
    answer = CompletionResponse(
        id="1",
        backend="b",
        model="m",
        message=Message(Role.ASSISTANT, "4", reasoning="2+2", reasoning_signature="sig=="),
        finish_reason=FinishReason.STOP,
        usage=TokenUsage(1, 1),
    )
    out = roundtrip(convert.complete_response(answer)).message
    assert (out.reasoning, out.reasoning_signature) == ("2+2", "sig==")
    assert not roundtrip(
        convert.complete_response(replace(answer, message=Message(Role.ASSISTANT, "4")))
    ).message.HasField("reasoning_signature")


REASONING_REFUSED = "only an assistant message carries reasoning; leave it unset here"


@pytest.mark.parametrize("field", ["reasoning", "reasoning_signature"])
@pytest.mark.parametrize("role", [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_TOOL])
def test_reasoning_on_a_turn_other_than_the_assistants_is_refused_naming_it(
    role: pb.Role.ValueType, field: str
) -> None:
    turn = pb.Message(role=role, content="x", tool_call_id="c0" if role == pb.ROLE_TOOL else None)
    setattr(turn, field, "")  # present, though empty: it is still not this turn's to carry
    asked = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls(1))
    request = pb.CompleteRequest(messages=[user(), asked, turn] if role == pb.ROLE_TOOL else [turn, user()])
    where = 2 if role == pb.ROLE_TOOL else 0
    assert violations_of(request) == [(f"messages[{where}].{field}", REASONING_REFUSED)]


def test_reasoning_on_the_assistants_turn_is_taken() -> None:
    turn = pb.Message(role=pb.ROLE_ASSISTANT, content="4", reasoning="2+2", reasoning_signature="s")
    taken = convert.completion_request(pb.CompleteRequest(messages=[user(), turn, user()])).messages[1]
    assert (taken.reasoning, taken.reasoning_signature) == ("2+2", "s")


# --- property: valid within bounds, or InvalidRequestError, nothing else --------------------------------------------

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value nine times in ten, else anything of the type: most requests pass, each check is still hit."""
    return st.integers(0, 9).flatmap(lambda n: wild if n == 0 else valid)


texts = st.text(max_size=20)
names = mostly(st.from_regex(NAME, fullmatch=True), st.text(max_size=70))
contents = mostly(st.text(min_size=1, max_size=20), st.just(""))
any_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 2.0000001, -2.0000001]),
)


def numbers(low: float, high: float) -> st.SearchStrategy[Any]:
    return mostly(st.floats(min_value=low, max_value=high), any_number)


int32 = st.integers(-(2**31), 2**31 - 1)
any_enum: st.SearchStrategy[Any] = st.integers(-3, 9)  # unknown numbers included
finite_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@st.composite
def tool_calls(draw: st.DrawFn) -> pb.ToolCall:
    call_id = draw(mostly(st.text(min_size=1, max_size=8), st.just("")))
    return pb.ToolCall(id=call_id, function=pb.FunctionCall(name=draw(names), arguments=draw(texts)))


@st.composite
def content_parts(draw: st.DrawFn) -> pb.ContentPart:
    kind = draw(st.sampled_from(["text", "url", "data", "none"]))
    if kind == "text":
        return pb.ContentPart(text=draw(texts))
    if kind == "none":
        return pb.ContentPart()
    image = pb.ImagePart(detail=draw(mostly(st.integers(0, 3), any_enum)))
    if kind == "url":
        image.url = draw(mostly(st.just("https://example.com/cat.png"), st.sampled_from(["", "ftp://x/y", "data:,"])))
    else:
        image.data = draw(mostly(st.sampled_from([PNG_1X1, b"GIF89a\x01\x00\x01\x00"]), st.binary(max_size=12)))
        image.media_type = draw(mostly(st.sampled_from(["", "image/png", "image/gif"]), st.text(max_size=12)))
    return pb.ContentPart(image=image)


@st.composite
def messages(draw: st.DrawFn) -> pb.Message:
    role = draw(mostly(st.sampled_from([pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL]), any_enum))
    message = pb.Message(role=role, content=draw(contents))
    if draw(st.integers(0, 3)) == 0:
        message.parts.extend(draw(st.lists(content_parts(), min_size=1, max_size=3)))
        if draw(mostly(st.just(True), st.booleans())):
            message.content = ""  # parts replace the content
    if draw(mostly(st.just(role == pb.ROLE_ASSISTANT), st.booleans())):
        message.tool_calls.extend(draw(mostly(st.lists(tool_calls(), min_size=1, max_size=2), st.just([]))))
        if draw(st.booleans()):
            message.content = ""  # an assistant message may carry tool calls only
    if draw(st.booleans()):
        message.name = draw(texts)
    if draw(mostly(st.just(role == pb.ROLE_TOOL), st.booleans())):
        message.tool_call_id = draw(mostly(st.text(min_size=1, max_size=8), st.just("")))
    return message


@st.composite
def tools(draw: st.DrawFn) -> pb.Tool:
    result = tool(draw(names))
    if draw(st.booleans()):
        parameters = draw(st.dictionaries(st.sampled_from(["properties", "required", "x"]), finite_json, max_size=2))
        if draw(st.booleans()):
            parameters["type"] = draw(mostly(st.just("object"), st.sampled_from(["string", "array", "null"])))
        if draw(st.booleans()):
            result.function.parameters.CopyFrom(struct(parameters))
        else:
            wild = st.sampled_from(["", "[]", "1", "{", '{"a": NaN}']) | st.text(max_size=8)
            result.function.parameters_json = draw(mostly(st.just(json.dumps(parameters)), wild))
    if draw(st.booleans()):
        result.function.description = draw(texts)
    if draw(st.booleans()):
        result.function.strict = draw(st.booleans())
    return result


@st.composite
def options(draw: st.DrawFn) -> pb.CompletionOptions:
    result = pb.CompletionOptions(
        stop=draw(mostly(st.lists(st.text(min_size=1, max_size=5), max_size=4), st.lists(texts, max_size=6))),
        tools=draw(st.lists(tools(), max_size=3)),
        reasoning_effort=draw(mostly(st.integers(0, 5), any_enum)),
    )
    for name, low, high in [
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ]:
        if draw(st.booleans()):
            setattr(result, name, draw(numbers(low, high)))
    if draw(st.booleans()):
        result.max_tokens = draw(mostly(st.integers(1, convert.MAX_TOKENS_LIMIT), int32 | st.integers(-1, 1)))
    if draw(st.booleans()):
        result.seed = draw(st.integers(-(2**63), 2**63 - 1))
    if draw(st.booleans()):
        result.parallel_tool_calls = draw(st.booleans())
    choice = draw(st.sampled_from(["unset", "mode", "name"]))
    if choice == "mode":
        result.tool_choice.mode = draw(mostly(st.integers(0, 3 if result.tools else 2), any_enum))
    elif choice == "name":
        declared = [t.function.name for t in result.tools]
        result.tool_choice.function_name = draw(mostly(st.sampled_from(declared), names) if declared else names)
    if draw(st.booleans()):
        result.response_format.type = draw(mostly(st.integers(0, 3), any_enum))
        if draw(mostly(st.just(result.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA), st.booleans())):
            result.response_format.json_schema.name = draw(names)
            if draw(mostly(st.just(True), st.booleans())):
                schema = draw(st.dictionaries(st.text(max_size=5), finite_json, max_size=3))
                if draw(st.booleans()):
                    result.response_format.json_schema.schema.CopyFrom(struct(schema))
                else:
                    result.response_format.json_schema.schema_json = draw(mostly(st.just(json.dumps(schema)), texts))
    return result


@st.composite
def complete_requests(draw: st.DrawFn) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        messages=draw(mostly(st.lists(messages(), min_size=1, max_size=3), st.lists(messages(), max_size=1))),
        exact_model=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.model = draw(
            mostly(st.text(min_size=1, max_size=30), st.just("") | st.text(min_size=250, max_size=260))
        )
    if draw(st.integers(0, 3)):
        request.options.CopyFrom(draw(options()))
    return request


def within(value: float | None, low: float, high: float) -> bool:
    return value is None or (math.isfinite(value) and low <= value <= high)


def assert_within_bounds(result: CompletionRequest) -> None:
    assert result.model is None or 1 <= len(result.model) <= convert.MAX_MODEL_NAME
    assert 1 <= len(result.messages) <= convert.MAX_MESSAGES
    for message in result.messages:
        assert isinstance(message.role, Role)
        # A tool's result may be empty (a void function): the call it answers still needs its answer.
        assert message.content or message.tool_calls or message.parts or message.role is Role.TOOL
        assert not (message.content and message.parts)
        assert message.name is None or NAME.fullmatch(message.name)
        for part in message.parts:
            if isinstance(part, ImagePart):
                assert message.role is Role.USER
                assert (part.url or "").startswith(("http://", "https://")) or part.media_type in MEDIA_TYPES
        assert message.role is Role.ASSISTANT or not message.tool_calls
        assert (message.role is Role.TOOL) == (message.tool_call_id is not None)
        assert message.role is not Role.TOOL or message.tool_call_id
        for call in message.tool_calls:
            assert call.id and NAME.fullmatch(call.name)
    waiting: set[str] = set()  # each tool message answers a call of the assistant message before it, each call once
    for message in result.messages:
        if message.role is Role.TOOL:
            assert message.tool_call_id in waiting
            waiting.remove(message.tool_call_id)
        else:
            assert not waiting
            waiting = {call.id for call in message.tool_calls}
            assert len(waiting) == len(message.tool_calls)
    o = result.options
    assert within(o.temperature, 0.0, 2.0)
    assert within(o.top_p, 0.0, 1.0)
    assert within(o.presence_penalty, -2.0, 2.0)
    assert within(o.frequency_penalty, -2.0, 2.0)
    assert o.max_tokens is None or 1 <= o.max_tokens <= convert.MAX_TOKENS_LIMIT
    assert len(o.stop) <= convert.MAX_STOP_SEQUENCES and all(o.stop)
    declared = {t.name for t in o.tools}
    for t in o.tools:
        assert NAME.fullmatch(t.name)
        parameters = json.loads(t.parameters.text) if isinstance(t.parameters, JsonText) else t.parameters
        assert parameters is None or parameters.get("type", "object") == "object"
    assert o.tool_choice in (None, "none", "auto", "required") or (
        isinstance(o.tool_choice, NamedToolChoice) and o.tool_choice.name in declared
    )
    assert o.tool_choice is None or declared
    assert o.reasoning_effort in (None, "none", "minimal", "low", "medium", "high")
    fmt = o.response_format
    assert fmt is None or fmt.type in ("text", "json_object", "json_schema")
    if fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None and NAME.fullmatch(fmt.json_schema.name)
        schema = fmt.json_schema.schema
        assert isinstance(json.loads(schema.text) if isinstance(schema, JsonText) else schema, Mapping)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=complete_requests())
def test_any_request_is_valid_within_bounds_or_an_invalid_request(request: pb.CompleteRequest) -> None:
    try:
        result = convert.completion_request(request)
    except InvalidRequestError as error:
        assert error.violations
        for violation in error.violations:
            assert violation.field and violation.description
        return
    assert_within_bounds(result)


# --- answers to protobuf --------------------------------------------------------------------------------------------

ATTEMPTS = (
    Attempt("openai", "gpt-4o", AttemptOutcome.RATE_LIMITED, 0.25, upstream_status=429, error="HTTP 429: slow down"),
    Attempt("ollama", "gpt-oss:20b", AttemptOutcome.SUCCEEDED, 1.5),
)


def roundtrip(message: Any) -> Any:
    return type(message).FromString(message.SerializeToString())


def test_complete_response_with_everything() -> None:
    response = CompletionResponse(
        id="chatcmpl-1",
        backend="ollama",
        model="gpt-oss:20b",
        message=Message(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "f", '{"a":1}'),), reasoning="thinking"),
        finish_reason=FinishReason.TOOL_CALLS,
        usage=TokenUsage(120, 30, estimated=True, reasoning_tokens=0, cached_prompt_tokens=64),
        attempts=ATTEMPTS,
    )

    out = roundtrip(convert.complete_response(response))

    assert (out.id, out.backend, out.model) == ("chatcmpl-1", "ollama", "gpt-oss:20b")
    assert out.message.role == pb.ROLE_ASSISTANT
    assert out.message.content == ""
    assert out.message.HasField("reasoning") and out.message.reasoning == "thinking"
    assert [(c.id, c.function.name, c.function.arguments) for c in out.message.tool_calls] == [
        ("call_1", "f", '{"a":1}')
    ]
    assert out.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (120, 30, 150)
    assert out.usage.estimated is True
    assert out.usage.HasField("reasoning_tokens") and out.usage.reasoning_tokens == 0  # zero, yet present
    assert out.usage.HasField("cached_prompt_tokens") and out.usage.cached_prompt_tokens == 64
    first, second = out.attempts
    assert (first.backend, first.model, first.outcome, first.error) == (
        "openai",
        "gpt-4o",
        pb.ATTEMPT_OUTCOME_RATE_LIMITED,
        "HTTP 429: slow down",
    )
    assert first.HasField("upstream_status") and first.upstream_status == 429
    assert first.duration.ToNanoseconds() == 250_000_000
    assert second.outcome == pb.ATTEMPT_OUTCOME_SUCCEEDED
    assert not second.HasField("upstream_status")
    assert (second.duration.seconds, second.duration.nanos) == (1, 500_000_000)
    assert second.error == ""


def test_complete_response_leaves_unknown_optionals_unset() -> None:
    response = CompletionResponse(
        id="x",
        backend="b",
        model="m",
        message=Message(Role.ASSISTANT, "Hello"),
        finish_reason=FinishReason.UNKNOWN,
        usage=TokenUsage(1, 2),
    )
    out = roundtrip(convert.complete_response(response))
    assert out.message.content == "Hello"
    assert not out.message.HasField("reasoning")
    assert not out.message.HasField("name")
    assert not out.usage.HasField("reasoning_tokens")
    assert not out.usage.HasField("cached_prompt_tokens")
    assert out.usage.estimated is False
    assert out.usage.total_tokens == 3
    assert out.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert list(out.attempts) == []


@pytest.mark.parametrize(
    ("reason", "number"),
    [
        (FinishReason.UNKNOWN, pb.FINISH_REASON_UNSPECIFIED),
        (FinishReason.STOP, pb.FINISH_REASON_STOP),
        (FinishReason.LENGTH, pb.FINISH_REASON_LENGTH),
        (FinishReason.TOOL_CALLS, pb.FINISH_REASON_TOOL_CALLS),
        (FinishReason.CONTENT_FILTER, pb.FINISH_REASON_CONTENT_FILTER),
    ],
)
def test_finish_reasons(reason: FinishReason, number: int) -> None:
    response = CompletionResponse("x", "b", "m", Message(Role.ASSISTANT, "a"), reason, TokenUsage(0, 0))
    assert convert.complete_response(response).finish_reason == number


@pytest.mark.parametrize("outcome", list(AttemptOutcome))
def test_every_attempt_outcome_has_its_protobuf_name(outcome: AttemptOutcome) -> None:
    message = convert.attempt_pb(Attempt("b", "m", outcome, 0.0))
    assert pb.AttemptOutcome.Name(message.outcome) == f"ATTEMPT_OUTCOME_{outcome.name}"


def test_a_content_chunk() -> None:
    out = roundtrip(convert.stream_response(CompletionChunk(id="c", backend="ollama", model="m", content="He")))
    assert (out.id, out.backend, out.model) == ("c", "ollama", "m")
    assert out.delta.HasField("content") and out.delta.content == "He"
    assert not out.delta.HasField("reasoning")
    assert list(out.delta.tool_calls) == []
    assert out.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert not out.HasField("usage")
    assert list(out.attempts) == []


def test_an_empty_string_is_present_not_unset() -> None:
    out = roundtrip(convert.stream_response(CompletionChunk(id="c", backend="b", model="m", content="", reasoning="")))
    assert out.delta.HasField("content")
    assert out.delta.HasField("reasoning")


def test_a_reasoning_and_tool_call_chunk() -> None:
    chunk = CompletionChunk(
        id="c",
        backend="b",
        model="m",
        reasoning="hmm",
        tool_calls=(
            ToolCallDelta(index=0, id="call_1", name="f", arguments=""),
            ToolCallDelta(index=1, arguments='{"a"'),
        ),
    )
    out = roundtrip(convert.stream_response(chunk))
    assert not out.delta.HasField("content")
    assert out.delta.reasoning == "hmm"
    first, second = out.delta.tool_calls
    assert (first.index, first.id, first.name, first.arguments) == (0, "call_1", "f", "")
    assert first.HasField("arguments")  # an empty fragment is still a fragment
    assert second.index == 1 and second.arguments == '{"a"'
    assert not second.HasField("id") and not second.HasField("name")


def test_the_last_chunk_carries_finish_usage_and_attempts() -> None:
    chunk = CompletionChunk(
        id="c",
        backend="ollama",
        model="m",
        finish_reason=FinishReason.STOP,
        usage=TokenUsage(10, 5, reasoning_tokens=2),
        attempts=ATTEMPTS,
    )
    out = roundtrip(convert.stream_response(chunk))
    assert out.finish_reason == pb.FINISH_REASON_STOP
    assert out.HasField("usage")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (10, 5, 15)
    assert out.usage.reasoning_tokens == 2 and not out.usage.HasField("cached_prompt_tokens")
    assert [(a.backend, a.outcome) for a in out.attempts] == [
        ("openai", pb.ATTEMPT_OUTCOME_RATE_LIMITED),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert [a.duration.ToNanoseconds() for a in out.attempts] == [250_000_000, 1_500_000_000]
    assert not out.delta.HasField("content")


def test_a_restarted_streams_usage_past_what_the_contract_carries_stops_there_estimated() -> None:
    # Each attempt's usage fits an int32 (the wire checks it); a broken attempt's and the next one's together did
    # not: protobuf's ValueError after the answer had streamed, INTERNAL with a traceback, the usage lost.
    broken = TokenUsage(9, 3, reasoning_tokens=1, cached_prompt_tokens=4)
    whole = TokenUsage(MAX_TOKEN_COUNT - 5, 1, reasoning_tokens=1, cached_prompt_tokens=MAX_TOKEN_COUNT - 5)
    usage = broken + whole
    chunk = CompletionChunk(id="c", backend="b", model="m", finish_reason=FinishReason.STOP, usage=usage)
    out = roundtrip(convert.stream_response(chunk)).usage
    assert (out.prompt_tokens, out.completion_tokens, out.total_tokens) == (MAX_TOKEN_COUNT, 0, MAX_TOKEN_COUNT)
    assert out.estimated and out.reasoning_tokens == 0 and out.cached_prompt_tokens == MAX_TOKEN_COUNT - 1
    assert TokenUsage(9, 3) + TokenUsage(10, 5, estimated=False) == TokenUsage(19, 8), "below it, exact"


def test_cache_writes_add_up_and_reach_the_contract() -> None:
    usage = TokenUsage(9, 3, cache_write_prompt_tokens=4) + TokenUsage(10, 5, cached_prompt_tokens=2)
    assert (usage.cache_write_prompt_tokens, usage.cached_prompt_tokens) == (4, 2)
    assert (TokenUsage(9, 3) + TokenUsage(10, 5)).cache_write_prompt_tokens is None
    # Past what the contract carries, the writes stop at what the reads leave of the prompt.
    over = TokenUsage(MAX_TOKEN_COUNT - 5, 1, cached_prompt_tokens=10, cache_write_prompt_tokens=MAX_TOKEN_COUNT - 10)
    over += TokenUsage(9, 3, cache_write_prompt_tokens=9)
    assert over.cache_write_prompt_tokens == over.prompt_tokens - 10
    chunk = CompletionChunk(id="c", backend="b", model="m", finish_reason=FinishReason.STOP, usage=usage)
    out = roundtrip(convert.stream_response(chunk)).usage
    assert (out.cache_write_prompt_tokens, out.cached_prompt_tokens) == (4, 2)
    plain = roundtrip(convert.stream_response(replace(chunk, usage=TokenUsage(9, 3)))).usage
    assert not plain.HasField("cache_write_prompt_tokens")


def test_a_finish_without_usage_has_no_usage() -> None:
    out = convert.stream_response(CompletionChunk(id="c", backend="b", model="m", finish_reason=FinishReason.LENGTH))
    assert out.finish_reason == pb.FINISH_REASON_LENGTH
    assert not out.HasField("usage")
