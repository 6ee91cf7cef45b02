"""What the call in progress did, as the router saw it: what it billed, which attempts it made, how soon the first
chunk came. The router writes it where it bills the ledger and records attempts; the interceptors read it when the
call ends (limits settle with what was billed, metrics count attempts, tokens and the gateway's own time).

A context variable, like a trace context: the layers that bill need not know who listens, and a call that nobody
meters pays one lookup.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llmrelay_server.domain import Attempt, AttemptOutcome, TokenUsage, immutable


@immutable
class Billed:
    backend: str
    model: str
    caller: str
    usage: TokenUsage


@dataclass(slots=True)
class Meter:
    tokens: int = 0
    """Prompt plus completion tokens billed."""
    usd_micros: int = 0
    billed: list[Billed] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    """Every attempt of the call, as the router records them (the router's own list, so it is always current)."""
    waited_s: float = 0.0
    """The time the router waited between attempts (a retry's backoff, an upstream's Retry-After): no upstream's, and
    not the gateway's own either."""
    counted_s: float = 0.0
    """The time backends took to count the call's tokens by their own tokenizers (llama.cpp's and vLLM's /tokenize,
    Anthropic's count endpoint): an upstream's, as an attempt's is."""
    first_chunk_at: float | None = None
    """When (time.perf_counter()) the stream's first chunk from an upstream came: its observers tell the time to it
    from the call's start as each saw it, before the interceptors' own work (admission, the prompt's count)."""
    first_chunk_routed_s: float | None = None
    """The time to that chunk from the router's start: its upstreams' share (the attempts until then, their retries and
    fallbacks), not the gateway's admission."""
    first_chunk_backend: str | None = None
    """The backend that sent that chunk: after a restart, not the one that finished the answer."""
    caller: str | None = None
    """Who the call bills, once the servicer has read it from the call (`auth.caller_identity`)."""
    upstream_headers: dict[str, str] = field(default_factory=dict)
    """Headers every upstream request of the call carries (a trace context's traceparent)."""
    requests_sent: int = 0
    """The requests the call has written to an upstream (its model requests, and a count's): an attempt the call ended
    under before its answer had its prompt read only if one was written during it (a call cancelled while its
    connection was still being made had not)."""
    requests_begun: int = 0
    """The requests of the call that left their pool's line for a connection (connecting to the upstream, or sent): an
    attempt that ended with none begun waited behind the gateway's own bound on connections, the upstream not asked."""
    request_id: str | None = None
    """The call's request id, once the call log has given it one: its span carries it too."""
    trace_id: str | None = None
    """The call's trace (32 hex digits), once traced: its log line carries it too, so the two are found together."""


current_meter: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("llmrelay_meter", default=None)


def open_meter() -> Meter:
    """The call's meter: the one an outer interceptor opened, or a new one."""
    meter = current_meter.get()
    if meter is None:
        meter = Meter()
        current_meter.set(meter)
    return meter


def charge(backend: str, model: str, caller: str, usage: TokenUsage) -> None:
    """Adds billed usage to the call's meter, if the call has one."""
    meter = current_meter.get()
    if meter is not None:
        meter.tokens += usage.total_tokens
        if usage.cost is not None:
            meter.usd_micros += usage.cost.usd_micros
        meter.billed.append(Billed(backend, model, caller, usage))


def attempts(recorded: list[Attempt]) -> None:
    """The call's attempts are this list (the router's, appended to as it goes)."""
    meter = current_meter.get()
    if meter is not None:
        meter.attempts = recorded


def upstream_headers() -> dict[str, str] | None:
    """The headers the call's upstream requests must carry, if any."""
    meter = current_meter.get()
    return meter.upstream_headers if meter is not None and meter.upstream_headers else None


def request_sent() -> None:
    """A request of the call has been written to its upstream, which may read its prompt from now on."""
    meter = current_meter.get()
    if meter is not None:
        meter.requests_sent += 1


def request_begun() -> None:
    """A request of the call has a connection to its upstream, or is making one: it waits in no line of the pool's."""
    meter = current_meter.get()
    if meter is not None:
        meter.requests_begun += 1


def requests_begun() -> int | None:
    """How many requests of the call have left their pool's line; None when nobody meters it."""
    meter = current_meter.get()
    return None if meter is None else meter.requests_begun


def requests_sent() -> int | None:
    """How many requests the call has written to an upstream so far; None when nobody meters it (and so nobody
    knows)."""
    meter = current_meter.get()
    return None if meter is None else meter.requests_sent


def waited(seconds: float) -> None:
    """The router waited `seconds` before another attempt."""
    meter = current_meter.get()
    if meter is not None:
        meter.waited_s += seconds


def counted(seconds: float) -> None:
    """A backend took `seconds` to count tokens for the call."""
    meter = current_meter.get()
    if meter is not None:
        meter.counted_s += seconds


def first_chunk(at: float, routed_s: float, backend: str) -> None:
    """The first chunk the caller gets came at `at` (time.perf_counter()), `routed_s` after the router began, from
    `backend`: later ones (a restart's) are not its first."""
    meter = current_meter.get()
    if meter is not None and meter.first_chunk_at is None:
        meter.first_chunk_at, meter.first_chunk_routed_s, meter.first_chunk_backend = at, routed_s, backend


def own_time_s(meter: Meter, elapsed_s: float) -> float:
    """The gateway's own share of a call that took `elapsed_s`: less its attempts' time and its backends' counts (the
    upstreams') and the router's waits between attempts."""
    upstream_s = 0.0
    for attempt in meter.attempts:  # a loop, not sum() over a generator: every call with metrics or a log line runs it
        if attempt.outcome is not AttemptOutcome.SKIPPED:
            upstream_s += attempt.duration_s
    return max(0.0, elapsed_s - upstream_s - meter.counted_s - meter.waited_s)


def served_by(meter: Meter) -> Attempt | Billed | None:
    """Who served the call, by backend and model: its last attempt that succeeded, by the answer it billed (which
    names the model that answered: an upstream's dated snapshot, where the attempt has the model asked for); else, for
    a stream cut short (its caller left, or it broke), whoever billed what it had consumed."""
    last_billed = meter.billed[-1] if meter.billed else None
    for attempt in reversed(meter.attempts):
        if attempt.outcome is AttemptOutcome.SUCCEEDED:
            return last_billed if last_billed is not None and last_billed.backend == attempt.backend else attempt
    return last_billed


def moves(attempts: Sequence[Attempt]) -> Iterator[tuple[int, Attempt, Attempt]]:
    """Each attempt (by its index) with the one the call moved on to after it: the next attempt, passing over a retry
    of the same backend that its circuit skipped (opened by the failure, or by another call meanwhile), which never
    ran: the call moved on from there to the next backend, a fallback, not a retry."""
    for index, before in enumerate(attempts):
        for after in attempts[index + 1 :]:
            if after.outcome is not AttemptOutcome.SKIPPED or after.backend != before.backend:
                yield index, before, after
                break
