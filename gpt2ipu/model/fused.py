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

bf16 weights (`bf16_linear`, for gpt2ipu/model/lowp.py): the same op takes x rounded to bf16 and
the bf16 W, adds the fp32 bias and applies GELU to the fp32 sums, and rounds once to its bf16
output; F.linear in bf16 rounds the product, then bias and GELU are more passes over the output
in fp32. Measured: c_fc + GELU 269 -> 160 ms at 8,192 rows, c_attn 140 -> 113 ms
(docs/measurements.md).
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
    A layer other than nn.Linear (low-precision weights, gpt2ipu/model/lowp.py) runs as itself, and
    one with a `forward_gelu` method is asked for the GELU too (it may fuse it)."""
    if type(layer) is nn.Linear and _fusable(x, layer.weight):
        return _onednn_linear_pointwise(x, layer.weight, layer.bias, *_post_op(gelu))
    if gelu and hasattr(layer, "forward_gelu"):
        return layer.forward_gelu(x)
    y = layer(x)
    return gelu_new(y) if gelu else y


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                gelu: bool = False) -> torch.Tensor:
    """x W^T + b, then GELU when `gelu`, for fp32 x and bf16 W, in fp32: a bf16 product (x rounded
    to bf16) with fp32 sums, through oneDNN where it applies (module doc), else F.linear in bf16."""
    rounded = x.to(torch.bfloat16)
    if not (torch.is_grad_enabled() and x.requires_grad) and onednn_bf16_linear_works():
        return _onednn_linear_pointwise(rounded, weight, bias, *_post_op(gelu)).float()
    y = F.linear(rounded, weight).float()
    y = y if bias is None else y + bias
    return gelu_new(y) if gelu else y


def _post_op(gelu: bool) -> tuple:
    return ("gelu", [], "tanh") if gelu else ("none", [], "")


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
    x, weight, bias = _probe_inputs()
    try:
        with torch.no_grad():
            plain = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            fused = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    except (AttributeError, RuntimeError, TypeError):
        return False
    expected = F.linear(x, weight, bias)
    return (plain.shape == expected.shape and torch.allclose(plain, expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(fused, gelu_new(expected), rtol=1e-5, atol=1e-5))


@functools.cache
def onednn_bf16_linear_works() -> bool:
    """Whether this torch's oneDNN fused linear takes bf16 x and W with an fp32 bias, and gives the
    bf16 product's numbers (to bf16 rounding) with bias and GELU."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, weight, bias = _probe_inputs()
    x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    try:
        with torch.no_grad():
            fused = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    except (AttributeError, RuntimeError, TypeError):
        return False
    expected = gelu_new(F.linear(x.float(), weight.float(), bias))
    return (fused.dtype == torch.bfloat16 and fused.shape == expected.shape
            and torch.allclose(fused.float(), expected, rtol=1e-2, atol=1e-2))


def _probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [3, 5, 16], W [24, 16], b [24] for the probes: small, seeded, and three-dimensional x as
    the model passes it."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=generator) for shape in ((3, 5, 16), (24, 16), (24,)))
