"""llmrelay: the Python SDK of the llmrelay gateway.

    from llmrelay import Client
    with Client("127.0.0.1:50051") as client:
        print(client.complete([{"role": "user", "content": "Hello"}]).message.content)

An agent: register tools, then let run_tools call the model and the tools until it answers.

    tools = Tools()

    @tools.register
    def weather(city: str) -> str:
        '''The weather in a city now.'''
        return "sunny"

    answer = client.run_tools([{"role": "user", "content": "Weather in Oslo?"}], tools)

The generated messages are in `llmrelay.v1`; errors are `LLMRelayError` subclasses with google.rpc details decoded
(`ErrorDetails`).
"""

from llmrelay._agent import (
    DEFAULT_MAX_STEPS,
    Answer,
    ContextBudgetError,
    Conversation,
    RegisteredTool,
    StepLimitError,
    Tools,
    json_schema_of,
    parameters_schema,
    tool_result,
)
from llmrelay._assemble import StreamAssembler
from llmrelay._channel import BLOCKING_SERVICE_CONFIG, DEFAULT_SERVICE_CONFIG, is_loopback_target, uses_tls
from llmrelay._client import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    USE_CLIENT_DEFAULT,
    AsyncClient,
    Client,
    ImageDetail,
    OnInterrupt,
    Timeout,
    image,
    json_schema,
    tool,
    user_message,
)
from llmrelay._errors import (
    AbortedError,
    DeadlineExceededError,
    ErrorDetails,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    LLMRelayError,
    NotFoundError,
    PermissionDeniedError,
    QuotaViolation,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_details,
    error_from_rpc,
)
from llmrelay._messages import MessageLike, message
from llmrelay._options import CompletionOptions, ReasoningEffort, RunToolsOptions, ToolChoice
from llmrelay._stream import AsyncStream, Stream

__all__ = [
    "BLOCKING_SERVICE_CONFIG",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_SERVICE_CONFIG",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "USE_CLIENT_DEFAULT",
    "AbortedError",
    "Answer",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "CompletionOptions",
    "ContextBudgetError",
    "Conversation",
    "DeadlineExceededError",
    "ErrorDetails",
    "FailedPreconditionError",
    "FieldViolation",
    "ImageDetail",
    "InvalidArgumentError",
    "LLMRelayError",
    "MessageLike",
    "NotFoundError",
    "OnInterrupt",
    "PermissionDeniedError",
    "QuotaViolation",
    "ReasoningEffort",
    "RegisteredTool",
    "ResourceExhaustedError",
    "RunToolsOptions",
    "StepLimitError",
    "Stream",
    "StreamAssembler",
    "Timeout",
    "ToolChoice",
    "Tools",
    "UnauthenticatedError",
    "UnavailableError",
    "error_details",
    "error_from_rpc",
    "image",
    "is_loopback_target",
    "json_schema",
    "json_schema_of",
    "message",
    "parameters_schema",
    "tool",
    "tool_result",
    "user_message",
    "uses_tls",
]
