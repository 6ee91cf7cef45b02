"""`llmrelay-server --workers N`: N real gateway processes on one port under a supervisor: calls spread over them,
one ledger and one metrics endpoint for all, a dead worker restarted (each after its own back-off), SIGTERM drains
them all (and kills those that do not stop, after one deadline for all), Ctrl-C as they load stops them quietly, a
taken port still refused (while the first gateway's workers start too), and workers that outlive a killed supervisor
stop (killed as they start too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from harness import BIN, GatewayProcess, clean_env, free_port, spawn_gateway
from llmrelay import v1 as pb
from llmrelay_server.config import ServerConfig
from llmrelay_server.tokens import TokenCounter
from llmrelay_server.workers import EXIT_MARGIN_S, SCRAPE_TIMEOUT_S, _WorkersMetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from raw_server import RawServer
from support import (
    alive,
    call_on_new_connections,
    call_with_raw_path,
    chat,
    children,
    details,
    read_all,
    start_server,
    stream_chat,
    wait_until,
    worker_index,
)
from upstream import FakeUpstream

COMPLETE = "llmrelay.v1.LLMService/Complete"


# Short, so that a silent worker is found soon; yet a worker is also killed when it has not started to serve within
# twice this (workers.py), and on a busy 2-core CI machine two workers starting at once took more than 6 s.
WORKER_TIMEOUT_S = 6


def workers_config(tmp_path: Path, server: str = "", grace_period_s: float = 5) -> Path:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path / "usage.db"}", drain_s: 0, grace_period_s: {grace_period_s},'
        f" log_format: json{server}}}\n"
    )
    return config


async def start_workers(
    tmp_path: Path,
    local: FakeUpstream,
    workers: int = 2,
    server: str = "",
    env: dict[str, str] | None = None,
    grace_period_s: float = 5,
) -> GatewayProcess:
    config = workers_config(tmp_path, server, grace_period_s)
    gateway = await start_server(config, local, "--workers", str(workers), env=env)
    await gateway.wait_listening()
    await gateway.wait_for_line(f"({workers} workers)")
    return gateway


async def made_workers(gateway: GatewayProcess, workers: int = 2) -> list[int]:
    """The supervisor's workers, as soon as it has made them all: they are still starting then (each takes seconds
    to import the gateway before it serves)."""
    async with asyncio.timeout(20):
        while len(pids := children(gateway.process.pid)) < workers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return pids


async def error_output(gateway: GatewayProcess) -> str:
    """What a gateway that was never waited on to listen wrote to stderr, once it has exited."""
    assert gateway.process.stderr is not None
    return (await gateway.process.stderr.read()).decode()


async def stop(gateway: GatewayProcess) -> int:
    gateway.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        return await gateway.process.wait()


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


async def test_the_workers_long_lines_stay_whole_in_a_log_read_slowly(tmp_path: Path, local: FakeUpstream) -> None:
    """Call lines longer than PIPE_BUF (a prompt of 2,000 emoji, some 8 KB) from both workers, into a pipe read slowly
    (a busy log collector): each took several writes, between which the other worker's came, and most lines of the
    JSON log were two workers' pieces spliced together."""
    port = free_port()
    reading, writing = os.pipe()
    gateway = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server",
        "--listen",
        f"127.0.0.1:{port}",
        "--config",
        str(workers_config(tmp_path, ", log_content: true")),
        "--workers",
        "2",
        env=clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1"), LLMRELAY_OLLAMA_MODEL="tiny"),
        stderr=writing,
    )
    os.close(writing)
    output = bytearray()

    def read_slowly() -> None:
        # A little at a time, so that the pipe stays full and a long line's write gets in a page at a time.
        with open(reading, "rb", buffering=0) as log:
            while block := log.read(1024):
                output.extend(block)
                time.sleep(0.002)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    prompt = "\N{GRINNING FACE}" * 2000

    async def three_calls() -> None:
        # Each on a connection of its own, for the kernel to spread them over both workers.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            for _ in range(3):
                await pb.LLMServiceStub(channel).Complete(chat(prompt), timeout=30)

    try:
        async with asyncio.timeout(30):
            while b"(2 workers)" not in output:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.gather(*(three_calls() for _ in range(40)))
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await gateway.wait() == 0
    await asyncio.to_thread(reader.join, 30)
    entries, spliced = [], []
    for line in bytes(output).splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            spliced.append(line)
    assert not spliced, f"{len(spliced)} of {len(entries) + len(spliced)} lines are not whole: {spliced[0][:200]!r}"
    calls = [entry for entry in entries if entry.get("msg") == "call" and entry.get("prompt") == prompt]
    assert len(calls) == 120 and {entry["worker"] for entry in calls} == {1, 2}


async def test_the_workers_metrics_are_read_directly_whatever_proxy_the_environment_names(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """The supervisor read each worker's endpoint through the environment's HTTP_PROXY (unless NO_PROXY named
    127.0.0.1): behind a corporate proxy, /metrics held no worker's metrics, and nothing said why."""
    metrics_port = free_port()
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    gateway = await start_workers(
        tmp_path,
        local,
        server=f', metrics_listen: "127.0.0.1:{metrics_port}"',
        env={"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy},
    )
    try:
        await call_on_new_connections(gateway.target, 4)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        text = await asyncio.to_thread(
            lambda: opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
        handled = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "grpc_server_handled_total" and sample.labels["grpc_method"] == "Complete"
        )
        assert handled == 4
    finally:
        assert await stop(gateway) == 0


async def test_workers_that_do_not_answer_hold_the_scrape_up_once_not_each(tmp_path: Path, local: FakeUpstream) -> None:
    """The supervisor read its workers' metrics one after another, each within its 2 s: five stopped workers passed
    Prometheus's own 10 s timeout, and every worker's metrics were lost from the scrape."""
    metrics_port = free_port()
    gateway = await start_workers(tmp_path, local, server=f', metrics_listen: "127.0.0.1:{metrics_port}"', workers=4)
    stopped = children(gateway.process.pid)[1:]
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        )
        took_s = time.monotonic() - began
        workers = {
            sample.labels["worker"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "llmrelay_open_streams"  # a worker's own
        }
        assert len(workers) == 1, workers  # the one that answers; the others are left out of this scrape
        assert took_s < 2 * SCRAPE_TIMEOUT_S, f"three stopped workers held the scrape up {took_s:.1f} s"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        assert await stop(gateway) == 0


async def test_a_worker_whose_answer_is_cut_short_is_left_out_of_the_scrape_not_the_others(tmp_path: Path) -> None:
    """A worker killed as it wrote its metrics (an answer short of its Content-Length: http.client's IncompleteRead,
    no OSError) failed the supervisor's whole scrape, 500 and a traceback, every worker's metrics lost with it."""
    whole = b"# TYPE llmrelay_open_streams gauge\nllmrelay_open_streams 3.0\n"

    def answering(body: bytes, sent: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:sent]))
            await writer.drain()
            writer.close()

        return answer

    async with RawServer(answering(whole, len(whole))) as alive, RawServer(answering(whole, 10)) as killed:
        for index, server in ((1, alive), (2, killed)):
            (tmp_path / f"worker-{index}.json").write_text(json.dumps({"pid": 1, "metrics_port": server.port}))
        families = await asyncio.to_thread(lambda: list(_WorkersMetrics(tmp_path).collect()))
    assert [(sample.labels, sample.value) for family in families for sample in family.samples] == [
        ({"worker": "1"}, 3.0)
    ]


async def test_the_keys_file_is_spoken_of_by_the_supervisor_alone(tmp_path: Path, local: FakeUpstream) -> None:
    """Each worker reads its supervisor's copy of the keys file, in a folder of its own: a warning that it holds no
    keys, and a line for each re-read, came from the supervisor, naming the operator's file, and again from each
    worker, naming a copy the operator never configured and that is gone after the run."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys: []\n")
    config = workers_config(tmp_path)
    config.write_text(config.read_text() + f'auth: {{keys_file: "{keys_file}"}}\n')
    gateway = await start_server(config, local, "--workers", "2")
    await gateway.wait_listening()
    await gateway.wait_for_line("(2 workers)")
    keys_file.write_text(f'keys: [{{name: agents, sha256: "{"ab" * 32}"}}]\n')
    await gateway.wait_for_line("reloaded: 1 keys in force")
    await asyncio.sleep(2)  # the workers' re-reads of their copy
    assert await stop(gateway) == 0
    output = await gateway.output()
    for said in ("holds no keys", "reloaded: 1 keys in force"):
        lines = [line for line in output.splitlines() if said in line]
        assert len(lines) == 1 and str(keys_file) in lines[0], lines


async def test_a_gateway_stopped_whole_and_continued_keeps_its_workers(tmp_path: Path, local: FakeUpstream) -> None:
    """Ctrl-Z, `docker pause` or a frozen cgroup stop the supervisor with its workers: continued, the supervisor judged
    the workers' silence before they could beat, killed them all, and cut their calls."""
    gateway = await start_workers(tmp_path, local, server=f", worker_timeout_s: {WORKER_TIMEOUT_S}")
    try:
        workers = children(gateway.process.pid)
        local.inject({"trickle_s": 0.3})
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stream = pb.LLMServiceStub(channel).StreamComplete(stream_chat(" ".join("abcdefghij")), timeout=30)
            assert await stream.read() is not grpc.aio.EOF
            for pid in [*workers, gateway.process.pid]:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(WORKER_TIMEOUT_S + 2)  # longer than worker_timeout_s
            os.kill(gateway.process.pid, signal.SIGCONT)  # the supervisor first: its next tick is overdue
            await asyncio.sleep(0.3)
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            while await stream.read() is not grpc.aio.EOF:
                pass
            assert await stream.code() == grpc.StatusCode.OK
        await asyncio.sleep(2)  # heartbeats judged again, the workers beating
        assert children(gateway.process.pid) == workers
        assert not [line for line in gateway.log if "killing it" in line]
    finally:
        assert await stop(gateway) == 0


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


async def test_a_worker_whose_grpc_server_ends_by_itself_is_restarted(tmp_path: Path, local: FakeUpstream) -> None:
    """Its port closed, it went on beating its heartbeat to the supervisor, taking no call ever again."""
    gateway = await start_workers(tmp_path, local)
    try:
        await asyncio.to_thread(call_with_raw_path, gateway.port, b"/\xff")
        line = await gateway.wait_for_line("restarting")
        assert "exited with status 1" in line, line
        async with asyncio.timeout(20):
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await call_on_new_connections(gateway.target, 10)) == 10
    finally:
        assert await stop(gateway) == 0


async def test_a_worker_restarted_after_an_edit_of_the_configuration_serves_as_the_others_do(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """Every worker reads the configuration as the gateway started with it: a key required by the file since, a
    worker restarted then does not require it where the others do not (nor, the other way round, drop one)."""
    gateway = await start_workers(tmp_path, local)
    try:
        config = tmp_path / "llmrelay.yaml"
        config.write_text(config.read_text() + f'auth: {{keys: [{{name: ops, sha256: "{"0" * 64}"}}]}}\n')
        first, _ = children(gateway.process.pid)
        os.kill(first, signal.SIGKILL)
        await gateway.wait_for_line("restarting")
        async with asyncio.timeout(20):
            # Two workers, the supervisor, and the new worker.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await call_on_new_connections(gateway.target, 16)) == 16  # none asked for a key
    finally:
        assert await stop(gateway) == 0


async def test_a_worker_whose_event_loop_stopped_is_killed_and_restarted(tmp_path: Path, local: FakeUpstream) -> None:
    """Stopped (SIGSTOP standing in for a blocked event loop), a worker keeps its share of the new connections and
    answers none: past worker_timeout_s without its heartbeat, the supervisor kills it, and its restart serves."""
    gateway = await start_workers(tmp_path, local, server=f", worker_timeout_s: {WORKER_TIMEOUT_S}")
    try:
        stopped, _ = children(gateway.process.pid)
        os.kill(stopped, signal.SIGSTOP)
        line = await gateway.wait_for_line("has not run its event loop")
        assert f"(pid {stopped})" in line
        assert f"(pid {stopped}) exited with signal SIGKILL" in await gateway.wait_for_line("restarting")
        async with asyncio.timeout(20):
            # Two workers, the supervisor, and the new worker.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await call_on_new_connections(gateway.target, 16)) == 16
    finally:
        assert await stop(gateway) == 0


async def test_a_worker_stopped_as_it_starts_is_killed_and_stops_the_start(tmp_path: Path, local: FakeUpstream) -> None:
    """A worker beats once it serves: one stuck in its start (SIGSTOP standing in) was never found silent, and the
    supervisor waited for it to announce itself without end, saying nothing."""
    gateway = await start_server(workers_config(tmp_path, ", worker_timeout_s: 3"), local, "--workers", "2")
    stopped, _ = await made_workers(gateway)
    os.kill(stopped, signal.SIGSTOP)
    try:
        async with asyncio.timeout(30):
            assert await gateway.process.wait() == 128 + signal.SIGKILL
    finally:
        if alive(stopped):  # the supervisor did not kill it: nor would it hear of its supervisor's end
            os.kill(stopped, signal.SIGKILL)
        await gateway.stop()
    output = await error_output(gateway)
    assert f"(pid {stopped}) has not started to serve within" in output, output
    assert "exited as it started (signal SIGKILL); stopping" in output


async def test_a_restarted_worker_stopped_as_it_starts_is_killed_and_restarted(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """As at the first start: the supervisor waited for it without end, and counted it among the workers."""
    gateway = await start_workers(tmp_path, local, server=f", worker_timeout_s: {WORKER_TIMEOUT_S}")
    try:
        first, _ = children(gateway.process.pid)
        os.kill(first, signal.SIGKILL)
        await gateway.wait_for_line("restarting")
        async with asyncio.timeout(20):
            while True:  # its replacement, once made
                replacement = [pid for pid in children(gateway.process.pid) if worker_index(pid) == 1]
                if replacement:
                    break
                await asyncio.sleep(0.01)
        os.kill(replacement[0], signal.SIGSTOP)
        line = await gateway.wait_for_line("has not started to serve within", within_s=4 * WORKER_TIMEOUT_S)
        assert f"(pid {replacement[0]})" in line
        async with asyncio.timeout(30):
            # Two workers, the supervisor, and the worker started a third time.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await call_on_new_connections(gateway.target, 16)) == 16
    finally:
        assert await stop(gateway) == 0


async def test_a_worker_in_its_restart_back_off_holds_up_no_other(tmp_path: Path, local: FakeUpstream) -> None:
    """A worker that keeps dying waits out its back-off alone: another that dies meanwhile is seen and restarted on
    its own schedule, not after the first one's restart."""
    gateway = await start_workers(tmp_path, local)
    try:
        backing_off, other = children(gateway.process.pid)
        backing_off_index = worker_index(backing_off)
        os.kill(backing_off, signal.SIGKILL)
        assert "restarting it in 1 s" in await gateway.wait_for_line(f"(pid {backing_off}) exited")
        async with asyncio.timeout(20):
            while not (replacement := set(children(gateway.process.pid)) - {other}):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        [replacement_pid] = replacement
        os.kill(replacement_pid, signal.SIGKILL)  # dead young again: its back-off doubles
        assert "restarting it in 2 s" in await gateway.wait_for_line(f"(pid {replacement_pid}) exited")

        os.kill(other, signal.SIGKILL)
        assert "restarting it" in await gateway.wait_for_line(f"(pid {other}) exited")
        # Seen while the first is still in its back-off: before, its death was read only once the first had been
        # restarted, 2 s later.
        assert backing_off_index not in {worker_index(pid) for pid in children(gateway.process.pid)}
        async with asyncio.timeout(20):
            while {worker_index(pid) for pid in children(gateway.process.pid)} != {1, 2}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        assert await stop(gateway) == 0


async def test_a_worker_that_cannot_be_restarted_is_tried_again_while_the_others_serve(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """The supervisor out of file descriptors for a moment (its limit lowered to what it has open): the dead worker's
    new process could not be made, and the supervisor stopped the other worker too and exited 1 with a traceback."""
    gateway = await start_workers(tmp_path, local)
    try:
        supervisor = gateway.process.pid
        dead, other = children(supervisor)
        dead_index = worker_index(dead)
        limit = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{supervisor}/fd")), limit[1]))
        try:
            os.kill(dead, signal.SIGKILL)
            line = await gateway.wait_for_line("could not be started")
            assert f"worker {dead_index} could not be started ([Errno 24] Too many open files); trying again in" in line
            assert len(await call_on_new_connections(gateway.target, 10)) == 10  # the other one serves meanwhile
        finally:
            resource.prlimit(supervisor, resource.RLIMIT_NOFILE, limit)
        async with asyncio.timeout(30):
            # Two workers, the supervisor, and the new worker, tried again once the limit was back.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert other in children(supervisor)
        assert len(await call_on_new_connections(gateway.target, 10)) == 10
    finally:
        assert await stop(gateway) == 0
    assert "Traceback" not in await gateway.output()


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


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
async def test_workers_on_every_address_serve_both_stacks(tmp_path: Path, local: FakeUpstream, host: str) -> None:
    """The supervisor holds the port on [::] for both stacks, as gRPC listens there: the workers bind beside its
    reservation, and serve IPv4 and IPv6 callers alike."""
    port = free_port()
    listen = ("--listen", f"{host}:{port}")
    gateway = await start_server(workers_config(tmp_path), local, "--workers", "2", *listen, port=port)
    try:
        await gateway.wait_listening()
        await gateway.wait_for_line("(2 workers)")
        for target in (f"127.0.0.1:{port}", f"ipv6:[::1]:{port}"):
            assert len(await call_on_new_connections(target, 4)) == 4, target
    finally:
        assert await stop(gateway) == 0


async def test_a_metrics_port_in_use_stops_the_workers_naming_the_field(tmp_path: Path, local: FakeUpstream) -> None:
    """As a single process says it: the supervisor's words left out which setting to change."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        config = tmp_path / "metrics.yaml"
        config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}", metrics_listen: "{listen}"}}\n')
        gateway = await start_server(config, local, "--workers", "2")
        async with asyncio.timeout(20):
            assert await gateway.process.wait() != 0
    assert gateway.process.stderr is not None
    said = (await gateway.process.stderr.read()).decode()
    assert f"cannot serve metrics on {listen}: Address already in use; choose another with server." in said, said


@pytest.mark.parametrize("flags", [("--workers", "2"), ()], ids=["with-workers", "single"])
async def test_a_second_gateway_is_refused_while_the_first_ones_workers_start(
    tmp_path: Path, local: FakeUpstream, flags: tuple[str, ...]
) -> None:
    """Before the first gateway's workers listen, its supervisor's reservation alone holds the port, and refuses a
    second gateway: before, a second supervisor bound beside it, and both served the port."""
    first = await start_server(workers_config(tmp_path), local, "--workers", "2")
    try:
        workers = await made_workers(first)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # held as they start: nothing listens on the port yet
        try:
            config = tmp_path / "second.yaml"
            config.write_text(f'server: {{usage_db: "{tmp_path / "second.db"}", drain_s: 0, grace_period_s: 1}}\n')
            second = await start_server(config, local, *flags, port=first.port)
            try:
                async with asyncio.timeout(20):
                    assert await second.process.wait() != 0
                assert "cannot listen on" in await error_output(second)
            finally:
                await second.stop()
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        await first.wait_listening()
        await first.wait_for_line("(2 workers)")
        assert len(await call_on_new_connections(first.target, 4)) == 4
    finally:
        assert await stop(first) == 0


def time_waits(port: int) -> int:
    """Connections in TIME_WAIT on local port `port` (IPv4)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if int(row[1].rpartition(":")[2], 16) == port and row[3] == "06")


def leave_time_wait(port: int, reuse_port: bool) -> None:
    """What a server stopped a moment ago can leave on its port for a minute: a connection it closed first, in
    TIME_WAIT. Its socket had SO_REUSEADDR, as gRPC sets it, and SO_REUSEPORT if it was a worker."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            connection, _ = server.accept()
            connection.close()
            assert client.recv(1) == b""  # the server's end of the connection has gone through
    assert time_waits(port) > 0


@pytest.mark.parametrize("reuse_port", [True, False], ids=["after-workers", "after-one-process"])
async def test_a_port_with_connections_in_time_wait_is_reserved(
    tmp_path: Path, local: FakeUpstream, reuse_port: bool
) -> None:
    """A gateway with workers started at once on the port of one just stopped: what the stopped one left in
    TIME_WAIT does not hold the port (a single process's connections neither, which had no SO_REUSEPORT)."""
    port = free_port()
    leave_time_wait(port, reuse_port)
    gateway = await start_server(workers_config(tmp_path), local, "--workers", "2", port=port)
    await gateway.wait_listening()  # one that cannot reserve the port exits before
    try:
        await gateway.wait_for_line("(2 workers)")
        assert len(await call_on_new_connections(gateway.target, 4)) == 4
    finally:
        assert await stop(gateway) == 0


async def test_sigterm_drains_every_worker(tmp_path: Path, local: FakeUpstream) -> None:
    """To the whole process group, as systemd's stop sends it: each worker gets it from there and from its
    supervisor, and drains all the same (two SIGTERMs to a gateway alone mean: stop now)."""
    gateway = await start_workers(tmp_path, local)
    local.inject({"stall_s": 1.5})
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stream = pb.LLMServiceStub(channel).StreamComplete(stream_chat(), timeout=20)
        async with asyncio.timeout(10):
            while not local.chat_requests:  # noqa: ASYNC110 (the stream reached a worker and its upstream)
                await asyncio.sleep(0.02)
        for pid in children(gateway.process.pid):
            os.kill(pid, signal.SIGTERM)
        gateway.process.send_signal(signal.SIGTERM)
        chunks = await read_all(stream)
    assert chunks[-1].usage.completion_tokens > 0  # finished, not cut
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 0


async def test_a_second_signal_to_the_supervisor_stops_every_worker_at_once(
    tmp_path: Path, local: FakeUpstream
) -> None:
    gateway = await start_workers(tmp_path, local, grace_period_s=60)
    local.inject({"stall_s": 60})
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        call = asyncio.ensure_future(pb.LLMServiceStub(channel).Complete(chat(), timeout=60))
        async with asyncio.timeout(10):
            while not local.chat_requests:  # noqa: ASYNC110 (the call reached a worker and its upstream)
                await asyncio.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        await gateway.wait_for_line("stopping 2 workers")
        began = time.monotonic()
        gateway.process.send_signal(signal.SIGINT)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await call
        async with asyncio.timeout(15):
            assert await gateway.process.wait() == 0
    assert time.monotonic() - began < 10, "not the minute of the grace period"
    assert details(cut.value)["ErrorInfo"].reason == "SHUTTING_DOWN"
    assert "or it was told to stop now" in (cut.value.details() or "")
    assert "Traceback" not in await gateway.output()


async def test_sighup_as_the_stop_ends_leaves_it_a_clean_stop(tmp_path: Path, local: FakeUpstream) -> None:
    # `systemctl reload` as a stop ends: the supervisor (and each worker it passed SIGHUP on to) was killed by it once
    # its event loop had closed, after a clean stop.
    gateway = await start_workers(tmp_path, local)
    gateway.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        while gateway.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway.process.pid, signal.SIGHUP)  # not send_signal, which reaps it under asyncio's watcher
            await asyncio.sleep(0.002)
    assert await gateway.process.wait() == 0


async def test_workers_that_do_not_stop_are_killed_after_one_deadline_for_all(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """Workers that ignore SIGTERM are killed once drain_s + grace_period_s, the time a bill's count of the largest
    request may take, and 10 s have passed: once for all of them, not for each in turn (twice that with two)."""
    gateway = await start_workers(tmp_path, local, grace_period_s=0.5)
    for pid in children(gateway.process.pid):
        os.kill(pid, signal.SIGSTOP)  # as a worker whose loop is blocked: SIGTERM does not stop it
    within_s = 0.5 + TokenCounter.count_s_at_most(ServerConfig().max_message_bytes) + EXIT_MARGIN_S
    began = time.monotonic()
    assert await stop(gateway) == 128 + signal.SIGKILL  # not a clean stop: their calls in flight were cut
    took_s = time.monotonic() - began
    assert within_s <= took_s < within_s + 4.5
    assert (await gateway.output()).count(f"did not stop within {within_s:g} s: killing it") == 2


def stopped(pid: int) -> bool:
    """Whether the process has stopped (SIGSTOP): signals sent to it from then on wait, pending. Not as soon as it is
    sent: one that comes first (of a lower number) is taken first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def pending_signals(pid: int) -> set[int]:
    """The signals sent to the process that it has not taken yet (all, while it is stopped)."""
    [mask] = [
        line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("ShdPnd:")
    ]
    return {signum for signum in range(1, 65) if int(mask, 16) >> (signum - 1) & 1}


async def test_a_worker_that_dies_in_its_stop_is_logged_and_fails_the_supervisors_exit(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """Killed as it stops (the OOM killer, a segfault), its calls in flight cut: the supervisor said nothing of it,
    logged "stopped" and exited 0, where a worker that dies while serving is logged, and one that dies as it starts
    gives the supervisor its status (128 + N)."""
    gateway = await start_workers(tmp_path, local)
    held, _ = children(gateway.process.pid)
    index = worker_index(held)
    os.kill(held, signal.SIGSTOP)  # the supervisor's SIGTERM waits for it to go on: it is killed first
    await wait_until(lambda: stopped(held), timeout_s=10)
    gateway.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: signal.SIGTERM in pending_signals(held), timeout_s=10)  # the stop has begun
    os.kill(held, signal.SIGKILL)
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 128 + signal.SIGKILL
    said = [json.loads(line) for line in (await gateway.output()).splitlines() if line.startswith("{")]
    assert [entry["msg"] for entry in said if entry["level"] == "ERROR"] == [
        f"worker {index} (pid {held}) exited with signal SIGKILL as it stopped"
    ], said


@pytest.mark.parametrize(
    ("signum", "after_s"),
    [(signal.SIGTERM, 0.0), (signal.SIGINT, 0.3)],
    ids=["sigterm-as-they-start", "ctrl-c-as-they-load"],
)
async def test_a_signal_to_the_process_group_as_workers_start_is_a_clean_stop(
    tmp_path: Path, local: FakeUpstream, signum: signal.Signals, after_s: float
) -> None:
    """SIGTERM or SIGINT to the supervisor and its workers at once (systemd's stop; Ctrl-C in a terminal) while they
    start: a stop, not a worker that failed to start; and no traceback from the workers still importing the gateway
    (Ctrl-C a moment in: each takes a second or more to import)."""
    gateway = await start_server(workers_config(tmp_path), local, "--workers", "2")
    workers = await made_workers(gateway)
    await asyncio.sleep(after_s)
    for pid in (gateway.process.pid, *workers):
        os.kill(pid, signum)
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 0
    output = await error_output(gateway)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "exited as it started" not in output and '"level":"ERROR"' not in output


async def test_a_worker_killed_as_it_starts_stops_the_supervisor_with_128_plus_the_signal(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """As a shell reports a process killed by a signal: 137 for SIGKILL, not 247 (its negative status, modulo 256)."""
    gateway = await start_server(workers_config(tmp_path), local, "--workers", "2")
    first, _ = await made_workers(gateway)
    os.kill(first, signal.SIGKILL)
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 128 + signal.SIGKILL
    assert "exited as it started (signal SIGKILL); stopping" in await error_output(gateway)


# Runs llmrelay-server (argv[2:]) as if the interpreter that started it were gone since (an upgrade that replaced
# it): sys.executable, which a worker's command line names, is argv[1], a file that is not there.
_INTERPRETER_GONE = (
    "import runpy, sys; sys.executable = sys.argv[1]; sys.argv = sys.argv[2:];"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)


async def test_workers_that_cannot_be_started_stop_the_supervisor_in_one_line(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """No worker's process can be made (its exec fails): the supervisor exits 1 saying so, not with a traceback."""
    gateway = await spawn_gateway(
        workers_config(tmp_path),
        "--workers",
        "2",
        env=clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1"), LLMRELAY_OLLAMA_MODEL="tiny"),
        under=(sys.executable, "-c", _INTERPRETER_GONE, str(tmp_path / "python-gone")),
    )
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 1
    output = await error_output(gateway)
    [line] = output.splitlines()
    assert json.loads(line)["msg"] == "worker 1 could not be started ([Errno 2] No such file or directory); stopping"


async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path, local: FakeUpstream) -> None:
    gateway = await start_workers(tmp_path, local)
    workers = children(gateway.process.pid)
    gateway.process.kill()
    await gateway.process.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


async def test_workers_stop_when_their_supervisor_is_killed_as_they_start(tmp_path: Path, local: FakeUpstream) -> None:
    """Killed before its workers serve, the supervisor is gone before they first look at their parent: they compare
    it with the pid it gave them, not with the parent they find then (init, which they would watch forever)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    gateway = await start_server(workers_config(tmp_path), local, "--workers", "2", env={"TMPDIR": str(temporary)})
    workers = await made_workers(gateway)
    gateway.process.kill()  # not waited for: its wait() ends only once its workers, which share its stderr, are gone
    try:
        assert not list(temporary.glob("llmrelay-workers-*/worker-*.json"))  # none had started to serve
        async with asyncio.timeout(20):
            while any(alive(pid) for pid in workers):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await gateway.process.wait()
    assert "is gone: stopping" in await error_output(gateway)


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


@pytest.mark.parametrize(
    ("flags", "env", "field"),
    [
        ((), {"LLMRELAY_WORKERS": "²"}, "LLMRELAY_WORKERS"),
        (("--listen", "127.0.0.1:²"), {}, "--listen (LLMRELAY_LISTEN)"),
    ],
    ids=["workers", "listen"],
)
async def test_a_number_in_other_digits_is_refused_in_one_line(
    tmp_path: Path, local: FakeUpstream, flags: tuple[str, ...], env: dict[str, str], field: str
) -> None:
    """'²' is a digit to str.isdigit() but not to int(): refused as any other wrong value, not with a traceback."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}"}}\n')
    gateway = await start_server(config, local, *flags, env=env)
    async with asyncio.timeout(20):
        assert await gateway.process.wait() == 1
    error = await error_output(gateway)
    assert f"llmrelay-server: configuration error: {field}: " in error and "Traceback" not in error
