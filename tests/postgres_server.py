"""A real PostgreSQL for the tests, from Debian's binaries (/usr/lib/postgresql/<version>/bin), on loopback.

`PostgresTemplate` runs initdb once (trust authentication, no fsync: a test database is thrown away); each
`PostgresServer` copies it into a temporary directory of its own and serves it on a free port of 127.0.0.1,
its Unix socket inside that directory. It can be stopped and started again on the same port and data, as a
database outage is. PostgreSQL refuses to run as root: as root, everything runs as `nobody`, which owns the
temporary directories.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from harness import free_port

INSTALL_HINT = "PostgreSQL's server binaries are not installed: apt-get install postgresql"
_SERVER_USER = "nobody"
_START_TIMEOUT_S = 30.0


def _binaries() -> Path:
    """The bin directory of the newest PostgreSQL installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda path: int(path.parent.parent.name))
    if not found:
        raise RuntimeError(INSTALL_HINT)
    return found[-1].parent


def _as_server_user(command: Sequence[str | Path]) -> list[str]:
    """The command as the user the server runs as: this one, or nobody when this one is root."""
    if os.geteuid() != 0:
        return [str(part) for part in command]
    user = pwd.getpwnam(_SERVER_USER)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *map(str, command)]


def _private_directory(prefix: str) -> Path:
    """A new temporary directory that the server's user owns (the tests, as root, can still read and remove it)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        user = pwd.getpwnam(_SERVER_USER)
        os.chown(directory, user.pw_uid, user.pw_gid)
    return directory


class PostgresTemplate:
    """An initialized data directory, never served itself: servers start from copies of it."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.directory = _private_directory("llmrelay-pg-template-")
        self.data = self.directory / "data"
        options = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        initdb = subprocess.run(
            _as_server_user([self.bin / "initdb", "-D", self.data, *options]), capture_output=True, text=True
        )
        if initdb.returncode != 0:
            self.remove()
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer:
    """One server on its own copy of the template: `start()`, `stop()` (a fast shutdown), again as often as needed."""

    def __init__(self, template: PostgresTemplate) -> None:
        self._bin = template.bin
        self.directory = _private_directory("llmrelay-pg-")
        self.data = self.directory / "data"
        subprocess.run(_as_server_user(["cp", "-a", template.data, self.data]), check=True)
        self.log = self.directory / "postgres.log"
        self.port = free_port()  # kept across restarts
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        user = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Starts the server and returns once it accepts connections."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "16MB",
        }
        options = [part for name, value in settings.items() for part in ("-c", f"{name}={value}")]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                _as_server_user([self._bin / "postgres", "-D", self.data, *options]), stdout=log, stderr=log
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited with {self._process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start in {_START_TIMEOUT_S} s:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, the server exits; `start()` serves the same data on the same port."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
