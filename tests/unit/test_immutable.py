"""The domain's value types (`domain.immutable`) are immutable by the type checker's word, not by a run-time guard
(which costs about 1,500 instructions a field): mypy must refuse an assignment to a field, and at run time they
must still compare, hash and replace as frozen dataclasses do."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from llmrelay_server.domain import (
    Attempt,
    AttemptOutcome,
    CompletionChunk,
    CompletionResponse,
    Cost,
    FinishReason,
    Message,
    Role,
    StreamRestart,
    TokenUsage,
    ToolCallDelta,
)
from mypy import api

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_refuses_to_assign_a_field_of_a_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(ROOT / "server"))
    checked = tmp_path / "assigns.py"
    checked.write_text(
        "from llmrelay_server.domain import TokenUsage\n"
        "usage = TokenUsage(prompt_tokens=1, completion_tokens=2)\n"
        "usage.prompt_tokens = 3\n"
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--config-file", "", "--python-version", "3.11", str(checked)]
    )
    assert status == 1 and 'Property "prompt_tokens" defined in "TokenUsage" is read-only' in out, out


def test_a_value_compares_hashes_and_replaces_by_its_fields() -> None:
    usage = TokenUsage(prompt_tokens=1, completion_tokens=2, cost=Cost(usd_micros=5))
    same = TokenUsage(prompt_tokens=1, completion_tokens=2, cost=Cost(usd_micros=5))
    assert usage == same and hash(usage) == hash(same) and len({usage, same}) == 1
    changed = dataclasses.replace(usage, completion_tokens=3)
    assert changed != usage and changed.completion_tokens == 3 and usage.completion_tokens == 2
    assert not hasattr(usage, "__dict__")  # slots: no per-instance dictionary


def _every_field_set(value_type: type[Any]) -> Any:
    """A value of `value_type` whose every field differs from its default (a field added later included)."""
    samples: dict[str, Any] = {
        "prompt_tokens": 1, "completion_tokens": 2, "estimated": True, "reasoning_tokens": 3,
        "cached_prompt_tokens": 4, "cache_write_prompt_tokens": 9, "cost": Cost(usd_micros=5), "id": "id-1",
        "backend": "b", "model": "m",
        "message": Message(role=Role.ASSISTANT, content="hi"), "finish_reason": FinishReason.LENGTH,
        "usage": TokenUsage(prompt_tokens=6, completion_tokens=7),
        "attempts": (Attempt(backend="b", model="m", outcome=AttemptOutcome.SUCCEEDED, duration_s=0.5),),
        "content": "text", "reasoning": "thought", "tool_calls": (ToolCallDelta(index=0, arguments="{"),),
        "restart": StreamRestart("broke", "b", (), TokenUsage(prompt_tokens=1, completion_tokens=1)),
        "reasoning_signature": "sig", "outcome": AttemptOutcome.INTERRUPTED, "duration_s": 0.25,
        "upstream_status": 502, "error": "cut", "started_at": 1700000000.0, "quoted": "cut",
        "prompt_usage": TokenUsage(prompt_tokens=8, completion_tokens=0, cached_prompt_tokens=2),
    }  # fmt: skip
    missing = [f.name for f in dataclasses.fields(value_type) if f.name not in samples]
    assert not missing, (
        f"give {value_type.__name__}'s new fields a sample here, and copy them in its shortcut: {missing}"
    )
    return value_type(**{f.name: samples[f.name] for f in dataclasses.fields(value_type)})


def test_the_shortcuts_for_replace_copy_every_field() -> None:
    usage = _every_field_set(TokenUsage)
    cost = Cost(usd_micros=9)
    assert usage.with_cost(cost) == dataclasses.replace(usage, cost=cost)
    response = _every_field_set(CompletionResponse)
    settled_usage, attempts = TokenUsage(prompt_tokens=8, completion_tokens=9), ()
    assert response.settled(settled_usage, attempts) == dataclasses.replace(
        response, usage=settled_usage, attempts=attempts
    )
    chunk = _every_field_set(CompletionChunk)
    assert chunk.settled(settled_usage, attempts) == dataclasses.replace(chunk, usage=settled_usage, attempts=attempts)
    attempt = _every_field_set(Attempt)
    # The upstream's words are the error's: a new error brings its own, or none.
    assert attempt.ended(AttemptOutcome.SUCCEEDED, 2.0, None, "") == dataclasses.replace(
        attempt, outcome=AttemptOutcome.SUCCEEDED, duration_s=2.0, upstream_status=None, error="", quoted=""
    )
