"""`gpt2ipu train`: GPT-2 pretraining on CPU or CUDA, one process or many (torchrun).

Reads top to bottom like nanoGPT's train.py: config, data, model, optimizer, then the loop of
optimizer steps (micro-batches with gradient accumulation, clipping, the LR schedule), metrics,
validation and checkpoints. Resume is exact: the checkpoint holds weights, optimizer, scheduler,
scaler, RNG states and the data position, and the data order is a pure function of
(seed, epoch), so a run killed at any point and started again reaches the same weights.

The original's flags keep their names; README.md ("Training flags") says what each became.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.train.config import TrainConfig, check_config, explain_ipu_flags

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


def train(cfg: TrainConfig) -> dict[str, Any]:
    import torch

    from gpt2ipu.train import parallel
    from gpt2ipu.train.allocator import keep_freed_memory
    from gpt2ipu.model.hf import load_hf_dir, save_hf_dir, write_hf_files
    from gpt2ipu.train.metrics import MetricsLog, plot_loss_curve
    from gpt2ipu.model import GPT, config_for
    from gpt2ipu.train.optim import make_optimizer, parameter_groups, train_step
    from gpt2ipu.train.state import (latest_checkpoint, load_training_state, restore_rng_states,
                                          rng_states, save_training_checkpoint)
    from gpt2ipu.train.data import ResumableBatches, make_train_dataset

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
            loss, accuracy, _ = model(inputs, labels, **loss_chunks(inputs.numel()))
        return loss, accuracy

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
