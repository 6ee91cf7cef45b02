"""Work run in a daemon thread and awaited from the event loop, for work that must not hold up the process's exit."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(function: Callable[[], T], name: str) -> T:
    """`function`'s result (or exception), computed in a daemon thread called `name` and handed to the event loop.
    Not asyncio.to_thread: the loop waits for its executor's threads as it closes, so work left blocked there (a
    re-read of thousands of keys, an export to a collector that is down) would hold up the process's exit after it
    had stopped. Cancelled, the work goes on in its thread, its outcome dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            outcome = functools.partial(done.set_result, function())
        except Exception as error:
            outcome = functools.partial(done.set_exception, error)

        def hand_over() -> None:
            if not done.cancelled():  # the awaiting task was cancelled (the gateway stops): no one waits for it
                outcome()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the process is exiting
            loop.call_soon_threadsafe(hand_over)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
