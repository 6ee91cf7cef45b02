"""`server.workers` > 1: one supervising process and N gateway processes sharing the gRPC port.

The supervisor makes no gRPC object. It checks that the port is free (a bind without SO_REUSEPORT fails while any
process holds it, so a second gateway on a taken port still stops with ListenError), then keeps it reserved with a
bound, never-listening SO_REUSEPORT socket (which fails that check too, so a second gateway is refused while the
first one's workers start), and starts each worker as a fresh `llmrelay-server` process: exec, not fork, so that no
worker inherits gRPC's threads or polling state (grpc's multiprocessing example forks before any gRPC object exists
for the same reason). The workers listen on the port with SO_REUSEPORT, and the kernel spreads the connections among
them.

- A worker that dies is restarted, after a back-off when it keeps dying soon after its start, and logged; one whose
  process cannot be made then is tried again after a longer one, the others serving meanwhile. One whose event loop
  has not run for server.worker_timeout_s (its heartbeat, a byte down a pipe every second, stopped) is killed and
  restarted, as the kernel would go on giving it connections it answers none of. Every worker reads the
  configuration file as the gateway started with it (a copy in the run directory): a restart after an edit does
  not leave one worker on other settings than the rest.
- SIGTERM or SIGINT: sent on to every worker; each drains and finishes its calls (drain_s, then grace_period_s) and
  the supervisor exits when all have; a second one has them stop at once (STOP_NOW). SIGHUP (reload the keys file)
  is the supervisor's: it reads the keys file, and the workers serve its copy of the file as last taken (see
  `Supervisor._keep_keys`).
- A worker whose supervisor is gone stops by itself: it watches its parent (`WorkerRole.watch_supervisor`), from
  before it starts to serve.
- The run directory (`llmrelay-workers-*` in the temporary directory) is where the workers announce themselves.
  The supervisor holds a lock on it that its workers inherit; a supervisor killed with SIGKILL leaves it behind, and
  the next supervisor on the machine removes it once the killed one and every worker of it are gone.
- Metrics: each worker serves its own on a loopback port, which it writes into the run directory with its pid once
  it serves; the supervisor serves `server.metrics_listen`, gathering every worker's at each scrape with a `worker`
  label, beside its own (`llmrelay_workers`, `llmrelay_worker_restarts_total`).
- State: the usage ledger is shared through its database (each worker journals its own records); limits need
  state.redis_url (the configuration refuses several workers with limits and no Redis); health and circuit breakers
  are each worker's own, as Envoy's outlier detection is each host's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llmrelay_server.auth import LIMITS_PER_WORKER, KeyRing
from llmrelay_server.config import ConfigError, GatewayConfig
from llmrelay_server.logs import share_stderr, use_log_format
from llmrelay_server.metrics import FREE_PORT_TRIES, NOT_THIS_MACHINES, cannot_serve, serve_metrics
from llmrelay_server.tokens import TokenCounter

log = logging.getLogger("llmrelay_server.workers")

# A worker that dies sooner than this after its start is restarted after a growing pause, not at once.
STEADY_S = 10.0
MAX_RESTART_DELAY_S = 30.0
# Beyond a worker's own drain and grace period, how long it may take to exit before it is killed.
EXIT_MARGIN_S = 10.0
PARENT_CHECK_S = 1.0
HEARTBEAT_S = 1.0
"""How often a worker's event loop tells its supervisor that it runs (a byte down a pipe)."""
SCRAPE_TIMEOUT_S = 2.0
RUN_DIR_PREFIX = "llmrelay-workers-"
"""A run directory's name: this, then a random part."""
STOP_NOW: Final = signal.SIGUSR2
"""From the supervisor to a worker that is stopping: skip what is left of the drain and the grace period. Not a second
SIGTERM or SIGINT, which a worker gets on its own from its process group (Ctrl-C in a terminal, systemd's stop) as
the supervisor sends on the first."""
_RUN_LOCK = "supervisor.lock"
CONFIG_COPY = "config.yaml"
"""In the run directory: the configuration file as the gateway started with it, which every worker reads."""
KEYS_COPY = "keys.yaml"
"""In the run directory: the keys file as the supervisor last took it, which every worker serves."""
CERTIFICATE_KEPT = "tls"
"""In the run directory: the TLS certificate the workers last took, which a worker started while server.tls's files
cannot be used serves (`tls.ServedCertificate`)."""


class ListenError(RuntimeError):
    """The gateway cannot serve on its address (in use by another process, or not an address of this machine)."""


def on_signal(signum: int, callback: Callable[..., object], *args: object) -> None:
    """Has the running loop call `callback(*args)` on signal `signum`, until `ignore_signals_after_stop`.

    The process's own handler, not the loop's (`add_signal_handler`): a loop gives the signals it handled back their
    default actions as it removes them or closes, and one arriving then, before the process exits (a second Ctrl-C,
    `systemctl reload` as the stop ends, a supervisor's SIGHUP passed on), killed a process that had stopped cleanly:
    status 129, 130 or 143 instead of 0, however short the moment (seen in full test runs, under a signal every 2 ms).
    From this handler straight to SIG_IGN, no default action comes between. The loop still wakes for it: uvloop's
    reads the signals' wakeup fd whatever their handlers; asyncio's is interrupted in its wait, which runs them."""
    loop = asyncio.get_running_loop()

    def handle(signum: int, frame: FrameType | None) -> None:
        if not loop.is_closed():  # a start that failed: the process is on its way out, as asked
            loop.call_soon_threadsafe(callback, *args)

    signal.signal(signum, handle)
    signal.siginterrupt(signum, False)  # as the loop's own: a system call in another thread goes on, not EINTR


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the gateway: SIGTERM, and SIGINT unless it was started with SIGINT ignored, as a shell
    starts a script's background jobs so that Ctrl-C stops only the command in the foreground (it stopped the
    gateway all the same once it served)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


def ignore_signals_after_stop() -> None:
    """The stop is done: SIGTERM, SIGINT, SIGHUP and STOP_NOW are ignored for the rest of the process's life."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, STOP_NOW):
        signal.signal(signum, signal.SIG_IGN)


_CHOOSE_ANOTHER: Final = "choose another with --listen, LLMRELAY_LISTEN or server.listen"


def in_use_message(listen: str) -> str:
    """What a person is told when another process holds HOST:PORT (`check_port_free` found it)."""
    return f"cannot listen on {listen}: the address is in use (another llmrelay-server?); {_CHOOSE_ANOTHER}"


def cannot_bind_message(listen: str) -> str:
    """What a person is told when gRPC could not bind HOST:PORT after `check_port_free` passed it (another process
    took it since, say): gRPC says no more than that."""
    return (
        f"cannot listen on {listen}: gRPC could not bind it (the address is in use, by another llmrelay-server?, or"
        f" not an address of this machine); {_CHOOSE_ANOTHER}"
    )


def announcement(run_dir: Path, index: int) -> Path:
    """Where worker `index` says that it serves (and where its metrics are): absent until it does."""
    return run_dir / f"worker-{index}.json"


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows of its supervisor: its number, the run directory they share, and its pid."""

    index: int
    run_dir: Path
    supervisor_pid: int
    heartbeat_fd: int | None = None
    """The pipe to the supervisor that `beat` writes to."""

    def announce(self, metrics_port: int | None) -> None:
        """Tells the supervisor that this worker serves, and where its metrics are."""
        announced = announcement(self.run_dir, self.index)
        scratch = announced.with_suffix(".tmp")
        scratch.write_text(json.dumps({"pid": os.getpid(), "metrics_port": metrics_port}))
        scratch.replace(announced)  # whole or not at all, for a supervisor reading it at any moment

    def beat(self) -> None:
        """Tells the supervisor, every HEARTBEAT_S from now until the process ends, that its event loop runs: a worker
        whose loop is blocked (or that was stopped) would go on taking connections and answer none of them."""
        fd = self.heartbeat_fd
        if fd is None:
            return
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()

        def beat() -> None:
            try:
                os.write(fd, b".")
            except BlockingIOError:
                pass  # the pipe is full: the supervisor has beats enough to read
            except OSError:
                return  # the supervisor is gone (its end closed): no one listens
            loop.call_later(HEARTBEAT_S, beat)

        beat()

    async def watch_supervisor(self, stop: asyncio.Event) -> None:
        """Stops this worker gracefully when its supervisor is gone (killed, and the worker adopted by init).

        The parent is compared with the pid the supervisor gave, not with the one found at the first look: a
        supervisor killed while this worker was starting is gone by then, and its worker already adopted."""
        while not stop.is_set():
            if os.getppid() != self.supervisor_pid:
                log.warning("the supervisor (pid %d) is gone: stopping", self.supervisor_pid)
                stop.set()
                return
            await asyncio.sleep(PARENT_CHECK_S)


_LOOPBACKS: Final = ("127.0.0.1", "::1")


def check_port_free(listen: str) -> None:
    """ListenError when HOST:PORT cannot be served at the addresses gRPC binds for it: a process holds the port at any
    of them (localhost: 127.0.0.1 and ::1; 0.0.0.0 and [::]: both stacks, as gRPC listens there), HOST does not
    resolve or is no address of this machine, or the port takes a privilege the process lacks.

    gRPC binds each address it can and serves on those alone: a gateway started beside another process holding
    127.0.0.1:PORT served on ::1 only, and one on 0.0.0.0:PORT beside another holding [::1]:PORT on IPv4 only; callers
    of the rest reached the other process. Port 0 (any free port) is probed too, for its host: gRPC's own failure says
    no more than that it could not bind. An address that cannot be bound while another of the host's can (::1 without
    IPv6) is left out, as gRPC leaves it, and faults of another kind are left to gRPC.
    """
    port = listen.rpartition(":")[2]
    if not port.isdigit():
        return
    addresses = _addresses(listen)
    not_here = 0
    for family, kind, proto, _, address in addresses:
        # Without SO_REUSEPORT this bind fails while any socket listens on the port (another gateway's workers too),
        # or holds it without SO_REUSEADDR (another supervisor's reservation, before its workers listen).
        # SO_REUSEADDR, as gRPC sets it, lets it pass connections of an earlier server still in TIME_WAIT.
        try:
            _bound(family, kind, proto, address, reuse_address=True, reuse_port=False).close()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(in_use_message(listen)) from exc
            if exc.errno == errno.EACCES:
                raise ListenError(
                    f"cannot listen on {listen}: permission denied (a port below 1024 takes a privilege,"
                    f" CAP_NET_BIND_SERVICE); {_CHOOSE_ANOTHER}"
                ) from exc
            if exc.errno in NOT_THIS_MACHINES:
                not_here += 1
    if not_here == len(addresses):
        raise ListenError(_not_here_message(listen))


def _not_here_message(listen: str) -> str:
    host = listen.rpartition(":")[0]
    return f"cannot listen on {listen}: {host} is not an address of this machine; {_CHOOSE_ANOTHER}"


def _addresses(listen: str) -> list[tuple[Any, ...]]:
    """Every address gRPC binds for HOST:PORT, as getaddrinfo gives them; every address of the machine (0.0.0.0, [::])
    as [::], which `_bound` binds on both stacks, as gRPC does."""
    host, _, port = listen.rpartition(":")
    # gRPC takes localhost for both loopbacks, whatever /etc/hosts says.
    hosts = _LOOPBACKS if host.lower() == "localhost" else (host.strip("[]"),)
    try:
        found = [
            info
            for name in hosts
            for info in socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        ]
    except socket.gaierror as exc:
        why = f"its host does not resolve ({exc.strerror})"
        raise ListenError(f"cannot listen on {listen}: {why}; {_CHOOSE_ANOTHER}") from exc
    every = (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::", int(port), 0, 0))
    return [every if _is_unspecified(str(info[4][0])) else info for info in found]


def _is_unspecified(host: str) -> bool:
    """0.0.0.0, ::, ::ffff:0.0.0.0: gRPC listens on [::] for each, on both stacks."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_unspecified


def _bound(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    proto: int,
    address: tuple[Any, ...],
    *,
    reuse_address: bool,
    reuse_port: bool,
) -> socket.socket:
    """A socket bound to `address`, with SO_REUSEADDR and SO_REUSEPORT as asked. [::] is bound as gRPC binds it, on
    both stacks (IPV6_V6ONLY off, whatever net.ipv6.bindv6only says), so that a process holding the port on either
    is found; where the system has no IPv6 (no such family, or no such address), 0.0.0.0, as gRPC falls back to."""
    every_address = family == socket.AF_INET6 and address[0] == "::"
    try:
        return _bind(family, kind, proto, address, every_address, reuse_address, reuse_port)
    except OSError as exc:
        if not every_address or exc.errno not in NOT_THIS_MACHINES:
            raise
    return _bind(socket.AF_INET, kind, proto, ("0.0.0.0", address[1]), False, reuse_address, reuse_port)


def _bind(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    proto: int,
    address: tuple[Any, ...],
    both_stacks: bool,
    reuse_address: bool,
    reuse_port: bool,
) -> socket.socket:
    bound = socket.socket(family, kind, proto)
    try:
        if both_stacks:
            bound.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_address:
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bound.bind(address)
    except OSError:
        bound.close()
        raise
    return bound


class PortReservation:
    """HOST:PORT held for the workers at every address HOST names (localhost: 127.0.0.1 and ::1; 0.0.0.0 and [::]:
    both stacks), each by a socket bound, never listening, with SO_REUSEPORT: held at one address alone, another
    process could take the others while the workers start, and they would serve on what was left, callers of the rest
    reaching that process."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets
        self.port = int(sockets[0].getsockname()[1])
        """The port held (the one asked for, or a free one for port 0)."""

    def close(self) -> None:
        for held in self._sockets:
            held.close()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def reserve_port(listen: str) -> PortReservation:
    """Checks that no process holds HOST:PORT, then holds it at each of its addresses for the workers.

    Port 0 reserves a free port at the first address, and the same port at the others: its port is the one the
    workers are given. An address this machine cannot bind (::1 without IPv6) is left out, as gRPC leaves it.
    """
    check_port_free(listen)
    any_port = int(listen.rpartition(":")[2]) == 0
    for _ in range(FREE_PORT_TRIES if any_port else 1):
        held: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in _addresses(listen):
                if held:  # the port the first address got (the one written, or a free one)
                    address = (address[0], held[0].getsockname()[1], *address[2:])
                try:
                    held.append(_reserved(family, kind, proto, address))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE or (not held and exc.errno not in NOT_THIS_MACHINES):
                        raise
        except OSError as exc:
            for taken in held:
                taken.close()
            if any_port and exc.errno == errno.EADDRINUSE:
                continue  # the free port of the first address is taken at another: another free port
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(in_use_message(listen)) from exc
            raise ListenError(f"cannot listen on {listen}: {exc.strerror}; {_CHOOSE_ANOTHER}") from exc
        if not held:
            raise ListenError(_not_here_message(listen))
        return PortReservation(held)
    raise ListenError(f"cannot listen on {listen}: no port was free at every address of its host; {_CHOOSE_ANOTHER}")


def _reserved(
    family: socket.AddressFamily, kind: socket.SocketKind, proto: int, address: tuple[Any, ...]
) -> socket.socket:
    """A socket holding `address` for the workers: bound with SO_REUSEPORT, which the workers (SO_REUSEPORT, the same
    user) bind beside.

    SO_REUSEADDR only where the port is held by what only it passes: Linux lets two sockets that both have it bind
    one address when neither listens, so a second supervisor's probe (SO_REUSEADDR alone) would pass a reservation
    with it, and the two supervisors' workers would share the port."""
    try:
        return _bound(family, kind, proto, address, reuse_address=False, reuse_port=True)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or address[1] == 0:
            raise
        # The probe passed, so nothing listens and no supervisor holds the port: what holds it is a connection in
        # TIME_WAIT of a server without SO_REUSEPORT (a single-process gateway stopped a moment ago), which only
        # SO_REUSEADDR passes. The workers bind beside such a reservation, but so would a second supervisor's.
        return _bound(family, kind, proto, address, reuse_address=True, reuse_port=True)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restart_delay_s: float = 0.0
    waiter: asyncio.Task[None] | None = None
    """Puts the worker on the supervisor's exits when its process ends."""
    heartbeats: int | None = None
    """The supervisor's end of the worker's heartbeat pipe, while it is open."""
    heard_at: float | None = None
    """When the worker's event loop last said it runs (time.monotonic()); None until it first does."""
    killed: bool = False
    """Killed by the supervisor for its silence: its exit restarts it."""


class Supervisor:
    """Starts `config.server.workers` gateway processes on one port and keeps them running until told to stop."""

    def __init__(self, config: GatewayConfig, argv: list[str]) -> None:
        self._config = config
        self._argv = argv
        self._worker_flags: list[str] = []
        """What a worker's command line adds to the supervisor's: the configuration file kept as it was read."""
        self._worker_env: dict[str, str] = {}
        """What a worker's environment adds to the supervisor's: the keys file kept as last taken."""
        self._stop = asyncio.Event()
        self._exits: asyncio.Queue[_Worker] = asyncio.Queue()
        self._registry = CollectorRegistry(auto_describe=True)
        self._running = Gauge("llmrelay_workers", "Worker processes running.", registry=self._registry)
        self._restarts = Counter(
            "llmrelay_worker_restarts", "Worker processes restarted after they died.", registry=self._registry
        )
        self._started = Gauge(
            "llmrelay_worker_start_time_seconds",
            "When each worker's process was last started (Unix time): its counters count from zero since.",
            ["worker"],
            registry=self._registry,
        )
        self._inherited: tuple[int, ...] = ()
        """What each worker inherits: the run directory's lock, so that it stays held until the last of them exits."""

    async def run(self) -> int:
        """Serves until SIGTERM or SIGINT; the exit status (a worker's, when the workers could not start)."""
        server = self._config.server
        use_log_format(server.log_format)
        share_stderr()
        reservation = reserve_port(server.listen)
        host, port = server.listen.rpartition(":")[0], reservation.port
        for signum in stop_signals():
            on_signal(signum, self._stop.set)
        with reservation, _run_directory() as (run_dir, lock):
            self._inherited = (lock,)
            self._keep_config(run_dir)
            workers = [_Worker(index) for index in range(1, server.workers + 1)]
            keys = self._keep_keys(workers, run_dir)
            on_signal(signal.SIGHUP, keys.reload)
            keys.start()
            metrics_server = self._serve_metrics(run_dir)
            # From the first start on: a worker stuck in its start would hold up the supervisor's for good.
            watching = asyncio.ensure_future(self._watch_heartbeats(workers))
            try:
                failed = await self._serve(workers, run_dir, host, port)
            finally:
                watching.cancel()
                await keys.stop()
                stopped = await self._stop_all(workers)
                if metrics_server is not None:
                    metrics_server.shutdown()
                    metrics_server.server_close()
                ignore_signals_after_stop()
        if failed is not None:
            return failed
        log.info("stopped")
        return stopped

    async def _serve(self, workers: list[_Worker], run_dir: Path, host: str, port: int) -> int | None:
        """Starts the workers and keeps them running until SIGTERM or SIGINT; the exit status when they could not all
        start, None once told to stop (`run` stops them then, and in any case)."""
        for worker in workers:
            if self._stop.is_set():  # SIGTERM while they start: those started are stopped all the same
                return None
            try:
                await self._start(worker, run_dir, f"{host}:{port}")
            except OSError as exc:
                log.error("worker %d could not be started (%s); stopping", worker.index, exc)
                return 1
        failed = await self._until_all_serve(workers, run_dir)
        if failed is not None or self._stop.is_set():
            return failed
        log.info("listening on %s:%d (%d workers)", host, port, len(workers))
        await self._keep_running(workers, run_dir, f"{host}:{port}")
        log.info("shutting down: stopping %d workers", len(workers))
        return None

    def _serve_metrics(self, run_dir: Path) -> WSGIServer | None:
        listen = self._config.server.metrics_listen
        if listen is None:
            return None
        self._registry.register(_WorkersMetrics(run_dir))
        host = listen.rpartition(":")[0]
        try:
            server = serve_metrics(listen, self._registry)
        except OSError as exc:
            raise ListenError(cannot_serve(listen, exc)) from exc
        log.info("metrics of all workers on http://%s:%d/metrics", host, server.server_port)
        return server

    def _keep_config(self, run_dir: Path) -> None:
        """The configuration file's text as the supervisor read it, for every worker to read, those restarted later
        included: from the file itself, a worker restarted after an edit would serve with other settings than the
        rest (other keys, other limits) without a word, and a file that was a pipe (`--config /dev/stdin`) would be
        read empty. An edit takes effect when the gateway restarts (SIGHUP reloads the keys file alone)."""
        if self._config.file_text is None:
            return
        kept = run_dir / CONFIG_COPY
        # The run directory is the supervisor's user's alone (mkdtemp's 0700), and the file too: it may hold keys.
        with open(os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as copy:
            copy.write(self._config.file_text)
        self._worker_flags = ["--config", str(kept)]

    def _keep_keys(self, workers: list[_Worker], run_dir: Path) -> KeyRing:
        """The keys file, read (at start, on SIGHUP, when it changes) and checked by the supervisor as by a worker,
        and kept in the run directory as last taken: every worker serves that copy, and re-reads it when told. Read by
        each worker from the file itself, a worker restarted after a change the others refused would serve it (limits
        without Redis), or stop as it starts (a broken file) and be restarted again and again: the workers would not
        serve the same keys."""
        auth = self._config.auth
        keys = KeyRing(
            auth,
            limits_refused=LIMITS_PER_WORKER if self._config.state.redis_url is None else None,
            keep=run_dir / KEYS_COPY if auth.keys_file else None,
            on_taken=functools.partial(self._reload_all, workers, run_dir),
        )
        if auth.keys_file:
            self._worker_env = {"LLMRELAY_KEYS_FILE": str(run_dir / KEYS_COPY)}
        return keys

    async def _start(self, worker: _Worker, run_dir: Path, listen: str) -> None:
        announcement(run_dir, worker.index).unlink(missing_ok=True)
        # The same command line, made a worker: the later flags win over the earlier ones.
        command = [sys.executable, "-m", "llmrelay_server", *self._argv, *self._worker_flags]
        command += ["--listen", listen, "--workers", "1"]
        command += ["--worker", str(worker.index), "--worker-dir", str(run_dir), "--supervisor-pid", str(os.getpid())]
        heartbeats, beating = os.pipe()
        command += ["--heartbeat-fd", str(beating)]
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command, pass_fds=(*self._inherited, beating), env={**os.environ, **self._worker_env}
            )
        except BaseException:
            os.close(heartbeats)
            raise
        finally:
            os.close(beating)  # the worker's end: once the worker exits, the supervisor reads the pipe's end
        worker.started_at = time.monotonic()
        self._started.labels(worker=str(worker.index)).set_to_current_time()
        worker.heartbeats, worker.heard_at, worker.killed = heartbeats, None, False
        os.set_blocking(heartbeats, False)
        asyncio.get_running_loop().add_reader(heartbeats, self._heard, worker)
        self._running.inc()
        worker.waiter = asyncio.create_task(self._wait_exit(worker, worker.process))

    @staticmethod
    def _heard(worker: _Worker) -> None:
        assert worker.heartbeats is not None
        try:
            beats = os.read(worker.heartbeats, 4096)
        except BlockingIOError:
            return
        if beats:
            worker.heard_at = time.monotonic()
        else:  # the worker has exited
            _stop_hearing(worker)

    async def _wait_exit(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        _stop_hearing(worker)
        self._running.dec()
        await self._exits.put(worker)

    async def _watch_heartbeats(self, workers: list[_Worker]) -> None:
        """Kills a worker whose event loop has not run for worker_timeout_s, for its exit to restart it: blocked (or
        stopped), it would go on taking a share of the new connections and answer none of them. A worker beats once
        it serves: one that has not within twice that (importing, loading its encodings, opening its stores take a
        few seconds) is stuck in its start, or was stopped in it, and is killed too; else the supervisor's start (or
        its restart of that worker) waited for it without end."""
        timeout_s = self._config.server.worker_timeout_s
        ticked_at = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            if now - ticked_at > 2 * HEARTBEAT_S:
                # The supervisor did not run either (the whole gateway stopped: Ctrl-Z, `docker pause`, a frozen
                # cgroup, a suspended VM): its workers' silence was its own, and they have had no time to beat since.
                for worker in workers:
                    if worker.heard_at is not None:
                        worker.heard_at = now
                    else:
                        worker.started_at = max(worker.started_at, now)
            ticked_at = now
            for worker in workers:
                process = worker.process
                if process is None or process.returncode is not None or worker.killed:
                    continue
                if worker.heard_at is not None and now - worker.heard_at > timeout_s:
                    why = f"has not run its event loop for {now - worker.heard_at:.0f} s (blocked, or stopped)"
                elif worker.heard_at is None and now - worker.started_at > 2 * timeout_s:
                    why = f"has not started to serve within {now - worker.started_at:.0f} s (stuck, or stopped)"
                else:
                    continue
                worker.killed = True  # once: its exit restarts it
                # Killed before it is logged: a worker stopped while it wrote its log holds the lock on the standard
                # error they share (logs.BatchingHandler.shared), which the line would wait for until it dies.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                log.error("worker %d (pid %d) %s; killing it", worker.index, process.pid, why)

    async def _until_all_serve(self, workers: list[_Worker], run_dir: Path) -> int | None:
        """Waits until every worker has announced itself, or a stop comes; the exit status of the first that exits
        before, if any."""
        while not all(announcement(run_dir, worker.index).exists() for worker in workers):
            # The stop first: SIGTERM to the whole process group (systemd's stop, Ctrl-C in a terminal) also ends the
            # workers not yet handling it, and their deaths then are the stop's, not a failure to start.
            if self._stop.is_set():
                return None
            if not self._exits.empty():
                worker = self._exits.get_nowait()
                assert worker.process is not None
                status = _status(worker.process.returncode)
                log.error("worker %d exited as it started (%s); stopping", worker.index, status)
                return _exit_status(worker.process.returncode)
            await asyncio.sleep(0.05)
        return None

    async def _keep_running(self, workers: list[_Worker], run_dir: Path, listen: str) -> None:
        stopping = asyncio.ensure_future(self._stop.wait())
        exited = asyncio.ensure_future(self._exits.get())
        # Each restart waits out its back-off on its own: one worker that keeps dying must not hold up noticing and
        # restarting another.
        restarting: set[asyncio.Task[None]] = set()
        try:
            while not stopping.done():
                await asyncio.wait({stopping, exited, *restarting}, return_when=asyncio.FIRST_COMPLETED)
                for restart in [task for task in restarting if task.done()]:
                    restarting.discard(restart)
                    restart.result()  # what _restart does not expect (a bug) stops them all, with its traceback
                if stopping.done() or not exited.done():
                    continue
                worker = exited.result()
                exited = asyncio.ensure_future(self._exits.get())
                assert worker.process is not None
                lived_s = time.monotonic() - worker.started_at
                worker.restart_delay_s = _longer(worker.restart_delay_s) if lived_s < STEADY_S else 0.0
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1f s; restarting it%s",
                    worker.index,
                    worker.process.pid,
                    _status(worker.process.returncode),
                    lived_s,
                    f" in {worker.restart_delay_s:g} s" if worker.restart_delay_s else "",
                )
                restarting.add(asyncio.create_task(self._restart(worker, run_dir, listen)))
        finally:
            stopping.cancel()
            exited.cancel()
            # Those in their back-off end there; one making its process kills it (asyncio's and uvloop's cancelled
            # subprocess_exec do), and _stop_all stops those already started.
            for restart in restarting:
                restart.cancel()
            await asyncio.gather(*restarting, return_exceptions=True)

    async def _restart(self, worker: _Worker, run_dir: Path, listen: str) -> None:
        """Starts the worker again once its back-off is over. One whose process cannot be made (the supervisor out of
        file descriptors, memory or processes for a moment; its interpreter gone in an upgrade) is tried again after a
        back-off grown as for one that died young, while the others serve: not a reason to stop them all."""
        while True:
            await asyncio.sleep(worker.restart_delay_s)
            try:
                await self._start(worker, run_dir, listen)
            except OSError as exc:
                worker.restart_delay_s = _longer(worker.restart_delay_s)
                log.error(
                    "worker %d could not be started (%s); trying again in %g s",
                    worker.index,
                    exc,
                    worker.restart_delay_s,
                )
            else:
                self._restarts.inc()
                return

    def _reload_all(self, workers: list[_Worker], run_dir: Path) -> None:
        """SIGHUP on to the workers that have announced themselves, to re-read the keys file's copy: one still starting
        (its signal handlers not yet set) would die of it, and sees the copy change as it watches it anyway."""
        self._signal_all([w for w in workers if announcement(run_dir, w.index).exists()], signal.SIGHUP)

    def _signal_all(self, workers: list[_Worker], signum: int) -> None:
        for worker in workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _stop_all(self, workers: list[_Worker]) -> int:
        """SIGTERM to every worker; each drains and finishes its calls; one that outlasts all that is killed. The
        supervisor's exit status: 0, or for the first (by number) of the workers that did not stop cleanly (killed, by
        the supervisor or anything else, or exited with another status), `_exit_status`: one that dies in its stop
        cuts the calls it had in flight, as one that dies while serving does, and is logged as that one is.

        They drain together, so they are waited for together: one deadline for all, not one after another's. A
        second SIGTERM or SIGINT meanwhile has each of them stop at once (STOP_NOW; see Gateway.stop)."""
        # Those already dead (waiting out a restart's back-off) have had their exit logged.
        running = [(w.index, w.process) for w in workers if w.process is not None and w.process.returncode is None]
        self._signal_all(workers, signal.SIGTERM)
        for signum in stop_signals():
            on_signal(signum, self._signal_all, workers, STOP_NOW)
        server = self._config.server
        # And the bills of calls cut off at the end of the grace period, which may count a prompt offline
        # (Gateway.stop): killed meanwhile, the worker lost them.
        billing_s = TokenCounter.count_s_at_most(server.max_message_bytes)
        within_s = server.drain_s + server.grace_period_s + billing_s + EXIT_MARGIN_S
        if self._config.state.redis_url:
            within_s += 3 * self._config.state.timeout_s  # then the settles the last calls sent (RedisLimiter.aclose)
        if server.tracing:
            # Then each exports the spans still queued, for up to the export timeout. Unless the workers refused the
            # OTEL_* settings (or OpenTelemetry is not installed) as they started: then none runs to wait for.
            with contextlib.suppress(ConfigError, ImportError):
                from llmrelay_server.tracing import export_timeout_s

                within_s += export_timeout_s()
        exits = {asyncio.ensure_future(process.wait()): (index, process) for index, process in running}
        if not exits:
            return 0
        _, late = await asyncio.wait(exits, timeout=within_s)
        for exit_ in late:
            index, process = exits[exit_]
            process.kill()  # before the line, as in _watch_heartbeats: a worker stopped may hold the log's lock
            log.error("worker %d did not stop within %g s: killing it", index, within_s)
        await asyncio.gather(*late)
        status = 0
        for exit_, (index, process) in exits.items():
            if process.returncode == 0 or process.returncode in _ENDED_BY_THE_STOP:
                continue
            if exit_ not in late:  # the kill said so
                log.error(
                    "worker %d (pid %d) exited with %s as it stopped", index, process.pid, _status(process.returncode)
                )
            status = status or _exit_status(process.returncode)
        return status


def _longer(restart_delay_s: float) -> float:
    """The back-off after `restart_delay_s`, for a worker that died young again or could not be started."""
    return min(MAX_RESTART_DELAY_S, max(1.0, restart_delay_s * 2))


def _stop_hearing(worker: _Worker) -> None:
    if worker.heartbeats is not None:
        asyncio.get_running_loop().remove_reader(worker.heartbeats)
        os.close(worker.heartbeats)
        worker.heartbeats, worker.heard_at = None, None


@contextlib.contextmanager
def _run_directory() -> Iterator[tuple[Path, int]]:
    """A new run directory, and the descriptor of the lock held on it; both removed at the end.

    First removes the run directories that supervisors killed with SIGKILL left behind: each run has its own, and
    without this they pile up in the temporary directory, one per killed supervisor.
    """
    parent = Path(tempfile.gettempdir())
    _remove_stale_run_dirs(parent)
    # Made under a name the removal passes over, and renamed once locked: a run directory is never seen unlocked
    # while its supervisor lives.
    making = Path(tempfile.mkdtemp(prefix=f".{RUN_DIR_PREFIX}", dir=parent))
    lock = os.open(making / _RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            run_dir = making.rename(parent / making.name.removeprefix("."))
        except OSError:
            shutil.rmtree(making, ignore_errors=True)
            raise
        try:
            yield run_dir, lock
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        os.close(lock)


def _remove_stale_run_dirs(parent: Path) -> None:
    """Removes the run directories in `parent` that no process holds any longer."""
    for run_dir in parent.glob(f"{RUN_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):  # removed meanwhile by another supervisor starting, or not ours to read
            if _remove_if_stale(run_dir):
                log.info("removed %s, left by a supervisor that was killed", run_dir)


def _remove_if_stale(run_dir: Path) -> bool:
    """Removes the run directory if it is this user's and nothing holds its lock; whether it did.

    The supervisor holds the lock from before the directory has its name, and its workers inherit it, so the kernel
    releases it only once the supervisor and every worker of it have exited, however they ended: unlike a pid, it
    cannot be mistaken for a process that came later or lives in another pid namespace (a container restarted on
    the same /tmp volume).
    """
    info = run_dir.lstat()  # a symbolic link (anyone may make one in /tmp) is not a run directory
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    try:
        lock = os.open(run_dir / _RUN_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # not locked by its supervisor: an earlier version's, whose owner cannot be known
        return False
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its supervisor, or a worker of it, still runs
        shutil.rmtree(run_dir)
        return True
    finally:
        os.close(lock)


_ENDED_BY_THE_STOP: Final = (-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT)
"""A worker's statuses when the stop's own signal ended it before its handlers were in place (as it loaded: Ctrl-C
then exits 128 + SIGINT, as __main__ has it): the process group's SIGTERM or Ctrl-C, or the supervisor's SIGTERM to a
worker just restarted. Once in place, they stop it cleanly."""


def _exit_status(returncode: int | None) -> int:
    """The supervisor's exit status for a worker's: 128 + N for one killed by signal N, as a shell reports it (a
    negative status would reach the shell as 256 - N), and never 0, which would say that all went well."""
    if returncode is not None and returncode < 0:
        return 128 - returncode
    return returncode or 1


def _status(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"status {returncode}"


_DIRECT: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Opens the workers' loopback endpoints directly: urlopen would go through an HTTP_PROXY the environment names
(a machine behind a corporate proxy), and every worker's metrics would be missing from the scrape."""


class _WorkersMetrics(Collector):
    """Every running worker's metrics, read from its own endpoint at each scrape, each sample labelled `worker`."""

    def __init__(self, run_dir: Path) -> None:
        self._run_dir = run_dir

    def describe(self) -> list[Metric]:
        return []  # the families are the workers', known only when they are read

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        announced = sorted(self._run_dir.glob("worker-*.json"))
        # Read at once, each within its timeout: one after another, each worker that does not answer (stopped, stuck)
        # added its timeout to the scrape, and five of them passed Prometheus's own, losing every worker's metrics.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(announced)), "llmrelay-scrape") as readers:
            texts = list(readers.map(_read_metrics, announced))
        for worker_file, text in zip(announced, texts, strict=True):
            if text is None:  # a worker restarting or gone: absent from this scrape
                continue
            worker = worker_file.stem.removeprefix("worker-")
            with contextlib.suppress(ValueError):
                for family in text_string_to_metric_families(text):
                    if family.type == "gauge" and family.name.endswith("_created"):
                        # A counter's creation time, a gauge of its own in this format: exposed again beside the
                        # counter, it would clash with the counter's own _created in OpenMetrics, Prometheus's
                        # preferred format, and fail the whole scrape.
                        continue
                    merged = families.setdefault(
                        family.name, Metric(family.name, family.documentation, family.type, family.unit)
                    )
                    for sample in family.samples:
                        merged.add_sample(
                            sample.name, {**sample.labels, "worker": worker}, sample.value, sample.timestamp
                        )
        yield from families.values()


def _read_metrics(announced: Path) -> str | None:
    """A worker's metrics, from the port its file announces; None when they cannot be read."""
    try:
        port = json.loads(announced.read_text())["metrics_port"]
        with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
            return str(answer.read().decode())
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        # HTTPException: an answer cut short (IncompleteRead: a worker killed as it wrote it) or not HTTP at all,
        # which failed the whole scrape, every worker's metrics lost with it, and printed a traceback.
        return None
