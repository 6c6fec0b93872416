"""Low-precision weights for inference: a GPT whose matrices are stored bf16 or int8, loaded tensor by tensor.

`--weights bf16` stores every weight matrix (the four per block, the token embedding and the LM
head, tied or not) in bf16; `--weights int8` stores them as int8 with one fp32 scale per output
row (symmetric, absmax / 127, per row rather than llama.cpp's per block of 32). Everything else
(LayerNorms, biases, position embeddings, the key/value cache) stays fp32: together under 1% of
GPT-2 small's weight bytes, and the place where rounding would cost accuracy for nothing.

Activations: bf16 weights multiply fp32 activations exactly (the sums are fp32's over the
rounded weights). int8 weights, when decoding (calls of at most 16 rows: every step after the
prompt), multiply activations rounded to int8 per block of 64 values (absmax / 127, llama.cpp's
q8_0 x q8_0 scheme with blocks of 64): that is what lets AVX512-VNNI's int8 dot products keep up
with the memory (custom_ops/matvec.h), and the same rounding is applied without the compiled ops
(gpt2ipu/ops/reference.py), so the numbers do not depend on the machine. Calls of more rows (a
prompt, an evaluation window) multiply the fp32 activations by the widened weights.

Why: batch-1 decoding reads every weight once per token, so its speed is the memory's bandwidth
divided by the weights' bytes; 2 or 1 byte per weight instead of 4 is the only way past the fp32
limit. Decoding goes through the compiled ops (custom_ops/decode_step.cpp for a whole step,
decode_linear.cpp per matrix); without them, and for calls of many rows, the weights are widened
to fp32 for the call and F.linear does the product.

Loading: from the fp32 checkpoint itself (no second file). Tensors are read one at a time from
model.safetensors and rounded as they arrive (the token embedding in blocks of rows), so the
fp32 weights are never all in memory; a folder in another form (sharded, pytorch_model.bin) is
loaded whole and then rounded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from gpt2ipu.allocator import return_freed_memory
from gpt2ipu.errors import UserError
from gpt2ipu.model import fused
from gpt2ipu.model.gpt import GPT
from gpt2ipu.model.hf import (
    BUFFER_SUFFIXES,
    CONFIG_NAME,
    CONV1D_SUFFIXES,
    WEIGHTS_NAME,
    check_saved_architecture,
    config_from_hf,
    load_hf_dir,
    tensor_readers,
)
from gpt2ipu.ops import load_ops, ops_reason
from gpt2ipu.ops.reference import quantize_activations

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
DECODE_MAX_ROWS = 16          # custom_ops/decode_linear.cpp's kMaxRows
EMBEDDING_ROWS_PER_READ = 2048  # 6 MB of fp32 GPT-2 embedding rows at a time
WIDEN_ROWS = 4096             # output rows widened to fp32 at a time without the compiled ops (12 MB for C = 768)


def check_weights(weights: str, precision: str = "fp32") -> None:
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if weights != "fp32" and precision != "fp32":
        raise UserError(f"--weights {weights} stores the weights in {weights} and computes in fp32; it does not "
                        f"combine with --precision {precision} (the whole model in {precision}): drop one of them")


def quantize_rows(weight: torch.Tensor, weights: str, *,
                  overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, per-row scale or None) of an fp32 [out, in] matrix in format `weights`.

    overwrite: `weight` (fp32) may be used as scratch, so rounding holds no second fp32 copy (the loader's)."""
    weight = weight.float()
    if weights == "bf16":
        return weight.to(torch.bfloat16).contiguous(), None
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    scratch = weight if overwrite else weight.clone()
    quantized = scratch.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return quantized.contiguous(), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 values a stored matrix stands for."""
    return weight.float() if scale is None else weight.float() * scale[:, None]


class LowpLinear(nn.Module):
    """y = x W^T + b with W stored bf16, or int8 with a per-row scale; x, b and y fp32.

    Few rows on CPU (decoding): the compiled op, which reads W as stored; with int8 weights a
    call of at most 16 rows also rounds x to int8 per block of 64 (as the compiled op does, with
    or without it; see the module's docstring). More rows (a prompt, an evaluation window):
      * on a CPU with bf16 matrix instructions (AVX512-BF16, AMX), a bf16 matrix product: x
        rounded to bf16, W as stored (int8 values are exact in bf16; the row scale is applied
        to the fp32 output), the product's bf16 output widened back; bf16 W through oneDNN's
        fused linear (model/fused.py: bias, and GELU by `forward_gelu`, on the fp32 sums). About
        3x the fp32 product's FLOP/s here (docs/measurements.md), and no fp32 copy of W. Not for the LM head
        (`logits=True`): logits rounded to bf16 (about 0.1 at a logit of 30) would move the
        log-probabilities evaluation reports, so the head stays fp32: its widened copy is kept
        between such calls (evaluation scores a window's logits in blocks of rows, and widening
        the 38.6M-weight head for each block cost more than the block's product), which is 154
        MB more for GPT-2 small while evaluating; decoding never makes this call;
      * otherwise, or on CUDA: W widened to fp32 for this call, a block of rows at a time, then
        F.linear (`widened_linear`).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 logits: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.logits = logits
        self._widened: torch.Tensor | None = None   # the LM head's fp32 copy for many-row calls

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, gelu=False)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GPT-2's GELU of `self(x)`; fused into the product where `forward` runs a bf16 product of
        many rows with bf16 W (fused.bf16_linear)."""
        return self._linear(x, gelu=True)

    def _linear(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        decoding = rows.shape[0] <= DECODE_MAX_ROWS
        on_cpu = x.device.type == "cpu" and x.dtype == torch.float32
        finish = fused.gelu_new if gelu else _unchanged
        if on_cpu and decoding and not (torch.is_grad_enabled() and x.requires_grad):
            ops = load_ops()
            if ops is not None:
                if self.scale is None:
                    out = ops.decode_linear_bf16(rows, self.weight, self.bias)
                else:
                    out = ops.decode_linear_int8(rows, self.weight, self.scale, self.bias)
                return finish(out.view(*x.shape[:-1], self.out_features))
        if self.scale is not None and decoding:   # as the compiled int8 op rounds x: the same numbers without it
            x = quantize_activations(x).to(x.dtype)
        elif on_cpu and not self.logits and bf16_matmul_native():
            if self.scale is None:   # GELU fused for many rows; a decoding call keeps it a pass of its own
                return finish(fused.bf16_linear(x, self.weight, self.bias)) if decoding else \
                    fused.bf16_linear(x, self.weight, self.bias, gelu=gelu)
            out = F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16)).float() * self.scale
            return finish(out if self.bias is None else out + self.bias)
        elif self.logits and not decoding:
            return finish(F.linear(x, self.fp32_weight().to(x.dtype), self.bias))
        return finish(widened_linear(x, self.weight, self.scale, self.bias))

    def fp32_weight(self) -> torch.Tensor:
        """W widened to fp32, kept between calls (the LM head's many-row calls; see the class doc)."""
        if self._widened is None or self._widened.device != self.weight.device:
            self._widened = dequantize(self.weight, self.scale)
        return self._widened


def _unchanged(y: torch.Tensor) -> torch.Tensor:
    return y


def widened_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with W widened to x's dtype WIDEN_ROWS output rows at a time: widening the whole
    LM head at once (decoding without the compiled ops) held 2 x 154 MB of fp32 for GPT-2 small,
    more than the int8 model itself; a block holds 12 MB."""
    if weight.shape[0] <= WIDEN_ROWS:
        return F.linear(x, dequantize(weight, scale).to(x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], WIDEN_ROWS):
        rows = slice(start, start + WIDEN_ROWS)
        block = dequantize(weight[rows], None if scale is None else scale[rows]).to(x.dtype)
        out[..., rows] = F.linear(x, block, None if bias is None else bias[rows])
    return out


def bf16_matmul_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16), which oneDNN uses."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


class LowpEmbedding(nn.Module):
    """The token embedding as rows of a stored matrix (shared with a tied LM head), widened on lookup."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).float()
        return rows if self.scale is None else rows * F.embedding(input_ids, self.scale[:, None])


def weights_format(model: nn.Module) -> str:
    """fp32 / bf16 / int8: how `model`'s matrices are stored (its dtype for a plain model)."""
    wte = model.wte
    if isinstance(wte, LowpEmbedding):
        return "bf16" if wte.scale is None else "int8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(wte.weight.dtype, "fp32")


def kernel_report(weights: str) -> str:
    """Which code multiplies by `weights` weights while decoding on this CPU, and why (the probe)."""
    flags = cpu_flags()
    shown = " ".join(f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
                     if f in flags) or "none of avx512f/avx512_bf16/avx512_vnni/amx"
    if weights == "fp32":
        path = "compiled decode op (fp32)" if load_ops() is not None else "F.linear (no compiled ops)"
    elif load_ops() is not None:
        path = f"compiled decode op: {load_ops().decode_kernels()}"
    else:
        path = f"pure PyTorch: widened to fp32 per call, then F.linear ({ops_reason()})"
    return f"{path}; CPU flags: {shown}"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def load_lowp(folder: str | os.PathLike, weights: str) -> GPT:
    """The GPT of a Hugging Face GPT-2 folder with its matrices stored in `weights` (bf16 / int8), on CPU, eval mode.

    The fp32 tensors are read and rounded one at a time (see the module's docstring).
    """
    folder = Path(folder)
    check_weights(weights)
    single = folder / WEIGHTS_NAME
    if not (folder / CONFIG_NAME).is_file() or not single.is_file():
        return to_lowp(load_hf_dir(folder), weights)   # reports a bad folder, or loads another form whole
    config = config_from_hf(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = GPT(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    try:
        with safe_open(str(single), framework="pt") as f:
            found = {our_name(k): tuple(f.get_slice(k).get_shape()[::-1] if our_name(k).endswith(CONV1D_SUFFIXES)
                                        else f.get_slice(k).get_shape())
                     for k in f.keys() if not k.endswith(BUFFER_SUFFIXES)}
    except Exception:   # unreadable: load_hf_dir names the file and what to do
        found = None
    if found != expected:
        return to_lowp(load_hf_dir(folder), weights)   # load_hf_dir says what does not match
    check_saved_architecture(folder, config)
    _fixed_mmap_threshold()
    _make_lowp_modules(model, weights)
    for name, read in _tensor_readers(single):
        _assign(model, name, read, weights)
    if config.tie_word_embeddings:
        model.lm_head = LowpLinear(model.wte.weight, model.wte.scale, None, logits=True)
    check_no_meta(model)
    return model.eval().requires_grad_(False)


def _fixed_mmap_threshold() -> None:
    """Large allocations straight from the OS and back (a fixed 128 KB mmap threshold).

    Why: glibc raises its mmap threshold after each large free, so the next fp32 tensors read for
    rounding come from the heap, where the int8 results kept between them fragment it and the
    freed fp32 bytes stay resident: measured, a GPT-2 small int8 load peaked at 1064 MB resident
    with the default, 455 MB with a fixed threshold (220 MB of it the interpreter and torch).
    """
    return_freed_memory(128 * 1024)


def to_lowp(model: GPT, weights: str) -> GPT:
    """An fp32 GPT with its matrices rounded to `weights`, in place (each fp32 matrix freed as it goes)."""
    tied = model.config.tie_word_embeddings
    model.wte = LowpEmbedding(*quantize_rows(model.wte.weight.detach(), weights))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (tied and child is model.lm_head):
                bias = None if child.bias is None else child.bias.detach()
                setattr(parent, name, LowpLinear(*quantize_rows(child.weight.detach(), weights), bias,
                                                 logits=child is model.lm_head))
    if tied:
        model.lm_head = LowpLinear(model.wte.weight, model.wte.scale, None, logits=True)
    return model.eval().requires_grad_(False)


def our_name(file_name: str) -> str:
    return file_name.removeprefix("transformer.")


def _make_lowp_modules(model: GPT, weights: str) -> None:
    """Swap the meta model's matrices for low-precision modules (still meta; `_assign` fills them)."""
    def placeholder(rows: int, cols: int):
        dtype = torch.bfloat16 if weights == "bf16" else torch.int8
        scale = None if weights == "bf16" else torch.empty(rows, device="meta")
        return torch.empty(rows, cols, dtype=dtype, device="meta"), scale

    model.wte = LowpEmbedding(*placeholder(*model.wte.weight.shape))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else torch.empty(child.bias.shape, device="meta")  # not empty_like:
                # on meta tensors it imports sympy (35 MB resident)
                head = child is model.lm_head
                setattr(parent, name, LowpLinear(*placeholder(*child.weight.shape), bias, logits=head))


def _tensor_readers(path: Path) -> Iterator[tuple[str, object]]:
    """(our name, read(rows=None) -> fp32 tensor in our layout) per weight of a safetensors file,
    read with plain file reads (hf.tensor_readers says why not the memory map)."""
    for file_name, read_stored in tensor_readers(path):
        name = our_name(file_name)
        if name.endswith(BUFFER_SUFFIXES):
            continue

        def read(rows: slice | None = None, read_stored=read_stored, name=name) -> torch.Tensor:
            tensor = read_stored(rows).float()
            return tensor.t().contiguous() if rows is None and name.endswith(CONV1D_SUFFIXES) else tensor
        yield name, read


def _assign(model: GPT, name: str, read, weights: str) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    if attr != "weight" or not isinstance(module, (LowpLinear, LowpEmbedding)):
        module._parameters[attr] = nn.Parameter(read(), requires_grad=False)
        return
    if isinstance(module, LowpEmbedding) or name == "lm_head.weight":
        # Rounded block by block into the final tensors (not a list of blocks then joined, which
        # held the matrix twice: 37 MB more at the peak of an int8 GPT-2 small load).
        rows, cols = module.weight.shape
        module.weight = torch.empty(rows, cols, dtype=torch.bfloat16 if weights == "bf16" else torch.int8)
        module.scale = None if weights == "bf16" else torch.empty(rows)
        for start in range(0, rows, EMBEDDING_ROWS_PER_READ):
            block, scale = quantize_rows(read(slice(start, start + EMBEDDING_ROWS_PER_READ)), weights, overwrite=True)
            module.weight[start:start + len(block)] = block
            if scale is not None:
                module.scale[start:start + len(block)] = scale
        return
    module.weight, module.scale = quantize_rows(read(), weights, overwrite=True)


def lowp_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s weights as stored (a tied matrix once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def check_no_meta(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"tensors missing from the checkpoint: {', '.join(left[:5])}; save the model again")
