"""`gpt2ipu train`: GPT-2 pretraining on CPU or CUDA, one process or many (torchrun).

Reads top to bottom like nanoGPT's train.py: config, data, model, optimizer, then the loop of
optimizer steps (micro-batches with gradient accumulation, clipping, the LR schedule), metrics,
validation and checkpoints. Resume is exact: the checkpoint holds weights, optimizer, scheduler,
scaler, RNG states and the data position, and the data order is a pure function of
(seed, epoch), so a run killed at any point and started again reaches the same weights.

The original's flags keep their names; README.md ("Training flags") says what each became.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2ipu.errors import UserError

# Flags that only mean something on an IPU: accepted, and each says what it means here.
IPU_ONLY_FLAGS = {
    "layers_per_ipu": "IPU pipeline placement of layers; here every process holds the whole model",
    "ipus_per_replica": "IPUs spanned by one replica; here a replica is one CPU process or one GPU "
                        "(use --replication-factor for data parallelism)",
    "matmul_proportion": "IPU tile memory reserved for matmuls; no counterpart on CPU/CUDA",
    "device_iterations": "IPU steps run per host call; here every optimizer step is one host "
                         "step (use --gradient-accumulation for the same global batch)",
    "remap_logit": "IPU tile remapping of the logits; here the chunked loss "
                   "(--embedding-serialization-factor) is what keeps the logits small",
}


@dataclass
class TrainConfig:
    # model
    model: str = "gpt2-test"
    max_len: int = 128
    dropout: float = 0.0
    recompute_checkpoint_every_layer: bool = False
    embedding_serialization_factor: int = 1   # vocabulary chunks of the LM-head loss
    enable_sequence_serialized: bool = False  # chunk the loss over tokens instead
    serialized_seq_len: int = 128             # tokens per chunk with --enable-sequence-serialized
    checkpoint_input_dir: str | None = None   # start from a Hugging Face GPT-2 directory
    # data
    dataset: str = "generated"                # generated | tfrecord | mmap
    shards_dir: str | None = None
    vocab_size: int = 50257
    generated_samples: int = 4096
    num_workers: int = 0
    # optimization
    batch_size: int = 4                       # micro-batch per process
    gradient_accumulation: int = 1
    epochs: int = 1
    max_steps: int | None = None              # stop after this many optimizer steps (<= epochs)
    optimizer: str = "AdamW"                  # AdamW | Adam | LAMB
    learning_rate: float = 1.5e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"             # constant | linear | cosine
    lr_warmup: float | None = None            # warmup as a fraction of all steps
    lr_warmup_steps: int | None = None
    grad_clip: float = 1.0                    # 0 disables clipping (the norm is still logged)
    seed: int = 42
    precision: str = "fp32"                   # fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"
    # parallelism
    replication_factor: int = 1
    replicated_tensor_sharding: bool = False
    # bookkeeping
    state_dir: str = "train_state"            # checkpoints, metrics.jsonl, tensorboard/
    save_model_path: str | None = None        # the final Hugging Face directory
    resume_training_from_checkpoint: str | None = "auto"  # auto = latest in state_dir, none = fresh
    log_every: int = 1
    eval_every: int = 0                       # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    # IPU-only flags, accepted and explained (see IPU_ONLY_FLAGS)
    layers_per_ipu: list[int] | None = None
    ipus_per_replica: int | None = None
    matmul_proportion: list[float] | None = None
    device_iterations: int | None = None
    remap_logit: bool | None = None
    enable_half_partials: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.replication_factor

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"{source}: unknown training key(s) {unknown}; known keys: {sorted(fields)}")
        return cls(**{key: _typed(key, value, fields[key].type, source) for key, value in values.items()})


def _typed(key: str, value: Any, annotation: str, source: str) -> Any:
    """Check (and, for strings from a command line or `--config`, convert) one training value."""
    base = annotation.split(" ")[0]
    kind = {"int": int, "float": float, "bool": bool}.get(base)
    if kind is None or value is None:
        return value
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if value is None and "None" in annotation:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"{source}: training key '{key}' must be {annotation}, got {value!r}")
    return value


def check_config(cfg: TrainConfig) -> None:
    choices = {"dataset": ("generated", "tfrecord", "mmap"), "optimizer": ("AdamW", "Adam", "LAMB"),
               "lr_schedule": ("constant", "linear", "cosine"), "precision": ("fp32", "bf16", "fp16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"training key '{key}': {getattr(cfg, key)!r} is not one of {list(allowed)}")
    for key in ("batch_size", "gradient_accumulation", "epochs", "max_len", "embedding_serialization_factor"):
        if getattr(cfg, key) < 1:
            raise UserError(f"training key '{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.dataset != "generated" and not cfg.shards_dir:
        raise UserError(f"--dataset {cfg.dataset} needs --shards-dir (the shards stage's output folder)")
    if cfg.lr_warmup is not None and not 0 <= cfg.lr_warmup < 1:
        raise UserError(f"--lr-warmup is a fraction of the steps in [0, 1), got {cfg.lr_warmup}")


def explain_ipu_flags(cfg: TrainConfig, say) -> None:
    for name, meaning in IPU_ONLY_FLAGS.items():
        if getattr(cfg, name) not in (None, False):
            say(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {meaning}; it has no effect here.")
    if cfg.enable_half_partials and cfg.precision == "fp32":
        cfg.precision = "fp16"
        say("--enable-half-partials: half-precision matmul partials become --precision fp16 (autocast "
            "with a grad scaler); use --precision bf16 on GPUs that support it.")


# ----------------------------------------------------------------------------- schedule


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.lr_warmup_steps is not None:
        return cfg.lr_warmup_steps
    if cfg.lr_warmup is not None:
        return int(cfg.lr_warmup * total_steps)
    return 0


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    # transformers' schedules are the ones the original used (linear/cosine decay to 0 after warmup).
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)


# ----------------------------------------------------------------------------- FLOPs, MFU


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward 2N, backward 4N) plus attention."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def peak_flops(device, precision: str) -> tuple[float, str]:
    """The device's matmul peak: stated for known GPUs, otherwise measured with a large matmul."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        stated = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
        for key, value in stated.items():
            if key in name and precision in ("bf16", "fp16"):
                return value, f"stated dense {precision} peak of {name}"
    size = 2048
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu":
        dtype = torch.float32
    # A private generator: the probe must not move the training RNG (exact resume depends on it).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(5):  # the fastest of several: the probe estimates what the hardware can do
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best, f"measured {size}x{size} {dtype} matmul (best of 5)"


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> dict[str, Any]:
    import torch

    from gpt2ipu import parallel
    from gpt2ipu.allocator import keep_freed_memory
    from gpt2ipu.checkpoint import load_hf_dir, save_hf_dir, write_hf_files
    from gpt2ipu.metrics import MetricsLog, plot_loss_curve
    from gpt2ipu.model import GPT, config_for
    from gpt2ipu.optim import make_optimizer, parameter_groups, train_step
    from gpt2ipu.train_checkpoint import (latest_checkpoint, load_training_state, restore_rng_states,
                                          rng_states, save_training_checkpoint)
    from gpt2ipu.train_data import ResumableBatches, make_train_dataset

    check_config(cfg)
    keep_freed_memory()   # each step reuses the last step's pages (gpt2ipu/allocator.py)
    info = parallel.init_distributed(cfg.device, cfg.replication_factor)
    say = (lambda msg: print(f"[gpt2ipu train] {msg}", file=sys.stderr, flush=True)) if info.is_main else (lambda msg: None)
    explain_ipu_flags(cfg, say)
    device = info.device
    if device.type == "cpu" and cfg.precision != "fp32":
        say(f"--precision {cfg.precision} on CPU: this CPU may have no fast {cfg.precision} path (fp32 is the default here).")
    torch.manual_seed(cfg.seed)

    # -- data
    train_data = make_train_dataset(cfg.dataset, shards_dir=cfg.shards_dir, split="train", max_len=cfg.max_len,
                                    vocab_size=cfg.vocab_size, seed=cfg.seed, num_epochs=cfg.epochs,
                                    generated_samples=cfg.generated_samples)
    valid_data = make_train_dataset(cfg.dataset, shards_dir=cfg.shards_dir, split="valid", max_len=cfg.max_len,
                                    vocab_size=cfg.vocab_size, seed=cfg.seed + 1, num_epochs=1,
                                    generated_samples=max(cfg.eval_batches * cfg.batch_size * info.world_size, 1))
    # Megatron-style mmap data already holds `epochs` shuffled passes over the documents.
    data_epochs = 1 if cfg.dataset == "mmap" else cfg.epochs
    batches = ResumableBatches(train_data, micro_batch=cfg.batch_size, grad_accum=cfg.gradient_accumulation,
                               world_size=info.world_size, rank=info.rank, seed=cfg.seed, num_epochs=data_epochs,
                               num_workers=cfg.num_workers, persistent_workers=True)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = batches.total_steps
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # -- model
    if cfg.checkpoint_input_dir:
        model = load_hf_dir(cfg.checkpoint_input_dir)
        say(f"starting from the weights in {cfg.checkpoint_input_dir}")
    else:
        model = GPT(config_for(cfg.model, cfg.max_len, vocab_size=cfg.vocab_size, embd_pdrop=cfg.dropout,
                               attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout,
                               recompute=cfg.recompute_checkpoint_every_layer))
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    mcfg = model.config
    optimizer = make_optimizer(model, kind=cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.replicated_tensor_sharding and info.world_size > 1:
        optimizer = parallel.shard_optimizer(parameter_groups(model, cfg.weight_decay), type(optimizer),
                                             **{k: v for k, v in optimizer.defaults.items() if k != "weight_decay"})
    elif cfg.replicated_tensor_sharding:
        say("--replicated-tensor-sharding with one process: nothing to shard over; the plain optimizer is used.")
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    # -- resume
    start_step, data_state = 0, None
    resume_from = None
    if cfg.resume_training_from_checkpoint == "auto":
        resume_from = latest_checkpoint(cfg.state_dir)
    elif cfg.resume_training_from_checkpoint not in (None, "none"):
        resume_from = Path(cfg.resume_training_from_checkpoint)
        if not (resume_from / "training_state.pt").is_file():
            raise UserError(f"--resume-training-from-checkpoint {resume_from}: no training_state.pt there")
    if resume_from is not None:
        state = load_training_state(resume_from)
        model.load_state_dict(load_hf_dir(resume_from).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step, data_state = int(state["step"]), state["data"]
        restore_rng_states(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0], device)
        say(f"resuming from {resume_from} at step {start_step}")

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    model = parallel.apply_data_parallel(model, info)

    if data_state is not None:
        batches.load_state_dict(data_state)

    vocab_chunks = cfg.embedding_serialization_factor if not cfg.enable_sequence_serialized else 1
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def loss_chunks(n_tokens: int) -> dict[str, int]:
        token_chunks = max(1, math.ceil(n_tokens / cfg.serialized_seq_len)) if cfg.enable_sequence_serialized else 1
        return {"vocab_chunks": vocab_chunks, "token_chunks": token_chunks}

    def inputs_and_labels(batch):
        batch = batch.to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def loss_of(batch):
        inputs, labels = inputs_and_labels(batch)
        with autocast():
            loss, extra = model(inputs, labels=labels, **loss_chunks(inputs.numel()))
        return loss, extra["accuracy"]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        batch_size = min(cfg.batch_size, len(valid_data) // info.world_size)
        total = torch.zeros(2, device=device)
        if batch_size > 0:
            with ResumableBatches(valid_data, micro_batch=batch_size, grad_accum=1, rank=info.rank,
                                  world_size=info.world_size, seed=cfg.seed, shuffle=False) as valid_batches:
                for i, valid_step in enumerate(valid_batches):
                    if i >= cfg.eval_batches:
                        break
                    loss, _ = loss_of(valid_step.micro_batches[0])
                    total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        model.train()
        total = parallel.all_reduce_mean(total, info)
        mean = (total[0] / total[1].clamp(min=1)).item()
        return {"valid_loss": mean, "valid_ppl": math.exp(min(mean, 50.0))}

    peak, peak_source = peak_flops(device, cfg.precision)
    flops_tok = flops_per_token(n_params, mcfg.n_layer, mcfg.n_embd, cfg.max_len)
    metrics = MetricsLog(cfg.state_dir, resume_step=start_step, enabled=info.is_main)
    say(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters, device {device}, precision {cfg.precision}, "
        f"{info.world_size} process(es), global batch {cfg.global_batch} x {cfg.max_len} tokens, "
        f"{total_steps} steps ({steps_per_epoch}/epoch); MFU against the {peak_source} ({peak / 1e9:.0f} GFLOP/s)")

    def save_checkpoint(step: int) -> None:
        if cfg.replicated_tensor_sharding and info.world_size > 1:
            optimizer.consolidate_state_dict(to=0)
        all_rng = gather_rng(rng_states(device), info)
        if info.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "data": batches.state_dict(), "rng": all_rng}
            save_training_checkpoint(cfg.state_dir, step, lambda d: write_hf_files(raw_model, d), state,
                                     dataclasses.asdict(cfg), keep=cfg.keep_checkpoints)
        parallel.barrier(info)

    progress = make_progress(total_steps, start_step, enabled=info.is_main and cfg.progress)
    model.train()
    step, last = start_step, {}
    tokens_per_step = cfg.global_batch * cfg.max_len
    steps = iter(batches)
    train_chunks = loss_chunks(cfg.batch_size * cfg.max_len)   # every training micro-batch has this shape
    while step < total_steps:
        start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        result = train_step(model, optimizer, [inputs_and_labels(b) for b in next(steps).micro_batches],
                            loss_chunks=train_chunks, autocast_dtype=autocast_dtype, scaler=scaler,
                            max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scheduler.step()
        step += 1

        stats = parallel.all_reduce_mean(torch.stack([result["loss"], result["accuracy"]]), info)
        loss_value, acc_value = stats[0].item(), stats[1].item()   # .item() waits for the step
        seconds = time.perf_counter() - start
        if not math.isfinite(loss_value):
            last_good = latest_checkpoint(cfg.state_dir)
            raise UserError(f"the training loss became {loss_value} at step {step}; stopping. The last good "
                            f"checkpoint is {last_good or '(none yet)'}; lower --learning-rate, raise warmup, "
                            "or use --precision fp32, then rerun to resume from it")
        record = {"step": step, "epoch": batches.epoch, "loss": loss_value, "accuracy": acc_value, "lr": lr,
                  "grad_norm": float(result["grad_norm"]), "tokens_per_s": tokens_per_step / seconds,
                  "samples_per_s": cfg.global_batch / seconds,
                  "mfu": flops_tok * tokens_per_step / seconds / (peak * info.world_size)}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            record.update(evaluate())
        if step == total_steps:
            record.update(evaluate())
        if step % cfg.log_every == 0 or "valid_loss" in record or step == total_steps:
            metrics.log(record)
        last = record
        progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        progress.update(1)
        if step == total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint(step)
    progress.close()
    metrics.close()
    batches.close()

    if info.is_main and cfg.save_model_path:
        save_hf_dir(raw_model, cfg.save_model_path)
        metrics_path = Path(cfg.state_dir) / "metrics.jsonl"
        if metrics_path.exists():
            plot_loss_curve(metrics_path, Path(cfg.state_dir) / "loss.png")
    parallel.barrier(info)
    parallel.shutdown(info)
    return {"steps": step, **last}


def gather_rng(states: dict, info) -> list[dict]:
    """Every rank's RNG states (dropout differs per rank), gathered to rank 0 for the checkpoint."""
    if info.world_size == 1:
        return [states]
    import torch.distributed as dist

    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in states.items()})
    return gathered


def make_progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON or YAML file of training keys (the flags below override it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=argparse.SUPPRESS)
        elif f.name in ("layers_per_ipu", "matmul_proportion"):
            parser.add_argument(flag, nargs="+", type=float, default=argparse.SUPPRESS)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                                help=f"(default {default})")
    parser.add_argument("--train-path", dest="dataset", default=argparse.SUPPRESS,
                        help="the original's name for --dataset (dynamic -> generated)")
    parser.add_argument("--pretrained-checkpoint", dest="checkpoint_input_dir", default=argparse.SUPPRESS)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        values.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    if values.get("dataset") == "dynamic":
        values["dataset"] = "generated"
    for key in ("max_steps",):
        if values.get(key) in ("none", "null"):
            values[key] = None
    return TrainConfig.from_dict(values, args.config or "command line")


def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    print(json.dumps(result, sort_keys=True))
    return 0
