"""Domain errors -> gRPC statuses with google.rpc details (AIP-193). The one place the mapping is decided.

| error                                   | code                | ErrorInfo.reason        | more details  |
|-----------------------------------------|---------------------|-------------------------|---------------|
| invalid request field                   | INVALID_ARGUMENT    | INVALID_REQUEST         | BadRequest    |
| upstream rejected the request (400)     | INVALID_ARGUMENT    | UPSTREAM_REJECTED       |               |
| prompt too long for every backend       | INVALID_ARGUMENT    | CONTEXT_LENGTH_EXCEEDED |               |
| no backend serves the model             | NOT_FOUND           | MODEL_NOT_FOUND         |               |
| upstream rate limit (every attempt)     | RESOURCE_EXHAUSTED  | UPSTREAM_RATE_LIMITED   | RetryInfo     |
| our own upstream credentials refused    | FAILED_PRECONDITION | UPSTREAM_AUTH_FAILED    |               |
| tokenizer encoding not installed        | FAILED_PRECONDITION | TOKENIZER_UNAVAILABLE   |               |
| every backend down or broken            | UNAVAILABLE         | BACKENDS_UNAVAILABLE    | RetryInfo     |
| upstream answers are malformed          | UNAVAILABLE         | UPSTREAM_BAD_RESPONSE   |               |
| the answer is over the message limit    | RESOURCE_EXHAUSTED  | ANSWER_TOO_LARGE        |               |
| the request is over the message limit   | RESOURCE_EXHAUSTED  | REQUEST_TOO_LARGE       |               |
| the gateway is shutting down            | UNAVAILABLE         | SHUTTING_DOWN           | RetryInfo     |
| ... and ended a stream that had started | ABORTED             | SHUTTING_DOWN           | RetryInfo     |
| the caller's deadline ran out           | DEADLINE_EXCEEDED   | DEADLINE_EXCEEDED       |               |
| a stream failed after it started        | ABORTED             | STREAM_INTERRUPTED      |               |
| no caller key, or an unknown one        | UNAUTHENTICATED     | UNAUTHENTICATED         |               |
| the key may not use the model           | PERMISSION_DENIED   | MODEL_NOT_ALLOWED       |               |
| the key may not read another's usage    | PERMISSION_DENIED   | USAGE_NOT_ALLOWED       |               |
| a caller's or the gateway's limit       | RESOURCE_EXHAUSTED  | <LIMIT>_EXCEEDED        | QuotaFailure, RetryInfo |
| ... a call larger than the limit itself | RESOURCE_EXHAUSTED  | <LIMIT>_EXCEEDED        | QuotaFailure  |
| limits' store unreachable, policy deny  | UNAVAILABLE         | LIMITS_UNAVAILABLE      | RetryInfo     |
| usage ledger's database unreachable     | UNAVAILABLE         | USAGE_UNAVAILABLE       | RetryInfo     |

A call that reached the router and failed (the attempts rows, and UPSTREAM_REJECTED) also lists what it tried: as
ErrorInfo's "attempts" metadata (`backend:outcome,...`, kept for older clients) and as an AttemptHistory detail.
Wherever RetryInfo goes, the trailer `grpc-retry-pushback-ms` (gRFC A6) carries the same delay, so that a client
channel's retry policy waits as long as the gateway asks, with no code of the caller's in the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message as ProtoMessage
from google.rpc import error_details_pb2, status_pb2
from llmrelay import v1 as pb

from llmrelay_server.convert import attempt_pb
from llmrelay_server.domain import (
    AllBackendsFailedError,
    AnswerTooLargeError,
    Attempt,
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    LimitsUnavailableError,
    LLMRelayError,
    ModelNotAllowedError,
    ModelNotFoundError,
    RequestTooLargeError,
    ShuttingDownError,
    StreamInterruptedError,
    TokenizerUnavailableError,
    UnauthenticatedError,
    UpstreamError,
    UpstreamErrorKind,
    UsageNotAllowedError,
    UsageUnavailableError,
    without_quotes,
)
from llmrelay_server.router import DEADLINE_MARGIN_S

DOMAIN: Final = "llmrelay.dev"
DEFAULT_RETRY_DELAY_S: Final = 1.0
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
REQUEST_ID_KEY: Final = "x-request-id"
"""The metadata key of a call's request id: the caller's (sane) one, else the gateway's own, sent back in the trailing
metadata and written in the call's log lines (calllog)."""
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
"""gRFC A6: a client channel's retry policy waits this many milliseconds before its next attempt."""
MAX_TRAILER_BYTES: Final = 6 * 1024
"""What a status takes in the trailers at most, as gRPC counts them: its text as grpc-message (percent-encoded: up to
three times as long) and again in grpc-status-details-bin (base64: a third more). gRPC clients refuse trailers over
8 KiB (some of the time; every time over 16 KiB), which the request id and the pushback share: a status that outgrew
them would reach the caller as a RESOURCE_EXHAUSTED that names nothing. Every backend failing with a long message,
retried, would get there; what gives way is the attempts' texts in the AttemptHistory, the oldest first."""
MAX_ATTEMPTS_METADATA_BYTES: Final = 1000
"""ErrorInfo's "attempts" metadata, at most: the newest attempts where there were more (dozens of backends)."""
MAX_MESSAGE_BYTES: Final = 1200
"""A status's text, in UTF-8, at most (cut, saying how much was left out; an invalid request's seldom is, see
InvalidRequestError.REPORTED_BYTES, and its BadRequest lists the violations whole)."""
MAX_ATTEMPT_ERROR_CHARS: Final = 200
"""Each attempt's error in a status's AttemptHistory, at most (the call log and traces keep it whole)."""

_Detail: TypeAlias = error_details_pb2.RetryInfo | error_details_pb2.BadRequest | error_details_pb2.QuotaFailure
# A classification: the code, ErrorInfo's reason and metadata, and the details that follow ErrorInfo.
_Classified: TypeAlias = tuple[grpc.StatusCode, str, dict[str, str], list[_Detail]]


log = logging.getLogger(__name__)
_quotes_logged = False


def log_upstreams_words(logged: bool) -> None:
    """Whether a failed call's log line has what its upstreams said (UpstreamError.quoted), which may repeat its
    request: only with server.log_content. Set as a gateway starts."""
    global _quotes_logged
    _quotes_logged = logged


async def abort(context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: LLMRelayError) -> NoReturn:
    """Ends the call with the error's status; a caller's mistake or an upstream's failure is one log line, never a
    traceback."""
    failure = rpc_failure(error, context.time_remaining())
    quoted = () if _quotes_logged else _quotes(error)
    said = _cut(without_quotes(str(error), quoted), MAX_MESSAGE_BYTES) if quoted else failure.details
    # What the call had set to send back already (its request id) goes with the status's details, and the line
    # names the request, for the call log's line of the same call.
    sent = tuple(context.trailing_metadata() or ())
    request = next(
        (f" (request {value})" for key, value in sent if key == REQUEST_ID_KEY and isinstance(value, str)), ""
    )
    log.info("%s failed%s: %s: %s", rpc, request, failure.code.name, said)
    await context.abort(failure.code, failure.details, (*sent, *failure.trailing_metadata))
    raise AssertionError("abort returns only by raising")


async def fail_unexpectedly(context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: Exception) -> NoReturn:
    """Ends a call that a fault of the gateway's own broke (an exception no layer answered) as every other failure
    ends, INTERNAL with ErrorInfo, rather than gRPC's UNKNOWN with Python's exception text and no details. The
    traceback goes to the log, the one place for it; the caller is told only that it is there."""
    log.error("%s failed on an unexpected error in the gateway", rpc, exc_info=error)
    await abort(context, rpc, LLMRelayError("the gateway failed unexpectedly; its log has the details"))


def _quotes(error: LLMRelayError) -> list[str]:
    """The upstreams' words in the error's text: its own, its attempts', and those of the failure that broke its
    stream."""
    quoted = [attempt.quoted for attempt in getattr(error, "attempts", None) or ()]
    for failure in (error, getattr(error, "cause", None)):
        if isinstance(failure, UpstreamError):
            quoted.append(failure.quoted)
    return [words for words in quoted if words]


def ended_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> grpc.StatusCode:
    """The status a call that raised ended with: the one it aborted with, else DEADLINE_EXCEEDED (cancelled at its
    deadline, before the gateway answered), CANCELLED (the caller left, or the stream was closed) or UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code
    if not isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.UNKNOWN
    # gRPC cancels a handler alike when its caller leaves and when the caller's deadline passes, and then the caller
    # got DEADLINE_EXCEEDED, which the call's metrics, line and span must say too. The caller's own timer usually
    # fires first, its deadline as the gateway reads it being later by the request's way here: its cancellation
    # comes with a little time left, within the margin the router keeps before a deadline (where it records the
    # attempt cut as a timeout).
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_MARGIN_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass(frozen=True, slots=True)
class Failure(grpc.Status):
    """A status to abort a call with (grpc.Status's fields)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rpc_failure(error: LLMRelayError, time_remaining_s: float | None = None) -> Failure:
    """The status to abort a call with: code, the error's text, the google.rpc.Status in the details trailer (ErrorInfo
    first, then the other details, AttemptHistory last), and the pushback trailer beside a RetryInfo.

    `time_remaining_s` is what is left of the call's deadline (None: it has none). A retry delay that outlasts it gets
    a pushback of -1, which tells a client channel not to retry (gRFC A6): waiting it out would turn an answer that
    says when to come back (a circuit open for 30 s) into a bare DEADLINE_EXCEEDED. So does an UNAVAILABLE without a
    RetryInfo (every backend answered garbage): the SDKs' channels retry UNAVAILABLE, and would meet the same answer."""
    code, reason, metadata, extra = _classify(error)
    message = _cut(str(error), MAX_MESSAGE_BYTES)
    attempts = _routed_attempts(error)
    history = None
    if attempts is not None:
        pairs = [f"{a.backend}:{a.outcome.value}" for a in attempts]
        pairs = pairs[len(pairs) - _newest_that_fit(pairs) :]
        attempts = attempts[len(attempts) - len(pairs) :]
        metadata["attempts"] = ",".join(pairs)
        history = pb.AttemptHistory(attempts=[attempt_pb(a) for a in attempts])
        for attempt in history.attempts:
            if len(attempt.error) > MAX_ATTEMPT_ERROR_CHARS:
                attempt.error = attempt.error[: MAX_ATTEMPT_ERROR_CHARS - 3] + "..."
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=code.value[0], message=message, details=[_pack(info), *map(_pack, extra)])
    if history is not None:
        room = (MAX_TRAILER_BYTES - _percent_encoded_bytes(message)) * 3 // 4 - status.ByteSize()
        if _fit_history(history, room):
            # The two say the same attempts (the contract): the metadata names those the history still holds.
            info.metadata["attempts"] = ",".join(pairs[len(pairs) - len(history.attempts) :])
            status.details[0].Pack(info)
        status.details.append(_pack(history))
    trailers: tuple[tuple[str, str | bytes], ...] = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    retry = next((detail for detail in extra if isinstance(detail, error_details_pb2.RetryInfo)), None)
    if retry is not None:
        # Whole milliseconds, rounded up: a client that comes back early would only be refused again.
        pushback_ms = math.ceil(retry.retry_delay.ToNanoseconds() / 1e6)
        if time_remaining_s is not None and pushback_ms >= time_remaining_s * 1000:
            pushback_ms = -1
        trailers += ((PUSHBACK_KEY, str(pushback_ms)),)
    elif code is grpc.StatusCode.UNAVAILABLE:
        trailers += ((PUSHBACK_KEY, "-1"),)
    return Failure(code, message, trailers)


def _cut(text: str, limit_bytes: int) -> str:
    """`text`, or as much of it as fits `limit_bytes` in UTF-8 and how much was left out."""
    encoded = text.encode(errors="replace")
    if len(encoded) <= limit_bytes:
        return text
    kept = encoded[: limit_bytes - 40].decode(errors="ignore")  # room for the note; a character cut in two dropped
    return f"{kept}... ({len(text) - len(kept)} more characters)"


def _percent_encoded_bytes(text: str) -> int:
    """The length of `text` as grpc-message carries it: every byte outside printable ASCII, and %, as %XX."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in text.encode(errors="replace"))


def _newest_that_fit(pairs: list[str]) -> int:
    """How many of the newest `backend:outcome` pairs ErrorInfo's "attempts" holds in MAX_ATTEMPTS_METADATA_BYTES."""
    kept, size = 0, 0
    for pair in reversed(pairs):
        size += len(pair) + 1
        if size > MAX_ATTEMPTS_METADATA_BYTES:
            break
        kept += 1
    return kept


def _fit_history(history: pb.AttemptHistory, room_bytes: int) -> bool:
    """Leaves out the attempts' error texts, the oldest first, until the history fits `room_bytes` (packed in an Any:
    its type URL and a few bytes more); then, were there more attempts than that (dozens of backends, or a long text
    in another script), the oldest attempts themselves. Whether any attempt was left out."""
    room_bytes -= 100
    for attempt in history.attempts:
        if history.ByteSize() <= room_bytes:
            return False
        attempt.error = ""
    dropped = False
    while history.attempts and history.ByteSize() > room_bytes:
        del history.attempts[0]
        dropped = True
    return dropped


def _routed_attempts(error: LLMRelayError) -> Sequence[Attempt] | None:
    """The attempts of a call that reached the router and ended with this error; None for any other error."""
    if isinstance(error, DeadlineExceededError) and not error.routed:
        return None  # it ran out before any backend was asked (counting a prompt of megabytes): it reached none
    routed = AllBackendsFailedError | DeadlineExceededError | StreamInterruptedError | UpstreamError
    return error.attempts if isinstance(error, routed) else None


def _classify(error: LLMRelayError) -> _Classified:
    if isinstance(error, InvalidRequestError):
        # The reported violations only, as in the error's text, which says how many more there were: every one of a
        # long chat's would outgrow what gRPC lets trailers carry.
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.reported
        ]
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            {},
            [error_details_pb2.BadRequest(field_violations=violations)],
        )
    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {}, []
    if isinstance(error, ModelNotAllowedError):
        metadata = {"caller": error.caller, "model": error.model}
        return grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED", metadata, []
    if isinstance(error, UsageNotAllowedError):
        metadata = {"caller": error.caller, "requested_caller": error.requested}
        return grpc.StatusCode.PERMISSION_DENIED, "USAGE_NOT_ALLOWED", metadata, []
    if isinstance(error, LimitExceededError):
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=error.description)]
        )
        metadata = {"subject": error.subject}
        # No RetryInfo for a call larger than the limit itself: no wait would ever admit it.
        retry = [] if error.retry_after_s is None else [_retry_info(error.retry_after_s)]
        return grpc.StatusCode.RESOURCE_EXHAUSTED, error.kind.value, metadata, [quota, *retry]
    if isinstance(error, LimitsUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "LIMITS_UNAVAILABLE", {}, [_retry_info(error.retry_after_s)]
    if isinstance(error, UsageUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "USAGE_UNAVAILABLE", {}, [_retry_info(error.retry_after_s)]
    if isinstance(error, ModelNotFoundError):
        return (
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
            {"model": error.model, "served": ",".join(error.served)},
            [],
        )
    if isinstance(error, AnswerTooLargeError):
        metadata = {"size": str(error.size), "limit": str(error.limit)}
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "ANSWER_TOO_LARGE", metadata, []
    if isinstance(error, RequestTooLargeError):
        metadata = {"size": str(error.size), "limit": str(error.limit)}
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE", metadata, []
    if isinstance(error, ShuttingDownError):
        # A stream that has sent text cannot simply be retried by a client: ABORTED says so.
        code = grpc.StatusCode.ABORTED if error.stream_started else grpc.StatusCode.UNAVAILABLE
        return code, "SHUTTING_DOWN", {}, [_retry_info(DEFAULT_RETRY_DELAY_S)]
    if isinstance(error, TokenizerUnavailableError):
        return grpc.StatusCode.FAILED_PRECONDITION, "TOKENIZER_UNAVAILABLE", {"encoding": error.encoding}, []
    if isinstance(error, UpstreamError):
        return _upstream(error)
    if isinstance(error, StreamInterruptedError):
        return grpc.StatusCode.ABORTED, "STREAM_INTERRUPTED", _upstream_metadata(error.cause), []
    if isinstance(error, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", {}, []
    if isinstance(error, AllBackendsFailedError):
        return _exhausted(error)
    return grpc.StatusCode.INTERNAL, "UNSPECIFIED", {}, []


def _exhausted(error: AllBackendsFailedError) -> _Classified:
    last = error.last_upstream_error
    delay_s = DEFAULT_RETRY_DELAY_S if error.retry_after_s is None else error.retry_after_s
    if last is not None and len(error.causes) <= 1:
        # One cause everywhere names the problem better than "unavailable" would. A backend skipped for its open
        # circuit is one cause more: the request that another refused may be served by it once it cools down.
        return _upstream(last, delay_s)
    return grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE", {}, [_retry_info(delay_s)]


def _upstream(error: UpstreamError, retry_after_s: float | None = None) -> _Classified:
    """The status of an upstream's failure; retry_after_s: when to try again, if not as the error says (the soonest
    of every backend that failed alike)."""
    metadata = _upstream_metadata(error)
    kind = error.kind
    if kind in (UpstreamErrorKind.REJECTED, UpstreamErrorKind.UNSUPPORTED):
        return grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED", metadata, []
    if kind is UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED:
        return grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED", metadata, []
    if kind is UpstreamErrorKind.MODEL_NOT_FOUND:
        return grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", metadata, []
    if kind is UpstreamErrorKind.AUTH_FAILED:
        return grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED", metadata, []
    if kind is UpstreamErrorKind.BAD_RESPONSE:
        return grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", metadata, []
    if retry_after_s is None:
        retry_after_s = DEFAULT_RETRY_DELAY_S if error.retry_after_s is None else error.retry_after_s
    retry = _retry_info(retry_after_s)
    if kind is UpstreamErrorKind.RATE_LIMITED:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", metadata, [retry]
    return grpc.StatusCode.UNAVAILABLE, "BACKENDS_UNAVAILABLE", metadata, [retry]


def _upstream_metadata(error: UpstreamError) -> dict[str, str]:
    metadata = {"backend": error.backend}
    if error.status is not None:
        metadata["upstream_status"] = str(error.status)
    return metadata


def _retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(delay_s * 1e9))
    return info


def _pack(message: ProtoMessage) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
