"""The process log's formatters (cached timestamps read as logging's own) and its batching handler, on a real pipe."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from llmrelay_server import logs
from llmrelay_server.calllog import CallLine
from llmrelay_server.logs import FLUSH_DELAY_S, BatchingHandler, JsonFormatter, TextFormatter, text_format

CALLS = "llmrelay_server.calls"


def record(created: float, level: int = logging.INFO, message: str = "hello") -> logging.LogRecord:
    made = logging.LogRecord("llmrelay_server", level, __file__, 1, message, (), None)
    made.created, made.msecs = created, (created - int(created)) * 1000
    return made


def test_timestamps_read_as_loggings_own() -> None:
    text, json_ = TextFormatter(text_format()), JsonFormatter()
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):  # and back a second
        made = record(created)
        assert text.format(made) == logging.Formatter(text_format()).format(made)
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(json_.format(made))["ts"] == expected


def test_a_workers_lines_say_which() -> None:
    made = record(1_700_000_000.0)
    assert " INFO [worker 3] llmrelay_server: hello" in TextFormatter(text_format(3)).format(made)
    assert json.loads(JsonFormatter(3).format(made))["worker"] == 3
    assert "worker" not in json.loads(JsonFormatter().format(made))


def test_a_text_line_stays_one_line_whatever_its_message_quotes() -> None:
    """An upstream's error text, quoted in a failed call's line, could end the line and forge one of the gateway's
    own: "bad thing\n2026-12-02 03:00:00,000 ERROR llmrelay_server: FORGED"."""
    forged = "HTTP 400: bad thing\r\n2026-12-02 03:00:00,000 ERROR llmrelay_server: FORGED\u2028\x1b[2J\tend"
    line = TextFormatter(text_format()).format(record(1_700_000_000.0, level=logging.WARNING, message=forged))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.endswith("HTTP 400: bad thing\\r\\n2026-12-02 03:00:00,000 ERROR llmrelay_server: FORGED"
                         "\\u2028\\u001b[2J\\tend")  # fmt: skip
    made = record(1_700_000_000.0, message="caf\u00e9 plain")  # printable: as logging writes it
    assert TextFormatter(text_format()).format(made) == logging.Formatter(text_format()).format(made)


def test_a_json_line_holds_any_text_and_any_field() -> None:
    made = record(1_700_000_000.0, message='caf\u00e9 "quoted"\n')
    made.call = {"model": "m\u00fc", "cost_usd": 0.25, "attempts": ["a:succeeded"], "first_chunk_ms": None}
    assert json.loads(JsonFormatter().format(made))["model"] == "m\u00fc"
    # What orjson refuses, the standard library writes: a file name's undecodable byte, an integer past 64 bits.
    made = record(1_700_000_000.0, message=b"/tmp/\xff".decode("utf-8", "surrogateescape"))
    assert JsonFormatter().format(made).endswith('"msg": "/tmp/\udcff"}')
    made.call = {"tokens": 2**70, "where": object()}
    line = json.loads(JsonFormatter().format(made))
    assert line["tokens"] == 2**70
    assert line["where"].startswith("<object object")


@pytest.mark.parametrize("bad_model", ["a\u2028b", "a\u2029b", "a\x85b", "a\x9b2Jb", "a\x7fb"])
def test_a_json_line_stays_one_line_by_unicodes_rules_too(bad_model: str) -> None:
    """orjson escapes C0 alone: a caller's model name with a Unicode line separator (or NEL, or a terminal's CSI)
    went out raw, and a reader splitting lines as Python's splitlines does saw the line end in it."""
    made = record(1_700_000_000.0, message="call")
    made.call = {"model": bad_model, "attempts": ["a\u2028:succeeded"]}
    for line in (JsonFormatter().format(made), JsonFormatter().format(record(1_700_000_000.0, message=bad_model))):
        assert len(line.splitlines()) == 1 and line.isascii(), line
    assert json.loads(JsonFormatter().format(made))["model"] == bad_model


def test_a_call_lines_numbers_are_whole_to_the_micro_dollar() -> None:
    # `:g` wrote six digits: a cost of 12.345678 USD as 12.3457, a micro-dollar as 1e-06.
    fields = {"cost_usd": 12.345678, "small": 0.000001, "nothing": 0.0, "duration_ms": 1.5, "first_chunk_ms": 120.25}
    assert str(CallLine(fields)) == (
        "call cost_usd=12.345678 small=0.000001 nothing=0 duration_ms=1.5 first_chunk_ms=120.25"
    )


@pytest.mark.parametrize("worker", [None, 2])
def test_a_call_line_written_straight_reads_as_one_logged(worker: int | None) -> None:
    # llmrelay-server writes its call lines past `logging` (BatchingHandler.write_call); they must not differ.
    fields = {"request_id": "r1", "model": 'm\u00fc "x"', "attempts": ["a:succeeded"], "cost_usd": 0.5, "ms": None}
    line = CallLine(fields)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):
        made = logging.getLogger(CALLS).makeRecord(
            CALLS, logging.INFO, __file__, 1, "%s", (line,), None, extra={"call": fields}
        )
        made.created, made.msecs = created, int((created - int(created)) * 1000) + 0.0  # as LogRecord sets them
        for formatter in (TextFormatter(text_format(worker)), JsonFormatter(worker)):
            assert formatter.format_call(CALLS, fields, line, created) == formatter.format(made)


@pytest.fixture
def pipe() -> Iterator[tuple[int, BatchingHandler]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    handler = BatchingHandler(write_end)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    yield read_end, handler
    os.close(read_end)


def drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            read = os.read(fd, 1 << 16)
        except BlockingIOError:  # nothing more for now
            return data
        if not read:  # the write end is closed
            return data
        data += read


def test_lines_wait_a_moment_warnings_none(pipe: tuple[int, BatchingHandler]) -> None:
    read_end, handler = pipe
    handler.handle(record(time.time(), message="first"))
    handler.handle(record(time.time(), message="second"))
    assert drain(read_end) == b""  # kept, not yet written
    deadline, written = time.monotonic() + 1, b""
    while b"second" not in written and time.monotonic() < deadline:
        time.sleep(FLUSH_DELAY_S / 4)
        written += drain(read_end)
    assert written == b"INFO first\nINFO second\n"
    handler.handle(record(time.time(), logging.WARNING, "at once"))  # written without that moment, by the writer
    assert read_until(read_end, b"WARNING at once\n") == b"WARNING at once\n"
    handler.handle(record(time.time(), message="last"))
    handler.close()
    assert drain(read_end) == b"INFO last\n"


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text")


@pytest.mark.parametrize("argument", [[[[]]], Unprintable()], ids=["nested-past-the-stack", "str-raises"])
def test_a_line_that_cannot_be_formatted_is_told_where_it_was_logged_and_raises_in_no_caller(
    pipe: tuple[int, BatchingHandler],
    argument: object,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """logging's own handleError printed a traceback to standard error, and re-raised a RecursionError (an upstream's
    JSON nested past Python's stack, in a warning's %r), which failed the call that logged it. Logged as the server
    logs (configure(): no caller looked up for a record), and with a traceback of its own, which is kept."""
    read_end, handler = pipe
    monkeypatch.setattr(logging, "_srcfile", None)
    logger = logging.getLogger("llmrelay_server.test_unformattable")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(handler)
    if isinstance(argument, list):
        for _ in range(sys.getrecursionlimit()):
            argument = [argument]
    try:
        raise KeyError("missing")
    except KeyError:
        line = sys._getframe().f_lineno + 1
        logger.exception("counted %s tokens", argument)
    logger.warning("next")
    handler.close()
    logger.removeHandler(handler)
    written = read_until(read_end, b"WARNING next\n").decode()
    failure = "RecursionError" if isinstance(argument, list) else "ValueError"
    said, _, traceback = written.partition("\nTraceback (most recent call last):\n")
    assert said == f"ERROR a log line from {__file__}:{line} could not be formatted ({failure}): counted %s tokens"
    assert traceback.endswith("KeyError: 'missing'\nWARNING next\n"), written
    assert capsys.readouterr().err == ""


def read_until(fd: int, *ends: bytes, seconds: float = 5) -> bytes:
    """What the pipe gives until it has given each of `ends`, or `seconds` passed."""
    deadline, data = time.monotonic() + seconds, b""
    while not all(end in data for end in ends) and time.monotonic() < deadline:
        select.select([fd], [], [], 0.05)
        data += drain(fd)
    return data


def test_a_pipe_nobody_reads_blocks_no_caller_and_what_was_dropped_is_counted() -> None:
    """A stalled log reader fills the pipe: the writer thread waits on it, the callers (the event loop, in a gateway)
    go on, lines past the bound are dropped, and once the pipe is read a warning says exactly how many."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    handler = BatchingHandler(write_end, max_waiting_bytes=256 << 10)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    lines = 2_000  # 2 MB of lines of 1 kB: the pipe (64 KiB) and the bound (256 KiB) many times over
    logged = threading.Thread(
        target=lambda: [
            handler.handle(
                record(time.time(), logging.WARNING if n % 100 == 0 else logging.INFO, f"{n:05d} " + "x" * 1000)
            )
            for n in range(lines)
        ]
    )
    logged.start()
    logged.join(30)
    assert not logged.is_alive(), "a caller was blocked by the pipe nobody reads"
    kept: list[bytes] = []
    dropped, deadline = 0, time.monotonic() + 10
    unread = b""
    while len(kept) + dropped < lines and time.monotonic() < deadline:  # the pipe read at last
        *whole, unread = (unread + read_until(read_end, b"\n", seconds=0.1)).split(b"\n")
        for line in whole:
            if line.endswith(b"x" * 1000):
                kept.append(line)
            elif b"log lines dropped" in line:  # "WARNING 1234 log lines dropped: ..."
                dropped += int(line.split()[1])
    assert dropped > 0 and len(kept) + dropped == lines
    assert [int(line.split()[1]) for line in kept] == sorted(int(line.split()[1]) for line in kept)  # in order
    handler.close()
    os.close(read_end)


def test_lines_a_full_disk_refused_are_counted_and_said_once_it_takes_lines_again(tmp_path: Path) -> None:
    """A write that failed (ENOSPC: /dev/full) was taken for standard error gone: its lines were lost without a word,
    and the call log is the gateway's record of its calls."""
    full = os.open("/dev/full", os.O_WRONLY)
    handler = BatchingHandler(full)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        for n in range(400):
            handler.handle(record(time.time(), message=f"call {n}"))
        handler.flush()
        log = tmp_path / "gateway.log"
        room = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(room, full)  # the disk has room again
        os.close(room)
        for n in range(400, 402):
            handler.handle(record(time.time(), message=f"call {n}"))
        handler.flush()
    finally:
        handler.close()
    assert log.read_text().splitlines() == [
        "INFO call 400",
        "INFO call 401",
        "WARNING 400 log lines dropped: writing them to standard error failed (No space left on device)",
    ]


def test_closing_on_a_pipe_nobody_reads_gives_up_after_a_while(
    pipe: tuple[int, BatchingHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's end waits for its last lines only so long (logging.shutdown flushes and closes every handler)."""
    monkeypatch.setattr(logs, "EXIT_WAIT_S", 0.3)
    read_end, handler = pipe
    for _ in range(200):  # 200 kB: more than the pipe holds
        handler.handle(record(time.time(), message="x" * 1000))

    def shut_down() -> None:  # as logging.shutdown does
        handler.flush()
        handler.close()

    closed = threading.Thread(target=shut_down)
    closed.start()
    closed.join(10)
    assert not closed.is_alive()
    # Read at last, the pipe gets every line: the writer went on, on a descriptor that close left open for it.
    written, deadline = b"", time.monotonic() + 10
    while written.count(b"\n") < 200 and time.monotonic() < deadline:
        written += read_until(read_end, b"\n", seconds=0.1)
    assert written == (b"INFO " + b"x" * 1000 + b"\n") * 200


def test_each_write_is_whole_lines_within_pipe_buf(
    pipe: tuple[int, BatchingHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers sharing a pipe interleave only between writes: no write may end inside a line or pass PIPE_BUF."""
    read_end, handler = pipe
    lines = [f"line {n} " + "x" * (n * 37 % 700) for n in range(60)] + ["long " + "y" * (select.PIPE_BUF * 2)]
    for line in lines:
        handler.handle(record(time.time(), message=line))
    writes: list[bytes] = []
    real_write = os.write

    def recorded(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recorded)  # only to see the handler's write boundaries
    handler.flush()
    monkeypatch.undo()
    assert b"".join(writes) == b"".join(f"INFO {line}\n".encode() for line in lines)
    assert all(write.endswith(b"\n") for write in writes)
    assert all(len(write) <= select.PIPE_BUF for write in writes[:-1]) and len(writes) > 2
    assert drain(read_end).count(b"\n") == len(lines)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_what_grpc_logs_for_a_callers_undecodable_metadata_shows_no_value(
    level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.aio logs a metadata value that is not UTF-8 (a key in `authorization` with a stray byte, say) with its
    bytes, as an error with a traceback, as its grpc_string.pyx has it: a debug line without them, here."""
    logs.quiet_grpc_caller_errors()
    caplog.set_level(level, logger="grpc._cython.cygrpc")
    value = b"Bearer llmr-research-0123456789abcdefghij\xe9"
    try:
        value.decode("utf8")
    except UnicodeDecodeError:
        logging.getLogger("grpc._cython.cygrpc").exception("Invalid encoding on %s", value)
    shown = [record for record in caplog.records if record.name == "grpc._cython.cygrpc"]
    if level == logging.INFO:
        assert not shown
        return
    [line] = shown
    assert line.levelno == logging.DEBUG and line.exc_info is None
    assert line.getMessage() == f"a caller sent a metadata value that is not UTF-8 ({len(value)} bytes, not shown)"


def test_a_non_blocking_pipe_loses_no_line_uncounted() -> None:
    """A standard error made non-blocking (by a process sharing it) answers a full pipe with EAGAIN: waited for, as a
    blocking one is, not the rest of the batch dropped unsaid."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    handler = BatchingHandler(write_end, max_waiting_bytes=256 << 10)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    lines = 2_000
    for n in range(lines):
        handler.handle(record(time.time(), message=f"{n:05d} " + "x" * 1000))
    kept, dropped, unread, deadline = 0, 0, b"", time.monotonic() + 10
    while kept + dropped < lines and time.monotonic() < deadline:
        *whole, unread = (unread + read_until(read_end, b"\n", seconds=0.1)).split(b"\n")
        kept += sum(line.endswith(b"x" * 1000) for line in whole)
        dropped += sum(int(line.split()[1]) for line in whole if b"log lines dropped" in line)
    assert kept + dropped == lines and kept > 64  # more than one pipe's worth came through
    handler.close()
    os.close(read_end)


def test_the_lines_before_a_crash_come_before_its_traceback() -> None:
    """Python writes an uncaught exception's traceback at once, itself; the lines logged before it wait for the
    writer thread, unless the exception hook has them written first."""
    crash = (
        "import logging, threading\n"
        "from llmrelay_server import logs\n"
        "logs.configure('INFO')\n"
        "logging.getLogger('llmrelay_server').error('before the thread crash')\n"
        "thread = threading.Thread(target=lambda: 1 / 0)\n"
        "thread.start(); thread.join()\n"
        "logging.getLogger('llmrelay_server').warning('before the crash')\n"
        "raise SystemError('the crash')\n"
    )
    ended = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60, check=False)
    said = ended.stderr
    assert ended.returncode == 1, said
    assert said.index("before the thread crash") < said.index("ZeroDivisionError") < said.index("before the crash")
    assert said.index("before the crash") < said.index("SystemError: the crash"), said
