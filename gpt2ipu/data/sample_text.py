"""A generated text corpus in the formats dataset `text` reads: Parquet, JSON lines (plain, gzip,
zstd) or plain text, deterministic from a seed.

For tests, benchmarks and trying `dataset: text` offline. Documents are web-page-like prose made
from the embedded sample's topic vocabularies (gpt2ipu.data.sample_vocab): a title, then one to
several paragraphs of sentences, some with non-ASCII names. A pool of sentences is generated
first and documents draw from it with numpy, so a million documents take seconds, not minutes.

    gpt2ipu dump sample-text --out corpus/part-000.parquet --documents 100000 --seed 1
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt2ipu.data.corpus import FORMATS as CORPUS_FORMATS
from gpt2ipu.data.corpus import corpus_format
from gpt2ipu.data.sample_vocab import ADVERBS, CONNECTORS, FIRST_NAMES, GENERIC_NOUNS, PREPS, TOPICS
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file

SENTENCE_POOL = 4096
ROWS_PER_GROUP = 8192  # Parquet row-group size: several per file, so big files can be split into parts


def sentence_pool(seed: int, size: int = SENTENCE_POOL) -> list[str]:
    rng = random.Random(f"gpt2ipu-sample-text:{seed}")
    sentences = []
    for _ in range(size):
        topic = rng.choice(TOPICS)
        subject = f"The {rng.choice(topic.adjectives)} {rng.choice(topic.nouns)}"
        verb, obj = rng.choice(topic.verbs), f"the {rng.choice(topic.nouns)}"
        where = f"{rng.choice(PREPS)} the {rng.choice(GENERIC_NOUNS)}"
        shape = rng.randrange(4)
        if shape == 0:
            sentence = f"{subject} {verb} {obj} {where}."
        elif shape == 1:
            sentence = f"{rng.choice(CONNECTORS)} {rng.choice(FIRST_NAMES)} {verb} {obj} {rng.choice(ADVERBS)}."
        elif shape == 2:
            sentence = f"In {rng.randint(1500, 2024)}, {subject.lower()} {verb} {obj} {where}."
        else:
            sentence = f"{subject} was {rng.choice(ADVERBS)} {verb} by {rng.choice(FIRST_NAMES)} {where}."
        sentences.append(sentence)
    return sentences


def sample_documents(documents: int, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Records {"id", "title", "text"} number `start` to `start + documents - 1` of the corpus `seed`
    (document i is the same whatever range it is read in: each block of ROWS_PER_GROUP documents
    draws from its own seeded generator)."""
    pool = np.array(sentence_pool(seed), dtype=object)
    stop = start + documents
    for block in range(start // ROWS_PER_GROUP, -(-stop // ROWS_PER_GROUP)):
        rng = np.random.default_rng([seed, block])
        lengths = rng.integers(3, 40, size=ROWS_PER_GROUP)
        picks = rng.integers(0, len(pool), size=int(lengths.sum()))
        breaks = rng.random(size=int(lengths.sum())) < 0.2
        ends = np.cumsum(lengths)
        first = block * ROWS_PER_GROUP
        for i in range(max(start, first) - first, min(stop, first + ROWS_PER_GROUP) - first):
            at, length = int(ends[i] - lengths[i]), int(lengths[i])
            sentences = pool[picks[at : at + length]]
            text = "".join(s + ("\n\n" if b else " ") for s, b in zip(sentences, breaks[at : at + length]))
            title = " ".join(w for w in sentences[0].rstrip(".").split(" ")[1:3]).title()
            yield {"id": f"doc-{first + i}", "title": title, "text": text.strip()}


def write_sample_corpus(out: str | Path, *, documents: int, seed: int = 1, fmt: str | None = None) -> dict[str, Any]:
    """Write `documents` generated records to `out` (format from its suffix, or `fmt`), atomically."""
    out = Path(out)
    fmt = fmt or corpus_format(out)
    if fmt not in CORPUS_FORMATS.values():
        raise UserError(f"{out}: give a file ending in one of {', '.join(CORPUS_FORMATS)}")
    if documents < 1:
        raise UserError(f"--documents {documents}: must be at least 1")
    records = sample_documents(documents, seed)
    with atomic_file(out) as tmp:
        if fmt == "parquet":
            write_parquet(tmp, records)
        else:
            write_lines(tmp, records, fmt)
    return {"path": str(out), "documents": documents, "bytes": out.stat().st_size, "format": fmt}


def write_parquet(path: Path, records: Iterator[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        while batch := [r for _, r in zip(range(ROWS_PER_GROUP), records)]:
            table = pa.Table.from_pylist(batch)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROWS_PER_GROUP)
    finally:
        if writer is not None:
            writer.close()


def write_lines(path: Path, records: Iterator[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl.zst":
        import zstandard

        out = zstandard.open(path, "wt", encoding="utf-8")
    elif fmt == "jsonl.gz":
        out = gzip.open(path, "wt", encoding="utf-8")
    else:
        out = open(path, "w", encoding="utf-8")
    with out:
        for record in records:
            if fmt == "txt":  # one document per line
                out.write(record["text"].replace("\n", " ") + "\n")
            else:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
