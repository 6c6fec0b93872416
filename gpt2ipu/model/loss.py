"""The language-model loss without the [tokens, vocab] logits tensor.

`chunked_lm_loss(hidden, weight, labels)` is `F.cross_entropy(F.linear(hidden, weight), labels,
ignore_index=-100)` (the mean over non-ignored tokens) plus the argmax accuracy, computed in chunks.
For GPT-2 the logits of 1024 tokens are 1024 x 50257 fp32 = 206 MB, and autograd keeps them, their
log-softmax and their gradient: the biggest tensors of a training step. The original's IPU flags
become the two ways of chunking:

  * vocab_chunks=F (`--embedding-serialization-factor F`): the vocabulary in F slices, with an
    online log-sum-exp across slices; backward recomputes each slice's logits.
  * token_chunks=F (`--enable-sequence-serialized`, chunks of `--serialized-seq-len` tokens; the
    training config turns that into F): the tokens in F slices, each against the whole vocabulary.
    Each slice's gradient is computed right away in forward (the loss is the last node of the
    graph, so its gradient is known up to the scalar that backward multiplies in), so nothing is
    recomputed: as fast as the plain loss, and leaner.

Both are hand-written autograd Functions because autograd alone would keep every slice's logits.

With a tied embedding the model passes a `TiedGrad`: the loss leaves its [V, d] weight gradient
there instead of returning it, and the token-embedding lookup adds its rows into that buffer and
hands the sum to autograd as the weight's only gradient (see `TiedGrad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2ipu.model.memory import TiedGrad, compute_dtype, hand_over
from gpt2ipu.ops import load_ops, loaded_ops, ops_reason

IGNORE_INDEX = -100


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_chunks: int = 1,
    token_chunks: int = 1,
    tied: TiedGrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over labels != -100, argmax accuracy over them) of `hidden @ weight.T`.

    hidden [N, d], weight [V, d], labels [N] (int64, -100 = ignored). With both chunk counts at 1
    this is the plain loss through full logits. Chunking is along one axis at a time. Under
    autocast the matmuls run in the autocast dtype; the softmax and all sums stay in fp32.
    tied: where the chunked paths leave the weight's gradient for the embedding (see TiedGrad);
    the plain loss returns it to autograd as usual.
    """
    if vocab_chunks > 1 and token_chunks > 1:
        raise ValueError("chunk the loss along the vocabulary or along the tokens, not both")
    device = hidden.device.type
    dtype = compute_dtype(hidden)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        # The compiled fused op (custom_ops/, when built and loaded) computes the same loss and
        # gradients in bounded memory, faster than the vocabulary chunks below (which recompute
        # their logits in backward), so it takes their place. The token chunks measured as fast
        # as the op in fp32 and faster and leaner under bf16 autocast, so they stay in PyTorch
        # (measured: docs/design-measurements.md).
        if vocab_chunks > 1 and fused_lm_loss_available(hidden, weight, dtype):
            return fused_lm_loss(hidden, weight, labels, dtype=dtype, tied=tied)
        if vocab_chunks > 1:
            return _VocabChunkedLoss.apply(hidden, weight, labels, vocab_chunks, dtype, tied)
        if token_chunks > 1:
            return _TokenChunkedLoss.apply(hidden, weight, labels, token_chunks, dtype, want_grads, tied)
        return _plain_loss(hidden.to(dtype), weight.to(dtype), labels)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums run in fp32 at least (bf16/fp16 logits are too coarse for them)."""
    return torch.promote_types(dtype, torch.float32)


def _plain_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).to(_softmax_dtype(hidden.dtype))
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    correct = (logits.detach().argmax(-1) == labels) & valid
    return loss, correct.sum() / valid.sum()


def _row_scale(labels, dtype):
    """Per-token weight of the mean: 1/n_valid for real labels, 0 for ignored ones; and n_valid."""
    valid = labels != IGNORE_INDEX
    n_valid = valid.sum()
    return valid.to(dtype) / n_valid.clamp(min=1), valid, n_valid


class _TokenChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, n_chunks, dtype, want_grads, tied):
        acc = _softmax_dtype(dtype)
        scale, valid, n_valid = _row_scale(labels, acc)
        targets = labels.clamp(min=0)
        h_all, w = hidden.to(dtype), weight.to(dtype)
        # Gradients in the matmul dtype; autograd casts them to the inputs' dtypes. Under bf16
        # autocast grad_weight is thus summed in bf16 over the few chunks (a plain bf16 matmul
        # rounds it once): an fp32 accumulator would cost a [V, d] cast and add per chunk.
        grad_hidden = torch.empty_like(h_all) if want_grads else None
        grad_weight = None
        loss_sum = hidden.new_zeros((), dtype=acc)
        correct = hidden.new_zeros((), dtype=torch.long)
        # One logits buffer for all chunks (and one in the matmul dtype under autocast): a fresh
        # [chunk, V] tensor per chunk is a fresh mmap the kernel must fault in and zero
        # (measured: docs/design-measurements.md).
        slices = _slices(hidden.shape[0], n_chunks)
        rows = max(hi - lo for lo, hi in slices)
        logits_buffer = hidden.new_empty((rows, w.shape[0]), dtype=acc)
        matmul_buffer = logits_buffer if dtype == acc else hidden.new_empty((rows, w.shape[0]), dtype=dtype)
        for lo, hi in slices:
            h, y, ok = h_all[lo:hi], targets[lo:hi], valid[lo:hi]
            logits = torch.mm(h, w.t(), out=matmul_buffer[:hi - lo])
            if dtype != acc:
                logits = logits_buffer[:hi - lo].copy_(logits)
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            row_max, prediction = logits.max(-1)
            correct += ((prediction == y) & ok).sum()
            # exp(logits - max) once, in place: it gives the log-sum-exp and the softmax.
            probs = logits.sub_(row_max[:, None]).exp_()
            sum_exp = probs.sum(-1)
            loss_sum += ((row_max + sum_exp.log() - target_logit) * ok).sum()
            if want_grads:
                # d loss / d logits = (softmax - onehot) * scale, written over the logits in place.
                grad_logits = probs.mul_((scale[lo:hi] / sum_exp)[:, None])
                grad_logits[torch.arange(hi - lo, device=h.device), y] -= scale[lo:hi]
                if dtype != acc:
                    grad_logits = matmul_buffer[:hi - lo].copy_(grad_logits)
                torch.mm(grad_logits, w, out=grad_hidden[lo:hi])
                if grad_weight is None:  # the first chunk writes it: no zero-filled [V, d] first
                    grad_weight = grad_logits.t() @ h
                else:
                    grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.tied, ctx.weight_dtype = tied, weight.dtype
        return loss_sum / n_valid, correct / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_accuracy):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: a second [V, d] buffer here would land on the step's memory peak.
        # once_differentiable, and the graph frees these after one backward.
        # A bf16 (autocast) weight gradient is cast to the weight's dtype now, at the start of
        # backward: when the optimizer steps after backward, the end of backward (every gradient
        # alive) is the step's memory peak, and a cast there held both copies at once
        # (measured: docs/design-measurements.md).
        grad_weight = hand_over(ctx.tied, grad_weight.mul_(grad_loss).to(ctx.weight_dtype))
        return grad_hidden.mul_(grad_loss), grad_weight, None, None, None, None, None


class _VocabChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, n_chunks, dtype, tied):
        acc = _softmax_dtype(dtype)
        scale, valid, n_valid = _row_scale(labels, acc)
        targets = labels.clamp(min=0)
        h = hidden.to(dtype)
        n_tokens = hidden.shape[0]
        running_max = hidden.new_full((n_tokens,), float("-inf"), dtype=acc)
        running_sum = hidden.new_zeros((n_tokens,), dtype=acc)
        target_logit = hidden.new_zeros((n_tokens,), dtype=acc)
        best_logit = hidden.new_full((n_tokens,), float("-inf"), dtype=acc)
        best_index = targets.new_zeros((n_tokens,))
        for lo, hi in _slices(weight.shape[0], n_chunks):
            logits = (h @ weight[lo:hi].to(dtype).t()).to(acc)
            chunk_max, chunk_argmax = logits.max(-1)
            in_chunk = (targets >= lo) & (targets < hi)
            local = (targets - lo).clamp(0, hi - lo - 1)
            target_logit = torch.where(in_chunk, logits.gather(1, local[:, None]).squeeze(1), target_logit)
            better = chunk_max > best_logit  # strict, so ties keep the first index, like argmax
            best_index = torch.where(better, chunk_argmax + lo, best_index)
            best_logit = torch.where(better, chunk_max, best_logit)
            # Online log-sum-exp: rescale the running sum to the new running max.
            new_max = torch.maximum(running_max, chunk_max)
            running_sum = running_sum * (running_max - new_max).exp() + logits.sub_(new_max[:, None]).exp_().sum(-1)
            running_max = new_max
        lse = running_max + running_sum.log()
        loss_sum = ((lse - target_logit) * valid).sum()
        correct = ((best_index == targets) & valid).sum()
        ctx.save_for_backward(hidden, weight, targets, lse, scale)
        ctx.n_chunks, ctx.dtype, ctx.tied = n_chunks, dtype, tied
        return loss_sum / n_valid, correct / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_accuracy):
        hidden, weight, targets, lse, scale = ctx.saved_tensors
        h = hidden.to(ctx.dtype)
        row_weight = (scale * grad_loss)[:, None]
        # Both gradients are written, never zero-filled first: the first slice's product writes
        # grad_hidden, the others add to it; each slice writes its own rows of grad_weight.
        grad_hidden = None
        grad_weight = torch.empty_like(weight)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for lo, hi in _slices(weight.shape[0], ctx.n_chunks):
            w = weight[lo:hi].to(ctx.dtype)
            grad_logits = (h @ w.t()).to(lse.dtype).sub_(lse[:, None]).exp_()
            in_chunk = (targets >= lo) & (targets < hi)
            grad_logits[rows[in_chunk], targets[in_chunk] - lo] -= 1
            grad_logits = grad_logits.mul_(row_weight).to(ctx.dtype)
            grad_hidden = _add_matmul(grad_hidden, grad_logits, w, _softmax_dtype(hidden.dtype))
            if grad_weight.dtype == grad_logits.dtype:
                torch.mm(grad_logits.t(), h, out=grad_weight[lo:hi])
            else:
                grad_weight[lo:hi] = grad_logits.t() @ h
        return grad_hidden.to(hidden.dtype), hand_over(ctx.tied, grad_weight), None, None, None, None


def _add_matmul(out: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out + a @ b in `dtype` (in place when the dtypes allow); out None: a @ b, written, not added to zeros."""
    if out is None:
        return (a @ b).to(dtype)
    if out.dtype == a.dtype:
        return out.addmm_(a, b)
    out += (a @ b).to(out.dtype)
    return out


def _slices(length: int, n_chunks: int) -> list[tuple[int, int]]:
    """`n_chunks` contiguous [lo, hi) slices covering range(length), sizes differing by at most one."""
    n_chunks = max(1, min(n_chunks, length))
    bounds = [length * i // n_chunks for i in range(n_chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------
# The compiled fused loss (custom_ops/lm_loss.cpp)

FUSED_CHUNK_SIZE = 4096  # vocabulary columns per step of a row's online log-sum-exp (16 KB: in L1)
FUSED_BLOCK_ELEMENTS = 1 << 25  # logits held at once (128 MB in fp32): block_tokens = FUSED_BLOCK_ELEMENTS // V


def fused_lm_loss_available(hidden, weight, dtype=None) -> bool:
    """Whether `fused_lm_loss` can take these tensors: ops loaded, CPU tensors, fp32/bf16 compute."""
    return (hidden.device.type == "cpu" and weight.device.type == "cpu"
            and (dtype or compute_dtype(hidden)) in (torch.float32, torch.bfloat16)
            and load_ops() is not None)


def fused_lm_loss(hidden, weight, labels, *, chunk_size: int = FUSED_CHUNK_SIZE, block_tokens: int | None = None,
                  dtype=None, tied=None):
    """(mean cross-entropy over labels != -100, argmax accuracy over them) of `hidden @ weight.T`.

    The contract of `chunked_lm_loss` (NaN for both when every label is ignored; the gradients are
    then zero), computed by the compiled op: `block_tokens` tokens at a time (default
    FUSED_BLOCK_ELEMENTS // V), each token's logits swept `chunk_size` vocabulary entries at a time.
    With gradients wanted, forward computes them (for a loss gradient of 1) and backward scales
    them: nothing is recomputed. hidden [N, d] and weight [V, d] in fp32 or bf16; the matmuls run
    in `dtype` (default: the autocast dtype when autocast is on, else hidden's), the softmax and
    sums in fp32. Needs the ops loaded (see `fused_lm_loss_available`). tied: a `TiedGrad` that
    takes the weight's gradient for the embedding lookup to complete.
    """
    namespace = loaded_ops()
    if namespace is None:
        raise RuntimeError(f"fused_lm_loss needs the compiled ops: {ops_reason()}")
    compute = dtype or compute_dtype(hidden)
    block = block_tokens or max(1, FUSED_BLOCK_ELEMENTS // max(1, weight.shape[0]))
    # Decided here: inside Function.forward grad mode is always off.
    grads = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLMLoss.apply(hidden, weight, labels, int(chunk_size), int(block), compute, *grads, tied)


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, block_tokens, dtype, hidden_grad, weight_grad, tied):
        loss, accuracy, grad_hidden, grad_weight = loaded_ops().lm_loss(
            hidden, weight, labels, chunk_size, block_tokens, dtype, hidden_grad, weight_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(accuracy)
        ctx.tied = tied
        return loss, accuracy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_accuracy):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place (the graph frees them after this one backward): a second [V, d] would land
        # on the step's memory peak.
        return (grad_hidden.mul_(grad_loss) if ctx.needs_input_grad[0] else None,
                hand_over(ctx.tied, grad_weight.mul_(grad_loss)) if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None)
