"""LAMBADA: `gpt2ipu evaluate lambada`, target `evaluate_lambada`.

Each passage is scored under the requested conventions, each in the output under its name:

- `lambada_openai` (lm-evaluation-harness's task of that name, the default): the passage, not
  stripped, is split at its last space character (`text.split(' ')`): the target is
  `" " + last piece`, the context the rest. As lm-eval's `_encode_pair` does, whitespace at the
  end of the context moves to the target, and the target's tokens are those of context + target
  after the context's own tokens. Correct when every target token is greedy. A passage without a
  space has `<|endoftext|>` as its context. A context too long keeps its last tokens, so that
  context + target hold the model's window plus one token (lm-eval's truncation).
- `last_word` (strict, as Megatron-LM's `--strict-lambada`): the last whitespace-separated word
  is the target; the context is the text before it, stripped, and the target is tokenized as
  `" " + word` (possibly several tokens). A passage is correct only if every target token is the
  model's greedy (argmax) prediction given the true prefix.
  The passage is stripped of surrounding whitespace first.
- `last_token` (OpenAI's GPT-2 paper): the whole passage (stripped) is tokenized and only its
  last BPE token is the target; the rest is context.

For each: accuracy, and the target perplexity `exp(mean over passages of the target's summed
NLL)` (per word, as lm-evaluation-harness reports it), plus `token_perplexity`
`exp(total NLL / target tokens)`; the two are equal for `last_token`. A context longer than the
model's window keeps its last tokens. When conventions give the same token sequence (most
passages), one forward pass serves them all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import conventions
from gpt2ipu.evaluate.data import LAMBADA_NAME, data_file, read_lambada
from gpt2ipu.evaluate.scoring import score_requests

CONVENTIONS = conventions.LAMBADA


def split_lambada_openai(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids) as lm-eval's `lambada_openai` task and `_encode_pair` make them."""
    context, _, word = text.rpartition(" ")
    target = " " + word
    if not context:  # lm-eval's empty context: the prefix token
        return [tokenizer.eos_id], tokenizer.encode(target)
    stripped = context.rstrip()
    target = context[len(stripped):] + target
    context_ids = tokenizer.encode(stripped)
    return context_ids, tokenizer.encode(stripped + target)[len(context_ids):]


def split_example(tokenizer, text: str, convention: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of one passage under `convention`."""
    if convention == "lambada_openai":
        return split_lambada_openai(tokenizer, text)
    passage = text.strip()
    if convention == "last_word":
        word = passage.split()[-1]
        context = passage[:passage.rfind(word)].strip()
        return tokenizer.encode(context), tokenizer.encode(" " + word)
    if convention == "last_token":
        ids = tokenizer.encode(passage)
        return ids[:-1], ids[-1:]
    raise UserError(f"LAMBADA convention {convention!r}: choose from {', '.join(CONVENTIONS)}")


def fit_window(context: list[int], target: list[int], window: int) -> list[int]:
    """context + target, keeping only the last tokens of the context when it is too long."""
    if len(target) >= window:
        raise UserError(f"a LAMBADA target of {len(target)} tokens does not fit the model's {window}-token window")
    if not context:
        raise UserError("a LAMBADA passage has an empty context before its target")
    return context[-(window - len(target)):] + target


def summarize(nll_per_sample: Sequence[float], target_tokens: Sequence[int], correct: Sequence[bool]) -> dict[str, Any]:
    samples = len(nll_per_sample)
    total_nll = math.fsum(nll_per_sample)
    return {
        "samples": samples,
        "correct": int(sum(correct)),
        "accuracy": sum(correct) / samples,
        "perplexity": math.exp(total_nll / samples),
        "token_perplexity": math.exp(total_nll / sum(target_tokens)),
        "target_tokens": int(sum(target_tokens)),
        "nll": total_nll,
    }


def check_conventions(conventions: Sequence[str]) -> None:
    for convention in conventions:
        if convention not in CONVENTIONS:
            raise UserError(f"LAMBADA convention {convention!r}: choose from {', '.join(CONVENTIONS)}")


def sample_record(tokenizer, convention: str, index: int, context: list[int], target: list[int],
                  nll: float, greedy: bool) -> dict[str, Any]:
    """One --log-samples line: what was scored and how (lm-eval's per-request fields)."""
    return {"task": "lambada", "convention": convention, "index": index, "context": tokenizer.decode(context),
            "target": tokenizer.decode(target), "target_ids": list(target), "loglikelihood": -nll,
            "greedy": greedy, "tokens_scored": len(target)}


def lambada_requests(tokenizer, texts: Sequence[str], conventions: Sequence[str], window: int):
    """({convention: [(context, target, sequence, first target index)]}, {distinct sequence: its
    earliest target index}): what score_lambada scores, one forward pass per distinct sequence."""
    examples = {c: [] for c in conventions}
    first_of: dict[tuple[int, ...], int] = {}
    for text in texts:
        for convention in conventions:
            context, target = split_example(tokenizer, text, convention)
            # lm-eval feeds window + 1 tokens minus the last one; the others fill the window.
            fitted = window + 1 if convention == "lambada_openai" else window
            sequence = tuple(fit_window(context, target, fitted))
            first = len(sequence) - len(target)
            examples[convention].append((context, target, sequence, first))
            first_of[sequence] = min(first, first_of.get(sequence, first))
    return examples, first_of


def score_lambada(model, tokenizer, texts: Sequence[str], *, conventions: Sequence[str] = CONVENTIONS,
                  batch_size: int = 8, log_samples: list | None = None) -> dict[str, dict[str, Any]]:
    """{convention: figures} for the passages `texts` (see the module doc); `log_samples`, when
    given, gets one record per passage and convention."""
    check_conventions(conventions)
    examples, first_of = lambada_requests(tokenizer, texts, conventions, model.config.n_positions)
    sequences = list(first_of)
    scores = score_requests(model, [(s, first_of[s]) for s in sequences], batch_size=batch_size,
                            desc="lambada")
    scores_of = dict(zip(sequences, scores))
    results = {}
    for convention, items in examples.items():
        nll, tokens, correct = [], [], []
        for index, (context, target, sequence, first) in enumerate(items):
            scored = scores_of[sequence]
            offset = first - first_of[sequence]
            nll.append(float(scored.nll[offset:].sum()))
            tokens.append(len(sequence) - first)
            correct.append(bool(scored.correct[offset:].all()))
            if log_samples is not None:
                log_samples.append(sample_record(tokenizer, convention, index, context, target, nll[-1], correct[-1]))
        results[convention] = summarize(nll, tokens, correct)
    results["forward_sequences"] = len(sequences)
    return results


def evaluate_lambada(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                     batch_size: int = 8, device: str = "auto", precision: str = "fp32",
                     conventions: Sequence[str] = CONVENTIONS, limit: int | None = None,
                     vocab_dir: str | None = None, bpe_tokenizer: str | None = None,
                     log_samples: str | os.PathLike | None = None, weights: str = "fp32") -> dict[str, Any]:
    """Evaluate `model_dir` (a folder or a hub id) on the LAMBADA file `data`; write the results
    JSON `out` (and the per-passage JSON lines `log_samples`) atomically."""
    from gpt2ipu.evaluate.results import evaluate_items

    check_conventions(conventions)
    data_path = data_file(data, LAMBADA_NAME)
    return evaluate_items("lambada", model_dir, data_path, read_lambada(data_path)[:limit], score_lambada, out,
                          batch_size=batch_size, device=device, precision=precision, conventions=conventions,
                          limit=limit, vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer, log_samples=log_samples,
                          weights=weights)
