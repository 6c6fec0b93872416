"""Dataset text and hf: finding corpus files, cutting them into parts, reading their documents in every
format, the errors a bad file gets, the Hub manifest and download (against a local stand-in: no test
touches the network), and the shards stage's max_tokens cap."""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt2ipu.data import hub
from gpt2ipu.data.corpus import DocumentReader, Piece, TextFields, find_corpus_files, pieces_from_manifest, plan_parts
from gpt2ipu.data.dump import dump_manifest, dump_part
from gpt2ipu.data.formats.megatron import MMapIndexedDataset
from gpt2ipu.data.sample_text import sample_documents, write_sample_corpus
from gpt2ipu.data.shards import shards
from gpt2ipu.data.tokenize import tokenize
from gpt2ipu.data.tokenizer import load_tokenizer
from gpt2ipu.errors import UserError

FORMATS = ("parquet", "jsonl", "jsonl.gz", "jsonl.zst")


def read_all(pieces, fields=None, include_title=True, batch_bytes=1 << 16):
    reader = DocumentReader(list(pieces), fields or TextFields(), include_title)
    return [text for batch in reader.batches(batch_bytes) for text in batch], reader.counts


def texts_of(documents: int, seed: int = 1) -> list[str]:
    return [record["text"] for record in sample_documents(documents, seed)]


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_generated_documents_in_order(tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    write_sample_corpus(path, documents=300, seed=5)
    texts, counts = read_all([Piece(str(path), fmt)])
    assert texts == texts_of(300, 5) and counts.documents == 300 and counts.empty_documents == 0
    titled, _ = read_all([Piece(str(path), fmt)], TextFields(title="title"))
    first = next(sample_documents(1, 5))
    assert titled[0] == f"{first['title']}\n\n{first['text']}"


def test_txt_as_one_document_per_file_or_per_line(tmp_path):
    (tmp_path / "one.txt").write_text("Line one.\n\nLine two.\n", encoding="utf-8")
    assert read_all([Piece(str(tmp_path / "one.txt"), "txt")])[0] == ["Line one.\n\nLine two.\n"]
    lines, counts = read_all([Piece(str(tmp_path / "one.txt"), "txt")], TextFields(txt_unit="line"))
    assert lines == ["Line one.\n", "Line two.\n"] and counts.documents == 2


def test_empty_documents_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["kept", "", "   \n", None, "also kept"]}), tmp_path / "e.parquet")
    texts, counts = read_all([Piece(str(tmp_path / "e.parquet"), "parquet")])
    assert texts == ["kept", "also kept"] and counts.empty_documents == 3
    lines = [{"text": "a"}, {"text": ""}, {"text": None}, {"text": "b"}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    texts, counts = read_all([Piece(str(tmp_path / "e.jsonl"), "jsonl")])
    assert texts == ["a", "b"] and counts.empty_documents == 2


# --- bad input: one message naming the file and where ----------------------------------------


def test_parquet_without_the_text_column_names_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r'c.parquet: has no column "text" \(config key text.text_field\); '
                                        r"its columns: content, url"):
        read_all([Piece(str(tmp_path / "c.parquet"), "parquet")])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r'column "text" holds int64, not strings'):
        read_all([Piece(str(tmp_path / "n.parquet"), "parquet")])


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"bad.jsonl:3: not a JSON line"),
    ('["a", "list"]', r"bad.jsonl:3: a JSON list, not an object"),
    ('{"body": "x"}', r'bad.jsonl:3: has no "text" field \(its fields: body\)'),
    ('{"text": 5, "id": "r7"}', r"bad.jsonl:3: field \"text\" holds a int, not a string \(record id='r7'\)"),
])
def test_bad_json_lines_are_named_by_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n' + bad + "\n")
    with pytest.raises(UserError, match=message):
        read_all([Piece(str(path), "jsonl")], TextFields(id="id"))


def test_a_bad_line_in_a_later_byte_range_gets_its_true_line_number(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(200)]
    lines[150] = "oops"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    with pytest.raises(UserError, match=r"big.jsonl:151: not a JSON line"):
        read_all([Piece(str(path), "jsonl", size // 2, size)])


def test_gzip_line_errors_count_lines_too(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "a"}\n{"text": "b"}\nnope\n')
    with pytest.raises(UserError, match=r"bad.jsonl.gz:3: not a JSON line"):
        read_all([Piece(str(path), "jsonl.gz")])


def test_non_utf8_text_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nCafé\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte offset 14\)"):
        read_all([Piece(str(path), "txt")])
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte offset 14\)"):
        read_all([Piece(str(path), "txt")], TextFields(txt_unit="line"))


def test_paths_that_match_nothing_or_an_unknown_format_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"missing.jsonl \(config key text.paths\) does not exist"):
        find_corpus_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"notes.csv \(config key text.paths\): unknown format"):
        find_corpus_files([str(tmp_path / "notes.csv")])
    with pytest.raises(UserError, match=r"matches no file"):
        find_corpus_files([str(tmp_path / "*.parquet")])
    with pytest.raises(UserError, match=r"config key text.paths is empty"):
        find_corpus_files([])


# --- parts ------------------------------------------------------------------------------------


def test_folders_and_globs_and_the_same_content_twice(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_sample_corpus(tmp_path / "d" / "a.jsonl", documents=20, seed=1)
    write_sample_corpus(tmp_path / "d" / "sub" / "b.parquet", documents=20, seed=2)
    (tmp_path / "d" / "readme.md").write_text("not a corpus file")
    found = find_corpus_files([str(tmp_path / "d"), str(tmp_path / "d" / "*.jsonl")])
    assert [p.name for p in found] == ["a.jsonl", "b.parquet"]
    (tmp_path / "d" / "copy.jsonl").write_bytes((tmp_path / "d" / "a.jsonl").read_bytes())
    with pytest.raises(UserError, match="holds the same file twice"):
        dump_manifest(tmp_path / "m.json", dataset="text", text={"paths": [str(tmp_path / "d")]})


def test_big_files_split_into_parts_that_hold_every_document_once(tmp_path):
    write_sample_corpus(tmp_path / "big.jsonl", documents=3000, seed=3)
    write_sample_corpus(tmp_path / "big.parquet", documents=3 * 8192 + 5, seed=3)
    parts = plan_parts(find_corpus_files([str(tmp_path)]), part_bytes=600_000)
    jsonl = [p for p in parts if p["pieces"][0]["format"] == "jsonl"]
    parquet = [p for p in parts if p["pieces"][0]["format"] == "parquet"]
    assert len(jsonl) >= 4 and len(parquet) >= 2
    assert [p["name"] for p in jsonl][:2] == ["big.jsonl.0001", "big.jsonl.0002"]
    assert all(p["files"][0]["sha256"] and p["files"][0]["bytes"] for p in parts)
    for group, documents in ((jsonl, 3000), (parquet, 3 * 8192 + 5)):
        texts = [t for part in group for t in read_all(pieces_from_manifest(part), batch_bytes=4096)[0]]
        assert texts == texts_of(documents, 3)


def test_small_files_are_grouped_and_a_replaced_file_changes_only_its_part(tmp_path):
    for i in range(60):
        write_sample_corpus(tmp_path / f"doc{i:03d}.jsonl", documents=2, seed=i)
    before = plan_parts(find_corpus_files([str(tmp_path)]), part_bytes=1 << 20)
    assert 1 < len(before) < 60  # grouped, and cut by file name
    assert sum(len(p["files"]) for p in before) == 60
    write_sample_corpus(tmp_path / "doc031.jsonl", documents=3, seed=999)  # other content, other size
    after = plan_parts(find_corpus_files([str(tmp_path)]), part_bytes=1 << 20)
    changed = [a["name"] for a, b in zip(after, before) if a != b]
    assert len(after) == len(before) and len(changed) == 1
    assert any(f["path"].endswith("doc031.jsonl") for f in next(p for p in after if p["name"] == changed[0])["files"])


# --- tokenize and shards over a corpus ---------------------------------------------------------


def test_tokenize_a_parquet_part_and_cap_the_tokens_in_shards(tmp_path):
    write_sample_corpus(tmp_path / "c.parquet", documents=400, seed=8)
    gpt2 = load_tokenizer()
    figures = tokenize([Piece(str(tmp_path / "c.parquet"), "parquet")], tmp_path / "tokens", workers=2,
                       fields={"text": "text", "title": None, "id": None, "txt_unit": "file"})
    data = MMapIndexedDataset(tmp_path / "tokens" / "tokens")
    texts = texts_of(400, 8)
    assert figures["articles"] == len(data) == 400 and figures["empty_documents"] == 0
    assert [data[i].tolist() for i in (0, 399)] == [gpt2.encode(texts[i]) + [gpt2.eos_id] for i in (0, 399)]
    cap = int(data.sizes[:100].sum()) + 5  # 100 whole documents and a few tokens of the next
    stats = shards([tmp_path / "tokens"], tmp_path / "shards", max_len=16, valid_fraction=0.05, seed=1,
                   samples_per_shard=1000, max_tokens=cap)
    assert stats["articles"] == 100 and stats["tokens"] == cap - 5 and stats["articles_over_max_tokens"] == 300
    assert stats["max_tokens"] == cap and stats["empty_documents"] == 0


# --- Hub datasets, against a stand-in for the Hub ----------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The three Hub calls gpt2ipu.data.hub makes, over files in a local folder."""

    def __init__(self, root: Path, configs=None, error: Exception | None = None):
        self.root, self.configs, self.error, self.downloads = root, configs, error, []

    def dataset_info(self, repo, revision=None):
        if self.error:
            raise self.error
        card = SimpleNamespace(to_dict=lambda: {"configs": self.configs} if self.configs else {})
        return SimpleNamespace(sha=SHA, card_data=card)

    def list_repo_tree(self, repo, recursive, revision, repo_type):
        assert revision == SHA and repo_type == "dataset"
        from gpt2ipu.fsutil import sha256_file

        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                yield SimpleNamespace(path=str(path.relative_to(self.root)), size=path.stat().st_size,
                                      lfs=SimpleNamespace(sha256=sha256_file(path)))

    def download(self, repo, filename, revision):
        assert revision == SHA
        self.downloads.append(filename)
        return str(self.root / filename)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    for folder, count in (("sample/10BT", 3), ("data/CC-MAIN-2024", 2)):
        for i in range(count):
            write_sample_corpus(root / folder / f"{i:03d}_00000.parquet", documents=50, seed=i)
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("card")
    fake = FakeHub(root, configs=[
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*/*"}]},
        {"config_name": "sample-10BT", "data_files": [{"split": "train", "path": "sample/10BT/*"}]},
    ])
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    monkeypatch.setattr(hub, "hub_download", fake.download)
    return fake


def hf_config(**extra):
    return {"repo": "HuggingFaceFW/fineweb-edu", "subset": "sample-10BT", "split": "train", "revision": "main",
            "files": None, "max_files": None, "max_tokens": None, **extra}


def test_hub_manifest_pins_the_commit_and_lists_the_subsets_files(tmp_path, fake_hub):
    parts = dump_manifest(tmp_path / "m.json", dataset="hf", hf=hf_config())
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["revision"] == SHA and manifest["revision_requested"] == "main"
    assert [p["repo_file"] for p in parts] == [f"sample/10BT/{i:03d}_00000.parquet" for i in range(3)]
    assert all(p["sha256"] and p["format"] == "parquet" for p in parts)
    default = hub.hub_parts(**{**hf_config(subset=None), "max_files": 1})
    assert [p["repo_file"] for p in default["parts"]] == ["data/CC-MAIN-2024/000_00000.parquet"]
    one_file = hub.hub_parts(**hf_config(max_tokens=10))  # a few tokens: the first file covers them
    assert len(one_file["parts"]) == 1
    picked = hub.hub_parts(**hf_config(files=["sample/10BT/002_*.parquet"]))
    assert [p["repo_file"] for p in picked["parts"]] == ["sample/10BT/002_00000.parquet"]


def test_hub_part_is_linked_from_the_cache_and_tokenized(tmp_path, fake_hub):
    parts = dump_manifest(tmp_path / "m.json", dataset="hf", hf=hf_config())
    dump_part(tmp_path / "m.json", parts[1]["name"], tmp_path / "part", dataset="hf")
    linked = hub.hub_part_file(tmp_path / "part", parts[1])
    assert linked.is_symlink() and fake_hub.downloads == [parts[1]["repo_file"]]
    figures = tokenize([Piece(str(linked), "parquet")], tmp_path / "tokens", workers=1)
    assert figures["articles"] == 50
    parts[2]["sha256"] = "0" * 64
    with pytest.raises(UserError, match="sha256 .* but the Hub lists 0000"):
        hub.download_hub_part(parts[2], tmp_path / "bad", repo="x/y", revision=SHA)
    assert not (tmp_path / "bad").exists()


def test_hub_errors_say_what_to_do(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import errors

    with pytest.raises(UserError, match=r"hf.subset 'sample-99BT': .* its subsets: default, sample-10BT"):
        hub.hub_parts(**hf_config(subset="sample-99BT"))
    with pytest.raises(UserError, match=r"hf.split 'test': .* its splits: train"):
        hub.hub_parts(**hf_config(split="test"))
    response = SimpleNamespace(status_code=404, headers={}, request=None)
    for error, message in (
        (errors.GatedRepoError("gated", response=response), "is gated; accept its terms .* HF_TOKEN"),
        (errors.RepositoryNotFoundError("missing", response=response), "no such dataset on the Hub"),
        (errors.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set"),
    ):
        fake_hub.error = error
        with pytest.raises(UserError, match=message):
            hub.hub_parts(**hf_config())
    with pytest.raises(UserError, match="give a Hub dataset as owner/name"):
        hub.hub_parts(**hf_config(repo="fineweb"))


def test_hub_offline_with_nothing_cached_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    entry = {"name": "p", "repo_file": "sample/10BT/000_00000.parquet", "sha256": None, "format": "parquet"}
    with pytest.raises(UserError, match=r"is not in the Hugging Face cache and the Hub cannot be reached"):
        hub.download_hub_part(entry, tmp_path / "part", repo="HuggingFaceFW/fineweb-edu", revision=SHA)
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE"):
        hub.hub_parts(**hf_config())


def test_glob_matches_like_the_hub():
    assert hub.path_glob_regex("data/*/*").match("data/CC/0.parquet")
    assert not hub.path_glob_regex("data/*").match("data/CC/0.parquet")
    assert hub.path_glob_regex("**/*.parquet").match("a/b/c.parquet")
    assert hub.path_glob_regex("**/*.parquet").match("c.parquet")
    assert hub.split_named("data/train-00000-of-00002.parquet", "train")
    assert hub.split_named("train/0.parquet", "train") and not hub.split_named("data/test-0.parquet", "train")


def test_commands_without_snakemake(tmp_path, capsys):
    from gpt2ipu.cli import main as cli_main

    assert cli_main(["dump", "sample-text", "--out", str(tmp_path / "c" / "a.jsonl.zst"), "--documents", "40"]) == 0
    assert cli_main(["dump", "manifest", "--dataset", "text", "--text-path", str(tmp_path / "c"),
                     "--out", str(tmp_path / "m.json")]) == 0
    name = json.loads((tmp_path / "m.json").read_text())["parts"][0]["name"]
    capsys.readouterr()
    assert cli_main(["tokenize", "--part", str(tmp_path / "m.json"), name, "--out-dir", str(tmp_path / "t"),
                     "--workers", "1", "--title-field", "title"]) == 0
    assert json.loads(capsys.readouterr().out)["articles"] == 40
    assert cli_main(["tokenize", "--documents", str(tmp_path / "c" / "a.jsonl.zst"), "--out-dir",
                     str(tmp_path / "t2"), "--text-field", "body"]) == 2
    assert 'has no "body" field' in capsys.readouterr().err


def test_train_bpe_reads_corpus_parts_as_tokenize_does(tmp_path):
    from gpt2ipu.data.bpe import train_bpe

    write_sample_corpus(tmp_path / "c" / "a.parquet", documents=200, seed=4)
    write_sample_corpus(tmp_path / "c" / "b.jsonl.gz", documents=100, seed=5)
    parts = plan_parts(find_corpus_files([str(tmp_path / "c")]), part_bytes=1)  # one part per file
    figures = train_bpe([part["pieces"] for part in parts], tmp_path / "bpe", vocab_size=600,
                        fields={"text": "text", "title": "title", "id": None, "txt_unit": "file"})
    assert figures["articles"] == 300 and figures["vocab_size"] == 600
    bpe = load_tokenizer(bpe_tokenizer=tmp_path / "bpe" / "tokenizer.json")
    tokens = tokenize(parts[0]["pieces"], tmp_path / "t", workers=1, bpe_tokenizer=tmp_path / "bpe" / "tokenizer.json",
                      fields={"text": "text", "title": "title", "id": None, "txt_unit": "file"})
    first = next(sample_documents(1, 4))
    data = MMapIndexedDataset(tmp_path / "t" / "tokens")
    assert tokens["articles"] == 200 and data[0].tolist() == bpe.encode(f"{first['title']}\n\n{first['text']}") + [
        bpe.eos_id]
