"""Megatron-LM's indexed dataset (`MMapIndexedDataset`) files, written and read byte-compatibly.

A dataset is a pair `<prefix>.bin` / `<prefix>.idx`. Written by hand (a few dozen lines of numpy)
because Megatron itself is not an installable library and its reader needs its whole package.

`<prefix>.bin`: the token ids of every sequence, end to end, as raw little-endian `dtype`
(uint16 when the vocabulary has at most 65535 ids, else int32); no header.

`<prefix>.idx`, byte by byte (all little-endian):

    offset  size        field
    0       9           magic b"MMIDIDX\\x00\\x00"
    9       8   <Q      version = 1
    17      1   <B      dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                        7 float32, 8 uint16
    18      8   <Q      S = number of sequences
    26      8   <Q      D = number of entries of the document index (documents + 1)
    34      4*S int32   sizes: length of each sequence, in tokens
    ..      8*S int64   pointers: byte offset of each sequence in the .bin file
    ..      8*D int64   document index: sequence number where each document starts, then S

Here every document is one sequence (Megatron's convention for GPT data), so the document index
is 0, 1, ..., S.
"""

from __future__ import annotations

import array
import os
import struct
from pathlib import Path

import numpy as np

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


INDEX_CHUNK = 1 << 20  # entries of the pointer and document arrays computed and written at a time


def write_index(idx_path: str | os.PathLike, sizes: np.ndarray, dtype: np.dtype,
                document_index: np.ndarray | None = None) -> None:
    """Write `<prefix>.idx` (layout in the module doc). The int64 arrays are written in chunks, so
    a tokenize job's memory does not grow with its documents beyond `sizes` itself (4 bytes each)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    documents = len(document_index) if document_index is not None else len(sizes) + 1
    with atomic_file(idx_path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", documents))
        f.write(sizes.tobytes(order="C"))
        pointer = 0  # byte offset of the next sequence in the .bin
        for start in range(0, len(sizes), INDEX_CHUNK):
            chunk = sizes[start : start + INDEX_CHUNK].astype(np.int64) * itemsize
            ends = np.cumsum(chunk) + pointer
            f.write((ends - chunk).tobytes(order="C"))
            pointer = int(ends[-1])
        if document_index is not None:
            f.write(np.asarray(document_index, dtype=np.int64).tobytes(order="C"))
        else:
            for start in range(0, documents, INDEX_CHUNK):
                f.write(np.arange(start, min(start + INDEX_CHUNK, documents), dtype=np.int64).tobytes(order="C"))


class MMapWriter:
    """Append documents (1-D integer arrays) to `<prefix>.bin`; `finish()` writes `<prefix>.idx`.

    The .bin is written under a temporary name and both files appear under their final names
    only after `finish()`; used as a context manager, an exception removes the temporary.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.sizes = array.array("i")  # 4 bytes a document: a part's memory does not grow by Python ints
        self._bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self._bin_tmp = self._bin_path.with_name(f".{self._bin_path.name}.{os.getpid()}.tmp")
        self._bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sizes.append(len(tokens))

    def finish(self) -> None:
        self._bin.close()
        write_index(self.prefix.with_name(self.prefix.name + ".idx"), np.frombuffer(self.sizes, dtype=np.int32),
                    self.dtype)
        os.replace(self._bin_tmp, self._bin_path)

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> MMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class MMapIndexedDataset:
    """Read-only view of `<prefix>.bin/.idx`: `len(ds)`, `ds[i]` -> tokens of sequence i."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise UserError(f"{path}: Megatron dataset file is missing; rerun the stage that writes it")
        with open(idx_path, "rb") as f:   # the header only: the index itself is memory-mapped below
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic); rerun the stage that writes it")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION or code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_BYTES
        self.sizes = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=offset)
        offset += 4 * n_seq
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=offset)
        offset += 8 * n_seq
        self.document_index = np.frombuffer(index, dtype=np.int64, count=n_doc, offset=offset)
        # np.memmap cannot map an empty file; an empty dataset is still a valid one.
        self.tokens = (np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_path.stat().st_size
                       else np.zeros(0, dtype=self.dtype))
        expected = int(self.sizes.astype(np.int64).sum())
        if self.tokens.size != expected:
            raise UserError(f"{bin_path}: holds {self.tokens.size} tokens but its index says {expected}; "
                            "rerun the stage that writes it")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence i (Megatron's `get`)."""
        doc = self[i]
        end = len(doc) if length is None else offset + length
        return doc[offset:end]
