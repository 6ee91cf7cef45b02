"""One interceptor has every observer (metrics, the call log, traces) watch each call: each hears the end and the
number of messages sent, and every message when it asks to, in order; one that fails keeps neither the others nor the
caller from what they are owed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from llmrelay_server.observing import Context, Kind, Observer, ObservingInterceptor, Start


class _Recorder(Observer):
    def __init__(self, name: str, heard: list[str], fail_at_end: bool = False, *, each_message: bool = True) -> None:
        self._name, self._heard, self._fail_at_end = name, heard, fail_at_end
        self._each_message = each_message

    def observe(self, method: str, kind: Kind) -> Start:
        return lambda request, context: _Heard(self._name, self._heard, self._fail_at_end, self._each_message)


class _FailingToStart(Observer):
    def observe(self, method: str, kind: Kind) -> Start:
        def start(request: Any, context: Context) -> _Heard:
            raise RuntimeError("an observer's own bug")

        return start


class _Heard:
    def __init__(self, name: str, heard: list[str], fail_at_end: bool, each_message: bool) -> None:
        self._name, self._heard, self._fail_at_end = name, heard, fail_at_end
        # Without each message, only their number at the end.
        self.sent: Callable[[Any], None] | None = self._sent if each_message else None
        heard.append(f"{name} start")

    def _sent(self, message: Any) -> None:
        self._heard.append(f"{self._name} sent {message.decode()}")

    def end(self, code: grpc.StatusCode, messages: int) -> None:
        self._heard.append(f"{self._name} end {code.name} after {messages}")
        if self._fail_at_end:
            raise RuntimeError("an observer's own bug")


async def _say(request: bytes, context: Context) -> bytes:
    return b"said " + request


async def _count(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for n in range(2):
        yield str(n).encode()


def _server(observers: Sequence[Observer]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[ObservingInterceptor(observers)])
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Observed", handlers),))
    return server, server.add_insecure_port("127.0.0.1:0")


async def test_every_observer_hears_each_call_and_a_failing_one_harms_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[str] = []
    recorders = [
        _Recorder("outer", heard, fail_at_end=True),
        _Recorder("counting", heard, each_message=False),
        _Recorder("inner", heard),
    ]
    server, port = _server(recorders)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with caplog.at_level(logging.ERROR, logger="llmrelay_server.observing"):
                say: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Observed/Say")
                assert await say(b"hi") == b"said hi"
                assert heard == ["outer start", "counting start", "inner start", "outer sent said hi",
                                 "inner sent said hi", "inner end OK after 1", "counting end OK after 1",
                                 "outer end OK after 1"]  # fmt: skip
                heard.clear()
                count: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream("/test.Observed/Count")
                assert [chunk async for chunk in count(b"")] == [b"0", b"1"]
                assert heard == ["outer start", "counting start", "inner start", "outer sent 0", "inner sent 0",
                                 "outer sent 1", "inner sent 1", "inner end OK after 2", "counting end OK after 2",
                                 "outer end OK after 2"]  # fmt: skip
        failures = [record for record in caplog.records if record.getMessage() == "observing the end of a call failed"]
        assert len(failures) == 2 and all(record.exc_info for record in failures)
    finally:
        await server.stop(None)


async def test_an_observer_that_fails_to_start_leaves_none_started_before_it_unended() -> None:
    heard: list[str] = []
    server, port = _server([_Recorder("outer", heard), _FailingToStart(), _Recorder("inner", heard)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            count: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream("/test.Observed/Count")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                _ = [chunk async for chunk in count(b"")]
            assert failed.value.code() is grpc.StatusCode.UNKNOWN
        assert heard == ["outer start", "outer end UNKNOWN after 0"]
    finally:
        await server.stop(None)
