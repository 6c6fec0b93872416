"""Evaluation sets: LAMBADA, the WikiText word-level test sets and HellaSwag, downloaded or generated.

Real sets are fetched by URL (config `evaluate.lambada` / `evaluate.wikitext`; a `file://` URL
takes a copy you already have), resumably, into `<out_dir>.partial`, and the data file is checked
against its sha256 before `<out_dir>/<file>` appears. For the WikiText zips the hash is the one
of the member we use (`wiki.test.tokens`), so a re-zipped archive with the same test file still
passes. A null sha256 means "not pinned": the file is used and its sha256 recorded in
provenance.json and printed, so it can be pinned.

The embedded default (`sample`) writes small sets in exactly the real files' formats, generated
offline from the same seeded grammar as the sample Wikipedia dump (gpt2ipu/data/sample_dump.py),
so a model trained on the sample has something meaningful to be scored on:

- LAMBADA: JSON lines `{"text": passage}`, each passage's last word a name or noun that occurs
  earlier in it, with no final punctuation (as in LAMBADA).
- WikiText: `wiki.test.tokens` layout: every line starts with a space and ends with " \\n";
  ` = Title = ` / ` = = Section = = ` headings, one paragraph per line, blank lines around
  headings; word-level tokens (punctuation split off, ` @-@ `, ` @,@ `, ` @.@ ` inside words and
  numbers, ` 's`), and rare words replaced by `<unk>`.
- HellaSwag: `hellaswag_val.jsonl` lines (the authors' release, rowanz/hellaswag): `ind`,
  `activity_label`, `ctx_a`, `ctx_b`, `ctx` (= ctx_a + " " + ctx_b), four `endings`, `label`,
  `source_id`, `split`, `split_type`; ActivityNet-like items (a lower-case `ctx_b` that the
  ending completes) and WikiHow-like ones (`[header]`, `[title]`, `[step]`, `[substeps]`
  markers, an empty `ctx_b`), the right ending about the context's subject, the others about
  other subjects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, parse_json_record, sha256_file
from gpt2ipu.log import package_logger
from gpt2ipu.provenance import write_provenance

log = package_logger(__name__)

LAMBADA_NAME = "lambada_test.jsonl"
WIKITEXT_NAME = "wiki.test.tokens"
HELLASWAG_NAME = "hellaswag_val.jsonl"
# Eval set name -> the file its folder holds.
EVAL_SETS = {"lambada": LAMBADA_NAME, "wikitext-103": WIKITEXT_NAME, "wikitext-2": WIKITEXT_NAME,
             "hellaswag": HELLASWAG_NAME}
LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"
WIKITEXT2_TEST_SHA256 = "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"
# Where the real sets live (the defaults of config `evaluate`); the WikiText-103 test file's and
# HellaSwag's hashes are not pinned because they could not be verified here (the WikiText-2 one is
# the file's own).
DEFAULT_SOURCES: dict[str, dict[str, Any]] = {
    "lambada": {"url": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                "member": None, "sha256": LAMBADA_SHA256},
    "wikitext-103": {"url": "https://wikitext.smerity.com/wikitext-103-v1.zip",
                     "member": "wikitext-103/wiki.test.tokens", "sha256": None},
    "wikitext-2": {"url": "https://wikitext.smerity.com/wikitext-2-v1.zip",
                   "member": "wikitext-2/wiki.test.tokens", "sha256": WIKITEXT2_TEST_SHA256},
    "hellaswag": {"url": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                  "member": None, "sha256": None},
}
SAMPLE_SEED = 4242


# ----------------------------------------------------------------------------------------------
# Reading (with the checks that make a bad file a clear error)

def data_file(path: str | os.PathLike, name: str) -> Path:
    """`path` itself, or `path/<name>` when `path` is an eval-set folder."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise UserError(f"{path}: evaluation file not found; make it with `gpt2ipu evaluate data` "
                        f"or the Snakemake targets, or pass the path of a {name}")
    return path


def read_lambada(path: str | os.PathLike) -> list[str]:
    """The passages of a LAMBADA JSON-lines file (blank lines skipped)."""
    path = data_file(path, LAMBADA_NAME)
    texts = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            text = parse_json_record(line, path, number, "text", "a LAMBADA record",
                                     hint='LAMBADA files hold one {"text": ...} object per line')["text"]
            if len(text.split()) < 2:
                raise UserError(f"{path}:{number}: the passage has fewer than two words, so it has no "
                                "context before its last word")
            texts.append(text)
    if not texts:
        raise UserError(f"{path}: no LAMBADA records (the file is empty); fetch it again with "
                        "`gpt2ipu evaluate data --set lambada`")
    return texts


def read_wikitext(path: str | os.PathLike) -> str:
    """The whole word-level text of a WikiText `wiki.test.tokens` file."""
    path = data_file(path, WIKITEXT_NAME)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err}); is it a WikiText .tokens file?") from None
    if not text.strip():
        raise UserError(f"{path}: the WikiText file is empty; fetch it again with `gpt2ipu evaluate data`")
    return text


HELLASWAG_HINT = ('HellaSwag files hold one JSON object per line with "activity_label", "ctx_a", "ctx_b", '
                  '"ctx", "endings" (a list of strings) and "label" (the right ending\'s index), as the '
                  "authors' hellaswag_val.jsonl")


def _hellaswag_record(line: bytes, path: Path, number: int) -> dict[str, Any]:
    record = parse_json_record(line, path, number, "ctx", "a HellaSwag record", hint=HELLASWAG_HINT)
    for field in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(record.get(field), str):
            raise UserError(f'{path}:{number}: a HellaSwag record needs a string "{field}" field; {HELLASWAG_HINT}')
    endings = record.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise UserError(f'{path}:{number}: "endings" must be a list of at least two strings; {HELLASWAG_HINT}')
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():   # the Hugging Face copy's labels are strings
        label = int(label)
    if "label" not in record or label == "":
        raise UserError(f"{path}:{number}: the HellaSwag record has no label (the test split has none): "
                        "evaluate on the validation set, hellaswag_val.jsonl")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f'{path}:{number}: "label" must be the index of the right ending, 0 to '
                        f"{len(endings) - 1}, not {record['label']!r}; {HELLASWAG_HINT}")
    return {**record, "label": label}


def read_hellaswag(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a HellaSwag JSON-lines file (blank lines skipped), labels as ints."""
    path = data_file(path, HELLASWAG_NAME)
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_hellaswag_record(line, path, number))
    if not records:
        raise UserError(f"{path}: no HellaSwag records (the file is empty); fetch it again with "
                        "`gpt2ipu evaluate data --set hellaswag`")
    return records


# ----------------------------------------------------------------------------------------------
# Generated sets (the embedded default)

_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>")
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")


def _plain(wikitext_sentence: str) -> str:
    """A sample-dump sentence without its markup: refs dropped, links replaced by their label."""
    return _LINK.sub(r"\1", _REF.sub("", wikitext_sentence)).replace("'''", "").replace("''", "")


def _sample_world(seed: int, pages: int):
    from gpt2ipu.data import sample_dump

    world = sample_dump.World(pages, seed)
    return sample_dump, world


def sample_lambada_texts(records: int, seed: int = SAMPLE_SEED) -> list[str]:
    """LAMBADA-like passages: a few sentences about one subject, ending with a word seen before."""
    sample_dump, world = _sample_world(seed, max(40, records))
    texts = []
    for index in range(records):
        rng = random.Random(f"gpt2ipu-eval:{seed}:lambada:{index}")
        plan = rng.choice(world.articles)
        writer = sample_dump.Writer(world, plan, rng)
        context = [_plain(writer.sentence()) for _ in range(rng.randint(3, 5))]
        target = plan.name
        noun = rng.choice(plan.topic.nouns)
        context.insert(rng.randrange(len(context)), f"Everyone called the {noun} {target}.")
        closing = rng.choice((f"Years later, the {noun} was still known as",
                              f"When asked about the {noun}, the old guide simply answered",
                              f"On the map, the {noun} was marked"))
        texts.append(" ".join(context) + f" {closing} {target}")
    return texts


def _sentence_parts(writer) -> tuple[str, str]:
    """A plain sentence of the sample grammar split after its first two words: (start, rest)."""
    words = _plain(writer.sentence()).split()
    while len(words) < 4:
        words = _plain(writer.sentence()).split()
    return " ".join(words[:2]), " ".join(words[2:])


def sample_hellaswag_records(items: int, seed: int = SAMPLE_SEED) -> list[dict[str, Any]]:
    """HellaSwag-format items: a context about one subject; the right ending continues it, the
    three others are sentence ends written about other subjects."""
    sample_dump, world = _sample_world(seed, max(40, items))
    records = []
    for index in range(items):
        rng = random.Random(f"gpt2ipu-eval:{seed}:hellaswag:{index}")
        plan = rng.choice(world.articles)
        writer = sample_dump.Writer(world, plan, rng)
        others = [sample_dump.Writer(world, other, rng)
                  for other in rng.sample([a for a in world.articles if a.topic is not plan.topic], 3)]
        noun = rng.choice(plan.topic.nouns)
        label = rng.randrange(4)
        if rng.random() < 0.6:   # ActivityNet-like: ctx_b starts the sentence the ending completes
            source_id = f"activitynet~v_{rng.getrandbits(40):010x}"
            activity_label = f"Visiting the {noun}"
            ctx_a = " ".join(_plain(writer.sentence()) for _ in range(rng.randint(1, 2)))
            start, gold = _sentence_parts(writer)
            ctx_b = start[0].lower() + start[1:] if not start.startswith(plan.name) else start
            endings = [_sentence_parts(other)[1] for other in others]
        else:                    # WikiHow-like: bracketed section markers, ctx_b often empty
            source_id = f"wikihow~{rng.randint(1000, 99999)}"
            activity_label = f"Travel and {plan.topic.key.capitalize()}s"
            ctx_a = (f"[header] How to find the {noun} of {plan.name} [title] "
                     f"{_plain(writer.sentence())} [step] {_plain(writer.sentence())}")
            ctx_b = "" if rng.random() < 0.7 else "then"
            gold = _plain(writer.sentence())
            endings = [_plain(other.sentence()) for other in others]
            if rng.random() < 0.5:
                gold += f" [substeps] Ask about the {noun}."
        endings.insert(label, gold)
        records.append({"ind": index, "activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                        "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "split": "val",
                        "split_type": rng.choice(("indomain", "zeroshot")), "label": label,
                        "endings": endings, "source_id": source_id})
    return records


def write_hellaswag_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_lambada_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def wikitext_tokenize(text: str) -> str:
    """Plain English -> WikiText's word-level form (the inverse of the detokenizer, roughly)."""
    # Separators inside numbers and words become placeholders first, so splitting off punctuation
    # below leaves them whole; then they are written the WikiText way.
    text = re.sub(r"(?<=\d),(?=\d)", "\x00", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x01", text)
    text = re.sub(r"(?<=\w)-(?=\w)", "\x02", text)
    text = re.sub(r"(?<=\w)'s\b", " 's", text)
    text = re.sub(r'([.,;:!?()"\u2014])', r" \1 ", text)
    text = text.replace("\x00", " @,@ ").replace("\x01", " @.@ ").replace("\x02", " @-@ ")
    return " ".join(text.split())


def _unk_rare(words: str, rng: random.Random, rate: float = 0.08) -> str:
    # WikiText keeps a fixed vocabulary and writes every other word as <unk>; names are the
    # rare words here.
    return " ".join("<unk>" if w[:1].isupper() and len(w) > 3 and rng.random() < rate else w
                    for w in words.split())


def _sample_paragraph(sample_dump, writer, rng: random.Random) -> str:
    sentences = [_plain(writer.sentence()) for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.5:
        noun = rng.choice(writer.topic.nouns)
        sentences.append(f"The well-known {noun} is {rng.randint(1000, 99999):,} metres long and "
                         f"{rng.randint(1, 9)}.{rng.randint(0, 9)} km wide.")
    return _unk_rare(wikitext_tokenize(" ".join(sentences)), rng)


def sample_wikitext(articles: int, seed: int = SAMPLE_SEED) -> str:
    """A `wiki.test.tokens`-format text of `articles` generated articles."""
    sample_dump, world = _sample_world(seed, max(40, articles * 2))
    lines = [""]
    for index in range(articles):
        rng = random.Random(f"gpt2ipu-eval:{seed}:wikitext:{index}")
        plan = world.articles[index % len(world.articles)]
        writer = sample_dump.Writer(world, plan, rng)
        if index:
            lines += [""]
        lines += [f"= {wikitext_tokenize(plan.title)} =", ""]
        lines += [_sample_paragraph(sample_dump, writer, rng) for _ in range(rng.randint(1, 2))]
        for heading in rng.sample(plan.topic.sections, rng.randint(2, 4)):
            lines += ["", f"= = {heading} = =", ""]
            lines += [_sample_paragraph(sample_dump, writer, rng) for _ in range(rng.randint(1, 3))]
        lines += [""]
    return "".join(f" {line} \n" if line else " \n" for line in lines)


# ----------------------------------------------------------------------------------------------
# Download

CONFIG_HINT = "check the config keys evaluate.lambada / evaluate.wikitext / evaluate.hellaswag (url, sha256)"


def _fetch(url: str, partial: Path, retries: int, timeout: float, backoff_s: float) -> None:
    """`url` into `partial`, resuming what is there (the dump downloader's resumable fetch)."""
    from gpt2ipu.data.download import fetch_with_retries

    fetch_with_retries(url, partial, retries=retries, timeout=timeout, backoff_s=backoff_s, config_hint=CONFIG_HINT)


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return None


def _extract_member(archive: Path, member: str, dest: Path, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise UserError(f"{url}: the archive has no member {member!r}; {CONFIG_HINT} (member)") from None
    except zipfile.BadZipFile as err:
        archive.unlink(missing_ok=True)
        raise UserError(f"{url}: not a valid zip archive ({err}); the download was deleted, rerun to "
                        f"fetch it again, or {CONFIG_HINT}") from None


def fetch_eval_file(name: str, out_dir: str | os.PathLike, *, url: str, sha256: str | None,
                    member: str | None = None, retries: int = 5, timeout: float = 60,
                    backoff_s: float = 2.0) -> dict[str, Any]:
    """Download (or copy) eval set `name` into `<out_dir>/<file>` + provenance.json, sha256-checked."""
    file_name = EVAL_SETS[name]
    out_dir = Path(out_dir)
    start = time.perf_counter()
    local = _local_path(url)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if local is not None:
        if not local.is_file():
            raise UserError(f"{local}: file not found (from url {url}); {CONFIG_HINT}")
        source = local
    else:
        partial.parent.mkdir(parents=True, exist_ok=True)
        _fetch(url, partial, retries, timeout, backoff_s)
        source = partial
    with atomic_dir(out_dir) as tmp:
        target = tmp / file_name
        if member:
            _extract_member(source, member, target, url)
        else:
            shutil.copyfile(source, target)
        actual = sha256_file(target)
        if sha256 and actual != sha256.lower():
            if source == partial:
                partial.unlink(missing_ok=True)
            raise UserError(f"checksum mismatch for {url}{f' ({member})' if member else ''}: expected sha256 "
                            f"{sha256}, got {actual}; the bad file was deleted, rerun to fetch it again "
                            f"(if it fails again, the URL serves other bytes: {CONFIG_HINT})")
        if not sha256:
            log.info(f"note: {url} is not pinned; its sha256 is {actual} (set it in the config to pin it)")
        figures = check_format(name, target)
        figures.update(bytes=target.stat().st_size, sha256=actual, verified=bool(sha256),
                       seconds=round(time.perf_counter() - start, 3))
        write_provenance(tmp, "eval_data", {"set": name, "source": "download", "url": url,
                                            "member": member, "sha256": sha256}, [], figures)
    if source == partial:
        partial.unlink(missing_ok=True)
    return figures


def check_format(name: str, path: Path) -> dict[str, Any]:
    """Read a fetched or generated file as the evaluation will, so a bad one fails here."""
    if name == "lambada":
        return {"records": len(read_lambada(path))}
    if name == "hellaswag":
        return {"records": len(read_hellaswag(path))}
    text = read_wikitext(path)
    return {"lines": text.count("\n"), "words": len(text.split())}


def sample_size(name: str, **sizes: int) -> dict[str, int]:
    """The one of the sample-size settings that applies to set `name`."""
    key = {"lambada": "lambada_records", "hellaswag": "hellaswag_items"}.get(name, "wikitext_articles")
    return {key: sizes[key]}


def write_sample_set(name: str, out_dir: str | os.PathLike, *, lambada_records: int = 200,
                     wikitext_articles: int = 12, hellaswag_items: int = 100,
                     seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """The generated set `name` in `<out_dir>/<file>` + provenance.json (byte-identical per seed)."""
    if name not in EVAL_SETS:
        raise UserError(f"unknown evaluation set {name!r}: choose one of {', '.join(EVAL_SETS)}")
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        target = tmp / EVAL_SETS[name]
        if name == "lambada":
            write_lambada_jsonl(target, sample_lambada_texts(lambada_records, seed))
        elif name == "hellaswag":
            write_hellaswag_jsonl(target, sample_hellaswag_records(hellaswag_items, seed))
        else:
            target.write_text(sample_wikitext(wikitext_articles, seed), encoding="utf-8", newline="\n")
        figures = check_format(name, target)
        figures.update(bytes=target.stat().st_size, sha256=sha256_file(target),
                       seconds=round(time.perf_counter() - start, 3))
        write_provenance(tmp, "eval_data", {"set": name, "source": "sample", "seed": seed,
                                            **sample_size(name, lambada_records=lambada_records,
                                                          wikitext_articles=wikitext_articles,
                                                          hellaswag_items=hellaswag_items)}, [], figures)
    return figures


def prepare_eval_set(name: str, out_dir: str | os.PathLike, *, source: str, url: str | None = None,
                     sha256: str | None = None, member: str | None = None, retries: int = 5,
                     lambada_records: int = 200, wikitext_articles: int = 12, hellaswag_items: int = 100,
                     seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """Eval set `name` in `out_dir`: `source` "sample" (generated) or "download" (url, sha256)."""
    if name not in EVAL_SETS:
        raise UserError(f"unknown evaluation set {name!r}: choose one of {', '.join(EVAL_SETS)}")
    if source == "sample":
        return write_sample_set(name, out_dir, lambada_records=lambada_records,
                                wikitext_articles=wikitext_articles, hellaswag_items=hellaswag_items, seed=seed)
    if source != "download":
        raise UserError(f"evaluation data source {source!r}: choose sample or download")
    if url is None:   # the known source of the real set, with its pinned hash
        url, member, sha256 = (DEFAULT_SOURCES[name][key] for key in ("url", "member", "sha256"))
    return fetch_eval_file(name, out_dir, url=url, sha256=sha256, member=member, retries=retries)
