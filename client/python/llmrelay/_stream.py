"""What Client.stream and AsyncClient.stream return: the messages of one StreamComplete call, to iterate, and to
close (cancel) when done with them, by hand or as a context manager."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator

from llmrelay import v1 as pb


class Stream(Iterator[pb.StreamCompleteResponse]):
    """The answer's messages as they come; the call starts when the first one is asked for.

    A loop over `client.stream(...)` itself cancels the call when it ends, a `break` included. A stream kept in a
    variable is cancelled only by close(), the end of a `with` block, or its garbage collection: until then the
    gateway goes on generating (and billing) an answer nobody reads.

    >>> with client.stream(messages) as stream:
    ...     first = next(stream)
    """

    def __init__(self, chunks: Generator[pb.StreamCompleteResponse, None, None]) -> None:
        # The generator holds the call and cancels it when closed or collected; the Stream holds nothing else, so
        # that a stream nobody refers to any more is collected (and its call cancelled) at once.
        self._chunks = chunks

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.StreamCompleteResponse:
        return next(self._chunks)

    def close(self) -> None:
        """Cancels the call, so that the gateway stops asking the upstream; the stream then has no more messages.
        Closing a stream that ended, or never started, does nothing."""
        self._chunks.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(AsyncIterator[pb.StreamCompleteResponse]):
    """As Stream, for asyncio: `async for`, `async with`, and `await stream.aclose()`."""

    def __init__(self, chunks: AsyncGenerator[pb.StreamCompleteResponse, None]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> pb.StreamCompleteResponse:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        """As Stream.close."""
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
