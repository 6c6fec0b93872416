"""The dump stage: the generated sample export, the resumable enwiki download, the manifest."""

from __future__ import annotations

import bz2
import collections
import hashlib
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import wikiextractor_articles

from gpt2ipu.cli import main as cli_main
from gpt2ipu.data import download, dump, sample_dump
from gpt2ipu.errors import UserError

NS = "{http://www.mediawiki.org/xml/export-0.10/}"
SEED = 7


# ----------------------------------------------------------------------------------------------
# Sample dump

def read_pages(path: Path) -> list[dict]:
    """Every page of an export, parsed with the standard library's streaming parser."""
    pages = []
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if element.tag != NS + "page":
                continue
            revision = element.find(NS + "revision")
            text = revision.find(NS + "text")
            redirect = element.find(NS + "redirect")
            pages.append({
                "title": element.findtext(NS + "title"),
                "ns": int(element.findtext(NS + "ns")),
                "id": int(element.findtext(NS + "id")),
                "redirect": redirect.get("title") if redirect is not None else None,
                "timestamp": revision.findtext(NS + "timestamp"),
                "text": text.text or "",
                "bytes": int(text.get("bytes")),
                "sha1": revision.findtext(NS + "sha1"),
                "model": revision.findtext(NS + "model"),
                "format": revision.findtext(NS + "format"),
            })
            element.clear()
    return pages


@pytest.fixture(scope="module")
def sample_part(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "part1"
    sample_dump.write_sample_part(out, part=1, parts=1, pages=400, seed=SEED)
    return out / "pages.xml.bz2"


@pytest.fixture(scope="module")
def extracted(sample_part, tmp_path_factory) -> list[dict]:
    """The sample part run through wikiextractor's own command line, as the extract stage does."""
    return wikiextractor_articles(sample_part, tmp_path_factory.mktemp("extracted"), processes=1)


def test_sample_is_byte_identical_for_the_same_arguments(sample_part, tmp_path):
    again = tmp_path / "again"
    sample_dump.write_sample_part(again, part=1, parts=1, pages=400, seed=SEED)
    assert (again / "pages.xml.bz2").read_bytes() == sample_part.read_bytes()
    other = tmp_path / "other"
    sample_dump.write_sample_part(other, part=1, parts=1, pages=400, seed=SEED + 1)
    assert (other / "pages.xml.bz2").read_bytes() != sample_part.read_bytes()


def test_sample_has_the_export_schema(sample_part):
    with bz2.open(sample_part) as f:
        _, root = next(ET.iterparse(f, events=("start",)))
    assert root.tag == NS + "mediawiki" and root.get("version") == "0.10"
    with bz2.open(sample_part) as f:
        siteinfo = next(el for _, el in ET.iterparse(f) if el.tag == NS + "siteinfo")
    for field in ("sitename", "dbname", "base", "generator", "case"):
        assert siteinfo.findtext(NS + field), field
    namespaces = {int(ns.get("key")): ns.text for ns in siteinfo.iter(NS + "namespace")}
    assert namespaces[0] is None and namespaces[6] == "File" and namespaces[10] == "Template"
    assert namespaces[14] == "Category"

    pages = read_pages(sample_part)
    assert len(pages) == 400
    assert len({p["id"] for p in pages}) == 400 and len({p["title"] for p in pages}) == 400
    for page in pages:
        assert page["bytes"] == len(page["text"].encode("utf-8"))
        assert page["sha1"] == sample_dump.mediawiki_sha1(page["text"]) and len(page["sha1"]) == 31
        assert page["model"] == "wikitext" and page["format"] == "text/x-wiki"
        assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", page["timestamp"])


def test_sample_has_every_kind_of_markup(sample_part):
    pages = read_pages(sample_part)
    articles = [p["text"] for p in pages if p["ns"] == 0 and not p["redirect"]]
    everything = "\n".join(p["text"] for p in pages)
    expected = {
        "infobox": r"\{\{Infobox \w+\n\| \w+ = ",
        "template": r"\{\{Short description\|",
        "internal link": r"\[\[[^\]|:]+\]\]",
        "piped link": r"\[\[[^\]|:]+\|[^\]]+\]\]",
        "external link": r"\[http://example\.org/\S+ [^\]]+\]",
        "ref": r"<ref>\{\{cite book ",
        "named ref": r'<ref name="\w+">\{\{cite web \|url=',
        "ref reuse": r"<ref name=\w+/>",
        "table": r'\{\| class="wikitable.*\n\|\+.*\n!.*\n\|-\n\|[^\n]*\|\|',
        "bulleted list": r"\n\* \S",
        "numbered list": r"\n# \S",
        "heading": r"\n== [^=\n]+ ==\n",
        "subheading": r"\n=== [^=\n]+ ===\n",
        "file": r"\[\[File:[^|\]]+\.jpg\|thumb\|",
        "category": r"\[\[Category:[^\]]+\]\]",
        "em dash": "\u2014",
        "accents": r"[éáöüøåãí]",
        "greek": r"[\u0370-\u03ff]",
        "cjk": r"[\u3040-\u30ff\u4e00-\u9fff]",
    }
    missing = [kind for kind, pattern in expected.items() if not re.search(pattern, everything)]
    assert not missing
    redirects = [p for p in pages if p["redirect"]]
    titles = {p["title"] for p in pages}
    assert redirects and all(p["text"].startswith(f"#REDIRECT [[{p['redirect']}]]") for p in redirects)
    assert all(p["redirect"] in titles for p in redirects)   # whole dump in one part here
    disambiguations = [t for t in articles if "may refer to:" in t]
    assert disambiguations and all("{{disambiguation}}" in t for t in disambiguations)
    assert any(t == "" for t in articles)
    assert any(0 < len(t) < 300 for t in articles)
    assert {6, 10, 14} <= {p["ns"] for p in pages}
    assert all(p["title"].startswith("Template:") for p in pages if p["ns"] == 10)


def test_sample_parts_split_the_same_pages(sample_part, tmp_path):
    whole = {p["id"]: p for p in read_pages(sample_part)}
    seen = []
    for part, name in enumerate(sample_dump.sample_part_names(3), start=1):
        sample_dump.write_sample_part(tmp_path / name, part=part, parts=3, pages=400, seed=SEED)
        pages = read_pages(tmp_path / name / "pages.xml.bz2")   # each a standalone export
        assert 130 <= len(pages) <= 137
        assert all(p == whole[p["id"]] for p in pages)
        seen += [p["id"] for p in pages]
    assert sorted(seen) == sorted(whole)
    provenance = json.loads((tmp_path / "part3" / "provenance.json").read_text())
    assert provenance["params"] == {"dataset": "sample", "part": 3, "parts": 3, "pages": 400, "seed": SEED}
    assert sample_dump.sample_part_names(2) == ["part1", "part2"]


def test_sample_rejects_bad_part_arguments(tmp_path):
    with pytest.raises(UserError, match="part"):
        sample_dump.write_sample_part(tmp_path / "x", part=3, parts=2, pages=100, seed=0)
    with pytest.raises(UserError, match="sample.pages"):
        sample_dump.write_sample_part(tmp_path / "x", part=1, parts=4, pages=3, seed=0)
    with pytest.raises(UserError, match="sample.parts"):
        sample_dump.sample_part_names(0)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_wikiextractor_extracts_the_articles(sample_part, extracted):
    pages = read_pages(sample_part)
    articles = {p["title"] for p in pages if p["ns"] == 0 and not p["redirect"]}
    titles = {doc["title"] for doc in extracted}
    assert titles == articles   # no redirects, no Template:/Category:/File: pages
    words = [len(doc["text"].split()) for doc in extracted if "may refer to" not in doc["text"]]
    long_ones = [w for w in words if w >= 100]
    assert len(long_ones) > 0.7 * len(words)
    assert 250 < sum(long_ones) / len(long_ones) < 650 and max(words) <= 1800
    text = "\n".join(doc["text"] for doc in extracted)
    assert "{{" not in text and "<ref" not in text and "[[" not in text


@pytest.mark.slow
def test_sample_prose_is_learnable(extracted):
    """A bigram model fitted on half the articles predicts the other half much better than a
    unigram model: the text has structure a language model can learn."""
    tokens = [re.findall(r"\w+|[^\w\s]", doc["text"].lower()) for doc in extracted]
    train = [t for doc in tokens[::2] for t in doc]
    test = [t for doc in tokens[1::2] for t in doc]
    vocab = set(train) | set(test)
    unigram = collections.Counter(train)
    bigram = collections.Counter(zip(train, train[1:]))
    v, n = len(vocab), len(train)

    def p_uni(w):
        return (unigram[w] + 1) / (n + v)

    def p_bi(prev, w):   # interpolated with the unigram, so unseen pairs keep some mass
        return 0.7 * bigram[(prev, w)] / unigram[prev] + 0.3 * p_uni(w) if unigram[prev] else p_uni(w)

    uni_bits = -sum(math.log2(p_uni(w)) for w in test[1:]) / (len(test) - 1)
    bi_bits = -sum(math.log2(p_bi(a, b)) for a, b in zip(test, test[1:])) / (len(test) - 1)
    assert bi_bits < uni_bits - 2.0, (uni_bits, bi_bits)
    assert len(unigram) < 4000   # a small vocabulary, not random strings


# ----------------------------------------------------------------------------------------------
# Download, against a local HTTP server

PAYLOAD = bytes(range(256)) * 1200 + b"tail"   # ~300 kB: several chunks
PAYLOAD_SHA1 = hashlib.sha1(PAYLOAD).hexdigest()


@pytest.fixture
def served(range_server):
    """(server, URL of PAYLOAD) with a fresh request log (conftest's RangeServer)."""
    range_server.reset({"/enwiki/part.bz2": PAYLOAD})
    return range_server, range_server.url("/enwiki/part.bz2")


def fetch(url, out_dir, sha1=PAYLOAD_SHA1, **kwargs):
    return download.download_part(url, out_dir, sha1=sha1, timeout=10, backoff_s=0, **kwargs)


def test_download_fresh(served, tmp_path):
    server, url = served
    out = tmp_path / "pages-articles1"
    result = fetch(url, out)
    assert (out / "pages.xml.bz2").read_bytes() == PAYLOAD
    assert not download.partial_path(out).exists()
    assert [r["range"] for r in server.requests] == [None]
    assert result["bytes"] == len(PAYLOAD) and result["attempts"] == 1
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["params"]["url"] == url and provenance["params"]["sha1"] == PAYLOAD_SHA1


def test_download_resumes_from_a_kept_partial(served, tmp_path):
    server, url = served
    out = tmp_path / "part"
    download.partial_path(out).write_bytes(PAYLOAD[:100_000])
    result = fetch(url, out)
    assert (out / "pages.xml.bz2").read_bytes() == PAYLOAD
    assert [(r["range"], r["status"], r["sent"]) for r in server.requests] == [
        ("bytes=100000-", 206, len(PAYLOAD) - 100_000)]
    assert result["resumed_from_bytes"] == 100_000 and result["bytes_received"] == len(PAYLOAD) - 100_000


def test_download_resumes_after_a_dropped_connection(served, tmp_path):
    server, url = served
    server.truncate_first = True
    out = tmp_path / "part"
    result = fetch(url, out)
    assert (out / "pages.xml.bz2").read_bytes() == PAYLOAD
    first, second = server.requests
    assert first["range"] is None and first["sent"] < len(PAYLOAD)
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))
    assert 0 < resumed_at <= first["sent"] and second["status"] == 206
    assert second["sent"] == len(PAYLOAD) - resumed_at
    assert result["attempts"] == 2


def test_download_restarts_when_the_server_ignores_range(served, tmp_path):
    server, url = served
    server.ignore_range = True
    out = tmp_path / "part"
    download.partial_path(out).write_bytes(b"x" * 5000)   # would corrupt the file if appended to
    fetch(url, out)
    assert (out / "pages.xml.bz2").read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in server.requests] == [("bytes=5000-", 200)]


def test_download_with_a_complete_partial_only_verifies(served, tmp_path):
    server, url = served
    out = tmp_path / "part"
    download.partial_path(out).write_bytes(PAYLOAD)
    fetch(url, out)
    assert (out / "pages.xml.bz2").read_bytes() == PAYLOAD
    assert [r["status"] for r in server.requests] == [416]
    fetch(url, out)   # already there and verified: no request at all
    assert len(server.requests) == 1


def test_download_sha1_mismatch(served, tmp_path):
    server, url = served
    out = tmp_path / "part"
    wrong = "0" * 40
    with pytest.raises(UserError) as err:
        fetch(url, out, sha1=wrong)
    message = str(err.value)
    assert url in message and wrong in message and PAYLOAD_SHA1 in message
    assert not (out / "pages.xml.bz2").exists() and not out.exists()
    assert not download.partial_path(out).exists()


def test_download_missing_file_is_a_user_error_without_retries(served, tmp_path):
    server, url = served
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(url.replace("part.bz2", "nope.bz2"), tmp_path / "part")
    assert len(server.requests) == 1


def test_download_gives_up_after_the_retries(tmp_path):
    with pytest.raises(UserError, match="failed after 2 attempts"):
        fetch("http://127.0.0.1:9/part.bz2", tmp_path / "part", retries=1)   # port 9: refused


# ----------------------------------------------------------------------------------------------
# Manifest

SHA1SUMS = """\
{h}  enwiki-20240601-pages-articles-multistream.xml.bz2
{h}  enwiki-20240601-pages-articles-multistream-index.txt.bz2
{h}  enwiki-20240601-pages-articles-multistream1.xml-p1p41242.bz2
{h}  enwiki-20240601-pages-articles.xml.bz2
{h}  enwiki-20240601-pages-articles10.xml-p4045403p5399366.bz2
{a}  enwiki-20240601-pages-articles1.xml-p1p41242.bz2
{h}  enwiki-20240601-pages-articles27.xml-p67458296p68958295.bz2
{h}  enwiki-20240601-pages-articles27.xml-p64401592p65901591.bz2
{b}  enwiki-20240601-pages-articles2.xml-p41243p151573.bz2
{h}  enwiki-20240601-pages-meta-current1.xml-p1p41242.bz2
{h}  enwiki-20240601-stub-articles1.xml.gz
{h}  enwiki-20240601-pages-articles-multistream-index1.txt-p1p41242.bz2
"""


@pytest.fixture
def mirror(range_server):
    text = SHA1SUMS.format(h="f" * 40, a="a" * 40, b="b" * 40)
    range_server.reset({"/enwiki/20240601/enwiki-20240601-sha1sums.txt": text.encode()})
    return range_server.url("/")


def test_enwiki_manifest_lists_the_article_parts_in_order(mirror):
    parts = download.enwiki_manifest(mirror, "20240601", None)
    folder = mirror + "enwiki/20240601/"
    assert [p["name"] for p in parts] == [
        "pages-articles1.xml-p1p41242", "pages-articles2.xml-p41243p151573",
        "pages-articles10.xml-p4045403p5399366", "pages-articles27.xml-p64401592p65901591",
        "pages-articles27.xml-p67458296p68958295"]
    assert parts[0] == {"name": "pages-articles1.xml-p1p41242", "sha1": "a" * 40,
                        "url": folder + "enwiki-20240601-pages-articles1.xml-p1p41242.bz2"}
    assert parts[1]["sha1"] == "b" * 40
    assert [p["name"] for p in download.enwiki_manifest(mirror, "20240601", 2)] == [p["name"] for p in parts[:2]]


def test_enwiki_manifest_errors(mirror):
    with pytest.raises(UserError, match="enwiki.date"):
        download.enwiki_manifest(mirror, "20990101", None)   # 404
    with pytest.raises(UserError, match="enwiki.max_parts"):
        download.enwiki_manifest(mirror, "20240601", 0)


def test_dump_manifest_enwiki(mirror, tmp_path):
    out = tmp_path / "dump" / "manifest.json"
    dump.dump_manifest(out, dataset="enwiki", sample_parts=1, local_paths=[], enwiki_mirror=mirror,
                        enwiki_date="20240601", enwiki_max_parts=1)
    manifest = json.loads(out.read_text())
    assert manifest["dataset"] == "enwiki"
    assert [p["name"] for p in manifest["parts"]] == ["pages-articles1.xml-p1p41242"]
    assert manifest["parts"][0]["sha1"] == "a" * 40


def manifest_of(out, **kwargs):
    settings = dict(dataset="sample", sample_parts=1, local_paths=[], enwiki_mirror="http://unused",
                    enwiki_date="latest", enwiki_max_parts=None)
    settings.update(kwargs)
    dump.dump_manifest(out, **settings)
    return json.loads(Path(out).read_text())


def test_dump_manifest_sample(tmp_path):
    manifest = manifest_of(tmp_path / "m.json", sample_parts=3)
    assert manifest == {"dataset": "sample", "parts": [{"name": "part1"}, {"name": "part2"}, {"name": "part3"}]}


def test_dump_manifest_local(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "my dump (1).xml.bz2", tmp_path / "b" / "my dump (1).xml", tmp_path / "a" / "plain.xml"]
    for i, f in enumerate(files):
        f.write_bytes(f"<mediawiki>{i}</mediawiki>".encode())   # distinct: the same content twice is refused
    manifest = manifest_of(tmp_path / "m.json", dataset="local", local_paths=[str(f) for f in files])
    sha256 = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert manifest["parts"] == [
        {"name": "my_dump__1_", "path": str(files[0].resolve()), "sha256": sha256[0]},
        {"name": "my_dump__1_-2", "path": str(files[1].resolve()), "sha256": sha256[1]},
        {"name": "plain", "path": str(files[2].resolve()), "sha256": sha256[2]},
    ]


def test_dump_manifest_errors(tmp_path):
    out = tmp_path / "m.json"
    missing = str(tmp_path / "missing.xml.bz2")
    with pytest.raises(UserError, match=re.escape(missing) + r".*local\.paths"):
        manifest_of(out, dataset="local", local_paths=[missing])
    wrong = tmp_path / "dump.json"
    wrong.write_text("{}")
    with pytest.raises(UserError, match=re.escape(str(wrong)) + r".*local\.paths.*\.xml or \.xml\.bz2"):
        manifest_of(out, dataset="local", local_paths=[str(wrong)])
    with pytest.raises(UserError, match=r"local\.paths"):
        manifest_of(out, dataset="local", local_paths=[])
    with pytest.raises(UserError, match=r"dataset.*sample, enwiki, local"):
        manifest_of(out, dataset="wiki")
    assert not out.exists()


def test_command_line(tmp_path, capsys):
    assert cli_main(["dump", "sample", "--out-dir", str(tmp_path / "p2"), "--part", "2", "--parts", "2",
                     "--pages", "60", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["pages"] == 30
    assert len(read_pages(tmp_path / "p2" / "pages.xml.bz2")) == 30
    assert cli_main(["dump", "manifest", "--dataset", "sample", "--sample-parts", "2",
                     "--out", str(tmp_path / "m.json")]) == 0
    assert len(json.loads((tmp_path / "m.json").read_text())["parts"]) == 2
    assert cli_main(["dump", "manifest", "--dataset", "local", "--local-path", "nope.txt",
                     "--out", str(tmp_path / "m2.json")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def element_paths(path: Path, limit_pages: int = 400) -> set[str]:
    """The element paths (page/revision/text...) used by the pages of an export."""
    seen, stack, pages = set(), [], 0
    with bz2.open(path) as f:
        for event, element in ET.iterparse(f, events=("start", "end")):
            if event == "start":
                stack.append(element.tag.replace(NS, ""))
                if "page" in stack:
                    seen.add("/".join(stack[stack.index("page"):]))
            else:
                stack.pop()
                if element.tag == NS + "page":
                    pages += 1
                    element.clear()
                    if pages >= limit_pages:
                        break
    return seen


def test_sample_uses_the_elements_of_a_real_export(sample_part, shared_file):
    real = element_paths(shared_file("enwiki-sample-206-pages.xml.bz2"))
    ours = element_paths(sample_part)
    assert ours <= real, ours - real
    assert {"page/redirect", "page/revision/contributor/ip", "page/revision/parentid"} <= ours
