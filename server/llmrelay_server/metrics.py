"""Prometheus metrics, served on `server.metrics_listen` at /metrics, counted by one server interceptor.

The gRPC server's metrics keep the names and labels of grpc-ecosystem's go-grpc-prometheus, so existing dashboards
work: `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_msg_received_total`,
`grpc_server_msg_sent_total`, `grpc_server_handling_seconds`. The gateway's own are `llmrelay_*`, and the OpenTelemetry
GenAI conventions as its Prometheus exporter names them (`gen_ai_client_token_usage`,
`gen_ai_server_time_to_first_token_seconds`). The interceptor reads what the router did from the call's meter
(`metering`) when the call ends: its attempts, what it billed, its first chunk.

Label values come from the configuration only (backend names, key names, the configured models and aliases): any
other model a caller or an upstream names is counted as `other`, so no caller can grow the number of series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmrelay_server.domain import AttemptOutcome, BackendSpec, StoreHealth
from llmrelay_server.metering import Meter, open_meter
from llmrelay_server.observing import GEN_AI_OPERATIONS, ObservingInterceptor, Start

OTHER = "other"
_STREAM_COMPLETE = "/llmrelay.v1.LLMService/StreamComplete"
# The gateway's own time per call is small; the default buckets (5 ms up) would put it all in the first.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# As the GenAI semantic conventions advise for gen_ai.client.token.usage and gen_ai.server.time_to_first_token.
TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_FAILURES = frozenset(AttemptOutcome) - {AttemptOutcome.SUCCEEDED, AttemptOutcome.SKIPPED}
_CIRCUIT_STATES = ("closed", "open", "half_open")


class LabelValues:
    """The closed sets label values are drawn from."""

    def __init__(self, backends: Iterable[BackendSpec], aliases: Iterable[str], callers: Callable[[], Iterable[str]]):
        models: set[str] = set(aliases)
        for spec in backends:
            for model in (spec.default_model, *spec.models, *spec.all_embedding_models):
                models.update((model, f"{spec.name}/{model}"))
        self._models = frozenset(models)
        self._callers = callers

    def model(self, name: str | None) -> str:
        if name is None:
            return "default"
        return name if name in self._models else OTHER

    def caller(self, name: str) -> str:
        return name if name == "anonymous" or name in self._callers() else OTHER


class _Children:
    """A labelled metric's children, kept by their label values: prometheus-client's labels() takes a lock and checks
    and converts every value (about 1 us), and a call touches a dozen; the values come from a closed set."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def _counter(name: str, documentation: str, labels: Sequence[str], *, registry: CollectorRegistry) -> _Children:
    return _Children(Counter(name, documentation, labels, registry=registry))


def _histogram(
    name: str,
    documentation: str,
    labels: Sequence[str],
    *,
    registry: CollectorRegistry,
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
) -> _Children:
    return _Children(Histogram(name, documentation, labels, buckets=buckets, registry=registry))


class Metrics:
    """The gateway's metrics, in a registry of their own (one gateway, one registry)."""

    def __init__(
        self,
        labels: LabelValues,
        circuits: Callable[[], Iterable[tuple[str, str]]],
        state: Callable[[], StateReading],
    ) -> None:
        self.labels = labels
        self.registry = CollectorRegistry(auto_describe=True)
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        r = self.registry
        self.started = _counter("grpc_server_started", "RPCs started on the server.", grpc_labels, registry=r)
        self.handled = _counter(
            "grpc_server_handled", "RPCs completed on the server, by status.", [*grpc_labels, "grpc_code"], registry=r
        )
        self.received = _counter(
            "grpc_server_msg_received", "Messages received by the server.", grpc_labels, registry=r
        )
        self.sent = _counter("grpc_server_msg_sent", "Messages sent by the server.", grpc_labels, registry=r)
        self.handling = _histogram(
            "grpc_server_handling_seconds", "Time from an RPC's start to its end.", grpc_labels, registry=r
        )
        self.attempts = _counter(
            "llmrelay_upstream_attempts", "Attempts at an upstream, by outcome.", ["backend", "outcome"], registry=r
        )
        self.attempt_seconds = _histogram(
            "llmrelay_upstream_attempt_seconds", "Time an attempt at an upstream took.", ["backend"], registry=r
        )
        self.first_chunk = _histogram(
            "llmrelay_upstream_time_to_first_chunk_seconds",
            "Time from a stream's start to its first chunk from an upstream.",
            ["backend"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = _counter(
            "llmrelay_tokens", "Tokens billed, by kind.", ["backend", "model", "caller", "kind"], registry=r
        )
        self.cost = _counter(
            "llmrelay_cost_usd", "What answers cost, in USD.", ["backend", "model", "caller"], registry=r
        )
        self.retries = _counter(
            "llmrelay_retries",
            "Attempts repeated on the same backend, by the failure before.",
            ["backend", "reason"],
            registry=r,
        )
        self.fallbacks = _counter(
            "llmrelay_fallbacks",
            "Moves to another backend, by the failure of the one left.",
            ["backend", "reason"],
            registry=r,
        )
        self.restarts = _counter(
            "llmrelay_stream_restarts",
            "Streams that broke after they started and were started over on the next route, by the backend that broke.",
            ["backend"],
            registry=r,
        )
        self.open_streams = Gauge("llmrelay_open_streams", "StreamComplete calls in progress.", registry=r)
        self.overhead = _histogram(
            "llmrelay_gateway_overhead_seconds",
            "A call's time not spent waiting for an upstream: the gateway's own cost.",
            ["grpc_method"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.gen_ai_tokens = _histogram(
            "gen_ai_client_token_usage",
            "Tokens per operation (OpenTelemetry gen_ai.client.token.usage).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.gen_ai_first_token = _histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first token of a stream (OpenTelemetry gen_ai.server.time_to_first_token).",
            ["gen_ai_operation_name", "gen_ai_request_model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(circuits, state))
        self._server: Any = None
        self.port: int | None = None
        """Where /metrics is served, once serve() bound it."""

    def serve(self, listen: str) -> int:
        """Serves /metrics on HOST:PORT in a thread of its own; the port it bound."""
        host, _, port = listen.rpartition(":")
        self._server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def observe_call(self, rpc: str, meter: Meter, elapsed_s: float, request_model: str | None, operation: str) -> None:
        """What the router did for one call (a GenAI `operation`), from its meter."""
        upstream_s = 0.0
        for attempt in meter.attempts:
            self.attempts(attempt.backend, attempt.outcome.value).inc()
            if attempt.outcome is not AttemptOutcome.SKIPPED:
                self.attempt_seconds(attempt.backend).observe(attempt.duration_s)
                upstream_s += attempt.duration_s
        for before, after in pairwise(meter.attempts):
            # An attempt after a broken stream is its restart (the router sent the marker): not a fallback. A stream
            # that broke with nothing after it ended the call, and was no restart.
            if before.outcome is AttemptOutcome.INTERRUPTED:
                self.restarts(before.backend).inc()
            elif before.outcome in _FAILURES:
                moved = self.retries if after.backend == before.backend else self.fallbacks
                moved(before.backend, before.outcome.value).inc()
        self.overhead(rpc).observe(max(0.0, elapsed_s - upstream_s))
        requested = self.labels.model(request_model)
        if meter.first_chunk_s is not None and meter.first_chunk_backend is not None:
            # Filed under the backend that sent the chunk, even when a restart on another one finished the answer.
            self.first_chunk(meter.first_chunk_backend).observe(meter.first_chunk_s)
            self.gen_ai_first_token("chat", requested).observe(meter.first_chunk_s)
        for billed in meter.billed:
            model, caller, usage = self.labels.model(billed.model), self.labels.caller(billed.caller), billed.usage
            for kind, count in (
                ("prompt", usage.prompt_tokens),
                ("completion", usage.completion_tokens),
                ("cached", usage.cached_prompt_tokens or 0),
                ("reasoning", usage.reasoning_tokens or 0),
            ):
                if count:
                    self.tokens(billed.backend, model, caller, kind).inc(count)
            self.gen_ai_tokens(operation, requested, model, "input").observe(usage.prompt_tokens)
            if operation == "chat":  # an embedding outputs vectors, not tokens
                self.gen_ai_tokens(operation, requested, model, "output").observe(usage.completion_tokens)
            if usage.cost is not None:
                self.cost(billed.backend, model, caller).inc(usage.cost.usd_micros / 1_000_000)


@dataclass(frozen=True, slots=True)
class StateReading:
    """The stores' state at a scrape."""

    stores: list[StoreHealth]
    ledger_queue_depth: int
    ledger_write_failures: int
    ledger_dropped_records: int
    limits_calls_while_unavailable: int


class _StateCollector(Collector):
    """Read at each scrape: the circuits' states, the stores' availability, the ledger's queue."""

    def __init__(self, circuits: Callable[[], Iterable[tuple[str, str]]], state: Callable[[], StateReading]):
        self._circuits = circuits
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        circuit = GaugeMetricFamily(
            "llmrelay_circuit_state", "1 for the state each backend's circuit is in.", labels=["backend", "state"]
        )
        for backend, state in self._circuits():
            for name in _CIRCUIT_STATES:
                circuit.add_metric([backend, name], 1.0 if name == state else 0.0)
        yield circuit
        reading = self._state()
        available = GaugeMetricFamily(
            "llmrelay_store_available",
            "1 while the store works (the usage ledger's database; the limits' Redis), else 0.",
            labels=["role", "kind"],
        )
        for store in reading.stores:
            available.add_metric([store.role.value, store.kind], float(store.available))
        yield available
        yield GaugeMetricFamily(
            "llmrelay_ledger_queue_depth",
            "Usage records not yet in the ledger's database (in memory or journaled on disk).",
            value=reading.ledger_queue_depth,
        )
        yield CounterMetricFamily(
            "llmrelay_ledger_write_failures",
            "Failed writes of the usage ledger (records kept, retried).",
            value=reading.ledger_write_failures,
        )
        yield CounterMetricFamily(
            "llmrelay_ledger_dropped_records",
            "Usage records dropped because the journal was full while the database was down.",
            value=reading.ledger_dropped_records,
        )
        yield CounterMetricFamily(
            "llmrelay_limits_unavailable_calls",
            "Calls admitted uncounted or refused while the limits' store (Redis) was unreachable.",
            value=reading.limits_calls_while_unavailable,
        )


class MetricsInterceptor(ObservingInterceptor):
    """Counts every RPC (the outermost interceptor, so refusals count too) and, for model calls, what the router did."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._labels: dict[str, tuple[str, str, str]] = {}
        """By method path: the methods served, a closed set."""

    def observe(self, details: grpc.HandlerCallDetails, streaming: bool) -> Start:
        labels = self._labels.get(details.method)
        if labels is None:
            service, _, method = details.method[1:].rpartition("/")
            labels = self._labels[details.method] = ("server_stream" if streaming else "unary", service, method)
        operation = GEN_AI_OPERATIONS.get(details.method, "chat")
        # llmrelay_open_streams counts answers streamed: not the health service's watches.
        completion_stream = details.method == _STREAM_COMPLETE
        return lambda request, context: _CountedCall(self._metrics, labels, completion_stream, request, operation)


class _CountedCall:
    __slots__ = ("_completion_stream", "_labels", "_meter", "_metrics", "_operation", "_request", "_sent", "_started")

    def __init__(
        self, metrics: Metrics, labels: tuple[str, str, str], completion_stream: bool, request: Any, operation: str
    ) -> None:
        self._started = time.perf_counter()
        self._metrics, self._labels, self._request = metrics, labels, request
        self._completion_stream, self._operation = completion_stream, operation
        metrics.started(*labels).inc()
        metrics.received(*labels).inc()
        if completion_stream:
            metrics.open_streams.inc()
        self._sent = metrics.sent(*labels)
        self._meter = open_meter()

    def sent(self, message: Any) -> None:
        self._sent.inc()

    def end(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self._started
        metrics, labels = self._metrics, self._labels
        if self._completion_stream:
            metrics.open_streams.dec()
        metrics.handled(*labels, code.name).inc()
        metrics.handling(*labels).observe(elapsed)
        if self._meter.attempts:  # a model call that reached the router
            model = self._request.model if self._request.HasField("model") else None
            metrics.observe_call(labels[2], self._meter, elapsed, model, self._operation)
