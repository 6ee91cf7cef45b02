"""`make bench`: what the gateway adds to a call, against the direct HTTP call and against the floor of Python gRPC.

Four paths to the same answers, measured in one run, taking turns in rounds so that the machine's slow moments fall
on all of them:
- direct: the loopback upstream called over raw HTTP/1.1 keep-alive connections (bench/direct.py), a load generator
  as cheap as the gRPC one;
- floor: a plain grpc.aio server answering the gateway's messages from memory, a message per upstream chunk
  (bench/floor.py): what any Python gRPC server costs;
- gateway: llmrelay-server in front of the upstream, with no call log;
- everything: the gateway with auth, limits, metrics and a JSON log line per call.
Each server runs in its own process, so its CPU time is read from its process CPU clock. Per path, unary calls and
streams of 8 chunks, one caller and 16 at once: latency added to the direct call's (p50, p99), server CPU per call as
a multiple of the floor's, calls/s, time to first chunk; then chunks/s of a 1,000-chunk stream, and each gateway's
memory with 1,000 streams open and its idle upstream connections after that burst. The figures go to bench/results/
as JSON and a PNG chart; the table printed is the README's.

Usage: python -m bench [--quick] [--requests N] [--rounds R] [--loop asyncio|uvloop] [--workers | --one-core
       [--features] [--against REV]]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import operator
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from harness import GatewayProcess, clean_env, free_port, spawn_gateway
from llmrelay import v1 as pb

from bench.direct import DirectClient

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
STOP_S = 15
MODEL = "tiny"
UNARY_PROMPT = "benchmark the gateway please"
# The upstream answers "echo: " + the prompt, a chunk per word: 8 chunks, and 1,000.
STREAM_PROMPT = "benchmark the gateway with a short stream"
LONG_PROMPT = " ".join(f"w{i}" for i in range(999))
HOLD_PROMPT = "hold"
CONCURRENCIES = (1, 16)
KINDS = ("unary", "stream")
PATHS = ("direct", "floor", "gateway", "everything")
JOINED_FLOOR = "floor, joined"
"""The floor that sends a stream as the very messages the gateway sent (bench/floor.py --joined): streams only, as its
unary answer is the floor's."""
OPEN_STREAMS = 1000
HOLD_TRICKLE_S = 3.0
"""How long the upstream waits between the chunks of each of the open streams, which stay open two of these after
their first chunk: the memory is read once all are open, or a second before the first of them could end."""

Call = Callable[[], Awaitable[float]]
"""A call checked for its answer; it returns the time.perf_counter() of its first chunk (unary: of its answer)."""


def cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has taken, all its threads, from its CPU-time clock (Linux's
    MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)): to the nanosecond, where /proc's stat counts ticks of 10 ms (a long
    stream's few hundred milliseconds would be some twenty of them)."""
    return time.clock_gettime((~pid << 3) | 2)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def established_to(pid: int, port: int) -> int:
    """How many TCP connections process `pid` holds open to local port `port` (its upstream connections)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    latencies_s: list[float]
    first_chunk_s: list[float]
    wall_s: float
    cpu_s: dict[str, float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p99_ms(self) -> float:
        if len(self.latencies_s) == 1:  # a round of one call (--requests as many as --rounds): quantiles needs two
            return self.latencies_s[0] * 1000
        # Inclusive: with fewer than 99 latencies, the exclusive method reads past the largest one.
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[98] * 1000

    @property
    def first_chunk_p50_ms(self) -> float:
        return statistics.median(self.first_chunk_s) * 1000

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def cpu_ms(self, server: str) -> float:
        """The server's CPU time per call, in milliseconds."""
        return self.cpu_s[server] / len(self.latencies_s) * 1000

    def __add__(self, other: Run) -> Run:
        cpu = {name: self.cpu_s[name] + other.cpu_s[name] for name in self.cpu_s}
        return Run(
            self.latencies_s + other.latencies_s,
            self.first_chunk_s + other.first_chunk_s,
            self.wall_s + other.wall_s,
            cpu,
        )


async def measure(
    call: Call, requests: int, concurrency: int, pids: Mapping[str, Sequence[int]], warm_up: bool = False
) -> Run:
    """Times `requests` calls, `concurrency` at a time; each server's CPU is summed over its processes `pids`. A
    warm-up first makes as many calls, as many at a time (connections for each caller, caches, first-call imports)."""
    semaphore = asyncio.Semaphore(concurrency)

    async def untimed() -> None:
        async with semaphore:
            await call()

    if warm_up:
        await asyncio.gather(*(untimed() for _ in range(min(requests, 50) if requests > 1 else 1)))
    latencies: list[float] = []
    first_chunks: list[float] = []

    async def timed() -> None:
        async with semaphore:
            started = time.perf_counter()
            first = await call()
            latencies.append(time.perf_counter() - started)
            first_chunks.append(first - started)

    def cpu() -> dict[str, float]:
        return {name: sum(map(cpu_seconds, processes)) for name, processes in pids.items()}

    cpu_before = cpu()
    started = time.perf_counter()
    await asyncio.gather(*(timed() for _ in range(requests)))
    wall = time.perf_counter() - started
    cpu_after = cpu()
    return Run(latencies, first_chunks, wall, {name: cpu_after[name] - cpu_before[name] for name in pids})


def direct_calls(client: DirectClient) -> dict[str, Call]:
    """Unary, 8-chunk and 1,000-chunk chat completions over plain HTTP, each checking that the answer came whole."""
    unary_body = client.body(UNARY_PROMPT, stream=False)

    async def unary() -> float:
        answer = await client.complete(unary_body)
        assert answer["choices"][0]["message"]["content"], answer
        return time.perf_counter()

    def stream_of(prompt: str) -> Call:
        body = client.body(prompt, stream=True)
        expected = f"echo: {prompt}"

        async def stream() -> float:
            text, first = await client.stream(body)
            assert text == expected, (text, expected)
            return first

        return stream

    return {"unary": unary, "stream": stream_of(STREAM_PROMPT), "long": stream_of(LONG_PROMPT)}


MESSAGES_MATCHED = 64
"""The plain gateway's latest streams of each kind whose messages the joined floor's streams match, one by one."""


def grpc_calls(
    stub: pb.LLMServiceAsyncStub,
    metadata: Sequence[tuple[str, str]] = (),
    *,
    sent: Mapping[str, collections.deque[int]] | None = None,
    matching: Mapping[str, collections.deque[int]] | None = None,
) -> dict[str, Call]:
    """The same chats through llmrelay's gRPC contract (the gateway's, or the floor's). Streams of each kind add how
    many messages they had to `sent`'s (the plain gateway's), or, the joined floor's, ask for as many as the next of
    `matching`'s had (a floor has no tokens to limit: max_tokens tells it, `bench.floor`). The gateway joins the
    chunks that reach it together, more of them the busier it is: one stream recorded before the run, the floor sent
    a third or half more messages than the gateway did at 16 callers, or fewer at one."""

    def messages(prompt: str) -> list[pb.Message]:
        return [pb.Message(role=pb.ROLE_USER, content=prompt)]

    request = pb.CompleteRequest(model=MODEL, messages=messages(UNARY_PROMPT))

    async def unary() -> float:
        answer = await stub.Complete(request, timeout=10, metadata=metadata)
        assert answer.message.content, answer
        return time.perf_counter()

    def stream_of(kind: str, prompt: str) -> Call:
        requests: dict[int, pb.StreamCompleteRequest] = {}  # by the messages asked for (0: as recorded)
        answer = f"echo: {prompt}"
        counts = sent[kind] if sent is not None else None
        matched, turn = (matching[kind] if matching is not None else None), itertools.count()

        async def stream() -> float:
            wanted = matched[next(turn) % len(matched)] if matched else 0
            if (stream_request := requests.get(wanted)) is None:
                options = pb.CompletionOptions(max_tokens=wanted) if wanted else None
                stream_request = requests[wanted] = pb.StreamCompleteRequest(
                    model=MODEL, messages=messages(prompt), options=options
                )
            first = 0.0
            texts = []
            received = 0
            async for message in stub.StreamComplete(stream_request, timeout=30, metadata=metadata):
                received += 1
                if message.delta.content:
                    texts.append(message.delta.content)
                    first = first or time.perf_counter()
            assert "".join(texts) == answer, texts
            assert received == wanted or not wanted, (received, wanted)
            if counts is not None:
                counts.append(received)
            return first

        return stream

    return {"unary": unary, "stream": stream_of("stream", STREAM_PROMPT), "long": stream_of("long", LONG_PROMPT)}


async def recorded_answers(stub: pb.LLMServiceAsyncStub, scratch: Path) -> Path:
    """The gateway's answers to the bench's prompts, written to a file in `scratch` for the floor to send the same
    messages."""

    def encoded(message: Any) -> str:
        return base64.b64encode(message.SerializeToString()).decode()

    def messages(prompt: str) -> list[pb.Message]:
        return [pb.Message(role=pb.ROLE_USER, content=prompt)]

    answer = await stub.Complete(pb.CompleteRequest(model=MODEL, messages=messages(UNARY_PROMPT)), timeout=10)
    streams, joined = {}, {}
    for prompt in (STREAM_PROMPT, LONG_PROMPT):
        request = pb.StreamCompleteRequest(model=MODEL, messages=messages(prompt))
        recorded = [message async for message in stub.StreamComplete(request, timeout=30)]
        streams[prompt] = [encoded(message) for message in a_message_per_chunk(recorded)]
        joined[prompt] = [encoded(message) for message in recorded]
    answers = scratch / "answers.json"
    answers.write_text(json.dumps({"complete": {UNARY_PROMPT: encoded(answer)}, "stream": streams, "joined": joined}))
    return answers


def a_message_per_chunk(stream: list[pb.StreamCompleteResponse]) -> list[pb.StreamCompleteResponse]:
    """The gateway's stream as a message per upstream chunk (a word), then its last message: the floor sends every
    chunk on its own, whereas the gateway joins the chunks that reach it together (the loopback upstream writes them
    all at once)."""
    *texts, last = stream
    words = "".join(message.delta.content for message in texts).split(" ")
    pieces = []
    for index, word in enumerate(words):
        piece = pb.StreamCompleteResponse()
        piece.CopyFrom(texts[0])
        piece.delta.content = word if index == 0 else f" {word}"
        pieces.append(piece)
    return [*pieces, last]


# --- processes: everything the bench starts and stops ---------------------------------------------------------


def start(
    args: list[str], ready: str, env: dict[str, str] | None = None, within_s: float = 30
) -> subprocess.Popen[str]:
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    # Its output read by a thread for as long as it runs (a process that logs every call would block once the pipe is
    # full), the lines handed over until it is ready: a read here would wait past `within_s` for a silent process.
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=_read_lines, args=(process, lines, ready), daemon=True).start()
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if ready in line:
            return process
        if not line:  # its output ended: it exited
            break
    process.kill()
    raise SystemExit(f"bench: {' '.join(args[:3])} did not start within {within_s:g} s")


def _read_lines(process: subprocess.Popen[str], lines: queue.SimpleQueue[str], ready: str) -> None:
    """Hands `process`'s lines to `lines` until the one that says it is `ready` (or its end, as ""), then reads the
    rest of its output away."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
        if ready in line:
            process.stdout.read()
            return
    lines.put("")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def start_upstream(port: int) -> subprocess.Popen[str]:
    """The loopback fake OpenAI upstream (tests/upstream.py)."""
    listen = f"127.0.0.1:{port}"
    return start([sys.executable, str(ROOT / "tests" / "upstream.py"), "--listen", listen], "upstream listening on")


class Stage(NamedTuple):
    """What a bench mode starts its servers in."""

    scratch: Path
    """A folder for their configurations and ledgers, removed afterwards."""
    ports: dict[str, int]
    """A free port for each server named, and for the upstream."""
    running: contextlib.AsyncExitStack
    """Stops what the mode starts, the upstream last."""
    pids: dict[str, list[int]]
    """Whose CPU to read, by name: the upstream's, and each server's as the mode adds it."""


@contextlib.asynccontextmanager
async def stage(*names: str) -> AsyncIterator[Stage]:
    """The loopback upstream started, and free ports for the servers `names`."""
    ports = {name: free_port() for name in ("upstream", *names)}
    with tempfile.TemporaryDirectory() as scratch:
        async with contextlib.AsyncExitStack() as running:
            upstream = start_upstream(ports["upstream"])
            running.callback(stop, upstream)
            yield Stage(Path(scratch), ports, running, {"upstream": [upstream.pid]})


def start_floor(
    port: int, answers: Path, loop: str, under: Sequence[str] = (), within_s: float = 30, *, joined: bool = False
) -> subprocess.Popen[str]:
    """The floor (bench/floor.py) answering `answers` (`joined`: a stream as the gateway's messages); run by `under`
    when given (valgrind, taskset)."""
    listen = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "bench.floor", "--listen", listen, "--answers", str(answers), "--loop", loop]
    return start([*under, *command, *(["--joined"] if joined else [])], "floor listening on", within_s=within_s)


BENCH_KEY = "llmr-bench-0123456789abcdefghijklmnopq"


@dataclass(frozen=True)
class Feature:
    """A gateway with some features on."""

    description: str
    server: str = ""
    """More fields of the server section."""
    extra: str = ""
    """More YAML sections."""
    metadata: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """More environment."""
    flags: tuple[str, ...] = ()
    """More command-line flags."""


PLAIN = Feature("plain", server="log_calls: false")
_KEYED = (("authorization", f"Bearer {BENCH_KEY}"),)


def _key(limits: str = "") -> str:
    """The auth section with the bench's key; `limits` (a YAML flow mapping), the key's own limits."""
    section = (
        "auth:\n  keys:\n    - name: bench\n"
        f'      sha256: "{hashlib.sha256(BENCH_KEY.encode()).hexdigest()}"\n'
        '      models: ["tiny", "ollama/*"]\n'
    )
    return section + (f"      limits: {limits}\n" if limits else "")


_EVERY_KIND_OF_LIMIT = (
    "{requests_per_minute: 10000000, tokens_per_minute: 1000000000, concurrent_streams: 1000,"
    " budget_usd_per_day: 1000000}"
)
_PRICED = 'pricing:\n  "ollama/*": {prompt: 0.15, completion: 0.6}\n'
"""A price for the bench's model, which a local backend serves for free: its budget reserves and settles each call, as
a paid model's does (a free call passes a budget untouched)."""
_GATEWAY_LIMITS = "limits: {requests_per_minute: 100000000}"
_METRICS = 'metrics_listen: "127.0.0.1:0"'
EVERYTHING = Feature(
    "auth + limits (a key with every kind of limit, and gateway limits) + metrics + a JSON log line per call",
    server=f"{_GATEWAY_LIMITS}, {_METRICS}, log_format: json",
    extra=_key(_EVERY_KIND_OF_LIMIT) + _PRICED,
    metadata=_KEYED,
)
FEATURES = {
    "call-log": Feature("a JSON log line per call", server="log_format: json"),
    "metrics": Feature("metrics, served on /metrics", server=f"log_calls: false, {_METRICS}"),
    "gateway-limits": Feature(
        "the gateway's own limits (requests per minute)", server=f"log_calls: false, {_GATEWAY_LIMITS}"
    ),
    "key": Feature("auth: every call presents a key", server="log_calls: false", extra=_key(), metadata=_KEYED),
    "key-limits": Feature(
        "auth with a key that has every kind of limit (its prompt's tokens counted, its price estimated)",
        server="log_calls: false",
        extra=_key(_EVERY_KIND_OF_LIMIT) + _PRICED,
        metadata=_KEYED,
    ),
}
"""Each of everything's features alone, to tell what each costs over the plain gateway."""
GATEWAYS = {"gateway": PLAIN, "everything": EVERYTHING, **FEATURES}
"""The gateways a bench mode can run, by name."""


async def start_gateway(
    scratch: Path,
    upstream_port: int,
    gateway_port: int,
    name: str = "gateway",
    feature: Feature = PLAIN,
    loop: str | None = None,
    under: Sequence[str] = (),
    within_s: float = 30,
) -> GatewayProcess:
    """`llmrelay-server` in front of the loopback upstream, with no configuration from the environment, run by `under`
    when given (valgrind, taskset); once it serves (all its workers, when it has several)."""
    stem = name.replace("/", "_")  # a revision's server (`gateway@origin/main`) names a file, not a folder
    config = scratch / f"{stem}.yaml"
    server = "".join(f", {more}" for more in (feature.server, f"event_loop: {loop}" if loop else "") if more)
    config.write_text(
        f'server: {{usage_db: "{scratch}/{stem}.db"{server}}}\n'
        f'llm:\n  ollama: {{base_url: "http://127.0.0.1:{upstream_port}/v1", model: {MODEL}}}\n{feature.extra}'
    )
    env = clean_env(**dict(feature.env))
    gateway = await spawn_gateway(config, *feature.flags, port=gateway_port, env=env, under=under)
    await gateway.wait_listening(within_s)
    if "--workers" in feature.flags and feature.flags[feature.flags.index("--workers") + 1] != "1":
        await gateway.wait_for_line("workers)")  # a supervisor says so once all its workers serve
    return gateway


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (a supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(descendant for child in children for descendant in process_tree(int(child)))]


@dataclass(frozen=True)
class Revision:
    """Another revision's gateway, checked out apart (`checked_out`)."""

    name: str
    tree: Path

    def server(self, name: str) -> str:
        """What this revision's server `name` ("gateway", "everything") is called beside this tree's."""
        return f"{name}@{self.name}"

    def runs(self, feature: Feature) -> Feature:
        """`feature`, run from this revision's server and client packages rather than the installed ones (the
        environment's PYTHONPATH comes before the editable install's finder)."""
        path = os.pathsep.join(str(self.tree / package) for package in ("server", "client/python"))
        return dataclasses.replace(feature, env=(*feature.env, ("PYTHONPATH", path)))


@contextlib.contextmanager
def checked_out(revision: str) -> Iterator[Revision]:
    """`revision` in a git worktree of its own, removed afterwards; its server must import from there."""
    tree = Path(tempfile.mkdtemp(prefix="llmrelay-bench-"))
    add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), revision]
    if subprocess.run(add, capture_output=True, text=True).returncode != 0:
        shutil.rmtree(tree, ignore_errors=True)
        raise SystemExit(f"bench --against: {revision!r} is no revision of this repository")
    try:
        checked = Revision(revision, tree)
        probe = [sys.executable, "-c", "import llmrelay_server; print(llmrelay_server.__file__)"]
        imported = subprocess.run(probe, env=clean_env(**dict(checked.runs(PLAIN).env)), capture_output=True, text=True)
        if not imported.stdout.startswith(str(tree)):
            raise SystemExit(f"bench --against: its server imports from {imported.stdout.strip()}, not {tree}")
        yield checked
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


async def start_servers(
    staged: Stage,
    loop: str,
    under: Sequence[str] = (),
    against: Revision | None = None,
    gateways: Sequence[str] = ("gateway", "everything"),
) -> dict[str, grpc.aio.Channel]:
    """The servers compared, on their staged ports, run by `under` when given (taskset): the `gateways` named (of
    GATEWAYS; and the same of `against`), then the floor answering with the plain gateway's own messages (and, where
    a port is staged for JOINED_FLOOR, the floor sending a stream as the gateway's very messages); a channel to each,
    closed on leaving."""
    scratch, ports, running, pids = staged
    channels = {}
    started = [(name, GATEWAYS[name]) for name in gateways]
    if against is not None:
        started += [(against.server(name), against.runs(feature)) for name, feature in started]
    for name, feature in started:
        gateway = await start_gateway(scratch, ports["upstream"], ports[name], name, feature, loop, under)
        running.push_async_callback(gateway.stop)
        pids[name] = [gateway.process.pid]
        channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}")
        running.push_async_callback(channels[name].close)
    answers = await recorded_answers(pb.LLMServiceStub(channels["gateway"]), scratch)
    for name in ("floor", JOINED_FLOOR):
        if name not in ports:
            continue
        floor = start_floor(ports[name], answers, loop, under, joined=name == JOINED_FLOOR)
        running.callback(stop, floor)
        pids[name] = [floor.pid]
        channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}")
        running.push_async_callback(channels[name].close)
    return channels


# --- --workers ------------------------------------------------------------------------------------------------

WORKER_COUNTS = (1, 2)


def print_header() -> None:
    print(f"{'path':<18}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'gateway CPU/req':>18}{'upstream CPU/req':>18}")


def print_row(name: str, run: Run, gateway: str | None) -> None:
    """One path's figures; `gateway` is the server whose CPU the path costs (None: no gateway's)."""
    gateway_cpu = f"{run.cpu_ms(gateway):>15.3f} ms" if gateway else f"{'-':>18}"
    print(
        f"{name:<18}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}{run.throughput:>9.0f}{gateway_cpu}"
        f"{run.cpu_ms('upstream'):>15.3f} ms",
        flush=True,
    )


async def scale(requests: int, concurrency: int, rounds: int, out: Path = RESULTS) -> None:
    """`--workers`: calls/s of one gateway with 1 and then 2 worker processes, on as many connections as workers
    times four (the kernel spreads connections, not calls), against the same upstream, taking turns in rounds."""
    names = {workers: f"{workers} worker{'s' if workers > 1 else ''}" for workers in WORKER_COUNTS}
    async with stage(*names.values()) as (scratch, ports, running, pids):
        for workers, name in names.items():
            feature = Feature(name, server="log_calls: false", flags=("--workers", str(workers)))
            gateway = await start_gateway(scratch, ports["upstream"], ports[name], name.replace(" ", "-"), feature)
            running.push_async_callback(gateway.stop)
            pids[name] = process_tree(gateway.process.pid)
        await asyncio.sleep(1.0)
        print(f"llmrelay bench --workers: {requests} unary calls, concurrency {concurrency}, on {os.cpu_count()} CPUs")
        print("(the bench client and the upstream share those CPUs with the gateway)\n")
        print_header()
        runs: dict[str, list[Run]] = {name: [] for name in names.values()}
        channels: list[grpc.aio.Channel] = []
        calls: dict[str, Call] = {}
        for workers, name in names.items():
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own for each channel
            own = [grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}", options=options) for _ in range(4 * workers)]
            channels += own
            calls[name] = _round_robin([grpc_calls(pb.LLMServiceStub(channel))["unary"] for channel in own])
        for round_, turn in enumerate(turns(list(names.values()), rounds)):
            for name in turn:
                runs[name].append(await measure(calls[name], requests // rounds, concurrency, pids, round_ == 0))
        totals = {name: functools.reduce(operator.add, runs[name]) for name in names.values()}
        for name, run in totals.items():
            print_row(name, run, name)
        one, two = (totals[names[workers]] for workers in WORKER_COUNTS)
        print(f"\n2 workers / 1 worker: calls/s x{two.throughput / one.throughput:.2f}")
        for channel in channels:
            await channel.close()
    rows = [
        {
            "workers": workers,
            "calls_per_s": totals[name].throughput,
            "gateway_cpu_ms_per_call": totals[name].cpu_ms(name),
        }
        for workers, name in names.items()
    ]
    settings = {"requests": requests, "rounds": rounds, "concurrency": concurrency}
    print(f"written: {save_figures('workers', settings, rows, out)}")


def _round_robin(calls: Sequence[Call]) -> Call:
    turns = itertools.cycle(calls)
    return lambda: next(turns)()


# --- --one-core -----------------------------------------------------------------------------------------------

ONE_CORE_CALLERS = 16
LOAD = "load generator"


async def one_core(
    requests: int, rounds: int, loop: str, against: str | None = None, features: bool = False, out: Path = RESULTS
) -> None:
    """`--one-core`: unary calls/s from 16 callers to the floor, the plain gateway and everything on, each server held
    to one CPU (taskset) while this load generator and the upstream run on the others: issue 17's calls/s on one
    core, measured rather than derived from CPU per call. A server not near 100% busy was waiting for the load
    generator, and its figure is only a lower bound.

    With `features`, also a gateway with each of everything's features alone (FEATURES), taking turns with the rest:
    what each costs in CPU time a call over the plain gateway. With `against` (a git revision), the same gateways of
    that revision too, taking turns with this tree's: what a change did to CPU per call, which separate runs on a
    shared machine cannot tell apart from noise below about 10%."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        raise SystemExit("bench --one-core: needs two CPUs and taskset (util-linux)")
    server_cpu = cpus[-1]
    os.sched_setaffinity(0, cpus[:-1])  # before any thread or child starts: the load generator and the upstream
    held = ("taskset", "-c", str(server_cpu))
    with contextlib.ExitStack() as checkouts:
        revision = checkouts.enter_context(checked_out(against)) if against is not None else None
        compared = ["gateway", "everything", *(FEATURES if features else ())]
        theirs = {revision.server(name): name for name in compared} if revision is not None else {}
        names = ["floor", *compared, *theirs]
        async with stage(*names) as staged:
            channels = await start_servers(staged, loop, held, revision, compared)
            calls = {
                name: grpc_calls(pb.LLMServiceStub(channels[name]), GATEWAYS[theirs.get(name, name)].metadata)
                for name in compared + list(theirs)
            }
            calls["floor"] = grpc_calls(pb.LLMServiceStub(channels["floor"]))
            print(
                f"llmrelay bench --one-core: {requests} unary calls from {ONE_CORE_CALLERS} callers to each server,"
                f" held to CPU {server_cpu}; the load generator and the upstream on CPUs {cpus[:-1]}; {loop} loop\n"
            )
            runs: dict[str, list[Run]] = {name: [] for name in names}
            # The load side's CPU too: this process and the upstream, on the CPUs the servers are kept off.
            pids = {**staged.pids, LOAD: [os.getpid()]}
            for round_, turn in enumerate(turns(names, rounds)):
                for name in turn:
                    run = await measure(calls[name]["unary"], requests // rounds, ONE_CORE_CALLERS, pids, round_ == 0)
                    runs[name].append(run)
    width = max(map(len, names)) + 2
    print(f"{'server':<{width}}{'calls/s':>9}{'CPU/call':>12}{'CPU busy':>10}{'load CPUs busy':>16}")
    totals = {name: functools.reduce(operator.add, runs[name]) for name in names}
    cpu_ms = {name: run.cpu_ms(name) for name, run in totals.items()}
    rows = []
    for name, run in totals.items():
        busy = run.cpu_s[name] / run.wall_s
        load = (run.cpu_s[LOAD] + run.cpu_s["upstream"]) / run.wall_s / (len(cpus) - 1)
        print(f"{name:<{width}}{run.throughput:>9.0f}{cpu_ms[name]:>9.3f} ms{busy:>9.0%}{load:>15.0%}", flush=True)
        figures = {"calls_per_s": run.throughput, "cpu_ms_per_call": cpu_ms[name], "cpu_busy": busy}
        rows.append({"server": name, **figures, "load_cpus_busy": load})
    print(
        "\n(a server well below 100% busy while the load CPUs are near it was waiting for its callers: its calls/s is"
        " a lower bound)"
    )
    if features:
        print("\nCPU a call over the plain gateway's:")
        for name in ("everything", *FEATURES):
            more = cpu_ms[name] - cpu_ms["gateway"]
            print(f"  {name:<16}{more:+.3f} ms ({more / cpu_ms['gateway']:+.0%})  {GATEWAYS[name].description}")
    for name, ours in theirs.items():
        print(f"{ours}: CPU per call {cpu_ms[ours] / cpu_ms[name] - 1:+.1%} against {against}")
    settings = {"requests": requests, "rounds": rounds, "callers": ONE_CORE_CALLERS, "loop": loop, "against": against}
    print(f"\nwritten: {save_figures('one-core', settings, rows, out)}")


# --- the paths compared ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    requests: int
    """Calls per path, kind and concurrency, over all rounds."""
    rounds: int
    long_streams: int
    """1,000-chunk streams per path, over all rounds."""
    open_streams: int
    loop: str


@dataclass
class Row:
    """One path's figures for one kind of call at one concurrency."""

    path: str
    kind: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    calls_per_s: float
    server_cpu_ms_per_call: float
    load_generator_cpu_ms_per_call: float
    """The load generator's CPU a call on this path: its HTTP client's for the direct call, its gRPC client's else."""
    cpu_x_floor: float
    cpu_x_joined_floor: float | None
    """Of a stream: the server CPU per call over the floor's that sends the gateway's very messages (JOINED_FLOOR)."""
    first_chunk_p50_ms: float
    added_first_chunk_ms: float


@dataclass
class Results:
    settings: Settings
    started_at: str
    command: str
    machine: dict[str, Any]
    revision: str
    """The commit measured (`git rev-parse HEAD`), "+changes" after it when the tree had uncommitted ones."""
    rows: list[Row] = field(default_factory=list)
    long_stream: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    """By gateway (GATEWAYS_MEASURED)."""
    upstream_pool: dict[str, dict[str, int]] = field(default_factory=dict)
    """By gateway (GATEWAYS_MEASURED)."""


async def compare(settings: Settings, results: Results) -> None:
    async with stage("floor", JOINED_FLOOR, "gateway", "everything") as staged:
        channels = await start_servers(staged, settings.loop)
        # The load generator's CPU too (this process): what each path's client costs it.
        ports, pids = staged.ports, {**staged.pids, LOAD: [os.getpid()]}
        direct = DirectClient("127.0.0.1", ports["upstream"], MODEL)
        # The messages of the plain gateway's latest streams of each kind, which the joined floor's match: taken at
        # the same concurrency (the gateway's turn comes first in a round's first turns, its warm-up's too).
        sent = {kind: collections.deque[int](maxlen=MESSAGES_MATCHED) for kind in ("stream", "long")}
        paths = {
            "direct": direct_calls(direct),
            "floor": grpc_calls(pb.LLMServiceStub(channels["floor"])),
            "gateway": grpc_calls(pb.LLMServiceStub(channels["gateway"]), sent=sent),
            "everything": grpc_calls(pb.LLMServiceStub(channels["everything"]), EVERYTHING.metadata),
            JOINED_FLOOR: {
                kind: call
                for kind, call in grpc_calls(pb.LLMServiceStub(channels[JOINED_FLOOR]), matching=sent).items()
                if kind != "unary"
            },
        }
        # Whose CPU each path costs: the direct call's is the upstream's alone.
        server_of = {path: path for path in paths} | {"direct": "upstream"}
        await asyncio.sleep(0.5)
        rss_idle = {name: rss_mib(pids[name][0]) for name in GATEWAYS_MEASURED}
        print(
            f"llmrelay bench: {settings.requests} calls per path, kind and concurrency in {settings.rounds} rounds;"
            f" {settings.loop} event loop; {os.cpu_count()} CPUs shared by the load generator, the upstream and the"
            " servers\n",
            flush=True,
        )
        await matrix(settings, paths, pids, server_of, results)
        await long_streams(settings, paths, pids, server_of, results)
        await direct.aclose()
        for name in GATEWAYS_MEASURED:
            await open_streams(
                settings, name, channels[name], pids[name][0], ports["upstream"], rss_idle[name], results
            )


async def matrix(
    settings: Settings,
    paths: Mapping[str, Mapping[str, Call]],
    pids: Mapping[str, Sequence[int]],
    server_of: Mapping[str, str],
    results: Results,
) -> None:
    """Every path, unary and stream, one caller and 16, taking turns a slice of the calls at a time."""
    for kind, concurrency in itertools.product(KINDS, CONCURRENCIES):
        count = settings.requests // settings.rounds
        rounds = await interleaved(paths, kind, count, concurrency, settings.rounds, pids, warm_up=True)
        runs = {path: functools.reduce(operator.add, taken) for path, taken in rounds.items()}
        direct, floor_cpu = runs["direct"], runs["floor"].cpu_ms("floor")
        joined_cpu = runs[JOINED_FLOOR].cpu_ms(JOINED_FLOOR) if JOINED_FLOOR in runs else None
        for path, run in runs.items():
            cpu = run.cpu_ms(server_of[path])
            results.rows.append(
                Row(
                    path=path,
                    kind=kind,
                    concurrency=concurrency,
                    p50_ms=run.p50_ms,
                    p99_ms=run.p99_ms,
                    added_p50_ms=run.p50_ms - direct.p50_ms,
                    added_p99_ms=added_p99_ms(rounds[path], rounds["direct"]),
                    calls_per_s=run.throughput,
                    server_cpu_ms_per_call=cpu,
                    load_generator_cpu_ms_per_call=run.cpu_ms(LOAD),
                    cpu_x_floor=cpu / floor_cpu,
                    cpu_x_joined_floor=cpu / joined_cpu if joined_cpu is not None else None,
                    first_chunk_p50_ms=run.first_chunk_p50_ms,
                    added_first_chunk_ms=run.first_chunk_p50_ms - direct.first_chunk_p50_ms,
                )
            )
            print_path_row(results.rows[-1])


async def interleaved(
    paths: Mapping[str, Mapping[str, Call]],
    kind: str,
    count: int,
    concurrency: int,
    rounds: int,
    pids: Mapping[str, Sequence[int]],
    *,
    warm_up: bool,
) -> dict[str, list[Run]]:
    """`count` calls of `kind` on every path that makes such calls in turn, `rounds` times (the machine's drift falls on
    all paths alike), in the order `turns` gives: each path's rounds; with `warm_up`, a warm-up of each path before
    the first round."""
    order = [path for path, calls in paths.items() if kind in calls]
    taken: dict[str, list[Run]] = {path: [] for path in order}
    for round_, turn in enumerate(turns(order, rounds)):
        for path in turn:
            taken[path].append(await measure(paths[path][kind], count, concurrency, pids, warm_up and round_ == 0))
    return taken


def turns(order: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order the paths (or servers) take their turns in, round by round: the first round in `order` (the
    warm-ups run in it: the joined floor's after the plain gateway's, whose streams it matches), then a shuffle of it
    each round, of a fixed seed (runs compare). Rotating one order, each path's turn came after the same other's
    nearly every round, and the work a server defers past its turn (a ledger's flush, a batch of log lines) fell on
    that one's."""
    shuffled = random.Random(17)
    yield list(order)
    for _ in range(rounds - 1):
        yield shuffled.sample(list(order), len(order))


def added_p99_ms(rounds: Sequence[Run], direct: Sequence[Run]) -> float:
    """The p99 above the direct call's, as the median over the rounds of each round's difference: a p99 rests on a
    handful of calls, and one slow moment of the machine in one path's turn would otherwise set it (the difference of
    the whole run's p99s came out below zero)."""
    return statistics.median(run.p99_ms - theirs.p99_ms for run, theirs in zip(rounds, direct, strict=True))


async def long_streams(
    settings: Settings,
    paths: Mapping[str, Mapping[str, Call]],
    pids: Mapping[str, Sequence[int]],
    server_of: Mapping[str, str],
    results: Results,
) -> None:
    """Streams of 1,000 chunks, one at a time: chunks/s, and chunks per second of the server's CPU (per core)."""
    chunks = len(LONG_PROMPT.split()) + 1
    count = max(1, settings.long_streams // settings.rounds)
    rounds = await interleaved(paths, "long", count, 1, settings.rounds, pids, warm_up=True)
    runs = {path: functools.reduce(operator.add, taken) for path, taken in rounds.items()}
    print(
        f"\n{'1,000-chunk stream':<22}{'chunks/s':>10}{'chunks per server CPU s':>26}{'x floor':>9}"
        f"{'x joined floor':>16}"
    )
    for path, run in runs.items():
        total = chunks * len(run.latencies_s)
        per_cpu_s = total / max(run.cpu_s[server_of[path]], 1e-9)
        results.long_stream[path] = {"chunks_per_s": total / run.wall_s, "chunks_per_server_cpu_s": per_cpu_s}
    floor = results.long_stream["floor"]["chunks_per_server_cpu_s"]
    joined = results.long_stream[JOINED_FLOOR]["chunks_per_server_cpu_s"]
    for path, figures in results.long_stream.items():
        figures["cpu_x_floor"] = figures["chunks_per_server_cpu_s"] / floor
        figures["cpu_x_joined_floor"] = figures["chunks_per_server_cpu_s"] / joined
        print(
            f"{path:<22}{figures['chunks_per_s']:>10.0f}{figures['chunks_per_server_cpu_s']:>26.0f}"
            f"{figures['cpu_x_floor']:>9.2f}{figures['cpu_x_joined_floor']:>16.2f}"
        )


GATEWAYS_MEASURED = ("gateway", "everything")
"""The gateways whose memory with streams open, and upstream pool after them, the bench measures: features off, on."""


async def open_streams(
    settings: Settings,
    name: str,
    channel: grpc.aio.Channel,
    gateway_pid: int,
    upstream_port: int,
    rss_idle: float,
    results: Results,
) -> None:
    """A burst of streams held open at once: gateway `name`'s memory with all of them open, and the upstream
    connections it keeps idle once they are over (the pool keeps at most its configured number)."""
    async with DirectControl(upstream_port) as control:
        await control.queue_faults([{"trickle_s": HOLD_TRICKLE_S}] * settings.open_streams)
    stub = pb.LLMServiceStub(channel)
    request = pb.StreamCompleteRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content=HOLD_PROMPT)])
    opened = 0
    all_open = asyncio.Event()

    async def held() -> None:
        nonlocal opened
        first = True
        async for _ in stub.StreamComplete(request, timeout=60, metadata=GATEWAYS[name].metadata):
            if first:
                first = False
                opened += 1
                if opened == settings.open_streams:
                    all_open.set()

    rss_before = rss_mib(gateway_pid)
    streams = asyncio.gather(*(held() for _ in range(settings.open_streams)))
    with contextlib.suppress(TimeoutError):
        # Waited for as long as the first streams are sure to stay open (two trickles), less a second: one trickle
        # was too short on a busy machine, and the memory was read with 955 of the 1,000 open.
        await asyncio.wait_for(all_open.wait(), timeout=2 * HOLD_TRICKLE_S - 1.0)
    rss_open, open_at_reading = rss_mib(gateway_pid), opened
    await streams
    # Each connection goes back to the pool as its body ends, right after the answer's last event: a moment for the
    # last of them, then the pool is what it keeps.
    await asyncio.sleep(0.5)
    idle = established_to(gateway_pid, upstream_port)
    results.memory[name] = {
        "rss_idle_mib": rss_idle,
        "rss_before_burst_mib": rss_before,
        "rss_open_mib": rss_open,
        "open_streams": open_at_reading,
        # Above what it held just before (after the matrix of calls), not above the idle gateway at the start.
        "above_before_burst_mib": rss_open - rss_before,
    }
    results.upstream_pool[name] = {"streams": settings.open_streams, "idle_connections_after": idle}
    print(
        f"\n{name} memory: {rss_idle:.0f} MiB idle, {rss_before:.0f} MiB before the burst, {rss_open:.0f} MiB with"
        f" {open_at_reading} streams open (+{rss_open - rss_before:.0f} MiB); {idle} idle upstream connections after"
        " the burst"
        + (
            f" (NOT all {settings.open_streams} streams were open when the memory was read)"
            if open_at_reading < settings.open_streams
            else ""
        )
    )


class DirectControl:
    """The loopback upstream's control API (faults), over one HTTP connection."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __aenter__(self) -> DirectControl:
        self._connection = await asyncio.open_connection("127.0.0.1", self._port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        self._connection[1].close()

    async def queue_faults(self, faults: list[dict[str, Any]]) -> None:
        assert self._connection is not None
        reader, writer = self._connection
        body = json.dumps(faults).encode()
        writer.write(
            f"POST /_control/faults HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)


def print_path_row(row: Row) -> None:
    if row.path == "direct":
        print(
            f"\n{row.kind} x{row.concurrency}: {'path':<12}{'p50 ms':>8}{'p99 ms':>8}{'+p50':>8}{'+p99':>8}"
            f"{'calls/s':>9}{'CPU ms/call':>13}{'x floor':>9}{'+1st chunk':>12}"
        )
    print(
        f"{'':<{len(row.kind) + 5}}{row.path:<12}{row.p50_ms:>8.2f}{row.p99_ms:>8.2f}{row.added_p50_ms:>8.2f}"
        f"{row.added_p99_ms:>8.2f}{row.calls_per_s:>9.0f}{row.server_cpu_ms_per_call:>13.3f}{row.cpu_x_floor:>9.2f}"
        f"{row.added_first_chunk_ms:>12.2f}",
        flush=True,
    )


def markdown(results: Results) -> str:
    """The README's table: per path, kind and concurrency; then the long stream, memory and the pool."""
    lines = [
        "| path | call | callers | added p50 ms | added p99 ms | calls/s | server CPU/call | x floor"
        " | x joined floor | added 1st chunk ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results.rows:
        if row.path == "direct":
            added = f"({row.p50_ms:.2f} ms) | ({row.p99_ms:.2f} ms)"
        else:
            added = f"{row.added_p50_ms:+.2f} | {row.added_p99_ms:+.2f}"
        first = f"{row.added_first_chunk_ms:+.2f}" if row.kind == "stream" and row.path != "direct" else "-"
        joined = f"{row.cpu_x_joined_floor:.2f}" if row.cpu_x_joined_floor is not None else "-"
        lines.append(
            f"| {row.path} | {row.kind} | {row.concurrency} | {added} | {row.calls_per_s:.0f} |"
            f" {row.server_cpu_ms_per_call:.3f} ms | {row.cpu_x_floor:.2f} | {joined} | {first} |"
        )
    lines += [
        "",
        "| 1,000-chunk stream | chunks/s | chunks per server CPU s | x floor | x joined floor |",
        "|---|---|---|---|---|",
    ]
    for path, figures in results.long_stream.items():
        lines.append(
            f"| {path} | {figures['chunks_per_s']:.0f} | {figures['chunks_per_server_cpu_s']:.0f} |"
            f" {figures['cpu_x_floor']:.2f} | {figures['cpu_x_joined_floor']:.2f} |"
        )
    lines += [
        "",
        "| 1,000 streams open | memory above before them | memory before | idle upstream connections after |",
        "|---|---|---|---|",
    ]
    for path, memory in results.memory.items():
        idle = results.upstream_pool[path]["idle_connections_after"]
        lines.append(
            f"| {path} ({memory['open_streams']:.0f} open) | {memory['above_before_burst_mib']:+.0f} MiB |"
            f" {memory['rss_before_burst_mib']:.0f} MiB | {idle} |"
        )
    return "\n".join(lines)


def save_figures(mode: str, settings: dict[str, Any], rows: list[dict[str, Any]], out: Path = RESULTS) -> Path:
    """A mode's figures (`--one-core`, `--workers`), to <out>/<mode>-<time>.json: with the command, the machine and
    the commit measured, as make bench's own results have them."""
    out.mkdir(parents=True, exist_ok=True)
    started_at = now()
    figures = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started_at": started_at,
        "machine": machine(),
        "revision": revision(),
        "settings": settings,
        "rows": rows,
    }
    path = out / f"{mode}-{stamp(started_at)}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


def now() -> str:
    """The time a run starts, as its results say it (UTC, to the second)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(started_at: str) -> str:
    """A run's start as its results' file names have it: 20261202T093256Z."""
    return started_at.replace(":", "").replace("-", "")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def save(results: Results, out: Path = RESULTS) -> Path:
    """<out>/<time>.json and .png, copied to latest.json and latest.png (in bench/results, the ones committed)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp(results.started_at)}.json"
    path.write_text(json.dumps(asdict(results), indent=2) + "\n")
    from bench.chart import draw

    chart = draw(results.rows, path.with_suffix(".png"))
    shutil.copyfile(path, out / "latest.json")
    shutil.copyfile(chart, out / "latest.png")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls and streams: about a minute, rougher")
    parser.add_argument("--requests", type=int, help="calls per path, kind and concurrency (default 1000; quick 300)")
    parser.add_argument("--rounds", type=int, help="turns the paths take (default 5; quick 3)")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), help="the servers' event loop (default: the gateway's)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where the results go (default bench/results, whose latest.json and latest.png are the committed ones)",
    )
    parser.add_argument("--workers", action="store_true", help="calls/s with 1 and 2 worker processes instead")
    parser.add_argument(
        "--one-core", action="store_true", help="calls/s of each server held to one CPU instead (16 callers)"
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="with --one-core: also a gateway with each feature of everything alone, and what each adds",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="with --one-core: also the gateways of git revision REV, taking turns with this tree's",
    )
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    requests = args.requests or (300 if args.quick else 1000)
    if rounds < 1 or requests < rounds:
        parser.error(f"--requests ({requests}) are shared among the rounds ({rounds}): at least one call each")
    requests -= requests % rounds  # as many calls in each round: the figures count the calls made
    if args.workers and (args.one_core or args.against or args.features or args.loop):
        parser.error(
            "--workers measures calls/s of 1 and 2 workers on its own: without --one-core, --against,"
            " --features or --loop"
        )
    if args.workers:
        asyncio.run(scale(requests, 64, rounds, args.out))
        return
    if (args.against or args.features) and not args.one_core:
        parser.error("--against and --features compare CPU per call on one core: use them with --one-core")
    if args.one_core:
        asyncio.run(one_core(requests, rounds, args.loop or default_loop(), args.against, args.features, args.out))
        return
    settings = Settings(
        requests=requests,
        rounds=rounds,
        long_streams=rounds * (1 if args.quick else 3),
        open_streams=OPEN_STREAMS,
        loop=args.loop or default_loop(),
    )
    results = Results(
        settings=settings,
        started_at=now(),
        command=" ".join(["python -m bench", *sys.argv[1:]]),
        machine=machine(),
        revision=revision(),
    )
    asyncio.run(compare(settings, results))
    print("\n" + markdown(results))
    print(f"\nwritten: {save(results, args.out)} (and latest.json, latest.png beside it)\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tokens.py")], check=True)  # token counting's cost


def revision() -> str:
    """The commit of the tree measured, marked when a file git tracks differs from it (the bench's own results
    aside): the gateway's, and the bench's, the upstream's and the harness's (tests), the stubs' and the load
    generator's (client), the dependencies' (pyproject.toml); "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def default_loop() -> str:
    """The gateway's default event loop: uvloop where it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


if __name__ == "__main__":
    main()
