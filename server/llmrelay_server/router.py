"""The chain of backends: which ones may answer, in what order, with what retries, within the caller's deadline.

Policy, in one place:
- A request resolves to routes: the backend that serves the named model first, then (unless the caller forbids
  substitution) every other fallback backend with its own default model.
- Per route, failures the same backend may cure (unreachable, timeout, 429, 5xx) are retried with exponential backoff
  and full jitter, honouring Retry-After up to a bound; then the next route takes over. A failure only another
  backend can cure (our key refused, model missing, bad answer) moves on at once; a request the upstream rejects as
  invalid goes back to the caller at once.
- Nothing starts that cannot finish before the deadline; every attempt's upstream timeout is the time left.
- A backend failing `failure_threshold` times in a row is skipped for `cooldown_s`, then one probe call is let in.
- A stream falls back only before its first chunk is sent; after that a failure ends it with StreamInterruptedError.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import TypeVar

from llmrelay_server.config import CircuitConfig, RetryConfig, RouterConfig
from llmrelay_server.domain import (
    AllBackendsFailedError,
    Attempt,
    AttemptOutcome,
    BackendHealth,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeadlineExceededError,
    LLMProvider,
    Message,
    ModelNotFoundError,
    StreamInterruptedError,
    TokenCount,
    Tool,
    UpstreamError,
    UpstreamErrorKind,
)
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.usage import UsageLedger

T = TypeVar("T")

RETRYABLE = frozenset(
    {
        UpstreamErrorKind.UNREACHABLE,
        UpstreamErrorKind.TIMEOUT,
        UpstreamErrorKind.RATE_LIMITED,
        UpstreamErrorKind.SERVER_ERROR,
    }
)
# Failures that say nothing about the backend's health, so they do not trip its circuit.
NOT_THE_BACKENDS_FAULT = frozenset({UpstreamErrorKind.REJECTED, UpstreamErrorKind.MODEL_NOT_FOUND})
# Below this much time left, an attempt cannot get an answer; starting one only wastes the upstream's work.
MIN_ATTEMPT_S = 0.05
DEADLINE_MARGIN_S = 0.05


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    config: CircuitConfig
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at >= self.config.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def retry_after_s(self) -> float:
        return 0.0 if self.opened_at is None else max(0.0, self.opened_at + self.config.cooldown_s - self.clock())

    def allow(self) -> bool:
        """True when a call may go through; in half-open state only one probe call at a time does."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def release(self) -> None:
        """The call let through ended without a verdict on the backend (the caller left, the deadline ran out, the
        request was at fault): the next call may probe instead."""
        self.probing = False

    def record_success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def record_failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.config.failure_threshold:
            self.opened_at = self.clock()
        self.probing = False


class Backend:
    """A provider with what the gateway has learned about it."""

    def __init__(self, provider: LLMProvider, circuit: CircuitBreaker) -> None:
        self.provider = provider
        self.circuit = circuit
        self.name = provider.spec.name
        self._health: BackendHealth | None = None
        self._served = self._models_served()

    @property
    def health(self) -> BackendHealth | None:
        return self._health

    @health.setter
    def health(self, health: BackendHealth | None) -> None:
        # The models served change only with a probe; every request asks, so the answer is kept ready.
        self._health = health
        self._served = self._models_served()

    def serves(self, model: str) -> bool:
        return _untagged(model) in self._served

    def _models_served(self) -> frozenset[str]:
        spec = self.provider.spec
        known = (spec.default_model, *spec.models, *(self._health.models if self._health else ()))
        # Ollama treats NAME and NAME:latest as one model.
        return frozenset(_untagged(name) for name in known)


def _untagged(model: str) -> str:
    return model.removesuffix(":latest")


@dataclass(frozen=True, slots=True)
class Route:
    backend: Backend
    model: str


@dataclass
class Backoff:
    """Delays between retries on one backend: full jitter over a doubling, capped base; Retry-After wins if sane."""

    config: RetryConfig
    rng: Callable[[], float] = random.random

    def delay_s(self, retry: int, retry_after_s: float | None) -> float | None:
        """The wait before retry number `retry` (0-based); None when the upstream asks for longer than we honour."""
        if retry_after_s is not None:
            return retry_after_s if retry_after_s <= self.config.max_retry_after_s else None
        cap = min(self.config.max_backoff_s, self.config.initial_backoff_s * 2**retry)
        return float(self.rng() * cap)


@dataclass
class _Chain:
    """The bookkeeping of one call as it walks the routes."""

    deadline: float
    attempts: list[Attempt] = field(default_factory=list)
    last_error: UpstreamError | None = None
    too_long_for: int = 0
    """The largest known context window the prompt did not fit; a backend with no larger one is not tried."""

    def may_fit(self, route: Route) -> bool:
        window = route.backend.provider.spec.context_window
        return window is None or window > self.too_long_for

    def remaining_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def record(self, route: Route, outcome: AttemptOutcome, started: float, error: UpstreamError | None) -> None:
        self.attempts.append(
            Attempt(
                backend=route.backend.name,
                model=route.model,
                outcome=outcome,
                duration_s=max(0.0, asyncio.get_running_loop().time() - started),
                upstream_status=error.status if error else None,
                error=error.message if error else "",
            )
        )
        if error is not None:
            self.last_error = error

    def deadline_exceeded(self) -> DeadlineExceededError:
        tried = ", ".join(f"{a.backend} ({a.outcome.value})" for a in self.attempts) or "nothing"
        return DeadlineExceededError(f"the deadline ran out; tried: {tried}", self.attempts)

    def exhausted(self) -> AllBackendsFailedError:
        # Retries of one backend usually fail alike: each cause is told once, with how many attempts met it.
        causes = groupby(f"{a.backend}/{a.model}: {a.error or a.outcome.value}" for a in self.attempts)
        tried = "; ".join(
            cause if count == 1 else f"{cause} ({count} attempts)"
            for cause, count in ((cause, len(list(same))) for cause, same in causes)
        )
        error = AllBackendsFailedError(f"every backend failed: {tried}", self.attempts)
        error.__cause__ = self.last_error
        return error


class Router:
    def __init__(
        self,
        providers: Sequence[LLMProvider],
        *,
        config: RouterConfig,
        counter: TokenCounter,
        ledger: UsageLedger,
        aliases: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backends = tuple(Backend(p, CircuitBreaker(config.circuit)) for p in providers)
        self._by_name = {b.name: b for b in self.backends}
        self._config = config
        self._counter = counter
        self._ledger = ledger
        self._aliases = dict(aliases or {})
        self._sleep = sleep
        self._backoff = Backoff(config.retry, rng)

    # --- resolution -------------------------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        names = [f"{b.name}/{b.provider.spec.default_model}" for b in self.backends]
        return names + sorted(self._aliases)

    def resolve(self, model: str | None, *, exact: bool) -> list[Route]:
        """The routes a request may take, in order; ModelNotFoundError when nothing serves the model."""
        if model is None:
            first = self.backends[0]
            default = Route(first, first.provider.spec.default_model)
            return [default] if exact else [default, *self._fallbacks(exclude=first)]
        model = self._aliases.get(model, model)
        qualifier, _, bare = model.partition("/")
        if bare and qualifier in self._by_name:
            primary = Route(self._by_name[qualifier], bare)
        else:
            owner = next((b for b in self.backends if b.serves(model)), None)
            if owner is None:
                raise ModelNotFoundError(model, self.served_models())
            primary = Route(owner, model)
        return [primary] if exact else [primary, *self._fallbacks(exclude=primary.backend)]

    def _fallbacks(self, *, exclude: Backend) -> list[Route]:
        return [
            Route(b, b.provider.spec.default_model)
            for b in self.backends
            if b is not exclude and b.provider.spec.fallback
        ]

    def deadline(self, timeout_s: float | None) -> float:
        """The absolute (event-loop clock) deadline for a call with `timeout_s` left, or the configured bound."""
        bound = self._config.request_timeout_s
        if timeout_s is None:
            return asyncio.get_running_loop().time() + bound
        # Finish a little before the caller's own deadline, so that our status (with the attempts) reaches it
        # rather than its client library's bare DEADLINE_EXCEEDED.
        margin = min(DEADLINE_MARGIN_S, timeout_s / 10)
        return asyncio.get_running_loop().time() + min(timeout_s - margin, bound)

    # --- calls ------------------------------------------------------------------------------------------------

    async def complete(self, request: CompletionRequest, *, deadline: float, caller: str) -> CompletionResponse:
        chain = _Chain(deadline)
        for route in self.resolve(request.model, exact=request.exact_model):
            response = await self._try_route(
                chain, route, lambda r, t: r.backend.provider.complete(r.model, request, timeout_s=t)
            )
            if response is not None:
                self._ledger.record(response.backend, response.model, caller, response.usage)
                return replace(response, attempts=tuple(chain.attempts))
        raise chain.exhausted()

    async def stream(
        self, request: CompletionRequest, *, deadline: float, caller: str
    ) -> AsyncIterator[CompletionChunk]:
        chain = _Chain(deadline)
        for route in self.resolve(request.model, exact=request.exact_model):
            opened = await self._try_route(chain, route, lambda r, t: self._open_stream(r, request, t))
            if opened is None:
                continue
            first, upstream = opened
            try:
                async for chunk in self._rest_of_stream(chain, route, first, upstream):
                    if chunk.usage is not None:
                        self._ledger.record(chunk.backend, chunk.model, caller, chunk.usage)
                        chunk = replace(chunk, attempts=tuple(chain.attempts))
                    yield chunk
            finally:
                await upstream.aclose()
            return
        raise chain.exhausted()

    async def count_tokens(
        self, model: str | None, messages: Sequence[Message], tools: Sequence[Tool], text: str | None
    ) -> TokenCount:
        """A backend's own exact count where it has a tokenizer; else tiktoken, for any model name (counting is offline
        and an agent may budget for a model this gateway does not route to)."""
        try:
            route: Route | None = self.resolve(model, exact=True)[0]
        except ModelNotFoundError:
            route = None
        name = route.model if route is not None else str(model)
        if text is not None:
            return self._counter.count_text(name, text)
        exact = await route.backend.provider.count_tokens(name, messages, tools) if route is not None else None
        return exact or self._counter.count_chat(name, messages, tools)

    async def _open_stream(
        self, route: Route, request: CompletionRequest, timeout_s: float
    ) -> tuple[CompletionChunk, AsyncGenerator[CompletionChunk, None]]:
        """Starts a stream and waits for its first chunk: until then, a failure may still fall back."""
        upstream = route.backend.provider.stream(route.model, request, timeout_s=None)
        idle_s = self._config.stream_idle_timeout_s
        try:
            async with asyncio.timeout(min(timeout_s, idle_s)):
                return await anext(upstream), upstream
        except StopAsyncIteration as exc:
            raise UpstreamError(UpstreamErrorKind.BAD_RESPONSE, route.backend.name, "the stream was empty") from exc
        except TimeoutError as exc:
            await upstream.aclose()
            if timeout_s < idle_s:
                raise
            raise UpstreamError(
                UpstreamErrorKind.TIMEOUT, route.backend.name, f"no first chunk in {idle_s:g} s"
            ) from exc
        except BaseException:
            await upstream.aclose()
            raise

    async def _rest_of_stream(
        self, chain: _Chain, route: Route, first: CompletionChunk, upstream: AsyncIterator[CompletionChunk]
    ) -> AsyncIterator[CompletionChunk]:
        yield first
        idle_s = self._config.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            limit = min(loop.time() + idle_s, chain.deadline)
            try:
                async with asyncio.timeout_at(limit):
                    chunk = await anext(upstream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if loop.time() >= chain.deadline:
                    raise chain.deadline_exceeded() from None
                stalled = UpstreamError(UpstreamErrorKind.TIMEOUT, route.backend.name, f"no data for {idle_s:g} s")
                route.backend.circuit.record_failure()
                raise StreamInterruptedError(route.backend.name, stalled) from None
            except UpstreamError as exc:
                route.backend.circuit.record_failure()
                raise StreamInterruptedError(route.backend.name, exc) from exc
            yield chunk

    async def _try_route(self, chain: _Chain, route: Route, call: Callable[[Route, float], Awaitable[T]]) -> T | None:
        """Runs `call` on one route with retries; its result, or None to move on to the next route."""
        circuit = route.backend.circuit
        loop = asyncio.get_running_loop()
        if not chain.may_fit(route):
            too_long = UpstreamError(
                UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
                route.backend.name,
                f"not tried: its context window is no larger than {chain.too_long_for} tokens, which was too small",
            )
            chain.record(route, AttemptOutcome.CONTEXT_LENGTH_EXCEEDED, loop.time(), too_long)
            return None
        for retry in range(self._config.retry.max_retries + 1):
            if not circuit.allow():
                chain.record(route, AttemptOutcome.SKIPPED, loop.time(), None)
                return None
            remaining = chain.remaining_s()
            if remaining < MIN_ATTEMPT_S:
                circuit.release()
                raise chain.deadline_exceeded()
            started = loop.time()
            try:
                async with asyncio.timeout_at(chain.deadline):
                    result = await call(route, remaining)
            except TimeoutError:
                circuit.release()
                timeout = UpstreamError(UpstreamErrorKind.TIMEOUT, route.backend.name, "the deadline ran out")
                chain.record(route, AttemptOutcome.TIMEOUT, started, timeout)
                raise chain.deadline_exceeded() from None
            except UpstreamError as exc:
                chain.record(route, exc.kind.attempt_outcome, started, exc)
                if exc.kind is UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED:
                    chain.too_long_for = max(chain.too_long_for, route.backend.provider.spec.context_window or 0)
                if exc.kind in NOT_THE_BACKENDS_FAULT:
                    circuit.release()
                else:
                    circuit.record_failure()
                if exc.kind is UpstreamErrorKind.REJECTED:
                    raise
                if exc.kind not in RETRYABLE or retry == self._config.retry.max_retries:
                    return None
                delay = self._backoff.delay_s(retry, exc.retry_after_s)
                if delay is None or delay + MIN_ATTEMPT_S > chain.remaining_s():
                    return None
                await self._sleep(delay)
                continue
            except BaseException:
                circuit.release()
                raise
            circuit.record_success()
            chain.record(route, AttemptOutcome.SUCCEEDED, started, None)
            return result
        return None
