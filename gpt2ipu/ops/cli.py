"""`gpt2ipu ops build --out DIR` | `gpt2ipu ops check [DIR]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpt2ipu.errors import UserError
from gpt2ipu.ops.build import OPS_DIR_ENV, build_ops, find_source_dir, source_files
from gpt2ipu.ops.load import load_ops, ops_reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="ops_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="compile custom_ops/ into DIR (status.json says whether it worked)")
    build.add_argument("--out", required=True, help="build folder (e.g. results/ops/<key>)")
    build.add_argument("--source", default=None, help="folder of the C++ sources (default: the package's custom_ops/)")
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds a good build of the same key")
    build.add_argument("--strict", action="store_true", help="exit non-zero when the build fails")
    check = actions.add_parser("check", help=f"say whether a build folder (default ${OPS_DIR_ENV}) loads")
    check.add_argument("dir", nargs="?", default=None, help=f"build folder to load (default ${OPS_DIR_ENV})")


def run(args: argparse.Namespace) -> int:
    if args.ops_action == "build":
        source = Path(args.source) if args.source else find_source_dir()
        if args.source and not (source.is_dir() and source_files(source)):
            raise UserError(f"--source {args.source}: no C++ sources there; give the custom_ops folder")
        status = build_ops(source, args.out, force=args.force)
        print(json.dumps(status, sort_keys=True))
        return 1 if args.strict and not status["built"] else 0
    namespace = load_ops(args.dir, quiet=True)
    print(json.dumps({"loaded": namespace is not None, "reason": ops_reason(args.dir)}))
    return 0 if namespace is not None else 1
