"""What the ledger asks of a database (`LedgerStore`), and the rows and filters both stores share.

A store keeps two tables: ``usage_buckets``, the counts per (backend, model, caller, bucket_start), and
``applied_batches``, which for each journal (one per process, see `journal`) holds the number of the last batch
written. A batch is written in one transaction together with its number, and only if the number is higher than the
one stored: a batch replayed after a crash between its commit and the deletion of its file changes nothing, and a
query can tell which batches of the journal files it read are already in the totals it read. One row per process
rather than one per batch (two a second under load, for ever) works because a journal's batches are always written
in the order of their numbers, by the one process that holds the journal.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

COUNT_COLUMNS: Final = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "estimated_requests",
    "interrupted_requests",
    "cost_usd_micros",
    "cost_estimated_requests",
    "price_unknown_requests",
)
"""What a bucket counts, in this order wherever counts are a list; total tokens are prompt + completion."""
TABLE_COLUMNS: Final = {
    "usage_buckets": frozenset(("backend", "model", "caller", "bucket_start", *COUNT_COLUMNS)),
    "applied_batches": frozenset(("journal", "last_batch")),
}
"""The tables of the latest schema, and their columns."""
DAY_S: Final = 86_400
PRIVATE_FILE_MODE: Final = 0o600
"""Of the files that hold usage (the journal, a SQLite database): who called what, and what it cost."""
"""Usage older than the ledger's days by the minute is kept by the UTC day: one row per backend, model and caller at
the day's start (`LedgerStore.roll_up`)."""

_INSERT: Final = f"INSERT INTO usage_buckets (backend, model, caller, bucket_start, {', '.join(COUNT_COLUMNS)})"
_ADDED_ON_CONFLICT: Final = " ON CONFLICT (backend, model, caller, bucket_start) DO UPDATE SET " + ", ".join(
    f"{column} = usage_buckets.{column} + excluded.{column}" for column in COUNT_COLUMNS
)
"""Counts for a row that exists are added to it."""


def upsert_statement(placeholder: str) -> str:
    """The statement that adds a batch's counts into their bucket rows, in the driver's placeholder style."""
    return f"{_INSERT} VALUES ({', '.join([placeholder] * (4 + len(COUNT_COLUMNS)))}){_ADDED_ON_CONFLICT}"


def oldest_finer_statement(placeholder: str) -> str:
    """The query for the start of the oldest row before a moment that is not a day's: the day it lies in is the next
    to roll up (the index on bucket_start finds it without reading the table)."""
    return (
        f"SELECT bucket_start FROM usage_buckets WHERE bucket_start < {placeholder}"
        f" AND bucket_start <> bucket_start / {DAY_S} * {DAY_S}"  # integer division in both; no `%` for psycopg
        " ORDER BY bucket_start LIMIT 1"
    )


def roll_up_statement(source: str, day: str, sums: str) -> str:
    """The statement that adds the rows of `source` (the day's rows after its start) into the day's row per backend,
    model and caller; `day` is the day's start as the driver takes it, `sums` the counts summed."""
    return (
        f"{_INSERT} SELECT backend, model, caller, {day}, {sums} FROM {source} GROUP BY backend, model, caller"
        f"{_ADDED_ON_CONFLICT}"
    )


def mark_applied_statement(placeholder: str) -> str:
    """The statement that records a journal's batch as written: it changes a row (rowcount 1) only for a batch later
    than the journal's last one, so a batch replayed is recognised and not added twice."""
    return (
        f"INSERT INTO applied_batches (journal, last_batch) VALUES ({placeholder}, {placeholder})"
        " ON CONFLICT (journal) DO UPDATE SET last_batch = excluded.last_batch"
        " WHERE applied_batches.last_batch < excluded.last_batch"
    )


BucketKey = tuple[str, str, str, int]
"""(backend, model, caller, bucket_start)"""
TotalsKey = tuple[str, str, str]
"""(backend, model, caller)"""
Buckets = dict[BucketKey, list[int]]
Totals = dict[TotalsKey, list[int]]


class LedgerUnavailableError(RuntimeError):
    """The ledger's database cannot be read or written now; the message names it (never with its password)."""


def not_the_ledgers(table: str, columns: Collection[str], where: str) -> LedgerUnavailableError | None:
    """The error for a table of the ledger's name, found with these columns, that lacks some of those `TABLE_COLUMNS`
    gives it (another application's, in a database shared with it; a copy of another shape): every write failed on
    it for ever, with only the database's own words about one column to go by. None when it has them all (a column
    an operator added besides is theirs)."""
    if not (lacking := sorted(TABLE_COLUMNS[table].difference(columns))):
        return None
    return LedgerUnavailableError(
        f"{where}: its table {table} is not the usage ledger's (it lacks the ledger's columns {', '.join(lacking)}):"
        " give the ledger a database (or schema) of its own"
    )


@dataclass(frozen=True, slots=True)
class BatchId:
    """A batch of usage records: the journal (process) that recorded it and its number there, counting up from 1."""

    journal: str
    number: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a query reads from the database at one moment: the totals, and the last batch written of each journal
    asked about (absent: none written)."""

    totals: Totals
    last_batches: Mapping[str, int]

    def has(self, batch: BatchId) -> bool:
        return batch.number <= self.last_batches.get(batch.journal, 0)


@dataclass(frozen=True, slots=True)
class Selection:
    """A query's filters; the window selects whole buckets, those whose start lies in [start, end)."""

    backend: str | None = None
    model: str | None = None
    caller: str | None = None
    start: float | None = None
    end: float | None = None

    def matches(self, key: BucketKey) -> bool:
        backend, model, caller, bucket_start = key
        return (
            self.backend in (None, backend)
            and self.model in (None, model)
            and self.caller in (None, caller)
            and (self.start is None or bucket_start >= self.start)
            and (self.end is None or bucket_start < self.end)
        )

    def add_matching(self, totals: Totals, buckets: Iterable[tuple[BucketKey, Iterable[int]]]) -> None:
        """Adds the buckets this selection takes to totals per (backend, model, caller)."""
        for key, counts in buckets:
            if self.matches(key):
                add_into(totals, key[:3], counts)

    def sql_where(self, placeholder: str) -> tuple[str, list[object]]:
        """The WHERE clause (empty without filters) and its values, with the driver's placeholder ("?" or "%s")."""
        clauses: list[str] = []
        values: list[object] = []
        for column, value in (("backend", self.backend), ("model", self.model), ("caller", self.caller)):
            if value is not None:
                clauses.append(f"{column} = {placeholder}")
                values.append(value)
        # The bounds as integers, as bucket_start is: compared with a float, PostgreSQL would convert the column, every
        # row's, and no index on it would serve. Rounded up, both select the same buckets as the bounds themselves.
        if self.start is not None:
            clauses.append(f"bucket_start >= {placeholder}")
            values.append(math.ceil(self.start))
        if self.end is not None:
            clauses.append(f"bucket_start < {placeholder}")
            values.append(math.ceil(self.end))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


_Key = TypeVar("_Key", bound=Hashable)


def add_into(target: dict[_Key, list[int]], key: _Key, counts: Iterable[int]) -> None:
    current = target.get(key)
    if current is None:
        target[key] = list(counts)
    else:
        current[:] = map(operator.add, current, counts)  # in place, added up in C: a call adds a record


class LedgerStore(Protocol):
    """A database the ledger writes batches to and reads totals from. Every failure to reach or use it is a
    `LedgerUnavailableError`; the ledger keeps the batch in its journal and tries again."""

    @property
    def kind(self) -> str:
        """Either "sqlite" or "postgresql"."""
        ...

    @property
    def description(self) -> str:
        """Which database, for people (logs, health): a path, or a URL without its password."""
        ...

    async def check(self) -> None:
        """Reaches the database (creating or migrating its schema on the first success), or raises."""
        ...

    async def apply(self, batch: BatchId, buckets: Buckets) -> bool:
        """Adds the batch's counts into the bucket rows and records its number, in one transaction; False (and
        nothing changed) if this batch or a later one of its journal was written before."""
        ...

    async def read(self, selection: Selection, journals: Collection[str]) -> Snapshot:
        """The totals the selection takes and the last batch written of each of journals, from one snapshot."""
        ...

    async def roll_up(self, before: int) -> int:
        """Keeps the usage of the oldest day before `before` (a day's start) that has rows after its start as one row
        per backend, model and caller at the day's start, in one transaction; how many rows it merged so (0: no such
        day is left, or another gateway is rolling up now)."""
        ...

    async def aclose(self) -> None: ...
