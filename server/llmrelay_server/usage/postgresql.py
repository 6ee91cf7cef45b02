"""The ledger in PostgreSQL, which gateways on several hosts share, through two psycopg connection pools.

The writer (batches, roll-ups, the idle check) has a pool of its own, which queries (GetUsage) cannot take: however
many queries come at once, and however long they take, a write never waits for a connection behind them (the ledger
would count the database as down). Queries take turns at their own pool's connections (`_QUERY_CONNECTIONS`); one
that waits past ANSWER_S for its turn is refused as the ledger busy, never counted as the database down.

The pools open at the first use, not at construction, and do not wait for their first connection: a gateway starts
while the database is down (its records wait in the journal). Each connection is checked as the pool hands it out,
so one that a restart of the database broke is replaced instead of failing a write; a pool that gave up
reconnecting (`_RECONNECT_S`) tries again at the next write, so the ledger recovers by itself when the database
returns.

Gateways write the same rows at once (every replica's callers in the same minute): each batch writes its rows in the
order of their keys, the same in every process, so that two batches never each hold a row the other waits for (a
deadlock, which PostgreSQL ends by failing one of them after a second). A transaction PostgreSQL ends for a deadlock
or a serialization failure nonetheless is run again at once (`_ATTEMPTS`): the database is up.

The schema is made by numbered migrations, each recorded in ``schema_version``, in one transaction that first takes
a transaction-level advisory lock: gateways starting together wait for the first one's migration and then find it
done.

The URL may carry a password (in its user part, or as ``?password=``): it never appears in a description, a log line
or an error message of this module (`without_password`, and errors are scrubbed of it).

When the pool has no connection to give, its error only says that it waited; the store's error says why instead, with
the error of the pool's last attempt to connect (the server refused the password, say). The ledger logs that once per
outage, so the pool's own warning at each attempt to connect, every second or two while it fails, is not logged.

A refused connection is known at once, and waiting out the pool's bound (`_WAIT_S`) would only put off the same answer
(a gateway started while the database is down read its budgets' spend for 10 s, its port bound, before it served): a
pool that holds no open connection refuses a use waiting for one as soon as an attempt to connect fails, and while
its last attempt failed (it retries in the background), a use at once, with that attempt's error. A pool that holds
one waits for it as usual: an attempt to grow refused (a role's connection limit, max_connections) says nothing of
the connections it has. A pool that gave up retrying (`_RECONNECT_S`) is asked again by the next use, which waits for
that attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from llmrelay_server.usage.store import (
    COUNT_COLUMNS,
    DAY_S,
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

_QUERY_CONNECTIONS: Final = 3
"""Queries (GetUsage) under way at once, each on a connection of its own; more wait for their turn. The writer has one
connection besides, of its own."""
_QUEUED_S: Final = 0.1
"""A query that waited this long for its turn, and then had no answer in time, is said to have waited."""
_ATTEMPTS: Final = 3
"""How many times a write transaction is run when PostgreSQL ends it for a deadlock or a serialization failure."""
_WAIT_S: Final = 5.0
"""How long a write, or a query whose turn came, waits for a connection before the database counts as unavailable."""
ANSWER_S: Final = 10.0
"""How long a write or a query may take in all (a query's wait for its turn included): a database that stops answering
(a frozen server, a network path that drops packets) would otherwise hold the writer, GetUsage and the shutdown for as
long as it stays so."""
ENDING_S: Final = 1.0
"""How long work cancelled at ANSWER_S is given to end before it is cancelled again, and then once more. psycopg
answers a cancellation by asking the server to cancel the query and waiting to see it end, up to 5 s each, which a
frozen server never answers; cancelled a second time, it closes the connection."""
IDLE_IN_WRITE_S: Final = 30.0
"""How long a write's transaction may wait on the gateway before PostgreSQL ends its session: a gateway cut off
mid-write (a network partition, a process frozen) left its session "idle in transaction", holding its rows' locks
for as long as the server's TCP keepalive took to notice (two hours by default), and every other gateway whose batch
held one of those rows waited on it, counting the database as down."""
_RECONNECT_S: Final = 10.0
"""How long the pool retries a lost connection in the background (with backoff) before leaving it to the next
write; short, so that the backoff never grows far past the moment the database returns."""
_MIGRATION_LOCK: Final = 0x6C6C_6D72_656C_6179
"""The advisory lock key of the ledger's migrations ("llmrelay" in ASCII)."""
_ROLL_UP_LOCK: Final = _MIGRATION_LOCK + 1
"""The advisory lock key of a roll-up: one gateway at a time rolls up, the others leave it to that one."""

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE IF NOT EXISTS usage_buckets (backend TEXT NOT NULL, model TEXT NOT NULL, caller TEXT NOT NULL,"
        " bucket_start BIGINT NOT NULL, "
        + ", ".join(f"{column} BIGINT NOT NULL" for column in COUNT_COLUMNS)
        + ", PRIMARY KEY (backend, model, caller, bucket_start))",
        "CREATE TABLE IF NOT EXISTS applied_batches (journal TEXT PRIMARY KEY, last_batch BIGINT NOT NULL)",
    ),
    # For a window's rows, and the oldest rows to roll up into their day, without reading the whole table.
    ("CREATE INDEX IF NOT EXISTS usage_buckets_by_start ON usage_buckets (bucket_start)",),
)
"""Migration n runs _MIGRATIONS[n - 1]'s statements; append, never change one that has shipped. Each must be
idempotent (IF NOT EXISTS): all run again when a table of `_TABLES` is missing."""
_TABLES: Final = tuple(TABLE_COLUMNS)
"""The tables of the latest schema. One dropped by hand while schema_version stays would fail every write for ever,
restarts included, and no message would say what to do: the migrations are run again and make it anew, empty."""

_T = TypeVar("_T")
_Connection = psycopg.AsyncConnection[TupleRow]
_log = logging.getLogger(__name__)
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its warnings: see the module's docstring

_UPSERT: Final = upsert_statement("%s")
_MARK_APPLIED: Final = mark_applied_statement("%s")
_SUMS: Final = ", ".join(f"SUM({column})::BIGINT" for column in COUNT_COLUMNS)
_OLDEST_FINER: Final = oldest_finer_statement("%(before)s")
# The rows deleted are the rows added, as they were when deleted.
_ROLL_UP: Final = (
    "WITH moved AS (DELETE FROM usage_buckets WHERE bucket_start > %(day)s AND bucket_start < %(end)s RETURNING *),"
    f" kept AS ({roll_up_statement('moved', '%(day)s', _SUMS)})"
    " SELECT count(*) FROM moved"
)


def _no_answer() -> str:
    """Why work past ANSWER_S was given up on (read as the bound passes)."""
    return f"no answer within {ANSWER_S:g} s"


def without_password(url: str) -> str:
    """The URL as it may be shown: no password in the user part or the query."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hosts}" if at else hosts
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _a_password(k)])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _passwords(url: str) -> set[str]:
    """Every spelling of the URL's password that an error message could carry."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    found = {userinfo.partition(":")[2]} if at else set()
    found |= {v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _a_password(k)}
    found |= {unquote(password) for password in found}
    return {password for password in found if password}


def _a_password(parameter: str) -> bool:
    """Whether a URL's parameter holds a password: libpq's `password`, and `sslpassword` (its client key's)."""
    return "password" in parameter.lower()


def _reporting(report: Callable[[psycopg.Error | _Connection], None]) -> type[_Connection]:
    """A connection class that reports how each attempt to connect ended: its error, or the connection."""

    class Reporting(psycopg.AsyncConnection[TupleRow]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                connection = await super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                report(exc)
                raise
            report(connection)
            return connection

    return Reporting


def _refused(error: psycopg.Error) -> psycopg.OperationalError:
    """A use refused for an attempt to connect that failed, in its words (a new exception each time: one raised again
    and again would grow its traceback with every use)."""
    return psycopg.OperationalError(str(error))


@dataclass(eq=False)
class _Pool:
    """A pool, and how its attempts to connect go (see the module's docstring)."""

    pool: AsyncConnectionPool[_Connection] = field(init=False)
    refusing: psycopg.Error | None = None
    """The error of its last attempt to connect while it retries; None once one succeeds, or once it gave up."""
    waiting: set[asyncio.Future[psycopg.Error]] = field(default_factory=set)
    """The uses waiting for one of its connections, each told the error of an attempt that fails."""
    opened: weakref.WeakSet[_Connection] = field(default_factory=weakref.WeakSet)
    """The connections it made: whether any is still open tells an unreachable database from a pool refused more."""

    def connect_ended(self, ended: psycopg.Error | _Connection) -> None:
        if not isinstance(ended, psycopg.Error):
            self.refusing = None
            self.opened.add(ended)
            return
        self.refusing = ended
        if not self._holds_one():
            for use in self.waiting:
                if not use.done():
                    use.set_result(ended)

    def _holds_one(self) -> bool:
        return any(not connection.closed for connection in self.opened)

    def gave_up(self, _: AsyncConnectionPool[_Connection]) -> None:
        self.refusing = None  # the next use asks it to connect again, and waits for that attempt

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[_Connection]:
        """One of its connections; refused (the error of an attempt to connect) as soon as one fails, or at once while
        it retries after one failed. PoolTimeout when none comes within the pool's bound (a server that does not
        answer)."""
        if self.refusing is not None and not self._holds_one():
            raise _refused(self.refusing)
        refused = asyncio.get_running_loop().create_future()
        self.waiting.add(refused)
        getting = asyncio.ensure_future(self.pool.getconn())
        try:
            await asyncio.wait((getting, refused), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getting.cancel()  # a connection the pool hands it then, it takes back (psycopg_pool's getconn)
            if getting.done() and not getting.cancelled() and getting.exception() is None:
                await self.pool.putconn(getting.result())
            raise
        finally:
            self.waiting.discard(refused)
        if not getting.done():  # an attempt to connect failed first
            getting.cancel()
            raise _refused(refused.result())
        connection = getting.result()
        try:
            yield connection
        finally:
            await self.pool.putconn(connection)


class PostgreSQLStore:
    """A `LedgerStore` in PostgreSQL (a postgresql:// or postgres:// URL; libpq's PG* variables fill in the rest)."""

    def __init__(self, url: str) -> None:
        self._description = f"PostgreSQL {without_password(url)}"
        self._passwords = _passwords(url)
        self._connect_error: psycopg.Error | None = None
        """Why a pool's last attempt to connect failed; None once one succeeds."""
        self._writes = self._new_pool(url, "llmrelay-usage-ledger", 1, 1)
        self._queries = self._new_pool(url, "llmrelay-usage-queries", 0, _QUERY_CONNECTIONS)  # kept while used
        self._turns = asyncio.Semaphore(_QUERY_CONNECTIONS)
        """A query's turn: one of its pool's connections is free for it (the pool's own wait counts as an outage)."""
        self._opened = False
        self._migrated = False
        self._preparing = asyncio.Lock()  # one opening and one migration per process

    def _new_pool(self, url: str, name: str, least: int, most: int) -> _Pool:
        pooled = _Pool()

        def connect_ended(ended: psycopg.Error | _Connection) -> None:
            self._connect_error = ended if isinstance(ended, psycopg.Error) else None
            pooled.connect_ended(ended)

        pooled.pool = AsyncConnectionPool(
            url,
            connection_class=_reporting(connect_ended),
            min_size=least,
            max_size=most,
            open=False,
            name=name,
            timeout=_WAIT_S,
            reconnect_timeout=_RECONNECT_S,
            reconnect_failed=pooled.gave_up,
            check=AsyncConnectionPool.check_connection,
            kwargs={"connect_timeout": round(_WAIT_S)},
            num_workers=most,  # a query need not wait for another's connection to be made
        )
        return pooled

    @property
    def kind(self) -> str:
        return "postgresql"

    @property
    def description(self) -> str:
        return self._description

    async def check(self) -> None:
        await self._answered(self._check())

    async def apply(self, batch: BatchId, buckets: Buckets) -> bool:
        # A write cut short by the bound may still have committed: the batch, retried, is marked applied already.
        return await self._answered(self._apply(batch, buckets))

    async def read(self, selection: Selection, journals: Collection[str]) -> Snapshot:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        waited: float | None = None  # how long the query waited for its turn; None while it waits

        async def in_turn() -> Snapshot:
            nonlocal waited
            async with self._turns:
                waited = loop.time() - asked
                return await self._read(selection, journals)

        def why() -> str:
            # Not the database down (the writer, on its own connection, tells that): the queries before this one.
            busy = f"busy with {_QUERY_CONNECTIONS} usage queries at once"
            if waited is None:
                return f"{busy}; this one waited {ANSWER_S:g} s for its turn"
            if waited >= _QUEUED_S:
                return f"{busy}; this one waited {waited:.1f} s for its turn, and had no answer within {ANSWER_S:g} s"
            return _no_answer()

        return await self._answered(in_turn(), why)

    async def roll_up(self, before: int) -> int:
        return await self._answered(self._roll_up(before))

    async def aclose(self) -> None:
        await asyncio.gather(self._writes.pool.close(), self._queries.pool.close())

    async def _check(self) -> None:
        async with self._connection(self._writes) as connection:
            await connection.execute("SELECT 1")

    async def _apply(self, batch: BatchId, buckets: Buckets) -> bool:
        # In the order of the keys, as every gateway writes them (not as the records came): see the module's docstring.
        rows = [(*key, *buckets[key]) for key in sorted(buckets)]

        async def write(connection: _Connection) -> bool:
            marked = await connection.execute(_MARK_APPLIED, (batch.journal, batch.number))
            if marked.rowcount == 0:
                return False  # committing changes nothing
            async with connection.cursor() as cursor:
                await cursor.executemany(_UPSERT, rows)
            return True

        return await self._written(write)

    async def _roll_up(self, before: int) -> int:
        return await self._written(functools.partial(_rolled_up, before=before))

    async def _written(self, write: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """What the write returns, run in a transaction on the writer's connection; again, at once, when PostgreSQL
        ended the transaction for a deadlock or a serialization failure (up to `_ATTEMPTS` in all)."""
        async with self._connection(self._writes) as connection:
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    async with connection.transaction():
                        # In the transaction alone (SET LOCAL), as a pooler sharing sessions (PgBouncer) needs.
                        await connection.execute(
                            "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                            (f"{round(IDLE_IN_WRITE_S * 1000)}ms",),
                        )
                        return await write(connection)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                    if attempt == _ATTEMPTS:
                        raise
                    _log.info("usage ledger: a write ended by PostgreSQL (%s) is run again", self._shown(str(exc)))
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _read(self, selection: Selection, journals: Collection[str]) -> Snapshot:
        query, values = totals_query(selection)
        async with self._connection(self._queries) as connection, connection.transaction():
            # One snapshot for both reads: the batches a query counts from journal files are known to be in the
            # totals, or not, as of the same moment.
            await connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = await (await connection.execute(query, values)).fetchall()
            last_batches = await (
                await connection.execute(
                    "SELECT journal, last_batch FROM applied_batches WHERE journal = ANY(%s)", (list(journals),)
                )
            ).fetchall()
        return Snapshot({(row[0], row[1], row[2]): list(row[3:]) for row in rows}, dict(last_batches))

    async def _answered(self, work: Coroutine[Any, Any, _T], why: Callable[[], str] = _no_answer) -> _T:
        """The work's result within ANSWER_S; past it, the work is cancelled (`ENDING_S`) and the database counts as
        unavailable, for the reason `why` gives as the bound passes. The work runs as a task of its own, so that its
        second cancellation is no one else's."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait((task,), timeout=ANSWER_S)
            if not done:
                reason = why()
                for _ in range(2):
                    task.cancel()
                    done, _ = await asyncio.wait((task,), timeout=ENDING_S)
                    if done:
                        break
                task.add_done_callback(_retrieved)
                raise LedgerUnavailableError(f"{self._description}: {reason}")
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_retrieved)
            raise
        return task.result()

    @asynccontextmanager
    async def _connection(self, pool: _Pool) -> AsyncIterator[_Connection]:
        """A connection from the pool, the schema migrated; every psycopg failure becomes LedgerUnavailableError."""
        try:
            if not self._opened:
                async with self._preparing:
                    if not self._opened:
                        await self._writes.pool.open(wait=False)
                        await self._queries.pool.open(wait=False)
                        self._opened = True
            # The lock only for the migration, on a connection in hand: a use waiting for its connection would
            # otherwise hold up every other use, each waiting its turn and then its own wait.
            async with pool.connection() as connection:
                if not self._migrated:
                    async with self._preparing:
                        if not self._migrated:
                            await _migrate(connection, self._description)
                            self._migrated = True
                yield connection
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable):
                self._migrated = False  # a table dropped by hand: the next use makes it anew (`_TABLES`)
            # The pool's timeout only says that it waited; why it has no connection is its last attempt's error.
            cause = self._connect_error if isinstance(exc, PoolTimeout) and self._connect_error is not None else exc
            raise LedgerUnavailableError(f"{self._description}: {self._shown(str(cause))}") from exc

    def _shown(self, message: str) -> str:
        """The message as it may be logged: without the password, on one line (libpq's may take several). A short
        password is taken out where it stands alone: out of words too, a password "p" made "port" "***ort" and
        "accepting" "acce***ting" in every message."""
        for password in self._passwords:
            if len(password) < _WHOLE_WORD_BELOW:
                message = re.sub(rf"(?<![\w-]){re.escape(password)}(?![\w-])", "***", message)
            else:
                message = message.replace(password, "***")
        return " ".join(message.split())


_WHOLE_WORD_BELOW: Final = 8
"""The length under which a password is taken out of a message only where it stands as a word of its own."""


def totals_query(selection: Selection) -> tuple[str, list[object]]:
    """The query of the totals a selection takes, and its values: a window's bounds select by the index on
    bucket_start (`Selection.sql_where` gives them as integers, as the column is)."""
    where, values = selection.sql_where("%s")
    return f"SELECT backend, model, caller, {_SUMS} FROM usage_buckets{where} GROUP BY backend, model, caller", values


async def _rolled_up(connection: _Connection, before: int) -> int:
    """In the transaction under way: the roll-up of the oldest day before `before` (`LedgerStore.roll_up`)."""
    locked = await (await connection.execute("SELECT pg_try_advisory_xact_lock(%s)", (_ROLL_UP_LOCK,))).fetchone()
    if locked is None or not locked[0]:
        return 0
    oldest = await (await connection.execute(_OLDEST_FINER, {"before": before})).fetchone()
    if oldest is None:
        return 0
    # Writes wait for the day's roll-up (a moment), and it for the writes under way: a batch writing the day's rows and
    # a roll-up deleting them could otherwise each hold a row the other waits for (a deadlock). Reads go on (SHARE ROW
    # EXCLUSIVE takes no lock a SELECT wants).
    await connection.execute("LOCK TABLE usage_buckets IN SHARE ROW EXCLUSIVE MODE")
    day = oldest[0] - oldest[0] % DAY_S
    merged = await (await connection.execute(_ROLL_UP, {"day": day, "end": day + DAY_S})).fetchone()
    return int(merged[0]) if merged is not None else 0


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Takes the outcome of work given up on, which no one awaits (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _migrate(connection: _Connection, description: str) -> None:
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        # Made only where missing: CREATE ... IF NOT EXISTS still needs the privilege to create, which a role that an
        # operator gave only reads and writes (the schema made by another) does not have.
        if not await _exists(connection, "schema_version"):
            await connection.execute(
                "CREATE TABLE schema_version"
                " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
        row = await (await connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")).fetchone()
        current = int(row[0]) if row is not None else 0
        if current > len(_MIGRATIONS):
            raise LedgerUnavailableError(
                f"the usage ledger's schema is version {current}, newer than this gateway knows"
                f" ({len(_MIGRATIONS)}): run the newer llmrelay-server"
            )
        for table in _TABLES:  # found made: by these migrations, or by another application?
            found = await connection.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                (table,),
            )
            columns = [row[0] for row in await found.fetchall()]
            if columns and (error := not_the_ledgers(table, columns, description)) is not None:
                raise error  # before any migration: nothing made in the other's table, no version recorded
        missing = [table for table in _TABLES if current > 0 and not await _exists(connection, table)]
        for version in range(1 if missing else current + 1, len(_MIGRATIONS) + 1):
            for statement in _MIGRATIONS[version - 1]:
                await connection.execute(statement)
            if version > current:
                await connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        if missing:
            _log.warning(
                "usage ledger: %s had lost its table %s (dropped?): made anew, empty; the usage it held is gone from"
                " the database, the records not yet written are written to it",
                description,
                " and ".join(missing),
            )


async def _exists(connection: _Connection, table: str) -> bool:
    found = await (await connection.execute("SELECT to_regclass(%s)", (table,))).fetchone()
    return found is not None and found[0] is not None
