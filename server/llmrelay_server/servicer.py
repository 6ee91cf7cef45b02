"""LLMService: protobuf in, domain calls on the router, protobuf out; domain errors become rich gRPC statuses."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from llmrelay import v1 as pb

from llmrelay_server import convert
from llmrelay_server.domain import (
    AnswerTooLargeError,
    FieldViolation,
    InvalidRequestError,
    LLMRelayError,
    ShuttingDownError,
)
from llmrelay_server.health import HealthMonitor
from llmrelay_server.router import Router
from llmrelay_server.status import rpc_failure
from llmrelay_server.usage import UsageLedger

CALLER_HEADER = "x-llmrelay-caller"
_CALLER = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
log = logging.getLogger(__name__)


class LLMServicer(pb.LLMServiceServicer):
    def __init__(self, router: Router, monitor: HealthMonitor, ledger: UsageLedger, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._draining = False
        self._router = router
        self._monitor = monitor
        self._ledger = ledger

    def start_draining(self) -> None:
        """From now on, new model calls get UNAVAILABLE; calls in flight go on."""
        self._draining = True

    def _check_accepting(self) -> None:
        if self._draining:
            raise ShuttingDownError()

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse]
    ) -> pb.CompleteResponse:
        try:
            self._check_accepting()
            response = await self._router.complete(
                convert.completion_request(request),
                deadline=self._router.deadline(context.time_remaining()),
                caller=caller_identity(context),
            )
            answer = convert.complete_response(response)
            # Sent as is, an oversized answer would fail inside gRPC with a bare status and a server error log.
            if (size := answer.ByteSize()) > self._max_message_bytes:
                raise AnswerTooLargeError(size, self._max_message_bytes)
        except LLMRelayError as error:
            await _abort(context, "Complete", error)
        return answer

    async def StreamComplete(
        self,
        request: pb.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[pb.StreamCompleteRequest, pb.StreamCompleteResponse],
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        try:
            self._check_accepting()
            chunks = self._router.stream(
                convert.completion_request(request),
                deadline=self._router.deadline(context.time_remaining()),
                caller=caller_identity(context),
            )
            async for chunk in chunks:
                yield convert.stream_response(chunk)
        except LLMRelayError as error:
            await _abort(context, "StreamComplete", error)

    async def CountTokens(
        self,
        request: pb.CountTokensRequest,
        context: grpc.aio.ServicerContext[pb.CountTokensRequest, pb.CountTokensResponse],
    ) -> pb.CountTokensResponse:
        try:
            count = await self._router.count_tokens(*convert.count_request(request))
        except LLMRelayError as error:
            await _abort(context, "CountTokens", error)
        return pb.CountTokensResponse(
            token_count=count.tokens, model=count.model, encoding=count.encoding, estimated=count.estimated
        )

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[pb.HealthRequest, pb.HealthResponse]
    ) -> pb.HealthResponse:
        report = await self._monitor.probe() if request.probe else self._monitor.report()
        return pb.HealthResponse(
            serving=self._monitor.serving,
            backends=[convert.backend_health_pb(health, state.value) for health, state in report],
        )

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[pb.GetUsageRequest, pb.GetUsageResponse]
    ) -> pb.GetUsageResponse:
        totals = await self._ledger.query(
            backend=request.backend if request.HasField("backend") else None,
            model=request.model if request.HasField("model") else None,
            caller=request.caller if request.HasField("caller") else None,
            start=request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else None,
            end=request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None,
        )
        return pb.GetUsageResponse(
            records=[
                pb.UsageRecord(
                    backend=t.backend,
                    model=t.model,
                    caller=t.caller,
                    requests=t.requests,
                    prompt_tokens=t.prompt_tokens,
                    completion_tokens=t.completion_tokens,
                    total_tokens=t.total_tokens,
                    estimated_requests=t.estimated_requests,
                )
                for t in totals
            ]
        )


def caller_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who to bill: the caller's own tag, else a fingerprint of its bearer token (never the token), else anonymous."""
    metadata = dict(context.invocation_metadata() or ())
    tag = metadata.get(CALLER_HEADER)
    if tag is not None:
        if not isinstance(tag, str) or not _CALLER.fullmatch(tag):
            raise InvalidRequestError(
                [FieldViolation(f"metadata.{CALLER_HEADER}", "1-128 characters of letters, digits and ._:@/-")]
            )
        return tag
    authorization = metadata.get("authorization")
    if isinstance(authorization, str) and authorization:
        return "key-" + hashlib.sha256(authorization.encode()).hexdigest()[:12]
    return "anonymous"


async def _abort(context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: LLMRelayError) -> NoReturn:
    failure = rpc_failure(error)
    log.info("%s failed: %s: %s", rpc, failure.code.name, failure.details)
    await context.abort_with_status(failure)
    raise AssertionError("abort returns only by raising")
