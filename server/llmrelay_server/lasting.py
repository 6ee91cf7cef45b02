"""Calls that last until their caller leaves (a health Watch, a server-reflection stream, which tools keep open and
idle), ended by a shutdown after its drain: the server's stop would otherwise wait for each the whole grace period,
as for a model call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class LastingCalls:
    """The calls of a service that last, each held while it runs (`held`), all ended at once (`end`)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self.ended = False
        """Whether `end` was called: a call held then, or come since, is to end at once, with what it should say."""

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds the running call until the block ends; `end` cancelling it ends the block quietly (its handler then
        says what it should, `ended` being set), any other cancellation goes on."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self.ended:
                raise
            task.uncancel()
        finally:
            self._tasks.discard(task)

    def end(self) -> None:
        self.ended = True
        for task in self._tasks:
            task.cancel()
