"""The process's log: text for people or one JSON object per line, written to standard error in batches.

A gateway logs a line per call; one write to standard error per line costs more than formatting it (a system call,
and a wake-up of whatever reads the pipe). So `llmrelay-server` keeps formatted lines and writes them together, by
a thread of its own, a moment (`FLUSH_DELAY_S`) after the first line of a batch; warnings and errors without that
moment; the rest at exit. A process killed with SIGKILL loses at most that moment's lines; a crash's traceback,
written by Python itself, is not delayed.

Only that thread writes: a standard error nobody reads (a log shipper stalled, its pipe full) blocks it alone, never
the event loop, so calls, health checks and SIGTERM go on. Lines then wait, up to `MAX_WAITING_BYTES`; past that they
are dropped and counted, and a warning says how many once the writes go through again. At exit the lines waiting
get `EXIT_WAIT_S` to be written. Each write holds whole lines and at most PIPE_BUF bytes (one line longer than that
alone), which the kernel writes to a pipe in one piece.

A line longer than PIPE_BUF (a call's line with its prompt, a traceback) takes several writes, between which another
process's writes to the same pipe can come. So the processes of a multi-process gateway (`workers`), which share one
standard error, each write a batch under a lock on it (`fcntl.lockf`, a lock of the process): their lines never mix
inside a line, whatever their length. A process alone takes no lock.

A worker of a multi-process gateway (`workers`) marks its lines: `[worker N]` in text, "worker": N in JSON.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

_JSON = json.JSONEncoder(ensure_ascii=False, default=str)
"""For the lines orjson refuses (text with a lone surrogate, as a file name decoded with surrogateescape can hold;
an integer past 64 bits); made once: json.dumps with any option set makes an encoder for every line."""
FLUSH_DELAY_S = 0.02
"""How long a line may wait for others to share its write: short enough to read a log live."""
MAX_WAITING_BYTES = 16 << 20
"""How much of the log may wait for a standard error that takes nothing (some seconds of a busy gateway's calls)."""
EXIT_WAIT_S = 5.0
"""How long the process's end waits for its last lines to be written, to a standard error that may take nothing."""
_SOON, _NOW = "soon", "now"
"""What wakes the writer: lines to write after FLUSH_DELAY_S, or without waiting (a warning)."""

_worker: int | None = None
"""This process's worker number, in a multi-process gateway."""
_handler: BatchingHandler | None = None
"""The process's handler, once `configure` set it up."""


def text_format(worker: int | None = None) -> str:
    where = f" [worker {worker}]" if worker is not None else ""
    return f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"


def configure(level: str | int, worker: int | None = None) -> None:
    """Log to standard error at `level`, in text, through a `BatchingHandler`."""
    global _worker, _handler
    _worker = worker
    handler = _handler = BatchingHandler(os.dup(sys.stderr.fileno()), shared=worker is not None)
    handler.setFormatter(TextFormatter(text_format(worker)))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The lines logged before a crash come before its traceback, which Python writes itself (at once).
    if not isinstance(sys.excepthook, _FlushingFirst):
        sys.excepthook = _FlushingFirst(sys.excepthook)
        threading.excepthook = _FlushingFirst(threading.excepthook)
    # What no format of ours shows, not looked up for every record (the logging HOWTO's "Optimization"): the
    # calling frame's file and line, the thread, the process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


class _FlushingFirst:
    """An exception hook that has the lines waiting written (at most EXIT_WAIT_S) before the hook it wraps writes its
    traceback."""

    def __init__(self, hook: Callable[..., Any]) -> None:
        self._hook = hook

    def __call__(self, *args: Any) -> None:
        if _handler is not None:
            _handler.flush()
        self._hook(*args)


def share_stderr() -> None:
    """For a supervisor, whose workers write to its standard error too: its lines are written as theirs are, under
    the lock on it (see BatchingHandler.shared)."""
    if _handler is not None:
        _handler.shared = True


def call_lines_writer() -> BatchingHandler | None:
    """Where a line per call can go straight (`BatchingHandler.write_call`), past `logging`'s record, filters and
    handlers: some twenty steps of Python a line, over a quarter of what the call log costs a call (`make
    bench-instructions ARGS='--paths gateway,call-log'`: 184k instructions a call over the plain gateway's, 131k
    written straight). The process's handler, when `configure` set it up, as `llmrelay-server` does, and nothing else
    gets the lines. None in any other process: a gateway started by a test or another program logs its calls through
    `logging`, where every handler gets them (pytest's caplog among them)."""
    return _handler


_GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_CALLER_GONE = "ExecuteBatchError raised in core by servicer method"
_NOT_UTF8 = "Invalid encoding on"


def quiet_grpc_caller_errors() -> None:
    """Wherever a gateway runs (its own process, or a test's), what gRPC logs as an error with a traceback for a
    caller's doing is a debug line: a caller gone, a metadata value that is not UTF-8."""
    logging.getLogger(_GRPC_CORE_LOGGER).addFilter(_caller_error)  # once: a filter already there is not added again


def _caller_error(record: logging.LogRecord) -> bool:
    """grpc.aio logs a message it could not send, because the caller left (cancelled, or its connection dropped) just
    before, as an error with a traceback, unless it has seen the cancellation first: a race of its own. It is a
    cancelled call, which the call log records as one. And it decodes each metadata value as UTF-8, logging one that
    is not with its bytes (an `authorization` value, a key, among them) before it reads it as Latin-1 and goes on: its
    value stays out of the log, which anyone who reaches the port could fill otherwise."""
    if not isinstance(record.msg, str):
        return True
    if record.msg.startswith(_CALLER_GONE):
        record.msg = f"{record.msg}: the caller left while a message was on its way"
    elif record.msg.startswith(_NOT_UTF8):
        value = record.args[0] if isinstance(record.args, tuple) and record.args else b""
        size = len(value) if isinstance(value, bytes | str) else 0
        record.msg, record.args = f"a caller sent a metadata value that is not UTF-8 ({size} bytes, not shown)", ()
    else:
        return True
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    record.exc_info = record.exc_text = None
    return logging.getLogger(_GRPC_CORE_LOGGER).isEnabledFor(logging.DEBUG)


def use_log_format(log_format: str) -> None:
    """With "json", every handler of the root logger writes JSON (one set up at INFO if there is none)."""
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter(_worker))


def _logged_from(record: logging.LogRecord) -> str:
    """Where `record` was logged, as "file:line": configure() has logging find no caller for a record (it costs every
    line), so on this rare path the stack tells, past logging's own frames and this module's."""
    if record.lineno:
        return f"{record.pathname}:{record.lineno}"
    ours = {logging.addLevelName.__code__.co_filename, __file__}
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename in ours:
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class BatchingHandler(logging.Handler):
    """Writes formatted lines to a file descriptor together, `FLUSH_DELAY_S` after the first unwritten one, by a thread
    of its own (the only one that writes to it)."""

    def __init__(self, fd: int, *, shared: bool = False, max_waiting_bytes: int = MAX_WAITING_BYTES) -> None:
        super().__init__()
        self._fd = fd
        self.shared = shared
        """Whether other processes write to the same file (a gateway's supervisor and workers): each batch is then
        written under a lock on it, held by one process at a time, so that none of theirs comes between the writes of
        a line longer than PIPE_BUF. A process alone saves the lock's two system calls a batch."""
        self._max_waiting_bytes = max_waiting_bytes
        self._waiting = threading.Lock()
        """Over the lines waiting and what counts them. Not the handler's own lock, which logging.shutdown holds while
        it has them written (flush) and the writer takes them."""
        self._lines: list[bytes] = []
        self._waiting_bytes = 0
        self._dropped = 0
        """Lines not kept since the last write, as too many waited, or not written (_unwritten)."""
        self._unwritten: str | None = None
        """Why lines counted in _dropped were not written (a full disk), where a write failed; else not kept."""
        self._waking = False
        """Whether the writer was woken for the lines waiting (they are written within FLUSH_DELAY_S)."""
        self._closed = False
        self._stalled = False
        """Whether a flush found the writer still writing after EXIT_WAIT_S: close then waits no longer for it."""
        self._last: threading.Event | None = None
        """Set by close, once the writer wrote its last lines and stopped."""
        # A queue, not a threading.Event: its get() waits in C, where an Event's wait and set go through a Condition's
        # Python, for every batch. It carries _SOON, _NOW, or an Event to set once what waited is written (flush,
        # close).
        self._wake: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        threading.Thread(target=self._write_when_woken, name="llmrelay-log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._waiting:
            self._add(line, at_once=record.levelno >= logging.WARNING)

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be formatted (its arguments do not fit its message, or the str() of one raises) is
        written as one line that says where it was logged, without its arguments (which may be what failed) but with
        its traceback, and nothing on standard error. logging's own handleError re-raises a RecursionError (an
        argument nested past Python's stack), which then failed whatever call logged the line."""
        failure = type(sys.exc_info()[1]).__name__
        message = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        said = f"a log line from {_logged_from(record)} could not be formatted ({failure}): {message}"
        told = logging.LogRecord(record.name, record.levelno, record.pathname, record.lineno, said, None, None)
        told.created, told.msecs = record.created, record.msecs
        for exc_info in (record.exc_info, None):  # its traceback too, unless that is what cannot be written
            told.exc_info, told.exc_text = exc_info, None
            try:
                line = self.format(told)
            except Exception:
                continue
            with self._waiting:
                self._add(line, at_once=True)
            return

    def write_call(self, logger: str, fields: dict[str, Any], text: object) -> None:
        """A call's line at INFO from `logger`, written as `emit` writes one: its `fields` in JSON, else `text` (its
        str() the message). See call_lines_writer."""
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter), "configure() and use_log_format() set ours"
        line = formatter.format_call(logger, fields, text, time.time())
        with self._waiting:
            self._add(line, at_once=False)

    def _add(self, line: str, *, at_once: bool) -> None:  # under self._waiting
        if self._closed:
            return
        data = f"{line}\n".encode("utf-8", "backslashreplace")
        if self._waiting_bytes + len(data) > self._max_waiting_bytes:
            self._dropped += 1
        else:
            self._lines.append(data)
            self._waiting_bytes += len(data)
        if not self._waking:
            self._waking = True
            self._wake.put(_NOW if at_once else _SOON)

    def flush(self) -> None:
        """Has the lines waiting written, and waits until they are, at most EXIT_WAIT_S (logging.shutdown calls it at
        exit, when nobody may be reading). Closed, it has nothing left to write."""
        if self._closed:
            return
        written = threading.Event()
        self._wake.put(written)
        if not written.wait(EXIT_WAIT_S):
            self._stalled = True

    def close(self) -> None:
        with self._waiting:
            closing, self._closed = not self._closed, True
        if closing:
            written = self._last = threading.Event()
            self._wake.put(written)
            # The descriptor is closed only once its writer is done with it: a write still blocked on it would
            # otherwise go on to whatever file takes its number next.
            if written.wait(0 if self._stalled else EXIT_WAIT_S):
                os.close(self._fd)
        super().close()

    def _write_when_woken(self) -> None:
        while True:
            woken = self._wake.get()
            if woken is _SOON:
                time.sleep(FLUSH_DELAY_S)
            self._write_waiting()
            if isinstance(woken, threading.Event):
                woken.set()
                if woken is self._last:
                    return

    def _write_waiting(self) -> None:
        with self._waiting:
            self._waking = False
            lines, self._lines = self._lines, []
            self._waiting_bytes = 0
            dropped, self._dropped = self._dropped, 0
            unwritten, self._unwritten = self._unwritten, None
        # What each line stands for, should its write fail: itself, and the line that says how many were dropped
        # those it counts (dropped again, it is said again with them at the next write).
        weights = [1] * len(lines)
        if dropped:  # after the lines kept before them, as they came
            lines.append(f"{self._dropped_line(dropped, unwritten)}\n".encode("utf-8", "backslashreplace"))
            weights.append(dropped)
        if not lines:
            return
        locked = self.shared and self._lock_file()
        try:
            chunk, count = b"", 0
            for line, weight in zip(lines, weights, strict=True):
                if chunk and len(chunk) + len(line) > select.PIPE_BUF:
                    self._write(chunk, count)
                    chunk, count = b"", 0
                chunk += line
                count += weight
            if chunk:
                self._write(chunk, count)
        finally:
            if locked:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _dropped_line(self, dropped: int, unwritten: str | None) -> str:
        if unwritten is not None:
            why = f"writing them to standard error failed ({unwritten})"
        else:
            why = (
                f"standard error took nothing while {self._max_waiting_bytes} bytes of lines waited (is what reads"
                " the gateway's log stalled?)"
            )
        record = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": logging.getLevelName(logging.WARNING),
                "msg": f"{dropped} log lines dropped: {why}",
            }
        )
        try:
            return self.format(record)
        except Exception:  # a formatter of someone else's that this record does not suit
            return record.getMessage()

    def _lock_file(self) -> bool:
        """Waits until this process holds the lock on the file that the gateway's processes share; whether it does."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except OSError:
            # A file that takes no lock (a file system without them, standard error closed): written from now on as by
            # a process alone, each write whole up to PIPE_BUF.
            self.shared = False
            return False
        return True

    def _write(self, data: bytes, lines: int) -> None:
        """Writes `data`, `lines` lines; those it could not write whole are counted as dropped, and said once a write
        goes through again (a disk that was full, then had room)."""
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:  # a standard error made non-blocking (by a process sharing it): waited for alike
                select.select([], [self._fd], [])
            except OSError as error:
                # A line half written counts as one dropped; standard error gone (EPIPE, EBADF): counted for nothing.
                with self._waiting:
                    self._dropped += lines
                    self._unwritten = error.strerror or type(error).__name__
                return


class _SecondCache:
    """A timestamp's text up to its second, made once a second rather than once a line."""

    __slots__ = ("_second", "_text", "_write")

    def __init__(self, write: Callable[[int], str]) -> None:
        self._write = write
        self._second, self._text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, self._write(second)
        return self._text


class TextFormatter(logging.Formatter):
    """logging.Formatter's text, with its default time format written once a second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._line = fmt
        self._seconds = _SecondCache(lambda second: time.strftime(self.default_time_format, self.converter(second)))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message is one line: what it quotes from elsewhere (an upstream's error text) could otherwise end it and
        # forge lines of the gateway's own. Its line breaks and other control characters are written escaped, as in
        # JSON. (A traceback, after the message, keeps its lines.)
        message = record.message
        if message.isprintable():  # in C: the common case costs one scan
            return super().formatMessage(record)
        return self._line % {**record.__dict__, "message": _CONTROL.sub(_escaped, message)}

    def format_call(self, logger: str, fields: dict[str, Any], text: object, created: float) -> str:
        """What format() makes of a call's line at INFO, logged at `created`, its message str(text)."""
        asctime = f"{self._seconds(created)},{_milliseconds(created):03d}"
        return self._line % {"asctime": asctime, "levelname": "INFO", "name": logger, "message": str(text)}


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: time (UTC), level, logger, message; a call line's fields; an exception's text."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker
        self._seconds = _SecondCache(lambda second: datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(record.created, int(record.msecs), record.levelname, record.name)
        call = getattr(record, "call", None)
        if isinstance(call, dict):
            entry["msg"] = "call"
            entry.update(call)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _json(entry)

    def format_call(self, logger: str, fields: dict[str, Any], text: object, created: float) -> str:
        """What format() makes of a call's line at INFO with these `fields`, logged at `created`."""
        entry = self._entry(created, _milliseconds(created), "INFO", logger)
        entry["msg"] = "call"
        entry.update(fields)
        return _json(entry)

    def _entry(self, created: float, milliseconds: int, level: str, logger: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "ts": f"{self._seconds(created)}.{milliseconds:03d}+00:00",
            "level": level,
            "logger": logger,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        return entry


def _json(entry: dict[str, Any]) -> str:
    # orjson: a line per call, in about a tenth of the standard library's time (`make bench-instructions`).
    try:
        line = orjson.dumps(entry, default=str).decode()
    except orjson.JSONEncodeError:
        line = _JSON.encode(entry)
    # Both escape C0 alone: DEL, C1 and Unicode's separators go out as they are, and readers that split lines by
    # Unicode's rules (Python's splitlines among them) would see a caller's model name end the line.
    if not line.isascii() or "\x7f" in line:
        line = _CONTROL.sub(_escaped, line)
    return line


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What ends a line, or moves about in one, in a terminal or a log viewer (C0, DEL, C1, and Unicode's separators)."""


def _escaped(match: re.Match[str]) -> str:
    return json.dumps(match.group())[1:-1]  # "\n", "\u001b"


def _milliseconds(created: float) -> int:
    """A time's milliseconds past its second, as a LogRecord's msecs has them."""
    return int((created - int(created)) * 1000)
