"""What Client.stream and AsyncClient.stream return: the messages of one StreamComplete call, to iterate, and to
close (cancel) when done with them, by hand or as a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Protocol

from llmrelay import v1 as pb


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class CallHandle:
    """The call a stream's generator made, kept beside the generator so that close() can cancel it while another
    thread or task is inside the generator (reading), where the generator itself cannot be closed. It refers to
    neither the stream nor the generator: a stream nobody refers to is still collected (its call cancelled) at once."""

    __slots__ = ("call", "closed")

    def __init__(self) -> None:
        self.call: _Cancellable | None = None
        self.closed = False
        """Set by close(): the generator's reader then ends quietly, as if the answer had ended."""

    def started(self, call: _Cancellable) -> None:
        """The generator made its call; cancelled at once if close() came first (while the call was being made)."""
        self.call = call
        if self.closed:
            call.cancel()

    def close(self) -> None:
        self.closed = True
        if self.call is not None:
            self.call.cancel()


class Stream(Iterator[pb.StreamCompleteResponse]):
    """The answer's messages as they come; the call starts when the first one is asked for.

    A loop over `client.stream(...)` itself cancels the call when it ends, a `break` included. A stream kept in a
    variable is cancelled only by close(), the end of a `with` block, or its garbage collection: until then the
    gateway goes on generating (and billing) an answer nobody reads. close() may come from another thread than the
    one reading (a stop button, a watchdog): the reader's loop then ends, as at the end of the answer.

    >>> with client.stream(messages) as stream:
    ...     first = next(stream)
    """

    def __init__(
        self, chunks: Generator[pb.StreamCompleteResponse, None, None], handle: CallHandle | None = None
    ) -> None:
        # The generator holds the call and cancels it when closed or collected.
        self._chunks = chunks
        self._handle = handle or CallHandle()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.StreamCompleteResponse:
        try:
            return next(self._chunks)
        except ValueError:
            # "generator already executing": another thread's close() is closing it this very moment.
            if self._handle.closed:
                raise StopIteration from None
            raise

    def close(self) -> None:
        """Cancels the call, so that the gateway stops asking the upstream; the stream then has no more messages.
        Closing a stream that ended, or never started, does nothing."""
        self._handle.close()
        # ValueError: another thread is reading it; the cancelled call ends its read, and the generator with it.
        with contextlib.suppress(ValueError):
            self._chunks.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(AsyncIterator[pb.StreamCompleteResponse]):
    """As Stream, for asyncio: `async for`, `async with`, and `await stream.aclose()` (from any task)."""

    def __init__(
        self, chunks: AsyncGenerator[pb.StreamCompleteResponse, None], handle: CallHandle | None = None
    ) -> None:
        self._chunks = chunks
        self._handle = handle or CallHandle()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> pb.StreamCompleteResponse:
        # Unlike threads, another task's aclose() cannot come in while a read is between its awaits: no guard here.
        return await anext(self._chunks)

    async def aclose(self) -> None:
        """As Stream.close."""
        self._handle.close()
        # RuntimeError: another task is reading it; the cancelled call ends its read, and the generator with it.
        with contextlib.suppress(RuntimeError):
            await self._chunks.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
