"""What every dialect's provider shares (backends/upstream_http.py): what an error status means, and how a stream's
lines are relayed until the answer is whole."""

from __future__ import annotations

import base64
import html
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import quote

import httpx2
import openai
import pytest
from llmrelay_server.backends import upstream_http
from llmrelay_server.backends.http1 import Http1Response
from llmrelay_server.backends.upstream_http import (
    MAX_WORDS_CHARS,
    Lines,
    _line_batches,
    kind_of_status,
    pool_full,
    redact,
    relayed,
)
from llmrelay_server.backends.wire import MalformedAnswerError
from llmrelay_server.domain import BackendSpec, CompletionChunk, UpstreamError, UpstreamErrorKind
from llmrelay_server.router import NOT_THE_BACKENDS_FAULT, RETRYABLE

SPEC = BackendSpec(name="b", kind="openai", base_url="http://h/v1", default_model="m", api_key="correct-horse-battery")


@pytest.mark.parametrize(
    ("status", "code", "message", "kind"),
    [
        (429, None, "Rate limit reached", UpstreamErrorKind.RATE_LIMITED),
        (429, "rate_limit_exceeded", "Rate limit reached", UpstreamErrorKind.RATE_LIMITED),
        # Our account cannot pay: for an operator to fix, not a wait.
        (429, "insufficient_quota", "You exceeded your current quota", UpstreamErrorKind.AUTH_FAILED),
        (402, None, "Insufficient Balance", UpstreamErrorKind.AUTH_FAILED),
        (401, "invalid_api_key", "Incorrect API key provided", UpstreamErrorKind.AUTH_FAILED),
        (403, None, "", UpstreamErrorKind.AUTH_FAILED),
        (404, "model_not_found", "", UpstreamErrorKind.MODEL_NOT_FOUND),
        (408, None, "", UpstreamErrorKind.TIMEOUT),
        (400, "context_length_exceeded", "", UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED),
        (400, None, "This model's maximum context length is 8192 tokens", UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED),
        (400, None, "bad request", UpstreamErrorKind.REJECTED),
        # vLLM's and xAI's words; llama.cpp's for an input longer than its batch, with a 500.
        (
            400,
            None,
            "The decoder prompt (length 9000) is longer than the maximum model length of 8192",
            UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        ),
        (
            400,
            None,
            "Prompt length of 9000 is longer than the maximum model length of 8192",
            UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        ),
        (400, None, "This model's maximum prompt length is 131072", UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED),
        (
            500,
            "server_error",
            "input (801 tokens) is too large to process. increase the physical batch size",
            UpstreamErrorKind.CONTEXT_LENGTH_EXCEEDED,
        ),
        (503, None, "", UpstreamErrorKind.SERVER_ERROR),
        # What the server cannot do, which another may: llama-server's embeddings without --embeddings, and an image
        # to a model without vision: llama.cpp's words, Ollama's and vLLM's (and vLLM's of more images than it takes:
        # another backend may take them).
        (501, "not_supported_error", "This server does not support embeddings", UpstreamErrorKind.UNSUPPORTED),
        (500, "server_error", "image input is not supported - hint: ...", UpstreamErrorKind.UNSUPPORTED),
        (
            500,
            "api_error",
            "Failed to create new sequence: failed to process inputs: this model is missing data required for image"
            " input",
            UpstreamErrorKind.UNSUPPORTED,
        ),
        (400, "BadRequestError", "At most 0 image(s) may be provided in one prompt.", UpstreamErrorKind.UNSUPPORTED),
        (400, "BadRequestError", "At most 2 image(s) may be provided in one prompt.", UpstreamErrorKind.UNSUPPORTED),
        (400, "BadRequestError", "At most 2 images may be sent", UpstreamErrorKind.REJECTED),
        # Ollama's for a model without the capability the request needs: another backend's model may have it.
        (400, None, '"gemma3:1b" does not support tools', UpstreamErrorKind.UNSUPPORTED),
        (400, None, '"tiny" does not support thinking', UpstreamErrorKind.UNSUPPORTED),
        (400, None, '"nomic-embed-text" does not support chat', UpstreamErrorKind.UNSUPPORTED),
    ],
)
def test_error_kinds(status: int, code: str | None, message: str, kind: UpstreamErrorKind) -> None:
    assert kind_of_status(status, code, message) is kind


def chunk(content: str) -> CompletionChunk:
    return CompletionChunk(id="c", backend="b", model="m", content=content)


def reader(ending: str) -> tuple[Callable[[str], CompletionChunk | None], Callable[[], bool]]:
    """A dialect's chunk_of and ended(): each line is a delta of its own text; the answer is whole at `ending`."""
    seen: list[str] = []

    def chunk_of(line: str) -> CompletionChunk | None:
        seen.append(line)
        return chunk(line)

    return chunk_of, lambda: ending in seen


async def batches(*batch: list[str], failure: Exception | None = None) -> AsyncIterator[list[str]]:
    for lines in batch:
        yield lines
    if failure is not None:
        raise failure


async def pieces(*data: bytes) -> AsyncIterator[bytes]:
    for piece in data:
        yield piece


@pytest.mark.parametrize(
    "data",
    [(b"\xef\xbb\xbfdata: a\n", b"data: b\n"), (b"\xef", b"\xbb", b"\xbfdata: a\ndata: b\n")],
    ids=["whole", "a-byte-a-read"],
)
async def test_a_byte_order_mark_before_the_first_line_is_dropped(data: tuple[bytes, ...]) -> None:
    """SSE's UTF-8 decoding drops it: left on, the first line would not read as `data:`, and its event would be lost.
    One anywhere else is text."""
    response = cast(Http1Response, pieces(*data, b"data: \xef\xbb\xbfc\n"))
    lines = [line async for batch in _line_batches(response) for line in batch]
    assert lines == ["data: a", "data: b", "data: \ufeffc"]


async def test_the_line_that_makes_the_answer_whole_is_relayed_and_nothing_after_it() -> None:
    """A last delta may come with what ends the answer (a finish reason with the usage): it goes out; what follows
    the end, in the same read or a later one, is never read."""
    chunk_of, ended = reader("c")
    lines = Lines(batches(["a", "", "b"], ["c", "d"], ["e"]))
    relayed_chunks = [c async for c in relayed(lines, chunk_of, ended, SPEC)]
    assert [c.content for c in relayed_chunks] == ["ab", "c"]


async def read_events(*batch: list[str]) -> list[list[str]]:
    """The lines `relayed` hands the dialect for these batches: the chunks it relays, each the lines it joined."""
    relayed_chunks = relayed(Lines(batches(*batch)), lambda line: chunk(line + "|"), lambda: False, SPEC)
    return [(c.content or "").split("|")[:-1] async for c in relayed_chunks]


async def test_an_events_data_lines_are_read_at_its_blank_line_as_one() -> None:
    """SSE joins an event's `data:` lines with line breaks (each without its field name and one space), whichever
    reads they came in and whatever other lines (comments) come between; the event is read at its blank line."""
    read = await read_events(["data: {", ": a comment", "data:  1,", "data:2"], ["data: }", "", "data: [DONE]", ""])
    assert read == [[": a comment"], ["data: {\n 1,\n2\n}", "data: [DONE]"]]


async def test_a_whole_event_is_read_without_waiting_for_its_blank_line() -> None:
    """A server that writes an event's blank line apart from it (or never): the event is read at once, not at the next
    read; events ended by one line break, not two, are each read as an event."""
    assert await read_events(['data: {"a": 1}'], ["", "data: [DONE]"]) == [['data: {"a": 1}'], ["data: [DONE]"]]
    assert await read_events(["data: 1", "data: 2", "data: {", "data: 3}", ""]) == [
        ["data: 1", "data: 2", "data: {\n3}"]
    ]


async def test_an_event_the_answer_ends_in_the_middle_of_is_dropped() -> None:
    assert await read_events(["data: 1", "", "data: {"], ['data: "a":']) == [["data: 1"]]


async def test_an_event_of_many_data_lines_is_bounded_as_a_line_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """By the memory its lines take, however short they are."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 200)
    lines = Lines(batches(["data: {", *(["data:"] * 5), ""]))
    with pytest.raises(MalformedAnswerError, match="an event of the stream is over 200 bytes"):
        async for _ in relayed(lines, *reader("never"), SPEC):
            pass


@pytest.mark.parametrize(
    "data",
    [(b"data: ", *["\U0001f600".encode() * 100] * 3), (b"data: ", *[b"a"] * 300)],
    ids=["4-byte characters", "a byte a read"],
)
async def test_a_line_is_bounded_by_the_memory_it_takes_not_its_characters(
    monkeypatch: pytest.MonkeyPatch, data: tuple[bytes, ...]
) -> None:
    """Counted in characters, a line of 63 Mi 4-byte characters (252 MiB) was under the 64 MiB bound, and took 1.3 GB
    to read; a line read a byte at a time holds an object for each byte."""
    monkeypatch.setattr(upstream_http, "MAX_ANSWER_BYTES", 1_000)
    response = cast(Http1Response, pieces(*data, b"\n"))
    with pytest.raises(MalformedAnswerError, match="a line of the stream is over 1000 bytes"):
        async for _ in _line_batches(response):
            pass


@pytest.mark.parametrize("end", [b"\n", b""], ids=["its line end", "the answer's end"])
async def test_a_long_line_is_held_once_while_it_is_read(end: bytes) -> None:
    """Its pieces, joined, were held beside it (as it was yielded at the end of the answer, or joined twice), and a
    first `data:` line that is no whole JSON text was copied and parsed to learn it: up to 20 times its size."""
    line = b'data: {"content": "' + b"a" * 4_000_000
    response = cast(Http1Response, pieces(*[line[i : i + 65_536] for i in range(0, len(line), 65_536)], end))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        relayed_chunks = [c async for c in relayed(Lines(_line_batches(response)), *reader("never"), SPEC)]
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert relayed_chunks == []  # an event the answer ends in the middle of
    assert peak < 2.5 * len(line)  # its pieces and the line, as they are joined


async def test_a_line_end_split_between_reads_ends_one_line() -> None:
    """CR at the end of one read and LF at the start of the next are one CRLF, not a line and a blank line (which
    would end an event whose data lines go on)."""
    response = cast(Http1Response, pieces(b"data: {\r", b"\ndata: 1\r\n", b"data: }\r", b"\n\r\n"))
    lines = [line async for batch in _line_batches(response) for line in batch]
    assert lines == ["data: {", "data: 1", "data: }", ""]


@pytest.mark.parametrize(
    ("failure", "kind", "why"),
    [
        (
            httpx2.ReadError("the connection closed before the answer ended: [Errno 104] Connection reset by peer"),
            UpstreamErrorKind.UNREACHABLE,
            "http://h/v1 stopped answering: the connection closed before the answer ended: [Errno 104] Connection"
            " reset by peer",
        ),
        (
            httpx2.ReadTimeout("no byte of the rest of the answer in 15 s"),
            UpstreamErrorKind.TIMEOUT,
            "http://h/v1 stopped answering: no byte of the rest of the answer in 15 s",
        ),
        (
            httpx2.ReadError("reset while sending correct-horse-battery"),
            UpstreamErrorKind.UNREACHABLE,
            "http://h/v1 stopped answering: reset while sending [redacted]",
        ),
    ],
)
async def test_a_read_that_fails_mid_stream_says_why(failure: Exception, kind: UpstreamErrorKind, why: str) -> None:
    """In the HTTP client's words, as a unary answer cut alike says it, never a bare exception name; never the key."""
    chunk_of, ended = reader("never")
    received: list[CompletionChunk] = []
    with pytest.raises(UpstreamError) as caught:
        async for relayed_chunk in relayed(Lines(batches(["a"], failure=failure)), chunk_of, ended, SPEC):
            received.append(relayed_chunk)
    assert [c.content for c in received] == ["a"]
    assert (caught.value.kind, caught.value.backend, caught.value.message) == (kind, "b", why)


@pytest.mark.parametrize(
    ("key", "said", "passed_on"),
    [
        (
            "x",
            "prompt is too long: 208656 tokens > 200000 maximum",
            "prompt is too long: 208656 tokens > 200000 maximum",
        ),
        ("EMPTY", "key EMPTY is not valid; EMPTYING", "key [redacted] is not valid; EMPTYING"),
        ("sk-abc", "Incorrect API key provided: sk-abc.", "Incorrect API key provided: [redacted]."),
        ("sk-abc", "token=sk-abc&x=1, sk-abcd", "token=[redacted]&x=1, sk-abcd"),
    ],
    ids=["placeholder-inside-words", "placeholder-whole", "quoted-back", "beside-punctuation"],
)
def test_the_key_is_redacted_where_it_stands_whole(key: str, said: str, passed_on: str) -> None:
    # Replaced anywhere, a placeholder key ("x", as local servers take any) made "maximum" "ma[redacted]imum".
    assert redact(said, key) == passed_on


GOOGLE_KEY = "AIzaSyD0123456789abcdefghijklmnopqrstuvw"  # no prefix the secret-like pattern knows


@pytest.mark.parametrize(
    ("said", "passed_on"),
    [
        (f"bad key {GOOGLE_KEY}_x", "bad key [redacted]_x"),
        (f"{GOOGLE_KEY}{GOOGLE_KEY}", "[redacted]"),
        (f"(it starts with '<html>xxx {GOOGLE_KEY[:19]}')", "(it starts with '<html>xxx [redacted]')"),
        (f"a piece too short to say much: {GOOGLE_KEY[:7]}", f"a piece too short to say much: {GOOGLE_KEY[:7]}"),
    ],
    ids=["in-a-word", "twice", "cut-inside-it", "a-piece-under-8"],
)
def test_a_long_key_is_redacted_wherever_it_stands_and_so_is_its_start_where_a_quote_cut_it(
    said: str, passed_on: str
) -> None:
    """An answer quoted to 80 characters (the start of a page that is no JSON) was cut inside the key, and what was
    left of it is not the key: it went out to the caller and the log; and a key followed by a letter or a dash was
    left whole."""
    assert redact(said, GOOGLE_KEY) == passed_on


ODD_KEY = 'sk-abc&def=ghi/jkl+mno"pqr1234567890'  # characters HTML, URLs and JSON each write otherwise


@pytest.mark.parametrize(
    "written",
    [
        ODD_KEY.lower(),
        html.escape(ODD_KEY),
        quote(ODD_KEY, safe=""),
        json.dumps(ODD_KEY)[1:-1],
        ODD_KEY[6:],  # a quote that begins inside it
        html.escape(ODD_KEY)[11:],
    ],
    ids=["lowered", "html", "url", "json", "its-end", "html-its-end"],
)
def test_a_key_is_redacted_as_pages_urls_and_json_write_it_and_where_a_quote_begins_inside_it(written: str) -> None:
    """An upstream echoing the key HTML-escaped (a debugging page), in a URL, in JSON within text, lowered, or from
    a few characters in: 22 of a key's 33 characters reached the caller."""
    passed_on = redact(f"bad credentials <{written}> given", ODD_KEY)
    assert passed_on == "bad credentials <[redacted]> given", passed_on


def test_a_key_upper_cased_beside_a_letter_that_lowers_to_two_is_redacted() -> None:
    """A letter that lowers to two characters ("İ"): the lowered text's positions were not the text's, and the search
    fell back to the key as written, missing it in another case."""
    passed_on = redact(f"İstanbul region: bad credentials <{ODD_KEY.upper()}> given", ODD_KEY)
    assert passed_on == "İstanbul region: bad credentials <[redacted]> given", passed_on


@pytest.mark.parametrize("encoded", ["", "Bearer ", "svc:", "Bearer  "])
def test_a_key_is_redacted_in_base64_as_an_authorization_header_is_quoted(encoded: str) -> None:
    """A proxy's "malformed Authorization header (base64: ...)" passed the backend's key on to the caller, encoded."""
    said = base64.b64encode(f"{encoded}{GOOGLE_KEY}".encode()).decode()
    passed_on = redact(f"malformed header (base64: {said})", GOOGLE_KEY)
    assert "[redacted]" in passed_on, passed_on
    # Left: the characters that the bytes before the key decide, and the last few, which it shares with the end.
    before, after = passed_on.removeprefix("malformed header (base64: ").removesuffix(")").split("[redacted]")
    assert len(before) <= (len(encoded) * 4 + 2) // 3 and len(after) <= 4, passed_on


def test_words_past_the_bound_are_cut_and_say_so() -> None:
    """A page of HTML or a long validation error passed on ending mid-word read as all the upstream had said."""
    assert redact("x" * MAX_WORDS_CHARS, "sk-abc") == "x" * MAX_WORDS_CHARS
    assert redact("y" * (MAX_WORDS_CHARS + 1), "sk-abc") == f"{'y' * MAX_WORDS_CHARS} [cut at 500 characters]"


def test_no_connection_free_in_the_gateways_pool_is_its_own_bound_not_the_upstreams_failure() -> None:
    """A burst past the pool's max_connections waited out its time: that is no upstream timing out, nor a failure to
    count against its circuit (a burst could open a healthy backend's)."""
    request = httpx2.Request("POST", "http://upstream/v1/chat/completions")
    waited = openai.APITimeoutError(request=request)
    waited.__cause__ = httpx2.PoolTimeout("no connection free in 5 s (1024 open)")
    timed_out = openai.APITimeoutError(request=request)
    timed_out.__cause__ = httpx2.ReadTimeout("no byte of an answer in 5 s")

    busy = pool_full("openai", waited)

    assert busy is not None and busy.kind is UpstreamErrorKind.BUSY
    assert busy.message.startswith("every connection the gateway may open to it is in use: no connection free in 5 s")
    assert busy.kind in NOT_THE_BACKENDS_FAULT and busy.kind not in RETRYABLE
    assert pool_full("openai", timed_out) is None
