"""Inference-only linear layers through oneDNN on CPU: x W^T + b, optionally with GPT-2's GELU fused in.

Why: for GPT-2 small's fp32 forward passes without gradients (evaluation, prompts), ATen's
F.linear (MKL sgemm, then a separate pass for the bias and another for GELU) ran at 0.9 of the
measured matmul peak; oneDNN's fused linear (the kernel PyTorch's own compiler uses for frozen CPU
graphs, `torch.ops.mkldnn._linear_pointwise`) does the product, bias and GELU in one pass: 11-20%
less time for c_fc + GELU and 5% for the projections (docs/measurements.md). Exact to fp32
rounding of the same sums in another order (about 3e-6 at GELU outputs near 3).

The op is private to PyTorch, so it is used only after a one-time check on this process's torch
that it exists and agrees with F.linear + GELU; otherwise, on CUDA, under autograd or autocast, or
for other dtypes, the plain ATen calls run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation (Hugging Face's "gelu_new")."""
    return F.gelu(x, approximate="tanh")


def linear(x: torch.Tensor, layer: nn.Module, *, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, then GPT-2's GELU when `gelu`; through oneDNN where that applies (module doc).
    A layer other than nn.Linear (low-precision weights, gpt2ipu/model/lowp.py) runs as itself."""
    if type(layer) is nn.Linear and _fusable(x, layer.weight):
        if gelu:
            return _onednn_linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "tanh")
        return _onednn_linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    y = layer(x)
    return gelu_new(y) if gelu else y


def _onednn_linear_pointwise(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Under autocast F.linear would run in the autocast dtype: leave that to it.
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and onednn_linear_works())


@functools.cache
def onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's fused linear and it gives F.linear's (+ GELU's) numbers."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 5, 16), (24, 16), (24,)))
    try:
        with torch.no_grad():
            plain = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            fused = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    except (AttributeError, RuntimeError, TypeError):
        return False
    expected = F.linear(x, weight, bias)
    return (plain.shape == expected.shape and torch.allclose(plain, expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(fused, gelu_new(expected), rtol=1e-5, atol=1e-5))
