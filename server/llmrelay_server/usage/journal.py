"""The usage journal on disk: each process's records, one line each, until the database has them.

A directory holds the journals of every process that shares it (the workers of one gateway, gateways on one host).
A journal is named by its process: ``<pid>-<random>``. Its lock file ``<journal>.lock`` is locked (``flock``,
exclusive) under a temporary name and only then given its own, before any of its batch files
``<journal>.<number>.jsonl`` exists; it stays locked while the process lives, and the kernel releases the lock when
the process dies, however it dies. Whoever then takes that lock owns the journal's files, and holds the lock until
it has written them all to the database and deleted them (then the lock file too); a process that gives up before
(the database down) just releases it, for the next one. One lock per process rather than one per file: an outage
does not cost a descriptor per batch. A process whose lock file is gone (its directory deleted and made again by
another process) locks a new one before its next batch file; a lock file removed by hand from under a live process
would still let another claim the batch it is writing: don't.

Batch files are never renamed: a batch's number is in its name from its first line, so a reader listing the
directory sees each file once, under one name, and can tell from the database which batches it already counts.

A line is a JSON array: backend, model, caller, bucket_start, then the counts in `COUNT_COLUMNS` order. A line
without its newline (a process killed in the middle of a write, or a reader that came during one) is not read.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import secrets
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from llmrelay_server.config import ConfigError
from llmrelay_server.usage.store import COUNT_COLUMNS, PRIVATE_FILE_MODE, BatchId, BucketKey, Buckets, add_into

_log = logging.getLogger(__name__)

_LOCK_SUFFIX: Final = ".lock"
_BATCH_SUFFIX: Final = ".jsonl"


# bucket_start and the counts, after the names.
_NUMBERS_FORMAT: Final = b",%d" * (1 + len(COUNT_COLUMNS)) + b"]\n"


@functools.lru_cache(maxsize=4096)
def _names_prefix(backend: str, model: str, caller: str) -> bytes:
    """The start of every line of one backend, model and caller, JSON-escaped once: record() is on the request path,
    and json.dumps of the whole line would take most of its time."""
    return json.dumps([backend, model, caller], separators=(",", ":"))[:-1].encode()


def encode(key: BucketKey, counts: tuple[int, ...]) -> bytes:
    """One record as its journal line."""
    backend, model, caller, bucket_start = key
    return _names_prefix(backend, model, caller) + _NUMBERS_FORMAT % (bucket_start, *counts)


_MAX_COUNT: Final = 2**63


def read_batch(path: Path) -> tuple[Buckets, int]:
    """A batch file's complete lines, added up per bucket, and how many records they are. A line that is not a
    record is logged and left out (the file was damaged; the rest still counts)."""
    buckets: Buckets = {}
    records = damaged = 0
    with path.open("rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break  # being written, or cut by a crash
            if (parsed := _parse(line)) is None:
                damaged += 1
                continue
            add_into(buckets, *parsed)
            records += 1
    if damaged:
        _log.error("usage journal %s: %d damaged lines left out", path, damaged)
    return buckets, records


def _parse(line: bytes) -> tuple[BucketKey, list[int]] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not (
        isinstance(row, list)
        and len(row) == 4 + len(COUNT_COLUMNS)
        and all(isinstance(name, str) for name in row[:3])
        # Damage that leaves a number (a bit flipped, a line written by hand) is caught too: the database takes
        # counts of 0 to 2^63 - 1, and one it refuses would stop every write after it.
        and all(type(number) is int and 0 <= number < _MAX_COUNT for number in row[3:])
    ):
        return None
    return (row[0], row[1], row[2], row[3]), row[4:]


def _count_records(path: Path) -> tuple[int, int]:
    """How many complete lines a batch file holds (without parsing them), and its size."""
    records = size = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            records += chunk.count(b"\n")
            size += len(chunk)
    return records, size


def batch_files(directory: Path) -> list[tuple[BatchId, Path]]:
    """Every batch file in the directory, by journal and then number."""
    found = [(batch, directory / name) for name in os.listdir(directory) if (batch := _batch_of(name)) is not None]
    found.sort(key=lambda item: (item[0].journal, item[0].number))
    return found


def _batch_of(name: str) -> BatchId | None:
    if not name.endswith(_BATCH_SUFFIX):
        return None
    journal, _, number = name.removesuffix(_BATCH_SUFFIX).rpartition(".")
    return BatchId(journal, int(number)) if journal and number.isdigit() else None


LEDGER_STAMP: Final = "ledger"
"""In a journal directory: which database its records go to, for a gateway on another to refuse it."""


def _stamp(directory: Path, ledger: str) -> None:
    """Marks the directory as the journal of `ledger`, or refuses it as another's: every process on a directory
    writes the records it finds there (those of a process that died) to its own database, so gateways on two
    databases sharing one would bill each other's callers in their ledgers."""
    stamp = directory / LEDGER_STAMP
    making = directory / f".{LEDGER_STAMP}.{secrets.token_hex(8)}"
    written = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.write(written, ledger.encode())
    finally:
        os.close(written)
    try:
        os.link(making, stamp)  # whole, and only if no process stamped it first
    except FileExistsError:
        pass
    finally:
        making.unlink()
    other = stamp.read_text(encoding="utf-8")
    if other != ledger:
        raise ConfigError(
            f"usage journal {directory} is the journal of another ledger ({other}), not of this one ({ledger}): give"
            f" each ledger a journal directory of its own (server.usage_journal_dir); if it is this ledger's, moved,"
            f" delete {stamp}"
        )


def _delete_lock_file(path: Path) -> None:
    """The lock file of a drained journal, deleted where it can be: one left behind (a directory made read-only) is
    claimed by the next process that looks, found without batches, and deleted then."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        _log.warning("usage journal: cannot delete %s (%s); left behind", path, exc.strerror)


@dataclass(eq=False)
class Orphan:
    """The journal of a process that died, claimed: its lock is held here until its batches are in the database."""

    journal: str
    lock_path: Path
    lock_fd: int
    batches: list[tuple[BatchId, Path, int, int]] = field(default_factory=list)
    """(batch, file, records, bytes) of each batch file with records, oldest first."""

    def release(self, *, drained: bool) -> None:
        """Lets go of the journal; drained, its batches are all written and deleted, so its lock file goes too."""
        if drained:
            _delete_lock_file(self.lock_path)
        os.close(self.lock_fd)


class Journal:
    """This process's journal in a directory that other processes may share."""

    def __init__(self, directory: Path, ledger: str | None = None) -> None:
        """`ledger`: which database the journal's records go to (a SQLite file's path), when it is known; the directory
        is refused when it is another's."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        if ledger is not None:
            _stamp(directory, ledger)
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd = self._locked()

    def _locked(self) -> int:
        """This journal's lock file, made and locked: under a name no other process looks at, then given its own, so
        that a process that finds this journal's lock file (or a batch file, made after it) finds it locked."""
        making = self.directory / f"{self.id}.locking"
        lock_fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            os.rename(making, self._lock_path(self.id))
        except OSError:
            os.close(lock_fd)
            raise
        return lock_fd

    def _hold_lock_file(self) -> None:
        """Locks the journal's lock file again when the one it holds is no longer in the directory under its name
        (the directory deleted, and made again by another process): another process would take its batch files
        for a dead one's, and write them to the database while this one still appends to them."""
        held = os.fstat(self._lock_fd)
        try:
            named = self._lock_path(self.id).stat()
        except FileNotFoundError:
            pass
        else:
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return
        lock_fd = self._locked()
        os.close(self._lock_fd)
        self._lock_fd = lock_fd
        _log.warning("usage journal %s: this process's lock file was gone; it is locked again", self.directory)

    def create_batch(self, number: int) -> tuple[Path, int]:
        """A new, empty batch file of this journal and a descriptor that appends to it."""
        self._hold_lock_file()
        path = self.directory / f"{self.id}.{number}{_BATCH_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        return path, os.open(path, flags, PRIVATE_FILE_MODE)

    def claim_orphans(self, held: Collection[str]) -> list[Orphan]:
        """The journals in the directory that no live process holds (held: those this process holds already), each
        locked and with its batch files read for their size; batch files without a record are deleted."""
        names = os.listdir(self.directory)
        journals = {name.removesuffix(_LOCK_SUFFIX) for name in names if name.endswith(_LOCK_SUFFIX)}
        journals |= {batch.journal for name in names if (batch := _batch_of(name)) is not None}
        orphans = []
        for journal in sorted(journals - {self.id, *held}):
            if (orphan := self._claim(journal)) is not None:
                orphans.append(orphan)
        return orphans

    def close(self, *, drained: bool) -> None:
        """Releases this journal; drained (no batch file left), its lock file goes too."""
        if drained:
            _delete_lock_file(self._lock_path(self.id))
        os.close(self._lock_fd)

    def _claim(self, journal: str) -> Orphan | None:
        lock_path = self._lock_path(journal)
        # O_CREAT: batch files whose lock file is gone (removed by hand) are claimed all the same.
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            _log.error("usage journal %s: cannot open %s: %s", self.directory, lock_path.name, exc.strerror)
            return None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)  # its process is alive
            return None
        orphan = Orphan(journal, lock_path, lock_fd)
        # Listed again under the lock: another process may have drained the journal since the listing above.
        for batch, path in self._files_of(journal):
            try:
                records, size = _count_records(path)
            except FileNotFoundError:
                continue
            except OSError as exc:  # left where it is: usage is not answered while it cannot be read (_read_journal)
                _log.error(
                    "usage journal %s: cannot read %s (%s); left for now", self.directory, path.name, exc.strerror
                )
                continue
            if records:
                orphan.batches.append((batch, path, records, size))
            else:
                path.unlink(missing_ok=True)
        return orphan

    def _files_of(self, journal: str) -> Iterator[tuple[BatchId, Path]]:
        return ((batch, path) for batch, path in batch_files(self.directory) if batch.journal == journal)

    def _lock_path(self, journal: str) -> Path:
        return self.directory / f"{journal}{_LOCK_SUFFIX}"
