"""glibc malloc set up for training: memory freed in one step is kept for the next (under FSDP: returned).

PyTorch's CPU tensors come from malloc. By default glibc serves every allocation of 32 MB or more
with a fresh mmap and unmaps it on free, and returns free memory at the top of its heap to the
kernel (trimming). A training step allocates and frees the same large tensors every time (GPT-2
small: the loss's 154 MB tied-weight gradient, its logits buffer, activations), so each step
the kernel maps those pages again and zeroes them on first touch: tens of thousands of page
faults a step, paid in system time. `keep_freed_memory()` serves every allocation from the heap
(M_MMAP_MAX 0) and never trims it (M_TRIM_THRESHOLD at its maximum), so after the first step the
same pages are reused: shorter steps for a slightly higher peak RSS (measured:
docs/design-measurements.md).

Under FSDP the opposite: `return_freed_memory()` serves every allocation of 1 MB or more with its
own mmap, unmapped on free. FSDP gathers and frees each block's weights and reduces its gradients
through short-lived buffers of every size; from a heap, the freed holes between longer-lived
tensors stay in the process, and its peak RSS was 1.3x the memory it held (GPT-2 medium, 2
processes: 5.46 GB over start with glibc's defaults, 4.15 GB with this; docs/measurements.md).

Written with ctypes because neither PyTorch nor the standard library exposes mallopt; jemalloc or
tcmalloc would do the same through LD_PRELOAD, which needs a library outside the Python packages
and a relaunch. Not glibc (macOS, musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_FROM_BYTES = 2**20   # return_freed_memory: tensors from 1 MB up get their own mapping
_INT_MAX = 2**31 - 1   # mallopt takes an int


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (see the module docstring); whether it applied."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1


def return_freed_memory(from_bytes: int = MMAP_FROM_BYTES) -> bool:
    """Make this process's malloc give allocations of `from_bytes` or more back to the kernel when
    they are freed (FSDP: see the module docstring; rounding weights at load: gpt2ipu/model/lowp.py);
    whether it applied. A fixed threshold also stops glibc from raising it as large blocks are freed."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, from_bytes) == 1


def _mallopt():
    """glibc's mallopt (returns 1 on success), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
