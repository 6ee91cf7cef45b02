"""OpenTelemetry traces (server.tracing): a server span per RPC with a client span per upstream attempt, the GenAI
attributes, retry / fallback / restart events, the caller's trace continued up to the upstream's request, and the
spans received over real OTLP/gRPC by a receiver on loopback; the stop bounded with the collector down, and bad OTEL_*
settings refused at start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import GatewayProcess, clean_env, free_port, spawn_gateway
from llmrelay import v1 as pb
from llmrelay_server import tracing
from llmrelay_server.config import ConfigError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import GatewayFactory, chat, png, read_all, stream_chat, two_backends, wait_until
from upstream import FakeUpstream, Request

TRACING = "tracing: true"
COMPLETE = "llmrelay.v1.LLMService/Complete"
STREAM = "llmrelay.v1.LLMService/StreamComplete"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


async def connect(gateway_factory: GatewayFactory, yaml_text: str, server: str = TRACING) -> AsyncIterator[Any]:
    gateway = await gateway_factory(yaml_text, server=server)
    assert gateway.tracing is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield pb.LLMServiceStub(channel)


def rpc_span(exporter: InMemorySpanExporter, name: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one span of the RPC named `name`, and its children in the order they started."""
    [call] = rpc_spans(exporter, name)
    return call


def rpc_spans(exporter: InMemorySpanExporter, name: str) -> list[tuple[ReadableSpan, list[ReadableSpan]]]:
    """Each span of the RPC named `name`, in the order they started, with its children in the order they started."""
    spans = exporter.get_finished_spans()
    calls = []
    for server in sorted((span for span in spans if span.name == name), key=lambda span: span.start_time or 0):
        assert server.context is not None
        children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
        calls.append((server, sorted(children, key=lambda span: span.start_time or 0)))
    return calls


async def test_a_call_is_a_server_span_with_a_client_span_per_attempt(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        answer = await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", "first")])
    server, [attempt] = rpc_span(exported, COMPLETE)

    assert server.kind is SpanKind.SERVER and server.parent is None
    assert server.attributes is not None and attempt.attributes is not None
    assert dict(server.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "llmrelay.v1.LLMService",
        "rpc.method": "Complete",
        "rpc.grpc.status_code": 0,
        "gen_ai.operation.name": "chat",
        "gen_ai.response.id": answer.id,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.response.model": "gpt-test",
        "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
        "llmrelay.backend": "openai",
        "llmrelay.attempts": 1,
        "llmrelay.request_id": "first",
    }
    assert attempt.name == "chat gpt-test" and attempt.kind is SpanKind.CLIENT
    assert dict(attempt.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-test",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
        "llmrelay.backend": "openai",
        "llmrelay.outcome": "succeeded",
    }
    assert server.start_time is not None and server.end_time is not None
    assert attempt.start_time is not None and attempt.end_time is not None
    assert server.start_time <= attempt.start_time <= attempt.end_time <= server.end_time
    assert attempt.context is not None and server.context is not None
    assert attempt.context.trace_id == server.context.trace_id
    # Content is recorded only when server.log_content allows it.
    assert not any("messages" in key for span in (server, attempt) for key in span.attributes or {})


async def test_a_calls_span_and_its_log_line_name_each_other(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    exported: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found one from the other: the line by its trace id, the span by its request id. A call sampled out is of its
    caller's trace all the same, which its line names."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", "traced")])
        unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the caller's trace, not sampled: nor is this call
        await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", "untraced"), ("traceparent", unsampled)])
    server, _ = rpc_span(exported, COMPLETE)
    assert server.context is not None and server.attributes is not None
    assert server.attributes["llmrelay.request_id"] == "traced"
    calls = {record.call["request_id"]: record.call for record in caplog.records if hasattr(record, "call")}
    assert calls["traced"]["trace_id"] == format(server.context.trace_id, "032x")
    assert calls["untraced"]["trace_id"] == TRACE_ID


async def test_retries_and_fallbacks_are_attempt_spans_and_events(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    # The first attempt takes a while, so that a span started at another moment than its attempt would show.
    primary.inject({"status": 503, "stall_s": 0.2}, {"status": 503})
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        answer = await stub.Complete(chat(), timeout=5)
    assert answer.backend == "ollama"
    server, attempts = rpc_span(exported, COMPLETE)

    assert [(a.name, dict(a.attributes or {})["llmrelay.outcome"]) for a in attempts] == [
        ("chat gpt-test", "server_error"),
        ("chat gpt-test", "server_error"),
        ("chat tiny", "succeeded"),
    ]
    for failed in attempts[:2]:
        assert failed.status.status_code is StatusCode.ERROR
        assert dict(failed.attributes or {})["http.response.status_code"] == 503
        assert dict(failed.attributes or {})["error.type"] == "server_error"
    assert attempts[2].status.status_code is StatusCode.UNSET
    assert dict(attempts[2].attributes or {})["gen_ai.provider.name"] == "ollama"
    for before, after in pairwise(attempts):
        assert (before.end_time or 0) <= (after.start_time or 0)
    # Each span starts when its attempt did (backoff included), as the upstreams saw the requests come.
    retried = (attempts[1].start_time or 0) - (attempts[0].start_time or 0)
    assert abs(retried / 1e9 - (primary.chat_times[1] - primary.chat_times[0])) < 0.05
    moves = [(event.name, dict(event.attributes or {})) for event in server.events]
    reason = {"llmrelay.reason": "server_error"}
    assert moves == [
        ("llmrelay.retry", {"llmrelay.backend": "openai", "llmrelay.next_backend": "openai", **reason}),
        ("llmrelay.fallback", {"llmrelay.backend": "openai", "llmrelay.next_backend": "ollama", **reason}),
    ]
    assert dict(server.attributes or {})["llmrelay.backend"] == "ollama"
    assert server.status.status_code is StatusCode.UNSET

    # Everything down: the RPC span is an error with the call's status.
    primary.inject({"status": 503}, {"status": 503})
    local.inject({"status": 503}, {"status": 503})
    exported.clear()
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Complete(chat(), timeout=5)
        await wait_until(lambda: bool(rpc_spans(exported, COMPLETE)), timeout_s=5)  # it ends as the status goes out
    server, attempts = rpc_span(exported, COMPLETE)
    assert len(attempts) == 4 and server.status.status_code is StatusCode.ERROR
    assert dict(server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_a_stream_and_its_restart(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        chunks = await read_all(stub.StreamComplete(stream_chat(), timeout=5))
        server, [attempt] = rpc_span(exported, STREAM)
        assert dict(server.attributes or {})["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens
        assert dict(server.attributes or {})["gen_ai.response.finish_reasons"] == ("stop",)
        assert dict(attempt.attributes or {})["llmrelay.outcome"] == "succeeded"
        assert attempt.end_time == server.end_time  # the attempt's stream lasted as long as the call

        exported.clear()
        primary.inject({"stream_cut_after": 3})
        request = stream_chat(on_interrupt=pb.INTERRUPT_POLICY_RESTART)
        chunks = await read_all(stub.StreamComplete(request, timeout=5))
    assert sum(chunk.HasField("restart") for chunk in chunks) == 1
    server, attempts = rpc_span(exported, STREAM)
    assert [dict(a.attributes or {})["llmrelay.outcome"] for a in attempts] == ["interrupted", "succeeded"]
    assert [event.name for event in server.events] == ["llmrelay.stream_restart"]
    # Both attempts consumed tokens: the call's usage is their sum.
    usage = [dict(a.attributes or {})["gen_ai.usage.input_tokens"] for a in attempts]
    assert dict(server.attributes or {})["gen_ai.usage.input_tokens"] == sum(usage)  # type: ignore[arg-type]


async def test_a_stream_cut_short_names_the_backend_that_served_part_of_it(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    """No attempt succeeded, but one served (and billed) part of the answer: the call's span says which."""
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        primary.inject({"stream_cut_after": 3})
        with pytest.raises(grpc.aio.AioRpcError):
            await read_all(stub.StreamComplete(stream_chat(), timeout=5))
        await wait_until(lambda: bool(rpc_spans(exported, STREAM)), timeout_s=5)  # it ends as the status goes out
    server, attempts = rpc_span(exported, STREAM)
    assert [dict(a.attributes or {})["llmrelay.outcome"] for a in attempts] == ["interrupted"]
    assert dict(server.attributes or {})["llmrelay.backend"] == "openai"


async def test_a_stream_its_deadline_cut_bills_what_it_consumed_on_its_attempt(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    """The caller's deadline ends a stream mid-way: what it consumed is billed, and its attempt's span (a timeout)
    carries that usage, as the span of an attempt its caller left does, and as the call's span sums it."""
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        primary.inject({"trickle_s": 0.3})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all(stub.StreamComplete(stream_chat("one two three four five six seven"), timeout=1))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The gateway may see the call end after its caller does (the caller's own timer may fire first).
        await wait_until(lambda: bool(rpc_spans(exported, STREAM)), timeout_s=5)
    server, [attempt] = rpc_span(exported, STREAM)
    attributes, totals = dict(attempt.attributes or {}), dict(server.attributes or {})
    assert attributes["llmrelay.outcome"] == "timeout"
    assert attributes["gen_ai.response.model"] == "gpt-test"
    consumed = (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"])
    assert consumed == (totals["gen_ai.usage.input_tokens"], totals["gen_ai.usage.output_tokens"])
    assert consumed[1] != 0


async def test_the_callers_trace_is_continued_up_to_the_upstream(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "vendor=opaque"))
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        await stub.Complete(chat(), timeout=5, metadata=metadata)
    server, [attempt] = rpc_span(exported, COMPLETE)

    assert server.context is not None and server.parent is not None and attempt.context is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID == f"{attempt.context.trace_id:032x}"
    assert f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    [headers] = primary.chat_headers
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, parent_id, flags) == ("00", TRACE_ID, f"{server.context.span_id:016x}", "01")
    assert headers["tracestate"] == "vendor=opaque"


async def test_a_tracestate_sent_in_two_entries_is_continued_whole(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    """Metadata may carry a key twice, as HTTP may a header: W3C's tracestate is then both, in order (the first was
    dropped)."""
    metadata = (
        ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    )
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        await stub.Complete(chat(), timeout=5, metadata=metadata)
    server, _ = rpc_span(exported, COMPLETE)
    assert server.context is not None and f"{server.context.trace_id:032x}" == TRACE_ID
    [headers] = primary.chat_headers
    assert headers["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


@dataclass
class TokenizingUpstream(FakeUpstream):
    """A vLLM server's stand-in that keeps the headers of the requests to its /tokenize."""

    tokenize_headers: list[dict[str, str]] = field(default_factory=list)

    async def _tokenize(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        self.tokenize_headers.append(request.headers)
        return await super()._tokenize(request, writer)


async def test_a_count_of_tokens_by_the_backend_continues_the_trace(
    gateway_factory: GatewayFactory, exported: InMemorySpanExporter
) -> None:
    """vLLM's (and llama.cpp's) own tokenizer is a request of the call too: it carried no traceparent."""
    vllm = TokenizingUpstream(models=("qwen",), vllm=True)
    await vllm.start()
    try:
        backend = f"{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}"
        request = pb.CountTokensRequest(model="gpu/qwen", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
        async for stub in connect(gateway_factory, f"llm:\n  backends: [{backend}]\n"):
            count = await stub.CountTokens(
                request, timeout=5, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
            )
    finally:
        await vllm.stop()
    assert not count.estimated
    server, _ = rpc_span(exported, "llmrelay.v1.LLMService/CountTokens")
    assert server.context is not None
    [headers] = vllm.tokenize_headers
    assert headers["traceparent"] == f"00-{TRACE_ID}-{server.context.span_id:016x}-01"


@pytest.mark.parametrize(
    "metadata",
    [
        (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01" + "0" * 1000),),
        (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "a=1,b c=2")),
        (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", ",".join(f"k{i}=v" for i in range(40)))),
        (("baggage", "a=" + "b" * 5000),),
    ],
    ids=["traceparent-over-512", "tracestate-bad-member", "tracestate-over-32", "baggage-over-4096"],
)
async def test_a_callers_malformed_trace_headers_are_ignored_without_a_log_line(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    exported: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    """Headers the caller got wrong are the caller's mistake: the call is served and traced (its trace continued where
    its traceparent is valid), and OpenTelemetry's propagators do not log a warning for every such call."""
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        for _ in range(3):
            await stub.Complete(chat(), timeout=5, metadata=metadata)
            await read_all(stub.StreamComplete(stream_chat(), timeout=5, metadata=metadata))
    assert len(rpc_spans(exported, COMPLETE)) == len(rpc_spans(exported, STREAM)) == 3
    assert all(headers["traceparent"].startswith("00-") for headers in primary.chat_headers)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned


@pytest.mark.parametrize(
    ("variables"),
    [
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "unix:///tmp/otel.sock"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "unix:/tmp/otel.sock"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "dns:///127.0.0.1:4317"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://127.0.0.1:4317"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://u:p@collector.example.com/otlp"},
        {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=abc, ", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=b,c=d%3Be"},
    ],
    ids=["unix-url", "unix", "dns", "grpc-scheme", "host-port", "https-with-user", "headers"],
)
async def test_otel_settings_the_exporters_take_are_taken(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    gateway = await gateway_factory(two_backends(primary, local), server=TRACING)
    assert gateway.tracing is not None


async def test_a_header_the_exporter_would_drop_is_refused_whatever_the_log_level(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--log-level ERROR`: the parser's warning is never made, and the exporter would drop the collector's key
    without a word."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=SE;CRET")
    logging.disable(logging.WARNING)
    try:
        with pytest.raises(ConfigError, match=r"^OTEL_EXPORTER_OTLP_HEADERS: 'x-api-key' is not NAME=VALUE"):
            await gateway_factory(two_backends(primary, local), server=TRACING)
    finally:
        logging.disable(logging.NOTSET)


async def test_a_refused_model_name_is_recorded_no_longer_than_a_name_may_be(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    """The span starts before the request is checked: a caller's megabyte of model name, refused, would wait in the
    export queue with its span (2,048 of them: gigabytes)."""
    async for stub in connect(gateway_factory, two_backends(primary, local)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(model="m" * 1_000_000), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await wait_until(lambda: bool(rpc_spans(exported, COMPLETE)), timeout_s=5)  # it ends as the status goes out
    span, _ = rpc_span(exported, COMPLETE)
    assert span.attributes is not None and span.attributes["gen_ai.request.model"] == "m" * 256


def test_a_spans_attribute_is_cut_to_8192_characters_unless_the_variables_say_otherwise(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prompt recorded with log_content, or an upstream's long error, waits in the export queue with its span: the
    SDK keeps it whole unless OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT says; the gateway keeps 8,192 characters, and
    says nothing of each value it cuts (the SDK warned of each, twice a call with a long prompt)."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")

    def kept(variables: dict[str, str]) -> int:
        with monkeypatch.context() as patched:
            for name, value in variables.items():
                patched.setenv(name, value)
            provider = tracing.exporting_provider()
        try:
            span = provider.get_tracer("test").start_span("call", attributes={"text": "x" * 20_000})
            assert isinstance(span, ReadableSpan) and span.attributes is not None  # the SDK's span
            return len(str(span.attributes["text"]))
        finally:
            provider.shutdown()  # the span never ended: nothing to export

    assert kept({}) == 8192
    assert kept({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100"}) == 100
    assert kept({"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "50000"}) == 20_000
    assert not [record.getMessage() for record in caplog.records if record.name.startswith("opentelemetry")]


async def test_a_role_with_no_name_is_refused_as_any_bad_request_with_content_recorded(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    """proto3 keeps a number its enum does not name: the span, started before the handler checks the request, records
    it by its number, and the handler refuses it (the call failed UNKNOWN, with a traceback)."""
    request = pb.CompleteRequest(messages=[pb.Message(role=99, content="hi")])  # type: ignore[arg-type]
    async for stub in connect(gateway_factory, two_backends(primary, local), server=f"{TRACING}, log_content: true"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await wait_until(lambda: bool(rpc_spans(exported, COMPLETE)), timeout_s=5)  # it ends as the status goes out
    span, _ = rpc_span(exported, COMPLETE)
    messages = json.loads(str(dict(span.attributes or {})["gen_ai.input.messages"]))
    assert messages == [{"role": "99", "parts": [{"type": "text", "content": "hi"}]}]


async def test_content_is_recorded_only_when_allowed(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, exported: InMemorySpanExporter
) -> None:
    image = png(8, 8)
    parts = [
        pb.ContentPart(text="what is this?"),
        pb.ContentPart(image=pb.ImagePart(data=image, media_type="image/png")),
        pb.ContentPart(image=pb.ImagePart(url="https://example.com/cat.png")),
    ]
    async for stub in connect(gateway_factory, two_backends(primary, local), server=f"{TRACING}, log_content: true"):
        await stub.Complete(chat("tell me"), timeout=5)
        await stub.Complete(pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=parts)]), timeout=5)
    (server, _), (with_parts, _) = rpc_spans(exported, COMPLETE)
    attributes = dict(server.attributes or {})
    prompt = [{"role": "user", "parts": [{"type": "text", "content": "tell me"}]}]
    assert json.loads(str(attributes["gen_ai.input.messages"])) == prompt
    assert "echo: tell me" in str(attributes["gen_ai.output.messages"])
    # Parts as the conventions write them: an image by its URL, or by its type alone, never its bytes.
    assert json.loads(str(dict(with_parts.attributes or {})["gen_ai.input.messages"])) == [
        {
            "role": "user",
            "parts": [
                {"type": "text", "content": "what is this?"},
                {"type": "blob", "modality": "image", "mime_type": "image/png"},
                {"type": "uri", "modality": "image", "uri": "https://example.com/cat.png"},
            ],
        }
    ]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps what it is sent, answering each export after `delay_s` (a slow collector)."""

    def __init__(self, delay_s: float = 0) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.delay_s = delay_s

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        await asyncio.sleep(self.delay_s)
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> dict[bytes, Any]:
        """The spans received, by their id."""
        spans = {}
        for request in self.requests:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        spans[span.span_id] = span
        return spans


@contextlib.asynccontextmanager
async def receiving(delay_s: float = 0) -> AsyncIterator[tuple[Receiver, dict[str, str]]]:
    """A Receiver on loopback, and the OTEL_* variables that have a gateway export to it by OTLP/gRPC."""
    receiver = Receiver(delay_s)
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield (
            receiver,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        )
    finally:
        await server.stop(0)


async def test_spans_arrive_over_otlp(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with receiving() as (receiver, variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "llmrelay-under-test")
        primary.inject({"status": 503})
        gateway = await gateway_factory(two_backends(primary, local), server=TRACING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        await gateway.stop(grace_period_s=0, drain_s=0)  # flushes the batch

    for request in receiver.requests:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            assert service == "llmrelay-under-test"
    spans = receiver.spans()
    [rpc] = [span for span in spans.values() if span.name == COMPLETE]
    attempts = [span for span in spans.values() if span.parent_span_id == rpc.span_id]
    assert sorted(span.name for span in attempts) == ["chat gpt-test", "chat gpt-test"]
    assert {span.trace_id for span in attempts} == {rpc.trace_id} and rpc.parent_span_id == b""
    assert [event.name for event in rpc.events] == ["llmrelay.retry"]


async def test_tracing_without_the_extra_stops_the_start(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "llmrelay_server.tracing")
    with pytest.raises(ConfigError, match=r"pip install 'llmrelay\[otel\]'"):
        await gateway_factory(two_backends(primary, local), server=TRACING)


async def test_no_tracing_no_interceptor(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(two_backends(primary, local))
    assert gateway.tracing is None  # and so no tracing observer (see app._interceptors)


async def test_the_stop_waits_for_a_collector_that_is_down_at_most_the_export_timeout(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Batches of 2 spans, each refused for the 2 s timeout's retries: the calls leave a dozen batches queued, which
    # the SDK's own shutdown would try one after the other, a second or more each.
    config = traced_config(tmp_path, primary, local)
    timeout_s = 2
    collector_down = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": str(timeout_s),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
    }
    gateway = await spawn_gateway(config, env=clean_env(**collector_down))
    try:
        await gateway.wait_listening()
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb.LLMServiceStub(channel)
            for _ in range(15):
                await stub.Complete(chat(), timeout=5)
        started = time.monotonic()
        status = await gateway.stop(timeout_s=timeout_s + 6)
        took_s = time.monotonic() - started
    finally:
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()
    assert status == 0, await gateway.output()
    assert took_s < timeout_s + 3, f"the stop took {took_s:.1f} s"
    log = await gateway.output()
    assert "not exported within 2 s" in log and "Traceback" not in log, log


def traced_config(tmp_path: Path, primary: FakeUpstream, local: FakeUpstream, grace_period_s: float = 1) -> Path:
    """A configuration file for a gateway process with tracing on, which stops after no drain and the grace period."""
    config = tmp_path / "llmrelay.yaml"
    fields = f'usage_db: "{tmp_path / "usage.db"}", drain_s: 0, grace_period_s: {grace_period_s}, tracing: true'
    config.write_text(f"server: {{{fields}, log_calls: false}}\n" + two_backends(primary, local))
    return config


async def calls_then_stop(gateway: GatewayProcess, *, now: bool = False) -> int:
    """Five calls, then SIGTERM (and, when `now`, a second one once the gateway is stopping: stop now); its exit
    status. Killed if it is still running after that."""
    try:
        await gateway.wait_serving()
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            for _ in range(5):
                await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        gateway.process.send_signal(signal.SIGTERM)
        if now:
            await gateway.wait_for_line("shutting down")
            gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            return await gateway.process.wait()
    finally:
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()


async def test_a_second_stop_does_not_wait_for_the_collector(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Told to stop now (a second SIGTERM), the gateway stops at once: it waited the whole export timeout (a
    collector that does not answer) for the spans still queued. It says they are lost."""
    async with receiving(delay_s=3600) as (_, variables):
        variables["OTEL_EXPORTER_OTLP_TIMEOUT"] = "60"
        gateway = await spawn_gateway(traced_config(tmp_path, primary, local), env=clean_env(**variables))
        started = time.monotonic()
        status = await calls_then_stop(gateway, now=True)
        took_s = time.monotonic() - started
    log = await gateway.output()
    assert status == 0 and took_s < 20, (took_s, log)
    assert "tracing: stopping now, without waiting for the spans still queued, if any: they are lost" in log, log
    assert "Traceback" not in log, log


async def test_workers_are_given_the_export_timeout_to_stop(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A worker exports the spans still queued as it stops, for up to the export timeout: its supervisor waited only
    the drain, grace period and a 10 s margin before it killed it, and the spans were lost. A collector that takes 11 s
    to answer is 0.9 s past that."""
    async with receiving(delay_s=11) as (receiver, variables):
        variables |= {"OTEL_EXPORTER_OTLP_TIMEOUT": "30", "OTEL_BSP_SCHEDULE_DELAY": "60000"}  # exported at the stop
        config = traced_config(tmp_path, primary, local, grace_period_s=0.1)
        gateway = await spawn_gateway(config, "--workers", "2", env=clean_env(**variables))
        status = await calls_then_stop(gateway)
    log = await gateway.output()
    assert status == 0 and "killing it" not in log, log
    assert len([span for span in receiver.spans().values() if span.name == COMPLETE]) == 5, log


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"OTEL_PROPAGATORS": "tracecontext,b3"}, "OTEL_PROPAGATORS: 'b3' is no propagator installed"),
        ({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "lots"}, "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT: 'lots' is not a whole number"),
    ],
    ids=["propagators", "span-attribute-count"],
)
async def test_what_opentelemetry_reads_as_it_is_imported_stops_the_start_in_one_line(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream, variables: dict[str, str], message: str
) -> None:
    """OpenTelemetry reads these as it is imported, and raised a ValueError: a traceback at the start."""
    gateway = await spawn_gateway(traced_config(tmp_path, primary, local), env=clean_env(**variables))
    async with asyncio.timeout(30):
        assert await gateway.process.wait() == 1
    log = await gateway.output()
    assert log.startswith(f"llmrelay-server: configuration error: {message}") and log.count("\n") == 1, log


async def test_empty_otel_variables_are_unset(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As the specification reads them (`OTEL_EXPORTER_OTLP_TIMEOUT=${TIMEOUT}` with TIMEOUT unset): they were refused,
    and the SDK fails or logs a traceback for some of them."""
    async with receiving() as (receiver, variables):
        variables |= dict.fromkeys(
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE"), ""
        )
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        gateway = await gateway_factory(two_backends(primary, local), server=TRACING)
        assert gateway.tracing is not None and gateway.tracing.stop_timeout_s == tracing.DEFAULT_EXPORT_TIMEOUT_S
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5)
        await gateway.stop(grace_period_s=0, drain_s=0)  # flushes the batch
    assert [span.name for span in receiver.spans().values() if span.name == COMPLETE] == [COMPLETE]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned


async def test_a_sampler_as_the_readme_advises_is_taken(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "ParentBased_TraceIdRatio")  # in any case, as the SDK reads it
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    gateway = await gateway_factory(two_backends(primary, local), server=TRACING)
    assert gateway.tracing is not None
    assert "TraceIdRatioBased{0.1}" in gateway.tracing.provider.sampler.get_description()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE=5000: "),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE=-1: "),
        # The SDK logged a traceback and went on with its default.
        ({"OTEL_BSP_SCHEDULE_DELAY": "5s"}, "OTEL_BSP_SCHEDULE_DELAY: '5s' is not a whole number (of milliseconds)"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "OTEL_BSP_MAX_QUEUE_SIZE: 'lots' is not a whole number"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json' is not"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT: 'soon' is not a number of seconds"),
        # Milliseconds, as the specification has them: a stop with the collector down waited 10,000 s (1e308: every
        # export failed, its deadline past the platform's time).
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10000"}, "OTEL_EXPORTER_OTLP_TIMEOUT: '10000' is over 600 seconds"),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1e308"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: '1e308' is over 600"),
        # Every batch would fail, each logging the address, a password in it too.
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:SECRET@h:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT: not a URL (its"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1"}, "OTEL_EXPORTER_OTLP_ENDPOINT: not a URL (its host or port"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "SECRET"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: not an http(s) URL"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "SECRET:x"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: not a URL, HOST:PORT nor gRPC target",
        ),
        # The exporter would drop the header (the collector's key), logging it, and export without it.
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a,authorization=Bearer SE;CRET"},
            "OTEL_EXPORTER_OTLP_HEADERS: 'authorization' is not NAME=VALUE with the value URL-encoded",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer a,SECRET"},
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS: a header is not NAME=VALUE",
        ),
        # The SDK would warn and trace every call, where a tenth was meant.
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceratio"}, "OTEL_TRACES_SAMPLER: 'parentbased_traceratio' is no"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio "}, "OTEL_TRACES_SAMPLER: 'traceidratio ' is no sampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "10%"},
            "OTEL_TRACES_SAMPLER_ARG: '10%' is not the share of traces traceidratio keeps, a number from 0 to 1",
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG: '2' is"),
        # The SDK raised a ValueError: a traceback at the start.
        ({"OTEL_PROPAGATORS": "b3"}, "OTEL_PROPAGATORS: 'b3' is no propagator installed: baggage, tracecontext or"),
        ({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "abc"}, "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: 'abc' is not a whole"),
        ({"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "-5"}, "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT: '-5' is not a"),
        ({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "lots"}, "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT: 'lots' is not a whole number"),
        ({"OTEL_SPAN_EVENT_COUNT_LIMIT": "x"}, "OTEL_SPAN_EVENT_COUNT_LIMIT: 'x' is not a whole number from 0 up"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"},
            "OTEL_EXPORTER_OTLP_COMPRESSION: 'brotli' is no compression the exporter takes: gzip",
        ),
        # The HTTP exporter warned and sent the spans uncompressed.
        ({"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: 'zstd' is no"),
        # gRPC took the user and password as part of the host: every export failed, logging them.
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://u:SECRET@127.0.0.1:1"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: gRPC takes no user or password in the collector's address",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "u:SECRET@collector:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: gRPC takes no user or password",
        ),
        # The SDK took it, and every batch timed out at once.
        ({"OTEL_BSP_EXPORT_TIMEOUT": "-3"}, "OTEL_BSP_EXPORT_TIMEOUT: '-3' is not a whole number (of milliseconds)"),
        # The gRPC exporter logged a traceback and went on without the CA; the HTTP one failed every batch.
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read '/nonexistent/ca.pem' (No such file or directory)",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": "/nonexistent/client.key"},
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY: cannot read '/nonexistent/client.key'",
        ),
    ],
    ids=[
        "batch-over-queue", "negative-queue", "delay-with-unit", "queue-word", "traces-protocol", "timeout",
        "timeout-in-milliseconds", "timeout-past-time",
        "endpoint-port", "endpoint-ipv6", "endpoint-no-url", "grpc-endpoint", "header-semicolon", "header-comma",
        "sampler", "sampler-space", "sampler-arg", "sampler-arg-over-1", "propagator", "attribute-length",
        "span-attribute-length", "span-attribute-count", "span-event-count", "grpc-compression", "http-compression",
        "grpc-url-password", "grpc-target-password", "export-timeout", "grpc-ca-file", "client-key-file",
    ],
)  # fmt: skip
async def test_bad_otel_settings_stop_the_start_naming_the_variable(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    message: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        await gateway_factory(two_backends(primary, local), server=TRACING)
    assert str(caught.value).startswith(message), caught.value
    assert "SECRET" not in str(caught.value) and "SE;CRET" not in str(caught.value)
