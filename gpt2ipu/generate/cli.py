"""`gpt2ipu generate`: an interactive prompt loop (like the original `text_generate_gpt2.py`), or batch mode."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gpt2ipu.devices import PRECISIONS
from gpt2ipu.generate import batch
from gpt2ipu.generate.batch import load_for_generation, max_prompt_tokens, prompt_ids, stop_token_id
from gpt2ipu.generate.sampling import Generation, SamplingConfig, generate
from gpt2ipu.log import package_logger
from gpt2ipu.model.lowp import WEIGHT_FORMATS

log = package_logger(__name__)


class _Printer:
    """Streams one row's continuation as it grows, holding back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.shown = tokenizer, out, ""

    def __call__(self, row: int, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def timing_line(gen: Generation) -> str:
    count = len(gen.tokens) + int(gen.stopped)
    total = gen.prefill_seconds + sum(gen.step_seconds)
    per_token = sum(gen.step_seconds) / len(gen.step_seconds) if gen.step_seconds else gen.prefill_seconds
    return (f"[{len(gen.tokens)} tokens{' (stop token)' if gen.stopped else ''}: first token "
            f"{gen.prefill_seconds * 1e3:.1f} ms, then {per_token * 1e3:.1f} ms/token, "
            f"{count / total if total else 0.0:.1f} tokens/s]")


def interactive(model, tokenizer, config: SamplingConfig, *, out=None) -> int:
    """The prompt loop: `Input: ` -> streamed continuation + timings; Ctrl-D or Ctrl-C ends it."""
    out = out or sys.stdout
    limit = max_prompt_tokens(model, config)
    print("Type a prompt and press Enter (an empty prompt samples unconditionally); "
          "Ctrl-D or Ctrl-C quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("Input: ")
            ids, truncated = prompt_ids(tokenizer, line, limit)
            if truncated:
                log.info(f"(prompt truncated to its last {limit} tokens)")
            printer = _Printer(tokenizer, out)
            (gen,) = generate(model, [ids], config, pad_id=tokenizer.eos_id, seeds=[config.seed + turn],
                              vocab_limit=tokenizer.vocab_size, on_token=printer, timed=True)
            rest = tokenizer.decode(gen.tokens)[len(printer.shown):]
            out.write(f"{rest}\n{timing_line(gen)}\n")
            out.flush()
            turn += 1
        except (EOFError, KeyboardInterrupt):   # Ctrl-D at the prompt; Ctrl-C anywhere
            out.write("\n")
            out.flush()
            return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="Hugging Face GPT-2 folder: ours or any other")
    parser.add_argument("--prompts", default=None,
                        help="batch mode: prompts file (one per line, or .jsonl with {\"prompt\": ...}); "
                             "without it, an interactive prompt loop")
    parser.add_argument("--out", default=None,
                        help="batch mode: output JSON lines (default: <prompts>.jsonl beside it)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens to generate per prompt at most (default 64)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="logits divided by this before sampling (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    parser.add_argument("--stop-token", default="<|endoftext|>",
                        help="a single token that ends a continuation (Python escapes allowed, e.g. '\\n'); "
                             "'none' to always generate --max-new-tokens")
    parser.add_argument("--seed", type=int, default=1234,
                        help="sampling seed; prompt i samples with seed + i (default 1234)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch mode: prompts decoded together")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="weights' dtype (default fp32)")
    parser.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                        help="how the weight matrices are stored: fp32, bf16, or int8 with a scale per output row "
                             "(computed in fp32; rounded at load from the fp32 checkpoint; fewer bytes per token "
                             "make CPU decoding faster: docs/measurements.md)")
    parser.add_argument("--vocab-dir", default=None, help="GPT-2 vocab folder, for a model folder without its own")
    parser.add_argument("--bpe-tokenizer", default=None, help="tokenizer.json from `gpt2ipu train-bpe`")
    parser.add_argument("--ops-dir", default=None,
                        help="build folder of the compiled ops (`gpt2ipu ops build --out DIR`; default "
                             "$GPT2IPU_OPS_DIR): their decode op makes CPU fp32 decoding about 1.6x faster")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def run(args: argparse.Namespace) -> int:
    config = sampling_config(args)
    config.check()
    if args.ops_dir:
        from gpt2ipu.ops import OPS_DIR_ENV

        os.environ[OPS_DIR_ENV] = args.ops_dir
    if args.prompts:
        out = args.out or str(Path(args.prompts).with_suffix("")) + ".continuations.jsonl"
        figures = batch.generate(args.model_dir, args.prompts, out, config, stop_token=args.stop_token,
                                 batch_size=args.batch_size, device=args.device, precision=args.precision,
                                 vocab_dir=args.vocab_dir, bpe_tokenizer=args.bpe_tokenizer, weights=args.weights)
        print(json.dumps({"out": out, **figures}))
        return 0
    model, tokenizer, _ = load_for_generation(args.model_dir, args.device, args.precision, args.vocab_dir,
                                              args.bpe_tokenizer, args.weights)
    config.stop_token_id = stop_token_id(tokenizer, args.stop_token)
    return interactive(model, tokenizer, config)
