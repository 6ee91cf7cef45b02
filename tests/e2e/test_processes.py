"""The console commands as a user runs them: `llmrelay-server` in its own process, `llmrelay` at a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import BIN, GatewayProcess, clean_env, free_port, spawn_gateway
from llmrelay import AsyncClient, Client, InvalidArgumentError, UnauthenticatedError, UnavailableError
from llmrelay import v1 as pb
from llmrelay.cli import main as cli_main
from support import (
    OPENAI_TEST_KEY,
    call_with_raw_path,
    chat,
    details,
    finished,
    read_all,
    start_server,
    stream_chat,
    wait_until,
)
from upstream import FakeUpstream


@contextlib.asynccontextmanager
async def started(tmp_path: Path, local: FakeUpstream, server: str, rest: str = "") -> AsyncIterator[GatewayProcess]:
    """`llmrelay-server` with these fields of the server section (and `rest` of the file), listening; killed after
    if it has not stopped by itself."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{{server}, usage_db: "{tmp_path}/usage.db"}}\n{rest}')
    process = await start_server(config, local)
    try:
        await process.wait_listening()
        yield process
    finally:
        if process.process.returncode is None:
            process.process.kill()
            await process.process.wait()


@pytest.fixture
async def server(tmp_path: Path, local: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    async with started(tmp_path, local, "grace_period_s: 5", "router: {retry: {max_retries: 0}}\n") as server:
        yield server


@pytest.fixture
async def short_grace_server(tmp_path: Path, local: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    """Draining for 0.2 s, then a grace period of 1 s: calls in flight outlast it."""
    async with started(tmp_path, local, "drain_s: 0.2, grace_period_s: 1") as server:
        yield server


async def test_a_gateway_whose_grpc_server_ends_by_itself_stops_and_exits_one(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """grpcio's loop that takes calls ends on a method's name that is no UTF-8, sent by anyone who reaches the port
    (no key asked), and closes the port: the process went on, its metrics and a supervisor's heartbeat too, serving
    nothing until someone restarted it by hand. It now stops, saying why, and exits 1 for its restart; at once, not
    after its drain, which is for callers to move away from a port that still takes calls."""
    async with started(tmp_path, local, "drain_s: 60") as server:
        await asyncio.to_thread(call_with_raw_path, server.port, b"/\xff")
        async with asyncio.timeout(15):
            assert await server.process.wait() == 1
        output = await server.output()
    assert "gRPC's server stopped taking calls by itself (UnicodeDecodeError" in output, output
    assert "shutting down: NOT_SERVING for 0 s" in output, output
    assert any(line.endswith(" stopped") for line in output.splitlines()), output  # its stop ran to its end


async def test_sigterm_drains_calls_in_flight_and_exits_zero(
    server: GatewayProcess, local: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    local.inject({"trickle_s": 0.3})
    async with grpc.aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        ).status == health_pb2.HealthCheckResponse.SERVING
        stream = pb.LLMServiceStub(channel).StreamComplete(stream_chat("one two three four five"), timeout=20)
        first = cast(pb.StreamCompleteResponse, await stream.read())
        assert first.backend == "ollama"
        server.process.send_signal(signal.SIGTERM)
        # Health says NOT_SERVING at once, and new calls are refused, while the stream in flight goes on.
        status = health_pb2.HealthCheckResponse.SERVING
        while status == health_pb2.HealthCheckResponse.SERVING:
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # So does the gateway's own Health, which `llmrelay health` and the SDKs read: its backends are fine.
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
        assert not report.serving
        assert [backend.reachable for backend in report.backends] == [True]
        # `llmrelay health` said "serving: no" over backends all well, and nothing of its stores.
        with pytest.raises(SystemExit) as exited:
            await asyncio.to_thread(cli_main, ["--target", server.target, "health"])
        assert exited.value.code == 1
        said = capsys.readouterr().out.splitlines()
        assert said[0] == "serving: no (shutting down)", said
        assert [line.split()[:3] for line in said if line.startswith("usage ledger")] == [
            ["usage", "ledger", "available"]
        ], said
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(refused.value)["ErrorInfo"].reason == "SHUTTING_DOWN"
        rest = await read_all(stream)
    text = first.delta.content + "".join(c.delta.content for c in rest)
    assert text == "echo: one two three four five"
    assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
    assert await asyncio.wait_for(server.process.wait(), 10) == 0


async def test_health_goes_not_serving_during_shutdown(server: GatewayProcess, local: FakeUpstream) -> None:
    local.inject({"trickle_s": 0.5})
    async with grpc.aio.insecure_channel(server.target) as channel:
        stream = pb.LLMServiceStub(channel).StreamComplete(stream_chat("a b c d"), timeout=20)
        await stream.read()
        # A second channel watches health, as a load balancer's would.
        async with grpc.aio.insecure_channel(server.target) as watcher:
            watch = health_pb2_grpc.HealthStub(watcher).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            server.process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await read_all(stream)
    assert await asyncio.wait_for(server.process.wait(), 10) == 0


def use_blocking_client(target: str) -> None:
    with Client(target, caller="sdk-test") as client:
        answer = client.complete([{"role": "user", "content": "sync hello"}], max_tokens=20, temperature=0.2)
        assert answer.message.content == "echo: sync hello"
        pieces = [c.delta.content for c in client.stream([{"role": "user", "content": "a b c"}])]
        assert "".join(pieces) == "echo: a b c"
        assert client.count_tokens(text="hello world").token_count > 0
        assert client.health().backends[0].name == "ollama"
        with pytest.raises(InvalidArgumentError) as caught:
            client.complete([])
        assert [v.field for v in caught.value.field_violations] == ["messages"]
        assert caught.value.reason == "INVALID_REQUEST"
        records = client.get_usage(pb.GetUsageRequest(caller="sdk-test")).records
        assert sum(r.requests for r in records) == 2


async def test_python_sdk_against_the_server_process(server: GatewayProcess) -> None:
    # The blocking client runs in a thread: the loopback upstream shares this test's event loop.
    await asyncio.to_thread(use_blocking_client, server.target)

    async with AsyncClient(server.target) as aclient:
        answer = await aclient.complete([{"role": "user", "content": "async hello"}])
        assert answer.message.content == "echo: async hello"
        pieces = [c.delta.content async for c in aclient.stream([{"role": "user", "content": "x y"}])]
        assert "".join(pieces) == "echo: x y"


async def test_sdk_raises_unavailable_with_retry_info(server: GatewayProcess, local: FakeUpstream) -> None:
    local.inject({"status": 503})
    # No service config: the channel would retry UNAVAILABLE itself, and the error the SDK raises is under test here.
    async with AsyncClient(server.target, service_config=None) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.complete([{"role": "user", "content": "x"}])
    assert caught.value.reason == "BACKENDS_UNAVAILABLE"
    assert caught.value.retry_delay_s is not None and caught.value.retry_delay_s > 0


async def test_a_stalled_upstream_ends_each_call_at_its_deadline(server: GatewayProcess, local: FakeUpstream) -> None:
    """The server's event loop (uvloop) may fire the deadline's timer a little early: that is still the deadline, not
    a backend gone silent (which would answer UNAVAILABLE, and count against the backend)."""
    calls = 20
    local.inject(*[{"stall_s": 5}] * calls)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        codes = []
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Complete(chat(), timeout=0.2)
            codes.append(caught.value.code())
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * calls


async def test_cli_streams_tokens_and_counts(server: GatewayProcess) -> None:
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay",
        "--target",
        server.target,
        "stream",
        "hello from the terminal",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "echo: hello from the terminal"
    assert "ollama/tiny" in err.decode() and "stop" in err.decode()

    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay",
        "--target",
        server.target,
        "tokens",
        "hello world",
        "--model",
        "gpt-4o",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    assert out.decode().strip() == "2 tokens (gpt-4o, o200k_base, exact)"


async def test_bad_configuration_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text('llm:\n  openai: {api_key: "${OPENAI_API_KEY}", base_url: "ftp://nowhere"}\n')
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server",
        "--config",
        str(config),
        env=clean_env(OPENAI_API_KEY=OPENAI_TEST_KEY),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode != 0
    message = err.decode()
    # Which part is wrong, not the value, which could hold a secret (a key given as the URL through the wrong ${VAR}).
    assert "llm.openai.base_url: not an http(s) URL (its scheme is 'ftp')" in message
    assert OPENAI_TEST_KEY not in message


async def test_ctrl_c_while_the_gateway_loads_ends_it_quietly(tmp_path: Path, local: FakeUpstream) -> None:
    """Its modules take half a second or more to import: Ctrl-C then is a stop, 130 as a shell reports Ctrl-C, without
    a traceback of wherever the import had got to."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}"}}\n')
    # Python writes a line as each import ends (-X importtime), which tells when the gateway is loading: a fixed wait
    # raced the imports, and on a quick machine they were done before it.
    gateway = await start_server(config, local, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert gateway.process.stderr is not None
    said: list[bytes] = []
    async with asyncio.timeout(20):
        # Past the gateway's __main__, whose main() puts its handler of Ctrl-C in place before it loads the rest: the
        # next line is the first of those imports, and some hundreds of milliseconds of them are still to come.
        while not said or not said[-1].rstrip().endswith(b" llmrelay_server.__main__"):
            said.append(line := await gateway.process.stderr.readline())
            assert line, b"".join(said).decode()
        said.append(await gateway.process.stderr.readline())
    gateway.process.send_signal(signal.SIGINT)
    async with asyncio.timeout(20):
        assert await gateway.process.wait() == 128 + signal.SIGINT
    output = (b"".join(said) + await gateway.process.stderr.read()).decode()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "listening on" not in output  # stopped as it loaded, not after


async def refused_start(
    listen: str, local: FakeUpstream, usage_db: Path, *flags: str, unprivileged: bool = False
) -> tuple[int | None, str]:
    """A gateway started to listen on `listen` (with `flags`), expected to stop at once: its exit status and what it
    wrote. `unprivileged`: without the privilege of binding a port below 1024 (root's dropped, by capsh)."""
    run: list[str | Path] = [BIN / "llmrelay-server", "--listen", listen, *flags]
    if unprivileged and os.geteuid() == 0:
        run = ["capsh", "--drop=cap_net_bind_service", "--", "-c", 'exec "$0" "$@"', *run]
    gateway = await asyncio.create_subprocess_exec(
        *run,
        env=clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1"), LLMRELAY_USAGE_DB=str(usage_db)),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await finished(gateway)
    return gateway.returncode, err.decode()


async def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it(
    server: GatewayProcess, tmp_path: Path, local: FakeUpstream
) -> None:
    returncode, err = await refused_start(server.target, local, tmp_path / "second.db")
    assert returncode == 1
    assert f"cannot listen on {server.target}" in err
    # Every call still reaches the first server, which keeps serving.
    async with AsyncClient(server.target) as client:
        answers = [await client.complete([{"role": "user", "content": f"still here {i}"}]) for i in range(5)]
    assert [a.message.content for a in answers] == [f"echo: still here {i}" for i in range(5)]


async def test_a_port_that_takes_a_privilege_the_gateway_lacks_is_said_so(tmp_path: Path, local: FakeUpstream) -> None:
    """It was said to be in use or not an address of this machine, after a line of gRPC's own."""
    returncode, err = await refused_start("127.0.0.1:1", local, tmp_path / "u.db", unprivileged=True)
    assert returncode == 1
    assert "cannot listen on 127.0.0.1:1: permission denied (a port below 1024 takes a privilege" in err, err
    assert "add_port" not in err


@pytest.mark.parametrize("taken", ["127.0.0.1", "::1"])
async def test_localhost_with_either_loopback_taken_fails_instead_of_serving_the_other(
    tmp_path: Path, local: FakeUpstream, taken: str
) -> None:
    """gRPC takes localhost for both loopbacks, binds those it can, and serves on them alone: a gateway whose port
    another process held on 127.0.0.1 started on ::1, and callers of localhost reached the other process."""
    family = socket.AF_INET6 if ":" in taken else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.bind((taken, 0))
        holder.listen()
        listen = f"localhost:{holder.getsockname()[1]}"
        returncode, err = await refused_start(listen, local, tmp_path / "u.db")
    assert returncode == 1
    assert f"cannot listen on {listen}: the address is in use" in err


WORKERS = [(), ("--workers", "2")]
WORKERS_IDS = ["single", "with-workers"]


@pytest.mark.parametrize("flags", WORKERS, ids=WORKERS_IDS)
@pytest.mark.parametrize("holder", ["[::1]", "[::] (IPv6 alone)"])
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
async def test_every_address_with_the_port_taken_on_ipv6_fails_instead_of_serving_ipv4_alone(
    tmp_path: Path, local: FakeUpstream, host: str, holder: str, flags: tuple[str, ...]
) -> None:
    """gRPC listens on [::] for 0.0.0.0 and [::], both stacks on one socket, and where that bind fails it listens on
    0.0.0.0 alone without a word: a gateway whose port another process held on IPv6 started, said it listened, and
    callers of the port over IPv6 (localhost on many systems, IPv6 pods) reached the other process. Only 0.0.0.0 was
    checked (by the supervisor's reservation too)."""
    port = free_port()  # free on IPv4
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        other.bind(("::1" if holder == "[::1]" else "::", port))
        other.listen()
        listen = f"{host}:{port}"
        returncode, err = await refused_start(listen, local, tmp_path / "u.db", *flags)
    assert returncode == 1, err
    assert f"cannot listen on {listen}: the address is in use (another llmrelay-server?); choose another" in err, err


@pytest.mark.parametrize("flags", WORKERS, ids=WORKERS_IDS)
@pytest.mark.parametrize(
    ("listen", "said"),
    [
        ("nosuch.invalid:0", "its host does not resolve"),
        ("203.0.113.9:0", "203.0.113.9 is not an address of this machine"),
        ("203.0.113.9:port", "203.0.113.9 is not an address of this machine"),
        ("[2001:db8::9]:0", "[2001:db8::9] is not an address of this machine"),
    ],
)
async def test_an_address_that_cannot_be_served_for_another_reason_than_a_taken_port_is_said_so(
    tmp_path: Path, local: FakeUpstream, listen: str, said: str, flags: tuple[str, ...]
) -> None:
    """Each was said to be "in use (another llmrelay-server?)" by a gateway of one process (gRPC says no more than
    that its bind failed), and port 0 and an address not this machine's by a supervisor of workers too."""
    listen = listen.replace("port", str(free_port()))
    returncode, err = await refused_start(listen, local, tmp_path / "u.db", *flags)
    assert returncode == 1, err
    assert f"cannot listen on {listen}: {said}" in err, err
    assert "in use" not in err, err


@pytest.mark.parametrize("listen", ["unix:/tmp/llmrelay.sock", "unix:///tmp/llmrelay.sock", "unix-abstract:llmrelay"])
async def test_a_unix_socket_to_listen_on_is_refused_as_one(tmp_path: Path, local: FakeUpstream, listen: str) -> None:
    """It was refused as "not HOST:PORT (its port is not a number from 0 to 65535)", its path read as the port."""
    returncode, err = await refused_start(listen, local, tmp_path / "u.db")
    assert returncode == 1, err
    said = "--listen (LLMRELAY_LISTEN): unix sockets are not served; listen on HOST:PORT (e.g. 127.0.0.1:50051)"
    assert said in err, err


@pytest.mark.parametrize("taken", ["127.0.0.1", "::1"])
async def test_metrics_on_localhost_with_either_loopback_taken_fails_instead_of_serving_the_other(
    tmp_path: Path, local: FakeUpstream, taken: str
) -> None:
    """/metrics on localhost was served at the first address getaddrinfo gave it alone (::1 where /etc/hosts names it
    localhost too): a Prometheus scraping the other loopback was refused, or reached another process holding it."""
    port = free_port()
    family = socket.AF_INET6 if ":" in taken else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.bind((taken, port))
        holder.listen()
        config = tmp_path / "llmrelay.yaml"
        config.write_text(f'server: {{usage_db: "{tmp_path}/u.db", metrics_listen: "localhost:{port}"}}\n')
        gateway = await start_server(config, local)
        _, err = await finished(gateway.process)
    assert gateway.process.returncode == 1, err
    said = f"cannot serve metrics on localhost:{port}: Address already in use; choose another with server."
    assert said in err.decode(), err


async def test_metrics_on_localhost_are_served_at_both_loopbacks(tmp_path: Path, local: FakeUpstream) -> None:
    async with started(tmp_path, local, 'metrics_listen: "localhost:0"') as gateway:
        line = await gateway.wait_for_line("metrics on http://localhost:")
        port = int(line.partition("metrics on http://localhost:")[2].partition("/")[0])
        for address in ("127.0.0.1", "[::1]"):
            body = await asyncio.to_thread(read_page, f"http://{address}:{port}/metrics")
            assert "grpc_server_started_total" in body, address


def read_page(url: str) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as page:
        return str(page.read().decode())


async def test_a_start_that_fails_says_why_in_json_when_the_log_is_json(
    server: GatewayProcess, tmp_path: Path, local: FakeUpstream
) -> None:
    # The one line that says why a gateway did not start was plain text in a JSON log: a collector parsing JSON
    # dropped it, or kept it apart from the gateway's lines.
    config = tmp_path / "second.yaml"
    for text in (
        f'server: {{log_format: json, usage_db: "{tmp_path}/second.db"}}\n',  # the port is taken
        f'server: {{log_format: json, usage_db: "{tmp_path}", listen: "127.0.0.1:0"}}\n',  # a directory
    ):
        config.write_text(text)
        listen = ("--listen", server.target) if "listen" not in text else ()
        second = await asyncio.create_subprocess_exec(
            BIN / "llmrelay-server",
            *listen,
            "--config",
            str(config),
            env=clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1")),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 1
        # gRPC's C core writes a line of its own, in its own format, when its bind fails: not the gateway's.
        lines = [line for line in err.decode().splitlines() if "add_port.cc" not in line]
        entries = [json.loads(line) for line in lines]
        assert [entry["level"] for entry in entries] == ["ERROR"]
        assert entries[0]["msg"].startswith(("cannot listen on", "configuration error: server.usage_db")), entries


async def test_sigterm_loses_no_usage(server: GatewayProcess, tmp_path: Path, local: FakeUpstream) -> None:
    async with AsyncClient(server.target, caller="durable") as client:
        answers = [await client.complete([{"role": "user", "content": f"n {i}"}]) for i in range(25)]
    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.process.wait(), 10) == 0
    # A new gateway on the same ledger file reads back every token.
    restarted = await start_server(tmp_path / "llmrelay.yaml", local)
    try:
        await restarted.wait_listening()
        async with AsyncClient(restarted.target) as client:
            records = (await client.get_usage(pb.GetUsageRequest(caller="durable"))).records
    finally:
        restarted.process.terminate()
        await restarted.process.wait()
    assert sum(r.requests for r in records) == 25
    assert sum(r.total_tokens for r in records) == sum(a.usage.total_tokens for a in answers)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
async def test_a_signal_as_the_stop_ends_leaves_it_a_clean_stop(server: GatewayProcess, signum: signal.Signals) -> None:
    # A second Ctrl-C, or `systemctl reload` as the stop ends. The event loop's close gave the signals back their
    # default actions, and one then killed the process after its clean stop: status 129, 130 or 143, not 0.
    server.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        while server.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signum)  # not send_signal, which reaps it under asyncio's watcher
            await asyncio.sleep(0.002)
    assert await server.process.wait() == 0
    assert "Traceback" not in await server.output()


async def test_a_stream_cut_off_at_the_stop_is_billed_though_its_prompt_takes_a_while_to_count(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """Their upstream gave no usage: each bill counts its prompt offline (megabytes: a second or more), which the stop
    waited for only as long as the grace period (here 0.2 s), then closed the ledger under them: the calls were never
    billed, and the bills' refusals by the closed ledger were logged as tracebacks."""
    async with started(tmp_path, local, "drain_s: 0, grace_period_s: 0.2") as server:
        letters = random.Random(7)
        words = ["".join(letters.choices("abcdefghijklmnopqrstuvwxyz", k=letters.randint(2, 9))) for _ in range(5000)]
        async with grpc.aio.insecure_channel(server.target) as channel:
            calls = []
            for _ in range(3):  # 3 MB each, counted one beside the other: some seconds of counting in all
                local.inject({"trickle_s": 1.0, "no_usage": True})
                prompt = " ".join(letters.choice(words) for _ in range(500_000))
                calls.append(call := pb.LLMServiceStub(channel).StreamComplete(stream_chat(prompt), timeout=60))
                await call.read()  # the stream has begun
            server.process.send_signal(signal.SIGTERM)
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError):
                    while await call.read() != grpc.aio.EOF:
                        pass
        assert await asyncio.wait_for(server.process.wait(), 60) == 0
        output = await server.output()
    assert "Traceback" not in output and "still being billed" not in output, output
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as ledger:
        billed = ledger.execute("SELECT requests, interrupted_requests, prompt_tokens FROM usage_buckets").fetchall()
    assert len(billed) == 1 and billed[0][:2] == (3, 3) and billed[0][2] > 300_000, billed


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_gateway_started_with_sigint_ignored_keeps_it_ignored(
    tmp_path: Path, local: FakeUpstream, workers: str
) -> None:
    """As a shell starts a script's background jobs (`llmrelay-server &`), so that Ctrl-C at the terminal stops only
    the command in the foreground: the gateway put its own handler in place once it served, and Ctrl-C stopped it."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{drain_s: 0, usage_db: "{tmp_path}/usage.db"}}\n')
    gateway = await start_server(config, local, "--workers", workers, interruptible=False)
    try:
        await gateway.wait_listening()
        gateway.process.send_signal(signal.SIGINT)
        with pytest.raises(TimeoutError):
            await gateway.wait_for_line("shutting down", within_s=1)
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            assert (await pb.LLMServiceStub(channel).Complete(chat(), timeout=10)).message.content
        assert await gateway.stop() == 0  # SIGTERM stops it, as ever
    finally:
        await gateway.stop()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_each_event_loop_takes_the_stop_and_the_stop_now(
    tmp_path: Path, local: FakeUpstream, event_loop: str
) -> None:
    """The signals' handlers are the process's own, not the loop's: uvloop runs them as it reads their wakeup fd,
    asyncio's loop as a signal interrupts its wait. Each must still take the stop (SIGTERM, into a 60 s drain) and
    the second signal's stop now, on an idle gateway where nothing else wakes the loop."""
    async with started(tmp_path, local, f"event_loop: {event_loop}, drain_s: 60") as server:
        server.process.send_signal(signal.SIGTERM)
        await server.wait_for_line("shutting down", within_s=5)
        await asyncio.sleep(0.5)  # idle, in its drain
        server.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(server.process.wait(), 5) == 0
        output = await server.output()
    assert "stopping now" in output and output.rstrip().endswith("stopped"), output


async def test_sigterm_while_the_first_probe_runs_stops_at_once_and_a_second_one_stops_now(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """The port opens before the first probe of the backends ends (up to PROBE_TIMEOUT_S): SIGTERM then waited for
    the probe, liveness SERVING and new calls taken meanwhile, and a second one was lost, the whole drain run."""
    local.probe_delay_s = 3.0  # each of Ollama's two probe requests
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{drain_s: 30, grace_period_s: 30, usage_db: "{tmp_path}/usage.db"}}\n')
    server = await start_server(config, local)
    try:
        await server.wait_serving()  # alive from the moment the port opens
        assert "listening on" not in server.text(), "the first probe had ended"
        server.process.send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health_pb2.HealthCheckResponse.SERVING
            async with asyncio.timeout(2):  # not when the probe ends
                while status == health_pb2.HealthCheckResponse.SERVING:
                    status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        assert details(refused.value)["ErrorInfo"].reason == "SHUTTING_DOWN"
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 10) == 0, "not the drain's 30 s"
    finally:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()
    log = await server.output()
    assert "stopping now" in log and "Traceback" not in log, log
    assert "no backend is reachable" not in log, "said of backends whose probe the stop cut short"


async def test_a_background_probe_out_at_the_stop_ends_quietly(tmp_path: Path, local: FakeUpstream) -> None:
    """The stop closed the backends' clients under a probe still out, which then found its backend unreachable, and
    said so in the log of a clean stop."""
    async with started(tmp_path, local, "drain_s: 0, health_interval_s: 1") as server:
        local.probe_delay_s = 5.0
        sent = len(local.probe_requests)
        await wait_until(lambda: len(local.probe_requests) > sent, timeout_s=5)  # the next background probe is out
        assert await server.stop() == 0
    log = await server.output()
    assert "unreachable" not in log and "Traceback" not in log, log


async def test_a_health_probe_asked_in_the_drain_probes_no_upstream(tmp_path: Path, local: FakeUpstream) -> None:
    """Health(probe=true) in the drain (`llmrelay health --probe`) sent every upstream a probe from a gateway going
    away, which the backends' clients, closed under it, cut: "backend ollama is unreachable" in a clean stop's log."""
    async with started(tmp_path, local, "drain_s: 1, health_interval_s: 3600") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb.LLMServiceStub(channel)
            await stub.Health(pb.HealthRequest(probe=True), timeout=5)
            sent = len(local.probe_requests)
            local.probe_delay_s = 3.0
            server.process.send_signal(signal.SIGTERM)
            await wait_until(lambda: "shutting down" in server.text(), timeout_s=5)
            report = await stub.Health(pb.HealthRequest(probe=True), timeout=5)
        assert [backend.reachable for backend in report.backends] == [True]  # as known
        assert len(local.probe_requests) == sent
        assert await asyncio.wait_for(server.process.wait(), 10) == 0
    log = await server.output()
    assert "unreachable" not in log and "Traceback" not in log, log


async def test_no_backend_reachable_at_start_says_why_of_each(tmp_path: Path, local: FakeUpstream) -> None:
    """The log said "backend vllm_box is unreachable" without why (the Health RPC alone had it), then told the
    operator of configured backends to set OPENAI_API_KEY or start Ollama, advice for a first run."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    local.models_status = 401
    configured = (
        f'llm:\n  ollama: {{base_url: "{down}", model: tiny}}\n'
        f'  backends:\n    - {{name: vllm_box, kind: vllm, base_url: "{local.base_url}", model: tiny}}\n'
    )

    async def start_log(rest: str) -> str:
        config = tmp_path / "llmrelay.yaml"
        config.write_text(f'server: {{usage_db: "{tmp_path}/usage.db"}}\n{rest}')
        server = await spawn_gateway(config, env=clean_env())
        try:
            await server.wait_listening()
            await wait_until(lambda: "no backend is reachable" in server.text(), timeout_s=5)
        finally:
            assert await server.stop() == 0
        return server.text()

    for rest, first_run in ((configured, False), (f'llm:\n  ollama: {{base_url: "{down}", model: tiny}}\n', True)):
        log = await start_log(rest)
        assert f"backend ollama is unreachable: {down}: ConnectError: cannot connect to {down}" in log, log
        assert f"no backend is reachable (ollama: {down}: ConnectError" in log
        if first_run:
            assert "): set OPENAI_API_KEY, or start Ollama" in log
        else:
            assert "backend vllm_box is unreachable: HTTP 401: " in log
            assert "; vllm_box: HTTP 401: " in log and "OPENAI_API_KEY" not in log


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
async def test_a_second_signal_skips_the_rest_of_the_drain_and_the_grace_period(
    tmp_path: Path, local: FakeUpstream, second: signal.Signals
) -> None:
    """Ctrl-C again, or a second SIGTERM: the gateway stops now rather than after drain_s and grace_period_s (here a
    minute), which nothing but SIGKILL could cut short. The call still running ends with the gateway's status."""
    async with started(tmp_path, local, "drain_s: 30, grace_period_s: 30") as server:
        local.inject({"stall_s": 60})
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = asyncio.ensure_future(pb.LLMServiceStub(channel).Complete(chat(), timeout=60))
            await wait_until_requests(local, 1)
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_line("shutting down")
            began = time.monotonic()
            server.process.send_signal(second)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await call
            assert await asyncio.wait_for(server.process.wait(), 15) == 0
        assert time.monotonic() - began < 10
    assert (cut.value.code(), details(cut.value)["ErrorInfo"].reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    log = await server.output()
    assert "stopping now: calls in flight end with SHUTTING_DOWN" in log and "Traceback" not in log


async def test_graceful_shutdown_under_load(server: GatewayProcess, local: FakeUpstream) -> None:
    local.inject(*[{"trickle_s": 0.2}] * 40)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        streams = [stub.StreamComplete(stream_chat(f"load {i} a b c"), timeout=30) for i in range(40)]
        firsts = [cast(pb.StreamCompleteResponse, f) for f in await asyncio.gather(*(s.read() for s in streams))]
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(), timeout=5)
        rests = await asyncio.gather(*(read_all(s) for s in streams))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for i, (first, rest) in enumerate(zip(firsts, rests, strict=True)):
        assert first.delta.content + "".join(c.delta.content for c in rest) == f"echo: load {i} a b c"
    assert await asyncio.wait_for(server.process.wait(), 10) == 0


async def test_calls_still_running_when_the_grace_period_ends_get_the_gateways_status(
    short_grace_server: GatewayProcess, local: FakeUpstream
) -> None:
    server = short_grace_server
    local.inject({"trickle_s": 0.5}, {"stall_s": 30})
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        stream = stub.StreamComplete(stream_chat("a long answer " * 10), timeout=30)
        await stream.read()  # it has started
        unary = asyncio.ensure_future(stub.Complete(chat(), timeout=30))
        await wait_until_requests(local, 2)
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await read_all(stream)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary
    # A stream that has sent text cannot simply be retried: ABORTED; the unary call can: UNAVAILABLE.
    for error, code in ((cut.value, grpc.StatusCode.ABORTED), (refused.value, grpc.StatusCode.UNAVAILABLE)):
        assert error.code() == code, error.details()
        found = details(error)
        assert found["ErrorInfo"].reason == "SHUTTING_DOWN"
        assert "RetryInfo" in found
    assert await asyncio.wait_for(server.process.wait(), 10) == 0
    assert "Traceback" not in await server.output()


async def test_fast_streams_when_the_grace_period_ends_get_the_gateways_status(
    short_grace_server: GatewayProcess, local: FakeUpstream
) -> None:
    # A fast stream's task is mostly in gRPC's hands, sending a message. Cancelled there, gRPC dropped the call
    # without a status, and its caller got gRPC's own cut half a second later: UNAVAILABLE "Cancelling all calls",
    # without SHUTTING_DOWN or RetryInfo.
    server = short_grace_server
    local.inject(*[{"trickle_s": 0.002}] * 4)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        streams = [stub.StreamComplete(stream_chat("word " * 5000), timeout=30) for _ in range(4)]
        for stream in streams:
            await stream.read()
        server.process.send_signal(signal.SIGTERM)
        ends = await asyncio.gather(*(read_all(stream) for stream in streams), return_exceptions=True)
    for end in ends:
        assert isinstance(end, grpc.aio.AioRpcError), "a stream of 5000 words at 2 ms each outlasts the grace"
        assert end.code() == grpc.StatusCode.ABORTED, end.details()
        assert details(end)["ErrorInfo"].reason == "SHUTTING_DOWN"
    assert await asyncio.wait_for(server.process.wait(), 10) == 0


@pytest.mark.parametrize("deadline", [30, None], ids=["deadline", "no-deadline"])
async def test_streams_whose_callers_stopped_reading_are_billed_when_the_gateway_stops(
    tmp_path: Path, local: FakeUpstream, deadline: float | None
) -> None:
    """Callers that stopped reading long answers as the gateway stops: their streams wait in gRPC's write when the
    grace period ends. Each ends with the gateway's status behind what gRPC holds for its caller, and is billed
    before the ledger closes, with nothing logged as an error. (gRPC cut them in its write, and their layers were
    closed by the loop's hook only later, after the ledger: every bill was lost.)"""
    async with started(tmp_path, local, "drain_s: 0.2, grace_period_s: 1, log_calls: true") as server:
        local.inject(*[{"huge_content": 20_000_000, "no_usage": True}] * 2)
        async with grpc.aio.insecure_channel(server.target) as channel:
            calls = [pb.LLMServiceStub(channel).StreamComplete(stream_chat(f"s{i}"), timeout=deadline) for i in (1, 2)]
            for call in calls:
                await call.read()
            await asyncio.sleep(1)  # the gateway fills gRPC's buffers and waits to write
            server.process.send_signal(signal.SIGTERM)
            exited = await asyncio.wait_for(server.process.wait(), 10)
        output = await server.output()
        assert exited == 0, output
    lines = [
        dict(field.split("=", 1) for field in line.split() if "=" in field)
        for line in output.splitlines()
        if "rpc=llmrelay.v1.LLMService/StreamComplete" in line
    ]
    assert [line["code"] for line in lines] == ["ABORTED", "ABORTED"], output
    billed = [int(line["completion_tokens"]) for line in lines]
    assert all(billed), output
    assert "ERROR" not in output and "Traceback" not in output, output
    async with (
        started(tmp_path, local, "log_calls: false") as again,
        grpc.aio.insecure_channel(again.target) as channel,
    ):
        records = (await pb.LLMServiceStub(channel).GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert sum(r.completion_tokens for r in records) == sum(billed), "the ledger has what the call log says"
    assert sum(r.interrupted_requests for r in records) == 2


async def test_a_second_signal_stops_the_gateway_at_once_though_callers_stopped_reading(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """The statuses of streams whose callers stopped reading wait behind their messages: gRPC's own cut waited out
    the whole grace period (20 s here) after the second signal, which is to stop now."""
    async with started(tmp_path, local, "drain_s: 0.2, grace_period_s: 20, log_calls: true") as server:
        local.inject(*[{"huge_content": 20_000_000, "no_usage": True}] * 2)
        async with grpc.aio.insecure_channel(server.target) as channel:
            calls = [pb.LLMServiceStub(channel).StreamComplete(stream_chat(f"s{i}"), timeout=60) for i in (1, 2)]
            for call in calls:
                await call.read()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1)
            server.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.process.wait(), 5) == 0
        output = await server.output()
    assert "ERROR" not in output and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "rpc=llmrelay.v1.LLMService/StreamComplete" in line]
    assert len(lines) == 2 and all("completion_tokens=0 " not in line for line in lines), output


async def wait_until_requests(upstream: FakeUpstream, count: int) -> None:
    async with asyncio.timeout(5):
        while len(upstream.chat_requests) < count:  # noqa: ASYNC110 (plain data, no event to wait on)
            await asyncio.sleep(0.01)


async def test_a_key_made_by_keys_new_admits_its_caller_and_sighup_rereads_the_keys_file(
    tmp_path: Path, local: FakeUpstream
) -> None:
    made = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "keys", "new", "team-a", stdout=asyncio.subprocess.PIPE, env=clean_env()
    )
    printed = (await made.communicate())[0].decode()
    key = next(line for line in printed.splitlines() if line.startswith("llmr-"))
    entry = printed[printed.index('  - name: "team-a"') :]
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n" + entry)
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path}/usage.db"}}\nauth: {{keys_file: "{keys_file}"}}\n')
    server = await start_server(config, local)
    try:
        await server.wait_listening()
        async with AsyncClient(server.target, metadata=[("authorization", f"Bearer {key}")]) as client:
            assert (await client.complete([{"role": "user", "content": "hi"}])).message.content == "echo: hi"
            assert [r.caller for r in (await client.get_usage()).records] == ["team-a"]
            keys_file.write_text("keys: []\n")
            server.process.send_signal(signal.SIGHUP)  # re-read now, not at the next look at the file
            with pytest.raises(UnauthenticatedError):
                for _ in range(20):  # the signal arrives a moment later
                    await client.complete([{"role": "user", "content": "hi"}])
                    await asyncio.sleep(0.02)
        assert server.process.returncode is None, "SIGHUP reloads, it does not stop the gateway"
    finally:
        server.process.terminate()
        await server.process.wait()
    log = await server.output()
    assert key not in log and "Traceback" not in log


@pytest.mark.parametrize("stdout", ["closed", "a reader gone", "a full disk"])
def test_keys_new_says_when_its_key_cannot_be_shown(stdout: str) -> None:
    """Closed, it exited 0 having shown the key to no one (/dev/null in its place); a reader gone or a full disk ended
    it with a traceback. The key is kept nowhere: one not shown whole must be made again."""
    command = [str(BIN / "llmrelay-server"), "keys", "new", "team-a"]
    if stdout == "closed":
        done = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True, env=clean_env(),
                              pass_fds=(), preexec_fn=lambda: os.close(1), timeout=60)  # fmt: skip
        said = "standard output is closed: the key would be shown to no one"
    elif stdout == "a reader gone":
        read, write = os.pipe()
        os.close(read)
        with os.fdopen(write, "w") as pipe:
            done = subprocess.run(command, stdout=pipe, stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=60)
        said = "the key could not be written out (Broken pipe): make another"
    else:
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=60)
        said = "the key could not be written out (No space left on device): make another"
    assert (done.returncode, done.stderr) == (1, f"llmrelay-server keys: {said}\n")


async def test_sighup_without_a_keys_file_says_that_it_reloads_nothing(server: GatewayProcess) -> None:
    # `systemctl reload` after editing the configuration: without a keys file the gateway said nothing at all, as if
    # the edit were in force.
    server.process.send_signal(signal.SIGHUP)
    line = await server.wait_for_line("SIGHUP")
    assert "no keys file" in line and "restart" in line
    assert server.process.returncode is None


@pytest.mark.parametrize(
    ("config_text", "said"),
    [
        ("server: {workers: !!int abc}\n", "not valid YAML"),  # PyYAML's ValueError escaped, with a traceback
        (f"server: {{max_concurrent_rpcs: {2**31}}}\n", "server.max_concurrent_rpcs"),  # past a C int
        ('server: {usage_journal_dir: "j\\0"}\n', "server.usage_journal_dir"),  # os's ValueError
        # A file in the way: its mkdir's "File exists".
        ('server: {usage_journal_dir: "/proc/version"}\n', "usage_journal_dir: Not a directory: /proc/version"),
        (f"server: {{max_concurrent_rpcs: 1{'0' * 400}}}\n", "server.max_concurrent_rpcs: too large"),  # OverflowError
    ],
    ids=["tag", "max_concurrent_rpcs", "NUL", "a file", "400 digits"],
)
async def test_a_configuration_that_used_to_end_in_a_traceback_is_one_line(
    tmp_path: Path, config_text: str, said: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    env = clean_env(LLMRELAY_USAGE_DB=str(tmp_path / "usage.db"), LLMRELAY_LISTEN="127.0.0.1:0")
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "--config", str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert err.decode().count("\n") == 1 and said in err.decode(), err.decode()


@pytest.mark.parametrize("where", ["LLMRELAY_USAGE_DB", "server.usage_db"])
async def test_a_ledger_that_cannot_be_opened_is_named_where_it_was_set(tmp_path: Path, where: str) -> None:
    # A directory where the SQLite file should be. Set by the variable, the error named the file's field, which the
    # operator then looked for in a file that did not set it.
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path}"}}\n' if where == "server.usage_db" else "{}\n")
    env = clean_env(LLMRELAY_LISTEN="127.0.0.1:0")
    if where == "LLMRELAY_USAGE_DB":
        env["LLMRELAY_USAGE_DB"] = str(tmp_path)
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "--config", str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert err.decode().startswith(f"llmrelay-server: configuration error: {where}"), err.decode()
    assert err.decode().count("\n") == 1, err.decode()


async def refused_configuration(tmp_path: Path, config_text: str | None, env: dict[str, str]) -> str:
    """What `llmrelay-server` wrote as it refused to start (exit status 1), run in `tmp_path` with a file holding
    `config_text` (None: no --config) and `env` over an environment without the gateway's variables."""
    args = ["--listen", "127.0.0.1:0"]
    if config_text is not None:
        (tmp_path / "llmrelay.yaml").write_text(config_text)
        args += ["--config", str(tmp_path / "llmrelay.yaml")]
    environment = clean_env(**{"LLMRELAY_USAGE_DB": str(tmp_path / "usage.db"), **env})
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", *args, env=environment, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    _, err = await finished(process)
    assert process.returncode == 1, err.decode()
    return err.decode()


SECRET = "sekret-0123456789"


@pytest.mark.parametrize(
    ("config_text", "env", "said"),
    [
        # A password holding an '@' and then a '/', '?' or '#': its end was read as the path (Health, the log).
        ("{}\n", {"LLMRELAY_USAGE_DB": f"postgresql://u:p@ss/{SECRET}@127.0.0.1:1/db"}, "LLMRELAY_USAGE_DB: the user"),
        ("{}\n", {"LLMRELAY_REDIS_URL": f"redis://:p@ss?{SECRET}@127.0.0.1:1/0"}, "LLMRELAY_REDIS_URL: the user"),
        # A ${VAR} in a path: a PEM key for the key's path, another variable's key; each was shown whole.
        (
            'server: {tls: {cert_file: c.pem, key_file: "${TLS_KEY}"}}\n',
            {"TLS_KEY": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"},
            "server.tls.key_file: holds a line break",
        ),
        (
            'server: {tls: {cert_file: "${TLS_CERT}", key_file: k.pem}}\n',
            {"TLS_CERT": SECRET},
            "server.tls.cert_file: ${TLS_CERT} cannot be read",
        ),
        ('auth: {keys_file: "${KEYS}"}\n', {"KEYS": SECRET}, "keys file ${KEYS}: cannot be read"),
        (
            'server: {usage_journal_dir: "/proc/${DIR}"}\n',
            {"DIR": SECRET},
            "LLMRELAY_USAGE_DB or server.usage_journal_dir: No such file or directory: /proc/${DIR}",
        ),
        # A key and its value run together: the key was quoted as an unknown field.
        (f"llm: {{openai: {{model: gpt-4o, api_key={SECRET}}}}}\n", {}, "llm.openai: a key holding '='"),
        # Set but empty: taken for unset, a start on the defaults and a gateway open to anyone.
        (None, {"LLMRELAY_CONFIG": ""}, "LLMRELAY_CONFIG: empty (an unset variable?)"),
        ("{}\n", {"LLMRELAY_KEYS_FILE": ""}, "LLMRELAY_KEYS_FILE: empty (an unset variable?)"),
    ],
    ids=["postgresql", "redis", "tls key", "tls cert", "keys file", "journal", "key=value", "config", "keys empty"],
)
async def test_a_configuration_mistake_is_one_line_that_shows_no_secret(
    tmp_path: Path, config_text: str | None, env: dict[str, str], said: str
) -> None:
    err = await refused_configuration(tmp_path, config_text, env)
    assert err.startswith(f"llmrelay-server: configuration error: {said}") and err.count("\n") == 1, err
    assert SECRET not in err


async def test_a_mistake_in_a_file_that_asks_for_a_json_log_is_said_in_json(tmp_path: Path) -> None:
    # Said as a line of text, it was dropped by a collector parsing JSON, as the later errors of a start were.
    err = await refused_configuration(tmp_path, "server: {log_format: json, drain_s: -1}\n", {})
    [entry] = [json.loads(line) for line in err.splitlines()]
    assert entry["level"] == "ERROR" and entry["msg"].startswith("configuration error: server.drain_s: "), entry


async def test_an_empty_config_flag_is_refused(tmp_path: Path) -> None:
    # `--config "$FILE"` with FILE unset: not a start on the defaults.
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "--config", "", env=clean_env(), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "--config: empty" in err.decode()


@pytest.mark.parametrize("flags", [("--worker", "2"), ("--supervisor-pid", "1"), ("--heartbeat-fd", "0")])
async def test_a_flag_of_the_supervisors_alone_is_refused(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """`--worker 2`, a typo of `--workers 2`, started a worker without a supervisor: it shared a port in use, logged
    a line it could not format, then failed with a traceback."""
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", *flags, env=clean_env(), cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:  # it started serving
            process.kill()
            await process.wait()
    assert process.returncode == 2
    assert err.decode().splitlines()[-1] == (
        "llmrelay-server: error: unrecognized arguments: the --worker flags are the supervisor's; did you mean"
        " --workers N?"
    )


async def test_a_gateway_started_without_standard_error_serves(tmp_path: Path, local: FakeUpstream) -> None:
    """Started with standard error closed (`2>&-`), it exited 1 at once without a word: its log had nothing to write
    to (and the next file it opened would have taken standard error's number, gRPC's own lines landing in it)."""
    port = free_port()
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{listen: "127.0.0.1:{port}", usage_db: "{tmp_path}/usage.db", drain_s: 0}}\n')
    gateway = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$0" --config "$1" 2>&-', str(BIN / "llmrelay-server"), str(config),
        env=clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1"), LLMRELAY_OLLAMA_MODEL="tiny"),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            answer = await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        assert answer.message.content == "echo: hello gateway"
        gateway.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.wait(), 15) == 0
    finally:
        if gateway.returncode is None:
            gateway.kill()
            await gateway.wait()
    assert sqlite3.connect(tmp_path / "usage.db").execute("PRAGMA integrity_check").fetchone() == ("ok",)
