"""Host script: llama.cpp's HTTP server, run in process by xllamacpp, for the tests.

    python tests/models/llama_server.py --model PATH --host 127.0.0.1 --port N [--alias NAME]

Port 0 picks a free port. Once the model is loaded and the server listens, it prints
"llama_server: listening on http://HOST:PORT" on stdout; tests/models/servers.py waits
for that line. SIGTERM or SIGINT stops the server and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

import xllamacpp  # type: ignore[import-untyped]  # compiled extension without stubs

READY_PREFIX = "llama_server: listening on "
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GGUF file to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--alias", default="tiny", help="model name in requests and responses (default: tiny)")
    parser.add_argument("--ctx-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="concurrent request slots, each with ctx-size")
    parser.add_argument(
        "--embedding", action="store_true", help="also serve /v1/embeddings, one mean-pooled vector per input"
    )
    return parser.parse_args(argv)


def _say(line: str) -> None:
    """One line on stdout in one write(2).

    stdout and stderr share the log file, and llama.cpp's threads write their log lines to stderr in pieces; print()
    writes its text and its newline in two calls, so one of those pieces can land between them and glue itself to the
    ready line's port (seen in CI: "127.0.0.1:40523I").
    """
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    # Block the stop signals before xllamacpp.Server starts its threads: they inherit the
    # mask, so a signal waits for sigwait() below instead of landing in a native thread,
    # where SIGTERM's default action would kill the process without tearing the server down.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    # The server's slots share the context: each of the n_parallel slots gets ctx-size.
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx_size * args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    # Renders the GGUF's own chat template, as llama-server --jinja does.
    params.use_jinja = True
    if args.embedding:
        # Without embedding mode llama.cpp answers /v1/embeddings with 501. A causal model names no pooling of its
        # own, and without one the server makes a vector per token, which its OpenAI endpoint refuses: mean pooling
        # gives one vector per input, as an embedding model's would.
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN

    # Returns once the model is loaded and the socket listens.
    server = xllamacpp.Server(params)
    _say(f"{READY_PREFIX}{server.listening_address}")

    received = signal.sigwait(STOP_SIGNALS)
    _say(f"llama_server: {signal.Signals(received).name} received, stopping")
    # Server's destructor stops the HTTP loop and joins its threads; run it now, while the
    # interpreter is intact, not whenever interpreter shutdown happens to collect it.
    del server
    _say("llama_server: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
