"""HellaSwag: `gpt2ipu evaluate hellaswag`, target `evaluate_hellaswag`.

Each item is a context and (usually four) endings, one of them right (`label`); the model picks
the ending it finds most likely. Two conventions, each a key of the results:

- `lm_eval` (lm-evaluation-harness 0.4.13's `hellaswag` task, zero-shot): context (the "query")
  = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), endings =
  preprocess(ending), where preprocess strips the text, turns " [title]" into ". ", deletes
  every `[...]` and replaces double spaces by one; each ending is the continuation " " + ending
  of the query, encoded as lm-eval's `_encode_pair` does (trailing whitespace of the context
  moves to the continuation; continuation tokens = tokens(context + continuation) after
  tokens(context)). acc: argmax of the endings' summed loglikelihoods; acc_norm: argmax of the
  loglikelihood divided by the ending's length in *characters* (`len(ending)` of the
  preprocessed ending, without the leading space: lm-eval's `completion_len`); acc_bytes: divided
  by its UTF-8 bytes instead (lm-eval computes it as `acc_bytes`, which its hellaswag task does
  not report). Ties go to the first ending (numpy's argmax).
- `llm_c` (llm.c's dev/data/hellaswag.py, build-nanogpt's hellaswag.py): tokens(ctx) +
  tokens(" " + ending) with the raw `ctx` and endings, no preprocessing; acc: the lowest summed
  loss over the ending's tokens; acc_norm: the lowest mean loss per ending token (the figure
  those repositories print as acc_norm). Ties go to the first ending.

A context too long for the model's window keeps its last tokens (lm_eval: window + 1 tokens in
all, the last not fed, as lm-eval truncates; llm_c: window tokens). The four endings of an item
share one computation of the context (gpt2ipu.evaluate.scoring.score_continuations), and items
are batched by length.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import conventions
from gpt2ipu.evaluate.data import HELLASWAG_NAME, data_file, read_hellaswag
from gpt2ipu.evaluate.scoring import score_continuations

CONVENTIONS = conventions.HELLASWAG


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (tasks/hellaswag/utils.py)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def lm_eval_query(record: dict) -> str:
    """lm-eval's `query` (doc_to_text) of a record."""
    return preprocess(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())


def lm_eval_choices(record: dict) -> list[str]:
    """lm-eval's `choices` (doc_to_choice) of a record."""
    return [preprocess(ending) for ending in record["endings"]]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `loglikelihood` + `_encode_pair` make them."""
    if context == "":   # lm-eval's empty context: the prefix token
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    return context_ids, tokenizer.encode(stripped + continuation)[len(context_ids):]


def item_request(tokenizer, record: dict, convention: str) -> tuple[str, list[str], list[int], list[list[int]]]:
    """(context text, endings as scored, context ids, [ending ids]) of one item under `convention`."""
    if convention == "lm_eval":
        query, choices = lm_eval_query(record), lm_eval_choices(record)
        pairs = [encode_pair(tokenizer, query, " " + choice) for choice in choices]
        # The context is the same string for every ending, so its tokens are too.
        return query, choices, pairs[0][0], [ending for _, ending in pairs]
    if convention == "llm_c":
        context = record["ctx"]
        return (context, list(record["endings"]), tokenizer.encode(context) or [tokenizer.eos_id],
                [tokenizer.encode(" " + ending) for ending in record["endings"]])
    raise UserError(f"HellaSwag convention {convention!r}: choose from {', '.join(CONVENTIONS)}")


def check_conventions(conventions: Sequence[str]) -> None:
    for convention in conventions:
        if convention not in CONVENTIONS:
            raise UserError(f"HellaSwag convention {convention!r}: choose from {', '.join(CONVENTIONS)}")


def fit_groups(context: list[int], endings: list[list[int]], limit: int,
               index: int) -> list[tuple[list[int], list[list[int]]]]:
    """One group (context, endings) when every context + ending fits `limit` tokens; else one group
    per ending, each with as many of the context's last tokens as fit beside that ending."""
    longest = max(len(e) for e in endings)
    if longest >= limit:
        raise UserError(f"HellaSwag item {index}: an ending of {longest} tokens does not fit the model's window "
                        f"with any context ({limit} tokens)")
    if any(not e for e in endings):
        raise UserError(f"HellaSwag item {index}: an ending has no tokens")
    if len(context) + longest <= limit:
        return [(context, endings)]
    return [(context[-(limit - len(e)):], [e]) for e in endings]


def _first_max(values) -> int:
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def decide(convention: str, label: int, endings: list[str], nll: list[float], tokens: list[int]) -> dict[str, Any]:
    """The item's picks and hits under `convention` from its endings' summed NLLs."""
    lls = np.array([-x for x in nll], dtype=np.float64)
    if convention == "lm_eval":
        chars = np.array([float(len(e)) for e in endings])
        nbytes = np.array([float(len(e.encode("utf-8"))) for e in endings])
        with np.errstate(divide="ignore", invalid="ignore"):   # an empty ending: lm-eval divides by 0 too
            picks = {"pred": _first_max(lls), "pred_norm": _first_max(lls / chars),
                     "pred_bytes": _first_max(lls / nbytes)}
    else:
        mean_loss = np.array(nll, dtype=np.float64) / np.array(tokens, dtype=np.float64)
        picks = {"pred": _first_max(-np.array(nll, dtype=np.float64)), "pred_norm": _first_max(-mean_loss)}
    return {**picks, **{key.replace("pred", "acc"): value == label for key, value in picks.items()}}


def summarize(convention: str, decisions: list[dict], gold_nll: list[float], gold_tokens: list[int]) -> dict[str, Any]:
    samples = len(decisions)
    figures: dict[str, Any] = {"samples": samples}
    for metric in ("acc", "acc_norm", "acc_bytes") if convention == "lm_eval" else ("acc", "acc_norm"):
        correct = sum(bool(d[metric]) for d in decisions)
        figures[f"correct{metric[3:]}"] = correct
        figures[metric] = correct / samples
    total = math.fsum(gold_nll)
    figures.update(gold_tokens=int(sum(gold_tokens)), gold_nll=total,
                   gold_token_perplexity=math.exp(total / sum(gold_tokens)))
    return figures


def sample_record(convention: str, index: int, record: dict, context: str, endings: list[str],
                  ending_ids: list[list[int]], nll: list[float], greedy: list[bool], decision: dict) -> dict[str, Any]:
    """One --log-samples line: an item under one convention (lm-eval's per-request figures, and its picks)."""
    line = {"task": "hellaswag", "convention": convention, "index": index, "ind": record.get("ind"),
            "label": record["label"], "context": context, "endings": endings, "ending_ids": ending_ids,
            "loglikelihoods": [-x for x in nll], "greedy": greedy, "tokens_scored": [len(e) for e in ending_ids]}
    if convention == "lm_eval":
        line["chars"] = [len(e) for e in endings]
        line["bytes"] = [len(e.encode("utf-8")) for e in endings]
    return {**line, **{k: (bool(v) if k.startswith("acc") else v) for k, v in decision.items()}}


def score_hellaswag(model, tokenizer, records: Sequence[dict], *, conventions: Sequence[str] = CONVENTIONS,
                    batch_size: int = 8, log_samples: list | None = None) -> dict[str, Any]:
    """{convention: figures} for the HellaSwag `records` (see the module doc); `log_samples`, when
    given, gets one record per item and convention."""
    check_conventions(conventions)
    window = model.config.n_positions
    groups, plans = [], []   # plans: (convention, index, context, endings, ending ids, [group index, ...])
    for convention in conventions:
        limit = window + 1 if convention == "lm_eval" else window
        for index, record in enumerate(records):
            context, endings, context_ids, ending_ids = item_request(tokenizer, record, convention)
            fitted = fit_groups(context_ids, ending_ids, limit, index)
            plans.append((convention, index, context, endings, ending_ids,
                          range(len(groups), len(groups) + len(fitted))))
            groups.extend(fitted)
    scores = score_continuations(model, groups, batch_size=batch_size, desc="hellaswag")
    per_convention: dict[str, tuple[list, list, list]] = {c: ([], [], []) for c in conventions}
    for convention, index, context, endings, ending_ids, group_indices in plans:
        item_scores = [s for g in group_indices for s in scores[g]]
        nll = [float(s.nll.sum()) for s in item_scores]
        greedy = [bool(s.correct.all()) for s in item_scores]
        label = records[index]["label"]
        decision = decide(convention, label, endings, nll, [len(e) for e in ending_ids])
        decisions, gold_nll, gold_tokens = per_convention[convention]
        decisions.append(decision)
        gold_nll.append(nll[label])
        gold_tokens.append(len(ending_ids[label]))
        if log_samples is not None:
            log_samples.append(sample_record(convention, index, records[index], context, endings, ending_ids,
                                             nll, greedy, decision))
    results: dict[str, Any] = {c: summarize(c, *per_convention[c]) for c in conventions}
    results["forward_rows"] = len(groups)
    results["forward_tokens"] = sum(len(p) + sum(len(e) - 1 for e in es) for p, es in groups)
    return results


def evaluate_hellaswag(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                       batch_size: int = 8, device: str = "auto", precision: str = "fp32",
                       conventions: Sequence[str] = CONVENTIONS, limit: int | None = None,
                       vocab_dir: str | None = None, bpe_tokenizer: str | None = None,
                       log_samples: str | os.PathLike | None = None, weights: str = "fp32") -> dict[str, Any]:
    """Evaluate `model_dir` (a folder or a hub id) on the HellaSwag file `data`; write the results
    JSON `out` (and the per-item JSON lines `log_samples`) atomically."""
    from gpt2ipu.evaluate.results import evaluate_items

    check_conventions(conventions)
    data_path = data_file(data, HELLASWAG_NAME)
    return evaluate_items("hellaswag", model_dir, data_path, read_hellaswag(data_path)[:limit], score_hellaswag, out,
                          batch_size=batch_size, device=device, precision=precision, conventions=conventions,
                          limit=limit, vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer, log_samples=log_samples,
                          weights=weights)
