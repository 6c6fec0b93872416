"""Compiled custom ops (custom_ops/*.cpp): build them (`build`), load them (`load`), check a build (`selfcheck`).

Ops registered with PyTorch's dispatcher as `torch.ops.gpt2ipu.*`, each called from the code that
uses it, with a pure fallback there:

  * `lm_loss`: the fused LM-head cross-entropy and its gradients (gpt2ipu/model/loss.py's
    `fused_lm_loss`): tokens in blocks of about 128 MB of logits, each row swept through the
    vocabulary in chunks with an online log-sum-exp; never the whole [N, V] logits.
  * `build_sample_idx`: Megatron's sample index (gpt2ipu/train/sample_index.py).
  * `decode_step`: a whole decode step of GPT-2 on CPU in one call (gpt2ipu/generate/decode.py's
    `FusedDecoder`), over fp32, bf16 or int8 weights.
  * `decode_linear`: x W^T + b for the few rows decoding feeds, streaming the weights at memory
    speed (gpt2ipu/generate/decode.py); `decode_linear_bf16` and `decode_linear_int8` the same over
    bf16 or per-row-scaled int8 weights (gpt2ipu/model/lowp.py), `decode_kernels` says which loops
    they run on this CPU. `reference.quantize_activations` is their int8 rounding of x in PyTorch.

Nothing here imports torch at import time: the Snakefile imports `build_key`.
"""

from gpt2ipu.ops.build import (
           OPS_DIR_ENV,
           build_key,
           build_ops,
           find_source_dir,
           read_status,
           ready_ops_dir,
           source_files,
)
from gpt2ipu.ops.load import load_ops, loaded_ops, ops_reason

__all__ = ["OPS_DIR_ENV", "build_key", "build_ops", "find_source_dir", "load_ops", "loaded_ops", "ops_reason",
           "read_status", "ready_ops_dir", "source_files"]
