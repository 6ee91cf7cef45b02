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
- Each attempt has its own limits inside the deadline: connect, first chunk (or answer), between chunks.
- A stream falls back only before its first chunk is sent; after that a failure ends it with StreamInterruptedError,
  or, when the caller asked for it, starts the answer over on the next route after a restart marker.
- An embedding request never goes to another model (vectors of different models cannot be compared): its routes are
  the backends that serve its one model, in routing order, each with the same retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import math
import random
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any, Final, TypeAlias, TypeVar
from urllib.parse import urlsplit

from llmrelay_server import metering
from llmrelay_server.config import DEFAULT_OPENAI_BASE_URL, CircuitConfig, ConfigError, RetryConfig, RouterConfig
from llmrelay_server.domain import (
    AllBackendsFailedError,
    Attempt,
    AttemptOutcome,
    BackendHealth,
    CallEstimate,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeadlineExceededError,
    EmbeddingProvider,
    EmbeddingRequest,
    EmbeddingResponse,
    LLMProvider,
    Message,
    ModelFilter,
    ModelNotAllowedError,
    ModelNotFoundError,
    ResponseFormat,
    StreamInterruptedError,
    StreamLimits,
    StreamRestart,
    TokenCount,
    TokenizerUnavailableError,
    TokenUsage,
    Tool,
    UpstreamError,
    UpstreamErrorKind,
    immutable,
    without_quotes,
)
from llmrelay_server.pricing import PriceTable
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.usage import UsageLedger

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset(
    {
        UpstreamErrorKind.UNREACHABLE,
        UpstreamErrorKind.TIMEOUT,
        UpstreamErrorKind.RATE_LIMITED,
        UpstreamErrorKind.SERVER_ERROR,
    }
)
# Failures that say nothing about the backend's health, so they do not trip its circuit: a caller's prompt or inputs
# too long for the model among them, or one caller's mistake would shut the backend for every other.
NOT_THE_BACKENDS_FAULT = frozenset(
    {
        UpstreamErrorKind.REJECTED,
        UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        UpstreamErrorKind.MODEL_NOT_FOUND,
        UpstreamErrorKind.UNSUPPORTED,
        UpstreamErrorKind.BUSY,
    }
)
# Attempts that failed for the request itself, wherever it goes: a later route's rejection of a request that only
# such failures kept from the routes before is the caller's to mend, not that route's own limit.
THE_REQUESTS_OWN = frozenset(
    {AttemptOutcome.REJECTED, AttemptOutcome.CONTEXT_LENGTH_EXCEEDED, AttemptOutcome.MODEL_NOT_FOUND}
)
# Failures that no wait mends for the same request: a backend that failed so gives no time to try again at.
NO_WAIT_MENDS = frozenset(
    {
        UpstreamErrorKind.REJECTED,
        UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        UpstreamErrorKind.MODEL_NOT_FOUND,
        UpstreamErrorKind.UNSUPPORTED,
        UpstreamErrorKind.AUTH_FAILED,
    }
)
# Below this much time left, an attempt cannot get an answer; starting one only wastes the upstream's work.
MIN_ATTEMPT_S = 0.01
DEADLINE_MARGIN_S = 0.05
# An attempt silent this long until the caller's deadline has told something about the backend.
SILENCE_VERDICT_S = 1.0
# How long the bill of a call whose caller left waits for its backend's own count of the prompt (a model server's
# tokenizer, with the chat template the model sees), before the gateway's offline count: no caller waits for it.
LEFT_COUNT_S = 1.0
# What a call skipped while another one probes a half-open circuit is told to wait: the probe's verdict comes within
# its attempt's time, which the circuit does not know; a second paces a client's retries meanwhile.
PROBE_WAIT_S = 1.0


def timeout_rounding(remaining_s: float) -> float:
    """How much more than the caller's time left the time left as gRPC read it may be: gRPC's C-core clients (Python's
    grpcio, C++, Ruby) send it rounded up to a unit of their grpc-timeout encoding (a millisecond under 1 s, 10 ms
    under 10 s, 100 ms under 100 s, a second under 1,000 s, ...: 10.21 s goes as "10300m"), while their own timer
    fires at the deadline they keep. With a flat margin of 50 ms, a call of 10 s or more that fell on no whole second
    got the client library's bare DEADLINE_EXCEEDED."""
    return 0.001 if remaining_s < 1 else 10.0 ** (math.floor(math.log10(remaining_s)) - 2)


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
    probe: object | None = None
    """The call let through to probe the half-open circuit (its `_Chain`); None while no probe is out."""

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at >= self.config.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def retry_after_s(self) -> float:
        """How long a skipped call should wait: the cool-down left, or while a probe is out, PROBE_WAIT_S."""
        if self.opened_at is None:
            return 0.0
        left = self.opened_at + self.config.cooldown_s - self.clock()
        return left if left > 0 else PROBE_WAIT_S

    def allow(self, call: object) -> bool:
        """True when `call` may go through; in half-open state only one probe call at a time does."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and self.probe is None:
            self.probe = call
            return True
        return False

    def release(self, call: object) -> None:
        """`call` ended without a verdict on the backend (the caller left, the deadline ran out, the request was at
        fault): if it was the probe, the next call may probe instead. Another call's end leaves the probe out (one let
        through while the circuit was still closed, which outlived the cool-down)."""
        if self.probe is call:
            self.probe = None

    def record_success(self) -> None:
        self.failures, self.opened_at, self.probe = 0, None, None

    def record_answered(self) -> None:
        """A stream's first chunk: the backend answers, so the circuit closes (a probe's verdict), but its failures
        are forgiven only when the stream ends whole (`record_success`): a backend that breaks every stream part-way
        (a proxy cutting long streams, a server out of memory mid-answer) reaches the threshold as one failing at
        once does."""
        self.opened_at, self.probe = None, None

    def record_failure(self) -> None:
        self.failures += 1
        if self.probe is not None or self.failures >= self.config.failure_threshold:
            self.opened_at = self.clock()
        self.probe = None


class Backend:
    """A provider with what the gateway has learned about it."""

    def __init__(self, provider: LLMProvider, circuit: CircuitBreaker) -> None:
        self.provider = provider
        self.circuit = circuit
        self.name = provider.spec.name
        self.last_failure: UpstreamError | None = None
        """The last failure that counted against the circuit: what a skipped attempt reports."""
        # Asked once: an isinstance against a protocol looks up each of its members.
        self.embedder = provider if isinstance(provider, EmbeddingProvider) else None
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

    def count_failure(self, error: UpstreamError) -> None:
        self.circuit.record_failure()
        # What it says, not the exception: its traceback and cause hold the frames of the failed read, the answer's
        # whole body in them (megabytes of garbage), until a full collection, which the frozen heap makes rare.
        self.last_failure = UpstreamError(
            error.kind,
            error.backend,
            error.message,
            status=error.status,
            retry_after_s=error.retry_after_s,
            quoted=error.quoted,
        )

    def serves(self, model: str) -> bool:
        return _untagged(model) in self._served

    def lists_its_default(self, models: Sequence[str]) -> bool | None:
        """Whether `models`, a probe's list, hold its default model; None where a list says nothing of what it serves
        (REMEDY_OF_AN_UNLISTED_DEFAULT): llama.cpp's server answers any name, Anthropic lists dated ids and serves
        their aliases, another OpenAI-compatible server (an `openai` backend at another base URL too) is unknown."""
        spec = self.provider.spec
        if not models or spec.kind not in REMEDY_OF_AN_UNLISTED_DEFAULT:
            return None
        if spec.kind == "openai" and urlsplit(spec.base_url).hostname != _OPENAI_HOST:
            return None  # OPENAI_BASE_URL pointed at another OpenAI-compatible server
        return _untagged(spec.default_model) in {_untagged(name) for name in models}

    def embeds(self, model: str) -> bool:
        return any(_untagged(model) == _untagged(name) for name in self.provider.spec.all_embedding_models)

    def _models_served(self) -> frozenset[str]:
        spec = self.provider.spec
        known = (spec.default_model, *spec.models, *(self._health.models if self._health else ()))
        # Ollama treats NAME and NAME:latest as one model.
        return frozenset(_untagged(name) for name in known)


KEPT_TEXT_CHARS: Final = 16_384
"""Of a stream's text, what is kept to be counted should its upstream report no usage (or the stream break); past it,
only its length, counted at the kept part's tokens per character. A long stream must not hold its whole answer in
memory for a count most upstreams make unneeded."""


class _Received:
    """The text a stream sent on, for the gateway's own count of its completion tokens, and the prompt's usage as the
    upstream reported it before the answer, if it did; and the model that answered, which a stream cut short is
    billed for, as a whole one is."""

    __slots__ = ("beyond", "kept", "model", "prompt_count", "prompt_usage", "texts")

    def __init__(self, model: str) -> None:
        self.model = model
        self.texts: list[str] = []
        self.kept = 0
        self.beyond = 0
        """Characters past KEPT_TEXT_CHARS, not kept."""
        self.prompt_usage: TokenUsage | None = None
        self.prompt_count: asyncio.Future[TokenUsage | None] | None = None
        """The gateway's own count of the prompt, begun near the deadline (_rest_of_stream) for the bill."""

    async def counted_prompt(self) -> TokenUsage | None:
        """The prompt's usage as the gateway counted it, waited for; None when it did not (or could not) count it."""
        return None if self.prompt_count is None else await self.prompt_count

    def add(self, chunk: CompletionChunk) -> None:
        if chunk.prompt_usage is not None:
            self.prompt_usage = chunk.prompt_usage
        for text in (chunk.content, chunk.reasoning, *(call.arguments for call in chunk.tool_calls)):
            if not text:
                continue
            if self.kept < KEPT_TEXT_CHARS:
                self.texts.append(text)
                self.kept += len(text)
            else:
                self.beyond += len(text)


def _let_go(error: UpstreamError) -> None:
    """Keeps of a failed attempt's error what it says: its frames emptied (those still running, the router's, aside)
    and its causes dropped. They hold what the failed read had read, up to an answer's whole body or a stream's line
    (and orjson's error the whole document), and the error outlives the attempt: the call's status keeps it, in a cycle
    with the call's context, as the chain keeps its last error with the router's frame, until a full garbage
    collection, which the frozen heap makes rare."""
    traceback.clear_frames(error.__traceback__)
    error.__cause__ = error.__context__ = None


async def _to_its_end(bill: Awaitable[object]) -> None:
    """Awaits a bill of a call that ended under it: shielded, as its count may take a thread's while, and awaited to
    its end though the call is cancelled once more meanwhile (a shutdown interrupting it), for a stopping gateway
    closes its ledger once its calls have ended."""
    billing = asyncio.ensure_future(bill)
    try:
        await asyncio.shield(billing)
    except asyncio.CancelledError:
        await billing
        raise


def _still_in_line(begun_before: int | None) -> bool:
    """Whether the attempt (of a call that had begun `begun_before` requests before it) ended while its request still
    waited in line for a connection, the pool at its bound: the upstream was not even connected to, and its silence
    says nothing of it. One connecting or sent has left the line: a connection that hangs is the upstream's. A call
    nobody meters cannot tell: not in line."""
    begun = metering.requests_begun()
    return begun is not None and begun_before is not None and begun == begun_before


def _if_sent(route: Route, sent_before: int | None) -> Route | None:
    """The route of an attempt the call ended under, if its request was written (the call had sent `sent_before`
    before it): one cancelled while it waited for a connection reached no upstream, and is not billed. A call nobody
    meters cannot tell, and is billed as though it was written."""
    sent = metering.requests_sent()
    return route if sent is None or sent_before is None or sent > sent_before else None


REMEDY_OF_AN_UNLISTED_DEFAULT: Final = {
    "openai": "check its name, and that the key's project may use it; or set the backend's `model`",
    "ollama": "pull it (`ollama pull NAME`), or set the backend's `model`",
    "vllm": "serve it under that name (vLLM's --served-model-name), or set the backend's `model`",
}
"""What to do of a default model its backend does not list, by the kinds whose list is every model they serve."""
_OPENAI_HOST: Final = urlsplit(DEFAULT_OPENAI_BASE_URL).hostname


def _untagged(model: str) -> str:
    return model.removesuffix(":latest")


# The routes resolved for the call's request before the call (the limits interceptor asks whether it is refused, and
# a budget's estimate), with the models' filter they were resolved under: the call takes them rather than resolving
# the same request again.
_estimated_routes: contextvars.ContextVar[tuple[CompletionRequest, ModelFilter | None, list[Route]] | None] = (
    contextvars.ContextVar("llmrelay_estimated_routes", default=None)
)


@immutable
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
        # The doubling stops at 2**1000, long past any max_backoff_s (a day at most): 2**1024 is past a float, and a
        # max_retries meant as "until the deadline" failed its 1025th retry INTERNAL.
        cap = min(self.config.max_backoff_s, self.config.initial_backoff_s * 2 ** min(retry, 1000))
        return float(self.rng() * cap)


@dataclass
class _Chain:
    """The bookkeeping of one call as it walks the routes."""

    deadline: float
    request: CompletionRequest | EmbeddingRequest
    """The call's request: its prompt (an embedding's inputs) is what a bill at its deadline counts."""
    attempts: list[Attempt] = field(default_factory=list)
    last_error: UpstreamError | None = None
    too_long_for: int = 0
    """The largest known context window the prompt did not fit; a backend with no larger one is not tried."""
    opened_at: float = 0.0
    """When the last successful attempt got its answer (a stream: its first chunk), by time.perf_counter()."""
    said_waits: dict[Backend, float | None] = field(default_factory=dict)
    """Each failed or skipped backend's word on when it may serve again, at its last attempt (Retry-After, an open
    circuit's cool-down); None where it said nothing. Not those whose last failure no wait mends (NO_WAIT_MENDS)."""
    causes: set[UpstreamErrorKind] = field(default_factory=set)
    """How the failed and skipped attempts failed (a skip: UNREACHABLE)."""
    failed: set[Backend] = field(default_factory=set)
    """The backends an attempt of this call failed on."""
    left: Route | None = None
    """The route of an attempt the call ended under (the caller left, its deadline) after its request was written to
    the upstream: its prompt was read all the same (`Router._bill_left`)."""
    prompt_count: tuple[str, asyncio.Future[TokenUsage | None]] | None = None
    """The prompt's (inputs') count for a model, begun near the deadline while an attempt still waited
    (`Router._count_ahead`)."""

    def drop_prompt_count(self) -> None:
        """The count begun ahead of the deadline is not needed (any more)."""
        if self.prompt_count is not None:
            self.prompt_count[1].cancel()
            self.prompt_count = None

    def may_fit(self, route: Route) -> bool:
        window = route.backend.provider.spec.context_window
        return window is None or window > self.too_long_for

    def remaining_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def record(self, route: Route, outcome: AttemptOutcome, started: float | None, error: UpstreamError | None) -> None:
        """An attempt that began at `started` (time.perf_counter()) ended now; None: a route not tried, whose backend
        was never asked (its circuit open, its context window too small)."""
        self._listed(route, outcome, started, error)
        if error is not None:
            self.last_error = error
            self.causes.add(error.kind)
            if outcome is not AttemptOutcome.SKIPPED:
                self.failed.add(route.backend)
            if error.kind in NO_WAIT_MENDS:
                self.said_waits.pop(route.backend, None)
            else:
                self.said_waits[route.backend] = error.retry_after_s

    def _listed(
        self, route: Route, outcome: AttemptOutcome, started: float | None, error: UpstreamError | None
    ) -> None:
        duration_s = 0.0 if started is None else max(0.0, time.perf_counter() - started)
        self.attempts.append(
            Attempt(
                backend=route.backend.name,
                model=route.model,
                outcome=outcome,
                duration_s=duration_s,
                upstream_status=error.status if error else None,
                error=error.message if error else "",
                started_at=None if started is None else time.time() - duration_s,
                quoted=error.quoted if error else "",
            )
        )

    def skip(self, route: Route) -> None:
        """The route's circuit is open: recorded with why, and when it may be tried again."""
        circuit = route.backend.circuit
        last = route.backend.last_failure
        # Another call's failure: the upstream's words in it may repeat that call's request.
        cause = f"; last failure: {without_quotes(last.message, (last.quoted,))}" if last is not None else ""
        wait_s = circuit.retry_after_s()
        if circuit.state is CircuitState.HALF_OPEN:
            why = "another call is probing it after repeated failures"
        else:
            why = f"its circuit is open for {wait_s:.1f} s more after repeated failures"
        # No upstream status: none answered this call (the last failure's, in its words, is an earlier call's).
        skipped = UpstreamError(
            UpstreamErrorKind.UNREACHABLE, route.backend.name, f"skipped: {why}{cause}", retry_after_s=wait_s
        )
        if route.backend in self.failed:
            # This call's own failure opened it: listed, so that the attempts say why it was not retried, but no
            # cause of its own (the failure is), and its wait stays the failure's (`_soonest_s` adds the circuit's).
            self._listed(route, AttemptOutcome.SKIPPED, None, skipped)
            return
        # A real failure before it names the problem better than the skip does.
        last_error = self.last_error
        self.record(route, AttemptOutcome.SKIPPED, None, skipped)
        self.last_error = last_error or skipped

    def stream_ended(self, outcome: AttemptOutcome, error: str = "", failure: UpstreamError | None = None) -> None:
        """The stream of the last attempt, recorded when its first chunk came, ended (whole, or cut short, by its
        upstream's `failure` or as `error` says): its outcome, and its time from its start to its end, which the
        gateway's own share of the call is told from."""
        opened = self.attempts[-1]
        duration_s = opened.duration_s + time.perf_counter() - self.opened_at
        if failure is None:
            self.attempts[-1] = opened.ended(outcome, duration_s, None, error)
        else:
            self.attempts[-1] = opened.ended(outcome, duration_s, failure.status, failure.message, failure.quoted)

    def deadline_exceeded(self) -> DeadlineExceededError:
        if not self.attempts:
            # Its status then tells no attempts, as the contract has it: empty ones said a backend was asked.
            return DeadlineExceededError("the deadline ran out before any backend was asked", (), routed=False)
        tried = ", ".join(f"{a.backend} ({a.outcome.value})" for a in self.attempts)
        return DeadlineExceededError(f"the deadline ran out; tried: {tried}", self.attempts)

    def exhausted(self) -> AllBackendsFailedError:
        # Retries of one backend usually fail alike: each cause is told once, with how many attempts met it.
        causes = groupby(f"{a.backend}/{a.model}: {a.error or a.outcome.value}" for a in self.attempts)
        tried = "; ".join(
            cause if count == 1 else f"{cause} ({count} attempts)"
            for cause, count in ((cause, len(list(same))) for cause, same in causes)
        )
        error = AllBackendsFailedError(
            f"every backend failed: {tried}", self.attempts, retry_after_s=self._soonest_s(), causes=self.causes
        )
        error.__cause__ = self.last_error
        return error

    def _soonest_s(self) -> float | None:
        """The soonest a backend that failed may serve again: each as late as both its Retry-After and its circuit
        (opened by this call's failures, perhaps) say. None when one may serve at once as far as anything said (it
        failed without a Retry-After, and its circuit is closed), or none will by waiting."""
        soonest_s = math.inf
        for backend, said_s in self.said_waits.items():
            wait_s = max(said_s or 0.0, backend.circuit.retry_after_s())
            if wait_s <= 0:
                return None
            soonest_s = min(soonest_s, wait_s)
        return soonest_s if soonest_s < math.inf else None


def _raise_if_timed_out(
    task: asyncio.Task[object], cancelling: int, kind: type[BaseException] | None, error: BaseException | None
) -> None:
    """At the end of a wait whose timer cancelled `task` (which had `cancelling` cancellations asked before the wait):
    TimeoutError in place of that CancelledError, as asyncio.timeout does, unless the task is cancelled for good."""
    if task.uncancel() <= cancelling and kind is asyncio.CancelledError:
        raise TimeoutError from error


Ahead: TypeAlias = "tuple[float, Callable[..., None], tuple[Any, ...]]"
"""What a wait makes ready ahead of its deadline: when (the loop's clock), the function, its arguments."""


class Deadlines:
    """The deadlines of the attempts in progress on an event loop, kept by one timer for the soonest.

    An attempt that ends in time, as nearly all do, leaves the timer alone: it makes and cancels no timer of its own,
    as asyncio.timeout_at would (with its own objects, about 5 us and 3% of a unary call's instructions). The timer
    may thus fire for an attempt long over; it then ends the waits past their deadlines, as asyncio.timeout_at ends
    them (the task cancelled, TimeoutError at the end of the wait), and is armed again for the soonest one left: the
    busier the gateway, the later in time that one, so it fires about once a deadline's length, not once a call.

    A wait may have something to make ready `ahead` of its deadline, should it still be waiting then (a bill's count
    of a long prompt): the same timer calls it.
    """

    def __init__(self) -> None:
        self._waits: set[_Wait] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    def within(self, loop: asyncio.AbstractEventLoop, deadline: float, ahead: Ahead | None = None) -> _Wait:
        """A wait of the current task, in `loop`, ended with TimeoutError at `deadline` (the loop's clock); `ahead`,
        (when, what, its arguments): called at `when` if the wait is still going then."""
        return _Wait(self, loop, deadline, ahead)

    def _watch(self, wait: _Wait) -> None:
        self._waits.add(wait)
        if wait.loop is not self._loop:  # a loop of its own (the tests run gateways one loop after another)
            self._loop, self._timer, self._timer_due = wait.loop, None, math.inf
        due = wait.due()
        if due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(due)

    def _arm(self, due: float) -> None:
        assert self._loop is not None
        self._timer, self._timer_due = self._loop.call_at(due, self._fire, due), due

    def _fire(self, due: float) -> None:
        assert self._loop is not None
        self._timer, self._timer_due = None, math.inf
        # The loop may run a timer a little before its time by its own clock (uvloop's counts whole milliseconds):
        # what it was armed for ends now all the same, as asyncio.timeout_at's would.
        now = max(due, self._loop.time())
        soonest = math.inf
        for wait in [w for w in self._waits if w.loop is self._loop]:
            if wait.deadline <= now:
                self._waits.discard(wait)
                wait.expire()
                continue
            if wait.ahead is not None and wait.ahead[0] <= now:
                _, prepare, args = wait.ahead
                wait.ahead = None
                try:
                    prepare(*args)
                except Exception:  # a bug of the gateway's: the wait still ends at its deadline, unprepared
                    log.exception("preparing for a deadline failed")
            soonest = min(soonest, wait.due())
        if soonest < math.inf:
            self._arm(soonest)


class _Wait:
    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task", "ahead", "deadline", "loop")

    def __init__(
        self, deadlines: Deadlines, loop: asyncio.AbstractEventLoop, deadline: float, ahead: Ahead | None
    ) -> None:
        self._deadlines, self.loop, self.deadline, self.ahead = deadlines, loop, deadline, ahead
        self._expired = False

    def due(self) -> float:
        """When the timer must next look at this wait."""
        return self.deadline if self.ahead is None else min(self.deadline, self.ahead[0])

    def __enter__(self) -> None:
        task = asyncio.current_task(self.loop)
        assert task is not None, "a wait is a task's"
        self._task, self._cancelling = task, task.cancelling()
        self._deadlines._watch(self)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        self._deadlines._waits.discard(self)
        if self._expired:
            _raise_if_timed_out(self._task, self._cancelling, kind, error)

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()


def _silent(silent_s: float, setting: str) -> str:
    return f"no answer within {silent_s:g} s (router.{setting})"


def _no_connection(silent_s: float, setting: str) -> str:
    return (
        f"no connection to it free within {silent_s:g} s (router.{setting}): every one the gateway may open is in use;"
        " more gateways (or workers) serve more"
    )


def _stalled(idle_s: float) -> str:
    # Keep-alive comments and events with nothing in them are not an answer going on: the limit is on silence in it.
    return f"nothing to relay for {idle_s:g} s (router.stream_idle_timeout_s)"


class _Watchdog:
    """A stream's wait for its next chunk, ended with TimeoutError after `idle_s`, or at the deadline: one timer for the
    whole stream, made again only when it fires while a wait is still within its limit. (asyncio.timeout per chunk
    would make and cancel a timer for every chunk.) Time the caller takes between waits does not count.

    `near_deadline`, when given, is called once, and only of a stream still going `near_s` before its deadline: what
    a stream's end at its deadline will need is made ready then, while the stream goes on (most streams end long
    before, and need none of it)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle_s: float,
        deadline: float,
        near_deadline: Callable[[], None] | None = None,
        near_s: float = 0.0,
    ) -> None:
        self._loop = loop
        self._idle_s = idle_s
        self._deadline = deadline
        self._near_deadline = near_deadline
        self._near_at = deadline - near_s if near_deadline is not None else deadline
        """When to call `near_deadline`, while it is still to call; then the deadline."""
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._waiting_since: float | None = None
        self._cancelling = 0
        self._expired = False

    def __enter__(self) -> None:
        self._waiting_since = self._loop.time()
        self._task = asyncio.current_task()
        assert self._task is not None, "a stream is read by a task"
        self._cancelling = self._task.cancelling()
        if self._timer is None:
            self._timer = self._loop.call_at(self._due(self._waiting_since), self._check)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        self._waiting_since = None
        if self._expired:
            self._expired = False
            assert self._task is not None
            _raise_if_timed_out(self._task, self._cancelling, kind, error)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self, since: float) -> float:
        return min(since + self._idle_s, self._near_at)

    def _check(self) -> None:
        self._timer = None
        if self._waiting_since is None:
            return  # between waits: the next one sets the timer again
        if self._near_deadline is not None and self._loop.time() >= self._near_at:
            near_deadline, self._near_deadline, self._near_at = self._near_deadline, None, self._deadline
            try:
                near_deadline()
            except Exception:  # a bug of the gateway's: the stream still ends at its deadline, its end unprepared
                log.exception("preparing a stream's end at its deadline failed")
        due = self._due(self._waiting_since)
        if self._loop.time() < due:  # set for an earlier wait, or to call near_deadline
            self._timer = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self._expired = True
            self._task.cancel()


class LoopLag:
    """How late the event loop runs its timers lately: a busy process must end calls earlier to answer in time.

    One timer callback every `PERIOD_S` (no task); the figure jumps up with a late tick and decays by half a tick.
    """

    PERIOD_S: Final = 0.1

    def __init__(self) -> None:
        self.lag_s = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(loop.time() + self.PERIOD_S, self._tick, loop.time() + self.PERIOD_S)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self, expected: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lag_s = max(now - expected, self.lag_s / 2)
        self._handle = loop.call_at(now + self.PERIOD_S, self._tick, now + self.PERIOD_S)


class Router:
    def __init__(
        self,
        providers: Sequence[LLMProvider],
        *,
        config: RouterConfig,
        counter: TokenCounter,
        ledger: UsageLedger,
        prices: PriceTable,
        aliases: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        max_request_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """`max_request_bytes`: the largest request the gateway takes (server.max_message_bytes), and so the longest
        prompt it may have to count."""
        self.backends = tuple(Backend(p, CircuitBreaker(config.circuit)) for p in providers)
        for backend in self.backends:
            spec = backend.provider.spec
            if spec.embedding_model and backend.embedder is None:
                raise ConfigError(
                    f"backend {spec.name!r}: a backend of kind {spec.kind} cannot serve embeddings; remove its"
                    " embedding_model"
                )
        self.lag = LoopLag()
        self._deadlines = Deadlines()
        self._by_name = {b.name: b for b in self.backends}
        self._config = config
        self._counter = counter
        self._ledger = ledger
        self._prices = prices
        self._aliases = dict(aliases or {})
        self._sleep = sleep
        self._backoff = Backoff(config.retry, rng)
        self._most_counting_s = TokenCounter.count_s_at_most(max_request_bytes)

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

    def _allowed(
        self, routes: list[Route], model: str | None, caller: str, may_use: ModelFilter | None, *, peers: bool = False
    ) -> list[Route]:
        """The routes that the caller may use (`_may_take`): a caller asking for a model it may not use is refused,
        and one limited to some models is never served by another through a fallback (with no model named, the
        default chain is the models it may use). `peers`: the routes are of one model (an embedding model's
        backends), any of which serves the call as well as the first: the caller takes those it may use."""
        if may_use is None:
            return routes
        allowed = self._taken(routes, model, may_use, peers=peers)
        if not allowed or (not peers and model is not None and allowed[0] is not routes[0]):
            raise ModelNotAllowedError(caller, model or f"{routes[0].backend.name}/{routes[0].model}")
        return allowed

    def _taken(self, routes: list[Route], model: str | None, may_use: ModelFilter, *, peers: bool) -> list[Route]:
        """The routes of `routes` (those of `model`, as asked) that the key may take (`_may_take`); with an alias its
        patterns name, the alias's own route too (its peers' with `peers`), whatever the route's name: a key given
        "fast" alone takes it, though never a fallback its patterns do not name. Not an alias named as another
        backend's "backend/model", which a key's "ollama/*" would otherwise take wherever it points."""
        own = len(routes) if peers else 1
        if model is not None and model in self._aliases and not self._reads_as_backends(model) and may_use(model):
            return [r for i, r in enumerate(routes) if i < own or self._may_take(r, may_use)]
        return [r for r in routes if self._may_take(r, may_use)]

    def _reads_as_backends(self, name: str) -> bool:
        """Whether `name` reads as a configured backend's "backend/model"."""
        qualifier, slash, _ = name.partition("/")
        return bool(slash) and qualifier in self._by_name

    def _may_take(self, route: Route, may_use: ModelFilter) -> bool:
        """Whether the key may take the route: its "backend/model" matches, or its model's name alone ("gpt-4o*" on
        any backend), unless that name reads as another backend's "backend/model": backend paid, which takes any
        name, asked for "ollama/tiny" is no model of backend ollama, and a key's "ollama/*" does not take it there."""
        if may_use(f"{route.backend.name}/{route.model}"):
            return True
        qualifier, slash, _ = route.model.partition("/")
        # A model its backend serves is its own whatever its name ("openai/gpt-oss-20b" on vLLM beside backend openai).
        foreign = slash and qualifier in self._by_name and not route.backend.serves(route.model)
        return not foreign and may_use(route.model)

    def _routes(self, request: CompletionRequest, caller: str, may_use: ModelFilter | None) -> list[Route]:
        if (estimated := _estimated_routes.get()) is not None and estimated[0] is request and estimated[1] == may_use:
            return estimated[2]
        return self._allowed(self.resolve(request.model, exact=request.exact_model), request.model, caller, may_use)

    def embedding_routes(self, model: str | None) -> list[Route]:
        """Where an embedding request for `model` may go, in order: a backend-qualified name's backend alone, else
        every backend configured with the model (unset: the first backend's default embedding model); never
        another model. ModelNotFoundError when no backend embeds with it."""
        embedders = [b for b in self.backends if b.provider.spec.embedding_model]
        if model is None:
            if not embedders:
                remedy = "this gateway has no embedding model: set embedding_model on a backend"
                raise ModelNotFoundError("(the default embedding model)", (), remedy)
            model = embedders[0].provider.spec.all_embedding_models[0]
        model = self._aliases.get(model, model)
        qualifier, _, bare = model.partition("/")
        if bare and qualifier in self._by_name and self._by_name[qualifier].provider.spec.embedding_model:
            # As for chat, a backend named by the caller is asked for any model: it may serve more than configured.
            return [Route(self._by_name[qualifier], bare)]
        routes = [Route(b, model) for b in embedders if b.embeds(model)]
        if not routes:
            served = [f"{b.name}/{name}" for b in embedders for name in b.provider.spec.all_embedding_models]
            raise ModelNotFoundError(model, served)
        return routes

    def _embedding_routes_allowed(self, model: str | None, caller: str, may_use: ModelFilter | None) -> list[Route]:
        """The backends that embed with `model` and that the caller may use: a key limited to "ollama/*" asking for
        a model that openai embeds too, first, is served by ollama (it was refused)."""
        return self._allowed(self.embedding_routes(model), model, caller, may_use, peers=True)

    def _fallbacks(self, *, exclude: Backend) -> list[Route]:
        return [
            Route(b, b.provider.spec.default_model)
            for b in self.backends
            if b is not exclude and b.provider.spec.fallback
        ]

    @property
    def request_timeout_s(self) -> float:
        """The bound on a call whose caller set no deadline (router.request_timeout_s)."""
        return self._config.request_timeout_s

    @property
    def most_counting_s(self) -> float:
        """The most a count of the largest request may take: a bill made by one (a stream cut off, its upstream's
        usage never come) is that long at most."""
        return self._most_counting_s

    def deadline(self, timeout_s: float | None) -> float:
        """The absolute (event-loop clock) deadline for a call with `timeout_s` left, or, when its caller set no
        deadline, the configured bound. A caller's own deadline is its to choose, longer than the bound too (a long
        generation): a backend that stops answering is cut by the first-chunk and idle limits all the same."""
        now = asyncio.get_running_loop().time()
        if timeout_s is None:
            return now + self._config.request_timeout_s
        # Finish a little before the caller's own deadline, so that our status (with the attempts) reaches it
        # rather than its client library's bare DEADLINE_EXCEEDED; the busier the loop, the earlier; and before the
        # deadline the caller's library may keep, earlier than the one it sent (`timeout_rounding`).
        margin = min(DEADLINE_MARGIN_S + 2 * self.lag.lag_s + timeout_rounding(timeout_s), timeout_s / 10)
        return now + timeout_s - margin

    # --- calls ------------------------------------------------------------------------------------------------

    async def complete(
        self, request: CompletionRequest, *, deadline: float, caller: str, may_use: ModelFilter | None = None
    ) -> CompletionResponse:
        chain = _Chain(deadline, request=request)
        metering.attempts(chain.attempts)
        try:
            for route in self._routes(request, caller, may_use):
                try:
                    response = await self._try_route(
                        chain, route, lambda r, t: r.backend.provider.complete(r.model, request, timeout_s=t)
                    )
                except BaseException:
                    if chain.left is not None:
                        await _to_its_end(self._bill_left(chain, request, caller))
                    raise
                if response is not None:
                    usage = self._priced(route, response.model, response.usage)
                    self._bill(response.backend, response.model, caller, usage)
                    return response.settled(usage, tuple(chain.attempts))
            raise chain.exhausted()
        finally:
            chain.drop_prompt_count()

    async def stream(
        self, request: CompletionRequest, *, deadline: float, caller: str, may_use: ModelFilter | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        """The answer's chunks; after the first chunk a broken stream either ends with StreamInterruptedError or,
        when the request asks for it and time remains, starts over on the next route after a restart chunk."""
        chain = _Chain(deadline, request=request)
        metering.attempts(chain.attempts)
        routed_at = time.perf_counter()
        consumed: TokenUsage | None = None  # by broken attempts, billed and added to the final usage
        broken: StreamInterruptedError | None = None
        routes = self._routes(request, caller, may_use)
        for index, route in enumerate(routes):
            try:
                opened = await self._try_route(
                    chain, route, lambda r, _: self._open_stream(chain, r, request), stream=True
                )
            except BaseException:
                if chain.left is not None:
                    await _to_its_end(self._bill_left(chain, request, caller))
                chain.drop_prompt_count()
                raise
            if opened is None:
                continue
            chain.drop_prompt_count()  # a stream's end has its own (_rest_of_stream)
            first, upstream = opened
            metering.first_chunk(chain.opened_at, chain.opened_at - routed_at, route.backend.name)
            # The text sent on: what the gateway counts when the upstream reports no usage, or the stream breaks.
            received = _Received(first.model or route.model)
            billed = False
            try:
                async with contextlib.aclosing(
                    self._rest_of_stream(chain, route, request, first, upstream, received)
                ) as chunks:
                    async for chunk in chunks:
                        if chunk.finish_reason is not None:  # the last chunk
                            usage = chunk.usage or await self._counted_usage(
                                route, request, received, chunk.prompt_usage
                            )
                            usage = self._priced(route, chunk.model, usage)
                            self._bill(chunk.backend, chunk.model, caller, usage)
                            billed = True
                            route.backend.circuit.record_success()  # the stream ended whole
                            chain.stream_ended(AttemptOutcome.SUCCEEDED)
                            total = usage if consumed is None else consumed + usage
                            chunk = chunk.settled(total, tuple(chain.attempts))
                        else:
                            received.add(chunk)
                        yield chunk
                return
            except UpstreamError as exc:
                _let_go(exc)
                # The attempt that had started is recorded as broken, not as the success it first looked like.
                chain.stream_ended(AttemptOutcome.INTERRUPTED, failure=exc)
                chain.last_error = exc
                partial = await self._bill_partial(route, request, caller, received)
                billed = True
                consumed = partial if consumed is None else consumed + partial
                broken = StreamInterruptedError(exc, chain.attempts)
                # A restart needs a route left, and at least as long as the broken attempt took to get where it broke.
                restart = request.restart_on_interrupt and index + 1 < len(routes)
                if not restart or chain.remaining_s() < chain.attempts[-1].duration_s:
                    raise broken from exc
                yield CompletionChunk(
                    id="",
                    backend=route.backend.name,
                    model=received.model,
                    restart=StreamRestart(str(broken), route.backend.name, tuple(chain.attempts), partial),
                )
            finally:
                # Still open: the call ended under it (the gateway's own deadline made it TIMEOUT already). As for an
                # attempt that had no answer yet (_try_route): past the deadline, gRPC's timer beat ours; else the
                # caller left, or a shutdown ended the call.
                if not billed and chain.attempts[-1].outcome is AttemptOutcome.SUCCEEDED:
                    if chain.remaining_s() <= 0:
                        chain.stream_ended(AttemptOutcome.TIMEOUT, "the deadline ran out mid-stream")
                    else:
                        chain.stream_ended(AttemptOutcome.CANCELLED)
                try:
                    await upstream.aclose()  # first: the upstream stops generating at once, not after the count
                finally:
                    if not billed:
                        # What was generated was still consumed.
                        prompt_by = self._left_count_by(chain, route)
                        await _to_its_end(self._bill_partial(route, request, caller, received, prompt_by))
                    if received.prompt_count is not None:
                        received.prompt_count.cancel()  # billed: a count still going was not needed
        if broken is not None:
            # Text was sent and no restart finished it: the stream as a whole was interrupted.
            raise StreamInterruptedError(broken.cause, chain.attempts, after="; no restart could finish it")
        raise chain.exhausted()

    async def embed(
        self, request: EmbeddingRequest, *, deadline: float, caller: str, may_use: ModelFilter | None = None
    ) -> EmbeddingResponse:
        chain = _Chain(deadline, request=request)
        metering.attempts(chain.attempts)

        async def attempt(route: Route, timeout_s: float) -> EmbeddingResponse:
            embedder = route.backend.embedder
            assert embedder is not None, "embedding routes lead to embedders only (checked at start)"
            try:
                return await embedder.embed(route.model, request, timeout_s=timeout_s)
            except UpstreamError as exc:
                if exc.consumed is not None:  # an answer it could not pass on, to inputs the upstream read all the same
                    usage = self._priced(route, route.model, exc.consumed)
                    self._bill(route.backend.name, route.model, caller, usage, interrupted=True)
                raise

        try:
            for route in self._embedding_routes_allowed(request.model, caller, may_use):
                try:
                    response = await self._try_route(chain, route, attempt, embedding=True)
                except BaseException:
                    if chain.left is not None:
                        await _to_its_end(self._bill_inputs_left(chain, request, caller))
                    raise
                if response is not None:
                    usage = self._priced(route, response.model, response.usage)
                    self._bill(response.backend, response.model, caller, usage)
                    return replace(response, usage=usage, attempts=tuple(chain.attempts))
            raise chain.exhausted()
        finally:
            chain.drop_prompt_count()

    async def _bill_partial(
        self, route: Route, request: CompletionRequest, caller: str, received: _Received, prompt_by: float = 0.0
    ) -> TokenUsage:
        """What a stream that ended early consumed, counted by the gateway, recorded in the ledger as interrupted; its
        prompt, unless the upstream reported it, by the backend's own count where it has one by `prompt_by` (the
        event loop's clock: `_left_count_by`)."""
        prompt = None
        if prompt_by and received.prompt_usage is None and received.prompt_count is None:
            prompt = await self._prompt_counted(route, request, by=prompt_by)
        usage = await self._counted_usage(route, request, received, prompt)
        usage = self._priced(route, received.model, usage)
        self._bill(route.backend.name, received.model, caller, usage, interrupted=True)
        return usage

    async def _bill_left(self, chain: _Chain, request: CompletionRequest, caller: str) -> None:
        """Bills an attempt the call ended under before its answer (`_Chain.left`) for its prompt, which the upstream
        read all the same, as it bills a stream that broke: else a caller could have any number of prompts read past
        its tokens a minute and its budget, for nothing, by leaving each call before its answer."""
        route = chain.left
        assert route is not None, "billed only for an attempt the call ended under"
        by = self._left_count_by(chain, route)
        counted = chain.prompt_count
        if not by and counted is not None and counted[0] == route.model:
            prompt = await counted[1]  # begun ahead of the deadline (_count_ahead): made, or nearly
        else:
            prompt = await self._prompt_counted(route, request, by=by)
        if prompt is not None:  # without the model's encoding there is nothing to count it by
            self._bill(
                route.backend.name, route.model, caller, self._priced(route, route.model, prompt), interrupted=True
            )

    async def _bill_inputs_left(self, chain: _Chain, request: EmbeddingRequest, caller: str) -> None:
        """Bills an embedding the call ended under before its answer (`_Chain.left`) for its inputs, counted offline
        (no backend counts an embedding's), which the upstream read all the same: as `_bill_left` bills a chat's
        prompt, with the count begun ahead of the deadline where there is one."""
        route = chain.left
        assert route is not None, "billed only for an attempt the call ended under"
        counted = chain.prompt_count
        if counted is not None and counted[0] == route.model:
            inputs = await counted[1]
        else:
            inputs = await self._inputs_counted(route, request)
        if inputs is not None:  # without the model's encoding there is nothing to count them by
            usage = self._priced(route, route.model, inputs)
            self._bill(route.backend.name, route.model, caller, usage, interrupted=True)

    async def _inputs_counted(self, route: Route, request: EmbeddingRequest) -> TokenUsage | None:
        """An embedding's inputs, counted offline; None without the model's encoding."""
        try:
            counted = await self._counter.count_texts_async(route.model, request.inputs)
        except TokenizerUnavailableError:
            return None
        return TokenUsage(counted.tokens, 0, estimated=True)

    @staticmethod
    def _left_count_by(chain: _Chain, route: Route) -> float:
        """Until when the bill of a call that ended under an attempt on `route` may wait for the backend's own count
        of its prompt: LEFT_COUNT_S when its caller left (or a shutdown ended it); not at all at its deadline, when
        the caller waits for its status (told by the attempt's outcome, not the clock: the loop may run the deadline's
        timer a little early), nor on a backend whose circuit is not closed (failing: asked nothing more)."""
        last = chain.attempts[-1] if chain.attempts else None
        if (
            last is None
            or last.outcome is AttemptOutcome.TIMEOUT
            or route.backend.circuit.state is not CircuitState.CLOSED
        ):
            return 0.0
        return asyncio.get_running_loop().time() + LEFT_COUNT_S

    async def _counted_usage(
        self, route: Route, request: CompletionRequest, received: _Received, prompt: TokenUsage | None = None
    ) -> TokenUsage:
        """The usage of a stream the gateway counts itself: the text kept counted, the rest at its rate; the prompt as
        the upstream reported it (on the last chunk, else before), when it did."""
        prompt = prompt or received.prompt_usage or await received.counted_prompt()
        usage = await self._counter.estimate_usage(route.model, request, received.texts, prompt)
        if received.beyond:
            rate = usage.completion_tokens / received.kept
            usage = replace(usage, completion_tokens=usage.completion_tokens + math.ceil(received.beyond * rate))
        return usage

    async def _prompt_counted(self, route: Route, request: CompletionRequest, *, by: float = 0.0) -> TokenUsage | None:
        """The prompt's tokens, estimated (no upstream reported them): by the backend's own count where it has one
        and gives it by `by` (the event loop's clock; 0: not asked), as CountTokens counts; else offline, as
        estimate_usage counts them. None without the model's encoding, which the bill's own count then says."""
        options = request.options
        exact = await self._backend_count(route, request.messages, options.tools, options.response_format, by)
        if exact is not None:
            return TokenUsage(exact.tokens, 0, estimated=True)
        try:
            counted = await self._counter.count_chat_async(
                route.model, request.messages, options.tools, response_format=options.response_format
            )
        except TokenizerUnavailableError:
            return None
        return TokenUsage(counted.tokens, 0, estimated=True)

    @staticmethod
    async def _backend_count(
        route: Route,
        messages: Sequence[Message],
        tools: Sequence[Tool],
        response_format: ResponseFormat | None,
        by: float,
    ) -> TokenCount | None:
        """The backend's own count of a chat for the route's model, where it has a tokenizer and answers by `by` (the
        event loop's clock); None otherwise, and for a chat whose answer format is a JSON schema, which the backends'
        tokenizers leave out (the gateway's count has it, as a call's estimate does)."""
        schema = response_format is not None and response_format.json_schema is not None
        loop = asyncio.get_running_loop()
        if schema or by <= (started := loop.time()):
            return None
        try:
            async with asyncio.timeout_at(by):
                return await route.backend.provider.count_tokens(route.model, messages, tools)
        except TimeoutError:
            return None
        finally:
            metering.counted(loop.time() - started)  # the upstream's time, not the gateway's own

    def _bill(self, backend: str, model: str, caller: str, usage: TokenUsage, *, interrupted: bool = False) -> None:
        """The one place usage is billed: the ledger, and the call's meter (which its limits settle with)."""
        if self._ledger.closed:
            return  # a bill the stop could not wait for (told to stop now): the stop says how many were lost
        self._ledger.record(backend, model, caller, usage, interrupted=interrupted)
        metering.charge(backend, model, caller, usage)

    def estimate(
        self, request: CompletionRequest, prompt_tokens: int, answer_tokens: int, may_use: ModelFilter | None
    ) -> CallEstimate:
        """The most `request` may be billed for: what its limits reserve before the call, which settle at what it
        was billed. Any route the request may take may answer it, so an answer is at the highest price among them:
        its fallbacks included, unless it asked for its model exactly, and those its key may use (`may_use`) alone.
        At the first route's price, callers that all fell back to a dearer one would overspend the budget between
        them. An answer is as long as the route asks its upstream for at most (the request's max_tokens, or more: an
        Anthropic backend's own max_tokens, with thinking's budget), else `answer_tokens` (the upstream's own limit
        then applies, which the gateway cannot know). A stream that starts over when broken (restart_on_interrupt)
        is billed for each broken attempt's part and then for the next route's answer: as many answers as it has
        routes, each as long and at the price of its own."""

        def routes() -> list[Route]:
            resolved = self._routes(request, "", may_use)
            _estimated_routes.set((request, may_use, resolved))
            return resolved

        def asked(route: Route) -> int:
            tokens = route.backend.provider.answer_tokens_asked(request)
            return answer_tokens if tokens is None else tokens

        costs = self._costs(routes, prompt_tokens, asked)
        if not costs:  # refused before any upstream is asked
            return CallEstimate(answers=1, answer_tokens=answer_tokens, usd_micros=0)
        # By route, as columns: added up or their most in C, with no generator of Python's on every limited call.
        tokens, usd_micros = zip(*costs, strict=True)
        if request.restart_on_interrupt:
            return CallEstimate(answers=len(costs), answer_tokens=sum(tokens), usd_micros=sum(usd_micros))
        return CallEstimate(answers=1, answer_tokens=max(tokens), usd_micros=max(usd_micros))

    def estimate_embedding_usd_micros(self, model: str | None, prompt_tokens: int, may_use: ModelFilter | None) -> int:
        """As estimate, for an embedding request: at the highest price among the backends that embed with its model
        and that its key may use."""

        def routes() -> list[Route]:
            return self._embedding_routes_allowed(model, "", may_use)

        return max((usd_micros for _, usd_micros in self._costs(routes, prompt_tokens, lambda _: 0)), default=0)

    def model_counted(self, request: CompletionRequest | EmbeddingRequest, may_use: ModelFilter | None) -> str:
        """The model a request's prompt (inputs) is counted for before it runs: its first route's, as CountTokens
        counts it and as its bill counts what the upstream does not report (an alias or no model is no tokenizer's
        name); the name asked for where nothing may serve it."""
        try:
            if isinstance(request, EmbeddingRequest):
                routes = self._embedding_routes_allowed(request.model, "", may_use)
            else:
                routes = self._routes(request, "", may_use)
        except (ModelNotFoundError, ModelNotAllowedError):
            routes = []
        return routes[0].model if routes else request.model or ""

    def refuses(self, request: CompletionRequest | EmbeddingRequest, may_use: ModelFilter | None) -> bool:
        """Whether the request is refused for its model: one nothing serves, or one its key (`may_use`) may not use."""
        try:
            if isinstance(request, EmbeddingRequest):
                self._embedding_routes_allowed(request.model, "", may_use)
            else:
                # Kept, as estimate keeps them: its estimate and its routing take them rather than resolving again.
                _estimated_routes.set((request, may_use, self._routes(request, "", may_use)))
        except (ModelNotFoundError, ModelNotAllowedError):
            return True
        return False

    def _costs(
        self, routes: Callable[[], list[Route]], prompt_tokens: int, answer_tokens: Callable[[Route], int]
    ) -> list[tuple[int, int]]:
        """The most tokens an answer may take on each route, and what it may cost there; none for a call refused
        before any upstream is asked."""
        try:
            candidates = routes()
        except (ModelNotFoundError, ModelNotAllowedError):
            return []
        return [
            (
                tokens := answer_tokens(route),
                self._prices.rate(route.backend.provider.spec, route.model).estimate_usd_micros(prompt_tokens, tokens),
            )
            for route in candidates
        ]

    def _priced(self, route: Route, model: str, usage: TokenUsage) -> TokenUsage:
        """The usage with its cost, for an answer that names `model` to a request for the route's (an upstream names
        its dated snapshot): at the price PriceTable.answer_rate finds."""
        return usage.with_cost(self._prices.answer_rate(route.backend.provider.spec, route.model, model).cost(usage))

    async def count_tokens(
        self,
        model: str | None,
        messages: Sequence[Message],
        tools: Sequence[Tool],
        text: str | None,
        response_format: ResponseFormat | None = None,
        *,
        deadline: float,
        may_use: ModelFilter | None = None,
    ) -> TokenCount:
        """A backend's own exact count where it has a tokenizer, and the caller's key may use its model; else tiktoken,
        for any model name (counting is offline and an agent may budget for a model this gateway does not route to;
        a key's model patterns keep its counts away from backends it may not use, a paid API's count among them).
        A backend's count not in by `deadline` (the event loop's clock) gives way to tiktoken's, in time. A JSON
        schema's answer format is counted by tiktoken alone (`_backend_count`)."""
        try:
            # Without a model, the default chain: for a key, the first of it that the key may use, as its calls.
            routes = self.resolve(model, exact=model is not None)
        except ModelNotFoundError:
            routes = []
        name = routes[0].model if routes else str(model)
        if may_use is not None:
            routes = self._taken(routes, model, may_use, peers=False)
        route = routes[0] if routes else None
        if route is not None:
            name = route.model
        if text is not None:
            return await self._counter.count_text_async(name, text, by=deadline)
        exact = None
        # The caller asked for an answer by its deadline: an estimate then, rather than none at all, so the backend's
        # count waits only as long as the deadline leaves beside the time the estimate may take (a stalled backend
        # must not use it all: a large chat's estimate then had no time left).
        if route is not None:
            by = deadline - self._counter.count_chat_s(name, messages, tools, response_format=response_format)
            exact = await self._backend_count(route, messages, tools, response_format, by)
        return exact or await self._counter.count_chat_async(
            name, messages, tools, response_format=response_format, by=deadline
        )

    def _ahead(self, chain: _Chain, route: Route, loop: asyncio.AbstractEventLoop) -> Ahead | None:
        """What an attempt on `route` makes ready ahead of the call's deadline (`_count_ahead`), or, when
        that time has come already (a short deadline), None, made ready now: the deadlines' timer would fire for every
        such attempt at once, and go through every wait each time."""
        at = chain.deadline - self._most_counting_s
        if at > loop.time():
            return at, self._count_ahead, (chain, route)
        self._count_ahead(chain, route)
        return None

    def _count_ahead(self, chain: _Chain, route: Route) -> None:
        """Called of an attempt still waiting as long before the deadline as the longest count may take (`_ahead`):
        the prompt's (inputs') count for a bill at the deadline (a prompt of 2.9 MB, counted after it, some 250 ms: its
        status came after its caller's deadline)."""
        if chain.prompt_count is None and (counting := self._count_begun(route, chain.request)) is not None:
            chain.prompt_count = route.model, counting

    def _count_begun(
        self, route: Route, request: CompletionRequest | EmbeddingRequest
    ) -> asyncio.Future[TokenUsage | None] | None:
        """The prompt's (an embedding's inputs') count for a bill at the deadline, begun now, near it: a bill counts
        the prompt before the call's status goes out, and a long one's count takes a thread's while; begun while the
        call goes on, the bill finds it made. None for a usual prompt, counted at once, which is left to the bill."""
        if isinstance(request, EmbeddingRequest):
            if not self._counter.count_texts_wait_s(route.model, request.inputs):
                return None
            return asyncio.ensure_future(self._inputs_counted(route, request))
        options = request.options
        if not self._counter.count_chat_wait_s(
            route.model, request.messages, options.tools, response_format=options.response_format
        ):
            return None
        return asyncio.ensure_future(self._prompt_counted(route, request))

    async def _open_stream(
        self, chain: _Chain, route: Route, request: CompletionRequest
    ) -> tuple[CompletionChunk, AsyncGenerator[CompletionChunk, None]]:
        """Starts a stream and waits for its first chunk: until then, a failure may still fall back."""
        # No read timeout of the upstream's own: the first chunk waits within the attempt's limit (_try_route), the
        # rest within the idle limit (_rest_of_stream), both inside the deadline.
        limits = StreamLimits(self._config.stream_idle_timeout_s, chain.deadline)
        upstream = route.backend.provider.stream(route.model, request, limits)
        try:
            return await anext(upstream), upstream
        except StopAsyncIteration as exc:
            raise UpstreamError(UpstreamErrorKind.BAD_RESPONSE, route.backend.name, "the stream was empty") from exc
        except BaseException:
            await upstream.aclose()
            raise

    async def _rest_of_stream(
        self,
        chain: _Chain,
        route: Route,
        request: CompletionRequest,
        first: CompletionChunk,
        upstream: AsyncIterator[CompletionChunk],
        received: _Received,
    ) -> AsyncGenerator[CompletionChunk, None]:
        """The chunks after the first, each within the idle limit; a broken stream raises its UpstreamError. Near the
        deadline, the prompt's count for `received`'s bill."""
        yield first
        idle_s = self._config.stream_idle_timeout_s
        loop = asyncio.get_running_loop()

        def count_the_prompt() -> None:
            """As long before the deadline as the longest count may take: the stream runs to its deadline all the
            same, and its bill there finds the prompt counted (`_count_begun`)."""
            received.prompt_count = self._count_begun(route, request)

        watchdog = _Watchdog(loop, idle_s, chain.deadline, count_the_prompt, self._most_counting_s)
        try:
            while True:
                try:
                    with watchdog:
                        chunk = await anext(upstream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if loop.time() >= chain.deadline:
                        chain.stream_ended(AttemptOutcome.TIMEOUT, "the deadline ran out mid-stream")
                        raise chain.deadline_exceeded() from None
                    stalled = UpstreamError(UpstreamErrorKind.TIMEOUT, route.backend.name, _stalled(idle_s))
                    route.backend.count_failure(stalled)
                    raise stalled from None
                except UpstreamError as exc:
                    # As before the first chunk (_failed): a request the upstream blames (too long, rejected) mid-way
                    # says nothing of the backend, and one caller's would shut it for every other.
                    if exc.kind not in NOT_THE_BACKENDS_FAULT:
                        route.backend.count_failure(exc)
                    raise
                yield chunk
        finally:
            watchdog.stop()

    async def _try_route(
        self,
        chain: _Chain,
        route: Route,
        call: Callable[[Route, float], Awaitable[T]],
        *,
        stream: bool = False,
        embedding: bool = False,
    ) -> T | None:
        """Runs `call` on one route with retries; its result, or None to move on to the next route. Of a `stream`,
        the result is its first chunk, which tells the circuit only that the backend answers (`record_answered`).

        Each attempt waits for its answer (a stream: its first chunk) at most `first_chunk_timeout_s` (an
        `embedding`'s, `embed_timeout_s`): a backend that took the request and stays silent is failing, and retrying
        it would only multiply the wait.

        A request the route rejects as invalid ends the call, unless a route before it failed for a reason of its own
        (down, busy, silent, its circuit open, a stream broken): then the rejection is this route's own limits (a
        fallback's model without tools or images, a restart's backend refusing what another had taken), not the
        caller's mistake, and the call moves on, to end UNAVAILABLE if nothing serves it: the route it was meant for
        may serve it later.
        """
        circuit = route.backend.circuit
        loop = asyncio.get_running_loop()
        # The routes before this one (a route's own retries do not count: its rejection after them is its verdict).
        kept_from_the_routes_before = (
            any(attempt.outcome not in THE_REQUESTS_OWN for attempt in chain.attempts) if chain.attempts else False
        )
        if not chain.may_fit(route):
            too_long = UpstreamError(
                UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
                route.backend.name,
                f"not tried: its context window is no larger than {chain.too_long_for} tokens, which was too small",
            )
            chain.record(route, AttemptOutcome.CONTEXT_LENGTH_EXCEEDED, None, too_long)
            return None
        silent_s = self._config.embed_timeout_s if embedding else self._config.first_chunk_timeout_s
        for retry in range(self._config.retry.max_retries + 1):
            if not circuit.allow(chain):
                chain.skip(route)
                return None
            remaining = chain.remaining_s()
            if remaining < MIN_ATTEMPT_S:
                circuit.release(chain)
                raise chain.deadline_exceeded()
            # Times measured by perf_counter: the loop's clock (uvloop's) moves in whole milliseconds, once an
            # iteration, and an attempt often takes less. Deadlines stay on the loop's clock, as its timers do.
            started = time.perf_counter()
            silent_after = loop.time() + silent_s
            sent_before, begun_before = metering.requests_sent(), metering.requests_begun()
            try:
                with self._deadlines.within(loop, min(chain.deadline, silent_after), self._ahead(chain, route, loop)):
                    # The upstream's own read timer a little past the call's: this one, at the deadline, ends the
                    # attempt as the deadline's (a timer of the HTTP client's may fire a few ms early, and won).
                    result = await call(route, remaining + DEADLINE_MARGIN_S)
            except TimeoutError:
                in_line = _still_in_line(begun_before)
                # Which of the two ends came first, by their times: the loop may fire a timer a little early, and a
                # call that reached its deadline is not a silent backend.
                if silent_after < chain.deadline:
                    limit = "embed_timeout_s" if embedding else "first_chunk_timeout_s"
                    if in_line:
                        silent = UpstreamError(
                            UpstreamErrorKind.BUSY, route.backend.name, _no_connection(silent_s, limit)
                        )
                    else:
                        silent = UpstreamError(UpstreamErrorKind.SILENT, route.backend.name, _silent(silent_s, limit))
                    self._failed(chain, route, started, silent)
                    return None
                self._deadline_passed(chain, route, started, in_line=in_line)
                chain.left = _if_sent(route, sent_before)
                raise chain.deadline_exceeded() from None
            except UpstreamError as exc:
                self._failed(chain, route, started, exc)
                if exc.kind is UpstreamErrorKind.REJECTED:
                    if kept_from_the_routes_before:
                        return None
                    exc.attempts = tuple(chain.attempts)  # it ends the call: the caller's status lists what was tried
                    raise
                if exc.kind not in RETRYABLE or retry == self._config.retry.max_retries:
                    return None
                if circuit.state is CircuitState.OPEN:
                    continue  # this failure opened it: no retry to wait for (skipped at once, the next route tried)
                delay = self._backoff.delay_s(retry, exc.retry_after_s)
                if delay is None or delay + MIN_ATTEMPT_S > chain.remaining_s():
                    return None
                slept_from = time.perf_counter()
                try:
                    await self._sleep(delay)
                finally:
                    metering.waited(time.perf_counter() - slept_from)
                continue
            except asyncio.CancelledError:
                # The call ended under the attempt. Past the deadline, gRPC's own timer beat the gateway's (a busy
                # loop): the deadline's outcome as above. Else the caller left or the gateway is shutting down:
                # recorded all the same, so that the call log, metrics and traces show what the call was waiting for.
                chain.left = _if_sent(route, sent_before)
                if chain.remaining_s() <= 0:
                    self._deadline_passed(chain, route, started, in_line=_still_in_line(begun_before))
                else:
                    chain.record(route, AttemptOutcome.CANCELLED, started, None)
                    circuit.release(chain)
                raise
            except BaseException:
                circuit.release(chain)
                raise
            if stream:
                circuit.record_answered()
            else:
                circuit.record_success()
            chain.record(route, AttemptOutcome.SUCCEEDED, started, None)
            chain.opened_at = time.perf_counter()
            return result
        return None

    @staticmethod
    def _deadline_passed(chain: _Chain, route: Route, started: float, *, in_line: bool) -> None:
        """Records an attempt the caller's deadline ended before its answer (or first chunk); `in_line`: it still
        waited for a connection of the gateway's own, every one in use (`_still_in_line`)."""
        said = "the deadline ran out while it waited for a free connection to it" if in_line else "the deadline ran out"
        timeout = UpstreamError(UpstreamErrorKind.TIMEOUT, route.backend.name, said)
        chain.record(route, AttemptOutcome.TIMEOUT, started, timeout)
        # Silence until the caller's deadline counts against the backend (else a backend that takes calls and never
        # answers would hold every call forever); a deadline too short to tell says nothing, nor one that ended the
        # wait for a connection: the upstream was asked nothing.
        if not in_line and time.perf_counter() - started >= SILENCE_VERDICT_S:
            route.backend.count_failure(timeout)
        else:
            route.backend.circuit.release(chain)

    @staticmethod
    def _failed(chain: _Chain, route: Route, started: float, error: UpstreamError) -> None:
        """Records a failed attempt, and counts it against the backend unless the failure says nothing of it."""
        _let_go(error)
        chain.record(route, error.kind.attempt_outcome, started, error)
        if error.kind is UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED:
            chain.too_long_for = max(chain.too_long_for, route.backend.provider.spec.context_window or 0)
        if error.kind in NOT_THE_BACKENDS_FAULT:
            route.backend.circuit.release(chain)
        else:
            route.backend.count_failure(error)
