"""What Ollama adds to the OpenAI-compatible backend: its native version and model-list endpoints for health, a
chat's tool calls whose arguments are not a JSON object sent in a form its /v1 takes, and images and tool choices it
cannot take not sent to it."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import httpx2
import openai

from llmrelay_server.backends import wire
from llmrelay_server.backends.openai_compat import OpenAICompatibleProvider, checked
from llmrelay_server.backends.upstream_http import HEALTH_TIMEOUT_S, raise_if_out_of_files
from llmrelay_server.domain import (
    BackendHealth,
    CompletionRequest,
    ImagePart,
    NamedToolChoice,
    ReasoningEffort,
    UpstreamError,
    UpstreamErrorKind,
    read_json,
)

UNPARSED_ARGUMENTS: Final = "unparsed_arguments"
"""The one field of the object a tool call's arguments that are not a JSON object are sent to Ollama as."""
IMAGE_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/webp"})
"""The images Ollama's /v1 reads: their bytes (a data: URL) in these types; a URL it refuses ("image URLs are not
currently supported"), a GIF too ("invalid image input"), each a 400."""


class OllamaProvider(OpenAICompatibleProvider):
    kind: ClassVar[str] = "ollama"
    # Its /v1 takes "high", "medium", "low" and "none", and refuses any other (400 "invalid reasoning value"): the
    # least reasoning it has is "low", as Anthropic's adaptive thinking has none below it either.
    reasoning_efforts: ClassVar[Mapping[ReasoningEffort, str]] = {"minimal": "low"}
    # A generation it stops itself (a model repeating one token past its limit, "token repeat limit reached") ends
    # its /v1 stream after the text with no finish reason and no [DONE], and its unstreamed answer with a null one.
    ends_streams_unfinished: ClassVar[bool] = True

    def _request_body(self, model: str, request: CompletionRequest) -> dict[str, Any]:
        if (problem := _image_refused(request) or _tool_choice_refused(request)) is not None:
            # Sent, an image it refuses was a 400 that ended the call as the caller's mistake, and a tool it must call
            # went uncalled: another backend may take either.
            raise UpstreamError(UpstreamErrorKind.UNSUPPORTED, self._spec.name, f"not sent to Ollama: {problem}")
        body = super()._request_body(model, request)
        # Its /v1 reads neither (it offers the model every tool, each call left to it): a choice of none is kept by
        # offering none; required or a named one (refused above) is another backend's to keep.
        body.pop("parallel_tool_calls", None)
        if body.pop("tool_choice", None) == "none":
            body.pop("tools", None)
        for message in body["messages"]:
            for call in message.get("tool_calls", ()):
                function = call["function"]
                function["arguments"] = _as_object(function["arguments"])
        return body

    async def health(self) -> BackendHealth:
        # Ollama's native API lives beside /v1: /api/version proves it is Ollama, /api/tags lists pulled models. Each
        # answer is read up to MAX_ANSWER_BYTES, whole within HEALTH_TIMEOUT_S (http1.Http1Transport).
        root = self._root_url
        started = time.monotonic()
        try:
            checked(await self._http.get(f"{root}/api/version", timeout=HEALTH_TIMEOUT_S))
            tags = checked(await self._http.get(f"{root}/api/tags", timeout=HEALTH_TIMEOUT_S))
            models = tuple(m["name"] for m in wire.decode_json(tags.content).get("models", []))
            if not all(isinstance(name, str) for name in models):
                raise wire.MalformedAnswerError("/api/tags lists a model whose name is not text")
        except (openai.APIStatusError, httpx2.HTTPError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise_if_out_of_files(exc)
            return self._health(started, reachable=False, error=f"{root}: {self._describe(exc)}")
        return self._health(started, reachable=True, models=models)


def _tool_choice_refused(request: CompletionRequest) -> str | None:
    """Why Ollama's /v1, which has no tool_choice, cannot keep the request's: a tool the model must call."""
    choice = request.options.tool_choice
    if isinstance(choice, NamedToolChoice):
        forced = choice.name
    elif choice == "required":
        forced = "required"
    else:
        return None
    return f"options.tool_choice: Ollama cannot be made to call a tool ({forced})"


def _image_refused(request: CompletionRequest) -> str | None:
    """Why Ollama's /v1 would refuse an image of the request, naming it; None when it takes them all."""
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.parts):
            if not isinstance(part, ImagePart):
                continue
            if part.data is None:
                return f"messages[{i}].parts[{j}].image: Ollama takes an image's bytes, not its URL"
            if part.media_type not in IMAGE_TYPES:
                return f"messages[{i}].parts[{j}].image: Ollama takes PNG, JPEG or WebP, not {part.media_type}"
    return None


def _as_object(arguments: str) -> str:
    """Arguments as Ollama's /v1 takes them: a JSON object's text. It reads them into an object and refuses the whole
    chat otherwise (400 "invalid tool call arguments", saying not which): an agent that answered a model's broken
    arguments with a tool result ("not valid JSON; call it again") could never send its chat again. Other text is
    sent as an object holding it, for the model to read what it wrote (docs/openai-anthropic.md)."""
    try:
        value = read_json(arguments)
    except (ValueError, RecursionError):  # NaN and 1e400 among them: Go's reader refuses them too
        value = None
    if isinstance(value, dict):
        return arguments
    return json.dumps({UNPARSED_ARGUMENTS: arguments}, ensure_ascii=False)
