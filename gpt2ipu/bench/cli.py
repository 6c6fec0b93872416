"""`gpt2ipu bench <stage> --json`: dispatch to `gpt2ipu.bench.<stage>`.

Each benchmark module provides `add_arguments(parser)` and `run(args) -> dict` (the dict built by
`gpt2ipu.bench.common.report`). This prints it, with the `machine` it ran on, as one JSON object on
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json

from gpt2ipu.bench.common import STAGES, machine


class StageParser(argparse.ArgumentParser):
    """The parser of one benchmark, which adds that benchmark's own arguments when it is the one
    parsing (so only the chosen benchmark's module, and the torch most of them import, is loaded,
    whatever argument list `gpt2ipu.cli.main` was given)."""

    module_name: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        if self.module_name is not None:
            module_name, self.module_name = self.module_name, None
            importlib.import_module(module_name).add_arguments(self)
        return super().parse_known_args(args, namespace)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True, parser_class=StageParser)
    for name, module_name in STAGES.items():
        sub = stages.add_parser(name)
        sub.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
        sub.module_name = module_name


def run(args: argparse.Namespace) -> int:
    result = importlib.import_module(STAGES[args.stage]).run(args)
    result.setdefault("machine", machine())   # a throughput means little without where it ran
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0
