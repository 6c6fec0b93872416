"""Faults in the dump stage's input (issue 13): the same local dump listed twice, a local dump
replaced by other content with an older mtime, and enwiki dates (`latest`, a date the mirror no
longer has), against the local HTTP server of tests/conftest.py serving a fake mirror."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from gpt2ipu.data import download, dump
from gpt2ipu.errors import UserError

HEX = "0123456789abcdef" * 2 + "01234567"


def manifest_of(out, **kwargs):
    settings = dict(dataset="local", sample_parts=1, local_paths=[], enwiki_mirror="http://unused",
                    enwiki_date="latest", enwiki_max_parts=None)
    settings.update(kwargs)
    dump.dump_manifest(out, **settings)
    return json.loads(Path(out).read_text())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------
# Local dumps

def test_same_local_path_twice_is_refused(tmp_path):
    dump_file = write(tmp_path / "a" / "wiki.xml", b"<mediawiki>one</mediawiki>")
    other = str(tmp_path / "a" / ".." / "a" / "wiki.xml")   # the same file, spelled another way
    out = tmp_path / "m.json"
    with pytest.raises(UserError) as err:
        manifest_of(out, local_paths=[str(dump_file), other])
    message = str(err.value)
    assert "local.paths" in message and "same file twice" in message
    assert f"entry 1 ({dump_file})" in message and f"entry 2 ({other})" in message
    assert str(dump_file.resolve()) in message
    assert not out.exists()


def test_same_local_content_twice_is_refused(tmp_path):
    data = b"<mediawiki>the same pages</mediawiki>"
    first = write(tmp_path / "a" / "wiki.xml", data)
    second = write(tmp_path / "b" / "copy of wiki.xml", data)
    third = write(tmp_path / "c.xml", b"<mediawiki>other pages</mediawiki>")
    with pytest.raises(UserError) as err:
        manifest_of(tmp_path / "m.json", local_paths=[str(third), str(first), str(second)])
    message = str(err.value)
    assert "local.paths" in message and "same content" in message
    assert f"entry 2 ({first})" in message and f"entry 3 ({second})" in message
    assert hashlib.sha256(data).hexdigest() in message


def test_manifest_records_each_local_sha256(tmp_path):
    a = write(tmp_path / "a.xml", b"<mediawiki>a</mediawiki>")
    b = write(tmp_path / "b.xml.bz2", b"not really bz2, but distinct")
    manifest = manifest_of(tmp_path / "m.json", local_paths=[str(a), str(b)])
    assert manifest["parts"] == [
        {"name": "a", "path": str(a.resolve()), "sha256": hashlib.sha256(a.read_bytes()).hexdigest()},
        {"name": "b", "path": str(b.resolve()), "sha256": hashlib.sha256(b.read_bytes()).hexdigest()},
    ]


def test_replaced_local_dump_with_older_mtime_changes_its_keys(tmp_path):
    path = write(tmp_path / "wiki.xml", b"<mediawiki>first version</mediawiki>")
    stamps = dump.local_stamps([str(path)])
    before = manifest_of(tmp_path / "m.json", local_paths=[str(path)])["parts"][0]
    old = path.stat().st_mtime_ns - 3_600_000_000_000   # an hour older than the first version
    path.write_bytes(b"<mediawiki>second version, other pages</mediawiki>")
    os.utime(path, ns=(old, old))
    assert dump.local_stamps([str(path)]) != stamps   # the workflow's rerun key for the manifest
    after = manifest_of(tmp_path / "m.json", local_paths=[str(path)])["parts"][0]
    assert after["name"] == before["name"] and after["sha256"] != before["sha256"]
    assert after["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_stamps_of_a_missing_file(tmp_path):
    assert dump.local_stamps([str(tmp_path / "gone.xml")]) == [[str(tmp_path / "gone.xml"), None, None]]


def test_sample_manifest_is_unchanged(tmp_path):
    manifest = manifest_of(tmp_path / "m.json", dataset="sample", sample_parts=2)
    assert manifest == {"dataset": "sample", "parts": [{"name": "part1"}, {"name": "part2"}]}


# ----------------------------------------------------------------------------------------------
# enwiki dates on a fake static mirror

def sha1sums(date: str) -> bytes:
    return (f"{HEX}  enwiki-{date}-pages-articles.xml.bz2\n"
            f"{'a' * 40}  enwiki-{date}-pages-articles1.xml-p1p41242.bz2\n"
            f"{'b' * 40}  enwiki-{date}-pages-articles2.xml-p41243p151573.bz2\n").encode()


INDEX = b"""<html><head><title>Index of /enwiki/</title></head><body><h1>Index of /enwiki/</h1><pre>
<a href="../">../</a>
<a href="20250501/">20250501/</a>                                          02-Jun-2025 01:23    -
<a href="20250601/">20250601/</a>                                          21-Jun-2025 01:23    -
<a href="20250620/">20250620/</a>                                          22-Jun-2025 01:23    -
<a href="latest/">latest/</a>                                            21-Jun-2025 01:23    -
</pre></body></html>"""

RSS = b"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel><title>Wikimedia Downloads</title>
<link>https://dumps.wikimedia.org/enwiki/latest/enwiki-latest-pages-articles.xml.bz2-rss.xml</link>
<item><title>https://dumps.wikimedia.org/enwiki/20250601/enwiki-20250601-pages-articles.xml.bz2</title>
<link>https://dumps.wikimedia.org/enwiki/20250601</link>
<description>&lt;a href="https://dumps.wikimedia.org/enwiki/20250601/enwiki-20250601-pages-articles.xml.bz2"&gt;</description>
</item></channel></rss>"""


def fake_mirror(server, *, rss=True, index=True, status=True):
    """20250501 and 20250601 finished; 20250620 in progress (no article parts yet)."""
    files = {f"/enwiki/{d}/enwiki-{d}-sha1sums.txt": sha1sums(d) for d in ("20250501", "20250601")}
    files["/enwiki/20250620/enwiki-20250620-sha1sums.txt"] = f"{HEX}  enwiki-20250620-stub-articles.xml.gz\n".encode()
    if status:
        files["/enwiki/20250601/dumpstatus.json"] = b'{"jobs": {"articlesdump": {"status": "done"}}}'
        files["/enwiki/20250620/dumpstatus.json"] = b'{"jobs": {"articlesdump": {"status": "waiting"}}}'
    if rss:
        files["/enwiki/latest/enwiki-latest-pages-articles.xml.bz2-rss.xml"] = RSS
    if index:
        files["/enwiki/"] = INDEX
    server.reset(files)
    return server.url("")


def test_latest_resolves_from_the_latest_feed_and_is_recorded(range_server, tmp_path):
    mirror = fake_mirror(range_server)
    manifest = manifest_of(tmp_path / "m.json", dataset="enwiki", enwiki_mirror=mirror, enwiki_date="latest",
                           enwiki_max_parts=1)
    assert manifest["date"] == "20250601" and manifest["date_requested"] == "latest"
    assert manifest["mirror"] == mirror
    assert manifest["parts"] == [{"name": "pages-articles1.xml-p1p41242", "sha1": "a" * 40,
                                  "url": f"{mirror}/enwiki/20250601/enwiki-20250601-pages-articles1.xml-p1p41242.bz2"}]


@pytest.mark.parametrize("status", [True, False])
def test_latest_without_the_feed_takes_the_newest_finished_date_of_the_index(range_server, tmp_path, status):
    mirror = fake_mirror(range_server, rss=False, status=status)
    assert download.resolve_dump_date(mirror, "latest") == "20250601"   # 20250620 is unfinished
    assert download.resolve_dump_date(mirror, "20250501") == "20250501"


def test_latest_unresolvable_says_what_to_set(range_server):
    mirror = fake_mirror(range_server, rss=False, index=False)
    with pytest.raises(UserError, match=r"latest.*enwiki/ index could not be read.*enwiki\.date"):
        download.resolve_dump_date(mirror, "latest")


def test_missing_date_lists_the_dates_the_mirror_offers(range_server):
    mirror = fake_mirror(range_server)
    with pytest.raises(UserError) as err:
        download.enwiki_manifest(mirror, "20240601")
    message = str(err.value)
    assert f"no dump 20240601 on {mirror}" in message
    assert "20250501, 20250601, 20250620" in message and "enwiki.date" in message and "README" in message


def test_missing_date_without_an_index(range_server):
    mirror = fake_mirror(range_server, index=False)
    with pytest.raises(UserError, match=r"no dump 20240601 on .*index .* could not be read"):
        download.enwiki_manifest(mirror, "20240601")


def test_default_date_is_latest():
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    assert config["enwiki"]["date"] == "latest"


# ----------------------------------------------------------------------------------------------
# The workflow: a replaced local dump is extracted again

@pytest.mark.slow
def test_workflow_reextracts_a_replaced_local_dump(tmp_path):
    from test_workflow import jobs_run, make_workdir, planned_jobs, snakemake

    from gpt2ipu.data.sample_dump import write_sample_part

    dump_path = tmp_path / "dumps" / "wiki.xml.bz2"
    write_sample_part(tmp_path / "v1", part=1, parts=1, pages=30, seed=1)
    write_sample_part(tmp_path / "v2", part=1, parts=1, pages=30, seed=2)
    dump_path.parent.mkdir()
    dump_path.write_bytes((tmp_path / "v1" / "pages.xml.bz2").read_bytes())
    (tmp_path / "wf").mkdir()
    workdir = make_workdir(tmp_path / "wf", {"dataset": "local", "local": {"paths": [str(dump_path)]},
                                             "extract": {"threads": 1, "min_chars": 0}})
    target = "results/data/local/extract/wiki"
    snakemake(workdir, target)
    manifest = workdir / "results/data/local/dump/manifest.json"
    first = json.loads(manifest.read_text())["parts"][0]["sha256"]
    assert not planned_jobs(snakemake(workdir, target, "-n"))   # unchanged: nothing to do

    old = dump_path.stat().st_mtime_ns - 3_600_000_000_000
    dump_path.write_bytes((tmp_path / "v2" / "pages.xml.bz2").read_bytes())
    os.utime(dump_path, ns=(old, old))   # other content, older mtime
    planned = planned_jobs(snakemake(workdir, target, "-n"))
    assert "dump_manifest" in planned and "extract" in planned, planned
    rerun = snakemake(workdir, target)
    assert {"dump_manifest", "extract"} <= set(jobs_run(rerun))
    second = json.loads(manifest.read_text())["parts"][0]["sha256"]
    assert second != first and second == hashlib.sha256(dump_path.read_bytes()).hexdigest()
    assert not planned_jobs(snakemake(workdir, target, "-n"))
