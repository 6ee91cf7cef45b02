"""`llmrelay-server --workers N`: N real gateway processes on one port under a supervisor: calls spread over them,
one ledger and one metrics endpoint for all, a dead worker restarted, SIGTERM drains them all, a taken port still
refused, and workers that outlive a killed supervisor stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from harness import GatewayProcess, free_port
from llmrelay import v1 as pb
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from support import chat, read_all, start_server, stream_chat
from upstream import FakeUpstream

COMPLETE = "llmrelay.v1.LLMService/Complete"


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def start_workers(
    tmp_path: Path, local: FakeUpstream, workers: int = 2, server: str = "", env: dict[str, str] | None = None
) -> GatewayProcess:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path / "usage.db"}", drain_s: 0, grace_period_s: 5, log_format: json{server}}}\n'
    )
    gateway = await start_server(config, local, "--workers", str(workers), env=env)
    await gateway.wait_listening()
    await gateway.wait_for_line(f"({workers} workers)")
    return gateway


async def stop(gateway: GatewayProcess) -> int:
    gateway.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        return await gateway.process.wait()


async def call_on_new_connections(target: str, calls: int) -> list[pb.CompleteResponse]:
    """Each call on a connection of its own: the kernel spreads connections, not calls, over the workers (and
    channels to one target share their connection unless told not to)."""

    async def one(index: int) -> pb.CompleteResponse:
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            return await pb.LLMServiceStub(channel).Complete(
                chat(f"call {index}"), timeout=10, metadata=[("x-request-id", f"w-{index}")]
            )

    return list(await asyncio.gather(*(one(index) for index in range(calls))))


def call_lines(output: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("msg") == "call" and entry.get("rpc") == COMPLETE]


async def test_workers_share_the_port_the_ledger_and_the_metrics(tmp_path: Path, local: FakeUpstream) -> None:
    metrics_port = free_port()
    gateway = await start_workers(tmp_path, local, server=f', metrics_listen: "127.0.0.1:{metrics_port}"')
    try:
        assert len(children(gateway.process.pid)) == 2
        answers = await call_on_new_connections(gateway.target, 40)
        await asyncio.sleep(1.2)  # each worker writes its ledger every 0.5 s
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            usage = await pb.LLMServiceStub(channel).GetUsage(pb.GetUsageRequest(), timeout=5)
        [record] = usage.records
        assert record.requests == 40
        assert record.completion_tokens == sum(answer.usage.completion_tokens for answer in answers)

        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
        handled: Counter[str] = Counter()
        workers_running = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "grpc_server_handled_total" and sample.labels["grpc_method"] == "Complete":
                    handled[sample.labels["worker"]] += int(sample.value)
                if sample.name == "llmrelay_workers":
                    workers_running = sample.value
        assert sum(handled.values()) == 40 and set(handled) == {"1", "2"}  # both served, and all are counted
        assert workers_running == 2
        # What Prometheus asks for first, OpenMetrics, parses too.
        asked = urllib.request.Request(
            f"http://127.0.0.1:{metrics_port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        open_metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(asked, timeout=5).read().decode())
        names = {family.name for family in openmetrics_families(open_metrics)}  # type: ignore[no-untyped-call]
        assert "grpc_server_handled" in names and not any(name.endswith("_created") for name in names)
    finally:
        assert await stop(gateway) == 0
    output = await gateway.output()
    served = Counter(str(entry["worker"]) for entry in call_lines(output))
    assert served == Counter({worker: handled[worker] for worker in ("1", "2")})
    assert sorted(str(entry["request_id"]) for entry in call_lines(output)) == sorted(f"w-{n}" for n in range(40))
    assert output.count('"msg":"stopped"') == 3  # each worker, then the supervisor


async def test_a_worker_that_dies_is_restarted(tmp_path: Path, local: FakeUpstream) -> None:
    gateway = await start_workers(tmp_path, local)
    try:
        first, second = children(gateway.process.pid)
        os.kill(first, signal.SIGKILL)
        line = await gateway.wait_for_line("restarting")
        assert f"(pid {first}) exited with signal SIGKILL" in line
        assert len(await call_on_new_connections(gateway.target, 10)) == 10  # the other one serves meanwhile
        async with asyncio.timeout(20):
            while len(workers := children(gateway.process.pid)) < 2 or first in workers:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            assert second in workers
            # Two workers, the supervisor, and the new worker.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await call_on_new_connections(gateway.target, 10)) == 10
    finally:
        assert await stop(gateway) == 0


async def test_a_taken_port_still_stops_a_second_gateway(tmp_path: Path, local: FakeUpstream) -> None:
    gateway = await start_workers(tmp_path, local)
    try:
        for flags in (("--workers", "2"), ()):  # a second gateway with workers, or without
            config = tmp_path / "second.yaml"
            config.write_text(f'server: {{usage_db: "{tmp_path / "second.db"}"}}\n')
            second = await start_server(config, local, *flags, port=gateway.port)
            async with asyncio.timeout(20):
                assert await second.process.wait() != 0
            assert second.process.stderr is not None
            assert "cannot listen on" in (await second.process.stderr.read()).decode()
        assert len(await call_on_new_connections(gateway.target, 4)) == 4  # the first one never lost a call
    finally:
        assert await stop(gateway) == 0


async def test_sigterm_drains_every_worker(tmp_path: Path, local: FakeUpstream) -> None:
    gateway = await start_workers(tmp_path, local)
    local.inject({"stall_s": 1.5})
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stream = pb.LLMServiceStub(channel).StreamComplete(stream_chat(), timeout=20)
        async with asyncio.timeout(10):
            while not local.chat_requests:  # noqa: ASYNC110 (the stream reached a worker and its upstream)
                await asyncio.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        chunks = await read_all(stream)
    assert chunks[-1].usage.completion_tokens > 0  # finished, not cut
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 0


async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path, local: FakeUpstream) -> None:
    gateway = await start_workers(tmp_path, local)
    workers = children(gateway.process.pid)
    gateway.process.kill()
    await gateway.process.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def run_dir(gateway: GatewayProcess) -> Path:
    """The supervisor's run directory, from its first worker's command line."""
    argv = Path(f"/proc/{children(gateway.process.pid)[0]}/cmdline").read_bytes().decode().split("\0")
    return Path(argv[argv.index("--worker-dir") + 1])


# Holds the lock of a run directory, and says so.
_LOCK_HOLDER = (
    "import fcntl, os, sys, time; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX);"
    " print(1, flush=True); time.sleep(60)"
)


async def test_a_supervisor_killed_leaves_no_run_directory_behind(tmp_path: Path, local: FakeUpstream) -> None:
    """The next supervisor removes a killed one's run directory, but never one whose supervisor or workers live."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {"TMPDIR": str(temporary)}
    # A run directory whose lock is still held, as by the workers of a supervisor killed alone, while they drain.
    draining = temporary / "llmrelay-workers-draining"
    draining.mkdir()
    (draining / "supervisor.lock").touch()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOCK_HOLDER, str(draining / "supervisor.lock"), stdout=asyncio.subprocess.PIPE
    )
    live = None
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 20) == b"1\n"
        live = await start_workers(tmp_path, local, env=env)
        killed = await start_workers(tmp_path, local, env=env)
        live_dir, killed_dir = run_dir(live), run_dir(killed)
        killed_workers = children(killed.process.pid)
        for pid in (killed.process.pid, *killed_workers):
            os.kill(pid, signal.SIGKILL)
        await killed.process.wait()
        async with asyncio.timeout(15):
            while any(alive(pid) for pid in killed_workers):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert killed_dir.is_dir()  # what a killed supervisor leaves

        following = await start_workers(tmp_path, local, env=env)
        try:
            assert not killed_dir.exists()
            assert f"removed {killed_dir}, left by a supervisor that was killed" in following.text()
            assert live_dir.is_dir() and draining.is_dir()
            assert len(await call_on_new_connections(following.target, 4)) == 4
            assert len(await call_on_new_connections(live.target, 4)) == 4
        finally:
            assert await stop(following) == 0
    finally:
        holder.kill()
        await holder.wait()
        if live is not None:
            assert await stop(live) == 0
    assert [path.name for path in temporary.iterdir()] == [draining.name]  # the others' own, removed as they stopped


@pytest.mark.parametrize("workers", ["0", "two"])
async def test_a_wrong_number_of_workers_is_refused(tmp_path: Path, local: FakeUpstream, workers: str) -> None:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}"}}\n')
    gateway = await start_server(config, local, "--workers", workers)
    async with asyncio.timeout(20):
        assert await gateway.process.wait() != 0
    assert gateway.process.stderr is not None
    error = (await gateway.process.stderr.read()).decode()
    assert "workers" in error and "Traceback" not in error
