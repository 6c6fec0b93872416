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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpt2ipu.errors import UserError
from gpt2ipu.generate.decode import FusedDecoder
from gpt2ipu.model.lowp import weights_format


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


def prefill(model, ids: torch.Tensor, cache, mask: torch.Tensor | None, fused) -> torch.Tensor:
    """Final hidden states of the prompt ids [B, T], filling `cache`.

    With int8 weights and the fused decoder (CPU), the prompt goes in pieces of at most 16
    rows (batch x positions), which the compiled int8 op multiplies as stored; a longer call
    would widen every int8 matrix to fp32 first (measured: 218 ms for a 32-token prompt on
    GPT-2 small, against ~5 ms per decode step; docs/measurements.md). The pieces also round the
    prompt's activations as decoding does (gpt2ipu/model/lowp.py).
    """
    if fused is None or weights_format(model) != "int8":
        return model.hidden_states(ids, cache=cache, attention_mask=mask)
    width = max(1, FusedDecoder.MAX_ROWS // ids.shape[0])
    for start in range(0, ids.shape[1], width):
        stop = min(ids.shape[1], start + width)
        hidden = model.hidden_states(ids[:, start:stop], cache=cache,
                                     attention_mask=None if mask is None else mask[:, :stop])
    return hidden


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

    # One compiled call per step after the prompt, where it applies (CPU; gpt2ipu/generate/decode.py).
    fused = FusedDecoder.for_model(model) if device.type == "cpu" and batch <= FusedDecoder.MAX_ROWS else None
    start = time.perf_counter()
    cache = model.new_cache(capacity=min(window, ids.shape[1] + config.max_new_tokens))   # allocated once
    hidden = prefill(model, ids, cache, mask, fused)
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
        if ids.shape[1] <= window and fused is not None:
            logits = fused.step(next_ids, cache, mask)
            continue
        if ids.shape[1] <= window:
            hidden = model.hidden_states(next_ids[:, None], cache=cache, attention_mask=mask)
        else:
            # The context is full: keep its last `window` tokens and recompute them, as nanoGPT
            # does (a cache cannot slide under learned absolute positions).
            ids, mask = ids[:, -window:], (None if mask is None else mask[:, -window:])
            cache = model.new_cache()
            hidden = model.hidden_states(ids, cache=cache, attention_mask=mask)
        logits = model.lm_head(hidden[:, -1]).float()
    return [Generation(outputs[row], stopped[row], times[0], times[1:]) for row in range(batch)]
