"""`gpt2ipu profile`: the training flags of `gpt2ipu train`, plus where and how much to profile.

    gpt2ipu profile --model gpt2 --dataset tfrecord --shards-dir results/data/sample/shards --out-dir prof/
"""

from __future__ import annotations

import argparse
import json

from gpt2ipu.allocator import keep_freed_memory
from gpt2ipu.train.config import add_arguments as add_train_arguments
from gpt2ipu.train.config import config_from_args

PROFILE_FLAGS = ("out_dir", "wait_steps", "active_steps", "top")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", required=True,
                        help="folder to write trace.json.gz, tensorboard/, top_ops.md/.html and profile.json to "
                             "(replaced atomically)")
    parser.add_argument("--wait-steps", type=int, default=0,
                        help="unprofiled steps before the profiler's warm-up step, which is traced and discarded "
                             "(and absorbs the first step's allocations) (default 0)")
    parser.add_argument("--active-steps", type=int, default=2, help="profiled steps, after one profiler warm-up step "
                                                                    "(default 2)")
    parser.add_argument("--top", type=int, default=15, help="operators per table (default 15)")
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Profile the flags' training config; print profile.json's figures (less the tables) on stdout."""
    from gpt2ipu.profile.steps import print_summary, profile_steps

    options = {key: getattr(args, key) for key in PROFILE_FLAGS}
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in PROFILE_FLAGS})
    cfg = config_from_args(train_args)
    keep_freed_memory()   # as `gpt2ipu train` does: profile the process training runs in
    figures = profile_steps(cfg=cfg, **options)
    print_summary(figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "tables"}, sort_keys=True))
    return 0
