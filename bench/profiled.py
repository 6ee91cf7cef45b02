"""Runs a server's command with its Python-level calls counted between two SIGUSR1s (`make bench-calls`).

    python bench/profiled.py OUT PROGRAM [ARGS...]      (PROGRAM: a Python script, such as llmrelay-server)
    python bench/profiled.py OUT PYTHON -m MODULE [ARGS...]

The first SIGUSR1 starts counting, the second stops and writes the counts to OUT as JSON: [[function, calls], ...],
most called first. A function is a Python one ("path:line name", the path within the repository or site-packages)
or a C one that Python code called ("C module.name"). What is counted is the calls made in the main thread, where the
servers' event loop runs: a thread of the server's own (a log writer's, a database's) is not (Python 3.11's profile
hook is per thread). Run as a file, not as a module of `bench`, so that it imports nothing the server does not.
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import signal
import sys
import sysconfig
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

_PREFIXES = (sysconfig.get_paths()["purelib"] + os.sep, str(Path(__file__).resolve().parent.parent) + os.sep)
"""What is left off the start of a function's file: site-packages, the repository."""


class _Counter:
    def __init__(self, out: Path) -> None:
        self._out = out
        self._calls: collections.Counter[Any] = collections.Counter()
        self._counting = False

    def toggle(self, signum: int, frame: FrameType | None) -> None:
        if not self._counting:
            self._calls.clear()
            self._counting = True
            sys.setprofile(self._profile)
            return
        sys.setprofile(None)
        self._counting = False
        # Python functions are keyed by their code while counting (a lookup a call), and named once here.
        named: collections.Counter[str] = collections.Counter()
        for function, calls in self._calls.items():
            named[function if isinstance(function, str) else _name(function)] += calls
        written = self._out.with_name(self._out.name + ".part")
        written.write_text(json.dumps(named.most_common()))
        written.replace(self._out)  # whole, or not there

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self._calls[frame.f_code] += 1
        elif event == "c_call":
            # By name, not by the function: a method bound to an object (dict.get) is a new one each time, and
            # keeping it would keep its object.
            module = arg.__module__
            self._calls[f"C {arg.__qualname__}" if module is None else f"C {module}.{arg.__qualname__}"] += 1


def _name(code: CodeType) -> str:
    filename = code.co_filename
    for prefix in _PREFIXES:
        filename = filename.removeprefix(prefix)
    return f"{filename}:{code.co_firstlineno} {code.co_qualname}"


def main() -> None:
    out, program = Path(sys.argv[1]), sys.argv[2:]
    counter = _Counter(out)
    signal.signal(signal.SIGUSR1, counter.toggle)
    if len(program) >= 3 and program[1] == "-m":
        sys.argv = [program[2], *program[3:]]
        sys.path[0] = os.getcwd()  # as `python -m` has it
        runpy.run_module(program[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path[0] = str(Path(program[0]).resolve().parent)  # as if run directly, not from bench/
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
