"""Helpers shared by the tests: configuration snippets, messages, reading rich error details, background work that a
failed test does not leave running, and the gateway as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.server
import socket
import struct as binary
import threading
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from harness import GatewayProcess, clean_env, spawn_gateway
from llmrelay import error_details
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from upstream import FakeUpstream

T = TypeVar("T")

GatewayFactory = Callable[..., Awaitable[Gateway]]
"""Starts a gateway from YAML text (see the gateway_factory fixture)."""
StubFactory = Callable[..., Awaitable["pb.LLMServiceAsyncStub"]]  # the async stub type exists in the stubs only
"""Starts a gateway from YAML text and returns a stub over a channel to it (see the stub_for fixture)."""

OPENAI_TEST_KEY = "sk-test-0123456789abcdef"
ANTHROPIC_TEST_KEY = "sk-ant-test-0123456789abcdef"
DIALECTS = ("openai", "anthropic")
"""The APIs a first backend may speak: parametrize `primary` (indirect) with them to run a test against each."""
# Fast policy for tests: one retry with a tiny backoff, a circuit that does not trip across a test's faults.
FAST_ROUTER = """
router:
  retry: {max_retries: 1, initial_backoff_s: 0.01, max_backoff_s: 0.02}
  circuit: {failure_threshold: 50, cooldown_s: 30}
  first_chunk_timeout_s: 1
  stream_idle_timeout_s: 2
"""


def two_backends(primary: FakeUpstream, local: FakeUpstream, extra: str = FAST_ROUTER) -> str:
    """The primary as the backend of its dialect ("openai" or "anthropic", named so), with its first model; then
    Ollama."""
    key = ANTHROPIC_TEST_KEY if primary.dialect == "anthropic" else OPENAI_TEST_KEY
    return f"""
llm:
  {primary.dialect}: {{api_key: "{key}", base_url: "{primary.base_url}", model: {primary.models[0]}}}
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


def png(width: int, height: int) -> bytes:
    """A valid PNG of this size: black, 8-bit greyscale (a few hundred bytes, however large)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return binary.pack(">I", len(data)) + kind + data + binary.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes(width)) * height  # each row: filter type 0, then its pixels
    header = binary.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def jpeg(width: int, height: int, *, frame: int = 0xC0) -> bytes:
    """A JPEG's start: SOI, a JFIF APP0 segment, a fill byte, then the frame header with the size."""
    app0 = b"\xff\xe0" + binary.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff" + bytes([frame]) + binary.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + b"\xff" + sof


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, by type name (ErrorInfo, RetryInfo, BadRequest, QuotaFailure,
    AttemptHistory), as the SDK's decoder reads them."""
    decoded = error_details(error)
    assert decoded is not None, f"no status details on {error.code()}: {error.details()}"
    return {type(message).__name__: message for message in decoded.messages()}


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """The work as a task for the test to await; cancelled if the test fails first. The tests share one event loop,
    so a load left running by a failed test would go on slowing every test after it."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.contextmanager
def kept_by_the_gateway(min_bytes: int) -> Iterator[list[str]]:
    """Fills the list with what the gateway's code (server/llmrelay_server) allocated inside the block and still holds
    at its end, by the innermost line of it that allocated, where that is `min_bytes` or more: "SIZE bytes at
    FILE:LINE". The garbage collector is off inside, so that what only a cycle holds counts: a busy gateway may run no
    full collection for many calls, and memory held that way grows with every call meanwhile."""
    kept: list[str] = []
    gc.collect()
    gc.disable()
    tracemalloc.start(64)
    try:
        yield kept
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*/llmrelay_server/*", all_frames=True)]
        )
        sizes: dict[tracemalloc.Frame, int] = {}
        for trace in snapshot.traces:
            where = [frame for frame in trace.traceback if "/llmrelay_server/" in frame.filename][-1]
            sizes[where] = sizes.get(where, 0) + trace.size
        kept += [f"{size} bytes at {where}" for where, size in sizes.items() if size >= min_bytes]
    finally:
        tracemalloc.stop()
        gc.enable()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Polls until condition() holds, or fails with TimeoutError: for state with no event to wait on (files, a
    database, another process)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def finished(process: asyncio.subprocess.Process, within_s: float = 20) -> tuple[bytes, bytes]:
    """What a process wrote to its pipes, once it has exited; killed (and the test failed) past `within_s`, rather
    than left running after the test."""
    try:
        return await asyncio.wait_for(process.communicate(), within_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def page_served(body: bytes) -> contextlib.AbstractContextManager[str]:
    """The URL of an HTTP page on loopback that answers every GET with `body` (a /metrics page, or another server's
    page mistaken for one), served from a thread until the block ends."""

    def page(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return http_served(page)


@contextlib.contextmanager
def http_served(write: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """The URL of a /metrics page on loopback whose every GET `write` answers (status line, headers, body), served
    from a thread until the block ends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):  # the client gone
                write(self)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test's output is for its failures

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
        finally:
            server.shutdown()


def children(pid: int) -> list[int]:
    """A process's children (a supervisor's workers)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def worker_index(pid: int) -> int | None:
    """Which worker the process is, from its command line; None once it has exited (or before its exec)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except FileNotFoundError:
        return None
    return int(argv[argv.index("--worker") + 1]) if "--worker" in argv else None


async def call_on_new_connections(target: str, calls: int) -> list[pb.CompleteResponse]:
    """Each call on a connection of its own: the kernel spreads connections, not calls, over the workers (and
    channels to one target share their connection unless told not to)."""

    async def one(index: int) -> pb.CompleteResponse:
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            return await pb.LLMServiceStub(channel).Complete(
                chat(f"call {index}"), timeout=10, metadata=[("x-request-id", f"w-{index}")]
            )

    return list(await asyncio.gather(*(one(index) for index in range(calls))))


async def served_by_openai(stub: pb.LLMServiceAsyncStub, upstream: FakeUpstream) -> None:
    """Completions, streams and the Health probe all answered by the `openai` backend, `upstream`, its only one."""
    for _ in range(3):
        assert (await stub.Complete(chat(), timeout=5)).backend == "openai"
        chunks = await read_all(stub.StreamComplete(stream_chat("one two"), timeout=5))
        assert "".join(c.delta.content for c in chunks) == "echo: one two"
    report = await stub.Health(pb.HealthRequest(probe=True), timeout=5)
    [openai] = [b for b in report.backends if b.name == "openai"]
    assert (openai.reachable, list(openai.models)) == (True, [upstream.models[0]])
    assert len(upstream.chat_requests) == 6


async def read_all(stream: Any) -> list[pb.StreamCompleteResponse]:
    """Reads a stream to its end with read() (a call cannot mix read() and async iteration)."""
    chunks = []
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


async def start_server(
    config: Path,
    local: FakeUpstream,
    *flags: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    interruptible: bool = True,
) -> GatewayProcess:
    """`llmrelay-server` on a free port (or `port`), configured by `config`, more `flags`, and the environment of a
    loopback Ollama alone, more `env` (TMPDIR, say); `interruptible` as spawn_gateway's."""
    local_env = clean_env(OLLAMA_HOST=local.base_url.removesuffix("/v1"), LLMRELAY_OLLAMA_MODEL="tiny", **(env or {}))
    return await spawn_gateway(config, *flags, port=port, env=local_env, interruptible=interruptible)


def call_with_raw_path(port: int, path: bytes) -> None:
    """A gRPC call whose HTTP/2 `:path` is `path` as it is (bytes no client library sends: not UTF-8, say), on a
    connection of its own, made with h2 (the HTTP/2 library of Python's ecosystem); returns when the gateway answers
    or closes the connection, or after 5 s."""
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", b"127.0.0.1"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        connection.send_data(stream, b"\0\0\0\0\0", end_stream=True)  # an empty message
        sock.sendall(connection.data_to_send())
        ended = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):  # the connection closed under it
            while data := sock.recv(65536):
                if any(isinstance(event, ended) for event in connection.receive_data(data)):
                    return
                sock.sendall(connection.data_to_send())


class RequestHeldBack:
    """A unary gRPC call on an HTTP/2 connection of its own (h2), whose headers go at once and whose request goes only
    when `send` is called: a slow upload as the gateway sees it, its interceptors run on the headers alone. Blocking
    socket calls: for a thread (`asyncio.to_thread`) while the gateway serves."""

    def __init__(self, port: int, method: str, metadata: Sequence[tuple[str, str]]) -> None:
        self._connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._connection.initiate_connection()
        self._stream = self._connection.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "127.0.0.1")]
        headers += [("content-type", "application/grpc"), ("te", "trailers"), *metadata]
        self._connection.send_headers(self._stream, headers)
        self._socket.sendall(self._connection.data_to_send())

    def send(self, request: Message) -> None:
        body = request.SerializeToString()
        self._connection.send_data(self._stream, b"\0" + binary.pack(">I", len(body)) + body, end_stream=True)
        self._socket.sendall(self._connection.data_to_send())

    def answer(self) -> tuple[int, str, bytes]:
        """The call's status code, its message, and the answer's bytes (none for a failure); closes the connection."""
        answer, trailers = b"", dict[str, str]()
        with self._socket:
            while data := self._socket.recv(65536):
                for event in self._connection.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        answer += event.data
                        self._connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        trailers.update((bytes(name).decode(), bytes(value).decode()) for name, value in event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        return int(trailers["grpc-status"]), trailers.get("grpc-message", ""), answer[5:]
                self._socket.sendall(self._connection.data_to_send())
        raise AssertionError("the connection closed before the call ended")
