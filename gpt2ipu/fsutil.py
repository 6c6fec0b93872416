"""Atomic outputs: a stage's file or folder appears under its final name only when complete.

Everything is written to a temporary name in the same folder (so the final rename is atomic on
one filesystem) and renamed at the end; on any error the temporary is removed, and whatever was
already at the final name is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700 for privacy while writing; the published output gets the
    # permissions a plain open()/mkdir() would have given it.
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it over `final_path` on success."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _publish_mode(tmp, is_dir=False)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final_path`; it replaces `final_path` on success."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    return file_digest(path, "sha256", chunk_bytes)


def file_digest(path: str | os.PathLike, algorithm: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file read in chunks (`algorithm`: a hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def parse_json_record(line: str | bytes, path: str | os.PathLike, number: int, field: str, record_name: str,
                      hint: str = "") -> dict:
    """One line of a JSON-lines input: a JSON object with a string `field`, else a UserError
    naming `path:number` (and ending with `hint`, what to do about it)."""
    from gpt2ipu.errors import UserError

    tail = f"; {hint}" if hint else ""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise UserError(f"{path}:{number}: not a JSON line ({err}){tail}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise UserError(f'{path}:{number}: {record_name} needs a string "{field}" field{tail}')
    return record
