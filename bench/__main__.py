"""`make bench`: the gateway's cost measured against the direct call to the same upstream, in the same run.

The loopback upstream and the gateway each run in their own process, so the gateway's CPU time is read from its own
/proc entry. Figures are ratios to the direct call (these machines are noisy), plus the gateway's CPU per request.

Usage: python -m bench [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
from llmrelay import v1 as pb

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


async def measure(call: Callable[[], Awaitable[None]], requests: int, concurrency: int, pids: dict[str, int]) -> Run:
    for _ in range(50):  # warm-up: connections, caches, first-call imports
        await call()
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def timed() -> None:
        async with semaphore:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    await asyncio.gather(*(timed() for _ in range(requests)))
    wall = time.perf_counter() - started
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    return Run(latencies, wall, cpu)


def start(args: list[str], ready: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if ready in line:
            return process
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit(f"bench: {args[0]} did not start")


def start_gateway(scratch: Path, upstream_port: int, gateway_port: int) -> subprocess.Popen[str]:
    """`llmrelay-server` in front of the loopback upstream, with no configuration from the environment."""
    config = scratch / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{scratch}/usage.db"}}\n'
        f'llm:\n  ollama: {{base_url: "http://127.0.0.1:{upstream_port}/v1", model: tiny}}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "LLMRELAY_"))}
    command = [str(BIN / "llmrelay-server"), "--listen", f"127.0.0.1:{gateway_port}", "--config", str(config)]
    return start(command, "listening on", env)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    upstream_port, gateway_port = free_port(), free_port()
    upstream = start(
        [sys.executable, str(ROOT / "tests" / "upstream.py"), "--listen", f"127.0.0.1:{upstream_port}"], "listening"
    )
    with tempfile.TemporaryDirectory() as scratch:
        gateway = start_gateway(Path(scratch), upstream_port, gateway_port)
        try:
            await asyncio.sleep(1.0)
            await report(upstream, gateway, upstream_port, gateway_port, args.requests, args.concurrency)
        finally:
            for process in (gateway, upstream):
                process.terminate()
                process.wait(10)


async def report(
    upstream: subprocess.Popen[str],
    gateway: subprocess.Popen[str],
    upstream_port: int,
    gateway_port: int,
    requests: int,
    concurrency: int,
) -> None:
    messages = [{"role": "user", "content": "benchmark the gateway please"}]
    direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="bench", max_retries=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}")
    stub = pb.LLMServiceStub(channel)
    request = pb.CompleteRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content=messages[0]["content"])])
    stream_request = pb.StreamCompleteRequest(model=request.model, messages=request.messages)

    async def direct_unary() -> None:
        await direct.chat.completions.create(model="tiny", messages=messages)  # type: ignore[arg-type]

    async def direct_stream() -> None:
        async for _ in await direct.chat.completions.create(model="tiny", messages=messages, stream=True):  # type: ignore[arg-type, union-attr]
            pass

    async def gateway_unary() -> None:
        await stub.Complete(request, timeout=10)

    async def gateway_stream() -> None:
        async for _ in stub.StreamComplete(stream_request, timeout=10):
            pass

    pids = {"upstream": upstream.pid, "gateway": gateway.pid}
    rss_idle = rss_mib(gateway.pid)
    print(f"llmrelay bench: {requests} requests, concurrency {concurrency}, loopback upstream in its own process\n")
    print(f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'gateway CPU/req':>18}{'upstream CPU/req':>18}")
    results: dict[str, Run] = {}
    for name, call in (
        ("direct unary", direct_unary),
        ("gateway unary", gateway_unary),
        ("direct stream", direct_stream),
        ("gateway stream", gateway_stream),
    ):
        run = await measure(call, requests, concurrency, pids)
        results[name] = run
        print(
            f"{name:<22}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}{requests / run.wall_s:>9.0f}"
            f"{run.cpu_s['gateway'] / requests * 1000:>15.3f} ms{run.cpu_s['upstream'] / requests * 1000:>15.3f} ms"
        )
    rss_loaded = rss_mib(gateway.pid)
    print("\nratios, gateway / direct (same upstream, same run):")
    for kind in ("unary", "stream"):
        via, direct_run = results[f"gateway {kind}"], results[f"direct {kind}"]
        latency = via.p50_ms / direct_run.p50_ms
        throughput = direct_run.wall_s / via.wall_s
        cpu = via.cpu_s["gateway"] / via.cpu_s["upstream"]
        print(f"  {kind:<7} p50 latency x{latency:.2f}   throughput x{throughput:.2f}   CPU x{cpu:.2f} upstream's")
    print(f"\ngateway memory: {rss_idle:.0f} MiB idle, {rss_loaded:.0f} MiB after the runs")
    await channel.close()
    await direct.close()


if __name__ == "__main__":
    asyncio.run(main())
    tokens = ROOT / "bench" / "bench_tokens.py"
    if tokens.exists():
        print()
        subprocess.run([sys.executable, str(tokens)], check=True)
