"""llmrelay: the Python SDK of the llmrelay gateway.

    from llmrelay import Client
    with Client("127.0.0.1:50051") as client:
        print(client.complete([{"role": "user", "content": "Hello"}]).message.content)

The generated messages are in `llmrelay.v1`; errors are `LLMRelayError` subclasses with google.rpc details decoded.
"""

from llmrelay._assemble import StreamAssembler
from llmrelay._client import (
    DEFAULT_TARGET,
    AsyncClient,
    Client,
    ImageDetail,
    OnInterrupt,
    image,
    json_schema,
    message,
    tool,
    user_message,
)
from llmrelay._errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    LLMRelayError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)

__all__ = [
    "DEFAULT_TARGET",
    "AbortedError",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "ImageDetail",
    "InvalidArgumentError",
    "LLMRelayError",
    "NotFoundError",
    "OnInterrupt",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "StreamAssembler",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "image",
    "json_schema",
    "message",
    "tool",
    "user_message",
]
