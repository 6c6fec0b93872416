"""Sharded training checkpoints (FSDP, pipeline stages) through torch.distributed.checkpoint (DCP).

Every process writes its own shards; nothing is gathered into one process to save. The folder
has the name and the resumable contents of state.py's checkpoints, so `latest_checkpoint` and
`--resume-training-from-checkpoint` find either kind:

    <state_dir>/checkpoints/step-00000100/
        sharded/                         DCP: `.metadata` and one `__<rank>_0.distcp` per process,
                                         holding {"model": ..., "optim": ...} under the whole
                                         GPT's parameter names (FSDP shards as DTensors, each
                                         pipeline stage its own layers), so DCP can load them
                                         into another layout
        config.json, model.safetensors   the whole model in the Hugging Face layout, consolidated
                                         by rank 0 from `sharded/` (transformers loads it)
        training_state.pt                scheduler, grad scaler, step, data position and every
                                         process's RNG state (the optimizer is in `sharded/`)
        train_config.json                the run's TrainConfig

Written atomically: the processes write `sharded/` into `.step-00000100.sharded.partial`, then
rank 0 moves it into state.py's temporary folder with the rest and renames that into place. A
partial folder left by a killed run is removed by the next save.

Resuming: any layout of the same model (pipeline checkpoints: the same number of stages, since
the last stage's copy of the tied weight has its own optimizer state) and a plain one-process or
DDP run alike (`load_sharded_checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gpt2ipu.errors import UserError
from gpt2ipu.model import GPT, GPTConfig
from gpt2ipu.model.hf import write_hf_files
from gpt2ipu.train.state import load_training_state, save_training_checkpoint

SHARDED_DIR = "sharded"
# The optimizer's state under each parameter's name, its hyperparameters too ("param_groups.<name>.lr").
# Unflattened, param_groups is a list whose entries ("param_groups.0.params", the parameter names of
# this process's group 0) have the same key on every process; DCP saves a key that every process
# has once, from one of them, so a pipeline stage resumed with another stage's group (KeyError
# 'betas' in the first step after resuming, depending on which process DCP picked).
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
PARTIAL_SUFFIX = ".sharded.partial"


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds DCP shards (else it is state.py's single-file kind)."""
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def save_sharded_checkpoint(state_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, training_state: dict[str, Any],
                            train_config: dict[str, Any], *, keep: int, is_main: bool, barrier: Callable[[], None],
                            model_config: GPTConfig) -> None:
    """Called by every process: each writes its shards; rank 0 (`is_main`) completes the folder."""
    root = Path(state_dir) / "checkpoints"
    partial = root / f".step-{step:08d}{PARTIAL_SUFFIX}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".*{PARTIAL_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    with _one_process_is_intended():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    barrier()   # every shard is on disk
    if is_main:
        def save_weights(folder: Path) -> None:
            os.replace(partial, folder / SHARDED_DIR)
            write_hf_files(consolidated_model(folder / SHARDED_DIR, model_config), folder)

        save_training_checkpoint(state_dir, step, save_weights, training_state, train_config, keep=keep)
    barrier()


def consolidated_model(sharded_dir: str | os.PathLike, model_config: GPTConfig) -> GPT:
    """The whole model of a DCP checkpoint, in this process (CPU, fp32), whatever layout wrote it."""
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device="cpu")
    state = model.state_dict()
    if model_config.tie_word_embeddings:
        state.pop("lm_head.weight")   # the same tensor as wte.weight, which loads it
    with _one_process_is_intended():
        _load({"model": state}, Path(sharded_dir), no_dist=True)
    return model


def load_sharded_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a sharded checkpoint's model and optimizer into this process's (sharded or whole) model;
    returns its training_state.pt (scheduler, scaler, step, data position, RNG states)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_state, "optim": optim_state}
    with _one_process_is_intended():
        _load(state, Path(folder) / SHARDED_DIR, no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)
    return load_training_state(folder)


@contextlib.contextmanager
def _one_process_is_intended():
    """Silence DCP's warning that it saves or loads in a single process: here that is the intent
    (consolidation on rank 0, a one-process run resuming, a one-process test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _load(state: dict, sharded_dir: Path, no_dist: bool) -> None:
    """dcp.load, with a checkpoint that does not fit this model named as such."""
    try:
        dcp.load(state, checkpoint_id=str(sharded_dir), no_dist=no_dist)
    except Exception as err:   # DCP raises CheckpointException / RuntimeError with every rank's reasons
        raise UserError(f"{sharded_dir.parent}: this sharded checkpoint does not fit this run's model "
                        f"(--model and its settings, or the pipeline stages): {str(err).splitlines()[0][:300]}; "
                        "resume with the settings of the run that wrote it, or start fresh with "
                        "--resume-training-from-checkpoint none or another --state-dir") from err

