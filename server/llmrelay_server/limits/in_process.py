"""Limits kept in this process: exact for one gateway process, and what every gateway has unless state.redis_url
names a Redis to share them through."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from llmrelay_server.domain import LimitKind, StoreHealth, StoreRole
from llmrelay_server.limits.interface import (
    STREAM_RETRY_S,
    WINDOW_S,
    Ask,
    Reservation,
    budget_usd_micros,
    refusal,
    refuse_oversized,
)


@dataclass(slots=True)
class _Window:
    """One subject's use: requests and tokens of the last minute, streams open, spend per UTC day."""

    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[list[float]] = field(default_factory=collections.deque)
    """[time, tokens, counted] entries (monotonic time; counted: 1 until the entry leaves the window, then 0);
    settle() corrects the tokens of an entry still counted, in place."""
    token_sum: float = 0
    streams: int = 0
    spend: dict[int, int] = field(default_factory=dict)
    """UTC day number -> micro-USD."""
    held: dict[int, int] = field(default_factory=dict)
    """UTC day number -> micro-USD of that day's spend that calls in progress reserved: theirs until they settle."""

    def expire(self, now: float, day: int) -> None:
        """Takes out what has left the minute before `now` (the monotonic clock), and the spend of days before
        yesterday (`day`: today, UTC)."""
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            gone = self.tokens.popleft()
            self.token_sum -= gone[1]
            gone[2] = 0
        if len(self.spend) > 2:  # today's, and yesterday's for calls that began before midnight and settle after
            for old in [old for old in self.spend if old < day - 1]:
                del self.spend[old]


class InProcessLimiter:
    """Limits kept in this process. Exact under any number of concurrent calls: reserve() never awaits, so on one
    event loop no other call can come between its checks and its updates.

    The minute's windows run on the monotonic clock, the budget's UTC day on the wall clock (`clock`): a wall clock
    stepped back (NTP, a resumed VM) would otherwise keep entries in a window, or take them out twice."""

    calls_while_unavailable: Final = 0
    """The process's memory is never out of reach."""

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._windows: dict[str, _Window] = {}

    async def start(self) -> None:
        """Nothing to open: the state is this object's."""

    async def spend_at_least(self, spent: Mapping[str, int], day: int) -> None:
        if day != _utc_day(self._clock()):
            return
        for subject, usd_micros in spent.items():
            window = self._window(subject)
            # The ledger's spend is of calls billed: set against what this counts of those, not of the calls still
            # running, whose reservations it holds beside (taking the larger of it and all of this, a call in
            # progress when a reload gave its key a budget lost the ledger's spend when it settled).
            held = window.held.get(day, 0)
            window.spend[day] = max(window.spend.get(day, 0) - held, usd_micros) + held

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        refuse_oversized(asks)
        wall, now = self._clock(), self._monotonic()
        day = _utc_day(wall)
        windows = [self._window(ask.subject) for ask in asks]
        for ask, window in zip(asks, windows, strict=True):
            window.expire(now, day)
            _check(ask, window, now, wall, day)
        reservation = Reservation(asks, wall)
        for ask, window in zip(asks, windows, strict=True):
            window.requests.append(now)
            entry = [now, float(ask.tokens), 1]
            window.tokens.append(entry)
            window.token_sum += ask.tokens
            window.streams += ask.stream
            window.spend[day] = window.spend.get(day, 0) + ask.usd_micros
            window.held[day] = window.held.get(day, 0) + ask.usd_micros
            reservation.holds.append(entry)
        return reservation

    def _window(self, subject: str) -> _Window:
        window = self._windows.get(subject)
        if window is None:  # not setdefault: it would make a window for every call to throw away
            window = self._windows[subject] = _Window()
        return window

    async def settle(self, reservation: Reservation, tokens: int, usd_micros: int) -> None:
        # Its reservation taken back from the day it was made, what it was billed counted on the day it is billed, as
        # the ledger records it: a call running past midnight is the new day's spend (a restart reads it so).
        day, billed_on = _utc_day(reservation.at), _utc_day(self._clock())
        for ask, entry in zip(reservation.asks, reservation.holds, strict=True):
            window = self._windows[ask.subject]
            if entry[2]:  # still counted this minute
                window.token_sum += tokens - entry[1]
                entry[1] = tokens
            window.streams -= ask.stream
            window.spend[day] = window.spend.get(day, 0) - ask.usd_micros
            window.spend[billed_on] = window.spend.get(billed_on, 0) + usd_micros
            if held := window.held.get(day, 0) - ask.usd_micros:
                window.held[day] = held
            else:
                window.held.pop(day, None)

    def health(self) -> StoreHealth:
        return StoreHealth(StoreRole.LIMITS, "in_process", available=True)

    async def aclose(self) -> None:
        """Nothing to close: the state goes with this object."""


def _check(ask: Ask, window: _Window, now: float, wall: float, day: int) -> None:
    """`now` on the windows' (monotonic) clock, `wall` the time of day, `day` its UTC day (`_utc_day(wall)`)."""
    limits = ask.limits
    if limits.requests_per_minute is not None and len(window.requests) + 1 > limits.requests_per_minute:
        wait = window.requests[0] + WINDOW_S - now if window.requests else WINDOW_S
        raise refusal(LimitKind.REQUESTS_PER_MINUTE, ask, wait)
    if limits.tokens_per_minute is not None and window.token_sum + ask.tokens > limits.tokens_per_minute:
        wait = _tokens_free_in(window, ask.tokens, limits.tokens_per_minute, now)
        raise refusal(LimitKind.TOKENS_PER_MINUTE, ask, wait)
    if ask.stream and limits.concurrent_streams is not None and window.streams + 1 > limits.concurrent_streams:
        raise refusal(LimitKind.CONCURRENT_STREAMS, ask, STREAM_RETRY_S)
    # A call that costs nothing is admitted even past the budget: a call may cost more than it reserved (an answer
    # past max_tokens), and a budget spent so must not shut a key's free models (a local backend's) until midnight.
    if (
        ask.usd_micros
        and (budget := budget_usd_micros(limits)) is not None
        and (spent := window.spend.get(day, 0)) + ask.usd_micros > budget
    ):
        # Room that calls in progress hold may free when one settles, below what it reserved: not only at midnight.
        held = spent - window.held.get(day, 0) + ask.usd_micros <= budget
        until_midnight = _until_next_day(wall)
        raise refusal(LimitKind.BUDGET_PER_DAY, ask, min(STREAM_RETRY_S, until_midnight) if held else until_midnight)


def _tokens_free_in(window: _Window, wanted: int, limit: int, now: float) -> float:
    """How long until the tokens of the last minute leave room for `wanted`: at the latest when the last of them
    leaves, as `wanted` is at most `limit` (refuse_oversized turned larger asks away)."""
    used, at = window.token_sum, now - WINDOW_S
    for entry in window.tokens:
        if used + wanted <= limit:
            break
        at, used = entry[0], used - entry[1]
    return max(0.0, at + WINDOW_S - now)


def _utc_day(moment: float) -> int:
    return int(moment // 86_400)


def _until_next_day(now: float) -> float:
    return (_utc_day(now) + 1) * 86_400 - now
