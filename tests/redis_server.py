"""A real redis-server for the tests: on a free loopback port, in a folder of its own, nothing persisted.

It can be stopped (killed, as a crash or a lost host looks to its clients) and started again on the same port, so
tests take Redis away under load and bring it back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis.asyncio
from harness import free_port
from redis.exceptions import RedisError

READY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerTLS:
    """The PEM files of a Redis that serves TLS only."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class RedisServerMissingError(RuntimeError):
    """No redis-server binary: the tests that need one cannot run."""


def redis_server_binary() -> Path:
    """$LLMRELAY_REDIS_SERVER, else redis-server on the PATH."""
    named = os.environ.get("LLMRELAY_REDIS_SERVER") or shutil.which("redis-server")
    if named is None or not os.access(named, os.X_OK):
        raise RedisServerMissingError(
            "these tests need a real redis-server and none is installed: `apt-get install redis-server` (Debian,"
            " Ubuntu), `brew install redis`, or point LLMRELAY_REDIS_SERVER at one"
        )
    return Path(named)


class RedisServer:
    """`async with RedisServer(folder) as server:` runs one; `server.url` reaches it (with its password, if any)."""

    def __init__(self, folder: Path, password: str | None = None, tls: ServerTLS | None = None) -> None:
        self.folder = folder
        self.password = password
        self.tls = tls
        self.port = free_port()  # free now; bound a moment later (a collision stops the start, loudly)
        self._binary = redis_server_binary()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        credentials = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is not None:  # TLS only, the server verified against the test's CA (redis-py's URL options)
            return f"rediss://{credentials}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca_file))}"
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    async def start(self) -> RedisServer:
        """Starts it on its port and returns once it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls.cert_file), "--tls-key-file", str(self.tls.key_file)]
            args += ["--tls-ca-cert-file", str(self.tls.ca_file)]
        args += ["--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self._process = await asyncio.create_subprocess_exec(
            self._binary, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await self._until_ready()
        return self

    async def stop(self) -> None:
        """Kills it at once, without a goodbye to its clients, and waits until it is gone."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self._process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def pause(self) -> None:
        """Freezes it (SIGSTOP): connections stay open and nothing answers, as behind a dead network path."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()

    async def _until_ready(self) -> None:
        client = redis.asyncio.from_url(self.url)
        try:
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self._log()}")
                try:
                    await client.ping()
                    return
                except (RedisError, OSError) as error:
                    if asyncio.get_running_loop().time() > deadline:
                        raise RuntimeError(f"redis-server answers no PING on {self.port}: {error}") from error
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def _log(self) -> str:
        log = self.folder / "redis.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"
