"""Training samples and the order in which each rank reads them.

A *sample source* is map-style: `len(ds)` samples, `ds[i]` -> a 1-D int64 numpy array of
`max_len + 1` tokens (the trainer takes inputs `s[:-1]` and labels `s[1:]`). Three of them:

- `GeneratedSamples`: random tokens (the original's mock data), sample i a pure function of (seed, i).
- `TFRecordSamples`: the packed samples of the shards stage's TFRecord shards, fetched by global
  index through the `.index` byte offsets.
- `MMapSamples`: Megatron's GPT dataset over `{split}_text_document.bin/.idx`: documents in a seeded
  shuffled order per epoch, cut into samples of `max_len + 1` tokens at any length (the original's
  "dynamic" path), then shuffled.

Because every source is random access and every order below is a pure function of (seed, epoch),
sharding across ranks and DataLoader workers needs no coordination, and resuming at (epoch, step)
is exact: `ResumableBatches` rebuilds the same order and starts at the step.

Global batch of one optimizer step = micro_batch * grad_accum * world_size consecutive samples of
the epoch's order; rank r takes the r-th contiguous 1/world_size of it, and its j-th micro-batch is
the j-th contiguous micro_batch of that. So one process with a global batch of B and two ranks
with micro-batches of B/2 update the model from exactly the same samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gpt2ipu.data.formats.megatron import MMapIndexedDataset
from gpt2ipu.data.formats.tfrecord import SHARD_NAME, decode_record, read_index
from gpt2ipu.errors import UserError
from gpt2ipu.train.sample_index import build_sample_idx

_INT32_MAX = np.iinfo(np.int32).max


# Distinct seed streams, so that e.g. the document order of epoch 0 never equals the sample order.
_STREAM_GENERATED = 0


_STREAM_EPOCH_ORDER = 1


_STREAM_DOC_ORDER = 2


_STREAM_SAMPLE_SHUFFLE = 3


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *map(int, keys)])


class GeneratedSamples:
    """`num_samples` samples of uniform random tokens in [0, vocab_size), sample i from (seed, i) only."""

    def __init__(self, num_samples: int, max_len: int, vocab_size: int, seed: int = 0):
        if num_samples < 1 or max_len < 1 or vocab_size < 1:
            raise UserError(f"generated data needs positive num_samples, max_len and vocab_size, "
                            f"got {num_samples}, {max_len}, {vocab_size}")
        self.num_samples, self.max_len, self.vocab_size, self.seed = num_samples, max_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = _check_index(i, self.num_samples)
        return _rng(self.seed, _STREAM_GENERATED, i).integers(0, self.vocab_size, self.max_len + 1, dtype=np.int64)


def _check_index(i, n: int) -> int:
    i = int(i)
    if not 0 <= i < n:
        raise IndexError(f"sample {i} out of range [0, {n})")
    return i


class TFRecordSamples:
    """The records of `{shards_dir}/{split}-XXXXX-of-NNNNN.tfrecord`, in shard then file order.

    Sample i is read by its byte offset from the shard's `.index` (one pread, CRC check, protobuf
    decode), so any sample is fetched in O(1) without reading the ones before it. The tfrecord
    package's readers only stream a file (from a random record when given an index), which cannot
    serve a fixed global order; we still use its protobuf classes to decode.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str, max_len: int):
        self.shards_dir, self.split, self.max_len = Path(shards_dir), split, int(max_len)
        self.paths = self._find_shards()
        counts = []
        self._offsets, self._lengths = [], []
        for path in self.paths:
            index = read_index(path.with_suffix(".index"))
            self._offsets.append(np.ascontiguousarray(index[:, 0]))
            self._lengths.append(np.ascontiguousarray(index[:, 1]))
            counts.append(len(index))
        # first global sample index of each shard, and the total at the end
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise UserError(f"{self.shards_dir}: the {split} shards hold no records; rerun the shards stage")
        self._files: dict[int, int] = {}
        self._pid = None
        self._check_max_len()

    def _find_shards(self) -> list[Path]:
        found = {}
        totals = set()
        for path in self.shards_dir.glob(f"{self.split}-*-of-*.tfrecord"):
            match = SHARD_NAME.match(path.name)
            if match and match["split"] == self.split:
                found[int(match["i"])] = path
                totals.add(int(match["n"]))
        if not found:
            raise UserError(f"{self.shards_dir}: no {self.split} TFRecord shards "
                            f"({self.split}-00000-of-NNNNN.tfrecord); run the shards stage first")
        if len(totals) != 1 or sorted(found) != list(range(totals.pop())):
            names = ", ".join(sorted(p.name for p in found.values()))
            raise UserError(f"{self.shards_dir}: the {self.split} shards are an incomplete or mixed set "
                            f"({names}); rerun the shards stage")
        paths = [found[i] for i in sorted(found)]
        for path in paths:
            if not path.with_suffix(".index").is_file():
                raise UserError(f"{path.with_suffix('.index')}: index of {path.name} is missing; "
                                "rerun the shards stage")
        return paths

    def _check_max_len(self) -> None:
        # One record per shard: a shard written with another max_len fails here, before training.
        for shard, offsets in enumerate(self._offsets):
            if len(offsets):
                self._read(shard, 0)
        self._close()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        i = _check_index(i, len(self))
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._read(shard, i - int(self._starts[shard]))

    def _fd(self, shard: int) -> int:
        # DataLoader workers fork: a descriptor inherited from the parent shares nothing harmful
        # with pread, but we reopen per process so that each one owns and closes its own.
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]

    def _close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files, self._pid = {}, None

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass

    def __getstate__(self):
        # A spawned worker gets a copy without descriptors and opens its own.
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _read(self, shard: int, record: int) -> np.ndarray:
        path = self.paths[shard]
        offset, length = int(self._offsets[shard][record]), int(self._lengths[shard][record])
        tokens = decode_record(os.pread(self._fd(shard), length, offset), length,
                               where=f"{path}: record {record} at byte {offset}")
        if len(tokens) != self.max_len + 1:
            raise UserError(
                f"{path}: records hold {len(tokens)} tokens (max_len {len(tokens) - 1}) but training uses "
                f"max_len {self.max_len} ({self.max_len + 1} tokens per sample); rerun the shards stage with "
                f"the training recipe's max_len ({self.max_len})")
        return tokens


def build_doc_idx(num_docs: int, num_epochs: int, seed: int) -> np.ndarray:
    """Concatenation over epochs of a seeded permutation of the documents (int32 when it fits).

    Megatron shuffles all epochs' copies together; a permutation per epoch instead keeps every
    epoch a full pass over every document, which is what `num_epochs` promises.
    """
    dtype = np.int32 if num_docs <= _INT32_MAX else np.int64
    return np.concatenate([_rng(seed, _STREAM_DOC_ORDER, epoch).permutation(num_docs).astype(dtype)
                           for epoch in range(num_epochs)])


class MMapSamples:
    """Megatron's GPT dataset over `{prefix}.bin/.idx`: `num_epochs` shuffled passes over the documents.

    doc_idx = `build_doc_idx` (a permutation of the documents per epoch), sample_idx =
    `build_sample_idx` (samples of max_len + 1 tokens, overlapping by one), and sample i is
    sample `shuffle_idx[i]`, shuffle_idx a seeded permutation. Samples span document boundaries
    (EOS tokens between articles stay in), like the packed TFRecord samples.

    The index arrays are built in memory at construction (well under a second for 1e8 tokens), not
    cached as .npy files as Megatron does; only the token file is memory-mapped, per process.
    """

    def __init__(self, prefix: str | os.PathLike, max_len: int, num_epochs: int = 1, seed: int = 0):
        self.prefix, self.max_len, self.num_epochs, self.seed = Path(prefix), int(max_len), int(num_epochs), seed
        if self.max_len < 1 or self.num_epochs < 1:
            raise UserError(f"mmap data needs max_len >= 1 and num_epochs >= 1, got {max_len}, {num_epochs}")
        documents = MMapIndexedDataset(self.prefix)
        sizes = np.array(documents.sizes, dtype=np.int32)
        self.tokens_per_epoch = int(sizes.astype(np.int64).sum())
        if self.tokens_per_epoch * self.num_epochs < self.max_len + 1:
            raise UserError(f"{self.prefix}.bin: {self.tokens_per_epoch} tokens x {self.num_epochs} epochs "
                            f"is less than one sample of max_len + 1 = {self.max_len + 1} tokens; "
                            f"use more data, more epochs or a smaller max_len")
        self.doc_idx = build_doc_idx(len(sizes), self.num_epochs, seed)
        self.sample_idx = build_sample_idx(sizes, self.doc_idx, self.max_len, self.num_epochs,
                                           self.tokens_per_epoch)
        self.shuffle_idx = _rng(seed, _STREAM_SAMPLE_SHUFFLE).permutation(len(self.sample_idx) - 1)
        self._documents, self._pid = documents, os.getpid()

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def _docs(self) -> MMapIndexedDataset:
        # Mapped per process: a worker spawned rather than forked must not receive the token array.
        if self._pid != os.getpid():
            self._documents, self._pid = MMapIndexedDataset(self.prefix), os.getpid()
        return self._documents

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_documents"], state["_pid"] = None, None
        return state

    def __getitem__(self, i: int) -> np.ndarray:
        return self.unshuffled(int(self.shuffle_idx[_check_index(i, len(self))]))

    def unshuffled(self, k: int) -> np.ndarray:
        """Sample k in stream order (Megatron's GPTDataset.__getitem__ after the shuffle)."""
        docs = self._docs()
        first_pos, first_offset = self.sample_idx[k].tolist()
        last_pos, last_offset = self.sample_idx[k + 1].tolist()
        if first_pos == last_pos:
            pieces = [docs.get(int(self.doc_idx[first_pos]), first_offset, last_offset - first_offset + 1)]
        else:
            pieces = [docs.get(int(self.doc_idx[first_pos]), first_offset)]
            pieces += [docs[int(self.doc_idx[p])] for p in range(first_pos + 1, last_pos)]
            pieces.append(docs.get(int(self.doc_idx[last_pos]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)


def make_train_dataset(kind: str, *, shards_dir: str | os.PathLike | None = None, split: str = "train",
                       max_len: int, vocab_size: int = 50257, seed: int = 0, num_epochs: int = 1,
                       generated_samples: int = 1024):
    """The sample source of `--dataset kind`: "generated", "tfrecord" or "mmap".

    tfrecord/mmap read `shards_dir` (the shards stage's output); `num_epochs` is used by mmap only
    (passes over the documents built into the dataset), `vocab_size` and `generated_samples` by
    generated only; `seed` seeds generated tokens and mmap's document and sample shuffles.
    """
    if kind == "generated":
        return GeneratedSamples(generated_samples, max_len, vocab_size, seed)
    if kind not in ("tfrecord", "mmap"):
        raise UserError(f"dataset kind {kind!r} unknown; use generated, tfrecord or mmap")
    if shards_dir is None:
        raise UserError(f"dataset {kind} needs the shards folder (shards_dir)")
    if kind == "tfrecord":
        return TFRecordSamples(shards_dir, split, max_len)
    return MMapSamples(Path(shards_dir) / f"{split}_text_document", max_len, num_epochs, seed)


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The order of all sample indices in `epoch`: a permutation seeded by (seed, epoch), int64."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return _rng(seed, _STREAM_EPOCH_ORDER, epoch).permutation(num_samples).astype(np.int64)


def rank_slice(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous 1/world_size of each global batch along the last axis.

    `order` is one global batch [B] or several [steps, B]; B must divide by world_size.
    """
    order = np.asarray(order)
    width = order.shape[-1]
    if not 0 <= rank < world_size or width % world_size:
        raise ValueError(f"cannot give rank {rank} of {world_size} an equal part of a batch of {width}")
    part = width // world_size
    return order[..., rank * part : (rank + 1) * part]


class TrainStep(NamedTuple):
    epoch: int
    step: int  # within the epoch
    micro_batches: list  # grad_accum tensors, int64 [micro_batch, max_len + 1]


def _collate(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples).astype(np.int64, copy=False))


class BatchPlan:
    """Which samples each rank reads at each step: pure arithmetic on (seed, epoch, step)."""

    def __init__(self, num_samples: int, *, micro_batch: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, shuffle: bool):
        self.num_samples, self.micro_batch, self.grad_accum = num_samples, micro_batch, grad_accum
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        self._order_cache: tuple[int, np.ndarray] | None = None

    def global_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices of optimizer step `step` of `epoch`, all ranks: [global_batch]."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.num_samples, epoch, self.seed, self.shuffle))
        return self._order_cache[1][step * self.global_batch : (step + 1) * self.global_batch]

    def micro_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """This rank's sample indices of that step: [grad_accum, micro_batch]."""
        mine = rank_slice(self.global_batch_indices(epoch, step), self.rank, self.world_size)
        return mine.reshape(self.grad_accum, self.micro_batch)


class _RankBatchSampler:
    """DataLoader batch_sampler: this rank's micro-batches of one epoch from a start step.

    Mutable so that one DataLoader (and its persistent workers) serves every epoch; the DataLoader
    iterates it in the main process each time it is iterated.
    """

    def __init__(self, plan: BatchPlan):
        self.plan, self.epoch, self.start_step = plan, 0, 0

    def __iter__(self):
        for step in range(self.start_step, self.plan.steps_per_epoch):
            yield from self.plan.micro_batch_indices(self.epoch, step).tolist()

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.grad_accum


class ResumableBatches:
    """This rank's micro-batches, step by step, from a resumable (epoch, step) position.

    Iterating yields `TrainStep(epoch, step, micro_batches)` for every remaining optimizer step
    of epochs `epoch .. num_epochs - 1`; `micro_batches` are `grad_accum` int64 tensors
    [micro_batch, max_len + 1] loaded by a torch DataLoader (`num_workers` processes). Each epoch
    holds len(dataset) // global_batch steps (the incomplete last global batch is dropped).

    Position: `state_dict()` -> {"epoch", "step", "seed", "global_batch", "num_samples"} (plain
    ints, JSON-able) is the next step not yet yielded; it advances as each TrainStep is handed
    out, so a checkpoint saved after training on a step resumes at the one after it.
    `load_state_dict(state)` (or the `epoch`/`step` arguments) moves there; the following
    iteration yields exactly what an uninterrupted run would have. world_size, micro_batch and
    grad_accum may change across a resume as long as the global batch stays the same.
    """

    def __init__(self, dataset, *, micro_batch: int, grad_accum: int = 1, world_size: int = 1, rank: int = 0,
                 seed: int = 0, num_epochs: int = 1, shuffle: bool = True, num_workers: int = 0,
                 persistent_workers: bool = False, epoch: int = 0, step: int = 0):
        if micro_batch < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad batch layout: micro_batch {micro_batch}, grad_accum {grad_accum}, "
                            f"rank {rank} of world_size {world_size}")
        self.dataset, self.grad_accum, self.seed, self.num_epochs = dataset, grad_accum, seed, num_epochs
        self.plan = BatchPlan(len(dataset), micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                              rank=rank, seed=seed, shuffle=shuffle)
        self.global_batch, self.steps_per_epoch = self.plan.global_batch, self.plan.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {len(dataset)} samples, fewer than one global batch of "
                            f"{self.global_batch} (batch size {micro_batch} x gradient accumulation {grad_accum} "
                            f"x replicas {world_size}); use more data or a smaller batch")
        self._loader_options = dict(num_workers=num_workers, persistent_workers=persistent_workers and num_workers > 0)
        self._loader = None
        self.epoch, self.step = 0, 0
        self._seek(epoch, step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def _seek(self, epoch: int, step: int) -> None:
        if not (0 <= step <= self.steps_per_epoch and epoch >= 0):
            raise UserError(f"data position epoch {epoch} step {step} is outside an epoch of "
                            f"{self.steps_per_epoch} steps")
        self.epoch, self.step = (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

    def _data_loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._sampler = _RankBatchSampler(self.plan)
            # The loader's own generator: a DataLoader iterator otherwise draws its base seed from
            # torch's global RNG, which would make the model's RNG stream depend on when the
            # iterator was created (and so break exact resume).
            self._loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self._sampler,
                                                       collate_fn=_collate,
                                                       generator=torch.Generator().manual_seed(self.seed),
                                                       **self._loader_options)
        return self._loader

    def __iter__(self) -> Iterator[TrainStep]:
        while self.epoch < self.num_epochs:
            epoch, first_step = self.epoch, self.step
            loader = self._data_loader()
            self._sampler.epoch, self._sampler.start_step = epoch, first_step
            micro_batches = iter(loader)
            for step in range(first_step, self.steps_per_epoch):
                batches = [next(micro_batches) for _ in range(self.grad_accum)]
                self._seek(epoch, step + 1)
                yield TrainStep(epoch, step, batches)
        self.close()

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (also done after the last epoch, and on exit).

        Persistent workers otherwise live as long as this object; a later iteration starts new ones.
        """
        self._loader = None  # its iterator's finalizer shuts the workers down

    def __enter__(self) -> ResumableBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "global_batch": self.global_batch, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("global_batch", self.global_batch),
                          ("num_samples", len(self.dataset))):
            if key in state and int(state[key]) != mine:
                raise UserError(f"cannot resume the data position: the checkpoint has {key} {state[key]}, "
                                f"this run {mine}; resume with the checkpoint's data, seed and global batch")
        self._seek(int(state["epoch"]), int(state["step"]))
