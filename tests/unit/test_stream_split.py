"""A streamed chunk too large for one gRPC message, sent as several: each within the limit, together the same answer,
its end (finish reason, usage, the reasoning's signature) once, on the last."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from llmrelay_server.domain import CompletionChunk, FinishReason, TokenUsage, ToolCallDelta
from llmrelay_server.servicer import _split, _text_length

MAX_CHARS = 40

texts = st.none() | st.text(max_size=130)
short = st.none() | st.text(max_size=8)
calls = st.lists(
    st.builds(ToolCallDelta, index=st.integers(0, 3), id=short, name=short, arguments=texts, signature=short),
    max_size=3,
    unique_by=lambda call: call.index,
)
chunks = st.builds(
    CompletionChunk,
    id=st.text(max_size=8),
    backend=st.just("b"),
    model=st.text(max_size=8),
    content=texts,
    reasoning=texts,
    tool_calls=calls.map(tuple),
    finish_reason=st.none() | st.just(FinishReason.STOP),
    usage=st.none() | st.just(TokenUsage(3, 4)),
    reasoning_signature=st.none() | st.text(max_size=14),
)


@settings(max_examples=400, deadline=None)
@given(chunks)
def test_a_chunk_in_pieces_is_the_same_answer_each_piece_within_the_limit(chunk: CompletionChunk) -> None:
    pieces = _split(chunk, MAX_CHARS)
    assert all(_text_length(piece) <= MAX_CHARS for piece in pieces)  # what is never cut fits: at most 32 here
    assert {(piece.id, piece.model) for piece in pieces} == {(chunk.id, chunk.model)}
    assert "".join(piece.content or "" for piece in pieces) == (chunk.content or "")
    assert "".join(piece.reasoning or "" for piece in pieces) == (chunk.reasoning or "")
    fragments = [call for piece in pieces for call in piece.tool_calls]
    for call in chunk.tool_calls:
        own = [fragment for fragment in fragments if fragment.index == call.index]
        assert (own[0].id, own[0].name, own[0].signature) == (call.id, call.name, call.signature)
        assert all(fragment.id is None and fragment.signature is None for fragment in own[1:])
        assert "".join(fragment.arguments or "" for fragment in own) == (call.arguments or "")
    *body, last = pieces
    assert (last.finish_reason, last.usage, last.reasoning_signature) == (
        chunk.finish_reason,
        chunk.usage,
        chunk.reasoning_signature,
    )
    assert all(p.finish_reason is None and p.usage is None and p.reasoning_signature is None for p in body)


def test_an_id_too_large_alone_is_left_whole_for_the_servicer_to_refuse() -> None:
    # A stream whose id was megabytes passed uncounted, and gRPC refused its message with a bare RESOURCE_EXHAUSTED.
    chunk = CompletionChunk("c" * (MAX_CHARS + 1), "b", "m", content="hi")
    assert _split(chunk, MAX_CHARS) == [chunk]
    assert _text_length(chunk) > MAX_CHARS
