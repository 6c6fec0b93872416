"""Storage faults (disk full, file-size limit, permission) and stale temporaries of killed jobs.

Fast: faults are simulated (a patched call raising the OSError, or RLIMIT_FSIZE in a child
process, which turns a real write into EFBIG); no Snakemake.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest

from gpt2ipu import cli, fsutil
from gpt2ipu.errors import StorageError, UserError
from gpt2ipu.fsutil import atomic_dir, atomic_file, storage_errno
from gpt2ipu.workflow_adapter import run_stage

REPO = Path(__file__).resolve().parents[1]
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, ENOSPC_TEXT, str(path))


# --- disk full ---------------------------------------------------------------------------------

def test_disk_full_inside_atomic_dir_names_output_errno_and_what_to_do(tmp_path):
    final = tmp_path / "shards"
    with pytest.raises(StorageError) as info:
        with atomic_dir(final) as tmp:
            (tmp / "train-0.tfrecord").write_bytes(b"x" * 100)
            raise enospc(tmp / "train-1.tfrecord")
    message = str(info.value)
    assert message.startswith(f"{final}: {ENOSPC_TEXT} (ENOSPC) while writing {final}/train-1.tfrecord; ")
    assert "free space on /" in message and "free now" in message
    assert "rerun the same command; finished outputs are kept" in message
    assert ".tmp" not in message  # the temporary's name means nothing to the user
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, UserError)
    assert not final.exists() and leftovers(tmp_path) == []


def test_disk_full_in_atomic_file_keeps_previous_output(tmp_path):
    final = tmp_path / "metrics.jsonl"
    final.write_text("old\n")
    with pytest.raises(StorageError, match="No space left on device"):
        with atomic_file(final) as tmp:
            tmp.write_text("half")
            raise enospc(tmp)
    assert final.read_text() == "old\n" and leftovers(tmp_path) == []


def test_nested_atomic_writers_name_final_paths(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(StorageError) as info:
        with atomic_dir(final) as tmp, atomic_file(tmp / "data.idx") as inner:
            raise enospc(inner)
    assert str(info.value).startswith(f"{final}/data.idx: {ENOSPC_TEXT} (ENOSPC)")
    assert ".tmp" not in str(info.value)
    assert not final.exists() and leftovers(tmp_path) == []


def test_torch_and_safetensors_write_failures_are_recognised(monkeypatch):
    torch_text = "[enforce fail at inline_container.cc:603] . unexpected pos 4480 vs 4374"
    monkeypatch.setattr(fsutil.resource, "getrlimit", lambda _: (fsutil.resource.RLIM_INFINITY,) * 2)
    assert storage_errno(RuntimeError(torch_text)) == errno.ENOSPC
    monkeypatch.setattr(fsutil.resource, "getrlimit", lambda _: (1 << 20, fsutil.resource.RLIM_INFINITY))
    assert storage_errno(RuntimeError(torch_text)) == errno.EFBIG  # ulimit -f set: that is the cause
    rust_text = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert storage_errno(RuntimeError(rust_text)) == errno.ENOSPC
    assert storage_errno(RuntimeError("some bug")) is None
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert storage_errno(wrapped) == errno.EDQUOT
    assert storage_errno(ValueError(ENOSPC_TEXT)) is None  # only writers' RuntimeErrors are read


def test_bugs_still_raise_unchanged(tmp_path):
    final = tmp_path / "x"
    with pytest.raises(ValueError, match="a bug"):
        with atomic_dir(final):
            raise ValueError("a bug")
    with pytest.raises(OSError) as info:  # not a storage errno: a plain OSError, as before
        with atomic_file(final):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert not isinstance(info.value, StorageError)
    assert leftovers(tmp_path) == [] and not final.exists()


def run_child(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`code` in a child whose file-size limit is 64 KiB (SIGXFSZ ignored, so writes fail with EFBIG)."""
    prelude = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        from gpt2ipu.errors import StorageError
        try:
    """)
    body = textwrap.indent(textwrap.dedent(code), "    ")
    tail = "except StorageError as err:\n    print('MESSAGE', err, file=sys.stderr)\n    sys.exit(3)\n"
    return subprocess.run([sys.executable, "-c", prelude + body + tail], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_real_shard_write_past_file_size_limit(tmp_path):
    proc = run_child("""
        import numpy as np
        from gpt2ipu.fsutil import atomic_dir
        from gpt2ipu.data.formats.tfrecord import write_tfrecord_shard
        with atomic_dir("shards") as tmp:  # two chunks (two write() calls): the second one fails
            write_tfrecord_shard(tmp / "train-00000.tfrecord", np.arange(1 << 19).reshape(-1, 128) % 50000)
    """, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "MESSAGE shards: " in proc.stderr and "File too large (EFBIG)" in proc.stderr
    assert "ulimit -f" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "shards").exists()


def test_real_checkpoint_write_past_file_size_limit(tmp_path):
    pytest.importorskip("torch")
    proc = run_child("""
        import torch
        from gpt2ipu.train.state import save_training_checkpoint
        save_training_checkpoint("state", 10, lambda folder: None, {"moments": torch.zeros(100_000)}, {}, keep=2)
    """, tmp_path)
    assert proc.returncode == 3, proc.stderr
    final = tmp_path / "state" / "checkpoints" / "step-00000010"
    assert "MESSAGE state/checkpoints/step-00000010: File too large (EFBIG)" in proc.stderr
    assert "unexpected pos" not in proc.stderr
    assert not final.exists() and leftovers(final.parent) == []


# --- permission --------------------------------------------------------------------------------

def test_permission_denied_names_the_folder_to_make_writable(tmp_path, monkeypatch):
    final = tmp_path / "results" / "model"
    (tmp_path / "results").mkdir()

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".model.1.abcdefgh.tmp"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(StorageError) as info:
        with atomic_dir(final):
            pass
    message = str(info.value)
    assert message.startswith(f"{final}: Permission denied (EACCES) while writing ")
    assert f"make {tmp_path / 'results'} writable" in message and "rerun the same command" in message
    assert not final.exists()


def test_permission_denied_creating_the_results_folder(tmp_path, monkeypatch):
    final = tmp_path / "results" / "run1" / "model"

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(StorageError) as info:
        with atomic_file(final):
            pass
    assert f"(EPERM) while writing {final.parent}" in str(info.value)
    assert f"make {tmp_path} writable" in str(info.value)


def test_immutable_folder_with_chattr(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (filesystem or container)")
    try:
        with pytest.raises(StorageError, match=r"\(EPERM\).*make .*/ro writable"):
            with atomic_file(folder / "out.txt") as tmp:
                tmp.write_text("x")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert list(folder.iterdir()) == []


# --- the Snakemake adapter and the command line -------------------------------------------------

def fake_snakemake(tmp_path: Path, output: str = "out") -> types.SimpleNamespace:
    return types.SimpleNamespace(log=[str(tmp_path / "rule.log")], output=[str(tmp_path / output)], rule="shards")


def test_run_stage_writes_storage_error_to_log_and_terminal(tmp_path, capsys):
    def stage(out_dir):
        print("progress 1/2", file=sys.stderr)
        with atomic_dir(out_dir) as tmp:
            raise enospc(tmp / "train-00001.tfrecord")

    snakemake = fake_snakemake(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_stage(snakemake, stage, out_dir=snakemake.output[0])
    assert info.value.code == 1
    expected = (f"gpt2ipu rule shards: error: {tmp_path}/out: {ENOSPC_TEXT} (ENOSPC) while writing "
                f"{tmp_path}/out/train-00001.tfrecord; free space on")
    log = (tmp_path / "rule.log").read_text()
    assert log.startswith("progress 1/2\n") and expected in log and "Traceback" not in log
    err = capsys.readouterr().err
    assert expected in err and err.count("error:") == 1
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_run_stage_reports_raw_oserror_of_a_storage_kind(tmp_path, capsys):
    folder = tmp_path / "results"

    def stage():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / "report.json"))

    folder.mkdir()
    with pytest.raises(SystemExit) as info:
        run_stage(fake_snakemake(tmp_path), stage)
    assert info.value.code == 1
    expected = (f"gpt2ipu rule shards: error: {folder}/report.json: Permission denied (EACCES) while writing it; "
                f"make {folder} writable")
    assert expected in (tmp_path / "rule.log").read_text() and expected in capsys.readouterr().err


def test_run_stage_storage_oserror_without_filename_names_the_rule_output(tmp_path, capsys):
    def stage():
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)  # e.g. from a plain write(): the system names no file

    with pytest.raises(SystemExit):
        run_stage(fake_snakemake(tmp_path, "tokens"), stage)
    assert f"error: {tmp_path}/tokens: {ENOSPC_TEXT} (ENOSPC) while writing it" in capsys.readouterr().err


def test_run_stage_keeps_bugs_as_tracebacks(tmp_path):
    def stage():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "x")

    with pytest.raises(OSError):
        run_stage(fake_snakemake(tmp_path), stage)


def test_cli_prints_storage_oserror_without_traceback(tmp_path, monkeypatch, capsys):
    module = types.ModuleType("fake_stage_cmd")
    module.add_arguments = lambda parser: None
    module.run = lambda args: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "o")))
    monkeypatch.setitem(sys.modules, "fake_stage_cmd", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_stage_cmd", "test"))
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2ipu fake: error: {tmp_path}/o: Read-only file system (EROFS) while writing it; ")
    assert "mounted read-only" in err and err.count("\n") == 1


# --- stale temporaries -------------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rerun_removes_stale_temporaries_of_a_killed_writer(tmp_path, capsys):
    final = tmp_path / "articles"
    stale = tmp_path / f".articles.{dead_pid()}.abcd1234.tmp"
    stale.mkdir()
    (stale / "articles.jsonl").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".articles.{dead_pid()}.zz_9yy8x.tmp"
    stale_file.write_bytes(b"y" * 24)
    old_style = tmp_path / ".articles.qwertyui.tmp"  # no PID (an older version), untouched for 2 hours
    old_style.mkdir()
    os.utime(old_style, (time.time() - 7200,) * 2)
    live = tmp_path / f".articles.{os.getppid()}.abcd1234.tmp"  # its writer still runs: kept
    live.mkdir()
    fresh_old_style = tmp_path / ".articles.asdfghjk.tmp"  # no PID but recent: kept
    fresh_old_style.mkdir()
    other_output = tmp_path / f".articles.b.{dead_pid()}.abcd1234.tmp"  # belongs to "articles.b"
    other_output.mkdir()

    with atomic_dir(final) as tmp:
        assert tmp.name.startswith(f".articles.{os.getpid()}.") and tmp.name.endswith(".tmp")
        (tmp / "articles.jsonl").write_text("{}\n")

    assert (final / "articles.jsonl").read_text() == "{}\n"
    assert not stale.exists() and not stale_file.exists() and not old_style.exists()
    assert live.exists() and fresh_old_style.exists() and other_output.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"gpt2ipu: removed 3 stale temporaries of a killed earlier run from {tmp_path} (1024 bytes): " in err
    assert stale.name in err and old_style.name in err


def test_atomic_file_removes_stale_temporaries_too(tmp_path, capsys):
    stale = tmp_path / f".metrics.jsonl.{dead_pid()}.abcd1234.tmp"
    stale.write_text("half")
    with atomic_file(tmp_path / "metrics.jsonl") as tmp:
        tmp.write_text("{}\n")
    assert not stale.exists() and leftovers(tmp_path) == []
    assert "removed 1 stale temporary" in capsys.readouterr().err
