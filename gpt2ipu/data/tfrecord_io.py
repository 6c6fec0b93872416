"""TFRecord shards of `tf.train.Example` records holding one int64 feature, `input_ids`.

Written by hand, not through the `tfrecord` package's `TFRecordWriter`: that writer builds and
serializes one protobuf message per record from a Python list, which costs far more than the
bytes themselves (see `gpt2ipu bench shards`). The record layout for a single packed int64 list
is small and fixed, so we varint-encode all samples of a shard at once with numpy and only frame
and checksum records in Python. The bytes are identical to `TFRecordWriter`'s (tests check it),
and the files are read with the `tfrecord` package.

A TFRecord file is a sequence of records, each (little-endian):

    size  field
    8     <Q    n = length of the serialized Example
    4     <I    masked CRC32C of those 8 length bytes
    n           the serialized Example
    4     <I    masked CRC32C of the n Example bytes

masked CRC = ((crc >> 15 | crc << 17) + 0xA282EAD8) mod 2**32, crc = CRC32C (Castagnoli), as
TensorFlow and `tfrecord.writer.TFRecordWriter.masked_crc` (via the `crc32c` package) compute it.

The Example, for values v_1..v_L (protobuf wire format; `varint(x)` is x in 7-bit groups, low
group first, high bit set on every byte but the last; negative int64 are taken modulo 2**64):

    bytes                    field
    0x0A varint(S)           Example.features          (field 1, length-delimited), S bytes:
      0x0A varint(E)           Features.feature map entry (field 1, length-delimited), E bytes:
        0x0A 0x09 "input_ids"    entry key              (field 1, 9-byte string)
        0x12 varint(F)           entry value: Feature   (field 2, length-delimited), F bytes:
          0x1A varint(I)           Feature.int64_list    (field 3, length-delimited), I bytes:
            0x0A varint(P)           Int64List.value, packed (field 1, length-delimited), P bytes:
              varint(v_1) ... varint(v_L)

    P = sum of the varint lengths of the values   I = 1 + len(varint(P)) + P
    F = 1 + len(varint(I)) + I                    E = 11 + 1 + len(varint(F)) + F
    S = 1 + len(varint(E)) + E                    n = 1 + len(varint(S)) + S

Index file (what `tfrecord.tools.tfrecord2idx.create_index` writes, and what the `tfrecord`
package's readers take as `index_path`): one text line per record, "<start byte> <record bytes
including framing>\\n". A shard `<name>.tfrecord` has its index at `<name>.index`, the
data_pattern "{}.tfrecord" / index_pattern "{}.index" convention of the tfrecord package's docs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import crc32c
import numpy as np

FEATURE = "input_ids"
_KEY_FIELD = b"\x0a" + bytes([len(FEATURE)]) + FEATURE.encode()
_CRC_MASK = 0xA282EAD8
_WRITE_BUFFER_BYTES = 16 << 20
_ENCODE_TOKENS_PER_CHUNK = 1 << 20  # bounds the temporary arrays of the numpy varint encoder


def index_path_for(tfrecord_path: str | os.PathLike) -> Path:
    """`x/train-00000-of-00004.tfrecord` -> `x/train-00000-of-00004.index`."""
    path = Path(tfrecord_path)
    return path.with_suffix(".index") if path.suffix == ".tfrecord" else path.with_name(path.name + ".index")


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK) & 0xFFFFFFFF


def masked_crc32c(data) -> int:
    return mask_crc(crc32c.crc32c(data))


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each value takes as a protobuf varint (1..10), for uint64 `values`."""
    lengths = np.ones(values.shape, dtype=np.uint8)
    for group in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * group))
    return lengths


def encode_varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All `values` (1-D uint64) as concatenated varints -> (bytes as uint8 array, length of each)."""
    lengths = varint_lengths(values)
    width = int(lengths.max(initial=1))
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(7)
    groups = ((values[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    group_index = np.arange(width, dtype=np.uint8)
    groups[group_index < lengths[:, None] - 1] |= 0x80
    return groups[group_index < lengths[:, None]], lengths


def example_header(payload_bytes: int) -> bytes:
    """Everything of one Example before its packed values (see the module docstring)."""
    int64_list = b"\x0a" + varint(payload_bytes)
    feature = b"\x1a" + varint(len(int64_list) + payload_bytes)
    entry = _KEY_FIELD + b"\x12" + varint(len(feature) + len(int64_list) + payload_bytes)
    entry_bytes = len(entry) + len(feature) + len(int64_list) + payload_bytes
    features = b"\x0a" + varint(entry_bytes)
    example = b"\x0a" + varint(len(features) + entry_bytes)
    return example + features + entry + feature + int64_list


def _write_records(data_file, index_lines: list[str], samples: np.ndarray, start: int) -> int:
    """Append the records of `samples` ([n, L]); return the byte offset after them."""
    payload, lengths = encode_varints(np.ascontiguousarray(samples).astype(np.int64).view(np.uint64).ravel())
    record_payload_bytes = lengths.reshape(samples.shape).sum(axis=1, dtype=np.int64)
    ends = np.cumsum(record_payload_bytes)
    payload_view = memoryview(payload)
    offset = start
    pieces = []
    for end, size in zip(ends.tolist(), record_payload_bytes.tolist()):
        header = example_header(size)
        values = payload_view[end - size : end]
        length_bytes = struct.pack("<Q", len(header) + size)
        # CRC of header + values without joining them: crc32c continues from a start value.
        data_crc = mask_crc(crc32c.crc32c(values, crc32c.crc32c(header)))
        pieces += (length_bytes, struct.pack("<I", masked_crc32c(length_bytes)), header, values,
                   struct.pack("<I", data_crc))
        record_bytes = 16 + len(header) + size
        index_lines.append(f"{offset} {record_bytes}\n")
        offset += record_bytes
    data_file.writelines(pieces)
    return offset


def write_tfrecord_shard(path: str | os.PathLike, samples: np.ndarray) -> dict:
    """Write `samples` ([n, L] integers) as `path` (one Example per row) and its `.index` file.

    Returns {"path", "index_path", "records", "tokens", "bytes", "index_bytes"}. The caller
    makes the pair atomic (the shards stage writes into an atomic folder).
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] == 0 or not np.issubdtype(samples.dtype, np.integer):
        raise ValueError(f"samples must be a non-empty [n, L] integer array, got {samples.dtype} {samples.shape}")
    path = Path(path)
    index_path = index_path_for(path)
    rows_per_chunk = max(1, _ENCODE_TOKENS_PER_CHUNK // samples.shape[1])
    index_lines: list[str] = []
    offset = 0
    with open(path, "wb", buffering=_WRITE_BUFFER_BYTES) as data_file:
        for first in range(0, len(samples), rows_per_chunk):
            offset = _write_records(data_file, index_lines, samples[first : first + rows_per_chunk], offset)
    index_text = "".join(index_lines)
    with open(index_path, "w", encoding="ascii", newline="\n") as index_file:
        index_file.write(index_text)
    return {"path": str(path), "index_path": str(index_path), "records": len(samples),
            "tokens": int(samples.size), "bytes": offset, "index_bytes": len(index_text)}


def read_tfrecord_samples(path: str | os.PathLike, index_path: str | os.PathLike | None = None) -> np.ndarray:
    """All `input_ids` of a shard, in file order, as an [n, L] int64 array (the tfrecord package reads).

    With `index_path`, the index is checked against the records first. The file is still read
    front to back: the package's indexed reader starts at a random record, and fails on an index
    of a single line (np.loadtxt returns 1-D).
    """
    from tfrecord.reader import tfrecord_loader

    rows = [record[FEATURE] for record in tfrecord_loader(str(path), None, {FEATURE: "int"})]
    if index_path is not None:
        _check_index(path, index_path, len(rows))
    if not rows:
        return np.zeros((0, 0), dtype=np.int64)
    return np.stack(rows)


def _check_index(path, index_path, records: int) -> None:
    index = np.loadtxt(index_path, dtype=np.int64, ndmin=2)
    starts, sizes = (index[:, 0], index[:, 1]) if index.size else (np.zeros(0, np.int64),) * 2
    contiguous = len(starts) == 0 or (starts[0] == 0 and np.array_equal(starts[1:], (starts + sizes)[:-1]))
    total = int(sizes.sum()) if len(sizes) else 0
    if len(starts) != records or not contiguous or total != os.path.getsize(path):
        raise ValueError(f"{index_path}: index does not match the {records} records of {path}")
