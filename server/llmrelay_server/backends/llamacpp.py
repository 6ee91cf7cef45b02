"""What llama.cpp's server adds: its own tokenizer, so that CountTokens is exact for the model it serves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.domain import Message, Tool


class LlamaCppProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "llamacpp"

    async def _server_token_count(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        # Its chat template, then its tokenizer; a build without /apply-template fails here and the gateway estimates.
        templated = await self._post_json("/apply-template", wire.prompt_body(model, messages, tools))
        # Special tokens on, as the server adds them when it tokenizes a completion's prompt.
        tokenized = await self._post_json("/tokenize", {"content": templated["prompt"], "add_special": True})
        return len(tokenized["tokens"])
