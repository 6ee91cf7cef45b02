"""Client and AsyncClient: one channel each, every method with the same keyword tail (timeout, metadata); builders
for messages, images, tools and response formats."""

from __future__ import annotations

import json
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


ImageDetail: TypeAlias = Literal["auto", "low", "high"]
"""How closely the model looks at an image (OpenAI's `detail`): "low" costs the fewest tokens."""
_IMAGE_DETAILS: Final[Mapping[ImageDetail, pb.ImageDetail.ValueType]] = {
    "auto": pb.IMAGE_DETAIL_AUTO,
    "low": pb.IMAGE_DETAIL_LOW,
    "high": pb.IMAGE_DETAIL_HIGH,
}


def image(source: bytes | str, *, media_type: str | None = None, detail: ImageDetail | None = None) -> pb.ContentPart:
    """An image for user_message: its bytes (PNG, JPEG, GIF or WebP; the gateway reads which from the bytes unless
    media_type says), or an http(s) URL the upstream fetches."""
    part = (
        pb.ImagePart(url=source) if isinstance(source, str) else pb.ImagePart(data=source, media_type=media_type or "")
    )
    if detail is not None:
        part.detail = _IMAGE_DETAILS[detail]
    return pb.ContentPart(image=part)


def user_message(*content: str | pb.ContentPart) -> pb.Message:
    """A user message of texts and images, in order: user_message("What is in this?", image(png_bytes))."""
    parts = [pb.ContentPart(text=item) if isinstance(item, str) else item for item in content]
    return pb.Message(role=pb.ROLE_USER, parts=parts)


def tool(
    name: str,
    parameters: Mapping[str, Any] | str | None = None,
    *,
    description: str | None = None,
    strict: bool | None = None,
) -> pb.Tool:
    """A function the model may call; parameters is its JSON Schema, as a dict or as JSON text."""
    function = pb.FunctionDefinition(name=name, description=description, strict=strict)
    if parameters is not None:
        function.parameters_json = _json_text(parameters)
    return pb.Tool(function=function)


def json_schema(
    name: str, schema: Mapping[str, Any] | str, *, description: str | None = None, strict: bool | None = None
) -> pb.ResponseFormat:
    """The response format of an answer that is JSON following the schema (a dict, or JSON text)."""
    return pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=pb.JsonSchema(name=name, schema_json=_json_text(schema), description=description, strict=strict),
    )


def _json_text(schema: Mapping[str, Any] | str) -> str:
    # Schemas travel as JSON text, which the upstream gets as written: the deprecated Struct fields would turn every
    # integer into a double (`maxItems: 3` into 3.0) and lose large ones.
    return schema if isinstance(schema, str) else json.dumps(schema)


def _options(options: Mapping[str, Any]) -> pb.CompletionOptions:
    """CompletionOptions from keyword options; tools and a response format given as dicts send their schemas as
    JSON text, as tool() and json_schema() do."""
    fields = dict(options)
    if "tools" in fields:
        fields["tools"] = [_text_tool(t) if isinstance(t, Mapping) else t for t in fields["tools"]]
    if isinstance(fields.get("response_format"), Mapping):
        fields["response_format"] = _text_response_format(fields["response_format"])
    return pb.CompletionOptions(**fields)


def _text_tool(value: Mapping[str, Any]) -> pb.Tool:
    function = dict(value.get("function") or {})
    if isinstance(function.get("parameters"), Mapping):
        function["parameters_json"] = _json_text(function.pop("parameters"))
    return pb.Tool(function=pb.FunctionDefinition(**function))


def _text_response_format(value: Mapping[str, Any]) -> pb.ResponseFormat:
    fields = dict(value)
    schema = dict(fields.get("json_schema") or {})
    if isinstance(schema.get("schema"), Mapping):
        schema["schema_json"] = _json_text(schema.pop("schema"))
        fields["json_schema"] = schema
    return pb.ResponseFormat(**fields)


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
        options=_options(options) if options else None,
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


def _embed_request(inputs: str | Iterable[str], model: str | None, dimensions: int | None) -> pb.EmbedRequest:
    # A lone string is one text, not a sequence of one-character texts.
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    return pb.EmbedRequest(inputs=texts, model=model, dimensions=dimensions)


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

    def embed(
        self,
        inputs: str | Iterable[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.EmbedResponse:
        """One vector per input, in order (`response.embeddings[i].values`), all from one embedding model: the
        model named (or "backend/model"), else the gateway's default embedding model."""
        request = _embed_request(inputs, model, dimensions)
        with _sdk_errors():
            return self._stub.Embed(request, **self._call_options(timeout, metadata))

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

    async def embed(
        self,
        inputs: str | Iterable[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.EmbedResponse:
        """As Client.embed."""
        request = _embed_request(inputs, model, dimensions)
        with _sdk_errors():
            return await self._stub.Embed(request, **self._call_options(timeout, metadata))

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
