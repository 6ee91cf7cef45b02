"""What vLLM's server adds: a /tokenize endpoint that applies the model's chat template, so CountTokens is exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.domain import Message, Tool


class VllmProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "vllm"

    async def _server_token_count(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        # The generation prompt is part of what a completion's prompt_tokens counts; vLLM adds it by default, but an
        # older default should not change our figure.
        body = wire.prompt_body(model, messages, tools) | {"add_generation_prompt": True}
        answer = await self._post_json("/tokenize", body)
        count = answer["count"]
        if not wire.is_count(count):
            # A number as it came; anything else by its type (the repr of JSON nested past Python's stack raises).
            said = repr(count) if isinstance(count, int | float) else type(count).__name__
            raise ValueError(f"/tokenize answered a count of {said}")
        return count
