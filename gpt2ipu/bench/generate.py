"""`gpt2ipu bench generate`: new tokens/s of greedy decoding, ours against transformers' generate().

The same random-weight model (GPT-2 small architecture by default: the speed does not depend on
the weights' values) is saved once as a Hugging Face folder and loaded by both sides, as
`gpt2ipu generate` and `GPT2LMHeadModel.from_pretrained` would load a trained one. Both decode
batch 1, a 32-token prompt, 128 new tokens, greedy, with a key/value cache and no stop token;
the tokens must be identical. Timings are medians over `--repeats` runs taken in turns, so load
from other processes falls on both alike.

Ours on CPU decodes each step after the prompt through the compiled `decode_step` op
(custom_ops/decode_step.cpp), built into a temporary folder unless --ops-dir or $GPT2IPU_OPS_DIR
names a build; `--no-ops` measures the pure PyTorch path instead (the fallback without a compiler).

`--weights bf16|int8` stores ours' weight matrices in that format (gpt2ipu/model/lowp.py; the
transformers side stays at --precision, fp32 by default), so the tokens may differ from fp32's
(`tokens_identical` says). `--precision` is the whole model's dtype on both sides (CUDA); on CPU
low precision means `--weights`. Every run also times, in the same rounds, a plain read of as
many bytes as GPT-2's fp32 weights (torch.sum over a buffer that size): memory bandwidth /
fp32 weight bytes is the fp32 bandwidth limit in tokens/s, the most any fp32 decoding can reach
here, reported with ours / limit. `--memory` adds the peak resident memory (VmHWM) of a
`gpt2ipu generate` run with these weights and with fp32, each in its own process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from gpt2ipu.bench.common import interleaved_median_seconds, report
from gpt2ipu.devices import PRECISIONS
from gpt2ipu.log import package_logger
from gpt2ipu.model.lowp import WEIGHT_FORMATS, check_weights, kernel_report, lowp_bytes

log = package_logger(__name__)

CPU_BF16_NOTE = ("bf16 skipped on CPU: PyTorch's CPU bf16 matrix-vector products, which batch-1 decoding is "
                 "made of, are no faster than fp32 here (no bf16 GEMV fast path), so a CPU bf16 figure would "
                 "measure kernel gaps rather than decoding; bf16 and fp16 are measured with --device cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model architecture (gpt2 = GPT-2 small)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; medians are reported")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="weights' dtype, both sides")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--ops-dir", default=None,
                        help="build folder of the ops (default $GPT2IPU_OPS_DIR, else build into a temporary folder)")
    parser.add_argument("--no-ops", action="store_true", help="ours without the compiled ops (the pure PyTorch path)")
    parser.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                        help="ours' weight matrices: fp32, bf16, or int8 with per-row scales (computed in fp32)")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak memory of a `gpt2ipu generate` run with these weights and with fp32")


def run(args: argparse.Namespace) -> dict:
    import transformers

    from gpt2ipu import ops
    from gpt2ipu.devices import precision_dtype, resolve_device
    from gpt2ipu.generate.decode import use_decode_layout
    from gpt2ipu.generate.sampling import SamplingConfig, generate
    from gpt2ipu.model import GPT, config_for
    from gpt2ipu.model.hf import save_hf_dir
    from gpt2ipu.pretrained import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    check_weights(args.weights, args.precision)
    if device.type == "cpu" and args.precision != "fp32":
        return report(0.0, "new tokens/s", {}, skipped=True, note=CPU_BF16_NOTE)
    torch.manual_seed(0)
    prompts = torch.randint(0, 50257, (args.batch_size, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        os.environ[ops.OPS_DIR_ENV] = "" if args.no_ops else ops.ready_ops_dir(args.ops_dir, tmp)
        ops_path = "pure PyTorch" if ops.load_ops() is None else "compiled decode op"
        folder = save_hf_dir(GPT(config_for(args.preset, 1024)), Path(tmp) / "model")
        ours = load_model(folder, device, args.precision, args.weights)
        use_decode_layout(ours)
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=precision_dtype(args.precision))
        hf = hf.to(device).eval()
        memory = peak_memory(folder, args) if args.memory else None
    fp32_bytes = sum(p.numel() * 4 for p in hf.parameters())   # tied: counted once, as read per token
    buffer = torch.ones(fp32_bytes // 4, device=device)
    hf.generation_config.eos_token_id = None   # exactly --new-tokens tokens, as ours without a stop token
    config = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True, stop_token_id=None)
    hf_ids = prompts.to(device)
    hf_mask = torch.ones_like(hf_ids)

    def run_ours():
        return [g.tokens for g in generate(ours, prompts.tolist(), config)]

    def run_transformers():
        with torch.inference_mode():
            out = hf.generate(hf_ids, attention_mask=hf_mask, do_sample=False, max_new_tokens=args.new_tokens,
                              pad_token_id=50256)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out[:, args.prompt_tokens:].tolist()

    identical = run_ours() == run_transformers()
    log.info(f"bench generate: {args.preset}, batch {args.batch_size}, prompt {args.prompt_tokens}, "
             f"{args.new_tokens} new tokens, {device}, {args.precision}, {torch.get_num_threads()} threads, "
             f"tokens identical: {identical}")
    def read_fp32_weight_bytes():
        # One token's weight traffic at fp32, timed once per token of a run so it weighs as
        # much as the decoding runs in each round.
        for _ in range(args.new_tokens):
            buffer.sum().item()

    seconds = interleaved_median_seconds({"ours": run_ours, "transformers_generate": run_transformers,
                                          "memory_read": read_fp32_weight_bytes}, args.repeats)
    tokens = args.batch_size * args.new_tokens
    bandwidth = fp32_bytes * args.new_tokens / seconds["memory_read"]
    limit = args.batch_size * bandwidth / fp32_bytes   # tokens/s if every step read the fp32 weights at that speed
    # On CPU, --precision bf16 (the whole model, both sides) is skipped above; low precision here is --weights.
    extra = {"note": "--precision bf16 is skipped on CPU (its reason: --precision bf16 --json); low-precision "
                     "weights on CPU are --weights bf16|int8"} if device.type == "cpu" else {}
    return report(
        tokens / seconds["ours"],
        "new tokens/s",
        {"transformers_generate": tokens / seconds["transformers_generate"]},
        preset=args.preset, batch_size=args.batch_size, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, device=str(device), precision=args.precision,
        threads=torch.get_num_threads(), repeats=args.repeats, tokens_identical=identical, ours_path=ops_path,
        ms_per_token={"ours": 1e3 * seconds["ours"] / args.new_tokens,
                      "transformers_generate": 1e3 * seconds["transformers_generate"] / args.new_tokens},
        transformers_version=transformers.__version__, weights=args.weights,
        kernels=kernel_report(args.weights) if device.type == "cpu" else "cuda",
        weight_bytes={"ours": lowp_bytes(ours), "fp32": fp32_bytes},
        memory_bandwidth_gb_s=bandwidth / 1e9, fp32_bandwidth_limit_tokens_s=limit, ours_over_fp32_limit=
        tokens / seconds["ours"] / limit, peak_memory=memory, **extra,
    )


MEMORY_SCRIPT = """
import sys, torch
from gpt2ipu.generate.batch import load_for_generation
from gpt2ipu.generate.sampling import SamplingConfig, generate
def status_kb(key):
    return [line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")][0]
print("RUNTIME_KB", status_kb("VmRSS"))
torch.manual_seed(0)
folder, weights, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, _, _ = load_for_generation(folder, "cpu", "fp32", weights=weights)
ids = torch.randint(0, 50257, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
generate(model, [ids], SamplingConfig(max_new_tokens=new, greedy=True))
print("PEAK_KB", status_kb("VmHWM"))
"""


def peak_memory(folder, args) -> dict:
    """Peak resident memory (MB) of loading `folder` and decoding, in a fresh process per weight format.

    The peak is the child's VmHWM (/proc/self/status), not getrusage's ru_maxrss: Linux keeps
    ru_maxrss across fork and exec, so a child of this process (which holds two models) would
    report this process's size. Also the part above the runtime (the resident memory once
    Python, torch and gpt2ipu are imported: 266-272 MB here, the same in every format), which
    is what the weight format can change.
    """
    import subprocess
    import sys

    peaks, runtimes = {}, {}
    for weights in dict.fromkeys(["fp32", args.weights]):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), weights, str(args.prompt_tokens),
                              str(args.new_tokens)], capture_output=True, text=True, check=True).stdout
        peaks[weights] = int(out.split("PEAK_KB")[1]) / 1024
        runtimes[weights] = int(out.split("RUNTIME_KB")[1].split()[0]) / 1024
    above = {w: peaks[w] - runtimes[w] for w in peaks}
    return {"peak_rss_mb": peaks, "ratio_to_fp32": {w: mb / peaks["fp32"] for w, mb in peaks.items()},
            "runtime_rss_mb": runtimes, "above_runtime_mb": above,
            "above_runtime_ratio_to_fp32": {w: mb / above["fp32"] for w, mb in above.items()},
            "runtime_is": "resident memory once Python, torch and gpt2ipu are imported, before the model and "
                          "tokenizer load: the same in every format"}
