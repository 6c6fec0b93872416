"""`gpt2ipu train`: the command around `gpt2ipu.train.loop.train`."""

from __future__ import annotations

import argparse
import json

from gpt2ipu.train.config import add_arguments, config_from_args
from gpt2ipu.train.loop import train

__all__ = ["add_arguments", "run"]

def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    print(json.dumps(result, sort_keys=True))
    return 0
