"""Requests whose faults are too many, or whose fields too long, to be worth echoing: they still get
INVALID_ARGUMENT and their details, with what is reported bounded so that gRPC does not refuse the trailers."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay_server.domain import InvalidRequestError
from support import details, read_all, user

# A message with neither a role nor content: two violations each.
NOTHING = pb.Message()

Call: TypeAlias = "Callable[[pb.LLMServiceAsyncStub], Awaitable[object]]"  # the async stub is for type checkers only
CALLS: dict[str, Call] = {
    "Complete": lambda stub: stub.Complete(pb.CompleteRequest(messages=[NOTHING] * 300), timeout=10),
    "StreamComplete": lambda stub: read_all(
        stub.StreamComplete(pb.StreamCompleteRequest(messages=[NOTHING] * 300), timeout=10)
    ),
    "CountTokens": lambda stub: stub.CountTokens(pb.CountTokensRequest(messages=[NOTHING] * 300), timeout=10),
    "Embed": lambda stub: stub.Embed(pb.EmbedRequest(inputs=[""] * 600), timeout=10),
}


async def invalid(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value


@pytest.mark.parametrize("rpc", CALLS)
async def test_hundreds_of_violations_get_the_first_reported_and_the_rest_counted(
    stub: pb.LLMServiceAsyncStub, rpc: str
) -> None:
    error = await invalid(CALLS[rpc](stub))

    assert details(error)["ErrorInfo"].reason == "INVALID_REQUEST"
    reported = details(error)["BadRequest"].field_violations
    assert 0 < len(reported) <= InvalidRequestError.MAX_REPORTED
    assert reported[0].field.startswith(("messages[0].", "inputs[0]"))
    more = re.search(r"; \.\.\. and (\d+) more$", str(error.details()))
    assert more is not None, error.details()
    assert len(reported) + int(more[1]) == 600
    # The gateway goes on serving.
    assert (await stub.Health(pb.HealthRequest(), timeout=5)).serving


async def test_count_tokens_takes_the_model_names_complete_takes(stub: pb.LLMServiceAsyncStub) -> None:
    for model in ("m" * 300, ""):
        error = await invalid(stub.CountTokens(pb.CountTokensRequest(model=model, text="hi"), timeout=5))
        (violation,) = details(error)["BadRequest"].field_violations
        complete = await invalid(stub.Complete(pb.CompleteRequest(model=model, messages=[user()]), timeout=5))
        assert [(violation.field, violation.description)] == [
            (v.field, v.description) for v in details(complete)["BadRequest"].field_violations
        ]
        assert violation.field == "model"

    # Unset, the model is the default chain's first, as the contract says.
    count = await stub.CountTokens(pb.CountTokensRequest(text="hi"), timeout=5)
    assert count.model and count.token_count == 1


@pytest.mark.parametrize(("value_bytes", "taken"), [(12_000, True), (20_000, False)])
async def test_metadata_near_grpcs_limit_gets_the_same_answer_every_time(
    stub: pb.LLMServiceAsyncStub, value_bytes: int, taken: bool
) -> None:
    """gRPC refused metadata between its soft limit (8 KiB) and its hard one (16 KiB) at random: one limit, taken
    or refused alike every time (a long tracestate from a caller's own tracing lands there)."""
    metadata = (("x-padding", "p" * value_bytes),)
    codes = set()
    for _ in range(30):
        try:
            await stub.Health(pb.HealthRequest(), timeout=5, metadata=metadata)
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.add(error.code())
    assert codes == {grpc.StatusCode.OK if taken else grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_a_compressed_request_is_refused_before_it_is_decompressed(channel: grpc.aio.Channel) -> None:
    """gRPC decompressed a request whole before any interceptor saw it: a caller with no key had 8 KiB of gzip cost
    the gateway 8 MiB of work (about 60 ms of CPU) before its UNAUTHENTICATED, and a few hundred such requests held
    every caller's calls up for seconds. Requests are taken uncompressed alone."""
    stub = pb.LLMServiceStub(channel)
    packed = pb.CountTokensRequest(text="x" * 8 * 2**20)
    for call in (
        stub.CountTokens(packed, timeout=10, compression=grpc.Compression.Gzip),
        stub.CountTokens(packed, timeout=10, compression=grpc.Compression.Deflate),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "Compression algorithm" in (refused.value.details() or "") and "is disabled" in (
            refused.value.details() or ""
        )
    assert (await stub.CountTokens(pb.CountTokensRequest(text="hello"), timeout=10)).token_count > 0
