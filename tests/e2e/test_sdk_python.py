"""The Python SDK through a real gateway over the loopback upstreams: the collector equals Complete; the tool loop
over several steps (the upstream scripted to call two tools, then one, then to answer with the results); a tool
that raises, one past tool_timeout, a run cancelled or interrupted while its tools run; a conversation fitted through
CountTokens; deadlines and interceptors on a real channel; a retry by the channel itself after the gateway's
pushback; a call's metadata over the client's; a stream left in a `with` block cancelled at once; the TLS rule
against a TLS gateway, and the hint when it fails."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import pytest
from certs import Authority
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import BIN, clean_env, free_port, spawn_gateway
from llmrelay import (
    DEFAULT_TIMEOUT_S,
    Answer,
    AsyncClient,
    AsyncStream,
    Client,
    Conversation,
    InvalidArgumentError,
    LLMRelayError,
    PermissionDeniedError,
    Tools,
    UnavailableError,
    json_schema,
    message,
)
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from support import OPENAI_TEST_KEY, GatewayFactory, finished, two_backends, wait_until
from upstream import FakeUpstream

QUESTION = [message("user", "What is the weather in Oslo, and the time there?")]
THREE_STEPS = (
    {"tool_calls": [
        {"name": "weather", "arguments": '{"city": "Oslo"}'},
        {"name": "clock", "arguments": '{"zone": "Europe/Oslo"}'},
    ]},
    {"tool_calls": [{"name": "weather", "arguments": '{"city": "Bergen", "unit": "f"}'}]},
    {"echo_tools": True},
)  # fmt: skip


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.port}"


async def run_tools(gateway: Gateway, tools: Tools, *, blocking: bool) -> Answer:
    """QUESTION's tool loop on the blocking Client (in a thread, with this task's context variables) or AsyncClient."""
    if blocking:
        with Client(target(gateway)) as blocking_client:
            return await asyncio.to_thread(blocking_client.run_tools, QUESTION, tools)
    async with AsyncClient(target(gateway)) as client:
        return await client.run_tools(QUESTION, tools)


def agent_tools() -> Tools:
    tools = Tools()

    @tools.register
    def weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        """The weather in a city now."""
        return f"{city} 18{unit}"

    @tools.register
    async def clock(zone: str) -> dict[str, str]:
        """The time in a time zone."""
        await asyncio.sleep(0)
        return {"zone": zone, "time": "12:00"}

    @tools.register
    def barometer(city: str) -> float:
        """The air pressure in a city."""
        raise RuntimeError(f"no barometer in {city}")

    return tools


def without_durations(response: pb.CompleteResponse) -> pb.CompleteResponse:
    """The answer without its attempts' durations, which differ from call to call."""
    copy = pb.CompleteResponse()
    copy.CopyFrom(response)
    for attempt in copy.attempts:
        attempt.ClearField("duration")
    return copy


# --- the collector -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"reasoning": "thinking it over"},
        {"tool_calls": [{"name": "weather", "arguments": '{"city": "Oslo"}'}, {"name": "clock", "arguments": "{}"}]},
    ],
    ids=["text", "reasoning", "tool-calls"],
)
async def test_the_collected_stream_equals_complete(
    gateway: Gateway, primary: FakeUpstream, fault: dict[str, Any]
) -> None:
    options: dict[str, Any] = {"max_tokens": 50, "tools": agent_tools().definitions()}
    async with AsyncClient(target(gateway)) as client:
        primary.inject(fault, fault, fault)
        completed = await client.complete(QUESTION, **options)
        printed: list[str] = []
        collected = await client.collect(QUESTION, on_delta=lambda c: printed.append(c.delta.content), **options)
    blocking = await asyncio.to_thread(_collect_blocking, target(gateway), options)
    assert without_durations(collected) == without_durations(completed)
    assert without_durations(blocking) == without_durations(completed)
    assert "".join(printed) == completed.message.content, "on_delta saw the answer as it came"
    assert completed.usage.total_tokens > 0 and completed.backend == "openai"


def _collect_blocking(address: str, options: dict[str, Any]) -> pb.CompleteResponse:
    with Client(address) as client:
        return client.collect(QUESTION, **options)


# --- the tool loop -------------------------------------------------------------------------------------------------


async def test_the_async_tool_loop_runs_two_tools_over_three_steps(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject(*THREE_STEPS)
    async with AsyncClient(target(gateway), caller="agent-async") as client:
        answer = await client.run_tools(QUESTION, agent_tools(), max_tokens=100)
        usage = await client.get_usage(pb.GetUsageRequest(caller="agent-async"))
    _assert_three_steps(answer, primary)
    assert answer.usage.total_tokens == sum(r.total_tokens for r in usage.records), "usage summed over the steps"


async def test_the_blocking_tool_loop_streams_as_it_comes(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject(*THREE_STEPS)
    printed: list[pb.StreamCompleteResponse] = []

    def run() -> Answer:
        with Client(target(gateway), caller="agent-blocking") as client:
            return client.run_tools(QUESTION, agent_tools(), on_delta=printed.append)

    answer = await asyncio.to_thread(run)
    _assert_three_steps(answer, primary)
    assert answer.content in "".join(c.delta.content for c in printed), "the final answer was printed as it came"
    assert all(request.get("stream") for request in primary.chat_requests)


def _assert_three_steps(answer: Answer, primary: FakeUpstream) -> None:
    assert answer.steps == 3 and len(primary.chat_requests) == 3
    assert answer.content == (
        'tools: weather=Oslo 18c; clock={"zone": "Europe/Oslo", "time": "12:00"}; weather=Bergen 18f'
    )
    assert answer.finish_reason == pb.FINISH_REASON_STOP and answer.backend == "openai"
    assert len(answer.attempts) == 3 and all(a.outcome == pb.ATTEMPT_OUTCOME_SUCCEEDED for a in answer.attempts)
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == (
        answer.usage.prompt_tokens + answer.usage.completion_tokens
    )
    roles = [m.role for m in answer.messages]
    assert roles == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL, pb.ROLE_TOOL, pb.ROLE_ASSISTANT, pb.ROLE_TOOL,
                     pb.ROLE_ASSISTANT]  # fmt: skip
    sent_tools = {tool["function"]["name"] for tool in primary.chat_requests[0]["tools"]}
    assert sent_tools == {"weather", "clock", "barometer"}


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_a_run_that_a_model_call_ends_keeps_what_it_did_on_the_error(
    gateway: Gateway, primary: FakeUpstream, blocking: bool
) -> None:
    """The error alone came out: the tools that ran, their results and the usage of the calls before were lost, and
    the run could only start again, running the tools (an email sent) once more. The Go SDK returns them."""
    primary.inject({"tool_calls": [{"name": "weather", "arguments": '{"city": "Oslo"}'}]}, {"status": 400})
    with pytest.raises(LLMRelayError) as failed:
        await run_tools(gateway, agent_tools(), blocking=blocking)
    answer = failed.value.answer
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT and answer is not None
    assert answer.steps == 1 and answer.usage.total_tokens > 0 and len(answer.attempts) == 1
    assert [(m.role, m.content) for m in answer.messages[2:]] == [(pb.ROLE_TOOL, "Oslo 18c")]
    assert list(answer.messages[:2]) == [*QUESTION, answer.response.message]
    assert answer.response.message.tool_calls[0].function.name == "weather"
    # And so it comes back from a process pool: pickled, the error lost it, and the run would run its tools again.
    assert pickle.loads(pickle.dumps(failed.value)).answer == answer


async def test_a_run_cancelled_while_its_tools_run_answers_every_call(gateway: Gateway, primary: FakeUpstream) -> None:
    # The answer was left in the conversation with calls no result answered: a conversation no model takes.
    primary.inject({"tool_calls": [{"name": "quick", "arguments": "{}"}, {"name": "stuck", "arguments": "{}"}]})
    tools = Tools()
    stuck_started = asyncio.Event()

    @tools.register
    async def quick() -> str:
        """Answers at once."""
        return "done"

    @tools.register
    async def stuck() -> str:
        """Never answers."""
        stuck_started.set()
        await asyncio.Event().wait()
        return "never"

    conversation = Conversation(QUESTION)
    async with AsyncClient(target(gateway)) as client:
        running = asyncio.create_task(client.run_tools(conversation, tools))
        await asyncio.wait_for(stuck_started.wait(), 5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    asked, results = conversation.messages[1], conversation.messages[2:]
    assert [call.function.name for call in asked.tool_calls] == ["quick", "stuck"]
    assert [(m.tool_call_id, m.content) for m in results] == [
        (asked.tool_calls[0].id, "done"),
        (asked.tool_calls[1].id, "error: the run was cancelled before the tool finished"),
    ]


INTERRUPTED_RUN = """
import asyncio, sys, threading
from llmrelay import Client, Conversation, Tools, message

tools = Tools()
quick_done = threading.Event()
stuck_cancelled = threading.Event()

@tools.register
def quick() -> str:
    quick_done.set()
    return "done"

if sys.argv[2] == "async":
    @tools.register
    async def stuck() -> str:
        await asyncio.to_thread(quick_done.wait)
        print("interrupt me", flush=True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stuck_cancelled.set()
            raise
else:
    @tools.register
    def stuck() -> str:
        quick_done.wait()
        print("interrupt me", flush=True)
        threading.Event().wait()

conversation = Conversation([message("user", "go")])
with Client(sys.argv[1]) as client:
    try:
        client.run_tools(conversation, tools)
    except KeyboardInterrupt:
        print(client.run_tools(conversation, tools).content)
print("stuck was cancelled" if stuck_cancelled.wait(10 if sys.argv[2] == "async" else 0) else "stuck runs on")
"""
"""A blocking run_tools that Ctrl-C interrupts while its tools run, then the next run of the same conversation."""


@pytest.mark.parametrize(("stuck", "after"), [("plain", b"stuck runs on"), ("async", b"stuck was cancelled")])
async def test_a_blocking_run_interrupted_while_its_tools_run_answers_every_call(
    gateway: Gateway, primary: FakeUpstream, stuck: str, after: bytes
) -> None:
    # The interrupted run left the answer's calls with no results, and the next run was refused INVALID_ARGUMENT.
    # Ctrl-C reaches the main thread alone, and the gateway's event loop is this one's: hence a process of its own.
    # An async tool still running is cancelled (it ran on until tool_timeout, with none for ever); a plain function
    # cannot be stopped.
    primary.inject(
        {"tool_calls": [{"name": "quick", "arguments": "{}"}, {"name": "stuck", "arguments": "{}"}]},
        {"echo_tools": True},
    )
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INTERRUPTED_RUN, target(gateway), stuck, stdout=PIPE, stderr=PIPE
    )
    assert run.stdout is not None
    assert await asyncio.wait_for(run.stdout.readline(), 30) == b"interrupt me\n"
    run.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(run.communicate(), 30)
    assert (run.returncode, err.decode()) == (0, "")
    assert out == b"tools: quick=done; stuck=error: the run was cancelled before the tool finished\n" + after + b"\n"


async def test_a_tool_that_raises_becomes_a_result_that_says_so(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"tool_calls": [{"name": "barometer", "arguments": '{"city": "Oslo"}'}]}, {"echo_tools": True})
    async with AsyncClient(target(gateway)) as client:
        answer = await client.run_tools(QUESTION, agent_tools())
    assert answer.content == "tools: barometer=error: RuntimeError: no barometer in Oslo"
    assert answer.steps == 2


async def test_arguments_that_do_not_fit_the_function_become_a_result_that_says_so(
    gateway: Gateway, primary: FakeUpstream
) -> None:
    # {"city": 123} ran the tool with the int 123: only the arguments' names were checked.
    primary.inject({"tool_calls": [{"name": "weather", "arguments": '{"city": 123}'}]}, {"echo_tools": True})
    async with AsyncClient(target(gateway)) as client:
        answer = await client.run_tools(QUESTION, agent_tools())
    assert (
        answer.content == "tools: weather=error: invalid arguments for 'weather': city: expected a string, got a number"
    )
    assert answer.steps == 2


@pytest.mark.parametrize("kind", ["async-tool", "thread-tool", "blocking-client", "blocking-client-async-tool"])
async def test_a_tool_past_tool_timeout_is_answered_that_it_did_not_finish(
    gateway: Gateway, primary: FakeUpstream, kind: str
) -> None:
    """A tool that hangs (a fetch without a timeout) must not hold the agent's loop for ever: with tool_timeout the
    model reads that it did not finish, with the other tools' results, and the loop goes on. An async tool is
    cancelled: the blocking client's went on running, to act after the model had read that it did not."""
    primary.inject({"tool_calls": [{"name": "stuck", "arguments": "{}"}, {"name": "quick", "arguments": "{}"}]},
                   {"echo_tools": True})  # fmt: skip
    released = threading.Event()
    cancelled = threading.Event()  # the blocking client's async tool runs in an event loop of its own, in a thread
    tools = Tools()

    @tools.register
    def quick() -> str:
        """Answers at once."""
        return "done"

    async def stuck_async() -> str:
        """Never answers."""
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    def stuck_in_a_thread() -> str:
        """Never answers, until the test ends."""
        released.wait(60)
        return "late"

    tools.register(stuck_async if kind.endswith("async-tool") else stuck_in_a_thread, name="stuck")

    started = time.monotonic()
    try:
        if kind.startswith("blocking-client"):
            with Client(target(gateway)) as blocking:
                answer = await asyncio.to_thread(blocking.run_tools, QUESTION, tools, tool_timeout=0.3)
        else:
            async with AsyncClient(target(gateway)) as client:
                answer = await client.run_tools(QUESTION, tools, tool_timeout=0.3)
    finally:
        released.set()
    assert answer.content == "tools: stuck=error: the tool did not finish within 0.3 s; quick=done"
    assert answer.steps == 2 and time.monotonic() - started < 10
    if kind.endswith("async-tool"):
        assert await asyncio.to_thread(cancelled.wait, 5), "the async tool was cancelled"


async def test_plain_tools_past_tool_timeout_keep_no_worker_of_the_loops_default_executor(
    gateway: Gateway, primary: FakeUpstream
) -> None:
    """AsyncClient ran a plain tool with asyncio.to_thread: one that hangs, past tool_timeout, kept a worker of the
    loop's default executor, so that as many as it has starved later tools (answered that they did not finish) and
    the program's own to_thread (and getaddrinfo). Each runs in a daemon thread of its own, as Client's do."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # the default executor's (ThreadPoolExecutor's default)
    primary.inject({"tool_calls": [{"name": "stuck", "arguments": "{}"}] * (workers + 1)}, {"echo_tools": True},
                   {"tool_calls": [{"name": "quick", "arguments": "{}"}]}, {"echo_tools": True})  # fmt: skip
    released = threading.Event()
    tools = Tools()

    @tools.register
    def stuck() -> str:
        """Never answers, until the test ends."""
        released.wait(60)
        return "late"

    @tools.register
    def quick() -> str:
        """Answers at once."""
        return "done"

    try:
        async with AsyncClient(target(gateway), timeout=10) as client:
            hung = await client.run_tools(QUESTION, tools, tool_timeout=0.2)
            answer = await client.run_tools(QUESTION, tools, tool_timeout=2)
        own = await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 2)
    finally:
        released.set()
    assert hung.content.count("stuck=error: the tool did not finish within 0.2 s") == workers + 1
    assert (answer.content, own) == ("tools: quick=done", "ran")


HUNG_TOOL_RUN = """
import asyncio, sys, time
from llmrelay import AsyncClient, Tools, message

tools = Tools()

@tools.register
def stuck() -> str:
    time.sleep(60)
    return "late"

async def main() -> None:
    async with AsyncClient(sys.argv[1]) as client:
        answer = await client.run_tools([message("user", "go")], tools, tool_timeout=0.2)
    print(answer.content, flush=True)

asyncio.run(main())
"""


async def test_a_program_whose_plain_tool_hangs_past_tool_timeout_ends(gateway: Gateway, primary: FakeUpstream) -> None:
    # asyncio.run() waited for the default executor's threads at its end: the hung tool's, for its whole minute.
    primary.inject({"tool_calls": [{"name": "stuck", "arguments": "{}"}]}, {"echo_tools": True})
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HUNG_TOOL_RUN, target(gateway), stdout=PIPE, stderr=PIPE
    )
    out, err = await finished(run)
    assert (run.returncode, err.decode()) == (0, "")
    assert out == b"tools: stuck=error: the tool did not finish within 0.2 s\n"


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
async def test_a_tools_own_cancellation_and_text_utf_8_cannot_hold_become_results(
    gateway: Gateway, primary: FakeUpstream, blocking: bool
) -> None:
    # Each ended the loop: a CancelledError no one cancelling the run asked for (a tool's own inner request's), and
    # text with surrogates (a Latin-1 file name through os.fsdecode), which protobuf refused with UnicodeEncodeError.
    primary.inject(
        {"tool_calls": [{"name": name, "arguments": "{}"} for name in ("fetch", "listing", "lookup")]},
        {"echo_tools": True},
    )
    tools = Tools()

    @tools.register
    async def fetch() -> str:
        """A page, by a request of the tool's own."""
        raise asyncio.CancelledError("the request was cancelled")

    @tools.register
    def listing() -> str:
        """A directory's file names."""
        return os.fsdecode(b"caf\xe9.txt")

    @tools.register
    def lookup() -> str:
        """A file's text."""
        raise FileNotFoundError(os.fsdecode(b"no caf\xe9.txt"))

    answer = await run_tools(gateway, tools, blocking=blocking)
    assert answer.content == (
        "tools: fetch=error: CancelledError: the request was cancelled; listing=caf\ufffd.txt; "
        "lookup=error: FileNotFoundError: no caf\ufffd.txt"
    )


CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("CALLER", default="unset")


@dataclasses.dataclass
class Report:
    city: str
    summary: str = dataclasses.field(init=False)  # never set: reading it raises AttributeError


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_a_result_that_fails_as_it_is_written_is_answered_and_tools_see_the_callers_context(
    gateway: Gateway, primary: FakeUpstream, blocking: bool
) -> None:
    """A result whose writing raised other than TypeError or ValueError (a dataclass's field never set) ended the
    run: the blocking loop's calls all answered "cancelled", the async one's none (a conversation no model takes).
    And the blocking client's tools ran without the caller's context variables (a trace, a user), the async one's
    with them."""
    primary.inject({"tool_calls": [{"name": n, "arguments": "{}"} for n in ("report", "who")]}, {"echo_tools": True})
    tools = Tools()

    @tools.register
    def report() -> Report:
        """A report."""
        return Report("Oslo")

    @tools.register
    async def who() -> str:
        """Who asks."""
        return CALLER.get()

    CALLER.set("alice")
    answer = await run_tools(gateway, tools, blocking=blocking)
    assert answer.content == (
        "tools: report=error: the tool's result cannot be written as JSON (AttributeError: 'Report' object has no"
        " attribute 'summary'); who=alice"
    )


async def test_an_async_run_a_tools_keyboard_interrupt_ends_answers_every_call(
    gateway: Gateway, primary: FakeUpstream
) -> None:
    """Ctrl-C landing in an async tool's code ended the run with the answer's calls unanswered (gather passes on the
    exception and leaves the other calls running): the conversation could not go on, as the blocking loop's can."""
    primary.inject(
        {"tool_calls": [{"name": "quick", "arguments": "{}"}, {"name": "interrupted", "arguments": "{}"}]},
        {"echo_tools": True},
    )
    tools = Tools()

    @tools.register
    async def quick() -> str:
        """Answers at once."""
        return "done"

    @tools.register
    async def interrupted() -> str:
        """Ctrl-C lands in it."""
        raise KeyboardInterrupt

    conversation = Conversation(QUESTION)

    def run_interrupted() -> None:  # its own loop: a KeyboardInterrupt ends the loop it reaches
        async def run() -> None:
            async with AsyncClient(target(gateway)) as client:
                await client.run_tools(conversation, tools)

        with pytest.raises(KeyboardInterrupt):
            asyncio.run(run())

    await asyncio.to_thread(run_interrupted)
    asked, results = conversation.messages[1], conversation.messages[2:]
    assert [(m.tool_call_id, m.content) for m in results] == [
        (asked.tool_calls[0].id, "done"),
        (asked.tool_calls[1].id, "error: the run was cancelled before the tool finished"),
    ]
    async with AsyncClient(target(gateway)) as client:
        answer = await client.run_tools(conversation, Tools())
    assert answer.content == "tools: quick=done; interrupted=error: the run was cancelled before the tool finished"


@pytest.mark.parametrize("tool_timeout", [0, -1, float("nan"), True, "1"])
async def test_a_tool_timeout_that_is_no_time_is_refused(gateway: Gateway, tool_timeout: Any) -> None:
    async with AsyncClient(target(gateway)) as client:
        with pytest.raises(ValueError, match="tool_timeout must be a number of seconds > 0"):
            await client.run_tools(QUESTION, agent_tools(), tool_timeout=tool_timeout)


@pytest.mark.usefixtures("python_recursion_limit")  # hypothesis's tests may leave it raised
async def test_arguments_nested_too_deeply_to_read_become_a_result_that_says_so(
    gateway: Gateway, primary: FakeUpstream
) -> None:
    # Valid JSON the gateway passes on as the upstream wrote it, nested deeper than Python's reader goes: the loop
    # ended with a RecursionError.
    deep = "[" * 5000 + "]" * 5000
    primary.inject({"tool_calls": [{"name": "weather", "arguments": f'{{"city": {deep}}}'}]}, {"echo_tools": True})
    async with AsyncClient(target(gateway)) as client:
        answer = await client.run_tools(QUESTION, agent_tools())
    assert answer.content == "tools: weather=error: the arguments of 'weather' are nested too deeply to read"


async def test_a_conversation_is_fitted_through_count_tokens(gateway: Gateway, primary: FakeUpstream) -> None:
    async with AsyncClient(target(gateway)) as client:
        history = [message("system", "Be brief.")]
        for turn in range(6):
            history += [message("user", f"question {turn} " + "words " * 40), message("assistant", "an answer")]
        conversation = Conversation(history, model="gpt-test")
        whole = await client.count_tokens(conversation.messages, model="gpt-test")
        conversation.budget_tokens = whole.token_count // 2
        conversation.add(message("user", "the last question"))
        answer = await client.run_tools(conversation, agent_tools())
    assert conversation.tokens is not None and conversation.tokens <= conversation.budget_tokens
    assert conversation.messages[0].content == "Be brief.", "the system message stays"
    assert conversation.messages[-2:] == [message("user", "the last question"), answer.message]
    sent = [m["content"] for m in primary.chat_requests[0]["messages"]]
    assert "question 0 " not in " ".join(sent) and sent[-1] == "the last question"
    assert len(sent) < len(history), "the oldest turns were dropped before the call"


async def test_a_conversation_is_fitted_with_its_answer_schema(gateway: Gateway, primary: FakeUpstream) -> None:
    """run_tools counts the schema its calls ask for with the conversation: the prompt they are billed for."""
    forecast = {"type": "object", "properties": {"summary": {"type": "string"}, "high_c": {"type": "number"}}}
    answer_format = json_schema("forecast", forecast)
    async with AsyncClient(target(gateway)) as client:
        chat = [message("user", "weather in Oslo tomorrow?")]
        alone = await client.count_tokens(chat, model="gpt-test")
        with_schema = await client.count_tokens(chat, model="gpt-test", response_format=answer_format)
        as_dict = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": forecast}}
        assert (await client.count_tokens(chat, model="gpt-test", response_format=as_dict)) == with_schema
        assert with_schema.token_count > alone.token_count + 15
        tools = agent_tools()
        needed = await client.count_tokens(
            chat, model="gpt-test", tools=tools.definitions(), response_format=answer_format
        )
        conversation = Conversation(list(chat), model="gpt-test", budget_tokens=needed.token_count)
        await client.run_tools(conversation, tools, response_format=answer_format)
    assert conversation.tokens == needed.token_count


# --- deadlines, interceptors, retries ------------------------------------------------------------------------------


class Recorder(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        self.timeouts.append(details.timeout)
        return continuation(details, request)


class AsyncRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.timeouts.append(details.timeout)
        return await continuation(details, request)


async def test_deadlines_and_interceptors(gateway: Gateway) -> None:
    recorder, async_recorder = Recorder(), AsyncRecorder()

    def calls() -> None:
        with Client(target(gateway), interceptors=[recorder]) as client:
            client.health()
            client.health(timeout=None)
            client.health(timeout=5)

    await asyncio.to_thread(calls)
    async with AsyncClient(target(gateway), interceptors=[async_recorder], timeout=None) as client:
        await client.health()
        await client.health(timeout=7)
    assert recorder.timeouts == [DEFAULT_TIMEOUT_S, None, 5]
    assert async_recorder.timeouts == [None, 7], "the client's own default: no deadline"


@pytest.fixture
async def lone_backend(gateway_factory: GatewayFactory, primary: FakeUpstream) -> Gateway:
    """One backend and no retries by the gateway: a 503 goes back to the caller, with the upstream's Retry-After."""
    return await gateway_factory(f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
router:
  retry: {{max_retries: 0}}
  circuit: {{failure_threshold: 50, cooldown_s: 30}}
""")


async def test_the_channel_retries_after_the_gateways_pushback(lone_backend: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"status": 503, "retry_after": 1})
    async with AsyncClient(target(lone_backend)) as client:
        started = time.monotonic()
        answer = await client.complete(QUESTION)
    assert answer.message.content.startswith("echo: ")
    assert len(primary.chat_requests) == 2, "the second try went through the gateway to the upstream"
    waited = primary.chat_times[1] - primary.chat_times[0]
    assert waited >= 0.9, f"the retry came {waited:.2f} s after the first try, before the pushback's 1 s"
    assert time.monotonic() - started < 30


async def test_without_a_service_config_the_error_comes_back(lone_backend: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"status": 503, "retry_after": 1})
    async with AsyncClient(target(lone_backend), service_config=None) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.complete(QUESTION)
    assert caught.value.retry_delay_s == 1 and len(primary.chat_requests) == 1


@pytest.mark.parametrize(("flags", "status", "requests"), [((), 1, 1), (("--retry",), 0, 2)], ids=["once", "retry"])
async def test_the_cli_fails_at_once_unless_told_to_retry(
    lone_backend: Gateway, primary: FakeUpstream, flags: tuple[str, ...], status: int, requests: int
) -> None:
    primary.inject({"status": 503, "retry_after": 1})
    cli = [str(BIN / "llmrelay"), "--target", target(lone_backend), *flags, "complete", "hi"]
    complete = await asyncio.create_subprocess_exec(*cli, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(complete.communicate(), 30)
    assert complete.returncode == status and len(primary.chat_requests) == requests
    if status:
        assert b"llmrelay: UNAVAILABLE" in err and b"retry after 1 s" in err
    else:
        assert out.startswith(b"echo: ")


# --- metadata ------------------------------------------------------------------------------------------------------

ALPHA_KEY = "llmr-alpha-0123456789abcdefghijklmn"
BETA_KEY = "llmr-beta-0123456789abcdefghijklmno"


def key_entry(name: str, key: str, extra: str = "") -> str:
    return f'    - {{name: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}"{extra}}}\n'


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def test_a_calls_key_replaces_the_clients(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # The gateway reads the first authorization header: the client's would win if both were sent.
    keys = "auth:\n  keys:\n" + key_entry("alpha", ALPHA_KEY, ', models: ["nothing*"]') + key_entry("beta", BETA_KEY)
    gateway = await gateway_factory(two_backends(primary, local) + keys)
    async with AsyncClient(target(gateway), metadata=bearer(ALPHA_KEY)) as client:
        with pytest.raises(PermissionDeniedError):
            await client.complete(QUESTION)  # alpha may use no model
        answer = await client.complete(QUESTION, metadata=bearer(BETA_KEY))
        usage = await client.get_usage(metadata=bearer(BETA_KEY))
    assert answer.message.content.startswith("echo: ")
    assert [(r.caller, r.requests) for r in usage.records] == [("beta", 1)], "authorised and billed as beta"


async def test_an_answer_over_grpcs_default_receive_limit_reaches_the_client(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """server.max_message_bytes raised (for large images) raises the answers the gateway sends: the client kept gRPC's
    default receive limit (4 MiB), and an answer of 5 MB, billed, failed RESOURCE_EXHAUSTED in the client."""
    gateway = await gateway_factory(two_backends(primary, local), server="max_message_bytes: 20971520")
    primary.inject({"huge_content": 5_000_000}, {"huge_content": 5_000_000})
    async with AsyncClient(target(gateway)) as client:
        answer = await client.complete(QUESTION)
    assert len(answer.message.content) == 5_000_000

    def blocking() -> pb.CompleteResponse:
        with Client(target(gateway)) as client:
            return client.complete(QUESTION)

    assert len((await asyncio.to_thread(blocking)).message.content) == 5_000_000


def _blocking_usage(address: str, metadata: list[tuple[str, str]]) -> pb.GetUsageResponse:
    with Client(address, metadata=metadata) as client:
        return client.get_usage()


async def test_metadata_keys_are_sent_in_lower_case_and_bad_values_refused_unshown(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # "Authorization", as HTTP writes it, failed every call: INTERNAL "Invalid metadata" from Client, grpc.aio's own
    # ExecuteBatchError from AsyncClient; so did a value gRPC cannot send, without saying which.
    gateway = await gateway_factory(two_backends(primary, local) + "auth:\n  keys:\n" + key_entry("beta", BETA_KEY))
    capitalised = [("Authorization", f"Bearer {BETA_KEY}")]
    async with AsyncClient(target(gateway), metadata=capitalised) as client:
        assert (await client.get_usage()).records == []
    assert (await asyncio.to_thread(_blocking_usage, target(gateway), capitalised)).records == []
    for where in ("client", "call"):
        with pytest.raises(ValueError, match="metadata 'authorization': gRPC takes only printable ASCII") as refused:
            broken = [("authorization", f"Bearer {BETA_KEY}\n")]
            async with AsyncClient(target(gateway), metadata=broken if where == "client" else ()) as client:
                await client.get_usage(metadata=broken)
        assert BETA_KEY not in str(refused.value)
    with pytest.raises(ValueError, match="metadata key 'x team': gRPC takes only letters"):
        Client(target(gateway), metadata=[("x team", "a")])


@pytest.mark.parametrize("key", ["grpc-status", "GRPC-Timeout"])
async def test_a_metadata_key_grpc_reserves_is_refused_before_any_call(
    gateway: Gateway, primary: FakeUpstream, key: str
) -> None:
    """A key starting grpc- is gRPC's own: sent as a caller's, grpcio's core took it for the call's (grpc-status), and
    Complete returned None and a stream ended with no message and no error, while the gateway ran and billed the
    call."""
    reserved = [(key, "0")]
    refused = rf"metadata key '{key}': keys starting grpc- are gRPC's own \(reserved\)"
    async with AsyncClient(target(gateway)) as client:
        with pytest.raises(ValueError, match=refused):
            await client.complete(TEN_WORDS, metadata=reserved)
        with pytest.raises(ValueError, match=refused):
            client.stream(TEN_WORDS, metadata=reserved)

    def call_blocking() -> None:
        with Client(target(gateway)) as blocking_client:
            with pytest.raises(ValueError, match=refused):
                blocking_client.complete(TEN_WORDS, metadata=reserved)
            with pytest.raises(ValueError, match=refused):
                blocking_client.stream(TEN_WORDS, metadata=reserved)
        with pytest.raises(ValueError, match=refused):
            Client(target(gateway), metadata=reserved)

    await asyncio.to_thread(call_blocking)  # a thread: the gateway runs in this loop
    assert primary.chat_requests == [], "no call reached the upstream"


# --- streams kept in a variable ------------------------------------------------------------------------------------

CALLS = "llmrelay_server.calls"
"""The gateway's call log: one line per call as it ends, with its status code."""
TEN_WORDS = [message("user", "one two three four five six seven eight nine ten")]


def stream_codes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The status codes of the StreamComplete calls the gateway has ended so far."""
    calls = [getattr(r, "call", {}) for r in caplog.records if r.name == CALLS]
    return [call["code"] for call in calls if call["rpc"] == "llmrelay.v1.LLMService/StreamComplete"]


def seconds_until(condition: Callable[[], bool], within_s: float) -> float:
    """How long the condition took to hold (polled; the gateway's log has no event to wait on); within_s if never."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < within_s:
        time.sleep(0.005)
    return time.monotonic() - started


def _leave_a_blocking_stream(address: str, ended: Callable[[], bool]) -> tuple[float, list[pb.StreamCompleteResponse]]:
    with Client(address) as client:  # open until the gateway has ended the call: closing it would cancel the call
        with client.stream(TEN_WORDS) as stream:
            next(stream)
        return seconds_until(ended, 5), list(stream)


async def _leave_an_async_stream(
    address: str, ended: Callable[[], bool]
) -> tuple[float, list[pb.StreamCompleteResponse]]:
    async with AsyncClient(address) as client:
        async with client.stream(TEN_WORDS) as stream:
            await anext(stream)
        return await asyncio.to_thread(seconds_until, ended, 5), [chunk async for chunk in stream]


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
async def test_leaving_the_with_block_of_a_stream_cancels_it_at_once(
    gateway: Gateway, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, blocking: bool
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    primary.inject({"trickle_s": 1.0})  # a word a second: the answer would take ten

    def ended() -> bool:
        return bool(stream_codes(caplog))

    if blocking:
        waited, rest = await asyncio.to_thread(_leave_a_blocking_stream, target(gateway), ended)
    else:
        waited, rest = await _leave_an_async_stream(target(gateway), ended)
    assert stream_codes(caplog) == ["CANCELLED"], "the gateway's stream ended when the block did"
    assert waited < 1, f"the gateway ended the stream {waited:.2f} s after the block, not at once"
    assert rest == [], "a closed stream has no more messages"


def _close_a_blocking_stream_being_read(address: str) -> tuple[list[str], list[BaseException], bool]:
    """A stream read in one thread and closed from another once a word came: the words read, what the reader raised,
    whether it ended."""
    with Client(address) as client:
        stream = client.stream(TEN_WORDS)
        words: list[str] = []
        raised: list[BaseException] = []

        def read() -> None:
            try:
                words.extend(chunk.delta.content for chunk in stream)
            except BaseException as exc:
                raised.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        seconds_until(lambda: bool(words) or not reader.is_alive(), 5)
        stream.close()  # raised ValueError, "generator already executing", and the answer ran to its end
        reader.join(5)
        return words, raised, not reader.is_alive()


async def _close_an_async_stream_being_read(address: str) -> tuple[list[str], list[BaseException], bool]:
    async with AsyncClient(address) as client:
        stream = client.stream(TEN_WORDS)
        words: list[str] = []
        raised: list[BaseException] = []

        first = asyncio.Event()

        async def read() -> None:
            try:
                async for chunk in stream:
                    words.append(chunk.delta.content)
                    first.set()
            except BaseException as exc:
                raised.append(exc)

        reader = asyncio.create_task(read())
        await asyncio.wait_for(first.wait(), 5)
        await stream.aclose()  # raised RuntimeError, "aclose(): asynchronous generator is already running"
        done, _ = await asyncio.wait([reader], timeout=5)
        return words, raised, bool(done)


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
async def test_a_stream_closed_while_another_reads_it_is_cancelled_and_its_reader_ends(
    gateway: Gateway, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, blocking: bool
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    primary.inject({"trickle_s": 1.0})  # a word a second: the answer would take ten
    started = time.monotonic()
    if blocking:
        words, raised, ended = await asyncio.to_thread(_close_a_blocking_stream_being_read, target(gateway))
    else:
        words, raised, ended = await _close_an_async_stream_being_read(target(gateway))
    assert ended and raised == [], "the reader's loop ended, as at the end of the answer"
    assert 1 <= len(words) < 5 and time.monotonic() - started < 5, words
    await asyncio.to_thread(seconds_until, lambda: bool(stream_codes(caplog)), 5)
    assert stream_codes(caplog) == ["CANCELLED"], "the gateway stopped asking the upstream"


async def _close_each_stream_as_its_answer_ends(address: str, streams: int) -> list[BaseException]:
    """Streams read, each closed by another task a moment (a little later each) after its last message came; what
    the readers raised."""
    closing: list[asyncio.Task[None]] = []
    raised: list[BaseException] = []

    async def close(stream: AsyncStream, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await stream.aclose()

    async with AsyncClient(address) as client:
        for attempt in range(streams):
            stream = client.stream(TEN_WORDS)
            try:
                async for chunk in stream:
                    if chunk.finish_reason:
                        closing.append(asyncio.create_task(close(stream, (attempt % 25) * 20e-6)))
            except LLMRelayError as exc:
                raised.append(exc)
        await asyncio.gather(*closing)
    assert len(closing) == streams
    return raised


async def test_a_stream_closed_by_another_task_as_its_answer_ends_ends_quietly(gateway: Gateway) -> None:
    """aclose() from another task (a stop button) a moment after the reader got the answer's last message: grpc.aio
    raised AioRpcError(CANCELLED), not CancelledError, where the cancel landed while the call waited for its status,
    and the reader failed LLMRelayError(CANCELLED) with the whole answer read. In an event loop of its own, as a
    program's: the gateway's, this one, would only answer between the client's steps."""
    raised = await asyncio.to_thread(asyncio.run, _close_each_stream_as_its_answer_ends(target(gateway), 500))
    assert raised == []


async def test_an_async_on_delta_is_awaited(gateway: Gateway) -> None:
    # It was called and never awaited: it ran not once, and said so only in a RuntimeWarning.
    heard: list[str] = []

    async def on_delta(chunk: pb.StreamCompleteResponse) -> None:
        await asyncio.sleep(0)
        heard.append(chunk.delta.content)

    async with AsyncClient(target(gateway)) as client:
        answer = await client.collect(TEN_WORDS, on_delta=on_delta)
    assert "".join(heard) == answer.message.content == "echo: one two three four five six seven eight nine ten"


async def test_an_async_client_made_outside_an_event_loop_serves_the_loop_of_its_first_call(gateway: Gateway) -> None:
    # Its channel was made at construction, in no running loop, and every call failed with RuntimeError ("attached
    # to a different loop").
    client = await asyncio.to_thread(AsyncClient, target(gateway))
    try:
        answer = await client.complete(TEN_WORDS)
        assert answer.message.content.startswith("echo: one")
        with pytest.raises(RuntimeError, match=r"serves the event loop of its first call.*make an AsyncClient in each"):
            await asyncio.to_thread(asyncio.run, client.health())
    finally:
        await client.close()


async def test_a_failed_call_carries_its_request_id(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    async with AsyncClient(target(gateway)) as client:
        with pytest.raises(LLMRelayError) as given:
            await client.complete(TEN_WORDS, model="no-such-model", metadata=[("x-request-id", "agent-7-step-2")])
        with pytest.raises(LLMRelayError) as made:
            await client.complete(TEN_WORDS, model="no-such-model")
    assert given.value.request_id == "agent-7-step-2"
    logged = [getattr(record, "call", {}).get("request_id") for record in caplog.records if record.name == CALLS]
    assert made.value.request_id is not None and logged == ["agent-7-step-2", made.value.request_id]


@pytest.mark.parametrize("kind", ["stream", "complete"])
async def test_closing_an_async_client_fails_its_calls_in_flight_cancelled(
    gateway: Gateway, primary: FakeUpstream, kind: str
) -> None:
    # As the blocking client's do: an asyncio.CancelledError would read as the reading task's own cancellation.
    primary.inject({"trickle_s": 1.0} if kind == "stream" else {"stall_s": 10})
    client = AsyncClient(target(gateway))

    async def call() -> None:
        if kind == "stream":
            async for _ in client.stream([{"role": "user", "content": "hi there"}]):
                pass
        else:
            await client.complete([{"role": "user", "content": "hi there"}])

    running = asyncio.create_task(call())
    await asyncio.sleep(0.5)
    await client.close()
    with pytest.raises(LLMRelayError) as closed:
        await asyncio.wait_for(running, 2)
    assert closed.value.code == grpc.StatusCode.CANCELLED
    assert "closed" in closed.value.message
    assert not running.cancelled()


def _calls_after_a_blocking_close(address: str) -> list[BaseException | None]:
    client = Client(address)
    made_before = client.stream(TEN_WORDS)
    client.close()
    calls: list[Callable[[], object]] = [
        lambda: client.complete(TEN_WORDS),
        lambda: list(client.stream(TEN_WORDS)),
        lambda: list(made_before),
        client.health,
    ]
    failures: list[BaseException | None] = []
    for call in calls:
        try:
            call()
            failures.append(None)
        except Exception as exc:
            failures.append(exc)
    return failures


async def _calls_after_an_async_close(address: str) -> list[BaseException | None]:
    client = AsyncClient(address)
    made_before = client.stream(TEN_WORDS)
    await client.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.complete(TEN_WORDS),
        lambda: anext(client.stream(TEN_WORDS)),
        lambda: anext(made_before),
        client.health,
    ]
    failures: list[BaseException | None] = []
    for call in calls:
        try:
            await call()
            failures.append(None)
        except Exception as exc:
            failures.append(exc)
    return failures


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
async def test_calls_after_the_client_is_closed_fail_cancelled(gateway: Gateway, blocking: bool) -> None:
    # They raised grpc's own errors: ValueError from the blocking channel, grpc.aio.UsageError from the asyncio one.
    if blocking:
        failures = await asyncio.to_thread(_calls_after_a_blocking_close, target(gateway))
    else:
        failures = await _calls_after_an_async_close(target(gateway))
    for failure in failures:
        assert isinstance(failure, LLMRelayError), failure
        assert failure.code == grpc.StatusCode.CANCELLED
        assert failure.message == "the client is closed: make a new one to call"


async def test_a_task_cancelled_while_reading_is_cancelled_still(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"trickle_s": 1.0})
    async with AsyncClient(target(gateway)) as client:

        async def read() -> None:
            async for _ in client.stream([{"role": "user", "content": "hi there"}]):
                pass

        running = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


# --- the TLS rule --------------------------------------------------------------------------------------------------


async def _serve_tls(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    tmp_path: Path,
    authority: Authority,
    clients: Authority | None = None,
) -> Gateway:
    """A gateway serving TLS with a certificate of `authority`'s for localhost and 127.0.0.1; asking for a client
    certificate of `clients`' when given (mutual TLS)."""
    authority.server().write(tmp_path / "server.pem", tmp_path / "server.key")
    client_ca = ""
    if clients is not None:
        (tmp_path / "clients.pem").write_bytes(clients.cert)
        client_ca = f', client_ca_file: "{tmp_path / "clients.pem"}"'
    tls = f'tls: {{cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.key"}"{client_ca}}}'
    config = f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
"""
    return await gateway_factory(config, server=tls)


@pytest.fixture
async def tls_gateway(gateway_factory: GatewayFactory, primary: FakeUpstream, tmp_path: Path) -> tuple[Gateway, bytes]:
    """A gateway serving TLS with a certificate for localhost and 127.0.0.1; and its CA's certificate."""
    authority = Authority("llmrelay sdk test CA")
    return await _serve_tls(gateway_factory, primary, tmp_path, authority), authority.cert


async def test_tls_to_a_loopback_gateway_when_asked(tls_gateway: tuple[Gateway, bytes]) -> None:
    gateway, ca = tls_gateway
    # A channel of its own each: gRPC would otherwise share one connection between channels to the same address.
    options = [("grpc.use_local_subchannel_pool", 1)]
    for address in (f"localhost:{gateway.port}", f"dns:///127.0.0.1:{gateway.port}"):
        async with AsyncClient(address, root_certificates=ca, options=options) as client:
            assert client.uses_tls
            assert (await client.health()).serving
    async with AsyncClient(f"localhost:{gateway.port}", tls=True, options=options) as client:
        with pytest.raises(UnavailableError):  # the system's roots do not know the test CA
            await client.health(timeout=5)


async def test_plaintext_by_default_to_loopback_fails_clearly_against_tls(tls_gateway: tuple[Gateway, bytes]) -> None:
    gateway, _ = tls_gateway
    async with AsyncClient(f"127.0.0.1:{gateway.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as client:
        assert not client.uses_tls
        with pytest.raises(UnavailableError) as caught:
            await client.health(timeout=5)
        with pytest.raises(UnavailableError) as streamed:
            async for _ in client.stream(TEN_WORDS, timeout=5):
                pass
    assert "tls=True" in str(streamed.value), "a stream's too: nothing came from the gateway"
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "in plaintext, its default for a loopback target" in caught.value.message, "what the client chose"
    assert "tls=True" in str(caught.value), "and what to pass instead"
    async with AsyncClient(
        f"127.0.0.1:{gateway.port}", tls=False, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as client:
        with pytest.raises(UnavailableError) as chosen:
            await client.health(timeout=5)
    assert "tls=True" not in chosen.value.message, "no hint where the caller chose"


async def test_certificates_tls_cannot_use_are_a_value_error_naming_the_argument(
    gateway_factory: GatewayFactory, primary: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC took any bytes, then failed every call UNAVAILABLE, "Failed to create security handshaker" (with ERROR
    lines of its own), naming no argument. Checked as the llmrelay command checks its files, in memory: never a key
    on a disk, and where no temporary directory can be written (a container's read-only file system)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such directory"))
    authority = Authority("llmrelay sdk test CA")
    gateway = await _serve_tls(gateway_factory, primary, tmp_path, authority, clients=authority)
    mine, another = authority.client(), authority.client("another")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )  # of an RSA certificate: one the EC certificate cannot be
    encrypted_key = serialization.load_pem_private_key(mine.key, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )  # said "swapped?"
    damaged = b"-----BEGIN CERTIFICATE-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIB\n-----END CERTIFICATE-----\n"
    address = f"localhost:{gateway.port}"
    pair = "private_key and certificate_chain: "
    unusable = [
        # root_certificates, private_key, certificate_chain: what the client was given, and what it says of them
        ((b"junk", mine.key, mine.cert), "root_certificates: no PEM certificate in it"),
        ((mine.key, mine.key, mine.cert), "root_certificates: no PEM certificate in it"),
        ((authority.cert, another.key, mine.cert), pair + "the key is not the certificate's"),
        ((authority.cert, rsa_key, mine.cert), pair + "the key is not the certificate's"),  # said "swapped?"
        ((authority.cert, mine.key, b"junk"), pair + "not a PEM certificate and its key"),
        ((authority.cert, mine.cert, mine.key), pair + "not a PEM certificate and its key (are they swapped?)"),
        ((authority.cert, encrypted_key, mine.cert), pair + "the key is encrypted, and gRPC takes no password"),
        ((damaged, mine.key, mine.cert), "root_certificates: none of its 1 PEM certificates can be read"),
    ]
    for (roots, key, chain), said in unusable:
        for make in (Client, AsyncClient):
            with pytest.raises(ValueError) as caught:
                make(address, root_certificates=roots, private_key=key, certificate_chain=chain)
            assert str(caught.value).startswith(said), (make, str(caught.value))
    for name in ("root_certificates", "private_key", "certificate_chain"):
        text: dict[str, Any] = {name: b"PEM".decode()}
        with pytest.raises(TypeError, match=f"^{name}: PEM bytes"):  # said "no PEM certificate in it", or named none
            Client(address, **text)
    # A bundle with a damaged block after the CA's: trusted for the CA, as gRPC trusts it.
    async with AsyncClient(
        address, root_certificates=authority.cert + damaged, private_key=mine.key, certificate_chain=mine.cert
    ) as client:
        assert (await client.health(timeout=10)).serving


async def test_a_gateway_that_asks_for_a_client_certificate_is_told_of_when_it_closes_the_handshake(
    gateway_factory: GatewayFactory, primary: FakeUpstream, tmp_path: Path
) -> None:
    """A gateway with mutual TLS closes the connection of a client it does not take with no word of why: gRPC said
    only "Socket closed". Failures the client can tell itself (a server it does not trust, a plaintext gateway) have
    their own words, and no hint of client certificates."""
    authority = Authority("llmrelay sdk test CA")
    mutual = await _serve_tls(gateway_factory, primary, tmp_path, authority, clients=authority)
    openai = f'{{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: {primary.models[0]}}}'
    plaintext = await gateway_factory(f"llm:\n  openai: {openai}\n")
    stranger = Authority("another CA").client()
    cases: list[tuple[int, dict[str, Any], str | None]] = [
        (mutual.port, {"root_certificates": authority.cert}, "this client gave none: pass private_key= and"),
        (
            mutual.port,
            {"root_certificates": authority.cert, "private_key": stranger.key, "certificate_chain": stranger.cert},
            "it did not take this client's: it must be issued by a CA in the gateway's server.tls.client_ca_file",
        ),
        (mutual.port, {"root_certificates": Authority("not the server's CA").cert}, None),
        (plaintext.port, {"root_certificates": authority.cert}, None),
    ]
    options = [("grpc.use_local_subchannel_pool", 1)]
    for port, certificates, hint in cases:
        async with AsyncClient(f"localhost:{port}", options=options, **certificates) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.health(timeout=10)
        message = str(caught.value)
        if hint is None:
            assert "client certificate" not in message and "Socket closed" not in message, message
        else:
            assert ": Socket closed (if the gateway asks for a client certificate (mutual TLS), " in message, message
            assert hint in message, message


def _read_a_blocking_stream(address: str, heard: threading.Event) -> tuple[int, BaseException | None]:
    """The chunks a stream gave, and what it failed with; heard is set at its first chunk."""
    chunks = 0
    try:
        with Client(address) as client:
            for _ in client.stream(TEN_WORDS):
                chunks += 1
                heard.set()
    except Exception as exc:
        return chunks, exc
    return chunks, None


async def _read_an_async_stream(address: str, heard: threading.Event) -> tuple[int, BaseException | None]:
    chunks = 0
    try:
        async with AsyncClient(address) as client:
            async for _ in client.stream(TEN_WORDS):
                chunks += 1
                heard.set()
    except Exception as exc:
        return chunks, exc
    return chunks, None


async def test_a_stream_whose_gateway_dies_fails_without_the_tls_hint(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The hint that the client chose plaintext (pass tls=True) was added to any UNAVAILABLE without ErrorInfo: a
    stream's whose gateway was killed after chunks had come too, a gateway reached. (Where nothing came, the hint
    stays: test_plaintext_by_default_to_loopback_fails_clearly_against_tls.)"""
    config = tmp_path / "llmrelay.yaml"
    config.write_text('server: {usage_db: ":memory:", drain_s: 0}\n' + two_backends(primary, local))
    primary.inject({"trickle_s": 1.0}, {"trickle_s": 1.0})  # a word a second: the answers would take ten
    gateway = await spawn_gateway(config, env=clean_env())
    try:
        await gateway.wait_serving()
        heard = [threading.Event(), threading.Event()]
        readers = asyncio.gather(
            asyncio.to_thread(_read_a_blocking_stream, gateway.target, heard[0]),
            _read_an_async_stream(gateway.target, heard[1]),
        )
        for event in heard:
            assert await asyncio.to_thread(event.wait, 10), "a chunk came"
        gateway.process.kill()
        results = await asyncio.wait_for(readers, 10)
    finally:
        await gateway.stop()
    for chunks, failure in results:
        assert isinstance(failure, UnavailableError) and chunks >= 1, (chunks, failure)
        assert "tls" not in failure.message and "plaintext" not in failure.message, failure.message


async def test_a_blocking_stream_whose_gateway_dies_before_a_chunk_fails_at_once_and_so_do_calls_after_it(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """grpcio's blocking stream, retried by the channel after its gateway died, waited for ever, past its deadline and
    stream.close(); and the calls after it, refused a connection, were told to try TLS, from a client that had been
    talking plaintext to that gateway all along."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text('server: {usage_db: ":memory:", drain_s: 0}\n' + two_backends(primary, local))
    primary.inject({"stall_s": 60})  # no chunk comes
    gateway = await spawn_gateway(config, env=clean_env())
    outcome: list[BaseException | None] = []

    def read(client: Client) -> None:
        try:
            list(client.stream(TEN_WORDS))
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    try:
        await gateway.wait_serving()  # alive: its first probe of the backends may still be out
        with Client(gateway.target, timeout=20) as client:
            # Ready once that probe has found a backend, which the loop answers: asked from a thread meanwhile, not
            # from the loop (a blocking call there held the probe up, and Health said serving=false).
            async with asyncio.timeout(20):
                while not (await asyncio.to_thread(client.health)).serving:  # noqa: ASYNC110 (a call: no event)
                    await asyncio.sleep(0.05)
            # A thread of its own, not the loop's executor: one stuck for ever would hold up the tests' exit.
            reader = threading.Thread(target=read, args=(client,), daemon=True)
            reader.start()
            await wait_until(lambda: len(primary.chat_requests) == 1)
            gateway.process.kill()
            await asyncio.to_thread(reader.join, 10)
            assert outcome and isinstance(outcome[0], UnavailableError), outcome
            with pytest.raises(UnavailableError) as refused:
                client.complete(TEN_WORDS)
    finally:
        await gateway.stop()
    for failure in (outcome[0], refused.value):
        assert "tls" not in failure.message and "plaintext" not in failure.message, failure.message


async def test_a_gateway_that_answered_an_error_or_a_stream_left_early_was_reached(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A client counted its gateway reached only once a call succeeded or the gateway's headers came: one whose call
    the gateway answered with an error (in trailers alone, its ErrorInfo and request id), or whose caller left a
    stream after its first chunk, was told to pass tls=True once that gateway had gone, over the plaintext channel that
    had just talked to it."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text('server: {usage_db: ":memory:", drain_s: 0}\n' + two_backends(primary, local))
    primary.inject({"trickle_s": 0.2}, {"trickle_s": 0.2})  # both streams still going when their callers leave
    gateway = await spawn_gateway(config, env=clean_env())
    errored, left = Client(gateway.target, timeout=5), Client(gateway.target, timeout=5)
    async_errored, async_left = AsyncClient(gateway.target, timeout=5), AsyncClient(gateway.target, timeout=5)

    def call_blocking() -> None:
        with pytest.raises(InvalidArgumentError) as answered:
            errored.complete([])
        assert answered.value.reason is not None and answered.value.request_id, "the gateway's own error"
        for _ in left.stream(TEN_WORDS):
            break

    def refused_blocking() -> list[UnavailableError]:
        failures = []
        for client in (errored, left):
            with pytest.raises(UnavailableError) as refused:
                client.complete(TEN_WORDS)
            failures.append(refused.value)
        return failures

    try:
        await gateway.wait_serving()
        await asyncio.to_thread(call_blocking)
        with pytest.raises(InvalidArgumentError):
            await async_errored.complete([])
        async with async_left.stream(TEN_WORDS) as stream:
            async for _ in stream:
                break
        gateway.process.kill()
        await gateway.process.wait()
        failures = await asyncio.to_thread(refused_blocking)
        for async_client in (async_errored, async_left):
            with pytest.raises(UnavailableError) as refused:
                await async_client.complete(TEN_WORDS)
            failures.append(refused.value)
    finally:
        errored.close()
        left.close()
        await async_errored.close()
        await async_left.close()
        await gateway.stop()
    for failure in failures:
        assert "tls" not in failure.message and "plaintext" not in failure.message, failure.message


def test_tls_by_default_to_other_hosts() -> None:
    with Client("llm.example.com:443") as remote, Client("llm.example.com:443", tls=False) as plain:
        assert remote.uses_tls and not plain.uses_tls


async def test_the_cli_follows_the_rule_and_takes_a_ca(tls_gateway: tuple[Gateway, bytes], tmp_path: Path) -> None:
    gateway, ca = tls_gateway
    (tmp_path / "ca.pem").write_bytes(ca)
    cli = [str(BIN / "llmrelay"), "--target", f"localhost:{gateway.port}", "--timeout", "10"]
    trusted = await asyncio.create_subprocess_exec(*cli, "--ca-file", str(tmp_path / "ca.pem"), "health", stdout=PIPE)
    out, _ = await asyncio.wait_for(trusted.communicate(), 30)
    assert trusted.returncode == 0 and b"serving: yes" in out
    plaintext = await asyncio.create_subprocess_exec(*cli, "health", stdout=PIPE, stderr=PIPE)
    _, err = await asyncio.wait_for(plaintext.communicate(), 30)
    assert plaintext.returncode == 1 and b"llmrelay: UNAVAILABLE" in err


async def test_the_cli_health_exits_1_when_the_gateway_is_not_serving(gateway_factory: GatewayFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gateway = await gateway_factory(f'llm:\n  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{closed}"}}\n')
    health = await asyncio.create_subprocess_exec(
        str(BIN / "llmrelay"), "--target", f"127.0.0.1:{gateway.port}", "health", "--probe", stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(health.communicate(), 30)
    assert (health.returncode, err) == (1, b"")
    assert out.startswith(b"serving: no (no backend is reachable with its circuit not open)\n")
    assert b"unreachable" in out
