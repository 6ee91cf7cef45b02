"""One backend for every OpenAI-compatible upstream: the OpenAI API, Ollama's /v1, llama.cpp, vLLM, ...

Each backend owns one `openai.AsyncOpenAI` over one HTTP connection pool, made at start and closed at shutdown. The
SDK does the HTTP (auth, headers, errors by status); the answers are parsed by `wire`. Every failure leaves this
module as an UpstreamError whose kind tells the router what to do next.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, ClassVar, cast

import httpx2
import openai

from llmrelay_server import metering
from llmrelay_server.backends import wire
from llmrelay_server.backends.upstream_http import (
    HEALTH_TIMEOUT_S,
    Endpoint,
    SDKErrors,
    UpstreamProvider,
    answer_texts,
    error_body,
    error_message,
    kind_of_status,
    model_ids,
    models_list,
    post_read,
    post_stream,
    prepared_headers,
    relayed,
    retry_after_s,
)
from llmrelay_server.domain import (
    UNLIMITED_STREAM,
    BackendHealth,
    BackendSpec,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    FinishReason,
    ImagePart,
    Message,
    ReasoningEffort,
    StreamLimits,
    TokenCount,
    TokenizerUnavailableError,
    TokenUsage,
    Tool,
    ToolCallDelta,
    UpstreamError,
    UpstreamErrorKind,
    without_quotes,
)
from llmrelay_server.tokens import TokenCounter

log = logging.getLogger(__name__)
_CONNECTION_FAILURES = frozenset({UpstreamErrorKind.TIMEOUT, UpstreamErrorKind.UNREACHABLE})


class OpenAICompatibleProvider(UpstreamProvider[openai.APIError]):
    """An LLMProvider over any server that speaks OpenAI's /chat/completions, and an EmbeddingProvider over its
    /embeddings."""

    kind: ClassVar[str] = "openai_compatible"
    _sdk_error = openai.APIError
    # OpenAI's reasoning models refuse max_tokens; most other servers know only max_tokens.
    max_tokens_field: ClassVar[str] = "max_tokens"
    # The reasoning efforts the server names otherwise, or takes none of: the value sent for each.
    reasoning_efforts: ClassVar[Mapping[ReasoningEffort, str]] = {}
    # Whether tool calls go with their signatures (Gemini's thought signatures: Gemini 3 refuses its own calls without
    # them). Servers that have no use for one ignore the field, as JSON APIs do with fields they do not know.
    call_signatures: ClassVar[bool] = True
    # Whether a stream whose answer ends after its events without a finish reason or [DONE] is whole all the same (as
    # the answer of the same call unstreamed is, its finish_reason null): the server's way of ending a generation it
    # stopped, not a cut stream (a connection broken mid-answer fails the read).
    ends_streams_unfinished: ClassVar[bool] = False

    def __init__(self, spec: BackendSpec, *, counter: TokenCounter) -> None:
        super().__init__(spec, openai.DefaultAsyncHttpxClient)
        self._counter = counter
        self._client: openai.AsyncOpenAI = openai.AsyncOpenAI(
            # Local servers take any key; the SDK insists on one.
            api_key=spec.api_key or "unused",
            base_url=spec.base_url,
            max_retries=0,  # the router retries, with the caller's deadline in mind
            http_client=self._http,
        )
        # What the SDK and its HTTP client would parse and merge again for every request, done once: the URL, and
        # the headers (the HTTP client's, then the SDK's user agent, platform and auth) as they would merge them.
        base_url = str(self._client.base_url).rstrip("/")
        self._headers = prepared_headers(self._http.headers, self._client.default_headers, self._client.auth_headers)
        self._completions = Endpoint(self._pool, f"{base_url}/chat/completions", self._headers, _ERRORS)
        self._embeddings = Endpoint(self._pool, f"{base_url}/embeddings", self._headers, _ERRORS)
        # Servers keep their own endpoints (tokenizers, native APIs) beside /v1, at the root.
        self._root_url = spec.base_url.rstrip("/").removesuffix("/v1")

    def _request_body(self, model: str, request: CompletionRequest) -> dict[str, Any]:
        return wire.request_body(
            model,
            request,
            max_tokens_field=self.max_tokens_field,
            reasoning_efforts=self.reasoning_efforts,
            call_signatures=self.call_signatures,
        )

    async def complete(self, model: str, request: CompletionRequest, *, timeout_s: float | None) -> CompletionResponse:
        body = self._request_body(model, request)
        try:
            data, choice, message = _chat_completion(await post_read(self._completions, body, timeout_s))
        except openai.APIError as exc:
            raise self._upstream_error(exc) from exc
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        self._check_finished(choice.get("finish_reason"))
        usage = wire.usage_from(data) or await self._counter.estimate_usage(model, request, answer_texts(message))
        return CompletionResponse(
            id=wire.answer_id(data),
            backend=self._spec.name,
            model=self._served_model(data, model),
            message=message,
            finish_reason=wire.answer_finish_reason(choice),
            usage=usage,
        )

    async def stream(
        self, model: str, request: CompletionRequest, limits: StreamLimits = UNLIMITED_STREAM
    ) -> AsyncGenerator[CompletionChunk, None]:
        body = self._request_body(model, request)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        completion_id, served_model, named = "", model, ""
        finish: FinishReason | None = None
        usage: TokenUsage | None = None
        done = settled = refused = events = False
        stray: str | None = None
        tool_calls = wire.StreamToolCalls(tool.name for tool in request.options.tools)

        def chunk_of(line: str) -> CompletionChunk | None:
            nonlocal completion_id, served_model, named, finish, usage, done, settled, events, stray
            payload = wire.sse_data(line)
            if payload is None:
                if (error := wire.sse_error_field(line)) is not None:
                    raise self._error_event(error)
                if stray is None and wire.sse_stray(line):
                    stray = line
                return None
            events = True
            if payload == wire.DONE:
                done = True
                return None
            data = wire.decode_json(payload)
            # Each look below that most events fail is a dict lookup first, not a call: this runs for every event.
            if isinstance(data, dict) and "error" in data and (event := wire.error_event(data)) is not None:
                raise self._error_event(event)
            choice = wire.first_choice(data, "delta")
            completion_id = completion_id or wire.answer_id(data)
            # The stream's model is the first an event names: the contract has the same one in every message, and the
            # ledger bills the one the last message names (a router in front of several servers may name another).
            if not named and (named := self._served_model(data, "")):
                served_model = named
            # OpenAI sends "usage": null in every event before the last when asked to include usage.
            reported = wire.usage_from(data) if data.get("usage") is not None else None
            usage = reported or usage
            chunk = None
            if choice is not None:
                # Its delta read before its finish reason is taken: a malformed one (a call with a name no function
                # has) fails the attempt, where after the finish the stream counted as whole, ended TOOL_CALLS without
                # the call, and the event's text and the usage after it were lost.
                if choice.get("delta"):
                    chunk = delta_chunk(choice, data, payload)
                # Truthy, not just present: Ollama's /v1 and sglang have sent "" in every event before the last, which
                # taken for a finish made a cut stream whole, and a running usage count the end of the answer.
                if choice.get("finish_reason"):
                    self._check_finished(choice["finish_reason"])
                    finish = wire.finish_reason(choice["finish_reason"])
            # Usage that comes with the finish reason or after it is the last an answer has (include_usage): it is
            # whole there, [DONE] or not (`relayed` waits a moment for the end, not the idle limit). Usage before the
            # finish reason may be a running count, as vLLM's continuous_usage_stats sends: not the end.
            settled = settled or (finish is not None and reported is not None)
            return chunk

        def delta_chunk(choice: Mapping[str, Any], data: Any, payload: str) -> CompletionChunk | None:
            nonlocal refused
            delta = choice["delta"]
            content = delta.get("content")
            reasoning = None
            if "reasoning" in delta or "reasoning_content" in delta:
                reasoning = wire.reasoning_text(delta) or None
            if content is not None and not isinstance(content, str):  # a list of parts (Mistral's reasoning models)
                content, thought = wire.content_parts(content, "content")
                reasoning = (reasoning or "") + thought if thought else reasoning
            content = content or None
            if "refusal" in delta and (refusal := wire.refusal_text(delta)) is not None:  # seldom: one look first
                refused, content = True, (content or "") + refusal
            fragments: tuple[ToolCallDelta, ...] = ()
            if "tool_calls" in delta:
                if (exact := wire.with_exact_integers(data, payload)) is not data:  # read as a whole answer is
                    delta = cast(Mapping[str, Any], wire.first_choice(exact, "delta"))["delta"]
                fragments = tool_calls.deltas(delta)
            if content is None and reasoning is None and not fragments:
                # The role's event, nothing to relay; or one of a call as the functions API, before tools, streamed
                # it (`function_call`, of no event with text: looked for here, not in every event).
                if "function_call" not in delta or not (legacy := wire.legacy_call(delta)):
                    return None
                fragments = tool_calls.deltas({"tool_calls": legacy})
                if not fragments:
                    return None
            return CompletionChunk(
                id=completion_id,
                backend=self._spec.name,
                model=served_model,
                content=content,
                reasoning=reasoning,
                tool_calls=fragments,
            )

        try:
            async with post_stream(self._completions, body) as answer:
                if isinstance(answer, bytes):
                    for chunk in self._whole_stream(answer, model):
                        yield chunk
                    return
                async for chunk in relayed(
                    answer, chunk_of, lambda: done, self._spec, lambda: settled, lambda: finish is not None, limits
                ):
                    yield chunk
        except openai.APIError as exc:
            raise self._upstream_error(exc) from exc
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        except UpstreamError as exc:
            # The connection broke after the finish reason, before the usage or [DONE]: the answer is whole.
            if finish is None or exc.kind not in _CONNECTION_FAILURES:
                raise
        # Without [DONE] the answer is still whole when a finish reason came (some servers end there); without a
        # finish reason it is a cut stream, whatever else arrived, but from a server that ends streams so.
        if finish is None:
            if not (self.ends_streams_unfinished and events and not done):
                raise self._malformed(wire.cut_short("a finish reason", events, stray))
            finish = FinishReason.UNKNOWN
        try:
            held = tool_calls.rest()
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        if held:  # calls whose arguments never began, relayed now their names are whole
            yield CompletionChunk(id=completion_id, backend=self._spec.name, model=served_model, tool_calls=held)
        finish = FinishReason.CONTENT_FILTER if refused else wire.as_called(finish, tool_calls.begun)
        # Usage stays unset when the upstream sent none: the router, which has the text, estimates it.
        yield CompletionChunk(
            id=completion_id, backend=self._spec.name, model=served_model, finish_reason=finish, usage=usage
        )

    async def embed(self, model: str, request: EmbeddingRequest, *, timeout_s: float | None) -> EmbeddingResponse:
        body = wire.embedding_body(model, request)
        try:
            data = wire.decode_json(await post_read(self._embeddings, body, timeout_s))
            vectors = wire.embedding_vectors(data, len(request.inputs))
        except openai.APIError as exc:
            raise self._upstream_error(exc) from exc
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        usage = wire.embedding_usage_from(data)
        if request.dimensions is not None and (answered := len(vectors[0]) // 4) != request.dimensions:
            # A server that cannot shorten vectors (llama.cpp's, a model not trained to) ignores `dimensions`: its
            # vectors would not compare with those the caller asked for. Another backend of the model may shorten them.
            if usage is None:
                # Without the model's encoding there is nothing to count them by: billed nothing, as the router bills
                # an embedding left before its answer, and the next backend is tried all the same.
                with contextlib.suppress(TokenizerUnavailableError):
                    usage = await self._inputs_counted(model, request)
            raise UpstreamError(
                UpstreamErrorKind.UNSUPPORTED,
                self._spec.name,
                f"answered {answered} dimensions, not the {request.dimensions} asked: the model or its server cannot"
                " shorten its vectors; leave dimensions unset",
                consumed=usage,
            )
        if usage is None:
            usage = await self._inputs_counted(model, request)
        return EmbeddingResponse(
            backend=self._spec.name, model=self._served_model(data, model), vectors=vectors, usage=usage
        )

    async def _inputs_counted(self, model: str, request: EmbeddingRequest) -> TokenUsage:
        """An embedding's inputs counted offline, for an upstream that reported no usage."""
        counted = await self._counter.count_texts_async(model, request.inputs)
        return TokenUsage(prompt_tokens=counted.tokens, completion_tokens=0, estimated=True)

    async def count_tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> TokenCount | None:
        """The prompt's length as the server itself counts it; None, so the gateway estimates, when it cannot say. A
        chat with images is one: vLLM's /tokenize and llama.cpp's template count an image as its placeholder, not the
        tokens the model sees, and the figure would claim to be exact."""
        if any(isinstance(part, ImagePart) for message in messages for part in message.parts):
            return None
        try:
            tokens = await self._server_token_count(model, messages, tools)
        except (openai.APIStatusError, httpx2.HTTPError, ValueError, KeyError, TypeError, RecursionError) as exc:
            if isinstance(exc, openai.APIStatusError):  # an error answer
                error = self._upstream_error(exc)
                # Its words may quote the chat (a 400 that names what it refused): the caller's, not the log's.
                reason = without_quotes(error.message, (error.quoted,))
            else:  # no answer, or any JSON
                reason = str(exc)
            self._count_failed(f"could not count tokens ({reason})")
            return None
        if tokens is None:
            return None
        self._counted()
        return TokenCount(tokens=tokens, model=model, encoding=f"backend:{self._spec.name}", estimated=False)

    async def _server_token_count(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> int | None:
        """Overridden by the kinds of server that can tokenize a chat; a plain OpenAI-compatible one cannot."""
        return None

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        """A small call to one of the server's own endpoints (not on the completion path), through the SDK's HTTP
        client: its answer read up to `upstream_http.MAX_ANSWER_BYTES` once decompressed, and whole within
        HEALTH_TIMEOUT_S (`http1.Http1Transport`); past either, a failure the count falls back from."""
        # The call's trace context too, as its chat requests carry (upstream_http._send).
        headers = {**self._headers, **(metering.upstream_headers() or {})}
        response = await self._http.post(
            f"{self._root_url}{path}", content=wire.encode(body), headers=headers, timeout=HEALTH_TIMEOUT_S
        )
        # orjson: JSON nested past its depth is malformed, no RecursionError.
        return wire.decode_json(checked(response).content)

    async def health(self) -> BackendHealth:
        started = time.monotonic()
        try:
            models = await self._list_models()
        except (openai.APIError, httpx2.HTTPError, ValueError) as exc:
            return self._unlisted(started, exc)
        return self._health(started, reachable=True, models=models)

    async def _list_models(self) -> tuple[str, ...]:
        with models_list():
            page = await self._client.models.list(timeout=HEALTH_TIMEOUT_S)
            return model_ids(page.data)

    def _whole_stream(self, raw: bytes, model: str) -> list[CompletionChunk]:
        """The chunks of a stream whose upstream answered whole, read as `complete` reads an answer; usage left unset
        when it reported none, as a stream's is (the router estimates it)."""
        data, choice, message = _chat_completion(raw)
        self._check_finished(choice.get("finish_reason"))
        finish = wire.answer_finish_reason(choice)
        served = self._served_model(data, model)
        completion_id = wire.answer_id(data)
        return wire.whole_answer_chunks(completion_id, self._spec.name, served, message, finish, wire.usage_from(data))

    def _check_finished(self, reason: Any) -> None:
        """A failed attempt (UpstreamError) for an answer its server ended unfinished (`wire.UNFINISHED`)."""
        if isinstance(reason, str) and reason in wire.UNFINISHED:  # not any JSON: a list is no set member
            raise UpstreamError(
                UpstreamErrorKind.SERVER_ERROR,
                self._spec.name,
                f"the server ended the answer unfinished (finish_reason {reason!r}: its engine dropped the request)",
            )

    def _served_model(self, data: Any, fallback: str) -> str:
        model = data.get("model") if isinstance(data, dict) else None
        return model if isinstance(model, str) and model else fallback

    def _upstream_error(self, exc: openai.APIError) -> UpstreamError:
        if isinstance(exc, openai.APIConnectionError):
            return self._connection_error(exc, timed_out=isinstance(exc, openai.APITimeoutError))
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            # A code that is a number (llama.cpp's is the status, which the SDK makes text): the type says more.
            _, code = wire.error_code(exc.code, exc.type)
            kind = kind_of_status(status, code, exc.message)
            # Retry-After means something on a rate limit and on 503 (overloaded); elsewhere it is not a promise.
            asks_to_wait = kind is UpstreamErrorKind.RATE_LIMITED or status == 503
            retry_after = retry_after_s(exc.response.headers) if asks_to_wait else None
            return self._status_failure(exc.response, kind, exc.message, retry_after)
        return self._bad_answer(exc.message)

    def _error_event(self, event: wire.ErrorEvent, said: str = "error event") -> UpstreamError:
        status = event.status
        words = self._redact(event.message)
        message = f"{said}{f' (HTTP {status})' if status else ''}: {words}"
        # Without a status, the one its name comes with (rate_limit_exceeded: a 429, not the server's failure that would
        # count against its circuit), else the server's failure (a 500), unless its code says more (insufficient_quota).
        kind = kind_of_status(status or event.named_status or 500, event.code, event.message)
        return UpstreamError(kind, self._spec.name, message, status=status, quoted=words)


def _chat_completion(raw: bytes) -> tuple[Any, Mapping[str, Any], Message]:
    """A chat completion's body, read whole: its JSON, its choice 0, and that choice's message."""
    data = wire.decode_answer_json(raw)
    choice = wire.first_choice(data, "message")
    assert choice is not None  # first_choice finds a message or raises
    return data, choice, wire.message_from_choice(choice)


def checked(response: httpx2.Response) -> httpx2.Response:
    """A side request's answer (a count, a probe), or its error as a chat's would be (`_status_error`): a redirect
    among them, never followed, said with where it points minus its query."""
    if not response.is_success:
        raise _status_error(response)
    return response


def _status_error(response: httpx2.Response) -> openai.APIStatusError:
    """The SDK's error for an HTTP error answer, with the upstream's own message when it gave one: OpenAI's
    `{"error": {"message", ...}}`, the `{"error": "..."}` some compatible servers answer, or older vLLM's
    `{"object": "error", "message", ...}` (`error_message`)."""
    body, error = error_body(response)
    detail = error.get("message") if isinstance(error, dict) else error
    given = error if isinstance(error, dict) else body
    if isinstance(given, dict) and isinstance(given.get("code"), list | dict):
        # The SDK makes a code text with str(), which JSON nested past Python's stack fails (RecursionError); a code
        # that is no word or number names nothing anyway.
        given = {**given, "code": None}
    return openai.APIStatusError(error_message(response, body, detail), response=response, body=given)


class OpenAIProvider(OpenAICompatibleProvider):
    """The OpenAI API itself."""

    kind: ClassVar[str] = "openai"
    max_tokens_field: ClassVar[str] = "max_completion_tokens"
    # It signs no call, and need not be handed another upstream's signatures in a chat that went from one to it.
    call_signatures: ClassVar[bool] = False


_ERRORS = SDKErrors(openai.APITimeoutError, openai.APIConnectionError, _status_error)
