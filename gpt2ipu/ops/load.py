"""Load a build of the compiled ops (never compile), or say why the pure paths are used.

`load_ops()` loads what `build_ops` built, from `$GPT2IPU_OPS_DIR` (the training rule sets it;
torchrun ranks inherit it), so no rank ever compiles or waits for another's compile. It says once
per process which path is used and why; every caller falls back to the pure PyTorch / numpy code,
whose results are the same.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from gpt2ipu.log import package_logger
from gpt2ipu.ops.build import NAMESPACE, OPS_DIR_ENV, STATUS_NAME, _torch_version, read_status

log = package_logger(__name__)

_lock = threading.Lock()


_outcomes: dict[str, tuple[Any, str]] = {}  # resolved build dir -> (namespace or None, why)


# The folder as given -> its key in _outcomes: resolving a path costs a stat per part (measured:
# docs/design-measurements.md), and decoding asks once per linear layer per token.
_resolved: dict[tuple[str, str], str] = {}


_loaded_library: Path | None = None


def load_ops(build_dir: str | os.PathLike | None = None, *, quiet: bool = False):
    """`torch.ops.gpt2ipu` with the compiled ops loaded from `build_dir` (default `$GPT2IPU_OPS_DIR`), or None.

    Never builds. The first call for a folder prints, once per process, which path is used and why
    (not configured, not built, build failed, cannot load); later calls answer from memory.
    """
    folder = build_dir if build_dir is not None else os.environ.get(OPS_DIR_ENV) or None
    key = _outcome_key(folder)
    known = _outcomes.get(key)
    if known is not None:
        return known[0]
    with _lock:
        if key not in _outcomes:
            namespace, why = _try_load(Path(folder)) if folder else \
                (None, f"${OPS_DIR_ENV} is not set (build them with `gpt2ipu ops build --out DIR` "
                       f"and point ${OPS_DIR_ENV} at DIR)")
            _outcomes[key] = (namespace, why)
            if not quiet and _announce(namespace is not None):
                path = "compiled ops" if namespace is not None else "pure PyTorch / numpy paths (same results)"
                log.info(f"gpt2ipu ops: using the {path}: {why}")
        return _outcomes[key][0]


def ops_reason(build_dir: str | os.PathLike | None = None) -> str:
    """Why `load_ops(build_dir)` answered what it did (loads first if needed)."""
    load_ops(build_dir, quiet=True)
    folder = build_dir if build_dir is not None else os.environ.get(OPS_DIR_ENV) or None
    return _outcomes[_outcome_key(folder)][1]


def _outcome_key(folder) -> str:
    """The resolved folder (the key of _outcomes), remembered per spelling of the folder."""
    if not folder:
        return ""
    spelling = (str(folder), os.getcwd())   # a relative folder means another one after a chdir
    if spelling not in _resolved:
        _resolved[spelling] = str(Path(folder).resolve())
    return _resolved[spelling]


def _announce(loaded: bool) -> bool:
    # Under torchrun every rank would say the same; rank 0 speaks for a success, any rank for a failure.
    return not loaded or os.environ.get("RANK", "0") == "0"


def _try_load(folder: Path):
    global _loaded_library
    status = read_status(folder)
    if status is None:
        return None, f"not built: no readable {STATUS_NAME} in {folder}"
    if not status.get("built"):
        return None, f"the build in {folder} failed: {status.get('reason')}"
    import torch

    if status.get("torch") != _torch_version():
        return None, (f"{folder} was built for torch {status.get('torch')}, this is torch {_torch_version()}; "
                      f"rebuild it")
    library = (folder / str(status.get("library"))).resolve()
    if _loaded_library is not None and library != _loaded_library:
        loaded = read_status(_loaded_library.parent) or {}
        if loaded.get("key") == status.get("key"):  # same sources, flags and torch: the same code
            return getattr(torch.ops, NAMESPACE), f"loaded from {_loaded_library.parent} (same build as {folder})"
        return None, f"another build of the ops ({_loaded_library.parent}) is already loaded in this process"
    if _loaded_library is None:
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as err:
            return None, f"cannot load {library}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        _loaded_library = library
    return getattr(torch.ops, NAMESPACE), f"loaded from {folder}"



def loaded_ops():
    """`torch.ops.gpt2ipu` without any lookup when a build is already loaded in this process, else `load_ops()`.

    For the per-call paths (a loss per micro-batch): `load_ops` resolves its folder argument first.
    """
    if _loaded_library is None:
        return load_ops()
    import torch

    return getattr(torch.ops, NAMESPACE)
