"""The evaluation section: one table of every task and convention of every evaluated model.

Read from the evaluation results files (gpt2ipu.evaluate.results): LAMBADA's per-convention
objects (`lambada_openai`, `last_word`, `last_token`: accuracy, perplexity, token perplexity) and
WikiText's lm-eval word and byte perplexity and Megatron token-, word- and adjusted perplexity, and
HellaSwag's accuracies per convention (`lm_eval`: acc, acc_norm; `llm_c`: acc, acc_norm), with the
right endings' per-token perplexity. Keys a file lacks show as a dash, so results written by
an older or newer version still fit the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.evaluate import conventions

HEADERS = ["model", "task", "convention", "accuracy", "perplexity", "per-token perplexity", "scored"]
# The results file of each task, in results/eval/<run>/, in the order the table lists them.
TASK_FILES = {"lambada": "lambada.json", "wikitext": "wikitext.json", "hellaswag": "hellaswag.json"}
# Megatron-LM's one NLL over three counts (gpt2ipu.evaluate.wiki.perplexities).
MEGATRON_PERPLEXITIES = ("token", "word", "adjusted")


def read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable results file ({err}); rerun that evaluation") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object; rerun that evaluation")
    return results


def lambada_rows(run: str, results: dict) -> list[list[Any]]:
    """One row per scoring convention (every entry holding an accuracy: last_word, last_token)."""
    return [[run, "LAMBADA", name, figures.get("accuracy"), figures.get("perplexity"),
             figures.get("token_perplexity"), figures.get("samples")]
            for name, figures in sorted(results.items())
            if isinstance(figures, dict) and "accuracy" in figures]


def wikitext_rows(run: str, results: dict) -> list[list[Any]]:
    """lm-eval's word and byte perplexity (under `lm_eval`), then Megatron's token, word and adjusted
    perplexity (one NLL, three normalisations; at the top level); accuracy is per token."""
    rows = []
    lm_eval = results.get("lm_eval")
    if isinstance(lm_eval, dict):
        for name in ("word", "byte"):
            if f"{name}_perplexity" in lm_eval:
                rows.append([run, "WikiText", f"lm_eval {name}", None, lm_eval[f"{name}_perplexity"],
                             lm_eval.get("token_perplexity"), lm_eval.get(f"{name}s")])
    for name in MEGATRON_PERPLEXITIES:
        if f"{name}_perplexity" in results:
            accuracy = results.get("token_accuracy") if name == "token" else None
            rows.append([run, "WikiText", f"megatron {name}", accuracy,
                         results[f"{name}_perplexity"], results.get("token_perplexity"),
                         results.get("scored_tokens") if name == "token" else results.get("words")])
    return rows


def hellaswag_rows(run: str, results: dict) -> list[list[Any]]:
    """One row per convention and accuracy (lm_eval, then llm_c: acc, acc_norm); the per-token
    perplexity is the right endings'."""
    rows = []
    for convention in conventions.HELLASWAG:
        figures = results.get(convention)
        if isinstance(figures, dict):
            rows += [[run, "HellaSwag", f"{convention} {metric}", figures[metric], None,
                      figures.get("gold_token_perplexity"), figures.get("samples")]
                     for metric in ("acc", "acc_norm") if metric in figures]
    return rows


ROWS = {"lambada": lambada_rows, "wikitext": wikitext_rows, "hellaswag": hellaswag_rows}


def evaluation_table(eval_dir: str | Path, runs: list[str]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) for the given runs' results in `eval_dir` (results/eval); missing tasks are skipped."""
    rows: list[list[Any]] = []
    for run in runs:
        for task, name in TASK_FILES.items():
            path = Path(eval_dir) / run / name
            if path.is_file():
                rows += ROWS[task](run, read_results(path))
    return HEADERS, rows
