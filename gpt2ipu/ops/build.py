"""Compile custom_ops/*.cpp into a build folder keyed on the sources, flags, torch version and machine.

`build_ops(source_dir, build_dir)` (the Snakemake rule `build_ops`, or `gpt2ipu ops build --out DIR`)
always leaves a `status.json` in the folder, `{"built": false, "reason": ...}` when there is no
compiler or the build fails, so loading (gpt2ipu/ops/load.py) never compiles and every caller can
fall back to its pure PyTorch / numpy path.

This module does not import torch: the Snakefile imports `build_key` at parse time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, write_text_atomic
from gpt2ipu.log import package_logger

log = package_logger(__name__)

OPS_DIR_ENV = "GPT2IPU_OPS_DIR"


NAMESPACE = "gpt2ipu"


LIBRARY_NAME = "gpt2ipu_ops"


STATUS_NAME = "status.json"


SOURCE_SUFFIXES = (".cpp", ".h")


# -fopenmp: ATen's parallel_for is an inline OpenMP loop, and `omp simd` vectorizes the row loops.
CFLAGS = ("-O3", "-fopenmp")


LDFLAGS = ("-fopenmp",)


BUILD_TIMEOUT_S = 900


def find_source_dir(*candidates: str | os.PathLike | None) -> Path | None:
    """The first of `candidates` that holds C++ sources, else the repository's custom_ops/; None if none does."""
    package_sources = Path(__file__).resolve().parents[2] / "custom_ops"
    for folder in (*[Path(c) for c in candidates if c], package_sources):
        if folder.is_dir() and source_files(folder):
            return folder
    return None


def source_files(source_dir: str | os.PathLike | None) -> list[Path]:
    if source_dir is None:
        return []
    return sorted(p for p in Path(source_dir).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())


def _torch_version() -> str:
    # The installed distribution's version: importing torch would cost seconds at Snakefile parse time.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def build_key(source_dir: str | os.PathLike | None) -> str:
    """Hash of what the library depends on: sources, flags, torch version, machine. 16 hex digits."""
    digest = hashlib.sha256(json.dumps([CFLAGS, LDFLAGS, _torch_version(), platform.machine()]).encode())
    for path in source_files(source_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def read_status(build_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(build_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_ops(source_dir: str | os.PathLike | None, build_dir: str | os.PathLike, *, jobs: int | None = None,
              timeout_s: float = BUILD_TIMEOUT_S, force: bool = False, enabled: bool = True) -> dict[str, Any]:
    """Compile the ops into `build_dir` (atomically) and return its status.json as a dict.

    Never raises for a failed build: the folder is written anyway, with built false and the reason;
    the compiler's output goes to stderr (the rule's log). `jobs` compiler processes at most (default:
    ninja's). A successful build of the same key already in `build_dir` is reused unless `force`.
    `enabled=False` writes a not-built status without compiling (config `ops.build: false`).
    """
    key = build_key(source_dir)
    previous = read_status(build_dir)
    if not force and previous and previous.get("built") and previous.get("key") == key \
            and (Path(build_dir) / previous["library"]).is_file():
        log.info(f"gpt2ipu ops: reusing the build in {build_dir}")
        return previous
    sources = source_files(source_dir)
    start = time.monotonic()
    with atomic_dir(build_dir) as tmp:
        if not enabled:
            outcome = {"built": False, "reason": "not compiled: switched off (config ops.build: false)"}
        elif not sources:
            outcome = {"built": False, "reason": f"no C++ sources (*.cpp) found in {source_dir}"}
        else:
            outcome = _compile(sources, tmp, timeout_s, jobs)
        status = {"built": False, "reason": None, "library": None, **outcome, "key": key,
                  "torch": _torch_version(), "seconds": round(time.monotonic() - start, 1),
                  "sources": [p.name for p in sources]}
        write_text_atomic(tmp / STATUS_NAME, json.dumps(status, indent=2, sort_keys=True) + "\n")
        from gpt2ipu.provenance import write_provenance

        write_provenance(tmp, "ops", {"cflags": CFLAGS, "ldflags": LDFLAGS, "key": key}, sources,
                         {"built": status["built"], "seconds": status["seconds"]})
    verdict = "built" if status["built"] else f"NOT built ({status['reason']})"
    log.info(f"gpt2ipu ops: {verdict} in {status['seconds']} s -> {build_dir}")
    return status


def _compile(sources: list[Path], out_dir: Path, timeout_s: float, jobs: int | None) -> dict[str, Any]:
    """Compile and self-check in a child process; {"built": True, "library": name} or the reason why not.

    A child, because loading the library registers its ops in the process for good (a later
    `load_ops` of the final folder would clash), and a crash or hang of the build stays there.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return {"built": False, "reason": f"no C++ compiler: {compiler!r} is not on PATH (set CXX to one)"}
    env = dict(os.environ)
    # ninja from the `ninja` wheel sits beside this Python, which need not be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if jobs:
        env["MAX_JOBS"] = str(jobs)  # read by torch.utils.cpp_extension: ninja -j
    units = [str(p.resolve()) for p in sources if p.suffix == ".cpp"]  # headers count for the key only
    request = json.dumps({"sources": units, "out_dir": str(out_dir)})
    command = [sys.executable, "-c", "import sys, gpt2ipu.ops.build as o; o._compile_child(sys.argv[1])", request]
    log.info(f"gpt2ipu ops: compiling {', '.join(Path(u).name for u in units)} with {compiler} "
             f"(about half a minute on two cores)")
    # Streamed line by line into our stderr (the rule's log): a compile has no progress to show
    # with a bar, but its lines appear as they come.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-40:]
        code = process.wait()
    finally:
        timer.cancel()
    result = next((json.loads(line[len("RESULT "):]) for line in reversed(tail) if line.startswith("RESULT ")), None)
    if code == 0 and result:
        return {"built": True, "library": result["library"]}
    if code < 0:
        return {"built": False, "reason": f"the build was stopped after {timeout_s:.0f} s (or killed)"}
    failures = [line for line in tail if line.startswith("self-check failed")] or \
        [line for line in tail if "error" in line.lower()] or tail or ["no output"]
    return {"built": False, "reason": f"compilation failed: {failures[0][:300]} (full compiler output in the log)"}


def _compile_child(request_json: str) -> None:
    request = json.loads(request_json)
    import torch
    from torch.utils import cpp_extension

    path = cpp_extension.load(name=LIBRARY_NAME, sources=request["sources"], build_directory=request["out_dir"],
                              extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), is_python_module=False,
                              verbose=True)
    from gpt2ipu.ops.selfcheck import self_check

    self_check(getattr(torch.ops, NAMESPACE))
    print("RESULT " + json.dumps({"library": Path(path).name}), flush=True)


def ready_ops_dir(build_dir: str | os.PathLike | None, scratch: str | os.PathLike) -> str:
    """A folder with a good build: `build_dir` or $GPT2IPU_OPS_DIR if given, else a fresh build in `scratch`.

    For the benchmarks, which compare against the compiled ops and so cannot fall back.
    """
    folder = build_dir or os.environ.get(OPS_DIR_ENV)
    if not folder:
        folder = str(Path(scratch) / "ops")
        build_ops(find_source_dir(), folder)
    status = read_status(folder) or {"reason": f"no {STATUS_NAME}"}
    if not status.get("built"):
        raise UserError(f"{folder}: the compiled ops are not built ({status.get('reason')}); "
                        f"build them with `gpt2ipu ops build --out DIR` and pass --ops-dir DIR")
    return str(folder)

