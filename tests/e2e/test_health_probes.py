"""Health(probe=true) from many callers at once, or one after another: each upstream gets one probe (one a second at
most), and every caller the whole answer, within its deadline."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmrelay import v1 as pb
from llmrelay_server import health
from llmrelay_server.app import start_gateway
from llmrelay_server.backends import openai_compat, upstream_http
from llmrelay_server.config import load_config
from llmrelay_server.health import FRESH_PROBE_S, SERVICE_NAME
from support import ANTHROPIC_TEST_KEY, DIALECTS, OPENAI_TEST_KEY, GatewayFactory, two_backends, wait_until
from upstream import FakeUpstream

CALLERS = 100
IMPATIENT = 10


async def probe(stub: pb.LLMServiceAsyncStub, timeout: float) -> pb.HealthResponse | grpc.StatusCode:
    try:
        response: pb.HealthResponse = await stub.Health(pb.HealthRequest(probe=True), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return response


def checked_at(report: pb.HealthResponse | grpc.StatusCode) -> dict[str, int]:
    """When each backend's last probe ran, as the report says (ns)."""
    assert isinstance(report, pb.HealthResponse), report
    return {b.name: b.checked_at.ToNanoseconds() for b in report.backends}


async def test_concurrent_probes_send_each_upstream_one_probe(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Slow probes, so that every caller arrives while the first probe is still out.
    primary.probe_delay_s = local.probe_delay_s = 1.0
    await asyncio.sleep(FRESH_PROBE_S)  # the gateway's own probe at start is no longer fresh
    primary.probe_requests.clear()
    local.probe_requests.clear()
    at_start = checked_at(await stub.Health(pb.HealthRequest(), timeout=5))

    # The first callers' deadlines come before the probe ends: they are answered with what the last probe found (the
    # gateway's own at start), and the probe the others wait for goes on without them.
    answers = await asyncio.gather(
        *(probe(stub, timeout=0.5) for _ in range(IMPATIENT)),
        *(probe(stub, timeout=10) for _ in range(CALLERS - IMPATIENT)),
    )

    assert [checked_at(report) for report in answers[:IMPATIENT]] == [at_start] * IMPATIENT
    reports = answers[IMPATIENT:]
    for report in reports:
        assert all(checked_at(report)[name] > at for name, at in at_start.items()), "probed again"
        assert isinstance(report, pb.HealthResponse) and report.serving
        by_name = {b.name: b for b in report.backends}
        assert list(by_name) == ["openai", "ollama"]
        assert list(by_name["openai"].models) == ["gpt-test", "gpt-test-mini"]
        assert list(by_name["ollama"].models) == ["tiny"]
        assert all(b.reachable and b.latency.ToNanoseconds() > 0 for b in report.backends)
    assert 1 <= primary.probe_requests.count("/v1/models") <= 2, primary.probe_requests
    assert 1 <= local.probe_requests.count("/api/tags") <= 2, local.probe_requests


async def test_a_probe_follows_no_redirect(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """As no chat does: a probe that followed one found the models of another server, and called a backend healthy
    whose every chat failed for the redirect."""
    elsewhere = await FakeUpstream(models=("other",), ollama=True).start()
    try:
        primary.moved_to = f"{elsewhere.base_url}/models?token=secret"
        local.moved_to = f"{elsewhere.base_url.removesuffix('/v1')}/api/version"
        await asyncio.sleep(FRESH_PROBE_S)  # the gateway's own probe at start is no longer fresh
        report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
    finally:
        await elsewhere.stop()
    by_name = {backend.name: backend for backend in report.backends}
    for name, moved_to in (("openai", f"{elsewhere.base_url}/models"), ("ollama", local.moved_to)):
        assert not by_name[name].reachable
        said = by_name[name].last_error
        assert f"HTTP 307: a redirect to {moved_to}, which the gateway does not follow" in said, said
    assert "secret" not in by_name["openai"].last_error
    assert elsewhere.probe_requests == []


async def test_probes_one_after_the_other_send_an_upstream_one_probe_a_second(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream
) -> None:
    """Health is open to callers without a key: they cannot turn each of their calls into a request to every
    upstream, on the gateway's keys. A result that fresh is the probe's answer."""
    await asyncio.sleep(FRESH_PROBE_S)
    primary.probe_requests.clear()
    reports = [await probe(stub, timeout=5) for _ in range(20)]
    assert primary.probe_requests == ["/v1/models"]
    assert all(isinstance(r, pb.HealthResponse) and r.backends[0].reachable for r in reports)
    await asyncio.sleep(FRESH_PROBE_S)
    await probe(stub, timeout=5)
    assert primary.probe_requests == ["/v1/models"] * 2, "probed again once the last result is a second old"


@pytest.mark.parametrize("answer", [[], {}, {"data": 5}, {"data": [5]}, {"data": [{"object": "model"}]}])
async def test_a_models_list_that_is_not_one_marks_the_backend_unreachable(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, answer: Any
) -> None:
    """The SDK builds its page from whatever JSON came: the probe says what is wrong with it, and the gateway starts
    and serves from the other backend."""
    primary.models_answer = answer
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
        by_name = {b.name: b for b in report.backends}
        assert not by_name["openai"].reachable
        assert "the models list is not a JSON object whose `data` is a list of models" in by_name["openai"].last_error
        assert by_name["ollama"].reachable and report.serving


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
@pytest.mark.parametrize(("status", "reachable"), [(403, True), (401, False), (404, False), (500, False)])
async def test_a_key_that_may_not_list_models_leaves_its_backend_reachable(
    gateway_factory: GatewayFactory, primary: FakeUpstream, status: int, reachable: bool
) -> None:
    """OpenAI's restricted keys lack the models scope (a 403), and chat all the same: taken for unreachable, the
    backend kept readiness NOT_SERVING, and a load balancer the gateway out of rotation, while every call succeeded.
    A key refused (401), no list where one should be (404: a base_url without /v1) or a failing server is unreachable
    still."""
    primary.models_status = status
    with socket.socket() as closed:  # an Ollama nothing answers at: readiness hangs on the primary alone
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    key = ANTHROPIC_TEST_KEY if primary.dialect == "anthropic" else OPENAI_TEST_KEY
    gateway = await gateway_factory(f"""
llm:
  {primary.dialect}: {{api_key: "{key}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
  ollama: {{base_url: "{down}", model: tiny}}
""")  # fmt: skip
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
        backend = {b.name: b for b in report.backends}[primary.dialect]
        assert (backend.reachable, report.serving) == (reachable, reachable)
        assert backend.last_error.startswith(f"HTTP {status}: ")
        ready = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        assert (ready.status == health_pb2.HealthCheckResponse.SERVING) is reachable
        if reachable:
            assert "calls are sent all the same" in backend.last_error
            answer = await stub.Complete(pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")]))
            assert answer.backend == primary.dialect


async def test_a_default_model_its_backend_does_not_list_is_a_warning_once(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An Ollama model not pulled: every call for it fails NOT_FOUND, and the gateway, which has the list, said
    nothing. Once, not at every probe, nor after the backend was unreachable a while; again once it was listed and is
    no more. A model listed with its tag (NAME and NAME:latest are one to Ollama) is listed; an `openai` backend at
    another server than OpenAI's (which may serve names it does not list) is not told of."""
    caplog.set_level(logging.WARNING, logger="llmrelay_server.health")
    gateway = await gateway_factory(f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-unlisted}}
  ollama: {{base_url: "{local.base_url}", model: absent}}
""")  # fmt: skip

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "does not list its default model" in r.getMessage()]

    assert said() == [
        "backend ollama does not list its default model absent among the 1 models it serves: calls for it will fail;"
        " pull it (`ollama pull absent`), or set the backend's `model`"
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)

        async def probed() -> pb.HealthResponse:
            await asyncio.sleep(FRESH_PROBE_S)
            return await stub.Health(pb.HealthRequest(probe=True), timeout=10)

        await probed()
        local.moved_to = "http://127.0.0.1:9/elsewhere"  # unreachable a while: its probe lists nothing
        assert not {b.name: b for b in (await probed()).backends}["ollama"].reachable
        local.moved_to = None
        await probed()
        assert len(said()) == 1, "said once"
        listed = local.models
        try:
            local.models = (*listed, "absent:latest")
            await probed()
        finally:
            local.models = listed
        await probed()
        assert len(said()) == 2, "said again once it was no more listed"


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_models_list_nested_past_pythons_stack_marks_the_backend_unreachable(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The SDKs read the list with json.loads, whose RecursionError ended the gateway's start with a traceback (and,
    from an upstream turned so later, failed every Health(probe) INTERNAL)."""
    primary.models_answer = b"[" * 100_000 + b"]" * 100_000
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(probe=True), timeout=10)
    by_name = {b.name: b for b in report.backends}
    assert not by_name[primary.dialect].reachable
    assert (
        "the models list is not a JSON object whose `data` is a list of models" in by_name[primary.dialect].last_error
    )
    assert by_name["ollama"].reachable and report.serving


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"", "the models list is not JSON (Expecting value"),
        (b'{"data": [{"id": "\xff"}]}', "the models list is not JSON ('utf-8' codec can't decode byte 0xff"),
        (b"[5]", "the models list is not a JSON object whose `data` is a list of models"),
        # json.loads reads a lone surrogate, which no gRPC string can carry: every Health call failed INTERNAL.
        (b'{"data": [{"id": "m"}, {"id": "m\\ud800"}]}', "the models list has a model id that is no UTF-8 text"),
    ],
    ids=["empty", "not utf-8", "not a list of models", "lone surrogate"],
)
async def test_a_models_list_that_is_no_json_is_said_in_the_gateways_words(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, answer: bytes, said: str
) -> None:
    """As a call's own bad answer is: Health's last error read as Python's ("JSONDecodeError: Expecting value: ...",
    "UnicodeDecodeError: ...", "MalformedAnswerError: ...")."""
    primary.models_answer = answer
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(probe=True), timeout=10)
    backend = {b.name: b for b in report.backends}[primary.dialect]
    assert not backend.reachable
    assert backend.last_error.startswith(f"malformed answer: {said}"), backend.last_error


async def test_an_error_of_the_models_list_that_is_not_text_is_said_as_far_as_it_is(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Read by the SDK's json.loads, its message held a lone surrogate, and every Health call failed INTERNAL while
    the upstream answered so."""
    primary.models_status, primary.models_answer = 500, {"error": {"message": "down \ud800 for now"}}
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(probe=True), timeout=10)
    by_name = {b.name: b for b in report.backends}
    assert not by_name["openai"].reachable and "down ? for now" in by_name["openai"].last_error
    assert by_name["ollama"].reachable and report.serving


async def test_an_ollama_model_whose_name_is_not_text_marks_the_backend_unreachable(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its repr was taken for its name (and one nested past Python's stack failed the probe with a RecursionError)."""
    monkeypatch.setattr(local, "models", ("tiny", ["tiny"]))  # the upstream serves the whole session
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
    by_name = {b.name: b for b in report.backends}
    assert not by_name["ollama"].reachable
    assert by_name["ollama"].last_error.endswith("/api/tags lists a model whose name is not text")
    assert by_name["openai"].reachable and report.serving


@pytest.mark.parametrize(
    ("module", "bound", "seconds", "trickle_s", "said"),
    [
        (health, "PROBE_TIMEOUT_S", 1.0, 0.2, "the probe did not end within 1 s"),
        (openai_compat, "HEALTH_TIMEOUT_S", 0.5, 0.05, "the upstream did not answer in time"),
    ],
    ids=["the-probe-whole", "each-request-whole"],
)
async def test_a_probe_whose_answer_trickles_ends_and_the_gateway_starts(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    module: object,
    bound: str,
    seconds: float,
    trickle_s: float,
    said: str,
) -> None:
    """A models list a byte at a time, each within the wait for a piece of an answer: the probe went on as long as
    the upstream trickled, and the gateway, whose start awaits the first probe, did not start. The probe is bounded
    whole (PROBE_TIMEOUT_S), and so is each of its requests (HEALTH_TIMEOUT_S: it bounded each wait for a piece, and
    a byte every 0.05 s held the probe until PROBE_TIMEOUT_S)."""
    monkeypatch.setattr(module, bound, seconds)
    primary.models_trickle_s = trickle_s
    started = asyncio.get_running_loop().time()
    gateway = await asyncio.wait_for(gateway_factory(two_backends(primary, local)), timeout=10)
    assert asyncio.get_running_loop().time() - started < 3
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
    by_name = {b.name: b for b in report.backends}
    assert not by_name["openai"].reachable and by_name["openai"].last_error == said
    assert by_name["ollama"].reachable and report.serving


async def test_a_models_list_past_the_answer_bound_marks_the_backend_unreachable(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe's answers were read whole whatever came (300 MiB of Ollama's /api/tags, in memory at once). They are
    bounded as a completion's (the bound lowered here, to cross it cheaply): through the SDK (`/v1/models`) and
    Ollama's own API alike."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 100_000)
    primary.models_answer = {"object": "list", "data": [{"id": "x" * 200_000, "object": "model"}]}
    monkeypatch.setattr(local, "models", ("tiny", "y" * 200_000))  # the upstream serves the whole session
    gateway = await gateway_factory(two_backends(primary, local))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        report = await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
    for backend in report.backends:
        assert not backend.reachable and "the body is over 100000 bytes" in backend.last_error, backend.last_error


async def test_readiness_says_not_serving_while_the_first_probe_runs(
    tmp_path: Path, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The gateway serves from before its first probe ends (up to PROBE_TIMEOUT_S): its readiness was NOT_FOUND
    meanwhile, which a load balancer reads as a misconfigured check, and List left the service out."""
    primary.probe_delay_s = local.probe_delay_s = 2.0
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{listen: "127.0.0.1:{port}", usage_db: "{tmp_path / "usage.db"}"}}\n' + two_backends(primary, local)
    )
    starting = asyncio.create_task(start_gateway(load_config({}, config)))
    try:
        while True:  # until the port takes connections: the server has started
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            break
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            ready = await probe.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            listed = await probe.List(health_pb2.HealthListRequest(), timeout=5)
            live = await probe.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert not starting.done(), "the first probe had ended"
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert listed.statuses[SERVICE_NAME].status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            gateway = await asyncio.wait_for(starting, 10)
            try:
                ready = await probe.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                assert ready.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                await gateway.stop(grace_period_s=0, drain_s=0)
    finally:
        if not starting.done():
            starting.cancel()


async def watch_on_a_stalled_connection(port: int) -> asyncio.StreamWriter:
    """A connection whose window a StreamComplete answer has used up, its client reading none of it, with a Watch of
    the gateway's readiness opened on it after: the Watch's first write waits for a window that never opens. Made
    with h2, which opens no window but where asked to; the writer closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()

    def call(path: str, message: Any) -> None:
        stream = connection.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
                   ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        connection.send_headers(stream, headers)
        body = message.SerializeToString()
        connection.send_data(stream, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        writer.write(connection.data_to_send())

    call(
        "/llmrelay.v1.LLMService/StreamComplete",
        pb.StreamCompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="x")]),
    )
    received = 0
    while received < 65535:  # the connection's window: all the gateway may send before its client opens more
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the gateway closed the connection"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += event.flow_controlled_length
        writer.write(connection.data_to_send())  # settings' and pings' acknowledgements, never a window
    call("/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    return writer


async def test_a_watcher_that_reads_nothing_holds_up_no_change_of_readiness(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    """grpcio-health-checking writes a Watch's status holding the lock every change of status takes: one caller (no
    key needed) whose connection's window was used up held readiness SERVING with its only backend's circuit open,
    and the gateway's stop for good."""
    config = f"""
llm:
  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}
  order: [openai]
router: {{retry: {{max_retries: 0}}, circuit: {{failure_threshold: 1, cooldown_s: 30}}}}
"""
    gateway = await gateway_factory(config)
    primary.inject({"huge_content": 2_000_000})
    stalled = await watch_on_a_stalled_connection(gateway.port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            readiness = health_pb2_grpc.HealthStub(channel)
            ready = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert (await readiness.Check(ready, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            primary.inject({"status": 503})
            with pytest.raises(grpc.aio.AioRpcError):
                await pb.LLMServiceStub(channel).Complete(
                    pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")]), timeout=5
                )
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            async with asyncio.timeout(3):  # published within a state check or two
                while (await readiness.Check(ready, timeout=5)).status != not_serving:  # noqa: ASYNC110 (no event)
                    await asyncio.sleep(health.STATE_CHECK_S)
        async with asyncio.timeout(10):
            await gateway.stop(grace_period_s=0, drain_s=0)
    finally:
        stalled.close()


async def test_readiness_follows_a_circuit_while_a_slow_probe_is_out(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> None:
    """The background probes ran in the loop that reads the circuits every quarter second: while a slow upstream's
    probe was out (up to PROBE_TIMEOUT_S), a circuit that opened was published seconds late."""
    config = f"""
llm:
  openai: {{api_key: "sk-test", base_url: "{primary.base_url}", model: {primary.models[0]}}}
  order: [openai]
router: {{retry: {{max_retries: 0}}, circuit: {{failure_threshold: 1, cooldown_s: 30}}}}
"""
    gateway = await gateway_factory(config, server="health_interval_s: 1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        readiness = health_pb2_grpc.HealthStub(channel)
        ready = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        assert (await readiness.Check(ready, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
        primary.probe_delay_s = 4.0
        sent = len(primary.probe_requests)
        await wait_until(lambda: len(primary.probe_requests) > sent, timeout_s=5)  # the next background probe is out
        primary.inject({"status": 503})
        with pytest.raises(grpc.aio.AioRpcError):
            await pb.LLMServiceStub(channel).Complete(
                pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")]), timeout=5
            )
        await asyncio.sleep(4 * health.STATE_CHECK_S)
        status = (await readiness.Check(ready, timeout=5)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING, "the circuit is open, its only backend unusable"
        assert len(primary.probe_requests) == sent + 1, "the probe is still out"
