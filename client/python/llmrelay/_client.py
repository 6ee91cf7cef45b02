"""Client and AsyncClient: one channel each, every method with the same keyword tail (timeout, metadata); builders
for messages, images, tools and response formats."""

from __future__ import annotations

import asyncio
import enum
import inspect
import re
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Final, Literal, TypeAlias, TypeVar, Unpack

import grpc
import grpc.aio

from llmrelay import v1 as pb
from llmrelay._agent import DEFAULT_MAX_STEPS, Answer, Conversation, Tools, _Steps
from llmrelay._assemble import StreamAssembler
from llmrelay._channel import (
    BLOCKING_SERVICE_CONFIG,
    DEFAULT_SERVICE_CONFIG,
    ChannelOptions,
    ChannelSettings,
    ServiceConfig,
    target_problem,
)
from llmrelay._errors import LLMRelayError, error_from_rpc
from llmrelay._messages import MessageLike, as_messages
from llmrelay._options import (
    CompletionOptions,
    ResponseFormatLike,
    RunToolsOptions,
    built,
    completion_options,
    json_text,
    named,
    response_format_message,
)
from llmrelay._stream import AsyncStream, CallHandle, Stream

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S: Final = 120.0
MAX_TIMEOUT_S: Final = 1e9
"""The longest timeout (some 30 years): gRPC holds a deadline as nanoseconds since 1970 in 64 bits, which a timeout
of 1e10 s overflows into the past, failing the call at once."""
CALLER_HEADER: Final = "x-llmrelay-caller"
_METADATA_KEY: Final = re.compile(r"[0-9a-z_.-]+")
_RESERVED_KEY_PREFIX: Final = "grpc-"


class _ClientDefault(enum.Enum):
    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = _ClientDefault.USE_CLIENT_DEFAULT
"""A call's `timeout` when not given: the client's. None is no deadline; a number, seconds."""
Timeout: TypeAlias = "float | Literal[_ClientDefault.USE_CLIENT_DEFAULT] | None"

Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]
"""Keys and values; a key ending "-bin" takes bytes, any other printable ASCII text."""
OnInterrupt: TypeAlias = Literal["abort", "restart"]
"""What the gateway does when a stream breaks after it started: end it (ABORTED), or start the answer over on the
next backend after a message whose `restart` is set."""
DeltaCallback: TypeAlias = Callable[["pb.StreamCompleteResponse"], object]
"""Called with each message of a stream; AsyncClient's may also be an async function, awaited."""
SyncInterceptor: TypeAlias = (
    "grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor | grpc.StreamUnaryClientInterceptor"
    " | grpc.StreamStreamClientInterceptor"
)
_INTERRUPT_POLICIES: Final[Mapping[OnInterrupt, pb.InterruptPolicy.ValueType]] = {
    "abort": pb.INTERRUPT_POLICY_ABORT,
    "restart": pb.INTERRUPT_POLICY_RESTART,
}
_CompletionRequest = TypeVar("_CompletionRequest", pb.CompleteRequest, pb.StreamCompleteRequest)


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
        part.detail = named("image detail", _IMAGE_DETAILS, detail)
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
    fields = {"name": name, "description": description, "strict": strict}
    if parameters is not None:
        fields["parameters_json"] = json_text(parameters)
    return pb.Tool(function=built(pb.FunctionDefinition, fields, "function."))


def json_schema(
    name: str, schema: Mapping[str, Any] | str, *, description: str | None = None, strict: bool | None = None
) -> pb.ResponseFormat:
    """The response format of an answer that is JSON following the schema (a dict, or JSON text)."""
    fields = {"name": name, "schema_json": json_text(schema), "description": description, "strict": strict}
    return pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=built(pb.JsonSchema, fields, "json_schema.")
    )


def _completion_request(
    request_type: type[_CompletionRequest],
    messages: Iterable[MessageLike],
    model: str | None,
    exact_model: bool,
    options: CompletionOptions,
) -> _CompletionRequest:
    """A CompleteRequest or StreamCompleteRequest (same fields)."""
    # None leaves a field unset: no model means the default chain, no options the backend's defaults.
    fields = {
        "messages": as_messages(messages),
        "model": model,
        "exact_model": exact_model,
        "options": completion_options(options),
    }
    return built(request_type, fields)


def _stream_request(
    messages: Iterable[MessageLike],
    model: str | None,
    exact_model: bool,
    on_interrupt: OnInterrupt | None,
    options: CompletionOptions,
) -> pb.StreamCompleteRequest:
    request = _completion_request(pb.StreamCompleteRequest, messages, model, exact_model, options)
    if on_interrupt is not None:
        request.on_interrupt = named("on_interrupt", _INTERRUPT_POLICIES, on_interrupt)
    return request


def _embed_request(inputs: str | Iterable[str], model: str | None, dimensions: int | None) -> pb.EmbedRequest:
    # A lone string is one text, not a sequence of one-character texts.
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    return built(pb.EmbedRequest, {"inputs": texts, "model": model, "dimensions": dimensions})


def _count_request(
    messages: Iterable[MessageLike] | None,
    text: str | None,
    model: str | None,
    tools: Sequence[pb.Tool],
    response_format: ResponseFormatLike | None,
) -> pb.CountTokensRequest:
    fields = {
        "model": model,
        "messages": as_messages(messages or ()),
        "tools": list(tools),
        "text": text,
        "response_format": None if response_format is None else response_format_message(response_format),
    }
    return built(pb.CountTokensRequest, fields)


def _usage_request(request: pb.GetUsageRequest | Mapping[str, Any] | None) -> pb.GetUsageRequest:
    if request is None:
        return pb.GetUsageRequest()
    if isinstance(request, Mapping):
        return built(pb.GetUsageRequest, request)
    if not isinstance(request, pb.GetUsageRequest):
        # grpc would fail the call with INTERNAL, "Exception serializing request!", as if the gateway had failed.
        raise TypeError(f"request: a pb.GetUsageRequest or a dict of its fields, not {type(request).__name__}")
    return request


def _seconds(name: str, value: float | None, unset: str) -> float | None:
    """`value`, a number of seconds > 0 and at most MAX_TIMEOUT_S, or None (`unset` says what None means), else
    ValueError naming `name`: grpc would fail inside itself ("unsupported operand type(s) for +: 'float' and 'str'"),
    or, past MAX_TIMEOUT_S, fail the call at once with DEADLINE_EXCEEDED as if the gateway had been too slow."""
    seconds = isinstance(value, int | float) and not isinstance(value, bool)
    # Compared, not math.isfinite'd: an int past a float's range (10**400) raised OverflowError there; NaN compares
    # False, and infinity is past MAX_TIMEOUT_S.
    if value is not None and not (seconds and 0 < value <= MAX_TIMEOUT_S):
        raise ValueError(
            f"{name} must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:g}, or None ({unset}), not "
            f"{_shown(value)}"
        )
    return value


def _shown(value: object) -> str:
    """repr(value), or what it is where that fails (an int of more digits than Python writes raises ValueError)."""
    try:
        return repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"


_ASYNC_ON_DELTA: Final = "on_delta is an async function, which Client cannot await: use AsyncClient, or a plain one"


def _refuse_async(on_delta: DeltaCallback | None) -> None:
    """TypeError for an async on_delta given to the blocking client, before any call: called and never awaited, it
    would not run once, and say so only in a RuntimeWarning."""
    if inspect.iscoroutinefunction(on_delta):
        raise TypeError(_ASYNC_ON_DELTA)


def _refuse_awaitable(heard: Any) -> None:
    """As _refuse_async, for what an on_delta returned (an object whose __call__ is async, a lambda's coroutine)."""
    if inspect.iscoroutine(heard):
        heard.close()  # no "never awaited" warning on top of the error
    raise TypeError(_ASYNC_ON_DELTA)


def _conversation(messages: Iterable[MessageLike] | Conversation) -> Conversation:
    # A Conversation given is appended to; a list given is copied, and left as it was.
    return messages if isinstance(messages, Conversation) else Conversation(messages)


def _checked_metadata(metadata: Metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata with its keys in lower case, as gRPC sends them (and takes no other: "Authorization" failed the
    call with INTERNAL, "Invalid metadata", or grpc.aio's own error); ValueError for a key or a value gRPC refuses,
    or a key gRPC reserves for itself (grpc-...), saying which key (never the value, which may be a key to the
    gateway); TypeError for what is not pairs."""
    if isinstance(metadata, (Mapping, str, bytes)):  # a dict's keys, or a string's letters, read as pairs
        raise TypeError(f"metadata: a sequence of (key, value) pairs, not a {type(metadata).__name__}")
    checked = []
    for item in metadata:
        pair = isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2
        if not (pair and isinstance(item[0], str)):
            raise TypeError("metadata: a sequence of (key, value) pairs, each key a str (value not shown)")
        key, value = item
        name = key.lower()
        if not _METADATA_KEY.fullmatch(name):
            raise ValueError(f"metadata key {key!r}: gRPC takes only letters, digits, '-', '_' and '.' in a key")
        if name.startswith(_RESERVED_KEY_PREFIX):
            # grpcio's core takes such a key sent for its own (grpc-status, grpc-timeout): the gateway ran and billed
            # the call, and the client got no answer and no error (complete returned None, a stream no message).
            raise ValueError(f"metadata key {key!r}: keys starting grpc- are gRPC's own (reserved), not a caller's")
        # A key ending -bin carries bytes; any other, printable ASCII.
        if name.endswith("-bin"):
            if not isinstance(value, bytes):
                raise ValueError(f"metadata {name!r}: a key ending -bin takes bytes as its value (value not shown)")
        elif not (isinstance(value, str) and value.isascii() and value.isprintable()):
            raise ValueError(f"metadata {name!r}: gRPC takes only printable ASCII text as a value (value not shown)")
        checked.append((name, value))
    return tuple(checked)


def _merged_metadata(client: Metadata, call: Metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The client's metadata with the call's: a key the call sets replaces all the client's values for it, as in the
    Go and TypeScript SDKs (the gateway reads the first `authorization` it gets, so both sent would mean the
    client's). Both are _checked_metadata's, their keys in lower case."""
    replaced = {key for key, _ in call}
    return (*(item for item in client if item[0] not in replaced), *call)


class _Base:
    _default_service_config: ClassVar[ServiceConfig]
    """The service config of its channel unless it is told otherwise."""

    def __init__(
        self,
        target: str,
        settings: ChannelSettings,
        own_channel: bool,
        timeout: float | None,
        metadata: Metadata,
        caller: str | None,
    ) -> None:
        if problem := target_problem(target):
            raise ValueError(f"target: {problem}")
        if own_channel and settings != ChannelSettings(service_config=self._default_service_config):
            raise ValueError(
                "channel= is a channel made already: leave tls, certificates, credentials, service_config and "
                "options unset with it (interceptors still apply)"
            )
        self.target = target
        self.channel_options = [] if own_channel else settings.channel_options()
        """The options the client made its channel with (the service config first)."""
        self._credentials = None if own_channel else settings.credentials_for(target)
        self._timeout = _seconds("timeout", timeout, "no deadline")
        # caller= names the caller once, over an x-llmrelay-caller in metadata, as in the Go and TypeScript SDKs.
        self._metadata = _merged_metadata(
            _checked_metadata(metadata), _checked_metadata(((CALLER_HEADER, caller),) if caller else ())
        )
        self._security_hint = None if own_channel else settings.security_hint(target)
        # Over TLS alone, which the client made (a channel= given has no credentials here).
        self._client_certificate_hint = settings.client_certificate_hint() if self.uses_tls else None
        self._closed = False
        """Set by close(): a call made after it, or one an AsyncClient's close() cut short, fails CANCELLED, saying
        so."""
        self._reached = False
        """Set once a call has heard from the gateway: the transport chosen is the gateway's, and a later UNAVAILABLE
        (the gateway gone, or restarting) is not told to try another."""

    @property
    def uses_tls(self) -> bool:
        """Whether the client made a TLS channel (False for a channel= given)."""
        return self._credentials is not None

    def _call_options(self, timeout: Timeout, metadata: Metadata | None) -> dict[str, Any]:
        return {
            "timeout": self._timeout
            if isinstance(timeout, _ClientDefault)
            else _seconds("timeout", timeout, "no deadline"),
            "metadata": _merged_metadata(self._metadata, _checked_metadata(metadata or ())),
        }

    @contextmanager
    def _sdk_errors(self, heard: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Raises the SDK's error, with the details decoded, for a failed call inside the block; `heard` says whether
        the call had delivered a message (a stream's chunk) when it failed."""
        try:
            yield
        except grpc.RpcError as exc:
            if not callable(getattr(exc, "code", None)):
                raise  # an interceptor's own, no call's status: the caller's to read as it is
            raise self._error(exc, heard()) from exc
        except (ValueError, grpc.aio.UsageError):
            # What grpc raises for a call on a closed channel (the blocking one ValueError, grpc.aio UsageError),
            # which a caller catching the SDK's errors would not expect.
            if not self._closed:
                raise
            raise LLMRelayError(grpc.StatusCode.CANCELLED, "the client is closed: make a new one to call") from None
        except asyncio.CancelledError:
            # grpc.aio ends a call that its channel's close() cut short with CancelledError, which reads as the
            # calling task's own cancellation (a TaskGroup takes it so): the blocking client's error instead, unless
            # the task is being cancelled indeed.
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise LLMRelayError(
                    grpc.StatusCode.CANCELLED, "the client was closed while the call was in flight"
                ) from None
            raise
        except GeneratorExit:
            # A stream its caller stopped reading (a loop left early, close(), the end of a with block): a chunk that
            # came had come from the gateway.
            if heard():
                self._reached = True
            raise
        else:
            self._reached = True

    def _error(self, rpc_error: grpc.RpcError, heard: bool = False) -> LLMRelayError:
        """The SDK's error for a failed call. When the gateway could not be reached (UNAVAILABLE without its
        ErrorInfo, and nothing came from it: no message, `heard`, and no headers), the message also says what to
        try: where a TLS gateway closed the connection in the handshake without a word, as one does that asks for a
        client certificate it was not given, what to give it; where the TLS rule chose the transport, what it chose
        and how to choose otherwise (a TLS gateway drops a plaintext client with no word of TLS, and the other way
        round). A gateway that went away mid-call was reached, as was one that answered an earlier call, an error
        included."""
        error = error_from_rpc(rpc_error)
        # An error the gateway answered with comes in trailers alone, no headers: its ErrorInfo or its request id
        # says the gateway sent it.
        if heard or _headers_came(rpc_error) or error.reason is not None or error.request_id is not None:
            self._reached = True
        if error.code != grpc.StatusCode.UNAVAILABLE or error.details.error_info is not None or self._reached:
            return error
        hint = self._security_hint
        if self._client_certificate_hint is not None and error.message.endswith(_CLOSED_IN_THE_HANDSHAKE):
            hint = self._client_certificate_hint
        if hint is None:
            return error
        return type(error)(error.code, f"{error.message} ({hint})", error.details, error.request_id)


# How gRPC's core ends the status of a connection its server closed without a word (in a TLS handshake: a gateway
# that asks for a client certificate, given none or one its client CA did not issue).
_CLOSED_IN_THE_HANDSHAKE: Final = ": Socket closed"


def _headers_came(rpc_error: grpc.RpcError) -> bool:
    """Whether the failed call had received the gateway's headers (initial metadata): the error's initial_metadata(),
    which a failed call of either grpc API has (returning at once); an error of another kind (an interceptor's) has
    none."""
    initial_metadata = getattr(rpc_error, "initial_metadata", None)
    if not callable(initial_metadata):
        return False
    try:
        return bool(initial_metadata())
    except Exception:
        return False


class Client(_Base):
    """A blocking client. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as client:
    ...     answer = client.complete([{"role": "user", "content": "Hi"}], max_tokens=50)

    target: the gateway, "host:port" or any gRPC target ("dns:///host:port", "unix:/path").
    tls: whether to use TLS; unset, the TLS rule decides: plaintext only to a loopback target (127.0.0.0/8, ::1,
        localhost, unix:), TLS with the system's roots otherwise.
    root_certificates, private_key, certificate_chain: PEM bytes: the roots to trust instead of the system's, and a
        client certificate for mutual TLS; any of them means TLS.
    credentials: grpc.ChannelCredentials of your own (TLS), instead of the certificates.
    service_config: the channel's gRPC service config (JSON text or a dict); by default the contract's retry policy
        (UNAVAILABLE retried by the channel itself, at most three attempts, backoff, the gateway's pushback
        honoured), streams excepted in a blocking Client (BLOCKING_SERVICE_CONFIG says why); None for none.
    options: more channel options, e.g. [("grpc.keepalive_time_ms", 30_000)]; they win over the above (answers of
        any size are taken: the gateway bounds them).
    interceptors: client interceptors, outermost first.
    channel: a channel made already (e.g. grpc_testing's), instead of one from the arguments above.
    timeout: each call's deadline in seconds, unless the call says otherwise; None for no deadline.
    metadata: sent with every call (e.g. [("authorization", "Bearer KEY")]); a call's metadata= replaces it for
        each key the call sets (and adds the rest).
    caller: who is calling, for usage records (the x-llmrelay-caller header).
    """

    _default_service_config = BLOCKING_SERVICE_CONFIG

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        service_config: ServiceConfig = BLOCKING_SERVICE_CONFIG,
        options: ChannelOptions = (),
        interceptors: Sequence[SyncInterceptor] = (),
        channel: grpc.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        caller: str | None = None,
    ) -> None:
        settings = ChannelSettings(
            tls, root_certificates, private_key, certificate_chain, credentials, service_config, options
        )
        super().__init__(target, settings, channel is not None, timeout, metadata, caller)
        if channel is None:
            channel = (
                grpc.secure_channel(target, self._credentials, self.channel_options)
                if self._credentials is not None
                else grpc.insecure_channel(target, self.channel_options)
            )
        self._channel = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        self._stub = pb.LLMServiceStub(self._channel)

    def complete(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> pb.CompleteResponse:
        """One answer. model: a model, "backend/model" or an alias (unset: the default chain); exact_model: no
        fallback to another model; options: see CompletionOptions."""
        request = _completion_request(pb.CompleteRequest, messages, model, exact_model, options)
        with self._sdk_errors():
            return self._stub.Complete(request, **self._call_options(timeout, metadata))

    def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        on_interrupt: OnInterrupt | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> Stream:
        """The answer's messages as they come. With on_interrupt="restart", a message whose `restart` is set
        (`chunk.HasField("restart")`, a `pb.StreamRestart`) means: drop every delta before it.

        A loop over the call itself cancels it when the loop ends early; a stream kept in a variable is cancelled
        by `with client.stream(...) as stream:` or stream.close() (see Stream)."""
        request = _stream_request(messages, model, exact_model, on_interrupt, options)
        call_options = self._call_options(timeout, metadata)
        handle = CallHandle()

        def chunks() -> Generator[pb.StreamCompleteResponse, None, None]:
            heard = False
            with self._sdk_errors(lambda: heard):
                call = self._stub.StreamComplete(request, **call_options)
                handle.started(call)
                try:
                    for chunk in call:
                        heard = True
                        yield chunk
                except grpc.RpcError:
                    if not handle.closed:  # else cancelled by close() from another thread: the end of the stream
                        raise
                finally:
                    call.cancel()  # a consumer that stops early must not leave the upstream generating

        return Stream(chunks(), handle)

    def collect(
        self,
        messages: Iterable[MessageLike],
        *,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> pb.CompleteResponse:
        """Streams the answer and returns it whole, as Complete would: a broken stream is restarted on the next
        backend, and only the final attempt's answer is returned. on_delta sees each message as it comes (print
        as it arrives; a message with `restart` set says to start over)."""
        _refuse_async(on_delta)
        assembler = StreamAssembler()
        with self.stream(
            messages, model=model, exact_model=exact_model, on_interrupt="restart", timeout=timeout,
            metadata=metadata, **options,
        ) as chunks:  # fmt: skip
            for chunk in chunks:
                assembler.add(chunk)
                if on_delta is not None and inspect.isawaitable(heard := on_delta(chunk)):
                    _refuse_awaitable(heard)
        return assembler.result()

    def run_tools(
        self,
        messages: Iterable[MessageLike] | Conversation,
        tools: Tools,
        *,
        max_steps: int = DEFAULT_MAX_STEPS,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        tool_timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Unpack[RunToolsOptions],
    ) -> Answer:
        """The agent loop: asks the model, runs the tools it calls (several at once in threads), appends their
        results and asks again, until it answers without tool calls. A tool that raises, an unknown tool and
        arguments that are not valid JSON become tool results that say so. With on_delta each call streams
        (collect) and on_delta sees its messages as they come; timeout is each call's. tool_timeout (seconds) bounds
        each step's tools: one still running then is answered that it did not finish, and the loop goes on (an async
        tool is cancelled; a plain function's thread, which Python cannot stop, is left to end by itself).

        A Conversation given is appended to, and fitted to its budget before each call; a list is left as it was.
        When the model still asks for tools after max_steps calls, their results are appended and StepLimitError
        is raised, its `answer` holding everything so far; a model call that fails (LLMRelayError), or a conversation
        that no longer fits its budget (ContextBudgetError), raises with the run so far as its `answer` too.
        Interrupted while its tools run (Ctrl-C), it first answers every call (one still running: that the run was
        cancelled), so the conversation can go on, and cancels the async tools still running (a plain function's
        thread is left to end by itself)."""
        _seconds("tool_timeout", tool_timeout, "no bound")
        _refuse_async(on_delta)
        conversation = _conversation(messages)
        steps = _Steps(conversation.messages, max_steps)
        definitions = tools.definitions()
        call_options: CompletionOptions = {**options, "tools": definitions}
        while True:
            with steps.kept_on_error():
                self.fit(
                    conversation, model=model, tools=definitions, response_format=options.get("response_format"),
                    timeout=timeout, metadata=metadata,
                )  # fmt: skip
                if on_delta is not None:
                    response = self.collect(
                        conversation.messages, on_delta=on_delta, model=model, exact_model=exact_model,
                        timeout=timeout, metadata=metadata, **call_options,
                    )  # fmt: skip
                else:
                    response = self.complete(
                        conversation.messages, model=model, exact_model=exact_model, timeout=timeout,
                        metadata=metadata, **call_options,
                    )  # fmt: skip
            if not steps.take(response, tools, tool_timeout):
                return steps.answer()

    def fit(
        self,
        conversation: Conversation,
        *,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        response_format: ResponseFormatLike | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> int | None:
        """Drops the conversation's oldest turns until it fits its budget_tokens, counting with CountTokens (the
        tools and the answer format's schema count too); returns the count, or None for a conversation without a
        budget (nothing is counted). When it cannot fit (ContextBudgetError) or a count fails, the conversation is
        left as it was.
        model: whose tokenizer counts, when the conversation names none."""
        if conversation.budget_tokens is None:
            return None
        with conversation._fitting():
            while True:
                count = self.count_tokens(
                    conversation.messages, model=conversation.model or model, tools=tools,
                    response_format=response_format, timeout=timeout, metadata=metadata,
                )  # fmt: skip
                if conversation.trim(count.token_count):
                    return count.token_count

    def count_tokens(
        self,
        messages: Iterable[MessageLike] | None = None,
        *,
        text: str | None = None,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        response_format: ResponseFormatLike | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.CountTokensResponse:
        """The prompt tokens of `messages` (with their `tools`, and the `response_format` the call will ask for, whose
        schema counts too), or of a plain `text`, by the gateway's CountTokens."""
        request = _count_request(messages, text, model, tools, response_format)
        with self._sdk_errors():
            return self._stub.CountTokens(request, **self._call_options(timeout, metadata))

    def embed(
        self,
        inputs: str | Iterable[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.EmbedResponse:
        """One vector per input, in order (`response.embeddings[i].values`), all from one embedding model: the
        model named (or "backend/model"), else the gateway's default embedding model."""
        request = _embed_request(inputs, model, dimensions)
        with self._sdk_errors():
            return self._stub.Embed(request, **self._call_options(timeout, metadata))

    def health(
        self, *, probe: bool = False, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        with self._sdk_errors():
            return self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))

    def get_usage(
        self,
        request: pb.GetUsageRequest | Mapping[str, Any] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        """Usage recorded in the gateway's ledger, by backend, model and caller: all of it, or what `request` (a
        pb.GetUsageRequest, or a dict of its fields: backend, model, caller, start_time, end_time) filters."""
        with self._sdk_errors():
            return self._stub.GetUsage(_usage_request(request), **self._call_options(timeout, metadata))

    def close(self) -> None:
        """Closes the channel; calls in flight, and any made after, fail with LLMRelayError (CANCELLED)."""
        self._closed = True
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

    The arguments are Client's; interceptors are grpc.aio.ClientInterceptor. Its channel is made at its first call,
    in the event loop of that call, which is the only loop it then serves (grpc.aio's channels belong to one): make
    the client anywhere, at the top of a module too, and one in each event loop that calls (each asyncio.run).
    """

    _default_service_config = DEFAULT_SERVICE_CONFIG

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        service_config: ServiceConfig = DEFAULT_SERVICE_CONFIG,
        options: ChannelOptions = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        caller: str | None = None,
    ) -> None:
        settings = ChannelSettings(
            tls, root_certificates, private_key, certificate_chain, credentials, service_config, options
        )
        super().__init__(target, settings, channel is not None, timeout, metadata, caller)
        if channel is not None and interceptors:
            raise ValueError("grpc.aio takes interceptors when a channel is made: give them to the channel= you made")
        self._interceptors = interceptors
        self._channel = channel
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop of the first call, which made the channel (or first used the one given)."""
        self._loop_stub: pb.LLMServiceAsyncStub | None = None

    @property
    def _stub(self) -> pb.LLMServiceAsyncStub:
        """The stub over the channel, made in the running loop at the first call. A grpc.aio channel made outside it
        (at construction, with no loop running) belongs to another loop, and every call failed with RuntimeError,
        "... attached to a different loop"."""
        loop = asyncio.get_running_loop()
        if self._loop_stub is not None and loop is self._loop:
            return self._loop_stub
        if self._closed:
            raise LLMRelayError(grpc.StatusCode.CANCELLED, "the client is closed: make a new one to call")
        if self._loop is not None:
            raise RuntimeError(
                "this AsyncClient serves the event loop of its first call, and this call is in another one: make an "
                "AsyncClient in each event loop that calls (each asyncio.run)"
            )
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(
                    self.target, self._credentials, self.channel_options, interceptors=self._interceptors
                )
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.target, self.channel_options, interceptors=self._interceptors)
            )
        self._loop, self._loop_stub = loop, pb.LLMServiceStub(self._channel)
        return self._loop_stub

    async def complete(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> pb.CompleteResponse:
        """As Client.complete."""
        request = _completion_request(pb.CompleteRequest, messages, model, exact_model, options)
        with self._sdk_errors():
            return await self._stub.Complete(request, **self._call_options(timeout, metadata))

    def stream(
        self,
        messages: Iterable[MessageLike],
        *,
        model: str | None = None,
        exact_model: bool = False,
        on_interrupt: OnInterrupt | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> AsyncStream:
        """As Client.stream: `async with client.stream(...) as stream:` or `await stream.aclose()` cancels a stream
        kept in a variable."""
        request = _stream_request(messages, model, exact_model, on_interrupt, options)
        call_options = self._call_options(timeout, metadata)
        handle = CallHandle()

        async def chunks() -> AsyncGenerator[pb.StreamCompleteResponse, None]:
            heard = False
            with self._sdk_errors(lambda: heard):
                call = self._stub.StreamComplete(request, **call_options)
                handle.started(call)
                try:
                    async for chunk in call:
                        heard = True
                        yield chunk
                except asyncio.CancelledError:
                    # grpc.aio ends a read of a cancelled call so: by close() from another task, the end of the
                    # stream, unless this task is being cancelled itself.
                    task = asyncio.current_task()
                    if not handle.closed or (task is not None and task.cancelling()):
                        raise
                except grpc.RpcError:
                    # And so, AioRpcError(CANCELLED), when the cancel lands while the call waits for its status,
                    # the whole answer read: by aclose() from another task too, the end of the stream (as Client's).
                    if not handle.closed:
                        raise
                finally:
                    call.cancel()

        return AsyncStream(chunks(), handle)

    async def collect(
        self,
        messages: Iterable[MessageLike],
        *,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
        **options: Unpack[CompletionOptions],
    ) -> pb.CompleteResponse:
        """As Client.collect; on_delta may be an async function, awaited for each message."""
        assembler = StreamAssembler()
        async with self.stream(
            messages, model=model, exact_model=exact_model, on_interrupt="restart", timeout=timeout,
            metadata=metadata, **options,
        ) as chunks:  # fmt: skip
            async for chunk in chunks:
                assembler.add(chunk)
                if on_delta is not None and inspect.isawaitable(heard := on_delta(chunk)):
                    await heard
        return assembler.result()

    async def run_tools(
        self,
        messages: Iterable[MessageLike] | Conversation,
        tools: Tools,
        *,
        max_steps: int = DEFAULT_MAX_STEPS,
        on_delta: DeltaCallback | None = None,
        model: str | None = None,
        exact_model: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        tool_timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Unpack[RunToolsOptions],
    ) -> Answer:
        """As Client.run_tools; several tool calls run at once with asyncio.gather (plain functions in threads)."""
        _seconds("tool_timeout", tool_timeout, "no bound")
        conversation = _conversation(messages)
        steps = _Steps(conversation.messages, max_steps)
        definitions = tools.definitions()
        call_options: CompletionOptions = {**options, "tools": definitions}
        while True:
            with steps.kept_on_error():
                await self.fit(
                    conversation, model=model, tools=definitions, response_format=options.get("response_format"),
                    timeout=timeout, metadata=metadata,
                )  # fmt: skip
                if on_delta is not None:
                    response = await self.collect(
                        conversation.messages, on_delta=on_delta, model=model, exact_model=exact_model,
                        timeout=timeout, metadata=metadata, **call_options,
                    )  # fmt: skip
                else:
                    response = await self.complete(
                        conversation.messages, model=model, exact_model=exact_model, timeout=timeout,
                        metadata=metadata, **call_options,
                    )  # fmt: skip
            calls = steps.record(response)
            if not calls:
                return steps.answer()
            await steps.arun_calls(tools, calls, tool_timeout)

    async def fit(
        self,
        conversation: Conversation,
        *,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        response_format: ResponseFormatLike | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> int | None:
        """As Client.fit."""
        if conversation.budget_tokens is None:
            return None
        with conversation._fitting():
            while True:
                count = await self.count_tokens(
                    conversation.messages, model=conversation.model or model, tools=tools,
                    response_format=response_format, timeout=timeout, metadata=metadata,
                )  # fmt: skip
                if conversation.trim(count.token_count):
                    return count.token_count

    async def count_tokens(
        self,
        messages: Iterable[MessageLike] | None = None,
        *,
        text: str | None = None,
        model: str | None = None,
        tools: Sequence[pb.Tool] = (),
        response_format: ResponseFormatLike | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.CountTokensResponse:
        """As Client.count_tokens."""
        request = _count_request(messages, text, model, tools, response_format)
        with self._sdk_errors():
            return await self._stub.CountTokens(request, **self._call_options(timeout, metadata))

    async def embed(
        self,
        inputs: str | Iterable[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.EmbedResponse:
        """As Client.embed."""
        request = _embed_request(inputs, model, dimensions)
        with self._sdk_errors():
            return await self._stub.Embed(request, **self._call_options(timeout, metadata))

    async def health(
        self, *, probe: bool = False, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: Metadata | None = None
    ) -> pb.HealthResponse:
        with self._sdk_errors():
            return await self._stub.Health(pb.HealthRequest(probe=probe), **self._call_options(timeout, metadata))

    async def get_usage(
        self,
        request: pb.GetUsageRequest | Mapping[str, Any] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: Metadata | None = None,
    ) -> pb.GetUsageResponse:
        """Usage recorded in the gateway's ledger, by backend, model and caller: all of it, or what `request` (a
        pb.GetUsageRequest, or a dict of its fields: backend, model, caller, start_time, end_time) filters."""
        with self._sdk_errors():
            return await self._stub.GetUsage(_usage_request(request), **self._call_options(timeout, metadata))

    async def close(self) -> None:
        """Closes the channel; calls in flight, and any made after, fail with LLMRelayError (CANCELLED)."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
