"""`gpt2ipu bench <stage> --json`: dispatch to `gpt2ipu.bench.<stage>`.

Each benchmark module provides `add_arguments(parser)` and `run(args) -> dict` (the dict built by
`gpt2ipu.bench.common.report`). This prints it, with the `machine` it ran on, as one JSON object on
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

STAGES = {
    "tokenize": "gpt2ipu.bench.tokenize",
    "tokenize_text": "gpt2ipu.bench.tokenize_text",
    "shards": "gpt2ipu.bench.shards",
    "extract": "gpt2ipu.bench.extract",
    "train": "gpt2ipu.bench.train",
    "evaluate": "gpt2ipu.bench.evaluate",
    "generate": "gpt2ipu.bench.generate",
    "loss": "gpt2ipu.bench.loss",
    "sample_index": "gpt2ipu.bench.sample_index",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    chosen = next((a for a in sys.argv[2:] if a in STAGES), None)
    for name, module_name in STAGES.items():
        sub = stages.add_parser(name)
        sub.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    from gpt2ipu.bench.suite import machine

    result = importlib.import_module(STAGES[args.stage]).run(args)
    result.setdefault("machine", machine())   # a throughput means little without where it ran
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0
