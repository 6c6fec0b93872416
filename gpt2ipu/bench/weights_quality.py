"""`gpt2ipu bench weights_quality`: what bf16 and int8 weights cost in quality, against fp32 on the same inputs.

For one model folder, each weight format (gpt2ipu/model/lowp.py) is scored on the same WikiText
articles (lm-eval's word perplexity), the same LAMBADA passages (lm-eval's `lambada_openai`
accuracy) and the same prompts (greedy continuations of `--greedy-tokens` tokens, compared token by
token with fp32's), and a decoded perplexity (the first article's tokens, each predicted by a decode
step: the path where int8 also rounds the activations). Issue 21's bounds: word perplexity within
0.5% (bf16) and 2% (int8) of fp32's (the decoded one held to the same), LAMBADA accuracy within 1
point, the continuations identical in most prompts; `bounds_met` says whether each held. Without
--wiki / --lambada, the embedded generated sets are used (a smoke run: only a real model on the real
files says anything about quality).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch

from gpt2ipu.log import package_logger

log = package_logger(__name__)

PERPLEXITY_BOUND = {"bf16": 0.005, "int8": 0.02}   # relative to fp32's word perplexity
ACCURACY_BOUND = 0.01                              # LAMBADA accuracy, absolute (1 point)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default="gpt2", help="model folder or hub id (default gpt2, from the cache)")
    parser.add_argument("--wiki", default=None, help="WikiText word-level test file (default: the generated sample)")
    parser.add_argument("--articles", type=int, default=8, help="WikiText articles scored (the first N)")
    parser.add_argument("--lambada", default=None, help="lambada_test.jsonl (default: the generated sample)")
    parser.add_argument("--passages", type=int, default=500, help="LAMBADA passages scored (the first N)")
    parser.add_argument("--prompts", default="config/prompts.txt", help="prompts for the greedy comparison")
    parser.add_argument("--greedy-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    parser.add_argument("--formats", default="bf16,int8", help="weight formats compared with fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--ops-dir", default=None, help="build folder of the ops (default $GPT2IPU_OPS_DIR)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from gpt2ipu.evaluate.data import read_lambada, read_wikitext, sample_lambada_texts, sample_wikitext
    from gpt2ipu.evaluate.wiki import split_articles
    from gpt2ipu.generate.batch import read_prompts
    from gpt2ipu.ops import OPS_DIR_ENV

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops_dir:
        os.environ[OPS_DIR_ENV] = args.ops_dir
    wiki = read_wikitext(args.wiki) if args.wiki else sample_wikitext(args.articles)
    articles = "".join(split_articles(wiki)[:args.articles])
    passages = (read_lambada(args.lambada) if args.lambada else sample_lambada_texts(args.passages))[:args.passages]
    figures = compare_weights(args.model_dir, articles, passages, read_prompts(args.prompts),
                              formats=args.formats.split(","), greedy_tokens=args.greedy_tokens,
                              batch_size=args.batch_size)
    worst = max(figures["formats"][f]["perplexity_ratio"] for f in figures["formats"] if f != "fp32")
    return {"ours": worst, "unit": "worst word perplexity / fp32's", "baselines": {}, "speedup": {},
            "model_dir": str(args.model_dir), "wiki": args.wiki or "generated sample", "articles": args.articles,
            "lambada": args.lambada or "generated sample", "passages": len(passages), **figures}


def compare_weights(model_dir, articles: str, passages: Sequence[str], prompts: Sequence[str], *,
                    formats: Sequence[str] = ("bf16", "int8"), greedy_tokens: int = 16,
                    batch_size: int = 8) -> dict[str, Any]:
    """fp32's figures and each format's, with the differences and whether issue 21's bounds hold."""
    results = {weights: score_format(model_dir, weights, articles, passages, prompts, greedy_tokens, batch_size)
               for weights in ["fp32", *formats]}
    reference = results["fp32"]
    for weights in formats:
        result = results[weights]
        result["perplexity_ratio"] = result["word_perplexity"] / reference["word_perplexity"]
        result["accuracy_difference"] = result["lambada_accuracy"] - reference["lambada_accuracy"]
        same = [a == b for a, b in zip(result.pop("continuations"), reference["continuations"])]
        result["prompts_identical"] = f"{sum(same)} of {len(same)}"
        result["decoded_perplexity_ratio"] = result["decoded_perplexity"] / reference["decoded_perplexity"]
        result["bounds_met"] = {
            "perplexity": abs(result["perplexity_ratio"] - 1) <= PERPLEXITY_BOUND.get(weights, 0.02),
            "decoded_perplexity": abs(result["decoded_perplexity_ratio"] - 1) <= PERPLEXITY_BOUND.get(weights, 0.02),
            "lambada_accuracy": abs(result["accuracy_difference"]) <= ACCURACY_BOUND,
            "greedy_most_prompts": 2 * sum(same) > len(same),
        }
    reference.pop("continuations")
    return {"formats": results, "greedy_tokens": greedy_tokens}


def score_format(model_dir, weights: str, articles: str, passages: Sequence[str], prompts: Sequence[str],
                 greedy_tokens: int, batch_size: int) -> dict[str, Any]:
    from gpt2ipu.evaluate.lambada import score_lambada
    from gpt2ipu.evaluate.wiki import score_wikitext_lm_eval
    from gpt2ipu.generate.batch import load_for_generation
    from gpt2ipu.generate.sampling import SamplingConfig, generate

    model, tokenizer, _ = load_for_generation(model_dir, "cpu", "fp32", weights=weights)
    wiki = score_wikitext_lm_eval(model, tokenizer, articles, batch_size=batch_size)
    lambada = score_lambada(model, tokenizer, passages, conventions=["lambada_openai"], batch_size=batch_size)
    config = SamplingConfig(max_new_tokens=greedy_tokens, greedy=True)
    continuations = [generate(model, [tokenizer.encode(p) or [tokenizer.eos_id]], config)[0].tokens for p in prompts]
    decoded = decoded_perplexity(model, tokenizer.encode(articles)[:model.config.n_positions])
    log.info(f"weights_quality: {weights}: word perplexity {wiki['word_perplexity']:.4f}, "
             f"decoded token perplexity {decoded:.4f}, LAMBADA accuracy {lambada['lambada_openai']['accuracy']:.4f}")
    return {"word_perplexity": wiki["word_perplexity"], "tokens": wiki["tokens"], "decoded_perplexity": decoded,
            "lambada_accuracy": lambada["lambada_openai"]["accuracy"], "continuations": continuations}


def decoded_perplexity(model, ids: Sequence[int]) -> float:
    """Token perplexity of ids[1:], each next-token distribution from a decode step, as generation makes it.

    Why beside the evaluation figures: evaluation multiplies many rows at once, where int8 weights
    meet fp32 (or bf16) activations; decoding rounds activations to int8 per block of 64
    (gpt2ipu/model/lowp.py), and this is the figure that measures that path.
    """
    from gpt2ipu.generate.decode import FusedDecoder

    fused = FusedDecoder.for_model(model)
    with torch.inference_mode():
        cache = model.new_cache(capacity=len(ids))
        logits = model.lm_head(model.hidden_states(torch.tensor([ids[:1]]), cache=cache)[:, -1])
        nll = []
        for t in range(1, len(ids)):
            nll.append(-torch.log_softmax(logits.double(), dim=-1)[0, ids[t]].item())
            if t == len(ids) - 1:
                break
            token = torch.tensor([ids[t]])
            if fused is not None:
                logits = fused.step(token, cache, None)
            else:
                logits = model.lm_head(model.hidden_states(token[:, None], cache=cache)[:, -1])
    return math.exp(sum(nll) / len(nll))

