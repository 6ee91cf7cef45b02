"""The seed's cases end to end: a real gRPC channel, the real gateway, real HTTP upstreams on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmrelay import StreamAssembler
from llmrelay import v1 as pb
from support import (
    DIALECTS,
    OPENAI_TEST_KEY,
    StubFactory,
    chat,
    details,
    read_all,
    stream_chat,
    struct,
    tool,
    two_backends,
    user,
)
from upstream import FakeUpstream


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_completion_is_served_by_the_first_backend(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    answer = await stub.Complete(chat("what is two plus two"), timeout=5)
    assert answer.message.content == "echo: what is two plus two"
    assert answer.message.role == pb.ROLE_ASSISTANT
    assert (answer.backend, answer.model) == (primary.dialect, primary.models[0])
    assert answer.finish_reason == pb.FINISH_REASON_STOP
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0
    assert not answer.usage.estimated
    assert [a.outcome for a in answer.attempts] == [pb.ATTEMPT_OUTCOME_SUCCEEDED]
    assert len(primary.chat_requests) == 1


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_stream_concatenates_to_the_unary_answer(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    unary = await stub.Complete(chat("one two three four"), timeout=5)
    # Words sent apart, so that the answer comes in pieces (the gateway joins pieces that arrive together).
    primary.inject({"trickle_s": 0.01})
    chunks = [c async for c in stub.StreamComplete(stream_chat("one two three four"), timeout=5)]
    assert len(chunks) > 2, "the answer must arrive in pieces"
    assert "".join(c.delta.content for c in chunks) == unary.message.content
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.total_tokens == unary.usage.total_tokens
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert {c.backend for c in chunks} == {primary.dialect}
    assert [a.outcome for a in last.attempts] == [pb.ATTEMPT_OUTCOME_SUCCEEDED]


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_fallback_to_local_when_the_primary_is_down(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"drop": True}, {"drop": True})
    answer = await stub.Complete(chat("still there?"), timeout=5)
    assert (answer.backend, answer.model) == ("ollama", "tiny")
    assert answer.message.content == "echo: still there?"
    outcomes = [(a.backend, a.outcome) for a in answer.attempts]
    assert outcomes == [
        (primary.dialect, pb.ATTEMPT_OUTCOME_UNREACHABLE),
        (primary.dialect, pb.ATTEMPT_OUTCOME_UNREACHABLE),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    assert local.chat_requests[0]["model"] == "tiny", "the model is mapped to the fallback's own"


async def test_fallback_in_the_other_direction(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(_ollama_first(primary, local))
    local.inject({"status": 503}, {"status": 503})
    answer = await stub.Complete(chat("hi"), timeout=5)
    assert answer.backend == "openai"
    assert [a.upstream_status for a in answer.attempts[:2]] == [503, 503]


def _ollama_first(primary: FakeUpstream, local: FakeUpstream) -> str:
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test}}
  ollama: {{base_url: "{local.base_url}", model: tiny}}
  order: [ollama, openai]
router:
  retry: {{max_retries: 1, initial_backoff_s: 0.01}}
"""


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_streaming_falls_back_before_the_first_chunk(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"status": 502}, {"status": 502})
    chunks = [c async for c in stub.StreamComplete(stream_chat("a b c"), timeout=5)]
    assert {c.backend for c in chunks} == {"ollama"}
    assert "".join(c.delta.content for c in chunks) == "echo: a b c"


async def test_network_failures_of_every_backend_give_unavailable_with_what_was_tried(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"drop": True}, {"drop": True})
    local.inject({"drop": True}, {"drop": True})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "openai" in str(error.details()) and "ollama" in str(error.details())
    info = details(error)["ErrorInfo"]
    assert (info.reason, info.domain) == ("BACKENDS_UNAVAILABLE", "llmrelay.dev")
    assert info.metadata["attempts"] == "openai:unreachable,openai:unreachable,ollama:unreachable,ollama:unreachable"
    assert details(error)["RetryInfo"].retry_delay.ToNanoseconds() > 0
    # The server goes on serving.
    assert (await stub.Complete(chat(), timeout=5)).backend == "openai"


async def test_concurrent_requests_to_different_backends(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    requests = [chat(f"question {i}", model="ollama/tiny" if i % 2 else "gpt-test") for i in range(40)]
    answers = await asyncio.gather(*(stub.Complete(r, timeout=10) for r in requests))
    for i, answer in enumerate(answers):
        assert answer.message.content == f"echo: question {i}"
        assert answer.backend == ("ollama" if i % 2 else "openai")
    assert (len(primary.chat_requests), len(local.chat_requests)) == (20, 20)


async def test_every_option_set_reaches_the_upstream_and_nothing_unset(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    options = pb.CompletionOptions(
        temperature=0.0,  # zero is a value, not "unset"
        top_p=0.5,
        max_tokens=64,
        stop=["END"],
        seed=7,
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=pb.JsonSchema(name="answer", schema=struct({"type": "object"})),
        ),
        tools=[tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}}, description="d")],
        tool_choice=pb.ToolChoice(function_name="weather"),
        reasoning_effort=pb.REASONING_EFFORT_LOW,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
        parallel_tool_calls=False,
    )
    await stub.Complete(chat("x", options=options), timeout=5)
    sent = primary.chat_requests[0]
    assert sent["temperature"] == 0.0
    assert sent["top_p"] == 0.5
    assert sent["max_completion_tokens"] == 64, "OpenAI's reasoning models take max_completion_tokens"
    assert sent["stop"] == ["END"]
    assert sent["seed"] == 7
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }
    assert sent["tools"][0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert sent["reasoning_effort"] == "low"
    assert (sent["presence_penalty"], sent["frequency_penalty"], sent["parallel_tool_calls"]) == (0.1, -0.1, False)

    primary.reset()
    await stub.Complete(chat("bare"), timeout=5)
    assert set(primary.chat_requests[0]) == {"model", "messages"}


async def test_ollama_gets_max_tokens_and_reasoning_comes_back(
    stub: pb.LLMServiceAsyncStub, local: FakeUpstream
) -> None:
    local.inject({"reasoning": "let me think"})
    options = pb.CompletionOptions(max_tokens=5)
    answer = await stub.Complete(chat("hm", model="ollama/tiny", options=options), timeout=5)
    assert local.chat_requests[0]["max_tokens"] == 5
    assert answer.message.reasoning == "let me think"


async def test_ollama_gets_the_least_reasoning_it_has_for_minimal(
    stub: pb.LLMServiceAsyncStub, local: FakeUpstream
) -> None:
    """Ollama's /v1 refuses "minimal" (400 "invalid reasoning value"), which would end the call INVALID_ARGUMENT."""
    options = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_MINIMAL)
    answer = await stub.Complete(chat("hm", model="ollama/tiny", options=options), timeout=5)
    chunks = [c async for c in stub.StreamComplete(stream_chat("hm", model="ollama/tiny", options=options), timeout=5)]
    assert (answer.backend, chunks[-1].backend) == ("ollama", "ollama")
    assert [sent["reasoning_effort"] for sent in local.chat_requests] == ["low", "low"]


async def test_ollama_is_offered_no_tool_it_may_not_call_nor_sent_a_call_it_must_make(
    stub: pb.LLMServiceAsyncStub, local: FakeUpstream, primary: FakeUpstream
) -> None:
    """Ollama's /v1 reads no tool_choice and no parallel_tool_calls: sent them, it offered the model every tool where
    the caller chose none, and an answer with no call where the caller required one came back as if it kept it."""
    tool = pb.Tool(function=pb.FunctionDefinition(name="weather"))
    none = pb.CompletionOptions(
        tools=[tool], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), parallel_tool_calls=False
    )
    answer = await stub.Complete(chat("hm", model="ollama/tiny", options=none), timeout=5)
    assert answer.backend == "ollama"
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(local.chat_requests[-1])
    for choice, named in (
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), "required"),
        (pb.ToolChoice(function_name="weather"), "weather"),
    ):
        options = pb.CompletionOptions(tools=[tool], tool_choice=choice)
        answer = await stub.Complete(chat("hm", model="ollama/tiny", options=options), timeout=5)
        refused, served = answer.attempts
        assert (refused.backend, refused.outcome) == ("ollama", pb.ATTEMPT_OUTCOME_REJECTED)
        assert (
            refused.error == f"not sent to Ollama: options.tool_choice: Ollama cannot be made to call a tool ({named})"
        )
        assert (served.backend, answer.backend) == ("openai", "openai")
        assert primary.chat_requests[-1]["tool_choice"]
    assert len(local.chat_requests) == 1


async def test_llamacpp_is_made_to_call_the_function_a_tool_choice_names(stub_for: StubFactory) -> None:
    """llama.cpp's server reads tool_choice as "auto", "none" or "required" alone: OpenAI's object naming a function
    was taken for "auto" (a type error in its log), and the call came back OK with the function uncalled."""
    llama = await FakeUpstream(models=("qwen",), llamacpp=True).start()
    try:
        stub = await stub_for(
            f"llm:\n  backends: [{{name: gpu, kind: llamacpp, base_url: '{llama.base_url}', model: qwen}}]\n"
        )
        tools = [tool("weather", {"type": "object"}), tool("clock", {"type": "object"})]
        named = pb.CompletionOptions(tools=tools, tool_choice=pb.ToolChoice(function_name="clock"))
        await stub.Complete(chat("x", options=named), timeout=5)
        [_ async for _ in stub.StreamComplete(stream_chat("x", options=named), timeout=5)]
        required = pb.CompletionOptions(tools=tools, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))
        await stub.Complete(chat("x", options=required), timeout=5)
    finally:
        await llama.stop()
    sent = [(body["tool_choice"], [t["function"]["name"] for t in body["tools"]]) for body in llama.chat_requests]
    assert sent == [("required", ["clock"]), ("required", ["clock"]), ("required", ["weather", "clock"])]


@pytest.mark.parametrize(
    ("arguments", "sent"),
    [
        ("", "{}"),
        ('{"city": "Par', json.dumps({"unparsed_arguments": '{"city": "Par'})),
        ('["Paris"]', json.dumps({"unparsed_arguments": '["Paris"]'})),
        ('{"n": NaN}', json.dumps({"unparsed_arguments": '{"n": NaN}'})),
        ('{"city": "Zürich"}', '{"city": "Zürich"}'),
    ],
    ids=["empty", "broken", "not an object", "NaN", "an object, as written"],
)
async def test_a_call_whose_arguments_are_no_object_reaches_ollama_as_one(
    stub: pb.LLMServiceAsyncStub, local: FakeUpstream, arguments: str, sent: str
) -> None:
    """Ollama's /v1 reads a tool call's arguments in the history into an object and refuses the chat otherwise (400
    "invalid tool call arguments"), which ended the turn INVALID_ARGUMENT: empty ones (some servers answer a call of a
    function without parameters so), and a small model's broken ones, which an agent answers with a tool result
    telling the model so and must then send back, turn after turn."""
    call = pb.ToolCall(id="call_1", function=pb.FunctionCall(name="weather", arguments=arguments))
    history = [
        pb.Message(role=pb.ROLE_USER, content="weather?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="error: the arguments are not valid JSON"),
    ]
    answer = await stub.Complete(pb.CompleteRequest(model="ollama/tiny", messages=history), timeout=5)
    chunks = [c async for c in stub.StreamComplete(pb.StreamCompleteRequest(model="ollama/tiny", messages=history))]
    assert (answer.backend, chunks[-1].backend) == ("ollama", "ollama")
    assert [request["messages"][1]["tool_calls"][0]["function"]["arguments"] for request in local.chat_requests] == [
        sent,
        sent,
    ]


async def test_a_refusal_comes_back_as_the_content_with_content_filter(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """OpenAI's structured outputs answer a refused request with `refusal` in place of `content` (and "stop"): the
    caller gets the model's words and CONTENT_FILTER, as for an Anthropic model's refusal, not an empty answer that
    looks whole."""
    refusal = "I'm sorry, I cannot help with that."
    primary.inject({"refusal": refusal}, {"refusal": refusal})
    answer = await stub.Complete(chat("something forbidden"), timeout=5)
    assert (answer.message.content, answer.finish_reason) == (refusal, pb.FINISH_REASON_CONTENT_FILTER)
    chunks = [c async for c in stub.StreamComplete(stream_chat("something forbidden"), timeout=5)]
    assert "".join(c.delta.content for c in chunks) == refusal
    assert chunks[-1].finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens == len(refusal.split())


async def test_an_answer_that_says_something_then_refuses_keeps_both_whether_streamed_or_not(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    refusal = " I'm sorry, I cannot go on."
    primary.inject(*[{"refusal": refusal, "said_first": True}] * 2)
    answer = await stub.Complete(chat("something forbidden"), timeout=5)
    assert (answer.message.content, answer.finish_reason) == (
        "echo: something forbidden" + refusal,
        pb.FINISH_REASON_CONTENT_FILTER,
    )
    chunks = [c async for c in stub.StreamComplete(stream_chat("something forbidden"), timeout=5)]
    assert "".join(c.delta.content for c in chunks) == answer.message.content
    assert chunks[-1].finish_reason == pb.FINISH_REASON_CONTENT_FILTER


async def test_tool_calls_round_trip(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"tool_call": {"name": "weather", "arguments": '{"city": "Oslo"}'}})
    answer = await stub.Complete(chat("weather in Oslo?"), timeout=5)
    assert answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call = answer.message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("call_1_1", "weather", '{"city": "Oslo"}')

    primary.inject({"tool_call": {"name": "weather", "arguments": '{"city": "Oslo"}'}})
    chunks = [c async for c in stub.StreamComplete(stream_chat("weather in Oslo?"), timeout=5)]
    fragments = [d for c in chunks for d in c.delta.tool_calls]
    assert fragments[0].name == "weather" and fragments[0].id == "call_1_1"
    assert "".join(d.arguments for d in fragments) == '{"city": "Oslo"}'
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS

    conversation = [
        user("weather in Oslo?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_call_id="call_1_1"),
    ]
    await stub.Complete(pb.CompleteRequest(messages=conversation), timeout=5)
    sent = primary.chat_requests[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1_1"}


async def test_parallel_calls_an_ollama_stream_numbers_alike_are_each_a_call(
    stub: pb.LLMServiceAsyncStub, local: FakeUpstream
) -> None:
    """Ollama streams a batch of parallel calls each whole, each as index 0 with an id of its own: they were relayed
    as one call whose arguments were the two run together, and the next turn, answering both, was refused."""

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({'id': 'chatcmpl-1', 'model': 'tiny', 'choices': [choice]})}\n\n"

    def call(call_id: str, city: str) -> dict[str, Any]:
        function = {"name": "weather", "arguments": json.dumps({"city": city})}
        return {"tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": function}]}

    body = event(call("call_a", "Oslo")) + event(call("call_b", "Rome")) + event({}, "tool_calls") + "data: [DONE]\n\n"
    local.inject({"body": body, "content_type": "text/event-stream"})
    assembler = StreamAssembler()
    for chunk in await read_all(stub.StreamComplete(stream_chat("weather?", model="ollama/tiny"), timeout=5)):
        assembler.add(chunk)
    answer = assembler.result()
    assert [(c.id, c.function.arguments) for c in answer.message.tool_calls] == [
        ("call_a", '{"city": "Oslo"}'),
        ("call_b", '{"city": "Rome"}'),
    ]
    answers = [pb.Message(role=pb.ROLE_TOOL, content="21C", tool_call_id=c.id) for c in answer.message.tool_calls]
    request = pb.CompleteRequest(model="ollama/tiny", messages=[user("weather?"), answer.message, *answers])
    assert (await stub.Complete(request, timeout=5)).message.content


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.CompleteRequest(), "messages"),
        (pb.CompleteRequest(messages=[pb.Message(content="no role")]), "messages[0].role"),
        (pb.CompleteRequest(messages=[pb.Message(role=cast(pb.Role.ValueType, 99), content="x")]), "messages[0].role"),
        (pb.CompleteRequest(messages=[user("")]), "messages[0].content"),
        (chat(options=pb.CompletionOptions(max_tokens=-1)), "options.max_tokens"),
        (chat(options=pb.CompletionOptions(temperature=7)), "options.temperature"),
        (
            chat(options=pb.CompletionOptions(tool_choice=pb.ToolChoice(function_name="nope"))),
            "options.tool_choice.function_name",
        ),
        (pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_TOOL, content="r")]), "messages[0].tool_call_id"),
    ],
)
async def test_invalid_requests_name_the_field(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, request_: pb.CompleteRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request_, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(caught.value.details())
    violations = details(caught.value)["BadRequest"].field_violations
    assert field in [v.field for v in violations]
    assert details(caught.value)["ErrorInfo"].reason == "INVALID_REQUEST"
    assert primary.chat_requests == [], "an invalid request never reaches an upstream"


async def test_unknown_model_is_not_found_listing_what_is_served(stub: pb.LLMServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="no-such-model"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.metadata["served"] == "openai/gpt-test,ollama/tiny"
    assert "openai/gpt-test" in str(caught.value.details())


async def test_model_resolution_forms(stub: pb.LLMServiceAsyncStub) -> None:
    assert (await stub.Complete(chat(model="tiny"), timeout=5)).backend == "ollama"
    assert (await stub.Complete(chat(model="ollama/tiny"), timeout=5)).backend == "ollama"
    # A model the probe discovered on the upstream (its /v1/models), not only the configured default.
    answer = await stub.Complete(chat(model="gpt-test-mini"), timeout=5)
    assert (answer.backend, answer.model) == ("openai", "gpt-test-mini")


async def test_exact_model_forbids_substitution(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"status": 500}, {"status": 500})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="gpt-test", exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ollama" not in details(caught.value)["ErrorInfo"].metadata["attempts"]


async def test_aliases(stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream) -> None:
    stub = await stub_for(
        two_backends(primary, local).replace("  ollama:", '  aliases: {fast: "ollama/tiny"}\n  ollama:')
    )
    answer = await stub.Complete(chat(model="fast"), timeout=5)
    assert (answer.backend, answer.model) == ("ollama", "tiny")


async def test_standard_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "llmrelay.v1.LLMService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    # A misspelt service is NOT_FOUND, as the protocol has it, in words that name the services there are.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="llmrelay.v1.LLMServce" + "e" * 10_000), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        f"no health status for the service {'llmrelay.v1.LLMServce' + 'e' * 179!r}; this gateway has '' and"
        " 'llmrelay.v1.LLMService'"
    )

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=5)]
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"llmrelay.v1.LLMService", "grpc.health.v1.Health"} <= services


async def test_health_rpc_reports_every_backend(stub: pb.LLMServiceAsyncStub) -> None:
    report = await stub.Health(pb.HealthRequest(probe=True), timeout=5)
    assert report.serving
    by_name = {b.name: b for b in report.backends}
    assert list(by_name) == ["openai", "ollama"]
    assert by_name["ollama"].kind == "ollama" and list(by_name["ollama"].models) == ["tiny"]
    assert list(by_name["openai"].models) == ["gpt-test", "gpt-test-mini"]
    assert all(b.reachable and b.circuit_state == pb.CIRCUIT_STATE_CLOSED for b in report.backends)
    assert all(b.latency.ToNanoseconds() > 0 for b in report.backends)


async def test_health_reports_an_unreachable_backend(stub_for: StubFactory, local: FakeUpstream) -> None:
    stub = await stub_for(f"""
llm:
  ollama: {{base_url: "{local.base_url}", model: tiny}}
  backends:
    - {{name: dead, kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", model: m}}
    - {{name: dead_ollama, kind: ollama, base_url: "http://127.0.0.1:9/v1", model: m}}
""")
    report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
    for name in ("dead", "dead_ollama"):
        dead = next(b for b in report.backends if b.name == name)
        assert not dead.reachable and "127.0.0.1:9" in dead.last_error
        # A refused connection is not reported as a timeout.
        assert "Timeout" not in dead.last_error, dead.last_error
    assert report.serving, "one reachable backend is enough to serve"


async def test_no_secret_is_echoed(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject(
        {"status": 401, "body": f'{{"error": {{"message": "Incorrect API key provided: {OPENAI_TEST_KEY}"}}}}'}
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="gpt-test", exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_AUTH_FAILED"
    assert OPENAI_TEST_KEY not in str(caught.value.details())
    assert OPENAI_TEST_KEY not in str(details(caught.value))


async def test_no_part_of_a_key_is_echoed_from_a_body_that_is_no_json(
    stub_for: StubFactory, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A key with no known prefix (a Gemini key's), quoted back in a text body past the first 150 characters: the body
    was cut to 200 before the key was looked for, and the 20 characters left of it were passed on and logged."""
    key = "AIzaSyB-Zx9QeR4kT7mW2nP5vL8cJ3hF6dG1aS0"
    stub = await stub_for(
        f'llm:\n  openai: {{api_key: "{key}", base_url: "{primary.base_url}", model: {primary.models[0]}}}\n'
    )
    said = f"{'request refused by the edge proxy; ' * 5}Authorization: Bearer {key}"
    primary.inject({"status": 401, "body": said})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model=primary.models[0], exact_model=True), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    said_back = str(caught.value.details())
    assert "Authorization: Bearer [redacted]" in said_back
    for text in (said_back, str(details(caught.value)), caplog.text):
        assert key[:8] not in text
