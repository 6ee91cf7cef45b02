"""The usage ledger: exact totals, time windows, no database I/O on record, and what survives a stop or a crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmrelay_server.domain import TokenUsage, UsageUnavailableError
from llmrelay_server.usage import LedgerUnavailableError, UsageLedger, UsageTotals
from llmrelay_server.usage import ledger as ledger_module
from llmrelay_server.usage.ledger import default_journal_dir
from llmrelay_server.usage.sqlite import SQLiteStore
from support import wait_until

T0 = 1_700_000_040.0  # the start of a minute bucket


@pytest.fixture
async def ledger() -> AsyncIterator[UsageLedger]:
    ledger = UsageLedger(":memory:")
    yield ledger
    await ledger.aclose()


def rows_on_disk(path: Path) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT * FROM usage_buckets ORDER BY backend, model, caller, bucket_start"
        ).fetchall()


def requests_on_disk(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        (requests,) = connection.execute("SELECT COALESCE(SUM(requests), 0) FROM usage_buckets").fetchone()
    return int(requests)


def journal_lines(path: Path) -> list[bytes]:
    """The lines in the journal beside a SQLite ledger, all files together."""
    lines = []
    for batch in sorted(Path(f"{path}.journal").glob("*.jsonl")):
        with contextlib.suppress(FileNotFoundError):  # written and deleted meanwhile
            lines += batch.read_bytes().splitlines()
    return lines


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another connection holds the database's write lock (as another process writing would): writes wait, reads
    go on (WAL)."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.close()


async def test_totals_per_backend_model_and_caller(ledger: UsageLedger) -> None:
    ledger.record("ollama", "gpt-oss:20b", "alice", TokenUsage(100, 20), at=T0)
    ledger.record("ollama", "gpt-oss:20b", "alice", TokenUsage(50, 10, estimated=True), at=T0 + 30)
    ledger.record("ollama", "gpt-oss:20b", "bob", TokenUsage(7, 3), at=T0)
    ledger.record("openai", "gpt-4o", "alice", TokenUsage(1_000, 500), at=T0 + 600)

    totals = await ledger.query()

    assert totals == [
        UsageTotals("openai", "gpt-4o", "alice", 1, 1_000, 500, 1_500, 0),
        UsageTotals("ollama", "gpt-oss:20b", "alice", 2, 150, 30, 180, 1),
        UsageTotals("ollama", "gpt-oss:20b", "bob", 1, 7, 3, 10, 0),
    ]


async def test_filters(ledger: UsageLedger) -> None:
    for backend, model, caller in [("a", "m1", "x"), ("a", "m2", "y"), ("b", "m1", "x")]:
        ledger.record(backend, model, caller, TokenUsage(10, 1), at=T0)
    await ledger.flush()
    ledger.record("a", "m1", "x", TokenUsage(5, 0), at=T0)  # stays buffered: queries must see it too

    assert [t.total_tokens for t in await ledger.query(backend="a", model="m1", caller="x")] == [16]
    assert {(t.backend, t.model) for t in await ledger.query(model="m1")} == {("a", "m1"), ("b", "m1")}
    assert {(t.backend, t.caller) for t in await ledger.query(caller="y")} == {("a", "y")}
    assert await ledger.query(backend="nobody") == []


async def test_time_window_selects_whole_buckets_in_half_open_range() -> None:
    ledger = UsageLedger(":memory:", bucket_s=60)
    ledger.record("b", "m", "c", TokenUsage(1, 0), at=T0 - 1)  # the bucket before
    ledger.record("b", "m", "c", TokenUsage(10, 0), at=T0)  # bucket T0
    ledger.record("b", "m", "c", TokenUsage(100, 0), at=T0 + 59.9)  # still bucket T0
    ledger.record("b", "m", "c", TokenUsage(1_000, 0), at=T0 + 60)  # bucket T0 + 60
    await ledger.flush()
    ledger.record("b", "m", "c", TokenUsage(10_000, 0), at=T0 + 61)  # buffered, bucket T0 + 60

    async def prompt_tokens(start: float | None = None, end: float | None = None) -> int:
        return sum(t.prompt_tokens for t in await ledger.query(start=start, end=end))

    assert await prompt_tokens(start=T0, end=T0 + 60) == 110
    assert await prompt_tokens(start=T0 + 60) == 11_000
    assert await prompt_tokens(end=T0) == 1
    assert await prompt_tokens(start=T0 + 1, end=T0 + 120) == 11_000  # bucket T0 starts before the window
    assert await prompt_tokens() == 11_111
    await ledger.aclose()


async def test_record_writes_the_journal_not_the_database_and_flush_writes_the_database(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    ledger.record("b", "m", "c", TokenUsage(3, 4), at=T0)

    assert rows_on_disk(path) == []
    assert journal_lines(path) == [b'["b","m","c",1700000040,1,3,4,0,0,0,0,0]']
    assert (await ledger.query())[0].total_tokens == 7

    await ledger.flush()

    assert rows_on_disk(path) == [("b", "m", "c", int(T0), 1, 3, 4, 0, 0, 0, 0, 0)]
    assert journal_lines(path) == []  # the batch's file is deleted once the database has it
    assert (await ledger.query())[0].total_tokens == 7  # flushed rows are not counted twice
    await ledger.aclose()


async def test_background_flush_writes_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path, flush_interval_s=0.05)
    await ledger.start()
    ledger.record("b", "m", "c", TokenUsage(3, 4), at=T0)

    await asyncio.sleep(0.3)

    assert rows_on_disk(path) == [("b", "m", "c", int(T0), 1, 3, 4, 0, 0, 0, 0, 0)]
    await ledger.aclose()


async def test_aclose_writes_everything_and_a_new_ledger_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / "usage.sqlite3"
    ledger = UsageLedger(path, flush_interval_s=60)
    await ledger.start()
    for _ in range(25):
        ledger.record("b", "m", "c", TokenUsage(4, 2, estimated=True))

    await ledger.aclose()

    assert await _reopen_and_query(path) == [UsageTotals("b", "m", "c", 25, 100, 50, 150, 25)]


async def test_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    await ledger.aclose()


async def test_record_after_close_is_refused() -> None:
    ledger = UsageLedger(":memory:")
    await ledger.aclose()

    with pytest.raises(RuntimeError, match="closed"):
        ledger.record("b", "m", "c", TokenUsage(1, 1))


@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "memory-only"])
async def test_failed_flush_keeps_the_records_for_the_next_one(tmp_path: Path, journaled: bool) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(
        SQLiteStore(path, busy_timeout_s=0.05), journal_dir=tmp_path / "journal" if journaled else None
    )
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    with write_locked(path):
        with pytest.raises(LedgerUnavailableError, match=f"SQLite {path}: database is locked"):
            await ledger.flush()
        assert [t.total_tokens for t in await ledger.query()] == [15]
        health = ledger.health()
        assert (health.kind, health.available, health.pending_records) == ("sqlite", False, int(journaled))
        assert "database is locked" in health.description
        ledger.record("b", "m", "c", TokenUsage(1, 0), at=T0)
        assert [t.total_tokens for t in await ledger.query()] == [16]
    await ledger.flush()

    assert await ledger.query() == [UsageTotals("b", "m", "c", 2, 11, 5, 16, 0)]
    assert rows_on_disk(path) == [("b", "m", "c", int(T0), 2, 11, 5, 0, 0, 0, 0, 0)]
    assert (ledger.write_failures, ledger.queue_depth(), ledger.health().available) == (1, 0, True)
    await ledger.aclose()


async def test_a_file_locked_when_the_ledger_is_made_is_opened_at_its_first_use(tmp_path: Path) -> None:
    """Another process holding the file's lock past the busy timeout (a backup, a long transaction) stopped the
    gateway's start, and a worker's restart, as a mistake of the configuration; a lock held while it ran did not."""
    path = tmp_path / "usage.sqlite3"
    await SQLiteStore(path).aclose()  # the file made and migrated
    with write_locked(path):
        ledger = UsageLedger(SQLiteStore(path, busy_timeout_s=0.05), journal_dir=tmp_path / "journal")
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
        with pytest.raises(LedgerUnavailableError, match=f"SQLite {path}: database is locked"):
            await ledger.flush()
        assert ledger.health().pending_records == 1
    await ledger.flush()
    assert await ledger.query() == [UsageTotals("b", "m", "c", 1, 10, 5, 15, 0)]
    assert (ledger.queue_depth(), ledger.health().available) == (0, True)
    await ledger.aclose()


async def test_an_outage_while_the_journal_refuses_records_says_they_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It said they were kept in the journal, the line before having said that the journal could not take them."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(SQLiteStore(path, busy_timeout_s=0.05), journal_dir=tmp_path / "journal", journal_max_bytes=1)
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)  # the database up: kept in memory
    with write_locked(path), pytest.raises(LedgerUnavailableError):
        await ledger.flush()
    [outage] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("usage ledger unavailable")]
    assert "records are dropped while the journal cannot take them either (the journal holds its limit" in outage
    await ledger.flush()
    assert [t.total_tokens for t in await ledger.query()] == [15]  # kept in memory through the outage, as it said
    await ledger.aclose()


def file_modes(*directories: Path) -> dict[str, str]:
    """The permissions of the files in these directories, by name."""
    files = [path for directory in directories for path in directory.iterdir() if path.is_file()]
    return {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files}


async def test_the_files_that_hold_usage_are_their_owners_alone(tmp_path: Path) -> None:
    """The journal was 0600, and the SQLite database holding the same totals for every caller (and its -wal and -shm)
    was made under the umask: world-readable, past GetUsage's rule that a key sees only its own usage."""
    umask = os.umask(0o022)
    try:
        ledger = UsageLedger(tmp_path / "usage.db", journal_dir=tmp_path / "journal")
        await ledger.start()
        ledger.record("b", "m", "alice", TokenUsage(10, 5))
        await ledger.flush()
    finally:
        os.umask(umask)
    try:
        modes = await asyncio.to_thread(file_modes, tmp_path, tmp_path / "journal")
        assert {"usage.db", "usage.db-wal", "usage.db-shm", "ledger"} <= set(modes), modes
        assert set(modes.values()) == {"0o600"}, modes
    finally:
        await ledger.aclose()


async def test_concurrent_recording_adds_up_exactly(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.sqlite3", flush_interval_s=0.005)
    await ledger.start()
    callers, per_caller = 50, 40

    async def agent(number: int) -> None:
        rng = random.Random(number)
        for i in range(per_caller):
            ledger.record("b", "m", f"caller-{number % 5}", TokenUsage(number, i, estimated=i % 4 == 0))
            await asyncio.sleep(rng.random() / 1_000)
            if i % 10 == 0:
                await ledger.query()

    await asyncio.gather(*(agent(n) for n in range(callers)))
    live = await ledger.query()
    await ledger.aclose()

    expected_prompt = sum(n * per_caller for n in range(callers))
    expected_completion = callers * sum(range(per_caller))
    for totals in (live, await _reopen_and_query(tmp_path / "usage.sqlite3")):
        assert sum(t.requests for t in totals) == callers * per_caller
        assert sum(t.prompt_tokens for t in totals) == expected_prompt
        assert sum(t.completion_tokens for t in totals) == expected_completion
        assert sum(t.estimated_requests for t in totals) == callers * per_caller // 4
        assert len(totals) == 5


async def test_recording_from_threads_adds_up_exactly(ledger: UsageLedger) -> None:
    await ledger.start()
    threads, per_thread = 8, 2_000
    barrier = threading.Barrier(threads)
    loop = asyncio.get_running_loop()
    finished = [loop.create_future() for _ in range(threads)]

    def record_many(done: asyncio.Future[None]) -> None:
        barrier.wait()
        for _ in range(per_thread):
            ledger.record("b", "m", "c", TokenUsage(2, 1))
        loop.call_soon_threadsafe(done.set_result, None)

    # Plain threads, not to_thread: the default executor may have fewer workers than the barrier needs.
    for done in finished:
        threading.Thread(target=record_many, args=(done,)).start()
    await asyncio.gather(*finished)  # the loop stays free for the background flush meanwhile

    assert await ledger.query() == [
        UsageTotals("b", "m", "c", threads * per_thread, 2 * threads * per_thread, threads * per_thread, 48_000, 0)
    ]


async def _reopen_and_query(path: Path) -> list[UsageTotals]:
    ledger = UsageLedger(path)
    try:
        return await ledger.query()
    finally:
        await ledger.aclose()


@settings(max_examples=40, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.sampled_from(["ollama", "openai"]),
            st.sampled_from(["m1", "m2"]),
            st.sampled_from(["alice", "bob", "anonymous"]),
            st.integers(0, 10_000),
            st.integers(0, 10_000),
            st.booleans(),
            st.floats(T0, T0 + 3_600),
            st.booleans(),  # flush after this record
        ),
        max_size=40,
    ),
    window=st.tuples(st.floats(T0, T0 + 3_600), st.floats(0, 3_600)),
)
def test_totals_equal_the_sums_of_what_was_recorded(
    records: list[tuple[str, str, str, int, int, bool, float, bool]], window: tuple[float, float]
) -> None:
    start, length = window
    end = start + length

    async def scenario() -> list[UsageTotals]:
        ledger = UsageLedger(":memory:")
        for backend, model, caller, prompt, completion, estimated, at, flush in records:
            ledger.record(backend, model, caller, TokenUsage(prompt, completion, estimated), at=at)
            if flush:
                await ledger.flush()
        totals = await ledger.query(start=start, end=end)
        await ledger.aclose()
        return totals

    totals = asyncio.run(scenario())

    expected: dict[tuple[str, str, str], list[int]] = {}
    for backend, model, caller, prompt, completion, estimated, at, _ in records:
        if start <= (at // 60) * 60 < end:
            sums = expected.setdefault((backend, model, caller), [0, 0, 0, 0, 0])
            for index, value in enumerate((1, prompt, completion, prompt + completion, int(estimated))):
                sums[index] += value
    assert {(t.backend, t.model, t.caller): [*_counts(t)] for t in totals} == expected
    assert [t.total_tokens for t in totals] == sorted((t.total_tokens for t in totals), reverse=True)


def _counts(totals: UsageTotals) -> tuple[int, ...]:
    return (
        totals.requests,
        totals.prompt_tokens,
        totals.completion_tokens,
        totals.total_tokens,
        totals.estimated_requests,
    )


# A process that records, says so, keeps recording after a word from the test, and waits to be killed.
_CRASHING_RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from llmrelay_server.domain import TokenUsage
    from llmrelay_server.usage import UsageLedger

    async def main() -> None:
        ledger = UsageLedger(sys.argv[1], flush_interval_s=float(sys.argv[2]))
        await ledger.start()
        for _ in range(100):
            ledger.record("b", "m", "c", TokenUsage(10, 5))
        print("recorded", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for _ in range(50):
            ledger.record("b", "m", "c", TokenUsage(10, 5))
        print("late", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_kill_9_loses_nothing_the_next_ledger_replays_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    interval = 0.2
    child = subprocess.Popen(  # noqa: ASYNC220 - started once; the waits on it below are off the loop
        [sys.executable, "-c", _CRASHING_RECORDER, str(path), str(interval)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30) == "recorded\n"
        await wait_until(lambda: requests_on_disk(path) == 100)  # the background flush wrote the first batch
        child.stdin.write("go\n")
        child.stdin.flush()
        assert await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30) == "late\n"
        child.send_signal(signal.SIGKILL)  # at once: the late batch is inside the last flush interval
    finally:
        child.kill()
        child.wait()

    assert child.returncode == -signal.SIGKILL
    everything = [UsageTotals("b", "m", "c", 150, 1_500, 750, 2_250, 0)]
    # The first batch is in the database, the late one in the dead process's journal: a query counts both.
    assert requests_on_disk(path) == 100
    assert len(journal_lines(path)) == 50
    assert await _reopen_and_query(path) == everything

    # A started ledger claims the journal, writes it and deletes it.
    ledger = UsageLedger(path)
    await ledger.start()
    await wait_until(lambda: not journal_lines(path))
    assert await ledger.query() == everything
    await ledger.aclose()
    assert requests_on_disk(path) == 150
    assert os.listdir(f"{path}.journal") == []  # no batch file left, and no lock file of a dead process


def test_the_default_journal_of_a_postgresql_ledger_is_its_databases_own() -> None:
    """A journal is replayed into the database of whoever reads it: two gateways started in one directory on two
    databases, sharing one, would each claim the other's records."""
    a = default_journal_dir("postgresql://app:one@db:5432/ledger_a")
    b = default_journal_dir("postgresql://app:one@db:5432/ledger_b")

    assert a is not None and b is not None and a != b
    # However the URL spells the one database: a password, options, the default port, the host's case, parameters.
    for same in (
        "postgresql://app:another-password@db:5432/ledger_a",
        "postgresql://app:one@DB/ledger_a?sslmode=require&application_name=x",
        "postgres://db/ledger_a?user=app",
    ):
        assert default_journal_dir(same) == a, same
    # A Unix socket's directory, in the host percent-encoded or as the host parameter.
    on_a_socket = default_journal_dir("postgresql://app@%2Frun%2Fpostgresql:5432/ledger_a")
    assert on_a_socket == default_journal_dir("postgresql://app@/ledger_a?host=/run/postgresql") != a
    assert a.parent == Path(".") and a.name.startswith("llmrelay-usage-") and a.suffix == ".journal"
    assert default_journal_dir("usage.sqlite3") == Path("usage.sqlite3.journal")
    assert default_journal_dir(":memory:") is None


def test_the_default_journal_of_a_postgresql_ledger_follows_the_database_the_environment_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq's PG* variables fill in what a URL leaves out: two gateways started in one directory with one URL and two
    PGDATABASEs write to two databases, and shared one journal (the URL's alone), each claiming the other's
    records."""
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGDATABASE", "ledger_a")
    a = default_journal_dir("postgresql://app@db")
    assert a == default_journal_dir("postgresql://app@db:5432/ledger_a"), "the URL's own, where it names them"
    monkeypatch.setenv("PGDATABASE", "ledger_b")
    assert default_journal_dir("postgresql://app@db") == default_journal_dir("postgresql://app@db/ledger_b") != a
    monkeypatch.setenv("PGHOST", "other-db")
    monkeypatch.setenv("PGPORT", "6543")
    monkeypatch.setenv("PGUSER", "ops")
    assert default_journal_dir("postgresql:///ledger_b") == default_journal_dir(
        "postgresql://ops@other-db:6543/ledger_b"
    )
    assert default_journal_dir("postgresql://app@db/ledger_b") != default_journal_dir("postgresql:///ledger_b")


async def test_a_query_while_the_database_is_down_is_refused_without_reading_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage's journal can hold millions of records: a caller told UNAVAILABLE must not wait for them to be read
    first, for nothing."""
    ledger = UsageLedger(tmp_path / "usage.sqlite3")
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    async def down(*_: object) -> NoReturn:
        raise LedgerUnavailableError("SQLite: disk I/O error")

    monkeypatch.setattr(ledger._store, "apply", down)
    monkeypatch.setattr(ledger._store, "read", down)
    with pytest.raises(LedgerUnavailableError):
        await ledger.flush()
    monkeypatch.setattr(ledger_module, "_read_journal", lambda *_: pytest.fail("the journal was read"))

    with pytest.raises(UsageUnavailableError):
        await ledger.query()
    monkeypatch.undo()
    await ledger.aclose()


async def test_a_ledger_down_with_every_record_written_stops_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The database went down after the last record was written (the idle check found it so): the stop said ERROR
    # "0 records not written at shutdown", an alarm for nothing.
    ledger = UsageLedger(tmp_path / "usage.sqlite3")
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    await ledger.flush()

    async def down(*_: object) -> NoReturn:
        raise LedgerUnavailableError("SQLite: disk I/O error")

    monkeypatch.setattr(ledger._store, "check", down)
    await ledger._maintain()  # as its background work checks an idle database
    assert not ledger.health().available
    await ledger.aclose()

    assert "usage ledger unavailable" in caplog.text and "not written at shutdown" not in caplog.text


async def test_records_in_the_old_default_journal_of_a_postgresql_ledger_are_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgraded with records waiting in ./llmrelay-usage.journal (after an outage, a kill -9), no ledger would replay
    them by itself: the log says where they are and how to write them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llmrelay-usage.journal").mkdir()
    (tmp_path / "llmrelay-usage.journal" / "1234-abcd.1.jsonl").write_text("")
    ledger = UsageLedger("postgresql://app@127.0.0.1:9/ledger")  # never started: nothing is asked of it
    assert "llmrelay-usage.journal holds usage records an older version journaled" in caplog.text
    assert "server.usage_journal_dir: llmrelay-usage.journal" in caplog.text
    await ledger.aclose()


async def test_a_query_cancelled_while_it_reads_leaves_the_database_to_the_next(tmp_path: Path) -> None:
    # A GetUsage past its caller's deadline: its read went on in its thread, within a transaction on the store's one
    # connection, and the flush after it failed to begin one (the ledger said the database was down), as did the next
    # query, whoever's it was.
    path = tmp_path / "usage.db"
    await UsageLedger(path).aclose()  # the schema
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.executemany(  # enough callers that reading them all takes a while
            "INSERT INTO usage_buckets (backend, model, caller, bucket_start, requests, prompt_tokens,"
            " completion_tokens, estimated_requests) VALUES ('b', 'm', ?, 0, 1, 1, 1, 0)",
            ((f"caller-{i}",) for i in range(100_000)),
        )
    ledger = UsageLedger(path)
    try:
        reading = asyncio.create_task(ledger.query())
        await asyncio.sleep(0.05)  # its thread is in the read
        reading.cancel()
        ledger.record("b", "m", "after", TokenUsage(3, 4), at=T0)
        await ledger.flush()
        assert [t.total_tokens for t in await ledger.query(caller="after")] == [7]
        with pytest.raises(asyncio.CancelledError):
            await reading
    finally:
        await ledger.aclose()
    assert requests_on_disk(path) == 100_001


async def test_a_model_name_too_long_to_keep_whole_finds_its_records(ledger: UsageLedger) -> None:
    # An upstream may name its model at any length; the ledger keeps a name past 256 characters shortened (a digest
    # for its end). Asked for by the name the answer gave, the records were not found: "no usage", answered OK.
    long_name = "model-" + "x" * 300
    ledger.record("openai", long_name, "alice", TokenUsage(5, 6), at=T0)
    ledger.record("openai", long_name + "y", "alice", TokenUsage(1, 1), at=T0)
    await ledger.flush()
    [kept] = await ledger.query(model=long_name)
    assert (kept.total_tokens, len(kept.model)) == (11, 256)
    assert kept.model.startswith("model-xxx") and kept.model != long_name
