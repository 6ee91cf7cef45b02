"""Client and AsyncClient: one channel each, every method with the same keyword tail (timeout, metadata)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeAlias

import grpc
import grpc.aio

from llmrelay import v1 as pb
from llmrelay._errors import error_from_rpc

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S: Final = 120.0
CALLER_HEADER: Final = "x-llmrelay-caller"

_ROLES: Final[Mapping[str, pb.Role.ValueType]] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}

MessageLike: TypeAlias = "pb.Message | Mapping[str, Any]"
Metadata: TypeAlias = Sequence[tuple[str, str]]


def message(role: str, content: str, **fields: Any) -> pb.Message:
    """A chat message from plain values: message("user", "Hello")."""
    try:
        return pb.Message(role=_ROLES[role], content=content, **fields)
    except KeyError:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(_ROLES)}") from None


def _messages(messages: Iterable[MessageLike]) -> list[pb.Message]:
    return [m if isinstance(m, pb.Message) else message(**m) for m in messages]


def _completion_fields(
    messages: Iterable[MessageLike], model: str | None, exact_model: bool, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The fields CompleteRequest and StreamCompleteRequest share; options are CompletionOptions' field names."""
    fields: dict[str, Any] = {"messages": _messages(messages), "exact_model": exact_model}
    if model is not None:
        fields["model"] = model
    if options:
        fields["options"] = pb.CompletionOptions(**options)
    return fields


def _count_request(
    messages: Iterable[MessageLike] | None, text: str | None, model: str | None, tools: Sequence[pb.Tool]
) -> pb.CountTokensRequest:
    return pb.CountTokensRequest(model=model, messages=_messages(messages or ()), tools=list(tools), text=text)


class _Base:
    def __init__(self, target: str, timeout: float | None, metadata: Metadata, caller: str | None) -> None:
        self.target = target
        self._timeout = timeout
        self._metadata = tuple(metadata) + (((CALLER_HEADER, caller),) if caller else ())

    def _call_options(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {
            "timeout": self._timeout if timeout is None else timeout,
            "metadata": self._metadata + tuple(metadata or ()),
        }


class Client(_Base):
    """A blocking client. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as client:
    ...     answer = client.complete([{"role": "user", "content": "Hi"}], max_tokens=50)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        caller: str | None = None,
    ) -> None:
        super().__init__(target, timeout, metadata, caller)
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        )
        self._stub = pb.LLMServiceStub(self._channel)

    def complete(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(**_completion_fields(messages, model, exact_model, options))
        try:
            return self._stub.Complete(request, **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> Iterator[pb.StreamCompleteResponse]:
        request = pb.StreamCompleteRequest(**_completion_fields(messages, model, exact_model, options))
        call = self._stub.StreamComplete(request, **self._call_options(timeout, metadata))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()  # a consumer that stops early must not leave the upstream generating

    def count_tokens(
        self,
        messages: Iterable[MessageLike] | None = None,
        *,
        text: str | None = None,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.CountTokensResponse:
        request = _count_request(messages, text, model, tools)
        try:
            return self._stub.CountTokens(request, **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def health(
        self, *, probe: bool = False, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        try:
            return self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def get_usage(
        self,
        request: pb.GetUsageRequest | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        try:
            return self._stub.GetUsage(request or pb.GetUsageRequest(), **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """An asyncio client. Use as an async context manager, or await close().

    >>> async with AsyncClient() as client:
    ...     async for chunk in client.stream([{"role": "user", "content": "Hi"}]):
    ...         print(chunk.delta.content, end="")
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        caller: str | None = None,
    ) -> None:
        super().__init__(target, timeout, metadata, caller)
        self._channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(target)
        )
        self._stub = pb.LLMServiceStub(self._channel)

    async def complete(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(**_completion_fields(messages, model, exact_model, options))
        try:
            return await self._stub.Complete(request, **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        request = pb.StreamCompleteRequest(**_completion_fields(messages, model, exact_model, options))
        call: Any = self._stub.StreamComplete(request, **self._call_options(timeout, metadata))
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()

    async def count_tokens(
        self,
        messages: Iterable[MessageLike] | None = None,
        *,
        text: str | None = None,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.CountTokensResponse:
        request = _count_request(messages, text, model, tools)
        try:
            return await self._stub.CountTokens(request, **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def health(
        self, *, probe: bool = False, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        try:
            return await self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def get_usage(
        self,
        request: pb.GetUsageRequest | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        try:
            return await self._stub.GetUsage(request or pb.GetUsageRequest(), **self._call_options(timeout, metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
