"""The harness as a command, as the Go and TypeScript tests run it: it says where the gateway is once it serves, the
gateway answers through the fake upstream, and it stops cleanly when its stdin ends."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import CLIENT_FILES, FALLBACK_BACKEND, free_port
from llmrelay import v1 as pb
from support import chat

HARNESS = Path(__file__).resolve().parent.parent / "harness.py"


async def start(
    *flags: str, stderr: int = asyncio.subprocess.DEVNULL
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HARNESS),
        *flags,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    assert process.stdout is not None
    async with asyncio.timeout(60):
        line = await process.stdout.readline()
    assert line, f"the harness exited without saying where the gateway is (status {await process.wait()})"
    return process, json.loads(line)


async def stop(process: asyncio.subprocess.Process) -> int:
    assert process.stdin is not None
    process.stdin.close()
    async with asyncio.timeout(30):
        return await process.wait()


async def test_the_command_serves_a_gateway_until_its_stdin_ends() -> None:
    process, where = await start("--fallback")
    try:
        assert where["fallback_backend"] == FALLBACK_BACKEND and where["ca_file"] is None
        async with grpc.aio.insecure_channel(where["target"]) as channel:
            answer = await pb.LLMServiceStub(channel).Complete(chat("hello harness"), timeout=10)
        assert answer.message.content == "echo: hello harness"
        assert answer.backend == "ollama"
    finally:
        status = await stop(process)
    assert status == 0
    async with grpc.aio.insecure_channel(where["target"]) as channel:
        gone = pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=2)
        try:
            await gone
            raise AssertionError("the gateway still answers after the harness stopped")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_command_cleanly_while_its_stdin_is_open(signum: signal.Signals) -> None:
    """As Ctrl-C stops it in a terminal: it aborted at its exit ("Fatal Python error: _enter_buffered_busy", status
    -6), its thread reading stdin holding the reader's lock."""
    process, _ = await start(stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    process.send_signal(signum)
    async with asyncio.timeout(30):
        said = await process.stderr.read()
        status = await process.wait()
    assert status == 0 and b"Fatal Python error" not in said, said.decode(errors="replace")[-2000:]


async def test_the_command_serves_tls_with_its_ca() -> None:
    process, where = await start("--tls")
    try:
        root = await asyncio.to_thread(Path(where["ca_file"]).read_bytes)
        credentials = grpc.ssl_channel_credentials(root)
        async with grpc.aio.secure_channel(where["target"], credentials) as channel:
            answer = await pb.LLMServiceStub(channel).Complete(chat("over tls"), timeout=10)
        assert answer.message.content == "echo: over tls"
    finally:
        assert await stop(process) == 0


async def test_the_command_serves_mutual_tls_to_its_client_certificate_alone() -> None:
    process, where = await start("--mutual-tls")
    try:
        files = await asyncio.to_thread(
            lambda: {name: Path(where[name]).read_bytes() for name in ("ca_file", *CLIENT_FILES)}
        )
        presented = [
            (files["client_key_file"], files["client_cert_file"], True),
            (files["other_client_key_file"], files["other_client_cert_file"], False),
            (None, None, False),
        ]
        for key, cert, answers in presented:
            credentials = grpc.ssl_channel_credentials(files["ca_file"], key, cert)
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
            async with grpc.aio.secure_channel(where["target"], credentials, options=options) as channel:
                call = pb.LLMServiceStub(channel).Complete(chat("over mutual tls"), timeout=10)
                if answers:
                    assert (await call).message.content == "echo: over mutual tls"
                    continue
                try:
                    await call
                    raise AssertionError("the gateway took a client certificate its client CA did not issue")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert await stop(process) == 0


def test_free_ports_come_from_below_the_ephemeral_range_a_new_one_each_time() -> None:
    """Where the tests' own connections cannot take them between the draw and the server's bind."""
    first_ephemeral, last_ephemeral = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(500)]
    if first_ephemeral - 1024 >= 3000:
        assert all(1024 <= port < first_ephemeral for port in ports), sorted(ports)[-5:]
        assert len(set(ports)) == len(ports)  # 500 draws of a shuffled range of at least 3,000
    else:  # no room below it here: the kernel's choice, as before
        assert all(first_ephemeral <= port <= last_ephemeral for port in ports)
