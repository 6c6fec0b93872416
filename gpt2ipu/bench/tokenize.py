"""`gpt2ipu bench tokenize`: MB/s of article text (UTF-8 bytes) turned into GPT-2 ids, 2 threads.

ours: `Tokenizer.encode_documents`, the function the tokenize stage runs on each batch, measured
in memory (no JSON parsing, no disk output); it returns the ids as one uint16 array with the EOS
ids in place. Baselines, on the same document texts:

- hf_per_article: the original system's approach, `GPT2TokenizerFast.encode` article by article;
- tiktoken_batch: `tiktoken.Encoding.encode_ordinary_batch(texts, num_threads=threads)`.

All three must give identical ids. `stage_end_to_end` is extra information: the whole
`tokenize` (read + parse the jsonl, encode, write tokens.bin/.idx + provenance), per MB of text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt2ipu.bench.common import interleaved_median_seconds, report
from gpt2ipu.data.tokenize import read_document_batches, tokenize
from gpt2ipu.data.tokenizer import hf_gpt2_tokenizer_fast, load_tokenizer
from gpt2ipu.log import package_logger

log = package_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DUMP = REPO.parent / "shared" / "data" / "enwiki-sample-206-pages.xml.bz2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--articles", type=Path, default=None,
                        help=f"articles.jsonl to tokenize (default: extract {DEFAULT_DUMP.name} on the fly)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="threads for ours and tiktoken_batch")


def extract_sample(work_dir: Path) -> Path:
    """The default real text: the shared Wikipedia fragment, extracted into `work_dir`."""
    if not DEFAULT_DUMP.is_file():
        sys.exit(f"bench tokenize: {DEFAULT_DUMP} is absent; pass --articles JSONL")
    from gpt2ipu.data.extract import ARTICLES_NAME, extract

    extract(DEFAULT_DUMP, work_dir / "extract", processes=2)
    return work_dir / "extract" / ARTICLES_NAME


def flatten_with_eos(ids_per_doc: list[list[int]], eos_id: int) -> np.ndarray:
    return np.fromiter((i for ids in ids_per_doc for i in (*ids, eos_id)), dtype=np.int64)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        articles = args.articles or extract_sample(Path(tmp))
        texts = [t for batch, _ in read_document_batches(articles) for t in batch]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tokenizer = load_tokenizer()
        hf = hf_gpt2_tokenizer_fast()
        threads, repeats = args.threads, args.repeats
        log.info(f"bench tokenize: {len(texts)} articles, {mb:.2f} MB of text, {threads} threads, "
                 f"{repeats} repeats")

        tokens, sizes = tokenizer.encode_documents(texts, threads)
        expected = flatten_with_eos(tokenizer.encoding.encode_ordinary_batch(texts, num_threads=threads),
                                    tokenizer.eos_id)
        if not np.array_equal(tokens.astype(np.int64), expected) or len(sizes) != len(texts):
            raise AssertionError("ours and tiktoken_batch disagree on the ids")
        if not np.array_equal(flatten_with_eos([hf.encode(t) for t in texts], tokenizer.eos_id), expected):
            raise AssertionError("hf_per_article and tiktoken_batch disagree on the ids")

        seconds = interleaved_median_seconds({
            "ours": lambda: tokenizer.encode_documents(texts, threads),
            "hf_per_article": lambda: [hf.encode(t) for t in texts],
            "tiktoken_batch": lambda: tokenizer.encoding.encode_ordinary_batch(texts, num_threads=threads),
            "stage_end_to_end": lambda: tokenize(articles, Path(tmp) / "tokens", workers=threads),
        }, repeats)
    return report(
        mb / seconds["ours"],
        "MB/s",
        {name: mb / seconds[name] for name in ("hf_per_article", "tiktoken_batch")},
        threads=threads,
        repeats=repeats,
        mb=round(mb, 3),
        articles=len(texts),
        tokens=int(len(tokens)),
        ours_measures="Tokenizer.encode_documents in memory: ids as uint16 with EOS, no disk output",
        stage_end_to_end=mb / seconds["stage_end_to_end"],
        ids_identical=True,
    )
