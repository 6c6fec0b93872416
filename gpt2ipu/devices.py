"""Which device a run uses, and the dtype of each precision name: one definition for every command."""

from __future__ import annotations

from gpt2ipu.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_dtype(precision: str):
    """The torch dtype of a precision name (fp32 | bf16 | fp16)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def autocast_dtype(precision: str):
    """The dtype autocast runs matmuls in for a precision, or None for fp32 (no autocast)."""
    return None if precision == "fp32" else precision_dtype(precision)


def resolve_device(name: str = "auto"):
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: this PyTorch build or machine has no CUDA; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    return device
