"""What `llmrelay-server` does before its modules have loaded (llmrelay_server/__main__.py), in a process of its own
whose command line is a stand-in: the loading takes a second or two, and signals come meanwhile."""

from __future__ import annotations

import subprocess
import sys

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
