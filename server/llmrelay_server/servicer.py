"""LLMService: protobuf in, domain calls on the router, protobuf out; domain errors become rich gRPC statuses."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage
from llmrelay import v1 as pb

from llmrelay_server import convert
from llmrelay_server.auth import caller_identity, current_caller, models_allowed
from llmrelay_server.domain import (
    AnswerTooLargeError,
    CompletionChunk,
    DeadlineExceededError,
    InvalidRequestError,
    LLMRelayError,
    ShuttingDownError,
    StoreHealth,
    ToolCallDelta,
)
from llmrelay_server.health import HealthMonitor
from llmrelay_server.router import Router
from llmrelay_server.status import abort
from llmrelay_server.usage import MANY_ROWS, UsageLedger

# Room in a stream message for everything but its text (ids, names, usage, attempts).
MESSAGE_HEADROOM_BYTES: Final = 64 * 1024
GRPC_DEFAULT_MESSAGE_BYTES: Final = 4 * 1024 * 1024
"""gRPC's default bound on a message a client receives, which most clients keep."""
OVERDUE_RECHECK_S: Final = 0.5
"""How often a stream past its bound but not waiting on gRPC's write then is looked at again (`_end_if_writing`)."""
_log = logging.getLogger(__name__)
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Answer = TypeVar("_Answer", bound=ProtoMessage)
_Stream = tuple[AsyncGenerator[CompletionChunk, None], contextvars.Context]
"""A stream's chunks from the router, and the context of its call."""


class Drain:
    """Whether the gateway's shutdown has begun its drain: from then on a new model call is refused SHUTTING_DOWN (go
    to another instance), by the servicer, and by the limits before they reserve anything for it (a caller told to
    wait a minute for a limit would wait for an instance that is going away)."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = False


class LLMServicer(pb.LLMServiceServicer):
    def __init__(
        self,
        router: Router,
        monitor: HealthMonitor,
        ledger: UsageLedger,
        max_message_bytes: int,
        stores: Callable[[], list[StoreHealth]] = list,
        *,
        max_image_bytes: int,
        drain: Drain | None = None,
    ) -> None:
        self._stores = stores
        self._drain = drain or Drain()
        self._max_message_bytes = max_message_bytes
        self._max_image_bytes = max_image_bytes
        # A delta with more characters than this may be over the message limit (4 bytes a character at most, and
        # room for the rest of the message): it is sent in pieces. Under a small limit, half of it is the room: a
        # stream of one character a message would send a short answer as thousands. Over gRPC's default receive
        # limit (4 MiB), raised for large images, no message is: splitting a stream costs nothing, and a client
        # that kept the default failed the stream before its first text, billed all the same.
        piece_bytes = min(max_message_bytes, GRPC_DEFAULT_MESSAGE_BYTES)
        headroom = min(MESSAGE_HEADROOM_BYTES, piece_bytes // 2)
        self._max_delta_chars = max(1, (piece_bytes - headroom) // 4)
        self._interrupting = False
        self._calls: dict[asyncio.Task[Any], _Stream | None] = {}
        """The model calls in progress, by task; a stream's with its chunks from the router and the call's context
        (`_close_abandoned`)."""
        self._sending: dict[asyncio.Task[Any], grpc.aio.ServicerContext[Any, Any]] = {}
        """The streams whose task is in gRPC's hands, sending a message: cancelled there alone, gRPC would end the
        call without a word, and leave the caller waiting (`_end`)."""
        self._unbounded: dict[asyncio.Task[Any], float] = {}
        """The streams whose caller set no deadline, with their bound (router.request_timeout_s), soonest first: the
        bound is one length for all, so the order they came in is that of their bounds (`_bound`)."""
        self._bound_timer: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()
        """The statuses of streams ended in gRPC's write (`_end`), on their way behind the messages gRPC holds."""
        self._closing: set[asyncio.Task[None]] = set()
        """The closing of streams whose task ended in gRPC's write (`_close_abandoned`)."""
        self._router = router
        self._monitor = monitor
        self._ledger = ledger

    def start_draining(self) -> None:
        """From now on, new model calls get UNAVAILABLE; calls in flight go on."""
        self._drain.begun = True

    async def interrupt_calls(self, wait_s: float) -> None:
        """The grace period is over: model calls still running end now with the gateway's own status (SHUTTING_DOWN:
        UNAVAILABLE, or ABORTED for a stream that has sent text) rather than gRPC's bare cancellation."""
        self._interrupting = True
        calls = list(self._calls)
        for call in calls:
            if call.done():  # ended in gRPC's write, its stream being closed (`_close_abandoned`)
                continue
            if (context := self._sending.get(call)) is not None:
                self._end(call, context, ShuttingDownError(stream_started=True, in_flight=True))
            else:
                call.cancel()
        if calls:
            await asyncio.wait(calls, timeout=wait_s)

    async def calls_ended(self, wait_s: float) -> None:
        """Until the model calls still running have ended, `wait_s` at most. gRPC counts a call its caller left as
        over at once, while the gateway is still billing what its stream consumed (a count that may take a thread's
        while): what is closed after this (the ledger) must wait for that."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_s
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=wait_s)
        for task in [task for task in self._calls if task.done()]:  # ended in gRPC's write: its caller gone
            self._close_later(task)
        if self._closing and (left_s := until - loop.time()) > 0:
            await asyncio.wait(list(self._closing), timeout=left_s)

    def say_unbilled(self) -> None:
        """At the end of the stop: an ERROR for the calls still being billed, whose bills (a long prompt counted
        offline, where the upstream gave no usage) are dropped with the event loop: said, not lost without a word."""
        if unbilled := sum(not task.done() for task in (*self._calls, *self._closing)):
            _log.error(
                "%d calls were still being billed as the gateway stopped: their usage is not in the ledger (the"
                " stop waits for such bills as long as a count of the largest request may take, unless told to stop"
                " now)",
                unbilled,
            )

    # A pair rather than a context manager: contextlib's costs a microsecond a call.
    def _model_call(self) -> asyncio.Task[Any]:
        """Admits a model call (not while draining) and keeps its task where a shutdown can interrupt it, until
        `_model_call_ended`."""
        if self._drain.begun:
            raise ShuttingDownError()
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = None
        return task

    def _model_call_ended(self, task: asyncio.Task[Any]) -> None:
        self._calls.pop(task, None)
        self._sending.pop(task, None)  # a stream closed as it sent (its caller gone)

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse]
    ) -> pb.CompleteResponse:
        return await self._answer(
            context,
            "Complete",
            lambda: convert.completion_request(request, max_image_bytes=self._max_image_bytes),
            self._router.complete,
            convert.complete_response,
        )

    async def StreamComplete(
        self,
        request: pb.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[pb.StreamCompleteRequest, pb.StreamCompleteResponse],
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        started = False
        remaining = context.time_remaining()
        try:
            task = self._model_call()
            deadline = self._router.deadline(remaining)
            if remaining is None:
                self._bound(task, deadline)
            try:
                parsed, caller = _with_caller(
                    lambda: convert.completion_request(request, max_image_bytes=self._max_image_bytes), context
                )
                chunks = self._router.stream(
                    parsed,
                    deadline=deadline,
                    caller=caller,
                    may_use=models_allowed(),
                )
                self._calls[task] = (chunks, contextvars.copy_context())
                # Closed (the caller gone), this closes the router's stream at once, which bills what it consumed.
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if not started and remaining is None:
                            # Its headers on their own, before its first message: gRPC sends them with it otherwise,
                            # and takes no status while they wait (a first message held by flow control, the caller
                            # not reading), which `_end_if_writing` must send. Not before: a stream that fails before
                            # its first message ends with its status alone, which a client's channel may retry.
                            with contextlib.suppress(grpc.aio.InternalError):  # the caller gone: cancelled next
                                await context.send_initial_metadata(())
                        started = True
                        if _text_length(chunk) <= self._max_delta_chars:
                            self._sending[task] = context
                            yield convert.stream_response(chunk)
                            self._sending.pop(task, None)  # gone already if `_end` ended it
                        else:
                            for piece in _split(chunk, self._max_delta_chars):
                                message = convert.stream_response(piece)
                                # A field that goes back whole or not at all (_WHOLE_FIELD_TOO_LARGE) may leave a
                                # piece over the characters that surely fit: sent if its bytes do.
                                if (
                                    _text_length(piece) > self._max_delta_chars
                                    and (size := message.ByteSize()) > self._max_message_bytes
                                ):
                                    raise AnswerTooLargeError(size, self._max_message_bytes, _WHOLE_FIELD_TOO_LARGE)
                                self._sending[task] = context
                                yield message
                                self._sending.pop(task, None)
            finally:
                self._model_call_ended(task)
                if remaining is None:
                    self._unbounded.pop(task, None)
        except LLMRelayError as error:
            await abort(context, "StreamComplete", self._as_bounded(error, remaining))
        except asyncio.CancelledError:
            if not self._interrupting or context.done():  # its status sent already (`_end`)
                raise
            try:
                await abort(context, "StreamComplete", ShuttingDownError(stream_started=started, in_flight=True))
            except grpc.aio.InternalError:
                # A message still on its way to a caller that stopped reading: no status can go behind it, and
                # gRPC's own cut at the end of the grace period ends the call.
                raise asyncio.CancelledError from None

    def _bound(self, task: asyncio.Task[Any], deadline: float) -> None:
        """Watches a stream whose caller set no deadline, to end it at its bound however it waits then.

        Waiting on its upstream, the router's own deadline ends it. Waiting on gRPC's write (its caller stopped
        reading an answer larger than gRPC's buffers), nothing of the gateway's runs, and a caller that keeps its
        connection would keep the stream, its upstream request and its limits' reservation for as long
        (`_end_if_writing`). One timer for the soonest bound, as the router's `Deadlines`: a stream that ends in time,
        as nearly all do, leaves it alone."""
        self._unbounded[task] = deadline
        if self._bound_timer is None:
            self._bound_timer = asyncio.get_running_loop().call_at(deadline, self._bounds_passed, deadline)

    def _bounds_passed(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        self._bound_timer = None
        # The loop may run a timer a little before its time by its own clock (uvloop's counts whole milliseconds).
        now = max(due, loop.time())
        passed = []
        for task, deadline in self._unbounded.items():
            if deadline > now:
                self._bound_timer = loop.call_at(deadline, self._bounds_passed, deadline)
                break
            passed.append(task)
        for task in passed:
            del self._unbounded[task]
            self._end_if_writing(task)

    def _end_if_writing(self, task: asyncio.Task[Any]) -> None:
        """Ends a stream past its bound that waits on gRPC's write (`_end`): the caller gets DEADLINE_EXCEEDED
        behind what gRPC holds for it, whenever it reads again."""
        if task.done():
            return
        if (context := self._sending.get(task)) is None:
            # Between two writes, in the router: its own deadline, the same, ends it, unless a chunk beat it there.
            asyncio.get_running_loop().call_later(OVERDUE_RECHECK_S, self._end_if_writing, task)
            return
        error = DeadlineExceededError(
            f"the stream ran past router.request_timeout_s ({self._router.request_timeout_s:g} s), the bound of a call"
            " whose caller sets no deadline, while the gateway waited for the caller to read; set a deadline to allow"
            " longer",
            (),
        )
        self._end(task, context, error)

    def _end(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext[Any, Any], error: LLMRelayError) -> None:
        """Ends a stream whose task waits on gRPC's write, maybe for a caller that stopped reading: its status first,
        which gRPC sends behind the messages it holds, then its task cancelled, then the router's stream closed
        (billed, its upstream request closed). Its task cancelled alone, gRPC would leave the caller with no status
        at all."""
        self._sending.pop(task, None)  # ended once
        # Scheduled before the task's cancellation, its status is with gRPC before the stream is ended under it.
        ending = asyncio.ensure_future(_abort_behind(context, error))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)
        task.cancel()
        self._close_later(task)

    def _close_later(self, task: asyncio.Task[Any]) -> None:
        closing = asyncio.ensure_future(self._close_abandoned(task))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _close_abandoned(self, task: asyncio.Task[Any]) -> None:
        """Closes the router's stream of a call whose task ended in gRPC's write (cancelled there: its caller gone,
        or `_end`). gRPC leaves the stream's layers to the loop's hook for async generators, which closes them some
        time later (after a shutdown closed the ledger, even): the bill and the upstream request must not wait."""
        await asyncio.wait([task])
        stream = self._calls.get(task)
        if stream is None:  # closed already, every layer
            return
        chunks, context = stream
        try:
            # In the call's own context: the bill goes to the call's meter too, which its limits settle with.
            await asyncio.get_running_loop().create_task(chunks.aclose(), context=context)
        except RuntimeError:  # the hook is closing it this moment: done once the servicer's layer is
            while task in self._calls:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(OVERDUE_RECHECK_S / 10)
        self._model_call_ended(task)

    async def CountTokens(
        self,
        request: pb.CountTokensRequest,
        context: grpc.aio.ServicerContext[pb.CountTokensRequest, pb.CountTokensResponse],
    ) -> pb.CountTokensResponse:
        try:
            count = await self._router.count_tokens(
                *convert.count_request(request, max_image_bytes=self._max_image_bytes),
                deadline=self._router.deadline(context.time_remaining()),
                may_use=models_allowed(),
            )
        except LLMRelayError as error:
            await abort(context, "CountTokens", error)
        return pb.CountTokensResponse(
            token_count=count.tokens, model=count.model, encoding=count.encoding, estimated=count.estimated
        )

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[pb.HealthRequest, pb.HealthResponse]
    ) -> pb.HealthResponse:
        if request.probe:
            report = await self._monitor.probe(self._router.deadline(context.time_remaining()))
        else:
            report = self._monitor.report()
        return pb.HealthResponse(
            # A draining gateway refuses model calls, so it is not serving them, whatever its backends' state.
            serving=self._monitor.serving and not self._drain.begun,
            backends=[convert.backend_health_pb(health, state.value) for health, state in report],
            stores=[convert.store_health_pb(store) for store in self._stores()],
        )

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[pb.GetUsageRequest, pb.GetUsageResponse]
    ) -> pb.GetUsageResponse:
        try:
            query = convert.usage_query(request)
            if (caller := current_caller.get()) is not None:
                query = query._replace(caller=caller.usage_of(query.caller))
            totals = await self._ledger.query(*query)
            if len(totals) > MANY_ROWS:  # made in a thread, as the ledger's rows are: it would hold every call up
                answer = await asyncio.to_thread(convert.usage_answer, totals)
            else:
                answer = convert.usage_answer(totals)
            # A record per backend, model and caller: a ledger of many callers outgrows the limit, and gRPC would
            # refuse to send it with a bare status that says nothing of the filters that make it smaller.
            if (size := answer.ByteSize()) > self._max_message_bytes:
                remedy = "narrow it with GetUsage's backend, model or caller, or a shorter time window"
                raise AnswerTooLargeError(size, self._max_message_bytes, remedy)
        except LLMRelayError as error:
            await abort(context, "GetUsage", error)
        return answer

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[pb.EmbedRequest, pb.EmbedResponse]
    ) -> pb.EmbedResponse:
        return await self._answer(
            context,
            "Embed",
            lambda: convert.embedding_request(request, max_answer_bytes=self._max_message_bytes),
            self._router.embed,
            convert.embed_response,
            remedy=convert.FEWER_VECTORS,
        )

    def _as_bounded(self, error: LLMRelayError, remaining: float | None) -> LLMRelayError:
        """The error a model call ended with, a deadline's in the words of the bound when the caller set none (the
        router's own words say that "the deadline" ran out, which such a caller cannot act on)."""
        if remaining is not None or not isinstance(error, DeadlineExceededError):
            return error
        bounded = DeadlineExceededError(
            f"the call ran past router.request_timeout_s ({self._router.request_timeout_s:g} s), the bound of a call"
            f" whose caller sets no deadline; set a deadline to allow longer ({error})",
            error.attempts,
            routed=error.routed,
        )
        bounded.__cause__ = error.__cause__
        return bounded

    async def _answer(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        rpc: str,
        parse: Callable[[], _Request],
        route: Callable[..., Awaitable[_Response]],
        to_pb: Callable[[_Response], _Answer],
        remedy: str | None = None,
    ) -> _Answer:
        """One model call answered at once (Complete, Embed): the request parsed, routed within the caller's deadline
        as the caller may, and converted back; every failure the gateway's own status."""
        remaining = context.time_remaining()
        try:
            task = self._model_call()
            try:
                parsed, caller = _with_caller(parse, context)
                response = await route(
                    parsed,
                    deadline=self._router.deadline(remaining),
                    caller=caller,
                    may_use=models_allowed(),
                )
            finally:
                self._model_call_ended(task)
            answer = to_pb(response)
            # Sent as is, an oversized answer would fail inside gRPC with a bare status and a server error log.
            if (size := answer.ByteSize()) > self._max_message_bytes:
                # The status raised below keeps this frame (through its traceback, in a cycle with the call's context
                # that only a full garbage collection frees, which a busy gateway may not run for many calls): not
                # the answer it refuses with it.
                del response, answer
                raise AnswerTooLargeError(size, self._max_message_bytes, *((remedy,) if remedy else ()))
        except LLMRelayError as error:
            await abort(context, rpc, self._as_bounded(error, remaining))
        except asyncio.CancelledError:
            if not self._interrupting:
                raise
            await abort(context, rpc, ShuttingDownError(in_flight=True))
        return answer


def _with_caller(parse: Callable[[], _Request], context: grpc.aio.ServicerContext[Any, Any]) -> tuple[_Request, str]:
    """The request parsed, and who calls (`caller_identity`): a malformed x-llmrelay-caller reported with the
    request's own wrong fields, if any, so that the caller mends them all in one round trip."""
    try:
        parsed = parse()
    except InvalidRequestError as invalid:
        try:
            caller_identity(context)
        except InvalidRequestError as named_wrongly:
            raise InvalidRequestError([*invalid.violations, *named_wrongly.violations]) from None
        raise
    return parsed, caller_identity(context)


async def _abort_behind(context: grpc.aio.ServicerContext[Any, Any], error: LLMRelayError) -> None:
    """Ends a call with `error`'s status from outside its handler: gRPC sends it once the caller has read what came
    before it, and drops it if the caller leaves first."""
    with contextlib.suppress(grpc.aio.AbortError, grpc.aio.InternalError, grpc.aio.UsageError):
        await abort(context, "StreamComplete", error)


_WHOLE_FIELD_TOO_LARGE: Final = (
    "a field from the upstream that is never cut (the answer's id or model name, the reasoning's signature, a tool"
    " call's id or signature) is that large alone: raise the gateway's server.max_message_bytes"
)


def _text_length(chunk: CompletionChunk) -> int:
    """The characters of a chunk's message that an upstream chose: every message of a stream repeats the answer's
    id and model name, and an upstream's are of any length (a stream whose id was megabytes passed uncounted, and
    gRPC refused its message with a bare RESOURCE_EXHAUSTED)."""
    length = len(chunk.id) + len(chunk.model) + len(chunk.content or "") + len(chunk.reasoning or "")
    if chunk.reasoning_signature is not None:
        length += len(chunk.reasoning_signature)
    if not chunk.tool_calls:
        return length
    return length + sum(
        len(call.arguments or "") + len(call.id or "") + len(call.signature or "") for call in chunk.tool_calls
    )


def _split(chunk: CompletionChunk, max_chars: int) -> list[CompletionChunk]:
    """A chunk too large for one message as several, each within `max_chars` of text (`_text_length`); together the
    same deltas. A field never cut that is too large alone leaves a piece over `max_chars`, for the caller to refuse."""
    room = max_chars - len(chunk.id) - len(chunk.model)  # what each piece has beside the id and model it repeats
    if room < 1:
        return [chunk]
    bare = replace(
        chunk, content=None, reasoning=None, tool_calls=(), finish_reason=None, usage=None, reasoning_signature=None
    )
    pieces = [replace(bare, content=part) for part in _parts(chunk.content, room)]
    pieces += [replace(bare, reasoning=part) for part in _parts(chunk.reasoning, room)]
    for call in chunk.tool_calls:
        # The call's first piece holds its id and signature beside the start of its arguments.
        head = max(0, room - len(call.id or "") - len(call.signature or ""))
        arguments = call.arguments
        pieces.append(
            replace(bare, tool_calls=(replace(call, arguments=arguments[:head] if arguments else arguments),))
        )
        rest = _parts(arguments[head:], room) if arguments else []
        pieces += [replace(bare, tool_calls=(ToolCallDelta(index=call.index, arguments=part),)) for part in rest]
    if chunk.reasoning_signature is not None or not pieces:
        pieces.append(bare)  # the signature on a piece of its own: it may take all the room
    # The end of the answer, if this chunk carried it, stays on the last piece, the reasoning's signature with it,
    # once (a client adds up the deltas).
    pieces[-1] = replace(
        pieces[-1],
        finish_reason=chunk.finish_reason,
        usage=chunk.usage,
        attempts=chunk.attempts,
        reasoning_signature=chunk.reasoning_signature,
    )
    return pieces


def _parts(text: str | None, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] if text else []
