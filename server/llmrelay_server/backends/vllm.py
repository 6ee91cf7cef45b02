"""What vLLM's server adds: a /tokenize endpoint that applies the model's chat template, so CountTokens is exact; and
a prefill (a chat that ends in an assistant message) continued, which its chat template would otherwise close to
begin a new turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.domain import CompletionRequest, Message, ReasoningEffort, Role, Tool

_CONTINUED: Final = {"continue_final_message": True, "add_generation_prompt": False}
"""vLLM's switches for a prefill: the last message continued, no new turn begun (its defaults are the other way)."""
_NEW_TURN: Final = {"add_generation_prompt": True}


class VllmProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "vllm"
    # Its request takes "low", "medium" and "high" (a model's renderer may take no other: gpt-oss's), and refuses
    # "minimal" (400, literal_error): the least it has is "low", as for Ollama.
    reasoning_efforts: ClassVar[Mapping[ReasoningEffort, str]] = {"minimal": "low"}

    def _request_body(self, model: str, request: CompletionRequest) -> dict[str, Any]:
        body = super()._request_body(model, request)
        if _prefilled(request.messages):
            body |= _CONTINUED
        return body

    async def _server_token_count(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        # The generation prompt is part of what a completion's prompt_tokens counts; vLLM adds it by default, but an
        # older default should not change our figure. A prefill is counted as its completion sends it: continued.
        body = wire.prompt_body(model, messages, tools) | (_CONTINUED if _prefilled(messages) else _NEW_TURN)
        answer = await self._post_json("/tokenize", body)
        count = answer["count"]
        if not wire.is_count(count):
            # A number as it came; anything else by its type (the repr of JSON nested past Python's stack raises).
            said = repr(count) if isinstance(count, int | float) else type(count).__name__
            raise ValueError(f"/tokenize answered a count of {said}")
        return count


def _prefilled(messages: Sequence[Message]) -> bool:
    return bool(messages) and messages[-1].role is Role.ASSISTANT
