"""Helpers shared by the tests: configuration snippets, messages, and reading rich error details."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from upstream import FakeUpstream

GatewayFactory = Callable[..., Awaitable[Gateway]]
"""Starts a gateway from YAML text (see the gateway_factory fixture)."""
StubFactory = Callable[..., Awaitable["pb.LLMServiceAsyncStub"]]  # the async stub type exists in the stubs only
"""Starts a gateway from YAML text and returns a stub over a channel to it (see the stub_for fixture)."""

OPENAI_TEST_KEY = "sk-test-0123456789abcdef"
# Fast policy for tests: one retry with a tiny backoff, a circuit that does not trip across a test's faults.
FAST_ROUTER = """
router:
  retry: {max_retries: 1, initial_backoff_s: 0.01, max_backoff_s: 0.02}
  circuit: {failure_threshold: 50, cooldown_s: 30}
  first_chunk_timeout_s: 1
  stream_idle_timeout_s: 2
"""


def two_backends(primary: FakeUpstream, local: FakeUpstream, extra: str = FAST_ROUTER) -> str:
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{primary.base_url}", model: gpt-test}}
  ollama: {{base_url: "{local.base_url}", model: tiny}}
{extra}"""


def user(text: str = "hi") -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=text)


def chat(text: str = "hello gateway", **fields: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(messages=[user(text)], **fields)


def stream_chat(text: str = "hello gateway", **fields: Any) -> pb.StreamCompleteRequest:
    return pb.StreamCompleteRequest(messages=[user(text)], **fields)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def tool(name: str, parameters: dict[str, Any] | None = None, *, description: str | None = None) -> pb.Tool:
    """A function tool; parameters and description are left unset unless given."""
    function = pb.FunctionDefinition(name=name, description=description)
    if parameters is not None:
        function.parameters.CopyFrom(struct(parameters))
    return pb.Tool(function=function)


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call: ErrorInfo, RetryInfo and BadRequest, by type name."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), f"no status details on {error.code()}: {error.details()}"
    found: dict[str, Any] = {}
    for packed in status_pb2.Status.FromString(raw).details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo, error_details_pb2.BadRequest):
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                found[cls.__name__] = message
    return found
