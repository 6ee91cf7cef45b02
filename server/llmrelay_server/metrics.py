"""Prometheus metrics, served on `server.metrics_listen` at /metrics, counted by an observer of every call.

The gRPC server's metrics keep the names and labels of grpc-ecosystem's go-grpc-prometheus, so existing dashboards
work: `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_msg_received_total`,
`grpc_server_msg_sent_total`, `grpc_server_handling_seconds`. The gateway's own are `llmrelay_*`, and the OpenTelemetry
GenAI conventions as its Prometheus exporter names them (`gen_ai_client_token_usage`,
`gen_ai_server_time_to_first_token_seconds`). The observer reads what the router did from the call's meter
(`metering`) when the call ends: its attempts, what it billed, its first chunk.

Label values come from the configuration only (backend names, key names, the configured models and aliases): a dated
snapshot an upstream answers with is counted as its configured model, any other model a caller or an upstream names as
`other`, so no caller can grow the number of series.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import errno
import functools
import io
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from llmrelay_server.decoding import STREAM_COMPLETE
from llmrelay_server.domain import Attempt, AttemptOutcome, BackendSpec, StoreHealth, TokenUsage
from llmrelay_server.metering import Meter, moves, open_meter, own_time_s
from llmrelay_server.observing import GEN_AI_OPERATIONS, Context, Kind, Observer, Requests, Start
from llmrelay_server.pricing import undated

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

OTHER = "other"
CALL_BUCKETS = (
    *(bound for bound in Histogram.DEFAULT_BUCKETS if bound != math.inf),
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""prometheus-client's default buckets (5 ms to 10 s; +Inf, which every histogram has, left out), and on to ten
minutes: a model's answer often takes longer than 10 s, and every p50 and p99 past it read as 10 s."""
# The gateway's own time per call is small; the default buckets (5 ms up) would put it all in the first.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# As the GenAI semantic conventions advise for gen_ai.client.token.usage and gen_ai.server.time_to_first_token.
TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_FAILURES = frozenset(AttemptOutcome) - {AttemptOutcome.SUCCEEDED, AttemptOutcome.SKIPPED}
_CIRCUIT_STATES = ("closed", "open", "half_open")
_Series = TypeVar("_Series")


class LabelValues:
    """The closed sets label values are drawn from."""

    def __init__(self, backends: Iterable[BackendSpec], aliases: Iterable[str], callers: Callable[[], Iterable[str]]):
        models: set[str] = set(aliases)
        for spec in backends:
            for model in (spec.default_model, *spec.models, *spec.all_embedding_models):
                models.update((model, f"{spec.name}/{model}"))
        self._models = frozenset(models)
        self._callers = callers
        # Bounded, as an upstream may echo any name a caller asked of it ("openai/anything").
        self._unconfigured = functools.lru_cache(maxsize=1024)(self._snapshot_of)

    def model(self, name: str | None) -> str:
        if name is None:
            return "default"
        return name if name in self._models else self._unconfigured(name)

    def _snapshot_of(self, name: str) -> str:
        # An upstream names the dated snapshot that answered ("gpt-4o-2024-08-06"): filed under the model configured.
        return base if (base := undated(name)) in self._models else OTHER

    def caller(self, name: str) -> str:
        return name if name == "anonymous" or name in self._callers() else OTHER


class _Family(abc.ABC, Generic[_Series]):
    """A metric's series, as plain numbers kept by their label values, exposed at each scrape by `_Kept`.

    prometheus-client's own metric objects take a lock and check the amount at every update, a couple of
    microseconds, and a call makes a dozen updates. Here an update is an addition: only the event loop's thread
    updates (one loop per process), and a scrape, in the metrics server's thread, reads each number whole. Label
    values come from closed sets (`LabelValues`), so the series are few."""

    kind: ClassVar[str]

    def __init__(self, name: str, documentation: str, labels: Sequence[str], new: Callable[[], _Series]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self._series: _MadeAtFirstUse[tuple[str, ...], _Series] = _MadeAtFirstUse(lambda values: new())

    def __call__(self, *values: str) -> _Series:
        return self._series[values]

    def metric(self) -> Metric:
        """The family as a scrape reads it."""
        metric = Metric(self.name, self.documentation, self.kind)
        for values, series in list(self._series.items()):
            self._add_samples(metric, dict(zip(self.labels, values, strict=True)), series)
        return metric

    @abc.abstractmethod
    def _add_samples(self, metric: Metric, labels: dict[str, str], series: _Series) -> None: ...


class _Count:
    """A counter's series. The calls' own updates add to `value` in place (`series.value += 1`): a call makes some
    eight, and a method call for each costs a frame of Python's, about 1% of an everything-on unary call."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


_Key = TypeVar("_Key")


class _MadeAtFirstUse(dict[_Key, _Series]):
    """Series by the one label value that varies, each made at its first use (as prometheus-client's labels() would
    make it) and then found by a plain lookup, with no call of Python's."""

    def __init__(self, make: Callable[[_Key], _Series]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: _Key) -> _Series:
        series = self[key] = self._make(key)
        return series


class _Counted(_Family[_Count]):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels, _Count)

    def _add_samples(self, metric: Metric, labels: dict[str, str], series: _Count) -> None:
        metric.add_sample(f"{self.name}_total", labels, series.value)
        metric.add_sample(f"{self.name}_created", labels, series.created)


class _Distribution:
    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """Per bucket, not cumulative: the observations at most its bound and over the one before (the last: over
        every bound), so that an observation adds to one number."""
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class _Distributed(_Family[_Distribution]):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        bounds = tuple(sorted(buckets))
        super().__init__(name, documentation, labels, lambda: _Distribution(bounds))
        self._le = [*map(floatToGoString, bounds), "+Inf"]

    def _add_samples(self, metric: Metric, labels: dict[str, str], series: _Distribution) -> None:
        total = 0
        for le, count in zip(self._le, list(series.counts), strict=True):
            total += count
            metric.add_sample(f"{self.name}_bucket", {**labels, "le": le}, total)
        metric.add_sample(f"{self.name}_count", labels, total)
        metric.add_sample(f"{self.name}_sum", labels, series.sum)
        metric.add_sample(f"{self.name}_created", labels, series.created)


class _Kept(Collector):
    """Exposes the `_Counted` and `_Distributed` metrics at each scrape, as prometheus-client's own would be."""

    def __init__(self) -> None:
        self._families: list[_Counted | _Distributed] = []

    def counted(self, name: str, documentation: str, labels: Sequence[str]) -> _Counted:
        self._families.append(counted := _Counted(name, documentation, labels))
        return counted

    def distributed(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float] = CALL_BUCKETS
    ) -> _Distributed:
        self._families.append(distributed := _Distributed(name, documentation, labels, buckets))
        return distributed

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.metric()


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
        kept = _Kept()
        self.started = kept.counted("grpc_server_started", "RPCs started on the server.", grpc_labels)
        self.handled = kept.counted(
            "grpc_server_handled", "RPCs completed on the server, by status.", [*grpc_labels, "grpc_code"]
        )
        self.received = kept.counted("grpc_server_msg_received", "Messages received by the server.", grpc_labels)
        self.sent = kept.counted("grpc_server_msg_sent", "Messages sent by the server.", grpc_labels)
        self.handling = kept.distributed(
            "grpc_server_handling_seconds", "Time from an RPC's start to its end.", grpc_labels
        )
        self.attempts = kept.counted(
            "llmrelay_upstream_attempts", "Attempts at an upstream, by outcome.", ["backend", "outcome"]
        )
        self.attempt_seconds = kept.distributed(
            "llmrelay_upstream_attempt_seconds", "Time an attempt at an upstream took.", ["backend"]
        )
        self.first_chunk = kept.distributed(
            "llmrelay_upstream_time_to_first_chunk_seconds",
            "Time from a stream's routing (its attempts, retries and fallbacks) to its first chunk from an upstream.",
            ["backend"],
            FIRST_TOKEN_BUCKETS,
        )
        self.tokens = kept.counted("llmrelay_tokens", "Tokens billed, by kind.", ["backend", "model", "caller", "kind"])
        self.cost = kept.counted("llmrelay_cost_usd", "What answers cost, in USD.", ["backend", "model", "caller"])
        self.retries = kept.counted(
            "llmrelay_retries", "Attempts repeated on the same backend, by the failure before.", ["backend", "reason"]
        )
        self.fallbacks = kept.counted(
            "llmrelay_fallbacks", "Moves to another backend, by the failure of the one left.", ["backend", "reason"]
        )
        self.restarts = kept.counted(
            "llmrelay_stream_restarts",
            "Streams that broke after they started and were started over on the next route, by the backend that broke.",
            ["backend"],
        )
        self.overhead = kept.distributed(
            "llmrelay_gateway_overhead_seconds",
            "A call's time not spent waiting for an upstream: the gateway's own cost.",
            ["grpc_method"],
            OVERHEAD_BUCKETS,
        )
        self.gen_ai_tokens = kept.distributed(
            "gen_ai_client_token_usage",
            "Tokens per operation (OpenTelemetry gen_ai.client.token.usage).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "gen_ai_token_type"],
            TOKEN_BUCKETS,
        )
        self.gen_ai_first_token = kept.distributed(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first token of a stream (OpenTelemetry gen_ai.server.time_to_first_token).",
            ["gen_ai_operation_name", "gen_ai_request_model"],
            FIRST_TOKEN_BUCKETS,
        )
        self.registry.register(kept)
        self.open_streams = Gauge("llmrelay_open_streams", "StreamComplete calls in progress.", registry=self.registry)
        self.registry.register(_StateCollector(circuits, state))
        # By configured names and label values alone: as few as the series.
        self._backends: _MadeAtFirstUse[str, _Backend] = _MadeAtFirstUse(lambda name: _Backend(self, name))
        self._billed: _MadeAtFirstUse[tuple[tuple[str, str, str], str, str], _Billed] = _MadeAtFirstUse(
            lambda key: _Billed(self, *key)
        )
        """By the labels of what was billed, the model asked for (as a label) and the operation."""
        self._server: Any = None
        self.port: int | None = None
        """Where /metrics is served, once serve() bound it."""

    def serve(self, listen: str) -> int:
        """Serves /metrics on HOST:PORT in a thread of its own; the port it bound."""
        self._server = serve_metrics(listen, self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def observe_call(
        self,
        overhead: _Distribution,
        meter: Meter,
        started: float,
        elapsed_s: float,
        request_model: str | None,
        operation: str,
    ) -> None:
        """What the router did for one call (a GenAI `operation`) that began at `started` (time.perf_counter()) and
        took `elapsed_s`, from its meter; `overhead`, its method's series of the gateway's own time."""
        attempts = meter.attempts
        for attempt in attempts:
            backend = self._backends[attempt.backend]
            backend.attempts[attempt.outcome].value += 1
            if attempt.started_at is not None:  # not a route passed over, whose upstream was never asked
                backend.seconds.observe(attempt.duration_s)
        if len(attempts) > 1:
            self._moves(attempts)
        overhead.observe(own_time_s(meter, elapsed_s))
        requested = self.labels.model(request_model)
        if meter.first_chunk_at is not None and meter.first_chunk_backend is not None:
            # Filed under the backend that sent the chunk, even when a restart on another one finished the answer; the
            # upstreams' share of the wait, which a long prompt's admission does not make look slower.
            assert meter.first_chunk_routed_s is not None, "set with first_chunk_at"
            self._backends[meter.first_chunk_backend].first_chunk().observe(meter.first_chunk_routed_s)
            self.gen_ai_first_token("chat", requested).observe(meter.first_chunk_at - started)
        for billed in meter.billed:
            labels = (billed.backend, self.labels.model(billed.model), self.labels.caller(billed.caller))
            self._billed[labels, requested, operation].add(billed.usage)

    def _moves(self, attempts: Sequence[Attempt]) -> None:
        for _, before, after in moves(attempts):
            # An attempt after a broken stream is its restart (the router sent the marker): not a fallback. A stream
            # that broke with nothing after it ended the call, and was no restart.
            if before.outcome is AttemptOutcome.INTERRUPTED:
                self.restarts(before.backend).inc()
            elif before.outcome in _FAILURES:
                moved = self.retries if after.backend == before.backend else self.fallbacks
                moved(before.backend, before.outcome.value).inc()


class _Backend:
    """A backend's series of attempts, looked up once rather than at every call; made with its first attempt (its
    time's series then too, empty while every attempt is skipped), and its first chunk's with its first stream."""

    __slots__ = ("_first_chunk", "_metrics", "attempts", "name", "seconds")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics, self.name = metrics, name
        self.seconds = metrics.attempt_seconds(name)
        self._first_chunk: _Distribution | None = None
        self.attempts: _MadeAtFirstUse[AttemptOutcome, _Count] = _MadeAtFirstUse(
            lambda outcome: metrics.attempts(name, outcome.value)
        )

    def first_chunk(self) -> _Distribution:
        if self._first_chunk is None:
            self._first_chunk = self._metrics.first_chunk(self.name)
        return self._first_chunk


class _Billed:
    """The series that one kind of billed answer adds to: its backend, model and caller (as labels), the model asked
    for and the operation. Each is looked up once, and made at its first use (a series of cached tokens appears with
    the first cached token), as prometheus-client's labels() would make it."""

    __slots__ = ("_kinds", "_labels", "_metrics", "cost", "input", "output")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str], requested: str, operation: str) -> None:
        self._metrics, self._labels = metrics, labels
        model = labels[1]
        self.input = metrics.gen_ai_tokens(operation, requested, model, "input")
        # An embedding outputs vectors, not tokens.
        self.output = metrics.gen_ai_tokens(operation, requested, model, "output") if operation == "chat" else None
        self.cost: _Count | None = None
        self._kinds: _MadeAtFirstUse[str, _Count] = _MadeAtFirstUse(lambda kind: metrics.tokens(*labels, kind))

    def add(self, usage: TokenUsage) -> None:
        for kind, count in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached", usage.cached_prompt_tokens),
            ("cache_write", usage.cache_write_prompt_tokens),
            ("reasoning", usage.reasoning_tokens),
        ):
            if count:
                self._kinds[kind].value += count
        self.input.observe(usage.prompt_tokens)
        if self.output is not None:
            self.output.observe(usage.completion_tokens)
        if usage.cost is not None:
            if self.cost is None:
                self.cost = self._metrics.cost(*self._labels)
            self.cost.value += usage.cost.usd_micros / 1_000_000


@dataclass(frozen=True, slots=True)
class StateReading:
    """The stores' state at a scrape."""

    stores: list[StoreHealth]
    ledger_queue_depth: int
    ledger_write_failures: int
    ledger_dropped_records: int
    limits_calls_while_unavailable: int
    certificate_not_after: float | None = None
    """When the TLS certificate served stops being valid, in Unix time; None without TLS."""


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
        if reading.certificate_not_after is not None:
            yield GaugeMetricFamily(
                "llmrelay_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate served to new connections stops being valid (its notAfter), in Unix time.",
                value=reading.certificate_not_after,
            )


class MetricsObserver(Observer):
    """Counts every RPC (the outermost observer, before auth and limits, so refusals count too) and, for model calls,
    what the router did."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def observe(self, method: str, kind: Kind) -> Start:
        counted = _Method(self._metrics, method, kind)
        # Partials rather than lambdas: a call is counted with no frame of Python's before the constructor.
        if kind in (Kind.CLIENT_STREAM, Kind.BIDI_STREAM):
            return functools.partial(_CountedRequests, counted)
        return functools.partial(_CountedCall, counted)


class _Method:
    """One method's series, looked up once rather than at every call."""

    __slots__ = (
        "_overhead",
        "completion_stream",
        "handled",
        "handling",
        "labels",
        "metrics",
        "operation",
        "received",
        "sent",
        "started",
    )

    def __init__(self, metrics: Metrics, method: str, kind: Kind) -> None:
        service, _, name = method[1:].rpartition("/")
        self.metrics, self.labels = metrics, (kind.value, service, name)
        self.operation = GEN_AI_OPERATIONS.get(method, "chat")
        # llmrelay_open_streams counts answers streamed: not the health service's watches.
        self.completion_stream = method == STREAM_COMPLETE
        self.started, self.received = metrics.started(*self.labels), metrics.received(*self.labels)
        self.sent, self.handling = metrics.sent(*self.labels), metrics.handling(*self.labels)
        self._overhead: _Distribution | None = None
        self.handled: _MadeAtFirstUse[grpc.StatusCode, _Count] = _MadeAtFirstUse(
            lambda code: metrics.handled(*self.labels, code.name)
        )
        """The series of calls that ended with each status."""

    def overhead(self) -> _Distribution:
        """The method's series of the gateway's own time, made at its first call that reached the router."""
        if self._overhead is None:
            self._overhead = self.metrics.overhead(self.labels[2])
        return self._overhead


class _CountedCall:
    __slots__ = ("_meter", "_method", "_request", "_started")

    sent = None  # the messages are counted at the end, not one by one

    def __init__(self, method: _Method, request: Any, context: Context) -> None:
        self._started = time.perf_counter()
        self._method, self._request = method, request
        method.started.value += 1
        method.received.value += 1
        if method.completion_stream:
            method.metrics.open_streams.inc()
        self._meter = open_meter()

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        elapsed = time.perf_counter() - self._started
        method = self._method
        if messages:
            method.sent.value += messages
        if method.completion_stream:
            method.metrics.open_streams.dec()
        method.handled[code].value += 1
        method.handling.observe(elapsed)
        if self._meter.attempts:  # a model call that reached the router
            model = self._request.model if self._request.HasField("model") else None
            method.metrics.observe_call(method.overhead(), self._meter, self._started, elapsed, model, method.operation)


class _CountedRequests(_CountedCall):
    """A call that streams requests: they are counted at its end, as many as its handler read."""

    __slots__ = ()

    def __init__(self, method: _Method, requests: Requests, context: Context) -> None:
        self._started = time.perf_counter()
        self._method, self._request = method, requests
        method.started.value += 1
        self._meter = open_meter()

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        if received := self._request.received:
            self._method.received.value += received
        super().end(code, messages)


METRICS_READ_TIMEOUT_S = 10.0
"""How long a connection to /metrics may take to send its whole request (however it trickles it in), and then to take
its answer: each holds a thread meanwhile."""
METRICS_CONNECTIONS = 16
"""How many connections /metrics serves at once, each in a thread of its own."""
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _ReadBy(io.RawIOBase):
    """A connection's reads, all before one deadline: a socket timeout is each read's, and a client that sends a byte
    at a time within it would hold the connection for as long as it goes on."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self._connection, self._deadline = connection, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long")
        self._connection.settimeout(left)
        return self._connection.recv_into(buffer)


class _MetricsRequestHandler(WSGIRequestHandler):
    """prometheus-client's handler, with a deadline: its own has none, and a connection that never finishes its
    request holds a thread of the gateway's for ever (anyone who reaches the port could add threads without end)."""

    timeout = METRICS_READ_TIMEOUT_S
    """For the whole request, from the connection's start; then again for the answer (each the socket's timeout)."""

    server: _MetricsServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_ReadBy(self.connection, time.monotonic() + self.timeout))

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        # Its request read: the connection can no longer make way for another (and has its own time to answer).
        self.connection.settimeout(self.timeout)
        return self.server.read(self.connection) and parsed

    def handle(self) -> None:
        # The connection closes: timed out, or reset by its client (a port scan, a TCP health check), for which
        # socketserver would print a traceback.
        with contextlib.suppress(TimeoutError, ConnectionError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged, as prometheus-client's own handler logs none."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """At most METRICS_CONNECTIONS connections at once, each in its own thread. Past that, a new one takes the place
    of the oldest still sending its request (Prometheus sends its own at once: a scrape is answered while others
    trickle theirs), or, where all are being answered, is refused with a 503, without a thread."""

    daemon_threads = True  # as prometheus-client's: a scrape in progress does not hold up the process's exit
    request_queue_size = 128  # socketserver's 5 reset connections opened back to back
    connections = METRICS_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._beside: list[_MetricsServer] = []
        """The servers of the same port at its other addresses (`serve_beside`); before the bind, which closes this
        one when it fails."""
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._served: set[socket.socket] = set()
        self._reading: dict[socket.socket, None] = {}
        """The connections still sending their request, the oldest first."""

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._served) >= self.connections and self._reading:
                oldest = next(iter(self._reading))
                del self._reading[oldest]
                self._served.discard(oldest)
                # Its thread's read ends at once, and the thread with it (which closes it, not before it leaves
                # these sets: under this lock, so no other socket can have its number yet).
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)
            admitted = len(self._served) < self.connections
            if admitted:
                self._served.add(request)
                self._reading[request] = None
        if admitted:
            super().process_request(request, client_address)
            return
        with contextlib.suppress(OSError):
            request.setblocking(False)  # never waits here, in the thread that accepts
            request.send(_BUSY)
        self.shutdown_request(request)

    def serve_beside(self, other: _MetricsServer) -> None:
        """Serves with `other`, on the same port at another address: within its bound on connections (one for the
        port, whatever its addresses), and stopped and closed with it."""
        self._lock, self._served, self._reading = other._lock, other._served, other._reading
        other._beside.append(self)

    def shutdown(self) -> None:
        super().shutdown()
        for other in self._beside:
            other.shutdown()

    def server_close(self) -> None:
        super().server_close()
        for other in self._beside:
            other.server_close()

    def read(self, request: socket.socket) -> bool:
        """Marks `request` as read; False where it was let go meanwhile, to make way for another."""
        with self._lock:
            if request not in self._reading:
                return False
            del self._reading[request]
            return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._served.discard(request)
            self._reading.pop(request, None)
        super().shutdown_request(request)


def cannot_serve(listen: str, exc: OSError) -> str:
    """What a person is told when /metrics cannot be served on `listen` (serve_metrics' OSError), with the fix."""
    return f"cannot serve metrics on {listen}: {exc.strerror}; choose another with server.metrics_listen"


def serve_metrics(listen: str, registry: CollectorRegistry) -> WSGIServer:
    """prometheus-client's /metrics (its WSGI app, as start_http_server serves it) on HOST:PORT, in a thread of its
    own, each connection in its own thread for at most METRICS_READ_TIMEOUT_S of waiting; OSError when it cannot
    bind.

    0.0.0.0 is every address, IPv6's too, as gRPC takes it for the gateway's own port: on a cluster that reaches pods
    by IPv6 (single-stack, or dual-stack IPv6 first), an IPv4 socket alone refused every scrape while the probes on
    the gRPC port passed. Both stacks where the system has IPv6, else IPv4 alone. localhost is both loopbacks, as
    gRPC takes it too, on one port (`_serve_loopbacks`)."""
    host, _, port = listen.rpartition(":")
    if host.lower() == "localhost":
        servers = _serve_loopbacks(int(port), registry)
    elif host == "0.0.0.0" and socket.has_ipv6:
        try:
            servers = [_bound("[::]", int(port), registry)]
        except OSError as exc:
            if exc.errno not in NOT_THIS_MACHINES:
                raise
            servers = [_bound(host, int(port), registry)]
    else:
        servers = [_bound(host, int(port), registry)]
    for server in servers:
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return servers[0]


NOT_THIS_MACHINES: Final = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
"""What a bind fails with at an address that is not this machine's (IPv6's, where the system has no IPv6)."""
FREE_PORT_TRIES: Final = 10
"""How many free ports are tried for one free at each of several addresses (port 0 asked for)."""


def _serve_loopbacks(port: int, registry: CollectorRegistry) -> list[_MetricsServer]:
    """Servers on 127.0.0.1:PORT and [::1]:PORT (none there where the system has no IPv6), the second stopped with the
    first; OSError when either address is taken. At the first address alone, as getaddrinfo gave it (::1 where
    /etc/hosts names it localhost too, as Debian's and Docker's do), a Prometheus scraping the other was refused, and
    another process could hold the port there unseen. Port 0: a port free at both."""
    for _ in range(FREE_PORT_TRIES if port == 0 else 1):
        first = _bound("127.0.0.1", port, registry)
        try:
            second = _bound("[::1]", first.server_port, registry)
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or exc.errno in NOT_THIS_MACHINES:
                return [first]  # no IPv6 here: 127.0.0.1 alone, as gRPC serves localhost then
            first.server_close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the free port of 127.0.0.1 is taken at ::1: another free port
            raise
        second.serve_beside(first)
        return [first, second]
    raise OSError(errno.EADDRINUSE, "no port was free at both 127.0.0.1 and ::1")


def _bound(host: str, port: int, registry: CollectorRegistry) -> _MetricsServer:
    """A server bound to HOST:PORT, not serving yet."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except UnicodeError as exc:  # a name IDNA cannot encode ("a..b", a label over 63 characters)
        raise OSError(errno.EINVAL, "not a host name") from exc

    class Server(_MetricsServer):
        address_family = family  # IPv6 where HOST is one (socketserver's default is IPv4)

        def server_bind(self) -> None:
            if family == socket.AF_INET6 and address[0] == "::":
                # Both stacks, whatever the system's default for a new socket (net.ipv6.bindv6only).
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    return make_server(str(address[0]), port, make_wsgi_app(registry), Server, _MetricsRequestHandler)
