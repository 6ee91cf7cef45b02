"""Backend probes, feeding both the Health RPC and the standard grpc.health.v1 service.

grpc.health.v1 answers for two names, and List lists both:

- "" is liveness: SERVING from the start while the process accepts calls, whatever its upstreams do; NOT_SERVING
  only once a graceful shutdown begins. A failing liveness probe means restart the process.
- llmrelay.v1.LLMService is readiness: SERVING while at least one backend is reachable with its circuit not open,
  NOT_SERVING otherwise and from the start of a graceful shutdown. A load balancer routes around a gateway whose
  upstreams are all down while Kubernetes still sees a live process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2

from llmrelay_server.domain import BackendHealth, ProbeNotMade
from llmrelay_server.lasting import LastingCalls
from llmrelay_server.router import REMEDY_OF_AN_UNLISTED_DEFAULT, Backend, CircuitState, Router

SERVICE_NAME = "llmrelay.v1.LLMService"
# Circuits open and cool down between probes; their state is read this often (no network) and published on change.
STATE_CHECK_S = 0.25
PROBE_TIMEOUT_S = 10.0
"""A probe's whole time at most, however many requests it makes (each given HEALTH_TIMEOUT_S for its whole answer;
Ollama's probe makes two): the gateway's start and every probe that joins it wait for it."""
FRESH_PROBE_S = 1.0
"""A backend probed this recently is not probed again for Health(probe=true): its result is that fresh. Health is
open to callers without a key (by default), who could otherwise turn each of their calls into a request to every
upstream, on the gateway's own keys."""
log = logging.getLogger(__name__)


_SHOWN_NAME_CHARS: Final = 200
"""Of a service name Check has no status for, the most said back."""


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpcio-health-checking is untyped
    """grpcio-health-checking's servicer, with List: its stubs route Health/List (and reflection lists it), but its
    servicer leaves it UNIMPLEMENTED; and with Watch streams that a shutdown can end (`end_watches`), each writing
    outside the lock that every change of status takes (`_watch`)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches = LastingCalls()

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> None:
        if self._watches.ended:
            # Come in after end_watches, before the server's stop closed the door: told its status (NOT_SERVING), and
            # ended OK as the watches end_watches ended, not left to hold the stop for its whole grace period.
            status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            await context.write(health_pb2.HealthCheckResponse(status=status))
            return
        with self._watches.held():  # ended by end_watches: the stream ends OK, its last status NOT_SERVING
            await self._watch(request.service, context)

    async def _watch(
        self,
        service: str,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> None:
        """The base class's Watch, but for where it writes: it wrote each status holding the service's condition,
        which every set() of that service takes, and a write waits for its peer's flow control: a caller that read
        nothing more on its connection (a stream of an answer it left unread) held every change of readiness, the
        probes that publish them, and the stop, for good. Here a write holds up its own stream alone; the status is
        looked at again under the lock before each wait, so no change is missed."""
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        sent = None
        try:
            while True:
                status = self._server_status.get(service, unknown)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                async with condition:
                    if self._server_status.get(service, unknown) == sent:
                        await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    def end_watches(self) -> None:
        """Ends every Watch stream (each has sent NOT_SERVING by now): a watch lasts until its caller leaves, and the
        server's stop would otherwise wait for it the whole grace period, as for a model call."""
        self._watches.end()

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        """The base class's, but for the status of a service it has none for: NOT_FOUND alike (the protocol's), with
        words that name the services it has, where the base class's said nothing (a probe's misspelt service name
        showed as "Code: NotFound Message:")."""
        statuses: dict[str, Any] = self._server_status
        if (status := statuses.get(request.service)) is None:
            known = " and ".join(repr(name) for name in sorted(statuses)) or "none yet"
            asked = repr(request.service[:_SHOWN_NAME_CHARS])  # not megabytes of it back, past what trailers carry
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no health status for the service {asked}; this gateway has {known}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self,
        request: health_pb2.HealthListRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthListRequest, health_pb2.HealthListResponse],
    ) -> health_pb2.HealthListResponse:
        # The statuses Check answers from (the base class keeps them, shutdown's NOT_SERVING included).
        statuses: dict[str, Any] = self._server_status
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )


class HealthMonitor:
    def __init__(self, router: Router, servicer: HealthServicer, interval_s: float) -> None:
        self._backends = router.backends
        self._servicer = servicer
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._published: bool | None = None
        # The probe in flight per backend (by name): whoever asks while it runs waits for it instead of sending another.
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._probed_at: dict[str, float] = {}
        """When each backend's last probe ended (the loop's clock)."""
        self._said_unlisted: set[str] = set()
        """The backends whose default model a WARNING said they do not list (_say_if_its_default_is_unlisted)."""
        self._stopped = False
        """From the stop on, no backend is probed: a Health(probe) in the drain is answered from what is known."""

    async def announce(self) -> None:
        """Before the server starts: alive, and not ready until the first probe finds a usable backend. Set only by
        that probe (which takes up to PROBE_TIMEOUT_S), readiness was NOT_FOUND meanwhile, and List left it out."""
        await self._servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self, stop: asyncio.Event) -> None:
        """The first probe of every backend, then the background probes. The gateway's start waits for that probe
        (up to PROBE_TIMEOUT_S) with its port open, but not past `stop` (SIGTERM as it starts): the gateway's stop is
        to begin at once, and HealthMonitor.stop ends the probes still out."""
        first_probe = asyncio.ensure_future(self.probe())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((first_probe, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            first_probe.cancel()  # the wait for it, when the stop came first: its probes go on until HealthMonitor.stop
        if stop.is_set():
            return
        first_probe.result()
        self._task = asyncio.create_task(self._watch(), name="llmrelay-health")

    def end_watches(self) -> None:
        """After the drain: the watchers have seen NOT_SERVING; their streams end."""
        self._servicer.end_watches()

    async def stop(self) -> None:
        """Everything NOT_SERVING, so that probes see the shutdown before the port closes. The probes still out end
        here: the backends' clients close next, and a probe cut by that would find its backend unreachable, and say
        so in the log of a clean stop."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        probes = list(self._probes.values())
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await self._servicer.enter_graceful_shutdown()

    async def probe(self, deadline: float | None = None) -> list[tuple[BackendHealth, CircuitState]]:
        """Probes every backend now, but one probed within FRESH_PROBE_S. A backend's probe already in flight is
        joined, not repeated: a hundred callers asking at once, and the background probes among them, send each
        upstream one probe. At `deadline` (the loop's clock) the report is made of what is known by then: a backend
        whose probe is still out is reported as its last probe found it. From the stop on, the report is what is
        known: a probe sent in the drain reached upstreams of a gateway going away, and, cut by the backends' clients
        closing, said in the log of a clean stop that they were unreachable."""
        if self._stopped:
            return self.report()
        loop = asyncio.get_running_loop()
        probes = [
            self._probe_once(b)
            for b in self._backends
            if loop.time() - self._probed_at.get(b.name, -FRESH_PROBE_S) >= FRESH_PROBE_S
        ]
        if probes:
            # Waited for, not awaited: a caller that leaves (its deadline, a cancel), or stops waiting, leaves the
            # probes running for the others waiting on them. A probe does not raise (_probe).
            await asyncio.wait(probes, timeout=None if deadline is None else max(0.0, deadline - loop.time()))
        await self._publish()
        return self.report()

    def _probe_once(self, backend: Backend) -> asyncio.Task[None]:
        probe = self._probes.get(backend.name)
        if probe is None:
            probe = self._probes[backend.name] = asyncio.create_task(
                self._probe(backend), name=f"llmrelay-probe-{backend.name}"
            )
            probe.add_done_callback(lambda _: self._probes.pop(backend.name))
        return probe

    async def _probe(self, backend: Backend) -> None:
        try:
            if backend.provider.connections_all_in_use:
                # Every connection made and serving a call: the upstream takes calls. A probe would wait its turn
                # behind them, and failing to get one in time, turn a busy backend unreachable.
                raise ProbeNotMade("every connection the gateway may open to it is serving calls")
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                result = await backend.provider.health()
        except ProbeNotMade as exc:
            # The gateway's own bound, which says nothing of the upstream (readiness NOT_SERVING at its busiest, else):
            # its last probe's result stands, `checked_at` saying when that ran.
            if backend.health is not None:
                self._probed_at[backend.name] = asyncio.get_running_loop().time()
                return
            result = replace(_never_probed(backend), last_error=f"not probed: {exc}", checked_at=time.time())
        except TimeoutError:
            result = replace(
                _never_probed(backend),
                latency_s=PROBE_TIMEOUT_S,
                last_error=f"the probe did not end within {PROBE_TIMEOUT_S:g} s",
                checked_at=time.time(),
            )
        except Exception as exc:
            # A bug (a provider's probe says unreachable, it does not raise): shown once, when the backend turns
            # unreachable, rather than failing the gateway's start, every Health(probe) and every background round.
            if backend.health is None or backend.health.reachable:
                log.error("the probe of backend %s failed", backend.name, exc_info=True)
            result = replace(
                _never_probed(backend), last_error=f"the probe failed ({type(exc).__name__})", checked_at=time.time()
            )
        self._probed_at[backend.name] = asyncio.get_running_loop().time()
        if backend.health is None or backend.health.reachable != result.reachable:
            if result.reachable:
                log.info("backend %s is reachable", backend.name)
            else:  # why, in the words the Health RPC has (the upstream's redacted): the log is where operators look
                log.info("backend %s is unreachable: %s", backend.name, result.last_error)
        backend.health = result
        self._say_if_its_default_is_unlisted(backend, result.models)

    def _say_if_its_default_is_unlisted(self, backend: Backend, models: Sequence[str]) -> None:
        """A WARNING when a probe lists models without the backend's default (an Ollama model not pulled): every call
        for it fails, and the gateway has what tells. Once, until a list holds it again: not at every probe, nor again
        after a probe that listed nothing (the backend unreachable a while)."""
        listed = backend.lists_its_default(models)
        if listed is None:
            return
        if listed:
            self._said_unlisted.discard(backend.name)
            return
        if backend.name in self._said_unlisted:
            return
        self._said_unlisted.add(backend.name)
        spec = backend.provider.spec
        log.warning(
            "backend %s does not list its default model %s among the %d models it serves: calls for it will fail; %s",
            backend.name,
            spec.default_model,
            len(models),
            REMEDY_OF_AN_UNLISTED_DEFAULT[spec.kind].replace("NAME", spec.default_model),
        )

    def report(self) -> list[tuple[BackendHealth, CircuitState]]:
        return [(b.health or _never_probed(b), b.circuit.state) for b in self._backends]

    @property
    def serving(self) -> bool:
        return any(_usable(b) for b in self._backends)

    async def _publish(self) -> None:
        serving = self.serving
        if serving != self._published and self._published is not None:
            log.warning("%s is %s", SERVICE_NAME, "SERVING" if serving else "NOT_SERVING: no backend is usable")
        self._published = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._servicer.set(SERVICE_NAME, status)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self._interval_s
        round_of_probes: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(STATE_CHECK_S)
                try:
                    if loop.time() >= next_probe and (round_of_probes is None or round_of_probes.done()):
                        next_probe = loop.time() + self._interval_s
                        # A task of its own: a slow upstream's probe (up to PROBE_TIMEOUT_S) held up the state checks,
                        # and a circuit that opened meanwhile was published seconds late.
                        round_of_probes = asyncio.create_task(self._probe_round(), name="llmrelay-health-probes")
                    # On a round's tick too: a circuit that opened meanwhile waited for the next tick (half a second).
                    if self.serving != self._published:
                        await self._publish()
                except Exception:
                    log.exception("health check failed")
        finally:
            if round_of_probes is not None:
                round_of_probes.cancel()
                await asyncio.gather(round_of_probes, return_exceptions=True)

    async def _probe_round(self) -> None:
        try:
            await self.probe()
        except Exception:
            log.exception("health check failed")


def _usable(backend: Backend) -> bool:
    return backend.health is not None and backend.health.reachable and backend.circuit.state is not CircuitState.OPEN


def _never_probed(backend: Backend) -> BackendHealth:
    spec = backend.provider.spec
    return BackendHealth(
        name=spec.name, kind=spec.kind, base_url=spec.base_url, default_model=spec.default_model, reachable=False
    )
