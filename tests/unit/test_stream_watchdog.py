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


class Reserve:
    """A stream's reserve of `seconds`, which keeps when it was asked."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.asked: list[float] = []

    def __call__(self) -> float:
        self.asked.append(asyncio.get_running_loop().time())
        return self.seconds


async def test_a_reserve_is_asked_near_the_deadline_and_ends_the_stream_that_much_before_it() -> None:
    loop = asyncio.get_running_loop()
    reserve = Reserve(0.3)
    started = loop.time()
    watchdog = _Watchdog(loop, 60, started + 0.6, reserve, reserve_at_most_s=0.5)
    with pytest.raises(TimeoutError), watchdog:
        await asyncio.sleep(10)
    watchdog.stop()
    [at] = reserve.asked  # once, at the deadline less the most it may be (or later: a busy machine runs timers late)
    assert at - started >= 0.1
    assert watchdog.end_by == pytest.approx(started + 0.3)  # the deadline less the reserve, not the deadline
    assert loop.time() - started >= 0.3


async def test_a_stream_that_ends_before_its_reserve_could_matter_never_asks_it() -> None:
    loop = asyncio.get_running_loop()
    reserve = Reserve(0.0)
    watchdog = _Watchdog(loop, IDLE_S, loop.time() + 60, reserve, reserve_at_most_s=5)
    for _ in range(3):
        with watchdog:
            await asyncio.sleep(IDLE_S / 4)
    watchdog.stop()
    assert reserve.asked == []
