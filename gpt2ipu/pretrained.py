"""A model folder (Hugging Face GPT-2 layout: ours, or one a user brings) -> model and tokenizer.

The tokenizer of a folder, first found wins:
1. `bpe_tokenizer` when given (a `tokenizer.json` from `gpt2ipu train-bpe`, for a model trained
   with `tokenize.tokenizer: bpe`);
2. the folder's own `vocab.json` + `merges.txt` (what `save_pretrained` writes): through tiktoken
   when they are GPT-2's official files (checked by sha256), else through the `tokenizers`
   library, since they are then the model's own vocabulary;
3. the folder's own `tokenizer.json`;
4. the project's offline GPT-2 vocabulary (`vocab_dir`, else the usual search; see
   gpt2ipu/data/tokenizer.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from gpt2ipu.data.tokenizer import (
    EOT,
    MERGES_SHA256,
    VOCAB_SHA256,
    TiktokenTokenizer,
    Tokenizer,
    TrainedBPETokenizer,
    gpt2_encoding,
    load_tokenizer,
)
from gpt2ipu.devices import precision_dtype, resolve_device
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import sha256_file
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


class HFBPETokenizer(Tokenizer):
    """A byte-level BPE given as vocab.json + merges.txt that are not GPT-2's own files."""

    def __init__(self, vocab: Path, merges: Path):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise UserError(f"{vocab.parent}: vocab.json + merges.txt cannot be read as a BPE ({err})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos_id = backend.token_to_id(EOT)
        if eos_id is None:
            raise UserError(f"{vocab}: has no {EOT} token, which generation and evaluation need")
        self.backend, self.name, self.eos_id = backend, f"bpe:{vocab.parent.name}", eos_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_model_tokenizer(model_dir: str | os.PathLike, *, vocab_dir: str | os.PathLike | None = None,
                         bpe_tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer that goes with `model_dir` (see the module doc for the order)."""
    model_dir = Path(model_dir)
    if bpe_tokenizer is not None:
        return load_tokenizer(bpe_tokenizer=bpe_tokenizer)
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        if sha256_file(vocab) == VOCAB_SHA256 and sha256_file(merges) == MERGES_SHA256:
            return TiktokenTokenizer(gpt2_encoding(model_dir))
        return HFBPETokenizer(vocab, merges)
    if (model_dir / "tokenizer.json").is_file():
        return TrainedBPETokenizer(model_dir / "tokenizer.json")
    return load_tokenizer(vocab_dir=vocab_dir)


def check_vocab_fits(tokenizer: Tokenizer, model, model_dir: str | os.PathLike) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{model_dir}: the model has {model.config.vocab_size} token embeddings but its "
                        f"tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens; pass the tokenizer "
                        "the model was trained with (--bpe-tokenizer / --vocab-dir)")


def load_pretrained(model_dir, device: str = "auto", precision: str = "fp32", vocab_dir=None, bpe_tokenizer=None):
    """(model, tokenizer, device) for `model_dir`; the tokenizer first, since it fails fastest."""
    tokenizer = load_model_tokenizer(model_dir, vocab_dir=vocab_dir, bpe_tokenizer=bpe_tokenizer)
    device_used = resolve_device(device)
    model = load_model(model_dir, device_used, precision)
    check_vocab_fits(tokenizer, model, model_dir)
    return model, tokenizer, device_used
