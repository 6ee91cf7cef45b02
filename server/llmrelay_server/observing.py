"""The one wrapping of gRPC handlers for interceptors that watch whole calls (metrics, the call log, traces).

An `ObservingInterceptor` says what to do when a call starts (`observe`, which returns the call's observer), and the
observer hears each message sent and the status the call ended with, for unary and server-streaming calls alike,
including streams written with `context.write` (grpc.health.v1's Watch), whose messages pass by unseen.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, Protocol

import grpc

from llmrelay_server.auth import Continuation, Handler
from llmrelay_server.status import ended_with

Context = grpc.aio.ServicerContext[Any, Any]

GEN_AI_OPERATIONS: Final[Mapping[str, str]] = {
    "/llmrelay.v1.LLMService/Complete": "chat",
    "/llmrelay.v1.LLMService/StreamComplete": "chat",
    "/llmrelay.v1.LLMService/Embed": "embeddings",
}
"""The model calls by method path, with their GenAI operation (gen_ai.operation.name) for metrics and traces."""


class CallObserver(Protocol):
    def sent(self, message: Any) -> None:
        """A message went to the caller."""

    def end(self, code: grpc.StatusCode) -> None:
        """The call ended with this status."""


Start = Callable[[Any, Context], CallObserver]
"""Starts observing one call: its request and context -> its observer."""


class ObservingInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    @abc.abstractmethod
    def observe(self, details: grpc.HandlerCallDetails, streaming: bool) -> Start | None:
        """How to observe the calls of this method; None leaves them alone."""

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_stream is not None:
            start = self.observe(details, streaming=True)
            if start is None:
                return handler
            behavior = handler.unary_stream
            wrapped = _stream(behavior, start) if inspect.isasyncgenfunction(behavior) else _unary(behavior, start)
            return grpc.unary_stream_rpc_method_handler(
                wrapped, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_unary is not None and (start := self.observe(details, streaming=False)) is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, start), handler.request_deserializer, handler.response_serializer
            )
        return handler  # no RPC of ours streams requests


def _unary(behavior: Any, start: Start) -> Any:
    async def observed(request: Any, context: Context) -> Any:
        call = start(request, context)
        code = grpc.StatusCode.OK
        try:
            answer = await behavior(request, context)
            if answer is not None:  # None: a stream written with context.write
                call.sent(answer)
            return answer
        except BaseException as error:
            code = ended_with(context, error)
            raise
        finally:
            call.end(code)

    return observed


def _stream(behavior: Any, start: Start) -> Any:
    async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
        call = start(request, context)
        code = grpc.StatusCode.OK
        try:
            # Closed (the caller gone mid-write), it closes what it streams first: the call ends after what it billed.
            async with contextlib.aclosing(behavior(request, context)) as answers:
                async for answer in answers:
                    call.sent(answer)
                    yield answer
        except BaseException as error:
            code = ended_with(context, error)
            raise
        finally:
            call.end(code)

    return observed
