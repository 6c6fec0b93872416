import json
from pathlib import Path

import numpy as np
import pytest
from tfrecord.reader import tfrecord_loader
from tfrecord.tools.tfrecord2idx import create_index
from tfrecord.torch.dataset import MultiTFRecordDataset, TFRecordDataset

from gpt2ipu.bench.shards import write_with_tfrecord_package
from gpt2ipu.cli import main
from gpt2ipu.data import shards as shards_stage
from gpt2ipu.data.formats.megatron import MMapIndexedDataset, MMapWriter
from gpt2ipu.data.formats.tfrecord import read_tfrecord_samples, write_tfrecord_shard
from gpt2ipu.data.shards import balanced_shard_sizes
from gpt2ipu.errors import UserError
from gpt2ipu.provenance import write_provenance

EOS = 50256
EDGE_VALUES = [0, 1, 127, 128, 16383, 16384, EOS, 65535]


def random_samples(n, length, seed=0):
    samples = np.random.default_rng(seed).integers(0, EOS + 1, size=(n, length)).astype(np.uint16)
    samples[0, : len(EDGE_VALUES)] = EDGE_VALUES
    return samples


@pytest.mark.parametrize("samples", [
    random_samples(50, 65),
    np.array([[-1, 2**40, -(2**63), 2**63 - 1, 0]], dtype=np.int64),
    np.zeros((3, 1), dtype=np.int32),
], ids=["tokens", "int64-extremes", "single-zero"])
def test_shard_bytes_equal_tfrecord_writer_and_tfrecord2idx(tmp_path, samples):
    info = write_tfrecord_shard(tmp_path / "ours.tfrecord", samples)
    write_with_tfrecord_package(tmp_path / "theirs.tfrecord", samples)   # the tfrecord package's own writer
    create_index(str(tmp_path / "ours.tfrecord"), str(tmp_path / "from_tool.index"))

    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "theirs.tfrecord").read_bytes()
    assert Path(info["index_path"]) == tmp_path / "ours.index"
    assert (tmp_path / "ours.index").read_bytes() == (tmp_path / "from_tool.index").read_bytes()
    assert info["records"] == len(samples) and info["bytes"] == (tmp_path / "ours.tfrecord").stat().st_size
    np.testing.assert_array_equal(read_tfrecord_samples(tmp_path / "ours.tfrecord", tmp_path / "ours.index"), samples)


def test_tfrecord_dataset_reads_every_sample_through_our_index(tmp_path):
    samples = random_samples(40, 33, seed=1)
    path = tmp_path / "s.tfrecord"
    write_tfrecord_shard(path, samples)

    rows = [r["input_ids"] for r in TFRecordDataset(str(path), str(tmp_path / "s.index"), {"input_ids": "int"})]
    # With an index and no worker sharding, the package starts at a random record and wraps round.
    start = next(i for i, s in enumerate(samples) if np.array_equal(s, rows[0]))
    np.testing.assert_array_equal(np.stack(rows), np.roll(samples, -start, axis=0))

    for shard_count in (1, 3):
        parts = [[r["input_ids"] for r in tfrecord_loader(str(path), str(tmp_path / "s.index"), {"input_ids": "int"},
                                                          shard=(i, shard_count))] for i in range(shard_count)]
        np.testing.assert_array_equal(np.stack([row for part in parts for row in part]), samples)


def test_read_rejects_index_of_another_file(tmp_path):
    write_tfrecord_shard(tmp_path / "a.tfrecord", random_samples(5, 9))
    write_tfrecord_shard(tmp_path / "b.tfrecord", random_samples(6, 9))
    with pytest.raises(ValueError, match="b.index"):
        read_tfrecord_samples(tmp_path / "a.tfrecord", tmp_path / "b.index")


def make_documents(n, seed, first_id=0):
    """Documents of random length, each ending in EOS, each starting with its own id so it can be recognized."""
    rng = np.random.default_rng(seed)
    docs = []
    for doc_id in range(first_id, first_id + n):
        body = rng.integers(0, EOS, size=int(rng.integers(1, 120)))
        docs.append(np.concatenate([[doc_id], body, [EOS]]).astype(np.uint16))
    return docs


def make_token_part(folder: Path, docs, provenance=True) -> Path:
    with MMapWriter(folder / "tokens", np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    if provenance:
        tokens = int(sum(len(d) for d in docs))
        write_provenance(folder, "tokenize", {}, [], {
            "articles": len(docs), "tokens": tokens, "input_bytes": 1000 + tokens, "output_bytes": 2 * tokens,
            "dump_bytes": 500,
        })
    return folder


@pytest.fixture
def parts(tmp_path):
    docs = [make_documents(60, 1, 0), make_documents(45, 2, 60), make_documents(70, 3, 105)]
    folders = [make_token_part(tmp_path / f"part{i}", d) for i, d in enumerate(docs)]
    return folders, [d for part in docs for d in part]


SETTINGS = dict(max_len=31, valid_fraction=0.1, seed=7, samples_per_shard=50)


def read_split(out: Path, split: str, stats: dict):
    shards = [read_tfrecord_samples(out / name, (out / name).with_suffix(".index"))
              for name in stats["shard_files"][split]]
    return shards, MMapIndexedDataset(out / f"{split}_text_document")


def test_run_shards_splits_by_document_and_packs_every_token(tmp_path, parts):
    folders, all_docs = parts
    out = tmp_path / "shards"
    stats = shards_stage.shards(folders, out, **SETTINGS)
    assert json.loads((out / "stats.json").read_text()) == stats
    assert (out / "provenance.json").is_file()
    sample_len = SETTINGS["max_len"] + 1
    assert stats["articles"] == len(all_docs) and stats["tokens"] == sum(map(len, all_docs))

    seen_ids = {}
    for split in ("train", "valid"):
        shards, mmap = read_split(out, split, stats)
        docs = [np.asarray(mmap[i]) for i in range(len(mmap))]
        ids = [int(d[0]) for d in docs]
        assert ids == sorted(ids), "documents keep their original order inside a split"
        for doc in docs:
            np.testing.assert_array_equal(doc, all_docs[int(doc[0])])
        seen_ids[split] = set(ids)

        stream = np.concatenate(docs)
        samples = np.concatenate(shards)
        assert samples.shape == (stats[f"{split}_samples"], sample_len)
        np.testing.assert_array_equal(samples.ravel(), stream[: samples.size])
        assert stats[f"{split}_documents"] == len(docs)
        assert stats[f"{split}_tokens"] == len(stream) == mmap.tokens.size
        assert stats[f"{split}_tfrecord_tokens"] == samples.size
        assert stats[f"{split}_dropped_tokens"] == len(stream) - samples.size < sample_len
        assert [len(s) for s in shards] == balanced_shard_sizes(len(samples), SETTINGS["samples_per_shard"])
        n = stats["shards"][split]
        assert stats["shard_files"][split] == [f"{split}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]

    assert not seen_ids["train"] & seen_ids["valid"]
    assert seen_ids["train"] | seen_ids["valid"] == set(range(len(all_docs)))
    assert len(seen_ids["valid"]) == round(0.1 * len(all_docs))
    assert stats["bytes"]["dump"] == 1500 and stats["bytes"]["extract"] == 3000 + stats["tokens"]
    assert stats["bytes"]["tokens"] == 2 * stats["tokens"]
    assert stats["bytes"]["mmap"] == sum(p.stat().st_size for p in out.glob("*_text_document.*"))
    assert stats["bytes"]["tfrecord"] == sum(p.stat().st_size for p in out.glob("*-of-*.*"))

    pattern_rows = list(MultiTFRecordDataset(str(out / "{}.tfrecord"), str(out / "{}.index"),
                                             {name[: -len(".tfrecord")]: 1.0 for name in stats["shard_files"]["train"]},
                                             {"input_ids": "int"}, infinite=False))
    assert len(pattern_rows) == stats["train_samples"]


def test_rerun_is_byte_identical_and_seed_changes_the_split(tmp_path, parts):
    folders, _ = parts
    first, second, other_seed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shards_stage.shards(folders, first, **SETTINGS)
    shards_stage.shards(folders, second, **SETTINGS)
    files = sorted(p.name for p in first.iterdir() if p.name != "provenance.json")
    assert files == sorted(p.name for p in second.iterdir() if p.name != "provenance.json")
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    shards_stage.shards(folders, other_seed, **{**SETTINGS, "seed": 8})
    assert (first / "valid_text_document.bin").read_bytes() != (other_seed / "valid_text_document.bin").read_bytes()

    shards_stage.shards(folders, first, **{**SETTINGS, "max_len": 15})  # replaces the folder as a whole
    assert json.loads((first / "stats.json").read_text())["max_len"] == 15
    assert not list(tmp_path.glob(".a.*"))


def test_tiny_valid_fraction_still_gets_one_document_and_zero_gets_no_valid_split(tmp_path):
    docs = make_documents(3, 4) + [np.full(200, 5, dtype=np.uint16)]
    folder = make_token_part(tmp_path / "p", docs, provenance=False)
    stats = shards_stage.shards([folder], tmp_path / "tiny", max_len=3, valid_fraction=1e-6, seed=0,
                                samples_per_shard=10)
    assert stats["valid_documents"] == 1 and stats["train_documents"] == 3
    assert stats["bytes"]["dump"] is None and stats["bytes"]["extract"] is None

    stats = shards_stage.shards([folder], tmp_path / "none", max_len=3, valid_fraction=0.0, seed=0,
                                samples_per_shard=10)
    assert stats["valid_samples"] == 0 and stats["train_documents"] == 4
    assert not list((tmp_path / "none").glob("valid*"))


def test_errors_are_user_errors_and_leave_nothing_behind(tmp_path, parts):
    folders, _ = parts
    out = tmp_path / "out"
    with pytest.raises(UserError, match="missing.*does not exist"):
        shards_stage.shards([tmp_path / "missing"], out, **SETTINGS)
    with pytest.raises(UserError, match="max_len"):
        shards_stage.shards(folders, out, **{**SETTINGS, "max_len": 100_000})
    with pytest.raises(UserError, match="valid split.*valid_fraction"):
        shards_stage.shards(folders, out, **{**SETTINGS, "max_len": 2000, "valid_fraction": 0.01})
    with pytest.raises(UserError, match="valid_fraction"):
        shards_stage.shards(folders, out, **{**SETTINGS, "valid_fraction": 1.0})

    (folders[1] / "tokens.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 30)
    with pytest.raises(UserError, match="part1"):
        shards_stage.shards(folders, out, **SETTINGS)
    (folders[2] / "tokens.bin").unlink()
    with pytest.raises(UserError, match="part2"):
        shards_stage.shards([folders[0], folders[2]], out, **SETTINGS)

    provenance = json.loads((folders[0] / "provenance.json").read_text())
    provenance["figures"]["tokens"] += 1
    (folders[0] / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(UserError, match="provenance.json says"):
        shards_stage.shards(folders[:1], out, **SETTINGS)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli(tmp_path, parts, capsys):
    folders, _ = parts
    args = ["shards", "--tokens", *map(str, folders), "--out-dir", str(tmp_path / "cli"), "--max-len", "31",
            "--valid-fraction", "0.1", "--seed", "7", "--samples-per-shard", "50"]
    assert main(args) == 0
    assert json.loads((tmp_path / "cli" / "stats.json").read_text())["shards"]["train"] >= 1
    assert main([*args[:-1], "0"]) == 2
    assert "samples_per_shard" in capsys.readouterr().err
