"""Sharded training checkpoints (FSDP, pipeline stages) through torch.distributed.checkpoint (DCP).

Every process writes its own shards; nothing is gathered into one process to save. The folder
has the name and the resumable contents of state.py's checkpoints, so `latest_checkpoint` and
`--resume-training-from-checkpoint` find either kind:

    <state_dir>/checkpoints/step-00000100/
        sharded/                         DCP: `.metadata` and one `__<rank>_0.distcp` per process,
                                         holding {"model": ..., "optim": ...} under the whole
                                         GPT's parameter names (FSDP shards as DTensors, each
                                         pipeline stage its own layers), so DCP can load them
                                         into another layout. The tied embedding: `wte.weight`
                                         (model and optimizer state); a pipeline's last stage
                                         adds its copy as `lm_head.weight` with the copy's own
                                         optimizer state (equal to wte's: pipeline.py); a whole
                                         model's second name for the one tensor may be there too.
                                         `optim.param_groups` holds one process's groups (DCP
                                         writes a non-tensor key once): their hyperparameters
                                         are every process's, their "params" name that one's.
        config.json, model.safetensors   the whole model in the Hugging Face layout, consolidated
                                         by rank 0 from `sharded/` (transformers loads it)
        training_state.pt                scheduler, grad scaler, step, data position and every
                                         process's RNG state (the optimizer is in `sharded/`)
        train_config.json                the run's TrainConfig

Written atomically: the processes write `sharded/` into `.step-00000100.sharded.partial`, then
rank 0 moves it into state.py's temporary folder with the rest and renames that into place. A
partial folder left by a killed run is removed by the next save.

Resuming: any layout of the same model, whatever layout wrote it (`load_sharded_checkpoint`):
another number of FSDP processes or pipeline stages, one process, DDP. The tied weight and its
optimizer state always come from the checkpoint's `wte.weight`: a last stage's copy is filled from
it, a whole model's second name dropped; where the checkpoint holds a pipeline's copy, every
process that loads the weight compares the copy with it, bit for bit, and all refuse if one
differs. A one-process or DDP checkpoint (state.py's single-file kind) resumes into a sharded run
through `load_single_file_checkpoint`: its optimizer state, numbered in a one-process run's
`parameter_groups` order, is named by building that order on the meta device, and DCP's
`set_state_dict` with full state dicts shards what each process holds.
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
from gpt2ipu.train.parallel import local_part
from gpt2ipu.train.state import load_training_state, save_training_checkpoint

SHARDED_DIR = "sharded"
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
    model_state, optim_state = get_state_dict(model, optimizer)
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


# The tied embedding's names (see pipeline.py): the first stage's `wte.weight` is the weight; a
# pipeline's last stage holds its own copy as `lm_head.weight`, with its own optimizer state, equal to
# the first stage's bit for bit. A whole GPT names the one tensor twice.
TIED, COPY = "wte.weight", "lm_head.weight"


def load_sharded_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a sharded checkpoint's model and optimizer into this process's share of the model (a
    pipeline stage, FSDP shards, or the whole model), whatever layout wrote it; returns its
    training_state.pt (scheduler, scaler, step, data position, RNG states).

    The tied weight is always read from the checkpoint's `wte.weight` (and its optimizer state): a
    last stage's copy is filled from it. A checkpoint that holds a copy (pipeline stages wrote it)
    has it compared with `wte.weight` by every process that loads the weight; they must be equal.
    """
    sharded_dir = Path(folder) / SHARDED_DIR
    model_state, optim_state = get_state_dict(model, optimizer)
    our_groups = [list(group["params"]) for group in optim_state["param_groups"]]   # the load puts the saved lists here
    request_model, request_optim = _tied_as_saved(model, dict(model_state), dict(optim_state["state"]))
    request = {"model": request_model, "optim": {"state": request_optim, "param_groups": optim_state["param_groups"]}}
    scratch = _copy_to_compare(request, _saved_keys(sharded_dir))
    with _one_process_is_intended():
        _load(request, sharded_dir, no_dist=not torch.distributed.is_initialized())
    _check_copy_equal(request, scratch, Path(folder))
    for group, names in zip(request["optim"]["param_groups"], our_groups):
        group["params"] = names   # the hyperparameters (lr, ...) are the checkpoint's, the names this process's
    _restore_copy_names(request_optim, optim_state["state"])
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optim_state["state"], "param_groups": request["optim"]["param_groups"]})
    return load_training_state(folder)


def load_single_file_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                                optimizer: torch.optim.Optimizer, model_config: GPTConfig) -> dict[str, Any]:
    """Load a one-process or DDP checkpoint (state.py's: model.safetensors, and the optimizer's
    state_dict in training_state.pt) into this process's share of a sharded run (FSDP shards, a
    pipeline stage); returns its training_state.pt.

    The optimizer state is keyed by parameter number; a one-process run numbers its GPT's
    parameters in `parameter_groups` order, which names them here. Every process reads the files
    and keeps its own parameters' tensors; DCP's `set_state_dict` with full state dicts shards them.
    """
    from gpt2ipu.model.hf import load_hf_dir

    state = load_training_state(folder)
    weights = load_hf_dir(folder).state_dict()
    order = _numbered_names(model_config)
    saved = state["optimizer"]
    numbered = sum(len(group["params"]) for group in saved["param_groups"])
    if numbered != len(order):
        raise UserError(f"{folder}: its optimizer state numbers {numbered} parameters, but this run's "
                        f"model has {len(order)}: it was written by another model; resume with that run's "
                        "settings, or start fresh with --resume-training-from-checkpoint none or another --state-dir")
    full_optim = {"state": {order[i]: value for i, value in saved["state"].items()},
                  "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                   for group in saved["param_groups"]]}
    model_state, _ = get_state_dict(model, optimizer)
    # A last stage's copy of the tied weight, and its optimizer state, come from the weight's.
    copy = model_config.tie_word_embeddings and COPY in model_state and TIED not in model_state
    # In this process's order: DCP shards the tensors in the dict's order, with collectives.
    full_model = {name: weights[TIED if copy and name == COPY else name] for name in model_state}
    if copy:
        if TIED in full_optim["state"]:
            full_optim["state"][COPY] = full_optim["state"][TIED]
        for group in full_optim["param_groups"]:
            if TIED in group["params"]:
                group["params"].append(COPY)
    set_state_dict(model, optimizer, model_state_dict=full_model, optim_state_dict=full_optim,
                   options=StateDictOptions(full_state_dict=True))
    return state


def _numbered_names(model_config: GPTConfig) -> list[str]:
    """The names of a one-process run's parameters in its optimizer's numbering (`parameter_groups` order)."""
    from gpt2ipu.train.optim import parameter_groups

    with torch.device("meta"):
        model = GPT(model_config)
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in parameter_groups(model, 0.0) for param in group["params"]]


def _tied_as_saved(model: torch.nn.Module, model_state: dict, optim_state: dict) -> tuple[dict, dict]:
    """This process's model and optimizer state under the names the tied weight has in a checkpoint:
    a whole model's second name for it dropped (`wte.weight` loads the tensor), a last stage's copy
    asked for as `wte.weight`."""
    if not getattr(model, "config", None) or not model.config.tie_word_embeddings or COPY not in model_state:
        return model_state, optim_state
    if TIED in model_state:
        del model_state[COPY]
        optim_state.pop(COPY, None)
    else:
        model_state[TIED] = model_state.pop(COPY)
        if COPY in optim_state:
            optim_state[TIED] = optim_state.pop(COPY)
    return model_state, optim_state


def _restore_copy_names(request_optim: dict, optim_state: dict) -> None:
    """A last stage's copy: its optimizer state was loaded as `wte.weight`'s; put it back under its name."""
    if TIED in request_optim and TIED not in optim_state and COPY in optim_state:
        optim_state[COPY] = request_optim[TIED]


def _saved_keys(sharded_dir: Path) -> set[str]:
    """The flattened keys ("model.h.0.ln_1.weight", "optim.state.wte.weight.exp_avg", ...) a DCP checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(str(sharded_dir)).read_metadata().state_dict_metadata)
    except Exception as err:   # a missing or truncated .metadata
        raise UserError(f"{sharded_dir}: its .metadata cannot be read ({err}); resume from another checkpoint "
                        "or start fresh with --resume-training-from-checkpoint none") from err


def _copy_to_compare(request: dict, saved: set[str]) -> dict:
    """Where this process loads the tied weight and the checkpoint also holds a pipeline's copy of
    it: buffers for the copy and its optimizer state, loaded alongside to be compared."""
    if TIED not in request["model"] or f"model.{COPY}" not in saved \
            or not any(key.startswith(f"optim.state.{COPY}.") for key in saved):
        return {}
    request["model"][COPY] = torch.empty_like(request["model"][TIED])
    scratch = {"model": request["model"][COPY]}
    if TIED in request["optim"]["state"]:
        request["optim"]["state"][COPY] = {key: torch.empty_like(value) if torch.is_tensor(value) else value
                                           for key, value in request["optim"]["state"][TIED].items()}
        scratch["optim"] = request["optim"]["state"][COPY]
    return scratch


def _check_copy_equal(request: dict, scratch: dict, folder: Path) -> None:
    """Refuse a checkpoint whose tied weight and its pipeline copy differ (they are equal by
    construction: pipeline.py); the verdict is every process's, so all stop or none does."""
    differ = []
    if scratch:
        if not _equal(request["model"][TIED], scratch["model"]):
            differ.append("the weight")
        for key, value in scratch.get("optim", {}).items():
            if torch.is_tensor(value) and not _equal(request["optim"]["state"][TIED][key], value):
                differ.append(f"its optimizer state {key!r}")
        del request["model"][COPY]
        request["optim"]["state"].pop(COPY, None)
    flag = torch.tensor([float(bool(differ))], device=_device_of(request["model"]))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag)
    if flag.item() > 0:
        where = f": {', '.join(differ)}" if differ else " (found by another process)"
        raise UserError(f"{folder}: the pipeline's last stage holds a copy of the tied embedding ({COPY}) that "
                        f"differs from the first stage's {TIED}{where}. Training keeps the two equal, except "
                        "gpt2ipu before 2026-12-04, whose pipeline runs left the copy's gradient unclipped. Resume "
                        "from a checkpoint whose copy matches, or start from this one's weights (its "
                        "model.safetensors holds the first stage's) with --checkpoint-input-dir "
                        f"{folder} --resume-training-from-checkpoint none")


def _device_of(tensors: dict) -> torch.device:
    """The device this process's model is on (that of its collectives: CPU for gloo, CUDA for NCCL)."""
    return next((t.device for t in tensors.values() if torch.is_tensor(t)), torch.device("cpu"))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of this process's part of two tensors (DTensors: the local shards)."""
    return torch.equal(local_part(a), local_part(b))


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

