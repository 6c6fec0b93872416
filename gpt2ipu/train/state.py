"""Resumable training checkpoints: everything needed to continue bit for bit.

Layout of `<state_dir>/checkpoints/step-00000100/` (written atomically, the last K kept):

    config.json, model.safetensors   the weights, in the Hugging Face layout (gpt2ipu.model.hf)
    training_state.pt                optimizer and LR-scheduler state, grad-scaler state, the
                                     step, the data position and every RNG state: only tensors,
                                     numbers and strings, loaded with torch.load(weights_only=True)
    train_config.json                the TrainConfig of the run, for the record

A checkpoint is good once the step after it has run finite (its weights gave a finite loss and
gradient). The newest is not yet known to be, so pruning keeps at least two (`keep` 1 keeps the
one before it too), and a run that stops on a non-finite step sets the checkpoints that are not
good aside (`set_aside`: renamed, so resuming never picks them up; kept for a look).

No pickle of Python objects: numpy's RNG is not used by training (data order comes from seeded
generators keyed by epoch), so torch's CPU/CUDA generator states are all there is to save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt2ipu.fsutil import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(state_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of an interrupted write are skipped)."""
    root = Path(state_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "training_state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(state_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(state_dir)
    return dirs[-1] if dirs else None


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def save_training_checkpoint(state_dir: str | os.PathLike, step: int, save_weights, training_state: dict[str, Any],
                             train_config: dict[str, Any], keep: int) -> Path:
    """`save_weights(folder)` writes the HF-layout weights; the rest goes to training_state.pt."""
    final = Path(state_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_weights(tmp)
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
    # max(keep, 2): the newest is not known good until the next step has run (see the module docstring).
    for old in checkpoint_dirs(state_dir)[:-max(keep, 2)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


NOT_GOOD_SUFFIX = ".next-step-non-finite"


def set_aside(folder: str | os.PathLike) -> Path:
    """Rename a checkpoint whose next step was not finite out of the resumable ones: <name>.next-step-non-finite."""
    folder = Path(folder)
    target = folder.with_name(folder.name + NOT_GOOD_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    os.replace(folder, target)
    return target


def load_training_state(folder: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(folder) / "training_state.pt", map_location="cpu", weights_only=True)
