"""Limits shared through a real Redis: several limiters (as N gateways would be) and several real gateways on one
Redis admit exactly the limit between them; stream slots of a gateway that dies free within a lease; Redis taken
away under load leaves the gateways serving per state.on_unavailable, and they use it again when it is back."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio
from certs import Authority
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from llmrelay_server.config import Limits
from llmrelay_server.domain import LimitExceededError, LimitKind, LimitsUnavailableError, StoreRole
from llmrelay_server.limits import Ask, InProcessLimiter, Reservation
from llmrelay_server.limits.redis import HELD_LEASES_KEY, KEY_PREFIX, RedisLimiter
from redis.asyncio.connection import AbstractConnection
from redis_server import RedisServer, ServerTLS
from support import GatewayFactory, chat, details, stream_chat, two_backends, wait_until
from upstream import FakeUpstream

SUBJECT = "key:research"
KEY = "llmr-research-0123456789abcdefghij"
LimiterFactory = Callable[..., Awaitable[RedisLimiter]]
GENEROUS_TIMEOUT_S = 5.0
"""Redis's time to answer in tests that count: past it, a limiter would admit calls uncounted (a stopped Redis refuses
connections at once, so tests of an outage need no short timeout either)."""


@pytest.fixture
async def limiter_for(redis_server: RedisServer) -> AsyncIterator[LimiterFactory]:
    """Starts RedisLimiters on the test's Redis (or another URL), as N gateways would; closes them afterwards."""
    made: list[RedisLimiter] = []

    async def make(url: str | None = None, **options: Any) -> RedisLimiter:
        # Tests of a Redis too slow to answer pass their own short timeout.
        limiter = RedisLimiter(url or redis_server.url, **{"timeout_s": GENEROUS_TIMEOUT_S, **options})
        await limiter.start()
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def ask(
    limits: Limits, *, subject: str = SUBJECT, tokens: int = 0, usd: int = 0, stream: bool = False, answer: int = 0
) -> Ask:
    return Ask(subject, limits, tokens, usd, stream, answer)


def today() -> int:
    """The UTC day, in days since the epoch, by the test's clock (Redis's, on this machine)."""
    return int(time.time() // 86_400)


async def at_once(
    limiters: Sequence[RedisLimiter], count: int, *asks: Ask
) -> tuple[list[Reservation], list[LimitExceededError]]:
    """`count` reserve() calls at the same time, spread over the limiters in turn: the admitted and the refused."""

    async def one(limiter: RedisLimiter) -> Reservation | LimitExceededError:
        try:
            return await limiter.reserve(asks)
        except LimitExceededError as error:
            return error

    results = await asyncio.gather(*(one(limiters[n % len(limiters)]) for n in range(count)))
    return [r for r in results if isinstance(r, Reservation)], [r for r in results if isinstance(r, LimitExceededError)]


async def refused(reserving: Awaitable[Reservation]) -> LimitExceededError:
    with pytest.raises(LimitExceededError) as caught:
        await reserving
    return caught.value


async def stop_renewing(limiter: RedisLimiter, redis_url: str) -> None:
    """As the limiter's process killed, or cut off from Redis: it renews no lease from now on. Returns once all its
    held spend's leases have lapsed by Redis's clock (a renewal already sent runs even so, late on a busy machine)."""
    assert limiter._renewing is not None
    limiter._renewing.cancel()
    await asyncio.gather(limiter._renewing, return_exceptions=True)
    client = redis.asyncio.from_url(redis_url)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            seconds, micros = await client.time()
            if not await client.zrangebyscore(HELD_LEASES_KEY, f"({seconds * 1000 + micros // 1000}", "+inf"):
                return
            assert loop.time() - began < 10, "the leases did not lapse within 10 s"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


# --- exact over many limiters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "tokens", "usd", "stream", "admitted", "kind"),
    [
        (Limits(requests_per_minute=50), 0, 0, False, 50, LimitKind.REQUESTS_PER_MINUTE),
        (Limits(tokens_per_minute=1000), 7, 0, False, 142, LimitKind.TOKENS_PER_MINUTE),
        (Limits(concurrent_streams=5), 0, 0, True, 5, LimitKind.CONCURRENT_STREAMS),
        (Limits(budget_usd_per_day=0.01), 0, 300, False, 33, LimitKind.BUDGET_PER_DAY),
    ],
    ids=["requests", "tokens", "streams", "budget"],
)
async def test_many_limiters_admit_exactly_the_limit_between_them(
    limiter_for: LimiterFactory,
    limits: Limits,
    tokens: int,
    usd: int,
    stream: bool,
    admitted: int,
    kind: LimitKind,
) -> None:
    limiters = [await limiter_for() for _ in range(3)]
    ok, refusals = await at_once(limiters, 300, ask(limits, tokens=tokens, usd=usd, stream=stream))
    assert len(ok) == admitted
    assert {(error.kind, error.subject) for error in refusals} == {(kind, SUBJECT)}
    assert all(error.retry_after_s is not None and error.retry_after_s > 0 for error in refusals)


async def test_settling_corrects_tokens_and_spend_exactly(limiter_for: LimiterFactory) -> None:
    limiters = [await limiter_for() for _ in range(3)]
    tokens = ask(Limits(tokens_per_minute=1000), subject="key:tokens", tokens=7)
    ok, _ = await at_once(limiters, 300, tokens)
    assert len(ok) == 142  # 994 tokens reserved
    await asyncio.gather(*(limiters[n % 3].settle(r, tokens=3, usd_micros=0) for n, r in enumerate(ok)))
    ok, _ = await at_once(limiters, 300, tokens)
    assert len(ok) == (1000 - 142 * 3) // 7, "what the settled calls did not use is free again, to the token"

    spend = ask(Limits(budget_usd_per_day=0.01), subject="key:spend", usd=300)
    ok, _ = await at_once(limiters, 300, spend)
    assert len(ok) == 33  # 9,900 of 10,000 micro-USD
    await asyncio.gather(*(limiters[n % 3].settle(r, tokens=0, usd_micros=100) for n, r in enumerate(ok)))
    ok, _ = await at_once(limiters, 300, spend)
    assert len(ok) == (10_000 - 33 * 100) // 300


async def test_stream_slots_free_when_settled(limiter_for: LimiterFactory) -> None:
    limiters = [await limiter_for() for _ in range(3)]
    stream = ask(Limits(concurrent_streams=5), stream=True)
    ok, _ = await at_once(limiters, 100, stream)
    assert len(ok) == 5
    await limiters[0].reserve([ask(Limits(concurrent_streams=5))])  # a unary call takes no stream slot
    await asyncio.gather(*(limiters[1].settle(r, tokens=0, usd_micros=0) for r in ok[:2]))
    again, _ = await at_once(limiters, 100, stream)
    assert len(again) == 2


async def test_all_or_nothing_across_subjects(limiter_for: LimiterFactory) -> None:
    limiter = await limiter_for()
    key, gateway = Limits(requests_per_minute=5), Limits(requests_per_minute=1)
    await limiter.reserve([ask(key), ask(gateway, subject="gateway")])
    error = await refused(limiter.reserve([ask(key), ask(gateway, subject="gateway")]))
    assert error.subject == "gateway"
    # The key's count did not move for the refused call: four more fit under its own limit.
    for _ in range(4):
        await limiter.reserve([ask(key)])
    assert (await refused(limiter.reserve([ask(key)]))).subject == SUBJECT


async def test_retry_delays_say_when_a_call_fits_again(limiter_for: LimiterFactory, redis_server: RedisServer) -> None:
    limiter = await limiter_for()
    requests = Limits(requests_per_minute=2)
    await limiter.reserve([ask(requests)])
    await limiter.reserve([ask(requests)])
    error = await refused(limiter.reserve([ask(requests)]))
    # The window is 60 to 61 s (per-second buckets): the first request's second leaves it 61 s after it began.
    assert error.retry_after_s is not None and 59.9 < error.retry_after_s <= 61.0
    tokens = Limits(tokens_per_minute=10)
    await limiter.reserve([ask(tokens, tokens=6)])
    error = await refused(limiter.reserve([ask(tokens, tokens=5)]))
    assert error.retry_after_s is not None and 59.9 < error.retry_after_s <= 61.0, "when the 6 tokens have left"
    streams = Limits(concurrent_streams=1)
    await limiter.reserve([ask(streams, stream=True)])
    assert (await refused(limiter.reserve([ask(streams, stream=True)]))).retry_after_s == 1.0
    spent = Limits(budget_usd_per_day=0.001)
    await limiter.settle(await limiter.reserve([ask(spent, usd=600)]), tokens=0, usd_micros=600)
    budget = await refused(limiter.reserve([ask(spent, usd=401)]))
    client = redis.asyncio.from_url(redis_server.url)
    seconds, micros = await client.time()
    await client.aclose()
    now = seconds + micros / 1e6
    assert budget.retry_after_s == pytest.approx((now // 86_400 + 1) * 86_400 - now, abs=1.0), "until UTC midnight"


async def test_budget_that_calls_in_progress_hold_is_retried_in_a_moment_as_in_process(
    limiter_for: LimiterFactory,
) -> None:
    limiters = [await limiter_for(), await limiter_for()]  # two gateways: what one holds, the other is told of
    limits = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    await limiters[0].settle(await limiters[0].reserve([ask(limits, usd=3_000)]), tokens=0, usd_micros=3_000)
    running = await limiters[0].reserve([ask(limits, usd=6_000)])
    other = await limiters[1].reserve([ask(limits, usd=500, subject="key:other")])  # another key's holds nothing of it
    # 3,000 spent and 6,000 held: 2,000 fits once the call in progress settles for less, which may be any moment.
    error = await refused(limiters[1].reserve([ask(limits, usd=2_000)]))
    assert error.kind is LimitKind.BUDGET_PER_DAY and error.retry_after_s == pytest.approx(1.0)
    # More than the spent leaves is only ever admitted tomorrow (UTC), whatever the call in progress settles for.
    error = await refused(limiters[1].reserve([ask(limits, usd=7_001)]))
    assert error.retry_after_s is not None and error.retry_after_s > 1.0
    until_midnight = (await refused(limiters[0].reserve([ask(limits, usd=7_001)]))).retry_after_s
    assert error.retry_after_s == pytest.approx(until_midnight, abs=1.0), "the same for either gateway"
    await limiters[1].settle(other, tokens=0, usd_micros=500)
    await limiters[0].settle(running, tokens=0, usd_micros=1_000)
    await limiters[1].reserve([ask(limits, usd=6_000)])
    error = await refused(limiters[0].reserve([ask(limits, usd=1)]))  # 10,000 spent or held, 6,000 of it held
    assert error.retry_after_s == pytest.approx(1.0)


async def test_spend_given_at_least_is_set_against_what_was_billed_not_what_calls_in_progress_hold(
    limiter_for: LimiterFactory,
) -> None:
    """A gateway started (a replica, a restart) while calls were in progress, after calls Redis never counted (out of
    reach, state.on_unavailable: allow): the ledger's 15,000 replaced the 19,000 the calls held, and as they settled
    for less they took back what was no longer counted, the day counting 6,000 spent where 21,000 was."""
    limiters = [await limiter_for(), await limiter_for()]
    budget = Limits(budget_usd_per_day=0.1)  # 100,000 micro-USD
    running = await limiters[0].reserve([ask(budget, usd=19_000)])
    await limiters[1].spend_at_least({SUBJECT: 15_000}, today())
    await limiters[0].settle(running, tokens=0, usd_micros=6_000)
    filling = await limiters[1].reserve([ask(budget, usd=100_000 - 21_000)])  # exactly what is left
    error = await refused(limiters[0].reserve([ask(budget, usd=1)]))
    assert error.kind is LimitKind.BUDGET_PER_DAY
    await limiters[1].settle(filling, tokens=0, usd_micros=100_000 - 21_000)
    # Given again (another worker, a reload), the same spend counts once.
    await limiters[0].spend_at_least({SUBJECT: 21_000}, today())
    await limiters[0].spend_at_least({SUBJECT: 15_000}, today())
    later = await refused(limiters[1].reserve([ask(budget, usd=1)]))
    assert later.retry_after_s is not None and later.retry_after_s > 1.0, "spent, not held: until midnight (UTC)"


async def test_a_call_running_past_midnight_is_the_new_days_spend_as_the_ledger_bills_it(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    """Settled on the day it was reserved, a call running at midnight counted on the old day, while the ledger billed
    it on the new one. (Redis's clock cannot be moved: the reservation is made the day before by moving what it
    counted to yesterday, as a reservation made then would have it.)"""
    limiter = await limiter_for()
    running = await limiter.reserve([ask(Limits(budget_usd_per_day=0.01), usd=5_000)])
    (hold,) = running.holds
    spend_key = f"{KEY_PREFIX}{SUBJECT}:spend"
    client = redis.asyncio.from_url(redis_server.url)
    try:
        await client.hincrby(spend_key, str(today()), -5_000)
        await client.hincrby(spend_key, str(today() - 1), 5_000)
        running.holds[0] = dataclasses.replace(hold, day=today() - 1)
        await limiter.settle(running, tokens=0, usd_micros=4_000)
        assert [int(v or 0) for v in await client.hmget(spend_key, [str(today() - 1), str(today())])] == [0, 4_000]
    finally:
        await client.aclose()


async def test_spend_of_a_day_redis_has_left_counts_for_nothing(limiter_for: LimiterFactory) -> None:
    """A start (or a keys reload) a moment before midnight by its clock, Redis's a moment after: the day's spend the
    gateway read was counted on Redis's new day, whose budget was then refused until its end."""
    limiter = await limiter_for()
    await limiter.spend_at_least({SUBJECT: 90_000}, today() - 1)
    await limiter.reserve([ask(Limits(budget_usd_per_day=0.1), usd=100_000)])


async def test_the_days_spend_given_while_redis_is_out_of_reach_counts_once_it_is_back(
    limiter_for: LimiterFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway started, or its keys file reloaded, while Redis was out of reach a moment (started beside it, a
    network blip): the day's spend the ledger gave was dropped, and once Redis was back the daily budget counted from
    nothing, its key spending it again."""
    limiter = await limiter_for(timeout_s=0.5, probe_interval_s=0.1)
    budget = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    redis_server.pause()
    try:
        await limiter.spend_at_least({SUBJECT: 6_000}, today())
        await limiter.spend_at_least(
            {SUBJECT: 9_000, "key:other": 1}, today()
        )  # a reload while still out: the most counts
        assert not limiter.available
    finally:
        redis_server.resume()
    await wait_until(lambda: limiter.available)
    assert (await refused(limiter.reserve([ask(budget, usd=1_001)]))).kind is LimitKind.BUDGET_PER_DAY
    await limiter.reserve([ask(budget, usd=1_000)])  # what the day's spend leaves
    assert "today's spend of 2 daily budgets, from the ledger, is counted once it is back" in caplog.text


async def test_a_request_larger_than_a_limit_is_refused_as_in_process_and_counted_nowhere(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    shared, alone = await limiter_for(), InProcessLimiter()
    unreachable = await limiter_for("redis://127.0.0.1:1", refuse_when_unavailable=True)
    tokens, budget = Limits(tokens_per_minute=500), Limits(budget_usd_per_day=0.01)
    for too_large in (
        ask(tokens, tokens=1032, answer=1024),
        ask(tokens, tokens=501),
        ask(budget, tokens=20_008, usd=20_008, answer=20_000),
    ):
        expected = await refused(alone.reserve([too_large]))
        assert expected.retry_after_s is None
        # Unreachable or not, Redis has nothing to say about a call no count could admit.
        for limiter in (shared, unreachable):
            error = await refused(limiter.reserve([too_large]))
            assert (error.kind, error.subject, error.description, error.retry_after_s) == (
                expected.kind,
                expected.subject,
                expected.description,
                None,
            )
    client = redis.asyncio.from_url(redis_server.url)
    assert await client.keys(f"{KEY_PREFIX}*") == [], "counted nowhere"
    await client.aclose()
    await shared.reserve([ask(tokens, tokens=500), ask(budget, subject="key:other", usd=10_000)])


async def test_buckets_older_than_the_window_neither_count_nor_stay(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    limiter = await limiter_for()
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    second, _ = await client.time()
    key = f"llmrelay:limits:{SUBJECT}:requests"
    await client.hset(key, mapping={str(second - 61): 100, str(second - 59): 2})
    limits = Limits(requests_per_minute=3)
    await limiter.reserve([ask(limits)])  # 2 in the window, this one makes 3
    assert (await refused(limiter.reserve([ask(limits)]))).kind is LimitKind.REQUESTS_PER_MINUTE
    assert str(second - 61) not in await client.hkeys(key), "a bucket out of the window is deleted"
    await client.aclose()


async def test_a_settle_after_redis_lost_its_reservation_takes_nothing_from_the_others(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    limiter = await limiter_for()
    limits = Limits(tokens_per_minute=100)
    lost = await limiter.reserve([ask(limits, tokens=60)])
    client = redis.asyncio.from_url(redis_server.url)
    await client.flushall()  # as a restart without persistence would
    _, micros = await client.time()
    await asyncio.sleep(1.01 - micros / 1e6)  # into the next second: the next reservation has a bucket of its own
    await client.aclose()
    await limiter.reserve([ask(limits, tokens=50)])
    await limiter.settle(lost, tokens=0, usd_micros=0)
    ok, _ = await at_once([limiter], 10, ask(limits, tokens=10))
    assert len(ok) == 5, "the 50 tokens counted since still count; the lost 60 are not taken off them"


async def test_every_key_expires_when_left_alone(limiter_for: LimiterFactory, redis_server: RedisServer) -> None:
    limiter = await limiter_for()
    everything = Limits(requests_per_minute=9, tokens_per_minute=900, concurrent_streams=9, budget_usd_per_day=1)
    await limiter.reserve(
        [ask(everything, tokens=5, usd=5, stream=True), ask(Limits(requests_per_minute=9), subject="gateway")]
    )
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    keys = [key async for key in client.scan_iter("llmrelay:limits:*")]
    ttls = {key: await client.ttl(key) for key in keys}
    await client.aclose()
    # The key's four, the gateway's requests (the one limit it has), the reservation's record, the epoch, and the held
    # spends and their leases.
    assert len(keys) == 9
    assert all(ttl > 0 for ttl in ttls.values()), ttls


# --- stream leases --------------------------------------------------------------------------------------------

# A gateway's limiter in a process of its own, holding two calls' stream slots, or two calls' spend of a budget of
# 0.01 USD, until it is killed.
HOLDER = """
import asyncio, sys
from llmrelay_server.config import Limits
from llmrelay_server.limits import Ask
from llmrelay_server.limits.redis import RedisLimiter

async def hold() -> None:
    limiter = RedisLimiter(sys.argv[1], stream_lease_s=float(sys.argv[2]))
    await limiter.start()
    stream = sys.argv[3] == "streams"
    limits = Limits(concurrent_streams=2) if stream else Limits(budget_usd_per_day=0.01)
    for _ in range(2):
        await limiter.reserve([Ask("key:research", limits, 0, 0 if stream else 5000, stream)])
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(hold())
"""


@pytest.mark.parametrize("held", ["streams", "spend"])
async def test_what_a_killed_gateways_calls_held_frees_within_a_lease(
    limiter_for: LimiterFactory, redis_server: RedisServer, held: str
) -> None:
    """A gateway killed (kill -9, a lost host) settles none of its calls: their stream slots, and the spend they
    reserved, would stay taken (the spend until the end of the UTC day)."""
    lease_s = 1.0
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, redis_server.url, str(lease_s), held, stdout=asyncio.subprocess.PIPE
    )
    if held == "streams":
        call = [ask(Limits(concurrent_streams=2), stream=True)]
    else:
        call = [ask(Limits(budget_usd_per_day=0.01), usd=5000)]
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"holding\n"
        other = await limiter_for()
        await asyncio.sleep(3 * lease_s)  # the holder renews its leases: what it holds outlives its first lease
        assert (await refused(other.reserve(call))).kind in (LimitKind.CONCURRENT_STREAMS, LimitKind.BUDGET_PER_DAY)
    finally:
        holder.kill()
        await holder.wait()
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    while True:
        try:
            await other.reserve(call)
            break
        except LimitExceededError:
            assert loop.time() - killed_at < lease_s + 0.5, "what a dead gateway held frees within a lease"
            await asyncio.sleep(0.02)
    await other.reserve(call)  # both calls' spend, exactly
    assert (await refused(other.reserve(call))).kind in (LimitKind.CONCURRENT_STREAMS, LimitKind.BUDGET_PER_DAY)


async def test_a_closed_limiter_stops_renewing_and_its_slots_lapse(limiter_for: LimiterFactory) -> None:
    holder = await limiter_for(stream_lease_s=0.6)
    other = await limiter_for()
    stream = [ask(Limits(concurrent_streams=1), stream=True)]
    await holder.reserve(stream)
    await asyncio.sleep(1.5)  # longer than two leases: renewed
    assert (await refused(other.reserve(stream))).kind is LimitKind.CONCURRENT_STREAMS
    await holder.aclose()  # gone without settling
    await asyncio.sleep(0.7)
    await other.reserve(stream)


# --- Redis unavailable ------------------------------------------------------------------------------------------

WARNINGS = "llmrelay_server.limits.redis"


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WARNINGS and r.levelno == level]


async def test_redis_down_under_load_admits_uncounted_then_limits_return_with_it(
    limiter_for: LimiterFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WARNINGS)
    # A second, not 0.3 s: on a busy machine a Redis just back answered 20 callers' commands later than that, a second
    # outage to the limiter, and a second warning.
    limiters = [await limiter_for(timeout_s=1.0, probe_interval_s=0.1) for _ in range(2)]
    everything = Limits(requests_per_minute=100_000, tokens_per_minute=10**9, concurrent_streams=1000)
    unexpected: list[BaseException] = []
    calls = 0

    async def load(limiter: RedisLimiter, stop: asyncio.Event) -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                reservation = await limiter.reserve([ask(everything, tokens=10, stream=True)])
                await asyncio.sleep(0.005)
                await limiter.settle(reservation, tokens=5, usd_micros=0)
                calls += 1
            except Exception as error:  # any error at all is a failure of the limiter
                unexpected.append(error)
                return

    stop = asyncio.Event()
    workers = [asyncio.ensure_future(load(limiters[n % 2], stop)) for n in range(20)]
    await asyncio.sleep(0.3)
    await redis_server.stop()
    await wait_until(lambda: not any(limiter.available for limiter in limiters))
    before = calls
    await asyncio.sleep(0.3)
    assert calls > before, "calls go on while Redis is down"
    assert all(limiter.calls_while_unavailable > 0 for limiter in limiters)
    health = limiters[0].health()
    assert (health.role, health.kind, health.available) == (StoreRole.LIMITS, "redis", False)
    assert "cannot be reached" in health.description and "admitted without being counted" in health.description
    await redis_server.start()
    await wait_until(lambda: all(limiter.available for limiter in limiters))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    assert unexpected == []
    assert len(records(caplog, logging.WARNING)) == 2, "one warning per limiter when Redis went, not one per call"
    assert len(records(caplog, logging.INFO)) == 2 + 2, "started, and back: once each per limiter"
    assert limiters[0].health().available and limiters[0].health().description == ""
    # Limits hold again (Redis came back empty: counting starts over).
    limits = Limits(requests_per_minute=3)
    ok, refusals = await at_once(limiters, 10, ask(limits, subject="key:after"))
    assert (len(ok), len(refusals)) == (3, 7)


async def test_a_redis_out_of_memory_says_so_until_it_takes_writes_again(
    limiter_for: LimiterFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With maxmemory reached and `noeviction`, Redis refuses every write and still answers PING: the limiter says why,
    and counts again only once writes are taken, not at each probe that a PING passes."""
    caplog.set_level(logging.INFO, logger=WARNINGS)
    limiter = await limiter_for(probe_interval_s=0.05)
    limits = Limits(requests_per_minute=1)
    admin = redis.asyncio.from_url(redis_server.url)
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", 1)  # less than Redis holds already
    try:
        reservation = await limiter.reserve([ask(limits)])
        assert not reservation.holds and not limiter.available, "admitted without being counted"
        description = limiter.health().description
        assert "out of memory" in description and "maxmemory" in description and "noeviction" in description
        await asyncio.sleep(0.5)  # some ten probes, each answered by PING
        assert not limiter.available
        assert len(records(caplog, logging.WARNING)) == 1
        assert not any("reachable again" in line for line in records(caplog, logging.INFO))
    finally:
        await admin.config_set("maxmemory", 0)
    await wait_until(lambda: limiter.available)
    await limiter.reserve([ask(limits, subject="key:after")])
    await refused(limiter.reserve([ask(limits, subject="key:after")]))
    await admin.aclose()


@pytest.mark.parametrize("leaked", [TypeError("'NoneType' object is not callable"), AttributeError("_add_writer")])
async def test_a_transport_error_leaking_from_the_driver_counts_as_redis_unreachable(
    limiter_for: LimiterFactory, monkeypatch: pytest.MonkeyPatch, leaked: Exception
) -> None:
    """redis-py lets these out when it writes to a connection the server has reset (redis/redis-py#4287): they mean
    Redis went away, not that the call was wrong."""
    limiter = await limiter_for(timeout_s=0.3, probe_interval_s=0.1)
    real_send = AbstractConnection.send_packed_command

    async def send_on_a_reset_connection(*args: Any, **kwargs: Any) -> None:
        raise leaked

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send_on_a_reset_connection)
    reservation = await limiter.reserve([ask(Limits(requests_per_minute=1))])
    assert not reservation.holds and not limiter.available
    assert f"{type(leaked).__name__}: {leaked}" in limiter.health().description

    monkeypatch.setattr(AbstractConnection, "send_packed_command", real_send)
    await wait_until(lambda: limiter.available)  # the probe outlived the error, and found Redis
    await limiter.reserve([ask(Limits(requests_per_minute=1), subject="key:after")])
    await refused(limiter.reserve([ask(Limits(requests_per_minute=1), subject="key:after")]))


@pytest.mark.parametrize("protocol", ["", "?protocol=3"], ids=["protocol as the limiter picks", "RESP3 named"])
async def test_connections_redis_closed_while_idle_are_not_redis_gone(
    limiter_for: LimiterFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    """A Redis (or a proxy) that closes idle connections (Redis's `timeout`): the next burst finds every pooled
    connection closed, and is counted all the same, exactly, with no outage (state.on_unavailable: deny)."""
    caplog.set_level(logging.WARNING, logger="llmrelay_server.limits.redis")
    admin = redis.asyncio.from_url(redis_server.url)
    await admin.config_set("timeout", "1")
    limiter = await limiter_for(redis_server.url + protocol, refuse_when_unavailable=True)
    limits = Limits(requests_per_minute=40)
    first = await asyncio.gather(*(limiter.reserve([ask(limits)]) for _ in range(10)))  # several connections
    assert all(reservation.holds for reservation in first)

    async def limiters_connections() -> int:
        return len(await admin.client_list()) - 1  # all but this one

    assert await limiters_connections() > 1
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    while await limiters_connections():  # Redis closes them past a second idle (checked some times a second)
        assert loop.time() - idle_since < 5, "Redis closed no idle connection"
        await asyncio.sleep(0.1)
    burst = await asyncio.gather(*(limiter.reserve([ask(limits)]) for _ in range(30)))
    assert all(reservation.holds for reservation in burst) and limiter.available
    assert (await refused(limiter.reserve([ask(limits)]))).kind is LimitKind.REQUESTS_PER_MINUTE, "40 counted"
    assert limiter.calls_while_unavailable == 0
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    await admin.aclose()


async def test_calls_do_not_each_wait_out_the_timeout_while_redis_is_down(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    limiter = await limiter_for(timeout_s=0.5, probe_interval_s=0.2)
    limits = [ask(Limits(requests_per_minute=1000))]
    await limiter.reserve(limits)
    redis_server.pause()  # nothing answers, connections stay open: each command would wait out the timeout
    loop = asyncio.get_running_loop()
    began = loop.time()
    await limiter.reserve(limits)
    assert 0.45 < loop.time() - began < 1.0, "the first call finds Redis gone after the timeout"
    began = loop.time()
    for _ in range(100):
        await limiter.reserve(limits)
    assert loop.time() - began < 0.1, "the next ones skip Redis"
    redis_server.resume()
    await wait_until(lambda: limiter.available)
    await limiter.reserve(limits)


async def test_deny_refuses_with_a_retry_delay_while_redis_is_down(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    limiter = await limiter_for(refuse_when_unavailable=True, timeout_s=0.3, probe_interval_s=0.1)
    limits = [ask(Limits(requests_per_minute=2))]
    counted = await limiter.reserve(limits)
    await redis_server.stop()
    for attempt in range(3):
        with pytest.raises(LimitsUnavailableError) as caught:
            await limiter.reserve(limits)
        assert caught.value.retry_after_s == 0.1
        assert limiter.calls_while_unavailable == attempt + 1
    await limiter.settle(counted, tokens=0, usd_micros=0)  # no error; and a request is not corrected: nothing to keep
    assert "refused until it is back" in limiter.health().description
    await redis_server.start()
    await wait_until(lambda: limiter.available)
    await limiter.reserve(limits)
    await limiter.reserve(limits)
    assert (await refused(limiter.reserve(limits))).kind is LimitKind.REQUESTS_PER_MINUTE


async def test_the_password_never_shows(
    limiter_for: LimiterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Pa55word"
    async with RedisServer(tmp_path / "locked", password=password) as server:
        right = await limiter_for(server.url, timeout_s=0.3, probe_interval_s=0.1)
        await right.reserve([ask(Limits(requests_per_minute=5))])
        assert right.available
        # A password Redis refuses makes it unreachable too, and the refusal does not quote it.
        wrong_password = "wr0ng-Pa55word"
        wrong = await limiter_for(
            server.url.replace(password, wrong_password), refuse_when_unavailable=True, probe_interval_s=0.1
        )
        assert not wrong.available
        with pytest.raises(LimitsUnavailableError) as caught:
            await wrong.reserve([ask(Limits(requests_per_minute=5))])
        await server.stop()
        await right.reserve([ask(Limits(requests_per_minute=5))])  # admitted, uncounted
        assert not right.available
        unix = await limiter_for(f"unix://{tmp_path}/none.sock?db=0&password={password}", timeout_s=0.3)
        # redis-py takes the client key's passphrase as a parameter too.
        tls_key = await limiter_for(f"rediss://127.0.0.1:{server.port}/0?ssl_password={password}", timeout_s=0.3)
        # The password written without its colon, redis-py's user: Redis refuses it, and it showed in full.
        as_user = await limiter_for(server.url.replace(f":{password}@", f"{password}@"), probe_interval_s=0.1)
        assert not as_user.available
    shown = [
        caplog.text,
        str(caught.value),
        *(limiter.health().description for limiter in (right, wrong, unix, tls_key, as_user)),
    ]
    assert f"redis://***@127.0.0.1:{server.port}/0" in as_user.health().description
    assert f"redis://:***@127.0.0.1:{server.port}/0" in right.health().description
    assert "password=***" in unix.health().description
    assert "ssl_password=***" in tls_key.health().description
    for text in shown:
        assert password not in text and wrong_password not in text, text


async def test_a_redis_over_tls_with_a_password(limiter_for: LimiterFactory, tmp_path: Path) -> None:
    """rediss:// with the server verified against a CA, and AUTH: as a managed Redis is reached."""
    authority, folder = Authority("redis test CA"), tmp_path / "tls"
    folder.mkdir()
    tls = ServerTLS(folder / "redis.crt", folder / "redis.key", folder / "ca.pem")
    authority.server().write(tls.cert_file, tls.key_file)
    tls.ca_file.write_bytes(authority.cert)
    async with RedisServer(tmp_path / "tls-redis", password="tls-Pa55", tls=tls) as server:
        limiter = await limiter_for(server.url)
        limits = Limits(requests_per_minute=2)
        await limiter.reserve([ask(limits)])
        await limiter.reserve([ask(limits)])
        assert (await refused(limiter.reserve([ask(limits)]))).kind is LimitKind.REQUESTS_PER_MINUTE
        assert limiter.available and limiter.health().description == ""
        # Another CA's certificate is refused: the connection is verified, not merely encrypted.
        other = Authority("another CA")
        (folder / "other.pem").write_bytes(other.cert)
        untrusting = await limiter_for(server.url.replace(str(tls.ca_file), str(folder / "other.pem")), timeout_s=0.5)
        await untrusting.reserve([ask(limits)])  # allow: admitted, uncounted
        assert not untrusting.available and "certificate" in untrusting.health().description


# --- gateways sharing one Redis ------------------------------------------------------------------------------------


def config(primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer, limits: str, **state: str) -> str:
    """Two backends, the research key with these limits, and the limits kept in the test's Redis."""
    sha256 = hashlib.sha256(KEY.encode()).hexdigest()
    options = "".join(f", {name}: {value}" for name, value in {"timeout_s": GENEROUS_TIMEOUT_S, **state}.items())
    return (
        two_backends(primary, local)
        + f'auth: {{keys: [{{name: research, sha256: "{sha256}", limits: {{{limits}}}}}]}}\n'
        + f'state: {{redis_url: "{redis_server.url}"{options}}}\n'
    )


AUTHORIZED = [("authorization", f"Bearer {KEY}")]


Started = tuple[list[Gateway], list[Any]]
"""Gateways, and a stub to each."""


@pytest.fixture
async def start_gateways(gateway_factory: GatewayFactory) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """Starts `count` gateways from one YAML, with a stub to each; closes the channels afterwards."""
    channels: list[grpc.aio.Channel] = []

    async def start(count: int, yaml_text: str) -> Started:
        gateways = [await gateway_factory(yaml_text) for _ in range(count)]
        channels.extend(grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") for g in gateways)
        return gateways, [pb.LLMServiceStub(channel) for channel in channels[-count:]]

    yield start
    for channel in channels:
        await channel.close()


async def spread(stubs: Sequence[Any], count: int, call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """`count` calls at once, spread over the gateways in turn; each an answer or the error it ended with."""

    async def one(stub: Any) -> Any:
        try:
            return await call(stub)
        except grpc.aio.AioRpcError as error:
            return error

    return list(await asyncio.gather(*(one(stubs[n % len(stubs)]) for n in range(count))))


def refusals_of(results: Sequence[Any], reason: str) -> int:
    """How many were refused; each must be RESOURCE_EXHAUSTED naming the research key's limit, with a retry delay."""
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        found = details(error)
        assert (found["ErrorInfo"].reason, found["QuotaFailure"].violations[0].subject) == (reason, SUBJECT)
        assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
    return len(refused)


async def read(call: Any) -> list[pb.StreamCompleteResponse]:
    return [chunk async for chunk in call]


async def test_gateways_sharing_redis_admit_exactly_the_limit_between_them(
    start_gateways: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    _, stubs = await start_gateways(3, config(primary, local, redis_server, "requests_per_minute: 7"))
    results = await spread(stubs, 30, lambda stub: stub.Complete(chat(), metadata=AUTHORIZED, timeout=5))
    assert refusals_of(results, "REQUESTS_PER_MINUTE_EXCEEDED") == 23
    assert len(primary.chat_requests) == 7, "refused calls never reach an upstream"


async def test_a_key_of_another_kind_under_the_limits_prefix_is_remade_not_taken_for_redis_gone(
    start_gateways: Any,
    primary: FakeUpstream,
    local: FakeUpstream,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A script meeting one subject's key of another kind (written by hand, or by another application) failed with
    WRONGTYPE, taken for Redis unreachable: every caller's calls were admitted uncounted (on_unavailable: allow)."""
    _, stubs = await start_gateways(2, config(primary, local, redis_server, "requests_per_minute: 3"))
    broken = f"{KEY_PREFIX}{SUBJECT}:requests"
    admin = redis.asyncio.from_url(redis_server.url)
    await admin.set(broken, "not a hash")
    results = await spread(stubs, 10, lambda stub: stub.Complete(chat(), metadata=AUTHORIZED, timeout=5))
    assert refusals_of(results, "REQUESTS_PER_MINUTE_EXCEEDED") == 7, "counted anew, exactly"
    assert await admin.type(broken) == b"hash"
    await admin.aclose()
    warnings = records(caplog, logging.WARNING)
    assert [line for line in warnings if broken in line and "deleted" in line]
    assert not any("cannot be reached" in line for line in warnings)


async def test_stream_slots_are_shared_by_the_gateways(
    start_gateways: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    _, stubs = await start_gateways(2, config(primary, local, redis_server, "concurrent_streams: 2"))
    primary.inject(*[{"trickle_s": 0.2}] * 6)
    streams = await spread(
        stubs, 6, lambda stub: read(stub.StreamComplete(stream_chat("a b c"), metadata=AUTHORIZED, timeout=10))
    )
    assert refusals_of(streams, "CONCURRENT_STREAMS_EXCEEDED") == 4
    again = await spread(
        stubs, 2, lambda stub: read(stub.StreamComplete(stream_chat(), metadata=AUTHORIZED, timeout=10))
    )
    assert refusals_of(again, "CONCURRENT_STREAMS_EXCEEDED") == 0, "the slots are free again once the streams ended"


async def test_a_daily_budget_shared_by_the_gateways_admits_exactly_what_it_pays_for(
    start_gateways: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    # As in test_keys_and_limits: each call reserves exactly what it costs (3000 micro-USD); 0.0135 USD pay for 4.
    yaml_text = config(primary, local, redis_server, "budget_usd_per_day: 0.0135")
    _, stubs = await start_gateways(3, yaml_text + 'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n')
    request = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))
    results = await spread(stubs, 12, lambda stub: stub.Complete(request, metadata=AUTHORIZED, timeout=5))
    assert refusals_of(results, "BUDGET_EXCEEDED") == 8


@pytest.mark.parametrize(
    ("limits", "options", "reason", "advice"),
    [
        ("tokens_per_minute: 500", pb.CompletionOptions(), "TOKENS_PER_MINUTE_EXCEEDED", "set max_tokens to at most"),
        (
            "budget_usd_per_day: 0.01",
            pb.CompletionOptions(max_tokens=20_000),
            "BUDGET_EXCEEDED",
            "set a lower max_tokens",
        ),
    ],
    ids=["tokens", "budget"],
)
async def test_gateways_sharing_redis_tell_a_request_larger_than_a_limit_what_to_change(
    start_gateways: Any,
    primary: FakeUpstream,
    local: FakeUpstream,
    redis_server: RedisServer,
    limits: str,
    options: pb.CompletionOptions,
    reason: str,
    advice: str,
) -> None:
    # 1 micro-USD a token: the budget is 10,000; without max_tokens a request reserves 1,024 and its prompt.
    yaml_text = config(primary, local, redis_server, limits) + 'pricing: {"gpt-test": {prompt: 1, completion: 1}}\n'
    _, stubs = await start_gateways(2, yaml_text)
    request = chat(model="gpt-test", options=options)
    for error in await spread(stubs, 4, lambda stub: stub.Complete(request, metadata=AUTHORIZED, timeout=5)):
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        found = details(error)
        assert (found["ErrorInfo"].reason, found["QuotaFailure"].violations[0].subject) == (reason, SUBJECT)
        assert "RetryInfo" not in found and "grpc-retry-pushback-ms" not in dict(error.trailing_metadata() or ())
        assert "so no retry can admit it" in (error.details() or "") and advice in (error.details() or "")
    assert primary.chat_requests == []
    fitting = chat(model="gpt-test", options=pb.CompletionOptions(max_tokens=3))
    assert (await stubs[1].Complete(fitting, metadata=AUTHORIZED, timeout=5)).backend == "openai"


async def test_gateways_go_on_per_policy_while_redis_is_down_and_limit_again_when_it_is_back(
    start_gateways: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    limits = "requests_per_minute: 30"
    allowing, to_allowing = await start_gateways(
        2, config(primary, local, redis_server, limits, on_unavailable="allow")
    )
    denying, to_denying = await start_gateways(2, config(primary, local, redis_server, limits, on_unavailable="deny"))
    gateways, stubs = allowing + denying, to_allowing + to_denying

    async def complete(stub: Any) -> Any:
        return await stub.Complete(chat(), metadata=AUTHORIZED, timeout=5)

    assert all(isinstance(answer, pb.CompleteResponse) for answer in await spread(stubs, 4, complete))
    await redis_server.stop()
    admitted = await spread(to_allowing, 40, complete)
    assert all(isinstance(answer, pb.CompleteResponse) for answer in admitted), "allow: served, past the limit"
    for error in await spread(to_denying, 20, complete):
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
        found = details(error)
        assert found["ErrorInfo"].reason == "LIMITS_UNAVAILABLE"
        assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
    # A call its handler refuses gets the handler's answer, the caller's to fix, not one to retry for nothing.
    mistakes = {
        "NOT_FOUND": chat(model="no-such-model"),
        "INVALID_ARGUMENT": pb.CompleteRequest(),  # no messages
    }
    for code, request in mistakes.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await to_denying[0].Complete(request, metadata=AUTHORIZED, timeout=5)
        assert refused.value.code().name == code, refused.value
    for gateway in gateways:
        assert gateway.limiter is not None and not gateway.limiter.health().available
    await redis_server.start()
    await wait_until(lambda: all(g.limiter is not None and g.limiter.health().available for g in gateways))
    # Redis came back empty: the minute's count starts over, over all four gateways at once.
    results = await spread(stubs, 40, complete)
    assert refusals_of(results, "REQUESTS_PER_MINUTE_EXCEEDED") == 10


@pytest.mark.parametrize("where", ["in_process", "redis"])
async def test_a_budget_spent_past_its_end_still_admits_calls_that_cost_nothing(
    limiter_for: LimiterFactory, where: str
) -> None:
    """A call may cost more than it reserved (an upstream's answer past max_tokens): a key whose budget is overspent
    can still call its free models (a local backend's), as one whose budget is spent to the micro-dollar can."""
    limiter = InProcessLimiter() if where == "in_process" else await limiter_for()
    spent = Limits(budget_usd_per_day=0.001)  # 1,000 micro-USD
    call = await limiter.reserve([ask(spent, usd=600)])
    await limiter.settle(call, tokens=0, usd_micros=1_500)

    await limiter.reserve([ask(spent)])
    error = await refused(limiter.reserve([ask(spent, usd=1)]))
    assert error.kind is LimitKind.BUDGET_PER_DAY


async def test_a_spend_whose_lease_lapsed_is_settled_to_what_was_billed(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    """A gateway cut off from Redis for longer than a lease, its call still in progress: the spend its call held is
    taken back when the lease lapses, and the call's settle, when it comes, counts what it was billed."""
    budget = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    cut_off = await limiter_for(stream_lease_s=0.3)
    held = await cut_off.reserve([ask(budget, usd=8000)])
    await stop_renewing(cut_off, redis_server.url)  # as when Redis cannot be reached
    other = await limiter_for()
    await other.reserve([ask(budget, usd=5000)])  # fits: the lapsed lease's 8,000 were taken back
    await cut_off.settle(held, tokens=0, usd_micros=3000)
    await other.reserve([ask(budget, usd=2000)])  # 5,000 + 3,000 billed + 2,000: the budget, to the micro-USD
    assert (await refused(other.reserve([ask(budget, usd=1)]))).kind is LimitKind.BUDGET_PER_DAY


async def test_every_lapsed_lease_gives_its_spend_back_at_once(
    limiter_for: LimiterFactory, redis_server: RedisServer
) -> None:
    """A gateway that dies with many calls in progress: all their spend comes back at the next reservation (one that
    took back some of it was refused, and told to come back at midnight)."""
    budget = Limits(budget_usd_per_day=0.15)  # 150,000 micro-USD
    dead = await limiter_for(stream_lease_s=0.3)
    for _ in range(150):
        await dead.reserve([ask(budget, usd=1000)])
    await stop_renewing(dead, redis_server.url)  # as its process killed: no lease renewed, no call settled
    other = await limiter_for()
    await other.reserve([ask(budget, usd=150_000)])
