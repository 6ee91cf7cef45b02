"""OpenTelemetry traces (the `llmrelay[otel]` extra), on when `server.tracing` is set.

One server span per RPC, named as gRPC's conventions name it ("llmrelay.v1.LLMService/Complete"), continuing the
caller's trace context (W3C `traceparent` / `tracestate` in the call's metadata); under it, one client span per
upstream attempt with the GenAI semantic conventions' attributes, and events on the RPC span for retries, fallbacks
and stream restarts. Every upstream request of the call carries the RPC span's `traceparent` (`Meter.upstream_headers`).

Like the metrics, the observer reads what the router did from the call's meter (`metering`) when the call ends, so
the router knows nothing of tracing: the attempt spans are made then, from when each attempt began and how long it
took, as the router recorded them.

Spans go by OTLP in batches, over HTTP (`http/protobuf`, the specification's default) or gRPC as
OTEL_EXPORTER_OTLP_PROTOCOL says, to OTEL_EXPORTER_OTLP_ENDPOINT; the SDK reads the other OTEL_* variables (service
name, resource attributes, sampler, headers, batch sizes). The gateway's stop waits for the spans still queued at most
OTEL_EXPORTER_OTLP_TIMEOUT seconds in all, and not at all when told to stop now. Prompts and answers are recorded only
when `server.log_content` is set.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from llmrelay_server.config import ConfigError, GatewayConfig
from llmrelay_server.convert import MAX_MODEL_NAME
from llmrelay_server.decoding import decoded, invocation_metadata
from llmrelay_server.domain import Attempt, AttemptOutcome, BackendSpec, without_quotes
from llmrelay_server.metering import Billed, Meter, moves, open_meter, served_by
from llmrelay_server.observing import GEN_AI_OPERATIONS, Kind, Observer, Start
from llmrelay_server.threads import in_daemon_thread

if TYPE_CHECKING:
    # Imported where they are used, once the variables the SDK reads as it is imported are checked (_check_span_limits).
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

# A cancelled attempt is no error of the backend's (the caller left), as a CANCELLED RPC is none of the server's.
_FAILURES = frozenset(AttemptOutcome) - {AttemptOutcome.SUCCEEDED, AttemptOutcome.SKIPPED, AttemptOutcome.CANCELLED}
# A stream the caller left mid-way is billed for what it consumed.
_BILLED = frozenset({AttemptOutcome.SUCCEEDED, AttemptOutcome.INTERRUPTED, AttemptOutcome.CANCELLED})
# The codes that are the server's own failure, as OpenTelemetry's RPC conventions set a server span's status.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
Attributes = dict[str, AttributeValue]
# What the SDK's BatchSpanProcessor reads, and the rule its values must keep, for the error when they break it.
_BATCH_VARIABLES = ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_SCHEDULE_DELAY")
_BATCH_NUMBERS = {
    "OTEL_BSP_MAX_QUEUE_SIZE": " (of spans)",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": " (of spans)",
    "OTEL_BSP_SCHEDULE_DELAY": " (of milliseconds)",
    "OTEL_BSP_EXPORT_TIMEOUT": " (of milliseconds) above 0",
}
"""The OTEL_BSP_* variables, each a whole number, and of what."""
_BATCH_LEAST = {"OTEL_BSP_EXPORT_TIMEOUT": 1}
"""The least the SDK takes where it checks no bound itself (an export timeout of 0 or less fails every batch)."""
_BATCH_RULE = (
    "OTEL_BSP_MAX_QUEUE_SIZE (2048 by default), OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) and OTEL_BSP_SCHEDULE_DELAY (5000"
    " ms) must be positive, and the batch size at most the queue size"
)
# As the OTLP exporters read them: the traces' own variable first.
_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_HEADERS_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
DEFAULT_EXPORT_TIMEOUT_S = 10.0
MAX_EXPORT_TIMEOUT_S = 600.0
"""The most OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT may say: a stop waits that long for a collector that does not answer,
and a larger figure is likely the specification's milliseconds, where the SDK's exporters read seconds."""
_ATTRIBUTE_LENGTH_VARIABLES = ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT")
DEFAULT_ATTRIBUTE_LENGTH = 8192
"""The longest attribute value a span keeps unless those variables say otherwise (the SDK's default is no limit): a
span waits in the export queue (up to 2,048 of them) with its attributes, and one (a prompt recorded with
log_content, an upstream's long error) may be megabytes."""
_SPAN_LIMIT_VARIABLES = (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
)
"""The SDK's span limits, each a whole number from 0 up (blank: no limit)."""
_COMPRESSION_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
_FILE_VARIABLES = tuple(
    f"OTEL_EXPORTER_OTLP{signal}_{what}"
    for signal in ("_TRACES", "")
    for what in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE")
)
"""The collector's TLS files, as the exporters read them: the CA's certificate, the client's key and certificate."""

log = logging.getLogger(__name__)

# Where OpenTelemetry's W3C propagators warn about the headers they read: a traceparent over 512 characters, a
# tracestate with a malformed member or more than 32, baggage over its limits.
_PROPAGATION_LOGGERS = (
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.trace.span",
    "opentelemetry.baggage.propagation",
)
_reading_callers_headers: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "reading_callers_headers", default=False
)


class _CallersHeaders(logging.Filter):
    """Drops what the propagators log while the gateway reads a caller's trace headers: headers the caller got wrong
    are its mistake, as a malformed request is, and not worth a warning a call (the call starts a trace of its own, or
    leaves the bad part out). What they log at other times (the gateway's own use of the API) goes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _reading_callers_headers.get()


_callers_headers = _CallersHeaders()
for _name in _PROPAGATION_LOGGERS:
    logging.getLogger(_name).addFilter(_callers_headers)  # once: a filter already there is not added again


def _callers_context(propagator: TextMapPropagator, carrier: dict[str, list[str]]) -> Context:
    """The trace context the caller's headers carry, read without a log line for what is wrong with them."""
    token = _reading_callers_headers.set(True)
    try:
        return propagator.extract(carrier)
    finally:
        _reading_callers_headers.reset(token)


def exporting_provider() -> TracerProvider:
    """A provider that exports by OTLP through a BatchSpanProcessor, as the OTEL_* variables say."""
    _unset_empty_variables()
    _check_span_limits()
    _check_sampler()
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider  # it reads OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llmrelay"}))
    limited = any(name in os.environ for name in _ATTRIBUTE_LENGTH_VARIABLES)
    limits = None if limited else SpanLimits(max_attribute_length=DEFAULT_ATTRIBUTE_LENGTH)
    attributes_log = logging.getLogger("opentelemetry.attributes")
    if _not_cut_values not in attributes_log.filters:
        attributes_log.addFilter(_not_cut_values)
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(_batch_processor(_otlp_exporter()))
    return provider


def _unset_empty_variables() -> None:
    """The specification reads an empty OTEL_* variable as unset, and the SDK does not always (an empty
    OTEL_EXPORTER_OTLP_TIMEOUT fails the gRPC exporter's start, an empty OTEL_BSP_* logs a traceback): removed from the
    environment, they are unset to every reader."""
    for name in [name for name, value in os.environ.items() if name.startswith("OTEL_") and not value]:
        del os.environ[name]


def _not_cut_values(record: logging.LogRecord) -> bool:
    """Whether the SDK's line is not its warning that it cut a value to the length limit: that is what the limit is
    for, and it warned twice a call with a long prompt recorded (log_content) or a model's long name."""
    return not record.msg.startswith("String attribute value exceeds max length")


def _check_span_limits() -> None:
    """The span limits, as the SDK reads them: it raises a ValueError for a value it cannot take, for
    OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT as it is imported, a traceback at the start either way."""
    for name in _SPAN_LIMIT_VARIABLES:
        _check_whole_number(name, " from 0 up", least=0, blank_is_unset=True)


def _batch_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    """The SDK's BatchSpanProcessor, which reads the OTEL_BSP_* variables; a ConfigError naming them where their values
    do not fit together (the SDK's ValueError names its parameters, not the variables that set them)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    for name, unit in _BATCH_NUMBERS.items():
        # As the SDK reads them, which logs a traceback for one it cannot and uses its default.
        _check_whole_number(name, unit, least=_BATCH_LEAST.get(name))
    try:
        return BatchSpanProcessor(exporter)
    except ValueError as exc:
        settings = ", ".join(f"{name}={os.environ[name]}" for name in _BATCH_VARIABLES if name in os.environ)
        raise ConfigError(f"{settings}: {_BATCH_RULE} ({str(exc).rstrip('.')})") from None


def _check_whole_number(name: str, what: str, *, least: int | None = None, blank_is_unset: bool = False) -> None:
    """A ConfigError unless the variable `name`, where set, is a whole number (`least` at least), as int() reads it;
    `what` says more of the number (its unit, its bounds)."""
    value = os.environ.get(name)
    if value is None or (blank_is_unset and not value.strip()):
        return
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or (least is not None and number < least):
        raise ConfigError(f"{name}: {value!r} is not a whole number{what}")


def export_timeout_s() -> float:
    """How long the exporter may take over the spans, retries included, as OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT say."""
    for name in _TIMEOUT_VARIABLES:
        if value := os.environ.get(name):  # empty: unset, as the specification says (_unset_empty_variables)
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds > 0):
                raise ConfigError(f"{name}: {value!r} is not a number of seconds above 0 (10 by default)")
            if seconds > MAX_EXPORT_TIMEOUT_S:
                raise ConfigError(
                    f"{name}: {value!r} is over {MAX_EXPORT_TIMEOUT_S:g} seconds, which a stop would wait for a"
                    " collector that does not answer (the exporter reads seconds, not the specification's milliseconds)"
                )
            return seconds
    return DEFAULT_EXPORT_TIMEOUT_S


def _otlp_exporter() -> SpanExporter:
    variable = next((name for name in _PROTOCOL_VARIABLES if os.environ.get(name)), None)
    protocol = os.environ[variable] if variable else "http/protobuf"
    _check_endpoint(grpc_target=protocol == "grpc")
    _check_headers()
    _check_tls_files(grpc_target=protocol == "grpc")
    if protocol == "grpc":
        _check_compression({"gzip"}, "gzip (unset: none)")  # others, `none` too, fail the exporter's start
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        return GRPCExporter()
    if protocol == "http/protobuf":
        _check_compression({"none", "gzip", "deflate"}, "none, gzip or deflate")  # others, it warns and sends none
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        return HTTPExporter()
    raise ConfigError(f"{variable}: {protocol!r} is not supported (grpc or http/protobuf)")


def _check_compression(taken: set[str], said: str) -> None:
    """OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION, as the exporter reads it (the traces' own first, any case)."""
    name = next((name for name in _COMPRESSION_VARIABLES if name in os.environ), None)
    if name is not None and os.environ[name].strip().lower() not in taken:
        raise ConfigError(f"{name}: {os.environ[name]!r} is no compression the exporter takes: {said}")


def _check_propagators() -> None:
    """OTEL_PROPAGATORS, as OpenTelemetry reads it as it is imported: it raises a ValueError (a traceback at the start)
    for a propagator that is not installed, a misspelt one."""
    configured = os.environ.get("OTEL_PROPAGATORS")
    if not configured:
        return
    installed = sorted(entry.name for entry in entry_points(group="opentelemetry_propagator"))
    for name in (part.strip() for part in configured.split(",")):
        if name.lower() == "none":  # no propagation, whatever follows
            return
        if name not in installed:
            raise ConfigError(f"OTEL_PROPAGATORS: {name!r} is no propagator installed: {', '.join(installed)} or none")


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
"""The values of OTEL_TRACES_SAMPLER the SDK takes (any case)."""
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")


def _check_sampler() -> None:
    """The sampler the SDK reads from OTEL_TRACES_SAMPLER(_ARG): a misspelt one it replaces by its default with a
    warning, and so traces every call (where the operator meant to trace a tenth); a ratio it cannot read, by 1.0."""
    sampler = os.environ.get("OTEL_TRACES_SAMPLER", "").lower()  # as the SDK reads it: a space is no sampler
    if not sampler:
        return
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is no sampler the SDK takes: one of {', '.join(SAMPLERS)}")
    text = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    if sampler in _RATIO_SAMPLERS and text:  # unset: all of them, as the specification says
        try:
            ratio = float(text)
        except ValueError:
            ratio = math.nan
        if not 0 <= ratio <= 1:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG: {text!r} is not the share of traces {sampler} keeps, a number from 0 to 1"
            )


def _check_endpoint(*, grpc_target: bool) -> None:
    """The collector's address, as the exporter reads it: one it cannot send to would fail every batch, logging an
    error each time with the address (and any password in it). Not shown: it may hold a password."""
    name = next((name for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None)
    if name is None:
        return
    endpoint = os.environ[name]
    example = "http://localhost:4317" if grpc_target else "http://localhost:4318"
    if grpc_target and ("://" not in endpoint or endpoint.startswith("dns://")):
        # gRPC's exporter passes what is no URL with a host to gRPC as its target: HOST:PORT, or a name resolver's.
        host, _, port = endpoint.rpartition(":")
        if endpoint.startswith(_GRPC_TARGET_SCHEMES):
            return
        if host and _is_port(port):
            if "@" in host:
                raise _credentials_in_grpc_address(name)
            return
        raise ConfigError(
            f"{name}: not a URL, HOST:PORT nor gRPC target (its value is not shown); write e.g. {example}"
        )
    try:
        url = urlsplit(endpoint)
        url.port  # noqa: B018 (reading it validates it)
    except ValueError:  # its words quote the value
        raise ConfigError(f"{name}: not a URL (its host or port cannot be read); write e.g. {example}") from None
    if grpc_target:
        if "@" in url.netloc:
            raise _credentials_in_grpc_address(name)
        return  # any scheme: the exporter takes the host and port of a URL that has them, else the whole as a target
    if url.scheme not in ("http", "https"):
        why = f"its scheme is {url.scheme!r}" if url.scheme else "it has no scheme"
        raise ConfigError(f"{name}: not an http(s) URL ({why}); write e.g. {example}")
    if not url.hostname:
        raise ConfigError(f"{name}: not an http(s) URL (it names no host); write e.g. {example}")


def _credentials_in_grpc_address(name: str) -> ConfigError:
    """gRPC's exporter takes a user and password in the collector's address as part of its host: every export would
    fail, logging the address, password and all."""
    return ConfigError(
        f"{name}: gRPC takes no user or password in the collector's address (its value is not shown): send the"
        " collector's credentials as a header in OTEL_EXPORTER_OTLP_HEADERS, e.g. authorization=Basic%20BASE64"
    )


_GRPC_TARGET_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
"""gRPC's name resolvers (doc/naming.md in grpc/grpc), as a target's prefix."""


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
"""An HTTP header's name (RFC 9110's token), shown in an error: anything else may be a value that lost its name."""


class _Silenced(logging.Filter):
    """Drops what OpenTelemetry's header parser logs of a header it drops: the header, its secret with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _check_headers() -> None:
    """The headers sent with every export (a collector's key, usually): the exporter would drop one it cannot read,
    log it, value and all, and export without it. Refused here, named by its name alone."""
    parser_log = logging.getLogger("opentelemetry.util.re")
    silenced = _Silenced()
    parser_log.addFilter(silenced)
    try:
        for name in _HEADERS_VARIABLES:
            for header in os.environ.get(name, "").split(","):  # as the parser splits them, blanks around dropped
                if header.strip() and not parse_env_headers(header.strip(), liberal=True):  # as the exporters read
                    raise ConfigError(
                        f"{name}: {_header_named(header)} is not NAME=VALUE with the value URL-encoded (a `;`, `,`,"
                        ' `\\` or `"` in it as %3B, %2C, %5C, %22); its value is not shown'
                    )
    finally:
        parser_log.removeFilter(silenced)


def _check_tls_files(*, grpc_target: bool) -> None:
    """The collector's TLS files, where named, readable: the gRPC exporter logs a traceback for one it cannot read at
    the start and goes on without it, and the HTTP one fails every batch."""
    for name in _FILE_VARIABLES:
        if path := os.environ.get(name):
            if not grpc_target and name.endswith("_CERTIFICATE") and "CLIENT" not in name and os.path.isdir(path):
                continue  # the HTTP exporter's requests takes a folder of CA certificates too
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {path!r} ({exc.strerror or exc})") from None


def _header_named(header: str) -> str:
    """A header by its name, where it has one: a piece of a value cut by a comma is no name, but part of a secret."""
    name, named, _ = header.partition("=")
    return repr(name.strip()) if named and _HEADER_NAME.fullmatch(name.strip()) else "a header"


provider_factory: Callable[[], TracerProvider] = exporting_provider
"""What the gateway builds its tracer provider with (tests put one with an in-memory exporter here)."""


class Tracing:
    """The gateway's own tracer provider (the global one is left alone) and the observer that traces calls."""

    def __init__(self, config: GatewayConfig) -> None:
        self.stop_timeout_s = export_timeout_s()
        self.provider = provider_factory()
        tracer = self.provider.get_tracer("llmrelay_server")
        self.observer = TracingObserver(tracer, _propagator(), config.backends, log_content=config.server.log_content)

    async def stop(self, hurry: asyncio.Event) -> None:
        """Exports the spans still queued, waiting at most the export timeout in all, and not at all once `hurry` is set
        (told to stop now). The SDK's shutdown gives each batch in turn the whole timeout: with the collector down and
        thousands of spans queued, the stop would take 30 s, when the SDK gives up waiting."""
        # A daemon thread, as the SDK's exporting one is: left blocked on the collector, it does not hold up the exit.
        export = asyncio.ensure_future(in_daemon_thread(self.provider.shutdown, "llmrelay-tracing-stop"))
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            await asyncio.wait((export, hurried), timeout=self.stop_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            export.cancel()  # the loser, or both after the timeout; nothing once done
            hurried.cancel()
        # A shutdown that failed exported nothing for sure: said as one that did not finish.
        if export.done() and not export.cancelled() and export.exception() is None:
            return
        if hurry.is_set():
            log.warning("tracing: stopping now, without waiting for the spans still queued, if any: they are lost")
        else:
            log.warning(
                "tracing: the spans still queued were not exported within %g s, the OTLP export timeout, and are lost"
                " (is the collector at OTEL_EXPORTER_OTLP_ENDPOINT up?)",
                self.stop_timeout_s,
            )


def _propagator() -> TextMapPropagator:
    """The propagators OTEL_PROPAGATORS names (W3C trace context and baggage by default), which read the caller's
    trace context and write the upstream requests'."""
    _check_propagators()
    from opentelemetry import propagate  # it loads them as it is imported

    return propagate.get_global_textmap()


class TracingObserver(Observer):
    def __init__(
        self,
        tracer: trace.Tracer,
        propagator: TextMapPropagator,
        backends: Iterable[BackendSpec],
        *,
        log_content: bool,
    ) -> None:
        self._tracer = tracer
        self._propagator = propagator
        self._kinds = {spec.name: spec.kind for spec in backends}
        self._log_content = log_content

    def observe(self, method: str, kind: Kind) -> Start:
        name, streaming = method[1:], kind in (Kind.SERVER_STREAM, Kind.BIDI_STREAM)
        return lambda request, context: _Call(self, name, invocation_metadata(context), request, streaming)


class _Call:
    """One traced RPC: its span from the start, the attempt spans and events from its meter at the end."""

    def __init__(self, observer: TracingObserver, name: str, metadata: Any, request: Any, streaming: bool) -> None:
        self._i = observer
        self.streaming = streaming
        self.operation = GEN_AI_OPERATIONS.get(f"/{name}")
        self.model_call = self.operation is not None
        service, _, method = name.rpartition("/")
        attributes: Attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        if self.operation is not None:
            attributes["gen_ai.operation.name"] = self.operation
        # A request that did not decode has no fields to read: the handler refuses it.
        if self.operation is not None and decoded(request):
            if request.HasField("model"):
                # No longer than a model name may be: a longer one is refused, and must not wait in the export queue.
                attributes["gen_ai.request.model"] = request.model[:MAX_MODEL_NAME]
            if observer._log_content and self.operation == "chat":
                attributes["gen_ai.input.messages"] = json.dumps([_message(m) for m in request.messages])
        # Every value of a key: a header sent twice (tracestate) is one list, as HTTP combines them.
        carrier: dict[str, list[str]] = {}
        for key, value in metadata or ():
            if isinstance(value, str):  # a -bin key's value is bytes, and no trace context
                carrier.setdefault(key, []).append(value)
        self.started = time.time_ns()
        context = _callers_context(observer._propagator, carrier)
        self.meter: Meter = open_meter()
        if self.meter.request_id is not None:  # the call log's (which starts first), to find the call's log line by
            attributes["llmrelay.request_id"] = self.meter.request_id
        self.span = observer._tracer.start_span(name, context, SpanKind.SERVER, attributes, start_time=self.started)
        # A trace to look for: one exported, or the caller's (sampled out here, still of its trace); not an id made
        # for a span no one keeps.
        traced = self.span.get_span_context()
        if traced.is_valid and (
            self.span.is_recording() or trace.get_current_span(context).get_span_context().is_valid
        ):
            self.meter.trace_id = format(traced.trace_id, "032x")
        # Upstream requests continue the trace from this span (and carry nothing else of the caller's context).
        observer._propagator.inject(self.meter.upstream_headers, trace.set_span_in_context(self.span))
        self.code = grpc.StatusCode.OK
        self._last: Any = None  # the answer, or the stream's last message
        self._text: list[str] = []  # a stream's text since its last restart, kept only when content may be recorded

    def sent(self, message: Any) -> None:
        if self.streaming:
            self._streamed(message)
        else:
            self._answered(message)

    def _answered(self, answer: Any) -> None:
        if self.operation == "chat":  # an embedding has no answer id, finish reason or text
            self._last = answer
            if self._i._log_content:
                self._text = [answer.message.content]

    def _streamed(self, chunk: Any) -> None:
        if not self.model_call:
            return
        if chunk.finish_reason:
            self._last = chunk
        if self._i._log_content:
            if chunk.HasField("restart"):
                self._text.clear()
            elif chunk.delta.HasField("content"):
                self._text.append(chunk.delta.content)

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        self.code = code
        ended = time.time_ns()
        span = self.span
        span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        if self.code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, self.code.name))
            span.set_attribute("error.type", self.code.name)
        if self._last is not None:
            span.set_attribute("gen_ai.response.id", self._last.id)
            span.set_attribute("gen_ai.response.finish_reasons", [_finish_reason(self._last)])
        if self._i._log_content and self._last is not None:
            output = {"role": "assistant", "parts": [{"type": "text", "content": "".join(self._text)}]}
            span.set_attribute("gen_ai.output.messages", json.dumps([output]))
        if self.meter.attempts:
            self._attempts(self.meter.attempts, ended, self.streaming)
        span.end(end_time=ended)

    def _attempts(self, attempts: list[Attempt], ended: int, streamed: bool) -> None:
        span, tracer = self.span, self._i._tracer
        parent = trace.set_span_in_context(span)
        unmatched = list(self.meter.billed)
        cursor = self.started
        ends: list[int] = []
        for index, attempt in enumerate(attempts):
            # Where the router noted when the attempt began; else (a skipped route) right after the one before.
            begun = int(attempt.started_at * 1e9) if attempt.started_at is not None else cursor
            start = min(max(begun, self.started), ended)
            end = min(start + int(attempt.duration_s * 1e9), ended)
            last = index == len(attempts) - 1
            if streamed and last and attempt.outcome is AttemptOutcome.SUCCEEDED:
                end = ended  # its stream went on to the end of the call
            cursor = end
            ends.append(end)
            attributes = self._attempt_attributes(attempt, _take(unmatched, attempt, last=last))
            name = f"{self.operation} {attempt.model}"
            child = tracer.start_span(name, parent, SpanKind.CLIENT, attributes, start_time=start)
            if attempt.outcome in _FAILURES:
                said = attempt.error if self._i._log_content else without_quotes(attempt.error, (attempt.quoted,))
                child.set_status(Status(StatusCode.ERROR, said or attempt.outcome.value))
            child.end(end_time=end)
        for index, before, after in moves(attempts):
            at = ends[index]
            if before.outcome not in _FAILURES:
                continue
            if before.outcome is AttemptOutcome.INTERRUPTED:
                event = "llmrelay.stream_restart"
            else:
                event = "llmrelay.retry" if after.backend == before.backend else "llmrelay.fallback"
            details: Attributes = {
                "llmrelay.backend": before.backend,
                "llmrelay.next_backend": after.backend,
                "llmrelay.reason": before.outcome.value,
            }
            span.add_event(event, details, timestamp=at)
        if (served := served_by(self.meter)) is not None:
            span.set_attribute("llmrelay.backend", served.backend)
        span.set_attribute("llmrelay.attempts", len(attempts))
        if self.meter.billed:
            span.set_attribute("gen_ai.response.model", self.meter.billed[-1].model)
            span.set_attribute("gen_ai.usage.input_tokens", sum(b.usage.prompt_tokens for b in self.meter.billed))
            span.set_attribute("gen_ai.usage.output_tokens", sum(b.usage.completion_tokens for b in self.meter.billed))

    def _attempt_attributes(self, attempt: Attempt, billed: Billed | None) -> Attributes:
        attributes: Attributes = {
            "gen_ai.operation.name": self.operation or "chat",
            "gen_ai.request.model": attempt.model,
            "llmrelay.backend": attempt.backend,
            "llmrelay.outcome": attempt.outcome.value,
        }
        if (kind := self._i._kinds.get(attempt.backend)) is not None:
            attributes["gen_ai.provider.name"] = kind
            attributes["gen_ai.system"] = kind
        if attempt.upstream_status is not None:
            attributes["http.response.status_code"] = attempt.upstream_status
        if attempt.outcome in _FAILURES:
            attributes["error.type"] = attempt.outcome.value
        if billed is not None:
            attributes["gen_ai.response.model"] = billed.model
            attributes["gen_ai.usage.input_tokens"] = billed.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = billed.usage.completion_tokens
        return attributes


def _take(billed: list[Billed], attempt: Attempt, *, last: bool) -> Billed | None:
    """What the attempt billed: the first not yet matched of its backend (the router bills attempts in order)."""
    # A stream its caller's deadline cut mid-way was billed for what it consumed too, and ended the call; an earlier
    # timeout (no answer in time, retried on the same backend) billed nothing, and must not take what a retry billed.
    if attempt.outcome not in _BILLED and not (last and attempt.outcome is AttemptOutcome.TIMEOUT):
        return None
    for index, entry in enumerate(billed):
        if entry.backend == attempt.backend:
            return billed.pop(index)
    return None


def _message(message: Any) -> dict[str, Any]:
    # A role the enum has no name for (proto3 keeps its number) is the handler's to refuse, after the span starts.
    named = message.DESCRIPTOR.fields_by_name["role"].enum_type.values_by_number.get(message.role)
    role = named.name.removeprefix("ROLE_").lower() if named is not None else str(message.role)
    parts = [_part(part) for part in message.parts] or [{"type": "text", "content": message.content}]
    return {"role": role, "parts": parts}


def _part(part: Any) -> dict[str, Any]:
    """A content part as the GenAI conventions write it; an image by its URL, or by its type alone (no bytes)."""
    if part.WhichOneof("part") == "text":
        return {"type": "text", "content": part.text}
    image = part.image
    if image.WhichOneof("source") == "url":
        return {"type": "uri", "modality": "image", "uri": image.url}
    return {"type": "blob", "modality": "image", "mime_type": image.media_type}


def _finish_reason(answer: Any) -> str:
    field = answer.DESCRIPTOR.fields_by_name["finish_reason"]
    return str(field.enum_type.values_by_number[answer.finish_reason].name).removeprefix("FINISH_REASON_").lower()
