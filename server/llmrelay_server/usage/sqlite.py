"""The ledger in a SQLite file (or in memory): one connection, used by one worker thread at a time.

Several processes may share the file (the workers of a gateway): it is in WAL mode, so readers never wait for a
writer; a write takes the file's write lock at its start (BEGIN IMMEDIATE), waiting up to ``busy_timeout_s`` for
another process's write, and if that is not enough it fails like any other write: the batch stays in the journal
for the next try.

The schema is made by numbered migrations, each recorded in ``schema_version``, under the write lock, so that
processes starting together on a new file do not race. A file made before ``schema_version`` existed starts at
migration 1, which brings its table to the form the first versions left it in. Each migration is idempotent: all run
again when a table of the latest schema is missing (dropped by hand), and a file of today's shape without
``schema_version`` (its tables copied out of another file) takes them as a new file does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final, TypeVar

from llmrelay_server.usage.store import (
    COUNT_COLUMNS,
    DAY_S,
    PRIVATE_FILE_MODE,
    TABLE_COLUMNS,
    BatchId,
    Buckets,
    LedgerUnavailableError,
    Selection,
    Snapshot,
    mark_applied_statement,
    not_the_ledgers,
    oldest_finer_statement,
    roll_up_statement,
    upsert_statement,
)

MEMORY: Final = ":memory:"

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

# As the first versions made it; the four columns after estimated_requests came later, with zeros for old rows.
_FIRST_TABLE: Final = """
CREATE TABLE IF NOT EXISTS usage_buckets (
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    caller TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    estimated_requests INTEGER NOT NULL,
    PRIMARY KEY (backend, model, caller, bucket_start)
) WITHOUT ROWID
"""
_LATER_COLUMNS: Final = ("interrupted_requests", "cost_usd_micros", "cost_estimated_requests", "price_unknown_requests")


_LATER_FOUND: Final = {"usage_buckets": frozenset(_LATER_COLUMNS), "applied_batches": frozenset()}
"""Of each table, the columns a file of an earlier version may lack (its migrations add them)."""


def _first_table(connection: sqlite3.Connection) -> None:
    """The table as the versions before migrations left it: made if missing, its later columns added if missing."""
    connection.execute(_FIRST_TABLE)
    present = _columns(connection, "usage_buckets")
    for column in _LATER_COLUMNS:
        if column not in present:
            connection.execute(f"ALTER TABLE usage_buckets ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


def _drop_total_tokens(connection: sqlite3.Connection) -> None:
    """Total tokens are prompt + completion: a stored copy can only disagree."""
    if "total_tokens" not in _columns(connection, "usage_buckets"):
        return
    if sqlite3.sqlite_version_info < (3, 35):
        raise LedgerUnavailableError(
            f"the usage ledger needs SQLite 3.35 or later (DROP COLUMN); this Python has {sqlite3.sqlite_version}"
        )
    connection.execute("ALTER TABLE usage_buckets DROP COLUMN total_tokens")


def _applied_batches(connection: sqlite3.Connection) -> None:
    connection.execute(
        "CREATE TABLE IF NOT EXISTS applied_batches"
        " (journal TEXT PRIMARY KEY, last_batch INTEGER NOT NULL) WITHOUT ROWID"
    )


def _index_by_start(connection: sqlite3.Connection) -> None:
    """For a window's rows, and the oldest rows to roll up into their day, without reading the whole table."""
    connection.execute("CREATE INDEX IF NOT EXISTS usage_buckets_by_start ON usage_buckets (bucket_start)")


_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _first_table,
    _drop_total_tokens,
    _applied_batches,
    _index_by_start,
)
"""Migration n is _MIGRATIONS[n - 1]; append, never change what one makes of the file it was written for. Each must be
idempotent: all run again when a table of the latest schema is missing."""

_UPSERT: Final = upsert_statement("?")
_MARK_APPLIED: Final = mark_applied_statement("?")
_SUMS: Final = ", ".join(f"SUM({column})" for column in COUNT_COLUMNS)
_OLDEST_FINER: Final = oldest_finer_statement("?")
# The day's rows after its start: added into the day's row, then deleted, under the one write lock.
_ROLL_UP: Final = roll_up_statement("usage_buckets WHERE bucket_start > ? AND bucket_start < ?", "?", _SUMS)
_DELETE_ROLLED_UP: Final = "DELETE FROM usage_buckets WHERE bucket_start > ? AND bucket_start < ?"


class SQLiteStore:
    """A `LedgerStore` in a SQLite file, opened (made, migrated) at construction; ":memory:" keeps it in memory.

    A file another process holds locked past the busy timeout (a backup, an operator's long transaction) is opened at
    the first use instead, the ledger unavailable until then (its records in the journal): it stopped the start, and
    a worker's restart, as a mistake of the configuration."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self._path = str(path)
        self._busy_timeout_s = busy_timeout_s
        self._connection: sqlite3.Connection | None = None
        self._migrated = True
        try:
            self._connection = _open(self._path, busy_timeout_s)
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise LedgerUnavailableError(f"{self.description}: {exc}") from exc
        except sqlite3.Error as exc:
            raise LedgerUnavailableError(f"{self.description}: {exc}") from exc
        self._file = _file_at(self._path)
        # Held across each use of the one connection, which must not serve two threads (or transactions) at once.
        self._lock = asyncio.Lock()

    @property
    def kind(self) -> str:
        return "sqlite"

    @property
    def description(self) -> str:
        return _described(self._path)

    async def check(self) -> None:
        await self._run(
            lambda: self._opened().execute("SELECT 1 FROM applied_batches LIMIT 1").fetchall(), reads_only=True
        )

    async def apply(self, batch: BatchId, buckets: Buckets) -> bool:
        return await self._run(lambda: self._apply(batch, buckets))

    async def read(self, selection: Selection, journals: Collection[str]) -> Snapshot:
        return await self._run(lambda: self._read(selection, journals), reads_only=True)

    async def roll_up(self, before: int) -> int:
        return await self._run(lambda: self._roll_up(before))

    async def aclose(self) -> None:
        async with self._lock:
            if self._connection is not None:
                await asyncio.to_thread(self._connection.close)

    async def _run(self, work: Callable[[], _T], *, reads_only: bool = False) -> _T:
        """`work` in a thread, on the store's one connection, which it holds until the work ends. Cancelled (a
        GetUsage past its caller's deadline), it still holds it until the thread is done: the thread goes on with the
        connection, within a transaction, and the next to use it (the ledger's writes) failed to begin one. Work that
        `reads_only` is interrupted then; writes are short, and end as they would have."""
        async with self._lock:
            running = asyncio.ensure_future(asyncio.to_thread(self._on_the_file, work))
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                if reads_only and self._connection is not None:
                    self._connection.interrupt()
                await _until_done(running)
                raise
            except sqlite3.Error as exc:
                if "no such table" in str(exc):
                    self._migrated = False  # a table dropped by hand: the next use makes it anew
                raise LedgerUnavailableError(f"{self.description}: {exc}") from exc

    def _on_the_file(self, work: Callable[[], _T]) -> _T:
        """`work` on the file at the path. One deleted or replaced meanwhile (an operator's mistake, a backup put back)
        would be written on unseen, into a file no one reads again, and a connection made anew at the path could pair
        the new file with the old one's write-ahead log (SQLite's own -wal, which corrupts it): so neither. The
        records wait in the journal, and the restart that the error asks for writes them to the file then there."""
        if self._file is not None and _file_at(self._path) != self._file:
            raise LedgerUnavailableError(
                f"{self.description}: the file was deleted or replaced while in use; usage is kept in the journal and"
                " written to the file at that path once the gateway restarts (stop every process on a SQLite ledger"
                " before replacing its file)"
            )
        return work()

    def _opened(self) -> sqlite3.Connection:
        """The store's connection (in the thread of a use, under the lock), made now where the file was locked when
        the store was made; migrated again after a use found a table missing."""
        if self._connection is None:
            self._connection = _open(self._path, self._busy_timeout_s)
        elif not self._migrated:
            _migrate(self._connection, self.description)
        self._migrated = True
        return self._connection

    def _apply(self, batch: BatchId, buckets: Buckets) -> bool:
        connection = self._opened()
        # IMMEDIATE: the write lock now, waiting busy_timeout for it, rather than a failure at the first write when
        # another process wrote since this transaction's snapshot.
        connection.execute("BEGIN IMMEDIATE")
        try:
            if connection.execute(_MARK_APPLIED, (batch.journal, batch.number)).rowcount == 0:
                connection.rollback()
                return False
            connection.executemany(_UPSERT, [(*key, *counts) for key, counts in buckets.items()])
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        return True

    def _roll_up(self, before: int) -> int:
        connection = self._opened()
        connection.execute("BEGIN IMMEDIATE")  # no write of another process between the sums and the deletion
        try:
            oldest = connection.execute(_OLDEST_FINER, (before,)).fetchone()
            if oldest is None:
                connection.rollback()
                return 0
            day = oldest[0] - oldest[0] % DAY_S
            connection.execute(_ROLL_UP, (day, day, day + DAY_S))
            merged = connection.execute(_DELETE_ROLLED_UP, (day, day + DAY_S)).rowcount
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        return merged

    def _read(self, selection: Selection, journals: Collection[str]) -> Snapshot:
        where, values = selection.sql_where("?")
        connection = self._opened()
        connection.execute("BEGIN")  # one snapshot for both reads (WAL)
        try:
            rows = connection.execute(
                f"SELECT backend, model, caller, {_SUMS} FROM usage_buckets{where} GROUP BY backend, model, caller",
                values,
            ).fetchall()
            last_batches = connection.execute(
                "SELECT journal, last_batch FROM applied_batches WHERE journal IN (SELECT value FROM json_each(?))",
                (json.dumps(list(journals)),),
            ).fetchall()
        finally:
            connection.rollback()
        return Snapshot({(row[0], row[1], row[2]): list(row[3:]) for row in rows}, dict(last_batches))


async def _until_done(running: asyncio.Future[Any]) -> None:
    """Waits for `running` to end, cancelled or not, and takes its outcome (an interrupted read's error, which no one
    awaits now)."""
    while not running.done():
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: the connection is still its
            await asyncio.wait([running])
    if not running.cancelled():
        running.exception()


def _file_at(path: str) -> tuple[int, int] | None:
    """Which file is at the path (device and inode); None for a ledger in memory, or no file."""
    if path == MEMORY:
        return None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _open(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    if path != MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Made readable by its owner alone, as the journal is (who called what, and what it cost): SQLite would make
        # it with the umask's mode (world-readable, under the usual 022), and its -wal and -shm files after it. A
        # file already there keeps the mode it was given.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    # isolation_level None: transactions only where this module begins them.
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        connection.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
        _use_wal(connection, busy_timeout_s)
        # In WAL mode NORMAL survives a process crash (committed transactions are in the WAL); only power loss can
        # undo the newest ones, which is not worth an fsync per flush.
        connection.execute("PRAGMA synchronous=NORMAL")
        _migrate(connection, _described(path))
    except BaseException:
        connection.close()
        raise
    return connection


def _described(path: str) -> str:
    return "SQLite in memory" if path == MEMORY else f"SQLite {path}"


def _locked(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds ("database is locked", "database table is
    locked"), rather than for the file itself."""
    return "locked" in str(error)


def _use_wal(connection: sqlite3.Connection, busy_timeout_s: float) -> None:
    """WAL mode, waiting for it as for any lock: SQLite answers "database is locked" at once, without its busy
    handler, when another process is switching a new file to WAL at the same moment (workers starting together)."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _migrate(connection: sqlite3.Connection, where: str) -> None:
    connection.execute("BEGIN IMMEDIATE")  # the write lock: one process migrates, the others then find it done
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        (current,) = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        if current > len(_MIGRATIONS):
            raise LedgerUnavailableError(
                f"the usage ledger's schema is version {current}, newer than this gateway knows"
                f" ({len(_MIGRATIONS)}): run the newer llmrelay-server, or give this one a ledger of its own"
            )
        found = {table: _columns(connection, table) for table in TABLE_COLUMNS}
        for table, columns in found.items():
            # Before any migration, as far as every shape it ever had tells: nothing added to the other's table.
            if columns and (error := not_the_ledgers(table, columns | _LATER_FOUND[table], where)) is not None:
                raise error
        # One dropped by hand while schema_version stays failed every write for ever, restarts included, as an outage
        # that would pass: made anew, empty.
        missing = [table for table, columns in found.items() if current > 0 and not columns]
        for version in range(1 if missing else current + 1, len(_MIGRATIONS) + 1):
            _MIGRATIONS[version - 1](connection)
            if version > current:
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    if missing:
        _log.warning(
            "usage ledger: %s had lost its table %s (dropped?): made anew, empty; the usage it held is gone from the"
            " file, the records not yet written are written to it",
            where,
            " and ".join(missing),
        )


def _columns(connection: sqlite3.Connection, table: str) -> set[str]:
    """The table's columns; none where there is no such table."""
    return {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
