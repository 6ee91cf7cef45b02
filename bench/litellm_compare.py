"""`make bench-litellm`: llmrelay's server cost against LiteLLM's proxy, same upstream, same machine, same run.

Three paths to the loopback fake OpenAI upstream (tests/upstream.py), each measured with bench/__main__.py's `measure`
at the same request count and concurrency, unary and streaming:
    direct     the openai SDK straight to the upstream
    litellm    the openai SDK to LiteLLM's proxy (OpenAI-compatible HTTP), which calls the upstream
    llmrelay   gRPC to llmrelay-server, which calls the upstream
Every server runs in its own process; a gateway's CPU per request is read from its process CPU clock (`measure`), for
LiteLLM summed over its whole process tree.

LiteLLM is installed by this script, pinned, into its own venv outside the repo (keyed by version under
$LLMRELAY_CACHE, else $XDG_CACHE_HOME/llmrelay, else ~/.cache/llmrelay), so the project's dependencies are untouched.
It runs offline (local model-cost map, no telemetry, no callbacks, no database, no UI), one worker, logging at
warning, with an environment that holds none of ours.

Usage: python -m bench.litellm_compare [--requests N] [--concurrency C] [--litellm-version V]
(from the repo root, with the project's venv: it imports bench/__main__.py's helpers)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
from harness import free_port
from llmrelay import v1 as pb
from openai.types.chat import ChatCompletionMessageParam

from bench.__main__ import (
    KINDS,
    STOP_S,
    STREAM_PROMPT,
    UNARY_PROMPT,
    Call,
    Run,
    grpc_calls,
    measure,
    print_header,
    print_row,
    rss_mib,
    start_gateway,
    start_upstream,
    stop,
)


def _asking(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


def sdk_calls(client: openai.AsyncOpenAI) -> dict[str, Call]:
    """A unary and a streaming chat completion through the openai SDK (what LiteLLM's callers use), the same chats
    as `grpc_calls` (a stream of STREAM_PROMPT's 8 chunks, not the unary prompt's 5), each checking its answer."""
    unary_messages, stream_messages = _asking(UNARY_PROMPT), _asking(STREAM_PROMPT)
    streamed = f"echo: {STREAM_PROMPT}"

    async def unary() -> float:
        answer = await client.chat.completions.create(model="tiny", messages=unary_messages)
        assert answer.choices[0].message.content, answer
        return time.perf_counter()

    async def stream() -> float:
        first = 0.0
        texts = []
        async for chunk in await client.chat.completions.create(model="tiny", messages=stream_messages, stream=True):
            if chunk.choices and (text := chunk.choices[0].delta.content):
                texts.append(text)
                first = first or time.perf_counter()
        assert "".join(texts) == streamed, texts
        return first

    return {"unary": unary, "stream": stream}


# Pinned: LiteLLM's PyPI releases were hijacked twice (1.82.7/1.82.8 in March 2026, 1.107.0 in October 2026).
# 1.105.1 predates the second incident and is the version Homebrew pins by hash. Change it deliberately.
LITELLM_VERSION = "1.105.1"
# Files that make every Python start run code: how both hijacked releases ran their payload. A fresh venv has
# setuptools' distutils-precedence.pth at most; anything else makes the install refuse to run.
ALLOWED_PTH = {"distutils-precedence.pth"}
# The bar: under a millisecond of server CPU per request, and a tenth of LiteLLM's or less.
BAR_CPU_MS, BAR_RATIO = 1.0, 0.1
LITELLM_STARTUP_S = 180  # a cold LiteLLM import on 2 cores takes a while

LITELLM_CONFIG = """\
model_list:
  - model_name: tiny
    litellm_params:
      model: openai/tiny
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: dummy
litellm_settings:
  set_verbose: false
  drop_params: true
  num_retries: 0
  request_timeout: 30
  callbacks: []
  success_callback: []
  failure_callback: []
  cache: false
router_settings:
  num_retries: 0
general_settings:
  disable_spend_logs: true
  disable_error_logs: true
  background_health_checks: false
"""


def cache_dir() -> Path:
    if explicit := os.environ.get("LLMRELAY_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmrelay"


def startup_hooks(venv: Path) -> list[Path]:
    """Files in the venv's site-packages that run code at every interpreter start (.pth, sitecustomize)."""
    found: list[Path] = []
    for site in venv.glob("lib/python*/site-packages"):
        found += [p for p in site.glob("*.pth") if p.name not in ALLOWED_PTH and not p.name.startswith("__editable__")]
        found += [p for name in ("sitecustomize.py", "usercustomize.py") if (p := site / name).exists()]
    return found


def litellm_venv(version: str) -> Path:
    """LiteLLM's own venv, installed once per version (and Python), binary wheels only, checked for startup hooks."""
    home = cache_dir() / f"litellm-{version}"
    venv, stamp = home / "venv", home / "installed"
    python_tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    if stamp.exists() and stamp.read_text().split()[:1] == [python_tag] and (venv / "bin" / "litellm").exists():
        print(f"litellm {version}: cached in {venv}", flush=True)
        return venv
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    print(f"litellm {version}: installing into {venv} (once per version)", flush=True)
    started = time.monotonic()
    # pip gets our environment (its index, certificates); with wheels only, no package code runs at install.
    env = os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # From the interpreter this script runs on: venv bases the new venv on the same base Python.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, env=env)
    # --only-binary: no package's build script runs at install time.
    try:
        subprocess.run([*pip, "--only-binary=:all:", f"litellm[proxy]=={version}"], check=True, env=env)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(home, ignore_errors=True)
        raise SystemExit(
            f"bench: could not install litellm[proxy]=={version} (pip exited {error.returncode})"
        ) from None
    if hooks := startup_hooks(venv):
        shutil.rmtree(home, ignore_errors=True)
        raise SystemExit(f"bench: litellm {version} installed interpreter start-up hooks {hooks}; removed, not run")
    stamp.write_text(f"{python_tag} installed in {time.monotonic() - started:.0f} s\n")
    print(f"litellm {version}: installed in {time.monotonic() - started:.0f} s", flush=True)
    return venv


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment: no credentials, proxies or settings of ours leak into a child."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | extra


def descendants(pid: int) -> list[int]:
    """pid and every process below it (LiteLLM may fork workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise SystemExit(f"bench: LiteLLM's proxy did not become ready ({url}); its log ends:\n{tail}")


def start_litellm(
    venv: Path, scratch: Path, upstream_port: int, port: int, master_key: str
) -> tuple[subprocess.Popen[bytes], Path]:
    config, log = scratch / "litellm.yaml", scratch / "litellm.log"
    config.write_text(LITELLM_CONFIG.format(upstream_port=upstream_port))
    home = scratch / "litellm-home"
    home.mkdir()
    env = clean_env(
        {
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(home),
            # Bundled copies instead of fetches from the internet (the cost map at import, the rest on use).
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
            "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
            "LITELLM_LOCAL_BLOG_POSTS": "True",
            "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
            # It refuses to start without one; with no database, checking it is a comparison per request.
            "LITELLM_MASTER_KEY": master_key,
            "LITELLM_LOG": "WARNING",  # its loggers, and uvicorn's level (no per-request access log)
            "LITELLM_MODE": "PRODUCTION",  # no .env loading
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            "NO_REDOC": "True",
            "DISABLE_SCHEMA_UPDATE": "True",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    args = [
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    with log.open("wb") as sink:
        # Its own session, so that stopping it reaches any worker it forked (and nothing else).
        process = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=home,
            start_new_session=True,
        )  # fmt: skip
    return process, log


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this script created for LiteLLM, SIGKILL after STOP_S; no survivor."""
    for sig, wait_s in ((signal.SIGTERM, STOP_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def log_problems(log: Path) -> list[str]:
    words = ("warning", "error", "exception", "traceback", "timeout", "connect")
    return [line for line in log.read_text(errors="replace").splitlines() if any(w in line.lower() for w in words)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--litellm-version", default=LITELLM_VERSION)
    args = parser.parse_args()
    # A SIGTERM (make, CI) unwinds like Ctrl-C, so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated; every server it started is stopped"))

    venv = litellm_venv(args.litellm_version)
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as scratch_name, contextlib.ExitStack() as running:
        scratch = Path(scratch_name)
        upstream = start_upstream(upstream_port)
        running.callback(stop, upstream)
        master_key = f"sk-{secrets.token_hex(16)}"
        litellm, litellm_log = start_litellm(venv, scratch, upstream_port, litellm_port, master_key)
        running.callback(stop_group, litellm)
        started = time.monotonic()
        wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, litellm_log, LITELLM_STARTUP_S)
        print(f"litellm proxy ready in {time.monotonic() - started:.1f} s", flush=True)
        ports = (upstream_port, gateway_port, litellm_port)
        asyncio.run(report_with_gateway(scratch, upstream.pid, litellm.pid, ports, master_key, args))
        if problems := log_problems(litellm_log):
            print(f"\nLiteLLM logged {len(problems)} warning/error lines; the first ones:")
            print("\n".join(f"  {line[:200]}" for line in problems[:10]))


async def report_with_gateway(
    scratch: Path,
    upstream_pid: int,
    litellm_pid: int,
    ports: tuple[int, int, int],
    litellm_key: str,
    args: argparse.Namespace,
) -> None:
    """The report, with llmrelay started (through the tests' harness) for it and stopped after; `ports` are the
    upstream's, the gateway's and LiteLLM's."""
    upstream_port, gateway_port, litellm_port = ports
    gateway = await start_gateway(scratch, upstream_port, gateway_port)
    try:
        pid = gateway.process.pid
        servers = Servers(upstream_pid, pid, litellm_pid, upstream_port, gateway_port, litellm_port, litellm_key)
        await report(servers, args.requests, args.concurrency, args.litellm_version)
    finally:
        await gateway.stop()


@dataclass
class Servers:
    upstream: int
    gateway: int
    litellm: int
    upstream_port: int
    gateway_port: int
    litellm_port: int
    litellm_key: str

    def pids(self) -> dict[str, list[int]]:
        """The processes of each server to read CPU from: LiteLLM's whole tree."""
        return {"upstream": [self.upstream], "llmrelay": [self.gateway], "litellm": descendants(self.litellm)}

    def litellm_rss_mib(self) -> float:
        return sum(rss_mib(pid) for pid in descendants(self.litellm))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


async def warm_up(call: Call, calls: int, concurrency: int) -> None:
    """At the run's concurrency, so every pool (client's, gateway's to the upstream) has grown to it before the timed
    run, and lazy imports are done; `measure` then adds its own sequential warm-up."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with semaphore:
            await call()

    await asyncio.gather(*(one() for _ in range(calls)))


async def report(servers: Servers, requests: int, concurrency: int, litellm_version: str) -> None:
    direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{servers.upstream_port}/v1", api_key="bench", max_retries=0)
    litellm = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{servers.litellm_port}/v1", api_key=servers.litellm_key, max_retries=0, timeout=30
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{servers.gateway_port}")
    # Each path is named after the server it goes through, whose CPU it costs besides the upstream's (direct: none).
    paths = {
        "direct": sdk_calls(direct),
        "litellm": sdk_calls(litellm),
        "llmrelay": grpc_calls(pb.LLMServiceStub(channel)),
    }
    idle = {"llmrelay": rss_mib(servers.gateway), "litellm": servers.litellm_rss_mib()}
    print(
        f"\nllmrelay vs LiteLLM {litellm_version} proxy: {requests} requests, concurrency {concurrency}, "
        f"loopback upstream, each server in its own process, {os.cpu_count()} cores\n"
    )
    print_header()
    results: dict[str, Run] = {}
    for kind in KINDS:
        for path, calls in paths.items():
            name = f"{path} {kind}"
            await warm_up(calls[kind], requests // 5, concurrency)
            results[name] = await measure(calls[kind], requests, concurrency, servers.pids())
            print_row(name, results[name], None if path == "direct" else path)
    loaded = {"llmrelay": rss_mib(servers.gateway), "litellm": servers.litellm_rss_mib()}

    # Server CPU per request, llmrelay's and LiteLLM's, of each kind.
    cpu_ms = {
        kind: (results[f"llmrelay {kind}"].cpu_ms("llmrelay"), results[f"litellm {kind}"].cpu_ms("litellm"))
        for kind in KINDS
    }
    print("\nllmrelay / LiteLLM (below 1 is llmrelay ahead; throughput is LiteLLM's wall time over llmrelay's):")
    for kind in KINDS:
        ours, theirs = results[f"llmrelay {kind}"], results[f"litellm {kind}"]
        ours_ms, theirs_ms = cpu_ms[kind]
        print(
            f"  {kind:<7} p50 x{ours.p50_ms / theirs.p50_ms:.2f}   p99 x{ours.p99_ms / theirs.p99_ms:.2f}   "
            f"throughput x{theirs.wall_s / ours.wall_s:.2f}   "
            f"server CPU/req x{ratio(ours_ms, theirs_ms):.3f} ({ours_ms:.3f} ms vs {theirs_ms:.3f} ms)"
        )
    print(f"\nthe bar (server CPU/req under {BAR_CPU_MS:g} ms and at most x{BAR_RATIO:g} LiteLLM's):")
    for kind in KINDS:
        ours_ms, theirs_ms = cpu_ms[kind]
        share = ratio(ours_ms, theirs_ms)
        verdict = "met" if ours_ms < BAR_CPU_MS and share <= BAR_RATIO else "NOT met"
        print(f"  {kind:<7} {verdict}: {ours_ms:.3f} ms, x{share:.3f} LiteLLM's")
    print("\neach / direct (same upstream, same run):")
    for kind in KINDS:
        base = results[f"direct {kind}"]
        for server in ("litellm", "llmrelay"):
            run = results[f"{server} {kind}"]
            print(
                f"  {server + ' ' + kind:<17} p50 x{run.p50_ms / base.p50_ms:.2f}   p99 x{run.p99_ms / base.p99_ms:.2f}"
                f"   throughput x{base.wall_s / run.wall_s:.2f}"
            )
    print("\nmemory (RSS, MiB), idle -> after the runs:")
    for server in ("llmrelay", "litellm"):
        print(f"  {server:<9} {idle[server]:.0f} -> {loaded[server]:.0f}")
    await channel.close()
    await direct.close()
    await litellm.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("bench: interrupted; every server it started is stopped") from None
