"""The bound on calls in progress at once (server.max_concurrent_rpcs), for the gateway's own service only.

gRPC's server has such a bound (`maximum_concurrent_rpcs`), but over every service it serves: a gateway at its bound
refused its health probes too (grpc.health.v1), and was restarted or taken out of its load balancer for being busy.
It refused with a bare RESOURCE_EXHAUSTED, no reason and no delay to retry after, so that a caller could not tell it
from a limit. Here the bound holds for llmrelay.v1.LLMService alone (its Health probe aside), and a call past it gets
the contract's answer: RESOURCE_EXHAUSTED, reason CONCURRENT_CALLS_EXCEEDED, a QuotaFailure and a RetryInfo.

It sits after the observing interceptor (refusals are counted and logged as every other call) and before auth and
limits: a call refused here costs no key lookup and reserves nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from llmrelay_server.domain import LimitExceededError, LimitKind
from llmrelay_server.handlers import Continuation, Handler, Wrappings
from llmrelay_server.health import SERVICE_NAME
from llmrelay_server.status import abort

RETRY_AFTER_S: Final = 1.0
"""When to try again: calls of a gateway end within seconds, and the caller's channel retries after this long."""

_BOUNDED_PREFIX: Final = f"/{SERVICE_NAME}/"
_HEALTH: Final = f"/{SERVICE_NAME}/Health"
"""The service's own probe (`llmrelay health --probe`), never bounded, as grpc.health.v1's is not."""


class ConcurrencyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call of the gateway's service while `most` of them are in progress."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._in_progress = 0
        self._bounded = Wrappings(self._bound)

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(_BOUNDED_PREFIX) or method == _HEALTH:
            return handler
        return self._bounded.of(handler, method)

    def _bound(self, handler: Handler, method: str) -> Handler:
        rpc = method.rpartition("/")[2]
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._bounded_stream(handler.unary_stream, rpc),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._bounded_unary(handler.unary_unary, rpc), handler.request_deserializer, handler.response_serializer
        )

    def _refusal(self) -> LimitExceededError:
        description = f"{self._most} calls in progress at once (server.max_concurrent_rpcs)"
        return LimitExceededError(LimitKind.CONCURRENT_CALLS, "gateway", description, RETRY_AFTER_S)

    def _bounded_unary(self, behavior: Any, rpc: str) -> Any:
        async def bounded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._in_progress >= self._most:
                await abort(context, rpc, self._refusal())
            self._in_progress += 1
            try:
                return await behavior(request, context)
            finally:
                self._in_progress -= 1

        return bounded

    def _bounded_stream(self, behavior: Any, rpc: str) -> Any:
        async def bounded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if self._in_progress >= self._most:
                await abort(context, rpc, self._refusal())
            self._in_progress += 1
            try:
                # Closed (the caller gone mid-write), it closes what it streams first: the slot frees as that ends.
                async with contextlib.aclosing(behavior(request, context)) as answers:
                    async for answer in answers:
                        yield answer
            finally:
                self._in_progress -= 1

        return bounded
