"""The benchmarks section: the benchmark suite's results as one table and a chart of speedups.

Each result is the JSON object a `gpt2ipu bench` benchmark prints (gpt2ipu.bench.common.report:
`ours`, `unit`, `baselines`, `speedup` = ours / baseline) plus the `machine` it ran on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file

HEADERS = ["benchmark", "ours", "unit", "baseline", "baseline value", "speedup"]
MACHINE_HEADERS = ["benchmark", "cpu", "cores", "torch", "gpu"]


def read_bench_results(bench_dir: str | Path) -> dict[str, dict]:
    """{name: result} of every results/bench/<name>.json, by name."""
    results = {}
    for path in sorted(Path(bench_dir).glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable benchmark result ({err}); rerun it "
                            "(snakemake --cores 1 benchmarks)") from None
        if not isinstance(result, dict) or not {"ours", "unit", "speedup"} <= result.keys():
            raise UserError(f"{path}: not a benchmark result (needs ours, unit, speedup); rerun it "
                            "(snakemake --cores 1 benchmarks)")
        results[path.stem] = result
    return results


def summary_rows(results: dict[str, dict]) -> list[list[Any]]:
    """One row per (benchmark, baseline)."""
    rows = []
    for name, result in results.items():
        baselines = result.get("baselines") or {}
        for baseline, speedup in (result.get("speedup") or {}).items():
            rows.append([name, result["ours"], result["unit"], baseline, baselines.get(baseline), speedup])
    return rows


def machine_rows(results: dict[str, dict]) -> list[list[Any]]:
    rows = []
    for name, result in results.items():
        machine = result.get("machine") or {}
        rows.append([name, machine.get("cpu"), machine.get("cores"), machine.get("torch"), machine.get("gpu")])
    return rows


def plot_speedups(results: dict[str, dict], png_path: str | Path) -> None:
    """Horizontal bars: ours / baseline for every (benchmark, baseline), with the line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{row[0]} vs {row[3]}", row[5]) for row in summary_rows(results)
            if isinstance(row[5], (int, float)) and row[5] != float("inf")]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.35 * max(len(bars), 1)), dpi=100)
    if bars:
        labels, values = zip(*bars)
        # From 1x to the speedup, on a log scale: 0.5x and 2x are equally far from even.
        ax.barh(range(len(bars)), [v - 1 for v in values], left=1,
                color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_xscale("log")
        ax.set_yticks(range(len(bars)), labels)
        ax.invert_yaxis()
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.2f}x", va="center")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speedup (ours / baseline; above 1 = ours faster)")
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
