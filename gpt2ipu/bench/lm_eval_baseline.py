"""lm-evaluation-harness (lm-eval, the optional extra `compare`) run offline on local data.

lm-eval's own `lambada_openai`, `wikitext` and `hellaswag` tasks download their data sets from the
Hugging Face hub. Here the same task definitions (the prompt templates of `lambada_openai.yaml`, the
detokenizer and `process_results` of lm-eval's `wikitext` task, `hellaswag.yaml` with its
`process_docs`, their metrics) are built as
`ConfigurableTask`s whose documents come from memory (`custom_dataset`), so nothing is
downloaded; the model is lm-eval's `HFLM` on a Hugging Face model folder. The benchmark and the
tests compare our conventions `lambada_openai`, WikiText's and HellaSwag's `lm_eval` with what this
returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LAMBADA_TASK = "lambada_openai_local"
WIKITEXT_TASK = "wikitext_local"
HELLASWAG_TASK = "hellaswag_local"


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _offline() -> None:
    # Before `datasets` / `huggingface_hub` are imported: they read these once.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _in_memory(field: str, values: Sequence[str]):
    import datasets

    return lambda **_: {"test": datasets.Dataset.from_list([{field: value} for value in values])}


def lambada_task(texts: Sequence[str]):
    """lm-eval's `lambada_openai` (tasks/lambada/lambada_openai.yaml) on `texts`."""
    _offline()
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config={
        "task": LAMBADA_TASK, "custom_dataset": _in_memory("text", texts), "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    })


def wikitext_task(pages: Sequence[str]):
    """lm-eval's `wikitext` (tasks/wikitext/wikitext.yaml) on the documents `pages`."""
    _offline()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks.wikitext import preprocess_wikitext

    return ConfigurableTask(config={
        "task": WIKITEXT_TASK, "custom_dataset": _in_memory("page", pages), "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": preprocess_wikitext.wikitext_detokenizer,
        "process_results": preprocess_wikitext.process_results,
        "metric_list": [{"metric": name, "higher_is_better": False}
                        for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    })


def hellaswag_task(records: Sequence[dict]):
    """lm-eval's `hellaswag` (tasks/hellaswag/hellaswag.yaml, its utils.process_docs) on the
    HellaSwag `records` (the validation split, as that task evaluates)."""
    _offline()
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks.hellaswag import utils

    fields = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type")
    # The Hugging Face copy (Rowan/hellaswag) has the same fields, its labels as strings.
    rows = [{**{k: r.get(k) for k in fields}, "label": str(r["label"])} for r in records]
    return ConfigurableTask(config={
        "task": HELLASWAG_TASK, "custom_dataset": lambda **_: {"validation": datasets.Dataset.from_list(rows)},
        "validation_split": "validation", "output_type": "multiple_choice",
        "process_docs": utils.process_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    })


def lm_eval_model(model_dir: str | os.PathLike, batch_size: int = 1):
    """lm-eval's HFLM on a model folder (its tokenizer files included), on the CPU in fp32."""
    _offline()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(Path(model_dir)), device="cpu", batch_size=batch_size, dtype="float32")


def run_lm_eval(lm, tasks: list) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks`: {task: {"results", "samples"}}, where samples
    are (doc_id, loglikelihood, greedy or None) in document order; for a multiple-choice task
    (doc_id, [loglikelihood per choice], [greedy per choice]), and "metrics" holds each document's
    acc and acc_norm."""
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0)
    runs = {}
    for name, results in output["results"].items():
        samples, metrics = [], []
        for sample in sorted(output["samples"][name], key=lambda s: int(s["doc_id"])):
            responses = [r[0] if isinstance(r[0], tuple) else (r[0], None) for r in sample["resps"]]
            if len(responses) == 1:
                samples.append((int(sample["doc_id"]), float(responses[0][0]), responses[0][1]))
            else:
                samples.append((int(sample["doc_id"]), [float(ll) for ll, _ in responses], [g for _, g in responses]))
            metrics.append({k: sample[k] for k in ("acc", "acc_norm") if k in sample})
        runs[name] = {"results": {k.split(",")[0]: v for k, v in results.items() if k.endswith(",none")},
                      "samples": samples, "metrics": metrics}
    return runs


# ----------------------------------------------------------------------------------------------
# `python -m gpt2ipu.bench.lm_eval_baseline`: lm-eval's figures and samples beside ours


def compare_files(model_dir: str, lambada: str | None, wikitext: str | None, ours_samples: list[str],
                  documents: str = "articles", batch_size: int = 1, hellaswag: str | None = None) -> dict[str, Any]:
    """lm-eval on the LAMBADA / WikiText files, against our per-sample logs (`--log-samples`) of
    the same files and model: both sets of figures and the largest per-sample differences."""
    import json
    import math

    from gpt2ipu.evaluate.data import read_hellaswag, read_lambada, read_wikitext
    from gpt2ipu.evaluate.wiki import split_articles

    ours = [json.loads(line) for path in ours_samples for line in open(path, encoding="utf-8")]
    tasks, kinds = [], {}
    if lambada:
        tasks.append(lambada_task(read_lambada(lambada)))
        kinds[LAMBADA_TASK] = [s for s in ours if s.get("convention") == "lambada_openai"]
    if wikitext:
        text = read_wikitext(wikitext)
        tasks.append(wikitext_task(split_articles(text) if documents == "articles" else [text]))
        kinds[WIKITEXT_TASK] = [s for s in ours if s.get("convention") == "lm_eval" and s.get("task") != "hellaswag"]
    if hellaswag:
        tasks.append(hellaswag_task(read_hellaswag(hellaswag)))
        kinds[HELLASWAG_TASK] = [s for s in ours if s.get("task") == "hellaswag" and s.get("convention") == "lm_eval"]
    runs = run_lm_eval(lm_eval_model(model_dir, batch_size), tasks)
    report = {}
    for name, run in runs.items():
        if name == HELLASWAG_TASK:
            mine = kinds[name]
            if len(mine) != len(run["samples"]):
                raise SystemExit(f"{name}: {len(run['samples'])} lm-eval items but {len(mine)} of ours; "
                                 "log ours with --log-samples on the same file")
            report[name] = {
                "lm_eval": run["results"], "samples": len(mine),
                "ours": {"acc": sum(s["acc"] for s in mine) / len(mine),
                         "acc_norm": sum(s["acc_norm"] for s in mine) / len(mine)},
                "max_abs_loglikelihood_diff": max(abs(a - b) for s, (_, lls, _) in zip(mine, run["samples"])
                                                  for a, b in zip(s["loglikelihoods"], lls)),
                "acc_mismatches": sum(s["acc"] != bool(m["acc"]) for s, m in zip(mine, run["metrics"])),
                "acc_norm_mismatches": sum(s["acc_norm"] != bool(m["acc_norm"]) for s, m in zip(mine, run["metrics"])),
            }
            continue
        mine = kinds[name]
        if len(mine) != len(run["samples"]):
            raise SystemExit(f"{name}: {len(run['samples'])} lm-eval samples but {len(mine)} of ours; "
                             "log ours with --log-samples on the same file (and --documents)")
        diffs = [abs(s["loglikelihood"] - ll) for s, (_, ll, _) in zip(mine, run["samples"])]
        report[name] = {
            "lm_eval": run["results"],
            "samples": len(diffs),
            "max_abs_loglikelihood_diff": max(diffs),
            "max_rel_loglikelihood_diff": max(d / max(abs(ll), 1e-30) for d, (_, ll, _) in zip(diffs, run["samples"])),
            "greedy_mismatches": sum(s["greedy"] != g for s, (_, _, g) in zip(mine, run["samples"]) if g is not None),
        }
        if name == LAMBADA_TASK:
            report[name]["ours"] = {"acc": sum(s["greedy"] for s in mine) / len(mine),
                                    "perplexity": math.exp(-math.fsum(s["loglikelihood"] for s in mine) / len(mine))}
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="lm-eval's figures and per-sample loglikelihoods beside ours")
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder with its tokenizer files")
    parser.add_argument("--lambada", help="LAMBADA jsonl (lm-eval's lambada_openai on it)")
    parser.add_argument("--wikitext", help="WikiText .tokens/.raw file (lm-eval's wikitext on it)")
    parser.add_argument("--hellaswag", help="HellaSwag jsonl (lm-eval's hellaswag on it)")
    parser.add_argument("--documents", default="articles", choices=["articles", "whole"],
                        help="WikiText documents, as given to `gpt2ipu evaluate wiki`")
    parser.add_argument("--ours", nargs="+", required=True, help="our --log-samples files of the same runs")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch size")
    args = parser.parse_args(argv)
    print(json.dumps(compare_files(args.model_dir, args.lambada, args.wikitext, args.ours, args.documents,
                                   args.batch_size, args.hellaswag), indent=2, default=str))


if __name__ == "__main__":
    main()
