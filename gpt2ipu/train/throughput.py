"""Tokens/s and MFU: the one FLOP count and the one device peak that training, `gpt2ipu profile`
and `gpt2ipu bench train` all use.

FLOP count (the convention of PaLM, Chowdhery et al. 2022, appendix B, as nanoGPT's
`estimate_mfu` writes it): a training token costs

    6 N + 12 L C T   FLOPs

N: the model's parameters without the position embeddings (`GPT.num_parameters()`: a lookup,
no matmul; the tied token embedding counts once, as the LM head's matmul), L layers, C = n_embd,
T the sequence length. 6 N is forward (2 N) and backward (4 N) of every weight matmul; 12 L C T
the attention scores and their weighted sum (QK^T and AV, forward and backward). Recomputation
(activation checkpointing, GELU recomputed in backward) is not counted: it is model FLOPs, not
hardware FLOPs. Megatron's count (Narayanan et al. 2021) adds the logits' and recomputation's
FLOPs and would read higher on the same run.

Peak: a stated dense bf16/fp16 figure for GPUs whose CUDA name is in STATED_PEAKS (matched
exactly: "NVIDIA L4" is not "NVIDIA L40S"), otherwise the best of five 2048 x 2048 matmuls in the
run's precision, measured on the device (`measured_matmul_flops`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2ipu.devices import precision_dtype

# Vendors' stated dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s, by the exact name
# torch.cuda.get_device_name gives.
STATED_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,   # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token, 6 N + 12 L C T (see the module docstring); n_params: `GPT.num_parameters()`,
    position embeddings excluded."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def forward_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Inference FLOPs per token (forward only): a third of `flops_per_token`, 2 N + 4 L C T."""
    return flops_per_token(n_params, n_layer, n_embd, seq_len) / 3


def scoring_flops(fed_lengths: Sequence[int], head_rows: int, *, n_params: int, n_layer: int, n_embd: int,
                  vocab_size: int) -> float:
    """FLOPs of scoring forward passes (evaluation): each sequence of `fed_lengths` through the
    body at `forward_flops_per_token` with T its own length, and the LM head (2 V C) on the
    `head_rows` positions whose logits are computed (the scored ones; evaluation skips the rest)."""
    head = vocab_size * n_embd
    body = sum(length * forward_flops_per_token(n_params - head, n_layer, n_embd, length) for length in fed_lengths)
    return body + head_rows * 2 * head


def stated_peak(device_name: str, precision: str) -> float | None:
    """The stated dense peak of a GPU by its exact CUDA name, in bf16/fp16; None otherwise."""
    return STATED_PEAKS.get(device_name) if precision in ("bf16", "fp16") else None


def measured_matmul_flops(device: torch.device | str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` square matmuls after two untimed ones: what the hardware can do."""
    device = torch.device(device)
    # A private generator: the probe must not move the training RNG (exact resume depends on it).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    best = float("inf")
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """(one device's matmul peak in FLOP/s, where it comes from): stated for known GPUs, else measured."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        stated = stated_peak(name, precision)
        if stated is not None:
            return stated, f"stated dense {precision} peak of {name}"
    dtype = precision_dtype(precision)
    return measured_matmul_flops(device, dtype), f"measured 2048x2048 {dtype} matmul (best of 5)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Throughput:
    """Turns a step's wall time into tokens/s, samples/s and MFU (model FLOPs utilization)."""

    tokens_per_step: int
    samples_per_step: int
    flops_per_token: float
    peak: float          # one device's matmul peak, FLOP/s
    peak_source: str     # where `peak` comes from, for the run's summary line
    world_size: int

    @classmethod
    def of(cls, *, n_params: int, n_layer: int, n_embd: int, seq_len: int, samples_per_step: int, device,
           precision: str, world_size: int = 1) -> Throughput:
        """A step of `samples_per_step` samples of `seq_len` tokens; the peak probe runs here, once."""
        peak, source = peak_flops(device, precision)
        return cls(tokens_per_step=samples_per_step * seq_len, samples_per_step=samples_per_step,
                   flops_per_token=flops_per_token(n_params, n_layer, n_embd, seq_len),
                   peak=peak, peak_source=source, world_size=world_size)

    def rates(self, seconds: float) -> dict[str, float]:
        """tokens_per_s, samples_per_s and mfu of one optimizer step that took `seconds`."""
        return {"tokens_per_s": self.tokens_per_step / seconds, "samples_per_s": self.samples_per_step / seconds,
                "mfu": self.flops_per_token * self.tokens_per_step / seconds / (self.peak * self.world_size)}
