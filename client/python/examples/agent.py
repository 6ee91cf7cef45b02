"""A small agent with two tools, printing the answer as it comes.

Run it against `make demo`'s gateway (or any gateway):

    make demo                                  # in one terminal
    .venv/bin/python client/python/examples/agent.py ["a question"] [--target 127.0.0.1:50051]

The demo's model has random weights: it will most likely answer in random words without calling a tool, and the
agent prints that answer all the same. A real model calls `weather` and `clock`, reads their results, and answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llmrelay import DEFAULT_TARGET, Client, Conversation, LLMRelayError, StepLimitError, Tools, message
from llmrelay import v1 as pb

tools = Tools()


@tools.register
def weather(city: Annotated[str, "the city's name"], unit: Literal["c", "f"] = "c") -> str:
    """The weather in a city now."""
    # A stand-in for a weather service: the same made-up weather everywhere.
    return f"sunny, {18 if unit == 'c' else 64} degrees {unit.upper()} in {city}"


@tools.register
def clock(zone: Annotated[str, "an IANA time zone, e.g. Europe/Oslo"] = "UTC") -> str:
    """The date and time now in a time zone."""
    try:
        return datetime.now(ZoneInfo(zone)).isoformat(timespec="minutes")
    except ZoneInfoNotFoundError:
        raise ValueError(f"unknown time zone {zone!r}") from None  # the model reads this as the tool's result


def print_as_it_comes(chunk: pb.StreamCompleteResponse) -> None:
    if chunk.HasField("restart"):  # the gateway started the answer over on another backend
        print("\n[restarted]", flush=True)
    for call in chunk.delta.tool_calls:
        if call.name:
            print(f"\n[calls {call.name}]", end="", flush=True)
    print(chunk.delta.content, end="", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("question", nargs="?", default="What is the weather in Oslo, and what time is it there?")
    parser.add_argument("--target", default=os.environ.get("LLMRELAY_TARGET", DEFAULT_TARGET))
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args()

    conversation = Conversation(
        [
            message("system", "Answer briefly. Use the tools for the weather and the time."),
            message("user", args.question),
        ],
        budget_tokens=2000,  # the demo model's context is small: the oldest turns go first past this
    )
    try:
        with Client(args.target) as client:
            answer = client.run_tools(
                conversation, tools, max_steps=4, on_delta=print_as_it_comes, max_tokens=args.max_tokens
            )
    except StepLimitError as exc:
        sys.exit(f"\nagent: {exc}")
    except LLMRelayError as exc:
        sys.exit(f"\nagent: {exc} (is a gateway listening on {args.target}? `make demo` starts one)")
    usage = answer.usage
    print(f"\n[{answer.backend}, {answer.steps} call(s), {usage.prompt_tokens}+{usage.completion_tokens} tokens]")


if __name__ == "__main__":
    main()
