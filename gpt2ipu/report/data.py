"""The data section: articles, tokens and bytes per stage and per dump part.

Read from what the data stages already record: each part's `provenance.json` figures (dump,
extract, tokenize) and the shards' `stats.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2ipu.data.shards import STATS_NAME
from gpt2ipu.errors import UserError
from gpt2ipu.provenance import read_figures

HEADERS = ["stage", "part", "pages / articles", "tokens", "samples", "bytes"]


def part_rows(data_dir: Path) -> list[list[Any]]:
    """One row per dump part at each per-part stage (dump, extract, tokenize), in stage order."""
    rows = []
    for stage, folder in (("dump", "dump"), ("extract", "extract"), ("tokenize", "tokens")):
        for part in sorted(p for p in (data_dir / folder).glob("*") if p.is_dir()):
            figures = part_figures(part)
            if stage == "dump":
                row = [figures.get("pages"), None, None, figures.get("bz2_bytes", figures.get("bytes"))]
            elif stage == "extract":
                row = [figures.get("articles"), None, None, figures.get("output_bytes")]
            else:
                tokens_bin = part / "tokens.bin"
                row = [figures.get("articles", figures.get("documents")), figures.get("tokens"), None,
                       tokens_bin.stat().st_size if tokens_bin.is_file() else None]
            rows.append([stage, part.name, *row])
    return rows


def part_figures(folder: Path) -> dict:
    try:
        return read_figures(folder) or {}
    except ValueError as err:
        raise UserError(f"{folder}/provenance.json: not a provenance record ({err}); rerun that stage") from None


def shard_rows(stats: dict) -> list[list[Any]]:
    """One row per split of the shards stage, then the two on-disk formats' sizes."""
    rows = [["shards", split, stats.get(f"{split}_documents"), stats.get(f"{split}_tokens"),
             stats.get(f"{split}_samples"), None] for split in ("train", "valid") if f"{split}_documents" in stats]
    sizes = stats.get("bytes") or {}
    rows += [["shards", f"all ({fmt})", None, None, None, sizes.get(fmt)] for fmt in ("tfrecord", "mmap")]
    return rows


def read_stats(shards_dir: Path) -> dict:
    path = shards_dir / STATS_NAME
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable stats file ({err}); rerun the shards stage "
                        "(snakemake --cores 2 data)") from None
    if not isinstance(stats, dict):
        raise UserError(f"{path}: expected a JSON object; rerun the shards stage (snakemake --cores 2 data)")
    return stats


def data_table(data_dir: str | Path) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of one dataset's data folder (results/data/<dataset>)."""
    data_dir = Path(data_dir)
    return HEADERS, part_rows(data_dir) + shard_rows(read_stats(data_dir / "shards"))
