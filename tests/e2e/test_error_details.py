"""The error contract as a client reads it from the wire: AttemptHistory beside ErrorInfo for every failed call that
reached the router (the same attempts as ErrorInfo's "attempts" metadata), and the pushback trailer beside RetryInfo."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import grpc
import pytest
from google.rpc import error_details_pb2
from llmrelay import error_details
from llmrelay import v1 as pb
from llmrelay_server import convert
from support import DIALECTS, FAST_ROUTER, GatewayFactory, StubFactory, chat, read_all, stream_chat, two_backends
from upstream import FakeUpstream

Outcome = pb.AttemptOutcome


def decoded(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, pb.AttemptHistory | None, str | None]:
    """ErrorInfo, the AttemptHistory if any, and the pushback trailer if any, as the SDK's decoder reads them."""
    details = error_details(error)
    assert details is not None and details.error_info is not None
    pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback is None or isinstance(pushback, str)
    return details.error_info, details.attempt_history, pushback


def listed(history: pb.AttemptHistory) -> list[tuple[str, int, int | None]]:
    return [
        (a.backend, a.outcome, a.upstream_status if a.HasField("upstream_status") else None) for a in history.attempts
    ]


async def failure_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_every_backend_down_lists_each_attempt_with_pushback(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    primary.inject({"status": 503}, {"status": 503})
    local.inject({"status": 502}, {"status": 502})

    error = await failure_of(stub.Complete(chat(), timeout=10))

    info, history, pushback = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE")
    assert history is not None
    assert listed(history) == [
        ("openai", Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, 503),
        ("openai", Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, 503),
        ("ollama", Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, 502),
        ("ollama", Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, 502),
    ]
    assert info.metadata["attempts"] == ",".join(["openai:server_error"] * 2 + ["ollama:server_error"] * 2)
    assert all(a.model and a.error and a.duration.ToNanoseconds() > 0 for a in history.attempts)
    assert pushback == "1000"  # no upstream said when: the default delay, as in RetryInfo


@pytest.mark.parametrize(
    ("primary_says", "local_says", "delay_ms"),
    [
        ({"retry_after": 2}, {"retry_after": 20}, "2000"),  # the sooner, not the last backend's
        ({"retry_after": 20}, {"retry_after": 2}, "2000"),
        ({}, {"retry_after": 9}, "1000"),  # one said nothing: it may serve at once, as far as anyone knows
    ],
)
async def test_every_backend_rate_limited_says_the_soonest_one_may_serve_again(
    stub_for: StubFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    primary_says: dict[str, int],
    local_says: dict[str, int],
    delay_ms: str,
) -> None:
    stub = await stub_for(two_backends(primary, local, "router: {retry: {max_retries: 0}}"))
    primary.inject({"status": 429} | primary_says)
    local.inject({"status": 429} | local_says)

    error = await failure_of(stub.Complete(chat(), timeout=10))

    info, _, pushback = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")
    assert pushback == delay_ms
    details = error_details(error)
    assert details is not None and details.retry_info is not None
    assert str(details.retry_info.retry_delay.ToMilliseconds()) == delay_ms


@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete"])
@pytest.mark.parametrize(
    ("login", "pointed"),
    [
        ("https://login.example/sso?session=SUPERSECRET", "https://login.example/sso"),
        # No URL that urllib can read (its IPv6 bracket unclosed): it failed the call as the gateway's own fault.
        ("http://[login.example/sso?session=SUPERSECRET", "http://[login.example/sso"),
        # A user and password are credentials as a query's token is: they reached the caller, the log and Health.
        ("https://svc:SUPERSECRET@login.example:8443/sso?x=1", "https://login.example:8443/sso"),
        ("http://svc:SUPERSECRET@[login.example/sso", "http://[login.example/sso"),
    ],
    ids=["url", "no-url", "userinfo", "userinfo-no-url"],
)
async def test_a_redirect_is_a_failure_with_its_status_and_where_it_pointed(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream, rpc: str, login: str, pointed: str
) -> None:
    # It was read as an answer: "an error in a 200 answer" (or "not JSON", given a body), its status lost.
    primary.inject(*[{"status": 302, "location": login}] * 2)
    local.inject(*[{"status": 307, "body": "<html>moved</html>"}] * 2)
    call = stub.Complete(chat(), timeout=10) if rpc == "Complete" else read_all(stub.StreamComplete(stream_chat()))

    error = await failure_of(call)

    info, history, _ = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE")
    assert history is not None
    assert [(backend, status) for backend, _, status in listed(history)] == [
        ("openai", 302), ("openai", 302), ("ollama", 307), ("ollama", 307)
    ]  # fmt: skip
    said = history.attempts[0].error
    assert f"a redirect to {pointed}, which the gateway does not follow" in said, said
    assert "SUPERSECRET" not in (error.details() or "") + str(history)


async def test_a_rejected_request_lists_its_attempt_and_no_pushback(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"status": 400})

    error = await failure_of(stub.Complete(chat(), timeout=10))

    info, history, pushback = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED")
    assert history is not None and listed(history) == [("openai", Outcome.ATTEMPT_OUTCOME_REJECTED, 400)]
    assert info.metadata["attempts"] == "openai:rejected"
    assert pushback is None


OLD_VLLM_CONTEXT = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens."
DEEP = "[" * 1000 + "]" * 1000
FASTAPI_DETAIL = {"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required", "input": None}]}


@pytest.mark.parametrize(
    ("status", "body", "said", "outcome"),
    [
        # vLLM before 0.10.2: its error at the top level, not under "error".
        (
            404,
            {
                "object": "error",
                "message": "The model `gpt-test` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            },
            "HTTP 404: The model `gpt-test` does not exist.",
            Outcome.ATTEMPT_OUTCOME_MODEL_NOT_FOUND,
        ),
        (
            400,
            {"object": "error", "message": OLD_VLLM_CONTEXT, "type": "BadRequestError", "param": None, "code": 400},
            f"HTTP 400: {OLD_VLLM_CONTEXT}",
            Outcome.ATTEMPT_OUTCOME_CONTEXT_LENGTH_EXCEEDED,
        ),
        # FastAPI's validation error, which has no message: quoted as it came.
        (422, FASTAPI_DETAIL, f"HTTP 422: {json.dumps(FASTAPI_DETAIL)}", Outcome.ATTEMPT_OUTCOME_REJECTED),
        # Nested deeper than a JSON encoder goes: its text all the same.
        (400, DEEP, f"HTTP 400: {DEEP[:100]}", Outcome.ATTEMPT_OUTCOME_REJECTED),
        # A code nested so (the SDK's str() of it raised RecursionError: INTERNAL), in an error object and at the top.
        (400, f'{{"error": {{"message": "bad", "code": {DEEP}}}}}', "HTTP 400: bad", Outcome.ATTEMPT_OUTCOME_REJECTED),
        (400, f'{{"message": "bad", "code": {DEEP}}}', "HTTP 400: bad", Outcome.ATTEMPT_OUTCOME_REJECTED),
    ],
    ids=["old-vllm-404", "old-vllm-context", "fastapi-detail", "deep", "deep-code", "deep-top-level-code"],
)
async def test_an_error_answer_without_an_error_object_is_told_in_its_own_words(
    stub_for: StubFactory, primary: FakeUpstream, status: int, body: dict[str, Any] | str, said: str, outcome: int
) -> None:
    """These reached the caller as a Python dict's repr ("HTTP 404: {'object': 'error', 'message': ...}")."""
    backend = f"{{name: gpu, kind: vllm, base_url: '{primary.base_url}', model: gpt-test}}"
    stub = await stub_for(f"llm:\n  backends: [{backend}]\n  order: [gpu]\nrouter: {{retry: {{max_retries: 0}}}}\n")
    primary.inject({"status": status, "body": body if isinstance(body, str) else json.dumps(body)})

    error = await failure_of(stub.Complete(chat(), timeout=10))

    _, history, _ = decoded(error)
    assert history is not None and [(a.outcome, a.error[: len(said)]) for a in history.attempts] == [(outcome, said)]
    assert said in (error.details() or "")


async def test_an_interrupted_stream_lists_the_broken_attempt(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    primary.inject({"stream_cut_after": 3})

    async def read() -> None:
        async for _ in stub.StreamComplete(stream_chat("one two three four"), timeout=10):
            pass

    error = await failure_of(read())

    info, history, pushback = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.ABORTED, "STREAM_INTERRUPTED")
    assert history is not None and listed(history) == [("openai", Outcome.ATTEMPT_OUTCOME_INTERRUPTED, None)]
    assert pushback is None


async def test_a_call_refused_before_the_router_has_no_attempt_history(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    error = await failure_of(stub.Complete(pb.CompleteRequest(), timeout=10))

    info, history, pushback = decoded(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert (history, pushback, "attempts" in info.metadata) == (None, None, False)
    assert primary.chat_requests == []


async def test_a_call_failed_everywhere_at_length_still_gets_the_gateways_status(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    """Six backends, two attempts each, every upstream's 503 message long and different (OpenAI's name a request id):
    the status stays within what a gRPC client accepts, rather than reaching it as RESOURCE_EXHAUSTED "received
    metadata size exceeds limit"."""
    backends = "".join(
        f'\n    - {{name: b{i}, kind: openai_compatible, base_url: "{primary.base_url}", model: gpt-test}}'
        for i in range(5)
    )
    ollama = f'{{base_url: "{primary.base_url}", model: gpt-test}}'
    gateway = await gateway_factory(f"llm:\n  ollama: {ollama}\n  backends:{backends}\n{FAST_ROUTER}")
    for attempt in range(12):
        message = f"The server had an error processing your request (request ID req_{attempt:04d}). " + "x" * 400
        primary.inject({"status": 503, "body": json.dumps({"error": {"message": message, "type": "server_error"}})})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        error = await failure_of(pb.LLMServiceStub(channel).Complete(chat(model="gpt-test"), timeout=10))

    info, history, pushback = decoded(error)
    assert (error.code(), info.reason, pushback) == (grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE", "1000")
    message = error.details() or ""
    assert message.startswith("every backend failed: ") and message.endswith(" more characters)")
    assert history is not None
    tried = [backend for backend, _, _ in listed(history)]
    assert sorted(tried) == sorted(["ollama", *(f"b{i}" for i in range(5))] * 2)
    assert {(outcome, code) for _, outcome, code in listed(history)} == {(Outcome.ATTEMPT_OUTCOME_SERVER_ERROR, 503)}
    assert "req_0011" in history.attempts[-1].error, "the newest attempts keep their text"


RATE_LIMITED_WORDS = "Rate limit exceeded: free-models-per-day"
OVERLOADED_WORDS = "Provider returned error: overloaded"
ERRORS_WITH_200: dict[str, dict[str, dict[str, Any]]] = {
    # As OpenAI-compatible routers answer: an error object, with or without a code that is an HTTP status.
    "openai": {
        "server": {"error": {"message": OVERLOADED_WORDS}},
        "rate-limited": {"error": {"message": RATE_LIMITED_WORDS, "code": 429}},
    },
    # As Anthropic answers an error, typed.
    "anthropic": {
        "server": {"type": "error", "error": {"type": "api_error", "message": OVERLOADED_WORDS}},
        "rate-limited": {"type": "error", "error": {"type": "rate_limit_error", "message": RATE_LIMITED_WORDS}},
    },
}


@pytest.mark.parametrize(
    ("error", "code", "reason", "outcome"),
    [
        ("server", grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE", Outcome.ATTEMPT_OUTCOME_SERVER_ERROR),
        (
            "rate-limited",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            Outcome.ATTEMPT_OUTCOME_RATE_LIMITED,
        ),
    ],
)
@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete"])
@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_an_error_answered_with_200_is_the_upstreams_error_in_its_words(
    stub: pb.LLMServiceAsyncStub,
    primary: FakeUpstream,
    local: FakeUpstream,
    rpc: str,
    error: str,
    code: grpc.StatusCode,
    reason: str,
    outcome: int,
) -> None:
    """Some proxies and routers answer an upstream's failure with a 200 whose body is the error: the caller reads the
    upstream's words, and the gateway treats it as the error it says (a rate limit waits), not as a malformed answer.
    (Embed: test_embeddings.)"""
    primary.inject(*[{"body": json.dumps(ERRORS_WITH_200[primary.dialect][error])}] * 2)
    local.inject(*[{"body": json.dumps(ERRORS_WITH_200["openai"][error])}] * 2)
    if rpc == "Complete":
        failure = await failure_of(stub.Complete(chat(), timeout=10))
    else:
        failure = await failure_of(read_all(stub.StreamComplete(stream_chat(), timeout=10)))

    info, history, _ = decoded(failure)
    words = RATE_LIMITED_WORDS if error == "rate-limited" else OVERLOADED_WORDS
    assert (failure.code(), info.reason) == (code, reason) and words in (failure.details() or "")
    assert history is not None and [a.outcome for a in history.attempts] == [outcome] * 4
    assert all(a.error.startswith("an error in a 200 answer") and words in a.error for a in history.attempts)


@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete"])
async def test_a_fault_of_the_gateways_own_is_internal_with_error_info_and_logged(
    stub: pb.LLMServiceAsyncStub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, rpc: str
) -> None:
    """An exception no layer answered ended the call UNKNOWN with Python's exception text and no details."""

    def broken(*_: object) -> NoReturn:
        raise KeyError("internal-detail-4711")

    monkeypatch.setattr(convert, "complete_response" if rpc == "Complete" else "stream_response", broken)
    if rpc == "Complete":
        failure = await failure_of(stub.Complete(chat(), timeout=10))
    else:
        failure = await failure_of(read_all(stub.StreamComplete(stream_chat(), timeout=10)))

    info, _, _ = decoded(failure)
    assert (failure.code(), info.reason) == (grpc.StatusCode.INTERNAL, "UNSPECIFIED")
    assert failure.details() == "the gateway failed unexpectedly; its log has the details"
    assert "internal-detail-4711" in caplog.text and "Traceback" in caplog.text
    monkeypatch.undo()
    assert (await stub.Complete(chat(), timeout=10)).message.content, "it goes on serving"
