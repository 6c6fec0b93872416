import json

import numpy as np
import pytest
import torch

from gpt2ipu.bench.shards import write_with_tfrecord_package
from gpt2ipu.data.formats.megatron import MMapWriter
from gpt2ipu.errors import UserError
from gpt2ipu.train.data import (
    GeneratedSamples,
    MMapSamples,
    ResumableBatches,
    TFRecordSamples,
    epoch_order,
    make_train_dataset,
    rank_slice,
)
from gpt2ipu.train.sample_index import build_sample_idx, build_sample_idx_loop

EOS = 50256
MAX_LEN = 8


def write_tfrecord_shards(folder, split, shards):
    """Shards written with the tfrecord package itself (independent of our shards stage)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(shards):
        write_with_tfrecord_package(folder / f"{split}-{i:05d}-of-{len(shards):05d}.tfrecord", rows)


@pytest.fixture
def tfrecord_rows(tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, (n, MAX_LEN + 1)) for n in (5, 1, 7)]
    write_tfrecord_shards(tmp_path / "shards", "train", shards)
    return tmp_path / "shards", np.concatenate(shards)


def write_documents(prefix, documents):
    with MMapWriter(prefix, np.uint16) as writer:
        for doc in documents:
            writer.add_document(doc)


@pytest.fixture
def mmap_docs(tmp_path):
    rng = np.random.default_rng(1)
    # lengths from 1 (a lone EOS) to several samples long
    documents = [np.append(rng.integers(0, EOS, n), EOS).astype(np.int64)
                 for n in rng.integers(0, 3 * MAX_LEN, 30)]
    write_documents(tmp_path / "train_text_document", documents)
    return tmp_path / "train_text_document", documents


# --- generated --------------------------------------------------------------------------------


def test_generated_samples_depend_on_seed_and_index_only():
    ds = GeneratedSamples(10, MAX_LEN, 100, seed=3)
    backwards = [ds[i] for i in reversed(range(10))][::-1]
    forwards = [GeneratedSamples(10, MAX_LEN, 100, seed=3)[i] for i in range(10)]
    for a, b in zip(backwards, forwards):
        assert a.dtype == np.int64 and a.shape == (MAX_LEN + 1,) and np.array_equal(a, b)
        assert a.min() >= 0 and a.max() < 100
    assert not np.array_equal(ds[0], ds[1])
    assert not np.array_equal(ds[0], GeneratedSamples(10, MAX_LEN, 100, seed=4)[0])
    with pytest.raises(IndexError):
        ds[10]


# --- tfrecord ---------------------------------------------------------------------------------


def test_tfrecord_samples_are_exactly_the_records_in_any_order(tfrecord_rows):
    folder, rows = tfrecord_rows
    ds = TFRecordSamples(folder, "train", MAX_LEN)
    assert len(ds) == len(rows) == 13
    for i in np.random.default_rng(2).permutation(len(rows)):
        sample = ds[i]
        assert sample.dtype == np.int64 and np.array_equal(sample, rows[i])


def test_tfrecord_reads_shards_of_the_shards_stage_writer(tmp_path):
    from gpt2ipu.data.formats.tfrecord import write_tfrecord_shard

    rows = np.random.default_rng(5).integers(0, 50257, (4, MAX_LEN + 1))
    write_tfrecord_shard(tmp_path / "valid-00000-of-00001.tfrecord", rows)
    ds = TFRecordSamples(tmp_path, "valid", MAX_LEN)
    assert np.array_equal(np.stack([ds[i] for i in range(len(ds))]), rows)


def test_tfrecord_missing_split_is_a_user_error(tfrecord_rows):
    folder, _ = tfrecord_rows
    with pytest.raises(UserError, match="no valid TFRecord shards"):
        TFRecordSamples(folder, "valid", MAX_LEN)
    (folder / "train-00001-of-00003.tfrecord").unlink()
    with pytest.raises(UserError, match="incomplete"):
        TFRecordSamples(folder, "train", MAX_LEN)


def test_tfrecord_max_len_mismatch_names_file_and_both_numbers(tfrecord_rows):
    folder, _ = tfrecord_rows
    with pytest.raises(UserError) as err:
        TFRecordSamples(folder, "train", 16)
    message = str(err.value)
    assert "train-00000-of-00003.tfrecord" in message and "max_len 8" in message and "max_len 16" in message
    assert "shards stage" in message


def test_tfrecord_corrupt_record_fails_its_crc(tfrecord_rows):
    folder, _ = tfrecord_rows
    path = folder / "train-00002-of-00003.tfrecord"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # a token byte of the last record
    path.write_bytes(bytes(data))
    ds = TFRecordSamples(folder, "train", MAX_LEN)
    ds[len(ds) - 2]
    with pytest.raises(UserError, match="CRC"):
        ds[len(ds) - 1]


# --- Megatron sample index --------------------------------------------------------------------


@pytest.mark.parametrize("case", range(40))
def test_vectorized_sample_idx_equals_megatron_loop(case):
    rng = np.random.default_rng(case)
    num_docs = int(rng.integers(1, 30))
    # many documents shorter than a sample, some empty, some several samples long
    sizes = rng.integers(0 if case % 3 == 0 else 1, 40, num_docs).astype(np.int32)
    sizes[0] = max(sizes[0], 1) if case % 5 else sizes[0]
    if sizes.sum() == 0:
        sizes[-1] = 1
    seq_length = int(rng.integers(1, 25))
    num_epochs = int(rng.integers(1, 4))
    tokens_per_epoch = int(sizes.astype(np.int64).sum())
    if num_epochs * tokens_per_epoch < 2:
        num_epochs = 2
    doc_idx = np.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)]).astype(np.int32)
    fast = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    slow = build_sample_idx_loop(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    assert fast.dtype == slow.dtype == np.int32
    assert fast.shape == ((num_epochs * tokens_per_epoch - 1) // seq_length + 1, 2)
    assert np.array_equal(fast, slow)


def test_sample_idx_layout_on_a_hand_example():
    sizes = np.array([3, 5, 2], dtype=np.int32)  # stream: a a a | b b b b b | c c
    doc_idx = np.array([0, 1, 2], dtype=np.int32)
    # seq_length 4: samples are stream tokens 0..4 and 4..8; 8..12 would run past the 10 tokens.
    # Position 4 is token 1 of document 1, position 8 token 0 of document 2.
    expected = [[0, 0], [1, 1], [2, 0]]
    assert build_sample_idx(sizes, doc_idx, 4, 1, 10).tolist() == expected
    assert build_sample_idx_loop(sizes, doc_idx, 4, 1, 10).tolist() == expected


# --- Megatron mmap samples --------------------------------------------------------------------


def test_mmap_samples_cover_every_token_of_every_epoch_once(mmap_docs):
    prefix, documents = mmap_docs
    num_epochs = 3
    ds = MMapSamples(prefix, MAX_LEN, num_epochs=num_epochs, seed=7)
    num_docs = len(documents)
    tokens_per_epoch = sum(map(len, documents))
    assert ds.tokens_per_epoch == tokens_per_epoch
    for epoch in range(num_epochs):
        assert sorted(ds.doc_idx[epoch * num_docs : (epoch + 1) * num_docs]) == list(range(num_docs))
    assert not np.array_equal(ds.doc_idx[:num_docs], ds.doc_idx[num_docs : 2 * num_docs])
    stream = np.concatenate([documents[d] for d in ds.doc_idx])
    num_samples = len(ds)
    assert num_samples == (num_epochs * tokens_per_epoch - 1) // MAX_LEN
    assert len(stream) - (num_samples * MAX_LEN + 1) < MAX_LEN  # only a partial sample is dropped
    in_stream_order = [ds.unshuffled(k) for k in range(num_samples)]
    for k, sample in enumerate(in_stream_order):
        assert sample.dtype == np.int64 and np.array_equal(sample, stream[k * MAX_LEN : k * MAX_LEN + MAX_LEN + 1])
    # dropping each sample's last token (the next one's first) leaves the stream exactly once
    rebuilt = np.concatenate([s[:-1] for s in in_stream_order] + [in_stream_order[-1][-1:]])
    assert np.array_equal(rebuilt, stream[: len(rebuilt)])
    assert sorted(ds.shuffle_idx) == list(range(num_samples))
    assert not np.array_equal(ds.shuffle_idx, np.arange(num_samples))
    for i in range(num_samples):
        assert np.array_equal(ds[i], in_stream_order[ds.shuffle_idx[i]])


def test_mmap_samples_are_reproducible_from_the_seed(mmap_docs):
    prefix, _ = mmap_docs
    a, b, c = (MMapSamples(prefix, MAX_LEN, 2, seed) for seed in (1, 1, 2))
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert not all(np.array_equal(a[i], c[i]) for i in range(len(a)))


def test_mmap_too_little_data_is_a_user_error(tmp_path):
    write_documents(tmp_path / "train_text_document", [np.array([1, 2, EOS])])
    with pytest.raises(UserError, match="max_len"):
        MMapSamples(tmp_path / "train_text_document", MAX_LEN, 1, 0)


# --- order, ranks, resume, workers ------------------------------------------------------------


def all_steps(batches):
    return [(s.epoch, s.step, [b.clone() for b in s.micro_batches]) for s in batches]


def test_epoch_order_and_rank_slice():
    a, b = epoch_order(50, 0, 1), epoch_order(50, 1, 1)
    assert sorted(a) == list(range(50)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(50, 0, 1)) and not np.array_equal(a, epoch_order(50, 0, 2))
    assert np.array_equal(epoch_order(5, 3, 1, shuffle=False), np.arange(5))
    batches = np.arange(12).reshape(2, 6)
    assert rank_slice(batches, 1, 3).tolist() == [[2, 3], [8, 9]]
    with pytest.raises(ValueError):
        rank_slice(batches, 0, 4)


def test_steps_drop_the_incomplete_last_global_batch():
    batches = ResumableBatches(GeneratedSamples(43, MAX_LEN, 100), micro_batch=4, grad_accum=2, num_epochs=2)
    assert batches.steps_per_epoch == 5 and batches.total_steps == 10
    steps = all_steps(batches)
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in range(2) for s in range(5)]
    for _, _, micro in steps:
        assert len(micro) == 2 and all(m.dtype == torch.int64 and m.shape == (4, MAX_LEN + 1) for m in micro)
    first_epoch = torch.cat([m for e, _, micro in steps if e == 0 for m in micro])
    assert len({tuple(row.tolist()) for row in first_epoch}) == 40  # no sample twice in an epoch
    assert batches.state_dict()["epoch"] == 2 and list(batches) == []


@pytest.mark.parametrize("layout", [(4, 1), (2, 2)])  # per rank: (micro_batch, grad_accum)
def test_two_ranks_see_the_single_process_batch_of_each_step(layout):
    ds = GeneratedSamples(37, MAX_LEN, 1000, seed=5)
    single = all_steps(ResumableBatches(ds, micro_batch=8, seed=9, num_epochs=2))
    micro_batch, grad_accum = layout
    ranks = [all_steps(ResumableBatches(ds, micro_batch=micro_batch, grad_accum=grad_accum, world_size=2,
                                        rank=r, seed=9, num_epochs=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 8
    for (e, s, [whole]), (e0, s0, part0), (e1, s1, part1) in zip(single, *ranks):
        assert (e, s) == (e0, s0) == (e1, s1)
        assert torch.equal(whole, torch.cat(part0 + part1))  # rank r holds the r-th contiguous half


def test_resume_yields_what_an_uninterrupted_run_would(tfrecord_rows):
    folder, _ = tfrecord_rows
    ds = TFRecordSamples(folder, "train", MAX_LEN)
    options = dict(micro_batch=2, grad_accum=2, seed=4, num_epochs=3)
    uninterrupted = all_steps(ResumableBatches(ds, **options))
    assert len(uninterrupted) == 9
    for stop_after in (0, 2, 3, 7):
        first = ResumableBatches(ds, **options)
        done = []
        for step in first:
            done.append((step.epoch, step.step, step.micro_batches))
            if len(done) == stop_after + 1:
                break
        state = json.loads(json.dumps(first.state_dict()))
        resumed = ResumableBatches(ds, **options)
        resumed.load_state_dict(state)
        rest = all_steps(resumed)
        assert [(e, s) for e, s, _ in done + rest] == [(e, s) for e, s, _ in uninterrupted]
        for (_, _, a), (_, _, b) in zip(done + rest, uninterrupted):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the same position on two ranks with the same global batch
    halves = [ResumableBatches(ds, micro_batch=2, world_size=2, rank=r, seed=4, num_epochs=3, epoch=1, step=1)
              for r in range(2)]
    for whole, part0, part1 in zip(uninterrupted[4:], *map(all_steps, halves)):
        assert torch.equal(torch.cat(whole[2]), torch.cat(part0[2] + part1[2]))
    with pytest.raises(UserError, match="global_batch"):
        ResumableBatches(ds, micro_batch=2, seed=4).load_state_dict(state)


def test_worker_processes_load_the_same_batches(tfrecord_rows, mmap_docs):
    folder, _ = tfrecord_rows
    prefix, _ = mmap_docs
    for ds in (TFRecordSamples(folder, "train", MAX_LEN), MMapSamples(prefix, MAX_LEN, 1, 0)):
        options = dict(micro_batch=3, grad_accum=1, seed=2, num_epochs=2)
        in_process = all_steps(ResumableBatches(ds, **options))
        workers = all_steps(ResumableBatches(ds, num_workers=2, persistent_workers=True, **options))
        assert len(in_process) == len(workers) > 2
        for (e, s, a), (e2, s2, b) in zip(in_process, workers):
            assert (e, s) == (e2, s2) and torch.equal(a[0], b[0])
        # stopping mid-epoch with prefetched batches in flight, then going on, loses and repeats nothing
        with ResumableBatches(ds, num_workers=2, persistent_workers=True, **options) as batches:
            first = next(iter(batches))
            state = batches.state_dict()
            batches.load_state_dict(state)
            rest = all_steps(batches)
        assert torch.equal(first.micro_batches[0], in_process[0][2][0])
        assert [(e, s) for e, s, _ in rest] == [(e, s) for e, s, _ in in_process[1:]]
        assert all(torch.equal(a[0], b[0]) for (_, _, a), (_, _, b) in zip(rest, in_process[1:]))


def test_factory(tfrecord_rows, mmap_docs):
    folder, rows = tfrecord_rows
    prefix, _ = mmap_docs
    generated = make_train_dataset("generated", max_len=MAX_LEN, vocab_size=10, generated_samples=6)
    assert isinstance(generated, GeneratedSamples) and len(generated) == 6 and generated[0].max() < 10
    tfrecord = make_train_dataset("tfrecord", shards_dir=folder, split="train", max_len=MAX_LEN)
    assert np.array_equal(tfrecord[12], rows[12])
    mmap = make_train_dataset("mmap", shards_dir=prefix.parent, split="train", max_len=MAX_LEN, num_epochs=2)
    assert isinstance(mmap, MMapSamples) and mmap.num_epochs == 2
    with pytest.raises(UserError, match="unknown"):
        make_train_dataset("dynamic", max_len=MAX_LEN)


def test_reads_the_shards_stage_output(tmp_path):
    shards = pytest.importorskip("gpt2ipu.data.shards")
    rng = np.random.default_rng(11)
    documents = [np.append(rng.integers(0, EOS, int(rng.integers(1, 60))), EOS) for _ in range(80)]
    write_documents(tmp_path / "part" / "tokens", documents)
    out = tmp_path / "shards"
    shards.shards([tmp_path / "part"], out, max_len=MAX_LEN, valid_fraction=0.1, seed=3, samples_per_shard=40)
    for split in ("train", "valid"):
        packed = make_train_dataset("tfrecord", shards_dir=out, split=split, max_len=MAX_LEN)
        dynamic = make_train_dataset("mmap", shards_dir=out, split=split, max_len=MAX_LEN, seed=1)
        stream = np.concatenate([dynamic._docs()[d] for d in range(len(dynamic._docs()))]).astype(np.int64)
        # the packed samples are the split's documents end to end, cut into windows of max_len + 1
        assert len(packed) == len(stream) // (MAX_LEN + 1) > 0
        for i in range(len(packed)):
            assert np.array_equal(packed[i], stream[i * (MAX_LEN + 1) : (i + 1) * (MAX_LEN + 1)])
        assert len(dynamic) == (len(stream) - 1) // MAX_LEN
    with pytest.raises(UserError, match="max_len 8"):
        make_train_dataset("tfrecord", shards_dir=out, split="train", max_len=MAX_LEN + 1)
