"""The `llmrelay` command against real gateways: the caller key from the environment, a client certificate for mutual
TLS, the one-line errors of common mistakes, and a quiet end when the reader of its output goes away."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
from asyncio.subprocess import PIPE
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Final, cast

import grpc
import pytest
from certs import Authority
from google.rpc.error_details_pb2 import BadRequest
from harness import BIN
from llmrelay import Client, LLMRelayError, cli
from llmrelay import v1 as pb
from llmrelay._errors import ErrorDetails
from llmrelay.cli import KEY_ENV, main
from llmrelay_server.app import Gateway
from support import GatewayFactory, page_served, two_backends
from upstream import FakeUpstream

KEY = "llmr-cli-0123456789abcdefghijklmnop"
EMPTY_TABLE = "backend  model  caller  requests  prompt  completion  total  cost (USD)"
"""What `llmrelay usage` prints when no usage matches."""


async def llmrelay(
    *args: str | bytes, env: dict[str, str] | None = None, stdin: bytes | None = None, pass_fds: Sequence[int] = ()
) -> tuple[int, str, str]:
    """Runs the command (`stdin` its standard input, else none; `pass_fds` open in it); its exit status, stdout and
    stderr. Without `env`, this environment less any caller key."""
    environment = env if env is not None else {k: v for k, v in os.environ.items() if k != KEY_ENV}
    command = await asyncio.create_subprocess_exec(
        BIN / "llmrelay", *args, stdin=PIPE, stdout=PIPE, stderr=PIPE, env=environment, pass_fds=pass_fds
    )
    out, err = await asyncio.wait_for(command.communicate(stdin or b""), 30)
    assert command.returncode is not None
    return command.returncode, out.decode(), err.decode()


@pytest.fixture
async def keyed(gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream) -> Gateway:
    entry = f'{{name: cli-user, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}"}}'
    return await gateway_factory(two_backends(primary, local) + f"auth:\n  keys:\n    - {entry}\n")


async def test_the_caller_key_comes_from_the_environment(keyed: Gateway) -> None:
    target = f"127.0.0.1:{keyed.port}"
    status, _, err = await llmrelay("--target", target, "complete", "hi")
    assert status == 1 and "UNAUTHENTICATED" in err and f"reads the key from {KEY_ENV}" in err
    # The id of the call's line in the gateway's log, for whoever runs it.
    assert re.search(r"^  request id [0-9a-f]{32} \(in the gateway's log\)$", err, re.MULTILINE), err

    with_key = {**os.environ, KEY_ENV: KEY}
    status, out, err = await llmrelay("--target", target, "complete", "hi", env=with_key)
    assert (status, out) == (0, "echo: hi\n"), err
    status, out, err = await llmrelay("--target", target, "usage", env=with_key)
    assert status == 0 and re.search(r"^openai +gpt-test +cli-user +1 ", out, re.MULTILINE), out + err
    # The model by its upstream's name, or as `complete --model` takes it: backend/model.
    for model in ("gpt-test", "openai/gpt-test"):
        status, out, err = await llmrelay("--target", target, "usage", "--model", model, env=with_key)
        assert status == 0 and re.search(r"^openai +gpt-test +cli-user +1 ", out, re.MULTILINE), out + err
    status, out, err = await llmrelay("--target", target, "usage", "--model", "ollama/gpt-test", env=with_key)
    assert (status, out.splitlines()) == (0, [EMPTY_TABLE])

    # --key-env names another variable; an unknown key is refused, and shown nowhere.
    elsewhere = {**os.environ, KEY_ENV: "", "TEAM_KEY": KEY.replace("cli", "bad")}
    status, _, err = await llmrelay("--target", target, "--key-env", "TEAM_KEY", "tokens", "hi", env=elsewhere)
    # The key itself, not "bad" alone: a request id's hex has held "bad" (1 run in about 150).
    assert status == 1 and "UNAUTHENTICATED" in err and "TEAM_KEY" in err and elsewhere["TEAM_KEY"] not in err
    status, _, err = await llmrelay("--target", target, "--key-env", "NO_SUCH_KEY", "health")
    assert (status, err) == (1, "llmrelay: --key-env NO_SUCH_KEY: the variable is not set\n")
    # Set, to nothing: said so, not "not set", which sent whoever read it looking for a missing export.
    empty = {**elsewhere, "TEAM_KEY": ""}
    status, _, err = await llmrelay("--target", target, "--key-env", "TEAM_KEY", "health", env=empty)
    assert (status, err) == (1, "llmrelay: --key-env TEAM_KEY: the variable is empty\n")


async def test_usage_takes_a_time_window_and_lines_up_wide_names(keyed: Gateway, primary: FakeUpstream) -> None:
    target, with_key = f"127.0.0.1:{keyed.port}", {**os.environ, KEY_ENV: KEY}
    primary.inject({"served_model": "模型-wide"})  # two columns a character, in a terminal
    status, _, err = await llmrelay("--target", target, "complete", "hi", env=with_key)
    assert status == 0, err

    async def usage(*window: str) -> list[str]:
        status, out, err = await llmrelay("--target", target, "usage", *window, env=with_key)
        assert status == 0, err
        return out.splitlines()

    header, row, *footnotes = await usage("--since", "10m")
    # The caller's column starts at the same column of a terminal in both lines: the model's name takes two more
    # columns than it has characters.
    assert row.startswith("openai   模型-wide  cli-user  1 "), row
    assert header.index("caller") == row.index("cli-user") + 2
    assert footnotes and footnotes[0].startswith("~ estimated")  # the fake upstream's model has no price
    assert await usage("--since", "2000-01-01", "--until", "2000-01-02T00:00+01:00") == [EMPTY_TABLE]
    assert await usage("--until", "1h") == [EMPTY_TABLE]
    in_time = await usage("--since", "1d", "--until", (datetime.now(UTC) + timedelta(minutes=1)).isoformat())
    assert in_time[:2] == [header, row]

    # A window with its bounds swapped, said in the options' words (the gateway's named end_time and start_time), and
    # one the command cannot read.
    status, _, err = await llmrelay("--target", target, "usage", "--since", "1m", "--until", "1h", env=with_key)
    assert (status, err) == (1, "llmrelay usage: --until is before --since: give the earlier time to --since\n")
    status, _, err = await llmrelay("--target", target, "usage", "--since", "yesterday", env=with_key)
    assert status == 2 and err.endswith(
        "argument --since: 'yesterday' is neither a time ago (30m, 24h, 7d) nor an ISO"
        " 8601 date or time (2026-11-30, 2026-11-30T09:00)\n"
    ), err


async def test_a_client_certificate_for_mutual_tls(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, tmp_path: Path
) -> None:
    servers, clients = Authority("server CA"), Authority("client CA")
    servers.server().write(tmp_path / "server.pem", tmp_path / "server.key")
    clients.client().write(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "ca.pem").write_bytes(servers.cert)
    (tmp_path / "clients.pem").write_bytes(clients.cert)
    files = {name: str(tmp_path / name) for name in ("server.pem", "server.key", "clients.pem")}
    tls = f'tls: {{cert_file: "{files["server.pem"]}", key_file: "{files["server.key"]}"'
    gateway = await gateway_factory(
        two_backends(primary, local), server=f'{tls}, client_ca_file: "{files["clients.pem"]}"}}'
    )
    cli = ["--target", f"localhost:{gateway.port}", "--timeout", "10", "--ca-file", str(tmp_path / "ca.pem")]

    certificate = ["--cert", str(tmp_path / "client.pem"), "--cert-key", str(tmp_path / "client.key")]
    status, out, err = await llmrelay(*cli, *certificate, "health")
    assert status == 0 and out.startswith("serving: yes"), err
    # Pipes, as `--cert <(vault read ...)` gives them: their content can be read once.
    piped = []
    for name in ("client.pem", "client.key"):
        read_end, write_end = os.pipe()
        os.write(write_end, (tmp_path / name).read_bytes())
        os.close(write_end)
        piped.append(read_end)
    try:
        status, out, err = await llmrelay(
            *cli, "--cert", f"/dev/fd/{piped[0]}", "--cert-key", f"/dev/fd/{piped[1]}", "health", pass_fds=piped
        )
    finally:
        for fd in piped:
            os.close(fd)
    assert status == 0 and out.startswith("serving: yes"), err
    status, _, err = await llmrelay(*cli, "health")
    assert status == 1 and "llmrelay: UNAVAILABLE" in err and "this client gave none" in err, err
    assert "the llmrelay command takes --cert and --cert-key" in err
    status, _, err = await llmrelay(*cli, "--cert", str(tmp_path / "client.pem"), "health")
    assert (status, err) == (1, "llmrelay: a client certificate needs both --cert and --cert-key\n")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"--ca-file": "client.key"}, "client.key: no PEM certificate in it"),
        ({"--cert": "client.key", "--cert-key": "client.pem"}, "not a PEM certificate and its key (are they swapped?)"),
        ({"--cert": "client.pem", "--cert-key": "other.key"}, "the key is not the certificate's"),
    ],
    ids=["key-as-ca", "swapped", "another-key"],
)
def test_certificate_files_tls_cannot_use_are_one_line_before_any_call(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    """gRPC said only "Failed to create security handshaker" of each, as an UNAVAILABLE call."""
    authority = Authority("client CA")
    authority.client().write(tmp_path / "client.pem", tmp_path / "client.key")
    authority.client("another").write(tmp_path / "other.pem", tmp_path / "other.key")
    args = [str(part) for option, name in files.items() for part in (option, tmp_path / name)]
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", *args, "health"])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ca-file", "nope.pem", "health"], "llmrelay: --ca-file nope.pem: No such file or directory"),
        (["--no-tls", "--ca-file", __file__, "health"], "llmrelay: --no-tls with --ca-file: leave out --no-tls"),
        (["--cert-key", "nope.key", "--cert", __file__, "health"], "llmrelay: --cert-key nope.key: No such file"),
    ],
    ids=["missing-ca", "no-tls-with-ca", "missing-key"],
)
def test_a_mistake_in_the_options_is_one_line(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", *args])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_an_empty_target_is_a_mistake_in_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    # gRPC printed its own error lines about a DNS URI, then UNKNOWN.
    with pytest.raises(SystemExit) as caught:
        main(["--target", "", "health"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "llmrelay: error: argument --target: an empty target: give HOST:PORT, or leave --target out for the default"
    )


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_a_url_for_a_target_is_a_mistake_in_the_options(
    given: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Client refuses it; the command let it through, and its ValueError ended it with a traceback. The
    variable's mistake is the variable's, not --target's, which nobody typed."""
    url = "https://admin:S3CR3T@gw.example:443"
    monkeypatch.setenv("LLMRELAY_TARGET", url if given == "variable" else "")
    with pytest.raises(SystemExit) as caught:
        main([*(["--target", url] if given == "flag" else []), "health"])
    problem = "a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL"
    if given == "flag":
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"llmrelay: error: argument --target: {problem}"
    else:
        err = str(caught.value)
        assert err == f"llmrelay: LLMRELAY_TARGET: {problem}"
        # stats calls no gateway: the variable is no concern of its.
        assert cli._parser().parse_args(["stats", "--once"]).once
    assert "S3CR3T" not in err


def test_an_empty_key_variable_name_is_a_mistake_in_the_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--key-env "$BOT_KEY_VAR"` with the variable unset took the key in LLMRELAY_API_KEY, a person's own perhaps,
    and billed the call to it without a word."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", "--key-env", "", "health"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "llmrelay: error: argument --key-env: an empty name (an unset variable?): name the variable, or leave"
        f" --key-env out for {KEY_ENV}"
    )


def test_an_enum_value_of_a_newer_gateway_is_shown_as_its_number() -> None:
    """Protobuf keeps a value this version does not know, and the contract may add some: the summary after an answer
    failed with a KeyError, `health` with a ValueError, after printing what they had."""
    usage = pb.Usage(prompt_tokens=3, completion_tokens=2)
    assert cli._summary("openai", "gpt-test", pb.FINISH_REASON_TOOL_CALLS, usage) == (
        "[openai/gpt-test, tool_calls, 3+2 tokens]"
    )
    assert cli._summary("openai", "gpt-test", cast(Any, 99), usage) == "[openai/gpt-test, unknown (99), 3+2 tokens]"


_INTERRUPTED_AS_THE_CLI_LOADS = """
import importlib.abc, sys

class Interrupted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llmrelay.cli":
            raise KeyboardInterrupt  # Ctrl-C while it loads, the SDK and grpc with it (most of a short command's time)

sys.meta_path.insert(0, Interrupted())
from llmrelay_command import main
main()
"""


def test_ctrl_c_as_the_command_loads_ends_quietly() -> None:
    """It printed a KeyboardInterrupt's traceback: the command's own handling of Ctrl-C was not loaded yet."""
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AS_THE_CLI_LOADS], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (130, "")


_CTRL_C_AS_MODULE_LOADS = """
import os, sys

class Interrupted:
    def find_spec(self, name, path, target=None):
        if name == {module!r} and {within!r} in sys.modules:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), 2)  # SIGINT, a real Ctrl-C, as `within` loads `module`
        return None

sys.meta_path.insert(0, Interrupted())
sys.argv = ["llmrelay", "--target", "127.0.0.1:9", "tokens", "hi"]
from llmrelay_command import main
main()
"""


@pytest.mark.parametrize(
    ("module", "within"), [("zlib", "grpc._cython"), ("signal", "llmrelay_command")], ids=["in-grpc", "first-import"]
)
def test_a_real_ctrl_c_as_the_command_loads_ends_quietly(module: str, within: str) -> None:
    """grpc's compiled core made an ImportError ("Failed to import 'zlib.decompress'") of the KeyboardInterrupt of a
    Ctrl-C as it loaded, and the command's `import signal` ran before anything handled Ctrl-C: each a traceback, status
    1. Run as the console script runs it."""
    script = _CTRL_C_AS_MODULE_LOADS.format(module=module, within=within)
    done = subprocess.run([BIN / "python", "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "")


async def test_ctrl_c_while_reading_standard_input_ends_quietly() -> None:
    """`llmrelay complete -` with no pipe waits on the terminal; Ctrl-C there printed a KeyboardInterrupt's
    traceback (the text is read as the options are, before the call's own handling of Ctrl-C)."""
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay", "--target", "127.0.0.1:9", "complete", "-", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    wchan = Path(f"/proc/{process.pid}/wchan")
    for _ in range(300):  # until it waits in the read (the kernel's pipe_read, or anon_pipe_read), not in its imports
        if "pipe_read" in (waiting := wchan.read_text()):  # noqa: ASYNC240 (a file of the kernel's memory)
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"llmrelay never read standard input: waiting in {waiting!r}")
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out, err) == (130, b"", b"")


@pytest.mark.parametrize("interval", ["-1", "0", "0.05", "nan", "inf", "soon", "86401", "1e300"])
def test_stats_takes_an_interval_from_a_tenth_of_a_second_to_a_day(
    interval: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["stats", "--metrics", "http://127.0.0.1:9/metrics", "--interval", interval])
    assert caught.value.code == 2
    said = capsys.readouterr().err
    assert said.endswith(f"argument --interval: '{interval}' is not a number of seconds from 0.1 to 86400\n"), said


@pytest.fixture
def metrics_page() -> Iterator[str]:
    """The URL of a /metrics page with a sample of the gateway's: enough for `llmrelay stats` to go on to sample."""
    with page_served(b"llmrelay_store_available 1\n") as url:
        yield url


async def test_stats_past_a_day_between_samples_is_a_mistake_in_the_options(metrics_page: str) -> None:
    # 1e300 was taken, and after the first scrape time.sleep ended the command in a traceback (OverflowError).
    status, out, err = await llmrelay("stats", "--metrics", metrics_page, "--interval", "1e300")
    assert (status, out) == (2, ""), err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        "llmrelay stats: error: argument --interval: '1e300' is not a number of seconds from 0.1 to 86400"
    ), err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A / in the password: the mask stopped at it, and the URL was shown whole.
        ("http://admin:S3/CR3T@127.0.0.1:9/metrics", "http://admin:***@127.0.0.1:9/metrics"),
        # An @ in the password: the mask stopped at the first, and showed the rest of the password.
        ("http://admin:S3@CR3T@127.0.0.1:9/metrics", "http://admin:***@127.0.0.1:9/metrics"),
        ("http://admin:S3@C/R3T@127.0.0.1:9/metrics", "http://admin:***@127.0.0.1:9/metrics"),
        # No telling where the user ends (all of the userinfo masked), or where the password does (not shown at all).
        ("http://admin@S3:CR3T@127.0.0.1:9/metrics", "http://***@127.0.0.1:9/metrics"),
        ("http://admin:S3?CR3T@127.0.0.1:9/metrics", "the --metrics URL"),
        ("http://admin:S3#CR3T@127.0.0.1:9/metrics", "the --metrics URL"),
        ("admin:S3CR3T@127.0.0.1:9/metrics", "the --metrics URL"),
        ("http://admin:S3/CR3T@[::1/metrics", "http://admin:***@[::1/metrics"),
    ],
    ids=["slash", "at", "at-and-slash", "at-in-user", "question-mark", "hash", "no-scheme", "slash-no-url"],
)
async def test_stats_never_shows_any_of_the_password(url: str, shown: str) -> None:
    status, out, err = await llmrelay("stats", "--once", "--metrics", url)
    assert (status, out) == (1, ""), err
    assert "Traceback" not in err, err
    (line,) = err.splitlines()
    assert line.startswith("llmrelay: ") and shown in line, line
    for piece in ("S3", "CR3T", "C/R", "R3T"):
        assert piece not in err, err


@pytest.mark.parametrize(
    "args",
    [
        ["complete", "hi", "--max-tokens", "99999999999"],
        ["stream", "hi", "--max-tokens", "0"],
        ["embed", "x", "--dimensions", "2147483648"],
        ["embed", "x", "--dimensions", "many"],
    ],
    ids=["max-tokens-past-int32", "no-tokens", "dimensions-past-int32", "dimensions-not-a-number"],
)
def test_a_count_the_contract_cannot_hold_is_a_mistake_in_the_options(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Past int32, the request could not be built: a traceback ending "ValueError: Value out of range".
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", *args])
    assert caught.value.code == 2
    assert capsys.readouterr().err.endswith(f"'{args[-1]}' is not a whole number from 1 to 2147483647\n")


async def test_a_timeout_no_call_could_meet_is_a_mistake_in_the_options(gateway: Gateway) -> None:
    target = f"127.0.0.1:{gateway.port}"
    # Each of these once reached the gateway as a deadline already past: DEADLINE_EXCEEDED and status 1, as if the
    # gateway had been too slow.
    above_0 = "is not a number of seconds above 0"
    for timeout, why in (
        *((t, above_0) for t in ("0", "-1", "nan", "inf", "soon")),
        ("1e10", "is more seconds"),
        ("1e300", "is more seconds"),
    ):
        status, out, err = await llmrelay("--target", target, "--timeout", timeout, "health")
        assert (status, out) == (2, ""), err
        assert f"argument --timeout: '{timeout}' {why}" in err, err
    status, out, err = await llmrelay("--target", target, "--timeout", "1e9", "health")
    assert status == 0 and out.startswith("serving: yes"), err


async def test_the_connection_options_may_come_after_the_command(gateway: Gateway, primary: FakeUpstream) -> None:
    """`llmrelay complete hi --target HOST:PORT`, as people type it, was "unrecognized arguments: --target". After
    the command an option wins over the same one before it; one left out there keeps the one before."""
    target = f"127.0.0.1:{gateway.port}"
    status, out, err = await llmrelay("complete", "hi", "--target", target, "--timeout", "30")
    assert (status, out) == (0, "echo: hi\n"), err
    status, out, err = await llmrelay("--target", "127.0.0.1:9", "tokens", "two words", "--target", target)
    assert status == 0 and out.split()[0].isdigit(), err
    status, out, err = await llmrelay("--target", target, "--timeout", "0", "health", "--probe")
    assert status == 2 and "argument --timeout: '0'" in err, err
    status, out, err = await llmrelay("--target", target, "health", "--timeout", "soon")
    assert status == 2 and "argument --timeout: 'soon'" in err, err
    status, out, err = await llmrelay("--target", target, "health", "--no-tls")
    assert status == 0 and out.startswith("serving: yes"), err


@pytest.mark.parametrize("where", ["before", "after"])
async def test_spaces_around_the_target_are_not_part_of_it(gateway: Gateway, where: str) -> None:
    """As in LLMRELAY_TARGET: `--target " HOST:PORT"` (a copy-paste, a quoted variable) took " 127.0.0.1" for a host
    name, not loopback, so TLS, and failed UNAVAILABLE, "Misformatted domain name", its hint blaming TLS."""
    target = ["--target", f" 127.0.0.1:{gateway.port} "]
    command = [*target, "health"] if where == "before" else ["health", *target]
    status, out, err = await llmrelay(*command)
    assert status == 0 and out.startswith("serving: yes"), err


async def test_each_field_violation_is_said_once(gateway: Gateway, primary: FakeUpstream) -> None:
    """The gateway's text of an invalid request is its violations joined by "; ", and the command said each again
    on a line of its own: every one twice."""
    args = ("--target", f"127.0.0.1:{gateway.port}", "complete", "hi", "--temperature", "5", "--model", "")
    status, out, err = await llmrelay(*args)
    assert (status, out) == (1, ""), err
    first, *rest = err.splitlines()
    assert first.startswith("llmrelay: INVALID_ARGUMENT (INVALID_REQUEST): model: must be 1 to 256 characters"), err
    assert "; options.temperature: must be between 0 and 2" in first, err
    assert len(rest) == 1 and rest[0].startswith("  request id "), err
    assert primary.chat_requests == []


def test_field_violations_the_text_does_not_hold_are_said_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another gateway's text (or one cut short) may not hold them all: those it does not, each on a line of its own."""
    said = [("model", "unknown"), ("options.temperature", "must be between 0 and 2")]
    bad_request = BadRequest(field_violations=[BadRequest.FieldViolation(field=f, description=d) for f, d in said])
    error = LLMRelayError(grpc.StatusCode.INVALID_ARGUMENT, "model: unknown", ErrorDetails(bad_request=bad_request))

    def refused(client: Client, args: object) -> None:
        raise error

    monkeypatch.setattr(cli, "_complete", refused)
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", "complete", "hi"])
    unheld = "\n  options.temperature: must be between 0 and 2"  # the text holds the model's
    assert str(caught.value) == f"llmrelay: INVALID_ARGUMENT: model: unknown{unheld}"


async def test_version_is_the_installed_packages() -> None:
    """It said "the following arguments are required: COMMAND", status 2."""
    assert await llmrelay("--version") == (0, f"llmrelay {metadata.version('llmrelay')}\n", "")


async def test_stats_pointed_at_the_grpc_port_says_so(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{gateway.port}/metrics"
    with pytest.raises(SystemExit) as caught:
        await asyncio.to_thread(main, ["stats", "--once", "--metrics", url])
    assert (
        str(caught.value)
        == f"llmrelay: {url} did not answer in HTTP (BadStatusLine): is it the gateway's metrics_listen?"
    )


async def test_tls_to_a_gateway_without_it_is_the_commands_one_line(gateway: Gateway) -> None:
    """gRPC's core printed a line of its own ("I1203 ... Handshake failed ...") before the command's error: it reads
    GRPC_VERBOSITY as it is imported, before any code of the package could set it."""
    environment = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, "GRPC_VERBOSITY")}
    status, out, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", "--tls", "health", env=environment)
    assert status == 1 and not out
    assert err.startswith("llmrelay: UNAVAILABLE: ") and "Tls handshake failed" in err and err.count("\n") == 1, err


async def at_a_terminal(*args: str) -> tuple[int, str]:
    """Runs the command with its stdout and stderr a terminal (a pseudo-terminal's); its exit status and what the
    terminal was sent, its line ends as written."""
    controller, terminal = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(BIN / "llmrelay", *args, stdout=terminal, stderr=terminal)
    finally:
        os.close(terminal)
    status = await asyncio.wait_for(process.wait(), 30)
    sent = b""
    with contextlib.suppress(OSError):  # EIO once the terminal is closed and read to its end
        while chunk := os.read(controller, 65536):
            sent += chunk
    os.close(controller)
    return status, sent.decode().replace("\r\n", "\n")  # the terminal's own output processing undone


async def test_control_characters_reach_a_terminal_escaped(gateway: Gateway, primary: FakeUpstream) -> None:
    target = f"127.0.0.1:{gateway.port}"
    prompt = "\x1b]0;owned\x07\x1b[2Jhi\x9b"  # a window title, a cleared screen, a C1 CSI
    # The answer (the fake upstream echoes the prompt) once went to the terminal as it was.
    for command in ("complete", "stream"):
        status, shown = await at_a_terminal("--target", target, command, prompt)
        assert status == 0 and shown.startswith("echo: \\x1b]0;owned\\x07\\x1b[2Jhi\\x9b\n"), shown
    # So did an upstream's error, on stderr.
    primary.inject({"status": 400, "body": "\x1b[31mboom\x1b[0m"})
    status, shown = await at_a_terminal("--target", target, "complete", "hi")
    assert status == 1 and "(UPSTREAM_REJECTED): " in shown and "HTTP 400: \\x1b[31mboom\\x1b[0m\n" in shown, shown
    # To a pipe, the answer is as the model wrote it.
    status, out, err = await llmrelay("--target", target, "stream", prompt)
    assert (status, out) == (0, f"echo: {prompt}\n"), err
    # A model's name an upstream wrote with C1 control characters, which the ledger keeps: usage's table wrote it as
    # it was, and lined up by its escaped width.
    primary.inject({"served_model": "tiny\x9b2J\x9d0;owned\x9c"})
    await at_a_terminal("--target", target, "complete", "hi")
    status, shown = await at_a_terminal("--target", target, "usage")
    rows = shown.splitlines()
    assert status == 0 and any(" tiny\\x9b2J\\x9d0;owned\\x9c " in row for row in rows), shown
    assert "\x9b" not in shown
    header, row = rows[0], next(row for row in rows if "owned" in row)
    assert row.index("owned") + len("owned\\x9c  ") <= header.index("caller"), "the columns line up as shown"


async def test_a_closed_stdout_is_said_before_the_call(gateway: Gateway, primary: FakeUpstream) -> None:
    # As a shell starts it for `llmrelay complete hi >&-`: no file descriptor 1 at all.
    command = ['exec "$0" "$@" >&-', str(BIN / "llmrelay"), "--target", f"127.0.0.1:{gateway.port}", "complete", "hi"]
    process = await asyncio.create_subprocess_exec("/bin/sh", "-c", *command, stderr=PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, err.decode()) == (1, "llmrelay: standard output is closed: nowhere to write to\n")
    assert primary.chat_requests == []


async def test_a_read_only_stdout_is_said_before_the_call(gateway: Gateway, primary: FakeUpstream) -> None:
    """`llmrelay complete hi 1</dev/null`: the call was made, tokens spent, then a traceback (OSError EBADF)."""
    for command in (["complete", "hi"], ["--version"], ["--help"]):  # these two printed before the check: EBADF
        status, err = await writing_to(os.open(os.devnull, os.O_RDONLY), gateway, command)
        assert (status, err) == (1, "llmrelay: standard output is open for reading only: nowhere to write to\n")
    assert primary.chat_requests == []


async def test_a_stream_broken_midway_ends_the_line_it_printed(gateway: Gateway, primary: FakeUpstream) -> None:
    primary.inject({"stream_cut_after": 3})  # the role, "echo:", " one", then the connection closes
    status, out, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", "stream", "one two three")
    # The error starts a line of its own in a terminal: it once followed "echo: one" on the same line.
    assert (status, out) == (1, "echo: one\n"), err
    assert err.startswith("llmrelay: ABORTED (STREAM_INTERRUPTED): "), err

    # Ctrl-C after the first words: status 130, and the line ended too.
    primary.inject({"trickle_s": 5.0})
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay", "--target", f"127.0.0.1:{gateway.port}", "stream", "one two", stdout=PIPE, stderr=PIPE
    )
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readexactly(len("echo:")), 30)
    process.send_signal(signal.SIGINT)
    rest, errors = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, (first + rest).decode(), errors) == (130, "echo:\n", b"")


@pytest.mark.parametrize("stderr", ["2>&-", "2</dev/null"], ids=["closed", "read-only"])
@pytest.mark.parametrize("command", [["complete", "hi"], ["stream", "hi"]])
async def test_a_closed_stderr_keeps_the_summary_off_stdout(gateway: Gateway, command: list[str], stderr: str) -> None:
    # `llmrelay complete hi 2>&-`: the summary line ("[openai/gpt-test, stop, ...]") once took stdout's place. With
    # `2</dev/null` (open for reading only), writing it failed after the answer, and the command with it, status 1.
    shell = [f'exec "$0" "$@" {stderr}', str(BIN / "llmrelay"), "--target", f"127.0.0.1:{gateway.port}", *command]
    process = await asyncio.create_subprocess_exec("/bin/sh", "-c", *shell, stdout=PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out.decode()) == (0, "echo: hi\n")


async def writing_to(stdout: int, gateway: Gateway, command: list[str]) -> tuple[int | None, str]:
    """The command's exit status and standard error, its standard output `stdout` (a descriptor, closed here)."""
    try:
        process = await asyncio.create_subprocess_exec(
            BIN / "llmrelay", "--target", f"127.0.0.1:{gateway.port}", *command, stdout=stdout, stderr=PIPE
        )
    finally:
        os.close(stdout)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, err.decode()


@pytest.mark.parametrize("command", [["stream", "one two three"], ["health"]], ids=["stream", "health"])
async def test_a_reader_gone_ends_the_command_quietly(gateway: Gateway, command: list[str]) -> None:
    # `llmrelay ... | head -c 10` once head has exited: a pipe with no reader, so that every write fails.
    reader, writer = os.pipe()
    os.close(reader)
    assert await writing_to(writer, gateway, command) == (128 + signal.SIGPIPE, "")


@pytest.mark.parametrize("command", [["complete", "hi"], ["stream", "one two three"], ["health"]])
async def test_output_that_cannot_be_written_ends_the_command_in_one_line(gateway: Gateway, command: list[str]) -> None:
    """`> /dev/full` (a full disk): it ended with an OSError's traceback."""
    status, err = await writing_to(os.open("/dev/full", os.O_WRONLY), gateway, command)
    assert (status, err.splitlines()[-1:]) == (1, ["llmrelay: cannot write its output: No space left on device"])
    assert "Traceback" not in err


async def test_an_answer_a_terminal_cannot_encode_is_written_escaped(gateway: Gateway) -> None:
    """In an ASCII locale (or PYTHONIOENCODING=ascii) a CJK answer ended the command with a UnicodeEncodeError's
    traceback, the rest of the answer lost."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    env.pop(KEY_ENV, None)
    status, out, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", "complete", "模型 ok", env=env)
    assert (status, out) == (0, "echo: \\u6a21\\u578b ok\n")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "stdin", "status", "said"),
    [
        (["complete", "-"], b"two lines\nfrom a pipe", 0, "echo: two lines\nfrom a pipe\n"),
        (["stream", "--model", "ollama/tiny", "-"], "\ufeffZürich".encode(), 0, "echo: Zürich\n"),
        (["tokens", "-"], b"one two three", 0, "3 tokens"),
        (["complete", "-"], b" \n", 2, "argument prompt: - reads standard input, which was empty"),
        (["complete", "-"], b"\xff\xfe", 2, "argument prompt: - reads standard input, which is not UTF-8 text"),
    ],
    ids=["complete", "stream, a byte-order mark", "tokens", "empty", "not UTF-8"],
)
async def test_a_dash_reads_the_text_from_standard_input(
    gateway: Gateway, command: list[str], stdin: bytes, status: int, said: str
) -> None:
    """`git diff | llmrelay complete -`, as `cat -` reads: "-" was sent as the prompt itself."""
    code, out, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", *command, stdin=stdin)
    assert code == status, err
    assert said in (out + err if status == 0 else err), (out, err)
    assert "Traceback" not in err


NOT_UTF8: Final = "caf\udce9"
"""The bytes caf\\xe9 (a Latin-1 "café") as Python reads them from a UTF-8 command line (surrogateescape)."""
NOT_UTF8_SAID: Final = "not valid UTF-8 text (the byte 0xe9 at character 4)"


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["complete", NOT_UTF8], "prompt"),
        (["stream", "hi", "--model", NOT_UTF8], "--model"),
        (["complete", "hi", "--system", NOT_UTF8], "--system"),
        (["tokens", NOT_UTF8], "text"),
        (["tokens", "hi", "--model", NOT_UTF8], "--model"),
        (["embed", "hi", NOT_UTF8], "text"),
        (["embed", "hi", "--model", NOT_UTF8], "--model"),
        (["usage", "--caller", NOT_UTF8], "--caller"),
        (["usage", "--backend", NOT_UTF8], "--backend"),
        (["usage", "--model", NOT_UTF8], "--model"),
        (["--target", f"{NOT_UTF8}:1", "health"], "--target"),
    ],
)
def test_text_that_is_not_utf8_is_a_mistake_in_the_options(
    args: list[str], argument: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SDK raised "TypeError: function takes exactly 5 arguments (1 given)" (a UnicodeEncodeError for usage's
    options, gRPC's own for the target), as a traceback, status 1."""
    with pytest.raises(SystemExit) as caught:
        main(["--target", "127.0.0.1:9", *args])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: argument {argument}: {NOT_UTF8_SAID}")


@pytest.mark.parametrize(
    ("command", "argument"),
    [(["complete", b"caf\xe9"], "prompt"), (["usage", "--caller", b"caf\xe9"], "--caller")],
    ids=["complete", "usage"],
)
async def test_bytes_that_are_not_utf8_on_the_command_line_are_one_line(
    gateway: Gateway, command: list[str | bytes], argument: str
) -> None:
    """As typed in a shell with a UTF-8 locale, `llmrelay complete $'caf\\xe9'`: a traceback, status 1."""
    env = {**{k: v for k, v in os.environ.items() if k != KEY_ENV}, "LC_ALL": "C.UTF-8"}
    status, out, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", *command, env=env)
    assert (status, out) == (2, ""), err
    assert err.startswith("usage: llmrelay ") and "Traceback" not in err, err
    assert err.splitlines()[-1].endswith(f": error: argument {argument}: {NOT_UTF8_SAID}"), err


async def test_utf8_on_the_command_line_of_an_ascii_locale_is_read_as_utf8(
    gateway: Gateway, primary: FakeUpstream
) -> None:
    """LC_ALL=C with Python's UTF-8 mode off: each byte past ASCII reached the command as a surrogate, and valid UTF-8
    text was refused as "not valid UTF-8 text (the byte 0xe6 at character 1)"."""
    env = {**{k: v for k, v in os.environ.items() if k != KEY_ENV}, "LC_ALL": "C", "PYTHONUTF8": "0"}
    status, _, err = await llmrelay("--target", f"127.0.0.1:{gateway.port}", "complete", "模型".encode(), env=env)
    assert status == 0, err
    assert primary.chat_requests[-1]["messages"][-1]["content"] == "模型"


@pytest.mark.parametrize(
    ("variable", "target"), [("", "127.0.0.1:50051"), ("  ", "127.0.0.1:50051"), ("gw.example:443", "gw.example:443")]
)
def test_an_empty_target_variable_is_the_default_target(
    monkeypatch: pytest.MonkeyPatch, variable: str, target: str
) -> None:
    """`LLMRELAY_TARGET= llmrelay ...` made a channel to '', and gRPC printed its own error lines."""
    monkeypatch.setenv("LLMRELAY_TARGET", variable)
    assert cli._target_of(cli._parser().parse_args(["health"])) == target
    monkeypatch.setenv("LLMRELAY_METRICS", "")  # likewise
    assert cli._parser().parse_args(["stats"]).metrics == cli.DEFAULT_METRICS
