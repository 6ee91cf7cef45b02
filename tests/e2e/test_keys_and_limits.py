"""Callers authenticated by key and held to their limits and the gateway's, through a real gRPC channel: exact counts
whatever the interleaving of many concurrent callers, and refusals before any upstream is asked."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import GatewayProcess
from llmrelay import v1 as pb
from llmrelay_server import convert, tokens
from llmrelay_server.app import RESUME_BUDGETS_S, Gateway
from llmrelay_server.auth import _NOT_VALID, KEYS_FILE_CHECK_S, Caller
from llmrelay_server.config import ConfigError
from llmrelay_server.domain import Message, Role
from llmrelay_server.tokens import TokenCounter
from redis_server import RedisServer
from support import (
    FAST_ROUTER,
    GatewayFactory,
    RequestHeldBack,
    StubFactory,
    chat,
    children,
    details,
    png,
    read_all,
    start_server,
    stream_chat,
    two_backends,
    user,
    wait_until,
)
from upstream import FakeUpstream

RESEARCH_KEY = "llmr-research-0123456789abcdefghij"
LOCAL_KEY = "llmr-local-only-0123456789abcdefgh"
OTHER_KEY = "llmr-other-0123456789abcdefghijklm"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_yaml(*entries: str) -> str:
    return "auth:\n  keys:\n" + "".join(f"    - {entry}\n" for entry in entries)


def key_entry(name: str, key: str, extra: str = "") -> str:
    return f'{{name: {name}, sha256: "{sha256(key)}"{", " + extra if extra else ""}}}'


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def start(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, auth: str, server: str = ""
) -> tuple[Gateway, grpc.aio.Channel, pb.LLMServiceAsyncStub]:
    gateway = await gateway_factory(two_backends(primary, local) + auth, server=server)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return gateway, channel, pb.LLMServiceStub(channel)


@pytest.fixture
async def keyed(gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream) -> Any:
    auth = keys_yaml(key_entry("research", RESEARCH_KEY), key_entry("local-only", LOCAL_KEY, 'models: ["ollama/*"]'))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    yield channel, stub
    await channel.close()


# --- who gets in ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [[], bearer(OTHER_KEY), [("authorization", f"Basic {RESEARCH_KEY}")], [("authorization", "Bearer ")]],
    ids=["no key", "unknown key", "not bearer", "empty"],
)
async def test_a_call_without_a_known_key_is_unauthenticated(
    keyed: Any, primary: FakeUpstream, metadata: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, stub = keyed
    for call in (
        lambda: stub.Complete(chat(), metadata=metadata, timeout=5),
        lambda: read(stub.StreamComplete(stream_chat(), metadata=metadata, timeout=5)),
        lambda: stub.CountTokens(pb.CountTokensRequest(text="hi"), metadata=metadata, timeout=5),
        lambda: stub.GetUsage(pb.GetUsageRequest(), metadata=metadata, timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(caught.value)["ErrorInfo"].reason == "UNAUTHENTICATED"
        assert RESEARCH_KEY not in (caught.value.details() or "") and OTHER_KEY not in (caught.value.details() or "")
    assert primary.chat_requests == [], "refused before any upstream is asked"
    assert RESEARCH_KEY not in caplog.text and OTHER_KEY not in caplog.text, "no key in the log"
    assert "Traceback" not in caplog.text


async def test_a_call_without_a_known_key_is_logged_as_no_keys_caller_whatever_it_claims(
    keyed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmrelay_server.calls")
    _, stub = keyed
    claim = ("x-llmrelay-caller", "research")
    for metadata, logged_as in (
        ([claim, ("x-request-id", "no-key")], "anonymous"),
        ([*bearer(OTHER_KEY), claim, ("x-request-id", "unknown-key")], "key-"),  # its token's fingerprint
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(), metadata=metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        request_id = dict(metadata)["x-request-id"]
        line = next(r.getMessage() for r in caplog.records if f"request_id={request_id} " in r.getMessage())
        assert f" caller={logged_as}" in line and "caller=research" not in line, line
    # A probe of an open service is no one it claims either.
    assert (await stub.Health(pb.HealthRequest(), metadata=[claim, ("x-request-id", "probe")], timeout=5)).backends
    line = next(r.getMessage() for r in caplog.records if "request_id=probe " in r.getMessage())
    assert " caller=anonymous " in line, line


async def read(call: Any) -> list[pb.StreamCompleteResponse]:
    return [chunk async for chunk in call]


async def test_probes_reach_the_open_services_without_a_key(keyed: Any) -> None:
    channel, stub = keyed
    assert (await stub.Health(pb.HealthRequest(), timeout=5)).backends
    status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_keyed_call_to_an_open_method_is_its_keys_call(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """With Complete opened, a call with a key was passed on as anyone's: billed under a fingerprint of its token, so
    that its key's own GetUsage never showed it, nor did its key's limits or models hold it."""
    opened = '  open_services: ["grpc.health.v1.Health", "llmrelay.v1.LLMService/Complete"]\n'
    auth = keys_yaml(key_entry("research", RESEARCH_KEY), key_entry("local-only", LOCAL_KEY, 'models: ["ollama/*"]'))
    _, channel, stub = await start(gateway_factory, primary, local, auth + opened)
    async with channel:
        await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        await stub.Complete(chat(), timeout=5)  # open to a caller without a key
        await stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5)  # or with one the gateway does not know
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(model="openai/gpt-test"), metadata=bearer(LOCAL_KEY), timeout=5)
        assert details(caught.value)["ErrorInfo"].reason == "MODEL_NOT_ALLOWED"
        usage = await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert [(r.caller, r.requests) for r in usage.records] == [("research", 1)]


@pytest.mark.parametrize(
    "entry", ["grpc.health.v1.health", "llmrelay.v1.LLMService.Health", "llmrelay.v1.LLMService/Healthz", "nonsense"]
)
async def test_an_open_service_the_gateway_does_not_serve_stops_the_start(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, entry: str
) -> None:
    # Taken without a word, a misspelt open service left the probes it was to open refused, and the gateway never ready.
    auth = keys_yaml(key_entry("research", RESEARCH_KEY)) + f'  open_services: ["grpc.health.v1.Health", "{entry}"]\n'
    with pytest.raises(ConfigError) as caught:
        await start(gateway_factory, primary, local, auth)
    assert str(caught.value).startswith(f"auth.open_services: {entry!r} is no service (package.Service) or method")
    assert "grpc.health.v1.Health, grpc.reflection.v1.ServerReflection" in str(caught.value)


async def test_a_keyed_caller_is_billed_as_its_key_whatever_it_claims(keyed: Any, primary: FakeUpstream) -> None:
    _, stub = keyed
    metadata = [*bearer(RESEARCH_KEY), ("x-llmrelay-caller", "someone-else")]
    assert (await stub.Complete(chat(), metadata=metadata, timeout=5)).backend == "openai"
    chunks = await read(stub.StreamComplete(stream_chat(), metadata=metadata, timeout=5))
    assert chunks[-1].usage.total_tokens > 0
    records = (await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(RESEARCH_KEY), timeout=5)).records
    assert {r.caller for r in records} == {"research"}
    assert sum(r.requests for r in records) == 2


async def test_a_key_reads_its_own_usage_unless_it_may_read_all(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    operator_key = "llmr-operator-0123456789abcdefghijk"
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY),
        key_entry("other", OTHER_KEY),
        key_entry("operator", operator_key, "read_all_usage: true"),
    )
    _, channel, stub = await start(gateway_factory, primary, local, auth)

    async def callers(key: str, caller: str | None = None) -> dict[str, int]:
        request = pb.GetUsageRequest(caller=caller)
        records = (await stub.GetUsage(request, metadata=bearer(key), timeout=5)).records
        return {r.caller: r.requests for r in records}

    async with channel:
        for key, calls in ((RESEARCH_KEY, 2), (OTHER_KEY, 1)):
            for _ in range(calls):
                await stub.Complete(chat(), metadata=bearer(key), timeout=5)
        assert await callers(OTHER_KEY) == {"other": 1}
        assert await callers(OTHER_KEY, caller="other") == {"other": 1}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await callers(OTHER_KEY, caller="research")
        assert await callers(operator_key) == {"research": 2, "other": 1}
        assert await callers(operator_key, caller="research") == {"research": 2}
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = details(refused.value)["ErrorInfo"]
    assert (info.reason, dict(info.metadata)) == (
        "USAGE_NOT_ALLOWED",
        {"caller": "other", "requested_caller": "research"},
    )
    assert refused.value.details() == (
        "the key 'other' may read only its own usage, not that of caller 'research'; leave GetUsage's caller"
        " unset for its own, or use a key with read_all_usage"
    )


async def test_a_key_limited_to_some_models_gets_no_other_even_by_fallback(
    keyed: Any, primary: FakeUpstream, local: FakeUpstream
) -> None:
    _, stub = keyed
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(model="gpt-test"), metadata=bearer(LOCAL_KEY), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = details(caught.value)["ErrorInfo"]
    assert (info.reason, info.metadata["caller"], info.metadata["model"]) == (
        "MODEL_NOT_ALLOWED",
        "local-only",
        "gpt-test",
    )
    # The default chain starts at openai: this key is served by the one backend it may use.
    assert (await stub.Complete(chat(), metadata=bearer(LOCAL_KEY), timeout=5)).backend == "ollama"
    # When that backend fails, the fallback it may not use is not tried.
    local.inject({"status": 503}, {"status": 503})
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await stub.Complete(chat("tiny"), metadata=bearer(LOCAL_KEY), timeout=5)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert primary.chat_requests == []


async def test_a_key_given_an_alias_takes_it_but_no_fallback_it_is_not_given(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A key's patterns were matched against the route an alias resolves to alone: a key given "fast" was refused
    "fast". An alias named as another backend's model ("ollama/big", pointing at openai) is no grant of "ollama/*"."""
    aliases = '  aliases: {fast: "ollama/tiny", "ollama/big": "openai/gpt-test"}\n'
    alias_only = key_entry("alias-only", RESEARCH_KEY, 'models: ["fast"]')
    auth = keys_yaml(alias_only, key_entry("local-only", LOCAL_KEY, 'models: ["ollama/*"]'))
    gateway = await gateway_factory(two_backends(primary, local, aliases + FAST_ROUTER) + auth)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        assert (await stub.Complete(chat(model="fast"), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "ollama"
        stream = stub.StreamComplete(stream_chat(model="fast"), metadata=bearer(RESEARCH_KEY), timeout=5)
        assert (await read_all(stream))[-1].backend == "ollama"
        for refused, key in (("ollama/tiny", RESEARCH_KEY), ("ollama/big", LOCAL_KEY)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Complete(chat(model=refused), metadata=bearer(key), timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused
        local.inject({"status": 503}, {"status": 503})
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.Complete(chat(model="fast"), metadata=bearer(RESEARCH_KEY), timeout=5)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert primary.chat_requests == [], "no fallback the key was not given, nor an alias named as ollama's"


async def test_a_key_limited_to_a_backend_gets_no_model_named_as_that_backends_on_another(
    keyed: Any, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A backend takes any model name it is asked for: "openai/ollama/tiny" is backend openai's model "ollama/tiny",
    which a key's "ollama/*" matched, name alone, and so reached the paid backend with the operator's key."""
    _, stub = keyed
    request = chat(model="openai/ollama/tiny", exact_model=True)
    for call in (
        stub.Complete(request, metadata=bearer(LOCAL_KEY), timeout=5),
        read_all(
            stub.StreamComplete(
                stream_chat(model="openai/ollama/tiny", exact_model=True), metadata=bearer(LOCAL_KEY), timeout=5
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(caught.value)["ErrorInfo"].reason == "MODEL_NOT_ALLOWED"
    count = pb.CountTokensRequest(model="openai/ollama/tiny", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
    assert (await stub.CountTokens(count, metadata=bearer(LOCAL_KEY), timeout=5)).estimated
    assert primary.chat_requests == primary.tokenize_requests == []
    assert (await stub.Complete(chat(model="ollama/tiny"), metadata=bearer(LOCAL_KEY), timeout=5)).backend == "ollama"


async def test_the_keys_file_is_reread_when_it_changes(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: [{key_entry('research', RESEARCH_KEY)}]\n")
    _, channel, stub = await start(gateway_factory, primary, local, f'auth: {{keys_file: "{keys_file}"}}\n')
    async with channel:
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        keys_file.write_text(f"keys: [{key_entry('other', OTHER_KEY)}]\n")  # research's key revoked, other's added
        for _ in range(60):
            try:
                await stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        keys_file.write_text("keys: [{name: broken}]\n")  # a broken file keeps the keys in force
        await asyncio.sleep(1.5)
        assert (await stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5)).backend == "openai"


async def test_a_key_renamed_in_the_keys_file_is_told_of(
    keyed_by_a_file: KeyedByAFile, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Limits, budgets and the ledger know a caller by its key's name: a key renamed starts anew, which an operator
    tidying names would not expect unless told."""
    _, channel, stub, gateway = keyed_by_a_file
    (tmp_path / "keys.yaml").write_text(f"keys: [{key_entry('research-team', RESEARCH_KEY)}]\n")
    gateway.keys.reload()
    await logged(caplog, "key 'research' is now named 'research-team': its limits and today's budget start anew")
    async with channel:
        await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        usage = await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert {record.caller for record in usage.records} == {"research-team"}


def headers_seen(gateway: Gateway) -> asyncio.Event:
    """Set once the gateway has looked a call's key up: the auth interceptor has run on the call's headers."""
    seen, find = asyncio.Event(), gateway.keys.find

    def finding(key: str) -> Caller | None:
        seen.set()
        return find(key)

    gateway.keys.find = finding  # type: ignore[method-assign]
    return seen


async def test_a_key_revoked_between_a_calls_headers_and_its_request_is_refused(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key was looked at on the call's headers alone: a call that held its request back was answered, and billed
    to the key, however long after the key's revocation (a leaked key's holder could open calls ahead of it)."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.auth")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: [{key_entry('research', RESEARCH_KEY)}]\n")
    gateway, channel, stub = await start(gateway_factory, primary, local, f'auth: {{keys_file: "{keys_file}"}}\n')
    seen = headers_seen(gateway)
    held = await asyncio.to_thread(
        RequestHeldBack, gateway.port, "/llmrelay.v1.LLMService/Complete", bearer(RESEARCH_KEY)
    )
    await asyncio.wait_for(seen.wait(), 5)
    keys_file.write_text(f"keys: [{key_entry('other', OTHER_KEY)}]\n")  # research's key revoked
    gateway.keys.reload()
    await logged(caplog, "reloaded: 1 keys in force")
    await asyncio.to_thread(held.send, chat())
    code, message, _ = await asyncio.to_thread(held.answer)
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED.value[0], _NOT_VALID)
    assert primary.chat_requests == []
    async with channel:  # the key that a reload changed meanwhile, as it is now
        assert (await stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5)).backend == "openai"


async def workers_keyed_by_file(tmp_path: Path, local: FakeUpstream) -> tuple[Path, GatewayProcess]:
    """Two workers without Redis, their keys in a keys file (research's key), started: the file, and the gateway."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: [{key_entry('research', RESEARCH_KEY)}]\n")
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path / "usage.db"}", drain_s: 0, grace_period_s: 5}}\n'
        f'auth: {{keys_file: "{keys_file}"}}\n'
    )
    gateway = await start_server(config, local, "--workers", "2")
    try:
        await gateway.wait_listening()
        await gateway.wait_for_line("(2 workers)")
    except BaseException:
        await gateway.stop()
        raise
    return keys_file, gateway


async def test_workers_without_redis_take_no_keys_file_that_brings_limits(tmp_path: Path, local: FakeUpstream) -> None:
    # Each worker would enforce them alone, N times each limit: refused as at start, the keys in force staying.
    keys_file, gateway = await workers_keyed_by_file(tmp_path, local)
    try:
        # research's key revoked, other's added with a limit: all or nothing, as for any file that cannot be taken
        keys_file.write_text(f"keys: [{key_entry('other', OTHER_KEY, 'limits: {requests_per_minute: 3}')}]\n")
        refused = await gateway.wait_for_line("keys file not reloaded")
        assert "'other'" in refused and "state.redis_url" in refused
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb.LLMServiceStub(channel)
            answers = [await stub.Complete(chat("tiny"), metadata=bearer(RESEARCH_KEY), timeout=5) for _ in range(4)]
            assert [answer.backend for answer in answers] == ["ollama"] * 4
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Complete(chat("tiny"), metadata=bearer(OTHER_KEY), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert await gateway.stop() == 0


@pytest.mark.parametrize(
    "refused",
    [f"keys: [{key_entry('other', OTHER_KEY, 'limits: {requests_per_minute: 3}')}]\n", "keys: [{name: a\n"],
    ids=["limits without redis", "not yaml"],
)
async def test_a_worker_restarted_serves_the_keys_the_others_do(
    tmp_path: Path, local: FakeUpstream, refused: str
) -> None:
    """A worker restarted (a crash) after a keys file the workers refused took it (limits each worker would enforce
    alone), or stopped on it as it started (a broken file) and was restarted again and again: the workers serve the
    copy of the file as last taken, which the supervisor keeps."""
    keys_file, gateway = await workers_keyed_by_file(tmp_path, local)
    try:
        keys_file.write_text(refused)
        await gateway.wait_for_line("keys file not reloaded")
        os.kill(children(gateway.process.pid)[0], signal.SIGKILL)
        await gateway.wait_for_line("restarting")
        async with asyncio.timeout(20):
            # Two workers, the supervisor, and the new worker.
            while sum("listening on" in line for line in gateway.log) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        async def on_a_new_connection(key: str) -> str:
            options = [("grpc.use_local_subchannel_pool", 1)]  # each its own connection, which the kernel spreads
            async with grpc.aio.insecure_channel(gateway.target, options=options) as channel:
                try:
                    await pb.LLMServiceStub(channel).Complete(chat("tiny"), metadata=bearer(key), timeout=5)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

        assert await asyncio.gather(*(on_a_new_connection(RESEARCH_KEY) for _ in range(16))) == ["OK"] * 16
        assert set(await asyncio.gather(*(on_a_new_connection(OTHER_KEY) for _ in range(16)))) == {"UNAUTHENTICATED"}
        assert sum("exited" in line for line in gateway.log) == 1, "the restarted worker stopped as it started"
    finally:
        assert await gateway.stop() == 0


async def logged(caplog: pytest.LogCaptureFixture, text: str, within_s: float = 5.0) -> None:
    """Waits until the log has a line with this text."""
    for _ in range(round(within_s / 0.05)):
        if text in caplog.text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not logged within {within_s} s: {text}")


class KeyedByFile(NamedTuple):
    keys_file: Path
    content: str
    """What the file said when the gateway started: the research key."""
    channel: grpc.aio.Channel
    stub: pb.LLMServiceAsyncStub


@pytest.fixture
async def keyed_by_file(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> KeyedByFile:
    """A gateway whose keys come from a keys file, which admits the research key; its log captured from INFO."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.auth")
    keys_file = tmp_path / "keys.yaml"
    content = f"keys: [{key_entry('research', RESEARCH_KEY)}]\n"
    await asyncio.to_thread(keys_file.write_text, content)
    _, channel, stub = await start(gateway_factory, primary, local, f'auth: {{keys_file: "{keys_file}"}}\n')
    return KeyedByFile(keys_file, content, channel, stub)


async def test_a_keys_file_saved_in_place_revokes_no_key_while_it_is_empty(
    keyed_by_file: KeyedByFile, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file, content, channel, stub = keyed_by_file

    def complete() -> Any:
        return stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)

    async with channel:
        with keys_file.open("w") as saving:  # truncated, as an editor or a config tool saving in place does
            await logged(caplog, "keys file")  # the gateway has read it empty (its first line of the keys)
            results = await concurrently(10, complete)
            assert [r for r in results if isinstance(r, grpc.aio.AioRpcError)] == [], "the keys in force stay"
            await asyncio.sleep(1.5 * KEYS_FILE_CHECK_S)  # one more look at the file, still empty
            saving.write(content)
        await logged(caplog, "reloaded: 1 keys in force")
        assert (await complete()).backend == "openai"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, "one warning for the empty file, not one per look"
    assert "empty" in warnings[0] and "`keys: []` to admit nobody" in warnings[0]


async def test_a_keys_file_replaced_by_one_of_the_same_time_and_size_is_reread(
    keyed_by_file: KeyedByFile, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # As `cp -p` or `rsync -t` put it in place: another key (a sha256 is 64 digits whatever the key), the old file's
    # modification time. The revoked key went on working until a SIGHUP.
    keys_file, content, channel, stub = keyed_by_file
    replacement = tmp_path / "keys.yaml.new"
    replacement.write_text(content.replace("research", "replaced").replace(sha256(RESEARCH_KEY), sha256(OTHER_KEY)))
    before = keys_file.stat()
    assert replacement.stat().st_size == before.st_size
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    async with channel:
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        os.replace(replacement, keys_file)
        await logged(caplog, "reloaded: 1 keys in force")
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5)).backend == "openai"


async def test_a_keys_file_that_admits_nobody_revokes_every_key_and_says_so(
    keyed_by_file: KeyedByFile, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file, _, channel, stub = keyed_by_file
    async with channel:
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        keys_file.write_text("keys: []\n")
        await logged(caplog, "no keys in force")
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [r.levelno for r in caplog.records if "no keys in force" in r.getMessage()] == [logging.WARNING]


async def test_a_keys_file_that_admits_nobody_at_start_says_so(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a re-read that leaves no key in force says so: the gateway started refusing every call without a word."""
    keys_file = tmp_path / "keys.yaml"
    await asyncio.to_thread(keys_file.write_text, "keys: []\n")
    _, channel, stub = await start(gateway_factory, primary, local, f'auth: {{keys_file: "{keys_file}"}}\n')
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    said = [r for r in caplog.records if "holds no keys" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.WARNING, f"keys file {keys_file} holds no keys, nor auth.keys: every call that needs a key is refused")
    ]


async def test_a_keys_file_saved_once_not_in_utf8_keeps_the_keys_and_the_watch(
    keyed_by_file: KeyedByFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A file saved in another encoding is broken as any other: the keys in force stay, the log says why, and the next
    good save (here a revocation) takes effect."""
    keys_file, content, channel, stub = keyed_by_file
    async with channel:
        await asyncio.to_thread(keys_file.write_bytes, f"# clés\n{content}".encode("latin-1"))
        await logged(caplog, "not UTF-8 text")
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        await asyncio.to_thread(keys_file.write_text, "keys: []\n")
        await logged(caplog, "no keys in force")
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not [r for r in caplog.records if r.exc_info], "a broken file is no traceback"


# --- limits -----------------------------------------------------------------------------------------------------


async def concurrently(count: int, call: Any) -> list[Any]:
    async def one() -> Any:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            return error

    return list(await asyncio.gather(*(one() for _ in range(count))))


def refusals(results: Sequence[Any], reason: str, subject: str) -> int:
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        found = details(error)
        assert found["ErrorInfo"].reason == reason
        assert found["QuotaFailure"].violations[0].subject == subject
        assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
    return len(refused)


async def test_requests_per_minute_admit_exactly_the_limit(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {requests_per_minute: 5}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    async with channel:
        results = await concurrently(20, lambda: stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5))
    assert refusals(results, "REQUESTS_PER_MINUTE_EXCEEDED", "key:research") == 15
    assert len(primary.chat_requests) == 5, "refused calls never reach an upstream"


async def test_a_call_its_handler_refuses_gets_that_refusal_not_the_limits(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Over its minute's requests, a key asking for a model it may not use was told to wait a minute, and retried.
    auth = keys_yaml(key_entry("local-only", LOCAL_KEY, 'models: ["ollama/*"], limits: {requests_per_minute: 1}'))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    async with channel:
        assert (await stub.Complete(chat(), metadata=bearer(LOCAL_KEY), timeout=5)).backend == "ollama"
        outcomes = []
        for request in (chat(model="gpt-test"), pb.CompleteRequest(), chat()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(request, metadata=bearer(LOCAL_KEY), timeout=5)
            outcomes.append((refused.value.code().name, details(refused.value)["ErrorInfo"].reason))
    assert outcomes == [
        ("PERMISSION_DENIED", "MODEL_NOT_ALLOWED"),
        ("INVALID_ARGUMENT", "INVALID_REQUEST"),
        ("RESOURCE_EXHAUSTED", "REQUESTS_PER_MINUTE_EXCEEDED"),
    ]
    assert primary.chat_requests == []


async def test_a_call_while_the_gateway_drains_is_told_to_go_elsewhere_not_to_wait_for_a_limit(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Over a limit, a call that came in during the shutdown's drain was told to wait the limit out (a minute), for an
    instance that was going away, rather than SHUTTING_DOWN's retry on another at once; and it reserved first."""
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY, "limits: {requests_per_minute: 1}"), key_entry("other", OTHER_KEY)
    )
    gateway, channel, stub = await start(
        gateway_factory, primary, local, auth, server="limits: {requests_per_minute: 1}"
    )
    async with channel:
        await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        gateway.servicer.start_draining()  # as the stop begins its drain
        refusals = []
        for metadata in (
            bearer(RESEARCH_KEY),
            bearer(OTHER_KEY),
        ):  # over its key's limit and the gateway's; the gateway's
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(chat(), metadata=metadata, timeout=5)
            refusals.append((refused.value.code(), details(refused.value)["ErrorInfo"].reason))
    assert refusals == [(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")] * 2


async def test_a_call_its_handler_refuses_takes_none_of_the_limits(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Each counted as one of the minute's requests: a client stuck on a bad request locked its key out for a minute.
    limits = "limits: {requests_per_minute: 2, tokens_per_minute: 100000, concurrent_streams: 1}"
    _, channel, stub = await start(
        gateway_factory, primary, local, keys_yaml(key_entry("research", RESEARCH_KEY, limits))
    )
    key = bearer(RESEARCH_KEY)
    async with channel:
        complete_bytes: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/llmrelay.v1.LLMService/Complete"
        )
        codes = []
        for _ in range(2):
            for refused in (
                stub.Complete(pb.CompleteRequest(), metadata=key, timeout=5),
                stub.Complete(chat(model="no-such-model"), metadata=key, timeout=5),
                complete_bytes(b"\xff\xff\xff", metadata=key, timeout=5),  # no CompleteRequest
                stub.Embed(pb.EmbedRequest(), metadata=key, timeout=5),
                read(stub.StreamComplete(pb.StreamCompleteRequest(), metadata=key, timeout=5)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await refused
                codes.append(caught.value.code().name)
        assert (
            codes == ["INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT"] * 2
        )
        for _ in range(2):
            assert (await stub.Complete(chat(), metadata=key, timeout=5)).message.content
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await stub.Complete(chat(), metadata=key, timeout=5)
    assert details(over.value)["ErrorInfo"].reason == "REQUESTS_PER_MINUTE_EXCEEDED"
    assert len(primary.chat_requests) == 2


async def test_each_call_is_checked_as_its_own_whatever_called_before_it(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # The interceptors wrap a method's handler once for all its calls: refusals, a key without limits and one with
    # them, in turn on the same methods, must each still get their own answer, request id and count.
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY, "limits: {requests_per_minute: 2}"), key_entry("other", OTHER_KEY)
    )
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    unknown = bearer("llmr-unknown-0123456789abcdefghijk")

    async def outcome(metadata: list[tuple[str, str]], stream: bool = False) -> tuple[str, str]:
        call: Any = (
            stub.StreamComplete(stream_chat(), metadata=metadata, timeout=5)
            if stream
            else stub.Complete(chat(), metadata=metadata, timeout=5)
        )
        try:
            await (read(call) if stream else call)
            result = "OK"
        except grpc.aio.AioRpcError as error:
            result = f"{error.code().name}: {details(error)['ErrorInfo'].reason}"
        return result, dict(await call.trailing_metadata())["x-request-id"]

    async with channel:
        sequence = [[], unknown, bearer(OTHER_KEY), bearer(RESEARCH_KEY), bearer(OTHER_KEY), bearer(RESEARCH_KEY)]
        sequence += [bearer(RESEARCH_KEY), bearer(OTHER_KEY), [], bearer(OTHER_KEY)]
        outcomes = [await outcome(metadata) for metadata in sequence]
        streamed = [await outcome(metadata, stream=True) for metadata in (bearer(RESEARCH_KEY), bearer(OTHER_KEY), [])]
    assert [result for result, _ in outcomes] == [
        "UNAUTHENTICATED: UNAUTHENTICATED", "UNAUTHENTICATED: UNAUTHENTICATED", "OK", "OK", "OK", "OK",
        "RESOURCE_EXHAUSTED: REQUESTS_PER_MINUTE_EXCEEDED", "OK", "UNAUTHENTICATED: UNAUTHENTICATED", "OK",
    ]  # fmt: skip
    assert [result for result, _ in streamed] == [
        "RESOURCE_EXHAUSTED: REQUESTS_PER_MINUTE_EXCEEDED", "OK", "UNAUTHENTICATED: UNAUTHENTICATED"
    ]  # fmt: skip
    request_ids = [rid for _, rid in outcomes + streamed]
    assert len(set(request_ids)) == len(request_ids), "a request id of its own for every call"
    assert len(primary.chat_requests) == 7, "only the admitted calls reached an upstream"


async def test_retries_and_fallbacks_count_once(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {requests_per_minute: 2}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    primary.inject({"status": 503}, {"status": 503})
    async with channel:
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "ollama"
        assert (await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        with pytest.raises(grpc.aio.AioRpcError) as third:
            await stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tokens_per_minute_are_reserved_before_they_are_spent(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    request = chat("count these words", model="gpt-test", options=pb.CompletionOptions(max_tokens=50))
    messages = (Message(Role.USER, "count these words"),)
    reserved = TokenCounter().count_chat("gpt-test", messages).tokens + 50
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, f"limits: {{tokens_per_minute: {3 * reserved + 1}}}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    primary.inject(*[{"stall_s": 0.3}] * 10)  # all are admitted or refused before any answer settles its tokens
    async with channel:
        results = await concurrently(10, lambda: stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5))
    assert refusals(results, "TOKENS_PER_MINUTE_EXCEEDED", "key:research") == 7
    assert len(primary.chat_requests) == 3


async def test_concurrent_streams_are_limited_and_freed(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {concurrent_streams: 2}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    primary.inject(*[{"trickle_s": 0.2}] * 6)
    async with channel:
        results = await concurrently(
            6, lambda: read(stub.StreamComplete(stream_chat("a b c"), metadata=bearer(RESEARCH_KEY), timeout=10))
        )
        assert refusals(results, "CONCURRENT_STREAMS_EXCEEDED", "key:research") == 4
        # The slots are free again once the streams ended.
        again = await concurrently(
            2, lambda: read(stub.StreamComplete(stream_chat(), metadata=bearer(RESEARCH_KEY), timeout=10))
        )
    assert refusals(again, "CONCURRENT_STREAMS_EXCEEDED", "key:research") == 0


async def test_a_daily_budget_admits_exactly_what_it_pays_for(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Completions only are priced, and max_tokens is what the upstream answers ("echo: x y", 3 tokens): a call
    # reserves exactly what it costs, so the count is exact whatever the interleaving. 3 tokens at 1000 USD per
    # million are 3000 micro-USD; 0.0135 USD pay for 4 of them.
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {budget_usd_per_day: 0.0135}"))
    auth += 'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n'
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    request = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))
    async with channel:
        results = await concurrently(10, lambda: stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5))
        assert refusals(results, "BUDGET_EXCEEDED", "key:research") == 6
        answers = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
        assert [a.usage.cost.usd_micros for a in answers] == [3000] * 4
        records = (await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(RESEARCH_KEY), timeout=5)).records
    assert sum(r.cost.usd_micros for r in records) == 12_000


async def test_a_restarted_gateway_remembers_what_each_budget_spent_today(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The limits kept in the process started from nothing: every restart (a deploy, a crash) gave each key, and the
    gateway, its whole daily budget again, though the ledger had what they spent."""
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY, "limits: {budget_usd_per_day: 0.0135}"),  # 4 calls of 3,000 micro-USD
        key_entry("other", OTHER_KEY),
    )
    auth += 'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n'
    gateway_limits = "limits: {budget_usd_per_day: 0.0225}"  # 7 calls, over every key
    request = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))
    first, channel, stub = await start(gateway_factory, primary, local, auth, server=gateway_limits)
    async with channel:
        for _ in range(3):
            await stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5)
        for _ in range(2):
            await stub.Complete(request, metadata=bearer(OTHER_KEY), timeout=5)
    await first.stop(grace_period_s=0, drain_s=0)

    _, channel, stub = await start(gateway_factory, primary, local, auth, server=gateway_limits)
    async with channel:
        await stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5)  # its fourth
        with pytest.raises(grpc.aio.AioRpcError) as research:
            await stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5)
        await stub.Complete(request, metadata=bearer(OTHER_KEY), timeout=5)  # the gateway's seventh
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.Complete(request, metadata=bearer(OTHER_KEY), timeout=5)
    assert (details(research.value)["ErrorInfo"].reason, details(research.value)["ErrorInfo"].metadata["subject"]) == (
        "BUDGET_EXCEEDED",
        "key:research",
    )
    assert details(other.value)["ErrorInfo"].metadata["subject"] == "gateway"


@pytest.fixture(params=["in process", "in redis"])
async def limits_state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The configuration's `state` section: none (limits kept in the process), or a Redis of the test's own."""
    if request.param == "in process":
        yield ""
        return
    async with RedisServer(tmp_path / "redis") as server:
        yield f'state: {{redis_url: "{server.url}"}}\n'


class KeyedByAFile(NamedTuple):
    """A gateway whose keys file has the key "research", without limits, and gpt-test's answers priced at 1,000
    micro-USD a token."""

    reload_budget: Callable[[float], Awaitable[None]]
    """Gives the key a daily budget of so many USD, by a reload of the file."""
    channel: grpc.aio.Channel
    stub: pb.LLMServiceAsyncStub
    gateway: Gateway


@pytest.fixture
def open_services() -> str:
    """auth.open_services of `keyed_by_a_file`, as YAML."""
    return "[]"


@pytest.fixture
async def keyed_by_a_file(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    limits_state: str,
    open_services: str,
) -> KeyedByAFile:
    caplog.set_level(logging.INFO, logger="llmrelay_server.auth")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: [{key_entry('research', RESEARCH_KEY)}]\n")
    config = (
        f'auth: {{keys_file: "{keys_file}", open_services: {open_services}}}\n'
        'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n'
    )
    gateway, channel, stub = await start(gateway_factory, primary, local, config + limits_state)

    async def reload_budget(usd: float) -> None:
        budget = f"limits: {{budget_usd_per_day: {usd}}}"
        keys_file.write_text(f"keys: [{key_entry('research', RESEARCH_KEY, budget)}]\n")
        gateway.keys.reload()
        await logged(caplog, "reloaded: 1 keys in force")

    return KeyedByAFile(reload_budget, channel, stub, gateway)


async def test_a_budget_a_reload_gives_counts_what_the_key_spent_today(keyed_by_a_file: KeyedByAFile) -> None:
    """As a restart with that keys file and ledger does (above): no limiter counted the key's spend while it had no
    budget, so counted from the reload on, 15,000 micro-USD spent of a budget of 13,500 admitted 4 calls more."""
    reload_budget, channel, stub, _ = keyed_by_a_file
    call = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))  # 3,000
    async with channel:
        for _ in range(5):
            await stub.Complete(call, metadata=bearer(RESEARCH_KEY), timeout=5)
        await reload_budget(0.0135)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(call, metadata=bearer(RESEARCH_KEY), timeout=5)
    info = details(refused.value)["ErrorInfo"]
    assert (info.reason, info.metadata["subject"]) == ("BUDGET_EXCEEDED", "key:research")


@pytest.mark.parametrize("open_services", ["[]", '["llmrelay.v1.LLMService/StreamComplete"]'], ids=["keyed", "open"])
async def test_a_budget_a_reload_gives_counts_what_the_keys_calls_in_progress_then_spend(
    keyed_by_a_file: KeyedByAFile, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Streams begun before the key had a budget reserved none of it, and were billed to the ledger alone: counted
    once they end, as a restart after them would, not left out (the key then spent its whole budget on top). A
    keyed stream of an open method is the key's too: it was in no list of the calls in progress."""
    reload_budget, channel, stub, _ = keyed_by_a_file
    exactly = {"model": "gpt-test", "exact_model": True, "options": pb.CompletionOptions(max_tokens=3)}  # 3,000
    primary.inject(*[{"trickle_s": 0.2}] * 3)
    async with channel:
        streams = [
            stub.StreamComplete(stream_chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=10)
            for _ in range(3)
        ]
        for stream in streams:
            await stream.read()  # begun
        await reload_budget(0.0135)  # 4 calls: the 3 streams, and 1 more
        assert [(await read_all(stream))[-1].usage.cost.usd_micros for stream in streams] == [3_000] * 3
        await logged(caplog, "the 3 calls in progress when it gave research a daily budget have ended")
        await stub.Complete(chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=5)
    info = details(refused.value)["ErrorInfo"]
    assert (info.reason, info.metadata["subject"]) == ("BUDGET_EXCEEDED", "key:research")


async def test_a_budget_a_reload_gives_counts_the_calls_begun_while_it_read_the_spend(
    keyed_by_a_file: KeyedByAFile,
) -> None:
    """A call begun while the reload read today's spend (seconds, in a ledger of millions of rows) began under the
    keys still in force, reserving nothing, and was in no list of the calls in progress: its spend never counted."""
    reload_budget, channel, stub, gateway = keyed_by_a_file
    read = gateway.keys.catch_up_budgets
    assert read is not None
    reading, go_on, reads = asyncio.Event(), asyncio.Event(), []

    async def slow_first_read(names: frozenset[str]) -> None:
        await read(names)
        if not reading.is_set():
            reading.set()
            await go_on.wait()  # the reload's read, before the keys are in force: a call begins meanwhile
        reads.append(names)

    gateway.keys.catch_up_budgets = slow_first_read
    exactly = {"model": "gpt-test", "exact_model": True, "options": pb.CompletionOptions(max_tokens=3)}  # 3,000
    async with channel:
        reloading = asyncio.ensure_future(reload_budget(0.005))  # one call's 3,000 micro-USD, not two
        await reading.wait()
        await stub.Complete(chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=5)
        go_on.set()
        await reloading
        async with asyncio.timeout(5):
            while len(reads) < 2:  # noqa: ASYNC110 (the catching up after the keys' swap, no event of its own)
                await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert details(refused.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"


async def test_a_reload_that_gives_a_budget_is_in_force_in_bounded_time_with_the_ledger_frozen(
    keyed_by_a_file: KeyedByAFile, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A keys file edit that gave a key a budget waited for the day's spend from the ledger before any of its changes
    was in force: with the database frozen, the ledger's own bound (12 s), every revocation in the edit waiting too."""
    reload_budget, _, _, gateway = keyed_by_a_file

    async def frozen(**_: object) -> NoReturn:
        await asyncio.sleep(3600)
        raise AssertionError("a frozen database never answers")

    monkeypatch.setattr(gateway.ledger, "query", frozen)
    async with asyncio.timeout(RESUME_BUDGETS_S + 2):
        await reload_budget(0.01)
    assert f"today's spend not read from the ledger within {RESUME_BUDGETS_S:g} s" in caplog.text


@pytest.mark.parametrize("open_services", ["[]", '["llmrelay.v1.LLMService/Complete"]'], ids=["keyed", "open"])
async def test_a_budget_a_reload_gives_holds_a_call_whose_request_came_after_it(
    keyed_by_a_file: KeyedByAFile,
) -> None:
    """A call whose headers came before the reload and its request after it was let through as the key was, without
    limits, reserving nothing and in no list of the calls in progress: the key then spent past its new budget. A keyed
    call of an open method too, which is its key's call all the same."""
    reload_budget, channel, stub, gateway = keyed_by_a_file
    exactly = {"model": "gpt-test", "exact_model": True, "options": pb.CompletionOptions(max_tokens=3)}  # 3,000
    seen = headers_seen(gateway)
    held = await asyncio.to_thread(
        RequestHeldBack, gateway.port, "/llmrelay.v1.LLMService/Complete", bearer(RESEARCH_KEY)
    )
    await asyncio.wait_for(seen.wait(), 5)
    await reload_budget(0.004)  # one call's 3,000 micro-USD, not two
    await asyncio.to_thread(held.send, chat("x y", **exactly))
    code, _, answer = await asyncio.to_thread(held.answer)
    assert (code, pb.CompleteResponse.FromString(answer).usage.cost.usd_micros) == (0, 3_000)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat("x y", **exactly), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert details(refused.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"


async def test_a_budget_held_by_a_call_in_progress_is_retried_in_a_moment_not_at_midnight(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # 1,000 micro-USD a completion token: a stream asking for 900 reserves 0.9 of the 1 USD budget while it runs, and
    # spends 3,000 micro-USD ("echo: x y"). The call refused meanwhile fits as soon as it ends, not at midnight (UTC).
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {budget_usd_per_day: 1}"))
    auth += 'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n'
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    primary.inject({"trickle_s": 0.3})

    def request(max_tokens: int) -> dict[str, Any]:
        return {"model": "gpt-test", "exact_model": True, "options": pb.CompletionOptions(max_tokens=max_tokens)}

    async with channel:
        running = stub.StreamComplete(stream_chat("x y", **request(900)), metadata=bearer(RESEARCH_KEY), timeout=10)
        await running.read()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat("x y", **request(200)), metadata=bearer(RESEARCH_KEY), timeout=5)
        found = details(refused.value)
        assert found["ErrorInfo"].reason == "BUDGET_EXCEEDED"
        assert "reserved by calls in progress" in found["QuotaFailure"].violations[0].description
        assert 0 < found["RetryInfo"].retry_delay.ToNanoseconds() <= 1_000_000_000
        assert dict(refused.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "1000"
        assert (await read_all(running))[-1].usage.cost.usd_micros == 3_000
        answer = await stub.Complete(chat("x y", **request(200)), metadata=bearer(RESEARCH_KEY), timeout=5)
    assert answer.usage.cost.usd_micros == 3_000


def never_fits(error: BaseException, reason: str, subject: str) -> str:
    """The message of the refusal of a call larger than the limit itself, which says no time to retry in."""
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    found = details(error)
    assert found["ErrorInfo"].reason == reason
    assert found["QuotaFailure"].violations[0].subject == subject
    assert "RetryInfo" not in found, "no wait would admit it"
    assert "grpc-retry-pushback-ms" not in dict(error.trailing_metadata() or ())
    return error.details() or ""


async def test_a_request_larger_than_a_limit_is_told_what_to_change_not_when_to_retry(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    prompt = TokenCounter().count_chat("gpt-test", (Message(Role.USER, "hello gateway"),)).tokens
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY, "limits: {tokens_per_minute: 500}"),
        key_entry("other", OTHER_KEY, "limits: {budget_usd_per_day: 0.01}"),
    )
    auth += 'pricing: {"gpt-test": {prompt: 1, completion: 1}}\n'  # 1 micro-USD a token: the budget is 10,000
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    async with channel:
        # Without max_tokens a request reserves reserve_completion_tokens (1,024) and its prompt: over 500 on a key
        # that has spent nothing.
        for call in (
            lambda: stub.Complete(chat(model="gpt-test"), metadata=bearer(RESEARCH_KEY), timeout=5),
            lambda: read(stub.StreamComplete(stream_chat(model="gpt-test"), metadata=bearer(RESEARCH_KEY), timeout=5)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            message = never_fits(caught.value, "TOKENS_PER_MINUTE_EXCEEDED", "key:research")
            assert f"reserves {prompt + 1024} tokens ({prompt} of prompt + 1024 for the answer" in message
            assert f"set max_tokens to at most {500 - prompt}" in message
        fitting = chat(model="gpt-test", options=pb.CompletionOptions(max_tokens=500 - prompt))
        assert (await stub.Complete(fitting, metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "openai"
        # A stream that may start over on its second route (Ollama) reserves an answer on each: the advice fits that.
        restarting = stream_chat(
            model="gpt-test", options=pb.CompletionOptions(max_tokens=300), on_interrupt=pb.INTERRUPT_POLICY_RESTART
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read(stub.StreamComplete(restarting, metadata=bearer(RESEARCH_KEY), timeout=5))
        message = never_fits(caught.value, "TOKENS_PER_MINUTE_EXCEEDED", "key:research")
        assert f"each {prompt} of prompt + 300 for the answer" in message
        assert f"set max_tokens to at most {250 - prompt}" in message

        over = chat(model="gpt-test", options=pb.CompletionOptions(max_tokens=20_000))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(over, metadata=bearer(OTHER_KEY), timeout=5)
        message = never_fits(caught.value, "BUDGET_EXCEEDED", "key:other")
        assert f"alone reserves {(prompt + 20_000) / 1e6:g} USD" in message and "set a lower max_tokens" in message
        fitting = chat(model="gpt-test", options=pb.CompletionOptions(max_tokens=3))
        assert (await stub.Complete(fitting, metadata=bearer(OTHER_KEY), timeout=5)).backend == "openai"
    assert len(primary.chat_requests) == 2, "refused before any upstream is asked"


async def test_a_prompt_is_reserved_as_counted_for_the_model_it_goes_to_as_count_tokens_counts_it(
    stub_for: StubFactory,
) -> None:
    """An alias, or no model, is no tokenizer's name: counted under it, a prompt was an unknown model's estimate
    (o200k_base), where CountTokens and the bill count for the routed model (gpt-4: cl100k_base), so that following a
    refusal's advice of max_tokens, sized by CountTokens, passed the limit; and an Embed with no model was admitted
    whose inputs alone are over it."""
    text = "日本語のテキストはトークナイザーによって数が大きく変わります。" * 20
    upstream = await FakeUpstream(models=("gpt-4",), embedding_models=("text-embedding-3-small",)).start()
    try:
        backend = (
            f"{{name: up, kind: openai_compatible, base_url: '{upstream.base_url}', model: gpt-4,"
            " embedding_model: text-embedding-3-small}"
        )
        llm = f"llm:\n  backends: [{backend}]\n  aliases: {{fast: up/gpt-4}}\n  order: [up]\n"
        stub = await stub_for(llm, server="limits: {tokens_per_minute: 1000}")
        messages = [user(text)]
        named_so: list[dict[str, Any]] = [{"model": "fast"}, {}]  # an alias, and no model: the default chain
        for named in named_so:
            counted = await stub.CountTokens(pb.CountTokensRequest(messages=messages, **named), timeout=10)
            assert counted.encoding == "cl100k_base" and not counted.estimated
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                request = pb.CompleteRequest(messages=messages, options=pb.CompletionOptions(max_tokens=999), **named)
                await stub.Complete(request, timeout=10)
            assert f"({counted.token_count} of prompt + 999 for the answer" in (caught.value.details() or "")
        inputs = await stub.CountTokens(pb.CountTokensRequest(model="text-embedding-3-small", text=text), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=[text, text]), timeout=10)
        assert f"reserves {2 * inputs.token_count} tokens (its inputs)" in (caught.value.details() or "")
        assert upstream.chat_requests == [] and upstream.embedding_requests == []
    finally:
        await upstream.stop()


async def test_the_json_schema_an_answer_must_follow_is_reserved_as_prompt(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The upstream puts an answer's JSON schema in the prompt and bills it so: a schema of thousands of tokens must
    not pass a limit of hundreds as a request of a few."""
    properties = {f"field_{i}": {"type": "string", "description": f"the value of field number {i}"} for i in range(60)}
    schema = pb.JsonSchema(name="record", schema_json=json.dumps({"type": "object", "properties": properties}))
    options = pb.CompletionOptions(
        max_tokens=10, response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema)
    )
    request = chat(model="gpt-test", options=options)
    parsed = convert.completion_request(request)
    counted = TokenCounter().count_chat("gpt-test", parsed.messages, response_format=parsed.options.response_format)
    plain = TokenCounter().count_chat("gpt-test", parsed.messages).tokens
    assert counted.estimated and counted.tokens > plain + 600
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {tokens_per_minute: 500}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    async with channel:
        for call in (
            lambda: stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5),
            lambda: read(
                stub.StreamComplete(
                    stream_chat(model="gpt-test", options=options), metadata=bearer(RESEARCH_KEY), timeout=5
                )
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            message = never_fits(caught.value, "TOKENS_PER_MINUTE_EXCEEDED", "key:research")
            assert f"reserves {counted.tokens + 10} tokens ({counted.tokens} of prompt + 10 for the answer" in message
        options.ClearField("response_format")
        assert (
            await stub.Complete(chat(model="gpt-test", options=options), metadata=bearer(RESEARCH_KEY), timeout=5)
        ).backend == "openai"
    assert len(primary.chat_requests) == 1, "refused before any upstream is asked"


@pytest.mark.parametrize("primary", ["anthropic"], indirect=True)
async def test_a_request_without_max_tokens_reserves_what_its_route_asks_the_upstream_for(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # Anthropic's API needs a max_tokens: a request without one is sent the backend's (4,096), with thinking's budget
    # on top. It reserved server.reserve_completion_tokens (1,024) all the same, and its answer could run past that.
    prompt = TokenCounter().count_chat("claude-test", (Message(Role.USER, "hello gateway"),)).tokens
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {tokens_per_minute: 4000}"))
    _, channel, stub = await start(gateway_factory, primary, local, auth)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(model="claude-test"), metadata=bearer(RESEARCH_KEY), timeout=5)
        message = never_fits(caught.value, "TOKENS_PER_MINUTE_EXCEEDED", "key:research")
        assert f"reserves {prompt + 4096} tokens ({prompt} of prompt + 4096 for the answer" in message
        thinking = chat(model="claude-test", options=pb.CompletionOptions(reasoning_effort=pb.REASONING_EFFORT_LOW))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(thinking, metadata=bearer(RESEARCH_KEY), timeout=5)
        message = never_fits(caught.value, "TOKENS_PER_MINUTE_EXCEEDED", "key:research")
        assert f"({prompt} of prompt + {4096 + 4096} for the answer" in message
        fitting = chat(model="claude-test", options=pb.CompletionOptions(max_tokens=4000 - prompt))
        assert (await stub.Complete(fitting, metadata=bearer(RESEARCH_KEY), timeout=5)).backend == "anthropic"
    assert [body["max_tokens"] for body in primary.chat_requests] == [4000 - prompt]


async def test_gateway_limits_hold_over_every_caller(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    auth = keys_yaml(key_entry("research", RESEARCH_KEY), key_entry("other", OTHER_KEY))
    _, channel, stub = await start(gateway_factory, primary, local, auth, server="limits: {requests_per_minute: 6}")
    async with channel:
        results = await concurrently(
            10, lambda: stub.Complete(chat(), metadata=bearer(RESEARCH_KEY), timeout=5)
        ) + await concurrently(10, lambda: stub.Complete(chat(), metadata=bearer(OTHER_KEY), timeout=5))
    assert refusals(results, "REQUESTS_PER_MINUTE_EXCEEDED", "gateway") == 14


async def test_without_keys_calls_stay_open_and_gateway_limits_still_hold(
    stub_for: Any, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(two_backends(primary, local, FAST_ROUTER), server="limits: {requests_per_minute: 3}")
    results = await concurrently(8, lambda: stub.Complete(chat(), timeout=5))
    assert refusals(results, "REQUESTS_PER_MINUTE_EXCEEDED", "gateway") == 5


async def test_without_keys_a_call_refused_for_the_caller_it_names_takes_none_of_the_gateway_limits(
    stub_for: Any, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A malformed x-llmrelay-caller is the caller's mistake, as an invalid request is: told what is wrong every time,
    not that the minute is spent; and it spends none of the minute that every other caller shares."""
    stub = await stub_for(two_backends(primary, local, FAST_ROUTER), server="limits: {requests_per_minute: 2}")
    misnamed = (("x-llmrelay-caller", "not a valid name!"),)
    reasons = []
    for call in (lambda: stub.Complete(chat(), metadata=misnamed, timeout=5),) * 3 + (
        lambda: read(stub.StreamComplete(stream_chat(), metadata=misnamed, timeout=5)),
        lambda: stub.Embed(pb.EmbedRequest(inputs=["x"]), metadata=misnamed, timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        reasons.append((caught.value.code().name, details(caught.value)["ErrorInfo"].reason))
    assert reasons == [("INVALID_ARGUMENT", "INVALID_REQUEST")] * 5
    results = await concurrently(3, lambda: stub.Complete(chat(), metadata=(("x-llmrelay-caller", "ok"),), timeout=5))
    assert refusals(results, "REQUESTS_PER_MINUTE_EXCEEDED", "gateway") == 1
    assert len(primary.chat_requests) == 2


async def test_callers_with_and_without_limits_by_turns_make_no_new_handlers(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """The bound on calls in progress kept one wrapping a method: a call of a key with limits, then one without (or a
    refused key), each made another, and the call log's observer kept each new one until its bound of 256, past
    which it wrapped every call anew."""
    auth = keys_yaml(
        key_entry("research", RESEARCH_KEY, "limits: {requests_per_minute: 1000}"), key_entry("other", OTHER_KEY)
    )
    _, channel, stub = await start(gateway_factory, primary, local, auth, server="max_concurrent_rpcs: 8")

    async def by_turns(rounds: int) -> int:
        for _ in range(rounds):
            for key in (RESEARCH_KEY, OTHER_KEY, "llmr-unknown-0123456789abcdefghijkl"):
                with contextlib.suppress(grpc.aio.AioRpcError):  # the unknown key's refusal
                    await stub.Complete(chat(), metadata=bearer(key), timeout=5)
        return sum(isinstance(thing, grpc.RpcMethodHandler) for thing in gc.get_objects())

    async with channel:
        handlers = [await by_turns(3), await by_turns(30)]
    assert handlers[1] == handlers[0], handlers


async def test_max_concurrent_rpcs_bounds_the_calls_in_progress_and_never_the_health_probes(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), server="max_concurrent_rpcs: 2")
    primary.inject({"stall_s": 0.8}, {"stall_s": 0.8})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        unary = asyncio.ensure_future(stub.Complete(chat(), timeout=5))
        stream = stub.StreamComplete(stream_chat(), timeout=5)
        reading = asyncio.ensure_future(read(stream))
        await wait_until(lambda: len(primary.chat_requests) == 2)  # both in progress at the upstream
        for refused in (stub.Complete(chat(), timeout=5), read(stub.StreamComplete(stream_chat(), timeout=5))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 calls in progress at once (server.max_concurrent_rpcs)" in (caught.value.details() or "")
            found = details(caught.value)
            assert found["ErrorInfo"].reason == "CONCURRENT_CALLS_EXCEEDED"
            assert found["ErrorInfo"].metadata["subject"] == "gateway"
            assert found["RetryInfo"].retry_delay.seconds == 1
        # A liveness or readiness probe at the bound is answered: a busy gateway is not a dead one.
        probe = health_pb2_grpc.HealthStub(channel)
        for service in ("", "llmrelay.v1.LLMService"):
            answer = await probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.Health(pb.HealthRequest(), timeout=5)).serving, "the service's own probe too"
        assert (await unary).backend == "openai"
        assert (await reading)[-1].finish_reason == pb.FINISH_REASON_STOP
        again = await asyncio.gather(stub.Complete(chat(), timeout=5), read(stub.StreamComplete(stream_chat())))
        assert again[0].backend == "openai" and again[1], "both slots are free again"


async def test_a_limited_call_is_parsed_once_and_an_oversized_image_still_refused(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limits reserve a request's tokens from its parse; the servicer takes that parse rather than repeating it,
    and what the servicer refuses (an image over server.max_image_bytes) is refused all the same."""
    parses: list[object] = []
    parse = convert._completion_request

    def counted(request: Any, max_image_bytes: int | None) -> Any:
        parses.append(request)
        return parse(request, max_image_bytes)

    monkeypatch.setattr(convert, "_completion_request", counted)
    auth = keys_yaml(key_entry("research", RESEARCH_KEY, "limits: {tokens_per_minute: 1000000}"))
    gateway = await gateway_factory(two_backends(primary, local) + auth, server="max_image_bytes: 100")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        await stub.Complete(chat("once"), metadata=bearer(RESEARCH_KEY), timeout=5)
        assert len(parses) == 1
        chunks = [chunk async for chunk in stub.StreamComplete(stream_chat("once"), metadata=bearer(RESEARCH_KEY))]
        assert chunks[-1].usage.completion_tokens > 0 and len(parses) == 2
        big = pb.ContentPart(image=pb.ImagePart(data=png(64, 64) + b"\0" * 200, media_type="image/png"))
        request = pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[big])])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(request, metadata=bearer(RESEARCH_KEY), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].parts[0].image.data" in str(details(refused.value)["BadRequest"])


@pytest.mark.parametrize("limits", ["tokens_per_minute: 100000", "budget_usd_per_day: 5"])
async def test_a_prompt_the_limits_cannot_count_is_refused_for_the_missing_tokenizer(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    limits: str,
) -> None:
    """A limit on tokens or spend counts the prompt before admitting it: with the tokenizer's encoding missing (a
    broken install), the call gets the status that says so, not UNKNOWN and a traceback."""
    monkeypatch.setattr(tokens, "_bundled_dir", lambda: None)
    monkeypatch.setenv("LLMRELAY_TIKTOKEN_DIR", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    caplog.set_level(logging.INFO)
    gateway = await gateway_factory(two_backends(primary, local), server=f"limits: {{{limits}}}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb.LLMServiceStub(channel).Complete(chat(model="gpt-test"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = details(refused.value)["ErrorInfo"]
    assert info.reason == "TOKENIZER_UNAVAILABLE" and info.metadata["encoding"] == "o200k_base"
    assert not primary.chat_requests, "refused before any upstream is asked"
    assert not [record for record in caplog.records if record.exc_info], "one line, no traceback"


@pytest.mark.parametrize("rpc", ["Complete", "Embed"])
async def test_a_prompt_counted_past_the_deadline_for_a_limit_ends_with_the_gateways_status(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, rpc: str
) -> None:
    """A limit on tokens counts the prompt before any upstream is asked; megabytes take seconds. The count ran past the
    caller's deadline, which then got its client library's bare DEADLINE_EXCEEDED, no ErrorInfo (CountTokens had the
    gateway's own for the same text)."""
    backends = two_backends(primary, local).replace("model: tiny}", "model: tiny, embedding_model: embed-test}")
    gateway = await gateway_factory(backends, server="limits: {tokens_per_minute: 100000000}")
    text = "a" * 4_000_000  # one word: seconds of encoding
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        # The gateway answers a little before the deadline; on a machine busy enough that its answer takes longer than
        # that to arrive, the client library ends the call itself (no details): one try of three must be the gateway's.
        for _ in range(3):
            call = (
                stub.Complete(chat(text), timeout=1)
                if rpc == "Complete"
                else stub.Embed(pb.EmbedRequest(model="embed-test", inputs=[text]), timeout=1)
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if any(key == "grpc-status-details-bin" for key, _ in caught.value.trailing_metadata() or ()):
                break
        found = details(caught.value)
        assert found["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
        assert "attempts" not in found["ErrorInfo"].metadata and "AttemptHistory" not in found, "no backend asked"
        assert "longer deadline" in (caught.value.details() or "")
        assert not primary.chat_requests and not local.chat_requests, "refused before any upstream is asked"
        assert (await stub.Complete(chat("and the next"), timeout=5)).message.content  # it goes on serving


async def test_a_prompt_of_a_million_spaces_is_counted_and_answered(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """tiktoken alone overflows its stack on such a run and panics (a BaseException): the call never ended, and a few
    of them held every slot of max_concurrent_rpcs."""
    router = "router: {first_chunk_timeout_s: 20}\n"  # the test upstream takes its time over a megabyte
    limits = "limits: {tokens_per_minute: 10000000}"
    gateway = await gateway_factory(two_backends(primary, local, router), server=limits)
    spaced = pb.CompleteRequest(messages=[pb.Message(role=pb.ROLE_USER, content="x" + " " * 1_000_000 + "y")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        answer = await stub.Complete(spaced, timeout=30)
        assert answer.backend == "openai" and answer.usage.prompt_tokens > 0
        primary.inject({"one_delta": True})  # its echo in one piece, not a million
        streamed = await read(stub.StreamComplete(pb.StreamCompleteRequest(messages=spaced.messages), timeout=30))
        assert streamed[-1].finish_reason == pb.FINISH_REASON_STOP
