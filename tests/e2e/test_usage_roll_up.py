"""Old usage kept by the day (server.usage_by_minute_days), in a SQLite file and in a real PostgreSQL: totals stay
exact, a window takes an old day whole, recent minutes stay as they are, nothing is lost or counted twice while
ledgers on one database record and roll up at once, and a database that refuses the roll-up is said and still
written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from llmrelay import v1 as pb
from llmrelay_server.config import is_postgresql
from llmrelay_server.domain import Cost, TokenUsage
from llmrelay_server.usage import UsageLedger, UsageTotals
from llmrelay_server.usage import ledger as ledger_module
from llmrelay_server.usage.ledger import open_store
from support import StubFactory, chat, two_backends, wait_until
from upstream import FakeUpstream

DAY = 86_400
TODAY = int(time.time()) // DAY * DAY
OLDER, OLD = TODAY - 40 * DAY, TODAY - 5 * DAY
BY_MINUTE_DAYS = 2
MINUTES = (0, 1, 59, 600, 1439)
"""Minutes of an old day with records: its first (the row the day is kept in), its last, some between."""


@pytest.fixture(params=["sqlite", "postgresql"])
def usage_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new ledger database: a SQLite file, or a database of the shared PostgreSQL server."""
    return str(tmp_path / "usage.db") if request.param == "sqlite" else str(request.getfixturevalue("database_url"))


def ledger_on(usage_db: str, journal: Path, flush_interval_s: float) -> UsageLedger:
    return UsageLedger(usage_db, journal_dir=journal, by_minute_days=BY_MINUTE_DAYS, flush_interval_s=flush_interval_s)


def sql(usage_db: str, query: str) -> list[tuple[object, ...]]:
    if is_postgresql(usage_db):
        with psycopg.connect(usage_db) as pg:
            cursor = pg.execute(query)
            return cursor.fetchall() if cursor.description is not None else []
    with contextlib.closing(sqlite3.connect(usage_db)) as connection:
        return connection.execute(query).fetchall()


def old_day_records(ledger: UsageLedger, day: int) -> int:
    """Records at MINUTES of the day for two callers (tokens and cost that tell the minutes apart); how many."""
    for minute in MINUTES:
        for caller in ("alice", "bob"):
            usage = TokenUsage(minute + 1, 2, estimated=minute == 59, cost=Cost(minute * 10, estimated=minute == 59))
            ledger.record("openai", "gpt-4o", caller, usage, at=day + minute * 60 + 7)
    return len(MINUTES) * 2


def rows(usage_db: str, before: int | None = None) -> list[tuple[object, ...]]:
    where = f" WHERE bucket_start < {before}" if before is not None else ""
    return sql(
        usage_db,
        f"SELECT backend, model, caller, bucket_start, requests FROM usage_buckets{where}"
        " ORDER BY bucket_start, backend, model, caller",
    )


def finer_rows_before(usage_db: str, before: int) -> int:
    """Rows before `before` that are not a day's: what a roll-up has left to do."""
    return sum(1 for row in rows(usage_db, before) if int(str(row[3])) % DAY)


async def test_days_older_than_by_minute_days_are_kept_by_the_day_with_exact_totals(
    usage_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = ledger_on(usage_db, tmp_path / "journal", flush_interval_s=0.01)
    recorded = old_day_records(ledger, OLDER) + old_day_records(ledger, OLD)
    for minute in range(3):
        ledger.record("ollama", "tiny", "alice", TokenUsage(3, 4), at=TODAY + minute * 60)
    totals = await ledger.query()
    inside_the_old_day = await ledger.query(start=OLD + 60, end=OLD + DAY)
    old_day = await ledger.query(start=OLD, end=OLD + DAY)
    assert sum(t.requests for t in inside_the_old_day) == 8  # by the minute, before the roll-up

    caplog.set_level(logging.INFO, logger=ledger_module.__name__)
    await ledger.start()
    await wait_until(
        lambda: finer_rows_before(usage_db, TODAY - BY_MINUTE_DAYS * DAY) == 0 and len(rows(usage_db)) == 7
    )

    assert rows(usage_db) == [
        ("openai", "gpt-4o", "alice", OLDER, 5),
        ("openai", "gpt-4o", "bob", OLDER, 5),
        ("openai", "gpt-4o", "alice", OLD, 5),
        ("openai", "gpt-4o", "bob", OLD, 5),
        *(("ollama", "tiny", "alice", TODAY + minute * 60, 1) for minute in range(3)),  # recent: by the minute
    ]
    assert await ledger.query() == totals
    assert sum(t.requests for t in totals) == recorded + 3
    assert {t.caller: t.cost_usd_micros for t in totals if t.backend == "openai"} == {
        "alice": 2 * sum(minute * 10 for minute in MINUTES),
        "bob": 2 * sum(minute * 10 for minute in MINUTES),
    }
    # An old day is taken whole by a window that holds its start, and not at all by one that does not.
    assert await ledger.query(start=OLD + 60, end=OLD + DAY) == []
    assert await ledger.query(start=OLD, end=OLD + 60) == old_day
    assert [t.requests for t in await ledger.query(start=TODAY + 60, end=TODAY + 120)] == [1]
    # The pass is said once it finds no day left to merge, at a flush after the last day's: waited for, as the rows
    # (on a busy machine the assertions above can come first).
    said = f"16 rows of usage before {time.strftime('%Y-%m-%d', time.gmtime(TODAY - BY_MINUTE_DAYS * DAY))}"
    await wait_until(lambda: said in caplog.text)
    await ledger.aclose()


async def test_records_of_an_old_day_written_after_its_roll_up_are_merged_at_the_next(
    usage_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal replayed after a long outage, or claimed from a dead process, brings records of days already kept by
    the day."""
    monkeypatch.setattr(ledger_module, "_ROLL_UP_INTERVAL_S", 0.0)
    ledger = ledger_on(usage_db, tmp_path / "journal", flush_interval_s=0.01)
    old_day_records(ledger, OLD)
    await ledger.flush()
    assert len(rows(usage_db)) == 10  # by the minute
    await ledger.start()
    await wait_until(
        lambda: rows(usage_db) == [("openai", "gpt-4o", "alice", OLD, 5), ("openai", "gpt-4o", "bob", OLD, 5)]
    )

    ledger.record("openai", "gpt-4o", "bob", TokenUsage(1000, 1), at=OLD + 3 * 3600)
    ledger.record("openai", "gpt-4o", "bob", TokenUsage(2000, 2), at=OLD)  # into the day's row itself
    await wait_until(
        lambda: rows(usage_db) == [("openai", "gpt-4o", "alice", OLD, 5), ("openai", "gpt-4o", "bob", OLD, 7)]
    )
    (bob,) = await ledger.query(caller="bob")
    assert (bob.requests, bob.prompt_tokens, bob.completion_tokens) == (7, sum(m + 1 for m in MINUTES) + 3000, 13)
    await ledger.aclose()


async def test_ledgers_on_one_database_recording_and_rolling_up_at_once_count_every_record_once(
    usage_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers of a gateway share the file, gateways a PostgreSQL: each writes its batches and rolls up old days, and a
    batch of old records must not come between another's sums and its deletion."""
    monkeypatch.setattr(ledger_module, "_ROLL_UP_INTERVAL_S", 0.0)
    ledgers = [ledger_on(usage_db, tmp_path / "journal", flush_interval_s=0.002) for _ in range(3)]
    for ledger in ledgers:
        await ledger.start()
    callers, each = 12, 150
    days = (OLDER, OLD, OLD + DAY, TODAY)

    async def agent(number: int) -> None:
        rng = random.Random(number)
        ledger = ledgers[number % len(ledgers)]
        for i in range(each):
            moment = rng.choice(days) + rng.randrange(DAY)
            ledger.record("b", "m", f"caller-{number % 4}", TokenUsage(number + 1, i), at=moment)
            if i % 5 == 0:
                await asyncio.sleep(rng.random() / 200)

    await asyncio.gather(*(agent(n) for n in range(callers)))
    await asyncio.gather(*(ledger.aclose() for ledger in ledgers))

    store = open_store(usage_db)
    before = TODAY - BY_MINUTE_DAYS * DAY
    while await store.roll_up(before):  # what came after the ledgers' last roll-up
        pass
    await store.aclose()
    assert finer_rows_before(usage_db, before) == 0
    reopened = UsageLedger(usage_db, journal_dir=tmp_path / "journal")
    totals = {t.caller: t for t in await reopened.query()}
    await reopened.aclose()
    for caller in range(4):
        agents = [n for n in range(callers) if n % 4 == caller]
        assert totals[f"caller-{caller}"] == UsageTotals(
            "b",
            "m",
            f"caller-{caller}",
            requests=len(agents) * each,
            prompt_tokens=sum((n + 1) * each for n in agents),
            completion_tokens=len(agents) * sum(range(each)),
            total_tokens=sum((n + 1) * each for n in agents) + len(agents) * sum(range(each)),
            estimated_requests=0,
        )


async def test_a_database_that_refuses_the_roll_up_is_said_and_still_written(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger's role that may write but not DELETE (an operator's least privilege): the roll-up fails each time it
    is tried, and must say why without taking the ledger for unavailable."""
    seeding = UsageLedger(database_url, journal_dir=tmp_path / "journal")
    old_day_records(seeding, OLD)
    await seeding.aclose()
    writer = f"writer_{secrets.token_hex(4)}"  # roles are the server's, shared by the module's tests
    sql(
        database_url,
        f"CREATE ROLE {writer} LOGIN; GRANT SELECT, INSERT, UPDATE ON usage_buckets, applied_batches, schema_version"
        f" TO {writer}",
    )
    ledger = ledger_on(database_url.replace("postgres@", f"{writer}@"), tmp_path / "journal", flush_interval_s=0.01)
    ledger.record("ollama", "tiny", "alice", TokenUsage(3, 4))
    await ledger.start()

    await wait_until(lambda: "could not keep old usage by the day" in caplog.text)
    await wait_until(lambda: len(rows(database_url)) == 11)
    assert "permission denied for table usage_buckets" in caplog.text
    assert "tried again in an hour" in caplog.text
    assert ledger.health().available and "unavailable" not in caplog.text
    assert finer_rows_before(database_url, TODAY) == 8  # left by the minute
    await ledger.aclose()


async def test_get_usage_of_a_gateway_that_keeps_old_days_by_the_day(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, tmp_path: Path
) -> None:
    seeding = UsageLedger(tmp_path / "usage.db")  # the gateway factory's ledger file
    old_day_records(seeding, OLD)
    await seeding.aclose()
    stub = await stub_for(two_backends(primary, local), server=f"usage_by_minute_days: {BY_MINUTE_DAYS}")
    answer = await stub.Complete(chat("today"), timeout=5, metadata=(("x-llmrelay-caller", "alice"),))

    await wait_until(lambda: finer_rows_before(str(tmp_path / "usage.db"), TODAY) == 0)

    async def requests(start: int | None = None, end: int | None = None) -> dict[tuple[str, str], int]:
        window = pb.GetUsageRequest(
            start_time=Timestamp(seconds=start) if start is not None else None,
            end_time=Timestamp(seconds=end) if end is not None else None,
        )
        return {(r.model, r.caller): r.requests for r in (await stub.GetUsage(window, timeout=5)).records}

    old = {("gpt-4o", "alice"): 5, ("gpt-4o", "bob"): 5}
    assert await requests() == {**old, ("gpt-test", "alice"): 1}
    assert await requests(OLD, OLD + 60) == old  # the day, whole
    assert await requests(OLD + 60, OLD + DAY) == {}
    now = int(time.time()) // 60 * 60
    assert await requests(now - 60, now + 60) == {("gpt-test", "alice"): 1}
    (alice,) = (
        await stub.GetUsage(pb.GetUsageRequest(caller="alice", start_time=Timestamp(seconds=TODAY)), timeout=5)
    ).records
    assert alice.total_tokens == answer.usage.total_tokens
