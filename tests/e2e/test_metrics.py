"""Prometheus metrics scraped from /metrics after a known sequence of calls: every counter and histogram count
matches the sequence exactly, in the names existing dashboards use."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmrelay import v1 as pb
from llmrelay_server import metrics
from llmrelay_server.app import Gateway
from llmrelay_server.domain import BackendSpec
from llmrelay_server.metrics import LabelValues
from llmrelay_server.workers import ListenError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import OPENAI_TEST_KEY, GatewayFactory, chat, stream_chat, two_backends, wait_until
from upstream import FakeUpstream

COMPLETE = {"grpc_type": "unary", "grpc_service": "llmrelay.v1.LLMService", "grpc_method": "Complete"}
STREAM = {"grpc_type": "server_stream", "grpc_service": "llmrelay.v1.LLMService", "grpc_method": "StreamComplete"}


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metered(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, more: str = ""
) -> tuple[Gateway, int]:
    """A gateway over `primary` and `local` that serves its metrics (with `more` server settings), and their port."""
    server = 'metrics_listen: "127.0.0.1:0"' + (f", {more}" if more else "")
    gateway = await gateway_factory(two_backends(primary, local), server=server)
    assert gateway.metrics is not None and gateway.metrics.port is not None
    return gateway, gateway.metrics.port


async def test_a_metrics_port_in_use_stops_the_start_naming_the_field(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(ListenError) as refused:
            await gateway_factory(two_backends(primary, local), server=f'metrics_listen: "{listen}"')
    said = str(refused.value)
    assert said.startswith(f"cannot serve metrics on {listen}: ") and said.endswith("with server.metrics_listen"), said


async def test_metrics_count_a_known_sequence_exactly(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway, metrics_port = await metered(gateway_factory, primary, local)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        answers = [await stub.Complete(chat(), timeout=5) for _ in range(2)]  # served at once
        primary.inject({"status": 503}, {"status": 503})
        answers.append(await stub.Complete(chat(), timeout=5))  # a retry, then a fallback
        primary.inject({"status": 503}, {"status": 503})
        local.inject({"status": 503}, {"status": 503})
        with pytest.raises(grpc.aio.AioRpcError):  # everything down
            await stub.Complete(chat(), timeout=5)
        chunks = [c async for c in stub.StreamComplete(stream_chat(), timeout=5)]
        await stub.Health(pb.HealthRequest(), timeout=5)
    samples = await scrape(metrics_port)

    assert value(samples, "grpc_server_started_total", **COMPLETE) == 4
    assert value(samples, "grpc_server_msg_received_total", **COMPLETE) == 4
    assert value(samples, "grpc_server_msg_received_total", **STREAM) == 1
    assert value(samples, "grpc_server_handled_total", **COMPLETE, grpc_code="OK") == 3
    assert value(samples, "grpc_server_handled_total", **COMPLETE, grpc_code="UNAVAILABLE") == 1
    assert value(samples, "grpc_server_handling_seconds_count", **COMPLETE) == 4
    assert value(samples, "grpc_server_msg_sent_total", **COMPLETE) == 3
    assert value(samples, "grpc_server_handled_total", **STREAM, grpc_code="OK") == 1
    assert value(samples, "grpc_server_msg_sent_total", **STREAM) == len(chunks)
    assert value(samples, "grpc_server_handled_total", **{**COMPLETE, "grpc_method": "Health"}, grpc_code="OK") == 1

    attempts = "llmrelay_upstream_attempts_total"
    assert value(samples, attempts, backend="openai", outcome="succeeded") == 3  # two unary calls and the stream
    assert value(samples, attempts, backend="openai", outcome="server_error") == 4
    assert value(samples, attempts, backend="ollama", outcome="succeeded") == 1
    assert value(samples, attempts, backend="ollama", outcome="server_error") == 2
    assert value(samples, "llmrelay_upstream_attempt_seconds_count", backend="openai") == 7
    # Buckets past 10 s, where a model's answers often end: every one of those read as 10 s.
    assert value(samples, "grpc_server_handling_seconds_bucket", **COMPLETE, le="600.0") == 4
    assert value(samples, "llmrelay_upstream_attempt_seconds_bucket", backend="openai", le="300.0") == 7
    assert value(samples, "llmrelay_retries_total", backend="openai", reason="server_error") == 2
    assert value(samples, "llmrelay_retries_total", backend="ollama", reason="server_error") == 1
    assert value(samples, "llmrelay_fallbacks_total", backend="openai", reason="server_error") == 2
    assert value(samples, "llmrelay_gateway_overhead_seconds_count", grpc_method="Complete") == 4
    assert value(samples, "llmrelay_upstream_time_to_first_chunk_seconds_count", backend="openai") == 1
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count",
                 gen_ai_operation_name="chat", gen_ai_request_model="default") == 1  # fmt: skip

    by_backend = {"openai": 0, "ollama": 0}
    for answer in answers:
        by_backend[answer.backend] += answer.usage.prompt_tokens
    by_backend["openai"] += chunks[-1].usage.prompt_tokens
    for backend, model in (("openai", "gpt-test"), ("ollama", "tiny")):
        tokens = value(
            samples, "llmrelay_tokens_total", backend=backend, model=model, caller="anonymous", kind="prompt"
        )
        assert tokens == by_backend[backend]
    assert value(samples, "llmrelay_circuit_state", backend="openai", state="closed") == 1
    assert value(samples, "llmrelay_circuit_state", backend="openai", state="open") == 0
    assert value(samples, "llmrelay_open_streams") == 0
    assert ("llmrelay_ledger_queue_depth", frozenset()) in samples


def test_label_values_come_from_the_configuration_only() -> None:
    specs = [BackendSpec("openai", "openai", "http://x/v1", "gpt-4o", models=("gpt-4o-mini",))]
    labels = LabelValues(specs, ["fast"], lambda: frozenset({"research"}))
    assert [labels.model(m) for m in ("gpt-4o", "openai/gpt-4o-mini", "fast", None, "anything-a-caller-says")] == [
        "gpt-4o",
        "openai/gpt-4o-mini",
        "fast",
        "default",
        "other",
    ]
    assert [labels.caller(c) for c in ("research", "anonymous", "x-llmrelay-caller-made-up")] == [
        "research",
        "anonymous",
        "other",
    ]


async def test_the_standard_health_watch_works_with_every_interceptor_on(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Watch streams with context.write, not as an async generator: the interceptors must pass it through."""
    gateway = await gateway_factory(
        two_backends(primary, local), server='metrics_listen: "127.0.0.1:0", log_format: json, tracing: true'
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        assert gateway.metrics is not None and gateway.metrics.port is not None
        assert value(await scrape(gateway.metrics.port), "llmrelay_open_streams") == 0, "a watch is no answer streamed"
        watch.cancel()


async def until_ended(port: int, method: dict[str, str], code: str) -> dict[Any, float]:
    """The metrics once the gateway has counted a call of `method` ended with `code` (it sees the end after the
    caller does)."""
    async with asyncio.timeout(5):
        while not value(samples := await scrape(port), "grpc_server_handled_total", **method, grpc_code=code):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return samples


async def test_the_wait_before_a_retry_is_not_the_gateways_own_time(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream asks to be asked again in 0.4 s (Retry-After) and the router waits so long before its retry: that
    wait is no attempt's, and not the gateway's own time either, in the metrics or in the call's log line."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    gateway, metrics_port = await metered(gateway_factory, primary, local)
    primary.inject({"status": 503, "retry_after": 0.4})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat(), timeout=10, metadata=[("x-request-id", "waited")])
        samples = await until_ended(metrics_port, COMPLETE, "OK")
    assert [a.outcome for a in answer.attempts] == [pb.ATTEMPT_OUTCOME_SERVER_ERROR, pb.ATTEMPT_OUTCOME_SUCCEEDED]
    assert value(samples, "llmrelay_upstream_attempt_seconds_sum", backend="openai") < 0.2
    assert value(samples, "llmrelay_gateway_overhead_seconds_sum", grpc_method="Complete") < 0.2
    [line] = [call for r in caplog.records if (call := getattr(r, "call", {})).get("request_id") == "waited"]
    assert line["duration_ms"] >= 400 and line["overhead_ms"] < 200, line


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_an_attempt_the_caller_leaves_counts_as_cancelled(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    exported: InMemorySpanExporter,
    streaming: bool,
) -> None:
    """The caller cancels while the upstream works on its answer: the attempt is counted, as cancelled (in the
    metrics and in its trace span, which is no error: the backend did nothing wrong), and its time is the
    upstream's, not the gateway's own."""
    gateway, metrics_port = await metered(gateway_factory, primary, local, "tracing: true")
    primary.inject({"stall_s": 10})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        call: Any = stub.StreamComplete(stream_chat(), timeout=10) if streaming else stub.Complete(chat(), timeout=10)
        async with asyncio.timeout(5):
            while not primary.chat_requests:  # noqa: ASYNC110 (the upstream's plain data, no event to wait on)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        call.cancel()
        samples = await until_ended(metrics_port, STREAM if streaming else COMPLETE, "CANCELLED")

    attempts = "llmrelay_upstream_attempts_total"
    assert value(samples, attempts, backend="openai", outcome="cancelled") == 1
    assert sum(v for (name, _), v in samples.items() if name == attempts) == 1
    assert value(samples, "llmrelay_upstream_attempt_seconds_count", backend="openai") == 1
    assert value(samples, "llmrelay_upstream_attempt_seconds_sum", backend="openai") >= 0.5
    method = "StreamComplete" if streaming else "Complete"
    assert value(samples, "llmrelay_gateway_overhead_seconds_sum", grpc_method=method) < 0.2
    [attempt] = [span for span in exported.get_finished_spans() if span.name == "chat gpt-test"]
    assert dict(attempt.attributes or {})["llmrelay.outcome"] == "cancelled"
    assert attempt.status.status_code is StatusCode.UNSET


async def test_only_a_stream_started_over_counts_as_a_restart(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """One stream breaks and is restarted on the fallback; another breaks and ends the call (no restart asked): one
    restart, filed under the backend that broke."""
    gateway, metrics_port = await metered(gateway_factory, primary, local)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        primary.inject({"stream_cut_after": 2})
        restarted = stream_chat("one two three four", on_interrupt=pb.INTERRUPT_POLICY_RESTART)
        chunks = [c async for c in stub.StreamComplete(restarted, timeout=5)]
        assert sum(c.HasField("restart") for c in chunks) == 1
        primary.inject({"stream_cut_after": 2})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.StreamComplete(stream_chat("one two three four"), timeout=5):
                pass
        assert caught.value.code() == grpc.StatusCode.ABORTED
    samples = await scrape(metrics_port)

    assert value(samples, "llmrelay_upstream_attempts_total", backend="openai", outcome="interrupted") == 2
    assert value(samples, "llmrelay_stream_restarts_total", backend="openai") == 1
    assert value(samples, "llmrelay_stream_restarts_total", backend="ollama") == 0


async def test_a_retry_its_circuit_skipped_is_no_retry_but_the_fallback_after_it(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The failure opened the circuit, so the retry was skipped and the call went to the next backend: counted as a
    retry (the failure and the skip, paired), and no fallback at all, the moves were undercounted in every outage."""
    router = "router: {retry: {max_retries: 1}, circuit: {failure_threshold: 1, cooldown_s: 30}}\n"
    gateway = await gateway_factory(two_backends(primary, local, router), server='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None and gateway.metrics.port is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        primary.inject({"status": 500})
        answer = await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
    assert [(a.backend, a.outcome) for a in answer.attempts] == [
        ("openai", pb.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("openai", pb.ATTEMPT_OUTCOME_SKIPPED),
        ("ollama", pb.ATTEMPT_OUTCOME_SUCCEEDED),
    ]
    samples = await scrape(gateway.metrics.port)
    assert value(samples, "llmrelay_fallbacks_total", backend="openai", reason="server_error") == 1
    assert value(samples, "llmrelay_retries_total", backend="openai", reason="server_error") == 0


async def test_a_route_not_tried_is_counted_but_not_timed_as_an_attempt(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A fallback whose context window is no larger than one the prompt was too long for is passed over, as a route
    whose circuit is open is: its outcome is counted, but llmrelay_upstream_attempt_seconds (the time an attempt at
    the upstream took) had a 0 s attempt at an upstream that was never asked."""
    gateway = await gateway_factory(
        f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test, context_window: 8000}}
  ollama: {{base_url: "{local.base_url}", model: tiny, context_window: 4000}}
router: {{retry: {{max_retries: 0}}}}
""",
        server='metrics_listen: "127.0.0.1:0"',
    )
    assert gateway.metrics is not None and gateway.metrics.port is not None
    too_long = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    primary.inject({"status": 400, "body": json.dumps(too_long)})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
    assert "ollama/tiny: not tried" in (refused.value.details() or "")
    assert not local.chat_requests
    samples = await scrape(gateway.metrics.port)
    outcome = "context_length_exceeded"
    assert value(samples, "llmrelay_upstream_attempts_total", backend="ollama", outcome=outcome) == 1
    assert value(samples, "llmrelay_upstream_attempt_seconds_count", backend="ollama") == 0
    assert value(samples, "llmrelay_upstream_attempt_seconds_count", backend="openai") == 1


async def test_a_restart_is_not_also_a_fallback(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway, metrics_port = await metered(gateway_factory, primary, local)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        primary.inject({"stream_cut_after": 2})
        restarted = stream_chat("one two three four", on_interrupt=pb.INTERRUPT_POLICY_RESTART)
        chunks = [c async for c in pb.LLMServiceStub(channel).StreamComplete(restarted, timeout=5)]
        assert [c.restart.backend for c in chunks if c.HasField("restart")] == ["openai"]
        assert chunks[-1].backend == "ollama"
    samples = await scrape(metrics_port)

    assert value(samples, "llmrelay_stream_restarts_total", backend="openai") == 1
    moves = [(name, dict(labels)) for (name, labels), v in samples.items() if v and name.startswith("llmrelay_f")]
    assert moves == [], "a restart counts once, as a restart"


async def test_the_first_chunk_after_a_restart_is_filed_under_the_backend_that_sent_it(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The caller's first chunk came from the backend whose stream then broke: its time to first chunk is that
    backend's, not the one that finished the answer after the restart."""
    gateway, metrics_port = await metered(gateway_factory, primary, local)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        primary.inject({"stream_cut_after": 2})
        restarted = stream_chat("one two three four", on_interrupt=pb.INTERRUPT_POLICY_RESTART)
        chunks = [c async for c in pb.LLMServiceStub(channel).StreamComplete(restarted, timeout=5)]
        assert chunks[0].backend == "openai" and chunks[-1].backend == "ollama"
    samples = await scrape(metrics_port)

    first_chunk = "llmrelay_upstream_time_to_first_chunk_seconds_count"
    assert value(samples, first_chunk, backend="openai") == 1
    assert (first_chunk, frozenset({("backend", "ollama")})) not in samples, "no series for a backend that sent none"
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count",
                 gen_ai_operation_name="chat", gen_ai_request_model="default") == 1  # fmt: skip


async def test_a_call_its_callers_deadline_ended_counts_as_deadline_exceeded(
    gateway_factory: GatewayFactory, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC cancels a call whose deadline passes before the gateway has answered it (here grpc.health.v1's Watch,
    which streams until its caller leaves): the caller gets DEADLINE_EXCEEDED, and so do the metrics and the call's
    line, not CANCELLED, which would say that the caller left."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    gateway = await gateway_factory(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n', server='metrics_listen: "127.0.0.1:0"'
    )
    assert gateway.metrics is not None and gateway.metrics.port is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=0.5)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch.read()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        method = {"grpc_type": "server_stream", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
        samples = await until_ended(gateway.metrics.port, method, "DEADLINE_EXCEEDED")

    assert value(samples, "grpc_server_handled_total", **method, grpc_code="CANCELLED") == 0
    assert value(samples, "grpc_server_msg_sent_total", **method) == 1, "written with context.write, and counted"
    [line] = [record.call for record in caplog.records if record.name == "llmrelay_server.calls"]  # type: ignore[attr-defined]
    assert line["rpc"] == "grpc.health.v1.Health/Watch" and line["code"] == "DEADLINE_EXCEEDED"


async def test_a_connection_that_never_sends_its_request_is_closed_and_holds_no_thread(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # prometheus-client's handler has no timeout: each such connection held a thread of the gateway's for ever, and
    # anyone who reaches the port could add them without end.
    monkeypatch.setattr(metrics._MetricsRequestHandler, "timeout", 0.3)
    _, port = await metered(gateway_factory, primary, local)
    threads = threading.active_count()
    idle = []
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")
        idle.append(writer)
    await wait_until(lambda: threading.active_count() >= threads + 5)

    await wait_until(lambda: threading.active_count() <= threads, timeout_s=10)
    for writer in idle:
        writer.close()
    # One reset by its client with its request half sent (a port scan, a TCP health check): no traceback either.
    with socket.create_connection(("127.0.0.1", port)) as reset:
        reset.sendall(b"GET /me")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await wait_until(lambda: threading.active_count() <= threads, timeout_s=10)
    assert value(await scrape(port), "llmrelay_open_streams") == 0, "and it goes on serving"
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("host", ["a..b", "x" * 64])
def test_a_metrics_host_that_is_no_name_cannot_be_served(host: str) -> None:
    # IDNA's UnicodeError went past the start's handling of a port it cannot serve: a traceback, not one line.
    with pytest.raises(OSError, match="not a host name"):
        metrics.serve_metrics(f"{host}:9999", CollectorRegistry())
