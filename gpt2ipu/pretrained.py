"""A model folder (Hugging Face GPT-2 layout: ours, or one a user brings) -> model and tokenizer.

Where a folder is expected, a Hugging Face hub id (`gpt2`, `openai-community/gpt2`) also works:
its snapshot is taken from the local hub cache, or downloaded unless `HF_HUB_OFFLINE` is set.

Which tokenizer a folder gets is decided by `gpt2ipu.data.tokenizer.load_tokenizer` (its
docstring gives the order: `bpe_tokenizer`, the folder's own vocabulary, GPT-2's offline one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from gpt2ipu.data.tokenizer import Tokenizer, hf_cache_roots, load_tokenizer
from gpt2ipu.devices import precision_dtype, resolve_device
from gpt2ipu.errors import UserError
from gpt2ipu.model.hf import load_hf_dir
from gpt2ipu.model.lowp import check_weights, load_lowp

# "name" or "owner/name", as the hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What loading needs from a hub repository: not its other frameworks' weights.
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
             "vocab.json", "merges.txt", "tokenizer.json", "generation_config.json"]


def resolve_model_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` itself when it is a folder (or cannot be a hub id); else the hub snapshot of that id."""
    path = Path(model_dir)
    if path.is_dir() or not HUB_ID.fullmatch(str(model_dir)):
        return path
    return hub_snapshot(str(model_dir))


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of hub model `repo_id`: cached, or downloaded when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    hub_errors = (OSError, ValueError, HfHubHTTPError)
    for cache in hf_cache_roots():
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=HUB_FILES))
        except hub_errors:
            continue
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        except hub_errors as err:
            reason = f"downloading it failed ({type(err).__name__})"
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise UserError(f"{repo_id}: no such model folder, and no Hugging Face hub snapshot of it in the local cache "
                    f"({', '.join(map(str, hf_cache_roots()))}) while {reason}; pass a model folder, or fetch the "
                    "model once with network access")


def load_model(model_dir: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "fp32",
               weights: str = "fp32"):
    """The GPT of a Hugging Face GPT-2 folder, in eval mode, on `device`, weights in `precision`.

    weights bf16 / int8: the matrices stored in that format, computed in fp32
    (gpt2ipu/model/lowp.py); `precision` must then be fp32.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found; train one (snakemake pretrain_small) or "
                        "point to a Hugging Face GPT-2 folder")
    check_weights(weights, precision)
    device = resolve_device(device) if isinstance(device, str) else device
    if weights != "fp32":
        return load_lowp(model_dir, weights).to(device)
    model = load_hf_dir(model_dir)
    return model.to(device=device, dtype=precision_dtype(precision)).eval().requires_grad_(False)


def check_vocab_fits(tokenizer: Tokenizer, model, model_dir: str | os.PathLike) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{model_dir}: the model has {model.config.vocab_size} token embeddings but its "
                        f"tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens; pass the tokenizer "
                        "the model was trained with (--bpe-tokenizer / --vocab-dir)")


def load_pretrained(model_dir, device: str = "auto", precision: str = "fp32", vocab_dir=None, bpe_tokenizer=None,
                    weights: str = "fp32"):
    """(model, tokenizer, device) for `model_dir` (a folder or a hub id); the tokenizer first, since it
    fails fastest."""
    model_dir = resolve_model_dir(model_dir)
    tokenizer = load_tokenizer(vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer, model_dir=model_dir)
    device_used = resolve_device(device)
    model = load_model(model_dir, device_used, precision, weights)
    check_vocab_fits(tokenizer, model, model_dir)
    return model, tokenizer, device_used
