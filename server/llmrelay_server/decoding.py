"""LLMService's registration on the gRPC server, with requests that cannot be decoded answered INVALID_ARGUMENT, and
those over the message size limit RESOURCE_EXHAUSTED.

gRPC's asyncio server decodes each request before the servicer sees it, and a decoding failure (bytes that are not
the message, invalid UTF-8 in a string, nesting beyond protobuf's depth limit) escapes it as an unexpected exception:
the caller gets UNKNOWN with Python's exception text, and the log a traceback per call. Here every method's
deserializer catches the failure and hands its handler an `_Undecodable` in place of the request, which the handler
answers with the INVALID_REQUEST status every other invalid request gets. A decodable request pays a function call.
A request over server.max_message_bytes is handed over as one too, answered REQUEST_TOO_LARGE with its size: gRPC
reads requests up to twice that limit (`receive_limit`), so that a caller a little over it is answered, counted and
logged as any refused call is, where gRPC's own refusal comes before any interceptor, unseen by metrics and the log.
Likewise an exception that no layer answered (a fault of the gateway's own) ends the call INTERNAL with ErrorInfo,
its traceback logged (`status.fail_unexpectedly`), not UNKNOWN with Python's exception text.

The methods come from the service's descriptor, as the generated add_LLMServiceServicer_to_server's do, so an RPC
added to the contract is registered here without an edit. Every service of the gateway is registered by a generic
handler alone, not as registered methods too (`GenericOnly`), which keeps each call's metadata as gRPC hands it to the
lookup, for whatever reads it during the call (`invocation_metadata`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeAlias

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from llmrelay import v1 as pb

from llmrelay_server.domain import FieldViolation, InvalidRequestError, LLMRelayError, RequestTooLargeError
from llmrelay_server.status import abort, fail_unexpectedly

COMPLETE: Final = "/llmrelay.v1.LLMService/Complete"
STREAM_COMPLETE: Final = "/llmrelay.v1.LLMService/StreamComplete"
EMBED: Final = "/llmrelay.v1.LLMService/Embed"
"""The model calls' method paths, as interceptors and observers are told a call's method."""

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Metadata: TypeAlias = "tuple[tuple[str, str | bytes], ...]"
_UnaryBehavior: TypeAlias = Callable[[Any, _Context], Awaitable[Message]]
_StreamBehavior: TypeAlias = Callable[[Any, _Context], AsyncGenerator[Message, None]]


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What a handler receives in place of a request whose bytes did not decode, or were too many to."""

    error: LLMRelayError


def decoded(request: object) -> bool:
    """Whether a handler's request is the message its bytes decoded to, rather than an `_Undecodable`: interceptors
    and observers that see the call before the handler refuses it (limits, tracing) must not read its fields."""
    return type(request) is not _Undecodable


class _UndecodableRequestError(InvalidRequestError):
    """The request as a whole is at fault: its one violation names no field, and its message is the reason alone."""

    def __init__(self, reason: str) -> None:
        super().__init__([FieldViolation("", reason)])

    def __str__(self) -> str:
        return self.violations[0].description


_call_metadata: contextvars.ContextVar[Metadata | None] = contextvars.ContextVar("llmrelay_call_metadata", default=None)


def invocation_metadata(context: _Context) -> Metadata:
    """The call's metadata: the tuple gRPC made once for the lookup of the call's handler, which a service registered
    here keeps for the call (`_KeepingMetadata`); the context's own for any other. context.invocation_metadata()
    builds a new tuple of named tuples at each asking: some 2 us, for the call log's request id, the caller's name
    without a key, and a trace's parent."""
    metadata = _call_metadata.get()
    return metadata if metadata is not None else tuple(context.invocation_metadata() or ())


def receive_limit(max_message_bytes: int) -> int:
    """The size of the largest message gRPC is to read for the gateway, which answers those over `max_message_bytes`
    itself: twice it, within gRPC's own bound."""
    return min(2 * max_message_bytes, _GRPC_MAX_MESSAGE_BYTES)


_GRPC_MAX_MESSAGE_BYTES: Final = 2**31 - 1


def add_llm_service(servicer: pb.LLMServiceServicer, server: grpc.aio.Server, max_request_bytes: int) -> None:
    """Registers LLMService as the generated add_LLMServiceServicer_to_server does, with the decoding guard, by a
    generic handler alone (see GenericOnly); its requests over `max_request_bytes` are refused."""
    service = pb.DESCRIPTOR.services_by_name["LLMService"]
    handlers = {
        method.name: _handler(method, getattr(servicer, method.name), max_request_bytes) for method in service.methods
    }
    GenericOnly(server).add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class GenericOnly:
    """A server as a generated add_*_to_server function sees it, taking the service's handlers as a generic handler
    alone, not as registered methods too. grpc.aio's server waits for the next call of each registered method apart,
    and so goes through the waits of all of them (asyncio.wait: a callback added to each, and removed) for every call
    it takes: the ten methods of LLMService, health and reflection cost the plain gateway about 50k instructions a
    unary call (6%), where one generic handler's lookup by name costs a few hundred (`make bench-instructions`).
    Each generic handler keeps the metadata of the calls it is asked about (`invocation_metadata`); with
    `max_request_bytes`, its methods refuse requests over it, as LLMService's own decoding does (gRPC reads up to
    `receive_limit` for every service of the server)."""

    def __init__(self, server: grpc.aio.Server, max_request_bytes: int | None = None) -> None:
        self._server = server
        self._max_request_bytes = max_request_bytes

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_KeepingMetadata(handler, self._max_request_bytes) for handler in generic_rpc_handlers)
        )

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        """Left out: the generic handler the service was given serves its methods."""


class _KeepingMetadata(grpc.GenericRpcHandler):
    """A generic handler that keeps the metadata of the call it is asked about for that call: gRPC asks within the
    call's task, after the interceptors and before the handler runs, and each call's task has a context of its own."""

    def __init__(self, handler: grpc.GenericRpcHandler, max_request_bytes: int | None) -> None:
        self._handler = handler
        self._max_request_bytes = max_request_bytes
        self._bounded: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}
        """id of a method's handler -> that handler (kept, so that its id is not another's), and it bounded: made once
        for all its calls (the observers keep their wrappings by handler)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        _call_metadata.set(handler_call_details.invocation_metadata)
        handler = self._handler.service(handler_call_details)
        if handler is None or self._max_request_bytes is None:
            return handler
        kept = self._bounded.get(id(handler))
        if kept is None or kept[0] is not handler:
            rpc = handler_call_details.method.rpartition("/")[2]
            kept = self._bounded[id(handler)] = (handler, _bounded(handler, rpc, self._max_request_bytes))
        return kept[1]


def _bounded(handler: grpc.RpcMethodHandler[Any, Any], rpc: str, max_bytes: int) -> grpc.RpcMethodHandler[Any, Any]:
    """A method's handler whose requests over `max_bytes` are refused (REQUEST_TOO_LARGE), whatever its kind."""
    decode = handler.request_deserializer

    def bounded_decode(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Undecodable(RequestTooLargeError(len(data), max_bytes))
        if decode is None:
            return data
        try:
            return decode(data)
        except DecodeError as error:  # anyone may send the open services (health, reflection) bytes of no request
            return _undecodable(error)

    encode = handler.response_serializer
    if handler.request_streaming:
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
        reading = _checking_each(rpc, behavior)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(reading, bounded_decode, encode)
        return grpc.stream_unary_rpc_method_handler(reading, bounded_decode, encode)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_checking(rpc, handler.unary_stream), bounded_decode, encode)
    return grpc.unary_unary_rpc_method_handler(_checking(rpc, handler.unary_unary), bounded_decode, encode)


def _checking(rpc: str, behavior: Any) -> Any:
    """`behavior`, of one request, refusing an `_Undecodable` one; an async generator function still, where it was
    one (the observers tell a stream so)."""
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            if type(request) is _Undecodable:
                await _refuse(context, rpc, request)
            async with contextlib.aclosing(behavior(request, context)) as answers:
                async for answer in answers:
                    yield answer

        return checked_stream

    async def checked(request: Any, context: _Context) -> Any:
        if type(request) is _Undecodable:
            await _refuse(context, rpc, request)
        return await behavior(request, context)

    return checked


def _checking_each(rpc: str, behavior: Any) -> Any:
    """`behavior`, of a stream of requests, refusing the call at an `_Undecodable` one, as its handler reads it."""

    async def checked_requests(requests: AsyncIterator[Any], context: _Context) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is _Undecodable:
                await _refuse(context, rpc, request)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(requests: AsyncIterator[Any], context: _Context) -> AsyncIterator[Any]:
            async with contextlib.aclosing(behavior(checked_requests(requests, context), context)) as answers:
                async for answer in answers:
                    yield answer

        return checked_stream

    async def checked(requests: AsyncIterator[Any], context: _Context) -> Any:
        return await behavior(checked_requests(requests, context), context)

    return checked


def _handler(method: MethodDescriptor, behavior: Any, max_request_bytes: int) -> grpc.RpcMethodHandler[Any, Any]:
    if method.client_streaming:
        raise TypeError(f"{method.full_name}: requests that stream are not supported")
    decode = _decoder(GetMessageClass(method.input_type), max_request_bytes)
    encode = GetMessageClass(method.output_type).SerializeToString
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _guarded_stream(method.name, behavior), request_deserializer=decode, response_serializer=encode
        )
    return grpc.unary_unary_rpc_method_handler(
        _guarded_unary(method.name, behavior), request_deserializer=decode, response_serializer=encode
    )


_TOO_DEEP: Final = (
    "its messages nest deeper than protobuf's decoder takes (32 levels): a JSON schema written as a Struct (a tool's"
    " parameters, a response format's schema) takes two levels for each of its own; send it as text"
    " (parameters_json, schema_json), which may nest 512 levels deep"
)
"""What upb's "Exceeded upb_DecodeOptions_MaxDepth" means to a caller."""


def _decoder(message_type: type[Message], max_bytes: int) -> Callable[[bytes], Message | _Undecodable]:
    parse = message_type.FromString

    def decode(data: bytes) -> Message | _Undecodable:
        if len(data) > max_bytes:
            return _Undecodable(RequestTooLargeError(len(data), max_bytes))
        try:
            return parse(data)
        except DecodeError as error:
            return _undecodable(error)

    return decode


def _undecodable(error: DecodeError) -> _Undecodable:
    """What the handler gets for a request protobuf could not decode: its refusal, in words a caller can act on."""
    said = _TOO_DEEP if "MaxDepth" in str(error) else str(error)
    return _Undecodable(_UndecodableRequestError(f"the request cannot be decoded: {said}"))


def _guarded_unary(rpc: str, behavior: _UnaryBehavior) -> _UnaryBehavior:
    async def handle(request: Any, context: _Context) -> Message:
        if type(request) is _Undecodable:
            await _refuse(context, rpc, request)
        try:
            return await behavior(request, context)
        except grpc.aio.BaseError:  # the status the call was ended with, on its way out
            raise
        except Exception as error:
            await fail_unexpectedly(context, rpc, error)

    return handle


def _guarded_stream(rpc: str, behavior: _StreamBehavior) -> Callable[[Any, _Context], AsyncIterator[Message]]:
    # gRPC streams asynchronously only from an async generator function (from any other it expects a plain
    # iterator), so the answers pass through this one: a generator step each, some 70 ns. Closing it closes the
    # servicer's, as when gRPC held that one itself.
    async def handle(request: Any, context: _Context) -> AsyncIterator[Message]:
        if type(request) is _Undecodable:
            await _refuse(context, rpc, request)
        try:
            async with contextlib.aclosing(behavior(request, context)) as answers:
                async for answer in answers:
                    yield answer
        except grpc.aio.BaseError:
            raise
        except Exception as error:
            await fail_unexpectedly(context, rpc, error)

    return handle


async def _refuse(context: _Context, rpc: str, request: _Undecodable) -> NoReturn:
    await abort(context, rpc, request.error)
