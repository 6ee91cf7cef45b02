"""Retries by the caller's own gRPC channel, as the client service config declares them
(proto/llmrelay/v1/llmrelay_grpc_service_config.json, SERVICE_CONFIG_JSON): no code of the caller's in the loop.

A channel replays a call only while it has received no response headers. A Complete that fails, and a StreamComplete
that fails before its first message, end as a trailers-only response, so the channel may retry them; it waits as
long as the gateway's `grpc-retry-pushback-ms` says (gRFC A6). A stream that has delivered a message is never
replayed, whatever the policy.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay.v1.service_config import SERVICE_CONFIG_JSON
from support import OPENAI_TEST_KEY, GatewayFactory, chat, details, read_all, stream_chat
from upstream import FakeUpstream

PUSHBACK_S = 1
# The policy's own first backoff is at most 0.25 s: a retry this much later than the failure waited for the pushback.
AT_LEAST_S = 0.9
# Generous, for a loaded machine.
AT_MOST_S = 10.0


def one_backend(primary: FakeUpstream) -> str:
    """The primary alone, tried once a call: the gateway's answer to a failure is the caller's channel's business."""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
router:
  retry: {{max_retries: 0}}
  circuit: {{failure_threshold: 50, cooldown_s: 30}}
"""


def service_config_retrying(*codes: str) -> str:
    """The SDKs' service config, with more status codes retryable."""
    config = json.loads(SERVICE_CONFIG_JSON)
    for method in config["methodConfig"]:
        method["retryPolicy"]["retryableStatusCodes"] += codes
    return json.dumps(config)


@pytest.fixture
async def retrying_channel(
    gateway_factory: GatewayFactory, primary: FakeUpstream
) -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """Opens channels with a given service config to a gateway in front of the primary alone."""
    gateway = await gateway_factory(one_backend(primary))
    channels: list[grpc.aio.Channel] = []

    def open_channel(service_config: str) -> grpc.aio.Channel:
        options = [("grpc.service_config", service_config)]
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=options))
        return channels[-1]

    yield open_channel
    for channel in channels:
        await channel.close()


async def complete(stub: pb.LLMServiceAsyncStub) -> str:
    answer: pb.CompleteResponse = await stub.Complete(chat("hello retries"), timeout=20)
    return answer.message.content


async def stream(stub: pb.LLMServiceAsyncStub) -> str:
    chunks = await read_all(stub.StreamComplete(stream_chat("hello retries"), timeout=20))
    return "".join(chunk.delta.content for chunk in chunks)


async def stream_without_a_deadline(stub: pb.LLMServiceAsyncStub) -> str:
    """A stream whose caller sets no deadline sends its headers on their own, before its first message (so that the
    bound's status can go behind it): not before the upstream answers, or nothing failed first could be retried."""
    chunks = await read_all(stub.StreamComplete(stream_chat("hello retries")))
    return "".join(chunk.delta.content for chunk in chunks)


@pytest.mark.parametrize(
    "call", [complete, stream, stream_without_a_deadline], ids=["Complete", "StreamComplete", "no-deadline"]
)
async def test_the_channel_retries_a_failure_after_the_gateways_pushback(
    retrying_channel: Callable[[str], grpc.aio.Channel], primary: FakeUpstream, call: Callable[..., Any]
) -> None:
    stub = pb.LLMServiceStub(retrying_channel(SERVICE_CONFIG_JSON))
    # The gateway answers the caller UNAVAILABLE, RetryInfo 1 s and pushback 1000 ms; the upstream serves the retry.
    primary.inject({"status": 503, "retry_after": PUSHBACK_S})

    content = await call(stub)

    assert content == "echo: hello retries"
    assert len(primary.chat_requests) == 2, "the channel made a second attempt, and only one"
    waited_s = primary.chat_times[1] - primary.chat_times[0]
    assert AT_LEAST_S <= waited_s <= AT_MOST_S, f"the retry came {waited_s:.3f} s after the failure"


async def test_without_a_retry_policy_the_caller_sees_the_failure_and_its_pushback(
    retrying_channel: Callable[[str], grpc.aio.Channel], primary: FakeUpstream
) -> None:
    stub = pb.LLMServiceStub(retrying_channel(json.dumps({"methodConfig": []})))
    primary.inject({"status": 503, "retry_after": PUSHBACK_S})

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await complete(stub)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(caught.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "1000"
    assert len(primary.chat_requests) == 1


@pytest.mark.parametrize(
    "service_config",
    [SERVICE_CONFIG_JSON, service_config_retrying("ABORTED")],
    ids=["the SDKs' policy", "a policy that would retry ABORTED"],
)
async def test_a_stream_that_delivered_a_message_is_never_replayed(
    retrying_channel: Callable[[str], grpc.aio.Channel], primary: FakeUpstream, service_config: str
) -> None:
    stub = pb.LLMServiceStub(retrying_channel(service_config))
    primary.inject({"stream_cut_after": 3})
    received: list[pb.StreamCompleteResponse] = []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.StreamComplete(stream_chat("one two three four"), timeout=20):
            received.append(chunk)

    # The first message committed the call: even a policy that lists ABORTED does not replay it.
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert received and "".join(c.delta.content for c in received) != "echo: one two three four"
    assert len(primary.chat_requests) == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["Complete", "StreamComplete"])
async def test_a_bad_response_is_not_retried_by_the_channel(
    retrying_channel: Callable[[str], grpc.aio.Channel], primary: FakeUpstream, streaming: bool
) -> None:
    stub = pb.LLMServiceStub(retrying_channel(SERVICE_CONFIG_JSON))
    primary.inject(*[{"body": "<html>502 Bad Gateway</html>", "content_type": "text/html"}] * 3)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if streaming:  # the primary alone: the default chain's Ollama, unreachable here, would be another cause
            await read_all(stub.StreamComplete(stream_chat("hello retries", exact_model=True), timeout=20))
        else:
            await stub.Complete(chat("hello retries", exact_model=True), timeout=20)

    # UNAVAILABLE, which the policy retries, but without a RetryInfo: the same request would meet the same answer.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(caught.value)["ErrorInfo"].reason == "UPSTREAM_BAD_RESPONSE", caught.value.details()
    assert dict(caught.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "-1"
    assert len(primary.chat_requests) == 1


async def test_a_pushback_longer_than_the_deadline_gives_the_caller_the_failure_not_a_timeout(
    retrying_channel: Callable[[str], grpc.aio.Channel], primary: FakeUpstream
) -> None:
    stub = pb.LLMServiceStub(retrying_channel(SERVICE_CONFIG_JSON))
    primary.inject({"status": 503, "retry_after": PUSHBACK_S})

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat("hello retries"), timeout=PUSHBACK_S / 2)

    # Waiting out the delay for a retry would have ended the call DEADLINE_EXCEEDED, saying nothing of when to come
    # back.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(caught.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "-1"
    assert details(caught.value)["RetryInfo"].retry_delay.ToMilliseconds() == PUSHBACK_S * 1000
    assert len(primary.chat_requests) == 1
