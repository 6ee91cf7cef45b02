"""One structured log line per call, from an observer of every call (`observing`).

The line (logger `llmrelay_server.calls`, INFO) says who called what and what the router did, read from the call's
meter (`metering`) when the call ends: the request id, the caller, the RPC, the model asked and the one that
answered, the backend, every attempt as `backend:outcome`, the status, the tokens billed, the cost, and the call's
time, its time to the first chunk and the gateway's own share of it (the call's time less its attempts' and the
router's waits between them).

The request id is the caller's `x-request-id` when it sends a sane one (1-128 characters of letters, digits and
`._:@/+=-`), else a new one; it goes back to the caller in the response's trailing metadata, failed calls included
(status.abort keeps it). Trailers cost nothing more: initial metadata of its own would be one more write per call.

Never a key, and no prompt or answer: with `server.log_content` set, the last user message is added (`prompt`).
How the lines are written (text or JSON, batched) is `logs`'s business.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import time
from typing import Any

import grpc
from google.protobuf.message import Message
from llmrelay import v1 as pb

from llmrelay_server.auth import caller_identity
from llmrelay_server.decoding import invocation_metadata
from llmrelay_server.domain import LLMRelayError
from llmrelay_server.logs import call_lines_writer
from llmrelay_server.metering import Meter, open_meter, own_time_s, served_by
from llmrelay_server.observing import Context, Kind, Observer, Start
from llmrelay_server.status import REQUEST_ID_KEY

log = logging.getLogger("llmrelay_server.calls")

_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_PLAIN = re.compile(r"[A-Za-z0-9._:@/+=-]*")
MAX_FIELD_CHARS = 128
"""Caller-given strings in the line (a model name) are cut to this."""
MAX_CONTENT_CHARS = 2000
_ROLE_USER = pb.ROLE_USER
_ASKING_A_MODEL = (pb.CompleteRequest, pb.StreamCompleteRequest, pb.CountTokensRequest, pb.EmbedRequest)
"""The requests whose `model` names the model to answer them, "default" when unset."""


def request_id(metadata: Any) -> str:
    """The caller's x-request-id when it is sane, else a new one."""
    for name, value in metadata or ():
        if name == REQUEST_ID_KEY:
            if isinstance(value, str) and _SANE_ID.fullmatch(value):
                return value
            break
    # Unique, not secret: random's generator (seeded from os.urandom in each process, and again after a fork) rather
    # than a system call per call.
    return f"{random.getrandbits(128):032x}"


class CallLogObserver(Observer):
    """Gives every call a request id (returned in the trailing metadata) and logs one line when it ends."""

    def __init__(self, log_content: bool = False) -> None:
        self._log_content = log_content
        self._writer = call_lines_writer()

    def observe(self, method: str, kind: Kind) -> Start:
        # A partial rather than a lambda: a call starts its line with no frame of Python's before the constructor.
        return functools.partial(_LoggedCall, self, method[1:])


class _LoggedCall:
    __slots__ = ("_context", "_meter", "_observer", "_request", "_rid", "_rpc", "_started")

    sent = None  # the line is about the call, not its messages

    def __init__(self, observer: CallLogObserver, rpc: str, request: Any, context: Context) -> None:
        self._started = time.perf_counter()
        self._observer, self._rpc, self._request, self._context = observer, rpc, request, context
        self._rid = rid = request_id(invocation_metadata(context))
        self._meter = meter = open_meter()
        meter.request_id = rid
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        meter, request = self._meter, self._request
        fields = call_fields(self._rid, self._rpc, code, self._started, meter, request, _caller(self._context))
        if meter.trace_id is not None:
            fields["trace_id"] = meter.trace_id
        observer = self._observer  # its line, written here: a call of the observer's own would cost a frame a line
        if observer._log_content and (prompt := _last_user_message(request)) is not None:
            fields["prompt"] = prompt[:MAX_CONTENT_CHARS]
        if observer._writer is not None:
            observer._writer.write_call(log.name, fields, CallLine(fields))
        else:
            log.info("%s", CallLine(fields), extra={"call": fields})


def call_fields(
    rid: str, rpc: str, code: grpc.StatusCode, started: float, meter: Meter, request: Any, caller: str
) -> dict[str, Any]:
    """The line's fields, in the order they are written, of a call that began at `started` (time.perf_counter())."""
    total_s = time.perf_counter() - started
    attempts = [attempt.backend + ":" + attempt.outcome for attempt in meter.attempts]
    prompt_tokens = completion_tokens = 0
    for billed in meter.billed:
        prompt_tokens += billed.usage.prompt_tokens
        completion_tokens += billed.usage.completion_tokens
    served = served_by(meter)
    return {
        "request_id": rid,
        "caller": caller,
        "rpc": rpc,
        "model": _asked_model(request),
        "served_model": served.model[:MAX_FIELD_CHARS] if served is not None else None,
        "backend": served.backend if served is not None else None,
        "attempts": attempts,
        "code": code.name,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": meter.usd_micros / 1_000_000,
        "duration_ms": round(total_s * 1000, 3),
        "first_chunk_ms": (
            round((meter.first_chunk_at - started) * 1000, 3) if meter.first_chunk_at is not None else None
        ),
        "overhead_ms": round(own_time_s(meter, total_s) * 1000, 3),
    }


class CallLine:
    """The call's line for people (key=value), made only when a handler writes it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return "call " + " ".join(f"{name}={_text(value)}" for name, value in self.fields.items())


def _text(value: Any) -> str:
    if isinstance(value, str):
        # Anything a caller wrote (a model name) could break the line: quoted, escaped, unless plainly safe.
        return value if _PLAIN.fullmatch(value) else json.dumps(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        # Whole, to the micro-dollar of a cost and the microsecond of a time (`:g` kept six digits: 12.3457 USD), and
        # never in an exponent (1e-06).
        return f"{value:.6f}".rstrip("0").rstrip(".")
    if isinstance(value, list):
        return ",".join(map(_text, value)) or "-"
    return str(value)


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return caller_identity(context)
    except LLMRelayError:  # a malformed x-llmrelay-caller: the call was refused for it
        return "invalid"


def _asked_model(request: Any) -> str | None:
    # None for a request that did not decode, and for an RPC that asks no model for an answer: Health, the health and
    # reflection services, and GetUsage, whose `model` only filters the ledger.
    if not isinstance(request, _ASKING_A_MODEL):
        return None
    if not request.HasField("model"):
        return "default"
    return request.model[:MAX_FIELD_CHARS]


def _last_user_message(request: Any) -> str | None:
    for message in reversed(getattr(request, "messages", ()) if isinstance(request, Message) else ()):
        if message.role == _ROLE_USER:
            # Of a message in parts, its text (an image's bytes never go to a log).
            return "\n".join(part.text for part in message.parts if part.HasField("text")) or str(message.content)
    return None
