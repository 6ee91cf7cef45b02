"""The `llmrelay` command's entry point, outside the SDK's package: importing `llmrelay` imports grpc, whose core reads
GRPC_VERBOSITY as it loads, so no code in the package runs early enough to set it.

The SDK is imported here, inside `main`, once Ctrl-C has a handler that ends the process at once: it takes most of a
short command's time to load, and Ctrl-C in that time ended it with a traceback of wherever the import had got to,
status 1 (grpc's compiled core turns a KeyboardInterrupt raised while it loads into an ImportError)."""

# _signal: the interpreter's own signal module, loaded before any code runs; signal.py (its enums) would be one more
# import during which Ctrl-C has no handler but Python's.
import _signal  # type: ignore[import-not-found]
import os
import sys

INTERRUPTED = 130
"""128 + SIGINT: the shell's status for a command stopped by Ctrl-C."""


def main() -> None:
    # While the SDK loads, Ctrl-C ends the process at once; an ignored SIGINT (a command started in the background)
    # stays ignored.
    loading = _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    if loading:
        _signal.signal(_signal.SIGINT, _interrupted_while_loading)
    # gRPC's core logs at INFO unless told: a line of its own format ("I1203 ... Handshake failed ...") on stderr before
    # the command's own error, for a gateway without TLS or a wrong CA. Its errors still show; a GRPC_VERBOSITY the
    # user set wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from llmrelay.cli import main as command
    except KeyboardInterrupt:
        # Not from Ctrl-C, which the handler above takes: the same quiet end all the same.
        sys.exit(INTERRUPTED)
    if loading:
        # The command's own handling of Ctrl-C from here: a stream's line ended, then status 130.
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    command()


def _interrupted_while_loading(signum: int, frame: object) -> None:
    """Nothing has started yet, so there is nothing to undo. Not KeyboardInterrupt, which an import does not always
    let through (grpc's cygrpc makes an ImportError of it)."""
    os._exit(INTERRUPTED)
