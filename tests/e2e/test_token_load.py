"""CountTokens on a large input leaves everyone else served: the count runs off the event loop, and the encodings
load when the gateway starts, not in the first call that needs one."""

from __future__ import annotations

import asyncio
import random
import string
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from llmrelay import v1 as pb
from llmrelay_server import tokens
from support import StubFactory, chat, two_backends
from upstream import FakeUpstream


def large_text(size: int = 3_900_000) -> str:
    """Random letters and punctuation: few merges, so about the slowest text to count per byte (half a second)."""
    return "".join(random.Random(7).choices(string.ascii_letters + " .,\n", k=size))


async def timed_count(stub: pb.LLMServiceAsyncStub, text: str) -> tuple[pb.CountTokensResponse, float]:
    started = time.perf_counter()
    count = await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o", text=text), timeout=30)
    return count, time.perf_counter() - started


async def test_a_large_count_leaves_other_calls_fast(stub: pb.LLMServiceAsyncStub) -> None:
    text = large_text()
    await stub.Complete(chat(), timeout=5)
    latencies: list[float] = []

    counting = asyncio.create_task(timed_count(stub, text))
    while not counting.done():
        started = time.perf_counter()
        await stub.Complete(chat(), timeout=5)
        latencies.append(time.perf_counter() - started)
    count, count_s = await counting

    assert count.token_count > 1_000_000
    # On the event loop the count held up every call for as long as it took; in a thread, calls go on meanwhile.
    assert max(latencies) < count_s / 3, f"slowest call {max(latencies):.3f} s during a {count_s:.3f} s count"
    assert len(latencies) >= 5, f"{len(latencies)} calls during a {count_s:.3f} s count"


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
