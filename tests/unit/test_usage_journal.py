"""The ledger's journal and its SQLite store with real processes: a batch replayed after a crash counts once, the
journal's bound, databases from before migrations, and several processes on one file."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from llmrelay_server.config import ConfigError
from llmrelay_server.domain import TokenUsage, UsageUnavailableError
from llmrelay_server.usage import LedgerUnavailableError, UsageLedger, UsageTotals
from llmrelay_server.usage.journal import Journal
from support import wait_until

T0 = 1_700_000_040.0  # the start of a minute bucket
CALLERS = ("caller-0", "caller-1", "caller-2")

# A process with a ledger that does what the test writes to it, a line at a time, and answers "done" to each.
_RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from llmrelay_server.domain import TokenUsage
    from llmrelay_server.usage import UsageLedger

    async def main() -> None:
        ledger = UsageLedger(sys.argv[1], flush_interval_s=float(sys.argv[2]))
        if sys.argv[3] == "start":
            await ledger.start()
        print("ready", flush=True)
        while command := (await asyncio.to_thread(sys.stdin.readline)).split():
            if command[0] == "record":
                for i in range(int(command[1])):
                    ledger.record("b", "m", f"caller-{i % 3}", TokenUsage(10, 5))
                    if i % 100 == 0:
                        await asyncio.sleep(0)  # the background flush runs amid the records
            elif command[0] == "flush":
                await ledger.flush()
            elif command[0] == "close":
                await ledger.aclose()
            print("done", flush=True)

    asyncio.run(main())
    """
)


class Recorder:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ready(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert line == b"ready\n", f"the recorder did not start: {line!r}"

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        assert await asyncio.wait_for(self.process.stdout.readline(), 60) == b"done\n"


@contextlib.asynccontextmanager
async def recorder(path: Path, *, flush_interval_s: float, start: bool) -> AsyncIterator[Recorder]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RECORDER,
        str(path),
        str(flush_interval_s),
        "start" if start else "wait",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield Recorder(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def expected(records: int) -> list[UsageTotals]:
    """What the recorder's `record N` adds up to (the callers take turns)."""
    per_caller = [records // 3 + (1 if index < records % 3 else 0) for index in range(3)]
    totals = [
        UsageTotals("b", "m", caller, n, 10 * n, 5 * n, 15 * n, 0)
        for caller, n in zip(CALLERS, per_caller, strict=True)
    ]
    return sorted(totals, key=lambda t: (-t.total_tokens, t.caller))


def journal_file_full(ledger: UsageLedger) -> None:
    """/dev/full in place of the active batch's journal file: every write to it fails with ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY)
    assert ledger._active.fd is not None
    os.dup2(full, ledger._active.fd)
    os.close(full)


def requests_on_disk(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        (requests,) = connection.execute("SELECT COALESCE(SUM(requests), 0) FROM usage_buckets").fetchone()
    return int(requests)


def batch_files(path: Path) -> list[Path]:
    return sorted(Path(f"{path}.journal").glob("*.jsonl"))


def journaled_bytes(path: Path) -> int:
    total = 0
    for batch in batch_files(path):
        with contextlib.suppress(FileNotFoundError):  # written and deleted meanwhile
            total += batch.stat().st_size
    return total


async def query_once(path: Path) -> list[UsageTotals]:
    ledger = UsageLedger(path)
    try:
        return await ledger.query()
    finally:
        await ledger.aclose()


async def test_a_batch_whose_file_outlived_its_commit_is_replayed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.sqlite3"
    async with recorder(path, flush_interval_s=3600, start=False) as child:
        await child.ready()
        await child.send("record 90")
        kept = {batch: batch.read_bytes() for batch in batch_files(path)}
        await child.send("flush")
        assert requests_on_disk(path) == 90
        assert not any(batch.exists() for batch in kept)
        # As if the process had died between the commit and the deletion of the file.
        for batch, content in kept.items():
            batch.write_bytes(content)
        child.process.kill()

    # The database already has the batch the file holds: a query counts it once.
    assert await query_once(path) == expected(90)

    caplog.set_level(logging.INFO, logger="llmrelay_server.usage")
    ledger = UsageLedger(path)
    await ledger.start()
    await wait_until(lambda: journaled_bytes(path) == 0)
    assert await ledger.query() == expected(90)
    await ledger.aclose()
    assert requests_on_disk(path) == 90
    assert "was written before; skipped" in caplog.text


async def test_past_the_journal_bound_with_the_database_down_records_are_dropped_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "usage.sqlite3"
    probe = UsageLedger(tmp_path / "probe.sqlite3")
    probe.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    line_bytes = batch_files(tmp_path / "probe.sqlite3")[0].stat().st_size
    await probe.aclose()
    ledger = UsageLedger(path, journal_max_bytes=20 * line_bytes)
    monkeypatch.setattr(ledger._store, "apply", database_down)
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    with pytest.raises(LedgerUnavailableError):
        await ledger.flush()

    for _ in range(99):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    assert ledger.dropped_records == 80
    assert journaled_bytes(path) == 20 * line_bytes
    assert ledger.queue_depth() == ledger.health().pending_records == 20
    assert "80 records dropped (the journal holds its limit of" in ledger.health().description
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 2 and "dropping usage records" in errors[1].getMessage()  # after "unavailable"

    monkeypatch.undo()
    await ledger.flush()  # the backlog written: room again
    for _ in range(30):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    assert ledger.dropped_records == 80  # the database up: what the journal cannot take is kept in memory
    assert await ledger.query() == [UsageTotals("b", "m", "c", 50, 500, 250, 750, 0)]
    await ledger.aclose()
    assert requests_on_disk(path) == 50


async def test_records_the_journal_cannot_take_are_kept_in_memory_with_the_database_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the journal dropped every record, billed to callers and lost, with the database up and able
    to take them; and the log and Health said the journal had reached its bound, with no backlog. (/dev/full in place
    of the journal's file: every write fails with ENOSPC.)"""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    for _ in range(10):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    journal_file_full(ledger)

    for _ in range(90):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    assert ledger.dropped_records == 0
    health = ledger.health()
    assert "90 records in memory alone (the journal cannot be written (No space left on device))" in health.description
    assert health.pending_records == 10  # in the journal
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "kept in memory until written" in errors[0]
    # The database down meanwhile: the batch keeps its counts, which no file holds, until it is back.
    monkeypatch.setattr(ledger._store, "apply", database_down)
    with pytest.raises(LedgerUnavailableError):
        await ledger.flush()
    monkeypatch.undo()
    await ledger.flush()
    assert await ledger.query() == [UsageTotals("b", "m", "c", 100, 1000, 500, 1500, 0)]
    await ledger.aclose()
    assert requests_on_disk(path) == 100


async def test_with_no_new_journal_file_to_be_made_records_still_reach_the_database_and_none_is_lost_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal whose filesystem can make no new file (no inode left, or no block for the next file): the active batch,
    sealed only once a new file was made for the next one, stayed active, was never written, and a shutdown dropped
    what its counts alone held, without a word."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    for _ in range(10):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    assert ledger._journal is not None

    def no_space(number: int) -> NoReturn:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ledger._journal, "create_batch", no_space)
    await ledger.flush()
    assert requests_on_disk(path) == 10
    for _ in range(20):  # in no file: in memory
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    health = ledger.health()
    assert (
        "20 records in memory alone (no new journal file can be made (No space left on device))" in health.description
    )
    await ledger.flush()  # and again, with no file yet
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    await ledger.aclose()
    assert requests_on_disk(path) == 31
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no new journal file can be made" in errors[0], errors


async def test_a_journal_left_without_a_file_while_the_database_was_down_takes_records_again_once_both_are_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database found down while idle, then no new journal file to be made: the batch left active, with neither
    file nor counts, dropped its records, so was never sealed, and no batch after it tried for a file again: every
    record was dropped until the process restarted, the database and the disk long back."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    assert ledger._journal is not None
    store_apply, store_check, create_batch = ledger._store.apply, ledger._store.check, ledger._journal.create_batch

    def no_space(number: int) -> NoReturn:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ledger._store, "apply", database_down)
    monkeypatch.setattr(ledger._store, "check", database_down)
    await ledger._maintain()  # the idle ledger's check of the database
    monkeypatch.setattr(ledger._journal, "create_batch", no_space)
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    with pytest.raises(LedgerUnavailableError):
        await ledger.flush()  # sealed it: the next batch has no file and, the database down, no counts
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    assert ledger.dropped_records == 1

    monkeypatch.setattr(ledger._store, "apply", store_apply)
    monkeypatch.setattr(ledger._store, "check", store_check)
    await ledger.flush()  # the database back, the disk still full: the next batch has counts, if no file
    for _ in range(3):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    monkeypatch.setattr(ledger._journal, "create_batch", create_batch)
    await ledger.flush()  # room on the disk again: the next batch has its file
    assert ledger._active.path is not None
    for _ in range(5):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    await ledger.aclose()
    assert ledger.dropped_records == 1
    assert requests_on_disk(path) == 9


async def test_a_written_batch_whose_file_cannot_be_deleted_holds_no_later_record_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal directory made read-only (a filesystem remounted so after an error): the batch committed, its file's
    deletion failed, and the batch was kept waiting, skipped as written and failing again at every flush, with a
    traceback each 0.5 s: no record after it reached the database, and a shutdown lost them and exited 1."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    for _ in range(3):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    await ledger.flush()
    unlink = Path.unlink

    def read_only(self: Path, missing_ok: bool = False) -> None:
        if self.parent == Path(f"{path}.journal"):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    for batch_records in (2, 5, 4):
        for _ in range(batch_records):
            ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
        await ledger.flush()
    assert requests_on_disk(path) == 14
    assert ledger.health().pending_records == 0
    await ledger.aclose()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(errors) == 2, errors  # the batches' files, once; the lock file at the end
    assert "written to the database, cannot be deleted (Read-only file system); left behind" in errors[0]
    # Left behind, they are counted once: the database says their batches are written.
    monkeypatch.undo()
    assert [batch.stat().st_size > 0 for batch in batch_files(path)] == [True, True, True, False]  # the last: active
    assert await query_once(path) == [UsageTotals("b", "m", "c", 14, 140, 70, 210, 0)]


async def test_records_the_journal_cannot_take_after_an_idle_outage_are_kept_once_the_database_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database found down while idle let go of the active batch's counts (its file holds them), and its return
    gave them back only to a batch without a file: the next batch, made while the ledger still had it down, had none
    either, and every record the journal could not take then (a full disk) was dropped, with the database up."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    store_apply, store_check = ledger._store.apply, ledger._store.check
    monkeypatch.setattr(ledger._store, "apply", database_down)
    monkeypatch.setattr(ledger._store, "check", database_down)
    await ledger._maintain()  # the idle ledger's check of the database
    for _ in range(2):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    monkeypatch.setattr(ledger._store, "apply", store_apply)
    monkeypatch.setattr(ledger._store, "check", store_check)
    await ledger.flush()  # the database back
    journal_file_full(ledger)

    for _ in range(5):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)

    assert ledger.dropped_records == 0
    await ledger.aclose()
    assert requests_on_disk(path) == 7


def test_a_journal_whose_directory_was_made_again_is_not_claimed_from_its_live_process(tmp_path: Path) -> None:
    """The directory deleted, then made again by a gateway starting on it: the live process made its next batch files
    there with no lock file of its own beside them, and the other claimed them as a dead process's, writing a batch
    while its records were still being appended (and the live process's whole write of it skipped: records lost)."""
    directory = tmp_path / "journal"
    live = Journal(directory)
    shutil.rmtree(directory)
    starting = Journal(directory)  # makes the directory again

    path, fd = live.create_batch(1)
    os.write(fd, b"a line\n")

    try:
        assert starting.claim_orphans(()) == []
        assert path.exists()
    finally:
        os.close(fd)
        live.close(drained=False)
        starting.close(drained=True)


async def test_a_batch_file_removed_by_hand_is_said_lost_once_however_long_the_database_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its loss was logged as an error at every try to write it, every flush interval of the outage: the outage let go
    of its empty counts, and the next try looked for its file again."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path)
    monkeypatch.setattr(ledger._store, "apply", database_down)
    for _ in range(3):
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    with pytest.raises(LedgerUnavailableError):
        await ledger.flush()  # sealed, its file kept for the database's return
    (removed,) = [batch for batch in batch_files(path) if batch.stat().st_size]  # not the new active one
    removed.unlink()
    for _ in range(3):
        with pytest.raises(LedgerUnavailableError):
            await ledger.flush()

    monkeypatch.undo()
    await ledger.flush()
    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
    await ledger.aclose()

    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert gone == [f"usage ledger: the journal file {removed} is gone; its 3 records are lost"]
    assert requests_on_disk(path) == 1


async def test_a_journal_directory_that_cannot_be_listed_holds_up_usage_answers_not_the_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its directory removed under it: GetUsage failed INTERNAL (a FileNotFoundError, with its traceback), and the
    search for dead processes' journals logged the same traceback every few seconds."""
    path = tmp_path / "usage.sqlite3"
    ledger = UsageLedger(path, flush_interval_s=0.05)
    await ledger.start()
    try:
        ledger.record("b", "m", "c", TokenUsage(prompt_tokens=1, completion_tokens=1))
        assert ledger._journal is not None
        shutil.rmtree(ledger._journal.directory)
        with pytest.raises(UsageUnavailableError, match="journal on disk cannot be read now"):
            await ledger.query()  # not "the database", which the caller's operator would look at in vain
        ledger.record("b", "m", "c", TokenUsage(prompt_tokens=1, completion_tokens=1))
        await wait_until(lambda: requests_on_disk(path) == 2)
    finally:
        await ledger.aclose()
    assert "cannot be listed (No such file or directory): GetUsage waits until it can" in caplog.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


async def database_down(*_: object) -> NoReturn:
    raise LedgerUnavailableError("SQLite: disk I/O error")


async def test_a_journal_claimed_from_a_dead_process_costs_no_new_record_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is on what a process writes: a dead process's journal, which it claims to replay, adds nothing to the
    disk. Counted against it, a worker that took over a full journal dropped new records with the database up."""
    path = tmp_path / "usage.sqlite3"
    async with recorder(path, flush_interval_s=3600, start=False) as child:
        await child.ready()
        await child.send("record 90")
        child.process.kill()
    ledger = UsageLedger(path, journal_max_bytes=journaled_bytes(path))  # the dead one's journal alone fills it
    # The claimed journal's write held back, as a large one takes its time: the new records come meanwhile.
    written = asyncio.Event()
    store_apply = ledger._store.apply

    async def held_apply(*batch: Any) -> bool:
        await written.wait()
        return await store_apply(*batch)

    monkeypatch.setattr(ledger._store, "apply", held_apply)
    await ledger.start()
    await wait_until(lambda: ledger.queue_depth() == 90)  # claimed

    for _ in range(10):
        ledger.record("b", "m", "caller-0", TokenUsage(10, 5))

    assert ledger.dropped_records == 0
    written.set()
    await ledger.flush()
    assert sum(total.requests for total in await ledger.query()) == 100
    await ledger.aclose()
    assert requests_on_disk(path) == 100


# The table as the first versions made it, and as the last version before migrations left it.
_FIRST_TABLE = (
    "CREATE TABLE usage_buckets (backend TEXT NOT NULL, model TEXT NOT NULL, caller TEXT NOT NULL,"
    " bucket_start INTEGER NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL, estimated_requests INTEGER NOT NULL,"
    " PRIMARY KEY (backend, model, caller, bucket_start)) WITHOUT ROWID"
)
_LAST_UNVERSIONED_TABLE = _FIRST_TABLE.replace(
    ", PRIMARY KEY",
    ", interrupted_requests INTEGER NOT NULL DEFAULT 0, cost_usd_micros INTEGER NOT NULL DEFAULT 0,"
    " cost_estimated_requests INTEGER NOT NULL DEFAULT 0, price_unknown_requests INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY",
)


@pytest.mark.parametrize(
    ("table", "rows", "old_totals"),
    [
        (
            _FIRST_TABLE,
            [("openai", "gpt-4o", "c", 0, 2, 20, 10, 30, 1), ("ollama", "tiny", "c", 60, 1, 5, 5, 10, 0)],
            [
                UsageTotals("openai", "gpt-4o", "c", 2, 20, 10, 30, 1),
                UsageTotals("ollama", "tiny", "c", 1, 5, 5, 10, 0),
            ],
        ),
        (
            _LAST_UNVERSIONED_TABLE,
            [
                ("openai", "gpt-4o", "c", 0, 2, 20, 10, 30, 1, 1, 700, 1, 0),
                ("ollama", "tiny", "c", 60, 1, 5, 5, 10, 0, 0, 0, 0, 0),
            ],
            [
                UsageTotals("openai", "gpt-4o", "c", 2, 20, 10, 30, 1, 1, 700, 1, 0),
                UsageTotals("ollama", "tiny", "c", 1, 5, 5, 10, 0),
            ],
        ),
    ],
    ids=["first-schema", "before-migrations"],
)
async def test_a_database_from_before_migrations_is_migrated_with_its_rows(
    tmp_path: Path, table: str, rows: list[tuple[object, ...]], old_totals: list[UsageTotals]
) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(table)
        connection.executemany(f"INSERT INTO usage_buckets VALUES ({', '.join('?' * len(rows[0]))})", rows)

    ledger = UsageLedger(path)
    assert await ledger.query() == old_totals
    ledger.record("openai", "gpt-4o", "c", TokenUsage(1, 2), at=30)  # into the old row's bucket
    await ledger.flush()
    await ledger.aclose()

    with contextlib.closing(sqlite3.connect(path)) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(usage_buckets)")]
        versions = [row[0] for row in connection.execute("SELECT version FROM schema_version ORDER BY version")]
        (row,) = connection.execute(
            "SELECT requests, prompt_tokens, completion_tokens FROM usage_buckets WHERE model = 'gpt-4o'"
        ).fetchall()
    assert "total_tokens" not in columns
    assert versions == [1, 2, 3, 4]
    assert row == (3, 21, 12)
    # Opened again, nothing is migrated twice.
    reopened = await query_once(path)
    assert reopened[0] == UsageTotals("openai", "gpt-4o", "c", 3, 21, 12, 33, *_after_estimated(old_totals[0]))
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (4,)


@pytest.mark.parametrize(("table", "requests_after"), [("usage_buckets", 1), ("applied_batches", 2)])
async def test_a_table_dropped_by_hand_is_made_anew_and_the_records_since_reach_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, table: str, requests_after: int
) -> None:
    """schema_version still said the schema was made: every write failed for ever, restarts included, as an outage
    that would pass, the journal filling up to its bound. The table is made anew, empty, and says so."""
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path, flush_interval_s=0.01)
    await ledger.start()
    try:
        ledger.record("b", "m", "c", TokenUsage(1, 1))
        await wait_until(lambda: requests_on_disk(path) == 1)
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute(f"DROP TABLE {table}")
        ledger.record("b", "m", "c", TokenUsage(2, 2))
        await wait_until(lambda: f"had lost its table {table} (dropped?): made anew" in caplog.text)
        await wait_until(lambda: requests_on_disk(path) == requests_after)
        assert [t.requests for t in await ledger.query()] == [requests_after]
    finally:
        await ledger.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(f"DROP TABLE {table}")  # dropped while no gateway runs: made anew at the next start
    assert [t.requests for t in await query_once(path)] == ([] if table == "usage_buckets" else [requests_after])


async def test_tables_of_todays_shape_without_their_schema_version_are_taken_as_they_are(tmp_path: Path) -> None:
    """Copied out of another file (`.dump usage_buckets applied_batches`): migration 2 dropped a column the table no
    longer had, and the start was refused with SQLite's "no such column: total_tokens"."""
    original, copy = tmp_path / "original.db", tmp_path / "copy.db"
    ledger = UsageLedger(original)
    ledger.record("b", "m", "c", TokenUsage(3, 4), at=T0)
    await ledger.aclose()
    with contextlib.closing(sqlite3.connect(original)) as source, contextlib.closing(sqlite3.connect(copy)) as target:
        for (statement,) in source.execute("SELECT sql FROM sqlite_master WHERE name != 'schema_version'"):
            target.execute(statement)
        target.executemany(
            "INSERT INTO usage_buckets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            source.execute("SELECT * FROM usage_buckets"),
        )
        target.commit()
    assert await query_once(copy) == [UsageTotals("b", "m", "c", 1, 3, 4, 7, 0)]


async def test_a_column_an_operator_added_to_the_ledgers_table_is_theirs(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path)
    ledger.record("b", "m", "c", TokenUsage(3, 4), at=T0)
    await ledger.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("ALTER TABLE usage_buckets ADD COLUMN note TEXT")
    ledger = UsageLedger(path)
    ledger.record("b", "m", "c", TokenUsage(1, 1), at=T0)
    await ledger.aclose()
    assert await query_once(path) == [UsageTotals("b", "m", "c", 2, 4, 5, 9, 0)]


async def test_a_table_of_the_ledgers_name_and_another_shape_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """Another application's, in a file given as the ledger's: its columns were added to it, the schema recorded
    as made, and every write failed on SQLite's words about one column."""
    path = tmp_path / "theirs.db"
    made = "CREATE TABLE usage_buckets (backend TEXT, model TEXT, caller TEXT, bucket_start INTEGER, tokens INTEGER)"
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(made)
    with pytest.raises(LedgerUnavailableError) as refused:
        UsageLedger(path)
    assert str(refused.value) == (
        f"SQLite {path}: its table usage_buckets is not the usage ledger's (it lacks the ledger's columns"
        " completion_tokens, estimated_requests, prompt_tokens, requests): give the ledger a database (or schema) of"
        " its own"
    )
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT name, sql FROM sqlite_master").fetchall() == [("usage_buckets", made)]


def _after_estimated(totals: UsageTotals) -> tuple[int, ...]:
    return (
        totals.estimated_requests,
        totals.interrupted_requests,
        totals.cost_usd_micros,
        totals.cost_estimated_requests,
        totals.price_unknown_requests,
    )


async def test_two_processes_writing_one_sqlite_file_keep_exact_totals(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"  # new: both processes make its schema at the same moment
    async with (
        recorder(path, flush_interval_s=0.005, start=True) as first,
        recorder(path, flush_interval_s=0.005, start=True) as second,
    ):
        await asyncio.gather(first.ready(), second.ready())
        await asyncio.gather(first.send("record 3000"), second.send("record 3000"))
        # Meanwhile both keep moving their batches from the journal into the database; a third process's view
        # (the database and every journal in the directory) is exact all along.
        observer = UsageLedger(path)
        for _ in range(25):
            assert await observer.query() == expected(6000)
            await asyncio.sleep(0.005)
        await asyncio.gather(first.send("close"), second.send("close"))
        assert await observer.query() == expected(6000)
        await observer.aclose()
    assert requests_on_disk(path) == 6000
    assert batch_files(path) == []


@pytest.mark.parametrize("name", ['a "quoted" name', "two\nlines", "naïve — ünïcode ✓", "back\\slash", "]", ""])
async def test_any_name_survives_the_journal(tmp_path: Path, name: str) -> None:
    path = tmp_path / "usage.sqlite3"
    writer = UsageLedger(path)
    # In the backend's and the caller's place: the ledger keeps an upstream's model name without control characters.
    writer.record(name, "m", f"{name}-caller", TokenUsage(4, 2), at=T0)

    # Another ledger on the directory reads the record from the writer's journal file.
    assert await query_once(path) == [UsageTotals(name, "m", f"{name}-caller", 1, 4, 2, 6, 0)]
    await writer.aclose()
    assert await query_once(path) == [UsageTotals(name, "m", f"{name}-caller", 1, 4, 2, 6, 0)]


async def test_a_damaged_journal_is_replayed_but_its_damaged_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.sqlite3"
    journal = Path(f"{path}.journal")
    os.mkdir(journal)
    (journal / "999-deadbeef.lock").touch()  # a process that died: nobody holds the lock
    good = b'["b","m","c",1700000040,1,10,5,0,0,0,0,0]\n'
    # Damage that leaves numbers the database refuses (2^64, below 0) or that are no counts (true) too: such a line
    # taken stopped every write after it, the gateway's own records' too.
    numbers = [
        b'["b","m","c",1700000040,1,18446744073709551616,5,0,0,0,0,0]\n',
        b'["b","m","c",1700000040,-990,10,5,0,0,0,0,0]\n',
        b'["b","m","c",1700000040,true,10,5,0,0,0,0,0]\n',
    ]
    damaged = b"not json\n" + b'["b","m"]\n' + b"".join(numbers)
    (journal / "999-deadbeef.1.jsonl").write_bytes(good + damaged + good + good[:20])

    ledger = UsageLedger(path)
    await ledger.start()
    ledger.record("b", "m", "c", TokenUsage(prompt_tokens=1, completion_tokens=1))
    await wait_until(lambda: requests_on_disk(path) == 3)
    await ledger.aclose()

    assert os.listdir(journal) == []  # the batch written, the dead journal's lock file gone
    assert "999-deadbeef.1.jsonl: 5 damaged lines left out" in caplog.text


async def test_a_journal_file_that_cannot_be_read_holds_up_usage_answers_not_the_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its records cannot be counted: GetUsage is told to come back (not the gateway's INTERNAL failure, nor totals
    short of them), and the ledger goes on writing the records of its own calls."""
    path = tmp_path / "usage.sqlite3"
    journal = Path(f"{path}.journal")
    os.mkdir(journal)
    (journal / "999-deadbeef.lock").touch()
    os.mkdir(journal / "999-deadbeef.1.jsonl")  # unreadable as a file, even to root (who reads a 0000 file)

    ledger = UsageLedger(path)
    await ledger.start()
    try:
        ledger.record("b", "m", "c", TokenUsage(prompt_tokens=1, completion_tokens=1))
        await wait_until(lambda: requests_on_disk(path) == 1)
        with pytest.raises(UsageUnavailableError):
            await ledger.query()
    finally:
        await ledger.aclose()
    assert "999-deadbeef.1.jsonl cannot be read (Is a directory)" in caplog.text


async def test_a_journal_directory_is_one_ledgers(tmp_path: Path) -> None:
    """Every process on a journal directory writes the records it finds there to its own database: two gateways on two
    databases sharing one would bill each other's callers in their ledgers (a record of one, killed, in the other's)."""
    shared = tmp_path / "journal"
    first = UsageLedger(tmp_path / "a.db", journal_dir=shared)
    again = UsageLedger(tmp_path / "a.db", journal_dir=shared)  # the same database: workers, a restart
    with pytest.raises(ConfigError, match=r"is the journal of another ledger \(.*a\.db\), not of this one"):
        UsageLedger(tmp_path / "b.db", journal_dir=shared)
    for ledger in (first, again):
        await ledger.start()
        await ledger.aclose()


async def test_a_sqlite_file_deleted_while_in_use_is_not_written_on_unseen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes went on into the deleted file, which no one could read again: a restart found none of them. Now the
    ledger is unavailable and says why; the records wait in the journal, and the next start writes them to the file
    then at the path (a connection made anew at once could pair a new file with the old one's -wal, corrupting it)."""
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path)
    await ledger.start()
    try:
        ledger.record("b", "m", "c", TokenUsage(prompt_tokens=1, completion_tokens=1))
        await wait_until(lambda: requests_on_disk(path) == 1)
        os.unlink(path)
        ledger.record("b", "m", "c", TokenUsage(prompt_tokens=2, completion_tokens=2))
        await wait_until(lambda: "the file was deleted or replaced while in use" in caplog.text)
        with pytest.raises(UsageUnavailableError, match="database cannot be read now"):
            await ledger.query()
    finally:
        await ledger.aclose()
    restarted = UsageLedger(path)
    await restarted.start()
    try:
        [totals] = await restarted.query()
        assert (totals.requests, totals.prompt_tokens) == (1, 2)  # the record made after the deletion, kept
    finally:
        await restarted.aclose()
