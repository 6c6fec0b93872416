"""Profile training steps: a Chrome/Perfetto trace, TensorBoard profiler files, top-operator tables.

Steps run in three phases (torch.profiler's schedule): `wait_steps` unprofiled steps, one profiler
warm-up step (traced, then discarded), then `active_steps` recorded with input shapes, memory and
FLOPs. The first step allocates the optimizer state and picks kernels, so it is not what a step
costs: with `wait_steps` 0 it is the discarded warm-up step. Each step is `Run.step`, the one the
training loop runs; profile.json also gives the tokens/s and MFU of the unprofiled steps after the
first (`--wait-steps` 2 or more), computed as training computes them (gpt2ipu/train/throughput.py).

What is written, in one folder that appears only when complete:

    trace.json.gz        the recorded steps, Chrome trace format (chrome://tracing, ui.perfetto.dev)
    tensorboard/<run>/   the same trace where TensorBoard's profiler plugin looks for it
    top_ops.md, .html    the operators that take the most self time and the most memory, per step
    profile.json         those figures as data; provenance.json says what made the folder
    memory_snapshot.pickle   CUDA only: torch.cuda.memory's allocation history, for
                             https://pytorch.org/memory_viz (PyTorch's own format, written by PyTorch)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.log import package_logger
from gpt2ipu.provenance import write_provenance
from gpt2ipu.tables import html_page, html_table, markdown_table, paragraph
from gpt2ipu.train import parallel
from gpt2ipu.train.config import TrainConfig, resolve, workflow_run_config
from gpt2ipu.train.loop import build_run, model_config_of

log = package_logger(__name__)

SNAPSHOT_NAME = "memory_snapshot.pickle"
MB = 1 << 20


def say(message: str) -> None:
    log.info(f"[gpt2ipu profile] {message}")


def profile(*, recipe: dict[str, Any], shards_dir: str, out_dir: str, run_name: str, ops_dir: str | None,
            wait_steps: int, active_steps: int, top: int) -> dict[str, Any]:
    """The workflow's profile job: the training recipe `recipe` (as the pretrain job reads it, on
    `shards_dir`) profiled into `out_dir`; `ops_dir`: the compiled ops the training job would use."""
    if ops_dir:   # as gpt2ipu.train.launch gives them to the training process
        from gpt2ipu.ops import OPS_DIR_ENV

        os.environ[OPS_DIR_ENV] = str(Path(ops_dir).resolve())
    values = workflow_run_config(recipe, shards_dir=shards_dir, state_dir=out_dir, save_model_path=None,
                                 replication_factor=1)
    cfg = TrainConfig.from_dict({**values, "resume_training_from_checkpoint": "none"}, "the profiled training recipe")
    return profile_steps(cfg=cfg, out_dir=out_dir, wait_steps=wait_steps, active_steps=active_steps, top=top,
                         run_name=run_name)


def profile_steps(*, cfg: TrainConfig, out_dir: str | Path, wait_steps: int = 0, active_steps: int = 2,
                  top: int = 15, run_name: str | None = None) -> dict[str, Any]:
    """Profile `active_steps` training steps of the run `cfg` describes into `out_dir`; returns profile.json."""
    from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler
    from torch.profiler import profile as torch_profile

    if wait_steps < 0 or active_steps < 1 or top < 1:
        raise UserError(f"profile: wait steps must be >= 0, active steps and top >= 1 (got {wait_steps}, "
                        f"{active_steps}, {top})")
    total = wait_steps + 1 + active_steps   # + the profiler's own warm-up step
    resolved = resolve(dataclasses.replace(cfg, max_steps=total, progress=False))
    cfg = resolved.config
    if cfg.replication_factor != 1 or cfg.fsdp or cfg.stages != 1:
        raise UserError("profile: one process only (--replication-factor 1, no --fsdp or pipeline stages); a step "
                        "of each replica is the same work")
    info = parallel.init_distributed(cfg.device, 1)
    run = build_run(cfg, model_config_of(cfg), None, resolved.loss_chunks, info, say)
    if run.total_steps < total:
        raise UserError(f"profile: the training data gives only {run.total_steps} steps of this config, and "
                        f"{total} are needed ({wait_steps} unprofiled + 1 warm-up + {active_steps} profiled); "
                        "use fewer steps or more data")
    run_name = run_name or cfg.model
    cuda = info.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches = iter(run.batches)
    speed = run.throughput()

    def one_step() -> float:
        """The training loop's step (Run.step, as gpt2ipu.train.loop.train runs it), timed to its end."""
        start = time.perf_counter()
        result = run.step(next(batches))
        result["loss"].item()   # waits for the step (CUDA is asynchronous)
        return time.perf_counter() - start

    say(f"profiling {cfg.model} on {info.device}: {wait_steps} unprofiled step(s), 1 warm-up, {active_steps} "
        f"profiled; global batch {cfg.global_batch} x {cfg.max_len} tokens")
    run.model.train()
    with atomic_dir(out_dir) as tmp:
        trace_dir = tmp / "tensorboard" / run_name
        seconds = []
        with torch_profile(activities=activities, record_shapes=True, profile_memory=True, with_flops=True,
                           schedule=schedule(wait=wait_steps, warmup=1, active=active_steps, repeat=1),
                           on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name=run_name,
                                                                    use_gzip=True)) as prof:
            for step in range(total):
                if cuda and step == wait_steps:   # the allocation history of the warm-up and profiled steps
                    torch.cuda.memory._record_memory_history(max_entries=200_000)
                seconds.append(one_step())
                prof.step()
        if cuda:
            torch.cuda.memory._dump_snapshot(str(tmp / SNAPSHOT_NAME))
            torch.cuda.memory._record_memory_history(enabled=None)
        traces = sorted(trace_dir.glob("*.pt.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"torch.profiler wrote no trace in {trace_dir}")
        shutil.copyfile(traces[-1], tmp / "trace.json.gz")

        tables = top_operator_tables(prof, active_steps, top, cuda)
        # The step's speed as training logs it (Run.throughput), from the unprofiled steps after the
        # first (which allocates the optimizer state); None without two unprofiled steps.
        timed = seconds[1:wait_steps]
        rates = speed.rates(sorted(timed)[len(timed) // 2]) if timed else {}
        figures = {"model": cfg.model, "device": str(info.device), "precision": cfg.precision,
                   "tokens_per_step": cfg.global_batch * cfg.max_len, "wait_steps": wait_steps,
                   "active_steps": active_steps, "step_seconds_unprofiled": seconds[:wait_steps],
                   "step_seconds_profiled": seconds[wait_steps + 1:],
                   "tokens_per_s_unprofiled": rates.get("tokens_per_s"), "mfu_unprofiled": rates.get("mfu"),
                   "mfu_peak_source": speed.peak_source, "tables": tables}
        write_tables(tmp, figures)
        (tmp / "profile.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_provenance(tmp, "profile", params={**dataclasses.asdict(cfg), "wait_steps": wait_steps,
                                                 "active_steps": active_steps, "top": top},
                         inputs=[cfg.shards_dir] if cfg.shards_dir else [],
                         figures={k: v for k, v in figures.items() if k != "tables"})
    say(f"profile written to {out_dir}")
    return figures


def top_operator_tables(prof, steps: int, top: int, cuda: bool) -> dict[str, dict]:
    """{title: {"headers", "rows"}}: operators by self time, by self time and input shapes, by memory.

    Figures are per profiled step. On CUDA the time is the device's and the memory the device's."""
    time_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    memory_key = "self_device_memory_usage" if cuda else "self_cpu_memory_usage"
    where = "device" if cuda else "CPU"
    # ProfilerStep#N spans a whole step: not an operator.
    ops = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total_self = sum(getattr(e, time_key) for e in ops) or 1.0
    by_time = sorted(ops, key=lambda e: -getattr(e, time_key))[:top]
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("ProfilerStep")]
    by_shape = sorted(shaped, key=lambda e: -getattr(e, time_key))[:top]
    by_memory = sorted(ops, key=lambda e: -getattr(e, memory_key))[:top]

    def gflops_per_s(e) -> float | None:
        micros = getattr(e, time_key)
        return e.flops / micros / 1e3 if e.flops and micros else None

    return {
        f"by self {where} time": {
            "headers": ["operator", "calls/step", "self ms/step", "% of self time", "total ms/step", "GFLOP/s"],
            "rows": [[e.key, e.count // steps, getattr(e, time_key) / 1e3 / steps,
                      100.0 * getattr(e, time_key) / total_self,
                      (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / steps, gflops_per_s(e)]
                     for e in by_time]},
        f"by self {where} time and input shapes": {
            "headers": ["operator", "input shapes", "calls/step", "self ms/step", "GFLOP/call"],
            "rows": [[e.key, str(e.input_shapes), e.count // steps, getattr(e, time_key) / 1e3 / steps,
                      e.flops / e.count / 1e9 if e.flops and e.count else None] for e in by_shape]},
        f"by {where} memory allocated": {
            "headers": ["operator", "calls/step", "self MB allocated/step", "MB allocated/step incl. children"],
            "rows": [[e.key, e.count // steps, getattr(e, memory_key) / MB / steps,
                      (e.device_memory_usage if cuda else e.cpu_memory_usage) / MB / steps] for e in by_memory]},
    }


def write_tables(folder: Path, figures: dict) -> None:
    """top_ops.md and top_ops.html: a line on what was profiled, then each table."""
    unprofiled = figures["step_seconds_unprofiled"]
    profiled = figures["step_seconds_profiled"]
    note = (f"{figures['model']} on {figures['device']} ({figures['precision']}), {figures['tokens_per_step']} "
            f"tokens per step; {figures['active_steps']} profiled step(s) of "
            f"{', '.join(f'{s:.2f}' for s in profiled)} s"
            + (f" (unprofiled: {', '.join(f'{s:.2f}' for s in unprofiled)} s)" if unprofiled else "")
            + ". Self time excludes the operators an operator calls; memory is what the operator itself "
              "allocated less what it freed.")
    markdown = [f"# Top operators per training step\n\n{note}\n"]
    html_parts = [paragraph(note)]
    for title, table in figures["tables"].items():
        markdown.append(f"\n## {title}\n\n{markdown_table(table['headers'], table['rows'])}")
        html_parts.append(html_table(table["headers"], table["rows"], caption=title))
    (folder / "top_ops.md").write_text("".join(markdown), encoding="utf-8")
    (folder / "top_ops.html").write_text(html_page("Top operators per training step", *html_parts), encoding="utf-8")


def print_summary(figures: dict, file=sys.stderr) -> None:
    """The first table, for the terminal."""
    title, table = next(iter(figures["tables"].items()))
    print(f"top operators {title}:\n{markdown_table(table['headers'], table['rows'])}", file=file)
