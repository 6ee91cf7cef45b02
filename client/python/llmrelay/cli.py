"""`llmrelay`: the gateway from a terminal (complete, stream, embed, tokens, health, usage, stats)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import errno
import http.client
import io
import json
import math
import os
import re
import signal
import sys
import time
import unicodedata
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TextIO, TypeVar
from urllib.parse import unquote

from llmrelay import v1 as pb
from llmrelay._channel import (
    BLOCKING_SERVICE_CONFIG,
    client_certificate_problem,
    root_certificates_problem,
    target_problem,
)
from llmrelay._client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, Client
from llmrelay._errors import LLMRelayError
from llmrelay._messages import message
from llmrelay._options import CompletionOptions

DEFAULT_METRICS = "http://127.0.0.1:9464/metrics"
KEY_ENV = "LLMRELAY_API_KEY"
"""The environment variable the caller key is read from, unless --key-env names another. Never an argument: it would
show in `ps` and in the shell's history."""


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C, during a call or before one (reading `-` from a terminal, say): quietly, with the status a shell
        # gives a command that SIGINT ended.
        sys.exit(128 + signal.SIGINT)


def _main(argv: Sequence[str] | None) -> None:
    # The streams first: --help and --version print to stdout, and a mistaken argument is said on stderr.
    if sys.stderr is None or _read_only(sys.stderr):
        # Started with its stderr closed (`2>&-`): print(file=None) writes to stdout, which would put the summary line
        # into the answer a script reads. Or open for reading only (`2</dev/null`): the summary line failed after the
        # answer, EBADF, and the command with it, status 1. The notes go nowhere instead.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if sys.stdout is None:
        # Started with its stdout closed (`llmrelay complete hi >&-`): Python leaves sys.stdout None, and print() writes
        # nothing. Said before the call, which would cost tokens for an answer with nowhere to go.
        sys.exit("llmrelay: standard output is closed: nowhere to write to")
    if _read_only(sys.stdout):
        # Open for reading only (`1</dev/null`): the answer, paid for, failed to be written, EBADF. Said as for a closed
        # one, before the call.
        sys.exit("llmrelay: standard output is open for reading only: nowhere to write to")
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A terminal or a pipe whose encoding cannot hold every character of an answer (an ASCII or Latin-1
            # locale, PYTHONIOENCODING=ascii) would end the command with a UnicodeEncodeError's traceback, the rest
            # of the answer lost: such characters are written as escapes (\u6a21) instead.
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    try:
        try:
            _run(args)
        finally:
            sys.stdout.flush()  # here, where a reader gone is caught, rather than as Python exits
    except OSError as exc:
        if not isinstance(exc, BrokenPipeError) and exc.errno not in _WRITE_FAILURES:
            raise
        # Python would flush stdout again as it exits, and fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            # The reader has gone (`llmrelay stream ... | head`): end quietly, with the status a shell gives a command
            # that SIGPIPE ended, as command-line tools do.
            sys.exit(128 + signal.SIGPIPE)
        # Its output could not be written (`> /dev/full`, a full disk, a failing device): one line, not a traceback.
        sys.exit(f"llmrelay: cannot write its output: {exc.strerror}")


_WRITE_FAILURES: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF})
"""What a write to a file or a device fails with, beside a reader gone (BrokenPipeError); EBADF: a descriptor not open
for writing (which _read_only tells at the start, where the system says)."""


def _read_only(stream: TextIO) -> bool:
    """Whether `stream` is a file descriptor open for reading only (`1</dev/null`): Python opens sys.stdout on it all
    the same, and only a write finds out. False where that cannot be told (no descriptor: a test's capture)."""
    if sys.platform == "win32":
        return False
    import fcntl  # POSIX's

    try:
        flags = fcntl.fcntl(stream.fileno(), fcntl.F_GETFL)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return flags & os.O_ACCMODE == os.O_RDONLY


def _run(args: argparse.Namespace) -> None:
    if args.run is _stats:  # reads the metrics endpoint, not the gRPC service
        try:
            _stats(args)
        except KeyboardInterrupt:
            if args.once:  # not done: a script must not take it for a snapshot
                raise
            # Ctrl-C is how the live view ends: a clean end.
        return
    client = _client(args)
    try:
        with client:
            args.run(client, args)
    except LLMRelayError as exc:
        details = ""  # the reason is in the error's own text: "CODE (REASON): message"
        for violation in exc.field_violations:
            # The gateway's text of an invalid request is its violations, joined by "; ": each again was each twice.
            if (said := f"{violation.field}: {violation.description}") not in exc.message:
                details += f"\n  {said}"
        if exc.retry_delay_s is not None:
            details += f"\n  retry after {exc.retry_delay_s:g} s"
        if exc.reason == "UNAUTHENTICATED":
            details += f"\n  llmrelay reads the key from {args.key_env or KEY_ENV}"
        if exc.request_id is not None:
            details += f"\n  request id {exc.request_id} (in the gateway's log)"
        sys.exit(_shown(f"llmrelay: {exc}{details}", sys.stderr))


def _client(args: argparse.Namespace) -> Client:
    """The client the options describe; a mistake in them ends the command with a line that says which."""
    certificates = {"--ca-file": args.ca_file, "--cert": args.cert, "--cert-key": args.cert_key}
    given = [option for option, path in certificates.items() if path is not None]
    if args.tls is False and given:
        sys.exit(f"llmrelay: --no-tls with {', '.join(given)}: leave out --no-tls to use TLS with them")
    if (args.cert is None) != (args.cert_key is None):
        sys.exit("llmrelay: a client certificate needs both --cert and --cert-key")
    pem = {option: _read(option, path) for option, path in certificates.items()}
    _check_certificates(args, pem)
    variable = KEY_ENV if args.key_env is None else args.key_env
    key = os.environ.get(variable)
    if args.key_env is not None and not key:
        sys.exit(f"llmrelay: --key-env {args.key_env}: the variable is {'not set' if key is None else 'empty'}")
    # Checked here: gRPC would fail the call INTERNAL with "Invalid metadata", which says nothing of the variable.
    if key and not (key.isascii() and key.isprintable() and " " not in key):
        sys.exit(f"llmrelay: {variable} holds characters no key has (printable ASCII, no spaces)")
    # From a terminal, an answer now (with when to come back) beats the SDK's default of waiting out a pushback in
    # silence, which may be half a minute while a circuit is open.
    retries = BLOCKING_SERVICE_CONFIG if args.retry else None
    return Client(
        _target_of(args),
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=pem["--ca-file"],
        private_key=pem["--cert-key"],
        certificate_chain=pem["--cert"],
        service_config=retries,
        metadata=[("authorization", f"Bearer {key}")] if key else (),
    )


def _check_certificates(args: argparse.Namespace, pem: dict[str, bytes | None]) -> None:
    """The files of --ca-file, --cert and --cert-key as TLS takes them, each problem said with the option that gave it
    (the SDK's own check would name its arguments): gRPC would only say "Failed to create security handshaker". What
    was read of them, not the files again: a pipe (`--cert <(vault read ...)`) gives its content once."""
    if problem := root_certificates_problem(pem["--ca-file"]):
        sys.exit(f"llmrelay: --ca-file {args.ca_file}: {problem}")
    if problem := client_certificate_problem(pem["--cert-key"], pem["--cert"]):
        sys.exit(f"llmrelay: --cert {args.cert} and --cert-key {args.cert_key}: {problem}")


def _read(option: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        sys.exit(f"llmrelay: {option} {path}: {exc.strerror}")


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (--timeout's type bounds it too)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


MIN_INTERVAL_S: Final = 0.1
MAX_INTERVAL_S: Final = 86400.0
"""--interval's bounds: past a day, time.sleep cannot take every number (1e300 ended in OverflowError)."""


def _interval(text: str) -> float:
    """Seconds between samples (argparse's type for `stats --interval`), from MIN_INTERVAL_S to MAX_INTERVAL_S."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:  # nan fails both
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}"
        )
    return seconds


_INT32_MAX: Final = 2**31 - 1


def _count(text: str) -> int:
    """A whole number from 1 to 2^31 - 1 (argparse's type for --max-tokens and --dimensions: the contract's int32)."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= _INT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {_INT32_MAX}")
    return count


STDIN: Final = "-"


def _utf8(text: str) -> str:
    """Text that a message can carry (argparse's type for what is sent to the gateway: a prompt, a model, a caller).
    An argument's bytes that are not UTF-8 (a Latin-1 "café", its é the byte 0xe9) reach Python as lone surrogates
    (surrogateescape), which UTF-8 on the wire cannot hold: the call would end in a traceback, naming no option. In a
    locale whose encoding is not UTF-8 (LC_ALL=C with Python's UTF-8 mode off: ASCII) every byte past ASCII reaches it
    so, the bytes of UTF-8 text too: those are read as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        with contextlib.suppress(UnicodeError):
            return os.fsencode(text).decode("utf-8")  # the argument's bytes as given, if they are UTF-8
        code = ord(text[exc.start])
        found = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate \\u{code:04x}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text ({found} at character {exc.start + 1})") from None
    return text


def _text(text: str) -> str:
    """A text argument (argparse's type for a prompt, a text to embed or count), or standard input's whole text for
    "-", as `cat -` reads it: `git diff | llmrelay complete -`."""
    if text != STDIN:
        return _utf8(text)
    if sys.stdin is None:
        raise argparse.ArgumentTypeError("- reads standard input, which is closed")
    try:
        # As bytes, whatever the locale: a message is UTF-8 on the wire, so anything else is said here, not later.
        read = sys.stdin.buffer.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise argparse.ArgumentTypeError(f"- reads standard input, which is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"- reads standard input, which could not be read: {exc.strerror}") from None
    if not read.strip():
        raise argparse.ArgumentTypeError("- reads standard input, which was empty (or read already)")
    return read


def _target(text: str) -> str:
    """The gateway's target (argparse's type for --target): an empty one would have gRPC print its own error lines.
    Spaces around it (a copy-paste, a quoted variable) are not part of it, as in LLMRELAY_TARGET: gRPC took " HOST" for
    a host name, not loopback, and failed its TLS ("Misformatted domain name")."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("an empty target: give HOST:PORT, or leave --target out for the default")
    if problem := target_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return _utf8(text)


def _target_of(args: argparse.Namespace) -> str:
    """--target, else LLMRELAY_TARGET, else the default; read here, by the commands that call the gateway, not as
    --target's default: argparse checks a default of every command's (stats, which calls none, too), and blamed its
    mistake on --target, which nobody had typed. An empty LLMRELAY_TARGET (`LLMRELAY_TARGET= llmrelay ...`) is unset,
    as for other tools' variables."""
    if args.target is not None:
        return str(args.target)
    target = os.environ.get("LLMRELAY_TARGET", "").strip()
    if not target:
        return DEFAULT_TARGET
    try:
        return _target(target)
    except argparse.ArgumentTypeError as exc:
        sys.exit(f"llmrelay: LLMRELAY_TARGET: {exc}")


def _variable_name(text: str) -> str:
    """An environment variable's name (argparse's type for --key-env): an empty one, a variable of the script's left
    unset (`--key-env "$BOT_KEY_VAR"`), took the key in LLMRELAY_API_KEY, often a person's own and broader, and billed
    the call to it without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"an empty name (an unset variable?): name the variable, or leave --key-env out for {KEY_ENV}"
        )
    return text


def _timeout(text: str) -> float:
    """A deadline in seconds (argparse's type for --timeout): 0, a negative number, nan or inf would fail every call
    DEADLINE_EXCEEDED, as if the gateway had been too slow, where the mistake is the option's."""
    seconds = _seconds(text)
    if seconds > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more seconds than a gRPC deadline holds (at most {MAX_TIMEOUT_S:g})"
        )
    return seconds


_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _moment(text: str) -> datetime.datetime:
    """A time (argparse's type for --since and --until): so long ago (30m, 24h, 7d), or an ISO 8601 date or time, in
    UTC unless it gives its offset."""
    try:
        if ago := _AGO.fullmatch(text):
            return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=float(ago[1]) * _UNIT_S[ago[2]])
        moment = datetime.datetime.fromisoformat(text)
        return moment.astimezone(datetime.UTC) if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is out of the calendar's range (years 1 to 9999)") from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago (30m, 24h, 7d) nor an ISO 8601 date or time (2026-11-30, 2026-11-30T09:00)"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrelay",
        description="Talk to an llmrelay gateway.",
        epilog=f"A gateway with caller keys (auth.keys) wants one: put it in {KEY_ENV} (or the variable --key-env"
        " names), never on the command line.",
    )
    parser.add_argument("--version", action=_Version, help="print the installed llmrelay's version and exit")
    _connection_options(parser, given_only=False)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    calling: list[argparse.ArgumentParser] = []
    """The commands that call the gateway (not stats, which reads its metrics)."""

    for name, run, text in (("complete", _complete, "one answer"), ("stream", _stream, "stream tokens as they come")):
        command = commands.add_parser(name, help=text)
        calling.append(command)
        command.add_argument("prompt", type=_text, help="the user message (-: standard input)")
        command.add_argument("--model", type=_utf8, help="a model, backend/model or alias (default: the default chain)")
        command.add_argument("--system", type=_utf8, help="a system message to put first")
        command.add_argument("--max-tokens", type=_count)
        command.add_argument("--temperature", type=float)
        command.add_argument("--exact-model", action="store_true", help="no fallback to another model")
        command.set_defaults(run=run)

    embed = commands.add_parser("embed", help="the vectors of texts, one JSON array a line, in order")
    embed.add_argument("texts", nargs="+", metavar="text", type=_text, help="a text to embed (-: standard input)")
    embed.add_argument(
        "--model", type=_utf8, help="an embedding model, backend/model or alias (default: the gateway's)"
    )
    embed.add_argument("--dimensions", type=_count, help="shorter vectors, where the model can make them")
    embed.set_defaults(run=_embed)
    calling.append(embed)

    tokens = commands.add_parser("tokens", help="count the tokens of a text or a one-message chat")
    tokens.add_argument("text", type=_text, help="the text to count (-: standard input)")
    tokens.add_argument("--model", type=_utf8)
    tokens.add_argument("--chat", action="store_true", help="count as a user message, with chat overhead")
    tokens.set_defaults(run=_tokens)
    calling.append(tokens)

    health = commands.add_parser(
        "health", help="the backends' state", epilog="Exits 1 when the gateway is not serving."
    )
    health.add_argument("--probe", action="store_true", help="probe the backends now")
    health.set_defaults(run=_health)
    calling.append(health)

    usage = commands.add_parser("usage", help="token usage per backend, model and caller")
    usage.add_argument("--backend", type=_utf8)
    usage.add_argument("--model", type=_utf8, help="an upstream's model name, as the table shows it, or backend/model")
    usage.add_argument("--caller", type=_utf8)
    window = (
        "a time ago (30m, 24h, 7d) or an ISO 8601 date or time, UTC unless it says; usage is kept by the minute (by the"
        " day past the gateway's server.usage_by_minute_days)"
    )
    usage.add_argument("--since", type=_moment, help=f"only usage from then on: {window}")
    usage.add_argument("--until", type=_moment, help="only usage before then: the same forms")
    usage.set_defaults(run=_usage)
    calling.append(usage)

    stats = commands.add_parser("stats", help="a live view of the gateway from its metrics endpoint")
    stats.add_argument(
        "--metrics",
        default=os.environ.get("LLMRELAY_METRICS") or DEFAULT_METRICS,
        help=f"the gateway's /metrics URL (its server.metrics_listen; env LLMRELAY_METRICS; default {DEFAULT_METRICS})",
    )
    stats.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        help=f"seconds between samples, {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} (default 2)",
    )
    stats.add_argument("--once", action="store_true", help="print the totals since the gateway started, and exit")
    stats.set_defaults(run=_stats)
    for command in calling:
        _connection_options(command, given_only=True)
    return parser


class _Version(argparse.Action):
    """--version: the installed package's version, read when asked (importlib.metadata takes a while to load), then
    exit 0, as argparse's own action does. It was "the following arguments are required: COMMAND"."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        from importlib import metadata

        try:
            version = metadata.version("llmrelay")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "(version unknown: not installed)"
        print(f"{parser.prog} {version}")
        parser.exit()


def _connection_options(parser: argparse.ArgumentParser, *, given_only: bool) -> None:
    """How to reach the gateway: options of `llmrelay` before the command, and of each command that calls it after
    (`llmrelay complete hi --target HOST:PORT`, as people type them). After it (`given_only`), only those given are
    set, over any given before; argparse.SUPPRESS keeps the rest from overwriting those with their defaults."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if given_only else value

    parser.add_argument(
        "--target",
        type=_target,
        default=default(None),  # LLMRELAY_TARGET or the default, read by the commands that call the gateway
        help=f"HOST:PORT (env LLMRELAY_TARGET; default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of the call in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=default(None),
        help="TLS or plaintext (default: plaintext only to a loopback target, TLS otherwise)",
    )
    parser.add_argument(
        "--ca-file", type=Path, default=default(None), help="PEM roots to trust instead of the system's (implies TLS)"
    )
    parser.add_argument(
        "--cert",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="a PEM client certificate (chain) for mutual TLS (implies TLS)",
    )
    parser.add_argument(
        "--cert-key", type=Path, metavar="FILE", default=default(None), help="the PEM private key of --cert"
    )
    parser.add_argument(
        "--key-env",
        metavar="NAME",
        type=_variable_name,
        default=default(None),
        help=f"the environment variable that holds the caller key, sent as `authorization: Bearer KEY` (default"
        f" {KEY_ENV})",
    )
    parser.add_argument(
        "--retry",
        action=argparse.BooleanOptionalAction,
        default=default(False),
        help="let the channel retry UNAVAILABLE after the gateway's pushback, waiting silently (default: fail at once"
        " and say when to retry)",
    )


def _chat(args: argparse.Namespace) -> list[pb.Message]:
    system = [message("system", args.system)] if args.system else []
    return [*system, message("user", args.prompt)]


def _options(args: argparse.Namespace) -> CompletionOptions:
    options = CompletionOptions()
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    return options


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n"}
"""The control characters (C0, DEL, C1) but tab and newline, each to its escape, as a terminal is shown them."""


def _shown(text: str, stream: TextIO) -> str:
    """Text from a model, an upstream or the gateway as written to `stream`: at a terminal, with its control
    characters escaped ("\\x1b"), since an escape sequence in an answer or an upstream's error would recolour,
    retitle or rewrite the terminal, or set its clipboard (OSC 52); to a pipe or a file, as it is."""
    return text.translate(_CONTROLS) if stream.isatty() else text


def _print(text: str, *, end: str = "\n", flush: bool = False, file: TextIO | None = None) -> None:
    """print() of text from a model, an upstream or the gateway: see _shown."""
    stream = file or sys.stdout
    print(_shown(text, stream), end=end, flush=flush, file=stream)


def _complete(client: Client, args: argparse.Namespace) -> None:
    answer = client.complete(_chat(args), model=args.model, exact_model=args.exact_model, **_options(args))
    _print(answer.message.content)
    _print(_summary(answer.backend, answer.model, answer.finish_reason, answer.usage), file=sys.stderr)


def _stream(client: Client, args: argparse.Namespace) -> None:
    line_open = False  # whether the answer printed so far leaves its last line unended
    try:
        for chunk in client.stream(_chat(args), model=args.model, exact_model=args.exact_model, **_options(args)):
            if content := chunk.delta.content:
                # Open before the words go out: Ctrl-C may come the moment they are read, before the print returns.
                line_open = True
                _print(content, end="", flush=True)
                line_open = not content.endswith("\n")
            if chunk.HasField("usage"):
                print()  # end the answer's line on stdout, so the summary on stderr stands apart
                line_open = False
                _print(_summary(chunk.backend, chunk.model, chunk.finish_reason, chunk.usage), file=sys.stderr)
    except (LLMRelayError, KeyboardInterrupt):
        # A stream broken midway, or Ctrl-C: the line ended all the same, or the error would go on after the answer's
        # last words in a terminal, and a script reading lines (`while read`) would lose them.
        if line_open:
            print()
        raise


def _summary(backend: str, model: str, finish_reason: pb.FinishReason.ValueType, usage: pb.Usage) -> str:
    estimated = " (estimated)" if usage.estimated else ""
    tokens = f"{usage.prompt_tokens}+{usage.completion_tokens} tokens{estimated}"
    return f"[{backend}/{model}, {_named(pb.FinishReason.Name, finish_reason, 'FINISH_REASON_')}, {tokens}]"


_Number = TypeVar("_Number", bound=int)  # an enum's value type (FinishReason.ValueType)


def _named(name_of: Callable[[_Number], str], value: _Number, prefix: str) -> str:
    """An enum's value as the command shows it (FINISH_REASON_TOOL_CALLS: tool_calls); a value of a newer gateway,
    which this version does not know (protobuf keeps its number, and the contract may add values), as its number:
    the answer was printed, and a KeyError after it made a failure of the call."""
    try:
        name = name_of(value)
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix(prefix).lower()


def _embed(client: Client, args: argparse.Namespace) -> None:
    answer = client.embed(args.texts, model=args.model, dimensions=args.dimensions)
    for embedding in answer.embeddings:
        print(json.dumps(list(embedding.values)))
    dimensions = len(answer.embeddings[0].values) if answer.embeddings else 0
    estimated = " (estimated)" if answer.usage.estimated else ""
    summary = f"{len(answer.embeddings)} x {dimensions} dimensions, {answer.usage.prompt_tokens} tokens{estimated}"
    _print(f"[{answer.backend}/{answer.model}, {summary}]", file=sys.stderr)


def _tokens(client: Client, args: argparse.Namespace) -> None:
    if args.chat:
        count = client.count_tokens([message("user", args.text)], model=args.model)
    else:
        count = client.count_tokens(text=args.text, model=args.model)
    how = "estimated" if count.estimated else "exact"
    _print(f"{count.token_count} tokens ({count.model}, {count.encoding}, {how})")


def _health(client: Client, args: argparse.Namespace) -> None:
    report = client.health(probe=args.probe)
    print(f"serving: {'yes' if report.serving else f'no ({_not_serving_because(report)})'}")
    for backend in report.backends:
        state = "reachable" if backend.reachable else "unreachable"
        circuit = _named(pb.CircuitState.Name, backend.circuit_state, "CIRCUIT_STATE_")
        latency = f"{backend.latency.ToNanoseconds() / 1e6:.1f} ms" if backend.HasField("latency") else "-"
        _print(f"{backend.name:<12} {state:<12} circuit {circuit:<9} {latency:>9}  {backend.base_url}")
        if backend.models:
            _print(f"{'':<12} models: {', '.join(backend.models[:10])}")
        if backend.HasField("last_error"):
            _print(f"{'':<12} last error: {backend.last_error}")
    for store in report.stores:
        role = _named(pb.StoreRole.Name, store.role, "STORE_ROLE_").replace("_", " ")
        state = "available" if store.available else "unavailable"
        _print(f"{role:<12} {state:<12} {store.kind}" + (f": {store.description}" if store.description else ""))
    if not report.serving:
        sys.exit(1)


def _not_serving_because(report: pb.HealthResponse) -> str:
    """Why a gateway does not take calls, as its report tells: every backend out of reach (or its circuit open), or,
    with one usable, a gateway shutting down (which the report does not say otherwise)."""
    usable = any(b.reachable and b.circuit_state != pb.CIRCUIT_STATE_OPEN for b in report.backends)
    return "shutting down" if usable else "no backend is reachable with its circuit not open"


def _usage(client: Client, args: argparse.Namespace) -> None:
    if args.since is not None and args.until is not None and args.until < args.since:
        # Said in the options' words: the gateway's would name the request's fields (end_time, start_time).
        sys.exit("llmrelay usage: --until is before --since: give the earlier time to --since")
    request = pb.GetUsageRequest(backend=args.backend, model=args.model, caller=args.caller)
    if args.since is not None:
        request.start_time.FromDatetime(args.since)
    if args.until is not None:
        request.end_time.FromDatetime(args.until)
    records = client.get_usage(request).records
    if not records and args.backend is None and args.model is not None and "/" in args.model:
        # Nothing for an upstream model of that name: the model as `complete --model` takes it, backend/model.
        request.backend, _, request.model = args.model.partition("/")
        records = client.get_usage(request).records
    header = ("backend", "model", "caller", "requests", "prompt", "completion", "total", "cost (USD)")
    rows = [
        (r.backend, r.model, r.caller, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens, _usd(r.cost))
        for r in records
    ]
    # Names an upstream wrote (a model's: the ledger keeps C1 control characters) as the terminal is shown them, and
    # measured so: the table lines up with what it shows.
    cells = [[_shown(str(cell), sys.stdout) for cell in row] for row in [header, *rows]]
    widths = [max(_columns(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        padded = (cell + " " * (width - _columns(cell)) for cell, width in zip(row, widths, strict=True))
        print("  ".join(padded).rstrip())
    if any(r.cost.estimated for r in records):
        print("~ estimated: the gateway counted tokens, or the model has no known price")
    if any(r.cost.price_unknown for r in records):
        print("(no price): counted at the gateway's unknown_price rate; the upstream's bill may differ")


def _columns(text: str) -> int:
    """How many columns of a terminal the text takes: two for a wide character (CJK), none for a combining mark."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text
    )


def _usd(cost: pb.Cost) -> str:
    """Micro-dollars as dollars to the last digit, from the integer (a float would round large totals)."""
    dollars, micros = divmod(cost.usd_micros, 1_000_000)
    mark = "~" if cost.estimated else ""
    unknown = " (no price)" if cost.price_unknown else ""
    return f"{mark}{dollars}.{micros:06d}{unknown}"


# --- stats: the Prometheus text format, read with no dependency beyond the standard library ------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_SERVICE = "llmrelay.v1.LLMService"
_GATEWAY_METRICS = ("llmrelay_", "grpc_server_")
"""The prefixes of the gateway's metrics: a scrape has some from its start (llmrelay_store_available, ...)."""


_UNSHOWN_URL: Final = "the --metrics URL"
_URL_CUTS = re.compile(r"[:/?#@\[\]]")
"""Where urllib may cut a URL's text, and its errors quote a piece of it."""


def _masked(url: str) -> tuple[str, list[str]]:
    """`url` as a message may show it, and the secret pieces no message may hold. The userinfo is all up to the last @
    before any ? or # (a password may hold a / or an @): its password is shown as ***, or the whole userinfo where its
    user cannot be told apart. Where no split is sure to hide the password (an @ past a ? or #, no scheme), the URL is
    not shown at all."""
    if "@" not in url:
        return url, []
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if not sep or at < 0 or "@" in rest[end:]:
        secret = rest[: rest.rfind("@")] if sep and "@" in rest else url[: url.rfind("@")]
        return _UNSHOWN_URL, [secret, *filter(None, _URL_CUTS.split(secret))]
    userinfo, after = rest[:at], rest[at:]
    user, colon, password = userinfo.partition(":")
    if not colon and not _URL_CUTS.search(user):
        return url, []  # a user and no password
    if _URL_CUTS.search(user):  # http://a@b:c@host, http://a/b@host: no telling where the user ends
        user, password = "", userinfo
    shown = f"{scheme}://{user}{':' if user else ''}***{after}"
    return shown, [password, *filter(None, _URL_CUTS.split(password))]


def _said(text: str, url: str, shown: str, secrets: list[str]) -> str | None:
    """An error's text with `url` as shown, or None where it still holds a piece of the password."""
    text = text.replace(url, shown)
    return None if any(secret in text for secret in secrets) else text


SCRAPE_TIMEOUT_S: Final = 5.0
"""How long one step of a scrape (connecting, a read) may wait."""
SCRAPE_DEADLINE_S: Final = 10.0
"""How long a whole scrape may take: a server that trickles its answer is let go then (checked between reads, each
at most SCRAPE_TIMEOUT_S)."""
MAX_SCRAPE_BYTES: Final = 64 * 1024 * 1024
"""The most a scrape reads: a gateway's page is some hundred KiB; a server that never ends its answer is let go."""
_HINT: Final = " (is the gateway's server.metrics_listen set?)"
_NOT_METRICS: Final = ": is it the gateway's metrics_listen?"


class ScrapeError(Exception):
    """A scrape that failed, as one line; `hint` says what to check where it is the first (its URL may be wrong)."""

    def __init__(self, line: str, hint: str = "") -> None:
        super().__init__(line + hint)
        self.line = line


def _one_line(text: str) -> str:
    return " ".join(text.split())  # urllib's redirect loop error runs over three lines


def scrape(url: str) -> Samples:
    """The samples of one scrape of a /metrics endpoint; ScrapeError when there are none to be had."""
    # Never shown with a password in it (http://user:PASSWORD@host), which a terminal's scrollback or a CI log keeps.
    shown, secrets = _masked(url)
    named = f"--metrics (or LLMRELAY_METRICS) {shown!r}" if shown != _UNSHOWN_URL else f"{shown} (or LLMRELAY_METRICS)"
    scheme, has_scheme, _ = url.partition("://")
    if not has_scheme:  # 127.0.0.1:9464/metrics: urllib took "127.0.0.1" for a scheme, or had none
        raise ScrapeError(
            f"{named} is not a URL ({'empty' if not url else 'no scheme'}): add http://, e.g. {DEFAULT_METRICS}"
        )
    if scheme.lower() not in ("http", "https"):  # file:// would read a local file, ftp:// another server
        raise ScrapeError(f"{named} is not an http:// or https:// URL; e.g. {DEFAULT_METRICS}")
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    try:
        with urllib.request.urlopen(_scrape_request(url), timeout=SCRAPE_TIMEOUT_S) as response:
            body = _read_bounded(response, shown, deadline)
    except urllib.error.HTTPError as exc:  # a status other than 2xx, a redirect loop
        reason = _said(_one_line(f"HTTP {exc.code} {exc.reason}"), url, shown, secrets) or type(exc).__name__
        raise ScrapeError(f"cannot read {shown}: {reason}", _HINT) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = _said(_one_line(str(getattr(exc, "reason", exc))), url, shown, secrets) or type(exc).__name__
        raise ScrapeError(f"cannot read {shown}: {reason}", _HINT) from None
    except http.client.HTTPException as exc:  # something other than HTTP/1 answered: the gateway's gRPC port, say
        raise ScrapeError(f"{shown} did not answer in HTTP ({type(exc).__name__})", _NOT_METRICS) from None
    except ValueError as exc:  # no URL urllib can open ("http://[::1"): its error names no option
        said = _said(_one_line(str(exc)), url, shown, secrets) or type(exc).__name__
        raise ScrapeError(f"{named} is not a URL ({said}); e.g. {DEFAULT_METRICS}") from None
    try:
        samples = parse_metrics(body.decode())
    except ValueError:  # not UTF-8, or a line that is no sample: another HTTP server's page, say
        samples = {}
    # No sample of the gateway's own: another server's page (a JSON answer has no line that even looks like one),
    # which would show as an idle gateway.
    if not any(name.startswith(_GATEWAY_METRICS) for name, _ in samples):
        raise ScrapeError(f"{shown} did not answer in Prometheus's text format", _NOT_METRICS)
    return samples


def _scrape_request(url: str) -> urllib.request.Request:
    """The scrape's request. Credentials in the URL (a /metrics behind a proxy that asks for them) go as HTTP Basic
    authorization, as Prometheus's basic_auth sends them: urllib took them for part of the host name ("Name or service
    not known"). The userinfo ends at the last @ before any ? or #, as `_masked` reads it."""
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0:
        return urllib.request.Request(url)
    user, _, password = rest[:at].partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    request = urllib.request.Request(f"{scheme}://{rest[at + 1 :]}")
    request.add_unredirected_header("Authorization", f"Basic {token}")  # for this host, not where it redirects
    return request


def _read_bounded(response: http.client.HTTPResponse, shown: str, deadline: float) -> bytes:
    """The answer's body, read as it comes (read1: a trickle of bytes still meets the deadline) up to
    MAX_SCRAPE_BYTES and until `deadline` (time.monotonic())."""
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(65536):
        size += len(chunk)
        if size > MAX_SCRAPE_BYTES:
            raise ScrapeError(f"{shown} answered more than {MAX_SCRAPE_BYTES / 2**20:g} MiB", _NOT_METRICS)
        if time.monotonic() > deadline:
            raise ScrapeError(f"cannot read {shown}: no whole answer within {SCRAPE_DEADLINE_S:g} s")
        chunks.append(chunk)
    if response.length:  # read1 ends quietly where the connection closed before the Content-Length's end
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks)


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and (match := _SAMPLE.match(line)):
            name, labels, value = match.groups()
            pairs = frozenset((k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in _LABEL.findall(labels or ""))
            samples[(name, pairs)] = float(value)
    return samples


def _sum_by(samples: Samples, name: str, label: str, **match: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        pairs = dict(labels)
        if sample == name and all(pairs.get(k) == v for k, v in match.items()):
            totals[pairs.get(label, "")] += value
    return totals


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """As Prometheus's histogram_quantile: linear within the bucket the rank falls in."""
    bounds = sorted(buckets)
    if not bounds or (total := buckets[bounds[-1]]) <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def _buckets(samples: Samples, method: str) -> dict[float, float]:
    buckets: dict[float, float] = defaultdict(float)
    for (name, labels), value in samples.items():
        pairs = dict(labels)
        wanted = pairs.get("grpc_method") == method and pairs.get("grpc_service") == _SERVICE
        if name == "grpc_server_handling_seconds_bucket" and wanted:
            buckets[float(pairs["le"])] += value
    return buckets


WORKER_START: Final = "llmrelay_worker_start_time_seconds"
"""Behind --workers, when the supervisor last started each worker's process, by its `worker` label."""
_COUNTED_PARTS: Final = ("_total", "_bucket", "_count", "_sum")


def _started(samples: Samples, key: tuple[str, frozenset[tuple[str, str]]]) -> float | None:
    """When the process that counts the series began counting it: its worker's start behind a supervisor, else the
    series' own `_created` sample (a counter's or a histogram's); None where the scrape does not say."""
    name, labels = key
    worker = dict(labels).get("worker")
    if worker is not None:
        return samples.get((WORKER_START, frozenset({("worker", worker)})))
    for part in _COUNTED_PARTS:
        if name.endswith(part):
            created = name.removesuffix(part) + "_created"
            return samples.get((created, frozenset(pair for pair in labels if pair[0] != "le")))
    return None


def _increase(after: Samples, before: Samples) -> Samples:
    """Each series' growth between two scrapes, as Prometheus's rate() takes it. A series counted by a process that
    started since (the gateway restarted, or its worker), or lower than before, was reset and counts from zero."""
    grown: Samples = {}
    for key, value in after.items():
        was = before.get(key, 0.0)
        started, was_started = _started(after, key), _started(before, key)
        reset = value < was or (started is not None and was_started is not None and started != was_started)
        grown[key] = value if reset else value - was
    return grown


def _not_answering(samples: Samples) -> str:
    """Behind --workers, the workers started whose metrics are missing from the scrape (dead and not yet restarted,
    or hung), as the title says them: their calls are in no figure."""
    started = {dict(labels).get("worker", "") for name, labels in samples if name == WORKER_START}
    answering = {dict(labels).get("worker", "") for name, labels in samples if name != WORKER_START}
    silent = sorted(started - answering, key=lambda worker: (len(worker), worker))
    return f"worker{'s' if len(silent) > 1 else ''} {', '.join(silent)} not answering" if silent else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


FAILED_CODES: Final = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "ABORTED", "FAILED_PRECONDITION"}
)
"""The ends of calls that are the gateway's or its upstreams' doing (stats' "failed"), as the gateway's alerting rule
on them has it (LLMRelayErrorRatioHigh in deploy/prometheus/alerts.yaml). Every other end but OK and CANCELLED (the
caller left) is a refusal: the caller's mistakes, keys and limits, and upstreams' rate limits."""
_NO_FAULT: Final = frozenset({"OK", "CANCELLED"})


def _ends(grown: Samples) -> tuple[dict[str, float], dict[str, float]]:
    """Each method's calls failed and refused."""
    failed: dict[str, float] = defaultdict(float)
    refused: dict[str, float] = defaultdict(float)
    for (name, labels), value in grown.items():
        pairs = dict(labels)
        code = pairs.get("grpc_code")
        if name == "grpc_server_handled_total" and pairs.get("grpc_service") == _SERVICE and code not in _NO_FAULT:
            (failed if code in FAILED_CODES else refused)[pairs.get("grpc_method", "")] += value
    return failed, refused


def render_stats(after: Samples, before: Samples | None = None, seconds: float = 0.0) -> str:
    """What happened between two scrapes, per second; with no `before`, the totals since the gateway started (since
    each worker last started, behind a supervisor that restarted one)."""
    rate = before is not None and seconds > 0
    grown = _increase(after, before or {})
    per, digits, unit = (seconds, 1, "/s") if rate else (1.0, 0, "")

    def change(name: str, label: str, **match: str) -> dict[str, float]:
        return _sum_by(grown, name, label, **match)

    def number(value: float, width: int = 10) -> str:
        return f"{value / per:>{width}.{digits}f}"

    calls = change("grpc_server_handled_total", "grpc_method", grpc_service=_SERVICE)
    failed, refused = _ends(grown)
    # A restarted worker's counters start again from zero: what it counted before is in no total.
    restarts = sum(value for (name, _), value in after.items() if name == "llmrelay_worker_restarts_total")
    silent = _not_answering(after)
    if rate:
        title = f"over the last {seconds:.1f} s" + (f" ({silent})" if silent else "")
    elif restarts:
        title = f"since each worker last started ({restarts:.0f} restarted{'; ' + silent if silent else ''})"
    else:
        title = "since the gateway started" + (f" ({silent})" if silent else "")
    columns = (f"{name + unit:>10}" for name in ("calls", "failed", "refused"))
    lines = [f"llmrelay {title}", f"{'method':<16}{''.join(columns)}{'p50':>10}{'p99':>10}"]
    for method in sorted(calls):
        buckets = _buckets(grown, method)
        p50, p99 = _duration(_quantile(0.5, buckets)), _duration(_quantile(0.99, buckets))
        counts = (number(of.get(method, 0.0)) for of in (calls, failed, refused))
        lines.append(f"{method:<16}{''.join(counts)}{p50:>10}{p99:>10}")
    tokens = "llmrelay_tokens_total"
    prompt, completion = change(tokens, "backend", kind="prompt"), change(tokens, "backend", kind="completion")
    lines.append(f"{'backend':<16}{'tokens' + unit:>10}{'prompt':>10}{'completion':>12}")
    # The other kinds (cached, reasoning) are parts of these two: the total is their sum, not every kind's.
    for backend in sorted(change(tokens, "backend")):
        prompted, completed = prompt.get(backend, 0.0), completion.get(backend, 0.0)
        lines.append(f"{backend:<16}{number(prompted + completed)}{number(prompted)}{number(completed, 12)}")
    # A gauge: summed over its series (one a worker, behind a supervisor).
    open_streams = sum(value for (name, _), value in after.items() if name == "llmrelay_open_streams")
    lines.append(f"open streams: {open_streams:.0f}")
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> None:
    try:
        before, at = scrape(args.metrics), time.monotonic()
    except ScrapeError as exc:  # the first scrape: the URL is likely wrong, and a live view would show nothing
        sys.exit(_shown(f"llmrelay: {exc}", sys.stderr))
    if args.once:
        print(render_stats(before))
        return
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    while True:
        time.sleep(args.interval)
        try:
            after, now = scrape(args.metrics), time.monotonic()
        except ScrapeError as exc:  # the gateway restarting, say: the next refresh shows it again
            when = time.strftime("%H:%M:%S")
            print(clear, end="")
            _print(f"llmrelay: {when} {exc.line}; trying again every {args.interval:g} s", flush=True)
            continue
        # After failed refreshes, the rates are over the whole time since the last scrape that answered.
        print(clear + render_stats(after, before, now - at), flush=True)
        before, at = after, now


if __name__ == "__main__":
    main()
