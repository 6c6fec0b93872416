"""The `gpt2ipu` command: one subcommand per pipeline stage, the same code the Snakemake rules run.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`.
Modules are imported only when their subcommand is chosen, so `gpt2ipu dump ...` does not pay
for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpt2ipu import __version__
from gpt2ipu.errors import UserError
from gpt2ipu.log import LEVEL_VARIABLE, LEVELS, setup_logging

COMMANDS = {
    "dump": ("gpt2ipu.data.dump", "make one MediaWiki dump part: the embedded sample, or an enwiki download"),
    "extract": ("gpt2ipu.data.extract", "dump part -> JSON-lines articles (wikiextractor)"),
    "train-bpe": ("gpt2ipu.data.bpe", "train a fresh byte-level BPE on extracted articles"),
    "tokenize": ("gpt2ipu.data.tokenize", "articles -> GPT-2 token ids with document boundaries"),
    "shards": ("gpt2ipu.data.shards", "token parts -> train/valid TFRecord shards and Megatron mmap files"),
    "train": ("gpt2ipu.train.cli", "pretrain GPT-2 (one process, or many under torchrun)"),
    "evaluate": ("gpt2ipu.evaluate.cli", "WikiText perplexity, LAMBADA accuracy; downloads or generates the eval sets"),
    "generate": ("gpt2ipu.generate.cli", "text generation: interactive prompt loop, or a prompts file -> JSON lines"),
    "ops": ("gpt2ipu.ops.cli", "compile the C++ custom ops (fused LM loss, sample index) into a build folder"),
    "profile": ("gpt2ipu.profile.cli", "profile a few training steps with torch.profiler: trace, TensorBoard files, "
                                       "top operators"),
    "bench": ("gpt2ipu.bench.cli", "benchmark a stage against its baselines; prints one JSON object"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2ipu", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gpt2ipu {__version__}")
    parser.epilog = (f"--log-level {{{','.join(LEVELS)}}} before the command sets which messages show (default "
                     f"info; also ${LEVEL_VARIABLE}).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def program_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--log-level's value, argv without it) for a --log-level given before the command: it is the
    program's setting, so no command's own arguments (a training config, say) ever see it."""
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            break
        if arg == "--log-level" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--log-level="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    level, argv = program_log_level(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        setup_logging(level)
    except UserError as err:
        print(f"gpt2ipu: error: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as err:  # StorageError (disk full, permission) included
        print(f"gpt2ipu {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full / permission outside an atomic writer: same message; else a bug
        from gpt2ipu.fsutil import storage_error_of

        message = storage_error_of(err)
        if message is None:
            raise
        print(f"gpt2ipu {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
