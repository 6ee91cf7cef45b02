"""Anthropic's Messages API wire format: domain types to request JSON, and answers (JSON or SSE events) back.

Pure functions, no I/O, as `wire` is for OpenAI's format (whose error type and SSE helpers this module shares).
docs/openai-anthropic.md sets the two formats side by side, with what cannot be mapped and what is done then.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from llmrelay_server import images
from llmrelay_server.backends.wire import (
    MAX_TOOL_CALLS,
    ErrorAnswer,
    ErrorEvent,
    MalformedAnswerError,
    arguments_json,
    as_called,
    calls_apart,
    count_field,
    is_count,
    named_status,
    own_call_id,
    plausible_usage,
    text_field,
    tool_call_id,
    tool_name,
)
from llmrelay_server.domain import (
    CompletionOptions,
    CompletionRequest,
    FinishReason,
    ImagePart,
    JsonText,
    Message,
    NamedToolChoice,
    NotFiniteError,
    ReasoningEffort,
    Role,
    TextPart,
    TokenUsage,
    Tool,
    ToolCall,
    ToolCallDelta,
    read_json,
)

MIN_THINKING_BUDGET: Final = 1024
"""The smallest budget_tokens the API takes."""
# reasoning_effort as extended thinking's budget_tokens: the API's minimum for "minimal", then 4k, 8k and 16k tokens,
# well below the 32k past which, Anthropic notes, a model rarely uses its whole budget. Thinking counts toward
# max_tokens.
THINKING_BUDGETS: Final[Mapping[ReasoningEffort, int]] = {"minimal": 1024, "low": 4096, "medium": 8192, "high": 16384}
# ... and as adaptive thinking's effort, for the models whose capabilities say they take no budget (newer ones
# reject budget_tokens); the API has no effort below "low".
ADAPTIVE_EFFORTS: Final[Mapping[ReasoningEffort, str]] = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
}

_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    # The prompt and the answer filled the model's context window: the answer was cut, as by max_tokens.
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
    # pause_turn (a server tool's long turn, which the gateway never asks for) and any reason added later: UNKNOWN.
}


class UnmappableRequestError(ValueError):
    """The request holds something the Messages API cannot take; the message names the field."""


# --- requests -------------------------------------------------------------------------------------------------------


def max_tokens_asked(options: CompletionOptions, default_max_tokens: int) -> int:
    """The most max_tokens `request_body` sends for these options: the caller's, else the default with thinking's
    budget on top (a chat that cannot think, its tool choice forced or its answer prefilled, is sent the default)."""
    if options.max_tokens is not None:
        return options.max_tokens
    effort = options.reasoning_effort
    return default_max_tokens + (THINKING_BUDGETS[effort] if effort is not None and effort != "none" else 0)


def request_body(
    model: str, request: CompletionRequest, *, default_max_tokens: int, adaptive_thinking: bool
) -> dict[str, Any]:
    """The JSON body for /v1/messages. `adaptive_thinking`: the model takes reasoning_effort as adaptive thinking's
    effort rather than as a budget. Options the API has no parameter for are left out (docs/openai-anthropic.md)."""
    options = request.options
    body = prompt_body(model, request.messages, options.tools)
    body["max_tokens"] = default_max_tokens if options.max_tokens is None else options.max_tokens
    output: dict[str, Any] = {}
    effort = options.reasoning_effort
    # Thinking cannot be combined with a forced tool choice: the tool call the caller demands wins. Nor can it be
    # turned on within a tool-use cycle whose assistant turn began without a thinking block (one another upstream
    # began, whose reasoning cannot be sent back): the API refuses it (400 "a final assistant message must start with
    # a thinking block"), and the cycle ends as it began, without thinking. Nor with a prefill (the chat ends in
    # the assistant's words, for the answer to go on from): the API refuses that the same way, and newer models
    # take no prefill with thinking at all.
    forced = (
        options.tool_choice == "required"
        or isinstance(options.tool_choice, NamedToolChoice)
        or body["messages"][-1]["role"] == "assistant"
        or _in_unthought_tool_cycle(body["messages"])
    )
    if effort == "none":
        body["thinking"] = {"type": "disabled"}  # said outright: a model may think by default
    elif effort is not None and not forced:
        budget = THINKING_BUDGETS[effort]
        if options.max_tokens is None:
            # The answer keeps its default room; the thinking gets its budget on top (adaptive thinking too, which
            # thinks within max_tokens: else a high effort's thinking left the answer little of the default).
            body["max_tokens"] = default_max_tokens + budget
        # Summarized, said outright: newer models (Opus 4.7 on) omit the thinking's text unless asked, so a caller
        # that asked for reasoning got none, and a stream sent nothing while the model thought, which the gateway's
        # first-chunk and idle timeouts took for a silent backend.
        if adaptive_thinking:
            body["thinking"] = {"type": "adaptive", "display": "summarized"}
            output["effort"] = ADAPTIVE_EFFORTS[effort]
        else:
            if options.max_tokens is not None:
                # The caller's max_tokens bounds thinking and answer together, as OpenAI's does for reasoning models.
                budget = min(budget, options.max_tokens - 1)
            if budget >= MIN_THINKING_BUDGET:
                body["thinking"] = {"type": "enabled", "budget_tokens": budget, "display": "summarized"}
    if options.stop:
        if not all(stop.strip() for stop in options.stop):
            # The API refuses one (400 "each stop sequence must contain non-whitespace"); the OpenAI format takes it.
            raise UnmappableRequestError("options.stop: Anthropic takes no stop sequence of whitespace alone")
        body["stop_sequences"] = list(options.stop)
    if (choice := _tool_choice(options)) is not None:
        body["tool_choice"] = choice
    fmt = options.response_format
    if fmt is not None and fmt.json_schema is not None:
        # A JsonText, checked to be an object where it came in, is sent as written (`wire.encode`), as OpenAI's path
        # sends it: however large its integers and deep its nesting.
        output["format"] = {"type": "json_schema", "schema": fmt.json_schema.schema}
    if output:
        body["output_config"] = output
    return body


def _in_unthought_tool_cycle(turns: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the chat ends in tool results, and the assistant turn that began their cycle (after the last user turn
    that is more than tool results) does not begin with a thinking block."""
    if turns[-1]["role"] != "user" or turns[-1]["content"][0]["type"] != "tool_result":
        return False
    start = len(turns) - 2
    while start >= 2 and all(block["type"] == "tool_result" for block in turns[start - 1]["content"]):
        start -= 2  # an earlier step of the same cycle: an assistant turn answered by tool results alone
    return start >= 0 and turns[start]["content"][0]["type"] != "thinking"


def prompt_body(model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> dict[str, Any]:
    """What makes the prompt: model, system, messages and tools; also the body of /v1/messages/count_tokens. The
    caller's JSON texts in it are JsonTexts, for `wire.encode` to write as they came."""
    _check_images(messages)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    ids = _ToolUseIds()
    left_out = False
    for index, message in enumerate(messages):
        if message.role is Role.SYSTEM:
            # The API has one system prompt, beside the turns: every system message goes there, in order.
            system += _content_blocks(message)
            continue
        if message.role is Role.ASSISTANT:
            role, blocks = "assistant", _assistant_blocks(message, f"messages[{index}]", ids)
        elif message.role is Role.TOOL:
            role, blocks = "user", [_tool_result(message, ids)]
        else:
            role, blocks = "user", _content_blocks(message)
        if not blocks:
            left_out = True  # the API refuses empty turns; an empty message says nothing
            continue
        if turns and turns[-1]["role"] == role:
            # The API wants user and assistant turns to alternate: tool results and the text after them are one turn.
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        # The API answers 400 to a request without turns; the OpenAI format takes system messages alone, and text
        # of whitespace alone.
        if left_out:
            raise UnmappableRequestError(
                "messages: Anthropic needs a user or assistant message with more than whitespace (text or an image);"
                " every one here is whitespace alone"
            )
        raise UnmappableRequestError("messages: Anthropic needs a user or assistant message beside the system ones")
    if turns[-1]["role"] == "assistant" and (last := turns[-1]["content"][-1])["type"] == "text":
        # A prefill, whose words the answer goes on from: the API refuses one that ends in whitespace (400 "final
        # assistant content cannot end with trailing whitespace"); the OpenAI format takes it.
        last["text"] = last["text"].rstrip()
    body: dict[str, Any] = {"model": model, "messages": turns}
    if system:
        body["system"] = system
    if tools:
        body["tools"] = [_tool(t) for t in tools]
    return body


def _content_blocks(message: Message) -> list[dict[str, Any]]:
    # Text of whitespace alone is left out: the API refuses such a block (400 "text content blocks must contain
    # non-whitespace text"), which an OpenAI model's turn often holds beside its tool calls ("\n\n").
    if not message.parts:
        return [{"type": "text", "text": message.content}] if message.content.strip() else []
    blocks: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            if part.text.strip():
                blocks.append({"type": "text", "text": part.text})
        else:
            blocks.append(_image(part))
    return blocks


# What the API takes of an image (400s otherwise): 5 MB of base64 ("image exceeds 5 MB maximum"), and 8000px a side
# ("At least one of the image dimensions exceed max allowed size"), or 2000px in a request of more than 20 images.
MAX_IMAGE_BASE64_BYTES: Final = 5 * 1024 * 1024
MAX_IMAGE_SIDE_PX: Final = 8000
MANY_IMAGES: Final = 20
MAX_IMAGE_SIDE_OF_MANY_PX: Final = 2000


def _check_images(messages: Sequence[Message]) -> None:
    """UnmappableRequestError for an image the API refuses by its size (a 400 that ended the call as the caller's
    mistake, where an OpenAI-format backend next in the chain would take it): over 5 MB in base64, or a side over
    8000px (2000px in a request of more than 20 images)."""
    found = [
        (f"messages[{i}].parts[{j}].image", part.data)
        for i, message in enumerate(messages)
        for j, part in enumerate(message.parts)
        if isinstance(part, ImagePart) and part.data is not None
    ]
    most_px = MAX_IMAGE_SIDE_OF_MANY_PX if len(found) > MANY_IMAGES else MAX_IMAGE_SIDE_PX
    for where, data in found:
        if (encoded := -(-len(data) // 3) * 4) > MAX_IMAGE_BASE64_BYTES:
            raise UnmappableRequestError(
                f"{where}: Anthropic takes an image of at most 5 MB in base64 (this one: {encoded} bytes)"
            )
        size = images.dimensions(data)
        if size is not None and max(size) > most_px:
            raise UnmappableRequestError(
                f"{where}: Anthropic takes an image of at most {most_px}px a side"
                + (f" in a request of more than {MANY_IMAGES} images" if most_px == MAX_IMAGE_SIDE_OF_MANY_PX else "")
                + f" (this one: {size[0]}x{size[1]})"
            )


def _image(part: ImagePart) -> dict[str, Any]:
    # `detail` has no counterpart: Anthropic sizes images itself.
    if part.url is not None:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    data = base64.b64encode(part.data or b"").decode("ascii")
    return {"type": "image", "source": {"type": "base64", "media_type": part.media_type, "data": data}}


def _assistant_blocks(message: Message, where: str, ids: _ToolUseIds) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    # A thinking block goes back first and unchanged, with its signature; reasoning without one (another upstream's)
    # cannot be sent back as thinking and is left out.
    if (signature := message.reasoning_signature) is not None:
        blocks.append({"type": "thinking", "thinking": message.reasoning or "", "signature": signature})
    blocks += _content_blocks(message)
    for position, call in enumerate(message.tool_calls):
        arguments = _arguments(call.arguments, f"{where}.tool_calls[{position}].function.arguments")
        blocks.append({"type": "tool_use", "id": ids.of_call(call.id), "name": call.name, "input": arguments})
    return blocks


class _ToolUseIds:
    """A request's tool_use ids. The API takes an id once in a request (400 "tool_use ids must be unique"), where the
    OpenAI format takes one again in a later turn (Kimi's "functions.weather:0" in every turn that calls the tool, a
    model's "call_0"): a later call with an id taken gets the id with "_2", "_3"... after it, and the tool results
    that answer it (right after it, `convert`'s check) the same. The same chat always gets the same ids, so that a
    conversation's earlier turns stay the prefix its cache knows."""

    __slots__ = ("_answered_as", "_taken")

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._answered_as: dict[str, str] = {}
        """A call's id as the caller wrote it -> as its latest call is sent."""

    def of_call(self, call_id: str) -> str:
        sent = first = _tool_use_id(call_id)
        repeat = 1
        while sent in self._taken:
            repeat += 1
            sent = f"{first}_{repeat}"
        self._taken.add(sent)
        self._answered_as[call_id] = sent
        return sent

    def of_result(self, call_id: str) -> str:
        return self._answered_as.get(call_id) or _tool_use_id(call_id)


_TOOL_USE_ID: Final = re.compile(r"[A-Za-z0-9_-]+")
_NOT_IN_A_TOOL_USE_ID: Final = re.compile(r"[^A-Za-z0-9_-]")


def _tool_use_id(call_id: str) -> str:
    """A tool call's id as the API takes it, in a tool_use block and the tool_result that answers it alike (400
    "String should match pattern '^[a-zA-Z0-9_-]+$'" otherwise). Other upstreams' ids may hold other characters (Kimi's
    "functions.weather:0"), and the OpenAI format takes any: each of them becomes "_", and a digest of the whole id
    follows, so that two ids that differ only there stay two. The same id always becomes the same."""
    if _TOOL_USE_ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:16]
    return f"{_NOT_IN_A_TOOL_USE_ID.sub('_', call_id)}_{digest}"


def _arguments(text: str, where: str) -> JsonText | dict[str, Any]:
    """A tool call's arguments as a tool_use block's `input`: the caller's text, sent as written (`wire.encode`), once
    read to be a JSON object that any JSON reader takes as the caller means it."""
    if not text.strip():
        return {}  # a call with no arguments, as some models write it
    try:
        value = read_json(text)
    except NotFiniteError as exc:
        raise UnmappableRequestError(f"{where}: {exc}") from exc
    except ValueError:
        value = None
    except RecursionError as exc:
        raise UnmappableRequestError(f"{where}: nested too deeply for the gateway to read") from exc
    if not isinstance(value, dict):
        raise UnmappableRequestError(f"{where}: Anthropic takes a tool call's arguments only as a JSON object")
    return JsonText(text)


def _tool_result(message: Message, ids: _ToolUseIds) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": ids.of_result(message.tool_call_id or "")}
    if content := _content_blocks(message):
        result["content"] = content
    return result


def _tool(tool: Tool) -> dict[str, Any]:
    item: dict[str, Any] = {"name": tool.name, "input_schema": _input_schema(tool.parameters)}
    if tool.description is not None:
        item["description"] = tool.description
    if tool.strict is not None:
        item["strict"] = tool.strict
    return item


def _input_schema(schema: Mapping[str, Any] | JsonText | None) -> Mapping[str, Any] | JsonText:
    """A tool's parameters as its input_schema, which the API requires, saying "type": "object" (else 400
    "input_schema.type: Field required"). The OpenAI format takes parameters without a type ({} for a function without
    any), and the gateway took them as an object's (convert._tool): the type is put first where it is missing. A
    JsonText, checked to be an object where it came in, is otherwise sent as written (`wire.encode`), as OpenAI's path
    sends it: however large its integers and deep its nesting."""
    if schema is None:
        return {"type": "object"}  # a function without parameters
    fields = read_json(schema.text) if isinstance(schema, JsonText) else schema
    if "type" in fields:
        return schema
    if isinstance(schema, JsonText):
        before, brace, after = schema.text.partition("{")  # an object's text: its first "{" opens it
        return JsonText(f'{before}{brace}"type": "object"{", " if fields else ""}{after}')
    return {"type": "object", **schema}


def _tool_choice(options: CompletionOptions) -> dict[str, Any] | None:
    choice = options.tool_choice
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, NamedToolChoice):
        result: dict[str, Any] = {"type": "tool", "name": choice.name}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "auto" or options.parallel_tool_calls is False:
        result = {"type": "auto"}
    else:
        return None
    if options.parallel_tool_calls is False:
        result["disable_parallel_tool_use"] = True
    return result


# --- answers ---------------------------------------------------------------------------------------------------------


class Answer(NamedTuple):
    id: str
    model: str
    message: Message
    finish_reason: FinishReason
    usage: TokenUsage | None
    """None when the upstream reported none it could be trusted with (the caller estimates)."""
    prompt_usage: TokenUsage | None
    """The prompt's part of the usage, when the upstream reported it without the answer's: the caller estimates the
    answer's alone."""


def answer_from(data: Any) -> Answer:
    """A /v1/messages answer; MalformedAnswerError when it is not one."""
    if not isinstance(data, dict):
        raise MalformedAnswerError(f"expected a JSON object, got {type(data).__name__}")
    content = data.get("content")
    if not isinstance(content, list):
        if (event := error_event(data)) is not None:  # as Anthropic answers an error, with a 200
            raise ErrorAnswer(event)
        raise MalformedAnswerError("the answer has no `content` list")
    texts: list[str] = []
    thoughts: list[str] = []
    signatures: list[str] = []
    calls: list[ToolCall] = []
    for block in content:
        if not isinstance(block, dict):
            raise MalformedAnswerError("a content block is not an object")
        kind = block.get("type")
        if kind == "text":
            texts.append(text_field(block.get("text"), "text"))
        elif kind == "thinking":
            thoughts.append(text_field(block.get("thinking"), "thinking"))
            signatures.append(text_field(block.get("signature"), "signature"))
        elif kind == "tool_use":
            calls.append(_tool_call(block))
        elif kind == "redacted_thinking":
            # Left out, as it has no place in the contract, and counted as a thinking block without a signature: the
            # API takes the latest turn's thinking back only whole, so the others are not sent back either.
            signatures.append("")
        # Other blocks (server tools' blocks) have no place in the contract and are left out.
    message = Message(
        role=Role.ASSISTANT,
        content="".join(texts),
        tool_calls=calls_apart(tuple(calls)),
        reasoning="".join(thoughts) if thoughts else None,
        reasoning_signature=reasoning_signature(signatures),
    )
    return Answer(
        id=text_field(data.get("id"), "id"),
        model=text_field(data.get("model"), "model"),
        message=message,
        finish_reason=as_called(finish_reason(data.get("stop_reason")), bool(calls)),
        usage=usage_from(data.get("usage")),
        prompt_usage=prompt_usage_from(data.get("usage")),
    )


def reasoning_signature(signatures: Sequence[str]) -> str | None:
    """The answer's reasoning_signature, from its thinking blocks' signatures ("" for a block without one), in a
    unary answer and a stream alike: the one block's, when the answer has exactly one thinking block and it is
    signed. One signature signs one block: the contract carries one, so several blocks cannot be sent back (nor the
    signature of one of them with the others' text); and a block without a signature has none to send back (thinking
    goes back only with its signature, `_assistant_blocks`)."""
    return (signatures[0] or None) if len(signatures) == 1 else None


def _tool_call(block: Mapping[str, Any]) -> ToolCall:
    arguments = _tool_input(block)
    return ToolCall(
        id=tool_call_id(block.get("id"), "tool_use.id"),
        name=tool_name(block.get("name"), "tool_use.name"),
        arguments=arguments_json(arguments),
    )


def _tool_input(block: Mapping[str, Any]) -> dict[str, Any]:
    """A tool_use block's input, the same whole or streamed: none (absent or null) is no arguments."""
    arguments = block.get("input")
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise MalformedAnswerError("a tool_use block's `input` is not an object")
    return arguments


def finish_reason(value: Any) -> FinishReason:
    return _FINISH_REASONS.get(value, FinishReason.UNKNOWN) if isinstance(value, str) else FinishReason.UNKNOWN


def usage_from(usage: Any) -> TokenUsage | None:
    """The contract's usage: the prompt is the input tokens after the last cache breakpoint plus those written to and
    read from the cache (Anthropic counts the three apart); the cached part is the tokens read from the cache, the
    cache's writes those written to it (billed above the input rate). None when the upstream reported none, or none
    plausible (`plausible_usage`)."""
    prompt = prompt_usage_from(usage)
    output = usage.get("output_tokens") if prompt is not None else None
    if prompt is None or not is_count(output):
        return None
    return plausible_usage(
        TokenUsage(
            prompt_tokens=prompt.prompt_tokens,
            completion_tokens=output,
            reasoning_tokens=count_field(usage.get("output_tokens_details"), "thinking_tokens"),
            cached_prompt_tokens=prompt.cached_prompt_tokens,
            cache_write_prompt_tokens=prompt.cache_write_prompt_tokens,
        )
    )


def prompt_usage_from(usage: Any) -> TokenUsage | None:
    """The prompt's part of a usage (as `usage_from` counts it; completion_tokens 0), whatever its output count says:
    what message_start reports before the answer. None without a plausible input count."""
    if not isinstance(usage, dict) or not is_count(fresh := usage.get("input_tokens")):
        return None
    written = count_field(usage, "cache_creation_input_tokens")
    read = count_field(usage, "cache_read_input_tokens")
    return plausible_usage(
        TokenUsage(
            prompt_tokens=fresh + (written or 0) + (read or 0),
            completion_tokens=0,
            cached_prompt_tokens=read,
            cache_write_prompt_tokens=written,
        )
    )


def error_event(data: Any) -> ErrorEvent | None:
    """An `error` event (`{"type": "error", "error": {"type": ..., "message": ...}}`), or None for any other."""
    if not isinstance(data, dict) or data.get("type") != "error":
        return None
    error = data.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return ErrorEvent(
        message if isinstance(message, str) and message else "the upstream sent an error event",
        None,  # the stream's answer was a 200: no status was sent, as the OpenAI-compatible path has it
        kind if isinstance(kind, str) else None,
        named_status(kind),  # an error event inside a stream has only its type, which means one
    )


class StreamDelta(NamedTuple):
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass
class StreamState:
    """What a stream's events have said so far. `event` reads one and returns what it adds to the answer."""

    id: str = ""
    model: str = ""
    finish_reason: FinishReason | None = None
    stopped: bool = False
    """message_stop came: the answer is whole."""
    prompt_usage: TokenUsage | None = None
    """The prompt's usage as reported so far (`prompt_usage_from`): message_start's, which a stream that breaks or
    ends without its output count is billed for its prompt."""
    _usage: dict[str, Any] = field(default_factory=dict)
    _tools: dict[int, int] = field(default_factory=dict)
    """Content block index -> the tool call's index in the contract (the calls are numbered on their own)."""
    _call_ids: set[str] = field(default_factory=set)
    """The ids the calls were given (`wire.own_call_id`)."""
    _unargued: dict[int, str] = field(default_factory=dict)
    """The tool_use blocks no argument text has arrived for -> the arguments they have if none comes: the input of
    their content_block_start where it holds some (a server that sends the input whole there, which the SDK reads
    as the block's input), else none ("{}", as the unary answer writes it)."""
    _stopped: set[int] = field(default_factory=set)
    """The tool_use blocks content_block_stop ended: argument text after it would be appended to a whole call's."""
    _server_tools: set[int] = field(default_factory=set)
    """Blocks of the tools the API runs itself (server_tool_use, mcp_tool_use): their input is not the caller's to
    run, and is left out as the unary answer leaves their blocks out."""
    _signatures: dict[int, str] = field(default_factory=dict)
    """Content block index -> its thinking block's signature ("" while it has none): the start's, replaced by a
    signature_delta, as the SDK reads them. Every thinking block is here, signed or not, and every redacted_thinking
    block as one without a signature."""

    @property
    def reasoning_signature(self) -> str | None:
        """The answer's signature, for its last chunk, as the unary answer has it (`reasoning_signature`)."""
        return reasoning_signature(list(self._signatures.values()))

    @property
    def usage(self) -> TokenUsage | None:
        return usage_from(self._usage)

    @property
    def called(self) -> bool:
        """Whether the answer so far calls a tool."""
        return bool(self._tools)

    def unstopped_tool_calls(self) -> tuple[ToolCallDelta, ...]:
        """For the last chunk: the arguments of the tool_use blocks the stream ended before their own stop (and
        before any argument text), which are what they had; once."""
        unargued, self._unargued = self._unargued, {}
        return tuple(ToolCallDelta(self._tools[index], arguments=arguments) for index, arguments in unargued.items())

    def event(self, data: Any) -> StreamDelta | None:
        if not isinstance(data, dict):
            raise MalformedAnswerError(f"expected a JSON object, got {type(data).__name__}")
        kind = data.get("type")
        if kind == "message_start":
            message = _object(data, "message")
            self.id = text_field(message.get("id"), "id")
            self.model = text_field(message.get("model"), "model")
            usage = message.get("usage")
            # Its output count is a placeholder (the API sends 1): only message_delta's says what was written, and a
            # stream whose message_delta says nothing has its usage estimated, not billed as that one token.
            self._add_usage({**usage, "output_tokens": None} if isinstance(usage, dict) else None)
        elif kind == "content_block_start":
            return self._block_start(_index(data), _object(data, "content_block"))
        elif kind == "content_block_delta":
            return self._block_delta(_index(data), _object(data, "delta"))
        elif kind == "content_block_stop":
            index = _index(data)
            if index in self._tools:
                self._stopped.add(index)
                if (arguments := self._unargued.pop(index, None)) is not None:
                    # No argument text came: the call's arguments are its start's input, or none.
                    return StreamDelta(tool_calls=(ToolCallDelta(self._tools[index], arguments=arguments),))
        elif kind == "message_delta":
            delta = _object(data, "delta")
            if delta.get("stop_reason") is not None:
                self.finish_reason = finish_reason(delta["stop_reason"])
            # Its counts are cumulative: its output count replaces message_start's placeholder, and its prompt counts
            # never lower message_start's (`_add_usage`).
            self._add_usage(data.get("usage"))
        elif kind == "message_stop":
            self.stopped = True
        # ping, and event types added later (the API says to expect new ones): nothing for the answer.
        return None

    def _block_start(self, index: int, block: Mapping[str, Any]) -> StreamDelta | None:
        kind = block.get("type")
        if kind == "tool_use":
            if index in self._tools:
                # Another call in the same block would have its arguments appended to the first one's.
                raise MalformedAnswerError(f"tool_use block {index} started twice")
            if len(self._tools) >= MAX_TOOL_CALLS:
                raise MalformedAnswerError(f"more than {MAX_TOOL_CALLS} tool calls")
            position = self._tools[index] = len(self._tools)
            call_id = own_call_id(tool_call_id(block.get("id"), "tool_use.id"), self._call_ids)
            name = tool_name(block.get("name"), "tool_use.name")
            start_input = _tool_input(block)
            self._unargued[index] = arguments_json(start_input) if start_input else "{}"
            return StreamDelta(tool_calls=(ToolCallDelta(position, id=call_id, name=name, arguments=""),))
        if kind in ("server_tool_use", "mcp_tool_use"):
            self._server_tools.add(index)
            return None
        if kind == "text":
            return StreamDelta(content=text_field(block.get("text"), "text") or None)
        if kind == "thinking":
            self._signatures[index] = text_field(block.get("signature"), "signature")
            return StreamDelta(reasoning=text_field(block.get("thinking"), "thinking") or None)
        if kind == "redacted_thinking":
            self._signatures[index] = ""  # as the unary answer counts it: a thinking block that cannot go back
        return None

    def _block_delta(self, index: int, delta: Mapping[str, Any]) -> StreamDelta | None:
        kind = delta.get("type")
        if kind == "text_delta":
            return StreamDelta(content=text_field(delta.get("text"), "text") or None)
        if kind == "thinking_delta":
            return StreamDelta(reasoning=text_field(delta.get("thinking"), "thinking") or None)
        if kind == "input_json_delta":
            if index in self._server_tools:
                return None
            if index not in self._tools or index in self._stopped:
                raise MalformedAnswerError("an input_json_delta for a block that is not an open tool_use")
            partial = text_field(delta.get("partial_json"), "partial_json")
            if not partial:
                return None
            # The streamed input replaces the start's, as the SDK reads it.
            self._unargued.pop(index, None)
            return StreamDelta(tool_calls=(ToolCallDelta(self._tools[index], arguments=partial),))
        if kind == "signature_delta":
            # Sent with the last chunk, once it is known whether the answer had one thinking block (or several). It
            # signs a thinking block, as the SDK reads it: on another block it is nothing.
            signature = text_field(delta.get("signature"), "signature")
            if index in self._signatures:
                self._signatures[index] = signature
        # citations_delta: nothing the contract carries.
        return None

    def _add_usage(self, usage: Any) -> None:
        """Adds an event's usage to what the stream reported so far. Anthropic's counts are cumulative, so a prompt
        count is the larger of the two where both are counts: a compatible server (SGLang) writes input_tokens 0 (and
        cache counts of 0) in message_delta, after message_start's real ones, which would bill the prompt as 0."""
        if not isinstance(usage, dict):
            return
        for key, value in usage.items():
            if value is None:
                continue
            earlier = self._usage.get(key)
            if key in _PROMPT_COUNTS and is_count(earlier) and is_count(value):
                value = max(earlier, value)
            self._usage[key] = value
        self.prompt_usage = prompt_usage_from(self._usage)


_PROMPT_COUNTS: Final = frozenset({"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"})
"""The usage's prompt counts, which a stream's later events may repeat but never lower."""


def _object(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise MalformedAnswerError(f"a {data.get('type')} event has no `{key}` object")
    return value


def _index(data: Mapping[str, Any]) -> int:
    index = data.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**31:
        raise MalformedAnswerError(f"a {data.get('type')} event has no valid `index`")
    return index
