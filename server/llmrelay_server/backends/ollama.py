"""What Ollama adds to the OpenAI-compatible backend: its native version and model-list endpoints for health."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar

import httpx2

from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider
from llmrelay_server.backends.upstream_http import HEALTH_TIMEOUT_S
from llmrelay_server.domain import BackendHealth, ReasoningEffort


class OllamaProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "ollama"
    # Its /v1 takes "high", "medium", "low" and "none", and refuses any other (400 "invalid reasoning value"): the
    # least reasoning it has is "low", as Anthropic's adaptive thinking has none below it either.
    reasoning_efforts: ClassVar[Mapping[ReasoningEffort, str]] = {"minimal": "low"}

    async def health(self) -> BackendHealth:
        # Ollama's native API lives beside /v1: /api/version proves it is Ollama, /api/tags lists pulled models.
        root = self._root_url
        started = time.monotonic()
        try:
            version = await self._http.get(f"{root}/api/version", timeout=HEALTH_TIMEOUT_S)
            version.raise_for_status()
            tags = await self._http.get(f"{root}/api/tags", timeout=HEALTH_TIMEOUT_S)
            tags.raise_for_status()
            models = tuple(str(m["name"]) for m in tags.json().get("models", []))
        except (httpx2.HTTPError, ValueError, KeyError, AttributeError, TypeError) as exc:
            return self._health(started, reachable=False, error=f"{root}: {self._describe(exc)}")
        return self._health(started, reachable=True, models=models)
