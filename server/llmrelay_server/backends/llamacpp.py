"""What llama.cpp's server adds: its own tokenizer, so that CountTokens is exact for the model it serves; and what it
lacks: a tool choice that names a function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.domain import CompletionRequest, Message, NamedToolChoice, Tool


class LlamaCppProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "llamacpp"

    def _request_body(self, model: str, request: CompletionRequest) -> dict[str, Any]:
        body = super()._request_body(model, request)
        if isinstance(choice := request.options.tool_choice, NamedToolChoice):
            # Its server reads tool_choice as a word alone ("auto", "none", "required"), and takes OpenAI's object for
            # "auto": the function went uncalled at the model's whim. The one function offered, and a call required,
            # is the same choice.
            body["tool_choice"] = "required"
            body["tools"] = [tool for tool in body["tools"] if tool["function"]["name"] == choice.name]
        return body

    async def _server_token_count(self, model: str, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        # Its chat template, then its tokenizer; a build without /apply-template fails here and the gateway estimates.
        templated = await self._post_json("/apply-template", wire.prompt_body(model, messages, tools))
        prompt = templated.get("prompt") if isinstance(templated, dict) else None
        # A list would be tokenized too, as a prompt of texts and token ids: no count of this chat.
        if not isinstance(prompt, str):
            raise ValueError(f"/apply-template answered a prompt of {type(prompt).__name__}, not a text")
        # Special tokens on, as the server adds them when it tokenizes a completion's prompt.
        tokenized = await self._post_json("/tokenize", {"content": prompt, "add_special": True})
        tokens = tokenized.get("tokens") if isinstance(tokenized, dict) else None
        # Only a list's length is a count: a text's or an object's would pass for one.
        if not isinstance(tokens, list):
            raise ValueError(f"/tokenize answered tokens of {type(tokens).__name__}, not a list")
        return len(tokens)
