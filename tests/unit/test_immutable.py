"""The domain's value types (`domain.immutable`) are immutable by the type checker's word, not by a run-time guard
(which costs about 1,500 instructions a field): mypy must refuse an assignment to a field, and at run time they
must still compare, hash and replace as frozen dataclasses do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from llmrelay_server.domain import Cost, TokenUsage
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
