"""A loopback server that speaks Anthropic's Messages API as documented, with FakeUpstream's fault switches.

It is a FakeUpstream (the same sockets, recording and fault queue) that answers POST /v1/messages (JSON, or SSE events
with `"stream": true`), POST /v1/messages/count_tokens and GET /v1/models. Every request body must validate against
the anthropic SDK's own request types, strictly and with no field they lack: one that does not gets the 400
invalid_request_error the API would send, and its error is kept in `invalid_requests`; a request without the version
and auth headers gets a 401. The answers it sends validate against the SDK's response types.

Answers are deterministic: the text is "echo: " + the last user turn's last text block, streamed one text_delta per
word. Faults (as FakeUpstream's, in this API's shape):
    {"status": 529, "retry_after": 2}           an HTTP error whose body has the error type of its status
    {"status": 429, "error_code": "..."}        ... with error.details.error_code
    {"status": 400, "message": "..."}           ... with this message
    {"status": 400, "body": "..."}              an HTTP error with this body as it is
    {"stall_s": 5}, {"drop": true}, {"body": "<html>", "content_type": "..."}   as FakeUpstream's
    {"stream_cut_after": 3}                     a stream that ends after N events, without message_stop
    {"stream_garbage": true}                    a stream with a data line that is not JSON (after message_start)
    {"trickle_s": 1.0}                          a stream that waits this long after each content_block_delta
    {"byte_trickle_s": 0.5}                     a stream that sends one byte per byte_trickle_s seconds
    {"huge_content": 5_000_000}, {"one_delta": true}
    {"reasoning": "thinking..."}                a thinking block first, signed with {"signature": ...} or "sig-1"
    {"tool_call": {"name": "f", "arguments": "{...}"}}  a tool_use block (arguments: a JSON object's text)
    {"tool_call": {...}, "input_at_start": true}       ... streamed whole in its content_block_start, not as deltas
    {"error_event_after": 3, "error_type": "overloaded_error"}  an error event after N events (default type:
                                                overloaded_error)
    {"no_finish": true}                         a stream without a stop reason: no message_delta nor message_stop
    {"no_stop": true}                           a stream that ends after message_delta, without message_stop
    {"hold_open_s": 30}                         likewise, but the connection is held open that long, the body
                                                unended (noticing a client that leaves)
    {"stop_reason": "refusal"}                  this stop reason instead of end_turn / tool_use
    {"cache": {"creation": 5, "read": 7}}       usage with these cache counts beside input_tokens
`count_faults` holds faults for /v1/messages/count_tokens (a status, with its error's "message" when given, or any
of FakeUpstream's: {"stall_s": 5}, {"body": ...}). Models in
`adaptive_models` are listed with capabilities that take adaptive thinking and no budget_tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
from anthropic.types import Message, MessageCountTokensParams, MessageTokensCount, ModelInfo, RawMessageStreamEvent
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming
from upstream import FakeUpstream, Fault, Request, _halves, _huge, _pieces, _send, _send_chunk, _send_json

# The HTTP statuses' error types, as the API's errors page lists them.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass
class FakeAnthropic(FakeUpstream):
    dialect: ClassVar[str] = "anthropic"
    models: Sequence[str] = ("claude-test",)
    adaptive_models: Sequence[str] = ()
    """Models listed as taking adaptive thinking and refusing budget_tokens (as newer Claude models do)."""
    count_requests: list[dict[str, Any]] = field(default_factory=list)
    count_faults: deque[Fault] = field(default_factory=deque)
    invalid_requests: list[str] = field(default_factory=list)
    """The validation errors of the requests that did not validate against the SDK's types."""
    models_without_end: bool = False
    """Every page of the models list says it has more after it, whatever cursor it is asked for (a compatible
    server that ignores after_id): its pages repeat for ever."""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeAnthropic:
        # The SDK's request types take a second to compile: done here, not within some test's short deadline.
        for params in (MessageCreateParamsStreaming, MessageCreateParamsNonStreaming, MessageCountTokensParams):
            _request_adapter(params)
        await super().start()
        return self

    def reset(self) -> None:
        super().reset()
        self.count_requests.clear()
        self.count_faults.clear()
        self.invalid_requests.clear()
        self.models_without_end = False

    async def _dispatch(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        route = (request.method, request.path.split("?")[0])
        if not request.headers.get("anthropic-version"):
            return await _send_error(writer, 400, "anthropic-version: header is required")
        if not request.headers.get("authorization", "").startswith("Bearer ") and not request.headers.get("x-api-key"):
            return await _send_error(writer, 401, "invalid x-api-key")
        if route == ("GET", "/v1/models"):
            self.probe_requests.append(route[1])
            if self.probe_delay_s:
                await asyncio.sleep(self.probe_delay_s)
            return await self._models(writer)
        if route == ("POST", "/v1/messages"):
            return await self._messages(request, reader, writer)
        if route == ("POST", "/v1/messages/count_tokens"):
            return await self._count_tokens(request, reader, writer)
        return await _send_error(writer, 404, f"no route {request.path}")

    async def _models(self, writer: asyncio.StreamWriter) -> bool:
        if self.models_status != 200:
            return await _send_error(writer, self.models_status, "this key may not list models")
        if isinstance(self.models_answer, bytes):
            return await _send(writer, 200, self.models_answer, "application/json")
        data = [_checked(ModelInfo, self._model_info(m)) for m in self.models]
        has_more = self.models_without_end
        page = {"data": data, "has_more": has_more, "first_id": self.models[0], "last_id": self.models[-1]}
        return await _send_json(writer, 200, page)

    def _model_info(self, model: str) -> dict[str, Any]:
        yes, no = {"supported": True}, {"supported": False}
        adaptive = model in self.adaptive_models
        thinking = {
            "adaptive": yes if adaptive else no,
            "between_tools": no,
            "disabled": yes,
            "enabled": no if adaptive else yes,
        }
        efforts = {"low": yes, "medium": yes, "high": yes, "max": no, "supported": adaptive}
        return {
            "id": model,
            "type": "model",
            "display_name": model,
            "created_at": "2026-01-01T00:00:00Z",
            "lifecycle": "active",
            "capabilities": {
                "batch": yes,
                "citations": yes,
                "code_execution": no,
                "context_management": {"supported": False},
                "effort": efforts,
                "image_input": yes,
                "pdf_input": no,
                "server_tools": {"code_execution": no, "web_search": no, "supported": False},
                "structured_outputs": yes,
                "thinking": {"supported": True, "types": thinking},
            },
        }

    async def _messages(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.chat_requests.append(body)
        self.chat_bodies.append(request.body)
        self.chat_headers.append(request.headers)
        self.chat_times.append(time.monotonic())
        streaming = isinstance(body, dict) and body.get("stream") is True
        params = MessageCreateParamsStreaming if streaming else MessageCreateParamsNonStreaming
        if (error := self._invalid(params, body)) is not None:
            return await _send_error(writer, 400, error)
        fault = self.faults.popleft() if self.faults else {}
        if "status" in fault and "body" not in fault:
            headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else {}
            message = fault.get("message", f"fake upstream fault {fault['status']}")
            return await _send_error(writer, fault["status"], message, headers, fault.get("error_code"))
        if (faulted := await self._fault(fault, reader, writer)) is not None:
            return faulted
        if body["model"] not in self.models:
            return await _send_error(writer, 404, f"model: {body['model']}")
        answer = _Answer.of(body, fault)
        if streaming:
            return await self._event_stream(reader, writer, answer, fault)
        return await _send_json(writer, 200, _checked(Message, answer.message()))

    async def _count_tokens(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.count_requests.append(body)
        if (error := self._invalid(MessageCountTokensParams, body)) is not None:
            return await _send_error(writer, 400, error)
        fault = self.count_faults.popleft() if self.count_faults else {}
        if "status" in fault and "body" not in fault:
            said = fault.get("message", f"fake upstream fault {fault['status']}")
            return await _send_error(writer, fault["status"], said)
        if (faulted := await self._fault(fault, reader, writer)) is not None:
            return faulted
        return await _send_json(writer, 200, _checked(MessageTokensCount, {"input_tokens": _prompt_tokens(body)}))

    def _invalid(self, params: Any, body: Any) -> str | None:
        try:
            _drain(_request_adapter(params).validate_python([body]))
        except pydantic.ValidationError as error:
            self.invalid_requests.append(str(error))
            return f"the request does not validate against {params.__name__}: {error}"
        if (broken := _broken_rule(body)) is not None:
            self.invalid_requests.append(broken)
            return broken
        return None

    async def _event_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: _Answer, fault: Fault
    ) -> bool:
        """SSE in chunked transfer encoding, the connection kept alive; False (close it) when the fault cuts it. A
        client that leaves mid-stream is noticed at the next write, and counted in client_disconnects."""
        try:
            return await self._send_events(reader, writer, answer, fault)
        except ConnectionError:
            self.client_disconnects.append(time.monotonic())
            return False

    async def _send_events(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: _Answer, fault: Fault
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        events = answer.events(fault)
        cut_after = fault.get("stream_cut_after")
        for index, event in enumerate(events):
            if cut_after is not None and index >= cut_after:
                await writer.drain()
                return False
            if index == fault.get("error_event_after"):
                error = {
                    "type": "error",
                    "error": {"type": fault.get("error_type", "overloaded_error"), "message": "Overloaded"},
                }
                await _send_chunk(writer, _sse(error))
                break
            if fault.get("stream_garbage") and index == 1:
                await _send_chunk(writer, b"event: content_block_delta\ndata: {not json at all\n\n")
            if event["type"] != "ping":
                _checked(RawMessageStreamEvent, event)
            data = _sse(event)
            pieces = [data[i : i + 1] for i in range(len(data))] if "byte_trickle_s" in fault else [data]
            for piece in pieces:
                await _send_chunk(writer, piece)
                if "byte_trickle_s" in fault:
                    await asyncio.sleep(fault["byte_trickle_s"])
            if "trickle_s" in fault and event["type"] == "content_block_delta":
                await asyncio.sleep(fault["trickle_s"])
        if "hold_open_s" in fault:
            await writer.drain()
            await self._stall(fault["hold_open_s"], reader)
            return False
        await _send_chunk(writer, b"")  # the last chunk: the response is complete, the connection stays
        return True


@dataclass
class _Answer:
    id: str
    model: str
    text: str
    reasoning: str | None
    signature: str
    tool_call: dict[str, str] | None
    stop_reason: str
    usage: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any], fault: Fault) -> _Answer:
        text = _huge(fault["huge_content"]) if "huge_content" in fault else f"echo: {_last_user_text(body)}"
        reasoning, tool_call = fault.get("reasoning"), fault.get("tool_call")
        output = len(text.split()) + len((reasoning or "").split())
        usage: dict[str, Any] = {"input_tokens": _prompt_tokens(body), "output_tokens": output}
        if "cache" in fault:
            usage["cache_creation_input_tokens"] = fault["cache"]["creation"]
            usage["cache_read_input_tokens"] = fault["cache"]["read"]
        if reasoning is not None:
            usage["output_tokens_details"] = {"thinking_tokens": len(reasoning.split())}
        return cls(
            id=f"msg_fake_{len(body['messages'])}",
            model=body["model"],
            text=text,
            reasoning=reasoning,
            signature=fault.get("signature", "sig-1"),
            tool_call=tool_call,
            stop_reason=fault.get("stop_reason", "tool_use" if tool_call is not None else "end_turn"),
            usage=usage,
        )

    def blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.reasoning is not None:
            blocks.append({"type": "thinking", "thinking": self.reasoning, "signature": self.signature})
        blocks.append({"type": "text", "text": self.text})
        if self.tool_call is not None:
            arguments = json.loads(self.tool_call["arguments"])
            blocks.append({"type": "tool_use", "id": "toolu_1", "name": self.tool_call["name"], "input": arguments})
        return blocks

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.blocks(),
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": self.usage,
        }

    def events(self, fault: Fault) -> list[dict[str, Any]]:
        start = {**self.message(), "content": [], "stop_reason": None, "usage": {**self.usage, "output_tokens": 1}}
        events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
        for index, block in enumerate(self.blocks()):
            if block["type"] == "tool_use" and fault.get("input_at_start"):  # as some compatible servers send it
                events += [{"type": "content_block_start", "index": index, "content_block": block}]
            else:
                events += [{"type": "content_block_start", "index": index, "content_block": _empty(block)}]
                events += [{"type": "content_block_delta", "index": index, "delta": d} for d in _deltas(block, fault)]
            events += [{"type": "content_block_stop", "index": index}]
        events.append({"type": "ping"})
        if fault.get("no_finish"):
            return events
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        events.append(
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": self.usage["output_tokens"]}}
        )
        if not (fault.get("no_stop") or "hold_open_s" in fault):
            events.append({"type": "message_stop"})
        return events


def _empty(block: dict[str, Any]) -> dict[str, Any]:
    """A block as content_block_start opens it: its text still to come."""
    if block["type"] == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if block["type"] == "tool_use":
        return {**block, "input": {}}
    return {"type": "text", "text": ""}


def _deltas(block: dict[str, Any], fault: Fault) -> Iterator[dict[str, Any]]:
    if block["type"] == "thinking":
        yield from ({"type": "thinking_delta", "thinking": piece} for piece in _pieces(block["thinking"]))
        yield {"type": "signature_delta", "signature": block["signature"]}
    elif block["type"] == "tool_use":
        text = json.dumps(block["input"])
        yield from ({"type": "input_json_delta", "partial_json": piece} for piece in _halves(text))
    else:
        pieces = [block["text"]] if fault.get("one_delta") else _pieces(block["text"])
        yield from ({"type": "text_delta", "text": piece} for piece in pieces)


def _last_user_text(body: dict[str, Any]) -> str:
    for turn in reversed(body["messages"]):
        if turn["role"] != "user":
            continue
        if isinstance(turn["content"], str):
            return str(turn["content"])
        texts = [block["text"] for block in turn["content"] if block["type"] == "text"]
        return str(texts[-1]) if texts else ""
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A stand-in tokenizer: a token per word of text (system and turns) and of the tools' JSON, three per turn."""

    def words(content: Any) -> int:
        if isinstance(content, str):
            return len(content.split())
        return sum(words(block.get("text") or block.get("content") or "") for block in content)

    system = words(body.get("system") or "")
    turns = body["messages"]
    tools = body.get("tools")
    return (
        system
        + sum(words(t["content"]) for t in turns)
        + 3 * len(turns)
        + (len(json.dumps(tools).split()) if tools else 0)
    )


@functools.cache
def _request_adapter(params: Any) -> pydantic.TypeAdapter[Any]:
    # Strict, and no field the type lacks, at the top level (the SDK's types leave nested ones open). In a list, as
    # TypeAdapter takes no config for a TypedDict itself. Built once: it takes a second.
    return pydantic.TypeAdapter(list[params], config=pydantic.ConfigDict(strict=True, extra="forbid"))


def _drain(value: Any) -> Any:
    """Walks what the adapter returned: its Iterable fields validate only as they are iterated."""
    if isinstance(value, dict):
        return {key: _drain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | Iterator):
        return [_drain(item) for item in value]
    return value


def _broken_rule(body: dict[str, Any]) -> str | None:
    """The API's rules that its types do not say, in its words: text of whitespace alone, in a block or a stop
    sequence, is refused; a tool's input_schema must say "type": "object" (the types also take any dict); no two
    tools may share a name; a tool call's id, in its tool_use block and its tool_result, is letters, digits, "_"
    and "-", no two tool_use blocks of the request share one, and each tool_result answers a tool_use of the turn
    before it; a chat that ends in the assistant's words (a prefill) must not end in whitespace; and with thinking on,
    a chat that ends in tool results must have begun their assistant turn (the one after the last user turn that is
    more than tool results) with a thinking block, as must a prefill."""

    def listed(content: Any) -> list[Any]:  # a string stands for one text block, which the types check
        return content if isinstance(content, list) else []

    blocks = list(listed(body.get("system")))
    for message in body.get("messages", []):
        for block in listed(message.get("content")):
            blocks += [block, *(listed(block.get("content")) if block.get("type") == "tool_result" else [])]
    if any(block.get("type") == "text" and not block["text"].strip() for block in blocks if isinstance(block, dict)):
        return "messages: text content blocks must contain non-whitespace text"
    for block in blocks:
        if isinstance(block, dict) and block.get("type") in ("tool_use", "tool_result"):
            tool_id = block.get("id" if block["type"] == "tool_use" else "tool_use_id")
            if not isinstance(tool_id, str) or not re.fullmatch(r"[a-zA-Z0-9_-]+", tool_id):
                return f"messages: {block['type']} id {tool_id!r}: String should match pattern '^[a-zA-Z0-9_-]+$'"
    used: set[Any] = set()
    called: set[Any] = set()
    """The ids of the tool_use blocks of the turn before the one looked at."""
    for position, message in enumerate(body.get("messages", [])):
        turn = [block for block in listed(message.get("content")) if isinstance(block, dict)]
        for block in turn:
            if block.get("type") == "tool_use":
                if block.get("id") in used:
                    return f"messages.{position}: `tool_use` ids must be unique"
                used.add(block.get("id"))
            elif block.get("type") == "tool_result" and block.get("tool_use_id") not in called:
                return (
                    f"messages.{position}: unexpected `tool_use_id` found in `tool_result` blocks:"
                    f" {block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` block"
                    " in the previous message."
                )
        called = {block.get("id") for block in turn if block.get("type") == "tool_use"}
    if any(not stop.strip() for stop in body.get("stop_sequences") or []):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    final = body["messages"][-1] if body.get("messages") else {}
    if final.get("role") == "assistant":
        content = final.get("content")
        last: Any = listed(content)[-1] if listed(content) else {}
        text = content if isinstance(content, str) else last.get("text") if isinstance(last, dict) else None
        if isinstance(text, str) and text != text.rstrip():
            return "messages: final assistant content cannot end with trailing whitespace"
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        turns = [
            [b.get("type") for b in listed(turn.get("content")) if isinstance(b, dict)] for turn in body["messages"]
        ]
        if turns and body["messages"][-1].get("role") == "assistant" and turns[-1][:1] != ["thinking"]:
            return (
                f"messages.{len(turns) - 1}.content.0.type: Expected `thinking` or `redacted_thinking`. When"
                " `thinking` is enabled, a final `assistant` message must start with a thinking block"
            )
        if turns and turns[-1][:1] == ["tool_result"]:
            opening = len(turns) - 2
            while opening >= 2 and set(turns[opening - 1]) == {"tool_result"}:
                opening -= 2
            if opening >= 0 and turns[opening][:1] not in (["thinking"], ["redacted_thinking"]):
                return (
                    f"messages.{opening}.content.0.type: Expected `thinking` or `redacted_thinking`. When `thinking`"
                    " is enabled, a final `assistant` message must start with a thinking block"
                )
    names = [tool.get("name") for tool in body.get("tools") or [] if isinstance(tool, dict)]
    if len(set(names)) < len(names):
        return "tools: Tool names must be unique."
    for position, tool in enumerate(body.get("tools") or []):
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        if isinstance(schema, dict) and schema.get("type") != "object":
            return f"tools.{position}.custom.input_schema.type: Field required"
    return None


def _checked(model: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload, once it validates as the SDK's response type (the fake must answer as the API documents)."""
    _response_adapter(model).validate_python(payload)
    return payload


@functools.cache
def _response_adapter(model: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(model)


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


async def _send_error(
    writer: asyncio.StreamWriter,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    error_code: str | None = None,
) -> bool:
    error: dict[str, Any] = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return await _send_json(writer, status, {"type": "error", "error": error, "request_id": "req_fake"}, headers)
