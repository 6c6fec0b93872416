"""Stage `dump`: the MediaWiki XML dump parts the pipeline starts from.

Five sources (config key `dataset`):
  sample  the embedded generated dump (gpt2ipu.data.sample_dump), split into parts
  enwiki  the real English Wikipedia dump, one part per numbered pages-articles file
  local   MediaWiki XML dumps (.xml or .xml.bz2) already on disk, used in place
  text    the user's own documents: JSON lines, Parquet, plain text (gpt2ipu.data.corpus), used in place
  hf      a Hugging Face Hub dataset's files (gpt2ipu.data.hub), one part per file

The last two are not MediaWiki: their parts skip the extract stage and go to tokenize directly.

The manifest (`results/data/{dataset}/dump/manifest.json`, `dump_manifest`) lists the parts; the
workflow reads it as a checkpoint and makes one `{part}/pages.xml.bz2` per part (`dump_part`:
sample, enwiki). The functions are named as the rules and scripts that run them.

    gpt2ipu dump manifest --dataset sample --sample-parts 2 --out manifest.json
    gpt2ipu dump sample --out-dir dump/part1 --part 1 --parts 2 --pages 3000 --seed 1234
    gpt2ipu dump download --url URL --sha1 HEX --out-dir dump/pages-articles1.xml-p1p41242
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt2ipu.data.corpus import DEFAULT_PART_BYTES, TXT_UNITS
from gpt2ipu.data.hub import DEFAULT_BYTES_PER_TOKEN
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import sha256_file, write_text_atomic

DATASETS = ("sample", "enwiki", "local", "text", "hf")
CORPUS_DATASETS = ("text", "hf")   # not MediaWiki: no extract stage, their documents go to tokenize
DEFAULT_MIRROR = "https://dumps.wikimedia.org"
LOCAL_SUFFIXES = (".xml.bz2", ".xml")


def local_parts(paths: list[str]) -> list[dict[str, str]]:
    """Manifest entries for dumps on disk: name from the file name, absolute path, sha256.

    The same file listed twice, or two files with the same content, are refused: every document
    would be in the corpus twice, and a document held out for validation also trained on."""
    if not paths:
        raise UserError("config key local.paths is empty: list one or more MediaWiki XML dumps (.xml or .xml.bz2)")
    parts, names = [], set()
    by_path: dict[str, tuple[int, str]] = {}
    by_sha256: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(paths, 1):
        path = Path(raw).expanduser()
        suffix = next((s for s in LOCAL_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            raise UserError(f"{raw} (config key local.paths) is not a MediaWiki XML dump: "
                            "the file name must end in .xml or .xml.bz2")
        if not path.is_file():
            raise UserError(f"{raw} (config key local.paths) does not exist; fix the path or remove it")
        resolved = str(path.resolve())
        _refuse_repeat(by_path, resolved, number, raw, "the same file twice", f"are both {resolved}")
        sha256 = sha256_file(path)
        _refuse_repeat(by_sha256, sha256, number, raw, "the same dump twice",
                       f"have the same content (sha256 {sha256})")
        # Part names become folder names and wildcard values: keep them plain and unique.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name[: -len(suffix)]).lstrip(".") or "part"
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}-{n}"
        names.add(unique)
        parts.append({"name": unique, "path": resolved, "sha256": sha256})
    return parts


def _refuse_repeat(seen: dict[str, tuple[int, str]], key: str, number: int, raw: str, what: str, how: str) -> None:
    """Remember entry `number` (`raw`) under `key`; a UserError if an earlier entry had the same key."""
    if key in seen:
        first, first_raw = seen[key]
        raise UserError(f"config key local.paths lists {what}: entry {first} ({first_raw}) and entry {number} "
                        f"({raw}) {how}; remove one (a dump listed twice puts its validation documents into "
                        "training too)")
    seen[key] = (number, raw)


def local_stamps(paths: list[str]) -> list[list[Any]]:
    """[path, size, mtime in ns] of each local dump (None where it is missing): a cheap key the
    workflow passes to `dump_manifest`, so that a replaced file (any other size or mtime, older
    too) reruns the manifest, whose sha256 then decides."""
    stamps = []
    for raw in paths:
        path = Path(raw).expanduser()
        try:
            stat = path.stat()
            stamps.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append([raw, None, None])
    return stamps


def dump_manifest(out_path: str | Path, *, dataset: str, sample_parts: int = 1, local_paths: list[str] = (),
                  enwiki_mirror: str = DEFAULT_MIRROR, enwiki_date: str = "latest",
                  enwiki_max_parts: int | None = None, text: Mapping[str, Any] | None = None,
                  hf: Mapping[str, Any] | None = None, local_stamps: Any = None) -> list[dict[str, Any]]:
    """Write `{"dataset": ..., "parts": [{"name": ...}, ...]}` to `out_path`; return the parts.

    enwiki adds `mirror` and `date` (`latest` resolved to the date it named, so reruns fetch that
    dump); local parts carry their file's `sha256`; text parts their pieces and files (size, mtime,
    sha256: `gpt2ipu.data.corpus`); hf adds the commit sha the revision resolved to. `text` and
    `hf` are those config sections. `local_stamps` is not used: it is the workflow's rerun key
    (see `local_stamps`, `corpus.file_stamps`)."""
    manifest: dict[str, Any] = {"dataset": dataset}
    if dataset == "sample":
        from gpt2ipu.data.sample_dump import sample_part_names
        parts: list[dict[str, Any]] = [{"name": name} for name in sample_part_names(sample_parts)]
    elif dataset == "enwiki":
        from gpt2ipu.data.download import enwiki_manifest, resolve_dump_date
        date = resolve_dump_date(enwiki_mirror, enwiki_date)
        parts = enwiki_manifest(enwiki_mirror, date, enwiki_max_parts)
        manifest.update(mirror=enwiki_mirror, date=date, date_requested=enwiki_date)
    elif dataset == "local":
        parts = local_parts(local_paths)
    elif dataset == "text":
        parts = text_parts(text or {})
    elif dataset == "hf":
        from gpt2ipu.data.hub import hub_parts
        hub = dict(hf or {})
        listed = hub_parts(repo=hub.get("repo"), subset=hub.get("subset"), split=hub.get("split", "train"),
                           revision=hub.get("revision"), files=hub.get("files"), max_files=hub.get("max_files"),
                           max_tokens=hub.get("max_tokens"),
                           bytes_per_token=hub.get("bytes_per_token") or DEFAULT_BYTES_PER_TOKEN)
        parts = listed.pop("parts")
        manifest.update(listed)
    else:
        raise UserError(f"config key dataset is {dataset!r}; it must be one of: {', '.join(DATASETS)}")
    manifest["parts"] = parts
    write_text_atomic(out_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return parts


def text_parts(text: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parts of the user's corpus files (config section `text`; see gpt2ipu.data.corpus)."""
    from gpt2ipu.data.corpus import find_corpus_files, plan_parts, refuse_duplicate_files

    txt_unit = text.get("txt_unit", "file")
    files = find_corpus_files(list(text.get("paths") or []))
    parts = plan_parts(files, part_bytes=int(text.get("part_bytes") or DEFAULT_PART_BYTES), txt_unit=txt_unit)
    refuse_duplicate_files(parts)
    return parts


def manifest_part(manifest_path: str | Path, part: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(the manifest, the entry of the part named `part`, its 1-based number) from a manifest file."""
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    names = [entry["name"] for entry in manifest["parts"]]
    if part not in names:
        raise UserError(f"{manifest_path}: has no part {part!r} (parts: {', '.join(names)})")
    index = names.index(part)
    return manifest, manifest["parts"][index], index + 1


def dump_part(manifest_path: str | Path, part: str, out_dir: str | Path, *, dataset: str,
              sample: Mapping[str, Any] | None = None, retries: int = 5) -> dict[str, Any]:
    """Make the dump part named `part` of the manifest in `out_dir`: generated (`dataset` sample,
    with the `sample` config's pages and seed) or downloaded and sha1-checked (enwiki)."""
    manifest, entry, number = manifest_part(manifest_path, part)
    if dataset == "sample":
        from gpt2ipu.data.sample_dump import write_sample_part
        return write_sample_part(out_dir, part=number, parts=len(manifest["parts"]), pages=sample["pages"],
                                 seed=sample["seed"])
    if dataset == "enwiki":
        from gpt2ipu.data.download import download_part
        return download_part(entry["url"], out_dir, sha1=entry["sha1"], retries=retries)
    if dataset == "hf":
        from gpt2ipu.data.hub import download_hub_part
        return download_hub_part(entry, out_dir, repo=manifest["repo"], revision=manifest["revision"])
    raise UserError(f"dataset {dataset!r}: its dump parts are used in place, not made")


# ----------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="dump_action", metavar="ACTION", required=True)

    manifest = actions.add_parser("manifest", help="list the dump parts of a dataset as JSON")
    manifest.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    manifest.add_argument("--out", required=True, help="manifest JSON file to write")
    manifest.add_argument("--sample-parts", type=int, default=1, help="sample: number of parts")
    manifest.add_argument("--local-path", action="append", default=[],
                          help="local: a .xml or .xml.bz2 dump (repeatable)")
    manifest.add_argument("--mirror", default=DEFAULT_MIRROR, help="enwiki: dump mirror base URL")
    manifest.add_argument("--date", default="latest", help="enwiki: dump date, e.g. 20240601, or latest")
    manifest.add_argument("--max-parts", type=int, default=None, help="enwiki: use only the first N parts")
    manifest.add_argument("--text-path", action="append", default=[],
                          help="text: a corpus file, folder or glob (repeatable)")
    manifest.add_argument("--part-bytes", type=int, default=DEFAULT_PART_BYTES,
                          help="text: about this many bytes a part")
    manifest.add_argument("--txt-unit", choices=TXT_UNITS, default="file",
                          help="text: a .txt file is one document (file) or holds one per line (line)")
    manifest.add_argument("--hf-repo", help="hf: the Hub dataset, owner/name")
    manifest.add_argument("--hf-subset", default=None, help="hf: the dataset card's config name")
    manifest.add_argument("--hf-split", default="train", help="hf: the split (default train)")
    manifest.add_argument("--hf-revision", default="main", help="hf: branch, tag or commit (default main)")
    manifest.add_argument("--hf-files", action="append", default=None, help="hf: a glob over the repo's files")
    manifest.add_argument("--max-files", type=int, default=None, help="hf: only the first N files")
    manifest.add_argument("--max-tokens", type=int, default=None,
                          help="hf: download only the files needed for about N tokens")

    sample_text = actions.add_parser("sample-text", help="write a generated text corpus (Parquet, JSON lines, text)")
    sample_text.add_argument("--out", required=True,
                             help="file to write; its suffix picks the format "
                                  "(.parquet, .jsonl, .jsonl.gz, .jsonl.zst, .txt)")
    sample_text.add_argument("--documents", type=int, default=10000, help="documents to write (default 10000)")
    sample_text.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")

    part = actions.add_parser("part", help="make one part of a manifest (sample: generate, enwiki/hf: download)")
    part.add_argument("--manifest", required=True, help="the manifest JSON (gpt2ipu dump manifest)")
    part.add_argument("--part", required=True, help="the part's name in the manifest")
    part.add_argument("--out-dir", required=True, help="the part's folder")

    sample = actions.add_parser("sample", help="write one part of the embedded generated dump")
    sample.add_argument("--out-dir", required=True, help="folder to write pages.xml.bz2 and provenance.json into")
    sample.add_argument("--part", type=int, default=1, help="1-based part number")
    sample.add_argument("--parts", type=int, default=1, help="how many parts the sample is split into (default 1)")
    sample.add_argument("--pages", type=int, default=3000, help="pages in all parts together")
    sample.add_argument("--seed", type=int, default=1234,
                        help="generator seed: same seed, byte-identical dump (default 1234)")

    download = actions.add_parser("download", help="download one enwiki part, resumable, sha1-checked")
    download.add_argument("--url", required=True, help="URL of one dump part (pages-articlesN.xml-pA pB.bz2)")
    download.add_argument("--sha1", required=True,
                          help="the part's sha1 from the mirror's sha1sums file; checked before the part appears")
    download.add_argument("--out-dir", required=True,
                          help="folder to write pages.xml.bz2 into (a .partial beside it resumes)")
    download.add_argument("--retries", type=int, default=5, help="attempts per download, with backoff (default 5)")
    download.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")


def run(args: argparse.Namespace) -> int:
    if args.dump_action == "manifest":
        text = {"paths": args.text_path, "part_bytes": args.part_bytes, "txt_unit": args.txt_unit}
        hf = {"repo": args.hf_repo, "subset": args.hf_subset, "split": args.hf_split, "revision": args.hf_revision,
              "files": args.hf_files, "max_files": args.max_files, "max_tokens": args.max_tokens}
        result: Any = dump_manifest(args.out, dataset=args.dataset, sample_parts=args.sample_parts,
                                    local_paths=args.local_path, enwiki_mirror=args.mirror,
                                    enwiki_date=args.date, enwiki_max_parts=args.max_parts, text=text, hf=hf)
    elif args.dump_action == "sample-text":
        from gpt2ipu.data.sample_text import write_sample_corpus
        result = write_sample_corpus(args.out, documents=args.documents, seed=args.seed)
    elif args.dump_action == "part":
        manifest = json.loads(Path(args.manifest).read_text(encoding="utf-8"))
        result = dump_part(args.manifest, args.part, args.out_dir, dataset=manifest["dataset"])
    elif args.dump_action == "sample":
        from gpt2ipu.data.sample_dump import write_sample_part
        result = write_sample_part(args.out_dir, part=args.part, parts=args.parts, pages=args.pages, seed=args.seed)
    else:
        from gpt2ipu.data.download import download_part
        result = download_part(args.url, args.out_dir, sha1=args.sha1, retries=args.retries, timeout=args.timeout)
    print(json.dumps(result, ensure_ascii=False))
    return 0
