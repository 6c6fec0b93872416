"""The rule-resources section: each job's wall time, peak memory and I/O, from Snakemake's
`benchmark:` files.

Every rule writes its benchmark file to `benchmarks/<rule>/<job>.tsv` (the layout this module
reads: the first folder names the rule). The file is Snakemake's own tab-separated record: `s`
(wall seconds), `max_rss` (MB), `io_in`/`io_out` (MB), `mean_load` (%), `cpu_time` (s), one line
per repeat.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gpt2ipu.fsutil import atomic_file

HEADERS = ["rule", "job", "wall s", "max RSS MB", "read MB", "written MB", "mean load %", "CPU s"]
COLUMNS = ["s", "max_rss", "io_in", "io_out", "mean_load", "cpu_time"]


def number(text: str | None) -> float | None:
    """A benchmark field; Snakemake writes NA where it measured nothing (a job too short to sample)."""
    try:
        return float(text) if text not in (None, "", "NA") else None
    except ValueError:
        return None


def read_benchmark(path: Path) -> list[float | None] | None:
    """The columns of the file's last line (the last repeat); None for an empty or foreign file."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f, delimiter="\t"))
    if not lines or "s" not in lines[-1]:
        return None
    return [number(lines[-1].get(key)) for key in COLUMNS]


def resource_rows(benchmarks_dir: str | Path) -> list[list[Any]]:
    """One row per job's benchmark file, the longest first."""
    rows = []
    root = Path(benchmarks_dir)
    for path in sorted(root.glob("*/**/*.tsv")):
        values = read_benchmark(path)
        if values is not None:
            relative = path.relative_to(root)
            rows.append([relative.parts[0], str(relative.relative_to(relative.parts[0]).with_suffix("")), *values])
    return sorted(rows, key=lambda row: -(row[2] or 0.0))


def plot_resources(rows: list[list[Any]], png_path: str | Path, top: int = 25) -> None:
    """Two bar panels over the `top` longest jobs: wall seconds, and peak resident memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:top]
    labels = [f"{row[0]}: {row[1]}" for row in shown]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 1 + 0.3 * max(len(shown), 1)), dpi=100, sharey=True)
    positions = range(len(shown))
    time_ax.barh(positions, [row[2] or 0 for row in shown], color="tab:blue")
    mem_ax.barh(positions, [row[3] or 0 for row in shown], color="tab:orange")
    time_ax.set_yticks(list(positions), labels)
    time_ax.invert_yaxis()
    time_ax.set_xlabel("wall time (s)")
    mem_ax.set_xlabel("peak resident memory (MB)")
    for ax in (time_ax, mem_ax):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
