"""Exact JSON schemas and images, end to end: what the caller sends is what the upstream gets."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import llmrelay
import pytest
from llmrelay import AsyncClient
from llmrelay import v1 as pb
from support import DIALECTS, FAST_ROUTER, GatewayFactory, StubFactory, chat, details, png, struct, two_backends, user
from upstream import FakeUpstream

# Integers a Struct would turn into doubles (3.0), one no double holds (2**60 + 1), nested arrays, and spacing of
# the caller's own: every byte must reach the upstream as written.
SCHEMA_TEXT = (
    '{"type": "object",\n "properties": {"tags": {"type": "array", "maxItems": 3,'
    ' "items": {"type": "array", "items": {"type": "integer", "default": 10}}},'
    ' "id": {"type": "integer", "maximum": 1152921504606846977}},  "required": ["tags"]}'
)
JSON_SCHEMA = pb.CompletionOptions(
    tools=[pb.Tool(function=pb.FunctionDefinition(name="tag", parameters_json=SCHEMA_TEXT))],
    response_format=pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="tags", schema_json=SCHEMA_TEXT)
    ),
)
CAT_URL = "https://example.com/cat.png"


@pytest.fixture
async def stub(stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream) -> pb.LLMServiceAsyncStub:
    return await stub_for(two_backends(primary, local), server="max_image_bytes: 2000")


@pytest.mark.parametrize("streamed", [False, True])
async def test_json_schemas_reach_the_upstream_byte_for_byte(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streamed: bool
) -> None:
    messages = [user("tag this")]
    if streamed:
        _ = [c async for c in stub.StreamComplete(pb.StreamCompleteRequest(messages=messages, options=JSON_SCHEMA))]
    else:
        await stub.Complete(pb.CompleteRequest(messages=messages, options=JSON_SCHEMA), timeout=5)

    (raw,) = primary.chat_bodies
    assert f'"parameters":{SCHEMA_TEXT}'.encode() in raw
    assert f'"schema":{SCHEMA_TEXT}'.encode() in raw
    sent = json.loads(raw)["tools"][0]["function"]["parameters"]
    assert sent["properties"]["id"]["maximum"] == 2**60 + 1
    assert isinstance(sent["properties"]["tags"]["maxItems"], int)


async def test_the_struct_form_still_works(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    parameters = {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 3}}}
    tool = pb.Tool(function=pb.FunctionDefinition(name="tag", parameters=struct(parameters)))
    schema = pb.JsonSchema(name="tags", schema=struct(parameters))
    options = pb.CompletionOptions(
        tools=[tool], response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema)
    )

    answer = await stub.Complete(pb.CompleteRequest(messages=[user("tag this")], options=options), timeout=5)

    assert answer.message.content == "echo: tag this"
    (sent,) = primary.chat_requests
    # Equal as JSON, though a Struct has made 3 the double 3.0: the loss the text form avoids.
    assert sent["tools"][0]["function"]["parameters"] == parameters
    assert sent["response_format"]["json_schema"]["schema"] == parameters


async def test_images_reach_the_upstream_as_image_url_parts(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    image = png(16, 8)
    message = pb.Message(
        role=pb.ROLE_USER,
        parts=[
            pb.ContentPart(text="what is in these?"),
            pb.ContentPart(image=pb.ImagePart(url=CAT_URL, detail=pb.IMAGE_DETAIL_HIGH)),
            pb.ContentPart(image=pb.ImagePart(data=image, media_type="image/png", detail=pb.IMAGE_DETAIL_LOW)),
            pb.ContentPart(image=pb.ImagePart(data=image)),
        ],
    )

    answer = await stub.Complete(pb.CompleteRequest(messages=[message]), timeout=5)

    assert answer.message.content == "echo: what is in these?"
    data_url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
    assert primary.chat_requests[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in these?"},
                {"type": "image_url", "image_url": {"url": CAT_URL, "detail": "high"}},
                {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }
    ]


GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
"""A 1x1 GIF."""


@pytest.mark.parametrize(
    ("image", "said"),
    [
        (pb.ImagePart(url=CAT_URL), "Ollama takes an image's bytes, not its URL"),
        (pb.ImagePart(data=GIF), "Ollama takes PNG, JPEG or WebP, not image/gif"),
    ],
    ids=["url", "gif"],
)
async def test_images_ollama_refuses_go_to_a_backend_that_takes_them(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, image: pb.ImagePart, said: str
) -> None:
    """Ollama's /v1 refuses an image by URL and a GIF (a 400 each): the call ended INVALID_ARGUMENT, as the caller's
    mistake, and no backend that takes them was tried. Its PNG, JPEG and WebP bytes go to it."""
    stub = await stub_for(two_backends(primary, local, "  order: [ollama, openai]\n" + FAST_ROUTER))
    message = pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="look"), pb.ContentPart(image=image)])
    answer = await stub.Complete(pb.CompleteRequest(messages=[message], model="ollama/tiny"), timeout=5)
    assert answer.backend == "openai" and len(primary.chat_requests) == 1
    assert f"not sent to Ollama: messages[0].parts[1].image: {said}" in answer.attempts[0].error
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(messages=[message], model="ollama/tiny", exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert said in str(caught.value.details())
    assert local.chat_requests == []
    png_message = pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(image=pb.ImagePart(data=png(2, 2)))])
    answer = await stub.Complete(pb.CompleteRequest(messages=[png_message], model="ollama/tiny"), timeout=5)
    assert answer.backend == "ollama" and len(local.chat_requests) == 1


def image_message(*images: pb.ImagePart, role: pb.Role.ValueType = pb.ROLE_USER, content: str = "") -> pb.Message:
    parts = [pb.ContentPart(text="look"), *(pb.ContentPart(image=image) for image in images)]
    return pb.Message(role=role, content=content, parts=parts)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (image_message(content="and content too"), "messages[0].parts"),
        (image_message(pb.ImagePart(media_type="image/png")), "messages[0].parts[1].image"),
        (image_message(pb.ImagePart(url="file:///etc/passwd")), "messages[0].parts[1].image.url"),
        (image_message(pb.ImagePart(url="data:image/png;base64,iVBORw0KGgo=")), "messages[0].parts[1].image.url"),
        # URLs that urllib cannot even split, or whose port is no port: no traceback, the part named.
        (image_message(pb.ImagePart(url="https://[::1/cat.png")), "messages[0].parts[1].image.url"),
        (image_message(pb.ImagePart(url="https://example.com:99999/cat.png")), "messages[0].parts[1].image.url"),
        # A URL with a space or a line break: the upstream would fetch another URL, or fail in its own words.
        (image_message(pb.ImagePart(url="https://example.com/a cat.png")), "messages[0].parts[1].image.url"),
        (image_message(pb.ImagePart(url="https://example.com/cat.png\r\n")), "messages[0].parts[1].image.url"),
        (image_message(pb.ImagePart(data=png(4096, 4096))), "messages[0].parts[1].image.data"),  # over 2000 bytes
        (image_message(pb.ImagePart(data=png(1, 1), media_type="image/tiff")), "messages[0].parts[1].image.media_type"),
        (image_message(pb.ImagePart(data=b"not an image")), "messages[0].parts[1].image.data"),
        (image_message(pb.ImagePart(url=CAT_URL), role=pb.ROLE_ASSISTANT), "messages[0].parts[1].image"),
    ],
)
@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete", "CountTokens"])
async def test_an_invalid_image_is_invalid_argument_naming_the_part(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, message: pb.Message, field: str, rpc: str
) -> None:
    requests: dict[str, Any] = {
        "Complete": pb.CompleteRequest,
        "StreamComplete": pb.StreamCompleteRequest,
        "CountTokens": pb.CountTokensRequest,
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = getattr(stub, rpc)(requests[rpc](messages=[message]), timeout=5)
        _ = [c async for c in call] if rpc == "StreamComplete" else await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(caught.value)["BadRequest"].field_violations] == [field]
    assert not primary.chat_requests


@pytest.mark.parametrize(
    ("text", "field"),
    [('{"type": "object"', "tools[0].function.parameters_json"), ("[]", "tools[0].function.parameters_json")],
)
async def test_json_text_that_is_no_object_is_invalid_argument(
    stub: pb.LLMServiceAsyncStub, text: str, field: str
) -> None:
    tool = pb.Tool(function=pb.FunctionDefinition(name="tag", parameters_json=text))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(messages=[user()], tools=[tool]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = details(caught.value)["BadRequest"].field_violations
    assert violation.field == field and "JSON text of an object" in violation.description


def nested_schema(depth: int) -> str:
    """A schema whose text nests `depth` levels deep, the schema's own object the first."""
    return '{"type": "object", "default": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("depth", [512, 513, *range(930, 960)])
async def test_json_text_nested_too_deeply_is_invalid_argument_never_unknown(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    """Text the request's own reading took, nested near Python's recursion limit, was read again deeper in the stack
    (the token count): RecursionError, UNKNOWN and a traceback, or not, by a few levels. The limit is the gateway's."""
    tools = [pb.Tool(function=pb.FunctionDefinition(name="f", parameters_json=nested_schema(depth)))]
    calls: dict[str, Awaitable[Any]] = {
        "tools[0]": stub.CountTokens(pb.CountTokensRequest(messages=[user()], tools=tools), timeout=5),
        "options.tools[0]": stub.Complete(chat(options=pb.CompletionOptions(tools=tools)), timeout=5),
    }
    for where, call in calls.items():
        if depth <= 512:
            await call
            continue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        (violation,) = details(caught.value)["BadRequest"].field_violations
        assert violation.field == f"{where}.function.parameters_json"
        assert "nested at most 512 levels deep" in violation.description
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("detail", "image_tokens"),
    # OpenAI's vision guide: 85 at low detail; at high, a 1024x1024 image is scaled to 768x768, 4 tiles of 170.
    [(pb.IMAGE_DETAIL_LOW, 85), (pb.IMAGE_DETAIL_HIGH, 85 + 4 * 170)],
)
async def test_count_tokens_prices_an_image_by_its_size(
    stub_for: StubFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    detail: pb.ImageDetail.ValueType,
    image_tokens: int,
) -> None:
    stub = await stub_for(two_backends(primary, local))
    image = pb.ImagePart(data=png(1024, 1024), media_type="image/png", detail=detail)
    text = await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", messages=[user("look")]), timeout=5)

    count = await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", messages=[image_message(image)]), timeout=5)

    assert (count.token_count, count.estimated) == (text.token_count + image_tokens, False)


async def test_count_tokens_of_an_image_by_url_is_estimated(stub: pb.LLMServiceAsyncStub) -> None:
    message = image_message(pb.ImagePart(url=CAT_URL, detail=pb.IMAGE_DETAIL_HIGH))

    count = await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", messages=[message]), timeout=5)

    assert count.estimated and count.token_count > 85


async def test_a_servers_tokenizer_gets_the_json_text_too(stub_for: StubFactory) -> None:
    vllm = await FakeUpstream(models=("qwen",), vllm=True).start()
    try:
        stub = await stub_for(
            f"llm:\n  backends: [{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}]\n"
        )
        request = pb.CountTokensRequest(model="gpu/qwen", messages=[user()], tools=JSON_SCHEMA.tools)

        count = await stub.CountTokens(request, timeout=5)

        assert (count.encoding, count.estimated) == ("backend:gpu", False)
        (asked,) = vllm.tokenize_requests
        assert asked["tools"][0]["function"]["parameters"] == json.loads(SCHEMA_TEXT)
    finally:
        await vllm.stop()


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_an_empty_tool_result_reaches_either_api(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    """A tool may return nothing (a void function, an empty file): OpenAI takes an empty tool message, Anthropic a
    tool_result without content. Refused, the agent's whole conversation would fail on that one result."""
    call = pb.ToolCall(id="call_1", function=pb.FunctionCall(name="clear", arguments="{}"))
    conversation = [
        user("clear the cache"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content=""),
    ]

    answer = await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)

    assert answer.backend == primary.dialect
    result = primary.chat_requests[0]["messages"][2]
    if primary.dialect == "anthropic":
        assert result == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1"}]}
    else:
        assert result == {"role": "tool", "content": "", "tool_call_id": "call_1"}


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_two_tools_of_one_name_are_invalid_argument_naming_the_second(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Which of the two a call or a tool_choice names cannot be told; Anthropic refuses them (400 "Tool names must be
    unique"), which came back as UPSTREAM_REJECTED with no fallback, and OpenAI took them."""
    tools = [
        pb.Tool(function=pb.FunctionDefinition(name="search", description="the web")),
        pb.Tool(function=pb.FunctionDefinition(name="fetch")),
        pb.Tool(function=pb.FunctionDefinition(name="search", description="the wiki")),
    ]
    calls: dict[str, Awaitable[Any]] = {
        "options.tools[2]": stub.Complete(chat(options=pb.CompletionOptions(tools=tools)), timeout=5),
        "tools[2]": stub.CountTokens(pb.CountTokensRequest(messages=[user()], tools=tools), timeout=5),
    }
    for where, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        (violation,) = details(caught.value)["BadRequest"].field_violations
        assert (violation.field, violation.description) == (
            f"{where}.function.name",
            f"names the same function as {where.removesuffix('[2]')}[0]: tool names must be unique",
        )
    assert not primary.chat_requests


# --- the Python SDK -------------------------------------------------------------------------------------------------

SCHEMA = json.loads(SCHEMA_TEXT)


@pytest.fixture
async def client(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> AsyncIterator[AsyncClient]:
    gateway = await gateway_factory(two_backends(primary, local))
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        yield client


async def test_the_sdk_builders_send_schemas_as_json_text(client: AsyncClient, primary: FakeUpstream) -> None:
    await client.complete(
        [user("tag this")],
        tools=[llmrelay.tool("tag", SCHEMA, description="tags it"), llmrelay.tool("raw", SCHEMA_TEXT)],
        response_format=llmrelay.json_schema("tags", SCHEMA, strict=True),
    )

    (raw,) = primary.chat_bodies
    assert f'"parameters":{json.dumps(SCHEMA)}'.encode() in raw
    assert f'"parameters":{SCHEMA_TEXT}'.encode() in raw
    assert f'"schema":{json.dumps(SCHEMA)}'.encode() in raw


async def test_the_sdks_dict_options_send_schemas_as_json_text(client: AsyncClient, primary: FakeUpstream) -> None:
    await client.complete(
        [{"role": "user", "content": "tag this"}],
        tools=[{"function": {"name": "tag", "parameters": SCHEMA}}],
        response_format={
            "type": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            "json_schema": {"name": "tags", "schema": SCHEMA},
        },
    )

    (raw,) = primary.chat_bodies
    assert f'"parameters":{json.dumps(SCHEMA)}'.encode() in raw  # 3 stays 3, and 2**60 + 1 stays exact
    assert f'"schema":{json.dumps(SCHEMA)}'.encode() in raw


async def test_the_sdk_sends_images_from_bytes_and_urls(client: AsyncClient, primary: FakeUpstream) -> None:
    image = png(4, 4)
    message = llmrelay.user_message(
        "compare", llmrelay.image(image, detail="low"), llmrelay.image(CAT_URL, detail="high")
    )

    answer = await client.complete([message])

    assert answer.message.content == "echo: compare"
    assert primary.chat_requests[0]["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}", "detail": "low"},
        },
        {"type": "image_url", "image_url": {"url": CAT_URL, "detail": "high"}},
    ]
