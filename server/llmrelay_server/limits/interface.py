"""What every limiter shares: a call's asks, the reservation it gets, the `Limiter` protocol, and the refusals'
words, so that a caller reads the same refusal whichever limiter counted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmrelay_server.config import Limits
from llmrelay_server.domain import LimitExceededError, LimitKind, StoreHealth

WINDOW_S = 60.0
GATEWAY = "gateway"
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
    """The limiter's own handles on what it reserved, for settle(); none when nothing was counted."""


class Limiter(Protocol):
    async def start(self) -> None:
        """Opens what the limiter keeps its state in; a store it cannot reach yet does not stop the gateway."""
        ...

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        """Reserves every ask, or none and raises LimitExceededError for the first limit one would pass."""
        ...

    async def settle(self, reservation: Reservation, tokens: int, usd_micros: int) -> None:
        """The call ended having been billed this much: the reservation becomes that, and its stream slot frees."""
        ...

    def health(self) -> StoreHealth: ...

    @property
    def calls_while_unavailable(self) -> int:
        """Calls admitted uncounted, or refused (state.on_unavailable), because the store could not be reached."""
        ...

    async def aclose(self) -> None: ...


def budget_usd_micros(limits: Limits) -> int | None:
    """The daily budget in micro-USD, the integer unit spend is counted in."""
    budget = limits.budget_usd_per_day
    return None if budget is None else round(budget * 1_000_000)


def refusal(kind: LimitKind, ask: Ask, retry_after_s: float) -> LimitExceededError:
    """The error for the ask's limit of this kind."""
    limits = ask.limits
    match kind:
        case LimitKind.REQUESTS_PER_MINUTE:
            description = f"{limits.requests_per_minute} requests per minute"
        case LimitKind.TOKENS_PER_MINUTE:
            description = f"{limits.tokens_per_minute} tokens per minute; this request reserves {ask.tokens}"
        case LimitKind.CONCURRENT_STREAMS:
            description = f"{limits.concurrent_streams} streams at once"
        case LimitKind.BUDGET_PER_DAY:
            description = f"a budget of {limits.budget_usd_per_day:g} USD per day (UTC) is spent"
    return LimitExceededError(kind, ask.subject, description, retry_after_s)
