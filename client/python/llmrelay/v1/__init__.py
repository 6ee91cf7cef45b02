"""Generated stubs of the llmrelay.v1 contract. DO NOT EDIT: run `make proto`."""

from typing import TYPE_CHECKING

from llmrelay.v1.llmrelay_pb2 import *  # noqa: F403
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceServicer as LLMServiceServicer
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceStub as LLMServiceStub
from llmrelay.v1.llmrelay_pb2_grpc import add_LLMServiceServicer_to_server as add_LLMServiceServicer_to_server

if TYPE_CHECKING:
    # The stub's type on a grpc.aio channel, for annotations only.
    from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceAsyncStub as LLMServiceAsyncStub
