"""`gpt2ipu bench shards`: packed samples -> TFRecord shard + index, ours vs the tfrecord package.

ours: `gpt2ipu.data.formats.tfrecord.write_tfrecord_shard` (numpy varint encoding, hand-framed records).
tfrecord_writer: `tfrecord.TFRecordWriter.write` once per sample (protobuf serialization of each
record from a Python list), then `tfrecord.tools.tfrecord2idx.create_index`.
Both must decode to the same samples; whether the files are byte-identical is reported too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from gpt2ipu.bench.common import median_seconds, report
from gpt2ipu.data.formats.tfrecord import read_tfrecord_samples, write_tfrecord_shard
from gpt2ipu.log import package_logger

log = package_logger(__name__)

VOCAB_SIZE = 50257


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=2000, help="samples in the shard")
    parser.add_argument("--max-len", type=int, default=1024, help="samples hold max_len + 1 tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each writer (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")


def write_with_tfrecord_package(path: Path, samples: np.ndarray) -> None:
    from tfrecord.tools.tfrecord2idx import create_index
    from tfrecord.writer import TFRecordWriter

    writer = TFRecordWriter(str(path))
    for sample in samples:
        writer.write({"input_ids": (sample.tolist(), "int")})
    writer.close()
    create_index(str(path), str(path.with_suffix(".index")))


def run(args: argparse.Namespace) -> dict:
    samples = np.random.default_rng(args.seed).integers(0, VOCAB_SIZE, size=(args.samples, args.max_len + 1),
                                                        dtype=np.uint16)
    megabytes = samples.size * 2 / 1e6
    with tempfile.TemporaryDirectory(prefix="gpt2ipu-bench-shards-") as tmp:
        ours_path, theirs_path = Path(tmp) / "ours.tfrecord", Path(tmp) / "theirs.tfrecord"
        log.info(f"bench shards: {args.samples} samples x {args.max_len + 1} tokens, {args.repeats} repeats")
        ours = median_seconds(lambda: write_tfrecord_shard(ours_path, samples), args.repeats)
        theirs = median_seconds(lambda: write_with_tfrecord_package(theirs_path, samples), args.repeats)
        decoded_ours = read_tfrecord_samples(ours_path, ours_path.with_suffix(".index"))
        decoded_theirs = read_tfrecord_samples(theirs_path, theirs_path.with_suffix(".index"))
        if not (np.array_equal(decoded_ours, samples) and np.array_equal(decoded_theirs, samples)):
            raise AssertionError("the two writers' shards do not decode to the same samples")
        byte_identical = {
            "tfrecord": ours_path.read_bytes() == theirs_path.read_bytes(),
            "index": ours_path.with_suffix(".index").read_bytes() == theirs_path.with_suffix(".index").read_bytes(),
        }
    return report(
        megabytes / ours, "MB/s",
        {"tfrecord_writer": megabytes / theirs},
        seconds={"ours": ours, "tfrecord_writer": theirs},
        decoded_equal=True,
        byte_identical=byte_identical,
        samples=args.samples,
        max_len=args.max_len,
        repeats=args.repeats,
        note=("MB of token data = samples * (max_len + 1) * 2 bytes (uint16 token ids), 1 MB = 1e6 bytes; "
              "time covers the .tfrecord file and its .index; random token ids in [0, 50257); medians"),
    )
