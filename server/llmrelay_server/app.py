"""Assembly: configuration -> tokenizer, ledger, backends, router -> gRPC services; and an orderly shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import signal
import time
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from llmrelay import v1 as pb

from llmrelay_server.auth import LIMITS_PER_WORKER, AuthInterceptor, KeyRing
from llmrelay_server.backends import provider_factory
from llmrelay_server.calllog import CallLogObserver
from llmrelay_server.concurrency import ConcurrencyInterceptor
from llmrelay_server.config import ConfigError, GatewayConfig, ServerConfig, shown_path, shown_value
from llmrelay_server.decoding import GenericOnly, add_llm_service, receive_limit
from llmrelay_server.domain import StoreHealth, UsageUnavailableError
from llmrelay_server.health import SERVICE_NAME, HealthMonitor, HealthServicer
from llmrelay_server.limits import GATEWAY, InProcessLimiter, Limiter, LimitsInterceptor, key_subject
from llmrelay_server.logs import quiet_grpc_caller_errors, use_log_format
from llmrelay_server.metrics import LabelValues, Metrics, MetricsObserver, StateReading, cannot_serve
from llmrelay_server.observing import Observer, ObservingInterceptor
from llmrelay_server.pricing import PriceTable
from llmrelay_server.reflection import V1_SERVICE_NAME, ReflectionServicer, enable_reflection
from llmrelay_server.router import Backend, Router
from llmrelay_server.servicer import Drain, LLMServicer
from llmrelay_server.status import log_upstreams_words
from llmrelay_server.tls import ServedCertificate, exposure_warnings, protection
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.usage import LedgerUnavailableError, UsageLedger
from llmrelay_server.workers import (
    CERTIFICATE_KEPT,
    STOP_NOW,
    ListenError,
    WorkerRole,
    cannot_bind_message,
    check_port_free,
    ignore_signals_after_stop,
    on_signal,
    stop_signals,
)

if TYPE_CHECKING:
    from llmrelay_server.tracing import Tracing

log = logging.getLogger("llmrelay_server")
T = TypeVar("T")
FIRST_RUN_HINT = (
    "set OPENAI_API_KEY, or start Ollama (`ollama serve`, then `ollama pull gpt-oss:20b`), or run `make demo` for a"
    " tiny local model"
)
BUILT_IN_BACKENDS: Final = frozenset({"openai", "anthropic", "ollama"})


# After the grace period, how long calls still running have to send the gateway's status before gRPC cuts them.
INTERRUPT_S = 0.5
MAX_METADATA_BYTES = 16 * 1024
"""A call's metadata (its headers: a key, trace context, a request id) that the gateway takes: gRPC's hard limit."""


@dataclass
class Gateway:
    """A running gateway; `port` is the bound port (useful when listening on port 0)."""

    server: grpc.aio.Server
    port: int
    router: Router
    monitor: HealthMonitor
    ledger: UsageLedger
    servicer: LLMServicer
    keys: KeyRing
    metrics: Metrics | None
    drain_s: float
    grace_period_s: float
    reflection: ReflectionServicer
    tracing: Tracing | None = None
    limiter: Limiter | None = None
    certificate: ServedCertificate | None = None

    async def stop(
        self, grace_period_s: float | None = None, drain_s: float | None = None, hurry: asyncio.Event | None = None
    ) -> None:
        """Health to NOT_SERVING and new model calls refused for the drain time, then calls in flight get the grace
        period to finish, then those still running end with SHUTTING_DOWN, then everything closes. Once `hurry` is
        set (a second SIGTERM or Ctrl-C), what is left of the drain and the grace period is skipped: the calls still
        running end at once, with the same status, and their usage is recorded all the same."""
        grace_s = self.grace_period_s if grace_period_s is None else grace_period_s
        hurry = hurry or asyncio.Event()
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            await self.monitor.stop()
            self.servicer.start_draining()
            await asyncio.wait({hurried}, timeout=self.drain_s if drain_s is None else drain_s)
            self.monitor.end_watches()
            self.reflection.end_streams()
            # gRPC itself would cancel what is left at the end of the grace period with a bare status; the servicer
            # ends those calls first with its own, and gRPC's cut comes only after that.
            stopping = asyncio.ensure_future(self.server.stop(grace_s + INTERRUPT_S))
            await asyncio.wait({stopping, hurried}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                await self.servicer.interrupt_calls(wait_s=INTERRUPT_S)
                # Told to stop now, gRPC's own cut comes now too, not at the end of its grace period: the statuses of
                # streams whose callers stopped reading wait behind their messages, and would hold it there.
                await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
                if not stopping.done():
                    await self.server.stop(None)
            await stopping
            # A call whose caller left is over for gRPC, not yet for the gateway: its bill first, then the ledger. A
            # bill may count a long prompt offline (a stream cut off, its upstream's usage never come), which a stop
            # waits for, unless told to stop now (then, or meanwhile).
            billing_s = INTERRUPT_S if hurry.is_set() else max(grace_s, INTERRUPT_S, self.router.most_counting_s)
            billing = asyncio.ensure_future(self.servicer.calls_ended(wait_s=billing_s))
            await asyncio.wait({billing, hurried}, return_when=asyncio.FIRST_COMPLETED)
            if not billing.done():
                await asyncio.wait({billing}, timeout=INTERRUPT_S)
                billing.cancel()
            self.servicer.say_unbilled()
        finally:
            hurried.cancel()
            self.router.lag.stop()
            await self.keys.stop()
            if self.certificate is not None:
                await self.certificate.stop()
            if self.limiter is not None:
                await self.limiter.aclose()
            if self.metrics is not None:
                self.metrics.stop()
            await asyncio.gather(*(backend.provider.aclose() for backend in self.router.backends))
            await self.ledger.aclose(hurry)  # told to stop now, records in the journal are not waited for
            if self.tracing is not None:
                await self.tracing.stop(hurry)  # the last spans exported, unless told to stop now


def _check_open_services(open_services: tuple[str, ...]) -> None:
    """ConfigError for an `auth.open_services` entry that is no service or method this gateway serves: misspelt, the
    health probes it was meant to open would be refused UNAUTHENTICATED, and the gateway never ready."""
    served = {
        service.full_name: {method.name for method in service.methods}
        for service in (
            pb.DESCRIPTOR.services_by_name["LLMService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        )
    }
    served[V1_SERVICE_NAME] = {"ServerReflectionInfo"}  # v1alpha's, under v1's name (reflection.py)
    for entry in open_services:
        service, slash, method = entry.partition("/")
        if service not in served or (slash and method not in served[service]):
            shown = shown_value(entry, "auth.open_services")
            raise ConfigError(
                f"auth.open_services: {shown} is no service (package.Service) or method (package.Service/Method) "
                f"this gateway serves; its services: {', '.join(sorted(served))}"
            )


async def start_gateway(
    config: GatewayConfig,
    *,
    reuse_port: bool = False,
    stop: asyncio.Event | None = None,
    certificate_kept: Path | None = None,
) -> Gateway:
    """Starts a gateway; `reuse_port` when it is one of several workers sharing the port (`workers`), with
    `certificate_kept`, where the workers keep the TLS certificate last taken (`ServedCertificate`). Once `stop` is
    set (SIGTERM as it starts), the start no longer waits for the first probe of the backends: it returns the gateway
    at once, for its stop to begin."""
    limit = config.server.max_message_bytes
    tls = config.server.tls
    quiet_grpc_caller_errors()
    log_upstreams_words(config.server.log_content)
    _check_open_services(config.auth.open_services)
    # Before the port opens: a certificate that cannot be used stops the start (ConfigError naming the field).
    certificate = ServedCertificate(tls, kept=certificate_kept) if tls is not None else None
    # Likewise a keys file that cannot be read. One that gives a key limits cannot be taken by a worker without Redis:
    # each worker would enforce them alone (the configuration refuses them at start for that reason). A worker's keys
    # file is its supervisor's copy of the file as last taken (workers.Supervisor), which the supervisor checks so.
    alone = reuse_port and config.state.redis_url is None
    keys = KeyRing(config.auth, limits_refused=LIMITS_PER_WORKER if alone else None, quiet=reuse_port)
    tracing = _tracing(config)  # and tracing without its extra
    counter = TokenCounter()
    try:
        ledger = UsageLedger(
            config.server.usage_db,
            journal_dir=config.server.usage_journal_dir,
            journal_max_bytes=config.server.usage_journal_max_bytes,
            by_minute_days=config.server.usage_by_minute_days,
        )
    except LedgerUnavailableError as exc:  # a SQLite file that cannot be opened (a directory, no permission)
        raise ConfigError(f"{config.usage_db_named}: {exc}") from exc
    except OSError as exc:  # its journal's directory (a file in the way, no permission)
        where = f"{config.usage_db_named} or server.usage_journal_dir"
        # A file where the directory goes fails its mkdir with "File exists", which reads as if all were well.
        why = "Not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConfigError(f"{where}: {why}: {shown_path(exc.filename)}") from exc
    factory = provider_factory(counter)
    providers = [factory.create(spec) for spec in config.backends]
    router = Router(
        providers,
        config=config.router,
        counter=counter,
        ledger=ledger,
        prices=PriceTable(config.pricing, config.unknown_price, [spec.name for spec in config.backends]),
        aliases=config.aliases,
        max_request_bytes=config.server.max_message_bytes,
    )
    limiter = _limiter(config)
    drain = Drain()
    metrics = _metrics(config, keys, router, ledger, limiter, certificate) if config.server.metrics_listen else None
    server = grpc.aio.server(
        interceptors=_interceptors(config, keys, counter, router, drain, metrics, tracing, limiter),
        options=[
            # Requests a little over the limit are read, and refused by the gateway itself (`receive_limit`).
            ("grpc.max_receive_message_length", receive_limit(limit)),
            ("grpc.max_send_message_length", limit),
            # gRPC refuses a caller's metadata past a soft limit (8 KiB) at random, more often the nearer its hard one
            # (16 KiB): the same call answered now OK, now RESOURCE_EXHAUSTED. One limit: the same answer every time.
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            # Requests uncompressed alone (identity: bit 0), refused UNIMPLEMENTED otherwise: gRPC decompresses a
            # request whole before any interceptor sees it, so a caller with no key had 8 KiB of gzip cost the gateway
            # 8 MiB of work (about 60 ms of CPU), and a few hundred of them held every caller's calls up for seconds.
            ("grpc.compression_enabled_algorithms_bitset", 1),
            # gRPC shares a port between servers by default: a second gateway started by mistake would silently
            # take half of the first one's calls. Bound first, so a taken port stops us before anything starts.
            # Workers do share it: their supervisor has checked that no other process holds it.
            ("grpc.so_reuseport", int(reuse_port)),
            *_connection_options(config.server),
        ],
    )
    try:
        if not reuse_port:  # a supervisor checked for its workers
            check_port_free(config.server.listen)
        if certificate is None:
            port = server.add_insecure_port(config.server.listen)
        else:
            port = server.add_secure_port(config.server.listen, certificate.credentials())
    except (RuntimeError, ListenError) as exc:
        await asyncio.gather(*(provider.aclose() for provider in providers))
        await ledger.aclose()
        if isinstance(exc, ListenError):  # it says why
            raise
        # gRPC says no more than that it could not bind: the check again, for what changed since (another process
        # took the port), or else the causes it may have been.
        if not reuse_port:
            check_port_free(config.server.listen)
        raise ListenError(cannot_bind_message(config.server.listen)) from exc
    for warning in exposure_warnings(f"{config.server.listen.rpartition(':')[0]}:{port}", tls, config.auth):
        log.warning(warning)
    await counter.warm_up(spec.default_model for spec in config.backends)
    await ledger.start()
    health_servicer = HealthServicer()
    monitor = HealthMonitor(router, health_servicer, config.server.health_interval_s)
    servicer = LLMServicer(
        router,
        monitor,
        ledger,
        limit,
        stores=lambda: _stores(ledger, limiter),
        max_image_bytes=config.server.max_image_bytes,
        drain=drain,
    )
    add_llm_service(servicer, server, limit)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, GenericOnly(server, limit))
    reflection = enable_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server, limit
    )
    if metrics is not None and (listen := config.server.metrics_listen) is not None:
        try:
            metrics_port = metrics.serve(listen)
        except OSError as exc:
            await asyncio.gather(*(provider.aclose() for provider in providers))
            await ledger.aclose()
            raise ListenError(cannot_serve(listen, exc)) from exc
        log.info("metrics on http://%s:%d/metrics", listen.rpartition(":")[0], metrics_port)
    if limiter is not None:
        await limiter.start()
        # The budgets in force count what was spent today before this process started (in Redis too: a budget a keys
        # file gave a key while no gateway ran has no spend there), and a reload that gives a key one, what it spent.
        gateway_budget = config.server.limits.budget_usd_per_day is not None
        # Bounded: the port is bound already (workers share it, and the kernel hands this one its share of new
        # connections), and calls wait until the server starts.
        await _resume_budgets(limiter, ledger, keys.budgeted(), gateway=gateway_budget, within_s=RESUME_BUDGETS_S)
        keys.catch_up_budgets = functools.partial(
            _resume_budgets, limiter, ledger, gateway=False, within_s=RESUME_BUDGETS_S
        )
    await monitor.announce()
    await server.start()
    await monitor.start(stop or asyncio.Event())
    router.lag.start()
    keys.start()
    if certificate is not None:
        certificate.start()
    return Gateway(
        server,
        port,
        router,
        monitor,
        ledger,
        servicer,
        keys,
        metrics,
        drain_s=config.server.drain_s,
        grace_period_s=config.server.grace_period_s,
        reflection=reflection,
        tracing=tracing,
        limiter=limiter,
        certificate=certificate,
    )


def _metrics(
    config: GatewayConfig,
    keys: KeyRing,
    router: Router,
    ledger: UsageLedger,
    limiter: Limiter | None,
    certificate: ServedCertificate | None,
) -> Metrics:
    labels = LabelValues(config.backends, config.aliases, keys.named)

    def state() -> StateReading:
        return StateReading(
            stores=_stores(ledger, limiter),
            ledger_queue_depth=ledger.queue_depth(),
            ledger_write_failures=ledger.write_failures,
            ledger_dropped_records=ledger.dropped_records,
            limits_calls_while_unavailable=limiter.calls_while_unavailable if limiter is not None else 0,
            certificate_not_after=certificate.not_after if certificate is not None else None,
        )

    return Metrics(
        labels,
        circuits=lambda: [(backend.name, backend.circuit.state.value) for backend in router.backends],
        state=state,
    )


def _no_backend_reachable(backends: Sequence[Backend]) -> str:
    """What the log says when the first probes found no backend usable: why of each, and, where the backends are the
    built-in ones alone (a first run), how to get one."""
    why = "; ".join(
        f"{backend.name}: {backend.health.last_error if backend.health and backend.health.last_error else 'not probed'}"
        for backend in backends
    )
    said = f"no backend is reachable ({why})"
    return f"{said}: {FIRST_RUN_HINT}" if all(backend.name in BUILT_IN_BACKENDS for backend in backends) else said


def _stores(ledger: UsageLedger, limiter: Limiter | None) -> list[StoreHealth]:
    """The stores this process keeps state in, for the Health RPC and the metrics."""
    return [ledger.health(), *([limiter.health()] if limiter is not None else [])]


def _tracing(config: GatewayConfig) -> Tracing | None:
    if not config.server.tracing:
        return None
    try:
        from llmrelay_server.tracing import Tracing
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        raise ConfigError(
            "server.tracing is on but OpenTelemetry is not installed: pip install 'llmrelay[otel]'"
        ) from exc
    return Tracing(config)


RESUME_BUDGETS_S = 2.0
"""How long a start, or a keys file reload that gives a key a daily budget, waits for today's spend from the ledger: a
database that does not answer would hold it up for as long as the ledger's own bound (ANSWER_S), and a reload's every
change with it, a key it revokes served meanwhile."""


async def _resume_budgets(
    limiter: Limiter, ledger: UsageLedger, names: Collection[str], *, gateway: bool, within_s: float | None = None
) -> None:
    """Today's spend (UTC) by the ledger, for the keys named (those with a daily budget) and, when `gateway`, the
    gateway: a limiter in this process starts empty, and each restart (a deploy, a crash) gave every daily budget
    back whole; and a limiter need not count a key's spend before it has a budget (Redis's does not), so a reload
    that gave a key one gave it whole, where a restart read what it had spent. The limiter counts at least that from
    then on, so a restart and a reload agree, and several workers (or gateways sharing a Redis) giving the same spend
    count it once. Past `within_s` the budgets count from zero, as with the ledger unavailable."""
    if not names and not gateway:
        return
    day = int(time.time() // 86_400)  # UTC, the budgets' day: once, as the limiter is told which day it is of
    midnight = day * 86_400
    try:
        async with asyncio.timeout(within_s):
            totals = await ledger.query(start=midnight)
    except UsageUnavailableError as exc:
        log.warning("limits: today's spend cannot be read from the ledger (%s): daily budgets count from zero", exc)
        return
    except TimeoutError:
        log.warning(
            "limits: today's spend not read from the ledger within %g s: daily budgets count from zero", within_s
        )
        return
    spent: dict[str, int] = dict.fromkeys(map(key_subject, names), 0)
    if gateway:
        spent[GATEWAY] = 0
    for total in totals:
        for subject in (key_subject(total.caller), GATEWAY):
            if subject in spent:
                spent[subject] += total.cost_usd_micros
    await limiter.spend_at_least(spent, day)


def _limiter(config: GatewayConfig) -> Limiter | None:
    """Where the limits are kept: in Redis when state.redis_url names one (every gateway naming it shares them),
    else in this process; none without limits to keep."""
    configured = (config.server.limits, *(key.limits for key in config.auth.keys))
    # A keys file may bring limits at any time.
    if not config.auth.keys_file and not any(limits.any_set() for limits in configured):
        return None
    state = config.state
    if state.redis_url is None:
        return InProcessLimiter()
    refuse = state.on_unavailable == "deny"
    from llmrelay_server.limits.redis import RedisLimiter  # redis-py, only where Redis is configured

    return RedisLimiter(state.redis_url, refuse_when_unavailable=refuse, timeout_s=state.timeout_s)


def _connection_options(server: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's keepalive arguments (doc/keepalive.md in grpc/grpc): the gateway pings each connection, calls in flight
    or not, and expects an answer in time; a caller's own pings are welcome as often as min_caller_ping_interval_s.
    Then the streams a connection may have open, and the age at which it is asked to move on, if any."""
    options = [
        ("grpc.keepalive_time_ms", _milliseconds(server.keepalive_s)),
        ("grpc.keepalive_timeout_ms", _milliseconds(server.keepalive_timeout_s)),
        # In current gRPC (since grpc/grpc#34647) a ping waits for its answer this long, 60 s unless set: the keepalive
        # timeout alone lets a silent caller's connection live that long.
        ("grpc.http2.ping_timeout_ms", _milliseconds(server.keepalive_timeout_s)),
        # An idle connection is pinged too (a caller gone between calls holds no call, but a connection), and may
        # ping: many clients keep their connection warm so.
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC stops pinging after two pings with no data sent between them (it may not be able to send any: a caller
        # that stopped reading leaves no room): unlimited, or such a caller would never be found out.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _milliseconds(server.min_caller_ping_interval_s)),
        # gRPC's own default is no bound, and a stream whose request has not ended is no call in progress yet.
        ("grpc.max_concurrent_streams", server.max_streams_per_connection),
    ]
    if server.max_connection_age_s is not None:
        # Its calls in flight finish on it, however long: each has its deadline, or the router's request_timeout_s.
        options.append(("grpc.max_connection_age_ms", _milliseconds(server.max_connection_age_s)))
    return options


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _interceptors(
    config: GatewayConfig,
    keys: KeyRing,
    counter: TokenCounter,
    router: Router,
    drain: Drain,
    metrics: Metrics | None,
    tracing: Tracing | None = None,
    limiter: Limiter | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """What each call did (outermost, so refusals count too: its metrics, its request id and log line, its trace),
    whether the gateway takes one more, who is calling, then within what limits; each only when configured (the call
    log is on unless turned off)."""
    observers: list[Observer] = [MetricsObserver(metrics)] if metrics is not None else []
    if config.server.log_calls:  # a request id and one log line for every call, refusals included
        observers.append(CallLogObserver(config.server.log_content))
    if tracing is not None:  # a span per call, continuing the caller's trace
        observers.append(tracing.observer)
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservingInterceptor(observers)] if observers else []
    if config.server.max_concurrent_rpcs is not None:  # the gateway's own service only: health probes go on
        interceptors.append(ConcurrencyInterceptor(config.server.max_concurrent_rpcs))
    if keys.enabled:
        interceptors.append(AuthInterceptor(keys, config.auth.open_services))
    if limiter is not None:
        interceptors.append(
            LimitsInterceptor(
                limiter,
                config.server.limits,
                counter,
                router,
                config.server.reserve_completion_tokens,
                config.server.max_image_bytes,
                config.server.max_message_bytes,
                drain,
                key_limits_change=keys.reloads,
            )
        )
    return interceptors


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Runs `main` to its end on the configured event loop (server.event_loop): uvloop, or Python's own where uvloop
    is not installed or the configuration says "asyncio". grpc.aio runs on either; uvloop's is the faster."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("server.event_loop: uvloop is not installed; running on asyncio's own loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _hurry(hurry: asyncio.Event) -> None:
    if not hurry.is_set():
        log.info("stopping now: calls in flight end with SHUTTING_DOWN")
        hurry.set()


def _stop_or_hurry(stop: asyncio.Event, hurry: asyncio.Event) -> None:
    """SIGTERM or SIGINT: the graceful stop, or stop now once a stop is asked, from the start on: a stop asked while
    the gateway starts is one all the same, and the second signal must not be lost to it."""
    if stop.is_set():
        _hurry(hurry)
    else:
        stop.set()


async def serve(config: GatewayConfig, worker: WorkerRole | None = None) -> int:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully; as one of a supervisor's workers when `worker`. The
    exit status: 0, or 1 when gRPC's server ended by itself (`_until_stopped`)."""
    use_log_format(config.server.log_format)
    if worker is not None and config.server.metrics_listen is not None:
        # The supervisor serves metrics_listen, gathering each worker's from a loopback port of its own.
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, metrics_listen="127.0.0.1:0"))
    # Handlers first: a signal that comes the moment the port opens must still mean a graceful stop.
    stop, hurry = asyncio.Event(), asyncio.Event()
    for signum in stop_signals():
        if worker is None:
            on_signal(signum, _stop_or_hurry, stop, hurry)
        else:  # its stop now is its supervisor's to send (STOP_NOW): it gets the process group's SIGTERM beside its
            # supervisor's, two signals for one stop
            on_signal(signum, stop.set)
    if worker is not None:
        on_signal(STOP_NOW, _hurry, hurry)  # its supervisor's second stop, whenever it comes
    # Watched from the start too: a supervisor killed while its workers start must not leave them serving.
    watching = asyncio.create_task(worker.watch_supervisor(stop)) if worker is not None else None
    gateway = await start_gateway(
        config,
        reuse_port=worker is not None,
        stop=stop,
        certificate_kept=worker.run_dir / CERTIFICATE_KEPT if worker is not None else None,
    )
    on_signal(signal.SIGHUP, gateway.keys.reload)
    host = config.server.listen.rpartition(":")[0]
    log.info("listening on %s:%d (%s)", host, gateway.port, protection(config.server.tls))
    for backend in gateway.router.backends:
        log.info(
            "backend %s: %s (%s, model %s)",
            backend.name,
            backend.provider.spec.base_url,
            backend.provider.spec.kind,
            backend.provider.spec.default_model,
        )
    if not gateway.monitor.serving and not stop.is_set():  # stopped as it started, its backends were not all probed
        log.warning(_no_backend_reachable(gateway.router.backends))
    # What start made (modules, encodings, configuration) lives as long as the process: frozen, it is no longer
    # walked by every full garbage collection, which calls' garbage sets off (about 50 us a call on `make bench`).
    gc.freeze()
    if worker is not None:
        worker.announce(gateway.metrics.port if gateway.metrics is not None else None)
        worker.beat()
    broken = await _until_stopped(gateway.server, stop)
    if watching is not None:
        watching.cancel()
    # A drain is for callers to move elsewhere while the port still takes calls: a broken server's port is closed.
    drain_s = 0.0 if broken else gateway.drain_s
    log.info(
        "shutting down: NOT_SERVING for %g s, then up to %g s for calls in flight (signal again to stop now)",
        drain_s,
        gateway.grace_period_s,
    )
    await gateway.stop(drain_s=drain_s, hurry=hurry)
    ignore_signals_after_stop()
    log.info("stopped")
    return 1 if broken else 0


async def _until_stopped(server: grpc.aio.Server, stop: asyncio.Event) -> bool:
    """Waits for `stop`; True, with `stop` set, when gRPC's server ends by itself first. grpcio's loop that takes
    calls ends on a request it cannot read (a method's name that is no UTF-8, from anyone who reaches the port, with
    no key), and the port with it; the process, its metrics and its heartbeat to a supervisor would go on as if
    serving. Stopped and exiting 1, it is restarted: by its supervisor, systemd, Kubernetes."""
    stopped = asyncio.ensure_future(stop.wait())
    ended = asyncio.ensure_future(server.wait_for_termination())
    await asyncio.wait((stopped, ended), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        # Not cancelled: gRPC's stop waits for the very future this waits on, and would be cancelled with it.
        return False
    why = ended.exception()
    log.error(
        "gRPC's server stopped taking calls by itself (%s); stopping, to be restarted",
        f"{type(why).__name__}: {why}" if why is not None else "no reason given",
    )
    stop.set()
    return True
