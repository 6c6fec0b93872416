"""The `train-bpe` stage (the original's `--use-bpe`): a fresh byte-level BPE trained on the articles.

Built with the `tokenizers` library the way GPT-2's is: ByteLevel pre-tokenizer (GPT-2's regex,
no prefix space) and decoder, all 256 byte symbols in the initial alphabet so any text encodes
without unknowns, and `<|endoftext|>` as the one special token (id 0). Documents are read exactly
as the tokenize stage reads them (title, blank line, text). Training counts words, then picks
merges by count with ties broken by the pair itself, so the same input gives the same file.
The result, `<out_dir>/tokenizer.json`, is what `gpt2ipu tokenize --bpe-tokenizer` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2ipu.data.corpus import TextFields
from gpt2ipu.data.tokenize import document_reader
from gpt2ipu.data.tokenizer import EOT
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.provenance import write_provenance

TOKENIZER_NAME = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + 1  # every byte, plus <|endoftext|>
TRAIN_BATCH_BYTES = 4 << 20


def new_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_bpe(articles_paths: Sequence[str | os.PathLike | Sequence[dict]], out_dir: str | os.PathLike, *,
              vocab_size: int, min_frequency: int = 2, include_title: bool = True,
              fields: TextFields | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train a byte-level BPE of `vocab_size` ids on the documents; writes `<out_dir>/tokenizer.json`.

    Each item of `articles_paths` is an articles.jsonl, or the pieces of a text corpus's part (read
    with `fields`, as the tokenize stage reads them)."""
    from tokenizers import pre_tokenizers, trainers

    if not articles_paths:
        raise UserError("train-bpe: give at least one --articles file")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT})")
    if min_frequency < 0:
        raise UserError(f"--min-frequency {min_frequency}: must be 0 or more")
    readers = [document_reader(source, include_title, fields) for source in articles_paths]
    paths = list(dict.fromkeys(Path(piece.path) for reader in readers for piece in reader.pieces))
    counts = {"articles": 0}

    def batches() -> Iterator[list[str]]:
        total = sum(reader.total_bytes() for reader in readers)
        with tqdm(total=total, unit="B", unit_scale=True, desc="train-bpe: read", mininterval=1.0) as progress:
            for reader in readers:
                for texts in reader.batches(TRAIN_BATCH_BYTES, on_bytes=progress.update):
                    counts["articles"] += len(texts)
                    yield texts

    started = time.perf_counter()
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Its own bars write to the terminal directly, bypassing a rule's log; ours is tqdm above.
        show_progress=False,
    )
    tokenizer.train_from_iterator(batches(), trainer=trainer)
    if counts["articles"] == 0:
        raise UserError(f"{', '.join(map(str, paths))}: no articles to train on; check the extract stage's output")
    figures = {
        "articles": counts["articles"],
        "input_bytes": sum(reader.counts.input_bytes for reader in readers),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "seconds": round(time.perf_counter() - started, 3),
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / TOKENIZER_NAME).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        params = {"vocab_size": vocab_size, "min_frequency": min_frequency, "include_title": include_title}
        write_provenance(tmp, "train-bpe", params, paths, figures)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--articles", nargs="+", required=True, help="articles.jsonl file(s) from the extract stage")
    parser.add_argument("--out-dir", required=True, help="folder for tokenizer.json and provenance.json")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="ids in the vocabulary, bytes and <|endoftext|> included")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a pair to be merged")
    parser.add_argument("--no-title", dest="include_title", action="store_false",
                        help="train on the article text only, without the title line")


def run(args: argparse.Namespace) -> int:
    figures = train_bpe(args.articles, args.out_dir, vocab_size=args.vocab_size,
                            min_frequency=args.min_frequency, include_title=args.include_title)
    print(json.dumps(figures, sort_keys=True))
    return 0
