"""The process's log: text for people or one JSON object per line, written to standard error in batches.

A gateway logs a line per call; one write to standard error per line costs more than the rest of the log line
together (a system call, and a wake-up of whatever reads the pipe: about 25 us a call). So `llmrelay-server` writes
its log through a buffer that is flushed by a thread of its own a moment (`FLUSH_DELAY_S`) after the first line
of a batch, at once for warnings and errors, and at exit. A process killed with SIGKILL loses at most that moment's
lines; a crash's traceback, written by Python itself, is not delayed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_DELAY_S = 0.02
"""How long a line may wait for others to share its write: short enough to read a log live."""
BUFFER_BYTES = 1 << 16


def configure(level: str | int) -> None:
    """Log to standard error at `level`, in text, through a `BatchingStreamHandler`."""
    # Its own block-buffered stream on standard error's file: sys.stderr writes through at every line.
    stream = open(  # noqa: SIM115 (the handler owns it and closes it at exit)
        os.dup(sys.stderr.fileno()), "w", buffering=BUFFER_BYTES, encoding="utf-8", errors="backslashreplace"
    )
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # What no format of ours shows, not looked up for every record (the logging HOWTO's "Optimization"): the
    # calling frame's file and line, the thread, the process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def use_log_format(log_format: str) -> None:
    """With "json", every handler of the root logger writes JSON (one set up at INFO if there is none)."""
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose stream is flushed by a thread, `FLUSH_DELAY_S` after the first unflushed line."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._unflushed = threading.Event()
        threading.Thread(target=self._flush_after_delay, name="llmrelay-log-flush", daemon=True).start()

    def flush(self) -> None:
        """Called after each record: the thread flushes soon, with whatever else has come by then."""
        if not self._unflushed.is_set():
            self._unflushed.set()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush_now(self) -> None:
        self._unflushed.clear()
        super().flush()

    def close(self) -> None:
        self.flush_now()
        super().close()

    def _flush_after_delay(self) -> None:
        while True:
            self._unflushed.wait()
            time.sleep(FLUSH_DELAY_S)
            self.flush_now()


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
        self._seconds = _SecondCache(lambda second: time.strftime(self.default_time_format, self.converter(second)))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: time (UTC), level, logger, message; a call line's fields; an exception's text."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache(lambda second: datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": f"{self._seconds(record.created)}.{int(record.msecs):03d}+00:00",
            "level": record.levelname,
            "logger": record.name,
        }
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
        return json.dumps(entry, ensure_ascii=False, default=str)
