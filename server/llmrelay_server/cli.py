"""`llmrelay-server`: flags and environment -> configuration -> a running gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from llmrelay_server import logs
from llmrelay_server.app import run, serve
from llmrelay_server.auth import new_key
from llmrelay_server.backends.http1 import TrustConfigError, upstream_tls_context
from llmrelay_server.backends.proxies import Proxies, ProxyConfigError
from llmrelay_server.config import DEFAULT_LISTEN, ConfigError, check_key_name, load_config
from llmrelay_server.open_files import raise_open_files_limit
from llmrelay_server.workers import ListenError, Supervisor, WorkerRole


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        keys(argv[1:])  # with the streams it was given: a key shown to a closed stdout is shown to no one
        return
    _open_missing_standard_streams()
    parser = argparse.ArgumentParser(
        prog="llmrelay-server",
        description="The llmrelay gRPC gateway. `llmrelay-server keys new NAME` makes a caller key.",
    )
    parser.add_argument(
        "--listen",
        type=_given,
        metavar="HOST:PORT",
        help=f"where to serve gRPC (env LLMRELAY_LISTEN; else server.listen, {DEFAULT_LISTEN})",
    )
    parser.add_argument("--config", type=_given, metavar="FILE", help="a YAML configuration file (env LLMRELAY_CONFIG)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO"
    )
    parser.add_argument(
        "--workers",
        type=_processes,
        metavar="N",
        help="server processes sharing the port (env LLMRELAY_WORKERS; default 1)",
    )
    # Set by the supervisor of several workers on the command lines of its workers.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.worker, args.worker_dir, args.supervisor_pid).count(None) not in (0, 3) or (
        args.worker is None and args.heartbeat_fd is not None
    ):
        # One of them alone is a typo (`--worker 2`): it made a worker with no supervisor, which bound the port beside
        # another gateway's (SO_REUSEPORT) and then failed with a traceback.
        parser.error("unrecognized arguments: the --worker flags are the supervisor's; did you mean --workers N?")
    logs.configure(args.log_level, worker=args.worker)
    # The HTTP client logs every request at INFO; that is noise on every agent step.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        # A flag is the most specific setting, so it overrides the environment as well as the file.
        env = {**os.environ, **({"LLMRELAY_LISTEN": args.listen} if args.listen else {})}
        if args.workers is not None:
            env["LLMRELAY_WORKERS"] = str(args.workers)
        config = load_config(env, path=args.config)
    except ConfigError as exc:
        _stop_at_start(exc.log_format, f"configuration error: {exc}")
    try:
        # Read again by each backend as it starts: a proxy its calls could not go through stops the gateway here,
        # once, before any worker starts.
        Proxies.from_environment()
        # Likewise the certificates https upstreams are checked against, read otherwise at the first call to one.
        if any(spec.base_url.startswith("https:") for spec in config.backends):
            upstream_tls_context()
    except (ProxyConfigError, TrustConfigError) as exc:
        _stop_at_start(config.server.log_format, f"configuration error: {exc}")
    # Said once, not by each worker (which inherits the limit the supervisor raised).
    raise_open_files_limit(len(config.backends), say=args.worker is None)
    try:
        if args.worker is not None:
            role = WorkerRole(args.worker, args.worker_dir, args.supervisor_pid, args.heartbeat_fd)
            sys.exit(run(serve(config, role), config.server.event_loop))
        elif config.server.workers > 1:
            sys.exit(run(Supervisor(config, argv).run(), config.server.event_loop))
        else:
            sys.exit(run(serve(config), config.server.event_loop))
    except ListenError as exc:
        _stop_at_start(config.server.log_format, str(exc))
    except ConfigError as exc:  # what is checked as it is read: a certificate, the keys file
        _stop_at_start(config.server.log_format, f"configuration error: {exc}")


def _open_missing_standard_streams() -> None:
    """A standard stream the gateway was started without (`2>&-`) is /dev/null, as a daemon's are: it exited 1
    without a word (Python's sys.stderr is None then, and the log has nothing to write to), and the next file opened
    would take its number, what is written there (gRPC's own lines) landing in that file."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest number free: this one, as the lower ones are open by now
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (the process's, for its whole life)


def _stop_at_start(log_format: str, why: str) -> NoReturn:
    """Ends a gateway that could not start, saying why in one line: with `server.log_format: json`, a JSON object
    like every other line of its log, which a collector parsing JSON would otherwise not take."""
    if log_format == "json":
        logs.use_log_format("json")  # set where the start began, which need not have got that far
        logging.getLogger("llmrelay_server").error(why)
        sys.exit(1)
    sys.exit(f"llmrelay-server: {why}")


def _given(text: str) -> str:
    # `--config "$FILE"` with FILE unset would otherwise start on the defaults (or LLMRELAY_CONFIG's) without a word.
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?)")
    return text


def _processes(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # isdigit() alone takes '²', which int() refuses
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes >= 1")
    return int(text)


def keys(argv: list[str]) -> None:
    """`keys new NAME`: a new random key, printed once, and the configuration entry that admits it (its hash)."""
    parser = argparse.ArgumentParser(prog="llmrelay-server keys", description="Caller keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a key for a caller; prints it once, with its configuration entry")
    new.add_argument("name", help="the caller's name in the ledger and logs (letters, digits and ._:@/-)")
    args = parser.parse_args(argv)
    try:
        check_key_name(args.name)
    except ConfigError as exc:
        sys.exit(f"llmrelay-server keys: {exc}")
    if sys.stdout is None:  # started with it closed (`>&-`)
        sys.exit("llmrelay-server keys: standard output is closed: the key would be shown to no one")
    key, sha256 = new_key()
    try:
        _show_key(args.name, key, sha256)
        sys.stdout.flush()
    except OSError as exc:  # a reader gone (BrokenPipeError), a full disk: the key not shown whole, and kept nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would flush again as it exits
        sys.exit(f"llmrelay-server keys: the key could not be written out ({exc.strerror}): make another")


def _show_key(name: str, key: str, sha256: str) -> None:
    # The name quoted: plain, YAML reads some names as something else (0123 as 83, 12:30 as 750, 1_000 as 1000), the
    # caller then billed under that, and cannot read others at all (@ops).
    print(f"""# The key for {name}, shown this once: give it to the caller (as `authorization: Bearer KEY`).
# The gateway keeps only its SHA-256; a lost key is replaced, not recovered.
{key}

# Add this entry to auth.keys in the configuration, or to the keys file (LLMRELAY_KEYS_FILE):
  - name: "{name}"
    sha256: "{sha256}"
    # models: ["ollama/*"]           # optional: the model patterns it may use
    # limits: {{requests_per_minute: 600, tokens_per_minute: 200000, budget_usd_per_day: 50}}""")


if __name__ == "__main__":
    main()
