"""The upstream kinds the gateway speaks to, one module each, and the factory that builds them from specs."""

from __future__ import annotations

from functools import partial

from llmrelay_server.backends.llamacpp import LlamaCppProvider
from llmrelay_server.backends.ollama import OllamaProvider
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider, OpenAIProvider
from llmrelay_server.backends.vllm import VllmProvider
from llmrelay_server.domain import BackendSpec, LLMProvider, ProviderFactory
from llmrelay_server.tokens import TokenCounter


def provider_factory(counter: TokenCounter) -> ProviderFactory:
    kinds = (OpenAIProvider, OllamaProvider, LlamaCppProvider, VllmProvider, OpenAICompatibleProvider)
    constructors = {cls.kind: partial(cls, counter=counter) for cls in kinds}
    return ProviderFactory({**constructors, "anthropic": partial(_anthropic, counter=counter)})


def _anthropic(spec: BackendSpec, *, counter: TokenCounter) -> LLMProvider:
    # Imported when a backend needs it: the anthropic SDK adds about a second and tens of MiB to every start.
    from llmrelay_server.backends.anthropic import AnthropicProvider

    return AnthropicProvider(spec, counter=counter)
