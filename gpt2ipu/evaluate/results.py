"""The evaluation commands' results file.

A results file is one JSON object written atomically (nothing appears under its name unless the
evaluation finished), with a `provenance` entry: stage, parameters, inputs (sha256 of small files,
size and mtime of big ones), package version, time. It is a single file rather than a folder, so
its provenance lives inside it instead of in a provenance.json beside it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Iterable, Mapping

from gpt2ipu import __version__
from gpt2ipu.fsutil import write_text_atomic
from gpt2ipu.provenance import describe_input


def write_results(out: str | os.PathLike, result: Mapping[str, Any], *, stage: str, params: Mapping[str, Any],
                  inputs: Iterable[str | os.PathLike]) -> None:
    record = dict(result)
    record["provenance"] = {
        "stage": stage,
        "params": dict(params),
        "inputs": [describe_input(p) for p in inputs],
        "gpt2ipu_version": __version__,
        "python": platform.python_version(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(out, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
