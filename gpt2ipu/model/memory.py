"""The autograd pieces that keep a training step's memory down, each the same math as plain PyTorch.

  * `FeatureMajorMLP`: the MLP with GELU recomputed in backward, its hidden layer kept
    feature-major, and no low-precision weight copies kept under autocast.
  * `RecastLinear` (`recast_linear`): an attention linear under autocast that keeps no
    low-precision copy of its weight for backward.
  * `TiedGrad` + `TiedEmbedding`: the tied embedding's one gradient buffer, which the chunked LM-head
    loss (gpt2ipu/model/loss.py) fills and the token-embedding lookup completes in place.

What each one saves was measured: docs/design-measurements.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2ipu.model import fused
from gpt2ipu.model.fused import gelu_new


class TiedGrad:
    """One [V, d] gradient buffer shared by the LM head and the token embedding of a tied weight.

    Autograd would receive the tied weight's two gradients separately: the LM head's, dense and
    known first (the loss is the first node of backward), and the embedding's, only the batch's
    rows, at the very end. Its sum of a dense and a sparse gradient is out of place, a third
    [V, d] tensor on the step's memory peak (measured: docs/design-measurements.md). So the loss
    stores its scaled gradient in `grad` (returning none for the weight), and the embedding
    lookup (`TiedEmbedding` below) adds its rows into it in place and returns it: one
    dense gradient, accumulated by autograd like any other. Made fresh for each forward.
    """

    def __init__(self):
        self.grad: torch.Tensor | None = None


def hand_over(tied: TiedGrad | None, grad_weight: torch.Tensor) -> torch.Tensor | None:
    """The weight gradient a loss's backward returns: none when a TiedGrad takes it (the embedding returns it)."""
    if tied is None:
        return grad_weight
    tied.grad = grad_weight
    return None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `tensor` run in here: autocast's when it is on for its device, else its own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def recast_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(x)`; when training under autocast, without keeping a low-precision weight copy (see
    RecastLinear); otherwise through fused.linear (oneDNN where it applies)."""
    device = x.device.type
    if torch.is_grad_enabled() and torch.is_autocast_enabled(device):
        return RecastLinear.apply(x, linear.weight, linear.bias)
    return fused.linear(x, linear)


class RecastLinear(torch.autograd.Function):
    """F.linear under autocast that casts the weight again in backward instead of keeping its cast.

    Autocast's linear saves the bf16 copy of the weight for backward: 4.7 MB per attention block
    of GPT-2 small (56 MB for the model), all of it on the memory peak at the end of forward. A
    cast costs one pass over the weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        device, dtype = x.device.type, compute_dtype(x)
        with torch.autocast(device, enabled=False):
            x_low = x.to(dtype)
            y = F.linear(x_low, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_low, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_low, weight = ctx.saved_tensors
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1]).to(x_low.dtype)
        grad_x = (grad_2d @ weight.to(x_low.dtype)).view(*x_low.shape)
        grad_weight = grad_2d.t() @ x_low.reshape(-1, x_low.shape[-1])
        return grad_x, grad_weight, grad_2d.sum(0) if ctx.has_bias else None


class FeatureMajorMLP(torch.autograd.Function):
    """`c_proj(gelu_new(c_fc(x)))` for training: GELU recomputed in backward, the hidden layer
    kept feature-major ([4*n_embd, tokens]), and no low-precision weight copies kept.

    Autograd would keep both the hidden layer h (for GELU's backward) and gelu(h) (for c_proj's
    weight gradient): two [tokens, 4*n_embd] tensors per block, the biggest activations of the
    model. Recomputing GELU costs one elementwise pass and halves that memory.
    Feature-major: MKL's fp32 matmuls ran faster for these shapes when the product's longer side
    is its rows (measured alone; whole training steps measured equal either way, within noise:
    docs/design-measurements.md), so h^T = W_fc x^T and c_proj's input gradient (W_proj^T dy^T)
    are computed in that layout and GELU and its backward run on it in place of [tokens, 4*n_embd].
    Under autocast the weights are cast here and again in backward instead of being saved (or
    held by autocast's cache until backward reaches them): 9.4 MB a block for GPT-2 small in bf16,
    on the step's memory peak.
    """

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        device, dtype = x.device.type, compute_dtype(x)
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            h_t = torch.addmm(b_fc.to(dtype)[:, None], w_fc.to(dtype), x2.t())
            y = torch.addmm(b_proj.to(dtype), gelu_new(h_t).t(), w_proj.to(dtype).t())
        ctx.save_for_backward(x2, h_t, w_fc, w_proj)
        ctx.input_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, h_t, w_fc, w_proj = ctx.saved_tensors
        dtype = h_t.dtype
        grad_y = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        w_fc, w_proj = w_fc.to(dtype), w_proj.to(dtype)
        grad_w_proj = grad_y.t() @ gelu_new(h_t).t()
        grad_b_proj = grad_y.sum(0)
        grad_h_t = torch.ops.aten.gelu_backward(w_proj.t() @ grad_y.t(), h_t, approximate="tanh")
        grad_w_fc = grad_h_t @ x2
        grad_b_fc = grad_h_t.sum(1)
        grad_x = grad_h_t.t() @ w_fc
        return grad_x.view(ctx.input_shape), grad_w_fc, grad_b_fc, grad_w_proj, grad_b_proj


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(ids, weight) whose backward adds the rows' gradients into the LM head's
    weight gradient (left in `tied` by the chunked loss) and returns the sum: see TiedGrad."""

    @staticmethod
    def forward(ctx, input_ids, weight, tied):
        ctx.save_for_backward(input_ids)
        ctx.tied, ctx.shape, ctx.dtype = tied, weight.shape, weight.dtype
        return F.embedding(input_ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_tokens):
        (input_ids,) = ctx.saved_tensors
        grad, ctx.tied.grad = ctx.tied.grad, None
        if grad is None:   # the loss kept no gradient (none wanted for the weight): the rows alone
            grad = grad_tokens.new_zeros(ctx.shape, dtype=ctx.dtype)
        else:   # the chunked losses hand it over in the weight's dtype already
            grad = grad.to(ctx.dtype)
        grad.index_add_(0, input_ids.reshape(-1), grad_tokens.reshape(-1, ctx.shape[1]).to(grad.dtype))
        return None, grad, None
