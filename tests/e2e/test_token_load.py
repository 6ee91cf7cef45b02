"""CountTokens on a large input leaves everyone else served: the count runs off the event loop, and the encodings
load when the gateway starts, not in the first call that needs one."""

from __future__ import annotations

import asyncio
import random
import string
import threading
from pathlib import Path
from typing import Any

import pytest
from llmrelay import v1 as pb
from llmrelay_server import tokens
from llmrelay_server.domain import TokenCount
from support import StubFactory, chat, two_backends
from upstream import FakeUpstream


def large_text(size: int = 3_900_000) -> str:
    """Random letters and punctuation: few merges, so about the slowest text to count per byte (half a second)."""
    return "".join(random.Random(7).choices(string.ascii_letters + " .,\n", k=size))


async def test_a_large_count_leaves_other_calls_served(
    stub: pb.LLMServiceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count holds until five other calls have been answered: on the event loop it would hold them up too, and
    wait in vain. No time is measured, so a slow moment of the machine cannot fail it."""
    loop = asyncio.get_running_loop()
    count_started = asyncio.Event()
    others_answered = threading.Event()
    released_by_others: list[bool] = []
    real_count = tokens.TokenCounter.count_text

    def count_after_others(self: tokens.TokenCounter, model: str, text: str) -> TokenCount:
        loop.call_soon_threadsafe(count_started.set)
        # Bounded, so that a count on the event loop fails the test instead of hanging it.
        released_by_others.append(others_answered.wait(timeout=10))
        return real_count(self, model, text)

    monkeypatch.setattr(tokens.TokenCounter, "count_text", count_after_others)
    counting = stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", text=large_text()), timeout=30)
    await asyncio.wait_for(count_started.wait(), timeout=20)
    for _ in range(5):
        reply = await stub.Complete(chat(), timeout=5)
        assert reply.message.content
    others_answered.set()
    count = await counting

    assert released_by_others == [True]
    assert count.token_count > 1_000_000


async def test_no_encoding_loads_on_the_event_loop(
    stub_for: StubFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # An empty directory first in the search path: a path this process has loaded no encoding from yet.
    monkeypatch.setenv("LLMRELAY_TIKTOKEN_DIR", str(tmp_path))
    stub = await stub_for(two_backends(primary, local))
    loads_after_start: list[tuple[str, int]] = []
    real_load = tokens._load_ranks

    def recording_load(ranks_file: Any, search_dirs: Any) -> dict[bytes, int]:
        loads_after_start.append((ranks_file.name, threading.get_ident()))
        return real_load(ranks_file, search_dirs)

    monkeypatch.setattr(tokens, "_load_ranks", recording_load)
    for model in ("gpt-4o", "gpt-4", "gpt-oss:20b"):
        count = await stub.CountTokens(pb.CountTokensRequest(model=model, text="tiktoken is great!"), timeout=5)
        assert count.token_count == 6

    # The backends' models (gpt-test is counted as o200k_base) loaded at start; gpt-4's cl100k_base on first use,
    # in a thread.
    assert [name for name, _ in loads_after_start] == ["cl100k_base"]
    assert threading.get_ident() not in {thread for _, thread in loads_after_start}
