"""`gpt2ipu bench train`: tokens/s of full training steps, ours against Hugging Face's GPT-2.

A step is forward, backward, optimizer step and zero_grad on one micro-batch of random tokens
(seeded, the same for every variant). Variants:

  ours      gpt2ipu.model.gpt.GPT through gpt2ipu.train.optim.train_step: SDPA attention, the MLP in one
            Function (GELU recomputed in backward, hidden layer feature-major), the loss in
            token chunks (no [tokens, vocab] logits), fused AdamW with decay on matrices only,
            run inside backward (no clipping here, as in the baseline: see StepInBackward),
            malloc keeping freed memory for the next step (gpt2ipu/allocator.py), as training.
  hf_gpt2   transformers.GPT2LMHeadModel (its default attention), `labels=`, torch.optim.AdamW,
            in a plain loop. Hugging Face shifts labels inside the model, so it is given the same
            input_ids as labels and scores T-1 of the T positions; the work is the same.

Each variant runs in its own subprocess, so its peak memory (ru_maxrss on CPU, which includes the
interpreter and imports; max_memory_allocated on CUDA) is its own. The figure per variant is the
median step time over the measured steps after warmup; with --repeats > 1 the variants run
interleaved and the medians of their medians are reported. MFU is model FLOPs
(6 * parameters * tokens + 12 * layers * n_embd * T * tokens, nanoGPT's estimate) over a matmul
peak measured here with 2048x2048 matmuls in the run's precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from gpt2ipu.bench.common import report

VARIANTS = ("ours", "hf_gpt2")
# What each of our choices is worth: `ours` with one choice undone (see --ablations).
ABLATIONS = {
    "ours_plain_loss": {"token_chunks": 1},
    "ours_foreach_adamw": {"optimizer": "foreach"},
    "ours_forloop_adamw": {"optimizer": "forloop"},
    "ours_gelu_flip": {"gelu_recompute": False},
    "ours_vocab_chunks": {"token_chunks": 1, "vocab_chunks": 8},
    "ours_compiled": {"compile": True},
    "ours_default_malloc": {"keep_freed_memory": False},
}
# Measured on the 2-core CPU (GPT-2 small, 1024 tokens a step): 4 token chunks are the fastest in
# fp32 (faster than the plain loss), 8 under bf16 autocast (each chunk's logits then fit in cache).
DEFAULT_TOKEN_CHUNKS = {"fp32": 4, "bf16": 8}
DEFAULT_KNOBS = {"token_chunks": None, "vocab_chunks": 1, "optimizer": "fused", "gelu_recompute": True, "compile": False,
                 "keep_freed_memory": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model preset (gpt2-test, gpt2, gpt2-medium, ...)")
    for key in ("n_layer", "n_embd", "n_head"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"{key} in place of the preset's (as `gpt2ipu train --{key.replace('_', '-')}`)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per sample")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates optimizer state)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast if a probe finds bf16 matmuls at least 2x faster than fp32")
    parser.add_argument("--token-chunks", type=int, default=None,
                        help=f"our loss's token chunks (default by precision: {DEFAULT_TOKEN_CHUNKS})")
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks (compile time not counted)")
    parser.add_argument("--ablations", action="store_true", help="also run ours with each choice undone: " + ", ".join(ABLATIONS))
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes; above 1, compare the parallel layouts of --layout instead of the "
                             "one-process variants (gpt2ipu/bench/train_layouts.py)")
    parser.add_argument("--layout", default="ddp,fsdp,pp",
                        help="with --nproc > 1: comma-separated layouts, each a `gpt2ipu train` run under torchrun: "
                             "ddp, fsdp, pp (ratios are against ddp)")
    parser.add_argument("--grad-accum", type=int, default=4,
                        help="with --nproc > 1: micro-batches per step and replica of ddp and fsdp (pp runs the "
                             "same global batch as micro-batches of one sample)")


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu.sizes import model_size

    size = size_flags(args)
    model_size(args.preset, args.max_len, **size)   # a size that cannot be built: one message, now
    if args.nproc > 1:
        from gpt2ipu.bench import train_layouts

        if args.precision == "auto":
            args.precision = "fp32"
        return train_layouts.run(args, size)
    import torch

    precision, precision_note = _choose_precision(args.precision, args.device)
    peak_flops = _matmul_peak(args.device, torch.bfloat16 if precision == "bf16" else torch.float32)
    token_chunks = args.token_chunks or DEFAULT_TOKEN_CHUNKS[precision]
    knobs = {**DEFAULT_KNOBS, "token_chunks": token_chunks, "compile": args.compile}
    variants = {"ours": knobs, "hf_gpt2": {}}
    if args.ablations:
        variants.update({name: {**knobs, **change} for name, change in ABLATIONS.items()})
    common = {
        "preset": args.preset, "size": size, "max_len": args.max_len, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "precision": precision, "device": args.device,
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, variant_knobs in variants.items():
            _log(f"bench train: {name} (run {repeat + 1}/{args.repeats})")
            runs[name].append(_run_child({**common, "variant": name, "knobs": variant_knobs}))

    tokens_per_step = args.batch_size * args.max_len
    step_seconds = {name: statistics.median(r["median_step_s"] for r in rs) for name, rs in runs.items()}
    throughput = {name: tokens_per_step / s for name, s in step_seconds.items()}
    flops_per_step = runs["ours"][0]["flops_per_step"]
    extra = {
        "peak_mem_mb": {name: max(r["peak_mem_mb"] for r in rs) for name, rs in runs.items()},
        # The same peaks less what the process held before building its model (interpreter,
        # torch, and for the baseline transformers): the training step's own memory.
        "peak_mem_over_imports_mb": {
            name: max(r["peak_mem_mb"] - r["rss_before_model_mb"] for r in rs) for name, rs in runs.items()
        } if args.device == "cpu" else None,
        "mfu": {name: flops_per_step / s / peak_flops for name, s in step_seconds.items()},
        "step_seconds": step_seconds,
        # The fastest measured step: on a shared machine, the closest to an undisturbed one.
        "fastest_step_seconds": {name: min(min(r["step_s"][args.warmup:]) for r in rs) for name, rs in runs.items()},
        "matmul_peak_gflops": peak_flops / 1e9,
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
    print(message, file=sys.stderr, flush=True)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _choose_precision(requested: str, device: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, f"{requested} as requested"
    import torch

    fp32 = _matmul_peak(device, torch.float32, size=1024)
    bf16 = _matmul_peak(device, torch.bfloat16, size=1024)
    ratio = bf16 / fp32
    if ratio >= 2:
        return "bf16", f"bf16 autocast: bf16 matmul probe {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f} ({ratio:.1f}x)"
    return "fp32", f"bf16 skipped: bf16 matmul probe {bf16 / 1e9:.0f} GFLOP/s vs fp32 {fp32 / 1e9:.0f} ({ratio:.1f}x, under 2x)"


def _matmul_peak(device: str, dtype, size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a square matmul: the median of several, after warmup."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


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

    from gpt2ipu.model import config_for
    from gpt2ipu.train.loop import flops_per_token

    device, knobs = spec["device"], spec["knobs"]
    torch.manual_seed(0)
    config = config_for(spec["preset"], spec["max_len"], **spec["size"])
    generator = torch.Generator().manual_seed(1234)
    n_steps = spec["warmup"] + spec["steps"]
    samples = torch.randint(0, config.vocab_size, (n_steps, spec["batch_size"], spec["max_len"] + 1), generator=generator)
    autocast_dtype = torch.bfloat16 if spec["precision"] == "bf16" else None

    if spec["variant"] == "hf_gpt2":
        import transformers  # noqa: F401  (imported before the baseline RSS, like torch)
    rss_before_model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec["variant"] == "hf_gpt2":
        step, parameters = _hf_step(config, device, autocast_dtype)
    else:
        step, parameters = _our_step(config, device, autocast_dtype, knobs)
    n_params = parameters - config.n_positions * config.n_embd
    tokens = spec["batch_size"] * spec["max_len"]
    flops_per_step = flops_per_token(n_params, config.n_layer, config.n_embd, spec["max_len"]) * tokens

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    times, losses = [], []
    for i in range(n_steps):
        batch = samples[i].to(device)
        _sync(device)
        start = time.perf_counter()
        losses.append(step(batch[:, :-1], batch[:, 1:]))
        _sync(device)
        times.append(time.perf_counter() - start)
        _log(f"  {spec['variant']} step {i + 1}/{n_steps}: {times[-1]:.3f} s, loss {losses[-1]:.3f}")
        if i == 0:
            compile_s = time.perf_counter() - compile_start
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
        "flops_per_step": flops_per_step,
        "last_loss": losses[-1],
        "compile_s": compile_s,
    }


def _our_step(config, device, autocast_dtype, knobs):
    import torch

    from dataclasses import replace

    from gpt2ipu.train.allocator import keep_freed_memory
    from gpt2ipu.model import GPT
    from gpt2ipu.train.optim import make_optimizer, parameter_groups, train_step

    if knobs["keep_freed_memory"]:   # as `gpt2ipu train` does
        keep_freed_memory()
    model = GPT(replace(config, recompute_gelu=knobs["gelu_recompute"])).to(device).train()
    if knobs["optimizer"] == "fused":
        optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, **{
            "foreach": knobs["optimizer"] == "foreach"})
    if knobs["compile"]:
        for block in model.h:
            block.compile()
    loss_chunks = {"token_chunks": knobs["token_chunks"], "vocab_chunks": knobs["vocab_chunks"]}

    def step(input_ids, labels):
        return float(train_step(model, optimizer, [(input_ids, labels)], loss_chunks=loss_chunks,
                                autocast_dtype=autocast_dtype)["loss"])

    return step, sum(p.numel() for p in model.parameters())


def _hf_step(config, device, autocast_dtype):
    import torch
    import transformers

    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        use_cache=False,
    )
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    device_type = torch.device(device).type

    def step(input_ids, _labels):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
