"""`gpt2ipu bench train`: tokens/s of full training steps, ours against Hugging Face's GPT-2.

A step is what `gpt2ipu train` runs (`Run.step` of gpt2ipu/train/loop.py, the one step function
that training and `gpt2ipu profile` also call): forward and backward over `--grad-accum`
micro-batches, the gradients' norm clipped to `--grad-clip`, the optimizer and LR-scheduler steps.
The defaults are the shape of the workflow's `sample` recipe (config/config.yaml: GPT-2 small,
max-len 128, batch 4, accumulation 2, clipping 1.0, the loss in 4 vocabulary chunks), so the
headline figure is the step users run. Variants:

  ours      a run built by gpt2ipu.train.loop.build_run on generated tokens (AdamW, lr 1e-4,
            weight decay 0.01, constant schedule), stepped by Run.step; malloc keeping freed
            memory for the next step (gpt2ipu/allocator.py), as `gpt2ipu train` does.
  hf_gpt2   transformers.GPT2LMHeadModel (its default attention), `labels=`, torch.optim.AdamW,
            the same accumulation and clipping, in a plain loop. Hugging Face shifts labels inside
            the model, so it is given the same input_ids as labels and scores T-1 of the T
            positions; the work is the same.

With --ablations, ours with one choice changed beside it (ABLATIONS): among them `ours_token_chunks`,
the loss in token chunks with no accumulation or clipping, where the optimizer steps inside
backward (the step this benchmark measured before it measured the recipe's).

Each variant runs in its own subprocess, so its peak memory (ru_maxrss on CPU, which includes the
interpreter and imports; max_memory_allocated on CUDA) is its own. The figure per variant is the
median step time over the measured steps after warmup; with --repeats > 1 the variants run
interleaved and the medians of their medians are reported. MFU: training's (gpt2ipu/train/
throughput.py: 6 N + 12 L C T FLOPs a token, against one peak probed once here), so it agrees with
the `mfu` that `gpt2ipu train` logs for the same configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from gpt2ipu.bench.common import report
from gpt2ipu.log import package_logger

log = package_logger(__name__)

# What each of our choices is worth: `ours` with one choice changed (see --ablations).
ABLATIONS = {
    "ours_plain_loss": {"vocab_chunks": 1},
    "ours_token_chunks": {"vocab_chunks": 1, "token_chunks": None, "grad_accum": 1, "grad_clip": 0.0},
    "ours_foreach_adamw": {"optimizer": "foreach"},
    "ours_forloop_adamw": {"optimizer": "forloop"},
    "ours_gelu_flip": {"gelu_recompute": False},
    "ours_compiled": {"compile": True},
    "ours_default_malloc": {"keep_freed_memory": False},
}
# Measured on the 2-core CPU (GPT-2 small, 1024 tokens a step): 4 token chunks are the fastest in
# fp32 (faster than the plain loss), 8 under bf16 autocast (each chunk's logits then fit in cache).
DEFAULT_TOKEN_CHUNKS = {"fp32": 4, "bf16": 8}
DEFAULT_KNOBS = {"token_chunks": 1, "vocab_chunks": 4, "optimizer": "fused", "gelu_recompute": True, "compile": False,
                 "keep_freed_memory": True, "grad_accum": 2, "grad_clip": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model preset (gpt2-test, gpt2, gpt2-medium, ...)")
    for key in ("n_layer", "n_embd", "n_head"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"{key} in place of the preset's (as `gpt2ipu train --{key.replace('_', '-')}`)")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per sample (default: the sample recipe's)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size (default: the sample recipe's)")
    parser.add_argument("--grad-clip", type=float, default=1.0,
                        help="clip the gradients' norm to this, 0 = no clipping (default: the sample recipe's)")
    parser.add_argument("--vocab-chunks", type=int, default=4,
                        help="the loss in this many vocabulary chunks, `gpt2ipu train "
                             "--embedding-serialization-factor` (default: the sample recipe's)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant run")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (the first allocates optimizer state)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast if a probe finds bf16 matmuls at least 2x faster than fp32")
    parser.add_argument("--token-chunks", type=int, default=None,
                        help="the loss in this many token chunks instead of vocabulary chunks (`gpt2ipu train "
                             "--enable-sequence-serialized`); also the ours_token_chunks ablation's (default there, "
                             f"by precision: {DEFAULT_TOKEN_CHUNKS})")
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks (compile time not counted)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run ours with each choice undone: " + ", ".join(ABLATIONS))
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes; above 1, compare the parallel layouts of --layout instead of the "
                             "one-process variants (gpt2ipu/bench/train_layouts.py)")
    parser.add_argument("--layout", default="ddp,fsdp,pp",
                        help="with --nproc > 1: comma-separated layouts, each a `gpt2ipu train` run under torchrun: "
                             "ddp, fsdp, pp (ratios are against ddp)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per step (default: the sample recipe's 2); with --nproc > 1 per step "
                             "and replica of ddp and fsdp (default 4; pp runs the same global batch as "
                             "micro-batches of one sample)")


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu.sizes import model_size

    size = size_flags(args)
    model_size(args.preset, args.max_len, **size)   # a size that cannot be built: one message, now
    if args.nproc > 1:
        from gpt2ipu.bench import train_layouts

        if args.precision == "auto":
            args.precision = "fp32"
        if args.grad_accum is None:
            args.grad_accum = 4
        return train_layouts.run(args, size)
    from gpt2ipu.train.throughput import Throughput, peak_flops

    precision, precision_note = _choose_precision(args.precision, args.device)
    peak, peak_source = peak_flops(args.device, precision)
    token_chunks = args.token_chunks or DEFAULT_TOKEN_CHUNKS[precision]
    knobs = {**DEFAULT_KNOBS, "vocab_chunks": args.vocab_chunks, "compile": args.compile,
             "grad_accum": args.grad_accum or DEFAULT_KNOBS["grad_accum"], "grad_clip": args.grad_clip,
             "token_chunks": args.token_chunks or 1}
    variants = {"ours": knobs, "hf_gpt2": {"grad_accum": knobs["grad_accum"], "grad_clip": knobs["grad_clip"]}}
    if args.ablations:
        variants.update({name: {**knobs, **change} for name, change in ABLATIONS.items()})
        variants["ours_token_chunks"]["token_chunks"] = token_chunks
    common = {
        "preset": args.preset, "size": size, "max_len": args.max_len, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "precision": precision, "device": args.device,
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, variant_knobs in variants.items():
            _log(f"bench train: {name} (run {repeat + 1}/{args.repeats})")
            runs[name].append(_run_child({**common, "variant": name, "knobs": variant_knobs}))

    step_seconds = {name: statistics.median(r["median_step_s"] for r in rs) for name, rs in runs.items()}
    # Training's figures (gpt2ipu/train/throughput.py) of each variant's step, against the one peak.
    speeds = {name: Throughput(tokens_per_step=rs[0]["samples_per_step"] * args.max_len,
                               samples_per_step=rs[0]["samples_per_step"],
                               flops_per_token=runs["ours"][0]["flops_per_token"],
                               peak=peak, peak_source=peak_source, world_size=1).rates(step_seconds[name])
              for name, rs in runs.items()}
    throughput = {name: rates["tokens_per_s"] for name, rates in speeds.items()}
    extra = {
        "peak_mem_mb": {name: max(r["peak_mem_mb"] for r in rs) for name, rs in runs.items()},
        # The same peaks less what the process held before building its model (interpreter,
        # torch, and for the baseline transformers): the training step's own memory.
        "peak_mem_over_imports_mb": {
            name: max(r["peak_mem_mb"] - r["rss_before_model_mb"] for r in rs) for name, rs in runs.items()
        } if args.device == "cpu" else None,
        "mfu": {name: rates["mfu"] for name, rates in speeds.items()},
        "step_seconds": step_seconds,
        # The fastest measured step: on a shared machine, the closest to an undisturbed one.
        "fastest_step_seconds": {name: min(min(r["step_s"][args.warmup:]) for r in rs) for name, rs in runs.items()},
        "matmul_peak_gflops": peak / 1e9,
        "peak_source": peak_source,
        "precision": precision,
        "precision_note": precision_note,
        "config": {**common, "ours_knobs": knobs, "parameters": runs["ours"][0]["parameters"], "repeats": args.repeats},
        "final_loss": {name: rs[-1]["last_loss"] for name, rs in runs.items()},
        "memory_note": "CPU: peak RSS of each variant's own process, interpreter and imports included"
        if args.device == "cpu" else "CUDA: torch.cuda.max_memory_allocated",
    }
    if knobs["compile"]:
        extra["compile_note"] = f"compile time excluded from step times: {runs['ours'][0]['compile_s']:.1f} s"
    baselines = {"hf_gpt2": throughput["hf_gpt2"]}
    result = report(throughput["ours"], "tokens/s", baselines, **extra)
    result["memory_ratio"] = {"hf_gpt2": extra["peak_mem_mb"]["ours"] / extra["peak_mem_mb"]["hf_gpt2"]}
    if args.ablations:
        result["ablations"] = {
            name: {"tokens_per_s": throughput[name], "peak_mem_mb": extra["peak_mem_mb"][name],
                   "ours_speedup_over_it": throughput["ours"] / throughput[name]}
            for name in ABLATIONS
        }
    return result


def _log(message: str) -> None:
    log.info(message)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _choose_precision(requested: str, device: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, f"{requested} as requested"
    import torch

    from gpt2ipu.train.throughput import measured_matmul_flops

    fp32 = measured_matmul_flops(device, torch.float32, size=1024)
    bf16 = measured_matmul_flops(device, torch.bfloat16, size=1024)
    ratio = bf16 / fp32
    if ratio >= 2:
        return "bf16", (f"bf16 autocast: bf16 matmul probe {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f} "
                        f"({ratio:.1f}x)")
    return "fp32", (f"bf16 skipped: bf16 matmul probe {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f} "
                    f"({ratio:.1f}x, under 2x)")


def size_flags(args: argparse.Namespace) -> dict[str, int]:
    """The size keys given (--n-layer, --n-embd, --n-head), for config_for and `gpt2ipu train`."""
    return {key: getattr(args, key) for key in ("n_layer", "n_embd", "n_head") if getattr(args, key) is not None}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2ipu.bench.train", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark variant {spec['variant']} failed (exit {proc.returncode}); see its stderr above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- inside the child process -------------------------------------------------------------


def _child(spec: dict) -> dict:
    import resource

    import torch

    device, knobs = spec["device"], spec["knobs"]
    if spec["variant"] == "hf_gpt2":
        import transformers  # noqa: F401  (imported before the baseline RSS, like torch)
    rss_before_model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as state_dir:
        if spec["variant"] == "hf_gpt2":   # the same data and step shape as ours, HF's model
            data = _batches(spec, knobs, n_steps)
            step, parameters = _hf_step(spec, knobs)
            speed_per_token = None
        else:
            run = build_our_run(spec, knobs, n_steps, state_dir)
            data = run.batches
            step, parameters = _our_step(run, knobs)
            speed_per_token = _flops_per_token(run)
        batches = iter(data)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        compile_start = time.perf_counter()
        times, losses = [], []
        for i in range(n_steps):
            batch = next(batches)
            _sync(device)
            start = time.perf_counter()
            losses.append(step(batch))
            _sync(device)
            times.append(time.perf_counter() - start)
            _log(f"  {spec['variant']} step {i + 1}/{n_steps}: {times[-1]:.3f} s, loss {losses[-1]:.3f}")
            if i == 0:
                compile_s = time.perf_counter() - compile_start
        data.close()
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "median_step_s": statistics.median(times[spec["warmup"]:]),
        "step_s": times,
        "peak_mem_mb": peak_mb,
        "rss_before_model_mb": rss_before_model_mb,
        "parameters": parameters,
        "flops_per_token": speed_per_token,
        "samples_per_step": spec["batch_size"] * knobs.get("grad_accum", 1),
        "last_loss": losses[-1],
        "compile_s": compile_s,
    }


def build_our_run(spec: dict, knobs: dict, n_steps: int, state_dir: str):
    """The training run `gpt2ipu train` would build for this variant (generated tokens, one process)."""
    from gpt2ipu.train import parallel
    from gpt2ipu.train.config import TrainConfig, resolve
    from gpt2ipu.train.loop import build_run, model_config_of

    accum = knobs.get("grad_accum", 1)
    token_chunks = knobs.get("token_chunks") or 1
    chunking = ({"enable_sequence_serialized": True,
                 "serialized_seq_len": -(-spec["batch_size"] * spec["max_len"] // token_chunks)}
                if token_chunks > 1 else {"embedding_serialization_factor": knobs.get("vocab_chunks", 1)})
    cfg = TrainConfig(model=spec["preset"], **spec["size"], max_len=spec["max_len"], batch_size=spec["batch_size"],
                      gradient_accumulation=accum, grad_clip=knobs.get("grad_clip", 0.0), **chunking,
                      optimizer="AdamW", learning_rate=1e-4, weight_decay=0.01, lr_schedule="constant",
                      precision=spec["precision"], device=spec["device"], dataset="generated",
                      generated_samples=n_steps * spec["batch_size"] * accum, seed=0, state_dir=state_dir,
                      resume_training_from_checkpoint="none", progress=False, eval_batches=1)
    resolved = resolve(cfg)
    info = parallel.init_distributed(cfg.device, 1)
    return build_run(resolved.config, model_config_of(resolved.config), None, resolved.loss_chunks, info,
                     lambda message: _log(f"  {message}"))


def _batches(spec: dict, knobs: dict, n_steps: int):
    """The generated steps `build_our_run` gives ours (seed 0), for the baseline."""
    from gpt2ipu.model import config_for
    from gpt2ipu.train.data import ResumableBatches, make_train_dataset

    accum = knobs.get("grad_accum", 1)
    vocab_size = config_for(spec["preset"], spec["max_len"], **spec["size"]).vocab_size
    data = make_train_dataset("generated", shards_dir=None, split="train", max_len=spec["max_len"],
                              vocab_size=vocab_size, seed=0, num_epochs=1,
                              generated_samples=n_steps * spec["batch_size"] * accum)
    return ResumableBatches(data, micro_batch=spec["batch_size"], grad_accum=accum, world_size=1, rank=0, seed=0,
                            num_epochs=1, num_workers=0)


def _flops_per_token(run) -> float:
    from gpt2ipu.train.throughput import flops_per_token

    return flops_per_token(run.n_params, run.model_config.n_layer, run.model_config.n_embd, run.cfg.max_len)


def _our_step(run, knobs):
    import torch

    from gpt2ipu.allocator import keep_freed_memory
    from gpt2ipu.model.gpt import MLP
    from gpt2ipu.train.optim import parameter_groups

    if knobs["keep_freed_memory"]:   # as `gpt2ipu train` does
        keep_freed_memory()
    if not knobs["gelu_recompute"]:
        for module in run.model.modules():
            if isinstance(module, MLP):
                module.recompute_gelu = False
    if knobs["optimizer"] != "fused":
        run.optimizer = torch.optim.AdamW(parameter_groups(run.model, 0.01), lr=1e-4,
                                          foreach=knobs["optimizer"] == "foreach")
    if knobs["compile"]:
        for block in run.model.h:
            block.compile()

    def step(batch) -> float:
        return float(run.step(batch)["loss"])

    return step, sum(p.numel() for p in run.model.parameters())


def _hf_step(spec, knobs):
    import torch
    import transformers

    from gpt2ipu.model import config_for

    config, device, grad_clip = config_for(spec["preset"], spec["max_len"], **spec["size"]), spec["device"], \
        knobs.get("grad_clip", 0.0)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        use_cache=False,
    )
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    device_type = torch.device(device).type
    autocast_dtype = torch.bfloat16 if spec["precision"] == "bf16" else None

    def step(batch) -> float:
        micro_batches = batch.micro_batches
        total = 0.0
        for micro in micro_batches:
            input_ids = micro[:, :-1].to(device)
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    return step, sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
