"""Fast decoding on CPU: whole decode steps through the compiled `decode_step` op (`FusedDecoder`),
and the model's linear layers routed to the compiled decode op or re-laid out (`use_decode_layout`)
for the calls the fused step does not take.

Decoding multiplies one token's vector by every weight matrix, a matrix-vector product whose speed
is set by how fast the weights stream from memory (measured rates: docs/measurements.md).
"""

from __future__ import annotations

import torch

from gpt2ipu.ops import load_ops


def use_decode_layout(model) -> None:
    """Make the model's matrix products fast for decoding on CPU (same values; CUDA models are left as they are).

    Decoding multiplies one token's vector by every weight matrix, a matrix-vector product whose
    speed is set by how fast the weights stream from memory. MKL's product (what F.linear calls)
    streams the [out, in] matrices nn.Linear keeps well below the memory's speed. With the
    compiled ops (custom_ops/decode_linear.cpp) loaded and fp32 weights, every linear layer, the
    LM head included, goes through `DecodeLinear`: the compiled op, which streams them near
    memory speed, for a few rows (decode steps), F.linear for more (the prompt). Without them,
    the weights are re-laid out [in, out] once and handed to nn.Linear as transposed views, so
    F.linear(x, W_view) is x @ W with W contiguous, a layout MKL streams faster. (Measured rates:
    docs/design-measurements.md.) Either way the outputs may differ from F.linear's in the last
    bits, as with any other kernel.
    """
    weight = model.wte.weight
    if weight.device.type != "cpu" or not isinstance(model.wte, torch.nn.Embedding):
        return   # CUDA, or low-precision weights, whose modules pick their kernel (gpt2ipu/model/lowp.py)
    if weight.dtype == torch.float32 and load_ops() is not None:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, DecodeLinear(child))
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight = torch.nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
        embedding = torch.nn.Parameter(model.wte.weight.t().contiguous().t(), requires_grad=False)
        model.wte.weight = embedding
        if model.config.tie_word_embeddings:
            model.lm_head.weight = embedding
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.t().contiguous().t(), requires_grad=False)


class DecodeLinear(torch.nn.Module):
    """An nn.Linear for decoding on CPU: the compiled decode op for calls of few rows, F.linear otherwise.

    What: it holds the nn.Linear's own weight and bias (shared, not copied, so a tied LM head
    stays tied and no memory is added) and computes the same x W^T + b. Why: a decode step feeds
    one row per sequence, a matrix-vector product bound by how fast the weights stream from
    memory, which the compiled op does faster than MKL's F.linear; the prompt's many rows are a
    matrix product, where F.linear is the right kernel. See `use_decode_layout`.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_linear_available(x, self.weight):
            return decode_linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


DECODE_MAX_ROWS = 16  # custom_ops/decode_linear.cpp's kMaxRows


def decode_linear_available(x, weight) -> bool:
    """Whether `decode_linear(x, weight, bias)` can take this F.linear call (loads the ops if needed)."""
    import torch

    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and x.numel() <= DECODE_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # no autograd here
            and load_ops() is not None)


def decode_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for x [..., in] of at most DECODE_MAX_ROWS rows, fp32 CPU, by the compiled op.

    Same values as F.linear up to the order of the sums (a different kernel: the last bits differ).
    """
    rows = x.reshape(-1, x.shape[-1])
    out = load_ops().decode_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class FusedDecoder:
    """Decode steps of a GPT on CPU through the compiled `decode_step` op: one call per step.

    What: `step(next_ids, cache, attention_mask)` returns the next-token logits [B, V] of one new
    token per sequence and writes its keys and values into `cache`, as `model.hidden_states` then
    `model.lm_head` would, for fp32, bf16 or int8 weights (gpt2ipu/model/lowp.py).
    Why: after the prompt, a step is one matrix-vector product per weight matrix plus a few
    hundred small operations; as PyTorch modules those small operations cost more than the
    products themselves once the weights are 1 or 2 bytes (custom_ops/decode_step.cpp).
    `for_model` returns None where the op does not apply (no compiled ops, CUDA, a model in
    bf16 compute, training mode, or modules other than GPT-2's), and the caller decodes through
    the model as before.
    """

    MAX_ROWS = 16   # custom_ops/decode_step.cpp's kMaxRows

    def __init__(self, ops, params: list[torch.Tensor], n_head: int, eps: float):
        self.ops, self.params, self.n_head, self.eps = ops, params, n_head, eps

    @classmethod
    def for_model(cls, model) -> FusedDecoder | None:
        if model.training or model.wte.weight.device.type != "cpu":
            return None
        ops = load_ops()
        if ops is None:
            return None
        try:
            params = decode_step_params(model)
        except _NotFusable:
            return None
        return cls(ops, params, model.config.n_head, model.config.layer_norm_epsilon)

    def step(self, next_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] of next_ids [B] at the end of `cache` (attention_mask: [B, past + 1], or None)."""
        length = cache.length
        if attention_mask is None:
            positions = torch.full((next_ids.shape[0],), length, dtype=torch.long)
            key_mask = None
        else:   # left padding: positions count real tokens, as in GPT.hidden_states
            positions = attention_mask.sum(dim=-1) - 1
            key_mask = attention_mask.bool()
        keys, values = cache.room(1)
        logits = self.ops.decode_step(next_ids.contiguous(), positions, key_mask, keys, values, length,
                                      self.params, self.n_head, self.eps)
        cache.advance(1)
        return logits


class _NotFusable(Exception):
    pass


def decode_step_params(model) -> list[torch.Tensor]:
    """The model's tensors in custom_ops/decode_step.cpp's order (a matrix's int8 scale after it)."""
    from gpt2ipu.model.lowp import LowpEmbedding, LowpLinear

    def vector(tensor) -> list[torch.Tensor]:
        if tensor is None or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise _NotFusable
        return [tensor.detach()]

    def matrix(module, bias: bool = True) -> list[torch.Tensor]:
        if isinstance(module, LowpLinear):
            found = [module.weight] + ([] if module.scale is None else [module.scale])
        elif isinstance(module, (torch.nn.Linear, DecodeLinear)):
            found = vector(module.weight)
        else:
            raise _NotFusable
        if not all(t.is_contiguous() for t in found):
            raise _NotFusable
        if bias:
            return [t.detach() for t in found] + vector(module.bias)
        if module.bias is not None:
            raise _NotFusable
        return [t.detach() for t in found]

    if isinstance(model.wte, LowpEmbedding):
        wte = [model.wte.weight] + ([] if model.wte.scale is None else [model.wte.scale])
    elif isinstance(model.wte, torch.nn.Embedding):
        wte = vector(model.wte.weight)
    else:
        raise _NotFusable
    params = wte + vector(model.wpe.weight) + vector(model.ln_f.weight) + vector(model.ln_f.bias)
    params += matrix(model.lm_head, bias=False)
    for block in model.h:
        params += vector(block.ln_1.weight) + vector(block.ln_1.bias)
        params += matrix(block.attn.c_attn) + matrix(block.attn.c_proj)
        params += vector(block.ln_2.weight) + vector(block.ln_2.bias)
        params += matrix(block.mlp.c_fc) + matrix(block.mlp.c_proj)
    if {t.dtype for t in params[:1]} - {torch.float32, torch.bfloat16, torch.int8}:
        raise _NotFusable
    return params
