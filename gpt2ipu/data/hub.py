"""Dataset `hf`: a Hugging Face Hub dataset by name, its files downloaded through `huggingface_hub`.

    hf: {repo: HuggingFaceFW/fineweb-edu, subset: sample-10BT, split: train}

The manifest (`hub_parts`) resolves `revision` (a branch, tag or sha; `main` by default) to the
commit sha and keeps it, so every later download of the run reads the same bytes. The files of a
subset and split are the ones the dataset card's `configs:` section names (how the `datasets`
library finds them); a card without `configs:` takes the files whose path names the split (a
folder `<split>/`, or a file `<split>-*` / `<split>_*` / `<split>.*`); `files` (globs over the
repository's paths) picks files directly. Each file is one part, in path order; `max_files` keeps the first N.
`max_tokens` keeps the first files whose sizes cover `max_tokens x bytes_per_token` (an estimate,
to download no more than needed), and the shards stage then uses exactly the first `max_tokens`.

Downloads (`download_hub_part`) go through `hf_hub_download` into the Hub cache
(`HF_HUB_CACHE` / `HF_HOME`; resumed from its `.incomplete` file after an interruption, shared with
every other library that uses the cache); with `HF_HUB_OFFLINE=1` cached files are used without a
request. `HF_TOKEN` (or `huggingface-cli login`) reaches gated and private datasets. The part
folder gets a symbolic link to the cached file, checked against the Hub's sha256 first.

The few Hub calls made are behind `hub_api` and `hub_download`, which tests replace with a local
stand-in (no test touches the network).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2ipu.data.corpus import corpus_format, part_name, unique_names
from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, sha256_file
from gpt2ipu.provenance import write_provenance

DEFAULT_BYTES_PER_TOKEN = 1.5
OFFLINE_ADVICE = ("the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network): run this once where the Hub "
                  "is reachable (the files are then read from the Hugging Face cache), or copy the files and use "
                  "dataset: text")


def hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def hub_download(repo: str, filename: str, revision: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, repo_type="dataset", revision=revision)


def explain_hub_error(err: Exception, repo: str, what: str) -> UserError | None:
    """One message for the Hub's errors a user can cause or fix; None for anything else."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return UserError(f"hf.repo {repo}: the dataset is gated; accept its terms on https://huggingface.co/datasets/"
                         f"{repo} and set HF_TOKEN (or run `hf auth login`) with a token that may read it")
    if isinstance(err, errors.RepositoryNotFoundError):
        return UserError(f"hf.repo {repo}: no such dataset on the Hub (or it is private: set HF_TOKEN); check the "
                         "name, e.g. HuggingFaceFW/fineweb-edu")
    if isinstance(err, errors.RevisionNotFoundError):
        return UserError(f"hf.revision: {repo} has no revision {what}; give a branch, tag or commit sha")
    if isinstance(err, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return UserError(f"{repo}: {what} is not in the Hugging Face cache and {OFFLINE_ADVICE}")
    if isinstance(err, (ConnectionError, OSError)) or type(err).__name__ in ("ConnectError", "ConnectTimeout"):
        return UserError(f"{repo}: cannot reach the Hub for {what} ({err}); {OFFLINE_ADVICE}")
    return None


def path_glob_regex(pattern: str) -> re.Pattern:
    """The Hub's (fsspec's) glob: `*` and `?` stay within one folder, `**` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def config_data_files(card_configs: Any, subset: str | None, split: str, repo: str) -> list[str] | None:
    """Globs the card's `configs:` gives for (subset, split); None when the card declares none."""
    if not card_configs:
        return None
    by_name = {c.get("config_name", "default"): c for c in card_configs if isinstance(c, dict)}
    name = subset or ("default" if "default" in by_name else next(iter(by_name)) if len(by_name) == 1 else None)
    if name not in by_name:
        raise UserError(f"hf.subset {subset!r}: {repo} has no such subset; its subsets: {', '.join(sorted(by_name))}")
    data_files = by_name[name].get("data_files")
    if isinstance(data_files, (str, list)) and all(isinstance(d, str) for d in
                                                  ([data_files] if isinstance(data_files, str) else data_files)):
        data_files = [{"split": "train", "path": data_files}]
    splits = {entry["split"]: entry["path"] for entry in data_files or [] if isinstance(entry, dict)}
    if split not in splits:
        raise UserError(f"hf.split {split!r}: subset {name} of {repo} has no such split; its splits: "
                        f"{', '.join(sorted(splits)) or 'none'}")
    paths = splits[split]
    return [paths] if isinstance(paths, str) else list(paths)


def split_named(path: str, split: str) -> bool:
    parts = path.split("/")
    return split in parts[:-1] or re.match(rf"{re.escape(split)}[-._0-9]", parts[-1]) is not None


def hub_parts(*, repo: str, subset: str | None, split: str, revision: str | None, files: Sequence[str] | None,
              max_files: int | None, max_tokens: int | None,
              bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN) -> dict[str, Any]:
    """The manifest fields of a Hub dataset: `repo`, `revision` (the commit sha), `parts` (one per file,
    `{"name", "repo_file", "bytes", "sha256", "format"}`)."""
    if not repo or repo.count("/") != 1:
        raise UserError(f"config key hf.repo is {repo!r}: give a Hub dataset as owner/name, e.g. "
                        "HuggingFaceFW/fineweb-edu")
    api = hub_api()
    requested = revision or "main"
    try:
        info = api.dataset_info(repo, revision=requested)
        sha = info.sha
        tree = [entry for entry in api.list_repo_tree(repo, recursive=True, revision=sha, repo_type="dataset")
                if getattr(entry, "size", None) is not None]
    except Exception as err:
        explained = explain_hub_error(err, repo, requested)
        if explained is None:
            raise
        raise explained from None
    if files:
        patterns = list(files)
    else:
        card = getattr(info, "card_data", None)
        configs = card.to_dict().get("configs") if card is not None else None
        patterns = config_data_files(configs, subset, split, repo)
    if patterns is None:
        if subset:
            raise UserError(f"hf.subset {subset!r}: the card of {repo} declares no subsets (configs); set hf.subset "
                            "null, or pick files with hf.files")
        chosen = [e for e in tree if corpus_format(e.path) and split_named(e.path, split)]
    else:
        regexes = [path_glob_regex(p) for p in patterns]
        chosen = [e for e in tree if corpus_format(e.path) and any(r.match(e.path) for r in regexes)]
    chosen.sort(key=lambda e: e.path)
    if not chosen:
        raise UserError(f"{repo} at {sha[:12]}: no .parquet / .jsonl(.gz/.zst) / .txt file for subset {subset!r}, "
                        f"split {split!r}{f', files {list(files)}' if files else ''}; check hf.subset, hf.split, "
                        "hf.files")
    if max_files is not None:
        chosen = chosen[:max_files]
    if max_tokens is not None:
        chosen = files_for_tokens(chosen, max_tokens, bytes_per_token)
    parts = [{"name": part_name(Path(e.path), Path()), "repo_file": e.path, "bytes": e.size,
              "sha256": getattr(getattr(e, "lfs", None), "sha256", None), "format": corpus_format(e.path)}
             for e in chosen]
    return {"repo": repo, "subset": subset, "split": split, "revision": sha, "revision_requested": requested,
            "parts": unique_names(parts)}


def files_for_tokens(entries: list, max_tokens: int, bytes_per_token: float) -> list:
    """The first entries whose sizes add up to `max_tokens x bytes_per_token` (at least one)."""
    wanted, total, taken = max_tokens * bytes_per_token, 0, []
    for entry in entries:
        if total >= wanted:
            break
        taken.append(entry)
        total += entry.size
    return taken


def download_hub_part(entry: dict[str, Any], out_dir: str | os.PathLike, *, repo: str,
                      revision: str) -> dict[str, Any]:
    """Fetch one part's file into the Hub cache and link it from `out_dir` (written atomically)."""
    started = time.perf_counter()
    try:
        cached = Path(hub_download(repo, entry["repo_file"], revision))
    except Exception as err:
        explained = explain_hub_error(err, repo, entry["repo_file"])
        if explained is None:
            raise
        raise explained from None
    if entry.get("sha256"):
        actual = sha256_file(cached)
        if actual != entry["sha256"]:
            raise UserError(f"{cached}: sha256 {actual} but the Hub lists {entry['sha256']} for {entry['repo_file']}; "
                            "delete the cached file and rerun")
    name = Path(entry["repo_file"]).name
    with atomic_dir(out_dir) as tmp:
        (tmp / name).symlink_to(cached.resolve())
        figures = {"bytes": cached.stat().st_size, "seconds": round(time.perf_counter() - started, 3)}
        write_provenance(tmp, "dump_part", {"repo": repo, "revision": revision, "repo_file": entry["repo_file"],
                                            "sha256": entry.get("sha256")}, [cached], figures)
    return {"part": entry["name"], **figures}


def hub_part_file(part_dir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    return Path(part_dir) / Path(entry["repo_file"]).name
