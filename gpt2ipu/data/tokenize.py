"""The `tokenize` stage: articles.jsonl -> `tokens.bin` + `tokens.idx` (Megatron format).

One document per article, each followed by exactly one `<|endoftext|>` id, in input order. The
file is streamed in batches of about `BATCH_BYTES`, so memory stays flat on a 20 GB dump part;
each batch is encoded by `workers` threads (tiktoken releases the GIL) while the main thread
parses the next batch. Batches are cut by input bytes, never by `workers`, and each document's
ids depend on its text only, so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from gpt2ipu.data.formats.megatron import MMapWriter
from gpt2ipu.data.tokenizer import Tokenizer, gpt2_vocab_files, load_tokenizer
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, parse_json_record
from gpt2ipu.provenance import read_figures, write_provenance

BATCH_BYTES = 16 << 20
TOKENS_PREFIX = "tokens"


def document_text(article: dict[str, Any], include_title: bool) -> str:
    """The text a document is made of: `title + "\\n\\n" + text`, or the text alone.

    Wikipedia articles start with their title, so by default it heads the document (separated
    like a paragraph); an article with no title, or `include_title=False`, gives the text alone.
    """
    title = article.get("title") or ""
    if include_title and title:
        return f"{title}\n\n{article['text']}"
    return article["text"]


def parse_article(line: bytes, path: Path, line_number: int) -> dict[str, Any]:
    return parse_json_record(line, path, line_number, "text", "an article", hint="re-run the extract stage")


def read_document_batches(path: str | os.PathLike, include_title: bool = True,
                          batch_bytes: int = BATCH_BYTES) -> Iterator[tuple[list[str], int]]:
    """Yield (document texts, bytes of the file they came from) batch by batch; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: articles file not found; run the extract stage first")
    texts: list[str] = []
    pending_bytes = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            pending_bytes += len(line)
            if line.strip():
                texts.append(document_text(parse_article(line, path, line_number), include_title))
            if pending_bytes >= batch_bytes:
                yield texts, pending_bytes
                texts, pending_bytes = [], 0
    if texts or pending_bytes:
        yield texts, pending_bytes


def dump_bytes_of(articles_path: Path) -> int | None:
    """The dump bytes the extract stage read, from its provenance.json beside the articles."""
    try:
        value = (read_figures(articles_path.parent) or {}).get("input_bytes")
    except ValueError:  # an odd provenance file only costs the bytes figure
        return None
    return value if isinstance(value, int) else None


def tokenize_file(tokenizer: Tokenizer, articles_path: Path, writer: MMapWriter, workers: int,
                  include_title: bool) -> tuple[int, int]:
    """Encode every article into `writer`; returns (articles, tokens)."""
    articles = tokens = 0

    def write(result: tuple) -> None:
        nonlocal articles, tokens
        ids, sizes = result
        start = 0
        for size in sizes.tolist():
            writer.add_document(ids[start : start + size])
            start += size
        articles += len(sizes)
        tokens += len(ids)

    progress = tqdm(total=articles_path.stat().st_size, unit="B", unit_scale=True, desc="tokenize", mininterval=1.0)
    # One background thread runs the batch encoder (which fans out to `workers` threads) so the
    # main thread can parse the next batch meanwhile; at most two batches are held at a time.
    with progress, ThreadPoolExecutor(1) as encoder:
        pending: tuple[Future, int] | None = None
        for texts, read_bytes in read_document_batches(articles_path, include_title, BATCH_BYTES):
            future = encoder.submit(tokenizer.encode_documents, texts, workers)
            if pending is not None:
                write(pending[0].result())
                progress.update(pending[1])
            pending = future, read_bytes
        if pending is not None:
            write(pending[0].result())
            progress.update(pending[1])
    return articles, tokens


def tokenize(articles_path: str | os.PathLike, out_dir: str | os.PathLike, *, workers: int,
                 vocab_dir: str | os.PathLike | None = None, bpe_tokenizer: str | os.PathLike | None = None,
                 include_title: bool = True) -> dict[str, Any]:
    """Tokenize `articles_path` into `<out_dir>/tokens.bin/.idx` + provenance.json; returns the figures."""
    articles_path, out_dir = Path(articles_path), Path(out_dir)
    if workers < 1:
        raise UserError(f"--workers {workers}: needs at least 1 worker")
    if not articles_path.is_file():
        raise UserError(f"{articles_path}: articles file not found; run the extract stage first")
    tokenizer = load_tokenizer(vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer)
    vocab_inputs = [Path(bpe_tokenizer)] if bpe_tokenizer is not None else list(gpt2_vocab_files(vocab_dir))
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with MMapWriter(tmp / TOKENS_PREFIX, tokenizer.dtype) as writer:
            articles, tokens = tokenize_file(tokenizer, articles_path, writer, workers, include_title)
        if articles == 0:
            raise UserError(f"{articles_path}: holds no articles; check the extract stage's output")
        seconds = time.perf_counter() - started
        figures: dict[str, Any] = {
            "articles": articles,
            "tokens": tokens,
            "input_bytes": articles_path.stat().st_size,
            "output_bytes": sum((tmp / f"{TOKENS_PREFIX}{ext}").stat().st_size for ext in (".bin", ".idx")),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        }
        dump_bytes = dump_bytes_of(articles_path)
        if dump_bytes is not None:
            figures["dump_bytes"] = dump_bytes
        params = {
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": tokenizer.dtype.name,
            "include_title": include_title,
            "workers": workers,
        }
        write_provenance(tmp, "tokenize", params, [articles_path, *vocab_inputs], figures)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--articles", required=True, help="articles.jsonl from the extract stage")
    parser.add_argument("--out-dir", required=True, help="folder for tokens.bin, tokens.idx, provenance.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding threads")
    parser.add_argument("--vocab-dir", default=None,
                        help="folder with GPT-2's encoder.json + vocab.bpe (or vocab.json + merges.txt)")
    parser.add_argument("--bpe-tokenizer", default=None, help="tokenizer.json from `gpt2ipu train-bpe` instead of GPT-2's")
    parser.add_argument("--no-title", dest="include_title", action="store_false",
                        help="documents are the article text only, without the title line")


def run(args: argparse.Namespace) -> int:
    figures = tokenize(args.articles, args.out_dir, workers=args.workers, vocab_dir=args.vocab_dir,
                           bpe_tokenizer=args.bpe_tokenizer, include_title=args.include_title)
    print(json.dumps(figures, sort_keys=True))
    return 0
