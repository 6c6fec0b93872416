"""Shards stage: tokenized parts -> train/valid TFRecord shards and Megatron mmap files.

Input: tokenize outputs, each a folder with `tokens.bin`/`tokens.idx` (Megatron format, one
document per article, each ending with EOS) and `provenance.json`. Output: one folder, written
atomically as a whole:

    train-00000-of-00004.tfrecord, train-00000-of-00004.index, ...   packed training samples
    valid-00000-of-00001.tfrecord, valid-00000-of-00001.index
    train_text_document.bin/.idx, valid_text_document.bin/.idx       each split's whole documents
    stats.json                                                        counts and bytes (deterministic)
    provenance.json

Split: by document, so no article is seen in both splits. All documents of all parts, in the
order the parts are given, are permuted by a numpy Generator seeded with `seed`; the first
round(valid_fraction * documents) go to valid (at least one when valid_fraction > 0 and there
are two documents or more, and never all of them). Inside each split documents keep their
original order. With valid_fraction 0 there is no valid split and no valid files.

Samples: a split's documents end to end (each already ends with EOS, which separates them),
cut into consecutive non-overlapping windows of max_len + 1 tokens (inputs [:-1], labels [1:]);
the trailing partial window is dropped and counted in stats.json. Shards hold at most
samples_per_shard samples, balanced so that their sizes differ by at most one: a last shard of a
single record would break the tfrecord package's indexed readers (np.loadtxt reads a one-line
index as 1-D).

Memory: inputs are memory-mapped and read in slices of `STREAM_TOKENS`; only one shard of
samples is held at a time.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2ipu.data.formats.megatron import MMapIndexedDataset, write_index
from gpt2ipu.data.formats.tfrecord import write_tfrecord_shard
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.log import package_logger
from gpt2ipu.provenance import PROVENANCE_NAME, read_figures, write_provenance

log = package_logger(__name__)

SPLITS = ("train", "valid")
STREAM_TOKENS = 1 << 24
STATS_NAME = "stats.json"


@dataclass
class TokenPart:
    """One tokenize output: its documents as a memory-mapped Megatron dataset, and its figures."""

    folder: Path
    dataset: MMapIndexedDataset
    figures: dict
    taken: int | None = None  # documents used under a max_tokens cap; None = all

    @property
    def documents(self) -> int:
        return len(self.dataset) if self.taken is None else self.taken

    def sizes(self) -> np.ndarray:
        return self.dataset.sizes[: self.documents]

    def document_starts(self) -> np.ndarray:
        """Token offset of each document in tokens.bin, and the end offset last."""
        return np.concatenate([[0], np.cumsum(self.sizes(), dtype=np.int64)])


def cap_tokens(parts: list[TokenPart], max_tokens: int) -> None:
    """Take whole documents, parts in order, while the total stays within `max_tokens`."""
    remaining = max_tokens
    for part in parts:
        ends = np.cumsum(part.dataset.sizes, dtype=np.int64)
        part.taken = int(np.searchsorted(ends, remaining, side="right"))
        remaining -= int(ends[part.taken - 1]) if part.taken else 0
        if part.taken < len(part.dataset):
            remaining = 0  # documents stay in order: nothing after the first one left out


def open_token_part(folder: str | Path) -> TokenPart:
    folder = Path(folder)
    prefix = folder / "tokens"
    advice = "run (or rerun) the tokenize stage for this part"
    if not folder.is_dir():
        raise UserError(f"{folder}: tokens folder does not exist; {advice}")
    for name in ("tokens.bin", "tokens.idx"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing from the tokens folder; {advice}")
    try:
        dataset = MMapIndexedDataset(prefix)
    except UserError as err:
        raise UserError(f"{err} ({advice})") from None
    except (ValueError, struct.error, OSError) as err:
        raise UserError(f"{prefix}.idx: corrupt Megatron index ({err}); {advice}") from None
    documents = len(dataset)
    starts = np.concatenate([[0], np.cumsum(dataset.sizes[:-1], dtype=np.int64)]) if documents else np.zeros(0)
    if not np.array_equal(dataset.pointers, starts * dataset.dtype.itemsize) or not np.array_equal(
        dataset.document_index, np.arange(documents + 1)
    ):
        raise UserError(f"{prefix}.idx: documents are not stored one per sequence, end to end; {advice}")
    if dataset.dtype.kind not in "iu":
        raise UserError(f"{prefix}.idx: token dtype {dataset.dtype} is not an integer type; {advice}")
    figures = read_part_figures(folder)
    for key, actual in (("articles", documents), ("tokens", int(dataset.tokens.size))):
        if key in figures and figures[key] != actual:
            raise UserError(f"{folder}: provenance.json says {figures[key]} {key} but tokens.idx holds {actual}; "
                            f"{advice}")
    return TokenPart(folder, dataset, figures)


def read_part_figures(folder: Path) -> dict:
    """The part's provenance figures, or {} for a Megatron dataset made elsewhere."""
    try:
        return read_figures(folder) or {}
    except ValueError as err:
        raise UserError(f"{folder / PROVENANCE_NAME}: not a provenance JSON object ({err}); "
                        "rerun the tokenize stage for this part") from None


def choose_valid_documents(documents: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over all documents: True for the validation split."""
    n_valid = round(documents * valid_fraction)
    if valid_fraction > 0 and documents >= 2:
        n_valid = min(max(n_valid, 1), documents - 1)
    is_valid = np.zeros(documents, dtype=bool)
    is_valid[np.random.default_rng(seed).permutation(documents)[:n_valid]] = True
    return is_valid


def same_split_runs(is_valid: np.ndarray):
    """(first, end, split) for each run of consecutive documents that go to the same split."""
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(is_valid.view(np.int8))) + 1, [len(is_valid)]])
    for first, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if end > first:
            yield first, end, SPLITS[int(is_valid[first])]


def balanced_shard_sizes(samples: int, samples_per_shard: int) -> list[int]:
    shards = -(-samples // samples_per_shard)
    return [samples // shards + (i < samples % shards) for i in range(shards)]


class SplitWriter:
    """Takes one split's token stream; writes its Megatron .bin and, shard by shard, its TFRecords."""

    def __init__(self, folder: Path, split: str, sizes: np.ndarray, sample_len: int,
                 samples_per_shard: int, dtype: np.dtype):
        self.folder, self.split, self.sizes, self.dtype = folder, split, sizes, dtype
        self.tokens = int(sizes.sum(dtype=np.int64))
        self.sample_len = sample_len
        self.shard_sizes = balanced_shard_sizes(self.tokens // sample_len, samples_per_shard)
        self.buffer = np.empty(max(self.shard_sizes, default=0) * sample_len, dtype=dtype)
        self.filled = 0
        self.dropped = 0
        self.shard_files: list[str] = []
        self.mmap_prefix = folder / f"{split}_text_document"
        self.bin = open(self.mmap_prefix.with_name(self.mmap_prefix.name + ".bin"), "wb", buffering=16 << 20)

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.bin.write(memoryview(tokens).cast("B"))
        while len(tokens) and len(self.shard_files) < len(self.shard_sizes):
            capacity = self.shard_sizes[len(self.shard_files)] * self.sample_len
            take = min(capacity - self.filled, len(tokens))
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == capacity:
                self._write_shard(capacity)
        self.dropped += len(tokens)

    def _write_shard(self, capacity: int) -> None:
        name = f"{self.split}-{len(self.shard_files):05d}-of-{len(self.shard_sizes):05d}.tfrecord"
        write_tfrecord_shard(self.folder / name, self.buffer[:capacity].reshape(-1, self.sample_len))
        self.shard_files.append(name)
        self.filled = 0

    def finish(self) -> dict:
        self.bin.close()
        write_index(self.mmap_prefix.with_name(self.mmap_prefix.name + ".idx"), self.sizes, self.dtype)
        samples = sum(self.shard_sizes)
        assert len(self.shard_files) == len(self.shard_sizes) and self.filled == 0
        assert samples * self.sample_len + self.dropped == self.tokens
        return split_figures(self.split, len(self.sizes), self.tokens, samples, self.sample_len, self.dropped)

    def close(self) -> None:
        self.bin.close()


def split_figures(split: str, documents: int, tokens: int, samples: int, sample_len: int, dropped: int) -> dict:
    return {
        f"{split}_documents": documents,
        f"{split}_tokens": tokens,
        f"{split}_samples": samples,
        f"{split}_tfrecord_tokens": samples * sample_len,
        f"{split}_dropped_tokens": dropped,
    }


def empty_split_figures(split: str) -> dict:
    return split_figures(split, 0, 0, 0, 0, 0)


def shards(token_dirs: list, out_dir, *, max_len: int, valid_fraction: float, seed: int,
           samples_per_shard: int, max_tokens: int | None = None) -> dict:
    """Build the shards folder `out_dir` from tokenize outputs `token_dirs`; return stats.json's content.

    max_tokens: use only the first documents (parts in the order given) whose tokens, EOS included,
    add up to at most this many (dataset hf/text's `max_tokens`); None uses every document."""
    started = time.perf_counter()
    check_parameters(token_dirs, max_len, valid_fraction, samples_per_shard)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1 (or null for no cap), got {max_tokens}")
    parts = [open_token_part(folder) for folder in token_dirs]
    if max_tokens is not None:
        cap_tokens(parts, max_tokens)
    all_sizes = np.concatenate([part.sizes() for part in parts]).astype(np.int64)
    if len(all_sizes) == 0:
        raise UserError(f"the tokens folders {', '.join(map(str, token_dirs))} hold no documents; check the extract "
                        "stage's output")
    is_valid = choose_valid_documents(len(all_sizes), valid_fraction, seed)
    splits = [s for s in SPLITS if s == "train" or valid_fraction > 0]
    sample_len = max_len + 1
    split_sizes = {split: all_sizes[is_valid == (split == "valid")] for split in splits}
    check_samples(split_sizes, sample_len)
    dtype = np.result_type(*(part.dataset.dtype for part in parts))

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        writers = {split: SplitWriter(tmp, split, sizes, sample_len, samples_per_shard, dtype)
                   for split, sizes in split_sizes.items()}
        try:
            stream_documents(parts, is_valid, writers, total_tokens=int(all_sizes.sum()))
            figures = {k: v for writer in writers.values() for k, v in writer.finish().items()}
        finally:
            for writer in writers.values():
                writer.close()
        stats = {
            "articles": len(all_sizes),
            "tokens": int(all_sizes.sum()),
            # documents the tokenize stage skipped as empty (blank text), over all parts
            "empty_documents": sum(int(part.figures.get("empty_documents", 0)) for part in parts),
            "max_tokens": max_tokens,
            "articles_over_max_tokens": sum(len(part.dataset) - part.documents for part in parts),
            "max_len": max_len,
            "sample_len": sample_len,
            "samples_per_shard": samples_per_shard,
            "valid_fraction": valid_fraction,
            "seed": seed,
            "dtype": dtype.name,
            **empty_split_figures("valid"),
            **figures,
            "shards": {split: len(writer.shard_files) for split, writer in writers.items()},
            "shard_files": {split: writer.shard_files for split, writer in writers.items()},
            "bytes": stage_bytes(parts, tmp),
        }
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_provenance(
            tmp, "shards",
            params={"max_len": max_len, "valid_fraction": valid_fraction, "seed": seed,
                    "samples_per_shard": samples_per_shard, "max_tokens": max_tokens},
            inputs=[part.folder for part in parts],
            figures={**{k: v for k, v in stats.items() if k != "shard_files"},
                     "seconds": round(time.perf_counter() - started, 3)},
        )
    return stats


def check_parameters(token_dirs, max_len, valid_fraction, samples_per_shard) -> None:
    if not token_dirs:
        raise UserError("no tokens folders given; pass at least one tokenize output with --tokens")
    if max_len < 1:
        raise UserError(f"max_len must be at least 1, got {max_len}")
    if not 0 <= valid_fraction < 1:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be at least 1, got {samples_per_shard}")


def check_samples(split_sizes: dict, sample_len: int) -> None:
    documents = sum(len(sizes) for sizes in split_sizes.values())
    if "valid" in split_sizes and documents < 2:
        raise UserError(
            f"the tokens hold {documents} document(s): too few to split into train and valid (the split is by "
            "document); add articles (more dump parts, a lower extract.min_chars) or set shards.valid_fraction 0 "
            "(no validation)"
        )
    for split, sizes in split_sizes.items():
        tokens = int(sizes.sum())
        if tokens < sample_len:
            remedy = ("raise valid_fraction (more documents go to valid), lower max_len, or add articles"
                      if split == "valid" else "lower max_len or valid_fraction, or add articles")
            raise UserError(
                f"the {split} split gets {len(sizes)} documents of {tokens} tokens in all, less than one sample "
                f"of max_len + 1 = {sample_len} tokens; {remedy}"
            )


def stream_documents(parts: list[TokenPart], is_valid: np.ndarray, writers: dict, total_tokens: int) -> None:
    """Feed every document, in order, to its split's writer, in slices of at most STREAM_TOKENS."""
    first_document = 0
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="shards", file=sys.stderr) as progress:
        for part in parts:
            starts = part.document_starts()
            part_is_valid = is_valid[first_document : first_document + part.documents]
            for first, end, split in same_split_runs(part_is_valid):
                run_end = int(starts[end])
                for start in range(int(starts[first]), run_end, STREAM_TOKENS):
                    stop = min(start + STREAM_TOKENS, run_end)
                    writers[split].add(part.dataset.tokens[start:stop])
                    progress.update(stop - start)
            first_document += part.documents


def stage_bytes(parts: list[TokenPart], folder: Path) -> dict:
    """Bytes of the data at each stage; dump/extract are None unless every part's provenance says."""

    def summed(key):
        values = [part.figures.get(key) for part in parts]
        return sum(values) if all(isinstance(v, int) for v in values) else None

    def folder_bytes(patterns):
        return sum(path.stat().st_size for pattern in patterns for path in folder.glob(pattern))

    return {
        "dump": summed("dump_bytes"),
        "extract": summed("input_bytes"),
        "tokens": sum((part.folder / "tokens.bin").stat().st_size for part in parts),
        "tfrecord": folder_bytes(["*.tfrecord", "*.index"]),
        "mmap": folder_bytes(["*_text_document.bin", "*_text_document.idx"]),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", nargs="+", required=True, metavar="DIR",
                        help="tokenize output folders (tokens.bin/.idx), in order")
    parser.add_argument("--out-dir", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--max-len", type=int, default=1024, help="model context; samples hold max_len + 1 tokens")
    parser.add_argument("--valid-fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation (0 for none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="most samples in one TFRecord shard")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use only the first documents, in part order, up to this many tokens in all")


def run(args: argparse.Namespace) -> int:
    stats = shards(args.tokens, args.out_dir, max_len=args.max_len, valid_fraction=args.valid_fraction,
                   seed=args.seed, samples_per_shard=args.samples_per_shard, max_tokens=args.max_tokens)
    log.info(f"gpt2ipu shards: {stats['train_samples']} train / {stats['valid_samples']} valid samples "
             f"in {args.out_dir}")
    return 0
