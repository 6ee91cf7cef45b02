"""What `llmrelay-server` does before its modules have loaded (llmrelay_server/__main__.py), in a process of its own
whose command line is a stand-in: the loading takes a second or two, and signals come meanwhile."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The command line replaced by one that tells how SIGHUP stood when the gateway's modules began to load.
_STAND_IN = """
import signal, sys, types
cli = types.ModuleType("llmrelay_server.cli")
cli.main = lambda: sys.exit(0 if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else 3)
sys.modules["llmrelay_server.cli"] = cli
from llmrelay_server.__main__ import main
main()
"""


def test_sighup_is_ignored_before_the_modules_load() -> None:
    # A service manager's reload right after a start (systemd's ExecReload, `kill -HUP $MAINPID`): SIGHUP was
    # ignored only once the command line had loaded, and one in the first second ended the gateway, status 129.
    started = subprocess.run([sys.executable, "-c", _STAND_IN], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr


# An install of the SDK alone (`pip install .`, no server extra) gets the `llmrelay-server` script too: the gateway's
# dependencies are missing, stood in for by a None in sys.modules (import refuses such a name with
# ModuleNotFoundError, as it does a module not installed).
_STARTED = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None
from llmrelay_server.__main__ import main
main()
"""


def _started(*missing: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _STARTED, *missing], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing", ["grpc_health", "yaml", "openai"])
def test_the_server_without_its_extra_says_how_to_install_it(missing: str) -> None:
    # It ended with a traceback: "ModuleNotFoundError: No module named 'grpc_health'".
    started = _started(missing)
    assert (started.returncode, started.stdout) == (1, "")
    assert started.stderr == (
        f"llmrelay-server: needs the server extra: pip install 'llmrelay[server]' (missing module {missing})\n"
    )


def test_a_module_of_its_own_missing_is_shown_as_the_bug_it_is() -> None:
    started = _started("llmrelay_server.app")
    assert started.returncode == 1
    assert "Traceback" in started.stderr and "ModuleNotFoundError" in started.stderr, started.stderr
    assert "server extra" not in started.stderr
