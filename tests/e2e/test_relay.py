"""How a stream's chunks are relayed: each as soon as it arrives, never held back for more; those that arrive
together (waiting in the same read from the upstream) joined into one message."""

from __future__ import annotations

import itertools
import time

import pytest
from llmrelay import v1 as pb
from support import DIALECTS, stream_chat
from upstream import FakeUpstream

TRICKLE_S = 0.3


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_each_chunk_is_relayed_as_it_arrives(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    primary.inject({"trickle_s": TRICKLE_S})
    arrivals = []
    async for message in stub.StreamComplete(stream_chat("one two three"), timeout=10):
        if message.delta.content:
            arrivals.append((time.monotonic(), message.delta.content))
    assert "".join(text for _, text in arrivals) == "echo: one two three"
    # The upstream waits TRICKLE_S after each word: a gateway holding chunks back would deliver them close together.
    assert len(arrivals) == 4, arrivals
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrivals)]
    assert all(gap > TRICKLE_S / 2 for gap in gaps), gaps


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_chunks_that_arrive_together_are_joined(stub: pb.LLMServiceAsyncStub, primary: FakeUpstream) -> None:
    words = [f"w{i}" for i in range(300)]
    messages = [m async for m in stub.StreamComplete(stream_chat(" ".join(words)), timeout=10)]
    assert "".join(m.delta.content for m in messages) == "echo: " + " ".join(words)
    # The upstream writes its 301 events at once; they reach the gateway in a few reads, a message each.
    assert len(messages) < 50, len(messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP and not messages[-1].delta.content


@pytest.mark.parametrize("line_end", ["\r\n", "\r"])
@pytest.mark.parametrize("trickled", [False, True], ids=["at-once", "a-byte-a-read"])
async def test_lines_may_end_with_crlf_or_cr(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, line_end: str, trickled: bool
) -> None:
    # Trickled, a CRLF's two bytes reach the gateway in two reads: the CR ends the line, the LF adds no event.
    primary.inject({"line_end": line_end, "one_delta": True, **({"byte_trickle_s": 0.002} if trickled else {})})
    messages = [m async for m in stub.StreamComplete(stream_chat("one two three"), timeout=20)]
    assert "".join(m.delta.content for m in messages) == "echo: one two three"
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    assert messages[-1].usage.completion_tokens > 0  # the usage event, read like the others
    assert not messages[-1].usage.estimated
