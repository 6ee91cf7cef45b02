"""`make bench`: the gateway's cost measured against the direct call to the same upstream, in the same run.

The loopback upstream and the gateway each run in their own process, so the gateway's CPU time is read from its own
/proc entry. Figures are ratios to the direct call (these machines are noisy), plus the gateway's CPU per request.
Gateways with features on (keys and limits; the call log; metrics; traces) run beside the plain one (no call log),
the paths taking turns in rounds; a feature's cost is its extra gateway CPU per call, the median over the rounds.

Usage: python -m bench [--requests N] [--concurrency C] [--workers]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import itertools
import operator
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
from llmrelay import v1 as pb
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_S = 15
ROUNDS = 5
KINDS = ("unary", "stream")
PROMPT = "benchmark the gateway please"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]

Call = Callable[[], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Run:
    latencies_s: list[float]
    wall_s: float
    cpu_s: dict[str, float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p99_ms(self) -> float:
        return statistics.quantiles(self.latencies_s, n=100)[98] * 1000

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def cpu_ms(self, server: str) -> float:
        """The server's CPU time per request, in milliseconds."""
        return self.cpu_s[server] / len(self.latencies_s) * 1000

    def __add__(self, other: Run) -> Run:
        cpu = {name: self.cpu_s[name] + other.cpu_s[name] for name in self.cpu_s}
        return Run(self.latencies_s + other.latencies_s, self.wall_s + other.wall_s, cpu)


async def measure(
    call: Call, requests: int, concurrency: int, pids: Mapping[str, Sequence[int]], warm_up: bool = False
) -> Run:
    """Times `requests` calls, `concurrency` at a time; each server's CPU is summed over its processes `pids`."""
    for _ in range(50 if warm_up else 0):  # connections, caches, first-call imports
        await call()
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def timed() -> None:
        async with semaphore:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    def cpu() -> dict[str, float]:
        return {name: sum(map(cpu_seconds, processes)) for name, processes in pids.items()}

    cpu_before = cpu()
    started = time.perf_counter()
    await asyncio.gather(*(timed() for _ in range(requests)))
    wall = time.perf_counter() - started
    cpu_after = cpu()
    return Run(latencies, wall, {name: cpu_after[name] - cpu_before[name] for name in pids})


def sdk_calls(client: openai.AsyncOpenAI) -> dict[str, Call]:
    """A unary and a streaming chat completion through the openai SDK, each checking that an answer came."""

    async def unary() -> None:
        answer = await client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert answer.choices[0].message.content, answer

    async def stream() -> None:
        chunks = 0
        async for _ in await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True):
            chunks += 1
        assert chunks > 1, chunks

    return {"unary": unary, "stream": stream}


def gateway_calls(stub: pb.LLMServiceAsyncStub, metadata: Sequence[tuple[str, str]] = ()) -> dict[str, Call]:
    """The same chat, unary and streaming, through llmrelay's gRPC contract."""
    request = pb.CompleteRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content=PROMPT)])
    stream_request = pb.StreamCompleteRequest(model=request.model, messages=request.messages)

    async def unary() -> None:
        await stub.Complete(request, timeout=10, metadata=metadata)

    async def stream() -> None:
        async for _ in stub.StreamComplete(stream_request, timeout=10, metadata=metadata):
            pass

    return {"unary": unary, "stream": stream}


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


def start(args: list[str], ready: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if ready in line:
            # Read on, or a process that logs every call would block once the pipe is full.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit(f"bench: {args[0]} did not start")


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


BENCH_KEY = "llmr-bench-0123456789abcdefghijklmnopq"


@dataclass(frozen=True)
class Feature:
    """A gateway with some features on, measured against the plain one in the same run."""

    description: str
    server: str = ""
    """More fields of the server section."""
    extra: str = ""
    """More YAML sections."""
    metadata: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """More environment: where traces go."""
    flags: tuple[str, ...] = ()
    """More command-line flags."""


PLAIN = Feature("plain", server="log_calls: false")
OBSERVED = 'metrics_listen: "127.0.0.1:0", log_format: json'
OTLP_PORT = free_port()
FEATURES = {
    "keyed": Feature(
        "auth + limits (a key with every kind of limit, and gateway limits)",
        server="limits: {requests_per_minute: 100000000}",
        extra=f"""auth:
  keys:
    - name: bench
      sha256: "{hashlib.sha256(BENCH_KEY.encode()).hexdigest()}"
      models: ["tiny", "ollama/*"]
      limits: {{requests_per_minute: 10000000, tokens_per_minute: 1000000000, concurrent_streams: 1000,
               budget_usd_per_day: 1000000}}
""",
        metadata=(("authorization", f"Bearer {BENCH_KEY}"),),
    ),
    "logged": Feature("a text log line per call (the default)", server="log_calls: true"),
    "observed": Feature("metrics + a JSON log line per call", server=OBSERVED),
    "traced": Feature(
        "metrics + a JSON log line + a trace per call (OTLP/gRPC to a receiver in the bench)",
        server=f"{OBSERVED}, tracing: true",
        env=(("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{OTLP_PORT}"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")),
    ),
}


class _TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that takes the traced gateway's spans and drops them."""

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        return trace_service_pb2.ExportTraceServiceResponse()


def start_trace_sink() -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceSink(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{OTLP_PORT}")
    server.start()
    return server


def start_gateway(
    scratch: Path, upstream_port: int, gateway_port: int, name: str = "gateway", feature: Feature = PLAIN
) -> subprocess.Popen[str]:
    """`llmrelay-server` in front of the loopback upstream, with no configuration from the environment."""
    config = scratch / f"{name}.yaml"
    server = f", {feature.server}" if feature.server else ""
    config.write_text(
        f'server: {{usage_db: "{scratch}/{name}.db"{server}}}\n'
        f'llm:\n  ollama: {{base_url: "http://127.0.0.1:{upstream_port}/v1", model: tiny}}\n{feature.extra}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "LLMRELAY_", "OTEL_"))}
    env.update(feature.env)
    command = [str(BIN / "llmrelay-server"), "--listen", f"127.0.0.1:{gateway_port}", "--config", str(config)]
    several = "--workers" in feature.flags and feature.flags[feature.flags.index("--workers") + 1] != "1"
    ready = "workers)" if several else "listening on"  # a supervisor says so once all its workers serve
    return start([*command, *feature.flags], ready, env)


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (a supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(descendant for child in children for descendant in process_tree(int(child)))]


WORKER_COUNTS = (1, 2)


async def scale(requests: int, concurrency: int) -> None:
    """`--workers`: calls/s of one gateway with 1 and then 2 worker processes, on as many connections as workers
    times four (the kernel spreads connections, not calls), against the same upstream, taking turns in rounds."""
    names = {workers: f"{workers} worker{'s' if workers > 1 else ''}" for workers in WORKER_COUNTS}
    ports = {name: free_port() for name in ("upstream", *names.values())}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as running:
        upstream = start_upstream(ports["upstream"])
        running.callback(stop, upstream)
        pids = {"upstream": [upstream.pid]}
        for workers, name in names.items():
            feature = Feature(name, server="log_calls: false", flags=("--workers", str(workers)))
            gateway = start_gateway(Path(scratch), ports["upstream"], ports[name], name.replace(" ", "-"), feature)
            running.callback(stop, gateway)
            pids[name] = process_tree(gateway.pid)
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
            calls[name] = _round_robin([gateway_calls(pb.LLMServiceStub(channel))["unary"] for channel in own])
        for round_ in range(ROUNDS):
            for name in names.values():
                runs[name].append(
                    await measure(calls[name], requests // ROUNDS, concurrency, pids, warm_up=round_ == 0)
                )
        for name in names.values():
            print_row(name, functools.reduce(operator.add, runs[name]), name)
        one, two = (functools.reduce(operator.add, runs[names[workers]]) for workers in WORKER_COUNTS)
        print(f"\n2 workers / 1 worker: calls/s x{two.throughput / one.throughput:.2f}")
        for channel in channels:
            await channel.close()


def _round_robin(calls: Sequence[Call]) -> Call:
    turns = itertools.cycle(calls)
    return lambda: next(turns)()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", action="store_true", help="calls/s with 1 and 2 worker processes instead")
    args = parser.parse_args()
    if args.workers:
        await scale(args.requests, max(args.concurrency, 64))
        return

    ports = {name: free_port() for name in ("upstream", "gateway", *FEATURES)}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as running:
        upstream = start_upstream(ports["upstream"])
        running.callback(stop, upstream)
        pids = {"upstream": upstream.pid}
        sink = start_trace_sink()
        running.callback(sink.stop, None)
        for name, feature in {"gateway": PLAIN, **FEATURES}.items():
            gateway = start_gateway(Path(scratch), ports["upstream"], ports[name], name, feature)
            running.callback(stop, gateway)
            pids[name] = gateway.pid
        await asyncio.sleep(1.0)
        await report(pids, ports, args.requests, args.concurrency)


async def report(pids_by_name: Mapping[str, int], ports: Mapping[str, int], requests: int, concurrency: int) -> None:
    direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports['upstream']}/v1", api_key="bench", max_retries=0)
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}") for name in ("gateway", *FEATURES)}
    paths = {"direct": sdk_calls(direct), "gateway": gateway_calls(pb.LLMServiceStub(channels["gateway"]))}
    for name, feature in FEATURES.items():
        paths[name] = gateway_calls(pb.LLMServiceStub(channels[name]), feature.metadata)
    servers = {"direct": None, "gateway": "gateway", **{name: name for name in FEATURES}}
    pids = {name: [pid] for name, pid in pids_by_name.items()}
    gateway_pid = pids_by_name["gateway"]
    rss_idle = rss_mib(gateway_pid)
    print(f"llmrelay bench: {requests} requests, concurrency {concurrency}, loopback upstream in its own process\n")
    print_header()
    results: dict[str, Run] = {}
    # Paths take turns, a slice of the requests each per round, so that the machine's slow minutes fall on all of
    # them; a feature's cost is the median over rounds of its difference with the plain gateway in the same round.
    rounds: dict[str, list[Run]] = {}
    for kind in KINDS:
        for round_ in range(ROUNDS):
            for path, calls in paths.items():
                run = await measure(calls[kind], requests // ROUNDS, concurrency, pids, warm_up=round_ == 0)
                rounds.setdefault(f"{path} {kind}", []).append(run)
        for path in paths:
            name = f"{path} {kind}"
            results[name] = functools.reduce(operator.add, rounds[name])
            print_row(name, results[name], servers[path])
    rss_loaded = rss_mib(gateway_pid)
    print("\nratios, gateway / direct (same upstream, same run):")
    for kind in KINDS:
        via, direct_run = results[f"gateway {kind}"], results[f"direct {kind}"]
        latency = via.p50_ms / direct_run.p50_ms
        throughput = direct_run.wall_s / via.wall_s
        cpu = via.cpu_s["gateway"] / via.cpu_s["upstream"]
        print(f"  {kind:<7} p50 latency x{latency:.2f}   throughput x{throughput:.2f}   CPU x{cpu:.2f} upstream's")
    for name, feature in FEATURES.items():
        print(f"\ncost of {feature.description}, against the plain gateway, same run:")
        for kind in KINDS:
            pairs = zip(rounds[f"{name} {kind}"], rounds[f"gateway {kind}"], strict=True)
            extra_us = sorted((run.cpu_ms(name) - plain.cpu_ms("gateway")) * 1000 for run, plain in pairs)
            print(
                f"  {kind:<7} {statistics.median(extra_us):+.0f} us gateway CPU per call"
                f"   (rounds: {extra_us[0]:+.0f} .. {extra_us[-1]:+.0f})"
            )
    print(f"\ngateway memory: {rss_idle:.0f} MiB idle, {rss_loaded:.0f} MiB after the runs")
    for channel in channels.values():
        await channel.close()
    await direct.close()


if __name__ == "__main__":
    asyncio.run(main())
    if "--workers" not in sys.argv:
        print()
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tokens.py")], check=True)
