"""Agent helpers: tools made from Python functions (`Tools`), what the tool loop ends with (`Answer`), and a
`Conversation` that keeps to a token budget. The loop itself is Client.run_tools and AsyncClient.run_tools; what
they share (the bookkeeping of the steps) is `_Steps` here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime
import decimal
import enum
import functools
import inspect
import json
import math
import pathlib
import re
import threading
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Final,
    Literal,
    NotRequired,
    Required,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
    overload,
)

from llmrelay import v1 as pb
from llmrelay._errors import LLMRelayError
from llmrelay._messages import MessageLike, as_messages

DEFAULT_MAX_STEPS: Final = 10
"""The calls to the model run_tools makes at most, unless told otherwise."""

ToolFunction = TypeVar("ToolFunction", bound=Callable[..., Any])
_Result = TypeVar("_Result")


class StepLimitError(Exception):
    """run_tools reached max_steps and the model still asked for tools. `answer` holds everything so far: the
    messages (the last tool calls answered, so the conversation can go on), the usage and the attempts."""

    def __init__(self, answer: Answer, max_steps: int) -> None:
        super().__init__(
            f"the model still asked for tools after {max_steps} calls (max_steps); raise max_steps, or go on from "
            "the error's .answer.messages"
        )
        self.answer = answer
        self.max_steps = max_steps

    def __reduce__(self) -> tuple[type[StepLimitError], tuple[Answer, int]]:
        return type(self), (self.answer, self.max_steps)  # as LLMRelayError's: Exception's passes the text alone


class ContextBudgetError(Exception):
    """A conversation does not fit its token budget even with only its system messages and its last turn."""

    def __init__(self, tokens: int, budget_tokens: int) -> None:
        super().__init__(
            f"the conversation needs {tokens} tokens with only its system messages and its last turn, over its "
            f"budget of {budget_tokens}: shorten the last message or the system prompt, or raise budget_tokens"
        )
        self.tokens = tokens
        self.budget_tokens = budget_tokens
        self.answer: Answer | None = None
        """Set when the error ended a run_tools: the run so far, as LLMRelayError's."""

    def __reduce__(self) -> tuple[type[ContextBudgetError], tuple[int, int], dict[str, Answer | None]]:
        return type(self), (self.tokens, self.budget_tokens), {"answer": self.answer}  # as LLMRelayError's


@dataclass
class Answer:
    """What run_tools ends with: the last call's answer, and the sums over every call it made."""

    response: pb.CompleteResponse
    """The last call's answer (its message has no tool calls)."""
    messages: list[pb.Message]
    """The whole conversation: the messages given, then each assistant message and the tool results it asked for."""
    steps: int
    """How many calls to the model were made."""
    usage: pb.Usage = field(default_factory=pb.Usage)
    """The usage of every call, summed (cost included; `estimated` when any call's was)."""
    attempts: list[pb.Attempt] = field(default_factory=list)
    """Every attempt of every call, in order."""

    @property
    def message(self) -> pb.Message:
        return self.response.message

    @property
    def content(self) -> str:
        return self.response.message.content

    @property
    def finish_reason(self) -> pb.FinishReason.ValueType:
        return self.response.finish_reason

    @property
    def backend(self) -> str:
        return self.response.backend


# --- tools ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredTool:
    """A function the model may call, with the JSON Schema of its arguments."""

    name: str
    function: Callable[..., Any]
    parameters: Mapping[str, Any]
    description: str | None = None
    strict: bool | None = None
    derived: bool = False
    """Whether the schema was derived from the type hints (then arguments are converted back to dataclasses)."""

    def definition(self) -> pb.Tool:
        return pb.Tool(
            function=pb.FunctionDefinition(
                name=self.name,
                description=self.description,
                strict=self.strict,
                parameters_json=json.dumps(self.parameters),
            )
        )


class Tools:
    """The functions a model may call, by name. Each function's JSON Schema comes from its type hints (str, int,
    float, bool, list[...], tuple[...], dict, dict[str, ...], Literal, Optional, a TypedDict or a dataclass;
    Annotated[T, "text"] describes a parameter) and its docstring describes it; or give `parameters` (a JSON Schema)
    yourself. The model's arguments are checked against the hints (a call whose arguments do not fit is answered with
    what is wrong, each problem at its path). Functions may be plain or async.

    >>> tools = Tools()
    >>> @tools.register
    ... def weather(city: str, unit: Literal["c", "f"] = "c") -> str:
    ...     '''The weather in a city now.'''
    ...     return f"18 degrees {unit} in {city}"
    >>> answer = client.run_tools([user_message("Weather in Oslo?")], tools)
    """

    def __init__(self, *functions: Callable[..., Any]) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        for function in functions:
            self.register(function)

    @overload
    def register(
        self,
        function: ToolFunction,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        strict: bool | None = None,
    ) -> ToolFunction: ...

    @overload
    def register(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        strict: bool | None = None,
    ) -> Callable[[ToolFunction], ToolFunction]: ...

    def register(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        strict: bool | None = None,
    ) -> Any:
        """Adds a function, as `@tools.register`, `@tools.register(name=..., parameters=...)` or
        `tools.register(f)`; returns it unchanged. name: the function's name by default; description: its
        docstring by default."""

        def add(function: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or function.__name__
            if tool_name in self._tools:
                raise ValueError(f"a tool named {tool_name!r} is registered already")
            self._tools[tool_name] = RegisteredTool(
                name=tool_name,
                function=function,
                parameters=parameters if parameters is not None else parameters_schema(function),
                description=description if description is not None else inspect.getdoc(function),
                strict=strict,
                derived=parameters is None,
            )
            return function

        return add(function) if function is not None else add

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __getitem__(self, name: str) -> RegisteredTool:
        return self._tools[name]

    def definitions(self) -> list[pb.Tool]:
        """The tools as the request's `tools` option."""
        return [tool.definition() for tool in self._tools.values()]

    def run(self, call: pb.ToolCall) -> pb.Message:
        """The tool message answering a call: the function's result, or what went wrong (an unknown tool, arguments
        that are not JSON or do not fit, the exception the function raised). An async function runs in an event loop
        of its own (asyncio.run), so call this outside of one, as Client.run_tools does from its threads."""
        return self._run_within(call, None)

    def _run_within(
        self, call: pb.ToolCall, timeout: float | None, given_up: concurrent.futures.Future[pb.Message] | None = None
    ) -> pb.Message:
        """As run; an async function still running after timeout seconds, or once given_up is cancelled (the run
        that waits for it interrupted), is cancelled (in its own event loop, so from its own thread) and the call
        answered that it did not finish."""
        prepared = self._prepare(call)
        if isinstance(prepared, str):
            return tool_result(call, prepared)
        tool, arguments = prepared
        called = _called(call, tool.function, arguments)
        if isinstance(called, pb.Message):
            return called
        answering = _answer(call, called)
        return asyncio.run(_within(call, answering if given_up is None else _unless(given_up, answering), timeout))

    def run_all(self, calls: Sequence[pb.ToolCall], timeout: float | None = None) -> list[pb.Message]:
        """The tool messages answering calls, run at once, each in a thread of its own; a call still running after
        timeout seconds is answered that it did not finish (an async function is cancelled). A plain function's
        thread is left to end by itself (Python cannot stop one), a daemon thread, so that a tool that never returns
        does not hold the interpreter's exit either."""
        futures: list[concurrent.futures.Future[pb.Message]] = [concurrent.futures.Future() for _ in calls]
        try:
            for call, future in zip(calls, futures, strict=True):
                self._start(call, future, timeout)
            return _settled(futures, calls, timeout)
        except BaseException:  # Ctrl-C: the async functions still running are cancelled
            _give_up(futures)
            raise

    def _start(self, call: pb.ToolCall, future: concurrent.futures.Future[pb.Message], timeout: float | None) -> None:
        """Runs a call in a daemon thread of its own, with the caller's context variables (a copy each: a context runs
        in one thread at a time), as AsyncClient's tools have them; its answer set on future; cancelling future
        (_give_up) cancels an async function still running."""
        answer = functools.partial(self._run_within, call, timeout, future)
        _in_a_thread_of_its_own(functools.partial(contextvars.copy_context().run, _settle, future, answer))

    async def arun_all(self, calls: Sequence[pb.ToolCall], timeout: float | None = None) -> list[pb.Message]:
        """As run_all, from an event loop (arun's way); a call past timeout is cancelled (a plain function's thread
        is left to end by itself)."""
        return list(await asyncio.gather(*(_within(call, self.arun(call), timeout) for call in calls)))

    async def arun(self, call: pb.ToolCall) -> pb.Message:
        """As run, from an event loop: async functions are awaited, plain ones run in a daemon thread of their own
        (as run_all's), so that a blocking tool stops neither the loop, nor, once past its timeout, the loop's
        default executor (asyncio.to_thread's threads, which its getaddrinfo needs too) or asyncio.run's end."""
        prepared = self._prepare(call)
        if isinstance(prepared, str):
            return tool_result(call, prepared)
        tool, arguments = prepared
        if inspect.iscoroutinefunction(tool.function):
            return await _answer(call, tool.function(**arguments))
        called = await _in_a_thread(functools.partial(_called, call, tool.function, arguments))
        return called if isinstance(called, pb.Message) else await _answer(call, called)

    def _prepare(self, call: pb.ToolCall) -> tuple[RegisteredTool, dict[str, Any]] | str:
        """The tool and its keyword arguments, or the error text of a call that cannot run."""
        name = call.function.name
        tool = self._tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; the tools are: {', '.join(self._tools) or 'none'}"
        try:
            # Whitespace alone is no arguments, as in the Go and TypeScript SDKs; NaN and Infinity, which Python's
            # reader takes, are no JSON (json.JSONDecodeError is a ValueError, as _no_json's is).
            arguments = json.loads(call.function.arguments.strip() or "{}", parse_constant=_no_json)
        except ValueError as exc:
            return f"error: the arguments of {name!r} are not valid JSON ({exc})"
        except RecursionError:  # valid JSON nested deeper than Python's reader goes: the gateway passes such text on
            return f"error: the arguments of {name!r} are nested too deeply to read"
        if not isinstance(arguments, dict):  # said in JSON's words, as the Go and TypeScript SDKs say it
            return f"error: the arguments of {name!r} must be a JSON object, not {_kind(arguments)}"
        if tool.derived:  # every parameter is named and hinted: checked as an object of those properties is
            try:  # every problem said at once, in the TypeScript SDK's words, as an object's nested in them are
                return tool, _fields(*_keyword_fields(tool.function), arguments, "")
            except _Misfit as exc:
                return f"error: invalid arguments for {name!r}: {exc}"
        try:
            inspect.signature(tool.function).bind(**arguments)
        except TypeError as exc:
            return f"error: invalid arguments for {name!r}: {exc}"
        except ValueError:  # no signature to check them against (a builtin's, as `max`): the call itself will say
            pass
        return tool, arguments


def _digits(value: int) -> str:
    """How long an integer is, in digits, without writing it (Python refuses to write one of over 4,300)."""
    return f"about {round(abs(value).bit_length() * math.log10(2))} digits"


def _no_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def tool_result(call: pb.ToolCall, content: str) -> pb.Message:
    """The tool message that answers a call. Surrogates in content, which UTF-8 cannot hold (a file name's bytes
    that are no UTF-8, as os.fsdecode gives them), become U+FFFD: a protobuf string refuses them, and a tool's text
    must not end the loop."""
    return pb.Message(
        role=pb.ROLE_TOOL, content=_SURROGATES.sub("\ufffd", content), tool_call_id=call.id, name=call.function.name
    )


_SURROGATES: Final = re.compile("[\ud800-\udfff]")


async def _answer(call: pb.ToolCall, awaitable: Awaitable[Any]) -> pb.Message:
    """The tool message of an awaited result, or of what it raised: a CancelledError too, unless this task is being
    cancelled (then it is the run's, or tool_timeout's, and goes on)."""
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return tool_result(call, _failure(exc))
    except Exception as exc:  # a tool's failure is the model's to read, not the loop's end
        return tool_result(call, _failure(exc))
    return tool_result(call, _result_text(result))


async def _within(call: pb.ToolCall, answering: Awaitable[pb.Message], timeout: float | None) -> pb.Message:
    try:
        return await asyncio.wait_for(answering, timeout)
    except TimeoutError:  # the wait's own: _answer answers a tool's exceptions, its TimeoutError too
        return tool_result(call, _unfinished(timeout))


def _called(
    call: pb.ToolCall, function: Callable[..., Any], arguments: Mapping[str, Any]
) -> pb.Message | Awaitable[Any]:
    """Calls a tool's function: the tool message of what it returned or raised, or the awaitable it returned (an
    async function's), which the caller awaits (_answer)."""
    try:
        result = function(**arguments)
    except (Exception, asyncio.CancelledError) as exc:  # a plain call has no await to cancel: the tool's own
        return tool_result(call, _failure(exc))
    return result if inspect.isawaitable(result) else tool_result(call, _result_text(result))


async def _in_a_thread(work: Callable[[], _Result]) -> _Result:
    """work() in a daemon thread of its own (with this task's context variables, as asyncio.to_thread gives them),
    awaited: a plain tool runs so from an event loop. Not in the loop's default executor (asyncio.to_thread's): a
    tool that never returns, once past tool_timeout (the wait cancelled, the thread left to end by itself), would
    keep a worker of it, which later tools, the loop's getaddrinfo and asyncio.run's end then wait for."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_Result] = loop.create_future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome = functools.partial(_set_result, done, context.run(work))
        except BaseException as exc:  # SystemExit and the like, which reach the loop (_called answers the rest)
            outcome = functools.partial(_set_exception, done, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits for this answer any more
            loop.call_soon_threadsafe(outcome)

    _in_a_thread_of_its_own(run)
    return await done


def _in_a_thread_of_its_own(work: Callable[[], None]) -> None:
    """Runs work in a daemon thread of its own, as each tool call runs (both clients'): one that never returns
    (Python cannot stop a thread) then holds no pool's worker that other calls need, nor the interpreter's exit."""
    threading.Thread(target=work, name="llmrelay-tool", daemon=True).start()


def _set_result(future: asyncio.Future[_Result], result: _Result) -> None:
    if not future.done():  # cancelled: given up (tool_timeout, or the run cancelled)
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _settle(future: concurrent.futures.Future[pb.Message], answer: Callable[[], pb.Message]) -> None:
    try:
        try:
            future.set_result(answer())
        except BaseException as exc:  # answer answers a tool's Exceptions; SystemExit and the like reach the loop
            future.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # given up (_give_up): nobody waits for this answer any more
        pass


async def _unless(given_up: concurrent.futures.Future[pb.Message], answering: Awaitable[pb.Message]) -> pb.Message:
    """answering, cancelled once given_up is (from the thread that gives it up: the loop is this thread's)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None

    def cancel(future: concurrent.futures.Future[pb.Message]) -> None:
        if future.cancelled():
            with contextlib.suppress(RuntimeError):  # the loop closed: the tool ended meanwhile
                loop.call_soon_threadsafe(task.cancel)

    given_up.add_done_callback(cancel)
    return await answering


def _give_up(futures: Sequence[concurrent.futures.Future[pb.Message]]) -> None:
    """Cancels the futures of calls not answered yet: their async functions are cancelled (_unless); a plain
    function's thread is left to end by itself."""
    for future in futures:
        future.cancel()


_SIGNALS_HEARD_S: Final = 0.1
"""How often a wait for tools' threads wakes, so that the main thread runs a signal's handler (Ctrl-C's)."""


def _settled(
    futures: Sequence[concurrent.futures.Future[pb.Message]], calls: Sequence[pb.ToolCall], timeout: float | None
) -> list[pb.Message]:
    """The answers of calls started in threads, once done or after timeout seconds. Waited for a tenth of a second at
    a time, as gRPC's blocking calls wait: Python runs a signal's handler in the main thread alone, at its next
    instruction, and one blocked on a lock without a timeout runs none until the lock is released. Ctrl-C that came
    just as the wait began, or was delivered to a tool's thread (any thread may take a process's signal), left the run
    waiting for ever on a tool that never ends (about 1 run in 400 under load)."""
    until = None if timeout is None else time.monotonic() + timeout
    while True:
        left = _SIGNALS_HEARD_S if until is None else min(_SIGNALS_HEARD_S, until - time.monotonic())
        _, running = concurrent.futures.wait(futures, timeout=max(left, 0.0))
        if not running or (until is not None and time.monotonic() >= until):
            break
    return [
        future.result() if future.done() else tool_result(call, _unfinished(timeout))
        for future, call in zip(futures, calls, strict=True)
    ]


def _answered_so_far(
    running: Sequence[asyncio.Future[pb.Message] | concurrent.futures.Future[pb.Message]], calls: Sequence[pb.ToolCall]
) -> list[pb.Message]:
    """The answers of calls whose run is cancelled (or interrupted) while they run: each finished call's result,
    and for any other that it was cancelled."""
    return [
        future.result()
        if future.done() and not future.cancelled() and future.exception() is None
        else tool_result(call, CANCELLED_RESULT)
        for future, call in zip(running, calls, strict=True)
    ]


CANCELLED_RESULT: Final = "error: the run was cancelled before the tool finished"
"""The result of a call whose run_tools was cancelled while it ran."""


def _unfinished(timeout: float | None) -> str:
    return f"error: the tool did not finish within {timeout:g} s"


def _failure(exc: BaseException) -> str:
    """What a tool raised, as its error result; never raising itself (an exception whose str() raises ended the run,
    the step's other results lost): then its repr, or its type's name alone."""
    try:
        said = str(exc)
    except Exception:
        try:
            said = repr(exc)
        except Exception:
            said = "(an exception that cannot be written)"
    return f"error: {type(exc).__name__}: {said}"


def _result_text(result: Any) -> str:
    """A tool's result as the tool message's content: text as it is, anything else as JSON (or, when JSON cannot
    hold it, an error that says so: the loop goes on, as for a tool that raises)."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, default=_jsonable, allow_nan=False)  # NaN and Infinity are no JSON
    # Keys not text or numbers, a value holding itself, depth; or what a value raised as it was read (a dataclass's
    # field never set, a property that fails): the call answered that, not the loop ended with its results lost.
    except Exception as exc:
        return f"error: the tool's result cannot be written as JSON ({_failure(exc).removeprefix('error: ')})"


def _jsonable(value: Any) -> Any:
    """What json.dumps writes for a value it does not know: a dataclass as an object, the types the Go and
    TypeScript SDKs' encoders write as text as text, an Enum as its value. Anything else (a set, bytes, an object)
    raises, for an error result: its str() ("<Foo object at 0x..>", "{1, 2}") tells the model nothing true."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime.date | datetime.time):  # a datetime is a date
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID | decimal.Decimal | pathlib.PurePath):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")  # json's own words


# --- JSON Schemas from type hints ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)  # read once a tool, not at each of its calls
def _keyword_fields(function: Callable[..., Any]) -> tuple[dict[str, Any], set[str]]:
    """A derived tool's parameters as an object's fields (`_fields`): each one's hint, and those without a default."""
    hints = get_type_hints(function, include_extras=True)
    parameters = inspect.signature(function).parameters
    return (
        {name: hints[name] for name in parameters},
        {name for name, parameter in parameters.items() if parameter.default is inspect.Parameter.empty},
    )


def parameters_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON Schema of a function's keyword arguments, from its type hints; required: those without a default."""
    hints = get_type_hints(function, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"tool {function.__name__}: *{name} has no JSON Schema; give parameters= instead")
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"tool {function.__name__}: **{name} has no JSON Schema; give parameters= instead")
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:  # the model's arguments come by name
            raise TypeError(
                f"tool {function.__name__}: parameter {name!r} is positional-only, and a tool is called with keyword "
                "arguments; drop the / from its signature"
            )
        if name not in hints:
            raise TypeError(f"tool {function.__name__}: parameter {name!r} needs a type hint (or give parameters=)")
        properties[name] = json_schema_of(hints[name])
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_SCALARS: Final[Mapping[Any, str]] = {str: "string", bool: "boolean", int: "integer", float: "number"}


def json_schema_of(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a type hint (see Tools for the types understood)."""
    return _schema_of(hint, ())


def _schema_of(hint: Any, within: tuple[type, ...]) -> dict[str, Any]:
    """As json_schema_of; within: the TypedDicts and dataclasses whose schemas this one is part of (one that holds
    itself has no schema without $ref, which the gateway's upstreams do not all take: Go's SDK refuses it too)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        schema = _schema_of(args[0], within)
        texts = [a for a in args[1:] if isinstance(a, str)]
        return {**schema, "description": " ".join(texts)} if texts else schema
    if origin in (Required, NotRequired):  # a TypedDict's key marked so: __required_keys__ holds what they say
        return _schema_of(args[0], within)
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint is type(None):
        return {"type": "null"}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(arg, within) for arg in args]}
    if origin is Literal:
        kinds = {_SCALARS.get(type(value)) for value in args}
        if len(kinds) == 1 and None not in kinds:
            return {"type": kinds.pop(), "enum": list(args)}
        return {"enum": list(args)}
    if origin is tuple and args and not _homogeneous(args):
        # tuple[str, int]: each place its own type, and just so many (a tool is given a tuple).
        items = [_schema_of(arg, within) for arg in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if hint in (list, tuple, Sequence) or origin in (list, tuple, Sequence):
        return {"type": "array", "items": _schema_of(args[0], within)} if args else {"type": "array"}
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if args and args[0] not in (str, Any):  # dict[int, str]'s keys would come as text: 1 as "1"
            raise TypeError(f"no JSON Schema for {hint!r}: JSON's keys are text; use dict[str, ...]")
        if len(args) == 2 and args[1] is not Any:  # dict[str, Place]: each value a Place (JSON's keys are text)
            return {"type": "object", "additionalProperties": _schema_of(args[1], within)}
        return {"type": "object"}
    if (is_typeddict(hint) or dataclasses.is_dataclass(hint)) and hint in within:
        raise TypeError(f"{hint.__qualname__} refers to itself: give the tool's parameters= yourself")
    if is_typeddict(hint) or (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
        fields, required = _properties(hint)
        return _object_schema(hint, fields, [name for name in fields if name in required], within)
    raise TypeError(
        f"no JSON Schema for {hint!r}: use str, int, float, bool, list[...], tuple[...], dict, Literal, Optional, a "
        "TypedDict or a dataclass, or give the tool's parameters= yourself"
    )


def _properties(cls: Any) -> tuple[dict[str, Any], set[str]]:
    """A TypedDict's or a dataclass's properties (a dataclass's: its __init__'s fields), with their hints, and the
    required ones."""
    hints = get_type_hints(cls, include_extras=True)
    if is_typeddict(cls):
        # Python 3.11 leaves a key's Required or NotRequired out of __required_keys__ where the annotations are text
        # (`from __future__ import annotations`): the marker, where there is one, decides.
        required = {
            name
            for name, item in hints.items()
            if get_origin(item) is Required or (name in cls.__required_keys__ and get_origin(item) is not NotRequired)
        }
        return hints, required
    given = [f for f in dataclasses.fields(cls) if f.init]
    return {f.name: hints[f.name] for f in given}, {
        f.name for f in given if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def _object_schema(
    cls: type, fields: Mapping[str, Any], required: list[str], within: tuple[type, ...]
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: _schema_of(hint, (*within, cls)) for name, hint in fields.items()},
        "required": required,
        "additionalProperties": False,
    }
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not the dataclass's generated signature
        schema["description"] = inspect.cleandoc(cls.__doc__)
    return schema


def _homogeneous(args: tuple[Any, ...]) -> bool:
    """Whether a tuple's type arguments are of the form tuple[T, ...]: any number of one type."""
    return len(args) == 2 and args[1] is Ellipsis


class _Misfit(Exception):
    """An argument that does not fit its parameter's type hint: the problem, after the value's path
    ("items[1].name: expected a string, got a number"), for the model to correct."""


def _from_json(hint: Any, value: Any, path: str) -> Any:
    """A JSON value as the type hint asks, checked against it (the schema the model was given says as much, but a
    model may not keep to it): dataclasses built from objects (nested too, their own checks kept), ints as floats for
    float, an integral number (3.0) as an int for int, as JSON Schema's "integer" takes it, lists as tuples for tuple.
    Raises _Misfit where it does not fit; Any, as is."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Annotated, Required, NotRequired):
        return _from_json(args[0], value, path)
    if hint is Any:
        return value
    if hint is str or hint is bool or hint is type(None):
        if type(value) is hint:  # not a bool for a str, nor an int for a bool
            return value
        raise _misfit(path, {str: "a string", bool: "a boolean"}.get(hint, "null"), value)
    if hint is int or hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _misfit(path, "an integer" if hint is int else "a number", value)
        if isinstance(value, int):  # as many digits as the model wrote: Python's ints have no bound, floats have
            if hint is int:
                return value
            try:
                return float(value)
            except OverflowError:
                raise _Misfit(
                    _at(path, f"expected a number a float holds, got an integer of {_digits(value)}")
                ) from None
        if not math.isfinite(value):  # 1e400, which Python's reader takes as inf
            raise _Misfit(_at(path, f"expected a finite number, got {value}"))
        if hint is float:
            return value
        if not value.is_integer():
            raise _Misfit(_at(path, f"expected an integer, got {value}"))
        return int(value)
    if origin is Literal:
        # type and value alike: True is no 1, 1.0 no 1.
        if any(type(value) is type(member) and value == member for member in args):
            return value
        got = json.dumps(value) if isinstance(value, str | int | float | bool) or value is None else _kind(value)
        raise _Misfit(_at(path, f"expected one of {', '.join(json.dumps(member) for member in args)}, got {got}"))
    if origin in (Union, types.UnionType):
        # A member of the value's own type first (5 stays 5 for float | int, 3.0 a float for int | float), then the
        # first member it fits.
        members = sorted(args, key=lambda member: member is not type(value))
        problems = []
        for member in members:
            try:
                return _from_json(member, value, path)
            except _Misfit as exc:
                problems.append(str(exc))
        raise _Misfit(_none_fits(problems, value, path))
    if hint in (list, Sequence) or origin in (list, Sequence):
        items = _array(value, path)
        return _all_fit(((args[0], item, f"{path}[{i}]") for i, item in enumerate(items))) if args else items
    if hint is tuple or origin is tuple:
        items = _array(value, path)
        if not args:
            return tuple(items)
        if _homogeneous(args):
            return tuple(_all_fit(((args[0], item, f"{path}[{i}]") for i, item in enumerate(items))))
        if len(items) != len(args):
            raise _Misfit(_at(path, f"expected an array of {len(args)} items, got {len(items)}"))
        places = enumerate(zip(args, items, strict=True))
        return tuple(_all_fit((arg, item, f"{path}[{i}]") for i, (arg, item) in places))
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        properties = _object(value, path)
        if len(args) == 2:
            values = _all_fit((args[1], item, _property(path, key)) for key, item in properties.items())
            return dict(zip(properties, values, strict=True))
        return properties
    if is_typeddict(hint):
        return _fields(*_properties(hint), _object(value, path), path)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        arguments = _fields(*_properties(hint), _object(value, path), path)
        try:
            return hint(**arguments)
        except Exception as exc:  # the dataclass's own checks (__post_init__)
            raise _Misfit(_at(path, f"{type(exc).__name__}: {exc}")) from exc
    return value  # no other hint has a schema (json_schema_of): a tool given parameters= is not converted


def _none_fits(problems: list[str], value: Any, path: str) -> str:
    """What is wrong with a value that fits none of a Union's members: "expected a string or null, got a number"
    where it is of none of their kinds, else the problem inside the one member that is not null (Optional[X]'s X),
    else each member's problem."""
    problems = list(dict.fromkeys(problems))
    expected, got = _at(path, "expected "), f", got {_kind(value)}"
    if all(problem.startswith(expected) and problem.endswith(got) for problem in problems):
        return _at(path, f"expected {' or '.join(p[len(expected) : -len(got)] for p in problems)}{got}")
    problems = [problem for problem in problems if problem != _at(path, f"expected null{got}")]
    return problems[0] if len(problems) == 1 else _at(path, f"fits none of its types: {'; '.join(problems)}")


def _fields(fields: Mapping[str, Any], required: set[str], value: dict[str, Any], path: str) -> dict[str, Any]:
    """An object's properties, each checked against its field's hint: the required ones there, no others."""
    problems = [
        _at(path, f"the required property {json.dumps(name)} is missing")
        for name in fields
        if name in required and name not in value
    ]
    known = f"the properties are: {', '.join(fields)}" if fields else "it takes none"
    problems += [_at(path, f"there is no property {json.dumps(key)} ({known})") for key in value if key not in fields]
    values = _checked(
        ((fields[key], item, _property(path, key)) for key, item in value.items() if key in fields), problems
    )
    if problems:
        raise _Misfit("; ".join(problems))
    return dict(zip((key for key in value if key in fields), values, strict=True))


def _checked(values: Iterable[tuple[Any, Any, str]], problems: list[str]) -> list[Any]:
    """Each (hint, value, path)'s value as _from_json makes it; the problems of those that do not fit added to
    problems, every one (so that the model can correct them in one call, as the TypeScript SDK's checks say them)."""
    converted = []
    for hint, value, path in values:
        try:
            converted.append(_from_json(hint, value, path))
        except _Misfit as exc:
            problems.append(str(exc))
    return converted


def _all_fit(values: Iterable[tuple[Any, Any, str]]) -> list[Any]:
    """As _checked, raising their problems, if any, at once."""
    problems: list[str] = []
    converted = _checked(values, problems)
    if problems:
        raise _Misfit("; ".join(problems))
    return converted


def _array(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _misfit(path, "an array", value)
    return value


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _misfit(path, "an object", value)
    return value


def _misfit(path: str, expected: str, value: Any) -> _Misfit:
    return _Misfit(_at(path, f"expected {expected}, got {_kind(value)}"))


def _at(path: str, problem: str) -> str:
    """A problem at a path, or the bare problem at the top (the TypeScript SDK's words)."""
    return f"{path}: {problem}" if path else problem


def _kind(value: Any) -> str:
    """What a JSON value is, for a problem's "got ..." (or arguments' "not ..."), in JSON's words (the model knows no
    Python types)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


_PLAIN_NAME: Final = re.compile(r"[A-Za-z_$][\w$-]*")


def _property(path: str, key: str) -> str:
    """A property's path: its name as it is when it reads plainly, else as a JSON string."""
    name = key if _PLAIN_NAME.fullmatch(key) else json.dumps(key)
    return f"{path}.{name}" if path else name


# --- the loop's bookkeeping ----------------------------------------------------------------------------------------


class _Steps:
    """The state of one run_tools: the messages so far, each answer's usage and attempts summed, the step limit."""

    def __init__(self, messages: list[pb.Message], max_steps: int) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, not {max_steps}")
        self.messages = messages
        self.max_steps = max_steps
        self._steps = 0
        self._usage = pb.Usage()
        self._attempts: list[pb.Attempt] = []
        self._last = pb.CompleteResponse()

    def record(self, response: pb.CompleteResponse) -> list[pb.ToolCall]:
        """Adds one call's answer; returns the tool calls to run (none: the loop is done). The message goes last, so
        that an answer in the messages is an answer recorded."""
        self._steps += 1
        self._last = response
        if response.HasField("usage"):
            add_usage(self._usage, response.usage)
        self._attempts.extend(response.attempts)
        self.messages.append(response.message)
        return list(response.message.tool_calls)

    def take(self, response: pb.CompleteResponse, tools: Tools, timeout: float | None) -> bool:
        """For Client.run_tools: records an answer and runs its calls in threads (Tools.run_all's way), adding their
        results; False when it asks for none (the loop is done). Interrupted from the moment the answer is in the
        messages (Ctrl-C: KeyboardInterrupt, which may land while a tool's thread starts as well as while the tools
        run), it answers every call before the interruption goes on, one not finished that it was cancelled."""
        calls = list(response.message.tool_calls)
        running: list[concurrent.futures.Future[pb.Message]] = [concurrent.futures.Future() for _ in calls]
        try:
            self.record(response)
            if not calls:
                return False
            for call, future in zip(calls, running, strict=True):
                tools._start(call, future, timeout)
            results = _settled(running, calls, timeout)
        except BaseException:
            if self.messages and self.messages[-1] is response.message:  # interrupted after the answer was recorded
                self.messages.extend(_answered_so_far(running, calls))
            _give_up(running)
            raise
        self.add_results(results)
        return True

    async def arun_calls(self, tools: Tools, calls: Sequence[pb.ToolCall], timeout: float | None) -> None:
        """Runs the last answer's calls (Tools.arun_all's way) and adds their results. Cancelled meanwhile, it answers
        every call all the same before the cancellation goes on, a call still running that it was cancelled: an
        answer whose calls have no results is a conversation no model takes, and the caller may want to go on.
        (Cancellation lands only at an await, so nothing comes between recording the answer and this.)"""
        running = [asyncio.ensure_future(_within(call, tools.arun(call), timeout)) for call in calls]
        try:
            results = await asyncio.gather(*running)
        except BaseException:  # cancelled, or a tool's KeyboardInterrupt or SystemExit, which gather leaves the rest to
            for task in running:
                task.cancel()
            self.messages.extend(_answered_so_far(running, calls))
            raise
        self.add_results(results)

    def add_results(self, results: Iterable[pb.Message]) -> None:
        """Adds the tool results of the last answer; raises StepLimitError when no call may follow."""
        self.messages.extend(results)
        if self._steps >= self.max_steps:
            raise StepLimitError(self.answer(), self.max_steps)

    @contextlib.contextmanager
    def kept_on_error(self) -> Iterator[None]:
        """A model call, or the fitting of the conversation before it, whose error carries the run so far as its
        `answer`: the tools that ran had their effects, and a run started again would run them again."""
        try:
            yield
        except (LLMRelayError, ContextBudgetError) as error:
            error.answer = self.answer()
            raise

    def answer(self) -> Answer:
        return Answer(
            response=self._last,
            messages=self.messages,
            steps=self._steps,
            usage=self._usage,
            attempts=list(self._attempts),
        )


def add_usage(total: pb.Usage, usage: pb.Usage) -> None:
    """Adds one answer's usage to a total: tokens and cost summed, `estimated` and `price_unknown` when any was."""
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.total_tokens += usage.total_tokens
    total.estimated = total.estimated or usage.estimated
    if usage.HasField("reasoning_tokens"):
        total.reasoning_tokens = total.reasoning_tokens + usage.reasoning_tokens
    if usage.HasField("cached_prompt_tokens"):
        total.cached_prompt_tokens = total.cached_prompt_tokens + usage.cached_prompt_tokens
    if usage.HasField("cache_write_prompt_tokens"):
        total.cache_write_prompt_tokens = total.cache_write_prompt_tokens + usage.cache_write_prompt_tokens
    total.cost.usd_micros += usage.cost.usd_micros
    total.cost.estimated = total.cost.estimated or usage.cost.estimated
    total.cost.price_unknown = total.cost.price_unknown or usage.cost.price_unknown


# --- the conversation ----------------------------------------------------------------------------------------------


class Conversation:
    """The messages of a chat, kept for the next call: add to it, pass it to run_tools (which appends the answers
    and tool results to it), and with a `budget_tokens` let the client fit it (client.fit(conversation), which
    run_tools does before each call): the oldest turns go first, counted by the gateway's CountTokens.

    A turn is a user message and everything after it up to the next user message, so an assistant's tool calls
    always go with their results. System messages stay, and so does the last turn.

    budget_tokens: the most tokens the messages may take, e.g. the model's context window less the answer's
    max_tokens. model: the model whose tokenizer counts (the default chain's first model when unset).
    """

    def __init__(
        self,
        messages: Iterable[MessageLike] = (),
        *,
        budget_tokens: int | None = None,
        model: str | None = None,
    ) -> None:
        if budget_tokens is not None and budget_tokens < 0:
            # A context window less an answer's max_tokens gone below 0: fit() would drop every turn but the last,
            # then fail, the history gone; as the TypeScript SDK refuses it.
            raise ValueError(f"budget_tokens must be 0 or more, not {budget_tokens}")
        self.messages: list[pb.Message] = as_messages(messages)
        self.budget_tokens = budget_tokens
        self.model = model
        self.tokens: int | None = None
        """The count of the last fit that fitted (a failed fit leaves it as it was), or None before any."""

    def add(self, *messages: MessageLike) -> None:
        """Appends messages: pb.Message, or dicts of their fields ({"role": "user", "content": "Hi"})."""
        self.messages.extend(as_messages(messages, len(self.messages)))

    def add_answer(self, response: pb.CompleteResponse) -> None:
        """Appends the assistant message of an answer (Complete's or collect's)."""
        self.messages.append(response.message)

    def add_tool_results(self, results: Iterable[pb.Message]) -> None:
        self.messages.extend(results)

    def turns(self) -> list[list[pb.Message]]:
        """The non-system messages, in turns (see the class)."""
        return [[self.messages[i] for i in turn] for turn in self._turn_indices()]

    def _turn_indices(self) -> list[list[int]]:
        turns: list[list[int]] = []
        for index, message in enumerate(self.messages):
            if message.role == pb.ROLE_SYSTEM:
                continue
            if message.role == pb.ROLE_USER or not turns:
                turns.append([])
            turns[-1].append(index)
        return turns

    @contextlib.contextmanager
    def _fitting(self) -> Iterator[None]:
        """A fit that fails (its last turn alone over the budget, a count refused) leaves the messages as they were:
        the turns it had dropped would be lost to a caller who then raises the budget or shortens the last turn."""
        messages, tokens = list(self.messages), self.tokens
        try:
            yield
        except BaseException:
            self.messages[:] = messages
            self.tokens = tokens
            raise

    def trim(self, tokens: int) -> bool:
        """Given the conversation's token count: True when it fits the budget; otherwise drops the oldest turn and
        returns False (count again), or raises ContextBudgetError when only the system messages and the last turn
        are left. client.fit(conversation) runs it until it fits, and puts back what it dropped when it does not."""
        self.tokens = tokens
        if self.budget_tokens is None or tokens <= self.budget_tokens:
            return True
        turns = self._turn_indices()
        if len(turns) <= 1:
            raise ContextBudgetError(tokens, self.budget_tokens)
        oldest = set(turns[0])
        self.messages[:] = [message for index, message in enumerate(self.messages) if index not in oldest]
        return False
