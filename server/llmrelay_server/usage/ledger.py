"""The usage ledger: records on the request path, a journal on disk, and batches written to a database behind.

``record()`` does two things before it returns, under one lock: it appends the record as a line to this process's
active batch file (one ``os.write`` to a descriptor opened with O_APPEND: a process killed with SIGKILL right after
loses nothing, the line is in the kernel's page cache), and adds it to that batch's counts in memory. Every
``flush_interval_s`` a background task seals the batch (under the same lock, the next record goes to a new file with
the next number) and writes its counts to the database in one transaction that also records the batch's number
(`store`), then deletes the file. A batch written twice (a crash between the commit and the deletion, replayed
later) is added once.

When a write fails the batch stays on disk, and memory is let go: the counts of every batch waiting are dropped (the
files have them), and until a write succeeds records only go to the active file, which is not sealed meanwhile (one
file per outage, not one per flush interval). The waiting batches are retried oldest first every flush interval;
when the database is back they are read from their files and written, and the ledger is available again by itself.
A record the journal cannot take (past ``journal_max_bytes`` of files written by this process, or a write that
fails: a full disk) is kept in the batch's counts in memory while the database is up (lost only in a crash), and the
batch keeps them through an outage that follows; with the database down too, it is dropped: counted
(``dropped_records``) and logged once until the journal has room again. (The journals it claimed from processes that
died count apart: they add nothing to the disk, and must not cost new records their place.)

A process that dies (kill -9, a crash) leaves its journal, whole: the kernel writes its page cache out after the
process is gone. (The lines are not fsynced: a power loss can still take the newest ones.) Any ledger on the same
directory claims it when it starts and every `_MAINTENANCE_INTERVAL_S`, the database reachable or not (`journal`
says how ownership works), writes its batches (once the database answers) and deletes them.

``query()`` adds to the database's totals every batch not yet in them: those in this process's memory, and every
batch file in the directory (other processes', and this one's while the database is down). It reads the journal
first and the database second, in one snapshot with the last batch number written of each journal, so a batch
written in between is counted once, from the database. During an outage of the database a query fails
(`UsageUnavailableError`, GetUsage's UNAVAILABLE): the totals it holds are out of reach.

Without a journal (a ":memory:" ledger) records are only in memory, and a failed write keeps them there.

Rows are per (backend, model, caller, bucket_start); a bucket is ``bucket_s`` seconds (a minute by default) aligned
to the Unix epoch, and a query's window selects whole buckets: those whose start lies in [start, end).

With ``by_minute_days`` set, the ledger grows by the day rather than by the minute: once an hour (and at start) the
buckets of each UTC day older than that many days are merged into one row per backend, model and caller at the day's
start (`LedgerStore.roll_up`), one day after each flush so that the writes of new records are not held up. Totals stay
exact; a window that begins or ends inside such a day takes the whole day or none of it, by the day's start. Records
of an old day written later (a journal replayed after an outage) are merged at the next roll-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from llmrelay_server.config import ServerConfig, is_postgresql
from llmrelay_server.domain import (
    CONTROL_CHARACTERS,
    Cost,
    StoreHealth,
    StoreRole,
    TokenUsage,
    UsageUnavailableError,
)
from llmrelay_server.usage.journal import Journal, Orphan, batch_files, encode, read_batch
from llmrelay_server.usage.sqlite import MEMORY, SQLiteStore
from llmrelay_server.usage.store import (
    DAY_S,
    BatchId,
    Buckets,
    LedgerStore,
    LedgerUnavailableError,
    Selection,
    Snapshot,
    Totals,
    add_into,
)

QUERY_RETRY_S = 5.0
"""What a usage query refused for an unreachable database tells the caller to wait (PostgreSQL's reconnect pace)."""
_log = logging.getLogger(__name__)

MAX_MODEL_CHARS: Final = 256
"""The longest model name the ledger keeps (a caller's own is refused past as many, convert.MAX_MODEL_NAME); a longer
name an upstream gives is cut, and ends in a digest of the whole so that two such names stay apart. PostgreSQL indexes
at most 2704 bytes of a row's key: the batch holding a longer name would be retried for ever, every record after it
held up, where SQLite takes it."""
MANY_ROWS: Final = 1000
"""Of a usage query's answer, the rows past which it is made in a thread (`query`), not on the event loop that every
call runs on."""
HURRIED_WRITE_S: Final = 1.0
"""How long the last writes of a ledger closing as the gateway stops now may take (a healthy database's take
milliseconds): what they have not written by then waits in the journal for the next start."""
_MAINTENANCE_INTERVAL_S: Final = 5.0
"""How often the ledger claims the journals of dead processes, and checks an idle database."""
_ROLL_UP_INTERVAL_S: Final = 3600.0
"""How often the ledger looks for days to keep by the day (a day becomes old once a day; records of an old day
replayed late wait at most this long)."""


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


LEGACY_POSTGRESQL_JOURNAL_DIR: Final = Path("llmrelay-usage.journal")
"""Where a PostgreSQL ledger's journal was by default before it was each database's own."""


def default_journal_dir(usage_db: str) -> Path | None:
    """Beside a SQLite file; in the working directory for PostgreSQL, one for each database; none for a ledger in
    memory. A journal is replayed into whatever database its reader writes to: gateways started in one directory on
    two databases must not share one, or each would claim the other's records."""
    if is_postgresql(usage_db):
        database = hashlib.sha256(_database_of(usage_db).encode()).hexdigest()[:12]
        return Path(f"llmrelay-usage-{database}.journal")
    return None if usage_db == MEMORY else Path(f"{usage_db}.journal")


def _database_of(url: str) -> str:
    """Which database a PostgreSQL URL reaches, however it is spelled (its options, the default port, a password, the
    case of the host): user@host:port/dbname as libpq resolves them, from the URL's parts or its query's parameters,
    else the PG* variables (PGHOST, PGPORT, PGUSER, PGDATABASE, PGSERVICE), else libpq's defaults. The URL alone
    would name one directory for gateways that the environment sends to two databases."""
    import psycopg  # only where PostgreSQL is configured
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except psycopg.Error:  # a URL libpq cannot read (the configuration's checks refuse them): its own text, then
        return url
    defaults = {option.keyword.decode(): option.val for option in psycopg.pq.Conninfo.get_defaults()}

    def resolved(key: str) -> str:
        value = given.get(key)
        if value is None and (default := defaults.get(key)) is not None:
            value = default.decode()
        return str(value or "")

    user, host, port, service = resolved("user"), resolved("host"), resolved("port") or "5432", resolved("service")
    # A host name in any case is one host; a Unix socket's directory (/run/postgresql) is a path.
    host = host if host.startswith("/") else host.lower()
    dbname = resolved("dbname") or user  # libpq's default database is the user's name
    return f"{user}@{host}:{port}/{dbname}" + (f"?service={service}" if service else "")


def _warn_of_a_legacy_journal(directory: Path | None) -> None:
    """Records an older version left in the old default directory are replayed by no ledger by themselves: said."""
    with contextlib.suppress(OSError):
        if LEGACY_POSTGRESQL_JOURNAL_DIR.is_dir() and batch_files(LEGACY_POSTGRESQL_JOURNAL_DIR):
            _log.warning(
                "usage ledger: %s holds usage records an older version journaled; this database's journal is now %s:"
                " run once with server.usage_journal_dir: %s to write them to this database (if they are its)",
                LEGACY_POSTGRESQL_JOURNAL_DIR,
                directory,
                LEGACY_POSTGRESQL_JOURNAL_DIR,
            )


def open_store(usage_db: str) -> LedgerStore:
    """The store server.usage_db names: a PostgreSQL URL, else a SQLite path (or ":memory:")."""
    if is_postgresql(usage_db):
        from llmrelay_server.usage.postgresql import PostgreSQLStore  # psycopg, only where PostgreSQL is configured

        return PostgreSQLStore(usage_db)
    return SQLiteStore(usage_db)


@dataclass(eq=False, slots=True)
class _Batch:
    id: BatchId
    path: Path | None
    """None: no journal, the batch is in memory only."""
    fd: int | None
    """Open (for appending) while this is the process's active batch."""
    buckets: Buckets | None
    """None: on disk only (let go of while the database is down, or claimed from a dead process)."""
    records: int = 0
    size: int = 0
    """Bytes on disk."""
    orphan: Orphan | None = None
    """The dead process's journal this batch was claimed from."""
    unjournaled: int = 0
    """Of its records, those the journal could not take: in its counts alone, which it keeps through an outage."""
    lost: bool = False
    """Its file was found gone (removed by hand): its counts are empty for good, not to be read again, nor its loss
    said again at every try while the database is down."""


class UsageLedger:
    """Token usage per backend, model and caller, journaled on the request path and written to a database behind.

    Lifecycle: construct (opens or creates a SQLite database; a PostgreSQL one at the first use), ``await start()``,
    ``record(...)`` from any coroutine or thread, ``await query(...)`` whenever, ``await aclose()`` at shutdown.
    """

    def __init__(
        self,
        database: Path | str | LedgerStore,
        *,
        journal_dir: Path | str | None = None,
        journal_max_bytes: int = ServerConfig().usage_journal_max_bytes,
        flush_interval_s: float = 0.5,
        bucket_s: int = 60,
        by_minute_days: int | None = None,
    ) -> None:
        """database: a SQLite path, ":memory:", a PostgreSQL URL, or a store. journal_dir: unset, the default for a
        path or URL (`default_journal_dir`), and no journal for a store given as such. by_minute_days: how many days
        of usage stay by the bucket; older days are kept by the day (unset: every bucket for ever)."""
        if flush_interval_s <= 0 or bucket_s <= 0 or journal_max_bytes <= 0 or (by_minute_days or 1) <= 0:
            raise ValueError("flush_interval_s, bucket_s, journal_max_bytes and by_minute_days must be positive")
        self._flush_interval_s = flush_interval_s
        self._bucket_s = bucket_s
        self._by_minute_days = by_minute_days
        self._next_roll_up = 0.0
        """When (the loop's clock) to look for days to roll up next."""
        self._rolled_up = 0
        """Rows merged so far in the pass under way: one day between two flushes (a day of 60 callers and models,
        86,400 rows, takes SQLite about 0.6 s), so that a first pass over a large ledger does not hold the writes and
        GetUsage up."""
        self._max_bytes = journal_max_bytes
        ledger = None
        if isinstance(database, str | Path):
            self._store = open_store(str(database))
            directory = default_journal_dir(str(database)) if journal_dir is None else Path(journal_dir)
            if journal_dir is None and is_postgresql(str(database)):
                _warn_of_a_legacy_journal(directory)
            # A directory given for the journal may be given to two gateways on two files: said so at start. (The
            # default one is named after its file. A PostgreSQL database is not known by its URL: a pooler's port,
            # another user reach the same one, which cannot be asked which it is while it is down.)
            if journal_dir is not None and not is_postgresql(str(database)) and str(database) != MEMORY:
                ledger = os.path.realpath(database)
        else:
            self._store = database
            directory = None if journal_dir is None else Path(journal_dir)
        self._journal = Journal(directory, ledger) if directory is not None else None
        self._journal_id = self._journal.id if self._journal is not None else f"{os.getpid()}-{secrets.token_hex(4)}"
        self._unavailable: tuple[float, str] | None = None
        """Since when and why the last write (or check) failed; None: it succeeded."""
        # record() may run on any thread: the line, the counts and the swap of the active batch go together.
        self._lock = threading.Lock()
        self._next_number = 1
        self._active = self._new_batch()
        self._pending: deque[_Batch] = deque()
        """Sealed (or claimed) and not yet written, oldest first."""
        self._orphans: list[Orphan] = []
        self._bytes = 0
        """On disk in the batches this process wrote and holds (those it claimed are not counted)."""
        self._unwritten = 0
        """Records not yet in the database."""
        self._unjournaled = 0
        """Of them, those in memory alone (the journal could not take them)."""
        self._unjournaled_why = ""
        self._unjournaling = False
        """Since the journal last refused a record with the database up (logged once, until it takes one again)."""
        self._unfiled: str | None = None
        """Why the active batch has no journal file, when the journal could make none for it (`_seal`)."""
        self._unlisted = False
        """Whether the journal's directory could not be read when last looked at for dead processes' journals."""
        self._unreadable = False
        """Whether the last flush found a journal file it could not read (logged once, until a flush gets through)."""
        self._undeletable = False
        """Whether a written batch's journal file could not be deleted (logged once, until one can be again)."""
        self._unanswered = False
        """Whether the last usage query found the database out of reach (logged once, until one is answered again)."""
        self._flushing = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._dropping = False
        self.write_failures = 0
        """Writes that failed (their batches stay in the journal, retried)."""
        self.dropped_records = 0
        """Records not kept: the journal was full (or could not be written) with the database down."""
        self._dropped_why = ""

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
        what it consumed); at is its Unix time (now by default). One write to the page cache, no waiting on a disk."""
        moment = time.time() if at is None else at
        if not model.isprintable():  # one test on the request path; the rare name it stops at is looked at closer
            # The name an upstream gave its model (a caller's is refused): kept without control characters, as
            # GetUsage's filters take names, or its records could not be asked for by the name they carry (and
            # `llmrelay usage` would print an upstream's escape sequences to a terminal). PostgreSQL cannot even store
            # a NUL: the batch holding it would be retried for ever, every record after it held up.
            model = CONTROL_CHARACTERS.sub("\ufffd", model)
        if len(model) > MAX_MODEL_CHARS:
            model = _shortened(model)
        key = (backend, model, caller, int(moment // self._bucket_s) * self._bucket_s)
        cost = usage.cost or Cost(0)
        counts = (
            1,
            usage.prompt_tokens,
            usage.completion_tokens,
            int(usage.estimated),
            int(interrupted),
            cost.usd_micros,
            int(cost.estimated),
            int(cost.price_unknown),
        )
        line = encode(key, counts) if self._journal is not None else b""
        with self._lock:
            if self._closed:
                raise RuntimeError("the usage ledger is closed")
            batch = self._active
            failure = self._append(batch, line) if batch.fd is not None else self._unfiled
            if failure is not None:
                if batch.buckets is None:  # the database down as well: nowhere to keep it
                    self._drop(failure)
                    return
                self._keep_unjournaled(batch, failure)
            batch.records += 1
            self._unwritten += 1
            if batch.buckets is not None:
                add_into(batch.buckets, key, counts)

    def queue_depth(self) -> int:
        """Records not yet in the database (in the journal, or in memory without one)."""
        return self._unwritten

    def health(self) -> StoreHealth:
        journaled = self._unwritten - self._unjournaled if self._journal is not None else 0
        parts = []
        if self._unavailable is not None:
            since, error = self._unavailable
            parts.append(f"unavailable since {datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S} UTC: {error}")
        else:
            parts.append(self._store.description)
        if journaled and self._journal is not None:
            parts.append(f"{journaled} records wait in the journal {self._journal.directory}")
        if self._unjournaled:
            parts.append(f"{self._unjournaled} records in memory alone ({self._unjournaled_why})")
        if self.dropped_records:
            parts.append(f"{self.dropped_records} records dropped ({self._dropped_why})")
        return StoreHealth(
            role=StoreRole.USAGE_LEDGER,
            kind=self._store.kind,
            available=self._unavailable is None,
            description="; ".join(parts),
            pending_records=journaled,
        )

    async def start(self) -> None:
        """Start the background work: claiming dead processes' journals, and writing batches every flush interval."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-ledger")

    @property
    def closed(self) -> bool:
        """Closed (`aclose`): a record now is refused."""
        return self._closed

    async def flush(self) -> None:
        """Write every batch waiting, oldest first, then the records of the active one; each batch in one transaction.
        On failure (LedgerUnavailableError) what is not written stays in the journal (in memory without one)."""
        async with self._flushing:
            sealed = False
            while True:
                with self._lock:
                    if not self._pending:
                        if sealed or not self._seal():
                            return
                        sealed = True
                    batch = self._pending[0]
                await self._write(batch)

    async def aclose(self, hurry: asyncio.Event | None = None) -> None:
        """Stop the background work, write everything recorded, and close the journal and the database. What cannot
        be written (the database down) stays in the journal, for the next ledger on this directory. Once `hurry` is
        set (the gateway told to stop now), the writes left get HURRIED_WRITE_S, and what they have not written by
        then stays in the journal, where it is safe: a database that stopped answering held a stop now for the bound
        of each write."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        try:
            if self._task is not None:
                await self._until_done_or(self._task, hurry)
            try:
                if self._unwritten and self._unavailable is not None and self._journal is not None:
                    # The last write failed (each is bounded in time): another would only hold the shutdown up.
                    raise LedgerUnavailableError(self._unavailable[1])
                if self._task is None or not self._task.cancelled():  # else its write was given its time already
                    flushing = asyncio.ensure_future(self.flush())
                    await self._until_done_or(flushing, hurry)
                if self._unwritten and hurry is not None and hurry.is_set() and self._all_journaled():
                    raise LedgerUnavailableError(f"not written within {HURRIED_WRITE_S:g} s of the stop now")
            except (LedgerUnavailableError, OSError) as error:
                where = f"in the journal {self._journal.directory}" if self._journal is not None else "lost"
                if self._unjournaled and self._journal is not None:
                    where += f", but for {self._unjournaled} that it could not take, lost"
                _log.error("usage ledger: %d records not written at shutdown (%s): %s", self._unwritten, where, error)
        finally:
            self._close_journal()
            await self._store.aclose()

    def _all_journaled(self) -> bool:
        return self._journal is not None and not self._unjournaled

    async def _until_done_or(self, task: asyncio.Future[None], hurry: asyncio.Event | None) -> None:
        """Waits for `task` (the background work, which ends at its next turn, or the last flush); once `hurry` is
        set, for HURRIED_WRITE_S more, then cancels it where all it has to write is in the journal."""
        if hurry is None:
            await task
            return
        hurried = asyncio.ensure_future(hurry.wait())
        either: set[asyncio.Future[Any]] = {task, hurried}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        if not task.done():
            await asyncio.wait({task}, timeout=HURRIED_WRITE_S)
        if not task.done() and self._all_journaled():
            task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.result()

    async def query(
        self,
        backend: str | None = None,
        model: str | None = None,
        caller: str | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> list[UsageTotals]:
        """Totals per backend, model and caller, largest total first; records not yet written are included.
        UsageUnavailableError when the database cannot be read (the caller is told to come back, not where it is)."""
        if model is not None and len(model) > MAX_MODEL_CHARS:
            model = _shortened(model)  # as its records are kept: the name an answer gave finds them
        selection = Selection(backend, model, caller, start, end)
        if self._unavailable is not None:
            # Down when last tried: asked first, so that the caller is told within the database's own bound, not
            # after the journal (an outage's worth of records) is read for nothing. Back, it is asked again below,
            # after the journal, as the totals need.
            await self._read_store(selection, set())
        batches: dict[BatchId, Totals] = {}
        with self._lock:
            for batch in (*self._pending, self._active):
                if batch.buckets is not None and batch.records:
                    selection.add_matching(batches.setdefault(batch.id, {}), batch.buckets.items())
        if self._journal is not None:
            batches.update(await asyncio.to_thread(_read_journal, self._journal.directory, selection, set(batches)))
        snapshot = await self._read_store(selection, {batch.journal for batch in batches})
        totals = snapshot.totals
        for batch_id, batch_totals in batches.items():
            if not snapshot.has(batch_id):
                for key, counts in batch_totals.items():
                    add_into(totals, key, counts)
        if len(totals) > MANY_ROWS:
            # Some 15 us a row, which would hold every other call up (half a second for 50,000 rows): in a thread,
            # which lets the event loop have the interpreter at its switch interval.
            return await asyncio.to_thread(_sorted_records, totals)
        return _sorted_records(totals)

    # --- the background work --------------------------------------------------------------------------------------

    async def _read_store(self, selection: Selection, journals: set[str]) -> Snapshot:
        try:
            snapshot = await self._store.read(selection, journals)
        except LedgerUnavailableError as error:
            # Once, then at DEBUG: a dashboard polling GetUsage, and each of its channel's retries, would repeat it for
            # as long as the database is down (each caller's status says why too).
            _log.log(
                logging.DEBUG if self._unanswered else logging.WARNING,
                "usage ledger: cannot answer a usage query: %s",
                error,
            )
            self._unanswered = True
            raise UsageUnavailableError(QUERY_RETRY_S) from error
        if self._unanswered:
            self._unanswered = False
            _log.info("usage ledger: answers usage queries again")
        return snapshot

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_maintenance = loop.time()
        while not self._stopping.is_set():
            if loop.time() >= next_maintenance:
                next_maintenance = loop.time() + _MAINTENANCE_INTERVAL_S
                try:
                    await self._maintain()
                except OSError as exc:  # the directory gone, or unreadable: said once, not every few seconds
                    if not self._unlisted:
                        self._unlisted = True
                        _log.error(
                            "usage ledger: the journal %s cannot be read (%s): the journals of dead processes are"
                            " claimed once it can",
                            self._journal.directory if self._journal is not None else "",
                            exc.strerror,
                        )
                except Exception:
                    _log.exception("usage ledger: claiming the journals of dead processes failed; will retry")
                else:
                    self._unlisted = False
            try:
                await self.flush()
            except LedgerUnavailableError:
                pass  # logged when the outage began; retried at the next flush
            except OSError as exc:  # a journal file that cannot be read (EACCES, EIO): said once, not every flush
                if not self._unreadable:
                    self._unreadable = True
                    _log.error(
                        "usage ledger: the journal file %s cannot be read (%s); it and the records after it wait"
                        " until it can",
                        exc.filename,
                        exc.strerror,
                    )
            except Exception:
                _log.exception("usage ledger: writing failed; will retry")
            else:
                self._unreadable = False
            # After a flush that reached the database: a roll-up that fails then is refused for itself (said so),
            # not a database down (which the writes report, once an outage).
            due = loop.time() >= self._next_roll_up and not self._stopping.is_set()
            if self._by_minute_days is not None and self._unavailable is None and due:
                await self._roll_up(self._by_minute_days)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._flush_interval_s)

    async def _maintain(self) -> None:
        """Checks an idle database (so health tells, and a new one gets its schema before the first write), then
        claims the journals of dead processes for the flushes to write: through an outage too, so that what they hold
        is counted as waiting (health's pending_records), and written as soon as the database is back."""
        if not self._pending and not self._active.records:
            try:
                await self._store.check()
            except LedgerUnavailableError as error:
                self._became_unavailable(error)
            else:
                self._became_available()
        if self._journal is None:
            return
        held = {orphan.journal for orphan in self._orphans}
        for orphan in await asyncio.to_thread(self._journal.claim_orphans, held):
            if not orphan.batches:
                orphan.release(drained=True)
                continue
            _log.warning(
                "usage ledger: claimed the journal %s of a process that stopped before writing it: %d records in"
                " %d batches",
                orphan.journal,
                sum(records for _, _, records, _ in orphan.batches),
                len(orphan.batches),
            )
            with self._lock:
                self._orphans.append(orphan)
                for batch_id, path, records, size in orphan.batches:
                    self._pending.append(_Batch(batch_id, path, None, None, records, size, orphan))
                    self._unwritten += records

    async def _roll_up(self, by_minute_days: int) -> None:
        """Keeps one more day older than by_minute_days by the day; when none is left, the pass is over (and said) and
        the next is an interval away."""
        loop = asyncio.get_running_loop()
        before = max(0, (int(time.time()) // DAY_S - by_minute_days) * DAY_S)  # 0: more days than the epoch has
        try:
            merged = await self._store.roll_up(before)
        except LedgerUnavailableError as error:
            # Not an outage of the ledger (the writes tell that): a database that refuses the roll-up alone (the
            # ledger's role may not DELETE, a statement timeout) must be heard, once an attempt.
            _log.warning("usage ledger: could not keep old usage by the day (tried again in an hour): %s", error)
            merged = 0
        except Exception:
            _log.exception("usage ledger: keeping old usage by the day failed; tried again in an hour")
            merged = 0
        if merged:
            self._rolled_up += merged  # the next day after the next flush
            return
        self._next_roll_up = loop.time() + _ROLL_UP_INTERVAL_S
        if self._rolled_up:
            _log.info(
                "usage ledger: %d rows of usage before %s UTC merged into one row per day"
                " (server.usage_by_minute_days)",
                self._rolled_up,
                datetime.fromtimestamp(before, UTC).date(),
            )
            self._rolled_up = 0

    def _seal(self) -> bool:
        """Under the lock: the active batch, if it has records, goes to the pending ones; the next record starts a new
        one. False if there was nothing to seal."""
        sealed = self._active
        if not sealed.records:
            if sealed.path is None and self._journal is not None:
                # Left without a file (and, the database down, dropping what it is given): the next one tries again.
                self._active = self._new_batch(unfiled_if_need_be=True)
            return False
        # Kept active for want of a file for the next one, this batch never reached the database, and a shutdown lost
        # what only its counts held.
        self._active = self._new_batch(unfiled_if_need_be=True)
        if sealed.fd is not None:
            os.close(sealed.fd)
            sealed.fd = None
        self._pending.append(sealed)
        return True

    def _new_batch(self, *, unfiled_if_need_be: bool = False) -> _Batch:
        """The next batch, with its journal file; OSError when none can be made, unless `unfiled_if_need_be`: then
        without one (a full disk, the directory gone), its records kept in its counts as those the journal cannot
        take are (`_unfiled` says why), and the next batch tries for a file again."""
        number, self._next_number = self._next_number, self._next_number + 1
        batch_id = BatchId(self._journal_id, number)
        if self._journal is None:
            return _Batch(batch_id, None, None, {})
        # While the database is down, the counts are left to the file.
        buckets: Buckets | None = {} if self._unavailable is None else None
        try:
            path, fd = self._journal.create_batch(number)
        except OSError as exc:
            if not unfiled_if_need_be:
                raise
            self._unfiled = f"no new journal file can be made ({exc.strerror})"
            return _Batch(batch_id, None, None, buckets)
        self._unfiled = None
        return _Batch(batch_id, path, fd, buckets)

    async def _write(self, batch: _Batch) -> None:
        buckets = batch.buckets
        if buckets is None:
            assert batch.path is not None  # only a journaled batch lets go of its counts
            try:
                buckets = (await asyncio.to_thread(read_batch, batch.path))[0]
            except FileNotFoundError:
                # Removed by hand: written as empty, so that the batches after it are not held up for ever.
                _log.error(
                    "usage ledger: the journal file %s is gone; its %d records are lost", batch.path, batch.records
                )
                buckets = batch.buckets = {}
                batch.lost = True
        try:
            if not await self._store.apply(batch.id, buckets):
                _log.info("usage ledger: batch %d of %s was written before; skipped", batch.id.number, batch.id.journal)
        except LedgerUnavailableError as error:
            self.write_failures += 1
            self._became_unavailable(error)
            raise
        if batch.path is not None:
            self._delete_written(batch.path)
        with self._lock:
            self._pending.popleft()
            if batch.orphan is None:
                self._bytes -= batch.size
            self._unwritten -= batch.records
            self._unjournaled -= batch.unjournaled
            if self._dropping and self._bytes < self._max_bytes:
                self._dropping = False
                _log.warning("usage ledger: the journal has room again; %d records dropped", self.dropped_records)
            drained = batch.orphan is not None and all(pending.orphan is not batch.orphan for pending in self._pending)
        if drained and batch.orphan is not None:
            batch.orphan.release(drained=True)
            self._orphans.remove(batch.orphan)
        self._became_available()

    def _delete_written(self, path: Path) -> None:
        """Deletes the file of a batch the database has. One that cannot be (a directory made read-only) is left
        behind, and the batches after it go on: its batch is known written, skipped by whoever reads it again
        (GetUsage, the process that claims this journal), where keeping it waiting held every later record up."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            if not self._undeletable:
                self._undeletable = True
                _log.error(
                    "usage ledger: the journal file %s, written to the database, cannot be deleted (%s); left"
                    " behind, as every written batch's file is until one can be",
                    path,
                    exc.strerror,
                )
        else:
            self._undeletable = False

    def _became_unavailable(self, error: LedgerUnavailableError) -> None:
        if self._unavailable is None:
            if self._journal is None:
                where = "kept in memory"
            elif self._unjournaling:  # full, or its writes fail: with the database down too, records are dropped
                where = (
                    f"dropped while the journal cannot take them either ({self._unjournaled_why}), else kept in it"
                    f" ({self._journal.directory})"
                )
            else:
                where = f"kept in the journal {self._journal.directory}"
            _log.error("usage ledger unavailable: %s; records are %s until it is back", error, where)
        # Since the outage began (what Health shows, and the log when it ends), with the latest failure's words.
        since = time.time() if self._unavailable is None else self._unavailable[0]
        self._unavailable = (since, str(error))
        if self._journal is not None:
            with self._lock:  # let go of what the files hold (all of it, or the counts are the batch's alone)
                for batch in (*self._pending, self._active):
                    if not (batch.unjournaled or batch.lost):
                        batch.buckets = None

    def _became_available(self) -> None:
        if self._unavailable is not None:
            since, _ = self._unavailable
            _log.warning("usage ledger available again after %.0f s: %s", time.time() - since, self._store.description)
            with self._lock:
                self._unavailable = None
                # Its counts let go of to its file: the batch is sealed (or, without records, counts from none), so
                # that the next records are counted in memory again and one the journal cannot take is kept there,
                # not dropped as while the database was down.
                if self._active.buckets is None and not self._seal():
                    self._active.buckets = {}

    def _append(self, batch: _Batch, line: bytes) -> str | None:
        """Under the lock: the line at the end of the active batch's file; None, or why the journal could not take it
        (full, or the write failed)."""
        assert batch.fd is not None
        if self._bytes + len(line) > self._max_bytes:
            return f"the journal holds its limit of {self._max_bytes} bytes"
        try:
            written = os.write(batch.fd, line)
        except OSError as exc:
            written, reason = 0, exc.strerror
        else:
            reason = "a short write"
        if written != len(line):
            with contextlib.suppress(OSError):  # a part of a line would spoil the next one
                os.ftruncate(batch.fd, batch.size)
            return f"the journal cannot be written ({reason})"
        batch.size += written
        self._bytes += written
        if self._unjournaling:
            self._unjournaling = False
            _log.warning("usage ledger: the journal takes records again")
        return None

    def _keep_unjournaled(self, batch: _Batch, why: str) -> None:
        """Under the lock: a record the journal could not take, kept in the batch's counts (the database is up)."""
        batch.unjournaled += 1
        self._unjournaled_why = why
        self._unjournaled += 1
        if not self._unjournaling:
            self._unjournaling = True
            _log.error("usage ledger: %s; records are kept in memory until written (a crash would lose them)", why)

    def _drop(self, why: str) -> None:
        self.dropped_records += 1
        self._dropped_why = why
        if not self._dropping:
            self._dropping = True
            _log.error(
                "usage ledger: dropping usage records (counted in dropped_records): %s, and the database is down,"
                " until it is back and takes the backlog",
                why,
            )

    def _close_journal(self) -> None:
        with self._lock:
            active = self._active
            if active.fd is not None:
                os.close(active.fd)
                active.fd = None
                if not active.records and active.path is not None:
                    # Empty: one left behind (a read-only directory) is deleted by whoever claims this journal.
                    with contextlib.suppress(OSError):
                        active.path.unlink(missing_ok=True)
            drained = not self._pending and not active.records
        for orphan in self._orphans:
            orphan.release(drained=False)
        if self._journal is not None:
            self._journal.close(drained=drained)


def _shortened(model: str) -> str:
    """A model name of MAX_MODEL_CHARS characters: its start, an ellipsis, and 16 hex digits of its SHA-256."""
    digest = hashlib.sha256(model.encode(errors="surrogatepass")).hexdigest()[:16]
    return f"{model[: MAX_MODEL_CHARS - len(digest) - 1]}\u2026{digest}"


def _read_journal(directory: Path, selection: Selection, known: set[BatchId]) -> dict[BatchId, Totals]:
    """The totals the selection takes from each batch file in the directory, but those of known batches."""
    found: dict[BatchId, Totals] = {}
    try:
        files = batch_files(directory)
    except OSError as exc:
        _log.error("usage journal %s cannot be listed (%s): GetUsage waits until it can", directory, exc.strerror)
        raise UsageUnavailableError(QUERY_RETRY_S, journal=True) from None
    for batch, path in files:
        if batch in known:
            continue
        try:
            buckets, _ = read_batch(path)
        except FileNotFoundError:
            continue  # written and deleted since the listing: the database has it
        except OSError as exc:
            # Its records cannot be counted: the totals would be short of them, so none are given.
            _log.error("usage journal %s cannot be read (%s): GetUsage waits until it can", path, exc.strerror)
            raise UsageUnavailableError(QUERY_RETRY_S, journal=True) from None
        selection.add_matching(found.setdefault(batch, {}), buckets.items())
    return found


def _sorted_records(totals: Totals) -> list[UsageTotals]:
    """A query's totals as its answer has them, largest total first."""
    records = [
        UsageTotals(row_backend, row_model, row_caller, requests, prompt, completion, prompt + completion, *rest)
        for (row_backend, row_model, row_caller), (requests, prompt, completion, *rest) in totals.items()
    ]
    records.sort(key=lambda r: (-r.total_tokens, r.backend, r.model, r.caller))
    return records
