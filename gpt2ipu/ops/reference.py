"""Reference math of the compiled decode ops in PyTorch: what the C++ loops must agree with.

`quantize_activations` is custom_ops/matvec.h's int8 rounding of x, written once here for the
self-check, the tests, and the pure-PyTorch path of int8 decoding (gpt2ipu/model/lowp.py), so
that decoding gives the same numbers with and without the compiled ops.
"""

from __future__ import annotations

QUANT_BLOCK = 64   # custom_ops/matvec.h's kQuantBlock


def quantize_activations(x):
    """x [..., in] rounded as int8 decoding rounds it, back in fp32: per block of 64 values along the
    last axis (the last block may be shorter), q = round(x * 127 / absmax) and the value q * absmax / 127."""
    import torch

    x = x.float()
    n = x.shape[-1]
    pad = (-n) % QUANT_BLOCK
    blocks = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, QUANT_BLOCK))
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(absmax > 0, 127 / absmax, torch.zeros_like(absmax))
    quantized = torch.round(blocks * inverse).clamp_(-127, 127)
    return (quantized * (absmax / 127)).flatten(-2)[..., :n]
