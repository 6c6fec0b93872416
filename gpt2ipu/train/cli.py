"""`gpt2ipu train`: the command around `gpt2ipu.train.loop.train`.

Process-level choices belong here, not in the library's `train()`: this command owns its process,
while `train()` may be called from one that has its own (tests, notebooks, benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os

from gpt2ipu.train.allocator import keep_freed_memory, return_freed_memory
from gpt2ipu.train.config import add_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """Train with the flags' config; print the last step's metrics as one JSON line on stdout (rank 0 only)."""
    from gpt2ipu.train.loop import train  # torch is imported only once a run starts, not for --help

    cfg = config_from_args(args)
    # Each step reuses the last step's pages (gpt2ipu/train/allocator.py); not under FSDP, whose
    # gather-and-free of every block's weights fragments a heap that never returns memory (its peak
    # RSS was 2.2x higher with it: docs/parallel.md): there large buffers go back when freed.
    if cfg.fsdp:
        return_freed_memory()
    else:
        keep_freed_memory()
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, sort_keys=True))
    return 0
