"""`make bench`'s chart: added latency and server CPU per call, by path, kind of call and number of callers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from bench.__main__ import Row

COLORS = {
    "direct": "#999999",
    "floor": "#4c72b0",
    "floor, joined": "#8172b2",
    "gateway": "#55a868",
    "everything": "#c44e52",
}


def draw(rows: Sequence[Row], path: Path) -> Path:
    groups = sorted({(row.kind, row.concurrency) for row in rows}, key=lambda group: (group[0] != "unary", group[1]))
    paths = [name for name in COLORS if any(row.path == name for row in rows)]
    by = {(row.path, row.kind, row.concurrency): row for row in rows}
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(paths)
    for index, name in enumerate(paths):
        # A path's bars where it has figures (the joined floor: streams alone).
        placed = [
            (group + (index - (len(paths) - 1) / 2) * width, by[(name, kind, callers)])
            for group, (kind, callers) in enumerate(groups)
            if (name, kind, callers) in by
        ]
        positions = [position for position, _ in placed]
        color = COLORS[name]
        if name != "direct":
            latency.bar(positions, [row.added_p50_ms for _, row in placed], width, label=name, color=color)
        cpu.bar(
            positions,
            [row.server_cpu_ms_per_call for _, row in placed],
            width,
            label=name if name != "direct" else "direct (the upstream's)",
            color=color,
        )
    labels = [f"{kind}\n{callers} caller{'s' if callers > 1 else ''}" for kind, callers in groups]
    for axes, title in (
        (latency, "median latency added to the direct call (ms)"),
        (cpu, "server CPU per call (ms)"),
    ):
        axes.set_xticks(range(len(groups)), labels)
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle("llmrelay: make bench (one interleaved run; ratios matter more than the absolute figures)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
