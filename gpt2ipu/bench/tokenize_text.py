"""`gpt2ipu bench tokenize_text`: the tokenize stage on a Parquet text corpus (dataset text / hf).

ours: the whole stage, `gpt2ipu.data.tokenize.tokenize` on a Parquet file: read it row group by
row group, encode with `threads` threads, write tokens.bin/.idx; MB/s of document text (UTF-8
bytes). Baseline, on the same texts: `tiktoken.Encoding.encode_ordinary_batch(texts,
num_threads=threads)` with the texts already in memory (no reading, no EOS, no output), so the
ratio is what the whole stage costs against encoding alone. Both give the same ids (checked).

Memory (`--rss-documents`, e.g. 100000,1000000): each size is its own generated Parquet part,
tokenized by `gpt2ipu tokenize --documents` in a child process that reports its own peak RSS
(VmHWM); the report gives each and the ratio of the largest part's to the smallest's, which stays
near 1 when memory is bounded by a batch and a row group rather than by the part.

The corpus is gpt2ipu.data.sample_text's generated web-like prose (`--parquet` takes your own).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt2ipu.bench.common import interleaved_median_seconds, report
from gpt2ipu.data.corpus import DocumentReader, Piece, TextFields
from gpt2ipu.data.formats.megatron import MMapIndexedDataset
from gpt2ipu.data.sample_text import write_sample_corpus
from gpt2ipu.data.tokenize import tokenize
from gpt2ipu.data.tokenizer import load_tokenizer
from gpt2ipu.log import package_logger

log = package_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parquet", type=Path, default=None,
                        help="a Parquet file with a `text` column (default: a generated corpus of --documents)")
    parser.add_argument("--documents", type=int, default=50_000, help="documents of the generated corpus")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="threads for the stage and for tiktoken")
    parser.add_argument("--rss-documents", default="",
                        help="comma-separated part sizes (documents) whose tokenize jobs' peak RSS is measured, "
                             "e.g. 100000,1000000 (default: none)")


# Runs `gpt2ipu <args>` and then writes the process's own peak RSS (VmHWM of /proc/self/status: the
# memory of this program image only; wait4's ru_maxrss would also count the parent's pages at fork).
PEAK_RSS_RUNNER = """
import sys
from gpt2ipu.cli import main
out, args = sys.argv[1], sys.argv[2:]
try:
    code = main(args)
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(out, "w").write(hwm.split()[1])
sys.exit(code)
"""


def child_peak_rss_mb(gpt2ipu_args: list[str], work: Path) -> float:
    """Peak resident memory of `gpt2ipu <gpt2ipu_args>` run as its own process."""
    report_file = work / "peak-rss-kib"
    subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, str(report_file), *gpt2ipu_args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(report_file.read_text()) / 1024


def measure_rss(sizes: list[int], work: Path, threads: int) -> dict:
    peaks = {}
    for documents in sizes:
        part = work / f"rss-{documents}.parquet"
        write_sample_corpus(part, documents=documents, seed=documents)
        command = ["tokenize", "--documents", str(part), "--out-dir", str(work / f"rss-{documents}-tokens"),
                   "--workers", str(threads)]
        peaks[documents] = round(child_peak_rss_mb(command, work), 1)
        log.info(f"bench tokenize_text: {documents} documents ({part.stat().st_size / 1e6:.0f} MB Parquet): "
                 f"peak RSS {peaks[documents]} MB")
        part.unlink()
    smallest, largest = min(peaks), max(peaks)
    return {"peak_rss_mb_by_documents": peaks,
            "rss_ratio_largest_to_smallest": round(peaks[largest] / peaks[smallest], 3)}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-text-") as tmp:
        work = Path(tmp)
        parquet = args.parquet
        if parquet is None:
            parquet = work / "corpus.parquet"
            write_sample_corpus(parquet, documents=args.documents, seed=1)
        parquet_bytes = parquet.stat().st_size
        reader = DocumentReader([Piece(str(parquet), "parquet")], TextFields())
        texts = [t for batch in reader.batches() for t in batch]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tokenizer, threads = load_tokenizer(), args.threads
        log.info(f"bench tokenize_text: {len(texts)} documents, {mb:.1f} MB of text, {threads} threads, "
                 f"{args.repeats} repeats")

        out = work / "tokens"
        stage = lambda: tokenize([Piece(str(parquet), "parquet")], out, workers=threads)  # noqa: E731
        stage()
        ids = MMapIndexedDataset(out / "tokens")
        expected = tokenizer.encoding.encode_ordinary_batch(texts[:200], num_threads=threads)
        if [ids[i][:-1].tolist() for i in range(200)] != expected:
            raise AssertionError("the stage and tiktoken disagree on the ids")
        tokens = int(ids.tokens.size)
        del ids
        seconds = interleaved_median_seconds({
            "ours": stage,
            "tiktoken_batch": lambda: tokenizer.encoding.encode_ordinary_batch(texts, num_threads=threads),
        }, args.repeats)
        memory = measure_rss([int(n) for n in args.rss_documents.split(",") if n.strip()], work, threads) \
            if args.rss_documents else {}
    return report(
        mb / seconds["ours"], "MB/s", {"tiktoken_batch": mb / seconds["tiktoken_batch"]},
        threads=threads, repeats=args.repeats, documents=len(texts), mb=round(mb, 3), tokens=tokens,
        tokens_per_second=round(tokens / seconds["ours"]),
        ours_measures="the whole tokenize stage on a Parquet file: read, encode, write tokens.bin/.idx",
        parquet_bytes=parquet_bytes,
        **memory,
    )
