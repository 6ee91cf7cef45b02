"""What llama.cpp's server adds: its own tokenizer, so that CountTokens is exact for the model it serves."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import httpx2

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import HEALTH_TIMEOUT_S, OpenAICompatibleProvider
from llmrelay_server.domain import CompletionOptions, CompletionRequest, Message, TokenCount, Tool

log = logging.getLogger(__name__)


class LlamaCppProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "llamacpp"

    async def count_tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> TokenCount | None:
        """The prompt as the server itself would count it: its chat template, then its tokenizer.

        None (so the gateway estimates with tiktoken) when the server cannot say, e.g. an older build without
        /apply-template.
        """
        root = self.spec.base_url.removesuffix("/").removesuffix("/v1")
        chat = CompletionRequest(messages=tuple(messages), options=CompletionOptions(tools=tuple(tools)))
        body = wire.request_body(model, chat, max_tokens_field=self.max_tokens_field)
        try:
            templated = await self._http.post(f"{root}/apply-template", json=body, timeout=HEALTH_TIMEOUT_S)
            templated.raise_for_status()
            prompt = templated.json()["prompt"]
            # Special tokens on, as the server adds them when it tokenizes a completion's prompt.
            tokenized = await self._http.post(
                f"{root}/tokenize", json={"content": prompt, "add_special": True}, timeout=HEALTH_TIMEOUT_S
            )
            tokenized.raise_for_status()
            tokens = tokenized.json()["tokens"]
        except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("backend %s could not count tokens (%s); estimating instead", self.spec.name, exc)
            return None
        return TokenCount(tokens=len(tokens), model=model, encoding=f"backend:{self.spec.name}", estimated=False)
