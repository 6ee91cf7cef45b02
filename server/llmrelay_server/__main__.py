"""`llmrelay-server`, and `python -m llmrelay_server` (how a supervisor starts its workers).

The gateway's modules are imported here, inside `main`, rather than above it: they take a second or two to load, and
Ctrl-C in that time (or before the gateway's own SIGINT handler is in place, which then stops it gracefully) ends the
process quietly, as asked, not with Python's traceback of wherever the import had got to (one per worker)."""

import os
import signal
import sys
from types import FrameType

INTERRUPTED = 130
"""128 + SIGINT: the shell's status for a command stopped by Ctrl-C."""
_OWN_PACKAGES = frozenset({"llmrelay_server", "llmrelay"})
"""The packages of this distribution: a module of theirs missing is a bug, not a missing extra."""


def main() -> None:
    # SIGHUP reloads the keys file once the gateway has started (which reads it anyway); until then it would end the
    # process, and a service manager's reload right after a start (systemd's ExecReload) would stop the gateway: from
    # the first moment, as the modules take a second or two to load.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # While the modules load, Ctrl-C ends the process at once; an ignored SIGINT (a command started in the
    # background) stays ignored.
    loading = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if loading:
        signal.signal(signal.SIGINT, _interrupted_while_loading)
    # gRPC's core logs at INFO unless told, on stderr, in a format of its own (no log pipeline parses it, and not JSON
    # with log_format: json): a line for every connection that fails its TLS handshake; and at ERROR one for every
    # TLS server name its certificate does not match, the name written as the client sent it (newlines and all: lines
    # forged into the log by anyone who reaches the port, before any key or client certificate is asked for). Nothing
    # it says of a server is the operator's to act on that the gateway does not say itself. GRPC_VERBOSITY set by the
    # operator wins (ERROR, DEBUG: to look into gRPC itself). Before gRPC is loaded.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        from llmrelay_server.cli import main as command_line
    except ModuleNotFoundError as exc:
        # `pip install .` (the SDK alone) installs this script too, and its first import of a server dependency
        # (grpc_health, ...) ended it with a traceback. A module of our own missing is a bug, and shown as one.
        package = (exc.name or "").partition(".")[0]  # grpc_health, of grpc_health.v1
        if not package or package in _OWN_PACKAGES:
            raise
        sys.exit(f"llmrelay-server: needs the server extra: pip install 'llmrelay[server]' (missing module {package})")

    if loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        command_line()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


def _interrupted_while_loading(signum: int, frame: FrameType | None) -> None:
    """Nothing has started yet, so there is nothing to undo. Not KeyboardInterrupt, which an import does not always
    let through: Python 3.11 wraps it in a RuntimeError when it comes in a class's __set_name__ (a dataclass's fields;
    seen in a worker under load), and prints and drops it when it comes in a finalizer."""
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    main()
