"""`gpt2ipu train`: GPT-2 pretraining on CPU or CUDA, one process or many (torchrun).

Reads top to bottom like nanoGPT's train.py: `train` resolves the config, builds the run (data,
model, optimizer, schedule: `build_run`), resumes it (`resume`), then loops over optimizer steps
(`Run.step`: micro-batches with gradient accumulation, clipping, the LR schedule; the one step that
`gpt2ipu profile` and `gpt2ipu bench train` also run), logging metrics (tokens/s and MFU:
gpt2ipu/train/throughput.py), validating (`validation_loss`) and saving checkpoints
(`save_checkpoint`). Resume is exact: the checkpoint holds
weights, optimizer, scheduler, scaler, RNG states and the data position, and the data order is a
pure function of (seed, epoch), so a run killed at any point and started again reaches the same
weights.

The original's flags keep their names; `gpt2ipu.train.config.resolve` translates them, and
README.md ("Training flags") says what each became.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt2ipu.data.shards import STATS_NAME
from gpt2ipu.devices import autocast_dtype
from gpt2ipu.errors import UserError
from gpt2ipu.log import package_logger
from gpt2ipu.model import GPT, config_for
from gpt2ipu.model.gpt import GPTConfig, initial_value
from gpt2ipu.model.hf import CONFIG_NAME, config_from_hf, load_hf_dir, save_hf_dir, write_hf_files
from gpt2ipu.sizes import SIZE_KEYS
from gpt2ipu.train import parallel
from gpt2ipu.train.config import LossChunks, TrainConfig, check_layout, resolve, stage_layers
from gpt2ipu.train.data import ResumableBatches, make_train_dataset
from gpt2ipu.train.metrics import MetricsLog, plot_loss_curve
from gpt2ipu.train.optim import make_optimizer, parameter_groups, train_step
from gpt2ipu.train.state import (
    checkpoint_dirs,
    latest_checkpoint,
    load_training_state,
    restore_rng_states,
    rng_states,
    save_training_checkpoint,
    set_aside,
)
from gpt2ipu.train.throughput import Throughput

log = package_logger(__name__)

if TYPE_CHECKING:
    from gpt2ipu.train.pipeline import Pipeline

# pipeline.py and sharded_state.py are imported where a run needs them: DCP and DTensor take
# seconds to import, which a one-process run would otherwise pay at every start.

Say = Callable[[str], None]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run `cfg` describes; returns the last step's metrics and `steps`.

    Called once per process: alone, or as one rank of a torchrun launch (--replication-factor).
    """
    resolved = resolve(cfg)
    cfg = resolved.config
    model_config = model_config_of(cfg)
    stage_sizes = check_layout(cfg, parallel.world_size_launched(), model_config.n_layer)   # before any allocation
    info = parallel.init_distributed(cfg.device, cfg.replication_factor, cfg.stages, mesh_of_one=cfg.fsdp)
    start_memory = peak_memory_per_rank(info)   # the interpreter and imports, before data and model
    say = make_say(info.is_main)
    for note in resolved.notes:
        say(note)
    if info.device.type == "cpu" and cfg.precision != "fp32":
        say(f"--precision {cfg.precision} on CPU: this CPU may have no fast {cfg.precision} path "
            "(fp32 is the default here).")

    run = build_run(cfg, model_config, stage_sizes, resolved.loss_chunks, info, say)
    start_step = resume(run, say)
    if cfg.compile and not run.sharded:   # sharded runs compiled their blocks (parallelize)
        run.model = torch.compile(run.model)
    if not run.sharded:   # DDP wraps after resume, which loads into the bare model
        run.model = parallel.apply_data_parallel(run.model, info)

    speed = run.throughput()
    metrics = MetricsLog(cfg.state_dir, resume_step=start_step, enabled=info.is_main)
    resized = ", ".join(f"{key} {getattr(cfg, key)}" for key in SIZE_KEYS if getattr(cfg, key) is not None)
    say(f"model {cfg.model}{' with ' + resized if resized else ''}: {run.n_params / 1e6:.1f}M parameters "
        f"(position embeddings not counted), device {info.device}, precision {cfg.precision}, "
        f"{describe_layout(cfg, info, stage_sizes)}, global batch {cfg.global_batch} x {cfg.max_len} tokens, "
        f"{run.total_steps} steps ({run.batches.steps_per_epoch}/epoch); MFU against the {speed.peak_source} "
        f"({speed.peak / 1e9:.0f} GFLOP/s)")
    progress = make_progress(run.total_steps, start_step, enabled=info.is_main and cfg.progress)

    run.model.train()
    step, last = start_step, {}
    steps = iter(run.batches)
    while step < run.total_steps:
        start = time.perf_counter()
        lr = run.scheduler.get_last_lr()[0]
        result = run.step(next(steps))
        step += 1

        stats = parallel.mean_over_replicas(torch.stack([result["loss"], result["accuracy"]]), info)
        loss_value, acc_value = stats[0].item(), stats[1].item()   # .item() waits for the step
        seconds = time.perf_counter() - start
        grad_norm = float(result["grad_norm"])
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise non_finite_step(loss_value, grad_norm, step, cfg.state_dir, info)
        record = {"step": step, "epoch": run.batches.epoch, "loss": loss_value, "accuracy": acc_value, "lr": lr,
                  "grad_norm": grad_norm, **speed.rates(seconds)}
        if step == run.total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            record.update(validation_loss(run, say))
        if step % cfg.log_every == 0 or "valid_loss" in record or step == run.total_steps:
            metrics.log(record)
        last = record
        progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        progress.update(1)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (step == run.total_steps and (
                cfg.final_checkpoint or (run.sharded and cfg.save_model_path))):
            save_checkpoint(run, step)
    progress.close()
    metrics.close()
    run.batches.close()

    memory = {"rank_peak_memory_mb": peak_memory_per_rank(info), "rank_memory_at_start_mb": start_memory}
    finish(run)
    return {"steps": step, **last, **memory}


@dataclass
class Run:
    """The built pieces of one training run, passed to the functions the loop calls.

    `model` is what the loop calls (compiled and/or wrapped for data parallelism once resumed);
    `raw_model` is what checkpoints save and resume loads into: the bare GPT, the FSDP-sharded GPT
    (--fsdp), or this process's pipeline stage (`pipeline`, which then runs the steps).
    """

    cfg: TrainConfig
    info: parallel.DistInfo
    model: torch.nn.Module
    raw_model: torch.nn.Module
    model_config: GPTConfig       # the whole model's, whatever share of it this process holds
    n_params: int                 # the whole model's parameters less its position embeddings (GPT.num_parameters)
    pipeline: Pipeline | None     # this process's pipeline stage and schedule (--pipeline-stages > 1)
    optimizer: torch.optim.Optimizer
    scheduler: Any               # a torch LR scheduler (transformers' schedules)
    scaler: torch.amp.GradScaler  # enabled only for fp16
    batches: ResumableBatches     # the training data, resumable at any step
    valid_data: Any               # the validation dataset; None when the shards have no valid split
    total_steps: int
    loss_chunks: LossChunks
    autocast_dtype: torch.dtype | None   # None: fp32 or FSDP's mixed precision, no autocast
    said: set[str] = field(default_factory=set)   # messages said once per run (say_once)

    @property
    def sharded(self) -> bool:
        """Whether each process holds a share of the model (FSDP, pipeline stages): checkpoints are then DCP's."""
        return self.cfg.fsdp or self.pipeline is not None

    def clip_gradients(self, params, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to max_norm (this layout's: PyTorch's, or parallel.clip_grad_norm_
        over shards and stages); returns the norm before clipping."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return parallel.clip_grad_norm_(params, max_norm, self.info)

    def step(self, batch) -> dict[str, torch.Tensor]:
        """One optimizer step of training on `batch` (a TrainStep of the run's data: its micro-batches):
        the one step that training, `gpt2ipu profile` and `gpt2ipu bench train` run.

        Forward and backward over its micro-batches (accumulation), the gradients' norm clipped to
        --grad-clip (measured only when 0), the optimizer and LR-scheduler steps. Returns device
        tensors, no host sync: loss and accuracy (this process's mean over the micro-batches) and
        grad_norm.
        """
        cfg, device = self.cfg, self.info.device
        micro_batches = [inputs_and_labels(micro, device) for micro in batch.micro_batches]
        max_grad_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.pipeline is not None:
            result = self.pipeline.train_step(self.optimizer, micro_batches, autocast_dtype=self.autocast_dtype,
                                              max_grad_norm=max_grad_norm)
        else:
            chunks = self.loss_chunks.for_tokens(micro_batches[0][0].numel())
            result = train_step(self.model, self.optimizer, micro_batches, loss_chunks=chunks,
                                autocast_dtype=self.autocast_dtype, scaler=self.scaler, max_grad_norm=max_grad_norm,
                                clip_grad_norm=self.clip_gradients)
        self.scheduler.step()
        return result

    def throughput(self) -> Throughput:
        """Tokens/s and MFU of this run's steps (the device peak is probed here, once)."""
        cfg, mcfg = self.cfg, self.model_config
        return Throughput.of(n_params=self.n_params, n_layer=mcfg.n_layer, n_embd=mcfg.n_embd, seq_len=cfg.max_len,
                             samples_per_step=cfg.global_batch, device=self.info.device, precision=cfg.precision,
                             world_size=self.info.world_size)


def build_run(cfg: TrainConfig, model_config: GPTConfig, stage_sizes: list[int] | None, loss_chunks: LossChunks,
              info: parallel.DistInfo, say: Say) -> Run:
    """Seed torch, then build the data, the model (fresh or from --checkpoint-input-dir; this
    process's pipeline stage and/or FSDP shard of it), the optimizer (sharded with
    --replicated-tensor-sharding), the LR schedule and the grad scaler.

    Each parameter's initial value is a function of (--seed, its name) (gpt2ipu.model.gpt.init_weights),
    so every layout starts from the weights one process does while a sharded process (FSDP, pipeline
    stages) builds the model on the meta device and materializes only the parameters it holds.
    """
    torch.manual_seed(cfg.seed)
    train_data = make_train_dataset(cfg.dataset, shards_dir=cfg.shards_dir, split="train", max_len=cfg.max_len,
                                    vocab_size=cfg.vocab_size, seed=cfg.seed, num_epochs=cfg.epochs,
                                    generated_samples=cfg.generated_samples)
    if has_valid_split(cfg):
        valid_data = make_train_dataset(cfg.dataset, shards_dir=cfg.shards_dir, split="valid", max_len=cfg.max_len,
                                        vocab_size=cfg.vocab_size, seed=cfg.seed + 1, num_epochs=1,
                                        generated_samples=validation_samples(cfg, info.dp_size))
    else:
        valid_data = None
        say("no validation split (shards.valid_fraction 0): training without validation")
    # Megatron-style mmap data already holds `epochs` shuffled passes over the documents.
    data_epochs = 1 if cfg.dataset == "mmap" else cfg.epochs
    batches = ResumableBatches(train_data, micro_batch=cfg.batch_size, grad_accum=cfg.gradient_accumulation,
                               world_size=info.dp_size, rank=info.dp_rank, seed=cfg.seed, num_epochs=data_epochs,
                               num_workers=cfg.num_workers, persistent_workers=True)
    total_steps = batches.total_steps if cfg.max_steps is None else min(batches.total_steps, cfg.max_steps)

    if cfg.checkpoint_input_dir:
        say(f"starting from the weights in {cfg.checkpoint_input_dir}")
    sharded = cfg.fsdp or stage_sizes is not None
    model = build_model(cfg, model_config, meta=sharded)
    n_params = model.num_parameters()   # the whole model's, before any split (FLOP count: throughput.py)
    weights = initial_weights(cfg, model_config) if sharded else None
    model, raw_model, pipeline, autocast = parallelize(model, cfg, stage_sizes, loss_chunks, info, weights)
    del weights   # a --checkpoint-input-dir's whole state: each process has taken its share
    optimizer = make_optimizer(raw_model, kind=cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.replicated_tensor_sharding and info.world_size > 1:
        optimizer = parallel.shard_optimizer(parameter_groups(model, cfg.weight_decay), type(optimizer),
                                             **{k: v for k, v in optimizer.defaults.items() if k != "weight_decay"})
    elif cfg.replicated_tensor_sharding:
        say("--replicated-tensor-sharding with one process: nothing to shard over; the plain optimizer is used.")
    return Run(cfg=cfg, info=info, model=model, raw_model=raw_model, model_config=model_config, n_params=n_params,
               pipeline=pipeline, optimizer=optimizer,
               scheduler=make_scheduler(optimizer, cfg, total_steps),
               scaler=torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16"),
               batches=batches, valid_data=valid_data, total_steps=total_steps, loss_chunks=loss_chunks,
               autocast_dtype=autocast)


def build_model(cfg: TrainConfig, model_config: GPTConfig, *, meta: bool) -> GPT:
    """The whole GPT of the run: initialised from --seed or loaded from --checkpoint-input-dir, or,
    with `meta`, without storage (parallelize materializes this process's share of it)."""
    if meta:
        with torch.device("meta"):
            return GPT(model_config)
    if cfg.checkpoint_input_dir:
        return load_hf_dir(cfg.checkpoint_input_dir, recompute=cfg.recompute_checkpoint_every_layer)
    return GPT(model_config, seed=cfg.seed)


def initial_weights(cfg: TrainConfig, model_config: GPTConfig) -> Callable[[str, tuple], torch.Tensor]:
    """The value of each parameter at the start, by name and shape: its initialisation (one parameter
    at a time), or the tensor of --checkpoint-input-dir. That folder is still read whole by every
    process (one model's worth of host memory while the shares are taken); reading only each
    process's slices (safetensors' get_slice, through hf.py's name and layout mapping) is not done."""
    if not cfg.checkpoint_input_dir:
        return lambda name, shape: initial_value(name, shape, model_config, cfg.seed)
    state = load_hf_dir(cfg.checkpoint_input_dir, recompute=cfg.recompute_checkpoint_every_layer).state_dict()
    return lambda name, shape: state[name]


def validation_samples(cfg: TrainConfig, dp_size: int) -> int:
    """Samples of generated validation data: --eval-batches micro-batches per replica, and at least one
    pipeline step's (--gradient-accumulation micro-batches: the schedule runs whole steps)."""
    micro_batches = max(cfg.eval_batches, cfg.gradient_accumulation if cfg.stages > 1 else 1, 1)
    return micro_batches * cfg.batch_size * dp_size


def model_config_of(cfg: TrainConfig) -> GPTConfig:
    """The configuration of the model the run trains: --checkpoint-input-dir's, else the --model preset's
    with --n-layer, --n-embd, --n-head, --n-positions in place of its own."""
    if cfg.checkpoint_input_dir:
        return config_from_hf(Path(cfg.checkpoint_input_dir) / CONFIG_NAME,
                              recompute=cfg.recompute_checkpoint_every_layer)
    return config_for(cfg.model, cfg.max_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                      n_head=cfg.n_head, n_positions=cfg.n_positions, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      resid_pdrop=cfg.dropout, recompute=cfg.recompute_checkpoint_every_layer)


def parallelize(model: GPT, cfg: TrainConfig, stage_sizes: list[int] | None, loss_chunks: LossChunks,
                info: parallel.DistInfo, weights: Callable[[str, tuple], torch.Tensor] | None):
    """Apply the run's layout to the whole model: (what the loop calls, what checkpoints hold, the
    pipeline or None, the autocast dtype or None).

    Pipeline stages (each FSDP- or DDP-wrapped over the replicas) or FSDP alone: `model` is on the
    meta device; this process takes its share (its stage), shards it (FSDP), and only then
    materializes it with `weights` (initial_weights). Otherwise the model as it is (DDP is applied
    after resume, see `train`). With --compile the blocks are compiled before FSDP or the pipeline
    wraps them. Under FSDP, bf16 is FSDP's mixed-precision policy rather than autocast.
    """
    dtype = autocast_dtype(cfg.precision)
    fsdp_dtype = dtype if cfg.fsdp else None

    def share(module: torch.nn.Module, blocks) -> torch.nn.Module:
        """This process's share of the model (a meta module) compiled, sharded or replicated, materialized."""
        if cfg.compile:
            parallel.compile_blocks(blocks)
        if cfg.fsdp:
            wrapped = parallel.apply_fsdp(module, blocks, info, fsdp_dtype)
            parallel.materialize(module, info.device, weights)   # after sharding: only this shard is allocated
            return wrapped
        parallel.materialize(module, info.device, weights)
        return parallel.apply_replicate(module, info) if info.dp_size > 1 else module

    if stage_sizes is not None:
        from gpt2ipu.train.pipeline import build_pipeline

        layers = stage_layers(sum(stage_sizes), len(stage_sizes), stage_sizes)
        tokens = cfg.batch_size * cfg.max_len
        pipeline = build_pipeline(model, info, layers, loss_chunks=loss_chunks.for_tokens(tokens),
                                  n_microbatches=cfg.gradient_accumulation, schedule=cfg.pipeline_schedule,
                                  wrap=lambda stage: share(stage, list(stage.h.values())))
        return pipeline.module, pipeline.stage_module, pipeline, None if cfg.fsdp else dtype
    if cfg.fsdp:
        model = share(model, list(model.h))
        return model, model, None, None
    model.to(info.device)
    return model, model, None, dtype


def describe_layout(cfg: TrainConfig, info: parallel.DistInfo, stage_sizes: list[int] | None) -> str:
    """The run's processes in words, for its summary line."""
    replicas = f"{info.dp_size} replica(s) ({'FSDP' if cfg.fsdp else 'DDP' if info.dp_size > 1 else 'one process'})"
    if stage_sizes is None:
        return f"{info.world_size} process(es): {replicas}"
    return (f"{info.world_size} process(es): {len(stage_sizes)} pipeline stages ({cfg.pipeline_schedule}, layers "
            f"{'+'.join(map(str, stage_sizes))}) x {replicas}")

def has_valid_split(cfg: TrainConfig) -> bool:
    """False only when the shards stage made no validation split: its stats.json says valid_fraction 0.

    Shards without a stats.json (made elsewhere) are expected to have one; reading them says if not.
    """
    if cfg.dataset == "generated" or not cfg.shards_dir:
        return True
    try:
        stats = json.loads((Path(cfg.shards_dir) / STATS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(stats, dict) and stats.get("valid_fraction") == 0 and not stats.get("valid_documents"))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warmup in steps: --lr-warmup-steps, else --lr-warmup as a fraction of total_steps, else none."""
    if cfg.lr_warmup_steps is not None:
        return cfg.lr_warmup_steps
    if cfg.lr_warmup is not None:
        return int(cfg.lr_warmup * total_steps)
    return 0


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """The LR schedule of --lr-schedule with its warmup, stepped once per optimizer step."""
    # transformers' schedules are the ones the original used (linear/cosine decay to 0 after warmup).
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder --resume-training-from-checkpoint names (auto: the latest in --state-dir), or None."""
    if cfg.resume_training_from_checkpoint == "auto":
        return latest_checkpoint(cfg.state_dir)
    if cfg.resume_training_from_checkpoint in (None, "none"):
        return None
    folder = Path(cfg.resume_training_from_checkpoint)
    if not (folder / "training_state.pt").is_file():
        raise UserError(f"--resume-training-from-checkpoint {folder}: no training_state.pt there")
    return folder


def resume(run: Run, say: Say) -> int:
    """Load the checkpoint to resume from, if any, into the run (not yet DDP-wrapped): weights,
    optimizer, scheduler, scaler, this rank's RNG states and the data position. The step to start at.

    Any checkpoint of the same model resumes in any layout: a sharded one (DCP: FSDP or pipeline
    runs) through sharded_state.load_sharded_checkpoint, a single-file one (one process or DDP)
    as it is into those layouts and through sharded_state.load_single_file_checkpoint into a
    sharded run. The data order depends only on the global batch, which must stay the same.
    """
    folder = checkpoint_to_resume(run.cfg)
    if folder is None:
        return 0
    from gpt2ipu.train.sharded_state import is_sharded, load_sharded_checkpoint, load_single_file_checkpoint

    check_same_model(folder, run.model_config)
    if is_sharded(folder):
        state = load_sharded_checkpoint(folder, run.raw_model, run.optimizer)
    elif run.sharded:
        state = load_single_file_checkpoint(folder, run.raw_model, run.optimizer, run.model_config)
    else:
        state = load_training_state(folder)
        saved = load_hf_dir(folder).state_dict()
        check_same_shapes(saved, run.raw_model.state_dict(), folder)
        run.raw_model.load_state_dict(saved)
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    rank = run.info.rank
    restore_rng_states(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], run.info.device)
    say(f"resuming from {folder} at step {int(state['step'])}{layout_change(folder, run)}")
    run.batches.load_state_dict(state["data"])
    return int(state["step"])


def check_same_model(folder: Path, model_config: GPTConfig) -> None:
    """Refuse, in one message, a checkpoint of another model than the one this run builds: its
    config.json (every checkpoint has one) against the run's model, before any tensor is read."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG_NAME}, so not a gpt2ipu training checkpoint; resume from another "
                        "one, or start fresh with --resume-training-from-checkpoint none or another --state-dir")
    saved = config_from_hf(path)
    keys = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "tie_word_embeddings")
    differ = [key for key in keys if getattr(saved, key) != getattr(model_config, key)]
    if differ:
        raise UserError(f"{folder}: this checkpoint is of another model than this run's: "
                        + ", ".join(f"{key} {getattr(saved, key)} there, {getattr(model_config, key)} here"
                                    for key in differ)
                        + "; resume it with the settings of the run that wrote it (--model, --n-layer, --n-embd, "
                        "--n-head, --max-len, --vocab-size; its train_config.json has them), or start fresh with "
                        "--resume-training-from-checkpoint none or another --state-dir")


def layout_change(folder: Path, run: Run) -> str:
    """' (written by <layout>; this run: <layout>)' when the checkpoint's run had another layout, else ''."""
    try:
        values = json.loads((folder / "train_config.json").read_text(encoding="utf-8"))
        saved = TrainConfig.from_dict(values, str(folder))
    except (OSError, ValueError, TypeError, UserError):
        return ""   # an older or hand-made record: the layout is not needed to resume
    theirs, ours = layout_words(saved), layout_words(run.cfg)
    return "" if theirs == ours else f" (written by {theirs}; this run: {ours})"


def layout_words(cfg: TrainConfig) -> str:
    """A run's layout in a few words: '2 pipeline stages x FSDP over 2', 'DDP over 4', 'one process'."""
    replicas = cfg.replication_factor
    data = f"FSDP over {replicas}" if cfg.fsdp else f"DDP over {replicas}" if replicas > 1 else ""
    if cfg.stages > 1:
        return f"{cfg.stages} pipeline stages" + (f" x {data}" if data else "")
    return data or "one process"


def check_same_shapes(saved: dict, expected: dict, folder) -> None:
    """Refuse, in one message, a checkpoint whose model is not the one this run builds (the tensors'
    shapes: what check_same_model's config.json cannot vouch for)."""
    for name, tensor in expected.items():
        found = saved.get(name)
        if found is None or found.shape != tensor.shape:
            what = "has no tensor" if found is None else f"holds shape {list(found.shape)} for"
            raise UserError(f"{folder}: the checkpoint {what} {name}, but this run's model (--model and its "
                            f"settings) has {list(tensor.shape)}: it was written by another run; resume with "
                            "that run's settings, or start fresh with --resume-training-from-checkpoint none "
                            "or another --state-dir")


def inputs_and_labels(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A [batch, max_len + 1] token batch -> (inputs, next-token labels) on the device."""
    batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def validation_loss(run: Run, say: Say) -> dict[str, float]:
    """valid_loss and valid_ppl: the mean loss over --eval-batches validation micro-batches (pipeline
    stages: whole steps of --gradient-accumulation micro-batches, the schedule's fixed shape, at
    least one), averaged over the processes.

    {} (nothing logged) when there is nothing to score: no validation split, or fewer validation
    samples than one evaluation step takes; the latter is said once per run. Never a made-up figure.
    """
    cfg, info, model = run.cfg, run.info, run.model
    if run.valid_data is None:
        return {}
    per_step = run.pipeline.n_microbatches if run.pipeline else 1
    batch_size = cfg.batch_size if run.pipeline else min(cfg.batch_size, len(run.valid_data) // info.dp_size)
    needed = max(batch_size, 1) * per_step * info.dp_size
    if batch_size == 0 or len(run.valid_data) < needed:
        say_once(run, say, f"no validation loss: the validation split has {len(run.valid_data)} samples, fewer than "
                           f"one evaluation step takes ({max(batch_size, 1)} x {per_step} micro-batch(es) x "
                           f"{info.dp_size} replica(s) = {needed}); make the split larger (shards.valid_fraction)"
                           + (" or use fewer micro-batches (--gradient-accumulation)" if run.pipeline else ""))
        return {}
    model.eval()
    total = torch.zeros(2, device=info.device)
    with ResumableBatches(run.valid_data, micro_batch=batch_size, grad_accum=per_step, rank=info.dp_rank,
                          world_size=info.dp_size, seed=cfg.seed, shuffle=False) as valid_batches:
        for i, valid_step in enumerate(valid_batches):
            if i * per_step >= cfg.eval_batches:
                break
            micro_batches = [inputs_and_labels(batch, info.device) for batch in valid_step.micro_batches]
            if run.pipeline:
                loss, _ = run.pipeline.run(micro_batches, run.autocast_dtype, train=False)
            else:
                inputs, labels = micro_batches[0]
                with autocast(info.device, run.autocast_dtype):
                    loss, _, _ = model(inputs, labels, **run.loss_chunks.for_tokens(inputs.numel()))
            total += torch.stack([loss.detach().float(), torch.ones((), device=info.device)])
    model.train()
    total = parallel.mean_over_replicas(total, info)
    if total[1].item() == 0:
        say_once(run, say, "no validation loss: the validation data gave no batch")
        return {}
    mean = (total[0] / total[1]).item()
    return {"valid_loss": mean, "valid_ppl": math.exp(min(mean, 50.0))}


def say_once(run: Run, say: Say, message: str) -> None:
    """`say(message)` the first time this run has it to say."""
    if message not in run.said:
        run.said.add(message)
        say(message)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype`, or nothing for fp32 (dtype None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def save_checkpoint(run: Run, step: int) -> None:
    """Write the resumable checkpoint of `step` (rank 0 writes; every rank contributes its RNG state)."""
    cfg, info = run.cfg, run.info
    all_rng = gather_rng(rng_states(info.device), info)
    if run.sharded:   # every process writes its shards (sharded_state.py)
        from gpt2ipu.train.sharded_state import save_sharded_checkpoint

        state = {"scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": step,
                 "data": run.batches.state_dict(), "rng": all_rng}
        save_sharded_checkpoint(cfg.state_dir, step, run.raw_model, run.optimizer, state, dataclasses.asdict(cfg),
                                keep=cfg.keep_checkpoints, is_main=info.is_main,
                                barrier=lambda: parallel.barrier(info), model_config=run.model_config)
        return
    if cfg.replicated_tensor_sharding and info.world_size > 1:
        run.optimizer.consolidate_state_dict(to=0)
    if info.is_main:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "step": step, "data": run.batches.state_dict(), "rng": all_rng}
        save_training_checkpoint(cfg.state_dir, step, lambda folder: write_hf_files(run.raw_model, folder), state,
                                 dataclasses.asdict(cfg), keep=cfg.keep_checkpoints)
    parallel.barrier(info)


def non_finite_step(loss_value: float, grad_norm: float, step: int, state_dir: str,
                    info: parallel.DistInfo) -> UserError:
    """The error that stops a run whose loss or gradient norm became NaN or infinite at `step`.

    Step N runs on the weights saved at step N - 1, so that checkpoint is not good: its next step
    was not finite. The main process sets aside every checkpoint from step N - 1 on (state.set_aside),
    so the message, and a rerun resuming from the latest checkpoint, name one whose next step was finite.
    """
    if info.is_main:
        for folder in checkpoint_dirs(state_dir):
            if int(folder.name.split("-")[1]) >= step - 1:
                set_aside(folder)
    last_good = latest_checkpoint(state_dir)
    what = (f"the training loss became {loss_value}" if not math.isfinite(loss_value)
            else f"the gradient norm became {grad_norm} (loss {loss_value})")
    return UserError(f"{what} at step {step}; stopping. The last good checkpoint (the last whose next step was "
                     f"finite) is {last_good or '(none yet)'}; lower --learning-rate, raise warmup, "
                     "or use --precision fp32, then rerun to resume from it")


def finish(run: Run) -> None:
    """Write the final Hugging Face directory and the loss plot (--save-model-path), then leave the process group."""
    cfg, info = run.cfg, run.info
    if info.is_main and cfg.save_model_path:
        # A sharded run's whole model is the one its last checkpoint consolidated.
        whole = load_hf_dir(latest_checkpoint(cfg.state_dir)) if run.sharded else run.raw_model
        save_hf_dir(whole, cfg.save_model_path)
        metrics_path = Path(cfg.state_dir) / "metrics.jsonl"
        if metrics_path.exists():
            plot_loss_curve(metrics_path, Path(cfg.state_dir) / "loss.png")
    parallel.barrier(info)
    parallel.shutdown(info)


def gather_rng(states: dict, info: parallel.DistInfo) -> list[dict]:
    """Every rank's RNG states (dropout differs per rank), gathered to rank 0 for the checkpoint."""
    if info.world_size == 1:
        return [states]
    import torch.distributed as dist

    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in states.items()})
    return gathered


def peak_memory_per_rank(info: parallel.DistInfo) -> list[float]:
    """Every process's peak memory in MB (CUDA: allocated by torch; CPU: peak RSS), gathered to all."""
    if info.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(info.device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    if info.world_size == 1:
        return [peak]
    import torch.distributed as dist

    peaks = torch.zeros(info.world_size, dtype=torch.float64, device=info.device)
    peaks[info.rank] = peak
    dist.all_reduce(peaks)
    return peaks.tolist()


def make_say(enabled: bool) -> Say:
    """Log `[gpt2ipu train] msg` (gpt2ipu.log) on the main process; a no-op on the others."""
    if not enabled:
        return lambda msg: None
    return lambda msg: log.info(f"[gpt2ipu train] {msg}")


def make_progress(total: int, initial: int, enabled: bool):
    """The tqdm step bar on stderr (disabled off the main process or with --progress false)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
