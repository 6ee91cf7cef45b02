"""The usage ledger in a real PostgreSQL (tests/postgres_server.py): exact totals, GetUsage through a gateway, an
outage under load, and a process killed with SIGKILL whose journal another one replays."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from harness import GatewayProcess, free_port
from llmrelay import v1 as pb
from llmrelay_server.domain import Cost, StoreHealth, StoreRole, TokenUsage, UsageUnavailableError
from llmrelay_server.usage import LedgerUnavailableError, UsageLedger, UsageTotals, postgresql
from llmrelay_server.usage.ledger import HURRIED_WRITE_S
from llmrelay_server.usage.postgresql import _QUERY_CONNECTIONS, ANSWER_S, ENDING_S, PostgreSQLStore, totals_query
from llmrelay_server.usage.store import BatchId, Selection
from postgres_server import PostgresServer, PostgresTemplate
from support import StubFactory, chat, in_background, start_server, two_backends, wait_until
from upstream import FakeUpstream

T0 = 1_700_000_040.0  # the start of a minute bucket
PASSWORD = "pw-never-shown-4711"  # trust authentication lets any password in; none may appear anywhere


def sql(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(query).fetchall()


def journaled_lines(directory: Path) -> int:
    lines = 0
    for batch in directory.glob("*.jsonl"):
        with contextlib.suppress(FileNotFoundError):  # written and deleted meanwhile
            lines += batch.read_bytes().count(b"\n")
    return lines


async def test_records_round_trip_with_exact_totals(database_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    ledger = UsageLedger(database_url, journal_dir=journal)
    ledger.record("openai", "gpt-4o", "alice", TokenUsage(100, 20, cost=Cost(1_000)), at=T0)
    ledger.record("openai", "gpt-4o", "alice", TokenUsage(50, 10, estimated=True, cost=Cost(7, estimated=True)), at=T0)
    ledger.record("openai", "gpt-4o", "alice", TokenUsage(1, 1, cost=Cost(3, price_unknown=True)), at=T0 + 60)
    ledger.record("ollama", "tiny", "bob", TokenUsage(7, 3), at=T0, interrupted=True)
    await ledger.flush()
    ledger.record("ollama", "tiny", "bob", TokenUsage(2, 2), at=T0 + 120)  # stays in the journal: counted too

    assert await ledger.query() == [
        UsageTotals("openai", "gpt-4o", "alice", 3, 151, 31, 182, 1, 0, 1_010, 1, 1),
        UsageTotals("ollama", "tiny", "bob", 2, 9, 5, 14, 0, 1, 0, 0, 0),
    ]
    assert [t.requests for t in await ledger.query(caller="alice", start=T0 + 60)] == [1]
    assert await ledger.query(backend="ollama", end=T0 + 120) == [
        UsageTotals("ollama", "tiny", "bob", 1, 7, 3, 10, 0, 1)
    ]
    assert ledger.health() == StoreHealth(
        StoreRole.USAGE_LEDGER,
        "postgresql",
        available=True,
        description=f"{ledger.health().description.split(';')[0]}; 1 records wait in the journal {journal}",
        pending_records=1,
    )
    await ledger.aclose()

    assert sql(database_url, "SELECT SUM(requests), SUM(prompt_tokens), SUM(cost_usd_micros) FROM usage_buckets") == [
        (5, 160, 1_010)
    ]
    assert sql(database_url, "SELECT version FROM schema_version ORDER BY version") == [(1,), (2,)]
    assert list(journal.iterdir()) == []


async def test_concurrent_records_from_threads_and_coroutines_add_up_exactly(database_url: str, tmp_path: Path) -> None:
    ledger = UsageLedger(database_url, journal_dir=tmp_path / "journal", flush_interval_s=0.01)
    await ledger.start()
    threads, coroutines, each = 6, 30, 500
    loop = asyncio.get_running_loop()

    def in_a_thread(number: int, done: asyncio.Future[None]) -> None:
        for i in range(each):
            ledger.record("b", "m", f"thread-{number % 2}", TokenUsage(number, i % 7))
        loop.call_soon_threadsafe(done.set_result, None)

    async def in_a_coroutine(number: int) -> None:
        for i in range(each):
            ledger.record("b", "m", "coroutine", TokenUsage(1, 1, estimated=i % 5 == 0))
            if i % 50 == 0:
                await asyncio.sleep(0)
                await ledger.query()  # reads amid the writes

    # Plain threads, not to_thread: the default executor also runs the ledger's own reads of the journal.
    done = [loop.create_future() for _ in range(threads)]
    for number, future in enumerate(done):
        threading.Thread(target=in_a_thread, args=(number, future)).start()
    await asyncio.gather(*done, *(in_a_coroutine(n) for n in range(coroutines)))
    live = await ledger.query()
    await ledger.aclose()
    reopened = UsageLedger(database_url, journal_dir=tmp_path / "journal")
    written = await reopened.query()
    await reopened.aclose()

    per_thread_completion = sum(i % 7 for i in range(each))
    expected = {
        "coroutine": (coroutines * each, coroutines * each, coroutines * each, coroutines * each // 5),
        "thread-0": (3 * each, (0 + 2 + 4) * each, 3 * per_thread_completion, 0),
        "thread-1": (3 * each, (1 + 3 + 5) * each, 3 * per_thread_completion, 0),
    }
    for totals in (live, written):
        assert {t.caller: (t.requests, t.prompt_tokens, t.completion_tokens, t.estimated_requests) for t in totals} == (
            expected
        )


async def test_ledgers_starting_together_make_the_schema_once(database_url: str, tmp_path: Path) -> None:
    ledgers = [UsageLedger(database_url, journal_dir=tmp_path / "journal") for _ in range(6)]
    try:
        # Six pools, six migrations trying at once: the advisory lock lets one make the schema.
        assert await asyncio.gather(*(ledger.query() for ledger in ledgers)) == [[]] * 6
    finally:
        await asyncio.gather(*(ledger.aclose() for ledger in ledgers))
    assert sql(database_url, "SELECT version FROM schema_version ORDER BY version") == [(1,), (2,)]


async def test_get_usage_through_a_gateway_on_postgresql(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    stub = await stub_for(
        two_backends(primary, local),
        env={"LLMRELAY_USAGE_DB": database_url},
        server=f'usage_journal_dir: "{tmp_path / "journal"}"',
    )
    answers = await asyncio.gather(
        *(stub.Complete(chat(f"q {i}"), timeout=10, metadata=(("x-llmrelay-caller", "pg-agent"),)) for i in range(12))
    )

    (record,) = (await stub.GetUsage(pb.GetUsageRequest(caller="pg-agent"), timeout=5)).records
    assert (record.backend, record.requests) == ("openai", 12)
    assert record.total_tokens == sum(a.usage.total_tokens for a in answers)
    # The background flush puts them in the database, where GetUsage keeps finding them.
    await wait_until(lambda: sql(database_url, "SELECT SUM(requests) FROM usage_buckets") == [(12,)])
    (again,) = (await stub.GetUsage(pb.GetUsageRequest(caller="pg-agent"), timeout=5)).records
    assert again == record


async def test_a_model_an_upstream_names_with_a_nul_is_stored_and_holds_up_no_record(
    stub_for: StubFactory, local: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL cannot store a NUL: the batch holding the name an upstream gave its model (an upstream that takes any
    name, as llama.cpp's does) would fail for ever, and every record after it wait in the journal."""
    stub = await stub_for(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n',
        env={"LLMRELAY_USAGE_DB": database_url},
        server=f'usage_journal_dir: "{tmp_path / "journal"}"',
    )
    local.inject({"served_model": "tiny\x00x"})
    await stub.Complete(chat("named oddly"), timeout=10)
    for _ in range(3):
        await stub.Complete(chat("named plainly"), timeout=10)

    await wait_until(lambda: models_written(database_url) == [("tiny", 3), ("tiny\ufffdx", 1)])


async def test_a_model_an_upstream_names_at_great_length_is_stored_cut_and_holds_up_no_record(
    stub_for: StubFactory, local: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL indexes at most 2704 bytes of a row's key (SQLite has no such bound): the batch holding a longer name
    an upstream gave its model would fail for ever, and every record after it wait in the journal."""
    stub = await stub_for(
        f'llm:\n  ollama: {{base_url: "{local.base_url}", model: tiny}}\n',
        env={"LLMRELAY_USAGE_DB": database_url},
        server=f'usage_journal_dir: "{tmp_path / "journal"}"',
    )
    name = "tiny-" + secrets.token_urlsafe(3000)  # random: no compression brings it under the bound
    local.inject({"served_model": name})
    assert (await stub.Complete(chat("named at length"), timeout=10)).model == name
    for _ in range(3):
        await stub.Complete(chat("named plainly"), timeout=10)

    kept = f"{name[:239]}\u2026{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    await wait_until(lambda: models_written(database_url) == [("tiny", 3), (kept, 1)])
    records = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert [(r.model, r.requests) for r in records] == [("tiny", 3), (kept, 1)]
    (record,) = (await stub.GetUsage(pb.GetUsageRequest(model=kept), timeout=5)).records
    assert record.requests == 1


@contextlib.asynccontextmanager
async def journaled_gateway(
    tmp_path: Path, usage_db: str, local: FakeUpstream, server: str = ""
) -> AsyncIterator[tuple[GatewayProcess, pb.LLMServiceAsyncStub, Path]]:
    """`llmrelay-server` serving, its ledger in `usage_db` and its journal under tmp_path, logging JSON, with more
    `server` fields ("limits: {...}"): the process, a stub over a channel to it, and the journal's directory. Stopped
    at the end."""
    journal = tmp_path / "journal"
    config = tmp_path / "llmrelay.yaml"
    extra = f", {server}" if server else ""
    config.write_text(
        f'server: {{usage_db: "{usage_db}", usage_journal_dir: "{journal}", drain_s: 0, log_format: json{extra}}}'
    )
    gateway = await start_server(config, local)
    try:
        await gateway.wait_serving()
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            yield gateway, pb.LLMServiceStub(channel), journal
    finally:
        await gateway.stop()


def models_written(database_url: str) -> list[tuple[object, ...]]:
    with contextlib.suppress(psycopg.errors.UndefinedTable):  # the ledger makes its table at its first write
        return sorted(sql(database_url, "SELECT model, requests FROM usage_buckets"))
    return []


async def test_usage_queries_while_the_database_is_down_warn_once_until_one_is_answered(
    postgres_template: PostgresTemplate, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dashboard polling GetUsage (and its channel's retries of each UNAVAILABLE) put a WARNING in the log at every
    query for as long as the database was down."""
    caplog.set_level(logging.DEBUG, logger="llmrelay_server.usage.ledger")
    server = PostgresServer(postgres_template)  # its own: this test stops it
    server.start()
    ledger = UsageLedger(server.url("ledger", PASSWORD), journal_dir=tmp_path / "journal", flush_interval_s=0.05)
    try:
        server.create_database("ledger")
        await ledger.start()
        server.stop()
        for _ in range(3):
            with pytest.raises(UsageUnavailableError):
                await ledger.query()
        server.start()
        await wait_until(lambda: ledger.health().available)
        assert await ledger.query() == []
    finally:
        await ledger.aclose()
        server.remove()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "usage quer" in r.getMessage()]
    assert [level for level, _ in said] == ["WARNING", "DEBUG", "DEBUG", "INFO"], said
    assert said[-1][1] == "usage ledger: answers usage queries again"


async def test_postgresql_stopped_mid_load_loses_nothing_and_memory_stays_bounded(
    postgres_template: PostgresTemplate, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PostgresServer(postgres_template)  # its own: this test stops it
    server.start()
    journal = tmp_path / "journal"
    ledger = UsageLedger(server.url("ledger", PASSWORD), journal_dir=journal, flush_interval_s=0.05)  # connects later
    try:
        server.create_database("ledger")
        await ledger.start()
        recorded = 0
        loading = True
        seen: list[StoreHealth] = []

        async def load() -> None:
            """A steady stream of records, each in a bucket of its own; the ledger's health noted as it goes."""
            nonlocal recorded
            while loading:
                for _ in range(20):
                    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0 + 60 * recorded)
                    recorded += 1
                seen.append(ledger.health())
                await asyncio.sleep(0.01)

        async with in_background(load()) as loader:
            await wait_until(lambda: recorded > 2_000)
            server.stop()
            await wait_until(lambda: not ledger.health().available)
            with pytest.raises(UsageUnavailableError) as refused:  # GetUsage's UNAVAILABLE, with RetryInfo
                await ledger.query()
            assert isinstance(refused.value.__cause__, LedgerUnavailableError)

            # Memory: a burst of records with a key each goes to the journal on disk, not to memory.
            journaled_before = journaled_lines(journal)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(30_000):
                    ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0 + 60 * recorded)
                    recorded += 1
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert grown < 512 * 1024, f"{grown} bytes of memory for 30000 records during the outage"
            assert journaled_lines(journal) >= journaled_before + 30_000
            outage = ledger.health()
            assert outage.pending_records == ledger.queue_depth() > 30_000

            # The load goes on while the database returns and the ledger writes again; then it stops and everything
            # drains (draining under a load without end would race the machine's speed).
            server.start()
            await wait_until(lambda: ledger.health().available)
            written_again = recorded
            await wait_until(lambda: recorded > written_again + 200)
            loading = False
            await loader
        await wait_until(lambda: ledger.queue_depth() == 0, timeout_s=120)
        await ledger.flush()

        assert await ledger.query() == [
            UsageTotals("b", "m", "c", recorded, 10 * recorded, 5 * recorded, 15 * recorded, 0)
        ]
        assert sql(server.url("ledger"), "SELECT SUM(requests), COUNT(*) FROM usage_buckets") == [(recorded, recorded)]
        assert journaled_lines(journal) == 0
        availability = [health.available for health in seen]
        assert availability[0] and not all(availability) and availability[-1]
    finally:
        await ledger.aclose()
        server.remove()

    assert "unavailable since" in outage.description and str(journal) in outage.description
    # Since the outage began, which each failed write (every 50 ms) did not move on.
    assert len({health.description.partition(" UTC: ")[0] for health in seen if not health.available}) == 1
    shown = [caplog.text, str(refused.value), *(health.description for health in seen), outage.description]
    assert not any(PASSWORD in text for text in shown)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "usage" in r.name]
    assert len(errors) == 1 and errors[0].startswith("usage ledger unavailable"), errors


# Records, says so, and waits to be killed; its ledger never writes (the flush interval is an hour).
_RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from llmrelay_server.domain import TokenUsage
    from llmrelay_server.usage import UsageLedger

    async def main() -> None:
        ledger = UsageLedger(sys.argv[1], journal_dir=sys.argv[2], flush_interval_s=3600)
        for i in range(int(sys.argv[3])):
            ledger.record("b", "m", f"c{i % 2}", TokenUsage(3, 1))
        print("recorded", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def killed_after_recording(database_url: str, journal: Path, records: int) -> None:
    """A process that journals `records` records for the database and is killed (SIGKILL) before it writes them."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RECORDER, database_url, str(journal), str(records), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"recorded\n"
    finally:
        child.kill()  # SIGKILL, with every record still in its journal only
        await child.wait()


async def test_a_process_killed_with_sigkill_is_replayed_by_the_next_ledger(database_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    await killed_after_recording(database_url, journal, 1001)
    everything = [
        UsageTotals("b", "m", "c0", 501, 1_503, 501, 2_004, 0),
        UsageTotals("b", "m", "c1", 500, 1_500, 500, 2_000, 0),
    ]

    ledger = UsageLedger(database_url, journal_dir=journal)
    assert await ledger.query() == everything  # the dead process's journal, read
    await ledger.start()  # claims it, writes it, deletes it
    await wait_until(lambda: journaled_lines(journal) == 0)
    assert await ledger.query() == everything
    await ledger.aclose()
    assert sql(database_url, "SELECT caller, SUM(requests) FROM usage_buckets GROUP BY caller ORDER BY caller") == [
        ("c0", 501),
        ("c1", 500),
    ]
    assert list(journal.iterdir()) == []


async def test_a_dead_processs_journal_is_claimed_and_counted_while_the_database_is_down(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journals of dead processes were claimed only while the database answered: through an outage, Health's
    pending_records left out everything they held (1,001 records here), and said the usage waiting was none."""
    monkeypatch.setattr("llmrelay_server.usage.postgresql.ANSWER_S", 1.0)
    journal = tmp_path / "journal"
    await killed_after_recording(database_url, journal, 1001)
    async with _FreezingProxy(database_url) as proxy:
        proxy.freeze()
        ledger = UsageLedger(proxy.url, journal_dir=journal)
        await ledger.start()
        try:
            await wait_until(lambda: ledger.health().pending_records == 1001)
            assert not ledger.health().available
            proxy.thaw()
            await wait_until(lambda: ledger.health().pending_records == 0)
        finally:
            await ledger.aclose()
    assert sql(database_url, "SELECT SUM(requests) FROM usage_buckets") == [(1001,)]


class _FreezingProxy:
    """A loopback TCP proxy in front of the database that can stop passing bytes on, its connections kept open: a
    frozen server, or a network path that drops packets silently."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = url

    async def __aenter__(self) -> _FreezingProxy:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.url)
        self.url = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{self._target[1]}", f":{port}")))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
            sink.close()

        for task in (copy(client_reader, server_writer), copy(server_reader, client_writer)):
            self._tasks.add(asyncio.create_task(task))


@contextlib.asynccontextmanager
async def one_record_unwritten(database_url: str, journal: Path) -> AsyncIterator[tuple[_FreezingProxy, UsageLedger]]:
    """A ledger in front of a database that has stopped answering (`_FreezingProxy`), one record written before it
    did and one since, waiting in the journal."""
    async with _FreezingProxy(database_url) as proxy:
        ledger = UsageLedger(proxy.url, journal_dir=journal)
        ledger.record("openai", "gpt-4o", "alice", TokenUsage(100, 20), at=T0)
        await ledger.flush()
        proxy.freeze()
        ledger.record("openai", "gpt-4o", "alice", TokenUsage(1, 1), at=T0)
        yield proxy, ledger


async def test_a_database_that_stops_answering_is_unavailable_in_bounded_time(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither a query nor the shutdown waits on it for as long as it stays silent; the records wait in the journal
    and are written, once, when it answers again."""
    monkeypatch.setattr("llmrelay_server.usage.postgresql.ANSWER_S", 1.0)
    journal = tmp_path / "journal"
    async with one_record_unwritten(database_url, journal) as (proxy, ledger):
        loop = asyncio.get_running_loop()
        asked = loop.time()
        with pytest.raises(UsageUnavailableError):
            await ledger.query()
        # The bound, and a moment for the query to end, twice (`ENDING_S`): not psycopg's own try to cancel it on the
        # server, which waits up to 10 s more for a server that cannot answer.
        assert loop.time() - asked < 1.0 + 2 * ENDING_S + 1
        closing = loop.time()
        await ledger.aclose()  # the writer's last write, so bounded; the pool's workers trying to connect (5 s)
        assert loop.time() - closing < 15
        assert journaled_lines(journal) == 1, "the record not written waits in the journal"
        proxy.thaw()
    replay = UsageLedger(database_url, journal_dir=journal)  # as the next gateway on the directory
    await replay.start()  # claims the journal the closed ledger left
    await wait_until(lambda: sql(database_url, "SELECT SUM(requests) FROM usage_buckets") == [(2,)])
    await replay.aclose()
    assert sql(database_url, "SELECT SUM(requests), SUM(prompt_tokens) FROM usage_buckets") == [(2, 101)]


async def test_a_ledger_closing_as_the_gateway_stops_now_leaves_a_silent_databases_records_in_the_journal(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second SIGTERM (stop now) waited out the last write's bound (ANSWER_S, 10 s) on a database that stopped
    answering, for a record already safe in the journal: the write gets HURRIED_WRITE_S, and the next ledger on the
    directory writes the record once."""
    journal = tmp_path / "journal"
    async with one_record_unwritten(database_url, journal) as (proxy, ledger):
        hurry = asyncio.Event()
        async with in_background(ledger.aclose(hurry)) as closing:
            await asyncio.sleep(0.2)  # its last write under way, and waiting on the database
            assert not closing.done()
            hurry.set()
            async with asyncio.timeout(ANSWER_S / 2):  # not the write's own bound
                await closing
        assert journaled_lines(journal) == 1, "the record not written waits in the journal"
        assert f"not written within {HURRIED_WRITE_S:g} s of the stop now" in caplog.text
        proxy.thaw()
    replay = UsageLedger(database_url, journal_dir=journal)
    await replay.start()
    await wait_until(lambda: sql(database_url, "SELECT SUM(requests) FROM usage_buckets") == [(2,)])
    await replay.aclose()


async def test_a_wrong_password_is_said_once_and_the_gateway_serves(
    postgres_template: PostgresTemplate, tmp_path: Path, local: FakeUpstream
) -> None:
    """One ERROR line that says why (the password refused) and names the database, never the password; the calls
    are answered and their records wait in the journal, as when the database is down."""
    server = PostgresServer(postgres_template)  # its own: this test makes it ask for a password
    server.start()
    try:
        server.create_database("ledger")
        rules = server.data / "pg_hba.conf"
        rules.write_text(f"host all writer 127.0.0.1/32 scram-sha-256\n{rules.read_text()}")  # the first rule that fits
        with psycopg.connect(server.url(), autocommit=True) as connection:
            connection.execute("CREATE ROLE writer LOGIN PASSWORD 'the-right-one'")
            connection.execute("SELECT pg_reload_conf()")
        url = f"postgresql://writer:{PASSWORD}@127.0.0.1:{server.port}/ledger"

        def refused() -> bool:
            try:
                psycopg.connect(url, connect_timeout=2).close()
            except psycopg.OperationalError as exc:
                return "password authentication failed" in str(exc)
            return False

        await wait_until(refused)  # the server has read its new rules
        async with journaled_gateway(tmp_path, url, local) as (gateway, stub, journal):
            for n in range(3):
                assert (await stub.Complete(chat(f"q {n}"), timeout=10)).backend == "ollama"
            await gateway.wait_for_line("password authentication failed", within_s=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused_usage:
                await stub.GetUsage(pb.GetUsageRequest(), timeout=30)
            assert refused_usage.value.code() == grpc.StatusCode.UNAVAILABLE
            assert journaled_lines(journal) == 3
            before_stop = [json.loads(line) for line in gateway.log if line.startswith("{")]
    finally:
        server.remove()

    said = [entry for entry in before_stop if "password authentication failed" in entry["msg"]]
    # Besides the GetUsage refused, which says why too: one line, the ledger's, for however long the pool retried.
    lines = [entry for entry in said if "cannot answer a usage query" not in entry["msg"]]
    assert len(lines) == 1, [entry["msg"] for entry in lines]
    [error] = lines
    assert error["level"] == "ERROR" and error["msg"].startswith("usage ledger unavailable: PostgreSQL postgresql://")
    assert f"writer@127.0.0.1:{server.port}/ledger" in error["msg"] and str(journal) in error["msg"]
    assert PASSWORD not in (await gateway.output())


async def test_a_gateway_started_while_the_database_refuses_connections_serves_at_once_and_says_why(
    postgres_template: PostgresTemplate, tmp_path: Path, local: FakeUpstream
) -> None:
    """Its start reads today's spend for the daily budgets from the ledger, its port bound already (workers share it:
    the kernel hands a starting one its share of new connections, whose calls wait). A database that refused at once
    held that read for 10 s (the idle check waited out the pool's bound holding the ledger's lock, then the query its
    own), which then said only "no answer within 10 s". The start says the connection was refused and serves; the
    calls' records wait in the journal."""
    server = PostgresServer(postgres_template)  # its own: this test stops it
    server.start()
    try:
        url = server.create_database("ledger")
        server.stop()  # its port closed: every connection refused at once
        loop = asyncio.get_running_loop()
        starting = loop.time()
        async with journaled_gateway(tmp_path, url, local, "limits: {budget_usd_per_day: 10}") as (
            gateway,
            stub,
            journal,
        ):
            serving_after = loop.time() - starting
            assert (await stub.Complete(chat(), timeout=10)).backend == "ollama"
            await wait_until(lambda: journaled_lines(journal) == 1)
            await gateway.wait_for_line("listening on")  # logged as the server starts, which Health may answer first
            logged = [json.loads(line) for line in gateway.log if line.startswith("{")]
    finally:
        server.remove()

    assert serving_after < ANSWER_S, f"serving after {serving_after:.1f} s"
    listening = next(n for n, entry in enumerate(logged) if entry["msg"].startswith("listening on"))
    said = [entry["msg"] for entry in logged[:listening] if entry["level"] in ("WARNING", "ERROR")]
    [unanswered] = [msg for msg in said if msg.startswith("usage ledger: cannot answer a usage query")]
    assert "Connection refused" in unanswered, unanswered
    assert any(msg.startswith("limits: today's spend cannot be read from the ledger") for msg in said), said


async def test_a_table_dropped_by_hand_is_made_anew_and_the_records_since_reach_it(
    database_url: str, tmp_path: Path, local: FakeUpstream
) -> None:
    """schema_version still says the schema is made: without a check, every write fails for ever, restarts included,
    with only PostgreSQL's "relation does not exist" to go by. The records wait in the journal meanwhile."""
    async with journaled_gateway(tmp_path, database_url, local) as (gateway, stub, journal):
        for n in range(3):
            await stub.Complete(chat(f"before {n}"), timeout=10)
        await wait_until(lambda: models_written(database_url) == [("tiny", 3)])
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute("DROP TABLE usage_buckets")
        for n in range(4):
            await stub.Complete(chat(f"after {n}"), timeout=10)
        await wait_until(lambda: models_written(database_url) == [("tiny", 4)])
        assert [r.requests for r in (await stub.GetUsage(pb.GetUsageRequest(), timeout=10)).records] == [4]
        (store,) = (await stub.Health(pb.HealthRequest(), timeout=5)).stores
        assert store.available
        await gateway.wait_for_line("made anew", within_s=10)
    assert journaled_lines(journal) == 0
    said = [json.loads(line) for line in gateway.log if line.startswith("{") and "usage_buckets" in line]
    assert any(entry["level"] == "WARNING" and "lost its table usage_buckets" in entry["msg"] for entry in said), said


async def test_a_table_of_the_ledgers_name_and_another_shape_is_refused_and_left_as_it_was(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another application's, in a database shared with it: CREATE TABLE IF NOT EXISTS took it, the schema was
    recorded as made and the ledger healthy, and every write failed for ever on PostgreSQL's words about a column."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE usage_buckets (backend TEXT, model TEXT, caller TEXT, bucket_start BIGINT)")
    ledger = UsageLedger(database_url, journal_dir=tmp_path / "journal", flush_interval_s=0.05)
    try:
        await ledger.start()
        ledger.record("b", "m", "c", TokenUsage(1, 1), at=T0)
        with pytest.raises(UsageUnavailableError):
            await ledger.query()
        await wait_until(lambda: not ledger.health().available)  # its write failed too
    finally:
        await ledger.aclose()
    said = "its table usage_buckets is not the usage ledger's (it lacks the ledger's columns completion_tokens,"
    assert said in caplog.text and "give the ledger a database (or schema) of its own" in caplog.text, caplog.text
    assert sql(database_url, "SELECT to_regclass('schema_version'), to_regclass('usage_buckets_by_start')") == [
        (None, None)
    ]
    assert journaled_lines(tmp_path / "journal") == 1  # kept for the ledger's own database


async def test_a_password_given_as_any_parameter_never_shows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """libpq's `sslpassword` (its client key's passphrase) is a password as much as `password` is: the ledger's
    health (which Health answers without a key) and its log leave both out."""
    closed = free_port()  # nothing listens: the ledger is unavailable, and says where it could not go
    url = f"postgresql://u@127.0.0.1:{closed}/ledger?sslpassword={PASSWORD}&password={PASSWORD}x&connect_timeout=1"
    ledger = UsageLedger(url, journal_dir=tmp_path / "journal", flush_interval_s=0.05)
    try:
        await ledger.start()
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
        await wait_until(lambda: not ledger.health().available)
        description = ledger.health().description
    finally:
        await ledger.aclose()
    assert f"postgresql://u@127.0.0.1:{closed}/ledger?connect_timeout=1" in description, description
    assert PASSWORD not in description and PASSWORD not in caplog.text


async def test_a_short_password_is_left_out_only_where_it_stands_alone(tmp_path: Path) -> None:
    """Taken out of every word, a password "p" made libpq's "port 5432 failed ... accepting" "***ort 5432 failed ...
    acce***ting" in the log and Health."""
    closed = free_port()
    url = f"postgresql://u:p@127.0.0.1:{closed}/ledger?connect_timeout=1"
    ledger = UsageLedger(url, journal_dir=tmp_path / "journal", flush_interval_s=0.05)
    try:
        await ledger.start()
        ledger.record("b", "m", "c", TokenUsage(10, 5), at=T0)
        await wait_until(lambda: not ledger.health().available)
        description = ledger.health().description
    finally:
        await ledger.aclose()
    assert f"port {closed} failed" in description and "***" not in description, description


def with_options(url: str, *settings: str) -> str:
    """The URL with server settings for its sessions (libpq's `options`; the tests' role is a superuser)."""
    return f"{url}?options=" + "%20".join(f"-c%20{setting}" for setting in settings)


async def test_replicas_writing_the_same_rows_at_once_never_deadlock(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas' batches hold the same rows (their callers' minute): written in the order records came, two batches
    could each lock a row the other waits for, and PostgreSQL failed one of them as a deadlock, which the ledger took
    for an outage (an ERROR, Health unavailable) after a second's stall. Written in the order of their keys, none
    waits on the other in a cycle: no deadlock at all (none run again), and every count lands."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.usage.postgresql")
    url = with_options(database_url, "deadlock_timeout%3D20ms")  # a deadlock is found (and fails) at once
    stores = [PostgreSQLStore(url), PostgreSQLStore(url)]
    keys = [("ollama", "tiny", f"agent-{i:03}", int(T0)) for i in range(100)]
    shuffled = random.Random(4711)
    rounds = 30
    try:
        for number in range(1, rounds + 1):
            orders = [keys[::-1], shuffled.sample(keys, len(keys))] if number % 2 else [keys, keys[::-1]]
            written = await asyncio.gather(
                *(
                    store.apply(BatchId(f"replica-{n}", number), {key: [1, 2, 1, 0, 0, 3, 0, 0] for key in order})
                    for n, (store, order) in enumerate(zip(stores, orders, strict=True))
                )
            )
            assert written == [True, True]
    finally:
        await asyncio.gather(*(store.aclose() for store in stores))
    assert sql(
        database_url, "SELECT COUNT(*), MIN(requests), MAX(requests), SUM(cost_usd_micros) FROM usage_buckets"
    ) == [(100, 2 * rounds, 2 * rounds, 100 * 2 * rounds * 3)]
    assert not [r.getMessage() for r in caplog.records if "run again" in r.getMessage()]


async def test_a_write_cut_off_mid_transaction_releases_its_rows_in_bounded_time(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway cut off mid-write (a network partition, a frozen process) left its session idle in transaction,
    holding its rows' locks until the server's TCP keepalive noticed (two hours): every other gateway writing one of
    those rows waited on it, counting the database as down, its records held up behind the batch."""
    monkeypatch.setattr(postgresql, "IDLE_IN_WRITE_S", 1.0)
    store = PostgreSQLStore(database_url)
    row = ("b", "m", "c", int(T0))
    try:
        assert await store.apply(BatchId("j", 1), {row: [1] * 8})

        async def cut_off(connection: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
            await connection.execute("UPDATE usage_buckets SET requests = requests + 100")  # its rows locked
            await asyncio.sleep(5)  # the gateway gone quiet, its transaction open
            await connection.execute("SELECT 1")

        writing = asyncio.ensure_future(store._written(cut_off))
        await asyncio.sleep(0.3)
        other = PostgreSQLStore(database_url)
        try:
            async with asyncio.timeout(4):  # not the 5 s of the silence, nor hours
                assert await other.apply(BatchId("k", 1), {row: [1] * 8})
        finally:
            await other.aclose()
        with pytest.raises(LedgerUnavailableError, match="idle-in-transaction timeout"):
            await writing
        assert await store.apply(BatchId("j", 2), {row: [1] * 8})  # its session made anew
    finally:
        await store.aclose()
    assert sql(database_url, "SELECT requests FROM usage_buckets") == [(3,)]


async def test_a_write_postgresql_ends_for_a_serialization_failure_is_run_again(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ended by PostgreSQL for a deadlock or a serialization failure, a write is run again at once: the database is
    up, and counting it as down said so in an ERROR and in Health, and held the batch up. (Serializable transactions
    here, for a failure that comes when the test says: a row the write waits for, changed by a transaction that
    commits.)"""
    caplog.set_level(logging.INFO, logger="llmrelay_server.usage.postgresql")
    store = PostgreSQLStore(with_options(database_url, "default_transaction_isolation%3Dserializable"))
    first, second = ("b", "m", "first", int(T0)), ("b", "m", "second", int(T0))
    try:
        assert await store.apply(BatchId("j", 1), {first: [1] * 8, second: [1] * 8})
        async with await psycopg.AsyncConnection.connect(database_url) as other:
            await other.execute("UPDATE usage_buckets SET requests = requests + 10 WHERE caller = 'first'")
            writing = asyncio.ensure_future(store.apply(BatchId("j", 2), {second: [1] * 8, first: [1] * 8}))
            waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            await wait_until(lambda: writing.done() or sql(database_url, waiting) == [(1,)])
            await other.commit()  # the row the write waits for has changed since its snapshot: it cannot go on
        assert await writing
    finally:
        await store.aclose()
    assert sql(database_url, "SELECT caller, requests, prompt_tokens FROM usage_buckets ORDER BY caller") == [
        ("first", 12, 2),
        ("second", 2, 2),
    ]
    assert sql(database_url, "SELECT last_batch FROM applied_batches") == [(2,)]
    assert any("could not serialize" in r.getMessage() and "run again" in r.getMessage() for r in caplog.records)


async def test_usage_queries_at_once_leave_the_writer_a_connection(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dashboard's GetUsage calls at once took every connection of the ledger's one pool: its writer waited for one
    past the pool's bound and took the database for down (an ERROR, Health unavailable, the records held up) while
    PostgreSQL answered all along. The writer's connection is its own; the queries take turns at theirs, and all are
    answered."""
    monkeypatch.setattr("llmrelay_server.usage.postgresql._WAIT_S", 0.3)  # the pools' bound, scaled down as the queries

    def slow(selection: Selection) -> tuple[str, list[object]]:  # each query takes the database 0.2 s
        query, values = totals_query(selection)
        return f"SELECT totals.* FROM ({query}) AS totals, pg_sleep(0.2)", values

    monkeypatch.setattr("llmrelay_server.usage.postgresql.totals_query", slow)
    ledger = UsageLedger(database_url, journal_dir=tmp_path / "journal", flush_interval_s=0.02)
    await ledger.start()
    recorded, answered, seen = 0, 0, []
    try:
        ledger.record("b", "m", "c", TokenUsage(1, 1), at=T0)
        recorded += 1
        await ledger.flush()

        async def reader() -> None:
            nonlocal answered
            for _ in range(2):
                assert (await ledger.query(caller="c"))[0].requests >= 1
                answered += 1

        async def writer() -> None:
            nonlocal recorded
            while answered < 15 * 2:
                ledger.record("b", "m", "c", TokenUsage(1, 1), at=T0 + 60 * (recorded % 50))
                recorded += 1
                seen.append(ledger.health())
                await asyncio.sleep(0.01)

        await asyncio.gather(writer(), *(reader() for _ in range(15)))
        await ledger.flush()
        written = sql(database_url, "SELECT SUM(requests) FROM usage_buckets")
    finally:
        await ledger.aclose()
    assert written == [(recorded,)]
    assert all(health.available for health in seen)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "usage" in r.name]


async def test_a_query_that_waits_too_long_for_its_turn_is_refused_as_busy_not_as_an_outage(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries past the ledger's query connections wait their turn, within the bound of a query; one still waiting at
    the bound is refused (GetUsage's UNAVAILABLE, with RetryInfo) saying that the ledger is busy, not that the
    database does not answer; the writer, on its own connection, goes on meanwhile."""
    monkeypatch.setattr("llmrelay_server.usage.postgresql.ANSWER_S", 0.5)

    def stuck(selection: Selection) -> tuple[str, list[object]]:  # the database takes longer than the bound
        query, values = totals_query(selection)
        return f"SELECT totals.* FROM ({query}) AS totals, pg_sleep(30)", values

    monkeypatch.setattr("llmrelay_server.usage.postgresql.totals_query", stuck)
    store = PostgreSQLStore(database_url)
    try:
        await store.check()  # the schema
        *answers, written = await asyncio.gather(
            *(store.read(Selection(), ["j"]) for _ in range(_QUERY_CONNECTIONS + 2)),
            store.apply(BatchId("j", 1), {("b", "m", "c", int(T0)): [1] * 8}),
            return_exceptions=True,
        )
    finally:
        await store.aclose()
    assert written is True
    said = sorted(str(answer).partition("/test_")[2].partition(": ")[2] for answer in answers)
    assert said == [
        *["busy with 3 usage queries at once; this one waited 0.5 s for its turn"] * 2,
        *["no answer within 0.5 s"] * 3,
    ], answers
    assert all(isinstance(answer, LedgerUnavailableError) for answer in answers)


async def test_a_windowed_query_selects_by_the_index_on_bucket_start(database_url: str) -> None:
    """GetUsage's bounds come as floats (whole seconds): compared with them, PostgreSQL converted bucket_start, every
    row's, and read the whole table for a window of an hour. The bounds go as integers, and the index serves."""
    store = PostgreSQLStore(database_url)
    try:
        await store.check()  # the schema
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO usage_buckets SELECT 'b', 'm', 'c' || k, m, 1, 10, 5, 0, 0, 0, 0, 0"
                f" FROM generate_series(1, 20) k, generate_series({int(T0)}, {int(T0) + 86_400 - 60}, 60) m"
            )
            connection.execute("ANALYZE usage_buckets")
            window = Selection(start=T0 + 3_600.0, end=T0 + 7_200.0)  # as GetUsage gives it
            query, values = totals_query(window)
            plan = "\n".join(str(row[0]) for row in connection.execute(f"EXPLAIN {query}", values).fetchall())
        assert "usage_buckets_by_start" in plan and "::double precision" not in plan, plan
        assert {key: counts[0] for key, counts in (await store.read(window, [])).totals.items()} == {
            ("b", "m", f"c{k}"): 60 for k in range(1, 21)
        }
        # A bound between two whole seconds selects what the next whole second does, as before.
        assert (await store.read(Selection(start=T0 + 3_599.5, end=T0 + 3_660.5), [])).totals == {
            ("b", "m", f"c{k}"): [2, 20, 10, 0, 0, 0, 0, 0] for k in range(1, 21)
        }
    finally:
        await store.aclose()


async def test_a_pool_refused_more_connections_serves_with_those_it_has(database_url: str) -> None:
    """A role at its connection limit (or max_connections, a pooler's bound): the query pool's attempt to grow is
    refused. That says nothing of the connection it holds: uses go on with it, rather than each being refused at once
    until an attempt to connect succeeds."""
    role = f"limited_{secrets.token_hex(4)}"
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
        connection.execute(f"CREATE DATABASE {role} OWNER {role}")
    address = urlsplit(database_url)
    store = PostgreSQLStore(
        urlunsplit(address._replace(netloc=f"{role}@{address.hostname}:{address.port}", path=f"/{role}"))
    )
    try:
        await store.check()  # the writer's connection: 1 of 2
        assert await store.read(Selection(), ()) is not None  # the query pool's: 2 of 2, idle once read
        await asyncio.gather(*(store.read(Selection(), ()) for _ in range(3)))  # the pool grows, and is refused
        for _ in range(3):  # one at a time, on the connection the pool holds
            assert await store.read(Selection(), ()) is not None
    finally:
        await store.aclose()
