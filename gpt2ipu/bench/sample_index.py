"""`gpt2ipu bench sample_index`: Megatron's sample index, the compiled op vs the numpy versions.

ours: `gpt2ipu.train.sample_index.build_sample_idx` with the compiled op loaded (custom_ops/sample_index.cpp,
one pass over the document stream), Python wrapper included.
megatron_numpy_reference: `build_sample_idx_loop`, Megatron's own numpy reference
(`_build_sample_idx` in gpt_dataset.py, the code its C++ helper replaced), line for line: the
baseline the issue's ">= 10x" names. Median of `--reference-repeats` runs (about 0.6 s each).
numpy_vectorized: `build_sample_idx_numpy` (gather of the sizes, cumsum, searchsorted), our own
fallback when the op is not built: a stronger baseline, reported beside it.

Data: `--docs` documents of random sizes (uniform, mean tokens / docs) totalling about `--tokens`
tokens, `--epochs` shuffled passes (`build_doc_idx`), samples of `--seq-length` + 1 tokens. All three
must give the same array. Throughput: million stream tokens (epochs x tokens) indexed per second.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from gpt2ipu.bench.common import median_seconds, report
from gpt2ipu.log import package_logger

log = package_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=float, default=1e8, help="tokens per epoch")
    parser.add_argument("--docs", type=float, default=1e6, help="documents")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the documents")
    parser.add_argument("--seq-length", type=int, default=1024,
                        help="tokens per sample (plus the one shared with the next)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of ours and numpy_vectorized (median)")
    parser.add_argument("--reference-repeats", type=int, default=3,
                        help="timed runs of Megatron's numpy reference (median; seconds each, not ms)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out Megatron's numpy reference")
    parser.add_argument("--ops-dir", default=None,
                        help="build folder of the ops (default $GPT2IPU_OPS_DIR, else build into a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document sizes and order")


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu import ops
    from gpt2ipu.train.data import build_doc_idx
    from gpt2ipu.train.sample_index import build_sample_idx, build_sample_idx_loop, build_sample_idx_numpy

    docs = int(args.docs)
    rng = np.random.default_rng(args.seed)
    mean = args.tokens / docs
    sizes = rng.integers(1, max(2, round(2 * mean)), docs).astype(np.int32)
    tokens_per_epoch = int(sizes.astype(np.int64).sum())
    doc_idx = build_doc_idx(docs, args.epochs, args.seed)
    inputs = (sizes, doc_idx, args.seq_length, args.epochs, tokens_per_epoch)
    with tempfile.TemporaryDirectory(prefix="gpt2ipu-bench-ops-") as scratch:
        os.environ[ops.OPS_DIR_ENV] = ops.ready_ops_dir(args.ops_dir, scratch)
        if ops.load_ops() is None:
            raise AssertionError(f"bench sample_index: the compiled ops do not load: {ops.ops_reason()}")
        log.info(f"bench sample_index: {tokens_per_epoch:.3g} tokens in {docs} documents x {args.epochs} epochs, "
                 f"seq_length {args.seq_length}, {args.repeats} repeats")
        ours_idx = build_sample_idx(*inputs)
        seconds = {"ours": median_seconds(lambda: build_sample_idx(*inputs), args.repeats),
                   "numpy_vectorized": median_seconds(lambda: build_sample_idx_numpy(*inputs), args.repeats)}
    same = {"numpy_vectorized": _same(ours_idx, build_sample_idx_numpy(*inputs))}
    if not args.skip_reference:
        log.info(f"bench sample_index: Megatron's numpy reference ({args.reference_repeats} runs, about a second "
                 f"each)")
        same["megatron_numpy_reference"] = _same(ours_idx, build_sample_idx_loop(*inputs))
        seconds["megatron_numpy_reference"] = median_seconds(lambda: build_sample_idx_loop(*inputs),
                                                             args.reference_repeats, warmup=0)
    if not all(same.values()):
        raise AssertionError(f"bench sample_index: results differ: {same}")
    mtokens = args.epochs * tokens_per_epoch / 1e6
    return report(
        mtokens / seconds["ours"], "Mtokens/s",
        {name: mtokens / value for name, value in seconds.items() if name != "ours"},
        seconds=seconds,
        identical=same,
        samples=len(ours_idx) - 1,
        dtype=str(ours_idx.dtype),
        tokens_per_epoch=tokens_per_epoch,
        docs=docs,
        epochs=args.epochs,
        seq_length=args.seq_length,
        repeats=args.repeats,
        reference_repeats=args.reference_repeats,
        note=("ours = the compiled op through train_data.build_sample_idx; megatron_numpy_reference = "
              "Megatron's _build_sample_idx (numpy, the code its C++ helper replaced); numpy_vectorized = "
              "our vectorized fallback (gather, cumsum, searchsorted); medians"),
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)
