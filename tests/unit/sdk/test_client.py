"""The blocking Client over a grpc_testing channel, without a server: the test plays the gateway, taking each call
the client makes and answering it (calls block until answered, so the client runs in a thread). Requests as built,
errors as decoded, deadlines and interceptors, the tool loop and the conversation's fitting."""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import grpc
import grpc_testing  # type: ignore[import-untyped]  # no type information shipped
import pytest
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from llmrelay import (
    Answer,
    AsyncClient,
    Client,
    ContextBudgetError,
    Conversation,
    ErrorDetails,
    InvalidArgumentError,
    ResourceExhaustedError,
    StepLimitError,
    Tools,
    UnavailableError,
    image,
    json_schema,
    message,
    tool,
)
from llmrelay import v1 as pb
from llmrelay.v1 import llmrelay_pb2

SERVICE = llmrelay_pb2.DESCRIPTOR.services_by_name["LLMService"]


class FakeGateway:
    """The gateway's side of the test channel; `run` starts a client call in a thread, so the test can answer it."""

    def __init__(self, channel: Any, pool: ThreadPoolExecutor) -> None:
        self.channel = channel
        self._pool = pool
        self._latest: Future[Any] | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        """The invocation metadata of the last call taken."""

    def run(self, call: Callable[[], T]) -> Future[T]:
        future = self._pool.submit(call)
        self._latest = future
        return future

    def answer(self, method: str, response: Message) -> Any:
        """Takes the next unary call of `method` and answers it; returns its request."""
        request, rpc = self._take(self.channel.take_unary_unary, method)
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
        return request

    def fail(self, method: str, code: grpc.StatusCode, text: str, *details: Message) -> None:
        """Takes the next unary call of `method` and fails it, with google.rpc details."""
        _, rpc = self._take(self.channel.take_unary_unary, method)
        status = status_pb2.Status(code=code.value[0], message=text)
        for detail in details:
            status.details.add().Pack(detail)
        trailers = (("grpc-status-details-bin", status.SerializeToString()), ("x-request-id", "req-7"))
        rpc.terminate(None, trailers, code, text)

    def stream(self, chunks: Sequence[pb.StreamCompleteResponse]) -> pb.StreamCompleteRequest:
        """Takes the next StreamComplete, sends the chunks and ends it; returns its request."""
        request, rpc = self._take(self.channel.take_unary_stream, "StreamComplete")
        for chunk in chunks:
            rpc.send_response(chunk)
        rpc.terminate((), grpc.StatusCode.OK, "")
        return request  # type: ignore[no-any-return]

    def _take(self, take: Callable[[Any], Any], method: str) -> tuple[Any, Any]:
        """The next call of `method`; fails at once when the client's latest operation (the one expected to make
        it: earlier ones may have failed on purpose) ended without making it (taking blocks for good otherwise)."""
        taken: Future[Any] = Future()
        threading.Thread(target=lambda: taken.set_result(take(SERVICE.methods_by_name[method])), daemon=True).start()
        deadline = time.monotonic() + 10
        latest = self._latest
        assert latest is not None, "run() the client's call first"
        while not taken.done():
            if latest.done() and latest.exception() is not None:
                raise AssertionError(f"the client ended before calling {method}") from latest.exception()
            if time.monotonic() > deadline:
                raise AssertionError(f"no call of {method} within 10 s")
            time.sleep(0.01)
        self.metadata, request, rpc = taken.result()
        return request, rpc


T = TypeVar("T")


@pytest.fixture
def testing_channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def gateway(testing_channel: Any) -> Iterator[FakeGateway]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdk-call") as pool:
        yield FakeGateway(testing_channel, pool)


@pytest.fixture
def client(testing_channel: Any) -> Iterator[Client]:
    with Client(channel=testing_channel, caller="unit") as client:
        yield client


def answer(content: str = "", *, tool_calls: Sequence[tuple[str, str, str]] = (), tokens: int = 0) -> Any:
    """A CompleteResponse: content, tool calls as (id, name, arguments), usage of `tokens` prompt + 1."""
    calls = [pb.ToolCall(id=i, function=pb.FunctionCall(name=n, arguments=a)) for i, n, a in tool_calls]
    return pb.CompleteResponse(
        backend="fake",
        model="tiny",
        message=pb.Message(role=pb.ROLE_ASSISTANT, content=content, tool_calls=calls),
        finish_reason=pb.FINISH_REASON_TOOL_CALLS if calls else pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=tokens, completion_tokens=1, total_tokens=tokens + 1),
        attempts=[pb.Attempt(backend="fake", model="tiny", outcome=pb.ATTEMPT_OUTCOME_SUCCEEDED)],
    )


def result(future: Future[Any]) -> Any:
    return future.result(timeout=10)


# --- requests ------------------------------------------------------------------------------------------------------


def test_typed_options_build_the_request(
    client: Client,
    gateway: FakeGateway,
) -> None:
    call = gateway.run(
        lambda: client.complete(
            [{"role": "system", "content": "terse"}, message("user", "hi")],
            model="tiny",
            temperature=0.5,
            max_tokens=7,
            stop=["\n"],
            seed=3,
            tool_choice="weather",
            reasoning_effort="low",
            parallel_tool_calls=False,
            tools=[{"function": {"name": "weather", "parameters": {"type": "object", "maxProperties": 3}}}],
            response_format=json_schema("out", {"type": "object"}),
        )
    )
    request = gateway.answer("Complete", answer("ok"))
    assert result(call).message.content == "ok"
    assert [m.role for m in request.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert request.model == "tiny"
    options = request.options
    assert (options.temperature, options.max_tokens, list(options.stop), options.seed) == (0.5, 7, ["\n"], 3)
    assert options.tool_choice == pb.ToolChoice(function_name="weather")
    assert options.reasoning_effort == pb.REASONING_EFFORT_LOW
    assert options.HasField("parallel_tool_calls") and not options.parallel_tool_calls
    assert json.loads(options.tools[0].function.parameters_json) == {"type": "object", "maxProperties": 3}
    assert not options.HasField("top_p"), "an option not given is not sent"


def test_schemas_in_option_dicts_may_be_json_text(client: Client, gateway: FakeGateway) -> None:
    # As tool() and json_schema() take them, and TypeScript's plain objects: a string raised a bare AttributeError.
    text = '{"type": "object", "maxProperties": 3}'
    call = gateway.run(
        lambda: client.complete(
            [message("user", "hi")],
            tools=[{"function": {"name": "weather", "parameters": text}}],
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": text}},
        )
    )
    options = gateway.answer("Complete", answer("ok")).options
    assert result(call).message.content == "ok"
    assert options.tools[0].function.parameters_json == text, "sent as written"
    assert options.response_format.json_schema.schema_json == text
    # Anything else is refused naming its field, before any call.
    with pytest.raises(TypeError, match=r"^tools\[1\].function.parameters=5: a schema must be a dict, or JSON text$"):
        client.complete([message("user", "hi")], tools=[tool("f"), {"function": {"name": "weather", "parameters": 5}}])
    with pytest.raises(TypeError, match=r"^response_format.json_schema=.*: a schema must be a dict, or JSON text$"):
        client.complete([message("user", "hi")], response_format={"json_schema": {"name": "out", "schema": [1]}})


def test_messages_as_dicts_may_leave_content_out(client: Client, gateway: FakeGateway) -> None:
    # Such a dict, as the message itself may leave content out, failed with "message() missing 1 required positional
    # argument: 'content'".
    weather = {"id": "call_1", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    call = gateway.run(
        lambda: client.complete(
            [
                {"role": "user", "parts": [{"text": "Weather in Oslo?"}]},
                {"role": "assistant", "tool_calls": [weather]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ]
        )
    )
    request = gateway.answer("Complete", answer("ok"))
    result(call)
    user, assistant, tool_result = request.messages
    assert (user.content, [p.text for p in user.parts]) == ("", ["Weather in Oslo?"])
    assert (assistant.role, assistant.content) == (pb.ROLE_ASSISTANT, "")
    assert assistant.tool_calls[0].function.name == "weather"
    assert (tool_result.tool_call_id, tool_result.content) == ("call_1", "sunny")


def test_no_options_send_none(
    client: Client,
    gateway: FakeGateway,
) -> None:
    call = gateway.run(lambda: client.complete([message("user", "hi")], tool_choice="required"))
    assert gateway.answer("Complete", answer()).options.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    result(call)
    call = gateway.run(lambda: client.complete([message("user", "hi")]))
    assert not gateway.answer("Complete", answer()).HasField("options")
    result(call)


def test_an_unknown_option_is_refused_before_any_call(client: Client) -> None:
    with pytest.raises(TypeError, match=r"unknown completion option.*max_tokenz"):
        client.complete([message("user", "hi")], max_tokenz=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown reasoning_effort"):
        client.complete([message("user", "hi")], reasoning_effort="extreme")  # type: ignore[arg-type]


def test_one_stop_sequence_and_a_response_format_by_its_short_name(client: Client, gateway: FakeGateway) -> None:
    # A string is a Sequence[str] too: it went out as one stop sequence per character (["E", "N", "D"]).
    call = gateway.run(
        lambda: client.complete([message("user", "hi")], stop="END", response_format={"type": "json_object"})
    )
    request = gateway.answer("Complete", answer("{}"))
    result(call)
    assert list(request.options.stop) == ["END"]
    assert request.options.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT


def test_usage_may_be_asked_for_with_a_dict(client: Client, gateway: FakeGateway) -> None:
    call = gateway.run(lambda: client.get_usage({"model": "tiny", "caller": "unit"}))
    request = gateway.answer("GetUsage", pb.GetUsageResponse())
    result(call)
    assert (request.model, request.caller, request.HasField("backend")) == ("tiny", "unit", False)


_HI = [{"role": "user", "content": "hi"}]


async def _heard_async(chunk: pb.StreamCompleteResponse) -> None:
    """An on_delta only an AsyncClient can await."""


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda c: c.complete(_HI, max_tokens=2**40), ValueError, "max_tokens=1099511627776: Value out of range"),
        (lambda c: c.complete(_HI, temperature="hot"), TypeError, "temperature='hot': "),
        (lambda c: c.complete(_HI, model=5), TypeError, "model=5: "),
        (lambda c: c.complete([{"role": "user", "content": 5}]), TypeError, "messages[0].content=5: "),
        (lambda c: c.complete([{"role": "bot", "content": "hi"}]), ValueError, "unknown role 'bot'; use one of"),
        (lambda c: c.complete("hi"), TypeError, "messages: a list of messages, not str"),
        (lambda c: c.complete(["hi"]), TypeError, "a message is a pb.Message or a dict of its fields"),
        (lambda c: c.complete(_HI, response_format={"type": "xml"}), ValueError, "unknown response_format type"),
        (lambda c: c.stream(_HI, on_interrupt="retry"), ValueError, "unknown on_interrupt 'retry'; use one of abort"),
        (lambda c: c.complete(_HI, timeout="5"), ValueError, "timeout must be a number of seconds > 0"),
        # Past 1e9 s, gRPC's deadline overflows into the past: every call failed DEADLINE_EXCEEDED at once.
        (lambda c: c.complete(_HI, timeout=1e10), ValueError, "timeout must be a number of seconds > 0 and at most"),
        (lambda c: c.complete(_HI, metadata=[("trace-bin", "text")]), ValueError, "metadata 'trace-bin': a key end"),
        (lambda c: c.collect(_HI, on_delta=_heard_async), TypeError, "on_delta is an async function, which Client"),
        (lambda c: c.run_tools(_HI, Tools(), on_delta=_heard_async), TypeError, "on_delta is an async function"),
        (lambda c: c.embed("x", dimensions=2**31), ValueError, "dimensions=2147483648: Value out of range"),
        (lambda c: c.get_usage(["tiny"]), TypeError, "request: a pb.GetUsageRequest or a dict of its fields"),
        (lambda c: image(b"x", detail=cast(Any, "medium")), ValueError, "unknown image detail 'medium'; use one of"),
    ],
    ids=[
        "max-tokens-past-int32", "temperature-text", "model-number", "content-number", "unknown-role", "text-as-chat",
        "text-as-message", "unknown-format", "unknown-interrupt-policy", "timeout-text", "timeout-past-grpc",
        "bin-metadata-text", "async-on-delta", "async-on-delta-in-the-loop", "dimensions-past-int32", "usage-list",
        "unknown-detail",
    ],
)  # fmt: skip
def test_an_argument_the_contract_cannot_hold_is_refused_by_name_before_any_call(
    client: Client, call: Callable[[Client], object], error: type[Exception], says: str
) -> None:
    # Before: protobuf's words alone ("bad argument type for built-in operation"), a KeyError, a TypeError from inside
    # grpc, or a list passed to get_usage failing the call INTERNAL, "Exception serializing request!", as though the
    # gateway had failed. No call reaches the gateway: the fake one would block it.
    with pytest.raises(error) as raised:
        call(client)
    assert str(raised.value).startswith(says), raised.value


@pytest.mark.parametrize("seconds", [10**400, -(10**400), 10**5000], ids=["past-a-float", "below-a-float", "huge"])
async def test_a_timeout_no_float_can_hold_is_refused_by_name(client: Client, seconds: int) -> None:
    # math.isfinite raised OverflowError ("int too large to convert to float"), naming nothing; and an int of more
    # digits than Python writes, ValueError saying so, when the message showed it.
    timeout = r"^timeout must be a number of seconds > 0 and at most 1e\+09, or None \(no deadline\), not "
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=timeout):
            make("127.0.0.1:1", timeout=seconds)
    with pytest.raises(ValueError, match=timeout):
        client.complete(_HI, timeout=seconds)
    with pytest.raises(ValueError, match=timeout):
        client.stream(_HI, timeout=seconds)
    with pytest.raises(ValueError, match=r"^tool_timeout must be a number of seconds > 0"):
        client.run_tools(_HI, Tools(), tool_timeout=seconds)
    async with AsyncClient("127.0.0.1:1") as async_client:
        with pytest.raises(ValueError, match=timeout):
            await async_client.complete(_HI, timeout=seconds)
        with pytest.raises(ValueError, match=timeout):
            async_client.stream(_HI, timeout=seconds)
        with pytest.raises(ValueError, match=r"^tool_timeout must be a number of seconds > 0"):
            await async_client.run_tools(_HI, Tools(), tool_timeout=seconds)


_LONE = "not valid UTF-8 text (a lone surrogate such as \\udce9, from bytes decoded with surrogateescape)"
_SECRET = "secret caf\udce9"
"""The bytes caf\\xe9 (a Latin-1 "café") as Python reads them with surrogateescape, after text never to be shown."""


@pytest.mark.parametrize(
    ("call", "says"),
    [
        # Which of the messages and texts, by the gateway's path for it (as the Go SDK names it).
        (lambda c: c.complete([*_HI, {"role": "user", "content": _SECRET}]), f"messages[1].content: {_LONE}"),
        (lambda c: c.complete(_HI, model=_SECRET), f"model: {_LONE}"),
        (lambda c: c.stream(_HI, stop=["ok", _SECRET]), f"stop[1]: {_LONE}"),
        (lambda c: c.embed(["hi", "there", _SECRET]), f"inputs[2]: {_LONE}"),
        (lambda c: c.count_tokens(text=_SECRET), f"text: {_LONE}"),
        (lambda c: c.get_usage({"caller": _SECRET}), f"caller: {_LONE}"),
        (lambda c: message("user", cast(Any, b"secret caf\xe9")), "content: not valid UTF-8 text (bytes that are no"),
        (lambda c: c.embed([b"hi", _SECRET.encode(errors="surrogateescape")]), "inputs[1]: not valid UTF-8 text"),
        # A tool's and an answer format's: made apart from any request, named within their message; or given as
        # dicts in the options, named by their place there.
        (lambda c: tool("f", description=_SECRET), f"function.description: {_LONE}"),
        (
            lambda c: c.complete(_HI, tools=[tool("f"), {"function": {"name": "g", "description": _SECRET}}]),
            f"tools[1].function.description: {_LONE}",
        ),
        (lambda c: json_schema("s", {}, description=_SECRET), f"json_schema.description: {_LONE}"),
    ],
    ids=[
        "content", "model", "stop", "embed-input", "count-text", "usage-caller", "content-bytes", "embed-input-bytes",
        "tool", "tool-in-options", "json-schema",
    ],
)  # fmt: skip
def test_text_that_is_not_utf8_is_refused_by_name_before_any_call(
    client: Client, call: Callable[[Client], object], says: str
) -> None:
    """A lone surrogate (a non-UTF-8 byte read with surrogateescape, as from a command line or a file name) raised
    "TypeError: function takes exactly 5 arguments (1 given)", naming no field: UnicodeEncodeError, remade from one
    argument. The text itself is never shown."""
    with pytest.raises(ValueError, match=r"not valid UTF-8") as raised:
        call(client)
    assert str(raised.value).startswith(says), raised.value
    assert type(raised.value) is ValueError and "secret" not in str(raised.value)


def test_metadata_and_the_caller_travel_with_each_call(client: Client, gateway: FakeGateway) -> None:
    call = gateway.run(lambda: client.health(metadata=[("authorization", "Bearer k")]))
    gateway.answer("Health", pb.HealthResponse(serving=True))
    assert result(call).serving
    assert {("x-llmrelay-caller", "unit"), ("authorization", "Bearer k")} <= set(gateway.metadata)


def test_a_calls_metadata_replaces_the_clients_key_by_key(testing_channel: Any, gateway: FakeGateway) -> None:
    own = [("authorization", "Bearer client"), ("x-team", "a"), ("x-team", "b")]
    with Client(channel=testing_channel, caller="unit", metadata=own) as client:
        call = gateway.run(
            lambda: client.health(metadata=[("authorization", "Bearer call"), ("x-llmrelay-caller", "c")])
        )
        gateway.answer("Health", pb.HealthResponse(serving=True))
        result(call)
    sent = [(key, value) for key, value in gateway.metadata if key in ("authorization", "x-team", "x-llmrelay-caller")]
    assert sorted(sent) == [
        ("authorization", "Bearer call"), ("x-llmrelay-caller", "c"), ("x-team", "a"), ("x-team", "b")
    ]  # fmt: skip


def test_caller_names_the_caller_once_over_the_metadatas(testing_channel: Any, gateway: FakeGateway) -> None:
    """Both were sent, the metadata's first, so the gateway recorded the metadata's and caller= was lost; the Go and
    TypeScript SDKs send caller's alone."""
    own = [("X-LLMRelay-Caller", "from-metadata"), ("x-team", "a")]
    with Client(channel=testing_channel, caller="from-caller", metadata=own) as client:
        call = gateway.run(client.health)
        gateway.answer("Health", pb.HealthResponse(serving=True))
        result(call)
    sent = [(key, value) for key, value in gateway.metadata if key in ("x-team", "x-llmrelay-caller")]
    assert sorted(sent) == [("x-llmrelay-caller", "from-caller"), ("x-team", "a")]


@pytest.mark.parametrize(
    "metadata",
    [{"authorization": "Bearer K"}, {"ab": "v"}, "ab", [("authorization",)], [(b"authorization", "Bearer K")]],
    ids=["dict", "dict-of-two-letter-keys", "str", "one-item", "bytes-key"],
)
def test_metadata_that_is_not_pairs_is_a_type_error(testing_channel: Any, metadata: Any) -> None:
    """A dict failed "too many values to unpack" from deep inside, or was sent as a header of its key's letters
    (`{"ab": "v"}` as `a: b`)."""
    with pytest.raises(TypeError, match=r"^metadata: a sequence of \(key, value\) pairs") as caught:
        Client(channel=testing_channel, metadata=metadata)
    assert "Bearer K" not in str(caught.value)
    with Client(channel=testing_channel) as client, pytest.raises(TypeError, match=r"^metadata: a sequence of"):
        client.health(metadata=metadata)


class _Refusal(grpc.RpcError):
    """An interceptor's own error: no call's status (no code(), no details())."""


class _Refusing(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        raise _Refusal("refused before sending")


def test_an_interceptors_own_rpc_error_comes_through_as_it_is(testing_channel: Any) -> None:
    """It became an AttributeError ("'_Refusal' object has no attribute 'code'") that hid it."""
    with Client(channel=testing_channel, interceptors=[_Refusing()]) as client, pytest.raises(_Refusal):
        client.health()


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trailer",
    [
        b"\xff\xffnot a status",
        status_pb2.Status(
            code=14, details=[any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")]
        ).SerializeToString(),
    ],
    ids=["not-a-status", "a-detail-that-does-not-decode"],
)
def test_status_details_that_do_not_decode_are_left_out_not_raised(trailer: bytes) -> None:
    """A proxy's trailer, or another server's, raised protobuf's DecodeError from the SDK's reading of a failed call,
    where every failure is the SDK's error."""
    assert ErrorDetails.decode(trailer) == ErrorDetails()


def test_errors_carry_their_decoded_details(
    client: Client,
    gateway: FakeGateway,
) -> None:
    call = gateway.run(lambda: client.complete([message("user", "hi")]))
    history = pb.AttemptHistory(
        attempts=[pb.Attempt(backend="openai", outcome=pb.ATTEMPT_OUTCOME_SERVER_ERROR, upstream_status=503)]
    )
    gateway.fail(
        "Complete",
        grpc.StatusCode.UNAVAILABLE,
        "every backend is down",
        error_details_pb2.ErrorInfo(
            reason="BACKENDS_UNAVAILABLE", domain="llmrelay.dev", metadata={"attempts": "openai:unavailable"}
        ),
        error_details_pb2.RetryInfo(retry_delay=Duration(seconds=2, nanos=500_000_000)),
        history,
    )
    with pytest.raises(UnavailableError) as caught:
        result(call)
    error = caught.value
    assert (error.code, error.message) == (grpc.StatusCode.UNAVAILABLE, "every backend is down")
    assert error.reason == "BACKENDS_UNAVAILABLE"
    # Its text names the reason, as the Go and TypeScript SDKs' do: a logged error says which RESOURCE_EXHAUSTED.
    assert str(error) == "UNAVAILABLE (BACKENDS_UNAVAILABLE): every backend is down"
    assert error.metadata == {"attempts": "openai:unavailable"}
    assert error.retry_delay_s == 2.5
    assert [(a.backend, a.upstream_status) for a in error.attempts] == [("openai", 503)]
    assert error.details.attempt_history == history
    # Pickled, as a process pool sends it back, it is the same error: it could not be read back, the class called
    # with the formatted text alone.
    assert error.request_id == "req-7", "the call's id in the gateway's log, from the trailing metadata"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is UnavailableError and str(copy) == str(error)
    assert (copy.code, copy.message, copy.details, copy.request_id) == (
        error.code, error.message, error.details, error.request_id
    )  # fmt: skip


def test_an_error_info_of_another_domain_names_no_reason_of_the_contracts(
    client: Client,
    gateway: FakeGateway,
) -> None:
    """A proxy's or an interceptor's ErrorInfo: its reason was read as the gateway's (as the Go and TypeScript SDKs
    do not)."""
    call = gateway.run(lambda: client.complete([message("user", "hi")]))
    gateway.fail(
        "Complete", grpc.StatusCode.UNAVAILABLE, "upstream connect error", error_details_pb2.ErrorInfo(
            reason="BACKENDS_UNAVAILABLE", domain="proxy.example.com"
        )
    )  # fmt: skip
    with pytest.raises(UnavailableError) as caught:
        result(call)
    assert caught.value.reason is None
    assert caught.value.details.error_info is not None and caught.value.details.error_info.domain == "proxy.example.com"
    assert str(caught.value) == "UNAVAILABLE: upstream connect error", "no reason of the gateway's to name"


def test_the_agents_errors_survive_pickling() -> None:
    answer = Answer(response=pb.CompleteResponse(backend="fake"), messages=[message("user", "hi")], steps=2)
    limit = pickle.loads(pickle.dumps(StepLimitError(answer, 2)))
    assert (limit.answer, limit.max_steps, str(limit)) == (answer, 2, str(StepLimitError(answer, 2)))
    budget = pickle.loads(pickle.dumps(ContextBudgetError(120, 100)))
    assert (budget.tokens, budget.budget_tokens, str(budget)) == (120, 100, str(ContextBudgetError(120, 100)))
    assert budget.answer is None


def test_the_run_so_far_survives_pickling_on_every_error_that_ends_a_run() -> None:
    """run_tools sets `answer` on the LLMRelayError or ContextBudgetError that ended it, as on StepLimitError; pickled
    (a run in a process pool) they came back without it, as if no tool had run, and it would run them again."""
    answer = Answer(response=pb.CompleteResponse(backend="fake"), messages=[message("user", "hi")], steps=2)
    model_failed = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "context too long", request_id="req-7")
    budget = ContextBudgetError(120, 100)
    for error in (model_failed, budget):
        error.answer = answer
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.answer) == (type(error), str(error), answer)
    assert pickle.loads(pickle.dumps(model_failed)).request_id == "req-7"


def test_bad_request_and_quota_failure(
    client: Client,
    gateway: FakeGateway,
) -> None:
    call = gateway.run(lambda: client.complete([message("user", "hi")]))
    violation = error_details_pb2.BadRequest.FieldViolation(field="options.temperature", description="from 0 to 2")
    gateway.fail(
        "Complete", grpc.StatusCode.INVALID_ARGUMENT, "bad", error_details_pb2.BadRequest(field_violations=[violation])
    )
    with pytest.raises(InvalidArgumentError) as bad:
        result(call)
    assert [(v.field, v.description) for v in bad.value.field_violations] == [("options.temperature", "from 0 to 2")]

    call = gateway.run(lambda: client.complete([message("user", "hi")]))
    quota = error_details_pb2.QuotaFailure(violations=[{"subject": "caller:unit", "description": "60 per minute"}])
    gateway.fail("Complete", grpc.StatusCode.RESOURCE_EXHAUSTED, "limited", quota)
    with pytest.raises(ResourceExhaustedError) as limited:
        result(call)
    assert [(v.subject, v.description) for v in limited.value.quota_violations] == [("caller:unit", "60 per minute")]
    assert limited.value.reason is None and limited.value.retry_delay_s is None and limited.value.attempts == ()


# --- the tool loop -------------------------------------------------------------------------------------------------


@dataclass
class Place:
    city: str
    country: str = "NO"


def agent_tools(barrier: threading.Barrier) -> Tools:
    tools = Tools()

    @tools.register
    def weather(place: Place, unit: Literal["c", "f"] = "c") -> str:
        """The weather at a place now."""
        barrier.wait()  # both calls of the first answer must run at once to pass
        return f"18{unit} in {place.city}, {place.country}"

    @tools.register
    async def clock(zone: str) -> dict[str, str]:
        """The time in a time zone."""
        barrier.wait()
        return {"zone": zone, "time": "12:00"}

    @tools.register
    def broken() -> str:
        """Always fails."""
        raise RuntimeError("the sensor is down")

    return tools


def test_run_tools_runs_calls_in_parallel_and_sums_usage(
    client: Client,
    gateway: FakeGateway,
) -> None:
    tools = agent_tools(threading.Barrier(2, timeout=5))
    question = [message("user", "weather and time?")]
    call = gateway.run(lambda: client.run_tools(question, tools, temperature=0))

    first = gateway.answer(
        "Complete",
        answer(
            tool_calls=[("a", "weather", '{"place": {"city": "Oslo"}}'), ("b", "clock", '{"zone": "UTC"}')], tokens=10
        ),
    )
    assert {t.function.name for t in first.options.tools} == {"weather", "clock", "broken"}
    assert first.options.temperature == 0
    second = gateway.answer(
        "Complete",
        answer(tool_calls=[("c", "broken", "{}"), ("d", "nope", "{}"), ("e", "weather", "{not json")], tokens=20),
    )
    results = {m.tool_call_id: m.content for m in second.messages if m.role == pb.ROLE_TOOL}
    assert results == {"a": "18c in Oslo, NO", "b": json.dumps({"zone": "UTC", "time": "12:00"})}
    last = gateway.answer("Complete", answer("It is 18c and noon.", tokens=30))
    outcomes = {m.tool_call_id: m.content for m in last.messages[-3:]}
    assert outcomes["c"] == "error: RuntimeError: the sensor is down"
    assert outcomes["d"].startswith("error: unknown tool 'nope'; the tools are: weather, clock, broken")
    assert outcomes["e"].startswith("error: the arguments of 'weather' are not valid JSON")

    done: Answer = result(call)
    assert done.content == "It is 18c and noon." and done.steps == 3
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (60, 3, 63)
    assert len(done.attempts) == 3
    user, assistant, tool = pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL
    expected = [user, assistant, tool, tool, assistant, tool, tool, tool, assistant]
    assert [m.role for m in done.messages] == expected
    assert len(question) == 1, "a list given is left as it was"


def test_run_tools_streams_with_on_delta(
    client: Client,
    gateway: FakeGateway,
) -> None:
    tools = agent_tools(threading.Barrier(1))
    seen: list[pb.StreamCompleteResponse] = []
    call = gateway.run(lambda: client.run_tools([message("user", "w?")], tools, on_delta=seen.append))
    fragment = pb.ToolCallDelta(
        index=0, id="a", name="weather", arguments='{"place": {"city": "Rome", "country": "IT"}}'
    )
    request = gateway.stream(
        [
            pb.StreamCompleteResponse(
                delta=pb.MessageDelta(tool_calls=[fragment]), finish_reason=pb.FINISH_REASON_TOOL_CALLS
            )
        ]
    )
    assert request.on_interrupt == pb.INTERRUPT_POLICY_RESTART
    final = pb.StreamCompleteResponse(
        delta=pb.MessageDelta(content="sunny"), finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(total_tokens=5)
    )
    second = gateway.stream([final])
    assert second.messages[-1].content == "18c in Rome, IT"
    done: Answer = result(call)
    assert done.content == "sunny" and done.steps == 2 and done.usage.total_tokens == 5
    assert len(seen) == 2


def test_the_step_limit_is_a_definite_error(
    client: Client,
    gateway: FakeGateway,
) -> None:
    tools = agent_tools(threading.Barrier(1))
    call = gateway.run(lambda: client.run_tools([message("user", "loop")], tools, max_steps=2))
    for step in range(2):
        gateway.answer("Complete", answer(tool_calls=[(f"c{step}", "broken", "{}")], tokens=1))
    with pytest.raises(StepLimitError, match="after 2 calls") as caught:
        result(call)
    partial = caught.value.answer
    assert partial.steps == 2 and partial.usage.total_tokens == 4
    assert partial.messages[-1].role == pb.ROLE_TOOL, "the last calls are answered, so the conversation can go on"


# --- the conversation ----------------------------------------------------------------------------------------------


def test_fit_drops_the_oldest_turns_keeping_tool_calls_with_their_results(
    client: Client,
    gateway: FakeGateway,
) -> None:
    conversation = Conversation([message("system", "be brief")], budget_tokens=100, model="tiny")
    conversation.add(message("user", "one"))
    conversation.add_answer(answer(tool_calls=[("a", "weather", "{}")]))
    conversation.add_tool_results([pb.Message(role=pb.ROLE_TOOL, tool_call_id="a", content="18c")])
    conversation.add_answer(answer("18c"))
    conversation.add(message("user", "two"), message("assistant", "ok"), message("user", "three"))

    fitted = gateway.run(lambda: client.fit(conversation))
    first = gateway.answer("CountTokens", pb.CountTokensResponse(token_count=250))
    assert first.model == "tiny" and len(first.messages) == 8
    second = gateway.answer("CountTokens", pb.CountTokensResponse(token_count=150))
    assert [m.content for m in second.messages] == ["be brief", "two", "ok", "three"], "turn one went whole"
    third = gateway.answer("CountTokens", pb.CountTokensResponse(token_count=90))
    assert [m.content for m in third.messages] == ["be brief", "three"]
    assert result(fitted) == 90 and conversation.tokens == 90

    over = gateway.run(lambda: client.fit(conversation))
    gateway.answer("CountTokens", pb.CountTokensResponse(token_count=120))
    with pytest.raises(ContextBudgetError, match=r"needs 120 tokens .* budget of 100"):
        result(over)
    assert [m.content for m in conversation.messages] == ["be brief", "three"], "the last turn stays"
    assert conversation.tokens == 90, "the count of the last fit that fitted"


@pytest.mark.parametrize("ends", ["over the budget", "a count refused"])
def test_a_fit_that_fails_leaves_the_conversation_as_it_was(client: Client, gateway: FakeGateway, ends: str) -> None:
    """The turns dropped before the failure would be lost to a caller who then raises the budget or tries again."""
    conversation = Conversation([message("system", "be brief")], budget_tokens=100)
    conversation.add(message("user", "one"), message("assistant", "1"), message("user", "two"))
    fitting = gateway.run(lambda: client.fit(conversation))
    gateway.answer("CountTokens", pb.CountTokensResponse(token_count=250))
    if ends == "over the budget":
        gateway.answer("CountTokens", pb.CountTokensResponse(token_count=120))
        with pytest.raises(ContextBudgetError):
            result(fitting)
    else:
        gateway.fail("CountTokens", grpc.StatusCode.UNAVAILABLE, "the gateway is going away")
        with pytest.raises(UnavailableError):
            result(fitting)
    assert [m.content for m in conversation.messages] == ["be brief", "one", "1", "two"]
    assert conversation.tokens is None


def test_run_tools_appends_to_a_conversation_and_fits_it_first(
    client: Client,
    gateway: FakeGateway,
) -> None:
    conversation = Conversation([message("user", "old"), message("assistant", "old answer")], budget_tokens=50)
    conversation.add(message("user", "new"))
    call = gateway.run(lambda: client.run_tools(conversation, agent_tools(threading.Barrier(1))))
    counted = gateway.answer("CountTokens", pb.CountTokensResponse(token_count=60))
    assert {t.function.name for t in counted.tools} == {"weather", "clock", "broken"}, "the tools count too"
    gateway.answer("CountTokens", pb.CountTokensResponse(token_count=40))
    request = gateway.answer("Complete", answer("done"))
    assert [m.content for m in request.messages] == ["new"]
    assert result(call).messages is conversation.messages
    assert [m.content for m in conversation.messages] == ["new", "done"]
