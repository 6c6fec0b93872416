"""Atomic outputs: a stage's file or folder appears under its final name only when complete.

Everything is written to a temporary name in the same folder (so the final rename is atomic on
one filesystem) and renamed at the end; on any error the temporary is removed, and whatever was
already at the final name is left untouched. A storage fault while writing (disk full, quota,
file-size limit, permission, read-only filesystem) becomes a `StorageError` naming the output and
what to do. Temporaries are named `.<name>.<pid>.<random>.tmp`; a rerun removes those a killed
writer left behind before it starts (`_remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gpt2ipu.errors import StorageError
from gpt2ipu.log import package_logger

log = package_logger(__name__)

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700 for privacy while writing; the published output gets the
    # permissions a plain open()/mkdir() would have given it.
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _publish_file_modes(folder: Path) -> None:
    # Files a library wrote in the folder through its own temporary (safetensors' save_file:
    # model.safetensors comes 0600) get at least what open() gives; other bits are kept.
    readable = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and (mode | readable) != mode:
                os.chmod(path, stat.S_IMODE(mode) | readable)


# --- storage faults: disk full, quota, file size limit, permission, read-only filesystem ---------

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS})

# torch.save and safetensors report a failed write as a RuntimeError (torch: "... unexpected pos
# N vs M" or "file write failed"; safetensors: "IoError(Os { code: 28, ... })") that loses the
# OSError. Their text is all we have: an errno's own words in it name it; torch's opaque ones are
# EFBIG when this process has a file-size limit (ulimit -f), else, by far most often, disk full.
_OPAQUE_WRITE_FAILURES = ("unexpected pos", "file write failed")


def _mount_point(path: str | os.PathLike) -> Path:
    p = _nearest_existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _nearest_existing(path: str | os.PathLike) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _size_text(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def storage_errno(err: BaseException) -> int | None:
    """The storage errno behind `err` (an OSError, or a torch/safetensors RuntimeError wrapping
    one, looked for along the exception's cause/context chain too), else None."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
            text = str(e)
            for number in sorted(STORAGE_ERRNOS):
                if os.strerror(number) in text or f"code: {number}," in text:
                    return number
            if any(marker in text for marker in _OPAQUE_WRITE_FAILURES):
                soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE) if resource else (-1, -1)
                return errno.EFBIG if resource and soft != resource.RLIM_INFINITY else errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


def storage_error(number: int, path: str | os.PathLike, written: str | os.PathLike | None = None):
    """The `StorageError` for errno `number` while writing output `path` (`written`: the file or
    folder the system named, when it is not `path` itself), with what to do about it."""
    path = str(path)
    written = str(written) if written is not None and str(written) != path else None
    where = written or path
    mount = _mount_point(where)
    name = errno.errorcode.get(number, str(number))
    head = f"{path}: {os.strerror(number)} ({name})" + (f" while writing {written}" if written else " while writing it")
    rerun = "and rerun the same command; finished outputs are kept"
    if number == errno.ENOSPC:
        try:
            free = f" ({_size_text(shutil.disk_usage(mount).free)} free now)"
        except OSError:
            free = ""
        todo = f"free space on {mount}{free} {rerun}"
    elif number == errno.EDQUOT:
        todo = f"free space within your disk quota on {mount} (or have the quota raised) {rerun}"
    elif number == errno.EFBIG:
        todo = (f"the file grew past the file-size limit of this process (ulimit -f) or of the filesystem on "
                f"{mount}; raise the limit or write the outputs to another filesystem, {rerun}")
    elif number == errno.EROFS:
        todo = f"{mount} is mounted read-only; remount it read-write or put the outputs elsewhere, {rerun}"
    else:  # EACCES, EPERM
        target = Path(where)
        folder = target if target.is_dir() else _nearest_existing(target.parent)
        todo = (f"make {folder} writable for this user (e.g. chmod u+w {folder}, or fix its owner or an "
                f"immutable flag: lsattr -d {folder}) {rerun}")
    return StorageError(f"{head}; {todo}", number, path, written)


def storage_error_of(err: BaseException, fallback_path: str | os.PathLike | None = None) -> StorageError | None:
    """The `StorageError` for a disk-full/permission OSError raised outside the atomic writers (which
    raise it themselves), naming the file the system named, else `fallback_path`; None if `err` is
    not one, or names no path."""
    number = storage_errno(err) if isinstance(err, OSError) else None
    path = getattr(err, "filename", None) or fallback_path
    if number is None or path is None:
        return None
    return storage_error(number, path)


def _translate(err: BaseException, final: Path, tmp: Path | None) -> BaseException | None:
    """The StorageError to raise instead of `err` (raised while writing `final` through `tmp`),
    naming final paths rather than the temporary's; None to re-raise `err` unchanged."""
    def shown(p: str | os.PathLike | None) -> str | None:
        if p is None:
            return None
        p = os.fsdecode(p)
        if tmp is not None:
            t = str(tmp)
            if p == t or p.startswith(t + os.sep):
                return str(final) + p[len(t):]
        return p

    if isinstance(err, StorageError):  # from an inner atomic writer whose paths lie in our temporary
        path, written = shown(err.path), shown(err.written)
        if (path, written) == (err.path, err.written):
            return None
        return storage_error(err.errno, path, written)
    if not isinstance(err, Exception) or isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    number = storage_errno(err)
    if number is None:
        return None
    written = getattr(err, "filename", None) if isinstance(err, OSError) else None
    return storage_error(number, final, shown(written))


def _raise_translated(err: BaseException, final: Path, tmp: Path | None) -> None:
    """Raise the StorageError that stands for `err` (see `_translate`); return if there is none."""
    translated = _translate(err, final, tmp)
    if translated is not None:
        raise translated from (err.__cause__ if isinstance(err, StorageError) else err)


# --- stale temporaries of killed jobs -----------------------------------------------------------

STALE_UNOWNED_SECONDS = 3600


def _temp_prefix(final: Path) -> str:
    # `.<name>.<pid>.` + mkstemp's 8 random characters + `.tmp`: the writer's PID in the name lets
    # a later run tell a dead writer's leftovers from a live one's (see _remove_stale_temps).
    return f".{final.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a PID we cannot ask about): keep
    return True


def _tree_bytes(p: Path) -> int:
    total = 0
    try:
        if not p.is_dir() or p.is_symlink():
            return p.lstat().st_size
        for root, _dirs, files in os.walk(p):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def _remove_stale_temps(final: Path) -> None:
    """Remove the temporaries a killed earlier writer of `final` left beside it.

    A sibling is stale when its writer is gone: `.<name>.<pid>.<random>.tmp` (and atomic_dir's
    `.<name>.old-<pid>`) whose PID is not a live process here, and old-style `.<name>.<random>.tmp`
    (no PID; written before PIDs were in the name) untouched for an hour. Live writers' temporaries
    are kept, so even a concurrent writer of the same output (which Snakemake never runs: it locks
    outputs) loses nothing; a writer on another host sharing the folder could, which is why the
    pipeline runs one Snakemake per working directory. Says once on stderr what it removed.
    """
    name = re.escape(final.name)
    with_pid = re.compile(rf"\.{name}\.(?:(\d+)\.[a-z0-9_]{{8}}\.tmp|old-(\d+))")
    without_pid = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    removed: list[str] = []
    total = 0
    try:
        siblings = list(os.scandir(final.parent))
    except OSError:
        return
    now = time.time()
    for entry in siblings:
        m = with_pid.fullmatch(entry.name)
        try:
            if m:
                stale = not _pid_alive(int(m.group(1) or m.group(2)))
            elif without_pid.fullmatch(entry.name):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_UNOWNED_SECONDS
            else:
                continue
        except OSError:
            continue
        if not stale:
            continue
        p = Path(entry.path)
        size = _tree_bytes(p)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not os.path.lexists(p):
            removed.append(entry.name)
            total += size
    if removed:
        log.info(f"gpt2ipu: removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} of a killed "
                 f"earlier run from {final.parent} ({total} bytes): {', '.join(sorted(removed))}")


def _prepare(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:
            raise storage_error(err.errno, final, err.filename) from err
        raise
    _remove_stale_temps(final)


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it over `final_path` on success.

    A storage fault (disk full, quota, permission, read-only; see STORAGE_ERRNOS) while writing
    becomes a `StorageError` naming `final_path` and what to do; the temporary is removed.
    """
    final = Path(final_path)
    _prepare(final)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        _publish_mode(tmp, is_dir=False)
        os.replace(tmp, final)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        _raise_translated(err, final, tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final_path`; it replaces `final_path` on success.

    Storage faults are reported as in `atomic_file`; the temporary folder is removed.
    """
    final = Path(final_path)
    _prepare(final)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent))
        yield tmp
        _publish_mode(tmp, is_dir=True)
        _publish_file_modes(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_translated(err, final, tmp)
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
