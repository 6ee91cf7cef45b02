"""`make bench-calls`: where a server's Python goes, per gRPC call: the Python functions it runs, and the C functions
that they call, counted in its event loop's thread by a profile hook (bench/profiled.py).

`make bench-instructions` says how much a change saved; this says what is left and where, function by function: per
server and kind of call, the function calls a gRPC call costs, the most frequent ones, and (for a gateway with
features on) those it makes over the plain gateway's. A call counted here costs some 1,000-1,800 instructions on
average on the gateway's path (a small function's own work, the interpreter's frame, the loop's scheduling between
them), which is why the number of them tracks the instructions a gRPC call takes. The hook slows the server several
times over, so this measures no time; it counts, and the counts are the same run after run.

The same servers as `make bench-instructions` (the floor, the plain gateway, everything on, or any of the features
alone: `--paths`), one at a time, in front of the same loopback upstream; `--calls` calls from 16 callers counted
after a warm-up. The figures go to bench/results/calls.json (functions called at least once every 100 gRPC calls).

Usage: python -m bench.calls [--calls N] [--kinds unary,stream] [--paths floor,gateway,everything,...] [--top N]
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import now
from bench.instructions import CALLERS, chosen_servers, floor_staged, servers_parser, serving, take_turns, write_results

PROFILED = Path(__file__).resolve().parent / "profiled.py"
START_PROFILED_S = 60
WRITTEN_WITHIN_S = 30
KEPT_PER_CALL = 0.01
"""The least calls of a function per gRPC call that the results keep."""


async def count(
    path: str, kind: str, calls: int, upstream_port: int, answers: Path, scratch: Path
) -> collections.Counter[str]:
    """The calls of each function per gRPC call of one server, `calls` gRPC calls of `kind` counted after a
    warm-up."""
    out = scratch / f"{path}-{kind}.calls.json"
    under = [sys.executable, str(PROFILED), str(out)]
    async with serving(path, kind, upstream_port, answers, scratch, under, START_PROFILED_S) as (pid, call):
        os.kill(pid, signal.SIGUSR1)  # from here
        await take_turns(call, calls, CALLERS)
        os.kill(pid, signal.SIGUSR1)  # to here: the counts are written once the server's loop hears it
        async with asyncio.timeout(WRITTEN_WITHIN_S):
            while True:  # polled: the server has no other way to say it
                if out.exists():
                    break
                await asyncio.sleep(0.05)
    counted = json.loads(out.read_text())
    return collections.Counter({function: number / calls for function, number in counted})


async def run(calls: int, kinds: list[str], paths: list[str], top: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with floor_staged() as (scratch, upstream_port, answers):
        for kind in kinds:
            counted: dict[str, collections.Counter[str]] = {}
            for path in paths:
                functions = counted[path] = await count(path, kind, calls, upstream_port, answers, scratch)
                total = functions.total()
                row: dict[str, Any] = {"path": path, "kind": kind, "calls_per_call": round(total, 1)}
                print(f"\n{kind} {path}: {total:.0f} function calls a gRPC call", end="")
                if "floor" in counted:
                    row["x_floor"] = total / counted["floor"].total()
                    print(f" ({row['x_floor']:.2f}x the floor's)", end="")
                if "gateway" in counted and path not in ("floor", "gateway"):
                    more = functions.copy()
                    more.subtract(counted["gateway"])
                    row["over_gateway"] = round(total - counted["gateway"].total(), 1)
                    print(f", {row['over_gateway']:+.0f} over the gateway's; the most of them:")
                    _show(more, top)
                else:
                    print("; the most called:")
                    _show(functions, top)
                row["functions"] = {name: round(n, 2) for name, n in functions.most_common() if n >= KEPT_PER_CALL}
                rows.append(row)
    return rows


def _show(functions: collections.Counter[str], top: int) -> None:
    for function, per_call in functions.most_common(top):
        print(f"  {per_call:7.2f}  {function}")


def main() -> None:
    parser = servers_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="functions shown per server (default 25)")
    args = parser.parse_args()
    kinds, paths = chosen_servers(parser, args)
    started_at = now()
    write_results("calls", args.calls, kinds, paths, asyncio.run(run(args.calls, kinds, paths, args.top)), started_at)


if __name__ == "__main__":
    main()
