"""The process log's formatters (cached timestamps read as logging's own) and its batching handler."""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import UTC, datetime

from llmrelay_server.logs import FLUSH_DELAY_S, TEXT_FORMAT, BatchingStreamHandler, JsonFormatter, TextFormatter


def record(created: float, level: int = logging.INFO, message: str = "hello") -> logging.LogRecord:
    made = logging.LogRecord("llmrelay_server", level, __file__, 1, message, (), None)
    made.created, made.msecs = created, (created - int(created)) * 1000
    return made


def test_timestamps_read_as_loggings_own() -> None:
    text, json_ = TextFormatter(TEXT_FORMAT), JsonFormatter()
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):  # and back a second
        made = record(created)
        assert text.format(made) == logging.Formatter(TEXT_FORMAT).format(made)
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(json_.format(made))["ts"] == expected


class Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


def test_lines_wait_a_moment_warnings_none() -> None:
    stream = Stream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.handle(record(time.time(), message="first"))
    handler.handle(record(time.time(), message="second"))
    assert stream.flushed == ""  # written, not yet flushed
    deadline = time.monotonic() + 1
    while "second" not in stream.flushed and time.monotonic() < deadline:
        time.sleep(FLUSH_DELAY_S / 4)
    assert stream.flushed == "INFO first\nINFO second\n"
    handler.handle(record(time.time(), logging.WARNING, "at once"))
    assert stream.flushed.endswith("WARNING at once\n")
    handler.handle(record(time.time(), message="last"))
    handler.close()
    assert stream.flushed.endswith("INFO last\n")
