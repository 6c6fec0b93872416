"""The evaluation commands' results file, and their per-sample log.

A results file is one JSON object written atomically (nothing appears under its name unless the
evaluation finished), with a `provenance` entry: the record of `gpt2ipu.provenance` (stage,
parameters, inputs, package version, time), without figures since the results are the figures.
It is a single file rather than a folder, so its provenance lives inside it instead of in a
provenance.json beside it.

The per-sample log (`--log-samples FILE.jsonl`) has one JSON object per line, one per passage or
document (or window) and convention, also written atomically, so two evaluators can be compared
sample by sample (lm-eval's `--log_samples` holds the same figures).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gpt2ipu.allocator import keep_freed_memory
from gpt2ipu.fsutil import write_text_atomic
from gpt2ipu.provenance import provenance_record


def write_results(out: str | os.PathLike, result: Mapping[str, Any], *, stage: str, params: Mapping[str, Any],
                  inputs: Iterable[str | os.PathLike]) -> None:
    record = dict(result)
    record["provenance"] = provenance_record(stage, params, inputs)
    write_text_atomic(out, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def write_samples(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))


def load_for_scoring(model_path, device: str, precision: str, vocab_dir: str | None, bpe_tokenizer: str | None,
                     weights: str):
    """(model, tokenizer, device) as `load_pretrained` gives them, and this process's malloc set to keep
    the memory it frees (gpt2ipu/allocator.py), after the load (which may want the opposite,
    gpt2ipu/model/lowp.py). Scoring allocates and frees the same large activations every batch
    (a WikiText batch: 100 MB per MLP output); from fresh mappings each time, their page faults
    took 6% of GPT-2 small's WikiText time (docs/measurements.md)."""
    from gpt2ipu.pretrained import load_pretrained

    loaded = load_pretrained(model_path, device, precision, vocab_dir, bpe_tokenizer, weights)
    keep_freed_memory()
    return loaded


def evaluate_items(task: str, model_dir: str | os.PathLike, data_path: str | os.PathLike, items: Sequence[Any],
                   score: Callable[..., dict[str, Any]], out: str | os.PathLike, *, batch_size: int, device: str,
                   precision: str, conventions: Sequence[str], limit: int | None, vocab_dir: str | None,
                   bpe_tokenizer: str | None, log_samples: str | os.PathLike | None,
                   weights: str = "fp32") -> dict[str, Any]:
    """What every task's `evaluate_<task>` does around its scoring: load the model (a folder or a hub
    id), score `items` with `score(model, tokenizer, items, conventions=, batch_size=, log_samples=)`,
    write the results JSON `out` (stage `evaluate_<task>`) and the per-sample log, both atomically."""
    from gpt2ipu.pretrained import resolve_model_dir

    start = time.perf_counter()
    model_path = resolve_model_dir(model_dir)
    model, tokenizer, device_used = load_for_scoring(model_path, device, precision, vocab_dir, bpe_tokenizer, weights)
    samples: list | None = [] if log_samples else None
    figures = score(model, tokenizer, items, conventions=conventions, batch_size=batch_size, log_samples=samples)
    params = {"batch_size": batch_size, "device": str(device_used), "precision": precision, "weights": weights,
              "conventions": list(conventions), "limit": limit, "tokenizer": tokenizer.name}
    result = {"task": task, "model_dir": str(model_dir), "data": str(data_path), "samples": len(items),
              **figures, "seconds": round(time.perf_counter() - start, 3)}
    if log_samples:
        write_samples(log_samples, samples)
    write_results(out, result, stage=f"evaluate_{task}", params=params, inputs=[model_path, data_path])
    return result
