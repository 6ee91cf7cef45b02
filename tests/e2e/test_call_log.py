"""The one log line per call: matched to its call by the request id the caller sees, with what the router did, in
JSON when asked; never a key or a prompt."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmrelay import v1 as pb
from llmrelay_server.calllog import request_id
from llmrelay_server.logs import JsonFormatter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import GatewayFactory, chat, png, read_all, start_server, stream_chat, two_backends
from upstream import FakeUpstream

CALLS = "llmrelay_server.calls"
SECRET_PROMPT = "the secret plan is purple-walrus-42"
KEY = "llmr-logged-0123456789abcdefghijklmn"
COMPLETE = "llmrelay.v1.LLMService/Complete"


def keyed(name: str, key: str) -> str:
    return f'auth:\n  keys:\n    - {{name: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}"}}\n'


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def lines(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    """The call lines as their JSON form parses, by request id."""
    formatter = JsonFormatter()
    found = {}
    for record in caplog.records:
        if record.name == CALLS:
            entry = json.loads(formatter.format(record))
            found[entry["request_id"]] = entry
    return found


def rid_of(metadata: Any) -> str:
    values = [value for name, value in metadata or () if name == "x-request-id"]
    assert len(values) == 1, metadata
    return str(values[0])


async def test_each_call_has_one_line_matched_by_its_request_id(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    auth = keyed("research", KEY)
    gateway = await gateway_factory(two_backends(primary, local) + auth, server="log_format: json")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        call = stub.Complete(chat(SECRET_PROMPT), timeout=5, metadata=[*bearer(KEY), ("x-request-id", "req-ok.1")])
        answer = await call
        assert rid_of(await call.trailing_metadata()) == "req-ok.1"

        primary.inject({"status": 503}, {"status": 503})  # a retry, then the fallback
        call = stub.Complete(chat(SECRET_PROMPT), timeout=5, metadata=bearer(KEY))
        fallback = await call
        generated = rid_of(await call.trailing_metadata())
        assert len(generated) == 32 and generated != "req-ok.1"

        primary.inject({"status": 503}, {"status": 503})
        local.inject({"status": 503}, {"status": 503})
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Complete(chat(SECRET_PROMPT), timeout=5, metadata=[*bearer(KEY), ("x-request-id", "req-fail")])
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rid_of(failure.value.trailing_metadata()) == "req-fail"

        primary.inject({"served_model": "gpt-test-2024-08-06"})  # as OpenAI's and Anthropic's APIs name a snapshot
        stream = stub.StreamComplete(
            stream_chat(SECRET_PROMPT), timeout=5, metadata=[*bearer(KEY), ("x-request-id", "req-stream")]
        )
        chunks = await read_all(stream)
        assert rid_of(await stream.trailing_metadata()) == "req-stream"

        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a wrong key: refused, logged, and the key nowhere
            await stub.Complete(chat(SECRET_PROMPT), timeout=5, metadata=[*bearer(KEY + "x"), ("x-request-id", "no")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    found = lines(caplog)
    ok = found["req-ok.1"]
    assert ok["msg"] == "call" and ok["level"] == "INFO" and ok["logger"] == CALLS
    assert ok["caller"] == "research" and ok["rpc"] == COMPLETE and ok["code"] == "OK"
    assert (ok["model"], ok["served_model"], ok["backend"]) == ("default", answer.model, "openai")
    assert ok["attempts"] == ["openai:succeeded"]
    usage = answer.usage
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert ok["cost_usd"] == pytest.approx(answer.usage.cost.usd_micros / 1e6)
    assert ok["duration_ms"] >= ok["overhead_ms"] >= 0 and ok["first_chunk_ms"] is None

    moved = found[generated]
    assert moved["attempts"] == ["openai:server_error", "openai:server_error", "ollama:succeeded"]
    assert (moved["backend"], moved["served_model"], moved["code"]) == ("ollama", fallback.model, "OK")
    assert moved["completion_tokens"] == fallback.usage.completion_tokens

    failed = found["req-fail"]
    assert failed["code"] == "UNAVAILABLE" and failed["backend"] is None and failed["served_model"] is None
    assert failed["attempts"] == ["openai:server_error"] * 2 + ["ollama:server_error"] * 2
    assert failed["prompt_tokens"] == failed["completion_tokens"] == 0

    streamed = found["req-stream"]
    assert streamed["rpc"] == "llmrelay.v1.LLMService/StreamComplete" and streamed["code"] == "OK"
    assert streamed["attempts"] == ["openai:succeeded"] and streamed["first_chunk_ms"] > 0
    # The model that answered, as the answer, the ledger and the metrics have it; not the one the gateway asked for.
    assert streamed["served_model"] == chunks[-1].model == "gpt-test-2024-08-06"
    assert streamed["completion_tokens"] == chunks[-1].usage.completion_tokens

    assert found["no"]["code"] == "UNAUTHENTICATED" and found["no"]["attempts"] == []
    assert len(found) == 5

    everything = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    assert KEY not in everything and SECRET_PROMPT not in everything and "purple" not in everything


async def test_content_is_logged_only_when_configured(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    gateway = await gateway_factory(two_backends(primary, local), server="log_content: true")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        await pb.LLMServiceStub(channel).Complete(
            chat(SECRET_PROMPT), timeout=5, metadata=[("x-request-id", "with-content"), ("x-llmrelay-caller", "me")]
        )
        parts = [pb.ContentPart(text=SECRET_PROMPT), pb.ContentPart(image=pb.ImagePart(data=png(4, 4)))]
        await pb.LLMServiceStub(channel).Complete(
            pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=parts)]),
            timeout=5,
            metadata=[("x-request-id", "in-parts")],
        )
    entry = lines(caplog)["with-content"]
    assert entry["prompt"] == SECRET_PROMPT and entry["caller"] == "me"
    assert lines(caplog)["in-parts"]["prompt"] == SECRET_PROMPT  # the text of the parts; never an image's bytes
    # The text form: one line, key=value.
    text = next(r.getMessage() for r in caplog.records if r.name == CALLS)
    assert text.startswith("call request_id=with-content caller=me ") and "\n" not in text


def test_only_a_sane_request_id_is_taken() -> None:
    assert request_id([("x-request-id", "abc-123_x.y:z")]) == "abc-123_x.y:z"
    for bad in ("", "has space", "a" * 129, "new\nline", "ünïcode"):
        generated = request_id([("x-request-id", bad)])
        assert generated != bad and len(generated) == 32
    assert len(request_id(None)) == 32


async def test_the_server_logs_only_json_when_asked(tmp_path: Path, local: FakeUpstream) -> None:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}", log_format: json, drain_s: 0}}\n')
    server = await start_server(config, local)
    await server.wait_listening()
    async with grpc.aio.insecure_channel(server.target) as channel:
        await pb.LLMServiceStub(channel).Complete(chat(SECRET_PROMPT), timeout=5, metadata=[("x-request-id", "p1")])
    server.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        await server.process.wait()
        output = await server.output()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    assert any(e.get("request_id") == "p1" and e["code"] == "OK" for e in entries)
    assert any("listening on" in e["msg"] for e in entries)
    assert SECRET_PROMPT not in output


async def test_times_are_measured_finer_than_the_servers_loop_clock(tmp_path: Path, local: FakeUpstream) -> None:
    """`llmrelay-server` runs on uvloop, whose clock moves in whole milliseconds, once a loop iteration, and a loopback
    upstream answers in less: an attempt's time (in the answer and the line), the line's overhead and a stream's first
    chunk are measured finer, never zero and never the whole call's (they read 0 or 1 ms each on the loop's clock)."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}", log_format: json, drain_s: 0}}\n')
    server = await start_server(config, local)
    await server.wait_listening()
    calls = 10
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        for i in range(calls):
            started = time.perf_counter()
            answer = await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", f"unary-{i}")])
            elapsed_s = time.perf_counter() - started
            attempt = answer.attempts[-1]
            assert 0 < attempt.duration.ToNanoseconds() / 1e9 < elapsed_s, (attempt, elapsed_s)
            stream = stub.StreamComplete(stream_chat(), timeout=5, metadata=[("x-request-id", f"s-{i}")])
            chunks = await read_all(stream)
            assert chunks[-1].attempts[-1].duration.ToNanoseconds() > 0, chunks[-1].attempts
    server.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        await server.process.wait()
        output = await server.output()
    found = {e["request_id"]: e for e in map(json.loads, output.splitlines()) if "request_id" in e}
    for i in range(calls):
        unary, stream = found[f"unary-{i}"], found[f"s-{i}"]
        assert 0 < unary["overhead_ms"] < unary["duration_ms"], unary
        assert 0 < stream["overhead_ms"] < stream["duration_ms"], stream
        assert 0 < stream["first_chunk_ms"] < stream["duration_ms"], stream


async def test_no_line_and_no_request_id_when_turned_off(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    gateway = await gateway_factory(two_backends(primary, local), server="log_calls: false")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = pb.LLMServiceStub(channel).Complete(chat(), timeout=5, metadata=[("x-request-id", "unlogged")])
        assert (await call).model
        assert not [value for name, value in await call.trailing_metadata() or () if name == "x-request-id"]
    assert not [record for record in caplog.records if record.name == CALLS]


async def test_the_servers_lines_come_out_while_it_runs(tmp_path: Path, local: FakeUpstream) -> None:
    """The log is written in batches, but a batch waits a moment, not for more lines or for the exit."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}", drain_s: 0}}\n')
    server = await start_server(config, local)
    await server.wait_listening()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await pb.LLMServiceStub(channel).Complete(chat(), timeout=5, metadata=[("x-request-id", "live-1")])
        async with asyncio.timeout(2):
            while not any("call request_id=live-1 " in line for line in server.log):  # noqa: ASYNC110 (read by its task)
                await asyncio.sleep(0.01)
    finally:
        server.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await server.process.wait()
    assert "stopped" in (await server.output()).splitlines()[-1]  # the last lines are flushed at the exit


async def test_a_log_nobody_reads_holds_up_no_call_and_no_stop(tmp_path: Path, local: FakeUpstream) -> None:
    """A log shipper stalled: the gateway's standard error, a pipe, is not read. Calls, health checks and SIGTERM go
    on all the same (the lines left unwritten wait for logs.EXIT_WAIT_S at the exit)."""
    config = tmp_path / "llmrelay.yaml"
    config.write_text(f'server: {{usage_db: "{tmp_path / "usage.db"}", log_content: true, drain_s: 0}}\n')
    server = await start_server(config, local)
    await server.wait_listening(read_on=False)
    calls = 200  # a line of some 1.5 kB each (its prompt in it): several times what the pipe holds
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb.LLMServiceStub(channel)
        for i in range(calls):
            await stub.Complete(chat("x" * 1000), timeout=5, metadata=[("x-request-id", f"unread-{i}")])
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    server.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):  # logs.EXIT_WAIT_S for the lines left, nobody reading them yet
        while server.process.returncode is None:  # noqa: ASYNC110 (not wait(), which waits for its pipes to be read)
            await asyncio.sleep(0.05)
    assert server.process.returncode == 0
    # What the pipe took before it was full; the rest was lost with the process, written nowhere else meanwhile.
    logged = [i for i in range(calls) if f"call request_id=unread-{i} " in await server.output()]
    assert logged == list(range(len(logged))) and 0 < len(logged) < calls


@pytest.mark.parametrize("leaves", [False, True], ids=["whole", "the caller leaves"])
async def test_a_streams_time_waiting_for_its_upstream_is_not_the_gateways_own(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    leaves: bool,
) -> None:
    """A stream's attempt lasts until its stream ends, not until its first chunk: the call's overhead (its time less
    its attempts') is the gateway's own, and its AttemptHistory says how long the upstream streamed."""
    caplog.set_level(logging.INFO, logger=CALLS)
    gateway = await gateway_factory(two_backends(primary, local))
    primary.inject({"trickle_s": 0.3})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = pb.LLMServiceStub(channel).StreamComplete(
            stream_chat("one two three"), timeout=10, metadata=[("x-request-id", "slow")]
        )
        if leaves:
            await call.read()
            await call.read()
            await asyncio.sleep(0.35)
            call.cancel()
        else:
            chunks = [chunk async for chunk in call]
            assert chunks[-1].attempts[-1].duration.ToTimedelta().total_seconds() >= 0.6
    for _ in range(100):  # the line comes as the call ends, after the caller has its status
        if "slow" in lines(caplog):
            break
        await asyncio.sleep(0.02)
    line = lines(caplog)["slow"]
    assert line["duration_ms"] >= 600, line
    assert line["overhead_ms"] < 200, line


async def test_a_backends_count_of_tokens_is_its_time_not_the_gateways_own(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """CountTokens counted by a vLLM server's /tokenize: the wait for it was logged as the gateway's overhead."""
    caplog.set_level(logging.INFO, logger=CALLS)
    vllm = await FakeUpstream(models=("qwen",), vllm=True).start()
    try:
        vllm.tokenize_stall_s = 0.6
        gateway = await gateway_factory(
            f"llm:\n  backends: [{{name: gpu, kind: vllm, base_url: '{vllm.base_url}', model: qwen}}]\n"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            request = pb.CountTokensRequest(model="qwen", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
            count = await pb.LLMServiceStub(channel).CountTokens(
                request, timeout=10, metadata=[("x-request-id", "counted")]
            )
    finally:
        await vllm.stop()
    assert count.encoding == "backend:gpu"
    line = lines(caplog)["counted"]
    assert line["duration_ms"] >= 600 and line["overhead_ms"] < 200, line


LEAVES = {
    "unary": ({"stall_s": 10}, False),
    "stream before its first chunk": ({"stall_s": 10}, True),
    "stream mid-way": ({"trickle_s": 0.3}, True),
}


@pytest.mark.parametrize(("fault", "streaming"), LEAVES.values(), ids=LEAVES.keys())
async def test_the_attempt_a_caller_leaves_is_logged_as_cancelled(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    streaming: bool,
) -> None:
    """The caller cancels while the upstream works: the line lists that attempt, its time is the upstream's and not
    the gateway's own, and nothing is logged as an error."""
    caplog.set_level(logging.INFO, logger=CALLS)
    gateway = await gateway_factory(two_backends(primary, local))
    primary.inject(fault)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        metadata = [("x-request-id", "left")]
        call: Any = (
            stub.StreamComplete(stream_chat("one two three four"), timeout=10, metadata=metadata)
            if streaming
            else stub.Complete(chat(), timeout=10, metadata=metadata)
        )
        if "trickle_s" in fault:
            await call.read()
        else:
            async with asyncio.timeout(5):
                while not primary.chat_requests:  # noqa: ASYNC110 (the upstream's plain data, no event to wait on)
                    await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        call.cancel()
        async with asyncio.timeout(5):
            while "left" not in lines(caplog):  # noqa: ASYNC110 (the line comes as the gateway sees the call end)
                await asyncio.sleep(0.02)
    line = lines(caplog)["left"]
    assert line["code"] == "CANCELLED"
    assert line["attempts"] == ["openai:cancelled"]
    # Billed (part of a stream served, or the prompt the upstream read): the line names the backend billed.
    assert line["backend"] == "openai" and line["prompt_tokens"] > 0, line
    assert line["duration_ms"] >= 500 and line["overhead_ms"] < 200, line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_a_line_names_no_model_for_an_rpc_that_asks_none(
    stub: pb.LLMServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    """GetUsage's `model` only filters the ledger, and Health has none: their lines name no model, where a call that
    leaves its model unset asks for the default."""
    caplog.set_level(logging.INFO, logger=CALLS)
    await stub.GetUsage(pb.GetUsageRequest(), timeout=5, metadata=[("x-request-id", "usage")])
    await stub.GetUsage(pb.GetUsageRequest(model="gpt-test"), timeout=5, metadata=[("x-request-id", "usage-of")])
    await stub.Health(pb.HealthRequest(), timeout=5, metadata=[("x-request-id", "health")])
    await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", "complete")])

    found = lines(caplog)
    models = {rid: found[rid]["model"] for rid in ("usage", "usage-of", "health", "complete")}
    assert models == {"usage": None, "usage-of": None, "health": None, "complete": "default"}
    (text,) = [m for r in caplog.records if (m := r.getMessage()).startswith("call request_id=usage ")]
    assert " model=- " in text, "the line for people says no model, as for every field without a value"


async def test_a_model_name_an_upstream_answers_with_is_cut_as_the_one_asked_for(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream may name its model with anything: a name of 100,000 characters made a line of 100 KB."""
    caplog.set_level(logging.INFO, logger=CALLS)
    primary.inject({"served_model": "m" * 100_000})
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        await stub.Complete(chat(), timeout=5, metadata=[("x-request-id", "long")])
    line = lines(caplog)["long"]
    assert (line["backend"], line["served_model"]) == ("openai", "m" * 128)


@pytest.mark.parametrize("log_content", [False, True])
async def test_an_upstreams_words_reach_the_log_and_traces_only_with_content(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    exported: InMemorySpanExporter,
    log_content: bool,
) -> None:
    """Upstreams quote requests in their errors (a 422 naming its input, as FastAPI's servers answer; a content
    filter's error event): the caller gets them, and the log and traces only as server.log_content allows prompts."""
    caplog.set_level(logging.INFO)
    quoting = json.dumps({"error": {"message": f"input rejected: {SECRET_PROMPT}"}})
    filtered = json.dumps({"error": {"message": f"prompt rejected by filter: {SECRET_PROMPT}"}})
    primary.inject(
        {"status": 422, "body": quoting},
        {"body": f"data: {filtered}\n\n", "content_type": "text/event-stream"},
        {"body": f"data: {filtered}\n\n", "content_type": "text/event-stream"},
    )
    server = "tracing: true, log_content: true" if log_content else "tracing: true"
    gateway = await gateway_factory(two_backends(primary, local), server=server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(SECRET_PROMPT), timeout=5)
        fallen_back = await read_all(stub.StreamComplete(stream_chat(SECRET_PROMPT), timeout=5))
    await gateway.stop(grace_period_s=0, drain_s=0)  # its spans ended and exported

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert SECRET_PROMPT in str(refused.value.details()), "the caller is told what its upstream said"
    assert fallen_back[-1].backend == "ollama"
    failed_attempts = [
        span.status.description or ""
        for span in exported.get_finished_spans()
        if span.name.startswith("chat ") and span.status.description
    ]
    assert len(failed_attempts) == 3, failed_attempts
    logged = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    # Named by its request id, as the call's own line is: the two lines of one failed call are found together.
    [rid] = [str(value) for key, value in refused.value.trailing_metadata() or () if key == "x-request-id"]
    assert f"Complete failed (request {rid}): INVALID_ARGUMENT" in logged
    for said in (logged, *failed_attempts):
        assert (SECRET_PROMPT in said) is log_content, said
    if not log_content:
        assert "HTTP 422: [the upstream's words: " in logged


@pytest.mark.parametrize("log_content", [False, True])
async def test_what_came_in_place_of_an_answer_reaches_the_log_and_traces_only_with_content(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    exported: InMemorySpanExporter,
    log_content: bool,
) -> None:
    """A page in place of JSON, or of events (a proxy's, echoing the request), is quoted in the attempt's error: as
    an upstream's words, which the log and traces show only as server.log_content allows prompts."""
    caplog.set_level(logging.INFO)
    primary.inject(
        {"body": f"proxy failed on: {SECRET_PROMPT}", "content_type": "application/json"},
        {"body": f"<p>proxy failed on: {SECRET_PROMPT}</p>\n", "content_type": "text/event-stream"},
    )
    server = "tracing: true, log_calls: true" + (", log_content: true" if log_content else "")
    gateway = await gateway_factory(two_backends(primary, local, "router: {retry: {max_retries: 0}}\n"), server=server)
    failures = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Complete(chat(SECRET_PROMPT, model="gpt-test", exact_model=True), timeout=5)
        failures.append(failed.value)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await read_all(
                stub.StreamComplete(stream_chat(SECRET_PROMPT, model="gpt-test", exact_model=True), timeout=5)
            )
        failures.append(failed.value)
    await gateway.stop(grace_period_s=0, drain_s=0)  # its spans ended and exported

    assert [failure.code() for failure in failures] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert all(SECRET_PROMPT in str(failure.details()) for failure in failures), "the caller is told what came"
    failed_attempts = [
        span.status.description or ""
        for span in exported.get_finished_spans()
        if span.name.startswith("chat ") and span.status.description
    ]
    assert len(failed_attempts) == 2, failed_attempts
    logged = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    assert "malformed answer: the answer is not JSON" in logged and "the answer is not an event stream" in logged
    for said in (logged, *failed_attempts):
        assert (SECRET_PROMPT in said) is log_content, said


async def test_a_skipped_backend_does_not_tell_a_call_what_another_calls_upstream_said(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A backend skipped for its open circuit says its last failure: another call's, whose upstream's words may
    repeat that call's request."""
    router = "router: {retry: {max_retries: 0}, circuit: {failure_threshold: 1, cooldown_s: 30}}\n"
    primary.inject({"status": 500, "body": json.dumps({"error": {"message": f"could not process: {SECRET_PROMPT}"}})})
    gateway = await gateway_factory(two_backends(primary, local, router))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        first = await stub.Complete(chat(SECRET_PROMPT), timeout=5)
        assert first.backend == "ollama"
        with pytest.raises(grpc.aio.AioRpcError) as skipped:
            await stub.Complete(chat("another caller's question", model="gpt-test", exact_model=True), timeout=5)
    said = str(skipped.value.details())
    assert "circuit is open" in said and "last failure: HTTP 500: [the upstream's words: " in said, said
    assert SECRET_PROMPT not in said


async def test_a_streams_first_chunk_is_timed_from_the_calls_start(
    gateway_factory: GatewayFactory, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Its admission included: a limit of tokens a minute counts the prompt before the router begins, a while for a
    long one. Timed from the router's start, the first chunk came 15 ms into a call whose caller waited 120 ms for it:
    a slow admission looked like a fast backend."""
    caplog.set_level(logging.INFO, logger=CALLS)
    gateway = await gateway_factory(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n',
        server="limits: {tokens_per_minute: 100000000}",
    )
    # Some 0.1-0.5 s to count, in a system message: the upstream's answer, an echo of the user's, stays short.
    system = pb.Message(role=pb.ROLE_SYSTEM, content=" ".join(f"word{i}" for i in range(300_000)))
    request = pb.StreamCompleteRequest(messages=[system, *stream_chat("hi").messages])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stream = pb.LLMServiceStub(channel).StreamComplete(
            request, timeout=30, metadata=[("x-request-id", "long-prompt")]
        )
        started = time.perf_counter()
        await stream.read()
        first_chunk_ms = (time.perf_counter() - started) * 1000
        await read_all(stream)
    line = lines(caplog)["long-prompt"]
    assert line["overhead_ms"] > 50, "the prompt's count, the gateway's own time"
    assert first_chunk_ms >= line["first_chunk_ms"] > line["overhead_ms"] * 0.8, (first_chunk_ms, line)
