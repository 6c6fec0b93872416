"""What every `workflow/scripts/*.py` uses: run one library stage under a Snakemake job.

The stage's output (progress bars included) goes to the rule's `log:`; a `UserError` becomes one
clear message in the log and on the terminal and a non-zero exit, without a traceback.
`bpe_tokenizer` reads the optional trained-BPE input (workflow/rules/common.smk, `bpe_input`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

from gpt2ipu.errors import UserError


def bpe_tokenizer(snakemake: Any) -> str | None:
    """The trained BPE's tokenizer.json when the rule has the `bpe` input (tokenize.tokenizer: bpe)."""
    return f"{snakemake.input.bpe}/tokenizer.json" if "bpe" in snakemake.input.keys() else None


def run_stage(snakemake: Any, stage: Callable[..., Any], **kwargs: Any) -> Any:
    log_path = snakemake.log[0] if len(snakemake.log) else None
    terminal = sys.stderr
    with contextlib.ExitStack() as stack:
        if log_path:
            log = stack.enter_context(open(log_path, "w", encoding="utf-8", buffering=1))
            stack.enter_context(contextlib.redirect_stderr(log))
            stack.enter_context(contextlib.redirect_stdout(log))
        try:
            return stage(**kwargs)
        except UserError as err:
            message = f"gpt2ipu rule {snakemake.rule}: error: {err}"
            print(message, file=sys.stderr)
            if log_path:
                print(message, file=terminal)
            sys.exit(1)
