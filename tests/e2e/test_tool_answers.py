"""Tool calls as upstreams answer them, unary and streamed, in either dialect: what the caller gets is a call it can
answer, with its tool message, in the next turn of the same conversation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from llmrelay import StreamAssembler
from llmrelay import v1 as pb
from support import (
    DIALECTS,
    FAST_ROUTER,
    OPENAI_TEST_KEY,
    StubFactory,
    chat,
    details,
    read_all,
    stream_chat,
    tool,
    user,
)
from upstream import FakeUpstream, thought_signature

WEATHER = tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}})
OPTIONS = pb.CompletionOptions(tools=[WEATHER])


def answering(
    dialect: str, calls: list[dict[str, Any]], *, streamed: bool, numbered: bool = True, objects: bool = False
) -> dict[str, Any]:
    """A fault that answers with these tool calls ({"id"?, "name", "arguments": an object}), whole or as a stream of
    one event per call, as the dialect writes them; a call's id is left out where it has none, and a streamed call's
    `index` where not `numbered` (OpenAI's dialect). `objects`: the arguments as JSON objects where the dialect writes
    text, as some servers send them (OpenAI's `arguments`; Anthropic's streamed `input`, whole in its block's start)."""
    if dialect == "anthropic":
        blocks = [{"type": "tool_use", "name": c["name"], "input": c["arguments"]} | _id(c) for c in calls]
        message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test"}
        usage = {"input_tokens": 5, "output_tokens": 9}
        if not streamed:
            body = message | {"content": blocks, "stop_reason": "tool_use", "usage": usage}
            return {"body": json.dumps(body)}
        events: list[dict[str, Any]] = [{"type": "message_start", "message": message | {"content": [], "usage": usage}}]
        for index, block in enumerate(blocks):
            if objects:
                events.append({"type": "content_block_start", "index": index, "content_block": block})
            else:
                events += [
                    {"type": "content_block_start", "index": index, "content_block": block | {"input": {}}},
                    {"type": "content_block_delta", "index": index, "delta": _partial(block["input"])},
                ]
            events.append({"type": "content_block_stop", "index": index})
        events += [
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": usage},
            {"type": "message_stop"},
        ]
        return _sse(f"event: {event['type']}\ndata: {json.dumps(event)}" for event in events)
    items = [
        {
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"] if objects else _text(c["arguments"])},
        }
        | _id(c)
        for c in calls
    ]
    answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-test"}
    if not streamed:
        reply = {"role": "assistant", "content": None, "tool_calls": items}
        return {
            "body": json.dumps(answer | {"choices": [{"index": 0, "message": reply, "finish_reason": "tool_calls"}]})
        }
    deltas = [
        {"role": "assistant"},
        *({"tool_calls": [item | ({"index": i} if numbered else {})]} for i, item in enumerate(items)),
    ]
    chunks = [answer | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append(answer | {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return _sse([*(f"data: {json.dumps(chunk)}" for chunk in chunks), "data: [DONE]"])


def _text(arguments: dict[str, Any] | None) -> str | None:
    """Arguments as OpenAI's dialect writes them: JSON text; None as JSON's null, as some servers send for none."""
    return None if arguments is None else json.dumps(arguments)


def _id(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"]} if "id" in call else {}


def _partial(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "input_json_delta", "partial_json": json.dumps(arguments)}


def _sse(events: Any) -> dict[str, Any]:
    return {"body": "".join(f"{event}\n\n" for event in events), "content_type": "text/event-stream"}


async def answer_of(stub: pb.LLMServiceAsyncStub, streamed: bool) -> pb.CompleteResponse:
    """The answer to "weather?" with the weather tool, as Complete gives it or as its stream adds up to."""
    if not streamed:
        return await stub.Complete(chat("weather?", options=OPTIONS), timeout=5)
    assembler = StreamAssembler()
    async for chunk in stub.StreamComplete(stream_chat("weather?", options=OPTIONS), timeout=5):
        assembler.add(chunk)
    return assembler.result()


@pytest.mark.parametrize("given", [{}, {"id": "call_0"}], ids=["no id", "one id for both"])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_calls_the_upstream_gave_no_id_or_one_id_get_their_own_their_results_can_answer(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, streamed: bool, given: dict[str, str]
) -> None:
    # A server that numbers no call (an id is optional in some OpenAI-compatible servers' answers): the caller got
    # calls with an empty id, and its next turn, the call with its result, was refused INVALID_ARGUMENT. Some give
    # parallel calls one id: the caller's next turn was refused alike, and a stream ran the second call into the first.
    calls = [given | {"name": "weather", "arguments": {"city": city}} for city in ("Oslo", "Rome")]
    primary.inject(answering(primary.dialect, calls, streamed=streamed))

    answer = await answer_of(stub, streamed)

    assert answer.backend == primary.dialect and local.chat_requests == []
    ids = [call.id for call in answer.message.tool_calls]
    assert all(ids) and len(set(ids)) == 2, ids
    assert [json.loads(call.function.arguments) for call in answer.message.tool_calls] == [
        {"city": "Oslo"},
        {"city": "Rome"},
    ]
    results = [pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id=call_id) for call_id in ids]
    conversation = [user("weather?"), answer.message, *results]
    again = await stub.Complete(pb.CompleteRequest(messages=conversation, options=OPTIONS), timeout=5)
    assert again.backend == primary.dialect
    sent = json.dumps(primary.chat_requests[-1]["messages"])
    assert all(sent.count(f'"{call_id}"') == 2 for call_id in ids), "each call and its result, by the same id"


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_arguments_given_as_an_object_keep_integers_beyond_64_bits(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streamed: bool
) -> None:
    # Written back as text from what was read: read as floats (orjson's, past 64 bits), a stream's came back changed.
    arguments = {"account": 123456789012345678901234567890, "floor": -9223372036854775809}
    primary.inject(
        answering(primary.dialect, [{"name": "weather", "arguments": arguments}], streamed=streamed, objects=True)
    )
    answer = await answer_of(stub, streamed)
    assert [json.loads(call.function.arguments) for call in answer.message.tool_calls] == [arguments]


@pytest.mark.parametrize("name", ["", "functions.weather", "wetter ☀", "w" * 65])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_call_of_a_name_no_tool_can_have_is_a_malformed_answer(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, streamed: bool, name: str
) -> None:
    # No request declares such a function (a tool's name is 1-64 letters, digits, '_' or '-'), and the caller's next
    # turn holding the call was refused INVALID_ARGUMENT for the gateway's own answer: the next backend answers.
    primary.inject(answering(primary.dialect, [{"id": "c1", "name": name, "arguments": {}}], streamed=streamed))

    answer = await answer_of(stub, streamed)

    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        (primary.dialect, pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert "name" in answer.attempts[0].error and len(local.chat_requests) == 1


@pytest.mark.parametrize("ids", [("a", "b"), ("call_0", "call_0")], ids=["own ids", "one id"])
async def test_streamed_calls_without_an_index_each_in_its_own_event_stay_apart(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, ids: tuple[str, str]
) -> None:
    # Servers that number no streamed call (Gemini's OpenAI-compatible API) send each whole, in an event of its own:
    # each was taken as call 0, and the caller got one call of both ids, its arguments '{"city": "Oslo"}{...}'. Some
    # give both one id: the second is a call of its own all the same, with an id of the gateway's.
    calls = [
        {"id": ids[0], "name": "weather", "arguments": {"city": "Oslo"}},
        {"id": ids[1], "name": "weather", "arguments": {"city": "Rome"}},
    ]
    primary.inject(answering("openai", calls, streamed=True, numbered=False))

    answer = await answer_of(stub, streamed=True)

    got = [(c.function.name, json.loads(c.function.arguments)) for c in answer.message.tool_calls]
    assert got == [("weather", {"city": "Oslo"}), ("weather", {"city": "Rome"})]
    first, second = (c.id for c in answer.message.tool_calls)
    assert first == ids[0] and second != first and (second == ids[1] or second.startswith("call_"))


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_whose_arguments_are_null_has_none_alike_whole_or_streamed(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streamed: bool
) -> None:
    # Complete gave the text "null" (JSON's null written out), StreamComplete "": one call, two answers.
    primary.inject(answering("openai", [{"id": "a", "name": "weather", "arguments": None}], streamed=streamed))

    answer = await answer_of(stub, streamed)

    assert [(c.id, c.function.name, c.function.arguments) for c in answer.message.tool_calls] == [("a", "weather", "")]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("primary", ["anthropic"], indirect=True)
async def test_a_tool_use_whose_input_is_null_has_no_arguments_alike_whole_or_streamed(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streamed: bool
) -> None:
    # Streamed, the call had "{}"; whole, the answer was malformed and went to the next backend.
    called = [{"id": "a", "name": "weather", "arguments": None}]
    primary.inject(answering("anthropic", called, streamed=streamed, objects=True))

    answer = await answer_of(stub, streamed)

    assert answer.backend == "anthropic", [a.error for a in answer.attempts]
    assert [(c.id, c.function.name, c.function.arguments) for c in answer.message.tool_calls] == [
        ("a", "weather", "{}")
    ]


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_of_no_function_in_the_finishing_event_fails_the_attempt_alike_whole_or_streamed(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, streamed: bool
) -> None:
    """A call sent whole with the finish reason, in one event (as Gemini's OpenAI-compatible API sends them), named as
    no function can be: the stream counted as whole at its finish, and ended TOOL_CALLS without the call, the event's
    text and the upstream's usage lost, where Complete's same answer went to the next backend."""
    call = {"index": 0, "id": "a", "type": "function", "function": {"name": "default_api:weather", "arguments": "{}"}}
    reply = {"role": "assistant", "content": "Looking it up.", "tool_calls": [call]}
    head: dict[str, Any] = {"id": "chatcmpl-1", "created": 0, "model": "gpt-test"}
    if streamed:
        choice = {"index": 0, "delta": reply, "finish_reason": "tool_calls"}
        finishing = head | {"object": "chat.completion.chunk", "choices": [choice]}
        usage = head | {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        primary.inject(_sse([f"data: {json.dumps(finishing)}", f"data: {json.dumps(usage)}", "data: [DONE]"]))
    else:
        whole = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": reply, "finish_reason": "tool_calls"}],
        }
        primary.inject({"body": json.dumps(head | whole)})

    answer = await answer_of(stub, streamed)

    assert (answer.backend, answer.finish_reason, len(answer.message.tool_calls)) == (
        "ollama",
        pb.FINISH_REASON_STOP,
        0,
    )
    assert "'default_api:weather' is no function's" in answer.attempts[0].error, answer.attempts[0].error


@pytest.fixture
async def gemini() -> AsyncIterator[FakeUpstream]:
    """An upstream that signs its tool calls and wants the signatures back, as Gemini 3's OpenAI-compatible API."""
    upstream = await FakeUpstream(models=("gemini-test",), gemini=True).start()
    yield upstream
    await upstream.stop()


def signing_backend_first(gemini: FakeUpstream, primary: FakeUpstream) -> str:
    """Gemini (openai_compatible), then OpenAI's API, on the fake OpenAI upstream."""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test}}
  backends:
    - {{name: gemini, kind: openai_compatible, base_url: "{gemini.base_url}", model: gemini-test}}
  order: [gemini, openai]
{FAST_ROUTER}"""


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_signed_call_goes_back_with_its_signature_and_the_next_turn_is_answered(
    stub_for: StubFactory, gemini: FakeUpstream, primary: FakeUpstream, streamed: bool
) -> None:
    # Gemini 3 signs its calls (extra_content.google.thought_signature) and refuses a chat whose calls come back
    # without their signatures: through the gateway, which dropped them, every agent's second turn was refused.
    stub = await stub_for(signing_backend_first(gemini, primary))
    calls = [{"name": "weather", "arguments": '{"city": "Oslo"}'}, {"name": "weather", "arguments": '{"city": "Rome"}'}]
    gemini.inject({"tool_calls": calls})

    answer = await answer_of(stub, streamed)

    first, second = answer.message.tool_calls
    assert answer.backend == "gemini" and answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert first.signature == thought_signature(first.id) and not second.HasField("signature")
    results = [pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id=call.id) for call in (first, second)]
    turn = pb.CompleteRequest(messages=[user("weather?"), answer.message, *results], options=OPTIONS)
    again = await stub.Complete(turn, timeout=5)
    assert again.backend == "gemini" and again.message.content == "echo: weather?"
    sent = gemini.chat_requests[-1]["messages"][1]["tool_calls"]
    assert [call.get("extra_content") for call in sent] == [
        {"google": {"thought_signature": thought_signature(first.id)}},
        None,
    ]

    # The same turn without the signature is refused by Gemini, in its words: the check above is Gemini's own.
    turn.messages[1].tool_calls[0].ClearField("signature")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Complete(turn, timeout=5)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "thought_signature" in (refused.value.details() or "")


async def test_a_signature_is_not_sent_to_openai_which_signs_no_call(
    stub_for: StubFactory, gemini: FakeUpstream, primary: FakeUpstream
) -> None:
    # A chat that Gemini signed, answered by OpenAI's API when Gemini fails: the calls go without their signatures.
    stub = await stub_for(signing_backend_first(gemini, primary))
    signature = thought_signature("call_2_1")
    call = pb.ToolCall(id="call_2_1", function=pb.FunctionCall(name="weather", arguments="{}"), signature=signature)
    said = pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call])
    result = pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id="call_2_1")
    gemini.inject({"status": 503}, {"status": 503})

    answer = await stub.Complete(pb.CompleteRequest(messages=[user("weather?"), said, result], options=OPTIONS))

    assert answer.backend == "openai"
    assert [len(requests) for requests in (gemini.chat_requests, primary.chat_requests)] == [2, 1]
    assert gemini.chat_requests[0]["messages"][1]["tool_calls"][0]["extra_content"] == {
        "google": {"thought_signature": signature}
    }
    assert "extra_content" not in primary.chat_requests[0]["messages"][1]["tool_calls"][0]


async def test_a_signature_larger_than_a_message_may_be_ends_the_stream_with_the_gateways_status(
    stub_for: StubFactory, gemini: FakeUpstream, primary: FakeUpstream
) -> None:
    # Text is sent in pieces under the message limit; a call's id and signature go whole or not at all. One over
    # the limit was left to gRPC, which refused the message with a bare RESOURCE_EXHAUSTED and no details.
    stub = await stub_for(signing_backend_first(gemini, primary), server="max_message_bytes: 100000")
    call = {"id": "a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    call["extra_content"] = {"google": {"thought_signature": "c2ln" * 50_000}}
    gemini.inject({"body": _signed_stream(call), "content_type": "text/event-stream"})

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.StreamComplete(stream_chat("weather?", options=OPTIONS), timeout=5))

    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["ErrorInfo"].reason == "ANSWER_TOO_LARGE"
    assert "server.max_message_bytes" in (caught.value.details() or "")


def _signed_stream(call: dict[str, Any]) -> str:
    answer = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gemini-test"}
    deltas = [({"role": "assistant", "tool_calls": [call]}, None), ({}, "tool_calls")]
    chunks = [answer | {"choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in deltas]
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
