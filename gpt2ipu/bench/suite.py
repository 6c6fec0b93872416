"""The benchmark suite of the workflow (`snakemake benchmarks`): one named benchmark -> one JSON file.

The config's `benchmarks.suite` lists the runs by name (what the original's `benchmarks.yml` did):
which `gpt2ipu bench` benchmark and its arguments. Each result is the benchmark's own JSON object
plus the `machine` it ran on, since a throughput means little without it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any

from gpt2ipu.bench.common import STAGES, machine
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import write_text_atomic


def parse_bench_args(name: str, bench: str, args: list[str]) -> argparse.Namespace:
    """`args` parsed by benchmark `bench`'s own parser; a bad argument names the suite entry."""
    if bench not in STAGES:
        raise UserError(f"config key 'benchmarks.suite.{name}.bench': {bench!r} is not one of {sorted(STAGES)}")
    parser = argparse.ArgumentParser(prog=f"gpt2ipu bench {bench}", add_help=False)
    importlib.import_module(STAGES[bench]).add_arguments(parser)
    try:
        parsed = parser.parse_args([str(a) for a in args])
    except SystemExit:  # argparse has printed what is wrong (to the log); say where to fix it
        raise UserError(f"config key 'benchmarks.suite.{name}.args': {args} are not arguments of "
                        f"`gpt2ipu bench {bench}` (see `gpt2ipu bench {bench} --help`)") from None
    parsed.json = True
    return parsed


def bench(*, name: str, bench: str, args: list[str], out: str | os.PathLike) -> dict[str, Any]:
    """Run suite entry `name` (benchmark `bench` with `args`) and write its result to `out`."""
    parsed = parse_bench_args(name, bench, args)
    result = importlib.import_module(STAGES[bench]).run(parsed)
    result.update(name=name, bench=bench, args=[str(a) for a in args], machine=machine())
    write_text_atomic(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
