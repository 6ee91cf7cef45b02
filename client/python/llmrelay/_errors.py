"""The SDK's errors: one class per gRPC status the gateway uses, with the google.rpc details decoded.

LLMRelayError
├── InvalidArgumentError       the request is wrong; field_violations say where
├── NotFoundError              no backend serves the model
├── ResourceExhaustedError     rate limited (retry_delay) or the request is too large
├── FailedPreconditionError    the gateway's own configuration needs an operator
├── UnavailableError           every backend is down; retry after retry_delay
├── DeadlineExceededError      the deadline ran out
├── AbortedError               a stream broke after it started; retry the whole call
├── UnauthenticatedError       no caller key, or one the gateway does not know
└── PermissionDeniedError      the caller's key may not use the model
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

import grpc
from google.rpc import status_pb2
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo, RetryInfo

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class LLMRelayError(Exception):
    """A failed call. `reason` is the ErrorInfo reason (e.g. "UPSTREAM_RATE_LIMITED"), `metadata` its metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_delay_s = retry_delay_s
        self.field_violations = field_violations


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
    """The SDK's error for a failed call, with ErrorInfo, RetryInfo and BadRequest read from the status details."""
    # grpc.RpcError declares no accessors: the blocking errors are also grpc.Call, and grpc.aio.AioRpcError has the
    # same code(), details() and trailing_metadata().
    call = cast(grpc.Call, error)
    code = call.code()
    message = call.details() or ""
    raw = next((value for key, value in call.trailing_metadata() or () if key == STATUS_DETAILS_KEY), None)
    reason, metadata, retry_delay_s = None, {}, None
    violations: tuple[FieldViolation, ...] = ()
    if isinstance(raw, bytes):
        for detail in status_pb2.Status.FromString(raw).details:
            # Unpack fills the message and returns True only when the detail is of that type.
            info, retry, bad = ErrorInfo(), RetryInfo(), BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(retry):
                retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Unpack(bad):
                violations = tuple(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = _BY_CODE.get(code, LLMRelayError)
    return cls(
        code, message, reason=reason, metadata=metadata, retry_delay_s=retry_delay_s, field_violations=violations
    )
