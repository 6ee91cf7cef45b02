"""What answers cost: a table of USD per million tokens by model pattern, and the exact micro-dollar arithmetic.

A model on a backend is priced by the first of these that knows it:

1. the operator's `pricing` (config), its most specific pattern that matches;
2. free, on a local backend (kinds ollama, llamacpp, vllm): its tokens cost the machine, not a bill per token;
3. the shipped table of OpenAI's list prices (OPENAI_PRICES), its most specific pattern that matches;
4. the configured `unknown_price`, flagged price_unknown: a paid backend's model whose price nobody told the gateway
   still costs something, and budgets must count it.

Patterns are shell globs (`*`, `?`, `[...]`), matched case-sensitively against the model name and against
"backend/model" (so "ollama/*" and "openai/gpt-4o" work); not against a model's name that reads as another backend's
"backend/model" (backend "paid" asked for a model named "ollama/tiny" is priced as paid's, never as ollama's). The
most specific pattern wins: a plain name over any glob, then the glob with more literal characters, then the one
written first; so "gpt-4o-mini-2024-07-18" is priced by "gpt-4o-mini-*" rather than "gpt-4o-*". In either table a
plain name prices its dated snapshots too (a date after it: "gpt-4o-2024-08-06", "gpt-4-0613"), as OpenAI's answers
name the snapshot that served, and as a plain name: over any glob ("o3" prices "o3-2025-04-16" where "openai/*" is
written too), below the snapshot's own name. An answer that names a model other than the one asked for is priced as
the model it names where a price is known for it, else as the one asked for, the operator's prices before the shipped
ones (`PriceTable.answer_rate`); so a request reserves at the dearest of its model's price and those of its dated
snapshots priced apart (`PriceTable.rate`).

Prices are taken as the decimals they are written as (0.15 is 15/100, not the float nearest to it) and a cost is
computed exactly in fractions of a micro-dollar, then rounded once, up, to whole micro-dollars: never below the exact
cost, so that no answer with a price is free (a 24-token embedding at 0.02 USD a million tokens, 0.48 micro-dollars,
rounded half up to 0, passed a spent budget, as a free call does, and was billed nothing).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

from llmrelay_server.config import Price
from llmrelay_server.domain import BackendSpec, Cost, TokenUsage

__all__ = ["LOCAL_KINDS", "OPENAI_PRICES", "PriceTable", "Rate"]

LOCAL_KINDS: Final = frozenset({"ollama", "llamacpp", "vllm"})
"""Backend kinds whose tokens are free unless `pricing` says otherwise; every other kind is paid."""

# USD per million tokens (prompt, completion, cached prompt), as published by OpenAI (openai.com/api/pricing) for
# the standard tier, figures as of August 2025. They were written down from knowledge of that page, not fetched
# when this table was made (the build has no network): check them against the page, and correct or extend them
# with `pricing:` in the configuration, which wins over this table.
_OPENAI_LIST: Final[Mapping[str, Price]] = {
    "gpt-5": Price(prompt=1.25, completion=10.0, cached_prompt=0.125),
    "gpt-5-mini": Price(prompt=0.25, completion=2.0, cached_prompt=0.025),
    "gpt-5-nano": Price(prompt=0.05, completion=0.4, cached_prompt=0.005),
    "gpt-5-chat-latest": Price(prompt=1.25, completion=10.0, cached_prompt=0.125),
    "gpt-4.1": Price(prompt=2.0, completion=8.0, cached_prompt=0.5),
    "gpt-4.1-mini": Price(prompt=0.4, completion=1.6, cached_prompt=0.1),
    "gpt-4.1-nano": Price(prompt=0.1, completion=0.4, cached_prompt=0.025),
    "gpt-4o": Price(prompt=2.5, completion=10.0, cached_prompt=1.25),
    "gpt-4o-mini": Price(prompt=0.15, completion=0.6, cached_prompt=0.075),
    "chatgpt-4o-latest": Price(prompt=5.0, completion=15.0),
    "o1": Price(prompt=15.0, completion=60.0, cached_prompt=7.5),
    "o1-mini": Price(prompt=1.1, completion=4.4, cached_prompt=0.55),
    "o1-pro": Price(prompt=150.0, completion=600.0),
    "o3": Price(prompt=2.0, completion=8.0, cached_prompt=0.5),
    "o3-mini": Price(prompt=1.1, completion=4.4, cached_prompt=0.55),
    "o3-pro": Price(prompt=20.0, completion=80.0),
    "o4-mini": Price(prompt=1.1, completion=4.4, cached_prompt=0.275),
    "gpt-4-turbo": Price(prompt=10.0, completion=30.0),
    "gpt-4": Price(prompt=30.0, completion=60.0),
    "gpt-3.5-turbo": Price(prompt=0.5, completion=1.5),
    # Embedding models: their inputs are prompt tokens, and they complete nothing.
    "text-embedding-3-small": Price(prompt=0.02, completion=0.0),
    "text-embedding-3-large": Price(prompt=0.13, completion=0.0),
    "text-embedding-ada-002": Price(prompt=0.1, completion=0.0),
}
# OpenAI's answers name the dated snapshot that served ("gpt-4o-2024-08-06" for "gpt-4o"), older models in the short
# form ("gpt-4-0613"); Anthropic's write the date without dashes ("claude-sonnet-4-5-20250929"). Only a date is
# matched after the name, so that variants with other prices ("gpt-4o-realtime-preview", "o3-deep-research") are not
# priced as their base model but as unknown.
_DATE_SUFFIX: Final = re.compile(r"-(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8}|[0-9]{4})\Z")
"""The dates that end a snapshot's name."""


def undated(model: str) -> str:
    """The model a dated snapshot's name is of ("gpt-4o" for "gpt-4o-2024-08-06"); any other name as it is."""
    return _DATE_SUFFIX.sub("", model)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


OPENAI_PRICES: Final[Mapping[str, Price]] = {
    **_OPENAI_LIST,
    # The first gpt-4o snapshot kept its launch price.
    "gpt-4o-2024-05-13": Price(prompt=5.0, completion=15.0),
}


def _exact(usd_per_million: float) -> Fraction:
    # The shortest repr of a float is the decimal it was written as in the YAML or above.
    return Fraction(repr(usd_per_million))


@dataclass(frozen=True, slots=True)
class Rate:
    """The prices of one model on one backend. USD per million tokens is micro-USD per token, so the fields are both."""

    prompt: Fraction
    completion: Fraction
    cached_prompt: Fraction
    cache_write_prompt: Fraction
    unknown: bool = False
    """No price is known for the model on a paid backend: these are the configured default rate's."""
    # The prices as integers over one denominator, so that an answer's cost is exact in integer arithmetic (Fraction
    # arithmetic took 8 us of every call).
    _scale: int = field(init=False, repr=False, compare=False)
    _prompt: int = field(init=False, repr=False, compare=False)
    _completion: int = field(init=False, repr=False, compare=False)
    _cached_prompt: int = field(init=False, repr=False, compare=False)
    _cache_write_prompt: int = field(init=False, repr=False, compare=False)
    _most_prompt: int = field(init=False, repr=False, compare=False)
    """The dearer of the prompt's rates, for an estimate: a prompt may be written to the cache whole."""

    def __post_init__(self) -> None:
        prices = ("prompt", "completion", "cached_prompt", "cache_write_prompt")
        scale = math.lcm(*(getattr(self, name).denominator for name in prices))
        object.__setattr__(self, "_scale", scale)
        for name in prices:
            object.__setattr__(self, f"_{name}", int(getattr(self, name) * scale))
        object.__setattr__(self, "_most_prompt", max(self._prompt, self._cache_write_prompt))

    @classmethod
    def of(cls, price: Price, *, unknown: bool = False) -> Rate:
        prompt = _exact(price.prompt)
        return cls(
            prompt=prompt,
            completion=_exact(price.completion),
            cached_prompt=prompt if price.cached_prompt is None else _exact(price.cached_prompt),
            cache_write_prompt=prompt if price.cache_write_prompt is None else _exact(price.cache_write_prompt),
            unknown=unknown,
        )

    def cost(self, usage: TokenUsage) -> Cost:
        """One answer's (or one attempt's) cost: cached prompt tokens at the cached rate, those written to the cache at
        the cache-write rate, the rest of the prompt at the prompt rate; estimated when the tokens were, or the price is
        unknown."""
        # An upstream reporting more cached tokens than prompt tokens is wrong; bill no prompt token twice or below 0.
        cached = min(usage.cached_prompt_tokens or 0, usage.prompt_tokens)
        written = min(usage.cache_write_prompt_tokens or 0, usage.prompt_tokens - cached)
        micros = (
            cached * self._cached_prompt
            + written * self._cache_write_prompt
            + (usage.prompt_tokens - cached - written) * self._prompt
            + usage.completion_tokens * self._completion
        )
        return Cost(
            usd_micros=self._round_up(micros),
            estimated=usage.estimated or self.unknown,
            price_unknown=self.unknown,
        )

    def estimate_usd_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most a request may cost before it runs (no cache read assumed, and every prompt token at the dearer of
        the prompt and cache-write rates), e.g. to reserve against a budget."""
        return self._round_up(prompt_tokens * self._most_prompt + completion_tokens * self._completion)

    def _round_up(self, scaled_micros: int) -> int:
        """micro-USD times _scale, rounded up to whole micro-USD: ceil(x / scale), in integers."""
        return -(-scaled_micros // self._scale)


FREE: Final = Rate(
    prompt=Fraction(0), completion=Fraction(0), cached_prompt=Fraction(0), cache_write_prompt=Fraction(0)
)


@functools.lru_cache(maxsize=256)
def _dearest(rates: tuple[Rate, ...]) -> Rate:
    """A rate at least as dear as each of `rates`, price by price (the first's `unknown`): a bound on any one's cost."""
    first = rates[0]
    return Rate(
        prompt=max(rate.prompt for rate in rates),
        completion=max(rate.completion for rate in rates),
        cached_prompt=max(rate.cached_prompt for rate in rates),
        cache_write_prompt=max(rate.cache_write_prompt for rate in rates),
        unknown=first.unknown,
    )


def _literals(pattern: str) -> int:
    """How many characters of a name a pattern pins down: all but its wildcards and character sets."""
    return len(re.sub(r"\[[^]]*\]|[*?]", "", pattern))


class _Patterns:
    """Rates by pattern, searched most specific first."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._plain = {pattern: Rate.of(price) for pattern, price in prices.items() if not _is_glob(pattern)}
        globs = [(pattern, Rate.of(price)) for pattern, price in prices.items() if _is_glob(pattern)]
        globs.sort(key=lambda item: -_literals(item[0]))  # a stable sort: the one written first wins a tie
        self._globs = tuple((re.compile(fnmatch.translate(pattern)), rate) for pattern, rate in globs)

    def first_match(self, names: Iterable[tuple[str, str | None]]) -> Rate | None:
        """The rate of the first of these models (`match`'s arguments each) that has one."""
        for qualified, model in names:
            if (rate := self.match(qualified, model)) is not None:
                return rate
        return None

    def match(self, qualified: str, model: str | None) -> Rate | None:
        """The rate of "backend/model" (`qualified`), or of the model's name alone where `model` is given."""
        # "backend/model" written out pins down more than the model alone.
        for name in (qualified, model):
            if name is not None and (rate := self._plain.get(name)) is not None:
                return rate
        # A plain name prices its dated snapshots as a plain name, over any glob: ranked as a glob of the date, a
        # snapshot of "o3" lost to a backend's catch-all "openai/*" (more literal characters), and an answer naming
        # "o3-2025-04-16" was billed at the catch-all's price where its request reserved at o3's.
        for name in (qualified, model):
            if name is not None and (base := undated(name)) != name and (rate := self._plain.get(base)) is not None:
                return rate
        for regex, rate in self._globs:
            if regex.match(qualified) or (model is not None and regex.match(model)):
                return rate
        return None


_SHIPPED: Final = _Patterns(OPENAI_PRICES)


class PriceTable:
    """The rate of any model on any backend: the operator's prices over the shipped ones (see the module doc)."""

    def __init__(self, overrides: Mapping[str, Price], unknown: Price, backends: Collection[str] = ()) -> None:
        """`backends`: the names of the gateway's backends, whose "name/..." a model's name alone is not priced as."""
        # An operator's "gpt-4o" prices the snapshot that answers ("gpt-4o-2024-08-06") too, as the shipped table's
        # does: else every answer that names its snapshot would be billed at the list price (or as unknown), and
        # settle at another figure than its budget reserved at the request's model's price.
        self._overrides = _Patterns(overrides)
        self._unknown = Rate.of(unknown, unknown=True)
        self._backends = frozenset(backends)
        self._snapshots: dict[str, list[str]] = {}
        """A model -> its dated snapshots that a price of their own is written for (the shipped gpt-4o-2024-05-13),
        which an answer to a request for it may name (`rate`)."""
        for name in (*OPENAI_PRICES, *overrides):
            qualifier, slash, rest = name.partition("/")
            snapshot = rest if slash and qualifier in self._backends else name
            if not _is_glob(snapshot) and (model := undated(snapshot)) != snapshot:
                self._snapshots.setdefault(model, []).append(snapshot)
        # Every answer asks; the answer only changes with the configuration. Bounded, as callers may name any model
        # on a backend ("openai/anything").
        self._lookup = functools.lru_cache(maxsize=1024)(self._find)

    def rate(self, spec: BackendSpec, model: str) -> Rate:
        """What a request for `model` on the backend reserves at: its rate, or, where a dated snapshot of it has a
        price of its own, each price the dearest of its and the snapshots' as `answer_rate` prices an answer that names
        them. An answer names the snapshot that served and is billed at its price ("gpt-4o-2024-05-13" costs twice
        what "gpt-4o" does): reserved at the model's own, callers sharing a budget spent past it between them."""
        own = self.answer_rate(spec, model, model)
        snapshots = self._snapshots.get(model)
        if snapshots is None:  # most models: one look
            return own
        return _dearest((own, *(self.answer_rate(spec, model, snapshot) for snapshot in snapshots)))

    def answer_rate(self, spec: BackendSpec, asked: str, answered: str) -> Rate:
        """The rate of an answer to a request for `asked` that names `answered` (an upstream names the snapshot that
        served, or a name of its own for a deployment): `answered`'s where a price is known for it, else `asked`'s,
        the operator's prices before the shipped ones. An Azure deployment the operator priced as "prod-4o" that
        answers as "gpt-4o-2024-08-06" costs the operator's price, not the shipped gpt-4o's; "gpt-test" answered as
        "gpt-test-latest" costs gpt-test's, not the unknown price; a snapshot priced apart costs its own."""
        asked_configured = self._configured(spec, asked)
        answered_configured = asked_configured if answered == asked else self._configured(spec, answered)
        return self._lookup(spec.name, spec.kind, asked, answered, (asked_configured, answered_configured))

    @staticmethod
    def _configured(spec: BackendSpec, model: str) -> bool:
        # A model the backend is configured with is its own whatever its name: vLLM's "openai/gpt-oss-20b" beside a
        # backend named openai.
        return model == spec.default_model or model in spec.models

    def _find(self, backend: str, kind: str, asked: str, answered: str, configured: tuple[bool, bool]) -> Rate:
        asked_names = self._names(backend, asked, configured[0])
        answered_names = self._names(backend, answered, configured[1])
        names = (answered_names, asked_names)
        if (rate := self._overrides.first_match(names)) is not None:
            return rate
        if kind in LOCAL_KINDS:
            return FREE
        rate = _SHIPPED.first_match(names)
        return self._unknown if rate is None else rate

    def _names(self, backend: str, model: str, configured: bool) -> tuple[str, str | None]:
        """The names a model is priced by: "backend/model", and its name alone unless that reads as another
        backend's "backend/model"."""
        qualifier, slash, _ = model.partition("/")
        return f"{backend}/{model}", None if slash and qualifier in self._backends and not configured else model
