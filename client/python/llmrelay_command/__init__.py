"""The `llmrelay` command's entry point, outside the SDK's package: importing `llmrelay` imports grpc, whose core reads
GRPC_VERBOSITY as it loads, so no code in the package runs early enough to set it."""

import os
import signal
import sys


def main() -> None:
    # gRPC's core logs at INFO unless told: a line of its own format ("I1203 ... Handshake failed ...") on stderr before
    # the command's own error, for a gateway without TLS or a wrong CA. Its errors still show; a GRPC_VERBOSITY the
    # user set wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from llmrelay.cli import main as command
    except KeyboardInterrupt:
        # Ctrl-C while the SDK and grpc load (most of a short command's time): quietly, with the status a shell gives
        # a command that SIGINT ended, as the command says it once loaded; not a traceback of wherever the import was.
        sys.exit(128 + signal.SIGINT)
    command()
