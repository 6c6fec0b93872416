"""The real dump: the enwiki article parts listed by a dump's sha1sums.txt, downloaded resumably.

A dump date's folder (`{mirror}/enwiki/{date}/`) holds the articles three ways: one combined
`pages-articles.xml.bz2`, the same split into numbered parts (`pages-articles1.xml-p1p41242.bz2`,
...), and "multistream" variants of both. We take the numbered parts: each is a standalone
export, so they download, verify and extract in parallel and a failure costs one part.

A download keeps its bytes in `<out_dir>.partial`, beside the output folder and outside any
temporary folder (those are deleted on failure), so a killed or failed download resumes from
where it stopped with an HTTP Range request. The sha1 from the dump's own checksum list is
verified before `<out_dir>/pages.xml.bz2` appears.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, file_digest
from gpt2ipu.log import package_logger
from gpt2ipu.provenance import write_provenance

log = package_logger(__name__)

PAGES_NAME = "pages.xml.bz2"
# Small network reads: bytes in a read cut short by a dropped connection are lost, the rest are
# kept for the resume.
NETWORK_CHUNK_BYTES = 64 << 10
HASH_CHUNK_BYTES = 1 << 20
CONFIG_HINT = "check the config keys enwiki.mirror and enwiki.date (a dump date such as 20240601, or latest)"


def dump_folder_url(mirror: str, date: str) -> str:
    return f"{mirror.rstrip('/')}/enwiki/{date}"


def enwiki_index_url(mirror: str) -> str:
    """The mirror's `enwiki/` folder listing: one link per dump date."""
    return f"{mirror.rstrip('/')}/enwiki/"


def offered_dates(mirror: str) -> list[str] | None:
    """The dump dates the mirror's `enwiki/` index links to (hrefs like `20240601/`), oldest first;
    None when the index cannot be read."""
    try:
        response = requests.get(enwiki_index_url(mirror), timeout=60)
        response.raise_for_status()
    except requests.RequestException:
        return None
    return sorted(set(re.findall(r"""href=["']?(?:[^"'>]*/)?(\d{8})/?["'>]""", response.text)))


def _dates_hint(mirror: str) -> str:
    dates = offered_dates(mirror)
    if dates is None:
        return f"the mirror's index {enwiki_index_url(mirror)} could not be read to list its dates"
    if not dates:
        return f"the mirror's index {enwiki_index_url(mirror)} lists no dump dates"
    return f"the mirror offers: {', '.join(dates)}"


def _articles_done(mirror: str, date: str) -> bool:
    """Whether the dump `date` has its article parts finished: its dumpstatus.json says the
    articlesdump job is done, or (no readable dumpstatus.json) its checksum list names them."""
    folder = dump_folder_url(mirror, date)
    try:
        response = requests.get(f"{folder}/dumpstatus.json", timeout=60)
        if response.status_code == 200:
            return response.json().get("jobs", {}).get("articlesdump", {}).get("status") == "done"
        response = requests.get(f"{folder}/enwiki-{date}-sha1sums.txt", timeout=60)
        return response.status_code == 200 and f"enwiki-{date}-pages-articles1.xml-p" in response.text
    except (requests.RequestException, ValueError, AttributeError):
        return False


def resolve_dump_date(mirror: str, date: str) -> str:
    """`date` itself, or for `latest` the concrete date the mirror's latest dump has.

    Read from `enwiki/latest/enwiki-latest-pages-articles.xml.bz2-rss.xml` (the feed the dump
    servers and their static mirrors keep beside the `latest` links, naming `.../enwiki/DATE`),
    else the newest date in the mirror's `enwiki/` index whose article parts are done."""
    if date != "latest":
        return date
    rss_url = f"{dump_folder_url(mirror, 'latest')}/enwiki-latest-pages-articles.xml.bz2-rss.xml"
    try:
        response = requests.get(rss_url, timeout=60)
        if response.status_code == 200:
            found = re.findall(r"/enwiki/(\d{8})", response.text)
            if found:
                return max(found)
    except requests.RequestException:
        pass
    dates = offered_dates(mirror)
    for candidate in reversed(dates or []):
        if _articles_done(mirror, candidate):
            return candidate
    raise UserError(f"enwiki.date is latest, but the mirror {mirror} does not say which date that is: "
                    f"{rss_url} names no dump date and "
                    + ("its enwiki/ index could not be read" if dates is None
                       else f"no date in its enwiki/ index ({', '.join(dates) or 'none listed'}) has finished "
                            "article parts")
                    + "; set enwiki.date to a dump date (e.g. 20240601) or enwiki.mirror to another mirror")


def enwiki_manifest(mirror: str, date: str, max_parts: int | None = None) -> list[dict[str, str]]:
    """The article part files of one enwiki dump, in part order: [{"name", "url", "sha1"}].

    `date` is a concrete dump date (resolve `latest` with `resolve_dump_date` first)."""
    if max_parts is not None and max_parts < 1:
        raise UserError(f"config key enwiki.max_parts must be at least 1, or null for all parts (got {max_parts})")
    folder = dump_folder_url(mirror, date)
    sums_url = f"{folder}/enwiki-{date}-sha1sums.txt"
    try:
        response = requests.get(sums_url, timeout=60)
        if response.status_code == 404:
            raise UserError(f"no dump {date} on {mirror}: {sums_url} was not found (HTTP 404); "
                            f"{_dates_hint(mirror)}; set config key enwiki.date to one of them or to latest "
                            "(older dumps are on archive mirrors: set enwiki.mirror, see the README)")
        response.raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"cannot fetch the dump's checksum list {sums_url}: {err}; {CONFIG_HINT}") from None
    part_file = re.compile(
        rf"([0-9a-f]{{40}})\s+\*?(enwiki-{re.escape(date)}-pages-articles(\d+)\.xml-p(\d+)p(\d+)\.bz2)")
    parts = []
    for line in response.text.splitlines():
        match = part_file.fullmatch(line.strip())
        if match:
            sha1, file_name, number, first, last = match.groups()
            parts.append(((int(number), int(first)), {
                "name": f"pages-articles{number}.xml-p{first}p{last}",
                "url": f"{folder}/{file_name}",
                "sha1": sha1,
            }))
    if not parts:
        raise UserError(f"{sums_url} lists no article part files (enwiki-{date}-pages-articlesN.xml-pApB.bz2); "
                        f"the dump may still be in progress; {CONFIG_HINT}")
    ordered = [entry for _, entry in sorted(parts, key=lambda item: item[0])]
    return ordered if max_parts is None else ordered[:max_parts]


class _Retryable(Exception):
    """A failure worth another attempt: server error, dropped connection, short body."""


def partial_path(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    return out.with_name(out.name + ".partial")


def _content_range(response: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header, None where absent or '*'."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _fetch_rest(url: str, partial: Path, timeout: float, config_hint: str = CONFIG_HINT) -> int:
    """Append the bytes of `url` that `partial` lacks; return how many arrived."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Accept-Encoding": "identity"}   # the bytes as stored, so sizes and sha1 match
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as err:
        raise _Retryable(str(err)) from err
    with response:
        status = response.status_code
        if status == 416 and offset:
            _, total = _content_range(response)
            if total is not None and offset > total:
                partial.unlink()
                raise _Retryable(f"the kept partial ({offset} bytes) is longer than the file ({total} bytes)")
            return 0   # nothing left to fetch; the sha1 check decides
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise UserError(f"cannot download {url}: HTTP {status} {response.reason}; {config_hint}")
        if status == 206 and _content_range(response)[0] != offset:
            partial.unlink()
            raise _Retryable("the server answered a different byte range than asked for")
        if status == 200:
            offset = 0   # the server ignored Range and sends the whole file: start over
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        received = 0
        with open(partial, "ab" if offset else "wb") as out, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1], file=sys.stderr, mininterval=1.0,
        ) as bar:
            try:
                for chunk in response.iter_content(NETWORK_CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as err:
                raise _Retryable(str(err)) from err
    if expected is not None and offset + received < expected:
        raise _Retryable(f"the connection closed after {offset + received} of {expected} bytes")
    return received


def fetch_with_retries(url: str, partial: Path, *, retries: int, timeout: float, backoff_s: float,
                       config_hint: str = CONFIG_HINT) -> tuple[int, int]:
    """`url` into `partial`, resuming what is there, retrying with exponential backoff.

    Returns (bytes received by the attempt that finished, attempts). Checksums are the caller's job.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            return _fetch_rest(url, partial, timeout, config_hint), attempts
        except _Retryable as err:
            kept = partial.stat().st_size if partial.exists() else 0
            if attempts > retries:
                raise UserError(f"download of {url} failed after {attempts} attempts ({err}); "
                                f"rerun to resume from the {kept} bytes kept in {partial}") from None
            wait = backoff_s * 2 ** (attempts - 1)
            log.info(f"download of {url}: {err}; retrying in {wait:.0f} s")
            time.sleep(wait)


def download_part(url: str, out_dir: str | os.PathLike, *, sha1: str, retries: int = 5,
                  timeout: float = 60, backoff_s: float = 2.0) -> dict[str, Any]:
    """Download `url` to `<out_dir>/pages.xml.bz2`, resuming, retrying and checking its sha1."""
    out_dir = Path(out_dir)
    final = out_dir / PAGES_NAME
    sha1 = sha1.lower()
    if final.is_file() and file_digest(final, "sha1", HASH_CHUNK_BYTES) == sha1:
        return {"path": str(final), "bytes": final.stat().st_size, "skipped": True}
    partial = partial_path(out_dir)
    partial.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    resumed_from = partial.stat().st_size if partial.exists() else 0
    received, attempts = fetch_with_retries(url, partial, retries=retries, timeout=timeout, backoff_s=backoff_s)
    actual = file_digest(partial, "sha1", HASH_CHUNK_BYTES)
    if actual != sha1:
        partial.unlink()
        raise UserError(f"checksum mismatch for {url}: expected sha1 {sha1}, got {actual}; the bad "
                        "download was deleted, rerun to fetch it again (if it fails again, the mirror's "
                        "copy or the sha1 in the manifest is wrong)")
    size = partial.stat().st_size
    figures = {"bytes": size, "bytes_received": received, "resumed_from_bytes": resumed_from,
               "attempts": attempts, "seconds": round(time.perf_counter() - start, 3)}
    with atomic_dir(out_dir) as tmp:
        write_provenance(tmp, "dump", {"dataset": "enwiki", "url": url, "sha1": sha1}, [], figures)
        os.replace(partial, tmp / PAGES_NAME)   # last, so a failure above leaves the partial
    return {"path": str(final), **figures}
