"""Requests the gateway cannot decode or read: INVALID_ARGUMENT with the usual details, no traceback, and the gateway
goes on serving."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc
import pytest
from e2e.test_metrics import scrape
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmrelay import v1 as pb
from llmrelay_server import convert
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import (
    DIALECTS,
    GatewayFactory,
    StubFactory,
    chat,
    details,
    read_all,
    stream_chat,
    tool,
    two_backends,
    user,
)
from upstream import FakeUpstream

SERVICE = pb.DESCRIPTOR.services_by_name["LLMService"]
GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff"


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """One field of the protobuf wire format whose value is bytes, a string or a message."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def number(message: Descriptor, field: str) -> int:
    return int(message.fields_by_name[field].number)


def nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct holding `depth` Structs one inside the other: {"a": {"a": ...}}. Python's protobuf
    refuses to build a message that deep, so it is written in the wire format by hand."""
    entry = struct_pb2.Struct.FieldsEntry.DESCRIPTOR
    struct = b""
    for _ in range(depth):
        inner = length_delimited(number(struct_pb2.Value.DESCRIPTOR, "struct_value"), struct)
        struct = length_delimited(
            number(struct_pb2.Struct.DESCRIPTOR, "fields"),
            length_delimited(number(entry, "key"), b"a") + length_delimited(number(entry, "value"), inner),
        )
    return struct


def complete_with_deep_tool_parameters(depth: int) -> bytes:
    """A valid request whose options.tools[0].function.parameters is nested_struct(depth)."""
    function = length_delimited(number(pb.FunctionDefinition.DESCRIPTOR, "name"), b"f") + length_delimited(
        number(pb.FunctionDefinition.DESCRIPTOR, "parameters"), nested_struct(depth)
    )
    tool = length_delimited(number(pb.Tool.DESCRIPTOR, "function"), function)
    options = length_delimited(
        number(pb.CompleteRequest.DESCRIPTOR, "options"),
        length_delimited(number(pb.CompletionOptions.DESCRIPTOR, "tools"), tool),
    )
    # The wire format concatenates: a valid request followed by more fields is one request with both.
    return bytes(chat().SerializeToString()) + options


def count_with_invalid_utf8() -> bytes:
    return bytes(pb.CountTokensRequest(model="gpt-4o").SerializeToString()) + length_delimited(
        number(pb.CountTokensRequest.DESCRIPTOR, "text"), b"caf\xc3 au lait"
    )


def assert_invalid_request(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info = details(error)["ErrorInfo"]
    assert (info.domain, info.reason) == ("llmrelay.dev", "INVALID_REQUEST")
    assert details(error)["BadRequest"].field_violations
    assert "Traceback" not in str(error.details()) and "Unexpected" not in str(error.details())


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes) -> list[bytes]:
    """Sends bytes as the request, as a client with another idea of the contract (or none) would; the answers."""
    path = f"/{SERVICE.full_name}/{method}"
    if SERVICE.methods_by_name[method].server_streaming:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return [answer async for answer in stream(payload, timeout=5)]
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return [await unary(payload, timeout=5)]


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
async def test_bytes_that_are_no_request_are_invalid_argument(
    channel: grpc.aio.Channel, stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_raw(channel, method, GARBAGE)

    assert_invalid_request(caught.value)
    assert str(caught.value.details()).startswith("the request cannot be decoded: ")
    assert_quiet(caplog)
    assert (await stub.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"


@pytest.mark.parametrize("method", ["Complete", "StreamComplete", "Embed"])
@pytest.mark.parametrize(
    "server",
    ["limits: {tokens_per_minute: 100000, budget_usd_per_day: 100}", "tracing: true"],
    ids=["limits", "tracing"],
)
async def test_bytes_that_are_no_request_are_invalid_argument_past_limits_and_tracing(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    exported: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    method: str,
    server: str,
) -> None:
    """The limits interceptor (which counts a model call's tokens to reserve them) and the tracing observer (which
    names the model asked for) see the call before the handler that refuses it: they must not read its fields."""
    gateway = await gateway_factory(two_backends(primary, local), server=server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_raw(channel, method, GARBAGE)

        assert_invalid_request(caught.value)
        assert str(caught.value.details()).startswith("the request cannot be decoded: ")
        assert_quiet(caplog)
        assert (await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)).message.content == "echo: hello gateway"


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("CountTokens", count_with_invalid_utf8()),
        ("Complete", complete_with_deep_tool_parameters(100)),
        ("StreamComplete", complete_with_deep_tool_parameters(100)),
    ],
    ids=["invalid-utf8", "struct-100-deep", "struct-100-deep-stream"],
)
async def test_requests_protobuf_cannot_decode_are_invalid_argument(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, method: str, payload: bytes
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_raw(channel, method, payload)

    assert_invalid_request(caught.value)
    assert str(caught.value.details()).startswith("the request cannot be decoded: ")
    if method != "CountTokens":  # upb's own words ("Exceeded upb_DecodeOptions_MaxDepth") said nothing to act on
        assert "send it as text (parameters_json, schema_json)" in str(caught.value.details())
    assert_quiet(caplog)


async def test_a_request_as_deep_as_protobuf_decodes_is_served(channel: grpc.aio.Channel) -> None:
    """The refusal is protobuf's depth limit, not the gateway's: a little less deep decodes and is answered."""
    (raw,) = await call_raw(channel, "Complete", complete_with_deep_tool_parameters(30))

    assert pb.CompleteResponse.FromString(raw).message.content == "echo: hello gateway"


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.GetUsageRequest(start_time=Timestamp(seconds=10**12)), ["start_time"]),
        (pb.GetUsageRequest(end_time=Timestamp(seconds=0, nanos=-1)), ["end_time"]),
        (
            pb.GetUsageRequest(start_time=Timestamp(nanos=10**9), end_time=Timestamp(seconds=-(10**12))),
            ["start_time", "end_time"],
        ),
    ],
    ids=["seconds-beyond-9999", "negative-nanos", "both"],
)
async def test_get_usage_with_a_timestamp_out_of_range_names_the_field(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture, request_: pb.GetUsageRequest, fields: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUsage(request_, timeout=5)

    assert_invalid_request(caught.value)
    assert [v.field for v in details(caught.value)["BadRequest"].field_violations] == fields
    assert_quiet(caplog)
    assert isinstance(await stub.GetUsage(pb.GetUsageRequest(), timeout=5), pb.GetUsageResponse)


async def test_get_usage_with_a_window_that_ends_before_it_starts_names_end_time(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounds swapped would answer "no usage" as if there were none; a nanosecond is enough to tell them apart."""
    await stub.Complete(chat(), timeout=5)
    now = Timestamp()
    now.GetCurrentTime()
    later = Timestamp(seconds=now.seconds + 3600, nanos=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUsage(pb.GetUsageRequest(start_time=later, end_time=Timestamp(seconds=later.seconds)), timeout=5)

    assert_invalid_request(caught.value)
    (violation,) = details(caught.value)["BadRequest"].field_violations
    assert violation.field == "end_time" and "start_time" in violation.description
    assert_quiet(caplog)
    # An empty window (from and to one moment) is no mistake, and a whole hour about now holds the call.
    assert not (await stub.GetUsage(pb.GetUsageRequest(start_time=later, end_time=later), timeout=5)).records
    an_hour_ago = Timestamp(seconds=now.seconds - 3600)
    window = pb.GetUsageRequest(start_time=an_hour_ago, end_time=later)
    assert [r.requests for r in (await stub.GetUsage(window, timeout=5)).records] == [1]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda stub: stub.Complete(chat(model="tiny\x00x"), timeout=5), "model"),
        (lambda stub: read_all(stub.StreamComplete(stream_chat(model="tiny\nx"), timeout=5)), "model"),
        (lambda stub: stub.CountTokens(pb.CountTokensRequest(model="gpt-4o\x00", text="hi"), timeout=5), "model"),
        (lambda stub: stub.Embed(pb.EmbedRequest(model="e\x00", inputs=["hi"]), timeout=5), "model"),
        (lambda stub: stub.GetUsage(pb.GetUsageRequest(model="a\x00b"), timeout=5), "model"),
        (lambda stub: stub.GetUsage(pb.GetUsageRequest(caller="c\x7f"), timeout=5), "caller"),
    ],
    ids=["Complete", "StreamComplete", "CountTokens", "Embed", "GetUsage model", "GetUsage caller"],
)
async def test_a_name_with_a_control_character_names_the_field(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture, call: Any, field: str
) -> None:
    """A NUL in a model's name would reach the ledger, whose PostgreSQL cannot store it: refused, as the nonsense it
    is, rather than an upstream asked for it (or a GetUsage told the database is out of reach)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)

    assert_invalid_request(caught.value)
    (violation,) = details(caught.value)["BadRequest"].field_violations
    rule = (
        "must be a caller's name: 1-128 letters, digits and ._:@/-"
        if field == "caller"
        else "must hold no control characters (a NUL, a newline)"
    )
    assert (violation.field, violation.description) == (field, rule)
    assert_quiet(caplog)


OVERFLOWING_SCHEMA = '{"type": "object", "properties": {"n": {"type": "number", "maximum": 1e400}}}'


def overflowing(method: str) -> pb.CompleteRequest | pb.StreamCompleteRequest | pb.CountTokensRequest:
    """A request whose tool schema (and, where there is one, response schema) holds 1e400, beyond a double."""
    tools = [pb.Tool(function=pb.FunctionDefinition(name="f", parameters_json=OVERFLOWING_SCHEMA))]
    if method == "CountTokens":
        return pb.CountTokensRequest(model="gpt-4o", messages=chat().messages, tools=tools)
    options = pb.CompletionOptions(
        tools=tools,
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=pb.JsonSchema(name="s", schema_json=OVERFLOWING_SCHEMA),
        ),
    )
    if method == "StreamComplete":
        return pb.StreamCompleteRequest(messages=chat().messages, options=options)
    return pb.CompleteRequest(messages=chat().messages, options=options)


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        (
            "Complete",
            ["options.tools[0].function.parameters_json", "options.response_format.json_schema.schema_json"],
        ),
        (
            "StreamComplete",
            ["options.tools[0].function.parameters_json", "options.response_format.json_schema.schema_json"],
        ),
        ("CountTokens", ["tools[0].function.parameters_json"]),
    ],
)
async def test_a_json_schema_with_a_number_beyond_a_double_names_the_field(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, method: str, fields: list[str]
) -> None:
    """1e400 is JSON text, but upstreams read it as infinity or null (or refuse the request): refused on every
    backend, as NaN is."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_raw(channel, method, bytes(overflowing(method).SerializeToString()))

    assert_invalid_request(caught.value)
    violations = details(caught.value)["BadRequest"].field_violations
    assert [v.field for v in violations] == fields
    assert all("1e400 is beyond the range of a double" in v.description for v in violations)
    assert_quiet(caplog)


@pytest.mark.parametrize("method", ["Complete", "StreamComplete", "CountTokens"])
async def test_a_message_of_empty_text_parts_names_the_field(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    messages = [*chat().messages, pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="")])]
    request = {
        "Complete": pb.CompleteRequest(messages=messages),
        "StreamComplete": pb.StreamCompleteRequest(messages=messages),
        "CountTokens": pb.CountTokensRequest(messages=messages),
    }[method]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_raw(channel, method, bytes(request.SerializeToString()))

    assert_invalid_request(caught.value)
    violations = details(caught.value)["BadRequest"].field_violations
    assert [(v.field, v.description) for v in violations] == [
        ("messages[1].parts", "must not be empty: every part is empty text")
    ]
    assert_quiet(caplog)


async def refused_everywhere(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, options: pb.CompletionOptions
) -> list[tuple[str, str]]:
    """The (field, description) violations of a request with these options, which Complete and StreamComplete both
    refuse alike before any upstream sees it."""
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Complete(chat(options=options), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await read_all(stub.StreamComplete(stream_chat(options=options), timeout=5))
    found = []
    for caught in (unary, streamed):
        assert_invalid_request(caught.value)
        found.append([(v.field, v.description) for v in details(caught.value)["BadRequest"].field_violations])
    assert found[0] == found[1]
    assert primary.chat_requests == []
    assert_quiet(caplog)
    return found[0]


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
@pytest.mark.parametrize(
    "kind", [pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, pb.RESPONSE_FORMAT_TYPE_TEXT], ids=["json_object", "text"]
)
async def test_a_schema_with_a_type_other_than_json_schema_names_the_field(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    kind: pb.ResponseFormatType.ValueType,
) -> None:
    """Not dropped, which would leave the answer unchecked against a schema the caller believes in."""
    schema = pb.JsonSchema(name="answer", schema_json='{"type": "object"}')
    options = pb.CompletionOptions(response_format=pb.ResponseFormat(type=kind, json_schema=schema))

    violations = await refused_everywhere(stub, primary, caplog, options)

    assert violations == [
        (
            "options.response_format.json_schema",
            "a schema needs type RESPONSE_FORMAT_TYPE_JSON_SCHEMA: set that type, or leave json_schema unset",
        )
    ]
    options.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA  # the same schema, as it should have come
    assert (await stub.Complete(chat(options=options), timeout=5)).message.content == "echo: hello gateway"


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
@pytest.mark.parametrize(
    ("choice", "violation"),
    [
        (
            pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE),
            (
                "options.tool_choice.mode",
                "TOOL_CHOICE_MODE_NONE needs at least one tool in options.tools; without tools, leave it unset",
            ),
        ),
        (
            pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO),
            (
                "options.tool_choice.mode",
                "TOOL_CHOICE_MODE_AUTO needs at least one tool in options.tools; without tools, leave it unset",
            ),
        ),
        (
            pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
            (
                "options.tool_choice.mode",
                "TOOL_CHOICE_MODE_REQUIRED needs at least one tool in options.tools; without tools, leave it unset",
            ),
        ),
        (
            pb.ToolChoice(function_name="weather"),
            ("options.tool_choice.function_name", "names a tool, but options.tools declares none"),
        ),
    ],
    ids=["none", "auto", "required", "named"],
)
async def test_a_tool_choice_without_tools_names_the_field(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    choice: pb.ToolChoice,
    violation: tuple[str, str],
) -> None:
    """Refused by the gateway, in the contract's terms, whichever API the backend speaks: passed on, the upstream
    would refuse it with a 400 that names no field of the contract."""
    assert await refused_everywhere(stub, primary, caplog, pb.CompletionOptions(tool_choice=choice)) == [violation]


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_tool_choice_naming_an_undeclared_tool_names_the_field(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    options = pb.CompletionOptions(tools=[tool("weather")], tool_choice=pb.ToolChoice(function_name="forecast"))

    violations = await refused_everywhere(stub, primary, caplog, options)

    assert violations == [("options.tool_choice.function_name", "must name one of options.tools")]


@pytest.mark.parametrize("server", ["", "limits: {tokens_per_minute: 100000000}"], ids=["plain", "limits"])
async def test_requests_over_the_count_bounds_are_refused_naming_the_fields(
    stub_for: StubFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    server: str,
) -> None:
    """Counted before any entry is validated (a request of 250,000 tools fits 4 MiB, and validating each held every
    other call for seconds): every count over its bound in one answer, through the limits' early parse too."""
    stub = await stub_for(two_backends(primary, local), server=server)
    tools = [tool(f"f{i}") for i in range(convert.MAX_TOOLS + 1)]
    messages = [
        pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="x")] * (convert.MAX_PARTS + 1)),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[
                pb.ToolCall(id=f"c{i}", function=pb.FunctionCall(name="f")) for i in range(convert.MAX_TOOL_CALLS + 1)
            ],
        ),
    ]
    options = pb.CompletionOptions(tools=tools)
    calls: list[tuple[str, Any]] = [
        ("options.tools", stub.Complete(pb.CompleteRequest(messages=messages, options=options), timeout=5)),
        (
            "options.tools",
            read_all(stub.StreamComplete(pb.StreamCompleteRequest(messages=messages, options=options), timeout=5)),
        ),
        ("tools", stub.CountTokens(pb.CountTokensRequest(messages=messages, tools=tools), timeout=5)),
    ]
    for tools_field, call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert_invalid_request(caught.value)
        violations = details(caught.value)["BadRequest"].field_violations
        assert sorted(v.field for v in violations) == ["messages[0].parts", "messages[1].tool_calls", tools_field]
        assert f"at most {convert.MAX_TOOLS} tools are accepted" in str(caught.value.details())
    assert primary.chat_requests == []
    assert (await stub.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"
    assert_quiet(caplog)


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_parallel_tool_calls_without_tools_is_not_passed_on(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent's loop may set it on every turn, tools or none: without tools it means nothing, and upstreams refuse
    it there (OpenAI with a 400; Anthropic takes it only inside a tool_choice, which would need tools)."""
    answer = await stub.Complete(chat(options=pb.CompletionOptions(parallel_tool_calls=False)), timeout=5)

    assert answer.backend == primary.dialect
    sent = primary.chat_requests[-1]
    assert "parallel_tool_calls" not in sent and "tool_choice" not in sent
    assert_quiet(caplog)


def _assistant_calling(*ids: str) -> pb.Message:
    calls = [pb.ToolCall(id=call_id, function=pb.FunctionCall(name="weather", arguments="{}")) for call_id in ids]
    return pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls)


def _answer(call_id: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_TOOL, content="21C", tool_call_id=call_id)


@pytest.mark.parametrize(
    ("conversation", "violations"),
    [
        (
            [user("weather?"), _assistant_calling("call_1"), _answer("call_nope")],
            [
                ("messages[2].tool_call_id", "answers no call of the assistant message before it"),
                ("messages[1].tool_calls[0].id", "is answered by no tool message"),
            ],
        ),
        (
            [user("weather?"), _answer("call_1")],
            [("messages[1].tool_call_id", "answers no call of the assistant message before it")],
        ),
        (
            [user("weather?"), _assistant_calling("call_1", "call_2"), _answer("call_1"), user("and?")],
            [("messages[1].tool_calls[1].id", "is answered by no tool message before messages[3]")],
        ),
        (
            [user("weather?"), _assistant_calling("call_1", "call_1"), _answer("call_1"), _answer("call_1")],
            [
                ("messages[1].tool_calls[1].id", "must differ from the message's other calls' ids"),
                ("messages[3].tool_call_id", "answers no call of the assistant message before it"),
            ],
        ),
        (
            [user("weather?"), _assistant_calling("call_1", "call_2"), _answer("call_1")],
            [("messages[1].tool_calls[1].id", "is answered by no tool message")],
        ),
        (
            [user("weather?"), _assistant_calling("call_1")],
            [("messages[1].tool_calls[0].id", "is answered by no tool message")],
        ),
        (
            [_assistant_calling("call_1", "call_1")],
            [
                ("messages[0].tool_calls[1].id", "must differ from the message's other calls' ids"),
                ("messages[0].tool_calls[1].id", "is answered by no tool message"),
            ],
        ),
    ],
    ids=[
        "unknown-id",
        "no-call-before",
        "unanswered",
        "duplicate-ids",
        "partly-answered-last",
        "unanswered-last",
        "duplicate-ids-alone",
    ],
)
async def test_tool_messages_must_answer_the_calls_before_them(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    conversation: list[pb.Message],
    violations: list[tuple[str, str]],
) -> None:
    """OpenAI's API and Anthropic's refuse such a conversation (each in its own words, as UPSTREAM_REJECTED naming no
    field), others take it: the same chat was answered or refused by where its route went. The gateway refuses it
    first, naming the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    assert_invalid_request(caught.value)
    found = [(v.field, v.description) for v in details(caught.value)["BadRequest"].field_violations]
    assert [(field, description.partition(" (")[0]) for field, description in found] == violations
    assert primary.chat_requests == []
    answered = [user("weather?"), _assistant_calling("call_1", "call_2"), _answer("call_2"), _answer("call_1")]
    assert (await stub.Complete(pb.CompleteRequest(messages=[*answered, user("and?")]), timeout=5)).message.content
    assert_quiet(caplog)


async def test_a_chat_whose_last_calls_are_not_answered_yet_is_counted_as_it_stands(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked for what comes next, the chat is refused (above); counted, it is an agent weighing its history before it
    runs the tools: not the model asked to go on."""
    for last in ([], [_answer("call_1")]):
        chat = [user("weather?"), _assistant_calling("call_1", "call_2"), *last]
        count = await stub.CountTokens(pb.CountTokensRequest(messages=chat), timeout=5)
        assert count.token_count > 0
    assert_quiet(caplog)


async def test_get_usage_for_a_caller_no_caller_could_be_is_refused_naming_the_field(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that may read only its own usage, asking for a caller of 20,000 characters: its PERMISSION_DENIED quoted
    the name whole in its details, past what gRPC lets trailers carry, and the caller got gRPC's own
    RESOURCE_EXHAUSTED instead (at random, for names of a few thousand)."""
    key = "llmr-research-0123456789abcdefghij"
    digest = hashlib.sha256(key.encode()).hexdigest()
    auth = f"auth:\n  keys:\n    - {{name: research, sha256: {digest}}}\n"
    gateway = await gateway_factory(two_backends(primary, local) + auth)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        for caller in ("c" * 20_000, "c" * 129, "bob smith"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUsage(pb.GetUsageRequest(caller=caller), metadata=[("authorization", f"Bearer {key}")])
            assert_invalid_request(caught.value)
            [violation] = details(caught.value)["BadRequest"].field_violations
            assert violation.field == "caller"
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.GetUsage(pb.GetUsageRequest(caller="other"), metadata=[("authorization", f"Bearer {key}")])
        assert details(other.value)["ErrorInfo"].reason == "USAGE_NOT_ALLOWED"
    assert_quiet(caplog)


@pytest.mark.parametrize("name", ["bob smith", "bob\n", "b" * 65, ""])
async def test_an_authors_name_other_than_openai_takes_names_the_field(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """Passed on, OpenAI's API refused it in its own words (UPSTREAM_REJECTED, no field named), others took it."""
    request = pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi", name=name)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request, timeout=5)
    assert_invalid_request(caught.value)
    [violation] = details(caught.value)["BadRequest"].field_violations
    assert violation.field == "messages[0].name"
    assert primary.chat_requests == []
    assert_quiet(caplog)


@pytest.mark.parametrize("method", ["Complete", "StreamComplete", "Embed", "CountTokens"])
async def test_a_request_over_the_message_limit_is_answered_counted_and_takes_no_limit(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    """gRPC's own refusal of a request over its limit comes before any interceptor: no ErrorInfo, no metrics, no log
    line. The gateway reads requests up to twice the limit and refuses them itself."""
    server = 'max_message_bytes: 65536, metrics_listen: "127.0.0.1:0", limits: {requests_per_minute: 1}'
    gateway = await gateway_factory(two_backends(primary, local), server=server)
    assert gateway.metrics is not None and gateway.metrics.port is not None
    over = {
        "Complete": chat("x" * 70_000),
        "StreamComplete": stream_chat("x" * 70_000),
        "Embed": pb.EmbedRequest(inputs=["x" * 70_000]),
        "CountTokens": pb.CountTokensRequest(text="x" * 70_000),
    }[method].SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_raw(channel, method, over)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        info = details(caught.value)["ErrorInfo"]
        assert (info.reason, dict(info.metadata)) == ("REQUEST_TOO_LARGE", {"size": str(len(over)), "limit": "65536"})
        assert "raise server.max_message_bytes" in str(caught.value.details())
        # Over twice the limit, gRPC refuses it unread, as before.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_raw(channel, method, bytes(over) + length_delimited(15, b"x" * 70_000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max" in str(caught.value.details())
        assert_quiet(caplog)
        # The minute's one request was not taken by the refusal.
        assert (await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)).message.content == "echo: hello gateway"
    samples = await scrape(gateway.metrics.port)
    handled = [
        v
        for (name, labels), v in samples.items()
        if name == "grpc_server_handled_total"
        and dict(labels).get("grpc_method") == method
        and dict(labels).get("grpc_code") == "RESOURCE_EXHAUSTED"
    ]
    assert handled == [1.0]


_OPEN_SERVICES = pytest.mark.parametrize(
    ("path", "streams"),
    [
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", True),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
    ],
)
"""The services beside LLMService, which anyone may call without a key."""


async def refusal_of_open_service(
    channel: grpc.aio.Channel, path: str, streams: bool, payload: bytes
) -> grpc.aio.AioRpcError:
    """Sends bytes as the request of a method of `_OPEN_SERVICES`: the error the call ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if "Reflection" in path:
            bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
            await bidi(iter([payload]), timeout=5).read()
        elif streams:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            await stream(payload, timeout=5).read()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(payload, timeout=5)
    return caught.value


@_OPEN_SERVICES
async def test_the_other_services_refuse_a_request_over_the_message_limit_alike(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    path: str,
    streams: bool,
) -> None:
    """gRPC reads up to twice the limit for every service of the server: health's and reflection's requests over it
    are refused as LLMService's are, not served (a Watch held open with it, a reflection answer too large to send)."""
    gateway = await gateway_factory(two_backends(primary, local), server="max_message_bytes: 65536")
    # A health service name or a reflection host of 70,000 bytes: field 1 of both requests is a string.
    over = length_delimited(1, b"x" * 70_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        error = await refusal_of_open_service(channel, path, streams, over)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        info = details(error)["ErrorInfo"]
        assert (info.reason, dict(info.metadata)) == ("REQUEST_TOO_LARGE", {"size": str(len(over)), "limit": "65536"})
        assert_quiet(caplog)


@_OPEN_SERVICES
async def test_the_other_services_refuse_bytes_that_are_no_request_alike(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, path: str, streams: bool
) -> None:
    """As LLMService's methods do: INVALID_ARGUMENT with its ErrorInfo, not UNKNOWN with the decoder's exception and
    a traceback in the log for every such call (which anyone who reaches the port could send, without a key)."""
    error = await refusal_of_open_service(channel, path, streams, GARBAGE)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert details(error)["ErrorInfo"].reason == "INVALID_REQUEST"
    assert str(error.details()).startswith("the request cannot be decoded: ")
    assert_quiet(caplog)
    # And the service still answers a request that is one.
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert (await check).status == health_pb2.HealthCheckResponse.SERVING
