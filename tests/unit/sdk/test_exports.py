"""The SDK's public face: __all__ pinned, and the typed completion options matching the contract's message."""

from __future__ import annotations

import llmrelay
from llmrelay import CompletionOptions, RunToolsOptions
from llmrelay import v1 as pb


def test_the_public_names() -> None:
    assert sorted(llmrelay.__all__) == sorted(
        [
            "BLOCKING_SERVICE_CONFIG", "DEFAULT_MAX_STEPS", "DEFAULT_SERVICE_CONFIG", "DEFAULT_TARGET",
            "DEFAULT_TIMEOUT_S", "USE_CLIENT_DEFAULT",
            "AbortedError", "Answer", "AsyncClient", "AsyncStream", "Client", "CompletionOptions", "ContextBudgetError",
            "Conversation", "DeadlineExceededError", "ErrorDetails", "FailedPreconditionError", "FieldViolation",
            "ImageDetail", "InvalidArgumentError", "LLMRelayError", "MessageLike", "NotFoundError", "OnInterrupt",
            "PermissionDeniedError", "QuotaViolation", "ReasoningEffort", "RegisteredTool", "ResourceExhaustedError",
            "RunToolsOptions", "StepLimitError", "Stream", "StreamAssembler", "Timeout", "ToolChoice", "Tools",
            "UnauthenticatedError", "UnavailableError", "error_details", "error_from_rpc", "image",
            "is_loopback_target", "json_schema", "json_schema_of", "message", "parameters_schema", "tool",
            "tool_result", "user_message", "uses_tls",
        ]
    )  # fmt: skip
    assert all(hasattr(llmrelay, name) for name in llmrelay.__all__)


def test_every_field_of_the_contracts_options_is_a_typed_keyword() -> None:
    fields = {f.name for f in pb.CompletionOptions.DESCRIPTOR.fields}
    assert set(CompletionOptions.__optional_keys__) == fields, "a field added to the contract needs its keyword"
    assert set(RunToolsOptions.__optional_keys__) == fields - {"tools"}
