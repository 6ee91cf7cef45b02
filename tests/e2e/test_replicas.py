"""Three gateway processes sharing one real Redis (limits) and one real PostgreSQL (the ledger), as replicas behind a
balancer would: the limits hold once across them, the ledger's totals are the usage the callers were given, and a
replica killed, Redis stopped or PostgreSQL stopped under load loses nothing and stops nothing."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from harness import GatewayProcess
from llmrelay import v1 as pb
from postgres_server import PostgresServer, PostgresTemplate
from redis_server import RedisServer
from support import chat, details, in_background, start_server, wait_until
from upstream import FakeUpstream

REPLICAS = 3
PRICE = "{prompt: 1000, completion: 1000}"  # USD per million tokens: a call costs about a tenth of a dollar


def key_of(name: str) -> str:
    return f"llmr-replica-{name}-0123456789abcdefghij"


KEYS = {
    "rpm": "requests_per_minute: 20",
    "tpm-one": "tokens_per_minute: 1500",
    "tpm-all": "tokens_per_minute: 1500",
    "budget-one": "budget_usd_per_day: 1.0",
    "budget-all": "budget_usd_per_day: 1.0",
    "load": "requests_per_minute: 100000",
}


def config(tmp_path: Path, redis_url: str, database_url: str, on_unavailable: str = "allow") -> Path:
    keys = "\n".join(
        f'    - {{name: {name}, sha256: "{hashlib.sha256(key_of(name).encode()).hexdigest()}", limits: {{{limits}}}}}'
        for name, limits in KEYS.items()
    )
    # Who reads the whole ledger: a key reads only its own usage unless it may read all.
    keys += f'\n    - {{name: operator, sha256: "{hashlib.sha256(key_of("operator").encode()).hexdigest()}",'
    keys += " read_all_usage: true}"
    path = tmp_path / f"replica-{on_unavailable}.yaml"
    path.write_text(
        f'server: {{usage_db: "{database_url}", usage_journal_dir: "{tmp_path / "journal"}", drain_s: 0,'
        " grace_period_s: 5, health_interval_s: 1}\n"
        f'state: {{redis_url: "{redis_url}", on_unavailable: {on_unavailable}, timeout_s: 5}}\n'
        f"auth:\n  keys:\n{keys}\n"
        f'pricing: {{"tiny": {PRICE}}}\n'
    )
    return path


@dataclass
class Replicas:
    processes: list[GatewayProcess]
    channels: list[grpc.aio.Channel]

    @property
    def stubs(self) -> list[pb.LLMServiceAsyncStub]:
        return [pb.LLMServiceStub(channel) for channel in self.channels]


@pytest.fixture
async def pg(postgres_template: PostgresTemplate) -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own: the tests stop it."""
    server = PostgresServer(postgres_template)
    server.start()
    yield server
    server.remove()


async def start_replicas(configs: Sequence[Path], local: FakeUpstream) -> Replicas:
    processes = list(await asyncio.gather(*(start_server(path, local) for path in configs)))
    try:
        await asyncio.gather(*(process.wait_listening() for process in processes))
    except BaseException:
        # One that exited as it started fails the test: the others are not left serving after it.
        await asyncio.gather(*(process.stop() for process in processes))
        raise
    return Replicas(processes, [grpc.aio.insecure_channel(process.target) for process in processes])


async def stop_replicas(replicas: Replicas) -> None:
    for channel in replicas.channels:
        await channel.close()
    for process in replicas.processes:
        if process.process.returncode is None:
            process.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        codes = [await process.process.wait() for process in replicas.processes]
    assert all(code in (0, -signal.SIGKILL) for code in codes), codes


@pytest.fixture
async def replicas(
    tmp_path: Path, local: FakeUpstream, redis_server: RedisServer, pg: PostgresServer
) -> AsyncIterator[Replicas]:
    path = config(tmp_path, redis_server.url, pg.create_database("ledger"))
    started = await start_replicas([path] * REPLICAS, local)
    yield started
    await stop_replicas(started)


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key_of(name)}"),)


Outcome = pb.CompleteResponse | grpc.aio.AioRpcError


async def burst(stubs: Sequence[pb.LLMServiceAsyncStub], key: str, calls: int, local: FakeUpstream) -> list[Outcome]:
    """`calls` identical calls at once, spread over `stubs`; each admitted one waits a second at the upstream, so
    that every admission is decided before any call ends and settles its reservation."""
    local.inject(*[{"stall_s": 1.0}] * calls)

    async def one(index: int) -> Outcome:
        stub = stubs[index % len(stubs)]
        try:
            return await stub.Complete(
                chat("the same question", options=pb.CompletionOptions(max_tokens=100)),
                timeout=20,
                metadata=bearer(key),
            )
        except grpc.aio.AioRpcError as error:
            return error

    try:
        return list(await asyncio.gather(*(one(index) for index in range(calls))))
    finally:
        local.reset()  # the stalls of the calls refused before the upstream


def answered(outcomes: Sequence[Outcome]) -> list[pb.CompleteResponse]:
    return [outcome for outcome in outcomes if isinstance(outcome, pb.CompleteResponse)]


def refusals(outcomes: Sequence[Outcome]) -> Counter[str]:
    return Counter(
        f"{outcome.code().name}:{details(outcome)['ErrorInfo'].reason}"
        for outcome in outcomes
        if isinstance(outcome, grpc.aio.AioRpcError)
    )


async def ledger_totals(stub: pb.LLMServiceAsyncStub) -> tuple[int, int]:
    """Requests and total tokens in the ledger, over every caller."""
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=10, metadata=bearer("operator"))).records
    return sum(r.requests for r in records), sum(r.total_tokens for r in records)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 30) -> None:
    """Until the gateways answer `check()` with True (asked again every 0.1 s)."""
    async with asyncio.timeout(within_s):
        while not await check():  # noqa: ASYNC110 (asked over the network)
            await asyncio.sleep(0.1)


async def test_limits_hold_once_across_replicas_and_the_ledger_is_what_callers_got(
    replicas: Replicas, local: FakeUpstream
) -> None:
    stubs = replicas.stubs
    rpm = await burst(stubs, "rpm", 45, local)
    assert len(answered(rpm)) == 20  # one limit of 20 for the three, not 20 each
    assert refusals(rpm) == Counter({"RESOURCE_EXHAUSTED:REQUESTS_PER_MINUTE_EXCEEDED": 25})
    given = answered(rpm)

    # Tokens and money: what one replica admits alone, the three admit together, and no more.
    for limit, reason in (("tpm", "TOKENS_PER_MINUTE_EXCEEDED"), ("budget", "BUDGET_EXCEEDED")):
        alone = await burst(stubs[:1], f"{limit}-one", 30, local)
        together = await burst(stubs, f"{limit}-all", 30, local)
        assert 0 < len(answered(alone)) < 30, limit
        assert len(answered(together)) == len(answered(alone)), limit
        assert refusals(together) == Counter({f"RESOURCE_EXHAUSTED:{reason}": 30 - len(answered(alone))})
        given += answered(alone) + answered(together)

    # Every replica reads the one ledger, and it holds exactly what the callers were given.
    for stub in stubs:
        assert await ledger_totals(stub) == (len(given), sum(answer.usage.total_tokens for answer in given))


async def steady_load(
    stubs: Sequence[pb.LLMServiceAsyncStub], given: list[pb.CompleteResponse], stop: asyncio.Event
) -> Counter[str]:
    """Calls on every replica, eight at a time, until `stop`; the answers go to `given`; the failures are counted."""
    failures: Counter[str] = Counter()

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while not stop.is_set():
            try:
                given.append(await stub.Complete(chat(f"load {index}"), timeout=10, metadata=bearer("load")))
            except grpc.aio.AioRpcError as error:
                failures[f"{index % len(stubs)}:{error.code().name}"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(caller(index) for index in range(8)))
    return failures


async def test_a_replica_killed_under_load_loses_no_answered_call(replicas: Replicas) -> None:
    given: list[pb.CompleteResponse] = []
    stop = asyncio.Event()
    async with in_background(steady_load(replicas.stubs, given, stop)) as load:
        await wait_until(lambda: len(given) >= 60)
        os.kill(replicas.processes[1].process.pid, signal.SIGKILL)  # its last answers are only in its journal
        at_kill = len(given)
        await wait_until(lambda: len(given) >= at_kill + 60)  # the other two go on
        stop.set()
        failures = await load
    assert all(where.startswith("1:") for where in failures), failures  # only the killed one's callers failed
    # The dead replica's journal is taken over by the others (they share the host's journal directory). A call it
    # had billed when it died may not have reached its caller: billed all the same, as the upstream did the work.
    in_flight = sum(failures.values())
    requests, tokens = await ledger_reaching(replicas.stubs[0], len(given))
    assert len(given) <= requests <= len(given) + in_flight
    assert tokens >= sum(answer.usage.total_tokens for answer in given)


async def test_redis_stopped_under_load_the_chosen_policy_holds_and_limits_come_back(
    tmp_path: Path, local: FakeUpstream, redis_server: RedisServer, pg: PostgresServer
) -> None:
    database = pg.create_database("ledger")
    allowing, denying = (
        config(tmp_path, redis_server.url, database),
        config(tmp_path, redis_server.url, database, on_unavailable="deny"),
    )
    replicas = await start_replicas([allowing, allowing, denying], local)
    try:
        stubs = replicas.stubs
        given: list[pb.CompleteResponse] = []
        stop = asyncio.Event()
        async with in_background(steady_load(stubs[:2], given, stop)) as load:
            await wait_until(lambda: len(given) >= 20)
            await redis_server.stop()
            # Allow: the two go on serving, uncounted. Deny: the third refuses, saying why and when to retry.
            at_stop = len(given)
            await wait_until(lambda: len(given) >= at_stop + 40)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stubs[2].Complete(chat(), timeout=10, metadata=bearer("load"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(refused.value)["ErrorInfo"].reason == "LIMITS_UNAVAILABLE"
            assert details(refused.value)["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
            for stub in stubs:
                limits = await limits_store(stub)
                assert (limits.kind, limits.available) == ("redis", False)
                assert "cannot be reached" in limits.description

            await redis_server.start()  # the same port, empty: counting starts again
            for stub in stubs:
                await eventually(functools.partial(limits_available, stub))
            assert (await stubs[2].Complete(chat(), timeout=10, metadata=bearer("load"))).usage.total_tokens > 0
            stop.set()
            failures = await load
        # No call of the allowing replicas failed, before, during or after (their logs say why if one did).
        assert failures == Counter(), (failures, [p.text() for p in replicas.processes[:2]])
        rpm = await burst(stubs, "rpm", 30, local)
        assert len(answered(rpm)) == 20  # enforced once across them again
        assert all(process.process.returncode is None for process in replicas.processes)
    finally:
        await stop_replicas(replicas)


async def test_postgresql_stopped_under_load_loses_no_record(
    replicas: Replicas, pg: PostgresServer, local: FakeUpstream
) -> None:
    given: list[pb.CompleteResponse] = []
    stop = asyncio.Event()
    async with in_background(steady_load(replicas.stubs, given, stop)) as load:
        await wait_until(lambda: len(given) >= 30)
        pg.stop()
        at_stop = len(given)
        await wait_until(lambda: len(given) >= at_stop + 60)  # answers go on
        await eventually(functools.partial(ledger_down, replicas.stubs[0]))  # at its next write
        ledger = await ledger_store(replicas.stubs[0])
        assert ledger.kind == "postgresql" and ledger.pending_records > 0 and "unavailable" in ledger.description
        with pytest.raises(grpc.aio.AioRpcError) as unreadable:
            await replicas.stubs[0].GetUsage(pb.GetUsageRequest(), timeout=15, metadata=bearer("load"))
        assert unreadable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(unreadable.value)["ErrorInfo"].reason == "USAGE_UNAVAILABLE"
        pg.start()
        stop.set()
        assert await load == Counter()
    expected = (len(given), sum(answer.usage.total_tokens for answer in given))
    await eventually(functools.partial(totals_are, replicas.stubs[2], expected))
    for stub in replicas.stubs:
        await eventually(functools.partial(ledger_caught_up, stub))


async def limits_store(stub: pb.LLMServiceAsyncStub) -> pb.StoreHealth:
    health = await stub.Health(pb.HealthRequest(), timeout=10)
    [store] = [store for store in health.stores if store.role == pb.STORE_ROLE_LIMITS]
    return store


async def ledger_store(stub: pb.LLMServiceAsyncStub) -> pb.StoreHealth:
    health = await stub.Health(pb.HealthRequest(), timeout=10)
    [store] = [store for store in health.stores if store.role == pb.STORE_ROLE_USAGE_LEDGER]
    return store


async def totals_are(stub: pb.LLMServiceAsyncStub, expected: tuple[int, int]) -> bool:
    return await ledger_totals(stub) == expected


async def ledger_reaching(stub: pb.LLMServiceAsyncStub, requests: int, within_s: float = 30) -> tuple[int, int]:
    """The ledger's totals once they hold at least `requests` requests, or an assertion saying what they hold."""
    totals = await ledger_totals(stub)
    try:
        async with asyncio.timeout(within_s):
            while totals[0] < requests:
                await asyncio.sleep(0.1)
                totals = await ledger_totals(stub)
    except TimeoutError:
        raise AssertionError(
            f"the ledger holds {totals[0]} requests after {within_s} s; answered: {requests}"
        ) from None
    return totals


async def limits_available(stub: pb.LLMServiceAsyncStub) -> bool:
    return (await limits_store(stub)).available


async def ledger_down(stub: pb.LLMServiceAsyncStub) -> bool:
    return not (await ledger_store(stub)).available


async def ledger_caught_up(stub: pb.LLMServiceAsyncStub) -> bool:
    ledger = await ledger_store(stub)
    return ledger.available and ledger.pending_records == 0
