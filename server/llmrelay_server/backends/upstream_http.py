"""What every upstream dialect's provider shares: the HTTP pool, requests sent with their head prepared once, the
failure vocabulary (what a status means, Retry-After, an error answer's message), and `UpstreamProvider`, the base of
the dialects' providers (its spec, pool and SDK client, health records, the failures every dialect names alike, and
the redaction of secrets from upstream messages).

Each provider keeps its SDK (openai, anthropic) for its auth headers, exception types and its own small requests
(listing models), but sends the JSON its wire module built itself: the SDKs' request paths parse and merge the same
URL and headers on every call, a third of the gateway's CPU per request (`make bench`). Completions, whole
(`post_read`) or streamed (`post_stream`), go straight to the backend's `http1.Http1Pool`, which the SDK's HTTP
client sends through too (`http1.Http1Transport`): one pool per backend. aiohttp's client, which the SDKs offer,
cost 3-4x the CPU of that pool a request (`make bench-instructions`: about 360k of the gateway's 1,375k
instructions a unary call).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import datetime
import email.utils
import html
import itertools
import json
import logging
import math
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ClassVar, Final, Generic, NamedTuple, NoReturn, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import httpx2

from llmrelay_server import metering
from llmrelay_server.backends.http1 import Http1Pool, Http1Response, Http1Transport, OutOfFiles
from llmrelay_server.backends.proxies import Proxies
from llmrelay_server.backends.wire import (
    DONE,
    QUOTED_CHARS,
    ErrorAnswer,
    ErrorEvent,
    MalformedAnswerError,
    decode_json,
    encode,
)
from llmrelay_server.domain import (
    UNLIMITED_STREAM,
    BackendHealth,
    BackendSpec,
    CompletionChunk,
    CompletionRequest,
    Message,
    ProbeNotMade,
    StreamLimits,
    UpstreamError,
    UpstreamErrorKind,
)

# Sized for hundreds of concurrent streams per backend; connections are kept for reuse between agent steps, at most
# max_keepalive_connections of them once a burst is over (each idle one holds a socket here and a slot upstream).
log = logging.getLogger(__name__)

POOL_LIMITS = httpx2.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60.0)
HEALTH_TIMEOUT_S = 5.0
"""How long a side request (a probe's, a count of tokens) is given, its whole answer: through the SDK's HTTP client
(the probes, and llama.cpp's and vLLM's counts) by `http1.Http1Transport`; Anthropic's count, posted as a completion
is (`post_read`), by the backend itself."""
# "context limit": Anthropic's 400 for a prompt that fits but not with max_tokens ("input length and `max_tokens`
# exceed context limit: 199759 + 8192 > 200000"), which another backend with a larger window can serve.
# "maximum number of tokens": Gemini's ("The input token count (134123) exceeds the maximum number of tokens allowed").
# "maximum model length": vLLM's ("The decoder prompt (length 9000) is longer than the maximum model length of 8192"),
# "maximum prompt length": xAI's.
_CONTEXT_LENGTH = re.compile(
    r"context[ _](length|window|size|limit)|maximum context|too many tokens|maximum number of tokens"
    r"|maximum (model|prompt) length",
    re.IGNORECASE,
)
_INPUT_TOO_LARGE = re.compile(r"is too large to process\. increase the physical batch size", re.IGNORECASE)
"""llama.cpp's words for an input longer than its batch (an embedding's: "input (801 tokens) is too large to process.
increase the physical batch size"), which it sends with a 500: the request's length, not the server's health."""
_CONTEXT_CODES: Final = frozenset({"context_length_exceeded", "exceed_context_size_error"})
"""Error codes (or types) that say the prompt is too long, whatever the status: OpenAI's code; llama.cpp's type, which
it has sent with a 500 too."""
_UNSUPPORTED_INPUT = re.compile(
    r"\b(image|audio) input is not supported"
    r"|missing data required for (image|audio) input"
    r"|\bat most \d+ (image|audio)\(s\) may be provided"
    r"|\bdoes not support (tools|thinking|chat|embeddings)\b"
    r"|requires --(enable-auto-tool-choice|tool-call-parser)\b",
    re.IGNORECASE,
)
"""The words of a server whose model cannot read an image (or audio) the request holds, or do what it asks: llama.cpp's,
which it sends with a 500; Ollama's ("this model is missing data required for image input"), with a 500, and its 400s
for a model without the capability a request needs ('"gemma3" does not support tools', '... thinking': a chat with
tools or a reasoning effort; '... chat': an embedding model); vLLM's ("At most 0 image(s) may be provided in one
prompt", or N: more than its --limit-mm-per-prompt), with a 400. Another backend of the model may take them, and the
server is well: not a failure of its own (a SERVER_ERROR's retries then opened its circuit for every caller); the
caller's mistake only when no backend takes them (INVALID_ARGUMENT all the same). vLLM's for a chat with tools, which
a server started without a tool parser refuses ('"auto" tool choice requires --enable-auto-tool-choice and
--tool-call-parser to be set'), with a 400 too."""
_SECRET_LIKE = re.compile(r"\b(sk|key|token)-[A-Za-z0-9_\-]{6,}")
_LINE_END = re.compile(r"\r\n|\r|\n")
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_JSON_LAST: Final = frozenset('}]"el0123456789')
"""The characters a whole JSON text can end with, whitespace aside: an object's, an array's, a string's, true's,
false's, null's, a number's."""
MAX_RETRY_AFTER_S = 86_400.0
"""The longest wait an upstream's Retry-After is taken at: beyond a day it says no more than "not soon" (and a
RetryInfo holds at most about 10,000 years)."""
MAX_ANSWER_BYTES = 64 * 2**20
"""The most of an answer (a whole one's body, a stream's line, the body of a request the SDK's HTTP client sends)
the gateway reads, once decompressed: far beyond any answer a gRPC message carries, and a bound on the memory one
upstream's answer can take. A stream's line is measured by the memory its text takes as it arrives (`sys.getsizeof`
of each read's: up to 4 bytes a character, and an object's for each read, however short), not by its characters;
joined, a line whose characters differ in width takes up to 4 times that."""
MAX_ERROR_BODY_BYTES = 64 * 2**10
"""Of an error answer's body, whose first MAX_WORDS_CHARS characters are all that is passed on: a longer one is left
unread."""
ERROR_BODY_WAIT_S = 2.0
"""How long an error answer's body is awaited once its status has come, at most: without it, its status alone."""
FINISH_GRACE_S = 1.0
"""How long, after a streamed answer's finish reason, its usage or end marker is awaited before it ends without them
(`relayed`): an upstream sends them at once, or holds its connection open and never does."""
_AHEAD_OF_LIMITS_S = 0.05
"""How long before the router's limits a finished answer's wait for its usage ends (`relayed`): ended by its own
timer, the answer is whole; by the router's, it is a stalled stream."""
END_GRACE_S = 5.0
"""How long, after a streamed answer is whole by its own events, the rest of its body (an end marker, the body's end)
is awaited in the background, for its connection to go back to the pool: the caller does not wait for it."""


class SDKErrors(NamedTuple):
    """How an SDK says a request failed, so that its provider handles its own exception types alone."""

    timeout: Callable[..., Exception]
    """Called with request=: the SDK's timeout error."""
    connection: Callable[..., Exception]
    """Called with request=: the SDK's connection error."""
    status: Callable[[httpx2.Response], Exception]
    """The SDK's error for an HTTP error answer (read whole)."""


class Pool:
    """One backend's connections (`http1.Http1Pool`), shared by `post_read`, `post_stream` and the SDK's HTTP client
    (`http_client`), so that `limits` hold whole: at most max_connections open, max_keepalive_connections of them
    idle, each idle one for keepalive_expiry. TLS trusts what the SDK's own transport would (SSL_CERT_FILE too);
    calls go through the proxies the environment names, as the SDK's own transport's would (`proxies`), read once
    here."""

    def __init__(self, limits: httpx2.Limits = POOL_LIMITS) -> None:
        self.limits = limits
        proxies = Proxies.from_environment()
        self.http1 = Http1Pool(limits, proxies=proxies)
        self.secrets = proxies.secrets
        """The proxies' credentials, which an upstream's words must not pass on (`redact`)."""

    async def aclose(self) -> None:
        """Closes the pool (the SDK's client closes it too when it is closed; twice is harmless)."""
        await self.http1.aclose()


def http_client(
    sdk_client: Callable[..., httpx2.AsyncClient], pool: Pool | httpx2.Limits = POOL_LIMITS
) -> httpx2.AsyncClient:
    """The SDK's HTTP client with its defaults (`openai.DefaultAsyncHttpxClient`,
    `anthropic.DefaultAsyncHttpxClient`), sending through `pool`, shared, or a pool of its own with these limits; and
    following no redirect, as no chat does: the SDKs' default follows them, and a probe then called a backend whose
    every chat fails healthy, and a count posted the caller's chat wherever the redirect pointed."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    transport = Http1Transport(pool.http1, MAX_ANSWER_BYTES)
    return sdk_client(limits=pool.limits, transport=transport, follow_redirects=False)


def unreachable(base_url: str, error: BaseException) -> str:
    """What a connection error (the SDK's) says: the upstream not reached, and why, in the HTTP client's words
    (refused, a name not found, a certificate not trusted, a proxy in the way, a connection closed before answering),
    which name hosts and ports alone, never a credential."""
    cause = error.__cause__
    return f"cannot reach {base_url}" + (
        f": {cause}" if isinstance(cause, httpx2.TransportError) and str(cause) else ""
    )


def raise_if_out_of_files(error: BaseException) -> None:
    """ProbeNotMade when a probe failed for want of a file for its connection (`OutOfFiles`, the SDK's error's cause,
    or the HTTP client's own): a serving backend was made unreachable, and readiness NOT_SERVING, at the gateway's
    busiest."""
    out = error if isinstance(error, OutOfFiles) else error.__cause__
    if isinstance(out, OutOfFiles):
        raise ProbeNotMade(str(out)) from error


def pool_full(backend: str, error: BaseException) -> UpstreamError | None:
    """The gateway's own bound on connections to the upstream reached (none came free in time): the upstream did not
    fail, and is not counted as failing; None for any other failure."""
    cause = error.__cause__
    if isinstance(cause, OutOfFiles):
        return UpstreamError(UpstreamErrorKind.BUSY, backend, f"the gateway cannot open a connection to it: {cause}")
    if not isinstance(cause, httpx2.PoolTimeout):
        return None
    message = f"every connection the gateway may open to it is in use: {cause}; more gateways (or workers) serve more"
    return UpstreamError(UpstreamErrorKind.BUSY, backend, message)


def connection_failed(base_url: str, error: BaseException) -> str:
    """What a connection error (the SDK's) says: the upstream reached and its answer broken off (`broke_off`), or not
    reached at all (`unreachable`)."""
    cause = error.__cause__
    return broke_off(base_url, cause) if isinstance(cause, httpx2.ReadError) else unreachable(base_url, error)


def broke_off(base_url: str, error: httpx2.HTTPError) -> str:
    """What a failure while an answer was arriving says (the connection closed or reset mid-answer, silence past the
    read timeout): the upstream was reached, and why its answer stopped, in the HTTP client's words."""
    return f"{base_url} stopped answering: {error}" if str(error) else f"{base_url} stopped answering"


def prepared_headers(client_headers: Mapping[str, str], *sdk_headers: Mapping[str, Any]) -> httpx2.Headers:
    """The HTTP client's headers, then the SDK's (user agent, platform, API version, auth), merged once as the SDK
    would merge them for every request."""
    headers = httpx2.Headers(client_headers)
    for more in sdk_headers:
        headers.update({name: value for name, value in more.items() if isinstance(value, str)})
    return headers


class Endpoint:
    """One upstream URL that a provider POSTs JSON to, with all that does not change between its requests prepared
    once: the pool, the request's head (`http1.Http1Target`) and the SDK's exception types."""

    __slots__ = ("errors", "pool", "target", "url")

    def __init__(self, pool: Pool, url: str, headers: Mapping[str, str], errors: SDKErrors) -> None:
        self.pool, self.url, self.errors = pool, url, errors
        self.target = pool.http1.target(url, headers)


async def post_read(endpoint: Endpoint, body: Mapping[str, Any], timeout_s: float | None) -> bytes:
    """POSTs `body`, the JSON a wire module built (`wire.encode`: the caller's JSON texts spliced in unchanged), and
    returns the answer's body, read whole."""
    try:
        return await (await _send(endpoint, encode(body), timeout_s)).read(MAX_ANSWER_BYTES)
    except httpx2.TransportError as exc:
        _raise_sdk_error(endpoint, exc)


class Lines:
    """A streamed answer's lines, a batch for each read (`post_stream`), and whether the answer they carried came
    whole (`relayed` says): its connection is then left to finish by itself, else it is closed at once, so that the
    upstream sees its caller went away."""

    __slots__ = ("batches", "whole")

    def __init__(self, batches: AsyncIterator[list[str]]) -> None:
        self.batches = batches
        self.whole = False


@asynccontextmanager
async def post_stream(endpoint: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[Lines | bytes]:
    """POSTs `body` (JSON, as `post_read` does) for a streamed answer: its lines (SSE ends them with CRLF, LF or
    CR), a list for each read from the network, the lines that were waiting together, which `relayed` turns into as
    few chunks, never waiting for more. A failure while reading comes out as httpx2's (ReadTimeout, ReadError).
    Leaving closes the connection at once, so that an upstream sees a caller who went away, unless the answer came
    whole: then the rest of its body is awaited in the background for `END_GRACE_S` (`Http1Response.release_after`).

    An upstream that ignores `stream: true` answers whole, as JSON (Content-Type application/json): that body, read
    whole (failures as `post_read`'s), for the provider to relay as a stream of one answer. It is a valid answer,
    and the caller would rather have it than a failure."""
    try:
        # No read timeout: the router times a stream's chunks (the first, then the gaps between them).
        response = await _send(endpoint, encode(body), None)
    except httpx2.TransportError as exc:
        _raise_sdk_error(endpoint, exc)
    lines = None
    try:
        if response.content_type == "application/json":
            try:
                whole = await response.read(MAX_ANSWER_BYTES)
            except httpx2.TransportError as exc:
                _raise_sdk_error(endpoint, exc)
            yield whole
        else:
            lines = Lines(_line_batches(response))
            yield lines
    finally:
        if lines is not None and lines.whole:
            response.release_after(END_GRACE_S)
        else:
            response.close()


async def _send(endpoint: Endpoint, content: bytes, timeout_s: float | None) -> Http1Response:
    """The answer, its status and headers read; the call's own headers (a trace context) added, and its meter told
    once the request is written (`metering.request_sent`). `timeout_s` bounds the wait for each piece of the answer,
    as the SDK's read timeout does; connecting takes at most `http1.CONNECT_TIMEOUT_S`. An error answer comes out as
    the SDK's exception; a failure to connect or read as httpx2's, for the caller to map (`_raise_sdk_error`) once for
    the whole request."""
    response = await endpoint.pool.http1.post(
        endpoint.target, content, timeout_s, metering.upstream_headers(), metering.request_sent, metering.request_begun
    )
    # Any status but a success is the upstream's error, a redirect too (followed by no one: a request would go where
    # the backend's configuration did not say), with its status kept for the caller and the metrics.
    if not 200 <= response.status <= 299:
        try:
            async with asyncio.timeout(ERROR_BODY_WAIT_S):
                body = await response.read(MAX_ERROR_BODY_BYTES)
        except (MalformedAnswerError, httpx2.TransportError, TimeoutError):
            # The status says what failed: the upstream's words, too long, cut short or slow to come (a stream's have
            # no read timeout: the call ended at its first chunk's, a timeout in place of the upstream's 500), are not
            # worth more than the status. (A read that fails closes the connection.)
            body = b""
        raise endpoint.errors.status(
            httpx2.Response(
                response.status,
                # The body as the pool could decode it: httpx2 would decode it again, by a Content-Encoding the pool
                # left (a list, "gzip, identity"; one it does not take), and raise an error no one maps.
                headers=[(name, value) for name, value in response.headers if name.lower() != b"content-encoding"],
                content=body,
                request=httpx2.Request("POST", endpoint.url),
                extensions={"reason_phrase": response.reason.encode("latin-1")} if response.reason else {},
            )
        )
    return response


def _raise_sdk_error(endpoint: Endpoint, error: httpx2.TransportError) -> NoReturn:
    """httpx2's failure as the SDK's own: a timeout, or a connection error, caused by it as the SDK's would be."""
    request = httpx2.Request("POST", endpoint.url)
    if isinstance(error, httpx2.TimeoutException):
        raise endpoint.errors.timeout(request=request) from error
    raise endpoint.errors.connection(request=request) from error


async def _line_batches(response: Http1Response) -> AsyncIterator[list[str]]:
    decoder = _utf8_decoder(errors="replace")  # SSE is UTF-8 whatever the headers say
    pending: list[str] = []  # the start of a line that a later read ends (a long line takes many reads)
    pending_bytes = 0  # the memory `pending` takes
    at_start = True
    after_cr = False  # the last text ended with CR: an LF that starts the next ends the same line (CRLF)
    pieces = aiter(response)
    while True:
        data = await anext(pieces, b"")  # b"": the end of the answer (a piece is never empty)
        text = decoder.decode(data, final=not data)
        if at_start and text:
            # A byte-order mark is no part of the stream (SSE's UTF-8 decoding drops it); left on, the first line would
            # not read as `data:`, and its event would be lost.
            at_start, text = False, text.removeprefix("\ufeff")
        if after_cr and text:
            # Read as a line of its own, it would be a blank line: the end of an event whose data lines go on.
            after_cr, text = False, text.removeprefix("\n")
        if text.endswith("\r"):
            after_cr = True
        # Every server seen ends lines with LF alone, which str.split finds ten times faster than the expression.
        lines = _LINE_END.split(text) if "\r" in text else text.split("\n")
        if len(lines) > 1:
            if pending:
                pending.append(lines[0])
                lines[0] = "".join(pending)  # one copy of a long line, its pieces freed before it is read
            if last := lines.pop():
                pending, pending_bytes = [last], sys.getsizeof(last)
            else:
                pending, pending_bytes = [], 0
            yield lines
        elif text:
            pending.append(text)
            pending_bytes += sys.getsizeof(text)
            if pending_bytes > MAX_ANSWER_BYTES:
                raise MalformedAnswerError(f"a line of the stream is over {MAX_ANSWER_BYTES} bytes")
        if not data:
            break
    if pending:
        line = "".join(pending)
        pending.clear()  # its pieces, not held beside the line while it is read
        yield [line]


async def relayed(
    lines: Lines,
    chunk_of: Callable[[str], CompletionChunk | None],
    ended: Callable[[], bool],
    spec: BackendSpec,
    settled: Callable[[], bool] | None = None,
    finished: Callable[[], bool] | None = None,
    limits: StreamLimits = UNLIMITED_STREAM,
) -> AsyncIterator[CompletionChunk]:
    """The chunks of a streamed answer (`post_stream`'s batches of lines), as the dialect's `chunk_of` reads each line
    (None for a line without one), until `ended()` says the answer is whole, with the line that made it whole (a last
    delta may come with the finish reason). Chunks that arrived together go out coalesced. When a line fails (an
    error event, a malformed one) the text that came before it goes out first, then the failure; a failure of the
    HTTP read becomes an UpstreamError that says why (`broke_off`).

    An event's `data:` line is read at the blank line that ends the event, as SSE has it: an event whose data takes
    several lines (JSON written indented) is read as one `data:` line, its lines joined by line breaks. An event whose
    first line is whole by itself (JSON, [DONE]) is read at once when its blank line has not come with it, as every
    server writes it, rather than at the next read; and it is read as an event of its own when another `data:` line
    follows it without a blank line between (a server that ends its events with one line break). An event the answer
    ends in the middle of is dropped. Other lines (`event:`, comments) are read as they come.

    `settled()` says the answer is whole before its end marker came (its last event is in): it ends there, not held
    until an upstream that keeps the connection open after it is cut by the idle limit. Either way, whole, `lines`
    says so (`Lines.whole`), and what may follow is left to the connection (`post_stream`).

    `finished()` says the finish reason is in, its usage (which may follow it in an event of its own) not yet: the
    rest is awaited `FINISH_GRACE_S` at most from then (lines that bring neither, keep-alive comments, do not make it
    longer), and within the router's `limits` (its idle limit, from the last chunk given, and its deadline), and the
    answer ends whole without it (the router estimates the usage), not cut by the idle limit or the deadline when the
    upstream holds the connection open; the connection is closed then."""
    batches = lines.batches
    data: str | None = None
    """The `data:` line of the event being read, until its blank line."""
    more: list[str] = []
    """The event's data lines after its first (seldom any), and the memory they take."""
    more_bytes = 0
    loop = asyncio.get_running_loop()
    given_at = loop.time()
    """When a chunk was last given: the router's idle limit runs from there."""
    grace_ends: float | None = None
    try:
        while True:
            try:
                if finished is None or not finished():
                    batch = await anext(batches)
                else:
                    if grace_ends is None:
                        grace_ends = min(
                            loop.time() + FINISH_GRACE_S,
                            given_at + limits.idle_s - _AHEAD_OF_LIMITS_S,
                            limits.deadline - _AHEAD_OF_LIMITS_S,
                        )
                    try:
                        async with asyncio.timeout_at(grace_ends):
                            batch = await anext(batches)
                    except TimeoutError:
                        return  # not `whole`: the read it cut short leaves the connection to be closed
            except StopAsyncIteration:
                return  # an event still held is no whole one (see below): SSE drops it, as a cut read
            arrived: list[CompletionChunk] = []
            try:
                read: Iterable[str] = batch
                while True:
                    for line in read:
                        if not line:  # the blank line that ends an event
                            if data is None:
                                continue
                            if more:  # SSE joins an event's data lines by line breaks
                                line, more, more_bytes = "\n".join([data, *more]), [], 0
                            else:
                                line = data
                            data = None
                        elif line.startswith("data:"):
                            if data is None:
                                data = line
                                continue
                            if more or not _whole_event(data):
                                more_bytes = _more_data(more, more_bytes, line)
                                continue
                            # A server that ends an event with one line break, not two (not SSE): the event held is
                            # whole, and read as it was before this line came.
                            line, data = data, line
                        chunk = chunk_of(line)
                        if chunk is not None and (chunk.content or chunk.reasoning or chunk.tool_calls):
                            arrived.append(chunk)
                        if ended():
                            break
                    # An event whose blank line has not come with it (a server that writes the two apart; an answer
                    # that ends without it) is read now when it is whole by itself: no later line could make it more.
                    if data is None or more or ended() or not _whole_event(data):
                        break
                    read = ("",)
            except (UpstreamError, MalformedAnswerError):
                for chunk in _coalesced(arrived):
                    yield chunk
                if (finished is not None and finished()) or (settled is not None and settled()):
                    # Whole at its finish reason, whatever the upstream sends next (a line no event, an error event):
                    # not failed when that came in the same read as the finish, as it is not in a later one. Not
                    # `whole`: a connection that carried that is closed.
                    return
                raise
            if arrived:
                for chunk in _coalesced(arrived):
                    yield chunk
                given_at = loop.time()
            if ended() or (settled is not None and settled()):
                lines.whole = True
                return
    except httpx2.HTTPError as exc:
        kind = UpstreamErrorKind.TIMEOUT if isinstance(exc, httpx2.TimeoutException) else UpstreamErrorKind.UNREACHABLE
        raise UpstreamError(kind, spec.name, redact(broke_off(spec.base_url, exc), spec.api_key)) from exc


def _more_data(more: list[str], held_bytes: int, line: str) -> int:
    """Adds a `data:` line after an event's first to `more`, SSE's way: without its field name and one space after it.
    The memory they take (an object's for each, however short) is bounded as a line's text is (`MAX_ANSWER_BYTES`).
    Returns the memory `more` takes now."""
    value = line[5:].removeprefix(" ")
    held_bytes += sys.getsizeof(value)
    if held_bytes > MAX_ANSWER_BYTES:
        raise MalformedAnswerError(f"an event of the stream is over {MAX_ANSWER_BYTES} bytes")
    more.append(value)
    return held_bytes


def _whole_event(data: str) -> bool:
    """Whether an event's first `data:` line is all of it: JSON, or [DONE], which a line more could only break."""
    last = data[-1]  # `data:` at least
    if last not in _JSON_LAST and not last.isspace():
        # No whole JSON text ends so (the first of an event's lines, a line cut short): not copied and parsed for
        # nothing, which costs a long line's memory twice over (orjson's error holds a copy of it too).
        return False
    payload = data[5:].strip()
    if payload == DONE:
        return True
    try:
        decode_json(payload)
    except MalformedAnswerError:
        return False
    return True


def _coalesced(chunks: list[CompletionChunk]) -> list[CompletionChunk]:
    """Chunks that arrived together, as few as their meaning allows: each run of text-only chunks as one (its content
    joined, its reasoning joined); a chunk with tool-call fragments as it is. A gRPC message per upstream event
    would cost a write each (a system call, most of a relayed chunk's cost) for text the caller gets no sooner."""
    if len(chunks) < 2:
        return chunks
    merged: list[CompletionChunk] = []
    run: list[CompletionChunk] = []
    for chunk in chunks:
        if chunk.tool_calls:
            merged += _joined(run)
            run = []
            merged.append(chunk)
        else:
            run.append(chunk)
    return merged + _joined(run)


def _joined(run: list[CompletionChunk]) -> list[CompletionChunk]:
    if len(run) < 2:
        return run
    # Lists, not generators: a generator's frame is resumed once a chunk, and a run can be a thousand long.
    content = "".join([chunk.content for chunk in run if chunk.content]) or None
    reasoning = "".join([chunk.reasoning for chunk in run if chunk.reasoning]) or None
    # A relayed chunk carries text, names and the prompt's usage alone (the end of the answer is the provider's own
    # last chunk).
    last = run[-1]
    return [
        CompletionChunk(
            id=last.id,
            backend=last.backend,
            model=last.model,
            content=content,
            reasoning=reasoning,
            prompt_usage=last.prompt_usage,
        )
    ]


def answer_texts(message: Message) -> list[str]:
    """An answer's text as the gateway counts it when the upstream reported no usage (`TokenCounter.estimate_usage`):
    its content, reasoning and tool calls' arguments."""
    return [message.content, message.reasoning or "", *(call.arguments for call in message.tool_calls)]


SDKError = TypeVar("SDKError", bound=Exception)


class SDKClient(Protocol):
    """What `UpstreamProvider` needs of an SDK's client (`openai.AsyncOpenAI`, `anthropic.AsyncAnthropic`)."""

    async def close(self) -> None: ...


class UpstreamProvider(ABC, Generic[SDKError]):
    """The base of every dialect's provider, for what they do alike whatever the wire format: the backend's spec, its
    pool (`Pool`) and the SDK's HTTP client over it (`_http`), closing them, health records, and the failures every
    dialect names the same way, with secrets redacted. A dialect keeps the rest: its SDK client (`_client`, made over
    `_http`), how it builds requests and reads answers and stream events, and what its SDK's errors and its error
    answers mean (`_upstream_error`).

    Generic over the SDK's base exception (`openai.APIError`, `anthropic.APIError`): this module imports neither SDK,
    as each dialect imports its own alone (the anthropic SDK only once an Anthropic backend is made)."""

    kind: ClassVar[str]
    _sdk_error: type[SDKError]
    """The SDK's base exception, which `_upstream_error` maps."""
    _client: SDKClient
    """The SDK's client, which the dialect makes over `_http` (and types as its own)."""

    def __init__(self, spec: BackendSpec, sdk_http_client: Callable[..., httpx2.AsyncClient]) -> None:
        """`sdk_http_client`: the SDK's HTTP client class (`http_client`), made here over the backend's own pool."""
        self._spec = spec
        self._pool = Pool()
        self._http = http_client(sdk_http_client, self._pool)
        self._counts_failing = False
        """Whether the backend's last count of tokens failed: said once, until one succeeds again."""

    @property
    def spec(self) -> BackendSpec:
        return self._spec

    @property
    def connections_all_in_use(self) -> bool:
        return self._pool.http1.all_in_use

    def _count_failed(self, why: str) -> None:
        """A count of tokens failed for `why` ("could not count tokens (HTTP 404: ...)"), and the gateway estimates
        instead: a WARNING the first time, DEBUG until a count succeeds again. A /tokenize that is missing fails every
        count alike, and an agent may count before each of its calls."""
        level = logging.DEBUG if self._counts_failing else logging.WARNING
        self._counts_failing = True
        log.log(level, "backend %s %s; estimating instead", self._spec.name, why)

    def _counted(self) -> None:
        """A count of tokens succeeded."""
        if self._counts_failing:
            self._counts_failing = False
            log.info("backend %s counts tokens again", self._spec.name)

    def answer_tokens_asked(self, request: CompletionRequest) -> int | None:
        """The most tokens the upstream is asked to answer with: the request's max_tokens, as sent (a dialect that
        sends more says so)."""
        return request.options.max_tokens

    async def aclose(self) -> None:
        await self._client.close()
        await self._pool.aclose()

    @abstractmethod
    def _upstream_error(self, exc: SDKError) -> UpstreamError:
        """The SDK's failure as an UpstreamError, whose kind tells the router what to do next."""

    @abstractmethod
    def _error_event(self, event: ErrorEvent, said: str = "error event") -> UpstreamError:
        """An error the upstream sent in place of an answer or a stream's next event, as the dialect reads its status
        or type; `said` is how it came."""

    def _connection_error(self, exc: SDKError, *, timed_out: bool) -> UpstreamError:
        """The SDK's connection error (its timeout error is one): the gateway's own bound on connections reached
        (`pool_full`), an answer the HTTP transport could not read (the Anthropic SDK's wraps its MalformedAnswerError
        too), no answer in time, or the upstream not reached or its answer broken off (`connection_failed`)."""
        name = self._spec.name
        if (busy := pool_full(name, exc)) is not None:
            return busy
        if isinstance(exc.__cause__, MalformedAnswerError):  # reached, and answered what the transport cannot read
            return self._malformed(exc.__cause__)
        if isinstance(exc.__cause__, httpx2.ConnectTimeout):  # the network, or a backlog full, not a slow model
            return UpstreamError(UpstreamErrorKind.TIMEOUT, name, self._redact(str(exc.__cause__)))
        if timed_out:
            return UpstreamError(UpstreamErrorKind.TIMEOUT, name, "the upstream did not answer in time")
        return UpstreamError(
            UpstreamErrorKind.UNREACHABLE, name, self._redact(connection_failed(self._spec.base_url, exc))
        )

    def _status_failure(
        self, response: httpx2.Response, kind: UpstreamErrorKind, words: str, retry_after_s: float | None
    ) -> UpstreamError:
        """An HTTP error answer as a failed attempt: the upstream's `words`, redacted, which the log leaves out; a
        redirect's in the gateway's words (`redirect`: the SDKs' are its status alone, for a probe's models list)."""
        moved = redirect(response)
        said = self._redact(moved or words)
        status = response.status_code
        return UpstreamError(
            kind,
            self._spec.name,
            f"HTTP {status}: {said}",
            status=status,
            retry_after_s=retry_after_s,
            quoted="" if moved else said,
        )

    def _bad_answer(self, detail: str, quoted: str = "") -> UpstreamError:
        """An answer that is none; `detail` may quote it (`quoted`, the answer's words in it), so the key is taken out
        (a debugging page may echo it)."""
        return UpstreamError(
            UpstreamErrorKind.BAD_RESPONSE,
            self._spec.name,
            f"malformed answer: {self._redact(detail)}",
            quoted=self._redact(quoted),
        )

    def _malformed(self, exc: MalformedAnswerError) -> UpstreamError:
        """An answer that is not one: a bad answer, unless it is the upstream's error with a 200 (`ErrorAnswer`)."""
        if isinstance(exc, ErrorAnswer):
            return self._error_event(exc.event, "an error in a 200 answer")
        return self._bad_answer(str(exc), exc.quoted)

    def _health(
        self, started: float, *, reachable: bool, models: tuple[str, ...] = (), error: str | None = None
    ) -> BackendHealth:
        """A probe's result; `started` is its time.monotonic() start."""
        spec = self._spec
        return BackendHealth(
            name=spec.name,
            kind=self.kind,
            base_url=spec.base_url,
            default_model=spec.default_model,
            reachable=reachable,
            models=models,
            latency_s=time.monotonic() - started,
            # The SDKs read an error answer with json.loads, which makes a lone surrogate of "\ud800": no gRPC string
            # can carry one, and every Health call failed (INTERNAL) while the upstream said so.
            last_error=None if error is None else error.encode("utf-8", "replace").decode(),
            checked_at=time.time(),
        )

    def _unlisted(self, started: float, exc: Exception) -> BackendHealth:
        raise_if_out_of_files(exc)
        """A probe whose list of models failed: the upstream unreachable, unless it answered that this key may not
        list models (403: OpenAI's restricted keys without the models scope), which says nothing of its chats; taken
        for unreachable, such a backend kept readiness NOT_SERVING, a load balancer the gateway out of rotation, while
        every call succeeded. Its calls tell the rest: a key refused there too opens its circuit."""
        if isinstance(exc, self._sdk_error) and (error := self._upstream_error(exc)).status == 403:
            said = f"{error.message} (it lists no models to this key; calls are sent all the same)"
            return self._health(started, reachable=True, error=said)
        return self._health(started, reachable=False, error=self._describe(exc))

    def _describe(self, exc: Exception) -> str:
        """A probe's failure, for Health: what went wrong, never a secret."""
        if isinstance(exc, self._sdk_error):
            return self._upstream_error(exc).message
        if isinstance(exc, MalformedAnswerError):  # in the words a call's own bad answer has
            return self._malformed(exc).message
        return f"{type(exc).__name__}: {self._redact(str(exc))}"

    def _redact(self, text: str) -> str:
        return redact(text, self._spec.api_key, *self._pool.secrets)


_NOT_A_MODELS_LIST = "the models list is not a JSON object whose `data` is a list of models with ids"


@contextmanager
def models_list() -> Iterator[None]:
    """Around an SDK's models list and what is read of it: the SDKs build their pages from whatever JSON came,
    unchecked (a `{}`, a list of numbers), then fail on it with TypeError or AttributeError, and read it with
    json.loads, whose RecursionError is JSON nested past Python's stack, and whose ValueError is no JSON (or no UTF-8);
    a MalformedAnswerError instead, which a health probe reports."""
    try:
        yield
    except MalformedAnswerError:
        raise
    except (TypeError, AttributeError, RecursionError) as exc:
        raise MalformedAnswerError(_NOT_A_MODELS_LIST) from exc
    except ValueError as exc:  # not JSON (json.JSONDecodeError), or not UTF-8 (UnicodeDecodeError)
        raise MalformedAnswerError(f"the models list is not JSON ({exc})") from exc


def model_ids(models: Iterable[Any]) -> tuple[str, ...]:
    """The ids of the models an SDK listed (inside `models_list`); MalformedAnswerError unless each has one."""
    ids = tuple(model.id for model in models)
    if not all(isinstance(id_, str) and id_ for id_ in ids):
        raise MalformedAnswerError(_NOT_A_MODELS_LIST)
    try:
        # Read by json.loads, an id may hold a lone surrogate ("\ud800"), which no gRPC string can carry: every Health
        # call failed (INTERNAL) while the upstream listed it.
        "".join(ids).encode()
    except UnicodeEncodeError as exc:
        raise MalformedAnswerError(f"the models list has a model id that is no UTF-8 text ({exc.reason})") from exc
    return ids


MAX_WORDS_CHARS: Final = 500
"""Of an upstream's own words (its error's message), the most passed on: enough for any message upstreams write, and a
bound on what a page of HTML adds to a status and a log line."""
KEY_PIECE_CHARS: Final = 8
"""A backend's key this long or longer is taken out of an upstream's words wherever it stands, and so is any piece of
it from its start on that is this long (a quote of the answer cut inside it); a shorter one only where it stands
whole, a word of its own."""


def redact(text: str, api_key: str | None, *secrets: str) -> str:
    """An upstream's message without the backend's key, the other `secrets` (a proxy's credentials) or anything like a
    key, cut to MAX_WORDS_CHARS characters and saying so. Upstreams quote keys back in their errors ("Incorrect API
    key provided: sk-..."), and a proxy's error page the request's headers: never pass one on."""
    # Searched for the key's every piece in four forms: not through megabytes of an error page, of which 500
    # characters are kept.
    text = text[:65536]
    for secret in (api_key, *secrets):
        if secret and len(secret) < KEY_PIECE_CHARS:
            # A placeholder key of a local server ("x", "EMPTY"), a short user name: taken out of words, it made
            # "maximum" "ma[redacted]imum" in every message that had it.
            text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", "[redacted]", text)
        elif secret:
            text = _without_key(text, secret)
    text = _SECRET_LIKE.sub("[redacted]", text)
    # Said, so that a reader of a message ending mid-word does not take it for all the upstream wrote.
    return text if len(text) <= MAX_WORDS_CHARS else f"{text[:MAX_WORDS_CHARS]} [cut at {MAX_WORDS_CHARS} characters]"


def _without_key(text: str, key: str) -> str:
    """`text` with every piece of `key` KEY_PIECE_CHARS long or longer taken out, wherever it stands: the whole key (in
    a word too: "KEY_x"), what is left of it where the quote of an answer that held it was cut (its start, or its end),
    in any case (an upstream may lower it), and as HTML, a URL, JSON and base64 write it (a debugging page, a URL
    echoed, a JSON body quoted within text, an Authorization header quoted as a proxy encodes it)."""
    folded = text.lower()
    if len(folded) != len(text):
        # A letter that lowers to two ("İ"): each position of `folded` must be the text's, so that one is kept.
        folded = "".join(lowered if len(lowered := char.lower()) == 1 else char for char in text)
    secret = bytearray(len(text))
    """1 where a character of the text is a character of a piece of the key."""
    forms = {key, html.escape(key), quote(key, safe=""), json.dumps(key)[1:-1], *_in_base64(key)}
    for form in (form.lower() for form in forms):
        for start in range(len(form) - KEY_PIECE_CHARS + 1):
            piece = form[start : start + KEY_PIECE_CHARS]
            found = folded.find(piece)
            while found != -1:
                secret[found : found + KEY_PIECE_CHARS] = b"\1" * KEY_PIECE_CHARS
                found = folded.find(piece, found + 1)
    if not any(secret):
        return text
    # Each run of the key's characters becomes one "[redacted]", so the text reads as it did around it.
    kept: list[str] = []
    position = 0
    for hidden, run in itertools.groupby(secret):
        length = sum(1 for _ in run)
        kept.append("[redacted]" if hidden else text[position : position + length])
        position += length
    return "".join(kept)


def _in_base64(key: str) -> tuple[str, ...]:
    """The base64 characters that `key` alone decides, at each of the three offsets at which it may begin in what was
    encoded ("Bearer KEY", "user:KEY"): those the bytes around it share are left out."""
    return tuple(
        base64.b64encode(b"\0" * offset + key.encode())[(offset * 4 + 2) // 3 : -4].decode() for offset in range(3)
    )


def kind_of_status(status: int, code: str | None, message: str | None) -> UpstreamErrorKind:
    """What an HTTP error status means for the router (a dialect adds its own before it)."""
    # Our account cannot pay: 402, or OpenAI's 429 insufficient_quota ("check your plan and billing details"). No
    # wait cures it, only an operator: another backend may serve at once, and the caller is told of no "later".
    if status == 402 or code == "insufficient_quota":
        return UpstreamErrorKind.AUTH_FAILED
    if code in _CONTEXT_CODES or _INPUT_TOO_LARGE.search(message or ""):
        return UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED
    # The server cannot do what this request asks, which another may (and no retry mends): 501 (llama-server asked to
    # embed without --embeddings: not_supported_error), or an image to a model without vision. Its health is whole:
    # counted against its circuit, one caller's request would shut it for every other.
    if status == 501 or code == "not_supported_error" or _UNSUPPORTED_INPUT.search(message or ""):
        return UpstreamErrorKind.UNSUPPORTED
    if status == 429:
        return UpstreamErrorKind.RATE_LIMITED
    if status in (401, 403):
        return UpstreamErrorKind.AUTH_FAILED
    if status == 404:
        return UpstreamErrorKind.MODEL_NOT_FOUND
    if status == 408:
        return UpstreamErrorKind.TIMEOUT
    if status in (400, 413, 422):
        if _CONTEXT_LENGTH.search(message or ""):
            return UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED
        return UpstreamErrorKind.REJECTED
    return UpstreamErrorKind.SERVER_ERROR


def error_body(response: httpx2.Response) -> tuple[Any, Any]:
    """An HTTP error answer's body (its JSON, else its text) and the JSON's `error` (None without one), where both
    dialects put their error's type and message (`error_message`)."""
    try:
        body: Any = decode_json(response.content)  # not json.loads: JSON nested past Python's stack is a RecursionError
    except ValueError:
        body = _body_text(response)
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        body = body[0]  # Gemini's: [{"error": {...}}]
    return body, body.get("error") if isinstance(body, dict) else None


def error_message(response: httpx2.Response, body: Any, detail: Any) -> str:
    """What an HTTP error answer says: the upstream's own message (`detail`, where the dialect found one) when it is
    text, else a `message` text at the top of its JSON (as older vLLM answers, its error not wrapped in `error`),
    else the start of its body as it came, else the status's reason phrase; of a redirect, where to (`redirect`)."""
    if (moved := redirect(response)) is not None:
        return moved
    if isinstance(detail, str) and detail:
        return detail
    if isinstance(body, dict) and isinstance(message := body.get("message"), str) and message:
        return message
    # As it came, never as a Python repr (JSON nested deeper than an encoder goes is still its text).
    return _body_text(response)[:QUOTED_CHARS] or response.reason_phrase


def _body_text(response: httpx2.Response) -> str:
    """An answer's body as text, in the charset it names where that decodes it, else as UTF-8 (what it cannot read
    replaced). httpx's `text` decodes in the named charset even where no text can come of it: a codec that is no text
    encoding (hex, rot13, idna) raises whatever it raises, utf-16 without its byte order mark a UnicodeError, and an
    error page so named was an unexpected failure of the gateway (INTERNAL, with a traceback), no backend after it
    tried."""
    try:
        return response.text
    except Exception:  # any codec's failure: see above
        return response.content.decode("utf-8", "replace")


_USERINFO = re.compile(r"^([^/]*//)[^/]*@")
"""A URL's `user:password@`, after its scheme."""


def redirect(response: httpx2.Response) -> str | None:
    """What a redirect says, in the gateway's words: where to, and what to do; None for any other answer."""
    if not 300 <= response.status_code <= 399:
        return None
    location = response.headers.get("location", "")
    # Its user and password, query and fragment left out: a redirect to a login page carries credentials there.
    try:
        parts = urlsplit(location)
        where = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()
    except ValueError:  # no URL urllib can read ("http://[oops"): what it says, as far as a query would begin
        where = _USERINFO.sub(r"\1", re.split(r"[?#]", location, maxsplit=1)[0])
    to = f" to {where}" if where else ""
    return f"a redirect{to}, which the gateway does not follow: set the backend's base_url to where it points"


def retry_after_s(headers: httpx2.Headers) -> float | None:
    """Retry-After in seconds: OpenAI's retry-after-ms, then the standard header as seconds or an HTTP date."""
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        seconds = _seconds_or_date(value) if header == "retry-after" else _number(value)
        if seconds is not None:
            return min(max(0.0, seconds * scale), MAX_RETRY_AFTER_S)
    return None


def _seconds_or_date(value: str) -> float | None:
    """Retry-After's seconds or HTTP date as seconds from now; None for anything else (ignored, never fatal)."""
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # HTTP dates are GMT
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp() - time.time()


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
