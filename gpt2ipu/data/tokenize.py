"""The `tokenize` stage: articles.jsonl -> `tokens.bin` + `tokens.idx` (Megatron format).

One document per article, each followed by exactly one `<|endoftext|>` id, in input order. The
file is streamed in batches of about `BATCH_BYTES`, so memory stays flat on a 20 GB dump part;
each batch is encoded by `workers` threads (tiktoken releases the GIL) while the main thread
parses the next batch. Batches are cut by input bytes, never by `workers`, and each document's
ids depend on its text only, so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2ipu.data.corpus import ARTICLE_FIELDS, BATCH_BYTES, TXT_UNITS, DocumentReader, Piece, TextFields, corpus_format
from gpt2ipu.data.formats.megatron import MMapWriter
from gpt2ipu.data.tokenizer import Tokenizer, gpt2_vocab_files, load_tokenizer
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.provenance import read_figures, write_provenance

TOKENS_PREFIX = "tokens"
ARTICLES_HINT = "re-run the extract stage"


def document_reader(documents: str | os.PathLike | Sequence[Piece | dict], include_title: bool = True,
                    fields: TextFields | Mapping[str, Any] | None = None) -> DocumentReader:
    """A reader of the documents to tokenize: an `articles.jsonl` of the extract stage (a path), or
    the pieces of a text corpus's part (`gpt2ipu.data.corpus`, dataset text and hf)."""
    if isinstance(documents, (str, os.PathLike)):
        path = Path(documents)
        if not path.is_file():
            raise UserError(f"{path}: articles file not found; run the extract stage first")
        return DocumentReader([Piece(str(path), "jsonl")], ARTICLE_FIELDS, include_title, hint=ARTICLES_HINT)
    pieces = [p if isinstance(p, Piece) else Piece.from_dict(p) for p in documents]
    if not pieces:
        raise UserError("no documents given: a part needs at least one file")
    if isinstance(fields, Mapping):
        fields = TextFields(**fields)
    return DocumentReader(pieces, fields or TextFields(), include_title)


def read_document_batches(path: str | os.PathLike, include_title: bool = True,
                          batch_bytes: int = BATCH_BYTES) -> Iterator[list[str]]:
    """The document texts of an articles.jsonl, batch by batch; blank lines skipped."""
    return document_reader(path, include_title).batches(batch_bytes)


def dump_bytes_of(articles_path: Path) -> int | None:
    """The dump bytes the extract stage read, from its provenance.json beside the articles."""
    try:
        value = (read_figures(articles_path.parent) or {}).get("input_bytes")
    except ValueError:  # an odd provenance file only costs the bytes figure
        return None
    return value if isinstance(value, int) else None


def tokenize_documents(tokenizer: Tokenizer, reader: DocumentReader, writer: MMapWriter,
                       workers: int) -> tuple[int, int]:
    """Encode every document of `reader` into `writer`; returns (documents, tokens)."""
    documents = tokens = 0

    def write(result: tuple) -> None:
        nonlocal documents, tokens
        ids, sizes = result
        start = 0
        for size in sizes.tolist():
            writer.add_document(ids[start : start + size])
            start += size
        documents += len(sizes)
        tokens += len(ids)

    progress = tqdm(total=reader.total_bytes(), unit="B", unit_scale=True, desc="tokenize", mininterval=1.0)
    # One background thread runs the batch encoder (which fans out to `workers` threads) so the
    # main thread can read the next batch meanwhile; at most two batches are held at a time.
    with progress, ThreadPoolExecutor(1) as encoder:
        pending: Future | None = None
        for texts in reader.batches(BATCH_BYTES, on_bytes=progress.update):
            future = encoder.submit(tokenizer.encode_documents, texts, workers)
            if pending is not None:
                write(pending.result())
            pending = future
        if pending is not None:
            write(pending.result())
    return documents, tokens


def tokenize(documents: str | os.PathLike | Sequence[Piece | dict], out_dir: str | os.PathLike, *, workers: int,
             vocab_dir: str | os.PathLike | None = None, bpe_tokenizer: str | os.PathLike | None = None,
             include_title: bool = True, fields: TextFields | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `documents` (an articles.jsonl, or a corpus part's pieces read with `fields`) into
    `<out_dir>/tokens.bin/.idx` + provenance.json; returns the figures."""
    out_dir = Path(out_dir)
    if workers < 1:
        raise UserError(f"--workers {workers}: needs at least 1 worker")
    articles_file = isinstance(documents, (str, os.PathLike))   # the extract stage's output
    reader = document_reader(documents, include_title, fields)
    input_paths = list(dict.fromkeys(Path(piece.path) for piece in reader.pieces))
    tokenizer = load_tokenizer(vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer)
    vocab_inputs = [Path(bpe_tokenizer)] if bpe_tokenizer is not None else list(gpt2_vocab_files(vocab_dir))
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with MMapWriter(tmp / TOKENS_PREFIX, tokenizer.dtype) as writer:
            articles, tokens = tokenize_documents(tokenizer, reader, writer, workers)
        if articles == 0:
            where = ", ".join(map(str, input_paths))
            if articles_file:
                raise UserError(f"{where}: holds no articles; check the extract stage's output")
            raise UserError(f"{where}: holds no documents ({reader.counts.empty_documents} empty ones skipped); "
                            "check the files and the text field (config key text.text_field)")
        seconds = time.perf_counter() - started
        figures: dict[str, Any] = {
            "articles": articles,
            "empty_documents": reader.counts.empty_documents,
            "tokens": tokens,
            "input_bytes": reader.counts.input_bytes,
            "output_bytes": sum((tmp / f"{TOKENS_PREFIX}{ext}").stat().st_size for ext in (".bin", ".idx")),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        }
        if articles_file:
            dump_bytes = dump_bytes_of(input_paths[0])
            if dump_bytes is not None:
                figures["dump_bytes"] = dump_bytes
        params = {
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": tokenizer.dtype.name,
            "include_title": include_title,
            "workers": workers,
            "pieces": [piece.as_dict() for piece in reader.pieces],
            "fields": dataclasses.asdict(reader.fields),
        }
        write_provenance(tmp, "tokenize", params, [*input_paths, *vocab_inputs], figures)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--articles", help="articles.jsonl from the extract stage")
    source.add_argument("--documents", nargs="+", metavar="FILE",
                        help="corpus files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt), each read whole")
    source.add_argument("--part", nargs=2, metavar=("MANIFEST", "PART"),
                        help="one part of a `gpt2ipu dump manifest --dataset text` manifest")
    parser.add_argument("--out-dir", required=True, help="folder for tokens.bin, tokens.idx, provenance.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding threads")
    parser.add_argument("--vocab-dir", default=None,
                        help="folder with GPT-2's encoder.json + vocab.bpe (or vocab.json + merges.txt)")
    parser.add_argument("--bpe-tokenizer", default=None,
                        help="tokenizer.json from `gpt2ipu train-bpe` instead of GPT-2's")
    parser.add_argument("--no-title", dest="include_title", action="store_false",
                        help="documents are the article text only, without the title line")
    parser.add_argument("--text-field", default="text", help="corpus files: the field or column of the text")
    parser.add_argument("--title-field", default=None,
                        help="corpus files: a title field (document = title, blank line, text)")
    parser.add_argument("--id-field", default=None, help="corpus files: an id field, named in error messages")
    parser.add_argument("--txt-unit", choices=TXT_UNITS, default="file",
                        help=".txt files: each file one document (file) or each non-empty line one (line)")


def run(args: argparse.Namespace) -> int:
    fields = TextFields(text=args.text_field, title=args.title_field, id=args.id_field, txt_unit=args.txt_unit)
    if args.articles:
        documents: Any = args.articles
    elif args.documents:
        documents = []
        for raw in args.documents:
            fmt = corpus_format(raw)
            if fmt is None:
                raise UserError(f"{raw}: unknown format; corpus files end in .jsonl, .jsonl.gz, .jsonl.zst, "
                                ".parquet or .txt")
            documents.append(Piece(str(Path(raw).resolve()), fmt))
    else:
        manifest_path, name = args.part
        parts = json.loads(Path(manifest_path).read_text(encoding="utf-8"))["parts"]
        entry = next((p for p in parts if p["name"] == name), None)
        if entry is None:
            raise UserError(f"{manifest_path}: has no part {name!r} (parts: {', '.join(p['name'] for p in parts)})")
        documents = entry.get("pieces")
        if documents is None:
            raise UserError(f"{args.part[0]}: part {args.part[1]} is not a text corpus part; tokenize its "
                            "extract stage's articles.jsonl with --articles")
    figures = tokenize(documents, args.out_dir, workers=args.workers, vocab_dir=args.vocab_dir,
                       bpe_tokenizer=args.bpe_tokenizer, include_title=args.include_title, fields=fields)
    print(json.dumps(figures, sort_keys=True))
    return 0
