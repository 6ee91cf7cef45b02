"""The OpenAI chat-completions and embeddings wire formats: domain types to request JSON, and answers (JSON or SSE)
back.

Pure functions, no I/O. The gateway parses answers itself rather than through the SDK's models: it must read fields
that servers add (`reasoning` from Ollama, `reasoning_content` from others), it must turn any malformed answer into a
definite error, and it skips building objects it would throw away on the hot path.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import io
import itertools
import json
import re
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeGuard

import orjson

from llmrelay_server.domain import (
    FUNCTION_NAME,
    MAX_TOKEN_COUNT,
    CompletionChunk,
    CompletionOptions,
    CompletionRequest,
    ContentPart,
    EmbeddingRequest,
    FinishReason,
    JsonText,
    Message,
    NamedToolChoice,
    ReasoningEffort,
    Role,
    TextPart,
    TokenUsage,
    Tool,
    ToolCall,
    ToolCallDelta,
)

DONE: Final = "[DONE]"
MAX_TOOL_CALLS: Final = 1024

_FINISH_REASONS: Final[Mapping[str | None, FinishReason]] = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}
UNFINISHED: Final = frozenset({"abort", "error"})
"""Finish reasons that end an answer unfinished: vLLM's when its engine drops a request (shutting down, scaled
down, put to sleep) and an error's, after a 200. The answer so far is no whole one: the attempt failed."""
QUOTED_CHARS: Final = 4096
"""An upstream's words that are not its error's message (a body or an error that is no JSON object) are kept to this
before they are redacted (upstream_http.redact), which keeps far fewer: a key cut in two here goes with the rest."""


class MalformedAnswerError(ValueError):
    """The upstream's answer is not a valid chat completion. `quoted`: the answer's own words in the message (a
    preview of what came in place of JSON), which may repeat the prompt: the log and traces leave them out unless
    they may show content (UpstreamError.quoted)."""

    def __init__(self, message: str, *, quoted: str = "") -> None:
        super().__init__(message)
        self.quoted = quoted


class ErrorAnswer(MalformedAnswerError):
    """An answer that is the upstream's error: `{"error": {...}}` with a 200, as some proxies and routers answer. Its
    words, and the status or code it gives, are the caller's to read, as an error event's are."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


def request_body(
    model: str,
    request: CompletionRequest,
    *,
    max_tokens_field: str,
    reasoning_efforts: Mapping[ReasoningEffort, str] | None = None,
    call_signatures: bool = True,
) -> dict[str, Any]:
    """The JSON body for /chat/completions; options the caller left unset are left out. reasoning_efforts: the value
    sent for an effort the server names otherwise (or lacks). call_signatures: whether the tool calls' signatures go
    with them (`call_signature`)."""
    body = prompt_body(model, request.messages, request.options.tools, call_signatures=call_signatures)
    body.update(_options_json(request.options, max_tokens_field))
    effort = request.options.reasoning_effort
    if effort is not None and reasoning_efforts and effort in reasoning_efforts:
        body["reasoning_effort"] = reasoning_efforts[effort]
    return body


def prompt_body(
    model: str, messages: Sequence[Message], tools: Sequence[Tool], *, call_signatures: bool = False
) -> dict[str, Any]:
    """What makes the prompt, in the chat-completions shape: the body servers' templating and tokenizing endpoints
    take (llama.cpp's /apply-template, vLLM's /tokenize)."""
    body: dict[str, Any] = {"model": model, "messages": [_message_json(m, call_signatures) for m in messages]}
    if tools:
        body["tools"] = [_tool_json(t) for t in tools]
    return body


def encode(body: Mapping[str, Any]) -> bytes:
    """A request body as JSON, where each JsonText (the caller's tool parameters and response schemas) is written
    exactly as the caller wrote it: a number stays as it was typed, however large, and so does every space.

    orjson writes a placeholder string for each JsonText, then the texts replace them, in the order they were
    written. The placeholder is random, made for the first JsonText (a body without one needs none), so nothing else
    in the body is one except by a 1-in-2**128 chance; a body where the count shows one (more placeholders than
    texts) is written again with another.
    """
    while True:
        found = _JsonTexts()
        # A JsonText is a dataclass, which orjson would write as an object of its fields: passed to `default`.
        written = orjson.dumps(body, default=found.placeholder, option=orjson.OPT_PASSTHROUGH_DATACLASS)
        if not found.texts:
            return written
        pieces = written.split(f'"{found.marker}"'.encode())
        if len(pieces) == len(found.texts) + 1:
            return b"".join(itertools.chain.from_iterable(zip(pieces, [*found.texts, b""], strict=True)))


class _JsonTexts:
    """The JsonTexts of one body as orjson meets them, each written as one random marker meanwhile."""

    __slots__ = ("marker", "texts")

    def __init__(self) -> None:
        self.marker = ""
        self.texts: list[bytes] = []

    def placeholder(self, value: object) -> str:
        """orjson's `default`: the marker in a JsonText's place; anything else is no JSON."""
        if not isinstance(value, JsonText):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        if not self.marker:
            self.marker = secrets.token_hex(16)
        self.texts.append(value.text.encode())
        return self.marker


def _message_json(message: Message, call_signatures: bool) -> dict[str, Any]:
    content: str | list[dict[str, Any]] = [_part_json(p) for p in message.parts] if message.parts else message.content
    item: dict[str, Any] = {"role": message.role.value, "content": content}
    if message.name is not None:
        item["name"] = message.name
    if message.tool_calls:
        item["tool_calls"] = [_tool_call_json(call, call_signatures) for call in message.tool_calls]
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    return item


def _tool_call_json(call: ToolCall, with_signature: bool) -> dict[str, Any]:
    # Empty arguments (a call of a function without parameters, as some servers answer it; blanks alone, which an
    # Anthropic backend sends as {} too) are "{}": Ollama refuses a call whose arguments are not JSON (400 "invalid
    # tool call arguments"); it means the same.
    arguments = call.arguments if call.arguments.strip() else "{}"
    item = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
    if with_signature and call.signature is not None:
        item["extra_content"] = {"google": {"thought_signature": call.signature}}
    return item


def call_signature(call: Mapping[str, Any]) -> str | None:
    """A tool call's signature, as Gemini's OpenAI-compatible API gives it (`extra_content.google.thought_signature`,
    which Gemini 3 wants back with the call), or None. A side channel: one of another shape is dropped, not the
    answer."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _part_json(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if part.data is not None:
        url = f"data:{part.media_type};base64,{base64.b64encode(part.data).decode('ascii')}"
    else:
        url = part.url or ""
    image: dict[str, Any] = {"url": url}
    if part.detail is not None:
        image["detail"] = part.detail.value
    return {"type": "image_url", "image_url": image}


def _tool_json(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _options_json(options: CompletionOptions, max_tokens_field: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "parallel_tool_calls"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    if options.max_tokens is not None:
        body[max_tokens_field] = options.max_tokens
    if options.stop:
        body["stop"] = list(options.stop)
    if isinstance(options.tool_choice, NamedToolChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": options.tool_choice.name}}
    elif options.tool_choice is not None:
        body["tool_choice"] = options.tool_choice
    if options.reasoning_effort is not None:
        body["reasoning_effort"] = options.reasoning_effort
    if (fmt := options.response_format) is not None:
        if fmt.json_schema is None:
            body["response_format"] = {"type": fmt.type}
        else:
            schema: dict[str, Any] = {"name": fmt.json_schema.name, "schema": fmt.json_schema.schema}
            if fmt.json_schema.description is not None:
                schema["description"] = fmt.json_schema.description
            if fmt.json_schema.strict is not None:
                schema["strict"] = fmt.json_schema.strict
            body["response_format"] = {"type": fmt.type, "json_schema": schema}
    return body


def decode_json(raw: bytes | str) -> Any:
    """An answer's JSON (a body, or a stream event's text), read by orjson (a quarter of json.loads's time, for every
    event of every stream). Its objects are dicts: the parsers here test for dict, a check in C, where Mapping's
    would go through the ABC machinery for every object of every chunk."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # A byte order mark first (.NET's UTF-8 writer puts one), which JSON's readers may ignore (RFC 8259) and orjson
        # refuses: looked for only here, after a failure, not in every event.
        if isinstance(raw, bytes) and raw.startswith(codecs.BOM_UTF8):
            return decode_json(raw[len(codecs.BOM_UTF8) :])
        if isinstance(raw, str) and raw.startswith("\ufeff"):
            return decode_json(raw[1:])
        if isinstance(raw, bytes):
            try:
                raw.decode()
            except UnicodeDecodeError as bad:  # which orjson reports as JSON it cannot read at character 0
                byte = raw[bad.start : bad.start + 1]
                raise MalformedAnswerError(f"the answer is not UTF-8 text (byte {bad.start} is {byte!r})") from exc
        preview = repr(raw[:80] if isinstance(raw, str) else raw[:80].decode("utf-8", "replace"))
        raise MalformedAnswerError(
            f"the answer is not JSON: {exc.msg} at character {exc.pos} (it starts with {preview})", quoted=preview
        ) from exc


# An integer orjson may read as a float (beyond [-2^63, 2^64)) has at least 19 digits. Where it matters is a whole
# answer's tool calls (an Anthropic tool_use block's input, Ollama's arguments objects), which the contract carries as
# text written back from what was read.
_INTEGER_BEYOND_64_BITS: Final = re.compile(rb"\d{19}")


def decode_answer_json(raw: bytes) -> Any:
    """A whole answer's JSON, as decode_json reads it, but with integers beyond 64 bits exact: orjson reads them as
    floats, and a tool call's arguments written back from them would not say what the model wrote. The standard
    library reads the rare answer with tool calls and a run of 19 digits again (orjson has checked it is JSON)."""
    data = decode_json(raw)
    # find, not `in`: bytes' `in` tries its operand as an integer first, and makes and drops a TypeError each time.
    if (raw.find(b"tool_use") >= 0 or raw.find(b"tool_calls") >= 0) and _INTEGER_BEYOND_64_BITS.search(raw):
        try:
            return json.loads(raw)
        except RecursionError as exc:  # orjson reads 1,024 levels; the standard library stops at the stack's limit
            raise MalformedAnswerError("the answer is nested too deeply for the gateway to read") from exc
    return data


_TEXT_INTEGER_BEYOND_64_BITS: Final = re.compile(_INTEGER_BEYOND_64_BITS.pattern.decode())


def with_exact_integers(data: Any, raw: str) -> Any:
    """A stream event's JSON (`data`, read from `raw` by decode_json) with integers beyond 64 bits exact: for the rare
    event that carries a tool call's arguments as an object (some servers'; an Anthropic content_block_start's input),
    which the contract carries as text written back from what was read, as decode_answer_json does for an answer."""
    return json.loads(raw) if _TEXT_INTEGER_BEYOND_64_BITS.search(raw) else data


def finish_reason(value: Any) -> FinishReason:
    return _FINISH_REASONS.get(value, FinishReason.UNKNOWN) if isinstance(value, str) else FinishReason.UNKNOWN


def answer_finish_reason(choice: Mapping[str, Any]) -> FinishReason:
    """A whole answer's finish reason: a refusal is CONTENT_FILTER, whatever the upstream says beside it ("stop");
    else as `as_called` makes it of whether the answer calls tools."""
    message = choice.get("message")
    if isinstance(message, dict) and refusal_text(message) is not None:
        return FinishReason.CONTENT_FILTER
    reason = finish_reason(choice.get("finish_reason"))
    return as_called(reason, isinstance(message, dict) and bool(message.get("tool_calls") or legacy_call(message)))


def as_called(reason: FinishReason, called: bool) -> FinishReason:
    """The finish reason of an answer, told whether it calls tools (`called`); the caller's loop runs its tools on
    TOOL_CALLS, which the contract keeps for an answer that calls one or more. An answer that calls tools is
    TOOL_CALLS where its server said "stop", as OpenAI's gpt-4o, Gemini and Ollama's /v1 have for streamed calls; one
    that calls none is STOP where its server said it called some (a server whose parse of the model's calls found
    none), as an agent told TOOL_CALLS would run no tool and ask again for the same answer."""
    if called:
        return FinishReason.TOOL_CALLS if reason is FinishReason.STOP else reason
    return FinishReason.STOP if reason is FinishReason.TOOL_CALLS else reason


def refusal_text(message: Mapping[str, Any]) -> str | None:
    """The model's refusal, in its words (`refusal`, of a message or a stream delta, in place of `content`: OpenAI's
    structured outputs); None when it did not refuse. The caller gets it as the content, with CONTENT_FILTER, as an
    Anthropic model's refusal stop reason is told: an empty answer that says "stop" would hide it."""
    return _optional_text(message.get("refusal"), "refusal") or None


def answer_id(data: Mapping[str, Any]) -> str:
    """An answer's id (a stream event's), where it is text: another type's repr is no id to quote, and that of JSON
    nested past Python's stack raises RecursionError."""
    id_ = data.get("id")
    return id_ if isinstance(id_, str) else ""


def first_choice(data: Any, key: str) -> Mapping[str, Any] | None:
    """Choice 0's `key` object (message or delta); None for a stream chunk without it (the usage chunk, or a chunk
    of another choice: the gateway asks for one, and never merges the text of two)."""
    if not isinstance(data, dict):
        raise MalformedAnswerError(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if choices is None and key == "delta":
        return None
    if not isinstance(choices, list):
        if (event := error_event(data)) is not None:
            raise ErrorAnswer(event)
        raise MalformedAnswerError("the answer has no `choices` list")
    # Choice 0 comes first in every answer seen; the search is for the servers that send others before it.
    if choices and isinstance(first := choices[0], dict) and first.get("index", 0) == 0:
        choice: Any = first
    else:
        choice = next((c for c in choices if not isinstance(c, dict) or c.get("index", 0) == 0), None)
    if choice is None:
        if key == "delta":
            return None
        raise MalformedAnswerError("the answer has no choice with index 0")
    if not isinstance(choice, dict) or not isinstance(choice.get(key, {}), dict):
        raise MalformedAnswerError(f"the answer's first choice has no `{key}` object")
    return choice


ERROR_NAME_STATUSES: Final[Mapping[str, int]] = {
    # OpenAI's error codes.
    "invalid_api_key": 401,
    "model_not_found": 404,
    "rate_limit_exceeded": 429,
    # OpenAI's error types, and Anthropic's, which proxies in front of other servers write too.
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "server_error": 500,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""Error codes and types with the HTTP status each comes with: an error inside a stream, or inside a 200 answer, may
have only its name."""


class ErrorEvent(NamedTuple):
    """An error the upstream reported inside a stream."""

    message: str
    status: int | None
    """An HTTP status, where the event gives one as its code (vLLM does)."""
    code: str | None
    named_status: int | None = None
    """Where it gives no status, the one its code, else its type, comes with (ERROR_NAME_STATUSES): what it means,
    not what was sent."""


def error_event(data: Mapping[str, Any]) -> ErrorEvent | None:
    """An in-band error (`data: {"error": {...}}`, as vLLM and OpenAI send when generation fails mid-way), or None
    when the event is not one."""
    error = data.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        # Text as it is; anything else not shown (a repr of JSON nested past Python's stack raises RecursionError).
        said = error if isinstance(error, str) and error else "the upstream sent an error event that is not an object"
        return ErrorEvent(said[:QUOTED_CHARS], None, None)
    message = error.get("message")
    status, code = error_code(error.get("code"), error.get("type"))
    named = None if status is not None else named_status(error.get("code"), error.get("type"))
    return ErrorEvent(
        message if isinstance(message, str) and message else "the upstream sent an error event", status, code, named
    )


def named_status(*names: Any) -> int | None:
    """The HTTP status the first of an error's names (its code, its type) that ERROR_NAME_STATUSES knows comes with."""
    return next(
        (ERROR_NAME_STATUSES[name] for name in names if isinstance(name, str) and name in ERROR_NAME_STATUSES), None
    )


def error_code(code: Any, kind: Any) -> tuple[int | None, str | None]:
    """An error's `code` read, as an error event gives it and as an HTTP error's body does: the HTTP status it gives,
    where it is one (a number from 400 to 599, as vLLM's and llama.cpp's are, or its three digits as text, as LiteLLM
    proxy's are and the OpenAI SDK makes llama.cpp's), and the error's name: the code where it is a word
    (insufficient_quota), else its type (`kind`: a code that is a number says no more than a status)."""
    if isinstance(code, str):
        if not (code.isascii() and code.isdigit()):
            return None, code
        status = int(code) if len(code) == 3 else None
    elif isinstance(code, int) and not isinstance(code, bool):
        status = code
    else:
        status = None
    return (status if status is not None and 400 <= status < 600 else None), (kind if isinstance(kind, str) else None)


def sse_error_field(line: str) -> ErrorEvent | None:
    """An error sent as an `error:` field of its own, after a 200, as llama-server did until September 2025
    (ggml-org/llama.cpp#16109; `data: [DONE]` followed it): None for any other line."""
    if not line.startswith("error:"):
        return None
    try:
        error = decode_json(line[6:].lstrip(" "))
    except MalformedAnswerError:
        error = line[6:].strip()
    return error_event({"error": error})


def message_from_choice(choice: Mapping[str, Any]) -> Message:
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedAnswerError("the answer's first choice has no `message` object")
    calls = message.get("tool_calls") or legacy_call(message)
    if not isinstance(calls, list):
        raise MalformedAnswerError("`tool_calls` is not a list")
    content, reasoning = message.get("content"), reasoning_text(message)
    if isinstance(content, list):
        content, thought = content_parts(content, "content")
        # Both are the model's reasoning, the field's first, as a stream's delta with both gives them.
        reasoning = (reasoning or "") + thought if thought else reasoning
    return Message(
        role=Role.ASSISTANT,
        # A refusal after some content follows it, as the same answer streamed does.
        content=(text_field(content, "content") or "") + (refusal_text(message) or ""),
        tool_calls=calls_apart(tuple(_tool_call(c) for c in calls)),
        reasoning=reasoning,
    )


def legacy_call(obj: Mapping[str, Any]) -> list[Any]:
    """A message's or a delta's `function_call` (the functions API's, before tools; finish reason "function_call") as
    its one tool call, without an id (the gateway gives it one); none when it has none (null, as some proxies send
    it beside `tool_calls`, or anything that is no object: a side field, not the answer)."""
    function = obj.get("function_call")
    return [{"index": 0, "function": function}] if isinstance(function, dict) and function else []


def calls_apart(calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
    """The calls, each with an id of its own (`own_call_id`)."""
    taken: set[str] = set()
    return tuple(
        call if (own := own_call_id(call.id, taken)) == call.id else dataclasses.replace(call, id=own) for call in calls
    )


def own_call_id(call_id: str, taken: set[str]) -> str:
    """`call_id`, or one of the gateway's where a call before it has it (some servers give parallel calls one id: the
    caller's tool messages could not tell them apart, and the gateway would refuse the next turn); taken either way."""
    if call_id in taken:
        call_id = new_call_id()
    taken.add(call_id)
    return call_id


def content_parts(parts: Any, where: str) -> tuple[str | None, str | None]:
    """`content` as a list of parts, as Mistral's reasoning models answer: the text of its text parts, and that of its
    thinking parts (text, or text parts themselves) as reasoning; None for either when there is none. Parts of other
    kinds (references) carry nothing the contract has."""
    if not isinstance(parts, list):
        raise MalformedAnswerError(f"`{where}` is neither text nor a list of parts")
    texts: list[str] = []
    thoughts: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            raise MalformedAnswerError(f"a part of `{where}` is not an object")
        kind = part.get("type")
        if kind == "text":
            texts.append(text_field(part.get("text"), f"{where}[].text"))
        elif kind == "thinking":
            thinking = part.get("thinking")
            inner = thinking if isinstance(thinking, list) else [{"type": "text", "text": thinking}]
            thoughts += (text_field(p.get("text"), f"{where}[].thinking") for p in inner if isinstance(p, dict))
    return "".join(texts) or None, "".join(thoughts) or None


def _tool_call(value: Any) -> ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("function"), dict):
        raise MalformedAnswerError("a tool call has no `function` object")
    function = value["function"]
    return ToolCall(
        id=tool_call_id(value.get("id"), "tool_calls.id"),
        name=tool_name(function.get("name"), "name"),
        arguments=_arguments_text(function.get("arguments", "")),
        signature=call_signature(value),
    )


def tool_call_id(value: Any, where: str) -> str:
    """An answer's tool-call id, or one of the gateway's own where the upstream gave none (an empty one, or none at
    all, as some OpenAI-compatible servers answer): the caller's tool message answers a call by its id, and the gateway
    refuses a call without one in the next turn of the conversation."""
    return text_field(value, where) or new_call_id()


def new_call_id() -> str:
    """A tool-call id of the gateway's own."""
    return f"call_{secrets.token_hex(12)}"


def tool_name(value: Any, where: str) -> str:
    """An answer's tool-call name, MalformedAnswerError when it is none a request can declare (a model's own
    invention, "functions.f"; none at all): the gateway refuses it in the next turn of the conversation, and the
    contract's calls are of the request's tools."""
    name = text_field(value, where)
    if not FUNCTION_NAME.fullmatch(name):
        raise MalformedAnswerError(
            f"a tool call's `{where}` {name[:80]!r} is no function's: a tool's name is 1-64 letters, digits, '_' or '-'"
        )
    return name


def _arguments_text(arguments: Any) -> str:
    # Some servers (Ollama's native API) send arguments as an object; the contract carries JSON text. JSON's null is
    # none at all, as a stream's null fragment adds nothing.
    if arguments is None:
        return ""
    return arguments if isinstance(arguments, str) else arguments_json(arguments)


def arguments_json(arguments: Any) -> str:
    """Tool-call arguments that came as JSON values (an object, not its text) as the contract's text: letters as they
    are, not \\u escapes, as a stream's argument text gives them. MalformedAnswerError when nested too deeply to write:
    orjson reads 1,024 levels, and the standard library's writer stops at the stack's limit, below that."""
    try:
        return json.dumps(arguments, ensure_ascii=False)
    except RecursionError as exc:
        raise MalformedAnswerError("a tool call's arguments are nested too deeply for the gateway to write") from exc


def reasoning_text(obj: Mapping[str, Any]) -> str | None:
    # Ollama sends gpt-oss reasoning as `reasoning`; llama.cpp, vLLM and DeepSeek as `reasoning_content`.
    value = obj.get("reasoning")
    if value is None:
        value = obj.get("reasoning_content")
    # A side channel: something that is not text is dropped rather than failing the whole answer.
    return value if isinstance(value, str) else None


def text_field(value: Any, where: str) -> str:
    """An answer's text field: "" when absent, MalformedAnswerError (naming `where`) when it is no string."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedAnswerError(f"`{where}` is not a string")
    return value


def usage_from(data: Mapping[str, Any]) -> TokenUsage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not is_count(prompt) or not is_count(completion):
        return None
    reasoning = count_field(usage.get("completion_tokens_details"), "reasoning_tokens")
    # A thinking model's thoughts, billed as output, reported beside completion_tokens rather than in them: Gemini's
    # OpenAI endpoint has them in total_tokens alone, xAI in reasoning_tokens and total_tokens. Counted in the
    # completion, as OpenAI counts them, or the answer, the ledger, the limits and the budgets left them out (most of
    # a thinking model's output).
    total = usage.get("total_tokens")
    if is_count(total) and total > prompt + completion:
        beside = total - prompt - completion
        completion, reasoning = completion + beside, max(reasoning or 0, beside)
    elif reasoning is not None and reasoning > completion and total is None:
        completion += reasoning
    return plausible_usage(
        TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            cached_prompt_tokens=count_field(usage.get("prompt_tokens_details"), "cached_tokens"),
        )
    )


def plausible_usage(usage: TokenUsage) -> TokenUsage | None:
    """The usage an upstream reported, each of its counts a `is_count`, or None when their total cannot be one: no
    answer reaches 2**31 tokens, and the contract's int32 `total_tokens` cannot carry it; and no prompt is 0 tokens
    (Ollama's /v1 has reported all zeros for an answer that ended without its metrics, which billed as exact would pass
    every limit on tokens and money). Such figures are nothing to bill by; the gateway counts the tokens itself, as for
    usage not reported. A part larger than its whole (cached past the prompt, reasoning past the completion) is cut
    to it (the cache's writes to what its reads leave of the prompt): the contract has each as part of the other."""
    if not is_count(usage.total_tokens) or usage.prompt_tokens == 0:
        return None
    cached, written, reasoning = usage.cached_prompt_tokens, usage.cache_write_prompt_tokens, usage.reasoning_tokens
    if (cached or 0) + (written or 0) > usage.prompt_tokens or (reasoning or 0) > usage.completion_tokens:
        cached = None if cached is None else min(cached, usage.prompt_tokens)
        return dataclasses.replace(
            usage,
            cached_prompt_tokens=cached,
            cache_write_prompt_tokens=None if written is None else min(written, usage.prompt_tokens - (cached or 0)),
            reasoning_tokens=None if reasoning is None else min(reasoning, usage.completion_tokens),
        )
    return usage


def count_field(obj: Any, key: str) -> int | None:
    """`obj[key]` when `obj` is an object and that is a plausible count (`is_count`), else None."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if is_count(value) else None


def is_count(value: Any) -> TypeGuard[int]:
    """A plausible token count: a whole number that fits the contract's int32 (not a bool, not negative)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT


class StreamToolCalls:
    """The tool calls of one stream so far, as its deltas' fragments make them (`deltas`, then `rest` at its end)."""

    __slots__ = (
        "_arguments",
        "_at",
        "_begun",
        "_ended",
        "_given",
        "_held",
        "_ids",
        "_last",
        "_named",
        "_names",
        "_signed",
        "_tools",
    )

    def __init__(self, tools: Iterable[str] = ()) -> None:
        self._tools = frozenset(tools)
        """The names of the request's tools: they tell a held call's name's next piece from another call's name."""
        self._ended: list[int] = []
        """The held calls a fragment's name was found to follow (`_another`): released as they stand."""
        self._begun: set[int] = set()
        """The indexes of the calls whose first fragment has come."""
        self._ids: dict[str, int] = {}
        """Their ids (the upstream's or the gateway's) -> their indexes."""
        self._last: int | None = None
        """The index of the call the last fragment was of."""
        self._named: dict[int, int] = {}
        """The upstream's indexes -> the index of the call each names now: its own, unless a call before had it."""
        self._at: dict[int, int] = {}
        """The indexes of the calls begun at an upstream's index -> that index."""
        self._given: dict[int, str | None] = {}
        """The indexes of the calls -> the ids the upstream gave them, where the gateway gave another."""
        self._signed: set[int] = set()
        """The indexes of the calls whose signature has been relayed: once a call, as the contract has it."""
        self._arguments: dict[int, _JsonSoFar] = {}
        """The indexes of the calls -> their arguments so far, told whole or not."""
        self._held: dict[int, list[Any]] = {}
        """The indexes of the calls begun whose arguments have not -> [id, name so far, signature]: a call's first
        fragment waits for its arguments (or the stream's end), as a server may send the name in pieces until then
        and the contract has it whole in that fragment."""
        self._names: dict[int, str] = {}
        """The indexes of the calls relayed -> their names."""

    @property
    def begun(self) -> bool:
        """Whether a call has begun."""
        return bool(self._begun)

    def deltas(self, delta: Mapping[str, Any]) -> tuple[ToolCallDelta, ...]:
        """A stream delta's tool-call fragments. A call's first fragment carries its id, the upstream's or, where it
        gave none, one of the gateway's own (`tool_call_id`), and its name (`tool_name`), which it is relayed with
        once the call's arguments begin: the name's pieces before then make it (a server that repeats the whole name,
        as vLLM does, sends no piece). The first fragment with a signature (`call_signature`) carries it, and no later
        one (a server may repeat it, as vLLM repeats ids). A call's name that differs later, once its arguments began
        and before they are whole JSON, is malformed: whose arguments they are is not told."""
        calls = delta.get("tool_calls")
        if not calls:
            return ()
        if not isinstance(calls, list):
            raise MalformedAnswerError("`tool_calls` in a stream delta is not a list")
        result = []
        for call in calls:
            function = (call.get("function") or {}) if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise MalformedAnswerError("a tool-call delta is not an object with a `function` object")
            call_id = _optional_text(call.get("id"), "tool_calls.id")
            name = _optional_text(function.get("name"), "tool_calls.function.name") or None
            arguments = function.get("arguments")
            text = None if arguments is None else _arguments_text(arguments)
            self._ended = []
            index = self._index(call.get("index"), call_id, name, text)
            if index not in self._begun:  # another call than those held whose names it follows: they are whole
                result += [self._release(ended) for ended in self._ended if ended in self._held]
            self._last = index
            signature = call_signature(call) if "extra_content" in call else None
            if index not in self._begun:
                # An id another call has (some servers give parallel calls one id): the caller's tool messages could
                # not tell the calls apart, and the gateway would refuse the next turn.
                if call_id in self._ids:
                    self._given[index], call_id = call_id, None
                call_id = tool_call_id(call_id, "tool_calls.id")
                self._begun.add(index)
                self._ids[call_id] = index
                if not text:
                    self._held[index] = [
                        call_id,
                        tool_name(name, "tool_calls.function.name") if name else "",
                        signature,
                    ]
                    continue
                name = self._names[index] = tool_name(name, "tool_calls.function.name")
            elif self._held and (held := self._held.get(index)) is not None:
                if name is not None and self._piece(held[1], name):  # a piece of it, not the whole again
                    held[1] = tool_name(held[1] + name, "tool_calls.function.name")
                held[2] = held[2] or signature
                if not text:
                    continue
                del self._held[index]
                call_id, name, signature = held
                name = self._names[index] = tool_name(name, "tool_calls.function.name")
            else:
                if name is not None and name != self._names[index]:
                    raise MalformedAnswerError(
                        f"a tool call's name {name[:80]!r} came after its arguments began, which were of"
                        f" {self._names[index]!r}"
                    )
                call_id = name = None  # the contract has them in a call's first fragment (vLLM repeats them)
            if text:
                if (so_far := self._arguments.get(index)) is None:
                    so_far = self._arguments[index] = _JsonSoFar()
                so_far.add(text)
            if signature is not None:
                if index in self._signed:
                    signature = None
                else:
                    self._signed.add(index)
            result.append(
                ToolCallDelta(
                    index=index,
                    id=call_id,
                    name=name,
                    arguments=text,
                    signature=signature,
                )
            )
        return tuple(result)

    def rest(self) -> tuple[ToolCallDelta, ...]:
        """At the stream's end, the first fragments of the calls whose arguments never began (a function without
        parameters, called so), each with its name now whole: MalformedAnswerError for one that never came."""
        if not self._held:
            return ()
        return tuple(self._release(index) for index in sorted(self._held))

    def _release(self, index: int) -> ToolCallDelta:
        """A held call's first fragment, with its name as it stands."""
        call_id, name, signature = self._held.pop(index)
        name = self._names[index] = tool_name(name, "tool_calls.function.name")
        if signature is not None:
            self._signed.add(index)
        return ToolCallDelta(index=index, id=call_id, name=name, signature=signature)

    def _piece(self, held: str, name: str) -> bool | None:
        """What a name fragment is to a held call's name so far (`held`): a piece of it (True), the whole again (False:
        vLLM repeats it), or the name of another call (None). Told by the request's tools where it declares any: a
        piece where the name joined is one's or begins one, the whole again where `held` is one's and it comes again,
        another call where `held` is one's already (an OpenRouter engine's calls, each whole at index 0, the first
        without arguments); else a piece unless it is the whole again."""
        if self._tools:
            joined = held + name
            if any(tool.startswith(joined) for tool in self._tools):
                return True
            if held in self._tools:
                return False if name == held else None
        return name != held

    def _index(self, index: Any, call_id: str | None, name: str | None, text: str | None) -> int:
        """The fragment's call. Servers that number no call (Gemini's OpenAI-compatible API) send each whole, or its
        first fragment with its id and name: a fragment without an `index` is of the call its id names, a new call
        when it names one not seen or gives a name, else of the call the last fragment was of. An `index` names the
        call of that index, or the one its id names (vLLM sends the id with every fragment); an id not seen with a
        name, at an index taken, is a new call, numbered after the others (Ollama sends parallel calls whole, each as
        index 0); without a name, the same call (some servers send each fragment with an id of its own). An id seen at
        another index of the upstream's, with a name, is a new call too (some servers give parallel calls one id), as
        is one seen with a name again once its call's arguments are whole (at the same index, or with none), and a
        name other than its call's once they are, with no id (an OpenRouter engine's calls, each whole at index 0), or
        one no piece of a held call's name by the request's tools (`_piece`)."""
        if index is None:
            if call_id and (known := self._ids.get(call_id)) is not None and not self._another(known, name, text):
                return known
            if call_id or name or self._last is None:
                return _numbered(max(self._begun, default=-1) + 1)
            return self._last
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
            raise MalformedAnswerError(f"a tool-call delta's `index` is not a number from 0 to {MAX_TOOL_CALLS - 1}")
        named = self._named.get(index)
        known = self._ids.get(call_id) if call_id else None
        if known is not None and self._at.get(known, index) == index and not self._another(known, name, text):
            return known
        if named is not None:
            if not name:
                return named
            if call_id:
                another = self._given.get(named) != call_id or self._another(named, name, text)
            else:
                another = self._another(named, name, text)
            if not another:
                return named
        if named is None and index not in self._begun:
            self._named[index] = self._at[index] = index
            return index
        self._named[index] = numbered = _numbered(max(self._begun) + 1)
        self._at[numbered] = index
        return numbered

    def _another(self, call: int, name: str | None, text: str | None) -> bool:
        """Whether a fragment that names a function (`name`) begins another call than `call`, whose id it has, or
        whose index without an id: when the call's arguments are whole JSON already (vLLM repeats a call's id and
        name while its arguments come), and it names another function, or more arguments come with it (whole JSON
        and more is no JSON: an OpenRouter engine's parallel calls of one function, each whole at index 0); its name
        (and id) again, with no more (a server that repeats them at the end), are of the call."""
        if name and (held := self._held.get(call)) is not None:
            if self._piece(held[1], name) is not None:
                return False
            self._ended.append(call)
            return True
        if not name or (so_far := self._arguments.get(call)) is None:
            return False
        if name == self._names.get(call) and (not text or text.isspace()):
            return False
        return so_far.whole


_STRUCTURE: Final = re.compile(r'[\\"{}\[\]]')
"""The characters that shape a JSON text's nesting: brackets, and the quotes and backslashes of its strings."""


class _JsonSoFar:
    """A tool call's arguments as they come, and whether they are whole JSON so far, told in time linear in their
    length: vLLM sends a call's name with every fragment, and `_another` asks at each; a parse of the whole text at
    each cost a long call's arguments their length squared (a list of 30,000 small objects, which ends as an object
    does at almost every fragment: two minutes of the event loop). Their nesting is followed as they come; the text is
    parsed once, when the value that opened it closes: after that, anything but whitespace makes it no JSON for good."""

    __slots__ = ("_closed", "_depth", "_escaped", "_in_string", "_more", "_parsed", "_text")

    def __init__(self) -> None:
        self._text = io.StringIO()  # not a list of the fragments: some 60 bytes each, for 4 characters
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the last fragment ended on a backslash within a string
        self._closed = False  # the value that opened the text has closed
        self._more = False  # something but whitespace came after it
        self._parsed: bool | None = None  # the text, once closed, is JSON (parsed when first asked)

    def add(self, text: str) -> None:
        self._text.write(text)
        if self._closed:
            self._more = self._more or not text.isspace()
            return
        skip = 0 if self._escaped else -1  # the position of a character a backslash escapes
        self._escaped = False
        for match in _STRUCTURE.finditer(text):
            at, character = match.start(), match.group()
            if at == skip:
                continue
            if self._in_string:
                if character == "\\":
                    skip = at + 1
                    self._escaped = skip == len(text)
                elif character == '"':
                    self._in_string = False
            elif self._closed:
                self._more = True
                return
            elif character == '"':
                self._in_string = True
            elif character in "{[":
                self._depth += 1
            elif character in "}]":
                self._depth -= 1
                self._closed = self._depth <= 0
        if self._closed and not self._more:
            # Past the closing bracket in this same fragment: whitespace, or more.
            last = max(text.rfind("}"), text.rfind("]"))
            self._more = not text[last + 1 :].isspace() and last + 1 < len(text)

    @property
    def whole(self) -> bool:
        """Whether the text so far is one whole JSON value that opened with a bracket (and whitespace)."""
        if not self._closed or self._more:
            return False
        if self._parsed is None:
            try:
                orjson.loads(self._text.getvalue())
            except orjson.JSONDecodeError:
                self._parsed = False
            else:
                self._parsed = True
        return self._parsed


def _numbered(index: int) -> int:
    if index >= MAX_TOOL_CALLS:
        raise MalformedAnswerError(f"an answer with more than {MAX_TOOL_CALLS} tool calls")
    return index


def _optional_text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MalformedAnswerError(f"`{where}` is not a string")


def whole_answer_chunks(
    answer_id: str, backend: str, model: str, message: Message, finish: FinishReason, usage: TokenUsage | None
) -> list[CompletionChunk]:
    """An answer that came whole where a stream was asked for (an upstream that ignored `stream: true`), as the stream
    it stands for: one chunk with its text, reasoning and tool calls (none when it has none), then the last one."""
    last = CompletionChunk(
        id=answer_id,
        backend=backend,
        model=model,
        finish_reason=finish,
        usage=usage,
        reasoning_signature=message.reasoning_signature,
    )
    if not (message.content or message.reasoning or message.tool_calls):
        return [last]
    calls = tuple(
        ToolCallDelta(i, call.id, call.name, call.arguments, call.signature)
        for i, call in enumerate(message.tool_calls)
    )
    content = CompletionChunk(
        id=answer_id,
        backend=backend,
        model=model,
        content=message.content or None,
        reasoning=message.reasoning or None,
        tool_calls=calls,
    )
    return [content, last]


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for comments, blank lines and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].lstrip(" ")


def sse_stray(line: str) -> bool:
    """Whether a line that is not `data:` is none of an event stream's either (a comment, `event:`, `id:`, `retry:`):
    an HTML page or JSON lines answered in place of events."""
    return not line.startswith((":", "event:", "id:", "retry:"))


def cut_short(wanted: str, events: bool, stray: str | None) -> MalformedAnswerError:
    """Why a stream that ended before `wanted` is no answer, saying what came in place of events when none did: a
    200 with an HTML page or plain JSON lines would otherwise read as a stream cut short."""
    if events:
        return MalformedAnswerError(f"the stream ended without {wanted}")
    if stray is not None:
        line = repr(stray[:80])
        return MalformedAnswerError(
            f"no event came: the answer is not an event stream (its first line that is none: {line})", quoted=line
        )
    return MalformedAnswerError(
        "no event came: the answer was empty, or held only comments (keep-alives) and other fields"
    )


# --- embeddings -----------------------------------------------------------------------------------------------


def embedding_body(model: str, request: EmbeddingRequest) -> dict[str, Any]:
    """The JSON body for /embeddings. Vectors are asked for in base64: 4 bytes a dimension (a third of their decimal
    text), and bytes that need no Python float per dimension to become the caller's packed floats."""
    body: dict[str, Any] = {"model": model, "input": list(request.inputs), "encoding_format": "base64"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def embedding_vectors(data: Any, count: int) -> tuple[bytes, ...]:
    """The `count` vectors of an /embeddings answer, in the inputs' order (each item's `index`; the list's own order
    is not promised), as little-endian 32-bit floats: from base64, or from numbers where a server ignores
    encoding_format."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) and isinstance(data, dict) and (event := error_event(data)) is not None:
        raise ErrorAnswer(event)
    if not isinstance(items, list) or len(items) != count:
        raise MalformedAnswerError(f"`data` does not hold one embedding for each of the {count} inputs")
    by_index: dict[int, bytes] = {}
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if not is_count(index) or index >= count or index in by_index:
            raise MalformedAnswerError("an embedding's `index` is missing, out of range or repeated")
        by_index[index] = _vector(item.get("embedding"))
    vectors = tuple(by_index[index] for index in range(count))  # `count` distinct indexes below `count`: all there
    if len({len(vector) for vector in vectors}) != 1:
        raise MalformedAnswerError("the embeddings differ in their number of dimensions")
    return vectors


def _vector(value: Any) -> bytes:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:  # binascii.Error, or a ValueError of its own for text beyond ASCII
            raise MalformedAnswerError("an embedding is not valid base64") from exc
    elif isinstance(value, list):
        try:
            raw = struct.pack(f"<{len(value)}f", *value)
        except (struct.error, OverflowError) as exc:
            raise MalformedAnswerError("an embedding holds something other than 32-bit floats") from exc
        if bool in map(type, value):  # which struct packs as 1.0 and 0.0 (a scan in C, as the packing is)
            raise MalformedAnswerError("an embedding holds true or false, not numbers")
    else:
        raise MalformedAnswerError("an embedding is neither base64 text nor a list of numbers")
    if not raw or len(raw) % 4:
        raise MalformedAnswerError("an embedding is not a whole number of 32-bit floats")
    if not _finite(raw):
        raise MalformedAnswerError("an embedding holds NaN or infinity")
    return raw


# NaN and the infinities are the float32s whose 8 exponent bits are all set: in little-endian, the low 7 bits of a
# float's byte 3 (0x7F or 0xFF) and the top bit of its byte 2. Each table marks a byte that has its share of them.
_EXPONENT_HIGH: Final = bytes(int(byte & 0x7F == 0x7F) for byte in range(256))
_EXPONENT_LOW: Final = bytes(byte >> 7 for byte in range(256))


def _finite(raw: bytes) -> bool:
    """Whether every float of a vector is finite: tested on its bytes, no Python float per dimension."""
    high = raw[3::4]
    if 0x7F not in high and 0xFF not in high:
        return True  # every float under 2**127 in magnitude, as a model's are: one search of the bytes tells
    # The marks of bytes 3 and of bytes 2, each an integer of a bit per byte: a float with both is not finite.
    low = raw[2::4]
    return not int.from_bytes(high.translate(_EXPONENT_HIGH), "little") & int.from_bytes(
        low.translate(_EXPONENT_LOW), "little"
    )


def embedding_usage_from(data: Mapping[str, Any]) -> TokenUsage | None:
    usage = data.get("usage")
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    # No input is 0 tokens (see plausible_usage): such a count is no count.
    return TokenUsage(prompt_tokens=prompt, completion_tokens=0) if is_count(prompt) and prompt else None
