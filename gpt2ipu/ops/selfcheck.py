"""The freshly built ops against plain references on small inputs, run in the build's child process.

A wrong build is no build: `build_ops` records a failed self-check as a failed build.
"""

from __future__ import annotations

IGNORE_INDEX = -100   # the label value every loss ignores (PyTorch's cross_entropy default)

# Megatron's sample index of a small stream with empty documents and two epochs: sizes, doc_idx,
# seq_length 4, and the expected [num_samples + 1, 2] int32 rows. Written out here rather than
# computed, since the numpy reference lives above this layer (gpt2ipu/train/sample_index.py); a
# test checks these rows against it.
SAMPLE_SIZES = (5, 0, 9, 1, 30, 2, 0, 7)
SAMPLE_DOC_IDX = (3, 1, 0, 7, 4, 6, 2, 5) * 2
SAMPLE_SEQ_LENGTH = 4
SAMPLE_IDX = ((0, 0), (2, 3), (3, 2), (3, 6), (4, 3), (4, 7), (4, 11), (4, 15), (4, 19), (4, 23), (4, 27),
              (6, 1), (6, 5), (7, 0), (10, 1), (11, 0), (11, 4), (12, 1), (12, 5), (12, 9), (12, 13), (12, 17),
              (12, 21), (12, 25), (12, 29), (14, 3), (14, 7))

def self_check(namespace) -> None:
    """The freshly built ops against plain references on small inputs: a wrong build is no build."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gpt2ipu.ops.reference import quantize_activations

    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 16, generator=generator), torch.randn(37, 16, generator=generator)
    labels = torch.tensor([0, 5, IGNORE_INDEX, 36, 11, 12, 36])
    loss, _, grad_hidden, grad_weight = namespace.lm_loss(hidden, weight, labels, 8, 3, torch.float32, True, True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
    expected.backward()
    if not (torch.allclose(loss, expected, rtol=1e-5) and torch.allclose(grad_hidden, h.grad, atol=1e-6)
            and torch.allclose(grad_weight, w.grad, atol=1e-6)):
        raise SystemExit(f"self-check failed: lm_loss gives {loss.item()}, expected {expected.item()}")
    sizes = np.array(SAMPLE_SIZES, dtype=np.int32)
    doc_idx = np.array(SAMPLE_DOC_IDX, dtype=np.int32)
    want = np.array(SAMPLE_IDX, dtype=np.int32)
    got = namespace.build_sample_idx(torch.from_numpy(sizes), torch.from_numpy(doc_idx), SAMPLE_SEQ_LENGTH,
                                     len(want) - 1).numpy()
    if got.dtype != want.dtype or not np.array_equal(got, want):
        raise SystemExit("self-check failed: build_sample_idx differs from the numpy reference")
    x, weight, bias = torch.randn(3, 24, generator=generator), torch.randn(10, 24, generator=generator), torch.randn(10)
    if not torch.allclose(namespace.decode_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5):
        raise SystemExit("self-check failed: decode_linear differs from F.linear")
    # The low-precision kernels against F.linear over the same rounded weights, widened to fp32.
    rounded = weight.to(torch.bfloat16)
    if not torch.allclose(namespace.decode_linear_bf16(x, rounded, bias), F.linear(x, rounded.float(), bias),
                          rtol=1e-5, atol=1e-5):
        raise SystemExit("self-check failed: decode_linear_bf16 differs from F.linear over the bf16 weights")
    scale = weight.abs().amax(dim=1) / 127
    quantized = torch.round(weight / scale[:, None]).to(torch.int8)
    # int8 also rounds x to int8 per block of 64 (custom_ops/matvec.h).
    expected = F.linear(quantize_activations(x), quantized.float() * scale[:, None], bias)
    if not torch.allclose(namespace.decode_linear_int8(x, quantized, scale, bias), expected, rtol=1e-5, atol=1e-5):
        raise SystemExit("self-check failed: decode_linear_int8 differs from F.linear over the dequantized weights "
                         "and the int8-rounded x")
