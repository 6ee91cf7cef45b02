"""`make demo`: the gateway in front of a real llama.cpp server with a tiny generated model, tokens streaming at once.

The model is the integration tests' own (tests/models): random weights, so it speaks random words, but every byte of
the path is real: gRPC -> llmrelay -> the openai SDK -> llama.cpp's HTTP server. Nothing is downloaded.

Usage: python scripts/demo.py [--listen HOST:PORT]   (Ctrl-C stops everything)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmrelay import Client, UnavailableError  # noqa: E402
from models.servers import CACHE_ROOT, start_llama_server  # noqa: E402
from models.tiny_gguf import write_tiny_gguf  # noqa: E402

BIN = Path(sys.executable).parent
CACHE = CACHE_ROOT / "demo"


def wait_until_serving(target: str, gateway: subprocess.Popen[bytes], backend_url: str, within_s: float = 30.0) -> None:
    """Until the gateway answers, and it is ours: another one already on the address must not stand in for it."""
    deadline = time.monotonic() + within_s
    with Client(target, timeout=2) as client:
        while gateway.poll() is None:
            with contextlib.suppress(UnavailableError):
                if any(backend.base_url == backend_url for backend in client.health().backends):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: the gateway did not answer on {target} within {within_s:g} s")
            time.sleep(0.1)
    raise SystemExit("demo: the gateway stopped at start; its message is above")


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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "LLMRELAY_"))}
        gateway = subprocess.Popen(
            [BIN / "llmrelay-server", "--listen", args.listen, "--config", str(config), "--log-level", "WARNING"],
            env=env,
        )
        try:
            wait_until_serving(args.listen, gateway, f"{llama.base_url}/v1")
            cli = [str(BIN / "llmrelay"), "--target", args.listen]
            subprocess.run([*cli, "health"], check=True, timeout=30)
            print("\n$ llmrelay stream 'Tell me about the water' --max-tokens 40")
            subprocess.run([*cli, "stream", "Tell me about the water", "--max-tokens", "40"], check=True, timeout=60)
            print(f"\nThe gateway serves on {args.listen} in front of llama.cpp ({llama.base_url}). Try:")
            print(f"  {BIN / 'llmrelay'} --target {args.listen} stream 'hello there'")
            print(f"  {BIN / 'llmrelay'} --target {args.listen} tokens 'hello there' --model local/tiny --chat")
            print("Ctrl-C stops the demo.")
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(15)


if __name__ == "__main__":
    # SIGTERM stops the demo as Ctrl-C does, through the finally blocks, so no server is left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Our lines and the CLI's must come out in order when the output is a file or a pipe, not only a terminal.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    main()
