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
from collections.abc import Iterable, Mapping
from typing import Any

from gpt2ipu.fsutil import write_text_atomic
from gpt2ipu.provenance import provenance_record


def write_results(out: str | os.PathLike, result: Mapping[str, Any], *, stage: str, params: Mapping[str, Any],
                  inputs: Iterable[str | os.PathLike]) -> None:
    record = dict(result)
    record["provenance"] = provenance_record(stage, params, inputs)
    write_text_atomic(out, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def write_samples(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
