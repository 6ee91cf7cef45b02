"""status.rpc_failure: every domain error's gRPC code and google.rpc details, decoded from the bytes that are sent."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from llmrelay import ErrorDetails
from llmrelay import v1 as pb
from llmrelay_server import status
from llmrelay_server.domain import (
    AllBackendsFailedError,
    AnswerTooLargeError,
    Attempt,
    AttemptOutcome,
    DeadlineExceededError,
    FieldViolation,
    InvalidRequestError,
    LimitExceededError,
    LimitKind,
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
)

K = UpstreamErrorKind
OUT = AttemptOutcome
C = grpc.StatusCode


@dataclass
class Decoded:
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    retry_delay_s: float | None
    bad_request: error_details_pb2.BadRequest | None
    quota_failure: error_details_pb2.QuotaFailure | None = None
    attempt_history: pb.AttemptHistory | None = None
    pushback_ms: str | None = None


def decode(failure: grpc.Status) -> Decoded:
    """Reads the details as a client would, through the SDK's decoder: from the grpc-status-details-bin bytes, and
    the pushback trailer. Checks the contract's order too: ErrorInfo first, AttemptHistory last, one of each."""
    (key, details), *rest = failure.trailing_metadata
    assert key == "grpc-status-details-bin"
    pushback = dict(rest).pop("grpc-retry-pushback-ms", None)
    assert len(rest) == (pushback is not None), f"unexpected trailers {rest}"
    assert pushback is None or isinstance(pushback, str)
    message = status_pb2.Status.FromString(details)
    types = [packed.type_url.rsplit("/", 1)[-1] for packed in message.details]
    assert isinstance(details, bytes)
    decoded = ErrorDetails.decode(details)
    known = sorted(m.DESCRIPTOR.full_name for m in decoded.messages())
    assert sorted(types) == known, f"unexpected or repeated details {types}"
    assert types[0] == "google.rpc.ErrorInfo", "ErrorInfo comes first"
    assert decoded.attempt_history is None or types[-1] == "llmrelay.v1.AttemptHistory", "AttemptHistory comes last"
    assert decoded.error_info is not None
    # The pushback goes with RetryInfo; an UNAVAILABLE without one gets -1, so that no channel retries it.
    if failure.code is grpc.StatusCode.UNAVAILABLE and decoded.retry_delay_s is None:
        assert pushback == "-1"
    else:
        assert (pushback is None) == (decoded.retry_delay_s is None), (pushback, decoded.retry_delay_s)
    # The typed attempts and the metadata string say the same, and come together.
    assert (decoded.attempt_history is None) == ("attempts" not in decoded.metadata)
    if decoded.attempt_history is not None:
        outcomes = {value: name for name, value in pb.AttemptOutcome.items()}
        listed = [
            f"{a.backend}:{outcomes[a.outcome].removeprefix('ATTEMPT_OUTCOME_').lower()}" for a in decoded.attempts
        ]
        assert ",".join(listed) == decoded.metadata["attempts"]
    return Decoded(
        message,
        decoded.error_info,
        decoded.retry_delay_s,
        decoded.bad_request,
        decoded.quota_failure,
        decoded.attempt_history,
        pushback,
    )


def failure_of(error: LLMRelayError) -> tuple[grpc.Status, Decoded]:
    failure = status.rpc_failure(error)
    decoded = decode(failure)
    assert decoded.status.code == failure.code.value[0]
    assert decoded.status.message == failure.details == str(error)
    assert decoded.info.domain == "llmrelay.dev"
    return failure, decoded


def upstream(
    kind: UpstreamErrorKind, backend: str = "openai", *, status: int | None = None, retry_after_s: float | None = None
) -> UpstreamError:
    return UpstreamError(kind, backend, f"{kind.value} happened", status=status, retry_after_s=retry_after_s)


def exhausted(
    attempts: list[Attempt],
    last: UpstreamError | None,
    *causes: UpstreamErrorKind,
    retry_after_s: float | None = None,
) -> AllBackendsFailedError:
    """As the router ends a call no backend served; `causes`, as it counts them: by default, the last failure's."""
    counted = frozenset(causes) if causes or last is None else frozenset({last.kind})
    error = AllBackendsFailedError("every backend failed", attempts, retry_after_s=retry_after_s, causes=counted)
    error.__cause__ = last
    return error


def attempt(backend: str, outcome: AttemptOutcome, status_code: int | None = None) -> Attempt:
    return Attempt(backend, "m", outcome, 0.1, upstream_status=status_code)


# --- one case per row of the module's table, and more --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "reason", "metadata", "retry_delay_s"),
    [
        # no backend serves the model
        (
            ModelNotFoundError("claude-9", ["openai/gpt-4o", "ollama/gpt-oss:20b", "fast"]),
            C.NOT_FOUND,
            "MODEL_NOT_FOUND",
            {"model": "claude-9", "served": "openai/gpt-4o,ollama/gpt-oss:20b,fast"},
            None,
        ),
        (ModelNotFoundError("x", []), C.NOT_FOUND, "MODEL_NOT_FOUND", {"model": "x", "served": ""}, None),
        # tokenizer encoding not installed
        (
            TokenizerUnavailableError("o200k_base", "file missing"),
            C.FAILED_PRECONDITION,
            "TOKENIZER_UNAVAILABLE",
            {"encoding": "o200k_base"},
            None,
        ),
        # the answer is over the message limit
        (
            AnswerTooLargeError(5_000_000, 4_194_304),
            C.RESOURCE_EXHAUSTED,
            "ANSWER_TOO_LARGE",
            {"size": "5000000", "limit": "4194304"},
            None,
        ),
        # upstream rejected the request (400): straight from the router, not wrapped
        (
            upstream(K.REJECTED, status=400),
            C.INVALID_ARGUMENT,
            "UPSTREAM_REJECTED",
            {"backend": "openai", "upstream_status": "400"},
            None,
        ),
        # single upstream errors of every other kind
        (
            upstream(K.CONTEXT_LENGTH_EXCEEDED, status=400),
            C.INVALID_ARGUMENT,
            "CONTEXT_LENGTH_EXCEEDED",
            {"backend": "openai", "upstream_status": "400"},
            None,
        ),
        (upstream(K.MODEL_NOT_FOUND, status=404), C.NOT_FOUND, "MODEL_NOT_FOUND",
         {"backend": "openai", "upstream_status": "404"}, None),
        (upstream(K.AUTH_FAILED, status=401), C.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED",
         {"backend": "openai", "upstream_status": "401"}, None),
        (upstream(K.RATE_LIMITED, status=429, retry_after_s=2.5), C.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED",
         {"backend": "openai", "upstream_status": "429"}, 2.5),
        (upstream(K.RATE_LIMITED, status=429), C.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED",
         {"backend": "openai", "upstream_status": "429"}, 1.0),
        (upstream(K.UNREACHABLE, "ollama"), C.UNAVAILABLE, "BACKENDS_UNAVAILABLE", {"backend": "ollama"}, 1.0),
        (upstream(K.TIMEOUT), C.UNAVAILABLE, "BACKENDS_UNAVAILABLE", {"backend": "openai"}, 1.0),
        (upstream(K.SERVER_ERROR, status=503, retry_after_s=7.0), C.UNAVAILABLE, "BACKENDS_UNAVAILABLE",
         {"backend": "openai", "upstream_status": "503"}, 7.0),
        (upstream(K.BAD_RESPONSE), C.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", {"backend": "openai"}, None),
        # a stream failed after it started: ABORTED whatever the cause, and no RetryInfo
        (
            StreamInterruptedError(upstream(K.TIMEOUT, "ollama"), [attempt("ollama", OUT.INTERRUPTED)]),
            C.ABORTED,
            "STREAM_INTERRUPTED",
            {"backend": "ollama", "attempts": "ollama:interrupted"},
            None,
        ),
        (
            StreamInterruptedError(upstream(K.RATE_LIMITED, status=429, retry_after_s=3.0)),
            C.ABORTED,
            "STREAM_INTERRUPTED",
            {"backend": "openai", "upstream_status": "429", "attempts": ""},
            None,
        ),
        # the caller's deadline ran out
        (
            DeadlineExceededError("late", [attempt("openai", OUT.TIMEOUT), attempt("ollama", OUT.SKIPPED)]),
            C.DEADLINE_EXCEEDED,
            "DEADLINE_EXCEEDED",
            {"attempts": "openai:timeout,ollama:skipped"},
            None,
        ),
        (DeadlineExceededError("late", []), C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", {"attempts": ""}, None),
        # before any backend was asked (a count of megabytes): no attempts to tell
        (DeadlineExceededError("late", [], routed=False), C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", {}, None),
        # every backend down or broken, for different reasons
        (
            exhausted(
                [attempt("openai", OUT.SERVER_ERROR, 500), attempt("ollama", OUT.UNREACHABLE)],
                upstream(K.UNREACHABLE, "ollama"),
                K.SERVER_ERROR,
                K.UNREACHABLE,
            ),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "openai:server_error,ollama:unreachable"},
            1.0,
        ),
        (
            exhausted([attempt("openai", OUT.RATE_LIMITED, 429), attempt("ollama", OUT.TIMEOUT)],
                      upstream(K.TIMEOUT, "ollama"), K.RATE_LIMITED, K.TIMEOUT),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "openai:rate_limited,ollama:timeout"},
            1.0,
        ),
        # every circuit open: nothing was tried, nothing caused it
        (
            exhausted([attempt("openai", OUT.SKIPPED), attempt("ollama", OUT.SKIPPED)], None),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "openai:skipped,ollama:skipped"},
            1.0,
        ),
        # one cause everywhere is named as such
        (
            exhausted(
                [attempt("openai", OUT.RATE_LIMITED, 429), attempt("ollama", OUT.RATE_LIMITED, 429)],
                upstream(K.RATE_LIMITED, "ollama", status=429, retry_after_s=9.0),
                retry_after_s=4.0,  # the soonest of the two, not the last one's
            ),
            C.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            {"attempts": "openai:rate_limited,ollama:rate_limited", "backend": "ollama", "upstream_status": "429"},
            4.0,
        ),
        (
            exhausted([attempt("openai", OUT.AUTH_FAILED, 401)], upstream(K.AUTH_FAILED, status=401)),
            C.FAILED_PRECONDITION,
            "UPSTREAM_AUTH_FAILED",
            {"attempts": "openai:auth_failed", "backend": "openai", "upstream_status": "401"},
            None,
        ),
        (
            exhausted(
                [
                    attempt("openai", OUT.CONTEXT_LENGTH_EXCEEDED, 400),
                    attempt("ollama", OUT.CONTEXT_LENGTH_EXCEEDED, 400),
                ],
                upstream(K.CONTEXT_LENGTH_EXCEEDED, "ollama", status=400),
            ),
            C.INVALID_ARGUMENT,
            "CONTEXT_LENGTH_EXCEEDED",
            {"attempts": "openai:context_length_exceeded,ollama:context_length_exceeded", "backend": "ollama",
             "upstream_status": "400"},
            None,
        ),
        (
            exhausted([attempt("openai", OUT.MODEL_NOT_FOUND, 404)], upstream(K.MODEL_NOT_FOUND, status=404)),
            C.NOT_FOUND,
            "MODEL_NOT_FOUND",
            {"attempts": "openai:model_not_found", "backend": "openai", "upstream_status": "404"},
            None,
        ),
        (
            exhausted(
                [attempt("openai", OUT.SERVER_ERROR), attempt("ollama", OUT.SERVER_ERROR)],
                upstream(K.BAD_RESPONSE, "ollama"),
            ),
            C.UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            {"attempts": "openai:server_error,ollama:server_error", "backend": "ollama"},
            None,
        ),
        (
            exhausted([attempt("ollama", OUT.UNREACHABLE)] * 3, upstream(K.UNREACHABLE, "ollama")),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "ollama:unreachable,ollama:unreachable,ollama:unreachable", "backend": "ollama"},
            1.0,
        ),
        # a backend skipped for its open circuit is a cause of its own: it may serve what another refused
        (
            exhausted(
                [attempt("openai", OUT.SKIPPED), attempt("ollama", OUT.CONTEXT_LENGTH_EXCEEDED, 400)],
                upstream(K.CONTEXT_LENGTH_EXCEEDED, "ollama", status=400),
                K.UNREACHABLE,
                K.CONTEXT_LENGTH_EXCEEDED,
                retry_after_s=12.5,
            ),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "openai:skipped,ollama:context_length_exceeded"},
            12.5,
        ),
        # a bad answer and a server's error are two causes, though their attempts' outcomes are alike
        (
            exhausted(
                [attempt("openai", OUT.SERVER_ERROR, 500), attempt("ollama", OUT.SERVER_ERROR)],
                upstream(K.BAD_RESPONSE, "ollama"),
                K.SERVER_ERROR,
                K.BAD_RESPONSE,
            ),
            C.UNAVAILABLE,
            "BACKENDS_UNAVAILABLE",
            {"attempts": "openai:server_error,ollama:server_error"},
            1.0,
        ),
        # anything else is an internal error
        (LLMRelayError("surprise"), C.INTERNAL, "UNSPECIFIED", {}, None),
    ],
)  # fmt: skip
def test_rpc_failure(
    error: LLMRelayError, code: grpc.StatusCode, reason: str, metadata: dict[str, str], retry_delay_s: float | None
) -> None:
    failure, decoded = failure_of(error)

    assert failure.code is code
    assert decoded.info.reason == reason
    assert dict(decoded.info.metadata) == metadata
    assert decoded.retry_delay_s == (pytest.approx(retry_delay_s) if retry_delay_s is not None else None)
    assert decoded.bad_request is None


def test_an_invalid_request_lists_every_field_violation() -> None:
    error = InvalidRequestError(
        [
            FieldViolation("messages[0].content", "must not be empty"),
            FieldViolation("options.temperature", "must be between 0 and 2"),
        ]
    )

    failure, decoded = failure_of(error)

    assert failure.code is C.INVALID_ARGUMENT
    assert decoded.info.reason == "INVALID_REQUEST"
    assert dict(decoded.info.metadata) == {}
    assert decoded.retry_delay_s is None
    assert decoded.bad_request is not None
    assert [(v.field, v.description) for v in decoded.bad_request.field_violations] == [
        ("messages[0].content", "must not be empty"),
        ("options.temperature", "must be between 0 and 2"),
    ]
    assert failure.details == "messages[0].content: must not be empty; options.temperature: must be between 0 and 2"


def test_a_request_with_many_violations_reports_the_first_and_counts_the_rest() -> None:
    error = InvalidRequestError([FieldViolation(f"messages[{i}].role", "must be ROLE_USER") for i in range(300)])

    failure, decoded = failure_of(error)

    assert decoded.bad_request is not None
    reported = [v.field for v in decoded.bad_request.field_violations]
    assert reported == [f"messages[{i}].role" for i in range(InvalidRequestError.MAX_REPORTED)]
    assert failure.details.endswith(f"messages[19].role: must be ROLE_USER; ... and {300 - len(reported)} more")
    assert dict(decoded.info.metadata) == {}


@pytest.mark.parametrize("count", [1, 3, 300])
@pytest.mark.parametrize(
    ("char", "limit"), [("a", 4096), ("é", 8192), ("\U0001f600", 8192)], ids=["ascii", "2-byte", "4-byte"]
)
def test_long_violations_are_cut_and_the_trailers_stay_below_grpcs_limit(count: int, char: str, limit: int) -> None:
    # gRPC refuses trailers over 8 KiB some of the time, and every time over 16 KiB.
    violations = [FieldViolation(f"tools[{i}]." + char * 1000, char * 5000) for i in range(count)]

    failure, decoded = failure_of(InvalidRequestError(violations))

    assert decoded.bad_request is not None
    first = decoded.bad_request.field_violations[0]
    assert len(first.field) == len(first.description) == InvalidRequestError.MAX_CHARS
    assert first.description.endswith(f"{char}...")
    # On the wire: grpc-message percent-encodes every byte outside printable ASCII, and -bin trailers are base64.
    message = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in failure.details.encode())
    (_, details_bin), *_ = failure.trailing_metadata
    assert isinstance(details_bin, bytes)
    assert message + len(base64.b64encode(details_bin)) < limit
    assert failure.details.endswith("more") is (count > len(decoded.bad_request.field_violations))


@pytest.mark.parametrize("char", ["a", "é", "\U0001f600"], ids=["ascii", "2-byte", "4-byte"])
def test_a_call_failed_everywhere_at_length_keeps_its_status_below_grpcs_limit(char: str) -> None:
    # Six backends tried three times each, every upstream's message long and each different (as OpenAI's are: they
    # name a request id), as the router's text and its attempts: over 20 KiB of trailers, left alone.
    attempts = [
        Attempt(f"b{i // 3}", "m", OUT.SERVER_ERROR, 0.1, upstream_status=503, error=f"#{i:02d} " + char * 500)
        for i in range(18)
    ]
    text = "every backend failed: " + "; ".join(f"{a.backend}/m: {a.error}" for a in attempts)
    error = AllBackendsFailedError(text, attempts)
    error.__cause__ = upstream(K.SERVER_ERROR, "b5", status=503)

    failure = status.rpc_failure(error)

    decoded = decode(failure)
    # On the wire: grpc-message percent-encodes every byte outside printable ASCII, and -bin trailers are base64;
    # gRPC counts 32 bytes more for each entry, and refuses trailers over 8 KiB some of the time.
    message = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in failure.details.encode())
    on_the_wire = len("grpc-message") + 32 + message
    for key, value in failure.trailing_metadata:
        on_the_wire += len(key) + 32 + (len(base64.b64encode(value)) if isinstance(value, bytes) else len(value))
    assert on_the_wire < 8192
    assert decoded.status.message == failure.details
    kept, _, note = failure.details.rpartition("... (")
    assert text.startswith(kept) and kept.startswith(f"every backend failed: b0/m: #00 {char}")
    assert note == f"{len(text) - len(kept)} more characters)"
    assert (decoded.info.reason, decoded.retry_delay_s) == ("BACKENDS_UNAVAILABLE", 1.0)
    assert decoded.attempt_history is not None
    history = decoded.attempt_history.attempts
    # The texts give way first, cut short, the oldest left out; then, where the message's text takes the room (in
    # percent-encoded UTF-8 of two or four bytes a character), the oldest attempts. The newest always stay.
    listed = [(a.backend, a.outcome, a.upstream_status) for a in history]
    every = [(a.backend, pb.ATTEMPT_OUTCOME_SERVER_ERROR, 503) for a in attempts]
    assert listed == every[len(every) - len(listed) :]
    assert len(listed) == 18 if char == "a" else len(listed) >= 6
    assert history[0].error == ""
    if char == "a":  # room for the newest texts, as many as fit
        assert history[-1].error == f"#17 {char * (status.MAX_ATTEMPT_ERROR_CHARS - 7)}..."
    with_text = [bool(a.error) for a in history]
    assert with_text == sorted(with_text), "the newest texts are those kept"


@pytest.mark.parametrize("count", [48, 72, 300])
def test_a_call_failed_on_dozens_of_backends_keeps_the_newest_attempts_within_grpcs_limit(count: int) -> None:
    attempts = [
        Attempt(f"backend-number-{i // 3:03d}", "some-model-name", OUT.SERVER_ERROR, 0.1, upstream_status=503)
        for i in range(count)
    ]

    failure = status.rpc_failure(exhausted(attempts, upstream(K.SERVER_ERROR, "b", status=503)))

    decoded = decode(failure)  # checks too that the metadata and the history name the same attempts
    on_the_wire = len("grpc-message") + 32 + len(failure.details)
    for key, value in failure.trailing_metadata:
        on_the_wire += len(key) + 32 + (len(base64.b64encode(value)) if isinstance(value, bytes) else len(value))
    assert on_the_wire < 8192
    assert decoded.attempt_history is not None
    kept = [a.backend for a in decoded.attempt_history.attempts]
    assert kept and kept == [a.backend for a in attempts][count - len(kept) :], "the newest"
    assert decoded.info.metadata["attempts"] == ",".join(f"{b}:server_error" for b in kept)


def test_retry_delays_keep_their_fraction() -> None:
    details = decode(status.rpc_failure(upstream(K.RATE_LIMITED, retry_after_s=1.25))).status
    retry = error_details_pb2.RetryInfo()
    assert details.details[1].Unpack(retry)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 250_000_000)


def test_a_rate_limit_of_zero_seconds_is_sent_as_zero() -> None:
    _, decoded = failure_of(upstream(K.RATE_LIMITED, retry_after_s=0.0))
    assert decoded.retry_delay_s == 0.0
    assert decoded.pushback_ms == "0"


@pytest.mark.parametrize(
    ("error", "pushback_ms"),
    [
        (upstream(K.SERVER_ERROR, status=503, retry_after_s=1.0), "1000"),
        (upstream(K.RATE_LIMITED, retry_after_s=1.25), "1250"),
        (LimitExceededError(LimitKind.REQUESTS_PER_MINUTE, "gateway", "over", 0.0004), "1"),  # rounded up, not to 0
        (ShuttingDownError(), "1000"),
        (exhausted([attempt("a", OUT.TIMEOUT), attempt("b", OUT.UNREACHABLE)], upstream(K.UNREACHABLE)), "1000"),
    ],
)
def test_retry_info_goes_with_the_same_delay_as_pushback_in_whole_milliseconds(
    error: LLMRelayError, pushback_ms: str
) -> None:
    _, decoded = failure_of(error)
    assert decoded.pushback_ms == pushback_ms


@pytest.mark.parametrize(
    ("time_remaining_s", "pushback_ms"), [(None, "30000"), (31.0, "30000"), (30.0, "-1"), (5.0, "-1")]
)
def test_a_delay_that_outlasts_the_callers_deadline_asks_the_channel_not_to_retry(
    time_remaining_s: float | None, pushback_ms: str
) -> None:
    failure = status.rpc_failure(upstream(K.RATE_LIMITED, retry_after_s=30.0), time_remaining_s)
    decoded = decode(failure)
    assert decoded.pushback_ms == pushback_ms
    assert decoded.retry_delay_s == 30.0  # the caller still learns when to come back


def test_the_attempt_history_holds_each_attempt_as_the_response_would() -> None:
    attempts = [
        Attempt("openai", "gpt-4o", OUT.SERVER_ERROR, 0.25, upstream_status=503, error="HTTP 503"),
        Attempt("ollama", "tiny", OUT.SKIPPED, 0.0),
    ]
    _, decoded = failure_of(exhausted(attempts, upstream(K.SERVER_ERROR, "openai", status=503)))

    assert decoded.attempt_history is not None
    first, second = decoded.attempt_history.attempts
    assert (first.backend, first.model, first.outcome, first.upstream_status, first.error) == (
        "openai",
        "gpt-4o",
        pb.ATTEMPT_OUTCOME_SERVER_ERROR,
        503,
        "HTTP 503",
    )
    assert first.duration.ToMilliseconds() == 250
    assert (second.backend, second.outcome, second.HasField("upstream_status")) == (
        "ollama",
        pb.ATTEMPT_OUTCOME_SKIPPED,
        False,
    )


def test_a_rejection_that_ends_a_call_lists_its_attempts() -> None:
    rejected = upstream(K.REJECTED, "ollama", status=400)
    rejected.attempts = (attempt("openai", OUT.TIMEOUT), attempt("ollama", OUT.REJECTED, 400))

    failure, decoded = failure_of(rejected)

    assert (failure.code, decoded.info.reason) == (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED")
    assert decoded.info.metadata["attempts"] == "openai:timeout,ollama:rejected"
    assert decoded.attempt_history is not None and len(decoded.attempt_history.attempts) == 2


@pytest.mark.parametrize(
    "error",
    [ModelNotFoundError("m", []), ShuttingDownError(), UnauthenticatedError("no key"), upstream(K.REJECTED)],
    ids=lambda e: type(e).__name__,
)
def test_a_call_that_never_reached_the_router_has_no_attempt_history(error: LLMRelayError) -> None:
    _, decoded = failure_of(error)
    assert decoded.attempt_history is None


def test_the_status_message_is_the_errors_text() -> None:
    error = ModelNotFoundError("claude-9", ["ollama/gpt-oss:20b"])
    failure = status.rpc_failure(error)
    assert failure.details == "no backend serves model 'claude-9'; served: ollama/gpt-oss:20b"


REASONS_BY_ERROR = [
    InvalidRequestError([FieldViolation("f", "d")]),
    ModelNotFoundError("m", []),
    TokenizerUnavailableError("e", "d"),
    AnswerTooLargeError(2, 1),
    RequestTooLargeError(2, 1),
    StreamInterruptedError(upstream(K.TIMEOUT, "b")),
    DeadlineExceededError("late", []),
    exhausted([attempt("a", OUT.TIMEOUT), attempt("b", OUT.UNREACHABLE)], upstream(K.UNREACHABLE)),
    *[upstream(kind) for kind in UpstreamErrorKind],
    ShuttingDownError(),
    UnauthenticatedError("no key"),
    ModelNotAllowedError("research", "gpt-4o"),
    UsageNotAllowedError("research", "other"),
    *[LimitExceededError(kind, "key:research", "over", 3.0) for kind in LimitKind],
    LimitsUnavailableError(1.0),
    UsageUnavailableError(5.0),
]


@pytest.mark.parametrize("kind", list(LimitKind))
def test_a_limit_is_resource_exhausted_naming_whose_limit_and_when(kind: LimitKind) -> None:
    failure, decoded = failure_of(LimitExceededError(kind, "gateway", "6 requests per minute", 12.5))
    assert failure.code is C.RESOURCE_EXHAUSTED
    assert (decoded.info.reason, dict(decoded.info.metadata)) == (kind.value, {"subject": "gateway"})
    assert decoded.retry_delay_s == 12.5
    assert decoded.quota_failure is not None
    assert [(v.subject, v.description) for v in decoded.quota_failure.violations] == [
        ("gateway", "6 requests per minute")
    ]


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (UnauthenticatedError("no key"), C.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (ModelNotAllowedError("research", "gpt-4o"), C.PERMISSION_DENIED, "MODEL_NOT_ALLOWED"),
        (UsageNotAllowedError("research", "other"), C.PERMISSION_DENIED, "USAGE_NOT_ALLOWED"),
    ],
)
def test_who_may_call_what(error: LLMRelayError, code: grpc.StatusCode, reason: str) -> None:
    failure, decoded = failure_of(error)
    assert (failure.code, decoded.info.reason) == (code, reason)


@pytest.mark.parametrize("error", REASONS_BY_ERROR, ids=lambda e: type(e).__name__)
def test_every_reason_is_one_the_contract_names(error: LLMRelayError) -> None:
    _, decoded = failure_of(error)
    assert f"ERROR_REASON_{decoded.info.reason}" in pb.ErrorReason.keys()  # noqa: SIM118 (an EnumTypeWrapper)


def test_every_contract_reason_is_produced() -> None:
    produced = {decode(status.rpc_failure(e)).info.reason for e in REASONS_BY_ERROR}
    named = {name.removeprefix("ERROR_REASON_") for name in pb.ErrorReason.keys()} - {"UNSPECIFIED"}  # noqa: SIM118
    assert named <= produced


@pytest.mark.parametrize(
    ("error", "reason"),
    [(LimitsUnavailableError(1.5), "LIMITS_UNAVAILABLE"), (UsageUnavailableError(1.5), "USAGE_UNAVAILABLE")],
)
def test_a_store_out_of_reach_is_unavailable_with_retry_info(error: LLMRelayError, reason: str) -> None:
    failure, decoded = failure_of(error)
    assert (failure.code, decoded.info.reason, dict(decoded.info.metadata)) == (C.UNAVAILABLE, reason, {})
    assert decoded.retry_delay_s == 1.5


def test_shutting_down_is_unavailable_with_retry_info() -> None:
    failure, decoded = failure_of(ShuttingDownError())
    assert failure.code is C.UNAVAILABLE
    assert decoded.info.reason == "SHUTTING_DOWN"
    assert dict(decoded.info.metadata) == {}
    assert decoded.retry_delay_s == 1.0
    assert decoded.bad_request is None
