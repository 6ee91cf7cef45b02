"""The bench's own arithmetic and process handling (bench/__main__.py): what its figures are made of."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.__main__ import Run, cpu_seconds, start

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nprint('burnt', flush=True)"


def test_cpu_time_is_read_finer_than_the_kernels_ticks() -> None:
    """/proc's stat counts CPU time in ticks of 10 ms: a 1,000-chunk stream's few hundred milliseconds were some
    twenty ticks, a 5% step between two servers' figures."""
    process = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "burnt\n"
        used = cpu_seconds(process.pid)
    finally:
        process.wait(10)
    assert 0.3 <= used < 2.0
    assert used != round(used, 2), f"{used} s: a whole number of 10 ms ticks"


def test_the_99th_percentile_is_within_the_latencies() -> None:
    run = Run([0.001] * 50 + [0.002], [], 1.0, {})
    assert 1.0 <= run.p99_ms <= 2.0


def test_a_server_that_says_nothing_fails_to_start_in_time() -> None:
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"did not start within 0\.5 s"):
        start([sys.executable, "-c", "import time; time.sleep(30)"], "listening", within_s=0.5)
    assert time.monotonic() - started < 5
