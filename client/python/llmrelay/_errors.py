"""The SDK's errors: one class per gRPC status the gateway uses, with the google.rpc details decoded.

LLMRelayError
├── InvalidArgumentError       the request is wrong; field_violations say where
├── NotFoundError              no backend serves the model
├── ResourceExhaustedError     rate limited (retry_delay_s) or the request is too large
├── FailedPreconditionError    the gateway's own configuration needs an operator
├── UnavailableError           every backend is down; retry after retry_delay_s
├── DeadlineExceededError      the deadline ran out
├── AbortedError               a stream broke after it started; retry the whole call
├── UnauthenticatedError       no caller key, or one the gateway does not know
└── PermissionDeniedError      the caller's key may not use the model

`ErrorDetails` is the one decoder of the google.rpc details the gateway sends (the SDK's errors, the CLI and the
project's tests all read them through it): `error_details(rpc_error)` or `ErrorDetails.decode(status_bytes)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo, QuotaFailure, RetryInfo

from llmrelay import v1 as pb

if TYPE_CHECKING:
    from llmrelay._agent import Answer

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
"""The trailing metadata key that carries a google.rpc.Status, details included (grpcio-status's)."""
DOMAIN: Final = "llmrelay.dev"
"""The domain of the gateway's ErrorInfo: an ErrorInfo of another's (a proxy's, an interceptor's) names no reason of
the contract's."""
REQUEST_ID_KEY: Final = "x-request-id"
"""The trailing metadata key that carries the call's request id, as the gateway's log line has it."""
_Detail = TypeVar("_Detail", bound=Message)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """A field of the request that is wrong (BadRequest), and why."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """A quota the call ran into (QuotaFailure): whose, and what."""

    subject: str
    description: str


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """The google.rpc details of a failed call, each as its message (None when the status has none of that type),
    with typed readings of them as properties."""

    error_info: ErrorInfo | None = None
    retry_info: RetryInfo | None = None
    bad_request: BadRequest | None = None
    quota_failure: QuotaFailure | None = None
    attempt_history: pb.AttemptHistory | None = None

    @classmethod
    def decode(cls, status: bytes) -> ErrorDetails:
        """The details of a serialized google.rpc.Status (the `grpc-status-details-bin` trailer); details of other
        types are left out, as are those that do not decode (a proxy's trailer, or another server's, is no concern of
        the caller's, who is told the call's status all the same)."""
        unpacked: list[Message] = []
        try:
            details = status_pb2.Status.FromString(status).details
        except DecodeError:
            return cls()
        for packed in details:
            known = next((t for t in _DETAIL_TYPES if packed.Is(t.DESCRIPTOR)), None)
            if known is not None:
                message = known()
                with contextlib.suppress(DecodeError):
                    packed.Unpack(message)
                    unpacked.append(message)

        def first(message_type: type[_Detail]) -> _Detail | None:
            return next((m for m in unpacked if isinstance(m, message_type)), None)

        return cls(
            error_info=first(ErrorInfo),
            retry_info=first(RetryInfo),
            bad_request=first(BadRequest),
            quota_failure=first(QuotaFailure),
            attempt_history=first(pb.AttemptHistory),
        )

    def messages(self) -> list[Message]:
        """The details present, in the order of the fields."""
        found = (self.error_info, self.retry_info, self.bad_request, self.quota_failure, self.attempt_history)
        return [message for message in found if message is not None]

    @property
    def reason(self) -> str | None:
        """ErrorInfo's reason (an llmrelay.v1.ErrorReason name without the prefix, e.g. "UPSTREAM_RATE_LIMITED"), when
        the ErrorInfo is the gateway's (its domain DOMAIN), as the Go and TypeScript SDKs read it."""
        info = self.error_info
        return info.reason if info is not None and info.domain == DOMAIN else None

    @property
    def metadata(self) -> dict[str, str]:
        """ErrorInfo's metadata (the keys each reason sets are listed in the contract beside the reason)."""
        return dict(self.error_info.metadata) if self.error_info is not None else {}

    @property
    def retry_delay_s(self) -> float | None:
        """RetryInfo's delay in seconds: when a retry may succeed."""
        if self.retry_info is None:
            return None
        return float(self.retry_info.retry_delay.ToNanoseconds()) / 1e9

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        """BadRequest's violations, in order."""
        if self.bad_request is None:
            return ()
        return tuple(FieldViolation(v.field, v.description) for v in self.bad_request.field_violations)

    @property
    def quota_violations(self) -> tuple[QuotaViolation, ...]:
        """QuotaFailure's violations, in order."""
        if self.quota_failure is None:
            return ()
        return tuple(QuotaViolation(v.subject, v.description) for v in self.quota_failure.violations)

    @property
    def attempts(self) -> tuple[pb.Attempt, ...]:
        """The attempts of a routed call that failed (AttemptHistory), oldest first."""
        return tuple(self.attempt_history.attempts) if self.attempt_history is not None else ()


_DETAIL_TYPES: Final = (ErrorInfo, RetryInfo, BadRequest, QuotaFailure, pb.AttemptHistory)


def error_details(error: grpc.RpcError) -> ErrorDetails | None:
    """The decoded details of a failed call (blocking or asyncio), or None when its status carries none."""
    raw = _trailer(error, STATUS_DETAILS_KEY)
    return ErrorDetails.decode(raw) if isinstance(raw, bytes) else None


def _trailer(error: grpc.RpcError, key: str) -> str | bytes | None:
    # grpc.RpcError declares no accessors: the blocking errors are also grpc.Call, and grpc.aio.AioRpcError has the
    # same trailing_metadata().
    trailers = cast(grpc.Call, error).trailing_metadata() or ()
    return next((value for name, value in trailers if name == key), None)


class LLMRelayError(Exception):
    """A failed call: its gRPC `code` and `message`, and its google.rpc `details` with typed shortcuts (`reason`,
    `metadata`, `retry_delay_s`, `field_violations`, `quota_violations`, `attempts`); `request_id`, the call's id in
    the gateway's log (None when no gateway answered, or the SDK itself refused the call)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, details: ErrorDetails | None = None, request_id: str | None = None
    ) -> None:
        self.details = details or ErrorDetails()
        # "CODE (REASON): message", as the Go and TypeScript SDKs write it: the reason is what says what to do (one
        # RESOURCE_EXHAUSTED is an upstream's rate limit, another the key's daily budget).
        reason = self.details.reason
        super().__init__(f"{code.name} ({reason}): {message}" if reason else f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.answer: Answer | None = None
        """Set when the error ended a run_tools: the run so far (the tools that ran and their results, the usage and
        attempts of the calls before), as StepLimitError's, so that it can go on without running them again."""

    def __reduce__(
        self,
    ) -> tuple[type[LLMRelayError], tuple[grpc.StatusCode, str, ErrorDetails, str | None], dict[str, Answer | None]]:
        # Exception's own would call the class with the formatted text alone, which it does not take: an error could
        # not come back from a process pool or any other pickling. The answer, which __init__ does not take, comes
        # back as state: without it, a run_tools in a process pool would have to run its tools again.
        return type(self), (self.code, self.message, self.details, self.request_id), {"answer": self.answer}

    @property
    def reason(self) -> str | None:
        return self.details.reason

    @property
    def metadata(self) -> dict[str, str]:
        return self.details.metadata

    @property
    def retry_delay_s(self) -> float | None:
        return self.details.retry_delay_s

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        return self.details.field_violations

    @property
    def quota_violations(self) -> tuple[QuotaViolation, ...]:
        return self.details.quota_violations

    @property
    def attempts(self) -> tuple[pb.Attempt, ...]:
        return self.details.attempts


class InvalidArgumentError(LLMRelayError): ...


class NotFoundError(LLMRelayError): ...


class ResourceExhaustedError(LLMRelayError): ...


class UnauthenticatedError(LLMRelayError): ...


class PermissionDeniedError(LLMRelayError): ...


class FailedPreconditionError(LLMRelayError): ...


class UnavailableError(LLMRelayError): ...


class DeadlineExceededError(LLMRelayError): ...


class AbortedError(LLMRelayError): ...


_BY_CODE: Final[Mapping[grpc.StatusCode, type[LLMRelayError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def error_from_rpc(error: grpc.RpcError) -> LLMRelayError:
    """The SDK's error for a failed call, of the class for its code, with its details decoded."""
    call = cast(grpc.Call, error)
    code = call.code()
    request_id = _trailer(error, REQUEST_ID_KEY)
    return _BY_CODE.get(code, LLMRelayError)(
        code, call.details() or "", error_details(error), request_id if isinstance(request_id, str) else None
    )
