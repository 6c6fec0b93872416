"""Training metrics: a JSON-lines file, TensorBoard event files, and a loss-curve PNG.

Only rank 0 writes. The JSON-lines file is appended to (a resumed run continues it); lines of
steps beyond the resume point are dropped first, so a crash between a log line and a checkpoint
leaves no duplicate steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2ipu.fsutil import atomic_file


class MetricsLog:
    """Where a training run's per-step records go: `metrics.jsonl` and TensorBoard, from rank 0 only.

    `log(record)` appends one JSON line (record["step"] required) and the record's finite numbers
    as TensorBoard scalars. Made with the step a run resumes from, it first drops the lines of
    later steps (written after the checkpoint it resumes from) and tells TensorBoard to purge
    them too, so the log of a resumed run reads as one uninterrupted run. Disabled (other ranks)
    it writes nothing. A missing tensorboard package leaves the JSON lines only: metrics must
    not stop a run.
    """

    def __init__(self, folder: str | os.PathLike, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a dependency, but metrics must not kill a run
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key.replace(".", "/"), value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Training loss per step and validation loss where measured, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
