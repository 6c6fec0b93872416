"""Messages: one logger per package (`gpt2ipu.data`, `gpt2ipu.train`, ...), all to stderr.

A module takes its package's logger with `log = package_logger(__name__)`. The first one sets up
the `gpt2ipu` logger (unless the program already did): messages go to whatever `sys.stderr` is
when they are written, so under a Snakemake job they land in the rule's `log:` (which
`workflow_adapter.run_stage` puts in place of stderr), with the text alone, or prefixed by
`[rank N]` in a multi-process run (torchrun's RANK and WORLD_SIZE). The level is `info` unless
`gpt2ipu --log-level` or the GPT2IPU_LOG_LEVEL environment variable says otherwise (debug, info,
warning, error). Progress bars (tqdm) are not messages: they stay on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
LEVEL_VARIABLE = "GPT2IPU_LOG_LEVEL"
ROOT = "gpt2ipu"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to the `sys.stderr` of the moment, not the one it was made with."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging sets it once in __init__; the property decides
        pass


class _RankFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return f"[rank {os.environ.get('RANK', '?')}] {text}"
        return text


def level_from(name: str | None) -> int:
    name = (name or os.environ.get(LEVEL_VARIABLE) or "info").lower()
    if name not in LEVELS:
        from gpt2ipu.errors import UserError

        raise UserError(f"log level {name!r} ({LEVEL_VARIABLE} or --log-level): use one of {', '.join(LEVELS)}")
    return getattr(logging, name.upper())


def setup_logging(level: str | None = None) -> logging.Logger:
    """The `gpt2ipu` logger with its stderr handler (added once) at `level` (see the module doc)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(_RankFormatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level_from(level))
    return root


def package_logger(module_name: str) -> logging.Logger:
    """The logger of the package `module_name` is in (`gpt2ipu.data.shards` -> `gpt2ipu.data`)."""
    if not logging.getLogger(ROOT).handlers:
        valid = (os.environ.get(LEVEL_VARIABLE) or "info").lower() in LEVELS
        setup_logging(None if valid else "info")  # a bad variable is reported by the command's own setup
    return logging.getLogger(".".join(module_name.split(".")[:2]))
