"""`gpt2ipu bench train --nproc N --layout ddp,fsdp,pp`: the parallel layouts side by side.

Each layout is a real `gpt2ipu train` run under torchrun (N processes, generated tokens, the same
model, sequence length and global batch), so what is measured is the trainer itself:

  ddp    N replicas, DDP (each process holds the whole model, its gradients and optimizer state)
  fsdp   N replicas, FSDP2 (each holds 1/N of them; a block's full weights only while it runs)
  pp     N pipeline stages, 1F1B over the global batch as micro-batches of one sample, layers split
         so that the last stage's LM head and loss count as V / (12 n_embd) layers of work
         (GPT-2 medium: 14 + 10 layers)

Throughput: the median tokens/s over each run's steps after `--warmup` (the loop's own per-step
timing, metrics.jsonl). Memory: every process's peak (CPU: peak RSS; CUDA: max allocated), and
the same less what the process held when training started (interpreter and imports), which is
the figure the ratios use. Layouts run one after another, each alone on the machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt2ipu.bench.common import report
from gpt2ipu.log import package_logger

log = package_logger(__name__)

LAYOUTS = ("ddp", "fsdp", "pp")
GOALS = {"memory_ratio_max": 0.6, "throughput_ratio_min": 0.8}   # per-rank memory and tokens/s against DDP


def head_balanced_split(n_layer: int, stages: int, vocab_size: int, n_embd: int) -> list[int]:
    """Layers per stage with the LM head and loss (V x C weights, like V / (12 C) blocks of 12 C^2)
    counted on the last stage, so the stages take about the same time."""
    head = vocab_size / (12 * n_embd)
    per_stage = (n_layer + head) / stages
    counts = [round(per_stage)] * (stages - 1)
    counts.append(n_layer - sum(counts))
    return counts if counts[-1] >= 1 else [n_layer // stages + (i < n_layer % stages) for i in range(stages)]


def layout_flags(layout: str, nproc: int, micro_batch: int, grad_accum: int, split: list[int]) -> list[str]:
    """The `gpt2ipu train` flags of a layout; every layout gets the global batch micro x accum x nproc.

    The pipeline runs it as micro-batches of one sample (the most micro-batches, the smallest bubble).
    """
    if layout == "pp":
        return ["--layers-per-ipu", *map(str, split), "--batch-size", "1",
                "--gradient-accumulation", str(micro_batch * grad_accum * nproc)]
    replicas = ["--replication-factor", str(nproc), "--batch-size", str(micro_batch),
                "--gradient-accumulation", str(grad_accum)]
    return (["--fsdp"] if layout == "fsdp" else []) + replicas


def run_layout(layout: str, args, size: dict[str, int], split: list[int], port: int) -> dict:
    """One layout's run; its per-step throughput and per-process memory. size: the model's size keys
    in place of the preset's ({"n_layer": 4}: `gpt2ipu train --n-layer 4`)."""
    steps = args.warmup + args.steps
    global_batch = args.batch_size * args.grad_accum * args.nproc
    with tempfile.TemporaryDirectory(prefix=f"bench-{layout}-") as state:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                   f"--master_port={port}", "-m", "gpt2ipu", "train", "--model", args.preset,
                   *(f"--{key.replace('_', '-')}={value}" for key, value in size.items()),
                   "--max-len", str(args.max_len),
                   "--generated-samples", str(global_batch * (steps + 1)), "--max-steps", str(steps),
                   "--checkpoint-every", "0", "--final-checkpoint", "false", "--eval-batches", "1",
                   "--progress", "false", "--device", args.device, "--precision", args.precision,
                   "--state-dir", state, *layout_flags(layout, args.nproc, args.batch_size, args.grad_accum, split)]
        threads = max(1, (os.cpu_count() or 1) // args.nproc) if args.device == "cpu" else 1
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if result.returncode != 0:
            raise RuntimeError(f"bench train --layout {layout} failed:\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(state) / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    measured = [r["tokens_per_s"] for r in records if r["step"] > args.warmup]
    peaks, starts = summary["rank_peak_memory_mb"], summary["rank_memory_at_start_mb"]
    return {"tokens_per_s": statistics.median(measured), "step_tokens_per_s": measured,
            "rank_peak_memory_mb": peaks,
            "rank_memory_over_start_mb": [peak - start for peak, start in zip(peaks, starts)],
            "final_loss": records[-1]["loss"],
            "flags": layout_flags(layout, args.nproc, args.batch_size, args.grad_accum, split)}


def run(args, size: dict[str, int]) -> dict:
    """Every requested layout, then ratios against DDP and the goals (GOALS); size as in `run_layout`."""
    from gpt2ipu.model import config_for

    layouts = [name.strip() for name in args.layout.split(",") if name.strip()]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown or not layouts:
        raise SystemExit(f"bench train: --layout takes a comma-separated list of {', '.join(LAYOUTS)}, "
                         f"got {args.layout!r}")
    model = config_for(args.preset, args.max_len, **size)
    split = head_balanced_split(model.n_layer, args.nproc, model.vocab_size, model.n_embd)
    measured = {}
    for i, layout in enumerate(layouts):
        log.info(f"bench train: layout {layout} on {args.nproc} processes")
        measured[layout] = run_layout(layout, args, size, split, port=29700 + os.getpid() % 200 + i)
    ours_name = next((name for name in layouts if name != "ddp"), layouts[0])
    baselines = {name: m["tokens_per_s"] for name, m in measured.items() if name != ours_name}
    result = report(measured[ours_name]["tokens_per_s"], "tokens/s", baselines, ours_layout=ours_name,
                    layouts=measured,
                    config={"preset": args.preset, **size, "max_len": args.max_len, "micro_batch": args.batch_size,
                            "global_batch": args.batch_size * args.grad_accum * args.nproc, "nproc": args.nproc,
                            "warmup_steps": args.warmup, "measured_steps": args.steps, "device": args.device,
                            "precision": args.precision, "pp_layers": split},
                    memory_note="CPU: peak RSS per process; ratios use the peak less the RSS when training "
                                "started (interpreter and imports)" if args.device == "cpu"
                    else "CUDA: torch.cuda.max_memory_allocated per process")
    if "ddp" in measured:
        ddp = measured["ddp"]
        result["against_ddp"] = {
            name: {"throughput_ratio": m["tokens_per_s"] / ddp["tokens_per_s"],
                   "memory_ratio": max(m["rank_memory_over_start_mb"]) / max(ddp["rank_memory_over_start_mb"])}
            for name, m in measured.items() if name != "ddp"}
        result["goals"] = {name: {"memory": r["memory_ratio"] <= GOALS["memory_ratio_max"],
                                  "throughput": r["throughput_ratio"] >= GOALS["throughput_ratio_min"]}
                           for name, r in result["against_ddp"].items()}
        result["goal_definition"] = (f"per-rank memory <= {GOALS['memory_ratio_max']}x DDP's, tokens/s >= "
                                     f"{GOALS['throughput_ratio_min']}x DDP's")
    return result
