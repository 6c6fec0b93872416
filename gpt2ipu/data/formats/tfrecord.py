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
data_pattern "{}.tfrecord" / index_pattern "{}.index" convention of the tfrecord package's docs
(tfrecord2idx's whole-folder mode would name it `<name>.tfindex`; the content is the same).
"""

from __future__ import annotations

import errno
import functools
import os
import re
import struct
from pathlib import Path

import crc32c
import numpy as np

from gpt2ipu.errors import UserError

FEATURE = "input_ids"
_KEY_FIELD = b"\x0a" + bytes([len(FEATURE)]) + FEATURE.encode()
_CRC_MASK = 0xA282EAD8
_ENCODE_TOKENS_PER_CHUNK = 1 << 18  # temporaries of the numpy varint encoder stay in cache
# The shards stage's names: <split>-00000-of-00008.tfrecord, its index beside it as .index.
SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")


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


def encode_varint_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of `rows` ([n, L] integers) as concatenated varints -> (all bytes, bytes of each row).

    Lays every value out as `width` 7-bit groups side by side ([n, L, width] bytes, continuation
    bit set where a higher group follows), then drops the unused high groups in one pass.
    """
    if rows.dtype.kind == "u" and rows.dtype.itemsize <= 4:
        values = rows.astype(np.uint32, copy=False).ravel()
    else:  # negative int64 are varint-encoded modulo 2**64, as protobuf does
        values = np.ascontiguousarray(rows, dtype=np.int64).view(np.uint64).ravel()
    largest = int(values.max(initial=0))
    width = max(1, (largest.bit_length() + 6) // 7)
    # 32-bit arithmetic is about twice as fast as 64-bit, and token ids always fit.
    values = values.astype(np.uint32, copy=False) if largest < (1 << 32) else values
    word = values.dtype.type
    groups = np.empty((len(values), width), dtype=np.uint8)
    used = np.empty((len(values), width), dtype=bool)
    used[:, 0] = True
    for k in range(width):
        group = (values >> word(7 * k)) & word(0x7F)
        if k + 1 < width:
            used[:, k + 1] = values >= word(1 << (7 * (k + 1)))
            group |= used[:, k + 1].astype(values.dtype) << word(7)
        groups[:, k] = group
    row_bytes = np.count_nonzero(used.reshape(len(rows), -1), axis=1)
    return np.compress(used.ravel(), groups.ravel()), row_bytes


def example_header(payload_bytes: int) -> bytes:
    """Everything of one Example before its packed values (see the module docstring)."""
    int64_list = b"\x0a" + varint(payload_bytes)
    feature = b"\x1a" + varint(len(int64_list) + payload_bytes)
    entry = _KEY_FIELD + b"\x12" + varint(len(feature) + len(int64_list) + payload_bytes)
    entry_bytes = len(entry) + len(feature) + len(int64_list) + payload_bytes
    features = b"\x0a" + varint(entry_bytes)
    example = b"\x0a" + varint(len(features) + entry_bytes)
    return example + features + entry + feature + int64_list


@functools.lru_cache(maxsize=8192)
def record_prefix(payload_bytes: int) -> tuple[bytes, int]:
    """(length, length CRC and Example header; CRC32C of the header): all fixed by the payload size.

    Cached because a shard's samples have the same token count, so few payload sizes occur.
    """
    header = example_header(payload_bytes)
    length_bytes = struct.pack("<Q", len(header) + payload_bytes)
    return length_bytes + struct.pack("<I", masked_crc32c(length_bytes)) + header, crc32c.crc32c(header)


def _write_records(data_file, index_lines: list[str], samples: np.ndarray, start: int) -> int:
    """Append the records of `samples` ([n, L]); return the byte offset after them."""
    payload, record_payload_bytes = encode_varint_rows(samples)
    ends = np.cumsum(record_payload_bytes)
    payload_view = memoryview(payload)
    offset = start
    pieces = []
    for end, size in zip(ends.tolist(), record_payload_bytes.tolist()):
        prefix, header_crc = record_prefix(size)
        values = payload_view[end - size : end]
        # The data CRC covers header + values: crc32c continues from the header's CRC, no join needed.
        pieces += (prefix, values, struct.pack("<I", mask_crc(crc32c.crc32c(values, header_crc))))
        record_bytes = len(prefix) + size + 4
        index_lines.append(f"{offset} {record_bytes}\n")
        offset += record_bytes
    chunk = memoryview(b"".join(pieces))   # one big write per chunk of records
    while chunk:   # an unbuffered write may write part of it (a full disk, a size limit) without raising
        written = data_file.write(chunk)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(data_file, "name", "")))
        chunk = chunk[written:]
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
    with open(path, "wb", buffering=0) as data_file:  # unbuffered: we only make big writes
        for first in range(0, len(samples), rows_per_chunk):
            offset = _write_records(data_file, index_lines, samples[first : first + rows_per_chunk], offset)
    index_text = "".join(index_lines)
    with open(index_path, "w", encoding="ascii", newline="\n") as index_file:
        index_file.write(index_text)
    return {"path": str(path), "index_path": str(index_path), "records": len(samples),
            "tokens": int(samples.size), "bytes": offset, "index_bytes": len(index_text)}


def read_tfrecord_samples(path: str | os.PathLike, index_path: str | os.PathLike | None = None) -> np.ndarray:
    """All `input_ids` of a shard, in file order, as an [n, L] int64 array (the tfrecord package reads).

    With `index_path`, the index is also checked against the records (ValueError if it does not
    match). The file is read front to back either way: the package's indexed reader starts at a
    random record, and fails on an index of a single line (its np.loadtxt returns 1-D).
    """
    from tfrecord.reader import tfrecord_loader

    rows = [record[FEATURE] for record in tfrecord_loader(str(path), None, {FEATURE: "int"})]
    if index_path is not None:
        _check_index(path, index_path, len(rows))
    if not rows:
        return np.zeros((0, 0), dtype=np.int64)
    return np.stack(rows)


def read_index(index_path: str | os.PathLike) -> np.ndarray:
    """`.index` text ("offset length" per record) -> [records, 2] int64.

    Parsed with one split instead of np.loadtxt, which is much slower on millions of lines
    (measured: docs/design-measurements.md).
    """
    try:
        numbers = np.array(Path(index_path).read_text(encoding="ascii").split(), dtype=np.int64)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{index_path}: unreadable TFRecord index ({err}); rerun the shards stage") from None
    if numbers.size % 2:
        raise UserError(f"{index_path}: not an 'offset length' per line TFRecord index; rerun the shards stage")
    return numbers.reshape(-1, 2)


def decode_record(raw: bytes, length: int, where: str) -> np.ndarray:
    """One framed record (`length` bytes read at its index offset) -> its `input_ids`, int64.

    Checks the framing and both CRCs (layout at the top of this module); `where` names the record
    in the error.
    """
    from tfrecord import example_pb2

    if len(raw) != length or length < 16:
        raise UserError(f"{where}: file ends early or index is wrong; rerun the shards stage")
    (size,) = struct.unpack_from("<Q", raw, 0)
    (length_crc,) = struct.unpack_from("<I", raw, 8)
    (data_crc,) = struct.unpack_from("<I", raw, length - 4)
    payload = memoryview(raw)[12 : length - 4]
    if size != len(payload) or length_crc != masked_crc32c(raw[:8]) or data_crc != masked_crc32c(payload):
        raise UserError(f"{where}: length or CRC mismatch (corrupt file or stale index); rerun the shards stage")
    example = example_pb2.Example()
    example.ParseFromString(payload)
    if FEATURE not in example.features.feature:
        raise UserError(f"{where}: no int64 feature '{FEATURE}'; rerun the shards stage")
    return np.array(example.features.feature[FEATURE].int64_list.value, dtype=np.int64)


def _check_index(path, index_path, records: int) -> None:
    index = read_index(index_path)
    ends = index[:, 0] + index[:, 1]
    contiguous = np.array_equal(index[:, 0], np.concatenate([[0], ends[:-1]]))
    if len(index) != records or not contiguous or int(ends[-1] if len(ends) else 0) != os.path.getsize(path):
        raise ValueError(f"{index_path}: index does not match the {records} records of {path}")
