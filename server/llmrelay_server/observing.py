"""One interceptor for whatever watches whole calls (metrics, the call log, traces): the `Observer`s.

An `Observer` says what to do when a call of a method of a given `Kind` starts (`observe`, which returns how to start
watching one), and the call's observer hears the status the call ended with and how many messages it sent, and, if it
asks to, each message as it goes; for every kind of call alike, including streams written with `context.write`
(grpc.health.v1's Watch), whose handler is given a context that counts them (`_Writes`). A call that streams requests
(server reflection's) is started with its `Requests`, which count them as its handler reads them, rather than with a
request.
The interceptor wraps a method's handler once for all of them, and once for all its calls: the handlers that reach it
are the same objects call after call (the service's own; the limits' and auth's wrappings of them, each made once), so
a call pays a lookup rather than a new handler, closures and a question to every observer.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import grpc

from llmrelay_server.decoding import COMPLETE, EMBED, STREAM_COMPLETE
from llmrelay_server.handlers import Continuation, Handler, Wrappings
from llmrelay_server.status import ended_with

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

GEN_AI_OPERATIONS: Final[Mapping[str, str]] = {COMPLETE: "chat", STREAM_COMPLETE: "chat", EMBED: "embeddings"}
"""The model calls by method path, with their GenAI operation (gen_ai.operation.name) for metrics and traces."""


class Kind(enum.StrEnum):
    """What streams in a call of a method, as go-grpc-prometheus names it (its grpc_type label)."""

    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    """Answers stream."""
    CLIENT_STREAM = "client_stream"
    """Requests stream."""
    BIDI_STREAM = "bidi_stream"
    """Requests and answers stream."""


def kind_of(handler: Handler) -> Kind:
    """The kind of the calls `handler` serves."""
    if handler.request_streaming:
        return Kind.BIDI_STREAM if handler.response_streaming else Kind.CLIENT_STREAM
    return Kind.SERVER_STREAM if handler.response_streaming else Kind.UNARY


class Requests:
    """The requests of a call that streams them, counted as its handler reads them: what the call's observers are
    started with, in place of a request. Requests read with `context.read()` instead pass by uncounted."""

    __slots__ = ("_requests", "received")

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests  # gRPC's: it makes what reads them at the first read (a refusal makes none)
        self.received = 0

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        self.received += 1
        return request


class CallObserver(Protocol):
    @property
    def sent(self) -> Callable[[Any], None] | None:
        """Hears each message that goes to the caller; None for an observer that needs only their number, which
        `end` tells: a stream's messages then cost it nothing."""

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        """The call ended with this status, having sent this many messages."""


Start = Callable[[Any, Context], CallObserver]
"""Starts observing one call: its request (its `Requests`, for a call that streams them) and context (its metadata:
`decoding.invocation_metadata(context)`) -> its observer."""


class Observer(abc.ABC):
    @abc.abstractmethod
    def observe(self, method: str, kind: Kind) -> Start | None:
        """How to observe the calls of this method ("/package.Service/Method"), of this kind; None leaves them alone.
        Asked once per method and kind of handler, not per call."""


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Has every observer watch each call, the first one outermost: it starts first and hears the end last."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)
        self._wrapped = Wrappings(self._wrap)

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        return None if handler is None else self._wrapped.of(handler, details.method)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        kind = kind_of(handler)  # first: the observers are told it
        starts = tuple(start for observer in self._observers if (start := observer.observe(method, kind)))
        if not starts:
            return handler
        decode, encode = handler.request_deserializer, handler.response_serializer
        if kind is Kind.UNARY:
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, starts), decode, encode)
        if kind is Kind.CLIENT_STREAM:
            return grpc.stream_unary_rpc_method_handler(_reading(_unary(handler.stream_unary, starts)), decode, encode)
        behavior = handler.unary_stream if kind is Kind.SERVER_STREAM else handler.stream_stream
        wrapped = _stream(behavior, starts) if inspect.isasyncgenfunction(behavior) else _written(behavior, starts)
        if kind is Kind.SERVER_STREAM:
            return grpc.unary_stream_rpc_method_handler(wrapped, decode, encode)
        return grpc.stream_stream_rpc_method_handler(_reading(wrapped), decode, encode)


def _unary(behavior: Any, starts: tuple[Start, ...]) -> Any:
    async def observed(request: Any, context: Context) -> Any:
        calls: list[CallObserver] = []
        code, messages = grpc.StatusCode.OK, 0
        try:
            _start(starts, request, context, calls)
            answer = await behavior(request, context)
            if answer is not None:  # None: a stream written with context.write
                messages = 1
                for call in calls:
                    if (hear := call.sent) is not None:
                        hear(answer)
            return answer
        except BaseException as error:
            code = ended_with(context, error)
            raise
        finally:
            _end(calls, code, messages)

    return observed


def _stream(behavior: Any, starts: tuple[Start, ...]) -> Any:
    async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
        calls: list[CallObserver] = []
        code, messages = grpc.StatusCode.OK, 0
        try:
            _start(starts, request, context, calls)
            hearing = [hear for call in calls if (hear := call.sent) is not None]
            # Closed (the caller gone mid-write), it closes what it streams first: the call ends after what it billed.
            async with contextlib.aclosing(behavior(request, context)) as answers:
                async for answer in answers:
                    messages += 1
                    for hear in hearing:
                        hear(answer)
                    yield answer
        except BaseException as error:
            code = ended_with(context, error)
            raise
        finally:
            _end(calls, code, messages)

    return observed


def _written(behavior: Any, starts: tuple[Start, ...]) -> Any:
    """`_stream`, for a stream its handler writes with `context.write` rather than yields (grpc.health.v1's Watch)."""

    async def observed(request: Any, context: Context) -> None:
        calls: list[CallObserver] = []
        code, writes = grpc.StatusCode.OK, _Writes(context)
        try:
            _start(starts, request, context, calls)
            writes.hearing = [hear for call in calls if (hear := call.sent) is not None]
            await behavior(request, writes)
        except BaseException as error:
            code = ended_with(context, error)
            raise
        finally:
            _end(calls, code, writes.messages)

    return observed


class _Writes:
    """A call's context, as its handler sees it, whose writes are counted and heard by the call's observers; the rest
    is the context's own."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.messages = 0
        self.hearing: list[Callable[[Any], None]] = []

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self.messages += 1
        for hear in self.hearing:
            hear(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _reading(observed: Any) -> Any:
    """`observed` (`_unary`'s or `_stream`'s) for a handler that reads a stream of requests: it, and the observers,
    are given them as `Requests`."""
    if not inspect.isasyncgenfunction(observed):

        async def reading(requests: AsyncIterator[Any], context: Context) -> Any:
            return await observed(Requests(requests), context)

        return reading

    async def reading_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        # Closed (the caller gone mid-write), it closes `observed`, which then ends the call as `_stream` says.
        async with contextlib.aclosing(observed(Requests(requests), context)) as answers:
            async for answer in answers:
                yield answer

    return reading_stream


def _start(starts: tuple[Start, ...], request: Any, context: Context, calls: list[CallObserver]) -> None:
    """Starts every observer on the call, into `calls` as it goes: should one fail, those before it still hear the
    end (an open-streams gauge is not left counting a call that never ran)."""
    for start in starts:
        calls.append(start(request, context))


def _end(calls: list[CallObserver], code: grpc.StatusCode, messages: int) -> None:
    """Tells every observer the call ended, the innermost first; one that fails (a bug of the gateway's own) is
    logged, and keeps neither the others from hearing it nor the caller from its answer."""
    for call in reversed(calls):
        try:
            call.end(code, messages)
        except Exception:
            log.exception("observing the end of a call failed")
