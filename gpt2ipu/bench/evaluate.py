"""`gpt2ipu bench evaluate`: LAMBADA passages/s, our batched evaluation against one-at-a-time loops.

One random-weight model (GPT-2 small architecture by default: speed does not depend on the
weights' values) scores the same passages (a subset of the real LAMBADA test file when
../shared/data has it, else the generated sample) under both conventions, three ways:

- ours: `score_lambada`, the scoring `gpt2ipu evaluate lambada` runs (length-sorted batches,
  LM head on the target positions only, one forward pass for both conventions when their token
  sequences agree);
- one_at_a_time: the plain loop: per passage and convention, one forward pass with full logits
  and a log-softmax over them (how the original evaluated, and how the tests' reference does);
- ours_batch_1: ours with batch size 1, which isolates what batching alone gives.

All three must give the same correct counts. Medians over `--repeats` runs taken in turns.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from gpt2ipu.bench.common import interleaved_median_seconds, report

REPO = Path(__file__).resolve().parents[2]
REAL_LAMBADA = REPO.parent / "shared" / "data" / "lambada_test.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2", help="model architecture (gpt2 = GPT-2 small)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"LAMBADA jsonl (default: {REAL_LAMBADA} if present, else the generated sample)")
    parser.add_argument("--samples", type=int, default=64, help="passages in the subset (the first N)")
    parser.add_argument("--batch-size", type=int, default=16, help="passages scored together by ours")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; medians are reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")


def plain_lambada(model, tokenizer, texts, window: int) -> dict[str, int]:
    """Correct counts, one passage and one convention per forward pass, full logits."""
    correct = {"last_word": 0, "last_token": 0}
    nll = {"last_word": 0.0, "last_token": 0.0}
    device = model.wte.weight.device
    with torch.inference_mode():
        for text in texts:
            passage = text.strip()
            word = passage.split()[-1]
            full = tokenizer.encode(passage)
            splits = {"last_word": (tokenizer.encode(passage[:len(passage) - len(word)].strip()),
                                    tokenizer.encode(" " + word)),
                      "last_token": (full[:-1], full[-1:])}
            for convention, (context, target) in splits.items():
                ids = (context + target)[-window:]
                logits = model.logits(torch.tensor([ids], device=device))[0, :-1]
                log_probs = torch.log_softmax(logits.double(), dim=-1)
                targets = torch.tensor(ids[1:], device=device)
                picked = log_probs[torch.arange(len(ids) - 1, device=device), targets][-len(target):]
                nll[convention] -= float(picked.sum())
                correct[convention] += bool((logits.argmax(-1) == targets)[-len(target):].all())
    return {"correct": correct, "nll": nll}


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu.data.tokenizer import load_tokenizer
    from gpt2ipu.evaluate.data import read_lambada, sample_lambada_texts
    from gpt2ipu.evaluate.lambada import score_lambada
    from gpt2ipu.devices import resolve_device
    from gpt2ipu.model import GPT, config_for

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = args.data or (REAL_LAMBADA if REAL_LAMBADA.is_file() else None)
    texts = (read_lambada(data) if data else sample_lambada_texts(args.samples))[:args.samples]
    torch.manual_seed(0)
    model = GPT(config_for(args.preset, 1024)).to(device).eval().requires_grad_(False)
    tokenizer = load_tokenizer()
    window = model.config.n_positions

    ours = score_lambada(model, tokenizer, texts, batch_size=args.batch_size)
    plain = plain_lambada(model, tokenizer, texts, window)
    batch_1 = score_lambada(model, tokenizer, texts, batch_size=1)
    identical = all(ours[c]["correct"] == plain["correct"][c] == batch_1[c]["correct"]
                    and math.isclose(ours[c]["nll"], plain["nll"][c], rel_tol=1e-6)
                    for c in ("last_word", "last_token"))
    print(f"bench evaluate: {len(texts)} passages from {data or 'the generated sample'}, {args.preset}, "
          f"batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, results identical: {identical}",
          file=sys.stderr)

    def sync(result):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    seconds = interleaved_median_seconds({
        "ours": lambda: sync(score_lambada(model, tokenizer, texts, batch_size=args.batch_size)),
        "one_at_a_time": lambda: sync(plain_lambada(model, tokenizer, texts, window)),
        "ours_batch_1": lambda: sync(score_lambada(model, tokenizer, texts, batch_size=1)),
    }, args.repeats)
    n = len(texts)
    return report(
        n / seconds["ours"],
        "passages/s (both conventions)",
        {"one_at_a_time": n / seconds["one_at_a_time"], "ours_batch_1": n / seconds["ours_batch_1"]},
        preset=args.preset, samples=n, data=str(data) if data else "generated sample",
        batch_size=args.batch_size, device=str(device), precision="fp32", threads=torch.get_num_threads(),
        repeats=args.repeats, results_identical=identical, forward_sequences=ours["forward_sequences"],
        accuracy={c: ours[c]["accuracy"] for c in ("last_word", "last_token")},
    )
