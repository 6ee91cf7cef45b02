"""Reading a keys file: what counts as a file of keys, what as a broken one, and what its errors advise."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from pathlib import Path

import pytest
from llmrelay_server import cli
from llmrelay_server.auth import KEY_PREFIX, KeyRing, digest
from llmrelay_server.config import AuthConfig, CallerKey, ConfigError, load_keys_file
from llmrelay_server.metrics import LabelValues

ENTRY = f'{{name: research, sha256: "{hashlib.sha256(b"llmr-research-key").hexdigest()}"}}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),  # a file saved in place, read between its truncation and its writing
        ("  \n\n", "empty"),
        ("# every key revoked\n", "empty"),
        ("keys:\n", "keys: expected a list"),
        ("- " + ENTRY + "\n", "the top level must be a mapping with `keys:`"),
        ("{}\n", "the top level must be a mapping with `keys:`"),
        ("kei", "the top level must be a mapping with `keys:`"),  # cut short while written
        ("keys: [" + ENTRY[:20], "not valid YAML"),
    ],
    ids=["empty", "blank", "comments", "keys without a list", "a bare list", "no keys field", "cut short", "cut YAML"],
)
def test_a_file_that_does_not_say_keys_is_broken(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_keys_file(path)
    assert str(caught.value).startswith(f"keys file {path}: ") and expected in str(caught.value)


def test_an_empty_file_says_how_to_admit_nobody(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"`keys: \[\]` to admit nobody"):
        load_keys_file(path)
    path.write_text("keys: []\n")
    assert load_keys_file(path) == ()


def test_the_keys_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"# the research agents\nkeys:\n  - {ENTRY}\n")
    assert [key.name for key in load_keys_file(path)] == ["research"]


@pytest.mark.parametrize("name", ["team-a", "0123", "12:30", "1_000", "0x1F", "1.50", "@ops", "true", "2024-01-01"])
def test_the_entry_keys_new_prints_admits_its_key_under_the_name_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    cli.keys(["new", name])
    printed = capsys.readouterr().out
    key = next(line for line in printed.splitlines() if line.startswith(KEY_PREFIX))
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + printed[printed.index("  - name:") :])  # pasted as it says
    (entry,) = load_keys_file(path)
    assert (entry.name, entry.sha256) == (name, digest(key))


def test_a_name_written_unquoted_is_kept_as_written(tmp_path: Path) -> None:
    """YAML 1.1 reads these as numbers (8, 90, 16, 1000, 1.5, infinity), which the names became; and `010` beside
    `8` was refused as the same name twice."""
    names = ["010", "1:30", "0x10", "1_000", "1.50", ".inf", "8"]
    path = tmp_path / "keys.yaml"
    sha = hashlib.sha256
    path.write_text("keys:\n" + "".join(f'  - {{name: {n}, sha256: "{sha(n.encode()).hexdigest()}"}}\n' for n in names))
    assert [key.name for key in load_keys_file(path)] == names


def test_a_missing_file_points_at_the_setting_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_keys_file(tmp_path / "absent.yaml")
    message = str(caught.value)
    assert "cannot be read" in message and "auth.keys_file (or LLMRELAY_KEYS_FILE)" in message
    assert "--config" not in message


async def test_a_key_of_the_config_given_to_another_caller_in_the_file_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A call with that key would be one of two callers (billed, limited, allowed models), silently.
    research = CallerKey("research", hashlib.sha256(b"llmr-research-key").hexdigest())
    path = tmp_path / "keys.yaml"
    path.write_text(f'keys: [{{name: intruder, sha256: "{research.sha256}"}}]\n')
    config = AuthConfig(keys=(research,), keys_file=str(path))
    with pytest.raises(ConfigError, match="'intruder' in the keys file has the same sha256 as key 'research'"):
        KeyRing(config)

    path.write_text(f'keys: [{{name: research, sha256: "{research.sha256}"}}]\n')  # the same caller: harmless
    keys = KeyRing(config)
    assert keys.names() == {"research"}
    path.write_text(f'keys: [{{name: intruder, sha256: "{research.sha256}"}}]\n')
    keys.reload()  # at a reload (read in a thread), the keys in force stay
    await asyncio.gather(*keys._reloads)
    found = keys.find("llmr-research-key")
    assert found is not None and found.name == "research" and keys.names() == {"research"}
    assert "keys file not reloaded, the keys in force stay" in caplog.text


async def test_a_revoked_keys_name_stays_a_metrics_caller_for_the_calls_it_began(tmp_path: Path) -> None:
    """A stream in flight as its key was revoked is billed to the key in the ledger; its tokens and cost went to the
    metrics as caller "other", which per-caller dashboards then lost."""
    path = tmp_path / "keys.yaml"
    research = hashlib.sha256(b"llmr-research-key").hexdigest()
    path.write_text(f'keys: [{{name: research, sha256: "{research}"}}]\n')
    keys = KeyRing(AuthConfig(keys_file=str(path)))
    labels = LabelValues((), (), keys.named)
    caller = keys.find("llmr-research-key")
    assert caller is not None and keys.in_force(caller) is caller
    path.write_text(f'keys: [{{name: team, sha256: "{hashlib.sha256(b"llmr-team-key").hexdigest()}"}}]\n')
    keys.reload()
    await asyncio.gather(*keys._reloads)
    assert keys.in_force(caller) is None and keys.names() == {"team"}
    assert [labels.caller(name) for name in ("research", "team", "stranger")] == ["research", "team", "other"]


@pytest.mark.parametrize("quiet", [False, True], ids=["supervisor or one process", "worker"])
async def test_a_renamed_key_is_said_once_of_the_operators_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, quiet: bool
) -> None:
    """Each worker said it too, of its own copy of the file, in a folder the operator never wrote."""
    caplog.set_level(logging.WARNING, logger="llmrelay_server.auth")
    path = tmp_path / "keys.yaml"
    research = hashlib.sha256(b"llmr-research-key").hexdigest()
    path.write_text(f'keys: [{{name: research, sha256: "{research}"}}]\n')
    keys = KeyRing(AuthConfig(keys_file=str(path)), quiet=quiet)
    path.write_text(f'keys: [{{name: research-team, sha256: "{research}"}}]\n')
    keys.reload()
    await asyncio.gather(*keys._reloads)
    assert keys.names() == {"research-team"}
    said = [r.getMessage() for r in caplog.records if "is now named 'research-team'" in r.getMessage()]
    assert len(said) == (0 if quiet else 1), said


@pytest.mark.parametrize(
    "other",
    ['models: ["*"]', "read_all_usage: true", "limits: {requests_per_minute: 600}"],
    ids=["models", "usage", "limits"],
)
async def test_a_caller_of_the_config_given_other_rights_in_the_file_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other: str
) -> None:
    """One name is one caller (its bill, its limits' counter, the usage it reads): an entry of the file under a
    configured key's name, with a key of its own and more rights, gave its holder the configured key's too."""
    research = CallerKey("research", hashlib.sha256(b"llmr-research-key").hexdigest(), models=("ollama/*",))
    rotated = hashlib.sha256(b"llmr-research-key-2").hexdigest()
    path = tmp_path / "keys.yaml"
    path.write_text(f'keys: [{{name: research, sha256: "{rotated}", {other}}}]\n')
    config = AuthConfig(keys=(research,), keys_file=str(path))
    with pytest.raises(ConfigError, match=r"'research' is in auth\.keys and the keys file with other models, limits"):
        KeyRing(config)

    path.write_text(f'keys: [{{name: research, sha256: "{rotated}", models: ["ollama/*"]}}]\n')  # a rotation
    keys = KeyRing(config)
    found = [keys.find(key) for key in ("llmr-research-key", "llmr-research-key-2")]
    assert [caller and caller.name for caller in found] == ["research", "research"]
    path.write_text(f'keys: [{{name: research, sha256: "{rotated}", {other}}}]\n')
    keys.reload()
    await asyncio.gather(*keys._reloads)
    assert keys.find("llmr-research-key-2") is not None  # the entry in force stays, with its rights
    assert "keys file not reloaded, the keys in force stay" in caplog.text


async def test_thousands_of_keys_are_read_again_without_holding_up_the_event_loop(tmp_path: Path) -> None:
    """A reload reads the file in a thread: the calls in flight go on meanwhile. (Each key's digest was also checked
    against every other name's: 20,000 keys took 25 s.)"""
    path = tmp_path / "keys.yaml"
    entries = [
        f'  - {{name: caller-{i}, sha256: "{hashlib.sha256(str(i).encode()).hexdigest()}"}}' for i in range(3000)
    ]
    path.write_text("keys:\n" + "\n".join(entries) + "\n")
    keys = KeyRing(AuthConfig(keys_file=str(path)))
    assert len(keys.names()) == 3000
    path.write_text("keys:\n" + "\n".join(entries[:1500]) + "\n")
    keys.reload()
    assert keys._reloads and len(keys.names()) == 3000  # reading, not read: reload returned at once
    ticks = 0
    while keys._reloads:
        await asyncio.sleep(0.005)
        ticks += 1
    assert len(keys.names()) == 1500
    assert ticks >= 2, "the event loop did not run while the file was read"  # (a wall-clock bound: load-dependent)


def thousands_of_keys(path: Path, count: int = 3000) -> None:
    """A keys file that takes a good part of a second to read."""
    digests = (hashlib.sha256(str(i).encode()).hexdigest() for i in range(count))
    entries = [f'  - {{name: caller-{i}, sha256: "{sha256}"}}' for i, sha256 in enumerate(digests)]
    path.write_text("keys:\n" + "\n".join(entries) + "\n")


async def test_reloads_asked_while_one_runs_are_merged_into_one_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each SIGHUP queued a whole read: 8 of them read 10,000 keys 8 times over (74 s). One waiting behind the running
    read reads the file as it is when it starts, which every reload asked meanwhile wants."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.auth")
    path = tmp_path / "keys.yaml"
    thousands_of_keys(path)
    keys = KeyRing(AuthConfig(keys_file=str(path)))
    keys.reload()
    while not keys._reloading.locked():  # noqa: ASYNC110  # until the first read is under way
        await asyncio.sleep(0)
    for _ in range(7):
        keys.reload()
    await asyncio.gather(*keys._reloads)
    assert caplog.text.count("reloaded: 3000 keys in force") == 2


async def test_a_reload_asked_once_the_keys_have_stopped_reads_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGHUP as the gateway stopped read the file after "stopped", and one that gave a key a budget read today's
    spend from the ledger being closed: an ERROR and a traceback ("Cannot operate on a closed database")."""
    caplog.set_level(logging.INFO, logger="llmrelay_server.auth")
    path = tmp_path / "keys.yaml"
    path.write_text(f'keys: [{{name: a, sha256: "{hashlib.sha256(b"a").hexdigest()}"}}]\n')
    keys = KeyRing(AuthConfig(keys_file=str(path)))
    keys.start()
    await keys.stop()
    path.write_text("keys: []\n")
    keys.reload()
    await asyncio.sleep(0.2)  # a read would be done: a file of one key
    assert not keys._reloads and keys.names() == {"a"}
    assert "reloaded" not in caplog.text


def test_a_reload_under_way_holds_up_no_exit(tmp_path: Path) -> None:
    """Read in asyncio's executor, the read went on after the gateway had stopped, and the process exited only once
    it was done (asyncio.run waits for the executor's threads): seconds, for thousands of keys."""
    path = tmp_path / "keys.yaml"
    thousands_of_keys(path)

    async def reload_and_stop() -> None:
        keys = KeyRing(AuthConfig(keys_file=str(path)))
        keys.reload()
        while not keys._reloading.locked():  # noqa: ASYNC110
            await asyncio.sleep(0)
        await keys.stop()

    asyncio.run(reload_and_stop())
    reading = [thread for thread in threading.enumerate() if thread.name == "llmrelay-keys-file"]
    assert reading and reading[0].daemon, "the loop waited for the read to end"


async def test_a_number_too_large_in_a_reloaded_file_is_a_mistake_of_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 400 digits ended the check of the limits in an OverflowError, logged with a traceback as a bug of the gateway.
    sha256 = hashlib.sha256(b"llmr-big-key").hexdigest()
    path = tmp_path / "keys.yaml"
    path.write_text(f'keys: [{{name: big, sha256: "{sha256}"}}]\n')
    keys = KeyRing(AuthConfig(keys_file=str(path)))
    path.write_text(f'keys: [{{name: big, sha256: "{sha256}", limits: {{requests_per_minute: 1{"0" * 400}}}}}]\n')
    keys.reload()
    await asyncio.gather(*keys._reloads)
    assert "keys[0].limits.requests_per_minute: too large a number" in caplog.text
    assert "Traceback" not in caplog.text and keys.names() == {"big"}
