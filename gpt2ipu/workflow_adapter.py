"""What every `workflow/scripts/*.py` uses: run one library stage under a Snakemake job.

The stage's output (progress bars included) goes to the rule's `log:`; a `UserError` becomes one
clear message in the log and on the terminal and a non-zero exit, without a traceback.
`bpe_tokenizer` reads the optional trained-BPE input (workflow/rules/common.smk, `bpe_input`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from gpt2ipu.errors import UserError


def bpe_tokenizer(snakemake: Any) -> str | None:
    """The trained BPE's tokenizer.json when the rule has the `bpe` input (tokenize.tokenizer: bpe)."""
    return f"{snakemake.input.bpe}/tokenizer.json" if "bpe" in snakemake.input.keys() else None


def documents_param(documents: Any, fields: dict | None) -> tuple[Any, Any]:
    """(documents, fields) for the tokenize / train-bpe library functions from a rule's params: an
    articles.jsonl path as it is, or a text corpus part's {"pieces", ...} with its fields (a
    gpt2ipu.data.corpus.TextFields as a dict; workflow/rules/common.smk, `documents_of`, `text_fields`)."""
    if isinstance(documents, str):
        return documents, None
    return documents["pieces"], fields


def run_stage(snakemake: Any, stage: Callable[..., Any], *, torch_threads: bool = False, **kwargs: Any) -> Any:
    """Run `stage(**kwargs)` with its stderr/stdout in the rule's log. A `UserError` (a
    `StorageError` included) or a disk-full/permission `OSError` is printed as one line, to the
    log and to the terminal, and the job exits 1 without a traceback; other exceptions traceback.

    torch_threads: give torch the rule's `threads:` (a choice for the job's process, made here
    rather than inside the library function, which may run in a program with its own choice)."""
    if torch_threads:
        import torch

        torch.set_num_threads(snakemake.threads)
    log_path = snakemake.log[0] if len(snakemake.log) else None
    terminal = sys.stderr
    with contextlib.ExitStack() as stack:
        if log_path:
            log = stack.enter_context(open(log_path, "w", encoding="utf-8", buffering=1))
            stack.enter_context(contextlib.redirect_stderr(log))
            stack.enter_context(contextlib.redirect_stdout(log))
        try:
            return stage(**kwargs)
        except (UserError, OSError) as err:
            from gpt2ipu.fsutil import storage_error_of

            first_output = str(snakemake.output[0]) if len(snakemake.output) else None
            text = err if isinstance(err, UserError) else storage_error_of(err, first_output)
            if text is None:
                raise
            message = f"gpt2ipu rule {snakemake.rule}: error: {text}"
            try:  # the log may sit on the full disk itself: the terminal still gets the message
                print(message, file=sys.stderr, flush=True)
            except OSError:
                pass
            if log_path:
                print(message, file=terminal, flush=True)
            sys.exit(1)
