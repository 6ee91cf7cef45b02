"""What the interceptors share: the shapes of a handler and of the rest of the chain, and the wrappings of handlers
each makes once.

A server interceptor of grpc.aio is asked for each call's handler as soon as the call's headers have come; the handler
it returns runs once the request has come too (for a method that takes one message), which may be any time later."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

import grpc

# The stubs make these generic; at run time they are not, so the aliases are strings.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

MAX_WRAPPED_HANDLERS: Final = 256
"""Handlers wrapped once and kept; past this many (which no gateway of ours reaches: a few per method), a handler is
wrapped for its call alone."""


class Wrappings:
    """An interceptor's wrappings of the handlers that reach it, made once and kept by method and handler: those are
    the same few objects call after call (a service's own, and the inner interceptors' wrappings of them, each made
    once; a method's calls may bring several by turns, its caller's limits' and its own), so a call pays a lookup
    rather than a new handler and its closures. Each kept with its handler, so that the handler's id is no other's."""

    __slots__ = ("_kept", "_wrap")

    def __init__(self, wrap: Callable[[Handler, str], Handler]) -> None:
        self._wrap = wrap
        """A handler and its method ("/package.Service/Method") -> its wrapping."""
        self._kept: dict[tuple[str, int], tuple[Handler, Handler]] = {}

    def of(self, handler: Handler, method: str) -> Handler:
        """The wrapping of `handler`, a handler of `method`."""
        kept = self._kept.get((method, id(handler)))
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._wrap(handler, method)
        if len(self._kept) < MAX_WRAPPED_HANDLERS:
            self._kept[method, id(handler)] = (handler, wrapped)
        return wrapped
