"""The gateway's limit on open files: raised at start as far as the system lets it, and reached, said to be the
gateway's own bound rather than the upstream's failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import GatewayProcess, clean_env, spawn_gateway
from llmrelay import v1 as pb
from proxy import ForwardProxy
from support import chat, details, read_all, stream_chat
from upstream import FakeUpstream


def open_files_limit(process: GatewayProcess) -> tuple[int, int]:
    """The process's soft and hard limits on open files, as /proc says."""
    limits = Path(f"/proc/{process.process.pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert found is not None, limits
    return int(found[1]), int(found[2])


async def started(tmp_path: Path, local: FakeUpstream, nofile: str, server: str = "") -> GatewayProcess:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path}/usage.db"{server}}}\n'
        f"llm:\n  ollama: {{base_url: '{local.base_url}', model: tiny}}\n"
        "router: {retry: {max_retries: 0}, circuit: {failure_threshold: 2}}\n"
    )
    process = await spawn_gateway(config, env=clean_env(), under=["prlimit", f"--nofile={nofile}", "--"])
    await process.wait_listening()
    return process


async def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path, local: FakeUpstream) -> None:
    """A soft limit of 1,024 (a login shell's, `make run`'s, many containers') is under what one backend's pool may
    open alone."""
    process = await started(tmp_path, local, "256:8192")
    try:
        assert open_files_limit(process) == (8192, 8192)
        assert "open files" not in process.text()
    finally:
        await process.stop()


async def test_a_limit_below_what_the_pools_may_take_is_warned_of_and_reaching_it_is_no_upstreams_failure(
    tmp_path: Path, local: FakeUpstream
) -> None:
    """Past the limit, each new upstream connection failed `Too many open files`, counted as the upstream's failure:
    the circuit opened, and the backend was refused to every caller for its cooldown."""
    process = await started(tmp_path, local, "96:96")
    try:
        assert open_files_limit(process) == (96, 96)
        warning = await process.wait_for_line("fewer than the 2048 that 1 backends' connection pools")
        assert "ulimit -n" in warning and "LimitNOFILE" in warning
        local.inject(*[{"trickle_s": 1.0}] * 200)
        async with grpc.aio.insecure_channel(process.target) as channel:
            stub = pb.LLMServiceStub(channel)
            ended = await asyncio.gather(
                *(read_all(stub.StreamComplete(stream_chat("a b c"), timeout=20)) for _ in range(200)),
                return_exceptions=True,
            )
            refused = [error for error in ended if isinstance(error, grpc.aio.AioRpcError)]
            assert refused and len(refused) < len(ended), "the limit was reached, with streams served below it"
            for error in refused:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                said = error.details() or ""
                assert "Too many open files: raise the gateway's open files limit (ulimit -n)" in said, said
            health = await stub.Health(pb.HealthRequest(), timeout=5)
            assert health.backends[0].circuit_state == pb.CIRCUIT_STATE_CLOSED
            assert (await stub.Complete(chat(), timeout=5)).backend == "ollama"
    finally:
        await process.stop()
    assert "Traceback" not in process.text()


@contextlib.contextmanager
def at_the_limit(process: GatewayProcess) -> Iterator[None]:
    """The gateway's soft limit on open files lowered to the files it has open now: no new connection can be made."""
    pid = process.process.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


async def test_reaching_the_limit_through_a_proxy_is_no_upstreams_failure_either(
    tmp_path: Path, primary: FakeUpstream
) -> None:
    """The connection to the proxy (HTTP_PROXY) failed `Too many open files`, said as the proxy's failure and counted
    against the backend: its circuit opened."""
    async with ForwardProxy() as proxy:
        config = tmp_path / "llmrelay.yaml"
        config.write_text(
            f'server: {{usage_db: "{tmp_path}/usage.db", health_interval_s: 3600}}\n'
            f"llm:\n  backends: [{{name: up, kind: openai_compatible, base_url: 'http://upstream.test:{primary.port}/v1',"
            " model: gpt-test}]\n"
            "router: {retry: {max_retries: 0}, circuit: {failure_threshold: 2}}\n"
        )
        process = await spawn_gateway(config, env=clean_env(HTTP_PROXY=proxy.url()))
        try:
            await process.wait_listening()
            async with grpc.aio.insecure_channel(process.target) as channel:
                stub = pb.LLMServiceStub(channel)
                await stub.Health(pb.HealthRequest(), timeout=5)  # the channel's connection made, before the limit
                primary.inject(*[{"stall_s": 0.5}] * 3)  # each holds its connection: two need one more
                with at_the_limit(process):
                    ended = await asyncio.gather(
                        *(stub.Complete(chat(), timeout=10) for _ in range(3)), return_exceptions=True
                    )
                refused = [error for error in ended if isinstance(error, grpc.aio.AioRpcError)]
                assert refused, "calls beyond the probe's kept connection need more"
                for error in refused:
                    [up_tried] = [a for a in details(error)["AttemptHistory"].attempts if a.backend == "up"]
                    assert "raise the gateway's open files limit (ulimit -n)" in up_tried.error, up_tried
                health = await stub.Health(pb.HealthRequest(), timeout=5)
                [up] = [backend for backend in health.backends if backend.name == "up"]
                assert up.circuit_state == pb.CIRCUIT_STATE_CLOSED
                assert (await stub.Complete(chat(), timeout=5)).backend == "up"
        finally:
            await process.stop()


async def test_a_probe_the_limit_keeps_from_being_made_leaves_the_backend_as_it_was(
    tmp_path: Path, primary: FakeUpstream
) -> None:
    """The probe's connection failed `Too many open files`, and a backend serving calls on the connections it had was
    made unreachable: readiness NOT_SERVING at the gateway's busiest."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path}/usage.db", health_interval_s: 3600}}\n'
        f"llm:\n  backends: [{{name: up, kind: openai_compatible, base_url: '{primary.base_url}', model: gpt-test}}]\n"
    )
    process = await spawn_gateway(config, env=clean_env())
    try:
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.target) as channel:
            stub = pb.LLMServiceStub(channel)
            await asyncio.sleep(1.1)  # past the start's probe, whose result a probe within a second answers with
            primary.inject(*[{"trickle_s": 1.0}] * 4)
            serving = [stub.StreamComplete(stream_chat("a b c d", model="up/gpt-test"), timeout=20) for _ in range(4)]
            for stream in serving:  # on the connections the start left idle, and more: none idle now
                assert await stream.read() is not grpc.aio.EOF
            with at_the_limit(process):
                health = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
                ready = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="llmrelay.v1.LLMService"), timeout=5
                )
            [up] = [backend for backend in health.backends if backend.name == "up"]
            assert up.reachable and not up.last_error, up
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
            for stream in serving:
                assert await read_all(stream), "served all along"
    finally:
        await process.stop()
