"""The process's log: text for people or one JSON object per line, written to standard error in batches.

A gateway logs a line per call; one write to standard error per line costs more than formatting it (a system call,
and a wake-up of whatever reads the pipe). So `llmrelay-server` keeps formatted lines and writes them together, by
a thread of its own, a moment (`FLUSH_DELAY_S`) after the first line of a batch; warnings and errors at once; the
rest at exit. A process killed with SIGKILL loses at most that moment's lines; a crash's traceback, written by
Python itself, is not delayed. Each write holds whole lines and at most PIPE_BUF bytes (one line longer than that
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
    # What no format of ours shows, not looked up for every record (the logging HOWTO's "Optimization"): the
    # calling frame's file and line, the thread, the process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


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


def quiet_callers_gone() -> None:
    """Wherever a gateway runs (its own process, or a test's), gRPC's error for a caller gone is a debug line."""
    logging.getLogger(_GRPC_CORE_LOGGER).addFilter(_caller_gone)  # once: a filter already there is not added again


def _caller_gone(record: logging.LogRecord) -> bool:
    """grpc.aio logs a message it could not send, because the caller left (cancelled, or its connection dropped) just
    before, as an error with a traceback, unless it has seen the cancellation first: a race of its own. It is a
    cancelled call, which the call log records as one: here a debug line, without the traceback."""
    if not isinstance(record.msg, str) or not record.msg.startswith(_CALLER_GONE):
        return True
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    record.exc_info = record.exc_text = None
    record.msg = f"{record.msg}: the caller left while a message was on its way"
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


class BatchingHandler(logging.Handler):
    """Writes formatted lines to a file descriptor together, `FLUSH_DELAY_S` after the first unwritten one."""

    def __init__(self, fd: int, *, shared: bool = False) -> None:
        super().__init__()
        self._fd = fd
        self.shared = shared
        """Whether other processes write to the same file (a gateway's supervisor and workers): each batch is then
        written under a lock on it, held by one process at a time, so that none of theirs comes between the writes of
        a line longer than PIPE_BUF. A process alone saves the lock's two system calls a batch."""
        self._lines: list[bytes] = []
        self._waking = False
        """Whether the writer was woken for the lines waiting (they are written within FLUSH_DELAY_S)."""
        # A queue, not a threading.Event: its get() waits in C, where an Event's wait and set go through a Condition's
        # Python, for every batch.
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        threading.Thread(target=self._write_after_delay, name="llmrelay-log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, at_once=record.levelno >= logging.WARNING)

    def write_call(self, logger: str, fields: dict[str, Any], text: object) -> None:
        """A call's line at INFO from `logger`, written as `emit` writes one: its `fields` in JSON, else `text` (its
        str() the message). See call_lines_writer."""
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter), "configure() and use_log_format() set ours"
        line = formatter.format_call(logger, fields, text, time.time())
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            self._add(line, at_once=False)

    def _add(self, line: str, *, at_once: bool) -> None:
        self._lines.append(f"{line}\n".encode("utf-8", "backslashreplace"))
        if at_once:
            self.flush()
        elif not self._waking:
            self._waking = True
            self._wake.put(None)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            self._waking = False
            lines, self._lines = self._lines, []
            if not lines:
                return
            locked = self.shared and self._lock_file()
            try:
                chunk = b""
                for line in lines:
                    if chunk and len(chunk) + len(line) > select.PIPE_BUF:
                        self._write(chunk)
                        chunk = b""
                    chunk += line
                if chunk:
                    self._write(chunk)
            finally:
                if locked:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
        super().close()

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

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # standard error is gone: there is nowhere left to say so

    def _write_after_delay(self) -> None:
        while True:
            self._wake.get()
            time.sleep(FLUSH_DELAY_S)
            self.flush()


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
        return orjson.dumps(entry, default=str).decode()
    except orjson.JSONEncodeError:
        return _JSON.encode(entry)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What ends a line, or moves about in one, in a terminal or a log viewer (C0, DEL, C1, and Unicode's separators)."""


def _escaped(match: re.Match[str]) -> str:
    return json.dumps(match.group())[1:-1]  # "\n", "\u001b"


def _milliseconds(created: float) -> int:
    """A time's milliseconds past its second, as a LogRecord's msecs has them."""
    return int((created - int(created)) * 1000)
