"""Limits: requests and tokens per minute, streams at once and spend per day, per caller key and for the gateway.

A server interceptor admits each model call before any upstream is contacted: it reserves the call's share of every
limit that applies, at once or not at all (`Limiter.reserve`, the one atomic check-and-reserve step), and refuses
with RESOURCE_EXHAUSTED naming the limit (ErrorInfo, QuotaFailure, RetryInfo) when one would be passed. Tokens are
reserved before they are spent: the prompt's offline count plus its max_tokens (or `reserve_completion_tokens`),
and the cost of that at the requested model's price. When the call ends, the reservation is settled with what the
call was billed (`metering`): an answer's real usage, a broken stream's part, nothing for a call that failed.

The limiter's state sits behind `Limiter`; `InProcessLimiter` keeps it in this process. Reserving many subjects in
one step is what a shared implementation (a Redis script) will do too, so N gateways enforce one limit.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from llmrelay import v1 as pb

from llmrelay_server import convert
from llmrelay_server.auth import Continuation, Handler, current_caller
from llmrelay_server.config import Limits
from llmrelay_server.domain import InvalidRequestError, LimitExceededError, LimitKind
from llmrelay_server.metering import open_meter
from llmrelay_server.status import abort
from llmrelay_server.tokens import TokenCounter

WINDOW_S = 60.0
GATEWAY = "gateway"
_COMPLETE = "/llmrelay.v1.LLMService/Complete"
_STREAM = "/llmrelay.v1.LLMService/StreamComplete"
# A stream slot frees when some stream ends, which nobody can foresee: try again in about this long.
STREAM_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Ask:
    """What one call asks of one subject's limits."""

    subject: str
    """Whose limits: "key:NAME", or "gateway"."""
    limits: Limits
    tokens: int
    usd_micros: int
    stream: bool


@dataclass(slots=True)
class Reservation:
    asks: Sequence[Ask]
    at: float
    """When it was made (the limiter's clock)."""
    holds: list[Any] = field(default_factory=list)
    """The limiter's own handles on what it reserved, one per ask, for settle()."""


class Limiter(Protocol):
    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        """Reserves every ask, or none and raises LimitExceededError for the first limit one would pass."""
        ...

    async def settle(self, reservation: Reservation, tokens: int, usd_micros: int) -> None:
        """The call ended having been billed this much: the reservation becomes that, and its stream slot frees."""
        ...


@dataclass(slots=True)
class _Window:
    """One subject's use: requests and tokens of the last minute, streams open, spend per UTC day."""

    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[list[float]] = field(default_factory=collections.deque)
    """[time, tokens] entries; settle() corrects an entry's tokens in place."""
    token_sum: float = 0
    streams: int = 0
    spend: dict[int, int] = field(default_factory=dict)
    """UTC day number -> micro-USD."""

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]
        if len(self.spend) > 2:  # today's, and yesterday's for calls that began before midnight and settle after
            for day in [day for day in self.spend if day < _utc_day(now) - 1]:
                del self.spend[day]


class InProcessLimiter:
    """Limits kept in this process. Exact under any number of concurrent calls: reserve() never awaits, so on one
    event loop no other call can come between its checks and its updates."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        now = self._clock()
        day = _utc_day(now)
        windows = [self._windows.setdefault(ask.subject, _Window()) for ask in asks]
        for ask, window in zip(asks, windows, strict=True):
            window.expire(now)
            _check(ask, window, now, day)
        reservation = Reservation(asks, now)
        for ask, window in zip(asks, windows, strict=True):
            window.requests.append(now)
            entry = [now, float(ask.tokens)]
            window.tokens.append(entry)
            window.token_sum += ask.tokens
            window.streams += ask.stream
            window.spend[day] = window.spend.get(day, 0) + ask.usd_micros
            reservation.holds.append(entry)
        return reservation

    async def settle(self, reservation: Reservation, tokens: int, usd_micros: int) -> None:
        day = _utc_day(reservation.at)
        for ask, entry in zip(reservation.asks, reservation.holds, strict=True):
            window = self._windows[ask.subject]
            if entry[0] > self._clock() - WINDOW_S:  # still counted this minute
                window.token_sum += tokens - entry[1]
                entry[1] = tokens
            window.streams -= ask.stream
            window.spend[day] = window.spend.get(day, 0) + usd_micros - ask.usd_micros


def _check(ask: Ask, window: _Window, now: float, day: int) -> None:
    limits, subject = ask.limits, ask.subject
    if limits.requests_per_minute is not None and len(window.requests) + 1 > limits.requests_per_minute:
        wait = window.requests[0] + WINDOW_S - now if window.requests else WINDOW_S
        message = f"{limits.requests_per_minute} requests per minute"
        raise LimitExceededError(LimitKind.REQUESTS_PER_MINUTE, subject, message, wait)
    if limits.tokens_per_minute is not None and window.token_sum + ask.tokens > limits.tokens_per_minute:
        raise LimitExceededError(
            LimitKind.TOKENS_PER_MINUTE,
            subject,
            f"{limits.tokens_per_minute} tokens per minute; this request reserves {ask.tokens}",
            _tokens_free_in(window, ask.tokens, limits.tokens_per_minute, now),
        )
    if ask.stream and limits.concurrent_streams is not None and window.streams + 1 > limits.concurrent_streams:
        message = f"{limits.concurrent_streams} streams at once"
        raise LimitExceededError(LimitKind.CONCURRENT_STREAMS, subject, message, STREAM_RETRY_S)
    if limits.budget_usd_per_day is not None:
        budget = round(limits.budget_usd_per_day * 1_000_000)
        if window.spend.get(day, 0) + ask.usd_micros > budget:
            message = f"a budget of {limits.budget_usd_per_day:g} USD per day (UTC) is spent"
            raise LimitExceededError(LimitKind.BUDGET_PER_DAY, subject, message, _until_next_day(now))


def _tokens_free_in(window: _Window, wanted: int, limit: int, now: float) -> float:
    """How long until the tokens of the last minute leave room for `wanted`; a minute if they never will."""
    used = window.token_sum
    for at, tokens in window.tokens:
        used -= tokens
        if used + wanted <= limit:
            return max(0.0, at + WINDOW_S - now)
    return WINDOW_S


def _utc_day(moment: float) -> int:
    return int(moment // 86_400)


def _until_next_day(now: float) -> float:
    return (_utc_day(now) + 1) * 86_400 - now


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Admits each Complete and StreamComplete within the caller's limits and the gateway's, settles it at its end."""

    def __init__(
        self,
        limiter: Limiter,
        gateway: Limits,
        counter: TokenCounter,
        estimate_usd_micros: Callable[[str | None, int, int], int],
        reserve_completion_tokens: int,
    ) -> None:
        self._limiter = limiter
        self._gateway = gateway if gateway.any_set() else None
        self._counter = counter
        self._estimate_usd_micros = estimate_usd_micros
        self._reserve_completion_tokens = reserve_completion_tokens

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in (_COMPLETE, _STREAM):
            return handler
        caller = current_caller.get()
        subjects = [(f"key:{caller.name}", caller.key.limits)] if caller and caller.key.limits.any_set() else []
        if self._gateway is not None:
            subjects.append((GATEWAY, self._gateway))
        if not subjects:
            return handler
        if method == _STREAM:
            return grpc.unary_stream_rpc_method_handler(
                self._limited_stream(handler.unary_stream, subjects),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._limited_unary(handler.unary_unary, subjects),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _limited_unary(self, behavior: Any, subjects: list[tuple[str, Limits]]) -> Any:
        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            reservation = await self._admit(request, subjects, context, stream=False)
            meter = open_meter()
            try:
                return await behavior(request, context)
            finally:
                await self._limiter.settle(reservation, meter.tokens, meter.usd_micros)

        return limited

    def _limited_stream(self, behavior: Any, subjects: list[tuple[str, Limits]]) -> Any:
        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            reservation = await self._admit(request, subjects, context, stream=True)
            meter = open_meter()
            try:
                async for answer in behavior(request, context):
                    yield answer
            finally:
                await self._limiter.settle(reservation, meter.tokens, meter.usd_micros)

        return limited

    async def _admit(
        self,
        request: pb.CompleteRequest | pb.StreamCompleteRequest,
        subjects: list[tuple[str, Limits]],
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        stream: bool,
    ) -> Reservation:
        tokens = usd_micros = 0
        if any(limits.tokens_per_minute is not None or limits.budget_usd_per_day is not None for _, limits in subjects):
            tokens, usd_micros = await self._estimate(request)
        asks = [Ask(subject, limits, tokens, usd_micros, stream) for subject, limits in subjects]
        try:
            return await self._limiter.reserve(asks)
        except LimitExceededError as error:
            await abort(context, "StreamComplete" if stream else "Complete", error)

    async def _estimate(self, request: pb.CompleteRequest | pb.StreamCompleteRequest) -> tuple[int, int]:
        """The tokens and cost to reserve: the prompt as counted offline, and the most the answer may take."""
        try:
            parsed = convert.completion_request(request)
        except InvalidRequestError:
            return 0, 0  # the servicer refuses it before any upstream is asked
        completion = parsed.options.max_tokens or self._reserve_completion_tokens
        prompt = (
            await self._counter.count_chat_async(parsed.model or "", parsed.messages, parsed.options.tools)
        ).tokens
        return prompt + completion, self._estimate_usd_micros(parsed.model, prompt, completion)
