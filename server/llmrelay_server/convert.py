"""Protobuf <-> domain types, with the validation of every request field on the way in.

Validation collects every violation (not just the first), so a caller fixes a request in one round trip.
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from llmrelay import v1 as pb

from llmrelay_server import images
from llmrelay_server.domain import (
    CALLER_NAME,
    CONTROL_CHARACTERS,
    FUNCTION_NAME,
    AnswerTooLargeError,
    Attempt,
    AttemptOutcome,
    BackendHealth,
    CompletionChunk,
    CompletionOptions,
    CompletionRequest,
    CompletionResponse,
    ContentPart,
    Cost,
    EmbeddingRequest,
    EmbeddingResponse,
    FieldViolation,
    FinishReason,
    ImageDetail,
    ImagePart,
    InvalidRequestError,
    JsonSchemaFormat,
    JsonText,
    Message,
    NamedToolChoice,
    ReasoningEffort,
    ResponseFormat,
    Role,
    StoreHealth,
    TextPart,
    TokenUsage,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
    read_json,
)
from llmrelay_server.usage import UsageTotals

MAX_MESSAGES: Final = 10_000
# Counts of a request's repeated entries, each checked (len() of a repeated field costs nothing) before any entry is:
# validating an entry costs microseconds of Python on the event loop, and a request of millions of tiny ones fits
# server.max_message_bytes (250,000 tools or 600,000 text parts in 4 MiB held every other call, Health's too, for
# 1.3-2 s). Measured on the 2-core development machine: 1,000 tools take 9-15 ms, 10,000 image parts in one message
# 35-46 ms, 10,000 tool calls 30 ms; the largest request all the bounds allow, 10,000 messages of a part and a call
# each, 130-180 ms, about twice what MAX_MESSAGES's 10,000 plain messages take alone (60-90 ms).
MAX_TOOLS: Final = 1_000
"""The tools of a request. OpenAI's API takes 128; the rest is room for other upstreams."""
MAX_PARTS: Final = 10_000
"""The content parts of a request, over all its messages together (a bound per message would let MAX_MESSAGES
messages hold that many each): as many as MAX_MESSAGES messages of one part each."""
MAX_TOOL_CALLS: Final = 10_000
"""The tool calls of a request, over all its messages together (as MAX_PARTS). A chat that goes on has answered
every call with a tool message of its own, so that it holds fewer calls than MAX_MESSAGES anyway."""
MAX_MODEL_NAME: Final = 256
MAX_TOKENS_LIMIT: Final = 10_000_000
MAX_STOP_SEQUENCES: Final = 4
MAX_EMBEDDING_INPUTS: Final = 2048
"""OpenAI's own bound on the inputs of one embedding request."""
MAX_DIMENSIONS: Final = 65_536
MAX_JSON_DEPTH: Final = 512
"""The deepest a caller's JSON text (tool parameters, a response schema) may nest. Readers after the request's own
(the token count, Anthropic's input_schema) read it again deeper in the stack: text nested near Python's recursion
limit would pass here and raise RecursionError there, an UNKNOWN status, by a few levels of stack either way."""

_ROLES: Final[Mapping[pb.Role.ValueType, Role]] = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_ROLES_OUT: Final[Mapping[Role, pb.Role.ValueType]] = {role: number for number, role in _ROLES.items()}
_EFFORTS: Final[Mapping[int, ReasoningEffort]] = {
    pb.REASONING_EFFORT_NONE: "none",
    pb.REASONING_EFFORT_MINIMAL: "minimal",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
}
_TOOL_CHOICES: Final[Mapping[int, ToolChoiceMode]] = {
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_FORMATS: Final[Mapping[int, Any]] = {
    pb.RESPONSE_FORMAT_TYPE_TEXT: "text",
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}
_IMAGE_DETAILS: Final[Mapping[int, ImageDetail]] = {
    pb.IMAGE_DETAIL_AUTO: ImageDetail.AUTO,
    pb.IMAGE_DETAIL_LOW: ImageDetail.LOW,
    pb.IMAGE_DETAIL_HIGH: ImageDetail.HIGH,
}
_JSON_KINDS: Final[Mapping[type, str]] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}
# Whether to restart a broken stream, by policy; unset means abort.
_INTERRUPT_POLICIES: Final[Mapping[int, bool]] = {
    pb.INTERRUPT_POLICY_ABORT: False,
    pb.INTERRUPT_POLICY_RESTART: True,
}
_FINISH_REASONS_OUT: Final = {
    FinishReason.UNKNOWN: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
}
_OUTCOMES_OUT: Final = {
    outcome: pb.AttemptOutcome.Value(f"ATTEMPT_OUTCOME_{outcome.name}") for outcome in AttemptOutcome
}


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidRequestError(self.items)


# --- requests -------------------------------------------------------------------------------------------------


# The call's request as last parsed, with the bound it was parsed under: the limits interceptor parses it to reserve
# its tokens, and the servicer then takes that one rather than parsing the same request again.
_parsed: contextvars.ContextVar[tuple[object, int | None, CompletionRequest] | None] = contextvars.ContextVar(
    "llmrelay_parsed_request", default=None
)


def completion_request(
    request: pb.CompleteRequest | pb.StreamCompleteRequest, *, max_image_bytes: int | None = None
) -> CompletionRequest:
    """The request in domain terms. max_image_bytes bounds an image's bytes (server.max_image_bytes); None bounds
    nothing. Parsed once a call: asked again for the same request and bound, the first answer is given."""
    if (parsed := _parsed.get()) is not None and parsed[0] is request and parsed[1] == max_image_bytes:
        return parsed[2]
    completion = _completion_request(request, max_image_bytes)
    _parsed.set((request, max_image_bytes, completion))
    return completion


def _completion_request(
    request: pb.CompleteRequest | pb.StreamCompleteRequest, max_image_bytes: int | None
) -> CompletionRequest:
    errors = _Violations()
    model = _chain_model(request, errors)
    messages = _messages(request.messages, errors, "messages", max_image_bytes, goes_on=True)
    options = _options(request.options, errors) if request.HasField("options") else CompletionOptions()
    restart = isinstance(request, pb.StreamCompleteRequest) and _enum(
        request.on_interrupt, _INTERRUPT_POLICIES, "on_interrupt", errors
    )
    errors.raise_if_any()
    return CompletionRequest(
        messages=messages,
        model=model,
        options=options,
        exact_model=request.exact_model,
        restart_on_interrupt=bool(restart),
    )


def _chain_model(
    request: pb.CompleteRequest | pb.StreamCompleteRequest | pb.CountTokensRequest, errors: _Violations
) -> str | None:
    """The model asked for, or None for the default chain's."""
    return _model(request, "the default chain", errors)


def _model(request: Any, unset: str, errors: _Violations) -> str | None:
    """The request's model name, None when unset (`unset` says what answers then)."""
    model: str | None = request.model if request.HasField("model") else None
    if model is not None and not 0 < len(model) <= MAX_MODEL_NAME:
        errors.add("model", f"must be 1 to {MAX_MODEL_NAME} characters, or unset for {unset}")
    elif model is not None and CONTROL_CHARACTERS.search(model):
        errors.add("model", "must hold no control characters (a NUL, a newline)")
    return model


class CountQuery(NamedTuple):
    """What CountTokens counts, in the order Router.count_tokens takes it."""

    model: str | None
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...]
    text: str | None
    response_format: ResponseFormat | None


def count_request(request: pb.CountTokensRequest, *, max_image_bytes: int | None = None) -> CountQuery:
    errors = _Violations()
    model = _chain_model(request, errors)
    text = request.text if request.HasField("text") else None
    if text is not None and request.messages:
        errors.add("text", "give either text or messages, not both")
    if text is not None and request.tools:
        # A plain text is counted alone: tools are part of a chat's count, and silently left out they would not be.
        errors.add("tools", "tools are counted with messages (a chat), not with a plain text")
    # A chat counted as it stands, its last calls maybe not answered yet (an agent weighing its history).
    messages = _messages(request.messages, errors, "messages", max_image_bytes, goes_on=False) if text is None else ()
    tools = _tools(request.tools, errors, "tools") or ()
    response_format = None
    if request.HasField("response_format"):
        if text is not None:
            errors.add("response_format", "an answer format is counted with messages (a chat), not with a plain text")
        response_format = _response_format(request.response_format, "response_format", errors)
    errors.raise_if_any()
    return CountQuery(model, messages, tools, text, response_format)


class UsageQuery(NamedTuple):
    """GetUsage's filters and time window (Unix seconds), in the order UsageLedger.query takes them."""

    backend: str | None
    model: str | None
    caller: str | None
    start: float | None
    end: float | None


def usage_query(request: pb.GetUsageRequest) -> UsageQuery:
    errors = _Violations()
    start = _instant(request.start_time, "start_time", errors) if request.HasField("start_time") else None
    end = _instant(request.end_time, "end_time", errors) if request.HasField("end_time") else None
    if start is not None and end is not None and request.start_time.ToNanoseconds() > request.end_time.ToNanoseconds():
        # A window that ends before it starts holds nothing: bounds swapped, whose answer would be "no usage" as if
        # there were none to find.
        errors.add("end_time", "must not be before start_time: the window is from start_time up to end_time")
    for name in ("backend", "model"):
        if not request.HasField(name):
            continue
        if not (value := getattr(request, name)):
            # None is named so: its answer would be "no usage" as if there were none to find (an unset variable).
            errors.add(name, f"must not be empty: leave it unset for every {name}")
        elif CONTROL_CHARACTERS.search(value):
            errors.add(name, "must hold no control characters (a NUL, a newline)")
    # No caller is named otherwise, and one that long would be quoted back whole in a refusal's details, past what
    # gRPC lets trailers carry. "" too: no caller has it, and its answer would be "no usage" as if there were none.
    if request.HasField("caller") and not CALLER_NAME.fullmatch(request.caller):
        errors.add("caller", "must be a caller's name: 1-128 letters, digits and ._:@/-")
    errors.raise_if_any()
    return UsageQuery(
        backend=request.backend if request.HasField("backend") else None,
        model=request.model if request.HasField("model") else None,
        caller=request.caller if request.HasField("caller") else None,
        start=start,
        end=end,
    )


def embedding_request(request: pb.EmbedRequest, max_answer_bytes: int | None = None) -> EmbeddingRequest:
    """The request, validated; with `max_answer_bytes`, refused (AnswerTooLargeError) when it sets the dimensions and
    its vectors alone cannot fit in an answer of that size: known before any backend is asked, or any limit taken, so
    that the caller is not billed for vectors it would not get."""
    errors = _Violations()
    model = _model(request, "the default embedding model", errors)
    inputs = tuple(request.inputs)
    if not inputs:
        errors.add("inputs", "at least one text is required")
    elif len(inputs) > MAX_EMBEDDING_INPUTS:
        errors.add("inputs", f"at most {MAX_EMBEDDING_INPUTS} texts a request; send the rest in another")
    else:
        for i, text in enumerate(inputs):
            if not text:
                errors.add(f"inputs[{i}]", "must not be empty")
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions is not None and not 1 <= dimensions <= MAX_DIMENSIONS:
        errors.add("dimensions", f"must be between 1 and {MAX_DIMENSIONS}, or unset for the model's own")
    errors.raise_if_any()
    if max_answer_bytes is not None and dimensions is not None:
        at_least = len(inputs) * _embedding_field_bytes(dimensions)
        if at_least > max_answer_bytes:
            raise AnswerTooLargeError(at_least, max_answer_bytes, f"{FEWER_VECTORS} (nothing was sent)")
    return EmbeddingRequest(inputs=inputs, model=model, dimensions=dimensions)


FEWER_VECTORS: Final = "send fewer inputs a call, or ask for fewer dimensions"


def _instant(timestamp: Timestamp, where: str, errors: _Violations) -> float | None:
    """Unix seconds, rounded up to a whole one: usage is kept by minutes that start on a whole second, so a window's
    bounds mean the same rounded, and exactly (nanoseconds in a float would lose a bound a nanosecond past a minute's
    start). A Timestamp outside the range RFC 3339 can express (protobuf checks it) is a violation."""
    try:
        return float(-(-timestamp.ToNanoseconds() // 1_000_000_000))
    except ValueError:
        errors.add(where, "must be a valid Timestamp: from 0001-01-01 to 9999-12-31, nanos from 0 to 999999999")
        return None


def _messages(
    items: Any, errors: _Violations, where: str, max_image_bytes: int | None, *, goes_on: bool
) -> tuple[Message, ...]:
    """`goes_on`: the chat asks the model for what comes next, so that every call in it must have its answer."""
    if not items:
        errors.add(where, "at least one message is required")
        return ()
    if len(items) > MAX_MESSAGES:
        errors.add(where, f"at most {MAX_MESSAGES} messages are accepted; the request holds {len(items)}")
        return ()
    # Over a copy (a slice is a list): upb's repeated fields have no iterator of their own, and the sequence protocol
    # ends iterating one with an IndexError, made, formatted and dropped.
    items = items[:]
    if not _within_totals(items, errors, where):
        return ()
    messages = tuple(_message(m, errors, f"{where}[{i}]", max_image_bytes) for i, m in enumerate(items))
    # A question alone (most calls) neither makes nor answers a call: the check is for the rest.
    if len(messages) > 1 or messages[0].role is Role.TOOL or messages[0].tool_calls:
        _check_tool_answers(messages, errors, where, goes_on)
    return messages


def _within_totals(items: Sequence[pb.Message], errors: _Violations, where: str) -> bool:
    """Whether the messages' parts and tool calls are within MAX_PARTS and MAX_TOOL_CALLS, counted before any is
    validated; each total over its bound is a violation named at the message that passes it."""
    parts = calls = 0
    parts_over = calls_over = None
    for i, message in enumerate(items):
        parts += len(message.parts)
        calls += len(message.tool_calls)
        if parts_over is None and parts > MAX_PARTS:
            parts_over = i
        if calls_over is None and calls > MAX_TOOL_CALLS:
            calls_over = i
    if parts_over is not None:
        errors.add(
            f"{where}[{parts_over}].parts",
            f"at most {MAX_PARTS} parts are accepted, over all messages together; the request holds {parts}",
        )
    if calls_over is not None:
        errors.add(
            f"{where}[{calls_over}].tool_calls",
            f"at most {MAX_TOOL_CALLS} tool calls are accepted, over all messages together; the request holds {calls}",
        )
    return parts_over is None and calls_over is None


def _check_tool_answers(messages: Sequence[Message], errors: _Violations, where: str, goes_on: bool) -> None:
    """Each tool message answers a call of the assistant message before it (the tool messages between them aside),
    once; each call of an assistant message has an id of its own, and its answer before the conversation goes on.
    OpenAI's API and Anthropic's refuse a conversation otherwise, each in its own words, and others take it: the same
    chat was answered or refused by where its route went."""
    waiting: dict[str, str] = {}
    """The calls of the last assistant message with calls not answered yet: id -> where the call is."""
    for i, message in enumerate(messages):
        if message.role is Role.TOOL:
            # (One that names no call at all is refused for that already.)
            if message.tool_call_id and waiting.pop(message.tool_call_id, None) is None:
                errors.add(
                    f"{where}[{i}].tool_call_id",
                    "answers no call of the assistant message before it (each call is answered once, right after it)",
                )
            continue
        for call_at in waiting.values():
            errors.add(call_at, f"is answered by no tool message before {where}[{i}]")
        waiting = {}
        if message.role is not Role.ASSISTANT:
            continue  # its calls are refused already
        for j, call in enumerate(message.tool_calls):
            if not call.id:
                continue  # refused for that already: no tool message can answer it
            if call.id in waiting:
                errors.add(f"{where}[{i}].tool_calls[{j}].id", "must differ from the message's other calls' ids")
            waiting[call.id] = f"{where}[{i}].tool_calls[{j}].id"
    if goes_on:
        for call_at in waiting.values():
            errors.add(call_at, "is answered by no tool message (every call has its answer before the model goes on)")


def _message(message: pb.Message, errors: _Violations, where: str, max_image_bytes: int | None) -> Message:
    role = _ROLES.get(message.role)
    if role is None:
        errors.add(f"{where}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
        role = Role.USER
    if role is Role.TOOL:
        if not message.tool_call_id:
            errors.add(f"{where}.tool_call_id", "a tool message must name the tool call it answers")
    elif message.HasField("tool_call_id"):  # sent on, an upstream refuses it in its own words, or takes it unread
        errors.add(f"{where}.tool_call_id", "only a tool message answers a tool call; leave it unset here")
    if message.tool_calls and role is not Role.ASSISTANT:
        errors.add(f"{where}.tool_calls", "only assistant messages carry tool calls")
    if role is not Role.ASSISTANT and (message.HasField("reasoning") or message.HasField("reasoning_signature")):
        # No upstream takes reasoning on another turn: sent on, it would be dropped without a word.
        for field in ("reasoning", "reasoning_signature"):
            if message.HasField(field):
                errors.add(f"{where}.{field}", "only an assistant message carries reasoning; leave it unset here")
    if message.HasField("name") and not FUNCTION_NAME.fullmatch(message.name):
        # OpenAI's API refuses any other (its own words, UPSTREAM_REJECTED); others take it, or leave it out.
        errors.add(f"{where}.name", "must be 1-64 letters, digits, '_' or '-'")
    if message.content and message.parts:
        errors.add(f"{where}.parts", "give either content or parts, not both")
    # Parts of empty text alone say no more than empty content (and would leave Anthropic a turn without a block).
    said = message.content or any(p.WhichOneof("part") != "text" or p.text for p in message.parts)
    # A tool's result may be empty (a void function, an empty file): OpenAI takes an empty tool message, Anthropic a
    # tool_result without content, and the call it answers still needs its answer.
    if not said and not message.tool_calls and role is not Role.TOOL:
        if message.parts:
            errors.add(f"{where}.parts", "must not be empty: every part is empty text")
        else:
            errors.add(f"{where}.content", "must not be empty")
    # Iterated only when set (nearly always one of them is empty), and over a copy: as in _messages.
    parts = (
        tuple(
            _part(part, role, errors, f"{where}.parts[{i}]", max_image_bytes) for i, part in enumerate(message.parts[:])
        )
        if message.parts
        else ()
    )
    calls = []
    for i, call in enumerate(message.tool_calls[:] if message.tool_calls else ()):
        if not call.id:
            errors.add(f"{where}.tool_calls[{i}].id", "must not be empty")
        if not FUNCTION_NAME.fullmatch(call.function.name):
            errors.add(f"{where}.tool_calls[{i}].function.name", "must be 1-64 letters, digits, '_' or '-'")
        signature = call.signature if call.HasField("signature") else None
        calls.append(
            ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments, signature=signature)
        )
    return Message(
        role=role,
        content=message.content,
        name=message.name if message.HasField("name") else None,
        tool_calls=tuple(calls),
        tool_call_id=message.tool_call_id if message.HasField("tool_call_id") else None,
        parts=parts,
        # Sent back with its signature: Anthropic takes an earlier turn's thinking only whole and unchanged.
        reasoning=message.reasoning if message.HasField("reasoning") else None,
        reasoning_signature=message.reasoning_signature if message.HasField("reasoning_signature") else None,
    )


def _part(
    part: pb.ContentPart, role: Role, errors: _Violations, where: str, max_image_bytes: int | None
) -> ContentPart:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind is None:
        errors.add(where, "must hold text or an image")
        return TextPart("")
    if role is not Role.USER:
        # OpenAI's chat format takes images in user messages only: system, assistant and tool content is text.
        errors.add(f"{where}.image", "images are accepted in user messages only")
    return _image(part.image, errors, f"{where}.image", max_image_bytes)


def _image(image: pb.ImagePart, errors: _Violations, where: str, max_image_bytes: int | None) -> ImagePart:
    detail = _enum(image.detail, _IMAGE_DETAILS, f"{where}.detail", errors)
    source = image.WhichOneof("source")
    if source is None:
        errors.add(where, "give the image's url, or its bytes in data")
        return ImagePart(detail=detail)
    if source == "url":
        # A data: URL is refused rather than unpacked: bytes go in `data`, where their size and format are checked
        # and their dimensions read for CountTokens; the upstream gets them as a data: URL all the same.
        if (scheme := _url_scheme(image.url)) == "data":
            errors.add(f"{where}.url", "a data: URL is not accepted: send the image's bytes in data instead")
        elif _NOT_IN_A_URL.search(image.url):
            # The upstream would fetch some other URL (urllib drops tabs and line breaks) or fail with its own words.
            errors.add(f"{where}.url", "holds a space or a control character: percent-encode it (a space is %20)")
        elif scheme not in ("http", "https"):
            errors.add(f"{where}.url", "must be an http:// or https:// URL the upstream can fetch")
        return ImagePart(url=image.url, detail=detail)
    data = image.data
    if max_image_bytes is not None and len(data) > max_image_bytes:
        errors.add(
            f"{where}.data",
            f"is {len(data)} bytes, over the gateway's limit of {max_image_bytes} (server.max_image_bytes): send a"
            " smaller image, or its URL",
        )
    found = images.media_type(data)
    said = images.canonical_media_type(image.media_type)
    if said and said not in images.MEDIA_TYPES:
        errors.add(f"{where}.media_type", f"must be one of {', '.join(images.MEDIA_TYPES)}, or unset")
    elif found is None:
        errors.add(f"{where}.data", "is not a PNG, JPEG, GIF or WebP image (by its first bytes)")
    elif said and found != said:
        errors.add(f"{where}.data", f"is {found} data, but media_type says {image.media_type}")
    # Unset, the media type is the one the bytes' signature says.
    return ImagePart(data=data, media_type=said or found, detail=detail)


_NOT_IN_A_URL: Final = re.compile(r"[\s\x00-\x1f\x7f]")
"""What a URL never holds unencoded (RFC 3986): whitespace, Unicode's included, and control characters."""


def _url_scheme(text: str) -> str | None:
    """The URL's scheme, "data" for any data: URL; None when it is no URL with a host an upstream could fetch from:
    no host, a port out of range, or text urllib refuses outright (an unclosed "[" of an IPv6 host), which would
    otherwise escape as a ValueError and end the call with UNKNOWN."""
    try:
        url = urlsplit(text)
        if url.scheme == "data":
            return url.scheme
        _ = url.port  # read lazily: a port that is no number from 0 to 65535 raises only here
    except ValueError:
        return None
    return url.scheme if url.netloc else None


def _options(options: pb.CompletionOptions, errors: _Violations) -> CompletionOptions:
    def number(name: str, low: float, high: float) -> float | None:
        if not options.HasField(name):  # type: ignore[arg-type]
            return None
        value = float(getattr(options, name))
        if not (math.isfinite(value) and low <= value <= high):
            errors.add(f"options.{name}", f"must be between {low:g} and {high:g}")
        return value

    max_tokens = options.max_tokens if options.HasField("max_tokens") else None
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        errors.add("options.max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}")
    stop = options.stop[:]  # a list: see _messages
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        errors.add("options.stop", f"at most {MAX_STOP_SEQUENCES} sequences, none empty")
    tools = _tools(options.tools, errors, "options.tools")
    return CompletionOptions(
        temperature=number("temperature", 0.0, 2.0),
        top_p=number("top_p", 0.0, 1.0),
        max_tokens=max_tokens,
        stop=tuple(stop),
        seed=options.seed if options.HasField("seed") else None,
        response_format=(
            _response_format(options.response_format, "options.response_format", errors)
            if options.HasField("response_format")
            else None
        ),
        tools=tools or (),
        tool_choice=_tool_choice(options, None if tools is None else {t.name for t in tools}, errors),
        reasoning_effort=_enum(options.reasoning_effort, _EFFORTS, "options.reasoning_effort", errors),
        presence_penalty=number("presence_penalty", -2.0, 2.0),
        frequency_penalty=number("frequency_penalty", -2.0, 2.0),
        # Without tools it says nothing (an agent's loop may set it on every turn), and upstreams refuse it there.
        parallel_tool_calls=options.parallel_tool_calls if tools and options.HasField("parallel_tool_calls") else None,
    )


def _enum(value: int, known: Mapping[int, Any], where: str, errors: _Violations) -> Any:
    if value == 0:
        return None
    if value not in known:
        errors.add(where, f"unknown value {value}")
    return known.get(value)


def _tools(items: Sequence[pb.Tool], errors: _Violations, where: str) -> tuple[Tool, ...] | None:
    """The tools, None when there are too many to validate (a violation)."""
    if len(items) > MAX_TOOLS:
        errors.add(where, f"at most {MAX_TOOLS} tools are accepted; the request holds {len(items)}")
        return None
    # Over a copy: as in _messages.
    tools = tuple(_tool(tool, errors, f"{where}[{i}]") for i, tool in enumerate(items[:]))
    # Which of two tools of one name a tool call or a tool_choice means cannot be told, and Anthropic refuses them
    # (400 "Tool names must be unique"): refused here, in the caller's terms, whichever API the backend speaks.
    first: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if (seen := first.setdefault(tool.name, i)) != i:
            errors.add(
                f"{where}[{i}].function.name", f"names the same function as {where}[{seen}]: tool names must be unique"
            )
    return tools


def _tool(tool: pb.Tool, errors: _Violations, where: str) -> Tool:
    function = tool.function
    if not FUNCTION_NAME.fullmatch(function.name):
        errors.add(f"{where}.function.name", "must be 1-64 letters, digits, '_' or '-'")
    parameters: Mapping[str, Any] | JsonText | None = None
    if function.HasField("parameters_json"):  # the text wins over the deprecated Struct
        field = f"{where}.function.parameters_json"
        parameters, schema = _json_text(function.parameters_json, field, errors)
    elif function.HasField("parameters"):
        field = f"{where}.function.parameters"
        parameters = schema = _struct(function.parameters, field, errors)
    else:
        field, schema = "", {}
    if schema.get("type", "object") != "object":
        errors.add(field, 'must be a JSON Schema of "type": "object"')
    return Tool(
        name=function.name,
        description=function.description if function.HasField("description") else None,
        parameters=parameters,
        strict=function.strict if function.HasField("strict") else None,
    )


def _tool_choice(
    options: pb.CompletionOptions, declared: set[str] | None, errors: _Violations
) -> ToolChoiceMode | NamedToolChoice | None:
    """`declared`: the names of the tools; None when there were too many to read them (refused for that already), and
    the choice is not held to them."""
    if not options.HasField("tool_choice"):
        return None
    choice = options.tool_choice
    # A tool choice without tools is refused here, in the caller's terms and whichever dialect the backend speaks:
    # upstreams refuse it with a 400 that names no field of the contract.
    if choice.WhichOneof("choice") == "function_name":
        if declared is not None and choice.function_name not in declared:
            errors.add(
                "options.tool_choice.function_name",
                "must name one of options.tools" if declared else "names a tool, but options.tools declares none",
            )
        return NamedToolChoice(choice.function_name)
    mode: ToolChoiceMode | None = _enum(choice.mode, _TOOL_CHOICES, "options.tool_choice.mode", errors)
    if mode is not None and declared is not None and not declared:
        name = pb.ToolChoiceMode.Name(choice.mode)
        errors.add(
            "options.tool_choice.mode",
            f"{name} needs at least one tool in options.tools; without tools, leave it unset",
        )
    return mode


def _response_format(fmt: pb.ResponseFormat, where: str, errors: _Violations) -> ResponseFormat | None:
    kind = _enum(fmt.type, _FORMATS, f"{where}.type", errors)
    if kind != "json_schema":
        # With any other type (JSON_OBJECT above all) a schema would be dropped and the answer not held to it: refused,
        # so that the caller knows.
        if fmt.HasField("json_schema"):
            errors.add(
                f"{where}.json_schema",
                "a schema needs type RESPONSE_FORMAT_TYPE_JSON_SCHEMA: set that type, or leave json_schema unset",
            )
        return None if kind is None else ResponseFormat(type=kind)
    schema = fmt.json_schema
    where = f"{where}.json_schema"
    if not FUNCTION_NAME.fullmatch(schema.name):
        errors.add(f"{where}.name", "must be 1-64 letters, digits, '_' or '-'")
    value: Mapping[str, Any] | JsonText
    if schema.HasField("schema_json"):  # the text wins over the deprecated Struct
        value = _json_text(schema.schema_json, f"{where}.schema_json", errors)[0]
    else:
        if not schema.HasField("schema"):
            errors.add(f"{where}.schema_json", "required for RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
        value = _struct(schema.schema, f"{where}.schema", errors)
    return ResponseFormat(
        type="json_schema",
        json_schema=JsonSchemaFormat(
            name=schema.name,
            schema=value,
            description=schema.description if schema.HasField("description") else None,
            strict=schema.strict if schema.HasField("strict") else None,
        ),
    )


def _json_text(text: str, where: str, errors: _Violations) -> tuple[JsonText, Mapping[str, Any]]:
    """The caller's text, to be sent upstream as written, and the JSON object it says (empty when it is none)."""
    too_deep = f"must be the JSON text of an object nested at most {MAX_JSON_DEPTH} levels deep"
    try:
        value = read_json(text)
    except ValueError as exc:  # json.JSONDecodeError among them, with the line and column of the mistake
        # json's own words for a byte-order mark ("decode using utf-8-sig") are advice to a Python program.
        said = "it starts with a byte-order mark (U+FEFF): leave it out" if text.startswith("\ufeff") else exc
        errors.add(where, f"must be the JSON text of an object: {said}")
        return JsonText(text), {}
    except RecursionError:
        errors.add(where, too_deep)
        return JsonText(text), {}
    if not isinstance(value, dict):
        errors.add(where, f"must be the JSON text of an object, not of {_JSON_KINDS[type(value)]}")
        return JsonText(text), {}
    # Nesting that deep takes that many brackets: a count at C's speed spares the walk to nearly every schema.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        errors.add(where, too_deep)
        return JsonText(text), {}
    return JsonText(text), value


def _deeper_than(value: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays nest in the value more than `limit` levels deep, the value itself the first; walked
    a level at a time, as recursion would meet the very limit this guards."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _struct(value: Any, where: str, errors: _Violations) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json_format.MessageToDict(value)
    except ValueError:
        # NaN and infinities have no JSON form, so no upstream could be sent this schema.
        errors.add(where, "must be valid JSON: no NaN or infinite numbers")
        return {}
    return result


# --- answers --------------------------------------------------------------------------------------------------


def _fill_usage(message: pb.Usage, usage: TokenUsage) -> None:
    """Sets the fields of a message in place: on the answer path, a submessage built apart and then passed in is
    built twice (protobuf copies it), about twice the cost."""
    message.prompt_tokens = usage.prompt_tokens
    message.completion_tokens = usage.completion_tokens
    message.total_tokens = usage.total_tokens
    message.estimated = usage.estimated
    if usage.reasoning_tokens is not None:
        message.reasoning_tokens = usage.reasoning_tokens
    if usage.cached_prompt_tokens is not None:
        message.cached_prompt_tokens = usage.cached_prompt_tokens
    if usage.cache_write_prompt_tokens is not None:
        message.cache_write_prompt_tokens = usage.cache_write_prompt_tokens
    if usage.cost is not None:
        _fill_cost(message.cost, usage.cost)


def _fill_cost(message: pb.Cost, cost: Cost) -> None:
    message.usd_micros = cost.usd_micros
    message.estimated = cost.estimated
    message.price_unknown = cost.price_unknown


def usage_answer(totals: Sequence[UsageTotals]) -> pb.GetUsageResponse:
    return pb.GetUsageResponse(records=[_usage_record_pb(t) for t in totals])


def _usage_record_pb(totals: UsageTotals) -> pb.UsageRecord:
    record = pb.UsageRecord(
        backend=totals.backend,
        model=totals.model,
        caller=totals.caller,
        requests=totals.requests,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.total_tokens,
        estimated_requests=totals.estimated_requests,
        interrupted_requests=totals.interrupted_requests,
    )
    # The flags of a total say whether any request in it was estimated, or unpriced.
    cost = Cost(totals.cost_usd_micros, totals.cost_estimated_requests > 0, totals.price_unknown_requests > 0)
    _fill_cost(record.cost, cost)
    return record


def attempt_pb(attempt: Attempt) -> pb.Attempt:
    message = pb.Attempt()
    _fill_attempt(message, attempt)
    return message


def _add_attempts(field: Any, attempts: Sequence[Attempt]) -> None:
    """Appends the attempts to a repeated Attempt field, each built in place (see _fill_usage)."""
    for attempt in attempts:
        _fill_attempt(field.add(), attempt)


def _fill_attempt(message: pb.Attempt, attempt: Attempt) -> None:
    message.backend = attempt.backend
    message.model = attempt.model
    message.outcome = _OUTCOMES_OUT[attempt.outcome]
    message.duration.FromNanoseconds(_nanoseconds(attempt.duration_s))
    message.error = attempt.error
    if attempt.upstream_status is not None:
        message.upstream_status = attempt.upstream_status


def complete_response(response: CompletionResponse) -> pb.CompleteResponse:
    answer = pb.CompleteResponse(
        id=response.id,
        backend=response.backend,
        model=response.model,
        finish_reason=_FINISH_REASONS_OUT[response.finish_reason],
    )
    message, out = response.message, answer.message
    out.role = _ROLES_OUT[message.role]
    out.content = message.content
    for call in message.tool_calls:
        out_call = out.tool_calls.add(id=call.id)
        out_call.function.name, out_call.function.arguments = call.name, call.arguments
        if call.signature is not None:
            out_call.signature = call.signature
    if message.reasoning is not None:
        out.reasoning = message.reasoning
    if message.reasoning_signature is not None:
        out.reasoning_signature = message.reasoning_signature
    _fill_usage(answer.usage, response.usage)
    _add_attempts(answer.attempts, response.attempts)
    return answer


def stream_response(chunk: CompletionChunk) -> pb.StreamCompleteResponse:
    if (restart := chunk.restart) is not None:
        message = pb.StreamCompleteResponse()
        marker = message.restart
        marker.reason, marker.backend = restart.reason, restart.backend
        _add_attempts(marker.attempts, restart.attempts)
        _fill_usage(marker.usage, restart.usage)
        return message
    message = pb.StreamCompleteResponse(id=chunk.id, backend=chunk.backend, model=chunk.model)
    delta = message.delta  # filled in place (a delta made apart would be copied in)
    delta.SetInParent()  # present even when empty, as in the last message
    if chunk.content is not None:
        delta.content = chunk.content
    if chunk.reasoning is not None:
        delta.reasoning = chunk.reasoning
    for fragment in chunk.tool_calls:
        _fill_tool_call_delta(delta.tool_calls.add(), fragment)
    if chunk.reasoning_signature is not None:
        delta.reasoning_signature = chunk.reasoning_signature
    if chunk.finish_reason is not None:
        message.finish_reason = _FINISH_REASONS_OUT[chunk.finish_reason]
    if chunk.usage is not None:
        _fill_usage(message.usage, chunk.usage)
        _add_attempts(message.attempts, chunk.attempts)
    return message


def embed_response(response: EmbeddingResponse) -> pb.EmbedResponse:
    usage = response.usage
    message = pb.EmbedResponse(
        model=response.model,
        backend=response.backend,
        usage=pb.EmbedUsage(prompt_tokens=usage.prompt_tokens, estimated=usage.estimated),
    )
    _add_attempts(message.attempts, response.attempts)
    if usage.cost is not None:
        _fill_cost(message.usage.cost, usage.cost)
    # A vector's little-endian floats are already the packed encoding of Embedding.values: the embeddings are
    # parsed in as encoded fields, one copy of the bytes, where extend() would make a Python float per dimension.
    message.MergeFromString(b"".join(map(_embedding_field, response.vectors)))
    return message


def _embedding_field(vector: bytes) -> bytes:
    values = _VALUES_TAG + _varint(len(vector)) + vector
    return _EMBEDDINGS_TAG + _varint(len(values)) + values


def _embedding_field_bytes(dimensions: int) -> int:
    """The size of one vector of so many dimensions in an answer, framed as _embedding_field frames it."""
    values = len(_VALUES_TAG) + len(_varint(4 * dimensions)) + 4 * dimensions
    return len(_EMBEDDINGS_TAG) + len(_varint(values)) + values


def _length_delimited_tag(field: Any) -> bytes:
    return _varint(field.number << 3 | 2)


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


_EMBEDDINGS_TAG: Final = _length_delimited_tag(pb.EmbedResponse.DESCRIPTOR.fields_by_name["embeddings"])
_VALUES_TAG: Final = _length_delimited_tag(pb.Embedding.DESCRIPTOR.fields_by_name["values"])


def _fill_tool_call_delta(delta: pb.ToolCallDelta, fragment: ToolCallDelta) -> None:
    delta.index = fragment.index
    if fragment.id is not None:
        delta.id = fragment.id
    if fragment.name is not None:
        delta.name = fragment.name
    if fragment.arguments is not None:
        delta.arguments = fragment.arguments
    if fragment.signature is not None:
        delta.signature = fragment.signature


def backend_health_pb(health: BackendHealth, circuit_state: str) -> pb.BackendHealth:
    message = pb.BackendHealth(
        name=health.name,
        kind=health.kind,
        base_url=health.base_url,
        reachable=health.reachable,
        models=list(health.models),
        circuit_state=pb.CircuitState.Value(f"CIRCUIT_STATE_{circuit_state.upper()}"),
        default_model=health.default_model,
    )
    if health.latency_s is not None:
        message.latency.CopyFrom(_duration(health.latency_s))
    if health.last_error is not None:
        message.last_error = health.last_error
    if health.checked_at is not None:
        checked_at = Timestamp()
        checked_at.FromNanoseconds(int(health.checked_at * 1e9))
        message.checked_at.CopyFrom(checked_at)
    return message


def store_health_pb(store: StoreHealth) -> pb.StoreHealth:
    return pb.StoreHealth(
        role=pb.StoreRole.Value(f"STORE_ROLE_{store.role.name}"),
        kind=store.kind,
        available=store.available,
        description=store.description,
        pending_records=store.pending_records,
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(_nanoseconds(seconds))
    return duration


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)
