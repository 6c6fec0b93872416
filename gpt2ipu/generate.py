"""Text generation: `gpt2ipu generate` (interactive, like the original `text_generate_gpt2.py`) and
batch mode (a prompts file in, JSON lines out: the Snakemake target `generate`).

Decoding, per step: repetition penalty -> greedy argmax, or temperature -> top-k -> top-p ->
sampling (the order and meaning of Hugging Face's processors, so settings carry over). Prompts of
a batch are left-padded with an attention mask, and a key/value cache means each step feeds only
the new token. Each prompt samples from its own generator seeded with `seed + its index`, so the
same seed gives the same text whatever the batch size. A row stops at the stop token (not part of
the continuation) or after `max_new_tokens`. Past the model's context, the window slides: the last
n_positions tokens are recomputed each step (nanoGPT's crop), so any length can be generated.

Works on any Hugging Face GPT-2 folder, on CPU or CUDA, with fp32 / bf16 / fp16 weights.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import parse_json_record


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = False              # argmax; also implied by temperature 0
    temperature: float = 1.0
    top_k: int = 0                    # 0 = no top-k cut
    top_p: float = 1.0                # 1 = no nucleus cut
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in the prompt or output
    stop_token_id: int | None = None
    seed: int = 1234

    def check(self) -> None:
        problems = {
            "max_new_tokens": self.max_new_tokens < 1,
            "temperature": self.temperature < 0,
            "top_k": self.top_k < 0,
            "top_p": not 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty <= 0,
        }
        bad = [name for name, is_bad in problems.items() if is_bad]
        if bad:
            raise UserError(f"bad sampling setting(s): {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)} "
                            "(max_new_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1, "
                            "repetition_penalty > 0)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class Generation:
    tokens: list[int]                 # the new tokens, without the stop token
    stopped: bool                     # True: ended by the stop token; False: by max_new_tokens
    prefill_seconds: float = 0.0      # prompt -> first new token
    step_seconds: list[float] = field(default_factory=list)   # each later token


# ----------------------------------------------------------------------------------------------
# One decoding step

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as Hugging Face applies it: divide positive logits of seen tokens, multiply negative ones."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, or outside the smallest set with probability >= top_p, set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)   # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False   # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def choose_next(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row [B] from float32 logits [B, V]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.is_greedy:
        return logits.argmax(dim=-1)
    logits = top_k_top_p_filter(logits / config.temperature, config.top_k, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


# ----------------------------------------------------------------------------------------------
# The decoding loop

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T] ids with each prompt at the right end, and the mask of real tokens (None: no padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, pad_id: int = 0,
             seeds: Sequence[int] | None = None, vocab_limit: int | None = None,
             on_token: Callable[[int, list[int]], None] | None = None, timed: bool = False) -> list[Generation]:
    """New tokens for each prompt (a list of ids, at least one each), decoded together as one batch.

    seeds: one per prompt for sampling (default: config.seed + row).

    vocab_limit: ids at or above it (embedding rows the tokenizer lacks) are never chosen.
    on_token(row, tokens so far): called after each step for rows still running.
    timed: synchronize the device after each step so the step times are true latencies.
    """
    config.check()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use the EOS id for an empty prompt)")
    device = model.wte.weight.device
    window = model.config.n_positions
    if max(len(p) for p in prompts) > window:
        raise UserError(f"a prompt of {max(len(p) for p in prompts)} tokens exceeds the model's {window}-token "
                        "context; shorten it")
    batch = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    seeds = [config.seed + row for row in range(batch)] if seeds is None else seeds
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros((batch, model.config.vocab_size), dtype=torch.bool, device=device)
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        rows = torch.arange(batch, device=device)[:, None].expand_as(ids)
        seen[rows[real], ids[real]] = True
    outputs: list[list[int]] = [[] for _ in range(batch)]
    stopped = [False] * batch
    times: list[float] = []

    start = time.perf_counter()
    hidden, past = model.hidden_states(ids, attention_mask=mask, use_cache=True)
    logits = model.lm_head(hidden[:, -1]).float()
    for step in range(config.max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        next_ids = choose_next(logits, config, seen, generators)
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        chosen = next_ids.tolist()   # one host sync per step: the stop test needs the values
        if timed and device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
        for row, token in enumerate(chosen):
            if stopped[row]:
                continue
            if token == config.stop_token_id:
                stopped[row] = True
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, outputs[row])
        if all(stopped) or step == config.max_new_tokens - 1:
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        if ids.shape[1] <= window:
            hidden, past = model.hidden_states(next_ids[:, None], past_key_values=past, attention_mask=mask,
                                               use_cache=True)
        else:
            # The context is full: keep its last `window` tokens and recompute them, as nanoGPT
            # does (a cache cannot slide under learned absolute positions).
            ids, mask = ids[:, -window:], (None if mask is None else mask[:, -window:])
            hidden, past = model.hidden_states(ids, attention_mask=mask, use_cache=True)
        logits = model.lm_head(hidden[:, -1]).float()
    return [Generation(outputs[row], stopped[row], times[0], times[1:]) for row in range(batch)]


# ----------------------------------------------------------------------------------------------
# Models for decoding

def use_decode_layout(model) -> None:
    """Make the model's matrix products fast for decoding on CPU (same values; CUDA models are left as they are).

    Decoding multiplies one token's vector by every weight matrix, a matrix-vector product whose
    speed is set by how fast the weights stream from memory. MKL's product (what F.linear calls)
    streams the [out, in] matrices nn.Linear keeps at about 18 GB/s here. With the compiled ops
    (custom_ops/decode_linear.cpp) loaded and fp32 weights, every linear layer, the LM head
    included, goes through `DecodeLinear`: the compiled op for a few rows (decode steps, about
    2.5x F.linear), F.linear for more (the prompt). Without them, the weights are re-laid out
    [in, out] once and handed to nn.Linear as transposed views, so F.linear(x, W_view) is x @ W
    with W contiguous, which MKL streams about 1.5x faster. Either way the outputs may differ
    from F.linear's in the last bits, as with any other kernel.
    """
    from gpt2ipu import ops

    weight = model.wte.weight
    if weight.device.type != "cpu":
        return
    if weight.dtype == torch.float32 and ops.load_ops() is not None:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, DecodeLinear(child))
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight = torch.nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
        embedding = torch.nn.Parameter(model.wte.weight.t().contiguous().t(), requires_grad=False)
        model.wte.weight = embedding
        if model.config.tie_word_embeddings:
            model.lm_head.weight = embedding
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.t().contiguous().t(), requires_grad=False)


class DecodeLinear(torch.nn.Module):
    """An nn.Linear's own weight and bias (shared, so a tied LM head stays tied), applied by the
    compiled decode op when a call has few rows and by F.linear otherwise."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gpt2ipu import ops

        if ops.decode_linear_available(x, self.weight):
            return ops.decode_linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def load_for_generation(model_dir, device: str = "auto", precision: str = "fp32", vocab_dir=None,
                        bpe_tokenizer=None):
    from gpt2ipu.evaluate.results import load_for_evaluation

    model, tokenizer, device_used = load_for_evaluation(model_dir, device, precision, vocab_dir, bpe_tokenizer)
    use_decode_layout(model)
    return model, tokenizer, device_used


def stop_token_id(tokenizer, stop_token: str | None) -> int | None:
    """The id of `stop_token` (a single token, Python escapes allowed, e.g. "\\n"); None/"" = no stop token."""
    if stop_token is None or stop_token == "" or stop_token.lower() == "none":
        return None
    from gpt2ipu.data.tokenizer import EOT

    if stop_token == EOT:
        return tokenizer.eos_id
    text = codecs.decode(stop_token, "unicode_escape") if "\\" in stop_token else stop_token
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise UserError(f"stop token {stop_token!r} is {len(ids)} tokens, not one; give a single token "
                        f"such as {EOT!r}, '\\n' or '.', or 'none'")
    return ids[0]


def prompt_ids(tokenizer, text: str, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): an empty prompt is the EOS token (unconditional text); a long one keeps its end."""
    ids = tokenizer.encode(text) if text else [tokenizer.eos_id]
    if len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False


def max_prompt_tokens(model, config: SamplingConfig) -> int:
    """Prompt tokens kept: the model's context less the new tokens, but at least half the context
    (beyond the context, generation slides its window; see `generate`)."""
    window = model.config.n_positions
    return max(window - config.max_new_tokens, window // 2, 1)


# ----------------------------------------------------------------------------------------------
# Batch mode

def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts, one per line of a text file, or `{"prompt": ...}` per line of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                prompts.append(parse_json_record(line, path, number, "prompt", "a prompt record")["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return prompts


def generate_texts(model, tokenizer, prompts: Sequence[str], config: SamplingConfig, *,
                   batch_size: int = 8) -> list[dict[str, Any]]:
    """One record per prompt, in order; prompts of similar length are batched together."""
    limit = max_prompt_tokens(model, config)
    encoded = [prompt_ids(tokenizer, p, limit) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i][0]), i))
    records: list[dict[str, Any] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            # Each prompt samples with seed + its index in the file, whatever batch it lands in.
            generations = generate(model, [encoded[i][0] for i in rows], config, pad_id=tokenizer.eos_id,
                                   seeds=[config.seed + i for i in rows], vocab_limit=tokenizer.vocab_size)
            for index, gen in zip(rows, generations):
                records[index] = {
                    "index": index, "prompt": prompts[index], "continuation": tokenizer.decode(gen.tokens),
                    "prompt_tokens": len(encoded[index][0]), "prompt_truncated": encoded[index][1],
                    "new_tokens": len(gen.tokens), "stopped_by": "stop_token" if gen.stopped else "max_new_tokens",
                    "token_ids": gen.tokens,
                }
            bar.update(len(rows))
    return records


def run_batch(model_dir: str | os.PathLike, prompts_path: str | os.PathLike, out: str | os.PathLike,
              config: SamplingConfig, *, stop_token: str | None = "<|endoftext|>", batch_size: int = 8,
              device: str = "auto", precision: str = "fp32", vocab_dir: str | None = None,
              bpe_tokenizer: str | None = None, provenance_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Continue every prompt of `prompts_path`; write the JSON lines `out` (and provenance) atomically."""
    from gpt2ipu.fsutil import atomic_file
    from gpt2ipu.provenance import write_provenance

    started = time.perf_counter()
    prompts = read_prompts(prompts_path)
    config.check()
    model, tokenizer, device_used = load_for_generation(model_dir, device, precision, vocab_dir, bpe_tokenizer)
    config.stop_token_id = stop_token_id(tokenizer, stop_token)
    records = generate_texts(model, tokenizer, prompts, config, batch_size=batch_size)
    seconds = time.perf_counter() - started
    new_tokens = sum(r["new_tokens"] for r in records)
    figures = {"prompts": len(records), "new_tokens": new_tokens, "seconds": round(seconds, 3),
               "truncated_prompts": sum(r["prompt_truncated"] for r in records)}
    with atomic_file(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    params = {**asdict(config), "stop_token": stop_token, "batch_size": batch_size, "device": str(device_used),
              "precision": precision, "tokenizer": tokenizer.name}
    out = Path(out)
    provenance_path = Path(provenance_path) if provenance_path else out.with_name(out.stem + ".provenance.json")
    write_provenance(provenance_path.parent, "generate", params, [model_dir, prompts_path], figures,
                     name=provenance_path.name)
    return figures


# ----------------------------------------------------------------------------------------------
# Interactive mode

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
                print(f"(prompt truncated to its last {limit} tokens)", file=sys.stderr)
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


# ----------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="Hugging Face GPT-2 folder: ours or any other")
    parser.add_argument("--prompts", default=None,
                        help="batch mode: prompts file (one per line, or .jsonl with {\"prompt\": ...}); "
                             "without it, an interactive prompt loop")
    parser.add_argument("--out", default=None, help="batch mode: output JSON lines (default: <prompts>.jsonl beside it)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    parser.add_argument("--stop-token", default="<|endoftext|>",
                        help="a single token that ends a continuation (Python escapes allowed, e.g. '\\n'); "
                             "'none' to always generate --max-new-tokens")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8, help="batch mode: prompts decoded together")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
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
        figures = run_batch(args.model_dir, args.prompts, out, config, stop_token=args.stop_token,
                            batch_size=args.batch_size, device=args.device, precision=args.precision,
                            vocab_dir=args.vocab_dir, bpe_tokenizer=args.bpe_tokenizer)
        print(json.dumps({"out": out, **figures}))
        return 0
    model, tokenizer, _ = load_for_generation(args.model_dir, args.device, args.precision, args.vocab_dir,
                                              args.bpe_tokenizer)
    config.stop_token_id = stop_token_id(tokenizer, args.stop_token)
    return interactive(model, tokenizer, config)
