"""A loopback OpenAI-compatible server with fault switches, for tests and benchmarks.

It speaks real HTTP/1.1 on a real socket, so the gateway's `openai` client is exercised as in production. Answers
are deterministic: the content is "echo: " + the last user message, streamed as one chunk per word; an embedding
(POST /v1/embeddings, for `embedding_models`) is `embedding_vector(text, dimensions)`, in base64 or as numbers as
`encoding_format` asks.

Faults are queued; each chat or embeddings request takes the next one. A fault is a dict:
    {"status": 503, "retry_after": 2, "body": "..."}  an HTTP error (JSON error body unless "body" is given; its
                                                       "content_type" application/json unless given)
    {"status": 302, "location": "https://..."}         ... with a Location header (a redirect)
    {"stall_s": 5}                                     wait before answering (notices a client that leaves)
    {"drop": true}                                     close the connection without answering
    {"body": "<html>", "content_type": "text/html"}    a 200 with this raw body
    {"body": "data: ...\n\n", "content_type": "text/event-stream", "event_gap_s": 0.05}
                                                       ... its events sent one at a time, this far apart
    {"body": "{...}", "byte_trickle_s": 0.1}           a 200 JSON body sent a byte per byte_trickle_s seconds
    {"stream_cut_after": 2}                            a stream that ends after N chunks, without [DONE]
    {"stream_garbage": true}                           a stream with a line that is not JSON
    {"trickle_s": 1.0}                                 a stream that sends one delta per trickle_s seconds (its
                                                       end at once after the last)
    {"byte_trickle_s": 0.5}                            a stream that sends one byte per byte_trickle_s seconds
    {"huge_content": 5_000_000}                        an answer whose content has this many characters
    {"no_usage": true}                                 leave usage out (like older Ollama streams)
    {"usage": {"prompt_tokens": 5, ...}}               report this usage, whatever the answer's own counts
    {"reasoning": "thinking..."}                       add reasoning text (as Ollama's `reasoning` field)
    {"refusal": "I'm sorry, ..."}                      the model refuses: this `refusal` in place of any content
    {"refusal": "...", "said_first": true}             ... after its content (as no OpenAI model does, but may)
    {"served_model": "name"}                           the answer names this model, not the one asked
    {"tool_call": {"name": "f", "arguments": "{}"}}    answer with a tool call (id call_N_1, as below)
    {"tool_calls": [{"name": "f", ...}, ...]}          answer with several tool calls (ids call_N_1, call_N_2, ...
                                                       for a request of N messages: unique within a conversation)
    {"echo_tools": true}                               answer "tools: " + the tool results since the last user
                                                       message, each as "name=content", joined by "; "
    {"two_choices": true}                              also answer a second choice (index 1), as n=2 would
    {"no_choices": true}                               a stream whose events carry no `choices`
    {"error_event_after": 2}                           a stream that sends an in-band error event after N chunks
    {"error_event_after": 0, "error_code": "..."}      ... whose error has this code
    {"no_done": true}                                  a stream that ends after its finish reason, without [DONE]
    {"cut_before_done": true}                          likewise, but the connection closes mid-body (no last chunk)
    {"hold_open_s": 30}                                likewise, but the connection is held open that long, the
                                                       body unended (noticing a client that leaves)
    {"hold_open_s": 30, "ping_s": 0.3}                 ... an SSE comment (": ping") sent every ping_s meanwhile
    {"done_after_s": 0.1}                              a stream's [DONE] and end of body this long after the rest
    {"no_finish": true}                                a stream with no finish reason (then [DONE])
    {"one_delta": true}                                the whole content in one stream delta
    {"ignore_stream": true}                            answer a stream request whole, as JSON (as servers that
                                                       cannot stream do)
    {"line_end": "\\r\\n"}                             a stream whose lines end with CRLF (or "\\r": CR) for LF
    {"out_of_order": true}                             embeddings listed last input first (each with its index)
    {"ignore_dimensions": true}                        embeddings of EMBEDDING_DIMENSIONS whatever `dimensions` asks
                                                       (as servers that cannot shorten vectors answer: llama.cpp's)
    {"raw": "HTTP/1.1 abc\\r\\n\\r\\n"}                these bytes (latin-1) as the whole answer, then close
    {"close_after": true}                              answer (whole or streamed), then close the connection at
                                                       once without saying so (no Connection: close), as a server
                                                       that keeps connections for one request does

With `ollama=True` it refuses a reasoning_effort Ollama's /v1 does not take (400, in its words), and serves Ollama's
native GET /api/version and GET /api/tags. With `vllm=True` it also serves vLLM's POST /tokenize (chat form), counting
the prompt as its usage does; with `llamacpp=True`, llama.cpp's POST /apply-template (a prompt of as many words as its
usage counts tokens) and POST /tokenize (a token per word of `content`, and per token id where it is a list). With
`gemini=True` it signs the first tool call of each answer as Gemini 3's OpenAI-compatible API does (a thought signature
in `extra_content.google.thought_signature`; a stream sends each call whole, without an index, as Gemini's does), and
refuses, as Gemini 3 does (400, its list-shaped error body), a chat whose current turn (since the last user message)
holds a call it signed without that signature.

Run standalone: python tests/upstream.py --listen 127.0.0.1:PORT [--model NAME ...] [--ollama]
(embedding model: embed-test)
Control API (standalone use, e.g. from Go or Node tests):
    POST /_control/faults (JSON list) appends faults; DELETE /_control/faults clears them;
    GET /_control/requests lists the chat request bodies received.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import random
import ssl
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Fault = dict[str, Any]
EMBEDDING_DIMENSIONS = 1536
"""The fake's vectors when a request asks for no `dimensions` (as many as text-embedding-3-small's)."""
_PROBES = {("GET", "/v1/models"), ("GET", "/api/version"), ("GET", "/api/tags")}
_MODELS_REFUSED = "You have insufficient permissions for this operation. Missing scopes: api.model.read."
"""What OpenAI answers a restricted key without the models scope (with a 403)."""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class FakeUpstream:
    dialect: ClassVar[str] = "openai"
    """The API it speaks, and the llm section (and so the backend's name) that support.two_backends configures."""
    models: Sequence[str] = ("tiny",)
    embedding_models: Sequence[str] = ("embed-test",)
    ollama: bool = False
    vllm: bool = False
    llamacpp: bool = False
    gemini: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    chat_requests: list[dict[str, Any]] = field(default_factory=list)
    chat_bodies: list[bytes] = field(default_factory=list)
    """The chat requests' bodies as they came, byte for byte, in the order of chat_requests."""
    chat_headers: list[dict[str, str]] = field(default_factory=list)
    """The chat requests' headers (names in lower case), in the order of chat_requests."""
    chat_times: list[float] = field(default_factory=list)
    """Monotonic times at which the chat requests arrived."""
    tokenize_requests: list[dict[str, Any]] = field(default_factory=list)
    tokenize_count: Any = None
    """What /tokenize answers as the count, when set (a server's bad figure; bytes: its JSON text); else the prompt's
    tokens."""
    tokenize_stall_s: float = 0.0
    """How long /tokenize (vLLM's) waits before it answers, as a server busy generating would."""
    llamacpp_answers: dict[str, Any] = field(default_factory=dict)
    """What llama.cpp's endpoints answer instead, by path ("/apply-template", "/tokenize"), when set: any JSON, or the
    bytes of its text."""
    embedding_requests: list[dict[str, Any]] = field(default_factory=list)
    client_disconnects: list[float] = field(default_factory=list)
    """Monotonic times at which a client left while a stalled answer was pending."""
    probe_requests: list[str] = field(default_factory=list)
    """The paths of the health probes received: /v1/models, and Ollama's /api/version and /api/tags."""
    probe_delay_s: float = 0.0
    """How long each probe waits before it is answered, as a slow upstream's would."""
    models_answer: Any = None
    """What GET /v1/models answers instead of the models list, when set (any JSON; bytes: as they are); with
    `models_status`, the JSON of its error."""
    models_status: int = 200
    """When not 200, GET /v1/models answers an error of this status (403: a key that may not list models)."""
    models_trickle_s: float = 0.0
    """When set, GET /v1/models answers one byte of its body per this many seconds (a stuck proxy's answer)."""
    moved_to: str | None = None
    """When set, the health probes and the tokenizers' endpoints answer 307 with this Location, as a server that moved
    does (its chats and embeddings are answered as ever)."""
    tls: ssl.SSLContext | None = None
    """Serves HTTPS with this context (its certificate and key loaded) when set, as a hosted API does."""
    connections_opened: int = 0
    """How many connections clients have opened to it (reused ones count once)."""
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/v1"

    async def start(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.faults.clear()
        self.chat_requests.clear()
        self.chat_bodies.clear()
        self.chat_headers.clear()
        self.chat_times.clear()
        self.tokenize_requests.clear()
        self.llamacpp_answers.clear()
        self.embedding_requests.clear()
        self.client_disconnects.clear()
        self.probe_requests.clear()
        self.probe_delay_s = 0.0
        self.models_answer = None
        self.models_status = 200
        self.models_trickle_s = 0.0
        self.moved_to = None

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_opened += 1
        try:
            while (request := await _read_request(reader)) is not None:
                if not await self._dispatch(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels handlers; asyncio's stream machinery logs a cancelled handler as an error, so end quietly.
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answers one request; False closes the connection."""
        route = (request.method, request.path.split("?")[0])
        if route in _PROBES:
            self.probe_requests.append(route[1])
            if self.probe_delay_s:
                await asyncio.sleep(self.probe_delay_s)
        if self.moved_to is not None and (route in _PROBES or route[1] in ("/tokenize", "/apply-template")):
            return await _send(writer, 307, b"", "text/plain", {"Location": self.moved_to})
        if route == ("POST", "/v1/chat/completions"):
            return await self._chat(request, reader, writer)
        if route == ("POST", "/v1/embeddings"):
            return await self._embeddings(request, reader, writer)
        if route == ("GET", "/v1/models"):
            if self.models_status != 200:
                refused = {"message": _MODELS_REFUSED, "type": "invalid_request_error", "code": None}
                error = {"error": refused} if self.models_answer is None else self.models_answer
                return await _send_json(writer, self.models_status, error)
            if isinstance(self.models_answer, bytes):
                return await _send(writer, 200, self.models_answer, "application/json")
            if self.models_answer is not None:
                return await _send_json(writer, 200, self.models_answer)
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
            if self.models_trickle_s:
                return await _trickle(
                    writer, json.dumps({"object": "list", "data": data}).encode(), self.models_trickle_s
                )
            return await _send_json(writer, 200, {"object": "list", "data": data})
        if self.ollama and route == ("GET", "/api/version"):
            return await _send_json(writer, 200, {"version": "0.0.0-fake"})
        if self.ollama and route == ("GET", "/api/tags"):
            return await _send_json(writer, 200, {"models": [{"name": m, "model": m} for m in self.models]})
        if self.vllm and route == ("POST", "/tokenize"):
            return await self._tokenize(request, writer)
        if self.llamacpp and route in (("POST", "/apply-template"), ("POST", "/tokenize")):
            return await self._llamacpp(request, writer)
        if route == ("POST", "/_control/faults"):
            self.inject(*request.json())
            return await _send_json(writer, 200, {"queued": len(self.faults)})
        if route == ("DELETE", "/_control/faults"):
            self.faults.clear()
            return await _send_json(writer, 200, {"queued": 0})
        if route == ("GET", "/_control/requests"):
            return await _send_json(writer, 200, self.chat_requests)
        return await _send_json(writer, 404, {"error": {"message": f"no route {request.path}", "type": "not_found"}})

    async def _chat(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.chat_requests.append(body)
        self.chat_bodies.append(request.body)
        self.chat_headers.append(request.headers)
        self.chat_times.append(time.monotonic())
        effort = body.get("reasoning_effort")
        if self.ollama and effort is not None and effort not in ("high", "medium", "low", "none"):
            message = f'invalid reasoning value: \'{effort}\' (must be "high", "medium", "low", or "none")'
            return await _send_json(writer, 400, {"error": {"message": message, "type": "invalid_request_error"}})
        if self.ollama and not _json_arguments(body):
            refusal = {"error": {"message": "invalid tool call arguments", "type": "invalid_request_error"}}
            return await _send_json(writer, 400, refusal)
        if self.gemini and (unsigned := _unsigned_call(body)) is not None:
            message = (
                f"Function call `{unsigned}` is missing a thought_signature in functionCall parts. This is required"
                " for tools to work correctly."
            )
            return await _send_json(
                writer, 400, [{"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}]
            )
        fault = self.faults.popleft() if self.faults else {}
        if (faulted := await self._fault(fault, reader, writer)) is not None:
            return faulted
        model = body.get("model", self.models[0])
        if model not in self.models:
            error = {"error": {"message": f"model '{model}' not found", "type": "not_found_error", "code": None}}
            return await _send_json(writer, 404, error)
        answer = _answer(body, fault, signed=self.gemini)
        if body.get("stream") and not fault.get("ignore_stream"):
            kept = await self._stream(reader, writer, answer, body, fault)
        else:
            kept = await _send_json(writer, 200, answer.completion())
        return kept and not fault.get("close_after")

    async def _fault(self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool | None:
        """Answers as a fault of any request says (after a stall, if it has one): what _dispatch returns, or None when
        the request is still to be answered."""
        if "stall_s" in fault and not await self._stall(fault["stall_s"], reader):
            return False
        if fault.get("drop"):
            return False
        if "raw" in fault:
            writer.write(fault["raw"].encode("latin-1"))
            await writer.drain()
            return False
        if "status" in fault:
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            if "location" in fault:
                headers["Location"] = fault["location"]
            error = {"error": {"message": f"fake upstream fault {fault['status']}", "type": "fault", "code": None}}
            if "body" in fault:
                content_type = fault.get("content_type", "application/json")
                return await _send(writer, fault["status"], fault["body"].encode(), content_type, headers)
            return await _send_json(writer, fault["status"], error, headers)
        if "body" in fault and "event_gap_s" in fault:  # the body's events one at a time, as a stream sends them
            body = fault["body"].encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {fault['content_type']}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode())
            *events, rest = body.split(b"\n\n")
            for event in events:
                writer.write(event + b"\n\n")
                await writer.drain()
                await asyncio.sleep(fault["event_gap_s"])
            writer.write(rest)
            await writer.drain()
            return True
        if "body" in fault and "byte_trickle_s" in fault:
            return await _trickle(writer, fault["body"].encode(), fault["byte_trickle_s"])
        if "body" in fault:
            return await _send(writer, 200, fault["body"].encode(), fault.get("content_type", "application/json"))
        return None

    async def _embeddings(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.embedding_requests.append(body)
        fault = self.faults.popleft() if self.faults else {}
        if (faulted := await self._fault(fault, reader, writer)) is not None:
            return faulted
        model = body.get("model")
        if model not in self.embedding_models:
            error = {"error": {"message": f"model '{model}' not found", "type": "not_found_error", "code": None}}
            return await _send_json(writer, 404, error)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        dimensions = (
            EMBEDDING_DIMENSIONS if fault.get("ignore_dimensions") else body.get("dimensions", EMBEDDING_DIMENSIONS)
        )
        data = []
        for index, text in enumerate(inputs):
            vector = embedding_vector(text, dimensions)
            if body.get("encoding_format") == "base64":
                embedding: Any = base64.b64encode(vector).decode()
            else:
                embedding = list(struct.unpack(f"<{dimensions}f", vector))
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        if fault.get("out_of_order"):
            data.reverse()
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not fault.get("no_usage"):
            tokens = sum(len(text.split()) for text in inputs)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return await _send_json(writer, 200, answer)

    async def _tokenize(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.tokenize_requests.append(body)
        await asyncio.sleep(self.tokenize_stall_s)
        if body.get("model") not in self.models or not isinstance(body.get("messages"), list):
            error = {"error": {"message": "model and messages are required", "type": "BadRequestError", "code": 400}}
            return await _send_json(writer, 400, error)
        if isinstance(self.tokenize_count, bytes):  # JSON text no encoder would write
            return await _send(writer, 200, b'{"count": ' + self.tokenize_count + b"}", "application/json")
        if self.tokenize_count is not None:
            return await _send_json(writer, 200, {"count": self.tokenize_count, "max_model_len": 8192, "tokens": []})
        count = _prompt_tokens(body)
        return await _send_json(writer, 200, {"count": count, "max_model_len": 8192, "tokens": list(range(count))})

    async def _llamacpp(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        body = request.json()
        self.tokenize_requests.append(body)
        path = request.path.split("?")[0]
        if path in self.llamacpp_answers:
            if isinstance(answer := self.llamacpp_answers[path], bytes):  # JSON text no encoder would write
                return await _send(writer, 200, answer, "application/json")
            return await _send_json(writer, 200, answer)
        if path == "/apply-template":
            return await _send_json(writer, 200, {"prompt": " ".join(["word"] * _prompt_tokens(body))})
        # As llama.cpp's: a text, or a list of texts and token ids (mixed); anything else is its 500.
        content = body.get("content")
        pieces = content if isinstance(content, list) else [content]
        if not all(isinstance(piece, str | int) for piece in pieces):
            return await _send_json(writer, 500, {"error": {"code": 500, "message": "type must be string"}})
        tokens = sum(len(piece.split()) if isinstance(piece, str) else 1 for piece in pieces)
        return await _send_json(writer, 200, {"tokens": list(range(tokens))})

    async def _stall(self, seconds: float, reader: asyncio.StreamReader) -> bool:
        """Waits, but notices at once when the client closes the connection; False when it did."""
        try:
            data = await asyncio.wait_for(reader.read(1), timeout=seconds)
        except TimeoutError:
            return True
        if not data:
            self.client_disconnects.append(time.monotonic())
            return False
        return True

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer: _Answer,
        body: dict[str, Any],
        fault: Fault,
    ) -> bool:
        """Server-sent events in chunked transfer encoding, the connection kept alive as real servers do;
        False (close the connection) when the fault cuts the stream."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunks = answer.chunks(include_usage=bool((body.get("stream_options") or {}).get("include_usage")), fault=fault)
        cut_after = fault.get("stream_cut_after")
        end = str(fault.get("line_end", "\n")).encode()

        def event(data: bytes) -> bytes:
            return b"data: " + data + end + end

        for index, chunk in enumerate(chunks):
            if cut_after is not None and index >= cut_after:
                await writer.drain()
                return False
            if index == fault.get("error_event_after"):
                error = {"error": {"object": "error", "message": "generation failed", "type": "InternalServerError"}}
                if "error_code" in fault:
                    error["error"]["code"] = fault["error_code"]
                await _send_chunk(writer, event(json.dumps(error).encode()))
                break
            if fault.get("stream_garbage") and index == 1:
                await _send_chunk(writer, event(b"{not json at all"))
            written = event(json.dumps(chunk).encode())
            pieces = [written[i : i + 1] for i in range(len(written))] if "byte_trickle_s" in fault else [written]
            for piece in pieces:
                await _send_chunk(writer, piece)
                if "byte_trickle_s" in fault:
                    await asyncio.sleep(fault["byte_trickle_s"])
            # The role-only first chunk goes out at once, so a trickle starts after real content has been sent; the end
            # (the finish reason, the usage, [DONE]) follows the last delta at once, as servers send it.
            if "trickle_s" in fault and index > 0 and (chunk.get("choices") or [{}])[0].get("delta"):
                await asyncio.sleep(fault["trickle_s"])
        if fault.get("cut_before_done"):
            await writer.drain()
            return False
        if "hold_open_s" in fault:
            await writer.drain()
            held_until = time.monotonic() + fault["hold_open_s"]
            while (left := held_until - time.monotonic()) > 0:
                if not await self._stall(min(left, fault.get("ping_s", left)), reader):
                    break
                if "ping_s" in fault:
                    await _send_chunk(writer, b": ping\n\n")
            return False
        if "done_after_s" in fault:
            await writer.drain()
            await asyncio.sleep(fault["done_after_s"])
        if not fault.get("no_done"):
            await _send_chunk(writer, event(b"[DONE]"))
        await _send_chunk(writer, b"")  # the last chunk: the response is complete, the connection stays
        return True


@dataclass
class _Answer:
    id: str
    model: str
    content: str
    reasoning: str | None
    tool_calls: list[dict[str, str]]
    prompt_tokens: int
    usage: bool
    two_choices: bool = False
    reported_usage: dict[str, Any] | None = None
    """What the answer reports as its usage instead of its own counts, when set."""
    refusal: str | None = None
    """The model's refusal, in place of its content (as OpenAI's structured outputs answer), when set."""
    said_first: bool = False
    """Whether the refusal comes after the content rather than in its place."""
    signed: bool = False
    """Whether the first tool call carries a thought signature (`thought_signature`), as Gemini 3's do."""

    @property
    def completion_tokens(self) -> int:
        said = self.content if self.refusal is None or self.said_first else ""
        return len(f"{said} {self.refusal or ''}".split()) + len((self.reasoning or "").split())

    def tool_call_id(self, index: int) -> str:
        # Unique within a conversation, as a real API's are: the answer's id tells the turns apart.
        return f"call_{self.id.rsplit('-', 1)[1]}_{index + 1}"

    def usage_dict(self) -> dict[str, Any]:
        if self.reported_usage is not None:
            return self.reported_usage
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.refusal is not None:
            message.update(content=self.content if self.said_first else None, refusal=self.refusal)
        if self.reasoning is not None:
            message["reasoning"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [self._whole_call(i) for i in range(len(self.tool_calls))]
        result: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish_reason()}],
        }
        if self.two_choices:
            other = {"index": 1, "message": {"role": "assistant", "content": "other"}, "finish_reason": "stop"}
            result["choices"].insert(0, other)
        if self.usage:
            result["usage"] = self.usage_dict()
        return result

    def chunks(self, include_usage: bool, fault: Fault) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if self.reasoning is not None:
            deltas += [{"reasoning": piece} for piece in _pieces(self.reasoning)]
        if self.refusal is not None:
            deltas = [{"role": "assistant", "content": None, "refusal": ""}]
            deltas += [{"content": piece} for piece in _pieces(self.content)] if self.said_first else []
            deltas += [{"refusal": piece} for piece in _pieces(self.refusal)]
        else:
            deltas += [
                {"content": piece} for piece in ([self.content] if fault.get("one_delta") else _pieces(self.content))
            ]
        for i, call in enumerate(self.tool_calls):
            if self.signed:
                deltas.append({"tool_calls": [self._whole_call(i)]})
                continue
            name, arguments = call["name"], call["arguments"]
            head = {
                "index": i,
                "id": self.tool_call_id(i),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            deltas += [{"tool_calls": [{"index": i, "function": {"arguments": p}}]} for p in _halves(arguments)]
        chunks = [self._chunk(delta, None) for delta in deltas]
        if not fault.get("no_finish"):
            chunks.append(self._chunk({}, self._finish_reason()))
        if self.two_choices:
            chunks[1:1] = [{**self._chunk({}, None), "choices": [{"index": 1, "delta": {"content": "other "}}]}] * 2
        if fault.get("no_choices"):
            chunks = [{key: value for key, value in chunk.items() if key != "choices"} for chunk in chunks]
        if include_usage and self.usage:
            chunks.append({**self._chunk({}, None), "choices": [], "usage": self.usage_dict()})
        return chunks

    def _whole_call(self, index: int) -> dict[str, Any]:
        call_id = self.tool_call_id(index)
        call: dict[str, Any] = {"id": call_id, "type": "function", "function": self.tool_calls[index]}
        if self.signed and index == 0:
            call["extra_content"] = {"google": {"thought_signature": thought_signature(call_id)}}
        return call

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [choice],
        }

    def _finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


def embedding_vector(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> bytes:
    """The fake's vector for a text: `dimensions` little-endian 32-bit floats in [-1, 1), drawn from a generator seeded
    by the text (the same in every process)."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    return struct.pack(f"<{dimensions}f", *(rng.uniform(-1.0, 1.0) for _ in range(dimensions)))


def _huge(size: int) -> str:
    """`size` characters in words of 10,000, so that a stream sends them in pieces as a real server would."""
    word = "x" * 9_999
    text = " ".join([word] * (size // 10_000 + 1))
    return text[:size]


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]


def thought_signature(call_id: str) -> str:
    """The signature `gemini=True` gives the call of this id: opaque to the gateway, checkable here."""
    return base64.b64encode(hashlib.sha256(f"signed {call_id}".encode()).digest()).decode()


def _unsigned_call(body: dict[str, Any]) -> str | None:
    """The name of a call of the chat's current turn that `gemini=True` signed (each answer's first, its id ending
    in _1) and that came back without that signature; None when there is none."""
    messages = body.get("messages") or []
    start = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1) + 1
    for message in messages[start:]:
        for call in (message.get("tool_calls") or ())[:1]:
            signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
            if call["id"].endswith("_1") and signature != thought_signature(call["id"]):
                return str(call["function"]["name"])
    return None


def _answer(body: dict[str, Any], fault: Fault, *, signed: bool = False) -> _Answer:
    messages = body.get("messages") or []
    last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if "huge_content" in fault:
        content = _huge(fault["huge_content"])
    elif fault.get("echo_tools"):
        content = "tools: " + "; ".join(_tool_results(messages))
    else:
        content = f"echo: {last_user}"
    return _Answer(
        id=f"chatcmpl-fake-{len(messages)}",
        model=fault.get("served_model", body.get("model", "")),
        content=content,
        reasoning=fault.get("reasoning"),
        tool_calls=[fault["tool_call"]] if "tool_call" in fault else list(fault.get("tool_calls", ())),
        prompt_tokens=_prompt_tokens(body),
        usage=not fault.get("no_usage"),
        two_choices=bool(fault.get("two_choices")),
        reported_usage=fault.get("usage"),
        refusal=fault.get("refusal"),
        said_first=bool(fault.get("said_first")),
        signed=signed,
    )


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The tool results after the last user message, as "name=content", the name found by the call id."""
    start = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1) + 1
    names = {call["id"]: call["function"]["name"] for m in messages[start:] for call in m.get("tool_calls") or ()}
    return [
        f"{names.get(m.get('tool_call_id'), '?')}={_text(m.get('content'))}"
        for m in messages[start:]
        if m.get("role") == "tool"
    ]


def _text(content: Any) -> str:
    """A message's text: its content, or the text of its content parts (images say nothing)."""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A stand-in tokenizer: a token per word of content and of the tools' JSON, three per message."""
    messages = body.get("messages") or []
    words = sum(len(_text(m.get("content")).split()) for m in messages)
    tools = body.get("tools")
    return words + 3 * len(messages) + (len(json.dumps(tools).split()) if tools else 0)


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


def _json_arguments(body: dict[str, Any]) -> bool:
    """Whether every tool call in the chat has arguments that are a JSON object's text, as Ollama's /v1 wants (it
    reads them into an object, and refuses the chat otherwise)."""
    calls = (call for message in body.get("messages", ()) for call in message.get("tool_calls") or ())
    for call in calls:
        try:
            if not isinstance(json.loads(call.get("function", {}).get("arguments", "")), dict):
                return False
        except ValueError:
            return False
    return True


async def _send_json(
    writer: asyncio.StreamWriter, status: int, payload: Any, headers: dict[str, str] | None = None
) -> bool:
    return await _send(writer, status, json.dumps(payload).encode(), "application/json", headers)


async def _send(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> bool:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    return True


async def _trickle(writer: asyncio.StreamWriter, body: bytes, interval_s: float) -> bool:
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for byte in body:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(interval_s)
    return True


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _serve(host: str, port: int, models: Sequence[str], ollama: bool) -> None:
    upstream = await FakeUpstream(models=models, ollama=ollama, host=host, port=port).start()
    print(f"upstream listening on http://{host}:{upstream.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A loopback OpenAI-compatible server with fault switches.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--model", action="append", help="a model to serve (repeatable; default: tiny)")
    parser.add_argument("--ollama", action="store_true", help="also serve Ollama's /api/version and /api/tags")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host, int(port), args.model or ["tiny"], args.ollama))


if __name__ == "__main__":
    main()
