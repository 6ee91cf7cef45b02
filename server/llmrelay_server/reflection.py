"""Server reflection under both names tools ask for: grpc.reflection.v1 (grpcurl and grpc-java ask for it first) and
grpc.reflection.v1alpha (older tools).

grpcio-reflection ships only v1alpha (grpc/grpc#38576). v1 is the same protocol: the same messages, with the same
field numbers, under another package. So one servicer answers both: the v1 method decodes its requests as the
v1alpha messages they are on the wire, and the v1 file's descriptor (v1alpha's, renamed) joins the default pool, so
that reflection describes the v1 service as it does every other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from llmrelay_server.decoding import GenericOnly
from llmrelay_server.domain import ShuttingDownError
from llmrelay_server.lasting import LastingCalls
from llmrelay_server.status import abort

V1_SERVICE_NAME: Final = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: Final[str] = reflection.SERVICE_NAME
_V1_PACKAGE: Final = "grpc.reflection.v1"
_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"


def enable_reflection(
    services: Sequence[str], server: grpc.aio.Server, max_request_bytes: int | None = None
) -> ReflectionServicer:
    """Serves reflection v1 and v1alpha on `server`, listing `services` and the two reflection services, their
    requests over `max_request_bytes` refused (`GenericOnly`); the servicer returned ends their open streams at a
    shutdown (`end_streams`)."""
    _add_v1_file(descriptor_pool.Default())
    servicer = ReflectionServicer((*services, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME))
    registering = GenericOnly(server, max_request_bytes)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, registering)
    v1_method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    registering.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_method}),)
    )
    return servicer


class ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # grpcio-reflection: untyped
    """grpcio-reflection's servicer, which also finds the file of a method ("llmrelay.v1.LLMService.Complete", as
    `grpcurl describe` asks, and a Go server answers): the default pool finds services and messages by name, not a
    method, and the method was "not found"; and whose streams a shutdown can end (`end_streams`)."""

    def __init__(self, service_names: Sequence[str]) -> None:
        super().__init__(service_names)
        self._streams = LastingCalls()

    async def ServerReflectionInfo(
        self,
        requests: AsyncIterator[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        # Come in after `end_streams` (before the server's stop closed the door), or ended by it: the caller is told
        # why, and to go to another instance.
        answered = False
        if not self._streams.ended:
            with self._streams.held():
                async for response in super().ServerReflectionInfo(requests, context):
                    yield response
                answered = True
        if not answered:
            await abort(context, "ServerReflectionInfo", ShuttingDownError())

    def end_streams(self) -> None:
        """Ends every reflection stream with SHUTTING_DOWN: a tool (grpcui, Postman, grpc-go's reflection client)
        keeps one open, idle, until it leaves, and the server's stop would otherwise wait for it the whole grace
        period, as for a model call."""
        self._streams.end()

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            with contextlib.suppress(KeyError):
                if method in self._pool.FindServiceByName(service).methods_by_name:
                    fully_qualified_name = service
        return super()._file_containing_symbol(request, fully_qualified_name)


def _add_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """grpc/reflection/v1/reflection.proto, made from v1alpha's descriptor (once a process: gateways share the pool)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    v1alpha_package = reflection_pb2.DESCRIPTOR.package
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = _V1_FILE, _V1_PACKAGE
    file.options.Clear()  # v1's own options, as its .proto declares them
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    file.options.java_multiple_files = True
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_outer_classname = "ServerReflectionProto"

    def renamed(type_name: str) -> str:
        return type_name.replace(f".{v1alpha_package}.", f".{_V1_PACKAGE}.", 1)

    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages' and enums' fields; setting it on a scalar's would be invalid
                field.type_name = renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    pool.AddSerializedFile(file.SerializeToString())
