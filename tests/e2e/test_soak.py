"""The soak: many concurrent streams and calls under random faults, against `llmrelay-server` in its own process.

Bounded: LLMRELAY_SOAK_S seconds (20 by default; `make soak` runs 60), 100 concurrent callers, 5 s deadlines. Every
call must end with a complete answer or a definite status carrying ErrorInfo, within its deadline; afterwards the
gateway's file descriptors are back where they started, and its memory stops growing once the load has set its
high-water mark.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmrelay import v1 as pb
from support import OPENAI_TEST_KEY, chat, details, start_server, stream_chat
from upstream import FakeUpstream

SOAK_S = float(os.environ.get("LLMRELAY_SOAK_S", "20"))
CALLERS = 100
DEADLINE_S = 5.0
OVERRUN_S = 0.5
# Faults from the matrix, with plenty of healthy answers between them.
FAULTS: list[dict[str, Any]] = [
    *[{}] * 48,
    {"status": 503},
    {"status": 429, "retry_after": "soon"},
    {"status": 429, "retry_after": 0},
    {"status": 500},
    {"drop": True},
    {"stall_s": 2},
    {"stream_cut_after": 3},
    {"trickle_s": 1.5},
    {"error_event_after": 2},
    {"error_event_after": 0},
    {"no_choices": True},
    {"no_finish": True},
    {"two_choices": True},
    {"body": "<html>busy</html>", "content_type": "text/html"},
]
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.OK}


@dataclass
class Outcome:
    code: grpc.StatusCode
    elapsed_s: float
    problem: str = ""


def gateway_stats(pid: int) -> tuple[int, int]:
    """Open file descriptors and resident memory (KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return fds, rss_kib


async def one_call(stub: pb.LLMServiceAsyncStub, rng: random.Random, i: int) -> Outcome:
    text = f"soak {i} alpha beta gamma"
    policy = rng.choice([pb.INTERRUPT_POLICY_RESTART, pb.INTERRUPT_POLICY_ABORT])
    started = time.monotonic()
    try:
        if rng.random() < 0.8:
            chunks = [c async for c in stub.StreamComplete(stream_chat(text, on_interrupt=policy), timeout=DEADLINE_S)]
            if (
                not chunks
                or not chunks[-1].HasField("usage")
                or chunks[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED
            ):
                return Outcome(grpc.StatusCode.OK, time.monotonic() - started, "an OK stream without a final message")
            restarted = max((n for n, c in enumerate(chunks) if c.HasField("restart")), default=-1)
            answer = "".join(c.delta.content for c in chunks[restarted + 1 :])
        else:
            answer = (await stub.Complete(chat(text), timeout=DEADLINE_S)).message.content
    except grpc.aio.AioRpcError as error:
        elapsed = time.monotonic() - started
        if error.code() in BAD_CODES:
            return Outcome(error.code(), elapsed, f"status {error.code().name}: {error.details()}")
        try:
            reason = details(error)["ErrorInfo"].reason
        except (AssertionError, KeyError):
            reason = ""
        return Outcome(error.code(), elapsed, "" if reason else f"no ErrorInfo on {error.code().name}")
    problem = "" if answer == f"echo: {text}" else f"an OK answer that is not whole: {answer!r}"
    return Outcome(grpc.StatusCode.OK, time.monotonic() - started, problem)


async def test_soak_under_random_faults(tmp_path: Path) -> None:
    primary = await FakeUpstream(models=("gpt-test",)).start()
    local = await FakeUpstream(models=("tiny",), ollama=True).start()
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f"""
server: {{usage_db: "{tmp_path}/usage.db", grace_period_s: 2, health_interval_s: 1}}
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test}}
router:
  retry: {{max_retries: 1, initial_backoff_s: 0.05, max_backoff_s: 0.2}}
  circuit: {{failure_threshold: 5, cooldown_s: 1}}
  first_chunk_timeout_s: 1
  stream_idle_timeout_s: 1
""")
    server = await start_server(config, local)
    rng = random.Random(11)
    try:
        await server.wait_listening()
        pid = server.process.pid
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb.LLMServiceStub(channel)
            await stub.Complete(chat(), timeout=5)  # connections and caches as a served gateway has them
            fds_before, rss_before = gateway_stats(pid)
            for upstream in (primary, local):
                upstream.inject(*(rng.choice(FAULTS) for _ in range(int(SOAK_S * 400))))
            outcomes: list[Outcome] = []
            end = time.monotonic() + SOAK_S

            async def caller(n: int) -> None:
                while time.monotonic() < end:
                    outcomes.append(await one_call(stub, rng, n * 100_000 + len(outcomes)))

            callers = asyncio.gather(*(caller(n) for n in range(CALLERS)))
            await asyncio.sleep(SOAK_S / 2)
            rss_halfway = gateway_stats(pid)[1]
            await callers
        for upstream in (primary, local):
            upstream.faults.clear()
            await upstream.stop()  # the gateway's kept-alive upstream connections close with them
        await asyncio.sleep(1.0)
        fds_after, rss_after = gateway_stats(pid)
    finally:
        server.process.kill()
        await server.process.wait()
        await primary.stop()
        await local.stop()
    problems = [o.problem for o in outcomes if o.problem]
    assert problems == [], f"{len(problems)} of {len(outcomes)} calls: {sorted(set(problems))[:10]}"
    overrun = max(o.elapsed_s for o in outcomes) - DEADLINE_S
    assert overrun <= OVERRUN_S, f"a call outlived its {DEADLINE_S} s deadline by {overrun:.2f} s"
    ok = sum(o.code == grpc.StatusCode.OK for o in outcomes)
    assert ok > len(outcomes) / 4, f"only {ok} of {len(outcomes)} calls answered"
    assert fds_after <= fds_before + 5, f"file descriptors {fds_before} -> {fds_after}"
    # The first seconds of load raise the high-water mark (gRPC's and the HTTP pools' buffers); after that, no
    # growth: a leak would go on growing with every call.
    assert rss_after - rss_halfway < 16 * 1024, f"resident memory grew {rss_halfway} -> {rss_after} KiB under load"
    assert rss_after - rss_before < 128 * 1024, f"resident memory {rss_before} -> {rss_after} KiB"
    rss_mib = "->".join(str(kib // 1024) for kib in (rss_before, rss_halfway, rss_after))
    print(f"soak: {len(outcomes)} calls in {SOAK_S:g} s, {ok} OK, fds {fds_before}->{fds_after}, "
          f"RSS {rss_mib} MiB, worst overrun {overrun:+.2f} s")  # fmt: skip


pytestmark = pytest.mark.soak
