"""A reservation whose answer never reached the gateway counts nothing in Redis, whenever Redis runs it, and a call
that ends while Redis does not answer is settled once it does: through a real gRPC channel to real gateways on a real
Redis (frozen with SIGSTOP, or behind a proxy that holds the bytes of a command until after the gateway gave up on
it), and the reserve and undo scripts, and a settle and the same settle sent again, in both orders.

The gateway gives up on Redis (state.timeout_s) and admits the call uncounted (state.on_unavailable: allow), or the
caller leaves while the gateway waits; Redis runs the script afterwards. Without an undo, what it counted would stay
for the window (the spend, for the day) and refuse calls that fit. Likewise a settle the gateway could not send: the
call's whole reservation, and its stream slot, would stay counted."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis.asyncio
import redis.exceptions
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from llmrelay_server.config import Limits
from llmrelay_server.domain import LimitExceededError, LimitKind
from llmrelay_server.limits import Ask
from llmrelay_server.limits.redis import KEY_PREFIX, RECORD_PREFIX, RedisLimiter
from redis_server import RedisServer
from support import GatewayFactory, chat, details, stream_chat, two_backends, wait_until
from upstream import FakeUpstream

SUBJECT = "key:research"
KEY = "llmr-research-0123456789abcdefghij"
AUTHORIZED = [("authorization", f"Bearer {KEY}")]
SHORT_TIMEOUT_S = 0.3
"""state.timeout_s: how long the gateway waits for Redis before it gives up on a reservation."""
REQUESTS_PER_MINUTE = 3
CALLS = "llmrelay_server.calls"
"""The call log: a line when a call ends."""
LIMITS_LOG = "llmrelay_server.limits.redis"
# Each call reserves 3 completion tokens at 1,000 micro-USD each (and bills what the upstream counts).
LIMITS = f"requests_per_minute: {REQUESTS_PER_MINUTE}, tokens_per_minute: 100000, budget_usd_per_day: 1"
PRICING = 'pricing: {"gpt-test": {prompt: 0, completion: 1000}}\n'
REQUEST = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=3))


@dataclass
class _Link:
    """One connection through the proxy."""

    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while what the client sends is passed on to Redis."""
    client_left: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_redis: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when Redis closed the connection (after its client left): it has run everything the client sent."""


class HoldingProxy:
    """A loopback TCP proxy in front of Redis that can hold what clients send without closing anything: a command
    held is run by Redis only when released, which may be after its client gave up and left."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._holding = False
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    def hold(self) -> None:
        """Holds what clients send on every connection, and on the connections opened from now on."""
        self._holding = True
        for link in self._links:
            link.flowing.clear()

    def admit(self) -> None:
        """Connections opened from now on pass what they carry; those held stay held."""
        self._holding = False

    async def release(self) -> None:
        """Once the clients of the held connections have given up on them and left, passes on what they held, and
        returns when Redis has run it all. Connections opened later are held or not as before."""
        held = [link for link in self._links if not link.flowing.is_set()]
        assert held, "nothing is held"
        await asyncio.wait_for(asyncio.gather(*(link.client_left.wait() for link in held)), 10)
        for link in held:
            link.flowing.set()
        await asyncio.wait_for(asyncio.gather(*(link.closed_by_redis.wait() for link in held)), 10)

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in self._links:
            link.flowing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)
        link = _Link()
        if not self._holding:
            link.flowing.set()
        self._links.append(link)

        sent: asyncio.Queue[bytes] = asyncio.Queue()  # b"" when the client has left

        async def from_client() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await client_reader.read(65536):
                    sent.put_nowait(data)
            link.client_left.set()
            sent.put_nowait(b"")

        async def to_redis() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await sent.get():
                    await link.flowing.wait()
                    server_writer.write(data)
                    await server_writer.drain()
                await link.flowing.wait()  # what the client sent before it left is passed on first
            server_writer.close()

        async def to_client() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await server_reader.read(65536):
                    client_writer.write(data)
                    await client_writer.drain()
            link.closed_by_redis.set()
            client_writer.close()

        for copy in (from_client(), to_redis(), to_client()):
            task = asyncio.create_task(copy)
            self._tasks.add(task)


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[HoldingProxy]:
    holding = await HoldingProxy(redis_server.port).start()
    yield holding
    await holding.aclose()


@dataclass(frozen=True)
class Counts:
    """What Redis counts for the research key."""

    requests: int
    tokens: int
    spend: int
    streams: int = 0


async def counted(redis_server: RedisServer, subject: str = SUBJECT) -> Counts:
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    try:
        prefix = f"{KEY_PREFIX}{subject}:"
        requests, tokens, spend = [
            sum(int(value) for value in await client.hvals(f"{prefix}{name}"))
            for name in ("requests", "tokens", "spend")
        ]
        return Counts(requests, tokens, spend, await client.zcard(f"{prefix}streams"))
    finally:
        await client.aclose()


async def records(redis_server: RedisServer) -> list[str]:
    """The reservations' records in Redis: where each was counted, or "undone"."""
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    try:
        return [str(await client.get(key)) async for key in client.scan_iter(f"{RECORD_PREFIX}*")]
    finally:
        await client.aclose()


async def counting(redis_server: RedisServer, expected: Counts, within_s: float = 10.0) -> None:
    """Waits until Redis counts what was expected and has undone a reservation (so that it no longer changes); past
    the time, fails with what it counts."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not ("undone" in await records(redis_server) and await counted(redis_server) == expected):
        if loop.time() - began > within_s:
            assert await counted(redis_server) == expected
            raise AssertionError(f"no reservation undone within {within_s} s")
        await asyncio.sleep(0.02)


def ask(tokens: int, usd: int, *, stream: bool = False) -> Ask:
    limits = Limits(requests_per_minute=5, tokens_per_minute=1000, concurrent_streams=5, budget_usd_per_day=1)
    return Ask(SUBJECT, limits, tokens, usd, stream)


# --- the scripts, in both orders ------------------------------------------------------------------------------------


@pytest.fixture
async def limiter(proxy: HoldingProxy) -> AsyncIterator[RedisLimiter]:
    """A limiter reaching Redis through the proxy, quick to give up on it and to find it back."""
    made = RedisLimiter(proxy.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1)
    await made.start()
    yield made
    await made.aclose()


async def test_an_undo_after_the_late_reservation_takes_back_exactly_what_it_counted(
    limiter: RedisLimiter, proxy: HoldingProxy, redis_server: RedisServer
) -> None:
    kept = await limiter.reserve([ask(10, 100, stream=True)])  # counted, and the connection to Redis opened
    assert await counted(redis_server) == Counts(requests=1, tokens=10, spend=100, streams=1)
    proxy.hold()
    given_up = await limiter.reserve([ask(7, 70, stream=True)])
    assert not given_up.holds and not limiter.available, "admitted uncounted, as Redis did not answer in time"
    await proxy.release()  # the held reservation reaches Redis; the probe's new connections stay held
    assert await counted(redis_server) == Counts(requests=2, tokens=17, spend=170, streams=2), "counted late"
    proxy.admit()
    await wait_until(lambda: limiter.available)
    assert await counted(redis_server) == Counts(requests=1, tokens=10, spend=100, streams=1), "and taken back"
    assert sorted(await records(redis_server)) == sorted([str(kept.holds[0].second), "undone"])
    await limiter.settle(kept, tokens=4, usd_micros=40)
    assert await counted(redis_server) == Counts(requests=1, tokens=4, spend=40, streams=0)


async def test_a_reservation_sent_again_after_it_ran_counts_once_and_answers_as_it_did(
    redis_server: RedisServer,
) -> None:
    """A reserve is sent once more when its connection broke (a Redis or a proxy closed it while idle): it may have
    run, its answer lost. Sent again, it counts nothing more, and its caller is admitted as counted."""
    limiter = RedisLimiter(redis_server.url, timeout_s=SHORT_TIMEOUT_S)
    await limiter.start()
    script = limiter._reserve_script  # the script as the limiter sends it, twice
    calls = 0

    async def lost_answer(keys: list[str], args: list[str | int]) -> Any:
        nonlocal calls
        calls += 1
        answer = await real(keys, args)
        if calls == 1:
            raise redis.exceptions.ConnectionError("Connection closed by server.")  # it ran; its answer never came
        return answer

    real = script.__call__
    try:
        first = await limiter.reserve([ask(10, 100, stream=True)])
        object.__setattr__(limiter, "_reserve_script", lost_answer)
        again = await limiter.reserve([ask(7, 70, stream=True)])
        assert calls == 2 and again.holds and limiter.available, "counted, as it ran"
        assert again.holds[0].second >= first.holds[0].second and again.holds[0].epoch == first.holds[0].epoch
        assert await counted(redis_server) == Counts(requests=2, tokens=17, spend=170, streams=2), "counted once"
        await limiter.settle(again, tokens=7, usd_micros=70)
        assert await counted(redis_server) == Counts(requests=2, tokens=17, spend=170, streams=1)
    finally:
        await limiter.aclose()


async def test_an_undo_before_the_late_reservation_makes_it_count_nothing(
    limiter: RedisLimiter, proxy: HoldingProxy, redis_server: RedisServer
) -> None:
    await limiter.reserve([ask(10, 100, stream=True)])
    proxy.hold()
    given_up = await limiter.reserve([ask(7, 70, stream=True)])
    assert not given_up.holds and not limiter.available
    proxy.admit()  # the probe's new connections reach Redis, and the undo with them, before the reservation does
    await wait_until(lambda: limiter.available)  # which it is only once the undo has been sent
    await proxy.release()
    assert await counted(redis_server) == Counts(requests=1, tokens=10, spend=100, streams=1), "it counted nothing"
    assert "undone" in await records(redis_server)
    # Limits hold as before: four more requests fit in the minute (not three), and no fifth.
    for _ in range(4):
        await limiter.reserve([ask(1, 1)])
    with pytest.raises(LimitExceededError) as caught:
        await limiter.reserve([ask(1, 1)])
    assert caught.value.kind is LimitKind.REQUESTS_PER_MINUTE


async def test_spend_that_lapsed_before_its_undo_or_settle_is_taken_back_once(
    proxy: HoldingProxy, redis_server: RedisServer
) -> None:
    """Redis out of reach for longer than a lease: the spend held by this gateway's calls lapses (taken back by the
    next reservation of any gateway), and the undo and settle that come after it do not take it back again."""
    limiter = RedisLimiter(proxy.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1, stream_lease_s=0.3)
    other = RedisLimiter(redis_server.url)
    await limiter.start()
    await other.start()
    try:
        kept = await limiter.reserve([ask(10, 100)])
        proxy.hold()
        given_up = await limiter.reserve([ask(7, 70)])
        assert not given_up.holds and not limiter.available
        await proxy.release()  # counted late, its 70 held on a lease no one renews (nor kept's, Redis out of reach)
        await asyncio.sleep(0.5)
        await other.reserve([ask(1, 1)])  # finds both leases lapsed, and takes their spend back
        assert await counted(redis_server) == Counts(requests=3, tokens=18, spend=1)
        proxy.admit()
        await wait_until(lambda: limiter.available)  # the undo has been sent
        assert await counted(redis_server) == Counts(requests=2, tokens=11, spend=1), "its 70 not taken back again"
        await limiter.settle(kept, tokens=4, usd_micros=40)
        assert await counted(redis_server) == Counts(requests=2, tokens=5, spend=41), "what it was billed, added"
    finally:
        await limiter.aclose()
        await other.aclose()


async def test_an_undo_after_the_reservations_record_expired_gives_back_the_spend_it_holds(
    limiter: RedisLimiter, proxy: HoldingProxy, redis_server: RedisServer
) -> None:
    """Redis out of reach for minutes (longer than the record's two), and no reservation meanwhile to lapse the
    spend held: the undo, first to run when Redis is back, takes it back all the same."""
    await limiter.reserve([ask(10, 100)])
    proxy.hold()
    given_up = await limiter.reserve([ask(7, 70)])
    assert not given_up.holds and not limiter.available
    await proxy.release()  # counted late
    assert await counted(redis_server) == Counts(requests=2, tokens=17, spend=170)
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    try:  # two minutes pass: the record expires (Redis's clock cannot be moved on)
        late = [key async for key in client.scan_iter(f"{RECORD_PREFIX}*") if await client.ttl(key) > 0]
        await client.delete(*late)
    finally:
        await client.aclose()
    proxy.admit()
    await wait_until(lambda: limiter.available)  # the undo has been sent
    assert (await counted(redis_server)).spend == 100


# --- through gateways -----------------------------------------------------------------------------------------------


def config(
    primary: FakeUpstream,
    local: FakeUpstream,
    redis_url: str,
    timeout_s: float = SHORT_TIMEOUT_S,
    limits: str = LIMITS,
) -> str:
    sha256 = hashlib.sha256(KEY.encode()).hexdigest()
    return (
        two_backends(primary, local)
        + PRICING
        + f'auth: {{keys: [{{name: research, sha256: "{sha256}", limits: {{{limits}}}}}]}}\n'
        + f'state: {{redis_url: "{redis_url}", timeout_s: {timeout_s}, on_unavailable: allow}}\n'
    )


@pytest.fixture
async def start(gateway_factory: GatewayFactory) -> AsyncIterator[Callable[[str], Any]]:
    """Starts a gateway from YAML; returns it and a stub over a channel to it."""
    channels: list[grpc.aio.Channel] = []

    async def started(yaml_text: str) -> tuple[Gateway, Any]:
        gateway = await gateway_factory(yaml_text)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}"))
        return gateway, pb.LLMServiceStub(channels[-1])

    yield started
    for channel in channels:
        await channel.close()


def available(gateway: Gateway) -> bool:
    assert gateway.limiter is not None
    return gateway.limiter.health().available


async def admitted_of(stub: Any, count: int) -> int:
    """`count` calls at once: how many were answered; the others must be refused by the requests-per-minute limit."""

    async def one() -> bool:
        try:
            await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert details(error)["ErrorInfo"].reason == "REQUESTS_PER_MINUTE_EXCEEDED"
            return False
        return True

    return sum(await asyncio.gather(*(one() for _ in range(count))))


def billed(answer: pb.CompleteResponse, requests: int = 1) -> Counts:
    """What Redis should count for these calls once they settled: what they were billed."""
    return Counts(requests, answer.usage.total_tokens * requests, answer.usage.cost.usd_micros * requests)


async def test_a_reservation_redis_runs_after_the_gateway_gave_up_is_taken_back(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    gateway, stub = await start(config(primary, local, redis_server.url))
    first = await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)
    assert first.usage.cost.usd_micros > 0
    assert await counted(redis_server) == billed(first)
    redis_server.pause()  # the next reservation waits, unanswered, in Redis's socket
    loop = asyncio.get_running_loop()
    began = loop.time()
    uncounted = await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)
    assert uncounted.backend == "openai" and loop.time() - began >= SHORT_TIMEOUT_S, "admitted once it gave up"
    assert not available(gateway)
    redis_server.resume()  # Redis runs the reservation now, then answers the gateway's probe
    await wait_until(lambda: available(gateway))
    assert await counted(redis_server) == billed(first), "the late reservation counts nothing"
    assert "undone" in await records(redis_server)
    # Exactly the rest of the minute is admitted: the call Redis counted late takes no one's place.
    assert await admitted_of(stub, 2 * REQUESTS_PER_MINUTE) == REQUESTS_PER_MINUTE - 1


async def test_a_reservation_that_reaches_redis_after_its_undo_counts_nothing(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer, proxy: HoldingProxy
) -> None:
    gateway, stub = await start(config(primary, local, proxy.url))
    first = await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)
    proxy.hold()
    assert (await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)).backend == "openai"
    assert not available(gateway)
    proxy.admit()  # the probe, and the undo after it, reach Redis on new connections
    await wait_until(lambda: available(gateway))  # which it is only once the undo has been sent
    await proxy.release()  # only now does the reservation reach Redis
    assert await counted(redis_server) == billed(first), "the late reservation counts nothing"
    assert "undone" in await records(redis_server)
    assert await admitted_of(stub, 2 * REQUESTS_PER_MINUTE) == REQUESTS_PER_MINUTE - 1


async def test_a_reservation_whose_caller_left_while_redis_was_frozen_is_taken_back(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS)
    # Redis is given long enough that the gateway never gives up on it: the caller's deadline ends the call first.
    gateway, stub = await start(config(primary, local, redis_server.url, timeout_s=5))
    first = await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)
    redis_server.pause()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Redis must answer only once the gateway has ended the call too: an answer before would admit it (counted, then
    # settled as a call that failed).
    await wait_until(lambda: len([r for r in caplog.records if r.name == CALLS]) == 2)
    redis_server.resume()
    await counting(redis_server, billed(first))
    assert available(gateway), "the gateway never gave up on Redis: the undo went in the background"
    assert len(primary.chat_requests) == 1, "the call that left never reached the upstream"
    assert await admitted_of(stub, 2 * REQUESTS_PER_MINUTE) == REQUESTS_PER_MINUTE - 1


# --- settles that Redis did not answer ------------------------------------------------------------------------------


@pytest.mark.parametrize("first_runs", ["before", "after"], ids=["sent again after it ran", "run late after"])
async def test_a_settle_whose_answer_was_lost_corrects_once(
    limiter: RedisLimiter, proxy: HoldingProxy, redis_server: RedisServer, first_runs: str
) -> None:
    # A first call settles as usual, so that Redis has the settle script: the one held runs as it was sent (EVALSHA),
    # where it would otherwise be answered NOSCRIPT.
    await limiter.settle(await limiter.reserve([ask(10, 100, stream=True)]), tokens=4, usd_micros=40)
    call = await limiter.reserve([ask(10, 100, stream=True)])
    assert await counted(redis_server) == Counts(requests=2, tokens=14, spend=140, streams=1)
    proxy.hold()
    await limiter.settle(call, tokens=7, usd_micros=70)  # sent, and not answered within state.timeout_s
    assert not limiter.available
    settled = Counts(requests=2, tokens=11, spend=110, streams=0)
    if first_runs == "before":
        await proxy.release()  # the settle the limiter gave up on reaches Redis, and runs
        assert await counted(redis_server) == settled
        proxy.admit()  # the probe reaches Redis, and sends the settle again
        await wait_until(lambda: limiter.available)
        assert await counted(redis_server) == settled, "sent again, it corrects nothing more"
    else:
        proxy.admit()
        await wait_until(lambda: limiter.available)  # which it is only once the settle has been sent again
        assert await counted(redis_server) == settled, "settled before calls are counted again"
        await proxy.release()  # only now does the first settle reach Redis
        assert await counted(redis_server) == settled, "run late, it corrects nothing more"
    assert await records(redis_server) == ["settled", "settled"]


async def test_a_call_that_failed_while_redis_was_frozen_gives_back_what_it_reserved(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    # The budget (5,000 micro-USD) fits one call's reservation (3,000), not two.
    gateway, stub = await start(config(primary, local, redis_server.url, limits="budget_usd_per_day: 0.005"))
    primary.inject({"stall_s": 3})  # longer than the router waits for an answer (first_chunk_timeout_s): it fails
    failing = asyncio.ensure_future(stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10))
    await wait_until(lambda: len(primary.chat_requests) == 1)  # reserved, and at the upstream
    assert await counted(redis_server) == Counts(requests=0, tokens=0, spend=3000)
    redis_server.pause()  # for longer than state.timeout_s: the call's settle goes unanswered
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await failing
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    await wait_until(lambda: not available(gateway))  # the error is sent before the call settles
    redis_server.resume()
    await wait_until(lambda: available(gateway))
    assert await counted(redis_server) == Counts(requests=0, tokens=0, spend=0), "it was billed nothing"
    answer = await stub.Complete(REQUEST, metadata=AUTHORIZED, timeout=10)  # admitted: the budget is whole
    assert await counted(redis_server) == Counts(requests=0, tokens=0, spend=answer.usage.cost.usd_micros)


async def test_the_slot_of_a_stream_that_ended_while_redis_was_frozen_frees_when_it_is_back(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    gateway, stub = await start(config(primary, local, redis_server.url, limits="concurrent_streams: 1"))
    primary.inject({"trickle_s": 0.2})
    ending = stub.StreamComplete(stream_chat("a b c"), metadata=AUTHORIZED, timeout=10)
    assert await ending.read() is not grpc.aio.EOF  # the stream holds the slot
    assert await counted(redis_server) == Counts(requests=0, tokens=0, spend=0, streams=1)
    redis_server.pause()  # the stream ends meanwhile, and its settle goes unanswered
    while await ending.read() is not grpc.aio.EOF:
        pass
    assert await ending.code() == grpc.StatusCode.OK
    await wait_until(lambda: not available(gateway))
    redis_server.resume()
    await wait_until(lambda: available(gateway))
    # Freed now, not when its lease (renewed until the stream ended) lapses.
    assert await counted(redis_server) == Counts(requests=0, tokens=0, spend=0, streams=0)
    chunks = [chunk async for chunk in stub.StreamComplete(stream_chat(), metadata=AUTHORIZED, timeout=10)]
    assert chunks, "admitted: the slot is free"


@pytest.mark.parametrize("broken", ["held", f"{SUBJECT}:tokens"])
async def test_a_settle_that_meets_a_key_of_another_kind_corrects_once_it_is_remade(
    redis_server: RedisServer, broken: str
) -> None:
    """The settle marked its record as run, then failed on the key (WRONGTYPE), what it wrote until then kept: sent
    again once the key was deleted, it found its record marked and corrected nothing, its call counted as reserved."""
    limiter = RedisLimiter(redis_server.url, timeout_s=2.0)
    await limiter.start()
    try:
        call = await limiter.reserve([ask(100, 500, stream=True)])
        admin = redis.asyncio.from_url(redis_server.url)
        await admin.delete(f"{KEY_PREFIX}{broken}")
        await admin.set(f"{KEY_PREFIX}{broken}", "written by another application")
        await admin.aclose()
        await limiter.settle(call, tokens=10, usd_micros=5)
        expected = Counts(requests=1, tokens=0 if "tokens" in broken else 10, spend=5, streams=0)
        assert await counted(redis_server) == expected, "settled, the broken key counted anew"
        assert limiter.available
    finally:
        await limiter.aclose()


@pytest.mark.parametrize("redis_back", [True, False], ids=["back within the timeout", "not back"])
async def test_a_stop_waits_for_the_settles_waiting_on_redis(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, redis_back: bool
) -> None:
    """A gateway stops once its calls have ended, their settles perhaps still waiting on Redis: the limiter's close
    took the client from under them, and they were lost, with no WARNING. It waits for them, within state.timeout_s,
    and says how many it could not send."""
    caplog.set_level(logging.WARNING, logger=LIMITS_LOG)
    limiter = RedisLimiter(redis_server.url, timeout_s=1.0, probe_interval_s=0.1)
    await limiter.start()
    call = await limiter.reserve([ask(10, 100, stream=True)])
    redis_server.pause()
    try:
        settling = asyncio.ensure_future(limiter.settle(call, tokens=4, usd_micros=40))
        await asyncio.sleep(0.1)  # sent, waiting on Redis
        closing = asyncio.ensure_future(limiter.aclose())
        await asyncio.sleep(0.3)
        if redis_back:
            redis_server.resume()
        await asyncio.gather(settling, closing)
    finally:
        redis_server.resume()
    warnings = [r.getMessage() for r in caplog.records if r.name == LIMITS_LOG and "not settled" in r.getMessage()]
    if redis_back:
        assert await counted(redis_server) == Counts(requests=1, tokens=4, spend=40, streams=0)
        assert warnings == []
    else:
        assert len(warnings) == 1 and "1 calls that ended or gave up waiting are not settled" in warnings[0]


async def test_settles_past_the_most_kept_stay_as_reserved_and_say_so(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LIMITS_LOG)
    limiter = RedisLimiter(redis_server.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1, max_kept=2)
    await limiter.start()
    try:
        calls = [await limiter.reserve([ask(10, 100)]) for _ in range(3)]
        redis_server.pause()
        for call in calls:
            await limiter.settle(call, tokens=0, usd_micros=0)  # two kept, the third dropped
        redis_server.resume()
        await wait_until(lambda: limiter.available)
        assert await counted(redis_server) == Counts(requests=3, tokens=10, spend=100), "the third as reserved"
    finally:
        await limiter.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == LIMITS_LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # Redis went; the first settle not kept; and how many, when it is back
    assert "2 settles and undos wait for Redis" in warnings[1] and "stay counted as they were reserved" in warnings[1]
    assert "1 more could not be kept" in warnings[2]


async def test_the_spend_of_settles_not_kept_stays_counted_while_the_gateway_runs(redis_server: RedisServer) -> None:
    """A settle dropped (past the most kept) leaves its call counted as reserved: its held spend's lease is renewed
    still, so that no reservation (of another gateway) gives that spend back when it would have lapsed."""
    lease_s = 3.0
    limiter = RedisLimiter(
        redis_server.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1, max_kept=1, stream_lease_s=lease_s
    )
    other = RedisLimiter(redis_server.url, timeout_s=SHORT_TIMEOUT_S, stream_lease_s=lease_s)
    await limiter.start()
    await other.start()
    budget = Limits(budget_usd_per_day=0.01)  # 10,000 micro-USD
    try:
        calls = [await limiter.reserve([Ask(SUBJECT, budget, 0, 3000, False)]) for _ in range(3)]
        redis_server.pause()
        for call in calls:
            await limiter.settle(call, tokens=0, usd_micros=3000)  # one kept, two dropped
        redis_server.resume()
        await wait_until(lambda: limiter.available)
        await asyncio.sleep(lease_s + 0.5)  # past the leases, had they not been renewed
        with pytest.raises(LimitExceededError) as caught:
            await other.reserve([Ask(SUBJECT, budget, 0, 3000, False)])
        assert caught.value.kind is LimitKind.BUDGET_PER_DAY, "9,000 of 10,000 spent"
        assert (await counted(redis_server)).spend == 9000
    finally:
        await limiter.aclose()
        await other.aclose()


async def test_a_stream_open_through_an_outage_longer_than_its_lease_holds_its_slot_again(
    redis_server: RedisServer,
) -> None:
    lease_s = 0.6  # renewed every 0.2 s
    limiter = RedisLimiter(redis_server.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1, stream_lease_s=lease_s)
    one_stream = Limits(concurrent_streams=1)
    await limiter.start()
    try:
        open_stream = await limiter.reserve([Ask(SUBJECT, one_stream, 0, 0, True)])
        redis_server.pause()
        await wait_until(lambda: not limiter.available)  # a renewal went unanswered
        await asyncio.sleep(2 * lease_s)  # Redis's clock runs on: the lease lapses while it is away
        redis_server.resume()
        await wait_until(lambda: limiter.available)
        # The stream is still open: the first renewal since Redis is back counts it again.
        loop = asyncio.get_running_loop()
        began = loop.time()
        while await live_leases(redis_server) != 1:
            assert loop.time() - began < 5 * lease_s, "the open stream's lapsed lease is not renewed"
            await asyncio.sleep(0.05)
        with pytest.raises(LimitExceededError) as caught:
            await limiter.reserve([Ask(SUBJECT, one_stream, 0, 0, True)])
        assert caught.value.kind is LimitKind.CONCURRENT_STREAMS
        await limiter.settle(open_stream, tokens=0, usd_micros=0)
        await asyncio.sleep(lease_s)  # renewals run meanwhile: none brings the settled stream's lease back
        assert await live_leases(redis_server) == 0
        second = await limiter.reserve([Ask(SUBJECT, one_stream, 0, 0, True)])
        await limiter.settle(second, tokens=0, usd_micros=0)
    finally:
        await limiter.aclose()


async def test_an_idle_gateway_finds_redis_gone_within_a_renewal(redis_server: RedisServer) -> None:
    """With no stream open, nothing asked Redis until a call came: Health said the limits' store was available for as
    long as Redis was down, and the first call then waited state.timeout_s to find out."""
    lease_s = 0.6  # renewed, or Redis probed, every 0.2 s
    limiter = RedisLimiter(redis_server.url, timeout_s=SHORT_TIMEOUT_S, probe_interval_s=0.1, stream_lease_s=lease_s)
    await limiter.start()
    try:
        redis_server.pause()
        try:
            await wait_until(lambda: not limiter.available, timeout_s=5 * lease_s)
        finally:
            redis_server.resume()
        await wait_until(lambda: limiter.available)
    finally:
        await limiter.aclose()


async def live_leases(redis_server: RedisServer) -> int:
    """The research key's stream leases that have not lapsed (by Redis's clock)."""
    client = redis.asyncio.from_url(redis_server.url)
    try:
        seconds, micros = await client.time()
        return int(await client.zcount(f"{KEY_PREFIX}{SUBJECT}:streams", seconds * 1000 + micros // 1000, "+inf"))
    finally:
        await client.aclose()


# --- a Redis that lost what it counted (restarted without persistence, flushed) -------------------------------------

# Each call reserves 600 completion tokens at 1,000 micro-USD: 0.6 USD of a 1 USD budget, so one fits and two do not.
BIG_REQUEST = chat("x y", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=600))
BIG_STREAM = stream_chat("a b c d", model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=600))
# A stream that stays open for about 20 s, a chunk every 1.5 s (within FAST_ROUTER's stream_idle_timeout_s).
LONG_STREAM = stream_chat(
    " ".join("abcdefghijklm"), model="gpt-test", exact_model=True, options=pb.CompletionOptions(max_tokens=600)
)
SLOW_CHUNKS = {"trickle_s": 1.5}
FORGETFUL_TIMEOUT_S = 2.0
"""state.timeout_s here: Redis answers, having forgotten; a busy machine's slow answer is not what is tested."""


async def flushed(redis_server: RedisServer) -> None:
    """Empties Redis, as a restart without persistence leaves it."""
    client = redis.asyncio.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def test_a_call_redis_forgot_settles_without_taking_from_the_calls_counted_since(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    _, stub = await start(config(primary, local, redis_server.url, FORGETFUL_TIMEOUT_S, "budget_usd_per_day: 1"))
    primary.inject({"trickle_s": 0.3}, SLOW_CHUNKS)
    forgotten = stub.StreamComplete(BIG_STREAM, metadata=AUTHORIZED, timeout=20)
    assert await forgotten.read() is not grpc.aio.EOF
    assert (await counted(redis_server)).spend == 600_000
    await flushed(redis_server)
    counted_since = stub.StreamComplete(LONG_STREAM, metadata=AUTHORIZED, timeout=30)
    assert await counted_since.read() is not grpc.aio.EOF, "admitted: Redis forgot the first"
    while await forgotten.read() is not grpc.aio.EOF:
        pass
    assert await forgotten.code() == grpc.StatusCode.OK
    # The first call's settle (it reserved 0.6 USD and was billed far less) must not take its over-reservation out
    # of the second's, which Redis does count: the day still holds the second's 0.6 USD.
    await asyncio.sleep(0.2)
    assert (await counted(redis_server)).spend == 600_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(BIG_REQUEST, metadata=AUTHORIZED, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    counted_since.cancel()


async def test_a_stream_redis_forgot_has_its_slot_back_at_its_next_renewal(
    start: Any, primary: FakeUpstream, local: FakeUpstream, redis_server: RedisServer
) -> None:
    _, stub = await start(config(primary, local, redis_server.url, FORGETFUL_TIMEOUT_S, "concurrent_streams: 1"))
    primary.inject(SLOW_CHUNKS)
    open_stream = stub.StreamComplete(LONG_STREAM, metadata=AUTHORIZED, timeout=30)
    assert await open_stream.read() is not grpc.aio.EOF
    assert (await counted(redis_server)).streams == 1
    await flushed(redis_server)
    # The gateway renews its open streams' leases every 5 s: the first renewal since counts the stream again, so
    # that the key is not given a second stream while it still has one.
    loop = asyncio.get_running_loop()
    began = loop.time()
    while (await counted(redis_server)).streams != 1:
        assert loop.time() - began < 10, "the open stream's slot is not counted again"
        await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamComplete(stream_chat(), metadata=AUTHORIZED, timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)["ErrorInfo"].reason == "CONCURRENT_STREAMS_EXCEEDED"
    open_stream.cancel()
    loop_began = loop.time()
    while (await counted(redis_server)).streams != 0:
        assert loop.time() - loop_began < 5, "the cancelled stream's slot is not freed"
        await asyncio.sleep(0.05)
