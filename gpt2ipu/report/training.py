"""The training section: the loss, learning-rate and throughput curves of a run, and its config.

All from the run's `metrics.jsonl` (one record per logged step, gpt2ipu.train.metrics) and the
`train_config.json` the training job saved beside its checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file
from gpt2ipu.train.metrics import plot_loss_curve, read_metrics


def read_run_metrics(metrics_path: Path) -> list[dict]:
    try:
        return read_metrics(metrics_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{metrics_path}: not a readable metrics file ({err}); rerun the training job") from None


def plot_series(records: list[dict], series: dict[str, str], ylabel: str, png_path: Path, log_y: bool = False) -> None:
    """One figure of the records' `series` ({key: legend label}) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in series.items():
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def training_figures(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png, lr.png and throughput.png of one run in `out_dir`; returns their paths."""
    metrics_path, out_dir = Path(metrics_path), Path(out_dir)
    records = read_run_metrics(metrics_path)
    figures = [out_dir / "loss.png", out_dir / "lr.png", out_dir / "throughput.png"]
    plot_loss_curve(metrics_path, figures[0])
    plot_series(records, {"lr": "learning rate"}, "learning rate", figures[1])
    plot_series(records, {"tokens_per_s": "tokens/s"}, "tokens per second (whole step)", figures[2])
    return figures


def config_rows(train_config: dict[str, Any]) -> list[list[Any]]:
    """(key, value) rows of a saved training config, the keys that were set to something."""
    return [[key, json.dumps(value) if isinstance(value, (list, dict)) else value]
            for key, value in sorted(train_config.items()) if value not in (None, {}, [])]


def summary_rows(records: list[dict]) -> list[list[Any]]:
    """The run's last figures: steps, final train and valid loss, median tokens/s and MFU."""
    if not records:
        return []
    last = records[-1]
    valid = [r for r in records if "valid_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    mfus = sorted(r["mfu"] for r in records if "mfu" in r)
    return [["steps", last.get("step")], ["final train loss", last.get("loss")],
            ["final valid loss", valid[-1]["valid_loss"] if valid else None],
            ["final valid perplexity", valid[-1].get("valid_ppl") if valid else None],
            ["median tokens/s", speeds[len(speeds) // 2] if speeds else None],
            ["median MFU", mfus[len(mfus) // 2] if mfus else None]]


def latest_train_config(state_root: Path, run: str) -> tuple[Path, dict] | None:
    """The newest `train_config.json` of a run's training state folders (<state_root>/<run>-<key>/,
    the key being gpt2ipu.train.launch.state_key's 10 hex digits: `sample-gpt2-medium-<key>` is
    another run than `sample-gpt2`)."""
    own = re.compile(re.escape(run) + r"-[0-9a-f]{10}")
    candidates = sorted((p for p in state_root.glob(f"{run}-*/train_config.json")
                         if own.fullmatch(p.parent.name) and p.is_file()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        return None
    try:
        return candidates[-1], json.loads(candidates[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
