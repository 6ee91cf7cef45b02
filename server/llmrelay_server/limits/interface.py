"""What every limiter shares: a call's asks, the reservation it gets, the `Limiter` protocol, and the refusals'
words, so that a caller reads the same refusal whichever limiter counted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmrelay_server.config import Limits
from llmrelay_server.domain import LimitExceededError, LimitKind, StoreHealth, immutable

WINDOW_S = 60.0
GATEWAY = "gateway"


def key_subject(name: str) -> str:
    """The subject whose limits are a key's (by its name, as the ledger bills its calls)."""
    return f"key:{name}"


# A stream slot, or budget that calls in progress reserved, frees when one of them ends, which nobody can foresee: try
# again in about this long.
STREAM_RETRY_S = 1.0


@immutable
class Ask:
    """What one call asks of one subject's limits."""

    subject: str
    """Whose limits: "key:NAME", or "gateway"."""
    limits: Limits
    tokens: int
    usd_micros: int
    stream: bool
    answer_tokens: int = 0
    """Of `tokens`, those reserved for the answer (the request's max_tokens, or server.reserve_completion_tokens);
    the rest are the prompt's. 0 for an embedding, which answers with no tokens."""
    answers: int = 1
    """How many answers `tokens` are for: a stream that starts over on its next route when broken reserves one on
    each of its routes, each its prompt and its max_tokens."""


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

    async def spend_at_least(self, spent: Mapping[str, int], day: int) -> None:
        """Counts the spend of each subject on `day` (UTC, in days since the epoch) as at least so many micro-USD: the
        ledger's, for spend the limiter did not count (made before the process started, or while a key had no
        budget). Never less than it counts already, so the same spend given twice (each of several workers, each of
        their reloads) counts once. The ledger's is of calls billed: it is set against what the limiter counts of
        those, beside the reservations of calls in progress, which stay theirs until they settle. Spend of a day
        that is over by the limiter's clock counts for nothing: read just before midnight, it was the next day's."""
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


def refuse_oversized(asks: Sequence[Ask]) -> None:
    """Raises the refusal of the first ask that alone reserves more tokens per minute or more of the daily budget
    than its limit allows. Such a call could never be admitted, whatever was spent and however long it waited, so it
    is refused before (and apart from) the count: with what to change in it, and no time to retry in."""
    for ask in asks:
        tokens_per_minute = ask.limits.tokens_per_minute
        if tokens_per_minute is not None and ask.tokens > tokens_per_minute:
            description = (
                f"{tokens_per_minute} tokens per minute, and this request alone reserves {ask.tokens} tokens"
                f" ({_breakdown(ask)}), so no retry can admit it; {_remedy(ask, tokens_per_minute)}"
            )
            raise LimitExceededError(LimitKind.TOKENS_PER_MINUTE, ask.subject, description, None)
        # A call that costs nothing fits any budget: the budget is not even read then.
        if ask.usd_micros and (budget := budget_usd_micros(ask.limits)) is not None and ask.usd_micros > budget:
            description = (
                f"a budget of {ask.limits.budget_usd_per_day:g} USD per day (UTC), and this request alone reserves"
                f" {ask.usd_micros / 1_000_000:g} USD for {ask.tokens} tokens ({_breakdown(ask)}), so no retry can"
                f" admit it; {_remedy(ask, None)}"
            )
            raise LimitExceededError(LimitKind.BUDGET_PER_DAY, ask.subject, description, None)


def _breakdown(ask: Ask) -> str:
    """What the reserved tokens are made of."""
    if not ask.answer_tokens:
        return "its inputs"
    prompt, answer = (ask.tokens - ask.answer_tokens) // ask.answers, ask.answer_tokens // ask.answers
    made_of = (
        f"{prompt} of prompt + {answer} for the answer: its max_tokens, or the gateway's reserve_completion_tokens"
        " when it sets none"
    )
    if ask.answers == 1:
        return made_of
    return f"{ask.answers} answers, one on each route it may start over on when broken, each {made_of}"


def _remedy(ask: Ask, tokens_per_minute: int | None) -> str:
    """What to change in the request for it to fit: with a tokens-per-minute limit, the largest max_tokens that does."""
    if not ask.answer_tokens:
        return "send fewer or shorter inputs"
    prompt = (ask.tokens - ask.answer_tokens) // ask.answers
    # A stream that starts over on its next route reserves an answer on each: one answer is what the rest reserve.
    or_one = ", or ask for no restart (on_interrupt) or for the model exactly (exact_model)" if ask.answers > 1 else ""
    if tokens_per_minute is None:
        # Not `or_one`: what the other routes add to a budget may be nothing (a free local model).
        return "set a lower max_tokens, or shorten the prompt"
    if prompt >= tokens_per_minute // ask.answers:
        return f"shorten the prompt{or_one}"
    return f"set max_tokens to at most {tokens_per_minute // ask.answers - prompt}, or shorten the prompt{or_one}"


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
            budget = f"a budget of {limits.budget_usd_per_day:g} USD per day (UTC)"
            description = f"{budget} is spent, or reserved by calls in progress"
    return LimitExceededError(kind, ask.subject, description, retry_after_s)
