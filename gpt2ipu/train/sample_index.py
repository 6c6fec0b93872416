"""Megatron's sample index: where each training sample starts in the shuffled document stream.

Three implementations of one definition (`build_sample_idx_numpy`'s docstring): the compiled op
(custom_ops/sample_index.cpp), used when `gpt2ipu.ops` has a build loaded; a vectorized numpy
version, the fallback; and Megatron's own token-walking loop, the reference of the tests and the
baseline of `gpt2ipu bench sample_index`.
"""

from __future__ import annotations

import numpy as np

from gpt2ipu.ops import load_ops

_INT32_MAX = np.iinfo(np.int32).max

def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """Where each sample starts in the document stream: Megatron's `helpers.cpp build_sample_idx`.

    The compiled op (custom_ops/sample_index.cpp) when `gpt2ipu.ops.load_ops()` finds it, else
    `build_sample_idx_numpy`; both return the same array (layout and dtype below).
    """
    num_samples = _num_samples(seq_length, num_epochs, tokens_per_epoch)
    compiled = compiled_sample_idx(sizes, doc_idx, seq_length, num_samples)
    if compiled is not None:
        return compiled
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)


def build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                           tokens_per_epoch: int) -> np.ndarray:
    """Where each sample starts in the document stream: Megatron's `helpers.cpp build_sample_idx`.

    The stream is the documents `doc_idx[0], doc_idx[1], ...` end to end (`sizes[d]` tokens each).
    Returns `sample_idx`, shape [num_samples + 1, 2], with

        num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
        sample_idx[k] = (p, o): stream position k * seq_length is token o of document doc_idx[p]

    Sample k is the seq_length + 1 tokens from sample_idx[k] to sample_idx[k + 1] inclusive, so
    consecutive samples share one token (the last label of one is the first input of the next)
    and the final partial sample is dropped. Row 0 is always (0, 0). Where a position falls
    between documents it belongs to the next non-empty one (empty documents are skipped).

    dtype: int32 when len(doc_idx) <= 2**31 - 1 (offsets always fit, sizes being int32), else
    int64; the compiled version must return the same values and dtype.

    Vectorized (cumsum + searchsorted) instead of Megatron's token-walking loop, which takes
    minutes in Python at 1e8 tokens; `build_sample_idx_loop` is that loop, and the tests prove
    the two equal.
    """
    num_samples, doc_sizes = _sample_idx_inputs(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    ends = np.cumsum(doc_sizes)
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    doc_positions = np.searchsorted(ends, positions, side="right")
    sample_idx = np.zeros((num_samples + 1, 2), dtype=_sample_idx_dtype(doc_idx))
    sample_idx[1:, 0] = doc_positions
    sample_idx[1:, 1] = positions - (ends[doc_positions] - doc_sizes[doc_positions])
    return sample_idx


def build_sample_idx_loop(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                          tokens_per_epoch: int) -> np.ndarray:
    """Megatron's numpy reference `_build_sample_idx` (gpt_dataset.py; its helpers.cpp `build_sample_idx`
    is the C++ port), line for line, one token run at a time: the plain reference of the tests and
    the baseline of `gpt2ipu bench sample_index`."""
    num_samples, _ = _sample_idx_inputs(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    sample_idx = np.zeros((num_samples + 1, 2), dtype=_sample_idx_dtype(doc_idx))
    doc_idx_index, doc_offset = 0, 0
    for sample_index in range(1, num_samples + 1):
        remaining_seq_length = seq_length + 1
        while remaining_seq_length != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining_seq_length -= doc_length
            if remaining_seq_length <= 0:
                # -1: the sample's last token is also the next sample's first
                doc_offset += remaining_seq_length + doc_length - 1
                remaining_seq_length = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
    return sample_idx


def _num_samples(seq_length, num_epochs, tokens_per_epoch) -> int:
    if seq_length < 1 or num_epochs < 1 or tokens_per_epoch < 1:
        raise ValueError(f"need seq_length, num_epochs, tokens_per_epoch >= 1, got "
                         f"{seq_length}, {num_epochs}, {tokens_per_epoch}")
    return (num_epochs * tokens_per_epoch - 1) // seq_length


def _sample_idx_inputs(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    num_samples = _num_samples(seq_length, num_epochs, tokens_per_epoch)
    doc_sizes = np.asarray(sizes)[np.asarray(doc_idx)].astype(np.int64)
    if num_samples * seq_length + 1 > int(doc_sizes.sum()):
        raise ValueError(f"doc_idx holds {int(doc_sizes.sum())} tokens, fewer than num_epochs * "
                         f"tokens_per_epoch = {num_epochs * tokens_per_epoch}")
    return num_samples, doc_sizes


def _sample_idx_dtype(doc_idx) -> np.dtype:
    return np.dtype(np.int32 if len(doc_idx) <= _INT32_MAX else np.int64)


def compiled_sample_idx(sizes, doc_idx, seq_length: int, num_samples: int):
    """The compiled `build_sample_idx` ([num_samples + 1, 2] numpy array), or None without the ops.

    Raises ValueError when doc_idx holds too few tokens, IndexError for a doc_idx entry that is
    not a document, as the numpy reference does.
    """
    namespace = load_ops()
    if namespace is None:
        return None
    import numpy as np
    import torch

    doc_idx = np.asarray(doc_idx)
    if doc_idx.dtype not in (np.int32, np.int64):
        doc_idx = doc_idx.astype(np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    return namespace.build_sample_idx(torch.from_numpy(sizes), torch.from_numpy(np.ascontiguousarray(doc_idx)),
                                      int(seq_length), int(num_samples)).numpy()
