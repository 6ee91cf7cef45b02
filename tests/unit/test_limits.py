"""The in-process limiter's arithmetic, on a clock the test moves: windows, reservations, settling, refusals."""

from __future__ import annotations

import pytest
from llmrelay_server.config import Limits
from llmrelay_server.domain import LimitExceededError, LimitKind
from llmrelay_server.limits import Ask, InProcessLimiter

DAY = 86_400.0


class Clock:
    def __init__(self, now: float = 10 * DAY + 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ask(
    limits: Limits,
    *,
    subject: str = "key:a",
    tokens: int = 0,
    usd: int = 0,
    stream: bool = False,
    answer: int = 0,
    answers: int = 1,
) -> Ask:
    return Ask(subject, limits, tokens, usd, stream, answer, answers)


def on(clock: Clock) -> InProcessLimiter:
    """A limiter whose wall and monotonic clocks are both `clock`."""
    return InProcessLimiter(clock, clock)


async def refused(limiter: InProcessLimiter, *asks: Ask) -> LimitExceededError:
    with pytest.raises(LimitExceededError) as caught:
        await limiter.reserve(asks)
    return caught.value


async def test_requests_per_minute_slide_with_the_clock() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock, clock)
    limits = Limits(requests_per_minute=2)
    await limiter.reserve([ask(limits)])
    clock.now += 20
    await limiter.reserve([ask(limits)])
    error = await refused(limiter, ask(limits))
    assert (error.kind, error.subject) == (LimitKind.REQUESTS_PER_MINUTE, "key:a")
    assert error.retry_after_s == pytest.approx(40.0), "when the first request leaves the window"
    clock.now += 40
    await limiter.reserve([ask(limits)])


async def test_tokens_are_reserved_then_settled_to_what_was_billed() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock, clock)
    limits = Limits(tokens_per_minute=1000)
    first = await limiter.reserve([ask(limits, tokens=600)])
    assert (await refused(limiter, ask(limits, tokens=500))).kind is LimitKind.TOKENS_PER_MINUTE
    await limiter.settle(first, tokens=100, usd_micros=0)  # the answer was short: 500 tokens free again
    await limiter.reserve([ask(limits, tokens=900)])
    error = await refused(limiter, ask(limits, tokens=100))
    assert error.retry_after_s == pytest.approx(60.0), "the first entry leaves after its minute"


async def test_a_request_larger_than_the_limit_is_told_what_to_change_and_no_time_to_retry_in() -> None:
    limiter = on(Clock())
    tokens, budget = Limits(tokens_per_minute=500), Limits(budget_usd_per_day=0.01)
    # Prompt 8 + 1024 for the answer: no wait would ever make room for it, on a window nothing was spent in.
    error = await refused(limiter, ask(tokens, tokens=1032, answer=1024))
    assert (error.kind, error.subject, error.retry_after_s) == (LimitKind.TOKENS_PER_MINUTE, "key:a", None)
    assert "reserves 1032 tokens (8 of prompt + 1024 for the answer" in error.description
    assert "set max_tokens to at most 492" in error.description and "retry in" not in str(error)
    error = await refused(limiter, ask(budget, tokens=20_008, usd=20_008, answer=20_000))
    assert (error.kind, error.retry_after_s) == (LimitKind.BUDGET_PER_DAY, None)
    assert (
        "alone reserves 0.020008 USD for 20008 tokens" in error.description and "lower max_tokens" in error.description
    )
    # Counted nowhere: the limits are whole for what does fit.
    await limiter.reserve([ask(tokens, tokens=500), ask(budget, subject="key:b", usd=10_000)])


@pytest.mark.parametrize(
    ("the_ask", "remedy"),
    [
        (ask(Limits(tokens_per_minute=100), tokens=130, answer=10), "; shorten the prompt"),
        (
            ask(Limits(tokens_per_minute=100), tokens=101),
            "(its inputs), so no retry can admit it; send fewer or shorter",
        ),
        (
            ask(Limits(budget_usd_per_day=0.001), tokens=5, usd=1001),
            "(its inputs), so no retry can admit it; send fewer",
        ),
    ],
    ids=["prompt alone too long", "embedding", "embedding over budget"],
)
async def test_the_remedy_is_what_can_help(the_ask: Ask, remedy: str) -> None:
    error = await refused(on(Clock()), the_ask)
    assert remedy in error.description and error.retry_after_s is None


async def test_a_restarting_stream_too_large_is_told_what_one_answer_may_take() -> None:
    # Two routes, each a 9-token prompt and max_tokens 60: 138 reserved. Told "9 + 60" as "18 + 120" and to set
    # max_tokens to 82, which the same refusal met again: at most 41 fits, with an answer on each route.
    error = await refused(on(Clock()), ask(Limits(tokens_per_minute=100), tokens=138, answer=120, answers=2))
    assert "reserves 138 tokens (2 answers, one on each route it may start over on" in error.description
    assert "each 9 of prompt + 60 for the answer" in error.description
    assert "set max_tokens to at most 41" in error.description and "exact_model" in error.description


async def test_a_request_larger_than_the_limit_is_refused_as_such_before_what_was_spent() -> None:
    limiter = on(Clock())
    limits = Limits(requests_per_minute=1, tokens_per_minute=100)
    await limiter.reserve([ask(limits, tokens=10)])
    # Requests are spent too, but waiting for them would only lead to the same refusal: the size is what to fix.
    error = await refused(limiter, ask(limits, tokens=101))
    assert (error.kind, error.retry_after_s) == (LimitKind.TOKENS_PER_MINUTE, None)


async def test_stream_slots_free_when_settled() -> None:
    limiter = on(Clock())
    limits = Limits(concurrent_streams=1)
    stream = await limiter.reserve([ask(limits, stream=True)])
    await limiter.reserve([ask(limits)])  # a unary call takes no stream slot
    assert (await refused(limiter, ask(limits, stream=True))).kind is LimitKind.CONCURRENT_STREAMS
    await limiter.settle(stream, tokens=0, usd_micros=0)
    await limiter.reserve([ask(limits, stream=True)])


async def test_a_budget_is_per_utc_day() -> None:
    clock = Clock(10 * DAY + DAY - 30)  # 30 s before midnight UTC
    limiter = InProcessLimiter(clock, clock)
    limits = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    call = await limiter.reserve([ask(limits, usd=8_000)])
    await limiter.settle(call, tokens=0, usd_micros=6_000)
    call = await limiter.reserve([ask(limits, usd=4_000)])
    await limiter.settle(call, tokens=0, usd_micros=4_000)
    error = await refused(limiter, ask(limits, usd=1))
    assert error.kind is LimitKind.BUDGET_PER_DAY and error.retry_after_s == pytest.approx(30.0)
    clock.now += 31
    await limiter.reserve([ask(limits, usd=10_000)])


async def test_budget_that_calls_in_progress_hold_is_retried_in_a_moment_not_at_midnight() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock, clock)
    limits = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    spent = await limiter.reserve([ask(limits, usd=3_000)])
    await limiter.settle(spent, tokens=0, usd_micros=3_000)
    running = await limiter.reserve([ask(limits, usd=6_000)])
    free = await limiter.reserve([ask(limits)])  # a call that reserves nothing of it holds nothing
    # 3,000 spent and 6,000 held: 2,000 fits once the call in progress settles for less, which may be any moment.
    error = await refused(limiter, ask(limits, usd=2_000))
    assert error.kind is LimitKind.BUDGET_PER_DAY and error.retry_after_s == pytest.approx(1.0)
    assert "reserved by calls in progress" in error.description
    # More than the spent leaves is only ever admitted tomorrow (UTC), whatever the call in progress settles for.
    error = await refused(limiter, ask(limits, usd=7_001))
    assert error.retry_after_s == pytest.approx(DAY - 100.0)
    await limiter.settle(free, tokens=0, usd_micros=0)
    await limiter.settle(running, tokens=0, usd_micros=1_000)
    await limiter.reserve([ask(limits, usd=6_000)])
    error = await refused(limiter, ask(limits, usd=1))  # 10,000 spent or held, 6,000 of it held
    assert error.retry_after_s == pytest.approx(1.0)


async def test_all_or_nothing_across_subjects() -> None:
    limiter = on(Clock())
    key, gateway = Limits(requests_per_minute=5), Limits(requests_per_minute=1)
    await limiter.reserve([ask(key), ask(gateway, subject="gateway")])
    error = await refused(limiter, ask(key), ask(gateway, subject="gateway"))
    assert error.subject == "gateway"
    # The key's count did not move for the refused call: four more fit under its own limit.
    for _ in range(4):
        await limiter.reserve([ask(key)])
    assert (await refused(limiter, ask(key))).subject == "key:a"


async def test_a_wall_clock_stepped_back_moves_no_window() -> None:
    """The windows ran on the wall clock: stepped back (NTP, a resumed VM) after a call's entry had left its minute,
    its settle corrected the tokens a second time; the minute's count drifted from its entries, the key's limit
    loosened for good, or every later call of the key failed UNKNOWN (`next` past the last entry)."""
    wall, monotonic = Clock(), Clock()
    limiter = InProcessLimiter(wall, monotonic)
    limits = Limits(tokens_per_minute=3000)
    long_call = await limiter.reserve([ask(limits, tokens=2000)])
    wall.now += 70
    monotonic.now += 70
    await limiter.reserve([ask(limits, tokens=100)])  # the long call's entry leaves the window
    wall.now -= 30  # stepped back
    await limiter.settle(long_call, tokens=2900, usd_micros=0)  # its minute is over: nothing to correct
    await limiter.reserve([ask(limits, tokens=2900)])  # 100 + 2,900: exactly the limit
    error = await refused(limiter, ask(limits, tokens=1))
    assert error.kind is LimitKind.TOKENS_PER_MINUTE and error.retry_after_s == pytest.approx(60.0)


async def test_spend_of_a_day_over_by_the_time_it_is_given_counts_for_nothing() -> None:
    """A start (or a keys reload) a moment before midnight read the day's spend, and the limiter counted it when the
    next day had begun: yesterday's whole spend, the new day's budget refused until its end."""
    clock = Clock(11 * DAY - 0.3)
    limiter = on(clock)
    read_on = int(clock() // DAY)
    clock.now += 1.0  # the ledger's answer came after midnight
    await limiter.spend_at_least({"key:a": 90_000}, read_on)
    await limiter.reserve([ask(Limits(budget_usd_per_day=0.1), usd=100_000)])


async def test_a_call_running_past_midnight_is_the_new_days_spend_as_the_ledger_bills_it() -> None:
    """Settled on the day it was reserved, a call running at midnight counted on the old day, while the ledger (which
    a restart or a reload reads) billed it on the new one: without a restart, the new day's budget was there whole
    beside what those calls had cost it."""
    clock = Clock(11 * DAY - 0.5)
    limiter = on(clock)
    budget = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    running = await limiter.reserve([ask(budget, usd=5_000)])
    clock.now += 1.0  # midnight passes
    await limiter.settle(running, 0, 4_000)
    assert (await refused(limiter, ask(budget, usd=6_001))).kind is LimitKind.BUDGET_PER_DAY
    await limiter.reserve([ask(budget, usd=6_000)])


async def test_spend_given_at_least_is_set_against_what_was_billed_not_what_calls_in_progress_hold() -> None:
    """A reload gave a budget to a key with a call in progress (reserved 50,000 micro-USD, its limits then of tokens
    alone) after it had spent 15,000: the larger of 15,000 and the 50,000 held was taken, and once the call settled at
    3,000 the day counted 3,000 spent where 18,000 was."""
    clock = Clock()
    limiter = on(clock)
    tokens_only = Limits(tokens_per_minute=1_000_000)
    running = await limiter.reserve([ask(tokens_only, usd=50_000)])
    await limiter.spend_at_least({"key:a": 15_000}, int(clock() // DAY))
    await limiter.settle(running, 0, 3_000)
    budget = Limits(budget_usd_per_day=0.1)  # 100,000 micro-USD
    await limiter.reserve([ask(budget, usd=100_000 - 18_000)])
    error = await refused(limiter, ask(budget, usd=1))
    assert error.kind is LimitKind.BUDGET_PER_DAY
