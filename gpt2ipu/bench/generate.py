"""`gpt2ipu bench generate`: new tokens/s of greedy decoding, ours against transformers' generate().

The same random-weight model (GPT-2 small architecture by default: the speed does not depend on
the weights' values) is saved once as a Hugging Face folder and loaded by both sides, as
`gpt2ipu generate` and `GPT2LMHeadModel.from_pretrained` would load a trained one. Both decode
batch 1, a 32-token prompt, 128 new tokens, greedy, with a key/value cache and no stop token;
the tokens must be identical. Timings are medians over `--repeats` runs taken in turns, so load
from other processes falls on both alike.

Ours on CPU runs its linear layers through the compiled decode op (custom_ops/decode_linear.cpp),
built into a temporary folder unless --ops-dir or $GPT2IPU_OPS_DIR names a build;
`--no-ops` measures the pure PyTorch path instead (the fallback without a compiler).
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
    if device.type == "cpu" and args.precision != "fp32":
        return report(0.0, "new tokens/s", {}, skipped=True, note=CPU_BF16_NOTE)
    torch.manual_seed(0)
    prompts = torch.randint(0, 50257, (args.batch_size, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        os.environ[ops.OPS_DIR_ENV] = "" if args.no_ops else ops.ready_ops_dir(args.ops_dir, tmp)
        ops_path = "pure PyTorch" if ops.load_ops() is None else "compiled decode op"
        folder = save_hf_dir(GPT(config_for(args.preset, 1024)), Path(tmp) / "model")
        ours = load_model(folder, device, args.precision)
        use_decode_layout(ours)
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=precision_dtype(args.precision))
        hf = hf.to(device).eval()
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
    seconds = interleaved_median_seconds({"ours": run_ours, "transformers_generate": run_transformers},
                                         args.repeats)
    tokens = args.batch_size * args.new_tokens
    extra = {"note": CPU_BF16_NOTE} if device.type == "cpu" else {}
    return report(
        tokens / seconds["ours"],
        "new tokens/s",
        {"transformers_generate": tokens / seconds["transformers_generate"]},
        preset=args.preset, batch_size=args.batch_size, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, device=str(device), precision=args.precision,
        threads=torch.get_num_threads(), repeats=args.repeats, tokens_identical=identical, ours_path=ops_path,
        ms_per_token={"ours": 1e3 * seconds["ours"] / args.new_tokens,
                      "transformers_generate": 1e3 * seconds["transformers_generate"] / args.new_tokens},
        transformers_version=transformers.__version__, **extra,
    )
