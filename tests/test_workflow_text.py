"""The workflow on datasets text and hf: the user's own files, or a Hub dataset through a local stand-in for
the Hub's HTTP API (HF_ENDPOINT), through tokenize -> shards, reruns, a replaced file, offline.

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


# --- dataset hf, against a local stand-in for the Hub's HTTP API (HF_ENDPOINT) ------------------

HUB_SHA = "a" * 40


def hub_stand_in(root, configs):
    """A threaded HTTP server answering the three Hub calls the hf dataset makes, over `root`'s files."""
    import hashlib
    import http.server
    import threading
    from urllib.parse import unquote, urlparse

    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, body: bytes, headers: dict, code: int = 200, with_body: bool = True):
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def _route(self, with_body: bool):
            path = unquote(urlparse(self.path).path)
            if path.startswith("/api/datasets/") and "/revision/" in path:
                body = json.dumps({"id": "owner/web", "sha": HUB_SHA, "cardData": {"configs": configs},
                                   "siblings": [{"rfilename": name} for name in files]}).encode()
                return self._send(body, {"Content-Type": "application/json"}, with_body=with_body)
            if path.startswith("/api/datasets/") and "/tree/" in path:
                entries = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": "0" * 40,
                            "lfs": {"oid": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                                    "pointerSize": 130}} for name, p in files.items()]
                return self._send(json.dumps(entries).encode(), {"Content-Type": "application/json"},
                                  with_body=with_body)
            marker = f"/resolve/{HUB_SHA}/"
            if path.startswith("/datasets/") and marker in path:
                name = path.split(marker, 1)[1]
                if name in files:
                    data = files[name].read_bytes()
                    return self._send(data, {"X-Repo-Commit": HUB_SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                             "Content-Length": str(len(data))}, with_body=with_body)
            self._send(b'{"error": "not found"}', {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"},
                       code=404, with_body=with_body)

        def do_GET(self):
            self._route(True)

        def do_HEAD(self):
            self._route(False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_dataset_downloads_into_the_cache_and_trains_on_pinned_files(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    for i in range(3):
        write_sample_corpus(root / "sample" / "10BT" / f"{i:03d}_00000.parquet", documents=300, seed=10 + i)
    write_sample_corpus(root / "data" / "other.parquet", documents=50, seed=99)
    server = hub_stand_in(root, [{"config_name": "sample-10BT",
                                  "data_files": [{"split": "train", "path": "sample/10BT/*"}]}])
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        (tmp_path / "wf").mkdir()
        workdir = make_workdir(tmp_path / "wf", {"dataset": "hf", "hf": {
            "repo": "owner/web", "subset": "sample-10BT", "split": "train", "max_files": 2}})
        first = snakemake(workdir, "data")
        manifest = json.loads((workdir / "results/data/hf/dump/manifest.json").read_text())
        assert manifest["revision"] == HUB_SHA and len(manifest["parts"]) == 2
        assert jobs_run(first).count("dump_part") == 2 and jobs_run(first).count("tokenize") == 2
        assert json.loads((workdir / "results/data/hf/shards/stats.json").read_text())["articles"] == 600
        assert list((tmp_path / "hf-cache").glob("datasets--owner--web/blobs/*"))
        again = snakemake(workdir, "data")
        assert "Nothing to be done" in again.stdout + again.stderr
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a fresh manifest offline: one message, no traceback
    (tmp_path / "wf2").mkdir()
    other = make_workdir(tmp_path / "wf2", {"dataset": "hf", "hf": {"repo": "owner/web", "subset": "sample-10BT"}})
    result = snakemake(other, "data", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "HF_HUB_OFFLINE is set" in output and "Traceback" not in output
