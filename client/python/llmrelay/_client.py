"""Client and AsyncClient: one channel each, every method with the same keyword tail (timeout, metadata)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal, TypeAlias, TypeVar

import grpc
import grpc.aio

from llmrelay import v1 as pb
from llmrelay._assemble import StreamAssembler
from llmrelay._errors import error_from_rpc

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S: Final = 120.0
CALLER_HEADER: Final = "x-llmrelay-caller"

# "user" for ROLE_USER, and so on: read from the contract, so a role added there is accepted here.
_ROLES: Final[Mapping[str, pb.Role.ValueType]] = {
    name.removeprefix("ROLE_").lower(): value for name, value in pb.Role.items() if value != pb.ROLE_UNSPECIFIED
}

MessageLike: TypeAlias = "pb.Message | Mapping[str, Any]"
Metadata: TypeAlias = Sequence[tuple[str, str]]
OnInterrupt: TypeAlias = Literal["abort", "restart"]
"""What the gateway does when a stream breaks after it started: end it (ABORTED), or start the answer over on the
next backend after a message whose `restart` is set."""
DeltaCallback: TypeAlias = Callable[["pb.StreamCompleteResponse"], object]
_INTERRUPT_POLICIES: Final[Mapping[OnInterrupt, pb.InterruptPolicy.ValueType]] = {
    "abort": pb.INTERRUPT_POLICY_ABORT,
    "restart": pb.INTERRUPT_POLICY_RESTART,
}
_CompletionRequest = TypeVar("_CompletionRequest", pb.CompleteRequest, pb.StreamCompleteRequest)


def message(role: str, content: str, **fields: Any) -> pb.Message:
    """A chat message from plain values: message("user", "Hello")."""
    try:
        return pb.Message(role=_ROLES[role], content=content, **fields)
    except KeyError:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(_ROLES)}") from None


def _messages(messages: Iterable[MessageLike]) -> list[pb.Message]:
    return [m if isinstance(m, pb.Message) else message(**m) for m in messages]


def _completion_request(
    request_type: type[_CompletionRequest],
    messages: Iterable[MessageLike],
    model: str | None,
    exact_model: bool,
    options: Mapping[str, Any],
) -> _CompletionRequest:
    """A CompleteRequest or StreamCompleteRequest (same fields); options are CompletionOptions' field names."""
    # None leaves a field unset: no model means the default chain, no options the backend's defaults.
    return request_type(
        messages=_messages(messages),
        model=model,
        exact_model=exact_model,
        options=pb.CompletionOptions(**options) if options else None,
    )


def _stream_request(
    messages: Iterable[MessageLike],
    model: str | None,
    exact_model: bool,
    on_interrupt: OnInterrupt | None,
    options: Mapping[str, Any],
) -> pb.StreamCompleteRequest:
    request = _completion_request(pb.StreamCompleteRequest, messages, model, exact_model, options)
    if on_interrupt is not None:
        request.on_interrupt = _INTERRUPT_POLICIES[on_interrupt]
    return request


def _count_request(
    messages: Iterable[MessageLike] | None, text: str | None, model: str | None, tools: Sequence[pb.Tool]
) -> pb.CountTokensRequest:
    return pb.CountTokensRequest(model=model, messages=_messages(messages or ()), tools=list(tools), text=text)


@contextmanager
def _sdk_errors() -> Iterator[None]:
    """Raises the SDK's error, with the details decoded, for a failed call inside the block."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc


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
        request = _completion_request(pb.CompleteRequest, messages, model, exact_model, options)
        with _sdk_errors():
            return self._stub.Complete(request, **self._call_options(timeout, metadata))

    def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        on_interrupt: OnInterrupt | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> Iterator[pb.StreamCompleteResponse]:
        """The answer's messages as they come. With on_interrupt="restart", a message whose `restart` is set
        (`chunk.HasField("restart")`, a `pb.StreamRestart`) means: drop every delta before it."""
        request = _stream_request(messages, model, exact_model, on_interrupt, options)
        call = self._stub.StreamComplete(request, **self._call_options(timeout, metadata))
        try:
            with _sdk_errors():
                yield from call
        finally:
            call.cancel()  # a consumer that stops early must not leave the upstream generating

    def collect(
        self,
        messages: Iterable[MessageLike],
        *,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> pb.CompleteResponse:
        """Streams the answer and returns it whole, as Complete would: a broken stream is restarted on the next
        backend, and only the final attempt's answer is returned. on_delta sees each message as it comes (print
        as it arrives; a message with `restart` set says to start over)."""
        assembler = StreamAssembler()
        for chunk in self.stream(
            messages, model=model, exact_model=exact_model, on_interrupt="restart", timeout=timeout,
            metadata=metadata, **options,
        ):  # fmt: skip
            assembler.add(chunk)
            if on_delta is not None:
                on_delta(chunk)
        return assembler.result()

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
        with _sdk_errors():
            return self._stub.CountTokens(request, **self._call_options(timeout, metadata))

    def health(
        self, *, probe: bool = False, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        with _sdk_errors():
            return self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))

    def get_usage(
        self,
        request: pb.GetUsageRequest | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        with _sdk_errors():
            return self._stub.GetUsage(request or pb.GetUsageRequest(), **self._call_options(timeout, metadata))

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
        request = _completion_request(pb.CompleteRequest, messages, model, exact_model, options)
        with _sdk_errors():
            return await self._stub.Complete(request, **self._call_options(timeout, metadata))

    async def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        on_interrupt: OnInterrupt | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        """As Client.stream."""
        request = _stream_request(messages, model, exact_model, on_interrupt, options)
        call = self._stub.StreamComplete(request, **self._call_options(timeout, metadata))
        try:
            with _sdk_errors():
                async for chunk in call:
                    yield chunk
        finally:
            call.cancel()

    async def collect(
        self,
        messages: Iterable[MessageLike],
        *,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> pb.CompleteResponse:
        """As Client.collect."""
        assembler = StreamAssembler()
        async for chunk in self.stream(
            messages, model=model, exact_model=exact_model, on_interrupt="restart", timeout=timeout,
            metadata=metadata, **options,
        ):  # fmt: skip
            assembler.add(chunk)
            if on_delta is not None:
                on_delta(chunk)
        return assembler.result()

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
        with _sdk_errors():
            return await self._stub.CountTokens(request, **self._call_options(timeout, metadata))

    async def health(
        self, *, probe: bool = False, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        with _sdk_errors():
            return await self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))

    async def get_usage(
        self,
        request: pb.GetUsageRequest | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        with _sdk_errors():
            return await self._stub.GetUsage(request or pb.GetUsageRequest(), **self._call_options(timeout, metadata))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
