"""A model folder (Hugging Face GPT-2 layout: ours, or one a user brings) -> model and tokenizer.

Which tokenizer a folder gets is decided by `gpt2ipu.data.tokenizer.load_tokenizer` (its
docstring gives the order: `bpe_tokenizer`, the folder's own vocabulary, GPT-2's offline one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gpt2ipu.data.tokenizer import Tokenizer, load_tokenizer
from gpt2ipu.devices import precision_dtype, resolve_device
from gpt2ipu.errors import UserError
from gpt2ipu.model.hf import load_hf_dir


def load_model(model_dir: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "fp32"):
    """The GPT of a Hugging Face GPT-2 folder, in eval mode, on `device`, weights in `precision`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found; train one (snakemake pretrain_small) or "
                        "point to a Hugging Face GPT-2 folder")
    device = resolve_device(device) if isinstance(device, str) else device
    model = load_hf_dir(model_dir)
    return model.to(device=device, dtype=precision_dtype(precision)).eval().requires_grad_(False)


def check_vocab_fits(tokenizer: Tokenizer, model, model_dir: str | os.PathLike) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{model_dir}: the model has {model.config.vocab_size} token embeddings but its "
                        f"tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens; pass the tokenizer "
                        "the model was trained with (--bpe-tokenizer / --vocab-dir)")


def load_pretrained(model_dir, device: str = "auto", precision: str = "fp32", vocab_dir=None, bpe_tokenizer=None):
    """(model, tokenizer, device) for `model_dir`; the tokenizer first, since it fails fastest."""
    tokenizer = load_tokenizer(vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer, model_dir=model_dir)
    device_used = resolve_device(device)
    model = load_model(model_dir, device_used, precision)
    check_vocab_fits(tokenizer, model, model_dir)
    return model, tokenizer, device_used
