"""glibc malloc set up for training: memory freed in one step is kept for the next.

PyTorch's CPU tensors come from malloc. By default glibc serves every allocation of 32 MB or more
with a fresh mmap and unmaps it on free, and returns free memory at the top of its heap to the
kernel (trimming). A training step allocates and frees the same large tensors every time (GPT-2
small: the loss's 154 MB tied-weight gradient, its logits buffer, activations), so each step
the kernel maps those pages again and zeroes them on first touch: tens of thousands of page
faults a step, paid in system time. `keep_freed_memory()` serves every allocation from the heap
(M_MMAP_MAX 0) and never trims it (M_TRIM_THRESHOLD at its maximum), so after the first step the
same pages are reused: shorter steps for a slightly higher peak RSS (measured:
docs/design-measurements.md).

Written with ctypes because neither PyTorch nor the standard library exposes mallopt; jemalloc or
tcmalloc would do the same through LD_PRELOAD, which needs a library outside the Python packages
and a relaunch. Not glibc (macOS, musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1   # mallopt takes an int


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (see the module docstring); whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
