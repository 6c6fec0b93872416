"""`gpt2ipu bench sample_index`: Megatron's sample index, the compiled op vs numpy and the plain loop.

ours: `gpt2ipu.train_data.build_sample_idx` with the compiled op loaded (custom_ops/sample_index.cpp,
one pass over the document stream), Python wrapper included.
numpy_vectorized: `build_sample_idx_numpy` (gather of the sizes, cumsum, searchsorted): the reference
and the fallback, already fast.
python_loop: `build_sample_idx_loop`, Megatron's helpers.cpp loop run in Python (slow: timed once).

Data: `--docs` documents of random sizes (uniform, mean tokens / docs) totalling about `--tokens`
tokens, `--epochs` shuffled passes (`build_doc_idx`), samples of `--seq-length` + 1 tokens. All three
must give the same array. Throughput: million stream tokens (epochs x tokens) indexed per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from gpt2ipu.bench.common import median_seconds, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=float, default=1e8, help="tokens per epoch")
    parser.add_argument("--docs", type=float, default=1e6, help="documents")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of ours and numpy (median)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the plain loop (seconds, not ms)")
    parser.add_argument("--ops-dir", default=None,
                        help="build folder of the ops (default $GPT2IPU_OPS_DIR, else build into a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    from gpt2ipu import ops
    from gpt2ipu.train_data import build_doc_idx, build_sample_idx, build_sample_idx_loop, build_sample_idx_numpy

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
        print(f"bench sample_index: {tokens_per_epoch:.3g} tokens in {docs} documents x {args.epochs} epochs, "
              f"seq_length {args.seq_length}, {args.repeats} repeats", file=sys.stderr)
        ours_idx = build_sample_idx(*inputs)
        seconds = {"ours": median_seconds(lambda: build_sample_idx(*inputs), args.repeats),
                   "numpy_vectorized": median_seconds(lambda: build_sample_idx_numpy(*inputs), args.repeats)}
    same = {"numpy_vectorized": _same(ours_idx, build_sample_idx_numpy(*inputs))}
    if not args.skip_loop:
        print("bench sample_index: the plain loop (one run, some seconds)", file=sys.stderr)
        start = time.perf_counter()
        loop_idx = build_sample_idx_loop(*inputs)
        seconds["python_loop"] = time.perf_counter() - start
        same["python_loop"] = _same(ours_idx, loop_idx)
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
        note=("ours = the compiled op through train_data.build_sample_idx; numpy_vectorized = the numpy "
              "reference (the fallback); python_loop = Megatron's loop in Python, one run; medians otherwise"),
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)
