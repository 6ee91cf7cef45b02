"""An upstream that ignores `stream: true` and answers a StreamComplete whole, as one JSON body: the answer is valid,
so the caller gets it as a stream (one message with its content, then the finish) from that backend, without a
fallback."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llmrelay import v1 as pb
from support import DIALECTS, stream_chat, tool
from upstream import FakeUpstream

WEATHER = tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}})
OSLO = {"name": "weather", "arguments": '{"city": "Oslo"}'}


def answers_whole(primary: FakeUpstream, tool_call: dict[str, str] | None = None) -> None:
    """Makes the primary answer its next request whole, as JSON: "echo: hello gateway", or this tool call."""
    if primary.dialect == "openai":
        primary.inject({"ignore_stream": True} | ({"tool_call": tool_call} if tool_call else {}))
        return
    # The Messages API's answer as its non-streamed form has it (the fake answers a stream request only with events).
    block: dict[str, Any] = {"type": "text", "text": "echo: hello gateway"}
    if tool_call is not None:
        block = {
            "type": "tool_use",
            "id": "toolu_1",
            "name": tool_call["name"],
            "input": json.loads(tool_call["arguments"]),
        }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": primary.models[0],
        "content": [block],
        "stop_reason": "tool_use" if tool_call else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    primary.inject({"body": json.dumps(message), "content_type": "application/json"})


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_whole_answer_to_a_stream_is_relayed_as_one(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    answers_whole(primary)

    chunks = [chunk async for chunk in stub.StreamComplete(stream_chat(), timeout=5)]

    assert primary.chat_requests[0]["stream"] is True
    assert [c.delta.content for c in chunks] == ["echo: hello gateway", ""]
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens > 0 and not last.usage.estimated
    assert last.backend == primary.dialect and [a.outcome for a in last.attempts] == [pb.ATTEMPT_OUTCOME_SUCCEEDED]
    assert local.chat_requests == [], "a valid answer: no fallback"


@pytest.mark.parametrize("primary", DIALECTS, indirect=True)
async def test_a_whole_tool_call_is_relayed_as_one_fragment(
    stub: pb.LLMServiceAsyncStub, primary: FakeUpstream, local: FakeUpstream
) -> None:
    answers_whole(primary, OSLO)

    request = stream_chat("weather in Oslo?", options=pb.CompletionOptions(tools=[WEATHER]))
    chunks = [chunk async for chunk in stub.StreamComplete(request, timeout=5)]

    fragments = [fragment for chunk in chunks for fragment in chunk.delta.tool_calls]
    assert len(fragments) == 1
    call = fragments[0]
    assert (call.index, call.name, json.loads(call.arguments)) == (0, "weather", {"city": "Oslo"}) and call.id
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert chunks[-1].backend == primary.dialect and local.chat_requests == []
