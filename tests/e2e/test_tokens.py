"""CountTokens end to end: the server's own tokenizer where the backend has one, tiktoken offline otherwise."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay_server.backends import upstream_http
from support import StubFactory, details, png, tool, user
from upstream import FakeUpstream

WEATHER_TOOL = tool(
    "weather", {"type": "object", "properties": {"city": {"type": "string"}}}, description="today's weather"
)


@pytest.fixture
async def vllm() -> AsyncIterator[FakeUpstream]:
    """Stands in for a vLLM server: the chat API and its /tokenize."""
    upstream = await FakeUpstream(models=("qwen",), vllm=True).start()
    yield upstream
    await upstream.stop()


async def vllm_stub(stub_for: StubFactory, vllm: FakeUpstream) -> pb.LLMServiceAsyncStub:
    """A gateway whose one backend, `gpu`, is the vLLM server."""
    backend = f"{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}"
    return await stub_for(f"llm:\n  backends: [{backend}]\n  order: [gpu]\n")


async def test_no_side_request_follows_a_redirect(
    stub_for: StubFactory, vllm: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The probes and /tokenize went through the SDK's HTTP client, which follows redirects: a vLLM server that
    answered /tokenize with a redirect had the caller's chat posted wherever it pointed, and that server's count
    returned as exact; a probe found the models of another server, and called a backend healthy whose every chat was
    refused for the redirect (which no chat follows)."""
    elsewhere = await FakeUpstream(models=("qwen", "other"), vllm=True).start()
    try:
        vllm.moved_to = f"{elsewhere.base_url.removesuffix('/v1')}/tokenize"
        stub = await vllm_stub(stub_for, vllm)
        count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=[user("my prompt")]), timeout=5)
        assert count.estimated and count.encoding != "backend:gpu"
        [warning] = [r.getMessage() for r in caplog.records if "could not count tokens" in r.getMessage()]
        assert f"HTTP 307: a redirect to {vllm.moved_to}, which the gateway does not follow" in warning, warning
        vllm.moved_to = f"{elsewhere.base_url}/models"
        [backend] = (await stub.Health(pb.HealthRequest(), timeout=5)).backends
        assert not backend.reachable
        assert "HTTP 307" in backend.last_error and "does not follow" in backend.last_error, backend.last_error
        assert elsewhere.tokenize_requests == [] and elsewhere.probe_requests == []
    finally:
        await elsewhere.stop()


async def test_vllm_counts_with_its_own_tokenizer_and_the_count_is_its_prompt_tokens(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    stub = await vllm_stub(stub_for, vllm)
    chat = [pb.Message(role=pb.ROLE_SYSTEM, content="you forecast"), user("weather in Oslo tomorrow?")]
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="gpu/qwen", messages=chat, tools=[WEATHER_TOOL]), timeout=5
    )
    answer = await stub.Complete(
        pb.CompleteRequest(model="gpu/qwen", messages=chat, options=pb.CompletionOptions(tools=[WEATHER_TOOL])),
        timeout=5,
    )
    assert (count.encoding, count.estimated, count.model) == ("backend:gpu", False, "qwen")
    assert count.token_count == answer.usage.prompt_tokens
    (asked,) = vllm.tokenize_requests
    sent = vllm.chat_requests[-1]
    # The same prompt the completion sends, in the form vLLM's chat template takes, with the generation prompt.
    assert (asked["messages"], asked["tools"]) == (sent["messages"], sent["tools"])
    assert (asked["model"], asked["add_generation_prompt"]) == ("qwen", True)


async def test_without_a_server_tokenizer_the_count_is_an_offline_estimate(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    vllm.vllm = False  # an OpenAI-compatible server with no /tokenize: 404
    stub = await vllm_stub(stub_for, vllm)
    request = pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")])
    count = await stub.CountTokens(request, timeout=5)
    again = await stub.CountTokens(request, timeout=5)
    assert count.estimated and count.encoding == "o200k_base"
    assert count.token_count > 0 and again == count
    assert len(vllm.tokenize_requests) == 0


@pytest.mark.parametrize("figure", [2**31, -1, 1.5, True, "12"])
async def test_a_server_count_that_is_no_count_gives_way_to_the_estimate(
    stub_for: StubFactory, vllm: FakeUpstream, figure: Any
) -> None:
    # 2**31 is beyond the int32 the answer carries: taken, it would have failed the call as it was written.
    vllm.tokenize_count = figure
    stub = await vllm_stub(stub_for, vllm)
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5)
    assert count.estimated and count.encoding == "o200k_base" and 0 < count.token_count < 100
    assert len(vllm.tokenize_requests) == 1


async def test_a_chat_with_an_image_is_estimated_not_counted_by_the_server(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """vLLM's /tokenize counts an image as its placeholder, not the tokens the model sees: its figure is no exact
    count of such a chat, and the gateway's estimate (which prices the image) says it is one."""
    stub = await vllm_stub(stub_for, vllm)
    image = pb.ContentPart(
        image=pb.ImagePart(data=png(2048, 2048), media_type="image/png", detail=pb.IMAGE_DETAIL_HIGH)
    )
    text = [user("what is in it?")]
    with_image = [pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="what is in it?"), image])]

    alone = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=text), timeout=5)
    both = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=with_image), timeout=5)

    assert (alone.encoding, alone.estimated) == ("backend:gpu", False)
    assert both.estimated and both.encoding == "o200k_base"
    assert both.token_count > alone.token_count + 700  # 85 + 170 a tile: four tiles at 768x768
    assert len(vllm.tokenize_requests) == 1


async def test_a_chat_with_an_answer_schema_is_counted_as_a_call_with_it_is_billed(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """The schema goes into the prompt, by a rendering the APIs do not publish: its tokens counted too, estimated as
    the gateway bills a call with it whose upstream reported no usage; not by the server's tokenizer, which counts
    the chat without it."""
    stub = await vllm_stub(stub_for, vllm)
    chat = [user("weather in Oslo tomorrow?")]
    schema = pb.JsonSchema(
        name="forecast",
        schema_json='{"type": "object", "properties": {"summary": {"type": "string"}, "high_c": {"type": "number"}}}',
    )
    answer_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema)

    alone = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=chat), timeout=5)
    count = await stub.CountTokens(
        pb.CountTokensRequest(model="gpu/qwen", messages=chat, response_format=answer_format), timeout=5
    )
    vllm.inject({"no_usage": True})
    answer = await stub.Complete(
        pb.CompleteRequest(
            model="gpu/qwen", messages=chat, options=pb.CompletionOptions(response_format=answer_format)
        ),
        timeout=5,
    )

    assert (alone.encoding, alone.estimated) == ("backend:gpu", False)
    assert (count.encoding, count.estimated) == ("o200k_base", True)
    assert answer.usage.estimated and count.token_count == answer.usage.prompt_tokens
    assert count.token_count > alone.token_count + 15, "the schema's tokens"
    assert len(vllm.tokenize_requests) == 1

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CountTokens(pb.CountTokensRequest(text="hello", response_format=answer_format), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(refused.value)["BadRequest"].field_violations] == ["response_format"]
    unnamed = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(schema_json="{}"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CountTokens(pb.CountTokensRequest(messages=chat, response_format=unnamed), timeout=5)
    assert [v.field for v in details(refused.value)["BadRequest"].field_violations] == [
        "response_format.json_schema.name"
    ]


@pytest.mark.parametrize("leaves", ["unary", "stream", "mid-stream"])
async def test_a_call_its_caller_leaves_is_billed_the_prompt_the_servers_tokenizer_counts(
    stub_for: StubFactory, vllm: FakeUpstream, leaves: str
) -> None:
    """With the model's own chat template, as its answer's usage would have counted it: the offline count is of
    OpenAI's format, far off for a small model's template (11 tokens where llama.cpp counted 24). Before its answer,
    or mid-stream (what it relayed counted too)."""
    stub = await vllm_stub(stub_for, vllm)
    vllm.tokenize_count = 57
    vllm.inject({"trickle_s": 10} if leaves == "mid-stream" else {"stall_s": 10})
    messages = [user("hello there")]
    call: Any = (
        stub.Complete(pb.CompleteRequest(model="gpu/qwen", messages=messages), timeout=20)
        if leaves == "unary"
        else stub.StreamComplete(pb.StreamCompleteRequest(model="gpu/qwen", messages=messages), timeout=20)
    )
    if leaves == "mid-stream":
        assert (await call.read()).delta.content
    for _ in range(500):
        if vllm.chat_requests:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    records: list[pb.UsageRecord] = []
    for _ in range(100):
        if records := list((await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records):
            break
        await asyncio.sleep(0.05)
    assert [(r.prompt_tokens, r.interrupted_requests, r.estimated_requests) for r in records] == [(57, 1, 1)]
    assert (records[0].completion_tokens > 0) is (leaves == "mid-stream")


async def test_a_key_counts_with_a_backend_only_if_it_may_use_its_model(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """A key's model patterns keep its calls off the backends it may not use, its counts too (a paid API's count is a
    request on the gateway's key): those are counted offline, as for a model no backend serves."""
    key = "llmr-local-only-0123456789abcdefghijk"
    backend = f"{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}"
    keys = [
        f'{{name: {name}, sha256: "{hashlib.sha256(f"{key}-{name}".encode()).hexdigest()}", models: ["{models}"]}}'
        for name, models in (("local-only", "ollama/*"), ("gpu-user", "gpu/*"))
    ]
    stub = await stub_for(f"llm:\n  backends: [{backend}]\n  order: [gpu]\nauth: {{keys: [{', '.join(keys)}]}}\n")
    request = pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")])

    kept_off = await stub.CountTokens(request, metadata=[("authorization", f"Bearer {key}-local-only")], timeout=5)
    assert (kept_off.encoding, kept_off.estimated) == ("o200k_base", True)
    assert vllm.tokenize_requests == []
    allowed = await stub.CountTokens(request, metadata=[("authorization", f"Bearer {key}-gpu-user")], timeout=5)
    assert (allowed.encoding, allowed.estimated) == ("backend:gpu", False)
    assert len(vllm.tokenize_requests) == 1
    # No model named: the default chain's, the model it counts for named, not "None".
    unnamed = pb.CountTokensRequest(messages=[user("hello there")])
    default = await stub.CountTokens(unnamed, metadata=[("authorization", f"Bearer {key}-local-only")], timeout=5)
    assert (default.model, default.estimated) == ("qwen", True)
    assert len(vllm.tokenize_requests) == 1


@pytest.mark.parametrize(
    ("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-oss:20b", "o200k_harmony")]
)
async def test_models_no_backend_serves_are_counted_offline_with_their_encoding(
    stub_for: StubFactory, vllm: FakeUpstream, model: str, encoding: str
) -> None:
    stub = await vllm_stub(stub_for, vllm)
    text = await stub.CountTokens(pb.CountTokensRequest(model=model, text="tiktoken is great!"), timeout=5)
    assert (text.token_count, text.encoding, text.estimated, text.model) == (6, encoding, False, model)
    assert len(vllm.tokenize_requests) == 0


@pytest.fixture
async def llama() -> AsyncIterator[FakeUpstream]:
    """Stands in for llama.cpp's server: the chat API, its /apply-template and its /tokenize."""
    upstream = await FakeUpstream(models=("qwen",), llamacpp=True).start()
    yield upstream
    await upstream.stop()


async def test_llamacpp_counts_with_its_template_and_tokenizer(stub_for: StubFactory, llama: FakeUpstream) -> None:
    stub = await stub_for(
        f"llm:\n  backends: [{{name: gpu, kind: llamacpp, base_url: '{llama.base_url}', model: qwen}}]\n"
    )
    chat = [user("weather in Oslo tomorrow?")]
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=chat), timeout=5)
    answer = await stub.Complete(pb.CompleteRequest(model="gpu/qwen", messages=chat), timeout=5)
    assert (count.encoding, count.estimated, count.token_count) == ("backend:gpu", False, answer.usage.prompt_tokens)


@pytest.mark.parametrize(
    "answers",
    [
        {"/tokenize": {"tokens": "15 2 7"}},  # a text, whose length is no count of tokens
        {"/tokenize": {"tokens": {"15": "hello"}}},
        {"/apply-template": {"prompt": ["hello", 15]}},  # which /tokenize would take as a prompt of mixed tokens
        {"/apply-template": {"prompt": None}},
        # Nested past any parser's depth: Python's own ended in a RecursionError, and the call in INTERNAL.
        {"/tokenize": b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"},
    ],
    ids=["text", "object", "mixed", "null", "deep"],
)
async def test_a_llamacpp_answer_that_is_no_count_gives_way_to_the_estimate(
    stub_for: StubFactory, llama: FakeUpstream, answers: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Counted as they came, these made an exact count of whatever their length was."""
    llama.llamacpp_answers.update(answers)
    stub = await stub_for(
        f"llm:\n  backends: [{{name: gpu, kind: llamacpp, base_url: '{llama.base_url}', model: qwen}}]\n"
    )
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5)
    assert (count.encoding, count.estimated) == ("o200k_base", True) and 0 < count.token_count < 100
    assert "could not count tokens" in caplog.text and "Traceback" not in caplog.text


async def test_a_count_answered_past_the_answer_bound_gives_way_to_the_estimate(
    stub_for: StubFactory, llama: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's own endpoints were read whole whatever came: a /tokenize of 400 MiB took the gateway to 1.4 GB,
    and counted as exact. Their answers are bounded as a completion's (the bound lowered here, to cross it cheaply)."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 100_000)
    llama.llamacpp_answers["/tokenize"] = {"tokens": [0] * 50_000}  # 150 KB
    stub = await stub_for(
        f"llm:\n  backends: [{{name: gpu, kind: llamacpp, base_url: '{llama.base_url}', model: qwen}}]\n"
    )
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5)
    assert (count.encoding, count.estimated) == ("o200k_base", True) and 0 < count.token_count < 100
    (warning,) = [record for record in caplog.records if "could not count tokens" in record.getMessage()]
    assert "the body is over 100000 bytes" in warning.getMessage() and "Traceback" not in caplog.text


async def test_a_count_nested_past_pythons_stack_is_estimated_instead(
    stub_for: StubFactory, vllm: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Its repr, in the failure's words, raised a RecursionError: the count failed INTERNAL, with a traceback."""
    vllm.tokenize_count = b"[" * 1000 + b"]" * 1000
    stub = await vllm_stub(stub_for, vllm)
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")]), timeout=5)
    assert (count.encoding, count.estimated) == ("o200k_base", True) and 0 < count.token_count < 100
    assert "could not count tokens (/tokenize answered a count of list)" in caplog.text, caplog.text
    assert "Traceback" not in caplog.text


async def test_a_count_that_keeps_failing_is_a_warning_once_until_one_succeeds(
    stub_for: StubFactory, vllm: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A /tokenize that is missing, or answers no count, fails every count alike: an agent counting before each of
    its calls put a WARNING in the log for each."""
    caplog.set_level(logging.DEBUG, logger="llmrelay_server.backends")
    stub = await vllm_stub(stub_for, vllm)
    request = pb.CountTokensRequest(model="gpu/qwen", messages=[user("hello there")])

    def said() -> list[tuple[str, str]]:
        return [(r.levelname, r.getMessage()) for r in caplog.records if "count" in r.getMessage()]

    failed = ("WARNING", "backend gpu could not count tokens (/tokenize answered a count of str); estimating instead")
    vllm.tokenize_count = "many"
    for _ in range(3):
        assert (await stub.CountTokens(request, timeout=5)).estimated
    assert said() == [failed, *[("DEBUG", failed[1])] * 2]
    vllm.tokenize_count = None
    for _ in range(2):
        assert not (await stub.CountTokens(request, timeout=5)).estimated
    vllm.tokenize_count = "many"
    assert (await stub.CountTokens(request, timeout=5)).estimated
    assert said()[3:] == [("INFO", "backend gpu counts tokens again"), failed]


async def test_a_count_longer_than_the_deadline_ends_with_the_gateways_status(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """Megabytes of text take a while to count: the caller got its client library's bare DEADLINE_EXCEEDED, no
    ErrorInfo. It gets the gateway's, and the gateway goes on counting for others."""
    stub = await vllm_stub(stub_for, vllm)
    text = "a" * 4_000_000  # one word: seconds of encoding
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", text=text), timeout=1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    found = details(caught.value)
    assert found["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
    # No backend was asked: no attempts (an empty list of them, and an empty AttemptHistory, said a call was routed).
    assert "attempts" not in found["ErrorInfo"].metadata and "AttemptHistory" not in found
    assert "longer deadline" in (caught.value.details() or "")
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", text="tiktoken is great!"), timeout=5)
    assert count.token_count == 6


async def test_a_backend_that_stalls_its_count_leaves_the_estimate_time_for_a_large_chat(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """The backend's exact count was waited for until the caller's deadline: a chat of a megabyte then had no time
    left for its estimate, and the caller got DEADLINE_EXCEEDED instead of the estimate it was promised."""
    vllm.tokenize_stall_s = 30
    stub = await vllm_stub(stub_for, vllm)
    chat = [user("word " * 200_000)]  # a megabyte: some 0.3 s to count offline here
    count = await stub.CountTokens(pb.CountTokensRequest(model="qwen", messages=chat), timeout=3)
    assert (count.encoding, count.estimated) == ("o200k_base", True) and count.token_count > 200_000
    assert len(vllm.tokenize_requests) == 1, "the backend was asked first"


async def test_a_prefill_is_continued_on_vllm_and_counted_as_it_is_sent(
    stub_for: StubFactory, vllm: FakeUpstream
) -> None:
    """vLLM's chat template closes a chat's last assistant message and begins a new turn unless told
    `continue_final_message` (its defaults: add_generation_prompt true, continue_final_message false): a prefill was
    answered as a new turn, not continued from its words, and counted with a generation prompt it was not sent with."""
    stub = await vllm_stub(stub_for, vllm)
    prefilled = [user("name a colour"), pb.Message(role=pb.ROLE_ASSISTANT, content="The colour is")]
    await stub.Complete(pb.CompleteRequest(model="gpu/qwen", messages=prefilled), timeout=5)
    await stub.CountTokens(pb.CountTokensRequest(model="gpu/qwen", messages=prefilled), timeout=5)
    continued = {"continue_final_message": True, "add_generation_prompt": False}
    assert continued.items() <= vllm.chat_requests[-1].items()
    assert continued.items() <= vllm.tokenize_requests[-1].items()
    await stub.Complete(pb.CompleteRequest(model="gpu/qwen", messages=[user("name a colour")]), timeout=5)
    assert not {"continue_final_message", "add_generation_prompt"} & set(vllm.chat_requests[-1])


async def test_what_a_vllm_server_is_not_set_up_for_goes_to_the_next_backend(
    stub_for: StubFactory, vllm: FakeUpstream, primary: FakeUpstream
) -> None:
    """vLLM started without a tool parser refuses every chat with tools (400 '"auto" tool choice requires
    --enable-auto-tool-choice and --tool-call-parser to be set'): a limit of that server, as Ollama's model without
    tools is, which ended every agent's call INVALID_ARGUMENT with another backend able to serve it. And it takes no
    reasoning effort of "minimal" (a 400): the least it has, "low", is sent."""
    gpu = f"{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}"
    cloud = f"{{name: cloud, kind: openai_compatible, base_url: '{primary.base_url}', model: {primary.models[0]}}}"
    stub = await stub_for(f"llm:\n  backends: [{gpu}, {cloud}]\n  order: [gpu, cloud]\n")
    said = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    vllm.inject({"status": 400, "body": json.dumps({"object": "error", "message": said, "type": "BadRequestError"})})
    options = pb.CompletionOptions(tools=[WEATHER_TOOL])
    answer = await stub.Complete(pb.CompleteRequest(messages=[user("weather?")], options=options), timeout=5)
    refused, served = answer.attempts
    assert (refused.backend, refused.outcome, served.backend) == ("gpu", pb.ATTEMPT_OUTCOME_REJECTED, "cloud")
    assert said in refused.error
    minimal = pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_MINIMAL)
    assert (await stub.Complete(pb.CompleteRequest(messages=[user("hm")], options=minimal), timeout=5)).backend == "gpu"
    assert vllm.chat_requests[-1]["reasoning_effort"] == "low"
