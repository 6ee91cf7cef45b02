"""The one harness that starts a real gateway and its upstreams: for the Python tests, the bench, the demo, and, as a
command, for the Go and TypeScript tests.

In Python, `spawn_gateway` starts `llmrelay-server` as its own process, as a user runs it, and `GatewayProcess`
watches it (its log, its exit). As a command it starts the loopback fake upstream (tests/upstream.py) and a gateway
in front of it, then prints where they are:

    python tests/harness.py [--fallback] [--tls | --mutual-tls] [--retries N] [--config-extra FILE]

- The gateway has one backend, "ollama" (chat model "tiny", embedding model "embed-test"), at the fake upstream, with
  no retries (or N) and a circuit that stays closed; with --fallback a second one, "fallback" (openai_compatible,
  model "tiny", the same upstream), after it. With --tls it serves TLS with a certificate for localhost and 127.0.0.1
  from a CA made for the run. With --mutual-tls it does, and asks every client for a certificate of a second CA made
  for the run (its client_ca_file); the harness writes one such certificate, and one of a third CA, which the gateway
  refuses.
- The configuration it writes has the sections server, llm and router. --config-extra FILE appends FILE's YAML to it:
  sections the harness does not write, such as auth (caller keys and their limits). FILE must not repeat the
  harness's sections (a YAML mapping keeps only the last of a repeated key): the harness refuses one that does.
- Once the gateway is SERVING, one line of JSON goes to stdout: {"target", "upstream", "fallback_backend",
  "embedding_model", "ca_file", "client_cert_file", "client_key_file", "other_client_cert_file",
  "other_client_key_file", "gateway_pid"} (null where not made). The upstream's control API (POST and DELETE
  /_control/faults, GET /_control/requests) is at "upstream".
- The gateway's log goes to stderr as it comes.
- It runs until stdin reaches its end, or SIGTERM or SIGINT, then stops the gateway and the upstream and exits 0; if
  the gateway stops by itself first, it says so and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import grpc
import grpc.aio
import yaml
from certs import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from upstream import FakeUpstream

BIN = Path(sys.executable).parent
"""The Python environment's programs: llmrelay-server, llmrelay."""
START_TIMEOUT_S = 30.0
"""How long a gateway may take to listen, and then to serve."""
STOP_TIMEOUT_S = 15.0
"""How long a gateway may take to stop after SIGTERM before it is killed."""
EMBEDDING_MODEL = "embed-test"
"""The fake upstream's embedding model, which the command's "ollama" backend serves."""
FALLBACK_BACKEND = "fallback"
HARNESS_SECTIONS = frozenset({"server", "llm", "router"})
"""The sections of the configuration the command writes, which --config-extra must not repeat."""
CLIENT_FILES = ("client_cert_file", "client_key_file", "other_client_cert_file", "other_client_key_file")
"""The files of --mutual-tls's client certificates, as its line of JSON names them."""
PROXY_VARIABLES = tuple(
    case(f"{name}_proxy") for case in (str.upper, str.lower) for name in ("http", "https", "all", "no")
)
"""The variables that name the proxies a gateway's upstream calls go through (backends/proxies.py)."""
_CONFIG_ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_", "OLLAMA_", "LLMRELAY_", "OTEL_", *PROXY_VARIABLES)
"""What configures a gateway from the environment: its backends, itself, traces, and the proxies its upstream calls
go through."""


def free_port() -> int:
    """A loopback port free now, for a server to bind a moment later. Taken below the kernel's range of ephemeral
    ports where there is room (Linux's starts at 32768): the tests' own connections take their source ports from
    that range, and one of them could take a port the kernel had just given out before its server bound it."""
    for port in itertools.islice(_LISTENING_PORTS, 64):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_ports() -> Iterator[int]:
    """Ports below the ephemeral range, in an order of this process's own, so that two servers it starts at once do
    not draw the same one; none where the range leaves no room (or the system does not say where it starts)."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return iter(())
    ports = list(range(max(1024, first_ephemeral - _LISTENING_PORTS_WANTED), first_ephemeral))
    if len(ports) < _LISTENING_PORTS_WANTED // 4:
        return iter(())
    random.shuffle(ports)
    return itertools.cycle(ports)


_LISTENING_PORTS_WANTED = 12_000
_LISTENING_PORTS = _listening_ports()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables that configure a gateway, plus `extra`: the configuration
    file alone decides what a started gateway does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIG_ENV_PREFIXES)}
    return {**env, **extra}


class GatewayProcess:
    """A running `llmrelay-server` and everything it has logged (it logs to stderr)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, echo: TextIO | None = None) -> None:
        self.process = process
        self.port = port
        self.log: list[str] = []
        self._echo = echo
        self._reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_listening(self, within_s: float = START_TIMEOUT_S, *, read_on: bool = True) -> None:
        """Until the server says it listens; its log is read on from then, so a full pipe never blocks it (unless not
        `read_on`: a log reader stalled, until `output`)."""
        async with asyncio.timeout(within_s):
            while "listening on" not in (line := await self._readline()):
                if not line:
                    status = await self.process.wait()
                    raise AssertionError(f"llmrelay-server exited early (status {status}):\n" + "".join(self.log))
        if read_on:
            self._reader = asyncio.create_task(self._read_to_end())

    async def wait_serving(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Until grpc.health.v1 says SERVING: the gateway answers calls (and handles SIGTERM). Its log is read on from
        here if wait_listening did not start to (a gateway logging at WARNING never says it listens)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_to_end())
        target = self.target
        channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        async with channel, asyncio.timeout(START_TIMEOUT_S):
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"llmrelay-server exited (status {self.process.returncode}):\n{self.text()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)

    async def wait_for_line(self, text: str, within_s: float = 20) -> str:
        """The first line of the log (read so far, or to come) that holds `text`."""
        async with asyncio.timeout(within_s):
            while True:
                for line in self.log:
                    if text in line:
                        return line
                await asyncio.sleep(0.02)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit status."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                self.process.kill()
        return await self.process.wait()

    def text(self) -> str:
        """What the server has logged so far."""
        return "".join(self.log)

    async def output(self) -> str:
        """Everything the server logged, once it has exited."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_to_end())
        await self._reader
        return self.text()

    async def _readline(self) -> str:
        assert self.process.stderr is not None
        line = (await self.process.stderr.readline()).decode()
        self.log.append(line)
        if self._echo is not None and line:
            self._echo.write(line)
            self._echo.flush()
        return line

    async def _read_to_end(self) -> None:
        # In blocks, not lines: a gateway that logs every call must not cost the process that reads it (the bench's
        # load generator) a wake-up per line.
        assert self.process.stderr is not None
        decoder, partial = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        while data := await self.process.stderr.read(65536):
            block = decoder.decode(data)
            *lines, partial = (partial + block).split("\n")
            self.log.extend(line + "\n" for line in lines)
            if self._echo is not None:
                self._echo.write(block)
                self._echo.flush()
        if partial := partial + decoder.decode(b"", final=True):
            self.log.append(partial)


async def spawn_gateway(
    config: Path,
    *flags: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    echo: TextIO | None = None,
    under: Sequence[str] = (),
    interruptible: bool = True,
) -> GatewayProcess:
    """`llmrelay-server` on 127.0.0.1 at a free port (or `port`), configured by `config` and `flags`, in `env` (by
    default clean_env(): nothing but the file configures it); run by `under` when given (valgrind, taskset). It has
    not necessarily started to listen yet: see GatewayProcess.wait_listening. `interruptible`: it takes SIGINT as a
    command in a terminal's foreground does, whatever this process does (a run in the background, `&`, as a CI script
    starts one, ignores SIGINT, which a child inherits, and a gateway started so keeps it ignored); else it is started
    with SIGINT ignored, as a shell starts a background job."""
    port = free_port() if port is None else port
    process = await asyncio.create_subprocess_exec(
        # By coreutils' env, which execs the rest: a preexec_fn would run Python in the child of a process using gRPC,
        # whose fork handlers then crash it, and changing this process's own SIGINT around the start, two starts at
        # once put back each other's.
        "/usr/bin/env",
        "--default-signal=INT" if interruptible else "--ignore-signal=INT",
        *under,
        BIN / "llmrelay-server",
        "--listen",
        f"127.0.0.1:{port}",
        "--config",
        str(config),
        *flags,
        env=dict(env) if env is not None else clean_env(),
        cwd=cwd,
        stderr=asyncio.subprocess.PIPE,
    )
    return GatewayProcess(process, port, echo)


def gateway_config(
    upstream_url: str,
    scratch: Path,
    *,
    fallback: bool,
    retries: int,
    tls: str | None,
    extra: str = "",
    max_message_bytes: int | None = None,
) -> str:
    """The command's gateway: "ollama" at the fake upstream (and "fallback" after it), its ledger in `scratch`, then
    `extra` (YAML sections other than HARNESS_SECTIONS: see config_extra)."""
    tls_field = f", tls: {tls}" if tls else ""
    size_field = f", max_message_bytes: {max_message_bytes}" if max_message_bytes is not None else ""
    ledger = f'usage_db: "{scratch / "usage.db"}", usage_journal_dir: "{scratch / "journal"}"'
    lines = [
        f"server: {{{ledger}, drain_s: 0{tls_field}{size_field}}}",
        "llm:",
        f'  ollama: {{base_url: "{upstream_url}/v1", model: tiny, embedding_model: {EMBEDDING_MODEL}}}',
    ]
    if fallback:
        lines += [
            "  backends:",
            f'    - {{name: {FALLBACK_BACKEND}, kind: openai_compatible, base_url: "{upstream_url}/v1", model: tiny}}',
        ]
    # The SDKs' tests share one gateway and inject upstream failures test after test: a circuit that opened on
    # earlier tests' failures would fail a later one for 30 s (the circuit's own tests are tests/e2e/test_faults.py).
    lines.append(f"router: {{retry: {{max_retries: {retries}}}, circuit: {{failure_threshold: 1000}}}}")
    config = "\n".join(lines) + "\n"
    if extra:
        config += extra if extra.endswith("\n") else extra + "\n"
    return config


def config_extra(path: Path) -> str:
    """The text of a --config-extra file: YAML sections to append to the command's configuration. ValueError when it
    cannot be read, is not a YAML mapping, or repeats one of HARNESS_SECTIONS."""
    try:
        text = path.read_text()
        document = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if document is None:
        return ""
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a YAML mapping of configuration sections")
    if repeated := sorted(HARNESS_SECTIONS.intersection(document)):
        raise ValueError(f"{path}: repeats the harness's own section(s) {', '.join(repeated)}")
    return text


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set from now on: taken before the harness says where the gateway is, so that
    a signal sent as soon as that line is read stops it as the first line's reader expects (SIGINT's default raised
    KeyboardInterrupt in the harness)."""
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _until_stopped(gateway: GatewayProcess, stop: asyncio.Event) -> bool:
    """Until stdin ends, `stop` is set (_stop_on_signals) (True), or the gateway exits by itself (False)."""
    loop = asyncio.get_running_loop()

    # A daemon thread reads stdin: it works whatever stdin is (a pipe, a file, /dev/null), and it does not hold up
    # the exit when a signal stops the harness first. By os.read, not sys.stdin's buffered reader: the thread would
    # hold the reader's lock, and the exit after a signal then aborts taking it ("Fatal Python error:
    # _enter_buffered_busy", status 134 for a Ctrl-C).
    def read_stdin() -> None:
        with contextlib.suppress(OSError):  # no stdin at all (a closed descriptor): nothing to wait for
            while os.read(0, 65536):
                pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    stopped, exited = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gateway.process.wait())
    await asyncio.wait({stopped, exited}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return not exited.done()


def _tls_files(scratch: Path, *, mutual: bool) -> tuple[str, Path, grpc.ChannelCredentials, dict[str, Path]]:
    """--tls's certificates, written in `scratch`: the server's tls section, the CA file its clients trust, and
    credentials that reach it. With `mutual` (--mutual-tls), the gateway asks for a client certificate of a CA of
    its own too; the files of one such, and of one of a CA it does not trust, by their CLIENT_FILES names."""
    authority = Authority("llmrelay harness CA")
    authority.server().write(scratch / "server.pem", scratch / "server.key")
    ca_file = scratch / "ca.pem"
    ca_file.write_bytes(authority.cert)
    fields = f'cert_file: "{scratch / "server.pem"}", key_file: "{scratch / "server.key"}"'
    if not mutual:
        return f"{{{fields}}}", ca_file, grpc.ssl_channel_credentials(authority.cert), {}
    client_ca = Authority("llmrelay harness client CA")
    (scratch / "client_ca.pem").write_bytes(client_ca.cert)
    ours, other = client_ca.client(), Authority("a CA the gateway does not trust").client()
    clients: dict[str, Path] = {}
    for prefix, issued in (("client", ours), ("other_client", other)):
        issued.write(scratch / f"{prefix}.pem", scratch / f"{prefix}.key")
        clients[f"{prefix}_cert_file"] = scratch / f"{prefix}.pem"
        clients[f"{prefix}_key_file"] = scratch / f"{prefix}.key"
    tls = f'{{{fields}, client_ca_file: "{scratch / "client_ca.pem"}"}}'
    return tls, ca_file, grpc.ssl_channel_credentials(authority.cert, ours.key, ours.cert), clients


async def run_command(args: argparse.Namespace) -> int:
    upstream = await FakeUpstream(models=("tiny",), ollama=True).start()
    try:
        with tempfile.TemporaryDirectory(prefix="llmrelay-harness-") as folder:
            scratch = Path(folder)
            tls: str | None = None
            ca_file: Path | None = None
            credentials: grpc.ChannelCredentials | None = None
            clients: dict[str, Path] = {}
            if args.tls or args.mutual_tls:
                tls, ca_file, credentials, clients = _tls_files(scratch, mutual=args.mutual_tls)
            config = scratch / "llmrelay.yaml"
            upstream_url = upstream.base_url.removesuffix("/v1")
            config.write_text(
                gateway_config(
                    upstream_url,
                    scratch,
                    fallback=args.fallback,
                    retries=args.retries,
                    tls=tls,
                    extra=args.extra,
                    max_message_bytes=args.max_message_bytes,
                )
            )
            gateway = await spawn_gateway(config, cwd=scratch, echo=sys.stderr)
            try:
                await gateway.wait_listening()
                await gateway.wait_serving(credentials)
                where = {
                    "target": gateway.target,
                    "upstream": upstream_url,
                    "fallback_backend": FALLBACK_BACKEND if args.fallback else None,
                    "embedding_model": EMBEDDING_MODEL,
                    "ca_file": str(ca_file) if ca_file else None,
                    **{name: str(clients[name]) if name in clients else None for name in CLIENT_FILES},
                    "gateway_pid": gateway.process.pid,
                }
                stop = _stop_on_signals()
                print(json.dumps(where), flush=True)
                if not await _until_stopped(gateway, stop):
                    print(
                        f"harness: the gateway exited by itself (status {gateway.process.returncode})", file=sys.stderr
                    )
                    return 1
            finally:
                await gateway.stop()
                await gateway.output()
    finally:
        await upstream.stop()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fallback", action="store_true", help='a second backend, "fallback", after "ollama"')
    parser.add_argument("--tls", action="store_true", help="serve TLS with a certificate from a CA made for the run")
    parser.add_argument(
        "--mutual-tls",
        action="store_true",
        help="serve TLS and ask clients for a certificate of a second CA made for the run (client_cert_file)",
    )
    parser.add_argument("--retries", type=int, default=0, help="the router's max_retries (default 0)")
    parser.add_argument(
        "--max-message-bytes", type=int, help="the gateway's server.max_message_bytes (default: the gateway's own)"
    )
    parser.add_argument(
        "--config-extra",
        type=Path,
        metavar="FILE",
        help="YAML sections appended to the gateway's configuration, such as auth (caller keys and their limits); "
        "not the harness's own: server, llm, router",
    )
    args = parser.parse_args()
    try:
        args.extra = config_extra(args.config_extra) if args.config_extra else ""
    except ValueError as exc:
        parser.error(f"--config-extra: {exc}")
    sys.exit(asyncio.run(run_command(args)))


if __name__ == "__main__":
    main()
