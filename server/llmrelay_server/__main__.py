"""`llmrelay-server`, and `python -m llmrelay_server` (how a supervisor starts its workers).

The gateway's modules are imported here, inside `main`, rather than above it: they take a second or two to load, and
Ctrl-C in that time (or before the gateway's own SIGINT handler is in place, which then stops it gracefully) ends the
process quietly, as asked, not with Python's traceback of wherever the import had got to (one per worker)."""

import sys


def main() -> None:
    try:
        from llmrelay_server.cli import main as command_line

        command_line()
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT: the shell's status for a command stopped by Ctrl-C


if __name__ == "__main__":
    main()
