"""The router's pure policy: backoff delays, the circuit breaker's states, and how a model name resolves to routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmrelay_server.config import CircuitConfig, Price, RetryConfig, RouterConfig
from llmrelay_server.domain import (
    Attempt,
    AttemptOutcome,
    BackendHealth,
    BackendSpec,
    CompletionChunk,
    EmbeddingRequest,
    LLMProvider,
    ModelNotFoundError,
    UpstreamError,
    UpstreamErrorKind,
)
from llmrelay_server.pricing import PriceTable
from llmrelay_server.router import (
    KEPT_TEXT_CHARS,
    PROBE_WAIT_S,
    Backend,
    Backoff,
    CircuitBreaker,
    CircuitState,
    Route,
    Router,
    _Chain,
    _Received,
    timeout_rounding,
)

# --- Deadlines ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "asked"),
    [  # what grpcio sent for a timeout (its grpc-timeout header), and the timeout asked for
        (0.501, 0.5),
        (5.01, 5.001),
        (10.3, 10.21),
        (10.1, 10.001),
        (121.0, 120.001),
        (3610.0, 3600.001),
    ],
)
def test_the_deadline_margin_covers_what_grpc_core_clients_round_their_timeout_up_by(sent: float, asked: float) -> None:
    """Read by the gateway a few milliseconds after it was sent (`sent` less them), and never more than a hundredth of
    it: a 60 s call (sent as "1M", exact) ends 0.1 s early, not 0.6 s."""
    read = sent - 0.003
    assert sent - asked <= timeout_rounding(read) + 1e-9 and timeout_rounding(read) <= read / 100
    assert timeout_rounding(60.0) == pytest.approx(0.1)


# --- Backoff --------------------------------------------------------------------------------------------------------

RETRY = RetryConfig(max_retries=9, initial_backoff_s=0.2, max_backoff_s=2.0, max_retry_after_s=10.0)
ALMOST_ONE = 1.0 - 2**-53
EMBEDDING = EmbeddingRequest(inputs=("a text",))  # a chain's request, which its bookkeeping never reads


@pytest.mark.parametrize(
    ("rng", "retry", "retry_after_s", "expected"),
    [
        # full jitter: the lower bound is 0 whatever the retry
        (0.0, 0, None, 0.0),
        (0.0, 5, None, 0.0),
        # half of a doubling base: 0.2, 0.4, 0.8, 1.6, then the 2.0 cap
        (0.5, 0, None, 0.1),
        (0.5, 1, None, 0.2),
        (0.5, 2, None, 0.4),
        (0.5, 3, None, 0.8),
        (0.5, 4, None, 1.0),
        (0.5, 9, None, 1.0),
        (0.5, 60, None, 1.0),
        # just under the cap of each retry
        (ALMOST_ONE, 0, None, 0.2 * ALMOST_ONE),
        (ALMOST_ONE, 3, None, 1.6 * ALMOST_ONE),
        (ALMOST_ONE, 4, None, 2.0 * ALMOST_ONE),
        # Retry-After wins, whatever the jitter and the retry number, up to max_retry_after_s included
        (0.5, 0, 3.0, 3.0),
        (0.0, 7, 0.0, 0.0),
        (0.5, 0, 10.0, 10.0),
        (0.5, 0, 0.05, 0.05),
        # ... and above it the backend is given up on (None), not waited for
        (0.5, 0, 10.001, None),
        (0.5, 2, 3600.0, None),
    ],
)
def test_backoff_delay(rng: float, retry: int, retry_after_s: float | None, expected: float | None) -> None:
    delay = Backoff(RETRY, lambda: rng).delay_s(retry, retry_after_s)
    if expected is None:
        assert delay is None
    else:
        assert delay == pytest.approx(expected, abs=1e-12)
        assert isinstance(delay, float)


def test_backoff_jitter_stays_below_the_cap() -> None:
    delay = Backoff(RETRY, lambda: ALMOST_ONE).delay_s(0, None)
    assert delay is not None
    assert 0.0 <= delay < 0.2


@pytest.mark.parametrize("retry", [1023, 1024, 5000, 10**9])
def test_backoff_of_a_retry_past_a_floats_doubling_is_the_cap(retry: int) -> None:
    """A max_retries meant as "until the deadline": the 1025th retry's wait (2**1024, past a float) raised
    OverflowError, and the call failed INTERNAL."""
    assert Backoff(RETRY, lambda: 1.0).delay_s(retry, None) == RETRY.max_backoff_s


def test_backoff_uses_the_configured_numbers() -> None:
    config = RetryConfig(initial_backoff_s=1.0, max_backoff_s=5.0, max_retry_after_s=2.0)
    backoff = Backoff(config, lambda: 1.0)
    assert [backoff.delay_s(r, None) for r in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.delay_s(0, 2.0) == 2.0
    assert backoff.delay_s(0, 2.5) is None


@settings(max_examples=200, deadline=None)
@given(
    rng=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    retry=st.integers(min_value=0, max_value=64),
)
def test_backoff_is_within_full_jitter_bounds(rng: float, retry: int) -> None:
    delay = Backoff(RETRY, lambda: rng).delay_s(retry, None)
    cap = min(RETRY.max_backoff_s, RETRY.initial_backoff_s * 2**retry)
    assert delay is not None
    assert 0.0 <= delay < cap or delay == cap == 0.0


# --- CircuitBreaker -------------------------------------------------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


CIRCUIT = CircuitConfig(failure_threshold=3, cooldown_s=30.0)


def state(breaker: CircuitBreaker) -> CircuitState:
    """The state, read through a call so that mypy does not narrow a property across mutations."""
    return breaker.state


def circuit() -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(CIRCUIT, clock), clock


def open_circuit() -> tuple[CircuitBreaker, FakeClock]:
    breaker, clock = circuit()
    for _ in range(CIRCUIT.failure_threshold):
        breaker.record_failure()
    return breaker, clock


def test_closed_until_the_threshold_then_open() -> None:
    breaker, _ = circuit()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.retry_after_s() == 0.0

    for _ in range(CIRCUIT.failure_threshold - 1):
        breaker.record_failure()
        assert state(breaker) is CircuitState.CLOSED
        assert breaker.allow(object())

    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    assert not breaker.allow(object())
    assert breaker.retry_after_s() == 30.0


def test_open_skips_for_the_whole_cooldown() -> None:
    breaker, clock = open_circuit()
    for elapsed in (0.0, 1.0, 29.0, 29.999):
        clock.now = 1_000.0 + elapsed
        assert state(breaker) is CircuitState.OPEN
        assert not breaker.allow(object())
        assert breaker.retry_after_s() == pytest.approx(30.0 - elapsed)


def test_half_open_after_the_cooldown_lets_exactly_one_probe_through() -> None:
    breaker, clock = open_circuit()
    clock.now += 30.0

    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.allow(object())  # the probe
    assert not breaker.allow(object())  # a concurrent call while the probe is out
    assert breaker.retry_after_s() == PROBE_WAIT_S, "told to come back soon, not at once"
    assert not breaker.allow(object())
    clock.now += 1_000.0
    assert not breaker.allow(object())  # still one probe at a time, however long it takes


def test_only_the_probe_gives_the_probe_back() -> None:
    """A call let through while the circuit was closed, ending after the cool-down without a verdict (its caller
    left), gave back the probe another call held: a second call was let through to a backend still on probation."""
    breaker, clock = circuit()
    early = object()
    assert breaker.allow(early)
    for _ in range(CIRCUIT.failure_threshold):
        breaker.record_failure()
    clock.now += 30.0
    probe = object()
    assert breaker.allow(probe)
    breaker.release(early)
    assert not breaker.allow(object()), "the probe is still out"
    breaker.release(probe)
    assert breaker.allow(object()), "the probe's caller left: the next call probes"


def test_a_failed_probe_reopens_for_a_new_cooldown() -> None:
    breaker, clock = open_circuit()
    clock.now += 45.0
    assert breaker.allow(object())

    breaker.record_failure()

    assert state(breaker) is CircuitState.OPEN
    assert breaker.opened_at == 1_045.0
    assert breaker.retry_after_s() == 30.0
    assert not breaker.allow(object())
    clock.now += 30.0
    assert breaker.allow(object())  # the next probe, one cooldown later
    assert not breaker.allow(object())


def test_a_failed_probe_reopens_even_below_the_threshold() -> None:
    breaker, clock = open_circuit()
    breaker.failures = 0  # whatever the count, a failed probe proves the backend still down
    clock.now += 30.0
    assert breaker.allow(object())
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN


def test_a_successful_probe_closes() -> None:
    breaker, clock = open_circuit()
    clock.now += 30.0
    assert breaker.allow(object())

    breaker.record_success()

    assert state(breaker) is CircuitState.CLOSED
    assert (breaker.failures, breaker.opened_at, breaker.probe) == (0, None, None)
    assert all(breaker.allow(object()) for _ in range(10))
    # and it takes a full threshold of failures to open again, not one
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN


def test_only_consecutive_failures_count() -> None:
    breaker, _ = circuit()
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.failures == 0


def test_a_threshold_of_one_opens_at_the_first_failure() -> None:
    breaker = CircuitBreaker(CircuitConfig(failure_threshold=1, cooldown_s=5.0), FakeClock())
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN


# --- Router.resolve -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeProvider:
    """Enough of an LLMProvider for resolution, which only reads the spec."""

    spec: BackendSpec


def spec(name: str, model: str, *, models: tuple[str, ...] = (), fallback: bool = True) -> BackendSpec:
    return BackendSpec(
        name=name, kind="openai_compatible", base_url=f"http://{name}/v1", default_model=model, models=models,
        fallback=fallback,
    )  # fmt: skip


def router(*specs: BackendSpec, aliases: dict[str, str] | None = None) -> Router:
    providers = [cast(LLMProvider, FakeProvider(s)) for s in specs]
    return Router(
        providers,
        config=RouterConfig(),
        counter=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        prices=PriceTable({}, Price(prompt=5.0, completion=15.0)),
        aliases=aliases,
    )


OPENAI = spec("openai", "gpt-4o", models=("gpt-4o-mini",))
OLLAMA = spec("ollama", "gpt-oss:20b")
LOCAL = spec("local", "qwen", models=("meta-llama/Llama-3.1-8B",), fallback=False)


def routes(r: Router, model: str | None, *, exact: bool = False) -> list[tuple[str, str]]:
    return [(route.backend.name, route.model) for route in r.resolve(model, exact=exact)]


def test_no_model_is_the_default_chain() -> None:
    r = router(OPENAI, OLLAMA, LOCAL)
    # the first backend with its default model, then every fallback backend with its own
    assert routes(r, None) == [("openai", "gpt-4o"), ("ollama", "gpt-oss:20b")]


def test_no_model_starts_with_the_first_backend_even_when_it_is_no_fallback() -> None:
    assert routes(router(LOCAL, OLLAMA, OPENAI), None) == [
        ("local", "qwen"),
        ("ollama", "gpt-oss:20b"),
        ("openai", "gpt-4o"),
    ]


def test_a_single_backend_chain() -> None:
    assert routes(router(OLLAMA), None) == [("ollama", "gpt-oss:20b")]
    assert routes(router(OLLAMA), "gpt-oss:20b") == [("ollama", "gpt-oss:20b")]


def test_a_default_model_resolves_to_its_backend_first() -> None:
    assert routes(router(OPENAI, OLLAMA, LOCAL), "gpt-oss:20b") == [("ollama", "gpt-oss:20b"), ("openai", "gpt-4o")]


def test_a_backend_qualified_name_goes_to_that_backend_with_the_bare_model() -> None:
    r = router(OPENAI, OLLAMA, LOCAL)
    assert routes(r, "ollama/llama3.2") == [("ollama", "llama3.2"), ("openai", "gpt-4o")]
    # the bare model need not be known to the backend: the qualifier is the caller's explicit choice
    assert routes(r, "openai/o3") == [("openai", "o3"), ("ollama", "gpt-oss:20b")]
    # and the rest after the first slash is the model, slashes and all
    assert routes(r, "local/org/model:tag", exact=True) == [("local", "org/model:tag")]


def test_a_slash_that_names_no_backend_is_part_of_the_model_name() -> None:
    r = router(OPENAI, OLLAMA, LOCAL)
    assert routes(r, "meta-llama/Llama-3.1-8B") == [
        ("local", "meta-llama/Llama-3.1-8B"),
        ("openai", "gpt-4o"),
        ("ollama", "gpt-oss:20b"),
    ]


def test_a_model_known_through_spec_models() -> None:
    assert routes(router(OLLAMA, OPENAI), "gpt-4o-mini") == [("openai", "gpt-4o-mini"), ("ollama", "gpt-oss:20b")]


def test_a_model_served_by_two_backends_goes_to_the_first_in_order() -> None:
    both = spec("other", "gpt-4o")
    assert routes(router(OPENAI, both), "gpt-4o", exact=True) == [("openai", "gpt-4o")]
    assert routes(router(both, OPENAI), "gpt-4o", exact=True) == [("other", "gpt-4o")]


def test_a_model_known_through_health() -> None:
    r = router(OPENAI, OLLAMA)
    with pytest.raises(ModelNotFoundError):
        r.resolve("llama3.2:1b", exact=False)

    r.backends[1].health = BackendHealth(
        name="ollama", kind="ollama", base_url="http://ollama/v1", default_model="gpt-oss:20b", reachable=True,
        models=("gpt-oss:20b", "llama3.2:1b"),
    )  # fmt: skip

    assert routes(r, "llama3.2:1b") == [("ollama", "llama3.2:1b"), ("openai", "gpt-4o")]


def test_an_untagged_name_matches_ollamas_latest_tag() -> None:
    r = router(OPENAI, spec("ollama", "llama3:latest", models=("mistral:latest",)))
    assert routes(r, "llama3", exact=True) == [("ollama", "llama3")]
    assert routes(r, "mistral", exact=True) == [("ollama", "mistral")]
    assert routes(r, "llama3:latest", exact=True) == [("ollama", "llama3:latest")]
    # another tag is another model
    with pytest.raises(ModelNotFoundError):
        r.resolve("llama3:8b", exact=True)
    # and :latest is a suffix rule, not a prefix match
    with pytest.raises(ModelNotFoundError):
        r.resolve("llama", exact=True)


def test_an_explicit_latest_tag_matches_an_untagged_name() -> None:
    r = router(OPENAI, spec("ollama", "llama3"))
    assert routes(r, "llama3:latest", exact=True) == [("ollama", "llama3:latest")]


def test_an_alias_resolves_before_anything_else() -> None:
    r = router(OPENAI, OLLAMA, LOCAL, aliases={"fast": "ollama/gpt-oss:20b", "smart": "gpt-4o", "gpt-4o": "local/qwen"})
    assert routes(r, "fast") == [("ollama", "gpt-oss:20b"), ("openai", "gpt-4o")]
    assert routes(r, "smart") == [("openai", "gpt-4o"), ("ollama", "gpt-oss:20b")]  # one level, not a chain of aliases
    assert routes(r, "gpt-4o", exact=True) == [("local", "qwen")]  # an alias shadows a real model name


def test_an_alias_to_an_unknown_model_reports_the_target() -> None:
    r = router(OLLAMA, aliases={"fast": "missing-model"})
    with pytest.raises(ModelNotFoundError) as caught:
        r.resolve("fast", exact=False)
    assert caught.value.model == "missing-model"


def test_exact_model_is_one_route() -> None:
    r = router(OPENAI, OLLAMA, LOCAL)
    assert routes(r, "gpt-4o-mini", exact=True) == [("openai", "gpt-4o-mini")]
    assert routes(r, "ollama/anything", exact=True) == [("ollama", "anything")]
    assert routes(r, "qwen", exact=True) == [("local", "qwen")]


def test_a_no_fallback_backend_serves_its_own_models_but_never_takes_over() -> None:
    r = router(OPENAI, OLLAMA, LOCAL)
    assert routes(r, "qwen") == [("local", "qwen"), ("openai", "gpt-4o"), ("ollama", "gpt-oss:20b")]
    for model in (None, "gpt-4o", "gpt-oss:20b", "openai/o3"):
        assert "local" not in [name for name, _ in routes(r, model)]


def test_the_primary_backend_is_never_repeated_as_a_fallback() -> None:
    r = router(OPENAI, OLLAMA, spec("third", "m3"))
    for model in (None, "gpt-4o", "gpt-oss:20b", "m3", "third/x"):
        names = [name for name, _ in routes(r, model)]
        assert len(names) == len(set(names)) == 3


def test_an_unknown_model_lists_what_is_served() -> None:
    r = router(OPENAI, OLLAMA, LOCAL, aliases={"zeta": "ollama/gpt-oss:20b", "alpha": "gpt-4o"})

    with pytest.raises(ModelNotFoundError) as caught:
        r.resolve("claude-9", exact=False)

    assert caught.value.model == "claude-9"
    assert caught.value.served == ("openai/gpt-4o", "ollama/gpt-oss:20b", "local/qwen", "alpha", "zeta")
    assert "claude-9" in str(caught.value)
    assert "ollama/gpt-oss:20b" in str(caught.value)


@pytest.mark.parametrize("model", ["", "nobody/model", "/gpt-4o", "openai/"])
def test_names_that_are_not_served(model: str) -> None:
    with pytest.raises(ModelNotFoundError):
        router(OPENAI, OLLAMA).resolve(model, exact=False)


def test_an_exhausted_chain_tells_each_cause_once_with_its_number_of_attempts() -> None:
    refused = Attempt("ollama", "gpt-oss:20b", AttemptOutcome.UNREACHABLE, 0.01, error="cannot reach http://h/v1")
    busy = Attempt("openai", "gpt-4o", AttemptOutcome.SERVER_ERROR, 0.02, upstream_status=503, error="HTTP 503: busy")
    skipped = Attempt("local", "tiny", AttemptOutcome.SKIPPED, 0.0)
    chain = _Chain(deadline=0.0, request=EMBEDDING, attempts=[refused, refused, refused, busy, skipped, refused])
    error = chain.exhausted()
    assert str(error) == (
        "every backend failed: ollama/gpt-oss:20b: cannot reach http://h/v1 (3 attempts); openai/gpt-4o: HTTP 503:"
        " busy; local/tiny: skipped; ollama/gpt-oss:20b: cannot reach http://h/v1"
    )
    assert len(error.attempts) == 6, "the details keep every attempt"


def failing_backends(*names: str) -> tuple[list[Backend], FakeClock]:
    clock = FakeClock()
    return [
        Backend(cast(LLMProvider, FakeProvider(spec(name, "m"))), CircuitBreaker(CIRCUIT, clock)) for name in names
    ], clock


def fail(chain: _Chain, backend: Backend, kind: UpstreamErrorKind, retry_after_s: float | None = None) -> None:
    error = UpstreamError(kind, backend.name, kind.value, retry_after_s=retry_after_s)
    chain.record(Route(backend, "m"), kind.attempt_outcome, 0.0, error)
    backend.count_failure(error)


def test_an_exhausted_chain_says_the_soonest_a_backend_may_serve_by_its_word_and_its_circuit() -> None:
    (a, b), clock = failing_backends("a", "b")
    chain = _Chain(deadline=0.0, request=EMBEDDING)
    for _ in range(CIRCUIT.failure_threshold):  # its circuit opens on the last: 30 s, longer than its Retry-After
        fail(chain, a, UpstreamErrorKind.SERVER_ERROR, retry_after_s=2.0)
    fail(chain, b, UpstreamErrorKind.RATE_LIMITED, retry_after_s=9.0)

    error = chain.exhausted()

    assert error.retry_after_s == 9.0, "b's word, the sooner; not the last failure's, nor a's Retry-After alone"
    assert error.causes == {UpstreamErrorKind.SERVER_ERROR, UpstreamErrorKind.RATE_LIMITED}
    clock.now += 25.0
    assert chain.exhausted().retry_after_s == pytest.approx(5.0), "a's circuit, later: what is left of it"


def test_an_exhausted_chain_knows_no_wait_when_a_backend_may_serve_at_once() -> None:
    (a, b), _ = failing_backends("a", "b")
    chain = _Chain(deadline=0.0, request=EMBEDDING)
    fail(chain, a, UpstreamErrorKind.RATE_LIMITED, retry_after_s=9.0)
    fail(chain, b, UpstreamErrorKind.RATE_LIMITED)  # no Retry-After, its circuit closed

    assert chain.exhausted().retry_after_s is None
    assert chain.exhausted().causes == {UpstreamErrorKind.RATE_LIMITED}


def test_a_skipped_backend_is_a_cause_of_its_own() -> None:
    (a, b), _ = failing_backends("a", "b")
    for _ in range(CIRCUIT.failure_threshold):
        a.circuit.record_failure()
    chain = _Chain(deadline=0.0, request=EMBEDDING)
    chain.skip(Route(a, "m"))
    fail(chain, b, UpstreamErrorKind.MODEL_NOT_FOUND)

    error = chain.exhausted()

    assert error.causes == {UpstreamErrorKind.UNREACHABLE, UpstreamErrorKind.MODEL_NOT_FOUND}
    assert error.retry_after_s == 30.0, "a's cool-down: no wait makes b serve a model it has not"


def test_a_skip_after_the_calls_own_failure_opened_the_circuit_is_no_cause_of_its_own() -> None:
    # The retry finds the circuit that the failure before it opened: listed as skipped, but the call failed for one
    # cause (the upstream's 429), and its wait is the later of that Retry-After and the cool-down. As a cause of its
    # own, it made the status BACKENDS_UNAVAILABLE with the cool-down alone.
    (a,), _ = failing_backends("a")
    chain = _Chain(deadline=0.0, request=EMBEDDING)
    for _ in range(CIRCUIT.failure_threshold):
        fail(chain, a, UpstreamErrorKind.RATE_LIMITED, retry_after_s=45.0)
    chain.skip(Route(a, "m"))

    error = chain.exhausted()

    assert [attempt.outcome for attempt in error.attempts][-2:] == [AttemptOutcome.RATE_LIMITED, AttemptOutcome.SKIPPED]
    assert error.causes == {UpstreamErrorKind.RATE_LIMITED}
    assert error.retry_after_s == 45.0, "its Retry-After, later than the cool-down's 30 s"
    assert error.last_upstream_error is not None and error.last_upstream_error.kind is UpstreamErrorKind.RATE_LIMITED


def test_a_stream_keeps_a_bounded_part_of_its_text_for_the_gateways_count() -> None:
    """Kept whole, a long answer's text held all of it in memory for a count most upstreams make unneeded."""
    received = _Received("m")
    piece = "x" * 100
    for _ in range(1_000):
        received.add(CompletionChunk(id="c", backend="b", model="m", content=piece, reasoning=piece))

    assert received.kept == sum(map(len, received.texts)) < KEPT_TEXT_CHARS + len(piece)
    assert received.kept + received.beyond == 200_000
