"""The limits interceptor: admits each model call within its caller's limits and the gateway's before any upstream
is asked, and settles the reservation with what the call was billed when it ends.

Model calls are Complete, StreamComplete and Embed: an embedding request is billed for its inputs as a chat is for its
prompt, so it counts against requests and tokens per minute and spends the daily budget like one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeGuard

import grpc
from llmrelay import v1 as pb

from llmrelay_server import convert
from llmrelay_server.auth import Caller, caller_identity, current_caller, models_allowed
from llmrelay_server.config import Limits
from llmrelay_server.decoding import COMPLETE, EMBED, STREAM_COMPLETE, decoded
from llmrelay_server.domain import (
    AnswerTooLargeError,
    CallEstimate,
    CompletionRequest,
    EmbeddingRequest,
    InvalidRequestError,
    LLMRelayError,
    ModelFilter,
)
from llmrelay_server.handlers import Continuation, Handler, Wrappings
from llmrelay_server.limits.interface import GATEWAY, Ask, Limiter, Reservation, key_subject
from llmrelay_server.metering import open_meter
from llmrelay_server.servicer import Drain
from llmrelay_server.status import abort
from llmrelay_server.tokens import TokenCounter


class Routing(Protocol):
    """What the limits ask of the router (router.Router)."""

    def estimate(
        self, request: CompletionRequest, prompt_tokens: int, completion_tokens: int, may_use: ModelFilter | None
    ) -> CallEstimate:
        """The most the request may be billed for."""
        ...

    def estimate_embedding_usd_micros(self, model: str | None, prompt_tokens: int, may_use: ModelFilter | None) -> int:
        """The most the embedding request may cost."""
        ...

    def deadline(self, timeout_s: float | None) -> float:
        """The event loop's time by which a call with so many seconds left (None: no deadline) must be answered."""
        ...

    def refuses(self, request: CompletionRequest | EmbeddingRequest, may_use: ModelFilter | None) -> bool:
        """Whether the request is refused for its model (one nothing serves, or one its key may not use)."""
        ...

    def model_counted(self, request: CompletionRequest | EmbeddingRequest, may_use: ModelFilter | None) -> str:
        """The model whose tokenizer counts the request's prompt (its first route's)."""
        ...


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Admits each model call within the caller's limits and the gateway's, settles it at its end."""

    def __init__(
        self,
        limiter: Limiter,
        gateway: Limits,
        counter: TokenCounter,
        router: Routing,
        reserve_completion_tokens: int,
        max_image_bytes: int | None = None,
        max_message_bytes: int | None = None,
        drain: Drain | None = None,
        key_limits_change: bool = False,
    ) -> None:
        """`key_limits_change`: whether a key's limits may change between a call's headers and its start (a keys file
        is re-read; see auth.AuthInterceptor), so that whether the call is limited is known only as it starts."""
        self._drain = drain or Drain()
        self._max_image_bytes = max_image_bytes
        self._max_message_bytes = max_message_bytes
        self._router = router
        self._limiter = limiter
        self._gateway = gateway if gateway.any_set() else None
        self._counter = counter
        self._reserve_completion_tokens = reserve_completion_tokens
        self._key_limits_change = key_limits_change
        self._limited = Wrappings(self._limit)
        """Each handler within limits (the observing interceptor keeps its own wrapping of this one)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in (COMPLETE, STREAM_COMPLETE, EMBED):
            return handler
        if self._gateway is None and not self._key_limits_change and not _key_limited(current_caller.get()):
            return handler
        return self._limited.of(handler, method)

    def _limit(self, handler: Handler, method: str) -> Handler:
        if method == STREAM_COMPLETE:
            return grpc.unary_stream_rpc_method_handler(
                self._limited_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            self._limited_unary(handler.unary_unary, method.rpartition("/")[2]),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _subjects(self) -> list[tuple[str, Limits]]:
        """Whose limits the call counts against: its key's, when the key has any, and the gateway's."""
        caller = current_caller.get()
        subjects = [(key_subject(caller.key.name), caller.key.limits)] if _key_limited(caller) else []
        if self._gateway is not None:
            subjects.append((GATEWAY, self._gateway))
        return subjects

    def _limited_unary(self, behavior: Any, rpc: str) -> Any:
        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not (subjects := self._subjects()):  # a key that has no limits as it starts (key_limits_change)
                return await behavior(request, context)
            meter = open_meter()  # first: the caller it names is read once, for its refusal and then its bill
            reservation = await self._admit(request, subjects, context, rpc, stream=False)
            try:
                return await behavior(request, context)
            finally:
                await self._limiter.settle(reservation, meter.tokens, meter.usd_micros)

        return limited

    def _limited_stream(self, behavior: Any) -> Any:
        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if not (subjects := self._subjects()):  # a key that has no limits as it starts (key_limits_change)
                async with contextlib.aclosing(behavior(request, context)) as answers:
                    async for answer in answers:
                        yield answer
                return
            meter = open_meter()  # first: the caller it names is read once, for its refusal and then its bill
            reservation = await self._admit(request, subjects, context, "StreamComplete", stream=True)
            try:
                # Closed, it closes the stream first, so that it settles with what the stream billed as it ended.
                async with contextlib.aclosing(behavior(request, context)) as answers:
                    async for answer in answers:
                        yield answer
            finally:
                await self._limiter.settle(reservation, meter.tokens, meter.usd_micros)

        return limited

    async def _admit(
        self,
        request: pb.CompleteRequest | pb.StreamCompleteRequest | pb.EmbedRequest,
        subjects: list[tuple[str, Limits]],
        context: grpc.aio.ServicerContext[Any, Any],
        rpc: str,
        *,
        stream: bool,
    ) -> Reservation:
        may_use = models_allowed()
        if self._refused_anyway(request, context, may_use):
            # The handler refuses it itself (the gateway is shutting down, or the request did not decode, is invalid,
            # names its caller wrongly, or asks for a model nothing serves or its key may not use): a refusal that
            # takes none of its limits (a client stuck on a bad request would lock its key out for a minute) and is
            # the handler's, which says more.
            return Reservation((), 0.0)  # nothing reserved, nothing to settle
        tokens = answer_tokens = usd_micros = 0
        answers = 1
        try:
            if any(
                limits.tokens_per_minute is not None or limits.budget_usd_per_day is not None for _, limits in subjects
            ):
                # A prompt of megabytes is counted in a thread, within the call's deadline: the caller gets the
                # gateway's DEADLINE_EXCEEDED, with its ErrorInfo, not its client library's bare one.
                by = self._router.deadline(context.time_remaining())
                if isinstance(request, pb.EmbedRequest):
                    tokens, usd_micros = await self._estimate_embedding(request, by, may_use)
                else:
                    tokens, answer_tokens, usd_micros, answers = await self._estimate(request, by, may_use)
            asks = [
                Ask(subject, limits, tokens, usd_micros, stream, answer_tokens, answers) for subject, limits in subjects
            ]
            return await self._limiter.reserve(asks)
        except LLMRelayError as error:
            # Over a limit, the limits' store out of reach, or a prompt that cannot be counted (its tokenizer's
            # encoding missing): each has its own status, as the servicer would give it.
            await abort(context, rpc, error)

    def _refused_anyway(
        self,
        request: pb.CompleteRequest | pb.StreamCompleteRequest | pb.EmbedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        may_use: ModelFilter | None,
    ) -> bool:
        """Whether the handler refuses the request itself: the gateway is shutting down (`Drain`), or the request does
        not decode, is invalid, names its caller wrongly (a malformed x-llmrelay-caller), or asks for a model nothing
        serves or its key may not use (`may_use`: `models_allowed()`), or its answer could not fit in a message."""
        if self._drain.begun or not decoded(request):
            return True
        try:
            caller_identity(context)  # kept in the call's meter, for the handler's bill
            parsed = (
                convert.embedding_request(request, max_answer_bytes=self._max_message_bytes)
                if isinstance(request, pb.EmbedRequest)
                # Under the servicer's own bound, so that the servicer takes this parse and does not repeat it.
                else convert.completion_request(request, max_image_bytes=self._max_image_bytes)
            )
        except (InvalidRequestError, AnswerTooLargeError):
            return True
        return self._router.refuses(parsed, may_use)

    async def _estimate(
        self, request: pb.CompleteRequest | pb.StreamCompleteRequest, by: float, may_use: ModelFilter | None
    ) -> tuple[int, int, int, int]:
        """The tokens to reserve (the prompt as counted offline, and the most the answer may take, for each answer
        the call may be billed for), those of them for the answers, their cost, and how many answers."""
        parsed = convert.completion_request(request, max_image_bytes=self._max_image_bytes)  # _refused_anyway's
        options = parsed.options
        model = self._router.model_counted(parsed, may_use)
        prompt = (
            await self._counter.count_chat_async(
                model, parsed.messages, options.tools, response_format=options.response_format, by=by
            )
        ).tokens
        # A request without max_tokens is as long as its route asks for, else server.reserve_completion_tokens.
        answers, answer_tokens, usd_micros = self._router.estimate(
            parsed, prompt, self._reserve_completion_tokens, may_use
        )
        return answers * prompt + answer_tokens, answer_tokens, usd_micros, answers

    async def _estimate_embedding(
        self, request: pb.EmbedRequest, by: float, may_use: ModelFilter | None
    ) -> tuple[int, int]:
        """The tokens and cost to reserve: the inputs as counted offline (an embedding answers with no tokens)."""
        parsed = convert.embedding_request(request)  # valid: _refused_anyway has parsed it
        model = self._router.model_counted(parsed, may_use)
        tokens = (await self._counter.count_texts_async(model, parsed.inputs, by=by)).tokens
        return tokens, self._router.estimate_embedding_usd_micros(parsed.model, tokens, may_use)


def _key_limited(caller: Caller | None) -> TypeGuard[Caller]:
    """Whether the call's key has limits of its own."""
    return caller is not None and caller.key.limits.any_set()
