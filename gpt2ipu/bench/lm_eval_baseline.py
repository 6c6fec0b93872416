"""lm-evaluation-harness (lm-eval, the optional extra `compare`) run offline on local data.

lm-eval's own `lambada_openai` and `wikitext` tasks download their data sets from the Hugging Face
hub. Here the same task definitions (the prompt templates of `lambada_openai.yaml`, the
detokenizer and `process_results` of lm-eval's `wikitext` task, their metrics) are built as
`ConfigurableTask`s whose documents come from memory (`custom_dataset`), so nothing is
downloaded; the model is lm-eval's `HFLM` on a Hugging Face model folder. The benchmark and the
tests compare our conventions `lambada_openai` and `lm_eval` with what this returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

LAMBADA_TASK = "lambada_openai_local"
WIKITEXT_TASK = "wikitext_local"


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


def lm_eval_model(model_dir: str | os.PathLike, batch_size: int = 1):
    """lm-eval's HFLM on a model folder (its tokenizer files included), on the CPU in fp32."""
    _offline()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(Path(model_dir)), device="cpu", batch_size=batch_size, dtype="float32")


def run_lm_eval(lm, tasks: list) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks`: {task: {"results", "samples"}}, where samples
    are (doc_id, loglikelihood, greedy or None) in document order."""
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0)
    runs = {}
    for name, results in output["results"].items():
        samples = []
        for sample in sorted(output["samples"][name], key=lambda s: int(s["doc_id"])):
            response = sample["resps"][0][0]
            loglikelihood, greedy = response if isinstance(response, tuple) else (response, None)
            samples.append((int(sample["doc_id"]), float(loglikelihood), greedy))
        runs[name] = {"results": {k.split(",")[0]: v for k, v in results.items() if k.endswith(",none")},
                      "samples": samples}
    return runs
