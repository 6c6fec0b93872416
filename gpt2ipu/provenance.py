"""Provenance: every output folder carries `provenance.json`, saying what made it.

Fields: stage, parameters, inputs (sha256 for files up to `HASH_LIMIT_BYTES`, else size and
mtime, since hashing a 20 GB dump on every run would cost more than the stage), the package
version, the time it was written, and the stage's own figures (items, bytes, seconds...).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpt2ipu import __version__
from gpt2ipu.fsutil import sha256_file, write_text_atomic

HASH_LIMIT_BYTES = 256 << 20
PROVENANCE_NAME = "provenance.json"


def describe_input(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": str(p), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    stat = p.stat()
    entry: dict[str, Any] = {"path": str(p), "bytes": stat.st_size}
    if stat.st_size <= HASH_LIMIT_BYTES:
        entry["sha256"] = sha256_file(p)
    else:
        entry["mtime"] = stat.st_mtime
    return entry


def provenance_record(
    stage: str,
    params: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike],
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record (see the module doc): what `write_provenance` writes for a folder and
    what `gpt2ipu.evaluate.results` embeds in a results file (there without `figures`)."""
    record: dict[str, Any] = {
        "stage": stage,
        "params": dict(params),
        "inputs": [describe_input(p) for p in inputs],
    }
    if figures is not None:
        record["figures"] = dict(figures)
    record["gpt2ipu_version"] = __version__
    record["python"] = platform.python_version()
    record["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def write_provenance(
    folder: str | os.PathLike,
    stage: str,
    params: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike],
    figures: Mapping[str, Any],
    name: str = PROVENANCE_NAME,
) -> Path:
    """Write `<folder>/<name>` atomically and return its path."""
    record = provenance_record(stage, params, inputs, figures)
    out = Path(folder) / name
    write_text_atomic(out, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_figures(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `figures` of `<folder>/provenance.json`; None when there is none.

    Raises ValueError when the file is not a provenance JSON object; callers decide how much that matters.
    """
    path = Path(folder) / PROVENANCE_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    figures = record.get("figures", {}) if isinstance(record, dict) else None
    if not isinstance(figures, dict):
        raise ValueError("no figures object")
    return figures
