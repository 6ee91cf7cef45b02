"""Start real model servers on loopback for integration tests, and stop them cleanly.

    with start_llama_server(write_tiny_gguf(tmp / "tiny.gguf")) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x")

Each server runs in its own session (process group) on a port it picks itself and logs
to a file; the helpers wait a bounded time for it to come up, fail with its log when it
does not, and on exit stop it with SIGTERM, kill it after a bound, and kill anything it
left in its process group, so no test leaves a process behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .llama_server import READY_PREFIX

LLAMA_SERVER_SCRIPT: Final = Path(__file__).with_name("llama_server.py")
OLLAMA_VERSION: Final = "v0.17.4"
# The project's cache, as scripts/build_ollama.sh and install_tools.sh read it: the Ollama binary, the demo's model.
CACHE_ROOT: Final = Path(
    os.environ.get("LLMRELAY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmrelay"
)
DEFAULT_OLLAMA_BINARY: Final = CACHE_ROOT / f"ollama-{OLLAMA_VERSION}" / "ollama"

STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0
POLL_INTERVAL_S: Final = 0.05

# Whole lines only: the newline says the address was written to its end.
_LLAMA_READY: Final = re.compile(re.escape(READY_PREFIX) + r"(http://\S+)\n")
_OLLAMA_READY: Final = re.compile(r'msg="Listening on (\S+) \(version')


class ServerStartError(RuntimeError):
    """A model server did not come up; the message carries its log."""


@dataclass
class ServerHandle:
    """A running server: `base_url` is "http://127.0.0.1:PORT", without a path."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after STOP_TIMEOUT_S; then clear the process group.

        Safe to call more than once.
        """
        _stop_process_group(self.process)


@dataclass
class OllamaHandle(ServerHandle):
    """A running `ollama serve` with the model `model` ("tiny:latest") created."""

    model: str


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    # The group id is the leader's pid (start_new_session); children such as Ollama's
    # runners outlive a leader that was killed, and only this reaches them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_url(process: subprocess.Popen[bytes], log_path: Path, ready: re.Pattern[str], what: str) -> str:
    """The base URL from the server's "listening" log line, which it prints once bound."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"{what} exited with code {process.returncode} before listening:\n{_read(log_path)}")
        match = ready.search(_read(log_path))
        if match:
            address = match.group(1)
            return address if address.startswith("http://") else f"http://{address}"
        time.sleep(POLL_INTERVAL_S)
    raise ServerStartError(f"{what} did not listen within {STARTUP_TIMEOUT_S:.0f} s:\n{_read(log_path)}")


def _wait_until_healthy(handle: ServerHandle, path: str, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = ""
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServerStartError(f"{what} exited with code {handle.process.returncode}:\n{handle.log()}")
        try:
            with urllib.request.urlopen(handle.base_url + path, timeout=REQUEST_TIMEOUT_S) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            # llama.cpp answers 503 while the model loads, which urllib raises as HTTPError.
            last_error = str(error)
        time.sleep(POLL_INTERVAL_S)
    raise ServerStartError(
        f"{what} not healthy at {path} within {STARTUP_TIMEOUT_S:.0f} s ({last_error}):\n{handle.log()}"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: stop() can clear every descendant, and a Ctrl-C aimed at
            # pytest does not reach the server before the helper stops it in order.
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _stop_process_group(process)


@contextlib.contextmanager
def start_llama_server(
    model_path: Path,
    alias: str = "tiny",
    *,
    ctx_size: int = 512,
    threads: int = 2,
    parallel: int = 1,
    embedding: bool = False,
) -> Iterator[ServerHandle]:
    """Serve `model_path` with llama.cpp (via xllamacpp) on a free loopback port.

    Requests name the model `alias`. With `embedding`, /v1/embeddings answers too (mean pooling). Yields once GET
    /health answers 200.
    """
    with tempfile.TemporaryDirectory(prefix="llmrelay-llama-") as tmp:
        log_path = Path(tmp) / "llama_server.log"
        argv = [
            sys.executable,
            str(LLAMA_SERVER_SCRIPT),
            *("--model", str(model_path)),
            *("--host", "127.0.0.1", "--port", "0"),
            *("--alias", alias),
            *("--ctx-size", str(ctx_size), "--threads", str(threads), "--parallel", str(parallel)),
            *(["--embedding"] if embedding else []),
        ]
        with _process(argv, dict(os.environ), log_path) as process:
            base_url = _wait_for_url(process, log_path, _LLAMA_READY, "llama_server.py")
            handle = ServerHandle(base_url=base_url, process=process, log_path=log_path)
            _wait_until_healthy(handle, "/health", "llama_server.py")
            yield handle


def _post_json(url: str, body: bytes | dict[str, Any], what: str) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        raise ServerStartError(f"{what}: HTTP {error.code}: {error.read().decode(errors='replace')}") from error
    return json.loads(text) if text else None


def _create_ollama_model(handle: ServerHandle, gguf: Path, name: str, threads: int) -> None:
    """Upload the GGUF as a blob and create `name` from it, as `ollama create` does.

    Ollama picks the chat template and stop words by matching the GGUF's own template.
    Ollama has no environment variable for the thread count, so it is a model parameter.
    """
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    _post_json(f"{handle.base_url}/api/blobs/{digest}", gguf.read_bytes(), "uploading the GGUF blob")
    result = _post_json(
        f"{handle.base_url}/api/create",
        {"model": name, "files": {gguf.name: digest}, "parameters": {"num_thread": threads}, "stream": False},
        f"creating model {name}",
    )
    if not isinstance(result, dict) or result.get("status") != "success":
        raise ServerStartError(f"creating model {name} answered {result!r}:\n{handle.log()}")


@contextlib.contextmanager
def start_ollama(
    binary: Path, gguf: Path, *, model: str = "tiny:latest", ctx_size: int = 512, threads: int = 2
) -> Iterator[OllamaHandle]:
    """Run `binary serve` on a free loopback port and create `model` from `gguf`.

    Everything Ollama writes (its key pair, its model store) goes to a temporary HOME.
    Yields once /api/version answers and the model is created; the first request then
    loads it (well under a second for the tiny model).
    """
    with tempfile.TemporaryDirectory(prefix="llmrelay-ollama-") as tmp:
        home = Path(tmp)
        log_path = home / "ollama.log"
        env = {
            **os.environ,
            "HOME": str(home),
            "OLLAMA_HOST": "127.0.0.1:0",
            "OLLAMA_MODELS": str(home / "models"),
            "OLLAMA_CONTEXT_LENGTH": str(ctx_size),
            "OLLAMA_NUM_PARALLEL": "1",
            "OLLAMA_MAX_LOADED_MODELS": "1",
            "OLLAMA_NO_CLOUD": "1",
        }
        with _process([str(binary), "serve"], env, log_path) as process:
            base_url = _wait_for_url(process, log_path, _OLLAMA_READY, "ollama serve")
            handle = OllamaHandle(base_url=base_url, process=process, log_path=log_path, model=model)
            _wait_until_healthy(handle, "/api/version", "ollama serve")
            _create_ollama_model(handle, gguf, model, threads)
            yield handle
