"""`gpt2ipu train`: the command around `gpt2ipu.train.loop.train`.

Process-level choices belong here, not in the library's `train()`: this command owns its process,
while `train()` may be called from one that has its own (tests, notebooks, benchmarks). So do the
launch options: `--nproc-per-node N` (with `--nnodes`, `--rdzv-endpoint`, `--max-restarts`,
`--rdzv-timeout`) makes the command start torchrun over itself, as the Snakemake rule does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gpt2ipu.allocator import keep_freed_memory, return_freed_memory
from gpt2ipu.errors import UserError
from gpt2ipu.train.config import add_arguments as add_train_arguments
from gpt2ipu.train.config import config_from_args

__all__ = ["add_arguments", "run"]

LAUNCH = {   # dest: (flag, type, default, help)
    "nproc_per_node": ("--nproc-per-node", int, None,
                       "start torchrun with this many processes per machine, each running this command (as "
                       "`torchrun --nproc_per_node N -m gpt2ipu train ...` would, with c10d rendezvous)"),
    "nnodes": ("--nnodes", int, 1, "machines, each running this same command (with --nproc-per-node)"),
    "rdzv_endpoint": ("--rdzv-endpoint", str, "localhost:29500",
                      "host:port of the first machine's rendezvous (with --nproc-per-node)"),
    "max_restarts": ("--max-restarts", int, 0,
                     "with --nproc-per-node: restart every process up to this many times when one dies; "
                     "they resume from the last checkpoint"),
    "rdzv_timeout": ("--rdzv-timeout", float, 600.0,
                     "with --nproc-per-node: seconds to wait for the rendezvous endpoint and the other machines"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    group = parser.add_argument_group("launch (this command starts torchrun over itself)")
    for dest, (flag, kind, default, help_text) in LAUNCH.items():
        # Absent unless given, so that the namespace holds training keys only (config_from_args).
        group.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS,
                           help=f"{help_text} (default {default})")


def run(args: argparse.Namespace) -> int:
    """Train with the flags' config; print the last step's metrics as one JSON line on stdout (rank 0 only)."""
    launch = {dest: vars(args).pop(dest, default) for dest, (_, _, default, _) in LAUNCH.items()}
    if launch["nproc_per_node"] is not None:
        return run_torchrun(args, **launch)
    if any(launch[dest] != LAUNCH[dest][2] for dest in ("nnodes", "max_restarts")):
        raise UserError("--nnodes and --max-restarts start torchrun and need --nproc-per-node (processes per "
                        "machine); under your own torchrun, give them to torchrun instead")
    from gpt2ipu.train.loop import train  # torch is imported only once a run starts, not for --help

    cfg = config_from_args(args)
    # Each step reuses the last step's pages (gpt2ipu/allocator.py); not under FSDP, whose
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


def run_torchrun(args: argparse.Namespace, *, nproc_per_node: int, **launch) -> int:
    """This command's own flags, less the launch options, under torchrun (gpt2ipu.train.launch)."""
    from pathlib import Path

    from gpt2ipu.train.elastic import CLI_FLAGS, Torchrun

    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise UserError("--nproc-per-node starts torchrun, but this process already runs under torchrun: "
                        "drop --nproc-per-node (and the other launch options)")
    if nproc_per_node < 1 or launch["nnodes"] < 1 or launch["max_restarts"] < 0:
        raise UserError("--nproc-per-node and --nnodes must be 1 or more, --max-restarts 0 or more")
    cfg = config_from_args(args)
    launcher = Torchrun(nproc_per_node=nproc_per_node, log_dir=Path(cfg.state_dir) / "torchrun",
                        flag_names=CLI_FLAGS, **launch)
    sys.stdout.write(launcher.run(train_arguments(sys.argv[1:]), dict(os.environ)))
    return 0


def train_arguments(argv: list[str]) -> list[str]:
    """`argv` from `train` on, without the launch options (each `--flag value` or `--flag=value`)."""
    argv = argv[argv.index("train") + 1:]
    flags = {flag for flag, *_ in LAUNCH.values()}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            kept.append(arg)
    return kept
