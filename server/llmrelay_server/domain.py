"""The gateway's own vocabulary: chats, options, answers, usage, providers and errors.

Free of gRPC and HTTP on purpose: the servicer translates protobuf into these types, the router and the backends
speak only these, so each layer can be tested without the others.

Exceptions::

    LLMRelayError
    ├── InvalidRequestError          the caller's request is wrong (names the fields)
    ├── ModelNotFoundError           no backend serves the model
    ├── TokenizerUnavailableError    the encoding's file is not installed
    ├── AnswerTooLargeError          the answer exceeds the message size limit
    ├── RequestTooLargeError         the request exceeds the message size limit
    ├── ShuttingDownError            the gateway is draining: no new calls, and calls past the grace period end
    ├── UnauthenticatedError         no caller key, or an unknown one
    ├── ModelNotAllowedError         the caller's key may not use the model
    ├── LimitExceededError           a caller's or the gateway's limit is reached (names which)
    ├── LimitsUnavailableError       the limits' shared store is unreachable and calls are refused meanwhile
    ├── UsageUnavailableError        the usage ledger's database (or journal) cannot be read now
    ├── UpstreamError                one backend failed one attempt (kind says how)
    ├── AllBackendsFailedError       the chain is exhausted (carries the attempts)
    ├── DeadlineExceededError        the caller's deadline ran out (carries the attempts)
    └── StreamInterruptedError       a stream failed after its first chunk was sent (carries the attempts)
"""

from __future__ import annotations

import enum
import json
import math
import re
import sys
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar, dataclass_transform, runtime_checkable

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def immutable(cls: type[_T]) -> type[_T]:
    """A value type: a slots dataclass, hashable by its fields, whose fields mypy refuses to assign (it reads this
    decorator as `frozen=True`, PEP 681). Built without frozen=True's run-time guard, which sets every field through
    object.__setattr__ at about 1,500 instructions a field: the values a call makes (its messages, options, usage,
    attempts, chunks) cost a tenth of a plain call's instructions that way (README, Performance)."""
    return dataclass(cls, slots=True, unsafe_hash=True)


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.StrEnum):
    UNKNOWN = "unknown"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


@immutable
class ToolCall:
    """A function call the model asks the caller to make; arguments are JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str
    signature: str | None = None
    """The upstream's opaque signature of the call (Gemini's thought signature), sent back with it unchanged."""


@immutable
class JsonText:
    """A JSON object as the caller wrote it, checked to be one where it came in: upstreams that take JSON get these
    bytes unchanged (a protobuf Struct would have made every integer a double)."""

    text: str


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
"""No name (a model's, a backend's, a caller's) holds these: GetUsage's filters refuse them, so the ledger keeps an
upstream's name without them, and a NUL cannot even be stored in PostgreSQL's text."""


CALLER_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
"""A caller's name: a key's, or the one a caller without a key gives itself (x-llmrelay-caller)."""


FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a tool's function is named (and a response schema): OpenAI's rule, which Anthropic's takes within its own."""


class NotFiniteError(ValueError):
    """JSON text holds NaN, Infinity, or a number beyond a double's range."""


def read_json(text: str) -> Any:
    """The value of JSON text, as every JSON reader takes it: NaN and Infinity (not JSON, though Python's json reads
    them) and numbers beyond a double's range (1e400: JSON, but readers make it infinity or null, or refuse the whole
    request) raise NotFiniteError; other mistakes ValueError (json.JSONDecodeError), nesting too deep RecursionError."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_finite_integer)


def _no_constant(name: str) -> Any:
    raise NotFiniteError(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise NotFiniteError(f"{literal} is beyond the range of a double")
    return value


_DOUBLE_MAX_DIGITS: Final = len(str(int(sys.float_info.max)))
"""The digits of the largest double written out: an integer with more is beyond a double's range."""


def _finite_integer(literal: str) -> int:
    # An integer written out in digits is beyond a double's range as 1e400 is, to the readers that make it one.
    if len(literal.lstrip("-")) >= _DOUBLE_MAX_DIGITS and not math.isfinite(float(literal)):
        raise NotFiniteError(f"{literal[:20]}... ({len(literal)} characters) is beyond the range of a double")
    return int(literal)


@immutable
class TextPart:
    text: str


class ImageDetail(enum.StrEnum):
    AUTO = "auto"
    LOW = "low"
    HIGH = "high"


@immutable
class ImagePart:
    """An image by URL, or its bytes with their media type (image/png, image/jpeg, image/gif, image/webp)."""

    url: str | None = None
    data: bytes | None = None
    media_type: str | None = None
    detail: ImageDetail | None = None


ContentPart = TextPart | ImagePart


@immutable
class Message:
    role: Role
    content: str = ""
    """The text; a message with `parts` has none."""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None
    parts: tuple[ContentPart, ...] = ()
    """The content as text and image parts, instead of `content`."""
    reasoning_signature: str | None = None
    """The upstream's signature of `reasoning` (Anthropic's thinking blocks), sent back with it unchanged."""


@immutable
class Tool:
    """A function the model may call; parameters is a JSON Schema object."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | JsonText | None = None
    strict: bool | None = None


@immutable
class JsonSchemaFormat:
    name: str
    schema: Mapping[str, Any] | JsonText
    description: str | None = None
    strict: bool | None = None


@immutable
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


ToolChoiceMode = Literal["none", "auto", "required"]


@immutable
class NamedToolChoice:
    """The one function the model must call."""

    name: str


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


@immutable
class CompletionOptions:
    """Sampling and output options; None (or empty) means unset, and unset options are not sent upstream."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    reasoning_effort: ReasoningEffort | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    parallel_tool_calls: bool | None = None


@immutable
class CompletionRequest:
    """What the caller asked for; model None means the default chain, exact_model forbids substitution."""

    messages: tuple[Message, ...]
    model: str | None = None
    options: CompletionOptions = field(default_factory=CompletionOptions)
    exact_model: bool = False
    restart_on_interrupt: bool = False
    """A stream that breaks after it started runs again on the next route, after a restart marker."""


@immutable
class Cost:
    """What tokens cost, in millionths of a US dollar: integers, so that totals over many answers stay exact."""

    usd_micros: int
    estimated: bool = False
    """Not exact: the gateway counted the tokens, or the model has no known price."""
    price_unknown: bool = False
    """A paid backend's model with no known price: usd_micros is at the configured default rate."""

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            usd_micros=self.usd_micros + other.usd_micros,
            estimated=self.estimated or other.estimated,
            price_unknown=self.price_unknown or other.price_unknown,
        )


MAX_TOKEN_COUNT = 2**31 - 1
"""The most tokens a count or a usage holds: the contract carries them as int32. No prompt or answer comes near it;
a count past it (a message of a million images, each counted at its most) says "at least this many"."""


@immutable
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False
    reasoning_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    cache_write_prompt_tokens: int | None = None
    """Of the prompt, the tokens written to the upstream's cache (Anthropic's cache writes), which cost more than the
    rest of it; none of them among cached_prompt_tokens."""
    cost: Cost | None = None
    """Set by the router, which knows the prices; a provider leaves it unset."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def with_cost(self, cost: Cost) -> TokenUsage:
        """This usage with its cost: what dataclasses.replace(self, cost=cost) makes, at a sixth of its time (every
        answer is priced once)."""
        return TokenUsage(
            self.prompt_tokens,
            self.completion_tokens,
            self.estimated,
            self.reasoning_tokens,
            self.cached_prompt_tokens,
            self.cache_write_prompt_tokens,
            cost,
        )

    def __add__(self, other: TokenUsage) -> TokenUsage:
        """The usage of two attempts together: estimated if either was; costs add up, an unset one counting as none.
        Counts that together would pass MAX_TOKEN_COUNT (each attempt's fits; a restarted stream's may not) stop
        there, estimated: the contract's total cannot carry more, and says "at least this many"."""
        prompt = self.prompt_tokens + other.prompt_tokens
        completion = self.completion_tokens + other.completion_tokens
        reasoning = _sum_known(self.reasoning_tokens, other.reasoning_tokens)
        cached = _sum_known(self.cached_prompt_tokens, other.cached_prompt_tokens)
        written = _sum_known(self.cache_write_prompt_tokens, other.cache_write_prompt_tokens)
        estimated = self.estimated or other.estimated
        if prompt + completion > MAX_TOKEN_COUNT:
            prompt = min(prompt, MAX_TOKEN_COUNT)
            completion = min(completion, MAX_TOKEN_COUNT - prompt)
            reasoning = None if reasoning is None else min(reasoning, completion)
            cached = None if cached is None else min(cached, prompt)
            written = None if written is None else min(written, prompt - (cached or 0))
            estimated = True
        return TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimated=estimated,
            reasoning_tokens=reasoning,
            cached_prompt_tokens=cached,
            cache_write_prompt_tokens=written,
            cost=other.cost if self.cost is None else self.cost if other.cost is None else self.cost + other.cost,
        )


def _sum_known(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


class StoreRole(enum.StrEnum):
    USAGE_LEDGER = "usage_ledger"
    LIMITS = "limits"


@immutable
class StoreHealth:
    """A store the gateway keeps state in, as this process last used it."""

    role: StoreRole
    kind: str
    """"sqlite", "postgresql", "redis" or "in_process"."""
    available: bool
    description: str = ""
    """Why it is unavailable, in words a person can act on; never a password."""
    pending_records: int = 0
    """Usage records in this process's journal on disk, waiting for the ledger."""


class AttemptOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    AUTH_FAILED = "auth_failed"
    MODEL_NOT_FOUND = "model_not_found"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"  # the call ended (the caller left, a shutdown) mid-attempt; a caller's deadline: TIMEOUT


ModelFilter = Callable[[str], bool]
"""Whether the caller may have a model ("gpt-4o", or backend-qualified "ollama/tiny") answer: its key's models."""


@immutable
class Attempt:
    backend: str
    model: str
    outcome: AttemptOutcome
    duration_s: float
    upstream_status: int | None = None
    error: str = ""
    started_at: float | None = None
    """When it began, in Unix time (for traces); None where its backend was never asked (a route passed over: its
    circuit open, or its context window too small)."""
    quoted: str = ""
    """The upstream's own words in `error` (UpstreamError.quoted)."""

    def ended(
        self, outcome: AttemptOutcome, duration_s: float, upstream_status: int | None, error: str, quoted: str = ""
    ) -> Attempt:
        """This attempt as it ended (a stream's, recorded when its first chunk came): dataclasses.replace's result,
        at a fraction of its time."""
        return Attempt(self.backend, self.model, outcome, duration_s, upstream_status, error, self.started_at, quoted)


@immutable
class CompletionResponse:
    id: str
    backend: str
    model: str
    message: Message
    finish_reason: FinishReason
    usage: TokenUsage
    attempts: tuple[Attempt, ...] = ()

    def settled(self, usage: TokenUsage, attempts: tuple[Attempt, ...]) -> CompletionResponse:
        """This answer with the usage it was billed and the call's attempts: dataclasses.replace's result, at a sixth
        of its time."""
        return CompletionResponse(self.id, self.backend, self.model, self.message, self.finish_reason, usage, attempts)


@immutable
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    signature: str | None = None
    """The call's signature (ToolCall.signature), whole, in one fragment of the call."""


@immutable
class StreamRestart:
    """The answer starts over: the stream of the attempt before broke after it had started."""

    reason: str
    backend: str
    attempts: tuple[Attempt, ...]
    usage: TokenUsage
    """What the broken attempt consumed (billed)."""


@immutable
class CompletionChunk:
    """One piece of a streamed answer. The last chunk of a stream has finish_reason set, and usage (a provider leaves
    it unset when the upstream reported none: the router estimates it); a chunk with `restart` set carries nothing
    else and starts the answer over."""

    id: str
    backend: str
    model: str
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: FinishReason | None = None
    usage: TokenUsage | None = None
    attempts: tuple[Attempt, ...] = ()
    restart: StreamRestart | None = None
    reasoning_signature: str | None = None
    """On the last chunk: the upstream's signature of the reasoning (Message.reasoning_signature)."""
    prompt_usage: TokenUsage | None = None
    """The prompt's tokens as the upstream reported them before the answer (Anthropic's message_start), its
    completion_tokens 0; None from an upstream that reports usage at the end alone. A stream that breaks, or ends
    without its usage, is billed these for its prompt (cache reads among them), its answer counted by the gateway."""

    def settled(self, usage: TokenUsage, attempts: tuple[Attempt, ...]) -> CompletionChunk:
        """This last chunk with the usage the answer was billed and the call's attempts (as
        CompletionResponse.settled)."""
        return CompletionChunk(
            self.id,
            self.backend,
            self.model,
            self.content,
            self.reasoning,
            self.tool_calls,
            self.finish_reason,
            usage,
            attempts,
            self.restart,
            self.reasoning_signature,
            self.prompt_usage,
        )


@immutable
class EmbeddingRequest:
    """Texts to turn into vectors; model None means the first backend's default embedding model."""

    inputs: tuple[str, ...]
    model: str | None = None
    dimensions: int | None = None
    """Shorter vectors, from a model that can shorten them (OpenAI's text-embedding-3)."""


@immutable
class EmbeddingResponse:
    backend: str
    model: str
    vectors: tuple[bytes, ...]
    """One per input, in the inputs' order, as little-endian 32-bit floats: the layout of OpenAI's base64 answer and
    of protobuf's packed floats alike, so a vector goes from upstream to caller with no Python object per dimension."""
    usage: TokenUsage
    """Prompt tokens only; an embedding has no completion."""
    attempts: tuple[Attempt, ...] = ()


@immutable
class TokenCount:
    tokens: int
    model: str
    encoding: str
    estimated: bool


@immutable
class BackendHealth:
    name: str
    kind: str
    base_url: str
    default_model: str
    reachable: bool
    models: tuple[str, ...] = ()
    latency_s: float | None = None
    last_error: str | None = None
    checked_at: float | None = None
    """Unix time of the probe."""


@immutable
class BackendSpec:
    """One upstream as configured. api_key never appears in repr, so it cannot leak into a log line."""

    name: str
    kind: str
    base_url: str
    default_model: str
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()
    """Models this backend is known to serve beyond its default (matched before asking upstream)."""
    fallback: bool = True
    """Whether the backend may take over requests that named another backend's model."""
    context_window: int | None = None
    """The largest prompt the backend's model takes, when known; used to skip a backend a prompt cannot fit."""
    default_max_tokens: int | None = None
    """The answer's length limit sent when a request sets none, for upstreams that require one (Anthropic's)."""
    embedding_model: str | None = None
    """The embedding model an Embed that names none gets here; None: the backend serves no embeddings."""
    embedding_models: tuple[str, ...] = ()
    """More embedding models the backend serves, for Embed calls that name them."""

    @property
    def all_embedding_models(self) -> tuple[str, ...]:
        """Every embedding model configured, the default first; none when the backend serves no embeddings."""
        return (self.embedding_model, *self.embedding_models) if self.embedding_model else ()


class StreamLimits(NamedTuple):
    """The router's limits on a stream after its first chunk: a wait of a provider's own that may end an answer whole
    (for its usage, after its finish reason) ends within them, or the router ends the stream as stalled first."""

    idle_s: float = math.inf
    """How long the router waits for each next chunk, from when the provider last gave one."""
    deadline: float = math.inf
    """The event loop's time by which the stream must have ended."""


UNLIMITED_STREAM: Final = StreamLimits()
"""No limit on a stream's waits: a provider's stream read by anything but the router (a test, a tool)."""


class LLMProvider(Protocol):
    """One upstream. Implementations raise UpstreamError for every upstream failure, never foreign exceptions."""

    @property
    def spec(self) -> BackendSpec: ...

    async def complete(
        self, model: str, request: CompletionRequest, *, timeout_s: float | None
    ) -> CompletionResponse: ...

    def stream(
        self, model: str, request: CompletionRequest, limits: StreamLimits = UNLIMITED_STREAM
    ) -> AsyncGenerator[CompletionChunk, None]:
        """The answer as it comes; the router times its chunks (the first, then the gaps between them, `limits`)."""
        ...

    async def count_tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> TokenCount | None:
        """The backend's own exact count, or None when it cannot tokenize (the caller then uses tiktoken)."""
        ...

    def answer_tokens_asked(self, request: CompletionRequest) -> int | None:
        """The most tokens the upstream is asked to answer `request` with (its max_tokens as sent, or more that the
        backend adds, such as thinking's budget); None where the request sets none and the upstream's own limit
        applies."""
        ...

    async def health(self) -> BackendHealth:
        """The upstream as a probe finds it; ProbeNotMade when the gateway could not make the probe for a bound of its
        own, which says nothing of the upstream."""
        ...

    @property
    def connections_all_in_use(self) -> bool:
        """Whether every connection the gateway may open to the upstream is serving a call: a probe would wait behind
        them, and be taken for the upstream's silence."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EmbeddingProvider(LLMProvider, Protocol):
    """An upstream that also turns texts into vectors (not every kind can)."""

    async def embed(self, model: str, request: EmbeddingRequest, *, timeout_s: float | None) -> EmbeddingResponse: ...


ProviderConstructor = Callable[[BackendSpec], LLMProvider]


class ProviderFactory:
    """Builds providers from specs by their kind; the kinds are registered explicitly at assembly."""

    def __init__(self, constructors: Mapping[str, ProviderConstructor]) -> None:
        self._constructors = dict(constructors)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._constructors)

    def create(self, spec: BackendSpec) -> LLMProvider:
        try:
            constructor = self._constructors[spec.kind]
        except KeyError:
            known = ", ".join(sorted(self._constructors))
            raise ValueError(f"backend {spec.name!r}: unknown kind {spec.kind!r} (known: {known})") from None
        return constructor(spec)


# --- errors ---------------------------------------------------------------------------------------------------


class ProbeNotMade(Exception):
    """A probe the gateway could not make for a bound of its own (no file left for a connection: `ulimit -n`): the
    upstream's last probe's result stands."""


class LLMRelayError(Exception):
    """The root of the gateway's errors; only the servicer turns them into gRPC statuses."""


@immutable
class FieldViolation:
    field: str
    description: str


class InvalidRequestError(LLMRelayError):
    """The request's every wrong field is in `violations`; its text, and the status a caller gets, report the first
    few (`reported`, each cut short) and say how many more there were.

    A status goes out in the trailers twice, as grpc-message and in grpc-status-details-bin, and gRPC refuses trailers
    over 8 KiB (some of the time; every time over 16 KiB): a report of every violation of a long chat would turn the
    INVALID_ARGUMENT into a RESOURCE_EXHAUSTED that names nothing.
    """

    MAX_REPORTED = 20
    MAX_CHARS = 128
    """Each reported field path and description is cut to this many characters (the gateway's own are shorter)."""
    REPORTED_BYTES = 1024
    """The UTF-8 bytes of the reported fields and descriptions together, at most. One violation always fits (2 x 128
    characters of 4 bytes at most); repeated, percent- and base64-encoded, they make trailers of under 8 KiB whatever
    the text, about 4 KiB when it is ASCII."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        self.reported = self._first(self.violations)
        self.unreported = len(self.violations) - len(self.reported)
        text = "; ".join(f"{v.field}: {v.description}" for v in self.reported)
        super().__init__(f"{text}; ... and {self.unreported} more" if self.unreported else text)

    @classmethod
    def _first(cls, violations: Sequence[FieldViolation]) -> tuple[FieldViolation, ...]:
        reported: list[FieldViolation] = []
        size = 0
        for violation in violations[: cls.MAX_REPORTED]:
            cut = FieldViolation(cls._cut(violation.field), cls._cut(violation.description))
            size += len(cut.field.encode(errors="surrogatepass")) + len(cut.description.encode(errors="surrogatepass"))
            if size > cls.REPORTED_BYTES:
                break
            reported.append(cut)
        return tuple(reported)

    @classmethod
    def _cut(cls, text: str) -> str:
        return text if len(text) <= cls.MAX_CHARS else text[: cls.MAX_CHARS - 3] + "..."


class ModelNotFoundError(LLMRelayError):
    def __init__(self, model: str, served: Sequence[str], remedy: str = "") -> None:
        self.model = model
        self.served = tuple(served)
        detail = f"; {remedy}" if remedy else ""
        super().__init__(f"no backend serves model {model!r}; served: {', '.join(self.served) or 'none'}{detail}")


class TokenizerUnavailableError(LLMRelayError):
    def __init__(self, encoding: str, detail: str) -> None:
        self.encoding = encoding
        super().__init__(f"tokenizer encoding {encoding!r} is not available: {detail}")


class AnswerTooLargeError(LLMRelayError):
    def __init__(self, size: int, limit: int, remedy: str = "use StreamComplete, or a lower max_tokens") -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"the answer is {size} bytes, over the gateway's {limit}-byte message limit; {remedy}")


class RequestTooLargeError(LLMRelayError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        remedy = "send less in a call (an image by its URL rather than its bytes), or raise server.max_message_bytes"
        super().__init__(f"the request is {size} bytes, over the gateway's {limit}-byte message limit; {remedy}")


class ShuttingDownError(LLMRelayError):
    def __init__(self, *, stream_started: bool = False, in_flight: bool = False) -> None:
        self.stream_started = stream_started
        if in_flight:
            message = (
                "the gateway shut down before the call could finish (its grace period ended, or it was told to stop"
                " now)"
            )
        else:
            message = "the gateway is shutting down and takes no new calls"
        super().__init__(f"{message}; retry, on another instance")


class UnauthenticatedError(LLMRelayError):
    """The call has no key, or a key the gateway does not know."""


class ModelNotAllowedError(LLMRelayError):
    def __init__(self, caller: str, model: str) -> None:
        self.caller = caller
        self.model = model
        super().__init__(f"the key {caller!r} may not use model {model!r}; ask for a model its patterns allow")


class UsageNotAllowedError(LLMRelayError):
    def __init__(self, caller: str, requested: str) -> None:
        self.caller = caller
        self.requested = requested
        super().__init__(
            f"the key {caller!r} may read only its own usage, not that of caller {requested!r}; leave GetUsage's"
            " caller unset for its own, or use a key with read_all_usage"
        )


class LimitKind(enum.StrEnum):
    """What a limit counts; the value is its ErrorInfo reason."""

    REQUESTS_PER_MINUTE = "REQUESTS_PER_MINUTE_EXCEEDED"
    TOKENS_PER_MINUTE = "TOKENS_PER_MINUTE_EXCEEDED"
    CONCURRENT_STREAMS = "CONCURRENT_STREAMS_EXCEEDED"
    BUDGET_PER_DAY = "BUDGET_EXCEEDED"
    CONCURRENT_CALLS = "CONCURRENT_CALLS_EXCEEDED"
    """The gateway's bound on calls in progress at once (server.max_concurrent_rpcs): kept by each process alone."""


class LimitExceededError(LLMRelayError):
    def __init__(self, kind: LimitKind, subject: str, description: str, retry_after_s: float | None) -> None:
        self.kind = kind
        self.subject = subject
        """Whose limit: "key:NAME", or "gateway"."""
        self.description = description
        self.retry_after_s = retry_after_s
        """When the call would fit; None when it never will (it alone asks more than the limit), as no wait helps."""
        retry = "" if retry_after_s is None else f"; retry in {retry_after_s:.1f} s"
        super().__init__(f"{subject}: {description}{retry}")


class LimitsUnavailableError(LLMRelayError):
    """The store the gateways share their limits in cannot be reached, and state.on_unavailable is deny: a call
    that cannot be counted is refused rather than admitted past the limits."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            "the gateway cannot check this call against its limits (their store is unreachable) and refuses calls"
            f" until it is back; retry in {retry_after_s:.1f} s"
        )


class UsageUnavailableError(LLMRelayError):
    """The usage ledger's database cannot be read now (usage goes on being recorded, in the journal on disk), or its
    journal cannot (`journal`): the totals would be short of what it holds."""

    def __init__(self, retry_after_s: float, *, journal: bool = False) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the usage ledger's journal on disk cannot be read now (its server's log says why); retry in"
            f" {retry_after_s:.0f} s"
            if journal
            else "the usage ledger's database cannot be read now; usage is still recorded and will be there once it"
            f" is back; retry in {retry_after_s:.0f} s"
        )


class UpstreamErrorKind(enum.StrEnum):
    """How an attempt failed, which decides what the router does next."""

    UNREACHABLE = "unreachable"  # retry, then next backend
    TIMEOUT = "timeout"  # retry, then next backend
    RATE_LIMITED = "rate_limited"  # retry after Retry-After, then next backend
    SERVER_ERROR = "server_error"  # retry, then next backend
    BAD_RESPONSE = "bad_response"  # the upstream answered garbage: next backend
    AUTH_FAILED = "auth_failed"  # our own key refused: next backend
    MODEL_NOT_FOUND = "model_not_found"  # next backend
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # next backend, if it has a longer context
    REJECTED = "rejected"  # the request itself is wrong: back to the caller at once
    SILENT = "silent"  # took the request, then sent nothing within the first-chunk limit: next backend at once
    UNSUPPORTED = "unsupported"  # the backend's dialect has no place for something the request holds: not sent; next
    BUSY = "busy"  # every connection this gateway may open to it is in use: not the upstream's failure; next backend

    @property
    def attempt_outcome(self) -> AttemptOutcome:
        if self is UpstreamErrorKind.BAD_RESPONSE:
            return AttemptOutcome.SERVER_ERROR
        if self is UpstreamErrorKind.SILENT:
            return AttemptOutcome.TIMEOUT
        if self is UpstreamErrorKind.UNSUPPORTED:
            return AttemptOutcome.REJECTED
        if self is UpstreamErrorKind.BUSY:
            return AttemptOutcome.UNREACHABLE
        return AttemptOutcome(self.value)


class UpstreamError(LLMRelayError):
    def __init__(
        self,
        kind: UpstreamErrorKind,
        backend: str,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        quoted: str = "",
        consumed: TokenUsage | None = None,
    ) -> None:
        self.kind = kind
        self.backend = backend
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.quoted = quoted
        """The upstream's own words in `message` (its error's message or body, an error event's; redacted), which
        may repeat the request (a 422 quoting its input, a content filter's): they go back to the call's caller and
        nowhere else (`without_quotes`), unless server.log_content lets the log and traces have them too."""
        self.consumed = consumed
        """What the upstream used on an answer the gateway could not pass on (vectors not of the dimensions asked):
        billed all the same, as the upstream read the request whatever became of its answer."""
        self.attempts: tuple[Attempt, ...] | None = None
        """The call's attempts when this error ends the call (a rejected request goes back to the caller at once);
        None while it is one attempt's failure."""
        super().__init__(f"{backend}: {message}")


def without_quotes(text: str, quoted: Iterable[str]) -> str:
    """`text` with the upstream's words in it (UpstreamError.quoted, Attempt.quoted) left out, their length said
    instead: what may be said beyond the call they failed (the log, traces, another call)."""
    for words in sorted({words for words in quoted if words}, key=len, reverse=True):
        text = text.replace(words, f"[the upstream's words: {len(words)} characters]")
    return text


class _AttemptsError(LLMRelayError):
    def __init__(self, message: str, attempts: Sequence[Attempt]) -> None:
        self.attempts = tuple(attempts)
        super().__init__(message)

    @property
    def last_upstream_error(self) -> UpstreamError | None:
        cause = self.__cause__
        return cause if isinstance(cause, UpstreamError) else None


class CallEstimate(NamedTuple):
    """The most a model call may be billed for, which its limits reserve."""

    answers: int
    """How many answers: one, or a stream's routes when it starts over on the next when broken."""
    answer_tokens: int
    """The most tokens they may answer with, together."""
    usd_micros: int
    """What they may cost, at most."""


class AllBackendsFailedError(_AttemptsError):
    """Every backend that could serve failed; __cause__ is the last UpstreamError."""

    def __init__(
        self,
        message: str,
        attempts: Sequence[Attempt],
        *,
        retry_after_s: float | None = None,
        causes: Set[UpstreamErrorKind] = frozenset(),
    ) -> None:
        super().__init__(message, attempts)
        self.retry_after_s = retry_after_s
        """The soonest a backend may serve again, where known (a Retry-After, a circuit's cool-down)."""
        self.causes = causes
        """How the attempts failed, those skipped for an open circuit included (as UNREACHABLE)."""


class DeadlineExceededError(_AttemptsError):
    """The caller's deadline ran out before an answer was complete."""

    def __init__(self, message: str, attempts: Sequence[Attempt], *, routed: bool = True) -> None:
        super().__init__(message, attempts)
        self.routed = routed
        """False where it ran out before the call could be routed (counting a prompt of megabytes): its status then
        tells no attempts, as no backend was asked."""


class StreamInterruptedError(_AttemptsError):
    """A stream broke after its first chunk reached the caller, and no restart could finish it."""

    def __init__(self, cause: UpstreamError, attempts: Sequence[Attempt] = (), *, after: str = "") -> None:
        self.backend = cause.backend
        self.cause = cause
        super().__init__(
            f"the stream from {cause.backend} failed after it had started: {cause.message}{after}", attempts
        )
