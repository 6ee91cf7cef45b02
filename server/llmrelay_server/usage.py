"""The usage ledger: token and cost totals per backend, model and caller, in time buckets, kept in SQLite.

Recording happens on the request path, so it only adds to an in-memory buffer; a background task writes the
buffer to SQLite every ``flush_interval_s`` (in a worker thread, one transaction per flush). ``aclose()`` writes
whatever is left, so a graceful stop (SIGTERM) loses nothing. A crash (kill -9) loses at most what was recorded
in the last ``flush_interval_s`` plus the duration of the write in progress: everything older is committed, and
SQLite's WAL keeps committed transactions across a process crash.

Rows are per (backend, model, caller, bucket_start); a bucket is ``bucket_s`` seconds (a minute by default)
aligned to the Unix epoch, and a query's time window selects whole buckets: those whose start lies in
[start, end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from llmrelay_server.domain import Cost, TokenUsage

__all__ = ["UsageLedger", "UsageTotals"]

_log = logging.getLogger(__name__)

_MEMORY: Final = ":memory:"

_SCHEMA: Final = """
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
    interrupted_requests INTEGER NOT NULL DEFAULT 0,
    cost_usd_micros INTEGER NOT NULL DEFAULT 0,
    cost_estimated_requests INTEGER NOT NULL DEFAULT 0,
    price_unknown_requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (backend, model, caller, bucket_start)
) WITHOUT ROWID
"""

_UPSERT: Final = """
INSERT INTO usage_buckets (backend, model, caller, bucket_start,
                           requests, prompt_tokens, completion_tokens, total_tokens, estimated_requests,
                           interrupted_requests, cost_usd_micros, cost_estimated_requests, price_unknown_requests)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (backend, model, caller, bucket_start) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    total_tokens = total_tokens + excluded.total_tokens,
    estimated_requests = estimated_requests + excluded.estimated_requests,
    interrupted_requests = interrupted_requests + excluded.interrupted_requests,
    cost_usd_micros = cost_usd_micros + excluded.cost_usd_micros,
    cost_estimated_requests = cost_estimated_requests + excluded.cost_estimated_requests,
    price_unknown_requests = price_unknown_requests + excluded.price_unknown_requests
"""
# Columns added since the first schema: a database made before them gets them at start, with zeros.
_ADDED_COLUMNS: Final = {
    column: "INTEGER NOT NULL DEFAULT 0"
    for column in ("interrupted_requests", "cost_usd_micros", "cost_estimated_requests", "price_unknown_requests")
}


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """The usage of one backend, model and caller over a query's window."""

    backend: str
    model: str
    caller: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_requests: int
    interrupted_requests: int = 0
    cost_usd_micros: int = 0
    """What the requests cost, in millionths of a US dollar."""
    cost_estimated_requests: int = 0
    """Of requests, those whose cost is not exact: the tokens were estimated, or the price unknown."""
    price_unknown_requests: int = 0
    """Of requests, those on a paid backend whose model has no known price (at the default rate)."""


# (backend, model, caller, bucket_start) -> [requests, prompt_tokens, completion_tokens, total_tokens, estimated,
#                                            interrupted, cost_usd_micros, cost_estimated, price_unknown]
_BucketKey = tuple[str, str, str, int]
_TotalsKey = tuple[str, str, str]
_Buffer = dict[_BucketKey, list[int]]


@dataclass(frozen=True, slots=True)
class _Filter:
    backend: str | None
    model: str | None
    caller: str | None
    start: float | None
    end: float | None

    def matches(self, key: _BucketKey) -> bool:
        backend, model, caller, bucket_start = key
        return (
            self.backend in (None, backend)
            and self.model in (None, model)
            and self.caller in (None, caller)
            and (self.start is None or bucket_start >= self.start)
            and (self.end is None or bucket_start < self.end)
        )

    def sql_where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        values: list[object] = []
        for column, value in (("backend", self.backend), ("model", self.model), ("caller", self.caller)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if self.start is not None:
            clauses.append("bucket_start >= ?")
            values.append(self.start)
        if self.end is not None:
            clauses.append("bucket_start < ?")
            values.append(self.end)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


_Key = TypeVar("_Key", bound=Hashable)


def _add_into(target: dict[_Key, list[int]], key: _Key, counts: Iterable[int]) -> None:
    current = target.get(key)
    if current is None:
        target[key] = list(counts)
    else:
        for index, count in enumerate(counts):
            current[index] += count


class UsageLedger:
    """Token usage per backend, model and caller, recorded without I/O and flushed to SQLite in the background.

    Lifecycle: construct (opens or creates the database), ``await start()``, ``record(...)`` from any coroutine
    or thread, ``await query(...)`` whenever, ``await aclose()`` at shutdown. Bound on loss: see the module doc.
    """

    def __init__(self, path: Path | str, *, flush_interval_s: float = 0.5, bucket_s: int = 60) -> None:
        if flush_interval_s <= 0 or bucket_s <= 0:
            raise ValueError("flush_interval_s and bucket_s must be positive")
        self._flush_interval_s = flush_interval_s
        self._bucket_s = bucket_s
        self._connection = _open_database(path)
        # record() may run on any thread; the buffer swap in flush() must see each record entirely or not at all.
        self._buffer_lock = threading.Lock()
        self._buffer: _Buffer = {}
        # Held across every database access, so a query never sees a flush half-way (rows in neither place, or in
        # both) and the one connection is never used by two threads at once.
        self._database_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.write_failures = 0
        """Writes that failed (their rows went back to the buffer, for the next write)."""

    def record(
        self,
        backend: str,
        model: str,
        caller: str,
        usage: TokenUsage,
        at: float | None = None,
        *,
        interrupted: bool = False,
    ) -> None:
        """Add one answer's usage and its cost, if priced (interrupted: a stream that broke after it started, billed for
        what it consumed); at is its Unix time (now by default). Never blocks on I/O."""
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        moment = time.time() if at is None else at
        key = (backend, model, caller, int(moment // self._bucket_s) * self._bucket_s)
        cost = usage.cost or Cost(0)
        counts = (
            1,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            int(usage.estimated),
            int(interrupted),
            cost.usd_micros,
            int(cost.estimated),
            int(cost.price_unknown),
        )
        with self._buffer_lock:
            _add_into(self._buffer, key, counts)

    def queue_depth(self) -> int:
        """Rows recorded and not yet written."""
        return len(self._buffer)

    async def start(self) -> None:
        """Start flushing the buffer every flush_interval_s."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_periodically(), name="usage-ledger-flush")

    async def flush(self) -> None:
        """Write the buffer to SQLite now, in one transaction. On failure the records go back into the buffer."""
        async with self._database_lock:
            pending = self._take_buffer()
            if not pending:
                return
            try:
                await asyncio.to_thread(self._write, pending)
            except Exception:
                self._restore(pending)
                raise

    async def aclose(self) -> None:
        """Stop the background flush, write everything recorded, and close the database."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        async with self._database_lock:
            await asyncio.to_thread(self._connection.close)

    async def query(
        self,
        backend: str | None = None,
        model: str | None = None,
        caller: str | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> list[UsageTotals]:
        """Totals per backend, model and caller, largest total first; records not yet flushed are included."""
        selection = _Filter(backend, model, caller, start, end)
        async with self._database_lock:
            totals = await asyncio.to_thread(self._read_totals, selection)
            with self._buffer_lock:
                buffered = [(key, list(counts)) for key, counts in self._buffer.items() if selection.matches(key)]
        for (row_backend, row_model, row_caller, _), counts in buffered:
            _add_into(totals, (row_backend, row_model, row_caller), counts)
        records = [
            UsageTotals(row_backend, row_model, row_caller, *counts)
            for (row_backend, row_model, row_caller), counts in totals.items()
        ]
        records.sort(key=lambda r: (-r.total_tokens, r.backend, r.model, r.caller))
        return records

    async def _flush_periodically(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._flush_interval_s)
            try:
                await self.flush()
            except Exception:
                # The records are back in the buffer; the next flush retries them.
                self.write_failures += 1
                _log.exception("writing the usage ledger failed; will retry")

    def _take_buffer(self) -> _Buffer:
        with self._buffer_lock:
            pending, self._buffer = self._buffer, {}
        return pending

    def _restore(self, pending: _Buffer) -> None:
        with self._buffer_lock:
            for key, counts in pending.items():
                _add_into(self._buffer, key, counts)

    def _write(self, pending: _Buffer) -> None:
        rows = [(*key, *counts) for key, counts in pending.items()]
        with self._connection:  # one transaction: committed on success, rolled back on error
            self._connection.executemany(_UPSERT, rows)

    def _read_totals(self, selection: _Filter) -> dict[_TotalsKey, list[int]]:
        where, values = selection.sql_where()
        cursor = self._connection.execute(
            "SELECT backend, model, caller, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens),"
            " SUM(total_tokens), SUM(estimated_requests), SUM(interrupted_requests), SUM(cost_usd_micros),"
            " SUM(cost_estimated_requests), SUM(price_unknown_requests)"
            f" FROM usage_buckets{where} GROUP BY backend, model, caller",
            values,
        )
        return {(row[0], row[1], row[2]): list(row[3:]) for row in cursor}


def _open_database(path: Path | str) -> sqlite3.Connection:
    if str(path) != _MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One connection, used by one worker thread at a time (the ledger's database lock sees to that).
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL survives a process crash (committed transactions are in the WAL); only power loss can
    # undo the newest ones, which is not worth an fsync per flush.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")
    connection.execute(_SCHEMA)
    present = {row[1] for row in connection.execute("PRAGMA table_info(usage_buckets)")}
    for column, declaration in _ADDED_COLUMNS.items():
        if column not in present:
            connection.execute(f"ALTER TABLE usage_buckets ADD COLUMN {column} {declaration}")
    connection.commit()
    return connection
