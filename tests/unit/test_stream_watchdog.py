"""The stream watchdog: a wait for the next chunk ends after the idle limit or at the deadline; the time the caller
takes between waits does not count; a wait that ends in time leaves the task uncancelled."""

from __future__ import annotations

import asyncio

import pytest
from llmrelay_server.router import _Watchdog

IDLE_S = 0.2


async def test_a_wait_past_the_idle_limit_times_out() -> None:
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(loop, IDLE_S, loop.time() + 60)
    started = loop.time()
    with pytest.raises(TimeoutError), watchdog:
        await asyncio.sleep(10)
    assert IDLE_S <= loop.time() - started < 5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    watchdog.stop()


async def test_the_callers_time_between_waits_does_not_count() -> None:
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(loop, IDLE_S, loop.time() + 60)
    for _ in range(3):
        with watchdog:
            await asyncio.sleep(IDLE_S / 4)
        await asyncio.sleep(IDLE_S * 1.5)  # the caller is slow: longer than the idle limit, outside a wait
    watchdog.stop()


async def test_the_deadline_ends_a_wait_before_the_idle_limit() -> None:
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(loop, 60, loop.time() + IDLE_S)
    with pytest.raises(TimeoutError), watchdog:
        await asyncio.sleep(10)
    watchdog.stop()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(loop, IDLE_S, loop.time() + 60)

    async def wait() -> None:
        with watchdog:
            await asyncio.sleep(10)

    task = asyncio.create_task(wait())
    await asyncio.sleep(IDLE_S / 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watchdog.stop()


class NearDeadline:
    """A stream's preparation for its end at the deadline, which keeps when it was called."""

    def __init__(self) -> None:
        self.called: list[float] = []

    def __call__(self) -> None:
        self.called.append(asyncio.get_running_loop().time())


async def test_near_its_deadline_a_stream_is_prepared_for_it_and_goes_on_to_the_deadline() -> None:
    """The preparation is no reason to end the stream sooner: a stream whose prompt takes long to count was cut that
    long before its deadline (for a short deadline, at its first chunk), though it would have ended well in time."""
    loop = asyncio.get_running_loop()
    near = NearDeadline()
    started = loop.time()
    watchdog = _Watchdog(loop, 60, started + 0.6, near, near_s=0.5)
    with pytest.raises(TimeoutError), watchdog:
        await asyncio.sleep(10)
    watchdog.stop()
    [at] = near.called  # once, near_s before the deadline (or later: a busy machine runs timers late)
    assert 0.1 <= at - started < 0.6
    assert loop.time() - started >= 0.6  # at the deadline, not before it


async def test_a_stream_that_ends_long_before_its_deadline_is_never_prepared_for_it() -> None:
    loop = asyncio.get_running_loop()
    near = NearDeadline()
    watchdog = _Watchdog(loop, IDLE_S, loop.time() + 60, near, near_s=5)
    for _ in range(3):
        with watchdog:
            await asyncio.sleep(IDLE_S / 4)
    watchdog.stop()
    assert near.called == []
