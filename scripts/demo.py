"""`make demo`: the gateway in front of a real llama.cpp server with a tiny generated model, tokens streaming at once.

The model is the integration tests' own (tests/models): random weights, so it speaks random words, but every byte of
the path is real: gRPC -> llmrelay -> the openai SDK -> llama.cpp's HTTP server. Nothing is downloaded.

Usage: python scripts/demo.py [--listen HOST:PORT]   (Ctrl-C stops everything)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import BIN, spawn_gateway  # noqa: E402
from models.servers import CACHE_ROOT, start_llama_server  # noqa: E402
from models.tiny_gguf import write_tiny_gguf  # noqa: E402

CACHE = CACHE_ROOT / "demo"


async def serve(listen: str, config: Path) -> None:
    """The gateway on `listen` (its warnings on stderr), a first streamed answer through the CLI, then serving until
    Ctrl-C."""
    host, _, port = listen.rpartition(":")
    if host != "127.0.0.1":
        raise SystemExit(f"demo: --listen must be 127.0.0.1:PORT, not {listen}")
    # Another gateway already there would answer in our stead: say so rather than demonstrate someone else's.
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise SystemExit(f"demo: cannot listen on {listen} ({exc.strerror}); pick another with --listen") from None
    gateway = await spawn_gateway(config, "--log-level", "WARNING", port=int(port), echo=sys.stderr)
    try:
        await gateway.wait_serving()
        cli = [str(BIN / "llmrelay"), "--target", listen]
        await run(*cli, "health")
        print("\n$ llmrelay stream 'Tell me about the water' --max-tokens 40")
        await run(*cli, "stream", "Tell me about the water", "--max-tokens", "40")
        print(f"\nThe gateway serves on {listen} in front of llama.cpp. Try:")
        print(f"  {BIN / 'llmrelay'} --target {listen} stream 'hello there'")
        print(f"  {BIN / 'llmrelay'} --target {listen} tokens 'hello there' --model local/tiny --chat")
        print("Ctrl-C stops the demo.")
        await gateway.process.wait()
        raise SystemExit(f"demo: the gateway stopped (status {gateway.process.returncode}); its log is above")
    finally:
        await gateway.stop()


async def run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(*command)
    if await asyncio.wait_for(process.wait(), 60) != 0:
        raise SystemExit(f"demo: {' '.join(command)} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", default="127.0.0.1:50051")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    # A small EOS boost lets the model end its answers by itself now and then, as a real one would.
    model = write_tiny_gguf(CACHE / "tiny.gguf", eos_boost=2.0)
    with start_llama_server(model, alias="tiny", parallel=2) as llama, tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "demo.yaml"
        config.write_text(
            f'server: {{usage_db: "{CACHE / "usage.db"}", drain_s: 0}}\n'
            "llm:\n"
            f'  backends: [{{name: local, kind: llamacpp, base_url: "{llama.base_url}/v1", model: tiny}}]\n'
            "  order: [local]\n"
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.listen, config))


if __name__ == "__main__":
    # SIGTERM stops the demo as Ctrl-C does, through the finally blocks, so no server is left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Our lines and the CLI's must come out in order when the output is a file or a pipe, not only a terminal.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    main()
