"""Anthropic's Messages API as a backend: /v1/messages, /v1/messages/count_tokens and /v1/models.

As the OpenAI-compatible backend does (docs/architecture.md, "The SDK configures, `wire` does the JSON"), each backend
owns one `anthropic.AsyncAnthropic` over one HTTP connection pool: the SDK settles the URL, auth and headers, the
completion path posts the JSON `anthropic_wire` built on that pool, which the SDK's HTTP client sends through too
(`upstream_http`), and answers are parsed by `anthropic_wire`. Token counts are posted the same way (`wire.encode`),
so that the caller's JSON texts, tool schemas and tool-call arguments, reach the API as written; the SDK's own call
serves the models list. Every failure leaves this module as an UpstreamError whose kind tells the router what to do
next.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar

import anthropic
import httpx2
from anthropic.types import ModelInfo

from llmrelay_server.backends import anthropic_wire, wire
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
    FinishReason,
    Message,
    StreamLimits,
    TokenCount,
    Tool,
    UpstreamError,
    UpstreamErrorKind,
    without_quotes,
)
from llmrelay_server.tokens import TokenCounter

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 4096
"""The answer's length limit when neither the request nor the backend's `max_tokens` sets one (the API needs one)."""
MAX_MODEL_PAGES = 10
"""The most pages of the models list a probe reads (of 1000 models each: the API lists a few dozen)."""
# "prompt is too long: 208656 tokens > 200000 maximum", an invalid_request_error.
_PROMPT_TOO_LONG = re.compile(r"prompt is too long", re.IGNORECASE)
_NO_CREDITS = re.compile(r"credit balance is too low", re.IGNORECASE)
"""The API's words for an account out of credits, which it sends as a 400 invalid_request_error, not a 402."""


class AnthropicProvider(UpstreamProvider[anthropic.APIError]):
    """An LLMProvider over Anthropic's Messages API (or a server that speaks it)."""

    kind: ClassVar[str] = "anthropic"
    _sdk_error = anthropic.APIError

    def __init__(self, spec: BackendSpec, *, counter: TokenCounter) -> None:
        super().__init__(spec, anthropic.DefaultAsyncHttpxClient)
        self._counter = counter
        self._max_tokens = spec.default_max_tokens or DEFAULT_MAX_TOKENS
        self._client: anthropic.AsyncAnthropic = anthropic.AsyncAnthropic(
            # An explicit key also keeps the SDK from looking for credentials in the environment and profile files.
            api_key=spec.api_key or "unused",
            # The SDK adds /v1 to its paths; a base URL written with it works too.
            base_url=spec.base_url.removesuffix("/v1"),
            max_retries=0,  # the router retries, with the caller's deadline in mind
            http_client=self._http,
            # The gateway's own spans cover its calls (tracing.py); the SDK's would add one per health probe.
            open_telemetry=False,
        )
        # Prepared once, as the SDK would merge them on every request: the HTTP client's headers, then the SDK's
        # (API version, user agent, platform) and its auth.
        headers = prepared_headers(self._http.headers, self._client.default_headers, self._client.auth_headers)
        messages_url = f"{str(self._client.base_url).rstrip('/')}/v1/messages"
        self._messages = Endpoint(self._pool, messages_url, headers, _ERRORS)
        self._count = Endpoint(self._pool, f"{messages_url}/count_tokens", headers, _ERRORS)
        self._adaptive_thinking: frozenset[str] = frozenset()
        """The models that take reasoning as adaptive thinking and no budget, as the last probe's list said."""

    async def complete(self, model: str, request: CompletionRequest, *, timeout_s: float | None) -> CompletionResponse:
        body = self._body(model, request)
        try:
            answer = anthropic_wire.answer_from(
                wire.decode_answer_json(await post_read(self._messages, body, timeout_s))
            )
        except anthropic.APIError as exc:
            raise self._upstream_error(exc) from exc
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        message = answer.message
        usage = answer.usage or await self._counter.estimate_usage(
            model, request, answer_texts(message), answer.prompt_usage
        )
        return CompletionResponse(
            id=answer.id,
            backend=self._spec.name,
            model=answer.model or model,
            message=message,
            finish_reason=answer.finish_reason,
            usage=usage,
        )

    async def stream(
        self, model: str, request: CompletionRequest, limits: StreamLimits = UNLIMITED_STREAM
    ) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(model, request)
        body["stream"] = True
        state = anthropic_wire.StreamState()
        events = False
        stray: str | None = None

        def chunk_of(line: str) -> CompletionChunk | None:
            nonlocal events, stray
            # The `event:` lines repeat the type each `data:` object carries: the data alone is read.
            payload = wire.sse_data(line)
            if payload is None:
                if stray is None and wire.sse_stray(line):
                    stray = line
                return None
            events = True
            data = wire.decode_json(payload)
            if (event := anthropic_wire.error_event(data)) is not None:
                raise self._error_event(event)
            if isinstance(data, dict) and data.get("type") == "content_block_start":
                data = wire.with_exact_integers(data, payload)
            delta = state.event(data)
            if delta is None:
                return None
            return CompletionChunk(
                id=state.id,
                backend=self._spec.name,
                model=state.model or model,
                content=delta.content,
                reasoning=delta.reasoning,
                tool_calls=delta.tool_calls,
                prompt_usage=state.prompt_usage,
            )

        try:
            async with post_stream(self._messages, body) as answer:
                if isinstance(answer, bytes):
                    for chunk in self._whole_stream(answer, model):
                        yield chunk
                    return
                # message_delta's stop reason comes with the answer's last usage: the answer is whole there, though
                # message_stop is still to come (`relayed` waits a moment for it, not the idle limit). No wait for the
                # usage after the finish, then, which the router's `limits` would bound.
                async for chunk in relayed(
                    answer, chunk_of, lambda: state.stopped, self._spec, lambda: state.finish_reason is not None
                ):
                    yield chunk
        except anthropic.APIError as exc:
            raise self._upstream_error(exc) from exc
        except wire.MalformedAnswerError as exc:
            raise self._malformed(exc) from exc
        # A stop reason (message_delta's) or message_stop makes an answer whole: whatever came before, a stream
        # without either was cut.
        if state.finish_reason is None and not state.stopped:
            raise self._malformed(wire.cut_short("a stop reason or message_stop", events, stray))
        if unstopped := state.unstopped_tool_calls():
            # The arguments of calls whose blocks the stream ended before their stop, in a chunk of their own, as the
            # OpenAI-compatible path sends its calls: the last message holds the end alone (and the reasoning's
            # signature), as the contract says, and the router counts their text as relayed.
            yield CompletionChunk(
                id=state.id, backend=self._spec.name, model=state.model or model, tool_calls=unstopped
            )
        yield CompletionChunk(
            id=state.id,
            backend=self._spec.name,
            model=state.model or model,
            finish_reason=wire.as_called(state.finish_reason or FinishReason.UNKNOWN, state.called),
            usage=state.usage,
            reasoning_signature=state.reasoning_signature,
            prompt_usage=state.prompt_usage,
        )

    def answer_tokens_asked(self, request: CompletionRequest) -> int:
        # The API needs a max_tokens: a request without one is sent the backend's, with thinking's budget on top.
        return anthropic_wire.max_tokens_asked(request.options, self._max_tokens)

    async def count_tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> TokenCount | None:
        """The prompt's length as the API counts it (/v1/messages/count_tokens); None, so that the gateway estimates,
        when it cannot say."""
        try:
            body = anthropic_wire.prompt_body(model, messages, tools)
            # Whole within it, as the other backends' counts are, not each read: an answer that came a byte a second
            # held the caller's count to its own deadline.
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                counted = wire.decode_json(await post_read(self._count, body, HEALTH_TIMEOUT_S))
        except anthropic_wire.UnmappableRequestError as exc:
            # The caller's chat, which the API cannot be sent (nor a completion of it): theirs to hear, not the log's.
            log.debug("backend %s cannot count this chat (%s); estimating instead", self._spec.name, exc)
            return None
        except (anthropic.APIError, wire.MalformedAnswerError, TimeoutError) as exc:
            if isinstance(exc, anthropic.APIError):
                error = self._upstream_error(exc)
                # Its words may quote the chat (a 400 that names what it refused): the caller's, not the log's.
                reason = without_quotes(error.message, (error.quoted,))
            elif isinstance(exc, TimeoutError):
                reason = f"no whole answer in {HEALTH_TIMEOUT_S:g} s"
            else:
                reason = str(exc)
            self._count_failed(f"could not count tokens ({reason})")
            return None
        tokens = counted.get("input_tokens") if isinstance(counted, dict) else None
        if not wire.is_count(tokens):
            # Its type, not its repr: an upstream's JSON nested past Python's stack has none.
            counted_as = type(tokens).__name__
            self._count_failed(f"counted tokens as {counted_as}")
            return None
        self._counted()
        return TokenCount(tokens=tokens, model=model, encoding=f"backend:{self._spec.name}", estimated=False)

    async def health(self) -> BackendHealth:
        started = time.monotonic()
        try:
            with models_list():
                models = await self._list_models()
                ids = model_ids(models)
        except (anthropic.APIError, ValueError) as exc:
            return self._unlisted(started, exc)
        self._adaptive_thinking = frozenset(m.id for m in models if _takes_no_budget(m))
        return self._health(started, reachable=True, models=ids)

    async def _list_models(self) -> list[ModelInfo]:
        """The models the API lists, page by page while each brings models not yet listed, MAX_MODEL_PAGES at most. A
        compatible server that answers `has_more` for ever (its cursor ignored) would otherwise hold the probe, and
        the gateway's start that awaits it, for ever, asking it for the next page as fast as it answers."""
        page = await self._client.models.list(limit=1000, timeout=HEALTH_TIMEOUT_S)
        models: dict[str, ModelInfo] = {}
        for _ in range(MAX_MODEL_PAGES):
            new = {model.id: model for model in page.data if model.id not in models}
            models |= new
            if not new or not page.has_next_page():
                break
            page = await page.get_next_page()
        return list(models.values())

    def _body(self, model: str, request: CompletionRequest) -> dict[str, Any]:
        try:
            return anthropic_wire.request_body(
                model,
                request,
                default_max_tokens=self._max_tokens,
                adaptive_thinking=model in self._adaptive_thinking,
            )
        except anthropic_wire.UnmappableRequestError as exc:
            # Valid in the contract, and for another dialect: the router moves on to a backend that can take it.
            raise UpstreamError(
                UpstreamErrorKind.UNSUPPORTED, self._spec.name, f"not sent to Anthropic: {exc}"
            ) from exc

    def _whole_stream(self, raw: bytes, model: str) -> list[CompletionChunk]:
        """The chunks of a stream whose upstream answered whole, read as `complete` reads an answer; usage left unset
        when it reported none whole, as a stream's is (the router counts it), and the prompt's usage it reported
        carried on every chunk, as a stream's message_start's is: the router bills that prompt, its cache reads and
        writes among them, and counts the answer alone, as `complete` does."""
        answer = anthropic_wire.answer_from(wire.decode_answer_json(raw))
        chunks = wire.whole_answer_chunks(
            answer.id, self._spec.name, answer.model or model, answer.message, answer.finish_reason, answer.usage
        )
        return [dataclasses.replace(chunk, prompt_usage=answer.prompt_usage) for chunk in chunks]

    def _upstream_error(self, exc: anthropic.APIError) -> UpstreamError:
        if isinstance(exc, anthropic.APIConnectionError):
            return self._connection_error(exc, timed_out=isinstance(exc, anthropic.APITimeoutError))
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            # The error's message only where it is text: a compatible server's may be any JSON.
            message = exc.api_message
            detail = message if isinstance(message, str) and message else exc.message
            kind = _kind(status, exc.type, exc.error_code, detail)
            # Retry-After means something on a rate limit and when the API is overloaded (503, 529).
            asks_to_wait = kind is UpstreamErrorKind.RATE_LIMITED or status in (503, 529)
            retry_after = retry_after_s(exc.response.headers) if asks_to_wait else None
            return self._status_failure(exc.response, kind, detail, retry_after)
        return self._bad_answer(exc.message)

    def _error_event(self, event: wire.ErrorEvent, said: str = "error event") -> UpstreamError:
        """An error event fails the stream (an overloaded_error is a 529 that came late); it is never an end."""
        means = event.named_status  # the status its type comes with: what it means, not what was sent
        words = self._redact(event.message)
        message = f"{said} ({event.code or 'untyped'}): {words}"
        kind = UpstreamErrorKind.SERVER_ERROR if means is None else _kind(means, event.code, None, event.message)
        return UpstreamError(kind, self._spec.name, message, status=event.status, quoted=words)


def _kind(status: int, error_type: str | None, error_code: str | None, message: str | None) -> UpstreamErrorKind:
    """The kind of an Anthropic error, from its HTTP status (or the one its type comes with), type and code."""
    # Our account cannot pay (billing, a spend limit reached), as a 402 is (`kind_of_status`): another backend may
    # serve, retrying cannot help.
    if (
        error_type == "billing_error"
        or (error_code or "").endswith("spend_limit_reached")
        or _NO_CREDITS.search(message or "")
    ):
        return UpstreamErrorKind.AUTH_FAILED
    if status in (400, 413) and _PROMPT_TOO_LONG.search(message or ""):
        return UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED
    # 529 (overloaded) is a server error as the OpenAI path has it: retried, then the next backend.
    return kind_of_status(status, error_code, message)


def _status_error(response: httpx2.Response) -> anthropic.APIStatusError:
    """The SDK's error for an HTTP error answer (`{"type": "error", "error": {"type", "message"}}`)."""
    body, error = error_body(response)
    detail = error.get("message") if isinstance(error, dict) else None
    return anthropic.APIStatusError(error_message(response, body, detail), response=response, body=body)


def _takes_no_budget(model: ModelInfo) -> bool:
    """Whether the model's listed capabilities say it takes adaptive thinking and refuses a budget_tokens."""
    # Read as far as listed: a compatible server may list less than the API documents, or nothing (then the budget,
    # which every thinking model once took).
    types = getattr(getattr(model.capabilities, "thinking", None), "types", None)
    adaptive = getattr(getattr(types, "adaptive", None), "supported", False)
    enabled = getattr(getattr(types, "enabled", None), "supported", True)
    return adaptive is True and enabled is False


_ERRORS = SDKErrors(anthropic.APITimeoutError, anthropic.APIConnectionError, _status_error)
