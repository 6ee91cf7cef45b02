"""`make bench-instructions`: the instructions each server executes per call, counted by valgrind (callgrind).

CPU time on a shared machine moves by 10-30% from one run to the next (`make bench` takes turns in rounds for that
reason); an instruction count moves by about 1% from run to run, so it tells whether a change to the request path
made it cheaper, by how much, and where, long before CPU time could. Run nothing heavy beside it: a server given
less CPU serves fewer calls per wake-up of its loop (a second callgrind run on the same two cores added 12-17% to
the floor's count). It is not time: a system call or a cache miss costs more than its instructions say, so `make
bench` stays the measure of speed; this is the one to compare commits by.

The same three servers as `make bench` (the floor, the plain gateway, the gateway with everything on), or any of
its gateways with one feature on (`--paths`: call-log, metrics, gateway-limits, key, key-limits), each run under
callgrind in turn, in front of the same loopback upstream; per server and kind of call (unary, a stream of 8
chunks), the instructions of every thread of the server process over `--calls` calls from 16 callers, counted after
a warm-up, and their multiple of the floor's. The figures go to bench/results/instructions.json.

Usage: python -m bench.instructions [--calls N] [--kinds unary,stream] [--paths floor,gateway,everything,...]
(needs valgrind: apt-get install valgrind)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from harness import free_port
from llmrelay import v1 as pb

from bench.__main__ import (
    GATEWAYS,
    KINDS,
    PLAIN,
    RESULTS,
    grpc_calls,
    now,
    recorded_answers,
    revision,
    stage,
    start_floor,
    start_gateway,
    stop,
)

PATHS = ("floor", *GATEWAYS)
"""The floor, and every gateway of `make bench` (each of everything's features alone among them)."""
DEFAULT_PATHS = ("floor", "gateway", "everything")
CALLERS = 16
WARM_UP_CALLS = 200
START_UNDER_VALGRIND_S = 300  # imports run some 50 times slower under callgrind


@contextlib.asynccontextmanager
async def serving(
    path: str, kind: str, upstream_port: int, answers: Path, scratch: Path, under: Sequence[str], within_s: float
) -> AsyncIterator[tuple[int, Callable[[], Awaitable[Any]]]]:
    """One server of `path` (the floor, or a gateway of `make bench`) run by `under`, warmed up by calls of `kind`:
    its process id, and a call of that kind to it, for as long as the block runs."""
    port = free_port()
    feature = GATEWAYS.get(path, PLAIN)
    async with contextlib.AsyncExitStack() as running:
        if path == "floor":
            floor = start_floor(port, answers, "uvloop", under, within_s)
            pid = floor.pid
            running.callback(stop, floor)
        else:
            gateway = await start_gateway(scratch, upstream_port, port, path, feature, "uvloop", under, within_s)
            pid = gateway.process.pid
            running.push_async_callback(gateway.stop)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = grpc_calls(pb.LLMServiceStub(channel), feature.metadata)[kind]
            await take_turns(call, WARM_UP_CALLS, 4)
            yield pid, call


async def count(path: str, kind: str, calls: int, upstream_port: int, answers: Path, scratch: Path) -> float:
    """Instructions per call of one server, `calls` calls of `kind` counted after a warm-up."""
    out = scratch / f"{path}-{kind}.callgrind"
    under = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}"]
    async with serving(path, kind, upstream_port, answers, scratch, under, START_UNDER_VALGRIND_S) as (pid, call):
        _control("--zero", pid)
        await take_turns(call, calls, CALLERS)
        _control("--dump", pid)
    return _totals(Path(f"{out}.1")) / calls


def _totals(dump: Path) -> int:
    """The instructions in a callgrind dump (its part 1 here: what ran between the zeroing and the dump)."""
    return next(int(line.split()[1]) for line in dump.read_text().splitlines() if line.startswith("totals:"))


async def take_turns(call: Callable[[], Awaitable[Any]], n: int, callers: int) -> None:
    """`n` calls from `callers` callers at once, each calling again as soon as its last call ends."""

    async def caller(share: int) -> None:
        for _ in range(share):
            await call()

    await asyncio.gather(*(caller(n // callers + (i < n % callers)) for i in range(callers)))


def _control(action: str, pid: int) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


@contextlib.asynccontextmanager
async def floor_staged() -> AsyncIterator[tuple[Path, int, Path]]:
    """The loopback upstream, and the answers for the floor to send (the gateway's own, recorded from a gateway run
    as `make bench` records them): the scratch folder, the upstream's port, and the answers' file."""
    async with stage("recorder") as (scratch, ports, _, _):
        recorder = await start_gateway(scratch, ports["upstream"], ports["recorder"], "recorder")
        async with grpc.aio.insecure_channel(recorder.target) as channel:
            answers = await recorded_answers(pb.LLMServiceStub(channel), scratch)
        await recorder.stop()
        yield scratch, ports["upstream"], answers


async def run(calls: int, kinds: list[str], paths: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with floor_staged() as (scratch, upstream_port, answers):
        for kind in kinds:
            counted: dict[str, float] = {}
            for path in paths:
                per_call = counted[path] = await count(path, kind, calls, upstream_port, answers, scratch)
                row: dict[str, Any] = {"path": path, "kind": kind, "instructions_per_call": round(per_call)}
                versus = []
                if "floor" in counted:
                    row["x_floor"] = per_call / counted["floor"]
                    versus.append(f"{row['x_floor']:5.2f}x the floor")
                if "gateway" in counted and path not in ("floor", "gateway"):
                    more = row["over_gateway"] = round(per_call - counted["gateway"])
                    versus.append(f"{more / 1000:+.0f}k ({more / counted['gateway']:+.0%}) over the gateway")
                rows.append(row)
                counts = f"{kind:6s} {path:14s} {per_call / 1000:8.0f}k instructions a call"
                print(f"{counts}  {'; '.join(versus)}", flush=True)
    return rows


def servers_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a tool that counts over the servers of PATHS: --calls, --kinds, --paths."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calls", type=int, default=400, help="gRPC calls counted per server and kind (default 400)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="of unary,stream (default both)")
    parser.add_argument(
        "--paths", default=",".join(DEFAULT_PATHS), help=f"of {','.join(PATHS)} (default {','.join(DEFAULT_PATHS)})"
    )
    return parser


def chosen_servers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The kinds of call and the servers asked for, the floor and the plain gateway first (the rest's measures)."""
    kinds, chosen = args.kinds.split(","), args.paths.split(",")
    if not set(kinds) <= set(KINDS) or not set(chosen) <= set(PATHS):
        parser.error(f"--kinds takes {','.join(KINDS)}; --paths takes {','.join(PATHS)}")
    return kinds, [path for path in PATHS if path in chosen]


def write_results(
    tool: str, calls: int, kinds: list[str], paths: list[str], rows: list[dict[str, Any]], started_at: str
) -> None:
    """The rows of `python -m bench.TOOL`, counted over `calls` calls: the default servers' of both kinds to
    bench/results/TOOL.json (the committed one), another choice of servers or kinds to a file of its own."""
    results = {
        "command": " ".join([f"python -m bench.{tool}", *sys.argv[1:]]),
        "started_at": started_at,
        "revision": revision(),
        "calls": calls,
        "callers": CALLERS,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    chosen = [*(kinds if kinds != list(KINDS) else ()), *(paths if paths != list(DEFAULT_PATHS) else ())]
    written = RESULTS / f"{'-'.join((tool, *chosen))}.json"
    written.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {written}")


def main() -> None:
    parser = servers_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    kinds, paths = chosen_servers(parser, args)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench.instructions: valgrind is not installed (apt-get install valgrind)")
    started_at = now()
    write_results("instructions", args.calls, kinds, paths, asyncio.run(run(args.calls, kinds, paths)), started_at)


if __name__ == "__main__":
    main()
