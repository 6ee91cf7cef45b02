"""The attempts' deadlines, kept by one timer per loop: each wait ends with TimeoutError at its own deadline, whatever
the order the waits came in and however many ended in time before; a wait that ends in time leaves its task
uncancelled; a cancellation from outside stays one. On both event loops the server runs (uvloop's clock counts whole
milliseconds)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from llmrelay_server.router import Deadlines

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
EARLY_S = 0.002
"""How early by its own clock a loop may run a timer (uvloop's rounds to milliseconds)."""


@pytest.fixture(params=list(LOOPS.values()), ids=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def run_on_the_loop(body: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=request.param) as runner:
            runner.run(body)

    return run_on_the_loop


async def _wait(deadlines: Deadlines, deadline: float, sleep_s: float) -> float | None:
    """Sleeps `sleep_s` within `deadline`: when it timed out by the loop's clock, or None when it ended in time."""
    loop = asyncio.get_running_loop()
    try:
        with deadlines.within(loop, deadline):
            await asyncio.sleep(sleep_s)
    except TimeoutError:
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        return loop.time()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    return None


def test_each_wait_ends_at_its_own_deadline_in_any_order(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def body() -> None:
        loop, deadlines, rng = asyncio.get_running_loop(), Deadlines(), random.Random(7)
        now = loop.time()
        # 60 waits at once, their deadlines 0.5-1.5 s away in shuffled order: half sleep past theirs, half end at
        # once (half a second or more to spare: a busy machine runs the loop late, and a wait whose sleep ended just
        # before its deadline may not have run again when the timer fires).
        waits = [(now + rng.uniform(0.5, 1.5), i % 2 == 0) for i in range(60)]
        ended = await asyncio.gather(*(_wait(deadlines, deadline, 10 if late else 0.01) for deadline, late in waits))
        for (deadline, late), timed_out_at in zip(waits, ended, strict=True):
            if late:
                assert timed_out_at is not None and deadline - EARLY_S <= timed_out_at < deadline + 1
            else:
                assert timed_out_at is None

    run(body())


def test_waits_that_ended_in_time_leave_the_next_ones_their_whole_time(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """The timer armed for a wait that ended long ago fires with nothing due, and is armed for what is left."""

    async def body() -> None:
        loop, deadlines = asyncio.get_running_loop(), Deadlines()
        for _ in range(100):
            assert await _wait(deadlines, loop.time() + 0.05, 0) is None
        assert await _wait(deadlines, loop.time() + 2, 0.15) is None  # past the first timer's time, within its own
        started = loop.time()
        timed_out_at = await _wait(deadlines, started + 0.1, 10)
        assert timed_out_at is not None and 0.1 - EARLY_S <= timed_out_at - started < 1

    run(body())


def test_a_sooner_deadline_after_a_later_one_is_kept(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def body() -> None:
        loop, deadlines = asyncio.get_running_loop(), Deadlines()
        later = asyncio.create_task(_wait(deadlines, loop.time() + 30, 60))
        await asyncio.sleep(0)
        started = loop.time()
        timed_out_at = await _wait(deadlines, started + 0.05, 60)
        assert timed_out_at is not None and timed_out_at - started < 1
        assert not later.done()
        later.cancel()  # the caller left: a cancellation, not a timeout
        with pytest.raises(asyncio.CancelledError):
            await later

    run(body())


def test_a_cancellation_from_outside_stays_a_cancellation(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def body() -> None:
        loop, deadlines = asyncio.get_running_loop(), Deadlines()
        task = asyncio.create_task(_wait(deadlines, loop.time() + 0.05, 60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its deadline passes with nothing left to end: the next wait is untouched.
        assert await _wait(deadlines, loop.time() + 2, 0.1) is None

    run(body())


def test_what_a_wait_makes_ready_ahead_is_made_once_and_only_while_it_waits(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """A wait still going at its `ahead` time has it called, once, and ends at its deadline all the same; a wait over
    by then has nothing called."""

    async def body() -> None:
        loop, deadlines = asyncio.get_running_loop(), Deadlines()
        called: list[tuple[str, float]] = []
        now = loop.time()

        async def waiting(name: str, ahead_s: float, deadline_s: float, sleep_s: float) -> None:
            ahead = (now + ahead_s, lambda: called.append((name, loop.time())), ())
            with contextlib.suppress(TimeoutError), deadlines.within(loop, now + deadline_s, ahead):
                await asyncio.sleep(sleep_s)

        # The "over" wait ends 0.45 s before its ahead time: room for a busy machine to run the loop late.
        await asyncio.gather(waiting("long", 0.05, 0.2, 3.0), waiting("over", 0.5, 0.8, 0.05))
        assert [name for name, _ in called] == ["long"]
        assert called[0][1] >= now + 0.05 - EARLY_S
        assert loop.time() < now + 2.5, "the long wait still ended at its deadline, not its sleep's end"

    run(body())
