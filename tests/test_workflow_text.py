"""The workflow on dataset text: the user's own files through tokenize -> shards, reruns, a replaced file.

Uses the copies of the workflow that tests/test_workflow.py makes (its helpers), on a generated corpus.
"""

import json

import pytest
from test_workflow import jobs_run, make_workdir, snakemake

from gpt2ipu.data.formats.megatron import MMapIndexedDataset
from gpt2ipu.data.sample_text import write_sample_corpus

pytestmark = pytest.mark.slow


def test_text_corpus_chain_reruns_nothing_then_only_a_replaced_files_part(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "web").mkdir(parents=True)
    write_sample_corpus(corpus / "a.parquet", documents=600, seed=1)
    write_sample_corpus(corpus / "web" / "b.parquet", documents=500, seed=2)
    write_sample_corpus(corpus / "web" / "c.jsonl.gz", documents=300, seed=3)
    write_sample_corpus(corpus / "d.jsonl", documents=300, seed=4)   # about 380 kB: split into 4 byte ranges
    (tmp_path / "wf").mkdir()
    workdir = make_workdir(tmp_path / "wf", {"dataset": "text", "text": {"paths": [str(corpus)],
                                                                           "part_bytes": 100_000}})
    first = snakemake(workdir, "data")
    manifest = json.loads((workdir / "results/data/text/dump/manifest.json").read_text())
    names = [part["name"] for part in manifest["parts"]]
    assert names[:5] == ["a.parquet", "d.jsonl.0001", "d.jsonl.0002", "d.jsonl.0003", "d.jsonl.0004"]
    assert names[5:] == ["web-b.parquet", "web-c.jsonl.gz"]
    assert jobs_run(first).count("tokenize") == len(names) and "extract" not in jobs_run(first)
    stats = json.loads((workdir / "results/data/text/shards/stats.json").read_text())
    assert stats["articles"] == 600 + 500 + 300 + 300 and stats["empty_documents"] == 0
    assert stats["train_samples"] > 0 and stats["valid_samples"] > 0
    d_documents = sum(len(MMapIndexedDataset(workdir / f"results/data/text/tokens/{name}/tokens"))
                      for name in names if name.startswith("d.jsonl"))
    assert d_documents == 300  # every line of the split file in exactly one part

    again = snakemake(workdir, "data")
    assert "Nothing to be done" in again.stdout + again.stderr

    write_sample_corpus(corpus / "web" / "b.parquet", documents=450, seed=22)  # replaced by other content
    third = snakemake(workdir, "data")
    assert jobs_run(third).count("tokenize") == 1, jobs_run(third)
    assert json.loads((workdir / "results/data/text/shards/stats.json").read_text())["articles"] == 1650


def test_a_corpus_file_without_the_text_field_stops_with_one_message(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "x.jsonl").write_text('{"body": "no text field here"}\n')
    (tmp_path / "wf").mkdir()
    workdir = make_workdir(tmp_path / "wf", {"dataset": "text", "text": {"paths": [str(tmp_path / "corpus")]}})
    result = snakemake(workdir, "data", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert 'x.jsonl:1: has no "text" field (its fields: body)' in output and "Traceback" not in output
    assert not (workdir / "results/data/text/tokens/x.jsonl").exists()
