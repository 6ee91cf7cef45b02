"""CPU cost of TokenCounter.count_chat on a ~4,000-token chat, against encoding the same texts alone.

Two cases: a chat seen for the first time (no message counted before), and an agent's next step (the same history,
counted at the previous step, plus one new user message).

Run: python bench/bench_tokens.py [iterations]
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence

from llmrelay_server.domain import Message, Role, Tool, ToolCall
from llmrelay_server.tokens import TokenCounter, encoding_for_model

_TARGET_TOKENS = 4_000
_MODELS = ("gpt-4o", "gpt-4")
_ROW = "{:<8} {:<12} {:>8} {:>7} {:>12} {:>12} {:>10}"

_PROSE = (
    "The gateway receives a chat from an agent, picks a backend that serves the model, and forwards the request. "
    "When the backend fails, it retries with backoff, then falls back to the next one in the chain. "
    "Every answer carries its usage; when the upstream does not report it, the gateway counts the tokens itself. "
)
_WEATHER_TOOL = Tool(
    name="get_current_weather",
    description="Get the current weather in a given location",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
)


def build_chat(counter: TokenCounter, model: str) -> list[Message]:
    """A system prompt, then user and assistant turns (one with a tool call) until the chat holds ~4,000 tokens."""
    messages = [Message(Role.SYSTEM, "You are a careful assistant. " + _PROSE)]
    turn = 0
    while counter.count_chat(model, messages, [_WEATHER_TOOL]).tokens < _TARGET_TOKENS:
        turn += 1
        messages.append(Message(Role.USER, f"Question {turn}: {_PROSE * 2}", name="agent"))
        if turn % 5 == 0:
            call = ToolCall(id=f"call_{turn}", name="get_current_weather", arguments='{"location": "Paris"}')
            messages.append(Message(Role.ASSISTANT, "", tool_calls=(call,)))
            messages.append(Message(Role.TOOL, '{"temperature": 21, "unit": "celsius"}', tool_call_id=call.id))
        messages.append(Message(Role.ASSISTANT, f"Answer {turn}: {_PROSE * 2}"))
    return messages


def mean_cpu_seconds(work: Callable[[], object], iterations: int) -> float:
    started = time.process_time()
    for _ in range(iterations):
        work()
    return (time.process_time() - started) / iterations


def _message_texts(message: Message) -> list[str]:
    calls = [text for call in message.tool_calls for text in (call.id, call.name, call.arguments)]
    return [message.role.value, message.content, message.name or "", message.tool_call_id or "", *calls]


def agent_steps(counter: TokenCounter, model: str, history: Sequence[Message], steps: int) -> Callable[[], None]:
    """Counting the history with a new user message each time, as an agent's next steps are: one message counted again
    and again is found in the cache, and measured a third less than a step costs."""
    chats = iter([[*history, Message(Role.USER, f"And now ({step})? {_PROSE}")] for step in range(steps)])

    def work() -> None:
        counter.count_chat(model, next(chats), [_WEATHER_TOOL])

    return work


def encode_texts(counter: TokenCounter, model: str, messages: Sequence[Message]) -> Callable[[], None]:
    """Encoding every text of the messages and nothing else: the floor count_chat's overhead is measured against."""
    encode = counter._encoding(encoding_for_model(model)[0]).encode_ordinary
    texts = [text for message in messages for text in _message_texts(message) if text]

    def work() -> None:
        for text in texts:
            encode(text)

    return work


def main(iterations: int) -> None:
    print(f"count_chat, mean CPU time over {iterations} iterations (time.process_time)")
    print(_ROW.format("model", "encoding", "messages", "tokens", "first time", "agent step", "encode only"))
    for model in _MODELS:
        uncached = TokenCounter(message_cache_size=0)
        messages = build_chat(uncached, model)
        count = uncached.count_chat(model, messages, [_WEATHER_TOOL])
        first_time = mean_cpu_seconds(
            functools.partial(uncached.count_chat, model, messages, [_WEATHER_TOOL]), iterations
        )
        cached = TokenCounter()
        cached.count_chat(model, messages, [_WEATHER_TOOL])
        agent_step = mean_cpu_seconds(agent_steps(cached, model, messages, iterations), iterations)
        encoding = mean_cpu_seconds(encode_texts(uncached, model, messages), iterations)
        print(
            _ROW.format(
                model,
                count.encoding,
                len(messages),
                count.tokens,
                f"{first_time * 1e6:.1f} µs",
                f"{agent_step * 1e6:.1f} µs",
                f"{encoding * 1e6:.1f} µs",
            )
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
